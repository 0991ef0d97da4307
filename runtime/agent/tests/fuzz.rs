//! Fuzz targets for what an AI agent (or, for the agent servers, Patchbay's side) can send, as
//! property tests on stable Rust:
//!
//! - the agent's JSON messages, arbitrary and Twilio-shaped, through the real websocket into
//!   both ways of reading an agent (`ClockLink` and `AgentStream`), checked against a model
//!   of the protocol (each message is applied or ignored, never fatal);
//! - raw websocket bytes from a fake agent (fragments, control frames, masked frames, reserved
//!   bits and opcodes, length fields that lie, arbitrary bytes), and arbitrary handshake
//!   answers: the stream ends with an event or a typed error, never a panic or a hang;
//! - length fields beyond the configured limit (`MAX_MESSAGE`, 4 MiB): the stream fails as soon as
//!   the header (or the fragment that crosses the limit) arrives, without waiting for — or
//!   buffering — the announced bytes;
//! - arbitrary handshakes and frames into the agent servers of `patchbay_agent::server` over
//!   `tokio::io::duplex`.
//!
//! Each runs a few dozen to a few hundred cases in `cargo test`; set `PROPTEST_CASES` for a
//! longer run (docs/security.md, "Fuzzing"):
//!
//! ```sh
//! PROPTEST_CASES=20000 cargo test --release -p patchbay-agent --test fuzz
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use patchbay_agent::server::{DemoAgent, EchoAgent, Observed, ScriptStep, ScriptedAgent};
use patchbay_agent::{
    AgentError, AgentEvent, ClockLink, ConnectOptions, FRAME_BYTES, Frame160, ULAW_SILENCE, connect_link, connect_with,
};
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

mod common;
use common::{WAIT, start_info};

/// `cases` by default; `PROPTEST_CASES` when set (a `ProptestConfig::with_cases` ignores it).
fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    ProptestConfig::with_cases(cases)
}

/// The largest message and frame the client accepts from an agent (`stream::MAX_MESSAGE`).
const MAX_MESSAGE: u64 = 4 << 20;

/// One runtime for every case: building one per case would cost more than most cases.
static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
});

/// Panics anywhere in the process, the writer task of an `AgentStream` included (tokio would
/// swallow a panic there).
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
    });
}

/// Runs one case on the shared runtime and fails it if anything panicked meanwhile.
fn run<T>(case: impl Future<Output = Result<T, TestCaseError>>) -> Result<T, TestCaseError> {
    count_panics();
    let before = PANICS.load(Ordering::SeqCst);
    let result = RUNTIME.block_on(case);
    prop_assert_eq!(PANICS.load(Ordering::SeqCst), before, "something panicked (see the output above)");
    result
}

fn connect_failed(err: AgentError) -> TestCaseError {
    TestCaseError::fail(format!("connect: {err}"))
}

fn options() -> ConnectOptions {
    ConnectOptions::new(Duration::from_secs(2))
}

// ---------------------------------------------------------------------------------------------
// Websocket frames, written by hand
// ---------------------------------------------------------------------------------------------

/// How a frame's payload length is written (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy)]
enum Length {
    /// The shortest encoding, as required.
    Minimal,
    /// The 16-bit form even where 7 bits would do.
    Wide16,
    /// The 64-bit form even where a shorter one would do.
    Wide64,
    /// A 64-bit length that is not the payload's.
    Lie(u64),
}

/// One websocket frame, possibly in breach of RFC 6455.
#[derive(Debug, Clone)]
struct WireFrame {
    fin: bool,
    /// RSV1-3.
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    length: Length,
    payload: Vec<u8>,
}

const CONTINUATION: u8 = 0;
const TEXT: u8 = 1;
const BINARY: u8 = 2;
const CLOSE: u8 = 8;
const PING: u8 = 9;
const PONG: u8 = 10;

impl WireFrame {
    fn new(opcode: u8, fin: bool, payload: Vec<u8>) -> Self {
        Self { fin, rsv: 0, opcode, mask: None, length: Length::Minimal, payload }
    }

    fn close(code: u16, reason: &str) -> Self {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason.as_bytes());
        Self::new(CLOSE, true, payload)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.push(if self.fin { 0x80 } else { 0 } | (self.rsv & 7) << 4 | (self.opcode & 0x0f));
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        let len = self.payload.len() as u64;
        match self.length {
            Length::Minimal if len < 126 => out.push(mask_bit | len as u8),
            Length::Minimal | Length::Wide16 if len <= 0xFFFF => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            Length::Minimal | Length::Wide16 | Length::Wide64 => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&len.to_be_bytes());
            }
            Length::Lie(announced) => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&announced.to_be_bytes());
            }
        }
        match self.mask {
            Some(mask) => {
                out.extend_from_slice(&mask);
                out.extend(self.payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            }
            None => out.extend_from_slice(&self.payload),
        }
    }
}

fn encode_all(frames: &[WireFrame]) -> Vec<u8> {
    let mut out = Vec::new();
    for frame in frames {
        frame.encode(&mut out);
    }
    out
}

/// A close frame's payload: a code (valid, reserved, out of range) and a reason (maybe not
/// UTF-8), or a lone octet, or nothing.
fn close_payload() -> BoxedStrategy<Vec<u8>> {
    let code = prop_oneof![
        Just(1000u16),
        Just(1001),
        Just(1002),
        Just(1005),
        Just(1006),
        Just(1011),
        Just(3000),
        Just(4999),
        Just(999),
        any::<u16>(),
    ];
    prop_oneof![
        4 => (code, prop::collection::vec(any::<u8>(), 0..20)).prop_map(|(code, reason)| {
            let mut payload = code.to_be_bytes().to_vec();
            payload.extend(reason);
            payload
        }),
        1 => prop::collection::vec(any::<u8>(), 0..2),
        1 => prop::collection::vec(any::<u8>(), 100..140),
    ]
    .boxed()
}

/// Any frame an agent could send, mostly well formed so that later frames are reached.
fn wire_frame() -> BoxedStrategy<WireFrame> {
    let text = prop_oneof![
        3 => agent_text().prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..300),
    ];
    let data = prop_oneof![
        6 => (Just(TEXT), text.clone()),
        1 => (Just(BINARY), prop::collection::vec(any::<u8>(), 0..300)),
        3 => (Just(CONTINUATION), text),
        1 => (Just(CLOSE), close_payload()),
        2 => (prop_oneof![Just(PING), Just(PONG)], prop::collection::vec(any::<u8>(), 0..130)),
        1 => (0u8..16, prop::collection::vec(any::<u8>(), 0..40)),
    ];
    let length = prop_oneof![
        12 => Just(Length::Minimal),
        1 => Just(Length::Wide16),
        1 => Just(Length::Wide64),
        1 => prop_oneof![0u64..512, Just(MAX_MESSAGE), Just(u64::MAX), any::<u64>()].prop_map(Length::Lie),
    ];
    (
        data,
        prop::bool::weighted(0.8),
        prop_oneof![12 => Just(0u8), 1 => 1u8..8],
        prop::option::weighted(0.05, any::<[u8; 4]>()),
        length,
    )
        .prop_map(|((opcode, payload), fin, rsv, mask, length)| WireFrame { fin, rsv, opcode, mask, length, payload })
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// A fake agent on 127.0.0.1, and both readers of an agent
// ---------------------------------------------------------------------------------------------

/// What the fake agent does once it has written its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Ends its side of the TCP connection (FIN), as an agent that is done.
    Shutdown,
    /// Keeps the connection open, reading, until Patchbay closes it.
    KeepOpen,
}

/// Serves one connection: answers the upgrade with `response` (`None`: a correct 101), writes
/// `chunks` one by one, then ends as told, reading (and discarding) whatever Patchbay sends.
async fn fake_agent(listener: Arc<TcpListener>, response: Option<Vec<u8>>, chunks: Vec<Vec<u8>>, ending: Ending) {
    let Ok(Ok((mut tcp, _))) = tokio::time::timeout(WAIT, listener.accept()).await else { return };
    let mut head = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let response = response.unwrap_or_else(|| {
        let head = String::from_utf8_lossy(&head);
        let key = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("sec-websocket-key").then_some(value)
            })
            .map(str::trim)
            .unwrap_or_default();
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            derive_accept_key(key.as_bytes())
        )
        .into_bytes()
    });
    if tcp.write_all(&response).await.is_err() {
        return;
    }
    for chunk in chunks {
        if tcp.write_all(&chunk).await.is_err() {
            break;
        }
        tokio::task::yield_now().await;
    }
    if ending == Ending::Shutdown {
        let _ = tcp.shutdown().await;
    }
    let _ = tokio::time::timeout(WAIT, async {
        while let Ok(n) = tcp.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

thread_local! {
    /// The fake agent's listener, one per test thread (the cases of a test run one after the
    /// other on its thread): a listener per case would use up the ephemeral ports, each left
    /// in TIME_WAIT, within a long run.
    static LISTENER: std::cell::RefCell<Option<Arc<TcpListener>>> = const { std::cell::RefCell::new(None) };
}

/// Which reader of an agent to drive.
#[derive(Debug, Clone, Copy)]
enum Driver {
    /// `ClockLink`, polled as the media clock polls it.
    Link,
    /// `AgentStream`, awaited in a task.
    Stream,
}

fn driver() -> impl Strategy<Value = Driver> {
    prop_oneof![Just(Driver::Link), Just(Driver::Stream)]
}

fn is_terminal(event: &AgentEvent) -> bool {
    matches!(event, AgentEvent::Closed | AgentEvent::Failed(_))
}

/// Connects to `url` with `driver` and collects events until a terminal one or `within`.
async fn read_agent(url: &str, driver: Driver, within: Duration) -> Result<Vec<AgentEvent>, AgentError> {
    let deadline = Instant::now() + within;
    let mut events = Vec::new();
    match driver {
        Driver::Link => {
            let mut link: ClockLink = connect_link(url, &start_info(), &options()).await?;
            loop {
                while let Some(event) = link.poll(Instant::now()) {
                    let done = is_terminal(&event);
                    events.push(event);
                    if done {
                        return Ok(events);
                    }
                }
                if Instant::now() >= deadline {
                    return Ok(events);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        Driver::Stream => {
            let mut stream = connect_with(url, &start_info(), &options()).await?;
            loop {
                match tokio::time::timeout_at(deadline.into(), stream.recv()).await {
                    Ok(event) => {
                        let done = is_terminal(&event);
                        events.push(event);
                        if done {
                            return Ok(events);
                        }
                    }
                    Err(_) => return Ok(events),
                }
            }
        }
    }
}

/// A fake agent that writes `chunks` and ends as told, read with `driver`.
async fn against_fake_agent(
    response: Option<Vec<u8>>,
    chunks: Vec<Vec<u8>>,
    ending: Ending,
    driver: Driver,
    within: Duration,
) -> Result<Vec<AgentEvent>, AgentError> {
    let listener = match LISTENER.with_borrow(Option::clone) {
        Some(listener) => listener,
        None => {
            let listener = Arc::new(TcpListener::bind("127.0.0.1:0").await.expect("bind"));
            LISTENER.set(Some(Arc::clone(&listener)));
            listener
        }
    };
    let url = format!("ws://{}/agent", listener.local_addr().expect("addr"));
    let agent = tokio::spawn(fake_agent(listener, response, chunks, ending));
    let events = read_agent(&url, driver, within).await;
    // Never leave it to take the next case's connection.
    let agent = tokio::time::timeout(3 * WAIT, agent).await;
    if let Err(elapsed) = agent {
        panic!("the fake agent did not finish: {elapsed}");
    }
    events
}

/// Cuts `bytes` into chunks at the given fractions (the reads the client sees vary with them).
fn cut(bytes: &[u8], cuts: &[prop::sample::Index]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
    points.sort_unstable();
    points.push(bytes.len());
    let mut chunks = Vec::new();
    let mut from = 0;
    for to in points {
        if to > from {
            chunks.push(bytes[from..to].to_vec());
            from = to;
        }
    }
    chunks
}

// ---------------------------------------------------------------------------------------------
// Agent → Patchbay JSON, and a model of what each message does
// ---------------------------------------------------------------------------------------------

const KEYS: [&str; 12] = [
    "event",
    "media",
    "payload",
    "mark",
    "name",
    "transfer",
    "target",
    "streamSid",
    "sequenceNumber",
    "chunk",
    "track",
    "x",
];

fn json_leaf() -> impl Strategy<Value = Value> + Clone {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop::num::f64::NORMAL.prop_map(Value::from),
        Just(json!(f64::MAX)),
        Just(json!(-1e308)),
        Just(json!(i64::MIN)),
        "\\PC{0,12}".prop_map(Value::from),
        "[A-Za-z0-9+/=]{0,12}".prop_map(Value::from),
    ]
}

/// Any JSON value, with the protocol's field names among the keys.
fn json_value() -> BoxedStrategy<Value> {
    json_leaf()
        .prop_recursive(3, 24, 6, |inner| {
            let key = prop_oneof![2 => prop::sample::select(KEYS.to_vec()).prop_map(str::to_owned), 1 => "\\PC{0,6}"];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((key, inner), 0..6).prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
            ]
        })
        .boxed()
}

/// A `media.payload`: base64 (padded or not) of any bytes, or not base64, or not a string.
fn payload() -> BoxedStrategy<Value> {
    prop_oneof![
        6 => (prop::collection::vec(any::<u8>(), 0..500), any::<bool>()).prop_map(|(audio, padded)| {
            let text = STANDARD.encode(audio);
            Value::from(if padded { text } else { text.trim_end_matches('=').to_owned() })
        }),
        1 => prop::sample::select(vec!["!!", "A", "AAA=", "AA==AA", "====", "AAAA====", "//5=", "4pyT\n"])
            .prop_map(Value::from),
        1 => "[A-Za-z0-9+/=]{0,16}".prop_map(Value::from),
        1 => json_leaf(),
    ]
    .boxed()
}

/// A field holding an object with `key`: as agents send it, or `null`, or an array, or junk.
fn field_with(
    key: &'static str,
    value: impl Strategy<Value = Value> + Clone + 'static,
) -> BoxedStrategy<Option<Value>> {
    let extra = prop::collection::vec((prop::sample::select(KEYS.to_vec()), json_leaf()), 0..3);
    prop_oneof![
        6 => (value.clone(), extra).prop_map(move |(value, extra)| {
            let mut object: Map<String, Value> =
                extra.into_iter().filter(|(k, _)| *k != key).map(|(k, v)| (k.to_owned(), v)).collect();
            object.insert(key.to_owned(), value);
            Some(Value::Object(object))
        }),
        2 => Just(None),
        1 => Just(Some(Value::Null)),
        1 => Just(Some(json!({}))),
        1 => value.prop_map(|value| Some(json!([value]))),
        1 => json_value().prop_map(Some),
    ]
    .boxed()
}

/// A Twilio Media Streams message as an agent sends it, with hostile fields mixed in.
fn shaped_message() -> BoxedStrategy<Value> {
    let event = prop_oneof![
        12 => prop::sample::select(vec![
            "media", "media", "media", "mark", "clear", "transfer", "hangup", "start", "stop", "dtmf", "MEDIA",
        ])
        .prop_map(Value::from),
        1 => "\\PC{0,8}".prop_map(Value::from),
        1 => json_leaf(),
    ];
    let name = prop_oneof![4 => "\\PC{0,10}".prop_map(Value::from), 1 => json_leaf()];
    let target = prop_oneof![
        4 => "sip:[a-z]{0,8}@example.com".prop_map(Value::from),
        1 => Just(Value::from("")),
        1 => json_leaf(),
    ];
    let extra = prop::collection::vec(
        (prop::sample::select(vec!["streamSid", "sequenceNumber", "x", "dtmf", "start"]), json_value()),
        0..3,
    );
    (
        prop::option::weighted(0.95, event),
        field_with("payload", payload()),
        field_with("name", name),
        field_with("target", target),
        extra,
    )
        .prop_map(|(event, media, mark, transfer, extra)| {
            let mut object: Map<String, Value> = extra.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            for (key, value) in [("event", event), ("media", media), ("mark", mark), ("transfer", transfer)] {
                if let Some(value) = value {
                    object.insert(key.to_owned(), value);
                }
            }
            Value::Object(object)
        })
        .boxed()
}

/// The text of an agent message: shaped, any JSON, the envelope as an array, or any text; with
/// `/` sometimes escaped as `\/`, as some serialisers write it.
fn agent_text() -> BoxedStrategy<String> {
    let value = prop_oneof![
        8 => shaped_message(),
        2 => json_value(),
        1 => (prop::sample::select(vec!["media", "mark", "clear", "hangup"]), payload())
            .prop_map(|(event, payload)| json!([event, [payload], null, null])),
    ];
    prop_oneof![
        10 => (value, any::<bool>()).prop_map(|(value, escape)| {
            let text = value.to_string();
            if escape { text.replace('/', "\\/") } else { text }
        }),
        1 => "\\PC{0,40}",
        1 => Just("{\"event\":\"media\",\"media\":{\"payload\":\"/w==\"}".to_owned()),
    ]
    .boxed()
}

/// What a message does, per the protocol (`lib.rs`, "Protocol"): `None` when it is ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Audio(Vec<u8>),
    Mark(String),
    Clear,
    Transfer(String),
    Hangup,
}

/// `field` of an object-or-`[value]` that may be absent or `null`: a string, nothing, or (`Err`)
/// a value of the wrong shape, which makes the whole message malformed.
fn inner_string(value: Option<&Value>, field: &str) -> Result<Option<String>, ()> {
    let inner = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(object)) => object.get(field),
        Some(Value::Array(items)) if items.len() == 1 => items.first(),
        Some(_) => return Err(()),
    };
    match inner {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(()),
    }
}

/// The model: how the message `text` should be taken, read from the JSON alone.
fn model(text: &str) -> Option<Action> {
    let value: Value = serde_json::from_str(text).ok()?;
    let (event, media, mark, transfer) = match &value {
        Value::Object(object) => {
            (object.get("event")?, object.get("media"), object.get("mark"), object.get("transfer"))
        }
        Value::Array(items) if items.len() == 4 => (&items[0], Some(&items[1]), Some(&items[2]), Some(&items[3])),
        _ => return None,
    };
    let Value::String(event) = event else { return None };
    let payload = inner_string(media, "payload").ok()?;
    let name = inner_string(mark, "name").ok()?;
    let target = inner_string(transfer, "target").ok()?;
    let lenient = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    match event.as_str() {
        "media" => lenient.decode(payload?).ok().map(Action::Audio),
        "mark" => name.map(Action::Mark),
        "clear" => Some(Action::Clear),
        "transfer" => target.filter(|t| !t.is_empty()).map(Action::Transfer),
        "hangup" => Some(Action::Hangup),
        _ => None,
    }
}

/// The events the actions should come out as: audio cut into 20 ms frames, a partial frame
/// padded with silence before a mark, transfer or hangup (and at the end), dropped on clear.
fn expected_events(actions: &[Action]) -> Vec<AgentEvent> {
    let mut events = Vec::new();
    let mut carry: Vec<u8> = Vec::new();
    let flush = |carry: &mut Vec<u8>, events: &mut Vec<AgentEvent>| {
        if !carry.is_empty() {
            let mut frame: Frame160 = [ULAW_SILENCE; FRAME_BYTES];
            frame[..carry.len()].copy_from_slice(carry);
            events.push(AgentEvent::Audio(frame));
            carry.clear();
        }
    };
    for action in actions {
        match action {
            Action::Audio(bytes) => {
                carry.extend_from_slice(bytes);
                while carry.len() >= FRAME_BYTES {
                    let frame: Frame160 = carry[..FRAME_BYTES].try_into().expect("160 bytes");
                    events.push(AgentEvent::Audio(frame));
                    carry.drain(..FRAME_BYTES);
                }
            }
            Action::Mark(name) => {
                flush(&mut carry, &mut events);
                events.push(AgentEvent::Mark(name.clone()));
            }
            Action::Clear => {
                carry.clear();
                events.push(AgentEvent::Clear);
            }
            Action::Transfer(target) => {
                flush(&mut carry, &mut events);
                events.push(AgentEvent::Transfer(target.clone()));
            }
            Action::Hangup => {
                flush(&mut carry, &mut events);
                events.push(AgentEvent::Hangup);
            }
        }
    }
    flush(&mut carry, &mut events);
    events.push(AgentEvent::Closed);
    events
}

/// A text message as frames: whole, or in fragments (cut anywhere, UTF-8 sequences included)
/// with pings and pongs between them (RFC 6455 §5.4 allows control frames there).
fn text_frames(text: &str, cuts: &[prop::sample::Index], pings: bool) -> Vec<WireFrame> {
    let bytes = text.as_bytes();
    let chunks = if cuts.is_empty() { vec![bytes.to_vec()] } else { cut(bytes, cuts) };
    let chunks = if chunks.is_empty() { vec![Vec::new()] } else { chunks };
    let last = chunks.len() - 1;
    let mut frames = Vec::new();
    for (i, chunk) in chunks.into_iter().enumerate() {
        if pings && i > 0 {
            frames.push(WireFrame::new(if i % 2 == 0 { PING } else { PONG }, true, b"ping".to_vec()));
        }
        frames.push(WireFrame::new(if i == 0 { TEXT } else { CONTINUATION }, i == last, chunk));
    }
    frames
}

fn event_summary(events: &[AgentEvent]) -> Vec<String> {
    events
        .iter()
        .map(|event| match event {
            AgentEvent::Audio(frame) => format!("Audio({:02x?}…)", &frame[..4]),
            other => format!("{other:?}"),
        })
        .collect()
}

proptest! {
    #![proptest_config(cases(256))]

    /// Agent messages of every shape, sent whole or fragmented, then a normal close: both
    /// readers give exactly the events the protocol model predicts (malformed messages, bad
    /// base64 and unknown events are ignored, never fatal), then `Closed`.
    #[test]
    fn agent_messages_are_applied_or_ignored_as_the_protocol_says(
        texts in prop::collection::vec(
            (agent_text(), prop::collection::vec(any::<prop::sample::Index>(), 0..3), any::<bool>()),
            1..24,
        ),
        driver in driver(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let mut frames = Vec::new();
        for (text, fragments, pings) in &texts {
            frames.extend(text_frames(text, fragments, *pings));
        }
        frames.push(WireFrame::close(1000, ""));
        let chunks = cut(&encode_all(&frames), &cuts);
        let events = run(async {
            against_fake_agent(None, chunks, Ending::Shutdown, driver, WAIT).await.map_err(connect_failed)
        })?;
        let actions: Vec<Action> = texts.iter().filter_map(|(text, _, _)| model(text)).collect();
        let expected = expected_events(&actions);
        prop_assert!(
            events == expected,
            "events {:?}\nexpected {:?}",
            event_summary(&events),
            event_summary(&expected)
        );
    }

    /// Any sequence of frames (and raw bytes) from an agent, arriving in any cuts, then the end
    /// of the connection: both readers end with `Closed` or `Failed`, in time, without a panic.
    #[test]
    fn arbitrary_frames_from_an_agent_end_in_an_event_not_a_panic(
        frames in prop::collection::vec(
            prop_oneof![
                8 => wire_frame().prop_map(|f| encode_all(&[f])),
                1 => prop::collection::vec(any::<u8>(), 0..64),
            ],
            0..16,
        ),
        driver in driver(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let chunks = cut(&frames.concat(), &cuts);
        let events = run(async {
            against_fake_agent(None, chunks, Ending::Shutdown, driver, WAIT).await.map_err(connect_failed)
        })?;
        let Some(last) = events.last() else {
            return Err(TestCaseError::fail("no event at all before the deadline"));
        };
        prop_assert!(is_terminal(last), "the stream did not end: {:?}", event_summary(&events));
        prop_assert!(!events[..events.len() - 1].iter().any(is_terminal));
    }

    /// After any well-formed traffic, a frame header announcing more than the 4 MiB the client
    /// accepts fails the stream at once: the agent keeps the connection open and never sends the
    /// bytes, so a reader that waited for (or buffered) them would not end.
    #[test]
    fn an_oversized_length_field_fails_the_stream_at_once(
        before in prop::collection::vec(agent_text(), 0..4),
        announced in prop_oneof![
            Just(MAX_MESSAGE + 1),
            (MAX_MESSAGE + 1)..(MAX_MESSAGE << 4),
            (MAX_MESSAGE + 1)..=u64::MAX,
            Just(u64::MAX),
        ],
        opcode in prop_oneof![Just(TEXT), Just(BINARY), Just(CONTINUATION)],
        fin in any::<bool>(),
        driver in driver(),
    ) {
        let mut frames: Vec<WireFrame> =
            before.iter().map(|text| WireFrame::new(TEXT, true, text.clone().into_bytes())).collect();
        if opcode == CONTINUATION {
            frames.push(WireFrame::new(TEXT, false, b"{\"event\":".to_vec()));
        }
        frames.push(WireFrame { fin, rsv: 0, opcode, mask: None, length: Length::Lie(announced), payload: Vec::new() });
        let started = Instant::now();
        let events = run(async {
            let chunks = vec![encode_all(&frames)];
            against_fake_agent(None, chunks, Ending::KeepOpen, driver, WAIT).await.map_err(connect_failed)
        })?;
        prop_assert!(
            matches!(events.last(), Some(AgentEvent::Failed(reason)) if reason.contains("Message too long")),
            "{:?}",
            event_summary(&events)
        );
        prop_assert!(started.elapsed() < WAIT, "failed only at the deadline");
    }

    /// Arbitrary answers to the upgrade (a 101 with broken or missing headers, another status,
    /// noise): connecting fails with a typed error, in time, without a panic.
    #[test]
    fn arbitrary_handshake_answers_fail_the_connect_cleanly(
        status in prop_oneof![
            Just("HTTP/1.1 101 Switching Protocols".to_owned()),
            Just("HTTP/1.1 200 OK".to_owned()),
            "HTTP/1.[01] [0-9]{3} [ -~]{0,10}",
            "[ -~]{0,20}",
        ],
        headers in prop::collection::vec(prop_oneof![
            Just("Upgrade: websocket".to_owned()),
            Just("Connection: Upgrade".to_owned()),
            Just("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".to_owned()),
            Just("Content-Length: 99999999999999999999".to_owned()),
            "[A-Za-z-]{1,20}: [ -~]{0,30}",
            "[ -~]{0,30}",
        ], 0..6),
        end in prop_oneof![Just("\r\n\r\n"), Just("\r\n"), Just("\n\n"), Just("")],
        tail in prop::collection::vec(any::<u8>(), 0..64),
        driver in driver(),
    ) {
        let mut response = status;
        for header in &headers {
            response.push_str("\r\n");
            response.push_str(header);
        }
        response.push_str(end);
        let mut response = response.into_bytes();
        response.extend(tail);
        let result = run(async {
            let within = Duration::from_millis(100);
            Ok(against_fake_agent(Some(response), Vec::new(), Ending::Shutdown, driver, within).await)
        })?;
        match result {
            Err(AgentError::Websocket(_) | AgentError::Rejected { .. }) => {}
            other => prop_assert!(false, "{:?}", other.map(|events| event_summary(&events))),
        }
    }
}

/// A text message in fragments that add up to more than 4 MiB, none of them too large alone:
/// the stream fails once the fragment that crosses the limit arrives, while the agent keeps the
/// connection open and has more to send.
#[test]
fn fragments_adding_up_past_the_limit_fail_the_stream() {
    for driver in [Driver::Link, Driver::Stream] {
        let fragment = vec![b'a'; 1 << 20];
        let mut frames = vec![WireFrame::new(TEXT, false, b"{\"event\":\"x\",\"pad\":\"".to_vec())];
        frames.extend((0..5).map(|_| WireFrame::new(CONTINUATION, false, fragment.clone())));
        let events = run(async {
            Ok(against_fake_agent(None, vec![encode_all(&frames)], Ending::KeepOpen, driver, WAIT)
                .await
                .expect("connect"))
        })
        .expect("no panic");
        assert!(
            matches!(events.last(), Some(AgentEvent::Failed(reason)) if reason.contains("Message too long")),
            "{driver:?}: {:?}",
            event_summary(&events)
        );
    }
}

/// Numbers no JSON number type holds, in fields the client does not read, do not make a
/// message malformed (the model above reads JSON into `serde_json::Value`, which refuses them,
/// so they are checked here).
#[test]
fn out_of_range_numbers_in_unread_fields_are_ignored() {
    let texts = [
        r#"{"event":"media","sequenceNumber":1e400,"media":{"payload":"/w==","chunk":-1e999,"timestamp":1e30000}}"#,
        r#"{"event":"mark","mark":{"name":"m","x":1e400}}"#,
    ];
    let frames: Vec<WireFrame> = texts
        .iter()
        .map(|text| WireFrame::new(TEXT, true, text.as_bytes().to_vec()))
        .chain([WireFrame::close(1000, "")])
        .collect();
    let events = run(async {
        Ok(against_fake_agent(None, vec![encode_all(&frames)], Ending::Shutdown, Driver::Link, WAIT)
            .await
            .expect("connect"))
    })
    .expect("no panic");
    let mut padded = [ULAW_SILENCE; FRAME_BYTES];
    padded[0] = 0xFF;
    assert_eq!(events, [AgentEvent::Audio(padded), AgentEvent::Mark("m".into()), AgentEvent::Closed]);
}

// ---------------------------------------------------------------------------------------------
// The agent servers, fed by a fake Patchbay over tokio::io::duplex
// ---------------------------------------------------------------------------------------------

/// A Patchbay → agent message, shaped as Patchbay sends them, with hostile fields mixed in.
fn patchbay_text() -> BoxedStrategy<String> {
    let decimal = prop_oneof![
        4 => any::<u32>().prop_map(|n| Value::from(n.to_string())),
        1 => Just(Value::from("18446744073709551616")),
        1 => Just(Value::from("-1")),
        1 => json_leaf(),
    ];
    let media = (decimal.clone(), decimal.clone(), payload()).prop_map(|(chunk, timestamp, payload)| {
        json!({"event": "media", "sequenceNumber": "2", "streamSid": "MZ1",
               "media": {"track": "inbound", "chunk": chunk, "timestamp": timestamp, "payload": payload}})
    });
    let start = (
        json_value(),
        prop_oneof![Just(json!({"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1})), json_value()],
        decimal.clone(),
    )
        .prop_map(|(custom, format, sequence)| {
            json!({"event": "start", "sequenceNumber": sequence, "streamSid": "MZ1", "start": {
                "accountSid": "AC1", "callSid": "CA1", "streamSid": "MZ1", "tracks": ["inbound"],
                "customParameters": custom, "mediaFormat": format}})
        });
    let dtmf = json_leaf().prop_map(|digit| {
        json!({"event": "dtmf", "streamSid": "MZ1", "sequenceNumber": "3",
               "dtmf": {"track": "inbound_track", "digit": digit}})
    });
    let dtmf_digit = prop::sample::select(vec!["0", "#", "5", ""])
        .prop_map(|digit| json!({"event": "dtmf", "dtmf": {"digit": digit}}));
    let mark = json_leaf().prop_map(|name| json!({"event": "mark", "mark": {"name": name}}));
    let named_mark =
        Just(json!({"event": "mark", "sequenceNumber": "4", "streamSid": "MZ1", "mark": {"name": "greeting"}}));
    let other = prop::sample::select(vec!["connected", "stop", "STOP", ""])
        .prop_map(|event| json!({"event": event, "protocol": "Call", "version": "1.0.0"}));
    let value = prop_oneof![
        3 => media,
        2 => start,
        1 => dtmf,
        1 => dtmf_digit,
        1 => mark,
        1 => named_mark,
        1 => other,
        1 => json_value(),
    ];
    prop_oneof![8 => value.prop_map(|v| v.to_string()), 1 => "\\PC{0,40}"].boxed()
}

/// Which agent server answers.
#[derive(Debug, Clone, Copy)]
enum Server {
    Scripted,
    Echo,
    Demo,
}

/// A frame as Patchbay sends them (masked), or any frame at all.
fn client_frame() -> BoxedStrategy<WireFrame> {
    prop_oneof![
        12 => (patchbay_text(), any::<[u8; 4]>())
            .prop_map(|(text, mask)| WireFrame { mask: Some(mask), ..WireFrame::new(TEXT, true, text.into_bytes()) }),
        2 => wire_frame().prop_map(|frame| WireFrame { mask: frame.mask.or(Some([1, 2, 3, 4])), ..frame }),
        1 => wire_frame(),
    ]
    .boxed()
}

const UPGRADE: &str = "GET /agent HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

proptest! {
    #![proptest_config(cases(256))]

    /// A fake Patchbay sends an upgrade (or noise) and any frames, then ends its side: every
    /// agent server finishes its session in time, with `Ok` or a typed error, without a panic;
    /// the scripted agent reports each text frame as parsed or malformed, and the disconnect once.
    #[test]
    fn agent_servers_survive_arbitrary_frames(
        server in prop_oneof![Just(Server::Scripted), Just(Server::Echo), Just(Server::Demo)],
        upgrade in prop_oneof![
            8 => Just(UPGRADE.as_bytes().to_vec()),
            1 => prop::collection::vec(any::<u8>(), 0..80),
            1 => "GET / HTTP/1.1\r\n[ -~]{0,40}\r\n\r\n".prop_map(String::into_bytes),
        ],
        frames in prop::collection::vec(client_frame(), 0..12),
        close in any::<bool>(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let mut frames = frames;
        if close {
            frames.push(WireFrame { mask: Some([9, 8, 7, 6]), ..WireFrame::close(1000, "") });
        }
        let chunks = cut(&encode_all(&frames), &cuts);
        run(async move {
            let (patchbay, agent_io) = tokio::io::duplex(64 * 1024);
            let (observed, session) = match server {
                Server::Scripted => {
                    let script = vec![
                        ScriptStep::SendAudio(vec![0x55; 500], 20),
                        ScriptStep::Mark("greeting".into()),
                        ScriptStep::WaitForMark("greeting".into()),
                        ScriptStep::Clear,
                        ScriptStep::SendText("{\"event\":".into()),
                    ];
                    let (agent, observed) = ScriptedAgent::new(script);
                    (Some(observed), tokio::spawn(async move { agent.handle(agent_io).await }))
                }
                Server::Echo => (None, tokio::spawn(async move { EchoAgent::default().handle(agent_io).await })),
                Server::Demo => (None, tokio::spawn(async move { DemoAgent::default().handle(agent_io).await })),
            };
            let (mut from_agent, mut to_agent) = tokio::io::split(patchbay);
            // The upgrade, then (as a client must, RFC 6455 §4.1) the agent's answer before any frame.
            let _ = to_agent.write_all(&upgrade).await;
            let mut head = Vec::new();
            let mut buf = vec![0u8; 16 * 1024];
            // A request without its end gets no answer: the agent waits for the rest.
            let complete = upgrade.windows(4).any(|w| w == b"\r\n\r\n");
            let _ = tokio::time::timeout(WAIT, async {
                while complete && !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match from_agent.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
            })
            .await;
            let drain = tokio::spawn(async move {
                while let Ok(n) = from_agent.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
            for chunk in chunks {
                if to_agent.write_all(&chunk).await.is_err() {
                    break;
                }
                tokio::task::yield_now().await;
            }
            let _ = to_agent.shutdown().await;
            let ended = tokio::time::timeout(WAIT, session).await;
            drain.abort();
            let Ok(joined) = ended else {
                return Err(TestCaseError::fail("the agent session did not end after Patchbay's side closed"));
            };
            prop_assert!(joined.is_ok(), "the agent session panicked");
            if let Some(mut observed) = observed {
                let mut disconnects = 0;
                while let Ok(observation) = observed.try_recv() {
                    match observation {
                        Observed::Disconnected { .. } => disconnects += 1,
                        Observed::Received { json, .. } => prop_assert!(json.is_object() || json.is_array()),
                        Observed::Malformed { .. } => {}
                        _ => {}
                    }
                }
                prop_assert_eq!(disconnects, 1);
            }
            Ok(())
        })?;
    }
}

/// A frame header announcing more than the agent servers accept (1 MiB), its bytes never sent
/// and the connection left open: every server ends the session at once with an error.
#[test]
fn agent_servers_refuse_an_oversized_length_field_at_once() {
    for server in [Server::Scripted, Server::Echo, Server::Demo] {
        let frame = WireFrame {
            mask: Some([1, 2, 3, 4]),
            length: Length::Lie((1 << 20) + 1),
            ..WireFrame::new(TEXT, true, Vec::new())
        };
        let result = run(async move {
            let (patchbay, agent_io) = tokio::io::duplex(64 * 1024);
            let session = match server {
                Server::Scripted => {
                    let (agent, _observed) = ScriptedAgent::new(Vec::new());
                    tokio::spawn(async move { agent.handle(agent_io).await })
                }
                Server::Echo => tokio::spawn(async move { EchoAgent::default().handle(agent_io).await }),
                Server::Demo => tokio::spawn(async move { DemoAgent::default().handle(agent_io).await }),
            };
            let (mut from_agent, mut to_agent) = tokio::io::split(patchbay);
            to_agent.write_all(UPGRADE.as_bytes()).await.expect("upgrade");
            let mut head = [0u8; 1024];
            let n = from_agent.read(&mut head).await.expect("101");
            assert!(head[..n].starts_with(b"HTTP/1.1 101"), "{:?}", String::from_utf8_lossy(&head[..n]));
            to_agent.write_all(&encode_all(&[frame])).await.expect("frame header");
            let ended = tokio::time::timeout(WAIT, session).await;
            drop(to_agent);
            Ok(ended.map(|joined| joined.map(|result| result.map_err(|e| e.to_string()))))
        })
        .expect("no panic");
        // The scripted agent ends a broken session without an error (it records a disconnect).
        match (server, result) {
            (Server::Scripted, Ok(Ok(Ok(())))) => {}
            (_, Ok(Ok(Err(reason)))) => assert!(reason.contains("Message too long"), "{server:?}: {reason}"),
            (_, other) => panic!("{server:?}: {other:?}"),
        }
    }
}
