//! SRTP and SRTCP (RFC 3711) with `AES_CM_128_HMAC_SHA1_80` and `AES_CM_128_HMAC_SHA1_32`, keyed
//! by an SDES `inline:` master key (RFC 4568).
//!
//! # Why hand-written
//!
//! The transform is written here over the RustCrypto primitives (`aes`, `hmac`, `sha1`) rather
//! than taken from a crate:
//!
//! - webrtc-rs `webrtc-srtp` 0.17 depends on `webrtc-util`, which brings tokio into the tree —
//!   forbidden for this crate (`tests/tests/layering.rs`);
//! - the sans-IO `rtc-srtp` 0.21 fits the layering, but it returns a fresh `Bytes` per packet,
//!   ties us to the `rtc-*` 0.21 RTP/RTCP types, and pulls `ring`; our hot path works in place on
//!   the caller's receive/send buffer and must not allocate (CONVENTIONS §5).
//!
//! What RFC 3711 asks for that profile is short: the AES-CM keystream (§4.1.1), the AES-CM PRF key
//! derivation with a key derivation rate of 0 (§4.3.1, §4.3.3), HMAC-SHA1 authentication (§4.2),
//! the rollover counter estimate (§3.3.1, Appendix A) and the replay list (§3.3.2). The tests
//! check the Appendix B.2/B.3 vectors and packet vectors from the pion/webrtc-rs suite, which
//! they in turn check against libsrtp.
//!
//! # Not done
//!
//! - Master key identifiers (MKI) and multiple master keys per crypto attribute: refused with
//!   [`SrtpError::MkiNotSupported`].
//! - Key derivation rates other than 0 (RFC 4568 `KDR=` session parameter), the AEAD (RFC 7714)
//!   and AES-256 profiles, and encrypted header extensions (RFC 6904).
//! - The SDES lifetime is parsed and reported, not enforced below the RFC 3711 §9.2 maxima
//!   (2^48 SRTP packets, 2^31 SRTCP packets), which are enforced.
//! - Key material is not zeroised on drop.

mod context;
mod crypto;
mod replay;

pub use context::{SrtpContext, SrtpStreamStats};

use crate::error::Cause;
use crate::rtp::RtpError;

/// The crypto suites supported (RFC 4568 §6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SrtpProfile {
    /// `AES_CM_128_HMAC_SHA1_80`: AES-128 counter mode, 80-bit HMAC-SHA1 tag (RFC 4568 §6.2.1).
    AesCm128HmacSha1_80,
    /// `AES_CM_128_HMAC_SHA1_32`: as above with a 32-bit SRTP tag; SRTCP keeps 80 bits
    /// (RFC 4568 §6.2.2, RFC 3711 §5.2).
    AesCm128HmacSha1_32,
}

impl SrtpProfile {
    /// The SDP crypto-suite name.
    pub fn name(self) -> &'static str {
        match self {
            SrtpProfile::AesCm128HmacSha1_80 => "AES_CM_128_HMAC_SHA1_80",
            SrtpProfile::AesCm128HmacSha1_32 => "AES_CM_128_HMAC_SHA1_32",
        }
    }

    /// The profile of an SDP crypto-suite name.
    pub fn from_name(name: &str) -> Option<Self> {
        [SrtpProfile::AesCm128HmacSha1_80, SrtpProfile::AesCm128HmacSha1_32].into_iter().find(|p| p.name() == name)
    }

    /// Length of the SRTP authentication tag.
    pub fn rtp_tag_len(self) -> usize {
        match self {
            SrtpProfile::AesCm128HmacSha1_80 => 10,
            SrtpProfile::AesCm128HmacSha1_32 => 4,
        }
    }

    /// Length of the SRTCP authentication tag (80 bits for both suites).
    pub fn rtcp_tag_len(self) -> usize {
        10
    }

    /// Bytes `protect_rtp` adds to a packet.
    pub fn rtp_overhead(self) -> usize {
        self.rtp_tag_len()
    }

    /// Bytes `protect_rtcp` adds to a packet: the E flag and SRTCP index, then the tag.
    pub fn rtcp_overhead(self) -> usize {
        4 + self.rtcp_tag_len()
    }
}

/// Length of the master key (AES-128).
pub const MASTER_KEY_LEN: usize = 16;
/// Length of the master salt (112 bits, RFC 3711 §8.2).
pub const MASTER_SALT_LEN: usize = 14;

/// A master key and salt, as carried base64-encoded in an SDES `inline:` parameter. Wiped on
/// drop.
#[derive(Clone, PartialEq, Eq, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub struct MasterKey {
    key: [u8; MASTER_KEY_LEN],
    salt: [u8; MASTER_SALT_LEN],
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never log key material.
        f.write_str("MasterKey(..)")
    }
}

/// An SDES key parameter parsed from `inline:<key||salt>[|lifetime]` (RFC 4568 §6.1, §9.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InlineKey {
    /// The master key and salt.
    pub master: MasterKey,
    /// The key lifetime in packets, if given (`2^20` or a decimal count).
    pub lifetime: Option<u64>,
}

impl MasterKey {
    /// A master key from its parts.
    pub fn new(key: [u8; MASTER_KEY_LEN], salt: [u8; MASTER_SALT_LEN]) -> Self {
        Self { key, salt }
    }

    /// A master key from the 30 concatenated bytes of key then salt (what the caller's RNG
    /// draws for a new offer).
    pub fn from_concatenated(bytes: &[u8; MASTER_KEY_LEN + MASTER_SALT_LEN]) -> Self {
        let mut key = [0u8; MASTER_KEY_LEN];
        let mut salt = [0u8; MASTER_SALT_LEN];
        key.copy_from_slice(&bytes[..MASTER_KEY_LEN]);
        salt.copy_from_slice(&bytes[MASTER_KEY_LEN..]);
        Self { key, salt }
    }

    /// The key.
    pub fn key(&self) -> &[u8; MASTER_KEY_LEN] {
        &self.key
    }

    /// The salt.
    pub fn salt(&self) -> &[u8; MASTER_SALT_LEN] {
        &self.salt
    }

    /// Parses one SDES key parameter: `inline:` then the base64 of key||salt (40 characters for
    /// the 30 bytes of these suites), optionally `|lifetime` (RFC 4568 §6.1). An MKI
    /// (`|1:4`) is refused: not supported.
    pub fn from_inline(key_params: &str) -> Result<InlineKey, SrtpError> {
        use base64::Engine as _;

        let key_params = key_params.trim();
        let info = key_params
            .get(..7)
            .filter(|m| m.eq_ignore_ascii_case("inline:"))
            .map(|_| &key_params[7..])
            .ok_or(SrtpError::BadInlineKey("missing the inline: method"))?;
        let mut parts = info.split('|');
        let key_salt = parts.next().unwrap_or("");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(key_salt)
            .map_err(|_| SrtpError::BadInlineKey("key-salt is not base64"))?;
        let bytes: [u8; 30] =
            bytes.as_slice().try_into().map_err(|_| SrtpError::BadInlineKey("key-salt is not 30 bytes"))?;
        let mut lifetime = None;
        for part in parts {
            if part.contains(':') {
                return Err(SrtpError::MkiNotSupported);
            }
            if lifetime.is_some() {
                return Err(SrtpError::BadInlineKey("more than one lifetime"));
            }
            let value = match part.strip_prefix("2^") {
                Some(exp) => exp.parse::<u32>().ok().filter(|e| *e < 64).map(|e| 1u64 << e),
                None => part.parse::<u64>().ok(),
            };
            lifetime = Some(value.ok_or(SrtpError::BadInlineKey("lifetime is not 2^N or a number"))?);
        }
        Ok(InlineKey { master: MasterKey::from_concatenated(&bytes), lifetime })
    }

    /// The `inline:` key parameter for this key, without lifetime or MKI.
    pub fn to_inline(&self) -> String {
        use base64::Engine as _;

        let mut bytes = [0u8; 30];
        bytes[..MASTER_KEY_LEN].copy_from_slice(&self.key);
        bytes[MASTER_KEY_LEN..].copy_from_slice(&self.salt);
        format!("inline:{}", base64::engine::general_purpose::STANDARD.encode(bytes))
    }
}

/// Why a packet could not be protected or unprotected, or a key not parsed.
///
/// Callers count [`SrtpError::AuthenticationFailed`] and [`SrtpError::Replayed`] per call: a
/// burst of them is an attack or a keying mismatch, and neither is a reason to tear a call down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SrtpError {
    /// The authentication tag does not match (RFC 3711 §3.3 step 5): forged, corrupted, or
    /// protected with another key.
    #[error("SRTP authentication failed")]
    AuthenticationFailed,
    /// The packet index was already received (RFC 3711 §3.3.2).
    #[error("replayed packet index {index}")]
    Replayed {
        /// The packet index.
        index: u64,
    },
    /// The packet index is behind the 64-packet replay window (RFC 3711 §3.3.2).
    #[error("packet index {index} is older than the replay window")]
    TooOld {
        /// The packet index.
        index: u64,
    },
    /// The packet is too short to hold a header and the tag.
    #[error("SRTP packet of {len} bytes, at least {needed} needed")]
    Truncated {
        /// Bytes given.
        len: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// The RTP header's CSRC count or extension runs past the packet.
    #[error("malformed RTP header: {0}")]
    Malformed(RtpError),
    /// The caller's buffer has no room for the tag.
    #[error("buffer of {available} bytes, {needed} needed")]
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// The key parameter is not a valid `inline:` key for these suites.
    #[error("bad SDES inline key: {0}")]
    BadInlineKey(&'static str),
    /// The key parameter uses a master key identifier, which is not supported.
    #[error("SDES master key identifiers (MKI) are not supported")]
    MkiNotSupported,
    /// The key has protected as many packets as RFC 3711 §9.2 allows: re-key.
    #[error("SRTP/SRTCP index space exhausted: re-key")]
    IndexExhausted,
    /// More SSRCs than one context tracks.
    #[error("more than {0} SSRCs in one SRTP context")]
    TooManyStreams(usize),
}

impl SrtpError {
    /// Who caused the error.
    pub fn cause(&self) -> Cause {
        match self {
            SrtpError::AuthenticationFailed
            | SrtpError::Replayed { .. }
            | SrtpError::TooOld { .. }
            | SrtpError::Truncated { .. }
            | SrtpError::Malformed(_)
            | SrtpError::BadInlineKey(_)
            | SrtpError::MkiNotSupported => Cause::Peer,
            SrtpError::BufferTooSmall { .. } | SrtpError::IndexExhausted | SrtpError::TooManyStreams(_) => Cause::Local,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_keys_are_wiped_on_drop() {
        fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        wiped_on_drop::<MasterKey>();
    }

    #[test]
    fn profiles_by_name() {
        assert_eq!(SrtpProfile::from_name("AES_CM_128_HMAC_SHA1_80"), Some(SrtpProfile::AesCm128HmacSha1_80));
        assert_eq!(SrtpProfile::from_name("AES_CM_128_HMAC_SHA1_32"), Some(SrtpProfile::AesCm128HmacSha1_32));
        assert_eq!(SrtpProfile::from_name("F8_128_HMAC_SHA1_80"), None);
        assert_eq!(SrtpProfile::AesCm128HmacSha1_32.rtp_tag_len(), 4);
        assert_eq!(SrtpProfile::AesCm128HmacSha1_32.rtcp_overhead(), 14);
    }

    #[test]
    fn inline_key_round_trips() {
        // The example key of RFC 4568 §9.1 (with its lifetime and without its MKI).
        let parsed = MasterKey::from_inline("inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20").unwrap();
        assert_eq!(parsed.lifetime, Some(1 << 20));
        assert_eq!(&parsed.master.key()[..4], &[0x3d, 0x2d, 0x6e, 0x40]);
        assert_eq!(parsed.master.to_inline(), "inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR");
        let again = MasterKey::from_inline(&parsed.master.to_inline()).unwrap();
        assert_eq!(again.master, parsed.master);
        assert_eq!(again.lifetime, None);
        assert_eq!(
            MasterKey::from_inline("INLINE:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|1048576").unwrap().lifetime,
            Some(1 << 20)
        );
        assert_eq!(format!("{:?}", parsed.master), "MasterKey(..)");
    }

    #[test]
    fn bad_inline_keys_are_refused() {
        assert_eq!(
            MasterKey::from_inline("inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32"),
            Err(SrtpError::MkiNotSupported)
        );
        assert!(matches!(
            MasterKey::from_inline("PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR"),
            Err(SrtpError::BadInlineKey(_))
        ));
        assert!(matches!(MasterKey::from_inline("inline:PS1uQCVeeCFCanVm"), Err(SrtpError::BadInlineKey(_))));
        assert!(matches!(MasterKey::from_inline("inline:!!!!"), Err(SrtpError::BadInlineKey(_))));
        assert!(matches!(
            MasterKey::from_inline("inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^x"),
            Err(SrtpError::BadInlineKey(_))
        ));
        assert!(matches!(MasterKey::from_inline("inl"), Err(SrtpError::BadInlineKey(_))));
        assert_eq!(SrtpError::AuthenticationFailed.cause(), Cause::Peer);
        assert_eq!(SrtpError::IndexExhausted.cause(), Cause::Local);
    }
}
