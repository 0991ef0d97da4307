//! The auth-param lexer shared by challenges and credentials (RFC 3261 §25.1, RFC 7235 §2.1).
//!
//! One header value may carry several challenges (`Digest …, Digest …, Basic …`), so the
//! lexer splits it into schemes, each with its `name=value` list. It is deliberately lenient
//! where deployed peers differ from the grammar (quoted or unquoted values, missing commas,
//! folded whitespace) and strict where leniency would be a security problem (unterminated
//! quoted strings, duplicate parameters).

use std::borrow::Cow;

use super::AuthError;

/// One `name=value` pair; `value` is unquoted and unescaped.
#[derive(Debug)]
pub(crate) struct Param<'a> {
    pub(crate) name: &'a str,
    pub(crate) value: Cow<'a, str>,
}

/// One challenge or credentials: an auth scheme and its parameters.
#[derive(Debug)]
pub(crate) struct AuthValue<'a> {
    pub(crate) scheme: &'a str,
    pub(crate) params: Vec<Param<'a>>,
}

impl<'a> AuthValue<'a> {
    pub(crate) fn is_digest(&self) -> bool {
        self.scheme.eq_ignore_ascii_case("Digest")
    }

    /// The value of `name` (case-insensitive, RFC 7616 §3.3). A parameter given twice is an
    /// error rather than "first wins": RFC 7616 §3.3 forbids repeats, and two elements picking
    /// different copies is how parser-differential attacks start.
    pub(crate) fn get(&self, name: &str) -> Result<Option<&str>, AuthError> {
        let mut found = None;
        for param in self.params.iter().filter(|p| p.name.eq_ignore_ascii_case(name)) {
            if found.is_some() {
                return Err(AuthError::Malformed("duplicate parameter"));
            }
            found = Some(param.value.as_ref());
        }
        Ok(found)
    }

    pub(crate) fn require(&self, name: &str, missing: &'static str) -> Result<&str, AuthError> {
        self.get(name)?.ok_or(AuthError::Malformed(missing))
    }
}

/// RFC 3261 §25.1 `token` characters.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~')
}

/// LWS; CR and LF are included so a value that still carries header folding parses.
fn is_lws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn skip_while(bytes: &[u8], mut i: usize, pred: impl Fn(u8) -> bool) -> usize {
    while bytes.get(i).is_some_and(|&b| pred(b)) {
        i += 1;
    }
    i
}

/// Parses a quoted-string body starting just after the opening quote; returns the unescaped
/// value and the index just past the closing quote. Only values that contain a quoted-pair
/// (RFC 3261 §25.1) are copied.
fn quoted(input: &str, start: usize) -> Result<(Cow<'_, str>, usize), AuthError> {
    let body = input.get(start..).ok_or(AuthError::Malformed("unterminated quoted string"))?;
    let mut owned: Option<String> = None;
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => {
                let value = match owned {
                    Some(s) => Cow::Owned(s),
                    None => Cow::Borrowed(&body[..i]),
                };
                return Ok((value, start + i + 1));
            }
            '\\' => {
                let (_, escaped) = chars.next().ok_or(AuthError::Malformed("unterminated quoted string"))?;
                if escaped.is_control() && escaped != '\t' {
                    return Err(AuthError::Malformed("control character in quoted string"));
                }
                owned.get_or_insert_with(|| body[..i].to_owned()).push(escaped);
            }
            // qdtext excludes CTLs other than LWS; CR/LF inside a value means a broken or
            // hostile header, not something to carry into a digest.
            c if c.is_control() && c != '\t' => {
                return Err(AuthError::Malformed("control character in quoted string"));
            }
            c => {
                if let Some(s) = owned.as_mut() {
                    s.push(c);
                }
            }
        }
    }
    Err(AuthError::Malformed("unterminated quoted string"))
}

/// Splits a `WWW-Authenticate`, `Proxy-Authenticate`, `Authorization` or
/// `Proxy-Authorization` value into its schemes and parameters.
pub(crate) fn parse_auth_values(input: &str) -> Result<Vec<AuthValue<'_>>, AuthError> {
    let bytes = input.as_bytes();
    let mut out: Vec<AuthValue<'_>> = Vec::new();
    let mut i = 0;
    loop {
        i = skip_while(bytes, i, |b| b == b',' || is_lws(b));
        if i >= bytes.len() {
            return Ok(out);
        }
        let start = i;
        i = skip_while(bytes, i, is_token_byte);
        if i == start {
            return Err(AuthError::Malformed("expected a token"));
        }
        let name = &input[start..i];
        let after_name = skip_while(bytes, i, is_lws);
        if bytes.get(after_name) != Some(&b'=') {
            out.push(AuthValue { scheme: name, params: Vec::new() });
            i = after_name;
            continue;
        }
        let mut k = skip_while(bytes, after_name + 1, is_lws);
        let current = out.last_mut().ok_or(AuthError::Malformed("parameter before auth scheme"))?;
        match bytes.get(k) {
            // token68 padding of another scheme (`Basic dXNlcg==`): nothing for us to keep.
            None | Some(b',') | Some(b'=') => {
                if current.is_digest() {
                    return Err(AuthError::Malformed("empty parameter value"));
                }
                i = skip_while(bytes, k, |b| b == b'=');
            }
            Some(b'"') => {
                let (value, end) = quoted(input, k + 1)?;
                current.params.push(Param { name, value });
                i = end;
            }
            Some(_) => {
                // Unquoted values are tokens in the grammar, but servers in the field also send
                // unquoted realms and URIs; read up to the next separator.
                let value_start = k;
                k = skip_while(bytes, k, |b| b != b',' && !is_lws(b) && b != b'"');
                current.params.push(Param { name, value: Cow::Borrowed(&input[value_start..k]) });
                i = k;
            }
        }
    }
}

/// Writes `value` as a quoted-string, escaping `"` and `\` (RFC 3261 §25.1 quoted-pair).
pub(crate) fn write_quoted(f: &mut std::fmt::Formatter<'_>, value: &str) -> std::fmt::Result {
    use std::fmt::Write;
    f.write_char('"')?;
    let mut rest = value;
    while let Some(pos) = rest.find(['"', '\\']) {
        f.write_str(&rest[..pos])?;
        f.write_char('\\')?;
        f.write_str(&rest[pos..pos + 1])?;
        rest = &rest[pos + 1..];
    }
    f.write_str(rest)?;
    f.write_char('"')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_multiple_schemes_and_unescapes() {
        let values =
            parse_auth_values(r#"Basic dXNlcg==, Digest REALM="a\"b\\c", nonce=xyz ,Digest realm="r""#).unwrap();
        assert_eq!(values.len(), 3);
        assert!(!values[0].is_digest());
        assert_eq!(values[1].get("realm").unwrap(), Some("a\"b\\c"));
        assert_eq!(values[1].get("NONCE").unwrap(), Some("xyz"));
        assert_eq!(values[2].get("realm").unwrap(), Some("r"));
    }

    #[test]
    fn rejects_broken_input() {
        assert!(parse_auth_values(r#"Digest realm="abc"#).is_err());
        assert!(parse_auth_values(r#"Digest realm="a\"#).is_err());
        assert!(parse_auth_values("realm=\"a\"").is_err());
        assert!(parse_auth_values("Digest realm=").is_err());
        assert!(parse_auth_values("Digest realm=\"a\r\nb\"").is_err());
        let dup = parse_auth_values(r#"Digest realm="a", Realm="b""#).unwrap();
        assert!(dup[0].get("realm").is_err());
    }
}
