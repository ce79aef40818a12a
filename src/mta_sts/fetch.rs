//! The MTA-STS policy fetch (RFC 8461 section 3.3): one HTTP/1.1 GET of
//! `https://mta-sts.<domain>/.well-known/mta-sts.txt` over rustls (futures-rustls) on a glommio TCP stream,
//! with a verified certificate for `mta-sts.<domain>`, no redirects, a 200 with `Content-Type: text/plain`
//! only, the body at most [`super::POLICY_BYTES_MAX`] bytes, the whole response at most
//! [`RESPONSE_BYTES_MAX`], and the whole exchange within one deadline. A small client of our own rather than
//! hyper's: hyper is in the tree with its client side off, and a policy fetch needs one GET, a bounded read
//! and a strict parse, which [`ResponseReader`] does incrementally on the bytes as they are read, in linear work
//! (tested without sockets).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};

use super::POLICY_BYTES_MAX;

/// The status line and headers may take this much on top of the body.
pub const HEADER_BYTES_MAX: usize = 8 * 1024;
/// Bound on everything read from the server (chunk framing included).
pub const RESPONSE_BYTES_MAX: usize = POLICY_BYTES_MAX + HEADER_BYTES_MAX + 4 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("cannot connect to {0}")]
    Connect(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("no answer within {0} ms")]
    Timeout(u128),
    #[error("HTTP status {0} (redirects are not followed)")]
    Status(u16),
    #[error("Content-Type {0:?} is not text/plain")]
    ContentType(String),
    #[error("response larger than {0} bytes")]
    TooLarge(usize),
    #[error("malformed HTTP response: {0}")]
    Malformed(&'static str),
    #[error("I/O: {0}")]
    Io(String),
}

/// What [`parse_response`] makes of the bytes so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The whole body (chunked framing removed).
    Complete(Vec<u8>),
    /// More bytes are needed.
    Incomplete,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses a whole response read so far (`eof`: the server closed); see [`ResponseReader`], which this runs
/// once over `buf`.
pub fn parse_response(buf: &[u8], eof: bool) -> Result<Parsed, FetchError> {
    ResponseReader::default().push(buf, eof)
}

/// How the body ends, from the headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    Close,
}

/// An incremental response parser: bytes come in as they are read ([`ResponseReader::push`]), each byte is
/// looked at a bounded number of times (the end of the headers is searched for in the new bytes only, the
/// headers are parsed once, a chunk-size line is searched once and a chunk's data copied once; a
/// `Content-Length` body is taken when complete), so a server sending one byte per TLS record costs linear
/// work. Checks the status (200 only), the content type and the sizes; understands `Content-Length`,
/// `Transfer-Encoding: chunked`, and a body ended by the close.
#[derive(Debug, Default)]
pub struct ResponseReader {
    buf: Vec<u8>,
    /// Header phase: bytes already searched for the blank line.
    searched: usize,
    /// After the headers: where the body starts in `buf`, and its framing.
    body: Option<(usize, Framing)>,
    /// Chunked: offset in `buf` of the next chunk-size line not yet taken, bytes of it already searched for its
    /// CRLF, the size of the chunk whose line was read (waiting for its data), and the body so far.
    chunk_at: usize,
    line_searched: usize,
    chunk_size: Option<usize>,
    decoded: Vec<u8>,
    /// Bytes examined or copied (searches, header parsing, chunk data): the measure of the work done.
    work: usize,
}

impl ResponseReader {
    /// Bytes received so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Bytes examined or copied so far (a test's measure of linear work).
    pub fn work(&self) -> usize {
        self.work
    }

    /// Takes the next bytes read (`eof`: the server closed) and says whether the body is complete.
    pub fn push(&mut self, bytes: &[u8], eof: bool) -> Result<Parsed, FetchError> {
        self.buf.extend_from_slice(bytes);
        let (start, framing) = match self.body {
            Some(b) => b,
            None => match self.headers(eof)? {
                Some(b) => b,
                None => return Ok(Parsed::Incomplete),
            },
        };
        let body_len = self.buf.len() - start;
        match framing {
            Framing::Chunked => self.dechunk(eof),
            Framing::Length(n) if body_len >= n => {
                self.work += n;
                Ok(Parsed::Complete(self.buf[start..start + n].to_vec()))
            }
            Framing::Length(_) if eof => {
                Err(FetchError::Malformed("body shorter than Content-Length"))
            }
            Framing::Length(_) => Ok(Parsed::Incomplete),
            Framing::Close if body_len > POLICY_BYTES_MAX => {
                Err(FetchError::TooLarge(POLICY_BYTES_MAX))
            }
            Framing::Close if eof => {
                self.work += body_len;
                Ok(Parsed::Complete(self.buf[start..].to_vec()))
            }
            Framing::Close => Ok(Parsed::Incomplete),
        }
    }

    /// Looks for the end of the headers in the new bytes; once found, parses them (once).
    fn headers(&mut self, eof: bool) -> Result<Option<(usize, Framing)>, FetchError> {
        let from = self.searched.saturating_sub(3);
        let found = find(&self.buf[from..], b"\r\n\r\n").map(|i| from + i);
        self.work += self.buf.len() - from;
        self.searched = self.buf.len();
        let Some(head_end) = found else {
            if self.buf.len() > HEADER_BYTES_MAX {
                return Err(FetchError::TooLarge(HEADER_BYTES_MAX));
            }
            return if eof {
                Err(FetchError::Malformed("no end of headers"))
            } else {
                Ok(None)
            };
        };
        if head_end > HEADER_BYTES_MAX {
            return Err(FetchError::TooLarge(HEADER_BYTES_MAX));
        }
        self.work += head_end;
        let framing = parse_head(&self.buf[..head_end])?;
        let start = head_end + 4;
        self.body = Some((start, framing));
        self.chunk_at = start;
        Ok(Some((start, framing)))
    }

    /// Removes chunked framing (RFC 9112 section 7.1) from what arrived since the last call; extensions and
    /// trailers are skipped.
    fn dechunk(&mut self, eof: bool) -> Result<Parsed, FetchError> {
        let incomplete = |eof| {
            if eof {
                Err(FetchError::Malformed("truncated chunked body"))
            } else {
                Ok(Parsed::Incomplete)
            }
        };
        loop {
            let size = match self.chunk_size {
                Some(size) => size,
                None => {
                    let line = &self.buf[self.chunk_at..];
                    let from = self.line_searched.saturating_sub(1);
                    let found = find(&line[from..], b"\r\n").map(|i| from + i);
                    self.work += line.len() - from;
                    self.line_searched = line.len();
                    let Some(eol) = found else {
                        return incomplete(eof);
                    };
                    let size_text = std::str::from_utf8(&line[..eol])
                        .map_err(|_| FetchError::Malformed("chunk size"))?;
                    let size_text = size_text.split(';').next().unwrap_or("").trim();
                    if size_text.is_empty() || size_text.len() > 8 {
                        return Err(FetchError::Malformed("chunk size"));
                    }
                    let size = usize::from_str_radix(size_text, 16)
                        .map_err(|_| FetchError::Malformed("chunk size"))?;
                    self.chunk_at += eol + 2;
                    self.line_searched = 0;
                    if size == 0 {
                        return Ok(Parsed::Complete(std::mem::take(&mut self.decoded)));
                    }
                    if self.decoded.len() + size > POLICY_BYTES_MAX {
                        return Err(FetchError::TooLarge(POLICY_BYTES_MAX));
                    }
                    self.chunk_size = Some(size);
                    size
                }
            };
            let rest = &self.buf[self.chunk_at..];
            if rest.len() < size + 2 {
                return incomplete(eof);
            }
            self.decoded.extend_from_slice(&rest[..size]);
            self.work += size + 2;
            if &rest[size..size + 2] != b"\r\n" {
                return Err(FetchError::Malformed("chunk end"));
            }
            self.chunk_at += size + 2;
            self.chunk_size = None;
        }
    }
}

/// The status line and headers (without the blank line): the body's framing, or why the response is refused.
fn parse_head(head: &[u8]) -> Result<Framing, FetchError> {
    let head = std::str::from_utf8(head).map_err(|_| FetchError::Malformed("headers"))?;
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("");
    let mut parts = status.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(FetchError::Malformed("status line"));
    }
    let code: u16 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .ok_or(FetchError::Malformed("status code"))?;
    if code != 200 {
        return Err(FetchError::Status(code));
    }
    let (mut length, mut chunked, mut ctype) = (None, false, None);
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            return Err(FetchError::Malformed("header line"));
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            let n: usize = v
                .parse()
                .map_err(|_| FetchError::Malformed("Content-Length"))?;
            if length.is_some_and(|m| m != n) {
                return Err(FetchError::Malformed("two Content-Length values"));
            }
            length = Some(n);
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v.eq_ignore_ascii_case("chunked");
            if !chunked {
                return Err(FetchError::Malformed("unknown Transfer-Encoding"));
            }
        } else if k.eq_ignore_ascii_case("content-type") {
            ctype = Some(v.to_string());
        }
    }
    let media = ctype
        .as_deref()
        .map(|t| t.split(';').next().unwrap_or("").trim())
        .unwrap_or("");
    if !media.eq_ignore_ascii_case("text/plain") {
        return Err(FetchError::ContentType(ctype.unwrap_or_default()));
    }
    Ok(match length {
        _ if chunked => Framing::Chunked,
        Some(n) if n > POLICY_BYTES_MAX => return Err(FetchError::TooLarge(POLICY_BYTES_MAX)),
        Some(n) => Framing::Length(n),
        None => Framing::Close,
    })
}

/// Fetches the policy of `domain` from `addrs` (the addresses of `mta-sts.<domain>`, tried in order) on
/// `port` (443; tests use another), verifying the certificate with `tls`, everything within `timeout`.
pub async fn fetch(
    domain: &str,
    addrs: &[IpAddr],
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<Vec<u8>, FetchError> {
    let host = format!("mta-sts.{domain}");
    let work = async {
        let mut last = FetchError::Connect(host.clone());
        for ip in addrs.iter().take(4) {
            match fetch_from(&host, SocketAddr::new(*ip, port), tls.clone()).await {
                Ok(b) => return Ok(b),
                Err(e @ (FetchError::Connect(_) | FetchError::Io(_))) => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    };
    futures_lite::future::or(work, async {
        glommio::timer::sleep(timeout).await;
        Err(FetchError::Timeout(timeout.as_millis()))
    })
    .await
}

async fn fetch_from(
    host: &str,
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Vec<u8>, FetchError> {
    let tcp = glommio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| FetchError::Connect(format!("{host} [{addr}]: {e}")))?;
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| FetchError::Tls(e.to_string()))?;
    let mut s = futures_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| FetchError::Tls(format!("{host} [{addr}]: {e}")))?;
    let req = format!(
        "GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {host}\r\nUser-Agent: shardmta\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| FetchError::Io(e.to_string()))?;
    s.flush().await.map_err(|e| FetchError::Io(e.to_string()))?;
    let mut reader = ResponseReader::default();
    let mut chunk = vec![0u8; 8192];
    loop {
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| FetchError::Io(e.to_string()))?;
        if reader.len() + n > RESPONSE_BYTES_MAX {
            return Err(FetchError::TooLarge(RESPONSE_BYTES_MAX));
        }
        match reader.push(&chunk[..n], n == 0)? {
            Parsed::Complete(body) => return Ok(body),
            Parsed::Incomplete if n == 0 => return Err(FetchError::Malformed("truncated")),
            Parsed::Incomplete => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n";

    #[test]
    fn responses() {
        let r = format!("{OK}Content-Length: 5\r\n\r\nhello");
        assert_eq!(
            parse_response(r.as_bytes(), false),
            Ok(Parsed::Complete(b"hello".to_vec()))
        );
        assert_eq!(
            parse_response(&r.as_bytes()[..r.len() - 1], false),
            Ok(Parsed::Incomplete)
        );
        assert!(parse_response(&r.as_bytes()[..r.len() - 1], true).is_err());
        // Ended by the close.
        let r = format!("{OK}\r\nab");
        assert_eq!(parse_response(r.as_bytes(), false), Ok(Parsed::Incomplete));
        assert_eq!(
            parse_response(r.as_bytes(), true),
            Ok(Parsed::Complete(b"ab".to_vec()))
        );
        // Chunked, with an extension and a trailer.
        let r = format!(
            "{OK}Transfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nT: v\r\n\r\n"
        );
        assert_eq!(
            parse_response(r.as_bytes(), false),
            Ok(Parsed::Complete(b"abcde".to_vec()))
        );
        let r = format!("{OK}Transfer-Encoding: chunked\r\n\r\n3\r\nab");
        assert_eq!(parse_response(r.as_bytes(), false), Ok(Parsed::Incomplete));
        assert!(parse_response(r.as_bytes(), true).is_err());
    }

    /// A ~70 KiB chunked response (and a Content-Length one) fed one byte at a time, as a server sending 1-byte
    /// TLS records would: the same body as parsed whole, with work linear in the size (each byte examined a
    /// few times), not quadratic (re-parsing the buffer on every read: about n^2/2 byte visits).
    #[test]
    fn byte_at_a_time_is_linear() {
        let body: Vec<u8> = (0..56_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let mut chunked = format!("{OK}Transfer-Encoding: chunked\r\n\r\n").into_bytes();
        for part in body.chunks(40) {
            chunked.extend_from_slice(format!("{:x};ext=1\r\n", part.len()).as_bytes());
            chunked.extend_from_slice(part);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        assert!(chunked.len() > 70 * 1024 && chunked.len() <= RESPONSE_BYTES_MAX);
        let mut by_length = format!("{OK}Content-Length: {}\r\n\r\n", body.len()).into_bytes();
        by_length.extend_from_slice(&body);
        // The chunked body is complete with the "0\r\n" line (the trailer's end is not waited for).
        for (response, complete_at) in
            [(&chunked, chunked.len() - 2), (&by_length, by_length.len())]
        {
            assert_eq!(
                parse_response(response, false),
                Ok(Parsed::Complete(body.clone()))
            );
            let mut r = ResponseReader::default();
            let mut result = None;
            for (i, b) in response.iter().enumerate() {
                match r.push(std::slice::from_ref(b), false) {
                    Ok(Parsed::Incomplete) => {}
                    other => {
                        assert_eq!(i + 1, complete_at, "complete when the body is");
                        result = Some(other);
                        break;
                    }
                }
            }
            assert_eq!(result, Some(Ok(Parsed::Complete(body.clone()))));
            let n = response.len();
            assert!(r.work() <= 4 * n, "work {} for {n} bytes", r.work());
        }
    }

    #[test]
    fn refusals() {
        let redirect = "HTTP/1.1 301 Moved\r\nLocation: https://elsewhere/\r\n\r\n";
        assert_eq!(
            parse_response(redirect.as_bytes(), true),
            Err(FetchError::Status(301))
        );
        let html = "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 1\r\n\r\nx";
        assert!(matches!(
            parse_response(html.as_bytes(), true),
            Err(FetchError::ContentType(_))
        ));
        let none = "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx";
        assert!(matches!(
            parse_response(none.as_bytes(), true),
            Err(FetchError::ContentType(_))
        ));
        let big = format!("{OK}Content-Length: {}\r\n\r\n", POLICY_BYTES_MAX + 1);
        assert_eq!(
            parse_response(big.as_bytes(), false),
            Err(FetchError::TooLarge(POLICY_BYTES_MAX))
        );
        let mut endless = format!("{OK}\r\n").into_bytes();
        endless.resize(endless.len() + POLICY_BYTES_MAX + 1, b'a');
        assert_eq!(
            parse_response(&endless, false),
            Err(FetchError::TooLarge(POLICY_BYTES_MAX))
        );
        let huge_chunk = format!("{OK}Transfer-Encoding: chunked\r\n\r\nfffffff\r\n");
        assert_eq!(
            parse_response(huge_chunk.as_bytes(), false),
            Err(FetchError::TooLarge(POLICY_BYTES_MAX))
        );
        let long_head = vec![b'a'; HEADER_BYTES_MAX + 1];
        assert!(parse_response(&long_head, false).is_err());
        assert!(parse_response(b"SMTP 220 hello\r\n\r\n", true).is_err());
        let two = format!("{OK}Content-Length: 1\r\nContent-Length: 2\r\n\r\nxx");
        assert!(parse_response(two.as_bytes(), true).is_err());
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let alphabet = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n0123456789abcdef;\xff";
        for _ in 0..20_000 {
            let len = (x % 300) as usize;
            let mut v = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push(alphabet[(x % alphabet.len() as u64) as usize]);
            }
            let _ = parse_response(&v, false);
            let _ = parse_response(&v, true);
            let mut framed = format!("{OK}Transfer-Encoding: chunked\r\n\r\n").into_bytes();
            framed.extend_from_slice(&v);
            let whole = parse_response(&framed, true);
            // Fed in pieces, the reader comes to the same result as on the whole response.
            let mut r = ResponseReader::default();
            let mut pieces = framed.chunks(1 + (x % 7) as usize).peekable();
            let mut got = Ok(Parsed::Incomplete);
            while let Some(p) = pieces.next() {
                got = r.push(p, pieces.peek().is_none());
                if got != Ok(Parsed::Incomplete) {
                    break;
                }
            }
            assert_eq!(got, whole, "{:?}", String::from_utf8_lossy(&framed));
        }
    }
}
