//! Digest authentication for SIP (RFC 3261 §22, RFC 2617, RFC 7616), sans-IO.
//!
//! Neither side reads a clock, draws random numbers or touches a socket: the current time
//! (`now`, seconds since the UNIX epoch), the client nonce (`cnonce`) and the server secret are
//! inputs, so every exchange below is a deterministic unit test.
//!
//! # What is implemented
//!
//! - Algorithms `MD5`, `MD5-sess`, `SHA-256`, `SHA-256-sess` (RFC 7616 §3.2, §6.1).
//!   `SHA-512-256` is not: challenges offering only it are skipped.
//! - `qop=auth` and `qop=auth-int` (RFC 7616 §3.4.3; auth-int hashes the message body), and
//!   the RFC 2069 legacy mode without `qop` for old servers (RFC 2617 §3.2.2.1).
//! - Parsing and printing of challenges and credentials ([`Challenge`], [`Credentials`]):
//!   quoted-string escapes, case-insensitive parameter names, unknown parameters ignored,
//!   several challenges in one header value, duplicate parameters rejected.
//! - Not implemented: `userhash` (RFC 7616 §3.4.4; credentials using it are rejected as
//!   unsupported), `charset` (ignored; values are treated as UTF-8), `Authentication-Info`
//!   / `nextnonce` (RFC 7616 §3.5), and mutual authentication via `rspauth`.
//!
//! # Client flow (UAC, RFC 3261 §22.2 and §22.3)
//!
//! ```text
//!   INVITE (no credentials) ──────────────────────────►
//!   ◄────────────── 407 Proxy-Authenticate: Digest realm, nonce, algorithm=SHA-256 ...
//!   DigestClient::respond(Proxy, challenges, request, previous, cnonce) -> Proxy-Authorization
//!   INVITE (CSeq+1, Proxy-Authorization) ─────────────►
//!   ◄────────────── 200 OK
//!   BYE / re-INVITE: DigestClient::authorize(request, cnonce) -> credentials for the
//!   challenges already answered, nc incremented (RFC 7616 §3.4.5), no extra round trip
//! ```
//!
//! [`DigestClient::respond`] picks the strongest challenge it supports when a server offers
//! several (RFC 7616 §3.7), remembers it per (header kind, realm), and retries transparently on
//! `stale=TRUE`. Given the credentials the challenged request carried, it recognises a server
//! refusing them — a fresh challenge without `stale` (RFC 7616 §3.3) — and returns
//! [`AuthError::CredentialsRejected`] instead of looping.
//!
//! # Server flow (UAS / proxy, RFC 3261 §22.4)
//!
//! ```text
//!   request ─► DigestServer::verify(now, request, authorization values, store)
//!                 ├─ Outcome::Authorized { username }        → process the request
//!                 ├─ Outcome::Challenge { challenges, stale } → 401 / 407 with one header
//!                 │                                             field per challenge
//!                 └─ Outcome::Rejected(reason)                → 403 (or a fresh challenge)
//! ```
//!
//! Nonces are self-validating: `base64url(timestamp ‖ sequence ‖ HMAC-SHA256(secret,
//! timestamp ‖ sequence ‖ realm ‖ client))`, so the server keeps no per-challenge state; the
//! client binding ([`DigestRequest::from_client`]) is optional. An expired nonce with an
//! otherwise correct response yields a new challenge with `stale=TRUE` (RFC 7616 §3.3); a
//! foreign one (another secret, another client) yields it without the response being examined,
//! so that it is no password oracle. [`GuessThrottle`] slows password guessing per source and
//! per user. Replay protection keeps the highest `nc` seen per nonce in a bounded table
//! (RFC 7616 §3.4.5, §5.5); responses are compared in constant time, and the `uri` parameter
//! must match the Request-URI (RFC 7616 §3.4.6). Passwords come from a [`CredentialStore`],
//! which may return the precomputed HA1 (see [`ha1`]) so that plaintext passwords need not be
//! stored (RFC 7616 §5.2).
//!
//! UDP retransmissions of one request carry the same `nc`; they are absorbed by the transaction
//! layer (RFC 3261 §17.2.3) before they reach `verify`, so they are not mistaken for replays.

mod client;
mod hash;
mod header;
mod params;
mod server;
mod throttle;

pub use client::{CredentialsHeader, DigestClient};
pub use header::{Challenge, Credentials};
pub use server::{CredentialStore, DigestServer, Outcome, Rejection, ServerConfig, StoredSecret};
pub use throttle::{GuessThrottle, ThrottleConfig, Verdict, source_prefix};

use std::fmt;

/// Errors of digest authentication. Each variant says who caused it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// Peer: a challenge or credentials header does not follow RFC 3261 §25.1 / RFC 7616 §3.
    #[error("malformed digest header: {0}")]
    Malformed(&'static str),
    /// Peer: the `algorithm` is one this crate does not implement (e.g. `SHA-512-256`).
    #[error("unsupported digest algorithm")]
    UnsupportedAlgorithm,
    /// Peer: a digest feature this crate does not implement (named).
    #[error("unsupported digest feature: {0}")]
    Unsupported(&'static str),
    /// Peer: no challenge in the 401/407 can be answered (no Digest scheme, only unsupported
    /// algorithms or qop values, or no challenge for the realm the client is restricted to).
    #[error("no usable digest challenge")]
    NoUsableChallenge,
    /// Peer: the server refused our credentials (challenged again without `stale`, RFC 7616
    /// §3.3): the username or password is wrong.
    #[error("credentials for realm {realm:?} were rejected")]
    CredentialsRejected {
        /// The realm whose credentials were refused.
        realm: String,
    },
    /// Local: the caller passed an unusable `cnonce` (empty, or with control characters).
    #[error("invalid cnonce")]
    InvalidCnonce,
    /// Local: a [`ServerConfig`] value is unusable (named).
    #[error("invalid digest configuration: {0}")]
    InvalidConfig(&'static str),
}

/// The digest algorithms implemented (RFC 7616 §3.2, §6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// `MD5` (RFC 2617); the default when `algorithm` is absent.
    Md5,
    /// `MD5-sess`.
    Md5Sess,
    /// `SHA-256` (RFC 7616).
    Sha256,
    /// `SHA-256-sess`.
    Sha256Sess,
}

impl Algorithm {
    /// Parses the `algorithm` token, case-insensitively (RFC 7616 §3.3).
    pub fn from_token(token: &str) -> Result<Self, AuthError> {
        const ALL: [Algorithm; 4] = [Algorithm::Md5, Algorithm::Md5Sess, Algorithm::Sha256, Algorithm::Sha256Sess];
        ALL.into_iter().find(|a| a.as_str().eq_ignore_ascii_case(token)).ok_or(AuthError::UnsupportedAlgorithm)
    }

    /// The token as printed on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Md5 => "MD5",
            Self::Md5Sess => "MD5-sess",
            Self::Sha256 => "SHA-256",
            Self::Sha256Sess => "SHA-256-sess",
        }
    }

    /// Whether HA1 also covers nonce and cnonce (RFC 7616 §3.4.2).
    pub fn is_session(self) -> bool {
        matches!(self, Self::Md5Sess | Self::Sha256Sess)
    }

    pub(crate) fn is_sha256(self) -> bool {
        matches!(self, Self::Sha256 | Self::Sha256Sess)
    }

    /// Preference when a server offers several (RFC 7616 §3.7): the hash decides; the
    /// session variants rank with their base since they add no strength.
    pub(crate) fn strength(self) -> u8 {
        if self.is_sha256() { 2 } else { 1 }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A quality of protection (RFC 7616 §3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Qop {
    /// `auth`: authenticates method and Request-URI.
    Auth,
    /// `auth-int`: also authenticates the message body.
    AuthInt,
}

impl Qop {
    /// Parses a `qop` token, case-insensitively.
    pub fn from_token(token: &str) -> Result<Self, AuthError> {
        if token.eq_ignore_ascii_case("auth") {
            Ok(Self::Auth)
        } else if token.eq_ignore_ascii_case("auth-int") {
            Ok(Self::AuthInt)
        } else {
            Err(AuthError::Unsupported("qop value"))
        }
    }

    /// The token as printed on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auth => "auth",
            Self::AuthInt => "auth-int",
        }
    }
}

/// The `qop` options of a challenge (`qop="auth,auth-int"`); unknown options are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct QopOptions {
    /// `auth` offered.
    pub auth: bool,
    /// `auth-int` offered.
    pub auth_int: bool,
}

impl QopOptions {
    /// Only `auth`: what servers should offer unless they need body integrity.
    pub const AUTH: Self = Self { auth: true, auth_int: false };

    pub(crate) fn from_list(list: &str) -> Self {
        let mut out = Self::default();
        for token in list.split(',').map(str::trim) {
            match Qop::from_token(token) {
                Ok(Qop::Auth) => out.auth = true,
                Ok(Qop::AuthInt) => out.auth_int = true,
                Err(_) => {}
            }
        }
        out
    }

    /// Whether `qop` is among the options.
    pub fn contains(self, qop: Qop) -> bool {
        match qop {
            Qop::Auth => self.auth,
            Qop::AuthInt => self.auth_int,
        }
    }

    /// The option a client uses: `auth` when offered (it survives proxies that rewrite
    /// bodies), else `auth-int`, else none we support.
    pub fn preferred(self) -> Option<Qop> {
        if self.auth {
            Some(Qop::Auth)
        } else if self.auth_int {
            Some(Qop::AuthInt)
        } else {
            None
        }
    }
}

impl fmt::Display for QopOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.auth, self.auth_int) {
            (true, true) => f.write_str("auth,auth-int"),
            (true, false) => f.write_str("auth"),
            (false, true) => f.write_str("auth-int"),
            (false, false) => Ok(()),
        }
    }
}

/// Which header pair an exchange uses: 401/`WWW-Authenticate`/`Authorization` from a UAS or
/// registrar, 407/`Proxy-Authenticate`/`Proxy-Authorization` from a proxy (RFC 3261 §22.2,
/// §22.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthKind {
    /// User agent server or registrar.
    Www,
    /// Proxy (or a trunk provider's SBC, which usually challenges as one).
    Proxy,
}

impl AuthKind {
    /// The status code of the challenge response.
    pub fn status(self) -> u16 {
        match self {
            Self::Www => 401,
            Self::Proxy => 407,
        }
    }

    /// The header carrying challenges.
    pub fn challenge_header(self) -> &'static str {
        match self {
            Self::Www => "WWW-Authenticate",
            Self::Proxy => "Proxy-Authenticate",
        }
    }

    /// The header carrying credentials.
    pub fn credentials_header(self) -> &'static str {
        match self {
            Self::Www => "Authorization",
            Self::Proxy => "Proxy-Authorization",
        }
    }
}

/// The parts of a request that enter the digest (RFC 7616 §3.4.3): method, Request-URI as it
/// appears on the request line (RFC 3261 §22.4), and body (only used by `auth-int`).
#[derive(Debug, Clone, Copy)]
pub struct DigestRequest<'a> {
    /// The method, e.g. `INVITE`. For an ACK or CANCEL, RFC 3261 §22.1 has the UAC repeat the
    /// INVITE's credentials rather than compute new ones.
    pub method: &'a str,
    /// The Request-URI, e.g. `sip:+15551234567@trunk.example.com`.
    pub uri: &'a str,
    /// The message body; empty when there is none.
    pub body: &'a [u8],
    /// Who sent it, as the server wants nonces bound to (e.g. the source address's bytes);
    /// empty binds to nobody. See [`DigestRequest::from_client`].
    pub client: &'a [u8],
}

impl<'a> DigestRequest<'a> {
    /// A request description.
    pub fn new(method: &'a str, uri: &'a str, body: &'a [u8]) -> Self {
        Self { method, uri, body, client: &[] }
    }

    /// Binds the server's nonces to `client` (its source address, say): a nonce issued to one
    /// client is foreign to another, and a response computed with a foreign nonce is not
    /// examined at all — it draws a fresh `stale` challenge. A password guess then needs a
    /// challenge received at the address it is sent from, so guesses from spoofed addresses
    /// are neither checked nor counted against the address they claim (see [`GuessThrottle`]).
    pub fn from_client(mut self, client: &'a [u8]) -> Self {
        self.client = client;
        self
    }
}

/// The HA1 a server stores instead of a password: `H(username ":" realm ":" password)` in
/// lower-case hex (RFC 7616 §3.4.2). Compute one per algorithm family you offer (MD5 and
/// SHA-256 produce different values); the `-sess` variants use the same stored value.
pub fn ha1(algorithm: Algorithm, username: &str, realm: &str, password: &str) -> String {
    hash::ha1_base(algorithm, username, realm, password).as_str().to_owned()
}
