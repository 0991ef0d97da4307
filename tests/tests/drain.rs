//! Graceful drain (docs/operations.md): on SIGTERM Patchbay takes no new calls — a new INVITE
//! gets 503 with Retry-After, an OPTIONS probe (a load balancer's, as Kamailio's dispatcher
//! sends) gets 503 — while the calls up go on to their natural end; then it exits 0, every call
//! with its record.

use std::net::UdpSocket;
use std::time::Duration;

use patchbay_e2e::{free_port, http, run_sipp, start_patchbay_with};

fn options_status(port: u16) -> Option<u16> {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    let local = socket.local_addr().expect("addr");
    let options = format!(
        "OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bKprobe{p};rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:probe@{local}>;tag=p{p}\r\nTo: <sip:127.0.0.1:{port}>\r\n\
         Call-ID: probe{p}@127.0.0.1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
        p = local.port()
    );
    socket.send_to(options.as_bytes(), ("127.0.0.1", port)).expect("send");
    let mut buf = [0u8; 4096];
    let (n, _) = socket.recv_from(&mut buf).ok()?;
    String::from_utf8_lossy(&buf[..n]).get(8..11)?.parse().ok()
}

#[test]
fn sigterm_drains_calls_up_finish_new_ones_get_503_and_the_exit_is_clean() {
    let api = free_port();
    let extra = format!("[api]\nlisten = \"127.0.0.1:{api}\"\nadmin_token = \"drain-test-admin\"\n");
    let mut pb = start_patchbay_with(&extra, "[[tenant.flow]]\nname = \"echo\"\nstock = \"echo\"\n");
    let port = pb.port;
    assert_eq!(options_status(port), Some(200), "ready before the drain");
    assert_eq!(http("GET", api, "/healthz", "", None).0, 200);
    assert_eq!(http("GET", api, "/readyz", "", None).0, 200);
    // A call up for 6 s (sipp hangs up after its pause).
    let long_call = std::thread::spawn(move || run_sipp(port, "echo", &["-sn", "uac"], 1, &["-d", "6000"]));
    std::thread::sleep(Duration::from_millis(1_500));
    pb.terminate();
    std::thread::sleep(Duration::from_millis(500));
    // Not ready any more, for probes and for new calls.
    assert_eq!(options_status(port), Some(503), "OPTIONS while draining");
    assert_eq!(http("GET", api, "/readyz", "", None).0, 503, "/readyz while draining");
    assert_eq!(http("GET", api, "/healthz", "", None).0, 200, "still up");
    let (ok, log) = run_sipp(port, "echo", &["-sn", "uac"], 1, &[]);
    assert!(!ok && log.contains("503"), "a new call while draining must get 503:\n{log}");
    assert!(pb.wait_exit(Duration::from_millis(100)).is_none(), "exited with a call up");
    // The call up finishes as its caller decides, and then the process exits cleanly.
    let (ok, log) = long_call.join().expect("the long call");
    assert!(ok, "the call up when the drain began must complete:\n{log}");
    let status = pb.wait_exit(Duration::from_secs(10)).expect("exits once the last call ended");
    assert!(status.success(), "{status:?}");
    let cdrs = pb.cdrs();
    let mut causes: Vec<&str> = cdrs.iter().filter_map(|c| c["end_cause"].as_str()).collect();
    causes.sort_unstable();
    // One record per call: the call up, ended by its caller, and the one refused.
    assert_eq!(causes, ["caller-hangup", "draining"], "{cdrs:#?}");
}
