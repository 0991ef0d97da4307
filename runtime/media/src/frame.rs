//! Host-owned audio frames passed by handle.

use std::sync::Arc;

/// How a frame's samples are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AudioEncoding {
    /// Signed 16-bit linear PCM.
    Linear16,
    /// G.711 μ-law octets, as carried by PCMU.
    Pcmu,
    /// G.711 A-law octets, as carried by PCMA.
    Pcma,
}

/// Format of one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AudioFormat {
    /// Encoding of the samples.
    pub encoding: AudioEncoding,
    /// Samples per second.
    pub sample_rate: u32,
    /// Samples in one frame.
    pub samples: u32,
}

impl AudioFormat {
    /// 20 ms of 8 kHz linear PCM: what flows produce and what G.711 decodes to.
    pub const LINEAR16_8K_20MS: Self = Self { encoding: AudioEncoding::Linear16, sample_rate: 8_000, samples: 160 };
}

/// Why a frame could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The sample rate is not one the media engine runs at.
    #[error("unsupported sample rate {0} Hz (8000 or 16000)")]
    UnsupportedRate(u32),
    /// The sample count is not a whole frame of 10, 20, 30 or 40 ms at the given rate.
    #[error("{samples} samples at {rate} Hz is not a whole 10/20/30/40 ms frame")]
    NotAWholeFrame {
        /// Samples given.
        samples: usize,
        /// Sample rate given.
        rate: u32,
    },
}

#[derive(Debug)]
struct FrameData {
    format: AudioFormat,
    timestamp: u64,
    samples: Box<[i16]>,
}

/// One packetisation interval of audio, immutable once built and shared by reference count.
///
/// Cloning a `Frame` clones a handle, not the samples: the echo flow, a bridge or a recorder
/// pass the same buffer along. Samples are copied only out of [`Frame::linear`], which is what a
/// flow's explicit `samples()` call uses.
///
/// The buffer comes from the global allocator for now; the media engine issue replaces it with a
/// fixed-size pool so that the per-packet path never allocates.
#[derive(Debug, Clone)]
pub struct Frame(Arc<FrameData>);

impl Frame {
    /// Builds a linear PCM frame, checking that it is a whole 10–40 ms frame.
    pub fn from_linear(samples: &[i16], sample_rate: u32, timestamp: u64) -> Result<Self, FrameError> {
        if sample_rate != 8_000 && sample_rate != 16_000 {
            return Err(FrameError::UnsupportedRate(sample_rate));
        }
        let per_10ms = (sample_rate / 100) as usize;
        let whole = samples.len().is_multiple_of(per_10ms) && (1..=4).contains(&(samples.len() / per_10ms));
        if !whole {
            return Err(FrameError::NotAWholeFrame { samples: samples.len(), rate: sample_rate });
        }
        let format = AudioFormat {
            encoding: AudioEncoding::Linear16,
            sample_rate,
            // Bounded above by 4 × 160 by the check above.
            samples: samples.len() as u32,
        };
        Ok(Self(Arc::new(FrameData { format, timestamp, samples: samples.into() })))
    }

    /// A frame of silence in the given format.
    pub fn silence(format: AudioFormat, timestamp: u64) -> Self {
        let samples = vec![0_i16; format.samples as usize].into_boxed_slice();
        let format = AudioFormat { encoding: AudioEncoding::Linear16, ..format };
        Self(Arc::new(FrameData { format, timestamp, samples }))
    }

    /// The frame's format.
    pub fn format(&self) -> AudioFormat {
        self.0.format
    }

    /// Media clock position of the first sample, in samples since the stream began.
    pub fn timestamp(&self) -> u64 {
        self.0.timestamp
    }

    /// The samples as linear PCM, borrowed from the shared buffer.
    pub fn linear(&self) -> &[i16] {
        &self.0.samples
    }

    /// Whether two handles refer to the same buffer (no copy was made between them).
    pub fn same_buffer(&self, other: &Frame) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_buffer() {
        let a = Frame::from_linear(&[1; 160], 8_000, 0).expect("whole frame");
        let b = a.clone();
        assert!(a.same_buffer(&b));
        assert_eq!(b.linear()[0], 1);
    }

    #[test]
    fn partial_frames_and_odd_rates_are_refused() {
        assert_eq!(
            Frame::from_linear(&[0; 100], 8_000, 0).unwrap_err(),
            FrameError::NotAWholeFrame { samples: 100, rate: 8_000 }
        );
        assert_eq!(Frame::from_linear(&[0; 160], 44_100, 0).unwrap_err(), FrameError::UnsupportedRate(44_100));
        assert_eq!(
            Frame::from_linear(&[0; 800], 8_000, 0).unwrap_err().to_string(),
            "800 samples at 8000 Hz is not a whole 10/20/30/40 ms frame"
        );
        assert!(Frame::from_linear(&[0; 320], 16_000, 0).is_ok());
    }
}
