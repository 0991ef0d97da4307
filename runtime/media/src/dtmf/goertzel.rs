//! In-band DTMF detection with the Goertzel algorithm, for peers that send key presses as audio.
//!
//! The signal is cut into blocks of `block_len` samples (102 at 8 kHz, 12.75 ms). In each block
//! eight Goertzel filters measure the four row and four column frequencies of ITU-T Q.23. A block
//! holds a key when, for the strongest row and the strongest column:
//!
//! - both tones are above `min_level` (an amplitude in 16-bit sample units);
//! - the twist (level difference between the groups) is within `max_normal_twist_db` when the row
//!   is louder and `max_reverse_twist_db` when the column is louder (Q.24 limits: 8 dB / 4 dB);
//! - every other tone of each group is at least `min_relative_peak_db` weaker;
//! - the two tones carry at least `min_tone_fraction` of the block's energy, which is what
//!   rejects speech and noise.
//!
//! 102 samples give a main lobe whose first null is 78 Hz from the centre, about the spacing of
//! the rows (73–89 Hz), so a row leaks less than −19 dB into its neighbours.
//!
//! The relative-peak (3 dB) and energy-fraction (45%) defaults are looser than a full block needs
//! because a tone that covers only part of a block (its first and last block) measures weaker
//! (amplitude and energy fraction both scale with the covered share, and its main lobe widens);
//! a block at least half covered must still count, or 40 ms tones would be missed at some
//! alignments.
//!
//! A key is reported once, when it has held for `min_blocks` consecutive blocks of similar level
//! (within 6 dB of the strongest block of the run): with the defaults, a tone of 40 ms or more is
//! always reported (it covers two full blocks and at least 57% of a third) and a tone shorter than
//! 25 ms never is. It may be reported again only after `release_blocks` blocks without it
//! (2 blocks = 25.5 ms, below the 40 ms minimum pause between keys).
//!
//! Not done: second-harmonic checks (talk-off protection beyond the energy-fraction test) and
//! sample rates other than 8 kHz are untested, though the coefficients follow the configured rate.

use std::collections::VecDeque;

use super::DtmfDigit;

/// Row (low-group) frequencies in Hz (ITU-T Q.23).
pub(super) const ROW_HZ: [f32; 4] = [697.0, 770.0, 852.0, 941.0];
/// Column (high-group) frequencies in Hz.
pub(super) const COL_HZ: [f32; 4] = [1209.0, 1336.0, 1477.0, 1633.0];

/// (row, column) of each key, in event-code order.
pub(super) const KEYPAD_POSITION: [(usize, usize); 16] = [
    (3, 1), // 0
    (0, 0), // 1
    (0, 1), // 2
    (0, 2), // 3
    (1, 0), // 4
    (1, 1), // 5
    (1, 2), // 6
    (2, 0), // 7
    (2, 1), // 8
    (2, 2), // 9
    (3, 0), // *
    (3, 2), // #
    (0, 3), // A
    (1, 3), // B
    (2, 3), // C
    (3, 3), // D
];

fn key_at(row: usize, col: usize) -> Option<DtmfDigit> {
    KEYPAD_POSITION.iter().position(|&p| p == (row, col)).and_then(|i| DtmfDigit::from_event(i as u8))
}

/// Configuration of a [`ToneDetector`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ToneDetectorConfig {
    /// Sample rate of the PCM fed in.
    pub sample_rate: u32,
    /// Samples per analysis block.
    pub block_len: usize,
    /// Consecutive blocks a key must hold before it is reported.
    pub min_blocks: u8,
    /// Consecutive blocks without the key before it can be reported again.
    pub release_blocks: u8,
    /// Minimum amplitude of each tone, in 16-bit sample units (700 ≈ −30 dBm0 for G.711).
    pub min_level: f32,
    /// Most the row may exceed the column by, in dB.
    pub max_normal_twist_db: f32,
    /// Most the column may exceed the row by, in dB.
    pub max_reverse_twist_db: f32,
    /// How much weaker than the strongest the other tones of its group must be, in dB.
    pub min_relative_peak_db: f32,
    /// Share of the block's energy the two tones must carry.
    pub min_tone_fraction: f32,
}

impl Default for ToneDetectorConfig {
    fn default() -> Self {
        Self {
            sample_rate: 8_000,
            block_len: 102,
            min_blocks: 3,
            release_blocks: 2,
            min_level: 700.0,
            max_normal_twist_db: 8.0,
            max_reverse_twist_db: 4.0,
            min_relative_peak_db: 3.0,
            min_tone_fraction: 0.45,
        }
    }
}

/// A key detected in the audio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DetectedTone {
    /// The key.
    pub digit: DtmfDigit,
    /// Position in the stream (samples since the detector started) of the first block of the
    /// run that confirmed it.
    pub start_sample: u64,
}

fn db_ratio(db: f32) -> f32 {
    10f32.powf(db / 20.0)
}

/// Detects DTMF keys in 16-bit linear PCM (sans-IO: samples in, keys out).
#[derive(Debug, Clone)]
pub struct ToneDetector {
    config: ToneDetectorConfig,
    /// Goertzel coefficients `2 cos(2π f / fs)`: four rows then four columns.
    coeff: [f32; 8],
    /// Goertzel states (s[n-1], s[n-2]).
    state: [(f32, f32); 8],
    energy: f32,
    in_block: usize,
    samples_seen: u64,
    /// The key of the current run of blocks, its length, strongest level and start.
    run: Option<(DtmfDigit, u8, f32, u64)>,
    /// The key last reported and how many blocks it has been missing.
    held: Option<(DtmfDigit, u8)>,
    detected: VecDeque<DetectedTone>,
}

impl ToneDetector {
    /// A detector that has heard nothing.
    pub fn new(config: ToneDetectorConfig) -> Self {
        let mut coeff = [0f32; 8];
        for (c, f) in coeff.iter_mut().zip(ROW_HZ.iter().chain(COL_HZ.iter())) {
            *c = 2.0 * (2.0 * std::f32::consts::PI * f / config.sample_rate as f32).cos();
        }
        Self {
            config: ToneDetectorConfig { block_len: config.block_len.max(1), ..config },
            coeff,
            state: [(0.0, 0.0); 8],
            energy: 0.0,
            in_block: 0,
            samples_seen: 0,
            run: None,
            held: None,
            detected: VecDeque::with_capacity(4),
        }
    }

    /// Feeds samples; any length, blocks carry over between calls.
    pub fn process(&mut self, samples: &[i16]) {
        for &s in samples {
            let x = f32::from(s);
            for (st, &c) in self.state.iter_mut().zip(&self.coeff) {
                let s0 = x + c * st.0 - st.1;
                *st = (s0, st.0);
            }
            self.energy += x * x;
            self.in_block += 1;
            self.samples_seen += 1;
            if self.in_block == self.config.block_len {
                let key = self.classify_block();
                let block_start = self.samples_seen - self.config.block_len as u64;
                self.on_block(key, block_start);
                self.state = [(0.0, 0.0); 8];
                self.energy = 0.0;
                self.in_block = 0;
            }
        }
    }

    /// The next detected key, in order.
    pub fn poll_tone(&mut self) -> Option<DetectedTone> {
        self.detected.pop_front()
    }

    /// The key in the block just completed, with its level (sum of the two amplitudes).
    fn classify_block(&self) -> Option<(DtmfDigit, f32)> {
        let cfg = &self.config;
        let n = cfg.block_len as f32;
        let mut amp = [0f32; 8];
        for ((a, st), &c) in amp.iter_mut().zip(&self.state).zip(&self.coeff) {
            let power = (st.0 * st.0 + st.1 * st.1 - c * st.0 * st.1).max(0.0);
            // A sine of amplitude A at the filter's frequency gives |X| = A·N/2.
            *a = 2.0 * power.sqrt() / n;
        }
        let strongest = |group: &[f32]| {
            group.iter().enumerate().fold((0, 0f32), |best, (i, &a)| if a > best.1 { (i, a) } else { best })
        };
        let (row, row_amp) = strongest(&amp[..4]);
        let (col, col_amp) = strongest(&amp[4..]);
        if row_amp < cfg.min_level || col_amp < cfg.min_level {
            return None;
        }
        let twist_ok = if row_amp >= col_amp {
            row_amp <= col_amp * db_ratio(cfg.max_normal_twist_db)
        } else {
            col_amp <= row_amp * db_ratio(cfg.max_reverse_twist_db)
        };
        if !twist_ok {
            return None;
        }
        let peak = db_ratio(cfg.min_relative_peak_db);
        let others_weaker = |group: &[f32], best: usize, best_amp: f32| {
            group.iter().enumerate().all(|(i, &a)| i == best || a * peak <= best_amp)
        };
        if !others_weaker(&amp[..4], row, row_amp) || !others_weaker(&amp[4..], col, col_amp) {
            return None;
        }
        // Energy of a sine of amplitude A over N samples is A²·N/2.
        let tone_energy = (row_amp * row_amp + col_amp * col_amp) * n / 2.0;
        if tone_energy < cfg.min_tone_fraction * self.energy {
            return None;
        }
        key_at(row, col).map(|k| (k, row_amp + col_amp))
    }

    fn on_block(&mut self, key: Option<(DtmfDigit, f32)>, block_start: u64) {
        let consistent = db_ratio(6.0);
        // Extend or restart the run of blocks holding the same key at a similar level.
        self.run = match (key, self.run) {
            (Some((k, level)), Some((rk, len, max, start))) if k == rk => {
                if level * consistent < max {
                    // Much weaker than the run: a partial block at the end of the tone.
                    None
                } else if level > max * consistent {
                    // Much stronger: the run so far was the tone's ragged start.
                    Some((k, 1, level, block_start))
                } else {
                    Some((k, len.saturating_add(1), max.max(level), start))
                }
            }
            (Some((k, level)), _) => Some((k, 1, level, block_start)),
            (None, _) => None,
        };
        let current = key.map(|(k, _)| k);
        // Count the blocks the held key has been missing.
        if let Some((held, missing)) = self.held {
            if current == Some(held) {
                self.held = Some((held, 0));
            } else if missing + 1 >= self.config.release_blocks {
                self.held = None;
            } else {
                self.held = Some((held, missing + 1));
            }
        }
        if let Some((k, len, _, start)) = self.run
            && len >= self.config.min_blocks
            && self.held.is_none()
        {
            self.held = Some((k, 0));
            self.detected.push_back(DetectedTone { digit: k, start_sample: start });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::g711;

    const RATE: f64 = 8000.0;

    /// A deterministic noise source (xorshift), uniform in [-1, 1].
    struct Noise(u32);

    impl Noise {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 17;
            self.0 ^= self.0 << 5;
            f64::from(self.0) / f64::from(u32::MAX) * 2.0 - 1.0
        }
    }

    /// Appends `ms` of the key's two tones, amplitudes given per tone.
    fn tone(out: &mut Vec<i16>, digit: DtmfDigit, ms: f64, row_amp: f64, col_amp: f64) {
        let (fr, fc) = digit.frequencies();
        let n = (ms * RATE / 1000.0).round() as usize;
        let base = out.len();
        for i in 0..n {
            let t = (base + i) as f64 / RATE;
            let v = row_amp * (2.0 * std::f64::consts::PI * f64::from(fr) * t).sin()
                + col_amp * (2.0 * std::f64::consts::PI * f64::from(fc) * t).sin();
            out.push(v.round().clamp(-32768.0, 32767.0) as i16);
        }
    }

    fn silence(out: &mut Vec<i16>, ms: f64) {
        out.extend(std::iter::repeat_n(0i16, (ms * RATE / 1000.0).round() as usize));
    }

    fn detect_with(config: ToneDetectorConfig, pcm: &[i16], chunk: usize) -> Vec<DtmfDigit> {
        let mut d = ToneDetector::new(config);
        let mut out = Vec::new();
        for c in pcm.chunks(chunk) {
            d.process(c);
            while let Some(t) = d.poll_tone() {
                out.push(t.digit);
            }
        }
        out
    }

    fn detect(pcm: &[i16]) -> Vec<DtmfDigit> {
        detect_with(ToneDetectorConfig::default(), pcm, 160)
    }

    /// -10 dBm0 per tone in G.711 terms.
    const LEVEL: f64 = 7_000.0;

    #[test]
    fn every_key_is_detected_once() {
        let mut pcm = Vec::new();
        for d in DtmfDigit::ALL {
            tone(&mut pcm, d, 100.0, LEVEL, LEVEL);
            silence(&mut pcm, 100.0);
        }
        assert_eq!(detect(&pcm), DtmfDigit::ALL.to_vec());
    }

    #[test]
    fn chunking_does_not_matter() {
        let mut pcm = Vec::new();
        for d in [DtmfDigit::D1, DtmfDigit::D2, DtmfDigit::Pound] {
            tone(&mut pcm, d, 70.0, LEVEL, LEVEL);
            silence(&mut pcm, 60.0);
        }
        let expected = vec![DtmfDigit::D1, DtmfDigit::D2, DtmfDigit::Pound];
        for chunk in [1, 37, 102, 160, 4096] {
            assert_eq!(detect_with(ToneDetectorConfig::default(), &pcm, chunk), expected, "chunk {chunk}");
        }
    }

    #[test]
    fn the_start_position_is_reported() {
        let mut pcm = Vec::new();
        silence(&mut pcm, 102.0 / 8.0 * 10.0);
        tone(&mut pcm, DtmfDigit::D7, 100.0, LEVEL, LEVEL);
        let mut d = ToneDetector::new(ToneDetectorConfig::default());
        d.process(&pcm);
        let t = d.poll_tone().unwrap();
        assert_eq!(t, DetectedTone { digit: DtmfDigit::D7, start_sample: 1020 });
        assert_eq!(d.poll_tone(), None);
    }

    #[test]
    fn forty_ms_is_detected_at_any_alignment_and_twenty_never() {
        for offset in 0..102usize {
            let mut pcm = vec![0i16; offset];
            tone(&mut pcm, DtmfDigit::D4, 40.0, LEVEL, LEVEL);
            silence(&mut pcm, 60.0);
            assert_eq!(detect(&pcm), vec![DtmfDigit::D4], "40 ms at offset {offset}");
            let mut pcm = vec![0i16; offset];
            tone(&mut pcm, DtmfDigit::D4, 23.0, LEVEL, LEVEL);
            silence(&mut pcm, 60.0);
            assert_eq!(detect(&pcm), vec![], "23 ms at offset {offset}");
        }
    }

    #[test]
    fn a_long_press_is_one_key_and_a_40ms_pause_splits_two() {
        let mut pcm = Vec::new();
        tone(&mut pcm, DtmfDigit::D0, 1500.0, LEVEL, LEVEL);
        silence(&mut pcm, 40.0);
        tone(&mut pcm, DtmfDigit::D0, 60.0, LEVEL, LEVEL);
        silence(&mut pcm, 50.0);
        assert_eq!(detect(&pcm), vec![DtmfDigit::D0, DtmfDigit::D0]);
    }

    #[test]
    fn a_short_dropout_does_not_split_a_press() {
        let mut pcm = Vec::new();
        tone(&mut pcm, DtmfDigit::D9, 100.0, LEVEL, LEVEL);
        // 10 ms of nothing in the middle (a lost packet concealed with silence).
        silence(&mut pcm, 10.0);
        tone(&mut pcm, DtmfDigit::D9, 100.0, LEVEL, LEVEL);
        silence(&mut pcm, 60.0);
        assert_eq!(detect(&pcm), vec![DtmfDigit::D9]);
    }

    #[test]
    fn twist_limits() {
        let check = |row: f64, col: f64| {
            let mut pcm = Vec::new();
            tone(&mut pcm, DtmfDigit::D5, 100.0, row, col);
            silence(&mut pcm, 50.0);
            detect(&pcm)
        };
        let db = |x: f64| 10f64.powf(x / 20.0);
        // Normal twist: column 6 dB below the row is fine, 10 dB is not.
        assert_eq!(check(LEVEL, LEVEL / db(6.0)), vec![DtmfDigit::D5]);
        assert_eq!(check(LEVEL, LEVEL / db(10.0)), vec![]);
        // Reverse twist: column 3 dB above is fine, 6 dB is not.
        assert_eq!(check(LEVEL / db(3.0), LEVEL), vec![DtmfDigit::D5]);
        assert_eq!(check(LEVEL / db(6.0), LEVEL), vec![]);
    }

    #[test]
    fn single_tones_quiet_tones_and_noise_are_not_keys() {
        let mut pcm = Vec::new();
        tone(&mut pcm, DtmfDigit::D1, 200.0, LEVEL, 0.0);
        tone(&mut pcm, DtmfDigit::D1, 200.0, 0.0, LEVEL);
        tone(&mut pcm, DtmfDigit::D1, 200.0, 300.0, 300.0);
        let mut noise = Noise(0x1234_5678);
        pcm.extend((0..8000).map(|_| (noise.next() * 12_000.0) as i16));
        assert_eq!(detect(&pcm), vec![]);
    }

    #[test]
    fn speech_like_harmonics_are_not_keys() {
        // A 110 Hz voice with flat harmonics up to 2 kHz: the 7th is exactly the 770 Hz row and the
        // 11th 1 Hz from the 1209 Hz column, each loud enough to pass the level test.
        let mut pcm = Vec::new();
        for i in 0..16_000 {
            let t = f64::from(i) / RATE;
            let v: f64 = (1..=18).map(|h| 1500.0 * (2.0 * std::f64::consts::PI * 110.0 * f64::from(h) * t).sin()).sum();
            pcm.push(v as i16);
        }
        assert_eq!(detect(&pcm), vec![]);
    }

    #[test]
    fn keys_in_noise_and_through_g711_are_detected() {
        let mut pcm = Vec::new();
        let keys = [DtmfDigit::Star, DtmfDigit::D3, DtmfDigit::D8, DtmfDigit::C];
        for d in keys {
            tone(&mut pcm, d, 80.0, LEVEL, LEVEL);
            silence(&mut pcm, 80.0);
        }
        // Noise 20 dB below the tones.
        let mut noise = Noise(99);
        let noisy: Vec<i16> = pcm.iter().map(|&s| (f64::from(s) + noise.next() * 1_200.0) as i16).collect();
        assert_eq!(detect(&noisy), keys.to_vec());
        // Through a μ-law and an A-law codec.
        let ulaw: Vec<i16> = noisy.iter().map(|&s| g711::ulaw_decode(g711::ulaw_encode(s))).collect();
        assert_eq!(detect(&ulaw), keys.to_vec());
        let alaw: Vec<i16> = noisy.iter().map(|&s| g711::alaw_decode(g711::alaw_encode(s))).collect();
        assert_eq!(detect(&alaw), keys.to_vec());
    }

    #[test]
    fn keypad_positions_are_a_bijection() {
        for (i, &(r, c)) in KEYPAD_POSITION.iter().enumerate() {
            assert_eq!(key_at(r, c), DtmfDigit::from_event(i as u8));
        }
        assert_eq!(key_at(0, 0), Some(DtmfDigit::D1));
        assert_eq!(key_at(3, 2), Some(DtmfDigit::Pound));
    }
}
