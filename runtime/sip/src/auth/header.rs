//! Typed challenges and credentials: parsing and printing (RFC 3261 §25.1 `challenge` and
//! `credentials`, RFC 7616 §3.3 and §3.4).

use std::fmt;
use std::str::FromStr;

use super::params::{AuthValue, parse_auth_values, write_quoted};
use super::{Algorithm, AuthError, Qop, QopOptions};

/// One `Digest` challenge from `WWW-Authenticate` or `Proxy-Authenticate` (RFC 7616 §3.3,
/// RFC 3261 §22.4 and §25.1 `digest-cln`).
///
/// Parameters this crate does not use (`charset`, `userhash`, extension params) are ignored
/// when parsing and not printed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Challenge {
    /// `realm`: the protection space; shown to users and part of HA1.
    pub realm: String,
    /// `nonce`: server-chosen, opaque to the client.
    pub nonce: String,
    /// `opaque`: returned unchanged by the client (RFC 7616 §3.3).
    pub opaque: Option<String>,
    /// `algorithm`; absent means MD5 (RFC 7616 §3.3). Kept as sent so that a client can echo
    /// exactly what an old server offered.
    pub algorithm: Option<Algorithm>,
    /// `qop` options; `None` is the RFC 2069 legacy mode (no `cnonce`/`nc`). `Some` with no
    /// known option means the server only offers qop values we do not implement.
    pub qop: Option<QopOptions>,
    /// `stale=TRUE`: the nonce expired but the previous credentials were right (RFC 7616 §3.3).
    pub stale: bool,
    /// `domain`: space-separated URIs of the protection space, kept as one string.
    pub domain: Option<String>,
}

impl Challenge {
    /// A challenge with only `realm` and `nonce`, i.e. MD5 in the RFC 2069 legacy mode; set
    /// the other fields as needed.
    pub fn new(realm: impl Into<String>, nonce: impl Into<String>) -> Self {
        Self {
            realm: realm.into(),
            nonce: nonce.into(),
            opaque: None,
            algorithm: None,
            qop: None,
            stale: false,
            domain: None,
        }
    }

    /// The algorithm in effect: MD5 when the parameter is absent (RFC 7616 §3.3).
    pub fn effective_algorithm(&self) -> Algorithm {
        self.algorithm.unwrap_or(Algorithm::Md5)
    }

    /// Every `Digest` challenge in one header value that this crate can answer, in the order
    /// given. Other schemes (`Basic`, …) and digest challenges with an algorithm we do not
    /// implement (e.g. `SHA-512-256`) are skipped, as are digest challenges lacking `realm` or
    /// `nonce`; only a value that cannot be tokenised at all is an error.
    pub fn parse_all(value: &str) -> Result<Vec<Challenge>, AuthError> {
        Ok(parse_auth_values(value)?
            .iter()
            .filter(|v| v.is_digest())
            .filter_map(|v| Self::from_value(v).ok())
            .collect())
    }

    fn from_value(value: &AuthValue<'_>) -> Result<Self, AuthError> {
        let algorithm = value.get("algorithm")?.map(Algorithm::from_token).transpose()?;
        let qop = value.get("qop")?.map(QopOptions::from_list);
        let stale = value.get("stale")?.is_some_and(|s| s.eq_ignore_ascii_case("true"));
        Ok(Self {
            realm: value.require("realm", "challenge without realm")?.to_owned(),
            nonce: value.require("nonce", "challenge without nonce")?.to_owned(),
            opaque: value.get("opaque")?.map(str::to_owned),
            algorithm,
            qop,
            stale,
            domain: value.get("domain")?.map(str::to_owned),
        })
    }
}

impl FromStr for Challenge {
    type Err = AuthError;

    /// The first `Digest` challenge in the value; unlike [`Challenge::parse_all`] it reports
    /// why that challenge is unusable.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let values = parse_auth_values(s)?;
        let digest = values.iter().find(|v| v.is_digest()).ok_or(AuthError::Malformed("no Digest challenge"))?;
        Self::from_value(digest)
    }
}

impl fmt::Display for Challenge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Digest realm=")?;
        write_quoted(f, &self.realm)?;
        if let Some(domain) = &self.domain {
            f.write_str(", domain=")?;
            write_quoted(f, domain)?;
        }
        f.write_str(", nonce=")?;
        write_quoted(f, &self.nonce)?;
        if let Some(opaque) = &self.opaque {
            f.write_str(", opaque=")?;
            write_quoted(f, opaque)?;
        }
        if let Some(algorithm) = self.algorithm {
            write!(f, ", algorithm={}", algorithm.as_str())?;
        }
        if let Some(qop) = self.qop {
            write!(f, ", qop=\"{qop}\"")?;
        }
        if self.stale {
            f.write_str(", stale=TRUE")?;
        }
        Ok(())
    }
}

/// `Digest` credentials from `Authorization` or `Proxy-Authorization` (RFC 7616 §3.4, RFC 3261
/// §22.4 and §25.1 `digest-response`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Credentials {
    /// `username`.
    pub username: String,
    /// `realm`, copied from the challenge.
    pub realm: String,
    /// `nonce`, copied from the challenge.
    pub nonce: String,
    /// `uri`: the Request-URI of the request (RFC 3261 §22.4 `digest-uri`).
    pub uri: String,
    /// `response`: the hex digest proving knowledge of the password.
    pub response: String,
    /// `algorithm`, echoed from the challenge (absent means MD5).
    pub algorithm: Option<Algorithm>,
    /// `cnonce`; present exactly when `qop` is.
    pub cnonce: Option<String>,
    /// `opaque`, echoed from the challenge.
    pub opaque: Option<String>,
    /// `qop`; `None` is the RFC 2069 legacy mode.
    pub qop: Option<Qop>,
    /// `nc`, the nonce count; present exactly when `qop` is.
    pub nc: Option<u32>,
}

impl Credentials {
    /// The algorithm in effect: MD5 when the parameter is absent (RFC 7616 §3.4).
    pub fn effective_algorithm(&self) -> Algorithm {
        self.algorithm.unwrap_or(Algorithm::Md5)
    }

    /// Every `Digest` credentials in one header value, each parsed or rejected on its own;
    /// other schemes are skipped.
    pub fn parse_all(value: &str) -> Result<Vec<Result<Credentials, AuthError>>, AuthError> {
        Ok(parse_auth_values(value)?.iter().filter(|v| v.is_digest()).map(Self::from_value).collect())
    }

    pub(crate) fn from_value(value: &AuthValue<'_>) -> Result<Self, AuthError> {
        if value.get("userhash")?.is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Err(AuthError::Unsupported("userhash"));
        }
        let algorithm = value.get("algorithm")?.map(Algorithm::from_token).transpose()?;
        let qop = value.get("qop")?.map(Qop::from_token).transpose()?;
        let cnonce = value.get("cnonce")?.map(str::to_owned);
        let nc = value.get("nc")?.map(parse_nc).transpose()?;
        // RFC 7616 §3.4: cnonce and nc MUST be sent with qop and MUST NOT without it.
        if qop.is_some() != cnonce.is_some() || qop.is_some() != nc.is_some() {
            return Err(AuthError::Malformed("qop, cnonce and nc must appear together"));
        }
        Ok(Self {
            username: value.require("username", "credentials without username")?.to_owned(),
            realm: value.require("realm", "credentials without realm")?.to_owned(),
            nonce: value.require("nonce", "credentials without nonce")?.to_owned(),
            uri: value.require("uri", "credentials without uri")?.to_owned(),
            response: value.require("response", "credentials without response")?.to_owned(),
            algorithm,
            cnonce,
            opaque: value.get("opaque")?.map(str::to_owned),
            qop,
            nc,
        })
    }
}

/// `nc-value = 8LHEX` (RFC 7616 §3.4); shorter values are accepted because some clients drop
/// leading zeros, and upper case because hex is hex.
fn parse_nc(s: &str) -> Result<u32, AuthError> {
    if s.is_empty() || s.len() > 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AuthError::Malformed("nc is not 8 hex digits"));
    }
    u32::from_str_radix(s, 16).map_err(|_| AuthError::Malformed("nc is not 8 hex digits"))
}

impl FromStr for Credentials {
    type Err = AuthError;

    /// The first `Digest` credentials in the value.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let values = parse_auth_values(s)?;
        let digest = values.iter().find(|v| v.is_digest()).ok_or(AuthError::Malformed("no Digest credentials"))?;
        Self::from_value(digest)
    }
}

impl fmt::Display for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Digest username=")?;
        write_quoted(f, &self.username)?;
        f.write_str(", realm=")?;
        write_quoted(f, &self.realm)?;
        f.write_str(", nonce=")?;
        write_quoted(f, &self.nonce)?;
        f.write_str(", uri=")?;
        write_quoted(f, &self.uri)?;
        f.write_str(", response=")?;
        write_quoted(f, &self.response)?;
        if let Some(algorithm) = self.algorithm {
            write!(f, ", algorithm={}", algorithm.as_str())?;
        }
        if let Some(cnonce) = &self.cnonce {
            f.write_str(", cnonce=")?;
            write_quoted(f, cnonce)?;
        }
        if let Some(opaque) = &self.opaque {
            f.write_str(", opaque=")?;
            write_quoted(f, opaque)?;
        }
        // qop and nc are unquoted in credentials (RFC 7616 §3.4, RFC 3261 §25.1
        // `message-qop`, `nonce-count`), unlike qop in a challenge.
        if let Some(qop) = self.qop {
            write!(f, ", qop={}", qop.as_str())?;
        }
        if let Some(nc) = self.nc {
            write!(f, ", nc={nc:08x}")?;
        }
        Ok(())
    }
}
