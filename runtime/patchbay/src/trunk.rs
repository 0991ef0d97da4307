//! Carrier trunks: a tenant's SIP account at its carrier, built once from `[[tenant.trunk]]`.
//!
//! A [`Trunk`] knows where the carrier is (gateway, transport, outbound proxy), how to
//! authenticate (digest credentials; they never leave this type except into a digest answer),
//! which caller IDs the tenant may present, what media to offer, and the [`CallGate`] that caps
//! its outbound calls (calls per second and concurrent calls, with a bounded queue).
//!
//! Outbound INVITEs through a trunk are built by [`Trunk::dial`]: Request-URI
//! `sip:NUMBER@gateway` (`sips:` over TLS), From the caller ID (and the trunk's display name)
//! at the trunk's domain, P-Asserted-Identity (RFC 3325 §9.1) when the trunk asserts it, and
//! `Privacy` (RFC 3323) when it asks to hide the caller.
//!
//! The gateway is located as RFC 3263 says ([`crate::resolve`]): API calls fail over to the
//! next target on a timeout or a 503. Over UDP the trunk sends OPTIONS keep-alives, over
//! TCP/TLS the transport sends CRLF ones.
//!
//! Via and Contact name our listener of the trunk's transport (`sips:` over TLS), or the first
//! listener when there is none of that transport: then the carrier reaches us only over the
//! connection we opened.
//!
//! While the trunk is registered, its calls carry the registrar's Service-Route as a preloaded
//! Route (RFC 3608 §6); they are still sent to the trunk's next hop.
//!
//! **Not done yet:** registrations and flows' `dial` legs do not fail over to the next target;
//! RFC 5626 outbound (`;ob`, `reg-id`) is not offered.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use patchbay_sip::transaction::{Peer, Transport};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::config::{Secret, SrtpMode, TrunkConfig, TrunkTransport};

/// What the endpoint last learnt of a trunk, for the API (`GET /v1/trunks`) and the log.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TrunkState {
    /// `registering`, `registered for …`, `failed: 403 Forbidden, next attempt in …`.
    pub registration: Option<String>,
    /// Whether the registration holds now (the `patchbay_trunk_registered` metric).
    #[serde(skip)]
    pub registered: bool,
    /// The last OPTIONS keep-alive: `answered 200` or `unanswered`.
    pub keepalive: Option<String>,
    /// The registrar's Service-Route (RFC 3608): preloaded as Route on the trunk's calls.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_route: Vec<String>,
}

/// Which trunk: its tenant and its name there (shown as `tenant/name`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrunkKey {
    /// The tenant that owns it.
    pub tenant: String,
    /// Its name within the tenant.
    pub name: String,
}

impl std::fmt::Display for TrunkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.tenant, self.name)
    }
}

/// Every trunk's [`TrunkState`].
pub type TrunkStates = Arc<std::sync::Mutex<std::collections::HashMap<TrunkKey, TrunkState>>>;

/// Updates one trunk's state.
pub fn set_state(states: &TrunkStates, key: &TrunkKey, change: impl FnOnce(&mut TrunkState)) {
    let mut states = states.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    change(states.entry(key.clone()).or_default());
}

/// `host[:port]` as written in a trunk's `gateway` or `outbound_proxy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// A DNS name or an IP address (IPv6 without brackets).
    pub host: String,
    /// The port, when one was written.
    pub port: Option<u16>,
}

impl HostPort {
    /// Parses `host`, `host:port`, `[v6]` or `[v6]:port`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("{text:?} is not host[:port]: {why}");
        if text.is_empty() {
            return Err(bad("empty"));
        }
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (v6, after) = rest.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            v6.parse::<std::net::Ipv6Addr>().map_err(|_| bad("not an IPv6 address in brackets"))?;
            match after {
                "" => (v6, None),
                _ => (v6, Some(after.strip_prefix(':').ok_or_else(|| bad("junk after ]"))?)),
            }
        } else {
            match text.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (text, None),
            }
        };
        let port = port.map(|p| p.parse::<u16>().map_err(|_| bad("bad port"))).transpose()?;
        if port == Some(0) {
            return Err(bad("port 0"));
        }
        let valid_name = host.parse::<IpAddr>().is_ok()
            || (!host.is_empty()
                && host.len() <= 253
                && host.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                }));
        if !valid_name {
            return Err(bad("not a host name or IP address"));
        }
        Ok(Self { host: host.to_owned(), port })
    }

    /// As written in a URI: IPv6 in brackets, the port when there is one.
    fn uri_host(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        match self.port {
            Some(port) => format!("{host}:{port}"),
            None => host,
        }
    }
}

/// Whether `id` may be a caller ID: an E.164 number (`+` and digits) or a SIP user part of
/// letters, digits and `-_.` — nothing that could break out of a header (no CR/LF, `<`, `"`,
/// `;`, `@`).
pub fn check_caller_id(id: &str) -> Result<(), String> {
    check_user_part("a caller ID", id)
}

/// A number or user to call through a trunk: the same characters as a caller ID.
pub fn check_number(number: &str) -> Result<(), String> {
    check_user_part("a number", number)
}

/// What caller IDs and numbers share: `what` names it in the error.
fn check_user_part(what: &str, id: &str) -> Result<(), String> {
    let digits = id.strip_prefix('+').unwrap_or(id);
    if digits.is_empty() || id.len() > 32 {
        return Err(format!("{id:?}: {what} is 1 to 32 characters"));
    }
    if id.starts_with('+') && !digits.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("{id:?}: an E.164 number is + and digits"));
    }
    if !digits.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(format!("{id:?}: only digits, letters, '+', '-', '_' and '.' are allowed"));
    }
    Ok(())
}

/// Why a caller ID is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallerIdError {
    /// Not one of the trunk's `caller_ids`.
    #[error("caller ID {0:?} is not allowed on trunk {1:?}")]
    NotAllowed(String, String),
    /// None given and the trunk has no default.
    #[error("trunk {0:?} has no default caller ID: name one")]
    Missing(String),
}

/// What a trunk's task asks of the endpoint, which owns the SIP user agent.
#[derive(Debug)]
pub enum TrunkRequest {
    /// Register with the trunk's registrar (its address just resolved).
    Register {
        /// Which trunk.
        trunk: Arc<Trunk>,
        /// Where its registrar is.
        peer: patchbay_sip::transaction::Peer,
    },
    /// Send the trunk's OPTIONS keep-alive.
    Ping {
        /// Which trunk.
        key: TrunkKey,
        /// The keep-alive.
        ping: Box<patchbay_sip::ua::Ping>,
    },
}

/// A carrier trunk, as configured.
pub struct Trunk {
    /// The tenant that owns it.
    pub tenant: String,
    /// Its name within the tenant.
    pub name: String,
    gateway: HostPort,
    proxy: Option<HostPort>,
    /// How signalling travels.
    pub transport: TrunkTransport,
    username: Option<String>,
    password: Option<Secret>,
    realm: Option<String>,
    /// The host of our From and of the registered address of record.
    pub from_domain: String,
    /// Registration lifetime asked for, when the trunk registers.
    pub register_expires: Option<u32>,
    caller_ids: Vec<String>,
    default_caller_id: Option<String>,
    pai: bool,
    /// Display name of our From (and P-Asserted-Identity).
    caller_name: Option<String>,
    /// `Privacy` to send (RFC 3323: `id` asks the carrier to withhold the caller ID).
    privacy: Option<String>,
    /// Codecs offered, in order.
    pub codecs: Vec<patchbay_sip::sdp::AudioCodec>,
    /// SRTP on its calls.
    pub srtp: SrtpMode,
    /// Keep-alive interval (CRLF on TCP/TLS connections).
    pub keepalive: Option<Duration>,
    /// The TLS client configuration (webpki roots plus the trunk's CA).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Addresses the carrier's inbound calls come from (trusted for its DIDs only).
    pub source_ips: Vec<IpAddr>,
    /// Inbound number → flow.
    pub dids: BTreeMap<String, String>,
    /// Its outbound cap.
    pub gate: Arc<CallGate>,
    resolver: Arc<dyn crate::resolve::Resolve>,
}

impl std::fmt::Debug for Trunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trunk")
            .field("tenant", &self.tenant)
            .field("name", &self.name)
            .field("gateway", &self.gateway)
            .field("transport", &self.transport)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl Trunk {
    /// Builds a trunk from its (checked) configuration.
    pub fn new(
        tenant: &str,
        config: &TrunkConfig,
        base_dir: &std::path::Path,
        resolver: Arc<dyn crate::resolve::Resolve>,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        let gateway = HostPort::parse(config.gateway.get_ref()).map_err(anyhow::Error::msg)?;
        let proxy = config
            .outbound_proxy
            .as_ref()
            .map(|p| HostPort::parse(p.get_ref()))
            .transpose()
            .map_err(anyhow::Error::msg)?;
        let tls = match config.transport {
            TrunkTransport::Tls => {
                let ca = match &config.ca {
                    Some(path) => {
                        let path = base_dir.join(path.get_ref());
                        Some(std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?)
                    }
                    None => None,
                };
                Some(crate::transport::tls_client_config(ca.as_deref()).context("trunk TLS")?)
            }
            _ => None,
        };
        let codecs = match &config.codecs {
            Some(codecs) => codecs
                .iter()
                .map(|c| match c.get_ref().to_ascii_uppercase().as_str() {
                    "PCMA" => patchbay_sip::sdp::AudioCodec::Pcma,
                    _ => patchbay_sip::sdp::AudioCodec::Pcmu,
                })
                .collect(),
            None => vec![patchbay_sip::sdp::AudioCodec::Pcmu, patchbay_sip::sdp::AudioCodec::Pcma],
        };
        Ok(Self {
            tenant: tenant.to_owned(),
            name: config.name.clone(),
            from_domain: config.from_domain.clone().unwrap_or_else(|| gateway.host.clone()),
            gateway,
            proxy,
            transport: config.transport,
            username: config.username.clone(),
            password: config.password.clone(),
            realm: config.realm.clone(),
            register_expires: config.register.then_some(config.register_expires_secs),
            caller_ids: config.caller_ids.iter().map(|c| c.get_ref().clone()).collect(),
            default_caller_id: config.default_caller_id.as_ref().map(|c| c.get_ref().clone()),
            pai: config.p_asserted_identity,
            caller_name: config.caller_name.clone(),
            privacy: config.privacy.as_ref().map(|p| p.get_ref().clone()),
            codecs,
            srtp: config.srtp,
            keepalive: (config.keepalive_secs > 0).then(|| Duration::from_secs(config.keepalive_secs)),
            tls,
            source_ips: config.source_ips.clone(),
            dids: config.dids.iter().map(|(did, flow)| (did.clone(), flow.get_ref().clone())).collect(),
            gate: Arc::new(CallGate::new(config.calls_per_second, config.max_calls, config.queue)),
            resolver,
        })
    }

    /// Which trunk this is.
    pub fn key(&self) -> TrunkKey {
        TrunkKey { tenant: self.tenant.clone(), name: self.name.clone() }
    }

    /// The transaction layer's transport for this trunk.
    pub fn sip_transport(&self) -> Transport {
        match self.transport {
            TrunkTransport::Udp => Transport::Udp,
            TrunkTransport::Tcp => Transport::Tcp,
            TrunkTransport::Tls => Transport::Tls,
        }
    }

    /// The caller ID to present: `requested` when the tenant may present it on this trunk,
    /// else the default when none was requested.
    pub fn caller_id(&self, requested: Option<&str>) -> Result<String, CallerIdError> {
        match requested {
            Some(id) if self.caller_ids.iter().any(|allowed| allowed == id) => Ok(id.to_owned()),
            Some(id) => Err(CallerIdError::NotAllowed(id.to_owned(), self.name.clone())),
            None => self.default_caller_id.clone().ok_or_else(|| CallerIdError::Missing(self.name.clone())),
        }
    }

    /// Digest credentials for the trunk's challenges (a fresh client per dialog or
    /// registration), limited to the configured realm when there is one.
    pub fn digest_client(&self) -> Option<patchbay_sip::auth::DigestClient> {
        let (user, password) = (self.username.as_ref()?, self.password.as_ref()?);
        let client = patchbay_sip::auth::DigestClient::new(user.clone(), password.expose().to_owned());
        Some(match &self.realm {
            Some(realm) => client.with_realm(realm.clone()),
            None => client,
        })
    }

    /// The user we register as (the address of record's user part).
    pub fn username(&self) -> Option<&str> {
        self.username.as_deref()
    }

    fn scheme(&self) -> &'static str {
        if self.transport == TrunkTransport::Tls { "sips" } else { "sip" }
    }

    fn transport_param(&self) -> &'static str {
        match self.transport {
            TrunkTransport::Udp => "",
            TrunkTransport::Tcp => ";transport=tcp",
            // `sips:` already says TLS (RFC 3261 §19.1.2).
            TrunkTransport::Tls => "",
        }
    }

    /// `sip:USER@gateway[;transport=tcp]` (`sips:` over TLS).
    pub fn uri_for(&self, user: &str) -> Result<rsip::Uri, String> {
        let text = format!("{}:{user}@{}{}", self.scheme(), self.gateway.uri_host(), self.transport_param());
        rsip::Uri::try_from(text.as_str()).map_err(|e| format!("{text}: {e}"))
    }

    /// The registrar's URI (RFC 3261 §10.2: the domain, no user part).
    pub fn registrar_uri(&self) -> Result<rsip::Uri, String> {
        let text = format!("{}:{}{}", self.scheme(), self.gateway.uri_host(), self.transport_param());
        rsip::Uri::try_from(text.as_str()).map_err(|e| format!("{text}: {e}"))
    }

    /// The address of record we register: `sip:USERNAME@from_domain`.
    pub fn aor(&self) -> Option<String> {
        Some(format!("{}:{}@{}", self.scheme(), self.username.as_ref()?, self.from_domain))
    }

    /// Where requests go, in the order to try them (RFC 3263 §4: the outbound proxy, else the
    /// gateway, located through NAPTR/SRV/A unless an address or a port is written). A caller
    /// fails over to the next target on a timeout or a 503 (§4.3).
    pub async fn targets(&self) -> Result<Vec<Peer>, String> {
        let hop = self.proxy.as_ref().unwrap_or(&self.gateway);
        let addrs = crate::resolve::locate(&*self.resolver, &hop.host, hop.port, self.transport)
            .await
            .map_err(|e| e.to_string())?;
        Ok(addrs.into_iter().map(|addr| Peer { transport: self.sip_transport(), addr }).collect())
    }

    /// The first of [`Trunk::targets`].
    pub async fn next_hop(&self) -> Result<Peer, String> {
        let hop = self.targets().await?.into_iter().next();
        hop.ok_or_else(|| "the trunk's gateway has no address".to_owned())
    }

    /// An OPTIONS keep-alive to `peer` (RFC 3261 §11): to the registrar's URI, from our address
    /// of record (or `patchbay@from_domain`).
    pub fn ping(&self, peer: Peer) -> Option<patchbay_sip::ua::Ping> {
        let from = self.aor().unwrap_or_else(|| format!("{}:patchbay@{}", self.scheme(), self.from_domain));
        Some(patchbay_sip::ua::Ping { peer, target: self.registrar_uri().ok()?, from: format!("<{from}>") })
    }

    /// Brings the trunk up, off the endpoint's task: locates the gateway (RFC 3263), retrying
    /// with back-off while DNS fails (5 s doubling to 5 min), tells the transport each target's
    /// keep-alive and TLS name, has the endpoint register, then sends the keep-alives.
    pub async fn start(
        self: Arc<Self>,
        streams: Arc<crate::transport::Streams>,
        commands: mpsc::UnboundedSender<impl From<TrunkRequest> + Send + 'static>,
        states: TrunkStates,
    ) {
        let key = self.key();
        let mut wait = Duration::from_secs(5);
        let peers = loop {
            match self.targets().await {
                Ok(peers) if !peers.is_empty() => break peers,
                result => {
                    let why = result.err().unwrap_or_else(|| "no address".into());
                    tracing::warn!(tenant = %self.tenant, trunk = %self.name, "locating the gateway: {why}; again in {wait:?}");
                    if self.register_expires.is_some() {
                        set_state(&states, &key, |t| {
                            t.registration = Some(format!("failed: {why}, next attempt in {} s", wait.as_secs()))
                        });
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(300));
                }
            }
        };
        for peer in &peers {
            if self.transport == TrunkTransport::Udp {
                continue;
            }
            streams.set_keepalive(peer.addr, self.keepalive);
            match (self.tls.clone(), self.tls_server_name()) {
                (Some(tls), Some(name)) => streams.add_tls_route(peer.addr, name, tls),
                (Some(_), None) => {
                    tracing::warn!(trunk = %self.name, "TLS trunk: the gateway is not a valid TLS server name")
                }
                (None, _) => {}
            }
        }
        if self.register_expires.is_some() {
            let request = TrunkRequest::Register { trunk: Arc::clone(&self), peer: peers[0] };
            if commands.send(request.into()).is_err() {
                return;
            }
        }
        self.keep_alive(commands).await;
    }

    /// Sends the trunk's OPTIONS keep-alives over UDP every `keepalive` for as long as the
    /// endpoint takes commands (RFC 5626 §3.5.1 keeps TCP/TLS connections alive with CRLF
    /// instead: see the transport). They keep NAT bindings towards the carrier open and tell
    /// whether it answers.
    pub async fn keep_alive(
        self: Arc<Self>,
        commands: mpsc::UnboundedSender<impl From<TrunkRequest> + Send + 'static>,
    ) {
        let Some(every) = self.keepalive.filter(|_| self.transport == TrunkTransport::Udp) else { return };
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is at once: the first ping goes one interval after start.
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let ping = match self.next_hop().await {
                Ok(peer) => self.ping(peer),
                Err(e) => {
                    tracing::warn!(tenant = %self.tenant, trunk = %self.name, "keep-alive: {e}");
                    continue;
                }
            };
            let Some(ping) = ping else { return };
            let key = self.key();
            if commands.send(TrunkRequest::Ping { key, ping: Box::new(ping) }.into()).is_err() {
                return;
            }
        }
    }

    /// The host name a TLS gateway's certificate must carry.
    pub fn tls_server_name(&self) -> Option<rustls::pki_types::ServerName<'static>> {
        let hop = self.proxy.as_ref().unwrap_or(&self.gateway);
        rustls::pki_types::ServerName::try_from(hop.host.clone()).ok()
    }

    /// The URI a caller ID is presented as: `sip:CALLER_ID@from_domain`.
    pub fn identity(&self, caller_id: &str) -> String {
        format!("{}:{caller_id}@{}", self.scheme(), self.from_domain)
    }

    /// The INVITE for a call to `number` presenting `caller_id` (checked by
    /// [`Trunk::caller_id`]) with the SDP `offer`.
    pub fn dial(
        &self,
        peer: Peer,
        number: &str,
        caller_id: &str,
        display_name: Option<&str>,
        offer: Vec<u8>,
        mut headers: Vec<rsip::Header>,
    ) -> Result<patchbay_sip::ua::Dial, String> {
        check_number(number)?;
        check_caller_id(caller_id)?;
        let target = self.uri_for(number)?;
        let identity = self.identity(caller_id);
        let display = display_name
            .or(self.caller_name.as_deref())
            .filter(|d| !d.is_empty())
            .map(|d| {
                // A quoted-string may not hold `"` or `\` unescaped, nor any control character
                // (RFC 3261 §25.1): drop them rather than let a name break the header.
                let clean: String =
                    d.chars().filter(|c| !c.is_control() && !matches!(c, '"' | '\\')).take(64).collect();
                format!("\"{clean}\" ")
            })
            .unwrap_or_default();
        if self.pai {
            headers.push(rsip::Header::Other("P-Asserted-Identity".into(), format!("{display}<{identity}>")));
        }
        if let Some(privacy) = &self.privacy {
            headers.push(rsip::Header::Other("Privacy".into(), privacy.clone()));
        }
        Ok(patchbay_sip::ua::Dial {
            peer,
            target,
            from: format!("{display}<{identity}>"),
            to: None,
            sdp: offer,
            credentials: self.digest_client(),
            headers,
        })
    }

    /// Whether `addr` is where this trunk's requests go (its gateway or outbound proxy written
    /// as an address; a name is not looked up here).
    pub fn is_gateway(&self, addr: std::net::SocketAddr) -> bool {
        let default = if self.transport == TrunkTransport::Tls { 5061 } else { 5060 };
        [Some(&self.gateway), self.proxy.as_ref()]
            .into_iter()
            .flatten()
            .any(|hop| hop.host.parse() == Ok(addr.ip()) && hop.port.unwrap_or(default) == addr.port())
    }

    /// Whether a call from `source` to one of this trunk's DIDs comes from the carrier.
    pub fn trusts(&self, source: IpAddr) -> bool {
        self.source_ips.contains(&source)
            || [Some(&self.gateway), self.proxy.as_ref()].into_iter().flatten().any(|h| h.host.parse() == Ok(source))
    }
}

/// The cap on a trunk's (or tenant's) outbound calls: a token bucket of calls per second,
/// a number of calls up at once, and a bounded queue of calls waiting for both.
///
/// Originations are queued by [`CallGate::enqueue`] (refused when the queue is full — the API
/// answers 429) and released in order by [`CallGate::run`] as tokens and call slots free up.
pub struct CallGate {
    cps: Option<f64>,
    bucket: Option<TokenBucket>,
    concurrent: Option<Arc<Semaphore>>,
    capacity: usize,
    queued: Arc<AtomicUsize>,
    receiver: std::sync::Mutex<Option<mpsc::Receiver<GateJob>>>,
    sender: mpsc::Sender<GateJob>,
}

/// The call slots a call holds (its trunk's and its tenant's, where capped) until it ends.
#[derive(Debug, Default)]
pub struct CallSlots(#[allow(dead_code)] Vec<OwnedSemaphorePermit>);

impl From<OwnedSemaphorePermit> for CallSlots {
    fn from(slot: OwnedSemaphorePermit) -> Self {
        Self(vec![slot])
    }
}

/// Something waiting at a gate; called with the call's slots once it may go.
pub type GateJob = Box<dyn FnOnce(CallSlots) + Send>;

impl CallGate {
    /// A gate; `None` for no limit of that kind.
    pub fn new(cps: Option<f64>, max_calls: Option<u32>, queue: usize) -> Self {
        let capacity = queue.max(1);
        let (sender, receiver) = mpsc::channel(capacity);
        Self {
            cps,
            bucket: cps.map(TokenBucket::new),
            concurrent: max_calls.map(|n| Arc::new(Semaphore::new(n as usize))),
            capacity,
            queued: Arc::new(AtomicUsize::new(0)),
            receiver: std::sync::Mutex::new(Some(receiver)),
            sender,
        }
    }

    /// Queues `job`; `Err` with a Retry-After in seconds when the queue is full.
    pub fn enqueue(&self, job: GateJob) -> Result<(), u64> {
        // Counted before it can be taken (the gate's task subtracts when it releases it).
        self.queued.fetch_add(1, Ordering::AcqRel);
        match self.sender.try_send(job) {
            Ok(()) => Ok(()),
            Err(_) => {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                Err(self.retry_after_secs())
            }
        }
    }

    /// How long a caller refused now should wait: the time to drain a full queue at the CPS rate.
    pub fn retry_after_secs(&self) -> u64 {
        self.cps.map_or(1, |cps| (self.capacity as f64 / cps).ceil().max(1.0) as u64)
    }

    /// Calls waiting now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Lets a call through at once if the trunk's and the tenant's caps allow it now (a flow's
    /// `dial`, which waits in no queue): its slots, or `None`.
    pub fn try_pass(&self, tenant: &TenantCaps) -> Option<CallSlots> {
        let mut slots = Vec::new();
        for semaphore in [&self.concurrent, &tenant.slots].into_iter().flatten() {
            slots.push(Arc::clone(semaphore).try_acquire_owned().ok()?);
        }
        // Tokens last: a call refused for a slot costs none.
        for bucket in [self.bucket.as_ref(), tenant.bucket.as_deref()].into_iter().flatten() {
            if !bucket.try_take() {
                return None;
            }
        }
        Some(CallSlots(slots))
    }

    /// Releases queued jobs at the gate's pace, for as long as the gate lives; each also waits
    /// for its tenant's caps (calls up at once, calls per second). Call once.
    pub async fn run(self: Arc<Self>, tenant: TenantCaps) {
        let taken = self.receiver.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let Some(mut receiver) = taken else { return };
        while let Some(job) = receiver.recv().await {
            let mut slots = Vec::new();
            for semaphore in [&self.concurrent, &tenant.slots].into_iter().flatten() {
                slots.extend(Arc::clone(semaphore).acquire_owned().await.ok());
            }
            for bucket in [self.bucket.as_ref(), tenant.bucket.as_deref()].into_iter().flatten() {
                bucket.take().await;
            }
            self.queued.fetch_sub(1, Ordering::AcqRel);
            job(CallSlots(slots));
        }
    }
}

/// A tenant's caps, shared by its trunks' gates.
#[derive(Debug, Clone, Default)]
pub struct TenantCaps {
    /// Calls up at once (`max_calls`).
    pub slots: Option<Arc<Semaphore>>,
    /// Calls started per second (`calls_per_second`).
    pub bucket: Option<Arc<TokenBucket>>,
}

/// A token bucket of `rate` tokens per second holding at most a second's worth (at least one):
/// a burst of a second's calls goes at once, the rest at the rate.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: std::sync::Mutex<(f64, tokio::time::Instant)>,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64) -> Self {
        let burst = rate.max(1.0);
        Self { rate, burst, state: std::sync::Mutex::new((burst, tokio::time::Instant::now())) }
    }

    /// Takes a token if there is one now.
    pub fn try_take(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = tokio::time::Instant::now();
        let (tokens, last) = &mut *state;
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes a token, waiting until there is one.
    pub async fn take(&self) {
        while !self.try_take() {
            let wait = {
                let (tokens, _) = *self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                Duration::from_secs_f64(((1.0 - tokens) / self.rate).max(0.0))
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_parses_names_addresses_and_ports() {
        assert_eq!(HostPort::parse("sip.carrier.example").expect("name").port, None);
        assert_eq!(HostPort::parse("127.0.0.1:5070").expect("ip").port, Some(5070));
        assert_eq!(HostPort::parse("[::1]:5061").expect("v6").host, "::1");
        for bad in ["", "a b", "host:", "host:99999", "host:0", "[::1", "sip:x@y", "a\r\nb"] {
            assert!(HostPort::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn caller_ids_cannot_carry_header_injection() {
        assert!(check_caller_id("+15550100").is_ok());
        assert!(check_caller_id("support").is_ok());
        for bad in ["", "+1555\r\nX: y", "a<b>", "+15a", "a;b", "a@b", "\"x\"", &"9".repeat(40)] {
            assert!(check_caller_id(bad).is_err(), "{bad:?}");
        }
    }

    fn trunk(fields: &str) -> Trunk {
        let text = format!(
            "[sip]\nlisten = []\n[[tenant]]\nid = \"t\"\n[[tenant.trunk]]\nname = \"c\"\n\
             gateway = \"192.0.2.7:5070\"\nfrom_domain = \"carrier.test\"\ncaller_ids = [\"+15550100\"]\n{fields}"
        );
        let config = crate::config::Config::parse(&text, "t.toml", std::path::PathBuf::new()).expect("config");
        let resolver = Arc::new(crate::resolve::SystemResolver::from_system_conf().expect("resolver"));
        Trunk::new("t", config.tenants[0].trunks[0].get_ref(), std::path::Path::new("."), resolver).expect("trunk")
    }

    fn header<'a>(dial: &'a patchbay_sip::ua::Dial, name: &str) -> Option<&'a str> {
        dial.headers.iter().find_map(|h| match h {
            rsip::Header::Other(n, v) if n.eq_ignore_ascii_case(name) => Some(v.as_str()),
            _ => None,
        })
    }

    #[test]
    fn the_gateway_is_known_by_its_address_and_port() {
        let t = trunk("");
        assert!(t.is_gateway("192.0.2.7:5070".parse().expect("addr")));
        assert!(!t.is_gateway("192.0.2.7:5060".parse().expect("addr")));
        assert!(!t.is_gateway("192.0.2.8:5070".parse().expect("addr")));
    }

    #[test]
    fn the_invite_presents_the_caller_id_as_the_trunk_says() {
        let peer = Peer { transport: Transport::Udp, addr: "192.0.2.7:5070".parse().expect("addr") };
        let plain = trunk("").dial(peer, "+15551234567", "+15550100", None, Vec::new(), Vec::new()).expect("dial");
        assert_eq!(plain.target.to_string(), "sip:+15551234567@192.0.2.7:5070");
        assert_eq!(plain.from, "<sip:+15550100@carrier.test>");
        assert_eq!(header(&plain, "P-Asserted-Identity"), Some("<sip:+15550100@carrier.test>"));
        assert_eq!(header(&plain, "Privacy"), None);

        let named = trunk("caller_name = \"Support\"\nprivacy = \"id\"\n");
        let dial = named.dial(peer, "+15551234567", "+15550100", None, Vec::new(), Vec::new()).expect("dial");
        assert_eq!(dial.from, "\"Support\" <sip:+15550100@carrier.test>");
        assert_eq!(header(&dial, "Privacy"), Some("id"));
        // A call's own name wins; quotes and control characters cannot break out of it.
        let dial =
            named.dial(peer, "+15551234567", "+15550100", Some("A \"B\"\r\n"), Vec::new(), Vec::new()).expect("dial");
        assert_eq!(dial.from, "\"A B\" <sip:+15550100@carrier.test>");

        let silent = trunk("p_asserted_identity = false\n");
        let dial = silent.dial(peer, "+15551234567", "+15550100", None, Vec::new(), Vec::new()).expect("dial");
        assert_eq!(header(&dial, "P-Asserted-Identity"), None);
        assert!(silent.dial(peer, "+1555\r\nX: y", "+15550100", None, Vec::new(), Vec::new()).is_err());
        assert_eq!(silent.caller_id(Some("+15559999")), Err(CallerIdError::NotAllowed("+15559999".into(), "c".into())));
    }

    #[tokio::test(start_paused = true)]
    async fn the_gate_spreads_a_burst_at_its_rate_and_refuses_beyond_its_queue() {
        let gate = Arc::new(CallGate::new(Some(10.0), None, 50));
        let (done, mut released) = mpsc::unbounded_channel();
        for i in 0..50 {
            let done = done.clone();
            assert!(
                gate.enqueue(Box::new(move |_| {
                    let _ = done.send((i, tokio::time::Instant::now()));
                }))
                .is_ok()
            );
        }
        let refused = gate.enqueue(Box::new(|_| {}));
        assert_eq!(refused, Err(5), "50 queued at 10 per second: come back in 5 s");
        let start = tokio::time::Instant::now();
        tokio::spawn(Arc::clone(&gate).run(TenantCaps::default()));
        let mut times = Vec::new();
        while times.len() < 50 {
            let (i, at) = released.recv().await.expect("released");
            assert_eq!(i, times.len(), "in order");
            times.push(at.duration_since(start));
        }
        // Ten go at once (a second's burst), the other forty at 10 per second.
        assert!(times[9] < Duration::from_millis(10), "{:?}", times[9]);
        assert!(
            times[49] >= Duration::from_millis(3_900) && times[49] <= Duration::from_millis(4_100),
            "{:?}",
            times[49]
        );
        assert_eq!(gate.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_gate_holds_calls_beyond_its_concurrent_cap_until_one_ends() {
        let gate = Arc::new(CallGate::new(None, Some(2), 10));
        let (done, mut released) = mpsc::unbounded_channel();
        for _ in 0..3 {
            let done = done.clone();
            gate.enqueue(Box::new(move |slot| {
                let _ = done.send(slot);
            }))
            .expect("queued");
        }
        tokio::spawn(Arc::clone(&gate).run(TenantCaps::default()));
        let first = released.recv().await.expect("first");
        let _second = released.recv().await.expect("second");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(released.try_recv().is_err(), "the third waits for a free call");
        drop(first);
        assert_eq!(released.recv().await.expect("third").0.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flows_leg_passes_only_within_the_trunks_and_the_tenants_caps() {
        let gate = CallGate::new(Some(2.0), Some(3), 10);
        let tenant = TenantCaps { slots: Some(Arc::new(Semaphore::new(1))), bucket: None };
        let first = gate.try_pass(&tenant).expect("within every cap");
        assert!(gate.try_pass(&tenant).is_none(), "the tenant's one call is up");
        drop(first);
        let _second = gate.try_pass(&TenantCaps::default()).expect("a second token");
        assert!(gate.try_pass(&TenantCaps::default()).is_none(), "two per second: the bucket is empty");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(gate.try_pass(&TenantCaps::default()).is_some(), "a token again after half a second");
    }

    #[tokio::test(start_paused = true)]
    async fn a_tenants_rate_caps_all_its_trunks_together() {
        let tenant = TenantCaps { slots: None, bucket: Some(Arc::new(TokenBucket::new(5.0))) };
        let (done, mut released) = mpsc::unbounded_channel();
        let start = tokio::time::Instant::now();
        // Two trunks of 10 per second each, 15 calls each: the tenant's 5 per second decides.
        for _ in 0..2 {
            let gate = Arc::new(CallGate::new(Some(10.0), None, 100));
            for _ in 0..15 {
                let done = done.clone();
                gate.enqueue(Box::new(move |_| {
                    let _ = done.send(tokio::time::Instant::now());
                }))
                .expect("queued");
            }
            tokio::spawn(gate.run(tenant.clone()));
        }
        let mut last = start;
        for _ in 0..30 {
            last = released.recv().await.expect("released");
        }
        // Five at once, then 25 at 5 per second: 5 s.
        let took = last.duration_since(start);
        assert!(took >= Duration::from_millis(4_900) && took <= Duration::from_millis(5_200), "{took:?}");
    }
}
