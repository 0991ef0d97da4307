//! A call's dialog (RFC 3261 §12) and where it is in its INVITE's life (§13): one
//! [`Dialog`] per call, inbound or outbound, whose life is one [`DialogState`].
//!
//! The dialog only keeps state and says which way it moved; the user agent core in `ua.rs`
//! sends what a transition asks for (a 487, a CANCEL, a BYE) through the transaction layer.

use std::time::{Duration, Instant};

use rsip::headers::{ToTypedHeader, UntypedHeader};
use rsip::prelude::HeadersExt;
use rsip::{Header, Method};

use super::EndCause;
use crate::auth::DigestClient;
use crate::transaction::{Peer, TransactionId};

/// Which side of the INVITE we are; fixed for the dialog's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// We answered the INVITE.
    Uas,
    /// We sent the INVITE, so we own the Call-ID (§14.1 gives the owner the longer 491 wait).
    Uac,
}

/// Why we end a call ourselves. A timer's reason outlives the BYE it sends: the call ends with
/// it, whatever answers that BYE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EndReason {
    /// The application hung up.
    Hangup,
    /// Our 2xx was never acknowledged (§13.3.1.4).
    AckTimeout,
    /// The peer, the refresher, did not refresh the session in time (RFC 4028 §10).
    SessionExpired,
}

impl EndReason {
    /// The cause this reason imposes on the call's end; `None` lets what ends it speak.
    pub(super) fn cause(self) -> Option<EndCause> {
        match self {
            Self::Hangup => None,
            Self::AckTimeout => Some(EndCause::AckTimeout),
            Self::SessionExpired => Some(EndCause::SessionExpired),
        }
    }
}

/// Where a call is between its INVITE and its end (RFC 3261 §12, §13).
///
/// ```text
///      INVITE received (UAS, §12.1.1)          INVITE sent (UAC, §12.1.2)
///                   |                                     |
///                   v                                     v
///             +----------+                          +-----------+ ---.
///             | Incoming |                          |  Calling  |    | 1xx: Progress
///             +----------+                          +-----------+ <--'  (§13.2.2.1)
///                   |              hangup before a 1xx |      |
///                   | 2xx sent (§13.3.1.4)             v      | hangup after a 1xx:
///                   v                   +---------------+     | CANCEL (§9.1)
///             +----------+              | CancelPending |     |
///      .------| Answered |              +---------------+     |
///      |      +----------+           1xx: CANCEL |            |
///      |        ACK |                            v            v
///      |            |                      +--------------------+
///      |            |                      |     Cancelling     |
///      |            |                      +--------------------+
///      |            v                                |
///      |      +-----------+  2xx from Calling,       |
///      |      | Confirmed | <------------------------'
///      |      +-----------+  CancelPending or Cancelling, ACKed (§13.2.2.4)
///      |            |
///      |            | hangup; no session refresh (RFC 4028 §10); a 2xx
///      |            | that crossed our CANCEL (§9.1), at once
///      |            v
///      |      +----------+
///      '----->|  Ending  |  BYE sent (§15.1.1), awaiting its final response
///   no ACK in +----------+
///   64·T1 (§13.3.1.4)
/// ```
///
/// A dialog leaves the user agent when it ends ([`super::UaEvent::Ended`] says why), so there
/// is no ended state to be in. The ways out:
///
/// - Incoming: reject, a hangup (480), CANCEL (§9.2: 487), a BYE (§15.1.2: 487 for the INVITE).
/// - Calling: a final non-2xx response or timer B (`Failed`). CancelPending, Cancelling: the
///   same, reported as `Cancelled`; Cancelling also when no final response arrives within
///   64·T1 of the CANCEL (§9.1).
/// - Any state with a dialog: the peer's BYE (§15.1.2); Ending: the answer to our BYE, or its
///   timeout.
#[derive(Debug)]
pub(super) enum DialogState {
    /// UAS: the INVITE arrived and awaits its final response (ring, answer, reject).
    Incoming,
    /// UAC: our INVITE awaits its final response. CANCEL may only follow a provisional response
    /// (§9.1: sent earlier it could overtake the INVITE), so we note whether one arrived.
    Calling {
        /// A provisional response to the current INVITE arrived.
        provisional: bool,
    },
    /// UAC: hung up before any provisional response; the CANCEL goes out with the first one,
    /// and a 2xx that comes first is acknowledged and ended with BYE.
    CancelPending,
    /// UAC: CANCEL sent (§9.1); the INVITE is given up at `deadline` (64·T1 after the CANCEL)
    /// if no final response comes.
    Cancelling {
        /// When to stop waiting for the 487.
        deadline: Instant,
    },
    /// UAS: our 2xx is sent and retransmitted until the ACK arrives (§13.3.1.4).
    Answered,
    /// The 2xx is acknowledged: the session is up.
    Confirmed {
        /// Our re-INVITE refused with 491, to send again at this time with this offer (§14.1).
        reinvite_retry: Option<(Instant, Vec<u8>)>,
    },
    /// We sent BYE (§15.1.1), for this reason, and wait for its final response.
    Ending(EndReason),
}

/// The dialog's leave to send a CANCEL now (§9.1: only after a provisional response), handed
/// out by [`Dialog::hang_up`] and [`Dialog::provisional`] and spent by [`Dialog::cancel`].
#[derive(Debug, PartialEq, Eq)]
pub(super) struct MayCancel(());

/// What to do for a hangup in the dialog's state ([`Dialog::hang_up`]).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Hangup {
    /// UAS before the final response: reject the INVITE.
    Reject,
    /// UAC after a provisional response: send CANCEL now (§9.1).
    Cancel(MayCancel),
    /// The dialog moved to Ending: send BYE (§15.1.1).
    Bye,
    /// Nothing to send now (a CANCEL waits for a provisional response, or the call is already
    /// being ended).
    Wait,
}

/// What to do after a provisional response to our INVITE ([`Dialog::provisional`]).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum AfterProvisional {
    /// Tell the application (for statuses above 100).
    Report,
    /// The application hung up before it: send the CANCEL now (§9.1).
    Cancel(MayCancel),
    /// Nothing: a CANCEL is already out, or the INVITE has its final response.
    Ignore,
}

/// A dialog (§12) plus what its call needs to answer, refresh and end it.
#[derive(Debug)]
pub(super) struct Dialog {
    role: Role,
    state: DialogState,
    /// Where in-dialog requests go: the INVITE's source (UAS) or the next hop we dialled (UAC).
    pub(super) peer: Peer,
    /// The initial INVITE: received (UAS), or the last one sent (UAC, after auth retries).
    pub(super) invite: rsip::Request,
    /// The INVITE's transaction: a server transaction (UAS) or a client one (UAC).
    pub(super) invite_tx: TransactionId,
    pub(super) call_id: String,
    /// Our tag (the To tag of a UAS, the From tag of a UAC).
    pub(super) local_tag: String,
    /// Our end as a From/To header value, with our tag.
    pub(super) local_uri: String,
    /// The peer's end as a From/To header value, with its tag once known.
    pub(super) remote_uri: String,
    /// The peer's tag, once known (compared parsed, never as text, §19.3).
    pub(super) remote_tag: Option<String>,
    /// Remote target: the peer's Contact (§12.1.1, §12.1.2), refreshed by re-INVITEs.
    pub(super) remote_target: rsip::Uri,
    /// Route set as Record-Route headers in the order Route takes them: the INVITE's order for
    /// a UAS (§12.1.1), the 2xx's reversed for a UAC (§12.1.2).
    pub(super) route_set: Vec<Header>,
    local_cseq: u32,
    /// The highest CSeq number the peer used in this dialog (§12.2.2).
    pub(super) remote_cseq: u32,
    /// The session description we last sent (re-sent on a re-INVITE we do not renegotiate).
    pub(super) local_sdp: Option<Vec<u8>>,
    /// Our REFER, while its transaction runs.
    pub(super) refer_tx: Option<TransactionId>,
    /// A re-INVITE or UPDATE waiting for the application's answer.
    pub(super) pending_reinvite: Option<(TransactionId, rsip::Request)>,
    /// Our re-INVITE, while its transaction runs.
    pub(super) reinvite_tx: Option<TransactionId>,
    /// The session interval (RFC 4028) the caller asked for, with the caller as refresher.
    session_interval: Option<Duration>,
    /// When the session expires without a refresh, once answered.
    session_expires: Option<Instant>,
    /// Credentials for challenges to our requests on this call (UAC, or a UAS the peer
    /// challenges on BYE).
    pub(super) digest: Option<DigestClient>,
    /// Addresses besides the peer's that may send this dialog's requests: a carrier's other
    /// edge addresses (set by the application from a trunk's configuration).
    pub(super) also_from: Vec<std::net::IpAddr>,
}

impl Dialog {
    /// An inbound call's dialog (§12.1.1) from the INVITE we received on server transaction
    /// `invite_tx`, with our To tag and the session interval we agreed to serve.
    pub(super) fn incoming(
        peer: Peer,
        invite: rsip::Request,
        invite_tx: TransactionId,
        local_tag: String,
        session_interval: Option<Duration>,
    ) -> Self {
        Self { session_interval, ..Self::new(Role::Uas, peer, invite, invite_tx, local_tag) }
    }

    /// An outbound call's dialog (§12.1.2) from the INVITE we sent on client transaction
    /// `invite_tx` (its From carries `local_tag`), with the credentials for its challenges.
    pub(super) fn outgoing(
        peer: Peer,
        invite: rsip::Request,
        invite_tx: TransactionId,
        local_tag: String,
        digest: Option<DigestClient>,
    ) -> Self {
        let offer = invite.body.clone();
        Self { local_sdp: Some(offer), digest, ..Self::new(Role::Uac, peer, invite, invite_tx, local_tag) }
    }

    /// What both sides take from the INVITE: the UAS sees itself in To and the peer in From,
    /// the UAC the other way round.
    fn new(role: Role, peer: Peer, invite: rsip::Request, invite_tx: TransactionId, local_tag: String) -> Self {
        let call_id = invite.call_id_header().map(|h| h.value().to_owned()).unwrap_or_default();
        let from = invite.from_header().map(|h| h.value().to_owned()).unwrap_or_default();
        let to = invite.to_header().map(|h| h.value().to_owned()).unwrap_or_default();
        let seq = invite.cseq_header().ok().and_then(|c| c.typed().ok()).map_or(0, |c| c.seq);
        let (local_uri, remote_uri) = match role {
            Role::Uas => (if to.contains(";tag=") { to } else { format!("{to};tag={local_tag}") }, from),
            Role::Uac => (from, to),
        };
        // §12.1.1: a UAS takes the peer's tag, target (Contact) and route set from the INVITE;
        // a UAC learns them from the responses (§12.1.2) and starts from the Request-URI.
        let (remote_tag, remote_target, route_set) = match role {
            Role::Uas => (
                invite.from_header().ok().and_then(|f| f.tag().ok().flatten()).map(|t| t.to_string()),
                invite.contact_header().ok().and_then(|c| c.typed().ok()).map_or_else(|| invite.uri.clone(), |c| c.uri),
                invite.headers.iter().filter(|h| matches!(h, Header::RecordRoute(_))).cloned().collect(),
            ),
            Role::Uac => (None, invite.uri.clone(), Vec::new()),
        };
        // §12.1.1 leaves a UAS's local sequence number empty until its first request, whose
        // number §12.2.1.1 lets it choose: starting from 1 makes that 2.
        let (local_cseq, remote_cseq) = match role {
            Role::Uas => (1, seq),
            Role::Uac => (seq, 0),
        };
        let state = match role {
            Role::Uas => DialogState::Incoming,
            Role::Uac => DialogState::Calling { provisional: false },
        };
        Self {
            role,
            state,
            peer,
            invite,
            invite_tx,
            call_id,
            local_tag,
            local_uri,
            remote_uri,
            remote_tag,
            remote_target,
            route_set,
            local_cseq,
            remote_cseq,
            local_sdp: None,
            refer_tx: None,
            pending_reinvite: None,
            reinvite_tx: None,
            session_interval: None,
            session_expires: None,
            digest: None,
            also_from: Vec::new(),
        }
    }

    /// Whether a request from `from` may act on this dialog: the peer (the INVITE's source,
    /// or the next hop we dialled), the peer's Contact when it is an address (a caller whose
    /// INVITE came through a proxy that did not record-route sends its BYE directly), or one
    /// of `also_from` (any port). Over UDP the port must match too — a UA sends its requests
    /// from the port it listens on (RFC 3581 symmetric signalling), so another program on the
    /// caller's host (or a NAT's other mapping) is not the caller; over TCP/TLS each connection
    /// has a port of its own, so the address decides (a BYE may also come over TCP for a call
    /// set up over UDP, RFC 3261 §18.1.1).
    pub(super) fn accepts_from(&self, from: Peer) -> bool {
        let ip = from.addr.ip().to_canonical();
        let same = |addr: std::net::SocketAddr| {
            addr.ip().to_canonical() == ip && (from.transport.is_reliable() || addr.port() == from.addr.port())
        };
        let host = self.remote_target.host_with_port.host.to_string();
        let contact = host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().ok().map(|ip| {
            let port = self.remote_target.host_with_port.port.map_or(5060, |p| *p.value());
            std::net::SocketAddr::new(ip, port)
        });
        same(self.peer.addr) || contact.is_some_and(same) || self.also_from.iter().any(|a| a.to_canonical() == ip)
    }

    /// Which side of the INVITE we are.
    pub(super) fn role(&self) -> Role {
        self.role
    }

    /// Where the call is.
    pub(super) fn state(&self) -> &DialogState {
        &self.state
    }

    /// The INVITE has no final response yet (§12.1: the dialog, if any, is early).
    pub(super) fn is_early(&self) -> bool {
        matches!(
            self.state,
            DialogState::Incoming
                | DialogState::Calling { .. }
                | DialogState::CancelPending
                | DialogState::Cancelling { .. }
        )
    }

    /// Our own INVITE still awaits its final response (§14.2: a re-INVITE from the peer now is
    /// glare).
    pub(super) fn is_calling(&self) -> bool {
        matches!(self.state, DialogState::Calling { .. } | DialogState::CancelPending | DialogState::Cancelling { .. })
    }

    /// A 2xx went out or came in and we have not sent BYE.
    pub(super) fn is_answered(&self) -> bool {
        matches!(self.state, DialogState::Answered | DialogState::Confirmed { .. })
    }

    /// The application hung up an outbound call before its final response.
    pub(super) fn is_cancelled(&self) -> bool {
        matches!(self.state, DialogState::CancelPending | DialogState::Cancelling { .. })
    }

    /// When to give up waiting for the 487 to our CANCEL.
    pub(super) fn cancel_deadline(&self) -> Option<Instant> {
        match self.state {
            DialogState::Cancelling { deadline } => Some(deadline),
            _ => None,
        }
    }

    /// The cause the call ends with when `observed` ends it: a BYE a timer made us send
    /// reports the timer.
    pub(super) fn end_cause(&self, observed: EndCause) -> EndCause {
        match self.state {
            DialogState::Ending(reason) => reason.cause().unwrap_or(observed),
            _ => observed,
        }
    }

    /// The next CSeq number for a request of ours in this dialog (§12.2.1.1).
    pub(super) fn next_local_cseq(&mut self) -> u32 {
        self.local_cseq += 1;
        self.local_cseq
    }

    /// UAS: our 2xx goes out (§13.3.1.4).
    pub(super) fn answer(&mut self) -> Result<(), &'static str> {
        match self.state {
            DialogState::Incoming => {
                self.state = DialogState::Answered;
                Ok(())
            }
            _ => Err("answering an answered call"),
        }
    }

    /// UAS: the ACK for our 2xx arrived; true when it confirmed the dialog (not a repeat).
    pub(super) fn ack_received(&mut self) -> bool {
        match self.state {
            DialogState::Answered => {
                self.state = DialogState::Confirmed { reinvite_retry: None };
                true
            }
            _ => false,
        }
    }

    /// UAC: a provisional response to our current INVITE arrived.
    pub(super) fn provisional(&mut self) -> AfterProvisional {
        match &mut self.state {
            DialogState::Calling { provisional } => {
                *provisional = true;
                AfterProvisional::Report
            }
            DialogState::CancelPending => AfterProvisional::Cancel(MayCancel(())),
            _ => AfterProvisional::Ignore,
        }
    }

    /// UAC: our INVITE was sent again with credentials (§22.2) as `invite` on `invite_tx`;
    /// a CANCEL may only follow a provisional response to this one (§9.1).
    pub(super) fn reinvited_with_credentials(&mut self, invite: rsip::Request, invite_tx: TransactionId) {
        self.invite = invite;
        self.invite_tx = invite_tx;
        if let DialogState::Calling { provisional } = &mut self.state {
            *provisional = false;
        }
    }

    /// UAC: moves to Cancelling as our CANCEL goes out, the INVITE to be given up at
    /// `deadline` without a final response (§9.1). False when the leave is stale (the INVITE
    /// got its final response, or a CANCEL went already).
    pub(super) fn cancel(&mut self, _leave: MayCancel, deadline: Instant) -> bool {
        match self.state {
            DialogState::Calling { provisional: true } | DialogState::CancelPending => {
                self.state = DialogState::Cancelling { deadline };
                true
            }
            _ => false,
        }
    }

    /// UAC: a 2xx to our INVITE confirms the dialog (§13.2.2.4; the caller sends the ACK) and
    /// sets its remote tag, target and route set. `None` when the INVITE already had its final
    /// response (a retransmission); else whether the application had hung up, in which case
    /// the call is ended with BYE at once (the 2xx crossed our CANCEL, §9.1).
    pub(super) fn confirm(&mut self, response: &rsip::Response) -> Option<bool> {
        if !self.is_calling() {
            return None;
        }
        let hung_up = self.is_cancelled();
        self.adopt(response);
        self.state = DialogState::Confirmed { reinvite_retry: None };
        Some(hung_up)
    }

    /// The call is to end (by the application, or a timer for `reason`): moves to Ending when
    /// there is a session to end with BYE, and says what to send.
    pub(super) fn hang_up(&mut self, reason: EndReason) -> Hangup {
        match self.state {
            DialogState::Incoming => Hangup::Reject,
            DialogState::Calling { provisional: true } => Hangup::Cancel(MayCancel(())),
            DialogState::Calling { provisional: false } => {
                self.state = DialogState::CancelPending;
                Hangup::Wait
            }
            DialogState::CancelPending | DialogState::Cancelling { .. } | DialogState::Ending(_) => Hangup::Wait,
            DialogState::Answered | DialogState::Confirmed { .. } => {
                self.state = DialogState::Ending(reason);
                // The session ends with this BYE; no refresh is awaited any more.
                self.session_interval = None;
                self.session_expires = None;
                Hangup::Bye
            }
        }
    }

    /// The session interval to answer with (RFC 4028 §9).
    pub(super) fn session_interval(&self) -> Option<Duration> {
        self.session_interval
    }

    /// When the session expires without a refresh.
    pub(super) fn session_expires(&self) -> Option<Instant> {
        self.session_expires
    }

    /// (Re)starts the session timer at `now` and returns its deadline. RFC 4028 §10: the
    /// refresher refreshes halfway; the other side sends BYE when the interval minus
    /// min(32 s, interval/3) passes without one.
    pub(super) fn arm_session_timer(&mut self, now: Instant) -> Option<Instant> {
        let interval = self.session_interval?;
        let deadline = now + interval - (interval / 3).min(Duration::from_secs(32));
        self.session_expires = Some(deadline);
        Some(deadline)
    }

    /// When our re-INVITE refused with 491 is due again.
    pub(super) fn reinvite_retry_at(&self) -> Option<Instant> {
        match &self.state {
            DialogState::Confirmed { reinvite_retry } => reinvite_retry.as_ref().map(|(at, _)| *at),
            _ => None,
        }
    }

    /// Keeps `offer` to send again at `at` after a 491 (§14.1); false when the session is no
    /// longer up, so there is nothing to retry.
    pub(super) fn schedule_reinvite_retry(&mut self, at: Instant, offer: Vec<u8>) -> bool {
        match &mut self.state {
            DialogState::Confirmed { reinvite_retry } => {
                *reinvite_retry = Some((at, offer));
                true
            }
            _ => false,
        }
    }

    /// The offer of the re-INVITE due again at `at`, if that retry is still the current one.
    pub(super) fn take_reinvite_retry(&mut self, at: Instant) -> Option<Vec<u8>> {
        match &mut self.state {
            DialogState::Confirmed { reinvite_retry }
                if reinvite_retry.as_ref().is_some_and(|(when, _)| *when == at) =>
            {
                reinvite_retry.take().map(|(_, offer)| offer)
            }
            _ => None,
        }
    }

    /// UAC: takes the dialog state from a response that creates or confirms it (§12.1.2): the
    /// remote tag (the To header as sent back), the remote target (Contact) and the route set
    /// (the Record-Route, reversed).
    pub(super) fn adopt(&mut self, response: &rsip::Response) {
        if let Ok(to) = response.to_header() {
            self.remote_uri = to.value().to_owned();
            self.remote_tag = to.tag().ok().flatten().map(|t| t.to_string());
        }
        if let Some(contact) = response.contact_header().ok().and_then(|h| h.typed().ok()) {
            self.remote_target = contact.uri;
        }
        // A 2xx sets the route set again even after an early dialog (§13.2.2.4). A Record-Route
        // header carrying several comma-separated entries is reversed as one unit: rsip keeps
        // it as one header, and proxies in practice add one header per hop.
        let mut routes: Vec<Header> =
            response.headers.iter().filter(|h| matches!(h, Header::RecordRoute(_))).cloned().collect();
        routes.reverse();
        self.route_set = routes;
    }

    /// An in-dialog request (§12.2.1.1) with the top Via `via`: Request-URI = remote target
    /// (or the first route when it is a strict router — not supported: loose routing assumed),
    /// Route = the route set, From = local URI with our tag, To = remote URI with their tag.
    pub(super) fn request(&self, method: Method, cseq: u32, via: Header, user_agent: &str) -> rsip::Request {
        let mut headers: Vec<Header> = vec![
            via,
            Header::MaxForwards(70u32.into()),
            Header::From(self.local_uri.clone().into()),
            Header::To(self.remote_uri.clone().into()),
            Header::CallId(self.call_id.clone().into()),
            Header::CSeq(format!("{cseq} {method}").into()),
        ];
        // `route_set` is already in Route order (reversed for a UAC when the dialog was made).
        for rr in &self.route_set {
            if let Header::RecordRoute(rr) = rr {
                headers.push(Header::Route(rr.value().to_owned().into()));
            }
        }
        headers.push(Header::UserAgent(user_agent.to_owned().into()));
        headers.push(Header::ContentLength(0u32.into()));
        rsip::Request {
            method,
            uri: self.remote_target.clone(),
            version: rsip::Version::V2,
            headers: headers.into(),
            body: Vec::new(),
        }
    }

    /// UAC: the CANCEL for our INVITE (§9.1): its Request-URI, Call-ID, To, From, CSeq number
    /// and top Via (branch included); Route as the INVITE had it.
    pub(super) fn cancel_request(&self, user_agent: &str) -> rsip::Request {
        let invite = &self.invite;
        let mut headers: Vec<Header> = Vec::with_capacity(8);
        let mut via_seen = false;
        for header in invite.headers.iter() {
            match header {
                Header::Via(_) if !via_seen => {
                    via_seen = true;
                    headers.push(header.clone());
                }
                Header::From(_) | Header::To(_) | Header::CallId(_) | Header::Route(_) | Header::MaxForwards(_) => {
                    headers.push(header.clone())
                }
                _ => {}
            }
        }
        let seq = invite.cseq_header().ok().and_then(|h| h.typed().ok()).map_or(1, |c| c.seq);
        headers.push(Header::CSeq(format!("{seq} CANCEL").into()));
        headers.push(Header::UserAgent(user_agent.to_owned().into()));
        headers.push(Header::ContentLength(0u32.into()));
        rsip::Request {
            method: Method::Cancel,
            uri: invite.uri.clone(),
            version: rsip::Version::V2,
            headers: headers.into(),
            body: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transaction::Transport;

    fn peer() -> Peer {
        Peer { transport: Transport::Udp, addr: "192.0.2.10:5060".parse().unwrap() }
    }

    fn invite(from: &str, to: &str) -> rsip::Request {
        let text = format!(
            "INVITE sip:bob@192.0.2.1 SIP/2.0\r\n\
             Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKd1\r\n\
             From: {from}\r\nTo: {to}\r\nCall-ID: d1@192.0.2.10\r\nCSeq: 4 INVITE\r\n\
             Contact: <sip:alice@192.0.2.10:5062>\r\n\
             Record-Route: <sip:p1.example;lr>\r\nContent-Length: 0\r\n\r\n"
        );
        rsip::Request::try_from(text.as_str()).unwrap()
    }

    fn uas() -> Dialog {
        let invite = invite("<sip:alice@192.0.2.10>;tag=a1", "<sip:bob@192.0.2.1>");
        Dialog::incoming(peer(), invite, TransactionId(1), "b2".into(), Some(Duration::from_secs(90)))
    }

    fn uac() -> Dialog {
        let invite = invite("<sip:bob@192.0.2.1>;tag=b2", "<sip:alice@192.0.2.10>");
        Dialog::outgoing(peer(), invite, TransactionId(1), "b2".into(), None)
    }

    #[test]
    fn each_side_reads_its_own_end_from_the_invite() {
        let d = uas();
        assert_eq!(
            (d.local_uri.as_str(), d.remote_uri.as_str()),
            ("<sip:bob@192.0.2.1>;tag=b2", "<sip:alice@192.0.2.10>;tag=a1")
        );
        assert_eq!(d.remote_tag.as_deref(), Some("a1"));
        // §12.1.1: the UAS takes the target and route set from the INVITE.
        assert_eq!(d.remote_target.to_string(), "sip:alice@192.0.2.10:5062");
        assert_eq!((d.route_set.len(), d.remote_cseq), (1, 4));
        assert!(matches!(d.state(), DialogState::Incoming));

        let mut d = uac();
        assert_eq!(
            (d.local_uri.as_str(), d.remote_uri.as_str()),
            ("<sip:bob@192.0.2.1>;tag=b2", "<sip:alice@192.0.2.10>")
        );
        // §12.1.2: a UAC learns the peer's tag, target and route set from the responses.
        assert_eq!((d.remote_tag.as_deref(), d.remote_target.to_string()), (None, "sip:bob@192.0.2.1".into()));
        assert!(d.route_set.is_empty());
        assert_eq!(d.next_local_cseq(), 5);
        assert!(matches!(d.state(), DialogState::Calling { provisional: false }));
    }

    #[test]
    fn a_hangup_before_any_provisional_response_waits_to_cancel() {
        let t0 = Instant::now();
        let mut d = uac();
        // §9.1: no CANCEL before a provisional response.
        assert_eq!(d.hang_up(EndReason::Hangup), Hangup::Wait);
        assert!(matches!(d.state(), DialogState::CancelPending));
        let AfterProvisional::Cancel(leave) = d.provisional() else { panic!("{:?}", d.state()) };
        assert!(d.cancel(leave, t0));
        assert_eq!(d.cancel_deadline(), Some(t0));
        assert!(!d.cancel(MayCancel(()), t0), "one CANCEL");
        assert_eq!((d.provisional(), d.hang_up(EndReason::Hangup)), (AfterProvisional::Ignore, Hangup::Wait));
        assert!(d.is_cancelled() && d.is_early());
    }

    #[test]
    fn a_hangup_after_a_provisional_response_cancels_and_a_crossing_2xx_asks_for_bye() {
        let t0 = Instant::now();
        let mut d = uac();
        assert_eq!(d.provisional(), AfterProvisional::Report);
        let Hangup::Cancel(leave) = d.hang_up(EndReason::Hangup) else { panic!("{:?}", d.state()) };
        assert!(d.cancel(leave, t0));
        let ok = rsip::Response::try_from(
            "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKd1\r\nFrom: <sip:bob@192.0.2.1>;tag=b2\r\n\
             To: <sip:alice@192.0.2.10>;tag=a9\r\nCall-ID: d1@192.0.2.10\r\nCSeq: 4 INVITE\r\n\
             Contact: <sip:alice@203.0.113.5>\r\nContent-Length: 0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(d.confirm(&ok), Some(true), "hung up: BYE at once");
        assert_eq!(d.remote_tag.as_deref(), Some("a9"));
        assert_eq!(d.confirm(&ok), None, "a retransmission");
        assert_eq!(d.hang_up(EndReason::Hangup), Hangup::Bye);
        assert_eq!(d.end_cause(EndCause::LocalBye), EndCause::LocalBye);
    }

    #[test]
    fn an_unacknowledged_answer_ends_as_an_ack_timeout_whatever_answers_the_bye() {
        let t0 = Instant::now();
        let mut d = uas();
        assert!(!d.ack_received(), "nothing to acknowledge yet");
        d.answer().unwrap();
        assert_eq!(d.answer(), Err("answering an answered call"));
        assert!(d.arm_session_timer(t0).is_some());
        assert_eq!(d.hang_up(EndReason::AckTimeout), Hangup::Bye);
        assert_eq!(d.session_expires(), None, "the BYE ends the session timer");
        assert_eq!(d.end_cause(EndCause::RemoteBye), EndCause::AckTimeout);
        assert_eq!(d.hang_up(EndReason::Hangup), Hangup::Wait);
        assert!(!d.ack_received());
    }

    #[test]
    fn a_491_retry_lives_only_while_the_session_is_up() {
        let t0 = Instant::now();
        let mut d = uas();
        assert!(!d.schedule_reinvite_retry(t0, b"v=0".to_vec()), "no session yet");
        d.answer().unwrap();
        assert!(d.ack_received());
        assert!(d.schedule_reinvite_retry(t0, b"v=0".to_vec()));
        assert_eq!(d.reinvite_retry_at(), Some(t0));
        assert_eq!(d.take_reinvite_retry(t0 + Duration::from_secs(1)), None, "not this one");
        assert_eq!(d.take_reinvite_retry(t0), Some(b"v=0".to_vec()));
        assert_eq!(d.reinvite_retry_at(), None);
    }
}
