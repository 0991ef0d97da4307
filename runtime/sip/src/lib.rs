//! Patchbay's SIP signalling core, sans-IO.
//!
//! **Not implemented yet** (tracked by the SIP signalling issue): message framing and
//! validation in front of `rsip`, RFC 3261 §17 transactions driven as
//! `handle(now, input)` / `poll_output()` / `poll_timeout()`, §12 dialogs, digest
//! authentication (RFC 2617/7616) and SDP offer/answer (RFC 3264).
//!
//! This crate must never depend on tokio or wasmtime: time and packets are inputs, and the
//! `patchbay` binary owns the sockets and the clock.
