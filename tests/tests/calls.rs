//! Calls end to end through the stock flows: voicemail stores what the caller said, the DTMF
//! router dials and bridges, a flow that traps mid-call ends only its own call, and every call
//! leaves exactly one CDR saying how it ended. The phone is `patchbay call` (our test caller on
//! the same SIP and media stack) or sipp.

use std::path::{Path, PathBuf};
use std::time::Duration;

use patchbay_e2e::{fraction_heard, patchbay_call as call, start_patchbay_with, wav_samples, write_ulaw_wav};

fn prompt(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtime/patchbay/prompts").join(name)
}

/// A μ-law WAV of `silence_s` seconds of silence followed by a stock prompt's audio, so the
/// prompt's octets cross the call unchanged (the caller sends PCMU).
fn delayed_speech(dir: &Path, silence_s: f64, name: &str) -> (PathBuf, Vec<i16>) {
    let bytes = std::fs::read(prompt(name)).expect("stock prompt");
    let data = bytes.windows(4).position(|w| w == b"data").expect("data chunk") + 8;
    let mut octets = vec![0xFFu8; (silence_s * 8_000.0) as usize];
    octets.extend_from_slice(&bytes[data..]);
    let path = dir.join(format!("delayed-{name}"));
    write_ulaw_wav(&path, &octets);
    (path, wav_samples(&bytes))
}

#[test]
fn voicemail_stores_what_the_caller_said_with_its_metadata_and_cdr() {
    let pb = start_patchbay_with("", "[[tenant.flow]]\nname = \"voicemail\"\nstock = \"voicemail\"\n");
    let dir = tempfile::tempdir().expect("tempdir");
    // The greeting (4.6 s) and the beep come first; speak after 6 s, then press #.
    let (speech, said) = delayed_speech(dir.path(), 6.0, "welcome.wav");
    let uri = format!("sip:voicemail@127.0.0.1:{}", pb.port);
    let speech = speech.to_string_lossy().into_owned();
    let (ok, text) = call(dir.path(), &[&uri, "--play", &speech, "--dtmf", "#", "--hangup-after", "20"]);
    assert!(ok && text.contains("the callee hung up"), "voicemail should hang up after the message: {text}");

    let recordings = pb.dir.path().join("storage/test/recordings");
    let mut files: Vec<_> = std::fs::read_dir(&recordings)
        .unwrap_or_else(|e| panic!("{}: {e}\n{text}", recordings.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 2, "one WAV and its JSON: {files:?}");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files[0]).expect("metadata")).expect("metadata is JSON");
    assert_eq!(meta["ended_by"], "terminator", "{meta}");
    assert_eq!(meta["tenant"], "test");
    let heard = wav_samples(&std::fs::read(&files[1]).expect("recording"));
    let fraction =
        fraction_heard(&said, &heard).unwrap_or_else(|| panic!("the speech is not in the recording: {meta}"));
    assert!(fraction >= 0.95, "only {:.1} % of the speech was recorded intact", fraction * 100.0);

    let cdrs = pb.wait_for_cdrs(1, Duration::from_secs(5));
    assert_eq!(cdrs.len(), 1, "{cdrs:?}");
    let cdr = &cdrs[0];
    assert_eq!(cdr["flow"], "voicemail");
    assert_eq!(cdr["vars"]["voicemail.recording"], meta["id"], "{cdr}");
    assert_eq!(cdr["end_cause"], "flow-hangup", "{cdr}");
    assert_eq!(cdr["hung_up_by"], "flow", "{cdr}");
    assert_eq!(cdr["sip_code"], 200);
    assert!(cdr["billable_secs"].as_u64().is_some_and(|s| s >= 8), "{cdr}");
}

#[test]
fn the_router_dials_an_extension_and_bridges_the_audio_both_ways() {
    // Extension 1000 dials the echo flow on this same Patchbay: the caller's audio crosses the
    // bridge, the echo, and the bridge again.
    let flows = "[[tenant.flow]]\nname = \"router\"\nstock = \"router\"\n\
                 [tenant.flow.vars]\n\"router.ext.1000\" = \"sip:echo@127.0.0.1:{port}\"\n\
                 [[tenant.flow]]\nname = \"echo\"\nstock = \"echo\"\n";
    let pb = start_patchbay_with("", flows);
    let dir = tempfile::tempdir().expect("tempdir");
    let (speech, said) = delayed_speech(dir.path(), 3.0, "welcome.wav");
    let recording = dir.path().join("heard.wav");
    let uri = format!("sip:router@127.0.0.1:{}", pb.port);
    let (ok, text) = call(
        dir.path(),
        &[
            &uri,
            "--play",
            &speech.to_string_lossy(),
            "--dtmf",
            "1000",
            "--dtmf-after",
            "0.5",
            "--record",
            &recording.to_string_lossy(),
            "--hangup-after",
            "7",
        ],
    );
    assert!(ok, "{text}");
    let heard = wav_samples(&std::fs::read(&recording).expect("recording"));
    let fraction =
        fraction_heard(&said, &heard).unwrap_or_else(|| panic!("nothing came back through the bridge: {text}"));
    eprintln!("{:.1} % of the speech came back intact through two bridges and the echo", fraction * 100.0);
    // Four jitter buffers and two bridges on a loaded 2-core VM: a stall can cost a few frames.
    assert!(fraction >= 0.90, "only {:.1} % came back intact through two bridges", fraction * 100.0);

    let cdrs = pb.wait_for_cdrs(3, Duration::from_secs(5));
    assert_eq!(cdrs.len(), 3, "the router's call, its outbound leg and the echo's call: {cdrs:?}");
    let router = cdrs.iter().find(|c| c["flow"] == "router" && c["direction"] == "inbound").expect("router CDR");
    let leg = cdrs.iter().find(|c| c["direction"] == "outbound").expect("the leg's CDR");
    let echo = cdrs.iter().find(|c| c["flow"] == "echo").expect("echo CDR");
    assert_eq!(leg["parent_call_id"], router["call_id"], "{leg}");
    assert_eq!(leg["flow"], "router", "a leg is billed to the flow that placed it: {leg}");
    assert_eq!(leg["to"], format!("sip:echo@127.0.0.1:{}", pb.port), "{leg}");
    assert_eq!(leg["flow_outcome"], "outbound-leg", "{leg}");
    assert_eq!(leg["hung_up_by"], "caller", "the caller left, so Patchbay hung up the leg: {leg}");
    assert_eq!(leg["sip_code"], 200, "{leg}");
    assert!(leg["billable_ms"].as_u64().is_some_and(|ms| ms > 2_000), "{leg}");
    assert_eq!(echo["call_id"], leg["call_id"], "the echo's inbound call is the leg itself");
    assert_eq!(router["vars"]["router.extension"], "1000", "{router}");
    assert_eq!(router["vars"]["router.outcome"], "answered:caller", "{router}");
    assert_eq!(router["hung_up_by"], "caller", "{router}");
    // The router's leg was hung up by Patchbay when the caller left: the echo saw a BYE.
    assert_eq!(echo["hung_up_by"], "caller", "{echo}");
}

/// Toll fraud, the other way round: the router's default route takes digits from the caller,
/// but the tenant's `[tenant.allow] dial` does not list where they lead. The flow's `dial`
/// fails with `not-allowed` naming the rule, no INVITE goes out, and the CDR says so. The
/// router's own extension (one of the tenant's flows on this host) needs no entry.
#[test]
fn a_dial_the_tenant_does_not_allow_is_refused_and_no_invite_goes_out() {
    let elsewhere = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let elsewhere_port = elsewhere.local_addr().expect("address").port();
    elsewhere.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let flows = format!(
        "[[tenant.flow]]\nname = \"router\"\nstock = \"router\"\n\
         [tenant.flow.vars]\n\"router.default\" = \"sip:{{ext}}@127.0.0.1:{elsewhere_port}\"\n\
         [tenant.allow]\ndial = [\"sip:*@192.0.2.1\"]\n"
    );
    let pb = start_patchbay_with("", &flows);
    let dir = tempfile::tempdir().expect("tempdir");
    let uri = format!("sip:router@127.0.0.1:{}", pb.port);
    let _ = call(dir.path(), &[&uri, "--dtmf", "0011", "--dtmf-after", "0.5", "--hangup-after", "5"]);

    let cdrs = pb.settled_cdrs(1, Duration::from_secs(5));
    assert_eq!(cdrs.len(), 1, "the router's call only, no leg: {cdrs:?}");
    let router = &cdrs[0];
    let target = format!("sip:0011@127.0.0.1:{elsewhere_port}");
    assert_eq!(router["vars"]["router.target"], target, "{router}");
    assert_eq!(router["flow_outcome"], "flow-error", "{router}");
    let detail = router["flow_detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("NotAllowed")
            && detail.contains(&format!("dial target {target} is not in tenant test's allow.dial")),
        "the CDR names the rule: {router}"
    );
    let mut buf = [0u8; 2048];
    assert!(elsewhere.recv(&mut buf).is_err(), "no INVITE may reach the refused target");
}

#[test]
fn a_flow_that_traps_mid_call_ends_only_its_call_with_a_cdr_saying_why() {
    let flows = "[[tenant.flow]]\nname = \"echo\"\nstock = \"echo\"\n\
                 [[tenant.flow]]\nname = \"trap-later\"\npath = \"chaos.wasm\"\n";
    let pb = start_patchbay_with("", flows);
    let dir = tempfile::tempdir().expect("tempdir");
    let echo_dir = dir.path().to_owned();
    let port = pb.port;
    let echo =
        std::thread::spawn(move || call(&echo_dir, &[&format!("sip:echo@127.0.0.1:{port}"), "--hangup-after", "4"]));
    std::thread::sleep(Duration::from_millis(300));
    let (_, trapped) = call(dir.path(), &[&format!("sip:trap-later@127.0.0.1:{port}"), "--hangup-after", "10"]);
    assert!(trapped.contains("the callee hung up"), "the trapped flow's call should be hung up by Patchbay: {trapped}");
    let (echo_ok, echo_text) = echo.join().expect("echo caller");
    assert!(echo_ok && echo_text.contains("we hung up"), "the other call must go on: {echo_text}");

    let cdrs = pb.wait_for_cdrs(2, Duration::from_secs(5));
    assert_eq!(cdrs.len(), 2, "{cdrs:?}");
    let trap = cdrs.iter().find(|c| c["flow"] == "trap-later").expect("trap CDR");
    assert_eq!(trap["flow_outcome"], "flow-trap", "{trap}");
    assert_eq!(trap["end_cause"], "flow-trap", "{trap}");
    assert_eq!(trap["hung_up_by"], "flow", "{trap}");
    assert!(trap["flow_detail"].as_str().is_some_and(|d| !d.is_empty()), "{trap}");
    let echo = cdrs.iter().find(|c| c["flow"] == "echo").expect("echo CDR");
    assert_eq!(echo["end_cause"], "caller-hangup", "{echo}");
    assert_eq!(echo["flow_outcome"], "flow-completed", "{echo}");
}

#[test]
fn a_call_to_an_extension_the_tenant_lacks_is_refused_with_a_cdr() {
    let pb = start_patchbay_with("", "[[tenant.flow]]\nname = \"echo\"\nstock = \"echo\"\n");
    let dir = tempfile::tempdir().expect("tempdir");
    let (ok, text) = call(dir.path(), &[&format!("sip:nosuch@127.0.0.1:{}", pb.port), "--hangup-after", "2"]);
    assert!(!ok && text.contains("404"), "{text}");
    let cdrs = pb.settled_cdrs(1, Duration::from_secs(5));
    assert_eq!(cdrs.len(), 1, "{cdrs:?}");
    let cdr = &cdrs[0];
    assert_eq!(cdr["end_cause"], "no-route", "{cdr}");
    assert_eq!(cdr["sip_code"], 404, "{cdr}");
    assert_eq!(cdr["flow"], "nosuch", "{cdr}");
    assert_eq!(cdr["tenant"], "test", "{cdr}");
    assert_eq!(cdr["flow_outcome"], "not-run", "{cdr}");
    assert_eq!(cdr["hung_up_by"], "patchbay", "{cdr}");
    assert!(cdr["answer"].is_null() && cdr["billable_ms"] == 0, "{cdr}");
}

/// Sends one INVITE over UDP with `sdp` to `sip:echo@…` and returns Patchbay's final response
/// (no ACK: the test ends before the retransmissions matter).
fn invite_with(port: u16, sdp: &str) -> String {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let local = socket.local_addr().expect("addr");
    let invite = format!(
        "INVITE sip:echo@127.0.0.1:{port} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK{n};rport\r\n\
         From: <sip:a@{local}>;tag={n}\r\nTo: <sip:echo@127.0.0.1>\r\nCall-ID: {n}@srtp\r\nCSeq: 1 INVITE\r\n\
         Contact: <sip:a@{local}>\r\nMax-Forwards: 70\r\nContent-Type: application/sdp\r\n\
         Content-Length: {len}\r\n\r\n{sdp}",
        n = local.port(),
        len = sdp.len(),
    );
    socket.send_to(invite.as_bytes(), ("127.0.0.1", port)).expect("send");
    let mut buf = [0u8; 8192];
    loop {
        let (n, _) = socket.recv_from(&mut buf).expect("a final response within 5 s");
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if text.starts_with("SIP/2.0") && !text.starts_with("SIP/2.0 1") {
            return text;
        }
    }
}

/// RFC 4568 §8.3: SDES keys travel in the SDP, so over plain UDP they are not exchanged unless
/// `[media] srtp_over_plain` says so: an SRTP-only offer gets 488, a best-effort one plain RTP.
#[test]
fn srtp_keys_are_not_exchanged_over_plain_signalling_by_default() {
    let crypto = "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz\r\n";
    let offer = |profile: &str| {
        format!(
            "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
             m=audio 40000 {profile} 0\r\na=rtpmap:0 PCMU/8000\r\n{crypto}"
        )
    };
    let pb = start_patchbay_with("", "[[tenant.flow]]\nname = \"echo\"\nstock = \"echo\"\n");
    let savp = invite_with(pb.port, &offer("RTP/SAVP"));
    assert!(savp.starts_with("SIP/2.0 488"), "an SRTP-only offer over UDP: {savp}");
    let avp = invite_with(pb.port, &offer("RTP/AVP"));
    assert!(avp.starts_with("SIP/2.0 200"), "{avp}");
    assert!(!avp.contains("a=crypto") && avp.contains("RTP/AVP"), "keys sent over UDP: {avp}");
    // Allowed explicitly, the same offer gets SRTP and our key.
    let pb = start_patchbay_with(
        "[media]\nsrtp_over_plain = true\n",
        "[[tenant.flow]]\nname = \"echo\"\nstock = \"echo\"\n",
    );
    let avp = invite_with(pb.port, &offer("RTP/AVP"));
    assert!(avp.starts_with("SIP/2.0 200") && avp.contains("a=crypto:1 AES_CM_128_HMAC_SHA1_80"), "{avp}");
}
