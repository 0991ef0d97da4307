//! Capabilities: what a tenant's flows may reach beyond its own flows and trunks — the SIP
//! targets of `dial` and `transfer`, the AI-agent websockets of `agent`, the headers `dial` may
//! set (`[tenant.allow]`, `docs/tenants.md#capabilities`).
//!
//! A [`Capabilities`] is built once per tenant from its configuration (a bad entry is refused
//! when the file is loaded, naming its line and field) and answers each question with `Ok` or a
//! [`Denied`] that names the rule; flows see `not-allowed` with that text.
//!
//! Matching is on parsed URIs, never on raw strings. A target is parsed by one strict grammar
//! ([`SipUri`], [`AgentUrl`]): no URI headers, no `maddr`, no password, no host spelled in a
//! form only a resolver understands (`127.1`, `0x7f.1`, `2130706433`). Hosts compare
//! case-insensitively, IP literals by address, and an absent port is the scheme's default
//! port. What is checked is what is used: `dial` sends its INVITE to the address that was
//! checked, and an agent is connected to the addresses that were checked, never to a second
//! lookup of its name.
//!
//! Loopback, private, link-local and other non-public addresses ([`is_internal`]) are reached
//! only through an entry that names the host itself: an entry with a wildcard host (`*`,
//! `*.example.com`) admits a target only when it resolves to a public address, so that a name
//! under a wildcard — or a DNS answer someone else controls — cannot point Patchbay at its own
//! host or network.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;

use patchbay_host::CallError;
use toml::Spanned;

use crate::config::AllowConfig;

/// Why an operation is refused, naming the rule (flows see it as `not-allowed`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Denied {
    /// The rule that refused it: `allow.dial`, `allow.agents`, `allow.headers`.
    pub rule: &'static str,
    message: String,
}

impl From<Denied> for CallError {
    fn from(denied: Denied) -> Self {
        CallError::NotAllowed(denied.message)
    }
}

/// A host as written in a target or an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A DNS name, lowercased, without a trailing dot.
    Name(String),
    /// An IP address (an IPv4-mapped IPv6 address is taken as the IPv4 address).
    Ip(IpAddr),
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it maps (so that `[::ffff:10.0.0.1]` is
/// `10.0.0.1` to every rule).
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Parses a host: `[IPv6]`, a dotted-quad IPv4 address, or a DNS name whose last label starts
/// with a letter (RFC 3261 §25.1 `toplabel`). Anything else — `127.1`, `0x7f.0.0.1`,
/// `2130706433` — is refused: resolvers read such strings as addresses, and no rule would see
/// which.
pub fn parse_host(text: &str) -> Result<Host, String> {
    if let Some(inner) = text.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or_else(|| format!("{text:?}: no closing ]"))?;
        let ip: Ipv6Addr = inner.parse().map_err(|_| format!("{inner:?} is not an IPv6 address"))?;
        return Ok(Host::Ip(canonical(IpAddr::V6(ip))));
    }
    if let Ok(ip) = text.parse::<Ipv4Addr>() {
        return Ok(Host::Ip(IpAddr::V4(ip)));
    }
    let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    let top_is_a_name = name.rsplit('.').next().is_some_and(|top| top.starts_with(|c: char| c.is_ascii_alphabetic()));
    if name.len() > 253 || !name.split('.').all(label_ok) || !top_is_a_name {
        return Err(format!("{text:?} is neither a host name nor an IP address"));
    }
    Ok(Host::Name(name))
}

/// Whether `ip` is anything but a public unicast address: loopback, private (RFC 1918, RFC 4193),
/// carrier-grade NAT (RFC 6598), link-local, unspecified, multicast, broadcast, reserved, the
/// benchmarking and IETF protocol ranges; IPv6 forms that embed an IPv4 address (mapped,
/// compatible, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) are judged by that address.
pub fn is_internal(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || a == 0
                || a >= 240
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0)
                || (a == 198 && (b == 18 || b == 19))
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded =
                |hi: u16, lo: u16| is_internal(IpAddr::V4(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo))));
            v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local, fc00::/7
                || (s[0] & 0xffc0) == 0xfe80 // link-local, fe80::/10
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated), fec0::/10
                || (s[0] == 0x0100 && s[1..4] == [0, 0, 0]) // discard, 100::/64
                || (s[..6] == [0; 6] && embedded(s[6], s[7])) // IPv4-compatible, ::/96
                || (s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] && embedded(s[6], s[7])) // NAT64
                || (s[0] == 0x2002 && embedded(s[1], s[2])) // 6to4
        }
    }
}

/// `text` without the scheme `scheme` (compared case-insensitively), if it starts with it.
fn strip_scheme<'a>(text: &'a str, scheme: &str) -> Option<&'a str> {
    let head = text.get(..scheme.len())?;
    head.eq_ignore_ascii_case(scheme).then(|| &text[scheme.len()..])
}

/// Characters of a SIP URI's user part besides letters, digits and `%` escapes (RFC 3261 §25.1
/// `unreserved` and `user-unreserved`, less `;`, `?` and `/`, which a strict reader need not
/// take and a lax one may read as the start of something else).
const USER_MARKS: &str = "-_.!~*'()&=+$,";

/// Characters of a URI parameter's value besides letters, digits and `%` escapes (RFC 3261
/// §25.1 `paramchar`).
const PARAM_MARKS: &str = "-_.!~*'()[]/:&+$";

/// Whether `text` is letters, digits, `%HH` escapes and `marks`.
fn escaped_chars(text: &str, marks: &str) -> bool {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                if !bytes.get(i + 1..i + 3).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                    return false;
                }
                i += 3;
            }
            b if b.is_ascii_alphanumeric() || marks.as_bytes().contains(&b) => i += 1,
            _ => return false,
        }
    }
    true
}

/// `text` with its `%HH` escapes decoded, `None` when that is not UTF-8.
fn unescape(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn is_token(text: &str) -> bool {
    !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || "-.!%*_+`'~".contains(c))
}

/// Splits `host[:port]` (the host possibly `[IPv6]`); the port as written.
fn split_host_port(text: &str) -> Result<(&str, Option<&str>), String> {
    if text.starts_with('[') {
        let end = text.find(']').ok_or_else(|| format!("{text:?}: no closing ]"))?;
        let (host, rest) = text.split_at(end + 1);
        return match rest.strip_prefix(':') {
            Some(port) => Ok((host, Some(port))),
            None if rest.is_empty() => Ok((host, None)),
            None => Err(format!("{text:?}: unexpected {rest:?} after the address")),
        };
    }
    Ok(match text.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (text, None),
    })
}

fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(port) if port > 0 && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit()) => Ok(port),
        _ => Err(format!("port {text:?} is not 1 to 65535")),
    }
}

/// A `sip:` or `sips:` target, parsed strictly: `sip:[user@]host[:port][;name[=value]]…`.
///
/// Refused: URI headers (`?…`), a password, a `maddr` parameter (RFC 3261 §19.1.1: it sends
/// the request somewhere other than the host every rule looked at), `;`, `?` or `/` in the user
/// part, hosts that are neither a name nor an IP address ([`parse_host`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipUri {
    /// `sips:`.
    pub secure: bool,
    /// The user part as written (escapes kept); empty when there is none.
    pub user: String,
    /// The host.
    pub host: Host,
    /// The port, when written.
    pub port: Option<u16>,
    /// Parameters as written.
    pub params: Vec<(String, Option<String>)>,
}

impl SipUri {
    /// Parses `text` (see the type's docs).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (secure, rest) = match (strip_scheme(text, "sip:"), strip_scheme(text, "sips:")) {
            (Some(rest), _) => (false, rest),
            (None, Some(rest)) => (true, rest),
            _ => return Err("not a sip: or sips: URI".into()),
        };
        if rest.contains('?') {
            return Err("URI headers (?…) are not accepted".into());
        }
        let (main, params) = rest.split_once(';').map_or((rest, None), |(m, p)| (m, Some(p)));
        let (user, host_port) = match main.split_once('@') {
            Some((user, host_port)) => (user, host_port),
            None => ("", main),
        };
        if main.contains('@') {
            if user.is_empty() {
                return Err("empty user part".into());
            }
            if user.contains(':') {
                return Err("a password in the URI is not accepted".into());
            }
            if !escaped_chars(user, USER_MARKS) || unescape(user).is_none() {
                return Err(format!("user part {user:?} has characters a SIP user part cannot"));
            }
        }
        let (host, port) = split_host_port(host_port)?;
        let host = parse_host(host)?;
        let port = port.map(parse_port).transpose()?;
        let mut parsed = Vec::new();
        for param in params.into_iter().flat_map(|p| p.split(';')) {
            let (name, value) = param.split_once('=').map_or((param, None), |(n, v)| (n, Some(v)));
            if !is_token(name) || value.is_some_and(|v| v.is_empty() || !escaped_chars(v, PARAM_MARKS)) {
                return Err(format!("parameter {param:?} is not name[=value]"));
            }
            if name.eq_ignore_ascii_case("maddr") {
                return Err("a maddr parameter is not accepted (it would send the request elsewhere)".into());
            }
            parsed.push((name.to_owned(), value.map(str::to_owned)));
        }
        Ok(Self { secure, user: user.to_owned(), host, port, params: parsed })
    }

    /// The port the request goes to: the one written, or 5060 (5061 for `sips:`).
    pub fn port_or_default(&self) -> u16 {
        self.port.unwrap_or(if self.secure { 5061 } else { 5060 })
    }

    /// The user part with its escapes decoded (checked when parsed).
    pub fn user_decoded(&self) -> String {
        unescape(&self.user).unwrap_or_default()
    }

    /// The same URI for the SIP stack (built from this parse, not parsed again).
    pub fn to_rsip(&self) -> Result<rsip::Uri, String> {
        let host = match &self.host {
            Host::Name(name) => rsip::Host::Domain(name.clone().into()),
            Host::Ip(ip @ IpAddr::V4(_)) => rsip::Host::IpAddr(*ip),
            // rsip prints an address as is: brackets keep the port apart (RFC 3261 §19.1.1).
            Host::Ip(IpAddr::V6(ip)) => rsip::Host::Domain(format!("[{ip}]").into()),
        };
        let params = self
            .params
            .iter()
            .map(|(name, value)| rsip::Param::try_from((name.as_str(), value.as_deref())))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        Ok(rsip::Uri {
            scheme: Some(if self.secure { rsip::Scheme::Sips } else { rsip::Scheme::Sip }),
            auth: (!self.user.is_empty()).then(|| rsip::Auth { user: self.user.clone(), password: None }),
            host_with_port: rsip::HostWithPort { host, port: self.port.map(rsip::Port::from) },
            params,
            headers: Vec::new(),
        })
    }
}

impl std::fmt::Display for SipUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.secure { "sips:" } else { "sip:" })?;
        if !self.user.is_empty() {
            write!(f, "{}@", self.user)?;
        }
        write!(f, "{}", self.host)?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        for (name, value) in &self.params {
            match value {
                Some(value) => write!(f, ";{name}={value}")?,
                None => write!(f, ";{name}")?,
            }
        }
        Ok(())
    }
}

/// A `tel:` target (RFC 3966): its number without visual separators (`-`, `.`, `(`, `)`).
fn tel_number(text: &str) -> Result<String, String> {
    let rest = strip_scheme(text, "tel:").ok_or("not a tel: URI")?;
    let (number, params) = rest.split_once(';').map_or((rest, None), |(n, p)| (n, Some(p)));
    let digits: String = number.chars().filter(|c| !matches!(c, '-' | '.' | '(' | ')')).collect();
    let body = digits.strip_prefix('+').unwrap_or(&digits);
    if body.is_empty() || !body.chars().all(|c| c.is_ascii_digit() || matches!(c, '*' | '#')) {
        return Err(format!("{number:?} is not a telephone number"));
    }
    for param in params.into_iter().flat_map(|p| p.split(';')) {
        let (name, value) = param.split_once('=').map_or((param, None), |(n, v)| (n, Some(v)));
        if !is_token(name) || value.is_some_and(|v| !escaped_chars(v, PARAM_MARKS)) {
            return Err(format!("parameter {param:?} is not name[=value]"));
        }
    }
    Ok(digits)
}

/// An `ws://` or `wss://` agent URL, read with the same parser the connection uses (`http`'s
/// URI), its host then held to [`parse_host`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentUrl {
    /// `wss://`.
    pub tls: bool,
    /// The host.
    pub host: Host,
    /// The port: the one written, or 80 (443 for `wss://`).
    pub port: u16,
}

impl AgentUrl {
    /// Parses an agent endpoint.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: axum::http::Uri = url.parse().map_err(|_| "not a URL".to_owned())?;
        let tls = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err("the scheme must be ws or wss".into()),
        };
        let authority = uri.authority().ok_or("no host")?;
        if authority.as_str().contains('@') {
            return Err("credentials in the URL's authority are not accepted".into());
        }
        let host = parse_host(authority.host())?;
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Ok(Self { tls, host, port })
    }
}

impl std::fmt::Display for AgentUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}:{}", if self.tls { "wss" } else { "ws" }, self.host, self.port)
    }
}

/// `*` matches any run of characters (none included); `None` in the pattern is a `*`.
fn glob(pattern: &[Option<char>], text: &str) -> bool {
    let text: Vec<char> = text.chars().collect();
    let (mut p, mut t) = (0, 0);
    // Where the last `*` was, and the text position it has taken up to.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(Some(c)) if *c == text[t] => {
                p += 1;
                t += 1;
            }
            Some(None) => {
                star = Some((p, t));
                p += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(Option::is_none)
}

/// A glob from an entry: `*` is a wildcard; with `escapes`, `%HH` is decoded (after the
/// split on `*`, so `%2A` is a literal `*`). `None` for an escape that is not UTF-8.
fn compile_glob(text: &str, escapes: bool) -> Option<Vec<Option<char>>> {
    let mut out = Vec::new();
    for (i, piece) in text.split('*').enumerate() {
        if i > 0 {
            out.push(None);
        }
        let piece = if escapes { unescape(piece)? } else { piece.to_owned() };
        out.extend(piece.chars().map(Some));
    }
    Some(out)
}

/// Which hosts an entry names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// `*`: any host (public addresses only).
    Any,
    /// `*.example.com`: names under the domain, not the domain itself (public addresses only);
    /// held as `.example.com`.
    Under(String),
    /// The host itself (any address it resolves to).
    Exact(Host),
}

impl HostPattern {
    fn parse(text: &str) -> Result<Self, String> {
        if text == "*" {
            return Ok(Self::Any);
        }
        if let Some(domain) = text.strip_prefix("*.") {
            return match parse_host(domain)? {
                Host::Name(name) => Ok(Self::Under(format!(".{name}"))),
                Host::Ip(_) => Err(format!("{text:?}: a wildcard goes before a domain name, not an address")),
            };
        }
        if text.contains('*') {
            return Err(format!("{text:?}: a host is *, *.domain or a name or address without wildcards"));
        }
        parse_host(text).map(Self::Exact)
    }

    fn matches(&self, host: &Host) -> bool {
        match (self, host) {
            (Self::Any, _) => true,
            (Self::Under(suffix), Host::Name(name)) => name.ends_with(suffix.as_str()),
            (Self::Under(_), Host::Ip(_)) => false,
            (Self::Exact(exact), host) => exact == host,
        }
    }

    fn is_exact(&self) -> bool {
        matches!(self, Self::Exact(_))
    }
}

/// Which ports an entry names: absent is the scheme's default port only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortPattern {
    Default,
    Any,
    Exact(u16),
}

impl PortPattern {
    fn parse(text: Option<&str>) -> Result<Self, String> {
        match text {
            None => Ok(Self::Default),
            Some("*") => Ok(Self::Any),
            Some(port) => parse_port(port).map(Self::Exact),
        }
    }

    fn matches(self, port: u16, default: u16) -> bool {
        match self {
            Self::Default => port == default,
            Self::Any => true,
            Self::Exact(p) => p == port,
        }
    }
}

/// One `allow.dial` entry.
#[derive(Debug, Clone)]
enum DialRule {
    /// `sip:USER@HOST[:PORT]` / `sips:…`.
    Sip { secure: bool, user: Vec<Option<char>>, host: HostPattern, port: PortPattern, text: String },
    /// `tel:NUMBER` (transfer only: `dial` takes no `tel:`).
    Tel { number: Vec<Option<char>> },
    /// `trunk:NAME/NUMBER`: narrows what the tenant's trunks may call.
    Trunk { trunk: Option<String>, number: Vec<Option<char>> },
}

impl DialRule {
    fn parse(text: &str, trunks: &[&str]) -> Result<Self, String> {
        if let Some(rest) = strip_scheme(text, "trunk:") {
            let (name, number) = rest.split_once('/').ok_or("write trunk:NAME/NUMBER (NAME may be *)")?;
            let trunk = match name {
                "*" => None,
                name if trunks.contains(&name) => Some(name.to_owned()),
                name => return Err(format!("the tenant has no trunk {name:?}")),
            };
            let digits = number.strip_prefix('+').unwrap_or(number);
            if digits.is_empty()
                || !digits.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '*'))
            {
                return Err(format!("{number:?}: a number is digits, letters, '+', '-', '_', '.' and * wildcards"));
            }
            return Ok(Self::Trunk { trunk, number: compile_glob(number, false).unwrap_or_default() });
        }
        if strip_scheme(text, "tel:").is_some() {
            let number = tel_number(text)?;
            return Ok(Self::Tel { number: compile_glob(&number, false).unwrap_or_default() });
        }
        let (secure, rest) = match (strip_scheme(text, "sip:"), strip_scheme(text, "sips:")) {
            (Some(rest), _) => (false, rest),
            (None, Some(rest)) => (true, rest),
            _ => return Err("an entry is a sip:, sips:, tel: or trunk: pattern".into()),
        };
        if rest.contains([';', '?']) {
            return Err("an entry has no parameters or headers".into());
        }
        let (user, host_port) = rest.rsplit_once('@').unwrap_or(("", rest));
        if rest.contains('@') && (user.is_empty() || user.contains(':') || !escaped_chars(user, USER_MARKS)) {
            return Err(format!("user part {user:?}: write a user, or * for any"));
        }
        let user = compile_glob(user, true).ok_or_else(|| format!("user part {user:?}: a bad % escape"))?;
        let (host, port) = split_host_port(host_port)?;
        Ok(Self::Sip {
            secure,
            user,
            host: HostPattern::parse(host)?,
            port: PortPattern::parse(port)?,
            text: text.to_owned(),
        })
    }
}

/// One `allow.agents` entry: `ws://HOST[:PORT]` or `wss://…`.
#[derive(Debug, Clone)]
struct AgentRule {
    tls: bool,
    host: HostPattern,
    port: PortPattern,
    text: String,
}

impl AgentRule {
    fn parse(text: &str) -> Result<Self, String> {
        let (tls, rest) = match (strip_scheme(text, "ws://"), strip_scheme(text, "wss://")) {
            (Some(rest), _) => (false, rest),
            (None, Some(rest)) => (true, rest),
            _ => return Err("write ws://HOST[:PORT] or wss://HOST[:PORT]".into()),
        };
        let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
        if !path.is_empty() || authority.contains(['?', '#']) {
            return Err("an entry is an origin, scheme://HOST[:PORT]: paths are not matched".into());
        }
        if authority.contains('@') {
            return Err("no credentials in an entry".into());
        }
        let (host, port) = split_host_port(authority)?;
        Ok(Self { tls, host: HostPattern::parse(host)?, port: PortPattern::parse(port)?, text: text.to_owned() })
    }
}

/// What the entries say about a target before its host is resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// An entry names the host itself: any address it resolves to.
    Listed,
    /// Only entries with a wildcard host match (the first is named): public addresses only.
    Wildcard(String),
    /// No entry matches.
    NotListed,
}

impl Verdict {
    /// Whether the target may go to `ip` under this verdict.
    pub fn admits(&self, ip: IpAddr) -> bool {
        match self {
            Verdict::Listed => true,
            Verdict::Wildcard(_) => !is_internal(ip),
            Verdict::NotListed => false,
        }
    }
}

/// A tenant's capabilities (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Capabilities {
    tenant: String,
    dial: Vec<DialRule>,
    agents: Vec<AgentRule>,
    /// `None`: the host's own rule only (`X-` headers and `User-to-User`).
    headers: Option<Vec<Vec<Option<char>>>>,
    /// RTP may go to a private address an SDP names (`[tenant.allow] private_media`).
    private_media: bool,
}

/// An entry's error: its span and the message.
type EntryError = (Range<usize>, String);

/// Parses each entry of `tenant.allow.<field>`; an error names the field and the entry.
fn parse_entries<T>(
    field: &str,
    entries: &[Spanned<String>],
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, EntryError> {
    entries
        .iter()
        .map(|entry| {
            parse(entry.get_ref())
                .map_err(|m| (entry.span(), format!("tenant.allow.{field}: {:?}: {m}", entry.get_ref())))
        })
        .collect()
}

/// One `allow.headers` entry: an `X-` header name, or a prefix ending in `*`, or `User-to-User`
/// (a capability narrows the host's own rule, see `crate::dial::check_header`, never widens
/// it); matched case-insensitively.
fn header_rule(name: &str) -> Result<Vec<Option<char>>, String> {
    let stem = name.strip_suffix('*').unwrap_or(name);
    let x_header = stem.len() > 2 && stem.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("x-")) && !stem.contains('*');
    if !is_token(name) || !(x_header || name.eq_ignore_ascii_case("user-to-user")) {
        return Err("flows may set X- headers (a trailing * for a prefix) and User-to-User only".into());
    }
    Ok(compile_glob(&name.to_ascii_lowercase(), false).unwrap_or_default())
}

impl Capabilities {
    /// Whether RTP may go to a private address an SDP names that the signalling did not come
    /// from (`[tenant.allow] private_media`).
    pub fn private_media(&self) -> bool {
        self.private_media
    }

    /// The capabilities `[tenant.allow]` gives tenant `tenant`, whose trunks are `trunks`.
    pub fn from_config(tenant: &str, allow: &AllowConfig, trunks: &[&str]) -> Result<Self, EntryError> {
        let dial = parse_entries("dial", &allow.dial, |entry| DialRule::parse(entry, trunks))?;
        let agents = parse_entries("agents", &allow.agents, AgentRule::parse)?;
        let headers = allow.headers.as_ref().map(|h| parse_entries("headers", h, header_rule)).transpose()?;
        Ok(Self { tenant: tenant.to_owned(), dial, agents, headers, private_media: allow.private_media })
    }

    /// A refusal under `rule`.
    fn denied(&self, rule: &'static str, message: String) -> Denied {
        Denied { rule, message }
    }

    /// What `allow.dial` says about a `sip:`/`sips:` target.
    pub fn sip_verdict(&self, uri: &SipUri) -> Verdict {
        let user = uri.user_decoded();
        let mut verdict = Verdict::NotListed;
        for rule in &self.dial {
            let DialRule::Sip { secure, user: users, host, port, text } = rule else { continue };
            let default = if *secure { 5061 } else { 5060 };
            if *secure == uri.secure
                && glob(users, &user)
                && host.matches(&uri.host)
                && port.matches(uri.port_or_default(), default)
            {
                if host.is_exact() {
                    return Verdict::Listed;
                }
                if verdict == Verdict::NotListed {
                    verdict = Verdict::Wildcard(text.clone());
                }
            }
        }
        verdict
    }

    /// The refusal of a `sip:` target no entry lists (`what`: "dial target", "transfer target").
    pub fn not_listed(&self, what: &str, target: &str) -> Denied {
        self.denied(
            "allow.dial",
            format!("{what} {target} is not in tenant {}'s allow.dial (nor one of its own flows)", self.tenant),
        )
    }

    /// The refusal of a target a wildcard entry matches that resolved to an internal address.
    pub fn internal(&self, rule: &'static str, what: &str, target: &str, ip: IpAddr, entry: &str) -> Denied {
        self.denied(
            rule,
            format!(
                "{what} {target} resolves to {ip}, a loopback, private or otherwise internal address: tenant {}'s \
                 {rule} entry {entry:?} has a wildcard host, and only an entry naming the host reaches such addresses",
                self.tenant
            ),
        )
    }

    /// Whether a `tel:` target (transfer only) is allowed.
    pub fn check_tel(&self, what: &str, target: &str) -> Result<(), Denied> {
        let number = tel_number(target).map_err(|m| self.denied("allow.dial", format!("{what} {target}: {m}")))?;
        let listed =
            self.dial.iter().any(|rule| matches!(rule, DialRule::Tel { number: pattern } if glob(pattern, &number)));
        if listed { Ok(()) } else { Err(self.not_listed_plain(what, target)) }
    }

    fn not_listed_plain(&self, what: &str, target: &str) -> Denied {
        self.denied("allow.dial", format!("{what} {target} is not in tenant {}'s allow.dial", self.tenant))
    }

    /// Whether `number` may be called through the tenant's own trunk `trunk`: always, unless
    /// `allow.dial` has `trunk:` entries; then one of them must match.
    pub fn check_trunk(&self, what: &str, trunk: &str, number: &str) -> Result<(), Denied> {
        let mut narrowed = false;
        for rule in &self.dial {
            if let DialRule::Trunk { trunk: name, number: pattern } = rule {
                narrowed = true;
                if name.as_deref().is_none_or(|n| n == trunk) && glob(pattern, number) {
                    return Ok(());
                }
            }
        }
        if !narrowed {
            return Ok(());
        }
        Err(self.denied(
            "allow.dial",
            format!(
                "{what} trunk:{trunk}/{number} is not in tenant {}'s allow.dial (its trunk: entries limit the numbers \
                 its trunks may call)",
                self.tenant
            ),
        ))
    }

    /// What `allow.agents` says about an agent endpoint: [`Verdict::NotListed`] is refused here.
    pub fn agent_verdict(&self, url: &AgentUrl, endpoint: &str) -> Result<Verdict, Denied> {
        let mut verdict = Verdict::NotListed;
        for rule in &self.agents {
            let default = if rule.tls { 443 } else { 80 };
            if rule.tls == url.tls && rule.host.matches(&url.host) && rule.port.matches(url.port, default) {
                if rule.host.is_exact() {
                    return Ok(Verdict::Listed);
                }
                if verdict == Verdict::NotListed {
                    verdict = Verdict::Wildcard(rule.text.clone());
                }
            }
        }
        if verdict == Verdict::NotListed {
            return Err(self.denied(
                "allow.agents",
                format!("agent {endpoint} ({url}) is not in tenant {}'s allow.agents", self.tenant),
            ));
        }
        Ok(verdict)
    }

    /// Whether a flow may set the header `name` (after the host's own rule, `X-` headers and
    /// `User-to-User`, has passed it): any such header without `allow.headers`, else only
    /// those it lists.
    pub fn check_header(&self, name: &str) -> Result<(), Denied> {
        let Some(allowed) = &self.headers else { return Ok(()) };
        let name_lower = name.to_ascii_lowercase();
        if allowed.iter().any(|pattern| glob(pattern, &name_lower)) {
            return Ok(());
        }
        Err(self.denied("allow.headers", format!("header {name} is not in tenant {}'s allow.headers", self.tenant)))
    }
}

/// Where Patchbay itself listens for SIP, to tell a target that is one of a tenant's own flows
/// on this host.
#[derive(Debug, Clone, Default)]
pub struct LocalAddresses {
    listeners: Vec<SocketAddr>,
    external_ip: Option<IpAddr>,
}

impl LocalAddresses {
    /// Our SIP listeners' addresses and `[sip] external_ip`.
    pub fn new(listeners: Vec<SocketAddr>, external_ip: Option<IpAddr>) -> Self {
        Self { listeners, external_ip }
    }

    /// Whether a request sent to `peer` reaches one of our listeners: its address and port,
    /// or — for a listener on the unspecified address — its port on a loopback address or on
    /// `external_ip`. (A listener on port 0 is never matched: its port is not known here.)
    pub fn contains(&self, peer: SocketAddr) -> bool {
        let ip = canonical(peer.ip());
        self.listeners.iter().any(|listener| {
            listener.port() == peer.port()
                && listener.port() != 0
                && (canonical(listener.ip()) == ip
                    || (listener.ip().is_unspecified() && (ip.is_loopback() || Some(ip) == self.external_ip)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(dial: &[&str], agents: &[&str], headers: Option<&[&str]>) -> Capabilities {
        let spanned = |v: &[&str]| v.iter().map(|s| Spanned::new(0..0, (*s).to_owned())).collect();
        let allow = AllowConfig {
            dial: spanned(dial),
            agents: spanned(agents),
            headers: headers.map(spanned),
            private_media: false,
        };
        Capabilities::from_config("acme", &allow, &["carrier"]).expect("valid entries")
    }

    fn sip(text: &str) -> SipUri {
        SipUri::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    #[test]
    fn targets_parse_strictly() {
        let uri = sip("sip:John.Doe@PBX.Example.COM.:5080;transport=udp");
        assert_eq!(uri.user, "John.Doe");
        assert_eq!(uri.host, Host::Name("pbx.example.com".into()));
        assert_eq!(uri.port, Some(5080));
        assert_eq!(uri.to_string(), "sip:John.Doe@pbx.example.com:5080;transport=udp");
        assert_eq!(sip("sips:[::1]").host, Host::Ip(ip("::1")));
        assert_eq!(sip("sips:[::1]").port_or_default(), 5061);
        assert_eq!(sip("sip:a@[::ffff:10.0.0.1]:5060").host, Host::Ip(ip("10.0.0.1")));
        assert_eq!(sip("SIP:%61lice@h.example").user_decoded(), "alice");
        for bad in [
            "sip:a@b?Route=%3Csip:evil%3E",
            "sip:a@b;maddr=evil.example",
            "sip:a:secret@b.example",
            "sip:a;x=1@b.example",
            "sip:a@127.1",
            "sip:a@0x7f.0.0.1",
            "sip:a@2130706433",
            "sip:a@b.example:0",
            "sip:a@b.example:99999",
            "sip:@b.example",
            "sip:a@b@c.example",
            "sip:a@[::1",
            "sip:a b@c.example",
            "sip:a@-b.example",
            "sip:a@%00.example",
            "tel:+1555",
        ] {
            assert!(SipUri::parse(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn rsip_gets_the_uri_that_was_checked() {
        let uri = sip("sip:first.last@[2001:db8::1]:5070;transport=tcp").to_rsip().expect("rsip");
        assert_eq!(uri.to_string(), "sip:first.last@[2001:db8::1]:5070;transport=TCP");
        assert_eq!(sip("sip:bob@127.0.0.1").to_rsip().expect("rsip").to_string(), "sip:bob@127.0.0.1");
    }

    #[test]
    fn wildcards_match_users_and_hosts_and_ports_default() {
        let caps = caps(
            &[
                "sip:*@10.0.0.20",
                "sip:sales@pbx.example.com",
                "sip:+1555*@*.carrier.example:*",
                "sip:ops@[2001:db8::5]",
            ],
            &[],
            None,
        );
        let verdict = |t: &str| caps.sip_verdict(&sip(t));
        assert_eq!(verdict("sip:anyone@10.0.0.20"), Verdict::Listed);
        assert_eq!(verdict("sip:10.0.0.20"), Verdict::Listed, "* matches no user too");
        assert_eq!(verdict("sip:anyone@10.0.0.20:5060"), Verdict::Listed);
        assert_eq!(verdict("sip:anyone@10.0.0.20:5080"), Verdict::NotListed, "no port in the entry: 5060 only");
        assert_eq!(verdict("sips:anyone@10.0.0.20"), Verdict::NotListed, "the scheme is part of the entry");
        assert_eq!(verdict("sip:sales@PBX.example.com"), Verdict::Listed, "hosts compare case-insensitively");
        assert_eq!(verdict("sip:Sales@pbx.example.com"), Verdict::NotListed, "users do not (RFC 3261 §19.1.4)");
        assert_eq!(verdict("sip:%73ales@pbx.example.com"), Verdict::Listed, "escapes are decoded");
        assert_eq!(verdict("sip:sales@pbx.example.com.evil.example"), Verdict::NotListed);
        assert_eq!(verdict("sip:sales@evilpbx.example.com"), Verdict::NotListed);
        let wildcard = Verdict::Wildcard("sip:+1555*@*.carrier.example:*".into());
        assert_eq!(verdict("sip:+15551234@gw1.carrier.example:5070"), wildcard);
        assert_eq!(verdict("sip:+1555@a.b.carrier.example"), wildcard);
        assert_eq!(verdict("sip:+15551234@carrier.example"), Verdict::NotListed, "*.d is names under d");
        assert_eq!(verdict("sip:+1666@gw1.carrier.example"), Verdict::NotListed);
        assert_eq!(verdict("sip:ops@[2001:db8:0::5]"), Verdict::Listed, "addresses compare as addresses");
        assert_eq!(verdict("sip:ops@[2001:db8::6]"), Verdict::NotListed);
    }

    #[test]
    fn a_wildcard_host_reaches_public_addresses_only() {
        let caps = caps(&["sip:*@*"], &[], None);
        let verdict = caps.sip_verdict(&sip("sip:x@198.51.100.7"));
        assert_eq!(verdict, Verdict::Wildcard("sip:*@*".into()));
        assert!(verdict.admits(ip("198.51.100.7")));
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
            "2002:c0a8:101::1",
        ] {
            assert!(!verdict.admits(ip(internal)), "{internal} admitted");
        }
        assert!(!is_internal(ip("2001:4860:4860::8888")));
        assert!(Verdict::Listed.admits(ip("127.0.0.1")));
    }

    #[test]
    fn nothing_is_allowed_by_default() {
        let none = caps(&[], &[], None);
        assert_eq!(none.sip_verdict(&sip("sip:echo@127.0.0.1")), Verdict::NotListed);
        assert!(none.check_tel("transfer target", "tel:+15551234").is_err());
        let url = AgentUrl::parse("ws://127.0.0.1:8765/agent").expect("url");
        let denied = none.agent_verdict(&url, "ws://127.0.0.1:8765/agent").expect_err("no agents");
        assert_eq!(denied.rule, "allow.agents");
        assert!(denied.to_string().contains("not in tenant acme's allow.agents"), "{denied}");
        assert!(none.check_header("X-Anything").is_ok(), "without allow.headers the host's own rule decides");
        assert!(none.check_trunk("dial target", "carrier", "+882123").is_ok(), "own trunks are open by default");
    }

    #[test]
    fn trunk_entries_narrow_the_numbers_trunks_may_call() {
        let caps = caps(&["trunk:carrier/+1*", "trunk:*/911"], &[], None);
        assert!(caps.check_trunk("dial target", "carrier", "+15551234567").is_ok());
        assert!(caps.check_trunk("dial target", "other", "911").is_ok());
        let denied = caps.check_trunk("dial target", "carrier", "+88212345").expect_err("premium");
        assert!(denied.to_string().contains("trunk:carrier/+88212345 is not in tenant acme's allow.dial"), "{denied}");
    }

    #[test]
    fn tel_targets_match_without_visual_separators() {
        let caps = caps(&["tel:+1-555-*"], &[], None);
        assert!(caps.check_tel("transfer target", "tel:+1(555)123-4567").is_ok());
        assert!(caps.check_tel("transfer target", "tel:+1556").is_err());
    }

    #[test]
    fn agents_are_origins_and_wildcards_need_public_addresses() {
        let caps = caps(&[], &["wss://agent.example.com", "ws://127.0.0.1:8765", "wss://*.agents.example:*"], None);
        let verdict = |u: &str| caps.agent_verdict(&AgentUrl::parse(u).expect(u), u);
        assert_eq!(verdict("wss://AGENT.example.com/voice?x=1"), Ok(Verdict::Listed));
        assert_eq!(verdict("wss://agent.example.com:443/"), Ok(Verdict::Listed));
        assert!(verdict("wss://agent.example.com:8443/").is_err(), "no port in the entry: 443 only");
        assert!(verdict("ws://agent.example.com/").is_err(), "the scheme is part of the entry");
        assert_eq!(verdict("ws://127.0.0.1:8765/agent"), Ok(Verdict::Listed));
        assert!(verdict("ws://127.0.0.1:8766/agent").is_err());
        assert!(verdict("ws://localhost:8765/agent").is_err(), "names and addresses are different hosts");
        let wildcard = verdict("wss://eu.agents.example:9000/x").expect("wildcard");
        assert!(!wildcard.admits(ip("10.0.0.1")) && wildcard.admits(ip("198.51.100.9")));
        for bad in ["http://agent.example.com", "wss://user@agent.example.com/", "wss://2130706433/", "agent"] {
            assert!(AgentUrl::parse(bad).is_err(), "{bad} parsed");
        }
        assert_eq!(AgentUrl::parse("ws://[::1]:9/a").expect("v6").host, Host::Ip(ip("::1")));
    }

    #[test]
    fn headers_narrow_to_the_listed_names() {
        let caps = caps(&[], &[], Some(&["X-Customer-Id", "X-Acme-*", "User-to-User"]));
        assert!(caps.check_header("x-customer-id").is_ok());
        assert!(caps.check_header("X-Acme-Campaign").is_ok());
        assert!(caps.check_header("User-to-User").is_ok());
        let denied = caps.check_header("X-Other").expect_err("not listed");
        assert_eq!(denied.to_string(), "header X-Other is not in tenant acme's allow.headers");
    }

    #[test]
    fn bad_entries_are_refused() {
        let parse = |dial: &[&str], agents: &[&str], headers: Option<&[&str]>| {
            let spanned = |v: &[&str]| v.iter().map(|s| Spanned::new(0..0, (*s).to_owned())).collect();
            let allow = AllowConfig {
                dial: spanned(dial),
                agents: spanned(agents),
                headers: headers.map(spanned),
                private_media: false,
            };
            Capabilities::from_config("acme", &allow, &["carrier"]).map(|_| ()).map_err(|(_, m)| m)
        };
        for (dial, says) in [
            ("sip:*@evil*.example", "a host is *, *.domain or"),
            ("sip:*@*.10.0.0.1", "not an address"),
            ("sip:a@b.example;transport=tcp", "no parameters"),
            ("http://x", "sip:, sips:, tel: or trunk:"),
            ("trunk:other/+1*", "no trunk \"other\""),
            ("sip:*@127.1", "neither a host name nor an IP address"),
            ("sip:*@h.example:70000", "port"),
        ] {
            let err = parse(&[dial], &[], None).expect_err(dial);
            assert!(err.starts_with("tenant.allow.dial: ") && err.contains(says), "{dial}: {err}");
        }
        let err = parse(&[], &["ws://127.0.0.1:8765/agent"], None).expect_err("a path");
        assert!(err.contains("paths are not matched"), "{err}");
        let err = parse(&[], &[], Some(&["P-Asserted-Identity"])).expect_err("an identity header");
        assert!(err.starts_with("tenant.allow.headers: "), "{err}");
        assert!(parse(&["sip:*@*:*", "tel:*", "trunk:*/*"], &["wss://*"], Some(&[])).is_ok());
    }

    #[test]
    fn our_own_addresses() {
        let local = LocalAddresses::new(
            vec!["127.0.0.1:5060".parse().expect("a"), "0.0.0.0:5070".parse().expect("b")],
            Some(ip("203.0.113.10")),
        );
        assert!(local.contains("127.0.0.1:5060".parse().expect("a")));
        assert!(!local.contains("127.0.0.1:5061".parse().expect("a")));
        assert!(!local.contains("127.0.0.2:5060".parse().expect("a")));
        assert!(local.contains("127.0.0.1:5070".parse().expect("a")), "an unspecified listener: loopback");
        assert!(local.contains("203.0.113.10:5070".parse().expect("a")), "... and external_ip");
        assert!(!local.contains("198.51.100.1:5070".parse().expect("a")));
    }
}

/// A source trusted without credentials (`[tenant.auth] trusted`): `ADDRESS`, `ADDRESS/PREFIX`
/// (a network), optionally behind `tcp:` or `tls:`. Over UDP a source address proves nothing —
/// anyone who can reach us can write any address into a datagram — so a plain entry is safe
/// only for a network whose edge drops packets claiming it from outside (ingress filtering,
/// BCP 38). `tcp:` trusts only TCP or TLS connections from it (the handshake proves the
/// address can receive), `tls:` only TLS.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct TrustedSource {
    /// What the connection must be: `None` any transport; `Some(Tcp)` TCP or TLS; `Some(Tls)` TLS.
    over: Option<patchbay_sip::transaction::Transport>,
    network: std::net::IpAddr,
    prefix: u8,
}

impl TrustedSource {
    /// Whether a request from `from` comes from this source.
    pub fn matches(&self, from: patchbay_sip::transaction::Peer) -> bool {
        use patchbay_sip::transaction::Transport;
        let over = match self.over {
            None => true,
            Some(Transport::Tls) => from.transport == Transport::Tls,
            Some(_) => from.transport.is_reliable(),
        };
        over && in_network(from.addr.ip(), self.network, self.prefix)
    }
}

fn in_network(ip: std::net::IpAddr, network: std::net::IpAddr, prefix: u8) -> bool {
    match (ip.to_canonical(), network) {
        (std::net::IpAddr::V4(ip), std::net::IpAddr::V4(net)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (std::net::IpAddr::V6(ip), std::net::IpAddr::V6(net)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

impl std::str::FromStr for TrustedSource {
    type Err = String;

    fn from_str(entry: &str) -> Result<Self, String> {
        use patchbay_sip::transaction::Transport;
        let (over, rest) = match entry.split_once(':') {
            Some(("tcp", rest)) => (Some(Transport::Tcp), rest),
            Some(("tls", rest)) => (Some(Transport::Tls), rest),
            _ => (None, entry),
        };
        let (address, prefix) = match rest.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (rest, None),
        };
        let written: std::net::IpAddr =
            address.parse().map_err(|_| format!("{entry:?}: not [tcp:|tls:]ADDRESS[/PREFIX]"))?;
        // `::ffff:a.b.c.d` is an IPv4 address (sources are compared canonicalised); its prefix
        // then counts IPv4 bits.
        let network = written.to_canonical();
        if written.is_ipv6() && network.is_ipv4() && prefix.is_some() {
            return Err(format!("{entry:?}: write an IPv4 network as a.b.c.d/n"));
        }
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{entry:?}: the prefix must be 0 to {max}"))?,
        };
        Ok(Self { over, network, prefix })
    }
}

impl TryFrom<String> for TrustedSource {
    type Error = String;

    fn try_from(entry: String) -> Result<Self, String> {
        entry.parse()
    }
}

#[cfg(test)]
mod trusted_tests {
    use patchbay_sip::transaction::{Peer, Transport};

    use super::TrustedSource;

    fn peer(transport: Transport, addr: &str) -> Peer {
        Peer { transport, addr: addr.parse().expect("addr") }
    }

    #[test]
    fn trusted_sources_by_network_and_by_connection() {
        let net: TrustedSource = "10.1.0.0/16".parse().expect("network");
        assert!(net.matches(peer(Transport::Udp, "10.1.200.3:5060")));
        assert!(!net.matches(peer(Transport::Udp, "10.2.0.1:5060")));
        let one: TrustedSource = "203.0.113.5".parse().expect("address");
        assert!(one.matches(peer(Transport::Udp, "203.0.113.5:5060")));
        assert!(!one.matches(peer(Transport::Udp, "203.0.113.6:5060")));
        // By connection: a spoofed datagram claiming the address is not enough.
        let tcp: TrustedSource = "tcp:203.0.113.5".parse().expect("tcp");
        assert!(!tcp.matches(peer(Transport::Udp, "203.0.113.5:5060")));
        assert!(tcp.matches(peer(Transport::Tcp, "203.0.113.5:40000")));
        assert!(tcp.matches(peer(Transport::Tls, "203.0.113.5:40000")));
        let tls: TrustedSource = "tls:2001:db8::/32".parse().expect("tls network");
        assert!(tls.matches(peer(Transport::Tls, "[2001:db8:1::5]:5061")));
        assert!(!tls.matches(peer(Transport::Tcp, "[2001:db8:1::5]:5061")));
        let mapped: TrustedSource = "::ffff:203.0.113.5".parse().expect("mapped");
        assert!(mapped.matches(peer(Transport::Udp, "203.0.113.5:5060")), "an IPv4-mapped entry is the IPv4 address");
        for bad in ["10.0.0.0/33", "tcp:", "udp:1.2.3.4", "1.2.3.4/x", "::ffff:10.0.0.0/104"] {
            assert!(bad.parse::<TrustedSource>().is_err(), "{bad}");
        }
    }
}
