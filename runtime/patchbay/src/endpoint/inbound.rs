//! An INVITE that starts a call: routing to a tenant and a flow, and the checks before it
//! rings (RFC 3261 §8.2, §22 digest; RFC 3325 trusted identity; caps).

use super::*;

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Callers' digest authentication: one digest server per tenant (its realm, a nonce key from
/// the CSPRNG) and one guess throttle across tenants, since a guesser's address is the same
/// whichever tenant it tries.
pub(super) struct CallerAuth {
    servers: HashMap<String, DigestServer>,
    guesses: GuessThrottle,
}

impl CallerAuth {
    pub(super) fn new() -> Self {
        let guesses = GuessThrottle::new(ThrottleConfig::default(), crate::random::key());
        Self { servers: HashMap::new(), guesses }
    }

    /// Checks an INVITE against its tenant's credentials. `Ok(())` lets the call in; `Err`
    /// carries the status and headers to reject it with (407 + challenge, or 403). Nonces are
    /// bound to the caller's address, and failures throttled per address and per user
    /// ([`GuessThrottle`]): a blocked caller gets the 403 a wrong password gets.
    pub(super) fn authenticate(
        &mut self,
        now: std::time::Instant,
        auth: &crate::tenant::TenantAuth,
        tenant: &str,
        from: patchbay_sip::transaction::Peer,
        request: &rsip::Request,
    ) -> Result<(), (u16, Vec<rsip::Header>)> {
        if auth.trusted.iter().any(|t| t.matches(from)) {
            return Ok(());
        }
        let peer = from.addr;
        let unix = unix_now();
        let server = match self.servers.entry(tenant.to_owned()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let mut config = ServerConfig::new(auth.realm.clone(), crate::random::nonce_secret());
                config.kind = AuthKind::Proxy;
                if !auth.algorithms.is_empty() {
                    config.algorithms = auth.algorithms.clone();
                }
                match DigestServer::new(config, unix) {
                    Ok(server) => e.insert(server),
                    Err(err) => {
                        tracing::error!(%tenant, "digest server: {err}");
                        return Err((500, Vec::new()));
                    }
                }
            }
        };
        let credentials: Vec<&str> = request
            .headers
            .iter()
            .filter_map(|h| match h {
                rsip::Header::ProxyAuthorization(v) => Some(v.value()),
                _ => None,
            })
            .collect();
        let username = server.username_in(&credentials);
        let known = username.as_deref().is_some_and(|u| auth.users.contains_key(u));
        // Users are counted per tenant: alice of one tenant is not alice of another.
        let user_key = username.as_deref().map(|u| format!("{tenant}\0{u}"));
        let source = peer.ip();
        if self.guesses.check(now, source, user_key.as_deref(), known) == Verdict::Refuse {
            let refused = self.guesses.refused();
            if refused.is_power_of_two() {
                tracing::warn!(%tenant, from = %peer, refused, "callers throttled after failed digest attempts");
            }
            return Err((403, Vec::new()));
        }
        let uri = request.uri.to_string();
        let method = request.method.to_string();
        let client = source.to_canonical().to_string();
        let digest_request = DigestRequest::new(&method, &uri, &request.body).from_client(client.as_bytes());
        let store = |user: &str, _realm: &str, _alg: patchbay_sip::auth::Algorithm| {
            auth.users.get(user).map(|password| StoredSecret::Password(password.clone()))
        };
        match server.verify(unix, &digest_request, &credentials, &store) {
            Outcome::Authorized { username } => {
                tracing::debug!(%tenant, %username, "caller authenticated");
                self.guesses.succeeded(now, source, &format!("{tenant}\0{username}"));
                Ok(())
            }
            Outcome::Challenge { challenges, .. } => {
                Err((407, challenges.iter().map(|c| rsip::Header::ProxyAuthenticate(c.to_string().into())).collect()))
            }
            Outcome::Rejected(reason) => {
                tracing::info!(%tenant, from = %peer, ?reason, "caller failed digest authentication");
                // Credentials that do not even parse carry no nonce proving where they came
                // from (the source may be spoofed): refused, not counted against it.
                if !matches!(reason, patchbay_sip::auth::Rejection::Malformed(_)) {
                    self.guesses.failed(now, source, user_key.as_deref(), known);
                }
                Err((403, Vec::new()))
            }
        }
    }
}

/// The longest caller-controlled text (From, request-URI, flow name, Call-ID) a refused
/// call's record keeps; a stranger's 60 KB From does not become a 60 KB record.
const REFUSED_FIELD_BYTES: usize = 256;

/// Records of refused calls, rate-limited: a stranger's flood of INVITEs does not become a
/// flood of records. Each source (an IPv4 address, an IPv6 /64) gets one record a second
/// (bursts of two), and all sources together [`RefusalRecords::PER_SEC`]; what is left out is
/// counted and logged.
pub(super) struct RefusalRecords {
    per_source: crate::transport::SourceLimiter,
    all: crate::transport::SourceLimiter,
}

impl RefusalRecords {
    /// Records of refused calls written per second at most, from all sources together.
    pub(super) const PER_SEC: u32 = 100;

    pub(super) fn new() -> Self {
        Self {
            per_source: crate::transport::SourceLimiter::labelled(1, "refused calls: leaving records out (per source)"),
            all: crate::transport::SourceLimiter::labelled(Self::PER_SEC, "refused calls: leaving records out"),
        }
    }

    /// Whether a refusal from `source` gets its record now.
    fn allow(&mut self, source: std::net::IpAddr, now: std::time::Instant) -> bool {
        self.per_source.allow(source, now) && self.all.allow(std::net::Ipv4Addr::UNSPECIFIED.into(), now)
    }
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

impl Endpoint {
    /// An INVITE that starts a call: which tenant and flow it is for (a trunk's DID, else the
    /// request-URI's domain and user), whether the caller may call (digest, the trunk's
    /// addresses, the tenant's caps and its share of the flow instances), then ringing and the
    /// flow's start. Every refusal once the tenant is known leaves a record.
    pub(super) fn incoming_call(
        &mut self,
        now: std::time::Instant,
        call: CallRef,
        peer: patchbay_sip::transaction::Peer,
        request: Box<rsip::Request>,
    ) {
        let Self { ua, calls, digest, engine, registry, routing, services, refusals, draining, .. } = self;
        let host = request.uri.host_with_port.host.to_string();
        let uri_user = request.uri.auth.as_ref().map(|a| a.user.clone()).unwrap_or_default();
        // A carrier's call to one of a trunk's numbers (DIDs): by the request-URI's user,
        // else the To header's (carriers differ in which carries the dialled number).
        let to_user = request.to_header().ok().and_then(|t| t.uri().ok()).and_then(|u| u.auth).map(|a| a.user);
        // The request-URI decides across every trunk first; To only when it names none
        // (a To header must not pull a call meant for one tenant into another's DID).
        let tenants = routing.tenants.get();
        let did = tenants.by_did(&uri_user).or_else(|| to_user.as_deref().and_then(|u| tenants.by_did(u)));
        let (tenant, user) = match &did {
            Some((tenant, _, flow)) => (Some(*tenant), flow.clone()),
            None => (tenants.by_domain(&host), uri_user.clone()),
        };
        // A trunk's source addresses are trusted for its own DIDs only.
        let trusted_trunk = did.as_ref().filter(|(_, trunk, _)| trunk.trusts(peer.addr.ip())).map(|(_, t, _)| t);
        let Some(tenant) = tenant.cloned() else {
            tracing::info!(?call, %host, "no tenant serves this domain");
            // Answered, not silence (RFC 4475 §3.1.1's valid messages all get a response), but
            // once: a stranger has shown nothing (§8.2.7).
            let _ = ua.reject_unverified(now, call, 404, &[]);
            return;
        };
        // RFC 3325 §9.1: P-Asserted-Identity is believed only from a trusted element — here
        // the trunk the DID belongs to, calling from its own address.
        let asserted = trusted_trunk.and_then(|_| {
            request.headers.iter().find_map(|h| match h {
                rsip::Header::Other(name, value) if name.eq_ignore_ascii_case("P-Asserted-Identity") => {
                    let value = value.trim();
                    let uri = value.split_once('<').and_then(|(_, r)| r.split_once('>')).map_or(value, |(u, _)| u);
                    rsip::Uri::try_from(uri).ok().map(|u| u.to_string())
                }
                _ => None,
            })
        });
        // Built only for a call that gets this far: not for a digest challenge (407).
        let call_info = || CallInfo {
            call_id: request.call_id_header().map(|h| h.value().to_owned()).unwrap_or_default(),
            tenant: tenant.id.clone(),
            flow: user.clone(),
            from: asserted.clone().unwrap_or_else(|| {
                request.from_header().ok().and_then(|f| f.uri().ok()).map(|u| u.to_string()).unwrap_or_default()
            }),
            to: request.uri.to_string(),
            direction: Direction::Inbound,
            headers: request
                .headers
                .iter()
                .filter_map(|h| match h {
                    rsip::Header::Other(name, value) if name.to_ascii_lowercase().starts_with("x-") => {
                        Some(Header { name: name.clone(), value: value.clone() })
                    }
                    _ => None,
                })
                .collect(),
        };
        // A call refused once its tenant is known gets a record of its own (no flow ran):
        // the tenant's failed attempts, as a carrier bills and audits them. A digest
        // challenge (407) is not a refusal: the caller answers it with a new INVITE.
        // Rate-limited per source and in all, and with the caller's text bounded.
        let mut refused = |cause: &str, sip_code: u16| {
            if !refusals.allow(peer.addr.ip(), now) {
                return;
            }
            let mut info = call_info();
            for field in [&mut info.call_id, &mut info.flow, &mut info.from, &mut info.to] {
                *field = bounded(field, REFUSED_FIELD_BYTES);
            }
            let sip = SipEnd { cause: cause.to_owned(), by: "patchbay", sip_code };
            let flow = FlowEnd { outcome: "not-run", detail: None, vars: Default::default() };
            if let Some(cdr) = CdrDraft::new(&info, "").close(sip, flow) {
                routing.cdr.write(cdr);
            }
        };
        // Draining (SIGTERM, `POST /v1/drain`): new calls go elsewhere (RFC 3261 §21.5.4).
        if *draining {
            let _ = ua.reject_unverified(now, call, 503, &[rsip::Header::RetryAfter("60".into())]);
            refused("draining", 503);
            return;
        }
        match (tenant.auth.as_ref(), trusted_trunk) {
            // The carrier calling its own DIDs from its own address.
            (_, Some(_)) => {}
            (Some(auth), None) => {
                if let Err((status, headers)) = digest.authenticate(now, auth, &tenant.id, peer, &request) {
                    // Challenges and refusals of unverified callers go out once (§8.2.7).
                    let _ = ua.reject_unverified(now, call, status, &headers);
                    if status == 403 {
                        refused("auth-failed", status);
                    }
                    return;
                }
            }
            // A trunk's number called from elsewhere, and no credentials to challenge
            // with: only the carrier may reach it.
            (None, None) if did.is_some() => {
                tracing::info!(?call, from = %peer.addr, "a DID called from outside its trunk's addresses: refused");
                let _ = ua.reject_unverified(now, call, 403, &[]);
                refused("untrusted-source", 403);
                return;
            }
            (None, None) => {}
        }
        // The tenant's cap on calls up at once (RFC 3261 §21.5.4: 503 with Retry-After).
        let slots = match tenant.caps.slots.as_ref() {
            Some(slots) => match Arc::clone(slots).try_acquire_owned() {
                Ok(slot) => crate::trunk::CallSlots::from(slot),
                Err(_) => {
                    let retry = [rsip::Header::RetryAfter("5".into())];
                    let _ = ua.reject_with(now, call, 503, &retry);
                    refused("tenant-busy", 503);
                    return;
                }
            },
            None => crate::trunk::CallSlots::default(),
        };
        let flow = match registry.get(&tenant.id, &user) {
            Ok(flow) => flow,
            Err(e) => {
                tracing::info!(?call, "{e}");
                let _ = ua.reject(now, call, 404);
                refused("no-route", 404);
                return;
            }
        };
        // A flow instance for the call, from the tenant's share of the pool and from
        // the pool itself; when there is none the caller hears 503 at once rather than
        // ringing into a call that cannot run (RFC 3261 §21.5.4).
        let instance = match tenant.instance_slot() {
            Some(slot) if engine.free_slots() > 0 => slot,
            held => {
                let cause = if held.is_some() { "pool-full" } else { "tenant-pool-share" };
                tracing::info!(?call, tenant = %tenant.id, cause, "no flow instance free: refused");
                let _ = ua.reject_with(now, call, 503, &[rsip::Header::RetryAfter("2".into())]);
                refused(cause, 503);
                return;
            }
        };
        // Unanswered calls across tenants (RFC 3261 §21.5.4: 503 with Retry-After).
        let Some(pending) = routing.pending.hold() else {
            tracing::warn!(?call, tenant = %tenant.id, "too many unanswered calls: refused");
            // Once, not retransmitted: a flood that fills the cap may come from spoofed sources.
            let _ = ua.reject_unverified(now, call, 503, &[rsip::Header::RetryAfter("5".into())]);
            refused("pending-calls", 503);
            return;
        };
        if let Some(trunk) = trusted_trunk {
            // The carrier's other edge addresses may send in the call's dialog.
            ua.trust_sources(call, &trunk.source_ips);
        }
        let _ = ua.ring(now, call);
        let info = call_info();
        tracing::info!(
            from = %peer.addr,
            tenant = %info.tenant,
            flow = %info.flow,
            call_id = %info.call_id,
            version = &flow.version()[..12],
            "call started"
        );
        // RFC 3261 §20.5: no Allow says nothing about REFER; an Allow without it says no.
        let allows: Vec<&str> = request
            .headers
            .iter()
            .filter_map(|h| match h {
                rsip::Header::Allow(allow) => Some(allow.value()),
                _ => None,
            })
            .collect();
        let refer = allows.is_empty()
            || allows.iter().flat_map(|v| v.split(',')).any(|m| m.trim().eq_ignore_ascii_case("REFER"));
        let vars = tenant.vars_of(&user);
        let cdr = CdrDraft::new(&info, flow.version());
        let start = FlowStart {
            call,
            info,
            flow,
            tenant,
            vars,
            refer,
            invite: *request,
            media: None,
            cdr,
            origination: None,
            slots,
            instance,
            pending: Some(pending),
        };
        crate::call::start(calls, services, engine, start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_calls_leave_records_at_a_bounded_rate() {
        let mut records = RefusalRecords::new();
        let now = std::time::Instant::now();
        let one: std::net::IpAddr = "203.0.113.9".parse().expect("ip");
        let kept = (0..1_000).filter(|_| records.allow(one, now)).count();
        assert_eq!(kept, 2, "one source: a burst of two, then one a second");
        assert!(records.allow(one, now + Duration::from_secs(1)), "and one a second after that");
        // A spoofed flood from many sources: at most twice the per-second cap in one go.
        let kept = (0..10_000u32)
            .filter(|n| records.allow(std::net::IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n)), now))
            .count();
        assert!(kept <= 2 * RefusalRecords::PER_SEC as usize, "{kept} records in one instant");
    }

    #[test]
    fn a_refused_callers_text_is_cut_at_a_character_boundary() {
        assert_eq!(bounded("short", 256), "short");
        let long = "é".repeat(200);
        let cut = bounded(&long, 255);
        assert!(cut.len() <= 255 + '…'.len_utf8(), "{}", cut.len());
        assert!(cut.ends_with('…'));
    }
}
