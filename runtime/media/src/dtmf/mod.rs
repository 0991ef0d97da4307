//! DTMF: RFC 4733 telephone events (payload, receiver, sender) and an in-band Goertzel detector.
//!
//! - [`TelephoneEvent`]: the 4-octet payload of RFC 4733 §2.3.
//! - [`DtmfReceiver`]: turns telephone-event packets into exactly one press and one release per
//!   key press, identifying a press by its RTP timestamp, never by the marker bit (DESIGN.md: many
//!   carriers omit it).
//! - [`DtmfSender`]: the packet schedule of one key press (RFC 4733 §2.5.1).
//! - [`ToneDetector`]: in-band DTMF on 8 kHz linear PCM, for peers that send tones as audio.
//!
//! Not done: RFC 4733 §2.5.1.5 / §2.5.2.4 multiple events in one packet and RFC 2198 redundancy
//! (only the first event of a payload is read), and the non-DTMF events (flash, tones) beyond
//! reporting their event code.

mod event;
mod goertzel;
mod receiver;
mod sender;

pub use event::TelephoneEvent;
pub use goertzel::{DetectedTone, ToneDetector, ToneDetectorConfig};
pub use receiver::{DtmfEvent, DtmfReceiver, DtmfReceiverConfig, DtmfReceiverStats, ReleaseReason};
pub use sender::{DtmfPacket, DtmfSender, DtmfSenderConfig, DtmfSequence};

use crate::error::Cause;

/// A DTMF key: the events 0–15 of RFC 4733 §3.2 (Table 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DtmfDigit {
    /// 0
    D0,
    /// 1
    D1,
    /// 2
    D2,
    /// 3
    D3,
    /// 4
    D4,
    /// 5
    D5,
    /// 6
    D6,
    /// 7
    D7,
    /// 8
    D8,
    /// 9
    D9,
    /// *
    Star,
    /// #
    Pound,
    /// A
    A,
    /// B
    B,
    /// C
    C,
    /// D
    D,
}

impl DtmfDigit {
    /// All sixteen keys in event-code order.
    pub const ALL: [DtmfDigit; 16] = [
        DtmfDigit::D0,
        DtmfDigit::D1,
        DtmfDigit::D2,
        DtmfDigit::D3,
        DtmfDigit::D4,
        DtmfDigit::D5,
        DtmfDigit::D6,
        DtmfDigit::D7,
        DtmfDigit::D8,
        DtmfDigit::D9,
        DtmfDigit::Star,
        DtmfDigit::Pound,
        DtmfDigit::A,
        DtmfDigit::B,
        DtmfDigit::C,
        DtmfDigit::D,
    ];

    /// The key of an RFC 4733 event code, if it is a DTMF event (0–15).
    pub fn from_event(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code)).copied()
    }

    /// The RFC 4733 event code.
    pub fn event(self) -> u8 {
        self as u8
    }

    /// The key as a character: `0`–`9`, `*`, `#`, `A`–`D`.
    pub fn as_char(self) -> char {
        b"0123456789*#ABCD"[self as usize] as char
    }

    /// The key of a character (`a`–`d` accepted too).
    pub fn from_char(c: char) -> Option<Self> {
        let code = match c {
            '0'..='9' => c as u8 - b'0',
            '*' => 10,
            '#' => 11,
            'A'..='D' => c as u8 - b'A' + 12,
            'a'..='d' => c as u8 - b'a' + 12,
            _ => return None,
        };
        Self::from_event(code)
    }

    /// The (row, column) frequencies in Hz (ITU-T Q.23).
    pub fn frequencies(self) -> (f32, f32) {
        let (row, col) = goertzel::KEYPAD_POSITION[self as usize];
        (goertzel::ROW_HZ[row], goertzel::COL_HZ[col])
    }
}

/// Why a telephone-event payload could not be parsed or built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DtmfError {
    /// The payload is shorter than the 4 octets of RFC 4733 §2.3.
    #[error("telephone-event payload of {0} bytes, at least 4 needed")]
    Truncated(usize),
    /// The volume does not fit its 6 bits (RFC 4733 §2.3.4: 0 to 63, in -dBm0).
    #[error("volume {0} out of range 0..=63")]
    BadVolume(u8),
    /// The output buffer is too small.
    #[error("output buffer of {0} bytes, 4 needed")]
    BufferTooSmall(usize),
}

impl DtmfError {
    /// Who caused the error.
    pub fn cause(&self) -> Cause {
        match self {
            DtmfError::Truncated(_) => Cause::Peer,
            DtmfError::BadVolume(_) | DtmfError::BufferTooSmall(_) => Cause::Local,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_map_to_event_codes_and_characters() {
        for (code, digit) in DtmfDigit::ALL.iter().enumerate() {
            assert_eq!(usize::from(digit.event()), code);
            assert_eq!(DtmfDigit::from_event(code as u8), Some(*digit));
            assert_eq!(DtmfDigit::from_char(digit.as_char()), Some(*digit));
        }
        assert_eq!(DtmfDigit::from_event(16), None);
        assert_eq!(DtmfDigit::from_char('#'), Some(DtmfDigit::Pound));
        assert_eq!(DtmfDigit::from_char('b'), Some(DtmfDigit::B));
        assert_eq!(DtmfDigit::from_char('E'), None);
        assert_eq!(DtmfDigit::D5.frequencies(), (770.0, 1336.0));
        assert_eq!(DtmfDigit::Pound.frequencies(), (941.0, 1477.0));
        assert_eq!(DtmfDigit::D.frequencies(), (941.0, 1633.0));
    }
}
