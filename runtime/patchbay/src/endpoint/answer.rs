//! Answering: the SDP answer (RFC 3264), SRTP keys (RFC 4568), the media session on the
//! shared clock, and re-offers in the call (re-INVITE, UPDATE).

use super::*;

pub(super) fn answer(
    ua: &mut UserAgent,
    calls: &mut HashMap<CallRef, Call>,
    call: CallRef,
    now: std::time::Instant,
    routing: &Routing,
    requests: &mpsc::UnboundedSender<Request>,
) -> Result<(), CallError> {
    let live = calls.get_mut(&call).ok_or(CallError::Hangup)?;
    if live.is_answered() {
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
    // SDES keys travel in the SDP: only over TLS unless allowed (RFC 4568 §8.3).
    let tls = ua.peer(call).is_some_and(|p| p.transport == patchbay_sip::transaction::Transport::Tls);
    if routing.srtp && (tls || routing.srtp_over_plain) {
        local.srtp = patchbay_sip::sdp::SrtpPolicy::Offer(crate::random::sdes_key());
    }
    match patchbay_sip::sdp::answer(&offer, &local) {
        Ok(negotiated) => {
            let srtp = negotiated.srtp.as_ref().map(|p| p.suite.name()).unwrap_or("off");
            tracing::info!(
                tenant = live.cdr.tenant(),
                flow = live.cdr.flow(),
                call_id = live.cdr.call_id(),
                codec = negotiated.codec.name(),
                remote = %negotiated.remote_rtp,
                srtp,
                "answering"
            );
            let peer = crate::media::MediaPeer {
                signalling: ua.peer(call).map(|p| p.addr.ip()),
                private_media: routing.tenants.get().get(live.cdr.tenant()).is_some_and(|t| t.allow.private_media()),
            };
            let mut session = media_session(&negotiated, negotiated.ptime, routing, peer);
            // Nothing is sent before the caller's ACK (see `MediaSession::set_confirmed`).
            session.set_confirmed(false);
            let (inactive, mut inactive_rx) = mpsc::unbounded_channel();
            let sinks = CallSinks { dtmf: live.dtmf.clone(), played: live.played.clone(), inactive };
            let media = routing
                .media
                .start_call(session, peer, rtp, Some(rtcp), sinks)
                .map_err(|e| CallError::Unavailable(format!("media: {e}")))?;
            let _ = live.media.set(media);
            let requests = requests.clone();
            tokio::spawn(async move {
                if inactive_rx.recv().await.is_some() {
                    let _ = requests.send(Request::MediaTimeout { call });
                }
            });
            let sdp = negotiated.local_sdp.clone().into_bytes();
            live.agreed = Some((local, negotiated));
            live.pending = None;
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

/// Answers a re-INVITE's offer (or an offer-less re-INVITE) with the same local media and a
/// bumped `o=` version, and applies what was agreed to the running media. Shared by inbound
/// calls and outbound legs.
pub(super) fn answer_reoffer(
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
pub(super) fn apply_negotiated(
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
        let declared = (!negotiated.remote_rtp.ip().is_unspecified()).then_some(negotiated.remote_rtp);
        let hold = !negotiated.direction.receives() || declared.is_none();
        let (remote, remote_rtcp) =
            (media.peer().destination(declared), media.peer().destination(negotiated.remote_rtcp));
        media.with(|session| {
            session.set_remote(remote);
            session.set_remote_rtcp(remote_rtcp);
            session.set_hold(hold);
            session.set_sending(negotiated.direction.sends());
        });
    } else {
        tracing::info!(codec = negotiated.codec.name(), "media renegotiated: new RTP stream");
        // The clock paces the call at the ptime it started with (its steps on the wheel are
        // fixed): the new stream keeps it, whatever the new SDP prefers.
        let session = media_session(negotiated, media.ptime_ms(), routing, media.peer());
        // What the old stream still had queued is dropped: report its marks first, so nobody
        // waits for them.
        media.with(MediaSession::clear);
        media.with(|old| *old = session);
    }
}

/// The media session for what was negotiated.
pub(super) fn media_session(
    negotiated: &patchbay_sip::sdp::Negotiated,
    ptime_ms: u16,
    routing: &Routing,
    peer: crate::media::MediaPeer,
) -> MediaSession {
    crate::media::session_for(
        negotiated,
        ptime_ms,
        routing.media.pool(),
        routing.rtp_timeout,
        crate::random::u64(),
        peer,
    )
}
