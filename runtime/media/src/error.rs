//! The crate's error type, which says who caused a failure (CONVENTIONS §4).
//!
//! Each module keeps its own precise error enum (callers that count SRTP authentication failures
//! match on [`SrtpError`] directly); [`MediaError`] gathers them for callers that only need to
//! log, count by [`Cause`] and move on.

use crate::dtmf::DtmfError;
use crate::frame::FrameError;
use crate::rtp::RtpError;
use crate::srtp::SrtpError;

/// Who caused an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    /// The remote peer sent something malformed, forged, replayed or out of profile.
    Peer,
    /// The local side: configuration, a buffer too small, a capacity or key lifetime reached.
    Local,
}

/// Any error of the media engine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MediaError {
    /// Building a frame failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// RTP or RTCP parsing or building failed.
    #[error(transparent)]
    Rtp(#[from] RtpError),
    /// RFC 4733 telephone-event parsing or building failed.
    #[error(transparent)]
    Dtmf(#[from] DtmfError),
    /// SRTP/SRTCP protection or keying failed.
    #[error(transparent)]
    Srtp(#[from] SrtpError),
}

impl MediaError {
    /// Who caused the error.
    pub fn cause(&self) -> Cause {
        match self {
            MediaError::Frame(_) => Cause::Local,
            MediaError::Rtp(e) => e.cause(),
            MediaError::Dtmf(e) => e.cause(),
            MediaError::Srtp(e) => e.cause(),
        }
    }
}
