//! The UAS / proxy side: issuing challenges and verifying credentials (RFC 3261 §22.4).

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use subtle::ConstantTimeEq;

use super::hash::{self, QopInputs};
use super::params::parse_auth_values;
use super::{Algorithm, AuthError, AuthKind, Challenge, Credentials, DigestRequest, QopOptions};

/// Domain separation for the nonce MAC, so the secret can be shared with other HMAC uses.
const NONCE_LABEL: &[u8] = b"patchbay-sip digest nonce v1\0";
const OPAQUE_LABEL: &[u8] = b"patchbay-sip digest opaque v1\0";
/// timestamp (8) ‖ sequence (8) ‖ truncated MAC (16).
const NONCE_BYTES: usize = 32;
const MAC_BYTES: usize = 16;
/// Clocks of a cluster sharing one secret may disagree a little.
const FUTURE_SKEW_SECS: u64 = 5;

/// What the user store knows about a user.
#[derive(Clone, PartialEq, Eq)]
pub enum StoredSecret {
    /// The plaintext password.
    Password(String),
    /// `H(username ":" realm ":" password)` in hex for the algorithm family asked for (see
    /// [`super::ha1`]), so that plaintext passwords need not be stored (RFC 7616 §5.2).
    Ha1(String),
}

impl std::fmt::Debug for StoredSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Both variants are password-equivalent.
        f.write_str(match self {
            Self::Password(_) => "Password(..)",
            Self::Ha1(_) => "Ha1(..)",
        })
    }
}

/// Where the server looks users up. Implemented for closures
/// `Fn(&str, &str, Algorithm) -> Option<StoredSecret>`.
pub trait CredentialStore {
    /// The secret of `username` in `realm`, for `algorithm` (which matters only for
    /// [`StoredSecret::Ha1`]: MD5 and SHA-256 HA1 differ). `None` for an unknown user.
    fn lookup(&self, username: &str, realm: &str, algorithm: Algorithm) -> Option<StoredSecret>;
}

impl<F> CredentialStore for F
where
    F: Fn(&str, &str, Algorithm) -> Option<StoredSecret>,
{
    fn lookup(&self, username: &str, realm: &str, algorithm: Algorithm) -> Option<StoredSecret> {
        self(username, realm, algorithm)
    }
}

/// Configuration of a [`DigestServer`].
#[derive(Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// The realm challenged for (RFC 3261 §22.1: typically the host or domain name).
    pub realm: String,
    /// The MAC key for nonces, at least 16 bytes. Draw it at random per process unless several
    /// servers must accept each other's nonces; see [`DigestServer::new`] on restarts.
    pub secret: Vec<u8>,
    /// 401/`WWW-Authenticate` or 407/`Proxy-Authenticate`.
    pub kind: AuthKind,
    /// Algorithms offered, one challenge each, most preferred first (RFC 7616 §3.7).
    /// Default: SHA-256, then MD5 for the many SIP devices that know nothing else.
    pub algorithms: Vec<Algorithm>,
    /// `qop` options offered. Default: `auth`.
    pub qop: QopOptions,
    /// Accept RFC 2069 responses without `qop`. They have no nonce count, so each nonce is
    /// then accepted once and reuse draws a stale challenge. Default: false.
    pub allow_legacy: bool,
    /// How long a nonce is valid, in seconds. Default: 300.
    pub nonce_lifetime_secs: u64,
    /// How many nonces' counts are remembered for replay protection. Default: 4096.
    pub max_tracked_nonces: usize,
}

impl ServerConfig {
    /// Defaults for `realm` and `secret` (see the field docs).
    pub fn new(realm: impl Into<String>, secret: impl Into<Vec<u8>>) -> Self {
        Self {
            realm: realm.into(),
            secret: secret.into(),
            kind: AuthKind::Www,
            algorithms: vec![Algorithm::Sha256, Algorithm::Md5],
            qop: QopOptions::AUTH,
            allow_legacy: false,
            nonce_lifetime_secs: 300,
            max_tracked_nonces: 4096,
        }
    }
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("realm", &self.realm)
            .field("kind", &self.kind)
            .field("algorithms", &self.algorithms)
            .field("qop", &self.qop)
            .field("allow_legacy", &self.allow_legacy)
            .field("nonce_lifetime_secs", &self.nonce_lifetime_secs)
            .field("max_tracked_nonces", &self.max_tracked_nonces)
            .finish_non_exhaustive()
    }
}

/// The result of [`DigestServer::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The credentials are valid: process the request as `username`.
    Authorized {
        /// The authenticated username.
        username: String,
    },
    /// Send a 401/407 ([`AuthKind::status`]) with one challenge header field per entry, in
    /// order (RFC 7616 §3.7).
    Challenge {
        /// The challenges; print each with `to_string()`.
        challenges: Vec<Challenge>,
        /// Whether they carry `stale=TRUE`: the password was right, only the nonce was old.
        stale: bool,
    },
    /// The credentials are not acceptable. RFC 3261 §22.4 leaves the response to the server:
    /// a 403, or a fresh challenge from [`DigestServer::challenge`] to let a user retype a
    /// password. Do not tell the peer which reason applied.
    Rejected(Rejection),
}

/// Why credentials were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// The credentials header does not parse.
    #[error("malformed credentials: {0}")]
    Malformed(AuthError),
    /// The `algorithm` was not offered.
    #[error("algorithm not offered")]
    AlgorithmNotOffered,
    /// No `qop` and RFC 2069 mode is not allowed.
    #[error("qop required")]
    QopRequired,
    /// The `qop` value was not offered.
    #[error("qop not offered")]
    QopNotOffered,
    /// The `uri` parameter is not the Request-URI (RFC 7616 §3.4.6).
    #[error("digest uri does not match the Request-URI")]
    UriMismatch,
    /// The `opaque` parameter is not the one this server sends.
    #[error("opaque does not match")]
    OpaqueMismatch,
    /// The store does not know the user.
    #[error("unknown user")]
    UnknownUser,
    /// The `response` is wrong: wrong password, or tampered method, URI or body.
    #[error("wrong credentials")]
    WrongCredentials,
    /// The nonce count was not above the highest seen for this nonce (RFC 7616 §3.4.5).
    #[error("replayed nonce count")]
    Replay,
}

/// What a nonce says about itself once its MAC is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NonceState {
    /// Ours and fresh.
    Valid { seq: u64 },
    /// Ours but expired, issued before this server started, or its count was forgotten.
    Stale,
    /// Not ours (another secret, another client, or garbage): a stale challenge without the
    /// digest being examined (RFC 7616 §3.3 has `stale` for a valid digest on an invalid nonce;
    /// examining it would make every foreign nonce a free password oracle).
    Foreign,
}

/// Highest nonce count per nonce, bounded (RFC 7616 §3.4.5, §5.5).
///
/// Keyed by the nonce's sequence number. When full, the lowest sequence is evicted and `floor`
/// rises past it, and any nonce below `floor` that is no longer tracked counts as stale: a
/// forgotten nonce is never mistaken for an unused one, so eviction cannot open a replay.
struct NonceCounts {
    counts: BTreeMap<u64, u32>,
    floor: u64,
    capacity: usize,
}

enum CountCheck {
    Fresh,
    Replay,
    Forgotten,
}

impl NonceCounts {
    fn check_and_record(&mut self, seq: u64, nc: u32) -> CountCheck {
        if let Some(highest) = self.counts.get_mut(&seq) {
            if nc <= *highest {
                return CountCheck::Replay;
            }
            *highest = nc;
            return CountCheck::Fresh;
        }
        if seq < self.floor {
            return CountCheck::Forgotten;
        }
        if self.counts.len() >= self.capacity {
            if let Some((evicted, _)) = self.counts.pop_first() {
                self.floor = self.floor.max(evicted.saturating_add(1));
            }
            if seq < self.floor {
                return CountCheck::Forgotten;
            }
        }
        self.counts.insert(seq, nc);
        CountCheck::Fresh
    }
}

/// The server side of digest authentication for one realm (RFC 3261 §22.4).
pub struct DigestServer {
    config: ServerConfig,
    opaque: String,
    started_at: u64,
    next_seq: u64,
    counts: NonceCounts,
}

impl std::fmt::Debug for DigestServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DigestServer")
            .field("config", &self.config)
            .field("tracked_nonces", &self.counts.counts.len())
            .finish_non_exhaustive()
    }
}

impl DigestServer {
    /// A server started at `now` (seconds since the UNIX epoch).
    ///
    /// Nonces issued before `now` are answered with a stale challenge: their counts died with
    /// the previous process, so accepting them would reopen replays. (Only a restart within
    /// the same second under the same secret escapes this; a per-process random secret does
    /// not have the problem.)
    pub fn new(config: ServerConfig, now: u64) -> Result<Self, AuthError> {
        if config.secret.len() < 16 {
            return Err(AuthError::InvalidConfig("secret shorter than 16 bytes"));
        }
        if config.realm.is_empty() || config.realm.chars().any(char::is_control) {
            return Err(AuthError::InvalidConfig("realm empty or with control characters"));
        }
        if config.algorithms.is_empty() {
            return Err(AuthError::InvalidConfig("no algorithm offered"));
        }
        if config.qop.preferred().is_none() && !config.allow_legacy {
            return Err(AuthError::InvalidConfig("no qop offered and RFC 2069 mode not allowed"));
        }
        if config.nonce_lifetime_secs == 0 || config.max_tracked_nonces == 0 {
            return Err(AuthError::InvalidConfig("nonce lifetime and tracked nonces must be positive"));
        }
        let opaque_mac = hash::hmac_sha256(&config.secret, &[OPAQUE_LABEL, config.realm.as_bytes()]);
        let opaque = URL_SAFE_NO_PAD.encode(&opaque_mac[..12]);
        let counts = NonceCounts { counts: BTreeMap::new(), floor: 0, capacity: config.max_tracked_nonces };
        Ok(Self { config, opaque, started_at: now, next_seq: 0, counts })
    }

    /// The header kind this server challenges with.
    pub fn kind(&self) -> AuthKind {
        self.config.kind
    }

    /// Fresh challenges (one per offered algorithm, sharing one nonce) for a request without
    /// credentials, or after a [`Outcome::Rejected`] the caller wants to turn into a retry.
    pub fn challenge(&mut self, now: u64) -> Vec<Challenge> {
        self.challenges(now, false, &[])
    }

    /// [`DigestServer::challenge`] with the nonce bound to `request`'s client.
    pub fn challenge_for(&mut self, now: u64, request: &DigestRequest<'_>) -> Vec<Challenge> {
        self.challenges(now, false, request.client)
    }

    /// The username credentials for this server's realm name, whether or not they are valid:
    /// what a [`super::GuessThrottle`] counts attempts against. `None` without such credentials.
    pub fn username_in(&self, credentials: &[&str]) -> Option<String> {
        self.find_credentials(credentials).ok().flatten().map(|c| c.username)
    }

    /// Checks the credentials of a request (RFC 3261 §22.4, RFC 7616 §3.4).
    ///
    /// `credentials` are the request's `Authorization` (or, for [`AuthKind::Proxy`],
    /// `Proxy-Authorization`) values; those for other realms are ignored, as RFC 3261 §22.3
    /// has a proxy leave them for the next hop.
    pub fn verify(
        &mut self,
        now: u64,
        request: &DigestRequest<'_>,
        credentials: &[&str],
        store: &impl CredentialStore,
    ) -> Outcome {
        let creds = match self.find_credentials(credentials) {
            Ok(Some(creds)) => creds,
            Ok(None) => {
                return Outcome::Challenge { challenges: self.challenges(now, false, request.client), stale: false };
            }
            Err(e) => return Outcome::Rejected(Rejection::Malformed(e)),
        };
        // A nonce we did not issue to this client (another secret, a restart, another address)
        // proves nothing about who answers: nothing else is examined — not the response, not
        // the other parameters — so it is no oracle for a guesser who never saw a challenge,
        // and no rejection can be pinned on an address by spoofing it (every `Rejected` below
        // comes from a client that received a challenge where it claims to be). A `stale`
        // challenge lets a client that knows the password retry without asking its user
        // (RFC 7616 §3.3).
        let nonce = self.nonce_state(now, &creds.nonce, request.client);
        if nonce == NonceState::Foreign {
            return self.stale(now, request.client);
        }
        if let Err(rejection) = self.check_parameters(&creds, request) {
            return Outcome::Rejected(rejection);
        }
        let algorithm = creds.effective_algorithm();
        let Some(secret) = store.lookup(&creds.username, &self.config.realm, algorithm) else {
            return Outcome::Rejected(Rejection::UnknownUser);
        };
        if !response_matches(&creds, algorithm, &secret, request) {
            return Outcome::Rejected(Rejection::WrongCredentials);
        }
        // Only now, with the password proven, does the nonce's state decide between
        // authorisation and a stale challenge (RFC 7616 §3.3).
        let seq = match nonce {
            NonceState::Valid { seq } => seq,
            NonceState::Stale | NonceState::Foreign => return self.stale(now, request.client),
        };
        // RFC 2069 mode has no count: each nonce is good for one request.
        match self.counts.check_and_record(seq, creds.nc.unwrap_or(1)) {
            CountCheck::Fresh => Outcome::Authorized { username: creds.username },
            CountCheck::Replay if creds.qop.is_some() => Outcome::Rejected(Rejection::Replay),
            CountCheck::Replay | CountCheck::Forgotten => self.stale(now, request.client),
        }
    }

    fn stale(&mut self, now: u64, client: &[u8]) -> Outcome {
        Outcome::Challenge { challenges: self.challenges(now, true, client), stale: true }
    }

    fn challenges(&mut self, now: u64, stale: bool, client: &[u8]) -> Vec<Challenge> {
        let nonce = self.issue_nonce(now, client);
        let qop = self.config.qop.preferred().map(|_| self.config.qop);
        self.config
            .algorithms
            .iter()
            .map(|&algorithm| {
                let mut challenge = Challenge::new(self.config.realm.clone(), nonce.clone());
                challenge.opaque = Some(self.opaque.clone());
                challenge.algorithm = Some(algorithm);
                challenge.qop = qop;
                challenge.stale = stale;
                challenge
            })
            .collect()
    }

    fn issue_nonce(&mut self, now: u64, client: &[u8]) -> String {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        let mut raw = [0u8; NONCE_BYTES];
        raw[..8].copy_from_slice(&now.to_be_bytes());
        raw[8..16].copy_from_slice(&seq.to_be_bytes());
        let mac = self.nonce_mac(&raw[..16], client);
        raw[16..].copy_from_slice(&mac[..MAC_BYTES]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    fn nonce_mac(&self, payload: &[u8], client: &[u8]) -> [u8; 32] {
        // The realm is in the MAC so a nonce of one realm cannot be replayed against another
        // sharing the secret; the client (length first, so realm and client cannot trade
        // bytes) so that a nonce issued to one address is foreign to every other.
        let realm = self.config.realm.as_bytes();
        let client_len = (client.len() as u64).to_be_bytes();
        hash::hmac_sha256(&self.config.secret, &[NONCE_LABEL, payload, &client_len, client, realm])
    }

    fn nonce_state(&self, now: u64, nonce: &str, client: &[u8]) -> NonceState {
        let mut raw = [0u8; NONCE_BYTES + 3];
        if nonce.len() != 43 {
            return NonceState::Foreign;
        }
        match URL_SAFE_NO_PAD.decode_slice(nonce, &mut raw) {
            Ok(NONCE_BYTES) => {}
            _ => return NonceState::Foreign,
        }
        let mac = self.nonce_mac(&raw[..16], client);
        if !bool::from(mac[..MAC_BYTES].ct_eq(&raw[16..NONCE_BYTES])) {
            return NonceState::Foreign;
        }
        let mut word = [0u8; 8];
        word.copy_from_slice(&raw[..8]);
        let issued = u64::from_be_bytes(word);
        word.copy_from_slice(&raw[8..16]);
        let seq = u64::from_be_bytes(word);
        let expired = now.saturating_sub(issued) > self.config.nonce_lifetime_secs;
        if expired || issued < self.started_at || issued > now.saturating_add(FUTURE_SKEW_SECS) {
            return NonceState::Stale;
        }
        NonceState::Valid { seq }
    }

    fn find_credentials(&self, values: &[&str]) -> Result<Option<Credentials>, AuthError> {
        for value in values {
            for digest in parse_auth_values(value)?.iter().filter(|v| v.is_digest()) {
                // Look at the realm first so that another realm's odd credentials do not make
                // ours fail.
                if digest.get("realm")? == Some(self.config.realm.as_str()) {
                    return Credentials::from_value(digest).map(Some);
                }
            }
        }
        Ok(None)
    }

    fn check_parameters(&self, creds: &Credentials, request: &DigestRequest<'_>) -> Result<(), Rejection> {
        if !self.config.algorithms.contains(&creds.effective_algorithm()) {
            return Err(Rejection::AlgorithmNotOffered);
        }
        match creds.qop {
            None if !self.config.allow_legacy => return Err(Rejection::QopRequired),
            Some(qop) if !self.config.qop.contains(qop) => return Err(Rejection::QopNotOffered),
            _ => {}
        }
        if !uri_matches(&creds.uri, request.uri) {
            return Err(Rejection::UriMismatch);
        }
        // RFC 7616 §3.4 has the client return opaque unchanged; a client that drops it is
        // tolerated (it adds nothing to security here, the nonce carries its own MAC).
        if creds.opaque.as_ref().is_some_and(|o| *o != self.opaque) {
            return Err(Rejection::OpaqueMismatch);
        }
        Ok(())
    }
}

/// RFC 7616 §3.4.6 / RFC 3261 §22.4: the `uri` must name the Request-URI, so that credentials
/// captured for one request cannot be pasted onto another. Compared exactly, except for ASCII
/// case (SIP schemes and hosts are case-insensitive, RFC 3261 §19.1.4, and a proxy may have
/// normalised them); a difference in case only cannot point the request elsewhere.
fn uri_matches(digest_uri: &str, request_uri: &str) -> bool {
    digest_uri == request_uri || digest_uri.eq_ignore_ascii_case(request_uri)
}

fn response_matches(
    creds: &Credentials,
    algorithm: Algorithm,
    secret: &StoredSecret,
    request: &DigestRequest<'_>,
) -> bool {
    let base = match secret {
        StoredSecret::Password(password) => hash::ha1_base(algorithm, &creds.username, &creds.realm, password),
        StoredSecret::Ha1(ha1) => {
            let Some(ha1) = hash::HexDigest::from_hex_str(ha1) else { return false };
            ha1
        }
    };
    let cnonce = creds.cnonce.as_deref().unwrap_or_default();
    let ha1 = hash::ha1_for(algorithm, base.as_bytes(), &creds.nonce, cnonce);
    // HA2 covers the `uri` parameter as sent (RFC 7616 §3.4.3 digest-uri); `check_parameters`
    // already tied it to the Request-URI.
    let ha2 = hash::ha2(algorithm, creds.qop, request.method, &creds.uri, request.body);
    let qop = match (creds.qop, creds.nc) {
        (Some(qop), Some(nc)) => Some(QopInputs { nc, cnonce, qop }),
        _ => None,
    };
    let expected = hash::response(algorithm, &ha1, &creds.nonce, qop.as_ref(), &ha2);
    let Some(given) = hash::HexDigest::from_hex_str(&creds.response) else { return false };
    // Lengths are public (they follow from the algorithm); the contents are compared in
    // constant time so that the response cannot be learnt byte by byte.
    bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_counts_never_forget_into_acceptance() {
        let mut counts = NonceCounts { counts: BTreeMap::new(), floor: 0, capacity: 2 };
        assert!(matches!(counts.check_and_record(5, 1), CountCheck::Fresh));
        assert!(matches!(counts.check_and_record(3, 1), CountCheck::Fresh));
        assert!(matches!(counts.check_and_record(5, 1), CountCheck::Replay));
        assert!(matches!(counts.check_and_record(5, 2), CountCheck::Fresh));
        // Full: 3 is evicted, the floor moves to 4, and 3 and 2 are now forgotten.
        assert!(matches!(counts.check_and_record(7, 1), CountCheck::Fresh));
        assert!(matches!(counts.check_and_record(3, 2), CountCheck::Forgotten));
        assert!(matches!(counts.check_and_record(2, 1), CountCheck::Forgotten));
        assert!(matches!(counts.check_and_record(7, 1), CountCheck::Replay));
    }

    #[test]
    fn nonce_rejects_tampering() {
        let config = ServerConfig::new("example.com", vec![7u8; 32]);
        let mut server = DigestServer::new(config, 1000).unwrap();
        let nonce = server.issue_nonce(1000, b"192.0.2.1");
        assert!(matches!(server.nonce_state(1000, &nonce, b"192.0.2.1"), NonceState::Valid { seq: 0 }));
        assert!(matches!(server.nonce_state(1301, &nonce, b"192.0.2.1"), NonceState::Stale));
        // Issued to one client, foreign to any other.
        assert!(matches!(server.nonce_state(1000, &nonce, b"192.0.2.10"), NonceState::Foreign));
        assert!(matches!(server.nonce_state(1000, &nonce, b""), NonceState::Foreign));
        let mut tampered = nonce.into_bytes();
        tampered[3] = if tampered[3] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert!(matches!(server.nonce_state(1000, &tampered, b"192.0.2.1"), NonceState::Foreign));
    }
}
