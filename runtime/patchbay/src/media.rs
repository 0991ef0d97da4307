//! The media shell: each call's RTP socket and receive task, and the one clock thread that
//! ticks every call's [`MediaSession`] once per packetisation interval.
//!
//! The clock is a dedicated OS thread, not a tokio timer: flows run on the tokio workers and
//! may keep them busy for a whole CPU slice, and the wire must not notice. Every 2 ms the thread
//! walks one tenth of the live calls (each call at a fixed step of the 20 ms period), takes one
//! short per-call lock to let the session write its packet (and take the caller's next frame for
//! whoever listens), releases it, and sends. See [`clock`] for how it keeps time.
//!
//! RTCP runs on the RTP port + 1 (RFC 3550 §11): the clock sends each call's reports when its
//! session says one is due, and the receive task feeds the peer's reports back.
//!
//! **Not implemented yet:** RTCP multiplexed on the RTP port (RFC 5761), ptime other than the
//! engine's (20 ms: every session is ticked at the same rate, so
//! a call that negotiated 30 ms is sent 20 ms frames — we answer with our ptime, which callers
//! accept), and several clock threads for hosts beyond one core's worth of calls.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use patchbay_host::Dtmf;
use patchbay_media::rtp::{NtpClock, NtpTime};
use patchbay_media::session::{Codec, MAX_PACKET, MAX_RTCP, MediaSession, SessionConfig, SessionEvent, SrtpKeys};
use patchbay_media::{Frame, FramePool};
use tokio::sync::{Notify, mpsc, watch};

/// The engine's packetisation interval.
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

/// One call's media as the shell holds it.
#[derive(Debug)]
pub struct CallMedia {
    session: Mutex<MediaSession>,
    socket: std::net::UdpSocket,
    rtcp_socket: Option<std::net::UdpSocket>,
    sinks: CallSinks,
    /// Receives the caller's audio while a flow has its audio stream open.
    listener: Mutex<Option<mpsc::Sender<Frame>>>,
    /// Whether `listener` is set (read without its lock on every tick).
    listening: AtomicBool,
    closed: AtomicBool,
    close: Notify,
    /// Held while events are taken and delivered, so that key presses and marks reach the
    /// call in the order the session raised them (the clock thread and the receive task both
    /// deliver).
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

    /// Sends the caller's audio to `listener` from now on (`None`: nobody listens; frames are
    /// dropped after the jitter buffer).
    pub fn listen(&self, listener: Option<mpsc::Sender<Frame>>) {
        let mut slot = self.listener.lock().unwrap_or_else(PoisonError::into_inner);
        self.listening.store(listener.is_some(), Ordering::Relaxed);
        *slot = listener;
    }

    /// Stops the media: the receive task ends, the clock forgets the call.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.close.notify_one();
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

    /// Runs one tick; returns whether a packet was sent.
    fn tick(&self, now: Instant, ntp: &NtpClock, out: &mut Buffers, stats: &ClockStats) -> bool {
        let (packet, report, frame, events) = {
            let mut session = self.lock();
            let packet = session.tick(now, &mut out.rtp);
            let report = match self.rtcp_socket {
                Some(_) => session.rtcp_tick(now, ntp.at(now), &mut out.rtcp),
                None => None,
            };
            // The jitter buffer's playout runs on this clock whether or not anybody listens.
            (packet, report, session.take_received(now), session.has_events())
        };
        if let (Some((to, len)), Some(rtcp)) = (report, &self.rtcp_socket) {
            let _ = rtcp.send_to(&out.rtcp[..len], to);
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
            let listener = self.listener.lock().unwrap_or_else(PoisonError::into_inner).clone();
            if let Some(listener) = listener {
                // A flow that does not keep up loses audio, never the clock.
                let _ = listener.try_send(frame);
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
    /// Steps of the wheel run (ten per ptime).
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
    /// given, RTCP on `rtcp_socket` (the port + 1): registers it with the clock and spawns its
    /// receive task on the current tokio runtime.
    pub fn start_call(
        &self,
        session: MediaSession,
        socket: std::net::UdpSocket,
        rtcp_socket: Option<std::net::UdpSocket>,
        sinks: CallSinks,
    ) -> std::io::Result<Arc<CallMedia>> {
        socket.set_nonblocking(true)?;
        let receiver = tokio::net::UdpSocket::from_std(socket.try_clone()?)?;
        let rtcp_receiver = match &rtcp_socket {
            Some(rtcp) => {
                rtcp.set_nonblocking(true)?;
                Some(tokio::net::UdpSocket::from_std(rtcp.try_clone()?)?)
            }
            None => None,
        };
        let media = Arc::new(CallMedia {
            session: Mutex::new(session),
            socket,
            rtcp_socket,
            sinks,
            listener: Mutex::new(None),
            listening: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            close: Notify::new(),
            dispatching: Mutex::new(()),
        });
        let clock = self.next_clock.fetch_add(1, Ordering::Relaxed) % self.register.len();
        self.register[clock]
            .send(Arc::clone(&media))
            .map_err(|_| std::io::Error::other("the media clock thread has stopped"))?;
        tokio::spawn(receive(Arc::clone(&media), receiver, rtcp_receiver));
        Ok(media)
    }
}

/// A call's receive loop: every datagram on its RTP port goes through its session.
async fn receive(media: Arc<CallMedia>, socket: tokio::net::UdpSocket, rtcp: Option<tokio::net::UdpSocket>) {
    let mut buf = [0u8; 2048];
    let mut rtcp_buf = [0u8; 1500];
    let ntp = wall_clock();
    loop {
        let rtcp_received = async {
            match &rtcp {
                Some(rtcp) => rtcp.recv_from(&mut rtcp_buf).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            received = socket.recv_from(&mut buf) => {
                if media.closed.load(Ordering::Acquire) {
                    return;
                }
                match received {
                    Ok((len, from)) => {
                        let now = Instant::now();
                        let events = {
                            let mut session = media.lock();
                            session.receive(now, from, &mut buf[..len]);
                            session.has_events()
                        };
                        if events {
                            media.dispatch();
                        }
                    }
                    // ICMP port unreachable from an earlier send, and the like: keep listening.
                    Err(e) => tracing::trace!("rtp receive: {e}"),
                }
            }
            received = rtcp_received => {
                if let Ok((len, from)) = received {
                    let now = Instant::now();
                    media.lock().receive_rtcp(now, ntp.at(now), from, &mut rtcp_buf[..len]);
                }
            }
            () = media.close.notified() => return,
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
            ptime_ms: PTIME.as_millis() as u32,
            remote,
            ssrc: random as u32,
            initial_sequence: (random >> 32) as u16,
            initial_timestamp: (random >> 16) as u32,
            inactivity_timeout,
            inband_dtmf: negotiated.telephone_event.is_none(),
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

/// Steps of the clock's wheel per period: a call belongs to one step and is served at the same
/// offset in every period.
const SLOTS: usize = 10;

/// Clock threads; each owns the calls dealt to it and runs its own wheel, the second offset by
/// half a step so that their bursts of sends interleave rather than coincide. Two halve each
/// step's burst at 2,000 calls and let a second core send while one thread is late (figures in
/// BENCHMARKS.md).
const CLOCK_THREADS: usize = 2;

/// A clock thread (`index` of [`CLOCK_THREADS`]): ticks every call dealt to it once per
/// [`PTIME`].
///
/// No timer per call, and a wheel of [`SLOTS`] steps (2 ms at 20 ms ptime): each
/// new call joins the emptiest step, and each wake-up serves only its step's calls. Serving all
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
    let mut slots: Vec<Vec<Arc<CallMedia>>> = vec![Vec::new(); SLOTS];
    let step = PTIME / SLOTS as u32;
    let mut slot = 0;
    let mut out = Buffers { rtp: [0u8; MAX_PACKET], rtcp: [0u8; MAX_RTCP] };
    let ntp = wall_clock();
    let mut deadline = Instant::now() + step * index as u32 / CLOCK_THREADS as u32;
    let mut departures: Vec<(usize, Instant)> = Vec::new();
    loop {
        loop {
            match register.try_recv() {
                Ok(call) => {
                    if let Some(emptiest) = slots.iter_mut().min_by_key(|s| s.len()) {
                        emptiest.push(call);
                    }
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
        for call in calls.iter() {
            if call.tick(now, &ntp, &mut out, stats) && record {
                departures.push((Arc::as_ptr(call) as usize, Instant::now()));
            }
        }
        if !departures.is_empty() {
            stats.departures.lock().unwrap_or_else(PoisonError::into_inner).append(&mut departures);
        }
        slot = (slot + 1) % SLOTS;
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
