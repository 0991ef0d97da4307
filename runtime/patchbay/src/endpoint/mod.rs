//! The SIP endpoint: one task that owns the sans-IO [`UserAgent`] and drives it on tokio time;
//! transports (see [`crate::transport`]), timers, the API and call tasks talk to it through
//! channels, so the protocol state is never shared or locked.
//!
//! What happens to an INVITE, top-down:
//!
//! 1. [`run_endpoint`] feeds datagrams and stream messages to the user agent; its events come
//!    back to [`Endpoint::on_event`], the API's and trunks' commands to `on_command`, calls'
//!    requests to `on_request`.
//! 2. [`inbound`]: an INVITE that starts a call is routed to a tenant and a flow, checked
//!    (digest, trusted trunk addresses, caps, a flow instance) and rings.
//! 3. [`crate::call`]: the call becomes a [`Call`] — the one type that owns its SIP, media and
//!    flow state — and its flow runs in a task of its own with a [`crate::call::CallHandle`] as
//!    its view of the call; the flow's requests come back to [`Endpoint::on_request`]; when the
//!    call ends ([`Call::end`]) its record is written.
//! 4. [`answer`]: the flow answers; the SDP answer is chosen, SRTP keyed and the media session
//!    started on the shared clock ([`crate::media`]).
//! 5. [`outbound`]: legs a flow dials ([`crate::dial`]), calls placed through the API
//!    ([`crate::originate`]) and trunks' registrations and keep-alives.
//!
//! **Not implemented yet:** late-offer INVITEs (no SDP) get 488.

mod answer;
mod inbound;
mod outbound;
mod trace;

pub use trace::SipTrace;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use patchbay_host::{CallError, CallInfo, Direction, Dtmf, FlowEngine, FlowRegistry, HangupCause, Header};
use patchbay_media::session::MediaSession;
use patchbay_sip::auth::{
    AuthKind, DigestRequest, DigestServer, GuessThrottle, Outcome, ServerConfig, StoredSecret, ThrottleConfig, Verdict,
};
use patchbay_sip::transaction::TimerConfig;
use patchbay_sip::ua::{CallRef, EndCause, UaConfig, UaEvent, UaOutput, UserAgent};
use rsip::headers::UntypedHeader;
use rsip::prelude::HeadersExt;
use tokio::sync::{mpsc, oneshot, watch};

use crate::call::{Call, FlowStart, MAX_RING, Request};
use crate::cdr::{CdrDraft, CdrSink, FlowEnd, SipEnd};
use crate::dial::{Leg, LegEvent};
use crate::media::{CallChannels, CallMedia, CallSinks, DTMF_QUEUE, MediaEngine};
use crate::transport::{Inbound, Outbound};
use crate::trunk::TrunkRequest;

use answer::{answer, answer_reoffer, apply_negotiated};
use outbound::{hangup_legs, leg_end, origination_answered, start_leg_media};

/// What the endpoint shares with its calls: the tenants, and the process-wide media and
/// record settings.
pub struct Routing {
    /// Every tenant: domains, DIDs, credentials, limits, prompts, kv, trunks (replaced whole by
    /// a reload; a call keeps the `Tenant` it started with).
    pub tenants: Arc<crate::reload::Current<crate::tenant::Tenants>>,
    /// Address put in SDP and Contact instead of the bound one (NAT).
    pub external_ip: Option<std::net::IpAddr>,
    /// SIP server transactions held at once (`[sip] max_server_transactions`).
    pub max_server_transactions: usize,
    /// Unanswered inbound calls across tenants (`[sip] max_pending_calls`).
    pub pending: crate::call::PendingCalls,
    /// Set while draining (`/readyz` answers 503).
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// The media engine (clock thread and frame pool).
    pub media: MediaEngine,
    /// Address RTP sockets bind to.
    pub rtp_bind: std::net::IpAddr,
    /// End calls after this long without RTP (not on hold).
    pub rtp_timeout: Option<Duration>,
    /// Answer offers carrying `a=crypto` with SRTP.
    pub srtp: bool,
    /// ... also on calls not signalled over TLS (`[media] srtp_over_plain`).
    pub srtp_over_plain: bool,
    /// Our ptime in SDP (the peer's own `a=ptime` wins in an answer).
    pub ptime_ms: u16,
    /// Where finished calls' records go.
    pub cdr: CdrSink,
    /// Tenants' recordings: `storage/<tenant>/recordings/`.
    pub storage: std::path::PathBuf,
    /// `[log] sip_trace`: which peers' SIP messages are logged whole.
    pub sip_trace: SipTrace,
    /// Calls placed through the API, and their progress.
    pub originations: Arc<crate::originate::Originations>,
    /// Every call up now, for the API.
    pub live: Arc<crate::call::LiveCalls>,
    /// Each trunk's registration and keep-alive state, for the API.
    pub trunk_states: crate::trunk::TrunkStates,
}

/// What the rest of the process asks of the endpoint (calls' own requests come as
/// [`Request`]s on a channel of their own).
pub(crate) enum Command {
    /// Place a call through a trunk for the API; its flow runs on answer.
    Originate { origination: Box<crate::originate::Origination>, peer: patchbay_sip::transaction::Peer },
    /// An origination that could not be placed (its trunk's address did not resolve).
    OriginationFailed { origination: Box<crate::originate::Origination>, reason: String },
    /// The API hangs up a call that is up (`DELETE /v1/calls/{id}`).
    HangupCall { call: CallRef },
    HangupOrigination {
        id: String,
        /// `canceled` (the API) or `no-answer` (the ring timeout).
        reason: &'static str,
    },
    /// A trunk's registration or keep-alive.
    Trunk(crate::trunk::TrunkRequest),
    /// Take no new calls (503 to INVITE and OPTIONS, trunks unregistered) and report once the
    /// calls up now have ended and their records are written (`docs/operations.md`, drain).
    Drain { done: oneshot::Sender<()> },
    /// Hang up every call and report when their records are written (or the grace is over).
    Shutdown { done: oneshot::Sender<()> },
}

impl From<TrunkRequest> for Command {
    fn from(request: TrunkRequest) -> Self {
        Command::Trunk(request)
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
    let mut ua = UserAgent::new(UaConfig {
        contact_host: advertised(first),
        user_agent: format!("Patchbay/{}", env!("CARGO_PKG_VERSION")),
        timers: TimerConfig::default(),
        // Tags, branches, Call-IDs and cnonces: a CSPRNG keyed from the OS.
        rng_key: crate::random::rng_key(),
    });
    ua.set_max_server_transactions(routing.max_server_transactions);
    // Requests over TCP or TLS name a listener of that transport when there is one (the first
    // of each kind).
    for (transport, addr) in listeners.iter().rev() {
        ua.set_listener(*transport, advertised(*addr));
    }
    let (requests, mut request_rx) = mpsc::unbounded_channel();
    let services = crate::call::Services {
        tenants: Arc::clone(&routing.tenants),
        pool: routing.media.pool().clone(),
        storage: routing.storage.clone().into(),
        live: Arc::clone(&routing.live),
        requests,
    };
    let mut endpoint = Endpoint {
        ua,
        calls: HashMap::new(),
        ending: HashMap::new(),
        legs: HashMap::new(),
        digest: inbound::CallerAuth::new(),
        refusals: inbound::RefusalRecords::new(),
        engine,
        registry,
        routing,
        commands,
        services,
        shutdown: None,
        drain: None,
        draining: false,
        registrations: HashMap::new(),
        pings: HashMap::new(),
    };
    loop {
        // What the last input made the user agent send.
        while let Some(output) = endpoint.ua.poll_output() {
            match output {
                UaOutput::Transmit { peer, message } => {
                    crate::metrics::METRICS.sip_message("out", peer.transport, &message);
                    endpoint.routing.sip_trace.log("out", peer, &message);
                    outbound.send(peer, message.to_string().into_bytes()).await;
                }
                UaOutput::Event(event) => endpoint.on_event(event),
            }
        }
        crate::metrics::METRICS.sip_core(&endpoint.ua);
        endpoint.check_shutdown_done();
        endpoint.check_drain_done();
        let deadline = endpoint.ua.poll_timeout().map(tokio::time::Instant::from_std);
        let grace = endpoint.shutdown.as_ref().map(|(_, at)| tokio::time::Instant::from_std(*at));
        tokio::select! {
            received = inbound.recv() => {
                let Some(Inbound { peer, message }) = received else { return };
                crate::metrics::METRICS.sip_message("in", peer.transport, &message);
                endpoint.routing.sip_trace.log("in", peer, &message);
                endpoint.ua.handle_receive(std::time::Instant::now(), peer, message);
            }
            Some(command) = command_rx.recv() => endpoint.on_command(command),
            Some(request) = request_rx.recv() => endpoint.on_request(request),
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
    calls: HashMap<CallRef, Call>,
    /// Records of calls whose SIP side has ended while their flow is still unwinding.
    ending: HashMap<CallRef, CdrDraft>,
    /// Outbound legs placed by flows' `dial`, and calls placed through the API until answered.
    legs: HashMap<CallRef, Leg>,
    /// Callers' digest authentication and its guess throttle.
    digest: inbound::CallerAuth,
    /// Records of refused calls, rate-limited.
    refusals: inbound::RefusalRecords,
    engine: Arc<FlowEngine>,
    registry: Arc<FlowRegistry>,
    routing: Arc<Routing>,
    commands: mpsc::UnboundedSender<Command>,
    /// What calls reach, and where their requests go.
    services: crate::call::Services,
    /// Set by `Command::Shutdown`: whom to tell, and when to stop waiting.
    shutdown: Option<(oneshot::Sender<()>, std::time::Instant)>,
    /// Set by `Command::Drain`: whom to tell once the calls up have ended.
    drain: Option<oneshot::Sender<()>>,
    /// Draining: new calls are refused.
    draining: bool,
    /// Trunks' registrations: which (tenant, trunk) each is.
    registrations: HashMap<patchbay_sip::ua::RegRef, crate::trunk::TrunkKey>,
    /// Trunks' keep-alives waiting for an answer.
    pings: HashMap<patchbay_sip::ua::PingRef, crate::trunk::TrunkKey>,
}

impl Endpoint {
    pub(super) fn on_command(&mut self, command: Command) {
        let now = std::time::Instant::now();
        match command {
            Command::HangupCall { call } => {
                if let Some(live) = self.calls.get_mut(&call) {
                    live.cdr.ending("api-hangup", "api");
                }
                self.bye(now, call);
            }
            Command::Originate { origination, .. } if self.shutdown.is_some() || self.draining => {
                self.origination_failed(&origination.id, "Patchbay is draining or shutting down".into());
            }
            Command::Originate { origination, peer } => self.originate(now, origination, peer),
            Command::OriginationFailed { origination, reason } => self.origination_failed(&origination.id, reason),
            Command::HangupOrigination { id, reason } => self.hangup_origination(now, &id, reason),
            Command::Trunk(TrunkRequest::Register { trunk, peer }) if self.shutdown.is_none() && !self.draining => {
                self.register_trunk(now, &trunk, peer)
            }
            Command::Trunk(TrunkRequest::Register { .. }) => {}
            Command::Trunk(TrunkRequest::Ping { key, ping }) => {
                let ping = self.ua.ping(now, *ping);
                self.pings.insert(ping, key);
            }
            Command::Drain { done } => {
                tracing::info!(calls = self.calls.len(), "draining: no new calls; waiting for the calls up to end");
                self.draining = true;
                self.routing.draining.store(true, std::sync::atomic::Ordering::Relaxed);
                self.ua.set_draining(true);
                self.unregister_trunks(now);
                self.drain = Some(done);
            }
            Command::Shutdown { done } => {
                tracing::info!(calls = self.calls.len(), "shutting down: hanging up every call");
                self.unregister_trunks(now);
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
                    crate::originate::write_refused(&self.routing.cdr, &view, "shutdown");
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

    /// A call's request (its flow's, or its timers').
    pub(super) fn on_request(&mut self, request: Request) {
        let _in_call = self.call_span(request.call()).entered();
        let now = std::time::Instant::now();
        let ua = &mut self.ua;
        match request {
            Request::Answer { call, reply } => {
                let result = answer(ua, &mut self.calls, call, now, &self.routing, &self.services.requests);
                let _ = reply.send(result);
            }
            Request::RingTimeout { call } => {
                if let Some(live) = self.calls.get_mut(&call).filter(|live| !live.is_answered()) {
                    tracing::info!(?call, "the flow did not answer within {MAX_RING:?}: 480");
                    live.cdr.ending("ring-timeout", "patchbay");
                    if let Err(e) = ua.reject(now, call, 480) {
                        tracing::debug!(?call, "ring timeout: {e}");
                    }
                }
            }
            Request::Hangup { call, cause } => {
                if let Some(live) = self.calls.get_mut(&call) {
                    live.cdr.ending("flow-hangup", "flow");
                }
                let answered = self.calls.get(&call).is_some_and(|live| live.is_answered());
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
            Request::Transfer { call, target, reply } => match ua.refer(now, call, &target) {
                Ok(()) => {
                    if let Some(live) = self.calls.get_mut(&call) {
                        live.transfer = Some(reply);
                    }
                }
                Err(e) => {
                    let _ = reply.send(Err(CallError::NotAllowed(e.to_string())));
                }
            },
            Request::MediaTimeout { call } => {
                tracing::warn!(?call, "no RTP from the caller for the inactivity timeout: ending the call");
                if let Some(live) = self.calls.get_mut(&call) {
                    live.cdr.ending("rtp-timeout", "patchbay");
                }
                self.bye(now, call);
            }
            Request::FlowDone { call, end } => {
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
            Request::Dial { call, target, caller_id, headers, events, reply } => {
                let result = self.dial(now, call, *target, caller_id, headers, events);
                let _ = reply.send(result);
            }
            Request::HangupLeg { leg, reason, by } => {
                if let Some(l) = self.legs.get_mut(&leg) {
                    l.cdr.ending(reason, by);
                }
                if let Err(e) = self.ua.hangup(now, leg) {
                    tracing::debug!(?leg, "leg hangup: {e}");
                }
            }
        }
    }

    /// Ends a call from our side: BYE once answered (the session is over for us at once, RFC
    /// 3261 §15), 480 before.
    pub(super) fn bye(&mut self, now: std::time::Instant, call: CallRef) {
        let answered = self.calls.get(&call).is_some_and(|live| live.is_answered());
        match self.ua.hangup(now, call) {
            Ok(()) if answered => {
                call_ended(&mut self.calls, &mut self.ending, &self.routing, call, EndCause::LocalBye);
                hangup_legs(&mut self.ua, &mut self.legs, call, now);
            }
            Ok(()) => {}
            Err(e) => tracing::debug!(?call, "hangup: {e}"),
        }
    }

    /// Takes our bindings off the carriers' registrars (RFC 3261 §10.2.2), so they send us no
    /// new calls.
    fn unregister_trunks(&mut self, now: std::time::Instant) {
        let registrations: Vec<_> = self.registrations.keys().copied().collect();
        for reg in registrations {
            if let Err(e) = self.ua.unregister(now, reg) {
                tracing::debug!(?reg, "unregister: {e}");
            }
        }
    }

    /// A drain is over once every call up when it began has ended and its record is written.
    pub(super) fn check_drain_done(&mut self) {
        if self.drain.is_some()
            && self.calls.is_empty()
            && self.ending.is_empty()
            && self.legs.is_empty()
            && let Some(done) = self.drain.take()
        {
            tracing::info!("drained: no calls left");
            let _ = done.send(());
        }
    }

    /// Shutdown finishes once every call has ended and every record is written.
    pub(super) fn check_shutdown_done(&mut self) {
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
    pub(super) fn shutdown_grace_over(&mut self) {
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

impl Endpoint {
    /// The span of `call`, or of the call whose flow placed leg `call` (none for others).
    fn call_span(&self, call: CallRef) -> tracing::Span {
        let owner = self.legs.get(&call).map_or(call, |leg| leg.owner);
        self.calls.get(&owner).map_or_else(tracing::Span::none, |c| c.span.clone())
    }

    fn on_event(&mut self, event: UaEvent) {
        let about = match &event {
            UaEvent::Progress { call, .. }
            | UaEvent::Answered { call, .. }
            | UaEvent::ReInviteAnswered { call, .. }
            | UaEvent::Confirmed { call }
            | UaEvent::ReInvite { call, .. }
            | UaEvent::Transfer { call, .. }
            | UaEvent::InfoDtmf { call, .. }
            | UaEvent::Ended { call, .. } => Some(*call),
            _ => None,
        };
        let _in_call = about.map(|call| self.call_span(call).entered());
        let Self {
            ua, calls, ending, legs, engine, registry, routing, commands, services, registrations, pings, ..
        } = self;
        let now = std::time::Instant::now();
        match event {
            UaEvent::IncomingCall { call, peer, request } => self.incoming_call(now, call, peer, request),
            UaEvent::Confirmed { call } => {
                tracing::debug!(?call, "call confirmed (ACK)");
                // The caller receives where it claims: its media may flow now.
                if let Some(media) = calls.get(&call).and_then(|c| c.media.get()) {
                    media.with(|session| session.set_confirmed(true));
                }
            }
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
                let registered = matches!(state, patchbay_sip::ua::RegistrationState::Registered { .. });
                crate::trunk::set_state(&routing.trunk_states, key, |t| {
                    t.registration = Some(shown);
                    t.registered = registered;
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
                    Some(sdp) if leg.media.is_none() => {
                        start_leg_media(leg, call, &sdp, routing, &services.requests, true, None)
                    }
                    _ => None,
                };
                let _ = leg.events.send(LegEvent::Progress { status, early });
            }
            UaEvent::Answered { call, sdp } => {
                if legs.get(&call).is_some_and(|leg| leg.origination.is_some()) {
                    if let Some(leg) = legs.remove(&call) {
                        origination_answered(ua, calls, routing, engine, registry, services, now, call, leg, &sdp);
                    }
                    return;
                }
                let Some(leg) = legs.get_mut(&call) else { return };
                tracing::info!(?call, owner = ?leg.owner, "outbound leg answered");
                leg.cdr.answered();
                if leg.media.is_none() {
                    start_leg_media(leg, call, &sdp, routing, &services.requests, false, None);
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
                    (Some(live), _) => {
                        answer_reoffer(live.media.get().map(|m| &**m), &mut live.agreed, call, &offer, routing)
                    }
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

/// The call's session is over ([`Call::end`]): its record is written now if its flow has
/// already ended, else kept in `ending` until the flow's end is in.
fn call_ended(
    calls: &mut HashMap<CallRef, Call>,
    ending: &mut HashMap<CallRef, CdrDraft>,
    routing: &Routing,
    call: CallRef,
    cause: EndCause,
) {
    let Some(live) = calls.remove(&call) else { return };
    let mut draft = live.end(call, cause, &routing.originations);
    match draft.finish() {
        Some(record) => routing.cdr.write(record),
        None => {
            ending.insert(call, draft);
        }
    }
}
