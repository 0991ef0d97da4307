//! Outbound: legs a flow dials, calls placed through the API (answered, they run a flow as an
//! inbound call does), and trunks' registrations (RFC 3261 §10) and Service-Route (RFC 3608).

use super::*;

impl Endpoint {
    /// Starts a trunk's registration with its registrar at `peer` (RFC 3261 §10); the user
    /// agent keeps it fresh and reports each change as [`UaEvent::Registration`].
    pub(super) fn register_trunk(
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

    /// Places an outbound leg for `owner`'s flow: RTP ports, an SDP offer that puts the
    /// caller's codec first (so the bridge need not convert), the INVITE.
    pub(super) fn dial(
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
        let mut local = patchbay_sip::sdp::LocalMedia::new(bind, self.routing.external_ip, crate::random::u64(), 1);
        local.ptime = self.routing.ptime_ms;
        if let Some((trunk, _)) = &target.trunk {
            offer_as_trunk_says(&mut local, trunk);
        }
        if live.agreed.as_ref().is_some_and(|(_, n)| n.codec.codec == patchbay_sip::sdp::AudioCodec::Pcma) {
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
        if let Some((trunk, _)) = &target.trunk {
            // The carrier's other edge addresses may send in the leg's dialog.
            self.ua.trust_sources(leg, &trunk.source_ips);
        }
        tracing::info!(call = ?owner, ?leg, to = %target.peer, "dialling");
        cdr.set_call_id(self.ua.call_id(leg).unwrap_or_default());
        let slots = std::mem::take(&mut target.slots);
        let signalling = Some(target.peer.ip());
        self.legs.insert(leg, Leg { slots, signalling, ..Leg::new(owner, events, offer, local, (rtp, rtcp), cdr) });
        Ok(leg)
    }

    /// Places a call through a trunk for the API: RTP ports, an offer with the trunk's codecs
    /// and SRTP setting, the INVITE with its caller ID and credentials, and a ring timeout.
    pub(super) fn originate(
        &mut self,
        now: std::time::Instant,
        mut origination: Box<crate::originate::Origination>,
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
        let mut local = patchbay_sip::sdp::LocalMedia::new(bind, self.routing.external_ip, crate::random::u64(), 1);
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
        self.ua.trust_sources(leg, &trunk.source_ips);
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
        // At the trunk's next target it is the same call: counted as started once.
        let mut cdr = CdrDraft::attempt(&info, flow.version(), !origination.attempted);
        origination.attempted = true;
        cdr.set_id(&origination.id);
        self.routing.originations.placed(&origination.id, leg);
        self.legs.insert(
            leg,
            Leg {
                // No flow owns it (its own starts on answer), and nobody listens to its events.
                origination: Some((origination, CallChannels::new())),
                signalling: Some(peer.addr.ip()),
                ..Leg::new(leg, mpsc::unbounded_channel().0, offer, local, (rtp, rtcp), cdr)
            },
        );
    }

    /// An origination that never went out: its status and its record say why.
    pub(super) fn origination_failed(&mut self, id: &str, reason: String) {
        tracing::warn!(id, "origination failed: {reason}");
        let status = crate::originate::CallStatus::Failed;
        if let Some(view) = self.routing.originations.update(id, status, None, Some(reason)) {
            crate::originate::write_refused(&self.routing.cdr, &view, "failed");
        }
    }

    /// Cancels (before answer) or hangs up (after) a call placed through the API.
    pub(super) fn hangup_origination(&mut self, now: std::time::Instant, id: &str, reason: &'static str) {
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
}

/// Starts an outbound leg's media from the callee's SDP (in a 18x or the 2xx). Early media
/// gets no RTP inactivity timeout: a callee may send SDP and no audio while it rings.
pub(super) fn start_leg_media(
    leg: &mut Leg,
    call: CallRef,
    sdp: &[u8],
    routing: &Routing,
    requests: &mpsc::UnboundedSender<Request>,
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
    let private_media = routing.tenants.get().get(leg.cdr.tenant()).is_some_and(|t| t.allow.private_media());
    let peer = crate::media::MediaPeer { signalling: leg.signalling, private_media };
    let session = crate::media::session_for(
        &negotiated,
        negotiated.ptime,
        routing.media.pool(),
        timeout,
        crate::random::u64(),
        peer,
    );
    let media = match routing.media.start_call(session, peer, rtp, Some(rtcp), sinks) {
        Ok(media) => media,
        Err(e) => {
            tracing::error!(?call, "starting the leg's media: {e}");
            return None;
        }
    };
    tracing::info!(?call, codec = negotiated.codec.name(), remote = %negotiated.remote_rtp, "leg media started");
    let requests = requests.clone();
    tokio::spawn(async move {
        if inactive_rx.recv().await.is_some() {
            let _ = requests.send(Request::HangupLeg { leg: call, reason: "rtp-timeout", by: "patchbay" });
        }
    });
    leg.media = Some(Arc::clone(&media));
    leg.dtmf = dtmf_rx;
    leg.agreed = Some((local, negotiated));
    Some(media)
}

/// Hangs up (or cancels) every outbound leg `owner`'s flow placed.
pub(super) fn hangup_legs(
    ua: &mut UserAgent,
    legs: &mut HashMap<CallRef, Leg>,
    owner: CallRef,
    now: std::time::Instant,
) {
    for (leg, l) in legs.iter_mut().filter(|(_, l)| l.owner == owner) {
        // The leg's own record: its parent call went away.
        l.cdr.ending("caller-hangup", "caller");
        if let Err(e) = ua.hangup(now, *leg) {
            tracing::debug!(?leg, "hanging up the leg: {e}");
        }
    }
}

/// The record's end of an outbound leg: what ended it and on whose behalf.
pub(super) fn leg_end(draft: &CdrDraft, cause: &EndCause) -> SipEnd {
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

/// A call placed through the API was answered: start its media on the channels its flow will
/// use, make it a live call and run its flow (direction `outbound`).
#[allow(clippy::too_many_arguments)]
pub(super) fn origination_answered(
    ua: &mut UserAgent,
    calls: &mut HashMap<CallRef, Call>,
    routing: &Arc<Routing>,
    engine: &Arc<FlowEngine>,
    registry: &Arc<FlowRegistry>,
    services: &crate::call::Services,
    now: std::time::Instant,
    call: CallRef,
    mut leg: Leg,
    sdp: &[u8],
) {
    let Some((origination, channels)) = leg.origination.take() else { return };
    let crate::originate::Origination { id, trunk, flow: flow_name, vars, slots, .. } = *origination;
    let flow = registry.get(&trunk.tenant, &flow_name);
    let tenant = routing.tenants.get().get(&trunk.tenant).cloned();
    let media = start_leg_media(&mut leg, call, sdp, routing, &services.requests, false, Some(&channels));
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
        pending: None,
    };
    crate::call::start(calls, services, engine, start);
}

/// The registrar's Service-Route as the Route of a new request through `trunk` (RFC 3608 §6:
/// the UA preloads it while registered).
pub(super) fn service_route(routing: &Routing, trunk: &crate::trunk::Trunk) -> Vec<rsip::Header> {
    let states = routing.trunk_states.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let route = states.get(&trunk.key()).map(|t| t.service_route.clone()).unwrap_or_default();
    route.into_iter().map(|r| rsip::Header::Route(r.into())).collect()
}

/// An offer through `trunk`: its codecs in its order, SRTP as it says (RFC 4568 SDES keys).
pub(super) fn offer_as_trunk_says(local: &mut patchbay_sip::sdp::LocalMedia, trunk: &crate::trunk::Trunk) {
    local.codecs.clone_from(&trunk.codecs);
    local.srtp = match trunk.srtp {
        crate::config::SrtpMode::Off => patchbay_sip::sdp::SrtpPolicy::Off,
        crate::config::SrtpMode::Optional => patchbay_sip::sdp::SrtpPolicy::Offer(crate::random::sdes_key()),
        crate::config::SrtpMode::Mandatory => patchbay_sip::sdp::SrtpPolicy::Require(crate::random::sdes_key()),
    };
}
