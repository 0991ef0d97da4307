//! Fuzz targets for what a peer can put in a media packet, as property tests on stable Rust: RTP
//! and RTCP parsing, SRTP/SRTCP unprotect, RFC 4733 telephone-event payloads and the DTMF
//! receiver. Each runs a few hundred to a few thousand cases in `cargo test`; set
//! `PROPTEST_CASES` for a longer run (docs/security.md, "Fuzzing"):
//!
//! ```sh
//! PROPTEST_CASES=200000 cargo test --release -p patchbay-media --test fuzz
//! ```

use std::time::{Duration, Instant};

use patchbay_media::Cause;
use patchbay_media::dtmf::{
    DtmfDigit, DtmfError, DtmfEvent, DtmfReceiver, DtmfReceiverConfig, DtmfSender, DtmfSenderConfig, TelephoneEvent,
};
use patchbay_media::rtp::{
    CompoundPacket, FIXED_HEADER_LEN, HeaderExtension, NtpTime, RTCP_BYE, RTCP_RR, RTCP_SDES, RTCP_SR, ReportBlock,
    RtcpPacket, RtcpWriter, RtpHeader, RtpPacket, RtpPacketBuilder, SenderInfo,
};
use patchbay_media::srtp::{MasterKey, SrtpContext, SrtpError, SrtpProfile};
use proptest::prelude::*;

/// `cases` by default; `PROPTEST_CASES` when set (a `ProptestConfig::with_cases` ignores it).
fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    ProptestConfig::with_cases(cases)
}

// ---------------------------------------------------------------------------------------------
// RTP
// ---------------------------------------------------------------------------------------------

/// Bytes that look like RTP more often than uniform noise would: version 2 in most first octets,
/// so the CSRC, extension and padding paths are reached.
fn rtp_ish_bytes() -> impl Strategy<Value = Vec<u8>> {
    let first = prop_oneof![3 => (0u8..64).prop_map(|low| 0x80 | low), 1 => any::<u8>()];
    (first, prop::collection::vec(any::<u8>(), 0..200)).prop_map(|(first, mut rest)| {
        rest.insert(0, first);
        rest
    })
}

fn header() -> impl Strategy<Value = RtpHeader> {
    (any::<bool>(), any::<u8>(), any::<u16>(), any::<u32>(), any::<u32>()).prop_map(
        |(marker, payload_type, sequence, timestamp, ssrc)| RtpHeader {
            marker,
            payload_type,
            sequence,
            timestamp,
            ssrc,
        },
    )
}

/// An RTP packet with any header fields, CSRCs, header extension and padding, as the builder
/// writes it, with its parts.
#[derive(Debug, Clone)]
struct BuiltRtp {
    header: RtpHeader,
    csrcs: Vec<u32>,
    extension: Option<(u16, Vec<u8>)>,
    padding: u8,
    payload: Vec<u8>,
}

impl BuiltRtp {
    fn builder(&self) -> RtpPacketBuilder<'_> {
        RtpPacketBuilder {
            header: self.header,
            csrcs: &self.csrcs,
            extension: self.extension.as_ref().map(|(profile, data)| HeaderExtension { profile: *profile, data }),
            padding: self.padding,
        }
    }

    fn write(&self) -> Vec<u8> {
        let builder = self.builder();
        let mut buf = vec![0u8; builder.packet_len(self.payload.len())];
        let n = builder.write(&self.payload, &mut buf).expect("a valid builder writes");
        assert_eq!(n, buf.len());
        buf
    }
}

fn built_rtp() -> impl Strategy<Value = BuiltRtp> {
    (
        header(),
        prop::collection::vec(any::<u32>(), 0..=15),
        prop::option::of((
            any::<u16>(),
            (0usize..16).prop_flat_map(|words| prop::collection::vec(any::<u8>(), words * 4)),
        )),
        prop_oneof![3 => Just(0u8), 1 => any::<u8>()],
        prop::collection::vec(any::<u8>(), 0..400),
    )
        .prop_map(|(header, csrcs, extension, padding, payload)| BuiltRtp {
            header,
            csrcs,
            extension,
            padding,
            payload,
        })
}

proptest! {
    #![proptest_config(cases(4096))]

    /// Any datagram: an error the peer caused, or a packet whose parts tile the datagram and that
    /// the builder writes back byte for byte (padding filler aside).
    #[test]
    fn rtp_parse_accepts_only_what_it_can_write_back(
        bytes in prop_oneof![rtp_ish_bytes(), prop::collection::vec(any::<u8>(), 0..64)],
    ) {
        let packet = match RtpPacket::parse(&bytes) {
            Ok(packet) => packet,
            Err(err) => {
                prop_assert_eq!(err.cause(), Cause::Peer);
                return Ok(());
            }
        };
        prop_assert_eq!(bytes[0] >> 6, 2);
        prop_assert_eq!(packet.csrc_count(), usize::from(bytes[0] & 0x0f));
        prop_assert_eq!(packet.extension.is_some(), bytes[0] & 0x10 != 0);
        prop_assert_eq!(packet.padding_len > 0, bytes[0] & 0x20 != 0);
        let extension_len = packet.extension.map_or(0, |e| 4 + e.data.len());
        let header_len = FIXED_HEADER_LEN + 4 * packet.csrc_count() + extension_len;
        prop_assert_eq!(header_len + packet.payload.len() + usize::from(packet.padding_len), bytes.len());
        prop_assert_eq!(packet.payload, &bytes[header_len..header_len + packet.payload.len()]);

        let csrcs: Vec<u32> = packet.csrcs().collect();
        let builder = RtpPacketBuilder {
            header: packet.header,
            csrcs: &csrcs,
            extension: packet.extension,
            padding: packet.padding_len,
        };
        let mut out = vec![0u8; bytes.len()];
        prop_assert_eq!(builder.write(packet.payload, &mut out), Ok(bytes.len()));
        let unpadded = bytes.len() - usize::from(packet.padding_len);
        prop_assert_eq!(&out[..unpadded], &bytes[..unpadded]);
        prop_assert_eq!(out.last(), bytes.last());
    }

    /// Every prefix of a valid packet is an error or a (shorter) packet, never a panic.
    #[test]
    fn rtp_truncations_do_not_panic(packet in built_rtp(), cut in any::<prop::sample::Index>()) {
        let bytes = packet.write();
        let len = cut.index(bytes.len() + 1);
        if let Err(err) = RtpPacket::parse(&bytes[..len]) {
            prop_assert_eq!(err.cause(), Cause::Peer);
        }
    }

    /// A packet built from any header fields, CSRCs, extension, padding and payload parses back
    /// to the same parts.
    #[test]
    fn rtp_write_parse_round_trips(packet in built_rtp()) {
        let bytes = packet.write();
        let parsed = RtpPacket::parse(&bytes).expect("our own packet parses");
        let expected_header = RtpHeader { payload_type: packet.header.payload_type & 0x7f, ..packet.header };
        prop_assert_eq!(parsed.header, expected_header);
        prop_assert_eq!(parsed.csrcs().collect::<Vec<_>>(), packet.csrcs.clone());
        prop_assert_eq!(parsed.extension.map(|e| (e.profile, e.data.to_vec())), packet.extension.clone());
        prop_assert_eq!(parsed.padding_len, packet.padding);
        prop_assert_eq!(parsed.payload, &packet.payload[..]);
        // The plain header writer is the builder without the optional parts.
        let mut plain = vec![0u8; FIXED_HEADER_LEN + packet.payload.len()];
        prop_assert_eq!(packet.header.write(&packet.payload, &mut plain), Ok(plain.len()));
        prop_assert_eq!(RtpPacket::parse(&plain).map(|p| p.header), Ok(expected_header));
    }
}

// ---------------------------------------------------------------------------------------------
// RTCP
// ---------------------------------------------------------------------------------------------

/// One RTCP packet with a random common header: version 2 mostly, the length field right
/// mostly, any type (the report types more often) and any body.
fn rtcp_ish_packet() -> impl Strategy<Value = Vec<u8>> {
    let version = prop_oneof![6 => Just(2u8), 1 => 0u8..4];
    let packet_type = prop_oneof![
        2 => Just(RTCP_SR),
        2 => Just(RTCP_RR),
        1 => Just(RTCP_SDES),
        1 => Just(RTCP_BYE),
        1 => any::<u8>(),
    ];
    let words = 0usize..40;
    (version, any::<bool>(), 0u8..32, packet_type, words, prop::option::of(any::<u16>()), any::<u8>()).prop_flat_map(
        |(version, padding, count, packet_type, words, length_override, pad)| {
            prop::collection::vec(any::<u8>(), words * 4).prop_map(move |mut body| {
                if padding && let Some(last) = body.last_mut() {
                    *last = pad % 16;
                }
                let length = length_override.unwrap_or(words as u16);
                let mut packet = vec![(version << 6) | if padding { 0x20 } else { 0 } | count, packet_type];
                packet.extend_from_slice(&length.to_be_bytes());
                packet.extend_from_slice(&body);
                packet
            })
        },
    )
}

fn rtcp_ish_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => prop::collection::vec(rtcp_ish_packet(), 1..5).prop_map(|packets| packets.concat()),
        1 => prop::collection::vec(any::<u8>(), 0..128),
    ]
}

/// The packet lengths of a compound packet, read from its length fields alone.
fn length_fields(mut bytes: &[u8]) -> Vec<usize> {
    let mut lens = Vec::new();
    while bytes.len() >= 4 {
        let len = 4 * (usize::from(u16::from_be_bytes([bytes[2], bytes[3]])) + 1);
        lens.push(len.min(bytes.len()));
        bytes = &bytes[len.min(bytes.len())..];
    }
    lens
}

fn report_block() -> impl Strategy<Value = ReportBlock> {
    (any::<u32>(), any::<u8>(), any::<i32>(), any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
        |(ssrc, fraction_lost, cumulative_lost, extended_highest_seq, jitter, last_sr, delay_since_last_sr)| {
            ReportBlock {
                ssrc,
                fraction_lost,
                cumulative_lost,
                extended_highest_seq,
                jitter,
                last_sr,
                delay_since_last_sr,
            }
        },
    )
}

/// What we write into a compound packet.
#[derive(Debug, Clone)]
enum Written {
    Sr(u32, SenderInfo, Vec<ReportBlock>),
    Rr(u32, Vec<ReportBlock>),
    Cname(u32, Vec<u8>),
    Bye(Vec<u32>),
}

fn sender_info() -> impl Strategy<Value = SenderInfo> {
    (any::<u64>(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
        |(ntp, rtp_timestamp, packet_count, octet_count)| SenderInfo {
            ntp: NtpTime(ntp),
            rtp_timestamp,
            packet_count,
            octet_count,
        },
    )
}

fn report() -> impl Strategy<Value = Written> {
    let blocks = || prop::collection::vec(report_block(), 0..=31);
    prop_oneof![
        (any::<u32>(), sender_info(), blocks()).prop_map(|(ssrc, info, blocks)| Written::Sr(ssrc, info, blocks)),
        (any::<u32>(), blocks()).prop_map(|(ssrc, blocks)| Written::Rr(ssrc, blocks)),
    ]
}

fn written() -> impl Strategy<Value = Vec<Written>> {
    let other = prop_oneof![
        report(),
        (any::<u32>(), prop::collection::vec(any::<u8>(), 0..=255))
            .prop_map(|(ssrc, cname)| Written::Cname(ssrc, cname)),
        prop::collection::vec(any::<u32>(), 0..=31).prop_map(Written::Bye),
    ];
    (report(), prop::collection::vec(other, 0..4)).prop_map(|(first, mut rest)| {
        rest.insert(0, first);
        rest
    })
}

fn write_compound(packets: &[Written]) -> Vec<u8> {
    let mut buf = vec![0u8; 8192];
    let mut writer = RtcpWriter::new(&mut buf);
    for packet in packets {
        match packet {
            Written::Sr(ssrc, info, blocks) => writer.sender_report(*ssrc, info, blocks),
            Written::Rr(ssrc, blocks) => writer.receiver_report(*ssrc, blocks),
            Written::Cname(ssrc, cname) => writer.sdes_cname(*ssrc, cname),
            Written::Bye(ssrcs) => writer.bye(ssrcs),
        }
        .expect("within the writer's limits");
    }
    let n = writer.finish();
    buf.truncate(n);
    buf
}

/// A report block as it reads back: the loss is a 24-bit field (RFC 3550 §6.4.1).
fn as_read(block: &ReportBlock) -> ReportBlock {
    ReportBlock { cumulative_lost: ReportBlock::clamp_lost(i64::from(block.cumulative_lost)), ..*block }
}

proptest! {
    #![proptest_config(cases(4096))]

    /// Any datagram: an error the peer caused, or a compound packet whose every packet the
    /// iterator yields (the lengths tile the datagram) and whose reports hold the blocks their
    /// count announces.
    #[test]
    fn rtcp_parse_validates_what_the_iterator_walks(bytes in rtcp_ish_bytes()) {
        let compound = match CompoundPacket::parse(&bytes) {
            Ok(compound) => compound,
            Err(err) => {
                prop_assert_eq!(err.cause(), Cause::Peer);
                return Ok(());
            }
        };
        let lens = length_fields(&bytes);
        prop_assert_eq!(lens.iter().sum::<usize>(), bytes.len());
        let packets: Vec<RtcpPacket<'_>> = compound.iter().collect();
        prop_assert_eq!(packets.len(), lens.len());
        prop_assert!(matches!(packets[0], RtcpPacket::SenderReport(_) | RtcpPacket::ReceiverReport(_)));
        let mut at = 0;
        for (packet, len) in packets.iter().zip(&lens) {
            let count = usize::from(bytes[at] & 0x1f);
            match packet {
                RtcpPacket::SenderReport(sr) => prop_assert_eq!(sr.blocks.len(), count),
                RtcpPacket::ReceiverReport(rr) => prop_assert_eq!(rr.blocks.len(), count),
                RtcpPacket::Other { packet_type, count: c, body } => {
                    prop_assert_eq!(*packet_type, bytes[at + 1]);
                    prop_assert_eq!(usize::from(*c), count);
                    prop_assert!(body.len() <= len - 4);
                }
                _ => {}
            }
            at += len;
        }
    }

    /// Reports, SDES CNAMEs and BYEs with any contents read back as written.
    #[test]
    fn rtcp_write_parse_round_trips(packets in written()) {
        let bytes = write_compound(&packets);
        let compound = CompoundPacket::parse(&bytes).expect("our own compound packet parses");
        let parsed: Vec<RtcpPacket<'_>> = compound.iter().collect();
        prop_assert_eq!(parsed.len(), packets.len());
        for (written, parsed) in packets.iter().zip(parsed) {
            match (written, parsed) {
                (Written::Sr(ssrc, info, blocks), RtcpPacket::SenderReport(sr)) => {
                    prop_assert_eq!(sr.ssrc, *ssrc);
                    prop_assert_eq!(sr.info, *info);
                    prop_assert_eq!(sr.blocks.collect::<Vec<_>>(), blocks.iter().map(as_read).collect::<Vec<_>>());
                }
                (Written::Rr(ssrc, blocks), RtcpPacket::ReceiverReport(rr)) => {
                    prop_assert_eq!(rr.ssrc, *ssrc);
                    prop_assert_eq!(rr.blocks.collect::<Vec<_>>(), blocks.iter().map(as_read).collect::<Vec<_>>());
                }
                (Written::Cname(ssrc, cname), RtcpPacket::Other { packet_type, count, body }) => {
                    prop_assert_eq!((packet_type, count), (RTCP_SDES, 1));
                    prop_assert_eq!(&body[..4], &ssrc.to_be_bytes());
                    prop_assert_eq!((body[4], usize::from(body[5])), (1, cname.len()));
                    prop_assert_eq!(&body[6..6 + cname.len()], &cname[..]);
                    prop_assert!(body[6 + cname.len()..].iter().all(|&b| b == 0));
                }
                (Written::Bye(ssrcs), RtcpPacket::Other { packet_type, count, body }) => {
                    prop_assert_eq!((packet_type, usize::from(count)), (RTCP_BYE, ssrcs.len()));
                    let read: Vec<u32> =
                        body.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect();
                    prop_assert_eq!(&read, ssrcs);
                }
                (written, parsed) => prop_assert!(false, "wrote {:?}, read {:?}", written, parsed),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SRTP / SRTCP
// ---------------------------------------------------------------------------------------------

fn master_key() -> MasterKey {
    MasterKey::new(*b"fuzz-master-key!", *b"fuzz-salt-14by")
}

fn profile() -> impl Strategy<Value = SrtpProfile> {
    prop_oneof![Just(SrtpProfile::AesCm128HmacSha1_80), Just(SrtpProfile::AesCm128HmacSha1_32)]
}

fn protect_rtp(tx: &mut SrtpContext, plain: &[u8]) -> Vec<u8> {
    let mut buf = plain.to_vec();
    buf.resize(plain.len() + tx.profile().rtp_overhead(), 0);
    let n = tx.protect_rtp(&mut buf, plain.len()).expect("protect");
    buf.truncate(n);
    buf
}

fn protect_rtcp(tx: &mut SrtpContext, plain: &[u8]) -> Vec<u8> {
    let mut buf = plain.to_vec();
    buf.resize(plain.len() + tx.profile().rtcp_overhead(), 0);
    let n = tx.protect_rtcp(&mut buf, plain.len()).expect("protect");
    buf.truncate(n);
    buf
}

/// A receiver's answer to a packet that is not genuinely protected: one of the peer's errors,
/// and the packet left as it was.
fn assert_refused(result: Result<usize, SrtpError>, before: &[u8], after: &[u8]) -> Result<(), TestCaseError> {
    let err = match result {
        Ok(n) => return Err(TestCaseError::fail(format!("accepted a forged packet ({n} bytes): {before:02x?}"))),
        Err(err) => err,
    };
    prop_assert_eq!(err.cause(), Cause::Peer, "{:?}", err);
    prop_assert!(
        matches!(
            err,
            SrtpError::AuthenticationFailed
                | SrtpError::Truncated { .. }
                | SrtpError::Malformed(_)
                | SrtpError::Replayed { .. }
                | SrtpError::TooOld { .. }
        ),
        "{:?}",
        err
    );
    prop_assert_eq!(before, after, "an unprotect that failed changed the buffer");
    Ok(())
}

proptest! {
    #![proptest_config(cases(1024))]

    /// Random bytes are never accepted as SRTP or SRTCP, neither by a fresh receiver nor by one
    /// that already follows the stream (same SSRC, ROC and replay state), and they leave that
    /// state intact: the stream's next genuine packet is still accepted.
    #[test]
    fn srtp_unprotect_refuses_arbitrary_bytes(
        profile in profile(),
        noise in prop::collection::vec(prop_oneof![rtp_ish_bytes(), prop::collection::vec(any::<u8>(), 0..64)], 1..6),
        start in any::<u16>(),
    ) {
        let key = master_key();
        let (mut tx, mut rx) = (SrtpContext::new(profile, &key), SrtpContext::new(profile, &key));
        let ssrc = 0x5eed_0001;
        let genuine = |seq: u16| {
            let mut buf = vec![0u8; 64];
            let timestamp = 160 * u32::from(seq);
            let header = RtpHeader { marker: false, payload_type: 0, sequence: seq, timestamp, ssrc };
            let n = header.write(&[0x55; 40], &mut buf).expect("write");
            buf.truncate(n);
            buf
        };
        // Follow the stream for a packet first.
        let first = protect_rtp(&mut tx, &genuine(start));
        prop_assert!(rx.unprotect_rtp(&mut first.clone()).is_ok());
        for (i, bytes) in noise.iter().enumerate() {
            for context in [&mut SrtpContext::new(profile, &key), &mut rx] {
                // Half of the time aimed at the stream we follow, at sequence numbers near it.
                let mut aimed = bytes.clone();
                if i % 2 == 1 && aimed.len() >= 12 {
                    aimed[8..12].copy_from_slice(&ssrc.to_be_bytes());
                }
                let mut buf = aimed.clone();
                let result = context.unprotect_rtp(&mut buf);
                assert_refused(result, &aimed, &buf)?;
                let mut buf = aimed.clone();
                let result = context.unprotect_rtcp(&mut buf);
                assert_refused(result, &aimed, &buf)?;
            }
        }
        let next = start.wrapping_add(1);
        let second = protect_rtp(&mut tx, &genuine(next));
        let mut buf = second.clone();
        let n = rx.unprotect_rtp(&mut buf).expect("the next genuine packet is still accepted");
        prop_assert_eq!(&buf[..n], &genuine(next)[..]);
    }

    /// Flipping any single bit of an SRTP or SRTCP packet (header, payload, index or tag) gets it
    /// refused, and the receiver then still takes the unflipped packet.
    #[test]
    fn a_single_flipped_bit_is_refused(
        profile in profile(),
        packet in built_rtp(),
        rtcp in written(),
        rtp_bit in any::<prop::sample::Index>(),
        rtcp_bit in any::<prop::sample::Index>(),
    ) {
        let key = master_key();
        let (mut tx, mut rx) = (SrtpContext::new(profile, &key), SrtpContext::new(profile, &key));
        let plain = packet.write();
        let protected = protect_rtp(&mut tx, &plain);
        let mut flipped = protected.clone();
        let bit = rtp_bit.index(flipped.len() * 8);
        flipped[bit / 8] ^= 1 << (bit % 8);
        let mut buf = flipped.clone();
        let result = rx.unprotect_rtp(&mut buf);
        assert_refused(result, &flipped, &buf)?;
        let mut buf = protected.clone();
        let n = rx.unprotect_rtp(&mut buf).expect("the genuine packet after a forged one");
        prop_assert_eq!(&buf[..n], &plain[..]);

        let plain = write_compound(&rtcp);
        let protected = protect_rtcp(&mut tx, &plain);
        let mut flipped = protected.clone();
        let bit = rtcp_bit.index(flipped.len() * 8);
        flipped[bit / 8] ^= 1 << (bit % 8);
        let mut buf = flipped.clone();
        let result = rx.unprotect_rtcp(&mut buf);
        assert_refused(result, &flipped, &buf)?;
        let mut buf = protected.clone();
        let n = rx.unprotect_rtcp(&mut buf).expect("the genuine SRTCP packet after a forged one");
        prop_assert_eq!(&buf[..n], &plain[..]);
    }

    /// Protect then unprotect gives the packet back for any payloads, across the 16-bit sequence
    /// wrap (the rollover counter), with neighbours swapped in transit; both sides agree on the
    /// ROC; and every packet replayed afterwards is refused and left as it was.
    #[test]
    fn srtp_round_trips_across_the_sequence_wrap(
        profile in profile(),
        start in prop_oneof![65_000u16.., any::<u16>()],
        steps in prop::collection::vec(
            (prop_oneof![4 => 1u16..64, 1 => 64u16..32_704], prop::collection::vec(any::<u8>(), 0..200), any::<bool>()),
            1..40,
        ),
        ssrc in any::<u32>(),
    ) {
        let key = master_key();
        let (mut tx, mut rx) = (SrtpContext::new(profile, &key), SrtpContext::new(profile, &key));
        let mut seq = start;
        let mut sent = Vec::new();
        let mut total = u64::from(start);
        for (i, (step, payload, swap)) in steps.iter().enumerate() {
            if i > 0 {
                seq = seq.wrapping_add(*step);
                total += u64::from(*step);
            }
            let timestamp = (total as u32).wrapping_mul(160);
            let header = RtpHeader { marker: i == 0, payload_type: 8, sequence: seq, timestamp, ssrc };
            let mut plain = vec![0u8; FIXED_HEADER_LEN + payload.len()];
            header.write(payload, &mut plain).expect("write");
            let protected = protect_rtp(&mut tx, &plain);
            // Steps stay below 2^15 - 64, so that even with a neighbour swapped every jump the
            // receiver sees is under half the sequence space (RFC 3711 Appendix A's estimate).
            // Swap with the previous packet only where the replay window (64) allows it, and not
            // the first: a receiver takes the first packet it hears to be in rollover 0 (RFC 3711
            // §3.3.1), so a stream starting just before the wrap whose first packet arrives after
            // the wrapped one cannot be followed (by libsrtp either).
            sent.push((plain, protected, *swap && i > 1 && *step < 64));
        }
        let mut order: Vec<usize> = (0..sent.len()).collect();
        for i in 1..sent.len() {
            if sent[i].2 && order[i - 1] == i - 1 {
                order.swap(i - 1, i);
            }
        }
        for &i in &order {
            let (plain, protected, _) = &sent[i];
            let mut buf = protected.clone();
            let n = rx.unprotect_rtp(&mut buf).map_err(|e| TestCaseError::fail(format!("packet {i}: {e}")))?;
            prop_assert_eq!(&buf[..n], &plain[..]);
        }
        let expected_roc = (total >> 16) as u32;
        prop_assert_eq!(tx.stream_stats(ssrc).map(|s| s.roc), Some(expected_roc));
        prop_assert_eq!(rx.stream_stats(ssrc).map(|s| s.roc), Some(expected_roc));
        // A replay is refused: as replayed or too old, or, when it lies so far back that the
        // RFC 3711 Appendix A estimate puts it in the next rollover, by its tag.
        for (_, protected, _) in &sent {
            let mut buf = protected.clone();
            let result = rx.unprotect_rtp(&mut buf);
            assert_refused(result, protected, &buf)?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// RFC 4733 telephone events and the DTMF receiver
// ---------------------------------------------------------------------------------------------

/// `a` after `b` in RTP timestamp serial arithmetic.
fn is_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// Drains the receiver and checks what its API promises of the events: presses and releases
/// alternate, each release closes the press before it (same event and timestamp), at most three
/// events per input, and `is_pressed` agrees.
#[derive(Debug, Default)]
struct Checker {
    open: Option<(u8, u32)>,
    presses: Vec<(u32, u8, u32)>,
    releases: u64,
}

impl Checker {
    fn drain(&mut self, rx: &mut DtmfReceiver, ssrc_run: u32) -> Result<(), TestCaseError> {
        let mut n = 0;
        while let Some(event) = rx.poll_event() {
            n += 1;
            match event {
                DtmfEvent::Pressed { event, digit, timestamp } => {
                    prop_assert_eq!(self.open, None, "a press before the previous one's release");
                    prop_assert_eq!(digit, DtmfDigit::from_event(event));
                    self.open = Some((event, timestamp));
                    self.presses.push((ssrc_run, event, timestamp));
                }
                DtmfEvent::Released { event, digit, timestamp, .. } => {
                    prop_assert_eq!(self.open.take(), Some((event, timestamp)), "a release that closes no press");
                    prop_assert_eq!(digit, DtmfDigit::from_event(event));
                    self.releases += 1;
                }
            }
        }
        prop_assert!(n <= 3, "{} events from one input", n);
        prop_assert_eq!(rx.is_pressed(), self.open.is_some());
        Ok(())
    }
}

/// One received telephone-event packet: header fields and payload bytes, and the milliseconds
/// since the previous one.
#[derive(Debug, Clone)]
struct Arrival {
    ssrc: u32,
    sequence: u16,
    /// Which of a few timestamps near the base.
    slot: u32,
    marker: bool,
    payload: Vec<u8>,
    gap_ms: u64,
}

fn event_payload() -> impl Strategy<Value = Vec<u8>> {
    let structured = (
        prop_oneof![3 => 0u8..4, 1 => Just(16u8), 1 => any::<u8>()],
        any::<bool>(),
        any::<u8>(),
        prop_oneof![Just(0u16), 0u16..2000, 0xF000u16.., Just(0xFFFF)],
    )
        .prop_map(|(event, end, flags, duration)| {
            let d = duration.to_be_bytes();
            vec![event, (flags & 0x7f) | if end { 0x80 } else { 0 }, d[0], d[1]]
        });
    prop_oneof![4 => structured, 1 => prop::collection::vec(any::<u8>(), 0..8)]
}

fn arrivals() -> impl Strategy<Value = Vec<Arrival>> {
    let arrival = (
        prop_oneof![6 => Just(1u32), 1 => Just(2u32)],
        any::<u16>(),
        0u32..8,
        any::<bool>(),
        event_payload(),
        prop_oneof![Just(0u64), 0u64..60, 200u64..400],
    )
        .prop_map(|(ssrc, sequence, slot, marker, payload, gap_ms)| Arrival {
            ssrc,
            sequence,
            slot,
            marker,
            payload,
            gap_ms,
        });
    prop::collection::vec(arrival, 0..60)
}

proptest! {
    #![proptest_config(cases(4096))]

    /// Any payload: an error the peer caused when shorter than four octets, else an event that
    /// writes back as the same four octets (the reserved bit cleared).
    #[test]
    fn telephone_event_parse_write_round_trips(bytes in prop::collection::vec(any::<u8>(), 0..12)) {
        match TelephoneEvent::parse(&bytes) {
            Err(err) => {
                prop_assert!(bytes.len() < TelephoneEvent::LEN);
                prop_assert_eq!(err, DtmfError::Truncated(bytes.len()));
                prop_assert_eq!(err.cause(), Cause::Peer);
            }
            Ok(event) => {
                let mut out = [0u8; 4];
                prop_assert_eq!(event.write(&mut out), Ok(4));
                prop_assert_eq!(out, [bytes[0], bytes[1] & !0x40, bytes[2], bytes[3]]);
                prop_assert_eq!(TelephoneEvent::parse(&out), Ok(event));
                prop_assert_eq!(event.digit(), DtmfDigit::from_event(bytes[0]));
            }
        }
    }
}

proptest! {
    #![proptest_config(cases(1024))]

    /// Any sequence of telephone-event packets (any sequence numbers, markers, payloads, a few
    /// nearby timestamps that may straddle the 32-bit wrap, an SSRC change now and then, pauses
    /// past the release timeout): the receiver keeps its promises (see [`Checker`]), reports a
    /// press at most once per event timestamp of a source — each press of a source is later than
    /// the one before — and releases every press in the end.
    #[test]
    fn dtmf_receiver_reports_each_event_timestamp_at_most_once(
        base in prop_oneof![any::<u32>(), (u32::MAX - 0x4_0000)..],
        step in prop_oneof![Just(160u32), Just(800u32), Just(0xFFFFu32), 1u32..0x2_0000],
        arrivals in arrivals(),
    ) {
        let config = DtmfReceiverConfig::default();
        let mut rx = DtmfReceiver::new(config);
        let mut checker = Checker::default();
        let t0 = Instant::now();
        let mut now = t0;
        let (mut run, mut last_ssrc) = (0u32, None);
        let mut fed = 0u64;
        for arrival in &arrivals {
            now += Duration::from_millis(arrival.gap_ms);
            if rx.poll_timeout().is_some_and(|deadline| now >= deadline) {
                rx.handle_timeout(now);
                checker.drain(&mut rx, run)?;
            }
            let Ok(event) = TelephoneEvent::parse(&arrival.payload) else { continue };
            if last_ssrc.is_some_and(|s| s != arrival.ssrc) {
                run += 1;
            }
            last_ssrc = Some(arrival.ssrc);
            let header = RtpHeader {
                marker: arrival.marker,
                payload_type: 101,
                sequence: arrival.sequence,
                timestamp: base.wrapping_add(arrival.slot * step),
                ssrc: arrival.ssrc,
            };
            rx.handle_packet(now, &header, event);
            fed += 1;
            checker.drain(&mut rx, run)?;
        }
        now += config.release_timeout;
        rx.handle_timeout(now);
        checker.drain(&mut rx, run)?;
        prop_assert!(!rx.is_pressed());
        prop_assert_eq!(checker.open, None);
        prop_assert_eq!(checker.releases, checker.presses.len() as u64);
        prop_assert_eq!(rx.stats().presses, checker.presses.len() as u64);
        prop_assert_eq!(rx.stats().packets, fed);
        // Within a source, every press is later than the one before (all timestamps here lie
        // within 2^31 of each other, so serial order is a total order): no timestamp twice.
        for pair in checker.presses.windows(2) {
            let ((run_a, _, ts_a), (run_b, _, ts_b)) = (pair[0], pair[1]);
            if run_a == run_b {
                prop_assert!(is_after(ts_b, ts_a), "press at {} after press at {}", ts_b, ts_a);
            }
        }
    }

    /// Key presses as our sender sends them, with packets lost, duplicated and swapped with their
    /// neighbour in transit: each press of which at least one packet arrives before any packet of
    /// a later press is reported exactly once, in order, with its key (a press heard only after
    /// the next one began is stale, and dropped).
    #[test]
    fn dtmf_receiver_reports_each_sent_press_exactly_once(
        start in any::<u32>(),
        presses in prop::collection::vec(
            (0usize..16, prop_oneof![4 => 1u32..4000, 1 => 4000u32..0xF000], 160u32..4000),
            1..6,
        ),
        fates in prop::collection::vec((0u8..8, any::<bool>()), 400),
    ) {
        let sender = DtmfSender::new(DtmfSenderConfig::default());
        let mut packets = Vec::new();
        let mut ts = start;
        for (press, &(key, duration, gap)) in presses.iter().enumerate() {
            for packet in sender.sequence(DtmfDigit::ALL[key], duration, ts) {
                packets.push((press, packet));
            }
            ts = ts.wrapping_add(duration.next_multiple_of(160) + gap);
        }
        // Each packet is lost (fate 0), sent once (1..=5) or twice (6, 7); swapped or not.
        let mut wire = Vec::new();
        for (i, (press, packet)) in packets.iter().enumerate() {
            let (fate, swap) = fates[i % fates.len()];
            let copies = match fate { 0 => 0, 6 | 7 => 2, _ => 1 };
            for _ in 0..copies {
                wire.push((*press, *packet));
            }
            if swap && wire.len() >= 2 {
                let n = wire.len();
                wire.swap(n - 2, n - 1);
            }
        }
        let mut rx = DtmfReceiver::new(DtmfReceiverConfig::default());
        let mut checker = Checker::default();
        let mut now = Instant::now();
        for (seq, (_, packet)) in wire.iter().enumerate() {
            now += Duration::from_millis(20);
            if rx.poll_timeout().is_some_and(|deadline| now >= deadline) {
                rx.handle_timeout(now);
                checker.drain(&mut rx, 0)?;
            }
            let (marker, timestamp, sequence) = (packet.marker, packet.timestamp, seq as u16);
            let header = RtpHeader { marker, payload_type: 101, sequence, timestamp, ssrc: 7 };
            rx.handle_packet(now, &header, packet.event);
            checker.drain(&mut rx, 0)?;
        }
        rx.handle_timeout(now + Duration::from_secs(1));
        checker.drain(&mut rx, 0)?;
        let mut heard: Vec<usize> = Vec::new();
        for (press, _) in &wire {
            if heard.last().is_none_or(|last| press > last) {
                heard.push(*press);
            }
        }
        let expected: Vec<u8> = heard.iter().map(|&press| DtmfDigit::ALL[presses[press].0].event()).collect();
        let reported: Vec<u8> = checker.presses.iter().map(|&(_, event, _)| event).collect();
        prop_assert_eq!(reported, expected);
        prop_assert_eq!(checker.releases, checker.presses.len() as u64);
    }
}

/// Found by `dtmf_receiver_reports_each_event_timestamp_at_most_once`: a second event code at the
/// timestamp of the press in progress superseded it, so each packet alternating two codes at one
/// timestamp reported a new press. The press a timestamp identifies is reported once.
#[test]
fn another_event_code_at_the_same_timestamp_is_not_a_new_press() {
    let mut rx = DtmfReceiver::new(DtmfReceiverConfig::default());
    let now = Instant::now();
    let header = RtpHeader { marker: false, payload_type: 101, sequence: 0, timestamp: 480, ssrc: 1 };
    for (i, event) in [0u8, 1, 0, 1].into_iter().enumerate() {
        let header = RtpHeader { sequence: i as u16, ..header };
        rx.handle_packet(now, &header, TelephoneEvent { event, end: false, volume: 10, duration: 160 });
    }
    assert_eq!(rx.poll_event(), Some(DtmfEvent::Pressed { event: 0, digit: Some(DtmfDigit::D0), timestamp: 480 }));
    assert_eq!(rx.poll_event(), None);
    assert_eq!((rx.stats().presses, rx.stats().stale), (1, 2));
}
