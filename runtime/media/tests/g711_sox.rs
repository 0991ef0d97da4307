//! G.711 against SoX: our encoder must be byte-identical to `sox -t ul` / `-t al` and our decoder
//! sample-identical to SoX's, on real speech (espeak-ng) and on every 16-bit input value.
//!
//! Needs `sox` and `espeak-ng` on the PATH (Debian: `apt-get install -y sox espeak-ng`); the test
//! fails with that message if they are missing. Dither is turned off (`-D`): SoX dithers by
//! default when it lowers the precision, and G.711's 13/14-bit input is lower than 16-bit.

use std::path::{Path, PathBuf};
use std::process::Command;

use patchbay_media::g711;

fn tool(name: &str) {
    let found = Command::new(name).arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(found, "`{name}` is not installed: this test needs `apt-get install -y sox espeak-ng`");
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("patchbay-g711-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating a temporary directory");
        Self(dir)
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn read_s16le(path: &str) -> Vec<i16> {
    std::fs::read(path).expect("reading raw PCM").chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]])).collect()
}

fn write_s16le(path: &str, samples: &[i16]) {
    let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    std::fs::write(path, bytes).expect("writing raw PCM");
}

const RAW_S16: [&str; 10] = ["-t", "raw", "-r", "8000", "-c", "1", "-e", "signed-integer", "-b", "16"];

/// Encodes `pcm_path` with SoX to μ-law and A-law, decodes both back with SoX, and compares
/// every step with ours.
fn compare_with_sox(dir: &TempDir, pcm_path: &str) -> usize {
    let pcm = read_s16le(pcm_path);
    assert!(!pcm.is_empty());
    for (kind, encode, decode) in [
        ("ul", g711::ulaw_encode as fn(i16) -> u8, g711::ulaw_decode as fn(u8) -> i16),
        ("al", g711::alaw_encode, g711::alaw_decode),
    ] {
        let coded = dir.path(&format!("coded.{kind}"));
        let decoded = dir.path(&format!("decoded-{kind}.raw"));
        let mut args = vec!["-D", "-L"];
        args.extend(RAW_S16);
        args.extend([pcm_path, "-t", kind, "-r", "8000", "-c", "1", &coded]);
        run("sox", &args);
        run(
            "sox",
            &[
                "-D",
                "-t",
                kind,
                "-r",
                "8000",
                "-c",
                "1",
                &coded,
                "-L",
                "-t",
                "raw",
                "-e",
                "signed-integer",
                "-b",
                "16",
                &decoded,
            ],
        );

        let sox_coded = std::fs::read(&coded).expect("reading what SoX encoded");
        assert_eq!(sox_coded.len(), pcm.len(), "{kind}: length");
        let ours: Vec<u8> = pcm.iter().map(|&s| encode(s)).collect();
        let mismatches: Vec<_> =
            pcm.iter().zip(ours.iter().zip(&sox_coded)).filter(|(_, (a, b))| a != b).take(5).collect();
        assert!(mismatches.is_empty(), "{kind}: encoder differs from SoX (sample, (ours, sox)): {mismatches:?}");

        let sox_decoded = read_s16le(&decoded);
        let ours: Vec<i16> = sox_coded.iter().map(|&c| decode(c)).collect();
        let mismatches: Vec<_> =
            sox_coded.iter().zip(ours.iter().zip(&sox_decoded)).filter(|(_, (a, b))| a != b).take(5).collect();
        assert!(mismatches.is_empty(), "{kind}: decoder differs from SoX (code, (ours, sox)): {mismatches:?}");
    }
    pcm.len()
}

#[test]
fn g711_matches_sox_on_speech() {
    tool("sox");
    tool("espeak-ng");
    let dir = TempDir::new("speech");
    let wav = dir.path("speech.wav");
    let pcm = dir.path("speech.raw");
    run(
        "espeak-ng",
        &[
            "-w",
            &wav,
            "Thank you for calling Patchbay. For sales, press one. For support, press two. \
             To hear these options again, press the star key.",
        ],
    );
    // Resample to 8 kHz mono 16-bit, normalised to full scale so the loud segments are used too.
    let mut args = vec!["-D", &wav, "-L"];
    args.extend(RAW_S16);
    args.extend([pcm.as_str(), "gain", "-n", "-0.1"]);
    run("sox", &args);
    let samples = compare_with_sox(&dir, &pcm);
    // A few seconds of speech.
    assert!(samples > 8000 * 3, "only {samples} samples of speech");
    let loud = read_s16le(&pcm).iter().any(|s| s.unsigned_abs() > 30_000);
    assert!(loud, "speech was not normalised to full scale");
}

#[test]
fn g711_matches_sox_on_every_input_value() {
    tool("sox");
    let dir = TempDir::new("ramp");
    let pcm = dir.path("ramp.raw");
    let all: Vec<i16> = (i16::MIN..=i16::MAX).collect();
    write_s16le(&pcm, &all);
    assert_eq!(compare_with_sox(&dir, &pcm), 65_536);
    assert!(Path::new(&pcm).exists());
}
