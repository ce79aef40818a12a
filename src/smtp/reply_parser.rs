//! The one SMTP reply parser of the project (the relay's outbound client, `sendmail` and the load tester use
//! it): complete replies found on borrowed bytes without allocating ([`parse_reply`], [`Reply`]), a fixed-capacity
//! receive buffer that yields them ([`ReplyReader`]), and RFC 3463 enhanced status codes ([`EnhancedCode`]).
//! It owns no socket and no clock.

use std::fmt;

/// Cap on one reply line, CRLF included (RFC 5321 says 512; be generous).
pub const MAX_LINE: usize = 2048;
/// Cap on one whole (multi-line) reply.
pub const MAX_REPLY: usize = 64 * 1024;
/// Cap on the lines of one reply.
pub const MAX_LINES: usize = 512;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("reply line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("reply longer than {MAX_REPLY} bytes")]
    ReplyTooLong,
    #[error("malformed reply line {0:?}")]
    Malformed(String),
    #[error("multi-line reply changed code from {0} to {1}")]
    CodeMismatch(u16, u16),
}

/// Where a complete reply ends in a buffer, and its code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyHead {
    pub code: u16,
    pub len: usize,
}

/// One complete reply (all its lines, terminators included), borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply<'a> {
    pub code: u16,
    pub raw: &'a [u8],
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(120)]).into_owned()
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Finds the first complete reply at the start of `buf`.
/// `Ok(None)` means more bytes are needed. Accepts `DDD text`, `DDD-text`
/// and bare `DDD`, CRLF or bare-LF terminated.
pub fn parse_reply(buf: &[u8]) -> Result<Option<ReplyHead>, ParseError> {
    let mut pos = 0;
    let mut lines = 0usize;
    let mut code: Option<u16> = None;
    loop {
        let rest = &buf[pos..];
        let window = &rest[..rest.len().min(MAX_LINE)];
        let Some(nl) = memchr::memchr(b'\n', window) else {
            if rest.len() >= MAX_LINE {
                return Err(ParseError::LineTooLong);
            }
            if buf.len() > MAX_REPLY {
                return Err(ParseError::ReplyTooLong);
            }
            return Ok(None);
        };
        let line = trim_eol(&rest[..=nl]);
        let this = match line {
            [a, b, c, ..] if a.is_ascii_digit() && b.is_ascii_digit() && c.is_ascii_digit() => {
                u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
            }
            _ => return Err(ParseError::Malformed(lossy(line))),
        };
        if !(200..600).contains(&this) {
            return Err(ParseError::Malformed(lossy(line)));
        }
        lines += 1;
        if lines > MAX_LINES {
            return Err(ParseError::ReplyTooLong);
        }
        if let Some(first) = code {
            if first != this {
                return Err(ParseError::CodeMismatch(first, this));
            }
        }
        code = Some(this);
        pos += nl + 1;
        if pos > MAX_REPLY {
            return Err(ParseError::ReplyTooLong);
        }
        match line.get(3) {
            None | Some(b' ') => {
                return Ok(Some(ReplyHead {
                    code: this,
                    len: pos,
                }))
            }
            Some(b'-') => {}
            Some(_) => return Err(ParseError::Malformed(lossy(line))),
        }
    }
}

impl<'a> Reply<'a> {
    pub fn class(&self) -> u16 {
        self.code / 100
    }

    /// The text of each line (after `DDD-` / `DDD `), without line ending.
    pub fn lines(&self) -> impl Iterator<Item = &'a [u8]> {
        self.raw
            .split_inclusive(|&b| b == b'\n')
            .map(|l| trim_eol(l).get(4..).unwrap_or(&[]))
    }

    /// True if an EHLO reply advertises `kw` (case-insensitive) on a
    /// line after the first.
    pub fn has_extension(&self, kw: &str) -> bool {
        self.lines().skip(1).any(|l| {
            let word = l.split(|&b| b == b' ').next().unwrap_or(&[]);
            word.eq_ignore_ascii_case(kw.as_bytes())
        })
    }

    /// True if an EHLO reply line after the first is `kw` followed by
    /// `param` among its words (e.g. `AUTH LOGIN PLAIN`), case-insensitive.
    pub fn extension_has_param(&self, kw: &str, param: &str) -> bool {
        self.lines().skip(1).any(|l| {
            let mut words = l.split(|&b| b == b' ').filter(|w| !w.is_empty());
            words
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case(kw.as_bytes()))
                && words.any(|w| w.eq_ignore_ascii_case(param.as_bytes()))
        })
    }

    /// Queue id from `... queued as ID` (or exim-style `id=ID`).
    pub fn queue_id(&self) -> Option<&'a [u8]> {
        for line in self.lines() {
            for marker in [&b"queued as "[..], &b"id="[..]] {
                if let Some(at) = find_ci(line, marker) {
                    let tok = &line[at + marker.len()..];
                    let end = tok
                        .iter()
                        .position(|b| b.is_ascii_whitespace() || matches!(b, b')' | b';' | b','))
                        .unwrap_or(tok.len());
                    let tok = &tok[..end];
                    if !tok.is_empty() {
                        return Some(tok);
                    }
                }
            }
        }
        None
    }

    /// The enhanced status code at the start of the first line's text, when it has one of the reply's class.
    pub fn enhanced(&self) -> Option<EnhancedCode> {
        let first = self.lines().next()?;
        let word = first.split(|&b| b == b' ').next()?;
        EnhancedCode::parse(word).filter(|e| u16::from(e.class) == self.code / 100)
    }

    /// First line, lossy, for error messages.
    pub fn summary(&self) -> String {
        let first = self.raw.split(|&b| b == b'\n').next().unwrap_or(&[]);
        lossy(trim_eol(first))
    }
}

fn find_ci(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    (0..=hay.len() - needle.len()).find(|&i| hay[i..i + needle.len()].eq_ignore_ascii_case(needle))
}

/// Fixed-capacity receive buffer that yields complete replies. The caller
/// reads from the socket into [`ReplyReader::spare`] and reports the count
/// with [`ReplyReader::filled`]; one read may deliver several replies
/// (pipelining), or a fraction of one.
pub struct ReplyReader {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl ReplyReader {
    pub fn new(capacity: usize) -> Self {
        ReplyReader {
            buf: vec![0u8; capacity.max(MAX_LINE)].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Forgets everything buffered (a new connection), keeping the allocation.
    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Checks whether a complete reply is buffered (does not consume it).
    pub fn peek(&self) -> Result<Option<ReplyHead>, ParseError> {
        parse_reply(&self.buf[self.start..self.end])
    }

    /// Consumes a reply previously found by [`ReplyReader::peek`].
    pub fn take(&mut self, head: ReplyHead) -> Reply<'_> {
        let s = self.start;
        let len = head.len.min(self.end - s);
        self.start += len;
        Reply {
            code: head.code,
            raw: &self.buf[s..s + len],
        }
    }

    /// Parses and consumes the next reply if complete.
    pub fn next_reply(&mut self) -> Result<Option<Reply<'_>>, ParseError> {
        match self.peek()? {
            Some(head) => Ok(Some(self.take(head))),
            None => Ok(None),
        }
    }

    /// Free space to read into (compacting first). Errors if the buffer is
    /// full without a complete reply.
    pub fn spare(&mut self) -> Result<&mut [u8], ParseError> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            return Err(ParseError::ReplyTooLong);
        }
        Ok(&mut self.buf[self.end..])
    }

    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Bytes received but not yet consumed as replies.
    pub fn pending(&self) -> usize {
        self.end - self.start
    }
}

/// An RFC 3463 enhanced status code `class.subject.detail` (class 2, 4 or 5). The one status type of the project:
/// replies, DSNs, delivery results and classified troubles all carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EnhancedCode {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

impl EnhancedCode {
    pub const fn new(class: u8, subject: u16, detail: u16) -> EnhancedCode {
        EnhancedCode {
            class,
            subject,
            detail,
        }
    }

    /// `X.0.0` for a reply class without an enhanced code of its own (`None` for classes other than 2, 4, 5).
    pub fn generic(reply_code: u16) -> Option<EnhancedCode> {
        match reply_code / 100 {
            c @ (2 | 4 | 5) => Some(EnhancedCode::new(c as u8, 0, 0)),
            _ => None,
        }
    }

    /// Parses `5.7.26` (each part at most three digits; class 2, 4 or 5).
    pub fn parse(word: &[u8]) -> Option<EnhancedCode> {
        let mut it = word.split(|&b| b == b'.');
        let mut num = |max: usize| -> Option<u16> {
            let p = it.next()?;
            if p.is_empty() || p.len() > max || !p.iter().all(u8::is_ascii_digit) {
                return None;
            }
            Some(p.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0')))
        };
        let class = num(1)?;
        let subject = num(3)?;
        let detail = num(3)?;
        (it.next().is_none() && matches!(class, 2 | 4 | 5)).then_some(EnhancedCode::new(
            class as u8,
            subject,
            detail,
        ))
    }

    pub fn is_permanent(&self) -> bool {
        self.class == 5
    }
}

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(buf: &[u8]) -> Option<ReplyHead> {
        match parse_reply(buf) {
            Ok(h) => h,
            Err(e) => panic!("parse error {e}"),
        }
    }

    #[test]
    fn single_line_reply() {
        let h = head(b"250 OK\r\n").expect("complete");
        assert_eq!(h, ReplyHead { code: 250, len: 8 });
        assert_eq!(head(b"354\r\n"), Some(ReplyHead { code: 354, len: 5 }));
        assert_eq!(head(b"220 hi\n"), Some(ReplyHead { code: 220, len: 7 }));
    }

    #[test]
    fn incomplete_reply_needs_more() {
        assert_eq!(head(b""), None);
        assert_eq!(head(b"25"), None);
        assert_eq!(head(b"250 OK\r"), None);
        assert_eq!(head(b"250-first\r\n250-second\r\n"), None);
    }

    #[test]
    fn multi_line_ehlo_reply() {
        let raw =
            b"250-mx.example Hello\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 8BITMIME\r\nextra";
        let h = head(raw).expect("complete");
        assert_eq!(h.code, 250);
        assert_eq!(h.len, raw.len() - 5);
        let r = Reply {
            code: h.code,
            raw: &raw[..h.len],
        };
        assert!(r.has_extension("pipelining"));
        assert!(r.has_extension("SIZE"));
        assert!(!r.has_extension("CHUNKING"));
        assert!(!r.has_extension("mx.example"));
        let auth = Reply {
            code: 250,
            raw: b"250-mx\r\n250-AUTH LOGIN plain\r\n250 STARTTLS\r\n",
        };
        assert!(auth.extension_has_param("auth", "PLAIN"));
        assert!(!auth.extension_has_param("AUTH", "CRAM-MD5"));
        assert!(!auth.extension_has_param("STARTTLS", "PLAIN"));
        assert!(!r.extension_has_param("AUTH", "PLAIN"));
        assert_eq!(r.lines().count(), 4);
        assert_eq!(r.summary(), "250-mx.example Hello");
    }

    #[test]
    fn malformed_and_mismatched() {
        assert!(matches!(
            parse_reply(b"OK\r\n"),
            Err(ParseError::Malformed(_))
        ));
        assert!(matches!(
            parse_reply(b"250xOK\r\n"),
            Err(ParseError::Malformed(_))
        ));
        assert_eq!(
            parse_reply(b"250-a\r\n251 b\r\n"),
            Err(ParseError::CodeMismatch(250, 251))
        );
    }

    #[test]
    fn line_too_long() {
        let mut v = b"250 ".to_vec();
        v.resize(MAX_LINE + 10, b'a');
        assert_eq!(parse_reply(&v), Err(ParseError::LineTooLong));
        v.truncate(MAX_LINE - 10);
        assert_eq!(parse_reply(&v), Ok(None));
    }

    #[test]
    fn reply_too_long() {
        let mut v = Vec::new();
        while v.len() <= MAX_REPLY {
            v.extend_from_slice(b"250-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n");
        }
        assert_eq!(parse_reply(&v), Err(ParseError::ReplyTooLong));
    }

    #[test]
    fn queue_id_extraction() {
        let r = Reply {
            code: 250,
            raw: b"250 2.0.0 Ok: queued as 7F3A9C01\r\n",
        };
        assert_eq!(r.queue_id(), Some(&b"7F3A9C01"[..]));
        let r = Reply {
            code: 250,
            raw: b"250 OK id=1tXYZ-000abc-AB\r\n",
        };
        assert_eq!(r.queue_id(), Some(&b"1tXYZ-000abc-AB"[..]));
        let r = Reply {
            code: 250,
            raw: b"250 OK\r\n",
        };
        assert_eq!(r.queue_id(), None);
    }

    fn feed(rr: &mut ReplyReader, bytes: &[u8]) {
        let spare = rr.spare().expect("space");
        spare[..bytes.len()].copy_from_slice(bytes);
        rr.filled(bytes.len());
    }

    #[test]
    fn pipelined_batch_in_one_read() {
        let mut rr = ReplyReader::new(4096);
        feed(
            &mut rr,
            b"250 2.1.0 sender ok\r\n250 2.1.5 rcpt ok\r\n550 no such user\r\n354 go ahead\r\n",
        );
        let codes: Vec<u16> =
            std::iter::from_fn(|| rr.next_reply().ok().flatten().map(|r| r.code)).collect();
        assert_eq!(codes, vec![250, 250, 550, 354]);
        assert_eq!(rr.pending(), 0);
    }

    #[test]
    fn partial_reads_byte_by_byte() {
        let stream = b"220 hello\r\n250-host\r\n250-PIPELINING\r\n250 SIZE\r\n250 queued as Q1\r\n";
        let mut rr = ReplyReader::new(MAX_LINE);
        let mut got = Vec::new();
        for b in stream.iter() {
            feed(&mut rr, std::slice::from_ref(b));
            while let Some(r) = rr.next_reply().expect("valid") {
                got.push((r.code, r.raw.len(), r.queue_id().map(|q| q.to_vec())));
            }
        }
        assert_eq!(
            got,
            vec![
                (220, 11, None),
                (250, 36, None),
                (250, 18, Some(b"Q1".to_vec()))
            ]
        );
        assert_eq!(rr.pending(), 0);
    }

    #[test]
    fn reader_full_without_reply_is_error() {
        let mut rr = ReplyReader::new(MAX_LINE);
        feed(&mut rr, b"hello\r\n");
        assert_eq!(rr.peek(), Err(ParseError::Malformed("hello".into())));
        let mut rr = ReplyReader::new(MAX_LINE);
        let mut long = b"250 ".to_vec();
        long.resize(MAX_LINE, b'x');
        feed(&mut rr, &long);
        assert_eq!(rr.peek(), Err(ParseError::LineTooLong));
        assert!(rr.spare().is_err());
    }

    #[test]
    fn enhanced_codes() {
        let r = Reply {
            code: 550,
            raw: b"550-5.7.26 This mail is unauthenticated\r\n550 5.7.26 more\r\n",
        };
        assert_eq!(r.enhanced(), Some(EnhancedCode::new(5, 7, 26)));
        assert_eq!(
            r.enhanced().map(|e| e.to_string()).as_deref(),
            Some("5.7.26")
        );
        let r = Reply {
            code: 451,
            raw: b"451 4.7.500 Server busy\r\n",
        };
        assert_eq!(r.enhanced(), Some(EnhancedCode::new(4, 7, 500)));
        // Class must match the reply's; no code at all is None.
        let r = Reply {
            code: 550,
            raw: b"550 4.1.1 odd\r\n",
        };
        assert_eq!(r.enhanced(), None);
        let r = Reply {
            code: 550,
            raw: b"550 spam message rejected\r\n",
        };
        assert_eq!(r.enhanced(), None);
        assert_eq!(EnhancedCode::parse(b"5.1.1000"), None);
        assert_eq!(EnhancedCode::parse(b"3.1.1"), None);
        assert_eq!(EnhancedCode::generic(421), Some(EnhancedCode::new(4, 0, 0)));
    }

    #[test]
    fn codes_outside_smtp_range_and_too_many_lines() {
        assert!(matches!(
            parse_reply(b"199 x\r\n"),
            Err(ParseError::Malformed(_))
        ));
        assert!(matches!(
            parse_reply(b"600 x\r\n"),
            Err(ParseError::Malformed(_))
        ));
        let many = b"250-x\r\n".repeat(MAX_LINES + 1);
        assert_eq!(parse_reply(&many), Err(ParseError::ReplyTooLong));
    }
}
