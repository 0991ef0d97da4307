//! Agent servers speaking the agent side of the protocol: a demo for the binary, a scripted
//! one for tests and an echo one for the latency benchmark.
//!
//! Each has `serve(listener)`, which accepts websocket connections and runs one task per
//! connection until it is dropped, and `handle(stream)`, which runs one session on an
//! already accepted byte stream (for TLS, wrap the TCP stream first).

use std::future::Future;
use std::time::Duration;

use futures_util::SinkExt as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tracing::{debug, warn};

use crate::error::AgentError;

mod demo;
mod echo;
mod scripted;

pub use demo::{DemoAgent, DemoAgentConfig, VadConfig};
pub use echo::{EchoAgent, unix_nanos};
pub use scripted::{Observed, ScriptStep, ScriptedAgent};

/// A sine tone as 8 kHz μ-law: `duration_ms` long, peak `amplitude` (16-bit linear).
pub fn tone_ulaw(frequency_hz: f64, duration_ms: u32, amplitude: i16) -> Vec<u8> {
    let samples = duration_ms as usize * 8;
    (0..samples)
        .map(|n| {
            let phase = 2.0 * std::f64::consts::PI * frequency_hz * n as f64 / 8000.0;
            patchbay_media::g711::ulaw_encode((phase.sin() * f64::from(amplitude)) as i16)
        })
        .collect()
}

/// Accepts connections forever, spawning `session` for each.
async fn accept_loop<F, Fut>(listener: TcpListener, server: &'static str, mut session: F)
where
    F: FnMut(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                debug!(server, %peer, "agent server accepted a connection");
                let _ = tcp.set_nodelay(true);
                tokio::spawn(session(tcp));
            }
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(server, %err, "agent server accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn accept_websocket<S>(stream: S) -> Result<WebSocketStream<S>, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = WebSocketConfig::default()
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
        .read_buffer_size(crate::stream::READ_BUFFER);
    tokio_tungstenite::accept_async_with_config(stream, Some(config)).await.map_err(AgentError::websocket)
}

async fn send_text<S>(ws: &mut WebSocketStream<S>, text: String) -> Result<(), AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.send(Message::text(text)).await.map_err(AgentError::websocket)
}

/// Splits `audio` into payloads of `payload_ms` (0: one payload) and sends each as `media`.
async fn send_audio<S>(
    ws: &mut WebSocketStream<S>,
    encoder: &crate::protocol::AgentEncoder,
    audio: &[u8],
    payload_ms: u64,
) -> Result<(), AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let payload_len = match usize::try_from(payload_ms * 8) {
        Ok(0) | Err(_) => audio.len().max(1),
        Ok(n) => n,
    };
    for payload in audio.chunks(payload_len) {
        ws.feed(Message::text(encoder.media(payload))).await.map_err(AgentError::websocket)?;
    }
    ws.flush().await.map_err(AgentError::websocket)
}

/// Mean absolute amplitude of μ-law audio (16-bit linear scale).
fn mean_amplitude(mulaw: &[u8]) -> u32 {
    if mulaw.is_empty() {
        return 0;
    }
    let sum: u64 = mulaw.iter().map(|&c| u64::from(patchbay_media::g711::ulaw_decode(c).unsigned_abs())).sum();
    (sum / mulaw.len() as u64) as u32
}
