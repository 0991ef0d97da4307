//! The scripted agent for tests.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info};

use super::{accept_loop, accept_websocket, send_audio, send_text};
use crate::error::AgentError;
use crate::protocol::{AgentEncoder, PatchbayFrame, PatchbayMessage, parse_patchbay_message};

/// One step of a [`ScriptedAgent`]'s script. The script starts when `start` arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ScriptStep {
    /// Send μ-law audio as `media` messages of `.1` ms each (0: one message), back to back.
    SendAudio(Vec<u8>, u64),
    /// Send a `mark`.
    Mark(String),
    /// Wait this many milliseconds (still recording what arrives).
    WaitMs(u64),
    /// Wait until Patchbay has echoed this mark (at any time since `start`).
    WaitForMark(String),
    /// Wait until this many more `media` messages have arrived.
    WaitForMedia(usize),
    /// Send `clear`.
    Clear,
    /// Send the Patchbay `transfer` extension.
    Transfer(String),
    /// Send the Patchbay `hangup` extension.
    Hangup,
    /// Send this text frame verbatim (malformed JSON, unknown events).
    SendText(String),
    /// Close the websocket normally and end the session.
    Close,
    /// Drop the connection without a websocket close.
    Abort,
}

/// What a [`ScriptedAgent`] saw, reported on the channel [`ScriptedAgent::new`] returns.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Observed {
    /// A text frame Patchbay sent.
    Received {
        /// Connection number, from 1 in accept order.
        connection: u64,
        /// The parsed message.
        frame: PatchbayFrame,
        /// The message as JSON, to check exact field names.
        json: serde_json::Value,
    },
    /// A text frame that did not parse (Patchbay should never send one).
    Malformed {
        /// Connection number.
        connection: u64,
        /// The text.
        text: String,
    },
    /// The connection ended; `clean` if a websocket close was exchanged.
    Disconnected {
        /// Connection number.
        connection: u64,
        /// Whether the session ended with a websocket close rather than a drop or error.
        clean: bool,
    },
}

/// A test agent: per connection, records everything it receives and plays a script.
#[derive(Debug, Clone)]
pub struct ScriptedAgent {
    script: Arc<Vec<ScriptStep>>,
    observed: mpsc::UnboundedSender<Observed>,
    connections: Arc<AtomicU64>,
}

enum Wait {
    Until(Instant),
    Mark(String),
    Media(usize),
}

impl ScriptedAgent {
    /// An agent that plays `script` on every connection, and the channel of what it sees.
    pub fn new(script: Vec<ScriptStep>) -> (Self, mpsc::UnboundedReceiver<Observed>) {
        let (observed, rx) = mpsc::unbounded_channel();
        let agent = Self { script: Arc::new(script), observed, connections: Arc::new(AtomicU64::new(0)) };
        (agent, rx)
    }

    /// Serves connections until the future is dropped.
    pub async fn serve(self, listener: TcpListener) {
        accept_loop(listener, "scripted", move |tcp| {
            let agent = self.clone();
            async move {
                if let Err(err) = agent.handle(tcp).await {
                    debug!(%err, "scripted agent session ended with an error");
                }
            }
        })
        .await;
    }

    /// Runs one session on an accepted byte stream.
    pub async fn handle<S>(&self, stream: S) -> Result<(), AgentError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let connection = self.connections.fetch_add(1, Ordering::Relaxed) + 1;
        let result = self.session(connection, stream).await;
        let clean = matches!(result, Ok(true));
        let _ = self.observed.send(Observed::Disconnected { connection, clean });
        result.map(|_| ())
    }

    /// Returns whether the session ended with a websocket close.
    async fn session<S>(&self, connection: u64, stream: S) -> Result<bool, AgentError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut ws = accept_websocket(stream).await?;
        let mut encoder: Option<AgentEncoder> = None;
        let mut step = 0;
        let mut wait: Option<Wait> = None;
        let mut marks_seen = HashSet::new();
        let mut close_seen = false;
        loop {
            if let Some(encoder) = &encoder {
                while wait.is_none() {
                    let Some(current) = self.script.get(step) else {
                        break;
                    };
                    step += 1;
                    debug!(connection, ?current, "scripted agent step");
                    match current {
                        ScriptStep::SendAudio(audio, payload_ms) => {
                            send_audio(&mut ws, encoder, audio, *payload_ms).await?;
                        }
                        ScriptStep::Mark(name) => send_text(&mut ws, encoder.mark(name)).await?,
                        ScriptStep::WaitMs(ms) => {
                            wait = Some(Wait::Until(Instant::now() + Duration::from_millis(*ms)));
                        }
                        ScriptStep::WaitForMark(name) => {
                            if !marks_seen.contains(name) {
                                wait = Some(Wait::Mark(name.clone()));
                            }
                        }
                        ScriptStep::WaitForMedia(0) => {}
                        ScriptStep::WaitForMedia(n) => wait = Some(Wait::Media(*n)),
                        ScriptStep::Clear => send_text(&mut ws, encoder.clear()).await?,
                        ScriptStep::Transfer(target) => {
                            send_text(&mut ws, encoder.transfer(target)).await?;
                        }
                        ScriptStep::Hangup => send_text(&mut ws, encoder.hangup()).await?,
                        ScriptStep::SendText(text) => send_text(&mut ws, text.clone()).await?,
                        ScriptStep::Close => {
                            info!(connection, "scripted agent closes the stream");
                            ws.close(None).await.map_err(AgentError::websocket)?;
                            // Record until Patchbay answers the close.
                            while let Some(Ok(message)) = ws.next().await {
                                if let Message::Text(text) = message {
                                    self.record(connection, &text);
                                }
                            }
                            return Ok(true);
                        }
                        ScriptStep::Abort => {
                            info!(connection, "scripted agent drops the connection");
                            return Ok(false);
                        }
                    }
                }
            }
            let deadline = match &wait {
                Some(Wait::Until(at)) => Some(*at),
                _ => None,
            };
            tokio::select! {
                message = ws.next() => {
                    let text = match message {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Close(_))) => {
                            close_seen = true;
                            continue;
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(_)) | None => return Ok(close_seen),
                    };
                    let Some(frame) = self.record(connection, &text) else {
                        continue;
                    };
                    match frame.message {
                        PatchbayMessage::Start { info, .. } => {
                            encoder = Some(AgentEncoder::new(info.stream_sid));
                        }
                        PatchbayMessage::Mark { name } => {
                            if matches!(&wait, Some(Wait::Mark(waited)) if *waited == name) {
                                wait = None;
                            }
                            marks_seen.insert(name);
                        }
                        PatchbayMessage::Media { .. } => {
                            if let Some(Wait::Media(left)) = &mut wait {
                                *left -= 1;
                                if *left == 0 {
                                    wait = None;
                                }
                            }
                        }
                        _ => {}
                    }
                }
                () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    wait = None;
                }
            }
        }
    }

    fn record(&self, connection: u64, text: &str) -> Option<PatchbayFrame> {
        let parsed = parse_patchbay_message(text).ok().zip(serde_json::from_str(text).ok());
        match parsed {
            Some((frame, json)) => {
                let _ = self.observed.send(Observed::Received { connection, frame: frame.clone(), json });
                Some(frame)
            }
            None => {
                let _ = self.observed.send(Observed::Malformed { connection, text: text.to_owned() });
                None
            }
        }
    }
}
