//! Per-source receive statistics (RFC 3550 A.1, A.3, A.8) and the report blocks built from them.

use std::time::{Duration, Instant};

use super::RtpHeader;
use super::rtcp::{NtpTime, ReportBlock, to_ntp_short};

/// RFC 3550 A.1: a jump of this many sequence numbers or more is not taken as in-order.
const MAX_DROPOUT: u16 = 3000;
/// RFC 3550 A.1: a packet up to this many behind the highest is taken as reordered.
const MAX_MISORDER: u16 = 100;
const RTP_SEQ_MOD: u64 = 1 << 16;

/// Configuration of [`ReceiveStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiveStatsConfig {
    /// The media clock rate (8000 for G.711 and telephone-event).
    pub clock_rate: u32,
    /// Sequential packets needed before a new source is valid (RFC 3550 A.1 `MIN_SEQUENTIAL`,
    /// 2 in the RFC). 0 or 1 accepts a source on its first packet.
    pub min_sequential: u16,
}

impl Default for ReceiveStatsConfig {
    fn default() -> Self {
        Self { clock_rate: 8_000, min_sequential: 2 }
    }
}

/// What the sequence-number rules of RFC 3550 A.1 made of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqVerdict {
    /// The packet counts: in order, after a small gap, reordered or duplicated.
    Accepted {
        /// Its sequence number extended with the cycle count.
        extended_seq: u64,
    },
    /// The source is still on probation (not yet `min_sequential` packets in a row).
    Probation,
    /// A jump of `MAX_DROPOUT` or more: not counted. If the next packet follows this one, the
    /// source is taken to have restarted and statistics start over from it (A.1 `bad_seq`).
    Jump,
}

/// What [`ReceiveStats::on_packet`] concluded about one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketVerdict {
    /// The sequence-number verdict.
    pub seq: SeqVerdict,
    /// The previous SSRC, if this packet came from a different one (statistics were reset).
    pub ssrc_changed_from: Option<u32>,
}

#[derive(Debug, Clone, Copy)]
struct SourceState {
    ssrc: u32,
    max_seq: u16,
    /// Shifted count of sequence number cycles (multiples of 65536), as in A.1.
    cycles: u64,
    base_seq: u64,
    /// Last "bad" sequence number + 1, or `RTP_SEQ_MOD + 1` for none.
    bad_seq: u64,
    probation: u16,
    min_sequential: u16,
    received: u64,
    expected_prior: u64,
    received_prior: u64,
    /// Relative transit time of the previous packet (A.8), in timestamp units.
    transit: Option<u32>,
    /// Jitter scaled by 16, as the integer code of A.8 keeps it.
    jitter_q4: u32,
    /// Middle 32 bits of the last SR's NTP time, and when it arrived.
    last_sr: Option<(u32, Instant)>,
}

impl SourceState {
    /// A.1 `init_seq`.
    fn init_seq(&mut self, seq: u16) {
        self.base_seq = u64::from(seq);
        self.max_seq = seq;
        self.bad_seq = RTP_SEQ_MOD + 1;
        self.cycles = 0;
        self.received = 0;
        self.received_prior = 0;
        self.expected_prior = 0;
    }

    fn new(ssrc: u32, seq: u16, min_sequential: u16) -> Self {
        let mut s = Self {
            ssrc,
            max_seq: 0,
            cycles: 0,
            base_seq: 0,
            bad_seq: 0,
            probation: 0,
            min_sequential,
            received: 0,
            expected_prior: 0,
            received_prior: 0,
            transit: None,
            jitter_q4: 0,
            last_sr: None,
        };
        s.init_seq(seq);
        // A.1: "s->max_seq = seq - 1; s->probation = MIN_SEQUENTIAL;"
        s.max_seq = seq.wrapping_sub(1);
        s.probation = min_sequential;
        s
    }

    fn extended_max(&self) -> u64 {
        self.cycles + u64::from(self.max_seq)
    }

    /// A.1 `update_seq`, returning the verdict instead of 0/1.
    fn update_seq(&mut self, seq: u16) -> SeqVerdict {
        let udelta = seq.wrapping_sub(self.max_seq);
        if self.probation > 0 {
            // Packets must be in sequence during probation.
            if seq == self.max_seq.wrapping_add(1) {
                self.probation -= 1;
                self.max_seq = seq;
                if self.probation == 0 {
                    self.init_seq(seq);
                    self.received += 1;
                    return SeqVerdict::Accepted { extended_seq: self.extended_max() };
                }
            } else {
                self.probation = self.min_sequential - 1;
                self.max_seq = seq;
            }
            return SeqVerdict::Probation;
        } else if udelta < MAX_DROPOUT {
            // In order, with a permissible gap.
            if seq < self.max_seq {
                // Sequence number wrapped: count another 64K cycle.
                self.cycles += RTP_SEQ_MOD;
            }
            self.max_seq = seq;
        } else if u64::from(udelta) <= RTP_SEQ_MOD - u64::from(MAX_MISORDER) {
            // The sequence number made a very large jump.
            if u64::from(seq) == self.bad_seq {
                // Two sequential packets: assume the other side restarted without telling us,
                // so just re-sync (i.e. pretend this was the first packet).
                self.init_seq(seq);
            } else {
                self.bad_seq = (u64::from(seq) + 1) & (RTP_SEQ_MOD - 1);
                return SeqVerdict::Jump;
            }
        }
        // else: duplicate or reordered packet.
        self.received += 1;
        let delta = i64::from(seq.wrapping_sub(self.max_seq) as i16);
        let extended = (self.extended_max() as i64 + delta).max(0) as u64;
        SeqVerdict::Accepted { extended_seq: extended }
    }

    /// A.8, integer version: `jitter += |D| - ((jitter + 8) >> 4)` with jitter scaled by 16.
    fn update_jitter(&mut self, arrival: u32, timestamp: u32) {
        let transit = arrival.wrapping_sub(timestamp);
        if let Some(prev) = self.transit {
            let d = i64::from((transit.wrapping_sub(prev) as i32).unsigned_abs());
            let j = i64::from(self.jitter_q4);
            self.jitter_q4 = (j + d - ((j + 8) >> 4)).clamp(0, i64::from(u32::MAX)) as u32;
        }
        self.transit = Some(transit);
    }
}

/// Receive statistics for the one remote source of a call's RTP stream: source validation and
/// sequence extension (RFC 3550 A.1), loss (A.3), interarrival jitter (A.8), LSR/DLSR (§6.4.1),
/// and SSRC change detection.
///
/// Sans-IO: arrival times are passed in. Arrival `Instant`s are converted to timestamp units from
/// the first packet's arrival, which is all A.8 needs (it uses differences only).
#[derive(Debug, Clone)]
pub struct ReceiveStats {
    config: ReceiveStatsConfig,
    epoch: Option<Instant>,
    source: Option<SourceState>,
}

impl ReceiveStats {
    /// Statistics that have seen no packet yet.
    pub fn new(config: ReceiveStatsConfig) -> Self {
        Self { config, epoch: None, source: None }
    }

    /// The SSRC of the current source, if any packet was seen.
    pub fn ssrc(&self) -> Option<u32> {
        self.source.map(|s| s.ssrc)
    }

    /// Arrival time in timestamp units since the first packet, wrapping like a timestamp.
    fn arrival_units(&mut self, now: Instant) -> u32 {
        let epoch = *self.epoch.get_or_insert(now);
        let nanos = now.saturating_duration_since(epoch).as_nanos();
        (nanos * u128::from(self.config.clock_rate) / 1_000_000_000) as u32
    }

    /// Accounts for one received RTP packet.
    pub fn on_packet(&mut self, now: Instant, header: &RtpHeader) -> PacketVerdict {
        let arrival = self.arrival_units(now);
        let min_sequential = self.config.min_sequential.max(1);
        let mut ssrc_changed_from = None;
        if let Some(s) = self.source
            && s.ssrc != header.ssrc
        {
            ssrc_changed_from = Some(s.ssrc);
            self.source = None;
        }
        // A new source starts on probation (A.1), and its first packet goes through `update_seq`
        // like any other.
        let source = self.source.get_or_insert_with(|| SourceState::new(header.ssrc, header.sequence, min_sequential));
        let seq = source.update_seq(header.sequence);
        if let SeqVerdict::Accepted { .. } = seq {
            source.update_jitter(arrival, header.timestamp);
        }
        PacketVerdict { seq, ssrc_changed_from }
    }

    /// Records an SR from the current source, for LSR/DLSR (RFC 3550 §6.4.1). SRs from another
    /// SSRC are ignored.
    pub fn on_sender_report(&mut self, now: Instant, ssrc: u32, ntp: NtpTime) {
        if let Some(s) = &mut self.source
            && s.ssrc == ssrc
        {
            s.last_sr = Some((ntp.middle32(), now));
        }
    }

    /// Interarrival jitter in timestamp units (A.8: the scaled estimate shifted down by 4).
    pub fn jitter(&self) -> u32 {
        self.source.map_or(0, |s| s.jitter_q4 >> 4)
    }

    /// Interarrival jitter as a duration.
    pub fn jitter_duration(&self) -> Duration {
        let units = self.source.map_or(0, |s| s.jitter_q4);
        Duration::from_nanos(u64::from(units) * 1_000_000_000 / 16 / u64::from(self.config.clock_rate.max(1)))
    }

    /// Packets received (counted per A.1, duplicates included).
    pub fn received(&self) -> u64 {
        self.source.map_or(0, |s| s.received)
    }

    /// Packets expected: extended highest minus base plus one (A.3).
    pub fn expected(&self) -> u64 {
        self.source.map_or(0, |s| if s.probation > 0 { 0 } else { s.extended_max() + 1 - s.base_seq })
    }

    /// Cumulative packets lost (A.3); negative when duplicates outnumber losses.
    pub fn cumulative_lost(&self) -> i64 {
        self.expected() as i64 - self.received() as i64
    }

    /// The highest sequence number received, extended with the cycle count.
    pub fn extended_highest_seq(&self) -> Option<u64> {
        self.source.filter(|s| s.probation == 0).map(|s| s.extended_max())
    }

    /// Builds the report block for the current source (A.3) and starts a new reporting interval:
    /// the fraction lost covers the packets since the previous call. `None` before a source is
    /// valid.
    pub fn report_block(&mut self, now: Instant) -> Option<ReportBlock> {
        let expected = self.expected();
        let s = self.source.as_mut().filter(|s| s.probation == 0)?;
        let lost = expected as i64 - s.received as i64;
        let expected_interval = expected - s.expected_prior;
        s.expected_prior = expected;
        let received_interval = s.received - s.received_prior;
        s.received_prior = s.received;
        let lost_interval = expected_interval as i64 - received_interval as i64;
        let fraction_lost = if expected_interval == 0 || lost_interval <= 0 {
            0
        } else {
            ((lost_interval << 8) / expected_interval as i64).min(255) as u8
        };
        let (last_sr, delay_since_last_sr) = match s.last_sr {
            Some((lsr, at)) => (lsr, to_ntp_short(now.saturating_duration_since(at))),
            None => (0, 0),
        };
        Some(ReportBlock {
            ssrc: s.ssrc,
            fraction_lost,
            cumulative_lost: ReportBlock::clamp_lost(lost),
            extended_highest_seq: s.extended_max() as u32,
            jitter: s.jitter_q4 >> 4,
            last_sr,
            delay_since_last_sr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(seq: u16, ts: u32) -> RtpHeader {
        RtpHeader { marker: false, payload_type: 0, sequence: seq, timestamp: ts, ssrc: 42 }
    }

    fn stats() -> ReceiveStats {
        ReceiveStats::new(ReceiveStatsConfig::default())
    }

    const MS20: Duration = Duration::from_millis(20);

    #[test]
    fn a_new_source_is_on_probation_for_one_packet_then_counts() {
        let t0 = Instant::now();
        let mut s = stats();
        assert_eq!(s.on_packet(t0, &hdr(10, 0)).seq, SeqVerdict::Probation);
        assert_eq!(s.extended_highest_seq(), None);
        assert!(s.report_block(t0).is_none());
        assert_eq!(s.on_packet(t0 + MS20, &hdr(11, 160)).seq, SeqVerdict::Accepted { extended_seq: 11 });
        assert_eq!(s.received(), 1);
        assert_eq!(s.expected(), 1);
        assert_eq!(s.on_packet(t0 + 2 * MS20, &hdr(12, 320)).seq, SeqVerdict::Accepted { extended_seq: 12 });
        assert_eq!(s.cumulative_lost(), 0);
    }

    #[test]
    fn probation_restarts_on_a_gap() {
        let t0 = Instant::now();
        let mut s = stats();
        s.on_packet(t0, &hdr(10, 0));
        assert_eq!(s.on_packet(t0, &hdr(20, 0)).seq, SeqVerdict::Probation);
        assert_eq!(s.on_packet(t0, &hdr(21, 0)).seq, SeqVerdict::Accepted { extended_seq: 21 });
    }

    #[test]
    fn no_probation_when_configured_off() {
        let mut s = ReceiveStats::new(ReceiveStatsConfig { clock_rate: 8000, min_sequential: 1 });
        let t0 = Instant::now();
        assert_eq!(s.on_packet(t0, &hdr(5, 0)).seq, SeqVerdict::Accepted { extended_seq: 5 });
        assert_eq!(s.on_packet(t0, &hdr(6, 0)).seq, SeqVerdict::Accepted { extended_seq: 6 });
        assert_eq!(s.received(), 2);
        assert_eq!(s.expected(), 2);
    }

    #[test]
    fn sequence_wrap_counts_a_cycle() {
        let t0 = Instant::now();
        let mut s = stats();
        s.on_packet(t0, &hdr(65_534, 0));
        s.on_packet(t0, &hdr(65_535, 160));
        assert_eq!(s.on_packet(t0, &hdr(0, 320)).seq, SeqVerdict::Accepted { extended_seq: 65_536 });
        assert_eq!(s.on_packet(t0, &hdr(1, 480)).seq, SeqVerdict::Accepted { extended_seq: 65_537 });
        // Reordered from before the wrap.
        assert_eq!(s.on_packet(t0, &hdr(65_535, 160)).seq, SeqVerdict::Accepted { extended_seq: 65_535 });
        let rb = s.report_block(t0).unwrap();
        assert_eq!(rb.extended_highest_seq, 0x0001_0001);
        // 3 expected (65535, 0, 1), 4 received: the duplicate makes the loss negative.
        assert_eq!(rb.cumulative_lost, -1);
        assert_eq!(rb.fraction_lost, 0);
    }

    #[test]
    fn loss_cumulative_and_fraction_per_interval() {
        let t0 = Instant::now();
        let mut s = stats();
        s.on_packet(t0, &hdr(99, 0));
        // 100..=199 valid, but 10 of them lost.
        for seq in 100u16..200 {
            if seq % 10 != 5 {
                s.on_packet(t0, &hdr(seq, 0));
            }
        }
        let rb = s.report_block(t0).unwrap();
        assert_eq!(rb.cumulative_lost, 10);
        // 10 / 100 as an 8-bit fixed-point fraction: floor(10 * 256 / 100) = 25.
        assert_eq!(rb.fraction_lost, 25);
        assert_eq!(rb.extended_highest_seq, 199);
        // Next interval: 50 packets, none lost.
        for seq in 200u16..250 {
            s.on_packet(t0, &hdr(seq, 0));
        }
        let rb = s.report_block(t0).unwrap();
        assert_eq!(rb.fraction_lost, 0);
        assert_eq!(rb.cumulative_lost, 10);
        // An interval where everything is lost but one.
        s.on_packet(t0, &hdr(299, 0));
        let rb = s.report_block(t0).unwrap();
        assert_eq!(rb.fraction_lost, ((49 << 8) / 50) as u8);
    }

    #[test]
    fn a_big_jump_is_ignored_once_then_resyncs() {
        let t0 = Instant::now();
        let mut s = stats();
        s.on_packet(t0, &hdr(1, 0));
        s.on_packet(t0, &hdr(2, 0));
        assert_eq!(s.on_packet(t0, &hdr(20_000, 0)).seq, SeqVerdict::Jump);
        assert_eq!(s.received(), 1);
        // The next packet follows the jump: the source restarted.
        assert_eq!(s.on_packet(t0, &hdr(20_001, 0)).seq, SeqVerdict::Accepted { extended_seq: 20_001 });
        assert_eq!(s.received(), 1);
        assert_eq!(s.expected(), 1);
        // A lone stray packet far away stays ignored.
        assert_eq!(s.on_packet(t0, &hdr(40_000, 0)).seq, SeqVerdict::Jump);
        assert_eq!(s.on_packet(t0, &hdr(20_002, 0)).seq, SeqVerdict::Accepted { extended_seq: 20_002 });
    }

    #[test]
    fn ssrc_change_is_reported_and_resets_the_statistics() {
        let t0 = Instant::now();
        let mut s = stats();
        assert_eq!(s.on_packet(t0, &hdr(1, 0)).ssrc_changed_from, None);
        s.on_packet(t0, &hdr(2, 0));
        let other = RtpHeader { ssrc: 43, ..hdr(500, 0) };
        let v = s.on_packet(t0, &other);
        assert_eq!(v, PacketVerdict { seq: SeqVerdict::Probation, ssrc_changed_from: Some(42) });
        assert_eq!(s.ssrc(), Some(43));
        assert_eq!(s.received(), 0);
        let v = s.on_packet(t0, &RtpHeader { ssrc: 43, ..hdr(501, 0) });
        assert_eq!(v.ssrc_changed_from, None);
        assert_eq!(v.seq, SeqVerdict::Accepted { extended_seq: 501 });
    }

    /// Reference A.8 in floating point: J += (|D| - J) / 16.
    fn reference_jitter(arrivals_units: &[(u32, u32)]) -> f64 {
        let mut j = 0.0;
        for w in arrivals_units.windows(2) {
            let d = (f64::from(w[1].0) - f64::from(w[1].1)) - (f64::from(w[0].0) - f64::from(w[0].1));
            j += (d.abs() - j) / 16.0;
        }
        j
    }

    #[test]
    fn jitter_is_zero_for_a_perfectly_paced_stream() {
        let t0 = Instant::now();
        let mut s = stats();
        for i in 0..100u32 {
            s.on_packet(t0 + MS20 * i, &hdr(i as u16, 1000 + 160 * i));
        }
        assert_eq!(s.jitter(), 0);
    }

    #[test]
    fn jitter_follows_a_8_integer_arithmetic() {
        // Arrivals wobble by a deterministic pattern of 0..=7 ms around the 20 ms grid.
        let t0 = Instant::now();
        let mut s = stats();
        let mut pairs = Vec::new();
        let mut expected_q4: i64 = 0;
        let mut prev_transit: Option<i64> = None;
        for i in 0..200u32 {
            let wobble_ms = (i * 7919) % 8;
            let at = t0 + MS20 * i + Duration::from_millis(u64::from(wobble_ms));
            let ts = 5_000 + 160 * i;
            let v = s.on_packet(at, &hdr(i as u16, ts));
            let arrival_units = 160 * i + 8 * wobble_ms;
            if matches!(v.seq, SeqVerdict::Accepted { .. }) {
                pairs.push((arrival_units, ts));
                let transit = i64::from(arrival_units) - i64::from(ts);
                if let Some(p) = prev_transit {
                    let d = (transit - p).abs();
                    expected_q4 += d - ((expected_q4 + 8) >> 4);
                }
                prev_transit = Some(transit);
            }
        }
        assert_eq!(s.jitter(), (expected_q4 >> 4) as u32);
        // The integer code tracks the floating-point definition to within a unit.
        let reference = reference_jitter(&pairs);
        assert!((f64::from(s.jitter()) - reference).abs() <= 1.0, "{} vs {reference}", s.jitter());
        assert!(s.jitter() > 0);
        let rb = s.report_block(t0).unwrap();
        assert_eq!(rb.jitter, s.jitter());
    }

    #[test]
    fn jitter_survives_a_timestamp_wrap() {
        let t0 = Instant::now();
        let mut s = stats();
        let start = u32::MAX - 160 * 50;
        for i in 0..100u32 {
            s.on_packet(t0 + MS20 * i, &hdr(i as u16, start.wrapping_add(160 * i)));
        }
        assert_eq!(s.jitter(), 0);
    }

    #[test]
    fn lsr_and_dlsr_come_from_the_last_sender_report() {
        let t0 = Instant::now();
        let mut s = stats();
        s.on_packet(t0, &hdr(1, 0));
        s.on_packet(t0, &hdr(2, 160));
        let ntp = NtpTime(0x0000_1234_5678_0000);
        s.on_sender_report(t0, 42, ntp);
        // An SR from another source does not count.
        s.on_sender_report(t0, 7, NtpTime(0xffff_ffff_0000_0000));
        let rb = s.report_block(t0 + Duration::from_millis(1500)).unwrap();
        assert_eq!(rb.last_sr, 0x1234_5678);
        assert_eq!(rb.delay_since_last_sr, 0x0001_8000);
    }

    #[test]
    fn reports_feed_a_round_trip_time() {
        // Our SR at NTP T leaves; the peer holds it 250 ms; its RR arrives at T + 400 ms.
        let t0 = Instant::now();
        let our_sr = NtpTime::from_unix(Duration::from_secs(1_700_000_000));
        let mut peer = stats();
        peer.on_packet(t0, &RtpHeader { ssrc: 1, ..hdr(1, 0) });
        peer.on_packet(t0, &RtpHeader { ssrc: 1, ..hdr(2, 0) });
        peer.on_sender_report(t0 + Duration::from_millis(75), 1, our_sr);
        let rb = peer.report_block(t0 + Duration::from_millis(325)).unwrap();
        let rtt = rb.round_trip_time(our_sr.add_duration(Duration::from_millis(400))).unwrap();
        assert!(rtt.abs_diff(Duration::from_millis(150)) < Duration::from_micros(100), "{rtt:?}");
    }
}
