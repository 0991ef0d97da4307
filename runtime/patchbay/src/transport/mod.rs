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

pub use stream::{StreamSettings, Streams, tcp_listener, tls_client_config, tls_listener};
pub use udp::udp_receiver;

use std::collections::HashMap;
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

/// Per-source token buckets (messages per second, burst twice that), bounded in size.
#[derive(Debug)]
pub struct SourceLimiter {
    per_sec: f64,
    buckets: HashMap<IpAddr, (f64, Instant)>,
    dropped: u64,
}

/// Most sources tracked at once; beyond it the map is cleared (new sources start full).
const MAX_TRACKED_SOURCES: usize = 65_536;

impl SourceLimiter {
    /// `per_sec` = 0 turns limiting off.
    pub fn new(per_sec: u32) -> Self {
        Self { per_sec: f64::from(per_sec), buckets: HashMap::new(), dropped: 0 }
    }

    /// Whether a message from `source` may be processed now.
    pub fn allow(&mut self, source: IpAddr, now: Instant) -> bool {
        if self.per_sec <= 0.0 {
            return true;
        }
        if self.buckets.len() >= MAX_TRACKED_SOURCES && !self.buckets.contains_key(&source) {
            self.buckets.clear();
        }
        let burst = self.per_sec * 2.0;
        let (tokens, last) = self.buckets.entry(source).or_insert((burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*last).as_secs_f64() * self.per_sec).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            self.dropped += 1;
            if self.dropped.is_power_of_two() {
                tracing::warn!(%source, dropped = self.dropped, "SIP rate limit: dropping messages");
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
