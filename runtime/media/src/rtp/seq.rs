//! Extending 16-bit sequence numbers and 32-bit timestamps across their wrap.
//!
//! RFC 3550 A.1 extends sequence numbers with a cycle count kept next to the highest sequence
//! number seen; [`ReceiveStats`](super::ReceiveStats) does exactly that for the statistics. These
//! unwrappers are the same idea without the source-validation rules, for the jitter buffer and the
//! DTMF receiver: a value is placed in the half of the number circle nearest to the highest value
//! seen so far, so reordered packets from before a wrap land below it and packets after the wrap
//! land above it.

/// Places `value` (of `bits` bits) nearest to `reference` on the extended number line.
fn extend(reference: i64, value: u64, bits: u32) -> i64 {
    let modulus = 1i64 << bits;
    let mask = modulus - 1;
    let mut delta = (value as i64 - reference) & mask;
    if delta >= modulus / 2 {
        delta -= modulus;
    }
    reference + delta
}

/// Extends 16-bit RTP sequence numbers to `i64`, keeping the highest seen as the reference.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SequenceUnwrapper {
    highest: Option<i64>,
}

impl SequenceUnwrapper {
    /// A fresh unwrapper: the first value maps to itself.
    pub fn new() -> Self {
        Self::default()
    }

    /// Extends `seq` and updates the reference if it is the new highest.
    pub fn unwrap(&mut self, seq: u16) -> i64 {
        let ext = self.peek(seq);
        if self.highest.is_none_or(|h| ext > h) {
            self.highest = Some(ext);
        }
        ext
    }

    /// Extends `seq` without updating the reference.
    pub fn peek(&self, seq: u16) -> i64 {
        match self.highest {
            None => i64::from(seq),
            Some(h) => extend(h, u64::from(seq), 16),
        }
    }

    /// The highest extended value seen, if any.
    pub fn highest(&self) -> Option<i64> {
        self.highest
    }
}

/// Extends 32-bit RTP timestamps to `i64`, keeping the highest seen as the reference.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimestampUnwrapper {
    highest: Option<i64>,
}

impl TimestampUnwrapper {
    /// A fresh unwrapper: the first value maps to itself.
    pub fn new() -> Self {
        Self::default()
    }

    /// Extends `ts` and updates the reference if it is the new highest.
    pub fn unwrap(&mut self, ts: u32) -> i64 {
        let ext = self.peek(ts);
        if self.highest.is_none_or(|h| ext > h) {
            self.highest = Some(ext);
        }
        ext
    }

    /// Extends `ts` without updating the reference.
    pub fn peek(&self, ts: u32) -> i64 {
        match self.highest {
            None => i64::from(ts),
            Some(h) => extend(h, u64::from(ts), 32),
        }
    }

    /// The highest extended value seen, if any.
    pub fn highest(&self) -> Option<i64> {
        self.highest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_keep_counting_across_the_wrap() {
        let mut u = SequenceUnwrapper::new();
        assert_eq!(u.unwrap(65_534), 65_534);
        assert_eq!(u.unwrap(65_535), 65_535);
        assert_eq!(u.unwrap(0), 65_536);
        assert_eq!(u.unwrap(1), 65_537);
        // A reordered packet from before the wrap lands below, and does not move the reference.
        assert_eq!(u.unwrap(65_535), 65_535);
        assert_eq!(u.unwrap(2), 65_538);
        assert_eq!(u.highest(), Some(65_538));
    }

    #[test]
    fn a_packet_from_before_the_first_one_goes_negative() {
        let mut u = SequenceUnwrapper::new();
        assert_eq!(u.unwrap(0), 0);
        assert_eq!(u.unwrap(65_535), -1);
        assert_eq!(u.highest(), Some(0));
    }

    #[test]
    fn many_wraps_accumulate() {
        let mut u = SequenceUnwrapper::new();
        let mut seq = 100u16;
        let first = u.unwrap(seq);
        for _ in 0..(5 * 65_536 / 1000) {
            seq = seq.wrapping_add(1000);
            u.unwrap(seq);
        }
        assert_eq!(u.highest(), Some(first + 327 * 1000));
    }

    #[test]
    fn timestamps_keep_counting_across_the_wrap() {
        let mut u = TimestampUnwrapper::new();
        assert_eq!(u.unwrap(u32::MAX - 159), i64::from(u32::MAX) - 159);
        assert_eq!(u.unwrap(0), 1 << 32);
        assert_eq!(u.unwrap(160), (1 << 32) + 160);
        assert_eq!(u.unwrap(u32::MAX - 159), i64::from(u32::MAX) - 159);
        assert_eq!(u.peek(320), (1 << 32) + 320);
        assert_eq!(u.highest(), Some((1 << 32) + 160));
    }
}
