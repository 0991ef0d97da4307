//! The SIP endpoint: the user agent core driven on tokio time, and one task per call that runs
//! the call's flow.
//!
//! One endpoint task owns the sans-IO [`UserAgent`]; transports (see [`crate::transport`]),
//! timers and call tasks talk to it through channels, so the protocol state is never shared
//! or locked.
//!
//! Media: answering a call starts its RTP session on the shared media clock (see
//! [`crate::media`]); flows' operations on it live in [`crate::call`] (prompts, digits,
//! recording, audio streams), [`crate::dial`] (outbound legs and bridges) and
//! [`crate::agent`] (AI agents over websockets). Every call that reached a flow leaves one
//! record ([`crate::cdr`]).
//!
//! **Not implemented yet:** late-offer INVITEs (no SDP) get 488; outbound legs go over UDP only.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use patchbay_host::{
    CallError, CallInfo, Direction, Dtmf, FlowCall, FlowEngine, FlowError, FlowOutcome, FlowRegistry, HangupCause,
    Header,
};
use patchbay_media::session::MediaSession;
use patchbay_sip::auth::{AuthKind, DigestRequest, DigestServer, Outcome, ServerConfig, StoredSecret};
use patchbay_sip::transaction::TimerConfig;
use patchbay_sip::ua::{CallRef, EndCause, UaConfig, UaEvent, UaOutput, UserAgent};
use rsip::headers::UntypedHeader;
use rsip::prelude::HeadersExt;
use tokio::sync::{mpsc, oneshot, watch};

use crate::call::SipCall;
use crate::cdr::{CdrDraft, CdrSink, FlowEnd, SipEnd};
use crate::dial::{Leg, LegEvent};
use crate::media::{CallMedia, CallSinks, MediaEngine};
use crate::transport::{Inbound, Outbound};

/// What the endpoint shares with its calls: the tenants, and the process-wide media and
/// record settings.
pub struct Routing {
    /// Every tenant: domains, DIDs, credentials, limits, prompts, kv, trunks.
    pub tenants: Arc<crate::tenant::Tenants>,
    /// Address put in SDP and Contact instead of the bound one (NAT).
    pub external_ip: Option<std::net::IpAddr>,
    /// The media engine (clock thread and frame pool).
    pub media: MediaEngine,
    /// Address RTP sockets bind to.
    pub rtp_bind: std::net::IpAddr,
    /// End calls after this long without RTP (not on hold).
    pub rtp_timeout: Option<Duration>,
    /// Answer offers carrying `a=crypto` with SRTP.
    pub srtp: bool,
    /// Our ptime in SDP (the peer's own `a=ptime` wins in an answer).
    pub ptime_ms: u16,
    /// Where finished calls' records go.
    pub cdr: CdrSink,
    /// Tenants' recordings: `storage/<tenant>/recordings/`.
    pub storage: std::path::PathBuf,
    /// Calls placed through the API, and their progress.
    pub originations: Arc<crate::originate::Originations>,
    /// Each trunk's registration and keep-alive state, for the API.
    pub trunk_states: crate::trunk::TrunkStates,
}

/// Key presses (SIP INFO) queued for a flow that has not read them yet; more are dropped.
const DTMF_QUEUE: usize = 64;

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A nonce key drawn from the OS's randomness (through `RandomState`'s per-process keys).
fn random_secret() -> Vec<u8> {
    (0..4u64).flat_map(|i| std::collections::hash_map::RandomState::new().hash_one(i).to_le_bytes()).collect()
}

/// Checks an INVITE against its tenant's credentials. `Ok(())` lets the call in; `Err` carries
/// the status and headers to reject it with (407 + challenge, or 403).
fn authenticate(
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
            let mut config = ServerConfig::new(auth.realm.clone(), random_secret());
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

pub(crate) enum Command {
    Answer {
        call: CallRef,
        reply: oneshot::Sender<Result<(), CallError>>,
    },
    Hangup {
        call: CallRef,
        cause: HangupCause,
    },
    FlowDone {
        call: CallRef,
        end: FlowEnd,
    },
    Transfer {
        call: CallRef,
        target: String,
        reply: oneshot::Sender<Result<(), CallError>>,
    },
    /// No RTP for the inactivity timeout.
    MediaTimeout {
        call: CallRef,
    },
    /// Place an outbound leg for the call's flow.
    Dial {
        call: CallRef,
        target: Box<crate::dial::Target>,
        caller_id: Option<String>,
        headers: Vec<Header>,
        events: mpsc::UnboundedSender<LegEvent>,
        reply: oneshot::Sender<Result<CallRef, CallError>>,
    },
    /// Cancel or hang up an outbound leg.
    HangupLeg {
        leg: CallRef,
        /// For the leg's record: why, and on whose behalf.
        reason: &'static str,
        by: &'static str,
    },
    /// Place a call through a trunk for the API; its flow runs on answer.
    Originate {
        origination: Box<crate::originate::Origination>,
        peer: patchbay_sip::transaction::Peer,
    },
    /// An origination that could not be placed (its trunk's address did not resolve).
    OriginationFailed {
        origination: Box<crate::originate::Origination>,
        reason: String,
    },
    /// Cancel or hang up a call placed through the API.
    HangupOrigination {
        id: String,
        /// `canceled` (the API) or `no-answer` (the ring timeout).
        reason: &'static str,
    },
    /// Register a trunk with its registrar (its address just resolved).
    Register {
        trunk: Arc<crate::trunk::Trunk>,
        peer: patchbay_sip::transaction::Peer,
    },
    /// Send a trunk's OPTIONS keep-alive.
    Ping {
        /// Which trunk.
        key: crate::trunk::TrunkKey,
        ping: patchbay_sip::ua::Ping,
    },
    /// Hang up every call and report when their records are written (or the grace is over).
    Shutdown {
        done: oneshot::Sender<()>,
    },
}

/// A call's media once answered, shared by the endpoint (which starts and stops it) and the
/// flow's call control.
pub(crate) type MediaSlot = Arc<std::sync::OnceLock<Arc<CallMedia>>>;

struct LiveCall {
    ended: watch::Sender<bool>,
    dtmf: mpsc::Sender<Dtmf>,
    invite: rsip::Request,
    /// The flow waiting in `transfer` for the REFER's outcome.
    transfer: Option<oneshot::Sender<Result<(), CallError>>>,
    /// Our side of the session and what was last agreed (kept for re-INVITEs, RFC 3264 §8).
    media: Option<(patchbay_sip::sdp::LocalMedia, patchbay_sip::sdp::Negotiated)>,
    /// The RTP session, once answered.
    rtp_session: MediaSlot,
    /// Marks played, for the flow's `play`.
    played: watch::Sender<u64>,
    /// The call's record, filled as it goes.
    cdr: CdrDraft,
    /// For a call placed through the API: its id (its progress is reported there).
    origination: Option<String>,
    /// The tenant's and trunk's call slots it holds while it is up.
    _slots: crate::trunk::CallSlots,
    /// Counts the call in its tenant's live calls while it lasts.
    _live: crate::tenant::LiveCallGuard,
    /// Its slot in the tenant's share of the flow instance pool.
    _instance: tokio::sync::OwnedSemaphorePermit,
}

impl LiveCall {
    /// Answers a re-INVITE's offer with the same local media and a bumped `o=` version.
    fn reinvite(&mut self, call: CallRef, offer: &[u8], routing: &Routing) -> Result<Vec<u8>, u16> {
        answer_reoffer(self.rtp_session.get().map(|m| &**m), &mut self.media, call, offer, routing)
    }
}

/// Answers a re-INVITE's offer (or an offer-less re-INVITE) with the same local media and a
/// bumped `o=` version, and applies what was agreed to the running media. Shared by inbound
/// calls and outbound legs.
fn answer_reoffer(
    media: Option<&CallMedia>,
    agreed: &mut Option<(patchbay_sip::sdp::LocalMedia, patchbay_sip::sdp::Negotiated)>,
    call: CallRef,
    offer: &[u8],
    routing: &Routing,
) -> Result<Vec<u8>, u16> {
    let Some((local, current)) = agreed.as_mut() else { return Err(488) };
    if offer.iter().all(u8::is_ascii_whitespace) {
        // An offer-less re-INVITE asks us to offer (RFC 3261 §14.2): offer sendrecv, so that
        // it also takes a call off hold. Not done: the answer comes in the ACK, which is not
        // applied; the media keeps the session it has.
        return patchbay_sip::sdp::reoffer(local, current, patchbay_sip::sdp::Direction::SendRecv)
            .map(String::into_bytes)
            .map_err(|e| e.sip_status());
    }
    local.bump_version();
    match patchbay_sip::sdp::answer(&String::from_utf8_lossy(offer), local) {
        Ok(negotiated) => {
            if negotiated.direction != current.direction {
                tracing::info!(?call, from = ?current.direction, to = ?negotiated.direction, "media direction changed (hold/resume)");
            }
            let sdp = negotiated.local_sdp.clone().into_bytes();
            if let Some(media) = media {
                apply_negotiated(media, current, &negotiated, routing);
            }
            *current = negotiated;
            Ok(sdp)
        }
        Err(e) => {
            tracing::info!(?call, "re-INVITE offer not acceptable: {e}");
            Err(e.sip_status())
        }
    }
}

/// Points a running RTP session at what a new offer/answer agreed: the same stream with a new
/// address or direction (hold/resume, RFC 3264 §8), or a new stream (new SSRC, RFC 3550 §8)
/// when the codec, payload types or SRTP keys changed.
fn apply_negotiated(
    media: &CallMedia,
    current: &patchbay_sip::sdp::Negotiated,
    negotiated: &patchbay_sip::sdp::Negotiated,
    routing: &Routing,
) {
    let same_stream = negotiated.codec == current.codec
        && negotiated.telephone_event == current.telephone_event
        && negotiated.srtp == current.srtp
        // Where RTCP goes and comes from is the session's (RFC 5761), and a call that started
        // multiplexed has no port + 1 any more (`MediaEngine::start_call`): a change of
        // multiplexing starts a new stream rather than a setter beside `set_remote_rtcp`.
        && negotiated.rtcp_mux == current.rtcp_mux;
    if same_stream {
        let remote = (!negotiated.remote_rtp.ip().is_unspecified()).then_some(negotiated.remote_rtp);
        let hold = !negotiated.direction.receives() || remote.is_none();
        media.with(|session| {
            session.set_remote(remote);
            session.set_remote_rtcp(negotiated.remote_rtcp);
            session.set_hold(hold);
            session.set_sending(negotiated.direction.sends());
        });
    } else {
        tracing::info!(codec = negotiated.codec.name(), "media renegotiated: new RTP stream");
        // The clock paces the call at the ptime it started with (its steps on the wheel are
        // fixed): the new stream keeps it, whatever the new SDP prefers.
        let session = media_session(negotiated, media.ptime_ms(), routing);
        // What the old stream still had queued is dropped: report its marks first, so nobody
        // waits for them.
        media.with(MediaSession::clear);
        media.with(|old| *old = session);
    }
}

/// Runs the endpoint until `shutdown` brings a sender; then it hangs up every call and reports
/// on that sender once their records are written (or after [`SHUTDOWN_GRACE`]).
///
/// Runs the endpoint: the user agent core fed by every transport's [`Inbound`] messages,
/// sending through [`Outbound`]. `contact` is the `host:port` put in Contact and Via.
pub async fn run_endpoint(
    listeners: Vec<(patchbay_sip::transaction::Transport, SocketAddr)>,
    mut inbound: mpsc::Receiver<Inbound>,
    outbound: Outbound,
    engine: Arc<FlowEngine>,
    registry: Arc<FlowRegistry>,
    routing: Arc<Routing>,
    control: EndpointControl,
) {
    let EndpointControl { commands, mut command_rx, mut shutdown } = control;
    // Behind NAT, the external address with the port we listen on.
    let advertised = |addr: SocketAddr| match routing.external_ip {
        Some(ip) => SocketAddr::new(ip, addr.port()).to_string(),
        None => addr.to_string(),
    };
    let Some(&(_, first)) = listeners.first() else { return };
    // Tags, branches and cnonces come from this seed: the OS's CSPRNG, not a guessable value.
    let seed = getrandom::u64().unwrap_or_else(|e| {
        tracing::error!("no randomness from the OS for the SIP seed: {e}");
        std::collections::hash_map::RandomState::new().hash_one(first)
    });
    let mut ua = UserAgent::new(UaConfig {
        contact_host: advertised(first),
        user_agent: format!("Patchbay/{}", env!("CARGO_PKG_VERSION")),
        timers: TimerConfig::default(),
        seed,
    });
    // Requests over TCP or TLS name a listener of that transport when there is one (the first
    // of each kind).
    for (transport, addr) in listeners.iter().rev() {
        ua.set_listener(*transport, advertised(*addr));
    }
    let mut endpoint = Endpoint {
        ua,
        calls: HashMap::new(),
        ending: HashMap::new(),
        legs: HashMap::new(),
        digest: HashMap::new(),
        engine,
        registry,
        routing,
        commands,
        shutdown: None,
        registrations: HashMap::new(),
        pings: HashMap::new(),
    };
    loop {
        // What the last input made the user agent send.
        while let Some(output) = endpoint.ua.poll_output() {
            match output {
                UaOutput::Transmit { peer, message } => outbound.send(peer, message.to_string().into_bytes()).await,
                UaOutput::Event(event) => endpoint.on_event(event),
            }
        }
        endpoint.check_shutdown_done();
        let deadline = endpoint.ua.poll_timeout().map(tokio::time::Instant::from_std);
        let grace = endpoint.shutdown.as_ref().map(|(_, at)| tokio::time::Instant::from_std(*at));
        tokio::select! {
            received = inbound.recv() => {
                let Some(Inbound { peer, message }) = received else { return };
                endpoint.ua.handle_receive(std::time::Instant::now(), peer, message);
            }
            Some(command) = command_rx.recv() => endpoint.on_command(command),
            done = &mut shutdown, if !shutdown.is_terminated() => {
                if let Ok(done) = done {
                    endpoint.on_command(Command::Shutdown { done });
                }
            }
            () = async { if let Some(d) = deadline { tokio::time::sleep_until(d).await } else { std::future::pending().await } } => {
                endpoint.ua.handle_timeout(std::time::Instant::now());
            }
            () = async { if let Some(d) = grace { tokio::time::sleep_until(d).await } else { std::future::pending().await } } => {
                endpoint.shutdown_grace_over();
            }
        }
    }
}

/// How the rest of the process steers the endpoint: calls' and the API's commands, and the
/// shutdown request (answered once every call's record is written).
pub struct EndpointControl {
    /// For call tasks and the API.
    pub commands: mpsc::UnboundedSender<Command>,
    /// The endpoint's end of it.
    pub command_rx: mpsc::UnboundedReceiver<Command>,
    /// Brings the sender to report on once shutdown is over.
    pub shutdown: oneshot::Receiver<oneshot::Sender<()>>,
}

/// How long shutdown waits for calls to end (BYE answered, flows unwound) before writing the
/// remaining records as they are.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// The endpoint task's state: the user agent core and the calls it carries.
struct Endpoint {
    ua: UserAgent,
    calls: HashMap<CallRef, LiveCall>,
    /// Records of calls whose SIP side has ended while their flow is still unwinding.
    ending: HashMap<CallRef, CdrDraft>,
    /// Outbound legs placed by flows' `dial`, and calls placed through the API until answered.
    legs: HashMap<CallRef, Leg>,
    digest: HashMap<String, DigestServer>,
    engine: Arc<FlowEngine>,
    registry: Arc<FlowRegistry>,
    routing: Arc<Routing>,
    commands: mpsc::UnboundedSender<Command>,
    /// Set by `Command::Shutdown`: whom to tell, and when to stop waiting.
    shutdown: Option<(oneshot::Sender<()>, std::time::Instant)>,
    /// Trunks' registrations: which (tenant, trunk) each is.
    registrations: HashMap<patchbay_sip::ua::RegRef, crate::trunk::TrunkKey>,
    /// Trunks' keep-alives waiting for an answer.
    pings: HashMap<patchbay_sip::ua::PingRef, crate::trunk::TrunkKey>,
}

impl Endpoint {
    /// Starts a trunk's registration with its registrar at `peer` (RFC 3261 §10); the user
    /// agent keeps it fresh and reports each change as [`UaEvent::Registration`].
    fn register_trunk(
        &mut self,
        now: std::time::Instant,
        trunk: &crate::trunk::Trunk,
        peer: patchbay_sip::transaction::Peer,
    ) {
        let key = trunk.key();
        let (Ok(registrar), Some(aor), Some(user)) = (trunk.registrar_uri(), trunk.aor(), trunk.username()) else {
            let state = "failed: the trunk's registrar, address of record or user name is not valid".to_owned();
            crate::trunk::set_state(&self.routing.trunk_states, &key, |t| t.registration = Some(state));
            return;
        };
        let register = patchbay_sip::ua::Register {
            peer,
            registrar,
            aor,
            contact_user: user.to_owned(),
            expires: trunk.register_expires.unwrap_or(3600),
            credentials: trunk.digest_client(),
        };
        let reg = self.ua.register(now, register);
        tracing::info!(trunk = %key, to = %peer.addr, "registering");
        crate::trunk::set_state(&self.routing.trunk_states, &key, |t| t.registration = Some("registering".into()));
        self.registrations.insert(reg, key);
    }

    fn on_command(&mut self, command: Command) {
        let now = std::time::Instant::now();
        let ua = &mut self.ua;
        match command {
            Command::Answer { call, reply } => {
                let result = answer(ua, &mut self.calls, call, now, &self.routing, &self.commands);
                let _ = reply.send(result);
            }
            Command::Hangup { call, cause } => {
                if let Some(live) = self.calls.get_mut(&call) {
                    live.cdr.ending("flow-hangup", "flow");
                }
                let answered = self.calls.get(&call).is_some_and(|live| live.media.is_some());
                let code = match cause {
                    HangupCause::SipCode(code) => Some(code),
                    HangupCause::Busy => Some(486),
                    HangupCause::Rejected => Some(603),
                    HangupCause::Normal => None,
                };
                // After answer every cause is a BYE (WIT `hangup-cause`); before, a final
                // response (`bye` sends 480 for a normal clearing).
                match code {
                    Some(code) if !answered => {
                        if let Err(e) = ua.reject(now, call, code) {
                            tracing::debug!(?call, "hangup: {e}");
                        }
                    }
                    _ => self.bye(now, call),
                }
            }
            Command::Transfer { call, target, reply } => match ua.refer(now, call, &target) {
                Ok(()) => {
                    if let Some(live) = self.calls.get_mut(&call) {
                        live.transfer = Some(reply);
                    }
                }
                Err(e) => {
                    let _ = reply.send(Err(CallError::NotAllowed(e.to_string())));
                }
            },
            Command::MediaTimeout { call } => {
                tracing::warn!(?call, "no RTP from the caller for the inactivity timeout: ending the call");
                if let Some(live) = self.calls.get_mut(&call) {
                    live.cdr.ending("rtp-timeout", "patchbay");
                }
                self.bye(now, call);
            }
            Command::FlowDone { call, end } => {
                if let Some(live) = self.calls.get_mut(&call) {
                    // The flow returned: hang up whatever is still up (§15), for the flow's reason.
                    live.cdr.ending(end.outcome, "flow");
                    live.cdr.flow_ended(end);
                    self.bye(now, call);
                } else if let Some(mut draft) = self.ending.remove(&call) {
                    draft.flow_ended(end);
                    if let Some(cdr) = draft.finish() {
                        self.routing.cdr.write(cdr);
                    }
                }
            }
            Command::Dial { call, target, caller_id, headers, events, reply } => {
                let result = self.dial(now, call, *target, caller_id, headers, events);
                let _ = reply.send(result);
            }
            Command::HangupLeg { leg, reason, by } => {
                if let Some(l) = self.legs.get_mut(&leg) {
                    l.cdr.ending(reason, by);
                }
                if let Err(e) = self.ua.hangup(now, leg) {
                    tracing::debug!(?leg, "leg hangup: {e}");
                }
            }
            Command::Originate { origination, .. } if self.shutdown.is_some() => {
                self.origination_failed(&origination.id, "Patchbay is shutting down".into());
            }
            Command::Originate { origination, peer } => self.originate(now, origination, peer),
            Command::OriginationFailed { origination, reason } => self.origination_failed(&origination.id, reason),
            Command::HangupOrigination { id, reason } => self.hangup_origination(now, &id, reason),
            Command::Register { trunk, peer } if self.shutdown.is_none() => self.register_trunk(now, &trunk, peer),
            Command::Register { .. } => {}
            Command::Ping { key, ping } => {
                let ping = self.ua.ping(now, ping);
                self.pings.insert(ping, key);
            }
            Command::Shutdown { done } => {
                tracing::info!(calls = self.calls.len(), "shutting down: hanging up every call");
                // Take our bindings off the carriers' registrars (RFC 3261 §10.2.2).
                let registrations: Vec<_> = self.registrations.keys().copied().collect();
                for reg in registrations {
                    if let Err(e) = self.ua.unregister(now, reg) {
                        tracing::debug!(?reg, "unregister: {e}");
                    }
                }
                let live: Vec<CallRef> = self.calls.keys().copied().collect();
                for call in live {
                    if let Some(live) = self.calls.get_mut(&call) {
                        live.cdr.ending("shutdown", "patchbay");
                    }
                    self.bye(now, call);
                }
                // Calls placed through the API that wait at their gates are refused, those still
                // ringing are cancelled.
                for view in self.routing.originations.close() {
                    crate::api::write_refused(&self.routing.cdr, &view, "shutdown");
                }
                let ringing: Vec<CallRef> =
                    self.legs.iter().filter(|(_, leg)| leg.origination.is_some()).map(|(call, _)| *call).collect();
                for call in ringing {
                    if let Some(leg) = self.legs.get_mut(&call) {
                        leg.cdr.ending("shutdown", "patchbay");
                    }
                    if let Err(e) = self.ua.hangup(now, call) {
                        tracing::debug!(?call, "cancelling an origination: {e}");
                    }
                }
                self.shutdown = Some((done, now + SHUTDOWN_GRACE));
            }
        }
    }

    /// Places an outbound leg for `owner`'s flow: RTP ports, an SDP offer that puts the
    /// caller's codec first (so the bridge need not convert), the INVITE.
    fn dial(
        &mut self,
        now: std::time::Instant,
        owner: CallRef,
        mut target: crate::dial::Target,
        caller_id: Option<String>,
        headers: Vec<Header>,
        events: mpsc::UnboundedSender<LegEvent>,
    ) -> Result<CallRef, CallError> {
        let live = self.calls.get(&owner).ok_or(CallError::Hangup)?;
        let (rtp, rtcp) = crate::media::bind_rtp_pair(self.routing.rtp_bind)
            .map_err(|e| CallError::Unavailable(format!("no RTP port: {e}")))?;
        let bind = rtp.local_addr().map_err(|e| CallError::Unavailable(format!("no RTP port: {e}")))?;
        let mut local = patchbay_sip::sdp::LocalMedia::new(bind, self.routing.external_ip, random_u64(0xd1a1), 1);
        local.ptime = self.routing.ptime_ms;
        if let Some((trunk, _)) = &target.trunk {
            offer_as_trunk_says(&mut local, trunk);
        }
        if live.media.as_ref().is_some_and(|(_, n)| n.codec.codec == patchbay_sip::sdp::AudioCodec::Pcma) {
            // The caller's codec first, so the bridge need not convert.
            local.codecs.sort_by_key(|c| *c != patchbay_sip::sdp::AudioCodec::Pcma);
        }
        let offer =
            patchbay_sip::sdp::offer(&local).map_err(|e| CallError::Unavailable(format!("building the offer: {e}")))?;
        let headers: Vec<rsip::Header> = headers.into_iter().map(|h| rsip::Header::Other(h.name, h.value)).collect();
        let (dial, from_uri) = match &target.trunk {
            Some((trunk, number)) => {
                // RFC 3325: the caller ID goes out only when the tenant may present it.
                let id = trunk
                    .caller_id(caller_id.as_deref())
                    .map_err(|e| CallError::NotAllowed(format!("caller-id-not-allowed: {e}")))?;
                let peer = patchbay_sip::transaction::Peer { transport: trunk.sip_transport(), addr: target.peer };
                let dial = trunk
                    .dial(
                        peer,
                        number,
                        &id,
                        None,
                        offer.clone().into_bytes(),
                        [service_route(&self.routing, trunk), headers].concat(),
                    )
                    .map_err(CallError::InvalidArgument)?;
                (dial, trunk.identity(&id))
            }
            None => {
                let from_uri = match caller_id {
                    Some(id) if id.starts_with("sip:") || id.starts_with("sips:") => {
                        if !crate::dial::is_plain_uri(&id) || rsip::Uri::try_from(id.as_str()).is_err() {
                            return Err(CallError::InvalidArgument(format!("caller ID {id:?} is not a plain SIP URI")));
                        }
                        id
                    }
                    Some(id) => {
                        crate::trunk::check_caller_id(&id).map_err(CallError::InvalidArgument)?;
                        format!("sip:{id}@{}", self.ua.contact_host())
                    }
                    None => live
                        .invite
                        .from_header()
                        .ok()
                        .and_then(|f| f.uri().ok())
                        .map_or_else(|| format!("sip:patchbay@{}", self.ua.contact_host()), |u| u.to_string()),
                };
                let peer = patchbay_sip::transaction::Peer {
                    transport: patchbay_sip::transaction::Transport::Udp,
                    addr: target.peer,
                };
                let dial = patchbay_sip::ua::Dial {
                    peer,
                    target: target.uri.clone(),
                    from: format!("<{from_uri}>"),
                    to: None,
                    sdp: offer.clone().into_bytes(),
                    credentials: None,
                    headers,
                };
                (dial, from_uri)
            }
        };
        // The leg's record, billed to the flow that places it (its Call-ID is set below).
        let mut cdr = live.cdr.leg("", &from_uri, &target.uri.to_string());
        let leg = self.ua.dial(now, dial);
        tracing::info!(call = ?owner, ?leg, to = %target.peer, "dialling");
        cdr.set_call_id(self.ua.call_id(leg).unwrap_or_default());
        let slots = std::mem::take(&mut target.slots);
        self.legs.insert(leg, Leg { slots, ..Leg::new(owner, events, offer, local, (rtp, rtcp), cdr) });
        Ok(leg)
    }

    /// Places a call through a trunk for the API: RTP ports, an offer with the trunk's codecs
    /// and SRTP setting, the INVITE with its caller ID and credentials, and a ring timeout.
    fn originate(
        &mut self,
        now: std::time::Instant,
        origination: Box<crate::originate::Origination>,
        peer: patchbay_sip::transaction::Peer,
    ) {
        // Cancelled while it was on its way here: its record is written, nothing to place.
        if !self.routing.originations.claim(&origination.id) {
            return;
        }
        let trunk = Arc::clone(&origination.trunk);
        let flow = match self.registry.get(&trunk.tenant, &origination.flow) {
            Ok(flow) => flow,
            Err(e) => return self.origination_failed(&origination.id, format!("{e}")),
        };
        let sockets = crate::media::bind_rtp_pair(self.routing.rtp_bind);
        let Ok((rtp, rtcp)) = sockets else { return self.origination_failed(&origination.id, "no RTP port".into()) };
        let Ok(bind) = rtp.local_addr() else { return self.origination_failed(&origination.id, "no RTP port".into()) };
        let mut local = patchbay_sip::sdp::LocalMedia::new(bind, self.routing.external_ip, random_u64(0x0419), 1);
        local.ptime = self.routing.ptime_ms;
        offer_as_trunk_says(&mut local, &trunk);
        let offer = match patchbay_sip::sdp::offer(&local) {
            Ok(offer) => offer,
            Err(e) => return self.origination_failed(&origination.id, format!("building the offer: {e}")),
        };
        let dial = match trunk.dial(
            peer,
            &origination.to,
            &origination.caller_id,
            origination.caller_name.as_deref(),
            offer.clone().into_bytes(),
            service_route(&self.routing, &trunk),
        ) {
            Ok(dial) => dial,
            Err(e) => return self.origination_failed(&origination.id, e),
        };
        let (from, to) = (trunk.identity(&origination.caller_id), dial.target.to_string());
        let leg = self.ua.dial(now, dial);
        let call_id = self.ua.call_id(leg).unwrap_or_default().to_owned();
        tracing::info!(id = %origination.id, ?leg, trunk = %trunk.name, to = %peer.addr, "originating");
        let info = CallInfo {
            call_id,
            tenant: trunk.tenant.clone(),
            flow: origination.flow.clone(),
            from,
            to,
            direction: Direction::Outbound,
            headers: Vec::new(),
        };
        let mut cdr = CdrDraft::new(&info, flow.version());
        cdr.set_id(&origination.id);
        self.routing.originations.placed(&origination.id, leg);
        self.legs.insert(
            leg,
            Leg {
                // No flow owns it (its own starts on answer), and nobody listens to its events.
                origination: Some((origination, CallChannels::new())),
                ..Leg::new(leg, mpsc::unbounded_channel().0, offer, local, (rtp, rtcp), cdr)
            },
        );
    }

    /// An origination that never went out: its status and its record say why.
    fn origination_failed(&mut self, id: &str, reason: String) {
        tracing::warn!(id, "origination failed: {reason}");
        let status = crate::originate::CallStatus::Failed;
        if let Some(view) = self.routing.originations.update(id, status, None, Some(reason)) {
            crate::api::write_refused(&self.routing.cdr, &view, "failed");
        }
    }

    /// Cancels (before answer) or hangs up (after) a call placed through the API.
    fn hangup_origination(&mut self, now: std::time::Instant, id: &str, reason: &'static str) {
        let Some(call) = self.routing.originations.call_of(id) else { return };
        if let Some(leg) = self.legs.get_mut(&call) {
            leg.cdr.ending(reason, if reason == "canceled" { "api" } else { "patchbay" });
            if let Err(e) = self.ua.hangup(now, call) {
                tracing::debug!(?call, "canceling the origination: {e}");
            }
        } else if reason == "canceled" && self.calls.contains_key(&call) {
            if let Some(live) = self.calls.get_mut(&call) {
                live.cdr.ending("api-hangup", "api");
            }
            self.bye(now, call);
        }
    }

    /// Ends a call from our side: BYE once answered (the session is over for us at once, RFC
    /// 3261 §15), 480 before.
    fn bye(&mut self, now: std::time::Instant, call: CallRef) {
        let answered = self.calls.get(&call).is_some_and(|live| live.media.is_some());
        match self.ua.hangup(now, call) {
            Ok(()) if answered => {
                call_ended(&mut self.calls, &mut self.ending, &self.routing, call, EndCause::LocalBye);
                hangup_legs(&mut self.ua, &mut self.legs, call, now);
            }
            Ok(()) => {}
            Err(e) => tracing::debug!(?call, "hangup: {e}"),
        }
    }

    /// Shutdown finishes once every call has ended and every record is written.
    fn check_shutdown_done(&mut self) {
        if self.shutdown.is_some()
            && self.calls.is_empty()
            && self.ending.is_empty()
            && self.legs.is_empty()
            // The un-REGISTERs answered (or the grace over), so the carriers stop sending calls.
            && self.registrations.is_empty()
            && let Some((done, _)) = self.shutdown.take()
        {
            let _ = done.send(());
        }
    }

    /// The grace is over: write what we know of the calls that are still going.
    fn shutdown_grace_over(&mut self) {
        let Some((done, _)) = self.shutdown.take() else { return };
        let unfinished: Vec<CdrDraft> = self
            .calls
            .drain()
            .map(|(_, live)| {
                let _ = live.ended.send(true);
                live.cdr
            })
            .chain(self.ending.drain().map(|(_, draft)| draft))
            .chain(self.legs.drain().map(|(_, mut leg)| {
                if let Some(media) = &leg.media {
                    media.close();
                }
                if let Some((origination, _)) = leg.origination.take() {
                    let reason = Some("Patchbay shut down while it rang".to_owned());
                    let status = crate::originate::CallStatus::Canceled;
                    self.routing.originations.update(&origination.id, status, None, reason);
                }
                leg.cdr
            }))
            .collect();
        for draft in unfinished {
            let sip_code = if draft.is_answered() { 200 } else { 480 };
            let sip = SipEnd { cause: "shutdown".into(), by: "patchbay", sip_code };
            let flow = FlowEnd { outcome: "shutdown", detail: None, vars: Default::default() };
            if let Some(cdr) = draft.close(sip, flow) {
                self.routing.cdr.write(cdr);
            }
        }
        tracing::warn!("shutdown grace over: records written for calls that had not ended");
        let _ = done.send(());
    }
}

fn answer(
    ua: &mut UserAgent,
    calls: &mut HashMap<CallRef, LiveCall>,
    call: CallRef,
    now: std::time::Instant,
    routing: &Routing,
    commands: &mpsc::UnboundedSender<Command>,
) -> Result<(), CallError> {
    let live = calls.get_mut(&call).ok_or(CallError::Hangup)?;
    if live.media.is_some() {
        // Answering an answered call does nothing (WIT `answer`).
        return Ok(());
    }
    let offer = String::from_utf8_lossy(&live.invite.body).into_owned();
    if offer.trim().is_empty() {
        // A late-offer INVITE (offer in our 200, answer in the ACK) needs the UAC side of
        // offer/answer wired into the call; refuse clearly until then.
        live.cdr.ending("media-refused", "patchbay");
        let _ = ua.reject(now, call, 488);
        return Err(CallError::Unavailable("INVITE without SDP offer is not supported yet".into()));
    }
    // The RTP port advertised in the answer, RTCP on the next one.
    let (rtp, rtcp) = crate::media::bind_rtp_pair(routing.rtp_bind)
        .map_err(|e| CallError::Unavailable(format!("no RTP port: {e}")))?;
    let bind = rtp.local_addr().map_err(|e| CallError::Unavailable(format!("no RTP port: {e}")))?;
    let mut local = patchbay_sip::sdp::LocalMedia::new(bind, routing.external_ip, call.0, 1);
    local.ptime = routing.ptime_ms;
    // Accept RFC 3389 comfort noise when offered: silence then goes out as CN packets.
    local.comfort_noise = true;
    if routing.srtp {
        local.srtp = patchbay_sip::sdp::SrtpPolicy::Offer(sdes_key());
    }
    match patchbay_sip::sdp::answer(&offer, &local) {
        Ok(negotiated) => {
            let srtp = negotiated.srtp.as_ref().map(|p| p.suite.name()).unwrap_or("off");
            tracing::info!(?call, codec = negotiated.codec.name(), remote = %negotiated.remote_rtp, srtp, "answering");
            let session = media_session(&negotiated, negotiated.ptime, routing);
            let (inactive, mut inactive_rx) = mpsc::unbounded_channel();
            let sinks = CallSinks { dtmf: live.dtmf.clone(), played: live.played.clone(), inactive };
            let media = routing
                .media
                .start_call(session, rtp, Some(rtcp), sinks)
                .map_err(|e| CallError::Unavailable(format!("media: {e}")))?;
            let _ = live.rtp_session.set(media);
            let commands = commands.clone();
            tokio::spawn(async move {
                if inactive_rx.recv().await.is_some() {
                    let _ = commands.send(Command::MediaTimeout { call });
                }
            });
            let sdp = negotiated.local_sdp.clone().into_bytes();
            live.media = Some((local, negotiated));
            ua.answer(now, call, sdp).map_err(|_| CallError::Hangup)?;
            live.cdr.answered();
            Ok(())
        }
        Err(e) => {
            tracing::info!(?call, "offer not acceptable: {e}");
            live.cdr.ending("media-refused", "patchbay");
            let _ = ua.reject(now, call, e.sip_status());
            Err(CallError::NotAllowed(format!("offer not acceptable: {e}")))
        }
    }
}

/// A random number from the OS's randomness (through `RandomState`'s per-process keys, mixed
/// with a counter): SSRCs, initial sequence numbers and timestamps, SDES keys.
pub(crate) fn random_u64(salt: u64) -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::collections::hash_map::RandomState::new().hash_one((salt, n))
}

/// A fresh SDES master key and salt (RFC 4568 §6.1) from the OS's CSPRNG.
fn sdes_key() -> patchbay_sip::sdp::SdesKey {
    let mut key = [0u8; 30];
    if let Err(e) = getrandom::fill(&mut key) {
        tracing::error!("no randomness from the OS for an SRTP key: {e}");
    }
    patchbay_sip::sdp::SdesKey(key)
}

/// The registrar's Service-Route as the Route of a new request through `trunk` (RFC 3608 §6:
/// the UA preloads it while registered).
fn service_route(routing: &Routing, trunk: &crate::trunk::Trunk) -> Vec<rsip::Header> {
    let states = routing.trunk_states.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let route = states.get(&trunk.key()).map(|t| t.service_route.clone()).unwrap_or_default();
    route.into_iter().map(|r| rsip::Header::Route(r.into())).collect()
}

/// An offer through `trunk`: its codecs in its order, SRTP as it says (RFC 4568 SDES keys).
fn offer_as_trunk_says(local: &mut patchbay_sip::sdp::LocalMedia, trunk: &crate::trunk::Trunk) {
    local.codecs.clone_from(&trunk.codecs);
    local.srtp = match trunk.srtp {
        crate::config::SrtpMode::Off => patchbay_sip::sdp::SrtpPolicy::Off,
        crate::config::SrtpMode::Optional => patchbay_sip::sdp::SrtpPolicy::Offer(sdes_key()),
        crate::config::SrtpMode::Mandatory => patchbay_sip::sdp::SrtpPolicy::Require(sdes_key()),
    };
}

/// The media session for what was negotiated.
fn media_session(negotiated: &patchbay_sip::sdp::Negotiated, ptime_ms: u16, routing: &Routing) -> MediaSession {
    crate::media::session_for(negotiated, ptime_ms, routing.media.pool(), routing.rtp_timeout, random_u64(0x5eed))
}

impl Endpoint {
    fn on_event(&mut self, event: UaEvent) {
        let Self { ua, calls, ending, legs, digest, engine, registry, routing, commands, registrations, pings, .. } =
            self;
        let now = std::time::Instant::now();
        match event {
            UaEvent::IncomingCall { call, peer, request } => {
                let host = request.uri.host_with_port.host.to_string();
                let uri_user = request.uri.auth.as_ref().map(|a| a.user.clone()).unwrap_or_default();
                // A carrier's call to one of a trunk's numbers (DIDs): by the request-URI's user,
                // else the To header's (carriers differ in which carries the dialled number).
                let to_user = request.to_header().ok().and_then(|t| t.uri().ok()).and_then(|u| u.auth).map(|a| a.user);
                // The request-URI decides across every trunk first; To only when it names none
                // (a To header must not pull a call meant for one tenant into another's DID).
                let tenants = Arc::clone(&routing.tenants);
                let did = tenants.by_did(&uri_user).or_else(|| to_user.as_deref().and_then(|u| tenants.by_did(u)));
                let (tenant, user) = match &did {
                    Some((tenant, _, flow)) => (Some(*tenant), flow.clone()),
                    None => (tenants.by_domain(&host), uri_user.clone()),
                };
                // A trunk's source addresses are trusted for its own DIDs only.
                let trusted_trunk =
                    did.as_ref().filter(|(_, trunk, _)| trunk.trusts(peer.addr.ip())).map(|(_, t, _)| t);
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
                            let uri =
                                value.split_once('<').and_then(|(_, r)| r.split_once('>')).map_or(value, |(u, _)| u);
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
                start_flow(calls, routing, engine, commands, start);
            }
            UaEvent::Confirmed { call } => tracing::debug!(?call, "call confirmed (ACK)"),
            UaEvent::PingAnswered { ping, status } => {
                let Some(key) = pings.remove(&ping) else { return };
                let state = match status {
                    Some(status) => {
                        tracing::debug!(trunk = %key, status, "trunk keep-alive answered");
                        format!("answered {status}")
                    }
                    None => {
                        tracing::warn!(trunk = %key, "trunk keep-alive unanswered: the carrier is unreachable");
                        "unanswered".to_owned()
                    }
                };
                crate::trunk::set_state(&routing.trunk_states, &key, |t| t.keepalive = Some(state));
            }
            UaEvent::Registration { reg, state } => {
                let Some(key) = registrations.get(&reg) else { return };
                let shown = state.display_at(now).to_string();
                match &state {
                    patchbay_sip::ua::RegistrationState::Failed { .. } => {
                        tracing::warn!(trunk = %key, "trunk registration {shown}");
                    }
                    _ => tracing::info!(trunk = %key, "trunk registration {shown}"),
                }
                // RFC 3608 §6: while registered, requests go through the registrar's Service-Route.
                let service_route = match &state {
                    patchbay_sip::ua::RegistrationState::Registered { service_route, .. } => service_route.clone(),
                    _ => Vec::new(),
                };
                crate::trunk::set_state(&routing.trunk_states, key, |t| {
                    t.registration = Some(shown);
                    t.service_route = service_route;
                });
                if matches!(state, patchbay_sip::ua::RegistrationState::Unregistered) {
                    registrations.remove(&reg);
                }
            }
            // Outbound legs' progress and answer (flows' `dial`); our own re-INVITEs are not
            // sent by the server yet.
            UaEvent::Progress { call, status, sdp } => {
                let Some(leg) = legs.get_mut(&call) else { return };
                if let Some((origination, _)) = &mut leg.origination {
                    // The ring timeout runs from the first provisional answer: before it, a
                    // target that never answers is the transaction's to time out (64·T1), and
                    // the call goes to the trunk's next target (RFC 3263 §4.3).
                    if !origination.ringing {
                        origination.ringing = true;
                        let (commands, id, ring) = (commands.clone(), origination.id.clone(), origination.ring_timeout);
                        tokio::spawn(async move {
                            tokio::time::sleep(ring).await;
                            let _ = commands.send(Command::HangupOrigination { id, reason: "no-answer" });
                        });
                    }
                    // No flow listens before the answer: early media is reported, not played.
                    let state = if sdp.is_some() {
                        crate::originate::CallStatus::EarlyMedia
                    } else {
                        crate::originate::CallStatus::Ringing
                    };
                    routing.originations.update(&origination.id, state, None, None);
                    return;
                }
                tracing::debug!(?call, status, early_media = sdp.is_some(), "outbound leg progress");
                let early = match sdp {
                    Some(sdp) if leg.media.is_none() => start_leg_media(leg, call, &sdp, routing, commands, true, None),
                    _ => None,
                };
                let _ = leg.events.send(LegEvent::Progress { status, early });
            }
            UaEvent::Answered { call, sdp } => {
                if legs.get(&call).is_some_and(|leg| leg.origination.is_some()) {
                    if let Some(leg) = legs.remove(&call) {
                        origination_answered(ua, calls, routing, engine, registry, commands, now, call, leg, &sdp);
                    }
                    return;
                }
                let Some(leg) = legs.get_mut(&call) else { return };
                tracing::info!(?call, owner = ?leg.owner, "outbound leg answered");
                leg.cdr.answered();
                if leg.media.is_none() {
                    start_leg_media(leg, call, &sdp, routing, commands, false, None);
                } else if let (Some(media), Some((_, current))) = (&leg.media, leg.agreed.as_mut()) {
                    // Without reliable provisionals the 2xx's answer is the one that counts
                    // (RFC 3261 §13.2.1): it may point elsewhere than the early media did.
                    match patchbay_sip::sdp::accept_answer(&leg.offer, &String::from_utf8_lossy(&sdp)) {
                        Ok(negotiated) => {
                            apply_negotiated(media, current, &negotiated, routing);
                            *current = negotiated;
                        }
                        Err(e) => {
                            tracing::info!(?call, "the callee's 2xx SDP is not usable ({e}): keeping the early media's")
                        }
                    }
                }
                match (leg.media.clone(), leg.dtmf.take()) {
                    (Some(media), Some(dtmf)) => {
                        let _ = leg.events.send(LegEvent::Answered { media, dtmf });
                    }
                    _ => {
                        tracing::warn!(?call, "the callee's answer has no usable media: hanging up the leg");
                        let _ = ua.hangup(now, call);
                    }
                }
            }
            UaEvent::ReInviteAnswered { call, result } => {
                tracing::debug!(?call, ok = result.is_ok(), "our re-INVITE answered")
            }
            UaEvent::Transfer { call, status, final_ } => {
                tracing::info!(?call, status, final_, "transfer progress");
                if final_ && let Some(reply) = calls.get_mut(&call).and_then(|live| live.transfer.take()) {
                    if (200..300).contains(&status) {
                        let _ = reply.send(Ok(()));
                        if let Some(live) = calls.get_mut(&call) {
                            live.cdr.ending("transferred", "flow");
                        }
                        // RFC 5589 §6.1: the transferor ends its call once the transfer succeeded.
                        if ua.hangup(now, call).is_ok() {
                            call_ended(calls, ending, routing, call, EndCause::LocalBye);
                            hangup_legs(ua, legs, call, now);
                        }
                    } else {
                        let _ = reply.send(Err(CallError::Unavailable(format!("transfer failed with SIP {status}"))));
                    }
                }
            }
            UaEvent::ReInvite { call, offer } => {
                let answer = match (calls.get_mut(&call), legs.get_mut(&call)) {
                    (Some(live), _) => live.reinvite(call, &offer, routing),
                    // The callee of a bridged leg holds, resumes or refreshes the session.
                    (None, Some(leg)) => answer_reoffer(leg.media.as_deref(), &mut leg.agreed, call, &offer, routing),
                    (None, None) => Err(481),
                };
                if let Err(e) = ua.answer_reinvite(now, call, answer) {
                    tracing::debug!(?call, "re-INVITE: {e}");
                }
            }
            UaEvent::InfoDtmf { call, digit, duration_ms } => {
                let sink = calls
                    .get(&call)
                    .map(|live| &live.dtmf)
                    .or_else(|| legs.get(&call).and_then(|leg| leg.dtmf_sink.as_ref()));
                if let Some(sink) = sink {
                    let _ = sink.try_send(Dtmf { digit, duration_ms });
                }
            }
            UaEvent::Ended { call, cause } => {
                let origination = legs.get_mut(&call).and_then(|leg| leg.origination.take());
                if let Some((mut origination, _)) = origination
                    && let Some(leg) = legs.remove(&call)
                {
                    // RFC 3263 §4.3: a target that timed out or was unavailable is skipped for
                    // the next one (unless we ended the attempt ourselves).
                    let unavailable = matches!(cause, EndCause::Failed(408 | 503)) && leg.cdr.local_reason().is_none();
                    if unavailable && !origination.fallback.is_empty() {
                        let peer = origination.fallback.remove(0);
                        tracing::info!(id = %origination.id, ?cause, next = %peer.addr, "trunk target unavailable: trying the next");
                        let _ = commands.send(Command::Originate { origination, peer });
                        return;
                    }
                    let end = leg_end(&leg.cdr, &cause);
                    use crate::originate::CallStatus;
                    // `leg_end` has already told busy from no-answer (RFC 3261 §21) and our own
                    // reasons from the callee's.
                    let status = match end.cause.as_str() {
                        "canceled" | "shutdown" => CallStatus::Canceled,
                        "no-answer" | "cancelled" => CallStatus::NoAnswer,
                        "busy" => CallStatus::Busy,
                        _ => CallStatus::Failed,
                    };
                    let reason = Some(format!("{} ({})", end.cause, end.sip_code));
                    routing.originations.update(&origination.id, status, Some(end.sip_code), reason);
                    let flow = FlowEnd { outcome: "not-run", detail: None, vars: Default::default() };
                    if let Some(record) = leg.cdr.close(end, flow) {
                        routing.cdr.write(record);
                    }
                    return;
                } else if let Some(mut leg) = legs.remove(&call) {
                    tracing::info!(?call, owner = ?leg.owner, ?cause, "outbound leg ended");
                    if let Some(media) = &leg.media {
                        media.close();
                    }
                    let end = leg_end(&leg.cdr, &cause);
                    leg.cdr.sip_ended(end);
                    if let Some(record) = leg.cdr.finish() {
                        routing.cdr.write(record);
                    }
                    let _ = leg.events.send(LegEvent::Ended { cause });
                    return;
                }
                if cause == EndCause::AckTimeout {
                    tracing::warn!(?call, "our 200 OK was never ACKed (wrong Contact/Record-Route or NAT?); sent BYE");
                }
                call_ended(calls, ending, routing, call, cause);
                hangup_legs(ua, legs, call, now);
            }
        }
    }
}

/// The call's session is over (RFC 3261 §15: for us as soon as we send BYE): stop its media,
/// wake its flow, and fill in its record (written now if the flow has already ended).
fn call_ended(
    calls: &mut HashMap<CallRef, LiveCall>,
    ending: &mut HashMap<CallRef, CdrDraft>,
    routing: &Routing,
    call: CallRef,
    cause: EndCause,
) {
    if let Some(live) = calls.remove(&call) {
        if let Some(media) = live.rtp_session.get() {
            let (stats, quality) = media.with(|s| (s.stats(), s.quality()));
            tracing::info!(
                ?call,
                rtp_in = stats.received,
                rtp_out = stats.sent,
                concealed = stats.concealed,
                lost = quality.local_cumulative_lost,
                jitter_ms = quality.local_jitter.as_secs_f64() * 1e3,
                peer_lost = ?quality.remote_cumulative_lost,
                rtt_ms = ?quality.rtt.map(|d| d.as_secs_f64() * 1e3),
                srtp_failures = stats.srtp_failures,
                "media stopped"
            );
            media.close();
        }
        let _ = live.ended.send(true);
        if let Some(id) = &live.origination {
            let reason = Some("answered, then hung up".to_owned());
            routing.originations.update(id, crate::originate::CallStatus::Completed, Some(200), reason);
        }
        let mut draft = live.cdr;
        let answered = draft.is_answered();
        let local = draft.local_reason().map(|(c, b)| (c.to_owned(), b));
        let local = || local.clone().unwrap_or_else(|| ("patchbay-hangup".to_owned(), "patchbay"));
        let (cause, by, sip_code) = match cause {
            EndCause::RemoteBye => ("caller-hangup".to_owned(), "caller", 200),
            EndCause::Cancelled => ("caller-cancel".to_owned(), "caller", 487),
            EndCause::LocalBye => {
                let (c, b) = local();
                (c, b, 200)
            }
            EndCause::Rejected(code) => {
                let (c, b) = local();
                (c, b, code)
            }
            EndCause::Failed(code) => ("failed".to_owned(), "callee", code),
            EndCause::AckTimeout => ("ack-timeout".to_owned(), "network", 200),
            EndCause::SessionExpired => ("session-expired".to_owned(), "network", 200),
        };
        let sip_code = if answered { 200 } else { sip_code };
        tracing::info!(?call, cause = %cause, hung_up_by = by, "call ended");
        draft.sip_ended(SipEnd { cause, by, sip_code });
        match draft.finish() {
            Some(record) => routing.cdr.write(record),
            None => {
                ending.insert(call, draft);
            }
        }
    }
}

/// Hangs up (or cancels) every outbound leg `owner`'s flow placed.
fn hangup_legs(ua: &mut UserAgent, legs: &mut HashMap<CallRef, Leg>, owner: CallRef, now: std::time::Instant) {
    for (leg, l) in legs.iter_mut().filter(|(_, l)| l.owner == owner) {
        // The leg's own record: its parent call went away.
        l.cdr.ending("caller-hangup", "caller");
        if let Err(e) = ua.hangup(now, *leg) {
            tracing::debug!(?leg, "hanging up the leg: {e}");
        }
    }
}

/// Starts an outbound leg's media from the callee's SDP (in a 18x or the 2xx). Early media
/// gets no RTP inactivity timeout: a callee may send SDP and no audio while it rings.
fn start_leg_media(
    leg: &mut Leg,
    call: CallRef,
    sdp: &[u8],
    routing: &Routing,
    commands: &mpsc::UnboundedSender<Command>,
    early: bool,
    channels: Option<&CallChannels>,
) -> Option<Arc<CallMedia>> {
    let negotiated = match patchbay_sip::sdp::accept_answer(&leg.offer, &String::from_utf8_lossy(sdp)) {
        Ok(negotiated) => negotiated,
        Err(e) => {
            tracing::info!(?call, "the callee's SDP is not usable: {e}");
            return None;
        }
    };
    let (rtp, rtcp) = leg.sockets.take()?;
    let local = leg.local.take()?;
    let (dtmf, dtmf_rx) = match channels {
        Some(channels) => (channels.dtmf.clone(), None),
        None => {
            let (dtmf, dtmf_rx) = mpsc::channel(DTMF_QUEUE);
            (dtmf, Some(dtmf_rx))
        }
    };
    leg.dtmf_sink = Some(dtmf.clone());
    let (inactive, mut inactive_rx) = mpsc::unbounded_channel();
    let played = channels.map_or_else(|| watch::channel(0).0, |c| c.played.clone());
    let sinks = CallSinks { dtmf, played, inactive };
    let timeout = if early { None } else { routing.rtp_timeout };
    let session =
        crate::media::session_for(&negotiated, negotiated.ptime, routing.media.pool(), timeout, random_u64(0x1e6));
    let media = match routing.media.start_call(session, rtp, Some(rtcp), sinks) {
        Ok(media) => media,
        Err(e) => {
            tracing::error!(?call, "starting the leg's media: {e}");
            return None;
        }
    };
    tracing::info!(?call, codec = negotiated.codec.name(), remote = %negotiated.remote_rtp, "leg media started");
    let commands = commands.clone();
    tokio::spawn(async move {
        if inactive_rx.recv().await.is_some() {
            let _ = commands.send(Command::HangupLeg { leg: call, reason: "rtp-timeout", by: "patchbay" });
        }
    });
    leg.media = Some(Arc::clone(&media));
    leg.dtmf = dtmf_rx;
    leg.agreed = Some((local, negotiated));
    Some(media)
}

/// The record's end of an outbound leg: what ended it and on whose behalf.
fn leg_end(draft: &CdrDraft, cause: &EndCause) -> SipEnd {
    let local = draft.local_reason().map(|(c, b)| (c.to_owned(), b));
    let (cause, by, code) = match cause {
        EndCause::RemoteBye => ("callee-hangup".to_owned(), "callee", 200),
        EndCause::LocalBye => local.map_or(("patchbay-hangup".to_owned(), "patchbay", 200), |(c, b)| (c, b, 200)),
        // Our CANCEL (or BYE) crossed: the reason we gave stands.
        EndCause::Failed(code) | EndCause::Rejected(code) if local.is_some() => {
            let (c, b) = local.unwrap_or_default();
            (c, b, *code)
        }
        EndCause::Failed(code @ (486 | 600)) => ("busy".to_owned(), "callee", *code),
        EndCause::Failed(code @ (408 | 480 | 487)) => ("no-answer".to_owned(), "callee", *code),
        EndCause::Failed(code) | EndCause::Rejected(code) => ("failed".to_owned(), "callee", *code),
        EndCause::Cancelled => ("cancelled".to_owned(), "patchbay", 487),
        EndCause::AckTimeout => ("ack-timeout".to_owned(), "network", 200),
        EndCause::SessionExpired => ("session-expired".to_owned(), "network", 200),
    };
    SipEnd { cause, by, sip_code: if draft.is_answered() { 200 } else { code } }
}

/// A call's flow side channels: key presses in, marks played out.
pub(crate) struct CallChannels {
    dtmf: mpsc::Sender<Dtmf>,
    dtmf_rx: mpsc::Receiver<Dtmf>,
    played: watch::Sender<u64>,
    played_rx: watch::Receiver<u64>,
}

impl CallChannels {
    pub(crate) fn new() -> Self {
        // Bounded: a flow that never reads key presses must not let a peer grow this queue.
        let (dtmf, dtmf_rx) = mpsc::channel(DTMF_QUEUE);
        let (played, played_rx) = watch::channel(0);
        Self { dtmf, dtmf_rx, played, played_rx }
    }
}

/// What it takes to start a call's flow: an inbound call routed to it, or a call placed
/// through the API that was just answered.
struct FlowStart {
    call: CallRef,
    info: CallInfo,
    flow: Arc<patchbay_host::CompiledFlow>,
    tenant: Arc<crate::tenant::Tenant>,
    vars: std::collections::BTreeMap<String, String>,
    refer: bool,
    invite: rsip::Request,
    /// An answered call's running media, channels, and what was agreed.
    media: Option<(Arc<CallMedia>, CallChannels, (patchbay_sip::sdp::LocalMedia, patchbay_sip::sdp::Negotiated))>,
    cdr: CdrDraft,
    origination: Option<String>,
    slots: crate::trunk::CallSlots,
    /// The call's slot in its tenant's share of the flow instance pool.
    instance: tokio::sync::OwnedSemaphorePermit,
}

/// Makes `start.call` a live call and runs its flow in a task of its own; the flow's end
/// comes back as [`Command::FlowDone`].
fn start_flow(
    calls: &mut HashMap<CallRef, LiveCall>,
    routing: &Arc<Routing>,
    engine: &Arc<FlowEngine>,
    commands: &mpsc::UnboundedSender<Command>,
    start: FlowStart,
) {
    let FlowStart { call, info, flow, tenant, vars, refer, invite, media, cdr, origination, slots, instance } = start;
    let (ended, ended_rx) = watch::channel(false);
    let rtp_session: MediaSlot = Arc::default();
    let (channels, agreed) = match media {
        Some((running, channels, agreed)) => {
            let _ = rtp_session.set(running);
            (channels, Some(agreed))
        }
        None => (CallChannels::new(), None),
    };
    let CallChannels { dtmf, dtmf_rx, played, played_rx } = channels;
    calls.insert(
        call,
        LiveCall {
            ended,
            dtmf,
            invite,
            media: agreed,
            transfer: None,
            rtp_session: Arc::clone(&rtp_session),
            played,
            cdr,
            origination,
            _slots: slots,
            _live: tenant.call_started(),
            _instance: instance,
        },
    );
    let control = Arc::new(SipCall::new(
        call,
        info,
        commands.clone(),
        ended_rx,
        dtmf_rx,
        rtp_session,
        played_rx,
        Arc::clone(&tenant),
        Arc::clone(routing),
        refer,
    ));
    let (engine, commands) = (Arc::clone(engine), commands.clone());
    let kv: Arc<dyn patchbay_host::KvStore> = Arc::clone(&tenant.kv) as Arc<dyn patchbay_host::KvStore>;
    let limits = tenant.limits;
    tokio::spawn(async move {
        let flow_call = FlowCall { control, kv, vars, limits: Some(limits) };
        // Run in its own task: should the host panic inside it, the call still gets its
        // FlowDone (and so its hang-up and its record).
        let exit = match tokio::spawn(async move { engine.run(&flow, flow_call).await }).await {
            Ok(exit) => exit,
            Err(e) => {
                tracing::error!(?call, "the flow's task failed: {e}");
                let detail = Some(e.to_string());
                let end = FlowEnd { outcome: "host-error", detail, vars: Default::default() };
                let _ = commands.send(Command::FlowDone { call, end });
                return;
            }
        };
        let detail = match &exit.outcome {
            FlowOutcome::Completed => None,
            FlowOutcome::Failed(FlowError::Failed(message)) => Some(message.clone()),
            other => Some(format!("{other:?}")),
        };
        match &detail {
            None => tracing::info!(?call, cause = exit.outcome.cause(), "flow ended"),
            Some(detail) => tracing::info!(?call, cause = exit.outcome.cause(), "flow ended: {detail}"),
        }
        let end = FlowEnd { outcome: exit.outcome.cause(), detail, vars: exit.vars };
        let _ = commands.send(Command::FlowDone { call, end });
    });
}

/// A call placed through the API was answered: start its media on the channels its flow will
/// use, make it a live call and run its flow (direction `outbound`).
#[allow(clippy::too_many_arguments)]
fn origination_answered(
    ua: &mut UserAgent,
    calls: &mut HashMap<CallRef, LiveCall>,
    routing: &Arc<Routing>,
    engine: &Arc<FlowEngine>,
    registry: &Arc<FlowRegistry>,
    commands: &mpsc::UnboundedSender<Command>,
    now: std::time::Instant,
    call: CallRef,
    mut leg: Leg,
    sdp: &[u8],
) {
    let Some((origination, channels)) = leg.origination.take() else { return };
    let crate::originate::Origination { id, trunk, flow: flow_name, vars, slots, .. } = *origination;
    let flow = registry.get(&trunk.tenant, &flow_name);
    let tenant = routing.tenants.get(&trunk.tenant).cloned();
    let media = start_leg_media(&mut leg, call, sdp, routing, commands, false, Some(&channels));
    let instance = tenant.as_ref().and_then(|t| t.instance_slot()).filter(|_| engine.free_slots() > 0);
    let runnable = flow.is_ok() && tenant.is_some() && media.is_some() && leg.agreed.is_some();
    let (Ok(flow), Some(tenant), Some(media), Some(agreed), Some(instance)) =
        (flow, tenant, media, leg.agreed.take(), instance)
    else {
        // The callee answered, but the call cannot go on: hang up with the reason.
        let (cause, reason) = if runnable {
            ("pool-full", "no flow instance free for the tenant")
        } else {
            ("media-refused", "the answer's SDP is not usable (or the flow is gone)")
        };
        tracing::warn!(%id, ?call, cause, "{reason}: hanging up");
        leg.cdr.ending(cause, "patchbay");
        let _ = ua.hangup(now, call);
        let code = if cause == "pool-full" { 503 } else { 488 };
        routing.originations.update(&id, crate::originate::CallStatus::Failed, Some(code), Some(reason.to_owned()));
        let flow = FlowEnd { outcome: "not-run", detail: None, vars: Default::default() };
        let sip = SipEnd { cause: cause.into(), by: "patchbay", sip_code: 200 };
        if let Some(record) = leg.cdr.close(sip, flow) {
            routing.cdr.write(record);
        }
        return;
    };
    leg.cdr.answered();
    routing.originations.update(&id, crate::originate::CallStatus::Answered, Some(200), None);
    let info = CallInfo {
        call_id: ua.call_id(call).unwrap_or_default().to_owned(),
        tenant: trunk.tenant.clone(),
        flow: flow_name,
        from: String::new(),
        to: String::new(),
        direction: Direction::Outbound,
        headers: Vec::new(),
    };
    // The flow sees the call as the record has it: from our caller ID to the number called.
    let (from, to) = leg.cdr.parties();
    let info = CallInfo { from: from.to_owned(), to: to.to_owned(), ..info };
    let mut invite = rsip::Request {
        method: rsip::Method::Invite,
        uri: rsip::Uri::try_from(info.to.as_str()).unwrap_or_default(),
        version: rsip::Version::V2,
        headers: Default::default(),
        body: Vec::new(),
    };
    invite.headers.push(rsip::Header::From(format!("<{}>", info.from).into()));
    tracing::info!(%id, ?call, tenant = %info.tenant, flow = %info.flow, "originated call answered: flow started");
    let start = FlowStart {
        call,
        info,
        flow,
        tenant,
        vars,
        refer: true,
        invite,
        media: Some((media, channels, agreed)),
        cdr: leg.cdr,
        origination: Some(id),
        slots,
        instance,
    };
    start_flow(calls, routing, engine, commands, start);
}
