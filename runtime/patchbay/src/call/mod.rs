//! A call: everything about one call, in one place.
//!
//! A newcomer reading how a call lives should start here. [`Call`] is the one type that owns a
//! call's state — its SIP side (the INVITE, what SDP was agreed, a transfer waiting for its
//! NOTIFY), its media (the [`CallMedia`] session on the media clock), its flow (the task, the
//! channels that wake it) and its record (the CDR, filled as it goes) — for as long as the call
//! lasts. Its flow holds a [`CallHandle`] (the host's `CallControl`): the flow's side of the
//! same call, which reads the media directly and asks for everything that touches SIP with a
//! [`Request`].
//!
//! ```text
//!   network ──► endpoint (sans-IO SIP user agent, one task)
//!                 │  inbound INVITE routed, authenticated, admitted (endpoint::inbound)
//!                 ▼
//!               start ──► Call ───────── owns ──────────► CallMedia ◄── media clock
//!                 │        ▲   SIP events (re-INVITE,        ▲
//!                 │        │   INFO, NOTIFY, BYE)            │ play, listen, DTMF
//!                 ▼        │                                 │
//!              flow task: CallHandle ── Request (answer, hang up, dial, transfer, done) ──► endpoint
//!                 │
//!                 ▼
//!               Call::end ──► CDR written once both the SIP side and the flow have ended
//! ```
//!
//! **Why the endpoint's task drives every call, not a task per call.** A call's SIP state (its
//! dialog and transactions) lives in the sans-IO user agent, which one task owns so that it is
//! never locked; a re-INVITE is answered in the same turn it arrives. So `Call` is an actor in
//! the quinn-proto sense — a state machine the endpoint's loop drives, one mailbox
//! ([`Request`]) for what its flow asks — rather than a tokio task: no call's state is shared
//! or locked, and the flow (which does run in a task of its own, see [`start`]) never sees it
//! except through its handle.

mod handle;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use patchbay_host::{
    CallError, CallInfo, Direction, Dtmf, FlowCall, FlowEngine, FlowError, FlowOutcome, HangupCause, Header,
};
use patchbay_media::FramePool;
use patchbay_sip::ua::{CallRef, EndCause};
use tokio::sync::{mpsc, oneshot, watch};

use crate::cdr::{CdrDraft, FlowEnd, SipEnd};
use crate::dial::LegEvent;
use crate::media::{CallChannels, CallMedia};
use crate::tenant::Tenants;

pub(crate) use handle::CallHandle;

/// The longest an inbound call rings before its flow answers: then 480, CDR `ring-timeout`.
/// A flow that never answers would otherwise hold the call, its instance and its tenant's slot
/// for as long as the caller waits. Three minutes: RFC 3261 §16.6's Timer C, what a proxy in
/// front of us allows a ringing INVITE.
pub(crate) const MAX_RING: Duration = Duration::from_secs(180);

/// A call's media once answered, shared by the call (which starts and stops it) and its
/// flow's handle.
pub(crate) type MediaSlot = Arc<std::sync::OnceLock<Arc<CallMedia>>>;

/// What a call asks of the endpoint, which owns the SIP user agent: its flow's requests
/// (through its [`CallHandle`]) and its timers'.
pub(crate) enum Request {
    /// The flow answers (a no-op once answered).
    Answer { call: CallRef, reply: oneshot::Sender<Result<(), CallError>> },
    /// The flow hangs up (a final response before answer, BYE after).
    Hangup { call: CallRef, cause: HangupCause },
    /// The flow returned (or was stopped).
    FlowDone { call: CallRef, end: FlowEnd },
    /// The flow transfers the caller with REFER.
    Transfer { call: CallRef, target: String, reply: oneshot::Sender<Result<(), CallError>> },
    /// No RTP for the inactivity timeout.
    MediaTimeout { call: CallRef },
    /// Place an outbound leg for the call's flow.
    Dial {
        call: CallRef,
        target: Box<crate::dial::Target>,
        caller_id: Option<String>,
        headers: Vec<Header>,
        events: mpsc::UnboundedSender<LegEvent>,
        reply: oneshot::Sender<Result<CallRef, CallError>>,
    },
    /// Cancel or hang up an outbound leg.
    HangupLeg {
        leg: CallRef,
        /// For the leg's record: why, and on whose behalf.
        reason: &'static str,
        by: &'static str,
    },
    /// An inbound call's flow has not answered within [`MAX_RING`]: 480.
    RingTimeout { call: CallRef },
}

impl Request {
    /// The call (or, for `HangupLeg`, the leg) it is about.
    pub(crate) fn call(&self) -> CallRef {
        match self {
            Self::Answer { call, .. }
            | Self::Hangup { call, .. }
            | Self::FlowDone { call, .. }
            | Self::Transfer { call, .. }
            | Self::MediaTimeout { call }
            | Self::Dial { call, .. }
            | Self::RingTimeout { call } => *call,
            Self::HangupLeg { leg, .. } => *leg,
        }
    }
}

/// What a call's flow reaches beyond its own call, the same for every call: every tenant (for
/// calls between tenants), the frame pool, where recordings go, and the list of calls up.
#[derive(Clone)]
pub(crate) struct Services {
    /// Every tenant (replaced whole by a reload).
    pub(crate) tenants: Arc<crate::reload::Current<Tenants>>,
    /// Frames for prompts and recordings.
    pub(crate) pool: FramePool,
    /// The storage root (recordings under `<storage>/<tenant>/recordings`).
    pub(crate) storage: Arc<std::path::Path>,
    /// The calls up now (`GET /v1/calls`).
    pub(crate) live: Arc<LiveCalls>,
    /// Where the call's requests go.
    pub(crate) requests: mpsc::UnboundedSender<Request>,
}

/// Unanswered inbound calls across tenants, capped (`[sip] max_pending_calls`): a caller who
/// rings and never gets answered holds a place until the call is answered or ends, so a flood
/// of calls that only ring cannot hold everything the calls that get answered need.
#[derive(Debug, Clone)]
pub(crate) struct PendingCalls {
    open: Arc<std::sync::atomic::AtomicUsize>,
    max: usize,
}

/// One unanswered call's place in [`PendingCalls`]; given back when dropped.
#[derive(Debug)]
pub(crate) struct PendingSlot(Arc<std::sync::atomic::AtomicUsize>);

impl PendingCalls {
    pub(crate) fn new(max: usize) -> Self {
        Self { open: Arc::default(), max }
    }

    /// A place for a new unanswered call, or `None` when `max` are pending.
    pub(crate) fn hold(&self) -> Option<PendingSlot> {
        use std::sync::atomic::Ordering;
        let max = self.max;
        self.open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(PendingSlot(Arc::clone(&self.open)))
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// One call, from the moment its flow starts until its record is written: see the module's
/// docs.
pub(crate) struct Call {
    /// Wakes the flow's waits when the call is over.
    pub(crate) ended: watch::Sender<bool>,
    /// Key presses for the flow (SIP INFO here; RFC 4733 from the media clock).
    pub(crate) dtmf: mpsc::Sender<Dtmf>,
    /// The INVITE that started it (its offer is answered from it).
    pub(crate) invite: rsip::Request,
    /// The flow waiting in `transfer` for the REFER's outcome.
    pub(crate) transfer: Option<oneshot::Sender<Result<(), CallError>>>,
    /// Our side of the session and what was last agreed (kept for re-INVITEs, RFC 3264 §8);
    /// `Some` once answered.
    pub(crate) agreed: Option<(patchbay_sip::sdp::LocalMedia, patchbay_sip::sdp::Negotiated)>,
    /// The RTP session on the media clock, once answered.
    pub(crate) media: MediaSlot,
    /// Marks played, for the flow's `play`.
    pub(crate) played: watch::Sender<u64>,
    /// The call's record, filled as it goes.
    pub(crate) cdr: CdrDraft,
    /// For a call placed through the API: its id (its progress is reported there).
    pub(crate) origination: Option<String>,
    /// The tenant's and trunk's call slots it holds while it is up.
    _slots: crate::trunk::CallSlots,
    /// Its place among the unanswered calls, until answered.
    pub(crate) pending: Option<PendingSlot>,
    /// Counts the call in its tenant's live calls while it lasts.
    _live: crate::tenant::LiveCallGuard,
    /// Its flow's task: stopped if the flow has not returned [`FLOW_EXIT_GRACE`] after the
    /// call ended (a flow blocked in a WASI wait does not see the hang-up).
    flow_task: Option<tokio::task::AbortHandle>,
    /// Its entry in the API's list of calls up now.
    _listed: Listed,
    /// `call{tenant, flow, call_id}`: the flow's task runs in it, and the endpoint enters it
    /// while it handles the call's (and its legs') events, so every line about the call says
    /// which call.
    pub(crate) span: tracing::Span,
}

impl Call {
    /// Whether the call has been answered.
    pub(crate) fn is_answered(&self) -> bool {
        self.agreed.is_some()
    }
}

/// How long a flow has to return after its call ended before it is stopped.
pub(crate) const FLOW_EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// A call that is up, as the API lists it (`GET /v1/calls`).
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct CallSummary {
    /// The API's id for it: an API call's id, else the SIP Call-ID (as in its CDR's `id`).
    pub id: String,
    /// The SIP Call-ID.
    pub call_id: String,
    /// Its tenant.
    pub tenant: String,
    /// The flow running it.
    pub flow: String,
    /// The flow's version (SHA-256 of the component) it runs on.
    pub flow_version: String,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// Caller.
    pub from: String,
    /// Called.
    pub to: String,
    /// When its flow started (RFC 3339).
    pub started: String,
}

/// The calls up now, by API id, and where the endpoint knows them.
#[derive(Debug, Default)]
pub(crate) struct LiveCalls {
    calls: std::sync::Mutex<HashMap<String, (CallRef, CallSummary)>>,
}

impl LiveCalls {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (CallRef, CallSummary)>> {
        self.calls.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Lists a call until the returned entry is dropped.
    fn add(self: &Arc<Self>, call: CallRef, summary: CallSummary) -> Listed {
        let id = summary.id.clone();
        self.lock().insert(id.clone(), (call, summary));
        Listed { calls: Arc::clone(self), id }
    }

    /// The calls of the tenants `visible` accepts, oldest first.
    pub(crate) fn list(&self, visible: impl Fn(&str) -> bool) -> Vec<CallSummary> {
        let mut all: Vec<_> =
            self.lock().values().filter(|(_, s)| visible(&s.tenant)).map(|(_, s)| s.clone()).collect();
        all.sort_by(|a, b| a.started.cmp(&b.started).then_with(|| a.id.cmp(&b.id)));
        all
    }

    /// The call with this API id.
    pub(crate) fn find(&self, id: &str) -> Option<(CallRef, CallSummary)> {
        self.lock().get(id).cloned()
    }
}

/// A call's entry in [`LiveCalls`], removed when dropped (with the call).
#[derive(Debug)]
pub(crate) struct Listed {
    calls: Arc<LiveCalls>,
    id: String,
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.calls.lock().remove(&self.id);
    }
}

/// What it takes to start a call's flow: an inbound call routed to it, or a call placed
/// through the API that was just answered.
pub(crate) struct FlowStart {
    pub(crate) call: CallRef,
    pub(crate) info: CallInfo,
    pub(crate) flow: Arc<patchbay_host::CompiledFlow>,
    pub(crate) tenant: Arc<crate::tenant::Tenant>,
    pub(crate) vars: std::collections::BTreeMap<String, String>,
    pub(crate) refer: bool,
    pub(crate) invite: rsip::Request,
    /// An answered call's running media, channels, and what was agreed.
    pub(crate) media:
        Option<(Arc<CallMedia>, CallChannels, (patchbay_sip::sdp::LocalMedia, patchbay_sip::sdp::Negotiated))>,
    pub(crate) cdr: CdrDraft,
    pub(crate) origination: Option<String>,
    pub(crate) slots: crate::trunk::CallSlots,
    /// The call's slot in its tenant's share of the flow instance pool.
    pub(crate) instance: tokio::sync::OwnedSemaphorePermit,
    /// An inbound call's place among the unanswered calls.
    pub(crate) pending: Option<PendingSlot>,
}

/// Makes `start.call` a [`Call`] and runs its flow in a task of its own; the flow's end comes
/// back as [`Request::FlowDone`].
pub(crate) fn start(
    calls: &mut HashMap<CallRef, Call>,
    services: &Services,
    engine: &Arc<FlowEngine>,
    start: FlowStart,
) {
    let FlowStart { call, info, flow, tenant, vars, refer, invite, media, cdr, origination, slots, instance, pending } =
        start;
    let (ended, ended_rx) = watch::channel(false);
    let slot: MediaSlot = Arc::default();
    let (channels, agreed) = match media {
        Some((running, channels, agreed)) => {
            let _ = slot.set(running);
            (channels, Some(agreed))
        }
        None => (CallChannels::new(), None),
    };
    let CallChannels { dtmf, dtmf_rx, played, played_rx } = channels;
    let summary = CallSummary {
        id: origination.clone().unwrap_or_else(|| info.call_id.clone()),
        call_id: info.call_id.clone(),
        tenant: info.tenant.clone(),
        flow: info.flow.clone(),
        flow_version: flow.version().to_owned(),
        direction: match info.direction {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        },
        from: info.from.clone(),
        to: info.to.clone(),
        started: crate::cdr::rfc3339(std::time::SystemTime::now()),
    };
    let listed = services.live.add(call, summary);
    let answered = agreed.is_some();
    // What the flow's task logs (and the host logs for it, the flow's own `log` lines
    // included) carries the call's tenant, flow and Call-ID.
    let span = tracing::info_span!("call", tenant = %info.tenant, flow = %info.flow, call_id = %info.call_id);
    let watcher_span = span.clone();
    let call_span = span.clone();
    let run_labels = crate::metrics::FlowLabels { tenant: info.tenant.clone(), flow: info.flow.clone() };
    let handle = Arc::new(CallHandle {
        call,
        info,
        requests: services.requests.clone(),
        ended: ended_rx,
        dtmf: tokio::sync::Mutex::new(dtmf_rx),
        media: Arc::clone(&slot),
        played: played_rx,
        marks: Arc::default(),
        tenant: Arc::clone(&tenant),
        services: services.clone(),
        stream: tokio::sync::Mutex::new(None),
        refer,
    });
    let requests = services.requests.clone();
    let kv: Arc<dyn patchbay_host::KvStore> = Arc::clone(&tenant.kv) as Arc<dyn patchbay_host::KvStore>;
    let flow_call = FlowCall { control: handle, kv, vars, limits: Some(tenant.limits) };
    // The flow runs in a task of its own: should the host panic inside it, or the flow be
    // stopped after its call, the call still gets its FlowDone (and so its hang-up and its
    // record). The tenant's instance slot is held for as long as the instance lives.
    let engine = Arc::clone(engine);
    let task = tokio::spawn(
        async move {
            let started = std::time::Instant::now();
            let exit = engine.run(&flow, flow_call).await;
            crate::metrics::METRICS.flow_run_time.get_or_create(&run_labels).observe(started.elapsed().as_secs_f64());
            drop(instance);
            exit
        }
        .instrument(span),
    );
    calls.insert(
        call,
        Call {
            ended,
            dtmf,
            invite,
            agreed,
            transfer: None,
            media: slot,
            played,
            cdr,
            origination,
            _slots: slots,
            pending,
            _live: tenant.call_started(),
            flow_task: Some(task.abort_handle()),
            _listed: listed,
            span: call_span,
        },
    );
    if !answered {
        let requests = requests.clone();
        tokio::spawn(async move {
            tokio::time::sleep(MAX_RING).await;
            let _ = requests.send(Request::RingTimeout { call });
        });
    }
    tokio::spawn(
        async move {
            let end = flow_end(call, task.await);
            let _ = requests.send(Request::FlowDone { call, end });
        }
        .instrument(watcher_span),
    );
}

/// How a flow's task ended, for the record.
fn flow_end(call: CallRef, joined: Result<patchbay_host::FlowExit, tokio::task::JoinError>) -> FlowEnd {
    let exit = match joined {
        Ok(exit) => exit,
        Err(e) if e.is_cancelled() => {
            tracing::warn!(?call, "the flow had not returned {FLOW_EXIT_GRACE:?} after its call ended: stopped");
            let detail = Some(format!("the flow had not returned {FLOW_EXIT_GRACE:?} after its call ended"));
            return FlowEnd { outcome: "flow-stopped", detail, vars: Default::default() };
        }
        Err(e) => {
            tracing::error!(?call, "the flow's task failed: {e}");
            return FlowEnd { outcome: "host-error", detail: Some(e.to_string()), vars: Default::default() };
        }
    };
    let detail = match &exit.outcome {
        FlowOutcome::Completed => None,
        FlowOutcome::Failed(FlowError::Failed(message)) => Some(message.clone()),
        other => Some(format!("{other:?}")),
    };
    match &detail {
        None => tracing::info!(?call, cause = exit.outcome.cause(), "flow ended"),
        Some(detail) => tracing::info!(?call, cause = exit.outcome.cause(), "flow ended: {detail}"),
    }
    FlowEnd { outcome: exit.outcome.cause(), detail, vars: exit.vars }
}

impl Call {
    /// The call's session is over (RFC 3261 §15: for us as soon as we send BYE): stops its
    /// media, wakes its flow (stopping it after [`FLOW_EXIT_GRACE`] if it does not return),
    /// reports a call placed through the API as completed, and returns its record with the SIP
    /// side's end filled in (complete once the flow's end is in too).
    pub(crate) fn end(self, call: CallRef, cause: EndCause, originations: &crate::originate::Originations) -> CdrDraft {
        if let Some(media) = self.media.get() {
            let (stats, quality) = media.with(|s| (s.stats(), s.quality()));
            tracing::info!(
                ?call,
                rtp_in = stats.received,
                rtp_out = stats.sent,
                concealed = stats.concealed,
                lost = quality.local_cumulative_lost,
                jitter_ms = quality.local_jitter.as_secs_f64() * 1e3,
                peer_lost = ?quality.remote_cumulative_lost,
                rtt_ms = ?quality.rtt.map(|d| d.as_secs_f64() * 1e3),
                srtp_failures = stats.srtp_failures,
                foreign = stats.foreign,
                "media stopped"
            );
            media.close();
        }
        let _ = self.ended.send(true);
        if let Some(task) = self.flow_task.clone() {
            // A flow that does not return once told its call is over (blocked in a WASI
            // wait, say) is stopped, so its instance is freed and its record written.
            tokio::spawn(async move {
                tokio::time::sleep(FLOW_EXIT_GRACE).await;
                task.abort();
            });
        }
        if let Some(id) = &self.origination {
            let reason = Some("answered, then hung up".to_owned());
            originations.update(id, crate::originate::CallStatus::Completed, Some(200), reason);
        }
        let mut draft = self.cdr;
        let answered = draft.is_answered();
        let local = draft.local_reason().map(|(c, b)| (c.to_owned(), b));
        let local = || local.clone().unwrap_or_else(|| ("patchbay-hangup".to_owned(), "patchbay"));
        let (cause, by, sip_code) = match cause {
            EndCause::RemoteBye => ("caller-hangup".to_owned(), "caller", 200),
            EndCause::Cancelled => ("caller-cancel".to_owned(), "caller", 487),
            EndCause::LocalBye => {
                let (c, b) = local();
                (c, b, 200)
            }
            EndCause::Rejected(code) => {
                let (c, b) = local();
                (c, b, code)
            }
            EndCause::Failed(code) => ("failed".to_owned(), "callee", code),
            EndCause::AckTimeout => ("ack-timeout".to_owned(), "network", 200),
            EndCause::SessionExpired => ("session-expired".to_owned(), "network", 200),
        };
        let sip_code = if answered { 200 } else { sip_code };
        tracing::info!(
            tenant = draft.tenant(),
            flow = draft.flow(),
            call_id = draft.call_id(),
            cause = %cause,
            hung_up_by = by,
            "call ended"
        );
        draft.sip_ended(SipEnd { cause, by, sip_code });
        draft
    }
}
