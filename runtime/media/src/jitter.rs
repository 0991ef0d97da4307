//! An adaptive jitter buffer (sans-IO): packets in with their arrival time, one frame out per
//! packetisation interval.
//!
//! # Model
//!
//! Every packet's *transit* is its arrival time minus its RTP timestamp, both in timestamp units
//! (RFC 3550 A.8 uses the same quantity for jitter). Over a window of recent packets the smallest
//! transit is the fastest path through the network; the spread between the slowest and the
//! fastest is how long a packet can lag behind it. The *target delay* is the largest spread seen
//! in the last `peak_hold` (10 s by default), clamped to `min_delay..=max_delay`: the delay grows
//! at once when a packet comes late but only comes back down once the path has been calm for that
//! long. (With the window alone, each late burst — a scheduling stall on a busy host, a Wi-Fi
//! retry storm — cost two glitches 2.5 s apart, a concealed frame going up and a dropped one
//! coming down, and a second burst soon after cost two more; CI showed exactly that on a speech
//! echo. Holding the peak turns a cluster of bursts into one concealment.)
//!
//! The playout side is driven by the caller's pacing clock: [`JitterBuffer::pop`] is called once
//! per frame interval and returns the next frame in sequence-number order, or a
//! [`Playout::Missing`] telling the consumer to conceal or play silence. The *lag* of the next
//! frame is how long ago it would have arrived on the fastest path; a frame is played once its
//! lag reaches the target:
//!
//! - the next frame is here but its lag is below the target: hold it (`Buffering`), which grows
//!   the delay by one frame — this is how playout starts and how the delay adapts upwards;
//! - the next frame is missing, a later one is here and the lag reached the target: it is lost,
//!   skip it (`Lost`);
//! - nothing is here at all: hold (`Underrun`); the delay grows by one frame per pop until the
//!   stream comes back, and the late packet, when it comes, widens the spread;
//! - the lag exceeds the target by a whole frame or more (the network calmed down): drop one
//!   frame, at most once every `shrink_interval` pops, to bring the delay back down. (Playing as
//!   soon as the lag reaches the target keeps it below target + one frame in steady state.)
//!
//! Packets behind the playout point are dropped as too late (or as duplicates, if that sequence
//! number was already played). An SSRC change, a sequence jump of more than 3000 (RFC 3550 A.1
//! `MAX_DROPOUT`) or a timestamp that disagrees with the sequence number by more than
//! `reset_after` resets the buffer. A peer that stops sending during silence (DTX) for longer
//! than `reset_after` therefore resets it too, which costs nothing: the buffer has drained by
//! then, and the delay statistics start afresh.
//!
//! # Limits, said loudly
//!
//! - One packet is one frame of `frame_samples`: a peer that sends 30 ms packets into a 20 ms
//!   call is not re-framed here (not done yet; the pacing layer will re-packetise).
//! - Delay changes are whole frames: dropping or inserting a frame, not time-stretching. Growing
//!   inserts a concealment frame, shrinking drops a real one. A time-stretching stage (WSOLA) is
//!   not done.
//! - Storage is allocated once at construction; `push` and `pop` do not allocate.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::rtp::{SequenceUnwrapper, TimestampUnwrapper};

/// RFC 3550 A.1: a forward jump bigger than this is a restart, not loss.
const MAX_DROPOUT: i64 = 3000;
/// RFC 3550 A.1: a packet further than this behind the newest is not a reordered one.
const MAX_MISORDER: i64 = 100;

/// Configuration of a [`JitterBuffer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JitterConfig {
    /// Media clock rate.
    pub clock_rate: u32,
    /// Timestamp units per packet: 160 for 20 ms at 8 kHz.
    pub frame_samples: u32,
    /// Smallest target delay.
    pub min_delay: Duration,
    /// Largest target delay.
    pub max_delay: Duration,
    /// Frames the buffer holds (it must cover `max_delay` plus reordering).
    pub capacity: usize,
    /// Packets over which the delay spread is measured (128 ≈ 2.5 s at 20 ms).
    pub window: usize,
    /// Pops between two frames dropped to shrink the delay.
    pub shrink_interval: u32,
    /// How long the largest spread seen keeps the target up after it was seen.
    pub peak_hold: Duration,
    /// A timestamp this far from where the sequence number puts it resets the buffer.
    pub reset_after: Duration,
}

impl Default for JitterConfig {
    fn default() -> Self {
        Self {
            clock_rate: 8_000,
            frame_samples: 160,
            min_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(200),
            capacity: 32,
            window: 128,
            shrink_interval: 25,
            peak_hold: Duration::from_secs(10),
            reset_after: Duration::from_secs(2),
        }
    }
}

/// A packet handed to the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JitterPacket<T> {
    /// SSRC of the stream.
    pub ssrc: u32,
    /// RTP sequence number.
    pub sequence: u16,
    /// RTP timestamp.
    pub timestamp: u32,
    /// RTP marker bit, passed through.
    pub marker: bool,
    /// The frame: encoded payload, decoded [`Frame`](crate::Frame), whatever the caller buffers.
    pub payload: T,
}

/// Why the buffer reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResetReason {
    /// The SSRC changed.
    SsrcChanged,
    /// The sequence number jumped by more than 3000.
    SequenceJump,
    /// The timestamp moved more than `reset_after` away from where the sequence number puts it.
    TimestampJump,
}

/// What [`JitterBuffer::push`] did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PushOutcome {
    /// Stored for playout.
    Queued,
    /// The buffer reset first (its frames were discarded), then stored this packet.
    QueuedAfterReset(ResetReason),
    /// Already stored or already played: dropped.
    Duplicate,
    /// Its turn to play has passed: dropped.
    TooLate,
}

/// Why [`JitterBuffer::pop`] has no frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MissingReason {
    /// No packet was ever received.
    Idle,
    /// Building up delay: at the start, after a reset or a pause, or when the target grew.
    Buffering,
    /// This packet never arrived in time: conceal it.
    Lost {
        /// Its sequence number.
        sequence: u16,
    },
    /// Nothing to play: the next packet is late, or the peer paused. Delay grows by one frame.
    Underrun,
}

/// A frame taken out for playout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlayoutFrame<T> {
    /// The payload pushed.
    pub payload: T,
    /// RTP sequence number.
    pub sequence: u16,
    /// RTP timestamp.
    pub timestamp: u32,
    /// RTP marker bit.
    pub marker: bool,
}

/// What to play for this interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Playout<T> {
    /// The next frame.
    Frame(PlayoutFrame<T>),
    /// No frame: conceal or insert silence.
    Missing(MissingReason),
}

/// Counters for monitoring and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JitterStats {
    /// Packets pushed.
    pub received: u64,
    /// Frames played.
    pub played: u64,
    /// Duplicates dropped.
    pub duplicates: u64,
    /// Packets dropped because they came after their turn.
    pub too_late: u64,
    /// Sequence numbers reported lost.
    pub lost: u64,
    /// Pops with nothing to play.
    pub underruns: u64,
    /// Pops held to grow the delay while playing.
    pub stretched: u64,
    /// Frames dropped to shrink the delay.
    pub shrunk: u64,
    /// Frames dropped because the buffer was full.
    pub overflow_dropped: u64,
    /// Resets.
    pub resets: u64,
}

#[derive(Debug, Clone)]
enum Slot<T> {
    Empty,
    Filled {
        ext_seq: i64,
        ext_ts: i64,
        marker: bool,
        sequence: u16,
        timestamp: u32,
        payload: T,
    },
    /// Played; kept to recognise duplicates of it.
    Played {
        ext_seq: i64,
    },
    /// Passed over (lost, or dropped to shrink or on overflow); a copy arriving now is too late.
    Skipped {
        ext_seq: i64,
    },
}

#[derive(Debug, Clone, Copy)]
struct Stream {
    ssrc: u32,
    seqs: SequenceUnwrapper,
    stamps: TimestampUnwrapper,
    /// Newest sequence number and its timestamp.
    newest: (i64, i64),
    /// Next sequence number to play.
    next_seq: i64,
    started: bool,
    /// Sequence number and timestamp of the last frame played or skipped.
    last_out: Option<(i64, i64)>,
}

/// An adaptive jitter buffer (see the module documentation).
#[derive(Debug, Clone)]
pub struct JitterBuffer<T> {
    config: JitterConfig,
    epoch: Option<Instant>,
    slots: Vec<Slot<T>>,
    stream: Option<Stream>,
    /// The smallest and largest transit (arrival − timestamp, in timestamp units) of the last
    /// `window` packets, as monotonic queues of (packet number, transit): each packet enters and
    /// leaves each queue once, so keeping the window's extremes is O(1) per packet amortised.
    /// (A ring rescanned whenever its extreme left it cost a 128-entry scan on most packets of a
    /// steady stream, whose transits repeat.)
    transit_lows: VecDeque<(u64, i64)>,
    transit_highs: VecDeque<(u64, i64)>,
    /// Packets whose transit was recorded since the last reset.
    transits_seen: u64,
    min_transit: i64,
    /// The largest spread seen, and the arrival time (timestamp units) until which it holds.
    peak_spread: i64,
    peak_until: i64,
    pops_since_shrink: u32,
    /// Concealment frames already played while waiting (underrun) in the current gap: lost
    /// packets found afterwards are passed over against them instead of concealed twice.
    underrun_credit: u32,
    stats: JitterStats,
    /// The configuration's durations in timestamp units, converted once.
    limits: Limits,
}

/// [`JitterConfig`] durations in timestamp units.
#[derive(Debug, Clone, Copy)]
struct Limits {
    min_delay: i64,
    max_delay: i64,
    peak_hold: i64,
    reset_after: i64,
}

/// `d` in units of a `clock_rate` clock: in u64 while it fits (26 days at 8 kHz; the u128
/// division showed in profiles).
fn units(d: Duration, clock_rate: u32) -> i64 {
    let nanos = d.as_nanos();
    match u64::try_from(nanos).ok().and_then(|n| n.checked_mul(u64::from(clock_rate))) {
        Some(product) => (product / 1_000_000_000) as i64,
        None => (nanos * u128::from(clock_rate) / 1_000_000_000) as i64,
    }
}

impl<T> JitterBuffer<T> {
    /// An empty buffer; this is the only allocation it makes.
    pub fn new(config: JitterConfig) -> Self {
        let config = JitterConfig {
            capacity: config.capacity.max(2),
            window: config.window.max(1),
            frame_samples: config.frame_samples.max(1),
            clock_rate: config.clock_rate.max(1),
            ..config
        };
        Self {
            config,
            epoch: None,
            slots: std::iter::repeat_with(|| Slot::Empty).take(config.capacity).collect(),
            stream: None,
            transit_lows: VecDeque::with_capacity(config.window.max(1) + 1),
            transit_highs: VecDeque::with_capacity(config.window.max(1) + 1),
            transits_seen: 0,
            min_transit: 0,
            peak_spread: 0,
            peak_until: 0,
            pops_since_shrink: 0,
            underrun_credit: 0,
            stats: JitterStats::default(),
            limits: Limits {
                min_delay: units(config.min_delay, config.clock_rate),
                max_delay: units(config.max_delay, config.clock_rate),
                peak_hold: units(config.peak_hold, config.clock_rate),
                reset_after: units(config.reset_after, config.clock_rate),
            },
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> JitterStats {
        self.stats
    }

    fn to_duration(&self, units: i64) -> Duration {
        Duration::from_nanos((units.max(0) as u64).saturating_mul(1_000_000_000) / u64::from(self.config.clock_rate))
    }

    fn now_units(&mut self, now: Instant) -> i64 {
        let epoch = *self.epoch.get_or_insert(now);
        units(now.saturating_duration_since(epoch), self.config.clock_rate)
    }

    /// The delay the buffer is steering towards, in timestamp units.
    fn target_units(&self) -> i64 {
        // The held peak is never below the window's spread, and 0 before any packet.
        self.peak_spread.clamp(self.limits.min_delay, self.limits.max_delay)
    }

    /// The delay the buffer is steering towards.
    pub fn target_delay(&self) -> Duration {
        self.to_duration(self.target_units())
    }

    /// Frames currently stored.
    pub fn buffered(&self) -> usize {
        self.slots.iter().filter(|s| matches!(s, Slot::Filled { .. })).count()
    }

    fn index(&self, ext_seq: i64) -> usize {
        ext_seq.rem_euclid(self.config.capacity as i64) as usize
    }

    fn record_transit(&mut self, arrival: i64, transit: i64) {
        let n = self.transits_seen;
        self.transits_seen += 1;
        let window = self.config.window as u64;
        // A value no lower (higher) than the newcomer can never be the window's minimum
        // (maximum) again: it leaves before the newcomer does.
        while self.transit_lows.back().is_some_and(|&(_, v)| v >= transit) {
            self.transit_lows.pop_back();
        }
        self.transit_lows.push_back((n, transit));
        while self.transit_highs.back().is_some_and(|&(_, v)| v <= transit) {
            self.transit_highs.pop_back();
        }
        self.transit_highs.push_back((n, transit));
        // Packets older than the window.
        while self.transit_lows.front().is_some_and(|&(i, _)| i + window <= n) {
            self.transit_lows.pop_front();
        }
        while self.transit_highs.front().is_some_and(|&(i, _)| i + window <= n) {
            self.transit_highs.pop_front();
        }
        self.min_transit = self.transit_lows.front().map_or(transit, |&(_, v)| v);
        let spread = self.transit_highs.front().map_or(transit, |&(_, v)| v) - self.min_transit;
        if spread >= self.peak_spread || arrival >= self.peak_until {
            self.peak_spread = spread;
            self.peak_until = arrival + self.limits.peak_hold;
        }
    }

    fn reset(&mut self) {
        self.stream = None;
        for s in &mut self.slots {
            *s = Slot::Empty;
        }
        self.transit_lows.clear();
        self.transit_highs.clear();
        self.transits_seen = 0;
        self.peak_spread = 0;
        self.peak_until = 0;
        self.pops_since_shrink = 0;
        self.underrun_credit = 0;
        self.stats.resets += 1;
    }

    /// Why this packet cannot continue the current stream, if it cannot.
    fn reset_reason(&self, packet: &JitterPacket<T>) -> Option<ResetReason> {
        let stream = self.stream.as_ref()?;
        if stream.ssrc != packet.ssrc {
            return Some(ResetReason::SsrcChanged);
        }
        let ext_seq = stream.seqs.peek(packet.sequence);
        let ext_ts = stream.stamps.peek(packet.timestamp);
        let seq_delta = ext_seq - stream.newest.0;
        if seq_delta > MAX_DROPOUT {
            return Some(ResetReason::SequenceJump);
        }
        let ts_error = (ext_ts - stream.newest.1) - seq_delta * i64::from(self.config.frame_samples);
        if ts_error.abs() > self.limits.reset_after {
            return Some(ResetReason::TimestampJump);
        }
        None
    }

    /// Stores a packet that arrived at `now`.
    pub fn push(&mut self, now: Instant, packet: JitterPacket<T>) -> PushOutcome {
        let arrival = self.now_units(now);
        self.stats.received += 1;
        let reset = self.reset_reason(&packet);
        if reset.is_some() {
            self.reset();
        }
        let stream = self.stream.get_or_insert_with(|| {
            let mut seqs = SequenceUnwrapper::new();
            let mut stamps = TimestampUnwrapper::new();
            let s = seqs.unwrap(packet.sequence);
            let t = stamps.unwrap(packet.timestamp);
            Stream { ssrc: packet.ssrc, seqs, stamps, newest: (s, t), next_seq: s, started: false, last_out: None }
        });
        let ext_seq = stream.seqs.unwrap(packet.sequence);
        let ext_ts = stream.stamps.unwrap(packet.timestamp);
        if ext_seq > stream.newest.0 {
            stream.newest = (ext_seq, ext_ts);
        }
        let newest = stream.newest.0;
        let started = stream.started;
        let next_seq = stream.next_seq;
        let capacity = self.config.capacity as i64;
        let idx = self.index(ext_seq);
        match &self.slots[idx] {
            Slot::Filled { ext_seq: s, .. } | Slot::Played { ext_seq: s } if *s == ext_seq => {
                self.stats.duplicates += 1;
                return PushOutcome::Duplicate;
            }
            Slot::Skipped { ext_seq: s } if *s == ext_seq => {
                // Declared lost or dropped already: arriving now, it is simply too late.
                self.record_transit(arrival, arrival - ext_ts);
                self.stats.too_late += 1;
                return PushOutcome::TooLate;
            }
            _ => {}
        }
        if ext_seq < next_seq {
            if started || newest - ext_seq >= capacity || ext_seq < newest - MAX_MISORDER {
                // Even late, it tells how slow the path can be.
                self.record_transit(arrival, arrival - ext_ts);
                self.stats.too_late += 1;
                return PushOutcome::TooLate;
            }
            // Reordered before playout began: start from it instead.
            if let Some(s) = self.stream.as_mut() {
                s.next_seq = ext_seq;
            }
        }
        self.record_transit(arrival, arrival - ext_ts);
        // Make room: frames further back than the capacity cannot be kept.
        let oldest_kept = ext_seq - capacity + 1;
        if let Some(s) = self.stream.as_mut()
            && s.next_seq < oldest_kept
        {
            let mut dropped = 0;
            for seq in s.next_seq..oldest_kept.min(s.next_seq + capacity) {
                let i = seq.rem_euclid(capacity) as usize;
                if matches!(self.slots[i], Slot::Filled { .. }) {
                    dropped += 1;
                }
                self.slots[i] = Slot::Skipped { ext_seq: seq };
            }
            self.stats.overflow_dropped += dropped;
            s.next_seq = oldest_kept;
        }
        self.slots[idx] = Slot::Filled {
            ext_seq,
            ext_ts,
            marker: packet.marker,
            sequence: packet.sequence,
            timestamp: packet.timestamp,
            payload: packet.payload,
        };
        match reset {
            Some(r) => PushOutcome::QueuedAfterReset(r),
            None => PushOutcome::Queued,
        }
    }

    /// The stored packet with the smallest sequence number after `after`, if any.
    fn next_stored_after(&self, after: i64, newest: i64) -> Option<(i64, i64)> {
        let end = newest.min(after + self.config.capacity as i64);
        (after + 1..=end).find_map(|seq| match &self.slots[self.index(seq)] {
            Slot::Filled { ext_seq, ext_ts, .. } if *ext_seq == seq => Some((seq, *ext_ts)),
            _ => None,
        })
    }

    /// Takes the next frame to play at `now`; call once per frame interval.
    pub fn pop(&mut self, now: Instant) -> Playout<T> {
        if self.epoch.is_none() {
            return Playout::Missing(MissingReason::Idle);
        }
        let now = self.now_units(now);
        self.pops_since_shrink = self.pops_since_shrink.saturating_add(1);
        // Each turn either returns or passes over one lost sequence number, so this ends within
        // the capacity.
        for _ in 0..=self.config.capacity {
            if let Some(out) = self.pop_once(now) {
                return out;
            }
        }
        Playout::Missing(MissingReason::Underrun)
    }

    /// One playout decision; `None` when a lost packet was passed over silently and the next
    /// one should be looked at in the same interval.
    fn pop_once(&mut self, now: i64) -> Option<Playout<T>> {
        let Some(stream) = self.stream else {
            return Some(Playout::Missing(MissingReason::Idle));
        };
        let frame = i64::from(self.config.frame_samples);
        let target = self.target_units();
        let next = stream.next_seq;
        let here = match &self.slots[self.index(next)] {
            Slot::Filled { ext_seq, ext_ts, .. } if *ext_seq == next => Some(*ext_ts),
            _ => None,
        };
        let later = self.next_stored_after(next, stream.newest.0);
        // Where the next frame sits on the media clock, known or inferred.
        let expected_ts = here
            .or_else(|| stream.last_out.map(|(seq, ts)| ts + (next - seq) * frame))
            .or_else(|| later.map(|(seq, ts)| ts - (seq - next) * frame));
        let Some(expected_ts) = expected_ts else {
            let reason = if stream.started { MissingReason::Underrun } else { MissingReason::Buffering };
            return Some(Playout::Missing(reason));
        };
        // How long ago the frame would have arrived on the fastest path.
        let lag = now - (expected_ts + self.min_transit);
        if here.is_none() {
            if stream.started && later.is_some() && lag >= target {
                self.stats.lost += 1;
                self.skip(next, expected_ts);
                if self.underrun_credit > 0 && lag >= target + frame {
                    // We held (underran) waiting for it, so the delay is a frame above target:
                    // the concealment played during that hold stands in for this packet.
                    self.underrun_credit -= 1;
                    return None;
                }
                return Some(Playout::Missing(MissingReason::Lost { sequence: next as u16 }));
            }
            if !stream.started && later.is_none() {
                return Some(Playout::Missing(MissingReason::Buffering));
            }
            self.stats.underruns += 1;
            self.underrun_credit += 1;
            return Some(Playout::Missing(MissingReason::Underrun));
        }
        if lag < target {
            if stream.started {
                self.stats.stretched += 1;
            }
            return Some(Playout::Missing(MissingReason::Buffering));
        }
        let mut take = next;
        if stream.started
            && lag >= target + frame
            && self.pops_since_shrink >= self.config.shrink_interval
            && later.is_some_and(|(seq, _)| seq == next + 1)
        {
            // Too much delay: drop one frame.
            self.stats.shrunk += 1;
            self.pops_since_shrink = 0;
            self.skip(next, expected_ts);
            take = next + 1;
        }
        let idx = self.index(take);
        match std::mem::replace(&mut self.slots[idx], Slot::Played { ext_seq: take }) {
            Slot::Filled { ext_ts, marker, sequence, timestamp, payload, .. } => {
                if let Some(s) = self.stream.as_mut() {
                    s.next_seq = take + 1;
                    s.started = true;
                    s.last_out = Some((take, ext_ts));
                }
                self.stats.played += 1;
                self.underrun_credit = 0;
                Some(Playout::Frame(PlayoutFrame { payload, sequence, timestamp, marker }))
            }
            other => {
                // Checked above to be filled; put it back untouched if not.
                self.slots[idx] = other;
                Some(Playout::Missing(MissingReason::Underrun))
            }
        }
    }

    /// Passes over `seq` without playing it.
    fn skip(&mut self, seq: i64, ts: i64) {
        let idx = self.index(seq);
        self.slots[idx] = Slot::Skipped { ext_seq: seq };
        if let Some(s) = self.stream.as_mut() {
            s.next_seq = seq + 1;
            s.last_out = Some((seq, ts));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: Duration = Duration::from_millis(20);

    /// A deterministic generator (xorshift) for jitter patterns.
    struct Rng(u32);

    impl Rng {
        fn below(&mut self, n: u32) -> u32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 17;
            self.0 ^= self.0 << 5;
            self.0 % n
        }
    }

    fn packet(ssrc: u32, seq: u16, ts: u32) -> JitterPacket<u16> {
        JitterPacket { ssrc, sequence: seq, timestamp: ts, marker: false, payload: seq }
    }

    /// A sender emitting 20 ms packets, each delivered after a chosen delay, and a player
    /// popping every 20 ms at a 10 ms phase. Everything is virtual time from `t0`.
    struct Sim {
        jb: JitterBuffer<u16>,
        t0: Instant,
        /// (arrival time in µs, packet), not yet delivered.
        pending: Vec<(u64, JitterPacket<u16>)>,
        next_pop_us: u64,
        played: Vec<Playout<u16>>,
        outcomes: Vec<PushOutcome>,
    }

    impl Sim {
        fn new(config: JitterConfig) -> Self {
            Self {
                jb: JitterBuffer::new(config),
                t0: Instant::now(),
                pending: Vec::new(),
                next_pop_us: 10_000,
                played: Vec::new(),
                outcomes: Vec::new(),
            }
        }

        /// Sends `n` packets of one stream, packet i at `start_ms` + i × 20 ms, delivered after
        /// `delay(i)` ms (`None`: lost).
        fn stream(
            &mut self,
            start_ms: u64,
            first_seq: u16,
            first_ts: u32,
            n: u32,
            mut delay: impl FnMut(u32) -> Option<u64>,
        ) {
            for i in 0..n {
                if let Some(d) = delay(i) {
                    let p = packet(1, first_seq.wrapping_add(i as u16), first_ts.wrapping_add(160 * i));
                    self.pending.push(((start_ms + 20 * u64::from(i) + d) * 1000, p));
                }
            }
            self.pending.sort_by_key(|(at, _)| *at);
        }

        /// Runs until `end_ms`, delivering packets and popping on the 20 ms grid.
        fn run(&mut self, end_ms: u64) {
            while self.next_pop_us <= end_ms * 1000 {
                let pop_at = self.next_pop_us;
                let due = self.pending.partition_point(|(at, _)| *at <= pop_at);
                for (at, p) in self.pending.drain(..due) {
                    self.outcomes.push(self.jb.push(self.t0 + Duration::from_micros(at), p));
                }
                self.played.push(self.jb.pop(self.t0 + Duration::from_micros(pop_at)));
                self.next_pop_us += 20_000;
            }
        }

        fn frames(&self) -> Vec<u16> {
            self.played
                .iter()
                .filter_map(|p| match p {
                    Playout::Frame(f) => Some(f.payload),
                    Playout::Missing(_) => None,
                })
                .collect()
        }

        fn lost(&self) -> Vec<u16> {
            self.played
                .iter()
                .filter_map(|p| match p {
                    Playout::Missing(MissingReason::Lost { sequence }) => Some(*sequence),
                    _ => None,
                })
                .collect()
        }
    }

    #[test]
    fn the_window_extremes_match_a_scan_of_the_window() {
        let mut jb: JitterBuffer<u16> = JitterBuffer::new(JitterConfig { window: 8, ..JitterConfig::default() });
        let mut rng = Rng(0x9E37_79B9);
        let mut all = Vec::new();
        for _ in 0..2_000 {
            // Few distinct values, so equal extremes enter and leave the window often.
            let transit = i64::from(rng.below(6)) - 2;
            all.push(transit);
            jb.record_transit(0, transit);
            let window = &all[all.len().saturating_sub(8)..];
            let (min, max) = (window.iter().min().copied(), window.iter().max().copied());
            let highest = jb.transit_highs.front().map(|&(_, v)| v);
            assert_eq!((Some(jb.min_transit), highest), (min, max), "after {all:?}");
        }
    }

    #[test]
    fn before_any_packet_the_buffer_is_idle() {
        let mut jb: JitterBuffer<u8> = JitterBuffer::new(JitterConfig::default());
        assert_eq!(jb.pop(Instant::now()), Playout::Missing(MissingReason::Idle));
    }

    #[test]
    fn a_clean_stream_plays_in_order_after_the_minimum_delay() {
        let mut sim = Sim::new(JitterConfig::default());
        sim.stream(0, 1000, 5000, 100, |_| Some(5));
        // The last frame plays at the pop at 2010 ms.
        sim.run(2010);
        assert_eq!(sim.frames(), (1000..1100).collect::<Vec<_>>());
        // Arrival at 5 ms, pops at 10, 30, ...: the first pop's lag is 5 ms < 20 ms, so one
        // Buffering pop, then every frame.
        assert_eq!(sim.played[0], Playout::Missing(MissingReason::Buffering));
        assert!(matches!(&sim.played[1], Playout::Frame(f) if f.sequence == 1000 && f.timestamp == 5000));
        let stats = sim.jb.stats();
        assert_eq!((stats.lost, stats.underruns, stats.too_late, stats.duplicates), (0, 0, 0, 0));
        assert_eq!(sim.jb.target_delay(), Duration::from_millis(20));
    }

    #[test]
    fn reordered_packets_play_in_order() {
        let mut sim = Sim::new(JitterConfig::default());
        // Packets 10 and 11 swap places: 10 arrives at 226 ms, after 11 (225 ms).
        sim.stream(0, 0, 0, 60, |i| Some(if i == 10 { 26 } else { 5 }));
        sim.run(1300);
        assert_eq!(sim.frames(), (0..60).collect::<Vec<_>>());
        assert_eq!(sim.jb.stats().lost, 0);
    }

    #[test]
    fn duplicates_are_dropped_whether_stored_or_played() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterConfig::default());
        assert_eq!(jb.push(t0, packet(1, 7, 0)), PushOutcome::Queued);
        assert_eq!(jb.push(t0, packet(1, 7, 0)), PushOutcome::Duplicate);
        assert_eq!(jb.push(t0, packet(1, 8, 160)), PushOutcome::Queued);
        assert!(matches!(jb.pop(t0 + FRAME), Playout::Frame(PlayoutFrame { sequence: 7, .. })));
        // 7 again after it was played: a duplicate, not a late packet.
        assert_eq!(jb.push(t0 + FRAME, packet(1, 7, 0)), PushOutcome::Duplicate);
        assert_eq!(jb.stats().duplicates, 2);
        assert_eq!(jb.stats().too_late, 0);
    }

    #[test]
    fn a_lost_packet_is_concealed_once_in_its_place() {
        let mut sim = Sim::new(JitterConfig::default());
        sim.stream(0, 65_530, 0, 50, |i| if i == 10 || i == 11 { None } else { Some(5) });
        sim.run(1030);
        let seq = |i: u16| 65_530u16.wrapping_add(i);
        let expected: Vec<u16> = (0..50u16).filter(|i| *i != 10 && *i != 11).map(seq).collect();
        assert_eq!(sim.frames(), expected);
        assert_eq!(sim.jb.stats().lost, 2);
        // Exactly two concealed intervals stand where the two packets would have played: the
        // first while the buffer waited for a possibly late packet (Underrun), the second once
        // the next packet showed the first two were lost.
        let before = sim.played.iter().position(|p| matches!(p, Playout::Frame(f) if f.sequence == seq(9))).unwrap();
        assert_eq!(sim.played[before + 1], Playout::Missing(MissingReason::Underrun));
        assert_eq!(sim.played[before + 2], Playout::Missing(MissingReason::Lost { sequence: seq(11) }));
        assert!(matches!(&sim.played[before + 3], Playout::Frame(f) if f.sequence == seq(12)));
        assert_eq!(sim.jb.stats().shrunk, 0, "no real frame dropped to recover");
    }

    #[test]
    fn an_isolated_loss_with_audio_behind_it_is_reported_as_lost() {
        let mut sim = Sim::new(JitterConfig::default());
        // Packet 20 lost; 21 is already there at 20's turn, which shows 20 lost (not late).
        sim.stream(0, 0, 0, 40, |i| if i == 20 { None } else { Some(15) });
        sim.run(830);
        assert_eq!(sim.lost(), vec![20]);
        assert_eq!(sim.frames().len(), 39);
    }

    #[test]
    fn a_packet_later_than_the_maximum_delay_is_too_late() {
        let mut sim = Sim::new(JitterConfig::default());
        sim.stream(0, 0, 0, 50, |i| Some(if i == 20 { 400 } else { 5 }));
        sim.run(1100);
        assert!(sim.outcomes.contains(&PushOutcome::TooLate));
        assert_eq!(sim.lost(), vec![20]);
        assert!(!sim.frames().contains(&20));
        // The late packet widened the spread, capped at the maximum.
        assert_eq!(sim.jb.target_delay(), Duration::from_millis(200));
    }

    #[test]
    fn the_delay_adapts_to_jitter_and_comes_back_down() {
        let mut sim = Sim::new(JitterConfig::default());
        let mut rng = Rng(7);
        // 10 s of 0–60 ms jitter, then 20 s of a clean network.
        sim.stream(0, 0, 0, 1500, |i| Some(if i < 500 { 5 + u64::from(rng.below(61)) } else { 5 }));
        sim.run(10_000);
        let during = sim.jb.target_delay();
        assert!(during >= Duration::from_millis(50) && during <= Duration::from_millis(61), "{during:?}");
        let stats = sim.jb.stats();
        // Losses only while the target was still learning (first second).
        assert!(stats.lost <= 5, "{stats:?}");
        // Calm for less than the peak hold: the delay stays up.
        sim.run(19_000);
        assert_eq!(sim.jb.target_delay(), during);
        assert_eq!(sim.jb.stats().shrunk, 0);
        sim.run(30_100);
        let after = sim.jb.target_delay();
        assert_eq!(after, Duration::from_millis(20));
        let stats = sim.jb.stats();
        assert!(stats.shrunk >= 1, "{stats:?}");
        // Every packet is played or was accounted as lost or too late; order is kept.
        let frames = sim.frames();
        assert!(frames.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(frames.len() as u64 + stats.lost + stats.shrunk, 1500);
    }

    #[test]
    fn late_bursts_a_few_seconds_apart_cost_one_concealment_not_one_per_burst() {
        let mut sim = Sim::new(JitterConfig::default());
        // A clean stream with two 80 ms stalls 3 s apart (every packet of a stall arrives at its
        // end), as a busy host's scheduler produces.
        let delay = |i: u32| match i {
            100..104 => 5 + 20 * u64::from(104 - i),
            250..254 => 5 + 20 * u64::from(254 - i),
            _ => 5,
        };
        sim.stream(0, 0, 0, 400, |i| Some(delay(i)));
        sim.run(8_100);
        let stats = sim.jb.stats();
        // The first stall grew the delay; the second found it grown; nothing shrank in between.
        assert_eq!(stats.shrunk, 0, "{stats:?}");
        assert_eq!(stats.lost, 0, "{stats:?}");
        assert!(stats.underruns <= 4, "{stats:?}");
        assert!(sim.jb.target_delay() >= Duration::from_millis(80), "{:?}", sim.jb.target_delay());
        assert_eq!(sim.frames().len(), 400);
    }

    #[test]
    fn the_target_never_exceeds_the_maximum() {
        let mut sim = Sim::new(JitterConfig::default());
        let mut rng = Rng(3);
        sim.stream(0, 0, 0, 300, |_| Some(u64::from(rng.below(500))));
        sim.run(7000);
        assert_eq!(sim.jb.target_delay(), Duration::from_millis(200));
        let frames = sim.frames();
        assert!(frames.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn an_ssrc_change_resets() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterConfig::default());
        jb.push(t0, packet(1, 10, 0));
        jb.push(t0, packet(1, 11, 160));
        assert_eq!(jb.push(t0, packet(2, 500, 90_000)), PushOutcome::QueuedAfterReset(ResetReason::SsrcChanged));
        assert_eq!(jb.buffered(), 1);
        assert_eq!(jb.pop(t0), Playout::Missing(MissingReason::Buffering));
        assert!(matches!(jb.pop(t0 + FRAME), Playout::Frame(PlayoutFrame { sequence: 500, .. })));
        assert_eq!(jb.stats().resets, 1);
    }

    #[test]
    fn timestamp_and_sequence_jumps_reset() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterConfig::default());
        jb.push(t0, packet(1, 10, 0));
        // The sequence number moves on by one, the timestamp by an hour.
        assert_eq!(jb.push(t0, packet(1, 11, 8000 * 3600)), PushOutcome::QueuedAfterReset(ResetReason::TimestampJump));
        assert_eq!(
            jb.push(t0, packet(1, 20_000, 8000 * 3600)),
            PushOutcome::QueuedAfterReset(ResetReason::SequenceJump)
        );
        // A timestamp gap that matches a sequence gap is just loss.
        assert_eq!(jb.push(t0, packet(1, 20_050, 8000 * 3600 + 50 * 160)), PushOutcome::Queued);
    }

    #[test]
    fn a_pause_in_the_stream_underruns_then_resumes_without_loss() {
        let mut sim = Sim::new(JitterConfig::default());
        sim.stream(0, 0, 0, 50, |_| Some(5));
        // 1 s of silence not sent (sequence numbers continue, timestamps jump), then more audio.
        sim.stream(2000, 50, 160 * 100, 50, |_| Some(5));
        sim.run(3200);
        assert_eq!(sim.frames(), (0..100).collect::<Vec<_>>());
        let stats = sim.jb.stats();
        assert_eq!(stats.lost, 0);
        assert!(stats.underruns > 0);
    }

    #[test]
    fn overflow_drops_the_oldest() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterConfig { capacity: 8, ..JitterConfig::default() });
        for seq in 0..8u16 {
            assert_eq!(jb.push(t0, packet(1, seq, u32::from(seq) * 160)), PushOutcome::Queued);
        }
        assert_eq!(jb.push(t0, packet(1, 10, 1600)), PushOutcome::Queued);
        assert_eq!(jb.stats().overflow_dropped, 3);
        assert_eq!(jb.buffered(), 6);
        // Playout starts at the oldest kept frame.
        let played: Vec<_> = (1..=12)
            .filter_map(|k| match jb.pop(t0 + FRAME * k) {
                Playout::Frame(f) => Some(f.sequence),
                Playout::Missing(_) => None,
            })
            .collect();
        assert_eq!(played, vec![3, 4, 5, 6, 7, 10]);
    }

    #[test]
    fn a_reordered_first_packet_still_plays_first() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterConfig::default());
        assert_eq!(jb.push(t0, packet(1, 101, 160)), PushOutcome::Queued);
        assert_eq!(jb.push(t0 + Duration::from_millis(2), packet(1, 100, 0)), PushOutcome::Queued);
        assert!(matches!(jb.pop(t0 + Duration::from_millis(30)), Playout::Frame(PlayoutFrame { sequence: 100, .. })));
        assert!(matches!(jb.pop(t0 + Duration::from_millis(50)), Playout::Frame(PlayoutFrame { sequence: 101, .. })));
    }
}
