//! A flow's `agent`: the call's audio streamed to an AI agent over a websocket (Twilio Media
//! Streams, see `patchbay-agent` and `docs/agents.md`) and the agent's audio paced back into
//! the call.
//!
//! - Caller → agent: every frame after the jitter buffer (20 ms, or the call's ptime), as μ-law (A-law calls are
//!   converted), queued by the media clock straight to the stream's writer (this task is not
//!   woken per frame), and key presses as `dtmf` messages.
//! - Agent → caller: the agent's audio, re-cut into 20 ms frames by the stream, queued behind
//!   what is already playing; about a second is kept in the call's playout queue and the rest
//!   waits here, so a whole sentence sent at once is fine. Between utterances the media clock
//!   sends silence (or comfort noise): the wire never goes quiet.
//! - Marks: an agent's `mark` is queued after its audio and echoed back when that audio has
//!   been sent; `clear` (barge-in) drops everything queued at once and echoes the marks it
//!   dropped, as Twilio does.
//! - The session ends when the agent closes (`completed`), asks to hang up or transfer
//!   (Patchbay's `hangup` / `transfer` events), drops (`disconnected`), or the caller hangs up.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use patchbay_agent::{AgentEvent, AgentStream, ConnectOptions, StartInfo};
use patchbay_host::{AgentEnd, CallError, Dtmf};
use patchbay_media::{AudioEncoding, FramePool};
use tokio::sync::{mpsc, watch};

use crate::media::{CallMedia, Listener};

/// Benchmarks only: when the media clock handed each caller frame to the agent stream, oldest
/// first (see [`AgentCall::probe`]).
pub type HandOffTimes = Arc<std::sync::Mutex<VecDeque<std::time::Instant>>>;

/// Benchmarks only: where a stamping echo agent
/// ([`patchbay_agent::server::EchoAgent::stamping`]) writes its send time in each answer.
pub const AGENT_STAMP_AT: usize = 12;

/// Benchmarks only: per caller frame an echo agent answered, in microseconds.
#[derive(Debug, Default)]
pub struct AgentProbe {
    /// From the media clock handing the frame to the agent stream to the agent's answer
    /// arriving in the session: everything, the agent's own time included.
    pub turnaround: Vec<u32>,
    /// Patchbay's share of that: [`AgentProbe::to_agent`] + [`AgentProbe::from_agent`].
    pub patchbay: Vec<u32>,
    /// From the hand-over to the writer's flush that put the frame in the agent's socket.
    pub to_agent: Vec<u32>,
    /// From the agent sending its answer (its stamp) to the answer arriving in the session.
    pub from_agent: Vec<u32>,
}

/// How long connecting (TCP, TLS, websocket upgrade) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Agent audio kept in the call's playout queue; the rest waits in [`Playout`].
const AHEAD_FRAMES: usize = 50;

/// Most agent audio waiting to be played (five minutes): an agent that sends more is cut off
/// (`disconnected`) rather than growing host memory without bound.
const MAX_BACKLOG_FRAMES: usize = 5 * 60 * 50;

/// Agent audio and marks not yet handed to the call's playout queue.
enum Pending {
    Audio(patchbay_agent::Frame160),
    Mark(u64),
}

/// The agent's side of the call's playout: audio and marks in order, and the marks waiting
/// for their audio to be sent.
struct Playout {
    pending: VecDeque<Pending>,
    /// (mark id in the media session, the agent's mark name), oldest first.
    marks: VecDeque<(u64, String)>,
}

impl Playout {
    /// Moves pending audio and marks into the session until about a second is queued.
    fn feed(&mut self, media: &CallMedia, pool: &FramePool) {
        if self.pending.is_empty() {
            return;
        }
        media.with(|session| {
            while session.queued() < AHEAD_FRAMES {
                match self.pending.pop_front() {
                    Some(Pending::Audio(octets)) => {
                        let Ok(frame) = pool.g711(AudioEncoding::Pcmu, &octets, 0) else { break };
                        if session.play(frame).is_err() {
                            break;
                        }
                    }
                    Some(Pending::Mark(id)) => session.mark(id),
                    None => break,
                }
            }
        });
    }

    /// Echoes the marks whose audio has been sent (or dropped by a clear).
    fn echo_played(&mut self, played: u64, stream: &AgentStream) {
        while self.marks.front().is_some_and(|(id, _)| *id <= played) {
            if let Some((_, name)) = self.marks.pop_front() {
                let _ = stream.send_mark(&name);
            }
        }
    }
}

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
    let options = ConnectOptions::new(CONNECT_TIMEOUT).with_tls(tls).with_write_probe(call.probe.is_some());
    let stream = patchbay_agent::connect_with(endpoint, start, &options)
        .await
        .map_err(|e| CallError::Unavailable(format!("agent {endpoint}: {e}")))?;
    tracing::info!(%endpoint, stream_sid = %start.stream_sid, "agent connected");
    let sender = stream.sender();
    let AgentCall { media, pool, dtmf, played, marks, probe } = call;
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
    fn next_mark(&self) -> u64 {
        crate::call::next_mark(&self.marks)
    }

    /// Benchmarks only: fills the probe for the agent's answer `frame` to the oldest frame
    /// handed over.
    fn record(&self, probe: &std::sync::Mutex<AgentProbe>, stream: &AgentStream, frame: &[u8]) {
        let us = |d: Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        let handed_over = self
            .handed_over
            .as_ref()
            .and_then(|times| times.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop_front());
        let Some(handed_over) = handed_over else { return };
        let mut probe = probe.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        probe.turnaround.push(us(handed_over.elapsed()));
        let mut written = stream.take_write_latency();
        while written.is_some() && self.writes_owed.get() > 0 {
            self.writes_owed.set(self.writes_owed.get() - 1);
            written = stream.take_write_latency();
        }
        if written.is_none() {
            self.writes_owed.set(self.writes_owed.get() + 1);
        }
        let stamp =
            frame.get(AGENT_STAMP_AT..AGENT_STAMP_AT + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
        let now = patchbay_agent::server::unix_nanos();
        // A stamp from a clock that stepped, or no stamp at all, is left out.
        let back = stamp.filter(|&at| at > 0 && at <= now).map(|at| Duration::from_nanos(now - at));
        if let (Some(written), Some(back)) = (written, back) {
            probe.to_agent.push(us(written));
            probe.from_agent.push(us(back));
            probe.patchbay.push(us(written + back));
        }
    }

    async fn run(
        mut self,
        mut stream: AgentStream,
        caller_gone: impl Future<Output = ()>,
    ) -> Result<AgentEnd, CallError> {
        let mut playout = Playout { pending: VecDeque::new(), marks: VecDeque::new() };
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tokio::pin!(caller_gone);
        let end = loop {
            tokio::select! {
                event = stream.recv() => match event {
                    AgentEvent::Audio(_) if playout.pending.len() >= MAX_BACKLOG_FRAMES => {
                        break Ok(AgentEnd::Disconnected("the agent sent more than five minutes of audio ahead".into()));
                    }
                    AgentEvent::Audio(frame) => {
                        if let Some(probe) = &self.probe {
                            self.record(probe, &stream, &frame);
                        }
                        playout.pending.push_back(Pending::Audio(frame));
                        playout.feed(&self.media, &self.pool);
                    }
                    AgentEvent::Mark(name) => {
                        let id = self.next_mark();
                        playout.marks.push_back((id, name));
                        playout.pending.push_back(Pending::Mark(id));
                        playout.feed(&self.media, &self.pool);
                    }
                    AgentEvent::Clear => {
                        // Barge-in: nothing the agent queued is played any more.
                        playout.pending.clear();
                        self.media.with(|session| session.clear());
                        let dropped: Vec<String> = playout.marks.drain(..).map(|(_, name)| name).collect();
                        for name in dropped {
                            let _ = stream.send_mark(&name);
                        }
                    }
                    AgentEvent::Transfer(target) => break Ok(AgentEnd::TransferRequested(target)),
                    AgentEvent::Hangup => break Ok(AgentEnd::HangupRequested),
                    AgentEvent::Closed => break Ok(AgentEnd::Completed),
                    AgentEvent::Failed(why) => break Ok(AgentEnd::Disconnected(why)),
                    other => tracing::debug!(?other, "agent event"),
                },
                Ok(()) = self.played.changed() => {
                    let last = *self.played.borrow_and_update();
                    playout.echo_played(last, &stream);
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
        match &end {
            // The agent asked to end, the caller left, or we cut it off: tell it we stopped and
            // close cleanly, beside the play-out below (the close handshake may take seconds).
            Ok(AgentEnd::TransferRequested(_) | AgentEnd::HangupRequested | AgentEnd::Disconnected(_)) | Err(_) => {
                tokio::spawn(stream.stop());
            }
            _ => {}
        }
        // Let what the agent said before it ended play out (not after a hang-up or a drop).
        if matches!(end, Ok(AgentEnd::TransferRequested(_) | AgentEnd::HangupRequested | AgentEnd::Completed)) {
            while !playout.pending.is_empty() {
                playout.feed(&self.media, &self.pool);
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    () = &mut caller_gone => return Err(CallError::Hangup),
                }
            }
            let id = self.next_mark();
            self.media.with(|session| session.mark(id));
            tokio::select! {
                _ = self.played.wait_for(|p| *p >= id) => {}
                () = &mut caller_gone => return Err(CallError::Hangup),
            }
        }
        tracing::info!(?end, "agent session ended");
        end
    }
}
