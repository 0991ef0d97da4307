//! Carrier trunks end to end: the real binary registers with sipp playing a carrier, places
//! calls through it from `POST /v1/calls` (digest on REGISTER and INVITE, caller ID in From and
//! P-Asserted-Identity checked by the carrier), runs the flow on answer and sends its audio to the
//! carrier's media address — over UDP, TCP and TLS. Also: the calls-per-second cap, a wrong
//! password, and inbound DID calls from the trunk's address and from elsewhere.
//!
//! Debian's sipp has no TLS: over TLS the carrier is socat terminating TLS (with a certificate
//! from a test CA that Patchbay is told to trust) in front of sipp over TCP, as an SBC fronts a
//! carrier's SIP servers.

use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use patchbay_e2e::{free_port, http, launch, scenario};

const TOKEN: &str = "tenant-token";

/// sipp in `dir` with `args`, its output discarded (its logs go to `dir` with `-trace_*`).
fn sipp(dir: &std::path::Path, args: &[&str]) -> Command {
    let mut sipp = Command::new("sipp");
    sipp.current_dir(dir).args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    sipp
}

/// sipp running `carrier.xml`, and socat in front of it for TLS.
struct Carrier {
    sipp: Child,
    socat: Option<Child>,
    /// Where Patchbay reaches it.
    port: u16,
    dir: tempfile::TempDir,
}

impl Carrier {
    /// `calls`: the Call-IDs sipp waits for (the registration is one, each call another).
    fn start(transport: &str, rtp_port: u16) -> Self {
        Self::start_for(transport, rtp_port, 2, &[])
    }

    fn start_for(transport: &str, rtp_port: u16, calls: u32, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let sipp_port = free_port();
        let sipp_transport = if transport == "udp" { "u1" } else { "t1" };
        let mut sipp = Command::new("sipp");
        sipp.current_dir(dir.path())
            .args(["-sf", &scenario("carrier.xml"), "-i", "127.0.0.1", "-p", &sipp_port.to_string()])
            .args(["-t", sipp_transport, "-m", &calls.to_string(), "-set", "rtp_port", &rtp_port.to_string()])
            .args(["-timeout", "40", "-timeout_error", "-nostdin", "-trace_err", "-trace_msg"])
            .args(extra);
        if transport != "udp" {
            // A peer closing its connection after our last answer must not fail the call.
            sipp.args(["-reconnect_close", "false"]);
        }
        let sipp = sipp
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run sipp (Debian package sip-tester; `cargo xtask test` installs it)");
        let (socat, port) = if transport == "tls" {
            let port = free_port();
            write_test_pki(dir.path());
            let listen = format!(
                "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={0}/carrier.pem,key={0}/carrier.key,verify=0",
                dir.path().display()
            );
            let socat = Command::new("socat")
                .args([listen.as_str(), &format!("TCP:127.0.0.1:{sipp_port}")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("run socat (Debian package socat; `cargo xtask test` installs it)");
            (Some(socat), port)
        } else {
            (None, sipp_port)
        };
        // sipp and socat bind before reading anything; give them a moment.
        std::thread::sleep(Duration::from_millis(500));
        Self { sipp, socat, port, dir }
    }

    /// Waits for sipp to end (at most `timeout`); its verdict and its logs.
    fn finish(mut self, timeout: Duration) -> (bool, String) {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.sipp.try_wait().expect("sipp") {
                break Some(status);
            }
            if started.elapsed() > timeout {
                let _ = self.sipp.kill();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut log = String::new();
        if let Some(mut stderr) = self.sipp.stderr.take() {
            use std::io::Read;
            let _ = stderr.read_to_string(&mut log);
        }
        for entry in std::fs::read_dir(self.dir.path()).into_iter().flatten().flatten() {
            let name = entry.path().to_string_lossy().into_owned();
            if name.ends_with("_errors.log") || name.ends_with("_messages.log") {
                log.push_str(&format!("\n--- {name}\n"));
                log.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        (status.is_some_and(|s| s.success()), log)
    }
}

impl Drop for Carrier {
    fn drop(&mut self) {
        let _ = self.sipp.kill();
        let _ = self.sipp.wait();
        if let Some(socat) = &mut self.socat {
            let _ = socat.kill();
            let _ = socat.wait();
        }
    }
}

/// A test CA (`ca.pem`, for Patchbay) and the carrier's certificate signed by it for
/// `carrier.test` and 127.0.0.1 (`carrier.pem`, `carrier.key`, for socat).
fn write_test_pki(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.distinguished_name.push(DnType::CommonName, "Patchbay Test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let key = KeyPair::generate().expect("key");
    let mut leaf = CertificateParams::new(vec!["carrier.test".to_owned()]).expect("params");
    leaf.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
    leaf.distinguished_name.push(DnType::CommonName, "carrier.test");
    let leaf_cert = leaf.signed_by(&key, &ca_cert, &ca_key).expect("certificate");
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("write ca.pem");
    std::fs::write(dir.join("carrier.pem"), leaf_cert.pem()).expect("write carrier.pem");
    std::fs::write(dir.join("carrier.key"), key.serialize_pem()).expect("write carrier.key");
}

/// Patchbay with tenant `t` (token [`TOKEN`]) serving `greet` and `echo`, one trunk `carrier`
/// (`trunk` is the rest of its table), and the API on a free port. Returns it and the API port.
fn patchbay(trunk: &str, extra_tenant: &str) -> (patchbay_e2e::Patchbay, u16) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, api) = (free_port(), free_port());
    let config = format!(
        "[sip]\nlisten = [\"udp:127.0.0.1:{port}\", \"tcp:127.0.0.1:{port}\"]\n\
         [api]\nlisten = \"127.0.0.1:{api}\"\nadmin_token = \"admin-token\"\n\
         [cdr]\npath = \"cdr.jsonl\"\n\
         [[tenant]]\nid = \"t\"\ndomains = [\"127.0.0.1\"]\napi_token = \"{TOKEN}\"\n{extra_tenant}\n\
         [[tenant.flow]]\nname = \"greet\"\nstock = \"greet\"\n\
         [[tenant.flow]]\nname = \"echo\"\nstock = \"echo\"\n\
         [[tenant.flow]]\nname = \"menu\"\nstock = \"menu\"\n\
         [tenant.flow.vars]\n\"menu.1\" = \"dial:trunk:carrier/+15551234567\"\n\
         [[tenant.trunk]]\nname = \"carrier\"\n{trunk}\n"
    );
    (launch(dir, port, &config), api)
}

fn trunk_table(
    transport: &str,
    carrier_port: u16,
    password: &str,
    register: bool,
    ca: Option<&std::path::Path>,
) -> String {
    let ca = ca.map(|p| format!("ca = \"{}\"\n", p.display())).unwrap_or_default();
    format!(
        "gateway = \"127.0.0.1:{carrier_port}\"\ntransport = \"{transport}\"\nusername = \"patchbay\"\n\
         password = \"{password}\"\nrealm = \"carrier.test\"\nfrom_domain = \"carrier.test\"\n\
         register = {register}\nregister_expires_secs = 120\ncaller_ids = [\"+15550100\"]\n\
         default_caller_id = \"+15550100\"\ncalls_per_second = 10\nkeepalive_secs = 0\n{ca}"
    )
}

/// Polls `GET /v1/calls/{id}` until the call's status is final; returns every status seen.
fn follow(api: u16, id: &str, timeout: Duration) -> (Vec<String>, serde_json::Value) {
    let started = Instant::now();
    let mut seen: Vec<String> = Vec::new();
    loop {
        let (status, _, view) = http("GET", api, &format!("/v1/calls/{id}"), TOKEN, None);
        assert_eq!(status, 200, "{view}");
        let state = view["status"].as_str().unwrap_or_default().to_owned();
        if seen.last() != Some(&state) {
            seen.push(state.clone());
        }
        let done = ["completed", "busy", "no-answer", "failed", "canceled"].contains(&state.as_str());
        if done || started.elapsed() > timeout {
            return (seen, view);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the API shows the trunk `registered` (or `timeout`); returns the last state.
fn registration(api: u16, timeout: Duration, want: &str) -> String {
    let started = Instant::now();
    loop {
        let (_, _, trunks) = http("GET", api, "/v1/trunks", TOKEN, None);
        let state = trunks["trunks"][0]["registration"].as_str().unwrap_or_default().to_owned();
        if state.starts_with(want) || started.elapsed() > timeout {
            return state;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Counts RTP packets (version 2, PCMU) carrying sound (not silence) that reach `socket`.
fn count_rtp(socket: UdpSocket, for_how_long: Duration) -> std::thread::JoinHandle<(usize, usize)> {
    std::thread::spawn(move || {
        socket.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        let started = Instant::now();
        let (mut packets, mut loud) = (0, 0);
        let mut buf = [0u8; 2048];
        while started.elapsed() < for_how_long {
            if let Ok(n) = socket.recv(&mut buf)
                && n > 12
                && buf[0] >> 6 == 2
                && buf[1] & 0x7f == 0
            {
                packets += 1;
                let energy: f64 =
                    buf[12..n].iter().map(|&b| f64::from(patchbay_media::g711::ulaw_decode(b)).powi(2)).sum::<f64>()
                        / (n - 12) as f64;
                if energy.sqrt() > 300.0 {
                    loud += 1;
                }
            }
        }
        (packets, loud)
    })
}

/// A webhook receiver: every request's body (answered 200), in order.
fn webhook_receiver() -> (u16, std::sync::mpsc::Receiver<String>) {
    use std::io::{BufRead, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = std::io::BufReader::new(stream);
            let mut length = 0;
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                line.clear();
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let _ = reader.get_mut().write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            let _ = tx.send(String::from_utf8_lossy(&body).into_owned());
        }
    });
    (port, rx)
}

fn outbound_call_through_a_registering_carrier(transport: &str) {
    let rtp = UdpSocket::bind("127.0.0.1:0").expect("rtp socket");
    let rtp_port = rtp.local_addr().expect("addr").port();
    let carrier = Carrier::start(transport, rtp_port);
    let ca = (transport == "tls").then(|| carrier.dir.path().join("ca.pem"));
    let (hook_port, hooks) = webhook_receiver();
    let webhooks = format!("webhooks = [\"http://127.0.0.1:{hook_port}/\"]\nwebhook_secret = \"k\"\n");
    let (pb, api) = patchbay(&trunk_table(transport, carrier.port, "secret", true, ca.as_deref()), &webhooks);
    let state = registration(api, Duration::from_secs(15), "registered");
    assert!(state.starts_with("registered"), "registration: {state}");
    let audio = count_rtp(rtp, Duration::from_secs(8));
    let body = format!(
        r#"{{"to":"+15551234567","trunk":"carrier","flow":"greet","webhook":"http://127.0.0.1:{hook_port}/calls"}}"#
    );
    let (status, _, created) = http("POST", api, "/v1/calls", TOKEN, Some(&body));
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().expect("an id").to_owned();
    assert_eq!(id.len(), 32, "128 random bits, hex: {id}");
    let (seen, view) = follow(api, &id, Duration::from_secs(20));
    let (carrier_ok, log) = carrier.finish(Duration::from_secs(15));
    assert!(
        seen.contains(&"answered".to_owned()) && seen.last().map(String::as_str) == Some("completed"),
        "{seen:?} {view}\n{log}"
    );
    assert_eq!(view["from"], "+15550100");
    let (packets, loud) = audio.join().expect("rtp counter");
    // The greeting plays about three seconds (150 packets at 20 ms), then the flow hangs up.
    assert!(packets >= 100 && loud >= 50, "RTP at the carrier: {packets} packets, {loud} with sound\n{log}");
    assert!(carrier_ok, "the carrier's checks (digest, caller ID, BYE):\n{log}");
    // RFC 3608: the registrar's Service-Route is the INVITE's preloaded Route.
    let routed = log.lines().any(|line| line.starts_with("Route: <sip:orig@127.0.0.1:"));
    assert!(routed, "no Service-Route on the INVITE:\n{log}");
    let cdrs = pb.wait_for_cdrs(1, Duration::from_secs(5));
    let cdr = cdrs.iter().find(|c| c["id"] == id.as_str()).unwrap_or_else(|| panic!("a CDR with id {id}: {cdrs:?}"));
    assert_eq!(cdr["direction"], "outbound");
    assert_eq!(cdr["flow"], "greet");
    assert_eq!(cdr["sip_code"], 200);
    assert!(cdr["billable_ms"].as_u64().unwrap_or(0) >= 2_000, "{cdr}");
    // The webhook saw the call's progress, in order, ending with its final status.
    let mut statuses = Vec::new();
    while let Ok(body) = hooks.recv_timeout(Duration::from_secs(3)) {
        let view: serde_json::Value = serde_json::from_str(&body).expect("a JSON body");
        assert_eq!(view["id"], id.as_str());
        statuses.push(view["status"].as_str().unwrap_or_default().to_owned());
        if statuses.last().map(String::as_str) == Some("completed") {
            break;
        }
    }
    assert_eq!(statuses.first().map(String::as_str), Some("queued"), "{statuses:?}");
    assert!(statuses.ends_with(&["answered".to_owned(), "completed".to_owned()]), "{statuses:?}");
}

#[test]
fn an_api_call_registers_answers_digest_and_runs_its_flow_over_udp() {
    outbound_call_through_a_registering_carrier("udp");
}

#[test]
fn an_api_call_registers_answers_digest_and_runs_its_flow_over_tcp() {
    outbound_call_through_a_registering_carrier("tcp");
}

#[test]
fn an_api_call_registers_answers_digest_and_runs_its_flow_over_tls() {
    outbound_call_through_a_registering_carrier("tls");
}

#[test]
fn a_wrong_password_fails_registration_and_the_call_with_the_carriers_403() {
    // Registration: the carrier's 403 is the trunk's state.
    let rtp = UdpSocket::bind("127.0.0.1:0").expect("rtp socket");
    let carrier = Carrier::start("udp", rtp.local_addr().expect("addr").port());
    let (_pb, api) = patchbay(&trunk_table("udp", carrier.port, "wrong", true, None), "");
    let state = registration(api, Duration::from_secs(15), "failed");
    assert!(state.starts_with("failed: 403"), "registration: {state}");
    drop(carrier);
    // A call: the INVITE's answer is refused with 403, and so is the call.
    let carrier = Carrier::start("udp", rtp.local_addr().expect("addr").port());
    let (_pb, api) = patchbay(&trunk_table("udp", carrier.port, "wrong", false, None), "");
    let body = r#"{"to":"+15551234567","flow":"greet"}"#;
    let (status, _, created) = http("POST", api, "/v1/calls", TOKEN, Some(body));
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().expect("id");
    let (seen, view) = follow(api, id, Duration::from_secs(20));
    assert_eq!(view["status"], "failed", "{seen:?} {view}");
    assert_eq!(view["sip_code"], 403, "{view}");
}

#[test]
fn the_api_refuses_bad_tokens_other_caller_ids_and_unknown_trunks_and_flows() {
    let (_pb, api) = patchbay(&trunk_table("udp", 9, "secret", false, None), "");
    let call = |token: &str, body: &str| http("POST", api, "/v1/calls", token, Some(body));
    let (status, _, error) = call("nope", r#"{"to":"+15551234567","flow":"greet"}"#);
    assert_eq!((status, error["error"]["code"].as_str()), (401, Some("unauthorized")));
    let (status, _, error) = call(TOKEN, r#"{"to":"+15551234567","from":"+15559999","flow":"greet"}"#);
    assert_eq!((status, error["error"]["code"].as_str()), (403, Some("caller-id-not-allowed")), "{error}");
    let (status, _, error) = call(TOKEN, r#"{"to":"+15551234567","trunk":"other","flow":"greet"}"#);
    assert_eq!((status, error["error"]["code"].as_str()), (404, Some("trunk-not-found")));
    let (status, _, error) = call(TOKEN, r#"{"to":"+15551234567","flow":"nope"}"#);
    assert_eq!((status, error["error"]["code"].as_str()), (404, Some("flow-not-found")));
    let (status, _, error) = call(TOKEN, "{\"to\":\"+1555\\r\\nX-Evil: 1\",\"flow\":\"greet\"}");
    assert_eq!((status, error["error"]["code"].as_str()), (400, Some("invalid-number")), "{error}");
    let (status, _, error) = call(TOKEN, r#"{"to":"+15551234567","flow":"greet","webhook":"http://169.254.169.254/"}"#);
    assert_eq!((status, error["error"]["code"].as_str()), (403, Some("webhook-not-allowed")), "{error}");
    let (status, _, error) = call("admin-token", r#"{"to":"+15551234567","flow":"greet"}"#);
    assert_eq!((status, error["error"]["code"].as_str()), (400, Some("tenant-required")));
    let (status, _, _) = http("GET", api, "/v1/calls/0123", TOKEN, None);
    assert_eq!(status, 404);
    let (status, _, trunks) = http("GET", api, "/v1/trunks", TOKEN, None);
    assert_eq!(status, 200);
    assert!(!trunks.to_string().contains("secret"), "no password in API output: {trunks}");
}

#[test]
fn two_hundred_calls_at_once_are_spread_by_a_ten_per_second_cap_and_none_is_lost() {
    // The carrier: sipp's own UAS answers every INVITE and takes the BYE.
    let carrier_port = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sipp = sipp(dir.path(), &[])
        .args(["-sn", "uas", "-i", "127.0.0.1", "-p", &carrier_port.to_string(), "-mp", &free_port().to_string()])
        .args(["-nostdin", "-timeout", "90"])
        .spawn()
        .expect("run sipp");
    std::thread::sleep(Duration::from_millis(500));
    let trunk = format!(
        "gateway = \"127.0.0.1:{carrier_port}\"\ncaller_ids = [\"+15550100\"]\ndefault_caller_id = \"+15550100\"\n\
         calls_per_second = 10\nqueue = 500\n"
    );
    let (pb, api) = patchbay(&trunk, "");
    let ids: Vec<String> = (0..200)
        .map(|i| {
            let body = format!(r#"{{"to":"+1555000{i:04}","flow":"greet","vars":{{"greet.repeat":"1"}}}}"#);
            let (status, _, created) = http("POST", api, "/v1/calls", TOKEN, Some(&body));
            assert_eq!(status, 201, "call {i}: {created}");
            created["id"].as_str().expect("id").to_owned()
        })
        .collect();
    let mut answered = Vec::new();
    for id in &ids {
        let (seen, view) = follow(api, id, Duration::from_secs(60));
        assert_eq!(view["status"], "completed", "{id}: {seen:?} {view}");
        answered.push(humantime_secs(view["answered"].as_str().expect("answered time")));
    }
    answered.sort_by(f64::total_cmp);
    let spread = answered[199] - answered[0];
    // 200 calls at 10 per second, the first ten at once: about 19 s from first to last.
    assert!((17.0..=25.0).contains(&spread), "answers spread over {spread:.1} s");
    // No second's window holds more than a burst's worth plus the rate.
    for (i, start) in answered.iter().enumerate() {
        let in_window = answered[i..].iter().take_while(|t| **t < start + 1.0).count();
        assert!(in_window <= 21, "{in_window} calls answered within a second of {start}");
    }
    let cdrs = pb.wait_for_cdrs(200, Duration::from_secs(10));
    for id in &ids {
        assert!(cdrs.iter().any(|c| c["id"] == id.as_str()), "no CDR for {id}");
    }
    let _ = sipp.kill();
    let _ = sipp.wait();
}

/// Seconds since the epoch of an RFC 3339 time as the API writes it (UTC, milliseconds).
fn humantime_secs(text: &str) -> f64 {
    // 2026-12-06T20:41:22.123Z: only the time of day matters within one test.
    let time = text.split('T').nth(1).unwrap_or_default().trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0.0);
    let m: f64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0.0);
    let s: f64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0.0);
    h * 3600.0 + m * 60.0 + s
}

#[test]
fn a_did_call_from_the_trunks_address_runs_its_flow_and_from_elsewhere_is_challenged() {
    // The trunk's carrier calls from 127.0.0.1; the tenant challenges everything else.
    let trunk =
        "gateway = \"127.0.0.1:9\"\nsource_ips = [\"127.0.0.1\"]\n[tenant.trunk.dids]\n\"+15550100\" = \"echo\"\n";
    let auth = "[tenant.auth]\nusers = { alice = \"pw\" }\nalgorithms = [\"MD5\"]\n";
    let (pb, _api) = patchbay(trunk, auth);
    let call_from = |source: &str| {
        let dir = tempfile::tempdir().expect("tempdir");
        sipp(dir.path(), &[])
            .arg(format!("127.0.0.1:{}", pb.port))
            .args(["-sn", "uac", "-s", "+15550100", "-i", source, "-p", &free_port().to_string()])
            .args(["-mp", &free_port().to_string(), "-m", "1", "-d", "500", "-timeout", "15", "-timeout_error"])
            .args(["-nostdin", "-trace_msg"])
            .status()
            .expect("run sipp")
            .success()
            .then_some(())
            .ok_or_else(|| {
                std::fs::read_dir(dir.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                    .collect::<String>()
            })
    };
    // From the trunk's address: no challenge, the DID's flow (echo) answers.
    call_from("127.0.0.1").unwrap_or_else(|log| panic!("the carrier's call failed:\n{log}"));
    // From another address (loopback alias): challenged (sipp's plain UAC does not answer 407).
    let log = call_from("127.0.0.2").expect_err("a call from elsewhere must not get through unchallenged");
    assert!(log.contains("SIP/2.0 407 ") && log.contains("Proxy-Authenticate: Digest"), "{log}");
    let cdrs = pb.wait_for_cdrs(1, Duration::from_secs(5));
    assert_eq!(cdrs.iter().filter(|c| c["flow"] == "echo").count(), 1, "{cdrs:?}");
}

#[test]
fn a_flow_dials_out_through_the_trunk_with_its_caller_id_and_credentials() {
    // The caller reaches the menu, presses 1; the menu dials trunk:carrier/+15551234567, which
    // the carrier challenges and checks (caller ID in From and P-Asserted-Identity), answers,
    // and gets the BYE when the caller hangs up.
    let rtp = UdpSocket::bind("127.0.0.1:0").expect("rtp socket");
    let carrier = Carrier::start_for("udp", rtp.local_addr().expect("addr").port(), 1, &[]);
    let (pb, _api) = patchbay(&trunk_table("udp", carrier.port, "secret", false, None), "");
    let audio = count_rtp(rtp, Duration::from_secs(8));
    let uri = format!("sip:menu@127.0.0.1:{}", pb.port);
    let dir = tempfile::tempdir().expect("tempdir");
    let args = [uri.as_str(), "--dtmf", "1", "--dtmf-after", "1.5", "--hangup-after", "7", "--ring-timeout", "10"];
    let (ok, output) = patchbay_e2e::patchbay_call(dir.path(), &args);
    assert!(ok, "{output}");
    let (carrier_ok, log) = carrier.finish(Duration::from_secs(15));
    assert!(carrier_ok, "the carrier's checks:\n{log}\ncaller:\n{output}");
    let (packets, _) = audio.join().expect("rtp counter");
    assert!(packets >= 100, "the bridged leg's RTP reached the carrier: {packets} packets");
    let cdrs = pb.wait_for_cdrs(2, Duration::from_secs(5));
    let leg = cdrs.iter().find(|c| c["parent_call_id"].is_string()).unwrap_or_else(|| panic!("a leg CDR: {cdrs:?}"));
    assert_eq!(leg["direction"], "outbound");
    assert!(leg["from"].as_str().is_some_and(|f| f.contains("+15550100")), "{leg}");
    assert!(leg["to"].as_str().is_some_and(|t| t.contains("+15551234567")), "{leg}");
}

#[test]
fn inbound_calls_beyond_the_tenants_cap_get_503_and_a_record() {
    let (pb, _api) = patchbay("gateway = \"127.0.0.1:9\"\n", "max_calls = 1\n");
    let dir = tempfile::tempdir().expect("tempdir");
    // Two calls at once to the echo, each held for 3 s: the second finds the tenant full.
    let status = sipp(dir.path(), &[])
        .arg(format!("127.0.0.1:{}", pb.port))
        .args(["-sn", "uac", "-s", "echo", "-i", "127.0.0.1", "-p", &free_port().to_string()])
        .args(["-mp", &free_port().to_string(), "-m", "2", "-l", "2", "-r", "10", "-d", "3000"])
        .args(["-timeout", "20", "-nostdin"])
        .status()
        .expect("run sipp");
    assert!(!status.success(), "one of the two calls must be refused");
    let cdrs = pb.wait_for_cdrs(2, Duration::from_secs(10));
    let refused: Vec<_> = cdrs.iter().filter(|c| c["end_cause"] == "tenant-busy").collect();
    assert_eq!(refused.len(), 1, "{cdrs:?}");
    assert_eq!(refused[0]["sip_code"], 503);
    assert_eq!(cdrs.iter().filter(|c| c["sip_code"] == 200).count(), 1, "{cdrs:?}");
}

#[test]
fn a_udp_trunk_sends_options_keep_alives_and_shows_the_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let carrier_port = free_port();
    let mut sipp = sipp(dir.path(), &[])
        .args(["-sf", &scenario("uas_options.xml"), "-i", "127.0.0.1", "-p", &carrier_port.to_string()])
        .args(["-m", "1", "-timeout", "15", "-timeout_error", "-nostdin", "-trace_msg"])
        .spawn()
        .expect("run sipp");
    std::thread::sleep(Duration::from_millis(500));
    let trunk = format!("gateway = \"127.0.0.1:{carrier_port}\"\nfrom_domain = \"carrier.test\"\nkeepalive_secs = 1\n");
    let (_pb, api) = patchbay(&trunk, "");
    let started = Instant::now();
    let keepalive = loop {
        let (_, _, trunks) = http("GET", api, "/v1/trunks", TOKEN, None);
        let state = trunks["trunks"][0]["keepalive"].clone();
        if state.is_string() || started.elapsed() > Duration::from_secs(10) {
            break state;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(keepalive, "answered 200");
    let status = sipp.wait().expect("sipp");
    let log: String = std::fs::read_dir(dir.path())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(status.success(), "{log}");
    assert!(log.contains("OPTIONS sip:127.0.0.1:") && log.contains("From: <sip:patchbay@carrier.test>;tag="), "{log}");
}

#[test]
fn shutting_down_takes_the_registration_off_the_carrier() {
    let rtp = UdpSocket::bind("127.0.0.1:0").expect("rtp socket");
    // The carrier's registrar waits for the un-REGISTER; no call comes (one Call-ID).
    let carrier =
        Carrier::start_for("udp", rtp.local_addr().expect("addr").port(), 1, &["-set", "await_unregister", "1"]);
    let (pb, api) = patchbay(&trunk_table("udp", carrier.port, "secret", true, None), "");
    let state = registration(api, Duration::from_secs(15), "registered");
    assert!(state.starts_with("registered"), "registration: {state}");
    // SIGTERM: Patchbay removes its binding (Expires 0) before it exits.
    let pid = i32::try_from(pb.pid()).expect("pid");
    // SAFETY: sends a signal to the child this test started; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let (ok, log) = carrier.finish(Duration::from_secs(10));
    assert!(ok, "the carrier saw no un-REGISTER:\n{log}");
    assert!(log.contains("Expires: 0"), "{log}");
}

#[test]
fn a_queued_call_is_cancelled_by_delete_and_shutdown_leaves_one_record_per_call() {
    // One call per 100 s: the first goes out (to a gateway that never answers), the rest wait.
    let silent = UdpSocket::bind("127.0.0.1:0").expect("a gateway that never answers");
    let trunk = format!(
        "gateway = \"127.0.0.1:{}\"\ncaller_ids = [\"+15550100\"]\ndefault_caller_id = \"+15550100\"\n\
         calls_per_second = 0.01\nkeepalive_secs = 0\n",
        silent.local_addr().expect("addr").port()
    );
    let (pb, api) = patchbay(&trunk, "");
    let ids: Vec<String> = (0..3)
        .map(|i| {
            let body = format!(r#"{{"to":"+155500000{i}","flow":"greet"}}"#);
            let (status, _, created) = http("POST", api, "/v1/calls", TOKEN, Some(&body));
            assert_eq!(status, 201, "{created}");
            created["id"].as_str().expect("id").to_owned()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (_, _, second) = http("GET", api, &format!("/v1/calls/{}", ids[1]), TOKEN, None);
    assert_eq!(second["status"], "queued", "{second}");
    // DELETE while it waits: cancelled at once, and never placed.
    let (status, _, cancelled) = http("DELETE", api, &format!("/v1/calls/{}", ids[1]), TOKEN, None);
    assert_eq!((status, cancelled["status"].as_str()), (200, Some("canceled")), "{cancelled}");
    // SIGTERM twice: the first drains (the ringing call would be left to ring out), the second
    // shuts down at once: the ringing call is cancelled, the queued one refused; one record each.
    let pid = i32::try_from(pb.pid()).expect("pid");
    // SAFETY: sends a signal to the child this test started; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let cdrs = pb.settled_cdrs(3, Duration::from_secs(10));
    for id in &ids {
        let mine: Vec<_> = cdrs.iter().filter(|c| c["id"] == id.as_str()).collect();
        assert_eq!(mine.len(), 1, "exactly one record for {id}: {cdrs:?}");
    }
    let cause = |id: &str| cdrs.iter().find(|c| c["id"] == id).map(|c| c["end_cause"].clone());
    assert_eq!(cause(&ids[1]), Some("canceled".into()));
    assert_eq!(cause(&ids[2]), Some("shutdown".into()));
}
