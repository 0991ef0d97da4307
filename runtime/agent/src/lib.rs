//! AI agent media streams: Patchbay connects a phone call to an AI voice agent server over
//! a websocket (`ws://` or `wss://`) speaking the **Twilio Media Streams** protocol
//! (bidirectional, as set up by Twilio's `<Connect><Stream>`), so agent servers written
//! for Twilio — Pipecat's `TwilioFrameSerializer`, for one — work unchanged.
//!
//! # Protocol
//!
//! JSON text frames; every counter is a decimal string, field names are Twilio's.
//!
//! Patchbay → agent, in order:
//!
//! | event | when | notes |
//! |---|---|---|
//! | `connected` | first | `protocol: "Call"`, `version: "1.0.0"`; no `sequenceNumber`, no `streamSid` |
//! | `start` | second | `start.{accountSid, streamSid, callSid, tracks: ["inbound"], customParameters, mediaFormat: {encoding: "audio/x-mulaw", sampleRate: 8000, channels: 1}}` |
//! | `media` | every caller frame | `media.{track: "inbound", chunk, timestamp, payload}`; `chunk` counts from 1, `timestamp` is ms of media since the start |
//! | `dtmf` | caller key press | `dtmf.{track: "inbound_track", digit}` |
//! | `mark` | agent audio played | `mark.name` echoes the agent's mark once the audio queued before it has played (or was cleared) |
//! | `stop` | last | `stop.{accountSid, callSid}`, then a normal websocket close |
//!
//! Every message but `connected` carries `sequenceNumber` (from `"1"` on `start`) and
//! `streamSid`. Agents never answer `connected` or `start`, so none is awaited.
//!
//! Agent → Patchbay: `media` (`media.payload`, base64 μ-law of any length: 20 ms frames or
//! whole sentences), `mark` (`mark.name`) and `clear`. Two **Patchbay extensions**, not
//! part of Twilio's protocol:
//!
//! - `{"event":"transfer","streamSid":…,"transfer":{"target":"sip:…"}}` asks Patchbay to
//!   transfer the caller to `target` ([`AgentEvent::Transfer`]);
//! - `{"event":"hangup","streamSid":…}` asks Patchbay to end the call ([`AgentEvent::Hangup`]).
//!
//! Unknown events and binary frames are logged at debug level and ignored; malformed JSON
//! and bad base64 are logged and ignored; `streamSid` on incoming messages is not checked
//! (Twilio agents always echo it). Nothing an agent sends can panic the stream.
//!
//! # Run loop
//!
//! [`connect`] opens TCP (and TLS for `wss://`, with rustls and the `ring` provider), does
//! the websocket upgrade, writes `connected` and `start`, and spawns one writer task; the
//! whole connect is bounded by a timeout. Then:
//!
//! - [`AgentStream::send_media`], [`send_dtmf`](AgentStream::send_dtmf) and
//!   [`send_mark`](AgentStream::send_mark) only queue (bounded) for the writer task and
//!   never block: when the agent cannot keep up, caller audio is dropped and counted.
//! - [`AgentStream::recv`] reads the websocket in the caller's task. Agent audio is
//!   concatenated and re-cut into 20 ms frames ([`AgentEvent::Audio`]); a `mark`,
//!   `transfer` or `hangup` first flushes a partial frame padded with μ-law silence so it
//!   lands right after its audio; `clear` drops the partial frame and frames not yet
//!   returned. `recv` is cancel-safe, so it can sit in a `tokio::select!` with the media
//!   clock.
//! - [`AgentStream::stop`] sends `stop` after the queued audio and closes the websocket.
//!
//! [`connect_link`] opens a `ws://` stream without any task: a [`ClockLink`] that the media
//! clock drives itself, writing each caller frame at the tick that releases it and reading
//! the agent's answers at the call's own step (the `link` module says why).
//!
//! [`server`] holds agent servers for the demo, tests and benchmarks.

mod error;
mod inbound;
mod link;
mod protocol;
mod repacketize;
pub mod server;
mod stream;

pub use error::AgentError;
pub use link::{ClockLink, connect_link};
pub use protocol::{
    FRAME_BYTES, Frame160, MAX_MEDIA_FRAME, MediaFormat, PatchbayFrame, PatchbayMessage, StartInfo, ULAW_SILENCE,
};
pub use stream::{AgentEvent, AgentSender, AgentStream, ConnectOptions, DEFAULT_MEDIA_QUEUE, connect, connect_with};
