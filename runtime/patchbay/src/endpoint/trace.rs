//! SIP message tracing (`[log] sip_trace`, docs/operations.md "Logs"): every message the
//! endpoint sends or receives, whole, as one log event (target `patchbay::sip_trace`), for the
//! peers asked for — with what would let a reader in masked: digest `response` values (an
//! offline dictionary attack needs only the response and the challenge) and SDES keys in
//! `a=crypto` lines (they decrypt the call's SRTP).
//!
//! The lines read like ngrep's and sngrep's text view: a header line with direction,
//! transport and peer, then the message as sent.

use patchbay_sip::transaction::Peer;

use crate::policy::TrustedSource;

/// Which peers' messages are traced.
#[derive(Debug, Clone, Default)]
pub struct SipTrace {
    on: bool,
    /// Empty: every peer.
    only: Vec<TrustedSource>,
}

impl SipTrace {
    /// From `[log]`.
    pub fn new(on: bool, only: Vec<TrustedSource>) -> Self {
        Self { on, only }
    }

    /// Logs `message` going `direction` (`in` or `out`) to or from `peer`, if traced.
    pub fn log(&self, direction: &'static str, peer: Peer, message: &rsip::SipMessage) {
        if !self.on || !(self.only.is_empty() || self.only.iter().any(|s| s.matches(peer))) {
            return;
        }
        let arrow = if direction == "in" { "<-" } else { "->" };
        let transport = format!("{:?}", peer.transport).to_ascii_uppercase();
        let text = mask(&message.to_string());
        tracing::info!(target: "patchbay::sip_trace", direction, peer = %peer.addr, "{transport} {arrow} {}\n{text}", peer.addr);
    }
}

/// `text` with digest responses and SDES keys replaced by `***`.
pub fn mask(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("authorization:") || lower.starts_with("proxy-authorization:") {
            out.push_str(&mask_param(line, "response", '='));
        } else if lower.starts_with("a=crypto:") {
            out.push_str(&mask_param(line, "inline", ':'));
        } else {
            out.push_str(line);
        }
    }
    out
}

/// `line` with the value of each `name` `sep` `value` (the name case-insensitive and not the
/// tail of a longer word; white space allowed around `sep`, RFC 3261 §25.1 `EQUAL`; the value
/// quoted, or up to `,` `;` `|` or white space) replaced by `***`.
fn mask_param(line: &str, name: &str, sep: char) -> String {
    let lower = line.to_ascii_lowercase();
    let mut out = String::with_capacity(line.len());
    let mut at = 0;
    let mut from = 0;
    while let Some(found) = lower[from..].find(name) {
        let start = from + found;
        from = start + name.len();
        let word_start = start == 0 || !lower.as_bytes()[start - 1].is_ascii_alphanumeric();
        let after = &line[from..];
        let spaced = after.trim_start_matches([' ', '\t']);
        let Some(value) = spaced.strip_prefix(sep).filter(|_| word_start) else { continue };
        let value = value.trim_start_matches([' ', '\t']);
        let value_start = line.len() - value.len();
        let value_len = if let Some(quoted) = value.strip_prefix('"') {
            quoted.find('"').map_or(value.len(), |end| end + 2)
        } else {
            value.find([',', ';', '|', ' ', '\t', '\r', '\n']).unwrap_or(value.len())
        };
        out.push_str(&line[at..value_start]);
        out.push_str(if value.starts_with('"') { "\"***\"" } else { "***" });
        at = value_start + value_len;
        from = at;
    }
    out.push_str(&line[at..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_responses_and_sdes_keys_are_masked_and_the_rest_kept() {
        let message = "INVITE sip:echo@example.com SIP/2.0\r\n\
            Proxy-Authorization: Digest username=\"alice\", realm=\"x\", nonce=\"abc\", uri=\"sip:echo@example.com\", response=\"6629fae49393a05397450978507c4ef1\", algorithm=MD5\r\n\
            authorization: Digest username=\"bob\",response=deadbeef,cnonce=\"c\"\r\n\
            Authorization: Digest username=\"carol\", response = \"c0ffee42\", qop=auth\r\n\
            Content-Length: 0\r\n\r\n\
            a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz|2^20|1:4\r\n";
        let masked = mask(message);
        assert!(!masked.contains("6629fae4"), "{masked}");
        assert!(!masked.contains("deadbeef"), "{masked}");
        assert!(!masked.contains("c0ffee42"), "white space around `=` (RFC 3261 §25.1): {masked}");
        assert!(masked.contains("response = \"***\", qop=auth"), "{masked}");
        assert!(!masked.contains("WVNfX19z"), "{masked}");
        assert!(masked.contains("response=\"***\", algorithm=MD5"), "{masked}");
        assert!(masked.contains("response=***,cnonce=\"c\""), "{masked}");
        assert!(masked.contains("inline:***|2^20|1:4"), "{masked}");
        assert!(masked.contains("username=\"alice\""), "{masked}");
        assert!(masked.starts_with("INVITE sip:echo@example.com SIP/2.0\r\n"));
        assert_eq!(mask("BYE sip:a@b SIP/2.0\r\n\r\n"), "BYE sip:a@b SIP/2.0\r\n\r\n");
    }
}
