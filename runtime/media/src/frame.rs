//! Host-owned audio frames passed by handle, and the pool that recycles them.

use std::borrow::Cow;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use crate::g711;

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
    /// The samples when the encoding is [`AudioEncoding::Linear16`].
    linear: Vec<i16>,
    /// The octets when the encoding is G.711.
    octets: Vec<u8>,
    /// Where the buffers go back to when the last handle is dropped.
    pool: Weak<PoolInner>,
}

/// One packetisation interval of audio, immutable once built and shared by reference count.
///
/// Cloning a `Frame` clones a handle, not the samples: the echo flow, a bridge or a recorder
/// pass the same buffer along. A frame received as G.711 stays G.711 until someone asks for
/// samples ([`Frame::linear`], what a flow's explicit `samples()` call uses) or the call it is
/// sent to uses the other law ([`Frame::encode_into`]); sent back out in its own law it is
/// copied octet for octet, with no transcoding.
///
/// Frames built through a [`FramePool`] return their buffers to it when the last handle is
/// dropped, so the per-packet path does not touch the allocator once the pool is warm.
#[derive(Debug)]
pub struct Frame(Arc<FrameData>);

impl Clone for Frame {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl Drop for Frame {
    fn drop(&mut self) {
        // The last handle: give the buffers back instead of freeing them. `strong_count` is
        // exact here — no weak references to frame data exist, and another handle would have
        // to be cloned from this one, which we own.
        if Arc::strong_count(&self.0) == 1
            && let Some(pool) = self.0.pool.upgrade()
        {
            pool.put(Arc::clone(&self.0));
        }
    }
}

fn check_linear(len: usize, sample_rate: u32) -> Result<(), FrameError> {
    if sample_rate != 8_000 && sample_rate != 16_000 {
        return Err(FrameError::UnsupportedRate(sample_rate));
    }
    let per_10ms = (sample_rate / 100) as usize;
    if !(len.is_multiple_of(per_10ms) && (1..=4).contains(&(len / per_10ms))) {
        return Err(FrameError::NotAWholeFrame { samples: len, rate: sample_rate });
    }
    Ok(())
}

fn check_g711(len: usize) -> Result<(), FrameError> {
    if !(len.is_multiple_of(80) && (1..=4).contains(&(len / 80))) {
        return Err(FrameError::NotAWholeFrame { samples: len, rate: 8_000 });
    }
    Ok(())
}

impl Frame {
    /// Builds a linear PCM frame, checking that it is a whole 10–40 ms frame.
    pub fn from_linear(samples: &[i16], sample_rate: u32, timestamp: u64) -> Result<Self, FrameError> {
        check_linear(samples.len(), sample_rate)?;
        Ok(Self::new_linear(samples, sample_rate, timestamp, Weak::new(), Vec::new(), Vec::new()))
    }

    /// Builds a G.711 frame (8 kHz, one octet per sample), checking that it is a whole 10–40 ms
    /// frame. `encoding` must be [`AudioEncoding::Pcmu`] or [`AudioEncoding::Pcma`]; linear
    /// audio goes through [`Frame::from_linear`].
    pub fn from_g711(encoding: AudioEncoding, octets: &[u8], timestamp: u64) -> Result<Self, FrameError> {
        check_g711(octets.len())?;
        Ok(Self::new_g711(encoding, octets, timestamp, Weak::new(), Vec::new(), Vec::new()))
    }

    fn new_linear(
        samples: &[i16],
        sample_rate: u32,
        timestamp: u64,
        pool: Weak<PoolInner>,
        mut linear: Vec<i16>,
        octets: Vec<u8>,
    ) -> Self {
        linear.clear();
        linear.extend_from_slice(samples);
        // Bounded above by 4 × 160 by the checks of the callers.
        let format = AudioFormat { encoding: AudioEncoding::Linear16, sample_rate, samples: samples.len() as u32 };
        Self(Arc::new(FrameData { format, timestamp, linear, octets, pool }))
    }

    fn new_g711(
        encoding: AudioEncoding,
        bytes: &[u8],
        timestamp: u64,
        pool: Weak<PoolInner>,
        linear: Vec<i16>,
        mut octets: Vec<u8>,
    ) -> Self {
        octets.clear();
        octets.extend_from_slice(bytes);
        let encoding = if encoding == AudioEncoding::Linear16 { AudioEncoding::Pcmu } else { encoding };
        let format = AudioFormat { encoding, sample_rate: 8_000, samples: bytes.len() as u32 };
        Self(Arc::new(FrameData { format, timestamp, linear, octets, pool }))
    }

    /// A frame of silence in the given format.
    pub fn silence(format: AudioFormat, timestamp: u64) -> Self {
        let samples = vec![0_i16; format.samples as usize];
        let format = AudioFormat { encoding: AudioEncoding::Linear16, ..format };
        Self(Arc::new(FrameData { format, timestamp, linear: samples, octets: Vec::new(), pool: Weak::new() }))
    }

    /// The frame's format.
    pub fn format(&self) -> AudioFormat {
        self.0.format
    }

    /// Media clock position of the first sample, in samples since the stream began.
    pub fn timestamp(&self) -> u64 {
        self.0.timestamp
    }

    /// The samples as linear PCM: borrowed from a linear frame, decoded from a G.711 one.
    pub fn linear(&self) -> Cow<'_, [i16]> {
        match self.0.format.encoding {
            AudioEncoding::Linear16 => Cow::Borrowed(&self.0.linear),
            AudioEncoding::Pcmu => Cow::Owned(self.0.octets.iter().map(|&b| g711::ulaw_decode(b)).collect()),
            AudioEncoding::Pcma => Cow::Owned(self.0.octets.iter().map(|&b| g711::alaw_decode(b)).collect()),
        }
    }

    /// The G.711 octets of a G.711 frame (empty for a linear one).
    pub fn octets(&self) -> &[u8] {
        &self.0.octets
    }

    /// Writes the frame in `encoding` (G.711) into `out` and returns the octets written: a copy
    /// when the frame already is in that law, a transcode otherwise. A 16 kHz linear frame is
    /// written at 8 kHz by keeping every second sample — flows that produce 16 kHz audio should
    /// filter it first (prompts are filtered when they are loaded).
    pub fn encode_into(&self, encoding: AudioEncoding, out: &mut [u8]) -> usize {
        self.encode_into_from(encoding, 0, out)
    }

    /// Samples in the frame at 8 kHz (what [`encode_into`](Self::encode_into) writes at most).
    pub(crate) fn samples_at_8k(&self) -> usize {
        let format = self.0.format;
        (u64::from(format.samples) * 8_000 / u64::from(format.sample_rate.max(1))) as usize
    }

    /// [`encode_into`](Self::encode_into) from the `skip`-th 8 kHz sample on: how a call whose
    /// packets are not this frame's length re-cuts it.
    pub(crate) fn encode_into_from(&self, encoding: AudioEncoding, skip: usize, out: &mut [u8]) -> usize {
        let data = &self.0;
        let octets = data.octets.get(skip..).unwrap_or_default();
        match (data.format.encoding, encoding) {
            (from, to) if from == to && from != AudioEncoding::Linear16 => {
                let n = octets.len().min(out.len());
                out[..n].copy_from_slice(&octets[..n]);
                n
            }
            (AudioEncoding::Linear16, to) => {
                let step = if data.format.sample_rate == 16_000 { 2 } else { 1 };
                let mut n = 0;
                for (slot, &sample) in out.iter_mut().zip(data.linear.iter().step_by(step).skip(skip)) {
                    *slot = match to {
                        AudioEncoding::Pcma => g711::alaw_encode(sample),
                        _ => g711::ulaw_encode(sample),
                    };
                    n += 1;
                }
                n
            }
            (from, to) => {
                let n = octets.len().min(out.len());
                for (slot, &octet) in out.iter_mut().zip(octets.iter()) {
                    let sample =
                        if from == AudioEncoding::Pcmu { g711::ulaw_decode(octet) } else { g711::alaw_decode(octet) };
                    *slot =
                        if to == AudioEncoding::Pcma { g711::alaw_encode(sample) } else { g711::ulaw_encode(sample) };
                }
                n
            }
        }
    }

    /// Whether two handles refer to the same buffer (no copy was made between them).
    pub fn same_buffer(&self, other: &Frame) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

#[derive(Debug)]
struct PoolInner {
    free: Mutex<Vec<Arc<FrameData>>>,
    capacity: usize,
}

impl PoolInner {
    fn put(&self, data: Arc<FrameData>) {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if free.len() < self.capacity {
            free.push(data);
        }
    }
}

/// Counters of a [`FramePool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Frames waiting for reuse.
    pub free: usize,
}

/// A pool of frame buffers shared by every call of a host.
///
/// Taking a frame reuses a returned buffer when there is one (a short lock, never held across
/// I/O) and allocates otherwise. A buffer comes back when the last handle to its frame is
/// dropped, wherever that happens (the media clock, a flow's store, a recorder).
///
/// The pool is split into shards, one per thread (threads are dealt shards in turn): a frame is
/// taken from the taking thread's shard and goes back to that same shard. Most frames live and
/// die on one media clock thread (the clock serves all of a call's steps from the same thread
/// unless one is late), so the clock threads do not bounce one lock and one reference count
/// between their cores for every packet (the shared list cost 8 % of the CPU at 2,000 calls).
/// Each shard keeps at most `capacity` idle buffers.
#[derive(Debug, Clone)]
pub struct FramePool(Arc<[Arc<PoolInner>]>);

/// Shards of a pool (threads beyond this many share).
const SHARDS: usize = 8;

/// This thread's shard number.
fn shard_index() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

impl FramePool {
    /// A pool keeping up to `capacity` idle buffers per shard (size it for the frames in flight:
    /// about four per call — jitter buffer, flow queue, playout queue, on the wire).
    pub fn new(capacity: usize) -> Self {
        Self(
            (0..SHARDS)
                .map(|_| Arc::new(PoolInner { free: Mutex::new(Vec::new()), capacity }))
                .collect::<Vec<_>>()
                .into(),
        )
    }

    fn shard(&self) -> &Arc<PoolInner> {
        &self.0[shard_index() % self.0.len()]
    }

    /// A recycled frame whose data this pool owns alone, or `None` when the pool is empty.
    fn take(&self) -> Option<Arc<FrameData>> {
        let mut data = self.shard().free.lock().unwrap_or_else(PoisonError::into_inner).pop()?;
        // Unique: the pool holds the only reference (see `Frame::drop`).
        Arc::get_mut(&mut data)?;
        Some(data)
    }

    /// A linear frame from the pool (see [`Frame::from_linear`]).
    pub fn linear(&self, samples: &[i16], sample_rate: u32, timestamp: u64) -> Result<Frame, FrameError> {
        check_linear(samples.len(), sample_rate)?;
        let format = AudioFormat { encoding: AudioEncoding::Linear16, sample_rate, samples: samples.len() as u32 };
        Ok(self.fill(format, timestamp, |linear, _| linear.extend_from_slice(samples)))
    }

    /// A G.711 frame from the pool (see [`Frame::from_g711`]).
    pub fn g711(&self, encoding: AudioEncoding, octets: &[u8], timestamp: u64) -> Result<Frame, FrameError> {
        check_g711(octets.len())?;
        let encoding = if encoding == AudioEncoding::Linear16 { AudioEncoding::Pcmu } else { encoding };
        let format = AudioFormat { encoding, sample_rate: 8_000, samples: octets.len() as u32 };
        Ok(self.fill(format, timestamp, |_, buf| buf.extend_from_slice(octets)))
    }

    /// Reuses a pooled frame in place (no allocation once the pool is warm) or makes a new one.
    fn fill(&self, format: AudioFormat, timestamp: u64, write: impl FnOnce(&mut Vec<i16>, &mut Vec<u8>)) -> Frame {
        if let Some(mut arc) = self.take()
            && let Some(data) = Arc::get_mut(&mut arc)
        {
            data.format = format;
            data.timestamp = timestamp;
            data.linear.clear();
            data.octets.clear();
            write(&mut data.linear, &mut data.octets);
            return Frame(arc);
        }
        let (mut linear, mut octets) = (Vec::with_capacity(320), Vec::with_capacity(320));
        write(&mut linear, &mut octets);
        Frame(Arc::new(FrameData { format, timestamp, linear, octets, pool: Arc::downgrade(self.shard()) }))
    }

    /// The pool's counters.
    pub fn stats(&self) -> PoolStats {
        let free = self.0.iter().map(|shard| shard.free.lock().unwrap_or_else(PoisonError::into_inner).len()).sum();
        PoolStats { free }
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
        assert!(Frame::from_g711(AudioEncoding::Pcmu, &[0; 100], 0).is_err());
    }

    #[test]
    fn g711_frames_go_out_in_their_own_law_unchanged_and_transcode_otherwise() {
        let octets: Vec<u8> = (0..160).map(|i| (i * 7 % 256) as u8).collect();
        let frame = Frame::from_g711(AudioEncoding::Pcmu, &octets, 320).unwrap();
        assert_eq!(frame.format().encoding, AudioEncoding::Pcmu);
        let mut out = [0u8; 160];
        assert_eq!(frame.encode_into(AudioEncoding::Pcmu, &mut out), 160);
        assert_eq!(&out[..], &octets[..]);
        let linear = frame.linear();
        assert_eq!(linear[5], g711::ulaw_decode(octets[5]));
        frame.encode_into(AudioEncoding::Pcma, &mut out);
        assert_eq!(out[5], g711::alaw_encode(g711::ulaw_decode(octets[5])));
        let pcm = Frame::from_linear(&[1_000; 160], 8_000, 0).unwrap();
        pcm.encode_into(AudioEncoding::Pcmu, &mut out);
        assert_eq!(out[0], g711::ulaw_encode(1_000));
    }

    #[test]
    fn pooled_buffers_come_back_when_the_last_handle_drops() {
        let pool = FramePool::new(4);
        let a = pool.g711(AudioEncoding::Pcmu, &[0xff; 160], 0).unwrap();
        let b = a.clone();
        drop(a);
        assert_eq!(pool.stats().free, 0, "a handle is still alive");
        drop(b);
        assert_eq!(pool.stats().free, 1);
        let c = pool.linear(&[3; 160], 8_000, 160).unwrap();
        assert_eq!(pool.stats().free, 0, "the buffer was reused");
        assert_eq!((c.linear()[0], c.timestamp()), (3, 160));
        // Frames outlive their pool safely; they are then simply freed.
        drop(pool);
        drop(c);
        // The pool keeps at most its capacity.
        let pool = FramePool::new(1);
        let frames: Vec<Frame> = (0..3).map(|_| pool.g711(AudioEncoding::Pcma, &[0xd5; 160], 0).unwrap()).collect();
        drop(frames);
        assert_eq!(pool.stats().free, 1);
    }

    #[test]
    fn a_frame_goes_back_to_the_shard_of_the_thread_that_took_it() {
        let pool = FramePool::new(4);
        let taker = {
            let pool = pool.clone();
            move || (pool.g711(AudioEncoding::Pcmu, &[0xff; 160], 0).unwrap(), shard_index())
        };
        // Taken on another thread, dropped here: back in that thread's shard.
        let (frame, its_shard) = std::thread::spawn(taker).join().expect("thread");
        drop(frame);
        assert_eq!(pool.stats().free, 1);
        let here = pool.g711(AudioEncoding::Pcmu, &[0x7f; 160], 0).unwrap();
        // Threads are dealt shards in turn, so the two may share one (other tests take
        // numbers too); apart, this thread's shard was empty and the frame is a new buffer.
        let expected = if its_shard == shard_index() { 0 } else { 1 };
        assert_eq!(pool.stats().free, expected);
        drop(here);
        assert_eq!(pool.stats().free, expected + 1);
        let again = pool.g711(AudioEncoding::Pcmu, &[0x7f; 160], 0).unwrap();
        assert_eq!(pool.stats().free, expected, "reused from this thread's shard");
        drop(again);
    }
}
