//! The wire format: Twilio Media Streams JSON text frames, both directions, plus the two
//! Patchbay extensions (`transfer`, `hangup`).
//!
//! Field names follow Twilio's "Media Streams - WebSocket Messages" page exactly
//! (camelCase, numbers sent as decimal strings). Nothing here does I/O: the client and the
//! servers feed text in and take text out.

use std::borrow::Cow;
use std::fmt;

use base64::Engine as _;
use base64::display::Base64Display;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

/// Bytes in one 20 ms frame of 8 kHz μ-law.
pub const FRAME_BYTES: usize = 160;

/// One 20 ms frame of 8 kHz μ-law, the unit agent audio is delivered in.
pub type Frame160 = [u8; FRAME_BYTES];

/// μ-law encoding of a zero sample, used to pad a partial frame before a mark.
pub use patchbay_media::g711::ULAW_SILENCE;

/// Largest caller frame [`AgentStream::send_media`](crate::AgentStream::send_media) accepts:
/// 60 ms, the longest packetisation time in common use.
pub const MAX_MEDIA_FRAME: usize = 480;

/// μ-law samples per millisecond at 8 kHz.
pub(crate) const SAMPLES_PER_MS: u64 = 8;

/// Base64 decoding as agents send it: standard alphabet, padding optional (some
/// serialisers strip it).
pub(crate) const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// What identifies a stream to the agent; carried in the `start` message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartInfo {
    /// `accountSid`: the tenant the call belongs to.
    pub account_sid: String,
    /// `callSid`: the call.
    pub call_sid: String,
    /// `streamSid`: this stream; repeated on every message after `connected`.
    pub stream_sid: String,
    /// `customParameters`, in order (sent as a JSON object).
    pub custom_parameters: Vec<(String, String)>,
}

/// A `u64` serialised as a JSON string: Twilio sends every counter as a decimal string.
struct Decimal(u64);

impl Serialize for Decimal {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

/// Bytes serialised as a base64 JSON string without an intermediate `String`.
struct Base64<'a>(&'a [u8]);

impl Serialize for Base64<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&Base64Display::new(self.0, &STANDARD))
    }
}

/// Ordered key/value pairs serialised as a JSON object.
struct Params<'a>(&'a [(String, String)]);

impl Serialize for Params<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, value) in self.0 {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

/// A digit serialised as a one-character string.
struct Digit(char);

impl Serialize for Digit {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; 4];
        serializer.serialize_str(self.0.encode_utf8(&mut buf))
    }
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Serialising these structs cannot fail: no maps with non-string keys, no floats.
    serde_json::to_string(value).unwrap_or_default()
}

/// Builds the Patchbay → agent messages of one stream and owns its counters:
/// `sequenceNumber` counts every message after `connected` from 1, `chunk` counts media
/// messages from 1.
#[derive(Debug)]
pub(crate) struct StreamEncoder {
    account_sid: String,
    call_sid: String,
    stream_sid: String,
    /// `stream_sid` as a JSON string (quoted and escaped), for the hand-written `media`.
    stream_sid_json: String,
    next_sequence: u64,
    next_chunk: u64,
}

impl StreamEncoder {
    pub(crate) fn new(start: &StartInfo) -> Self {
        Self {
            account_sid: start.account_sid.clone(),
            call_sid: start.call_sid.clone(),
            stream_sid: start.stream_sid.clone(),
            stream_sid_json: serde_json::to_string(&start.stream_sid).unwrap_or_else(|_| "\"\"".into()),
            next_sequence: 1,
            next_chunk: 1,
        }
    }

    fn sequence(&mut self) -> Decimal {
        let n = self.next_sequence;
        self.next_sequence += 1;
        Decimal(n)
    }

    /// `connected`: the first message, without sequence number or stream SID.
    pub(crate) fn connected(&self) -> String {
        #[derive(Serialize)]
        struct Connected {
            event: &'static str,
            protocol: &'static str,
            version: &'static str,
        }
        to_json(&Connected { event: "connected", protocol: "Call", version: "1.0.0" })
    }

    /// `start`: stream metadata; Patchbay streams only the caller (`inbound`) track, as
    /// 8 kHz mono μ-law.
    pub(crate) fn start(&mut self, custom_parameters: &[(String, String)]) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct MediaFormat {
            encoding: &'static str,
            sample_rate: u32,
            channels: u32,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Start<'a> {
            account_sid: &'a str,
            stream_sid: &'a str,
            call_sid: &'a str,
            tracks: [&'static str; 1],
            custom_parameters: Params<'a>,
            media_format: MediaFormat,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Message<'a> {
            event: &'static str,
            sequence_number: Decimal,
            start: Start<'a>,
            stream_sid: &'a str,
        }
        let sequence_number = self.sequence();
        to_json(&Message {
            event: "start",
            sequence_number,
            start: Start {
                account_sid: &self.account_sid,
                stream_sid: &self.stream_sid,
                call_sid: &self.call_sid,
                tracks: ["inbound"],
                custom_parameters: Params(custom_parameters),
                media_format: MediaFormat { encoding: "audio/x-mulaw", sample_rate: 8000, channels: 1 },
            },
            stream_sid: &self.stream_sid,
        })
    }

    /// `media`: one frame of caller audio; `timestamp_ms` is media time since the stream
    /// started.
    pub(crate) fn media(&mut self, timestamp_ms: u64, payload: &[u8]) -> String {
        use fmt::Write as _;
        // Written by hand: this message goes out 50 times a second per call, and every field is
        // a number, base64 (nothing to escape) or the stream SID, escaped once in `new`. The
        // fields are in the order serde wrote them (the tests compare with the other messages).
        let sequence_number = self.sequence().0;
        let chunk = self.next_chunk;
        self.next_chunk += 1;
        let mut out = String::with_capacity(160 + payload.len().div_ceil(3) * 4 + self.stream_sid_json.len());
        let _ = write!(
            out,
            r#"{{"event":"media","sequenceNumber":"{sequence_number}","media":{{"track":"inbound","chunk":"{chunk}","timestamp":"{timestamp_ms}","payload":""#
        );
        STANDARD.encode_string(payload, &mut out);
        let _ = write!(out, r#""}},"streamSid":{}}}"#, self.stream_sid_json);
        out
    }

    /// `dtmf`: a key the caller pressed. Twilio names the track `inbound_track` here.
    pub(crate) fn dtmf(&mut self, digit: char) -> String {
        #[derive(Serialize)]
        struct Dtmf {
            track: &'static str,
            digit: Digit,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Message<'a> {
            event: &'static str,
            stream_sid: &'a str,
            sequence_number: Decimal,
            dtmf: Dtmf,
        }
        let sequence_number = self.sequence();
        to_json(&Message {
            event: "dtmf",
            stream_sid: &self.stream_sid,
            sequence_number,
            dtmf: Dtmf { track: "inbound_track", digit: Digit(digit) },
        })
    }

    /// `mark`: the agent audio queued before the agent's mark `name` has played.
    pub(crate) fn mark(&mut self, name: &str) -> String {
        #[derive(Serialize)]
        struct Mark<'a> {
            name: &'a str,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Message<'a> {
            event: &'static str,
            sequence_number: Decimal,
            stream_sid: &'a str,
            mark: Mark<'a>,
        }
        let sequence_number = self.sequence();
        to_json(&Message { event: "mark", sequence_number, stream_sid: &self.stream_sid, mark: Mark { name } })
    }

    /// `stop`: the stream ends; the last message.
    pub(crate) fn stop(&mut self) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Stop<'a> {
            account_sid: &'a str,
            call_sid: &'a str,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Message<'a> {
            event: &'static str,
            sequence_number: Decimal,
            stream_sid: &'a str,
            stop: Stop<'a>,
        }
        let sequence_number = self.sequence();
        to_json(&Message {
            event: "stop",
            sequence_number,
            stream_sid: &self.stream_sid,
            stop: Stop { account_sid: &self.account_sid, call_sid: &self.call_sid },
        })
    }
}

/// Why a received text frame was not understood. The message is logged and ignored.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ParseError {
    #[error("malformed JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("bad base64 payload: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("{event} message without {field}")]
    Missing { event: &'static str, field: &'static str },
}

/// An agent → Patchbay message, as the client understands it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AgentMessage {
    /// `media`: the payload was decoded into the caller's scratch buffer.
    Media,
    /// `mark`: name it once the audio before it has played.
    Mark(String),
    /// `clear`: drop audio not yet played.
    Clear,
    /// Patchbay extension `transfer`.
    Transfer(String),
    /// Patchbay extension `hangup`.
    Hangup,
    /// Any other event: ignored.
    Unknown(String),
}

#[derive(Deserialize)]
struct InboundPayload<'a> {
    #[serde(borrow)]
    payload: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct InboundName<'a> {
    #[serde(borrow)]
    name: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct InboundTransfer<'a> {
    #[serde(borrow)]
    target: Option<Cow<'a, str>>,
}

/// The union of the fields agents send; unknown fields are ignored. `Cow` because a
/// serialiser may escape `/` in base64 as `\/`, which cannot be borrowed.
#[derive(Deserialize)]
struct AgentEnvelope<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow)]
    media: Option<InboundPayload<'a>>,
    #[serde(borrow)]
    mark: Option<InboundName<'a>>,
    #[serde(borrow)]
    transfer: Option<InboundTransfer<'a>>,
}

/// Parses one text frame from the agent. A `media` payload is decoded into `scratch`
/// (cleared first), so a long-lived stream reuses one buffer.
pub(crate) fn parse_agent_message(text: &str, scratch: &mut Vec<u8>) -> Result<AgentMessage, ParseError> {
    let envelope: AgentEnvelope<'_> = serde_json::from_str(text)?;
    match &*envelope.event {
        "media" => {
            let payload = envelope
                .media
                .and_then(|m| m.payload)
                .ok_or(ParseError::Missing { event: "media", field: "media.payload" })?;
            scratch.clear();
            LENIENT_BASE64.decode_vec(payload.as_bytes(), scratch)?;
            Ok(AgentMessage::Media)
        }
        "mark" => {
            let name =
                envelope.mark.and_then(|m| m.name).ok_or(ParseError::Missing { event: "mark", field: "mark.name" })?;
            Ok(AgentMessage::Mark(name.into_owned()))
        }
        "clear" => Ok(AgentMessage::Clear),
        "transfer" => {
            let target = envelope
                .transfer
                .and_then(|t| t.target)
                .filter(|t| !t.is_empty())
                .ok_or(ParseError::Missing { event: "transfer", field: "transfer.target" })?;
            Ok(AgentMessage::Transfer(target.into_owned()))
        }
        "hangup" => Ok(AgentMessage::Hangup),
        other => Ok(AgentMessage::Unknown(other.to_owned())),
    }
}

/// Format of the caller audio announced in `start.mediaFormat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaFormat {
    /// `encoding`, e.g. `audio/x-mulaw`.
    pub encoding: String,
    /// `sampleRate` in Hz.
    pub sample_rate: u32,
    /// `channels`.
    pub channels: u32,
}

/// A Patchbay → agent message, as an agent server (the ones in [`crate::server`]) sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PatchbayMessage {
    /// `connected`: the websocket is up.
    Connected {
        /// `protocol` (`Call`).
        protocol: String,
        /// `version` (`1.0.0`).
        version: String,
    },
    /// `start`: stream metadata.
    Start {
        /// SIDs and custom parameters.
        info: StartInfo,
        /// `tracks`.
        tracks: Vec<String>,
        /// `mediaFormat`.
        media_format: MediaFormat,
    },
    /// `media`: caller audio.
    Media {
        /// `media.chunk`.
        chunk: u64,
        /// `media.timestamp`, ms since the stream started.
        timestamp_ms: u64,
        /// Decoded `media.payload` (μ-law).
        payload: Vec<u8>,
    },
    /// `dtmf`: a key the caller pressed.
    Dtmf {
        /// `dtmf.digit`.
        digit: char,
    },
    /// `mark`: the agent audio before this mark has played.
    Mark {
        /// `mark.name`.
        name: String,
    },
    /// `stop`: the stream ended.
    Stop,
    /// An event this crate does not know.
    Other {
        /// `event`.
        event: String,
    },
}

/// A Patchbay → agent message with its `sequenceNumber` and `streamSid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchbayFrame {
    /// `sequenceNumber` (absent on `connected`).
    pub sequence_number: Option<u64>,
    /// Top-level `streamSid` (absent on `connected`).
    pub stream_sid: Option<String>,
    /// The message.
    pub message: PatchbayMessage,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireMediaFormat {
    encoding: String,
    sample_rate: u32,
    channels: u32,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireStart {
    #[serde(default)]
    account_sid: String,
    #[serde(default)]
    call_sid: String,
    #[serde(default)]
    stream_sid: String,
    #[serde(default)]
    tracks: Vec<String>,
    #[serde(default, deserialize_with = "ordered_params")]
    custom_parameters: Vec<(String, String)>,
    media_format: WireMediaFormat,
}

/// Reads a JSON object into pairs in document order (`serde_json::Map` would sort them);
/// non-string values are kept as their JSON text.
fn ordered_params<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<(String, String)>, D::Error> {
    struct Pairs;
    impl<'de> serde::de::Visitor<'de> for Pairs {
        type Value = Vec<(String, String)>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object of parameters")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut pairs = Vec::new();
            while let Some((key, value)) = map.next_entry::<String, serde_json::Value>()? {
                let value = match value {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                pairs.push((key, value));
            }
            Ok(pairs)
        }
    }
    deserializer.deserialize_map(Pairs)
}

#[derive(Deserialize)]
struct WireMedia {
    chunk: String,
    timestamp: String,
    payload: String,
}

#[derive(Deserialize)]
struct WireDtmf {
    digit: String,
}

#[derive(Deserialize)]
struct WireMark {
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PatchbayEnvelope {
    event: String,
    sequence_number: Option<String>,
    stream_sid: Option<String>,
    protocol: Option<String>,
    version: Option<String>,
    start: Option<WireStart>,
    media: Option<WireMedia>,
    dtmf: Option<WireDtmf>,
    mark: Option<WireMark>,
}

fn decimal(field: &'static str, value: &str) -> Result<u64, ParseError> {
    value.parse().map_err(|_| ParseError::Missing { event: "media", field })
}

/// Parses one Patchbay → agent text frame (the agent side of the protocol).
pub(crate) fn parse_patchbay_message(text: &str) -> Result<PatchbayFrame, ParseError> {
    let envelope: PatchbayEnvelope = serde_json::from_str(text)?;
    let missing = |event: &'static str, field: &'static str| ParseError::Missing { event, field };
    let message = match envelope.event.as_str() {
        "connected" => PatchbayMessage::Connected {
            protocol: envelope.protocol.unwrap_or_default(),
            version: envelope.version.unwrap_or_default(),
        },
        "start" => {
            let start = envelope.start.ok_or(missing("start", "start"))?;
            let custom_parameters = start.custom_parameters;
            PatchbayMessage::Start {
                info: StartInfo {
                    account_sid: start.account_sid,
                    call_sid: start.call_sid,
                    stream_sid: start.stream_sid,
                    custom_parameters,
                },
                tracks: start.tracks,
                media_format: MediaFormat {
                    encoding: start.media_format.encoding,
                    sample_rate: start.media_format.sample_rate,
                    channels: start.media_format.channels,
                },
            }
        }
        "media" => {
            let media = envelope.media.ok_or(missing("media", "media"))?;
            PatchbayMessage::Media {
                chunk: decimal("media.chunk", &media.chunk)?,
                timestamp_ms: decimal("media.timestamp", &media.timestamp)?,
                payload: LENIENT_BASE64.decode(media.payload.as_bytes())?,
            }
        }
        "dtmf" => {
            let digit = envelope.dtmf.and_then(|d| d.digit.chars().next()).ok_or(missing("dtmf", "dtmf.digit"))?;
            PatchbayMessage::Dtmf { digit }
        }
        "mark" => PatchbayMessage::Mark { name: envelope.mark.ok_or(missing("mark", "mark.name"))?.name },
        "stop" => PatchbayMessage::Stop,
        _ => PatchbayMessage::Other { event: envelope.event },
    };
    let sequence_number = match envelope.sequence_number {
        Some(s) => Some(s.parse().map_err(|_| missing("any", "sequenceNumber"))?),
        None => None,
    };
    Ok(PatchbayFrame { sequence_number, stream_sid: envelope.stream_sid, message })
}

/// Builds agent → Patchbay messages (used by the servers in [`crate::server`]).
#[derive(Debug, Clone)]
pub(crate) struct AgentEncoder {
    stream_sid: String,
}

impl AgentEncoder {
    pub(crate) fn new(stream_sid: String) -> Self {
        Self { stream_sid }
    }

    pub(crate) fn media(&self, payload: &[u8]) -> String {
        #[derive(Serialize)]
        struct Media<'a> {
            payload: Base64<'a>,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Message<'a> {
            event: &'static str,
            stream_sid: &'a str,
            media: Media<'a>,
        }
        to_json(&Message { event: "media", stream_sid: &self.stream_sid, media: Media { payload: Base64(payload) } })
    }

    pub(crate) fn mark(&self, name: &str) -> String {
        serde_json::json!({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}}).to_string()
    }

    pub(crate) fn clear(&self) -> String {
        serde_json::json!({"event": "clear", "streamSid": self.stream_sid}).to_string()
    }

    pub(crate) fn transfer(&self, target: &str) -> String {
        serde_json::json!({
            "event": "transfer", "streamSid": self.stream_sid, "transfer": {"target": target}
        })
        .to_string()
    }

    pub(crate) fn hangup(&self) -> String {
        serde_json::json!({"event": "hangup", "streamSid": self.stream_sid}).to_string()
    }
}

impl fmt::Display for PatchbayMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PatchbayMessage::Connected { .. } => f.write_str("connected"),
            PatchbayMessage::Start { .. } => f.write_str("start"),
            PatchbayMessage::Media { payload, .. } => write!(f, "media ({} bytes)", payload.len()),
            PatchbayMessage::Dtmf { digit } => write!(f, "dtmf {digit}"),
            PatchbayMessage::Mark { name } => write!(f, "mark {name:?}"),
            PatchbayMessage::Stop => f.write_str("stop"),
            PatchbayMessage::Other { event } => write!(f, "{event:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> StartInfo {
        StartInfo {
            account_sid: "AC1".into(),
            call_sid: "CA1".into(),
            stream_sid: "MZ1".into(),
            custom_parameters: vec![("lang".into(), "en".into()), ("b".into(), "2".into())],
        }
    }

    #[test]
    fn outbound_messages_round_trip_through_the_agent_parser() {
        let start = info();
        let mut enc = StreamEncoder::new(&start);
        let connected = parse_patchbay_message(&enc.connected()).expect("connected");
        assert_eq!(connected.sequence_number, None);
        assert_eq!(connected.stream_sid, None);

        let started = parse_patchbay_message(&enc.start(&start.custom_parameters)).expect("start");
        assert_eq!(started.sequence_number, Some(1));
        match started.message {
            PatchbayMessage::Start { info, tracks, media_format } => {
                assert_eq!(info, start);
                assert_eq!(tracks, ["inbound"]);
                assert_eq!(media_format.encoding, "audio/x-mulaw");
                assert_eq!(media_format.sample_rate, 8000);
                assert_eq!(media_format.channels, 1);
            }
            other => panic!("unexpected {other:?}"),
        }

        let media = parse_patchbay_message(&enc.media(20, &[1, 2, 3])).expect("media");
        assert_eq!(media.sequence_number, Some(2));
        assert_eq!(media.message, PatchbayMessage::Media { chunk: 1, timestamp_ms: 20, payload: vec![1, 2, 3] });
        let dtmf = parse_patchbay_message(&enc.dtmf('#')).expect("dtmf");
        assert_eq!(dtmf.message, PatchbayMessage::Dtmf { digit: '#' });
        let mark = parse_patchbay_message(&enc.mark("m")).expect("mark");
        assert_eq!(mark.message, PatchbayMessage::Mark { name: "m".into() });
        let stop = parse_patchbay_message(&enc.stop()).expect("stop");
        assert_eq!(stop.sequence_number, Some(5));
        assert_eq!(stop.stream_sid.as_deref(), Some("MZ1"));
    }

    #[test]
    fn agent_messages_round_trip() {
        let enc = AgentEncoder::new("MZ1".into());
        let mut scratch = Vec::new();
        assert_eq!(parse_agent_message(&enc.media(&[0xFF; 7]), &mut scratch).expect("media"), AgentMessage::Media);
        assert_eq!(scratch, [0xFF; 7]);
        assert_eq!(parse_agent_message(&enc.mark("g"), &mut scratch).expect("mark"), AgentMessage::Mark("g".into()));
        assert_eq!(parse_agent_message(&enc.clear(), &mut scratch).expect("clear"), AgentMessage::Clear);
        assert_eq!(
            parse_agent_message(&enc.transfer("sip:a@b"), &mut scratch).expect("transfer"),
            AgentMessage::Transfer("sip:a@b".into())
        );
        assert_eq!(parse_agent_message(&enc.hangup(), &mut scratch).expect("hangup"), AgentMessage::Hangup);
    }

    #[test]
    fn agent_parser_tolerates_escaped_slashes_and_missing_padding() {
        let mut scratch = Vec::new();
        // base64 of [0xff, 0xfe] is "//4=": escaped slashes and no padding.
        let text = r#"{"event":"media","streamSid":"x","media":{"payload":"\/\/4"}}"#;
        assert_eq!(parse_agent_message(text, &mut scratch).expect("media"), AgentMessage::Media);
        assert_eq!(scratch, [0xFF, 0xFE]);
    }

    #[test]
    fn agent_parser_rejects_garbage_without_panicking() {
        let mut scratch = Vec::new();
        for text in [
            "",
            "{",
            "null",
            "[]",
            r#"{"event":1}"#,
            r#"{"event":"media"}"#,
            r#"{"event":"media","media":{"payload":"!!"}}"#,
            r#"{"event":"mark","mark":{}}"#,
            r#"{"event":"transfer","transfer":{"target":""}}"#,
        ] {
            assert!(parse_agent_message(text, &mut scratch).is_err(), "{text}");
        }
        assert_eq!(
            parse_agent_message(r#"{"event":"speak"}"#, &mut scratch).expect("unknown"),
            AgentMessage::Unknown("speak".into())
        );
    }
}
