//! The clock-driven link ([`patchbay_agent::ClockLink`]) against the agent servers of
//! `patchbay_agent::server` and a raw websocket peer, over real sockets on 127.0.0.1. The
//! test plays the media clock: it polls the link as the clock would, a few ms apart.

use std::time::{Duration, Instant};

use patchbay_agent::server::{Observed, ScriptStep};
use patchbay_agent::{AgentError, AgentEvent, ClockLink, ConnectOptions, FRAME_BYTES, ULAW_SILENCE, connect_link};
use serde_json::json;
use tokio::net::TcpListener;

mod common;
use common::{WAIT, observe, received_json, scripted, start_info};

fn options() -> ConnectOptions {
    ConnectOptions::new(Duration::from_secs(2))
}

/// Polls the link as the media clock does (every 5 ms) until `last` accepts an event; returns
/// the events up to and including that one.
async fn poll_until(link: &mut ClockLink, last: impl Fn(&AgentEvent) -> bool) -> Vec<AgentEvent> {
    let deadline = Instant::now() + WAIT;
    let mut events = Vec::new();
    loop {
        while let Some(event) = link.poll(Instant::now()) {
            let done = last(&event);
            events.push(event);
            if done {
                return events;
            }
        }
        assert!(Instant::now() < deadline, "no matching event in time; got {events:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_clock_link_speaks_the_protocol_of_the_task_driven_stream() {
    let (url, mut observed) = scripted(vec![
        ScriptStep::WaitForMedia(1),
        ScriptStep::SendAudio(vec![5; 100], 0),
        ScriptStep::Transfer("sip:bob@example.com".into()),
        ScriptStep::Hangup,
    ])
    .await;
    let mut link = connect_link(&url, &start_info(), &options()).await.expect("connect");
    assert_eq!(
        received_json(&mut observed).await,
        json!({"event": "connected", "protocol": "Call", "version": "1.0.0"})
    );
    let start = received_json(&mut observed).await;
    assert_eq!((start["event"].as_str(), start["sequenceNumber"].as_str()), (Some("start"), Some("1")));
    assert_eq!(start["start"]["customParameters"], json!({"tenant": "acme", "lang": "en-GB"}));

    let now = Instant::now();
    link.send_media(&[0xFF; 160], now).expect("media");
    link.send_media(&[0x7F; 160], now).expect("media");
    link.send_dtmf('5', now).expect("dtmf");
    link.send_mark("greeting", now).expect("mark");
    let media = received_json(&mut observed).await;
    assert_eq!(media["sequenceNumber"], "2");
    assert_eq!((media["media"]["chunk"].as_str(), media["media"]["timestamp"].as_str()), (Some("1"), Some("0")));
    assert_eq!(media["media"]["payload"], "/".repeat(213) + "w==");
    let media = received_json(&mut observed).await;
    assert_eq!((media["media"]["chunk"].as_str(), media["media"]["timestamp"].as_str()), (Some("2"), Some("20")));
    assert_eq!(
        received_json(&mut observed).await,
        json!({"event": "dtmf", "streamSid": "MZstream1", "sequenceNumber": "4",
               "dtmf": {"track": "inbound_track", "digit": "5"}})
    );
    assert_eq!(
        received_json(&mut observed).await,
        json!({"event": "mark", "sequenceNumber": "5", "streamSid": "MZstream1", "mark": {"name": "greeting"}})
    );
    assert!(matches!(link.send_dtmf('x', now), Err(AgentError::InvalidDigit('X'))));
    assert!(matches!(link.send_media(&[], now), Err(AgentError::InvalidFrame { len: 0, .. })));

    // The agent's answers, re-cut and in order, as the task-driven stream gives them.
    let events = poll_until(&mut link, |e| *e == AgentEvent::Hangup).await;
    let mut padded = [ULAW_SILENCE; FRAME_BYTES];
    padded[..100].fill(5);
    assert_eq!(
        events,
        [AgentEvent::Audio(padded), AgentEvent::Transfer("sip:bob@example.com".into()), AgentEvent::Hangup]
    );

    link.stop().await;
    assert_eq!(
        received_json(&mut observed).await,
        json!({"event": "stop", "sequenceNumber": "6", "streamSid": "MZstream1",
               "stop": {"accountSid": "ACtenant1", "callSid": "CAcall1"}})
    );
    assert!(matches!(observe(&mut observed).await, Observed::Disconnected { clean: true, .. }));
}

#[tokio::test]
async fn a_clear_drops_the_carried_audio_and_the_agents_close_ends_the_link() {
    let (url, mut observed) = scripted(vec![
        ScriptStep::SendAudio(vec![5; 100], 0),
        ScriptStep::Clear,
        ScriptStep::SendAudio(vec![7; 160], 0),
        ScriptStep::Mark("m".into()),
        ScriptStep::Close,
    ])
    .await;
    let mut link = connect_link(&url, &start_info(), &options()).await.expect("connect");
    let events = poll_until(&mut link, |e| *e == AgentEvent::Closed).await;
    assert_eq!(
        events,
        [AgentEvent::Clear, AgentEvent::Audio([7; 160]), AgentEvent::Mark("m".into()), AgentEvent::Closed]
    );
    // Terminal: polled again, the answer stays, and nothing more can be sent.
    assert_eq!(link.poll(Instant::now()), Some(AgentEvent::Closed));
    assert!(matches!(link.send_media(&[0; 160], Instant::now()), Err(AgentError::Closed)));
    // The agent's session ends (the scripted agent reports its own close as clean whatever the
    // client does, so there is nothing more to check on its side).
    while !matches!(observe(&mut observed).await, Observed::Disconnected { .. }) {}
}

#[tokio::test]
async fn an_agent_that_vanishes_fails_the_link() {
    let (url, _observed) = scripted(vec![ScriptStep::WaitMs(50), ScriptStep::Abort]).await;
    let mut link = connect_link(&url, &start_info(), &options()).await.expect("connect");
    let events = poll_until(&mut link, |e| matches!(e, AgentEvent::Failed(_))).await;
    assert!(matches!(events.as_slice(), [AgentEvent::Failed(reason)] if !reason.is_empty()), "{events:?}");
    assert!(matches!(link.send_media(&[0; 160], Instant::now()), Err(AgentError::Closed)));
}

#[tokio::test]
async fn an_agent_that_stops_reading_costs_caller_frames_never_a_blocked_clock() {
    // A websocket peer that completes the upgrade and then reads nothing.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("ws://{}/agent", listener.local_addr().expect("addr"));
    let (hold, mut held) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let ws = tokio_tungstenite::accept_async(tcp).await.expect("upgrade");
        let _ = (&mut held).await;
        drop(ws);
    });
    let options = options().with_media_queue(8);
    let mut link = connect_link(&url, &start_info(), &options).await.expect("connect");
    // Far more than the socket buffers on both sides hold (each message is ~330 bytes): every
    // call returns at once (a blocking write would hang the test), and the frames beyond the
    // queue are dropped and counted once the socket is full.
    let frames = 100_000;
    let started = Instant::now();
    for _ in 0..frames {
        link.send_media(&[0x55; 160], Instant::now()).expect("media");
    }
    let dropped = link.dropped_media_frames();
    assert!(dropped > 0, "nothing dropped: the writes must have blocked");
    assert!(started.elapsed() < WAIT, "took {:?}", started.elapsed());
    assert_eq!(link.poll(Instant::now()), None, "a stalled agent is not a failed one (yet)");
    drop(hold);
}

#[tokio::test]
async fn a_clock_link_is_for_ws_only_and_its_connect_errors_are_typed() {
    let start = start_info();
    match connect_link("wss://127.0.0.1:1/agent", &start, &options()).await {
        Err(AgentError::InvalidUrl { .. }) => {}
        other => panic!("expected InvalidUrl, got {other:?}"),
    }
    // Nothing listens on a port we just freed.
    let port = TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr").port();
    match connect_link(&format!("ws://127.0.0.1:{port}/agent"), &start, &options()).await {
        Err(AgentError::Connect { .. }) => {}
        other => panic!("expected Connect, got {other:?}"),
    }
    // A server that accepts and never answers the upgrade.
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("ws://{}/agent", silent.local_addr().expect("addr"));
    let quick = ConnectOptions::new(Duration::from_millis(200));
    match connect_link(&url, &start, &quick).await {
        Err(AgentError::Timeout(_)) => {}
        other => panic!("expected Timeout, got {other:?}"),
    }
    drop(silent);
}
