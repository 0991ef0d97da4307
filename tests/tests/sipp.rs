//! Interop with sipp (Debian `sip-tester`): the real `patchbay` binary as the callee.
//!
//! Each test starts its own Patchbay on a free port with a config serving `echo` and `menu`
//! (stock) and `ring` (the chaos fixture, which rings 30 s before answering), then runs one
//! sipp scenario against it. sipp's exit status is the verdict: 0 means every message of the
//! scenario arrived as written (wrong responses, missing BYEs or timeouts fail it).

use patchbay_e2e::{Patchbay, run_sipp, scenario, sipp_digest_call, start_challenging_patchbay, start_patchbay};

fn sipp(pb: &Patchbay, service: &str, scenario_args: &[&str], calls: u32, extra: &[&str]) -> (bool, String) {
    run_sipp(pb.port, service, scenario_args, calls, extra)
}

/// One call of the scenario file `xml` against a fresh Patchbay's `service`; it must succeed.
fn assert_scenario(service: &str, xml: &str) {
    let pb = start_patchbay();
    let (ok, log) = sipp(&pb, service, &["-sf", &scenario(xml)], 1, &[]);
    assert!(ok, "{log}");
}

#[test]
fn options_ping_gets_200() {
    assert_scenario("echo", "options.xml");
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
    // The menu flow answers, plays its prompt and waits for a key; sipp presses none, so after
    // its retries the flow ends the call with BYE (about 40 s).
    assert_scenario("menu", "uac_callee_hangs_up.xml");
}

#[test]
fn cancel_while_ringing_gets_487() {
    assert_scenario("ring", "uac_cancel.xml");
}

#[test]
fn calls_complete_under_10_percent_packet_loss() {
    // sipp drops 10% of the messages it sends and receives; retransmissions (Timer A on its
    // side, 2xx and 100 retransmission and absorption on ours) must carry every call through.
    let pb = start_patchbay();
    let (ok, log) = sipp(&pb, "echo", &["-sn", "uac"], 20, &["-d", "200", "-lost", "10"]);
    assert!(ok, "{log}");
}

#[test]
fn hold_and_resume_by_reinvite() {
    assert_scenario("echo", "uac_hold_resume.xml");
}

#[test]
fn digest_challenge_then_authorised_call() {
    let pb = start_challenging_patchbay();
    let (ok, log) = sipp_digest_call(&pb, "127.0.0.1", "s3cret");
    assert!(ok, "{log}");
}

#[test]
fn a_wrong_password_is_refused() {
    // The second INVITE carries credentials for the wrong password: it must get 403, which
    // sipp reports as an unexpected message.
    let pb = start_challenging_patchbay();
    let (ok, log) = sipp_digest_call(&pb, "127.0.0.1", "wrong");
    assert!(!ok, "a wrong password must not get the call through:\n{log}");
    assert!(log.contains("403 Forbidden"), "{log}");
    // One record, for the refusal; the 407 challenge before it writes none.
    let cdrs = pb.settled_cdrs(1, std::time::Duration::from_secs(5));
    assert_eq!(cdrs.len(), 1, "{cdrs:?}");
    assert_eq!(cdrs[0]["end_cause"], "auth-failed", "{}", cdrs[0]);
    assert_eq!(cdrs[0]["sip_code"], 403, "{}", cdrs[0]);
    assert_eq!(cdrs[0]["tenant"], "secure", "{}", cdrs[0]);
}

#[test]
fn blind_transfer_by_refer_and_notify() {
    assert_scenario("transfer", "uac_transferred.xml");
}
