//! The transaction state machines and the layer that owns them.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use rsip::headers::ToTypedHeader;
use rsip::prelude::HeadersExt;
use rsip::{Header, Method, SipMessage, StatusCodeKind};

use super::key::{ClientKey, ServerKey, dialog_ack_key};
use super::{Event, Output, Peer, TimerConfig, TransactionError, TransactionId};

/// INVITE client transaction (§17.1.1.2, Figure 5, with RFC 6026's Accepted state):
///
/// ```text
///                     INVITE sent, Timer A (unreliable) and B start
///   Calling ──1xx──► Proceeding ──1xx──┐
///     │  │             │  │ ◄──────────┘
///     │  │  300-699:   │  │ 2xx: to TU
///     │  └─ACK, to TU─►│  └──────────────► Accepted ──Timer M──► Terminated
///     │                ▼                     (2xx retransmissions to TU)
///     │            Completed ──Timer D──► Terminated
///     │              (final retransmission: ACK again)
///     └──Timer B: timeout to TU──► Terminated
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InviteClientState {
    Calling,
    Proceeding,
    Completed,
    Accepted,
}

/// Non-INVITE client transaction (§17.1.2.2, Figure 6):
///
/// ```text
///   Trying ──1xx──► Proceeding ──200-699: to TU──► Completed ──Timer K──► Terminated
///     │   └──200-699: to TU────────────────────────►┘
///     └─ Timer F (or from Proceeding): timeout to TU ──► Terminated
///   Timer E retransmits the request in Trying and Proceeding (unreliable only).
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NonInviteClientState {
    Trying,
    Proceeding,
    Completed,
}

/// INVITE server transaction (§17.2.1, Figure 7, with RFC 6026's Accepted state):
///
/// ```text
///   INVITE received: 100 Trying sent, request to TU
///   Proceeding ──1xx from TU──► Proceeding (INVITE retransmission: resend last 1xx)
///     │  └──2xx from TU──► Accepted ──Timer L──► Terminated
///     │                      (2xx retransmitted at T1, 2T1 … T2 until ACK; §13.3.1.4)
///     └──300-699 from TU──► Completed ──ACK──► Confirmed ──Timer I──► Terminated
///                            │ Timer G: resend response (unreliable)
///                            └ Timer H: ACK timeout ──► Terminated
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InviteServerState {
    Proceeding,
    Completed,
    Confirmed,
    Accepted,
}

/// Non-INVITE server transaction (§17.2.2, Figure 8):
///
/// ```text
///   Trying ──1xx from TU──► Proceeding ──200-699 from TU──► Completed ──Timer J──► Terminated
///     └──200-699 from TU─────────────────────────────────►┘
///   Request retransmissions: absorbed in Trying, answered with the last response after.
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NonInviteServerState {
    Trying,
    Proceeding,
    Completed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    InviteClient(InviteClientState),
    NonInviteClient(NonInviteClientState),
    InviteServer(InviteServerState),
    NonInviteServer(NonInviteServerState),
}

#[derive(Debug)]
struct Transaction {
    state: State,
    peer: Peer,
    /// The request that created it (client: what we sent; server: what we received).
    request: rsip::Request,
    /// Last response sent (server) — what retransmitted requests are answered with.
    last_response: Option<rsip::Response>,
    /// ACK we sent for a non-2xx final response (INVITE client), re-sent on retransmissions.
    ack: Option<rsip::Request>,
    /// Retransmission timer (A, E, G, or the 2xx retransmission) and its current interval.
    retransmit_at: Option<Instant>,
    interval: Duration,
    /// Timeout timer (B, D, F, H, I, J, K, L, M) and what it means.
    deadline: Option<(Instant, Deadline)>,
    client_key: Option<ClientKey>,
    server_key: Option<ServerKey>,
    /// For an accepted INVITE server transaction: the (Call-ID, CSeq) an ACK must carry.
    ack_key: Option<(String, u32)>,
}

/// What a transaction's timeout timer does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deadline {
    /// B or F: no final response; tell the TU.
    ClientTimeout,
    /// H or L-without-ACK: the final response was never acknowledged.
    AckTimeout,
    /// D, I, J, K, L (after ACK), M: the transaction simply ends.
    End,
}

impl Transaction {
    fn next_timer(&self) -> Option<Instant> {
        match (self.retransmit_at, self.deadline.map(|d| d.0)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// All transactions of one endpoint. See the module docs for how it is driven.
#[derive(Debug)]
pub struct TransactionLayer {
    timers: TimerConfig,
    next_id: u64,
    transactions: HashMap<TransactionId, Transaction>,
    clients: HashMap<ClientKey, TransactionId>,
    servers: HashMap<ServerKey, TransactionId>,
    /// Accepted INVITE server transactions by the (Call-ID, CSeq) their ACK carries.
    awaiting_ack: HashMap<(String, u32), TransactionId>,
    /// Timer wheel: (deadline, transaction). Entries go stale when a transaction's timers move
    /// or it ends; stale entries are skipped when they come due.
    wheel: BinaryHeap<Reverse<(Instant, TransactionId)>>,
    outputs: VecDeque<Output>,
    /// Responses dropped because they came from somewhere their request did not go.
    foreign_responses: u64,
    /// Most server transactions held at once; a request that would open one more is answered
    /// 503 statelessly.
    max_servers: usize,
    /// Requests answered 503 because `max_servers` were held.
    overloaded: u64,
}

/// Server transactions held at once unless [`TransactionLayer::set_max_server_transactions`]
/// says otherwise. Each lives up to 32 s after its final response over UDP (Timers J, L), so by
/// the timers a node doing 600 calls/s (an INVITE and a BYE each) holds about 600 × 2 × 32 =
/// 38,400; a spoofed-source flood holds no more than this and is answered 503 beyond it. (What
/// that many cost in memory has not been measured.)
pub const MAX_SERVER_TRANSACTIONS: usize = 100_000;

/// What a stateless 503 for overload asks the client to wait (RFC 3261 §21.5.4).
const OVERLOAD_RETRY_AFTER_SECS: u32 = 5;

/// Whether a response from `from` can answer a request sent to `to`: same transport, same
/// address and port (IPv4-mapped IPv6 addresses compare as IPv4).
/// Whether a request comes from the same sender as another: its address, and over UDP its port
/// (over TCP/TLS a sender may open a new connection).
fn same_sender(first: Peer, then: Peer) -> bool {
    first.addr.ip().to_canonical() == then.addr.ip().to_canonical()
        && (then.transport.is_reliable() || first.addr.port() == then.addr.port())
}

fn same_peer(to: Peer, from: Peer) -> bool {
    to.transport == from.transport
        && to.addr.port() == from.addr.port()
        && to.addr.ip().to_canonical() == from.addr.ip().to_canonical()
}

impl TransactionLayer {
    /// An empty layer with these timer values.
    pub fn new(timers: TimerConfig) -> Self {
        Self {
            timers,
            next_id: 1,
            transactions: HashMap::new(),
            clients: HashMap::new(),
            servers: HashMap::new(),
            awaiting_ack: HashMap::new(),
            wheel: BinaryHeap::new(),
            outputs: VecDeque::new(),
            foreign_responses: 0,
            max_servers: MAX_SERVER_TRANSACTIONS,
            overloaded: 0,
        }
    }

    /// Caps the server transactions held at once (at least 1).
    pub fn set_max_server_transactions(&mut self, max: usize) {
        self.max_servers = max.max(1);
    }

    /// Requests answered 503 so far because the server transactions were at their cap.
    pub fn overloaded(&self) -> u64 {
        self.overloaded
    }

    /// Responses dropped so far because they did not come from where their request went.
    pub fn foreign_responses(&self) -> u64 {
        self.foreign_responses
    }

    /// Live transactions.
    pub fn len(&self) -> usize {
        self.transactions.len()
    }

    /// Whether no transaction is live.
    pub fn is_empty(&self) -> bool {
        self.transactions.is_empty()
    }

    /// The next thing the layer wants done, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When [`TransactionLayer::handle_timeout`] must next be called.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, id))) = self.wheel.peek().copied() {
            match self.transactions.get(&id).and_then(Transaction::next_timer) {
                Some(next) if next == at => return Some(at),
                _ => {
                    // Stale: the transaction ended or its timer moved (a fresh entry exists).
                    self.wheel.pop();
                }
            }
        }
        None
    }

    fn allocate(&mut self) -> TransactionId {
        let id = TransactionId(self.next_id);
        self.next_id += 1;
        id
    }

    fn schedule(&mut self, id: TransactionId) {
        if let Some(at) = self.transactions.get(&id).and_then(Transaction::next_timer) {
            self.wheel.push(Reverse((at, id)));
        }
    }

    fn transmit(&mut self, peer: Peer, message: impl Into<SipMessage>) {
        self.outputs.push_back(Output::Transmit { peer, message: message.into() });
    }

    fn event(&mut self, event: Event) {
        self.outputs.push_back(Output::Event(event));
    }

    /// Retransmissions run only over unreliable transports; timeouts that exist to absorb
    /// retransmissions shrink to zero over reliable ones (§17.1.1.2, §17.2.1, §17.2.2).
    fn unreliable_or_zero(&self, peer: Peer, d: Duration) -> Duration {
        if peer.transport.is_reliable() { Duration::ZERO } else { d }
    }

    // ---- client side -------------------------------------------------------------------

    /// Starts a client transaction for `request` (anything but ACK) and sends it.
    pub fn send_request(
        &mut self,
        now: Instant,
        peer: Peer,
        request: rsip::Request,
    ) -> Result<TransactionId, TransactionError> {
        if request.method == Method::Ack {
            return Err(TransactionError::AckNotTransactional);
        }
        let key = ClientKey::for_request(&request)?;
        let id = self.allocate();
        let invite = request.method == Method::Invite;
        let t1 = self.timers.t1;
        let tx = Transaction {
            state: if invite {
                State::InviteClient(InviteClientState::Calling)
            } else {
                State::NonInviteClient(NonInviteClientState::Trying)
            },
            peer,
            request: request.clone(),
            last_response: None,
            ack: None,
            // Timer A / E: T1, unreliable only (§17.1.1.2, §17.1.2.2).
            retransmit_at: (!peer.transport.is_reliable()).then(|| now + t1),
            interval: t1,
            // Timer B / F: 64·T1 on every transport.
            deadline: Some((now + self.timers.t1_x64(), Deadline::ClientTimeout)),
            client_key: Some(key.clone()),
            server_key: None,
            ack_key: None,
        };
        self.transactions.insert(id, tx);
        self.clients.insert(key, id);
        self.transmit(peer, request);
        self.schedule(id);
        Ok(id)
    }

    /// Sends a message outside any transaction: the ACK for a 2xx (§13.2.2.4), or a response
    /// generated statelessly (§8.2.7).
    pub fn send_stateless(&mut self, peer: Peer, message: impl Into<SipMessage>) {
        self.transmit(peer, message);
    }

    fn receive_response(&mut self, now: Instant, from: Peer, response: rsip::Response) {
        let Some(id) = ClientKey::for_response(&response).ok().and_then(|k| self.clients.get(&k).copied()) else {
            self.event(Event::StrayResponse { response });
            return;
        };
        let Some(tx) = self.transactions.get_mut(&id) else { return };
        // §18.1.2 and §17.1.3: a response belongs to a client transaction only if it comes
        // back from where the request went, over the same transport (for TCP and TLS, the
        // connection is the peer's address). Anyone who saw or guessed the branch could
        // otherwise answer, cancel or hang up our calls from another address.
        if !same_peer(tx.peer, from) {
            self.foreign_responses += 1;
            self.event(Event::StrayResponse { response });
            return;
        }
        let kind = response.status_code.kind();
        let provisional = kind == StatusCodeKind::Provisional;
        let success = kind == StatusCodeKind::Successful;
        let peer = tx.peer;
        match tx.state {
            State::InviteClient(state) => match (state, provisional, success) {
                (InviteClientState::Calling | InviteClientState::Proceeding, true, _) => {
                    tx.state = State::InviteClient(InviteClientState::Proceeding);
                    // Timers A and B run only in Calling (§17.1.1.2): once the callee rings,
                    // how long to wait is the TU's decision (it CANCELs), however long it rings.
                    tx.retransmit_at = None;
                    tx.deadline = None;
                    self.event(Event::Response { id, response });
                }
                (InviteClientState::Calling | InviteClientState::Proceeding, false, true) => {
                    // RFC 6026 §8.4: Accepted; 2xx retransmissions go to the TU, which ACKs.
                    tx.state = State::InviteClient(InviteClientState::Accepted);
                    tx.retransmit_at = None;
                    tx.deadline = Some((now + self.timers.t1_x64(), Deadline::End));
                    self.event(Event::Response { id, response });
                }
                (InviteClientState::Calling | InviteClientState::Proceeding, false, false) => {
                    // §17.1.1.3: the transaction itself ACKs a non-2xx final response.
                    let ack = non_2xx_ack(&tx.request, &response);
                    tx.state = State::InviteClient(InviteClientState::Completed);
                    tx.retransmit_at = None;
                    // Timer D: ≥ 32 s unreliable, 0 reliable.
                    let d = if peer.transport.is_reliable() { Duration::ZERO } else { Duration::from_secs(32) };
                    tx.deadline = Some((now + d, Deadline::End));
                    tx.ack = ack.clone();
                    if let Some(ack) = ack {
                        self.transmit(peer, ack);
                    }
                    self.event(Event::Response { id, response });
                }
                (InviteClientState::Completed, false, false) => {
                    // A retransmitted final response: ACK again, do not bother the TU.
                    if let Some(ack) = tx.ack.clone() {
                        self.transmit(peer, ack);
                    }
                }
                (InviteClientState::Accepted, false, true) => self.event(Event::Response { id, response }),
                // Anything else is late or out of order and absorbed (RFC 6026 §8.4).
                _ => {}
            },
            State::NonInviteClient(state) => match (state, provisional) {
                (NonInviteClientState::Trying | NonInviteClientState::Proceeding, true) => {
                    tx.state = State::NonInviteClient(NonInviteClientState::Proceeding);
                    self.event(Event::Response { id, response });
                }
                (NonInviteClientState::Trying | NonInviteClientState::Proceeding, false) => {
                    tx.state = State::NonInviteClient(NonInviteClientState::Completed);
                    tx.retransmit_at = None;
                    // Timer K: T4 unreliable, 0 reliable.
                    let k = self.unreliable_or_zero(peer, self.timers.t4);
                    if let Some(tx) = self.transactions.get_mut(&id) {
                        tx.deadline = Some((now + k, Deadline::End));
                    }
                    self.event(Event::Response { id, response });
                }
                // Completed: retransmissions of the final response are absorbed.
                _ => {}
            },
            State::InviteServer(_) | State::NonInviteServer(_) => {}
        }
        self.schedule(id);
    }

    // ---- server side -------------------------------------------------------------------

    fn receive_request(&mut self, now: Instant, peer: Peer, request: rsip::Request) {
        let key = match ServerKey::for_request(&request) {
            Ok(key) => key,
            // The message layer only passes requests with Via and CSeq; anything else cannot
            // be matched or answered through a transaction.
            Err(_) => return,
        };
        if let Some(&id) = self.servers.get(&key) {
            self.request_for_existing(now, id, peer, request);
            return;
        }
        if request.method == Method::Ack {
            // No INVITE transaction: the ACK for a 2xx (§17.2.3 / §13.3.1.4). It stops the 2xx
            // retransmissions only when it comes from where the INVITE did: an ACK from
            // elsewhere (forged, or a source only the core may accept) leaves them and the ACK
            // timeout running, and the core decides what it means.
            let awaited = dialog_ack_key(&request).ok().and_then(|k| self.awaiting_ack.get(&k).map(|id| (k, *id)));
            let from_invites_peer = awaited
                .as_ref()
                .and_then(|(_, id)| self.transactions.get(id))
                .is_some_and(|tx| same_sender(tx.peer, peer));
            if let Some((key, id)) = awaited.filter(|_| from_invites_peer) {
                self.awaiting_ack.remove(&key);
                if let Some(tx) = self.transactions.get_mut(&id) {
                    tx.retransmit_at = None;
                    tx.ack_key = None;
                    // Timer L keeps running to absorb INVITE retransmissions; it ends quietly.
                    if let Some((at, _)) = tx.deadline {
                        tx.deadline = Some((at, Deadline::End));
                    }
                }
                self.schedule(id);
            }
            self.event(Event::Ack { peer, request });
            return;
        }
        if self.servers.len() >= self.max_servers {
            // Overload (§21.5.4): answered without a transaction, so holding nothing; a
            // retransmission gets the same answer while the overload lasts.
            self.overloaded += 1;
            let busy = overloaded_503(&request);
            self.transmit(peer, busy);
            return;
        }
        let id = self.allocate();
        let invite = request.method == Method::Invite;
        let cancels = if request.method == Method::Cancel {
            ServerKey::invite_cancelled_by(&request).ok().and_then(|k| self.servers.get(&k).copied())
        } else {
            None
        };
        let tx = Transaction {
            state: if invite {
                State::InviteServer(InviteServerState::Proceeding)
            } else {
                State::NonInviteServer(NonInviteServerState::Trying)
            },
            peer,
            request: request.clone(),
            last_response: None,
            ack: None,
            retransmit_at: None,
            interval: self.timers.t1,
            deadline: None,
            client_key: None,
            server_key: Some(key.clone()),
            ack_key: None,
        };
        self.transactions.insert(id, tx);
        self.servers.insert(key, id);
        if invite {
            // §17.2.1: a 100 Trying unless the TU answers within 200 ms. Sending it at once
            // costs one datagram and stops the caller's Timer A retransmissions early.
            let trying = provisional_100(&request);
            if let Some(tx) = self.transactions.get_mut(&id) {
                tx.last_response = Some(trying.clone());
            }
            self.transmit(peer, trying);
        }
        self.event(Event::Request { id, peer, request, cancels });
    }

    fn request_for_existing(&mut self, now: Instant, id: TransactionId, peer: Peer, request: rsip::Request) {
        let Some(tx) = self.transactions.get_mut(&id) else { return };
        match tx.state {
            State::InviteServer(InviteServerState::Completed) if request.method == Method::Ack => {
                // §17.2.1: ACK moves Completed to Confirmed; Timer I absorbs further ACKs.
                tx.state = State::InviteServer(InviteServerState::Confirmed);
                tx.retransmit_at = None;
                let i = if tx.peer.transport.is_reliable() { Duration::ZERO } else { self.timers.t4 };
                tx.deadline = Some((now + i, Deadline::End));
            }
            State::InviteServer(InviteServerState::Accepted) if request.method == Method::Ack => {
                // An RFC 2543 peer's ACK for our 2xx matches the INVITE's key (no branch to tell
                // them apart): stop the 2xx retransmissions and pass it up (RFC 6026 §8.7) —
                // when it comes from where the INVITE did (see `receive_request`).
                if !same_sender(tx.peer, peer) {
                    self.outputs.push_back(Output::Event(Event::Ack { peer, request }));
                    return;
                }
                tx.retransmit_at = None;
                if let Some((at, _)) = tx.deadline {
                    tx.deadline = Some((at, Deadline::End));
                }
                if let Some(key) = tx.ack_key.take()
                    && self.awaiting_ack.get(&key) == Some(&id)
                {
                    self.awaiting_ack.remove(&key);
                }
                self.outputs.push_back(Output::Event(Event::Ack { peer, request }));
            }
            State::InviteServer(InviteServerState::Proceeding | InviteServerState::Completed)
                if request.method == Method::Invite =>
            {
                // A retransmitted INVITE: resend the last response we sent.
                if let Some(response) = tx.last_response.clone() {
                    self.transmit(peer, response);
                }
            }
            State::NonInviteServer(NonInviteServerState::Proceeding | NonInviteServerState::Completed) => {
                if let Some(response) = tx.last_response.clone() {
                    self.transmit(peer, response);
                }
            }
            // Trying, Confirmed, Accepted: absorbed. (In Accepted the 2xx is retransmitted on
            // its own schedule; RFC 6026 §8.7 absorbs the INVITE.)
            _ => {}
        }
        self.schedule(id);
    }

    /// Sends the TU's response on a server transaction.
    pub fn send_response(
        &mut self,
        now: Instant,
        id: TransactionId,
        response: rsip::Response,
    ) -> Result<(), TransactionError> {
        let timers = self.timers;
        let tx = self.transactions.get_mut(&id).ok_or(TransactionError::UnknownTransaction(id))?;
        let kind = response.status_code.kind();
        let provisional = kind == StatusCodeKind::Provisional;
        let peer = tx.peer;
        match tx.state {
            State::InviteServer(InviteServerState::Proceeding) => {
                if provisional {
                } else if kind == StatusCodeKind::Successful {
                    // RFC 6026 §8.5: Accepted. The 2xx is retransmitted by the UAS core until
                    // the ACK arrives (§13.3.1.4): T1, doubling, capped at T2, for 64·T1.
                    tx.state = State::InviteServer(InviteServerState::Accepted);
                    tx.retransmit_at = Some(now + timers.t1);
                    tx.interval = timers.t1;
                    tx.deadline = Some((now + timers.t1_x64(), Deadline::AckTimeout));
                    let ack_key = dialog_ack_key(&tx.request)?;
                    tx.ack_key = Some(ack_key.clone());
                    self.awaiting_ack.insert(ack_key, id);
                } else {
                    tx.state = State::InviteServer(InviteServerState::Completed);
                    // Timer G (unreliable only) and Timer H (§17.2.1).
                    tx.retransmit_at = (!peer.transport.is_reliable()).then(|| now + timers.t1);
                    tx.interval = timers.t1;
                    tx.deadline = Some((now + timers.t1_x64(), Deadline::AckTimeout));
                }
            }
            State::NonInviteServer(NonInviteServerState::Trying | NonInviteServerState::Proceeding) => {
                if provisional {
                    tx.state = State::NonInviteServer(NonInviteServerState::Proceeding);
                } else {
                    tx.state = State::NonInviteServer(NonInviteServerState::Completed);
                    // Timer J: 64·T1 unreliable, 0 reliable.
                    let j = if peer.transport.is_reliable() { Duration::ZERO } else { timers.t1_x64() };
                    tx.deadline = Some((now + j, Deadline::End));
                }
            }
            _ => return Err(TransactionError::AlreadyFinal(id)),
        }
        tx.last_response = Some(response.clone());
        self.transmit(peer, response);
        self.schedule(id);
        Ok(())
    }

    /// Sends a final response statelessly and ends the transaction: for requests from a source
    /// that has not shown it is who it claims (a digest challenge, a refusal of an
    /// unauthenticated caller), which RFC 3261 §8.2.7 lets a UAS answer statelessly (Kamailio
    /// challenges this way). A flood of INVITEs from spoofed sources then makes us send one
    /// response each towards the victims, not eleven over 32 s (Timer G), and hold nothing for
    /// them, not a transaction each for Timer H's 32 s. A real caller that lost the response
    /// retransmits its request and is answered afresh; its ACK matches nothing and is dropped
    /// (§17.2.3 leaves such an ACK to the core, which finds no dialog).
    pub fn send_response_once(
        &mut self,
        now: Instant,
        id: TransactionId,
        response: rsip::Response,
    ) -> Result<(), TransactionError> {
        let final_response = response.status_code.kind() != StatusCodeKind::Provisional;
        self.send_response(now, id, response)?;
        if final_response {
            self.terminate(id);
        }
        Ok(())
    }

    // ---- input and timers ----------------------------------------------------------------

    /// A message arrived from `peer` (already parsed and validated by the message layer).
    pub fn handle_receive(&mut self, now: Instant, peer: Peer, message: SipMessage) {
        match message {
            SipMessage::Request(request) => self.receive_request(now, peer, request),
            SipMessage::Response(response) => self.receive_response(now, peer, response),
        }
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((at, id))) = self.wheel.peek().copied() {
            if at > now {
                break;
            }
            self.wheel.pop();
            let Some(tx) = self.transactions.get(&id) else { continue };
            if tx.next_timer() != Some(at) {
                continue;
            }
            self.fire(now, id);
            self.schedule(id);
        }
    }

    fn fire(&mut self, now: Instant, id: TransactionId) {
        let timers = self.timers;
        let Some(tx) = self.transactions.get_mut(&id) else { return };
        if let Some((at, what)) = tx.deadline
            && at <= now
        {
            match what {
                Deadline::ClientTimeout => self.outputs.push_back(Output::Event(Event::Timeout { id })),
                Deadline::AckTimeout => self.outputs.push_back(Output::Event(Event::AckTimeout { id })),
                Deadline::End => {}
            }
            self.terminate(id);
            return;
        }
        let Some(at) = tx.retransmit_at.filter(|at| *at <= now) else { return };
        let peer = tx.peer;
        let (message, next_interval): (SipMessage, Duration) = match tx.state {
            // Timer A doubles without a cap (§17.1.1.2).
            State::InviteClient(InviteClientState::Calling) => (tx.request.clone().into(), tx.interval * 2),
            // Timer E doubles up to T2 in Trying; in Proceeding it fires every T2 (§17.1.2.2).
            State::NonInviteClient(NonInviteClientState::Trying) => {
                (tx.request.clone().into(), (tx.interval * 2).min(timers.t2))
            }
            State::NonInviteClient(NonInviteClientState::Proceeding) => (tx.request.clone().into(), timers.t2),
            // Timer G and the 2xx retransmission both double up to T2.
            State::InviteServer(InviteServerState::Completed | InviteServerState::Accepted) => {
                let Some(response) = tx.last_response.clone() else { return };
                (response.into(), (tx.interval * 2).min(timers.t2))
            }
            _ => {
                tx.retransmit_at = None;
                return;
            }
        };
        tx.interval = next_interval;
        tx.retransmit_at = Some(at + next_interval);
        self.transmit(peer, message);
    }

    fn terminate(&mut self, id: TransactionId) {
        if let Some(tx) = self.transactions.remove(&id) {
            if let Some(key) = tx.client_key {
                self.clients.remove(&key);
            }
            if let Some(key) = tx.server_key {
                self.servers.remove(&key);
            }
            if let Some(key) = tx.ack_key
                && self.awaiting_ack.get(&key) == Some(&id)
            {
                self.awaiting_ack.remove(&key);
            }
            self.event(Event::Terminated { id });
        }
    }
}

/// The ACK a client INVITE transaction sends for a non-2xx final response (§17.1.1.3): the
/// INVITE's Request-URI, Call-ID, From, CSeq number and top Via (only), the response's To
/// (with its tag), and the INVITE's Route headers. `None` if the INVITE lacks those headers
/// (it cannot, since we built it).
fn non_2xx_ack(invite: &rsip::Request, response: &rsip::Response) -> Option<rsip::Request> {
    let via = invite.via_header().ok()?.clone();
    let cseq = invite.cseq_header().ok()?.typed().ok()?;
    let mut headers: Vec<Header> = vec![
        Header::Via(via),
        Header::MaxForwards(rsip::headers::MaxForwards::from(70u32)),
        Header::From(invite.from_header().ok()?.clone()),
        Header::To(response.to_header().ok()?.clone()),
        Header::CallId(invite.call_id_header().ok()?.clone()),
        Header::CSeq(rsip::typed::CSeq { seq: cseq.seq, method: Method::Ack }.into()),
    ];
    headers.extend(invite.headers.iter().filter(|h| matches!(h, Header::Route(_))).cloned());
    headers.push(Header::ContentLength(rsip::headers::ContentLength::from(0u32)));
    Some(rsip::Request {
        method: Method::Ack,
        uri: invite.uri.clone(),
        version: rsip::Version::V2,
        headers: headers.into(),
        body: Vec::new(),
    })
}

/// 100 Trying for an INVITE: the request's Via, From, To (no tag: §8.2.6.1 leaves it out of a
/// 100), Call-ID and CSeq, and its Timestamp (§8.2.6.1).
/// A stateless `503 Service Unavailable` with `Retry-After` for a request we hold no
/// transaction for. Its To tag is fixed: the response never creates a dialog, and its
/// retransmissions must carry the same tag (§8.2.6.2).
fn overloaded_503(request: &rsip::Request) -> rsip::Response {
    use rsip::headers::UntypedHeader;
    let mut headers: Vec<Header> = Vec::with_capacity(8);
    for header in request.headers.iter() {
        match header {
            Header::Via(_) | Header::From(_) | Header::CallId(_) | Header::CSeq(_) => headers.push(header.clone()),
            Header::To(to) if to.tag().ok().flatten().is_none() => {
                headers.push(Header::To(format!("{};tag=overload", to.value()).into()));
            }
            Header::To(_) => headers.push(header.clone()),
            _ => {}
        }
    }
    headers.push(Header::RetryAfter(OVERLOAD_RETRY_AFTER_SECS.to_string().into()));
    headers.push(Header::ContentLength(rsip::headers::ContentLength::from(0u32)));
    rsip::Response {
        status_code: rsip::StatusCode::ServiceUnavailable,
        version: rsip::Version::V2,
        headers: headers.into(),
        body: Vec::new(),
    }
}

fn provisional_100(request: &rsip::Request) -> rsip::Response {
    let headers: Vec<Header> = request
        .headers
        .iter()
        .filter(|h| {
            matches!(h, Header::Via(_) | Header::From(_) | Header::To(_) | Header::CallId(_) | Header::CSeq(_))
                || matches!(h, Header::Timestamp(_))
        })
        .cloned()
        .chain(std::iter::once(Header::ContentLength(rsip::headers::ContentLength::from(0u32))))
        .collect();
    rsip::Response {
        status_code: rsip::StatusCode::Trying,
        version: rsip::Version::V2,
        headers: headers.into(),
        body: Vec::new(),
    }
}
