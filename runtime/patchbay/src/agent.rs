//! A flow's `agent`: the call's audio streamed to an AI agent over a websocket (Twilio Media
//! Streams, see `patchbay-agent` and `docs/agents.md`) and the agent's audio paced back into
//! the call.
//!
//! Two ways to run a session, one behaviour:
//!
//! - **`ws://` agents run on the media clock** ([`AgentLink`] around
//!   [`patchbay_agent::ClockLink`]): at each of the call's steps the clock thread reads what
//!   the agent sent (before making the step's packet, so an answer that has arrived goes out
//!   in it) and writes the caller's frame the step released straight to the agent's socket.
//!   No task is woken per frame in either direction; the flow's side waits for the end (and
//!   passes key presses on). At 500 agent calls on two busy vCPUs, Patchbay's share of the
//!   latency went from p99 2.6–81 ms (median of seven runs 15 ms) to 0.5–11 ms (median of
//!   eight 3.4 ms; the tail is the clock's own lateness; BENCHMARKS.md, "AI agent path").
//! - **`wss://` agents run in a task** ([`AgentStream`]: a writer task, and this module's
//!   session task reading the agent), TLS being a stream that wants an async driver.
//!
//! Either way:
//!
//! - Caller → agent: every frame after the jitter buffer (20 ms, or the call's ptime), as
//!   μ-law (A-law calls are converted), and key presses as `dtmf` messages.
//! - Agent → caller: the agent's audio, re-cut into 20 ms frames by the stream, queued behind
//!   what is already playing; about a second is kept in the call's playout queue and the rest
//!   waits in [`Playout`], so a whole sentence sent at once is fine. Between utterances the
//!   media clock sends silence (or comfort noise): the wire never goes quiet.
//! - Marks: an agent's `mark` is queued after its audio and echoed back when that audio has
//!   been sent; `clear` (barge-in) drops everything queued at once and echoes the marks it
//!   dropped, as Twilio does.
//! - Before any of it, the endpoint passes the tenant's `allow.agents` ([`admit`]): the session
//!   connects to the addresses that were checked, not to a second lookup of the name.
//! - The session ends when the agent closes (`completed`), asks to hang up or transfer
//!   (Patchbay's `hangup` / `transfer` events), drops (`disconnected`), or the caller hangs up.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use crate::metrics::METRICS;
use std::time::{Duration, Instant};

use patchbay_agent::{AgentEvent, AgentStream, ConnectOptions, StartInfo};
use patchbay_host::{AgentEnd, CallError, Dtmf};
use patchbay_media::FramePool;
use tokio::sync::{mpsc, watch};

use crate::media::agent_link::{AgentLink, LinkProbe, Playout, Taken, micros, stamp_age};
pub use crate::media::agent_link::{AgentProbe, HandOffTimes};
use crate::media::{CallMedia, Listener};

/// How long connecting (TCP, TLS, websocket upgrade) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the call gives an agent session.
pub struct AgentCall<'a> {
    /// The call's media (answered).
    pub media: Arc<CallMedia>,
    /// The frame pool.
    pub pool: FramePool,
    /// The caller's key presses.
    pub dtmf: &'a mut mpsc::Receiver<Dtmf>,
    /// The id of the last mark the call's media has played.
    pub played: watch::Receiver<u64>,
    /// Allocates mark ids shared with the call's prompts (the next id is one more).
    pub marks: Arc<AtomicU64>,
    /// Benchmarks only: records, per caller frame, how long the agent's answer took and which
    /// part of that was Patchbay's (an echo agent answers frame for frame; see [`AgentProbe`]).
    pub probe: Option<Arc<std::sync::Mutex<AgentProbe>>>,
    /// Drive a `ws://` agent from the media clock ([`AgentLink`]; the default everywhere but
    /// in `bench-agent --task-path`). `wss://` agents always run in a task.
    pub clock_link: bool,
    /// The addresses [`admit`] checked: the session connects to these only. `None` (benchmarks)
    /// resolves the URL's host.
    pub addrs: Option<Vec<std::net::SocketAddr>>,
}

/// Checks an agent endpoint against `tenant`'s `allow.agents` and resolves it: the addresses
/// the session may connect to. An entry naming the host admits every address it resolves to;
/// entries with a wildcard host admit public addresses only (`crate::policy`). A URL that is
/// not `ws://`/`wss://` with a plain host, or a name that does not resolve, is `unavailable`
/// (as a failed connection is); a refusal is `not-allowed`, naming the rule.
pub(crate) async fn admit(
    tenant: &crate::tenant::Tenant,
    endpoint: &str,
) -> Result<Vec<std::net::SocketAddr>, CallError> {
    use crate::policy::{AgentUrl, Host};
    let url = AgentUrl::parse(endpoint).map_err(|e| CallError::Unavailable(format!("agent {endpoint}: {e}")))?;
    let verdict = tenant.allow.agent_verdict(&url, endpoint)?;
    let resolved: Vec<std::net::SocketAddr> = match &url.host {
        Host::Ip(ip) => vec![std::net::SocketAddr::new(*ip, url.port)],
        Host::Name(name) => tokio::net::lookup_host((name.as_str(), url.port))
            .await
            .map_err(|e| CallError::Unavailable(format!("agent {endpoint}: resolving {name}: {e}")))?
            .collect(),
    };
    let Some(first) = resolved.first().copied() else {
        return Err(CallError::Unavailable(format!("agent {endpoint}: {} has no address", url.host)));
    };
    let admitted: Vec<_> = resolved.into_iter().filter(|addr| verdict.admits(addr.ip())).collect();
    match verdict {
        crate::policy::Verdict::Wildcard(entry) if admitted.is_empty() => {
            Err(tenant.allow.internal("allow.agents", "agent", endpoint, first.ip(), &entry).into())
        }
        _ => Ok(admitted),
    }
}

/// Ends the session's task if the future awaiting it is dropped (the flow was killed, the
/// engine is shutting down), and in every case — that, a panic in the task, a normal end —
/// stops the caller's audio going to the agent.
struct SessionTask {
    handle: tokio::task::JoinHandle<Result<AgentEnd, CallError>>,
    media: Arc<CallMedia>,
}

impl Drop for SessionTask {
    fn drop(&mut self) {
        self.handle.abort();
        self.media.listen(None);
    }
}

/// Connects to `endpoint` and runs the session until it ends; `caller_gone` resolves when the
/// caller hangs up.
///
/// The session runs in a task of its own and this future only waits for it (and passes key
/// presses on): a flow's host call is polled inside the flow's wasm fiber, and every wake-up of
/// a future polled there switches into that fiber — per agent message, that was ~6 % of the
/// process's CPU at 500 agent calls (perf, BENCHMARKS.md "AI agent path").
pub async fn run(
    call: AgentCall<'_>,
    endpoint: &str,
    start: &StartInfo,
    tls: Option<Arc<rustls::ClientConfig>>,
    caller_gone: impl Future<Output = ()> + Send + 'static,
) -> Result<AgentEnd, CallError> {
    let options = ConnectOptions::new(CONNECT_TIMEOUT)
        .with_tls(tls)
        .with_write_probe(call.probe.is_some())
        .with_addrs(call.addrs.clone());
    if call.clock_link && endpoint.get(..5).is_some_and(|scheme| scheme.eq_ignore_ascii_case("ws://")) {
        return run_linked(call, endpoint, start, &options, caller_gone).await;
    }
    let stream = patchbay_agent::connect_with(endpoint, start, &options).await.map_err(|e| {
        METRICS.agent_failures.inc();
        CallError::Unavailable(format!("agent {endpoint}: {e}"))
    })?;
    METRICS.agent_sessions.inc();
    tracing::info!(%endpoint, stream_sid = %start.stream_sid, "agent connected");
    let sender = stream.sender();
    let AgentCall { media, pool, dtmf, played, marks, probe, .. } = call;
    // The caller's audio goes to the agent from now on (registered here, before the task runs,
    // so that the guard below always finds it to remove).
    let handed_over: Option<HandOffTimes> = probe.as_ref().map(|_| HandOffTimes::default());
    media.listen(Some(Listener::Agent { sender: sender.clone(), handed_over: handed_over.clone() }));
    // Told when the agent side has ended (before the agent's last words play out): key presses
    // from then on stay queued for the flow.
    let (ended, mut agent_ended) = tokio::sync::oneshot::channel();
    let session = Session {
        media: Arc::clone(&media),
        pool,
        played,
        marks,
        probe,
        handed_over,
        writes_owed: std::cell::Cell::new(0),
        ended: Some(ended),
    };
    let handle = tokio::spawn(tracing::Instrument::in_current_span(session.run(stream, caller_gone)));
    let mut task = SessionTask { handle, media };
    let mut keys_to_agent = true;
    loop {
        tokio::select! {
            joined = &mut task.handle => {
                return joined.unwrap_or_else(|e| Err(CallError::Unavailable(format!("agent session failed: {e}"))));
            }
            _ = &mut agent_ended, if keys_to_agent => keys_to_agent = false,
            Some(key) = dtmf.recv(), if keys_to_agent => {
                let _ = sender.send_dtmf(key.digit);
            }
        }
    }
}

/// Takes an agent link off the call's clock when dropped (however the session ended).
struct Detach<'a>(&'a CallMedia);

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        self.0.detach_agent();
    }
}

/// [`run`] for a `ws://` agent on the media clock ([`AgentLink`]): this future only waits for
/// the agent side to end (the clock wakes it then) and passes key presses on.
async fn run_linked(
    call: AgentCall<'_>,
    endpoint: &str,
    start: &StartInfo,
    options: &ConnectOptions,
    caller_gone: impl Future<Output = ()>,
) -> Result<AgentEnd, CallError> {
    let link = patchbay_agent::connect_link(endpoint, start, options).await.map_err(|e| {
        METRICS.agent_failures.inc();
        CallError::Unavailable(format!("agent {endpoint}: {e}"))
    })?;
    METRICS.agent_sessions.inc();
    tracing::info!(%endpoint, stream_sid = %start.stream_sid, "agent connected (on the media clock)");
    let AgentCall { media, pool, dtmf, mut played, marks, probe, .. } = call;
    let wake = Arc::new(tokio::sync::Notify::new());
    let ptime = Duration::from_millis(u64::from(media.ptime_ms()));
    media.attach_agent(AgentLink {
        link,
        playout: Playout::new(),
        pool: pool.clone(),
        marks: Arc::clone(&marks),
        end: None,
        wake: Arc::clone(&wake),
        probe: probe.map(|figures| LinkProbe { figures, sent: VecDeque::new(), ptime }),
    });
    let _detach = Detach(&media);
    tokio::pin!(caller_gone);
    // The end first: a key pressed as the agent side ends stays with the flow if this task
    // sees the end first (and is not sent to an agent that has ended in any case).
    let (end, agent) = loop {
        tokio::select! {
            biased;
            () = wake.notified() => {
                // Taken off the clock in the same lock as the end is read: no step runs between.
                if let Some(mut agent) = media.detach_agent_if(|agent| agent.end.is_some()) {
                    let end = agent.end.take().ok_or(CallError::Hangup);
                    break (end, Some(agent));
                }
            }
            () = &mut caller_gone => break (Err(CallError::Hangup), media.detach_agent()),
            Some(key) = dtmf.recv() => {
                media.with_agent(|agent| {
                    if agent.end.is_none() {
                        let _ = agent.link.send_dtmf(key.digit, Instant::now());
                    }
                });
            }
        }
    };
    let Some(AgentLink { link, playout, .. }) = agent else { return end };
    let dropped = link.dropped_media_frames();
    if dropped > 0 {
        tracing::warn!(dropped, "caller audio frames dropped because the agent did not keep up");
    }
    if tells_the_agent(&end) {
        tokio::spawn(link.stop());
    }
    play_out(end, playout, &media, &pool, &mut played, &marks, caller_gone.as_mut()).await
}

/// Whether the agent is told that we stopped (the agent asked to end, the caller left, or we
/// cut it off; the close handshake may take seconds, so it goes beside the play-out).
fn tells_the_agent(end: &Result<AgentEnd, CallError>) -> bool {
    matches!(end, Ok(AgentEnd::TransferRequested(_) | AgentEnd::HangupRequested | AgentEnd::Disconnected(_)) | Err(_))
}

/// After the agent side ended: lets what the agent said before it ended play out (not after a
/// hang-up or a drop), then returns `end`.
async fn play_out(
    end: Result<AgentEnd, CallError>,
    mut playout: Playout,
    media: &CallMedia,
    pool: &FramePool,
    played: &mut watch::Receiver<u64>,
    marks: &AtomicU64,
    mut caller_gone: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<AgentEnd, CallError> {
    if matches!(end, Ok(AgentEnd::TransferRequested(_) | AgentEnd::HangupRequested | AgentEnd::Completed)) {
        while playout.has_pending() {
            playout.feed(media, pool);
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
                () = &mut caller_gone => return Err(CallError::Hangup),
            }
        }
        let id = crate::media::next_mark(marks);
        media.with(|session| session.mark(id));
        tokio::select! {
            _ = played.wait_for(|p| *p >= id) => {}
            () = &mut caller_gone => return Err(CallError::Hangup),
        }
    }
    tracing::info!(?end, "agent session ended");
    end
}

/// An agent session's own state, in its task.
struct Session {
    media: Arc<CallMedia>,
    pool: FramePool,
    played: watch::Receiver<u64>,
    marks: Arc<AtomicU64>,
    probe: Option<Arc<std::sync::Mutex<AgentProbe>>>,
    handed_over: Option<HandOffTimes>,
    /// Benchmarks only: answers that came back before their frame's flush was recorded; that
    /// many records are skipped when they come, so that each answer meets its own frame's.
    writes_owed: std::cell::Cell<usize>,
    ended: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Session {
    /// Benchmarks only: fills the probe for the agent's answer `frame` to the oldest frame
    /// handed over.
    fn record(&self, probe: &std::sync::Mutex<AgentProbe>, stream: &AgentStream, frame: &[u8]) {
        let back = stamp_age(frame);
        let handed_over = self
            .handed_over
            .as_ref()
            .and_then(|times| times.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop_front());
        let Some(handed_over) = handed_over else { return };
        let mut probe = probe.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        probe.turnaround.push(micros(handed_over.elapsed()));
        let mut written = stream.take_write_latency();
        while written.is_some() && self.writes_owed.get() > 0 {
            self.writes_owed.set(self.writes_owed.get() - 1);
            written = stream.take_write_latency();
        }
        if written.is_none() {
            self.writes_owed.set(self.writes_owed.get() + 1);
        }
        if let (Some(written), Some(back)) = (written, back) {
            probe.to_agent.push(micros(written));
            probe.from_agent.push(micros(back));
            probe.patchbay.push(micros(written + back));
        }
    }

    async fn run(
        mut self,
        mut stream: AgentStream,
        caller_gone: impl Future<Output = ()>,
    ) -> Result<AgentEnd, CallError> {
        let mut playout = Playout::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tokio::pin!(caller_gone);
        let end = loop {
            tokio::select! {
                event = stream.recv() => {
                    if let (Some(probe), AgentEvent::Audio(frame)) = (&self.probe, &event) {
                        self.record(probe, &stream, frame);
                    }
                    match playout.take(event, &self.marks) {
                        Taken::Queued => playout.feed(&self.media, &self.pool),
                        Taken::Clear => {
                            // Barge-in: nothing the agent queued is played any more.
                            let dropped: Vec<String> = self.media.with(|session| playout.clear(session).collect());
                            for name in dropped {
                                let _ = stream.send_mark(&name);
                            }
                        }
                        Taken::End(end) => break Ok(end),
                    }
                }
                Ok(()) = self.played.changed() => {
                    let last = *self.played.borrow_and_update();
                    playout.echo_played(last, |name| {
                        let _ = stream.send_mark(name);
                    });
                }
                _ = tick.tick() => playout.feed(&self.media, &self.pool),
                () = &mut caller_gone => break Err(CallError::Hangup),
            }
        };
        self.media.listen(None);
        if let Some(ended) = self.ended.take() {
            let _ = ended.send(());
        }
        let dropped = stream.dropped_media_frames();
        if dropped > 0 {
            tracing::warn!(dropped, "caller audio frames dropped because the agent did not keep up");
        }
        if tells_the_agent(&end) {
            tokio::spawn(stream.stop());
        }
        play_out(end, playout, &self.media, &self.pool, &mut self.played, &self.marks, caller_gone.as_mut()).await
    }
}
