//! The media shell: each call's RTP socket, and the clock threads that tick every call's
//! [`MediaSession`] once per packetisation interval.
//!
//! The clock is dedicated OS threads (two, or four on hosts with four cores or more), not a
//! tokio timer: flows run on the tokio workers and may keep them busy for a whole CPU slice,
//! and the wire must not notice. Every 0.5 ms one of the threads serves one step of a wheel shared by all of them:
//! a fortieth of the 20 ms calls (each call at a fixed step of its period); for each it
//! reads everything that arrived on the call's socket since the last visit (one `recvmmsg`,
//! each datagram with the kernel's arrival time), takes one short per-call lock to feed those
//! packets to the session and let it write its packet (and take the caller's next frame for
//! whoever listens), releases it, and sends. See [`clock`] for how it keeps time.
//!
//! Receiving on the clock rather than in a task per call: a task cost an epoll wake-up, a
//! successful `recvfrom`, a second one that found nothing, and a scheduler round trip for every
//! packet; the clock pays one `recvmmsg` per call per period and no wake-up. Packets wait up to
//! one period in the kernel, which the jitter buffer (played out on this same clock) hid
//! anyway, and the kernel's arrival stamps keep the jitter figures and the buffer's timing
//! true (BENCHMARKS.md, "System benchmark").
//!
//! RTCP runs on the RTP port + 1 (RFC 3550 §11), or on the RTP port when both sides said
//! `a=rtcp-mux` (RFC 5761; the clock then sorts what arrives by packet type, §4): the clock
//! sends each call's reports when its session says one is due, and reads the peer's port + 1
//! every other turn of the wheel (240 ms; reports come every few seconds and carry their own
//! timing).
//!
//! Each call is paced at its own negotiated ptime (10, 20, 30 or 40 ms; `[media] ptime_ms` is
//! ours, 20 by default): the wheel turns in 0.5 ms steps over 120 ms, and a call sits in every
//! (ptime / 0.5 ms)-th step.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use patchbay_host::Dtmf;
use patchbay_media::rtp::{NtpClock, NtpTime};
use patchbay_media::session::{Codec, MAX_PACKET, MAX_RTCP, MediaSession, SessionConfig, SessionEvent, SrtpKeys};
use patchbay_media::{Frame, FramePool};
use patchbay_udp::{ArrivalClock, Batch};

pub mod agent_link;

use agent_link::AgentLink;
use tokio::sync::{mpsc, watch};

/// The default packetisation interval (ours in SDP unless `[media] ptime_ms` says otherwise).
pub const PTIME: Duration = Duration::from_millis(20);

/// Frames buffered between the clock and a flow reading the caller's audio (1 s).
pub const FLOW_AUDIO_QUEUE: usize = 50;

/// Key presses (SIP INFO or RFC 4733) queued for a flow that has not read them yet; more are
/// dropped.
pub(crate) const DTMF_QUEUE: usize = 64;

/// A call's flow side channels: key presses in, marks played out.
pub(crate) struct CallChannels {
    pub(crate) dtmf: mpsc::Sender<Dtmf>,
    pub(crate) dtmf_rx: mpsc::Receiver<Dtmf>,
    pub(crate) played: watch::Sender<u64>,
    pub(crate) played_rx: watch::Receiver<u64>,
}

impl CallChannels {
    pub(crate) fn new() -> Self {
        // Bounded: a flow that never reads key presses must not let a peer grow this queue.
        let (dtmf, dtmf_rx) = mpsc::channel(DTMF_QUEUE);
        let (played, played_rx) = watch::channel(0);
        Self { dtmf, dtmf_rx, played, played_rx }
    }
}

/// A new mark id from a call's counter, shared by its prompts and its agent sessions (ids start
/// at 1; 0 means "nothing played yet").
pub(crate) fn next_mark(marks: &std::sync::atomic::AtomicU64) -> u64 {
    marks.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
}

/// Queues the next frames of `prompt` (from frame `next` on) until 50 frames are queued (a
/// second at 20 ms);
/// once all of it is queued, queues the mark `id` and returns true. Shared by flows' `play` and
/// `patchbay call --play`.
pub(crate) fn feed_prompt(
    session: &mut MediaSession,
    pool: &FramePool,
    prompt: &patchbay_media::prompt::Prompt,
    codec: patchbay_media::prompt::PromptCodec,
    next: &mut usize,
    id: u64,
) -> bool {
    let mut octets = [0u8; 320];
    let octets = &mut octets[..session.samples_per_frame() as usize];
    while session.queued() < PROMPT_AHEAD_FRAMES {
        if !prompt.frame_into(codec, *next, octets) {
            session.mark(id);
            return true;
        }
        let Ok(frame) = pool.g711(codec.encoding(), octets, 0) else { return false };
        if session.play(frame).is_err() {
            return false;
        }
        *next += 1;
    }
    false
}

/// Audio queued ahead of the wire while a prompt plays (the rest is fed as it goes out).
const PROMPT_AHEAD_FRAMES: usize = 50;

/// Where a call's media events go.
#[derive(Debug, Clone)]
pub struct CallSinks {
    /// Key presses (RFC 4733 or in-band), merged with SIP INFO ones.
    pub dtmf: mpsc::Sender<Dtmf>,
    /// The id of the last mark played (see [`MediaSession::mark`]).
    pub played: watch::Sender<u64>,
    /// Told once when RTP stops arriving for the inactivity timeout.
    pub inactive: mpsc::UnboundedSender<()>,
}

/// Who receives the caller's audio (after the jitter buffer), straight from the clock thread.
#[derive(Debug)]
pub enum Listener {
    /// A flow's audio stream, a recording, an early-media bridge: frames by handle.
    Frames(mpsc::Sender<Frame>),
    /// An AI agent session: the frame as μ-law, queued to the agent's websocket writer without
    /// a hop through the session's own task (one task wake-up per frame fewer; see
    /// BENCHMARKS.md, "AI agent path").
    Agent {
        /// The agent stream's writer queue.
        sender: patchbay_agent::AgentSender,
        /// Benchmarks only: when each frame was handed over, for the agent turnaround figure.
        handed_over: Option<agent_link::HandOffTimes>,
    },
}

impl Listener {
    /// Hands one frame over; a listener that does not keep up loses audio, never the clock.
    fn deliver(&self, frame: Frame) {
        match self {
            Listener::Frames(tx) => {
                let _ = tx.try_send(frame);
            }
            Listener::Agent { sender, handed_over } => {
                // One message per frame, as long as the call's ptime (Twilio's own streams are
                // 20 ms; agents read any length).
                let mut mulaw = [0u8; patchbay_media::session::MAX_FRAME_SAMPLES];
                let n = frame.encode_into(patchbay_media::AudioEncoding::Pcmu, &mut mulaw);
                let Some(times) = handed_over else {
                    // Fails only once the agent's writer has ended, which its session notices.
                    let _ = sender.send_media(&mulaw[..n]);
                    return;
                };
                // Benchmarks: stamped before it is queued (the answer may come back before
                // this thread runs again), taken back if the queue was full and dropped it.
                let lock = || times.lock().unwrap_or_else(PoisonError::into_inner);
                lock().push_back(std::time::Instant::now());
                if !matches!(sender.send_media(&mulaw[..n]), Ok(true)) {
                    lock().pop_back();
                }
            }
        }
    }
}

/// One call's media as the shell holds it.
#[derive(Debug)]
pub struct CallMedia {
    /// The call's packetisation interval, as the clock paces it.
    ptime_ms: u32,
    /// Who the call's signalling peer is: what decides where its RTP may go.
    peer: MediaPeer,
    session: Mutex<MediaSession>,
    socket: std::net::UdpSocket,
    rtcp_socket: Option<std::net::UdpSocket>,
    sinks: CallSinks,
    /// Receives the caller's audio while a flow has its audio stream open.
    listener: Mutex<Option<Listener>>,
    /// Whether `listener` is set (read without its lock on every tick).
    listening: AtomicBool,
    /// A `ws://` agent the clock drives at this call's steps (see [`AgentLink`]). Lock order:
    /// this before `session`.
    agent: Mutex<Option<AgentLink>>,
    /// Whether `agent` is set (read without its lock on every tick).
    has_agent: AtomicBool,
    closed: AtomicBool,
    /// Held while events are taken and delivered, so that key presses and marks reach the
    /// call in the order the session raised them (the clock thread and the flow's commands
    /// both deliver).
    dispatching: Mutex<()>,
    /// What of the session's counters the metrics have been given so far (they are added
    /// about once a second and at the end, [`COUNT_EVERY`]).
    counted: Mutex<crate::metrics::MediaCounted>,
}

impl CallMedia {
    /// Who the call's signalling peer is (where its RTP may go).
    pub fn peer(&self) -> MediaPeer {
        self.peer
    }

    fn lock(&self) -> MutexGuard<'_, MediaSession> {
        self.session.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the session under its lock (keep it short: the clock thread waits on it).
    pub fn with<R>(&self, f: impl FnOnce(&mut MediaSession) -> R) -> R {
        let (result, events) = {
            let mut session = self.lock();
            let result = f(&mut session);
            (result, session.has_events())
        };
        // Most calls (every bridged frame, every agent frame) raise nothing: skip the second
        // lock then.
        if events {
            self.dispatch();
        }
        result
    }

    /// The call's packetisation interval as the clock paces it (ms).
    pub fn ptime_ms(&self) -> u16 {
        self.ptime_ms as u16
    }

    /// Sends the caller's audio to `listener` from now on (`None`: nobody listens; frames are
    /// dropped after the jitter buffer).
    pub fn listen(&self, listener: Option<Listener>) {
        let mut slot = self.listener.lock().unwrap_or_else(PoisonError::into_inner);
        self.listening.store(listener.is_some(), Ordering::Relaxed);
        *slot = listener;
    }

    /// Hands the call's agent session to the clock: from its next step on, the clock reads the
    /// agent's answers into the playout and writes the caller's audio to the agent.
    pub fn attach_agent(&self, link: AgentLink) {
        let mut slot = self.agent.lock().unwrap_or_else(PoisonError::into_inner);
        *slot = Some(link);
        self.has_agent.store(true, Ordering::Relaxed);
    }

    /// Takes the agent session back from the clock.
    pub fn detach_agent(&self) -> Option<AgentLink> {
        self.detach_agent_if(|_| true)
    }

    /// Takes the agent session back from the clock if `ready` says so (under the lock the
    /// clock takes it with, so no step runs between the check and the taking).
    pub fn detach_agent_if(&self, ready: impl FnOnce(&AgentLink) -> bool) -> Option<AgentLink> {
        let mut slot = self.agent.lock().unwrap_or_else(PoisonError::into_inner);
        if !slot.as_ref().is_some_and(ready) {
            return None;
        }
        self.has_agent.store(false, Ordering::Relaxed);
        slot.take()
    }

    /// Runs `f` on the call's agent session, if the clock has one (keep it short: the clock
    /// thread waits on it).
    pub fn with_agent<R>(&self, f: impl FnOnce(&mut AgentLink) -> R) -> Option<R> {
        self.agent.lock().unwrap_or_else(PoisonError::into_inner).as_mut().map(f)
    }

    /// Stops the media: the clock forgets the call (and closes its sockets).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Delivers the session's pending events.
    fn dispatch(&self) {
        let _order = self.dispatching.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let Some(event) = self.lock().poll_event() else { return };
            match event {
                SessionEvent::Dtmf { digit, duration_ms } => {
                    if self.sinks.dtmf.try_send(Dtmf { digit, duration_ms }).is_err() {
                        tracing::debug!("key press dropped: the flow is not reading them");
                    }
                }
                SessionEvent::Played(id) => {
                    // The highest mark played: a `clear` may report older marks after newer ones.
                    self.sinks.played.send_if_modified(|played| {
                        let newer = id > *played;
                        if newer {
                            *played = id;
                        }
                        newer
                    });
                }
                SessionEvent::Inactive => {
                    let _ = self.sinks.inactive.send(());
                }
                SessionEvent::Latched(from) => tracing::debug!(%from, "RTP latched (symmetric RTP)"),
            }
        }
    }

    /// The socket RTCP goes out on: the RTP one when multiplexed (RFC 5761), else port + 1 if
    /// the call has it.
    fn rtcp_out(&self, mux: bool) -> Option<&std::net::UdpSocket> {
        if mux { Some(&self.socket) } else { self.rtcp_socket.as_ref() }
    }

    /// The call has ended: sends its last RTCP report with a BYE (RFC 3550 §6.6), where its
    /// reports go.
    fn goodbye(&self, now: Instant, ntp: &NtpClock, out: &mut Buffers) {
        let mut session = self.lock();
        crate::metrics::METRICS.media_ended(
            &mut self.counted.lock().unwrap_or_else(PoisonError::into_inner),
            &session.stats(),
            &session.quality(),
        );
        let Some(socket) = self.rtcp_out(session.rtcp_mux()) else { return };
        if let Some((to, len)) = session.rtcp_bye(now, ntp.at(now), &mut out.rtcp) {
            let _ = socket.send_to(&out.rtcp[..len], to);
        }
    }

    /// Runs one tick: takes in what arrived, sends what is due. Returns whether a packet was
    /// sent.
    ///
    /// The time is read under the call's lock: two clock threads may serve two of a call's
    /// steps at once (one of them stalled mid-step for a whole ptime), and the session must
    /// never see time go backwards.
    ///
    /// A call with an agent on the clock ([`AgentLink`]) takes the agent's answers in before
    /// its packet is made (an answer that arrived by this step goes out in it) and writes the
    /// caller's frame to the agent after. `step` is when this step was due.
    fn tick(&self, ntp: &NtpClock, out: &mut Buffers, stats: &ClockStats, due: Due, step: Instant) -> bool {
        let Due { rtcp: rtcp_due, count: count_due } = due;
        let mut agent_slot =
            self.has_agent.load(Ordering::Relaxed).then(|| self.agent.lock().unwrap_or_else(PoisonError::into_inner));
        let mut agent = agent_slot.as_deref_mut().and_then(Option::as_mut);
        let (packet, report, frame, events, now) = {
            let mut session = self.lock();
            let arrivals = ArrivalClock::now();
            let now = arrivals.instant();
            // Everything that arrived since the last visit, at the times the kernel saw it; on a
            // multiplexed port (RFC 5761 §4) the RTCP among it goes to the RTCP side.
            let mux = session.rtcp_mux();
            drain(&self.socket, &mut out.inbox, now, &arrivals, |arrival, from, data| {
                if mux && patchbay_media::session::is_rtcp(data) {
                    session.receive_rtcp(arrival, ntp.at(arrival), from, data);
                } else {
                    session.receive(arrival, from, data);
                }
            });
            // Port + 1 only while RTCP has a port of its own (RFC 5761).
            if rtcp_due
                && !mux
                && let Some(rtcp) = &self.rtcp_socket
            {
                drain(rtcp, &mut out.inbox, now, &arrivals, |arrival, from, data| {
                    session.receive_rtcp(arrival, ntp.at(arrival), from, data);
                });
            }
            if let Some(agent) = agent.as_deref_mut() {
                agent.take_in(&mut session, now, step);
            }
            let packet = session.tick(now, &mut out.rtp);
            let report = match self.rtcp_out(mux) {
                Some(socket) => session.rtcp_tick(now, ntp.at(now), &mut out.rtcp).map(|report| (socket, report)),
                None => None,
            };
            if count_due {
                crate::metrics::METRICS.media_progress(
                    &mut self.counted.lock().unwrap_or_else(PoisonError::into_inner),
                    &session.stats(),
                    &session.quality(),
                );
            }
            // The jitter buffer's playout runs on this clock whether or not anybody listens.
            (packet, report, session.take_received(now), session.has_events(), now)
        };
        if let Some((socket, (to, len))) = report {
            let _ = socket.send_to(&out.rtcp[..len], to);
        }
        let out = &out.rtp;
        let sent = match packet {
            Some((to, len)) => match self.socket.send_to(&out[..len], to) {
                Ok(_) => true,
                Err(_) => {
                    stats.send_errors.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::METRICS.rtp_send_errors.inc();
                    false
                }
            },
            None => false,
        };
        if let Some(agent) = agent.as_deref_mut() {
            agent.give(frame, now);
        } else if let Some(frame) = frame
            && self.listening.load(Ordering::Relaxed)
        {
            // Delivered under the lock (never blocks: queues only), which `listen` alone
            // contends for, rather than cloning the listener per frame.
            if let Some(listener) = &*self.listener.lock().unwrap_or_else(PoisonError::into_inner) {
                listener.deliver(frame);
            }
        }
        if events {
            self.dispatch();
        }
        if let Some(agent) = agent {
            let played = *self.sinks.played.borrow();
            agent.echo_played(played, now);
        }
        sent
    }
}

/// How the shared clock is doing.
#[derive(Debug, Default)]
pub struct ClockStats {
    /// Steps of the wheel served (one per 0.5 ms).
    pub ticks: AtomicU64,
    /// Sends that failed (socket buffer full, unreachable).
    pub send_errors: AtomicU64,
    /// Latest step start after its deadline, in microseconds.
    pub max_late_us: AtomicU64,
    /// Steps that started more than 1 ms after their deadline.
    pub late_ticks: AtomicU64,
    /// For benchmarks: when set, the clock records when each call's packet left.
    pub record_departures: AtomicBool,
    /// The recorded departures: (call, time).
    pub departures: Mutex<Vec<(usize, Instant)>>,
}

/// The media engine: the frame pool, the wheel of calls and the clock threads that turn it.
#[derive(Debug, Clone)]
pub struct MediaEngine {
    pool: FramePool,
    /// The wheel; it tells the clock threads to end (once their calls have closed) when the
    /// last clone of the engine is dropped.
    wheel: Arc<EngineOwner>,
    /// Read by the benchmarks only (`bench-media`); the clock threads hold their own clones.
    #[cfg(feature = "bench")]
    stats: Arc<ClockStats>,
}

/// Dropped with the last clone of a [`MediaEngine`].
#[derive(Debug)]
struct EngineOwner(Arc<Wheel>);

impl Drop for EngineOwner {
    fn drop(&mut self) {
        self.0.stopping.store(true, Ordering::Release);
    }
}

impl MediaEngine {
    /// Starts the clock threads: four on a host with four cores or more, else two.
    ///
    /// Two or four, not three: every ptime is an even number of steps (a multiple of four), so
    /// all of a call's steps fall to the same thread unless it is covering for a late one — a
    /// call's frames then come from and go back to one thread's shard of the frame pool.
    pub fn start() -> std::io::Result<Self> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let threads = if cores >= MAX_CLOCK_THREADS { MAX_CLOCK_THREADS } else { 2 };
        let stats = Arc::new(ClockStats::default());
        let wheel = Arc::new(Wheel::new(Instant::now()));
        // Made first, so that threads already started end if a later one cannot be.
        let owner = Arc::new(EngineOwner(Arc::clone(&wheel)));
        for index in 0..threads {
            let (thread_wheel, thread_stats) = (Arc::clone(&wheel), Arc::clone(&stats));
            std::thread::Builder::new()
                .name(format!("patchbay-media-clock-{index}"))
                .spawn(move || clock(&thread_wheel, &thread_stats, index, threads))?;
        }
        Ok(Self {
            pool: FramePool::new(16_384),
            wheel: owner,
            #[cfg(feature = "bench")]
            stats,
        })
    }

    /// The frame pool every call shares.
    pub fn pool(&self) -> &FramePool {
        &self.pool
    }

    /// The clock's counters.
    #[cfg(feature = "bench")]
    pub fn stats(&self) -> &ClockStats {
        &self.stats
    }

    /// Starts a call's media on `socket` (already bound: its port is in our SDP) and, when
    /// given, RTCP on `rtcp_socket` (the port + 1): puts it on the clock's wheel, whose threads
    /// read and write both sockets from then on.
    pub fn start_call(
        &self,
        session: MediaSession,
        peer: MediaPeer,
        socket: std::net::UdpSocket,
        rtcp_socket: Option<std::net::UdpSocket>,
        sinks: CallSinks,
    ) -> std::io::Result<Arc<CallMedia>> {
        // Multiplexed (RFC 5761): port + 1 is not used; free it rather than hold a socket per
        // call. (A re-INVITE that later turns multiplexing off leaves such a call without RTCP.)
        let rtcp_socket = rtcp_socket.filter(|_| !session.rtcp_mux());
        for socket in std::iter::once(&socket).chain(rtcp_socket.as_ref()) {
            socket.set_nonblocking(true)?;
            // Without arrival stamps packets count as arriving when read (up to a period late).
            if let Err(e) = patchbay_udp::enable_timestamps(socket.as_raw_fd()) {
                tracing::debug!("SO_TIMESTAMPNS: {e}");
            }
        }
        let ptime_ms = session.samples_per_frame() / 8;
        let media = Arc::new(CallMedia {
            ptime_ms,
            peer,
            session: Mutex::new(session),
            socket,
            rtcp_socket,
            sinks,
            listener: Mutex::new(None),
            listening: AtomicBool::new(false),
            agent: Mutex::new(None),
            has_agent: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            dispatching: Mutex::new(()),
            counted: Mutex::default(),
        });
        self.wheel.0.place(Arc::clone(&media));
        Ok(media)
    }
}

/// Datagrams a clock thread reads from one socket per system call.
const INBOX: usize = 8;

/// The peer's RTCP is read every this many turns of the wheel (240 ms).
const RTCP_EVERY: u64 = 2;

/// Each call's RTP counters go to the metrics every this many turns of the wheel (960 ms), at
/// its first step of the turn, and when it ends.
const COUNT_EVERY: u64 = 8;

/// Feeds everything waiting on `socket` to `deliver` with its arrival time (the kernel's stamp,
/// else `now`). A backlog larger than the inbox (after a stall) takes a few reads.
fn drain(
    socket: &std::net::UdpSocket,
    inbox: &mut Batch,
    now: Instant,
    arrivals: &ArrivalClock,
    mut deliver: impl FnMut(Instant, std::net::SocketAddr, &mut [u8]),
) {
    for _ in 0..16 {
        let count = match inbox.receive(socket.as_raw_fd()) {
            Ok(count) => count,
            // ICMP port unreachable from an earlier send, and the like.
            Err(e) => {
                tracing::trace!("rtp receive: {e}");
                return;
            }
        };
        for i in 0..count {
            let datagram = inbox.received(i);
            let Some(from) = datagram.from else { continue };
            let arrival = if datagram.arrival_ns > 0 { arrivals.arrival(datagram.arrival_ns) } else { now };
            deliver(arrival, from, datagram.data);
        }
        if count < INBOX {
            return;
        }
    }
}

/// The wall clock as RTCP needs it, following the monotonic clock from now on.
fn wall_clock() -> NtpClock {
    let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    NtpClock::new(Instant::now(), NtpTime::from_unix(unix))
}

/// The clock thread's send buffers.
struct Buffers {
    rtp: [u8; MAX_PACKET],
    rtcp: [u8; MAX_RTCP],
    inbox: Batch,
}

/// The media session for what an offer/answer exchange agreed (either side of it), paced every
/// `ptime_ms` (the negotiated ptime, or the one the clock already paces a renegotiated call
/// at). `random` seeds the SSRC and the initial sequence number and timestamp (RFC 3550 §5.1).
pub fn session_for(
    negotiated: &patchbay_sip::sdp::Negotiated,
    ptime_ms: u16,
    pool: &FramePool,
    inactivity_timeout: Option<Duration>,
    random: u64,
    peer: MediaPeer,
) -> MediaSession {
    let codec = match negotiated.codec.codec {
        patchbay_sip::sdp::AudioCodec::Pcma => Codec::Pcma,
        _ => Codec::Pcmu,
    };
    let declared = (!negotiated.remote_rtp.ip().is_unspecified()).then_some(negotiated.remote_rtp);
    let remote = peer.destination(declared);
    let srtp = negotiated.srtp.as_ref().and_then(|p| {
        Some(SrtpKeys {
            profile: patchbay_media::srtp::SrtpProfile::from_name(p.suite.name())?,
            local: patchbay_media::srtp::MasterKey::from_concatenated(&p.local_key.0),
            remote: patchbay_media::srtp::MasterKey::from_concatenated(&p.remote_key.0),
        })
    });
    let mut session = MediaSession::new(
        SessionConfig {
            codec,
            payload_type: negotiated.codec.payload_type,
            telephone_event: negotiated.telephone_event,
            comfort_noise: negotiated.comfort_noise,
            ptime_ms: u32::from(ptime_ms),
            remote,
            ssrc: random as u32,
            initial_sequence: (random >> 32) as u16,
            initial_timestamp: (random >> 16) as u32,
            inactivity_timeout,
            inband_dtmf: negotiated.telephone_event.is_none(),
            rtcp_mux: negotiated.rtcp_mux,
            remote_rtcp: peer.destination(negotiated.remote_rtcp),
            jitter: Default::default(),
            srtp,
        },
        pool.clone(),
    );
    session.set_hold(!negotiated.direction.receives() || declared.is_none());
    session.set_sending(negotiated.direction.sends());
    session
}

/// What decides where a call's RTP and RTCP may go beyond what its SDP says. An SDP is the
/// peer's word: a stranger's offer naming `127.0.0.1:6379` or `10.0.0.5:53` would otherwise
/// have us send packets into our own host or network. An internal address (loopback, private,
/// link-local, shared/CGN, unique-local) is taken only when the signalling came from that same
/// address, or when the tenant allows it (`[tenant.allow] private_media`, for a carrier's
/// private media network); otherwise nothing is sent until the peer's own RTP shows where it
/// is (symmetric RTP: a NAT'd phone whose SDP names its private address keeps working).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaPeer {
    /// Where the call's signalling comes from (or goes to, for a call we placed).
    pub signalling: Option<std::net::IpAddr>,
    /// Internal addresses allowed whatever the signalling's.
    pub private_media: bool,
}

impl MediaPeer {
    /// Whatever the SDP says (`patchbay call`, our own test caller, and benchmarks).
    pub const ANY: Self = Self { signalling: None, private_media: true };

    /// Whether RTP may be sent to `to` on the SDP's word.
    pub fn allows(&self, to: std::net::SocketAddr) -> bool {
        let ip = to.ip().to_canonical();
        self.private_media || self.signalling.is_some_and(|s| s.to_canonical() == ip) || !is_internal(ip)
    }

    /// `to` if RTP may be sent there on the SDP's word, else `None` (wait for the peer's RTP).
    pub fn destination(&self, to: Option<std::net::SocketAddr>) -> Option<std::net::SocketAddr> {
        let allowed = to.filter(|to| self.allows(*to));
        if let (Some(to), None) = (to, allowed) {
            tracing::info!(%to, "SDP names an internal address the signalling did not come from: not sending there until the peer's RTP arrives");
        }
        allowed
    }
}

/// Loopback, private (RFC 1918), link-local, shared (RFC 6598), unspecified, broadcast and
/// unique-local (RFC 4193) addresses: our own host's and networks', not the internet's.
fn is_internal(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || (a == 100 && (64..128).contains(&b))
                || a == 0
        }
        std::net::IpAddr::V6(v6) => {
            let segments = v6.segments();
            let first = segments[0];
            // IPv4 inside IPv6: NAT64 (64:ff9b::/96) and 6to4 (2002::/16) reach the IPv4
            // address they carry.
            let embedded = match segments {
                [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => {
                    Some(std::net::Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)))
                }
                [0x2002, hi, lo, ..] => Some(std::net::Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo))),
                _ => None,
            };
            v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || embedded.is_some_and(|v4| is_internal(std::net::IpAddr::V4(v4)))
        }
    }
}

/// Binds an RTP socket on an even port and its RTCP socket on the next one (RFC 3550 §11).
pub fn bind_rtp_pair(ip: std::net::IpAddr) -> std::io::Result<(std::net::UdpSocket, std::net::UdpSocket)> {
    let mut last = std::io::Error::other("no free RTP port pair");
    for _ in 0..64 {
        let rtp = std::net::UdpSocket::bind((ip, 0))?;
        let port = rtp.local_addr()?.port();
        if port % 2 == 1 || port == u16::MAX {
            continue;
        }
        match std::net::UdpSocket::bind((ip, port + 1)) {
            Ok(rtcp) => return Ok((rtp, rtcp)),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Raises the soft limit on open files to the hard limit: a media host needs a socket per
/// call (two with RTCP), and the usual soft limit (1024) caps it far below what it can carry.
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!("could not raise the open-file limit");
            }
        }
    }
}

/// One step of the clock's wheel, in microseconds.
const STEP_US: u64 = 500;

/// Steps in one turn of the wheel: 120 ms, the least common multiple of the ptimes a call can
/// have (10, 20, 30, 40 ms), so that every call is served at the same offsets in every turn.
const WHEEL_STEPS: usize = 240;

/// Clock threads on a host with this many cores or more (two below that).
const MAX_CLOCK_THREADS: usize = 4;

/// How many steps apart a call of `ptime_ms` (10, 20, 30 or 40, as [`MediaSession`] rounds it)
/// is served.
fn steps_per_tick(ptime_ms: u32) -> usize {
    (u64::from(ptime_ms) * 1000 / STEP_US) as usize
}

/// Puts `call` (paced every `ptime_ms`) on the wheel `slots`: in every
/// [`steps_per_tick`]-th step from the offset whose steps hold the fewest calls by `loads` (the
/// calls per step, kept beside the wheel so that placing a call does not wait on the steps the
/// clock threads are serving). Its first step in a turn is therefore the one below
/// `steps_per_tick`.
fn place<T: Clone>(loads: &mut [usize], slots: &[Mutex<Vec<T>>], call: T, ptime_ms: u32) {
    let every = steps_per_tick(ptime_ms);
    let load = |offset: usize| loads.iter().skip(offset).step_by(every).sum::<usize>();
    let offset = (0..every).min_by_key(|&o| load(o)).unwrap_or(0);
    for at in (offset..slots.len()).step_by(every) {
        loads[at] += 1;
        slots[at].lock().unwrap_or_else(PoisonError::into_inner).push(call.clone());
    }
}

/// Every call, on a wheel of [`WHEEL_STEPS`] steps of [`STEP_US`], shared by the clock
/// threads: whichever thread is awake serves the steps that are due and that no other thread
/// has claimed.
#[derive(Debug)]
struct Wheel {
    steps: Box<[Mutex<Vec<Arc<CallMedia>>>]>,
    /// Calls per step, for placing new ones (also serialises placements).
    loads: Mutex<Vec<usize>>,
    /// Step 0's deadline; step k is due `k` × [`STEP_US`] later.
    start: Instant,
    /// The next step to serve (claimed by one thread with a compare-and-swap).
    next: AtomicU64,
    /// Calls on the wheel (closed ones leave it when their first step of a turn is served).
    live: AtomicUsize,
    /// The engine was dropped: the threads end once every call has left the wheel.
    stopping: AtomicBool,
    /// The wall clock for RTCP, one for every thread (a call is served by any of them, and its
    /// reports' timestamps and round-trip times must come from one clock).
    ntp: NtpClock,
}

impl Wheel {
    fn new(start: Instant) -> Self {
        Self {
            steps: (0..WHEEL_STEPS).map(|_| Mutex::new(Vec::new())).collect(),
            loads: Mutex::new(vec![0; WHEEL_STEPS]),
            start,
            next: AtomicU64::new(0),
            live: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            ntp: wall_clock(),
        }
    }

    fn place(&self, call: Arc<CallMedia>) {
        let mut loads = self.loads.lock().unwrap_or_else(PoisonError::into_inner);
        self.live.fetch_add(1, Ordering::Relaxed);
        let ptime_ms = call.ptime_ms;
        place(&mut loads, &self.steps, call, ptime_ms);
    }

    fn deadline(&self, step: u64) -> Instant {
        self.start + Duration::from_micros(step * STEP_US)
    }

    /// The step due at `now` (the last one whose deadline has passed).
    fn step_at(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_micros() as u64 / STEP_US
    }

    /// Claims the oldest step due at `now` that no thread has claimed yet, if any. A wheel far
    /// behind (the machine was suspended or starved) skips to the present rather than sending
    /// a burst of stale frames.
    fn claim(&self, now: Instant) -> Option<u64> {
        loop {
            let step = self.next.load(Ordering::Acquire);
            let deadline = self.deadline(step);
            if deadline > now {
                return None;
            }
            let skip = now > deadline + PTIME * 5;
            let to = if skip { self.step_at(now) } else { step + 1 };
            if self.next.compare_exchange(step, to, Ordering::AcqRel, Ordering::Acquire).is_ok() && !skip {
                return Some(step);
            }
            // Another thread took it, or the wheel skipped ahead: look again.
        }
    }

    /// Serves step `step`: ticks each of its calls (dropping the closed ones).
    fn serve(&self, step: u64, now: Instant, clock: &mut ClockThread, stats: &ClockStats) {
        let slot = (step % WHEEL_STEPS as u64) as usize;
        // The peer's RTCP is read every RTCP_EVERY-th turn, at a call's first step of the turn.
        let turn = step / WHEEL_STEPS as u64;
        let (rtcp_turn, count_turn) = (turn.is_multiple_of(RTCP_EVERY), turn.is_multiple_of(COUNT_EVERY));
        let record = stats.record_departures.load(Ordering::Relaxed);
        let due = self.deadline(step);
        let mut calls = self.steps[slot].lock().unwrap_or_else(PoisonError::into_inner);
        let before = calls.len();
        calls.retain(|call| {
            let open = !call.closed.load(Ordering::Acquire);
            if !open && slot < steps_per_tick(call.ptime_ms) {
                // The call leaves the wheel at its first step of the turn (it is in others).
                call.goodbye(now, &self.ntp, &mut clock.out);
                self.live.fetch_sub(1, Ordering::Relaxed);
            }
            open
        });
        for call in calls.iter() {
            let first = slot < steps_per_tick(call.ptime_ms);
            let turn_due = Due { rtcp: rtcp_turn && first, count: count_turn && first };
            if call.tick(&self.ntp, &mut clock.out, stats, turn_due, due) && record {
                clock.departures.push((Arc::as_ptr(call) as usize, Instant::now()));
            }
        }
        let left = before - calls.len();
        drop(calls);
        if left > 0 {
            // Not under the step's lock: placing takes the loads, then steps.
            self.loads.lock().unwrap_or_else(PoisonError::into_inner)[slot] -= left;
        }
        if !clock.departures.is_empty() {
            stats.departures.lock().unwrap_or_else(PoisonError::into_inner).append(&mut clock.departures);
        }
    }
}

/// What falls due at a call's step besides its packet.
#[derive(Debug, Clone, Copy)]
struct Due {
    /// Read the peer's RTCP (on its own port).
    rtcp: bool,
    /// Hand the call's RTP counters to the metrics.
    count: bool,
}

/// What one clock thread keeps between steps.
struct ClockThread {
    out: Buffers,
    departures: Vec<(usize, Instant)>,
}

/// A clock thread (`index` of `threads`): wakes at every `threads`-th step deadline, its own
/// offset, and serves every step that is due and unclaimed.
///
/// No timer per call, and a wheel of [`WHEEL_STEPS`] steps of 0.5 ms shared by all threads: a
/// call of ptime P sits in every (P / 0.5 ms)-th step from the offset where its steps are least
/// loaded, so each step serves a 40th of the 20 ms calls. Serving all calls back to back at
/// one deadline (tried first) takes milliseconds of `sendto` for 2,000 calls on a small VM, and
/// the last calls' packets then wander by milliseconds from one period to the next; spreading
/// them keeps each call at a fixed offset, give or take one step's work.
///
/// Why the threads share the wheel instead of each owning some calls (as they did before):
/// on a VM a sleeping thread is now and then woken milliseconds late, and the threads' late
/// wake-ups are nearly independent (`cyclictest`, two threads at 1 ms: 42 late wake-ups in
/// 20 s, 1 of them on both at once). A step whose thread is late is served by the next thread
/// to wake, half a millisecond later, so one late wake-up costs 0.5 ms, not its whole delay
/// (figures in BENCHMARKS.md). Deadlines are absolute (a late step does not shift the ones
/// after it), and a clock that falls far behind (a suspended VM) skips to the present instead
/// of bursting. Spinning before each deadline to beat slow wake-ups was tried and dropped: it
/// made stalls more frequent on this project's 2-vCPU VM.
fn clock(wheel: &Wheel, stats: &ClockStats, index: usize, threads: usize) {
    realtime_priority();
    let mut clock = ClockThread {
        out: Buffers { rtp: [0u8; MAX_PACKET], rtcp: [0u8; MAX_RTCP], inbox: Batch::new(INBOX) },
        departures: Vec::new(),
    };
    let threads = threads as u64;
    loop {
        loop {
            let now = Instant::now();
            let Some(step) = wheel.claim(now) else { break };
            let late = now.saturating_duration_since(wheel.deadline(step)).as_micros() as u64;
            stats.max_late_us.fetch_max(late, Ordering::Relaxed);
            crate::metrics::METRICS.clock_step(Duration::from_micros(late));
            if late > 1_000 {
                stats.late_ticks.fetch_add(1, Ordering::Relaxed);
            }
            stats.ticks.fetch_add(1, Ordering::Relaxed);
            wheel.serve(step, now, &mut clock, stats);
        }
        let stopping = wheel.stopping.load(Ordering::Acquire);
        let idle = wheel.live.load(Ordering::Acquire) == 0;
        if idle && stopping {
            return;
        }
        let now = Instant::now();
        let wake = if idle {
            // An idle host wakes once per period, not once per step.
            now + PTIME
        } else {
            // This thread's next own step: the first one after now that is `index` modulo
            // `threads`.
            let after = wheel.step_at(now) + 1;
            wheel.deadline(after + (index as u64 + threads - after % threads) % threads)
        };
        if let Some(wait) = wake.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if wheel.live.load(Ordering::Acquire) == 0 {
            // Nothing to serve: the steps slept through are empty, not late (and a call placed
            // now starts at the present step, not after a burst of the ones before).
            wheel.next.fetch_max(wheel.step_at(Instant::now()), Ordering::AcqRel);
        }
    }
}

/// Asks the kernel to run the clock thread with a real-time priority (`SCHED_FIFO`), as media
/// servers do (FreeSWITCH's `-rp`): then the flows' threads, logging or a busy tokio worker
/// cannot preempt it mid-tick. Needs an `RLIMIT_RTPRIO` of at least 10 (systemd's
/// `LimitRTPRIO=10`, as in `packaging/patchbay.service`), `CAP_SYS_NICE` or root; without it
/// the clock runs at the normal priority and says so once.
fn realtime_priority() {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: sets the calling thread's scheduling policy; `param` outlives the call.
    let result = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
    if result == 0 {
        tracing::debug!("media clock runs with real-time priority (SCHED_FIFO 10)");
    } else {
        tracing::info!(
            "media clock runs at normal priority (no permission for SCHED_FIFO; for steadier pacing raise RLIMIT_RTPRIO \
             to 10, e.g. systemd LimitRTPRIO=10, or grant CAP_SYS_NICE)"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use std::time::{Duration, Instant};

    use super::{WHEEL_STEPS, Wheel, place, steps_per_tick};

    /// An SDP cannot point our RTP into our own host or network: only the signalling's own
    /// internal address, or any when the tenant allows it; public addresses as said.
    #[test]
    fn rtp_goes_to_an_internal_address_only_where_the_signalling_came_from_or_if_allowed() {
        use super::MediaPeer;
        let at = |s: &str| s.parse::<std::net::SocketAddr>().expect("addr");
        let stranger = MediaPeer { signalling: Some("203.0.113.9".parse().expect("ip")), private_media: false };
        for internal in [
            "[64:ff9b::a00:5]:53",
            "[2002:c0a8:101::1]:80",
            "127.0.0.1:6379",
            "10.0.0.5:53",
            "192.168.1.1:80",
            "169.254.169.254:80",
            "100.64.0.1:9",
            "[::1]:6379",
            "[fd00::1]:9",
            "[fe80::1]:9",
            "[::ffff:127.0.0.1]:6379",
        ] {
            assert!(!stranger.allows(at(internal)), "{internal}");
        }
        assert!(stranger.allows(at("198.51.100.7:40000")), "a public address is the peer's business");
        // A loopback caller's own address (the tests, a local softphone) and a NAT'd phone's
        // public one are fine.
        let local = MediaPeer { signalling: Some("127.0.0.1".parse().expect("ip")), private_media: false };
        assert!(local.allows(at("127.0.0.1:40000")));
        assert!(!local.allows(at("127.0.0.2:40000")), "another loopback address than the signalling's");
        // The tenant's carrier with a private media network.
        let carrier = MediaPeer { signalling: Some("203.0.113.9".parse().expect("ip")), private_media: true };
        assert!(carrier.allows(at("10.20.30.40:20000")));
        assert_eq!(stranger.destination(Some(at("10.0.0.5:53"))), None, "nothing sent until its RTP shows where it is");
    }

    /// The steps at which `call` is served in one turn.
    fn steps(slots: &[Mutex<Vec<u32>>], call: u32) -> Vec<usize> {
        (0..slots.len()).filter(|&i| slots[i].lock().unwrap().contains(&call)).collect()
    }

    #[test]
    fn each_ptime_is_served_once_per_ptime_at_the_least_loaded_offset() {
        let slots: Vec<Mutex<Vec<u32>>> = (0..WHEEL_STEPS).map(|_| Mutex::new(Vec::new())).collect();
        let mut loads = vec![0; WHEEL_STEPS];
        let calls = [(1u32, 20u32), (2, 20), (3, 10), (4, 30), (5, 40)];
        for (call, ptime) in calls {
            place(&mut loads, &slots, call, ptime);
        }
        assert!((0..WHEEL_STEPS).all(|i| loads[i] == slots[i].lock().unwrap().len()), "loads follow the steps");
        for (call, ptime) in calls {
            let at = steps(&slots, call);
            let every = steps_per_tick(ptime);
            assert_eq!(every, ptime as usize * 2, "0.5 ms steps");
            assert_eq!(at.len(), 120 / ptime as usize, "call {call}: once per {ptime} ms in a 120 ms turn");
            // Evenly spaced over the whole turn, so exactly one step (where the clock reads
            // RTCP) falls below `every`.
            assert!(at.windows(2).all(|w| w[1] - w[0] == every), "call {call} at {at:?}");
        }
        // The second 20 ms call avoids the first one's steps; the 10 ms call avoids both.
        assert_ne!(steps(&slots, 1)[0], steps(&slots, 2)[0]);
        let busy: Vec<usize> = steps(&slots, 1).into_iter().chain(steps(&slots, 2)).collect();
        assert!(steps(&slots, 3).iter().all(|s| !busy.contains(s)), "{busy:?} {:?}", steps(&slots, 3));
    }

    #[test]
    fn a_step_is_claimed_once_by_whichever_thread_is_awake_and_a_stalled_wheel_skips_ahead() {
        let start = Instant::now();
        let wheel = Wheel::new(start);
        let at = |us: u64| start + Duration::from_micros(us);
        // Thread 0 would have woken at 0 and 1 ms; it slept through both. Thread 1, awake at
        // 1.2 ms, serves every step due (0, 0.5 and 1 ms), in order, each once.
        assert_eq!(
            [wheel.claim(at(1_200)), wheel.claim(at(1_200)), wheel.claim(at(1_200))],
            [Some(0), Some(1), Some(2)]
        );
        assert_eq!(wheel.claim(at(1_200)), None, "step 3 is due at 1.5 ms");
        // Thread 0 wakes at last: nothing is left for it.
        assert_eq!(wheel.claim(at(1_300)), None);
        assert_eq!(wheel.claim(at(1_500)), Some(3));
        // 100 ms late: step 4 (2 ms) is not sent; the wheel goes on from the step due now.
        assert_eq!(wheel.claim(at(1_500 + 101_000)), Some(205));
        assert_eq!(wheel.claim(at(1_500 + 101_000)), None);
    }
}
