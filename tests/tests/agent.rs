//! The headline call: a caller reaches the IVR menu, presses 2, talks to an AI agent
//! over a websocket (Twilio Media Streams; here the in-repo scripted agent), the agent speaks,
//! is barged in on with `clear`, then asks for a transfer — and the call arrives at a sipp UAS
//! playing the human.

use std::process::{Command, Stdio};
use std::time::Duration;

use patchbay_agent::server::{Observed, ScriptStep, ScriptedAgent, tone_ulaw};
use patchbay_e2e::{allow, free_port, patchbay_call, start_patchbay_with, wav_samples};

/// 20 ms frames of `samples` in which `hz` carries most of the frame's energy (Goertzel).
fn frames_with_tone(samples: &[i16], hz: f64) -> usize {
    samples
        .chunks_exact(160)
        .filter(|frame| {
            let w = 2.0 * std::f64::consts::PI * hz / 8_000.0;
            let (mut s1, mut s2) = (0.0f64, 0.0f64);
            for &x in *frame {
                let s = f64::from(x) + 2.0 * w.cos() * s1 - s2;
                s2 = s1;
                s1 = s;
            }
            let power = s1 * s1 + s2 * s2 - 2.0 * w.cos() * s1 * s2;
            let energy: f64 = frame.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
            // A pure tone puts energy · N / 2 into its bin.
            energy > 1e5 && power > 0.5 * energy * 160.0 / 2.0
        })
        .count()
}

#[test]
fn menu_then_agent_with_barge_in_then_transfer_to_a_human_over_sip() {
    menu_agent_transfer("stock = \"menu\"");
}

/// The same call through the Python twin of the menu (componentize-py).
#[test]
fn the_python_menu_passes_the_same_test() {
    let component = patchbay_e2e::python_menu_component();
    menu_agent_transfer(&format!("path = \"{}\"", component.display()));
}

/// Caller → menu (the flow `source` gives) → 2 → scripted agent → clear → transfer → sipp UAS.
fn menu_agent_transfer(source: &str) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("tokio");
    let human_port = free_port();
    let script = vec![
        ScriptStep::WaitForMedia(10),
        // One second of 1 kHz, marked: Patchbay echoes the mark once it has played.
        ScriptStep::SendAudio(tone_ulaw(1_000.0, 1_000, 8_000), 100),
        ScriptStep::Mark("first".into()),
        ScriptStep::WaitForMark("first".into()),
        // Five seconds of 600 Hz sent at once, then a barge-in half a second later.
        ScriptStep::SendAudio(tone_ulaw(600.0, 5_000, 8_000), 0),
        ScriptStep::Mark("long".into()),
        ScriptStep::WaitMs(500),
        ScriptStep::Clear,
        ScriptStep::WaitForMark("long".into()),
        ScriptStep::Transfer(format!("sip:human@127.0.0.1:{human_port}")),
        ScriptStep::WaitMs(2_000),
    ];
    let (agent, mut observed) = ScriptedAgent::new(script);
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind the agent");
    let agent_port = listener.local_addr().expect("agent address").port();
    runtime.spawn(agent.serve(listener));

    let flows = format!(
        "[[tenant.flow]]\nname = \"menu\"\n{source}\n[tenant.flow.vars]\n\
         \"menu.2\" = \"agent:ws://127.0.0.1:{agent_port}/agent\"\n\
         \"menu.transfer-targets\" = \"sip:human@127.0.0.1:{human_port}\"\n{}",
        allow(&[&format!("sip:human@127.0.0.1:{human_port}")], &[&format!("ws://127.0.0.1:{agent_port}")])
    );
    let pb = start_patchbay_with("", &flows);
    let sipp_dir = tempfile::tempdir().expect("tempdir");
    let human = human(human_port, sipp_dir.path());

    let dir = tempfile::tempdir().expect("tempdir");
    let recording = dir.path().join("heard.wav");
    let uri = format!("sip:menu@127.0.0.1:{}", pb.port);
    let recording_arg = recording.to_string_lossy();
    let (ok, text) = patchbay_call(
        dir.path(),
        &[uri.as_str(), "--dtmf", "2", "--dtmf-after", "1", "--hangup-after", "9", "--record", &recording_arg],
    );
    assert!(ok, "{text}");
    let human = human.wait_with_output().expect("sipp UAS");
    assert!(
        human.status.success(),
        "the transferred call should reach the human (sipp UAS) and end cleanly: {}\n{text}",
        String::from_utf8_lossy(&human.stderr)
    );

    // What the agent saw, in order.
    let mut events = Vec::new();
    while let Ok(seen) = observed.try_recv() {
        if let Observed::Received { json, .. } = seen {
            events.push(json);
        }
    }
    let names: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(names.first(), Some(&"connected"), "{names:?}");
    let start = events.iter().find(|e| e["event"] == "start").expect("a start message");
    assert_eq!(start["start"]["mediaFormat"]["encoding"], "audio/x-mulaw", "{start}");
    assert_eq!(start["start"]["mediaFormat"]["sampleRate"], 8000, "{start}");
    assert!(names.iter().filter(|n| **n == "media").count() >= 50, "the caller's audio streams to the agent");
    let marks: Vec<&str> =
        events.iter().filter(|e| e["event"] == "mark").filter_map(|e| e["mark"]["name"].as_str()).collect();
    assert_eq!(marks, ["first", "long"], "each mark echoed once: after it played, or when cleared");
    assert_eq!(names.last(), Some(&"stop"), "Patchbay stops the stream after the transfer request: {names:?}");

    // What the caller heard: the whole first second, and only about half a second of the five
    // second utterance the barge-in cleared.
    let heard = wav_samples(&std::fs::read(&recording).expect("recording"));
    let first = frames_with_tone(&heard, 1_000.0);
    let long = frames_with_tone(&heard, 600.0);
    eprintln!("caller heard {first} frames of the first utterance and {long} of the cleared one");
    assert!((45..=52).contains(&first), "1 s of agent audio should be heard whole: {first} frames");
    assert!((10..=60).contains(&long), "clear should cut the 5 s utterance after ~0.5 s: {long} frames");

    let cdrs = pb.wait_for_cdrs(2, Duration::from_secs(5));
    let menu = cdrs
        .iter()
        .find(|c| c["flow"] == "menu" && c["direction"] == "inbound")
        .unwrap_or_else(|| panic!("menu CDR: {cdrs:?}"));
    assert_eq!(menu["vars"]["menu.path"], "main:2", "{menu}");
    assert_eq!(menu["hung_up_by"], "caller", "{menu}");
    // The transfer went out as a leg of the menu's call (the caller does not take REFER).
    let leg = cdrs.iter().find(|c| c["direction"] == "outbound").unwrap_or_else(|| panic!("leg CDR: {cdrs:?}"));
    assert_eq!(leg["parent_call_id"], menu["call_id"], "{leg}");
    assert_eq!(leg["to"], format!("sip:human@127.0.0.1:{human_port}"), "{leg}");
    assert_eq!(leg["sip_code"], 200, "{leg}");
}

/// Runs a sipp UAS (the "human") on `port` for one call.
fn human(port: u16, dir: &std::path::Path) -> std::process::Child {
    Command::new("sipp")
        .current_dir(dir)
        .args(["-sn", "uas", "-i", "127.0.0.1", "-p", &port.to_string(), "-m", "1"])
        .args(["-timeout", "60", "-timeout_error", "-nostdin", "-trace_err"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sipp (Debian package sip-tester)")
}

/// The README's path: the menu, key 2, and the built-in demo agent, which greets and then
/// repeats what the caller said.
#[test]
fn the_demo_agent_greets_and_repeats_what_the_caller_says() {
    let agent_port = free_port();
    let extra = format!("[demo_agent]\nlisten = \"127.0.0.1:{agent_port}\"\n");
    let flows = format!(
        "[[tenant.flow]]\nname = \"menu\"\nstock = \"menu\"\n[tenant.flow.vars]\n\
         \"menu.2\" = \"agent:ws://127.0.0.1:{agent_port}/agent\"\n{}",
        allow(&[], &[&format!("ws://127.0.0.1:{agent_port}")])
    );
    let pb = start_patchbay_with(&extra, &flows);
    let dir = tempfile::tempdir().expect("tempdir");
    // Key 2 at 1 s; the greeting lasts about 8 s; then one second of 800 Hz, then silence.
    let mut said = vec![0xFFu8; 11 * 8_000];
    said.extend(tone_ulaw(800.0, 1_000, 8_000));
    said.extend(vec![0xFFu8; 5 * 8_000]);
    let speech = dir.path().join("say.wav");
    patchbay_e2e::write_ulaw_wav(&speech, &said);
    let recording = dir.path().join("heard.wav");
    let uri = format!("sip:menu@127.0.0.1:{}", pb.port);
    let (speech, recording_arg) = (speech.to_string_lossy(), recording.to_string_lossy());
    let (ok, text) = patchbay_call(
        dir.path(),
        &[
            uri.as_str(),
            "--dtmf",
            "2",
            "--dtmf-after",
            "1",
            "--hangup-after",
            "16",
            "--play",
            &speech,
            "--record",
            &recording_arg,
        ],
    );
    assert!(ok, "{text}");
    let heard = wav_samples(&std::fs::read(&recording).expect("recording"));
    // The greeting is speech; the tone the caller made comes back only through the agent.
    let second = &heard[heard.len().min(10 * 8_000)..];
    let echoed = frames_with_tone(second, 800.0);
    eprintln!("the demo agent repeated {echoed} frames of the caller's tone");
    assert!(echoed >= 35, "the demo agent should repeat the 1 s tone: {echoed} frames heard\n{text}");
    let energetic = heard[heard.len().min(2 * 8_000)..heard.len().min(9 * 8_000)]
        .chunks_exact(160)
        .filter(|f| f.iter().any(|s| s.abs() > 2_000))
        .count();
    assert!(energetic >= 100, "the agent's greeting should be heard after key 2 cut the menu: {energetic} loud frames");
}

/// The stock agent-handoff flow talking to the agent on `agent_port`, with the human on
/// `human_port` as its fallback, and a tenant that allows both.
fn handoff_flow(agent_port: u16, human_port: u16, transfer_targets: &str) -> String {
    format!(
        "[[tenant.flow]]\nname = \"agent\"\nstock = \"agent\"\n[tenant.flow.vars]\n\
         \"agent.url\" = \"ws://127.0.0.1:{agent_port}/agent\"\n\
         \"agent.fallback\" = \"sip:human@127.0.0.1:{human_port}\"\n\
         \"agent.transfer-targets\" = \"{transfer_targets}\"\n{}",
        allow(&[&format!("sip:human@127.0.0.1:{human_port}")], &[&format!("ws://127.0.0.1:{agent_port}")])
    )
}

/// Calls the agent-handoff flow (agent at `agent_port`, human fallback at `human_port`) for 9 s
/// and returns the records of the call and its leg once the human (a sipp UAS) took the call.
fn call_the_handoff_flow(agent_port: u16, human_port: u16, transfer_targets: &str) -> Vec<serde_json::Value> {
    let pb = start_patchbay_with("", &handoff_flow(agent_port, human_port, transfer_targets));
    let sipp_dir = tempfile::tempdir().expect("tempdir");
    let human = human(human_port, sipp_dir.path());
    let dir = tempfile::tempdir().expect("tempdir");
    let (ok, text) = patchbay_call(dir.path(), &[&format!("sip:agent@127.0.0.1:{}", pb.port), "--hangup-after", "9"]);
    assert!(ok, "{text}");
    let human = human.wait_with_output().expect("sipp UAS");
    assert!(
        human.status.success(),
        "the human fallback should get the call: {}",
        String::from_utf8_lossy(&human.stderr)
    );
    pb.wait_for_cdrs(2, Duration::from_secs(5))
}

/// agent-handoff: the agent cannot be reached, so the caller hears the fallback prompt and is
/// bridged to a human over SIP.
#[test]
fn agent_handoff_falls_back_to_a_human_when_the_agent_is_unreachable() {
    let human_port = free_port();
    let dead_agent = free_port();
    let cdrs = call_the_handoff_flow(dead_agent, human_port, "");
    let call = cdrs.iter().find(|c| c["direction"] == "inbound").unwrap_or_else(|| panic!("{cdrs:?}"));
    assert_eq!(call["vars"]["agent.end"], "unavailable", "{call}");
    let leg = cdrs.iter().find(|c| c["direction"] == "outbound").unwrap_or_else(|| panic!("{cdrs:?}"));
    assert_eq!(leg["to"], format!("sip:human@127.0.0.1:{human_port}"), "{leg}");
    assert_eq!(leg["sip_code"], 200, "{leg}");
}

/// agent-handoff: the agent asks to transfer the caller somewhere the tenant does not allow
/// (`[tenant.allow] dial`). The host refuses it (`not-allowed`, naming the rule), nothing is
/// sent there, and the flow hands the caller to its human fallback instead.
#[test]
fn agent_handoff_does_not_transfer_where_the_tenant_does_not_allow() {
    agent_transfer_refused(true);
}

/// What an agent asks for is network data: the flow follows a transfer only to a target its
/// `agent.transfer-targets` lists, whatever the tenant would allow (toll fraud through an agent
/// talked into "transfer me to +1 900 …").
#[test]
fn agent_handoff_does_not_follow_an_agents_transfer_to_a_target_it_does_not_list() {
    agent_transfer_refused(false);
}

/// The agent asks to transfer the caller somewhere; with `listed`, the flow lists it (and the
/// tenant's `allow.dial` refuses it), else the flow itself refuses. Either way nothing is sent
/// there and the caller goes to the human fallback.
fn agent_transfer_refused(listed: bool) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("tokio");
    let human_port = free_port();
    // Where the agent asks to send the caller: a socket that must hear nothing.
    let elsewhere = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let elsewhere_port = elsewhere.local_addr().expect("address").port();
    elsewhere.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let refused_target = format!("sip:+882123456@127.0.0.1:{elsewhere_port}");
    let script =
        vec![ScriptStep::WaitForMedia(10), ScriptStep::Transfer(refused_target.clone()), ScriptStep::WaitMs(2_000)];
    let (agent, _observed) = ScriptedAgent::new(script);
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind the agent");
    let agent_port = listener.local_addr().expect("agent address").port();
    runtime.spawn(agent.serve(listener));
    let cdrs = call_the_handoff_flow(agent_port, human_port, if listed { &refused_target } else { "" });
    let call = cdrs.iter().find(|c| c["direction"] == "inbound").unwrap_or_else(|| panic!("{cdrs:?}"));
    assert_eq!(call["vars"]["agent.end"], format!("transfer-requested:{refused_target}"), "{call}");
    let why = call["vars"]["agent.transfer-refused"].as_str().unwrap_or_default();
    let rule = if listed {
        format!("transfer target {refused_target} is not in tenant test's allow.dial")
    } else {
        "not in agent.transfer-targets".to_owned()
    };
    assert!(why.contains(&rule), "the refusal names the rule ({rule}): {call}");
    let legs: Vec<_> = cdrs.iter().filter(|c| c["direction"] == "outbound").collect();
    assert_eq!(legs.len(), 1, "one leg, to the human: {cdrs:?}");
    assert_eq!(legs[0]["to"], format!("sip:human@127.0.0.1:{human_port}"), "{}", legs[0]);
    let mut buf = [0u8; 2048];
    assert!(elsewhere.recv(&mut buf).is_err(), "nothing may be sent to the refused target");
}
