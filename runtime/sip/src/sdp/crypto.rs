//! The RFC 4568 `a=crypto` attribute, for the two SDES suites we support.
//!
//! ```text
//! a=crypto:<tag> <crypto-suite> <key-params> [<session-params>]     (RFC 4568 §9.1)
//! key-params = "inline:" <base64 key||salt> ["|" lifetime] ["|" MKI ":" length]  (§9.2)
//! ```

use std::fmt::Write as _;

use base64::Engine as _;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};

use super::SdesKey;

/// Peers differ on base64 padding; 30 bytes encode to 40 characters without any, but accept
/// a stray `=` rather than fail the call.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// SRTP crypto suites we support (RFC 4568 §6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CryptoSuite {
    /// AES-128 counter mode, HMAC-SHA1 with an 80-bit tag (RFC 4568 §6.2.1).
    AesCm128HmacSha1_80,
    /// AES-128 counter mode, HMAC-SHA1 with a 32-bit tag (RFC 4568 §6.2.2).
    AesCm128HmacSha1_32,
}

impl CryptoSuite {
    /// Our order of preference when offering: the 80-bit tag first (RFC 4568 §6.2.1 is the
    /// one every SDES peer implements).
    pub const PREFERENCE: [CryptoSuite; 2] = [CryptoSuite::AesCm128HmacSha1_80, CryptoSuite::AesCm128HmacSha1_32];

    /// The suite name as written in `a=crypto`.
    pub fn name(self) -> &'static str {
        match self {
            Self::AesCm128HmacSha1_80 => "AES_CM_128_HMAC_SHA1_80",
            Self::AesCm128HmacSha1_32 => "AES_CM_128_HMAC_SHA1_32",
        }
    }

    /// Looks up a suite by name, spelled exactly as registered.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::PREFERENCE.into_iter().find(|suite| suite.name() == name)
    }
}

/// A master key identifier (RFC 4568 §6.1, RFC 3711 §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mki {
    /// MKI value.
    pub value: u64,
    /// Length of the MKI field in SRTP packets, in bytes (1–128).
    pub length: u8,
}

/// One `a=crypto` line we can use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CryptoAttribute {
    pub tag: u32,
    pub suite: CryptoSuite,
    pub key: SdesKey,
    pub lifetime: Option<u64>,
    pub mki: Option<Mki>,
}

/// Parses the value of an `a=crypto` attribute (after `crypto:`). Returns `None` for lines we
/// cannot use: unknown suite, several keys, session parameters (RFC 4568 §6.3, e.g.
/// `UNENCRYPTED_SRTP`, which we do not implement), or a malformed key. Such lines are skipped,
/// not fatal: the offerer may have listed a usable one after them (RFC 4568 §7.1.1).
pub(crate) fn parse(value: &str) -> Option<CryptoAttribute> {
    let mut fields = value.split_ascii_whitespace();
    let tag_text = fields.next()?;
    // tag = 1*9DIGIT (RFC 4568 §9.1)
    if tag_text.is_empty() || tag_text.len() > 9 || !tag_text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let tag = tag_text.parse().ok()?;
    let suite = CryptoSuite::from_name(fields.next()?)?;
    let key_params = fields.next()?;
    if fields.next().is_some() || key_params.contains(';') {
        return None;
    }
    let inline = key_params.strip_prefix("inline:")?;
    let mut parts = inline.split('|');
    let key_text = parts.next()?;
    let decoded = LENIENT_BASE64.decode(key_text).ok()?;
    let key = SdesKey(decoded.try_into().ok()?);
    let mut lifetime = None;
    let mut mki = None;
    for part in parts {
        // Lifetime and MKI are told apart by the colon (RFC 4568 §9.2); each at most once.
        if let Some((value, length)) = part.split_once(':') {
            if mki.is_some() {
                return None;
            }
            let length: u8 = length.parse().ok()?;
            if !(1..=128).contains(&length) {
                return None;
            }
            mki = Some(Mki { value: value.parse().ok()?, length });
        } else {
            if lifetime.is_some() || mki.is_some() {
                return None;
            }
            lifetime = Some(parse_lifetime(part)?);
        }
    }
    Some(CryptoAttribute { tag, suite, key, lifetime, mki })
}

fn parse_lifetime(text: &str) -> Option<u64> {
    match text.strip_prefix("2^") {
        // SRTP limits a master key to 2^48 packets (RFC 3711 §9.2).
        Some(exponent) => {
            let exponent: u32 = exponent.parse().ok()?;
            (exponent <= 48).then(|| 1u64 << exponent)
        }
        None => text.parse().ok(),
    }
}

/// Appends `a=crypto:<tag> <suite> inline:<key>` with a CRLF.
pub(crate) fn write(out: &mut String, tag: u32, suite: CryptoSuite, key: &SdesKey) {
    let _ = write!(out, "a=crypto:{tag} {} inline:{}\r\n", suite.name(), LENIENT_BASE64.encode(key.0));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4568_example_with_lifetime_and_mki() {
        let parsed = parse("1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32");
        let parsed = parsed.expect("the RFC 4568 example parses");
        assert_eq!(parsed.tag, 1);
        assert_eq!(parsed.suite, CryptoSuite::AesCm128HmacSha1_80);
        assert_eq!(parsed.lifetime, Some(1 << 20));
        assert_eq!(parsed.mki, Some(Mki { value: 1, length: 32 }));
    }

    #[test]
    fn unusable_lines_are_skipped() {
        let key = "PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR";
        assert!(parse(&format!("1 F8_128_HMAC_SHA1_80 inline:{key}")).is_none());
        assert!(parse(&format!("1 AES_CM_128_HMAC_SHA1_80 inline:{key} UNENCRYPTED_SRTP")).is_none());
        assert!(parse(&format!("1 AES_CM_128_HMAC_SHA1_80 inline:{key}|2^20|1:4;inline:{key}|2^20|2:4")).is_none());
        assert!(parse("1 AES_CM_128_HMAC_SHA1_80 inline:c2hvcnQ=").is_none());
        assert!(parse(&format!("x AES_CM_128_HMAC_SHA1_80 inline:{key}")).is_none());
        assert!(parse(&format!("1 AES_CM_128_HMAC_SHA1_80 inline:{key}|2^99")).is_none());
        assert!(parse("").is_none());
    }

    #[test]
    fn write_then_parse() {
        let key = SdesKey(core::array::from_fn(|i| i as u8));
        let mut out = String::new();
        write(&mut out, 7, CryptoSuite::AesCm128HmacSha1_32, &key);
        let value = out.trim_end().strip_prefix("a=crypto:").expect("prefix");
        let parsed = parse(value).expect("our own line parses");
        assert_eq!((parsed.tag, parsed.suite, parsed.key), (7, CryptoSuite::AesCm128HmacSha1_32, key));
    }
}
