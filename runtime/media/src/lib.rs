//! Patchbay's media engine: the sans-IO core.
//!
//! Like the SIP core, this crate never depends on tokio, mio or wasmtime (`tests/tests/layering.rs`
//! checks it): it never reads a clock, opens a socket or spawns a task. Times are inputs
//! (`Instant`s and sample counts passed in by the caller), randomness is an input (initial
//! sequence numbers, timestamps, SSRCs and SRTP keys come from the caller's RNG), and outputs are
//! polled (CONVENTIONS §1–2).
//!
//! # Modules
//!
//! - [`Frame`]: one packetisation interval of audio owned by the host and shared by reference
//!   count, so that routing audio (echo, bridge, record, agent streaming) moves a handle and never
//!   copies samples. Flows see it as the WIT `frame` resource (see `patchbay-host`).
//! - [`rtp`]: RTP packets (RFC 3550 §5.1), sequence/timestamp extension, receive statistics with
//!   loss and jitter (A.1, A.3, A.8), SR/RR/SDES/BYE and compound-packet parsing (§6), round-trip
//!   time (§6.4.1), and the outgoing packetiser with talkspurt markers (RFC 3551 §4.1).
//! - [`g711`]: μ-law and A-law, table-driven, byte-identical with SoX.
//! - [`dtmf`]: RFC 4733 telephone events (payload, receiver state machine, sender schedule) and an
//!   in-band Goertzel DTMF detector.
//! - [`jitter`]: an adaptive jitter buffer fed with arrival times and drained on the pacing clock.
//! - [`srtp`]: SRTP/SRTCP (RFC 3711) with `AES_CM_128_HMAC_SHA1_80`/`_32` keyed by SDES
//!   (RFC 4568), replay protection and rollover counter estimation.
//! - [`session`]: one call's media tying them together: receive (SRTP, symmetric-RTP latching,
//!   DTMF, jitter buffer), one packet out per tick of the shared clock (DTMF, queued audio, or
//!   encoded silence), inactivity timeout, marks for "this prompt has played".
//! - [`prompt`]: WAV prompts (PCM 8/16 kHz, A-law, μ-law) decoded once, 16 kHz low-pass
//!   filtered and decimated, encoded once per codec.
//! - [`FramePool`]: recycled frame buffers, so that the per-packet path does not allocate.
//!
//! Errors: each module has its own `#[non_exhaustive]` enum; [`MediaError`] gathers them and says
//! who caused a failure ([`Cause`]).
//!
//! # Not done yet
//!
//! Said loudly, so nobody mistakes this crate for the whole media engine:
//!
//! - the shared **pacing clock** and the **sockets** live in the `patchbay` binary (it calls
//!   [`session::MediaSession::tick`] for every call from its clock threads);
//! - comfort noise (RFC 3389), RTCP scheduling, re-packetisation of agent audio;
//! - the per-module gaps listed in each module's documentation (RFC 4733 multi-event packets,
//!   SRTP MKI, jitter-buffer time-stretching, …);
//! - fuzz targets for the RTP/RTCP parsers (the per-packet benchmarks are in `benches/media.rs`).

pub mod dtmf;
mod error;
mod frame;
pub mod g711;
pub mod jitter;
pub mod prompt;
pub mod rtp;
pub mod session;
pub mod srtp;

pub use error::{Cause, MediaError};
pub use frame::{AudioEncoding, AudioFormat, Frame, FrameError, FramePool, PoolStats};
