//! Strict validation of a framed message and its conversion to rsip types.

use super::error::{ParseError, ParseErrorKind as K};
use super::grammar::{self, UriError};
use super::lexer::{self, Field, FieldName};
use super::response::ResponseContext;
use super::{ExtensionRequest, Limits, Parsed};

/// How the message was delimited, which decides what Content-Length means (RFC 3261 §18.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    Datagram,
    Stream,
}

enum StartLine<'a> {
    Request { method: &'a str, uri: &'a str },
    Response { code: u16, reason: &'a str },
}

/// Parses one message starting at its first byte (leading CRLFs already skipped).
pub(crate) fn parse(input: &[u8], limits: &Limits, framing: Framing) -> Result<Parsed, ParseError> {
    let (head_bytes, body_region, mut early) = match lexer::find_head_end(input, limits.max_message_bytes) {
        Some(end) => (&input[..end], &input[end + 4..], None),
        None => {
            let cut = &input[..input.len().min(limits.max_message_bytes)];
            let kind = if input.len() > limits.max_message_bytes { K::TooLarge } else { K::UnterminatedHeaders };
            (cut, &[][..], Some(kind))
        }
    };
    if input.len() > limits.max_message_bytes {
        early = Some(K::TooLarge);
    }
    let head = lexer::split_head(head_bytes, limits.max_headers);
    let is_request = !head.start_line.starts_with(b"SIP/");
    let context = if is_request { response_context(&head.fields) } else { None };
    let fail = |kind| ParseError::with_context(kind, context.clone());
    if let Some(kind) = early {
        return Err(fail(kind));
    }
    let start = parse_start_line(head.start_line).map_err(fail)?;
    if let Some(kind) = head.defect {
        return Err(fail(kind));
    }
    let checked = check_fields(head.fields, &start).map_err(fail)?;
    let body = match (checked.content_length, framing) {
        (Some(len), _) => {
            // RFC 3261 §18.3: on a datagram, bytes past Content-Length are discarded, and a
            // request whose body is shorter than Content-Length gets a 400.
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            body_region.get(..len).ok_or_else(|| fail(K::BodyTooShort))?
        }
        (None, Framing::Datagram) => body_region,
        (None, Framing::Stream) => return Err(fail(K::MissingContentLength)),
    };
    Ok(build(start, checked.fields, body.to_vec()))
}

pub(crate) fn response_context(fields: &[Field]) -> Option<Box<ResponseContext>> {
    let vias: Vec<String> = fields.iter().filter(|f| f.name.is("Via")).map(|f| f.value.clone()).collect();
    if vias.is_empty() {
        return None;
    }
    let first = |name| fields.iter().find(|f: &&Field| f.name.is(name)).map(|f| f.value.clone());
    Some(Box::new(ResponseContext {
        vias,
        from: first("From"),
        to: first("To"),
        call_id: first("Call-ID"),
        cseq: first("CSeq"),
    }))
}

fn parse_start_line(line: &[u8]) -> Result<StartLine<'_>, K> {
    let Ok(line) = std::str::from_utf8(line) else {
        return Err(if line.starts_with(b"SIP/") { K::StatusCode } else { K::StartLine });
    };
    if let Some(rest) = line.strip_prefix("SIP/") {
        // Status-Line = SIP-Version SP Status-Code SP Reason-Phrase CRLF (RFC 3261 §7.2).
        let (version, rest) = rest.split_once(' ').ok_or(K::StatusCode)?;
        check_version(version)?;
        let code = rest.get(..3).ok_or(K::StatusCode)?;
        let reason = rest[3..].strip_prefix(' ').ok_or(K::StatusCode)?;
        let code = grammar::parse_digits(code, 699).map_err(|_| K::StatusCode)?;
        if code < 100 || reason.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f) {
            return Err(K::StatusCode);
        }
        return Ok(StartLine::Response { code: code as u16, reason });
    }
    // Request-Line = Method SP Request-URI SP SIP-Version CRLF (§7.1): exactly one SP between
    // elements, none at the end (RFC 4475 §3.1.2.8–§3.1.2.10).
    let mut parts = line.split(' ');
    let (Some(method), Some(uri), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(K::StartLine);
    };
    if !grammar::is_token(method) || uri.is_empty() {
        return Err(K::StartLine);
    }
    let version = version.strip_prefix("SIP/").ok_or(K::StartLine)?;
    check_version(version)?;
    Ok(StartLine::Request { method, uri })
}

/// `SIP-Version = "SIP" "/" 1*DIGIT "." 1*DIGIT`; only 2.0 is served (RFC 3261 §21.5.7).
fn check_version(numbers: &str) -> Result<(), K> {
    let (major, minor) = numbers.split_once('.').ok_or(K::StartLine)?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(major) || !digits(minor) {
        return Err(K::StartLine);
    }
    if major.trim_start_matches('0') == "2" && minor.trim_start_matches('0').is_empty() {
        Ok(())
    } else {
        Err(K::Version)
    }
}

struct Checked {
    fields: Vec<Field>,
    content_length: Option<u64>,
}

/// Validates every field this layer knows the grammar of, splits comma-joined list fields into
/// one field per value (RFC 3261 §7.3.1 allows either form), and checks the mandatory ones.
fn check_fields(fields: Vec<Field>, start: &StartLine<'_>) -> Result<Checked, K> {
    let mut out = Vec::with_capacity(fields.len() + 4);
    let mut seen = Seen::default();
    let mut content_length = None;
    for field in fields {
        let name = match &field.name {
            FieldName::Known(name) => *name,
            FieldName::Other(_) => {
                out.push(field);
                continue;
            }
        };
        let value = field.value.as_str();
        match name {
            "Via" => {
                seen.via = true;
                for element in grammar::split_list(value).ok_or(K::BadHeader("Via"))? {
                    let via = grammar::parse_via(element).ok_or(K::BadHeader("Via"))?;
                    if !via.protocol.eq_ignore_ascii_case("SIP") || check_version(via.version).is_err() {
                        return Err(K::BadHeader("Via"));
                    }
                    out.push(Field { name: field.name.clone(), value: via.canonical() });
                }
                continue;
            }
            "From" | "To" | "Reply-To" => {
                seen.once(name)?;
                let addr = grammar::parse_addr_value(value, false).ok_or(K::BadHeader(name))?;
                out.push(Field { name: field.name.clone(), value: addr.canonical() });
                continue;
            }
            "Contact" | "Route" | "Record-Route" => {
                if name == "Contact" && value == "*" {
                    out.push(field);
                    continue;
                }
                for element in grammar::split_list(value).ok_or(K::BadHeader(name))? {
                    let addr = grammar::parse_addr_value(element, name != "Contact").ok_or(K::BadHeader(name))?;
                    out.push(Field { name: field.name.clone(), value: addr.canonical() });
                }
                continue;
            }
            "Call-ID" => {
                seen.once(name)?;
                if !grammar::is_call_id(value) {
                    return Err(K::BadHeader(name));
                }
            }
            "CSeq" => {
                seen.once(name)?;
                let (number, method) = grammar::split_cseq(value).ok_or(K::BadHeader(name))?;
                // §8.1.1.5: the sequence number MUST be less than 2**31.
                grammar::parse_digits(number, (1 << 31) - 1)
                    .map_err(|too_big| if too_big { K::CSeqOutOfRange } else { K::BadHeader(name) })?;
                // §8.2.3 / RFC 4475 §3.1.2.17: methods are case-sensitive (§7.1).
                if let StartLine::Request { method: request_method, .. } = start
                    && *request_method != method
                {
                    return Err(K::CSeqMethodMismatch);
                }
            }
            "Max-Forwards" => {
                seen.once(name)?;
                grammar::parse_digits(value, 255)
                    .map_err(|too_big| if too_big { K::MaxForwardsOutOfRange } else { K::BadHeader(name) })?;
            }
            "Content-Length" => {
                seen.once(name)?;
                // A value beyond u64 cannot be satisfied by any body: treat it as the largest.
                content_length = Some(match grammar::parse_digits(value, u64::MAX) {
                    Ok(n) => n,
                    Err(true) => u64::MAX,
                    Err(false) => return Err(K::BadHeader(name)),
                });
            }
            "Date" if !grammar::is_sip_date(value) => return Err(K::BadHeader(name)),
            // delta-seconds = 1*DIGIT; RFC 4475 §3.1.2.4 lets an overlarge value stand for the
            // default, so only the syntax is checked.
            "Expires" if grammar::parse_digits(value, u64::MAX) == Err(false) => return Err(K::BadHeader(name)),
            _ => {}
        }
        out.push(field);
    }
    // RFC 3261 §8.1.1: To, From, CSeq, Call-ID and Via are mandatory. Max-Forwards is too for a
    // UAC (§8.1.1.6), but RFC 2543 peers omit it and RFC 4475 §3.4.1 asks that such requests
    // be accepted; a proxy adds it when forwarding (§16.6 step 3), so its absence is tolerated.
    for (present, name) in
        [(seen.to, "To"), (seen.from, "From"), (seen.call_id, "Call-ID"), (seen.cseq, "CSeq"), (seen.via, "Via")]
    {
        if !present {
            return Err(K::MissingHeader(name));
        }
    }
    if let StartLine::Request { uri, .. } = start {
        check_request_uri(uri)?;
    }
    Ok(Checked { fields: out, content_length })
}

/// §8.2.2.1: a scheme the element does not understand gets 416. URI headers have no meaning in
/// a Request-URI (§19.1.1 table), and RFC 4475 §3.1.2.11 allows rejecting them with 400.
fn check_request_uri(uri: &str) -> Result<(), K> {
    match grammar::parse_uri(uri) {
        Ok(parsed) if parsed.headers.is_none() => Ok(()),
        Ok(_) | Err(UriError::Malformed) => Err(K::RequestUri),
        Err(UriError::OtherScheme) => Err(K::UnsupportedUriScheme),
    }
}

#[derive(Default)]
struct Seen {
    to: bool,
    from: bool,
    call_id: bool,
    cseq: bool,
    via: bool,
    max_forwards: bool,
    content_length: bool,
    reply_to: bool,
}

impl Seen {
    fn once(&mut self, name: &'static str) -> Result<(), K> {
        let flag = match name {
            "To" => &mut self.to,
            "From" => &mut self.from,
            "Call-ID" => &mut self.call_id,
            "CSeq" => &mut self.cseq,
            "Max-Forwards" => &mut self.max_forwards,
            "Content-Length" => &mut self.content_length,
            _ => &mut self.reply_to,
        };
        if std::mem::replace(flag, true) {
            return Err(K::DuplicateHeader(name));
        }
        Ok(())
    }
}

fn build(start: StartLine<'_>, fields: Vec<Field>, body: Vec<u8>) -> Parsed {
    let context = match start {
        StartLine::Request { method, .. } if known_method(method).is_none() => response_context(&fields),
        _ => None,
    };
    let headers: rsip::Headers = fields.into_iter().map(to_rsip_header).collect::<Vec<_>>().into();
    match start {
        StartLine::Response { code, reason } => {
            let status_code = match rsip::StatusCode::from(code) {
                rsip::StatusCode::Other(code, _) => rsip::StatusCode::Other(code, reason.to_owned()),
                known => known,
            };
            Parsed::Sip(rsip::SipMessage::Response(rsip::Response {
                status_code,
                version: rsip::Version::V2,
                headers,
                body,
            }))
        }
        StartLine::Request { method, uri } => match known_method(method) {
            Some(method) => Parsed::Sip(rsip::SipMessage::Request(rsip::Request {
                method,
                uri: to_rsip_uri(uri),
                version: rsip::Version::V2,
                headers,
                body,
            })),
            None => Parsed::ExtensionRequest(Box::new(ExtensionRequest {
                method: method.to_owned(),
                uri: uri.to_owned(),
                headers,
                body,
                // Validation guarantees a Via, so the context always exists here.
                context: context.map(|c| *c).unwrap_or_default(),
            })),
        },
    }
}

/// rsip's Method enum is closed and compares case-insensitively; SIP methods are
/// case-sensitive (§7.1), so only the exact upper-case spelling maps to it.
fn known_method(method: &str) -> Option<rsip::Method> {
    use rsip::Method::*;
    // Methods are case-sensitive (§7.1): `invite` is an extension method, not INVITE. A match
    // on the bytes instead of formatting every rsip method: this runs once per message.
    Some(match method {
        "INVITE" => Invite,
        "ACK" => Ack,
        "BYE" => Bye,
        "CANCEL" => Cancel,
        "OPTIONS" => Options,
        "REGISTER" => Register,
        "INFO" => Info,
        "UPDATE" => Update,
        "PRACK" => PRack,
        "REFER" => Refer,
        "NOTIFY" => Notify,
        "SUBSCRIBE" => Subscribe,
        "MESSAGE" => Message,
        "PUBLISH" => Publish,
        _ => return None,
    })
}

/// Builds the rsip URI from the already validated parts. An IPv6 reference is kept as a
/// bracketed `Domain`: rsip's `Host::IpAddr` prints IPv6 without brackets, which would make the
/// URI unparsable once printed.
fn to_rsip_uri(uri: &str) -> rsip::Uri {
    let Ok(parsed) = grammar::parse_uri(uri) else {
        return rsip::Uri::default();
    };
    let host = if parsed.host.starts_with('[') {
        rsip::Host::Domain(parsed.host.into())
    } else {
        rsip::Host::from(parsed.host)
    };
    let params = parsed
        .params
        .iter()
        .map(|&(name, value)| {
            // Prefer rsip's typed parameter when it prints back exactly as received.
            match rsip::Param::try_from((name, value)) {
                Ok(typed) if typed.to_string().strip_prefix(';') == Some(param_text(name, value).as_str()) => typed,
                _ => rsip::Param::Other(name.into(), value.map(Into::into)),
            }
        })
        .collect();
    rsip::Uri {
        scheme: Some(if parsed.sips { rsip::Scheme::Sips } else { rsip::Scheme::Sip }),
        auth: parsed.user.map(|user| rsip::Auth { user: user.into(), password: parsed.password.map(Into::into) }),
        host_with_port: rsip::HostWithPort { host, port: parsed.port.map(Into::into) },
        params,
        headers: Vec::new(),
    }
}

fn param_text(name: &str, value: Option<&str>) -> String {
    match value {
        Some(value) => format!("{name}={value}"),
        None => name.to_owned(),
    }
}

fn to_rsip_header(field: Field) -> rsip::Header {
    use rsip::headers as h;
    use rsip::headers::UntypedHeader as _;
    let Field { name, value: v } = field;
    let name = match name {
        FieldName::Known(name) => name,
        FieldName::Other(name) => return rsip::Header::Other(name, v),
    };
    match name {
        "Accept" => rsip::Header::Accept(h::Accept::new(v)),
        "Accept-Encoding" => rsip::Header::AcceptEncoding(h::AcceptEncoding::new(v)),
        "Accept-Language" => rsip::Header::AcceptLanguage(h::AcceptLanguage::new(v)),
        "Alert-Info" => rsip::Header::AlertInfo(h::AlertInfo::new(v)),
        "Allow" => rsip::Header::Allow(h::Allow::new(v)),
        "Authentication-Info" => rsip::Header::AuthenticationInfo(h::AuthenticationInfo::new(v)),
        "Authorization" => rsip::Header::Authorization(h::Authorization::new(v)),
        "CSeq" => rsip::Header::CSeq(h::CSeq::new(v)),
        "Call-ID" => rsip::Header::CallId(h::CallId::new(v)),
        "Call-Info" => rsip::Header::CallInfo(h::CallInfo::new(v)),
        "Contact" => rsip::Header::Contact(h::Contact::new(v)),
        "Content-Disposition" => rsip::Header::ContentDisposition(h::ContentDisposition::new(v)),
        "Content-Encoding" => rsip::Header::ContentEncoding(h::ContentEncoding::new(v)),
        "Content-Language" => rsip::Header::ContentLanguage(h::ContentLanguage::new(v)),
        "Content-Length" => rsip::Header::ContentLength(h::ContentLength::new(v)),
        "Content-Type" => rsip::Header::ContentType(h::ContentType::new(v)),
        "Date" => rsip::Header::Date(h::Date::new(v)),
        "Error-Info" => rsip::Header::ErrorInfo(h::ErrorInfo::new(v)),
        "Event" => rsip::Header::Event(h::Event::new(v)),
        "Expires" => rsip::Header::Expires(h::Expires::new(v)),
        "From" => rsip::Header::From(h::From::new(v)),
        "In-Reply-To" => rsip::Header::InReplyTo(h::InReplyTo::new(v)),
        "Max-Forwards" => rsip::Header::MaxForwards(h::MaxForwards::new(v)),
        "MIME-Version" => rsip::Header::MimeVersion(h::MimeVersion::new(v)),
        "Min-Expires" => rsip::Header::MinExpires(h::MinExpires::new(v)),
        "Organization" => rsip::Header::Organization(h::Organization::new(v)),
        "Priority" => rsip::Header::Priority(h::Priority::new(v)),
        "Proxy-Authenticate" => rsip::Header::ProxyAuthenticate(h::ProxyAuthenticate::new(v)),
        "Proxy-Authorization" => rsip::Header::ProxyAuthorization(h::ProxyAuthorization::new(v)),
        "Proxy-Require" => rsip::Header::ProxyRequire(h::ProxyRequire::new(v)),
        "Record-Route" => rsip::Header::RecordRoute(h::RecordRoute::new(v)),
        "Reply-To" => rsip::Header::ReplyTo(h::ReplyTo::new(v)),
        "Require" => rsip::Header::Require(h::Require::new(v)),
        "Retry-After" => rsip::Header::RetryAfter(h::RetryAfter::new(v)),
        "Route" => rsip::Header::Route(h::Route::new(v)),
        "Server" => rsip::Header::Server(h::Server::new(v)),
        "Subject" => rsip::Header::Subject(h::Subject::new(v)),
        "Subscription-State" => rsip::Header::SubscriptionState(h::SubscriptionState::new(v)),
        "Supported" => rsip::Header::Supported(h::Supported::new(v)),
        "Timestamp" => rsip::Header::Timestamp(h::Timestamp::new(v)),
        "To" => rsip::Header::To(h::To::new(v)),
        "Unsupported" => rsip::Header::Unsupported(h::Unsupported::new(v)),
        "User-Agent" => rsip::Header::UserAgent(h::UserAgent::new(v)),
        "Via" => rsip::Header::Via(h::Via::new(v)),
        "Warning" => rsip::Header::Warning(h::Warning::new(v)),
        "WWW-Authenticate" => rsip::Header::WwwAuthenticate(h::WwwAuthenticate::new(v)),
        // Expanded compact names rsip has no variant for (Event-less extensions).
        other => rsip::Header::Other(other.to_owned(), v),
    }
}
