//! The generator's RTP side: every stream of every call on one UDP socket, driven by one
//! thread on a 1 ms tick. Each stream sends a 20 ms G.711 packet (or an RFC 4733 key press)
//! in its own 1 ms slot of the 20 ms cycle, so 2,000 streams go out as 100 packets a
//! millisecond rather than in one burst; sends and receives are batched with
//! `sendmmsg`/`recvmmsg` (two system calls per batch, not two per packet).
//!
//! Arrival times come from the kernel (`SO_TIMESTAMPNS`), stamped when the packet reached our
//! socket, so the generator's own scheduling does not show up as the target's jitter; the
//! socket's drop counter (`SO_RXQ_OVFL`) is reported apart from loss on the path.
//!
//! Peers send from the address they advertised (symmetric RTP, RFC 4961), so a packet's source
//! address says which stream it belongs to.
//!
//! The batching and the arrival stamps are `patchbay-udp`'s, the same code Patchbay's media
//! clock reads its sockets with.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use patchbay_media::dtmf::{DtmfDigit, DtmfSender, DtmfSenderConfig, DtmfSequence};
use patchbay_media::rtp::RtpHeader;
use serde::Serialize;

use patchbay_udp::{Batch, Destination};

use crate::stats::Histogram;

/// Packetisation interval: 20 ms, 160 samples at 8 kHz.
pub const PTIME: Duration = Duration::from_millis(20);
const SAMPLES_PER_PACKET: u32 = 160;
/// Ticks per packetisation interval (one tick per ms).
const SLOTS: usize = 20;
const TICK: Duration = Duration::from_millis(1);
/// Messages per `sendmmsg`/`recvmmsg`.
const BATCH: usize = 128;
/// A key press: 100 ms down, 100 ms before the next.
const KEY_MS: u64 = 100;
const KEY_GAP_MS: u64 = 100;

/// One stream to start.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    /// Where to send (and where its packets come from).
    pub remote: SocketAddr,
    /// G.711 payload type the answer chose (0 PCMU, 8 PCMA).
    pub payload_type: u8,
    /// telephone-event payload type, when negotiated.
    pub telephone_event: Option<u8>,
    /// Keys to press, and when (after the stream starts).
    pub keys: Option<(String, Duration)>,
    /// Our SSRC.
    pub ssrc: u32,
}

enum Command {
    Start(usize, StreamSpec),
    Stop(usize),
    Measure(bool),
    Report(mpsc::Sender<EngineReport>, bool),
    Quit,
}

/// What one stream received.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StreamStats {
    /// Packets we sent.
    pub sent: u64,
    /// Packets received.
    pub received: u64,
    /// Sequence numbers missing at the end (received minus the span of sequence numbers seen;
    /// negative with duplicates).
    pub lost: i64,
    /// Packets that arrived after a later one.
    pub reordered: u64,
    /// RFC 3550 §6.4.1 interarrival jitter at the end, in ms.
    pub jitter_ms: f64,
}

/// Everything the engine measured.
#[derive(Debug, Clone, Default)]
pub struct EngineReport {
    /// Per stream, in start order (index = stream id).
    pub streams: Vec<StreamStats>,
    /// How far each packet's arrival was from 20 ms after the previous one of its stream
    /// (consecutive sequence numbers only), while measuring.
    pub gaps: Histogram,
    /// Packets from addresses that belong to no stream.
    pub unknown_source: u64,
    /// Datagrams the kernel dropped because our socket's buffer was full, since the last report.
    pub socket_drops: u64,
    /// Ticks run more than one interval late (the generator fell behind).
    pub late_ticks: u64,
    /// Failed sends.
    pub send_errors: u64,
}

/// Handle to the engine thread.
pub struct RtpEngine {
    commands: mpsc::Sender<Command>,
    local: SocketAddr,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RtpEngine {
    /// Binds the socket at `bind` and starts the thread.
    pub fn start(bind: SocketAddr) -> io::Result<Self> {
        let socket = UdpSocket::bind(bind)?;
        socket.set_nonblocking(true)?;
        let fd = socket.as_raw_fd();
        // A deep queue: 2,000 streams deliver 100 packets a millisecond.
        patchbay_udp::set_buffer_sizes(fd, 16 << 20);
        patchbay_udp::enable_timestamps(fd)?;
        patchbay_udp::enable_drop_counter(fd)?;
        let local = socket.local_addr()?;
        let (commands, rx) = mpsc::channel();
        let thread =
            std::thread::Builder::new().name("loadgen-rtp".into()).spawn(move || Engine::new(socket).run(rx))?;
        Ok(Self { commands, local, thread: Some(thread) })
    }

    /// The address every stream uses (put it in SDP).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Starts stream `id` (ids are small integers handed out in order by the caller).
    pub fn start_stream(&self, id: usize, spec: StreamSpec) {
        let _ = self.commands.send(Command::Start(id, spec));
    }

    /// Stops stream `id`; its figures stay in the report.
    pub fn stop_stream(&self, id: usize) {
        let _ = self.commands.send(Command::Stop(id));
    }

    /// Starts or ends the measurement window for the gap histogram.
    pub fn measure(&self, on: bool) {
        let _ = self.commands.send(Command::Measure(on));
    }

    /// Takes the figures so far and clears the counters; with `reset`, also forgets every
    /// stream (stream ids start again from zero).
    pub fn report(&self, reset: bool) -> EngineReport {
        let (tx, rx) = mpsc::channel();
        let _ = self.commands.send(Command::Report(tx, reset));
        rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default()
    }
}

impl Drop for RtpEngine {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Quit);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Receive state of one stream (RFC 3550 A.1 and A.8, simplified: no probation, no restart).
#[derive(Default)]
struct Receive {
    received: u64,
    /// Extended highest sequence number and the first one.
    max_ext: Option<(u64, u64)>,
    reordered: u64,
    last_arrival_ns: i64,
    last_seq: u16,
    /// RFC 3550 A.8: previous transit time and the running jitter, in timestamp units.
    transit: Option<i64>,
    jitter: f64,
}

struct Stream {
    to: Destination,
    header: RtpHeader,
    telephone_event: Option<u8>,
    /// Keys still to press, each at a tick; the press under way.
    keys: Vec<(u64, DtmfDigit)>,
    pressing: Option<DtmfSequence>,
    sent: u64,
    rx: Receive,
    active: bool,
}

struct Engine {
    socket: UdpSocket,
    streams: Vec<Option<Stream>>,
    by_source: HashMap<SocketAddr, usize>,
    slots: Vec<Vec<usize>>,
    measuring: bool,
    gaps: Histogram,
    unknown_source: u64,
    /// The kernel's drop counter (`SO_RXQ_OVFL`, cumulative over the socket's life) as last
    /// seen, and as it stood at the last report: a report counts the difference.
    drops_seen: u32,
    drops_reported: u32,
    late_ticks: u64,
    send_errors: u64,
    /// One second of a 440 Hz tone at −20 dBFS, μ-law and A-law, 50 packets each.
    tone: [Vec<u8>; 2],
    send: Batch,
    recv: Batch,
    /// The next tick to run (ms since the engine started).
    tick: u64,
}

impl Engine {
    fn new(socket: UdpSocket) -> Self {
        let samples: Vec<i16> = (0..8000)
            .map(|n| ((2.0 * std::f64::consts::PI * 440.0 * n as f64 / 8000.0).sin() * 3277.0) as i16)
            .collect();
        let ulaw = samples.iter().map(|s| patchbay_media::g711::ulaw_encode(*s)).collect();
        let alaw = samples.iter().map(|s| patchbay_media::g711::alaw_encode(*s)).collect();
        Self {
            socket,
            streams: Vec::new(),
            by_source: HashMap::new(),
            slots: vec![Vec::new(); SLOTS],
            measuring: false,
            gaps: Histogram::default(),
            unknown_source: 0,
            drops_seen: 0,
            drops_reported: 0,
            late_ticks: 0,
            send_errors: 0,
            tone: [ulaw, alaw],
            send: Batch::new(BATCH),
            recv: Batch::new(BATCH),
            tick: 0,
        }
    }

    fn run(mut self, commands: mpsc::Receiver<Command>) {
        let epoch = Instant::now();
        loop {
            loop {
                match commands.try_recv() {
                    Ok(Command::Start(id, spec)) => self.start(id, spec),
                    Ok(Command::Stop(id)) => self.stop(id),
                    Ok(Command::Measure(on)) => self.measuring = on,
                    Ok(Command::Report(reply, reset)) => {
                        // Whatever is already in the socket belongs in the figures.
                        self.receive_all();
                        let _ = reply.send(self.take_report(reset));
                    }
                    Ok(Command::Quit) | Err(mpsc::TryRecvError::Disconnected) => return,
                    Err(mpsc::TryRecvError::Empty) => break,
                }
            }
            self.receive_all();
            // Every tick that is due, in order; more than a whole cycle behind counts as late.
            let due = (epoch.elapsed().as_micros() / TICK.as_micros()) as u64;
            if due > self.tick + SLOTS as u64 {
                self.late_ticks += due - self.tick - SLOTS as u64;
            }
            while self.tick <= due {
                self.send_slot(self.tick);
                self.tick += 1;
            }
            self.flush();
            self.receive_all();
            let next = epoch + TICK * (self.tick as u32);
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }

    fn start(&mut self, id: usize, spec: StreamSpec) {
        let now = self.tick;
        let keys = match (&spec.keys, spec.telephone_event) {
            (Some((keys, after)), Some(_)) => {
                let first = now + after.as_millis() as u64;
                let mut keys: Vec<(u64, DtmfDigit)> = keys
                    .chars()
                    .filter_map(DtmfDigit::from_char)
                    .enumerate()
                    .map(|(i, d)| (first + i as u64 * (KEY_MS + KEY_GAP_MS), d))
                    .collect();
                // Popped from the end.
                keys.reverse();
                keys
            }
            _ => Vec::new(),
        };
        let stream = Stream {
            to: Destination::from(spec.remote),
            header: RtpHeader {
                marker: true,
                payload_type: spec.payload_type,
                sequence: (spec.ssrc >> 7) as u16,
                timestamp: spec.ssrc.rotate_left(11),
                ssrc: spec.ssrc,
            },
            telephone_event: spec.telephone_event,
            keys,
            pressing: None,
            sent: 0,
            rx: Receive::default(),
            active: true,
        };
        if self.streams.len() <= id {
            self.streams.resize_with(id + 1, || None);
        }
        self.by_source.insert(spec.remote, id);
        self.streams[id] = Some(stream);
        self.slots[id % SLOTS].push(id);
    }

    fn stop(&mut self, id: usize) {
        let Some(Some(stream)) = self.streams.get_mut(id) else { return };
        if !stream.active {
            return;
        }
        stream.active = false;
        self.slots[id % SLOTS].retain(|s| *s != id);
        // Keep receiving its packets (the peer may send a few more): the stream stays mapped.
    }

    fn take_report(&mut self, reset: bool) -> EngineReport {
        let streams = self.streams.iter().map(|s| s.as_ref().map(Stream::stats).unwrap_or_default()).collect();
        let report = EngineReport {
            streams,
            gaps: std::mem::take(&mut self.gaps),
            unknown_source: std::mem::take(&mut self.unknown_source),
            socket_drops: u64::from(
                self.drops_seen.wrapping_sub(std::mem::replace(&mut self.drops_reported, self.drops_seen)),
            ),
            late_ticks: std::mem::take(&mut self.late_ticks),
            send_errors: std::mem::take(&mut self.send_errors),
        };
        if reset {
            self.streams.clear();
            self.by_source.clear();
            for slot in &mut self.slots {
                slot.clear();
            }
        }
        report
    }

    fn send_slot(&mut self, tick: u64) {
        let slot = (tick % SLOTS as u64) as usize;
        for i in 0..self.slots[slot].len() {
            if self.send.is_full() {
                self.flush();
            }
            let id = self.slots[slot][i];
            let Some(Some(stream)) = self.streams.get_mut(id) else { continue };
            let (to, tone) = (stream.to, &self.tone);
            self.send.queue(&to, |buf| stream.next_packet(tick, tone, buf));
        }
    }

    fn flush(&mut self) {
        self.send_errors += self.send.send(self.socket.as_raw_fd());
    }

    fn receive_all(&mut self) {
        let fd = self.socket.as_raw_fd();
        loop {
            let n = match self.recv.receive(fd) {
                Ok(n) => n,
                Err(_) => return,
            };
            for i in 0..n {
                let datagram = self.recv.received(i);
                if let Some(drops) = datagram.drops {
                    self.drops_seen = drops;
                }
                let Some(from) = datagram.from else { continue };
                match self.by_source.get(&from).and_then(|id| self.streams.get_mut(*id)) {
                    Some(Some(stream)) => {
                        if let Some(gap) = stream.rx.on_packet(datagram.data, datagram.arrival_ns)
                            && self.measuring
                            && stream.active
                        {
                            self.gaps.record(gap);
                        }
                    }
                    _ => self.unknown_source += 1,
                }
            }
            if n < BATCH {
                return;
            }
        }
    }
}

impl Stream {
    /// Writes this stream's packet for `tick` into `out`: the next key press report when one is
    /// under way, else 20 ms of tone.
    fn next_packet(&mut self, tick: u64, tone: &[Vec<u8>; 2], out: &mut [u8]) -> usize {
        let timestamp = self.header.timestamp;
        if self.pressing.is_none()
            && let Some(&(at, digit)) = self.keys.last()
            && tick >= at
        {
            self.keys.pop();
            let sender = DtmfSender::new(DtmfSenderConfig::default());
            let sequence = sender.sequence(digit, KEY_MS as u32 * 8, timestamp);
            self.pressing = Some(sequence);
        }
        let mut len = 0;
        if let (Some(sequence), Some(pt)) = (self.pressing.as_mut(), self.telephone_event) {
            // One report per 20 ms; the three end reports go out in consecutive slots.
            match sequence.next() {
                Some(packet) => {
                    let header = RtpHeader {
                        marker: packet.marker,
                        payload_type: pt,
                        sequence: self.header.sequence,
                        timestamp: packet.timestamp,
                        ssrc: self.header.ssrc,
                    };
                    let mut payload = [0u8; 4];
                    if packet.event.write(&mut payload).is_ok() {
                        len = header.write(&payload, out).unwrap_or(0);
                    }
                }
                None => {
                    self.pressing = None;
                    self.header.marker = true;
                }
            }
        }
        if len == 0 {
            let tone = &tone[usize::from(self.header.payload_type == 8)];
            let at = (self.sent as usize % 50) * SAMPLES_PER_PACKET as usize;
            let payload = &tone[at..at + SAMPLES_PER_PACKET as usize];
            len = self.header.write(payload, out).unwrap_or(0);
            self.header.marker = false;
        }
        self.header.sequence = self.header.sequence.wrapping_add(1);
        self.header.timestamp = self.header.timestamp.wrapping_add(SAMPLES_PER_PACKET);
        self.sent += 1;
        len
    }

    fn stats(&self) -> StreamStats {
        let rx = &self.rx;
        let expected = rx.max_ext.map_or(0, |(max, first)| max - first + 1);
        StreamStats {
            sent: self.sent,
            received: rx.received,
            lost: expected as i64 - rx.received as i64,
            reordered: rx.reordered,
            jitter_ms: rx.jitter / 8.0,
        }
    }
}

impl Receive {
    /// Counts a packet; returns how far its arrival was from 20 ms after the previous packet's
    /// (µs) when the two are consecutive.
    fn on_packet(&mut self, data: &[u8], arrival_ns: i64) -> Option<u64> {
        if data.len() < 12 || data[0] >> 6 != 2 {
            return None;
        }
        let seq = u16::from_be_bytes([data[2], data[3]]);
        let timestamp = u32::from_be_bytes([data[4], data[5], data[6], data[7]]);
        self.received += 1;
        let mut gap = None;
        match &mut self.max_ext {
            None => self.max_ext = Some((u64::from(seq) + (1 << 32), u64::from(seq) + (1 << 32))),
            Some((max, _)) => {
                let delta = seq.wrapping_sub(*max as u16) as i16;
                if delta > 0 {
                    *max += delta as u64;
                } else {
                    self.reordered += 1;
                }
                if seq == self.last_seq.wrapping_add(1) && arrival_ns > 0 && self.last_arrival_ns > 0 {
                    let gap_ns = arrival_ns - self.last_arrival_ns;
                    gap = Some((gap_ns - PTIME.as_nanos() as i64).unsigned_abs() / 1000);
                }
            }
        }
        // RFC 3550 A.8, arrival in timestamp units (8 kHz).
        if arrival_ns > 0 {
            let arrival = arrival_ns / 125_000;
            let transit = arrival - i64::from(timestamp);
            if let Some(previous) = self.transit {
                let d = (transit - previous).abs() as f64;
                self.jitter += (d - self.jitter) / 16.0;
            }
            self.transit = Some(transit);
        }
        self.last_seq = seq;
        self.last_arrival_ns = arrival_ns;
        gap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_reordering_and_gaps_are_counted() {
        let mut rx = Receive::default();
        let packet = |seq: u16| {
            let mut p = [0u8; 172];
            RtpHeader { marker: false, payload_type: 0, sequence: seq, timestamp: u32::from(seq) * 160, ssrc: 1 }
                .write(&[0xff; 160], &mut p)
                .expect("fits");
            p
        };
        let ms = 1_000_000i64;
        // 65534, 65535, 0 (wrap), 2 (1 lost), 3 arriving 25 ms after 2 (5 ms late).
        assert_eq!(rx.on_packet(&packet(65534), 1000 * ms), None);
        assert_eq!(rx.on_packet(&packet(65535), 1020 * ms), Some(0));
        assert_eq!(rx.on_packet(&packet(0), 1040 * ms), Some(0));
        assert_eq!(rx.on_packet(&packet(2), 1080 * ms), None);
        assert_eq!(rx.on_packet(&packet(3), 1105 * ms), Some(5000));
        assert_eq!(rx.on_packet(&packet(1), 1106 * ms), None, "late packet: no gap");
        let (max, first) = rx.max_ext.expect("seen");
        assert_eq!(max - first + 1, 6);
        assert_eq!(rx.received, 6);
        assert_eq!(rx.reordered, 1);
    }

    /// The engine against itself over loopback: a stream sent to the engine's own socket comes
    /// back from the engine's own address, which maps to that stream.
    #[test]
    fn a_stream_to_ourselves_arrives_paced_and_whole() {
        let engine = RtpEngine::start("127.0.0.1:0".parse().expect("address")).expect("engine");
        engine.start_stream(
            0,
            StreamSpec {
                remote: engine.local_addr(),
                payload_type: 0,
                telephone_event: Some(101),
                keys: Some(("1#".into(), Duration::from_millis(100))),
                ssrc: 7,
            },
        );
        engine.measure(true);
        std::thread::sleep(Duration::from_millis(600));
        engine.stop_stream(0);
        std::thread::sleep(Duration::from_millis(60));
        let report = engine.report(true);
        let s = report.streams[0];
        assert!(s.sent >= 20, "{s:?}");
        assert_eq!(s.received, s.sent, "{s:?}");
        assert_eq!(s.lost, 0);
        assert!(report.gaps.summary().count >= 15, "{:?}", report.gaps.summary());
        assert_eq!(report.unknown_source, 0);
    }
}
