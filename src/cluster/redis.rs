//! The shard's Redis client: the `redis://` URL, RESP2 commands and replies (the `redis-protocol` codec) over
//! one glommio `TcpStream` per shard, opened lazily, with TCP_NODELAY. Calls queue to one driver task that
//! sends every call due at once as one pipelined write and reads their replies in order; each call has a
//! deadline (`redis_timeout`); a failed connection is dropped and retried after a backoff (100 ms doubling to
//! 5 s), during which calls fail at once (the caller falls back to its local share). Nothing here blocks the
//! reactor: a host name is resolved on the shard's blocking pool.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use redis_protocol::resp2::decode::decode;
use redis_protocol::resp2::encode::encode_borrowed;
use redis_protocol::resp2::types::{BorrowedFrame, OwnedFrame};

/// Calls waiting for the driver, per shard (past that a call fails with [`RedisError::Busy`]).
pub const CALLS_QUEUED_MAX: usize = 4096;
/// Calls sent in one pipelined write.
pub const BATCH_MAX: usize = 128;
/// Largest reply (or pipelined batch of replies) read: the scripts answer integers.
pub const REPLY_BYTES_MAX: usize = 1 << 20;
/// Most arguments in one command (a batched lease refresh names two per lease).
pub const ARGS_MAX: usize = 8192;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("redis_url {0:?}: must start with redis://")]
    Scheme(String),
    #[error("redis_url {0:?}: no host")]
    Host(String),
    #[error("redis_url {0:?}: bad port")]
    Port(String),
    #[error("redis_url {0:?}: the path must be a database number (/0 .. /15 usually)")]
    Db(String),
}

/// `redis://[[user]:password@]host[:port][/db]` (the form redis-cli and KumoMTA take).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrl {
    pub host: String,
    pub port: u16,
    pub db: u32,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// `url` with any `user:password@` part replaced by `***@`.
fn redacted(url: &str) -> String {
    let t = url.trim();
    let (scheme, rest) = t.split_at(t.find("://").map_or(0, |i| i + 3));
    match rest.rfind('@') {
        Some(i) => format!("{scheme}***@{}", &rest[i + 1..]),
        None => t.to_string(),
    }
}

impl RedisUrl {
    pub fn parse(url: &str) -> Result<RedisUrl, UrlError> {
        // Errors show the URL without its credentials (they end up in logs and `check-config` output).
        let shown = redacted(url);
        let s = shown.as_str();
        let rest = url
            .trim()
            .strip_prefix("redis://")
            .ok_or_else(|| UrlError::Scheme(s.into()))?;
        let (auth, rest) = match rest.rfind('@') {
            Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
            None => (None, rest),
        };
        let (hostport, db) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let db = if db.is_empty() {
            0
        } else {
            db.parse().map_err(|_| UrlError::Db(s.into()))?
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, p) = v6.split_once(']').ok_or_else(|| UrlError::Host(s.into()))?;
            (h, p.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
            return Err(UrlError::Host(s.into()));
        }
        let port = match port {
            None => 6379,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err(UrlError::Port(s.into())),
            },
        };
        let (username, password) = match auth {
            None => (None, None),
            Some(a) => match a.split_once(':') {
                Some((u, p)) => ((!u.is_empty()).then(|| u.to_string()), Some(p.to_string())),
                None => (None, Some(a.to_string())),
            },
        };
        Ok(RedisUrl {
            host: host.to_string(),
            port,
            db,
            username,
            password,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedisError {
    /// No connection (refused, reset, in backoff after a failure).
    #[error("redis unreachable: {0}")]
    Unreachable(String),
    #[error("redis did not answer in time")]
    Timeout,
    /// More calls waiting than `CALLS_QUEUED_MAX`.
    #[error("redis client busy")]
    Busy,
    #[error("redis protocol error: {0}")]
    Protocol(String),
    /// An error reply (`-ERR ...`, `-NOSCRIPT ...`).
    #[error("redis replied: {0}")]
    Reply(String),
}

impl RedisError {
    /// Whether the server itself is unusable (as opposed to one command's error reply).
    pub fn is_down(&self) -> bool {
        !matches!(self, RedisError::Reply(_))
    }
}

/// Appends one command (a RESP array of bulk strings) to `out`.
pub fn encode_command(out: &mut Vec<u8>, args: &[&[u8]]) -> Result<(), RedisError> {
    if args.is_empty() || args.len() > ARGS_MAX {
        return Err(RedisError::Protocol(format!(
            "{} arguments in one command",
            args.len()
        )));
    }
    let frames: Vec<BorrowedFrame<'_>> =
        args.iter().map(|a| BorrowedFrame::BulkString(a)).collect();
    let frame = BorrowedFrame::Array(&frames);
    let start = out.len();
    out.resize(start + frame.encode_len(false), 0);
    encode_borrowed(&mut out[start..], &frame, false)
        .map(|_| ())
        .map_err(|e| RedisError::Protocol(e.to_string()))
}

/// The first complete reply in `buf` and its length; `None`: more bytes needed. A reply nesting arrays deeper
/// than `NESTING_MAX` is refused before the decoder sees it (it recurses once per level: `*1\r\n` repeated
/// would overflow the executor's stack).
pub fn decode_reply(buf: &[u8]) -> Result<Option<(OwnedFrame, usize)>, RedisError> {
    if nests_too_deep(buf) {
        return Err(RedisError::Protocol(format!(
            "reply nests arrays deeper than {NESTING_MAX}"
        )));
    }
    decode(buf).map_err(|e| RedisError::Protocol(e.to_string()))
}

/// Deepest array nesting a reply may have (the deepest we read, XREAD's, is 4).
pub const NESTING_MAX: usize = 8;

/// Whether the reply at the start of `buf` (as far as it has arrived) nests arrays deeper than `NESTING_MAX`:
/// a walk over its element headers with a stack of the elements left per open array (at most `NESTING_MAX`
/// + 1 entries).
fn nests_too_deep(buf: &[u8]) -> bool {
    let mut open: Vec<i64> = Vec::new();
    let mut i = 0;
    loop {
        let Some(nl) = buf[i..].windows(2).position(|w| w == b"\r\n") else {
            return false;
        };
        let line = &buf[i..i + nl];
        i += nl + 2;
        let Some((&kind, rest)) = line.split_first() else {
            return false;
        };
        let n: i64 = std::str::from_utf8(rest)
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        match kind {
            b'*' if n > 0 => {
                open.push(n);
                if open.len() > NESTING_MAX {
                    return true;
                }
                continue;
            }
            b'$' if n >= 0 => {
                i = i.saturating_add(n as usize).saturating_add(2);
                if i > buf.len() {
                    return false;
                }
            }
            _ => {}
        }
        // An element is complete: so are the arrays it completes.
        loop {
            match open.last_mut() {
                None => return false,
                Some(left) => {
                    *left -= 1;
                    if *left > 0 {
                        break;
                    }
                    open.pop();
                }
            }
        }
    }
}

/// An error frame as an error.
pub fn check(frame: OwnedFrame) -> Result<OwnedFrame, RedisError> {
    match frame {
        OwnedFrame::Error(e) => Err(RedisError::Reply(e)),
        f => Ok(f),
    }
}

/// An integer reply.
pub fn integer(frame: &OwnedFrame) -> Result<i64, RedisError> {
    match frame {
        OwnedFrame::Integer(i) => Ok(*i),
        f => Err(RedisError::Protocol(format!("integer expected, got {f:?}"))),
    }
}

struct Request {
    cmd: Vec<u8>,
    reply: flume::Sender<Result<OwnedFrame, RedisError>>,
}

/// One shard's client. Calls are answered in order; the connection is opened at the first call.
pub struct Client {
    timeout: Duration,
    tx: flume::Sender<Request>,
    /// The driver's end, until the first call starts it.
    pending: RefCell<Option<Pending>>,
}

/// What the driver task takes when the first call starts it.
struct Pending {
    url: RedisUrl,
    setup: Vec<Vec<u8>>,
    rx: flume::Receiver<Request>,
}

impl Client {
    /// `setup`: commands sent first on every new connection (AUTH/SELECT are added from the URL), e.g.
    /// SCRIPT LOAD; an error reply to one of them fails the connection.
    pub fn new(url: RedisUrl, timeout: Duration, setup: Vec<Vec<u8>>) -> Client {
        let (tx, rx) = flume::bounded(CALLS_QUEUED_MAX);
        Client {
            timeout,
            tx,
            pending: RefCell::new(Some(Pending { url, setup, rx })),
        }
    }

    /// Sends one command (as given by [`encode_command`]) and waits, at most the timeout, for its reply.
    pub async fn call(&self, cmd: Vec<u8>) -> Result<OwnedFrame, RedisError> {
        if let Some(Pending { url, setup, rx }) = self.pending.borrow_mut().take() {
            glommio::spawn_local(drive(url, setup, self.timeout, rx)).detach();
        }
        let (tx, rx) = flume::bounded(1);
        self.tx
            .try_send(Request { cmd, reply: tx })
            .map_err(|_| RedisError::Busy)?;
        let timeout = self.timeout;
        futures_lite::future::or(
            async { rx.recv_async().await.unwrap_or(Err(RedisError::Timeout)) },
            async {
                glommio::timer::sleep(timeout).await;
                Err(RedisError::Timeout)
            },
        )
        .await
        .and_then(check)
    }
}

/// An open connection and its read buffer (at most `REPLY_BYTES_MAX`).
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(
        url: &RedisUrl,
        setup: &[Vec<u8>],
        timeout: Duration,
    ) -> Result<Conn, RedisError> {
        let addr = resolve(url).await?;
        let stream = TcpStream::connect_timeout(addr, timeout)
            .await
            .map_err(|e| RedisError::Unreachable(format!("{addr}: {e}")))?;
        stream
            .set_nodelay(true)
            .map_err(|e| RedisError::Unreachable(e.to_string()))?;
        let mut c = Conn {
            stream,
            buf: Vec::with_capacity(4096),
        };
        let mut out = Vec::new();
        let mut n = 0;
        if let Some(p) = &url.password {
            match &url.username {
                Some(u) => encode_command(&mut out, &[b"AUTH", u.as_bytes(), p.as_bytes()])?,
                None => encode_command(&mut out, &[b"AUTH", p.as_bytes()])?,
            }
            n += 1;
        }
        if url.db != 0 {
            encode_command(&mut out, &[b"SELECT", url.db.to_string().as_bytes()])?;
            n += 1;
        }
        for s in setup {
            out.extend_from_slice(s);
            n += 1;
        }
        if n > 0 {
            let replies = with_timeout(timeout, c.round_trip(&out, n)).await?;
            for r in replies {
                check(r)?;
            }
        }
        Ok(c)
    }

    /// Writes `out` (`n` commands) and reads `n` replies.
    async fn round_trip(&mut self, out: &[u8], n: usize) -> Result<Vec<OwnedFrame>, RedisError> {
        let io = |e: std::io::Error| RedisError::Unreachable(e.to_string());
        self.stream.write_all(out).await.map_err(io)?;
        let mut replies = Vec::with_capacity(n);
        let mut chunk = [0u8; 4096];
        while replies.len() < n {
            if let Some((frame, used)) = decode_reply(&self.buf)? {
                self.buf.drain(..used);
                replies.push(frame);
                continue;
            }
            if self.buf.len() >= REPLY_BYTES_MAX {
                return Err(RedisError::Protocol("reply too large".into()));
            }
            let got = self.stream.read(&mut chunk).await.map_err(io)?;
            if got == 0 {
                return Err(RedisError::Unreachable("connection closed by redis".into()));
            }
            self.buf.extend_from_slice(&chunk[..got]);
        }
        Ok(replies)
    }
}

async fn with_timeout<T>(
    d: Duration,
    f: impl std::future::Future<Output = Result<T, RedisError>>,
) -> Result<T, RedisError> {
    futures_lite::future::or(f, async {
        glommio::timer::sleep(d).await;
        Err(RedisError::Timeout)
    })
    .await
}

/// The server's address: an IP literal at once, a name on the shard's blocking pool.
async fn resolve(url: &RedisUrl) -> Result<SocketAddr, RedisError> {
    if let Ok(ip) = url.host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, url.port));
    }
    let target = (url.host.clone(), url.port);
    glommio::executor()
        .spawn_blocking(move || {
            use std::net::ToSocketAddrs;
            target.to_socket_addrs().map(|mut a| a.next())
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| RedisError::Unreachable(format!("cannot resolve {}", url.host)))
}

/// The driver: takes every call due (up to `BATCH_MAX`), sends them in one write, answers them in order.
async fn drive(
    url: RedisUrl,
    setup: Vec<Vec<u8>>,
    timeout: Duration,
    rx: flume::Receiver<Request>,
) {
    let mut conn: Option<Conn> = None;
    let mut backoff = BACKOFF_MIN;
    let mut retry_at: Option<Instant> = None;
    let mut batch: Vec<Request> = Vec::with_capacity(BATCH_MAX);
    let mut out = Vec::new();
    while let Ok(first) = rx.recv_async().await {
        batch.push(first);
        while batch.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        // Callers that gave up (timed out) need no answer.
        batch.retain(|r| !r.reply.is_disconnected());
        if batch.is_empty() {
            continue;
        }
        let fail = |batch: &mut Vec<Request>, e: RedisError| {
            for r in batch.drain(..) {
                let _ = r.reply.try_send(Err(e.clone()));
            }
        };
        // At most two tries: a second one, at once on a new connection, when a reused connection turns out
        // closed (Redis's idle `timeout`, a failover behind the address). Every script is idempotent except the
        // rate's, which then loses one slot.
        for attempt in 0..2 {
            let reused = conn.is_some();
            if conn.is_none() {
                if let Some(t) = retry_at {
                    if Instant::now() < t {
                        fail(
                            &mut batch,
                            RedisError::Unreachable("in backoff after a failure".into()),
                        );
                        break;
                    }
                }
                match with_timeout(timeout, Conn::open(&url, &setup, timeout)).await {
                    Ok(c) => {
                        conn = Some(c);
                        backoff = BACKOFF_MIN;
                        retry_at = None;
                    }
                    Err(e) => {
                        retry_at = Some(Instant::now() + backoff);
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        fail(&mut batch, e);
                        break;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { break };
            out.clear();
            for r in &batch {
                out.extend_from_slice(&r.cmd);
            }
            match with_timeout(timeout, c.round_trip(&out, batch.len())).await {
                Ok(replies) => {
                    for (r, f) in batch.drain(..).zip(replies) {
                        let _ = r.reply.try_send(Ok(f));
                    }
                    break;
                }
                Err(e) => {
                    // The stream may hold a half-read reply: never reuse it.
                    conn = None;
                    if reused && attempt == 0 && matches!(e, RedisError::Unreachable(_)) {
                        continue;
                    }
                    retry_at = Some(Instant::now() + BACKOFF_MIN);
                    fail(&mut batch, e);
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_nesting_is_refused_before_the_decoder() {
        let deep = b"*1\r\n".repeat(10_000);
        assert!(matches!(decode_reply(&deep), Err(RedisError::Protocol(_))));
        let nine = [b"*1\r\n".repeat(9), b":1\r\n".to_vec()].concat();
        assert!(decode_reply(&nine).is_err());
        // XREAD's shape (4 levels) and a bulk string holding "*1\r\n" bytes are fine.
        let xread = b"*1\r\n*2\r\n$3\r\nkey\r\n*1\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\na\r\n$8\r\n*1\r\n*1\r\n\r\n";
        assert!(matches!(decode_reply(xread), Ok(Some((_, n))) if n == xread.len()));
        let eight = [b"*1\r\n".repeat(8), b":1\r\n".to_vec()].concat();
        assert!(matches!(decode_reply(&eight), Ok(Some(_))));
    }

    #[test]
    fn url_errors_do_not_show_the_password() {
        let e = RedisUrl::parse("redis://user:s3cret@host:notaport").unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
        assert!(e.to_string().contains("***@host"), "{e}");
    }

    #[test]
    fn urls() {
        let u = RedisUrl::parse("redis://127.0.0.1:6379").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.db), ("127.0.0.1", 6379, 0));
        assert_eq!(u.password, None);
        let u = RedisUrl::parse("redis://:s3cret@redis.example/2").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.db), ("redis.example", 6379, 2));
        assert_eq!((u.username, u.password.as_deref()), (None, Some("s3cret")));
        let u = RedisUrl::parse("redis://mta:pw@[::1]:7000/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 7000));
        assert_eq!(u.username.as_deref(), Some("mta"));
        for bad in [
            "http://h:1",
            "redis://",
            "redis://h:0",
            "redis://h:99999",
            "redis://h:x",
            "redis://h/db",
            "redis://[::1",
        ] {
            assert!(RedisUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn commands_and_replies() {
        let mut out = Vec::new();
        encode_command(&mut out, &[b"ZREM", b"k", b"a b"]).unwrap();
        assert_eq!(out, b"*3\r\n$4\r\nZREM\r\n$1\r\nk\r\n$3\r\na b\r\n");
        assert!(encode_command(&mut out, &[]).is_err());
        // Pipelined replies come one at a time; a partial one asks for more.
        let buf = b":1\r\n-NOSCRIPT No matching script\r\n$2\r\nab\r\n*2\r\n:3\r\n$-1\r\n+O";
        let (f, n) = decode_reply(buf).unwrap().unwrap();
        assert_eq!((integer(&f).unwrap(), n), (1, 4));
        let (f, m) = decode_reply(&buf[n..]).unwrap().unwrap();
        assert!(matches!(check(f), Err(RedisError::Reply(e)) if e.starts_with("NOSCRIPT")));
        let (f, k) = decode_reply(&buf[n + m..]).unwrap().unwrap();
        assert_eq!(f, OwnedFrame::BulkString(b"ab".to_vec()));
        assert!(integer(&f).is_err());
        let (f, l) = decode_reply(&buf[n + m + k..]).unwrap().unwrap();
        assert_eq!(
            f,
            OwnedFrame::Array(vec![OwnedFrame::Integer(3), OwnedFrame::Null])
        );
        assert_eq!(decode_reply(&buf[n + m + k + l..]).unwrap(), None);
        // Hostile bytes are an error, never a panic.
        assert!(decode_reply(b"?what\r\n").is_err());
        assert!(decode_reply(b"$-7\r\n").is_err() || decode_reply(b"$-7\r\n").unwrap().is_none());
    }
}
