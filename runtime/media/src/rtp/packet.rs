//! The RTP fixed header, CSRC list, header extension and padding (RFC 3550 §5.1, §5.3.1).

use super::RtpError;

/// The only RTP version there is (RFC 3550 §5.1).
pub const RTP_VERSION: u8 = 2;

/// Length of the fixed RTP header, without CSRCs or extension (RFC 3550 §5.1).
pub const FIXED_HEADER_LEN: usize = 12;

/// The fields of the fixed RTP header that a media stream uses.
///
/// The version is always 2; padding, CSRC count and extension bit are properties of the packet
/// layout and live in [`RtpPacket`] / [`RtpPacketBuilder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RtpHeader {
    /// Marker bit: for audio, the first packet of a talkspurt (RFC 3551 §4.1).
    pub marker: bool,
    /// Payload type, 7 bits (RFC 3550 §5.1). Values above 127 are masked when writing.
    pub payload_type: u8,
    /// Sequence number.
    pub sequence: u16,
    /// Media timestamp, in clock-rate units.
    pub timestamp: u32,
    /// Synchronisation source.
    pub ssrc: u32,
}

impl RtpHeader {
    /// Writes a packet with this header and `payload` into `out` (no CSRCs, extension or padding)
    /// and returns its length.
    pub fn write(&self, payload: &[u8], out: &mut [u8]) -> Result<usize, RtpError> {
        RtpPacketBuilder::new(*self).write(payload, out)
    }
}

/// A header extension (RFC 3550 §5.3.1): 16 profile-defined bits and whole 32-bit words of data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderExtension<'a> {
    /// The profile-defined first 16 bits (0xBEDE for RFC 8285 one-byte extensions).
    pub profile: u16,
    /// The extension data, a multiple of 4 bytes.
    pub data: &'a [u8],
}

/// An RTP packet borrowed from a receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpPacket<'a> {
    /// The fixed header fields.
    pub header: RtpHeader,
    csrc: &'a [u8],
    /// The header extension, if the X bit was set.
    pub extension: Option<HeaderExtension<'a>>,
    /// The payload, padding stripped.
    pub payload: &'a [u8],
    /// How many padding octets were stripped (0 if the P bit was clear).
    pub padding_len: u8,
}

impl<'a> RtpPacket<'a> {
    /// Parses an RTP packet, validating it as RFC 3550 §5.1 and A.1 describe: version 2, the CSRC
    /// list and extension inside the packet, and a padding count between 1 and the bytes after the
    /// header.
    pub fn parse(buf: &'a [u8]) -> Result<Self, RtpError> {
        let layout = Layout::parse(buf)?;
        let b = buf;
        let header = RtpHeader {
            marker: b[1] & 0x80 != 0,
            payload_type: b[1] & 0x7f,
            sequence: u16::from_be_bytes([b[2], b[3]]),
            timestamp: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            ssrc: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        };
        let csrc = &b[FIXED_HEADER_LEN..FIXED_HEADER_LEN + 4 * layout.csrc_count];
        let extension = layout.extension_at.map(|at| HeaderExtension {
            profile: u16::from_be_bytes([b[at], b[at + 1]]),
            data: &b[at + 4..layout.header_len],
        });
        let padding_len = if b[0] & 0x20 != 0 {
            // RFC 3550 §5.1: "The last octet of the padding contains a count of how many padding
            // octets should be ignored, including itself."
            let count = b[b.len() - 1];
            let available = b.len() - layout.header_len;
            if count == 0 || usize::from(count) > available {
                return Err(RtpError::BadPadding { count, available });
            }
            count
        } else {
            0
        };
        let payload = &b[layout.header_len..b.len() - usize::from(padding_len)];
        Ok(Self { header, csrc, extension, payload, padding_len })
    }

    /// Number of contributing sources.
    pub fn csrc_count(&self) -> usize {
        self.csrc.len() / 4
    }

    /// The contributing sources, in order.
    pub fn csrcs(&self) -> impl Iterator<Item = u32> + 'a {
        self.csrc.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
    }
}

/// Where the variable parts of an RTP header end.
struct Layout {
    csrc_count: usize,
    /// Offset of the extension's profile field, if present.
    extension_at: Option<usize>,
    /// Fixed header + CSRCs + extension.
    header_len: usize,
}

impl Layout {
    fn parse(b: &[u8]) -> Result<Self, RtpError> {
        if b.len() < FIXED_HEADER_LEN {
            return Err(RtpError::Truncated { len: b.len(), needed: FIXED_HEADER_LEN });
        }
        let version = b[0] >> 6;
        if version != RTP_VERSION {
            return Err(RtpError::BadVersion(version));
        }
        Self::lengths(b)
    }

    /// The lengths only, without the version check: SRTP needs the header length to find the
    /// payload to decrypt, and authentication, not the version, decides whether to trust it.
    fn lengths(b: &[u8]) -> Result<Self, RtpError> {
        if b.len() < FIXED_HEADER_LEN {
            return Err(RtpError::Truncated { len: b.len(), needed: FIXED_HEADER_LEN });
        }
        let csrc_count = usize::from(b[0] & 0x0f);
        let mut header_len = FIXED_HEADER_LEN + 4 * csrc_count;
        if b.len() < header_len {
            return Err(RtpError::Truncated { len: b.len(), needed: header_len });
        }
        let mut extension_at = None;
        if b[0] & 0x10 != 0 {
            // RFC 3550 §5.3.1: 16 profile bits, a 16-bit length in 32-bit words excluding the
            // four-octet extension header, then the data.
            if b.len() < header_len + 4 {
                return Err(RtpError::Truncated { len: b.len(), needed: header_len + 4 });
            }
            let words = usize::from(u16::from_be_bytes([b[header_len + 2], b[header_len + 3]]));
            extension_at = Some(header_len);
            header_len += 4 + 4 * words;
            if b.len() < header_len {
                return Err(RtpError::Truncated { len: b.len(), needed: header_len });
            }
        }
        Ok(Self { csrc_count, extension_at, header_len })
    }
}

/// Length of the RTP header (fixed part, CSRCs and extension) at the start of `buf`, without
/// checking the version. Used by SRTP, which encrypts what follows (RFC 3711 §3.1).
pub(crate) fn header_len(buf: &[u8]) -> Result<usize, RtpError> {
    Layout::lengths(buf).map(|l| l.header_len)
}

/// Builds an RTP packet with CSRCs, a header extension or padding into a caller-supplied buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpPacketBuilder<'a> {
    /// The fixed header fields.
    pub header: RtpHeader,
    /// Contributing sources, at most 15.
    pub csrcs: &'a [u32],
    /// Header extension; its data must be whole 32-bit words.
    pub extension: Option<HeaderExtension<'a>>,
    /// Padding octets to append (0 for none); the last one holds the count (RFC 3550 §5.1).
    pub padding: u8,
}

impl<'a> RtpPacketBuilder<'a> {
    /// A builder for a packet with just the fixed header.
    pub fn new(header: RtpHeader) -> Self {
        Self { header, csrcs: &[], extension: None, padding: 0 }
    }

    /// The length of the packet this builder writes around a payload of `payload_len` bytes.
    pub fn packet_len(&self, payload_len: usize) -> usize {
        FIXED_HEADER_LEN
            + 4 * self.csrcs.len()
            + self.extension.map_or(0, |e| 4 + e.data.len())
            + payload_len
            + usize::from(self.padding)
    }

    /// Writes the packet into `out` and returns its length. Nothing is written on error.
    pub fn write(&self, payload: &[u8], out: &mut [u8]) -> Result<usize, RtpError> {
        if self.csrcs.len() > 15 {
            return Err(RtpError::TooManyCsrcs(self.csrcs.len()));
        }
        let ext_words = match self.extension {
            Some(e) if !e.data.len().is_multiple_of(4) || e.data.len() / 4 > usize::from(u16::MAX) => {
                return Err(RtpError::ExtensionNotAligned(e.data.len()));
            }
            Some(e) => Some((e, (e.data.len() / 4) as u16)),
            None => None,
        };
        let needed = self.packet_len(payload.len());
        if out.len() < needed {
            return Err(RtpError::BufferTooSmall { needed, available: out.len() });
        }
        let h = &self.header;
        out[0] = (RTP_VERSION << 6)
            | if self.padding > 0 { 0x20 } else { 0 }
            | if ext_words.is_some() { 0x10 } else { 0 }
            | self.csrcs.len() as u8;
        out[1] = if h.marker { 0x80 } else { 0 } | (h.payload_type & 0x7f);
        out[2..4].copy_from_slice(&h.sequence.to_be_bytes());
        out[4..8].copy_from_slice(&h.timestamp.to_be_bytes());
        out[8..12].copy_from_slice(&h.ssrc.to_be_bytes());
        let mut at = FIXED_HEADER_LEN;
        for csrc in self.csrcs {
            out[at..at + 4].copy_from_slice(&csrc.to_be_bytes());
            at += 4;
        }
        if let Some((e, words)) = ext_words {
            out[at..at + 2].copy_from_slice(&e.profile.to_be_bytes());
            out[at + 2..at + 4].copy_from_slice(&words.to_be_bytes());
            out[at + 4..at + 4 + e.data.len()].copy_from_slice(e.data);
            at += 4 + e.data.len();
        }
        out[at..at + payload.len()].copy_from_slice(payload);
        at += payload.len();
        if self.padding > 0 {
            let pad = usize::from(self.padding);
            out[at..at + pad].fill(0);
            out[at + pad - 1] = self.padding;
            at += pad;
        }
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> RtpHeader {
        RtpHeader { marker: true, payload_type: 0, sequence: 0x1234, timestamp: 0xdead_beef, ssrc: 0x0102_0304 }
    }

    #[test]
    fn a_minimal_packet_round_trips() {
        let mut buf = [0u8; 64];
        let n = header().write(&[1, 2, 3], &mut buf).unwrap();
        assert_eq!(n, 15);
        assert_eq!(&buf[..12], &[0x80, 0x80, 0x12, 0x34, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4]);
        let p = RtpPacket::parse(&buf[..n]).unwrap();
        assert_eq!(p.header, header());
        assert_eq!(p.payload, &[1, 2, 3]);
        assert_eq!(p.csrc_count(), 0);
        assert_eq!(p.extension, None);
        assert_eq!(p.padding_len, 0);
    }

    #[test]
    fn marker_and_payload_type_share_the_second_octet() {
        let mut buf = [0u8; 12];
        let h = RtpHeader { marker: false, payload_type: 101, ..header() };
        h.write(&[], &mut buf).unwrap();
        assert_eq!(buf[1], 101);
        let p = RtpPacket::parse(&buf).unwrap();
        assert!(!p.header.marker);
        assert_eq!(p.header.payload_type, 101);
        // A payload type above 7 bits is masked, not allowed to flip the marker.
        let h = RtpHeader { marker: false, payload_type: 0xff, ..header() };
        h.write(&[], &mut buf).unwrap();
        assert_eq!(buf[1], 0x7f);
    }

    #[test]
    fn csrcs_extension_and_padding_are_skipped_and_exposed() {
        let ext = [0xaa; 8];
        let b = RtpPacketBuilder {
            header: header(),
            csrcs: &[7, 8],
            extension: Some(HeaderExtension { profile: 0xbede, data: &ext }),
            padding: 4,
        };
        let mut buf = [0u8; 64];
        let n = b.write(&[9, 9, 9], &mut buf).unwrap();
        assert_eq!(n, b.packet_len(3));
        assert_eq!(n, 12 + 8 + 4 + 8 + 3 + 4);
        assert_eq!(buf[0], 0x80 | 0x20 | 0x10 | 2);
        assert_eq!(buf[n - 1], 4);
        let p = RtpPacket::parse(&buf[..n]).unwrap();
        assert_eq!(p.csrcs().collect::<Vec<_>>(), vec![7, 8]);
        assert_eq!(p.extension, Some(HeaderExtension { profile: 0xbede, data: &ext }));
        assert_eq!(p.payload, &[9, 9, 9]);
        assert_eq!(p.padding_len, 4);
    }

    #[test]
    fn version_other_than_2_is_refused() {
        let mut buf = [0u8; 12];
        header().write(&[], &mut buf).unwrap();
        for v in [0u8, 1, 3] {
            buf[0] = (buf[0] & 0x3f) | (v << 6);
            assert_eq!(RtpPacket::parse(&buf), Err(RtpError::BadVersion(v)));
        }
    }

    #[test]
    fn truncated_headers_are_refused() {
        assert_eq!(RtpPacket::parse(&[0x80; 11]), Err(RtpError::Truncated { len: 11, needed: 12 }));
        // CC = 2 needs 20 bytes.
        let mut buf = [0u8; 16];
        buf[0] = 0x82;
        assert_eq!(RtpPacket::parse(&buf), Err(RtpError::Truncated { len: 16, needed: 20 }));
        // X set, but no room for the extension header.
        buf[0] = 0x90;
        assert_eq!(RtpPacket::parse(&buf[..12]), Err(RtpError::Truncated { len: 12, needed: 16 }));
        // X set, extension says 2 words but only 1 present.
        buf[14] = 0;
        buf[15] = 2;
        let mut long = [0u8; 20];
        long[..16].copy_from_slice(&buf);
        assert_eq!(RtpPacket::parse(&long), Err(RtpError::Truncated { len: 20, needed: 24 }));
    }

    #[test]
    fn bad_padding_is_refused() {
        let mut buf = [0u8; 16];
        header().write(&[1, 2, 3, 4], &mut buf).unwrap();
        buf[0] |= 0x20;
        // Count 0 is invalid: the count includes its own octet.
        buf[15] = 0;
        assert_eq!(RtpPacket::parse(&buf), Err(RtpError::BadPadding { count: 0, available: 4 }));
        buf[15] = 5;
        assert_eq!(RtpPacket::parse(&buf), Err(RtpError::BadPadding { count: 5, available: 4 }));
        // Exactly the whole payload is padding: valid, empty payload.
        buf[15] = 4;
        let p = RtpPacket::parse(&buf).unwrap();
        assert!(p.payload.is_empty());
        // Padding bit on a header-only packet: nothing to count.
        let mut bare = [0u8; 12];
        header().write(&[], &mut bare).unwrap();
        bare[0] |= 0x20;
        assert!(matches!(RtpPacket::parse(&bare), Err(RtpError::BadPadding { available: 0, .. })));
    }

    #[test]
    fn writer_refuses_what_does_not_fit() {
        let mut small = [0u8; 14];
        assert_eq!(header().write(&[0; 3], &mut small), Err(RtpError::BufferTooSmall { needed: 15, available: 14 }));
        let csrcs = [0u32; 16];
        let b = RtpPacketBuilder { csrcs: &csrcs, ..RtpPacketBuilder::new(header()) };
        assert_eq!(b.write(&[], &mut [0; 128]), Err(RtpError::TooManyCsrcs(16)));
        let b = RtpPacketBuilder {
            extension: Some(HeaderExtension { profile: 1, data: &[0; 3] }),
            ..RtpPacketBuilder::new(header())
        };
        assert_eq!(b.write(&[], &mut [0; 128]), Err(RtpError::ExtensionNotAligned(3)));
    }

    #[test]
    fn header_len_skips_csrcs_and_extension_without_a_version_check() {
        let b = RtpPacketBuilder {
            csrcs: &[1],
            extension: Some(HeaderExtension { profile: 1, data: &[0; 4] }),
            ..RtpPacketBuilder::new(header())
        };
        let mut buf = [0u8; 64];
        let n = b.write(&[5; 10], &mut buf).unwrap();
        assert_eq!(header_len(&buf[..n]), Ok(12 + 4 + 8));
        buf[0] &= 0x3f;
        assert_eq!(header_len(&buf[..n]), Ok(12 + 4 + 8));
    }

    #[test]
    fn every_truncation_of_a_valid_packet_is_an_error_not_a_panic() {
        let b = RtpPacketBuilder {
            header: header(),
            csrcs: &[1, 2, 3],
            extension: Some(HeaderExtension { profile: 1, data: &[0; 12] }),
            padding: 3,
        };
        let mut buf = [0u8; 128];
        let n = b.write(&[7; 20], &mut buf).unwrap();
        for len in 0..n {
            // Some prefixes parse (padding octet happens to be plausible), none may panic.
            let _ = RtpPacket::parse(&buf[..len]);
        }
        assert!(RtpPacket::parse(&buf[..n]).is_ok());
    }
}
