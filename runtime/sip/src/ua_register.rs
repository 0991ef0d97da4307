//! The registration client of the user agent core (RFC 3261 §10.2): keeps a binding of our
//! Contact at a carrier's registrar, answering its digest challenges with the same code as
//! calls (`retry_with_credentials` in `ua_client.rs`), refreshing before the binding expires,
//! and backing off when the registrar fails or refuses.
//!
//! REGISTER runs through the user agent's one transaction layer; its client transactions are
//! owned by `TxOwner::Registration`, so responses and timeouts find their registration the
//! way a call's find their call.

use std::cmp::Reverse;
use std::fmt;
use std::time::{Duration, Instant};

use rsip::Header;
use rsip::headers::UntypedHeader;

use super::{ALLOW, TxOwner, UaError, UaEvent, UserAgent};
use crate::auth::DigestClient;
use crate::transaction::{Peer, TransactionId};

/// Identifies a registration within one [`UserAgent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegRef(pub u64);

/// A binding to keep at a registrar, started with [`UserAgent::register`].
#[derive(Debug)]
pub struct Register {
    /// The next hop: the registrar or the trunk's outbound proxy (the shell resolves it; this
    /// crate does no DNS).
    pub peer: Peer,
    /// The Request-URI: the registrar's domain, e.g. `sip:carrier.test` (§10.2).
    pub registrar: rsip::Uri,
    /// The address of record, used as To and From, e.g. `sip:patchbay@carrier.test` (§10.2).
    pub aor: String,
    /// The user part of the Contact we bind, e.g. the trunk account name.
    pub contact_user: String,
    /// The expiry to ask for, in seconds; 0 asks for the default of 3600 (§10.2.1.1).
    pub expires: u32,
    /// Credentials for the registrar's 401/407 challenges; without them a challenge fails the
    /// registration.
    pub credentials: Option<DigestClient>,
}

/// Where a registration stands (RFC 3261 §10.2).
///
/// ```text
///   register()
///       │
///       ▼            2xx (§10.2.4)
///  Registering ───────────────────────► Registered ──┐ refresh_at: REGISTER again with the
///    │     ▲                             │    ▲      │ same Call-ID, CSeq+1 (§10.2.1, §10.3)
///    │     │ retry_at                    │    └──────┘ 2xx: new expires / refresh_at
///    │     │                             │
///    │     └────── Failed ◄──────────────┘ 3xx–6xx, timeout (as 408), refused credentials
///    └───────────────►                    (back-off; 403 and refused credentials retry slowly)
///
///  401/407 are answered with credentials and 423 is retried at once with Min-Expires
///  (§10.2.8) without a change of state.
///
///  unregister(), from any state ──► Unregistering ── final response or timeout ──► Unregistered
///  (REGISTER with Expires: 0 for our Contact, §10.2.2; the registration is then gone)
/// ```
///
/// Every change is reported as [`UaEvent::Registration`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationState {
    /// The first REGISTER (or one after a failure) is on its way.
    Registering,
    /// The registrar holds our binding.
    Registered {
        /// Seconds the registrar granted (§10.2.4: our Contact's `expires`, else Expires).
        expires: u32,
        /// When the refreshing REGISTER goes out.
        refresh_at: Instant,
        /// The Service-Route values of the 2xx (RFC 3608 §6), in order: the route our
        /// out-of-dialog requests through this registrar should take.
        service_route: Vec<String>,
        /// The Path values of the 2xx (RFC 3327 §5.3), in order: the proxies between us and
        /// the registrar that requests to us come back through.
        path: Vec<String>,
    },
    /// The last REGISTER failed; another goes out at `retry_at`.
    Failed {
        /// The final status, 408 when nothing answered (§8.1.3.1).
        status: u16,
        /// Why, in words: the reason phrase, or what went wrong on our side.
        reason: String,
        /// When the next REGISTER goes out: after the back-off, Retry-After when the registrar
        /// gave one, or an hour when it refused us (403, rejected credentials).
        retry_at: Instant,
    },
    /// The REGISTER removing our binding is on its way.
    Unregistering,
    /// The binding was removed (or the removal went unanswered); the registration is over.
    Unregistered,
}

impl RegistrationState {
    /// The state with the time to its next step, relative to `now` (`failed: 403 Forbidden,
    /// next attempt in 3600 s`), for logs and the API. The plain [`fmt::Display`] form leaves
    /// the time out, since an [`Instant`] means nothing without the current one.
    pub fn display_at(&self, now: Instant) -> RegistrationStateAt<'_> {
        RegistrationStateAt { state: self, now }
    }
}

impl fmt::Display for RegistrationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Registering => f.write_str("registering"),
            Self::Registered { .. } => f.write_str("registered"),
            Self::Failed { status, reason, .. } => write!(f, "failed: {status} {reason}"),
            Self::Unregistering => f.write_str("unregistering"),
            Self::Unregistered => f.write_str("unregistered"),
        }
    }
}

/// A [`RegistrationState`] shown with the time to its next step; see
/// [`RegistrationState::display_at`].
#[derive(Debug, Clone, Copy)]
pub struct RegistrationStateAt<'a> {
    state: &'a RegistrationState,
    now: Instant,
}

impl fmt::Display for RegistrationStateAt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.state {
            RegistrationState::Registered { expires, refresh_at, .. } => {
                let refresh_in = refresh_at.saturating_duration_since(self.now).as_secs();
                write!(f, "registered for {expires} s, refresh in {refresh_in} s")
            }
            RegistrationState::Failed { retry_at, .. } => {
                let retry_in = retry_at.saturating_duration_since(self.now).as_secs();
                write!(f, "{}, next attempt in {retry_in} s", self.state)
            }
            other => fmt::Display::fmt(other, f),
        }
    }
}

/// §10.2.1.1: without an expiry of its own a binding lasts an hour.
const DEFAULT_EXPIRES: u32 = 3600;

/// The first retry after a failure; each further failure in a row doubles it.
const FIRST_RETRY: Duration = Duration::from_secs(30);

/// The longest back-off between retries, before jitter.
const MAX_RETRY: Duration = Duration::from_secs(30 * 60);

/// The wait after the registrar refused us (403, or rejected credentials): a wrong password
/// or a suspended account is not fixed by hammering the carrier, which may block our address.
const REFUSED_RETRY: Duration = Duration::from_secs(3600);

/// Jitter on retries, in percent either way, so that a fleet thrown off by one carrier outage
/// does not come back in lock-step.
const JITTER_PERCENT: u64 = 20;

/// 423 Interval Too Brief answered in a row before the registration counts as failed.
const MAX_BRIEF_ROUNDS: u8 = 3;

/// A refresh goes out at least this long before the binding expires.
const REFRESH_MARGIN: u32 = 5;

/// Retry-After values beyond this are taken as this: a registrar's typo should not park a
/// trunk for years.
const MAX_RETRY_AFTER: u32 = 86_400;

/// One registration: what to bind, the REGISTER sequence (§10.2) and where it stands.
#[derive(Debug)]
pub(super) struct Registration {
    peer: Peer,
    registrar: rsip::Uri,
    aor: String,
    contact_user: String,
    /// The expiry to ask for: the application's, or the registrar's Min-Expires after a 423.
    expires: u32,
    pub(super) credentials: Option<DigestClient>,
    /// §10.2: every REGISTER of one registration carries the same Call-ID.
    call_id: String,
    from_tag: String,
    /// The CSeq of the last REGISTER sent (§10.2: one more for each).
    pub(super) cseq: u32,
    /// The REGISTER in flight. §10.2: no new REGISTER before it is answered or times out.
    pub(super) pending: Option<TransactionId>,
    /// 423s answered in a row: a registrar that keeps raising Min-Expires fails the
    /// registration instead of looping.
    brief_rounds: u8,
    state: RegistrationState,
    /// When the next REGISTER goes out (refresh or retry); entries of `reg_deadlines` that
    /// differ are stale.
    next_at: Option<Instant>,
    /// Failures in a row, for the back-off.
    failures: u32,
    /// The REGISTER with Expires: 0 has been sent (the state is then `Unregistering`).
    removal_sent: bool,
}

impl UserAgent {
    /// Starts keeping a binding at a registrar: sends the first REGISTER and returns the
    /// registration. Its progress arrives as [`UaEvent::Registration`], starting with
    /// [`RegistrationState::Registering`]; refreshes and retries run from
    /// [`UserAgent::handle_timeout`].
    pub fn register(&mut self, now: Instant, register: Register) -> RegRef {
        self.counter += 1;
        let reg = RegRef(self.counter);
        let call_id = format!("{}@{}", self.unique(), self.config.contact_host);
        let from_tag = self.unique();
        let expires = if register.expires == 0 { DEFAULT_EXPIRES } else { register.expires };
        self.registrations.insert(
            reg,
            Registration {
                peer: register.peer,
                registrar: register.registrar,
                aor: register.aor,
                contact_user: register.contact_user,
                expires,
                credentials: register.credentials,
                call_id,
                from_tag,
                cseq: 0,
                pending: None,
                brief_rounds: 0,
                state: RegistrationState::Registering,
                next_at: None,
                failures: 0,
                removal_sent: false,
            },
        );
        self.emit(UaEvent::Registration { reg, state: RegistrationState::Registering });
        self.send_register(now, reg);
        self.pump(now);
        reg
    }

    /// Removes our binding: a REGISTER with Expires: 0 for our Contact (§10.2.2; not `*`, which
    /// would remove other devices' bindings of the same account too). It goes out at once, or
    /// when the REGISTER in flight is answered (§10.2). The registration ends with
    /// [`RegistrationState::Unregistered`] once the removal is answered or times out.
    pub fn unregister(&mut self, now: Instant, reg: RegRef) -> Result<(), UaError> {
        let r = self.registrations.get_mut(&reg).ok_or(UaError::UnknownRegistration(reg))?;
        if matches!(r.state, RegistrationState::Unregistering | RegistrationState::Unregistered) {
            return Ok(());
        }
        r.next_at = None;
        let in_flight = r.pending.is_some();
        self.set_reg_state(reg, RegistrationState::Unregistering);
        if !in_flight {
            self.send_register(now, reg);
        }
        self.pump(now);
        Ok(())
    }

    /// Where a registration stands; `None` once it is over (after
    /// [`RegistrationState::Unregistered`]) or for an unknown one.
    pub fn registration(&self, reg: RegRef) -> Option<&RegistrationState> {
        self.registrations.get(&reg).map(|r| &r.state)
    }

    /// The Call-ID all of a registration's REGISTERs carry.
    pub fn registration_call_id(&self, reg: RegRef) -> Option<&str> {
        self.registrations.get(&reg).map(|r| r.call_id.as_str())
    }

    /// Sends the registration's next REGISTER: a new transaction, CSeq one higher, the same
    /// Call-ID (§10.2), Expires: 0 when unregistering.
    fn send_register(&mut self, now: Instant, reg: RegRef) {
        let Some(r) = self.registrations.get(&reg) else { return };
        let removal = r.state == RegistrationState::Unregistering;
        // §10.2.1.1: the expiry goes both in the Contact parameter, which registrars prefer,
        // and in Expires, for those that only read the header.
        let expires = if removal { 0 } else { r.expires };
        let (peer, registrar, aor, tag, call_id) =
            (r.peer, r.registrar.clone(), r.aor.clone(), r.from_tag.clone(), r.call_id.clone());
        let contact = self.contact_uri(Some(&r.contact_user), peer.transport);
        let owner = TxOwner::Registration(reg);
        let Some(cseq) = self.next_cseq(owner) else { return };
        let via = self.new_via(peer.transport);
        let headers = vec![
            via,
            Header::MaxForwards(70u32.into()),
            // §10.2: To and From both carry the address of record (From with our tag).
            Header::From(format!("<{aor}>;tag={tag}").into()),
            Header::To(format!("<{aor}>").into()),
            Header::CallId(call_id.into()),
            Header::CSeq(format!("{cseq} REGISTER").into()),
            Header::Contact(format!("<{contact}>;expires={expires}").into()),
            Header::Expires(expires.into()),
            Header::Allow(ALLOW.into()),
            // RFC 3327 §4: we accept a Path in the answer (kept in the state).
            Header::Supported("path".into()),
            Header::UserAgent(self.config.user_agent.clone().into()),
            Header::ContentLength(0u32.into()),
        ];
        // §10.2: the Request-URI names the registrar's domain, without user part.
        let mut request = rsip::Request {
            method: rsip::Method::Register,
            uri: registrar,
            version: rsip::Version::V2,
            headers: headers.into(),
            body: Vec::new(),
        };
        // §22.3: a refresh carries the credentials of the last challenge, so a trunk does not
        // challenge every REGISTER.
        self.add_credentials(owner, &mut request);
        match self.send_client(now, owner, peer, request, 0) {
            Some(tx) => {
                if let Some(r) = self.registrations.get_mut(&reg) {
                    r.pending = Some(tx);
                    r.removal_sent |= removal;
                }
            }
            None => self.register_failed(now, reg, 500, "REGISTER could not be sent".into(), None),
        }
    }

    /// A response to a REGISTER (401/407 not answered with credentials included).
    pub(super) fn on_register_response(
        &mut self,
        now: Instant,
        id: TransactionId,
        reg: RegRef,
        response: &rsip::Response,
    ) {
        let status = response.status_code.code();
        if status < 200 || !self.settle_pending(now, reg, id) {
            return;
        }
        match status {
            200..=299 => self.registered(now, reg, response),
            423 => {
                // §10.2.8: the registrar wants a longer expiry; ask again at once with its
                // Min-Expires. One that asks for no more than we did would loop: a failure.
                let min = header_value(&response.headers, "Min-Expires").and_then(leading_number);
                let raised = self.registrations.get_mut(&reg).is_some_and(|r| match min {
                    Some(min) if min > r.expires && r.brief_rounds < MAX_BRIEF_ROUNDS => {
                        r.expires = min;
                        r.brief_rounds += 1;
                        true
                    }
                    _ => false,
                });
                if raised {
                    self.send_register(now, reg);
                } else {
                    self.register_failed(now, reg, status, reason_of(response), None);
                }
            }
            401 | 407 => {
                // The challenge could not be answered (see `retry_with_credentials`).
                let answered = self.client_txs.get(&id).is_some_and(|tx| {
                    tx.request
                        .headers
                        .iter()
                        .any(|h| matches!(h, Header::Authorization(_) | Header::ProxyAuthorization(_)))
                });
                let why = match (self.registrations.get(&reg).is_some_and(|r| r.credentials.is_some()), answered) {
                    (false, _) => "no credentials for the challenge",
                    (true, true) => "credentials rejected",
                    (true, false) => "challenge not answerable",
                };
                let reason = format!("{} ({why})", reason_of(response));
                self.register_failed(now, reg, status, reason, None);
            }
            _ => {
                let retry_after = header_value(&response.headers, "Retry-After").and_then(leading_number);
                self.register_failed(now, reg, status, reason_of(response), retry_after);
            }
        }
    }

    /// A REGISTER got no final response in time (timer F): as a 408 (§8.1.3.1).
    pub(super) fn on_register_timeout(&mut self, now: Instant, id: TransactionId, reg: RegRef) {
        if self.settle_pending(now, reg, id) {
            self.register_failed(now, reg, 408, "Request Timeout".into(), None);
        }
    }

    /// The REGISTER `id` of `reg` has ended (final answer or timeout): true when it is the one
    /// in flight of a registration that goes on; an un-REGISTER's next step is taken here.
    fn settle_pending(&mut self, now: Instant, reg: RegRef, id: TransactionId) -> bool {
        let Some(r) = self.registrations.get_mut(&reg) else { return false };
        if r.pending != Some(id) {
            return false;
        }
        r.pending = None;
        if r.state == RegistrationState::Unregistering {
            self.unregister_step(now, reg);
            return false;
        }
        true
    }

    /// The REGISTER in flight while unregistering has ended: send the removal if it was an
    /// older REGISTER (§10.2: one at a time), else the registration is over, whatever the
    /// answer — a registrar that refuses the removal lets the binding expire anyway.
    fn unregister_step(&mut self, now: Instant, reg: RegRef) {
        if self.registrations.get(&reg).is_some_and(|r| !r.removal_sent) {
            self.send_register(now, reg);
        } else {
            self.registrations.remove(&reg);
            self.emit(UaEvent::Registration { reg, state: RegistrationState::Unregistered });
        }
    }

    /// A 2xx to a REGISTER: the binding holds for what the registrar granted (§10.2.4).
    fn registered(&mut self, now: Instant, reg: RegRef, response: &rsip::Response) {
        if let Some(r) = self.registrations.get_mut(&reg) {
            r.brief_rounds = 0;
        }
        let Some(r) = self.registrations.get(&reg) else { return };
        let asked = r.expires;
        let ours = rsip::Uri::try_from(self.contact_uri(Some(&r.contact_user), r.peer.transport).as_str());
        let Ok(ours) = ours else {
            return self.register_failed(now, reg, 500, "our Contact does not parse".into(), None);
        };
        let granted = granted_expiry(response, &ours).unwrap_or(asked);
        if granted == 0 {
            // The registrar answered 2xx but kept no binding for us (§10.3 step 6 lists what
            // it holds): as good as a refusal, and refreshing at once would loop.
            let reason = format!("{} (binding not kept)", reason_of(response));
            return self.register_failed(now, reg, response.status_code.code(), reason, None);
        }
        let refresh_at = now + Duration::from_secs(u64::from(refresh_delay(granted)));
        let state = RegistrationState::Registered {
            expires: granted,
            refresh_at,
            // RFC 3608 §6: the Service-Route of each 2xx replaces the previous one.
            service_route: list_values(&response.headers, "Service-Route"),
            path: list_values(&response.headers, "Path"),
        };
        if let Some(r) = self.registrations.get_mut(&reg) {
            r.failures = 0;
            r.next_at = Some(refresh_at);
        }
        self.reg_deadlines.push(Reverse((refresh_at, reg)));
        self.set_reg_state(reg, state);
    }

    /// A REGISTER failed: wait and try again. 403 and refused credentials wait an hour; with a
    /// Retry-After the registrar's wait is kept (§20.33, §21.5.4 for 503); otherwise the wait
    /// doubles with each failure in a row, up to [`MAX_RETRY`], with jitter.
    fn register_failed(&mut self, now: Instant, reg: RegRef, status: u16, reason: String, retry_after: Option<u32>) {
        let Some(r) = self.registrations.get_mut(&reg) else { return };
        if r.state == RegistrationState::Unregistering {
            self.registrations.remove(&reg);
            self.emit(UaEvent::Registration { reg, state: RegistrationState::Unregistered });
            return;
        }
        r.failures = r.failures.saturating_add(1);
        let failures = r.failures;
        let dice = self.random();
        let wait = if matches!(status, 401 | 403 | 407) {
            // Only later, never earlier: the hour is the point.
            REFUSED_RETRY + jitter(REFUSED_RETRY, dice % (JITTER_PERCENT + 1))
        } else if let Some(seconds) = retry_after {
            Duration::from_secs(u64::from(seconds.clamp(1, MAX_RETRY_AFTER)))
        } else {
            let doublings = failures.saturating_sub(1).min(16);
            let base = FIRST_RETRY.saturating_mul(1 << doublings).min(MAX_RETRY);
            let percent = dice % (2 * JITTER_PERCENT + 1);
            if percent >= JITTER_PERCENT {
                base + jitter(base, percent - JITTER_PERCENT)
            } else {
                base - jitter(base, JITTER_PERCENT - percent)
            }
        };
        let retry_at = now + wait;
        if let Some(r) = self.registrations.get_mut(&reg) {
            r.next_at = Some(retry_at);
        }
        self.reg_deadlines.push(Reverse((retry_at, reg)));
        self.set_reg_state(reg, RegistrationState::Failed { status, reason, retry_at });
    }

    fn set_reg_state(&mut self, reg: RegRef, state: RegistrationState) {
        let Some(r) = self.registrations.get_mut(&reg) else { return };
        if r.state == state {
            return;
        }
        r.state = state.clone();
        self.emit(UaEvent::Registration { reg, state });
    }

    /// The earliest live registration deadline (refresh or retry); stale entries are dropped.
    pub(super) fn next_register_deadline(&mut self) -> Option<Instant> {
        loop {
            let Reverse((at, reg)) = self.reg_deadlines.peek().copied()?;
            if self.registrations.get(&reg).is_some_and(|r| r.next_at == Some(at)) {
                return Some(at);
            }
            self.reg_deadlines.pop();
        }
    }

    /// Sends the refreshes and retries that are due.
    pub(super) fn fire_register_deadlines(&mut self, now: Instant) {
        while let Some(Reverse((at, reg))) = self.reg_deadlines.peek().copied() {
            if at > now {
                break;
            }
            self.reg_deadlines.pop();
            let Some(r) = self.registrations.get_mut(&reg) else { continue };
            // `next_at` is only set once nothing is in flight; the second test keeps §10.2's
            // one-REGISTER-at-a-time rule should that ever change.
            if r.next_at != Some(at) || r.pending.is_some() {
                continue;
            }
            r.next_at = None;
            // A refresh keeps the state (the binding holds until it expires); a retry starts over.
            if matches!(r.state, RegistrationState::Failed { .. }) {
                self.set_reg_state(reg, RegistrationState::Registering);
            }
            self.send_register(now, reg);
        }
    }
}

/// When to refresh a binding granted for `granted` seconds: halfway, as is usual, but never
/// later than [`REFRESH_MARGIN`] before it expires, and not sooner than a second from now.
fn refresh_delay(granted: u32) -> u32 {
    (granted / 2).min(granted.saturating_sub(REFRESH_MARGIN)).max(1)
}

/// `percent` % of `base`.
fn jitter(base: Duration, percent: u64) -> Duration {
    Duration::from_millis((base.as_millis() as u64).saturating_mul(percent) / 100)
}

/// The expiry a 2xx grants us (§10.2.4): the `expires` parameter of the Contact that is ours,
/// else the Expires header. `None` when it says neither (then what we asked for holds).
fn granted_expiry(response: &rsip::Response, ours: &rsip::Uri) -> Option<u32> {
    let from_contact = response
        .headers
        .iter()
        .filter_map(|h| match h {
            Header::Contact(c) => Some(c.value()),
            _ => None,
        })
        .flat_map(split_list)
        .find_map(|entry| {
            let (uri, params) = split_contact(entry)?;
            let uri = rsip::Uri::try_from(uri).ok()?;
            same_binding(&uri, ours).then(|| param(params, "expires").and_then(leading_number))?
        });
    from_contact.or_else(|| {
        response.headers.iter().find_map(|h| match h {
            Header::Expires(e) => leading_number(e.value()),
            _ => None,
        })
    })
}

/// Whether a Contact the registrar lists is the one we bound (§10.3 step 7 compares with the
/// URI rules of §19.1.4: user case-sensitively, host case-insensitively, a missing port as the
/// transport's default).
fn same_binding(theirs: &rsip::Uri, ours: &rsip::Uri) -> bool {
    let transport = |u: &rsip::Uri| u.transport().map_or_else(|| "udp".to_owned(), |t| t.to_string().to_lowercase());
    let port = |u: &rsip::Uri| {
        u.port().map(ToString::to_string).unwrap_or_else(|| if transport(u) == "tls" { "5061" } else { "5060" }.into())
    };
    theirs.user() == ours.user()
        && theirs.host().to_string().eq_ignore_ascii_case(&ours.host().to_string())
        && port(theirs) == port(ours)
        && transport(theirs) == transport(ours)
}

/// Splits a Contact entry into its URI and the header parameters after it (§20.10: without
/// angle brackets, everything after the first `;` is a header parameter).
fn split_contact(entry: &str) -> Option<(&str, &str)> {
    let entry = entry.trim();
    match entry.find('<') {
        Some(open) => {
            let close = open + entry[open..].find('>')?;
            Some((&entry[open + 1..close], &entry[close + 1..]))
        }
        None => Some(entry.split_once(';').unwrap_or((entry, ""))),
    }
}

/// The value of the parameter `name` in `;a=1;b=2`.
fn param<'a>(params: &'a str, name: &str) -> Option<&'a str> {
    params.split(';').find_map(|p| {
        let (key, value) = p.split_once('=')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim().trim_matches('"'))
    })
}

/// The number a header value starts with (`120`, `120 (maintenance);duration=60`).
fn leading_number(value: &str) -> Option<u32> {
    let value = value.trim_start();
    let end = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    // Saturate rather than fail on absurd lengths: they are clamped where used.
    value[..end].parse::<u64>().ok().map(|n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// The first value of the header `name`.
fn header_value<'a>(headers: &'a rsip::Headers, name: &str) -> Option<&'a str> {
    headers.iter().find_map(|h| match h {
        Header::MinExpires(v) if name.eq_ignore_ascii_case("Min-Expires") => Some(v.value()),
        Header::RetryAfter(v) if name.eq_ignore_ascii_case("Retry-After") => Some(v.value()),
        Header::Other(n, v) if n.eq_ignore_ascii_case(name) => Some(v.as_str()),
        _ => None,
    })
}

/// Every entry of the list header `name` (Service-Route, Path), across header fields, in order.
fn list_values(headers: &rsip::Headers, name: &str) -> Vec<String> {
    headers
        .iter()
        .filter_map(|h| match h {
            Header::Other(n, v) if n.eq_ignore_ascii_case(name) => Some(v.as_str()),
            _ => None,
        })
        .flat_map(split_list)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect()
}

/// Splits a comma-separated header value (§7.3.1) at the commas outside `<…>` and quotes.
fn split_list(value: &str) -> Vec<&str> {
    let (mut out, mut start, mut angle, mut quoted, mut escaped) = (Vec::new(), 0, false, false, false);
    for (i, c) in value.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '<' if !quoted => angle = true,
            '>' if !quoted => angle = false,
            ',' if !quoted && !angle => {
                out.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&value[start..]);
    out
}

/// The reason phrase of a status, e.g. `Forbidden`, `Service Unavailable` (rsip keeps the
/// phrase of unknown codes only; known ones come from its names).
fn reason_of(response: &rsip::Response) -> String {
    let text = response.status_code.to_string();
    let name = text.split_once(' ').map_or("", |(_, name)| name);
    let mut out = String::with_capacity(name.len() + 4);
    let mut previous_lower = false;
    for c in name.chars() {
        if c.is_ascii_uppercase() && previous_lower {
            out.push(' ');
        }
        previous_lower = c.is_ascii_lowercase();
        out.push(c);
    }
    out
}

#[cfg(test)]
#[path = "ua_register_tests.rs"]
mod tests;
