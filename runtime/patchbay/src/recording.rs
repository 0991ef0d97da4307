//! Recordings: what a flow's `record` captured, stored per tenant as an 8 kHz 16-bit PCM WAV
//! file plus a JSON file describing it (`<storage>/<tenant>/recordings/<id>.wav` and
//! `<id>.json`).

use std::path::{Path, PathBuf};

use serde::Serialize;

/// 8 kHz mono 16-bit PCM as a WAV file's bytes.
pub fn wav_bytes(samples: &[i16]) -> Vec<u8> {
    let data_len = u32::try_from(samples.len() * 2).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(44 + samples.len() * 2);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&data_len.saturating_add(36).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&8_000u32.to_le_bytes());
    out.extend_from_slice(&16_000u32.to_le_bytes()); // bytes per second
    out.extend_from_slice(&2u16.to_le_bytes()); // block align
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

/// What is written beside a recording's audio.
#[derive(Debug, Serialize)]
pub struct Metadata<'a> {
    /// The recording's id (its file name without extension).
    pub id: &'a str,
    /// The call it was made on.
    pub call_id: &'a str,
    /// The tenant.
    pub tenant: &'a str,
    /// The flow that made it.
    pub flow: &'a str,
    /// Caller and called URIs.
    pub from: &'a str,
    /// The called URI.
    pub to: &'a str,
    /// When recording started (RFC 3339).
    pub started: String,
    /// Length of the audio.
    pub duration_ms: u32,
    /// `terminator`, `silence`, `max-duration` or `hangup`.
    pub ended_by: &'static str,
    /// Always `audio/wav; codec=pcm16; rate=8000` for now.
    pub format: &'static str,
}

/// A tenant's recordings directory.
pub fn dir(storage: &Path, tenant: &str) -> PathBuf {
    storage.join(tenant).join("recordings")
}

/// Writes `<id>.wav` and `<id>.json` into `dir`. The JSON is written last, so a reader that
/// finds it finds the audio complete.
pub async fn store(dir: &Path, meta: &Metadata<'_>, samples: &[i16]) -> std::io::Result<PathBuf> {
    tokio::fs::create_dir_all(dir).await?;
    let wav = dir.join(format!("{}.wav", meta.id));
    tokio::fs::write(&wav, wav_bytes(samples)).await?;
    let json = serde_json::to_vec_pretty(meta).map_err(std::io::Error::other)?;
    tokio::fs::write(dir.join(format!("{}.json", meta.id)), json).await?;
    Ok(wav)
}

/// Whether a 20 ms frame counts as silence for `record`'s silence timeout: its RMS level is
/// below about -45 dBFS (line noise and comfort noise sit below, speech well above).
pub fn is_silent(samples: &[i16]) -> bool {
    if samples.is_empty() {
        return true;
    }
    let energy: f64 = samples.iter().map(|&s| f64::from(s) * f64::from(s)).sum::<f64>() / samples.len() as f64;
    energy.sqrt() < SILENCE_RMS
}

/// -45 dBFS of a 16-bit full scale (32768 · 10^(-45/20)).
const SILENCE_RMS: f64 = 184.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wav_header_describes_8khz_16bit_mono() {
        let bytes = wav_bytes(&[1, -2, 3]);
        assert_eq!(&bytes[..4], b"RIFF");
        assert_eq!(u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]), 36 + 6);
        assert_eq!(u32::from_le_bytes([bytes[24], bytes[25], bytes[26], bytes[27]]), 8_000);
        assert_eq!(u32::from_le_bytes([bytes[40], bytes[41], bytes[42], bytes[43]]), 6);
        assert_eq!(&bytes[44..], &[1, 0, 0xFE, 0xFF, 3, 0]);
        // And our own prompt reader takes it back.
        let prompt = patchbay_media::prompt::Prompt::from_wav("t.wav", &bytes).expect("valid WAV");
        assert_eq!(prompt.duration_ms(), 0, "3 samples round down to 0 ms");
    }

    #[test]
    fn silence_is_a_low_level_and_speech_is_not() {
        assert!(is_silent(&[0; 160]));
        assert!(is_silent(&[100; 160]));
        let tone: Vec<i16> = (0..160).map(|i| ((i as f64 * 0.3).sin() * 3000.0) as i16).collect();
        assert!(!is_silent(&tone));
    }
}
