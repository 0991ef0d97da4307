//! SIP over TCP and TLS: stream framing (RFC 3261 §18.3), connection reuse (§18.2.2, RFC 5923's
//! "one connection per remote address"), keep-alives (RFC 5626 §3.5.1), idle timeouts and a cap
//! on open connections.
//!
//! Connections are opened on demand by [`Streams::send`]: TCP to any peer, TLS only to an
//! address registered with [`Streams::add_tls_route`] (a trunk's gateway), because a TLS client
//! must know which name the server's certificate has to carry (RFC 3261 §26.2.1, RFC 5922), and
//! an address alone does not say it. Connections we open to an address given a keep-alive
//! interval ([`Streams::set_keepalive`]) send CRLFCRLF pings so that NATs keep the binding.
//!
//! Each connection is two tasks: a reader that cuts messages out of a bounded buffer with
//! [`frame_stream`] and hands them to the endpoint, and a writer that drains the connection's
//! bounded send queue. Splitting them means a connection whose reader is waiting for a busy
//! endpoint (backpressure) still delivers what the endpoint sends, so the two can never wait on
//! each other. The endpoint never waits for a peer either: [`Streams::send`] only queues, and a
//! peer that stops reading until its queue is full is disconnected.
//!
//! [`Streams`] maps each remote address to its live connection's queue. The map is behind a std
//! `Mutex` held only to look up, insert or remove an entry, never across an `.await`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::metrics::METRICS;
use patchbay_sip::message::{Limits, Parsed, StreamFrame, StreamFramer, parse_stream_message};
use patchbay_sip::transaction::{Peer, Transport};
use rsip::SipMessage;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_rustls::TlsConnector;

use super::{Inbound, SourceLimiter, source_key, stamp_via};

/// Messages queued for one connection before its peer counts as not reading and is dropped.
const SEND_QUEUE: usize = 64;
/// Longest a single write may block before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a TCP connect or a TLS handshake may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 8 * 1024;
/// A receive buffer that grew past this is released once it is empty again, so an idle
/// connection that once carried a large message does not keep its memory.
const KEEP_BUFFER: usize = 16 * 1024;
/// Longest one message may take to arrive once its first byte has: a slow sender (slowloris)
/// holds a connection and its buffer at most this long per message, however it paces its bytes
/// to dodge the idle timeout. Kamailio's `tcp_msg_read_timeout` has the same default.
pub const MESSAGE_DEADLINE: Duration = Duration::from_secs(20);
/// RFC 5626 §3.5.1: the client's keep-alive ping; the server answers with a single CRLF.
const PING: &[u8] = b"\r\n\r\n";

/// Why a TLS client configuration could not be built: always the local side (the CA file).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsClientError {
    /// The extra CA is not valid PEM.
    #[error("CA file is not valid PEM: {0}")]
    Pem(rustls::pki_types::pem::Error),
    /// The extra CA holds no `CERTIFICATE` block.
    #[error("CA file holds no certificate")]
    NoCertificate,
    /// A certificate in the extra CA cannot be a trust anchor.
    #[error("CA certificate refused: {0}")]
    Certificate(rustls::Error),
    /// The crypto provider offers no usable protocol version (a build problem, not a config one).
    #[error("TLS provider: {0}")]
    Provider(rustls::Error),
}

/// A TLS client configuration that trusts the public web PKI (the webpki roots) and, when
/// given, a private CA (PEM, one or more certificates), for gateways whose certificate a
/// carrier issued itself. Certificates are always verified: there is no way to turn it off.
pub fn tls_client_config(extra_ca_pem: Option<&[u8]>) -> Result<Arc<rustls::ClientConfig>, TlsClientError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = extra_ca_pem {
        let mut added = 0usize;
        for cert in CertificateDer::pem_slice_iter(pem) {
            roots.add(cert.map_err(TlsClientError::Pem)?).map_err(TlsClientError::Certificate)?;
            added += 1;
        }
        // A file that parses but holds no certificate (a key, say) is a mistake, not "no CA".
        if added == 0 {
            return Err(TlsClientError::NoCertificate);
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(TlsClientError::Provider)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// How stream connections behave.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// Message limits; a connection buffers at most `max_message_bytes` of unparsed input.
    pub limits: Limits,
    /// Close a connection that carried nothing in either direction for this long (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Connections open at once (both directions, TLS handshakes included); more are refused.
    pub max_connections: usize,
    /// Connections one source (an IPv4 address, an IPv6 /64) may have open to us at once,
    /// handshakes included; more from it are refused (0: no cap beyond `max_connections`).
    pub max_connections_per_source: usize,
    /// How long a message may take to arrive once it has begun ([`MESSAGE_DEADLINE`]).
    pub message_deadline: Duration,
    /// Messages per second accepted from one source address over all its connections (0: off).
    pub max_messages_per_source: u32,
}

/// The live TCP/TLS connections, by remote address, and what they share.
#[derive(Debug)]
pub struct Streams {
    settings: StreamSettings,
    endpoint: mpsc::Sender<Inbound>,
    limiter: Mutex<SourceLimiter>,
    table: Mutex<Table>,
    open: AtomicUsize,
    /// Connections open per source that opened them (only sources with one: bounded by
    /// `max_connections`).
    per_source: Mutex<HashMap<u128, usize>>,
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    by_peer: HashMap<Peer, Writer>,
    /// Where to reconnect to a peer whose connection closed (§18.2.2): its address with the
    /// port of its top Via's sent-by, learnt from the requests it sent.
    reopen_at: HashMap<Peer, SocketAddr>,
    /// What we know about addresses we connect to (trunk gateways), set from configuration.
    routes: HashMap<SocketAddr, Route>,
}

/// How connections we open to one address behave.
#[derive(Debug, Clone, Default)]
struct Route {
    /// How to open TLS to it; without it, a TLS connection to this address cannot be opened.
    tls: Option<TlsRoute>,
    /// RFC 5626 §4.4.1: send CRLFCRLF this often on connections we open to it.
    keepalive: Option<Duration>,
}

#[derive(Debug, Clone)]
struct TlsRoute {
    /// The name the server's certificate must carry (sent as SNI too).
    server_name: ServerName<'static>,
    config: Arc<rustls::ClientConfig>,
}

/// Most peers whose reconnection address is remembered; beyond it the map starts over.
const MAX_REOPEN_ENTRIES: usize = 65_536;

/// The send side of one connection, as kept in the table.
#[derive(Debug, Clone)]
struct Writer {
    id: u64,
    queue: mpsc::Sender<Vec<u8>>,
    close: Arc<Notify>,
}

/// A connection's entry in the table and the receiving end of its queue.
struct Registered {
    id: u64,
    queue_rx: mpsc::Receiver<Vec<u8>>,
    /// The reader's own handle on the queue, for keep-alive answers and error responses.
    replies: mpsc::Sender<Vec<u8>>,
    close: Arc<Notify>,
}

/// One of the `max_connections` places (and, for a connection a peer opened, one of its
/// source's `max_connections_per_source`); given back when dropped.
struct Slot(Arc<Streams>, Option<u128>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(source) = self.1 {
            let mut per_source = self.0.per_source.lock().unwrap_or_else(PoisonError::into_inner);
            if let std::collections::hash_map::Entry::Occupied(mut open) = per_source.entry(source) {
                *open.get_mut() -= 1;
                if *open.get() == 0 {
                    open.remove();
                }
            }
        }
    }
}

impl Streams {
    /// Connections deliver their messages to `endpoint`.
    pub fn new(settings: StreamSettings, endpoint: mpsc::Sender<Inbound>) -> Arc<Self> {
        let limiter = Mutex::new(SourceLimiter::new(settings.max_messages_per_source));
        Arc::new(Self {
            settings,
            endpoint,
            limiter,
            table: Mutex::default(),
            open: AtomicUsize::new(0),
            per_source: Mutex::default(),
        })
    }

    /// Lets [`Streams::send`] open TLS connections to `addr`, verifying that the server's
    /// certificate is valid for `server_name` under `config`'s roots. A trunk registers each
    /// resolved address of its gateway with the gateway's host name: RFC 5922 checks the
    /// certificate against the configured SIP domain, never against what DNS returned. Replaces
    /// an earlier route for `addr`; connections already open keep the one they were opened with.
    pub fn add_tls_route(&self, addr: SocketAddr, server_name: ServerName<'static>, config: Arc<rustls::ClientConfig>) {
        self.table().routes.entry(addr).or_default().tls = Some(TlsRoute { server_name, config });
    }

    /// Makes connections we open to `addr` from now on send a CRLFCRLF ping every `interval`
    /// (RFC 5626 §3.5.1, §4.4.1) so that NATs and firewalls keep the binding; `None` stops it
    /// for later connections. Pings count as traffic: such a connection is never closed as idle,
    /// which is the point for a trunk's gateway. Connections the peer opened never ping: it is
    /// the client's job, and we answer its pings.
    pub fn set_keepalive(&self, addr: SocketAddr, interval: Option<Duration>) {
        // A zero period would be a busy loop (and `tokio::time::interval` panics on it).
        let interval = interval.filter(|i| !i.is_zero());
        self.update_route(addr, |route| route.keepalive = interval);
    }

    fn update_route(&self, addr: SocketAddr, change: impl FnOnce(&mut Route)) {
        let mut table = self.table();
        let route = table.routes.entry(addr).or_default();
        change(route);
        if route.tls.is_none() && route.keepalive.is_none() {
            table.routes.remove(&addr);
        }
    }

    /// Queues `bytes` on the live connection to `peer`, opening a connection if there is none
    /// (TCP always; TLS when the address has a route). Never waits: a connection whose queue is
    /// full is closed (its peer is not reading).
    pub fn send(self: &Arc<Self>, peer: Peer, bytes: Vec<u8>) {
        let writer = self.table().by_peer.get(&peer).cloned();
        let bytes = match writer {
            Some(writer) => match writer.queue.try_send(bytes) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(to = %peer.addr, "SIP peer is not reading: connection closed, message dropped");
                    self.unregister(peer, writer.id);
                    writer.close.notify_one();
                    return;
                }
                // The connection is closing; open a fresh one below.
                Err(mpsc::error::TrySendError::Closed(bytes)) => {
                    self.unregister(peer, writer.id);
                    bytes
                }
            },
            None => bytes,
        };
        self.connect(peer, bytes);
    }

    /// Opens a connection to `peer` in the background; `first` and whatever is sent meanwhile
    /// waits in the new connection's queue.
    fn connect(self: &Arc<Self>, peer: Peer, first: Vec<u8>) {
        // §18.2.2: when the connection a request came on is gone, the response (and, the same
        // way, an in-dialog request) goes to the source address at the port the peer listens
        // on (its sent-by), not to the ephemeral port it connected from.
        let (addr, route) = {
            let table = self.table();
            let addr = table.reopen_at.get(&peer).copied().unwrap_or(peer.addr);
            (addr, table.routes.get(&addr).cloned().unwrap_or_default())
        };
        let tls = match (peer.transport, route.tls) {
            (Transport::Tcp, _) => None,
            (Transport::Tls, Some(tls)) => Some(tls),
            // TLS peers that reached us are answered over their own connection; without a
            // route there is no name to verify a server certificate against.
            (Transport::Tls, None) => {
                tracing::warn!(to = %addr, "no TLS connection to this peer and no TLS route to open one; message dropped");
                return;
            }
            (Transport::Udp, _) => {
                tracing::warn!(to = %addr, "UDP is not a stream transport; message dropped");
                return;
            }
        };
        let Some(slot) = self.reserve() else {
            tracing::warn!(to = %peer.addr, "SIP connection limit reached: message dropped");
            return;
        };
        let registered = self.register(peer);
        let _ = registered.replies.try_send(first);
        let keepalive = route.keepalive;
        let streams = Arc::clone(self);
        tokio::spawn(async move {
            let tcp = match tokio::time::timeout(SETUP_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(e)) => return streams.setup_failed(peer, addr, registered, format_args!("SIP connect: {e}")),
                Err(_) => return streams.setup_failed(peer, addr, registered, format_args!("SIP connect timed out")),
            };
            let _ = tcp.set_nodelay(true);
            let Some(TlsRoute { server_name, config }) = tls else {
                tracing::debug!(to = %addr, "SIP connection opened");
                return streams.serve(tcp, peer, registered, slot, keepalive).await;
            };
            let handshake = TlsConnector::from(config).connect(server_name.clone(), tcp);
            match tokio::time::timeout(SETUP_TIMEOUT, handshake).await {
                Ok(Ok(tls)) => {
                    tracing::debug!(to = %addr, server_name = %server_name.to_str(), "SIP TLS connection opened");
                    streams.serve(tls, peer, registered, slot, keepalive).await;
                }
                // The reason (an unknown issuer, a name mismatch, an expired certificate) is in
                // `e`; the transaction learns of it by timing out (RFC 3261 §17.1.1.2 timer B,
                // §17.1.2.2 timer F).
                Ok(Err(e)) => {
                    let name = server_name.to_str();
                    streams.setup_failed(peer, addr, registered, format_args!("SIP TLS handshake with {name}: {e}"));
                }
                Err(_) => streams.setup_failed(peer, addr, registered, format_args!("SIP TLS handshake timed out")),
            }
        });
    }

    /// A connection that never came up: the messages queued for it are dropped, and the next
    /// send tries again.
    fn setup_failed(&self, peer: Peer, addr: SocketAddr, registered: Registered, why: std::fmt::Arguments<'_>) {
        self.unregister(peer, registered.id);
        let dropped = registered.queue_rx.len();
        tracing::warn!(to = %addr, dropped, "{why}; messages dropped");
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for a connection we open.
    fn reserve(self: &Arc<Self>) -> Option<Slot> {
        let max = self.settings.max_connections;
        self.open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Slot(Arc::clone(self), None))
    }

    /// A place for a connection `from` opened, within the total and its source's share.
    fn admit(self: &Arc<Self>, from: std::net::IpAddr) -> Result<Slot, &'static str> {
        let source = source_key(from);
        let cap = self.settings.max_connections_per_source;
        let mut per_source = self.per_source.lock().unwrap_or_else(PoisonError::into_inner);
        let open = per_source.get(&source).copied().unwrap_or(0);
        if cap > 0 && open >= cap {
            return Err("per-source connection limit reached");
        }
        let Some(mut slot) = self.reserve() else { return Err("connection limit reached") };
        *per_source.entry(source).or_insert(0) += 1;
        slot.1 = Some(source);
        Ok(slot)
    }

    /// Makes a connection the one used for `peer`. A newer connection to the same address
    /// replaces an older one for sending; the older one still delivers what it receives.
    fn register(&self, peer: Peer) -> Registered {
        let (queue, queue_rx) = mpsc::channel(SEND_QUEUE);
        let close = Arc::new(Notify::new());
        let mut table = self.table();
        let id = table.next_id;
        table.next_id += 1;
        table.by_peer.insert(peer, Writer { id, queue: queue.clone(), close: Arc::clone(&close) });
        Registered { id, queue_rx, replies: queue, close }
    }

    fn unregister(&self, peer: Peer, id: u64) {
        let mut table = self.table();
        if table.by_peer.get(&peer).is_some_and(|w| w.id == id) {
            table.by_peer.remove(&peer);
        }
    }

    /// Runs one established connection until it closes, then gives its slot back. `keepalive`
    /// is for connections we opened only (RFC 5626 §4.4.1: the client pings).
    async fn serve<S>(
        self: Arc<Self>,
        stream: S,
        peer: Peer,
        registered: Registered,
        slot: Slot,
        keepalive: Option<Duration>,
    ) where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let Registered { id, queue_rx, replies, close } = registered;
        let (read, write) = tokio::io::split(stream);
        let activity = Arc::new(Activity::new());
        let writer =
            tokio::spawn(write_loop(write, queue_rx, Arc::clone(&activity), Arc::clone(&close), peer, keepalive));
        self.read_loop(read, peer, &replies, &close, &activity).await;
        self.unregister(peer, id);
        // With the table's and the reader's senders gone, the writer sends what is queued (an
        // error response, say), shuts the connection down and ends.
        drop(replies);
        let _ = writer.await;
        tracing::debug!(peer = %peer.addr, "SIP connection closed");
        drop(slot);
    }

    async fn read_loop<R: AsyncRead + Unpin>(
        &self,
        mut read: R,
        peer: Peer,
        replies: &mpsc::Sender<Vec<u8>>,
        close: &Notify,
        activity: &Activity,
    ) {
        let limits = &self.settings.limits;
        let mut buf: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; READ_CHUNK];
        let mut framer = StreamFramer::default();
        // When the message now in `buf` must have arrived whole (slowloris).
        let mut deadline: Option<Instant> = None;
        loop {
            loop {
                // RFC 5626 §3.5.1: the CRLF answering our ping. Taken here, so that two pongs in
                // a row are not read as a ping from the peer (and answered).
                if buf.starts_with(b"\r\n") && activity.take_pong() {
                    buf.drain(..2);
                    framer.reset();
                    continue;
                }
                match framer.frame(&buf, limits) {
                    StreamFrame::Incomplete => break,
                    StreamFrame::KeepAlive { len } => {
                        // RFC 5626 §3.5.1: a CRLFCRLF ping gets a CRLF pong; a pong needs nothing.
                        if buf[..len] == *b"\r\n\r\n" {
                            let _ = replies.try_send(b"\r\n".to_vec());
                        }
                        buf.drain(..len);
                        deadline = None;
                    }
                    StreamFrame::Complete { len } => {
                        let endpoint_alive = self.on_message(&buf[..len], peer, replies).await;
                        buf.drain(..len);
                        // The deadline is per message: the next one's starts with its bytes.
                        deadline = None;
                        if !endpoint_alive {
                            return;
                        }
                    }
                    StreamFrame::Invalid(error) => {
                        // §18.3: without a trustworthy Content-Length the stream cannot be framed
                        // any further; answer if we can, then close.
                        tracing::debug!(from = %peer.addr, "unframeable SIP stream: {error}");
                        let mut out = Vec::new();
                        if error.write_response(None, &mut out) {
                            let _ = replies.try_send(out);
                        }
                        return;
                    }
                }
            }
            if buf.is_empty() && buf.capacity() > KEEP_BUFFER {
                buf = Vec::new();
            }
            if buf.is_empty() {
                deadline = None;
            } else if deadline.is_none() {
                deadline = Some(Instant::now() + self.settings.message_deadline);
            }
            let whole_message = async {
                match deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            // `frame_stream` decides (a whole message, or too large) before the buffer holds
            // `max_message_bytes`, so there is always room here; if not, closing is the safe answer.
            let room = limits.max_message_bytes.saturating_sub(buf.len()).min(chunk.len());
            if room == 0 {
                return;
            }
            let idle = async {
                match self.settings.idle_timeout {
                    Some(idle) => loop {
                        let deadline = activity.last() + idle;
                        if deadline <= Instant::now() {
                            return;
                        }
                        tokio::time::sleep_until(deadline).await;
                    },
                    None => std::future::pending().await,
                }
            };
            let n = tokio::select! {
                read = read.read(&mut chunk[..room]) => match read {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) => {
                        tracing::debug!(from = %peer.addr, "SIP connection: {e}");
                        return;
                    }
                },
                () = close.notified() => return,
                () = idle => {
                    tracing::debug!(peer = %peer.addr, "SIP connection idle: closing");
                    return;
                }
                () = whole_message => {
                    METRICS.sip_drop("too-slow");
                    tracing::info!(peer = %peer.addr, buffered = buf.len(), "SIP message not complete in time (slow sender): closing");
                    return;
                }
            };
            activity.touch();
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Parses and delivers one framed message. Returns false when the endpoint is gone.
    async fn on_message(&self, bytes: &[u8], peer: Peer, replies: &mpsc::Sender<Vec<u8>>) -> bool {
        let allowed = self
            .limiter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .allow(peer.addr.ip(), std::time::Instant::now());
        if !allowed {
            METRICS.sip_drop("rate-limit");
            return true;
        }
        let message = match parse_stream_message(bytes, &self.settings.limits) {
            Ok(Parsed::Sip(message)) => message,
            Ok(Parsed::ExtensionRequest(request)) => {
                // §8.2.1: a method we do not know at all.
                let mut out = Vec::new();
                request.write_response(501, "Not Implemented", None, &mut out);
                let _ = replies.try_send(out);
                return true;
            }
            Ok(_) => return true,
            Err(error) => {
                METRICS.sip_drop("parse-error");
                // The framing held, so the stream goes on after a bad message.
                tracing::debug!(from = %peer.addr, "bad SIP message: {error}");
                let mut out = Vec::new();
                if error.write_response(None, &mut out) {
                    let _ = replies.try_send(out);
                }
                return true;
            }
        };
        let message = match message {
            SipMessage::Request(mut request) => {
                // received/rport are noted as on UDP, but §18.2.2 sends responses back over this
                // connection, so `peer` stays the connection's remote address.
                let _ = stamp_via(&mut request, peer.addr);
                if let Some(port) = sent_by_port(&request, peer.transport) {
                    let mut table = self.table();
                    if table.reopen_at.len() >= MAX_REOPEN_ENTRIES {
                        table.reopen_at.clear();
                    }
                    table.reopen_at.insert(peer, SocketAddr::new(peer.addr.ip(), port));
                }
                request.into()
            }
            response @ SipMessage::Response(_) => response,
        };
        // Waiting here is the backpressure: the peer's TCP window fills while the endpoint is busy.
        self.endpoint.send(Inbound { peer, message }).await.is_ok()
    }
}

/// The port of a request's top Via sent-by, or the transport's default (§18.2.2, §19.1.2: 5060
/// for TCP, 5061 for TLS).
fn sent_by_port(request: &rsip::Request, transport: Transport) -> Option<u16> {
    use rsip::headers::ToTypedHeader;
    use rsip::prelude::HeadersExt;
    let via = request.via_header().ok()?.typed().ok()?;
    let default = if transport == Transport::Tls { 5061 } else { 5060 };
    Some(via.uri.host_with_port.port.map_or(default, |p| *p.value()))
}

/// What the writer sends next.
enum Outgoing {
    Queued(Vec<u8>),
    Ping,
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut write: W,
    mut queue: mpsc::Receiver<Vec<u8>>,
    activity: Arc<Activity>,
    close: Arc<Notify>,
    peer: Peer,
    keepalive: Option<Duration>,
) {
    let mut pings = keepalive.map(|every| {
        let mut pings = tokio::time::interval_at(Instant::now() + every, every);
        // After a stalled write, one ping is enough: a burst would not refresh the NAT better.
        pings.set_missed_tick_behavior(MissedTickBehavior::Delay);
        pings
    });
    loop {
        let ping_due = async {
            match pings.as_mut() {
                Some(pings) => {
                    pings.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        // Both branches are cancel-safe: a message is taken from the queue only when chosen.
        let next = tokio::select! {
            queued = queue.recv() => match queued {
                Some(bytes) => Outgoing::Queued(bytes),
                None => break,
            },
            () = ping_due => Outgoing::Ping,
        };
        let bytes = match &next {
            Outgoing::Queued(bytes) => bytes.as_slice(),
            Outgoing::Ping => PING,
        };
        // Before the write: the pong may be read before the write call returns.
        if matches!(next, Outgoing::Ping) {
            activity.expect_pong();
        }
        match tokio::time::timeout(WRITE_TIMEOUT, write.write_all(bytes)).await {
            Ok(Ok(())) => activity.touch(),
            Ok(Err(e)) => {
                tracing::debug!(to = %peer.addr, "SIP connection write: {e}");
                break;
            }
            Err(_) => {
                tracing::warn!(to = %peer.addr, "SIP connection write timed out: closing");
                break;
            }
        }
    }
    let _ = tokio::time::timeout(WRITE_TIMEOUT, write.shutdown()).await;
    // Wakes the reader if the writer gave up first.
    close.notify_one();
}

/// When a connection last carried bytes in either direction, and whether a ping of ours
/// awaits its pong.
#[derive(Debug)]
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    pong_due: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Self { start: Instant::now(), last_ms: AtomicU64::new(0), pong_due: AtomicBool::new(false) }
    }

    fn expect_pong(&self) {
        self.pong_due.store(true, Ordering::Relaxed);
    }

    /// Whether a CRLF now is the pong to our last ping (consumed: one pong per ping).
    fn take_pong(&self) -> bool {
        self.pong_due.swap(false, Ordering::Relaxed)
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Accepts TCP connections on `listener` until the process ends.
pub async fn tcp_listener(listener: TcpListener, streams: Arc<Streams>) {
    loop {
        let Some((stream, from, slot)) = accept(&listener, &streams).await else { continue };
        let _ = stream.set_nodelay(true);
        let peer = Peer { transport: Transport::Tcp, addr: from };
        let registered = streams.register(peer);
        tokio::spawn(Arc::clone(&streams).serve(stream, peer, registered, slot, None));
    }
}

/// Accepts TLS connections on `listener` until the process ends. The handshake runs in the
/// connection's own task, bounded by a timeout, and holds a connection slot meanwhile.
pub async fn tls_listener(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor, streams: Arc<Streams>) {
    loop {
        let Some((stream, from, slot)) = accept(&listener, &streams).await else { continue };
        let _ = stream.set_nodelay(true);
        let (acceptor, streams) = (acceptor.clone(), Arc::clone(&streams));
        tokio::spawn(async move {
            match tokio::time::timeout(SETUP_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let peer = Peer { transport: Transport::Tls, addr: from };
                    let registered = streams.register(peer);
                    streams.serve(tls, peer, registered, slot, None).await;
                }
                Ok(Err(e)) => tracing::debug!(%from, "TLS handshake: {e}"),
                Err(_) => tracing::debug!(%from, "TLS handshake timed out"),
            }
        });
    }
}

/// Accepts one connection and takes a slot for it; `None` when it was refused or failed.
async fn accept(listener: &TcpListener, streams: &Arc<Streams>) -> Option<(TcpStream, std::net::SocketAddr, Slot)> {
    let (stream, from) = match listener.accept().await {
        Ok(accepted) => accepted,
        Err(e) => {
            // EMFILE and friends: back off instead of spinning on a listener we cannot serve.
            tracing::warn!("SIP accept: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
            return None;
        }
    };
    match streams.admit(from.ip()) {
        Ok(slot) => Some((stream, from, slot)),
        Err(why) => {
            tracing::warn!(%from, "SIP {why}: refused");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::io::DuplexStream;

    use super::*;

    const OPTIONS: &str = "OPTIONS sip:echo@127.0.0.1 SIP/2.0\r\n\
        Via: SIP/2.0/TCP 127.0.0.1:5070;branch=z9hG4bK1;rport\r\n\
        Max-Forwards: 70\r\nFrom: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:echo@127.0.0.1>\r\n\
        Call-ID: c1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n";

    const OK: &str = "SIP/2.0 200 OK\r\n\
        Via: SIP/2.0/TLS 127.0.0.1:5061;branch=z9hG4bK1\r\n\
        From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:echo@127.0.0.1>;tag=2\r\n\
        Call-ID: c1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n";

    const WAIT: Duration = Duration::from_secs(5);

    fn streams(max_connections: usize) -> (Arc<Streams>, mpsc::Receiver<Inbound>) {
        let (endpoint, inbound) = mpsc::channel(16);
        let settings = StreamSettings {
            limits: Limits::default(),
            idle_timeout: None,
            max_connections,
            max_connections_per_source: 2,
            message_deadline: MESSAGE_DEADLINE,
            max_messages_per_source: 0,
        };
        (Streams::new(settings, endpoint), inbound)
    }

    /// A connection from `peer` served in the background; the test holds the client end.
    fn connect(streams: &Arc<Streams>, peer: Peer) -> DuplexStream {
        let (client, server) = tokio::io::duplex(1 << 20);
        let slot = streams.reserve().expect("a free slot");
        let registered = streams.register(peer);
        tokio::spawn(Arc::clone(streams).serve(server, peer, registered, slot, None));
        client
    }

    fn peer() -> Peer {
        Peer { transport: Transport::Tcp, addr: "192.0.2.1:40000".parse().expect("addr") }
    }

    #[tokio::test]
    async fn messages_are_cut_by_content_length_however_they_arrive() {
        let (streams, mut inbound) = streams(10);
        let mut client = connect(&streams, peer());
        let two = format!("{OPTIONS}{OPTIONS}");
        client.write_all(two.as_bytes()).await.expect("write");
        let (first, second) = OPTIONS.split_at(40);
        client.write_all(first.as_bytes()).await.expect("write");
        tokio::task::yield_now().await;
        client.write_all(second.as_bytes()).await.expect("write");
        for _ in 0..3 {
            let Inbound { peer: from, message } = inbound.recv().await.expect("a message");
            // §18.2.2: the answer goes back over this connection, named by its remote address.
            assert_eq!(from, peer());
            // §18.2.1 / RFC 3581: the source is noted in the top Via.
            let text = message.to_string();
            assert!(text.contains("received=192.0.2.1") && text.contains("rport=40000"), "{text}");
        }
    }

    #[tokio::test]
    async fn a_ping_gets_a_pong_and_sends_reuse_the_connection() {
        let (streams, _inbound) = streams(10);
        let mut client = connect(&streams, peer());
        client.write_all(b"\r\n\r\n").await.expect("write");
        let mut pong = [0u8; 2];
        client.read_exact(&mut pong).await.expect("pong");
        assert_eq!(&pong, b"\r\n");
        streams.send(peer(), b"SIP/2.0 200 OK\r\n".to_vec());
        let mut reply = [0u8; 16];
        client.read_exact(&mut reply).await.expect("the message sent to the peer");
        assert_eq!(&reply, b"SIP/2.0 200 OK\r\n");
    }

    #[tokio::test]
    async fn an_oversized_message_is_answered_413_and_the_connection_closed() {
        let (streams, mut inbound) = streams(10);
        let mut client = connect(&streams, peer());
        let huge = OPTIONS.replace("Content-Length: 0", "Content-Length: 70000");
        client.write_all(huge.as_bytes()).await.expect("write");
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.expect("closed");
        assert!(answer.starts_with(b"SIP/2.0 413"), "{}", String::from_utf8_lossy(&answer));
        assert!(inbound.try_recv().is_err(), "nothing reaches the endpoint");
    }

    #[tokio::test]
    async fn a_closed_connection_is_reopened_to_the_via_sent_by_port() {
        // The peer listens on `listener`'s port and says so in its Via; it connected from
        // another (ephemeral) port and then closed that connection (§18.2.2).
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (streams, mut inbound) = streams(10);
        let ephemeral = Peer { transport: Transport::Tcp, addr: "127.0.0.1:1".parse().expect("addr") };
        let mut client = connect(&streams, ephemeral);
        let options = OPTIONS.replace("127.0.0.1:5070", &format!("127.0.0.1:{port}"));
        client.write_all(options.as_bytes()).await.expect("write");
        inbound.recv().await.expect("the request");
        drop(client);
        // Wait until the closed connection has left the table, then answer.
        let deadline = Instant::now() + Duration::from_secs(5);
        while streams.table().by_peer.contains_key(&ephemeral) {
            assert!(Instant::now() < deadline, "the connection never closed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        streams.send(ephemeral, b"SIP/2.0 200 OK\r\n".to_vec());
        let (mut reopened, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
            .await
            .expect("a connection to the sent-by port")
            .expect("accept");
        let mut reply = [0u8; 16];
        reopened.read_exact(&mut reply).await.expect("the response");
        assert_eq!(&reply, b"SIP/2.0 200 OK\r\n");
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_refused_until_one_closes() {
        let (streams, _inbound) = streams(1);
        let client = connect(&streams, peer());
        assert!(streams.reserve().is_none(), "the only slot is taken");
        drop(client);
        let deadline = Instant::now() + Duration::from_secs(5);
        while streams.reserve().is_none() {
            assert!(Instant::now() < deadline, "the slot was never given back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn one_source_holds_at_most_its_share_of_the_connections() {
        let (streams, _inbound) = streams(10);
        let attacker: std::net::IpAddr = "192.0.2.66".parse().expect("ip");
        let (first, second) = (streams.admit(attacker).expect("one"), streams.admit(attacker).expect("two"));
        assert!(streams.admit(attacker).is_err(), "a third connection from one address is refused");
        // Another address of the same IPv6 /64 is the same source.
        let v6 = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
        let held = [streams.admit(v6("2001:db8::1")).expect("one"), streams.admit(v6("2001:db8::2")).expect("two")];
        assert!(streams.admit(v6("2001:db8::ffff:3")).is_err(), "the /64 has its two");
        // Everyone else still gets in, and the attacker gets a place back when one closes.
        let other = streams.admit("198.51.100.7".parse().expect("ip")).expect("another source");
        drop(first);
        let again = streams.admit(attacker).expect("a place given back");
        drop((second, again, held, other));
        assert!(streams.per_source.lock().expect("lock").is_empty(), "closed connections leave no entry");
    }

    /// Slowloris: a sender that trickles a message a byte a second never goes idle, but its
    /// message must be whole within the deadline, or the connection closes.
    #[tokio::test(start_paused = true)]
    async fn a_message_trickled_past_its_deadline_closes_the_connection() {
        let (endpoint, mut inbound) = mpsc::channel(16);
        let settings = StreamSettings {
            limits: Limits::default(),
            idle_timeout: Some(Duration::from_secs(120)),
            max_connections: 10,
            max_connections_per_source: 0,
            message_deadline: MESSAGE_DEADLINE,
            max_messages_per_source: 0,
        };
        let streams = Streams::new(settings, endpoint);
        let mut client = connect(&streams, peer());
        let start = Instant::now();
        let slow = async {
            for byte in OPTIONS.as_bytes().iter().cycle().take(10_000) {
                if client.write_all(&[*byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        };
        slow.await;
        let closed_after = start.elapsed();
        // The writes fail once the server's end is gone: its reader closed the connection.
        assert!(closed_after >= MESSAGE_DEADLINE, "closed after {closed_after:?}: before the deadline");
        assert!(closed_after < MESSAGE_DEADLINE + Duration::from_secs(5), "closed after {closed_after:?}");
        assert!(inbound.try_recv().is_err(), "no message was delivered");
    }

    /// A carrier's private PKI: a CA, and the certificate it issued to its gateway
    /// `carrier.test`. `ca_pem` holds an unrelated certificate too: a CA file may hold several.
    struct CarrierPki {
        ca_pem: String,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    }

    fn carrier_pki() -> CarrierPki {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "Carrier test CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
        let gateway_key = rcgen::KeyPair::generate().expect("gateway key");
        let gateway = rcgen::CertificateParams::new(vec!["carrier.test".to_owned()])
            .expect("gateway params")
            .signed_by(&gateway_key, &ca, &ca_key)
            .expect("gateway certificate");
        let other = rcgen::generate_simple_self_signed(vec!["other.test".to_owned()]).expect("other certificate");
        CarrierPki {
            ca_pem: format!("{}{}", other.cert.pem(), ca.pem()),
            chain: vec![gateway.der().clone()],
            key: PrivatePkcs8KeyDer::from(gateway_key.serialize_der()).into(),
        }
    }

    type Accepted = std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>;

    /// The carrier's gateway on loopback; each connection's handshake outcome is handed over.
    async fn gateway(pki: &CarrierPki) -> (SocketAddr, mpsc::Receiver<Accepted>) {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(pki.chain.clone(), pki.key.clone_key())
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (accepted, accepted_rx) = mpsc::channel(4);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                if accepted.send(acceptor.accept(tcp).await).await.is_err() {
                    break;
                }
            }
        });
        (addr, accepted_rx)
    }

    fn tls_route(streams: &Streams, addr: SocketAddr, pki: &CarrierPki, name: &'static str) {
        let config = tls_client_config(Some(pki.ca_pem.as_bytes())).expect("client config");
        streams.add_tls_route(addr, ServerName::try_from(name).expect("server name"), config);
    }

    #[tokio::test]
    async fn outbound_tls_to_a_routed_gateway_carries_messages_both_ways() {
        let pki = carrier_pki();
        let (addr, mut accepted) = gateway(&pki).await;
        let (streams, mut inbound) = streams(10);
        tls_route(&streams, addr, &pki, "carrier.test");
        let peer = Peer { transport: Transport::Tls, addr };
        streams.send(peer, OPTIONS.as_bytes().to_vec());
        let mut tls = tokio::time::timeout(WAIT, accepted.recv())
            .await
            .expect("a connection in time")
            .expect("a connection")
            .expect("the handshake, verified against the private CA");
        let mut received = vec![0u8; OPTIONS.len()];
        tls.read_exact(&mut received).await.expect("the request");
        assert_eq!(received, OPTIONS.as_bytes());
        tls.write_all(OK.as_bytes()).await.expect("write");
        let Inbound { peer: from, message } =
            tokio::time::timeout(WAIT, inbound.recv()).await.expect("in time").expect("the response");
        assert_eq!(from, peer);
        assert!(matches!(message, SipMessage::Response(_)), "{message}");
        // Exactly the request: no keep-alive was asked for, nothing else follows.
        let mut more = [0u8; 1];
        assert!(tokio::time::timeout(Duration::from_millis(200), tls.read(&mut more)).await.is_err());
        // Later messages reuse the connection (§18.2.2).
        streams.send(peer, OPTIONS.as_bytes().to_vec());
        tls.read_exact(&mut received).await.expect("the second request");
        assert_eq!(received, OPTIONS.as_bytes());
    }

    #[tokio::test]
    async fn outbound_tls_refuses_a_certificate_for_another_name() {
        let pki = carrier_pki();
        let (addr, mut accepted) = gateway(&pki).await;
        let (streams, mut inbound) = streams(10);
        tls_route(&streams, addr, &pki, "wrong.test");
        let peer = Peer { transport: Transport::Tls, addr };
        streams.send(peer, OPTIONS.as_bytes().to_vec());
        let handshake = tokio::time::timeout(WAIT, accepted.recv()).await.expect("in time").expect("an attempt");
        assert!(handshake.is_err(), "the client aborts the handshake");
        // The failed connection leaves the table and its slot, so the next send tries afresh.
        let deadline = Instant::now() + WAIT;
        while streams.table().by_peer.contains_key(&peer) || streams.open.load(Ordering::Acquire) > 0 {
            assert!(Instant::now() < deadline, "the failed connection was never cleared");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(inbound.try_recv().is_err(), "nothing reaches the endpoint");
        streams.send(peer, OPTIONS.as_bytes().to_vec());
        let again = tokio::time::timeout(WAIT, accepted.recv()).await.expect("in time").expect("a second attempt");
        assert!(again.is_err());
    }

    #[tokio::test]
    async fn a_tls_peer_without_a_route_gets_no_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (streams, _inbound) = streams(10);
        let peer = Peer { transport: Transport::Tls, addr };
        streams.send(peer, OPTIONS.as_bytes().to_vec());
        assert!(tokio::time::timeout(Duration::from_millis(200), listener.accept()).await.is_err());
        assert!(!streams.table().by_peer.contains_key(&peer));
        assert_eq!(streams.open.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_ca_file_must_hold_a_certificate() {
        assert!(tls_client_config(None).is_ok());
        // The likely mistake: the key file named where the CA belongs.
        let key = rcgen::KeyPair::generate().expect("key").serialize_pem();
        assert!(matches!(tls_client_config(Some(key.as_bytes())), Err(TlsClientError::NoCertificate)));
        assert!(matches!(tls_client_config(Some(b"not a PEM file")), Err(TlsClientError::NoCertificate)));
        let broken = b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n";
        assert!(matches!(tls_client_config(Some(broken)), Err(TlsClientError::Pem(_))));
    }

    #[tokio::test]
    async fn connections_we_open_ping_at_the_keepalive_interval() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (streams, _inbound) = streams(10);
        let every = Duration::from_millis(100);
        streams.set_keepalive(addr, Some(every));
        let opened = Instant::now();
        streams.send(Peer { transport: Transport::Tcp, addr }, OPTIONS.as_bytes().to_vec());
        let (mut gateway, _) = tokio::time::timeout(WAIT, listener.accept()).await.expect("in time").expect("accept");
        let mut received = vec![0u8; OPTIONS.len()];
        gateway.read_exact(&mut received).await.expect("the request");
        assert_eq!(received, OPTIONS.as_bytes());
        for n in 1..=2 {
            let mut ping = [0u8; 4];
            tokio::time::timeout(WAIT, gateway.read_exact(&mut ping)).await.expect("a ping in time").expect("read");
            assert_eq!(&ping, PING);
            assert!(opened.elapsed() >= every * n, "ping {n} came early");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pongs_to_our_pings_are_not_taken_for_pings() {
        let (streams, _inbound) = streams(10);
        let (mut gateway, ours) = tokio::io::duplex(1 << 16);
        let slot = streams.reserve().expect("a free slot");
        let registered = streams.register(peer());
        let every = Duration::from_secs(30);
        tokio::spawn(Arc::clone(&streams).serve(ours, peer(), registered, slot, Some(every)));
        let start = Instant::now();
        for n in 1..=3 {
            let mut ping = [0u8; 4];
            gateway.read_exact(&mut ping).await.expect("a ping");
            assert_eq!(&ping, PING);
            assert_eq!(start.elapsed(), every * n);
            gateway.write_all(b"\r\n").await.expect("pong");
        }
        // Two pongs in a row look like a ping; answered, a CRLF would arrive before the next ping.
        let mut more = [0u8; 1];
        assert!(tokio::time::timeout(every / 2, gateway.read(&mut more)).await.is_err());
        // The peer's own ping is still answered.
        gateway.write_all(PING).await.expect("ping");
        let mut pong = [0u8; 2];
        gateway.read_exact(&mut pong).await.expect("pong");
        assert_eq!(&pong, b"\r\n");
    }
}
