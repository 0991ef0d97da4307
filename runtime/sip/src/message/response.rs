//! Building responses to requests the upper layers never see (RFC 3261 §8.2.6.2).

use super::grammar;

/// The header values a response must copy from its request (RFC 3261 §8.2.6.2): every Via in
/// order, From, To, Call-ID and CSeq. Values are stored unfolded and with compact names expanded.
///
/// Only a Via is required: it is what routes the response back (§18.2.2), so a request that
/// lacks, say, its From still gets a 400 naming the missing field rather than silence
/// (RFC 4475 §3.3.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseContext {
    pub(crate) vias: Vec<String>,
    pub(crate) from: Option<String>,
    pub(crate) to: Option<String>,
    pub(crate) call_id: Option<String>,
    pub(crate) cseq: Option<String>,
}

impl ResponseContext {
    /// The Via values, topmost first.
    pub fn vias(&self) -> &[String] {
        &self.vias
    }

    /// The From value.
    pub fn from(&self) -> Option<&str> {
        self.from.as_deref()
    }

    /// The To value.
    pub fn to(&self) -> Option<&str> {
        self.to.as_deref()
    }

    /// The Call-ID value.
    pub fn call_id(&self) -> Option<&str> {
        self.call_id.as_deref()
    }

    /// The CSeq value.
    pub fn cseq(&self) -> Option<&str> {
        self.cseq.as_deref()
    }

    /// Appends `SIP/2.0 status reason` with the copied headers and an empty body to `out`.
    /// A To tag is added only for non-100 responses whose request had none (§8.2.6.2: "if the
    /// request did not contain a tag in the To header field, the UAS MUST add one", and §8.2.6.1:
    /// a 100 Trying never carries one).
    pub fn write_response(&self, status: u16, reason: &str, to_tag: Option<&str>, out: &mut Vec<u8>) {
        out.extend_from_slice(b"SIP/2.0 ");
        push_status(status, out);
        out.push(b' ');
        out.extend_from_slice(reason.as_bytes());
        out.extend_from_slice(b"\r\n");
        for via in &self.vias {
            push_header(b"Via: ", via, out);
        }
        if let Some(from) = &self.from {
            push_header(b"From: ", from, out);
        }
        if let Some(to) = &self.to {
            out.extend_from_slice(b"To: ");
            out.extend_from_slice(to.as_bytes());
            if let Some(tag) = to_tag.filter(|_| status != 100 && !grammar::has_tag_param(to)) {
                out.extend_from_slice(b";tag=");
                out.extend_from_slice(tag.as_bytes());
            }
            out.extend_from_slice(b"\r\n");
        }
        if let Some(call_id) = &self.call_id {
            push_header(b"Call-ID: ", call_id, out);
        }
        if let Some(cseq) = &self.cseq {
            push_header(b"CSeq: ", cseq, out);
        }
        out.extend_from_slice(b"Content-Length: 0\r\n\r\n");
    }
}

fn push_header(name: &[u8], value: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(name);
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn push_status(status: u16, out: &mut Vec<u8>) {
    // Status codes are three digits (RFC 3261 §7.2); clamp anything else so that a caller's
    // mistake cannot produce an unparsable status line.
    let status = status.clamp(100, 699);
    out.extend_from_slice(&[b'0' + (status / 100) as u8, b'0' + (status / 10 % 10) as u8, b'0' + (status % 10) as u8]);
}
