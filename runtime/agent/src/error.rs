//! The crate's error type.

use std::time::Duration;

/// Why an agent stream could not be opened or used.
///
/// Each variant's documentation says who caused it: the **local** side (configuration, a
/// caller's argument, capacity), the **peer** (the agent server refused or broke the
/// protocol), or **I/O** (the network between us).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// Local: the agent URL is not a usable `ws://` or `wss://` URL.
    #[error("invalid agent URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Local: the default TLS client configuration could not be built.
    #[error("TLS configuration: {0}")]
    TlsConfig(#[source] rustls::Error),
    /// I/O: the TCP connection to the agent failed (refused, unreachable, name not resolved).
    #[error("could not connect to agent at {addr}: {source}")]
    Connect {
        /// `host:port` we tried.
        addr: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// I/O or peer: the whole connect (TCP, TLS, websocket upgrade, `connected` and `start`)
    /// did not finish in time.
    #[error("agent connection timed out after {0:?}")]
    Timeout(Duration),
    /// Peer or I/O: the TLS handshake failed (untrusted certificate, name mismatch, reset).
    #[error("TLS handshake with agent failed: {0}")]
    Tls(#[source] std::io::Error),
    /// Peer: the agent answered the websocket upgrade with a non-101 HTTP status.
    #[error("agent rejected the websocket upgrade with HTTP {status}")]
    Rejected {
        /// The HTTP status code the agent sent.
        status: u16,
    },
    /// Peer or I/O: the websocket handshake or a websocket read/write failed.
    #[error("websocket error: {0}")]
    Websocket(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
    /// Local: `send_dtmf` was given something that is not a DTMF key (`0-9 * # A-D`).
    #[error("{0:?} is not a DTMF digit")]
    InvalidDigit(char),
    /// Local: a media frame is empty or longer than [`MAX_MEDIA_FRAME`](crate::MAX_MEDIA_FRAME).
    #[error("media frame of {len} bytes (allowed: 1 to {max})")]
    InvalidFrame {
        /// The length given.
        len: usize,
        /// The largest frame accepted.
        max: usize,
    },
    /// Local (capacity): the control queue (DTMF, marks) is full because the agent is not
    /// reading; the message was not sent.
    #[error("agent control queue is full")]
    QueueFull,
    /// The stream has ended (stopped, closed by the agent, or failed); nothing more can be sent.
    #[error("agent stream is closed")]
    Closed,
}

impl AgentError {
    pub(crate) fn websocket(err: tokio_tungstenite::tungstenite::Error) -> Self {
        use tokio_tungstenite::tungstenite::Error as WsError;
        match err {
            WsError::Http(response) => AgentError::Rejected { status: response.status().as_u16() },
            other => AgentError::Websocket(Box::new(other)),
        }
    }
}
