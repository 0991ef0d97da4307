//! The media shell: each call's RTP socket, and the clock threads that tick every call's
//! [`MediaSession`] once per packetisation interval.
//!
//! The clock is a dedicated OS thread, not a tokio timer: flows run on the tokio workers and
//! may keep them busy for a whole CPU slice, and the wire must not notice. Every 2 ms a thread
//! walks one tenth of its calls (each call at a fixed step of the 20 ms period); for each it
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
//! every other turn of its wheel (240 ms; reports come every few seconds and carry their own
//! timing).
//!
//! Each call is paced at its own negotiated ptime (10, 20, 30 or 40 ms; `[media] ptime_ms` is
//! ours, 20 by default): the wheel turns in 2 ms steps over 120 ms, and a call sits in every
//! (ptime / 2 ms)-th step.
//!
//! **Not implemented yet:** a number of clock threads that follows the host's cores (two,
//! whatever the host).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use patchbay_host::Dtmf;
use patchbay_media::rtp::{NtpClock, NtpTime};
use patchbay_media::session::{Codec, MAX_PACKET, MAX_RTCP, MediaSession, SessionConfig, SessionEvent, SrtpKeys};
use patchbay_media::{Frame, FramePool};
use patchbay_udp::{ArrivalClock, Batch};
use tokio::sync::{mpsc, watch};

/// The default packetisation interval (ours in SDP unless `[media] ptime_ms` says otherwise).
pub const PTIME: Duration = Duration::from_millis(20);

/// Frames buffered between the clock and a flow reading the caller's audio (1 s).
pub const FLOW_AUDIO_QUEUE: usize = 50;

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
        handed_over: Option<crate::agent::HandOffTimes>,
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
                if let Some(times) = handed_over {
                    times.lock().unwrap_or_else(PoisonError::into_inner).push_back(std::time::Instant::now());
                }
                // Fails only once the agent's writer has ended, which its session notices itself.
                let _ = sender.send_media(&mulaw[..n]);
            }
        }
    }
}

/// One call's media as the shell holds it.
#[derive(Debug)]
pub struct CallMedia {
    /// The call's packetisation interval, as the clock paces it.
    ptime_ms: u32,
    session: Mutex<MediaSession>,
    socket: std::net::UdpSocket,
    rtcp_socket: Option<std::net::UdpSocket>,
    sinks: CallSinks,
    /// Receives the caller's audio while a flow has its audio stream open.
    listener: Mutex<Option<Listener>>,
    /// Whether `listener` is set (read without its lock on every tick).
    listening: AtomicBool,
    closed: AtomicBool,
    /// Held while events are taken and delivered, so that key presses and marks reach the
    /// call in the order the session raised them (the clock thread and the flow's commands
    /// both deliver).
    dispatching: Mutex<()>,
}

impl CallMedia {
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

    /// Runs one tick: takes in what arrived, sends what is due. Returns whether a packet was
    /// sent.
    fn tick(&self, now: Instant, ntp: &NtpClock, out: &mut Buffers, stats: &ClockStats, rtcp_due: bool) -> bool {
        let arrivals = ArrivalClock::now();
        let (packet, report, frame, events, mux) = {
            let mut session = self.lock();
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
            let packet = session.tick(now, &mut out.rtp);
            let report = match (&self.rtcp_socket, mux) {
                (Some(_), _) | (None, true) => session.rtcp_tick(now, ntp.at(now), &mut out.rtcp),
                (None, false) => None,
            };
            // The jitter buffer's playout runs on this clock whether or not anybody listens.
            (packet, report, session.take_received(now), session.has_events(), mux)
        };
        let rtcp_out = if mux { Some(&self.socket) } else { self.rtcp_socket.as_ref() };
        if let (Some((to, len)), Some(socket)) = (report, rtcp_out) {
            let _ = socket.send_to(&out.rtcp[..len], to);
        }
        let out = &out.rtp;
        let sent = match packet {
            Some((to, len)) => match self.socket.send_to(&out[..len], to) {
                Ok(_) => {
                    stats.sent.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(_) => {
                    stats.send_errors.fetch_add(1, Ordering::Relaxed);
                    false
                }
            },
            None => false,
        };
        if let Some(frame) = frame
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
        sent
    }
}

/// How the shared clock is doing.
#[derive(Debug, Default)]
pub struct ClockStats {
    /// Steps of the wheel run (one per 2 ms).
    pub ticks: AtomicU64,
    /// Packets sent.
    pub sent: AtomicU64,
    /// Sends that failed (socket buffer full, unreachable).
    pub send_errors: AtomicU64,
    /// Latest tick start after its deadline, in microseconds.
    pub max_late_us: AtomicU64,
    /// Steps that started more than 1 ms after their deadline.
    pub late_ticks: AtomicU64,
    /// For benchmarks: when set, the clock records when each call's packet left.
    pub record_departures: AtomicBool,
    /// The recorded departures: (call, time).
    pub departures: Mutex<Vec<(usize, Instant)>>,
}

/// The media engine: the frame pool and the clock thread.
#[derive(Debug, Clone)]
pub struct MediaEngine {
    pool: FramePool,
    /// One registration channel per clock thread; calls are dealt round robin.
    register: Arc<[std::sync::mpsc::Sender<Arc<CallMedia>>]>,
    next_clock: Arc<std::sync::atomic::AtomicUsize>,
    stats: Arc<ClockStats>,
}

impl MediaEngine {
    /// Starts the clock threads.
    pub fn start() -> std::io::Result<Self> {
        let stats = Arc::new(ClockStats::default());
        let mut register = Vec::with_capacity(CLOCK_THREADS);
        for index in 0..CLOCK_THREADS {
            let (sender, calls) = std::sync::mpsc::channel();
            let thread_stats = Arc::clone(&stats);
            std::thread::Builder::new()
                .name(format!("patchbay-media-clock-{index}"))
                .spawn(move || clock(calls, &thread_stats, index))?;
            register.push(sender);
        }
        let register = register.into();
        Ok(Self { pool: FramePool::new(16_384), register, next_clock: Arc::default(), stats })
    }

    /// The frame pool every call shares.
    pub fn pool(&self) -> &FramePool {
        &self.pool
    }

    /// The clock's counters.
    pub fn stats(&self) -> &ClockStats {
        &self.stats
    }

    /// Starts a call's media on `socket` (already bound: its port is in our SDP) and, when
    /// given, RTCP on `rtcp_socket` (the port + 1): registers it with a clock thread, which
    /// reads and writes both sockets from then on.
    pub fn start_call(
        &self,
        session: MediaSession,
        socket: std::net::UdpSocket,
        rtcp_socket: Option<std::net::UdpSocket>,
        sinks: CallSinks,
    ) -> std::io::Result<Arc<CallMedia>> {
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
            session: Mutex::new(session),
            socket,
            rtcp_socket,
            sinks,
            listener: Mutex::new(None),
            listening: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            dispatching: Mutex::new(()),
        });
        let clock = self.next_clock.fetch_add(1, Ordering::Relaxed) % self.register.len();
        self.register[clock]
            .send(Arc::clone(&media))
            .map_err(|_| std::io::Error::other("the media clock thread has stopped"))?;
        Ok(media)
    }
}

/// Datagrams a clock thread reads from one socket per system call.
const INBOX: usize = 8;

/// The peer's RTCP is read every this many turns of the wheel (240 ms).
const RTCP_EVERY: u64 = 2;

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

/// The media session for what an offer/answer exchange agreed (either side of it). `random`
/// seeds the SSRC and the initial sequence number and timestamp (RFC 3550 §5.1).
pub fn session_for(
    negotiated: &patchbay_sip::sdp::Negotiated,
    pool: &FramePool,
    inactivity_timeout: Option<Duration>,
    random: u64,
) -> MediaSession {
    let codec = match negotiated.codec.codec {
        patchbay_sip::sdp::AudioCodec::Pcma => Codec::Pcma,
        _ => Codec::Pcmu,
    };
    let remote = (!negotiated.remote_rtp.ip().is_unspecified()).then_some(negotiated.remote_rtp);
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
            ptime_ms: u32::from(negotiated.ptime),
            remote,
            ssrc: random as u32,
            initial_sequence: (random >> 32) as u16,
            initial_timestamp: (random >> 16) as u32,
            inactivity_timeout,
            inband_dtmf: negotiated.telephone_event.is_none(),
            rtcp_mux: negotiated.rtcp_mux,
            jitter: Default::default(),
            srtp,
        },
        pool.clone(),
    );
    session.set_hold(!negotiated.direction.receives() || remote.is_none());
    session.set_sending(negotiated.direction.sends());
    session
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

/// One step of the clock's wheel.
const STEP: Duration = Duration::from_millis(2);

/// Steps in one turn of the wheel: 120 ms, the least common multiple of the ptimes a call can
/// have (10, 20, 30, 40 ms), so that every call is served at the same offsets in every turn.
const WHEEL_STEPS: usize = 60;

/// Puts `call` (paced every `ptime_ms`: 10, 20, 30 or 40, as [`MediaSession`] rounds it) on the
/// wheel: in every (ptime / 2 ms)-th step from the offset whose steps hold the fewest calls. Its
/// first step in a turn is therefore the one below ptime / 2 ms.
fn place<T: Clone>(slots: &mut [Vec<T>], call: T, ptime_ms: u32) {
    let every = (ptime_ms / 2).max(1) as usize;
    let load = |offset: usize| slots.iter().skip(offset).step_by(every).map(Vec::len).sum::<usize>();
    let offset = (0..every).min_by_key(|&o| load(o)).unwrap_or(0);
    for at in (offset..slots.len()).step_by(every) {
        slots[at].push(call.clone());
    }
}

/// Clock threads; each owns the calls dealt to it and runs its own wheel, the second offset by
/// half a step so that their bursts of sends interleave rather than coincide. Two halve each
/// step's burst at 2,000 calls and let a second core send while one thread is late (figures in
/// BENCHMARKS.md).
const CLOCK_THREADS: usize = 2;

/// A clock thread (`index` of [`CLOCK_THREADS`]): ticks every call dealt to it once per its
/// ptime.
///
/// No timer per call, and a wheel of [`WHEEL_STEPS`] steps of 2 ms: a call of ptime P sits in
/// every (P / 2 ms)-th step from the offset where its steps are least loaded, and each wake-up
/// serves only its step's calls. Serving all
/// calls back to back at one deadline (tried first) takes milliseconds of `sendto` for 2,000 calls on
/// a small VM, and the last calls' packets then wander by milliseconds from one period to the
/// next; spreading them keeps each call at a fixed offset, give or take one step's work. Finer
/// steps (1 ms) were slower again on a VM, where every extra wake-up risks a late one (figures
/// in BENCHMARKS.md). Deadlines are absolute (a late step does not shift the ones after it), and
/// a clock that falls far behind (a suspended VM) starts over instead of bursting. Spinning
/// before each deadline to beat slow wake-ups was tried and dropped: it made stalls more
/// frequent on this project's 2-vCPU VM.
fn clock(register: std::sync::mpsc::Receiver<Arc<CallMedia>>, stats: &ClockStats, index: usize) {
    realtime_priority();
    let mut slots: Vec<Vec<Arc<CallMedia>>> = vec![Vec::new(); WHEEL_STEPS];
    let step = STEP;
    let mut slot = 0;
    let mut out = Buffers { rtp: [0u8; MAX_PACKET], rtcp: [0u8; MAX_RTCP], inbox: Batch::new(INBOX) };
    // Turns of the wheel; the peer's RTCP is read every RTCP_EVERY-th.
    let mut cycle: u64 = 0;
    let ntp = wall_clock();
    let mut deadline = Instant::now() + step * index as u32 / CLOCK_THREADS as u32;
    let mut departures: Vec<(usize, Instant)> = Vec::new();
    loop {
        loop {
            match register.try_recv() {
                Ok(call) => {
                    let ptime_ms = call.ptime_ms;
                    place(&mut slots, call, ptime_ms);
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    if slots.iter().all(Vec::is_empty) {
                        return;
                    }
                    break;
                }
            }
        }
        let calls = &mut slots[slot];
        calls.retain(|c| !c.closed.load(Ordering::Acquire));
        let now = Instant::now();
        let late = now.saturating_duration_since(deadline).as_micros() as u64;
        stats.max_late_us.fetch_max(late, Ordering::Relaxed);
        if late > 1_000 {
            stats.late_ticks.fetch_add(1, Ordering::Relaxed);
        }
        stats.ticks.fetch_add(1, Ordering::Relaxed);
        let record = stats.record_departures.load(Ordering::Relaxed);
        let rtcp_turn = cycle.is_multiple_of(RTCP_EVERY);
        for call in calls.iter() {
            // A call's RTCP port is read at its first step of the turn.
            let first = slot < (call.ptime_ms / 2) as usize;
            if call.tick(now, &ntp, &mut out, stats, rtcp_turn && first) && record {
                departures.push((Arc::as_ptr(call) as usize, Instant::now()));
            }
        }
        if !departures.is_empty() {
            stats.departures.lock().unwrap_or_else(PoisonError::into_inner).append(&mut departures);
        }
        slot = (slot + 1) % WHEEL_STEPS;
        if slot == 0 {
            cycle += 1;
        }
        // An idle host wakes once per period, not once per step.
        deadline += if slots.iter().all(Vec::is_empty) { PTIME } else { step };
        let after = Instant::now();
        if after > deadline + PTIME * 5 {
            // Far behind (the machine was suspended or starved): start over from now rather
            // than sending a burst of stale frames.
            deadline = after + step;
        }
        if let Some(wait) = deadline.checked_duration_since(after) {
            std::thread::sleep(wait);
        }
    }
}

/// Asks the kernel to run the clock thread with a real-time priority (`SCHED_FIFO`), as media
/// servers do (FreeSWITCH's `-rp`): then the flows' threads, logging or a busy tokio worker
/// cannot preempt it mid-tick. Needs `CAP_SYS_NICE` (or root); without it the clock runs at the
/// normal priority and says so once.
fn realtime_priority() {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: sets the calling thread's scheduling policy; `param` outlives the call.
    let result = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
    if result == 0 {
        tracing::debug!("media clock runs with real-time priority (SCHED_FIFO 10)");
    } else {
        tracing::info!(
            "media clock runs at normal priority (no permission for SCHED_FIFO; grant CAP_SYS_NICE for steadier pacing)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{WHEEL_STEPS, place};

    /// The steps (2 ms each) at which `call` is served in one turn.
    fn steps(slots: &[Vec<u32>], call: u32) -> Vec<usize> {
        (0..slots.len()).filter(|&i| slots[i].contains(&call)).collect()
    }

    #[test]
    fn each_ptime_is_served_once_per_ptime_at_the_least_loaded_offset() {
        let mut slots: Vec<Vec<u32>> = vec![Vec::new(); WHEEL_STEPS];
        for (call, ptime) in [(1, 20), (2, 20), (3, 10), (4, 30), (5, 40)] {
            place(&mut slots, call, ptime);
        }
        for (call, ptime) in [(1u32, 20usize), (2, 20), (3, 10), (4, 30), (5, 40)] {
            let at = steps(&slots, call);
            assert_eq!(at.len(), 120 / ptime, "call {call}: once per {ptime} ms in a 120 ms turn");
            assert!(at.windows(2).all(|w| w[1] - w[0] == ptime / 2), "call {call} at {at:?}");
            // The clock reads RTCP at the one step below ptime / 2 ms.
            assert_eq!(at.iter().filter(|&&s| s < ptime / 2).count(), 1, "call {call} at {at:?}");
        }
        // The second 20 ms call avoids the first one's steps; the 10 ms call avoids both.
        assert_ne!(steps(&slots, 1)[0], steps(&slots, 2)[0]);
        let busy: Vec<usize> = steps(&slots, 1).into_iter().chain(steps(&slots, 2)).collect();
        assert!(steps(&slots, 3).iter().all(|s| !busy.contains(s)), "{busy:?} {:?}", steps(&slots, 3));
    }
}
