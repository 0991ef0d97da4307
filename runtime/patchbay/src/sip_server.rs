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
    Header, MemoryKv,
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
use crate::prompts::PromptStore;
use crate::transport::{Inbound, Outbound};

/// Where calls are routed: tenant by request-URI host, flow by request-URI user.
pub struct Routing {
    /// (tenant id, domains, limits).
    pub tenants: Vec<(String, Vec<String>, patchbay_host::FlowLimits)>,
    /// Each tenant's key-value space, shared by all its calls (the WIT `kv` interface).
    pub kv: HashMap<String, Arc<MemoryKv>>,
    /// Tenants that challenge inbound calls.
    pub auth: HashMap<String, TenantAuth>,
    /// Address put in SDP and Contact instead of the bound one (NAT).
    pub external_ip: Option<std::net::IpAddr>,
    /// The media engine (clock thread and frame pool).
    pub media: MediaEngine,
    /// Each tenant's prompts.
    pub prompts: HashMap<String, Arc<PromptStore>>,
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
    /// Call variables each (tenant, flow) starts with.
    pub flow_vars: HashMap<(String, String), std::collections::BTreeMap<String, String>>,
    /// Tenants' recordings: `storage/<tenant>/recordings/`.
    pub storage: std::path::PathBuf,
}

/// Key presses (SIP INFO) queued for a flow that has not read them yet; more are dropped.
const DTMF_QUEUE: usize = 64;

/// Bytes of keys and values a tenant's kv space may hold.
pub const TENANT_KV_QUOTA: usize = 1 << 20;

/// A tenant's inbound-call credentials.
pub struct TenantAuth {
    /// Realm in challenges.
    pub realm: String,
    /// User name → password.
    pub users: std::collections::BTreeMap<String, String>,
    /// Sources not challenged.
    pub trusted: Vec<std::net::IpAddr>,
    /// Algorithms offered, in order (empty: the digest server's default).
    pub algorithms: Vec<patchbay_sip::auth::Algorithm>,
}

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
    auth: &TenantAuth,
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
        target: crate::dial::Target,
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
    contact: SocketAddr,
    mut inbound: mpsc::Receiver<Inbound>,
    outbound: Outbound,
    engine: Arc<FlowEngine>,
    registry: Arc<FlowRegistry>,
    routing: Arc<Routing>,
    mut shutdown: oneshot::Receiver<oneshot::Sender<()>>,
) {
    let contact_host = match routing.external_ip {
        Some(ip) => SocketAddr::new(ip, contact.port()).to_string(),
        None => contact.to_string(),
    };
    let seed = std::collections::hash_map::RandomState::new().hash_one(contact);
    let ua = UserAgent::new(UaConfig {
        contact_host,
        user_agent: format!("Patchbay/{}", env!("CARGO_PKG_VERSION")),
        timers: TimerConfig::default(),
        seed,
    });
    let (commands, mut command_rx) = mpsc::unbounded_channel::<Command>();
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
    };
    loop {
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
        while let Some(output) = endpoint.ua.poll_output() {
            match output {
                UaOutput::Transmit { peer, message } => outbound.send(peer, message.to_string().into_bytes()).await,
                UaOutput::Event(event) => endpoint.on_event(event),
            }
        }
        endpoint.check_shutdown_done();
    }
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
    /// Outbound legs placed by flows' `dial`.
    legs: HashMap<CallRef, Leg>,
    digest: HashMap<String, DigestServer>,
    engine: Arc<FlowEngine>,
    registry: Arc<FlowRegistry>,
    routing: Arc<Routing>,
    commands: mpsc::UnboundedSender<Command>,
    /// Set by `Command::Shutdown`: whom to tell, and when to stop waiting.
    shutdown: Option<(oneshot::Sender<()>, std::time::Instant)>,
}

impl Endpoint {
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
                let result = self.dial(now, call, target, caller_id, headers, events);
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
            Command::Shutdown { done } => {
                tracing::info!(calls = self.calls.len(), "shutting down: hanging up every call");
                let live: Vec<CallRef> = self.calls.keys().copied().collect();
                for call in live {
                    if let Some(live) = self.calls.get_mut(&call) {
                        live.cdr.ending("shutdown", "patchbay");
                    }
                    self.bye(now, call);
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
        target: crate::dial::Target,
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
        if live.media.as_ref().is_some_and(|(_, n)| n.codec.codec == patchbay_sip::sdp::AudioCodec::Pcma) {
            local.codecs.reverse();
        }
        let offer =
            patchbay_sip::sdp::offer(&local).map_err(|e| CallError::Unavailable(format!("building the offer: {e}")))?;
        let from_uri = match caller_id {
            Some(id) if id.starts_with("sip:") || id.starts_with("sips:") => id,
            Some(id) => format!("sip:{id}@{}", self.ua.contact_host()),
            None => live
                .invite
                .from_header()
                .ok()
                .and_then(|f| f.uri().ok())
                .map_or_else(|| format!("sip:patchbay@{}", self.ua.contact_host()), |u| u.to_string()),
        };
        // The leg's record, billed to the flow that places it (its Call-ID is set below).
        let mut cdr = live.cdr.leg("", &from_uri, &target.uri.to_string());
        let from = format!("<{from_uri}>");
        let headers = headers.into_iter().map(|h| rsip::Header::Other(h.name, h.value)).collect();
        let peer =
            patchbay_sip::transaction::Peer { transport: patchbay_sip::transaction::Transport::Udp, addr: target.peer };
        let leg = self.ua.dial(
            now,
            patchbay_sip::ua::Dial {
                peer,
                target: target.uri,
                from,
                to: None,
                sdp: offer.clone().into_bytes(),
                credentials: None,
                headers,
            },
        );
        tracing::info!(call = ?owner, ?leg, to = %target.peer, "dialling");
        cdr.set_call_id(self.ua.call_id(leg).unwrap_or_default());
        self.legs.insert(
            leg,
            Leg {
                owner,
                events,
                offer,
                local: Some(local),
                agreed: None,
                sockets: Some((rtp, rtcp)),
                media: None,
                dtmf: None,
                dtmf_sink: None,
                cdr,
            },
        );
        Ok(leg)
    }

    /// Ends a call from our side: BYE once answered (the session is over for us at once, RFC
    /// 3261 §15), 480 before.
    fn bye(&mut self, now: std::time::Instant, call: CallRef) {
        let answered = self.calls.get(&call).is_some_and(|live| live.media.is_some());
        match self.ua.hangup(now, call) {
            Ok(()) if answered => {
                call_ended(&mut self.calls, &mut self.ending, &self.routing.cdr, call, EndCause::LocalBye);
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
        let mut key = [0u8; 30];
        for (chunk, i) in key.chunks_mut(8).zip(0u64..) {
            let random = random_u64(i);
            chunk.copy_from_slice(&random.to_le_bytes()[..chunk.len()]);
        }
        local.srtp = patchbay_sip::sdp::SrtpPolicy::Offer(patchbay_sip::sdp::SdesKey(key));
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

/// The media session for what was negotiated.
fn media_session(negotiated: &patchbay_sip::sdp::Negotiated, ptime_ms: u16, routing: &Routing) -> MediaSession {
    crate::media::session_for(negotiated, ptime_ms, routing.media.pool(), routing.rtp_timeout, random_u64(0x5eed))
}

impl Endpoint {
    fn on_event(&mut self, event: UaEvent) {
        let Self { ua, calls, ending, legs, digest, engine, registry, routing, commands, .. } = self;
        let now = std::time::Instant::now();
        match event {
            UaEvent::IncomingCall { call, peer, request } => {
                let host = request.uri.host_with_port.host.to_string();
                let user = request.uri.auth.as_ref().map(|a| a.user.clone()).unwrap_or_default();
                let tenant = routing
                    .tenants
                    .iter()
                    .find(|(_, domains, _)| domains.iter().any(|d| d.eq_ignore_ascii_case(&host)));
                let Some((tenant, _, limits)) = tenant else {
                    tracing::info!(?call, %host, "no tenant serves this domain");
                    let _ = ua.reject(now, call, 404);
                    return;
                };
                // Built only for a call that gets this far: not for a digest challenge (407).
                let call_info = || CallInfo {
                    call_id: request.call_id_header().map(|h| h.value().to_owned()).unwrap_or_default(),
                    tenant: tenant.clone(),
                    flow: user.clone(),
                    from: request
                        .from_header()
                        .ok()
                        .and_then(|f| f.uri().ok())
                        .map(|u| u.to_string())
                        .unwrap_or_default(),
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
                if let Some(auth) = routing.auth.get(tenant)
                    && let Err((status, headers)) = authenticate(digest, auth, tenant, peer.addr, &request)
                {
                    let _ = ua.reject_with(now, call, status, &headers);
                    if status == 403 {
                        refused("auth-failed", status);
                    }
                    return;
                }
                let flow = match registry.get(tenant, &user) {
                    Ok(flow) => flow,
                    Err(e) => {
                        tracing::info!(?call, "{e}");
                        let _ = ua.reject(now, call, 404);
                        refused("no-route", 404);
                        return;
                    }
                };
                let _ = ua.ring(now, call);
                let (ended, ended_rx) = watch::channel(false);
                // Bounded: a flow that never reads key presses must not let a peer grow this queue.
                let (dtmf, dtmf_rx) = mpsc::channel(DTMF_QUEUE);
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
                let rtp_session: MediaSlot = Arc::default();
                let (played, played_rx) = watch::channel(0);
                calls.insert(
                    call,
                    LiveCall {
                        ended,
                        dtmf,
                        invite: *request,
                        media: None,
                        transfer: None,
                        rtp_session: Arc::clone(&rtp_session),
                        played,
                        cdr: CdrDraft::new(&info, flow.version()),
                    },
                );
                let prompts = routing.prompts.get(tenant).cloned().unwrap_or_else(|| Arc::new(PromptStore::new(None)));
                let control = Arc::new(SipCall::new(
                    call,
                    info,
                    commands.clone(),
                    ended_rx,
                    dtmf_rx,
                    rtp_session,
                    played_rx,
                    prompts,
                    Arc::clone(routing),
                    refer,
                ));
                let (engine, commands, limits) = (Arc::clone(engine), commands.clone(), *limits);
                let vars = routing.flow_vars.get(&(tenant.clone(), user.clone())).cloned().unwrap_or_default();
                let kv: Arc<dyn patchbay_host::KvStore> = match routing.kv.get(tenant) {
                    Some(kv) => Arc::clone(kv) as Arc<dyn patchbay_host::KvStore>,
                    None => Arc::new(MemoryKv::new(TENANT_KV_QUOTA)),
                };
                tokio::spawn(async move {
                    let flow_call = FlowCall { control, kv, vars, limits: Some(limits) };
                    // Run in its own task: should the host panic inside it, the call still gets
                    // its FlowDone (and so its hang-up and its record).
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
            UaEvent::Confirmed { call } => tracing::debug!(?call, "call confirmed (ACK)"),
            // Outbound legs' progress and answer (flows' `dial`); our own re-INVITEs are not
            // sent by the server yet.
            UaEvent::Progress { call, status, sdp } => {
                let Some(leg) = legs.get_mut(&call) else { return };
                tracing::debug!(?call, status, early_media = sdp.is_some(), "outbound leg progress");
                let early = match sdp {
                    Some(sdp) if leg.media.is_none() => start_leg_media(leg, call, &sdp, routing, commands, true),
                    _ => None,
                };
                let _ = leg.events.send(LegEvent::Progress { status, early });
            }
            UaEvent::Answered { call, sdp } => {
                let Some(leg) = legs.get_mut(&call) else { return };
                tracing::info!(?call, owner = ?leg.owner, "outbound leg answered");
                leg.cdr.answered();
                if leg.media.is_none() {
                    start_leg_media(leg, call, &sdp, routing, commands, false);
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
                            call_ended(calls, ending, &routing.cdr, call, EndCause::LocalBye);
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
                if let Some(mut leg) = legs.remove(&call) {
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
                call_ended(calls, ending, &routing.cdr, call, cause);
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
    cdr: &CdrSink,
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
            Some(record) => cdr.write(record),
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
    let (dtmf, dtmf_rx) = mpsc::channel(DTMF_QUEUE);
    leg.dtmf_sink = Some(dtmf.clone());
    let (inactive, mut inactive_rx) = mpsc::unbounded_channel();
    let sinks = CallSinks { dtmf, played: watch::channel(0).0, inactive };
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
    leg.dtmf = Some(dtmf_rx);
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
