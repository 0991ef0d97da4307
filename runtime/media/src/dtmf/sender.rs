//! The RFC 4733 sender: the packet schedule of one key press (§2.5.1).

use super::{DtmfDigit, TelephoneEvent};

/// Configuration of a [`DtmfSender`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DtmfSenderConfig {
    /// Timestamp units between reports: the audio packetisation interval, 160 for 20 ms at 8 kHz
    /// (RFC 4733 §2.5.1.2: reports repeat periodically while the key is down; sending them at
    /// the audio's ptime keeps the stream's packet rate unchanged).
    pub interval: u32,
    /// Power level in -dBm0 (§2.3.4); 10 (-10 dBm0) is what most gateways send.
    pub volume: u8,
    /// How many times the final report is sent (§2.5.1.4: three in total).
    pub end_packets: u8,
}

impl Default for DtmfSenderConfig {
    fn default() -> Self {
        Self { interval: 160, volume: 10, end_packets: 3 }
    }
}

/// One telephone-event packet to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DtmfPacket {
    /// RTP marker bit: set on the first packet of the event only (§2.5.1.2).
    pub marker: bool,
    /// RTP timestamp: the start of the event (or of the segment, §2.5.1.3), the same for all its
    /// packets.
    pub timestamp: u32,
    /// The payload.
    pub event: TelephoneEvent,
    /// When to send it, in timestamp units after the start of the event. Packets are due at
    /// whole multiples of the interval; the caller's pacing clock sends each when due, taking a
    /// sequence number from the stream's [`RtpSender`](crate::rtp::RtpSender).
    pub send_offset: u32,
}

/// Builds the packets of key presses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DtmfSender {
    config: DtmfSenderConfig,
}

impl DtmfSender {
    /// A sender with the given schedule.
    pub fn new(config: DtmfSenderConfig) -> Self {
        Self { config }
    }

    /// The packets of one press of `digit` lasting `duration` timestamp units, starting at RTP
    /// timestamp `start` (the stream's current timestamp).
    ///
    /// Every `interval` a report goes out whose duration has grown by one interval (§2.5.1.2),
    /// the first with the marker bit; the last report carries the E bit and the full duration and
    /// goes out `end_packets` times (§2.5.1.4). A press longer than 0xFFFF units is split into
    /// segments (§2.5.1.3): the segment's last report says 0xFFFF without the E bit, then the
    /// event continues with timestamp `start + 0xFFFF`, the marker clear and the duration counted
    /// from the new segment.
    ///
    /// Not done: §2.5.1.4 also asks that the final report of each *segment* be retransmitted; we
    /// send it once (receivers that miss it still join the segments, see `DtmfReceiver`).
    pub fn sequence(&self, digit: DtmfDigit, duration: u32, start: u32) -> DtmfSequence {
        DtmfSequence {
            config: self.config,
            event: digit.event(),
            start,
            // Bounded so that offsets never overflow (a press of three days is not a press).
            total: duration.clamp(1, u32::MAX / 2),
            next_elapsed: self.config.interval.max(1),
            segment_start: 0,
            ends_left: self.config.end_packets.max(1),
            end_offset: 0,
            first: true,
        }
    }
}

/// The packets of one key press, in sending order (see [`DtmfSender::sequence`]).
#[derive(Debug, Clone)]
pub struct DtmfSequence {
    config: DtmfSenderConfig,
    event: u8,
    start: u32,
    total: u32,
    /// Time since the start of the event covered by the next report.
    next_elapsed: u32,
    /// Offset of the current segment from the start of the event.
    segment_start: u32,
    ends_left: u8,
    /// Send offset of the first end packet, once reached.
    end_offset: u32,
    first: bool,
}

const MAX_SEGMENT: u32 = 0xFFFF;

impl Iterator for DtmfSequence {
    type Item = DtmfPacket;

    fn next(&mut self) -> Option<DtmfPacket> {
        let interval = self.config.interval.max(1);
        if self.ends_left == 0 {
            return None;
        }
        let marker = std::mem::take(&mut self.first);
        if self.next_elapsed >= self.total {
            // The final report, and its retransmissions one interval apart.
            if self.end_offset == 0 {
                self.end_offset = self.total.next_multiple_of(interval);
            }
            let sent = u32::from(self.config.end_packets.max(1) - self.ends_left);
            self.ends_left -= 1;
            let duration = (self.total - self.segment_start).min(MAX_SEGMENT) as u16;
            return Some(self.packet(marker, true, duration, self.end_offset + sent * interval));
        }
        let elapsed = self.next_elapsed;
        let in_segment = elapsed - self.segment_start;
        if in_segment > MAX_SEGMENT {
            // §2.5.1.3: report the segment's maximum, then continue in a new segment.
            let last = self.packet(marker, false, MAX_SEGMENT as u16, elapsed);
            self.segment_start += MAX_SEGMENT;
            return Some(last);
        }
        self.next_elapsed += interval;
        Some(self.packet(marker, false, in_segment as u16, elapsed))
    }
}

impl DtmfSequence {
    fn packet(&self, marker: bool, end: bool, duration: u16, send_offset: u32) -> DtmfPacket {
        DtmfPacket {
            marker,
            timestamp: self.start.wrapping_add(self.segment_start),
            event: TelephoneEvent { event: self.event, end, volume: self.config.volume, duration },
            send_offset,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn durations(packets: &[DtmfPacket]) -> Vec<(u16, bool)> {
        packets.iter().map(|p| (p.event.duration, p.event.end)).collect()
    }

    #[test]
    fn a_100ms_press_at_20ms_intervals() {
        let tx = DtmfSender::new(DtmfSenderConfig::default());
        let packets: Vec<_> = tx.sequence(DtmfDigit::D5, 800, 12_345).collect();
        assert_eq!(
            durations(&packets),
            vec![(160, false), (320, false), (480, false), (640, false), (800, true), (800, true), (800, true)]
        );
        let offsets: Vec<_> = packets.iter().map(|p| p.send_offset).collect();
        assert_eq!(offsets, vec![160, 320, 480, 640, 800, 960, 1120]);
        assert!(packets.iter().all(|p| p.timestamp == 12_345 && p.event.event == 5 && p.event.volume == 10));
        let markers: Vec<_> = packets.iter().map(|p| p.marker).collect();
        assert_eq!(markers, vec![true, false, false, false, false, false, false]);
    }

    #[test]
    fn a_duration_that_is_not_a_whole_interval_ends_at_the_next_tick() {
        let tx = DtmfSender::new(DtmfSenderConfig { interval: 400, ..DtmfSenderConfig::default() });
        let packets: Vec<_> = tx.sequence(DtmfDigit::Pound, 1000, 0).collect();
        assert_eq!(durations(&packets), vec![(400, false), (800, false), (1000, true), (1000, true), (1000, true)]);
        let offsets: Vec<_> = packets.iter().map(|p| p.send_offset).collect();
        assert_eq!(offsets, vec![400, 800, 1200, 1600, 2000]);
    }

    #[test]
    fn a_press_shorter_than_one_interval_is_end_packets_only() {
        let tx = DtmfSender::new(DtmfSenderConfig::default());
        let packets: Vec<_> = tx.sequence(DtmfDigit::D0, 100, 7).collect();
        assert_eq!(durations(&packets), vec![(100, true), (100, true), (100, true)]);
        assert!(packets[0].marker);
        assert!(!packets[1].marker);
    }

    #[test]
    fn the_timestamp_wraps_with_the_stream() {
        let tx = DtmfSender::new(DtmfSenderConfig::default());
        let packets: Vec<_> = tx.sequence(DtmfDigit::D1, 320, u32::MAX).collect();
        assert!(packets.iter().all(|p| p.timestamp == u32::MAX));
    }

    #[test]
    fn a_long_press_is_split_into_segments() {
        let tx = DtmfSender::new(DtmfSenderConfig::default());
        let total = 0xFFFF + 800;
        let packets: Vec<_> = tx.sequence(DtmfDigit::D9, total, 1000).collect();
        let first_seg: Vec<_> = packets.iter().filter(|p| p.timestamp == 1000).collect();
        let second_seg: Vec<_> = packets.iter().filter(|p| p.timestamp == 1000 + 0xFFFF).collect();
        assert_eq!(first_seg.len() + second_seg.len(), packets.len());
        // The first segment ends on a report of exactly 0xFFFF, without the E bit.
        let last_first = first_seg.last().unwrap();
        assert_eq!((last_first.event.duration, last_first.event.end), (0xFFFF, false));
        assert!(first_seg.iter().all(|p| !p.event.end));
        // Durations grow monotonically within each segment; the new segment has no marker.
        assert!(first_seg.windows(2).all(|w| w[0].event.duration < w[1].event.duration));
        assert!(second_seg.iter().all(|p| !p.marker));
        let ends: Vec<_> = second_seg.iter().filter(|p| p.event.end).collect();
        assert_eq!(ends.len(), 3);
        assert!(ends.iter().all(|p| u32::from(p.event.duration) == total - 0xFFFF));
        // Sending offsets never go backwards.
        assert!(packets.windows(2).all(|w| w[0].send_offset <= w[1].send_offset));
    }

    #[test]
    fn payloads_encode() {
        let tx = DtmfSender::new(DtmfSenderConfig::default());
        let mut buf = [0u8; 4];
        let last = tx.sequence(DtmfDigit::A, 480, 0).last().unwrap();
        last.event.write(&mut buf).unwrap();
        assert_eq!(buf, [12, 0x80 | 10, 0x01, 0xe0]);
    }
}
