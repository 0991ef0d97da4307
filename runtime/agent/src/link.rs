//! A `ws://` agent stream driven by the media clock: [`ClockLink`].
//!
//! [`AgentStream`](crate::AgentStream) moves every message through tokio: the media clock
//! queues a caller frame for a writer task, and the agent's answer wakes the session's task,
//! which queues it for the clock. At 500 agent calls on two busy cores those two wake-ups per
//! frame were the whole tail of the latency Patchbay adds (BENCHMARKS.md, "AI agent path").
//! A `ClockLink` has no task: the clock thread that releases a caller frame writes it to the
//! agent's socket itself, and reads the agent's answers at the call's own step — the step at
//! which an answer is played at the earliest anyway. The socket is a non-blocking
//! `std::net::TcpStream` outside tokio's reactor, so a read that finds nothing costs one
//! system call and no wake-up, and nothing waits on a tokio worker.
//!
//! Only `ws://`: a TLS session over a non-blocking socket needs its own record buffering,
//! and `wss://` agents are normally across a network whose own delay dwarfs the hops; they
//! keep the task path.
//!
//! Everything but [`connect_link`] and [`ClockLink::stop`] is synchronous and never blocks:
//! writes the socket does not take at once wait in the websocket's buffer and go with the
//! next write or [`ClockLink::poll`]; while they wait, caller audio beyond
//! [`ConnectOptions::media_queue`](crate::ConnectOptions) frames is dropped and counted, and
//! an agent that reads nothing for [`WRITE_STALL`] fails the stream.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite::handshake::HandshakeError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocket};
use tokio_tungstenite::tungstenite::{self, Message};
use tracing::{debug, info, warn};

use crate::error::AgentError;
use crate::inbound::Inbound;
use crate::protocol::{MAX_MEDIA_FRAME, SAMPLES_PER_MS, StartInfo, StreamEncoder};
use crate::stream::{AgentEvent, ConnectOptions, STOP_TIMEOUT, Target, WRITE_STALL, websocket_config};

/// Bytes one [`ClockLink::poll`] reads at most: the clock thread serves other calls in the
/// same step, and an agent may send a message of megabytes (a whole speech at once). 32 KiB
/// per 20 ms step is 1.6 MB/s, some 150 times the rate of real-time audio in base64 JSON;
/// a larger message arrives over several steps.
const READ_BUDGET: usize = 32 * 1024;

/// The socket under a [`ClockLink`]: tokio's during the handshake (so that connecting can
/// await readiness), then a plain non-blocking one whose reads are budgeted per poll.
#[derive(Debug)]
enum LinkIo {
    Handshaking(tokio::net::TcpStream),
    /// Between the two (never read or written).
    Detached,
    Open {
        tcp: std::net::TcpStream,
        /// Bytes this poll may still read; reads past it "would block" until the next poll.
        budget: usize,
    },
}

fn detached() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "agent socket detached")
}

impl Read for LinkIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            LinkIo::Handshaking(tcp) => tcp.try_read(buf),
            LinkIo::Detached => Err(detached()),
            LinkIo::Open { budget: 0, .. } => Err(io::ErrorKind::WouldBlock.into()),
            LinkIo::Open { tcp, budget } => {
                let limit = buf.len().min(*budget);
                let n = tcp.read(&mut buf[..limit])?;
                *budget -= n;
                Ok(n)
            }
        }
    }
}

impl Write for LinkIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            LinkIo::Handshaking(tcp) => tcp.try_write(buf),
            LinkIo::Detached => Err(detached()),
            LinkIo::Open { tcp, .. } => tcp.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn would_block(err: &tungstenite::Error) -> bool {
    matches!(err, tungstenite::Error::Io(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// Connects to the `ws://` agent at `url`, sends `connected` and `start`, and returns a
/// stream for the media clock to drive. `options.timeout` bounds the whole connect;
/// `options.tls` is not used (a `wss://` URL is refused: use [`connect_with`](crate::connect_with)).
pub async fn connect_link(url: &str, start: &StartInfo, options: &ConnectOptions) -> Result<ClockLink, AgentError> {
    let target = Target::parse(url)?;
    if target.tls {
        return Err(AgentError::InvalidUrl { url: url.to_owned(), reason: "the clock link speaks ws:// only" });
    }
    let connecting = async {
        let tcp = target.connect_tcp(options.addrs.as_deref()).await?;
        let mut attempt = tungstenite::client::client_with_config(
            target.request()?,
            LinkIo::Handshaking(tcp),
            Some(websocket_config()),
        );
        let mut ws = loop {
            match attempt {
                Ok((ws, _response)) => break ws,
                Err(HandshakeError::Interrupted(mid)) => {
                    // The request (a few hundred bytes) went into an empty socket buffer; what
                    // is missing is the agent's answer.
                    if let LinkIo::Handshaking(tcp) = mid.get_ref().get_ref() {
                        tcp.readable().await.map_err(|e| AgentError::Websocket(Box::new(e)))?;
                    }
                    attempt = mid.handshake();
                }
                Err(HandshakeError::Failure(err)) => return Err(AgentError::websocket(err)),
            }
        };
        // The rest of the stream's life is on the media clock, outside tokio's reactor (the
        // websocket keeps whatever the agent sent right after the upgrade).
        let LinkIo::Handshaking(tcp) = std::mem::replace(ws.get_mut(), LinkIo::Detached) else {
            return Err(AgentError::Websocket(Box::new(detached())));
        };
        let tcp = tcp.into_std().map_err(|e| AgentError::Websocket(Box::new(e)))?;
        *ws.get_mut() = LinkIo::Open { tcp, budget: READ_BUDGET };
        Ok::<_, AgentError>(ws)
    };
    let ws =
        tokio::time::timeout(options.timeout, connecting).await.map_err(|_| AgentError::Timeout(options.timeout))??;
    let mut link = ClockLink {
        ws,
        encoder: StreamEncoder::new(start),
        inbound: Inbound::new(&start.stream_sid),
        media_queue: options.media_queue.max(1),
        samples: 0,
        dropped: 0,
        stalled: None,
        stopped: false,
        stream_sid: start.stream_sid.clone(),
    };
    let now = Instant::now();
    let connected = link.encoder.connected();
    link.write(Message::text(connected), now);
    let started = link.encoder.start(&start.custom_parameters);
    link.write(Message::text(started), now);
    link.flush(now);
    if let Some(AgentEvent::Failed(reason)) = link.inbound.next() {
        return Err(AgentError::Websocket(reason.into()));
    }
    info!(url = %target.uri, stream_sid = %start.stream_sid, call_sid = %start.call_sid, "agent link connected");
    Ok(link)
}

/// Written data the agent has not taken yet.
#[derive(Debug, Clone, Copy)]
struct Stall {
    since: Instant,
    /// Caller frames written since it began.
    frames: usize,
}

/// One open `ws://` media stream to an agent, driven by the media clock (see the module
/// documentation). Events are the same as [`AgentStream::recv`](crate::AgentStream::recv)'s.
#[derive(Debug)]
pub struct ClockLink {
    ws: WebSocket<LinkIo>,
    encoder: StreamEncoder,
    inbound: Inbound,
    /// Caller frames written while the agent is not reading before new ones are dropped.
    media_queue: usize,
    /// Caller samples offered so far, dropped ones included: the media clock.
    samples: u64,
    dropped: u64,
    stalled: Option<Stall>,
    stopped: bool,
    stream_sid: String,
}

impl ClockLink {
    /// Writes one frame of caller audio (μ-law, 1 to [`MAX_MEDIA_FRAME`] bytes) as a `media`
    /// message, without blocking. A frame the agent has no room for is dropped and counted
    /// ([`dropped_media_frames`](Self::dropped_media_frames)); that is not an error: returns
    /// whether the frame was written. The `timestamp` is media time, so it advances over
    /// dropped frames too.
    pub fn send_media(&mut self, mulaw: &[u8], now: Instant) -> Result<bool, AgentError> {
        let len = mulaw.len();
        if len == 0 || len > MAX_MEDIA_FRAME {
            return Err(AgentError::InvalidFrame { len, max: MAX_MEDIA_FRAME });
        }
        self.check_open()?;
        let timestamp_ms = self.samples / SAMPLES_PER_MS;
        self.samples += len as u64;
        if let Some(stall) = &mut self.stalled {
            if stall.frames >= self.media_queue {
                self.dropped += 1;
                if self.dropped.is_power_of_two() {
                    warn!(stream_sid = %self.stream_sid, dropped = self.dropped, "agent is not keeping up; dropping caller audio");
                }
                return Ok(false);
            }
            stall.frames += 1;
        }
        let text = self.encoder.media(timestamp_ms, mulaw);
        self.write(Message::text(text), now);
        self.flush(now);
        Ok(true)
    }

    /// Writes a `dtmf` message. `digit` is one of `0-9 * # A-D` (lower-case `a-d` accepted).
    pub fn send_dtmf(&mut self, digit: char, now: Instant) -> Result<(), AgentError> {
        let key = patchbay_media::dtmf::DtmfDigit::from_char(digit)
            .ok_or(AgentError::InvalidDigit(digit.to_ascii_uppercase()))?;
        self.check_open()?;
        let text = self.encoder.dtmf(key.as_char());
        self.write(Message::text(text), now);
        self.flush(now);
        Ok(())
    }

    /// Writes a `mark` message: the agent audio before the agent's mark `name` has played.
    pub fn send_mark(&mut self, name: &str, now: Instant) -> Result<(), AgentError> {
        self.check_open()?;
        let text = self.encoder.mark(name);
        self.write(Message::text(text), now);
        self.flush(now);
        Ok(())
    }

    /// Caller frames dropped so far because the agent did not read.
    pub fn dropped_media_frames(&self) -> u64 {
        self.dropped
    }

    /// Whether written messages are waiting for the agent to read (the socket is full).
    pub fn writes_waiting(&self) -> bool {
        self.stalled.is_some()
    }

    /// The next event from the agent, reading the socket without blocking; `None` when
    /// nothing more has arrived. After [`AgentEvent::Closed`] or [`AgentEvent::Failed`] every
    /// call returns that event again. Also sends what earlier writes left waiting.
    /// Each call reads at most [`READ_BUDGET`] bytes from the socket.
    pub fn poll(&mut self, now: Instant) -> Option<AgentEvent> {
        self.refill_read_budget();
        loop {
            if let Some(event) = self.inbound.next() {
                return Some(event);
            }
            if self.inbound.close_deadline().is_some_and(|deadline| now >= deadline) {
                debug!(stream_sid = %self.stream_sid, "agent did not end the connection after its close");
                self.inbound.end_close();
                continue;
            }
            match self.ws.read() {
                Ok(message) => self.inbound.on_websocket(Some(Ok(message))),
                Err(err) if would_block(&err) => {
                    self.flush(now);
                    return self.inbound.next();
                }
                Err(err) => self.inbound.on_websocket(Some(Err(err))),
            }
        }
    }

    /// Sends `stop` after what is already written, closes the websocket with a normal close
    /// and waits (briefly) for the agent's close reply.
    pub async fn stop(mut self) {
        self.stopped = true;
        if !self.inbound.ended() && !self.inbound.closing() {
            let now = Instant::now();
            let stop = self.encoder.stop();
            self.write(Message::text(stop), now);
            let _ = self.ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() }));
            // The close handshake (RFC 6455 §7.1.2): send what waits (`read` flushes only
            // tungstenite's own replies), read until the agent's close reply and the end of the
            // connection, ignoring whatever else it still sends.
            let deadline = now + STOP_TIMEOUT;
            'handshake: loop {
                self.refill_read_budget();
                match self.ws.flush() {
                    Ok(()) => {}
                    Err(err) if would_block(&err) => {}
                    Err(_) => break,
                }
                loop {
                    match self.ws.read() {
                        Ok(_) => {}
                        Err(err) if would_block(&err) => break,
                        Err(_) => break 'handshake,
                    }
                }
                if Instant::now() >= deadline {
                    debug!(stream_sid = %self.stream_sid, "agent did not answer the close in time");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        info!(stream_sid = %self.stream_sid, dropped_media_frames = self.dropped, "agent stream stopped");
    }

    /// A new poll's worth of reading ([`READ_BUDGET`]).
    fn refill_read_budget(&mut self) {
        if let LinkIo::Open { budget, .. } = self.ws.get_mut() {
            *budget = READ_BUDGET;
        }
    }

    fn check_open(&self) -> Result<(), AgentError> {
        if self.stopped || self.inbound.ended() || self.inbound.closing() { Err(AgentError::Closed) } else { Ok(()) }
    }

    /// Puts `message` in the websocket's buffer (and the socket, if it takes it).
    fn write(&mut self, message: Message, now: Instant) {
        match self.ws.write(message) {
            Ok(()) => {}
            Err(err) if would_block(&err) => self.stall(now),
            Err(err) => self.write_failed(err),
        }
    }

    /// Sends what waits in the websocket's buffer, as far as the socket takes it.
    fn flush(&mut self, now: Instant) {
        match self.ws.flush() {
            Ok(()) => self.stalled = None,
            Err(err) if would_block(&err) => self.stall(now),
            Err(err) => self.write_failed(err),
        }
    }

    fn stall(&mut self, now: Instant) {
        let stall = *self.stalled.get_or_insert(Stall { since: now, frames: 0 });
        if now.saturating_duration_since(stall.since) > WRITE_STALL && !self.inbound.closing() {
            self.inbound.finish(AgentEvent::Failed(format!("agent stopped reading for {WRITE_STALL:?}")));
        }
    }

    fn write_failed(&mut self, err: tungstenite::Error) {
        // Writes fail once the agent's close arrived: that is not a failure.
        if self.inbound.closing() {
            return;
        }
        match err {
            tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
                self.inbound.finish(AgentEvent::Closed)
            }
            other => self.inbound.finish(AgentEvent::Failed(other.to_string())),
        }
    }
}

impl Drop for ClockLink {
    /// Dropped without [`stop`](ClockLink::stop) (the call went away): says so to the agent,
    /// as far as the socket takes it at once.
    fn drop(&mut self) {
        if !self.stopped && !self.inbound.ended() && !self.inbound.closing() {
            let _ = self.ws.close(Some(CloseFrame { code: CloseCode::Away, reason: "".into() }));
            let _ = self.ws.flush();
        }
    }
}
