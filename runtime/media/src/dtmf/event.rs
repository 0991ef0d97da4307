//! The telephone-event payload (RFC 4733 §2.3).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |     event     |E|R| volume    |          duration             |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```

use super::{DtmfDigit, DtmfError};

/// One telephone event report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TelephoneEvent {
    /// Event code (§2.3.1); 0–15 are the DTMF keys (§3.2).
    pub event: u8,
    /// E bit: this report ends the event (§2.3.2).
    pub end: bool,
    /// Power level in -dBm0, 0..=63 (§2.3.4). Senders set it for DTMF; receivers ignore it.
    pub volume: u8,
    /// Duration of the event so far in timestamp units, counted from the packet's RTP
    /// timestamp (§2.3.5).
    pub duration: u16,
}

impl TelephoneEvent {
    /// Encoded length.
    pub const LEN: usize = 4;

    /// Parses the first event of a payload. The R bit is ignored, as §2.3.3 requires of
    /// receivers; octets after the first four (further events, §2.5.2.4) are ignored.
    pub fn parse(payload: &[u8]) -> Result<Self, DtmfError> {
        let [event, flags, d0, d1, ..] = *payload else {
            return Err(DtmfError::Truncated(payload.len()));
        };
        Ok(Self { event, end: flags & 0x80 != 0, volume: flags & 0x3f, duration: u16::from_be_bytes([d0, d1]) })
    }

    /// Writes the payload into `out` (R bit zero, §2.3.3) and returns its length, 4.
    pub fn write(&self, out: &mut [u8]) -> Result<usize, DtmfError> {
        if self.volume > 63 {
            return Err(DtmfError::BadVolume(self.volume));
        }
        let Some(out) = out.get_mut(..Self::LEN) else {
            return Err(DtmfError::BufferTooSmall(out.len()));
        };
        out[0] = self.event;
        out[1] = if self.end { 0x80 } else { 0 } | self.volume;
        out[2..4].copy_from_slice(&self.duration.to_be_bytes());
        Ok(Self::LEN)
    }

    /// The DTMF key, if the event is one.
    pub fn digit(&self) -> Option<DtmfDigit> {
        DtmfDigit::from_event(self.event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips() {
        let e = TelephoneEvent { event: 11, end: true, volume: 10, duration: 1600 };
        let mut buf = [0u8; 4];
        assert_eq!(e.write(&mut buf), Ok(4));
        assert_eq!(buf, [11, 0x8a, 0x06, 0x40]);
        assert_eq!(TelephoneEvent::parse(&buf), Ok(e));
        assert_eq!(e.digit(), Some(DtmfDigit::Pound));
    }

    #[test]
    fn the_reserved_bit_is_ignored_and_extra_octets_too() {
        let e = TelephoneEvent::parse(&[5, 0x40 | 0x3f, 0xff, 0xff, 9, 9, 9, 9]).unwrap();
        assert_eq!(e, TelephoneEvent { event: 5, end: false, volume: 63, duration: 0xffff });
    }

    #[test]
    fn short_payloads_and_bad_volumes_are_refused() {
        assert_eq!(TelephoneEvent::parse(&[1, 2, 3]), Err(DtmfError::Truncated(3)));
        let e = TelephoneEvent { event: 1, end: false, volume: 64, duration: 0 };
        assert_eq!(e.write(&mut [0; 4]), Err(DtmfError::BadVolume(64)));
        let e = TelephoneEvent { volume: 0, ..e };
        assert_eq!(e.write(&mut [0; 3]), Err(DtmfError::BufferTooSmall(3)));
        assert_eq!(TelephoneEvent { event: 16, ..e }.digit(), None);
    }
}
