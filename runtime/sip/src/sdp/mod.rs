//! SDP offer/answer (RFC 3264, RFC 4566) for what Patchbay speaks.
//!
//! Patchbay negotiates exactly one audio stream per call: G.711 (PCMU, PCMA, RFC 3551 §6 static
//! payload types 0 and 8), optionally RFC 3389 comfort noise (CN, payload type 13), RFC 4733
//! telephone-event for DTMF, and optionally SDES-keyed SRTP (RFC 4568). Everything here is
//! sans-IO: no clock, no randomness, no sockets. The caller supplies the session id and version,
//! the RTP address and port it bound, and the SRTP master key and salt.
//!
//! # Answering (UAS, or a re-INVITE from the far end)
//!
//! [`answer`] parses the offer with a small lenient parser (real SDPs from phones, PBXs and
//! carriers break strict parsers: LF-only line ends, trailing spaces, attributes in unusual
//! places) and then, following RFC 3264 §6:
//!
//! - serves the first `m=audio` line with a non-zero port, an `RTP/AVP` or `RTP/SAVP`
//!   transport and a codec in common; every other m-line (video, a second audio, …) is answered
//!   in the same position with port 0 and its offered formats echoed (§6: the answer has as many
//!   m-lines as the offer, in the same order);
//! - picks the first codec *in the offerer's order* that we support, recognised by static payload
//!   type or, for dynamic types, by `a=rtpmap` encoding name (case-insensitive) and clock rate,
//!   and answers with the offerer's payload type numbers (§6.1). The answer lists only that codec
//!   (plus telephone-event and CN): a single-codec answer stops the far end from switching codecs
//!   mid-call;
//! - includes telephone-event with the offerer's payload type and `a=fmtp` (RFC 4733 §7.1.1);
//! - answers the packetisation time: the offer's `a=ptime` when it is sane, else ours, never
//!   above 40 ms ([`MAX_PTIME_MS`]) or the offer's `a=maxptime` (RFC 4566 §6);
//! - answers the direction by reversing the offer's (§6.1), intersected with ours; the legacy
//!   RFC 2543 hold form `c=0.0.0.0` means the offerer does not want to receive (§8.4);
//! - with SRTP, picks the first `a=crypto` line with a suite we support and answers it with the
//!   same tag and our key (RFC 4568 §6.1, §7.1.2).
//!
//! When nothing can be served, [`answer`] fails with an [`SdpError`] whose
//! [`sip_status`](SdpError::sip_status) is 488 Not Acceptable Here (RFC 3261 §13.3.1.3, §21.4.26)
//! and whose [`warning`](SdpError::warning) gives the RFC 3261 §20.43 Warning code and text,
//! e.g. `305 Incompatible media format`.
//!
//! # Offering (UAC, re-INVITE for hold and resume)
//!
//! [`offer`] lists all our codecs in our preference order, telephone-event, `a=ptime` and the
//! direction; [`accept_answer`] checks the answer against the offer we sent (same number and
//! kinds of m-lines, RFC 3264 §6; codecs drawn from what we offered, §6.1; crypto tag one we
//! offered, RFC 4568 §7.1.3) and yields the same [`Negotiated`] as [`answer`]. A UAC cannot
//! refuse a 2xx: when [`accept_answer`] fails, the caller ACKs and then sends BYE
//! (RFC 3261 §13.2.2.4).
//!
//! [`reoffer`] builds a re-INVITE offer for hold (`sendonly`) or resume (`sendrecv`) that keeps
//! the m-line layout and payload types of the current session and bumps the `o=` version
//! (RFC 3264 §8, §8.4). [`compare_offers`] tells whether a re-offer from the far end changed
//! only the direction (hold/resume) or the media itself (address, port, codecs, keys).
//!
//! # SRTP policy
//!
//! [`SrtpPolicy::Offer`] is "SRTP when the peer can": offers carry `RTP/AVP` plus `a=crypto`
//! lines, the widely deployed best-effort form, and offers with crypto lines are answered with
//! SRTP. [`SrtpPolicy::Require`] offers `RTP/SAVP` and refuses offers without a usable crypto
//! line. Both `AES_CM_128_HMAC_SHA1_80` and `AES_CM_128_HMAC_SHA1_32` (RFC 4568 §6.2) are
//! supported; they take the same 30 bytes of key material (16-byte key, 14-byte salt).

mod crypto;
mod negotiate;
mod parse;
mod write;

use std::fmt;
use std::net::{IpAddr, SocketAddr};

pub use crypto::{CryptoSuite, Mki};
pub use negotiate::{OfferChange, accept_answer, answer, compare_offers, offer, reoffer};

/// Largest session description we parse. Real offers are well under 4 KiB; the bound keeps a
/// hostile body from costing more than a linear scan of 64 KiB.
pub const MAX_SDP_BYTES: usize = 64 * 1024;

/// Most m-lines we accept in one session description.
pub const MAX_MEDIA_LINES: usize = 32;

/// Packetisation times we understand in a peer's SDP, in milliseconds. G.711 at 10–60 ms is what phones,
/// PBXs and carriers use; outside that range we fall back to our own ptime.
pub const PTIME_RANGE_MS: std::ops::RangeInclusive<u16> = 10..=60;

/// The longest ptime we answer with (and send): what Patchbay's media clock paces. A peer that
/// prefers 50 or 60 ms is answered with 40 (ptime is a preference, RFC 4566 §6).
pub const MAX_PTIME_MS: u16 = 40;

/// Whether we can use `ms` as our own ptime: a multiple of 10 from 10 to [`MAX_PTIME_MS`] (what
/// Patchbay's media clock paces).
pub fn valid_ptime(ms: u16) -> bool {
    (*PTIME_RANGE_MS.start()..=MAX_PTIME_MS).contains(&ms) && ms.is_multiple_of(10)
}

/// Media direction, from our side of the stream (RFC 3264 §5.1, RFC 4566 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Send and receive (`a=sendrecv`, the default when no direction attribute is present).
    SendRecv,
    /// Send only (`a=sendonly`): we put the far end on hold.
    SendOnly,
    /// Receive only (`a=recvonly`): the far end put us on hold.
    RecvOnly,
    /// Neither (`a=inactive`).
    Inactive,
}

impl Direction {
    /// Builds a direction from whether media is sent and received.
    pub fn from_flags(sends: bool, receives: bool) -> Self {
        match (sends, receives) {
            (true, true) => Self::SendRecv,
            (true, false) => Self::SendOnly,
            (false, true) => Self::RecvOnly,
            (false, false) => Self::Inactive,
        }
    }

    /// Whether this side sends RTP.
    pub fn sends(self) -> bool {
        matches!(self, Self::SendRecv | Self::SendOnly)
    }

    /// Whether this side receives RTP.
    pub fn receives(self) -> bool {
        matches!(self, Self::SendRecv | Self::RecvOnly)
    }

    /// The same stream seen from the other end (RFC 3264 §6.1: sendonly is answered recvonly).
    pub fn reversed(self) -> Self {
        Self::from_flags(self.receives(), self.sends())
    }

    /// The SDP attribute name (`sendrecv`, `sendonly`, `recvonly`, `inactive`).
    pub fn attribute(self) -> &'static str {
        match self {
            Self::SendRecv => "sendrecv",
            Self::SendOnly => "sendonly",
            Self::RecvOnly => "recvonly",
            Self::Inactive => "inactive",
        }
    }

    pub(crate) fn from_attribute(name: &str) -> Option<Self> {
        match name {
            "sendrecv" => Some(Self::SendRecv),
            "sendonly" => Some(Self::SendOnly),
            "recvonly" => Some(Self::RecvOnly),
            "inactive" => Some(Self::Inactive),
            _ => None,
        }
    }
}

/// A voice codec Patchbay can carry without transcoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AudioCodec {
    /// G.711 µ-law, static payload type 0 (RFC 3551 §4.5.14, §6).
    Pcmu,
    /// G.711 A-law, static payload type 8 (RFC 3551 §4.5.14, §6).
    Pcma,
}

impl AudioCodec {
    /// Static payload type (RFC 3551 §6 table 4).
    pub fn static_payload_type(self) -> u8 {
        match self {
            Self::Pcmu => 0,
            Self::Pcma => 8,
        }
    }

    /// Encoding name as written in `a=rtpmap` (RFC 3551 §6).
    pub fn encoding_name(self) -> &'static str {
        match self {
            Self::Pcmu => "PCMU",
            Self::Pcma => "PCMA",
        }
    }

    /// RTP clock rate in Hz.
    pub fn clock_rate(self) -> u32 {
        8000
    }
}

/// SRTP key material for SDES (RFC 4568 §6.1): a 16-byte AES master key followed by a 14-byte
/// master salt, as carried base64-encoded in `inline:`. The caller draws it from a CSPRNG.
/// Wiped on drop.
#[derive(Clone, PartialEq, Eq, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub struct SdesKey(pub [u8; 30]);

impl fmt::Debug for SdesKey {
    // Keys end up in logs through Debug of the containing structs; never print them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SdesKey(..)")
    }
}

/// Whether and how we use SRTP with SDES keying.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SrtpPolicy {
    /// Plain RTP. `RTP/SAVP` offers are refused; crypto lines in `RTP/AVP` offers are ignored.
    #[default]
    Off,
    /// SRTP when the peer supports it: offers carry `RTP/AVP` with `a=crypto` lines, and any
    /// offer with a usable crypto line is answered with SRTP, using this key.
    Offer(SdesKey),
    /// SRTP or no call: offers carry `RTP/SAVP`, and offers without a usable crypto line fail.
    Require(SdesKey),
}

impl SrtpPolicy {
    pub(crate) fn key(&self) -> Option<&SdesKey> {
        match self {
            Self::Off => None,
            Self::Offer(key) | Self::Require(key) => Some(key),
        }
    }
}

/// What we can do for one audio stream: the local half of every negotiation.
///
/// Keep one per dialog and reuse it, so that `o=` keeps its session id and its version only
/// grows (RFC 3264 §8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalMedia {
    /// Voice codecs in our order of preference (used when we offer; when we answer, the
    /// offerer's order wins, RFC 3264 §6.1).
    pub codecs: Vec<AudioCodec>,
    /// Offer and accept RFC 4733 telephone-event at 8000 Hz, events 0-16.
    pub telephone_event: bool,
    /// Payload type we offer for telephone-event (dynamic, 96–127). When answering we use the
    /// offerer's.
    pub telephone_event_pt: u8,
    /// Offer and accept RFC 3389 comfort noise (static payload type 13).
    pub comfort_noise: bool,
    /// Our packetisation time in milliseconds.
    pub ptime: u16,
    /// The address written in `c=` and `o=`: the configured `external_ip` behind NAT, else the
    /// address the RTP socket is bound to (see [`LocalMedia::new`]).
    pub address: IpAddr,
    /// Our RTP port. RTCP is on port + 1 (RFC 3550 §11), or on this port too when RTCP
    /// multiplexing is agreed.
    pub port: u16,
    /// Offer and accept RTCP multiplexed on the RTP port (RFC 5761; `a=rtcp-mux`). We still
    /// listen on port + 1, as §5.1.1 asks of an offerer until the answer is in.
    pub rtcp_mux: bool,
    /// SRTP policy and our SDES key.
    pub srtp: SrtpPolicy,
    /// The direction we want: `SendOnly` while we hold the far end.
    pub direction: Direction,
    /// `o=` username (RFC 4566 §5.2).
    pub username: String,
    /// `o=` session id, chosen by the caller once per dialog.
    pub session_id: u64,
    /// `o=` session version, bumped by one for each new SDP we send in the dialog.
    pub session_version: u64,
}

impl LocalMedia {
    /// Our defaults for the RTP socket bound at `bind`: PCMU then PCMA, telephone-event on 101,
    /// 20 ms, sendrecv, no SRTP. The advertised address is `external_ip` when configured (NAT,
    /// the usual cause of one-way audio), else the bound address.
    pub fn new(bind: SocketAddr, external_ip: Option<IpAddr>, session_id: u64, session_version: u64) -> Self {
        Self {
            codecs: vec![AudioCodec::Pcmu, AudioCodec::Pcma],
            telephone_event: true,
            telephone_event_pt: 101,
            comfort_noise: false,
            ptime: 20,
            rtcp_mux: true,
            address: external_ip.unwrap_or(bind.ip()),
            port: bind.port(),
            srtp: SrtpPolicy::Off,
            direction: Direction::SendRecv,
            username: "patchbay".to_owned(),
            session_id,
            session_version,
        }
    }

    /// Bumps the `o=` version: call before sending a new SDP in an existing dialog, e.g. an
    /// answer to a re-INVITE (RFC 3264 §8). [`reoffer`] does it itself.
    pub fn bump_version(&mut self) {
        self.session_version = self.session_version.wrapping_add(1);
    }

    pub(crate) fn validate(&self) -> Result<(), SdpError> {
        if self.codecs.is_empty() {
            return Err(SdpError::InvalidLocal("no codecs configured"));
        }
        if !valid_ptime(self.ptime) {
            return Err(SdpError::InvalidLocal("ptime not 10, 20, 30 or 40 ms"));
        }
        if self.port == 0 {
            return Err(SdpError::InvalidLocal("RTP port 0"));
        }
        if self.address.is_unspecified() {
            return Err(SdpError::InvalidLocal("unspecified RTP address; configure external_ip"));
        }
        if self.telephone_event && !(96..=127).contains(&self.telephone_event_pt) {
            return Err(SdpError::InvalidLocal("telephone-event payload type not dynamic (96-127)"));
        }
        if self.username.is_empty() || self.username.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(SdpError::InvalidLocal("o= username empty or containing spaces"));
        }
        Ok(())
    }
}

/// The voice codec both sides agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChosenCodec {
    /// Which codec.
    pub codec: AudioCodec,
    /// Payload type on the wire, as the offerer numbered it (RFC 3264 §6.1).
    pub payload_type: u8,
    /// RTP clock rate in Hz.
    pub clock_rate: u32,
}

impl ChosenCodec {
    /// Encoding name (`PCMU`, `PCMA`).
    pub fn name(&self) -> &'static str {
        self.codec.encoding_name()
    }
}

/// Negotiated SRTP parameters (RFC 4568).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrtpParams {
    /// Crypto suite in use.
    pub suite: CryptoSuite,
    /// The `a=crypto` tag the answer echoed (RFC 4568 §6.1).
    pub tag: u32,
    /// Key and salt protecting what we send.
    pub local_key: SdesKey,
    /// Key and salt protecting what the peer sends.
    pub remote_key: SdesKey,
    /// The peer's master key lifetime in packets, if it gave one (RFC 4568 §6.1).
    pub remote_lifetime: Option<u64>,
    /// The peer's MKI, if it uses one: its packets carry an MKI field of this length.
    pub remote_mki: Option<Mki>,
}

/// The outcome of an offer/answer exchange: what the media layer needs to start the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The SDP we sent in this exchange: the answer from [`answer`], the offer given to
    /// [`accept_answer`]. [`reoffer`] reads its m-line layout.
    pub local_sdp: String,
    /// Index of the audio m-line in the session description.
    pub media_index: usize,
    /// The voice codec.
    pub codec: ChosenCodec,
    /// RFC 4733 telephone-event payload type, when both sides support it.
    pub telephone_event: Option<u8>,
    /// RFC 3389 comfort noise payload type, when both sides support it.
    pub comfort_noise: Option<u8>,
    /// Where to send RTP. Its address is unspecified (`0.0.0.0`) for an RFC 2543-style hold,
    /// in which case [`direction`](Self::direction) does not send.
    pub remote_rtp: SocketAddr,
    /// Packetisation time in milliseconds.
    pub ptime: u16,
    /// Our direction for this stream.
    pub direction: Direction,
    /// SRTP parameters, when SRTP was negotiated.
    pub srtp: Option<SrtpParams>,
    /// RTCP goes on the RTP port both ways (RFC 5761): both sides said `a=rtcp-mux`.
    pub rtcp_mux: bool,
    /// Where the peer wants RTCP when it said so (`a=rtcp`, RFC 3605; behind a NAT its RTCP
    /// port is seldom the RTP port + 1); `None`: the RTP port + 1 (RFC 3550 §11).
    pub remote_rtcp: Option<SocketAddr>,
}

/// Who caused an [`SdpError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Culprit {
    /// The far end sent something malformed or unacceptable.
    Peer,
    /// Our own configuration or our own SDP is unusable.
    Local,
}

/// Why an offer or answer could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SdpError {
    /// The body is larger than [`MAX_SDP_BYTES`], has more than [`MAX_MEDIA_LINES`] m-lines, or
    /// an m-line has more than 128 formats, rtpmaps, fmtps or crypto lines.
    #[error("session description too large")]
    TooLarge,
    /// The body is not an SDP session description (RFC 4566 §5).
    #[error("malformed SDP at line {line}: {reason}")]
    Malformed {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// The offer has no audio stream with a non-zero port.
    #[error("no audio stream offered")]
    NoAudio,
    /// No voice codec in common (e.g. only G.729 or Opus offered).
    #[error("no audio codec in common")]
    NoCommonCodec,
    /// The audio stream uses a transport other than `RTP/AVP` or `RTP/SAVP`.
    #[error("unsupported media transport")]
    UnsupportedTransport,
    /// The peer demands SRTP (`RTP/SAVP`) and our policy is [`SrtpPolicy::Off`].
    #[error("peer requires SRTP, which is disabled locally")]
    SrtpDisabled,
    /// We require SRTP and the peer offered or answered without a usable crypto line.
    #[error("SRTP required but the peer offered no supported crypto suite")]
    SrtpRequired,
    /// The connection address is a host name or an unknown address type; we do not resolve
    /// names in the signalling core.
    #[error("unsupported connection address")]
    UnsupportedAddress,
    /// The answer breaks RFC 3264 against the offer we sent.
    #[error("answer does not match our offer: {0}")]
    AnswerMismatch(&'static str),
    /// Our own configuration or our own offer is unusable.
    #[error("invalid local media configuration: {0}")]
    InvalidLocal(&'static str),
}

impl SdpError {
    /// Who caused the failure.
    pub fn culprit(&self) -> Culprit {
        match self {
            Self::InvalidLocal(_) => Culprit::Local,
            _ => Culprit::Peer,
        }
    }

    /// The SIP status to answer an offer in a request with: 400 for a body that is not SDP
    /// (RFC 3261 §21.4.1), 488 Not Acceptable Here for an offer we cannot serve
    /// (RFC 3261 §13.3.1.3, §21.4.26), 500 for our own configuration.
    pub fn sip_status(&self) -> u16 {
        match self {
            Self::TooLarge | Self::Malformed { .. } => 400,
            Self::InvalidLocal(_) => 500,
            _ => 488,
        }
    }

    /// Warning code and text for the response (RFC 3261 §20.43), when one applies.
    pub fn warning(&self) -> Option<(u16, &'static str)> {
        match self {
            Self::NoAudio => Some((304, "Media type not available")),
            Self::NoCommonCodec => Some((305, "Incompatible media format")),
            Self::UnsupportedTransport | Self::SrtpDisabled | Self::SrtpRequired => {
                Some((302, "Incompatible transport protocol"))
            }
            Self::UnsupportedAddress => Some((301, "Incompatible network address formats")),
            Self::Malformed { .. } | Self::TooLarge => Some((399, "Malformed session description")),
            Self::AnswerMismatch(_) | Self::InvalidLocal(_) => None,
        }
    }
}
