//! RFC 4475 torture tests: every message of §3.1.1, §3.1.2, §3.2, §3.3 and §3.4 against what
//! the RFC expects of the message layer. Files are in `tests/rfc4475/` (see its README).

use patchbay_sip::message::{
    Disposition, Limits, Parsed, StreamFrame, frame_stream, parse_datagram, parse_stream_message,
};
use rsip::prelude::*;

fn load(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/rfc4475/{name}.dat", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn parse(name: &str) -> Result<Parsed, patchbay_sip::message::ParseError> {
    parse_datagram(&load(name), &Limits::default())
}

fn expect_ok(name: &str) -> Parsed {
    match parse(name) {
        Ok(parsed) => parsed,
        Err(e) => panic!("{name}: expected to parse, got {e} ({:?})", e.disposition()),
    }
}

fn expect_status(name: &str, allowed: &[u16]) {
    match parse(name) {
        Ok(parsed) => panic!("{name}: expected rejection, parsed {parsed:?}"),
        Err(e) => match e.disposition() {
            Disposition::Respond { status, reason } => {
                assert!(allowed.contains(&status), "{name}: got {status} {reason}, expected one of {allowed:?}");
                let mut out = Vec::new();
                assert!(e.write_response(Some("x1"), &mut out));
                // The response we send must itself be a message we would accept, except where it
                // has to echo the very header field that made the request malformed (or lacks
                // the fields the request lacked).
                let response = parse_datagram(&out, &Limits::default());
                let echoes_defect = ECHOES_DEFECT.contains(&name);
                assert!(
                    matches!(response, Ok(Parsed::Sip(rsip::SipMessage::Response(_)))) != echoes_defect,
                    "{name}: our own response does not parse: {}\n{response:?}",
                    String::from_utf8_lossy(&out)
                );
            }
            Disposition::Drop => panic!("{name}: expected a {allowed:?} response, got Drop ({e})"),
        },
    }
}

const ECHOES_DEFECT: &[&str] = &["insuf", "badvers", "badinv01", "quotbal", "badaspec", "baddn", "scalar02"];

fn expect_drop(name: &str) {
    match parse(name) {
        Ok(parsed) => panic!("{name}: expected drop, parsed {parsed:?}"),
        Err(e) => assert_eq!(e.disposition(), Disposition::Drop, "{name}: {e}"),
    }
}

fn request(parsed: Parsed) -> rsip::Request {
    match parsed {
        Parsed::Sip(rsip::SipMessage::Request(request)) => request,
        other => panic!("expected an rsip request, got {other:?}"),
    }
}

// §3.1.1 Valid messages: all must parse.

#[test]
fn wsinv() {
    let req = request(expect_ok("wsinv"));
    assert_eq!(req.method, rsip::Method::Invite);
    assert_eq!(req.via_header().unwrap().typed().unwrap().uri.host_with_port.to_string(), "192.0.2.2");
    let vias: Vec<_> = req.headers.iter().filter(|h| matches!(h, rsip::Header::Via(_))).collect();
    // One Via plus the two comma-joined in the compact `v:` field.
    assert_eq!(vias.len(), 3);
    assert_eq!(req.cseq_header().unwrap().typed().unwrap().seq, 9);
    assert_eq!(req.call_id_header().unwrap().value(), "wsinv.ndaksdj@192.0.2.1");
    assert_eq!(req.body.len(), 150);
    assert!(req.headers.iter().any(|h| matches!(h, rsip::Header::Contact(_))));
    assert!(req.headers.iter().any(|h| matches!(h, rsip::Header::Subject(_))));
}

#[test]
fn intmeth() {
    match expect_ok("intmeth") {
        Parsed::ExtensionRequest(req) => {
            assert_eq!(req.method, "!interesting-Method0123456789_*+`.%indeed'~");
            let mut out = Vec::new();
            req.write_response(501, "Not Implemented", Some("t1"), &mut out);
            let answer = parse_datagram(&out, &Limits::default()).unwrap();
            assert!(matches!(answer, Parsed::Sip(rsip::SipMessage::Response(r)) if r.status_code.code() == 501));
        }
        other => panic!("expected an extension request, got {other:?}"),
    }
}

#[test]
fn esc01() {
    let req = request(expect_ok("esc01"));
    assert_eq!(req.uri.to_string(), "sip:sips%3Auser%40example.com@example.net");
    assert!(req.headers.iter().any(|h| matches!(h, rsip::Header::ContentType(_))));
}

#[test]
fn escnull() {
    let req = request(expect_ok("escnull"));
    assert_eq!(req.headers.iter().filter(|h| matches!(h, rsip::Header::Contact(_))).count(), 2);
}

#[test]
fn esc02() {
    // RE%47IST%45R is an extension method, not REGISTER (RFC 4475 §3.1.1.5).
    match expect_ok("esc02") {
        Parsed::ExtensionRequest(req) => {
            assert_eq!(req.method, "RE%47IST%45R");
            assert!(req.headers.iter().any(|h| matches!(h, rsip::Header::Other(n, _) if n == "C%6Fntact")));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn lwsdisp() {
    request(expect_ok("lwsdisp"));
}

#[test]
fn longreq() {
    let req = request(expect_ok("longreq"));
    assert_eq!(req.headers.iter().filter(|h| matches!(h, rsip::Header::Via(_))).count(), 34);
    assert_eq!(req.body.len(), 150);
}

#[test]
fn dblreq() {
    // Only the REGISTER counts; the INVITE after its Content-Length is discarded (§18.3).
    let req = request(expect_ok("dblreq"));
    assert_eq!(req.method, rsip::Method::Register);
    assert!(req.body.is_empty());
}

#[test]
fn semiuri() {
    let req = request(expect_ok("semiuri"));
    assert_eq!(req.uri.user(), Some("user;par=u%40example.net"));
    assert_eq!(req.uri.host().to_string(), "example.com");
}

#[test]
fn transports() {
    let req = request(expect_ok("transports"));
    assert_eq!(req.headers.iter().filter(|h| matches!(h, rsip::Header::Via(_))).count(), 5);
}

#[test]
fn mpart01() {
    let req = request(expect_ok("mpart01"));
    assert_eq!(req.method, rsip::Method::Message);
    assert_eq!(req.body.len(), 553);
}

#[test]
fn unreason() {
    match expect_ok("unreason") {
        Parsed::Sip(rsip::SipMessage::Response(r)) => assert_eq!(r.status_code.code(), 200),
        other => panic!("{other:?}"),
    }
}

#[test]
fn noreason() {
    match expect_ok("noreason") {
        Parsed::Sip(rsip::SipMessage::Response(r)) => assert_eq!(r.status_code.code(), 100),
        other => panic!("{other:?}"),
    }
}

// §3.1.2 Invalid messages.

#[test]
fn badinv01() {
    expect_status("badinv01", &[400]);
}

#[test]
fn clerr() {
    expect_status("clerr", &[400]);
}

#[test]
fn ncl() {
    expect_status("ncl", &[400]);
}

#[test]
fn scalar02() {
    expect_status("scalar02", &[400]);
}

#[test]
fn scalarlg() {
    // A response: the element drops it (RFC 4475 §3.1.2.5).
    expect_drop("scalarlg");
}

#[test]
fn quotbal() {
    expect_status("quotbal", &[400]);
}

#[test]
fn ltgtruri() {
    expect_status("ltgtruri", &[400]);
}

#[test]
fn lwsruri() {
    expect_status("lwsruri", &[400]);
}

#[test]
fn lwsstart() {
    expect_status("lwsstart", &[400]);
}

#[test]
fn trws() {
    expect_status("trws", &[400]);
}

#[test]
fn escruri() {
    expect_status("escruri", &[400]);
}

#[test]
fn baddate() {
    expect_status("baddate", &[400]);
}

#[test]
fn regbadct() {
    expect_status("regbadct", &[400]);
}

#[test]
fn badaspec() {
    expect_status("badaspec", &[400]);
}

#[test]
fn baddn() {
    expect_status("baddn", &[400]);
}

#[test]
fn badvers() {
    expect_status("badvers", &[505]);
}

#[test]
fn mismatch01() {
    let err = parse("mismatch01").unwrap_err();
    assert_eq!(
        err.disposition(),
        Disposition::Respond { status: 400, reason: "Bad Request - CSeq method does not match" }
    );
}

#[test]
fn mismatch02() {
    // RFC 4475 §3.1.2.18 prefers 501 but accepts 400; the method check comes first here.
    expect_status("mismatch02", &[400, 501]);
}

#[test]
fn bigcode() {
    expect_drop("bigcode");
}

// §3.2 Transaction-layer semantics: syntactically valid.

#[test]
fn badbranch() {
    request(expect_ok("badbranch"));
}

// §3.3 Application-layer semantics.

#[test]
fn insuf() {
    expect_status("insuf", &[400]);
}

#[test]
fn unkscm() {
    expect_status("unkscm", &[416]);
}

#[test]
fn novelsc() {
    expect_status("novelsc", &[416]);
}

#[test]
fn unksm2() {
    // Syntactically valid (§3.3.4): a registrar rejects it later, the parser must not.
    request(expect_ok("unksm2"));
}

#[test]
fn application_layer_valid() {
    for name in ["bext01", "invut", "regaut01", "zeromf", "cparam01", "cparam02", "regescrt", "sdp01"] {
        request(expect_ok(name));
    }
    match expect_ok("bcast") {
        Parsed::Sip(rsip::SipMessage::Response(_)) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn multi01() {
    expect_status("multi01", &[400]);
}

#[test]
fn mcl01() {
    expect_status("mcl01", &[400]);
    // On a stream the framing is unknowable: the connection must be closed.
    assert!(matches!(frame_stream(&load("mcl01"), &Limits::default()), StreamFrame::Invalid(_)));
}

// §3.4 Backward compatibility.

#[test]
fn inv2543() {
    // No Max-Forwards, no branch, no Content-Length: accepted on a datagram (§3.4.1).
    let req = request(expect_ok("inv2543"));
    assert_eq!(req.method, rsip::Method::Invite);
    // On a stream Content-Length is mandatory.
    assert!(matches!(frame_stream(&load("inv2543"), &Limits::default()), StreamFrame::Invalid(_)));
}

const ALL: &[&str] = &[
    "wsinv",
    "intmeth",
    "esc01",
    "escnull",
    "esc02",
    "lwsdisp",
    "longreq",
    "dblreq",
    "semiuri",
    "transports",
    "mpart01",
    "unreason",
    "noreason",
    "badinv01",
    "clerr",
    "ncl",
    "scalar02",
    "scalarlg",
    "quotbal",
    "ltgtruri",
    "lwsruri",
    "lwsstart",
    "trws",
    "escruri",
    "baddate",
    "regbadct",
    "badaspec",
    "baddn",
    "badvers",
    "mismatch01",
    "mismatch02",
    "bigcode",
    "badbranch",
    "insuf",
    "unkscm",
    "novelsc",
    "unksm2",
    "bext01",
    "invut",
    "regaut01",
    "multi01",
    "mcl01",
    "bcast",
    "zeromf",
    "cparam01",
    "cparam02",
    "regescrt",
    "sdp01",
    "inv2543",
];

#[test]
fn every_file_is_listed() {
    let dir = format!("{}/tests/rfc4475", env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok()?.strip_suffix(".dat").map(str::to_owned))
        .collect();
    files.sort();
    let mut listed: Vec<String> = ALL.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(files, listed);
}

/// Nothing panics on any prefix of any file, parsed as a datagram or framed as a stream, and
/// framing agrees with parsing on the whole valid stream messages.
#[test]
fn no_panic_on_any_prefix() {
    let limits = Limits::default();
    for name in ALL {
        let data = load(name);
        for end in 0..=data.len() {
            let prefix = &data[..end];
            let _ = parse_datagram(prefix, &limits);
            if let StreamFrame::Complete { len } = frame_stream(prefix, &limits) {
                assert!(len <= prefix.len());
                let _ = parse_stream_message(&prefix[..len], &limits);
            }
        }
        // Suffixes too: a stream that lost sync starts mid-message.
        for start in 0..data.len() {
            let _ = parse_datagram(&data[start..], &limits);
            let _ = frame_stream(&data[start..], &limits);
        }
    }
}
