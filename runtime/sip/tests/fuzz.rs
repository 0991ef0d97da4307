//! Fuzz targets for what a peer sends the signalling core, as property tests on stable Rust:
//! the SIP message layer (the stable twin of `fuzz/fuzz_targets/parse_message.rs`, which needs
//! nightly) and SDP offer/answer, fed arbitrary bytes and SDP built from a grammar of `v=`,
//! `o=`, `s=`, `c=`, `t=`, `m=` and `a=` lines with hostile values. Each runs a few hundred to a
//! few thousand cases in `cargo test`; set `PROPTEST_CASES` for a longer run (docs/security.md,
//! "Fuzzing"):
//!
//! ```sh
//! PROPTEST_CASES=200000 cargo test --release -p patchbay-sip --test fuzz
//! ```

use std::net::{IpAddr, SocketAddr};

use patchbay_sip::message::{Limits, StreamFrame, frame_stream, parse_datagram, parse_stream_message};
use patchbay_sip::sdp::{
    AudioCodec, Culprit, Direction, LocalMedia, OfferChange, SdesKey, SdpError, SrtpPolicy, accept_answer, answer,
    compare_offers, offer,
};
use proptest::prelude::*;

/// `cases` by default; `PROPTEST_CASES` when set (a `ProptestConfig::with_cases` ignores it).
fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    ProptestConfig::with_cases(cases)
}

// ---------------------------------------------------------------------------------------------
// SIP messages
// ---------------------------------------------------------------------------------------------

/// Bytes shaped like SIP: a start line, header fields (known names, compact forms, folded lines,
/// bad Content-Lengths) and a body, joined by CRLF or LF, or raw noise.
fn sip_ish_bytes() -> impl Strategy<Value = Vec<u8>> {
    let start = prop_oneof![
        Just("INVITE sip:bob@example.com SIP/2.0".to_owned()),
        Just("SIP/2.0 200 OK".to_owned()),
        Just("OPTIONS sip:[2001:db8::1]:5060;transport=tcp SIP/2.0".to_owned()),
        "[A-Z]{1,8} [ -~]{0,30} SIP/[0-9].[0-9]",
        "SIP/2.0 [0-9]{1,5} [ -~]{0,10}",
    ];
    let header = prop_oneof![
        Just("Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1".to_owned()),
        Just("From: <sip:alice@example.com>;tag=1".to_owned()),
        Just("t: <sip:bob@example.com>".to_owned()),
        Just("i: abc@host".to_owned()),
        Just("CSeq: 1 INVITE".to_owned()),
        Just("Max-Forwards: 70".to_owned()),
        "(Content-Length|l): ?[0-9]{0,22}",
        "(Via|v|From|f|To|t|Call-ID|i|CSeq|Contact|m|Route|Record-Route|Content-Type|c|Require|Expires): [ -~]{0,40}",
        "[A-Za-z-]{1,12}:[ -~]{0,40}",
        " [ -~]{0,20}",
    ];
    let message =
        (start, prop::collection::vec(header, 0..12), any::<bool>(), prop::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(start, headers, lf_only, body)| {
                let eol = if lf_only { "\n" } else { "\r\n" };
                let mut out = start;
                for header in headers {
                    out.push_str(eol);
                    out.push_str(&header);
                }
                out.push_str(eol);
                out.push_str(eol);
                let mut out = out.into_bytes();
                out.extend_from_slice(&body);
                out
            });
    prop_oneof![
        3 => prop::collection::vec(message, 1..3).prop_map(|messages| messages.concat()),
        1 => prop::collection::vec(any::<u8>(), 0..256),
    ]
}

proptest! {
    #![proptest_config(cases(2048))]

    /// Every entry point of the message layer, as `fuzz/fuzz_targets/parse_message.rs` drives
    /// them: no panic, an error response can always be written, and the stream framer cuts
    /// frames inside the buffer that it then parses.
    #[test]
    fn sip_message_layer_never_panics(bytes in sip_ish_bytes()) {
        let limits = Limits::default();
        if let Err(err) = parse_datagram(&bytes, &limits) {
            let mut out = Vec::new();
            let wrote = err.write_response(Some("fuzz"), &mut out);
            prop_assert_eq!(wrote, !out.is_empty());
        }
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            match frame_stream(rest, &limits) {
                StreamFrame::Complete { len } | StreamFrame::KeepAlive { len } => {
                    prop_assert!(len > 0 && len <= rest.len());
                    let _ = parse_stream_message(&rest[..len], &limits);
                    rest = &rest[len..];
                }
                StreamFrame::Incomplete | StreamFrame::Invalid(_) => break,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SDP
// ---------------------------------------------------------------------------------------------

/// A number as peers write them, including ones no field can hold.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u32..70_000).prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        Just("18446744073709551616".to_owned()),
        Just("340282366920938463463374607431768211456".to_owned()),
        Just("-1".to_owned()),
        Just("20.0".to_owned()),
        Just("".to_owned()),
        "[0-9a-z.+-]{1,6}",
    ]
}

/// A `c=` value with three fields (an address we can use or not: multicast, broadcast, the
/// RFC 2543 hold form, a host name, another network type).
fn address() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just("IN IP4 192.0.2.10".to_owned()),
        1 => Just("IN IP4 0.0.0.0".to_owned()),
        1 => Just("IN IP6 2001:db8::10".to_owned()),
        1 => Just("IN IP6 ::".to_owned()),
        1 => Just("IN IP4 224.2.1.1/127/3".to_owned()),
        1 => Just("IN IP4 255.255.255.255".to_owned()),
        1 => Just("IN IP4 2001:db8::1".to_owned()),
        1 => Just("IN IP4 media.example.com".to_owned()),
        1 => Just("ATM NSAP 47.0005.80.ffe100.0000.f21a.01".to_owned()),
        2 => (any::<[u8; 4]>(), prop::option::of(number())).prop_map(|(ip, ttl)| {
            let ip = IpAddr::from(ip);
            ttl.map_or(format!("IN IP4 {ip}"), |ttl| format!("IN IP4 {ip}/{ttl}"))
        }),
        1 => any::<[u8; 16]>().prop_map(|ip| format!("IN IP6 {}", IpAddr::from(ip))),
    ]
}

/// A `c=` value that is not three fields, or not text at all.
fn bad_address() -> impl Strategy<Value = String> {
    prop_oneof![Just("IN IP4".to_owned()), Just("IN IP4 192.0.2.1 extra".to_owned()), "[ -~]{0,30}"]
}

fn payload_type() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["0", "0", "8", "8", "13", "18", "101", "96", "127"]).prop_map(str::to_owned),
        1 => number(),
    ]
}

const KEY: &str = "PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR";

/// An `a=fmtp` value: DTMF event ranges, any text, text with control characters (NUL, a lone
/// CR) that must never reach our answer.
fn fmtp_params() -> impl Strategy<Value = String> {
    prop_oneof![Just("0-15".to_owned()), Just("0-16".to_owned()), "[ -~]{0,20}", "[ -~\r\t\x00\x0b]{0,20}"]
}

fn attribute() -> impl Strategy<Value = String> {
    let encoding = prop::sample::select(vec![
        "PCMU",
        "pcma",
        "PCMA",
        "telephone-event",
        "TELEPHONE-EVENT",
        "CN",
        "opus",
        "G729",
        "",
    ]);
    let rtpmap = (
        payload_type(),
        encoding,
        prop_oneof![3 => Just("8000".to_owned()), 1 => number()],
        prop::option::weighted(0.2, prop_oneof![Just("1".to_owned()), Just("2".to_owned()), number()]),
    )
        .prop_map(|(pt, enc, rate, channels)| match channels {
            Some(channels) => format!("a=rtpmap:{pt} {enc}/{rate}/{channels}"),
            None => format!("a=rtpmap:{pt} {enc}/{rate}"),
        });
    let suite = prop::sample::select(vec![
        "AES_CM_128_HMAC_SHA1_80",
        "AES_CM_128_HMAC_SHA1_32",
        "F8_128_HMAC_SHA1_80",
        "AES_256_CM_HMAC_SHA1_80",
    ]);
    let key = prop_oneof![3 => Just(KEY.to_owned()), 1 => "[A-Za-z0-9+/=]{0,44}"];
    let key_params = (
        key,
        prop::option::weighted(0.3, prop_oneof![Just("2^20".to_owned()), Just("2^99".to_owned()), number()]),
        prop::option::weighted(0.2, (number(), number())),
    )
        .prop_map(|(key, lifetime, mki)| {
            let mut out = format!("inline:{key}");
            if let Some(lifetime) = lifetime {
                out.push('|');
                out.push_str(&lifetime);
            }
            if let Some((value, length)) = mki {
                out.push_str(&format!("|{value}:{length}"));
            }
            out
        });
    let tag = prop_oneof![3 => (1u32..10).prop_map(|t| t.to_string()), 1 => number()];
    let crypto = (tag, suite, key_params, prop::option::weighted(0.2, "[ -~]{0,20}")).prop_map(
        |(tag, suite, params, session)| match session {
            Some(session) => format!("a=crypto:{tag} {suite} {params} {session}"),
            None => format!("a=crypto:{tag} {suite} {params}"),
        },
    );
    prop_oneof![
        3 => rtpmap,
        2 => crypto,
        1 => (payload_type(), fmtp_params()).prop_map(|(pt, params)| format!("a=fmtp:{pt} {params}")),
        1 => number().prop_map(|n| format!("a=ptime:{n}")),
        1 => number().prop_map(|n| format!("a=maxptime:{n}")),
        1 => prop::sample::select(vec!["a=sendonly", "a=recvonly", "a=inactive", "a=sendrecv", "a=rtcp-mux", "a=x"])
            .prop_map(str::to_owned),
        1 => (number(), prop::option::of(address())).prop_map(|(port, addr)| match addr {
            Some(addr) => format!("a=rtcp:{port} {addr}"),
            None => format!("a=rtcp:{port}"),
        }),
        1 => "a=[a-z-]{0,10}(:[ -~]{0,30})?",
    ]
}

fn media_line() -> impl Strategy<Value = String> {
    let kind = prop_oneof![
        8 => Just("audio"),
        1 => Just("AUDIO"),
        1 => Just("video"),
        1 => Just("application"),
        1 => Just("text"),
    ];
    let port = prop_oneof![
        4 => (1u16..).prop_map(|p| p.to_string()),
        1 => Just("0".to_owned()),
        1 => (1u16.., 1u8..).prop_map(|(p, n)| format!("{p}/{n}")),
        1 => Just("65535".to_owned()),
    ];
    let proto = prop_oneof![
        8 => Just("RTP/AVP"),
        2 => Just("RTP/SAVP"),
        1 => Just("rtp/avp"),
        1 => Just("UDP/TLS/RTP/SAVPF"),
        1 => Just("udp"),
    ];
    (kind, port, proto, prop::collection::vec(payload_type(), 1..10)).prop_map(|(kind, port, proto, formats)| {
        let mut line = format!("m={kind} {port} {proto}");
        for format in formats {
            line.push(' ');
            line.push_str(&format);
        }
        line
    })
}

/// A line that may break the description: any type letter, malformed `o=`, `c=` and `m=`
/// lines, text that is not a line at all.
fn hostile_line() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => prop::collection::vec(number(), 0..8).prop_map(|fields| format!("o={}", fields.join(" "))),
        1 => (number(), number()).prop_map(|(a, b)| format!("t={a} {b}")),
        1 => bad_address().prop_map(|c| format!("c={c}")),
        1 => ("[a-z]{1,6}", number(), "[ -~]{0,12}", prop::collection::vec(number(), 0..3))
            .prop_map(|(kind, port, proto, formats)| format!("m={kind} {port} {proto} {}", formats.join(" "))),
        1 => "[a-z]=[ -~]{0,40}",
        1 => "[A-Z ]=?[ -~]{0,10}",
        1 => "\\PC{0,20}",
        1 => any::<String>(),
    ]
}

/// A media section: the m-line, maybe its own `c=`, and its attributes.
fn media_section() -> impl Strategy<Value = Vec<String>> {
    (media_line(), prop::option::of(address()), prop::collection::vec(attribute(), 0..10)).prop_map(
        |(m, c, attributes)| {
            let mut lines = vec![m];
            lines.extend(c.map(|c| format!("c={c}")));
            lines.extend(attributes);
            lines
        },
    )
}

/// A session description from the grammar: a session part (`o=`, `s=`, `c=`, `t=`, session
/// attributes) and media sections, mostly well formed but with hostile values where the reader
/// is lenient (numbers too large for any field, unusable addresses, crypto lines of every kind);
/// sometimes more m-lines than we accept; now and then a hostile line inserted anywhere; with
/// CRLF, LF, trailing blanks or empty lines.
fn sdp_ish_text() -> impl Strategy<Value = String> {
    let head = prop_oneof![
        30 => Just("v=0".to_owned()),
        1 => Just("v=1".to_owned()),
        1 => Just(String::new()),
        1 => "v=[ -~]{0,4}",
    ];
    let session = (
        prop_oneof![
            4 => Just("o=- 1 2 IN IP4 192.0.2.10".to_owned()),
            1 => (any::<u64>(), any::<u64>()).prop_map(|(id, v)| format!("o=- {id} {v} IN IP4 host")),
        ],
        prop::option::of(address()),
        prop::collection::vec(
            prop::sample::select(vec!["a=sendonly", "a=recvonly", "a=inactive", "a=sendrecv", "a=tool:x"]),
            0..2,
        ),
    )
        .prop_map(|(o, c, attributes)| {
            let mut lines = vec![o, "s=-".to_owned()];
            lines.extend(c.map(|c| format!("c={c}")));
            lines.push("t=0 0".to_owned());
            lines.extend(attributes.into_iter().map(str::to_owned));
            lines
        });
    let media = prop_oneof![
        8 => prop::collection::vec(media_section(), 1..5).prop_map(|sections| sections.concat()),
        1 => (media_line(), 28usize..40).prop_map(|(line, n)| vec![line; n]),
    ];
    let hostile = prop_oneof![
        3 => Just(Vec::new()),
        1 => prop::collection::vec((hostile_line(), any::<prop::sample::Index>()), 1..3),
    ];
    let eol = prop::sample::select(vec!["\r\n", "\r\n", "\n", " \r\n", "\r\n\r\n"]);
    (head, session, media, hostile, eol, any::<bool>()).prop_map(|(head, session, media, hostile, eol, trailer)| {
        let mut lines = session;
        lines.extend(media);
        for (line, at) in hostile {
            let at = at.index(lines.len() + 1);
            lines.insert(at, line);
        }
        let mut out = head;
        for line in lines {
            out.push_str(eol);
            out.push_str(&line);
        }
        if trailer {
            out.push_str(eol);
        }
        out
    })
}

/// What we answer with: the configurations a deployment can have.
fn local_media() -> impl Strategy<Value = LocalMedia> {
    let codecs = prop_oneof![
        Just(vec![AudioCodec::Pcmu, AudioCodec::Pcma]),
        Just(vec![AudioCodec::Pcma]),
        Just(vec![AudioCodec::Pcmu]),
    ];
    let srtp = prop_oneof![
        Just(SrtpPolicy::Off),
        Just(SrtpPolicy::Offer(SdesKey([7; 30]))),
        Just(SrtpPolicy::Require(SdesKey([9; 30]))),
    ];
    let direction = prop_oneof![Just(Direction::SendRecv), Just(Direction::SendOnly), Just(Direction::RecvOnly)];
    let bind = prop_oneof![Just("192.0.2.1:40000"), Just("[2001:db8::1]:40002")];
    (codecs, any::<(bool, bool, bool)>(), prop::sample::select(vec![10u16, 20, 40]), srtp, direction, bind).prop_map(
        |(codecs, (telephone_event, comfort_noise, rtcp_mux), ptime, srtp, direction, bind)| {
            let mut local = LocalMedia::new(bind.parse().expect("address"), None, 4242, 1);
            local.codecs = codecs;
            local.telephone_event = telephone_event;
            local.comfort_noise = comfort_noise;
            local.rtcp_mux = rtcp_mux;
            local.ptime = ptime;
            local.srtp = srtp;
            local.direction = direction;
            local
        },
    )
}

fn m_line_ports(text: &str) -> Vec<&str> {
    text.split('\n')
        .map(str::trim_end)
        .filter_map(|line| line.strip_prefix("m="))
        .map(|rest| rest.split_ascii_whitespace().nth(1).unwrap_or(""))
        .collect()
}

/// The index of the m-line an offerer that wrote `text` would check an answer against: its
/// first audio stream with a port and an RTP transport (what `accept_answer` looks for).
fn offerers_audio_index(text: &str) -> Option<usize> {
    text.split('\n').map(str::trim_end).filter_map(|line| line.strip_prefix("m=")).position(|rest| {
        let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
        fields.len() >= 3
            && fields[0].eq_ignore_ascii_case("audio")
            && fields[1].split('/').next().and_then(|p| p.parse::<u16>().ok()).is_some_and(|p| p != 0)
            && (fields[2].eq_ignore_ascii_case("RTP/AVP") || fields[2].eq_ignore_ascii_case("RTP/SAVP"))
    })
}

/// The checks every input gets: the parser's verdict is one (`compare_offers` of a text with
/// itself is `Unchanged` exactly when it parses), errors are the peer's with a 400 or 488, and a
/// successful answer is an SDP our own reader takes back as describing the same session.
fn check_offer(text: &str, local: &LocalMedia) -> Result<(), TestCaseError> {
    let parsed = compare_offers(text, text);
    match &parsed {
        Ok(change) => prop_assert_eq!(*change, OfferChange::Unchanged),
        Err(err) => prop_assert!(matches!(err, SdpError::Malformed { .. } | SdpError::TooLarge), "{:?}", err),
    }
    let negotiated = match answer(text, local) {
        Ok(negotiated) => negotiated,
        Err(err) => {
            prop_assert_eq!(err.culprit(), Culprit::Peer, "{:?}", err);
            prop_assert!(matches!(err.sip_status(), 400 | 488), "{:?}", err);
            if let Err(parse_error) = parsed {
                prop_assert_eq!(err, parse_error);
            }
            return Ok(());
        }
    };
    prop_assert!(parsed.is_ok(), "answered an offer that does not parse");
    let ours = &negotiated.local_sdp;
    prop_assert!(!ours.contains('\0'), "NUL in our answer:\n{}", ours);
    prop_assert!(
        !ours.replace("\r\n", "").contains(['\r', '\n']),
        "a line break inside a line of our answer:\n{:?}",
        ours
    );
    prop_assert_eq!(compare_offers(ours, ours), Ok(OfferChange::Unchanged));

    // One m-line per offered m-line (RFC 3264 §6), ours at the index served, the rest refused.
    let ports = m_line_ports(ours);
    prop_assert_eq!(ports.len(), m_line_ports(text).len());
    for (index, port) in ports.iter().enumerate() {
        let expected = if index == negotiated.media_index { local.port.to_string() } else { "0".to_owned() };
        prop_assert_eq!(*port, expected.as_str());
    }

    // Our answer, read back by our reader as an offer, describes the same stream.
    let again =
        answer(ours, local).map_err(|e| TestCaseError::fail(format!("our answer is not answerable: {e}\n{ours}")))?;
    prop_assert_eq!(again.media_index, negotiated.media_index);
    prop_assert_eq!(again.codec, negotiated.codec);
    prop_assert_eq!(again.telephone_event, negotiated.telephone_event);
    prop_assert_eq!(again.comfort_noise, negotiated.comfort_noise);
    prop_assert_eq!(again.ptime, negotiated.ptime);
    prop_assert_eq!(again.rtcp_mux, negotiated.rtcp_mux);
    prop_assert_eq!(again.remote_rtp, SocketAddr::new(local.address, local.port));
    prop_assert_eq!(
        again.srtp.map(|s| (s.suite, s.tag, s.remote_key)),
        negotiated.srtp.as_ref().map(|s| (s.suite, s.tag, s.local_key.clone()))
    );

    // The offerer, checking our answer against its offer, agrees with what we negotiated.
    if offerers_audio_index(text) == Some(negotiated.media_index) {
        let accepted = accept_answer(text, ours)
            .map_err(|e| TestCaseError::fail(format!("the offerer would refuse our answer: {e}\n{ours}")))?;
        prop_assert_eq!(accepted.codec, negotiated.codec);
        prop_assert_eq!(accepted.telephone_event, negotiated.telephone_event);
        prop_assert_eq!(accepted.comfort_noise, negotiated.comfort_noise);
        prop_assert_eq!(accepted.ptime, negotiated.ptime);
        prop_assert_eq!(accepted.rtcp_mux, negotiated.rtcp_mux);
        prop_assert_eq!(accepted.direction, negotiated.direction.reversed());
        prop_assert_eq!(accepted.remote_rtp, SocketAddr::new(local.address, local.port));
        prop_assert_eq!(
            accepted.srtp.map(|s| (s.local_key, s.remote_key)),
            negotiated.srtp.map(|s| (s.remote_key, s.local_key))
        );
    }
    Ok(())
}

/// An answer to our own offer: no panic, and a refusal is the peer's.
fn check_answer(text: &str, local: &LocalMedia) -> Result<(), TestCaseError> {
    let ours = offer(local).expect("a valid configuration offers");
    match accept_answer(&ours, text) {
        Ok(accepted) => {
            prop_assert!(local.codecs.contains(&accepted.codec.codec));
            prop_assert!(!accepted.remote_rtp.ip().is_multicast());
        }
        Err(err) => prop_assert_eq!(err.culprit(), Culprit::Peer, "{:?}", err),
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(2048))]

    /// Arbitrary bytes (as the UTF-8 a SIP body would be read as) into answer, accept_answer
    /// and compare_offers.
    #[test]
    fn sdp_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512), local in local_media()) {
        let text = String::from_utf8_lossy(&bytes);
        check_offer(&text, &local)?;
        check_answer(&text, &local)?;
    }

    /// Session descriptions from the grammar (huge and negative numbers, missing and extra
    /// fields, unusable addresses, crypto lines of every kind, more m-lines than we take) as
    /// offers and as answers.
    #[test]
    fn sdp_from_the_grammar(text in sdp_ish_text(), local in local_media()) {
        check_offer(&text, &local)?;
        check_answer(&text, &local)?;
    }
}

/// Found by `sdp_from_the_grammar`: the offer's telephone-event fmtp (and the formats of a
/// refused m-line) were echoed into our answer with a NUL or a lone CR inside, which no SDP
/// line may hold (RFC 4566 §9) and which let the offer split a line of our answer in two. Such
/// a line is now malformed.
#[test]
fn nul_or_cr_inside_a_line_is_malformed_and_never_echoed() {
    let local = LocalMedia::new("192.0.2.1:40000".parse().expect("address"), None, 4242, 1);
    let head = "v=0\r\no=- 1 2 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\n";
    for (body, line) in [
        ("m=audio 1 RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 \0\r\n", 8),
        ("m=audio 1 RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\ra=x\r\n", 8),
        ("m=audio 1 RTP/AVP 0\r\nm=video 0 RTP/AVP \0\r\n", 7),
    ] {
        let offer = format!("{head}{body}");
        assert!(matches!(answer(&offer, &local), Err(SdpError::Malformed { line: l, .. }) if l == line), "{offer:?}");
    }
}
