//! The client: one websocket to an agent server per call.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::{HeaderValue, Uri};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tracing::{Instrument as _, debug, info, warn};

use crate::error::AgentError;
use crate::inbound::Inbound;
use crate::protocol::{Frame160, MAX_MEDIA_FRAME, SAMPLES_PER_MS, StartInfo, StreamEncoder};

/// Default bound of the caller-audio queue: one second of 20 ms frames.
pub const DEFAULT_MEDIA_QUEUE: usize = 50;

/// Bound of the DTMF/mark queue; these are rare, so a full queue means the agent is stuck.
const CONTROL_QUEUE: usize = 4_096;

/// tungstenite's read buffer. Its default (128 KiB) is zero-filled again on every read, which
/// callgrind showed as 83 % of the agent path's instructions at 50 small messages a second per
/// call; agent messages are a few hundred bytes (larger ones just take several reads).
pub(crate) const READ_BUFFER: usize = 2 * 1024;

/// Most messages written before a flush, so a backlog goes out in few syscalls.
const WRITE_BATCH: usize = 32;

/// A flush that takes longer than this means the agent stopped reading: the stream fails.
pub(crate) const WRITE_STALL: Duration = Duration::from_secs(10);

/// How long [`AgentStream::stop`] waits for queued messages and the close handshake.
pub(crate) const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the agent may take to end the connection after its close frame.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Largest websocket message accepted from an agent: about 6 minutes of base64 μ-law.
const MAX_MESSAGE: usize = 4 << 20;

/// What the agent asked for, in the order it asked.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AgentEvent {
    /// 20 ms of agent audio (μ-law) to play to the caller, re-packetised from the agent's
    /// `media` payloads.
    Audio(Frame160),
    /// The agent's `mark`: once every frame received before it has played, call
    /// [`AgentStream::send_mark`] with this name.
    Mark(String),
    /// The agent's `clear`: drop agent audio queued but not yet played, and echo (send back)
    /// the marks queued among it, as Twilio does.
    Clear,
    /// Patchbay extension: transfer the caller to this target (a SIP URI).
    Transfer(String),
    /// Patchbay extension: end the call.
    Hangup,
    /// The agent closed the websocket normally. Terminal: every later `recv` returns it again.
    Closed,
    /// The connection dropped or broke (reset, protocol error, abnormal close code, the
    /// agent stopped reading). Terminal: every later `recv` returns it again.
    Failed(String),
}

/// How to connect. Build with [`ConnectOptions::new`] and the `with_*` methods.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// TLS configuration for `wss://`; `None` uses the public web roots (webpki-roots).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Bound on the whole connect: TCP, TLS, websocket upgrade, `connected` and `start`.
    pub timeout: Duration,
    /// Caller frames queued for the agent before new ones are dropped.
    pub media_queue: usize,
    /// Benchmarks only: record, per caller frame, the time from [`AgentSender::send_media`]
    /// to the writer's flush that put it in the socket ([`AgentStream::take_write_latency`]).
    pub write_probe: bool,
    /// Connect to these addresses (in order) instead of resolving the URL's host, which still
    /// names the server (TLS server name, `Host` header). For a caller that has resolved the
    /// name and checked the addresses itself: connecting to a second lookup could reach
    /// somewhere else.
    pub addrs: Option<Vec<std::net::SocketAddr>>,
}

impl ConnectOptions {
    /// Options with the given connect timeout, public TLS roots and the default queue.
    pub fn new(timeout: Duration) -> Self {
        Self { tls: None, timeout, media_queue: DEFAULT_MEDIA_QUEUE, write_probe: false, addrs: None }
    }

    /// Benchmarks only: see [`ConnectOptions::write_probe`].
    pub fn with_write_probe(mut self, probe: bool) -> Self {
        self.write_probe = probe;
        self
    }

    /// Uses this TLS client configuration for `wss://` (for private CAs).
    pub fn with_tls(mut self, tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        self.tls = tls;
        self
    }

    /// Connects to `addrs` rather than to what the URL's host resolves to (see
    /// [`ConnectOptions::addrs`]); `None` resolves it.
    pub fn with_addrs(mut self, addrs: Option<Vec<std::net::SocketAddr>>) -> Self {
        self.addrs = addrs;
        self
    }

    /// Queues up to `frames` caller frames (at least 1) before dropping.
    pub fn with_media_queue(mut self, frames: usize) -> Self {
        self.media_queue = frames.max(1);
        self
    }
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self::new(Duration::from_secs(5))
    }
}

/// Connects to the agent at `url` (`ws://` or `wss://`), sends `connected` and `start`,
/// and returns the stream. Agents do not answer either message, so nothing is awaited
/// after the websocket upgrade.
///
/// `tls` overrides the public web roots for `wss://`; `timeout` bounds the whole connect.
pub async fn connect(
    url: &str,
    start: &StartInfo,
    tls: Option<Arc<rustls::ClientConfig>>,
    timeout: Duration,
) -> Result<AgentStream, AgentError> {
    connect_with(url, start, &ConnectOptions::new(timeout).with_tls(tls)).await
}

/// [`connect`] with every option.
pub async fn connect_with(url: &str, start: &StartInfo, options: &ConnectOptions) -> Result<AgentStream, AgentError> {
    let target = Target::parse(url)?;
    let tls = if target.tls {
        Some(match &options.tls {
            Some(config) => config.clone(),
            None => default_tls_config()?,
        })
    } else {
        None
    };
    let connecting = async {
        let transport = target.open(tls, options.addrs.as_deref()).await?;
        let request = target.request()?;
        let (ws, _response) = tokio_tungstenite::client_async_with_config(request, transport, Some(websocket_config()))
            .await
            .map_err(AgentError::websocket)?;
        let (mut sink, reader) = ws.split();
        let mut encoder = StreamEncoder::new(start);
        sink.feed(Message::text(encoder.connected())).await.map_err(AgentError::websocket)?;
        sink.feed(Message::text(encoder.start(&start.custom_parameters))).await.map_err(AgentError::websocket)?;
        sink.flush().await.map_err(AgentError::websocket)?;
        Ok::<_, AgentError>((sink, reader, encoder))
    };
    let (sink, reader, encoder) =
        tokio::time::timeout(options.timeout, connecting).await.map_err(|_| AgentError::Timeout(options.timeout))??;
    info!(
        url = %target.uri,
        stream_sid = %start.stream_sid,
        call_sid = %start.call_sid,
        "agent stream connected"
    );

    let (media_tx, media_rx) = mpsc::channel(options.media_queue.max(1));
    let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
    let (failure_tx, failure_rx) = oneshot::channel();
    let span = tracing::info_span!("agent_writer", stream_sid = %start.stream_sid);
    let shared =
        Arc::new(SenderShared { write_times: options.write_probe.then(Default::default), ..SenderShared::default() });
    let queues = Queues { control_rx, media_rx, shared: Arc::clone(&shared) };
    let writer = tokio::spawn(run_writer(sink, encoder, queues, failure_tx).instrument(span));
    Ok(AgentStream {
        sender: AgentSender { shared, media_tx, control_tx },
        reader,
        writer: Some(writer),
        writer_failure: failure_rx,
        writer_ended: false,
        inbound: Inbound::new(&start.stream_sid),
        stream_sid: start.stream_sid.clone(),
    })
}

/// One open media stream to an agent.
///
/// Writes go through a writer task: the `send_*` methods only queue and never block, so
/// they are safe on the media path. Reads happen in [`recv`](Self::recv), in the caller's
/// task: the websocket is read only while `recv` is awaited, so poll it continuously (the
/// caller keeps its own playout queue) or the agent's `clear` arrives late.
#[derive(Debug)]
pub struct AgentStream {
    sender: AgentSender,
    reader: SplitStream<WebSocketStream<Transport>>,
    writer: Option<JoinHandle<()>>,
    writer_failure: oneshot::Receiver<String>,
    writer_ended: bool,
    inbound: Inbound,
    stream_sid: String,
}

impl AgentStream {
    /// Queues one frame of caller audio (μ-law, normally 160 bytes = 20 ms; at most
    /// [`MAX_MEDIA_FRAME`]). See [`AgentSender::send_media`].
    pub fn send_media(&self, mulaw: &[u8]) -> Result<bool, AgentError> {
        self.sender.send_media(mulaw)
    }

    /// Queues a `dtmf` message for a key the caller pressed. See [`AgentSender::send_dtmf`].
    pub fn send_dtmf(&self, digit: char) -> Result<(), AgentError> {
        self.sender.send_dtmf(digit)
    }

    /// Queues a `mark` message: the agent audio before the agent's mark `name` has played
    /// (or was cleared).
    pub fn send_mark(&self, name: &str) -> Result<(), AgentError> {
        self.sender.send_mark(name)
    }

    /// A cloneable handle to send from another task.
    pub fn sender(&self) -> AgentSender {
        self.sender.clone()
    }

    /// Caller frames dropped so far because the agent could not keep up.
    pub fn dropped_media_frames(&self) -> u64 {
        self.sender.dropped_media_frames()
    }

    /// Benchmarks only ([`ConnectOptions::write_probe`]): for the oldest caller frame not asked
    /// about yet, how long it took from [`AgentSender::send_media`] to the flush that wrote it.
    pub fn take_write_latency(&self) -> Option<std::time::Duration> {
        let times = self.sender.shared.write_times.as_ref()?;
        times.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop_front()
    }

    /// The next event from the agent.
    ///
    /// Cancel-safe: a message read from the socket is parsed into an internal queue before
    /// anything is returned, so dropping the future loses nothing. After
    /// [`AgentEvent::Closed`] or [`AgentEvent::Failed`] every call returns that event again.
    pub async fn recv(&mut self) -> AgentEvent {
        loop {
            if let Some(event) = self.inbound.next() {
                return event;
            }
            let close_deadline = self.inbound.close_deadline().map(Instant::from_std);
            tokio::select! {
                biased;
                message = self.reader.next() => self.inbound.on_websocket(message),
                () = tokio::time::sleep_until(close_deadline.unwrap_or_else(Instant::now)),
                    if close_deadline.is_some() =>
                {
                    debug!(stream_sid = %self.stream_sid, "agent did not end the connection after its close");
                    self.inbound.end_close();
                }
                failure = &mut self.writer_failure, if !self.writer_ended => {
                    self.writer_ended = true;
                    // Writes fail once the agent's close arrived: that is not a failure.
                    if let (Ok(reason), false) = (failure, self.inbound.closing()) {
                        self.inbound.finish(AgentEvent::Failed(reason));
                    }
                }
            }
        }
    }

    /// Sends `stop` after the queued caller audio, closes the websocket with a normal close
    /// and waits (briefly) for the agent's close reply.
    pub async fn stop(mut self) {
        let sent = tokio::time::timeout(STOP_TIMEOUT, self.sender.control_tx.send(Control::Stop))
            .await
            .is_ok_and(|r| r.is_ok());
        if let Some(mut writer) = self.writer.take()
            && (!sent || tokio::time::timeout(STOP_TIMEOUT, &mut writer).await.is_err())
        {
            // Stuck writing to an agent that does not read: do not leave it behind.
            debug!(stream_sid = %self.stream_sid, "agent writer did not finish; aborting it");
            writer.abort();
        }
        if sent && !self.inbound.ended() {
            // The close handshake (RFC 6455 §7.1.2): read until the agent's close reply and
            // the end of the connection, ignoring whatever else it still sends.
            let drained =
                tokio::time::timeout(STOP_TIMEOUT, async { while let Some(Ok(_)) = self.reader.next().await {} }).await;
            if drained.is_err() {
                debug!(stream_sid = %self.stream_sid, "agent did not answer the close in time");
            }
        }
        info!(
            stream_sid = %self.stream_sid,
            dropped_media_frames = self.sender.dropped_media_frames(),
            "agent stream stopped"
        );
    }
}

/// A cloneable, non-blocking handle that queues messages to the agent.
#[derive(Debug, Clone)]
pub struct AgentSender {
    shared: Arc<SenderShared>,
    media_tx: mpsc::Sender<MediaChunk>,
    control_tx: mpsc::Sender<Control>,
}

#[derive(Debug, Default)]
struct SenderShared {
    /// Caller samples offered so far, dropped ones included: the media clock.
    samples: AtomicU64,
    dropped: AtomicU64,
    /// Benchmarks only: per media frame written, the time from `send_media` to its flush.
    write_times: Option<std::sync::Mutex<VecDeque<Duration>>>,
}

impl AgentSender {
    /// Queues one frame of caller audio (μ-law, 1 to [`MAX_MEDIA_FRAME`] bytes, normally
    /// 160 = 20 ms) without blocking or allocating.
    ///
    /// If the agent cannot keep up and the queue is full, the frame is dropped and counted
    /// ([`dropped_media_frames`](Self::dropped_media_frames)); that is not an error: returns
    /// whether the frame was queued. The `timestamp` sent with each frame is media time (8
    /// samples per ms), so it advances over dropped frames too; `chunk` counts frames actually
    /// sent.
    pub fn send_media(&self, mulaw: &[u8]) -> Result<bool, AgentError> {
        let len = mulaw.len();
        if len == 0 || len > MAX_MEDIA_FRAME {
            return Err(AgentError::InvalidFrame { len, max: MAX_MEDIA_FRAME });
        }
        let samples = self.shared.samples.fetch_add(len as u64, Ordering::Relaxed);
        let mut chunk = MediaChunk {
            timestamp_ms: samples / SAMPLES_PER_MS,
            len,
            bytes: [0; MAX_MEDIA_FRAME],
            queued: self.shared.write_times.is_some().then(std::time::Instant::now),
        };
        chunk.bytes[..len].copy_from_slice(mulaw);
        match self.media_tx.try_send(chunk) {
            Ok(()) => Ok(true),
            Err(mpsc::error::TrySendError::Full(_)) => {
                let dropped = self.shared.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if dropped.is_power_of_two() {
                    warn!(dropped, "agent is not keeping up; dropping caller audio");
                }
                Ok(false)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(AgentError::Closed),
        }
    }

    /// Queues a `dtmf` message. `digit` is one of `0-9 * # A-D` (lower-case `a-d` accepted).
    pub fn send_dtmf(&self, digit: char) -> Result<(), AgentError> {
        let key = patchbay_media::dtmf::DtmfDigit::from_char(digit)
            .ok_or(AgentError::InvalidDigit(digit.to_ascii_uppercase()))?;
        self.control(Control::Dtmf(key.as_char()))
    }

    /// Queues a `mark` message: the agent audio before the agent's mark `name` has played.
    pub fn send_mark(&self, name: &str) -> Result<(), AgentError> {
        self.control(Control::Mark(name.to_owned()))
    }

    /// Caller frames dropped so far because the agent could not keep up.
    pub fn dropped_media_frames(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    fn control(&self, control: Control) -> Result<(), AgentError> {
        self.control_tx.try_send(control).map_err(|err| match err {
            mpsc::error::TrySendError::Full(_) => AgentError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => AgentError::Closed,
        })
    }
}

/// A caller frame on its way to the writer, inline so queueing does not allocate.
#[derive(Debug)]
struct MediaChunk {
    timestamp_ms: u64,
    len: usize,
    bytes: [u8; MAX_MEDIA_FRAME],
    /// Benchmarks only: when it was queued.
    queued: Option<std::time::Instant>,
}

#[derive(Debug)]
enum Control {
    Dtmf(char),
    Mark(String),
    Stop,
}

#[allow(clippy::large_enum_variant, reason = "a short-lived stack value; boxing would allocate per frame")]
enum Outgoing {
    Media(MediaChunk),
    Control(Control),
}

type Sink = SplitSink<WebSocketStream<Transport>, Message>;

/// What the writer task reads from.
struct Queues {
    control_rx: mpsc::Receiver<Control>,
    media_rx: mpsc::Receiver<MediaChunk>,
    shared: Arc<SenderShared>,
}

async fn run_writer(
    mut sink: Sink,
    mut encoder: StreamEncoder,
    mut queues: Queues,
    failure_tx: oneshot::Sender<String>,
) {
    match write_loop(&mut sink, &mut encoder, &mut queues).await {
        Ok(()) => debug!("agent writer finished"),
        Err(reason) => {
            debug!(%reason, "agent writer failed");
            let _ = failure_tx.send(reason);
        }
    }
}

async fn write_loop(sink: &mut Sink, encoder: &mut StreamEncoder, queues: &mut Queues) -> Result<(), String> {
    let fail = |err: tungstenite::Error| err.to_string();
    let Queues { control_rx, media_rx, shared } = queues;
    // Benchmarks only: when each media frame of the batch was queued.
    let mut queued: Vec<std::time::Instant> = Vec::new();
    loop {
        // Control first: a mark or DTMF is small and the agent may be waiting on it.
        let first = tokio::select! {
            biased;
            control = control_rx.recv() => control.map(Outgoing::Control),
            media = media_rx.recv() => media.map(Outgoing::Media),
        };
        let Some(first) = first else {
            // Every handle was dropped without `stop`: leave politely.
            let _ = tokio::time::timeout(WRITE_STALL, close(sink, CloseCode::Away)).await;
            return Ok(());
        };
        let mut next = Some(first);
        let mut written = 0;
        while let Some(outgoing) = next.take() {
            let text = match outgoing {
                Outgoing::Media(chunk) => {
                    queued.extend(chunk.queued);
                    encoder.media(chunk.timestamp_ms, &chunk.bytes[..chunk.len])
                }
                Outgoing::Control(Control::Dtmf(digit)) => encoder.dtmf(digit),
                Outgoing::Control(Control::Mark(name)) => encoder.mark(&name),
                Outgoing::Control(Control::Stop) => {
                    while let Ok(chunk) = media_rx.try_recv() {
                        let text = encoder.media(chunk.timestamp_ms, &chunk.bytes[..chunk.len]);
                        sink.feed(Message::text(text)).await.map_err(fail)?;
                    }
                    sink.feed(Message::text(encoder.stop())).await.map_err(fail)?;
                    return tokio::time::timeout(WRITE_STALL, close(sink, CloseCode::Normal))
                        .await
                        .map_err(|_| "agent did not accept the close".to_owned())?
                        .map_err(fail);
                }
            };
            sink.feed(Message::text(text)).await.map_err(fail)?;
            written += 1;
            if written < WRITE_BATCH {
                next = match control_rx.try_recv() {
                    Ok(control) => Some(Outgoing::Control(control)),
                    Err(_) => media_rx.try_recv().ok().map(Outgoing::Media),
                };
            }
        }
        tokio::time::timeout(WRITE_STALL, sink.flush())
            .await
            .map_err(|_| format!("agent stopped reading for {WRITE_STALL:?}"))?
            .map_err(fail)?;
        if let Some(times) = &shared.write_times
            && !queued.is_empty()
        {
            let flushed = std::time::Instant::now();
            let mut times = times.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            times.extend(queued.drain(..).map(|at| flushed.duration_since(at)));
        }
    }
}

async fn close(sink: &mut Sink, code: CloseCode) -> Result<(), tungstenite::Error> {
    sink.send(Message::Close(Some(CloseFrame { code, reason: "".into() }))).await
}

/// The websocket limits for an agent's connection.
pub(crate) fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
        .read_buffer_size(READ_BUFFER)
}

/// A parsed `ws://` or `wss://` URL.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) uri: Uri,
    pub(crate) tls: bool,
    /// Host without IPv6 brackets, for DNS and the TLS server name.
    host: String,
    port: u16,
}

impl Target {
    pub(crate) fn parse(url: &str) -> Result<Self, AgentError> {
        let invalid = |reason| AgentError::InvalidUrl { url: url.to_owned(), reason };
        let uri = Uri::from_str(url).map_err(|_| invalid("not a URL"))?;
        let tls = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            Some(_) => return Err(invalid("scheme must be ws or wss")),
            None => return Err(invalid("missing ws:// or wss://")),
        };
        let host = uri.host().ok_or(invalid("missing host"))?;
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host).to_owned();
        if host.is_empty() {
            return Err(invalid("missing host"));
        }
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Ok(Self { uri, tls, host, port })
    }

    /// The websocket upgrade request, with our user agent.
    pub(crate) fn request(&self) -> Result<tungstenite::handshake::client::Request, AgentError> {
        let mut request = (&self.uri).into_client_request().map_err(AgentError::websocket)?;
        request
            .headers_mut()
            .insert("user-agent", HeaderValue::from_static(concat!("patchbay/", env!("CARGO_PKG_VERSION"))));
        Ok(request)
    }

    /// The TCP connection, with Nagle off: to `addrs` when given (in order), else to what the
    /// host resolves to.
    pub(crate) async fn connect_tcp(&self, addrs: Option<&[std::net::SocketAddr]>) -> Result<TcpStream, AgentError> {
        let connect_error = |source| AgentError::Connect { addr: format!("{}:{}", self.host, self.port), source };
        let tcp = match addrs {
            Some(addrs) => TcpStream::connect(addrs).await.map_err(connect_error)?,
            None => TcpStream::connect((self.host.as_str(), self.port)).await.map_err(connect_error)?,
        };
        // 20 ms frames are small: Nagle plus delayed ACKs would add tens of ms.
        if let Err(err) = tcp.set_nodelay(true) {
            debug!(%err, "could not set TCP_NODELAY on the agent connection");
        }
        Ok(tcp)
    }

    async fn open(
        &self,
        tls: Option<Arc<rustls::ClientConfig>>,
        addrs: Option<&[std::net::SocketAddr]>,
    ) -> Result<Transport, AgentError> {
        let tcp = self.connect_tcp(addrs).await?;
        let Some(config) = tls else {
            return Ok(Transport::Plain(tcp));
        };
        let name = ServerName::try_from(self.host.clone()).map_err(|_| AgentError::InvalidUrl {
            url: self.uri.to_string(),
            reason: "host is not a valid TLS server name",
        })?;
        let stream = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(AgentError::Tls)?;
        Ok(Transport::Tls(Box::new(stream)))
    }
}

/// The public web PKI with the `ring` provider, built once.
fn default_tls_config() -> Result<Arc<rustls::ClientConfig>, AgentError> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    if let Some(config) = CONFIG.get() {
        return Ok(config.clone());
    }
    let roots = rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(AgentError::TlsConfig)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(CONFIG.get_or_init(|| Arc::new(config)).clone())
}

/// The byte stream under the websocket.
#[derive(Debug)]
enum Transport {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Transport {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        let t = Target::parse("ws://127.0.0.1:9000/agent?x=1").expect("ws");
        assert!(!t.tls);
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 9000));
        let t = Target::parse("wss://agent.example.com/s").expect("wss");
        assert!(t.tls);
        assert_eq!(t.port, 443);
        let t = Target::parse("ws://[::1]:81/").expect("v6");
        assert_eq!(t.host, "::1");
        for bad in ["http://x/", "x", "", "ws://", "ws:///path"] {
            assert!(matches!(Target::parse(bad), Err(AgentError::InvalidUrl { .. })), "{bad}");
        }
    }

    #[test]
    fn default_tls_config_uses_ring() {
        let config = default_tls_config().expect("config");
        assert!(Arc::ptr_eq(&config, &default_tls_config().expect("again")));
    }
}
