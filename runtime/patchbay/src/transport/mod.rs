//! SIP transports: sockets in, validated messages to the endpoint; bytes out to peers.
//!
//! - **UDP** ([`udp_receiver`]): one datagram is one message.
//! - **TCP and TLS** ([`tcp_listener`], [`tls_listener`], [`Streams`]): messages are cut from
//!   the byte stream by Content-Length (mandatory on streams, RFC 3261 §18.3); one connection
//!   per remote address, reused for later messages in both directions; idle connections are
//!   closed; CRLFCRLF keep-alives are answered with CRLF (RFC 5626 §3.5.1). Connections are
//!   opened on demand: TCP to any peer, TLS to addresses registered with
//!   [`Streams::add_tls_route`] (a trunk's gateway, verified against the trunk's host name with
//!   the webpki roots plus an optional private CA, [`tls_client_config`]); other TLS peers are
//!   answered over the connection they opened. Connections we open to an address with a
//!   keep-alive interval ([`Streams::set_keepalive`]) send CRLFCRLF pings (RFC 5626 §4.4.1).
//!
//! The receive side is bounded: datagrams larger than the message limit are cut off by the
//! buffer and refused by the parser, a stream connection never buffers more than one maximal
//! message and is closed when a message would exceed it, the number of stream connections is
//! capped, each source address has a token bucket (a flood from one address is dropped before
//! parsing and cannot starve other peers), and the channel to the endpoint is bounded (when the
//! endpoint falls behind, UDP input is dropped — the peers' retransmissions recover it — while
//! stream connections simply stop reading, pushing back on the sender through TCP).
//!
//! Where responses go (§18.2.2): over UDP to the source address and the `rport` (RFC 3581) or
//! sent-by port; over TCP/TLS back over the connection the request came on, which is what the
//! [`Peer`] of a stream message names (its remote address). When that TCP connection has closed,
//! a new one is opened to the source address at the Via sent-by port (the same for our
//! in-dialog requests to that peer; over TLS only when that address has a route).

mod stream;
mod udp;

pub use stream::{MESSAGE_DEADLINE, StreamSettings, Streams, tcp_listener, tls_client_config, tls_listener};
pub use udp::udp_receiver;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use patchbay_sip::transaction::{Peer, Transport};
use rsip::SipMessage;
use rsip::headers::ToTypedHeader;
use tokio::net::UdpSocket;

/// A valid message for the endpoint.
#[derive(Debug)]
pub struct Inbound {
    /// For a request: where its responses go (RFC 3261 §18.2.2 with RFC 3581). For a response:
    /// where it came from.
    pub peer: Peer,
    /// The message, with `received`/`rport` filled in on a request's top Via.
    pub message: SipMessage,
}

/// The send side of every transport.
#[derive(Debug, Clone, Default)]
pub struct Outbound {
    udp: Option<Arc<UdpSocket>>,
    streams: Option<Arc<Streams>>,
}

impl Outbound {
    /// Sends over UDP from `socket`.
    pub fn with_udp(mut self, socket: Arc<UdpSocket>) -> Self {
        self.udp = Some(socket);
        self
    }

    /// Sends over TCP and TLS connections from `streams`.
    pub fn with_streams(mut self, streams: Arc<Streams>) -> Self {
        self.streams = Some(streams);
        self
    }

    /// Sends `bytes` to `peer`. Failures are logged: SIP recovers by retransmission or timeout.
    ///
    /// Over TCP/TLS the message is queued on the live connection to `peer.addr` (never waiting
    /// for the peer to read); a connection is opened when there is none (over TLS, only to an
    /// address with a route, see [`Streams::add_tls_route`]).
    pub async fn send(&self, peer: Peer, bytes: Vec<u8>) {
        match (peer.transport, &self.udp, &self.streams) {
            (Transport::Udp, Some(socket), _) => {
                if let Err(e) = socket.send_to(&bytes, peer.addr).await {
                    tracing::warn!(to = %peer.addr, "udp send: {e}");
                }
            }
            (Transport::Tcp | Transport::Tls, _, Some(streams)) => streams.send(peer, bytes),
            (transport, _, _) => tracing::warn!(?transport, to = %peer.addr, "no such transport; message dropped"),
        }
    }
}

/// Per-source token buckets (messages per second, burst twice that) in a fixed table.
///
/// A source's bucket is a slot chosen by a per-process keyed hash of its address (an IPv6
/// source by its /64, which one host controls whole). The table never grows and is never
/// cleared, so spraying spoofed sources can neither exhaust memory nor refill anyone's bucket:
/// an attacker's bucket only refills with time. (It replaced a map that was cleared at 65,536
/// sources: a spoofed-source flood reset every bucket.) Two sources that share a slot share its
/// rate; with [`SLOTS`] slots and a keyed hash, an attacker cannot aim at a given source's slot.
#[derive(Debug)]
pub struct SourceLimiter {
    per_sec: f64,
    /// (tokens, last refill): allocated at the first message.
    slots: Vec<(f64, Option<Instant>)>,
    hasher: std::collections::hash_map::RandomState,
    dropped: u64,
    /// What the warning about drops says.
    what: &'static str,
}

/// Slots in a limiter's table (65,536 × 24 bytes: 1.5 MiB).
const SLOTS: usize = 65_536;

/// What identifies a source for rate limiting: an IPv4 address, or an IPv6 address's /64.
pub(super) use patchbay_sip::auth::source_prefix as source_key;

impl SourceLimiter {
    /// `per_sec` = 0 turns limiting off.
    pub fn new(per_sec: u32) -> Self {
        Self {
            per_sec: f64::from(per_sec),
            slots: Vec::new(),
            hasher: std::collections::hash_map::RandomState::new(),
            dropped: 0,
            what: "SIP rate limit: dropping messages",
        }
    }

    /// A limiter whose warning about drops says `what`.
    pub fn labelled(per_sec: u32, what: &'static str) -> Self {
        Self { what, ..Self::new(per_sec) }
    }

    /// Whether a message from `source` may be processed now.
    pub fn allow(&mut self, source: IpAddr, now: Instant) -> bool {
        use std::hash::BuildHasher;
        if self.per_sec <= 0.0 {
            return true;
        }
        let burst = self.per_sec * 2.0;
        if self.slots.is_empty() {
            self.slots = vec![(burst, None); SLOTS];
        }
        let slot = (self.hasher.hash_one(source_key(source)) % SLOTS as u64) as usize;
        let (tokens, last) = &mut self.slots[slot];
        let refill = last.map_or(burst, |last| now.saturating_duration_since(last).as_secs_f64() * self.per_sec);
        *tokens = (*tokens + refill).min(burst);
        *last = Some(now);
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            self.dropped += 1;
            if self.dropped.is_power_of_two() {
                tracing::warn!(%source, dropped = self.dropped, "{}", self.what);
            }
            false
        }
    }
}

/// RFC 3261 §18.2.1 and RFC 3581 §4: note where a request really came from in its top Via
/// (`received` when the sent-by host differs from the source address, `rport` filled with the
/// source port when the client asked for it), and work out where its responses go (§18.2.2:
/// the source port with `rport`, else the sent-by port; always the source address).
pub(crate) fn stamp_via(request: &mut rsip::Request, source: SocketAddr) -> SocketAddr {
    let Some(index) = request.headers.iter().position(|h| matches!(h, rsip::Header::Via(_))) else { return source };
    let Some(rsip::Header::Via(via)) = request.headers.iter().nth(index) else { return source };
    let Ok(mut typed) = via.typed() else { return source };
    let sent_by_port = typed.uri.host_with_port.port.map(|p| *p.value()).unwrap_or(5060);
    let sent_by_host = typed.uri.host_with_port.host.to_string();
    let mut reply_port = sent_by_port;
    let mut changed = false;
    for param in &mut typed.params {
        if let rsip::Param::Other(name, value) = param
            && name.value().eq_ignore_ascii_case("rport")
            && value.is_none()
        {
            *value = Some(rsip::param::OtherParamValue::new(source.port().to_string()));
            reply_port = source.port();
            changed = true;
        }
    }
    let has_received = typed.params.iter().any(|p| matches!(p, rsip::Param::Received(_)));
    if sent_by_host != source.ip().to_string() && !has_received {
        typed.params.push(rsip::Param::Received(rsip::param::Received::new(source.ip().to_string())));
        changed = true;
    }
    if changed {
        let mut headers: Vec<rsip::Header> = request.headers.iter().cloned().collect();
        headers[index] = rsip::Header::Via(typed.into());
        request.headers = headers.into();
    }
    SocketAddr::new(source.ip(), reply_port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spraying_spoofed_sources_does_not_refill_an_attackers_bucket() {
        let mut limiter = SourceLimiter::new(10);
        let t0 = Instant::now();
        let attacker: IpAddr = "203.0.113.66".parse().unwrap();
        // The burst (twice the rate), then nothing.
        assert_eq!((0..30).filter(|_| limiter.allow(attacker, t0)).count(), 20);
        // 100,000 spoofed sources in the same instant (a map cleared at 65,536 forgot the
        // attacker here and let it burst again).
        for n in 0..100_000u32 {
            let spoofed = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n));
            limiter.allow(spoofed, t0);
        }
        assert!(!limiter.allow(attacker, t0), "the attacker's bucket stays empty");
        // Time refills it, at the configured rate.
        let later = t0 + std::time::Duration::from_millis(500);
        assert_eq!((0..30).filter(|_| limiter.allow(attacker, later)).count(), 5);
        assert_eq!(limiter.slots.len(), SLOTS, "the table never grows");
    }

    #[test]
    fn an_ipv6_host_is_one_source_however_many_addresses_it_uses() {
        let mut limiter = SourceLimiter::new(5);
        let t0 = Instant::now();
        let allowed =
            (0..100u16).filter(|n| limiter.allow(format!("2001:db8:1:2::{n:x}").parse().unwrap(), t0)).count();
        assert_eq!(allowed, 10, "one /64, one bucket");
        assert!(limiter.allow("2001:db8:1:3::1".parse().unwrap(), t0), "another /64 has its own");
        assert_eq!(source_key("::ffff:192.0.2.1".parse().unwrap()), source_key("192.0.2.1".parse().unwrap()));
    }
}
