//! Envelope address syntax (RFC 5321 `Path`, `Mailbox`, with RFC 6531 UTF-8 when allowed), on borrowed bytes.
//!
//! The parser returns the mailbox with any source route removed (RFC 5321 §4.1.1.3: servers ignore routes) and
//! reports the facts that matter to relay policy: whether the local part was quoted and whether it holds
//! characters that some MTAs treat as routing (`@`, `%`, `!`).

use crate::limits;

/// A parsed mailbox, borrowing from the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mailbox<'a> {
    /// The local part as written (quotes included when quoted).
    pub local: &'a str,
    pub domain: &'a str,
    pub quoted: bool,
    /// The local part (dequoted) holds `@`, `%` or `!`: forms that have been used to trick relays.
    pub routing_chars: bool,
    /// Non-ASCII bytes appear (needs SMTPUTF8).
    pub utf8: bool,
    /// A source route (`@a,@b:`) was present and removed.
    pub had_route: bool,
}

impl Mailbox<'_> {
    /// `local@domain` as an owned string, the domain in lower case.
    pub fn to_canonical(&self) -> String {
        let mut s = String::with_capacity(self.local.len() + 1 + self.domain.len());
        s.push_str(self.local);
        s.push('@');
        for c in self.domain.chars() {
            s.extend(c.to_lowercase());
        }
        s
    }
}

/// A `Reverse-path` / `Forward-path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path<'a> {
    /// `<>`: the null sender.
    Null,
    Mailbox(Mailbox<'a>),
    /// `<Postmaster>` without a domain (RFC 5321 §4.1.1.3; valid as a recipient only).
    Postmaster,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("address not enclosed in <>")]
    NoBrackets,
    #[error("bad address syntax")]
    Syntax,
    #[error("address too long")]
    TooLong,
    #[error("non-ASCII address without SMTPUTF8")]
    NeedsUtf8,
}

fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b)
}

/// Parses `<...>` at the start of `s`; returns the path and the rest of the line (parameters).
pub fn parse_path(s: &str, utf8_allowed: bool) -> Result<(Path<'_>, &str), AddressError> {
    let s = s.trim_start_matches(' ');
    let bytes = s.as_bytes();
    if bytes.first() != Some(&b'<') {
        return Err(AddressError::NoBrackets);
    }
    // Find the closing '>' outside a quoted string.
    let mut i = 1;
    let mut in_quote = false;
    let end = loop {
        match bytes.get(i) {
            None => return Err(AddressError::Syntax),
            Some(b'\\') if in_quote => i += 2,
            Some(b'"') => {
                in_quote = !in_quote;
                i += 1
            }
            Some(b'>') if !in_quote => break i,
            Some(_) => i += 1,
        }
    };
    let inner = &s[1..end];
    let rest = &s[end + 1..];
    if inner.len() > limits::SMTP_PATH_BYTES_MAX {
        return Err(AddressError::TooLong);
    }
    if inner.is_empty() {
        return Ok((Path::Null, rest));
    }
    if inner.eq_ignore_ascii_case("postmaster") {
        return Ok((Path::Postmaster, rest));
    }
    let (had_route, mailbox) = strip_route(inner)?;
    let mb = parse_mailbox(mailbox, utf8_allowed)?;
    Ok((Path::Mailbox(Mailbox { had_route, ..mb }), rest))
}

/// Removes an `@a,@b:` source route.
fn strip_route(inner: &str) -> Result<(bool, &str), AddressError> {
    if !inner.starts_with('@') {
        return Ok((false, inner));
    }
    let colon = inner.find(':').ok_or(AddressError::Syntax)?;
    for hop in inner[..colon].split(',') {
        let d = hop.strip_prefix('@').ok_or(AddressError::Syntax)?;
        if !valid_domain(d, true) {
            return Err(AddressError::Syntax);
        }
    }
    Ok((true, &inner[colon + 1..]))
}

/// Parses `local@domain`.
pub fn parse_mailbox(s: &str, utf8_allowed: bool) -> Result<Mailbox<'_>, AddressError> {
    let bytes = s.as_bytes();
    let utf8 = !s.is_ascii();
    if utf8 && !utf8_allowed {
        return Err(AddressError::NeedsUtf8);
    }
    let (local_end, quoted, routing_chars) = if bytes.first() == Some(&b'"') {
        let mut i = 1;
        let mut routing = false;
        loop {
            match bytes.get(i) {
                None => return Err(AddressError::Syntax),
                Some(b'\\') => {
                    match bytes.get(i + 1) {
                        Some(c) if (32..127).contains(c) || *c >= 128 => {
                            routing |= b"@%!".contains(c)
                        }
                        _ => return Err(AddressError::Syntax),
                    }
                    i += 2;
                }
                Some(b'"') => break (i + 1, true, routing),
                Some(&c) if c == b' ' || (33..127).contains(&c) || c >= 128 => {
                    routing |= b"@%!".contains(&c);
                    i += 1
                }
                Some(_) => return Err(AddressError::Syntax),
            }
        }
    } else {
        let at = s.rfind('@').ok_or(AddressError::Syntax)?;
        let local = &bytes[..at];
        // Dot-string: atoms separated by single dots.
        if local.is_empty()
            || local[0] == b'.'
            || local[local.len() - 1] == b'.'
            || local.windows(2).any(|w| w == b"..")
        {
            return Err(AddressError::Syntax);
        }
        if !local.iter().all(|&c| c == b'.' || is_atext(c) || c >= 128) {
            return Err(AddressError::Syntax);
        }
        (at, false, local.iter().any(|c| b"%!".contains(c)))
    };
    if bytes.get(local_end) != Some(&b'@') {
        return Err(AddressError::Syntax);
    }
    if local_end > limits::SMTP_LOCAL_PART_BYTES_MAX + if quoted { 2 } else { 0 } {
        return Err(AddressError::TooLong);
    }
    let domain = &s[local_end + 1..];
    if domain.len() > limits::SMTP_DOMAIN_BYTES_MAX {
        return Err(AddressError::TooLong);
    }
    if !valid_domain(domain, utf8_allowed) {
        return Err(AddressError::Syntax);
    }
    Ok(Mailbox {
        local: &s[..local_end],
        domain,
        quoted,
        routing_chars,
        utf8,
        had_route: false,
    })
}

/// A domain name or an address literal (`[192.0.2.1]`, `[IPv6:...]`).
pub fn valid_domain(d: &str, utf8_allowed: bool) -> bool {
    if let Some(lit) = d.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
        return match lit.get(..5) {
            Some(p) if p.eq_ignore_ascii_case("IPv6:") => {
                lit[5..].parse::<std::net::Ipv6Addr>().is_ok()
            }
            _ => lit.parse::<std::net::Ipv4Addr>().is_ok(),
        };
    }
    let d = d.strip_suffix('.').unwrap_or(d);
    !d.is_empty()
        && d.len() <= limits::SMTP_DOMAIN_BYTES_MAX
        && d.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
                && b.iter()
                    .all(|&c| c.is_ascii_alphanumeric() || c == b'-' || (utf8_allowed && c >= 128))
        })
}

/// Lower-cases a domain and removes one trailing dot: the form used for policy and routing.
pub fn normalize_domain(d: &str) -> String {
    d.strip_suffix('.').unwrap_or(d).to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb(s: &str) -> Mailbox<'_> {
        match parse_path(s, false).unwrap().0 {
            Path::Mailbox(m) => m,
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn plain_and_null_and_postmaster() {
        let m = mb("<alice@Example.COM> SIZE=10");
        assert_eq!((m.local, m.domain), ("alice", "Example.COM"));
        assert_eq!(m.to_canonical(), "alice@example.com");
        assert_eq!(parse_path("<>", false).unwrap().0, Path::Null);
        assert_eq!(
            parse_path("<postmaster>", false).unwrap().0,
            Path::Postmaster
        );
        assert_eq!(
            parse_path("<alice@example.com> SIZE=10", false).unwrap().1,
            " SIZE=10"
        );
    }

    #[test]
    fn source_route_is_removed() {
        let m = mb("<@relay.example,@b.example:bob@target.example>");
        assert!(m.had_route);
        assert_eq!(m.domain, "target.example");
        assert!(parse_path("<@:bob@x.example>", false).is_err());
    }

    #[test]
    fn routing_characters_flagged() {
        assert!(mb("<user%remote.example@localhost>").routing_chars);
        assert!(mb("<remote.example!user@localhost>").routing_chars);
        let q = mb("<\"user@remote.example\"@localhost>");
        assert!(q.quoted && q.routing_chars);
        assert_eq!(q.domain, "localhost");
        assert!(!mb("<a.b+c@localhost>").routing_chars);
    }

    #[test]
    fn bad_syntax_rejected() {
        for bad in [
            "alice@example.com",
            "<alice@example.com",
            "<alice>",
            "<@example.com>",
            "<alice@>",
            "<alice@-bad.example>",
            "<a..b@example.com>",
            "<.a@example.com>",
            "<a b@example.com>",
            "<user@remote.example@localhost>",
            "<alice@exa_mple.com>",
        ] {
            assert!(parse_path(bad, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn limits_and_literals() {
        let long_local = format!("<{}@example.com>", "a".repeat(65));
        assert_eq!(parse_path(&long_local, false), Err(AddressError::TooLong));
        assert!(parse_path("<u@[127.0.0.1]>", false).is_ok());
        assert!(parse_path("<u@[IPv6:::1]>", false).is_ok());
        assert!(parse_path("<u@[999.0.0.1]>", false).is_err());
        assert_eq!(
            parse_path("<jöran@example.com>", false),
            Err(AddressError::NeedsUtf8)
        );
        assert!(parse_path("<jöran@exämple.com>", true).is_ok());
    }
}
