//! An INVITE that starts a call: routing to a tenant and a flow, and the checks before it
//! rings (RFC 3261 §8.2, §22 digest; RFC 3325 trusted identity; caps).

use super::*;

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Checks an INVITE against its tenant's credentials. `Ok(())` lets the call in; `Err` carries
/// the status and headers to reject it with (407 + challenge, or 403).
pub(super) fn authenticate(
    servers: &mut HashMap<String, DigestServer>,
    auth: &crate::tenant::TenantAuth,
    tenant: &str,
    peer: std::net::SocketAddr,
    request: &rsip::Request,
) -> Result<(), (u16, Vec<rsip::Header>)> {
    if auth.trusted.contains(&peer.ip()) {
        return Ok(());
    }
    let now = unix_now();
    let server = match servers.entry(tenant.to_owned()) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => {
            let mut config = ServerConfig::new(auth.realm.clone(), crate::random::nonce_secret());
            config.kind = AuthKind::Proxy;
            if !auth.algorithms.is_empty() {
                config.algorithms = auth.algorithms.clone();
            }
            match DigestServer::new(config, now) {
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
    let uri = request.uri.to_string();
    let method = request.method.to_string();
    let digest_request = DigestRequest::new(&method, &uri, &request.body);
    let store = |user: &str, _realm: &str, _alg: patchbay_sip::auth::Algorithm| {
        auth.users.get(user).map(|password| StoredSecret::Password(password.clone()))
    };
    match server.verify(now, &digest_request, &credentials, &store) {
        Outcome::Authorized { username } => {
            tracing::debug!(%tenant, %username, "caller authenticated");
            Ok(())
        }
        Outcome::Challenge { challenges, .. } => {
            Err((407, challenges.iter().map(|c| rsip::Header::ProxyAuthenticate(c.to_string().into())).collect()))
        }
        Outcome::Rejected(reason) => {
            tracing::info!(%tenant, from = %peer, ?reason, "caller failed digest authentication");
            Err((403, Vec::new()))
        }
    }
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
        let Self { ua, calls, digest, engine, registry, routing, services, .. } = self;
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
            let _ = ua.reject(now, call, 404);
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
        let refused = |cause: &str, sip_code: u16| {
            let sip = SipEnd { cause: cause.to_owned(), by: "patchbay", sip_code };
            let flow = FlowEnd { outcome: "not-run", detail: None, vars: Default::default() };
            if let Some(cdr) = CdrDraft::new(&call_info(), "").close(sip, flow) {
                routing.cdr.write(cdr);
            }
        };
        match (tenant.auth.as_ref(), trusted_trunk) {
            // The carrier calling its own DIDs from its own address.
            (_, Some(_)) => {}
            (Some(auth), None) => {
                if let Err((status, headers)) = authenticate(digest, auth, &tenant.id, peer.addr, &request) {
                    let _ = ua.reject_with(now, call, status, &headers);
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
                let _ = ua.reject(now, call, 403);
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
        let _ = ua.ring(now, call);
        let info = call_info();
        tracing::info!(?call, from = %peer.addr, tenant = %info.tenant, flow = %info.flow, version = &flow.version()[..12], "call started");
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
        };
        crate::call::start(calls, services, engine, start);
    }
}
