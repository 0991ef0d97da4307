//! Scale-out behind Kamailio (docs/scale-out.md): the shipped dispatcher configuration
//! (`examples/scale-out/kamailio.cfg`, Debian's `kamailio` package) in front of two Patchbay
//! nodes, sipp calls through it, and one node drained in the middle. Zero calls may fail: the
//! drained node's calls up finish through the proxy (their ACKs and BYEs follow the
//! Record-Route), and the new calls go to the other node — whether Kamailio learnt of the drain
//! from its OPTIONS probe (503) or from an INVITE the draining node refused with 503.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use patchbay_e2e::{Patchbay, free_port, run_sipp, scenario, start_patchbay_with};

/// Kamailio running the shipped configuration with the test's ports; killed on drop.
struct Kamailio {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Kamailio {
    /// Kamailio forks its workers, which outlive a SIGKILL of the main process (and would go
    /// on probing ports later tests reuse): the whole process group is stopped.
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let stopped = (0..40).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        if !stopped {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn example(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/scale-out").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Starts Kamailio on a free port with the two nodes as its dispatcher set, and gives it 3 s
/// to start and probe both nodes (ds_ping_interval 1 s). A node it has not yet found up would
/// still get calls (dispatcher destinations start active), so the wait is a margin, not a
/// condition the test depends on.
fn start_kamailio(nodes: [u16; 2]) -> Kamailio {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let list = dir.path().join("dispatcher.list");
    std::fs::write(
        &list,
        example("dispatcher.list")
            .replace("127.0.0.1:5070", &format!("127.0.0.1:{}", nodes[0]))
            .replace("127.0.0.1:5080", &format!("127.0.0.1:{}", nodes[1])),
    )
    .expect("write the dispatcher list");
    let config = example("kamailio.cfg")
        .replace("listen=udp:127.0.0.1:5060", &format!("listen=udp:127.0.0.1:{port}"))
        .replace("/etc/kamailio/dispatcher.list", &list.display().to_string());
    let cfg = dir.path().join("kamailio.cfg");
    std::fs::write(&cfg, config).expect("write the Kamailio config");
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).expect("run dir");
    let mut child = Command::new("kamailio")
        // Its own process group, so that dropping it stops every worker.
        .process_group(0)
        .arg("-f")
        .arg(&cfg)
        .args(["-DD", "-E", "-m", "64", "-M", "8", "-Y"])
        .arg(&run)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kamailio (Debian package kamailio; `cargo xtask test` installs it)");
    // Its log goes to stderr: echoed to ours (shown when the test fails).
    let stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("kamailio: {line}");
        }
    });
    let mut kamailio = Kamailio { child, port, _dir: dir };
    // Started, and both nodes probed up (ds_ping_interval 1 s).
    std::thread::sleep(Duration::from_secs(3));
    if let Ok(Some(status)) = kamailio.child.try_wait() {
        panic!("kamailio exited at start: {status:?} (its log is above)");
    }
    kamailio
}

fn node() -> Patchbay {
    let extra = "[api]\nlisten = \"127.0.0.1:{api}\"\n".replace("{api}", &free_port().to_string());
    start_patchbay_with(&extra, "[[tenant.flow]]\nname = \"echo\"\nstock = \"echo\"\n")
}

#[test]
fn a_node_drained_behind_kamailio_loses_no_call_and_new_calls_go_to_the_other() {
    let mut a = node();
    let b = node();
    let kamailio = start_kamailio([a.port, b.port]);
    // 60 calls, 10 per second, each up for 3 s: about 30 up at once, spread over both nodes.
    let proxy = kamailio.port;
    let started = Instant::now();
    let calls = std::thread::spawn(move || {
        run_sipp(proxy, "echo", &["-sf", &scenario("uac_via_proxy.xml")], 60, &["-r", "10", "-l", "100", "-d", "3000"])
    });
    // Drain node A after 2 s: it has calls up, and calls keep coming.
    std::thread::sleep(Duration::from_secs(2));
    a.terminate();
    let drained_at = std::time::SystemTime::now();
    let (ok, log) = calls.join().expect("sipp");
    assert!(ok, "every call through Kamailio must succeed while a node drains:\n{log}");
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
    // Node A finished its calls up and exited cleanly.
    let status = a.wait_exit(Duration::from_secs(15)).expect("node A exits once its calls have ended");
    assert!(status.success(), "node A's exit: {status:?}");
    let answered = |cdrs: &[serde_json::Value]| -> Vec<serde_json::Value> {
        cdrs.iter().filter(|c| c["sip_code"] == 200).cloned().collect()
    };
    let on_a = answered(&a.cdrs());
    let on_b = answered(&b.wait_for_cdrs(40, Duration::from_secs(10)));
    eprintln!("answered: node A {}, node B {}", on_a.len(), on_b.len());
    assert!(!on_a.is_empty(), "node A carried calls before its drain");
    assert_eq!(
        on_a.len() + on_b.len(),
        60,
        "every call answered once, on one node: A {} + B {}",
        on_a.len(),
        on_b.len()
    );
    assert!(
        on_a.iter().all(|c| c["end_cause"] == "caller-hangup"),
        "node A's calls ended by their callers, not cut by the drain: {on_a:#?}"
    );
    // The calls placed after the drain began (RFC 3339 start times compare as text in UTC)
    // all went to node B.
    let drained = humantime::format_rfc3339_millis(drained_at + Duration::from_millis(100)).to_string();
    let late_on_a: Vec<_> = on_a.iter().filter(|c| c["start"].as_str().is_some_and(|s| s > drained.as_str())).collect();
    assert!(late_on_a.is_empty(), "node A took calls after its drain began: {late_on_a:#?}");
    let late_on_b = on_b.iter().filter(|c| c["start"].as_str().is_some_and(|s| s > drained.as_str())).count();
    eprintln!("placed after the drain began: {late_on_b}, all on node B");
    assert!(late_on_b >= 30, "the calls after the drain went to node B: {late_on_b}");
}
