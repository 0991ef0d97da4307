//! The `patchbay` binary as a user meets it: `--help`, `check`, `run`, and configuration errors.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use patchbay_e2e::patchbay;

#[test]
fn help_lists_the_commands() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = patchbay(dir.path()).arg("--help").output().expect("run patchbay");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for command in ["run", "check", "default-config"] {
        assert!(text.contains(command), "{text}");
    }
}

#[test]
fn check_with_the_embedded_config_loads_the_stock_flows_and_says_what_is_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = patchbay(dir.path()).arg("check").output().expect("run patchbay");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for flow in ["echo", "menu", "voicemail", "agent", "router"] {
        assert!(stdout.contains(&format!("sip:{flow}@127.0.0.1:5060")), "{stdout}");
    }
    assert!(stdout.contains("SIP on udp:127.0.0.1:5060, tcp:127.0.0.1:5060."), "{stdout}");
    // The embedded config has no trunks (nothing about them is claimed) and serves the API's
    // health checks and metrics on loopback.
    assert!(!stdout.contains("trunk"), "{stdout}");
    assert!(stdout.contains("control API on http://127.0.0.1:8080/v1/"), "{stdout}");
    assert!(stdout.contains("metrics on http://127.0.0.1:8080/metrics"), "{stdout}");
    // The precompiled flows were cached for the next start.
    // (Beside them the install's cache key, `cache-key`.)
    let cached = std::fs::read_dir(dir.path().join("patchbay/flows"))
        .expect("cache dir")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .count();
    assert_eq!(cached, 5);
}

#[test]
fn a_bad_config_names_the_file_line_and_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("patchbay.toml");
    std::fs::write(
        &config,
        "[sip]\nlisten = [\"udp:127.0.0.1:5060\"]\n\n[[tenant]]\nid = \"acme\"\nmax_channels = 3\n",
    )
    .expect("write config");
    let out = patchbay(dir.path()).arg("check").arg("--config").arg(&config).output().expect("run patchbay");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("{}:6: unknown field `max_channels`", config.display())), "{stderr}");
}

#[test]
fn a_flow_that_does_not_load_is_reported_and_the_others_still_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("broken.wasm"), b"\0asm\x0d\0\x01\0not really").expect("write flow");
    let config = dir.path().join("patchbay.toml");
    std::fs::write(
        &config,
        "[sip]\nlisten = [\"udp:127.0.0.1:5060\"]\n[[tenant]]\nid = \"acme\"\n\
         [[tenant.flow]]\nname = \"broken\"\npath = \"broken.wasm\"\n\
         [[tenant.flow]]\nname = \"echo\"\nstock = \"echo\"\n",
    )
    .expect("write config");
    let out = patchbay(dir.path()).arg("check").arg("--config").arg(&config).output().expect("run patchbay");
    assert_eq!(out.status.code(), Some(1), "a flow failed to load");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("sip:echo@"), "{stdout}");
    assert!(!stdout.contains("sip:broken@"), "{stdout}");
    assert!(stderr.contains("flow \"broken\" does not compile"), "{stderr}");
}

#[test]
fn run_serves_until_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child =
        patchbay(dir.path()).arg("run").stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("start");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let started = Instant::now();
    let mut seen = Vec::new();
    while started.elapsed() < Duration::from_secs(60) {
        let Some(Ok(line)) = lines.next() else { break };
        let ready = line.contains("Press Ctrl-C");
        seen.push(line);
        if ready {
            break;
        }
    }
    assert!(seen.iter().any(|l| l.contains("Press Ctrl-C")), "{seen:?}");
    // The embedded default serves the health checks and the metrics on 127.0.0.1:8080.
    for (path, expect) in [("/healthz", "ok"), ("/readyz", "ready"), ("/metrics", "# EOF")] {
        let (status, _, body) = patchbay_e2e::http_raw("GET", 8080, path, "", None);
        assert_eq!(status, 200, "GET {path}: {body}");
        assert!(body.contains(expect), "GET {path}: {body}");
    }
    let status = std::process::Command::new("kill").arg(child.id().to_string()).status().expect("kill");
    assert!(status.success());
    let exit = child.wait().expect("wait");
    assert!(exit.success(), "{exit:?}");
}
