//! parse ∘ print is the identity on messages in the form this layer produces (CONVENTIONS §10).
//!
//! Bodies are UTF-8 because rsip prints bodies through `String::from_utf8_lossy`; header names
//! are the canonical long forms the parser normalises to.

use patchbay_sip::message::{
    Limits, Parsed, StreamFrame, StreamFramer, frame_stream, parse_datagram, parse_stream_message,
};
use proptest::prelude::*;
use rsip::headers::UntypedHeader;

fn host() -> impl Strategy<Value = rsip::Host> {
    prop_oneof![
        "[a-z][a-z0-9-]{0,8}(\\.[a-z]{2,5}){0,2}".prop_map(|d| rsip::Host::from(d.as_str())),
        any::<[u8; 4]>().prop_map(|o| rsip::Host::from(std::net::IpAddr::from(o))),
        // IPv6 references stay bracketed Domains so that they print back as valid URIs.
        any::<[u16; 8]>().prop_map(|s| rsip::Host::Domain(format!("[{}]", std::net::Ipv6Addr::from(s)).into())),
    ]
}

fn uri() -> impl Strategy<Value = rsip::Uri> {
    let user = ("[a-zA-Z0-9._~!*'()-]{1,10}(%[0-9A-F]{2})?", proptest::option::of("[a-z0-9&=+$,]{1,6}"));
    let param = prop_oneof![
        ("x-[a-z]{1,5}", proptest::option::of("[a-z0-9]{1,5}"))
            .prop_map(|(n, v)| rsip::Param::Other(n.into(), v.map(Into::into))),
        Just(rsip::Param::Lr),
        Just(rsip::Param::Transport(rsip::Transport::Tcp)),
    ];
    (
        any::<bool>(),
        proptest::option::of(user),
        host(),
        proptest::option::of(1u16..),
        proptest::collection::vec(param, 0..4),
    )
        .prop_map(|(sips, user, host, port, params)| rsip::Uri {
            scheme: Some(if sips { rsip::Scheme::Sips } else { rsip::Scheme::Sip }),
            auth: user.map(|(user, password)| rsip::Auth { user, password }),
            host_with_port: rsip::HostWithPort { host, port: port.map(Into::into) },
            params,
            headers: Vec::new(),
        })
}

fn token() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9.!%*_+`'~-]{1,12}"
}

fn common_headers(method: rsip::Method) -> impl Strategy<Value = Vec<rsip::Header>> {
    let vias = proptest::collection::vec((host(), proptest::option::of(1u16..), "[a-zA-Z0-9]{1,10}"), 1..4);
    let extra = proptest::collection::vec(
        prop_oneof![
            ("X-[A-Za-z]{1,8}", "[ -~]{0,20}").prop_map(|(n, v)| rsip::Header::Other(n, v.trim().to_owned())),
            uri().prop_map(|u| rsip::Header::Contact(rsip::headers::Contact::new(format!("<{u}>")))),
            "[ -~]{0,20}".prop_map(|v| rsip::Header::Subject(rsip::headers::Subject::new(v.trim()))),
        ],
        0..4,
    );
    (vias, uri(), uri(), token(), token(), 0u32..(1 << 31), 0u8..=255, extra).prop_map(
        move |(vias, from, to, tag, call_id, seq, max_forwards, extra)| {
            let mut headers: Vec<rsip::Header> = vias
                .into_iter()
                .map(|(host, port, branch)| {
                    let sent_by = rsip::HostWithPort { host, port: port.map(Into::into) };
                    rsip::Header::Via(rsip::headers::Via::new(format!("SIP/2.0/UDP {sent_by};branch=z9hG4bK{branch}")))
                })
                .collect();
            headers.push(rsip::Header::From(rsip::headers::From::new(format!("<{from}>;tag={tag}"))));
            headers.push(rsip::Header::To(rsip::headers::To::new(format!("<{to}>"))));
            headers.push(rsip::Header::CallId(rsip::headers::CallId::new(call_id)));
            headers.push(rsip::Header::CSeq(rsip::headers::CSeq::new(format!("{seq} {method}"))));
            headers.push(rsip::Header::MaxForwards(rsip::headers::MaxForwards::new(max_forwards.to_string())));
            headers.extend(extra);
            headers
        },
    )
}

fn with_body(mut headers: Vec<rsip::Header>, body: &str) -> rsip::Headers {
    headers.push(rsip::Header::ContentLength(rsip::headers::ContentLength::new(body.len().to_string())));
    headers.into()
}

fn method() -> impl Strategy<Value = rsip::Method> {
    proptest::sample::select(rsip::Method::all())
}

fn request() -> impl Strategy<Value = rsip::SipMessage> {
    method().prop_flat_map(|method| {
        (uri(), common_headers(method), "\\PC{0,40}").prop_map(move |(uri, headers, body)| {
            rsip::SipMessage::Request(rsip::Request {
                method,
                uri,
                version: rsip::Version::V2,
                headers: with_body(headers, &body),
                body: body.into_bytes(),
            })
        })
    })
}

fn response() -> impl Strategy<Value = rsip::SipMessage> {
    (method(), 100u16..700).prop_flat_map(|(method, code)| {
        (common_headers(method), "\\PC{0,40}").prop_map(move |(headers, body)| {
            rsip::SipMessage::Response(rsip::Response {
                status_code: code.into(),
                version: rsip::Version::V2,
                headers: with_body(headers, &body),
                body: body.into_bytes(),
            })
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parse_print_is_identity(message in prop_oneof![request(), response()]) {
        let printed = message.to_string();
        let limits = Limits::default();
        let parsed = parse_datagram(printed.as_bytes(), &limits);
        prop_assert_eq!(parsed, Ok(Parsed::Sip(message.clone())), "printed:\n{}", printed);

        // The stream path frames and parses the same bytes to the same message.
        let mut stream = printed.clone().into_bytes();
        stream.extend_from_slice(b"\r\n\r\nINVITE");
        let StreamFrame::Complete { len } = frame_stream(&stream, &limits) else {
            return Err(TestCaseError::fail("stream framing failed"));
        };
        prop_assert_eq!(len, printed.len());
        prop_assert_eq!(parse_stream_message(&stream[..len], &limits), Ok(Parsed::Sip(message)));
    }

    /// However the bytes arrive, a framer that keeps its place cuts the same messages as one
    /// that sees them whole.
    #[test]
    fn trickled_bytes_are_cut_where_whole_ones_are(
        messages in proptest::collection::vec(prop_oneof![request(), response()], 1..4),
        cuts in proptest::collection::vec(1usize..40, 1..200),
    ) {
        let limits = Limits::default();
        let stream: Vec<u8> = messages.iter().flat_map(|m| m.to_string().into_bytes()).collect();
        let mut framer = StreamFramer::default();
        let (mut buf, mut fed, mut lens) = (Vec::new(), 0, Vec::new());
        let mut cut = cuts.iter().cycle();
        while fed < stream.len() || !buf.is_empty() {
            let take = (*cut.next().unwrap_or(&1)).min(stream.len() - fed);
            buf.extend_from_slice(&stream[fed..fed + take]);
            fed += take;
            match framer.frame(&buf, &limits) {
                StreamFrame::Complete { len } => {
                    lens.push(len);
                    buf.drain(..len);
                }
                StreamFrame::Incomplete if take == 0 => break,
                StreamFrame::Incomplete => {}
                other => return Err(TestCaseError::fail(format!("{other:?}"))),
            }
        }
        let whole: Vec<usize> = messages.iter().map(|m| m.to_string().len()).collect();
        prop_assert_eq!(lens, whole);
    }
}

/// A header trickled one byte per read is searched once, not once per byte: framing time is
/// linear in the message's length (a slow sender cannot make us do quadratic work).
#[test]
fn a_message_trickled_a_byte_at_a_time_is_scanned_in_linear_time() {
    let limits = Limits::default();
    let mut message = b"OPTIONS sip:a@example.com SIP/2.0\r\n".to_vec();
    while message.len() < 60_000 {
        message.extend_from_slice(format!("X-Pad: {}\r\n", "a".repeat(1_000)).as_bytes());
    }
    message.extend_from_slice(b"Content-Length: 0\r\n\r\n");
    let mut framer = StreamFramer::default();
    let mut buf = Vec::new();
    let mut answer = StreamFrame::Incomplete;
    for byte in &message {
        buf.push(*byte);
        answer = framer.frame(&buf, &limits);
    }
    assert_eq!(answer, StreamFrame::Complete { len: message.len() });
    let n = message.len() as u64;
    // Each byte is looked at about once (plus three of overlap per read).
    assert!(framer.examined() <= 4 * n + 8, "examined {} bytes for a {n}-byte message", framer.examined());
}
