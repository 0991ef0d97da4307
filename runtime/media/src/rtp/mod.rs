//! RTP and RTCP (RFC 3550, RFC 3551): packets, sequence extension, receive statistics, sender and
//! receiver reports, and the outgoing packetiser.
//!
//! Hand-written, not taken from a crate: webrtc-rs `rtp` 0.17 pulls `webrtc-util`, whose default
//! features bring tokio into the dependency tree (which `tests/tests/layering.rs` forbids), and the
//! sans-IO `rtc-rtp` 0.21 owns payloads as `bytes::Bytes`, so parsing a packet would copy or
//! reference-count where we only need to borrow. Parsing here borrows from the caller's buffer and
//! writing goes into a caller-supplied buffer: neither allocates (CONVENTIONS §5).
//!
//! Everything is sans-IO: times are `Instant`s passed in by the caller, wall-clock time for RTCP is
//! an [`NtpTime`] derived from an [`NtpClock`] the caller anchors, and the sender's random initial
//! sequence number and timestamp are inputs.

mod packet;
mod rtcp;
mod sender;
mod seq;
mod stats;

pub(crate) use packet::header_len;
pub use packet::{FIXED_HEADER_LEN, HeaderExtension, RTP_VERSION, RtpHeader, RtpPacket, RtpPacketBuilder};
pub use rtcp::{
    CompoundPacket, CompoundPackets, NtpClock, NtpTime, RTCP_BYE, RTCP_RR, RTCP_SDES, RTCP_SR, ReceiverReport,
    ReportBlock, ReportBlocks, RtcpPacket, RtcpWriter, SenderInfo, SenderReport,
};
pub use sender::{RtpSender, RtpSenderConfig};
pub use seq::{SequenceUnwrapper, TimestampUnwrapper};
pub use stats::{PacketVerdict, ReceiveStats, ReceiveStatsConfig, SeqVerdict};

use crate::error::Cause;

/// Why an RTP or RTCP packet could not be parsed or built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RtpError {
    /// The packet ends before the header it announces (fixed header, CSRC list, extension).
    #[error("packet of {len} bytes is shorter than its header needs ({needed} bytes)")]
    Truncated {
        /// Bytes available.
        len: usize,
        /// Bytes the header says are there.
        needed: usize,
    },
    /// The version field is not 2 (RFC 3550 §5.1).
    #[error("RTP/RTCP version {0}, expected 2")]
    BadVersion(u8),
    /// The padding count is zero or larger than the bytes after the header (RFC 3550 §5.1: the
    /// last octet counts the padding including itself).
    #[error("padding count {count} does not fit the {available} bytes after the header")]
    BadPadding {
        /// The padding count from the last octet.
        count: u8,
        /// Bytes after the header, padding included.
        available: usize,
    },
    /// A compound RTCP packet does not start with SR or RR (RFC 3550 §6.1, A.2).
    #[error("compound RTCP packet starts with packet type {0}, not SR (200) or RR (201)")]
    NotReportFirst(u8),
    /// An RTCP packet that is not the last one of a compound packet has the padding bit (A.2).
    #[error("padding bit set on an RTCP packet that is not the last of its compound packet")]
    PaddingNotLast,
    /// An SR or RR is too short for the report blocks its count announces (RFC 3550 §6.4).
    #[error("RTCP report of {len} bytes cannot hold its {count} report blocks")]
    ReportTooShort {
        /// Bytes in the report.
        len: usize,
        /// Report blocks announced.
        count: u8,
    },
    /// The caller's output buffer is too small.
    #[error("output buffer of {available} bytes, {needed} needed")]
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// More than 15 CSRCs (RFC 3550 §5.1: the CC field has four bits).
    #[error("{0} CSRCs given, at most 15 fit in the header")]
    TooManyCsrcs(usize),
    /// More than 31 report blocks (RFC 3550 §6.4: the RC field has five bits).
    #[error("{0} report blocks given, at most 31 fit in one report")]
    TooManyReportBlocks(usize),
    /// Header extension data must be whole 32-bit words (RFC 3550 §5.3.1).
    #[error("header extension of {0} bytes is not a whole number of 32-bit words")]
    ExtensionNotAligned(usize),
    /// An SDES item is longer than 255 octets (RFC 3550 §6.5).
    #[error("SDES item of {0} bytes, at most 255")]
    SdesItemTooLong(usize),
}

impl RtpError {
    /// Who caused the error: parsing errors are the peer's, building errors are ours.
    pub fn cause(&self) -> Cause {
        match self {
            RtpError::Truncated { .. }
            | RtpError::BadVersion(_)
            | RtpError::BadPadding { .. }
            | RtpError::NotReportFirst(_)
            | RtpError::PaddingNotLast
            | RtpError::ReportTooShort { .. } => Cause::Peer,
            RtpError::BufferTooSmall { .. }
            | RtpError::TooManyCsrcs(_)
            | RtpError::TooManyReportBlocks(_)
            | RtpError::ExtensionNotAligned(_)
            | RtpError::SdesItemTooLong(_) => Cause::Local,
        }
    }
}
