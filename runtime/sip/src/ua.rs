//! The user agent core (RFC 3261 §8.2, §12, §13.3, §15), sans-IO: the part of an endpoint
//! above the transactions that answers OPTIONS, turns INVITEs into calls, keeps each call's
//! dialog (tags, route set, remote target, CSeq numbers) and ends calls with BYE or CANCEL.
//!
//! Driven like the transaction layer: feed it messages and time, drain [`UaOutput`]s. Each
//! call is one dialog (`dialog.rs`) whose life, inbound or outbound, is one state machine.
//!
//! **Scope:** UAS calls (inbound INVITE → ring/answer/reject, ACK, BYE both ways, CANCEL with
//! 487, 482 for merged requests, in-dialog OPTIONS/INFO, 481 for unknown dialogs, re-INVITEs
//! handed to the application for a new SDP answer (hold/resume), 500 for an overlapping
//! re-INVITE). UAC calls ([`UserAgent::dial`], in `ua_client.rs`): early and confirmed dialogs,
//! the ACK for every 2xx, CANCEL only after a provisional response (§9.1) and the CANCEL/200
//! race (ACK, then BYE), digest challenges (401/407) answered on INVITE, re-INVITE, BYE and
//! REFER with credentials reused preemptively. Re-INVITEs we send ([`UserAgent::reinvite`])
//! with 491 glare handling (§14.1/§14.2). Blind transfer: REFER with Refer-To, progress from the
//! NOTIFY sipfrag (RFC 3515). Registration with a registrar ([`UserAgent::register`], in
//! `ua_register.rs`, RFC 3261 §10.2): refreshes, digest answers, 423 and back-off, tracked as
//! one [`RegistrationState`] per registration. Out-of-dialog OPTIONS pings for trunk
//! keep-alives ([`UserAgent::ping`], in `ua_ping.rs`, RFC 3261 §11).
//! **Not yet:** receiving REFER (405), forked early dialogs beyond the first (later 2xx from
//! other forks are acknowledged and released with BYE), PRACK (RFC 3262).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use rsip::headers::{ToTypedHeader, UntypedHeader};
use rsip::prelude::HeadersExt;
use rsip::{Header, Method, SipMessage};

use crate::transaction::{Event, Output, Peer, TimerConfig, TransactionId, TransactionLayer, Transport};

/// Methods this user agent handles (for Allow, RFC 3261 §20.5).
pub const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, NOTIFY";

/// Option tags we support (RFC 3261 §20.37): session timers (RFC 4028).
pub const SUPPORTED: &str = "timer";

/// Smallest session interval we accept (RFC 4028 §5: at least 90 s).
pub const MIN_SE: u32 = 90;

/// Longest session interval we keep; a caller asking for more gets this (we answer with it).
pub const MAX_SE: u32 = 86_400;

/// Identifies a call within one [`UserAgent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallRef(pub u64);

/// Static settings of a user agent.
#[derive(Debug, Clone)]
pub struct UaConfig {
    /// `host:port` for Contact and Via (the external address when behind NAT).
    pub contact_host: String,
    /// Sent as User-Agent / Server.
    pub user_agent: String,
    /// Transaction timers.
    pub timers: TimerConfig,
    /// The key of the agent's CSPRNG, which makes its tags, branches, Call-IDs, cnonces and
    /// back-off: the shell draws it from the OS (this crate reads no randomness of its own, so
    /// that tests can fix it and stay deterministic).
    pub rng_key: RngKey,
}

/// The 256-bit key of a [`UserAgent`]'s CSPRNG (ChaCha20, RFC 8439 §2.3 as a stream cipher
/// keyed once): every identifier a peer sees comes from its output, so no identifier tells
/// anything about another (RFC 3261 §19.3 asks tags and Call-IDs to be cryptographically
/// random; a seed plus a counter is guessable from one sample). Wiped on drop, never printed.
#[derive(Clone, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub struct RngKey(pub [u8; 32]);

impl std::fmt::Debug for RngKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RngKey(..)")
    }
}

impl RngKey {
    /// A fixed key for tests and benchmarks (deterministic runs), never for a live agent.
    pub fn fixed(seed: u64) -> Self {
        let mut key = [0u8; 32];
        for (i, chunk) in key.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_le_bytes());
        }
        Self(key)
    }
}

/// The agent's CSPRNG; its state is never printed.
struct Csprng(rand_chacha::ChaCha20Rng);

impl std::fmt::Debug for Csprng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Csprng(..)")
    }
}

/// Why a call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndCause {
    /// The peer sent BYE.
    RemoteBye,
    /// The call was cancelled before it was answered: by the caller on an inbound call (487
    /// sent), by us on an outbound one (487 received).
    Cancelled,
    /// We sent BYE (and it completed or timed out).
    LocalBye,
    /// We rejected the call with this status.
    Rejected(u16),
    /// An outbound call failed with this final status (408 when nothing answered in time).
    Failed(u16),
    /// Our 2xx was never acknowledged (§13.3.1.4); a BYE was sent.
    AckTimeout,
    /// The peer, the session refresher, did not refresh the session in time (RFC 4028 §10);
    /// a BYE was sent.
    SessionExpired,
}

/// What the user agent tells the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UaEvent {
    /// A new call; the application must ring, answer or reject it.
    IncomingCall {
        /// The call.
        call: CallRef,
        /// Where the INVITE came from.
        peer: Peer,
        /// The INVITE.
        request: Box<rsip::Request>,
    },
    /// An outbound call made progress: a provisional response above 100 (180 Ringing, 183
    /// Session Progress), with its SDP answer when it brings early media.
    Progress {
        /// The call.
        call: CallRef,
        /// SIP status code.
        status: u16,
        /// The SDP answer in the provisional response, if any.
        sdp: Option<Vec<u8>>,
    },
    /// An outbound call was answered (2xx, already acknowledged): `sdp` is the answer to our
    /// offer.
    Answered {
        /// The call.
        call: CallRef,
        /// The SDP answer.
        sdp: Vec<u8>,
    },
    /// How our re-INVITE ([`UserAgent::reinvite`]) ended: the peer's SDP answer, or the final
    /// status when it was refused (the session stays as it was, RFC 3261 §14.1). A 491 is not
    /// reported: the re-INVITE is retried after the random wait of §14.1.
    ReInviteAnswered {
        /// The call.
        call: CallRef,
        /// The answer or the refusal.
        result: Result<Vec<u8>, u16>,
    },
    /// The ACK for our 2xx arrived: media may flow both ways.
    Confirmed {
        /// The call.
        call: CallRef,
    },
    /// A re-INVITE arrived (hold, resume, media change, refresh). The application answers it
    /// with [`UserAgent::answer_reinvite`]; `offer` is empty when the peer asks us to offer.
    ReInvite {
        /// The call.
        call: CallRef,
        /// The SDP offer in the re-INVITE (may be empty).
        offer: Vec<u8>,
    },
    /// How a transfer we asked for with REFER is going (RFC 3515): `status` is the peer's answer
    /// to the REFER when it fails (≥ 300), or the status line of a NOTIFY's `message/sipfrag`
    /// body (the transfer target's response). `final_` is set when no more news will come.
    Transfer {
        /// The call.
        call: CallRef,
        /// SIP status code.
        status: u16,
        /// Whether this is the last report.
        final_: bool,
    },
    /// A DTMF digit signalled with SIP INFO (`application/dtmf-relay` or `application/dtmf`).
    InfoDtmf {
        /// The call.
        call: CallRef,
        /// The key.
        digit: char,
        /// Duration in ms (160 when the body gives none).
        duration_ms: u32,
    },
    /// The call is over; the application releases everything it holds for it.
    Ended {
        /// The call.
        call: CallRef,
        /// Why.
        cause: EndCause,
    },
    /// A registration ([`UserAgent::register`]) changed state; [`RegistrationState::Unregistered`]
    /// is its last report.
    Registration {
        /// The registration.
        reg: RegRef,
        /// Its new state.
        state: RegistrationState,
    },
    /// A ping ([`UserAgent::ping`]) ended: `status` is the final response's code (any code,
    /// 401/407 and 404 included, shows the peer is there), `None` when nothing answered within
    /// 64·T1 (timer F, RFC 3261 §17.1.2.2).
    PingAnswered {
        /// The ping.
        ping: PingRef,
        /// The final status, or `None` on timeout.
        status: Option<u16>,
    },
}

/// What the user agent wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UaOutput {
    /// Send a message.
    Transmit {
        /// Destination.
        peer: Peer,
        /// Message.
        message: SipMessage,
    },
    /// Tell the application.
    Event(UaEvent),
}

/// Why the application's request could not be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UaError {
    /// The call is unknown or already over.
    #[error("no call {0:?}")]
    UnknownCall(CallRef),
    /// The call is in a state where this is not possible (answering twice, ringing after answer).
    #[error("call {0:?} cannot do that now: {1}")]
    WrongState(CallRef, &'static str),
    /// The registration is unknown or already over.
    #[error("no registration {0:?}")]
    UnknownRegistration(RegRef),
}

/// Why we run a client transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Invite,
    ReInvite,
    Bye,
    Refer,
    Cancel,
    /// A BYE for a forked 2xx we do not keep; its answer does not matter.
    Release,
}

/// Who a client transaction works for, which decides where its answer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxOwner {
    /// One of a call's requests, and which one.
    Call(CallRef, Purpose),
    /// A REGISTER of this registration (RFC 3261 §10.2).
    Registration(RegRef),
    /// An out-of-dialog OPTIONS ping (RFC 3261 §11), in `ua_ping.rs`.
    Ping(PingRef),
}

/// One of our client transactions and what to do with its answer.
#[derive(Debug)]
struct ClientTx {
    owner: TxOwner,
    peer: Peer,
    request: rsip::Request,
    /// Digest challenges answered for this request so far (a second refusal ends the retries).
    auth_rounds: u8,
    /// The ACK sent for its 2xx (INVITE and re-INVITE), re-sent on 2xx retransmissions.
    ack: Option<rsip::Request>,
}

/// The user agent core. See the module docs.
#[derive(Debug)]
pub struct UserAgent {
    config: UaConfig,
    layer: TransactionLayer,
    calls: HashMap<CallRef, Dialog>,
    /// (Call-ID, local tag) → call, for in-dialog requests.
    dialogs: HashMap<(String, String), CallRef>,
    /// Server transaction of an INVITE → call, for CANCEL and ACK timeouts.
    by_invite_tx: HashMap<TransactionId, CallRef>,
    /// Our client transactions (INVITE, re-INVITE, BYE, REFER, CANCEL, REGISTER, OPTIONS pings).
    client_txs: HashMap<TransactionId, ClientTx>,
    /// (Call-ID, From tag, CSeq) of INVITE server transactions, to spot a request that reached
    /// us twice over different paths (§8.2.2.2, 482 Loop Detected).
    merge_keys: HashMap<(String, String, u32), TransactionId>,
    merge_key_of: HashMap<TransactionId, (String, String, u32)>,
    /// Session-timer deadlines (RFC 4028); stale entries are skipped.
    session_deadlines: BinaryHeap<Reverse<(Instant, CallRef)>>,
    /// Per-call deadlines: re-INVITE retries after 491 (§14.1) and the end of the wait for a
    /// 487 after CANCEL; stale entries are skipped.
    retry_deadlines: BinaryHeap<Reverse<(Instant, CallRef)>>,
    /// Registrations with a registrar (RFC 3261 §10.2), in `ua_register.rs`.
    registrations: HashMap<RegRef, register::Registration>,
    /// When registrations next send a REGISTER (refresh or retry); stale entries are skipped.
    reg_deadlines: BinaryHeap<Reverse<(Instant, RegRef)>>,
    /// Numbers our calls, registrations and pings (local handles, never sent).
    counter: u64,
    /// Tags, branches, Call-IDs, cnonces and back-off come from here.
    rng: Csprng,
    /// Keys the hash behind [`UserAgent::stateless_tag`] (drawn from `rng`).
    tag_key: [u8; 32],
    /// `host:port` we listen on per transport, for Via and Contact of requests we send over
    /// it (`contact_host` for a transport without its own listener).
    listeners: HashMap<Transport, String>,
    outputs: VecDeque<UaOutput>,
    /// See [`UserAgent::foreign_requests`].
    foreign_requests: u64,
    /// See [`UserAgent::set_draining`].
    draining: bool,
}

fn reason_phrase(code: u16) -> rsip::StatusCode {
    rsip::StatusCode::from(code)
}

impl UserAgent {
    /// A user agent with no calls.
    pub fn new(config: UaConfig) -> Self {
        use rand_chacha::rand_core::{RngCore, SeedableRng};
        let mut rng = rand_chacha::ChaCha20Rng::from_seed(config.rng_key.0);
        let mut tag_key = [0u8; 32];
        rng.fill_bytes(&mut tag_key);
        Self {
            rng: Csprng(rng),
            tag_key,
            layer: TransactionLayer::new(config.timers),
            config,
            calls: HashMap::new(),
            dialogs: HashMap::new(),
            by_invite_tx: HashMap::new(),
            client_txs: HashMap::new(),
            merge_keys: HashMap::new(),
            merge_key_of: HashMap::new(),
            session_deadlines: BinaryHeap::new(),
            retry_deadlines: BinaryHeap::new(),
            registrations: HashMap::new(),
            reg_deadlines: BinaryHeap::new(),
            counter: 0,
            listeners: HashMap::new(),
            outputs: VecDeque::new(),
            foreign_requests: 0,
            draining: false,
        }
    }

    /// Calls in progress.
    pub fn calls(&self) -> usize {
        self.calls.len()
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<UaOutput> {
        self.outputs.pop_front()
    }

    /// When [`UserAgent::handle_timeout`] must next run.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let session = loop {
            let Some(Reverse((at, call))) = self.session_deadlines.peek().copied() else { break None };
            if self.calls.get(&call).is_some_and(|c| c.session_expires() == Some(at)) {
                break Some(at);
            }
            self.session_deadlines.pop();
        };
        let retry = loop {
            let Some(Reverse((at, call))) = self.retry_deadlines.peek().copied() else { break None };
            let live = self
                .calls
                .get(&call)
                .is_some_and(|c| c.reinvite_retry_at() == Some(at) || c.cancel_deadline() == Some(at));
            if live {
                break Some(at);
            }
            self.retry_deadlines.pop();
        };
        let register = self.next_register_deadline();
        [self.layer.poll_timeout(), session, retry, register].into_iter().flatten().min()
    }

    /// Fires due timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.layer.handle_timeout(now);
        self.pump(now);
        while let Some(Reverse((at, call))) = self.session_deadlines.peek().copied() {
            if at > now {
                break;
            }
            self.session_deadlines.pop();
            if self.calls.get(&call).is_some_and(|c| c.session_expires() == Some(at)) {
                // RFC 4028 §10: no refresh arrived in time; end the session with BYE.
                let _ = self.end_call(now, call, EndReason::SessionExpired);
            }
        }
        while let Some(Reverse((at, call))) = self.retry_deadlines.peek().copied() {
            if at > now {
                break;
            }
            self.retry_deadlines.pop();
            self.retry_reinvite(now, call, at);
            self.cancel_timeout(call, at);
        }
        self.fire_register_deadlines(now);
        self.pump(now);
    }

    /// (Re)starts a call's session timer at `now` (RFC 4028 §10), if it has one.
    fn arm_session_timer(&mut self, now: Instant, call: CallRef) {
        if let Some(deadline) = self.calls.get_mut(&call).and_then(|c| c.arm_session_timer(now)) {
            self.session_deadlines.push(Reverse((deadline, call)));
        }
    }

    /// Caps the server transactions held at once (see
    /// [`crate::transaction::MAX_SERVER_TRANSACTIONS`]); beyond it requests get a stateless 503.
    pub fn set_max_server_transactions(&mut self, max: usize) {
        self.layer.set_max_server_transactions(max);
    }

    /// While draining, an out-of-dialog OPTIONS (a load balancer's health probe) is answered
    /// `503` with `Retry-After`, so the balancer sends new calls elsewhere; everything in
    /// dialogs goes on. (New INVITEs are the application's to refuse.)
    pub fn set_draining(&mut self, draining: bool) {
        self.draining = draining;
    }

    /// Requests answered 503 so far because the server transactions were at their cap.
    pub fn overloaded(&self) -> u64 {
        self.layer.overloaded()
    }

    /// Live transactions, server and client.
    pub fn transactions(&self) -> usize {
        self.layer.len()
    }

    /// Responses dropped so far because they did not come from where their request went
    /// (RFC 3261 §18.1.2; forged or misdirected).
    pub fn foreign_responses(&self) -> u64 {
        self.layer.foreign_responses()
    }

    /// In-dialog requests (BYE, re-INVITE, INFO, NOTIFY, REFER, UPDATE, ACK) and CANCELs
    /// refused so far because they came from an address that is not the dialog's peer's
    /// (see [`UserAgent::trust_sources`]): forged, or from a carrier edge nobody configured.
    pub fn foreign_requests(&self) -> u64 {
        self.foreign_requests
    }

    /// Lets `sources` send requests in `call`'s dialog besides its peer: a carrier whose edge
    /// has several addresses (a trunk's `source_ips`). Without it, a BYE, re-INVITE, INFO,
    /// NOTIFY or REFER that carries the whole dialog ID but comes from another address is
    /// answered 481 and does not touch the call.
    pub fn trust_sources(&mut self, call: CallRef, sources: &[std::net::IpAddr]) {
        if let Some(c) = self.calls.get_mut(&call) {
            c.also_from = sources.to_vec();
        }
    }

    /// A message arrived (parsed and validated by [`crate::message`]).
    pub fn handle_receive(&mut self, now: Instant, peer: Peer, message: SipMessage) {
        self.layer.handle_receive(now, peer, message);
        self.pump(now);
    }

    /// A fresh identifier for a tag, a branch or a Call-ID: 96 bits from the CSPRNG, as hex.
    fn unique(&mut self) -> String {
        use rand_chacha::rand_core::RngCore;
        format!("{:016x}{:08x}", self.rng.0.next_u64(), self.rng.0.next_u32())
    }

    /// A random number from the CSPRNG (cnonces, the 491 and registration back-off).
    pub(super) fn random(&mut self) -> u64 {
        use rand_chacha::rand_core::RngCore;
        self.rng.0.next_u64()
    }

    /// Moves the transaction layer's outputs up, acting on its events.
    fn pump(&mut self, now: Instant) {
        while let Some(output) = self.layer.poll_output() {
            match output {
                Output::Transmit { peer, message } => self.outputs.push_back(UaOutput::Transmit { peer, message }),
                Output::Event(event) => self.on_event(now, event),
            }
        }
    }

    fn emit(&mut self, event: UaEvent) {
        self.outputs.push_back(UaOutput::Event(event));
    }

    fn on_event(&mut self, now: Instant, event: Event) {
        match event {
            Event::Request { id, peer, request, cancels } => self.on_request(now, id, peer, request, cancels),
            Event::Ack { peer, request } => {
                if let Some(call) = self.dialog_of(&request)
                    && self.sent_by_dialog_peer(call, peer)
                    && self.calls.get_mut(&call).is_some_and(Dialog::ack_received)
                {
                    self.emit(UaEvent::Confirmed { call });
                }
            }
            Event::Response { id, response } => self.on_response(now, id, response),
            Event::Timeout { id } => self.on_client_timeout(now, id),
            Event::AckTimeout { id } => {
                let Some(&call) = self.by_invite_tx.get(&id) else { return };
                if self.calls.get(&call).is_some_and(|c| matches!(c.state(), DialogState::Answered)) {
                    // §13.3.1.4: the dialog is confirmed but the session should end with BYE.
                    let _ = self.end_call(now, call, EndReason::AckTimeout);
                }
            }
            Event::StrayResponse { .. } => {}
            Event::Terminated { id } => {
                self.client_txs.remove(&id);
                if let Some(key) = self.merge_key_of.remove(&id) {
                    self.merge_keys.remove(&key);
                }
                if let Some(call) = self.by_invite_tx.remove(&id) {
                    // A call rejected or cancelled before answer is over once its INVITE
                    // transaction is gone; answered calls live on in their dialog.
                    if self.calls.get(&call).is_some_and(Dialog::is_early) {
                        self.finish(call, EndCause::Rejected(0));
                    }
                }
            }
        }
    }

    /// The dialog an in-dialog request belongs to: its Call-ID, our tag (its To) and the
    /// peer's tag (its From) must all match (§12.2.2: the dialog ID is all three). A request
    /// that knows our tag but carries another remote tag is not the peer's (a forged or stale
    /// BYE, re-INVITE, INFO or NOTIFY) and belongs to no dialog.
    fn dialog_of(&self, request: &rsip::Request) -> Option<CallRef> {
        let call_id = request.call_id_header().ok()?.value().to_owned();
        let local_tag = request.to_header().ok()?.tag().ok()??.to_string();
        let call = self.dialogs.get(&(call_id, local_tag)).copied()?;
        let remote_tag = request.from_header().ok().and_then(|f| f.tag().ok().flatten()).map(|t| t.to_string());
        match (&self.calls.get(&call)?.remote_tag, remote_tag) {
            (Some(ours), Some(theirs)) if *ours == theirs => Some(call),
            // A peer without tags (RFC 2543) is matched on Call-ID and our tag.
            (None, _) => Some(call),
            _ => None,
        }
    }

    fn on_request(
        &mut self,
        now: Instant,
        id: TransactionId,
        peer: Peer,
        request: rsip::Request,
        cancels: Option<TransactionId>,
    ) {
        // §8.2.2.3: a request that requires an extension we do not support gets 420 Bad
        // Extension naming it (CANCEL and ACK cannot be refused this way, §8.2.2.3 and §9.2).
        if !matches!(request.method, Method::Ack | Method::Cancel) {
            let unsupported = unsupported_requirements(&request);
            if !unsupported.is_empty() {
                let header = Header::Other("Unsupported".into(), unsupported.join(", "));
                let response = self.response(&request, 420, None, &[header]);
                let _ = self.layer.send_response(now, id, response);
                return;
            }
        }
        let has_to_tag = request.to_header().ok().and_then(|t| t.tag().ok().flatten()).is_some();
        if has_to_tag {
            self.in_dialog(now, id, peer, request);
            return;
        }
        match request.method {
            Method::Invite => self.new_call(now, id, peer, request),
            Method::Options if self.draining => {
                // A load balancer's probe (Kamailio's dispatcher pings with OPTIONS): not ready.
                let retry = Header::RetryAfter("60".into());
                let response = self.response(&request, 503, None, &[retry]);
                let _ = self.layer.send_response_once(now, id, response);
            }
            Method::Options => {
                let response = self.response(&request, 200, None, &[]);
                let _ = self.layer.send_response(now, id, response);
            }
            Method::Cancel => {
                let call = cancels.and_then(|tx| self.by_invite_tx.get(&tx).copied());
                // A CANCEL goes where its INVITE went, so it comes from where the INVITE came
                // from (§9.1): one from elsewhere that guessed the branch is not the caller's.
                if let Some(call) = call
                    && !self.sent_by_dialog_peer(call, peer)
                {
                    let response = self.response(&request, 481, None, &[]);
                    let _ = self.layer.send_response_once(now, id, response);
                    return;
                }
                match call {
                    Some(call) if self.calls.get(&call).is_some_and(Dialog::is_early) => {
                        // §9.2: 200 for the CANCEL, then 487 for the INVITE.
                        let ok = self.response(&request, 200, None, &[]);
                        let _ = self.layer.send_response(now, id, ok);
                        if let Some(c) = self.calls.get(&call) {
                            let (invite, tx, tag) = (c.invite.clone(), c.invite_tx, c.local_tag.clone());
                            let terminated = self.response(&invite, 487, Some(&tag), &[]);
                            let _ = self.layer.send_response(now, tx, terminated);
                        }
                        self.finish(call, EndCause::Cancelled);
                    }
                    // Already answered: the CANCEL has no effect on the INVITE (§9.2), but it
                    // matched a transaction, so it gets its 200.
                    Some(_) => {
                        let ok = self.response(&request, 200, None, &[]);
                        let _ = self.layer.send_response(now, id, ok);
                    }
                    None => {
                        let response = self.response(&request, 481, None, &[]);
                        let _ = self.layer.send_response(now, id, response);
                    }
                }
            }
            // BYE, INFO … outside a dialog: §12.2.2 / §15.1.2.
            Method::Bye | Method::Info | Method::Update | Method::PRack => {
                let response = self.response(&request, 481, None, &[]);
                let _ = self.layer.send_response(now, id, response);
            }
            _ => {
                // §8.2.1: a method we understand but do not serve here.
                let allow = Header::Allow(ALLOW.into());
                let response = self.response(&request, 405, None, &[allow]);
                let _ = self.layer.send_response(now, id, response);
            }
        }
    }

    fn new_call(&mut self, now: Instant, id: TransactionId, peer: Peer, request: rsip::Request) {
        let session_interval = match session_timer_request(&request) {
            SessionTimer::None => None,
            SessionTimer::TooSmall => {
                // RFC 4028 §8.1: 422 with our Min-SE.
                let min_se = Header::Other("Min-SE".into(), MIN_SE.to_string());
                let response = self.response(&request, 422, None, &[min_se]);
                let _ = self.layer.send_response(now, id, response);
                return;
            }
            SessionTimer::Uac(interval) => Some(interval),
        };
        // §8.2.2.2: the same request (From tag, Call-ID, CSeq) arriving again under another
        // branch reached us over two paths (a forking proxy); answer the copy 482.
        let call_id = request.call_id_header().map(|h| h.value().to_owned()).unwrap_or_default();
        let from_tag =
            request.from_header().ok().and_then(|f| f.tag().ok().flatten()).map(|t| t.to_string()).unwrap_or_default();
        let seq = request.cseq_header().ok().and_then(|c| c.typed().ok()).map_or(0, |c| c.seq);
        let merge_key = (call_id, from_tag, seq);
        if self.merge_keys.contains_key(&merge_key) {
            let response = self.response(&request, 482, None, &[]);
            let _ = self.layer.send_response(now, id, response);
            return;
        }
        self.merge_keys.insert(merge_key.clone(), id);
        self.merge_key_of.insert(id, merge_key);
        let local_tag = self.unique();
        self.counter += 1;
        let call = CallRef(self.counter);
        let dialog = Dialog::incoming(peer, request.clone(), id, local_tag, session_interval);
        self.dialogs.insert((dialog.call_id.clone(), dialog.local_tag.clone()), call);
        self.by_invite_tx.insert(id, call);
        self.calls.insert(call, dialog);
        self.emit(UaEvent::IncomingCall { call, peer, request: Box::new(request) });
    }

    /// Whether `peer` may act on `call`'s dialog (see [`Dialog::accepts_from`]); counts it
    /// when not.
    fn sent_by_dialog_peer(&mut self, call: CallRef, peer: Peer) -> bool {
        let accepted = self.calls.get(&call).is_some_and(|c| c.accepts_from(peer));
        if !accepted {
            self.foreign_requests += 1;
        }
        accepted
    }

    fn in_dialog(&mut self, now: Instant, id: TransactionId, peer: Peer, request: rsip::Request) {
        let Some(call) = self.dialog_of(&request) else {
            // §12.2.2: a request for a dialog we do not have; answered once, holding nothing
            // (anyone can send these).
            let response = self.response(&request, 481, None, &[]);
            let _ = self.layer.send_response_once(now, id, response);
            return;
        };
        // Carrying the whole dialog ID is not enough: it must come from the dialog's peer
        // (or a source trusted for it). Answered as if the dialog did not exist, once.
        if !self.sent_by_dialog_peer(call, peer) {
            let response = self.response(&request, 481, None, &[]);
            let _ = self.layer.send_response_once(now, id, response);
            return;
        }
        let cseq = request.cseq_header().ok().and_then(|c| c.typed().ok()).map_or(0, |c| c.seq);
        let Some(c) = self.calls.get_mut(&call) else { return };
        // §12.2.2: a lower CSeq than the last one is out of order: 500.
        if cseq < c.remote_cseq {
            let response = self.response(&request, 500, None, &[]);
            let _ = self.layer.send_response(now, id, response);
            return;
        }
        c.remote_cseq = cseq;
        match request.method {
            Method::Bye => {
                // §15.1.2: a BYE in an early dialog also ends the INVITE, with 487.
                let early = matches!(c.state(), DialogState::Incoming)
                    .then(|| (c.invite.clone(), c.invite_tx, c.local_tag.clone()));
                let response = self.response(&request, 200, None, &[]);
                let _ = self.layer.send_response(now, id, response);
                if let Some((invite, tx, tag)) = early {
                    let terminated = self.response(&invite, 487, Some(&tag), &[]);
                    let _ = self.layer.send_response(now, tx, terminated);
                }
                self.finish(call, EndCause::RemoteBye);
            }
            Method::Update if request.body.iter().all(u8::is_ascii_whitespace) => {
                // A session refresh or a target refresh without SDP (RFC 3311 §5.2,
                // RFC 4028 §9): 200 OK without a body.
                let contact = self.contact_and_sdp_headers(false);
                let response = self.response(&request, 200, None, &contact);
                let _ = self.layer.send_response(now, id, response);
                self.arm_session_timer(now, call);
            }
            Method::Invite | Method::Update if c.reinvite_tx.is_some() || c.is_calling() => {
                // §14.2: our own INVITE or re-INVITE is in progress (glare): 491, and each side
                // retries after a random wait (§14.1). RFC 3311 §5.2 says the same for UPDATE.
                let response = self.response(&request, 491, None, &[]);
                let _ = self.layer.send_response(now, id, response);
            }
            Method::Invite | Method::Update => {
                if c.pending_reinvite.is_some() {
                    // §14.2: a re-INVITE while another is in progress gets 500 with a
                    // Retry-After between 0 and 10 s.
                    let retry = Header::RetryAfter("2".into());
                    let response = self.response(&request, 500, None, &[retry]);
                    let _ = self.layer.send_response(now, id, response);
                    return;
                }
                let offer = request.body.clone();
                c.pending_reinvite = Some((id, request));
                self.emit(UaEvent::ReInvite { call, offer });
            }
            Method::Info => {
                let dtmf = parse_info_dtmf(&request);
                let response = self.response(&request, if dtmf.is_some() { 200 } else { 415 }, None, &[]);
                let _ = self.layer.send_response(now, id, response);
                if let Some((digit, duration_ms)) = dtmf {
                    self.emit(UaEvent::InfoDtmf { call, digit, duration_ms });
                }
            }
            Method::Options => {
                let response = self.response(&request, 200, None, &[]);
                let _ = self.layer.send_response(now, id, response);
            }
            Method::Notify => {
                // The implicit subscription of our REFER (RFC 3515 §2.4.4): the body is a
                // `message/sipfrag` whose status line is the transfer target's answer.
                let is_refer =
                    header_values(&request, "Event").any(|e| e.trim().to_ascii_lowercase().starts_with("refer"));
                let response = self.response(&request, if is_refer { 200 } else { 489 }, None, &[]);
                let _ = self.layer.send_response(now, id, response);
                if is_refer {
                    let terminated = header_values(&request, "Subscription-State")
                        .any(|s| s.trim().to_ascii_lowercase().starts_with("terminated"));
                    match sipfrag_status(&request.body) {
                        Some(status) => {
                            self.emit(UaEvent::Transfer { call, status, final_: status >= 200 || terminated })
                        }
                        // The subscription ended without telling us how: a failure for the flow.
                        None if terminated => self.emit(UaEvent::Transfer { call, status: 500, final_: true }),
                        None => {}
                    }
                }
            }
            _ => {
                let allow = Header::Allow(ALLOW.into());
                let response = self.response(&request, 405, None, &[allow]);
                let _ = self.layer.send_response(now, id, response);
            }
        }
    }

    fn finish(&mut self, call: CallRef, cause: EndCause) {
        if let Some(c) = self.calls.remove(&call) {
            let cause = c.end_cause(cause);
            self.dialogs.remove(&(c.call_id, c.local_tag));
            self.emit(UaEvent::Ended { call, cause });
        }
    }

    fn contact_and_sdp_headers(&self, sdp: bool) -> Vec<Header> {
        let mut headers = vec![Header::Contact(format!("<sip:{}>", self.config.contact_host).into())];
        if sdp {
            headers.push(Header::ContentType("application/sdp".into()));
        }
        headers
    }

    /// A response to `request` (§8.2.6.2): its Via, From, To (with `to_tag` added), Call-ID and
    /// CSeq, our Server header, `extra`, and Content-Length 0 (callers with a body reset it).
    fn response(&self, request: &rsip::Request, code: u16, to_tag: Option<&str>, extra: &[Header]) -> rsip::Response {
        let mut headers: Vec<Header> = Vec::with_capacity(8 + extra.len());
        for header in request.headers.iter() {
            match header {
                Header::Via(_) | Header::From(_) | Header::CallId(_) | Header::CSeq(_) => headers.push(header.clone()),
                // §12.1.1: copied into every response that can create a dialog (101–299).
                Header::RecordRoute(_) if (101..300).contains(&code) => headers.push(header.clone()),
                Header::To(to) if code > 100 && to.tag().ok().flatten().is_none() => {
                    // §8.2.6.2: a UAS adds a To tag to every response but 100. Out of a dialog
                    // the tag only needs to be stable across retransmissions of the request.
                    let tag = match to_tag {
                        Some(tag) => tag.to_owned(),
                        None => self.stateless_tag(request),
                    };
                    headers.push(Header::To(format!("{};tag={tag}", to.value()).into()));
                }
                Header::To(_) => headers.push(header.clone()),
                _ => {}
            }
        }
        headers.push(Header::Server(self.config.user_agent.clone().into()));
        if (code == 405 || (200..300).contains(&code)) && !extra.iter().any(|h| matches!(h, Header::Allow(_))) {
            headers.push(Header::Allow(ALLOW.into()));
            headers.push(Header::Supported(SUPPORTED.into()));
        }
        headers.extend(extra.iter().cloned());
        headers.push(Header::ContentLength(0u32.into()));
        rsip::Response {
            status_code: reason_phrase(code),
            version: rsip::Version::V2,
            headers: headers.into(),
            body: Vec::new(),
        }
    }

    /// A To tag for a response outside a dialog: a hash of the request's identity, so that a
    /// retransmitted request gets the same tag.
    fn stateless_tag(&self, request: &rsip::Request) -> String {
        use sha2::Digest;
        let call_id = request.call_id_header().map(|h| h.value().to_owned()).unwrap_or_default();
        let cseq = request.cseq_header().map(|h| h.value().to_owned()).unwrap_or_default();
        // Keyed with a secret: a peer cannot predict the tag another request would get.
        let mut hash = sha2::Sha256::new();
        hash.update(self.tag_key);
        hash.update(call_id.as_bytes());
        hash.update([0]);
        hash.update(cseq.as_bytes());
        hex::encode(&hash.finalize()[..12])
    }

    /// Sends 180 Ringing (with our To tag, so the dialog is early on the caller's side).
    pub fn ring(&mut self, now: Instant, call: CallRef) -> Result<(), UaError> {
        let c = self.incoming(call, "ringing after the final response")?;
        let (invite, tx, tag) = (c.invite.clone(), c.invite_tx, c.local_tag.clone());
        let contact = self.contact_and_sdp_headers(false);
        let ringing = self.response(&invite, 180, Some(&tag), &contact);
        let _ = self.layer.send_response(now, tx, ringing);
        self.pump(now);
        Ok(())
    }

    /// Answers with 200 OK carrying `sdp` (the answer to the INVITE's offer).
    pub fn answer(&mut self, now: Instant, call: CallRef, sdp: Vec<u8>) -> Result<(), UaError> {
        self.incoming(call, "answering an answered call")?;
        let c = self.calls.get_mut(&call).ok_or(UaError::UnknownCall(call))?;
        c.answer().map_err(|e| UaError::WrongState(call, e))?;
        c.local_sdp = Some(sdp.clone());
        let (invite, tx, tag) = (c.invite.clone(), c.invite_tx, c.local_tag.clone());
        let session_interval = c.session_interval();
        let mut extra = self.contact_and_sdp_headers(true);
        if let Some(interval) = session_interval {
            // RFC 4028 §9: the caller supports timers and refreshes (refresher=uac).
            extra.push(Header::Other("Session-Expires".into(), format!("{};refresher=uac", interval.as_secs())));
            extra.push(Header::Require("timer".into()));
        }
        let mut ok = self.response(&invite, 200, Some(&tag), &extra);
        set_content_length(&mut ok.headers, sdp.len());
        ok.body = sdp;
        let _ = self.layer.send_response(now, tx, ok);
        self.arm_session_timer(now, call);
        self.pump(now);
        Ok(())
    }

    /// Answers the pending re-INVITE: `Ok(sdp)` sends 200 OK with that session description,
    /// `Err(status)` rejects it (488 for an unacceptable offer, RFC 3261 §14.2; the call
    /// continues with the session it had).
    pub fn answer_reinvite(
        &mut self,
        now: Instant,
        call: CallRef,
        answer: Result<Vec<u8>, u16>,
    ) -> Result<(), UaError> {
        let c = self.calls.get_mut(&call).ok_or(UaError::UnknownCall(call))?;
        let (tx, request) = c.pending_reinvite.take().ok_or(UaError::WrongState(call, "no re-INVITE pending"))?;
        let mut refreshed = false;
        let response = match answer {
            Ok(sdp) => {
                refreshed = true;
                c.local_sdp = Some(sdp.clone());
                let extra = self.contact_and_sdp_headers(true);
                let mut ok = self.response(&request, 200, None, &extra);
                set_content_length(&mut ok.headers, sdp.len());
                ok.body = sdp;
                ok
            }
            Err(status) => self.response(&request, status.clamp(300, 699), None, &[]),
        };
        let _ = self.layer.send_response(now, tx, response);
        // Only a 2xx refreshes the session (RFC 4028 §10).
        if refreshed {
            self.arm_session_timer(now, call);
        }
        self.pump(now);
        Ok(())
    }

    /// The session description we last sent on this call.
    pub fn local_sdp(&self, call: CallRef) -> Option<&[u8]> {
        self.calls.get(&call).and_then(|c| c.local_sdp.as_deref())
    }

    /// Rejects an unanswered call with a final status (≥ 300).
    pub fn reject(&mut self, now: Instant, call: CallRef, code: u16) -> Result<(), UaError> {
        self.reject_with(now, call, code, &[])
    }

    /// Rejects an unanswered call with a final status and extra headers (a digest challenge
    /// with 401/407, Retry-After with 503, Warning with 488).
    pub fn reject_with(&mut self, now: Instant, call: CallRef, code: u16, extra: &[Header]) -> Result<(), UaError> {
        self.reject_as(now, call, code, extra, EndCause::Rejected(code))
    }

    /// [`UserAgent::reject_with`] for a caller that has not shown it is who it claims — a
    /// digest challenge, a refusal before authentication: over UDP the response goes out once
    /// and is not retransmitted (RFC 3261 §8.2.7; see
    /// [`TransactionLayer::send_response_once`](crate::transaction::TransactionLayer::send_response_once)),
    /// so spoofed INVITEs do not turn us into an amplifier.
    pub fn reject_unverified(
        &mut self,
        now: Instant,
        call: CallRef,
        code: u16,
        extra: &[Header],
    ) -> Result<(), UaError> {
        let c = self.incoming(call, "rejecting an answered call")?;
        let (invite, tx, tag) = (c.invite.clone(), c.invite_tx, c.local_tag.clone());
        let response = self.response(&invite, code.clamp(300, 699), Some(&tag), extra);
        let _ = self.layer.send_response_once(now, tx, response);
        self.finish(call, EndCause::Rejected(code));
        self.pump(now);
        Ok(())
    }

    /// Rejects an unanswered inbound call; the call ends with `cause`.
    fn reject_as(
        &mut self,
        now: Instant,
        call: CallRef,
        code: u16,
        extra: &[Header],
        cause: EndCause,
    ) -> Result<(), UaError> {
        let c = self.incoming(call, "rejecting an answered call")?;
        let (invite, tx, tag) = (c.invite.clone(), c.invite_tx, c.local_tag.clone());
        let response = self.response(&invite, code.clamp(300, 699), Some(&tag), extra);
        let _ = self.layer.send_response(now, tx, response);
        self.finish(call, cause);
        self.pump(now);
        Ok(())
    }

    /// An inbound call whose INVITE awaits its final response, for the UAS operations (ring,
    /// answer, reject); `late` says what is wrong once the final response went out.
    fn incoming(&self, call: CallRef, late: &'static str) -> Result<&Dialog, UaError> {
        let c = self.calls.get(&call).ok_or(UaError::UnknownCall(call))?;
        match c.state() {
            DialogState::Incoming => Ok(c),
            _ if c.role() == Role::Uac => Err(UaError::WrongState(call, "an outbound call has no INVITE to answer")),
            _ => Err(UaError::WrongState(call, late)),
        }
    }

    /// Asks the caller to call `target` instead (blind transfer, RFC 3515 / RFC 5589): sends
    /// REFER with `Refer-To`. Progress arrives as [`UaEvent::Transfer`]; the application hangs
    /// up once the transfer succeeded.
    pub fn refer(&mut self, now: Instant, call: CallRef, target: &str) -> Result<(), UaError> {
        let c = self.calls.get_mut(&call).ok_or(UaError::UnknownCall(call))?;
        if !c.is_answered() {
            return Err(UaError::WrongState(call, "transfer needs an answered call"));
        }
        if c.refer_tx.is_some() {
            return Err(UaError::WrongState(call, "a transfer is already in progress"));
        }
        let cseq = c.next_local_cseq();
        let Some((peer, mut refer)) = self.in_dialog_request(call, Method::Refer, cseq) else {
            return Err(UaError::UnknownCall(call));
        };
        let contact = format!("<sip:{}>", self.config.contact_host);
        let mut headers: Vec<Header> =
            refer.headers.iter().filter(|h| !matches!(h, Header::ContentLength(_))).cloned().collect();
        headers.push(Header::Other("Refer-To".into(), format!("<{target}>")));
        headers.push(Header::Other("Referred-By".into(), contact.clone()));
        headers.push(Header::Contact(contact.into()));
        headers.push(Header::ContentLength(0u32.into()));
        refer.headers = headers.into();
        self.add_credentials(TxOwner::Call(call, Purpose::Refer), &mut refer);
        if let Some(tx) = self.send_client(now, TxOwner::Call(call, Purpose::Refer), peer, refer, 0)
            && let Some(c) = self.calls.get_mut(&call)
        {
            c.refer_tx = Some(tx);
        }
        self.pump(now);
        Ok(())
    }

    /// Where a call's signalling comes from: transport and address (for TCP/TLS, the
    /// connection).
    pub fn peer(&self, call: CallRef) -> Option<Peer> {
        self.calls.get(&call).map(|c| c.peer)
    }

    /// The Call-ID of `call`.
    pub fn call_id(&self, call: CallRef) -> Option<&str> {
        self.calls.get(&call).map(|c| c.call_id.as_str())
    }

    /// Names the `host:port` we listen on for `transport`: Via sent-by and Contact of the
    /// requests we send over it say so (RFC 3261 §18.1.1, §8.1.1.8), so that a carrier's new
    /// requests (an inbound call to a registered binding) reach a listener of that transport.
    pub fn set_listener(&mut self, transport: Transport, host_port: String) {
        self.listeners.insert(transport, host_port);
    }

    /// Our `host:port` for `transport`.
    pub(crate) fn host_for(&self, transport: Transport) -> &str {
        self.listeners.get(&transport).map_or(&self.config.contact_host, String::as_str)
    }

    /// The `host:port` this user agent puts in Contact and Via by default.
    pub fn contact_host(&self) -> &str {
        &self.config.contact_host
    }

    /// Ends a call: BYE once answered (§15.1.1); before that, 480 for an inbound call and
    /// CANCEL for an outbound one (sent once the callee has answered provisionally, §9.1).
    pub fn hangup(&mut self, now: Instant, call: CallRef) -> Result<(), UaError> {
        self.end_call(now, call, EndReason::Hangup)
    }

    /// Ends a call for `reason` (the application's hangup or a timer), as its state allows.
    fn end_call(&mut self, now: Instant, call: CallRef, reason: EndReason) -> Result<(), UaError> {
        let c = self.calls.get_mut(&call).ok_or(UaError::UnknownCall(call))?;
        match c.hang_up(reason) {
            Hangup::Reject => {
                let cause = reason.cause().unwrap_or(EndCause::Rejected(480));
                return self.reject_as(now, call, 480, &[], cause);
            }
            Hangup::Cancel(leave) => self.send_cancel(now, call, leave),
            Hangup::Wait => {}
            Hangup::Bye => {
                let cseq = c.next_local_cseq();
                let Some((peer, mut bye)) = self.in_dialog_request(call, Method::Bye, cseq) else {
                    return Err(UaError::UnknownCall(call));
                };
                self.add_credentials(TxOwner::Call(call, Purpose::Bye), &mut bye);
                if self.send_client(now, TxOwner::Call(call, Purpose::Bye), peer, bye, 0).is_none() {
                    self.finish(call, EndCause::LocalBye);
                }
            }
        }
        self.pump(now);
        Ok(())
    }

    /// Starts a client transaction for one of our requests and remembers whose it is.
    fn send_client(
        &mut self,
        now: Instant,
        owner: TxOwner,
        peer: Peer,
        request: rsip::Request,
        auth_rounds: u8,
    ) -> Option<TransactionId> {
        let tx = self.layer.send_request(now, peer, request.clone()).ok()?;
        self.client_txs.insert(tx, ClientTx { owner, peer, request, auth_rounds, ack: None });
        Some(tx)
    }

    /// An in-dialog request of this call (§12.2.1.1, [`Dialog::request`]) with a new Via,
    /// and where it goes.
    fn in_dialog_request(&mut self, call: CallRef, method: Method, cseq: u32) -> Option<(Peer, rsip::Request)> {
        let via = self.new_via(self.calls.get(&call)?.peer.transport);
        let c = self.calls.get(&call)?;
        Some((c.peer, c.request(method, cseq, via, &self.config.user_agent)))
    }
}

/// The transport token of a Via header (§18.2.1).
fn via_transport(transport: Transport) -> &'static str {
    match transport {
        Transport::Udp => "UDP",
        Transport::Tcp => "TCP",
        Transport::Tls => "TLS",
    }
}

fn set_content_length(headers: &mut rsip::Headers, len: usize) {
    headers.retain(|h| !matches!(h, Header::ContentLength(_)));
    headers.push(Header::ContentLength((len as u32).into()));
}

/// Parses DTMF from an INFO body: `application/dtmf-relay` (`Signal=5\r\nDuration=160`) or
/// `application/dtmf` (the bare key).
fn parse_info_dtmf(request: &rsip::Request) -> Option<(char, u32)> {
    let content_type = request.headers.iter().find_map(|h| match h {
        Header::ContentType(ct) => Some(ct.value().to_ascii_lowercase()),
        _ => None,
    })?;
    let body = std::str::from_utf8(&request.body).ok()?;
    let valid = |c: char| matches!(c, '0'..='9' | '*' | '#' | 'A'..='D');
    if content_type.starts_with("application/dtmf-relay") {
        let mut digit = None;
        let mut duration = 160;
        for line in body.lines() {
            let Some((key, value)) = line.split_once('=') else { continue };
            match key.trim().to_ascii_lowercase().as_str() {
                "signal" => digit = value.trim().chars().next().map(|c| c.to_ascii_uppercase()),
                "duration" => duration = value.trim().parse().unwrap_or(160),
                _ => {}
            }
        }
        digit.filter(|d| valid(*d)).map(|d| (d, duration))
    } else if content_type.starts_with("application/dtmf") {
        body.trim().chars().next().map(|c| c.to_ascii_uppercase()).filter(|d| valid(*d)).map(|d| (d, 160))
    } else {
        None
    }
}

/// The status code of a `message/sipfrag` body's status line (`SIP/2.0 200 OK`).
fn sipfrag_status(body: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(body).ok()?;
    let mut parts = text.lines().next()?.split_whitespace();
    (parts.next()? == "SIP/2.0").then_some(())?;
    parts.next()?.parse().ok().filter(|code| (100..700).contains(code))
}

/// What a caller asked for in `Session-Expires` (RFC 4028).
enum SessionTimer {
    /// No session timer, or one we cannot serve: the caller does not support `timer`, so we
    /// would have to refresh, and Patchbay does not send refreshes yet.
    None,
    /// Below our Min-SE.
    TooSmall,
    /// A timer with the caller refreshing.
    Uac(Duration),
}

/// The option tags `request` lists in Require that we do not support ([`SUPPORTED`]).
fn unsupported_requirements(request: &rsip::Request) -> Vec<String> {
    let required = request.headers.iter().filter_map(|h| match h {
        Header::Require(v) => Some(v.value()),
        Header::Other(n, v) if n.eq_ignore_ascii_case("Require") => Some(v.as_str()),
        _ => None,
    });
    let mut unsupported: Vec<String> = Vec::new();
    for tag in required.flat_map(|v| v.split(',')).map(str::trim).filter(|t| !t.is_empty()) {
        let known = SUPPORTED.split(',').any(|s| s.trim().eq_ignore_ascii_case(tag));
        if !known && !unsupported.iter().any(|u| u.eq_ignore_ascii_case(tag)) {
            unsupported.push(tag.to_owned());
        }
    }
    unsupported
}

fn header_values<'a>(request: &'a rsip::Request, name: &str) -> impl Iterator<Item = &'a str> {
    request.headers.iter().filter_map(move |h| match h {
        Header::Other(n, v) if n.eq_ignore_ascii_case(name) => Some(v.as_str()),
        Header::Supported(v) if name.eq_ignore_ascii_case("Supported") => Some(v.value()),
        Header::Event(v) if name.eq_ignore_ascii_case("Event") => Some(v.value()),
        Header::SubscriptionState(v) if name.eq_ignore_ascii_case("Subscription-State") => Some(v.value()),
        _ => None,
    })
}

fn session_timer_request(request: &rsip::Request) -> SessionTimer {
    let Some(value) = header_values(request, "Session-Expires").next() else { return SessionTimer::None };
    let mut parts = value.split(';');
    let Some(interval) = parts.next().and_then(|v| v.trim().parse::<u32>().ok()) else { return SessionTimer::None };
    if interval < MIN_SE {
        return SessionTimer::TooSmall;
    }
    // Longer intervals than a day buy nothing and keep stale timer entries around for ages.
    let interval = interval.min(MAX_SE);
    let refresher_uas = parts.any(|p| p.trim().eq_ignore_ascii_case("refresher=uas"));
    let uac_supports_timer =
        header_values(request, "Supported").any(|v| v.split(',').any(|tag| tag.trim().eq_ignore_ascii_case("timer")));
    if !uac_supports_timer || refresher_uas {
        SessionTimer::None
    } else {
        SessionTimer::Uac(Duration::from_secs(u64::from(interval)))
    }
}

#[path = "dialog.rs"]
mod dialog;

use dialog::{AfterProvisional, Dialog, DialogState, EndReason, Hangup, MayCancel, Role};

#[path = "ua_client.rs"]
mod client;

pub use client::Dial;

#[path = "ua_register.rs"]
mod register;

pub use register::{RegRef, Register, RegistrationState, RegistrationStateAt};

#[path = "ua_ping.rs"]
mod ping;

pub use ping::{Ping, PingRef};

#[cfg(test)]
#[path = "ua_tests.rs"]
mod tests;
