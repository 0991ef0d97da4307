//! The digest computations of RFC 7616 §3.4.1–§3.4.3 (RFC 2617 §3.2.2.1–§3.2.2.3) and the
//! HMAC that makes server nonces self-validating.
//!
//! Everything hashes `a:b:c` by feeding the parts to the hasher one at a time and returns hex on
//! the stack, so a verification allocates nothing for the crypto itself.

use md5::Md5;
use sha2::{Digest, Sha256};

use super::{Algorithm, Qop};

/// A lower-case hex digest held on the stack (32 chars for MD5, 64 for SHA-256).
#[derive(Clone, Copy)]
pub(crate) struct HexDigest {
    buf: [u8; 64],
    len: usize,
}

impl HexDigest {
    fn from_raw(raw: &[u8]) -> Self {
        let mut buf = [0u8; 64];
        let len = raw.len() * 2;
        // Cannot fail: raw is at most 32 bytes (SHA-256) and buf holds 64 hex digits.
        let _ = hex::encode_to_slice(raw, &mut buf[..len]);
        Self { buf, len }
    }

    /// Parses 32 (MD5) or 64 (SHA-256) hex digits, lower-casing them; peers may send either
    /// case, and the digests are compared byte for byte.
    pub(crate) fn from_hex_str(value: &str) -> Option<Self> {
        let bytes = value.as_bytes();
        if !(bytes.len() == 32 || bytes.len() == 64) || !bytes.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let mut buf = [0u8; 64];
        for (dst, src) in buf.iter_mut().zip(bytes) {
            *dst = src.to_ascii_lowercase();
        }
        Some(Self { buf, len: bytes.len() })
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    pub(crate) fn as_str(&self) -> &str {
        // Always ASCII hex, so the fallback is unreachable; it only avoids an unwrap.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

impl std::fmt::Debug for HexDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // HA1 is password-equivalent (RFC 7616 §5.2): never print it.
        f.write_str("HexDigest(..)")
    }
}

/// `H(part0 ":" part1 ":" …)` with the hash of `algorithm`.
pub(crate) fn h_joined(algorithm: Algorithm, parts: &[&[u8]]) -> HexDigest {
    fn run<D: Digest>(parts: &[&[u8]]) -> HexDigest {
        let mut hasher = D::new();
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                hasher.update(b":");
            }
            hasher.update(part);
        }
        HexDigest::from_raw(&hasher.finalize())
    }
    if algorithm.is_sha256() { run::<Sha256>(parts) } else { run::<Md5>(parts) }
}

/// `H(username ":" realm ":" password)`: the HA1 of the non-session algorithms (RFC 7616
/// §3.4.2), and the value a server stores instead of the password.
pub(crate) fn ha1_base(algorithm: Algorithm, username: &str, realm: &str, password: &str) -> HexDigest {
    h_joined(algorithm, &[username.as_bytes(), realm.as_bytes(), password.as_bytes()])
}

/// HA1 for the request: for `-sess` algorithms `H(H(user:realm:pass) ":" nonce ":" cnonce)`
/// (RFC 7616 §3.4.2), otherwise the base value unchanged.
pub(crate) fn ha1_for(algorithm: Algorithm, base: &[u8], nonce: &str, cnonce: &str) -> HexDigest {
    if algorithm.is_session() {
        h_joined(algorithm, &[base, nonce.as_bytes(), cnonce.as_bytes()])
    } else {
        let mut out = HexDigest { buf: [0u8; 64], len: base.len().min(64) };
        out.buf[..out.len].copy_from_slice(&base[..out.len]);
        out
    }
}

/// HA2 (RFC 7616 §3.4.3): `H(method ":" uri)`, or with `qop=auth-int`
/// `H(method ":" uri ":" H(body))`.
pub(crate) fn ha2(algorithm: Algorithm, qop: Option<Qop>, method: &str, uri: &str, body: &[u8]) -> HexDigest {
    if qop == Some(Qop::AuthInt) {
        let body_hash = h_joined(algorithm, &[body]);
        h_joined(algorithm, &[method.as_bytes(), uri.as_bytes(), body_hash.as_bytes()])
    } else {
        h_joined(algorithm, &[method.as_bytes(), uri.as_bytes()])
    }
}

/// The nonce count as the 8 lower-case hex digits that go on the wire (RFC 7616 §3.4).
pub(crate) fn nc_hex(nc: u32) -> [u8; 8] {
    let mut out = [0u8; 8];
    let _ = hex::encode_to_slice(nc.to_be_bytes(), &mut out);
    out
}

/// What the `qop` modes add to the response: `nc`, `cnonce` and the chosen `qop`.
pub(crate) struct QopInputs<'a> {
    pub(crate) nc: u32,
    pub(crate) cnonce: &'a str,
    pub(crate) qop: Qop,
}

/// The `response` value: RFC 7616 §3.4.1 with qop, RFC 2069 §2.1.1 (RFC 2617 §3.2.2.1)
/// without.
pub(crate) fn response(
    algorithm: Algorithm,
    ha1: &HexDigest,
    nonce: &str,
    qop: Option<&QopInputs<'_>>,
    ha2: &HexDigest,
) -> HexDigest {
    match qop {
        Some(q) => {
            let nc = nc_hex(q.nc);
            h_joined(
                algorithm,
                &[
                    ha1.as_bytes(),
                    nonce.as_bytes(),
                    &nc,
                    q.cnonce.as_bytes(),
                    q.qop.as_str().as_bytes(),
                    ha2.as_bytes(),
                ],
            )
        }
        None => h_joined(algorithm, &[ha1.as_bytes(), nonce.as_bytes(), ha2.as_bytes()]),
    }
}

/// HMAC-SHA256 (RFC 2104) over the concatenation of `parts`. Written out because it is ten
/// lines on top of `sha2` and spares the crate a dependency.
pub(crate) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut block_key = [0u8; BLOCK];
    if key.len() > BLOCK {
        block_key[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block_key[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(block_key.map(|b| b ^ 0x36));
    for part in parts {
        inner.update(part);
    }
    let mut outer = Sha256::new();
    outer.update(block_key.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        let mac = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(hex::encode(mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn hmac_long_key_rfc4231_case_6() {
        let key = [0xaau8; 131];
        let mac = hmac_sha256(&key, &[b"Test Using Larger Than Block-Size Key - Hash Key First"]);
        assert_eq!(hex::encode(mac), "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
    }

    #[test]
    fn rfc2617_section_3_5_math() {
        let ha1 = ha1_base(Algorithm::Md5, "Mufasa", "testrealm@host.com", "Circle Of Life");
        let ha2 = ha2(Algorithm::Md5, Some(Qop::Auth), "GET", "/dir/index.html", b"");
        let q = QopInputs { nc: 1, cnonce: "0a4f113b", qop: Qop::Auth };
        let r = response(Algorithm::Md5, &ha1, "dcd98b7102dd2f0e8b11d0f600bfb0c093", Some(&q), &ha2);
        assert_eq!(r.as_str(), "6629fae49393a05397450978507c4ef1");
    }
}
