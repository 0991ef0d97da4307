//! Datagram and stream framing (RFC 3261 §18.3, RFC 5626 §3.5.1) and error responses.

use patchbay_sip::message::{
    Disposition, Limits, ParseErrorKind, Parsed, StreamFrame, frame_stream, parse_datagram, parse_stream_message,
};

const OPTIONS: &str = "OPTIONS sip:bob@example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bK1,SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK2\r\n\
f: <sip:alice@example.com>;tag=1\r\n\
t: <sip:bob@example.com>\r\n\
i: abc@host\r\n\
CSeq: 1 OPTIONS\r\n\
Max-Forwards: 70\r\n\
l: 4\r\n\
\r\n\
body";

#[test]
fn keepalives() {
    let limits = Limits::default();
    assert_eq!(parse_datagram(b"\r\n\r\n", &limits), Ok(Parsed::KeepAlive));
    assert_eq!(parse_datagram(b"", &limits), Ok(Parsed::KeepAlive));
    assert_eq!(frame_stream(b"\r\n\r\nOPTIONS", &limits), StreamFrame::KeepAlive { len: 4 });
    assert_eq!(frame_stream(b"\r\nOPTIONS", &limits), StreamFrame::KeepAlive { len: 2 });
    assert_eq!(frame_stream(b"\r\n", &limits), StreamFrame::Incomplete);
    assert_eq!(frame_stream(b"\r\n\r", &limits), StreamFrame::Incomplete);
}

#[test]
fn leading_crlf_then_message() {
    let mut datagram = b"\r\n\r\n".to_vec();
    datagram.extend_from_slice(OPTIONS.as_bytes());
    let Ok(Parsed::Sip(rsip::SipMessage::Request(req))) = parse_datagram(&datagram, &Limits::default()) else {
        panic!("did not parse");
    };
    // Comma-joined Vias split into one field each; compact names expanded.
    assert_eq!(req.headers.iter().filter(|h| matches!(h, rsip::Header::Via(_))).count(), 2);
    assert!(req.headers.iter().any(|h| matches!(h, rsip::Header::CallId(_))));
    assert_eq!(req.body, b"body");
}

#[test]
fn datagram_truncates_to_content_length() {
    let datagram = format!("{OPTIONS}trailing junk");
    let Ok(Parsed::Sip(msg)) = parse_datagram(datagram.as_bytes(), &Limits::default()) else { panic!() };
    assert_eq!(msg.body(), b"body");
}

#[test]
fn stream_framing() {
    let limits = Limits::default();
    let bytes = OPTIONS.as_bytes();
    for cut in 0..bytes.len() {
        assert_eq!(frame_stream(&bytes[..cut], &limits), StreamFrame::Incomplete, "cut at {cut}");
    }
    let mut two = bytes.to_vec();
    two.extend_from_slice(bytes);
    assert_eq!(frame_stream(&two, &limits), StreamFrame::Complete { len: bytes.len() });
    assert!(matches!(parse_stream_message(bytes, &limits), Ok(Parsed::Sip(_))));
}

#[test]
fn stream_requires_content_length() {
    let no_cl = OPTIONS.replace("l: 4\r\n", "").replace("body", "");
    let StreamFrame::Invalid(err) = frame_stream(no_cl.as_bytes(), &Limits::default()) else { panic!() };
    assert_eq!(err.kind, ParseErrorKind::MissingContentLength);
    assert!(matches!(err.disposition(), Disposition::Respond { status: 400, .. }));
}

#[test]
fn too_large() {
    let limits = Limits { max_message_bytes: 64, ..Limits::default() };
    let err = parse_datagram(OPTIONS.as_bytes(), &limits).unwrap_err();
    assert_eq!(err.kind, ParseErrorKind::TooLarge);
    let StreamFrame::Invalid(err) = frame_stream(OPTIONS.as_bytes(), &limits) else { panic!() };
    assert_eq!(err.kind, ParseErrorKind::TooLarge);
}

#[test]
fn too_many_headers() {
    let limits = Limits { max_headers: 3, ..Limits::default() };
    let err = parse_datagram(OPTIONS.as_bytes(), &limits).unwrap_err();
    assert_eq!(err.kind, ParseErrorKind::TooManyHeaders);
}

#[test]
fn error_response_copies_headers_and_adds_tag() {
    let bad = OPTIONS.replace("CSeq: 1 OPTIONS", "CSeq: 1 INVITE");
    let err = parse_datagram(bad.as_bytes(), &Limits::default()).unwrap_err();
    let mut out = Vec::new();
    assert!(err.write_response(Some("srv1"), &mut out));
    let text = String::from_utf8(out).unwrap();
    assert_eq!(
        text,
        "SIP/2.0 400 Bad Request - CSeq method does not match\r\n\
Via: SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bK1,SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK2\r\n\
From: <sip:alice@example.com>;tag=1\r\n\
To: <sip:bob@example.com>;tag=srv1\r\n\
Call-ID: abc@host\r\n\
CSeq: 1 INVITE\r\n\
Content-Length: 0\r\n\r\n"
    );
}

#[test]
fn ipv6_request_uri() {
    let msg = OPTIONS.replace("sip:bob@example.com SIP", "sip:bob@[2001:db8::7]:5070;transport=tcp SIP");
    let Ok(Parsed::Sip(rsip::SipMessage::Request(req))) = parse_datagram(msg.as_bytes(), &Limits::default()) else {
        panic!()
    };
    assert_eq!(req.uri.to_string(), "sip:bob@[2001:db8::7]:5070;transport=tcp");
}

#[test]
fn responses_are_dropped_not_answered() {
    let response = "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nCSeq: x INVITE\r\n\r\n";
    let err = parse_datagram(response.as_bytes(), &Limits::default()).unwrap_err();
    assert_eq!(err.disposition(), Disposition::Drop);
    assert!(!err.write_response(None, &mut Vec::new()));
}

#[test]
fn lowercase_method_is_an_extension() {
    let msg = OPTIONS.replace("OPTIONS sip", "options sip").replace("1 OPTIONS", "1 options");
    assert!(matches!(parse_datagram(msg.as_bytes(), &Limits::default()), Ok(Parsed::ExtensionRequest(_))));
}

#[test]
fn core_crate_has_no_runtime_dependencies() {
    let manifest = include_str!("../Cargo.toml");
    assert!(!manifest.contains("tokio") && !manifest.contains("wasmtime"));
}
