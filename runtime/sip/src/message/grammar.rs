//! RFC 3261 §25.1 grammar checks for the parts of a message this layer validates strictly.
//!
//! Every function works on byte offsets of ASCII delimiters, so slicing a `&str` at them is
//! always on a character boundary, and every loop advances by at least one byte.

use super::lexer::is_wsp;

/// `token` characters (RFC 3261 §25.1).
pub(crate) fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)
}

pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_token_byte)
}

fn is_word_byte(b: u8) -> bool {
    is_token_byte(b) || b"()<>:\\\"/[]?{}".contains(&b)
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.!~*'()".contains(&b)
}

fn is_reserved(b: u8) -> bool {
    b";/?:@&=+$,".contains(&b)
}

/// Checks that every byte is allowed by `allowed` or starts a valid `escaped` (`%` HEXDIG
/// HEXDIG).
fn all_escaped_or(s: &str, allowed: impl Fn(u8) -> bool) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3);
            if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                return false;
            }
            i += 3;
        } else if allowed(b[i]) {
            i += 1;
        } else {
            return false;
        }
    }
    true
}

/// The parts of a SIP or SIPS URI (RFC 3261 §19.1.1), borrowed from the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SipUri<'a> {
    pub sips: bool,
    pub user: Option<&'a str>,
    pub password: Option<&'a str>,
    /// Host as written; IPv6 references keep their brackets.
    pub host: &'a str,
    pub port: Option<u16>,
    pub params: Vec<(&'a str, Option<&'a str>)>,
    pub headers: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UriError {
    /// Syntactically valid absoluteURI with a scheme other than sip/sips.
    OtherScheme,
    Malformed,
}

/// `scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )` (RFC 3261 §25.1).
fn split_scheme(s: &str) -> Option<(&str, &str)> {
    let colon = s.find(':')?;
    let scheme = &s[..colon];
    let mut bytes = scheme.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphabetic());
    if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b)) {
        return None;
    }
    Some((scheme, &s[colon + 1..]))
}

/// Parses a SIP/SIPS URI; any other well-formed absoluteURI yields `UriError::OtherScheme`.
pub(crate) fn parse_uri(s: &str) -> Result<SipUri<'_>, UriError> {
    let (scheme, rest) = split_scheme(s).ok_or(UriError::Malformed)?;
    let sips = if scheme.eq_ignore_ascii_case("sip") {
        false
    } else if scheme.eq_ignore_ascii_case("sips") {
        true
    } else {
        // absoluteURI = scheme ":" ( hier-part / opaque-part ): uric characters only.
        let ok = !rest.is_empty() && all_escaped_or(rest, |b| is_unreserved(b) || is_reserved(b));
        return Err(if ok { UriError::OtherScheme } else { UriError::Malformed });
    };
    let m = UriError::Malformed;
    // userinfo cannot hold an unescaped "@", hostport/params/headers cannot either.
    let (userinfo, rest) = match rest.find('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let (mut user, mut password) = (None, None);
    if let Some(userinfo) = userinfo {
        let (u, p) = match userinfo.find(':') {
            Some(c) => (&userinfo[..c], Some(&userinfo[c + 1..])),
            None => (userinfo, None),
        };
        if u.is_empty() || !all_escaped_or(u, |b| is_unreserved(b) || b"&=+$,;?/".contains(&b)) {
            return Err(m);
        }
        if let Some(p) = p
            && !all_escaped_or(p, |b| is_unreserved(b) || b"&=+$,".contains(&b))
        {
            return Err(m);
        }
        user = Some(u);
        password = p;
    }
    let (rest, headers) = match rest.find('?') {
        Some(q) => (&rest[..q], Some(&rest[q + 1..])),
        None => (rest, None),
    };
    if let Some(h) = headers
        && (h.is_empty() || !all_escaped_or(h, |b| is_unreserved(b) || b"[]/?:+$=&".contains(&b)))
    {
        return Err(m);
    }
    let mut parts = rest.split(';');
    let hostport = parts.next().unwrap_or_default();
    let (host, port) = parse_hostport(hostport).ok_or(m)?;
    let mut params = Vec::new();
    for param in parts {
        let (name, value) = match param.find('=') {
            Some(e) => (&param[..e], Some(&param[e + 1..])),
            None => (param, None),
        };
        let paramchar = |b: u8| is_unreserved(b) || b"[]/:&+$".contains(&b);
        if name.is_empty() || !all_escaped_or(name, paramchar) {
            return Err(m);
        }
        if let Some(v) = value
            && (v.is_empty() || !all_escaped_or(v, paramchar))
        {
            return Err(m);
        }
        params.push((name, value));
    }
    Ok(SipUri { sips, user, password, host, port, params, headers })
}

/// `hostport = host [ ":" port ]` with host a hostname, IPv4address or IPv6reference.
fn parse_hostport(s: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if s.starts_with('[') {
        let close = s.find(']')?;
        let inner = &s[1..close];
        inner.parse::<std::net::Ipv6Addr>().ok()?;
        let after = &s[close + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return None,
        };
        (&s[..=close], port)
    } else {
        match s.find(':') {
            Some(c) => (&s[..c], Some(&s[c + 1..])),
            None => (s, None),
        }
    };
    if !host.starts_with('[') {
        let b = host.as_bytes();
        let ok = b.first().is_some_and(u8::is_ascii_alphanumeric)
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'.');
        if !ok {
            return None;
        }
    }
    let port = match port {
        Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => Some(p.parse().ok()?),
        Some(_) => return None,
        None => None,
    };
    Some((host, port))
}

/// Byte scanner over a header value.
struct Scan<'a> {
    s: &'a str,
    i: usize,
}

impl<'a> Scan<'a> {
    fn new(s: &'a str) -> Self {
        Self { s, i: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.i).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(is_wsp) {
            self.i += 1;
        }
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn take_while(&mut self, f: impl Fn(u8) -> bool) -> &'a str {
        let start = self.i;
        while self.peek().is_some_and(&f) {
            self.i += 1;
        }
        &self.s[start..self.i]
    }

    /// quoted-string = SWS DQUOTE *(qdtext / quoted-pair) DQUOTE; returns it with quotes.
    fn quoted_string(&mut self) -> Option<&'a str> {
        let start = self.i;
        if !self.eat(b'"') {
            return None;
        }
        let b = self.s.as_bytes();
        loop {
            match b.get(self.i)? {
                b'"' => {
                    self.i += 1;
                    return Some(&self.s[start..self.i]);
                }
                // quoted-pair = "\" (%x00-09 / %x0B-0C / %x0E-7F)
                b'\\' => match b.get(self.i + 1)? {
                    b'\n' | b'\r' => return None,
                    c if *c <= 0x7f => self.i += 2,
                    _ => return None,
                },
                b'\r' | b'\n' => return None,
                // qdtext = LWS / %x21 / %x23-5B / %x5D-7E / UTF8-NONASCII (§25.1); other
                // controls are not allowed unescaped.
                c if *c < 0x20 && *c != b'\t' || *c == 0x7f => return None,
                _ => self.i += 1,
            }
        }
    }

    fn rest(&self) -> &'a str {
        &self.s[self.i..]
    }
}

/// `*( SEMI generic-param )` where `generic-param = token [ EQUAL gen-value ]` and
/// `gen-value = token / host / quoted-string`. Returns the parameters in order.
fn parse_params(s: &str) -> Option<Vec<(&str, Option<&str>)>> {
    let mut scan = Scan::new(s);
    let mut params = Vec::new();
    loop {
        scan.skip_ws();
        if scan.peek().is_none() {
            return Some(params);
        }
        if !scan.eat(b';') {
            return None;
        }
        scan.skip_ws();
        let name = scan.take_while(is_token_byte);
        if name.is_empty() {
            return None;
        }
        scan.skip_ws();
        let value = if scan.eat(b'=') {
            scan.skip_ws();
            let value = if scan.peek() == Some(b'"') {
                scan.quoted_string()?
            } else {
                // host adds ":" and brackets (IPv6) to token characters.
                scan.take_while(|b| is_token_byte(b) || b == b':' || b == b'[' || b == b']')
            };
            if value.is_empty() {
                return None;
            }
            Some(value)
        } else {
            None
        };
        params.push((name, value));
    }
}

/// The header parameters of a name-addr or addr-spec header value.
#[derive(Debug)]
pub(crate) struct AddrValue<'a> {
    /// The display name and `<URI>`, or the addr-spec, as written (trimmed).
    pub head: &'a str,
    pub params: Vec<(&'a str, Option<&'a str>)>,
}

impl AddrValue<'_> {
    /// The value with the parameters' optional whitespace dropped (`;tag = x` → `;tag=x`,
    /// RFC 4475 §3.1.1.1), which the typed headers downstream cannot parse otherwise.
    pub fn canonical(&self) -> String {
        let mut out = self.head.to_owned();
        for (name, value) in &self.params {
            out.push(';');
            out.push_str(name);
            if let Some(value) = value {
                out.push('=');
                out.push_str(value);
            }
        }
        out
    }
}

/// `( name-addr / addr-spec ) *( SEMI param )` as in From, To, Contact (RFC 3261 §20.10,
/// §20.20, §20.39). With `name_addr_only` (Route, Record-Route) the `<>` form is required.
pub(crate) fn parse_addr_value(s: &str, name_addr_only: bool) -> Option<AddrValue<'_>> {
    let mut scan = Scan::new(s);
    scan.skip_ws();
    let start = scan.i;
    let head_start = start;
    let mut angle = false;
    if scan.peek() == Some(b'"') {
        scan.quoted_string()?;
        scan.skip_ws();
        angle = scan.eat(b'<');
        if !angle {
            return None;
        }
    } else {
        // display-name = *(token LWS): scan it; stopping anywhere but "<" means addr-spec.
        scan.take_while(|b| is_token_byte(b) || is_wsp(b));
        if scan.eat(b'<') {
            angle = true;
        } else {
            scan.i = start;
        }
    }
    let uri;
    if angle {
        let close = scan.rest().find('>')?;
        uri = &scan.rest()[..close];
        scan.i += close + 1;
    } else {
        if name_addr_only {
            return None;
        }
        // §20.10: in addr-spec form the URI ends at the first ";" (which starts the header
        // parameters), and it may contain neither "," nor "?".
        let end = scan.rest().find(';').unwrap_or(scan.rest().len());
        uri = scan.rest()[..end].trim_end_matches([' ', '\t']);
        scan.i += end;
        if uri.contains(['?', ',']) {
            return None;
        }
    }
    // RFC 4475 §3.1.2.14: no whitespace inside the angle brackets or the addr-spec.
    if uri.is_empty() || uri.bytes().any(|b| b <= b' ' || b == 0x7f || b == b'<' || b == b'>' || b == b'"') {
        return None;
    }
    match parse_uri(uri) {
        Ok(_) | Err(UriError::OtherScheme) => {}
        Err(UriError::Malformed) => return None,
    }
    let head = s[head_start..scan.i].trim_end_matches([' ', '\t']);
    let params = parse_params(scan.rest())?;
    Some(AddrValue { head, params })
}

/// Splits a list header value at commas outside quoted strings and angle brackets.
/// Returns `None` when an element is empty or quoting is unbalanced.
pub(crate) fn split_list(s: &str) -> Option<Vec<&str>> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let (mut start, mut i, mut in_angle) = (0, 0, false);
    while i < b.len() {
        match b[i] {
            b'"' => {
                let mut scan = Scan { s, i };
                scan.quoted_string()?;
                i = scan.i;
                continue;
            }
            b'<' => in_angle = true,
            b'>' => in_angle = false,
            b',' if !in_angle => {
                out.push(s[start..i].trim_matches([' ', '\t']));
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    out.push(s[start..].trim_matches([' ', '\t']));
    if out.iter().any(|e| e.is_empty()) {
        return None;
    }
    Some(out)
}

/// True when a To/From value carries a `tag` parameter.
pub(crate) fn has_tag_param(value: &str) -> bool {
    parse_addr_value(value, false).is_some_and(|v| v.params.iter().any(|(n, _)| n.eq_ignore_ascii_case("tag")))
}

/// One Via value (RFC 3261 §20.42), re-serialisable without the optional whitespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ViaValue<'a> {
    pub protocol: &'a str,
    pub version: &'a str,
    pub transport: &'a str,
    pub host: &'a str,
    pub port: Option<u16>,
    pub params: Vec<(&'a str, Option<&'a str>)>,
}

impl ViaValue<'_> {
    /// `SIP/2.0/UDP host:port;param=value` with the separators' whitespace dropped, which is
    /// the form rsip's typed Via parser understands.
    pub fn canonical(&self) -> String {
        let mut s = String::with_capacity(64);
        s.push_str(self.protocol);
        s.push('/');
        s.push_str(self.version);
        s.push('/');
        s.push_str(self.transport);
        s.push(' ');
        s.push_str(self.host);
        if let Some(port) = self.port {
            s.push(':');
            s.push_str(&port.to_string());
        }
        for (name, value) in &self.params {
            s.push(';');
            s.push_str(name);
            if let Some(value) = value {
                s.push('=');
                s.push_str(value);
            }
        }
        s
    }
}

/// `via-parm = sent-protocol LWS sent-by *( SEMI via-params )`.
pub(crate) fn parse_via(s: &str) -> Option<ViaValue<'_>> {
    let mut scan = Scan::new(s);
    scan.skip_ws();
    let protocol = scan.take_while(is_token_byte);
    scan.skip_ws();
    if protocol.is_empty() || !scan.eat(b'/') {
        return None;
    }
    scan.skip_ws();
    let version = scan.take_while(is_token_byte);
    scan.skip_ws();
    if version.is_empty() || !scan.eat(b'/') {
        return None;
    }
    scan.skip_ws();
    let transport = scan.take_while(is_token_byte);
    if transport.is_empty() || !scan.peek().is_some_and(is_wsp) {
        return None;
    }
    scan.skip_ws();
    let host_start = scan.i;
    if scan.peek() == Some(b'[') {
        let close = scan.rest().find(']')?;
        scan.i += close + 1;
    } else {
        scan.take_while(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    }
    let host = &s[host_start..scan.i];
    scan.skip_ws();
    let port = if scan.eat(b':') {
        scan.skip_ws();
        let digits = scan.take_while(|b| b.is_ascii_digit());
        if digits.is_empty() || digits.len() > 5 {
            return None;
        }
        Some(digits.parse().ok()?)
    } else {
        None
    };
    parse_hostport(host)?;
    let params = parse_params(scan.rest())?;
    Some(ViaValue { protocol, version, transport, host, port, params })
}

/// `Call-ID = callid`, `callid = word [ "@" word ]` (RFC 3261 §20.8).
pub(crate) fn is_call_id(s: &str) -> bool {
    let mut parts = s.splitn(2, '@');
    let ok = |w: &str| !w.is_empty() && w.bytes().all(is_word_byte);
    parts.next().is_some_and(ok) && parts.next().is_none_or(ok)
}

/// Parses `1*DIGIT` into a value no larger than `max`; `Err(true)` means digits but too large.
pub(crate) fn parse_digits(s: &str, max: u64) -> Result<u64, bool> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(false);
    }
    let mut n: u64 = 0;
    for b in s.bytes() {
        n = n.checked_mul(10).and_then(|n| n.checked_add(u64::from(b - b'0'))).ok_or(true)?;
        if n > max {
            return Err(true);
        }
    }
    Ok(n)
}

/// `CSeq = 1*DIGIT LWS Method` (RFC 3261 §20.16): the number text and the method.
pub(crate) fn split_cseq(s: &str) -> Option<(&str, &str)> {
    let mut scan = Scan::new(s);
    let number = scan.take_while(|b| b.is_ascii_digit());
    if number.is_empty() || !scan.peek().is_some_and(is_wsp) {
        return None;
    }
    scan.skip_ws();
    let method = scan.rest();
    is_token(method).then_some((number, method))
}

/// `rfc1123-date = wkday "," SP date1 SP time SP "GMT"` (RFC 3261 §20.17; RFC 4475 §3.1.2.12
/// rejects other zones).
pub(crate) fn is_sip_date(s: &str) -> bool {
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let b = s.as_bytes();
    if b.len() != 29 || !s.is_ascii() {
        return false;
    }
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    DAYS.contains(&&s[0..3])
        && &s[3..5] == ", "
        && digits(5..7)
        && b[7] == b' '
        && MONTHS.contains(&&s[8..11])
        && b[11] == b' '
        && digits(12..16)
        && b[16] == b' '
        && digits(17..19)
        && b[19] == b':'
        && digits(20..22)
        && b[22] == b':'
        && digits(23..25)
        && &s[25..] == " GMT"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sip_uri_with_unusual_userinfo() {
        let uri = "sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com";
        let parsed = parse_uri(uri).unwrap();
        assert_eq!(parsed.user, Some("1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"));
        assert_eq!(parsed.host, "example.com");
    }

    #[test]
    fn ipv6_reference() {
        let parsed = parse_uri("sip:[2001:db8::10]:5070;transport=tcp").unwrap();
        assert_eq!(parsed.host, "[2001:db8::10]");
        assert_eq!(parsed.port, Some(5070));
        assert!(parse_uri("sip:[2001:db8::zz]").is_err());
    }

    #[test]
    fn bad_escape_is_malformed() {
        assert_eq!(parse_uri("sip:us%4@example.com"), Err(UriError::Malformed));
        assert_eq!(parse_uri("nobodyKnowsThisScheme:opaque"), Err(UriError::OtherScheme));
    }

    #[test]
    fn folded_via_whitespace() {
        let via = parse_via("SIP  / 2.0  / TCP     spindle.example.com   ; branch  =   z9hG4bK9ikj8").unwrap();
        assert_eq!(via.canonical(), "SIP/2.0/TCP spindle.example.com;branch=z9hG4bK9ikj8");
        assert!(parse_via("SIP/2.0/UDP 192.0.2.15;;").is_none());
    }

    #[test]
    fn addr_values() {
        assert!(parse_addr_value("caller<sip:caller@example.com>;tag=323", false).is_some());
        assert!(parse_addr_value("\"Watson, Thomas\" < sip:t.watson@example.org >", false).is_none());
        assert!(parse_addr_value("Watson, Thomas <sip:t.watson@example.org>", false).is_none());
        assert!(parse_addr_value("\"Mr. J. User <sip:j.user@example.com>", false).is_none());
        assert!(has_tag_param("sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n"));
    }
}
