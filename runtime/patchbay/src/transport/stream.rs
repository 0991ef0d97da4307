//! SIP over TCP and TLS: stream framing (RFC 3261 §18.3), connection reuse (§18.2.2, RFC 5923's
//! "one connection per remote address"), keep-alives (RFC 5626 §3.5.1), idle timeouts and a cap
//! on open connections.
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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use patchbay_sip::message::{Limits, Parsed, StreamFrame, frame_stream, parse_stream_message};
use patchbay_sip::transaction::{Peer, Transport};
use rsip::SipMessage;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use super::{Inbound, SourceLimiter, stamp_via};

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

/// How stream connections behave.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// Message limits; a connection buffers at most `max_message_bytes` of unparsed input.
    pub limits: Limits,
    /// Close a connection that carried nothing in either direction for this long (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Connections open at once (both directions, TLS handshakes included); more are refused.
    pub max_connections: usize,
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
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    by_peer: HashMap<Peer, Writer>,
    /// Where to reconnect to a peer whose connection closed (§18.2.2): its address with the
    /// port of its top Via's sent-by, learnt from the requests it sent.
    reopen_at: HashMap<Peer, SocketAddr>,
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

/// One of the `max_connections` places; given back when dropped.
struct Slot(Arc<Streams>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Streams {
    /// Connections deliver their messages to `endpoint`.
    pub fn new(settings: StreamSettings, endpoint: mpsc::Sender<Inbound>) -> Arc<Self> {
        let limiter = Mutex::new(SourceLimiter::new(settings.max_messages_per_source));
        Arc::new(Self { settings, endpoint, limiter, table: Mutex::default(), open: AtomicUsize::new(0) })
    }

    /// Queues `bytes` on the live connection to `peer`, opening a TCP connection if there is
    /// none. Never waits: a connection whose queue is full is closed (its peer is not reading).
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
        match peer.transport {
            Transport::Tcp => self.connect(peer, bytes),
            // Not implemented yet: TLS peers are answered over the connection they opened;
            // a closed TLS connection cannot be reopened from our side.
            _ => {
                tracing::warn!(to = %peer.addr, "no TLS connection to this peer (outbound TLS is not implemented); message dropped")
            }
        }
    }

    /// Opens a TCP connection to `peer` in the background; `first` and whatever is sent
    /// meanwhile waits in the new connection's queue.
    fn connect(self: &Arc<Self>, peer: Peer, first: Vec<u8>) {
        let Some(slot) = self.reserve() else {
            tracing::warn!(to = %peer.addr, "SIP connection limit reached: message dropped");
            return;
        };
        // §18.2.2: when the connection a request came on is gone, the response (and, the same
        // way, an in-dialog request) goes to the source address at the port the peer listens
        // on (its sent-by), not to the ephemeral port it connected from.
        let addr = self.table().reopen_at.get(&peer).copied().unwrap_or(peer.addr);
        let registered = self.register(peer);
        let _ = registered.replies.try_send(first);
        let streams = Arc::clone(self);
        tokio::spawn(async move {
            match tokio::time::timeout(SETUP_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    tracing::debug!(to = %addr, "SIP connection opened");
                    streams.serve(stream, peer, registered, slot).await;
                }
                Ok(Err(e)) => {
                    tracing::warn!(to = %peer.addr, "SIP connect: {e}; messages dropped");
                    streams.unregister(peer, registered.id);
                }
                Err(_) => {
                    tracing::warn!(to = %peer.addr, "SIP connect timed out; messages dropped");
                    streams.unregister(peer, registered.id);
                }
            }
        });
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn reserve(self: &Arc<Self>) -> Option<Slot> {
        let max = self.settings.max_connections;
        self.open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Slot(Arc::clone(self)))
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

    /// Runs one established connection until it closes, then gives its slot back.
    async fn serve<S>(self: Arc<Self>, stream: S, peer: Peer, registered: Registered, slot: Slot)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let Registered { id, queue_rx, replies, close } = registered;
        let (read, write) = tokio::io::split(stream);
        let activity = Arc::new(Activity::new());
        let writer = tokio::spawn(write_loop(write, queue_rx, Arc::clone(&activity), Arc::clone(&close), peer));
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
        loop {
            loop {
                match frame_stream(&buf, limits) {
                    StreamFrame::Incomplete => break,
                    StreamFrame::KeepAlive { len } => {
                        // RFC 5626 §3.5.1: a CRLFCRLF ping gets a CRLF pong; a pong needs nothing.
                        if buf[..len] == *b"\r\n\r\n" {
                            let _ = replies.try_send(b"\r\n".to_vec());
                        }
                        buf.drain(..len);
                    }
                    StreamFrame::Complete { len } => {
                        let endpoint_alive = self.on_message(&buf[..len], peer, replies).await;
                        buf.drain(..len);
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
                if let Some(port) = sent_by_port(&request) {
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

/// The port of a request's top Via sent-by, or the transport's default (§18.2.2: 5060 for TCP;
/// 5061 for TLS, which is not reopened yet).
fn sent_by_port(request: &rsip::Request) -> Option<u16> {
    use rsip::headers::ToTypedHeader;
    use rsip::prelude::HeadersExt;
    let via = request.via_header().ok()?.typed().ok()?;
    Some(via.uri.host_with_port.port.map_or(5060, |p| *p.value()))
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut write: W,
    mut queue: mpsc::Receiver<Vec<u8>>,
    activity: Arc<Activity>,
    close: Arc<Notify>,
    peer: Peer,
) {
    while let Some(bytes) = queue.recv().await {
        match tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&bytes)).await {
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

/// When a connection last carried bytes in either direction.
#[derive(Debug)]
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self { start: Instant::now(), last_ms: AtomicU64::new(0) }
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
        tokio::spawn(Arc::clone(&streams).serve(stream, peer, registered, slot));
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
                    streams.serve(tls, peer, registered, slot).await;
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
    match streams.reserve() {
        Some(slot) => Some((stream, from, slot)),
        None => {
            tracing::warn!(%from, max = streams.settings.max_connections, "SIP connection limit reached: refused");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::DuplexStream;

    use super::*;

    const OPTIONS: &str = "OPTIONS sip:echo@127.0.0.1 SIP/2.0\r\n\
        Via: SIP/2.0/TCP 127.0.0.1:5070;branch=z9hG4bK1;rport\r\n\
        Max-Forwards: 70\r\nFrom: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:echo@127.0.0.1>\r\n\
        Call-ID: c1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n";

    fn streams(max_connections: usize) -> (Arc<Streams>, mpsc::Receiver<Inbound>) {
        let (endpoint, inbound) = mpsc::channel(16);
        let settings = StreamSettings {
            limits: Limits::default(),
            idle_timeout: None,
            max_connections,
            max_messages_per_source: 0,
        };
        (Streams::new(settings, endpoint), inbound)
    }

    /// A connection from `peer` served in the background; the test holds the client end.
    fn connect(streams: &Arc<Streams>, peer: Peer) -> DuplexStream {
        let (client, server) = tokio::io::duplex(1 << 20);
        let slot = streams.reserve().expect("a free slot");
        let registered = streams.register(peer);
        tokio::spawn(Arc::clone(streams).serve(server, peer, registered, slot));
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
}
