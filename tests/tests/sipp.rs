//! Interop with sipp (Debian `sip-tester`): the real `patchbay` binary as the callee.
//!
//! Each test starts its own Patchbay on a free port with a config serving `echo` and `menu`
//! (stock) and `ring` (the chaos fixture, which rings 30 s before answering), then runs one
//! sipp scenario against it. sipp's exit status is the verdict: 0 means every message of the
//! scenario arrived as written (wrong responses, missing BYEs or timeouts fail it).

use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use patchbay_e2e::patchbay;

fn free_udp_port() -> u16 {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind an ephemeral port");
    socket.local_addr().expect("local addr").port()
}

/// A running Patchbay; killed on drop.
struct Patchbay {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Patchbay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_patchbay() -> Patchbay {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("chaos.wasm"), patchbay_stock_flows::fixtures::CHAOS).expect("write fixture");
    let port = free_udp_port();
    let config = dir.path().join("patchbay.toml");
    std::fs::write(
        &config,
        format!(
            "[sip]\nlisten = [\"udp:127.0.0.1:{port}\"]\n\
             [[tenant]]\nid = \"test\"\ndomains = [\"127.0.0.1\"]\n\
             [[tenant.flow]]\nname = \"echo\"\nstock = \"echo\"\n\
             [[tenant.flow]]\nname = \"menu\"\nstock = \"menu\"\n\
             [[tenant.flow]]\nname = \"ring\"\npath = \"chaos.wasm\"\n"
        ),
    )
    .expect("write config");
    let mut child = patchbay(dir.path())
        .arg("run")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start patchbay");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < Duration::from_secs(60), "patchbay did not start");
        match lines.next() {
            Some(Ok(line)) if line.contains("Press Ctrl-C") => break,
            Some(Ok(_)) => {}
            _ => panic!("patchbay exited before it was ready"),
        }
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Patchbay { child, port, _dir: dir }
}

fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sipp").join(name)
}

/// Runs `calls` sipp calls (at most 5 at once) against `pb`; returns whether sipp reported success.
fn sipp(pb: &Patchbay, service: &str, scenario_args: &[&str], calls: u32, extra: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new("sipp")
        .current_dir(dir.path())
        .args(scenario_args)
        .arg(format!("127.0.0.1:{}", pb.port))
        .args(["-s", service, "-i", "127.0.0.1", "-p"])
        .arg(free_udp_port().to_string())
        .arg("-mp")
        .arg(free_udp_port().to_string())
        .args(["-m", &calls.to_string(), "-l", "5", "-timeout", "60", "-timeout_error", "-nostdin", "-trace_err"])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run sipp (Debian package sip-tester; `cargo xtask test` installs it)");
    let mut log = String::from_utf8_lossy(&out.stdout).into_owned();
    log.push_str(&String::from_utf8_lossy(&out.stderr));
    for entry in std::fs::read_dir(dir.path()).into_iter().flatten().flatten() {
        if entry.path().to_string_lossy().ends_with("_errors.log") {
            log.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
        }
    }
    (out.status.success(), log)
}

#[test]
fn options_ping_gets_200() {
    let pb = start_patchbay();
    let xml = scenario("options.xml");
    let (ok, log) = sipp(&pb, "echo", &["-sf", xml.to_str().expect("utf-8 path")], 1, &[]);
    assert!(ok, "{log}");
}

#[test]
fn call_answered_and_released_by_the_caller() {
    // sipp's built-in UAC: INVITE, 100/180/200, ACK, a pause, then sipp sends BYE.
    let pb = start_patchbay();
    let (ok, log) = sipp(&pb, "echo", &["-sn", "uac"], 1, &["-d", "500"]);
    assert!(ok, "{log}");
}

#[test]
fn call_answered_and_released_by_patchbay() {
    // The menu flow answers, then ends the call (no media yet, so its prompt is unavailable).
    let pb = start_patchbay();
    let xml = scenario("uac_callee_hangs_up.xml");
    let (ok, log) = sipp(&pb, "menu", &["-sf", xml.to_str().expect("utf-8 path")], 1, &[]);
    assert!(ok, "{log}");
}

#[test]
fn cancel_while_ringing_gets_487() {
    let pb = start_patchbay();
    let xml = scenario("uac_cancel.xml");
    let (ok, log) = sipp(&pb, "ring", &["-sf", xml.to_str().expect("utf-8 path")], 1, &[]);
    assert!(ok, "{log}");
}

#[test]
fn calls_complete_under_10_percent_packet_loss() {
    // sipp drops 10% of the messages it sends and receives; retransmissions (Timer A on its
    // side, 2xx and 100 retransmission and absorption on ours) must carry every call through.
    let pb = start_patchbay();
    let (ok, log) = sipp(&pb, "echo", &["-sn", "uac"], 20, &["-d", "200", "-lost", "10"]);
    assert!(ok, "{log}");
}
