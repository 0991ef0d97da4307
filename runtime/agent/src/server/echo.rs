//! The echo agent for the latency benchmark.

use futures_util::StreamExt as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info};

use super::{accept_loop, accept_websocket, send_text};
use crate::error::AgentError;
use crate::protocol::{AgentEncoder, PatchbayMessage, parse_patchbay_message};

/// Sends every caller `media` payload straight back as soon as it arrives (unchanged unless
/// [`EchoAgent::stamping`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct EchoAgent {
    stamp_at: Option<usize>,
}

impl EchoAgent {
    /// An echo agent that writes, at octet `offset` of each payload long enough, the time it
    /// sends the answer: nanoseconds since the Unix epoch, little-endian `u64` (the system
    /// clock, which a benchmark in another process reads too). The latency benchmark uses it
    /// to leave the agent's own time out of the runtime's share.
    pub fn stamping(offset: usize) -> Self {
        Self { stamp_at: Some(offset) }
    }

    /// Serves connections until the future is dropped.
    pub async fn serve(self, listener: TcpListener) {
        accept_loop(listener, "echo", move |tcp| async move {
            if let Err(err) = self.handle(tcp).await {
                debug!(%err, "echo agent session ended with an error");
            }
        })
        .await;
    }

    /// Runs one session on an accepted byte stream.
    pub async fn handle<S>(&self, stream: S) -> Result<(), AgentError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut ws = accept_websocket(stream).await?;
        let mut encoder = None;
        while let Some(message) = ws.next().await {
            let text = match message.map_err(AgentError::websocket)? {
                Message::Text(text) => text,
                Message::Close(_) => break,
                _ => continue,
            };
            let Ok(frame) = parse_patchbay_message(&text) else {
                continue;
            };
            match frame.message {
                PatchbayMessage::Start { info: start, .. } => {
                    info!(stream_sid = %start.stream_sid, "echo agent started");
                    encoder = Some(AgentEncoder::new(start.stream_sid));
                }
                PatchbayMessage::Media { mut payload, .. } => {
                    if let Some(stamp) = self.stamp_at.and_then(|at| payload.get_mut(at..at + 8)) {
                        stamp.copy_from_slice(&unix_nanos().to_le_bytes());
                    }
                    if let Some(encoder) = &encoder {
                        send_text(&mut ws, encoder.media(&payload)).await?;
                    }
                }
                PatchbayMessage::Stop => debug!("echo agent stopped"),
                _ => {}
            }
        }
        Ok(())
    }
}

/// Now, in nanoseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_nanos() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}
