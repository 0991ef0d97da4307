//! Call detail records: exactly one JSON line per call that reached a flow.
//!
//! A call's record is complete when two things have happened, in either order: the SIP side
//! ended (BYE either way, CANCEL, rejection, ACK timeout) and the flow's run returned (normally,
//! with an error, trapped or stopped by a limit). The endpoint fills a [`CdrDraft`] as both
//! arrive and hands the finished [`Cdr`] to the [`CdrSink`], which appends it to the configured
//! file and logs it (target `patchbay::cdr`).
//!
//! A call refused once its tenant is known — an unknown extension (`no-route`, 404) or failed
//! digest authentication (`auth-failed`, 403) — gets a record too, with `flow_outcome`
//! `not-run` and an empty `flow_version`. A digest challenge (407) does not: the caller answers
//! it with a new INVITE. A call to a domain no tenant serves is only logged (there is no tenant
//! to attribute it to).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// One finished call, as written (field names are the JSON keys).
#[derive(Debug, Clone, Serialize)]
pub struct Cdr {
    /// This record's own id (128 bits from the CSPRNG, hex): unique across records, nodes and
    /// restarts, unlike `id` — a Call-ID refused by a draining node and answered by another
    /// has two records. Receivers of the CDR webhook deduplicate by it.
    pub record_id: String,
    /// The call's id: for a call placed through the API, the id `POST /v1/calls` answered
    /// with; else the SIP Call-ID.
    pub id: String,
    /// The SIP Call-ID of the call's leg.
    pub call_id: String,
    /// The tenant that owns the call.
    pub tenant: String,
    /// The flow the call was routed to.
    pub flow: String,
    /// The flow's version (SHA-256 of the component) the call ran with.
    pub flow_version: String,
    /// `inbound`, or `outbound` for a leg a flow placed with `dial`.
    pub direction: &'static str,
    /// For an outbound leg: the Call-ID of the call whose flow placed it (else `null`).
    pub parent_call_id: Option<String>,
    /// The caller's URI.
    pub from: String,
    /// The called URI.
    pub to: String,
    /// When the INVITE arrived (RFC 3339, UTC, milliseconds).
    pub start: String,
    /// When the call was answered, if it was.
    pub answer: Option<String>,
    /// When the call ended.
    pub end: String,
    /// From start to end, in milliseconds.
    pub duration_ms: u64,
    /// From answer to end, in milliseconds (0 when never answered).
    pub billable_ms: u64,
    /// Billable time rounded up to whole seconds (what per-second billing charges).
    pub billable_secs: u64,
    /// What ended the call (see `docs/calls.md`): `caller-hangup`, `caller-cancel`,
    /// `flow-hangup`, `flow-completed`, `flow-error`, `flow-trap`, `cpu-limit-exceeded`,
    /// `memory-limit-exceeded`, `wall-time-exceeded`, `transferred`, `rtp-timeout`, `ack-timeout`, `media-refused`,
    /// `shutdown`, `no-route`, `auth-failed`, `pending-calls`, ...
    pub end_cause: String,
    /// The INVITE's final response: 200 when answered, else the rejection (487 when cancelled).
    pub sip_code: u16,
    /// `caller`, `flow`, `patchbay` (the runtime itself: timeouts, shutdown), `network`, or
    /// `callee` (the far end of an outbound leg).
    pub hung_up_by: &'static str,
    /// How the flow's run ended (`flow-completed`, `flow-error`, `flow-trap`, ...;
    /// `outbound-leg` for a leg, which runs no flow).
    pub flow_outcome: String,
    /// The flow's error or trap message, when there is one.
    pub flow_detail: Option<String>,
    /// The call variables when the flow ended.
    pub vars: BTreeMap<String, String>,
}

/// What the SIP side reports when a call ends.
#[derive(Debug, Clone)]
pub struct SipEnd {
    /// End cause (see [`Cdr::end_cause`]).
    pub cause: String,
    /// Who ended it.
    pub by: &'static str,
    /// The INVITE's final response code.
    pub sip_code: u16,
}

/// What the flow side reports when its run returns.
#[derive(Debug, Clone)]
pub struct FlowEnd {
    /// `FlowOutcome::cause()`.
    pub outcome: &'static str,
    /// Error or trap message.
    pub detail: Option<String>,
    /// Variables at the end.
    pub vars: BTreeMap<String, String>,
}

/// A record being filled while the call lives.
#[derive(Debug)]
pub struct CdrDraft {
    id: Option<String>,
    call_id: String,
    tenant: String,
    flow: String,
    flow_version: String,
    direction: &'static str,
    from: String,
    to: String,
    parent_call_id: Option<String>,
    started: (SystemTime, Instant),
    answered: Option<(SystemTime, Instant)>,
    /// Why we ended the call ourselves, set when we send the BYE or the rejection.
    local_reason: Option<(String, &'static str)>,
    ended: Option<(SystemTime, Instant, SipEnd)>,
    flow_end: Option<FlowEnd>,
    /// Counts the call in `patchbay_calls_active` while the draft lives (a call refused before
    /// it reached a flow is not counted: what it asked for is no label).
    _active: Option<crate::metrics::ActiveCall>,
}

impl CdrDraft {
    /// A call that has just been routed to a flow.
    pub fn new(info: &patchbay_host::CallInfo, flow_version: &str) -> Self {
        Self::attempt(info, flow_version, true)
    }

    /// [`CdrDraft::new`] for one attempt at a call: a call placed again at another target
    /// (`first` false) is not counted as started a second time.
    pub fn attempt(info: &patchbay_host::CallInfo, flow_version: &str, first: bool) -> Self {
        let direction = match info.direction {
            patchbay_host::Direction::Inbound => "inbound",
            patchbay_host::Direction::Outbound => "outbound",
        };
        Self {
            _active: (!flow_version.is_empty()).then(|| {
                let labels =
                    crate::metrics::CallLabels { tenant: info.tenant.clone(), flow: info.flow.clone(), direction };
                crate::metrics::ActiveCall::start(labels, first)
            }),
            id: None,
            call_id: info.call_id.clone(),
            tenant: info.tenant.clone(),
            flow: info.flow.clone(),
            flow_version: flow_version.to_owned(),
            direction,
            from: info.from.clone(),
            to: info.to.clone(),
            parent_call_id: None,
            started: (SystemTime::now(), Instant::now()),
            answered: None,
            local_reason: None,
            ended: None,
            flow_end: None,
        }
    }

    /// The tenant the call belongs to.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The flow it was routed to.
    pub fn flow(&self) -> &str {
        &self.flow
    }

    /// Its SIP Call-ID.
    pub fn call_id(&self) -> &str {
        &self.call_id
    }

    /// The record of an outbound leg this call's flow placed now (`call_id` is the leg's).
    /// A leg runs no flow of its own: its flow side is done from the start.
    pub fn leg(&self, call_id: &str, from: &str, to: &str) -> Self {
        Self {
            _active: Some(crate::metrics::ActiveCall::start(
                crate::metrics::CallLabels {
                    tenant: self.tenant.clone(),
                    flow: self.flow.clone(),
                    direction: "outbound",
                },
                true,
            )),
            id: None,
            call_id: call_id.to_owned(),
            tenant: self.tenant.clone(),
            flow: self.flow.clone(),
            flow_version: self.flow_version.clone(),
            direction: "outbound",
            from: from.to_owned(),
            to: to.to_owned(),
            parent_call_id: Some(self.call_id.clone()),
            started: (SystemTime::now(), Instant::now()),
            answered: None,
            local_reason: None,
            ended: None,
            flow_end: Some(FlowEnd { outcome: "outbound-leg", detail: None, vars: BTreeMap::new() }),
        }
    }

    /// The caller's and the called URI.
    pub fn parties(&self) -> (&str, &str) {
        (&self.from, &self.to)
    }

    /// Sets the record's id (a call placed through the API keeps the id the API gave it).
    pub fn set_id(&mut self, id: &str) {
        self.id = Some(id.to_owned());
    }

    /// Sets the record's Call-ID (a leg's is known once its INVITE is built).
    pub fn set_call_id(&mut self, call_id: &str) {
        call_id.clone_into(&mut self.call_id);
    }

    /// The call was answered now.
    pub fn answered(&mut self) {
        if self.answered.is_none() {
            let at = Instant::now();
            crate::metrics::METRICS
                .call_setup
                .get_or_create(&crate::metrics::DirectionLabel { direction: self.direction })
                .observe(at.saturating_duration_since(self.started.1).as_secs_f64());
            self.answered = Some((SystemTime::now(), at));
        }
    }

    /// Whether the call was answered.
    pub fn is_answered(&self) -> bool {
        self.answered.is_some()
    }

    /// We are ending the call for `cause`, on behalf of `by`; the first reason given wins.
    pub fn ending(&mut self, cause: impl Into<String>, by: &'static str) {
        self.local_reason.get_or_insert((cause.into(), by));
    }

    /// The reason we gave for ending the call, if we did.
    pub fn local_reason(&self) -> Option<(&str, &'static str)> {
        self.local_reason.as_ref().map(|(c, b)| (c.as_str(), *b))
    }

    /// The SIP side ended now.
    pub fn sip_ended(&mut self, end: SipEnd) {
        if self.ended.is_none() {
            self.ended = Some((SystemTime::now(), Instant::now(), end));
        }
    }

    /// The flow's run returned.
    pub fn flow_ended(&mut self, end: FlowEnd) {
        self.flow_end.get_or_insert(end);
    }

    /// Ends both sides now (each keeps what it already reported) and returns the record.
    pub fn close(mut self, sip: SipEnd, flow: FlowEnd) -> Option<Cdr> {
        self.sip_ended(sip);
        self.flow_ended(flow);
        self.finish()
    }

    /// The finished record once both sides have ended, else `None`.
    pub fn finish(&mut self) -> Option<Cdr> {
        let (end_wall, end_at, sip) = self.ended.clone()?;
        let flow = self.flow_end.take()?;
        let duration_ms = millis(end_at.saturating_duration_since(self.started.1));
        let billable_ms = self.answered.map_or(0, |(_, at)| millis(end_at.saturating_duration_since(at)));
        let call_id = std::mem::take(&mut self.call_id);
        Some(Cdr {
            record_id: format!("{:016x}{:016x}", crate::random::u64(), crate::random::u64()),
            id: self.id.take().unwrap_or_else(|| call_id.clone()),
            call_id,
            tenant: std::mem::take(&mut self.tenant),
            flow: std::mem::take(&mut self.flow),
            flow_version: std::mem::take(&mut self.flow_version),
            direction: self.direction,
            parent_call_id: self.parent_call_id.take(),
            from: std::mem::take(&mut self.from),
            to: std::mem::take(&mut self.to),
            start: rfc3339(self.started.0),
            answer: self.answered.map(|(wall, _)| rfc3339(wall)),
            end: rfc3339(end_wall),
            duration_ms,
            billable_ms,
            billable_secs: billable_ms.div_ceil(1000),
            end_cause: sip.cause,
            sip_code: sip.sip_code,
            hung_up_by: sip.by,
            flow_outcome: flow.outcome.to_owned(),
            flow_detail: flow.detail,
            vars: flow.vars,
        })
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Where finished records go: appended to a file (one JSON object per line, flushed per
/// record) by one writer task, and logged.
#[derive(Debug, Clone)]
pub struct CdrSink {
    records: mpsc::UnboundedSender<ToWriter>,
}

/// What the writer task is asked to do.
#[derive(Debug)]
enum ToWriter {
    Record(Box<Cdr>),
    /// Answer once everything sent before has been written.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Where records go besides the log (`[cdr]`).
#[derive(Debug, Clone, Default)]
pub struct CdrOutput {
    /// The JSON-lines file (none: records are only logged).
    pub path: Option<PathBuf>,
    /// Rotate the file once it holds this many bytes (0: never by size).
    pub rotate_bytes: u64,
    /// Rotate the file once it is this old (none: never by age).
    pub rotate_every: Option<std::time::Duration>,
    /// Each written line is also offered here (the webhook delivery), never waiting: when the
    /// queue is full the line is only in the file, and counted.
    pub tap: Option<mpsc::Sender<Tapped>>,
}

/// What the CDR writer hands its tap.
#[derive(Debug)]
pub enum Tapped {
    /// A record's JSON line.
    Line(std::sync::Arc<str>),
    /// Answer once every line before it has been dealt with (at shutdown).
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The open CDR file and when it must be rotated.
struct CdrFile {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    written: u64,
    opened: Instant,
    rotate_bytes: u64,
    rotate_every: Option<std::time::Duration>,
    /// After a rotation failed (the directory not writable, say): not tried again before then,
    /// so that a full file is not renamed in vain, and logged, at every record.
    retry_rotation_at: Option<Instant>,
}

impl CdrFile {
    async fn open(path: PathBuf, rotate_bytes: u64, rotate_every: Option<std::time::Duration>) -> Self {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && let Err(e) = tokio::fs::create_dir_all(dir).await
        {
            tracing::error!(path = %path.display(), "cannot create the CDR directory: {e}");
        }
        let mut this = Self {
            path,
            file: None,
            written: 0,
            opened: Instant::now(),
            rotate_bytes,
            rotate_every,
            retry_rotation_at: None,
        };
        this.reopen().await;
        this
    }

    async fn reopen(&mut self) {
        match tokio::fs::OpenOptions::new().create(true).append(true).open(&self.path).await {
            Ok(f) => {
                self.written = f.metadata().await.map(|m| m.len()).unwrap_or(0);
                self.file = Some(f);
            }
            Err(e) => {
                self.file = None;
                tracing::error!(path = %self.path.display(), "cannot open the CDR file (CDRs only logged): {e}");
            }
        }
        self.opened = Instant::now();
    }

    /// Appends one line (flushed), rotating first when the file is due.
    async fn append(&mut self, line: &str) -> std::io::Result<()> {
        let by_size =
            self.rotate_bytes > 0 && self.written > 0 && self.written + line.len() as u64 + 1 > self.rotate_bytes;
        let by_age = self.rotate_every.is_some_and(|every| self.opened.elapsed() >= every) && self.written > 0;
        let may = self.retry_rotation_at.is_none_or(|at| Instant::now() >= at);
        if (by_size || by_age) && may {
            self.rotate().await;
        }
        let Some(f) = self.file.as_mut() else {
            return Err(std::io::Error::other("the CDR file is not open"));
        };
        // The whole line in one write: lines never interleave, and a line is not left without
        // its newline by a failure between two writes.
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        f.write_all(&bytes).await?;
        f.flush().await?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Renames the file to `NAME.<UTC time>.EXT` (the time it was rotated; `-2`, `-3` … when
    /// that name is taken) and opens a fresh one. Lines are written by this task only, between
    /// rotations, so none is lost or split across two files.
    async fn rotate(&mut self) {
        if let Some(mut f) = self.file.take() {
            let _ = f.flush().await;
        }
        let stamp = humantime::format_rfc3339_seconds(SystemTime::now()).to_string().replace([':', '-'], "");
        let stem = self.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let ext = self.path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
        let mut target = self.path.with_file_name(format!("{stem}.{stamp}{ext}"));
        let mut n = 2;
        while tokio::fs::try_exists(&target).await.unwrap_or(false) {
            target = self.path.with_file_name(format!("{stem}.{stamp}-{n}{ext}"));
            n += 1;
        }
        match tokio::fs::rename(&self.path, &target).await {
            Ok(()) => {
                self.retry_rotation_at = None;
                tracing::info!(to = %target.display(), "CDR file rotated");
            }
            Err(e) => {
                // Records go on into the same file; rotation is tried again in a minute.
                self.retry_rotation_at = Some(Instant::now() + std::time::Duration::from_secs(60));
                tracing::error!(path = %self.path.display(), "rotating the CDR file (writing on into it): {e}");
            }
        }
        self.reopen().await;
    }
}

impl CdrSink {
    /// Starts the writer task: records go to the log, the file (rotated) and the tap.
    pub fn start(output: CdrOutput) -> Self {
        let (records, mut rx) = mpsc::unbounded_channel::<ToWriter>();
        tokio::spawn(async move {
            let mut file = match output.path {
                Some(path) => Some(CdrFile::open(path, output.rotate_bytes, output.rotate_every).await),
                None => None,
            };
            while let Some(message) = rx.recv().await {
                let cdr = match message {
                    ToWriter::Record(cdr) => cdr,
                    ToWriter::Flush(done) => {
                        // With a tap, the flush is answered once the tap has dealt with every
                        // line before it (the webhook delivered them or gave up).
                        match &output.tap {
                            Some(tap) => {
                                let _ = tap.send(Tapped::Flush(done)).await;
                            }
                            None => {
                                let _ = done.send(());
                            }
                        }
                        continue;
                    }
                };
                let line = match serde_json::to_string(&cdr) {
                    Ok(line) => line,
                    Err(e) => {
                        tracing::error!(call_id = %cdr.call_id, "CDR not serialisable: {e}");
                        continue;
                    }
                };
                tracing::info!(target: "patchbay::cdr", tenant = %cdr.tenant, flow = %cdr.flow, call_id = %cdr.call_id, "{line}");
                crate::metrics::METRICS.record_ended(&cdr);
                crate::metrics::METRICS.cdrs_written.inc();
                if let Some(file) = file.as_mut()
                    && let Err(e) = file.append(&line).await
                {
                    crate::metrics::METRICS.cdr_failures.inc();
                    tracing::error!(call_id = %cdr.call_id, "writing the CDR failed: {e}");
                }
                if let Some(tap) = &output.tap
                    && tap.try_send(Tapped::Line(line.into())).is_err()
                {
                    crate::metrics::METRICS.cdr_deliveries_dropped.inc();
                }
            }
        });
        Self { records }
    }

    /// Queues a finished record.
    pub fn write(&self, cdr: Cdr) {
        if self.records.send(ToWriter::Record(Box::new(cdr))).is_err() {
            tracing::error!("the CDR writer has stopped: record lost");
        }
    }

    /// Waits until every record queued before has been written (at shutdown).
    pub async fn flush(&self) {
        let (done, written) = tokio::sync::oneshot::channel();
        if self.records.send(ToWriter::Flush(done)).is_ok() {
            let _ = written.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> patchbay_host::CallInfo {
        patchbay_host::CallInfo {
            call_id: "abc".into(),
            tenant: "demo".into(),
            flow: "menu".into(),
            from: "sip:a@b".into(),
            to: "sip:menu@127.0.0.1".into(),
            direction: patchbay_host::Direction::Inbound,
            headers: Vec::new(),
        }
    }

    fn flow_end() -> FlowEnd {
        FlowEnd { outcome: "flow-completed", detail: None, vars: BTreeMap::new() }
    }

    #[test]
    fn a_record_needs_both_the_sip_end_and_the_flow_end_in_either_order() {
        let sip = SipEnd { cause: "caller-hangup".into(), by: "caller", sip_code: 200 };
        let mut a = CdrDraft::new(&info(), "v1");
        a.sip_ended(sip.clone());
        assert!(a.finish().is_none());
        a.flow_ended(flow_end());
        let cdr = a.finish().expect("complete");
        assert_eq!((cdr.end_cause.as_str(), cdr.hung_up_by, cdr.sip_code), ("caller-hangup", "caller", 200));
        assert!(a.finish().is_none(), "a record is produced once");

        let mut b = CdrDraft::new(&info(), "v1");
        b.flow_ended(flow_end());
        assert!(b.finish().is_none());
        b.sip_ended(sip);
        assert!(b.finish().is_some());
    }

    #[test]
    fn billable_seconds_round_up_and_unanswered_calls_bill_nothing() {
        let mut draft = CdrDraft::new(&info(), "v1");
        let t0 = draft.started.1;
        draft.answered = Some((SystemTime::now(), t0));
        draft.ended = Some((
            SystemTime::now(),
            t0 + std::time::Duration::from_millis(2_001),
            SipEnd { cause: "flow-completed".into(), by: "flow", sip_code: 200 },
        ));
        draft.flow_ended(flow_end());
        let cdr = draft.finish().expect("complete");
        assert_eq!((cdr.billable_ms, cdr.billable_secs), (2_001, 3));

        let mut missed = CdrDraft::new(&info(), "v1");
        missed.sip_ended(SipEnd { cause: "caller-cancel".into(), by: "caller", sip_code: 487 });
        missed.flow_ended(flow_end());
        let cdr = missed.finish().expect("complete");
        assert_eq!((cdr.billable_ms, cdr.billable_secs, cdr.answer.is_none()), (0, 0, true));
        let json = serde_json::to_value(&cdr).expect("json");
        assert_eq!(json["sip_code"], 487);
        assert!(json["start"].as_str().is_some_and(|s| s.ends_with('Z')), "{json}");
    }

    #[test]
    fn the_first_local_reason_wins() {
        let mut draft = CdrDraft::new(&info(), "v1");
        draft.ending("rtp-timeout", "patchbay");
        draft.ending("flow-completed", "flow");
        assert_eq!(draft.local_reason(), Some(("rtp-timeout", "patchbay")));
    }

    #[tokio::test]
    async fn the_file_rotates_by_size_and_keeps_every_line_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cdr.jsonl");
        // Lines of 40 bytes with their newline: two fit in 100 bytes, the third rotates.
        let mut file = CdrFile::open(path.clone(), 100, None).await;
        let lines: Vec<String> = (0..7).map(|n| format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(23))).collect();
        for line in &lines {
            assert_eq!(line.len() + 1, 40);
            file.append(line).await.expect("written");
        }
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        // Rotated files are `cdr.<time>[-N].jsonl`; the current one keeps its name.
        assert!(names.len() >= 3, "{names:?}");
        assert!(names.iter().all(|n| n.starts_with("cdr.") && n.ends_with(".jsonl")), "{names:?}");
        let mut seen: Vec<String> = Vec::new();
        for name in &names {
            let text = std::fs::read_to_string(dir.path().join(name)).expect("read");
            assert!(text.len() <= 100, "{name}: {} bytes", text.len());
            assert!(text.ends_with('\n'), "{name}");
            seen.extend(text.lines().map(str::to_owned));
        }
        seen.sort();
        let mut want = lines.clone();
        want.sort();
        assert_eq!(seen, want, "every line once, whole");
    }
}
