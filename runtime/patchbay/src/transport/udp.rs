//! SIP over UDP (RFC 3261 §18.1.1, §18.2.1): one datagram is one message.

use std::sync::Arc;
use std::time::Instant;

use crate::metrics::METRICS;
use patchbay_sip::message::{Limits, Parsed, parse_datagram};
use patchbay_sip::transaction::{Peer, Transport};
use rsip::SipMessage;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::{Inbound, SourceLimiter, stamp_via};

/// Reads datagrams from `socket`, answers what is malformed (400/505/… naming the problem),
/// and passes valid messages to the endpoint.
pub async fn udp_receiver(socket: Arc<UdpSocket>, endpoint: mpsc::Sender<Inbound>, per_source_per_sec: u32) {
    let limits = Limits::default();
    let mut limiter = SourceLimiter::new(per_source_per_sec);
    // One byte more than the limit, so an oversized datagram is seen as oversized, not cut.
    let mut buf = vec![0u8; limits.max_message_bytes + 1];
    let mut out = Vec::with_capacity(2048);
    loop {
        let (len, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP port unreachable from an earlier send surfaces here on Linux.
                tracing::debug!("udp receive: {e}");
                continue;
            }
        };
        if !limiter.allow(from.ip(), Instant::now()) {
            METRICS.sip_drop("rate-limit");
            continue;
        }
        let message = match parse_datagram(&buf[..len], &limits) {
            Ok(Parsed::Sip(message)) => message,
            Ok(Parsed::ExtensionRequest(request)) => {
                // §8.2.1: a method we do not know at all.
                out.clear();
                request.write_response(501, "Not Implemented", None, &mut out);
                let _ = socket.send_to(&out, from).await;
                continue;
            }
            Ok(_) => continue,
            Err(error) => {
                METRICS.sip_drop("parse-error");
                tracing::debug!(%from, "bad SIP message: {error}");
                out.clear();
                if error.write_response(None, &mut out) {
                    let _ = socket.send_to(&out, from).await;
                }
                continue;
            }
        };
        let inbound = match message {
            SipMessage::Request(mut request) => {
                let reply_to = stamp_via(&mut request, from);
                Inbound { peer: Peer { transport: Transport::Udp, addr: reply_to }, message: request.into() }
            }
            response @ SipMessage::Response(_) => {
                Inbound { peer: Peer { transport: Transport::Udp, addr: from }, message: response }
            }
        };
        if endpoint.try_send(inbound).is_err() {
            METRICS.sip_drop("queue-full");
            tracing::warn!("SIP endpoint busy: datagram dropped (the peer will retransmit)");
        }
    }
}
