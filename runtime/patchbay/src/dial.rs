//! Outbound legs and bridges: a flow's `dial` places a call (an outbound leg owned by the
//! flow's call), lets the caller hear ringback or the callee's early media, and once the
//! callee answers bridges the two until either side hangs up.
//!
//! The endpoint owns the leg's dialog and starts its media (see [`Leg`]); the flow's call
//! drives the bridge in [`bridge`], moving frames by handle from one leg's receive side to
//! the other's playout queue. Codecs are only converted when the two legs negotiated
//! different ones (PCMU ↔ PCMA, at send time). Key presses are relayed both ways as RFC 4733
//! events.
//!
//! **Not done yet:** bridged audio passes each leg's jitter buffer (a direct RTP forward would
//! skip it); legs go out over UDP only, directly to the URI's host (tenant trunks and DNS SRV
//! come with the trunks work); the caller is answered before dialling (no early-media bridge
//! into an unanswered inbound call).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use patchbay_host::{BridgeEnd, CallError, DialOutcome, Dtmf};
use patchbay_sip::ua::{CallRef, EndCause};
use tokio::sync::mpsc;

use crate::media::{CallMedia, Listener};

/// What happens to an outbound leg, reported to the flow that placed it.
#[derive(Debug)]
pub(crate) enum LegEvent {
    /// A provisional response; `early` is the leg's media when it carried SDP.
    Progress { status: u16, early: Option<Arc<CallMedia>> },
    /// The callee answered; its media and key presses.
    Answered { media: Arc<CallMedia>, dtmf: mpsc::Receiver<Dtmf> },
    /// The leg ended (before or after answer).
    Ended { cause: EndCause },
}

/// What the endpoint keeps for an outbound leg.
pub(crate) struct Leg {
    /// The call whose flow placed it.
    pub owner: CallRef,
    /// Where its events go.
    pub events: mpsc::UnboundedSender<LegEvent>,
    /// The SDP offer we sent (to read the answer against).
    pub offer: String,
    /// Our side of the session until media starts.
    pub local: Option<patchbay_sip::sdp::LocalMedia>,
    /// Our side and what was agreed, once media started (for the callee's re-INVITEs).
    pub agreed: Option<(patchbay_sip::sdp::LocalMedia, patchbay_sip::sdp::Negotiated)>,
    /// Its RTP and RTCP sockets until media starts.
    pub sockets: Option<(std::net::UdpSocket, std::net::UdpSocket)>,
    /// Its media once started (early media or answer).
    pub media: Option<Arc<CallMedia>>,
    /// Its key presses, handed to the flow on answer.
    pub dtmf: Option<mpsc::Receiver<Dtmf>>,
    /// Where the callee's SIP INFO key presses go (the same channel).
    pub dtmf_sink: Option<mpsc::Sender<Dtmf>>,
    /// The leg's own call detail record.
    pub cdr: crate::cdr::CdrDraft,
    /// The trunk's and tenant's call slots it holds while it is up (a leg through a trunk):
    /// dropped with it.
    #[allow(dead_code, reason = "held, never read: the slots go back when the leg is dropped")]
    pub slots: crate::trunk::CallSlots,
    /// A call placed through the API (no flow owns it: its own flow starts on answer) and the
    /// channels its flow will use.
    pub origination: Option<(Box<crate::originate::Origination>, crate::sip_server::CallChannels)>,
}

impl Leg {
    /// A leg whose INVITE carries `offer` from `local` on the RTP/RTCP `sockets`.
    pub fn new(
        owner: CallRef,
        events: mpsc::UnboundedSender<LegEvent>,
        offer: String,
        local: patchbay_sip::sdp::LocalMedia,
        sockets: (std::net::UdpSocket, std::net::UdpSocket),
        cdr: crate::cdr::CdrDraft,
    ) -> Self {
        Self {
            owner,
            events,
            offer,
            local: Some(local),
            agreed: None,
            sockets: Some(sockets),
            media: None,
            dtmf: None,
            dtmf_sink: None,
            cdr,
            slots: Default::default(),
            origination: None,
        }
    }
}

/// A parsed and resolved `dial` target.
#[derive(Debug)]
pub(crate) struct Target {
    pub uri: rsip::Uri,
    pub peer: SocketAddr,
    /// `trunk:NAME/NUMBER`: the tenant's trunk and the number to call through it.
    pub trunk: Option<(Arc<crate::trunk::Trunk>, String)>,
    /// The trunk's and tenant's call slots the leg holds while it is up.
    pub slots: crate::trunk::CallSlots,
}

/// Resolves a `dial` or bridged-`transfer` target: `trunk:NAME/NUMBER` goes through one of
/// `tenant`'s trunks (its next hop and transport), anything else as [`resolve`] says.
pub(crate) async fn resolve_for(
    target: &str,
    tenant: &crate::tenant::Tenant,
    tenants: &crate::tenant::Tenants,
) -> Result<Target, CallError> {
    let Some(rest) = target.strip_prefix("trunk:") else {
        let plain = resolve(target).await?;
        // A carrier is reached through its trunk only (credentials, caller-ID list, caps): a
        // plain URI at a trunk's gateway would skip all three.
        if let Some(trunk) = tenants.trunks().find(|t| t.is_gateway(plain.peer)) {
            return Err(CallError::NotAllowed(format!(
                "{target:?} is trunk {:?}'s gateway: dial trunk:{}/NUMBER",
                trunk.name, trunk.name
            )));
        }
        return Ok(plain);
    };
    let bad = |why: String| CallError::InvalidArgument(format!("dial target {target:?}: {why}"));
    let (name, number) = rest.split_once('/').ok_or_else(|| bad("write trunk:NAME/NUMBER".into()))?;
    crate::trunk::check_number(number).map_err(bad)?;
    // Only the tenant's own trunks: a flow cannot dial out through another tenant's account.
    let trunk = tenant.trunk(name).ok_or_else(|| CallError::NotAllowed(format!("the tenant has no trunk {name:?}")))?;
    let uri = trunk.uri_for(number).map_err(bad)?;
    // The trunk's and the tenant's caps hold for flows too; a flow does not wait in the
    // originations' queue: it hears `limit-exceeded` and may try again.
    let slots = trunk.gate.try_pass(&tenant.caps).ok_or_else(|| {
        CallError::LimitExceeded(format!("trunk {name:?} or its tenant is at its calls-per-second or max_calls cap"))
    })?;
    let peer = trunk.next_hop().await.map_err(CallError::Unavailable)?;
    Ok(Target { uri, peer: peer.addr, trunk: Some((Arc::clone(trunk), number.to_owned())), slots })
}

/// Most extra headers a flow may put on one INVITE.
pub(crate) const MAX_FLOW_HEADERS: usize = 16;

/// Whether a flow-supplied header may go out. An allow-list: `X-` headers and
/// `User-to-User` (RFC 7433) only — anything else could restate what the user agent writes
/// (compact forms included: `f`, `t`, `i`…) or claim an identity the trunk's caller-ID list never
/// checked (`Remote-Party-ID`, `P-Preferred-Identity`, `Privacy`, `Diversion`…). The name is
/// a token (RFC 3261 §25.1) and the value has no control characters (no CR/LF: nothing can
/// start a header or a body of its own).
pub(crate) fn check_header(name: &str, value: &str) -> Result<(), CallError> {
    let token = name.len() > 2 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-.!%*_+`'~".contains(c));
    let allowed =
        name.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("x-")) || name.eq_ignore_ascii_case("user-to-user");
    if !token || !allowed {
        return Err(CallError::InvalidArgument(format!(
            "header {name:?} cannot be set by a flow (X- headers and User-to-User only)"
        )));
    }
    if value.chars().any(|c| c.is_control() && c != '\t') || value.len() > 1024 {
        return Err(CallError::InvalidArgument(format!(
            "header {name:?}: the value has control characters or is too long"
        )));
    }
    Ok(())
}

/// Whether `uri` can go into a header as is: nothing that could end or break out of it
/// (`Refer-To`, the request line).
pub(crate) fn is_plain_uri(uri: &str) -> bool {
    !uri.chars().any(|c| c.is_control() || c.is_whitespace() || matches!(c, '<' | '>' | '"'))
}

/// Checks a dial target and resolves where to send the INVITE (the URI's host and port,
/// 5060 by default; RFC 3263's NAPTR/SRV steps are not done).
pub(crate) async fn resolve(target: &str) -> Result<Target, CallError> {
    let bad = |why: &str| CallError::InvalidArgument(format!("dial target {target:?}: {why}"));
    if !target.starts_with("sip:") {
        return Err(bad("only sip: URIs can be dialled (sips: and tel: need trunks)"));
    }
    if !is_plain_uri(target) {
        return Err(bad("not a plain SIP URI"));
    }
    let uri = rsip::Uri::try_from(target).map_err(|e| bad(&e.to_string()))?;
    let port = uri.host_with_port.port.map_or(5060, |p| *p.value());
    let host = uri.host_with_port.host.to_string();
    let peer = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| CallError::Unavailable(format!("resolving {host}: {e}")))?
        .next()
        .ok_or_else(|| CallError::Unavailable(format!("{host} has no address")))?;
    Ok(Target { uri, peer, trunk: None, slots: Default::default() })
}

/// The flow's view of the outcome of a leg that ended before it was answered
/// (RFC 3261 §21: 486/600 busy, 408/480/487 nobody answered).
pub(crate) fn unanswered_outcome(cause: &EndCause) -> DialOutcome {
    match cause {
        EndCause::Failed(486 | 600) => DialOutcome::Busy,
        EndCause::Failed(408 | 480 | 487) | EndCause::Cancelled | EndCause::LocalBye => DialOutcome::NoAnswer,
        EndCause::Failed(code) => DialOutcome::Failed(*code),
        other => {
            tracing::debug!(?other, "leg ended unanswered");
            DialOutcome::Failed(500)
        }
    }
}

/// Audio queued on a bridged leg beyond which new frames are dropped: a bridge must not build
/// up delay when one side's clock runs faster.
const BRIDGE_MAX_QUEUED: usize = 5;

/// Queues a bridged frame unless the leg is already that far behind.
pub(crate) fn forward(to: &CallMedia, frame: patchbay_media::Frame) {
    to.with(|session| {
        if session.queued() < BRIDGE_MAX_QUEUED {
            let _ = session.play(frame);
        }
    });
}

/// How a bridge ended.
pub(crate) enum BridgeExit {
    /// The callee's leg ended.
    Callee,
    /// The caller hung up.
    Caller,
}

/// Bridges the caller's media `a` with the callee's `b` until one side ends. `a_dtmf` are
/// the caller's key presses, `b_dtmf` the callee's; `leg_events` the leg's remaining events;
/// `caller_gone` resolves when the caller hangs up.
pub(crate) async fn bridge(
    a: &CallMedia,
    a_dtmf: &mut mpsc::Receiver<Dtmf>,
    b: &CallMedia,
    mut b_dtmf: mpsc::Receiver<Dtmf>,
    leg_events: &mut mpsc::UnboundedReceiver<LegEvent>,
    caller_gone: impl Future<Output = ()>,
) -> BridgeExit {
    let (a_tx, mut from_a) = mpsc::channel(crate::media::FLOW_AUDIO_QUEUE);
    let (b_tx, mut from_b) = mpsc::channel(crate::media::FLOW_AUDIO_QUEUE);
    a.with(|session| session.clear());
    a.listen(Some(Listener::Frames(a_tx)));
    b.listen(Some(Listener::Frames(b_tx)));
    tokio::pin!(caller_gone);
    let exit = loop {
        tokio::select! {
            Some(frame) = from_a.recv() => forward(b, frame),
            Some(frame) = from_b.recv() => forward(a, frame),
            Some(key) = a_dtmf.recv() => {
                b.with(|session| session.send_dtmf(&key.digit.to_string(), key.duration_ms.clamp(40, 1_000)));
            }
            Some(key) = b_dtmf.recv() => {
                a.with(|session| session.send_dtmf(&key.digit.to_string(), key.duration_ms.clamp(40, 1_000)));
            }
            event = leg_events.recv() => match event {
                Some(LegEvent::Ended { cause }) => {
                    tracing::info!(?cause, "bridge: the callee's leg ended");
                    break BridgeExit::Callee;
                }
                Some(other) => tracing::debug!(?other, "bridge: leg event"),
                None => break BridgeExit::Callee,
            },
            () = &mut caller_gone => break BridgeExit::Caller,
        }
    };
    a.listen(None);
    b.listen(None);
    exit
}

impl From<BridgeExit> for DialOutcome {
    fn from(exit: BridgeExit) -> Self {
        DialOutcome::Answered(match exit {
            BridgeExit::Callee => BridgeEnd::Callee,
            BridgeExit::Caller => BridgeEnd::Caller,
        })
    }
}

/// Longest we wait for a cancelled leg's final answer before reporting no-answer anyway.
pub(crate) const CANCEL_WAIT: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unanswered_legs_map_to_the_flows_outcomes() {
        assert!(matches!(unanswered_outcome(&EndCause::Failed(486)), DialOutcome::Busy));
        assert!(matches!(unanswered_outcome(&EndCause::Failed(600)), DialOutcome::Busy));
        assert!(matches!(unanswered_outcome(&EndCause::Failed(480)), DialOutcome::NoAnswer));
        assert!(matches!(unanswered_outcome(&EndCause::Failed(408)), DialOutcome::NoAnswer));
        assert!(matches!(unanswered_outcome(&EndCause::Failed(404)), DialOutcome::Failed(404)));
        assert!(matches!(unanswered_outcome(&EndCause::Failed(503)), DialOutcome::Failed(503)));
    }

    #[test]
    fn flows_set_x_headers_and_user_to_user_only() {
        assert!(check_header("X-Campaign", "spring").is_ok());
        assert!(check_header("User-to-User", "56a390f3d2b7310023a2;encoding=hex").is_ok());
        for (name, value) in [
            ("From", "<sip:x@y>"),
            ("f", "<sip:x@y>"),
            ("P-Preferred-Identity", "<sip:+1@y>"),
            ("Remote-Party-ID", "<sip:+1@y>"),
            ("X-Evil", "a\r\nFrom: <sip:x@y>"),
            ("X Evil", "a"),
        ] {
            assert!(check_header(name, value).is_err(), "{name}: {value:?}");
        }
    }

    #[tokio::test]
    async fn targets_must_be_plain_sip_uris() {
        for bad in ["tel:+15551234", "sips:a@b", "sip:a@b>", "sip:a b@c", "http://x"] {
            assert!(matches!(resolve(bad).await, Err(CallError::InvalidArgument(_))), "{bad}");
        }
        let target = resolve("sip:bob@127.0.0.1:5070").await.expect("valid");
        assert_eq!(target.peer, "127.0.0.1:5070".parse().expect("addr"));
        let default_port = resolve("sip:bob@127.0.0.1").await.expect("valid");
        assert_eq!(default_port.peer.port(), 5060);
    }
}
