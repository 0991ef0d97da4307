//! RFC 3261 §17 transactions, sans-IO.
//!
//! [`TransactionLayer`] holds every client and server transaction of an endpoint. It never
//! reads a clock or touches a socket: the shell feeds it received messages and the current
//! time, asks it to send requests and responses, and drains what it wants done:
//!
//! ```text
//!   handle_receive(now, peer, msg) ─┐
//!   send_request(now, peer, req)  ──┼─► TransactionLayer ─► poll_output(): Transmit | Event
//!   send_response(now, id, resp)  ──┤                    ─► poll_timeout(): next deadline
//!   handle_timeout(now)           ──┘
//! ```
//!
//! What it implements: INVITE and non-INVITE client and server transactions with timers A–K
//! (T1/T2/T4 configurable), retransmission over unreliable transports, absorption of
//! retransmitted requests, the ACK for non-2xx final responses inside the client transaction
//! (§17.1.1.3), the RFC 6026 "Accepted" states for 2xx, the UAS core's 2xx retransmission until
//! the ACK arrives (§13.3.1.4) with an event when it never does, matching by branch with the
//! RFC 2543 fallback (§17.1.3, §17.2.3), and an immediate 100 Trying for INVITE (§17.2.1
//! requires one within 200 ms when the TU is slower).

mod key;
mod layer;
#[cfg(test)]
mod tests;

pub use key::{ClientKey, ServerKey};
pub use layer::{MAX_SERVER_TRANSACTIONS, TransactionLayer};

use std::net::SocketAddr;
use std::time::Duration;

/// Transport a message travels on. Reliability decides which timers run (§17.1.1.2, §17.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP: unreliable; the transaction layer retransmits.
    Udp,
    /// TCP: reliable.
    Tcp,
    /// TLS over TCP: reliable.
    Tls,
}

impl Transport {
    /// Whether the transport delivers reliably (no retransmissions needed).
    pub fn is_reliable(self) -> bool {
        !matches!(self, Transport::Udp)
    }
}

/// The other end of a message: its transport and address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Peer {
    /// Transport.
    pub transport: Transport,
    /// Remote address.
    pub addr: SocketAddr,
}

/// Timer base values (RFC 3261 §17.1.1.1, Table 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerConfig {
    /// RTT estimate (default 500 ms).
    pub t1: Duration,
    /// Maximum retransmit interval for non-INVITE requests and INVITE responses (default 4 s).
    pub t2: Duration,
    /// Maximum time a message stays in the network (default 5 s).
    pub t4: Duration,
}

impl Default for TimerConfig {
    fn default() -> Self {
        Self { t1: Duration::from_millis(500), t2: Duration::from_secs(4), t4: Duration::from_secs(5) }
    }
}

impl TimerConfig {
    /// 64·T1: timers B, F, H, J (unreliable), L and M.
    pub fn t1_x64(&self) -> Duration {
        self.t1 * 64
    }
}

/// Identifies a transaction within one [`TransactionLayer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransactionId(pub u64);

/// What the layer wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send this message to this peer.
    Transmit {
        /// Destination.
        peer: Peer,
        /// The message.
        message: rsip::SipMessage,
    },
    /// Tell the transaction user (the UA core or dialog layer).
    Event(Event),
}

/// What the transaction user is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new request started a server transaction; the TU must answer it with
    /// [`TransactionLayer::send_response`].
    Request {
        /// The server transaction.
        id: TransactionId,
        /// Where it came from.
        peer: Peer,
        /// The request.
        request: rsip::Request,
        /// For a CANCEL: the INVITE server transaction it cancels, if any (§9.2). The TU should
        /// answer the CANCEL 200 and the INVITE 487 when the INVITE has no final response yet;
        /// without a match the CANCEL gets 481.
        cancels: Option<TransactionId>,
    },
    /// An ACK that belongs to no server transaction: the ACK for a 2xx, which is its own
    /// transaction-less request (§17.1.1.3). The layer has already stopped retransmitting the
    /// 2xx it acknowledges.
    Ack {
        /// Where it came from.
        peer: Peer,
        /// The ACK.
        request: rsip::Request,
    },
    /// A response for a client transaction (provisional or final; 2xx retransmissions for an
    /// INVITE are passed on too, per RFC 6026, so the TU re-sends its ACK).
    Response {
        /// The client transaction.
        id: TransactionId,
        /// The response.
        response: rsip::Response,
    },
    /// A response that matches no client transaction. A UA drops it (§17.1.3 hands it to the
    /// core; only a proxy forwards it).
    StrayResponse {
        /// The response.
        response: rsip::Response,
    },
    /// A client transaction got no final response in time (timer B or F): the TU acts as if
    /// it had received a 408 (§8.1.3.1).
    Timeout {
        /// The client transaction.
        id: TransactionId,
    },
    /// A final non-2xx response to an INVITE was never acknowledged (timer H), or a 2xx was
    /// retransmitted for 64·T1 without an ACK (§13.3.1.4: the TU should send BYE). The most
    /// common cause in the field is a wrong Contact or Record-Route, so log it loudly.
    AckTimeout {
        /// The INVITE server transaction.
        id: TransactionId,
    },
    /// The transaction is gone; its id will not be used again.
    Terminated {
        /// The transaction.
        id: TransactionId,
    },
}

/// Why the layer refused a request from the TU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransactionError {
    /// The transaction does not exist (any more).
    #[error("no transaction {0:?}")]
    UnknownTransaction(TransactionId),
    /// A request or response lacks what a transaction needs (top Via with a branch, CSeq).
    #[error("message unusable for a transaction: {0}")]
    BadMessage(String),
    /// A response was sent in a state that takes none (after the final response).
    #[error("transaction {0:?} already has its final response")]
    AlreadyFinal(TransactionId),
    /// ACK is never sent through a client transaction (§17.1.1.3): use
    /// [`TransactionLayer::send_stateless`].
    #[error("ACK is not sent in a transaction")]
    AckNotTransactional,
}
