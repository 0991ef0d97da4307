//! Every random number Patchbay makes on the network's behalf — SSRCs, SDP session ids, stream
//! and recording ids, digest nonce keys, SRTP master keys — comes from here, and here from the
//! OS's CSPRNG (`getrandom(2)`), so none of them can be guessed from another.
//!
//! The SIP core reads no randomness itself (it stays deterministic under test): its tags,
//! branches, Call-IDs and cnonces come from a ChaCha20 CSPRNG keyed here ([`rng_key`]).
//!
//! **Not done yet:** a failing OS source is logged and falls back to the process's keyed hash
//! rather than refusing to start (getrandom(2) does not fail on Linux once booted).

/// Fills `bytes` from the OS's CSPRNG.
fn fill(bytes: &mut [u8]) {
    if let Err(e) = getrandom::fill(bytes) {
        // getrandom(2) does not fail on Linux once the pool is initialised; should it, the
        // per-process keyed hash is the best there is (still not guessable from outside).
        tracing::error!("no randomness from the OS: {e}");
        use std::hash::BuildHasher;
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        for chunk in bytes.chunks_mut(8) {
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let word = std::collections::hash_map::RandomState::new().hash_one(n).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// A random `u64` from the OS's CSPRNG.
pub(crate) fn u64() -> u64 {
    let mut bytes = [0u8; 8];
    fill(&mut bytes);
    u64::from_le_bytes(bytes)
}

/// A 256-bit key (for keyed hashes that place what strangers send in fixed tables).
pub(crate) fn key() -> [u8; 32] {
    let mut key = [0u8; 32];
    fill(&mut key);
    key
}

/// The key of the SIP user agent's CSPRNG (tags, branches, Call-IDs, cnonces).
pub(crate) fn rng_key() -> patchbay_sip::ua::RngKey {
    let mut key = patchbay_sip::ua::RngKey([0; 32]);
    fill(&mut key.0);
    key
}

/// A key for digest nonces (RFC 7616 §3.3: the server's secret in the nonce), 32 bytes.
pub(crate) fn nonce_secret() -> Vec<u8> {
    let mut secret = vec![0; 32];
    fill(&mut secret);
    secret
}

/// A fresh SDES master key and salt (RFC 4568 §6.1) from the OS's CSPRNG.
pub(crate) fn sdes_key() -> patchbay_sip::sdp::SdesKey {
    let mut key = patchbay_sip::sdp::SdesKey([0; 30]);
    fill(&mut key.0);
    key
}

#[cfg(test)]
mod tests {
    #[test]
    fn draws_differ() {
        // Two draws from a CSPRNG are equal with probability 2^-64; a constant source fails.
        assert_ne!(super::u64(), super::u64());
        assert_ne!(super::nonce_secret(), super::nonce_secret());
        assert_ne!(super::sdes_key().0, super::sdes_key().0);
    }
}
