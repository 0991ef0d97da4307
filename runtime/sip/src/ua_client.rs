//! The UAC half of the user agent core: outbound calls (RFC 3261 §13.2, §12.1.2), CANCEL
//! (§9.1), our re-INVITEs with glare handling (§14.1), and answers to digest challenges on any
//! request we send (§22.2, §22.3).

use std::cmp::Reverse;
use std::time::{Duration, Instant};

use rsip::headers::{ToTypedHeader, UntypedHeader};
use rsip::prelude::HeadersExt;
use rsip::{Header, Method};

use super::{
    ALLOW, AfterProvisional, CallRef, ClientTx, Dialog, DialogState, EndCause, MayCancel, Purpose, Role, TxOwner,
    UaError, UaEvent, UserAgent, via_transport,
};
use crate::auth::{AuthKind, DigestClient, DigestRequest};
use crate::transaction::{Peer, TransactionId, Transport};

/// An outbound call to place with [`UserAgent::dial`].
#[derive(Debug)]
pub struct Dial {
    /// The next hop to send the INVITE to (the shell resolves the target or the trunk's
    /// outbound proxy; this crate does no DNS).
    pub peer: Peer,
    /// The Request-URI.
    pub target: rsip::Uri,
    /// The From header value without a tag, e.g. `"Support" <sip:+15550100@trunk.example>`.
    pub from: String,
    /// The To header value; `<target>` when `None`.
    pub to: Option<String>,
    /// The SDP offer.
    pub sdp: Vec<u8>,
    /// Credentials for 401/407 challenges on this call's requests (INVITE, re-INVITE, BYE,
    /// REFER); without them a challenge fails the request.
    pub credentials: Option<DigestClient>,
    /// Extra headers for the INVITE (P-Asserted-Identity, Privacy, X-headers).
    pub headers: Vec<Header>,
}

/// Tries for one request before a challenge counts as a refusal: the first answer, plus one
/// more for a `stale` nonce or a second realm (proxy then UAS).
const MAX_AUTH_ROUNDS: u8 = 3;

impl UserAgent {
    /// Places an outbound call: sends the INVITE and returns the call. What happens next
    /// arrives as [`UaEvent::Progress`], [`UaEvent::Answered`] (the 2xx is acknowledged by the
    /// core) or [`UaEvent::Ended`] with [`EndCause::Failed`] (or `Cancelled` after
    /// [`UserAgent::hangup`]).
    pub fn dial(&mut self, now: Instant, dial: Dial) -> CallRef {
        let local_tag = self.unique();
        let call_id = format!("{}@{}", self.unique(), self.config.contact_host);
        let local_uri = format!("{};tag={local_tag}", dial.from);
        let remote_uri = dial.to.unwrap_or_else(|| format!("<{}>", dial.target));
        let mut headers = vec![
            self.new_via(dial.peer.transport),
            Header::MaxForwards(70u32.into()),
            Header::From(local_uri.clone().into()),
            Header::To(remote_uri.clone().into()),
            Header::CallId(call_id.clone().into()),
            Header::CSeq("1 INVITE".into()),
            self.contact(dial.peer.transport),
            Header::Allow(ALLOW.into()),
            Header::UserAgent(self.config.user_agent.clone().into()),
        ];
        headers.extend(dial.headers);
        if !dial.sdp.is_empty() {
            headers.push(Header::ContentType("application/sdp".into()));
        }
        headers.push(Header::ContentLength((dial.sdp.len() as u32).into()));
        let invite = rsip::Request {
            method: Method::Invite,
            uri: dial.target.clone(),
            version: rsip::Version::V2,
            headers: headers.into(),
            body: dial.sdp.clone(),
        };
        self.counter += 1;
        let call = CallRef(self.counter);
        match self.send_client(now, TxOwner::Call(call, Purpose::Invite), dial.peer, invite.clone(), 0) {
            Some(tx) => {
                self.dialogs.insert((call_id, local_tag.clone()), call);
                self.calls.insert(call, Dialog::outgoing(dial.peer, invite, tx, local_tag, dial.credentials));
            }
            None => self.emit(UaEvent::Ended { call, cause: EndCause::Failed(500) }),
        }
        self.pump(now);
        call
    }

    /// Sends a re-INVITE with a new offer (hold: `a=sendonly`, resume, codec change). The
    /// outcome arrives as [`UaEvent::ReInviteAnswered`]; on 491 (glare) it is sent again after
    /// the wait of §14.1 without bothering the application.
    pub fn reinvite(&mut self, now: Instant, call: CallRef, sdp: Vec<u8>) -> Result<(), UaError> {
        let c = self.calls.get(&call).ok_or(UaError::UnknownCall(call))?;
        if !matches!(c.state(), DialogState::Confirmed { .. }) {
            return Err(UaError::WrongState(call, "re-INVITE needs a confirmed dialog"));
        }
        // §14.1: no new INVITE while one is in progress in either direction.
        if c.reinvite_tx.is_some() || c.pending_reinvite.is_some() || c.reinvite_retry_at().is_some() {
            return Err(UaError::WrongState(call, "another re-INVITE is in progress"));
        }
        self.send_reinvite(now, call, sdp);
        self.pump(now);
        Ok(())
    }

    fn send_reinvite(&mut self, now: Instant, call: CallRef, sdp: Vec<u8>) {
        let Some(c) = self.calls.get_mut(&call) else { return };
        let (cseq, transport) = (c.next_local_cseq(), c.peer.transport);
        let Some((peer, mut request)) = self.in_dialog_request(call, Method::Invite, cseq) else { return };
        let mut headers: Vec<Header> =
            request.headers.iter().filter(|h| !matches!(h, Header::ContentLength(_))).cloned().collect();
        headers.push(self.contact(transport));
        headers.push(Header::Allow(ALLOW.into()));
        headers.push(Header::ContentType("application/sdp".into()));
        headers.push(Header::ContentLength((sdp.len() as u32).into()));
        request.headers = headers.into();
        request.body = sdp;
        self.add_credentials(TxOwner::Call(call, Purpose::ReInvite), &mut request);
        let tx = self.send_client(now, TxOwner::Call(call, Purpose::ReInvite), peer, request, 0);
        if let Some(c) = self.calls.get_mut(&call) {
            c.reinvite_tx = tx;
        }
    }

    /// The 491 wait is over: send the re-INVITE again (§14.1), unless the peer's re-INVITE
    /// now runs, in which case the application hears of the glare and decides.
    pub(super) fn retry_reinvite(&mut self, now: Instant, call: CallRef, at: Instant) {
        let Some(c) = self.calls.get_mut(&call) else { return };
        let Some(sdp) = c.take_reinvite_retry(at) else { return };
        if c.pending_reinvite.is_some() {
            self.emit(UaEvent::ReInviteAnswered { call, result: Err(491) });
            return;
        }
        self.send_reinvite(now, call, sdp);
    }

    /// The wait for the 487 after our CANCEL is over (§9.1): the call ends as cancelled.
    pub(super) fn cancel_timeout(&mut self, call: CallRef, at: Instant) {
        if self.calls.get(&call).is_some_and(|c| c.cancel_deadline() == Some(at)) {
            self.finish(call, EndCause::Cancelled);
        }
    }

    /// Sends CANCEL for an outbound call's INVITE, with the dialog's leave: it only gives one
    /// once a provisional response has arrived (§9.1: earlier it could overtake the INVITE).
    pub(super) fn send_cancel(&mut self, now: Instant, call: CallRef, leave: MayCancel) {
        // §9.1: if no final response to the INVITE arrives within 64·T1 of the CANCEL, the
        // INVITE transaction is considered over (the peer lost track of it).
        let deadline = now + self.config.timers.t1_x64();
        let Some(c) = self.calls.get_mut(&call) else { return };
        if !c.cancel(leave, deadline) {
            return;
        }
        self.retry_deadlines.push(Reverse((deadline, call)));
        let (peer, cancel) = (c.peer, c.cancel_request(&self.config.user_agent));
        self.send_client(now, TxOwner::Call(call, Purpose::Cancel), peer, cancel, 0);
    }

    /// A response to one of our client transactions.
    pub(super) fn on_response(&mut self, now: Instant, id: TransactionId, response: rsip::Response) {
        let Some(tx) = self.client_txs.get(&id) else { return };
        let owner = tx.owner;
        let status = response.status_code.code();
        if matches!(status, 401 | 407) && self.retry_with_credentials(now, id, &response) {
            return;
        }
        let (call, purpose) = match owner {
            TxOwner::Call(call, purpose) => (call, purpose),
            TxOwner::Registration(reg) => return self.on_register_response(now, id, reg, &response),
            TxOwner::Ping(ping) => return self.on_ping_response(id, ping, status),
        };
        match purpose {
            Purpose::Invite => self.on_invite_response(now, id, call, response),
            Purpose::ReInvite => self.on_reinvite_response(now, id, call, response),
            Purpose::Bye if status >= 200 => {
                self.client_txs.remove(&id);
                self.finish(call, EndCause::LocalBye);
            }
            Purpose::Refer if status >= 200 => {
                self.client_txs.remove(&id);
                if let Some(c) = self.calls.get_mut(&call) {
                    c.refer_tx = None;
                }
                // 2xx: accepted, progress follows in NOTIFYs (RFC 3515 §2.4.4).
                if status >= 300 {
                    self.emit(UaEvent::Transfer { call, status, final_: true });
                }
            }
            // The INVITE's 487 ends a cancelled call; a BYE for a stray fork needs no answer.
            Purpose::Bye | Purpose::Refer | Purpose::Cancel | Purpose::Release => {}
        }
    }

    /// A client transaction timed out (timer B or F): as if a 408 had arrived (§8.1.3.1).
    pub(super) fn on_client_timeout(&mut self, now: Instant, id: TransactionId) {
        let Some(tx) = self.client_txs.remove(&id) else { return };
        let (call, purpose) = match tx.owner {
            TxOwner::Call(call, purpose) => (call, purpose),
            TxOwner::Registration(reg) => return self.on_register_timeout(now, id, reg),
            TxOwner::Ping(ping) => return self.on_ping_timeout(ping),
        };
        match purpose {
            Purpose::Invite => {
                let (ours, cancelled) =
                    self.calls.get(&call).map_or((false, false), |c| (c.invite_tx == id, c.is_cancelled()));
                if ours {
                    self.finish(call, if cancelled { EndCause::Cancelled } else { EndCause::Failed(408) });
                }
            }
            Purpose::ReInvite => {
                if let Some(c) = self.calls.get_mut(&call) {
                    c.reinvite_tx = None;
                }
                self.emit(UaEvent::ReInviteAnswered { call, result: Err(408) });
                // §12.2.1.2: a 408 to a request within a dialog ends the dialog.
                let _ = self.hangup(now, call);
            }
            Purpose::Bye => self.finish(call, EndCause::LocalBye),
            Purpose::Refer => {
                if let Some(c) = self.calls.get_mut(&call) {
                    c.refer_tx = None;
                }
                self.emit(UaEvent::Transfer { call, status: 408, final_: true });
            }
            Purpose::Cancel | Purpose::Release => {}
        }
    }

    fn on_invite_response(&mut self, now: Instant, id: TransactionId, call: CallRef, response: rsip::Response) {
        let status = response.status_code.code();
        let to_tag = response.to_header().ok().and_then(|t| t.tag().ok().flatten()).map(|t| t.to_string());
        let Some(c) = self.calls.get_mut(&call) else {
            // The call is over but its INVITE transaction still takes 2xx retransmissions.
            self.resend_ack(id, &response);
            return;
        };
        if c.invite_tx != id {
            return;
        }
        if status < 200 {
            if !c.is_calling() {
                return;
            }
            if status > 100 && to_tag.is_some() && c.remote_tag.is_none() {
                // §12.1.2: a provisional response with a To tag makes an early dialog.
                c.adopt(&response);
            }
            match c.provisional() {
                AfterProvisional::Cancel(leave) => self.send_cancel(now, call, leave),
                AfterProvisional::Report if status > 100 => {
                    let sdp = (!response.body.is_empty()).then(|| response.body.clone());
                    self.emit(UaEvent::Progress { call, status, sdp });
                }
                AfterProvisional::Report | AfterProvisional::Ignore => {}
            }
            return;
        }
        if status >= 300 {
            if c.is_calling() {
                let cause = if c.is_cancelled() { EndCause::Cancelled } else { EndCause::Failed(status) };
                self.finish(call, cause);
            }
            return;
        }
        // 2xx.
        let same_dialog = c.is_calling() || to_tag.is_some_and(|tag| c.remote_tag.as_deref() == Some(tag.as_str()));
        if !same_dialog {
            // §13.2.2.4: a 2xx from another fork: acknowledge it, then release it with BYE.
            self.release_fork(now, id, &response);
            return;
        }
        let Some(hung_up) = c.confirm(&response) else {
            // A retransmission: the ACK is re-sent, nothing else happens (§13.2.2.4).
            self.resend_ack(id, &response);
            return;
        };
        let cseq = response.cseq_header().ok().and_then(|h| h.typed().ok()).map_or(1, |c| c.seq);
        self.send_ack(id, call, cseq);
        if hung_up {
            // The CANCEL crossed the 2xx (§9.1, §15): the call is up, so end it with BYE.
            let _ = self.hangup(now, call);
        } else {
            self.emit(UaEvent::Answered { call, sdp: response.body });
        }
    }

    fn on_reinvite_response(&mut self, now: Instant, id: TransactionId, call: CallRef, response: rsip::Response) {
        let status = response.status_code.code();
        if status < 200 {
            return;
        }
        let Some(c) = self.calls.get_mut(&call) else {
            self.resend_ack(id, &response);
            return;
        };
        if c.reinvite_tx != Some(id) {
            if status < 300 {
                self.resend_ack(id, &response);
            }
            return;
        }
        c.reinvite_tx = None;
        let role = c.role();
        let offer = self.client_txs.get(&id).map(|tx| tx.request.body.clone()).unwrap_or_default();
        let dice = self.random();
        let Some(c) = self.calls.get_mut(&call) else { return };
        match status {
            200..=299 => {
                // §12.2.1.2: a 2xx to a target refresh request updates the remote target.
                if let Some(contact) = response.contact_header().ok().and_then(|h| h.typed().ok()) {
                    c.remote_target = contact.uri;
                }
                c.local_sdp = Some(offer);
                let cseq = response.cseq_header().ok().and_then(|h| h.typed().ok()).map_or(1, |c| c.seq);
                self.send_ack(id, call, cseq);
                self.emit(UaEvent::ReInviteAnswered { call, result: Ok(response.body) });
            }
            491 => {
                // §14.1: the owner of the Call-ID (the UAC of the dialog) waits 2.1–4 s, the
                // other side 0–2 s, in units of 10 ms, then tries again.
                let (base, ticks) = if role == Role::Uac { (2_100, dice % 191) } else { (0, dice % 201) };
                let at = now + Duration::from_millis(base + ticks * 10);
                if c.schedule_reinvite_retry(at, offer) {
                    self.retry_deadlines.push(Reverse((at, call)));
                }
            }
            _ => {
                self.emit(UaEvent::ReInviteAnswered { call, result: Err(status) });
                if matches!(status, 408 | 481) {
                    // §12.2.1.2: the dialog is gone on the other side.
                    let _ = self.hangup(now, call);
                }
            }
        }
    }

    /// Sends the ACK for a 2xx (§13.2.2.4): a request of its own, in the dialog, with the
    /// INVITE's CSeq number and its credentials (§22.1), kept for retransmitted 2xx.
    fn send_ack(&mut self, id: TransactionId, call: CallRef, cseq: u32) {
        let Some((peer, mut ack)) = self.in_dialog_request(call, Method::Ack, cseq) else { return };
        if let Some(tx) = self.client_txs.get(&id) {
            let credentials: Vec<Header> = tx
                .request
                .headers
                .iter()
                .filter(|h| matches!(h, Header::Authorization(_) | Header::ProxyAuthorization(_)))
                .cloned()
                .collect();
            if !credentials.is_empty() {
                let mut headers: Vec<Header> =
                    ack.headers.iter().filter(|h| !matches!(h, Header::ContentLength(_))).cloned().collect();
                headers.extend(credentials);
                headers.push(Header::ContentLength(0u32.into()));
                ack.headers = headers.into();
            }
        }
        if let Some(tx) = self.client_txs.get_mut(&id) {
            tx.ack = Some(ack.clone());
        }
        self.layer.send_stateless(peer, ack);
    }

    fn resend_ack(&mut self, id: TransactionId, response: &rsip::Response) {
        if !(200..300).contains(&response.status_code.code()) {
            return;
        }
        if let Some(ClientTx { peer, ack: Some(ack), .. }) = self.client_txs.get(&id) {
            let (peer, ack) = (*peer, ack.clone());
            self.layer.send_stateless(peer, ack);
        }
    }

    /// A 2xx from a second fork of our INVITE: ACK and BYE it without keeping a call
    /// (§13.2.2.4 allows keeping several dialogs; one call keeps one).
    fn release_fork(&mut self, now: Instant, id: TransactionId, response: &rsip::Response) {
        let Some(ClientTx { owner: TxOwner::Call(call, _), peer, .. }) = self.client_txs.get(&id) else { return };
        let (peer, call) = (*peer, *call);
        let target = response.contact_header().ok().and_then(|h| h.typed().ok()).map(|c| c.uri);
        let Some(target) = target else { return };
        let cseq = response.cseq_header().ok().and_then(|h| h.typed().ok()).map_or(1, |c| c.seq);
        let mut routes: Vec<Header> = response
            .headers
            .iter()
            .filter_map(|h| match h {
                Header::RecordRoute(rr) => Some(Header::Route(rr.value().to_owned().into())),
                _ => None,
            })
            .collect();
        routes.reverse();
        for (method, seq) in [(Method::Ack, cseq), (Method::Bye, cseq + 1)] {
            let mut headers = vec![self.new_via(peer.transport), Header::MaxForwards(70u32.into())];
            headers.extend(response.headers.iter().filter(|h| matches!(h, Header::From(_) | Header::To(_))).cloned());
            headers.extend(response.headers.iter().filter(|h| matches!(h, Header::CallId(_))).cloned());
            headers.push(Header::CSeq(format!("{seq} {method}").into()));
            headers.extend(routes.iter().cloned());
            headers.push(Header::ContentLength(0u32.into()));
            let request = rsip::Request {
                method,
                uri: target.clone(),
                version: rsip::Version::V2,
                headers: headers.into(),
                body: Vec::new(),
            };
            if method == Method::Ack {
                self.layer.send_stateless(peer, request);
            } else {
                self.send_client(now, TxOwner::Call(call, Purpose::Release), peer, request, 0);
            }
        }
    }

    /// Answers a 401/407 to one of our requests, a call's or a REGISTER (never a ping's), by
    /// sending it again with credentials (§22.2): a new branch, the CSeq incremented. Returns
    /// false when it cannot (no credentials, a refusal of the credentials we sent, too many
    /// rounds), leaving the response to be handled as a failure.
    fn retry_with_credentials(&mut self, now: Instant, id: TransactionId, response: &rsip::Response) -> bool {
        let Some(tx) = self.client_txs.get(&id) else { return false };
        let (owner, peer, rounds) = (tx.owner, tx.peer, tx.auth_rounds);
        if rounds >= MAX_AUTH_ROUNDS {
            return false;
        }
        let mut request = tx.request.clone();
        let live = match owner {
            TxOwner::Call(_, Purpose::Cancel | Purpose::Release) => false,
            // A hung-up call is not re-sent after a challenge: the challenge ends it (as Cancelled).
            TxOwner::Call(call, Purpose::Invite) => {
                self.calls.get(&call).is_some_and(|c| c.invite_tx == id && !c.is_cancelled())
            }
            TxOwner::Call(call, _) => self.calls.contains_key(&call),
            // §10.2: only the REGISTER in flight is answered; an older one's challenge is moot.
            TxOwner::Registration(reg) => self.registrations.get(&reg).is_some_and(|r| r.pending == Some(id)),
            // A challenge already proves the carrier is reachable, which is all a ping asks.
            TxOwner::Ping(_) => false,
        };
        if !live {
            return false;
        }
        let kind = if response.status_code.code() == 401 { AuthKind::Www } else { AuthKind::Proxy };
        let challenges: Vec<&str> = response
            .headers
            .iter()
            .filter_map(|h| match (kind, h) {
                (AuthKind::Www, Header::WwwAuthenticate(v)) => Some(v.value()),
                (AuthKind::Proxy, Header::ProxyAuthenticate(v)) => Some(v.value()),
                _ => None,
            })
            .collect();
        let previous: Vec<String> = credentials_of(&request, kind).map(str::to_owned).collect();
        let previous: Vec<&str> = previous.iter().map(String::as_str).collect();
        let cnonce = format!("{:016x}{:016x}", self.random(), self.random());
        let Some(digest) = self.digest_mut(owner) else { return false };
        let method = request.method.to_string();
        let uri = request.uri.to_string();
        let header = match digest.respond(
            kind,
            &challenges,
            &DigestRequest::new(&method, &uri, &request.body),
            &previous,
            &cnonce,
        ) {
            Ok(header) => header,
            Err(_) => return false,
        };
        let Some(cseq) = self.next_cseq(owner) else { return false };
        let via = self.new_via(peer.transport);
        let mut headers: Vec<Header> = Vec::with_capacity(16);
        let mut via_replaced = false;
        for h in request.headers.iter() {
            match h {
                Header::Via(_) if !via_replaced => {
                    via_replaced = true;
                    headers.push(via.clone());
                }
                Header::CSeq(_) => headers.push(Header::CSeq(format!("{cseq} {method}").into())),
                Header::Authorization(_) if kind == AuthKind::Www => {}
                Header::ProxyAuthorization(_) if kind == AuthKind::Proxy => {}
                Header::ContentLength(_) => {}
                other => headers.push(other.clone()),
            }
        }
        headers.push(credentials_header(kind, header.value));
        headers.push(Header::ContentLength((request.body.len() as u32).into()));
        request.headers = headers.into();
        self.client_txs.remove(&id);
        let new_tx = self.send_client(now, owner, peer, request.clone(), rounds + 1);
        match owner {
            TxOwner::Call(call, purpose) => {
                if let Some(c) = self.calls.get_mut(&call) {
                    match purpose {
                        Purpose::Invite => {
                            if let Some(tx) = new_tx {
                                c.reinvited_with_credentials(request, tx);
                            }
                        }
                        Purpose::ReInvite => c.reinvite_tx = new_tx,
                        Purpose::Refer => c.refer_tx = new_tx,
                        Purpose::Bye | Purpose::Cancel | Purpose::Release => {}
                    }
                }
            }
            TxOwner::Registration(reg) => {
                if let Some(r) = self.registrations.get_mut(&reg) {
                    r.pending = new_tx;
                }
            }
            TxOwner::Ping(_) => {}
        }
        new_tx.is_some()
    }

    /// The credentials that answer challenges to this owner's requests.
    fn digest_mut(&mut self, owner: TxOwner) -> Option<&mut DigestClient> {
        match owner {
            TxOwner::Call(call, _) => self.calls.get_mut(&call)?.digest.as_mut(),
            TxOwner::Registration(reg) => self.registrations.get_mut(&reg)?.credentials.as_mut(),
            TxOwner::Ping(_) => None,
        }
    }

    /// The next CSeq number of this owner's requests: the dialog's (§12.2.1.1) or the
    /// registration's (§10.2: one more for every REGISTER with the same Call-ID).
    pub(super) fn next_cseq(&mut self, owner: TxOwner) -> Option<u32> {
        match owner {
            TxOwner::Call(call, _) => Some(self.calls.get_mut(&call)?.next_local_cseq()),
            TxOwner::Registration(reg) => {
                let r = self.registrations.get_mut(&reg)?;
                r.cseq += 1;
                Some(r.cseq)
            }
            // Every ping is a new Call-ID with CSeq 1; none sends a second request.
            TxOwner::Ping(_) => None,
        }
    }

    /// Adds credentials for challenges this owner has answered before (§22.3), so in-dialog
    /// requests and REGISTER refreshes to a trunk are not challenged again.
    pub(super) fn add_credentials(&mut self, owner: TxOwner, request: &mut rsip::Request) {
        let cnonce = format!("{:016x}{:016x}", self.random(), self.random());
        let Some(digest) = self.digest_mut(owner) else { return };
        let method = request.method.to_string();
        let uri = request.uri.to_string();
        let found = digest.authorize(&DigestRequest::new(&method, &uri, &request.body), &cnonce);
        if found.is_empty() {
            return;
        }
        let mut headers: Vec<Header> =
            request.headers.iter().filter(|h| !matches!(h, Header::ContentLength(_))).cloned().collect();
        headers.extend(found.into_iter().map(|c| credentials_header(c.kind, c.value)));
        headers.push(Header::ContentLength((request.body.len() as u32).into()));
        request.headers = headers.into();
    }

    /// A fresh top Via for a request we send (§8.1.1.7), asking for `rport` (RFC 3581).
    pub(super) fn new_via(&mut self, transport: Transport) -> Header {
        let branch = format!("z9hG4bK{}", self.unique());
        Header::Via(
            format!("SIP/2.0/{} {};branch={branch};rport", via_transport(transport), self.host_for(transport)).into(),
        )
    }

    fn contact(&self, transport: Transport) -> Header {
        Header::Contact(format!("<{}>", self.contact_uri(None, transport)).into())
    }

    /// Our Contact URI (§8.1.1.8) over `transport`, with `user` for a registered binding
    /// (§10.2.1) so that requests the registrar routes to us name the account.
    ///
    /// Over TLS it is a `sips:` URI (§8.1.1.8: a request sent over TLS to a `sips:` target must
    /// carry one; `sips:` itself says TLS, so no `transport` parameter).
    pub(super) fn contact_uri(&self, user: Option<&str>, transport: Transport) -> String {
        let (scheme, param) = match transport {
            Transport::Udp => ("sip", ""),
            Transport::Tcp => ("sip", ";transport=tcp"),
            Transport::Tls => ("sips", ""),
        };
        let user = user.map(|u| format!("{u}@")).unwrap_or_default();
        format!("{scheme}:{user}{}{param}", self.host_for(transport))
    }
}

fn credentials_of(request: &rsip::Request, kind: AuthKind) -> impl Iterator<Item = &str> {
    request.headers.iter().filter_map(move |h| match (kind, h) {
        (AuthKind::Www, Header::Authorization(v)) => Some(v.value()),
        (AuthKind::Proxy, Header::ProxyAuthorization(v)) => Some(v.value()),
        _ => None,
    })
}

fn credentials_header(kind: AuthKind, value: String) -> Header {
    match kind {
        AuthKind::Www => Header::Authorization(value.into()),
        AuthKind::Proxy => Header::ProxyAuthorization(value.into()),
    }
}

#[cfg(test)]
#[path = "ua_client_tests.rs"]
mod tests;
