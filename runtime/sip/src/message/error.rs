//! What went wrong with an inbound message, and what to do about it.

use super::response::ResponseContext;

/// What the transport layer must do with a message that failed to parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Answer with this status and reason phrase (the message was a request and carried the
    /// Via, From, To, Call-ID and CSeq needed to build a response, RFC 3261 §8.2.6.2).
    Respond {
        /// Status code of the error response.
        status: u16,
        /// Reason phrase naming the problem, e.g. `Bad Request - CSeq method does not match`.
        reason: &'static str,
    },
    /// Discard silently: a malformed response (RFC 3261 §18.1.2 / §18.3 say the element drops
    /// it) or a request too garbled to address a response to.
    Drop,
}

/// The defect found in the message. Every kind is caused by the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseErrorKind {
    /// The message is larger than [`Limits::max_message_bytes`](super::Limits).
    #[error("message larger than the configured limit")]
    TooLarge,
    /// More header fields than [`Limits::max_headers`](super::Limits).
    #[error("too many header fields")]
    TooManyHeaders,
    /// No empty line ends the header section.
    #[error("header section is not terminated by an empty line")]
    UnterminatedHeaders,
    /// The request line or status line does not follow RFC 3261 §7.1 / §7.2.
    #[error("malformed start line")]
    StartLine,
    /// The SIP version is well formed but not SIP/2.0.
    #[error("unsupported SIP version")]
    Version,
    /// The status code is not three digits in 100..=699 (RFC 3261 §7.2, §21).
    #[error("malformed status code")]
    StatusCode,
    /// The Request-URI is malformed (e.g. enclosed in `<>`, embedded whitespace, bad escapes,
    /// or carrying URI headers, RFC 3261 §19.1.1 and RFC 4475 §3.1.2.11).
    #[error("malformed Request-URI")]
    RequestUri,
    /// The Request-URI scheme is well formed but not one this stack serves (RFC 3261 §8.2.2.1).
    #[error("unsupported Request-URI scheme")]
    UnsupportedUriScheme,
    /// A line in the header section is not `name HCOLON value` (RFC 3261 §7.3).
    #[error("malformed header field line")]
    HeaderLine,
    /// A header value is not valid UTF-8 (RFC 3261 §7.3.1 TEXT-UTF8).
    #[error("header value is not UTF-8")]
    NotUtf8,
    /// A mandatory header field is absent (RFC 3261 §8.1.1).
    #[error("missing {0} header field")]
    MissingHeader(&'static str),
    /// A header field that may appear only once appears more than once (RFC 3261 §7.3.1,
    /// RFC 4475 §3.3.8, §3.3.9).
    #[error("more than one {0} header field")]
    DuplicateHeader(&'static str),
    /// A header value does not follow its grammar.
    #[error("malformed {0} header field")]
    BadHeader(&'static str),
    /// The CSeq method differs from the request method (RFC 3261 §8.2.3, RFC 4475 §3.1.2.17).
    #[error("CSeq method does not match the request method")]
    CSeqMethodMismatch,
    /// The CSeq number is not below 2**31 (RFC 3261 §8.1.1.5).
    #[error("CSeq number out of range")]
    CSeqOutOfRange,
    /// Max-Forwards is not an integer in 0..=255 (RFC 3261 §20.22).
    #[error("Max-Forwards out of range")]
    MaxForwardsOutOfRange,
    /// Content-Length promises more bytes than arrived (RFC 3261 §18.3).
    #[error("Content-Length larger than the message body")]
    BodyTooShort,
    /// A stream-framed message lacks Content-Length (RFC 3261 §18.3, §20.14).
    #[error("Content-Length missing on a stream transport")]
    MissingContentLength,
}

impl ParseErrorKind {
    /// Status code and reason phrase for a request that failed with this defect.
    pub fn status(self) -> (u16, &'static str) {
        use ParseErrorKind as K;
        match self {
            // RFC 3261 §21.4.13.
            K::TooLarge => (413, "Request Entity Too Large"),
            // RFC 3261 §21.5.7 and RFC 4475 §3.1.2.16.
            K::Version => (505, "Version Not Supported"),
            // RFC 3261 §21.4.15 and RFC 4475 §3.3.2.
            K::UnsupportedUriScheme => (416, "Unsupported URI Scheme"),
            K::TooManyHeaders => (400, "Bad Request - Too many header fields"),
            K::UnterminatedHeaders => (400, "Bad Request - Header section not terminated"),
            K::StartLine => (400, "Bad Request - Malformed Request-Line"),
            K::StatusCode => (400, "Bad Request - Malformed Status-Line"),
            K::RequestUri => (400, "Bad Request - Malformed Request-URI"),
            K::HeaderLine => (400, "Bad Request - Malformed header line"),
            K::NotUtf8 => (400, "Bad Request - Header value is not UTF-8"),
            K::MissingHeader(name) => (400, missing_reason(name)),
            K::DuplicateHeader(name) => (400, duplicate_reason(name)),
            K::BadHeader(name) => (400, malformed_reason(name)),
            K::CSeqMethodMismatch => (400, "Bad Request - CSeq method does not match"),
            K::CSeqOutOfRange => (400, "Bad Request - CSeq number out of range"),
            K::MaxForwardsOutOfRange => (400, "Bad Request - Max-Forwards out of range"),
            K::BodyTooShort => (400, "Bad Request - Content-Length larger than body"),
            K::MissingContentLength => (400, "Bad Request - Content-Length missing"),
        }
    }
}

// Reason phrases are static so that rejecting a request formats nothing (CONVENTIONS §5).
macro_rules! reason_table {
    ($fn_name:ident, $prefix:literal, $fallback:literal) => {
        fn $fn_name(name: &'static str) -> &'static str {
            match name {
                "Via" => concat!($prefix, "Via"),
                "From" => concat!($prefix, "From"),
                "To" => concat!($prefix, "To"),
                "Call-ID" => concat!($prefix, "Call-ID"),
                "CSeq" => concat!($prefix, "CSeq"),
                "Max-Forwards" => concat!($prefix, "Max-Forwards"),
                "Content-Length" => concat!($prefix, "Content-Length"),
                "Contact" => concat!($prefix, "Contact"),
                "Route" => concat!($prefix, "Route"),
                "Record-Route" => concat!($prefix, "Record-Route"),
                "Reply-To" => concat!($prefix, "Reply-To"),
                "Date" => concat!($prefix, "Date"),
                "Expires" => concat!($prefix, "Expires"),
                _ => $fallback,
            }
        }
    };
}
reason_table!(missing_reason, "Bad Request - Missing ", "Bad Request - Missing header field");
reason_table!(duplicate_reason, "Bad Request - Multiple ", "Bad Request - Repeated header field");
reason_table!(malformed_reason, "Bad Request - Malformed ", "Bad Request - Malformed header field");

/// An inbound message that cannot be handed to the upper layers.
///
/// [`disposition`](Self::disposition) says whether to answer (and with what) or to drop it;
/// [`write_response`](Self::write_response) builds the answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}")]
#[non_exhaustive]
pub struct ParseError {
    /// What is wrong.
    pub kind: ParseErrorKind,
    pub(crate) context: Option<Box<ResponseContext>>,
}

impl ParseError {
    pub(crate) fn with_context(kind: ParseErrorKind, context: Option<Box<ResponseContext>>) -> Self {
        Self { kind, context }
    }

    /// Answer with a status, or drop.
    pub fn disposition(&self) -> Disposition {
        match self.context {
            Some(_) => {
                let (status, reason) = self.kind.status();
                Disposition::Respond { status, reason }
            }
            None => Disposition::Drop,
        }
    }

    /// The header values a response to the offending request would echo, if it had them all.
    pub fn response_context(&self) -> Option<&ResponseContext> {
        self.context.as_deref()
    }

    /// Appends the error response to `out` (RFC 3261 §8.2.6.2) and returns `true`, or returns
    /// `false` and leaves `out` alone when the message must be dropped. `to_tag` is added to
    /// the To header when it has none; the caller supplies it so that this layer stays free of
    /// randomness.
    pub fn write_response(&self, to_tag: Option<&str>, out: &mut Vec<u8>) -> bool {
        match (&self.context, self.disposition()) {
            (Some(context), Disposition::Respond { status, reason }) => {
                context.write_response(status, reason, to_tag, out);
                true
            }
            _ => false,
        }
    }
}
