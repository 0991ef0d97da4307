//! The AES-CM keystream, the AES-CM PRF key derivation and the HMAC-SHA1 tag (RFC 3711 §4).

use aes::Aes128;
use aes::cipher::{BlockEncrypt, KeyInit};
use hmac::Hmac;
use sha1::Sha1;

use super::{MASTER_SALT_LEN, MasterKey};

/// Key derivation labels (RFC 3711 §4.3.1).
pub(super) const LABEL_RTP_ENCRYPTION: u8 = 0x00;
pub(super) const LABEL_RTP_AUTH: u8 = 0x01;
pub(super) const LABEL_RTP_SALT: u8 = 0x02;
pub(super) const LABEL_RTCP_ENCRYPTION: u8 = 0x03;
pub(super) const LABEL_RTCP_AUTH: u8 = 0x04;
pub(super) const LABEL_RTCP_SALT: u8 = 0x05;

/// Session authentication key length for HMAC-SHA1 (RFC 3711 §4.2.1 default n_a = 160).
const AUTH_KEY_LEN: usize = 20;

pub(super) type HmacSha1 = Hmac<Sha1>;

/// XORs the AES-CM keystream for `iv` into `data` (RFC 3711 §4.1.1): block `j` of the keystream
/// is `E(k, IV + j)`, where the low 16 bits of the IV are zero, so `IV + j` is the IV with `j` in
/// its last two octets. A packet holds far fewer than 2^16 blocks.
pub(super) fn apply_keystream(cipher: &Aes128, iv: &[u8; 16], data: &mut [u8]) {
    let base = u16::from_be_bytes([iv[14], iv[15]]);
    // Counter blocks are encrypted eight per call, so that AES-NI pipelines them (eight is
    // what the `aes` crate's AES-NI backend runs in parallel); a 160-byte payload takes two
    // calls. (A 32-block array cost a 512-byte zero fill per packet, 3 % of an SRTP echo.)
    const BATCH: usize = 8;
    let mut blocks = [aes::Block::default(); BATCH];
    for (batch_no, batch) in data.chunks_mut(16 * BATCH).enumerate() {
        let n = batch.len().div_ceil(16);
        for (j, block) in blocks[..n].iter_mut().enumerate() {
            let counter = (batch_no * BATCH + j) as u16;
            block.copy_from_slice(iv);
            block[14..16].copy_from_slice(&base.wrapping_add(counter).to_be_bytes());
        }
        cipher.encrypt_blocks(&mut blocks[..n]);
        for (chunk, key) in batch.chunks_mut(16).zip(&blocks[..n]) {
            for (d, k) in chunk.iter_mut().zip(key.iter()) {
                *d ^= k;
            }
        }
    }
}

/// The AES-CM IV (RFC 3711 §4.1.1): `IV = (k_s * 2^16) XOR (SSRC * 2^64) XOR (i * 2^16)`.
pub(super) fn counter_iv(salt: &[u8; MASTER_SALT_LEN], ssrc: u32, index: u64) -> [u8; 16] {
    let mut iv = [0u8; 16];
    iv[..MASTER_SALT_LEN].copy_from_slice(salt);
    for (b, s) in iv[4..8].iter_mut().zip(ssrc.to_be_bytes()) {
        *b ^= s;
    }
    // The 48-bit index occupies bytes 8..14.
    for (b, s) in iv[8..14].iter_mut().zip(&index.to_be_bytes()[2..]) {
        *b ^= s;
    }
    iv
}

/// The AES-CM PRF with a key derivation rate of 0 (RFC 3711 §4.3.1, §4.3.3): the PRF input is
/// the master salt XOR (label || 48 zero bits of `index DIV kdr`), right-aligned, times 2^16;
/// the output is the AES-CM keystream for it under the master key, truncated to `out.len()`.
pub(super) fn derive(master: &MasterKey, label: u8, out: &mut [u8]) {
    let cipher = Aes128::new(master.key().into());
    let mut iv = [0u8; 16];
    iv[..MASTER_SALT_LEN].copy_from_slice(master.salt());
    // key_id = label || r is 7 octets, right-aligned against the 14-octet salt: the label is
    // octet 7.
    iv[7] ^= label;
    out.fill(0);
    apply_keystream(&cipher, &iv, out);
}

/// The keys of one direction for SRTP or for SRTCP.
#[derive(Clone)]
pub(super) struct SessionKeys {
    pub(super) cipher: Aes128,
    pub(super) salt: [u8; MASTER_SALT_LEN],
    /// HMAC keyed once; cloned per packet (a copy of the inner/outer state, no allocation).
    pub(super) mac: HmacSha1,
}

/// The session keys are wiped on drop: the AES key schedule by `aes`'s `zeroize` feature, the
/// salt here. (The HMAC state holds the key only hashed into its inner and outer pads.)
impl Drop for SessionKeys {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.salt);
    }
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

impl SessionKeys {
    /// Derives the session keys for SRTP (`rtcp = false`) or SRTCP.
    pub(super) fn derive(master: &MasterKey, rtcp: bool) -> Self {
        let (enc, auth, salt_label) = if rtcp {
            (LABEL_RTCP_ENCRYPTION, LABEL_RTCP_AUTH, LABEL_RTCP_SALT)
        } else {
            (LABEL_RTP_ENCRYPTION, LABEL_RTP_AUTH, LABEL_RTP_SALT)
        };
        let mut key = [0u8; 16];
        derive(master, enc, &mut key);
        let mut auth_key = [0u8; AUTH_KEY_LEN];
        derive(master, auth, &mut auth_key);
        let mut salt = [0u8; MASTER_SALT_LEN];
        derive(master, salt_label, &mut salt);
        // HMAC pads a key shorter than the hash block (64 octets for SHA-1) with zeros
        // (RFC 2104 §2), so keying with the padded block is the same as keying with the 20
        // octets, and cannot fail.
        let mut block = [0u8; 64];
        block[..AUTH_KEY_LEN].copy_from_slice(&auth_key);
        let mac = <HmacSha1 as KeyInit>::new(&block.into());
        Self { cipher: Aes128::new(&key.into()), salt, mac }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// RFC 3711 Appendix B.2: the AES-CM keystream with a session salt (already shifted) of
    /// F0F1…FCFD and SSRC, ROC and SEQ all zero.
    #[test]
    fn rfc3711_b2_aes_cm_keystream() {
        let cipher = Aes128::new_from_slice(&hex("2B7E151628AED2A6ABF7158809CF4F3C")).unwrap();
        let salt: [u8; 14] = hex("F0F1F2F3F4F5F6F7F8F9FAFBFCFD").try_into().unwrap();
        let iv = counter_iv(&salt, 0, 0);
        assert_eq!(iv.to_vec(), hex("F0F1F2F3F4F5F6F7F8F9FAFBFCFD0000"));
        let mut stream = vec![0u8; 65_282 * 16];
        apply_keystream(&cipher, &iv, &mut stream);
        assert_eq!(
            stream[..48],
            hex("E03EAD0935C95E80E166B16DD92B4EB4 D23513162B02D0F72A43A2FE4A5F97AB 41E95B3BB0A2E8DD477901E4FCA894C0")[..]
        );
        // The end of the 1,044,512-octet segment (counters …FEFF, …FF00, …FF01).
        assert_eq!(
            stream[stream.len() - 48..],
            hex("EC8CDF7398607CB0F2D21675EA9EA1E4 362B7C3C6773516318A077D7FC5073AE 6A2CC3787889374FBEB4C81B17BA6C44")[..]
        );
    }

    /// RFC 3711 Appendix B.3: session keys from master key E1F9…4139 and salt 0EC6…ABE6.
    #[test]
    fn rfc3711_b3_key_derivation() {
        let master = MasterKey::new(
            hex("E1F97A0D3E018BE0D64FA32C06DE4139").try_into().unwrap(),
            hex("0EC675AD498AFEEBB6960B3AABE6").try_into().unwrap(),
        );
        let mut cipher_key = [0u8; 16];
        derive(&master, LABEL_RTP_ENCRYPTION, &mut cipher_key);
        assert_eq!(cipher_key.to_vec(), hex("C61E7A93744F39EE10734AFE3FF7A087"));
        let mut cipher_salt = [0u8; 14];
        derive(&master, LABEL_RTP_SALT, &mut cipher_salt);
        assert_eq!(cipher_salt.to_vec(), hex("30CBBC08863D8C85D49DB34A9AE1"));
        // The RFC walks through a 94-octet auth key; HMAC-SHA1 uses its first 20.
        let mut auth_key = [0u8; 94];
        derive(&master, LABEL_RTP_AUTH, &mut auth_key);
        assert_eq!(
            auth_key.to_vec(),
            hex("CEBE321F6FF7716B6FD4AB49AF256A15 6D38BAA48F0A0ACF3C34E2359E6CDBCE
                 E049646C43D9327AD175578EF7227098 6371C10C9A369AC2F94A8C5FBCDDDC25
                 6D6E919A48B610EF17C2041E47403576 6B68642C59BBFC2F34DB60DBDFB2")
        );
    }

    #[test]
    fn keying_hmac_with_the_padded_block_equals_keying_with_the_key() {
        use hmac::Mac;
        let key = [0x5au8; AUTH_KEY_LEN];
        let mut block = [0u8; 64];
        block[..AUTH_KEY_LEN].copy_from_slice(&key);
        let mut a = <HmacSha1 as KeyInit>::new(&block.into());
        let mut b = <HmacSha1 as KeyInit>::new_from_slice(&key).unwrap();
        a.update(b"abc");
        b.update(b"abc");
        assert_eq!(a.finalize().into_bytes(), b.finalize().into_bytes());
    }

    #[test]
    fn the_iv_mixes_ssrc_and_index_into_the_salt() {
        let salt = [0u8; 14];
        let iv = counter_iv(&salt, 0x1122_3344, 0x0000_5566_7788_99aa);
        assert_eq!(iv, [0, 0, 0, 0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0, 0]);
    }

    #[test]
    fn the_keystream_is_its_own_inverse_and_handles_partial_blocks() {
        let cipher = Aes128::new_from_slice(&[7u8; 16]).unwrap();
        let iv = counter_iv(&[1u8; 14], 5, 6);
        let plain: Vec<u8> = (0..37u8).collect();
        let mut data = plain.clone();
        apply_keystream(&cipher, &iv, &mut data);
        assert_ne!(data, plain);
        apply_keystream(&cipher, &iv, &mut data);
        assert_eq!(data, plain);
    }
}
