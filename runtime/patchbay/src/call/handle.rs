//! A call as its flow sees it: [`CallHandle`] implements the host's [`CallControl`] on the
//! call's media session (read and played directly) and its [`Call`](super::Call) (everything
//! that touches SIP goes to the endpoint as a [`Request`]).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use patchbay_host::{
    AgentEnd, CallControl, CallError, CallInfo, CollectEnd, CollectOptions, Collected, DialOptions, DialOutcome, Dtmf,
    HangupCause, MediaEvent, PlayOptions, PlayOutcome, RecordEnd, RecordOptions, Recording,
};
use patchbay_media::Frame;
use patchbay_sip::ua::CallRef;
use tokio::sync::{mpsc, oneshot, watch};

use super::{MediaSlot, Request, Services};
use crate::dial::LegEvent;
use crate::media::{CallMedia, Listener, feed_prompt, next_mark};

/// A call as its flow sees it: the flow's side of a [`Call`](super::Call). Waiting
/// operations end with `hangup` as soon as the call ends.
pub(crate) struct CallHandle {
    pub(super) call: CallRef,
    pub(super) info: CallInfo,
    pub(super) requests: mpsc::UnboundedSender<Request>,
    pub(super) ended: watch::Receiver<bool>,
    pub(super) dtmf: tokio::sync::Mutex<mpsc::Receiver<Dtmf>>,
    /// The RTP session, set when the call is answered.
    pub(super) media: MediaSlot,
    /// The last mark played out (see `MediaSession::mark`).
    pub(super) played: watch::Receiver<u64>,
    pub(super) marks: Arc<std::sync::atomic::AtomicU64>,
    /// The call's tenant (prompts, trunks, caps).
    pub(super) tenant: Arc<crate::tenant::Tenant>,
    /// What every call reaches (other tenants, frames, storage).
    pub(super) services: Services,
    /// The caller's audio while the flow has its audio stream open.
    pub(super) stream: tokio::sync::Mutex<Option<mpsc::Receiver<Frame>>>,
    /// Whether the caller takes REFER (its Allow lists it, or it sent no Allow).
    pub(super) refer: bool,
}

/// Hangs up an outbound leg when the `dial` that placed it returns, however it returns.
struct LegGuard<'a> {
    requests: &'a mpsc::UnboundedSender<Request>,
    leg: CallRef,
}

impl Drop for LegGuard<'_> {
    fn drop(&mut self) {
        let _ = self.requests.send(Request::HangupLeg { leg: self.leg, reason: "caller-hangup", by: "caller" });
    }
}

/// Longest recording `record` keeps (the samples are held in host memory until stored).
const MAX_RECORD_MS: u32 = 60 * 60 * 1_000;

/// How long a transfer by bridge lets the target ring.
const TRANSFER_RING_MS: u32 = 30_000;

/// The pause a `,` in `send-dtmf` makes.
const DTMF_COMMA_PAUSE: Duration = Duration::from_millis(500);

/// How long each DTMF digit we send lasts, and the pause after it.
const DTMF_DIGIT_MS: u32 = 100;

impl CallHandle {
    async fn until_hangup(&self) {
        self.hangup_signal().await;
    }

    /// Resolves when the call has ended; owns what it waits on (for a task of its own).
    fn hangup_signal(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut ended = self.ended.clone();
        async move {
            let _ = ended.wait_for(|e| *e).await;
        }
    }

    fn is_over(&self) -> bool {
        *self.ended.borrow()
    }

    fn live(&self) -> Result<(), CallError> {
        if self.is_over() { Err(CallError::Hangup) } else { Ok(()) }
    }

    /// The call's media; audio operations need an answered call.
    fn rtp(&self) -> Result<&Arc<CallMedia>, CallError> {
        self.live()?;
        self.media.get().ok_or_else(|| CallError::NotAllowed("answer the call before using its audio".into()))
    }

    /// Plays a prompt once. `Some(digit)` when a key press stopped it (with barge-in).
    async fn play_once(
        &self,
        media: &CallMedia,
        prompt: &patchbay_media::prompt::Prompt,
        barge_in: bool,
    ) -> Result<Option<char>, CallError> {
        let codec = patchbay_media::prompt::PromptCodec::from(media.with(|s| s.codec()));
        let mut next = 0;
        let id = next_mark(&self.marks);
        let mut marked = false;
        let mut played = self.played.clone();
        let mut dtmf = if barge_in { Some(self.dtmf.lock().await) } else { None };
        loop {
            // Keep 50 frames (a second at 20 ms) queued ahead of the wire; the rest is fed as it
            // plays.
            if !marked {
                marked = media.with(|session| feed_prompt(session, &self.services.pool, prompt, codec, &mut next, id));
            }
            let digit = async {
                match dtmf.as_mut() {
                    Some(dtmf) => dtmf.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                result = played.wait_for(|p| *p >= id), if marked => {
                    return result.map(|_| None).map_err(|_| CallError::Hangup);
                }
                () = tokio::time::sleep(Duration::from_millis(400)), if !marked => {}
                digit = digit => {
                    let Some(digit) = digit else { return Err(CallError::Hangup) };
                    media.with(|session| session.clear());
                    return Ok(Some(digit.digit));
                }
                () = self.until_hangup() => return Err(CallError::Hangup),
            }
        }
    }
}

#[async_trait]
impl CallControl for CallHandle {
    fn info(&self) -> CallInfo {
        self.info.clone()
    }

    async fn answer(&self) -> Result<(), CallError> {
        self.live()?;
        let (reply, result) = oneshot::channel();
        self.requests.send(Request::Answer { call: self.call, reply }).map_err(|_| CallError::Hangup)?;
        result.await.unwrap_or(Err(CallError::Hangup))
    }

    async fn hangup(&self, cause: HangupCause) -> Result<(), CallError> {
        self.live()?;
        self.requests.send(Request::Hangup { call: self.call, cause }).map_err(|_| CallError::Hangup)?;
        self.until_hangup().await;
        Ok(())
    }

    async fn play(&self, prompt: &str, options: PlayOptions) -> Result<PlayOutcome, CallError> {
        let media = Arc::clone(self.rtp()?);
        let prompt = self.tenant.prompts.get(prompt)?;
        for _ in 0..options.repeat.max(1) {
            if let Some(digit) = self.play_once(&media, &prompt, options.barge_in).await? {
                return Ok(PlayOutcome::Interrupted(digit));
            }
        }
        Ok(PlayOutcome::Completed)
    }

    async fn collect_digits(&self, options: CollectOptions) -> Result<Collected, CallError> {
        self.live()?;
        let max = options.max_digits.max(1) as usize;
        let mut digits = String::new();
        if let Some(prompt) = &options.prompt {
            let outcome = self.play(prompt, PlayOptions { barge_in: options.barge_in, repeat: 1 }).await?;
            if let PlayOutcome::Interrupted(digit) = outcome {
                if options.terminators.contains(digit) {
                    return Ok(Collected { digits, ended_by: CollectEnd::Terminator });
                }
                digits.push(digit);
            }
        }
        let mut timeout =
            if digits.is_empty() { options.first_digit_timeout_ms } else { options.inter_digit_timeout_ms };
        let mut dtmf = self.dtmf.lock().await;
        loop {
            if digits.chars().count() >= max {
                return Ok(Collected { digits, ended_by: CollectEnd::MaxDigits });
            }
            tokio::select! {
                digit = dtmf.recv() => {
                    let Some(digit) = digit else { return Err(CallError::Hangup) };
                    if options.terminators.contains(digit.digit) {
                        return Ok(Collected { digits, ended_by: CollectEnd::Terminator });
                    }
                    digits.push(digit.digit);
                    timeout = options.inter_digit_timeout_ms;
                }
                () = tokio::time::sleep(Duration::from_millis(u64::from(timeout))) => {
                    return Ok(Collected { digits, ended_by: CollectEnd::Timeout });
                }
                () = self.until_hangup() => return Err(CallError::Hangup),
            }
        }
    }

    async fn sleep(&self, ms: u32) -> Result<(), CallError> {
        self.live()?;
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(u64::from(ms))) => Ok(()),
            () = self.until_hangup() => Err(CallError::Hangup),
        }
    }

    async fn dial(&self, target: &str, options: DialOptions) -> Result<DialOutcome, CallError> {
        self.live()?;
        let target = crate::dial::resolve_for(target, &self.tenant, &self.services.tenants.get()).await?;
        if options.headers.len() > crate::dial::MAX_FLOW_HEADERS {
            return Err(CallError::InvalidArgument(format!("at most {} extra headers", crate::dial::MAX_FLOW_HEADERS)));
        }
        for header in &options.headers {
            crate::dial::check_header(&header.name, &header.value)?;
            self.tenant.allow.check_header(&header.name)?;
        }
        if self.media.get().is_none() {
            // The caller hears ringback from us, so the call is answered first.
            self.answer().await?;
        }
        let media = Arc::clone(self.rtp()?);
        if self.stream.try_lock().map_or(true, |stream| stream.is_some()) {
            return Err(CallError::NotAllowed("close the audio stream before dialling".into()));
        }
        let ringback = self.tenant.prompts.get("ringback.wav")?;
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let (reply, leg) = oneshot::channel();
        let command = Request::Dial {
            call: self.call,
            target: Box::new(target),
            caller_id: options.caller_id,
            headers: options.headers,
            events: events_tx,
            reply,
        };
        self.requests.send(command).map_err(|_| CallError::Hangup)?;
        let leg = leg.await.unwrap_or(Err(CallError::Hangup))?;
        // However this ends, a leg still up is hung up (a no-op once it has ended).
        let _leg_guard = LegGuard { requests: &self.requests, leg };
        let codec = patchbay_media::prompt::PromptCodec::from(media.with(|s| s.codec()));
        let mut next = 0;
        let mut ringing = true;
        let (early_tx, mut early_rx) = mpsc::channel(crate::media::FLOW_AUDIO_QUEUE);
        let mut early: Option<Arc<CallMedia>> = None;
        let deadline = tokio::time::sleep(Duration::from_millis(u64::from(options.timeout_ms.max(1))));
        tokio::pin!(deadline);
        let mut dtmf = self.dtmf.lock().await;
        let outcome: Result<DialOutcome, CallError> = loop {
            if ringing {
                media.with(|session| {
                    if feed_prompt(session, &self.services.pool, &ringback, codec, &mut next, 0) {
                        next = 0; // the cadence repeats until something happens
                    }
                });
            }
            tokio::select! {
                event = events.recv() => match event {
                    Some(LegEvent::Progress { early: Some(leg_media), .. }) => {
                        // Early media (RFC 3960): the caller hears the callee's tones instead.
                        ringing = false;
                        media.with(|session| session.clear());
                        leg_media.listen(Some(Listener::Frames(early_tx.clone())));
                        early = Some(leg_media);
                    }
                    Some(LegEvent::Progress { status, .. }) => tracing::debug!(call = ?self.call, status, "ringing"),
                    Some(LegEvent::Answered { media: leg_media, dtmf: leg_dtmf }) => {
                        if let Some(early) = early.take() {
                            early.listen(None);
                        }
                        let exit =
                            crate::dial::bridge(&media, &mut dtmf, &leg_media, leg_dtmf, &mut events, self.until_hangup())
                                .await;
                        break Ok(DialOutcome::from(exit));
                    }
                    Some(LegEvent::Ended { cause }) => break Ok(crate::dial::unanswered_outcome(&cause)),
                    None => break Err(CallError::Hangup),
                },
                Some(frame) = early_rx.recv() => crate::dial::forward(&media, frame),
                () = &mut deadline => {
                    let _ = self.requests.send(Request::HangupLeg { leg, reason: "no-answer", by: "patchbay" });
                    // Wait for the CANCEL's outcome: the callee may have answered meanwhile.
                    let _ = tokio::time::timeout(crate::dial::CANCEL_WAIT, async {
                        while let Some(event) = events.recv().await {
                            if matches!(event, LegEvent::Ended { .. }) {
                                break;
                            }
                        }
                    })
                    .await;
                    break Ok(DialOutcome::NoAnswer);
                }
                () = self.until_hangup() => break Err(CallError::Hangup),
                () = tokio::time::sleep(Duration::from_millis(200)), if ringing => {}
            }
        };
        if let Some(early) = early {
            early.listen(None);
        }
        media.with(|session| session.clear());
        tracing::info!(call = ?self.call, ?outcome, "dial finished");
        outcome
    }

    async fn transfer(&self, target: &str) -> Result<(), CallError> {
        self.live()?;
        let scheme_ok = target.starts_with("sip:")
            || target.starts_with("sips:")
            || target.starts_with("tel:")
            || target.starts_with("trunk:");
        // The target goes into a Refer-To header: nothing that could end or break out of it.
        let clean = crate::dial::is_plain_uri(target);
        if !scheme_ok || !clean {
            return Err(CallError::InvalidArgument(format!(
                "transfer target {target:?} is not a plain sip:, sips:, tel: or trunk: URI"
            )));
        }
        // The tenant's capabilities, whichever way it goes: with REFER the caller's side places
        // the call, but a flow may still only send it where the tenant allows.
        crate::dial::check_transfer(target, &self.tenant, &self.services.tenants.get()).await?;
        if !self.refer || target.starts_with("trunk:") {
            // The caller's Allow leaves REFER out (RFC 3261 §20.5): bridge through us instead.
            tracing::info!(call = ?self.call, %target, "the caller does not take REFER: transferring by bridge");
            let options = DialOptions { caller_id: None, timeout_ms: TRANSFER_RING_MS, headers: Vec::new() };
            return match self.dial(target, options).await? {
                DialOutcome::Answered(_) => Ok(()),
                other => Err(CallError::Unavailable(format!("transfer to {target}: {other:?}"))),
            };
        }
        let (reply, outcome) = oneshot::channel();
        self.requests
            .send(Request::Transfer { call: self.call, target: target.to_owned(), reply })
            .map_err(|_| CallError::Hangup)?;
        tokio::select! {
            result = outcome => result.unwrap_or(Err(CallError::Hangup)),
            () = self.until_hangup() => Err(CallError::Hangup),
        }
    }

    async fn agent(&self, endpoint: &str, params: &[(String, String)]) -> Result<AgentEnd, CallError> {
        self.live()?;
        // Checked (and resolved) before the call is answered: a refused agent costs nothing.
        let addrs = crate::agent::admit(&self.tenant, endpoint).await?;
        if self.media.get().is_none() {
            self.answer().await?;
        }
        let media = Arc::clone(self.rtp()?);
        if self.stream.try_lock().map_or(true, |stream| stream.is_some()) {
            return Err(CallError::NotAllowed("close the audio stream before connecting an agent".into()));
        }
        let start = patchbay_agent::StartInfo {
            account_sid: self.info.tenant.clone(),
            call_sid: self.info.call_id.clone(),
            stream_sid: format!("MZ{:016x}{:016x}", crate::random::u64(), crate::random::u64()),
            custom_parameters: params.to_vec(),
        };
        let mut dtmf = self.dtmf.lock().await;
        let call = crate::agent::AgentCall {
            media,
            pool: self.services.pool.clone(),
            dtmf: &mut dtmf,
            played: self.played.clone(),
            marks: Arc::clone(&self.marks),
            probe: None,
            clock_link: true,
            addrs: Some(addrs),
        };
        crate::agent::run(call, endpoint, &start, None, self.hangup_signal()).await
    }

    async fn record(&self, options: RecordOptions) -> Result<Recording, CallError> {
        let media = Arc::clone(self.rtp()?);
        if options.beep {
            self.play("beep.wav", PlayOptions { barge_in: false, repeat: 1 }).await?;
        }
        let (frames, mut frames_rx) = mpsc::channel(crate::media::FLOW_AUDIO_QUEUE);
        let Ok(stream) = self.stream.try_lock() else {
            return Err(CallError::NotAllowed("the flow's audio stream is being read".into()));
        };
        if stream.is_some() {
            return Err(CallError::NotAllowed("close the audio stream before recording".into()));
        }
        media.listen(Some(Listener::Frames(frames)));
        let started = std::time::SystemTime::now();
        let max = Duration::from_millis(u64::from(options.max_duration_ms.clamp(1, MAX_RECORD_MS)));
        let silence_limit = (options.silence_timeout_ms > 0).then_some(options.silence_timeout_ms);
        let deadline = tokio::time::sleep(max);
        tokio::pin!(deadline);
        let mut samples: Vec<i16> = Vec::new();
        let mut silent_ms = 0u32;
        let mut dtmf = self.dtmf.lock().await;
        let ended_by = loop {
            tokio::select! {
                frame = frames_rx.recv() => {
                    let Some(frame) = frame else { break RecordEnd::Hangup };
                    let linear = frame.linear();
                    samples.extend_from_slice(&linear);
                    let frame_ms = u32::try_from(linear.len() / 8).unwrap_or(20);
                    silent_ms = if crate::recording::is_silent(&linear) { silent_ms + frame_ms } else { 0 };
                    if silence_limit.is_some_and(|limit| silent_ms >= limit) {
                        break RecordEnd::Silence;
                    }
                }
                digit = dtmf.recv() => match digit {
                    Some(digit) if options.terminators.contains(digit.digit) => break RecordEnd::Terminator,
                    Some(_) => {}
                    None => break RecordEnd::Hangup,
                },
                () = &mut deadline => break RecordEnd::MaxDuration,
                () = self.until_hangup() => break RecordEnd::Hangup,
            }
        };
        drop(dtmf);
        media.listen(None);
        drop(stream);
        // Frames already delivered before a hang-up are part of the message.
        while let Ok(frame) = frames_rx.try_recv() {
            samples.extend_from_slice(&frame.linear());
        }
        samples.truncate(usize::try_from(max.as_millis() * 8).unwrap_or(usize::MAX));
        let duration_ms = u32::try_from(samples.len() / 8).unwrap_or(u32::MAX);
        let id = format!(
            "{}-{:08x}",
            started.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis()),
            crate::random::u64() as u32
        );
        let meta = crate::recording::Metadata {
            id: &id,
            call_id: &self.info.call_id,
            tenant: &self.info.tenant,
            flow: &self.info.flow,
            from: &self.info.from,
            to: &self.info.to,
            started: humantime::format_rfc3339_millis(started).to_string(),
            duration_ms,
            ended_by: match ended_by {
                RecordEnd::Terminator => "terminator",
                RecordEnd::Silence => "silence",
                RecordEnd::MaxDuration => "max-duration",
                RecordEnd::Hangup => "hangup",
            },
            format: "audio/wav; codec=pcm16; rate=8000",
        };
        let dir = crate::recording::dir(&self.services.storage, &self.info.tenant);
        match crate::recording::store(&dir, &meta, &samples, self.tenant.recordings_quota).await {
            Ok(path) => {
                tracing::info!(call = ?self.call, path = %path.display(), duration_ms, ended_by = meta.ended_by, "recording stored")
            }
            Err(e @ crate::recording::StoreError::Quota { .. }) => {
                tracing::warn!(call = ?self.call, "recording not stored: {e}");
                return Err(CallError::LimitExceeded(format!("recording storage: {e}")));
            }
            Err(e) => {
                tracing::error!(call = ?self.call, dir = %dir.display(), "storing a recording failed: {e}");
                return Err(CallError::Unavailable(format!("recording storage: {e}")));
            }
        }
        Ok(Recording { id, duration_ms, ended_by })
    }

    async fn send_dtmf(&self, digits: &str) -> Result<(), CallError> {
        let media = Arc::clone(self.rtp()?);
        let valid = |c: char| matches!(c.to_ascii_uppercase(), '0'..='9' | '*' | '#' | 'A'..='D' | ',');
        if let Some(bad) = digits.chars().find(|c| !valid(*c)) {
            return Err(CallError::InvalidArgument(format!("{bad:?} is not a DTMF key or ','")));
        }
        if !digits.is_empty() && !media.with(|session| session.send_dtmf("", DTMF_DIGIT_MS)) {
            return Err(CallError::Unavailable("the peer did not negotiate telephone-event (RFC 4733)".into()));
        }
        let digits = digits.to_ascii_uppercase();
        // Keys between commas go out as one run; each `,` is a 500 ms pause (WIT `send-dtmf`).
        let mut runs = digits.split(',').peekable();
        while let Some(run) = runs.next() {
            let mut wait = Duration::ZERO;
            if !run.is_empty() {
                media.with(|session| session.send_dtmf(run, DTMF_DIGIT_MS));
                // Each digit, its end packets and the pause after it.
                wait += media.with(|session| session.dtmf_send_time(run.chars().count(), DTMF_DIGIT_MS));
            }
            if runs.peek().is_some() {
                wait += DTMF_COMMA_PAUSE;
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.until_hangup() => return Err(CallError::Hangup),
            }
        }
        Ok(())
    }

    async fn next_dtmf(&self, timeout_ms: u32) -> Result<Dtmf, CallError> {
        self.live()?;
        let mut dtmf = self.dtmf.lock().await;
        tokio::select! {
            digit = dtmf.recv() => digit.ok_or(CallError::Hangup),
            () = tokio::time::sleep(Duration::from_millis(u64::from(timeout_ms))) => Err(CallError::Timeout),
            () = self.until_hangup() => Err(CallError::Hangup),
        }
    }

    fn open_audio_stream(&self) -> Result<(), CallError> {
        let media = self.rtp()?;
        let (frames, frames_rx) = mpsc::channel(crate::media::FLOW_AUDIO_QUEUE);
        // Not awaited: `open-audio-stream` is synchronous and the stream lock is only held
        // briefly by `read_media`.
        let Ok(mut stream) = self.stream.try_lock() else {
            return Err(CallError::NotAllowed("the audio stream is being read".into()));
        };
        *stream = Some(frames_rx);
        media.listen(Some(Listener::Frames(frames)));
        Ok(())
    }

    fn close_audio_stream(&self) {
        if let Some(media) = self.media.get() {
            media.listen(None);
        }
        if let Ok(mut stream) = self.stream.try_lock() {
            *stream = None;
        }
    }

    async fn read_media(&self) -> Result<MediaEvent, CallError> {
        self.live()?;
        let mut stream = self.stream.lock().await;
        let mut dtmf = self.dtmf.lock().await;
        let frame = async {
            // A stream closed under us (the flow reopened it) is not a hang-up: wait for keys.
            match stream.as_mut() {
                Some(frames) => match frames.recv().await {
                    Some(frame) => Some(frame),
                    None => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            frame = frame => frame.map(MediaEvent::Frame).ok_or(CallError::Hangup),
            digit = dtmf.recv() => digit.map(MediaEvent::Dtmf).ok_or(CallError::Hangup),
            () = self.until_hangup() => Err(CallError::Hangup),
        }
    }

    fn write_frame(&self, frame: Frame) -> Result<(), CallError> {
        let media = self.rtp()?;
        media.with(|session| session.play(frame)).map_err(|refused| match refused {
            patchbay_media::session::PlayRefused::Full => {
                CallError::LimitExceeded("the call's playout queue is full (500 frames)".into())
            }
            wrong => CallError::InvalidArgument(wrong.to_string()),
        })
    }
}
