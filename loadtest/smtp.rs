//! Socket-free SMTP client pieces: a reply parser that works on borrowed
//! bytes, a buffered reply reader (caller does the I/O), command builders and
//! the test-message generator.

use std::io::Write as _;

/// Cap on one reply line, CRLF included (RFC 5321 says 512; be generous).
pub const MAX_LINE: usize = 2048;
/// Cap on one whole (multi-line) reply.
pub const MAX_REPLY: usize = 32 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
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
    #[cfg(test)]
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

/// Appends `MAIL FROM:<from>\r\n`.
pub fn push_mail(out: &mut Vec<u8>, from: &str) {
    out.extend_from_slice(b"MAIL FROM:<");
    out.extend_from_slice(from.as_bytes());
    out.extend_from_slice(b">\r\n");
}

/// Appends `RCPT TO:<user<n>@domain>\r\n`.
pub fn push_rcpt(out: &mut Vec<u8>, n: u64, domain: &str) {
    // Writing to a Vec cannot fail.
    let _ = write!(out, "RCPT TO:<user{n}@{domain}>\r\n");
}

/// Unique message token: run nonce + message index, fixed width.
pub fn message_id_token(out: &mut String, nonce: u64, index: u64) {
    use std::fmt::Write as _;
    out.clear();
    let _ = write!(out, "{nonce:016x}-{index:010}");
}

/// Printable filler without '.', so no generated line can start with a dot.
const FILL: &[u8] =
    b"Lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor \
incididunt ut labore et dolore magna aliqua 0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ ";
/// Content bytes per full body line (CRLF excluded).
const BODY_LINE: usize = 76;

/// Builds a message of exactly `size` bytes (when `size` exceeds the
/// headers, and is not headers + 1), without the terminating `.\r\n`.
/// Every line is CRLF-terminated printable ASCII, at most 998 bytes, and
/// none starts with '.'.
pub fn build_message(out: &mut Vec<u8>, id: &str, from: &str, size: usize) {
    out.clear();
    let _ = write!(
        out,
        "From: <{from}>\r\nTo: undisclosed-recipients:;\r\nSubject: shardmta loadtest {id}\r\n\
         Message-ID: <{id}@loadtest.shardmta.invalid>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=us-ascii\r\nX-Loadtest-Id: {id}\r\n\r\n"
    );
    let mut remaining = size.saturating_sub(out.len());
    let mut line_no = 0usize;
    while remaining > 0 {
        let full = BODY_LINE + 2;
        let content = if remaining >= full + 3 || remaining == full {
            BODY_LINE
        } else if remaining > full {
            // Leave exactly three bytes for a final one-character line.
            remaining - 5
        } else {
            // Final line; with remaining == 1 this overshoots by one byte.
            remaining.saturating_sub(2)
        };
        let off = (line_no * 7) % FILL.len();
        let mut left = content;
        let mut at = off;
        while left > 0 {
            let take = left.min(FILL.len() - at);
            out.extend_from_slice(&FILL[at..at + take]);
            left -= take;
            at = 0;
        }
        out.extend_from_slice(b"\r\n");
        remaining = remaining.saturating_sub(content + 2);
        line_no += 1;
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
    fn commands() {
        let mut v = Vec::new();
        push_mail(&mut v, "a@b.c");
        push_rcpt(&mut v, 42, "example.net");
        assert_eq!(v, b"MAIL FROM:<a@b.c>\r\nRCPT TO:<user42@example.net>\r\n");
    }

    fn check_message(m: &[u8]) {
        assert!(m.ends_with(b"\r\n"));
        let body = &m[..m.len() - 2];
        for line in body.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            assert!(!line.contains(&b'\r'), "bare CR");
            assert!(!line.starts_with(b"."), "dot line");
            assert!(line.len() <= 998);
            assert!(line.iter().all(|b| (0x20..0x7f).contains(b)), "unprintable");
        }
        // Every LF is preceded by CR.
        for (i, b) in m.iter().enumerate() {
            if *b == b'\n' {
                assert!(i > 0 && m[i - 1] == b'\r');
            }
        }
    }

    #[test]
    fn message_exact_size_and_clean_lines() {
        let mut id = String::new();
        message_id_token(&mut id, 0xdead_beef, 7);
        let mut m = Vec::new();
        build_message(&mut m, &id, "loadtest@example.com", 0);
        let header_len = m.len();
        check_message(&m);
        for size in (header_len..header_len + 400)
            .chain([1024, 4096, 65536, 1 << 20])
            .filter(|&s| s != header_len + 1)
        {
            build_message(&mut m, &id, "loadtest@example.com", size);
            assert_eq!(m.len(), size, "size {size}");
            check_message(&m);
        }
    }

    #[test]
    fn message_has_unique_id_headers() {
        let mut a = String::new();
        let mut b = String::new();
        message_id_token(&mut a, 1, 1);
        message_id_token(&mut b, 1, 2);
        assert_ne!(a, b);
        assert_eq!(a.len(), b.len());
        let mut m = Vec::new();
        build_message(&mut m, &a, "x@y", 1024);
        let text = String::from_utf8(m).expect("ascii");
        assert!(text.contains(&format!("Message-ID: <{a}@")));
        assert!(text.contains(&format!("Subject: shardmta loadtest {a}\r\n")));
        let mut ids = std::collections::HashSet::new();
        for i in 0..10_000 {
            message_id_token(&mut a, 99, i);
            assert!(ids.insert(a.clone()));
        }
    }
}
