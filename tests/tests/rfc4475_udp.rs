//! Every RFC 4475 torture message, sent over UDP to the running binary: after each one Patchbay
//! must still answer an OPTIONS ping. Malformed requests must be answered (400/505/416…) or
//! dropped, never crash or wedge the endpoint.

use std::net::UdpSocket;
use std::path::Path;
use std::time::Duration;

use patchbay_e2e::start_patchbay;

fn options(port: u16, n: usize) -> Vec<u8> {
    format!(
        "OPTIONS sip:echo@127.0.0.1:{port} SIP/2.0\r\n\
         Via: SIP/2.0/UDP 127.0.0.1:{{local}};branch=z9hG4bK-ping-{n};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:probe@127.0.0.1>;tag=probe{n}\r\n\
         To: <sip:echo@127.0.0.1>\r\n\
         Call-ID: ping-{n}@127.0.0.1\r\n\
         CSeq: {n} OPTIONS\r\n\
         Content-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

#[test]
fn every_torture_message_leaves_the_endpoint_answering() {
    let pb = start_patchbay();
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    let local = socket.local_addr().expect("addr").port();
    let target = format!("127.0.0.1:{}", pb.port);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtime/sip/tests/rfc4475");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("RFC 4475 test data")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "dat"))
        .collect();
    files.sort();
    assert!(files.len() >= 40, "expected the RFC 4475 messages in {}", dir.display());
    let mut buf = [0u8; 65_536];
    for (n, file) in files.iter().enumerate() {
        let message = std::fs::read(file).expect("read message");
        socket.send_to(&message, &target).expect("send torture message");
        // Drain whatever it answered (a 400, a 404 for a call to nobody, …).
        while socket.recv_from(&mut buf).is_ok() {}
        let ping = String::from_utf8(options(pb.port, n)).expect("utf-8").replace("{local}", &local.to_string());
        let mut answered = false;
        for _attempt in 0..5 {
            socket.send_to(ping.as_bytes(), &target).expect("send OPTIONS");
            while let Ok((len, _)) = socket.recv_from(&mut buf) {
                let reply = String::from_utf8_lossy(&buf[..len]);
                if reply.starts_with("SIP/2.0 200") && reply.contains(&format!("ping-{n}@127.0.0.1")) {
                    answered = true;
                }
            }
            if answered {
                break;
            }
        }
        assert!(answered, "no 200 to OPTIONS after {}", file.display());
    }
}

/// RFC 4475 §3.1.1: the valid messages (however tortured) that are requests each get a
/// response — a domain or user we do not serve is answered (404), a method we do not take is
/// answered (405/501) — never silence. The responses go where each message's Via says (a port
/// nobody listens on), so they are read off the wire.
#[test]
fn every_valid_torture_request_gets_a_response() {
    const VALID_REQUESTS: [&str; 11] = [
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
    ];
    let pb = start_patchbay();
    let capture = patchbay_e2e::Capture::start(&format!("udp src port {}", pb.port));
    // tshark says it is capturing a moment before its filter takes the first packet (CI lost
    // the first message's answer): give it that moment.
    std::thread::sleep(Duration::from_secs(1));
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtime/sip/tests/rfc4475");
    let call_id = |text: &str| -> Option<String> {
        text.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            let name = name.trim();
            (name.eq_ignore_ascii_case("Call-ID") || name.eq_ignore_ascii_case("i")).then(|| value.trim().to_owned())
        })
    };
    let mut expected = Vec::new();
    for name in VALID_REQUESTS {
        let message = std::fs::read(dir.join(format!("{name}.dat"))).expect("read message");
        let id = call_id(&String::from_utf8_lossy(&message)).expect("a Call-ID");
        socket.send_to(&message, ("127.0.0.1", pb.port)).expect("send");
        // Sent again, as a client retransmits: a lost answer is not a missing one.
        std::thread::sleep(Duration::from_millis(20));
        socket.send_to(&message, ("127.0.0.1", pb.port)).expect("send");
        expected.push((name, id));
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let responses: Vec<String> =
        capture.finish().into_iter().map(|d| String::from_utf8_lossy(&d.payload).into_owned()).collect();
    for (name, id) in expected {
        let answered =
            responses.iter().any(|r| r.starts_with("SIP/2.0 ") && call_id(r).as_deref() == Some(id.as_str()));
        assert!(answered, "no response to {name}.dat (Call-ID {id}); responses seen:\n{}", responses.join("\n---\n"));
    }
}
