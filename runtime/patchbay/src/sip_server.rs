//! The SIP endpoint: the user agent core driven on tokio time, and one task per call that runs
//! the call's flow.
//!
//! One endpoint task owns the sans-IO [`UserAgent`]; transports (see [`crate::transport`]),
//! timers and call tasks talk to it through channels, so the protocol state is never shared
//! or locked.
//!
//! Media: answering a call starts its RTP session on the shared media clock (see
//! [`crate::media`]); `play`, `collect-digits`, the audio stream, `send-dtmf` and key presses
//! (RFC 4733, in-band, SIP INFO) work on it.
//!
//! **Not implemented yet:** `record`, `dial` and `agent` return `unavailable` (they come with
//! the calls-end-to-end work), and late-offer INVITEs (no SDP) get 488.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use patchbay_host::{
    AgentEnd, CallControl, CallError, CallInfo, CollectEnd, CollectOptions, Collected, DialOptions, DialOutcome,
    Direction, Dtmf, FlowCall, FlowEngine, FlowOutcome, FlowRegistry, HangupCause, Header, MediaEvent, MemoryKv,
    PlayOptions, PlayOutcome, RecordOptions, Recording,
};
use patchbay_media::session::MediaSession;
use patchbay_media::{Frame, FramePool};
use patchbay_sip::auth::{AuthKind, DigestRequest, DigestServer, Outcome, ServerConfig, StoredSecret};
use patchbay_sip::transaction::TimerConfig;
use patchbay_sip::ua::{CallRef, EndCause, UaConfig, UaEvent, UaOutput, UserAgent};
use rsip::headers::UntypedHeader;
use rsip::prelude::HeadersExt;
use tokio::sync::{mpsc, oneshot, watch};

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

enum Command {
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
}

/// A call's media once answered, shared by the endpoint (which starts and stops it) and the
/// flow's call control.
type MediaSlot = Arc<std::sync::OnceLock<Arc<CallMedia>>>;

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
}

impl LiveCall {
    /// Answers a re-INVITE's offer with the same local media and a bumped `o=` version.
    fn reinvite(&mut self, call: CallRef, offer: &[u8], routing: &Routing) -> Result<Vec<u8>, u16> {
        let Some((local, current)) = self.media.as_mut() else { return Err(488) };
        if offer.iter().all(u8::is_ascii_whitespace) {
            // An offer-less re-INVITE asks us to offer (RFC 3261 §14.2): offer sendrecv, so
            // that it also takes a call off hold. Not done: the answer comes in the ACK, which
            // is not applied; the media keeps the session it has.
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
                if let Some(media) = self.rtp_session.get() {
                    let same_stream = negotiated.codec == current.codec
                        && negotiated.telephone_event == current.telephone_event
                        && negotiated.srtp == current.srtp;
                    if same_stream {
                        let remote = (!negotiated.remote_rtp.ip().is_unspecified()).then_some(negotiated.remote_rtp);
                        let hold = !negotiated.direction.receives() || remote.is_none();
                        media.with(|session| {
                            session.set_remote(remote);
                            session.set_hold(hold);
                            session.set_sending(negotiated.direction.sends());
                        });
                    } else {
                        // New codec, payload types or SRTP keys: a new RTP stream (new SSRC, as
                        // RFC 3550 §8 allows), keyed and numbered for what was agreed now.
                        tracing::info!(?call, codec = negotiated.codec.name(), "media renegotiated: new RTP stream");
                        let session = media_session(&negotiated, routing);
                        media.with(|old| *old = session);
                    }
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
}

/// Runs the endpoint: the user agent core fed by every transport's [`Inbound`] messages,
/// sending through [`Outbound`]. `contact` is the `host:port` put in Contact and Via.
pub async fn run_endpoint(
    contact: SocketAddr,
    mut inbound: mpsc::Receiver<Inbound>,
    outbound: Outbound,
    engine: Arc<FlowEngine>,
    registry: Arc<FlowRegistry>,
    routing: Arc<Routing>,
) {
    let contact_host = match routing.external_ip {
        Some(ip) => SocketAddr::new(ip, contact.port()).to_string(),
        None => contact.to_string(),
    };
    let seed = std::collections::hash_map::RandomState::new().hash_one(contact);
    let mut ua = UserAgent::new(UaConfig {
        contact_host,
        user_agent: format!("Patchbay/{}", env!("CARGO_PKG_VERSION")),
        timers: TimerConfig::default(),
        seed,
    });
    let (commands, mut command_rx) = mpsc::unbounded_channel::<Command>();
    let mut calls: HashMap<CallRef, LiveCall> = HashMap::new();
    let mut digest: HashMap<String, DigestServer> = HashMap::new();
    loop {
        let deadline = ua.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            received = inbound.recv() => {
                let Some(Inbound { peer, message }) = received else { return };
                ua.handle_receive(std::time::Instant::now(), peer, message);
            }
            Some(command) = command_rx.recv() => {
                let now = std::time::Instant::now();
                match command {
                    Command::Answer { call, reply } => {
                        let result = answer(&mut ua, &mut calls, call, now, &routing, &commands);
                        let _ = reply.send(result);
                    }
                    Command::Hangup { call, cause } => {
                        let result = match cause {
                            HangupCause::SipCode(code) => ua.reject(now, call, code).or_else(|_| ua.hangup(now, call)),
                            HangupCause::Busy => ua.reject(now, call, 486).or_else(|_| ua.hangup(now, call)),
                            HangupCause::Rejected => ua.reject(now, call, 603).or_else(|_| ua.hangup(now, call)),
                            HangupCause::Normal => ua.hangup(now, call),
                        };
                        if let Err(e) = result {
                            tracing::debug!(?call, "hangup: {e}");
                        }
                    }
                    Command::Transfer { call, target, reply } => match ua.refer(now, call, &target) {
                        Ok(()) => {
                            if let Some(live) = calls.get_mut(&call) {
                                live.transfer = Some(reply);
                            }
                        }
                        Err(e) => {
                            let _ = reply.send(Err(CallError::NotAllowed(e.to_string())));
                        }
                    },
                    Command::MediaTimeout { call } => {
                        tracing::warn!(?call, "no RTP from the caller for the inactivity timeout: ending the call");
                        let _ = ua.hangup(now, call);
                    }
                    Command::FlowDone { call } => {
                        // The flow returned: hang up whatever is still up (§15).
                        let _ = ua.hangup(now, call);
                    }
                }
            }
            () = async { if let Some(d) = deadline { tokio::time::sleep_until(d).await } else { std::future::pending().await } } => {
                ua.handle_timeout(std::time::Instant::now());
            }
        }
        while let Some(output) = ua.poll_output() {
            match output {
                UaOutput::Transmit { peer, message } => outbound.send(peer, message.to_string().into_bytes()).await,
                UaOutput::Event(event) => {
                    on_event(&mut ua, &mut calls, &mut digest, event, &engine, &registry, &routing, &commands);
                }
            }
        }
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
        let _ = ua.reject(now, call, 488);
        return Err(CallError::Unavailable("INVITE without SDP offer is not supported yet".into()));
    }
    // The RTP port advertised in the answer, RTCP on the next one.
    let (rtp, rtcp) = crate::media::bind_rtp_pair(routing.rtp_bind)
        .map_err(|e| CallError::Unavailable(format!("no RTP port: {e}")))?;
    let bind = rtp.local_addr().map_err(|e| CallError::Unavailable(format!("no RTP port: {e}")))?;
    let mut local = patchbay_sip::sdp::LocalMedia::new(bind, routing.external_ip, call.0, 1);
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
            let session = media_session(&negotiated, routing);
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
            ua.answer(now, call, sdp).map_err(|_| CallError::Hangup)
        }
        Err(e) => {
            tracing::info!(?call, "offer not acceptable: {e}");
            let _ = ua.reject(now, call, e.sip_status());
            Err(CallError::NotAllowed(format!("offer not acceptable: {e}")))
        }
    }
}

/// A random number from the OS's randomness (through `RandomState`'s per-process keys, mixed
/// with a counter): SSRCs, initial sequence numbers and timestamps, SDES keys.
fn random_u64(salt: u64) -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::collections::hash_map::RandomState::new().hash_one((salt, n))
}

/// The media session for what was negotiated.
fn media_session(negotiated: &patchbay_sip::sdp::Negotiated, routing: &Routing) -> MediaSession {
    crate::media::session_for(negotiated, routing.media.pool(), routing.rtp_timeout, random_u64(0x5eed))
}

#[allow(clippy::too_many_arguments)] // the endpoint's state, passed apart to keep borrows simple
fn on_event(
    ua: &mut UserAgent,
    calls: &mut HashMap<CallRef, LiveCall>,
    digest: &mut HashMap<String, DigestServer>,
    event: UaEvent,
    engine: &Arc<FlowEngine>,
    registry: &Arc<FlowRegistry>,
    routing: &Arc<Routing>,
    commands: &mpsc::UnboundedSender<Command>,
) {
    let now = std::time::Instant::now();
    match event {
        UaEvent::IncomingCall { call, peer, request } => {
            let host = request.uri.host_with_port.host.to_string();
            let user = request.uri.auth.as_ref().map(|a| a.user.clone()).unwrap_or_default();
            let tenant =
                routing.tenants.iter().find(|(_, domains, _)| domains.iter().any(|d| d.eq_ignore_ascii_case(&host)));
            let Some((tenant, _, limits)) = tenant else {
                tracing::info!(?call, %host, "no tenant serves this domain");
                let _ = ua.reject(now, call, 404);
                return;
            };
            if let Some(auth) = routing.auth.get(tenant)
                && let Err((status, headers)) = authenticate(digest, auth, tenant, peer.addr, &request)
            {
                let _ = ua.reject_with(now, call, status, &headers);
                return;
            }
            let flow = match registry.get(tenant, &user) {
                Ok(flow) => flow,
                Err(e) => {
                    tracing::info!(?call, "{e}");
                    let _ = ua.reject(now, call, 404);
                    return;
                }
            };
            let _ = ua.ring(now, call);
            let (ended, ended_rx) = watch::channel(false);
            // Bounded: a flow that never reads key presses must not let a peer grow this queue.
            let (dtmf, dtmf_rx) = mpsc::channel(DTMF_QUEUE);
            let info = CallInfo {
                call_id: request.call_id_header().map(|h| h.value().to_owned()).unwrap_or_default(),
                tenant: tenant.clone(),
                flow: user.clone(),
                from: request.from_header().ok().and_then(|f| f.uri().ok()).map(|u| u.to_string()).unwrap_or_default(),
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
            tracing::info!(?call, from = %peer.addr, tenant = %info.tenant, flow = %info.flow, version = &flow.version()[..12], "call started");
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
                },
            );
            let prompts = routing.prompts.get(tenant).cloned().unwrap_or_else(|| Arc::new(PromptStore::new(None)));
            let control = Arc::new(SipCall {
                call,
                info,
                commands: commands.clone(),
                ended: ended_rx,
                dtmf: tokio::sync::Mutex::new(dtmf_rx),
                media: rtp_session,
                played: played_rx,
                marks: std::sync::atomic::AtomicU64::new(0),
                prompts,
                pool: routing.media.pool().clone(),
                stream: tokio::sync::Mutex::new(None),
            });
            let (engine, commands, limits) = (Arc::clone(engine), commands.clone(), *limits);
            let kv: Arc<dyn patchbay_host::KvStore> = match routing.kv.get(tenant) {
                Some(kv) => Arc::clone(kv) as Arc<dyn patchbay_host::KvStore>,
                None => Arc::new(MemoryKv::new(TENANT_KV_QUOTA)),
            };
            tokio::spawn(async move {
                let flow_call = FlowCall { control, kv, vars: Default::default(), limits: Some(limits) };
                let exit = engine.run(&flow, flow_call).await;
                match &exit.outcome {
                    FlowOutcome::Completed => tracing::info!(?call, cause = exit.outcome.cause(), "flow ended"),
                    other => tracing::info!(?call, cause = other.cause(), "flow ended: {other:?}"),
                }
                let _ = commands.send(Command::FlowDone { call });
            });
        }
        UaEvent::Confirmed { call } => tracing::debug!(?call, "call confirmed (ACK)"),
        // Outbound legs and our own re-INVITEs are not started by the server yet (flows'
        // `dial` arrives with the media engine); log anything that shows up regardless.
        UaEvent::Progress { call, status, .. } => tracing::debug!(?call, status, "outbound call progress"),
        UaEvent::Answered { call, .. } => tracing::debug!(?call, "outbound call answered"),
        UaEvent::ReInviteAnswered { call, result } => {
            tracing::debug!(?call, ok = result.is_ok(), "our re-INVITE answered")
        }
        UaEvent::Transfer { call, status, final_ } => {
            tracing::info!(?call, status, final_, "transfer progress");
            if final_ && let Some(reply) = calls.get_mut(&call).and_then(|live| live.transfer.take()) {
                if (200..300).contains(&status) {
                    let _ = reply.send(Ok(()));
                    // RFC 5589 §6.1: the transferor ends its call once the transfer succeeded.
                    let _ = ua.hangup(now, call);
                } else {
                    let _ = reply.send(Err(CallError::Unavailable(format!("transfer failed with SIP {status}"))));
                }
            }
        }
        UaEvent::ReInvite { call, offer } => {
            let answer = calls.get_mut(&call).map_or(Err(481), |live| live.reinvite(call, &offer, routing));
            if let Err(e) = ua.answer_reinvite(now, call, answer) {
                tracing::debug!(?call, "re-INVITE: {e}");
            }
        }
        UaEvent::InfoDtmf { call, digit, duration_ms } => {
            if let Some(live) = calls.get(&call) {
                let _ = live.dtmf.try_send(Dtmf { digit, duration_ms });
            }
        }
        UaEvent::Ended { call, cause } => {
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
            }
            let who = match cause {
                EndCause::RemoteBye | EndCause::Cancelled => "caller",
                EndCause::LocalBye | EndCause::Rejected(_) => "patchbay",
                EndCause::Failed(_) => "callee",
                EndCause::AckTimeout | EndCause::SessionExpired => "network",
            };
            if cause == EndCause::AckTimeout {
                tracing::warn!(?call, "our 200 OK was never ACKed (wrong Contact/Record-Route or NAT?); sent BYE");
            }
            tracing::info!(?call, ?cause, hung_up_by = who, "call ended");
        }
    }
}

/// A call as its flow sees it. Waiting operations end with `hangup` as soon as the call ends.
struct SipCall {
    call: CallRef,
    info: CallInfo,
    commands: mpsc::UnboundedSender<Command>,
    ended: watch::Receiver<bool>,
    dtmf: tokio::sync::Mutex<mpsc::Receiver<Dtmf>>,
    /// The RTP session, set when the call is answered.
    media: MediaSlot,
    /// The last mark played out (see `MediaSession::mark`).
    played: watch::Receiver<u64>,
    marks: std::sync::atomic::AtomicU64,
    prompts: Arc<PromptStore>,
    pool: FramePool,
    /// The caller's audio while the flow has its audio stream open.
    stream: tokio::sync::Mutex<Option<mpsc::Receiver<Frame>>>,
}

/// Queues the next frames of `prompt` (from frame `next` on) until about a second is queued;
/// once all of it is queued, queues the mark `id` and returns true. Shared by flows' `play` and
/// `patchbay call --play`.
pub(crate) fn feed_prompt(
    session: &mut MediaSession,
    pool: &FramePool,
    prompt: &patchbay_media::prompt::Prompt,
    codec: patchbay_media::prompt::PromptCodec,
    next: &mut usize,
    id: u64,
) -> bool {
    let mut octets = [0u8; 320];
    let octets = &mut octets[..session.samples_per_frame() as usize];
    while session.queued() < PROMPT_AHEAD_FRAMES {
        if !prompt.frame_into(codec, *next, octets) {
            session.mark(id);
            return true;
        }
        let Ok(frame) = pool.g711(codec.encoding(), octets, 0) else { return false };
        if session.play(frame).is_err() {
            return false;
        }
        *next += 1;
    }
    false
}

const NO_MEDIA: &str = "not implemented yet (comes with the calls-end-to-end work)";

/// Audio queued ahead of the wire while a prompt plays (the rest is fed as it goes out).
const PROMPT_AHEAD_FRAMES: usize = 50;

/// How long each DTMF digit we send lasts, and the pause after it.
const DTMF_DIGIT_MS: u32 = 100;

impl SipCall {
    async fn until_hangup(&self) {
        let mut ended = self.ended.clone();
        let _ = ended.wait_for(|e| *e).await;
    }

    fn is_over(&self) -> bool {
        *self.ended.borrow()
    }

    fn live(&self) -> Result<(), CallError> {
        if self.is_over() { Err(CallError::Hangup) } else { Ok(()) }
    }

    /// The call's media; audio operations need an answered call.
    fn rtp(&self) -> Result<&Arc<CallMedia>, CallError> {
        self.live()?;
        self.media.get().ok_or_else(|| CallError::NotAllowed("answer the call before using its audio".into()))
    }

    /// Plays a prompt once. `Some(digit)` when a key press stopped it (with barge-in).
    async fn play_once(
        &self,
        media: &CallMedia,
        prompt: &patchbay_media::prompt::Prompt,
        barge_in: bool,
    ) -> Result<Option<char>, CallError> {
        let codec = patchbay_media::prompt::PromptCodec::from(media.with(|s| s.codec()));
        let mut next = 0;
        let id = self.marks.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let mut marked = false;
        let mut played = self.played.clone();
        let mut dtmf = if barge_in { Some(self.dtmf.lock().await) } else { None };
        loop {
            // Keep about a second queued ahead of the wire; the rest is fed as it plays.
            if !marked {
                marked = media.with(|session| feed_prompt(session, &self.pool, prompt, codec, &mut next, id));
            }
            let digit = async {
                match dtmf.as_mut() {
                    Some(dtmf) => dtmf.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                result = played.wait_for(|p| *p >= id), if marked => {
                    return result.map(|_| None).map_err(|_| CallError::Hangup);
                }
                () = tokio::time::sleep(Duration::from_millis(400)), if !marked => {}
                digit = digit => {
                    let Some(digit) = digit else { return Err(CallError::Hangup) };
                    media.with(|session| session.clear());
                    return Ok(Some(digit.digit));
                }
                () = self.until_hangup() => return Err(CallError::Hangup),
            }
        }
    }
}

#[async_trait]
impl CallControl for SipCall {
    fn info(&self) -> CallInfo {
        self.info.clone()
    }

    async fn answer(&self) -> Result<(), CallError> {
        self.live()?;
        let (reply, result) = oneshot::channel();
        self.commands.send(Command::Answer { call: self.call, reply }).map_err(|_| CallError::Hangup)?;
        result.await.unwrap_or(Err(CallError::Hangup))
    }

    async fn hangup(&self, cause: HangupCause) -> Result<(), CallError> {
        self.live()?;
        self.commands.send(Command::Hangup { call: self.call, cause }).map_err(|_| CallError::Hangup)?;
        self.until_hangup().await;
        Ok(())
    }

    async fn play(&self, prompt: &str, options: PlayOptions) -> Result<PlayOutcome, CallError> {
        let media = Arc::clone(self.rtp()?);
        let prompt = self.prompts.get(prompt)?;
        for _ in 0..options.repeat.max(1) {
            if let Some(digit) = self.play_once(&media, &prompt, options.barge_in).await? {
                return Ok(PlayOutcome::Interrupted(digit));
            }
        }
        Ok(PlayOutcome::Completed)
    }

    async fn collect_digits(&self, options: CollectOptions) -> Result<Collected, CallError> {
        self.live()?;
        let max = options.max_digits.max(1) as usize;
        let mut digits = String::new();
        if let Some(prompt) = &options.prompt {
            let outcome = self.play(prompt, PlayOptions { barge_in: options.barge_in, repeat: 1 }).await?;
            if let PlayOutcome::Interrupted(digit) = outcome {
                if options.terminators.contains(digit) {
                    return Ok(Collected { digits, ended_by: CollectEnd::Terminator });
                }
                digits.push(digit);
            }
        }
        let mut timeout =
            if digits.is_empty() { options.first_digit_timeout_ms } else { options.inter_digit_timeout_ms };
        let mut dtmf = self.dtmf.lock().await;
        loop {
            if digits.chars().count() >= max {
                return Ok(Collected { digits, ended_by: CollectEnd::MaxDigits });
            }
            tokio::select! {
                digit = dtmf.recv() => {
                    let Some(digit) = digit else { return Err(CallError::Hangup) };
                    if options.terminators.contains(digit.digit) {
                        return Ok(Collected { digits, ended_by: CollectEnd::Terminator });
                    }
                    digits.push(digit.digit);
                    timeout = options.inter_digit_timeout_ms;
                }
                () = tokio::time::sleep(Duration::from_millis(u64::from(timeout))) => {
                    return Ok(Collected { digits, ended_by: CollectEnd::Timeout });
                }
                () = self.until_hangup() => return Err(CallError::Hangup),
            }
        }
    }

    async fn sleep(&self, ms: u32) -> Result<(), CallError> {
        self.live()?;
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(u64::from(ms))) => Ok(()),
            () = self.until_hangup() => Err(CallError::Hangup),
        }
    }

    async fn dial(&self, _target: &str, _options: DialOptions) -> Result<DialOutcome, CallError> {
        self.live()?;
        Err(CallError::Unavailable("outbound calls are not implemented yet".into()))
    }

    async fn transfer(&self, target: &str) -> Result<(), CallError> {
        self.live()?;
        let scheme_ok = target.starts_with("sip:") || target.starts_with("sips:") || target.starts_with("tel:");
        // The target goes into a Refer-To header: nothing that could end or break out of it.
        let clean = !target.chars().any(|c| c.is_control() || c.is_whitespace() || matches!(c, '<' | '>' | '"'));
        if !scheme_ok || !clean {
            return Err(CallError::InvalidArgument(format!(
                "transfer target {target:?} is not a plain sip:, sips: or tel: URI"
            )));
        }
        let (reply, outcome) = oneshot::channel();
        self.commands
            .send(Command::Transfer { call: self.call, target: target.to_owned(), reply })
            .map_err(|_| CallError::Hangup)?;
        tokio::select! {
            result = outcome => result.unwrap_or(Err(CallError::Hangup)),
            () = self.until_hangup() => Err(CallError::Hangup),
        }
    }

    async fn agent(&self, _endpoint: &str, _params: &[(String, String)]) -> Result<AgentEnd, CallError> {
        self.live()?;
        Err(CallError::Unavailable(format!("agent: {NO_MEDIA}")))
    }

    async fn record(&self, _options: RecordOptions) -> Result<Recording, CallError> {
        self.live()?;
        Err(CallError::Unavailable(format!("record: {NO_MEDIA}")))
    }

    async fn send_dtmf(&self, digits: &str) -> Result<(), CallError> {
        let media = Arc::clone(self.rtp()?);
        if let Some(bad) = digits.chars().find(|c| !matches!(c.to_ascii_uppercase(), '0'..='9' | '*' | '#' | 'A'..='D'))
        {
            return Err(CallError::InvalidArgument(format!("{bad:?} is not a DTMF key")));
        }
        let digits = digits.to_ascii_uppercase();
        if !media.with(|session| session.send_dtmf(&digits, DTMF_DIGIT_MS)) {
            return Err(CallError::Unavailable("the peer did not negotiate telephone-event (RFC 4733)".into()));
        }
        // Return once they have been sent: each digit, its end packets and the pause after it.
        let total = media.with(|session| session.dtmf_send_time(digits.chars().count(), DTMF_DIGIT_MS));
        tokio::select! {
            () = tokio::time::sleep(total) => Ok(()),
            () = self.until_hangup() => Err(CallError::Hangup),
        }
    }

    async fn next_dtmf(&self, timeout_ms: u32) -> Result<Dtmf, CallError> {
        self.live()?;
        let mut dtmf = self.dtmf.lock().await;
        tokio::select! {
            digit = dtmf.recv() => digit.ok_or(CallError::Hangup),
            () = tokio::time::sleep(Duration::from_millis(u64::from(timeout_ms))) => Err(CallError::Timeout),
            () = self.until_hangup() => Err(CallError::Hangup),
        }
    }

    fn open_audio_stream(&self) -> Result<(), CallError> {
        let media = self.rtp()?;
        let (frames, frames_rx) = mpsc::channel(crate::media::FLOW_AUDIO_QUEUE);
        // Not awaited: `open-audio-stream` is synchronous and the stream lock is only held
        // briefly by `read_media`.
        let Ok(mut stream) = self.stream.try_lock() else {
            return Err(CallError::NotAllowed("the audio stream is being read".into()));
        };
        *stream = Some(frames_rx);
        media.listen(Some(frames));
        Ok(())
    }

    fn close_audio_stream(&self) {
        if let Some(media) = self.media.get() {
            media.listen(None);
        }
        if let Ok(mut stream) = self.stream.try_lock() {
            *stream = None;
        }
    }

    async fn read_media(&self) -> Result<MediaEvent, CallError> {
        self.live()?;
        let mut stream = self.stream.lock().await;
        let mut dtmf = self.dtmf.lock().await;
        let frame = async {
            // A stream closed under us (the flow reopened it) is not a hang-up: wait for keys.
            match stream.as_mut() {
                Some(frames) => match frames.recv().await {
                    Some(frame) => Some(frame),
                    None => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            frame = frame => frame.map(MediaEvent::Frame).ok_or(CallError::Hangup),
            digit = dtmf.recv() => digit.map(MediaEvent::Dtmf).ok_or(CallError::Hangup),
            () = self.until_hangup() => Err(CallError::Hangup),
        }
    }

    fn write_frame(&self, frame: Frame) -> Result<(), CallError> {
        let media = self.rtp()?;
        media.with(|session| session.play(frame)).map_err(|refused| match refused {
            patchbay_media::session::PlayRefused::Full => {
                CallError::LimitExceeded("the call's playout queue is full (10 s of audio)".into())
            }
            wrong => CallError::InvalidArgument(wrong.to_string()),
        })
    }
}
