//! Offer/answer proper (RFC 3264 §5–§8).

use std::net::{IpAddr, SocketAddr};

use super::crypto::{CryptoAttribute, CryptoSuite};
use super::parse::{self, ConnectionAddress, Media, Session};
use super::write::{self, AudioLine};
use super::{
    AudioCodec, ChosenCodec, Direction, LocalMedia, Negotiated, PTIME_RANGE_MS, SdpError, SrtpParams, SrtpPolicy,
};

/// We can decode every event RFC 4733 §3.2 defines for DTMF (0-9, *, #, A-D) plus flash (16).
const TELEPHONE_EVENT_FMTP: &str = "0-16";
/// Comfort noise's static payload type (RFC 3551 §6, used for RFC 3389 payloads).
const COMFORT_NOISE_PT: u8 = 13;
/// G.711, CN and 8 kHz telephone-event all run on an 8000 Hz RTP clock.
const NARROWBAND_HZ: u32 = 8000;
/// Used when neither side states a ptime (RFC 3551 §4.5.14: G.711 default packetisation).
const DEFAULT_PTIME_MS: u16 = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Voice(AudioCodec),
    TelephoneEvent,
    ComfortNoise,
    Other,
}

/// What payload type `pt` carries in `media`: its `a=rtpmap` when present (matched
/// case-insensitively, RFC 4566 §6 / RFC 4855 §3), else the RFC 3551 §6 static table.
fn classify(media: &Media<'_>, pt: u8) -> Format {
    let Some(map) = media.rtpmap(pt) else {
        return match pt {
            0 => Format::Voice(AudioCodec::Pcmu),
            8 => Format::Voice(AudioCodec::Pcma),
            COMFORT_NOISE_PT => Format::ComfortNoise,
            _ => Format::Other,
        };
    };
    // Telephone-event at 48 kHz belongs with Opus; mono only, as G.711 is.
    if map.clock_rate != NARROWBAND_HZ || map.channels.is_some_and(|channels| channels != "1") {
        return Format::Other;
    }
    let is = |name: &str| map.encoding.eq_ignore_ascii_case(name);
    if is("PCMU") {
        Format::Voice(AudioCodec::Pcmu)
    } else if is("PCMA") {
        Format::Voice(AudioCodec::Pcma)
    } else if is("telephone-event") {
        Format::TelephoneEvent
    } else if is("CN") {
        Format::ComfortNoise
    } else {
        Format::Other
    }
}

fn chosen(codec: AudioCodec, payload_type: u8) -> ChosenCodec {
    ChosenCodec { codec, payload_type, clock_rate: codec.clock_rate() }
}

/// A ptime we agree to: a multiple of 10 ms inside [`PTIME_RANGE_MS`].
fn sane_ptime(ms: u32) -> Option<u16> {
    u16::try_from(ms).ok().filter(|ms| PTIME_RANGE_MS.contains(ms) && ms % 10 == 0)
}

/// The ptime to use: the peer's `a=ptime` when sane, else `fallback`, never above
/// [`MAX_PTIME_MS`](super::MAX_PTIME_MS) or the peer's `a=maxptime` (RFC 4566 §6: both describe
/// what the peer wants to receive).
fn choose_ptime(ptime: Option<u32>, maxptime: Option<u32>, fallback: u16) -> u16 {
    let mut chosen = ptime.and_then(sane_ptime).unwrap_or(fallback).min(super::MAX_PTIME_MS);
    let ceiling = maxptime.map(|max| max.min(u32::from(*PTIME_RANGE_MS.end())));
    if let Some(ceiling) = ceiling.and_then(|max| u16::try_from(max - max % 10).ok())
        && ceiling >= *PTIME_RANGE_MS.start()
    {
        chosen = chosen.min(ceiling);
    }
    chosen
}

fn remote_ip(session: &Session<'_>, media: &Media<'_>) -> Result<IpAddr, SdpError> {
    match session.connection_for(media) {
        Some(ConnectionAddress::Ip(ip)) => Ok(ip),
        Some(ConnectionAddress::Unusable) => Err(SdpError::UnsupportedAddress),
        None => Err(SdpError::Malformed { line: media.line, reason: "no c= line for the stream (RFC 4566 §5.7)" }),
    }
}

/// Where the peer's `a=rtcp` (RFC 3605 §2.1) says its RTCP goes: its port, at its address or
/// else the stream's — none while the stream's address is the RFC 2543 hold (`0.0.0.0`).
fn remote_rtcp(media: &Media<'_>, stream_ip: IpAddr) -> Option<SocketAddr> {
    media.rtcp.map(|(port, ip)| SocketAddr::new(ip.unwrap_or(stream_ip), port)).filter(|a| !a.ip().is_unspecified())
}

/// Our side of the stream: send only if the peer receives and we want to send; receive only
/// if the peer sends and we want to receive (RFC 3264 §6.1).
fn intersect(peer: Direction, ours: Direction) -> Direction {
    Direction::from_flags(peer.receives() && ours.sends(), peer.sends() && ours.receives())
}

/// The offer's crypto line we will answer, per our policy (RFC 4568 §7.1.2: the first
/// acceptable line in the offerer's order).
fn select_crypto(media: &Media<'_>, policy: &SrtpPolicy) -> Result<Option<CryptoAttribute>, SdpError> {
    let first = media.crypto.first().cloned();
    match (policy, media.is_savp()) {
        (SrtpPolicy::Off, true) => Err(SdpError::SrtpDisabled),
        (SrtpPolicy::Off, false) => Ok(None),
        // RTP/SAVP without a usable key cannot be answered with SRTP, and RTP is not an option.
        (_, true) | (SrtpPolicy::Require(_), false) => first.map(Some).ok_or(SdpError::SrtpRequired),
        // Crypto lines in an RTP/AVP offer are the best-effort form: use them when usable.
        (SrtpPolicy::Offer(_), false) => Ok(first),
    }
}

/// The audio stream of an offer as we will answer it.
struct Served<'a> {
    codec: ChosenCodec,
    telephone_event: Option<(u8, Option<&'a str>)>,
    comfort_noise: Option<u8>,
    remote_rtp: SocketAddr,
    ptime: u16,
    direction: Direction,
    crypto: Option<CryptoAttribute>,
    rtcp_mux: bool,
    remote_rtcp: Option<SocketAddr>,
}

fn serve<'a>(offer: &Session<'a>, media: &Media<'a>, local: &LocalMedia) -> Result<Served<'a>, SdpError> {
    if !media.is_rtp() {
        return Err(SdpError::UnsupportedTransport);
    }
    // The offerer's order decides (RFC 3264 §6.1), as long as we support the codec at all.
    let codec = media
        .payload_types()
        .find_map(|pt| match classify(media, pt) {
            Format::Voice(codec) if local.codecs.contains(&codec) => Some(chosen(codec, pt)),
            _ => None,
        })
        .ok_or(SdpError::NoCommonCodec)?;
    let crypto = select_crypto(media, &local.srtp)?;
    let ip = remote_ip(offer, media)?;
    let find = |wanted: Format| media.payload_types().find(|pt| classify(media, *pt) == wanted);
    let telephone_event =
        if local.telephone_event { find(Format::TelephoneEvent).map(|pt| (pt, media.fmtp(pt))) } else { None };
    let comfort_noise = if local.comfort_noise { find(Format::ComfortNoise) } else { None };
    Ok(Served {
        codec,
        telephone_event,
        comfort_noise,
        remote_rtp: SocketAddr::new(ip, media.port),
        ptime: choose_ptime(media.ptime, media.maxptime, local.ptime),
        direction: intersect(offer.direction_for(media), local.direction),
        crypto,
        // RFC 5761 §5.1.1: only when offered, and then at our choice.
        rtcp_mux: media.rtcp_mux && local.rtcp_mux,
        remote_rtcp: remote_rtcp(media, ip),
    })
}

/// Answers an SDP offer (RFC 3264 §6) for one audio stream.
///
/// Serves the first `m=audio` line we can, answers every other m-line with port 0 in its
/// place, and returns the answer text with the negotiated parameters. Fails with an error whose
/// [`sip_status`](SdpError::sip_status) is 488 when nothing in the offer is acceptable; for a
/// re-INVITE, call [`LocalMedia::bump_version`] first.
pub fn answer(offer_sdp: &str, local: &LocalMedia) -> Result<Negotiated, SdpError> {
    local.validate()?;
    let offer = parse::parse(offer_sdp)?;
    let mut served = None;
    let mut first_refusal = None;
    for (index, media) in offer.media.iter().enumerate() {
        if !media.kind.eq_ignore_ascii_case("audio") || media.port == 0 {
            continue;
        }
        match serve(&offer, media, local) {
            Ok(stream) => {
                served = Some((index, stream));
                break;
            }
            Err(error) => {
                first_refusal.get_or_insert(error);
            }
        }
    }
    let Some((media_index, stream)) = served else {
        return Err(first_refusal.unwrap_or(SdpError::NoAudio));
    };

    let mut formats = vec![(stream.codec.payload_type, stream.codec.name(), stream.codec.clock_rate)];
    formats.extend(stream.comfort_noise.map(|pt| (pt, "CN", NARROWBAND_HZ)));
    let srtp = match (&stream.crypto, local.srtp.key()) {
        (Some(theirs), Some(key)) => Some(SrtpParams {
            suite: theirs.suite,
            tag: theirs.tag,
            local_key: key.clone(),
            remote_key: theirs.key.clone(),
            remote_lifetime: theirs.lifetime,
            remote_mki: theirs.mki,
        }),
        _ => None,
    };
    let offered = &offer.media[media_index];
    let line = AudioLine {
        // Echo the offerer's spelling of the transport (RFC 3264 §6.1).
        proto: offered.proto,
        formats,
        telephone_event: stream.telephone_event,
        ptime: stream.ptime,
        direction: stream.direction,
        // Same tag, same suite, our key (RFC 4568 §7.1.2).
        crypto: srtp.iter().map(|params| (params.tag, params.suite, &params.local_key)).collect(),
        rtcp_mux: stream.rtcp_mux,
    };
    let mut out = String::new();
    write::session_header(&mut out, local);
    for (index, media) in offer.media.iter().enumerate() {
        if index == media_index {
            write::audio(&mut out, local.port, &line);
        } else {
            write::disabled(&mut out, media.kind, media.proto, &media.formats);
        }
    }
    Ok(Negotiated {
        local_sdp: out,
        media_index,
        codec: stream.codec,
        telephone_event: stream.telephone_event.map(|(pt, _)| pt),
        comfort_noise: stream.comfort_noise,
        remote_rtp: stream.remote_rtp,
        ptime: stream.ptime,
        direction: stream.direction,
        srtp,
        rtcp_mux: stream.rtcp_mux,
        remote_rtcp: stream.remote_rtcp,
    })
}

/// Our audio m-line when we offer: `first` (the codec in use, on a re-offer) and then our
/// codecs in preference order, CN, telephone-event, and one crypto line per suite.
fn offer_line<'a>(
    local: &'a LocalMedia,
    proto: &'a str,
    first: Option<ChosenCodec>,
    telephone_event_pt: u8,
    comfort_noise_pt: u8,
) -> AudioLine<'a> {
    let mut formats: Vec<(u8, &str, u32)> = Vec::new();
    let rest = local.codecs.iter().map(|codec| chosen(*codec, codec.static_payload_type()));
    for codec in first.into_iter().chain(rest) {
        if !formats.iter().any(|(_, name, _)| *name == codec.name()) {
            formats.push((codec.payload_type, codec.name(), codec.clock_rate));
        }
    }
    if local.comfort_noise {
        formats.push((comfort_noise_pt, "CN", NARROWBAND_HZ));
    }
    let crypto = match local.srtp.key() {
        // The same key under each suite: only the one the answer picks is ever used.
        Some(key) => (1..).zip(CryptoSuite::PREFERENCE).map(|(tag, suite)| (tag, suite, key)).collect(),
        None => Vec::new(),
    };
    AudioLine {
        proto,
        formats,
        telephone_event: local.telephone_event.then_some((telephone_event_pt, Some(TELEPHONE_EVENT_FMTP))),
        ptime: local.ptime,
        direction: local.direction,
        crypto,
        rtcp_mux: local.rtcp_mux,
    }
}

fn offer_proto(policy: &SrtpPolicy) -> &'static str {
    match policy {
        SrtpPolicy::Require(_) => "RTP/SAVP",
        SrtpPolicy::Off | SrtpPolicy::Offer(_) => "RTP/AVP",
    }
}

/// Builds an initial offer (RFC 3264 §5) with one audio stream: all our codecs in our order,
/// telephone-event, CN if enabled, `a=ptime`, our direction and, per the SRTP policy, crypto
/// lines.
pub fn offer(local: &LocalMedia) -> Result<String, SdpError> {
    local.validate()?;
    let mut out = String::new();
    write::session_header(&mut out, local);
    let line = offer_line(local, offer_proto(&local.srtp), None, local.telephone_event_pt, COMFORT_NOISE_PT);
    write::audio(&mut out, local.port, &line);
    Ok(out)
}

/// Builds a re-INVITE offer (RFC 3264 §8) that changes our direction: [`Direction::SendOnly`]
/// to hold, [`Direction::SendRecv`] to resume (RFC 3264 §8.4).
///
/// Bumps `local.session_version` by one and stores `direction` in `local`. Keeps the m-line
/// layout of `current.local_sdp` (refused streams stay at port 0 in their place, RFC 3264
/// §8.2), its transport, ptime, SRTP suite and key, and the payload types in use, with the
/// current codec listed first so the answerer has no reason to switch.
pub fn reoffer(local: &mut LocalMedia, current: &Negotiated, direction: Direction) -> Result<String, SdpError> {
    local.validate()?;
    local.bump_version();
    local.direction = direction;
    let local = &*local;
    let previous = parse::parse(&current.local_sdp).ok();
    let media = previous.as_ref().map(|session| session.media.as_slice()).unwrap_or_default();
    let proto = media.get(current.media_index).map(|audio| audio.proto).unwrap_or(offer_proto(&local.srtp));
    let mut line = offer_line(
        local,
        proto,
        Some(current.codec),
        current.telephone_event.unwrap_or(local.telephone_event_pt),
        current.comfort_noise.unwrap_or(COMFORT_NOISE_PT),
    );
    // Hold must not renegotiate the stream: keep the agreed ptime, and offer only the crypto
    // suite in use under its tag with the same key (RFC 4568 §7.1.4 allows keeping keys), or
    // none if the call runs plain RTP.
    line.ptime = current.ptime;
    line.crypto = current.srtp.iter().map(|params| (params.tag, params.suite, &params.local_key)).collect();
    let mut out = String::new();
    write::session_header(&mut out, local);
    if current.media_index < media.len() {
        for (index, stream) in media.iter().enumerate() {
            if index == current.media_index {
                write::audio(&mut out, local.port, &line);
            } else {
                write::disabled(&mut out, stream.kind, stream.proto, &stream.formats);
            }
        }
    } else {
        write::audio(&mut out, local.port, &line);
    }
    Ok(out)
}

/// Checks an answer against the offer we sent (RFC 3264 §6, §7) and returns what was agreed.
///
/// Payload types the answer lists but we never offered are ignored rather than fatal (some
/// gateways add CN or telephone-event unasked); the call fails only when no offered voice codec
/// remains. A UAC cannot refuse a 2xx, so on error ACK and then BYE (RFC 3261 §13.2.2.4).
pub fn accept_answer(offer_we_sent: &str, answer_sdp: &str) -> Result<Negotiated, SdpError> {
    let offer = parse::parse(offer_we_sent).map_err(|_| SdpError::InvalidLocal("the offer we sent does not parse"))?;
    let answer = parse::parse(answer_sdp)?;
    let media_index = offer
        .media
        .iter()
        .position(|media| media.kind.eq_ignore_ascii_case("audio") && media.port != 0 && media.is_rtp())
        .ok_or(SdpError::InvalidLocal("the offer we sent has no audio stream"))?;
    // RFC 3264 §6: one m-line in the answer per m-line in the offer, in the same order.
    if answer.media.len() != offer.media.len() {
        return Err(SdpError::AnswerMismatch("number of m-lines differs from the offer"));
    }
    if offer.media.iter().zip(&answer.media).any(|(ours, theirs)| !ours.kind.eq_ignore_ascii_case(theirs.kind)) {
        return Err(SdpError::AnswerMismatch("m-line media types differ from the offer"));
    }
    let ours = &offer.media[media_index];
    let theirs = &answer.media[media_index];
    if theirs.port == 0 {
        // The answerer refused the stream (RFC 3264 §6).
        return Err(SdpError::NoCommonCodec);
    }
    // A payload type counts when we offered it and the answer does not remap it (RFC 3264
    // §6.1: the answer uses the offer's numbering).
    let agreed = |pt: u8| {
        let format = classify(ours, pt);
        let offered = ours.payload_types().any(|offered| offered == pt);
        let consistent = theirs.rtpmap(pt).is_none() || classify(theirs, pt) == format;
        (offered && consistent).then_some(format)
    };
    let codec = theirs
        .payload_types()
        .find_map(|pt| match agreed(pt) {
            Some(Format::Voice(codec)) => Some(chosen(codec, pt)),
            _ => None,
        })
        .ok_or(SdpError::NoCommonCodec)?;
    let find = |wanted: Format| theirs.payload_types().find(|pt| agreed(*pt) == Some(wanted));
    let srtp = match theirs.crypto.first() {
        Some(attr) => {
            // RFC 4568 §7.1.3: the answer's tag selects one of our offered lines.
            let mine = ours
                .crypto
                .iter()
                .find(|mine| mine.tag == attr.tag)
                .ok_or(SdpError::AnswerMismatch("crypto tag was not in our offer"))?;
            if mine.suite != attr.suite {
                return Err(SdpError::AnswerMismatch("crypto suite differs from our line with that tag"));
            }
            Some(SrtpParams {
                suite: attr.suite,
                tag: attr.tag,
                local_key: mine.key.clone(),
                remote_key: attr.key.clone(),
                remote_lifetime: attr.lifetime,
                remote_mki: attr.mki,
            })
        }
        None if theirs.has_crypto_lines => return Err(SdpError::AnswerMismatch("answer's crypto line is unusable")),
        None if ours.is_savp() => return Err(SdpError::SrtpRequired),
        None => None,
    };
    let fallback_ptime = ours.ptime.and_then(sane_ptime).unwrap_or(DEFAULT_PTIME_MS);
    let ip = remote_ip(&answer, theirs)?;
    let direction = intersect(answer.direction_for(theirs), offer.direction_for(ours));
    Ok(Negotiated {
        local_sdp: offer_we_sent.to_owned(),
        media_index,
        codec,
        telephone_event: find(Format::TelephoneEvent),
        comfort_noise: find(Format::ComfortNoise),
        remote_rtp: SocketAddr::new(ip, theirs.port),
        ptime: choose_ptime(theirs.ptime, theirs.maxptime, fallback_ptime),
        direction,
        srtp,
        // RFC 5761 §5.1.1: multiplexed once the answer says so to our offer of it.
        rtcp_mux: theirs.rtcp_mux && ours.rtcp_mux,
        remote_rtcp: remote_rtcp(theirs, ip),
    })
}

/// What a new offer in an existing session changed relative to the previous one from the same
/// side (RFC 3264 §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OfferChange {
    /// Same streams, same direction: a session refresh (e.g. an RFC 4028 session timer
    /// re-INVITE). Keep the media running.
    Unchanged,
    /// Only the direction changed: hold or resume (RFC 3264 §8.4). Keep codec and keys; the
    /// directions are the offerer's, for its first changed stream.
    DirectionOnly {
        /// The offerer's direction before.
        previous: Direction,
        /// The offerer's direction now.
        current: Direction,
    },
    /// Streams, ports, transports, codecs, ptime or keys changed (RFC 3264 §8.3): re-answer and
    /// rebuild the media path.
    Media,
}

/// Compares two offers from the far end in one dialog. The connection address is ignored when
/// either side uses the RFC 2543 hold form `c=0.0.0.0`, which reads as a direction (RFC 3264
/// §8.4); take the remote address from the new [`Negotiated`] in any case.
pub fn compare_offers(previous: &str, current: &str) -> Result<OfferChange, SdpError> {
    let old = parse::parse(previous)?;
    let new = parse::parse(current)?;
    if old.media.len() != new.media.len() {
        // RFC 3264 §8 forbids removing m-lines; either way it is not a mere hold.
        return Ok(OfferChange::Media);
    }
    let mut change = OfferChange::Unchanged;
    for (before, after) in old.media.iter().zip(&new.media) {
        if !same_stream(&old, before, &new, after) {
            return Ok(OfferChange::Media);
        }
        let (was, is) = (old.direction_for(before), new.direction_for(after));
        if was != is && change == OfferChange::Unchanged {
            change = OfferChange::DirectionOnly { previous: was, current: is };
        }
    }
    Ok(change)
}

fn same_stream(old: &Session<'_>, before: &Media<'_>, new: &Session<'_>, after: &Media<'_>) -> bool {
    let hold_form =
        |address: Option<ConnectionAddress>| matches!(address, Some(ConnectionAddress::Ip(ip)) if ip.is_unspecified());
    let (was, is) = (old.connection_for(before), new.connection_for(after));
    let same_address = was == is || hold_form(was) || hold_form(is);
    let mut rtpmaps = (before.rtpmaps.clone(), after.rtpmaps.clone());
    rtpmaps.0.sort_by_key(|map| map.payload_type);
    rtpmaps.1.sort_by_key(|map| map.payload_type);
    same_address
        && before.kind == after.kind
        && before.port == after.port
        && before.proto.eq_ignore_ascii_case(after.proto)
        && before.formats == after.formats
        && rtpmaps.0 == rtpmaps.1
        && before.fmtps == after.fmtps
        && before.ptime == after.ptime
        // Only the first usable crypto line matters: it is the one an answer picks, since we
        // support every suite we parse (RFC 4568 §7.1.2).
        && before.crypto.first() == after.crypto.first()
}
