//! The outgoing packetiser of one RTP stream (RFC 3550 §5.1, RFC 3551 §4.1).

use std::time::Instant;

use super::rtcp::{NtpTime, SenderInfo};
use super::{RtpError, RtpHeader};

/// Configuration of an [`RtpSender`].
///
/// The initial sequence number and timestamp "SHOULD be random" (RFC 3550 §5.1); being sans-IO,
/// the sender takes them from the caller, who draws them from its RNG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpSenderConfig {
    /// Our SSRC (random, chosen by the caller; RFC 3550 §8).
    pub ssrc: u32,
    /// Payload type of the audio (0 PCMU, 8 PCMA, or dynamic).
    pub payload_type: u8,
    /// Media clock rate, 8000 for G.711.
    pub clock_rate: u32,
    /// Samples per packet: 160 for 20 ms at 8 kHz.
    pub samples_per_frame: u32,
    /// Random initial sequence number.
    pub initial_sequence: u16,
    /// Random initial timestamp.
    pub initial_timestamp: u32,
}

/// Numbers and stamps the packets of one outgoing RTP stream.
///
/// Each audio frame advances the timestamp by `samples_per_frame` and the sequence number by one.
/// The marker bit is set on the first packet of every talkspurt (RFC 3551 §4.1), which includes
/// the first packet of the stream and the first after [`RtpSender::skip_frames`] (silence not
/// sent). Packets that share the stream but are not audio frames (RFC 4733 telephone events) take
/// sequence numbers with [`RtpSender::take_sequence`] and report what they sent with
/// [`RtpSender::record_sent`], so that the SR counts stay right.
#[derive(Debug, Clone)]
pub struct RtpSender {
    config: RtpSenderConfig,
    next_sequence: u16,
    next_timestamp: u32,
    talkspurt_start: bool,
    packet_count: u32,
    octet_count: u32,
    /// The RTP timestamp of the last frame sent and when it was sent, for the SR's timestamp.
    last_sent: Option<(Instant, u32)>,
}

impl RtpSender {
    /// A sender about to send its first packet, which will carry the marker bit.
    pub fn new(config: RtpSenderConfig) -> Self {
        Self {
            config,
            next_sequence: config.initial_sequence,
            next_timestamp: config.initial_timestamp,
            talkspurt_start: true,
            packet_count: 0,
            octet_count: 0,
            last_sent: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &RtpSenderConfig {
        &self.config
    }

    /// Our SSRC.
    pub fn ssrc(&self) -> u32 {
        self.config.ssrc
    }

    /// The timestamp the next audio frame will carry.
    pub fn next_timestamp(&self) -> u32 {
        self.next_timestamp
    }

    /// The sequence number the next packet will carry.
    pub fn next_sequence(&self) -> u16 {
        self.next_sequence
    }

    /// The header for the next audio frame, advancing sequence number and timestamp and counting
    /// a packet of `payload_len` octets as sent at `now`.
    pub fn next_header(&mut self, now: Instant, payload_len: usize) -> RtpHeader {
        let header = RtpHeader {
            marker: self.talkspurt_start,
            payload_type: self.config.payload_type,
            sequence: self.next_sequence,
            timestamp: self.next_timestamp,
            ssrc: self.config.ssrc,
        };
        self.talkspurt_start = false;
        self.next_sequence = self.next_sequence.wrapping_add(1);
        self.last_sent = Some((now, self.next_timestamp));
        self.next_timestamp = self.next_timestamp.wrapping_add(self.config.samples_per_frame);
        self.count(payload_len);
        header
    }

    /// Writes the next audio frame into `out` and returns the packet length. On error (buffer too
    /// small) nothing advances.
    pub fn write_frame(&mut self, now: Instant, payload: &[u8], out: &mut [u8]) -> Result<usize, RtpError> {
        let mut probe = self.clone();
        let header = probe.next_header(now, payload.len());
        let n = header.write(payload, out)?;
        *self = probe;
        Ok(n)
    }

    /// Skips `frames` frames of silence that are not sent (silence suppression, or a flow that
    /// is on hold): the timestamp advances as if they had been, the sequence number does not, and
    /// the next packet starts a new talkspurt (RFC 3551 §4.1).
    pub fn skip_frames(&mut self, frames: u32) {
        if frames == 0 {
            return;
        }
        self.next_timestamp = self.next_timestamp.wrapping_add(frames.wrapping_mul(self.config.samples_per_frame));
        self.talkspurt_start = true;
    }

    /// Marks the next audio packet as the first of a talkspurt.
    pub fn start_talkspurt(&mut self) {
        self.talkspurt_start = true;
    }

    /// Takes a sequence number for a packet of this stream that is not an audio frame (an RFC 4733
    /// event packet carries its own timestamp and marker).
    pub fn take_sequence(&mut self) -> u16 {
        let seq = self.next_sequence;
        self.next_sequence = self.next_sequence.wrapping_add(1);
        seq
    }

    /// Counts a packet built outside [`RtpSender::next_header`] (with a sequence number from
    /// [`RtpSender::take_sequence`]) in the SR's packet and octet counts.
    pub fn record_sent(&mut self, payload_len: usize) {
        self.count(payload_len);
    }

    fn count(&mut self, payload_len: usize) {
        // RFC 3550 §6.4.1: both counts wrap; the octet count covers payload octets only.
        self.packet_count = self.packet_count.wrapping_add(1);
        self.octet_count = self.octet_count.wrapping_add(payload_len as u32);
    }

    /// Packets sent so far (wrapping).
    pub fn packet_count(&self) -> u32 {
        self.packet_count
    }

    /// The sender information of an SR sent at `now`, whose wall-clock time is `ntp`
    /// (RFC 3550 §6.4.1): the RTP timestamp is the last frame's timestamp advanced by the time
    /// since it was sent, so that it "corresponds to the same time as the NTP timestamp".
    pub fn sender_info(&self, now: Instant, ntp: NtpTime) -> SenderInfo {
        let rtp_timestamp = match self.last_sent {
            Some((at, ts)) => {
                let elapsed = now.saturating_duration_since(at).as_nanos();
                let units = elapsed * u128::from(self.config.clock_rate) / 1_000_000_000;
                ts.wrapping_add(units as u32)
            }
            None => self.next_timestamp,
        };
        SenderInfo { ntp, rtp_timestamp, packet_count: self.packet_count, octet_count: self.octet_count }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::rtp::RtpPacket;

    fn config() -> RtpSenderConfig {
        RtpSenderConfig {
            ssrc: 0x1234_5678,
            payload_type: 0,
            clock_rate: 8000,
            samples_per_frame: 160,
            initial_sequence: 65_534,
            initial_timestamp: u32::MAX - 159,
        }
    }

    #[test]
    fn frames_advance_sequence_and_timestamp_with_marker_on_the_first() {
        let t0 = Instant::now();
        let mut s = RtpSender::new(config());
        let mut buf = [0u8; 200];
        let mut headers = Vec::new();
        for i in 0..4u32 {
            let n = s.write_frame(t0 + Duration::from_millis(20) * i, &[0xff; 160], &mut buf).unwrap();
            assert_eq!(n, 172);
            headers.push(RtpPacket::parse(&buf[..n]).unwrap().header);
        }
        let seqs: Vec<_> = headers.iter().map(|h| h.sequence).collect();
        let stamps: Vec<_> = headers.iter().map(|h| h.timestamp).collect();
        let markers: Vec<_> = headers.iter().map(|h| h.marker).collect();
        assert_eq!(seqs, vec![65_534, 65_535, 0, 1]);
        assert_eq!(stamps, vec![u32::MAX - 159, 0, 160, 320]);
        assert_eq!(markers, vec![true, false, false, false]);
        assert!(headers.iter().all(|h| h.ssrc == 0x1234_5678 && h.payload_type == 0));
        assert_eq!(s.packet_count(), 4);
    }

    #[test]
    fn a_skipped_silence_advances_the_timestamp_and_marks_the_next_talkspurt() {
        let t0 = Instant::now();
        let mut s = RtpSender::new(RtpSenderConfig { initial_sequence: 10, initial_timestamp: 1000, ..config() });
        let h1 = s.next_header(t0, 160);
        let h2 = s.next_header(t0, 160);
        s.skip_frames(50);
        let h3 = s.next_header(t0, 160);
        let h4 = s.next_header(t0, 160);
        assert_eq!((h1.marker, h2.marker, h3.marker, h4.marker), (true, false, true, false));
        assert_eq!(h3.sequence, 12);
        assert_eq!(h3.timestamp, 1000 + 160 * 52);
        s.skip_frames(0);
        assert!(!s.next_header(t0, 160).marker);
        s.start_talkspurt();
        assert!(s.next_header(t0, 160).marker);
    }

    #[test]
    fn event_packets_share_the_sequence_space() {
        let t0 = Instant::now();
        let mut s = RtpSender::new(RtpSenderConfig { initial_sequence: 7, ..config() });
        s.next_header(t0, 160);
        assert_eq!(s.take_sequence(), 8);
        s.record_sent(4);
        assert_eq!(s.next_header(t0, 160).sequence, 9);
        let info = s.sender_info(t0, NtpTime(1));
        assert_eq!(info.packet_count, 3);
        assert_eq!(info.octet_count, 324);
    }

    #[test]
    fn sender_report_timestamp_is_extrapolated_to_now() {
        let t0 = Instant::now();
        let mut s = RtpSender::new(RtpSenderConfig { initial_timestamp: 5000, ..config() });
        assert_eq!(s.sender_info(t0, NtpTime(0)).rtp_timestamp, 5000);
        s.next_header(t0, 160);
        let info = s.sender_info(t0 + Duration::from_millis(35), NtpTime(9));
        assert_eq!(info.rtp_timestamp, 5000 + 280);
        assert_eq!(info.ntp, NtpTime(9));
        assert_eq!((info.packet_count, info.octet_count), (1, 160));
    }

    #[test]
    fn a_failed_write_changes_nothing() {
        let t0 = Instant::now();
        let mut s = RtpSender::new(config());
        let mut small = [0u8; 100];
        assert!(s.write_frame(t0, &[0; 160], &mut small).is_err());
        assert_eq!(s.next_sequence(), 65_534);
        assert_eq!(s.packet_count(), 0);
        let mut buf = [0u8; 200];
        let n = s.write_frame(t0, &[0; 160], &mut buf).unwrap();
        assert!(RtpPacket::parse(&buf[..n]).unwrap().header.marker);
    }
}
