//! SIP message framing, normalisation and validation (RFC 3261 §7, §18.3; RFC 4475).
//!
//! rsip 0.4 parses common messages byte for byte but not everything RFC 3261 allows, and it
//! accepts much that RFC 4475 says must be rejected. This module wraps it:
//!
//! 1. **Framing** — [`parse_datagram`] takes one UDP datagram (leading CRLF keep-alives
//!    stripped, RFC 5626 §3.5.1; bytes past Content-Length discarded, RFC 3261 §18.3);
//!    [`frame_stream`] finds message boundaries on TCP/TLS, where Content-Length is mandatory
//!    (§18.3, §20.14), and [`parse_stream_message`] parses one framed message.
//! 2. **Normalisation** — folded lines are unfolded (§7.3.1), compact names expanded (§7.3.3),
//!    comma-joined Via/Contact/Route/Record-Route values split into one field each, header-name
//!    case normalised, Via whitespace removed. The Request-URI is parsed here, not by rsip, so
//!    IPv6 references and unusual user parts work.
//! 3. **Validation** — start line, mandatory fields, single-valued fields, CSeq, Max-Forwards,
//!    Content-Length, Date, Via, name-addr grammar and URI escaping are checked against
//!    RFC 3261 §25 as RFC 4475 §3.1.2 expects. A failure is a [`ParseError`] whose
//!    [`disposition`](ParseError::disposition) is the status to answer with or
//!    [`Disposition::Drop`].
//!
//! The result is an [`rsip::SipMessage`] whenever rsip can represent the message, or an
//! [`ExtensionRequest`] for a request whose method is outside rsip's closed `Method` enum.
//!
//! Everything is sans-IO: input is a byte slice, nothing reads a socket or the clock, and the
//! work done is bounded by [`Limits`] whatever the input.

mod error;
mod grammar;
mod lexer;
mod parse;
mod response;

pub use error::{Disposition, ParseError, ParseErrorKind};
pub use response::ResponseContext;

use parse::Framing;

/// Bounds on what one inbound message may cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest message accepted, header section and body together. The default is the largest
    /// UDP payload (65,535 − 8 − 20 bytes, rounded down to 64 KiB − 1).
    pub max_message_bytes: usize,
    /// Most header fields in one message, counted before comma-joined values are split.
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_message_bytes: 65_535, max_headers: 256 }
    }
}

/// A successfully parsed inbound datagram or framed stream message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
#[expect(
    clippy::large_enum_variant,
    reason = "every parse yields the large variant except keep-alives; boxing would add an allocation per message"
)]
pub enum Parsed {
    /// Only CRLFs: a keep-alive (RFC 5626 §3.5.1). Nothing to answer on a datagram.
    KeepAlive,
    /// A request or response rsip can represent.
    Sip(rsip::SipMessage),
    /// A well-formed request whose method rsip cannot represent. RFC 3261 §8.2.1 asks a UAS to
    /// answer it with 405 (or a proxy to forward it); [`ExtensionRequest::write_response`]
    /// builds the answer.
    ExtensionRequest(Box<ExtensionRequest>),
}

/// A request with an extension method (RFC 3261 §7.1 `extension-method = token`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtensionRequest {
    /// The method exactly as received (methods are case-sensitive, §7.1).
    pub method: String,
    /// The Request-URI as received (validated as a SIP or SIPS URI).
    pub uri: String,
    /// Header fields, normalised as for [`Parsed::Sip`].
    pub headers: rsip::Headers,
    /// The body, cut to Content-Length.
    pub body: Vec<u8>,
    context: ResponseContext,
}

impl ExtensionRequest {
    /// The header values a response copies (RFC 3261 §8.2.6.2).
    pub fn response_context(&self) -> &ResponseContext {
        &self.context
    }

    /// Appends a response to this request to `out`, e.g. `405 Method Not Allowed` or
    /// `501 Not Implemented` (§8.2.1). The caller adds an Allow header itself if it needs one.
    pub fn write_response(&self, status: u16, reason: &str, to_tag: Option<&str>, out: &mut Vec<u8>) {
        self.context.write_response(status, reason, to_tag, out);
    }
}

/// Parses one UDP datagram (RFC 3261 §18.3): leading CRLFs are skipped (an all-CRLF datagram
/// is [`Parsed::KeepAlive`]), a body longer than Content-Length is truncated, and a body shorter
/// than it is an error. Without Content-Length the body is the rest of the datagram.
pub fn parse_datagram(bytes: &[u8], limits: &Limits) -> Result<Parsed, ParseError> {
    let start = bytes.iter().position(|b| *b != b'\r' && *b != b'\n').unwrap_or(bytes.len());
    let message = &bytes[start..];
    if message.is_empty() {
        return Ok(Parsed::KeepAlive);
    }
    parse::parse(message, limits, Framing::Datagram)
}

/// Parses one message cut by [`frame_stream`] (`&buf[..len]` of a [`StreamFrame::Complete`]).
/// Content-Length is mandatory here (RFC 3261 §18.3).
pub fn parse_stream_message(bytes: &[u8], limits: &Limits) -> Result<Parsed, ParseError> {
    parse::parse(bytes, limits, Framing::Stream)
}

/// Where the next message in a stream buffer ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamFrame {
    /// A whole message occupies `buf[..len]`; hand it to [`parse_stream_message`].
    Complete {
        /// Length of the message, header section and body.
        len: usize,
    },
    /// More bytes are needed.
    Incomplete,
    /// `buf[..len]` is a keep-alive: CRLFCRLF is a ping to answer with CRLF, a lone CRLF is a
    /// pong (RFC 5626 §3.5.1). Consume it.
    KeepAlive {
        /// Bytes to consume.
        len: usize,
    },
    /// The stream cannot be framed any further: answer if the error's disposition says so,
    /// then close the connection (§18.3: a framing error on a stream is not recoverable).
    Invalid(ParseError),
}

/// Finds the first message boundary in a TCP/TLS receive buffer. A reader that appends to its
/// buffer between calls should keep a [`StreamFramer`] instead, which does not scan again what
/// it has already scanned.
pub fn frame_stream(buf: &[u8], limits: &Limits) -> StreamFrame {
    StreamFramer::default().frame(buf, limits)
}

/// [`frame_stream`] for a buffer that grows between calls: it remembers how far it searched
/// for the end of the header section and, once it knows the message's length, only waits for
/// that many bytes. Framing a message fed a byte at a time therefore takes time linear in its
/// length, where searching from the start on every read would take quadratic time — a peer
/// trickling a 64 KiB header one byte per segment would cost two billion byte comparisons.
///
/// Contract: between calls the caller only appends to `buf`; after any answer but
/// [`StreamFrame::Incomplete`] it removes the answered bytes from the front (and the framer
/// starts over by itself). A caller that removes bytes otherwise calls [`StreamFramer::reset`].
#[derive(Debug, Clone, Default)]
pub struct StreamFramer {
    /// `buf[..searched]` holds no CRLFCRLF (the search resumes 3 bytes before, where one could
    /// straddle the old end).
    searched: usize,
    /// The whole message's length, once its header section was found.
    total: Option<usize>,
    /// Bytes searched so far, over every call: what the linear-time claim is tested on.
    examined: u64,
}

impl StreamFramer {
    /// Forgets the message in progress.
    pub fn reset(&mut self) {
        self.searched = 0;
        self.total = None;
    }

    /// Bytes searched for a header end since the framer was made.
    pub fn examined(&self) -> u64 {
        self.examined
    }

    /// The first message boundary in `buf` (see the type's contract).
    pub fn frame(&mut self, buf: &[u8], limits: &Limits) -> StreamFrame {
        let answer = self.frame_inner(buf, limits);
        if !matches!(answer, StreamFrame::Incomplete) {
            self.reset();
        }
        answer
    }

    fn frame_inner(&mut self, buf: &[u8], limits: &Limits) -> StreamFrame {
        if let Some(len) = self.total {
            return if buf.len() >= len { StreamFrame::Complete { len } } else { StreamFrame::Incomplete };
        }
        if buf.starts_with(b"\r\n\r\n") {
            return StreamFrame::KeepAlive { len: 4 };
        }
        if buf.starts_with(b"\r\n") {
            // A CRLF followed by anything but the rest of a CRLFCRLF ping is a pong.
            return match buf.get(2) {
                None => StreamFrame::Incomplete,
                Some(b'\r') if buf.len() == 3 => StreamFrame::Incomplete,
                Some(b'\r') if buf.get(3) == Some(&b'\n') => StreamFrame::KeepAlive { len: 4 },
                _ => StreamFrame::KeepAlive { len: 2 },
            };
        }
        if buf == b"\r" {
            return StreamFrame::Incomplete;
        }
        let window = buf.len().min(limits.max_message_bytes);
        let from = self.searched.saturating_sub(3).min(window);
        self.examined += (window - from) as u64;
        let Some(head_end) = lexer::find_head_end(&buf[from..], window - from).map(|at| from + at) else {
            self.searched = window;
            return if buf.len() >= limits.max_message_bytes {
                StreamFrame::Invalid(stream_error(buf, limits, ParseErrorKind::TooLarge))
            } else {
                StreamFrame::Incomplete
            };
        };
        let head = lexer::split_head(&buf[..head_end], limits.max_headers);
        let mut content_length = None;
        for field in head.fields.iter().filter(|f| f.name.is("Content-Length")) {
            if content_length.is_some() {
                // RFC 4475 §3.3.9: two Content-Lengths leave the framing unknowable.
                return StreamFrame::Invalid(stream_error(
                    buf,
                    limits,
                    ParseErrorKind::DuplicateHeader("Content-Length"),
                ));
            }
            match grammar::parse_digits(&field.value, u64::MAX) {
                Ok(n) => content_length = Some(n),
                Err(true) => content_length = Some(u64::MAX),
                Err(false) => {
                    let kind = ParseErrorKind::BadHeader("Content-Length");
                    return StreamFrame::Invalid(stream_error(buf, limits, kind));
                }
            }
        }
        let Some(content_length) = content_length else {
            return StreamFrame::Invalid(stream_error(buf, limits, ParseErrorKind::MissingContentLength));
        };
        let total = usize::try_from(content_length).ok().and_then(|n| n.checked_add(head_end + 4));
        match total {
            Some(len) if len <= limits.max_message_bytes => {
                if buf.len() >= len {
                    StreamFrame::Complete { len }
                } else {
                    self.total = Some(len);
                    StreamFrame::Incomplete
                }
            }
            _ => StreamFrame::Invalid(stream_error(buf, limits, ParseErrorKind::TooLarge)),
        }
    }
}

fn stream_error(buf: &[u8], limits: &Limits, kind: ParseErrorKind) -> ParseError {
    let head_len =
        lexer::find_head_end(buf, limits.max_message_bytes).unwrap_or(buf.len().min(limits.max_message_bytes));
    let head = lexer::split_head(&buf[..head_len], limits.max_headers);
    let context = if head.start_line.starts_with(b"SIP/") { None } else { parse::response_context(&head.fields) };
    ParseError::with_context(kind, context)
}
