//! Splits a header section into a start line and unfolded, name-normalised header fields.
//!
//! This is the normalising half of the layer: rsip 0.4 rejects folded lines and does not know
//! compact header names, so both are resolved here before anything is handed to rsip.

use super::error::ParseErrorKind;

/// One header field after unfolding (RFC 3261 §7.3.1) and compact-name expansion (§7.3.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Field {
    /// Canonical long name for names this layer knows, the name as received otherwise.
    pub name: FieldName,
    /// The value with folding replaced by a single SP and surrounding whitespace trimmed.
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FieldName {
    Known(&'static str),
    Other(String),
}

impl FieldName {
    pub fn is(&self, canonical: &'static str) -> bool {
        matches!(self, Self::Known(name) if *name == canonical)
    }
}

/// The header section cut into its parts.
#[derive(Debug)]
pub(crate) struct Head<'a> {
    pub start_line: &'a [u8],
    pub fields: Vec<Field>,
    /// First defect met while splitting lines. Splitting goes on past it so that the fields a
    /// response needs (Via, From, To, Call-ID, CSeq) can still be found.
    pub defect: Option<ParseErrorKind>,
}

/// Position of the CRLFCRLF ending the header section, searched within `limit` bytes.
pub(crate) fn find_head_end(buf: &[u8], limit: usize) -> Option<usize> {
    let window = &buf[..buf.len().min(limit)];
    memchr::memmem::find(window, b"\r\n\r\n")
}

/// Splits `head` (without its final CRLFCRLF) into start line and fields.
pub(crate) fn split_head(head: &[u8], max_headers: usize) -> Head<'_> {
    let mut lines = Lines { rest: head };
    let start_line = lines.next().unwrap_or_default();
    let mut fields: Vec<Field> = Vec::new();
    let mut defect = None;
    // A field whose own line was malformed must not absorb the continuation lines after it.
    let mut last_line_ok = false;
    for line in lines {
        if line.first().is_some_and(|b| is_wsp(*b)) {
            // RFC 3261 §7.3.1: a line starting with whitespace continues the previous field.
            match fields.last_mut() {
                Some(field) if last_line_ok => match std::str::from_utf8(trim_wsp(line)) {
                    Ok(more) => {
                        let kept = field.value.trim_end_matches([' ', '\t']).len();
                        field.value.truncate(kept);
                        if !field.value.is_empty() && !more.is_empty() {
                            field.value.push(' ');
                        }
                        field.value.push_str(more);
                    }
                    Err(_) => note(ParseErrorKind::NotUtf8, &mut defect),
                },
                _ => note(ParseErrorKind::HeaderLine, &mut defect),
            }
            continue;
        }
        last_line_ok = false;
        if fields.len() >= max_headers {
            note(ParseErrorKind::TooManyHeaders, &mut defect);
            break;
        }
        let Some(colon) = memchr::memchr(b':', line) else {
            note(ParseErrorKind::HeaderLine, &mut defect);
            continue;
        };
        // HCOLON = *( SP / HTAB ) ":" SWS (RFC 3261 §25.1).
        let name = trim_end_wsp(&line[..colon]);
        if name.is_empty() || !name.iter().all(|b| super::grammar::is_token_byte(*b)) {
            note(ParseErrorKind::HeaderLine, &mut defect);
            continue;
        }
        let Ok(value) = std::str::from_utf8(trim_wsp(&line[colon + 1..])) else {
            note(ParseErrorKind::NotUtf8, &mut defect);
            continue;
        };
        // `name` is all token bytes, hence ASCII.
        let name_str = std::str::from_utf8(name).unwrap_or_default();
        let name = match canonical_name(name_str) {
            Some(canonical) => FieldName::Known(canonical),
            None => FieldName::Other(name_str.to_owned()),
        };
        fields.push(Field { name, value: value.to_owned() });
        last_line_ok = true;
    }
    Head { start_line, fields, defect }
}

fn note(kind: ParseErrorKind, defect: &mut Option<ParseErrorKind>) {
    defect.get_or_insert(kind);
}

/// Lines separated by CRLF. A bare CR or LF inside a line stays in the line and is rejected by
/// the grammar checks (RFC 3261 §7 requires CRLF).
struct Lines<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Lines<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        // Find LF with memchr and check the CR before it: cheaper than building a two-byte
        // substring searcher for every line. A bare LF stays inside the line (see above).
        let mut from = 0;
        while let Some(offset) = memchr::memchr(b'\n', &self.rest[from..]) {
            let lf = from + offset;
            if lf > 0 && self.rest[lf - 1] == b'\r' {
                let line = &self.rest[..lf - 1];
                self.rest = &self.rest[lf + 1..];
                return Some(line);
            }
            from = lf + 1;
        }
        let line = self.rest;
        self.rest = &[];
        Some(line)
    }
}

pub(crate) fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_wsp(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|b| !is_wsp(*b)).unwrap_or(s.len());
    trim_end_wsp(&s[start..])
}

fn trim_end_wsp(s: &[u8]) -> &[u8] {
    let end = s.iter().rposition(|b| !is_wsp(*b)).map_or(0, |i| i + 1);
    &s[..end]
}

/// Canonical long name of a header field: compact forms of RFC 3261 §7.3.3 and of the
/// extensions registered in the IANA SIP header registry, and case-normalised long names of
/// the fields rsip types or this layer validates.
pub(crate) fn canonical_name(name: &str) -> Option<&'static str> {
    if name.len() == 1 {
        let compact = match name.as_bytes()[0].to_ascii_lowercase() {
            b'a' => "Accept-Contact",      // RFC 3841
            b'b' => "Referred-By",         // RFC 3892
            b'c' => "Content-Type",        // RFC 3261
            b'd' => "Request-Disposition", // RFC 3841
            b'e' => "Content-Encoding",    // RFC 3261
            b'f' => "From",                // RFC 3261
            b'i' => "Call-ID",             // RFC 3261
            b'j' => "Reject-Contact",      // RFC 3841
            b'k' => "Supported",           // RFC 3261
            b'l' => "Content-Length",      // RFC 3261
            b'm' => "Contact",             // RFC 3261
            b'n' => "Identity-Info",       // RFC 4474
            b'o' => "Event",               // RFC 6665
            b'r' => "Refer-To",            // RFC 3515
            b's' => "Subject",             // RFC 3261
            b't' => "To",                  // RFC 3261
            b'u' => "Allow-Events",        // RFC 6665
            b'v' => "Via",                 // RFC 3261
            b'x' => "Session-Expires",     // RFC 4028
            b'y' => "Identity",            // RFC 8224
            _ => return None,
        };
        return Some(compact);
    }
    LONG_NAMES.iter().copied().find(|long| long.eq_ignore_ascii_case(name))
}

const LONG_NAMES: &[&str] = &[
    "Accept",
    "Accept-Contact",
    "Accept-Encoding",
    "Accept-Language",
    "Alert-Info",
    "Allow",
    "Allow-Events",
    "Authentication-Info",
    "Authorization",
    "Call-ID",
    "Call-Info",
    "Contact",
    "Content-Disposition",
    "Content-Encoding",
    "Content-Language",
    "Content-Length",
    "Content-Type",
    "CSeq",
    "Date",
    "Error-Info",
    "Event",
    "Expires",
    "From",
    "Identity",
    "Identity-Info",
    "In-Reply-To",
    "Max-Forwards",
    "MIME-Version",
    "Min-Expires",
    "Organization",
    "Priority",
    "Proxy-Authenticate",
    "Proxy-Authorization",
    "Proxy-Require",
    "Record-Route",
    "Refer-To",
    "Referred-By",
    "Reject-Contact",
    "Reply-To",
    "Request-Disposition",
    "Require",
    "Retry-After",
    "Route",
    "Server",
    "Session-Expires",
    "Subject",
    "Subscription-State",
    "Supported",
    "Timestamp",
    "To",
    "Unsupported",
    "User-Agent",
    "Via",
    "Warning",
    "WWW-Authenticate",
];
