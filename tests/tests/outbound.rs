//! Outbound calls from the real binary (`patchbay call`) to sipp playing a carrier trunk.

use std::process::{Command, Stdio};
use std::time::Duration;

use patchbay_e2e::{free_port, scenario};

/// Starts sipp as a UAS running `xml` on a free port; returns the child and the port.
fn trunk(xml: &str, dir: &std::path::Path) -> (std::process::Child, u16) {
    let port = free_port();
    let child = Command::new("sipp")
        .current_dir(dir)
        .args(["-sf", &scenario(xml), "-i", "127.0.0.1", "-p", &port.to_string()])
        .args([
            "-mp",
            &free_port().to_string(),
            "-m",
            "1",
            "-timeout",
            "30",
            "-timeout_error",
            "-nostdin",
            "-trace_err",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sipp (Debian package sip-tester; `cargo xtask test` installs it)");
    // sipp binds its socket before reading the scenario's first message; give it a moment.
    std::thread::sleep(Duration::from_millis(500));
    (child, port)
}

fn place_call(port: u16, password: &str, cache: &std::path::Path) -> (bool, String) {
    let uri = format!("sip:+15550100@127.0.0.1:{port}");
    let args =
        [uri.as_str(), "--user", "acct", "--password", password, "--hangup-after", "0.3", "--ring-timeout", "10"];
    patchbay_e2e::patchbay_call(cache, &args)
}

#[test]
fn an_outbound_call_answers_the_trunks_digest_challenges_on_invite_and_bye() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sipp, port) = trunk("uas_trunk_digest.xml", dir.path());
    let (ok, output) = place_call(port, "s3cret", dir.path());
    let sipp_out = sipp.wait_with_output().expect("sipp exit");
    let sipp_log = String::from_utf8_lossy(&sipp_out.stderr);
    assert!(ok, "patchbay call failed:\n{output}\nsipp:\n{sipp_log}");
    assert!(output.contains("answered") && output.contains("we hung up"), "{output}");
    // sipp's verdict: both Authorization headers verified (else it answers 403 and stops).
    assert!(sipp_out.status.success(), "sipp failed:\n{sipp_log}\npatchbay:\n{output}");
}

#[test]
fn a_wrong_password_fails_the_outbound_call_without_retrying_forever() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut sipp, port) = trunk("uas_trunk_digest.xml", dir.path());
    let (ok, output) = place_call(port, "wrong", dir.path());
    let _ = sipp.kill();
    let _ = sipp.wait();
    assert!(!ok, "{output}");
    assert!(output.contains("failed: SIP 403"), "{output}");
}

#[test]
fn patchbay_call_plays_a_file_into_the_echo_flow_and_records_it_coming_back() {
    let pb = patchbay_e2e::start_patchbay();
    let dir = tempfile::tempdir().expect("tempdir");
    let prompt = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtime/patchbay/prompts/welcome.wav");
    let recording = dir.path().join("heard.wav");
    let uri = format!("sip:echo@127.0.0.1:{}", pb.port);
    let (prompt_arg, recording_arg) = (prompt.to_string_lossy(), recording.to_string_lossy());
    let (ok, text) = patchbay_e2e::patchbay_call(
        dir.path(),
        &[uri.as_str(), "--hangup-after", "3.5", "--play", &prompt_arg, "--record", &recording_arg],
    );
    assert!(ok, "{text}");
    let sent = patchbay_e2e::wav_samples(&std::fs::read(&prompt).expect("prompt"));
    let heard = patchbay_e2e::wav_samples(&std::fs::read(&recording).expect("recording"));
    // The echo is octet-exact in μ-law: a stretch of the prompt is found verbatim in what came
    // back, and from there the whole prompt lines up.
    let heard = patchbay_e2e::fraction_heard(&sent, &heard).unwrap_or_else(|| panic!("prompt not heard: {text}"));
    assert!(heard >= 0.95, "only {:.1} % of the prompt came back intact", heard * 100.0);
}
