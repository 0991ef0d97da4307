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

/// Why a recording was not stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The tenant's recordings already take (or with this one would take) its quota.
    #[error("the tenant's recordings would take {needed} bytes, over its quota of {quota}")]
    Quota {
        /// What the recordings would take with this one.
        needed: u64,
        /// The quota.
        quota: u64,
    },
    /// The disk said no.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Writes `<id>.wav` and `<id>.json` into `dir` if the recordings there stay within `quota`
/// bytes with them. The JSON is written last, so a reader that finds it finds the audio
/// complete. (Two recordings of one tenant stored at the same instant may both pass the check:
/// the quota can be overshot by one recording, at most an hour of audio, 57.6 MB.)
pub async fn store(dir: &Path, meta: &Metadata<'_>, samples: &[i16], quota: u64) -> Result<PathBuf, StoreError> {
    tokio::fs::create_dir_all(dir).await?;
    let audio = wav_bytes(samples);
    let json = serde_json::to_vec_pretty(meta).map_err(std::io::Error::other)?;
    let dir_owned = dir.to_path_buf();
    let used = tokio::task::spawn_blocking(move || usage(&dir_owned)).await.map_err(std::io::Error::other)??;
    let needed = used + (audio.len() + json.len()) as u64;
    if needed > quota {
        return Err(StoreError::Quota { needed, quota });
    }
    let wav = dir.join(format!("{}.wav", meta.id));
    tokio::fs::write(&wav, audio).await?;
    tokio::fs::write(dir.join(format!("{}.json", meta.id)), json).await?;
    Ok(wav)
}

/// Bytes the recordings in `dir` take (0 when it does not exist).
pub fn usage(dir: &Path) -> std::io::Result<u64> {
    recording_files(dir)?.iter().try_fold(0, |total, path| Ok(total + std::fs::metadata(path)?.len()))
}

/// Deletes the recordings in `dir` last written before `cutoff` (audio and description);
/// returns how many files went. Other files are left alone.
pub fn sweep(dir: &Path, cutoff: std::time::SystemTime) -> std::io::Result<usize> {
    let mut removed = 0;
    for path in recording_files(dir)? {
        if std::fs::metadata(&path)?.modified()? < cutoff {
            std::fs::remove_file(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// The recordings' files in `dir`, audio and descriptions (what [`store`] writes); none when
/// it does not exist.
fn recording_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "wav" || e == "json") {
            files.push(path);
        }
    }
    Ok(files)
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

    fn meta(id: &str) -> Metadata<'_> {
        Metadata {
            id,
            call_id: "c",
            tenant: "t",
            flow: "f",
            from: "a",
            to: "b",
            started: "2026-12-07T00:00:00Z".into(),
            duration_ms: 1000,
            ended_by: "hangup",
            format: "audio/wav; codec=pcm16; rate=8000",
        }
    }

    #[tokio::test]
    async fn a_recording_over_the_tenants_quota_is_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().expect("temp dir");
        let second = vec![0i16; 8_000]; // 16,044 bytes of WAV
        let quota = 40_000;
        store(dir.path(), &meta("one"), &second, quota).await.expect("fits");
        store(dir.path(), &meta("two"), &second, quota).await.expect("fits");
        let used = usage(dir.path()).expect("usage");
        assert!(used > 32_088 && used < quota, "{used}");
        match store(dir.path(), &meta("three"), &second, quota).await {
            Err(StoreError::Quota { needed, quota: q }) => assert!(needed > q && q == quota),
            other => panic!("expected the quota to refuse it: {other:?}"),
        }
        assert!(!dir.path().join("three.wav").exists() && !dir.path().join("three.json").exists());
        assert_eq!(usage(dir.path()).expect("usage"), used);
    }

    #[tokio::test]
    async fn retention_deletes_what_is_older_and_keeps_the_rest() {
        let dir = tempfile::tempdir().expect("temp dir");
        store(dir.path(), &meta("old"), &[0; 160], u64::MAX).await.expect("stored");
        store(dir.path(), &meta("new"), &[0; 160], u64::MAX).await.expect("stored");
        std::fs::write(dir.path().join("notes.txt"), "not a recording").expect("write");
        let week_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7 * 86_400);
        for name in ["old.wav", "old.json", "notes.txt"] {
            let file = std::fs::File::options().write(true).open(dir.path().join(name)).expect("open");
            file.set_modified(week_ago).expect("set mtime");
        }
        let cutoff = std::time::SystemTime::now() - std::time::Duration::from_secs(86_400);
        assert_eq!(sweep(dir.path(), cutoff).expect("sweep"), 2);
        assert!(!dir.path().join("old.wav").exists() && !dir.path().join("old.json").exists());
        assert!(dir.path().join("new.wav").exists() && dir.path().join("new.json").exists());
        assert!(dir.path().join("notes.txt").exists(), "other files are left alone");
        assert_eq!(sweep(&dir.path().join("missing"), cutoff).expect("no dir, nothing to do"), 0);
    }

    #[test]
    fn silence_is_a_low_level_and_speech_is_not() {
        assert!(is_silent(&[0; 160]));
        assert!(is_silent(&[100; 160]));
        let tone: Vec<i16> = (0..160).map(|i| ((i as f64 * 0.3).sin() * 3000.0) as i16).collect();
        assert!(!is_silent(&tone));
    }
}
