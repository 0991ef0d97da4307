//! Writes the SDP we send. Every line ends in CRLF (RFC 4566 §5).

use std::fmt::Write as _;
use std::net::IpAddr;

use super::crypto::{self, CryptoSuite};
use super::{Direction, LocalMedia, SdesKey};

/// What goes into our audio m-line.
pub(crate) struct AudioLine<'a> {
    pub proto: &'a str,
    /// `(payload type, encoding name, clock rate)` in the order listed on the m-line.
    pub formats: Vec<(u8, &'a str, u32)>,
    /// Telephone-event payload type and its fmtp value.
    pub telephone_event: Option<(u8, Option<&'a str>)>,
    pub ptime: u16,
    pub direction: Direction,
    pub crypto: Vec<(u32, CryptoSuite, &'a SdesKey)>,
    /// `a=rtcp-mux` (RFC 5761 §5.1.1).
    pub rtcp_mux: bool,
}

fn address_type(address: IpAddr) -> &'static str {
    match address {
        IpAddr::V4(_) => "IP4",
        IpAddr::V6(_) => "IP6",
    }
}

/// `v=`, `o=`, `s=`, `c=` and `t=` (RFC 4566 §5). `c=` goes at session level so that the
/// port-0 m-lines of refused streams need none of their own.
pub(crate) fn session_header(out: &mut String, local: &LocalMedia) {
    let kind = address_type(local.address);
    let _ = write!(
        out,
        "v=0\r\no={} {} {} IN {kind} {}\r\ns=-\r\nc=IN {kind} {}\r\nt=0 0\r\n",
        local.username, local.session_id, local.session_version, local.address, local.address
    );
}

pub(crate) fn audio(out: &mut String, port: u16, line: &AudioLine<'_>) {
    let _ = write!(out, "m=audio {port} {}", line.proto);
    for (pt, _, _) in &line.formats {
        let _ = write!(out, " {pt}");
    }
    if let Some((pt, _)) = line.telephone_event {
        let _ = write!(out, " {pt}");
    }
    out.push_str("\r\n");
    // rtpmap for static types too: RFC 4566 §6 allows it and some gateways insist on it.
    for (pt, name, rate) in &line.formats {
        let _ = write!(out, "a=rtpmap:{pt} {name}/{rate}\r\n");
    }
    if let Some((pt, fmtp)) = line.telephone_event {
        let _ = write!(out, "a=rtpmap:{pt} telephone-event/8000\r\n");
        if let Some(fmtp) = fmtp {
            let _ = write!(out, "a=fmtp:{pt} {fmtp}\r\n");
        }
    }
    let _ = write!(out, "a=ptime:{}\r\na={}\r\n", line.ptime, line.direction.attribute());
    if line.rtcp_mux {
        out.push_str("a=rtcp-mux\r\n");
    }
    for (tag, suite, key) in &line.crypto {
        crypto::write(out, *tag, *suite, key);
    }
}

/// A refused or unused stream: port 0 with the offered formats echoed (RFC 3264 §6, §8.2).
pub(crate) fn disabled(out: &mut String, kind: &str, proto: &str, formats: &[&str]) {
    let _ = write!(out, "m={kind} 0 {proto}");
    for format in formats {
        let _ = write!(out, " {format}");
    }
    out.push_str("\r\n");
}
