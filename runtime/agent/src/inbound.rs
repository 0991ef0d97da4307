//! What an agent sends, turned into [`AgentEvent`]s: one implementation for both ways of
//! driving a stream, the task-driven [`AgentStream`](crate::AgentStream) and the clock-driven
//! [`ClockLink`](crate::ClockLink).

use std::collections::VecDeque;

use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tracing::{debug, info, warn};

use crate::protocol::{AgentMessage, parse_agent_message};
use crate::repacketize::Repacketizer;
use crate::stream::{AgentEvent, CLOSE_TIMEOUT};

/// The events read from one agent and not handed out yet.
#[derive(Debug)]
pub(crate) struct Inbound {
    repacketizer: Repacketizer,
    pending: VecDeque<AgentEvent>,
    scratch: Vec<u8>,
    terminal: Option<AgentEvent>,
    /// The agent's close arrived: the event to report once the connection has ended, and
    /// until when to wait for that (the driver calls [`Inbound::end_close`] then).
    closing: Option<(AgentEvent, std::time::Instant)>,
    malformed: u64,
    stream_sid: String,
}

impl Inbound {
    pub(crate) fn new(stream_sid: &str) -> Self {
        Self {
            repacketizer: Repacketizer::default(),
            pending: VecDeque::new(),
            scratch: Vec::new(),
            terminal: None,
            closing: None,
            malformed: 0,
            stream_sid: stream_sid.to_owned(),
        }
    }

    /// The next event: queued ones first, then the terminal one (again on every call).
    pub(crate) fn next(&mut self) -> Option<AgentEvent> {
        self.pending.pop_front().or_else(|| self.terminal.clone())
    }

    /// Whether the stream has ended (closed or failed).
    pub(crate) fn ended(&self) -> bool {
        self.terminal.is_some()
    }

    /// Whether the agent's close arrived and the connection has not ended yet.
    pub(crate) fn closing(&self) -> bool {
        self.closing.is_some()
    }

    /// While closing: when to stop waiting for the agent to end the connection.
    pub(crate) fn close_deadline(&self) -> Option<std::time::Instant> {
        self.closing.as_ref().map(|(_, deadline)| *deadline)
    }

    /// Ends the stream with `event` (the first end wins).
    pub(crate) fn finish(&mut self, event: AgentEvent) {
        if self.terminal.is_none() {
            self.repacketizer.flush(&mut self.pending);
            match &event {
                AgentEvent::Failed(reason) => {
                    warn!(stream_sid = %self.stream_sid, %reason, "agent stream failed")
                }
                _ => info!(stream_sid = %self.stream_sid, "agent closed the stream"),
            }
            self.terminal = Some(event);
        }
    }

    /// The connection ended after the agent's close (or the driver stopped waiting for that).
    pub(crate) fn end_close(&mut self) {
        if let Some((event, _)) = self.closing.take() {
            self.finish(event);
        }
    }

    /// One read from the websocket: a message, an error, or (`None`) the end of the stream.
    pub(crate) fn on_websocket(&mut self, message: Option<Result<Message, tungstenite::Error>>) {
        match message {
            Some(Ok(Message::Text(text))) => self.on_text(&text),
            Some(Ok(Message::Binary(data))) => {
                debug!(stream_sid = %self.stream_sid, len = data.len(), "ignoring binary frame from agent");
            }
            Some(Ok(Message::Close(frame))) => {
                let normal = frame
                    .as_ref()
                    .is_none_or(|f| matches!(f.code, CloseCode::Normal | CloseCode::Away | CloseCode::Status));
                let event = if normal {
                    AgentEvent::Closed
                } else {
                    AgentEvent::Failed(
                        frame
                            .map(|f| format!("agent closed with code {}: {}", u16::from(f.code), f.reason))
                            .unwrap_or_default(),
                    )
                };
                // tungstenite sends our close reply on the next read, and the server ends
                // the TCP connection after it (RFC 6455 §7.1.1): keep reading until then.
                self.closing = Some((event, std::time::Instant::now() + CLOSE_TIMEOUT));
            }
            // Pings are answered by tungstenite itself.
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            Some(Err(_)) | None if self.closing.is_some() => self.end_close(),
            Some(Err(tungstenite::Error::ConnectionClosed)) => self.finish(AgentEvent::Closed),
            Some(Err(err)) => self.finish(AgentEvent::Failed(err.to_string())),
            None => self.finish(AgentEvent::Failed("connection ended".to_owned())),
        }
    }

    fn on_text(&mut self, text: &str) {
        match parse_agent_message(text, &mut self.scratch) {
            Ok(AgentMessage::Media) => {
                self.repacketizer.push_audio(&self.scratch, &mut self.pending);
            }
            Ok(AgentMessage::Mark(name)) => {
                debug!(stream_sid = %self.stream_sid, %name, "agent mark");
                self.repacketizer.push_after_audio(AgentEvent::Mark(name), &mut self.pending);
            }
            Ok(AgentMessage::Clear) => {
                debug!(stream_sid = %self.stream_sid, "agent clear");
                self.repacketizer.clear(&mut self.pending);
            }
            Ok(AgentMessage::Transfer(target)) => {
                info!(stream_sid = %self.stream_sid, %target, "agent asks to transfer");
                self.repacketizer.push_after_audio(AgentEvent::Transfer(target), &mut self.pending);
            }
            Ok(AgentMessage::Hangup) => {
                info!(stream_sid = %self.stream_sid, "agent asks to hang up");
                self.repacketizer.push_after_audio(AgentEvent::Hangup, &mut self.pending);
            }
            Ok(AgentMessage::Unknown(event)) => {
                debug!(stream_sid = %self.stream_sid, %event, "ignoring unknown agent event");
            }
            Err(err) => {
                // A misbehaving agent must not flood the log: warn once, then debug.
                self.malformed += 1;
                if self.malformed == 1 {
                    warn!(stream_sid = %self.stream_sid, %err, "ignoring malformed agent message");
                } else {
                    debug!(stream_sid = %self.stream_sid, %err, count = self.malformed, "ignoring malformed agent message");
                }
            }
        }
    }
}
