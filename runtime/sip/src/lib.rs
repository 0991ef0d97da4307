//! Patchbay's SIP signalling core, sans-IO.
//!
//! - [`message`]: framing, normalisation and strict validation in front of `rsip`'s parser, so
//!   that what RFC 4475 calls well-formed parses and what it calls malformed gets a 400 naming
//!   the problem (or is dropped when no response is possible).
//! - [`transaction`]: RFC 3261 §17 client and server transactions driven as
//!   `handle(now, input)` / `poll_output()` / `poll_timeout()`.
//! - [`ua`]: the user agent core: OPTIONS, inbound and outbound calls and their dialogs, BYE,
//!   CANCEL, re-INVITE (with glare handling), REFER, session timers, digest answers, and the
//!   REGISTER client for carrier trunks (RFC 3261 §10.2: [`ua::UserAgent::register`],
//!   [`ua::RegistrationState`]; refreshes, 401/407, 423 Min-Expires, back-off with jitter), and
//!   out-of-dialog OPTIONS pings that keep trunk NAT bindings open and probe reachability
//!   (RFC 3261 §11: [`ua::UserAgent::ping`], answered as [`ua::UaEvent::PingAnswered`]).
//! - [`auth`]: digest authentication (RFC 2617/7616), client and server side.
//! - [`sdp`]: SDP offer/answer (RFC 3264/4566) for G.711, telephone-event and SDES crypto.
//!
//! **Not implemented yet:** receiving REFER, PRACK (RFC 3262); the transports live in the
//! `patchbay` binary.
//!
//! This crate must never depend on tokio or wasmtime: time and packets are inputs, and the
//! `patchbay` binary owns the sockets and the clock (a test in `tests/` checks it).

pub mod auth;
pub mod message;
pub mod sdp;
pub mod transaction;
pub mod ua;
