//! Patchbay's WebAssembly flow host.
//!
//! A flow is a WebAssembly component of the world `patchbay:voice/flow` (see `wit/`). This
//! crate runs one instance of it per call:
//!
//! - [`FlowEngine`]: one long-lived wasmtime engine with the pooling allocator (a semaphore
//!   below the pool size, an address-space fallback), epoch interruption driven by one ticker
//!   thread, and the linker with Patchbay's host functions and the part of WASI flows need
//!   (`wasi.rs`: clocks, random, stdout/stderr into the flow's log; no sockets, no files).
//! - [`FlowRegistry`]: compiled flows keyed by (tenant, flow name); a version is the SHA-256 of
//!   the component; precompiled artifacts are cached on disk by content hash and engine
//!   fingerprint, authenticated with a per-install key and loaded only if this install wrote
//!   them.
//! - [`FlowEngine::run`]: one `Store` + instance per call from the cached pre-instance, with a
//!   memory cap, a handle-table cap, a guest CPU budget, a wall-clock limit, per-run caps on
//!   kv writes and log bytes, and a yield every epoch tick.
//! - [`CallControl`]: what host functions call into. The call layer (SIP dialog + media session)
//!   implements it; tests use a scripted fake.
//!
//! The run future is cancel-safe in the sense that dropping it drops the store and frees the
//! instance slot; a call layer that wants a clean end should make pending `CallControl`
//! operations return `hangup` instead, so the flow unwinds on its own.

mod bindings;
mod cache;
mod config;
mod control;
mod engine;
mod error;
mod registry;
mod state;
mod wasi;

pub use bindings::{
    AgentEnd, AudioFormat, BridgeEnd, CallError, CallInfo, CollectEnd, CollectOptions, Collected, DialOptions,
    DialOutcome, Direction, Dtmf, Encoding, FlowError, HangupCause, Header, Level, PlayOptions, PlayOutcome, RecordEnd,
    RecordOptions, Recording,
};
pub use config::{FlowLimits, HostConfig};
pub use control::{CallControl, KvStore, MAX_KV_KEY, MediaEvent, MemoryKv};
pub use engine::{FlowCall, FlowEngine, FlowExit, FlowOutcome};
pub use error::HostError;
pub use registry::{CompiledFlow, FlowKey, FlowRecord, FlowRegistry, Installed, default_cache_dir};
pub use state::{AudioStreamHandle, CallHandle, FlowState};
