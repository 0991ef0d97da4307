//! The RFC 4733 receiver: telephone-event packets in, one press and one release per key press out.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{DtmfDigit, TelephoneEvent};
use crate::rtp::RtpHeader;

/// Configuration of a [`DtmfReceiver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DtmfReceiverConfig {
    /// Clock rate of the telephone-event payload type (8000 in practice, RFC 4733 §7.1.1).
    pub clock_rate: u32,
    /// An event whose reports stop without an end packet (all three lost) is released this long
    /// after its last report. RFC 4733 leaves this soft-state timeout to the receiver; senders
    /// update every packetisation interval (typically 20–50 ms, §2.5.1.2), so 250 ms is at least
    /// five lost updates.
    pub release_timeout: Duration,
    /// Slack, in timestamp units, when recognising the next segment of a long event (§2.5.2.3):
    /// the previous segment must have reported at least `0xFFFF - slack` and the new segment
    /// must start within `slack` of `0xFFFF` after it.
    pub segment_slack: u32,
}

impl Default for DtmfReceiverConfig {
    fn default() -> Self {
        Self { clock_rate: 8_000, release_timeout: Duration::from_millis(250), segment_slack: 1_600 }
    }
}

/// Why a press ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReleaseReason {
    /// A report with the E bit arrived (§2.5.1.4; retransmissions are counted once).
    EndBit,
    /// Reports stopped without an end packet.
    Timeout,
    /// A new event (a later RTP timestamp) arrived before this one's end packet.
    Superseded,
    /// The RTP stream changed SSRC.
    SourceChanged,
}

/// What the receiver reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DtmfEvent {
    /// A key press began. Emitted exactly once per press, on its first report heard.
    Pressed {
        /// The event code.
        event: u8,
        /// The DTMF key, if the event is one (codes 0–15).
        digit: Option<DtmfDigit>,
        /// RTP timestamp of the press: what identifies it (every report of one event carries the
        /// event's start as its timestamp, RFC 4733 §2.5.1.2; DESIGN.md).
        timestamp: u32,
    },
    /// The key press ended. Emitted exactly once per press, after its `Pressed`.
    Released {
        /// The event code.
        event: u8,
        /// The DTMF key, if the event is one.
        digit: Option<DtmfDigit>,
        /// RTP timestamp of the press (of its first segment).
        timestamp: u32,
        /// Total duration heard, in timestamp units, over all segments of a long event.
        duration: u64,
        /// Why it ended.
        reason: ReleaseReason,
    },
}

/// Counters for monitoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DtmfReceiverStats {
    /// Packets handled.
    pub packets: u64,
    /// Presses reported.
    pub presses: u64,
    /// Packets ignored as belonging to an event already released or older than the current one
    /// (end-packet retransmissions, duplicates, late reordered packets).
    pub stale: u64,
    /// Presses released by timeout.
    pub timeouts: u64,
    /// Presses released because a newer event arrived first.
    pub superseded: u64,
    /// Long-event segments joined to their press (§2.5.2.3).
    pub segments: u64,
}

#[derive(Debug, Clone, Copy)]
struct ActivePress {
    event: u8,
    /// RTP timestamp of the first segment: the press's identity.
    timestamp: u32,
    /// RTP timestamp of the current segment.
    segment_timestamp: u32,
    /// Total duration of the completed segments.
    prior_segments: u64,
    /// Highest duration reported in the current segment.
    segment_duration: u16,
    last_heard: Instant,
}

impl ActivePress {
    fn duration(&self) -> u64 {
        self.prior_segments + u64::from(self.segment_duration)
    }
}

/// The receiver's state (one enum per RFC state machine, CONVENTIONS §3):
///
/// ```text
///            report with a new, later timestamp
///   +------+ -----------------------------------> +--------+
///   | Idle |      (emit Pressed)                  | Active |--+ report, same timestamp:
///   +------+ <----------------------------------- +--------+<-+ duration grows
///       ^      E bit / timeout / SSRC change          |  ^
///       |      (emit Released)                        |  | next segment of a long event
///       |                                             +--+ (same code, ts ≈ segment + 0xFFFF)
///       |   report with a newer timestamp: Released (Superseded), then Pressed of the new one
/// ```
///
/// A report whose timestamp is not newer than the last released press, or older than the
/// current one, is stale and ignored: this is what counts the three end packets of §2.5.1.4
/// once and drops duplicates and late reordered packets.
#[derive(Debug, Clone, Copy)]
enum State {
    Idle,
    Active(ActivePress),
}

/// Turns RFC 4733 telephone-event packets into key presses (sans-IO).
///
/// Feed every telephone-event packet to [`DtmfReceiver::handle_packet`] with its RTP header, call
/// [`DtmfReceiver::handle_timeout`] when [`DtmfReceiver::poll_timeout`] says, and drain
/// [`DtmfReceiver::poll_event`] after each.
///
/// A press is identified by its RTP timestamp (§2.5.1.2), never by the marker bit, which many
/// carriers omit; a set marker only rules out that a packet continues a long event.
#[derive(Debug, Clone)]
pub struct DtmfReceiver {
    config: DtmfReceiverConfig,
    state: State,
    ssrc: Option<u32>,
    /// Segment timestamp of the last released press: reports at or before it are stale.
    released_up_to: Option<u32>,
    events: VecDeque<DtmfEvent>,
    stats: DtmfReceiverStats,
}

/// `a` is after `b` in RTP timestamp serial arithmetic (RFC 3550 §5.1: timestamps wrap).
fn is_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

impl DtmfReceiver {
    /// A receiver that has heard nothing.
    pub fn new(config: DtmfReceiverConfig) -> Self {
        // Each input yields at most three events; the queue never grows if drained after each.
        Self {
            config,
            state: State::Idle,
            ssrc: None,
            released_up_to: None,
            events: VecDeque::with_capacity(4),
            stats: DtmfReceiverStats::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> DtmfReceiverStats {
        self.stats
    }

    /// Whether a press is in progress.
    pub fn is_pressed(&self) -> bool {
        matches!(self.state, State::Active(_))
    }

    /// Handles one telephone-event packet received at `now`.
    pub fn handle_packet(&mut self, now: Instant, header: &RtpHeader, report: TelephoneEvent) {
        self.stats.packets += 1;
        if self.ssrc.is_some_and(|s| s != header.ssrc) {
            // A new source numbers its timestamps afresh: forget the old one.
            self.release(ReleaseReason::SourceChanged);
            self.released_up_to = None;
        }
        self.ssrc = Some(header.ssrc);
        let ts = header.timestamp;
        if self.released_up_to.is_some_and(|r| !is_after(ts, r)) {
            self.stats.stale += 1;
            return;
        }
        match self.state {
            State::Idle => self.press(now, ts, report),
            State::Active(mut active) => {
                if ts == active.segment_timestamp && report.event == active.event {
                    active.segment_duration = active.segment_duration.max(report.duration);
                    active.last_heard = now;
                    self.state = State::Active(active);
                    if report.end {
                        self.release(ReleaseReason::EndBit);
                    }
                } else if !is_after(ts, active.segment_timestamp) {
                    // From an earlier segment of this press, or from before it; or another event
                    // code at this segment's timestamp, which identifies the press already
                    // reported (superseding it would report one timestamp as a new press per
                    // packet).
                    self.stats.stale += 1;
                } else if self.is_next_segment(&active, ts, &report, header.marker) {
                    // §2.5.2.3: the same event continues in a new segment.
                    self.stats.segments += 1;
                    active.prior_segments += u64::from(ts.wrapping_sub(active.segment_timestamp));
                    active.segment_timestamp = ts;
                    active.segment_duration = report.duration;
                    active.last_heard = now;
                    self.state = State::Active(active);
                    if report.end {
                        self.release(ReleaseReason::EndBit);
                    }
                } else {
                    // A new press before this one's end packets: they were lost.
                    self.stats.superseded += 1;
                    self.release(ReleaseReason::Superseded);
                    self.press(now, ts, report);
                }
            }
        }
    }

    fn is_next_segment(&self, active: &ActivePress, ts: u32, report: &TelephoneEvent, marker: bool) -> bool {
        let slack = self.config.segment_slack;
        let delta = ts.wrapping_sub(active.segment_timestamp);
        report.event == active.event
            && !marker
            && u32::from(active.segment_duration) + slack >= 0xFFFF
            && delta + slack >= 0xFFFF
            && delta <= 0xFFFF + slack
    }

    fn press(&mut self, now: Instant, ts: u32, report: TelephoneEvent) {
        self.stats.presses += 1;
        let active = ActivePress {
            event: report.event,
            timestamp: ts,
            segment_timestamp: ts,
            prior_segments: 0,
            segment_duration: report.duration,
            last_heard: now,
        };
        self.state = State::Active(active);
        self.events.push_back(DtmfEvent::Pressed { event: report.event, digit: report.digit(), timestamp: ts });
        if report.end {
            // Only the end of the event was heard: still one press.
            self.release(ReleaseReason::EndBit);
        }
    }

    fn release(&mut self, reason: ReleaseReason) {
        let State::Active(active) = self.state else { return };
        self.state = State::Idle;
        self.released_up_to = Some(active.segment_timestamp);
        self.events.push_back(DtmfEvent::Released {
            event: active.event,
            digit: DtmfDigit::from_event(active.event),
            timestamp: active.timestamp,
            duration: active.duration(),
            reason,
        });
    }

    /// When [`DtmfReceiver::handle_timeout`] should next be called, if a press is in progress.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Active(a) => Some(a.last_heard + self.config.release_timeout),
            State::Idle => None,
        }
    }

    /// Releases a press whose reports stopped.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.poll_timeout().is_some_and(|deadline| now >= deadline) {
            self.stats.timeouts += 1;
            self.release(ReleaseReason::Timeout);
        }
    }

    /// The next press or release, in order.
    pub fn poll_event(&mut self) -> Option<DtmfEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtmf::{DtmfSender, DtmfSenderConfig};

    const MS20: Duration = Duration::from_millis(20);

    struct Harness {
        rx: DtmfReceiver,
        t0: Instant,
        seq: u16,
    }

    impl Harness {
        fn new() -> Self {
            Self { rx: DtmfReceiver::new(DtmfReceiverConfig::default()), t0: Instant::now(), seq: 100 }
        }

        fn feed(&mut self, at_ms: u64, ts: u32, marker: bool, event: u8, end: bool, duration: u16) {
            self.seq = self.seq.wrapping_add(1);
            let header = RtpHeader { marker, payload_type: 101, sequence: self.seq, timestamp: ts, ssrc: 9 };
            let report = TelephoneEvent { event, end, volume: 10, duration };
            self.rx.handle_packet(self.t0 + Duration::from_millis(at_ms), &header, report);
        }

        fn drain(&mut self) -> Vec<DtmfEvent> {
            std::iter::from_fn(|| self.rx.poll_event()).collect()
        }

        /// A whole well-behaved key press: updates every 20 ms and three end packets.
        fn press(&mut self, start_ms: u64, ts: u32, event: u8, duration: u16) {
            let mut d = 160u16;
            let mut at = start_ms;
            let mut first = true;
            while d < duration {
                self.feed(at, ts, first, event, false, d);
                first = false;
                d += 160;
                at += 20;
            }
            for _ in 0..3 {
                self.feed(at, ts, first, event, true, duration);
                first = false;
                at += 20;
            }
        }
    }

    fn pressed(event: u8, timestamp: u32) -> DtmfEvent {
        DtmfEvent::Pressed { event, digit: DtmfDigit::from_event(event), timestamp }
    }

    fn released(event: u8, timestamp: u32, duration: u64, reason: ReleaseReason) -> DtmfEvent {
        DtmfEvent::Released { event, digit: DtmfDigit::from_event(event), timestamp, duration, reason }
    }

    #[test]
    fn one_press_with_three_end_packets_is_one_digit() {
        let mut h = Harness::new();
        h.press(0, 8000, 5, 800);
        assert_eq!(h.drain(), vec![pressed(5, 8000), released(5, 8000, 800, ReleaseReason::EndBit)]);
        let stats = h.rx.stats();
        assert_eq!(stats.presses, 1);
        // The two retransmitted end packets.
        assert_eq!(stats.stale, 2);
        assert!(!h.rx.is_pressed());
        assert_eq!(h.rx.poll_timeout(), None);
    }

    #[test]
    fn pressed_is_reported_on_the_first_packet() {
        let mut h = Harness::new();
        h.feed(0, 1000, true, 1, false, 160);
        assert_eq!(h.drain(), vec![pressed(1, 1000)]);
        h.feed(20, 1000, false, 1, false, 320);
        assert_eq!(h.drain(), vec![]);
        assert!(h.rx.is_pressed());
    }

    #[test]
    fn the_same_key_twice_is_two_presses() {
        let mut h = Harness::new();
        h.press(0, 8000, 7, 800);
        h.press(300, 8000 + 2400, 7, 640);
        let events = h.drain();
        assert_eq!(
            events,
            vec![
                pressed(7, 8000),
                released(7, 8000, 800, ReleaseReason::EndBit),
                pressed(7, 10_400),
                released(7, 10_400, 640, ReleaseReason::EndBit),
            ]
        );
    }

    #[test]
    fn a_missing_marker_changes_nothing() {
        let mut h = Harness::new();
        for (i, d) in [160u16, 320, 480].into_iter().enumerate() {
            h.feed(20 * i as u64, 500, false, 2, false, d);
        }
        for i in 0..3 {
            h.feed(60 + 20 * i, 500, false, 2, true, 640);
        }
        assert_eq!(h.drain(), vec![pressed(2, 500), released(2, 500, 640, ReleaseReason::EndBit)]);
    }

    #[test]
    fn duplicates_and_reordered_updates_are_harmless() {
        let mut h = Harness::new();
        h.feed(0, 100, true, 3, false, 160);
        h.feed(1, 100, true, 3, false, 160);
        h.feed(40, 100, false, 3, false, 480);
        h.feed(41, 100, false, 3, false, 320);
        h.feed(60, 100, false, 3, true, 640);
        h.feed(61, 100, false, 3, false, 480);
        h.feed(62, 100, false, 3, true, 640);
        h.feed(80, 100, false, 3, true, 640);
        assert_eq!(h.drain(), vec![pressed(3, 100), released(3, 100, 640, ReleaseReason::EndBit)]);
    }

    #[test]
    fn lost_end_packets_release_on_timeout() {
        let mut h = Harness::new();
        h.feed(0, 100, true, 9, false, 160);
        h.feed(20, 100, false, 9, false, 320);
        assert_eq!(h.drain(), vec![pressed(9, 100)]);
        let deadline = h.rx.poll_timeout().unwrap();
        assert_eq!(deadline, h.t0 + MS20 + Duration::from_millis(250));
        h.rx.handle_timeout(deadline - Duration::from_millis(1));
        assert_eq!(h.drain(), vec![]);
        h.rx.handle_timeout(deadline);
        assert_eq!(h.drain(), vec![released(9, 100, 320, ReleaseReason::Timeout)]);
        assert_eq!(h.rx.poll_timeout(), None);
        // The end packets turning up late do not make a second press.
        h.feed(400, 100, false, 9, true, 480);
        assert_eq!(h.drain(), vec![]);
        assert_eq!(h.rx.stats().timeouts, 1);
    }

    #[test]
    fn lost_end_packets_release_when_the_next_press_starts() {
        let mut h = Harness::new();
        h.feed(0, 100, true, 1, false, 160);
        h.feed(20, 100, false, 1, false, 320);
        h.feed(100, 900, true, 2, false, 160);
        assert_eq!(h.drain(), vec![pressed(1, 100), released(1, 100, 320, ReleaseReason::Superseded), pressed(2, 900)]);
        // Same key again, new timestamp, no marker, end packets of the first all lost.
        h.feed(200, 1700, false, 2, false, 160);
        assert_eq!(h.drain(), vec![released(2, 900, 160, ReleaseReason::Superseded), pressed(2, 1700)]);
        assert_eq!(h.rx.stats().superseded, 2);
    }

    #[test]
    fn only_an_end_packet_heard_is_still_one_press() {
        let mut h = Harness::new();
        h.feed(0, 100, false, 0, true, 800);
        h.feed(20, 100, false, 0, true, 800);
        assert_eq!(h.drain(), vec![pressed(0, 100), released(0, 100, 800, ReleaseReason::EndBit)]);
    }

    #[test]
    fn late_packets_of_an_earlier_press_are_ignored() {
        let mut h = Harness::new();
        h.feed(0, 100, true, 4, false, 160);
        h.feed(20, 900, true, 6, false, 160);
        // The first press's end packet, reordered behind the second press.
        h.feed(21, 100, false, 4, true, 320);
        h.feed(40, 900, false, 6, true, 320);
        assert_eq!(
            h.drain(),
            vec![
                pressed(4, 100),
                released(4, 100, 160, ReleaseReason::Superseded),
                pressed(6, 900),
                released(6, 900, 320, ReleaseReason::EndBit),
            ]
        );
    }

    #[test]
    fn presses_across_the_timestamp_wrap() {
        let mut h = Harness::new();
        let before = u32::MAX - 400;
        h.press(0, before, 1, 480);
        let after = before.wrapping_add(2000);
        assert!(after < 2000);
        h.press(300, after, 2, 480);
        // A stale retransmission of the first press, after the wrap.
        h.feed(400, before, false, 1, true, 480);
        assert_eq!(
            h.drain(),
            vec![
                pressed(1, before),
                released(1, before, 480, ReleaseReason::EndBit),
                pressed(2, after),
                released(2, after, 480, ReleaseReason::EndBit),
            ]
        );
    }

    #[test]
    fn a_long_event_continues_across_segments() {
        // §2.5.1.3: after 0xFFFF timestamp units (8.2 s at 8 kHz) the sender starts a new
        // segment whose timestamp is the old one plus 0xFFFF, with the marker clear.
        let mut h = Harness::new();
        let ts = u32::MAX - 30_000; // the second segment also crosses the timestamp wrap
        let mut d = 160u32;
        let mut at = 0u64;
        h.feed(at, ts, true, 8, false, 160);
        while d < 0xFFFF {
            d = (d + 160).min(0xFFFF);
            at += 20;
            h.feed(at, ts, false, 8, false, d as u16);
        }
        let seg2 = ts.wrapping_add(0xFFFF);
        for d2 in [160u16, 320, 480] {
            at += 20;
            h.feed(at, seg2, false, 8, false, d2);
        }
        for _ in 0..3 {
            at += 20;
            h.feed(at, seg2, false, 8, true, 640);
        }
        // A late packet of the first segment.
        h.feed(at, ts, false, 8, false, 0xFFFF);
        assert_eq!(h.drain(), vec![pressed(8, ts), released(8, ts, 0xFFFF + 640, ReleaseReason::EndBit)]);
        assert_eq!(h.rx.stats().segments, 1);
    }

    #[test]
    fn a_short_press_is_not_mistaken_for_a_segment() {
        let mut h = Harness::new();
        h.feed(0, 100, true, 8, false, 800);
        // Same key 0xFFFF later, but the first press never got near the maximum duration.
        h.feed(9000, 100 + 0xFFFF, false, 8, false, 160);
        let events = h.drain();
        assert_eq!(events[1], released(8, 100, 800, ReleaseReason::Superseded));
        assert_eq!(events[2], pressed(8, 100 + 0xFFFF));
    }

    #[test]
    fn an_ssrc_change_releases_and_forgets() {
        let mut h = Harness::new();
        h.feed(0, 5000, true, 1, false, 160);
        let header = RtpHeader { marker: true, payload_type: 101, sequence: 1, timestamp: 10, ssrc: 77 };
        h.rx.handle_packet(h.t0 + MS20, &header, TelephoneEvent { event: 2, end: false, volume: 10, duration: 160 });
        assert_eq!(
            h.drain(),
            vec![pressed(1, 5000), released(1, 5000, 160, ReleaseReason::SourceChanged), pressed(2, 10)]
        );
    }

    #[test]
    fn what_the_sender_sends_the_receiver_hears_once() {
        let tx = DtmfSender::new(DtmfSenderConfig::default());
        let t0 = Instant::now();
        let mut rx = DtmfReceiver::new(DtmfReceiverConfig::default());
        let mut seq = 0u16;
        for (i, digit) in [DtmfDigit::D1, DtmfDigit::Star, DtmfDigit::D1].into_iter().enumerate() {
            let start_ts = 1000 + i as u32 * 4000;
            for p in tx.sequence(digit, 800, start_ts) {
                seq = seq.wrapping_add(1);
                let header =
                    RtpHeader { marker: p.marker, payload_type: 101, sequence: seq, timestamp: p.timestamp, ssrc: 1 };
                let at = t0 + Duration::from_micros(u64::from(start_ts + p.send_offset) * 125);
                rx.handle_packet(at, &header, p.event);
            }
        }
        let events: Vec<_> = std::iter::from_fn(|| rx.poll_event()).collect();
        let digits: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                DtmfEvent::Pressed { digit, .. } => *digit,
                DtmfEvent::Released { .. } => None,
            })
            .collect();
        assert_eq!(digits, vec![DtmfDigit::D1, DtmfDigit::Star, DtmfDigit::D1]);
        assert_eq!(events.len(), 6);
        assert!(
            events.iter().all(|e| !matches!(e, DtmfEvent::Released { reason, .. } if *reason != ReleaseReason::EndBit))
        );
    }
}
