//! The UAC side: answering 401/407 challenges and reusing them (RFC 3261 §22.2, §22.3).

use super::hash::{self, HexDigest, QopInputs};
use super::{AuthError, AuthKind, Challenge, Credentials, DigestRequest, Qop};

/// How many answered challenges a client remembers. A trunk call needs one or two (proxy and
/// UAS realms); the bound keeps a misbehaving peer from growing the list.
const MAX_CACHED: usize = 8;

/// A credentials header to add to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialsHeader {
    /// Which header: [`AuthKind::credentials_header`] names it.
    pub kind: AuthKind,
    /// The header value (`Digest username="…", …`).
    pub value: String,
}

/// A challenge we answered, kept so that later requests can carry credentials up front.
struct Answered {
    kind: AuthKind,
    challenge: Challenge,
    qop: Option<Qop>,
    /// HA1 for this nonce; for `-sess` it is bound to `session_cnonce`.
    ha1: HexDigest,
    /// The cnonce HA1 was computed with; `-sess` must keep using it (RFC 7616 §3.4.2).
    session_cnonce: Option<String>,
    /// Last nonce count sent with this nonce.
    nc: u32,
}

/// The client side of digest authentication for one set of credentials (RFC 3261 §22.2).
///
/// Sans-IO: the caller supplies each `cnonce` (RFC 7616 §3.4 wants it unpredictable, so take it
/// from a CSPRNG) and adds the returned header to the request.
pub struct DigestClient {
    username: String,
    password: String,
    realm: Option<String>,
    answered: Vec<Answered>,
}

impl std::fmt::Debug for DigestClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DigestClient")
            .field("username", &self.username)
            .field("realm", &self.realm)
            .field("answered", &self.answered.len())
            .finish_non_exhaustive()
    }
}

impl DigestClient {
    /// A client answering challenges of any realm with these credentials.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self { username: username.into(), password: password.into(), realm: None, answered: Vec::new() }
    }

    /// Answers only challenges for `realm` (RFC 3261 §22.1: a UA should not hand one
    /// account's password to every realm that asks).
    pub fn with_realm(mut self, realm: impl Into<String>) -> Self {
        self.realm = Some(realm.into());
        self
    }

    /// Answers a 401 (`kind = Www`) or 407 (`kind = Proxy`) response.
    ///
    /// - `challenges`: every `WWW-Authenticate` / `Proxy-Authenticate` value of the response.
    ///   The strongest supported algorithm wins, ties going to the server's order (RFC 7616
    ///   §3.7); `qop=auth` is preferred over `auth-int`; no `qop` means RFC 2069 mode.
    /// - `request`: the request being resent (its CSeq incremented, RFC 3261 §22.2).
    /// - `previous`: the credentials values of this `kind` that the challenged request carried,
    ///   if any. A new challenge for the same realm without `stale=TRUE` then means the server
    ///   refused them (RFC 7616 §3.3) and yields [`AuthError::CredentialsRejected`] — except
    ///   after a preemptive reuse (`nc` > 1) of an older nonce, which a server may answer with a
    ///   fresh nonce and no `stale`; that is retried once.
    /// - `cnonce`: a fresh client nonce.
    ///
    /// The answered challenge is remembered (replacing an older one for the same kind and
    /// realm) so that [`DigestClient::authorize`] can reuse it.
    pub fn respond(
        &mut self,
        kind: AuthKind,
        challenges: &[&str],
        request: &DigestRequest<'_>,
        previous: &[&str],
        cnonce: &str,
    ) -> Result<CredentialsHeader, AuthError> {
        let challenge = self.choose(challenges)?;
        if !challenge.stale && self.was_refused(&challenge, previous) {
            self.answered.retain(|a| !(a.kind == kind && a.challenge.realm == challenge.realm));
            return Err(AuthError::CredentialsRejected { realm: challenge.realm });
        }
        let qop = challenge.qop.and_then(|q| q.preferred());
        if qop.is_some() {
            check_cnonce(cnonce)?;
        }
        let algorithm = challenge.effective_algorithm();
        let base = hash::ha1_base(algorithm, &self.username, &challenge.realm, &self.password);
        let ha1 = hash::ha1_for(algorithm, base.as_bytes(), &challenge.nonce, cnonce);
        let session_cnonce = algorithm.is_session().then(|| cnonce.to_owned());
        let mut answered = Answered { kind, challenge, qop, ha1, session_cnonce, nc: 0 };
        let header = self.credentials(&mut answered, request, cnonce);
        self.answered.retain(|a| !(a.kind == kind && a.challenge.realm == answered.challenge.realm));
        if self.answered.len() >= MAX_CACHED {
            self.answered.remove(0);
        }
        self.answered.push(answered);
        header.ok_or(AuthError::NoUsableChallenge)
    }

    /// Credentials for a new request reusing the challenges answered so far (re-INVITE, BYE,
    /// re-REGISTER on a trunk), so it is not challenged again: same nonce, `nc` incremented
    /// (RFC 7616 §3.4.5, RFC 3261 §22.3). Empty when nothing was answered yet. If the server
    /// has retired the nonce it answers with `stale=TRUE` and [`DigestClient::respond`] takes
    /// over.
    pub fn authorize(&mut self, request: &DigestRequest<'_>, cnonce: &str) -> Vec<CredentialsHeader> {
        let mut out = Vec::with_capacity(self.answered.len());
        let mut answered = std::mem::take(&mut self.answered);
        for entry in &mut answered {
            if let Some(header) = self.credentials(entry, request, cnonce) {
                out.push(header);
            }
        }
        self.answered = answered;
        out
    }

    /// Forgets every answered challenge, e.g. when the account changes.
    pub fn forget(&mut self) {
        self.answered.clear();
    }

    fn choose(&self, challenges: &[&str]) -> Result<Challenge, AuthError> {
        let mut best: Option<Challenge> = None;
        for value in challenges {
            // A header we cannot even tokenise is skipped like an unknown scheme: another
            // header of the same response may still be usable.
            let Ok(parsed) = Challenge::parse_all(value) else { continue };
            for challenge in parsed {
                let usable = challenge.qop.is_none_or(|q| q.preferred().is_some())
                    && self.realm.as_ref().is_none_or(|r| *r == challenge.realm);
                let stronger = best
                    .as_ref()
                    .is_none_or(|b| challenge.effective_algorithm().strength() > b.effective_algorithm().strength());
                if usable && stronger {
                    best = Some(challenge);
                }
            }
        }
        best.ok_or(AuthError::NoUsableChallenge)
    }

    /// RFC 7616 §3.3: a challenge without `stale` in answer to credentials for its realm means
    /// the credentials were wrong.
    fn was_refused(&self, challenge: &Challenge, previous: &[&str]) -> bool {
        let sent = previous
            .iter()
            .filter_map(|v| Credentials::parse_all(v).ok())
            .flatten()
            .flatten()
            .find(|c| c.realm == challenge.realm && c.username == self.username);
        match sent {
            None => false,
            Some(sent) if sent.nonce == challenge.nonce => true,
            // A first answer to a challenge (nc 1, or RFC 2069 without nc) that draws a new
            // challenge was refused; a reuse of an older nonce may just have outlived it.
            Some(sent) => sent.nc.is_none_or(|nc| nc <= 1),
        }
    }

    /// Builds the next credentials for `entry`, or `None` once the nonce count is exhausted.
    fn credentials(
        &self,
        entry: &mut Answered,
        request: &DigestRequest<'_>,
        cnonce: &str,
    ) -> Option<CredentialsHeader> {
        let algorithm = entry.challenge.effective_algorithm();
        let qop = match entry.qop {
            Some(qop) => {
                let cnonce = entry.session_cnonce.as_deref().unwrap_or(cnonce);
                if check_cnonce(cnonce).is_err() {
                    return None;
                }
                entry.nc = entry.nc.checked_add(1)?;
                Some(QopInputs { nc: entry.nc, cnonce, qop })
            }
            None => None,
        };
        let ha2 = hash::ha2(algorithm, entry.qop, request.method, request.uri, request.body);
        let response = hash::response(algorithm, &entry.ha1, &entry.challenge.nonce, qop.as_ref(), &ha2);
        let credentials = Credentials {
            username: self.username.clone(),
            realm: entry.challenge.realm.clone(),
            nonce: entry.challenge.nonce.clone(),
            uri: request.uri.to_owned(),
            response: response.as_str().to_owned(),
            algorithm: entry.challenge.algorithm,
            cnonce: qop.as_ref().map(|q| q.cnonce.to_owned()),
            opaque: entry.challenge.opaque.clone(),
            qop: entry.qop,
            nc: qop.as_ref().map(|q| q.nc),
        };
        Some(CredentialsHeader { kind: entry.kind, value: credentials.to_string() })
    }
}

fn check_cnonce(cnonce: &str) -> Result<(), AuthError> {
    if cnonce.is_empty() || cnonce.chars().any(char::is_control) {
        return Err(AuthError::InvalidCnonce);
    }
    Ok(())
}
