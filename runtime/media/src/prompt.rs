//! Prompts: WAV files decoded once into the media engine's 8 kHz linear PCM, with each call
//! codec's encoding computed once and cached.
//!
//! Accepted: RIFF/WAVE, mono, 8 or 16 kHz, 16-bit PCM (format 1), A-law (6) or μ-law (7), also
//! wrapped as `WAVE_FORMAT_EXTENSIBLE`. 16 kHz audio is low-pass filtered (a windowed-sinc FIR
//! with its cut-off below the new Nyquist frequency) before every second sample is kept, so that
//! sibilants do not fold back into the telephone band as they would with plain decimation.
//! Anything else is refused with an error naming the file and what is wrong with it.
//!
//! Parsing is hand-written: the WAV container is a few fixed fields, and the crates that read it
//! (hound) do not take A-law/μ-law, which carriers' prompt libraries are full of.

use std::sync::{Arc, OnceLock};

use crate::g711;

/// Why a prompt could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("prompt {name}: {problem}")]
pub struct PromptError {
    /// The prompt's name or file.
    pub name: String,
    /// What is wrong with it.
    pub problem: String,
}

/// The audio codings a prompt can be sent in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PromptCodec {
    /// G.711 μ-law (PCMU).
    Pcmu,
    /// G.711 A-law (PCMA).
    Pcma,
}

impl PromptCodec {
    /// The frame encoding of this codec.
    pub fn encoding(self) -> crate::AudioEncoding {
        match self {
            PromptCodec::Pcmu => crate::AudioEncoding::Pcmu,
            PromptCodec::Pcma => crate::AudioEncoding::Pcma,
        }
    }

    /// The octet of silence in this codec.
    pub fn silence(self) -> u8 {
        match self {
            PromptCodec::Pcmu => g711::ULAW_SILENCE,
            PromptCodec::Pcma => g711::ALAW_SILENCE,
        }
    }
}

/// A decoded prompt: 8 kHz mono linear PCM, plus its G.711 encodings made on first use.
#[derive(Debug)]
pub struct Prompt {
    name: String,
    samples: Arc<[i16]>,
    pcmu: OnceLock<Arc<[u8]>>,
    pcma: OnceLock<Arc<[u8]>>,
}

/// Samples per second of the media engine's linear audio.
pub const RATE: u32 = 8_000;

const WAVE_FORMAT_PCM: u16 = 1;
const WAVE_FORMAT_ALAW: u16 = 6;
const WAVE_FORMAT_MULAW: u16 = 7;
const WAVE_FORMAT_EXTENSIBLE: u16 = 0xFFFE;

/// Longest prompt accepted: 10 minutes at 8 kHz (a prompt is not a recording store).
pub const MAX_SAMPLES: usize = 10 * 60 * RATE as usize;

impl Prompt {
    /// Decodes a WAV file's bytes. `name` appears in errors and logs.
    pub fn from_wav(name: &str, bytes: &[u8]) -> Result<Self, PromptError> {
        let fail = |problem: String| PromptError { name: name.to_owned(), problem };
        if bytes.len() < 12 || &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
            return Err(fail("not a WAV file (no RIFF/WAVE header)".into()));
        }
        let mut format = None;
        let mut data = None;
        let mut at = 12;
        while at + 8 <= bytes.len() {
            let id = &bytes[at..at + 4];
            let len = u32::from_le_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]) as usize;
            let body_start = at + 8;
            // Some writers leave the data length at 0 or too large when streaming: take what is there.
            let body_end = body_start.saturating_add(len).min(bytes.len());
            let body = &bytes[body_start..body_end];
            match id {
                b"fmt " => format = Some(parse_format(body).map_err(fail)?),
                b"data" => data = Some(body),
                _ => {}
            }
            // Chunks are padded to an even length (RIFF).
            at = body_start.saturating_add(len).saturating_add(len & 1);
        }
        let format = format.ok_or_else(|| fail("no fmt chunk".into()))?;
        let data = data.ok_or_else(|| fail("no data chunk".into()))?;
        if format.channels != 1 {
            return Err(fail(format!("{} channels; prompts must be mono", format.channels)));
        }
        if format.rate != 8_000 && format.rate != 16_000 {
            return Err(fail(format!("{} Hz; prompts must be 8000 or 16000 Hz", format.rate)));
        }
        let linear: Vec<i16> = match (format.tag, format.bits) {
            (WAVE_FORMAT_PCM, 16) => data.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect(),
            (WAVE_FORMAT_MULAW, 8) => data.iter().map(|&b| g711::ulaw_decode(b)).collect(),
            (WAVE_FORMAT_ALAW, 8) => data.iter().map(|&b| g711::alaw_decode(b)).collect(),
            (WAVE_FORMAT_PCM, bits) => {
                return Err(fail(format!("{bits}-bit PCM; prompts must be 16-bit PCM, A-law or μ-law")));
            }
            (tag, bits) => {
                return Err(fail(format!(
                    "audio format {tag} with {bits} bits; prompts must be 16-bit PCM (1), A-law (6) or μ-law (7)"
                )));
            }
        };
        let samples = if format.rate == 16_000 { downsample_16k_to_8k(&linear) } else { linear };
        if samples.len() > MAX_SAMPLES {
            return Err(fail(format!("{} s long; prompts may be at most 600 s", samples.len() / RATE as usize)));
        }
        Ok(Self::from_linear(name, samples))
    }

    /// A prompt from 8 kHz linear samples (generated tones, synthesized speech).
    pub fn from_linear(name: &str, samples: Vec<i16>) -> Self {
        Self { name: name.to_owned(), samples: samples.into(), pcmu: OnceLock::new(), pcma: OnceLock::new() }
    }

    /// The prompt's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The audio as 8 kHz linear PCM.
    pub fn linear(&self) -> &Arc<[i16]> {
        &self.samples
    }

    /// Length in milliseconds.
    pub fn duration_ms(&self) -> u64 {
        self.samples.len() as u64 * 1000 / u64::from(RATE)
    }

    /// Writes frame `index` of the prompt cut into frames of `out.len()` octets in `codec` (the
    /// last one padded with silence). Returns false past the end.
    pub fn frame_into(&self, codec: PromptCodec, index: usize, out: &mut [u8]) -> bool {
        let audio = self.encoded(codec);
        let start = index.saturating_mul(out.len());
        if start >= audio.len() {
            return false;
        }
        let chunk = &audio[start..(start + out.len()).min(audio.len())];
        out[..chunk.len()].copy_from_slice(chunk);
        out[chunk.len()..].fill(codec.silence());
        true
    }

    /// The audio in `codec`, encoded on first use and shared afterwards.
    pub fn encoded(&self, codec: PromptCodec) -> Arc<[u8]> {
        type Encoder = fn(&[i16], &mut [u8]) -> usize;
        let (cell, encode): (&OnceLock<Arc<[u8]>>, Encoder) = match codec {
            PromptCodec::Pcmu => (&self.pcmu, g711::encode_ulaw),
            PromptCodec::Pcma => (&self.pcma, g711::encode_alaw),
        };
        Arc::clone(cell.get_or_init(|| {
            let mut out = vec![0u8; self.samples.len()];
            encode(&self.samples, &mut out);
            out.into()
        }))
    }
}

#[derive(Debug, Clone, Copy)]
struct Format {
    tag: u16,
    channels: u16,
    rate: u32,
    bits: u16,
}

fn parse_format(body: &[u8]) -> Result<Format, String> {
    if body.len() < 16 {
        return Err(format!("fmt chunk of {} bytes is too short", body.len()));
    }
    let u16_at = |i: usize| u16::from_le_bytes([body[i], body[i + 1]]);
    let mut tag = u16_at(0);
    if tag == WAVE_FORMAT_EXTENSIBLE {
        // cbSize (2) + valid bits (2) + channel mask (4), then the sub-format GUID whose first
        // two bytes are the real format tag.
        if body.len() < 26 {
            return Err("WAVE_FORMAT_EXTENSIBLE fmt chunk is too short".into());
        }
        tag = u16_at(24);
    }
    Ok(Format {
        tag,
        channels: u16_at(2),
        rate: u32::from_le_bytes([body[4], body[5], body[6], body[7]]),
        bits: u16_at(14),
    })
}

/// Taps of the 16→8 kHz anti-aliasing filter (odd, so the filter has a whole-sample delay).
const TAPS: usize = 63;

/// The anti-aliasing filter: a windowed sinc (Blackman window) with its cut-off at 3.6 kHz of
/// the 16 kHz input, normalised to unity gain at DC. The Blackman window keeps the stop band
/// (above 4 kHz, which would alias) more than 70 dB down.
fn lowpass_taps() -> &'static [f32; TAPS] {
    static TAPS_CELL: OnceLock<[f32; TAPS]> = OnceLock::new();
    TAPS_CELL.get_or_init(|| {
        let cutoff = 3_600.0_f64 / 16_000.0; // cycles per input sample
        let mid = (TAPS / 2) as f64;
        let mut taps = [0f64; TAPS];
        for (i, tap) in taps.iter_mut().enumerate() {
            let n = i as f64 - mid;
            let sinc = if n == 0.0 {
                2.0 * cutoff
            } else {
                (2.0 * std::f64::consts::PI * cutoff * n).sin() / (std::f64::consts::PI * n)
            };
            let phase = 2.0 * std::f64::consts::PI * i as f64 / (TAPS - 1) as f64;
            let window = 0.42 - 0.5 * phase.cos() + 0.08 * (2.0 * phase).cos();
            *tap = sinc * window;
        }
        let sum: f64 = taps.iter().sum();
        taps.map(|t| (t / sum) as f32)
    })
}

/// Halves the sample rate: low-pass filter, then keep every second sample. The filter's delay
/// (31 input samples) is compensated so the output lines up with the input.
pub fn downsample_16k_to_8k(input: &[i16]) -> Vec<i16> {
    let taps = lowpass_taps();
    let half = (TAPS / 2) as isize;
    let mut out = Vec::with_capacity(input.len() / 2);
    let mut i = 0;
    while i < input.len() {
        let mut acc = 0f32;
        for (k, tap) in taps.iter().enumerate() {
            let j = i as isize + k as isize - half;
            if j >= 0 && (j as usize) < input.len() {
                acc += f32::from(input[j as usize]) * tap;
            }
        }
        out.push(acc.round().clamp(f32::from(i16::MIN), f32::from(i16::MAX)) as i16);
        i += 2;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav(tag: u16, channels: u16, rate: u32, bits: u16, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"RIFF");
        out.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
        out.extend_from_slice(b"WAVEfmt ");
        out.extend_from_slice(&16u32.to_le_bytes());
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&channels.to_le_bytes());
        out.extend_from_slice(&rate.to_le_bytes());
        let block = channels * bits / 8;
        out.extend_from_slice(&(rate * u32::from(block)).to_le_bytes());
        out.extend_from_slice(&block.to_le_bytes());
        out.extend_from_slice(&bits.to_le_bytes());
        out.extend_from_slice(b"data");
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
        out
    }

    fn tone(freq: f64, rate: u32, secs: f64, amplitude: f64) -> Vec<i16> {
        let n = (f64::from(rate) * secs) as usize;
        (0..n)
            .map(|i| (amplitude * (2.0 * std::f64::consts::PI * freq * i as f64 / f64::from(rate)).sin()) as i16)
            .collect()
    }

    fn pcm_bytes(samples: &[i16]) -> Vec<u8> {
        samples.iter().flat_map(|s| s.to_le_bytes()).collect()
    }

    fn rms(samples: &[i16]) -> f64 {
        (samples.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>() / samples.len() as f64).sqrt()
    }

    #[test]
    fn pcm_ulaw_and_alaw_files_decode_to_the_same_audio() {
        let samples = tone(440.0, 8_000, 0.5, 8_000.0);
        let pcm = Prompt::from_wav("pcm.wav", &wav(1, 1, 8_000, 16, &pcm_bytes(&samples))).unwrap();
        assert_eq!(&pcm.linear()[..], &samples[..]);
        let ulaw: Vec<u8> = samples.iter().map(|&s| g711::ulaw_encode(s)).collect();
        let alaw: Vec<u8> = samples.iter().map(|&s| g711::alaw_encode(s)).collect();
        let from_ulaw = Prompt::from_wav("u.wav", &wav(7, 1, 8_000, 8, &ulaw)).unwrap();
        let from_alaw = Prompt::from_wav("a.wav", &wav(6, 1, 8_000, 8, &alaw)).unwrap();
        assert_eq!(from_ulaw.linear().len(), samples.len());
        // G.711 is lossy: within a few percent of each sample's size.
        for (a, b) in samples.iter().zip(from_ulaw.linear().iter()) {
            assert!((i32::from(*a) - i32::from(*b)).abs() <= i32::from(a.unsigned_abs() / 16) + 8, "{a} vs {b}");
        }
        // A μ-law file sent as PCMU goes out byte for byte as it was stored.
        assert_eq!(&from_ulaw.encoded(PromptCodec::Pcmu)[..], &ulaw[..]);
        assert_eq!(&from_alaw.encoded(PromptCodec::Pcma)[..], &alaw[..]);
        assert!(Arc::ptr_eq(&from_ulaw.encoded(PromptCodec::Pcmu), &from_ulaw.encoded(PromptCodec::Pcmu)), "cached");
        assert_eq!(pcm.duration_ms(), 500);
        // Cut into frames: 4000 samples are 25 frames of 160, the 26th does not exist; a cut
        // of 3 octets leaves a last frame padded with silence.
        let mut frame = [0u8; 160];
        assert!(from_ulaw.frame_into(PromptCodec::Pcmu, 24, &mut frame));
        assert_eq!(&frame[..], &ulaw[24 * 160..25 * 160]);
        assert!(!from_ulaw.frame_into(PromptCodec::Pcmu, 25, &mut frame));
        let mut odd = [0u8; 3_000];
        assert!(from_ulaw.frame_into(PromptCodec::Pcmu, 1, &mut odd));
        assert_eq!((&odd[..1_000], odd[1_000]), (&ulaw[3_000..], g711::ULAW_SILENCE));
    }

    #[test]
    fn sixteen_khz_is_low_pass_filtered_before_decimation() {
        // 1 kHz passes; 6 kHz (which plain decimation would fold to 2 kHz) is removed.
        let pass = tone(1_000.0, 16_000, 0.5, 10_000.0);
        let stop = tone(6_000.0, 16_000, 0.5, 10_000.0);
        let passed = Prompt::from_wav("p.wav", &wav(1, 1, 16_000, 16, &pcm_bytes(&pass))).unwrap();
        let stopped = Prompt::from_wav("s.wav", &wav(1, 1, 16_000, 16, &pcm_bytes(&stop))).unwrap();
        assert_eq!(passed.linear().len(), pass.len() / 2);
        let middle = |p: &Prompt| p.linear()[200..3_800].to_vec();
        let gain_pass = rms(&middle(&passed)) / rms(&pass);
        let gain_stop = rms(&middle(&stopped)) / rms(&stop);
        assert!((gain_pass - 1.0).abs() < 0.02, "pass band gain {gain_pass}");
        assert!(gain_stop < 0.001, "stop band gain {gain_stop} (> -60 dB)");
        // The output lines up with the input (the filter delay is compensated).
        let expected: Vec<i16> = pass.iter().step_by(2).copied().collect();
        let err = rms(&middle(&passed).iter().zip(&expected[200..3_800]).map(|(a, b)| a - b).collect::<Vec<_>>());
        assert!(err < 100.0, "misaligned: error rms {err}");
    }

    #[test]
    fn unsupported_files_are_refused_with_the_name_and_the_reason() {
        let stereo = Prompt::from_wav("hello.wav", &wav(1, 2, 8_000, 16, &[0; 64])).unwrap_err();
        assert_eq!(stereo.to_string(), "prompt hello.wav: 2 channels; prompts must be mono");
        let rate = Prompt::from_wav("cd.wav", &wav(1, 1, 44_100, 16, &[0; 64])).unwrap_err();
        assert!(rate.to_string().contains("44100 Hz"), "{rate}");
        let bits = Prompt::from_wav("b.wav", &wav(1, 1, 8_000, 8, &[0; 64])).unwrap_err();
        assert!(bits.to_string().contains("8-bit PCM"), "{bits}");
        let mp3 = Prompt::from_wav("m.wav", &wav(0x55, 1, 8_000, 0, &[0; 64])).unwrap_err();
        assert!(mp3.to_string().contains("audio format 85"), "{mp3}");
        let junk = Prompt::from_wav("j.wav", b"ID3\x03junk").unwrap_err();
        assert!(junk.to_string().contains("not a WAV file"), "{junk}");
        let truncated = Prompt::from_wav("t.wav", &wav(1, 1, 8_000, 16, &[0; 64])[..30]).unwrap_err();
        assert!(truncated.to_string().contains("fmt"), "{truncated}");
    }
}
