//! Media engine benchmarks. Reproduce with:
//!
//! ```sh
//! cargo bench -p patchbay-media --bench media
//! ```
//!
//! Everything runs on a virtual clock (20 ms per packet) with no sockets: the figures are the
//! sans-IO core's CPU cost, without the `recvmmsg`/`sendto` the shell adds per datagram.
//!
//! - `echo/rtp`: one packet through a [`MediaSession`] as the echo flow drives it — `receive` of
//!   a 172-byte PCMU RTP packet (sequence number and timestamp advancing), `take_received` (the
//!   jitter buffer's frame for this interval), `play` of that frame, and `tick` writing the
//!   outgoing packet (target ≤ 1 µs), with packets arriving exactly every 20 ms.
//!   `echo/rtp_jitter` is the same with a network delay of 0–4 ms per packet (pseudo-random,
//!   in order), so the jitter buffer sees varying transit times. `echo/srtp` is the same call with
//!   `AES_CM_128_HMAC_SHA1_80` in both directions: the 182-byte packet is authenticated and
//!   decrypted on the way in, encrypted and tagged on the way out. The incoming packets are
//!   written by a peer session in the untimed setup of `iter_batched_ref` (SRTP packets cannot
//!   be replayed, so they are made fresh, 256 at a time);
//! - `tick_silence/{rtp,srtp}`: `tick` of a session with nothing queued, which writes a packet
//!   of encoded silence — what the shared clock pays per call every 20 ms while a flow thinks;
//! - `g711/{ulaw,alaw}_{encode,decode}`: one 160-sample frame (20 ms) through the slice helpers
//!   of [`g711`], cycling over one second of a synthetic speech-like signal; `time` is per frame
//!   and `thrpt` is samples per second (`Throughput::Elements(160)`);
//! - `rfc4733/receiver`: one telephone-event packet into a [`DtmfReceiver`] — payload parse,
//!   `handle_packet`, events drained — over a stream of key presses (five updates and three end
//!   packets each); `rfc4733/session_receive` is the same packets, with their RTP header, through
//!   [`MediaSession::receive`] (parse, latching, receive statistics, DTMF, events drained).
//!
//! Per-packet benchmarks report `Throughput::Elements(1)`, so `thrpt` is packets per second on
//! one core. Before the timed runs the bench checks that the echo really echoes (every packet
//! out after the first carries the peer's audio; SRTP packets authenticate at the peer) and
//! prints the heap allocations per iteration of each session path, counted by a wrapping global
//! allocator (CONVENTIONS §5: the per-packet path should not allocate).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput};
use patchbay_media::dtmf::{DtmfReceiver, DtmfReceiverConfig, TelephoneEvent};
use patchbay_media::g711;
use patchbay_media::jitter::JitterConfig;
use patchbay_media::rtp::{RtpHeader, RtpPacket};
use patchbay_media::session::{Codec, MAX_PACKET, MediaSession, SessionConfig, SessionEvent, SrtpKeys};
use patchbay_media::srtp::{MasterKey, SrtpProfile};
use patchbay_media::{AudioEncoding, Frame, FramePool};

/// Counts heap allocations while [`COUNTING`] is on; otherwise one relaxed load per call.
struct CountingAllocator;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which we pass on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout (see `alloc`).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as for `alloc` and `dealloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Heap allocations per call of `step`, over `n` calls.
fn allocations_per_call(n: u32, mut step: impl FnMut()) -> f64 {
    ALLOCATIONS.store(0, Ordering::Relaxed);
    COUNTING.store(true, Ordering::Relaxed);
    for _ in 0..n {
        step();
    }
    COUNTING.store(false, Ordering::Relaxed);
    ALLOCATIONS.load(Ordering::Relaxed) as f64 / f64::from(n)
}

const MS20: Duration = Duration::from_millis(20);
/// Fresh SRTP packets are made this many at a time, outside the timing.
const BATCH: u64 = 256;
const TELEPHONE_EVENT: u8 = 101;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn config(remote: SocketAddr, ssrc: u32, srtp: Option<SrtpKeys>) -> SessionConfig {
    SessionConfig {
        codec: Codec::Pcmu,
        payload_type: 0,
        telephone_event: Some(TELEPHONE_EVENT),
        comfort_noise: None,
        ptime_ms: 20,
        remote: Some(remote),
        ssrc,
        initial_sequence: ssrc as u16,
        initial_timestamp: ssrc.rotate_left(7),
        inactivity_timeout: Some(Duration::from_secs(60)),
        inband_dtmf: false,
        rtcp_mux: false,
        remote_rtcp: None,
        jitter: JitterConfig::default(),
        srtp,
    }
}

/// Two ends of one call: `ours` is benchmarked, `peer` writes what `ours` receives.
struct Call {
    ours: MediaSession,
    peer: MediaSession,
    ours_addr: SocketAddr,
    peer_addr: SocketAddr,
}

fn call(srtp: bool) -> Call {
    let (ours_addr, peer_addr) = (addr("127.0.0.1:40000"), addr("192.0.2.10:4000"));
    let keys = srtp.then(|| {
        let profile = SrtpProfile::from_name("AES_CM_128_HMAC_SHA1_80").expect("profile");
        let ours = MasterKey::from_concatenated(&[0x5a; 30]);
        let peer = MasterKey::from_concatenated(&[0xa5; 30]);
        (
            SrtpKeys { profile, local: ours.clone(), remote: peer.clone() },
            SrtpKeys { profile, local: peer, remote: ours },
        )
    });
    let (ours_keys, peer_keys) = keys.map_or((None, None), |(o, p)| (Some(o), Some(p)));
    Call {
        ours: MediaSession::new(config(peer_addr, 0x1234_5678, ours_keys), FramePool::new(64)),
        peer: MediaSession::new(config(ours_addr, 0x0bad_cafe, peer_keys), FramePool::new(64)),
        ours_addr,
        peer_addr,
    }
}

/// A datagram as it arrives, with its arrival time on the virtual clock.
struct Datagram {
    now: Instant,
    len: usize,
    buf: [u8; MAX_PACKET],
}

/// 20 ms of μ-law "speech" (a 440 Hz tone at a moderate level), the peer's audio.
fn voice_frame(pool: &FramePool) -> Frame {
    let pcm: Vec<i16> = (0..160)
        .map(|i| (6_000.0 * (f32::from(i as u16) * 440.0 * std::f32::consts::TAU / 8_000.0).sin()) as i16)
        .collect();
    let mut octets = [0u8; 160];
    g711::encode_ulaw(&pcm, &mut octets);
    pool.g711(AudioEncoding::Pcmu, &octets, 0).expect("a whole frame")
}

/// The peer's sending clock and the network between us.
struct Wire {
    /// When the peer sends its next packet (every 20 ms).
    sent: Instant,
    /// Xorshift state for a network delay of 0–4 ms per packet, or `None` for none at all.
    jitter: Option<u32>,
}

impl Wire {
    fn new(jitter: bool) -> Self {
        Self { sent: Instant::now(), jitter: jitter.then_some(0x9e37_79b9) }
    }

    /// The next packet's send time and arrival time. The delay is below one packet interval,
    /// so packets arrive in order.
    fn next(&mut self) -> (Instant, Instant) {
        self.sent += MS20;
        let delay = self.jitter.as_mut().map_or(0, |x| {
            *x ^= *x << 13;
            *x ^= *x >> 17;
            *x ^= *x << 5;
            *x % 4_000
        });
        (self.sent, self.sent + Duration::from_micros(u64::from(delay)))
    }
}

/// The peer's next packet: it plays `voice` and its clock ticks (20 ms later than the last).
fn peer_packet(peer: &mut MediaSession, voice: &Frame, wire: &mut Wire) -> Datagram {
    let (sent, arrives) = wire.next();
    peer.play(voice.clone()).expect("the peer's queue has room");
    let mut datagram = Datagram { now: arrives, len: 0, buf: [0; MAX_PACKET] };
    let (_, len) = peer.tick(sent, &mut datagram.buf).expect("the peer knows where to send");
    datagram.len = len;
    datagram
}

/// One echo iteration: the packet in, the jitter buffer's frame for this interval played back,
/// the clock's tick writing the packet out.
fn echo(ours: &mut MediaSession, from: SocketAddr, datagram: &mut Datagram, out: &mut [u8; MAX_PACKET]) -> usize {
    ours.receive(datagram.now, from, &mut datagram.buf[..datagram.len]);
    if let Some(frame) = ours.take_received(datagram.now) {
        ours.play(frame).expect("the echo queue has room");
    }
    ours.tick(datagram.now, out).map_or(0, |(_, len)| len)
}

/// Runs the echo for a while outside the timing and checks that it echoes: every packet out
/// after the jitter buffer's first interval carries the peer's audio, and (SRTP) authenticates
/// at the peer.
fn check_echo(call: &mut Call, srtp: bool, voice: &Frame, wire: &mut Wire) {
    let mut out = [0u8; MAX_PACKET];
    let mut voiced = 0;
    for i in 0..200 {
        let mut datagram = peer_packet(&mut call.peer, voice, wire);
        let len = echo(&mut call.ours, call.peer_addr, &mut datagram, &mut out);
        let peer_received = call.peer.stats().received;
        // The peer decrypts in place; what it accepted is plain RTP afterwards.
        call.peer.receive(datagram.now, call.ours_addr, &mut out[..len]);
        assert_eq!(call.peer.stats().received, peer_received + 1, "packet {i} accepted by the peer");
        assert_eq!(len, if srtp { 12 + 160 + 10 } else { 12 + 160 });
        if RtpPacket::parse(&out[..12 + 160]).expect("RTP").payload == voice.octets() {
            voiced += 1;
        }
        let _ = call.peer.take_received(datagram.now);
    }
    let stats = call.ours.stats();
    assert_eq!((stats.received, stats.dropped, stats.srtp_failures), (200, 0, 0));
    assert_eq!(stats.silence_sent, 1, "only the jitter buffer's first interval is silence");
    assert_eq!(voiced, 199, "every packet after the first echoes the peer's audio");
    while call.ours.poll_event().is_some() {}
}

fn bench_session(c: &mut Criterion) {
    let mut group = c.benchmark_group("echo");
    group.throughput(Throughput::Elements(1));
    for (name, srtp, jitter) in [("rtp", false, false), ("rtp_jitter", false, true), ("srtp", true, false)] {
        let mut call = call(srtp);
        let voice = voice_frame(&FramePool::new(1));
        let mut wire = Wire::new(jitter);
        check_echo(&mut call, srtp, &voice, &mut wire);
        let mut out = [0u8; MAX_PACKET];
        let Call { ours, peer, peer_addr, .. } = &mut call;
        let from = *peer_addr;
        let mut datagrams: Vec<Datagram> = (0..10_000).map(|_| peer_packet(peer, &voice, &mut wire)).collect();
        let mut iter = datagrams.iter_mut();
        let allocations = allocations_per_call(10_000, || {
            let datagram = iter.next().expect("one per call");
            black_box(echo(ours, from, datagram, &mut out));
        });
        println!("echo/{name}: {allocations:.2} heap allocations per packet");
        group.bench_function(name, |b| {
            b.iter_batched_ref(
                || peer_packet(peer, &voice, &mut wire),
                |datagram| echo(ours, from, datagram, &mut out),
                BatchSize::NumIterations(BATCH),
            )
        });
        let stats = ours.stats();
        assert_eq!((stats.dropped, stats.srtp_failures), (0, 0), "every packet was accepted");
        assert_eq!(stats.silence_sent, 1, "the echo never fell back to silence");
    }
    group.finish();

    let mut group = c.benchmark_group("tick_silence");
    group.throughput(Throughput::Elements(1));
    for srtp in [false, true] {
        let Call { ours: mut session, .. } = call(srtp);
        let mut now = Instant::now();
        let mut out = [0u8; MAX_PACKET];
        let mut step = || {
            now += MS20;
            session.tick(now, &mut out).map_or(0, |(_, len)| len)
        };
        assert_eq!(step(), if srtp { 182 } else { 172 }, "a whole packet of silence");
        let allocations = allocations_per_call(10_000, || {
            black_box(step());
        });
        let name = if srtp { "srtp" } else { "rtp" };
        println!("tick_silence/{name}: {allocations:.2} heap allocations per tick");
        group.bench_function(name, |b| b.iter(&mut step));
    }
    group.finish();
}

/// One second of a synthetic speech-like signal: two partials under a syllable-rate envelope
/// that sweeps the whole G.711 range, cut into 20 ms frames.
fn speech_frames() -> Vec<[i16; 160]> {
    (0..50)
        .map(|f| {
            std::array::from_fn(|i| {
                let t = (f * 160 + i) as f32 / 8_000.0;
                let envelope = 0.02 + 0.9 * (t * 4.0 * std::f32::consts::PI).sin().abs();
                let tone =
                    0.7 * (t * 220.0 * std::f32::consts::TAU).sin() + 0.3 * (t * 1_330.0 * std::f32::consts::TAU).sin();
                (32_000.0 * envelope * tone) as i16
            })
        })
        .collect()
}

fn bench_g711(c: &mut Criterion) {
    let linear = speech_frames();
    let ulaw: Vec<[u8; 160]> = linear
        .iter()
        .map(|f| {
            let mut o = [0u8; 160];
            g711::encode_ulaw(f, &mut o);
            o
        })
        .collect();
    let alaw: Vec<[u8; 160]> = linear
        .iter()
        .map(|f| {
            let mut o = [0u8; 160];
            g711::encode_alaw(f, &mut o);
            o
        })
        .collect();
    let mut group = c.benchmark_group("g711");
    group.throughput(Throughput::Elements(160));
    let mut encoded = [0u8; 160];
    let mut decoded = [0i16; 160];
    type Encode = fn(&[i16], &mut [u8]) -> usize;
    type Decode = fn(&[u8], &mut [i16]) -> usize;
    for (name, encode) in [("ulaw_encode", g711::encode_ulaw as Encode), ("alaw_encode", g711::encode_alaw)] {
        let mut frames = linear.iter().cycle();
        group.bench_function(name, |b| {
            b.iter(|| encode(black_box(frames.next().expect("cycles")), black_box(&mut encoded)))
        });
    }
    for (name, decode, input) in
        [("ulaw_decode", g711::decode_ulaw as Decode, &ulaw), ("alaw_decode", g711::decode_alaw, &alaw)]
    {
        let mut frames = input.iter().cycle();
        group.bench_function(name, |b| {
            b.iter(|| decode(black_box(frames.next().expect("cycles")), black_box(&mut decoded)))
        });
    }
    group.finish();
}

/// The telephone-event packets of a stream of key presses, one after the other: per press a
/// start, four updates and three end packets 20 ms apart (RFC 4733 §2.5.1), all carrying the
/// press's timestamp; presses 400 ms apart on the media clock.
struct KeyPresses {
    packet: u64,
    sequence: u16,
    now: Instant,
}

impl KeyPresses {
    const PER_PRESS: u64 = 8;

    fn new() -> Self {
        Self { packet: 0, sequence: 1_000, now: Instant::now() }
    }

    fn next(&mut self) -> (Instant, RtpHeader, [u8; TelephoneEvent::LEN]) {
        let (press, i) = (self.packet / Self::PER_PRESS, self.packet % Self::PER_PRESS);
        self.packet += 1;
        self.sequence = self.sequence.wrapping_add(1);
        self.now += MS20;
        let end = i >= 5;
        let event =
            TelephoneEvent { event: (press % 16) as u8, end, volume: 10, duration: 160 * (i.min(5) as u16 + 1) };
        let mut payload = [0u8; TelephoneEvent::LEN];
        event.write(&mut payload).expect("four octets");
        let header = RtpHeader {
            marker: i == 0,
            payload_type: TELEPHONE_EVENT,
            sequence: self.sequence,
            timestamp: 3_200u32.wrapping_mul(press as u32),
            ssrc: 0x0bad_cafe,
        };
        (self.now, header, payload)
    }

    fn datagram(&mut self) -> Datagram {
        let (now, header, payload) = self.next();
        let mut datagram = Datagram { now, len: 0, buf: [0; MAX_PACKET] };
        datagram.len = header.write(&payload, &mut datagram.buf).expect("room for 16 octets");
        datagram
    }
}

fn bench_rfc4733(c: &mut Criterion) {
    let mut group = c.benchmark_group("rfc4733");
    group.throughput(Throughput::Elements(1));

    let mut receiver = DtmfReceiver::new(DtmfReceiverConfig::default());
    let mut presses = KeyPresses::new();
    let handle = |receiver: &mut DtmfReceiver, (now, header, payload): &(Instant, RtpHeader, [u8; 4])| {
        let event = TelephoneEvent::parse(payload).expect("a telephone-event payload");
        receiver.handle_packet(*now, header, event);
        let mut events = 0;
        while receiver.poll_event().is_some() {
            events += 1;
        }
        events
    };
    let events: u32 = (0..8 * 16).map(|_| handle(&mut receiver, &presses.next())).sum();
    assert_eq!(events, 2 * 16, "one press and one release per key press");
    group.bench_function("receiver", |b| {
        b.iter_batched_ref(|| presses.next(), |packet| handle(&mut receiver, packet), BatchSize::NumIterations(BATCH))
    });
    let stats = receiver.stats();
    assert_eq!(stats.presses, stats.packets.div_ceil(KeyPresses::PER_PRESS), "every press heard once");
    assert_eq!((stats.timeouts, stats.superseded), (0, 0));

    let Call { ours: mut session, peer_addr, .. } = call(false);
    let mut presses = KeyPresses::new();
    let receive = |session: &mut MediaSession, datagram: &mut Datagram| {
        session.receive(datagram.now, peer_addr, &mut datagram.buf[..datagram.len]);
        let mut digits = 0;
        while let Some(event) = session.poll_event() {
            digits += u32::from(matches!(event, SessionEvent::Dtmf { .. }));
        }
        digits
    };
    let digits: u32 = (0..8 * 16).map(|_| receive(&mut session, &mut presses.datagram())).sum();
    assert_eq!(digits, 16, "one digit per key press");
    let allocations = allocations_per_call(10_000, || {
        black_box(receive(&mut session, &mut presses.datagram()));
    });
    println!("rfc4733/session_receive: {allocations:.2} heap allocations per packet");
    group.bench_function("session_receive", |b| {
        b.iter_batched_ref(
            || presses.datagram(),
            |datagram| receive(&mut session, datagram),
            BatchSize::NumIterations(BATCH),
        )
    });
    assert_eq!(session.stats().dropped, 0);
    group.finish();
}

fn main() {
    println!("reproduce: cargo bench -p patchbay-media --bench media");
    let mut c = Criterion::default().configure_from_args();
    bench_session(&mut c);
    bench_g711(&mut c);
    bench_rfc4733(&mut c);
    c.final_summary();
}
