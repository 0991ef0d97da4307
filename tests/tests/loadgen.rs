//! The load generator (`patchbay-loadgen`, the system benchmark's caller) against the real
//! binary, at a size CI can carry: its calls are answered, its keys reach the flow, media flows
//! both ways without loss, the far end of a bridge is answered by it, and it reads Patchbay's
//! CPU and memory from /proc. Pacing figures are the benchmark's business, not asserted here.

use std::process::Command;

use patchbay_e2e::{free_port, loadgen_bin, start_patchbay_with};

const CALLS: usize = 20;

/// Runs `patchbay-loadgen calls` and returns its one round's report.
fn loadgen(args: &[String]) -> serde_json::Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("rounds.json");
    let out = Command::new(loadgen_bin())
        .arg("calls")
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run patchbay-loadgen");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let rounds: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&json).unwrap_or_else(|e| panic!("no report ({e}); loadgen said:\n{text}")),
    )
    .expect("the report is JSON");
    rounds[0].clone()
}

fn common(port: u16, uri: &str, pid: u32) -> Vec<String> {
    [
        "--target",
        &format!("127.0.0.1:{port}"),
        "--uri",
        uri,
        "--calls",
        &CALLS.to_string(),
        "--rate",
        "50",
        "--hold",
        "2",
        "--settle",
        "1",
        "--pid",
        &format!("patchbay={pid}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Every call answered and kept, audio both ways with (next to) no loss.
fn assert_carried(report: &serde_json::Value, streams: u64) {
    assert_eq!(report["answered"], CALLS as u64, "{report:#}");
    assert_eq!(report["failed"], serde_json::json!({}), "{report:#}");
    assert_eq!(report["dropped"], 0, "{report:#}");
    assert_eq!(report["streams"], streams, "{report:#}");
    assert_eq!(report["silent_streams"], 0, "{report:#}");
    let received = report["packets_received"].as_u64().expect("count");
    // At least the two seconds of the window, at 50 packets a second, on every stream.
    assert!(received >= streams * 100, "{report:#}");
    let lost = report["packets_lost"].as_u64().expect("count");
    assert!(lost * 1000 <= received, "more than 0.1 % lost: {report:#}");
    let patchbay = report["processes"].as_array().expect("processes").iter().find(|p| p["name"] == "patchbay");
    let patchbay = patchbay.unwrap_or_else(|| panic!("no figures for patchbay: {report:#}"));
    assert!(patchbay["cpu_percent"].as_f64().expect("cpu") > 0.0, "{report:#}");
    assert!(patchbay["rss_mib"].as_f64().expect("rss") > 1.0, "{report:#}");
}

#[test]
fn ivr_calls_from_the_load_generator_are_carried_and_their_keys_arrive() {
    let patchbay = start_patchbay_with(
        "",
        r#"
[[tenant.flow]]
name = "ivr"
stock = "menu"
[tenant.flow.vars]
"menu.timeout-ms" = "600000"
"menu.9" = "menu:main"
"#,
    );
    let mut args = common(patchbay.port, "sip:ivr@127.0.0.1", patchbay.pid());
    args.extend(["--keys", "9", "--keys-after", "0.5"].map(String::from));
    let report = loadgen(&args);
    assert_carried(&report, CALLS as u64);
    // The generator's RFC 4733 key reached every call's menu.
    let cdrs = patchbay.wait_for_cdrs(CALLS, std::time::Duration::from_secs(10));
    assert_eq!(cdrs.len(), CALLS);
    for cdr in &cdrs {
        let path = cdr["vars"]["menu.path"].as_str().unwrap_or_default();
        assert!(path.starts_with("main:9"), "menu.path {path:?} in {cdr:#}");
    }
}

#[test]
fn bridged_calls_come_back_to_the_load_generator() {
    let callee = free_port();
    let patchbay = start_patchbay_with(
        "",
        &format!(
            r#"
[[tenant.flow]]
name = "bridge"
stock = "router"
[tenant.flow.vars]
"router.default" = "sip:{{ext}}@127.0.0.1:{callee}"
[tenant.allow]
dial = ["sip:*@127.0.0.1:{callee}"]
"#
        ),
    );
    let mut args = common(patchbay.port, "sip:bridge@127.0.0.1", patchbay.pid());
    args.extend(["--keys", "2000", "--keys-after", "0.5", "--sip-bind"].map(String::from));
    args.push(format!("127.0.0.1:{callee}"));
    let report = loadgen(&args);
    assert_eq!(report["callee_legs"], CALLS as u64, "{report:#}");
    // Caller and callee streams.
    assert_carried(&report, 2 * CALLS as u64);
}
