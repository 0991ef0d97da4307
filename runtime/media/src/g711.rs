//! G.711 μ-law (PCMU) and A-law (PCMA) companding (ITU-T G.711), table-driven.
//!
//! G.711 itself compands 14-bit (μ-law) and 13-bit (A-law) uniform PCM. Getting there from our
//! 16-bit samples is a choice, and we make SoX's: round to nearest (`(x + 2) >> 2`,
//! `(x + 4) >> 3`), clipping the few top values that would round past the range, then the classic
//! Sun Microsystems segment code that SoX, and most telephony stacks, use for the companding.
//! The results are byte-identical to `sox -t ul` / `sox -t al`, checked over all 65,536 inputs
//! and over real speech by `tests/g711_sox.rs`.
//!
//! Other reference codes truncate instead of rounding (the Sun code with 16-bit input shifts,
//! the ITU-T G.191 STL `ulaw_compress` shifts the one's complement of negative values): they
//! differ from SoX by one quantisation step on a few inputs next to each decision level (about
//! 500 of the 65,536 inputs), and on -1, which SoX codes as μ-law 0xFF (+0) where truncation
//! gives 0x7E. Decoding is the same everywhere.
//!
//! Decoding uses 256-entry tables; encoding indexes a 16,384-entry (μ-law, 14-bit) or 8,192-entry
//! (A-law, 13-bit) table. All tables are computed at compile time by the `const fn`s below, so
//! there is no start-up cost and no lazy initialisation on the hot path.

/// μ-law bias added to the 14-bit magnitude (0x84 in 16-bit units, G.711 Table 2a).
const ULAW_BIAS_14: i32 = 0x84 >> 2;
/// Largest 14-bit magnitude before the bias (Sun code `CLIP` = 32635 in 16-bit units).
const ULAW_CLIP_14: i32 = 8159;
/// Upper ends of the eight μ-law segments, on the biased 14-bit scale.
const SEG_UEND: [i32; 8] = [0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF];
/// Upper ends of the eight A-law segments, on the 13-bit scale.
const SEG_AEND: [i32; 8] = [0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF];

const fn segment(value: i32, ends: &[i32; 8]) -> usize {
    let mut i = 0;
    while i < 8 {
        if value <= ends[i] {
            return i;
        }
        i += 1;
    }
    8
}

/// μ-law code of a 14-bit linear sample (-8192..=8191).
const fn ulaw_from_14bit(sample: i32) -> u8 {
    let (mut magnitude, mask): (i32, i32) = if sample < 0 { (-sample, 0x7F) } else { (sample, 0xFF) };
    if magnitude > ULAW_CLIP_14 {
        magnitude = ULAW_CLIP_14;
    }
    magnitude += ULAW_BIAS_14;
    let seg = segment(magnitude, &SEG_UEND);
    if seg >= 8 {
        return (0x7F ^ mask) as u8;
    }
    let code = ((seg as i32) << 4) | ((magnitude >> (seg + 1)) & 0x0F);
    (code ^ mask) as u8
}

/// A-law code of a 13-bit linear sample (-4096..=4095).
const fn alaw_from_13bit(sample: i32) -> u8 {
    let (magnitude, mask) = if sample >= 0 { (sample, 0xD5) } else { (-sample - 1, 0x55) };
    let seg = segment(magnitude, &SEG_AEND);
    if seg >= 8 {
        return (0x7F ^ mask) as u8;
    }
    let quant = if seg < 2 { (magnitude >> 1) & 0x0F } else { (magnitude >> seg) & 0x0F };
    ((((seg as i32) << 4) | quant) ^ mask) as u8
}

/// 16-bit linear value of a μ-law code (G.711 Table 2a decision values, scaled by 4).
const fn ulaw_to_linear(code: u8) -> i16 {
    let u = !code as i32;
    let mut t = ((u & 0x0F) << 3) + 0x84;
    t <<= (u & 0x70) >> 4;
    (if u & 0x80 != 0 { 0x84 - t } else { t - 0x84 }) as i16
}

/// 16-bit linear value of an A-law code (G.711 Table 1a, scaled by 8).
const fn alaw_to_linear(code: u8) -> i16 {
    let a = (code ^ 0x55) as i32;
    let mut t = (a & 0x0F) << 4;
    let seg = (a & 0x70) >> 4;
    match seg {
        0 => t += 8,
        1 => t += 0x108,
        _ => {
            t += 0x108;
            t <<= seg - 1;
        }
    }
    (if a & 0x80 != 0 { t } else { -t }) as i16
}

const fn build_ulaw_encode() -> [u8; 1 << 14] {
    let mut table = [0u8; 1 << 14];
    let mut i = 0;
    while i < table.len() {
        table[i] = ulaw_from_14bit(i as i32 - (1 << 13));
        i += 1;
    }
    table
}

const fn build_alaw_encode() -> [u8; 1 << 13] {
    let mut table = [0u8; 1 << 13];
    let mut i = 0;
    while i < table.len() {
        table[i] = alaw_from_13bit(i as i32 - (1 << 12));
        i += 1;
    }
    table
}

const fn build_ulaw_decode() -> [i16; 256] {
    let mut table = [0i16; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = ulaw_to_linear(i as u8);
        i += 1;
    }
    table
}

const fn build_alaw_decode() -> [i16; 256] {
    let mut table = [0i16; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = alaw_to_linear(i as u8);
        i += 1;
    }
    table
}

static ULAW_ENCODE: [u8; 1 << 14] = build_ulaw_encode();
static ALAW_ENCODE: [u8; 1 << 13] = build_alaw_encode();
static ULAW_DECODE: [i16; 256] = build_ulaw_decode();
static ALAW_DECODE: [i16; 256] = build_alaw_decode();

/// Encodes one 16-bit linear sample as μ-law.
#[inline]
pub fn ulaw_encode(sample: i16) -> u8 {
    // Round to 14 bits (SoX), clip the top, offset into the table: always in 0..16384.
    let p = ((i32::from(sample) + 2) >> 2).min((1 << 13) - 1);
    ULAW_ENCODE[(p + (1 << 13)) as usize]
}

/// Decodes one μ-law code to 16-bit linear.
#[inline]
pub fn ulaw_decode(code: u8) -> i16 {
    ULAW_DECODE[usize::from(code)]
}

/// Encodes one 16-bit linear sample as A-law.
#[inline]
pub fn alaw_encode(sample: i16) -> u8 {
    // Round to 13 bits (SoX), clip the top, offset into the table: always in 0..8192.
    let p = ((i32::from(sample) + 4) >> 3).min((1 << 12) - 1);
    ALAW_ENCODE[(p + (1 << 12)) as usize]
}

/// Decodes one A-law code to 16-bit linear.
#[inline]
pub fn alaw_decode(code: u8) -> i16 {
    ALAW_DECODE[usize::from(code)]
}

/// Encodes `input` as μ-law into `output`, as many samples as both hold; returns the count.
pub fn encode_ulaw(input: &[i16], output: &mut [u8]) -> usize {
    let n = input.len().min(output.len());
    for (o, &s) in output[..n].iter_mut().zip(&input[..n]) {
        *o = ulaw_encode(s);
    }
    n
}

/// Decodes μ-law `input` into `output`, as many samples as both hold; returns the count.
pub fn decode_ulaw(input: &[u8], output: &mut [i16]) -> usize {
    let n = input.len().min(output.len());
    for (o, &c) in output[..n].iter_mut().zip(&input[..n]) {
        *o = ulaw_decode(c);
    }
    n
}

/// Encodes `input` as A-law into `output`, as many samples as both hold; returns the count.
pub fn encode_alaw(input: &[i16], output: &mut [u8]) -> usize {
    let n = input.len().min(output.len());
    for (o, &s) in output[..n].iter_mut().zip(&input[..n]) {
        *o = alaw_encode(s);
    }
    n
}

/// Decodes A-law `input` into `output`, as many samples as both hold; returns the count.
pub fn decode_alaw(input: &[u8], output: &mut [i16]) -> usize {
    let n = input.len().min(output.len());
    for (o, &c) in output[..n].iter_mut().zip(&input[..n]) {
        *o = alaw_decode(c);
    }
    n
}

/// The μ-law code for digital silence (a positive zero).
pub const ULAW_SILENCE: u8 = 0xFF;
/// The A-law code for digital silence (+8 in 16-bit linear, the smallest positive level).
pub const ALAW_SILENCE: u8 = 0xD5;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_codes() {
        assert_eq!(ulaw_encode(0), 0xFF);
        assert_eq!(alaw_encode(0), 0xD5);
        assert_eq!(ulaw_encode(0), ULAW_SILENCE);
        assert_eq!(alaw_encode(0), ALAW_SILENCE);
        assert_eq!(ulaw_decode(0xFF), 0);
        assert_eq!(ulaw_decode(0x7F), 0);
        assert_eq!(alaw_decode(0xD5), 8);
        assert_eq!(alaw_decode(0x55), -8);
    }

    #[test]
    fn known_values_at_the_extremes() {
        // Full scale: μ-law peaks at ±32124, A-law at ±32256.
        assert_eq!(ulaw_encode(i16::MAX), 0x80);
        assert_eq!(ulaw_encode(i16::MIN), 0x00);
        assert_eq!(ulaw_decode(0x80), 32_124);
        assert_eq!(ulaw_decode(0x00), -32_124);
        assert_eq!(alaw_encode(i16::MAX), 0xAA);
        assert_eq!(alaw_encode(i16::MIN), 0x2A);
        assert_eq!(alaw_decode(0xAA), 32_256);
        assert_eq!(alaw_decode(0x2A), -32_256);
        // The first steps above zero.
        assert_eq!(ulaw_decode(0xFE), 8);
        assert_eq!(ulaw_decode(0x7E), -8);
        assert_eq!(alaw_decode(0xD4), 24);
    }

    #[test]
    fn inputs_are_rounded_to_g711_precision_as_sox_does() {
        // -1 rounds to 0: μ-law +0, not the -0 (0x7F) or -1 step (0x7E) truncation would give.
        assert_eq!(ulaw_encode(-1), 0xFF);
        assert_eq!(ulaw_encode(-2), 0xFF);
        assert_eq!(ulaw_encode(-3), 0x7E);
        assert_eq!(alaw_encode(-4), 0xD5);
        assert_eq!(alaw_encode(-5), 0x55);
        // The top values round past the 14/13-bit range and are clipped, not wrapped.
        assert_eq!(ulaw_encode(32_766), 0x80);
        assert_eq!(alaw_encode(32_764), 0xAA);
    }

    #[test]
    fn decode_then_encode_is_the_identity_for_every_code() {
        for code in 0..=255u8 {
            assert_eq!(alaw_encode(alaw_decode(code)), code, "A-law {code:#04x}");
            // μ-law has two zeros: 0x7F (negative zero) decodes to 0, which encodes as 0xFF.
            let expected = if code == 0x7F { 0xFF } else { code };
            assert_eq!(ulaw_encode(ulaw_decode(code)), expected, "μ-law {code:#04x}");
        }
    }

    #[test]
    fn encoding_is_monotonic_in_the_decoded_value() {
        // Walking the input upwards, the decoded value of the code never goes down.
        let mut last_u = i16::MIN;
        let mut last_a = i16::MIN;
        for s in i16::MIN..=i16::MAX {
            let u = ulaw_decode(ulaw_encode(s));
            let a = alaw_decode(alaw_encode(s));
            assert!(u >= last_u && a >= last_a, "at {s}");
            last_u = u;
            last_a = a;
        }
    }

    #[test]
    fn quantisation_error_stays_within_the_segment_step() {
        for s in (i16::MIN..=i16::MAX).step_by(7) {
            let u = i32::from(ulaw_decode(ulaw_encode(s)));
            let a = i32::from(alaw_decode(alaw_encode(s)));
            let s = i32::from(s);
            // Largest μ-law step is 1024 (segment 7), A-law 1024 too; clipping adds up to ~650.
            assert!((u - s).abs() <= 1024 || s.abs() > 32_000, "μ-law {s} -> {u}");
            assert!((a - s).abs() <= 1024 || s.abs() > 32_000, "A-law {s} -> {a}");
        }
    }

    #[test]
    fn decode_tables_are_symmetric() {
        for code in 0..=127u8 {
            assert_eq!(ulaw_decode(code), -ulaw_decode(code | 0x80));
            assert_eq!(alaw_decode(code), -alaw_decode(code | 0x80));
        }
    }

    #[test]
    fn slice_helpers_stop_at_the_shorter_buffer() {
        let pcm = [0i16, 1000, -1000, 32_767];
        let mut enc = [0u8; 3];
        assert_eq!(encode_ulaw(&pcm, &mut enc), 3);
        assert_eq!(enc, [ulaw_encode(0), ulaw_encode(1000), ulaw_encode(-1000)]);
        let mut dec = [0i16; 8];
        assert_eq!(decode_ulaw(&enc, &mut dec), 3);
        assert_eq!(dec[1], ulaw_decode(enc[1]));
        assert_eq!(encode_alaw(&pcm, &mut enc), 3);
        assert_eq!(decode_alaw(&enc, &mut dec[..2]), 2);
        assert_eq!(dec[0], 8);
    }
}
