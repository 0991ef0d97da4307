//! An agent session's clock side: what the media clock does for a `ws://` agent at each of the
//! call's steps ([`AgentLink`]), and the agent's side of the call's playout ([`Playout`]),
//! shared with `wss://` sessions that run in a task (`crate::agent`).
//!
//! It lives with the media because the clock thread runs it; the session around it (connect,
//! key presses, the end) is `crate::agent`'s.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use patchbay_agent::{AgentEvent, ClockLink};
use patchbay_host::AgentEnd;
use patchbay_media::session::MediaSession;
use patchbay_media::{AudioEncoding, FramePool};

use super::CallMedia;

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
    /// From the agent sending its answer (its stamp) to the answer arriving in the session
    /// (on the media clock: from the earliest step due after that to the step that read it).
    pub from_agent: Vec<u32>,
    /// On the media clock: answers read one or more steps after the earliest step due after
    /// the agent sent them (the rest of `from_agent` is the clock's own lateness).
    pub missed_step: usize,
}

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
pub(crate) struct Playout {
    pending: VecDeque<Pending>,
    /// (mark id in the media session, the agent's mark name), oldest first.
    marks: VecDeque<(u64, String)>,
}

impl Playout {
    /// Whether audio or marks wait to be handed to the session.
    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    pub(crate) fn new() -> Self {
        Self { pending: VecDeque::new(), marks: VecDeque::new() }
    }

    /// Moves pending audio and marks into the session until about a second is queued.
    pub(crate) fn feed(&mut self, media: &CallMedia, pool: &FramePool) {
        if self.pending.is_empty() {
            return;
        }
        media.with(|session| self.fill(session, pool));
    }

    /// [`Playout::feed`] with the session's lock already held.
    pub(crate) fn fill(&mut self, session: &mut MediaSession, pool: &FramePool) {
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
    }

    /// Echoes (with `send`) the marks whose audio has been sent (or dropped by a clear).
    pub(crate) fn echo_played(&mut self, played: u64, mut send: impl FnMut(&str)) {
        while self.marks.front().is_some_and(|(id, _)| *id <= played) {
            if let Some((_, name)) = self.marks.pop_front() {
                send(&name);
            }
        }
    }

    /// Queues what `event` adds to the playout (audio, marks); what it asks beyond that is
    /// returned.
    pub(crate) fn take(&mut self, event: AgentEvent, marks: &AtomicU64) -> Taken {
        match event {
            AgentEvent::Audio(_) if self.pending.len() >= MAX_BACKLOG_FRAMES => {
                Taken::End(AgentEnd::Disconnected("the agent sent more than five minutes of audio ahead".into()))
            }
            AgentEvent::Audio(frame) => {
                self.pending.push_back(Pending::Audio(frame));
                Taken::Queued
            }
            AgentEvent::Mark(name) => {
                let id = crate::media::next_mark(marks);
                self.marks.push_back((id, name));
                self.pending.push_back(Pending::Mark(id));
                Taken::Queued
            }
            AgentEvent::Clear => Taken::Clear,
            AgentEvent::Transfer(target) => Taken::End(AgentEnd::TransferRequested(target)),
            AgentEvent::Hangup => Taken::End(AgentEnd::HangupRequested),
            AgentEvent::Closed => Taken::End(AgentEnd::Completed),
            AgentEvent::Failed(why) => Taken::End(AgentEnd::Disconnected(why)),
            other => {
                tracing::debug!(?other, "agent event");
                Taken::Queued
            }
        }
    }

    /// Barge-in: drops everything queued, in the session too, and returns the marks dropped
    /// (to be echoed, as Twilio does).
    pub(crate) fn clear(&mut self, session: &mut MediaSession) -> impl Iterator<Item = String> + '_ {
        self.pending.clear();
        session.clear();
        self.marks.drain(..).map(|(_, name)| name)
    }
}

/// What an agent event asks of the session beyond [`Playout::take`].
pub(crate) enum Taken {
    /// Nothing (audio and marks are queued).
    Queued,
    /// `clear` (barge-in): [`Playout::clear`] with the session, and echo the marks it dropped.
    Clear,
    /// The agent side ended.
    End(AgentEnd),
}

/// Benchmarks only: how long ago the agent sent `frame`, by the stamp a stamping echo agent
/// wrote into it; `None` without a stamp, or for one from a clock that stepped.
pub(crate) fn stamp_age(frame: &[u8]) -> Option<Duration> {
    let stamp =
        frame.get(AGENT_STAMP_AT..AGENT_STAMP_AT + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes)?;
    let now = patchbay_agent::server::unix_nanos();
    (stamp > 0 && stamp <= now).then(|| Duration::from_nanos(now - stamp))
}

/// Benchmarks only: a duration in whole microseconds.
pub(crate) fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// The agent's answers the clock takes in at one step at most (the rest wait for the next).
const MAX_EVENTS_PER_STEP: usize = 64;

/// A `ws://` agent session as the media clock drives it ([`patchbay_agent::ClockLink`]): at
/// each of the call's steps the clock reads the agent's answers into the playout before the
/// step's packet is made, and writes the caller's frame once the step released it. The
/// session's task is woken only when the agent side ends (and takes the link back then).
pub struct AgentLink {
    pub(crate) link: ClockLink,
    pub(crate) playout: Playout,
    pub(crate) pool: FramePool,
    pub(crate) marks: Arc<AtomicU64>,
    /// How the agent side ended, for the session's task.
    pub(crate) end: Option<AgentEnd>,
    pub(crate) wake: Arc<tokio::sync::Notify>,
    pub(crate) probe: Option<LinkProbe>,
}

impl std::fmt::Debug for AgentLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentLink").field("link", &self.link).field("end", &self.end).finish_non_exhaustive()
    }
}

/// Benchmarks only: the clock link's figures (see [`AgentProbe`]).
pub(crate) struct LinkProbe {
    pub(crate) figures: Arc<std::sync::Mutex<AgentProbe>>,
    /// Per caller frame written and not answered yet: when its step handed it over, and how
    /// long writing it took from then (`None`: it waited in the buffer for the agent to read).
    pub(crate) sent: VecDeque<(Instant, Option<Duration>)>,
    pub(crate) ptime: Duration,
}

impl LinkProbe {
    /// The agent's answer `frame` to the oldest frame written, read at the step due at `step`
    /// (`now` on the clock).
    fn record(&mut self, frame: &[u8], now: Instant, step: Instant) {
        let Some((handed_over, written)) = self.sent.pop_front() else { return };
        // Both clocks read together, before waiting for the figures' lock.
        let sent = stamp_age(frame).and_then(|age| Instant::now().checked_sub(age));
        let mut figures = self.figures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        figures.turnaround.push(micros(now.saturating_duration_since(handed_over)));
        // Without a stamp (or a frame written only once the agent read again), the split is
        // not known.
        let (Some(sent), Some(written)) = (sent, written) else { return };
        // The earliest of the call's steps that could have played the answer: the first one due
        // after the agent sent it. Waiting for it is packetisation; what comes after is ours.
        let late = if sent >= step {
            Duration::ZERO
        } else {
            let missed = (step - sent).as_nanos() / self.ptime.as_nanos().max(1);
            if missed > 0 {
                figures.missed_step += 1;
            }
            let earliest = step - self.ptime * u32::try_from(missed).unwrap_or(u32::MAX);
            now.saturating_duration_since(earliest)
        };
        figures.to_agent.push(micros(written));
        figures.from_agent.push(micros(late));
        figures.patchbay.push(micros(written + late));
    }
}

impl AgentLink {
    /// At the call's step `step` (`now` on the clock), before its packet is made: reads what
    /// the agent sent into the playout (marks, clears and the session's end included).
    pub(crate) fn take_in(&mut self, session: &mut MediaSession, now: Instant, step: Instant) {
        if self.end.is_none() {
            for _ in 0..MAX_EVENTS_PER_STEP {
                let Some(event) = self.link.poll(now) else { break };
                if let (Some(probe), AgentEvent::Audio(frame)) = (&mut self.probe, &event) {
                    probe.record(frame, now, step);
                }
                match self.playout.take(event, &self.marks) {
                    Taken::Queued => {}
                    Taken::Clear => {
                        let dropped: Vec<String> = self.playout.clear(session).collect();
                        for name in dropped {
                            let _ = self.link.send_mark(&name, now);
                        }
                    }
                    Taken::End(end) => {
                        self.end = Some(end);
                        self.wake.notify_one();
                        break;
                    }
                }
            }
        }
        self.playout.fill(session, &self.pool);
    }

    /// After the step's packet went: writes the caller's frame the step released, if any.
    pub(crate) fn give(&mut self, frame: Option<patchbay_media::Frame>, now: Instant) {
        let Some(frame) = frame else { return };
        if self.end.is_some() {
            return;
        }
        // One message per frame, as long as the call's ptime (Twilio's own streams are 20 ms;
        // agents read any length).
        let mut mulaw = [0u8; patchbay_media::session::MAX_FRAME_SAMPLES];
        let n = frame.encode_into(AudioEncoding::Pcmu, &mut mulaw);
        drop(frame);
        let written = matches!(self.link.send_media(&mulaw[..n], now), Ok(true));
        if let Some(probe) = &mut self.probe
            && written
        {
            let written = (!self.link.writes_waiting()).then(|| Instant::now().saturating_duration_since(now));
            probe.sent.push_back((now, written));
        }
    }

    /// Echoes the marks whose audio has been sent (`played` is the last mark played).
    pub(crate) fn echo_played(&mut self, played: u64, now: Instant) {
        if self.end.is_some() {
            return;
        }
        let link = &mut self.link;
        self.playout.echo_played(played, |name| {
            let _ = link.send_mark(name, now);
        });
    }
}
