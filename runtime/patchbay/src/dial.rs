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
//! Every target passes the tenant's capabilities first (`crate::policy`): a `sip:` target must
//! be listed in `[tenant.allow] dial` or be one of the tenant's own flows on this host, a
//! `trunk:` target must name one of its own trunks (and a number its `trunk:` entries allow).
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
use crate::policy::{Host, SipUri, Verdict};
use crate::tenant::{Tenant, Tenants};

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
    /// Where its signalling goes (what decides where its RTP may go, `media::MediaPeer`).
    pub signalling: Option<std::net::IpAddr>,
    /// The trunk's and tenant's call slots it holds while it is up (a leg through a trunk):
    /// dropped with it.
    #[allow(dead_code, reason = "held, never read: the slots go back when the leg is dropped")]
    pub slots: crate::trunk::CallSlots,
    /// A call placed through the API (no flow owns it: its own flow starts on answer) and the
    /// channels its flow will use.
    pub origination: Option<(Box<crate::originate::Origination>, crate::media::CallChannels)>,
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
            signalling: None,
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

/// Resolves a `dial` or bridged-`transfer` target under `tenant`'s capabilities:
/// `trunk:NAME/NUMBER` goes through one of `tenant`'s trunks (its next hop and transport), a
/// `sip:` URI to its host, when [`admit_sip`] lets it.
pub(crate) async fn resolve_for(target: &str, tenant: &Tenant, tenants: &Tenants) -> Result<Target, CallError> {
    let Some(rest) = target.strip_prefix("trunk:") else {
        let uri = parse_dial_uri(target)?;
        let peer = admit_sip("dial target", target, &uri, tenant, tenants).await?;
        // A carrier is reached through its trunk only (credentials, caller-ID list, caps): a
        // plain URI at a trunk's gateway would skip all three.
        if let Some(trunk) = tenants.trunks().find(|t| t.is_gateway(peer)) {
            return Err(CallError::NotAllowed(format!(
                "{target:?} is trunk {:?}'s gateway: dial trunk:{}/NUMBER",
                trunk.name, trunk.name
            )));
        }
        let uri = uri.to_rsip().map_err(|e| CallError::InvalidArgument(format!("dial target {target:?}: {e}")))?;
        return Ok(Target { uri, peer, trunk: None, slots: Default::default() });
    };
    let bad = |why: String| CallError::InvalidArgument(format!("dial target {target:?}: {why}"));
    let (name, number) = rest.split_once('/').ok_or_else(|| bad("write trunk:NAME/NUMBER".into()))?;
    crate::trunk::check_number(number).map_err(bad)?;
    // Only the tenant's own trunks: a flow cannot dial out through another tenant's account.
    let trunk = tenant.trunk(name).ok_or_else(|| CallError::NotAllowed(format!("the tenant has no trunk {name:?}")))?;
    tenant.allow.check_trunk("dial target", name, number)?;
    let uri = trunk.uri_for(number).map_err(bad)?;
    // The trunk's and the tenant's caps hold for flows too; a flow does not wait in the
    // originations' queue: it hears `limit-exceeded` and may try again.
    let slots = trunk.gate.try_pass(&tenant.caps).ok_or_else(|| {
        CallError::LimitExceeded(format!("trunk {name:?} or its tenant is at its calls-per-second or max_calls cap"))
    })?;
    let peer = trunk.next_hop().await.map_err(CallError::Unavailable)?;
    Ok(Target { uri, peer: peer.addr, trunk: Some((Arc::clone(trunk), number.to_owned())), slots })
}

/// Where a `sip:`/`sips:` target may go under `tenant`'s capabilities, resolved: the address
/// the request is to be sent to (the one that was checked).
///
/// Allowed when `allow.dial` has an entry naming its host (any address), or only entries with
/// a wildcard host and it resolves to a public address, or it is one of the tenant's own flows:
/// its host is one of the tenant's domains, it resolves to one of our SIP listeners, and its
/// user part is not another tenant's DID (DIDs are routed before domains). A target no entry
/// matches, outside the tenant's domains, is refused before its name is looked up.
pub(crate) async fn admit_sip(
    what: &str,
    target: &str,
    uri: &SipUri,
    tenant: &Tenant,
    tenants: &Tenants,
) -> Result<SocketAddr, CallError> {
    let verdict = tenant.allow.sip_verdict(uri);
    let own_domain = tenant.serves_host(&uri.host);
    if verdict == Verdict::NotListed && !own_domain {
        return Err(tenant.allow.not_listed(what, target).into());
    }
    let peer = lookup(uri).await?;
    let own_flow = own_domain
        && tenants.local.contains(peer)
        && tenants.by_did(&uri.user_decoded()).is_none_or(|(owner, ..)| owner.id == tenant.id);
    if own_flow || verdict.admits(peer.ip()) {
        return Ok(peer);
    }
    Err(match verdict {
        Verdict::Wildcard(entry) => tenant.allow.internal("allow.dial", what, target, peer.ip(), &entry),
        _ => tenant.allow.not_listed(what, target),
    }
    .into())
}

/// Checks a `transfer` target against `tenant`'s capabilities before it goes out, by REFER or
/// by bridge: `sip:`/`sips:` as [`admit_sip`] says (a target an entry names is not looked up:
/// with REFER the caller's side resolves it), `tel:` by its `tel:` entries. `trunk:` targets
/// are bridged, and [`resolve_for`] checks them there.
pub(crate) async fn check_transfer(target: &str, tenant: &Tenant, tenants: &Tenants) -> Result<(), CallError> {
    const WHAT: &str = "transfer target";
    if target.starts_with("trunk:") {
        return Ok(());
    }
    if target.starts_with("tel:") {
        return Ok(tenant.allow.check_tel(WHAT, target)?);
    }
    let uri = SipUri::parse(target).map_err(|e| CallError::InvalidArgument(format!("{WHAT} {target:?}: {e}")))?;
    if tenant.allow.sip_verdict(&uri) == Verdict::Listed {
        return Ok(());
    }
    admit_sip(WHAT, target, &uri, tenant, tenants).await.map(drop)
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

/// Checks a dial target's form: a plain `sip:` URI ([`SipUri`]'s strict grammar; `sips:` and
/// `tel:` need trunks).
pub(crate) fn parse_dial_uri(target: &str) -> Result<SipUri, CallError> {
    let bad = |why: &str| CallError::InvalidArgument(format!("dial target {target:?}: {why}"));
    if !target.starts_with("sip:") {
        return Err(bad("only sip: URIs can be dialled (sips: and tel: need trunks)"));
    }
    if !is_plain_uri(target) {
        return Err(bad("not a plain SIP URI"));
    }
    SipUri::parse(target).map_err(|e| bad(&e))
}

/// Where a request to `uri` goes: its address, or the first address its name resolves to
/// (system resolver, A/AAAA), at its port (5060 by default, 5061 for `sips:`; RFC 3263's
/// NAPTR/SRV steps are not done).
async fn lookup(uri: &SipUri) -> Result<SocketAddr, CallError> {
    let port = uri.port_or_default();
    match &uri.host {
        Host::Ip(ip) => Ok(SocketAddr::new(*ip, port)),
        Host::Name(name) => tokio::net::lookup_host((name.as_str(), port))
            .await
            .map_err(|e| CallError::Unavailable(format!("resolving {name}: {e}")))?
            .next()
            .ok_or_else(|| CallError::Unavailable(format!("{name} has no address"))),
    }
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

    /// A resolver with no records (the tests' targets and gateways are addresses).
    struct NoDns;

    #[async_trait::async_trait]
    impl crate::resolve::Resolve for NoDns {
        async fn naptr(&self, _: &str) -> Result<Vec<crate::resolve::NaptrRecord>, crate::resolve::LookupError> {
            Ok(Vec::new())
        }
        async fn srv(&self, _: &str) -> Result<Vec<crate::resolve::SrvRecord>, crate::resolve::LookupError> {
            Ok(Vec::new())
        }
        async fn ip(&self, _: &str) -> Result<Vec<std::net::IpAddr>, crate::resolve::LookupError> {
            Ok(Vec::new())
        }
    }

    /// Tenant `acme` on 127.0.0.1 (listening on 127.0.0.1:5999) allowing 127.0.0.1:5070, any
    /// public host and +1 numbers on its trunk; tenant `other` allowing nothing, with a DID.
    fn tenants() -> Tenants {
        let text = r#"
[sip]
listen = ["udp:127.0.0.1:5999"]
[[tenant]]
id = "acme"
domains = ["127.0.0.1"]
[[tenant.flow]]
name = "echo"
stock = "echo"
[tenant.allow]
dial = ["sip:*@127.0.0.1:5070", "sip:*@*:*", "trunk:carrier/+1*"]
[[tenant.trunk]]
name = "carrier"
gateway = "198.51.100.9:5060"
[[tenant]]
id = "other"
domains = ["other.test"]
[[tenant.flow]]
name = "echo"
stock = "echo"
[[tenant.trunk]]
name = "c2"
gateway = "192.0.2.1:5060"
[tenant.trunk.dids]
"+15550100" = "echo"
"#;
        let config = crate::config::Config::parse(text, "t.toml", std::path::PathBuf::new()).expect("config");
        let resolver: Arc<dyn crate::resolve::Resolve> = Arc::new(NoDns);
        Tenants::build(&config, &resolver).expect("tenants")
    }

    async fn dial(tenants: &Tenants, tenant: &str, target: &str) -> Result<SocketAddr, CallError> {
        let tenant = tenants.get(tenant).expect("tenant");
        resolve_for(target, tenant, tenants).await.map(|t| t.peer)
    }

    fn refused(result: Result<SocketAddr, CallError>, says: &str) {
        match result {
            Err(CallError::NotAllowed(why)) => assert!(why.contains(says), "{why:?} does not say {says:?}"),
            other => panic!("expected not-allowed ({says}), got {other:?}"),
        }
    }

    #[tokio::test]
    async fn targets_must_be_plain_sip_uris() {
        let tenants = tenants();
        for bad in [
            "tel:+15551234",
            "sips:a@b.example",
            "sip:a@b>",
            "sip:a b@c",
            "http://x",
            "sip:a@b.example;maddr=evil.example",
            "sip:a@b.example?Route=x",
        ] {
            assert!(matches!(dial(&tenants, "acme", bad).await, Err(CallError::InvalidArgument(_))), "{bad}");
        }
        let peer = dial(&tenants, "acme", "sip:bob@127.0.0.1:5070").await.expect("listed");
        assert_eq!(peer, "127.0.0.1:5070".parse().expect("addr"));
    }

    #[tokio::test]
    async fn dial_targets_pass_the_tenants_capabilities() {
        let tenants = tenants();
        // Its own flow on this host: its domain, our listener.
        let own = dial(&tenants, "acme", "sip:echo@127.0.0.1:5999").await.expect("own flow");
        assert_eq!(own, "127.0.0.1:5999".parse().expect("addr"));
        // Listed by an entry naming the host: loopback is fine.
        assert!(dial(&tenants, "acme", "sip:anyone@127.0.0.1:5070").await.is_ok());
        // A wildcard host reaches public addresses only.
        assert!(dial(&tenants, "acme", "sip:x@203.0.113.5:5080").await.is_ok());
        refused(dial(&tenants, "acme", "sip:x@127.0.0.1:6000").await, "resolves to 127.0.0.1");
        refused(dial(&tenants, "acme", "sip:x@[::1]:6000").await, "wildcard host");
        refused(dial(&tenants, "acme", "sip:x@10.0.0.1").await, "\"sip:*@*:*\" has a wildcard host");
        // Another tenant's DID at our address is not one of acme's flows.
        refused(dial(&tenants, "acme", "sip:+15550100@127.0.0.1:5999").await, "resolves to 127.0.0.1");
        // A trunk's gateway is reached through the trunk.
        refused(dial(&tenants, "acme", "sip:x@198.51.100.9").await, "gateway");
        // Its trunk: entries narrow the numbers.
        refused(dial(&tenants, "acme", "trunk:carrier/+88212345").await, "allow.dial");
        // A tenant without [tenant.allow] reaches nothing else.
        refused(dial(&tenants, "other", "sip:x@203.0.113.5").await, "not in tenant other's allow.dial");
        refused(dial(&tenants, "other", "sip:echo@127.0.0.1:5999").await, "not in tenant other's allow.dial");
        refused(dial(&tenants, "other", "trunk:carrier/+15551234").await, "no trunk");
    }

    #[tokio::test]
    async fn transfer_targets_pass_the_same_rules() {
        let tenants = tenants();
        let acme = tenants.get("acme").expect("acme");
        let transfer = |target: &'static str| check_transfer(target, acme, &tenants);
        assert!(transfer("sip:human@127.0.0.1:5070").await.is_ok());
        assert!(transfer("sip:echo@127.0.0.1:5999").await.is_ok());
        let refused_with = |result: Result<(), CallError>, says: &str| {
            refused(result.map(|()| "0.0.0.0:0".parse().expect("addr")), says);
        };
        refused_with(transfer("tel:+15551234").await, "transfer target tel:+15551234 is not in tenant acme's");
        refused_with(transfer("sip:x@192.168.1.10").await, "resolves to 192.168.1.10");
        let other = tenants.get("other").expect("other");
        let result = check_transfer("sip:evil@203.0.113.66", other, &tenants).await;
        refused_with(result, "transfer target sip:evil@203.0.113.66 is not in tenant other's allow.dial");
    }
}
