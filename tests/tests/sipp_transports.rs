//! SIP over TCP and TLS against the real `patchbay` binary.
//!
//! TCP is driven by sipp (`-t t1`: one connection). The Debian sipp 3.6.1 build has no TLS
//! support (`sipp -v` shows no `-TLS`), so TLS is driven by a small rustls client here, with a
//! self-signed certificate generated at test time (rcgen). Framing errors, keep-alives and the
//! idle timeout are checked with plain sockets.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use patchbay_e2e::{Patchbay, free_port, launch, run_sipp, scenario};

/// A running Patchbay with UDP and TCP on `port` and TLS on `tls_port`.
struct Tls {
    _pb: Patchbay,
    port: u16,
    tls_port: u16,
    /// The self-signed certificate the TLS listener presents (DER).
    cert: Vec<u8>,
}

fn start_patchbay(idle_timeout_secs: u64) -> Tls {
    let dir = tempfile::tempdir().expect("tempdir");
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("self-signed certificate");
    std::fs::write(dir.path().join("cert.pem"), cert.pem()).expect("write cert");
    std::fs::write(dir.path().join("key.pem"), key_pair.serialize_pem()).expect("write key");
    let (port, tls_port) = (free_port(), free_port());
    let config = format!(
        "[sip]\nlisten = [\"udp:127.0.0.1:{port}\", \"tcp:127.0.0.1:{port}\", \"tls:127.0.0.1:{tls_port}\"]\n\
         tcp_idle_timeout_secs = {idle_timeout_secs}\n\
         [sip.tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\
         [[tenant]]\nid = \"test\"\ndomains = [\"127.0.0.1\", \"localhost\"]\n\
         [[tenant.flow]]\nname = \"echo\"\nstock = \"echo\"\n"
    );
    Tls { _pb: launch(dir, port, &config), port, tls_port, cert: cert.der().to_vec() }
}

/// Runs one sipp call over TCP (`-t t1`) against `pb`; returns whether sipp reported success.
fn sipp_tcp(pb: &Tls, service: &str, scenario_args: &[&str], extra: &[&str]) -> (bool, String) {
    let mut args = vec!["-t", "t1"];
    args.extend_from_slice(extra);
    run_sipp(pb.port, service, scenario_args, 1, &args)
}

/// Reads SIP messages off a stream, framed by Content-Length.
struct SipReader<S> {
    stream: S,
    buf: Vec<u8>,
}

impl<S: Read + Write> SipReader<S> {
    fn new(stream: S) -> Self {
        Self { stream, buf: Vec::new() }
    }

    fn send(&mut self, message: &str) {
        self.stream.write_all(message.as_bytes()).expect("send");
        self.stream.flush().expect("flush");
    }

    /// The next whole message (header section and body).
    fn recv(&mut self) -> String {
        loop {
            if let Some(head_end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
                let body_len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length:").or_else(|| l.strip_prefix("l:")))
                    .map_or(0, |v| v.trim().parse::<usize>().expect("Content-Length"));
                let total = head_end + 4 + body_len;
                if self.buf.len() >= total {
                    let message = String::from_utf8_lossy(&self.buf[..total]).into_owned();
                    self.buf.drain(..total);
                    return message;
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).expect("read");
            assert!(n > 0, "connection closed; unparsed: {:?}", String::from_utf8_lossy(&self.buf));
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next final response (≥ 200) whose CSeq method is `method`; skips the others.
    fn final_response(&mut self, method: &str) -> String {
        loop {
            let message = self.recv();
            let status: u16 = message.get(8..11).and_then(|s| s.parse().ok()).unwrap_or(0);
            let cseq = message.lines().find_map(|l| l.strip_prefix("CSeq:")).unwrap_or_default();
            if message.starts_with("SIP/2.0 ") && status >= 200 && cseq.trim().ends_with(method) {
                return message;
            }
        }
    }
}

fn options(transport: &str, local: &str, port: u16, call_id: &str) -> String {
    format!(
        "OPTIONS sip:echo@127.0.0.1:{port} SIP/2.0\r\n\
         Via: SIP/2.0/{transport} {local};branch=z9hG4bK{call_id};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:probe@127.0.0.1>;tag=p1\r\n\
         To: <sip:echo@127.0.0.1:{port}>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 OPTIONS\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

#[test]
fn call_over_tcp_answered_and_released_by_the_caller() {
    let pb = start_patchbay(120);
    let (ok, log) = sipp_tcp(&pb, "echo", &["-sn", "uac"], &["-d", "500"]);
    assert!(ok, "{log}");
}

#[test]
fn options_over_tcp_gets_200() {
    let pb = start_patchbay(120);
    let xml = scenario("options.xml");
    let (ok, log) = sipp_tcp(&pb, "echo", &["-sf", &xml], &[]);
    assert!(ok, "{log}");
}

fn tls_client(pb: &Tls) -> SipReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(pb.cert.clone())).expect("trust the test certificate");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
    let connection = rustls::ClientConnection::new(Arc::new(config), name).expect("TLS client");
    let tcp = TcpStream::connect(("127.0.0.1", pb.tls_port)).expect("connect to the TLS listener");
    tcp.set_read_timeout(Some(Duration::from_secs(20))).expect("read timeout");
    SipReader::new(rustls::StreamOwned::new(connection, tcp))
}

#[test]
fn options_and_a_call_over_tls() {
    let pb = start_patchbay(120);
    let mut tls = tls_client(&pb);
    let local = "127.0.0.1:5999";
    tls.send(&options("TLS", local, pb.tls_port, "tls-options"));
    let response = tls.final_response("OPTIONS");
    assert!(response.starts_with("SIP/2.0 200"), "{response}");

    // INVITE → 200 (answered by the echo flow) → ACK → BYE → 200, all on one TLS connection.
    let port = pb.tls_port;
    let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
               m=audio 40000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n";
    let common = |method: &str, cseq: u32, branch: &str, to: &str| {
        format!(
            "{method} sip:echo@127.0.0.1:{port} SIP/2.0\r\n\
             Via: SIP/2.0/TLS {local};branch=z9hG4bK{branch};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:caller@127.0.0.1>;tag=c1\r\n\
             To: {to}\r\n\
             Call-ID: tls-call\r\n\
             CSeq: {cseq} {method}\r\n\
             Contact: <sip:caller@{local};transport=tls>\r\n"
        )
    };
    let to = format!("<sip:echo@127.0.0.1:{port}>");
    tls.send(&format!(
        "{}Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        common("INVITE", 1, "inv", &to),
        sdp.len()
    ));
    let ok = tls.final_response("INVITE");
    assert!(ok.starts_with("SIP/2.0 200"), "{ok}");
    let to = ok.lines().find_map(|l| l.strip_prefix("To:")).expect("To in 200").trim().to_owned();
    assert!(to.contains("tag="), "{ok}");
    tls.send(&format!("{}Content-Length: 0\r\n\r\n", common("ACK", 1, "ack", &to)));
    std::thread::sleep(Duration::from_millis(300));
    tls.send(&format!("{}Content-Length: 0\r\n\r\n", common("BYE", 2, "bye", &to)));
    let bye = tls.final_response("BYE");
    assert!(bye.starts_with("SIP/2.0 200"), "{bye}");
}

#[test]
fn an_unframeable_tcp_stream_gets_400_and_is_closed_while_other_connections_go_on() {
    let pb = start_patchbay(120);
    let mut bad = TcpStream::connect(("127.0.0.1", pb.port)).expect("connect");
    bad.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    // Content-Length is mandatory on a stream (RFC 3261 §18.3).
    let garbage = options("TCP", "127.0.0.1:5998", pb.port, "no-length").replace("Content-Length: 0\r\n", "");
    bad.write_all(garbage.as_bytes()).expect("send");
    let mut answer = Vec::new();
    bad.read_to_end(&mut answer).expect("the connection is closed after the answer");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("SIP/2.0 400"), "{answer:?}");

    let good = TcpStream::connect(("127.0.0.1", pb.port)).expect("connect");
    good.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    let mut good = SipReader::new(good);
    // A CRLFCRLF ping gets a CRLF pong (RFC 5626 §3.5.1).
    good.send("\r\n\r\n");
    let mut pong = [0u8; 2];
    good.stream.read_exact(&mut pong).expect("pong");
    assert_eq!(&pong, b"\r\n");
    good.send(&options("TCP", "127.0.0.1:5997", pb.port, "good"));
    let response = good.final_response("OPTIONS");
    assert!(response.starts_with("SIP/2.0 200"), "{response}");
    // The connection is reused: a second request on it is answered too.
    good.send(&options("TCP", "127.0.0.1:5997", pb.port, "good-again"));
    let response = good.final_response("OPTIONS");
    assert!(response.starts_with("SIP/2.0 200"), "{response}");
}

#[test]
fn an_idle_tcp_connection_is_closed_after_the_idle_timeout() {
    let pb = start_patchbay(1);
    let mut idle = TcpStream::connect(("127.0.0.1", pb.port)).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    let opened = Instant::now();
    let mut byte = [0u8; 1];
    let n = idle.read(&mut byte).expect("closed, not timed out");
    assert_eq!(n, 0, "the server closes the connection");
    let waited = opened.elapsed();
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(5), "{waited:?}");
}
