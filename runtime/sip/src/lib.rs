//! Patchbay's SIP signalling core, sans-IO.
//!
//! - [`message`]: framing, normalisation and strict validation in front of `rsip`'s parser, so
//!   that what RFC 4475 calls well-formed parses and what it calls malformed gets a 400 naming
//!   the problem (or is dropped when no response is possible).
//! - [`transaction`]: RFC 3261 §17 client and server transactions driven as
//!   `handle(now, input)` / `poll_output()` / `poll_timeout()`.
//!
//! **Not implemented yet** (tracked by the SIP signalling issue): the user agent core and
//! dialogs, digest authentication, SDP offer/answer; the transports live in the binary.
//!
//! This crate must never depend on tokio or wasmtime: time and packets are inputs, and the
//! `patchbay` binary owns the sockets and the clock (a test in `tests/` checks it).

pub mod message;
pub mod transaction;
