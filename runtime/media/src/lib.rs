//! Patchbay's media engine.
//!
//! Today this crate holds the audio [`Frame`]: one packetisation interval of audio owned by the
//! host and shared by reference count, so that routing audio (echo, bridge, record, agent
//! streaming) moves a handle and never copies samples. Flows see it as the WIT `frame`
//! resource (see `patchbay-host`).
//!
//! **Not implemented yet** (tracked by the media engine issue): the fixed-size frame pool that
//! recycles frame buffers without touching the allocator, RTP/RTCP, G.711, RFC 4733 DTMF, the
//! shared pacing clock, the jitter buffer and SRTP. Like the SIP core, this crate never depends
//! on tokio or wasmtime.

mod frame;

pub use frame::{AudioEncoding, AudioFormat, Frame, FrameError};
