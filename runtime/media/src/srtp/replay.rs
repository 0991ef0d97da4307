//! The replay list (RFC 3711 §3.3.2) as a sliding window of 64 packet indices.

use super::SrtpError;

/// The RFC 3711 §3.3.2 minimum window size, and ours.
pub(super) const WINDOW: u64 = 64;

/// Which of the last 64 indices below the highest authenticated one have been received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct ReplayWindow {
    /// Highest authenticated index.
    top: Option<u64>,
    /// Bit `n` set: index `top - n` was received.
    seen: u64,
}

impl ReplayWindow {
    /// Whether `index` may be accepted: newer than the top, or inside the window and unseen.
    /// Checked before authentication; recorded with [`ReplayWindow::accept`] only after it.
    pub(super) fn check(&self, index: u64) -> Result<(), SrtpError> {
        let Some(top) = self.top else { return Ok(()) };
        if index > top {
            return Ok(());
        }
        let behind = top - index;
        if behind >= WINDOW {
            return Err(SrtpError::TooOld { index });
        }
        if self.seen & (1 << behind) != 0 {
            return Err(SrtpError::Replayed { index });
        }
        Ok(())
    }

    /// Records an authenticated index.
    pub(super) fn accept(&mut self, index: u64) {
        match self.top {
            Some(top) if index <= top => {
                let behind = top - index;
                if behind < WINDOW {
                    self.seen |= 1 << behind;
                }
            }
            Some(top) => {
                let shift = index - top;
                self.seen = if shift >= WINDOW { 0 } else { self.seen << shift };
                self.seen |= 1;
                self.top = Some(index);
            }
            None => {
                self.seen = 1;
                self.top = Some(index);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_indices_pass_and_repeats_do_not() {
        let mut w = ReplayWindow::default();
        assert_eq!(w.check(10), Ok(()));
        w.accept(10);
        assert_eq!(w.check(10), Err(SrtpError::Replayed { index: 10 }));
        assert_eq!(w.check(11), Ok(()));
        // Reordered but inside the window.
        assert_eq!(w.check(9), Ok(()));
        w.accept(9);
        assert_eq!(w.check(9), Err(SrtpError::Replayed { index: 9 }));
    }

    #[test]
    fn the_window_is_64_wide() {
        let mut w = ReplayWindow::default();
        w.accept(1000);
        assert_eq!(w.check(1000 - 63), Ok(()));
        assert_eq!(w.check(1000 - 64), Err(SrtpError::TooOld { index: 936 }));
        w.accept(1000 - 63);
        // Sliding forward by 10 pushes 937 out of the window; 947 is inside and unseen.
        w.accept(1010);
        assert_eq!(w.check(947), Ok(()));
        assert_eq!(w.check(937), Err(SrtpError::TooOld { index: 937 }));
        assert_eq!(w.check(1000), Err(SrtpError::Replayed { index: 1000 }));
        // A jump beyond the window forgets everything below.
        w.accept(5000);
        assert_eq!(w.check(4999), Ok(()));
        assert_eq!(w.check(5000), Err(SrtpError::Replayed { index: 5000 }));
    }
}
