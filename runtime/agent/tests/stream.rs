//! The client against the agent servers of `patchbay_agent::server`, over real sockets on
//! 127.0.0.1.

use std::sync::Arc;
use std::time::{Duration, Instant};

use patchbay_agent::server::{DemoAgent, DemoAgentConfig, EchoAgent, Observed, ScriptStep, ScriptedAgent, tone_ulaw};
use patchbay_agent::{
    AgentError, AgentEvent, AgentStream, ConnectOptions, FRAME_BYTES, Frame160, PatchbayMessage, ULAW_SILENCE, connect,
    connect_with,
};
use serde_json::json;

mod common;
use common::{WAIT, listener, observe, received_json, scripted, start_info};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

async fn open(url: &str) -> AgentStream {
    connect(url, &start_info(), None, CONNECT_TIMEOUT).await.expect("connect")
}

async fn next_event(stream: &mut AgentStream) -> AgentEvent {
    tokio::time::timeout(WAIT, stream.recv()).await.expect("agent event in time")
}

/// Events up to and including the first one `last` accepts.
async fn events_until(stream: &mut AgentStream, last: impl Fn(&AgentEvent) -> bool) -> Vec<AgentEvent> {
    let mut events = Vec::new();
    loop {
        let event = next_event(stream).await;
        let done = last(&event);
        events.push(event);
        if done {
            return events;
        }
    }
}

fn audio_frames(events: &[AgentEvent]) -> Vec<Frame160> {
    events
        .iter()
        .filter_map(|e| match e {
            AgentEvent::Audio(frame) => Some(*frame),
            _ => None,
        })
        .collect()
}

fn is_mark(name: &'static str) -> impl Fn(&AgentEvent) -> bool {
    move |e| matches!(e, AgentEvent::Mark(n) if n == name)
}

#[tokio::test]
async fn start_message_fields_and_increasing_sequence_numbers() {
    let (url, mut observed) = scripted(vec![]).await;
    let stream = open(&url).await;

    assert_eq!(
        received_json(&mut observed).await,
        json!({"event": "connected", "protocol": "Call", "version": "1.0.0"})
    );
    assert_eq!(
        received_json(&mut observed).await,
        json!({
            "event": "start",
            "sequenceNumber": "1",
            "start": {
                "accountSid": "ACtenant1",
                "streamSid": "MZstream1",
                "callSid": "CAcall1",
                "tracks": ["inbound"],
                "customParameters": {"tenant": "acme", "lang": "en-GB"},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
            },
            "streamSid": "MZstream1"
        })
    );

    // One message at a time, so the order on the wire is the order sent.
    stream.send_media(&[0xFF; 160]).expect("media");
    assert_eq!(
        received_json(&mut observed).await,
        json!({
            "event": "media",
            "sequenceNumber": "2",
            "media": {"track": "inbound", "chunk": "1", "timestamp": "0",
                      "payload": "/".repeat(213) + "w=="},
            "streamSid": "MZstream1"
        })
    );
    stream.send_media(&[0x7F; 160]).expect("media");
    let media = received_json(&mut observed).await;
    assert_eq!(media["sequenceNumber"], "3");
    assert_eq!(media["media"]["chunk"], "2");
    assert_eq!(media["media"]["timestamp"], "20");

    stream.send_dtmf('5').expect("dtmf");
    assert_eq!(
        received_json(&mut observed).await,
        json!({
            "event": "dtmf",
            "streamSid": "MZstream1",
            "sequenceNumber": "4",
            "dtmf": {"track": "inbound_track", "digit": "5"}
        })
    );
    stream.send_mark("greeting").expect("mark");
    assert_eq!(
        received_json(&mut observed).await,
        json!({
            "event": "mark",
            "sequenceNumber": "5",
            "streamSid": "MZstream1",
            "mark": {"name": "greeting"}
        })
    );
    assert!(matches!(stream.send_dtmf('x'), Err(AgentError::InvalidDigit('X'))));
    assert!(matches!(stream.send_media(&[]), Err(AgentError::InvalidFrame { len: 0, .. })));

    stream.stop().await;
    assert_eq!(
        received_json(&mut observed).await,
        json!({
            "event": "stop",
            "sequenceNumber": "6",
            "streamSid": "MZstream1",
            "stop": {"accountSid": "ACtenant1", "callSid": "CAcall1"}
        })
    );
    assert!(matches!(observe(&mut observed).await, Observed::Disconnected { clean: true, .. }));
}

#[tokio::test]
async fn sequence_numbers_increase_under_mixed_traffic() {
    let (url, mut observed) = scripted(vec![]).await;
    let stream = open(&url).await;
    for i in 0..20 {
        stream.send_media(&[i as u8; 160]).expect("media");
        if i % 5 == 0 {
            stream.send_dtmf('1').expect("dtmf");
            stream.send_mark("m").expect("mark");
        }
    }
    stream.stop().await;
    let mut sequence = Vec::new();
    let mut chunks = Vec::new();
    loop {
        match observe(&mut observed).await {
            Observed::Received { frame, .. } => {
                if let Some(n) = frame.sequence_number {
                    sequence.push(n);
                }
                if let PatchbayMessage::Media { chunk, timestamp_ms, .. } = frame.message {
                    chunks.push((chunk, timestamp_ms));
                }
            }
            Observed::Disconnected { .. } => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(sequence, (1..=sequence.len() as u64).collect::<Vec<_>>());
    assert_eq!(sequence.len(), 1 + 20 + 4 + 4 + 1);
    let expected: Vec<(u64, u64)> = (0..20).map(|i| (i + 1, i * 20)).collect();
    assert_eq!(chunks, expected);
}

#[tokio::test]
async fn odd_sized_payloads_are_repacketised_with_carry() {
    let audio: Vec<u8> = (0..1000u32).map(|i| (i % 250) as u8).collect();
    let mut script = Vec::new();
    let mut at = 0;
    for len in [7, 333, 1, 159, 500] {
        script.push(ScriptStep::SendAudio(audio[at..at + len].to_vec(), 0));
        at += len;
    }
    script.push(ScriptStep::Mark("end".into()));
    let (url, _observed) = scripted(script).await;
    let mut stream = open(&url).await;

    let events = events_until(&mut stream, is_mark("end")).await;
    let frames = audio_frames(&events);
    // 1000 bytes: six full frames, then the 40-byte remainder flushed by the mark.
    assert_eq!(frames.len(), 7);
    assert_eq!(events.len(), 8);
    let joined: Vec<u8> = frames.iter().flatten().copied().collect();
    assert_eq!(joined[..1000], audio[..]);
    assert!(joined[1000..].iter().all(|&b| b == ULAW_SILENCE));
}

#[tokio::test]
async fn mark_flushes_a_partial_frame_padded_with_silence() {
    let (url, _observed) = scripted(vec![
        ScriptStep::SendAudio(vec![7; 250], 0),
        ScriptStep::Mark("a".into()),
        // 40 ms sent as 20 ms payloads.
        ScriptStep::SendAudio(vec![9; 320], 20),
        ScriptStep::Mark("b".into()),
    ])
    .await;
    let mut stream = open(&url).await;
    let events = events_until(&mut stream, is_mark("b")).await;
    let mut padded = [ULAW_SILENCE; FRAME_BYTES];
    padded[..90].fill(7);
    assert_eq!(
        events,
        [
            AgentEvent::Audio([7; 160]),
            AgentEvent::Audio(padded),
            AgentEvent::Mark("a".into()),
            AgentEvent::Audio([9; 160]),
            AgentEvent::Audio([9; 160]),
            AgentEvent::Mark("b".into()),
        ]
    );
}

#[tokio::test]
async fn clear_drops_the_carried_remainder() {
    let (url, _observed) = scripted(vec![
        ScriptStep::SendAudio(vec![1; 250], 0),
        ScriptStep::Clear,
        ScriptStep::SendAudio(vec![2; 160], 0),
        ScriptStep::Mark("after".into()),
    ])
    .await;
    let mut stream = open(&url).await;
    let events = events_until(&mut stream, is_mark("after")).await;
    // Without the clear, the 90 carried bytes of 1 would lead the next frame.
    assert_eq!(
        events,
        [AgentEvent::Audio([1; 160]), AgentEvent::Clear, AgentEvent::Audio([2; 160]), AgentEvent::Mark("after".into()),]
    );
}

#[tokio::test]
async fn transfer_and_hangup_arrive_after_their_audio() {
    let (url, _observed) = scripted(vec![
        ScriptStep::SendAudio(vec![5; 100], 0),
        ScriptStep::Transfer("sip:bob@example.com".into()),
        ScriptStep::Hangup,
    ])
    .await;
    let mut stream = open(&url).await;
    let events = events_until(&mut stream, |e| *e == AgentEvent::Hangup).await;
    let mut padded = [ULAW_SILENCE; FRAME_BYTES];
    padded[..100].fill(5);
    assert_eq!(
        events,
        [AgentEvent::Audio(padded), AgentEvent::Transfer("sip:bob@example.com".into()), AgentEvent::Hangup,]
    );
}

#[tokio::test]
async fn agent_closing_gives_closed() {
    let (url, mut observed) = scripted(vec![ScriptStep::SendAudio(vec![3; 160], 0), ScriptStep::Close]).await;
    let mut stream = open(&url).await;
    assert_eq!(next_event(&mut stream).await, AgentEvent::Audio([3; 160]));
    assert_eq!(next_event(&mut stream).await, AgentEvent::Closed);
    // Terminal: asked again, the answer stays.
    assert_eq!(next_event(&mut stream).await, AgentEvent::Closed);
    loop {
        if let Observed::Disconnected { clean, .. } = observe(&mut observed).await {
            assert!(clean);
            break;
        }
    }
    stream.stop().await;
}

#[tokio::test]
async fn agent_vanishing_gives_failed() {
    let (url, _observed) = scripted(vec![ScriptStep::WaitMs(50), ScriptStep::Abort]).await;
    let mut stream = open(&url).await;
    match next_event(&mut stream).await {
        AgentEvent::Failed(reason) => assert!(!reason.is_empty()),
        other => panic!("expected Failed, got {other:?}"),
    }
    assert!(matches!(next_event(&mut stream).await, AgentEvent::Failed(_)));
    // The writer notices too: sending eventually reports the stream closed.
    let deadline = Instant::now() + WAIT;
    loop {
        match stream.send_media(&[0; 160]) {
            Err(AgentError::Closed) => break,
            Ok(_) => assert!(Instant::now() < deadline, "send never failed"),
            Err(other) => panic!("unexpected {other}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn malformed_messages_are_ignored() {
    let (url, _observed) = scripted(vec![
        ScriptStep::SendText("{not json".into()),
        ScriptStep::SendText(r#"{"event":"media","streamSid":"MZstream1","media":{"payload":"*!*"}}"#.into()),
        ScriptStep::SendText(r#"{"event":"media","streamSid":"MZstream1"}"#.into()),
        ScriptStep::SendText(r#"{"event":"mark","mark":{"label":"x"}}"#.into()),
        ScriptStep::SendText(r#"{"event":"speak","text":"hello"}"#.into()),
        ScriptStep::SendText("[1,2,3]".into()),
        ScriptStep::SendAudio(vec![3; 160], 0),
        ScriptStep::Mark("ok".into()),
    ])
    .await;
    let mut stream = open(&url).await;
    let events = events_until(&mut stream, is_mark("ok")).await;
    assert_eq!(events, [AgentEvent::Audio([3; 160]), AgentEvent::Mark("ok".into())]);
}

#[tokio::test]
async fn connect_errors_are_typed_and_quick() {
    // A port with nobody listening.
    let (closed, url) = listener().await;
    drop(closed);
    let began = Instant::now();
    let err = connect(&url, &start_info(), None, CONNECT_TIMEOUT).await.expect_err("refused");
    assert!(matches!(err, AgentError::Connect { .. }), "{err}");
    assert!(began.elapsed() < Duration::from_secs(1));

    for bad in ["http://127.0.0.1/", "not a url", "ws://"] {
        let err = connect(bad, &start_info(), None, CONNECT_TIMEOUT).await.expect_err("bad url");
        assert!(matches!(err, AgentError::InvalidUrl { .. }), "{bad}: {err}");
    }

    // A server that accepts TCP but never answers the upgrade.
    let (silent, url) = listener().await;
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            held.push(tcp);
        }
    });
    let began = Instant::now();
    let err = connect(&url, &start_info(), None, Duration::from_millis(200)).await.expect_err("timeout");
    assert!(matches!(err, AgentError::Timeout(_)), "{err}");
    assert!(began.elapsed() < Duration::from_secs(1));
    hold.abort();

    // An HTTP server that refuses the upgrade.
    let (http, url) = listener().await;
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        if let Ok((mut tcp, _)) = http.accept().await {
            let mut buf = [0u8; 1024];
            let _ = tcp.read(&mut buf).await;
            let _ = tcp.write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n").await;
        }
    });
    let err = connect(&url, &start_info(), None, CONNECT_TIMEOUT).await.expect_err("rejected");
    assert!(matches!(err, AgentError::Rejected { status: 403 }), "{err}");
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_instead_of_blocking() {
    let (url, mut observed) = scripted(vec![]).await;
    let options = ConnectOptions::new(CONNECT_TIMEOUT).with_media_queue(4);
    let stream = connect_with(&url, &start_info(), &options).await.expect("connect");
    // The test runtime has one thread: the writer cannot run during this loop.
    let queued: Vec<bool> = (0..100).map(|_| stream.send_media(&[0xFF; 160]).expect("media")).collect();
    assert_eq!(stream.dropped_media_frames(), 96);
    assert_eq!(queued.iter().filter(|&&q| q).count(), 4, "send_media says which frames were queued");
    assert!(queued[..4].iter().all(|&q| q));
    stream.stop().await;
    let mut media = Vec::new();
    loop {
        match observe(&mut observed).await {
            Observed::Received { frame, .. } => {
                if let PatchbayMessage::Media { chunk, timestamp_ms, .. } = frame.message {
                    media.push((chunk, timestamp_ms));
                }
            }
            Observed::Disconnected { .. } => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(media, [(1, 0), (2, 20), (3, 40), (4, 60)]);
}

#[tokio::test]
async fn wss_with_a_private_certificate() {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    let cert_der = certified.cert.der().clone();
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.key_pair.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert_der.clone()], key_der)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));

    let (agent, mut observed) =
        ScriptedAgent::new(vec![ScriptStep::SendAudio(vec![4; 200], 0), ScriptStep::Mark("tls".into())]);
    let (tcp_listener, _) = listener().await;
    let port = tcp_listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = tcp_listener.accept().await {
            let acceptor = acceptor.clone();
            let agent = agent.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = agent.handle(tls).await;
                }
            });
        }
    });
    let url = format!("wss://localhost:{port}/agent");

    // The public roots do not trust a self-signed certificate.
    let err = connect(&url, &start_info(), None, CONNECT_TIMEOUT).await.expect_err("untrusted");
    assert!(matches!(err, AgentError::Tls(_)), "{err}");

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der).expect("root");
    let client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut stream =
        connect(&url, &start_info(), Some(Arc::new(client_config)), CONNECT_TIMEOUT).await.expect("wss connect");
    let events = events_until(&mut stream, is_mark("tls")).await;
    assert_eq!(audio_frames(&events).len(), 2);
    stream.send_mark("tls").expect("mark");
    stream.stop().await;

    let mut names = Vec::new();
    loop {
        match observe(&mut observed).await {
            Observed::Received { frame, .. } => names.push(frame.message.to_string()),
            Observed::Disconnected { clean, .. } => {
                assert!(clean);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(names, ["connected", "start", "mark \"tls\"", "stop"]);
}

fn demo_config() -> DemoAgentConfig {
    DemoAgentConfig {
        greeting: tone_ulaw(660.0, 300, 6000),
        transfer_target: Some("sip:operator@example.com".into()),
        ..DemoAgentConfig::default()
    }
}

async fn demo() -> String {
    let (listener, url) = listener().await;
    tokio::spawn(DemoAgent::new(demo_config()).serve(listener));
    url
}

/// Sends audio as 20 ms frames, a little faster than real time.
async fn speak(stream: &AgentStream, audio: &[u8]) {
    for frame in audio.chunks(FRAME_BYTES) {
        stream.send_media(frame).expect("media");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn demo_agent_greets_then_echoes_an_utterance() {
    let url = demo().await;
    let mut stream = open(&url).await;

    let greeting = events_until(&mut stream, is_mark("greeting")).await;
    assert_eq!(audio_frames(&greeting).len(), 15, "300 ms of greeting");
    stream.send_mark("greeting").expect("greeting played");

    let tone = tone_ulaw(440.0, 500, 8000);
    speak(&stream, &tone).await;
    speak(&stream, &[ULAW_SILENCE; 8000]).await;

    let echo = events_until(&mut stream, is_mark("echo-1")).await;
    let frames = audio_frames(&echo);
    assert_eq!(frames.len(), 25, "500 ms of echo");
    let joined: Vec<u8> = frames.iter().flatten().copied().collect();
    assert_eq!(joined, tone);
    assert_eq!(stream.dropped_media_frames(), 0);

    stream.send_dtmf('0').expect("dtmf");
    assert_eq!(next_event(&mut stream).await, AgentEvent::Transfer("sip:operator@example.com".into()));
    stream.send_dtmf('#').expect("dtmf");
    assert_eq!(next_event(&mut stream).await, AgentEvent::Hangup);
    stream.stop().await;
}

#[tokio::test]
async fn demo_agent_clears_when_the_caller_barges_in() {
    let url = demo().await;
    let mut stream = open(&url).await;
    events_until(&mut stream, is_mark("greeting")).await;
    // The greeting is still "playing" (its mark not echoed) when the caller speaks.
    speak(&stream, &tone_ulaw(440.0, 300, 8000)).await;
    assert_eq!(next_event(&mut stream).await, AgentEvent::Clear);
    stream.stop().await;
}

#[tokio::test]
async fn echo_agent_returns_each_payload() {
    let (listener, url) = listener().await;
    tokio::spawn(EchoAgent::default().serve(listener));
    let mut stream = open(&url).await;
    for i in 1..=3u8 {
        stream.send_media(&[i; 160]).expect("media");
        assert_eq!(next_event(&mut stream).await, AgentEvent::Audio([i; 160]));
    }
    stream.stop().await;
}

#[tokio::test]
async fn a_stamping_echo_agent_writes_its_send_time_and_the_writer_reports_each_frames_flush() {
    let (listener, url) = listener().await;
    tokio::spawn(EchoAgent::stamping(12).serve(listener));
    let options = patchbay_agent::ConnectOptions::new(CONNECT_TIMEOUT).with_write_probe(true);
    let mut stream = patchbay_agent::connect_with(&url, &start_info(), &options).await.expect("connect");
    assert_eq!(stream.take_write_latency(), None, "nothing written yet");
    let before = patchbay_agent::server::unix_nanos();
    stream.send_media(&[7; 160]).expect("media");
    let AgentEvent::Audio(echo) = next_event(&mut stream).await else { panic!("expected audio") };
    let after = patchbay_agent::server::unix_nanos();
    let stamp = u64::from_le_bytes(echo[12..20].try_into().expect("8 octets"));
    assert!((before..=after).contains(&stamp), "{before} <= {stamp} <= {after}");
    assert_eq!((&echo[..12], &echo[20..]), (&[7u8; 12][..], &[7u8; 140][..]), "the rest is echoed unchanged");
    stream.take_write_latency().expect("the frame's flush was recorded");
    assert_eq!(stream.take_write_latency(), None, "one record per frame");
    stream.stop().await;
}

/// `with_addrs`: the connection goes to the addresses given (a caller that checked them), not
/// to what the URL's host resolves to; the host still names the server. Both ways to connect.
#[tokio::test]
async fn given_addresses_are_connected_to_instead_of_the_urls_host() {
    let (url, _observed) = scripted(vec![ScriptStep::SendAudio(vec![5; 160], 0), ScriptStep::WaitMs(500)]).await;
    let addr: std::net::SocketAddr =
        url.trim_start_matches("ws://").trim_end_matches("/agent").parse().expect("agent address");
    // `.invalid` never resolves (RFC 6761): only the given address can be reached.
    let unresolvable = "ws://agent.invalid:1/agent";
    let options = ConnectOptions::new(CONNECT_TIMEOUT).with_addrs(Some(vec![addr]));
    let mut stream = connect_with(unresolvable, &start_info(), &options).await.expect("connect to the given address");
    assert_eq!(next_event(&mut stream).await, AgentEvent::Audio([5; 160]));
    stream.stop().await;
    let link = patchbay_agent::connect_link(unresolvable, &start_info(), &options).await;
    assert!(link.is_ok(), "the clock link connects to the given address too: {:?}", link.err());
    let without = connect_with(unresolvable, &start_info(), &ConnectOptions::new(CONNECT_TIMEOUT)).await;
    assert!(without.is_err(), "without addresses the name is resolved, and fails");
}
