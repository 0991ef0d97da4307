//! Out-of-dialog OPTIONS pings (RFC 3261 §11) for carrier-trunk keep-alives: over UDP they
//! keep the NAT binding to the carrier open, and their answer tells whether it is reachable.
//!
//! A ping is one OPTIONS in a non-INVITE client transaction owned by `TxOwner::Ping`. It holds
//! no state outside that transaction: the answer (or timer F) ends it, reported as
//! [`UaEvent::PingAnswered`]. Any final response counts as an answer, a 401/407 included:
//! a challenge proves the carrier is there as well as a 200 does, and a keep-alive has nothing
//! to gain from credentials, so challenges to pings are never answered.

use std::time::Instant;

use rsip::Header;

use super::{ALLOW, TxOwner, UaEvent, UserAgent};
use crate::transaction::{Peer, TransactionId};

/// Identifies a ping within one [`UserAgent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PingRef(pub u64);

/// An OPTIONS ping to send with [`UserAgent::ping`].
#[derive(Debug, Clone)]
pub struct Ping {
    /// The next hop: the carrier or the trunk's outbound proxy (the shell resolves it; this
    /// crate does no DNS). Over UDP this is the NAT binding the ping keeps open.
    pub peer: Peer,
    /// The Request-URI, e.g. `sip:carrier.test`.
    pub target: rsip::Uri,
    /// The From header value without a tag, e.g. `<sip:patchbay@carrier.test>`.
    pub from: String,
}

impl UserAgent {
    /// Sends one OPTIONS to `ping.peer` (RFC 3261 §11.1) and returns the ping. Its outcome
    /// arrives as [`UaEvent::PingAnswered`]: the status of the first final response, or `None`
    /// when none arrived within 64·T1 (timer F, §17.1.2.2). Over UDP the transaction layer
    /// retransmits it meanwhile (timer E).
    ///
    /// Each ping is a transaction of its own with a fresh Call-ID and CSeq 1: nothing in §11
    /// ties pings together, and a Call-ID per ping keeps no state between them.
    pub fn ping(&mut self, now: Instant, ping: Ping) -> PingRef {
        self.counter += 1;
        let id = PingRef(self.counter);
        let call_id = format!("{}@{}", self.unique(), self.config.contact_host);
        let from_tag = self.unique();
        let headers = vec![
            self.new_via(ping.peer.transport),
            Header::MaxForwards(70u32.into()),
            Header::From(format!("{};tag={from_tag}", ping.from).into()),
            // §8.1.1.2: no To tag outside a dialog; the To names the target.
            Header::To(format!("<{}>", ping.target).into()),
            Header::CallId(call_id.into()),
            Header::CSeq("1 OPTIONS".into()),
            Header::Contact(format!("<{}>", self.contact_uri(None, ping.peer.transport)).into()),
            Header::Allow(ALLOW.into()),
            // §11.1: an OPTIONS SHOULD say which body types the answer may carry.
            Header::Accept("application/sdp".into()),
            Header::UserAgent(self.config.user_agent.clone().into()),
            Header::ContentLength(0u32.into()),
        ];
        let request = rsip::Request {
            method: rsip::Method::Options,
            uri: ping.target,
            version: rsip::Version::V2,
            headers: headers.into(),
            body: Vec::new(),
        };
        if self.send_client(now, TxOwner::Ping(id), ping.peer, request, 0).is_none() {
            // Only a request we built badly is refused; the caller still hears how it ended.
            self.emit(UaEvent::PingAnswered { ping: id, status: None });
        }
        self.pump(now);
        id
    }

    /// A response to a ping's OPTIONS. Provisional responses say nothing final; the first
    /// final one ends the ping (later ones are absorbed by the transaction, §17.1.2.2).
    pub(super) fn on_ping_response(&mut self, id: TransactionId, ping: PingRef, status: u16) {
        if status < 200 {
            return;
        }
        self.client_txs.remove(&id);
        self.emit(UaEvent::PingAnswered { ping, status: Some(status) });
    }

    /// A ping's OPTIONS got no final response in time (timer F): the peer is unreachable.
    pub(super) fn on_ping_timeout(&mut self, ping: PingRef) {
        self.emit(UaEvent::PingAnswered { ping, status: None });
    }
}

#[cfg(test)]
#[path = "ua_ping_tests.rs"]
mod tests;
