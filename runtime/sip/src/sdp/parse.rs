//! A lenient SDP reader (RFC 4566 §5) that keeps only what offer/answer needs.
//!
//! Strict parsers (including webrtc-rs `sdp`, which enforces the §5 line order) reject SDPs
//! that phones and carriers really send: `a=` lines before `c=`, LF-only line ends, trailing
//! blanks, an empty line at the end. This reader checks the line syntax (`<type>=<value>`,
//! `v=0` first, well-formed `m=`, `c=` and the attributes we use) and ignores line order and
//! fields it does not need.

use std::net::IpAddr;

use super::crypto::{self, CryptoAttribute};
use super::{Direction, MAX_MEDIA_LINES, MAX_SDP_BYTES, SdpError};

/// `c=` address (RFC 4566 §5.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnectionAddress {
    Ip(IpAddr),
    /// A host name or an address type we do not know; we never resolve names here.
    Unusable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin<'a> {
    pub session_id: &'a str,
    pub version: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RtpMap<'a> {
    pub payload_type: u8,
    pub encoding: &'a str,
    pub clock_rate: u32,
    pub channels: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Media<'a> {
    /// 1-based line number of the `m=` line, for error reports.
    pub line: usize,
    pub kind: &'a str,
    pub port: u16,
    pub proto: &'a str,
    pub formats: Vec<&'a str>,
    pub connection: Option<ConnectionAddress>,
    pub rtpmaps: Vec<RtpMap<'a>>,
    pub fmtps: Vec<(u8, &'a str)>,
    pub ptime: Option<u32>,
    pub maxptime: Option<u32>,
    pub direction: Option<Direction>,
    /// Usable crypto lines in offer order; unusable ones are dropped (RFC 4568 §7.1.1).
    pub crypto: Vec<CryptoAttribute>,
    /// Whether any `a=crypto` line was present, usable or not.
    pub has_crypto_lines: bool,
    /// `a=rtcp-mux` (RFC 5761 §5.1.1): RTCP on the RTP port.
    pub rtcp_mux: bool,
    /// `a=rtcp` (RFC 3605 §2.1): the peer's RTCP port, and its address when not the stream's.
    pub rtcp: Option<(u16, Option<IpAddr>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Session<'a> {
    pub origin: Option<Origin<'a>>,
    pub connection: Option<ConnectionAddress>,
    pub direction: Option<Direction>,
    pub media: Vec<Media<'a>>,
}

impl<'a> Media<'a> {
    pub fn fmtp(&self, payload_type: u8) -> Option<&'a str> {
        self.fmtps.iter().find(|(pt, _)| *pt == payload_type).map(|(_, value)| *value)
    }

    pub fn rtpmap(&self, payload_type: u8) -> Option<&RtpMap<'_>> {
        self.rtpmaps.iter().find(|map| map.payload_type == payload_type)
    }

    /// Payload types of the format list; non-numeric formats (non-RTP media) are skipped.
    pub fn payload_types(&self) -> impl Iterator<Item = u8> + '_ {
        self.formats.iter().filter_map(|format| format.parse::<u8>().ok().filter(|pt| *pt <= 127))
    }

    pub fn is_rtp(&self) -> bool {
        self.proto.eq_ignore_ascii_case("RTP/AVP") || self.proto.eq_ignore_ascii_case("RTP/SAVP")
    }

    pub fn is_savp(&self) -> bool {
        self.proto.eq_ignore_ascii_case("RTP/SAVP")
    }
}

impl Session<'_> {
    /// Connection address in effect for `media`: media level overrides session
    /// level (RFC 4566 §5.7).
    pub fn connection_for(&self, media: &Media<'_>) -> Option<ConnectionAddress> {
        media.connection.or(self.connection)
    }

    /// The direction the SDP's author declared for `media`, with the RFC 2543 hold form
    /// (`c=0.0.0.0`) read as "does not receive" (RFC 3264 §8.4).
    pub fn direction_for(&self, media: &Media<'_>) -> Direction {
        let declared = media.direction.or(self.direction).unwrap_or(Direction::SendRecv);
        match self.connection_for(media) {
            Some(ConnectionAddress::Ip(ip)) if ip.is_unspecified() => Direction::from_flags(declared.sends(), false),
            _ => declared,
        }
    }
}

/// Per m-line bound on formats and on the attributes we keep. RTP has 128 payload types; the
/// bound keeps the payload-type lookups (linear scans) cheap on hostile input.
const MAX_PER_MEDIA: usize = 128;

fn malformed(line: usize, reason: &'static str) -> SdpError {
    SdpError::Malformed { line, reason }
}

pub(crate) fn parse(text: &str) -> Result<Session<'_>, SdpError> {
    if text.len() > MAX_SDP_BYTES {
        return Err(SdpError::TooLarge);
    }
    let mut session = Session { origin: None, connection: None, direction: None, media: Vec::new() };
    let mut saw_version = false;
    for (index, raw) in text.split('\n').enumerate() {
        let number = index + 1;
        let line = raw.trim_end();
        if line.is_empty() {
            continue;
        }
        let bytes = line.as_bytes();
        if bytes.len() < 2 || bytes[1] != b'=' || !bytes[0].is_ascii_lowercase() {
            return Err(malformed(number, "line is not <type>=<value> (RFC 4566 §5)"));
        }
        // No SDP field may hold a NUL or a CR (RFC 4566 §9, byte-string); an answer echoes some
        // of the offer's text (refused m-lines, the telephone-event fmtp), which must not carry
        // them into ours.
        if memchr::memchr2(b'\0', b'\r', bytes).is_some() {
            return Err(malformed(number, "NUL or CR inside a line (RFC 4566 §9)"));
        }
        let (kind, value) = (bytes[0], &line[2..]);
        if !saw_version {
            // RFC 4566 §5: "An SDP session description begins with v=0".
            if kind != b'v' || value.trim() != "0" {
                return Err(malformed(number, "session description does not start with v=0"));
            }
            saw_version = true;
            continue;
        }
        match kind {
            b'o' if session.origin.is_none() => session.origin = Some(parse_origin(value, number)?),
            b'c' => {
                let address = parse_connection(value, number)?;
                match session.media.last_mut() {
                    Some(media) => media.connection = Some(address),
                    None => session.connection = Some(address),
                }
            }
            b'm' => {
                if session.media.len() == MAX_MEDIA_LINES {
                    return Err(SdpError::TooLarge);
                }
                session.media.push(parse_media(value, number)?);
            }
            b'a' => {
                parse_attribute(&mut session, value);
                if let Some(media) = session.media.last()
                    && media.rtpmaps.len().max(media.fmtps.len()).max(media.crypto.len()) > MAX_PER_MEDIA
                {
                    return Err(SdpError::TooLarge);
                }
            }
            _ => {}
        }
    }
    if !saw_version {
        return Err(malformed(1, "empty session description"));
    }
    Ok(session)
}

fn parse_origin(value: &str, line: usize) -> Result<Origin<'_>, SdpError> {
    // o=<username> <sess-id> <sess-version> <nettype> <addrtype> <unicast-address>
    let fields: Vec<&str> = value.split_ascii_whitespace().collect();
    match fields.as_slice() {
        [_, session_id, version, _, _, _] => Ok(Origin { session_id, version }),
        _ => Err(malformed(line, "o= does not have six fields (RFC 4566 §5.2)")),
    }
}

fn parse_connection(value: &str, line: usize) -> Result<ConnectionAddress, SdpError> {
    // c=<nettype> <addrtype> <connection-address>, the address possibly with /ttl/count.
    let mut fields = value.split_ascii_whitespace();
    let (Some(nettype), Some(addrtype), Some(address), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(malformed(line, "c= does not have three fields (RFC 4566 §5.7)"));
    };
    if !nettype.eq_ignore_ascii_case("IN") {
        return Ok(ConnectionAddress::Unusable);
    }
    let host = address.split('/').next().unwrap_or(address);
    let parsed: Option<IpAddr> = host.parse().ok();
    Ok(match (addrtype.to_ascii_uppercase().as_str(), parsed) {
        // We are a unicast endpoint: a multicast group or the broadcast address in SDP would
        // make us send media to a whole network on a stranger's word (RFC 3264 §5.1's
        // multicast streams are not supported), so such an address is not usable.
        (_, Some(ip)) if ip.is_multicast() || ip == IpAddr::V4(std::net::Ipv4Addr::BROADCAST) => {
            ConnectionAddress::Unusable
        }
        ("IP4", Some(ip @ IpAddr::V4(_))) | ("IP6", Some(ip @ IpAddr::V6(_))) => ConnectionAddress::Ip(ip),
        _ => ConnectionAddress::Unusable,
    })
}

fn parse_media(value: &str, line: usize) -> Result<Media<'_>, SdpError> {
    // m=<media> <port>[/<number of ports>] <proto> <fmt> ...
    let mut fields = value.split_ascii_whitespace();
    let (Some(kind), Some(port), Some(proto)) = (fields.next(), fields.next(), fields.next()) else {
        return Err(malformed(line, "m= has fewer than four fields (RFC 4566 §5.14)"));
    };
    let port = port.split('/').next().unwrap_or(port);
    let port = port.parse().map_err(|_| malformed(line, "m= port is not a number in 0..=65535"))?;
    let formats: Vec<&str> = fields.collect();
    if formats.len() > MAX_PER_MEDIA {
        return Err(SdpError::TooLarge);
    }
    if formats.is_empty() {
        return Err(malformed(line, "m= lists no formats (RFC 4566 §5.14)"));
    }
    Ok(Media {
        line,
        kind,
        port,
        proto,
        formats,
        connection: None,
        rtpmaps: Vec::new(),
        fmtps: Vec::new(),
        ptime: None,
        maxptime: None,
        direction: None,
        crypto: Vec::new(),
        has_crypto_lines: false,
        rtcp_mux: false,
        rtcp: None,
    })
}

fn parse_attribute<'a>(session: &mut Session<'a>, value: &'a str) {
    let (name, attr_value) = match value.split_once(':') {
        Some((name, attr_value)) => (name, Some(attr_value.trim())),
        None => (value.trim(), None),
    };
    let Some(media) = session.media.last_mut() else {
        // Session level: only the direction matters to us (RFC 4566 §6 lets it default
        // every m-line).
        if let Some(direction) = Direction::from_attribute(name) {
            session.direction = Some(direction);
        }
        return;
    };
    if let Some(direction) = Direction::from_attribute(name) {
        media.direction = Some(direction);
        return;
    }
    if name.eq_ignore_ascii_case("rtcp-mux") {
        media.rtcp_mux = true;
        return;
    }
    let Some(attr_value) = attr_value else { return };
    match name {
        // A broken rtpmap leaves its payload type unknown, which only matters if it was the
        // one codec we could have used; failing the whole offer for it would be harsher.
        "rtpmap" => media.rtpmaps.extend(parse_rtpmap(attr_value)),
        "fmtp" => {
            // A broken fmtp on a format we will not use must not fail the call; skip it.
            if let Some((pt, params)) = attr_value.split_once(' ')
                && let Ok(pt) = pt.parse()
            {
                media.fmtps.push((pt, params.trim()));
            }
        }
        "rtcp" => media.rtcp = parse_rtcp(attr_value),
        "ptime" => media.ptime = parse_milliseconds(attr_value),
        "maxptime" => media.maxptime = parse_milliseconds(attr_value),
        "crypto" => {
            media.has_crypto_lines = true;
            media.crypto.extend(crypto::parse(attr_value));
        }
        _ => {}
    }
}

/// `a=rtcp:<port> [<nettype> <addrtype> <connection-address>]` (RFC 3605 §2.1). A line we
/// cannot use (no port, an address of another network type) is ignored: RTCP then goes to the
/// RTP port + 1, as without it.
fn parse_rtcp(value: &str) -> Option<(u16, Option<IpAddr>)> {
    let value = value.trim();
    let (port, address) = match value.split_once(|c: char| c.is_ascii_whitespace()) {
        Some((port, address)) => (port, Some(address.trim())),
        None => (value, None),
    };
    let port: u16 = port.parse().ok().filter(|&p| p != 0)?;
    match address {
        None => Some((port, None)),
        Some(address) => match parse_connection(address, 0) {
            // 0.0.0.0 is left to the negotiation, which drops any unspecified RTCP address.
            Ok(ConnectionAddress::Ip(ip)) => Some((port, Some(ip))),
            _ => None,
        },
    }
}

fn parse_rtpmap(value: &str) -> Option<RtpMap<'_>> {
    // a=rtpmap:<payload type> <encoding name>/<clock rate>[/<encoding parameters>] (RFC 4566 §6)
    let (pt, encoding) = value.split_once(' ')?;
    let payload_type: u8 = pt.parse().ok()?;
    let mut parts = encoding.trim().split('/');
    let name = parts.next().filter(|name| !name.is_empty())?;
    let clock_rate = parts.next()?.parse().ok()?;
    Some(RtpMap { payload_type, encoding: name, clock_rate, channels: parts.next() })
}

/// `a=ptime` is a decimal number of milliseconds; some peers write `20.0`. Nonsense is
/// ignored rather than fatal: we then use our own ptime.
fn parse_milliseconds(value: &str) -> Option<u32> {
    let whole = value.split('.').next().unwrap_or(value);
    whole.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerates_lf_trailing_blanks_and_attribute_order() {
        let text = "v=0\no=- 1 2 IN IP4 192.0.2.1 \ns=-\nt=0 0\nm=audio 4000 RTP/AVP 0 101\na=ptime:20.0\nc=IN IP4 192.0.2.1/127\na=rtpmap:101 telephone-event/8000\n\n";
        let session = parse(text).expect("parses");
        let media = &session.media[0];
        assert_eq!(media.connection, Some(ConnectionAddress::Ip("192.0.2.1".parse().expect("ip"))));
        assert_eq!(media.ptime, Some(20));
        assert_eq!(media.rtpmap(101).map(|map| map.encoding), Some("telephone-event"));
    }

    #[test]
    fn rejects_non_sdp() {
        assert!(matches!(parse("hello"), Err(SdpError::Malformed { line: 1, .. })));
        assert!(matches!(parse(""), Err(SdpError::Malformed { .. })));
        assert!(matches!(parse("v=0\nm=audio x RTP/AVP 0"), Err(SdpError::Malformed { line: 2, .. })));
        assert!(matches!(parse("v=0\nm=audio 4000 RTP/AVP"), Err(SdpError::Malformed { .. })));
    }

    #[test]
    fn host_names_are_unusable_not_fatal() {
        let session = parse("v=0\nc=IN IP4 media.example.com\nm=audio 1 RTP/AVP 0").expect("parses");
        assert_eq!(session.connection, Some(ConnectionAddress::Unusable));
    }
}
