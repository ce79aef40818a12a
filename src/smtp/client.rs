//! The outbound SMTP client's protocol pieces, sans-IO: the owned reply form ([`ServerReply`], built from the
//! borrowed replies of [`super::reply_parser`]), EHLO capabilities, and transaction encoding (MAIL/RCPT/DATA
//! with dot-stuffing). [`super::client_session`] puts them together into a session.

use std::io::Write as _;

use super::reply_parser::{self, EnhancedCode, ParseError, Reply};

/// One complete server reply, owned (kept past the receive buffer: diagnostics, DSNs, errors). Built from the
/// borrowed [`Reply`] of the project's one parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerReply {
    pub code: u16,
    /// The text of every line (code and separator removed), joined with '\n'.
    pub text: String,
}

impl ServerReply {
    /// A complete reply written in a test (panics on anything else).
    #[cfg(test)]
    pub(crate) fn from_test_bytes(raw: &[u8]) -> ServerReply {
        match parse_reply(raw) {
            Ok(Some((r, _))) => r,
            other => panic!("bad test reply {other:?}"),
        }
    }

    pub fn class(&self) -> u16 {
        self.code / 100
    }

    /// The enhanced status code the text starts with, when it has one of the reply's class.
    pub fn enhanced(&self) -> Option<EnhancedCode> {
        let first = self.text.split([' ', '\n']).next()?;
        EnhancedCode::parse(first.as_bytes()).filter(|e| u16::from(e.class) == self.code / 100)
    }

    /// One-line form for logs and DSNs: `550 5.1.1 No such user`.
    pub fn one_line(&self) -> String {
        format!("{} {}", self.code, self.text.replace('\n', " "))
    }
}

impl From<Reply<'_>> for ServerReply {
    fn from(r: Reply<'_>) -> ServerReply {
        let mut text = String::new();
        for (i, line) in r.lines().enumerate() {
            if i > 0 {
                text.push('\n');
            }
            text.push_str(&String::from_utf8_lossy(line));
        }
        ServerReply { code: r.code, text }
    }
}

/// Parses one complete reply at the start of `buf` into its owned form. `Ok(None)`: more bytes are needed.
/// Returns the reply and the bytes it used.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(ServerReply, usize)>, ParseError> {
    Ok(reply_parser::parse_reply(buf)?.map(|h| {
        let r = Reply {
            code: h.code,
            raw: &buf[..h.len],
        };
        (ServerReply::from(r), h.len)
    }))
}

/// What a server offered in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub pipelining: bool,
    /// `SIZE n`; `Some(0)` means no fixed limit.
    pub size: Option<u64>,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub starttls: bool,
    /// BDAT (RFC 3030).
    pub chunking: bool,
    pub auth_plain: bool,
    pub auth_login: bool,
    /// Delivery status notifications (RFC 3461): `NOTIFY=` on RCPT may be sent.
    pub dsn: bool,
}

impl Capabilities {
    pub fn from_ehlo(reply: &ServerReply) -> Capabilities {
        Capabilities::from_lines(reply.text.lines().map(str::as_bytes))
    }

    /// From a borrowed EHLO reply (no allocation).
    pub fn from_reply(reply: &Reply<'_>) -> Capabilities {
        Capabilities::from_lines(reply.lines())
    }

    fn from_lines<'a>(lines: impl Iterator<Item = &'a [u8]>) -> Capabilities {
        let mut c = Capabilities::default();
        for line in lines.skip(1) {
            let mut words = line
                .split(|b| b.is_ascii_whitespace())
                .filter(|w| !w.is_empty());
            let Some(kw) = words.next() else { continue };
            let is = |k: &str| kw.eq_ignore_ascii_case(k.as_bytes());
            if is("PIPELINING") {
                c.pipelining = true;
            } else if is("SIZE") {
                c.size = Some(
                    words
                        .next()
                        .and_then(|n| std::str::from_utf8(n).ok()?.parse().ok())
                        .unwrap_or(0),
                );
            } else if is("8BITMIME") {
                c.eight_bit_mime = true;
            } else if is("SMTPUTF8") {
                c.smtputf8 = true;
            } else if is("STARTTLS") {
                c.starttls = true;
            } else if is("CHUNKING") {
                c.chunking = true;
            } else if is("DSN") {
                c.dsn = true;
            } else if is("AUTH") {
                for m in words {
                    c.auth_plain |= m.eq_ignore_ascii_case(b"PLAIN");
                    c.auth_login |= m.eq_ignore_ascii_case(b"LOGIN");
                }
            }
        }
        c
    }
}

/// What a message's `MAIL FROM` may carry besides the sender.
#[derive(Debug, Clone, Copy, Default)]
pub struct MailParams<'a> {
    /// `SIZE=` (sent when the server offers SIZE).
    pub size: u64,
    /// `BODY=8BITMIME` (sent when the server offers it).
    pub eight_bit: bool,
    /// `SMTPUTF8` (sent when the server offers it).
    pub smtputf8: bool,
    /// DSN `RET=` and `ENVID=` (decoded, written as xtext): sent when given; the caller checks the server offers
    /// DSN.
    pub ret: Option<super::dsn::Ret>,
    pub envid: Option<&'a str>,
}

/// Appends `MAIL FROM` with the parameters the message needs and the server offers.
pub fn encode_mail(out: &mut Vec<u8>, sender: &str, caps: &Capabilities, p: &MailParams<'_>) {
    let MailParams {
        size,
        eight_bit,
        smtputf8,
        ret,
        envid,
    } = *p;
    out.extend_from_slice(b"MAIL FROM:<");
    out.extend_from_slice(sender.as_bytes());
    out.push(b'>');
    if caps.size.is_some() {
        let _ = write!(out, " SIZE={size}");
    }
    if eight_bit && caps.eight_bit_mime {
        out.extend_from_slice(b" BODY=8BITMIME");
    }
    if smtputf8 && caps.smtputf8 {
        out.extend_from_slice(b" SMTPUTF8");
    }
    if let Some(r) = ret {
        out.extend_from_slice(b" RET=");
        out.extend_from_slice(r.as_str().as_bytes());
    }
    if let Some(id) = envid {
        out.extend_from_slice(b" ENVID=");
        super::dsn::encode_xtext(out, id);
    }
    out.extend_from_slice(b"\r\n");
}

/// `RCPT TO`, with the DSN `NOTIFY=` and `ORCPT=` parameters (RFC 3461; ORCPT's address written as xtext) of
/// `dsn` when given (the caller checks the server offers DSN).
pub fn encode_rcpt(out: &mut Vec<u8>, rcpt: &str, dsn: Option<&super::dsn::RcptDsn>) {
    out.extend_from_slice(b"RCPT TO:<");
    out.extend_from_slice(rcpt.as_bytes());
    out.push(b'>');
    if let Some(d) = dsn {
        if let Some(n) = d.notify {
            let _ = write!(out, " NOTIFY={n}");
        }
        if let Some(o) = &d.orcpt {
            let _ = write!(out, " ORCPT={};", o.addr_type);
            super::dsn::encode_xtext(out, &o.address);
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends message content with dot-stuffing (a line starting with `.` gets one more), making sure it ends with
/// CRLF, then the end-of-data line. Every line end goes out as CRLF: a bare CR or bare LF in the content
/// (possible only in messages queued by versions that stored them) is sent as CRLF, so no receiver can read a
/// line end, or an end of data, that this relay did not (SMTP smuggling). Content is copied in runs between
/// line ends.
pub fn encode_data(out: &mut Vec<u8>, parts: &[&[u8]]) {
    let mut at_line_start = true;
    // The previous part ended with a CR, already sent as CRLF: an LF starting this part belongs to it.
    let mut cr_pending = false;
    for part in parts {
        let mut rest = *part;
        if std::mem::take(&mut cr_pending) && rest.first() == Some(&b'\n') {
            rest = &rest[1..];
        }
        while !rest.is_empty() {
            if at_line_start && rest[0] == b'.' {
                out.push(b'.');
            }
            match memchr::memchr2(b'\r', b'\n', rest) {
                Some(i) => {
                    out.extend_from_slice(&rest[..i]);
                    out.extend_from_slice(b"\r\n");
                    at_line_start = true;
                    if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') {
                        rest = &rest[i + 2..];
                    } else {
                        cr_pending = rest[i] == b'\r' && i + 1 == rest.len();
                        rest = &rest[i + 1..];
                    }
                }
                None => {
                    out.extend_from_slice(rest);
                    at_line_start = false;
                    rest = &[];
                }
            }
        }
    }
    if !at_line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

/// `AUTH PLAIN` initial response for `user`/`password` (RFC 4616).
pub fn auth_plain(user: &str, password: &str) -> String {
    use base64::Engine as _;
    let raw = format!("\0{user}\0{password}");
    format!(
        "AUTH PLAIN {}\r\n",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_single_multi_partial() {
        let (r, n) = parse_reply(b"250 2.1.0 Ok\r\nrest").unwrap().unwrap();
        assert_eq!((r.code, r.text.as_str(), n), (250, "2.1.0 Ok", 14));
        assert_eq!(r.enhanced(), Some(EnhancedCode::new(2, 1, 0)));
        let (r, _) = parse_reply(b"250-mx\r\n250-PIPELINING\r\n250 SIZE 100\r\n")
            .unwrap()
            .unwrap();
        let caps = Capabilities::from_ehlo(&r);
        assert!(caps.pipelining && caps.size == Some(100) && !caps.starttls);
        assert_eq!(parse_reply(b"250-mx\r\n250 PIPE").unwrap(), None);
        assert!(matches!(
            parse_reply(b"2x0 bad\r\n"),
            Err(ParseError::Malformed(_))
        ));
        assert_eq!(
            parse_reply(b"250-a\r\n251 b\r\n"),
            Err(ParseError::CodeMismatch(250, 251))
        );
        assert_eq!(parse_reply(b"250\r\n").unwrap().unwrap().0.text, "");
        assert_eq!(
            parse_reply(&vec![b'2'; reply_parser::MAX_LINE + 1]),
            Err(ParseError::LineTooLong)
        );
        let (r, _) = parse_reply(b"550 No such user\r\n").unwrap().unwrap();
        assert_eq!(r.enhanced(), None);
    }

    #[test]
    fn capabilities() {
        let (r, _) = parse_reply(b"250-mx\r\n250-STARTTLS\r\n250-AUTH LOGIN PLAIN\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE\r\n").unwrap().unwrap();
        let c = Capabilities::from_ehlo(&r);
        assert!(c.starttls && c.auth_plain && c.auth_login && c.eight_bit_mime && c.smtputf8);
        assert!(!c.chunking);
        assert_eq!(c.size, Some(0));
    }

    #[test]
    fn data_is_dot_stuffed_and_terminated() {
        let mut out = Vec::new();
        encode_data(
            &mut out,
            &[
                b"Received: x\r\n",
                b".hidden\r\nbody\r\n..two\r\nno newline",
            ],
        );
        assert_eq!(
            out,
            b"Received: x\r\n..hidden\r\nbody\r\n...two\r\nno newline\r\n.\r\n"
        );
        let mut out = Vec::new();
        encode_data(&mut out, &[b"a\r\n", b"", b".\r\n"]);
        assert_eq!(out, b"a\r\n..\r\n.\r\n");
        let mut out = Vec::new();
        encode_data(&mut out, &[b"", b""]);
        assert_eq!(out, b".\r\n");
        // Bare CR and bare LF go out as CRLF; a dot after them is stuffed like any line start.
        let mut out = Vec::new();
        encode_data(&mut out, &[b"a\r.\rMAIL\n.\nb\r", b"\nc\r", b".x"]);
        assert_eq!(out, b"a\r\n..\r\nMAIL\r\n..\r\nb\r\nc\r\n..x\r\n.\r\n");
    }

    #[test]
    fn mail_parameters_follow_capabilities() {
        let caps = Capabilities {
            size: Some(0),
            eight_bit_mime: true,
            smtputf8: false,
            ..Default::default()
        };
        let mut out = Vec::new();
        encode_mail(
            &mut out,
            "a@b.example",
            &caps,
            &MailParams {
                size: 123,
                eight_bit: true,
                smtputf8: true,
                ..Default::default()
            },
        );
        assert_eq!(out, b"MAIL FROM:<a@b.example> SIZE=123 BODY=8BITMIME\r\n");
    }
}
