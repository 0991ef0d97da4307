//! RTCP sender and receiver reports (RFC 3550 §6.4), SDES CNAME and BYE, and compound packets
//! (RFC 3550 §6.1, validity checks of A.2).

use std::time::{Duration, Instant};

use super::{RTP_VERSION, RtpError};

/// RTCP packet type of a sender report (RFC 3550 §12.1).
pub const RTCP_SR: u8 = 200;
/// RTCP packet type of a receiver report.
pub const RTCP_RR: u8 = 201;
/// RTCP packet type of source description items.
pub const RTCP_SDES: u8 = 202;
/// RTCP packet type of goodbye.
pub const RTCP_BYE: u8 = 203;

const SDES_CNAME: u8 = 1;
const REPORT_BLOCK_LEN: usize = 24;
const SENDER_INFO_LEN: usize = 20;

/// Seconds between the NTP epoch (1900) and the Unix epoch (1970).
const NTP_UNIX_OFFSET_SECS: u64 = 2_208_988_800;

/// A 64-bit NTP timestamp: seconds since 1 January 1900 in the high 32 bits, fraction in the low
/// 32 bits (RFC 3550 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct NtpTime(pub u64);

impl NtpTime {
    /// The NTP timestamp of a wall-clock time given as time since the Unix epoch.
    pub fn from_unix(since_epoch: Duration) -> Self {
        let secs = since_epoch.as_secs() + NTP_UNIX_OFFSET_SECS;
        let frac = (u64::from(since_epoch.subsec_nanos()) << 32) / 1_000_000_000;
        Self((secs << 32) | frac)
    }

    /// The middle 32 bits, as carried in LSR (RFC 3550 §6.4.1): 16 bits of seconds and 16 of
    /// fraction, so units of 1/65536 s.
    pub fn middle32(self) -> u32 {
        (self.0 >> 16) as u32
    }

    /// This time plus `d`.
    pub fn add_duration(self, d: Duration) -> Self {
        let ticks = (d.as_nanos() << 32) / 1_000_000_000;
        Self(self.0.wrapping_add(ticks as u64))
    }
}

/// Maps the caller's monotonic clock onto NTP wall-clock time.
///
/// The shell anchors it once (an `Instant` and the wall-clock time read at that instant); from
/// then on NTP timestamps follow the monotonic clock, so a wall-clock step never makes an RTT or
/// a DLSR jump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NtpClock {
    anchor: Instant,
    anchor_ntp: NtpTime,
}

impl NtpClock {
    /// A clock on which `anchor` is NTP time `anchor_ntp`.
    pub fn new(anchor: Instant, anchor_ntp: NtpTime) -> Self {
        Self { anchor, anchor_ntp }
    }

    /// The NTP time at `now` (instants before the anchor map to the anchor).
    pub fn at(&self, now: Instant) -> NtpTime {
        self.anchor_ntp.add_duration(now.saturating_duration_since(self.anchor))
    }
}

/// Converts units of 1/65536 s (LSR, DLSR, RTT) to a `Duration`.
fn from_ntp_short(units: u32) -> Duration {
    Duration::from_nanos((u64::from(units) * 1_000_000_000) >> 16)
}

/// Converts a `Duration` to units of 1/65536 s, saturating at `u32::MAX` (about 18 hours).
pub(crate) fn to_ntp_short(d: Duration) -> u32 {
    let units = (d.as_nanos() << 16) / 1_000_000_000;
    u32::try_from(units).unwrap_or(u32::MAX)
}

/// One reception report block (RFC 3550 §6.4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ReportBlock {
    /// The source this block reports on.
    pub ssrc: u32,
    /// Fraction of packets lost since the previous report, as a fixed-point number with the
    /// binary point at the left edge (lost × 256 / expected).
    pub fraction_lost: u8,
    /// Cumulative packets lost, a 24-bit signed number (negative when duplicates arrive).
    pub cumulative_lost: i32,
    /// Cycle count (high 16 bits) and highest sequence number received (low 16 bits).
    pub extended_highest_seq: u32,
    /// Interarrival jitter in timestamp units (A.8).
    pub jitter: u32,
    /// Middle 32 bits of the NTP timestamp of the last SR from this source, 0 if none.
    pub last_sr: u32,
    /// Delay since that SR was received, in units of 1/65536 s, 0 if none.
    pub delay_since_last_sr: u32,
}

impl ReportBlock {
    /// Clamps a loss count to the 24-bit signed field (RFC 3550 A.3).
    pub fn clamp_lost(lost: i64) -> i32 {
        lost.clamp(-0x80_0000, 0x7f_ffff) as i32
    }

    fn write(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.ssrc.to_be_bytes());
        let lost = (Self::clamp_lost(i64::from(self.cumulative_lost)) as u32) & 0x00ff_ffff;
        out[4..8].copy_from_slice(&((u32::from(self.fraction_lost) << 24) | lost).to_be_bytes());
        out[8..12].copy_from_slice(&self.extended_highest_seq.to_be_bytes());
        out[12..16].copy_from_slice(&self.jitter.to_be_bytes());
        out[16..20].copy_from_slice(&self.last_sr.to_be_bytes());
        out[20..24].copy_from_slice(&self.delay_since_last_sr.to_be_bytes());
    }

    fn parse(b: &[u8]) -> Self {
        let word = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let lost_word = word(4);
        // Sign-extend the 24-bit cumulative loss.
        let cumulative_lost = ((lost_word << 8) as i32) >> 8;
        Self {
            ssrc: word(0),
            fraction_lost: (lost_word >> 24) as u8,
            cumulative_lost,
            extended_highest_seq: word(8),
            jitter: word(12),
            last_sr: word(16),
            delay_since_last_sr: word(20),
        }
    }

    /// Round-trip time to the reporting peer (RFC 3550 §6.4.1): `A - LSR - DLSR`, where `A` is
    /// when this report block arrived, on the same NTP clock our SRs carried.
    ///
    /// `None` when the peer has not received an SR from us yet (LSR = 0) or when the result
    /// would be negative (clock or peer error).
    pub fn round_trip_time(&self, arrival: NtpTime) -> Option<Duration> {
        if self.last_sr == 0 {
            return None;
        }
        let rtt = arrival.middle32().wrapping_sub(self.last_sr).wrapping_sub(self.delay_since_last_sr);
        // Modular arithmetic: anything in the upper half is a negative value.
        if rtt > u32::MAX / 2 {
            return None;
        }
        Some(from_ntp_short(rtt))
    }
}

/// The sender information of an SR (RFC 3550 §6.4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SenderInfo {
    /// Wall-clock time when the report was sent.
    pub ntp: NtpTime,
    /// The RTP timestamp corresponding to `ntp`, on the media clock.
    pub rtp_timestamp: u32,
    /// Packets sent since the start of transmission.
    pub packet_count: u32,
    /// Payload octets sent since the start of transmission (no headers or padding).
    pub octet_count: u32,
}

/// Appends RTCP packets to a caller-supplied buffer, building a compound packet.
///
/// RFC 3550 §6.1: a compound packet starts with an SR or RR and carries an SDES CNAME; the
/// writer does not enforce the order, the RTCP scheduler of the call does.
#[derive(Debug)]
pub struct RtcpWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> RtcpWriter<'a> {
    /// A writer that appends to `buf` from its start.
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, len: 0 }
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The compound packet written so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Reserves `len` bytes (a multiple of 4) and writes the common header (RFC 3550 §6.4.1).
    fn begin(&mut self, count: u8, packet_type: u8, len: usize) -> Result<&mut [u8], RtpError> {
        let needed = self.len + len;
        if self.buf.len() < needed {
            return Err(RtpError::BufferTooSmall { needed, available: self.buf.len() });
        }
        let out = &mut self.buf[self.len..needed];
        out[0] = (RTP_VERSION << 6) | count;
        out[1] = packet_type;
        // Length in 32-bit words minus one.
        out[2..4].copy_from_slice(&((len / 4 - 1) as u16).to_be_bytes());
        self.len = needed;
        Ok(out)
    }

    /// Appends a sender report (RFC 3550 §6.4.1) with up to 31 report blocks.
    pub fn sender_report(&mut self, ssrc: u32, info: &SenderInfo, blocks: &[ReportBlock]) -> Result<(), RtpError> {
        if blocks.len() > 31 {
            return Err(RtpError::TooManyReportBlocks(blocks.len()));
        }
        let len = 8 + SENDER_INFO_LEN + REPORT_BLOCK_LEN * blocks.len();
        let out = self.begin(blocks.len() as u8, RTCP_SR, len)?;
        out[4..8].copy_from_slice(&ssrc.to_be_bytes());
        out[8..16].copy_from_slice(&info.ntp.0.to_be_bytes());
        out[16..20].copy_from_slice(&info.rtp_timestamp.to_be_bytes());
        out[20..24].copy_from_slice(&info.packet_count.to_be_bytes());
        out[24..28].copy_from_slice(&info.octet_count.to_be_bytes());
        for (i, block) in blocks.iter().enumerate() {
            let at = 28 + i * REPORT_BLOCK_LEN;
            block.write(&mut out[at..at + REPORT_BLOCK_LEN]);
        }
        Ok(())
    }

    /// Appends a receiver report (RFC 3550 §6.4.2) with up to 31 report blocks; an RR with no
    /// blocks is what a participant that received nothing sends.
    pub fn receiver_report(&mut self, ssrc: u32, blocks: &[ReportBlock]) -> Result<(), RtpError> {
        if blocks.len() > 31 {
            return Err(RtpError::TooManyReportBlocks(blocks.len()));
        }
        let len = 8 + REPORT_BLOCK_LEN * blocks.len();
        let out = self.begin(blocks.len() as u8, RTCP_RR, len)?;
        out[4..8].copy_from_slice(&ssrc.to_be_bytes());
        for (i, block) in blocks.iter().enumerate() {
            let at = 8 + i * REPORT_BLOCK_LEN;
            block.write(&mut out[at..at + REPORT_BLOCK_LEN]);
        }
        Ok(())
    }

    /// Appends an SDES packet with one chunk holding a CNAME item (RFC 3550 §6.5.1).
    pub fn sdes_cname(&mut self, ssrc: u32, cname: &[u8]) -> Result<(), RtpError> {
        if cname.len() > 255 {
            return Err(RtpError::SdesItemTooLong(cname.len()));
        }
        // SSRC, item type, length, text, then at least one null octet ending the item list,
        // padded to a 32-bit boundary (§6.5).
        let chunk = 4 + 2 + cname.len() + 1;
        let len = 4 + chunk.next_multiple_of(4);
        let out = self.begin(1, RTCP_SDES, len)?;
        out[4..8].copy_from_slice(&ssrc.to_be_bytes());
        out[8] = SDES_CNAME;
        out[9] = cname.len() as u8;
        out[10..10 + cname.len()].copy_from_slice(cname);
        out[10 + cname.len()..].fill(0);
        Ok(())
    }

    /// Appends a BYE for up to 31 sources, without a reason (RFC 3550 §6.6).
    pub fn bye(&mut self, ssrcs: &[u32]) -> Result<(), RtpError> {
        if ssrcs.len() > 31 {
            return Err(RtpError::TooManyReportBlocks(ssrcs.len()));
        }
        let out = self.begin(ssrcs.len() as u8, RTCP_BYE, 4 + 4 * ssrcs.len())?;
        for (i, ssrc) in ssrcs.iter().enumerate() {
            out[4 + 4 * i..8 + 4 * i].copy_from_slice(&ssrc.to_be_bytes());
        }
        Ok(())
    }

    /// The total length written.
    pub fn finish(self) -> usize {
        self.len
    }
}

/// The report blocks of an SR or RR, parsed lazily from the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportBlocks<'a>(&'a [u8]);

impl Iterator for ReportBlocks<'_> {
    type Item = ReportBlock;

    fn next(&mut self) -> Option<ReportBlock> {
        if self.0.len() < REPORT_BLOCK_LEN {
            return None;
        }
        let (block, rest) = self.0.split_at(REPORT_BLOCK_LEN);
        self.0 = rest;
        Some(ReportBlock::parse(block))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.0.len() / REPORT_BLOCK_LEN;
        (n, Some(n))
    }
}

impl ExactSizeIterator for ReportBlocks<'_> {}

/// A parsed sender report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderReport<'a> {
    /// The sender's SSRC.
    pub ssrc: u32,
    /// The sender information.
    pub info: SenderInfo,
    /// Its reception report blocks.
    pub blocks: ReportBlocks<'a>,
}

/// A parsed receiver report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiverReport<'a> {
    /// The reporter's SSRC.
    pub ssrc: u32,
    /// Its reception report blocks.
    pub blocks: ReportBlocks<'a>,
}

/// One packet of a compound RTCP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RtcpPacket<'a> {
    /// A sender report.
    SenderReport(SenderReport<'a>),
    /// A receiver report.
    ReceiverReport(ReceiverReport<'a>),
    /// Any other packet type (SDES, BYE, APP, feedback), unparsed.
    Other {
        /// The packet type.
        packet_type: u8,
        /// The five-bit count / format field.
        count: u8,
        /// The packet after its 4-byte common header, padding stripped.
        body: &'a [u8],
    },
}

/// A validated compound RTCP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompoundPacket<'a> {
    buf: &'a [u8],
}

impl<'a> CompoundPacket<'a> {
    /// Validates a compound packet as RFC 3550 A.2 describes: every packet is version 2, the first
    /// is an SR or RR, only the last may have the padding bit, and the lengths add up to the
    /// datagram. SR/RR bodies must hold the report blocks their count announces (§6.4).
    pub fn parse(buf: &'a [u8]) -> Result<Self, RtpError> {
        if buf.len() < 4 {
            return Err(RtpError::Truncated { len: buf.len(), needed: 4 });
        }
        let first_type = buf[1];
        if first_type != RTCP_SR && first_type != RTCP_RR {
            return Err(RtpError::NotReportFirst(first_type));
        }
        let mut at = 0;
        while at < buf.len() {
            let rest = &buf[at..];
            if rest.len() < 4 {
                return Err(RtpError::Truncated { len: rest.len(), needed: 4 });
            }
            let version = rest[0] >> 6;
            if version != RTP_VERSION {
                return Err(RtpError::BadVersion(version));
            }
            let len = 4 * (usize::from(u16::from_be_bytes([rest[2], rest[3]])) + 1);
            if rest.len() < len {
                return Err(RtpError::Truncated { len: rest.len(), needed: len });
            }
            let is_last = at + len == buf.len();
            if rest[0] & 0x20 != 0 && !is_last {
                return Err(RtpError::PaddingNotLast);
            }
            // Checks padding and report lengths.
            parse_one(&rest[..len])?;
            at += len;
        }
        Ok(Self { buf })
    }

    /// The packets, in order.
    pub fn iter(&self) -> CompoundPackets<'a> {
        CompoundPackets { rest: self.buf }
    }
}

impl<'a> IntoIterator for &CompoundPacket<'a> {
    type Item = RtcpPacket<'a>;
    type IntoIter = CompoundPackets<'a>;

    fn into_iter(self) -> CompoundPackets<'a> {
        self.iter()
    }
}

/// Iterator over the packets of a validated [`CompoundPacket`].
#[derive(Debug, Clone)]
pub struct CompoundPackets<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for CompoundPackets<'a> {
    type Item = RtcpPacket<'a>;

    fn next(&mut self) -> Option<RtcpPacket<'a>> {
        if self.rest.len() < 4 {
            return None;
        }
        let len = 4 * (usize::from(u16::from_be_bytes([self.rest[2], self.rest[3]])) + 1);
        let (packet, rest) = self.rest.split_at(len.min(self.rest.len()));
        self.rest = rest;
        // Validated in `CompoundPacket::parse`.
        parse_one(packet).ok()
    }
}

/// Parses one RTCP packet whose length field has been checked to be `b.len()`.
fn parse_one(b: &[u8]) -> Result<RtcpPacket<'_>, RtpError> {
    let count = b[0] & 0x1f;
    let packet_type = b[1];
    let mut body = &b[4..];
    if b[0] & 0x20 != 0 {
        let pad = body.last().copied().unwrap_or(0);
        if pad == 0 || usize::from(pad) > body.len() {
            return Err(RtpError::BadPadding { count: pad, available: body.len() });
        }
        body = &body[..body.len() - usize::from(pad)];
    }
    let blocks_len = REPORT_BLOCK_LEN * usize::from(count);
    match packet_type {
        RTCP_SR => {
            if body.len() < 4 + SENDER_INFO_LEN + blocks_len {
                return Err(RtpError::ReportTooShort { len: b.len(), count });
            }
            let word = |i: usize| u32::from_be_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]]);
            let info = SenderInfo {
                ntp: NtpTime((u64::from(word(4)) << 32) | u64::from(word(8))),
                rtp_timestamp: word(12),
                packet_count: word(16),
                octet_count: word(20),
            };
            // Profile-specific extensions after the blocks are ignored (§6.4.1).
            let blocks = ReportBlocks(&body[24..24 + blocks_len]);
            Ok(RtcpPacket::SenderReport(SenderReport { ssrc: word(0), info, blocks }))
        }
        RTCP_RR => {
            if body.len() < 4 + blocks_len {
                return Err(RtpError::ReportTooShort { len: b.len(), count });
            }
            let ssrc = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            Ok(RtcpPacket::ReceiverReport(ReceiverReport { ssrc, blocks: ReportBlocks(&body[4..4 + blocks_len]) }))
        }
        _ => Ok(RtcpPacket::Other { packet_type, count, body }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(ssrc: u32) -> ReportBlock {
        ReportBlock {
            ssrc,
            fraction_lost: 64,
            cumulative_lost: -3,
            extended_highest_seq: 0x0001_0005,
            jitter: 17,
            last_sr: 0x1234_5678,
            delay_since_last_sr: 0x0001_8000,
        }
    }

    #[test]
    fn ntp_time_from_unix_and_middle_bits() {
        let t = NtpTime::from_unix(Duration::new(1, 500_000_000));
        assert_eq!(t.0 >> 32, NTP_UNIX_OFFSET_SECS + 1);
        assert_eq!(t.0 as u32, 0x8000_0000);
        assert_eq!(t.middle32(), (((NTP_UNIX_OFFSET_SECS + 1) as u32) << 16) | 0x8000);
        let clock = NtpClock::new(Instant::now(), t);
        assert_eq!(clock.at(clock.anchor + Duration::from_millis(500)).0 >> 32, NTP_UNIX_OFFSET_SECS + 2);
    }

    #[test]
    fn sender_report_with_blocks_round_trips() {
        let info = SenderInfo {
            ntp: NtpTime(0xe000_0001_8000_0000),
            rtp_timestamp: 160_000,
            packet_count: 1000,
            octet_count: 160_000,
        };
        let mut buf = [0u8; 256];
        let mut w = RtcpWriter::new(&mut buf);
        w.sender_report(0xaabb_ccdd, &info, &[block(1), block(2)]).unwrap();
        w.sdes_cname(0xaabb_ccdd, b"patchbay@example").unwrap();
        let n = w.finish();
        // SR: 4 + 4 + 20 + 2 * 24 = 76 bytes = 19 words, length field 18.
        assert_eq!(&buf[..4], &[0x82, 200, 0, 18]);
        let compound = CompoundPacket::parse(&buf[..n]).unwrap();
        let packets: Vec<_> = compound.iter().collect();
        assert_eq!(packets.len(), 2);
        let RtcpPacket::SenderReport(sr) = packets[0] else { panic!("not an SR: {:?}", packets[0]) };
        assert_eq!(sr.ssrc, 0xaabb_ccdd);
        assert_eq!(sr.info, info);
        assert_eq!(sr.blocks.len(), 2);
        assert_eq!(sr.blocks.collect::<Vec<_>>(), vec![block(1), block(2)]);
        let RtcpPacket::Other { packet_type, count, body } = packets[1] else { panic!("not SDES") };
        assert_eq!((packet_type, count), (RTCP_SDES, 1));
        assert_eq!(&body[4..6], &[1, 16]);
        assert_eq!(&body[6..22], b"patchbay@example");
        assert!(body[22..].iter().all(|&b| b == 0) && !body[22..].is_empty());
        assert_eq!(body.len() % 4, 0);
    }

    #[test]
    fn receiver_report_round_trips_and_clamps_loss() {
        let mut buf = [0u8; 64];
        let mut w = RtcpWriter::new(&mut buf);
        let big_loss = ReportBlock { cumulative_lost: 0x0100_0000, ..block(9) };
        w.receiver_report(5, &[big_loss]).unwrap();
        let n = w.len();
        assert_eq!(n, 32);
        let compound = CompoundPacket::parse(&buf[..n]).unwrap();
        let Some(RtcpPacket::ReceiverReport(rr)) = compound.iter().next() else { panic!("not an RR") };
        assert_eq!(rr.ssrc, 5);
        let parsed: Vec<_> = rr.blocks.collect();
        assert_eq!(parsed[0].cumulative_lost, 0x7f_ffff);
        assert_eq!(parsed[0].fraction_lost, 64);
        assert_eq!(ReportBlock::clamp_lost(-10_000_000), -0x80_0000);
    }

    #[test]
    fn negative_cumulative_loss_is_sign_extended() {
        let mut buf = [0u8; 32];
        RtcpWriter::new(&mut buf).receiver_report(1, &[block(2)]).unwrap();
        assert_eq!(&buf[12..16], &[64, 0xff, 0xff, 0xfd]);
        let c = CompoundPacket::parse(&buf).unwrap();
        let Some(RtcpPacket::ReceiverReport(rr)) = c.iter().next() else { panic!() };
        assert_eq!(rr.blocks.clone().next().unwrap().cumulative_lost, -3);
    }

    #[test]
    fn empty_rr_and_bye_are_valid() {
        let mut buf = [0u8; 64];
        let mut w = RtcpWriter::new(&mut buf);
        w.receiver_report(7, &[]).unwrap();
        w.bye(&[7]).unwrap();
        let n = w.finish();
        assert_eq!(n, 16);
        let c = CompoundPacket::parse(&buf[..n]).unwrap();
        let v: Vec<_> = c.iter().collect();
        assert!(matches!(v[0], RtcpPacket::ReceiverReport(ReceiverReport { ssrc: 7, .. })));
        assert!(matches!(v[1], RtcpPacket::Other { packet_type: RTCP_BYE, count: 1, .. }));
    }

    #[test]
    fn a_compound_packet_must_start_with_a_report() {
        let mut buf = [0u8; 64];
        let mut w = RtcpWriter::new(&mut buf);
        w.bye(&[7]).unwrap();
        let n = w.finish();
        assert_eq!(CompoundPacket::parse(&buf[..n]), Err(RtpError::NotReportFirst(RTCP_BYE)));
    }

    #[test]
    fn padding_only_on_the_last_packet_and_lengths_must_add_up() {
        let mut buf = [0u8; 64];
        let mut w = RtcpWriter::new(&mut buf);
        w.receiver_report(7, &[]).unwrap();
        w.bye(&[7]).unwrap();
        let n = w.finish();
        let mut bad = buf;
        bad[0] |= 0x20;
        assert_eq!(CompoundPacket::parse(&bad[..n]), Err(RtpError::PaddingNotLast));
        // A trailing partial packet.
        assert!(matches!(CompoundPacket::parse(&buf[..n - 2]), Err(RtpError::Truncated { .. })));
        // Version 1 in the second packet.
        let mut bad = buf;
        bad[8] = 0x41;
        assert_eq!(CompoundPacket::parse(&bad[..n]), Err(RtpError::BadVersion(1)));
        // An RR claiming two blocks in 8 bytes.
        let mut bad = buf;
        bad[0] = 0x82;
        assert!(matches!(CompoundPacket::parse(&bad[..n]), Err(RtpError::ReportTooShort { count: 2, .. })));
    }

    #[test]
    fn padding_on_the_last_packet_is_stripped() {
        // RR (8 bytes) + BYE with one SSRC and 4 bytes of padding.
        let mut buf = [0u8; 20];
        RtcpWriter::new(&mut buf).receiver_report(7, &[]).unwrap();
        buf[8..20].copy_from_slice(&[0xa1, RTCP_BYE, 0, 2, 0, 0, 0, 7, 0, 0, 0, 4]);
        let c = CompoundPacket::parse(&buf).unwrap();
        let last = c.iter().nth(1).unwrap();
        assert_eq!(last, RtcpPacket::Other { packet_type: RTCP_BYE, count: 1, body: &[0, 0, 0, 7] });
        buf[19] = 9;
        assert!(matches!(CompoundPacket::parse(&buf), Err(RtpError::BadPadding { count: 9, .. })));
    }

    #[test]
    fn writer_refuses_overflow_and_too_many_blocks() {
        let mut buf = [0u8; 30];
        let mut w = RtcpWriter::new(&mut buf);
        assert_eq!(w.receiver_report(1, &[block(1)]), Err(RtpError::BufferTooSmall { needed: 32, available: 30 }));
        assert!(w.is_empty());
        let blocks = [block(1); 32];
        assert_eq!(w.receiver_report(1, &blocks), Err(RtpError::TooManyReportBlocks(32)));
        assert_eq!(w.sdes_cname(1, &[b'a'; 256]), Err(RtpError::SdesItemTooLong(256)));
    }

    #[test]
    fn round_trip_time_follows_section_6_4_1() {
        // The example of RFC 3550 §6.4.1 (Figure 2): A = 0xb710:8000 (46864.500 s),
        // LSR = 0xb705:2000 (46853.125 s), DLSR = 0x0005:4000 (5.250 s) -> RTT 6.125 s.
        let arrival = NtpTime(0xb710_8000_u64 << 16);
        let b = ReportBlock { last_sr: 0xb705_2000, delay_since_last_sr: 0x0005_4000, ..block(1) };
        assert_eq!(b.round_trip_time(arrival), Some(Duration::from_millis(6125)));
        assert_eq!(ReportBlock { last_sr: 0, ..b }.round_trip_time(arrival), None);
        // A DLSR longer than the time since our SR is a negative RTT: refused.
        let b = ReportBlock { delay_since_last_sr: 0x0010_0000, ..b };
        assert_eq!(b.round_trip_time(arrival), None);
    }

    #[test]
    fn ntp_short_conversions() {
        assert_eq!(to_ntp_short(Duration::from_millis(1500)), 0x0001_8000);
        assert_eq!(from_ntp_short(0x0001_8000), Duration::from_millis(1500));
        assert_eq!(to_ntp_short(Duration::from_secs(1 << 20)), u32::MAX);
    }

    #[test]
    fn truncations_never_panic() {
        let mut buf = [0u8; 256];
        let mut w = RtcpWriter::new(&mut buf);
        w.sender_report(1, &SenderInfo::default(), &[block(1)]).unwrap();
        w.sdes_cname(1, b"x").unwrap();
        let n = w.finish();
        for len in 0..n {
            let _ = CompoundPacket::parse(&buf[..len]).map(|c| c.iter().count());
        }
    }
}
