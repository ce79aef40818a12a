//! The command line's side of the control plane: one HTTP/1.1 request to a running server's control socket
//! (`<queue_directory>/control.sock`, the HTTP API's Unix-socket listener) over a blocking `UnixStream`, and
//! its answer. Only for talking to our own server: `Connection: close`, the answer read to its end (at most
//! [`limits::CONTROL_ANSWER_BYTES_MAX`]), `Content-Length` or chunked bodies.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::limits;

/// The control socket of the server whose spool is `queue_directory`.
pub fn socket_path(queue_directory: &Path) -> PathBuf {
    queue_directory.join("control.sock")
}

/// Why a request to the running server failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens there (no socket file, or connection refused): the server is not running.
    #[error("no server answers on {0}")]
    NotRunning(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Something other than a socket is at the socket's path (a symlink planted there, a file): never
    /// followed, since the command may run as root.
    #[error("{0} is not a socket (a symlink or another file is there): remove it; the server makes a new one at start")]
    NotASocket(PathBuf),
    #[error("malformed answer from the server: {0}")]
    Malformed(&'static str),
}

/// A status code and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    /// The answer if its status is 2xx, else the CLI's error naming the status and the server's words.
    pub fn success(self) -> Result<Answer, String> {
        if (200..300).contains(&self.status) {
            Ok(self)
        } else {
            Err(format!(
                "the server answered {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body).trim()
            ))
        }
    }
}

/// Connects to the control socket; [`ClientError::NotRunning`] when no server is there.
pub fn connect(socket: &Path) -> Result<UnixStream, ClientError> {
    use std::os::unix::fs::FileTypeExt;
    // The spool belongs to mail_owner: whoever runs as that account could put a symlink here, leading the
    // command (often run as root) to another service's socket. Only a socket itself is connected to.
    match std::fs::symlink_metadata(socket) {
        Ok(m) if m.file_type().is_socket() => {}
        Ok(_) => return Err(ClientError::NotASocket(socket.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ClientError::NotRunning(socket.to_path_buf()))
        }
        Err(source) => {
            return Err(ClientError::Io {
                path: socket.to_path_buf(),
                source,
            })
        }
    }
    // sun_path holds 107 bytes: a socket in a longer spool path (the server binds it through its directory's
    // descriptor) is reached the same way.
    let dir = match (socket.parent(), socket.file_name()) {
        (Some(d), Some(name)) if socket.as_os_str().len() >= 100 => match std::fs::File::open(d) {
            Ok(f) => Some((f, name.to_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ClientError::NotRunning(socket.to_path_buf()))
            }
            Err(source) => {
                return Err(ClientError::Io {
                    path: socket.to_path_buf(),
                    source,
                })
            }
        },
        _ => None,
    };
    let connected = match &dir {
        Some((f, name)) => {
            use std::os::fd::AsRawFd;
            let mut short = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
            short.push(name);
            UnixStream::connect(short)
        }
        None => UnixStream::connect(socket),
    };
    match connected {
        Ok(s) => Ok(s),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Err(ClientError::NotRunning(socket.to_path_buf()))
        }
        Err(source) => Err(ClientError::Io {
            path: socket.to_path_buf(),
            source,
        }),
    }
}

/// Sends `method path` with an optional JSON body over `stream` and reads the answer.
pub fn request(
    mut stream: UnixStream,
    socket: &Path,
    method: &str,
    path: &str,
    json: Option<&[u8]>,
) -> Result<Answer, ClientError> {
    let io = |source| ClientError::Io {
        path: socket.to_path_buf(),
        source,
    };
    // The answer to a queue change comes after its sync; a shard answers within CONTROL_ANSWER_TIMEOUT.
    let wait = limits::CONTROL_ANSWER_TIMEOUT + Duration::from_secs(5);
    stream.set_read_timeout(Some(wait)).map_err(io)?;
    stream.set_write_timeout(Some(wait)).map_err(io)?;
    let body = json.unwrap_or(b"");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if json.is_some() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).map_err(io)?;
    stream.write_all(body).map_err(io)?;
    let mut raw = Vec::new();
    stream
        .take(limits::CONTROL_ANSWER_BYTES_MAX as u64 + 1)
        .read_to_end(&mut raw)
        .map_err(io)?;
    if raw.len() > limits::CONTROL_ANSWER_BYTES_MAX {
        return Err(ClientError::Malformed("answer too large"));
    }
    parse_answer(&raw)
}

/// Parses a complete HTTP/1.1 answer (status line, headers, body by length, chunks or to the end).
pub fn parse_answer(raw: &[u8]) -> Result<Answer, ClientError> {
    let end =
        memchr::memmem::find(raw, b"\r\n\r\n").ok_or(ClientError::Malformed("no header end"))?;
    let head =
        std::str::from_utf8(&raw[..end]).map_err(|_| ClientError::Malformed("header not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(ClientError::Malformed("not an HTTP/1 status line"));
    }
    let status: u16 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .ok_or(ClientError::Malformed("bad status code"))?;
    let (mut length, mut chunked) = (None, false);
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            length = Some(
                v.parse::<usize>()
                    .map_err(|_| ClientError::Malformed("bad Content-Length"))?,
            );
        } else if k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked") {
            chunked = true;
        }
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or(ClientError::Malformed("body shorter than Content-Length"))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Answer { status, body })
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, ClientError> {
    let mut out = Vec::new();
    // Bounded: every round consumes at least the chunk-size line.
    loop {
        let eol = memchr::memmem::find(b, b"\r\n").ok_or(ClientError::Malformed("chunk size"))?;
        let size_txt = std::str::from_utf8(&b[..eol])
            .ok()
            .map(|s| s.split(';').next().unwrap_or("").trim())
            .ok_or(ClientError::Malformed("chunk size"))?;
        let size = usize::from_str_radix(size_txt, 16)
            .map_err(|_| ClientError::Malformed("chunk size"))?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = b
            .get(..size)
            .ok_or(ClientError::Malformed("truncated chunk"))?;
        out.extend_from_slice(chunk);
        b = b
            .get(size + 2..)
            .ok_or(ClientError::Malformed("truncated chunk"))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_by_length_chunks_and_close() {
        let a = parse_answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}xx").unwrap();
        assert_eq!((a.status, &a.body[..]), (200, &b"{}"[..]));
        let a = parse_answer(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((a.status, &a.body[..]), (404, &b"abcde"[..]));
        let a = parse_answer(b"HTTP/1.0 503 x\r\n\r\nrest").unwrap();
        assert_eq!((a.status, &a.body[..]), (503, &b"rest"[..]));
        for bad in [
            &b"HTTP/1.1 200 OK\r\n"[..],
            b"SMTP 200\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab",
        ] {
            assert!(
                parse_answer(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_socket_in_a_long_spool_path_is_reached() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&dir).unwrap();
        let p = socket_path(&dir);
        assert!(p.as_os_str().len() > 108);
        // Nothing there yet: not running (not an error about the path's length).
        assert!(
            matches!(connect(&p), Err(ClientError::NotRunning(_))),
            "{:?}",
            connect(&p)
        );
        // Bound as the server does, through the directory's descriptor.
        let d = std::fs::File::open(&dir).unwrap();
        let short = format!(
            "/proc/self/fd/{}/control.sock",
            std::os::fd::AsRawFd::as_raw_fd(&d)
        );
        let l = std::os::unix::net::UnixListener::bind(short).unwrap();
        connect(&p).unwrap();
        drop(l);
        assert!(matches!(connect(&p), Err(ClientError::NotRunning(_))));
    }

    /// A symlink planted at the socket's path, to another service's listening socket, is not followed.
    #[test]
    fn a_symlink_at_the_socket_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("other.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&other).unwrap();
        let p = socket_path(dir.path());
        std::os::unix::fs::symlink(&other, &p).unwrap();
        assert!(matches!(connect(&p), Err(ClientError::NotASocket(_))));
        // A plain file there is refused too; the real socket is connected to.
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, b"x").unwrap();
        assert!(matches!(connect(&p), Err(ClientError::NotASocket(_))));
        assert!(connect(&other).is_ok());
    }

    #[test]
    fn no_socket_means_not_running() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            connect(&socket_path(dir.path())),
            Err(ClientError::NotRunning(_))
        ));
        // A socket file nobody listens on.
        let p = socket_path(dir.path());
        drop(std::os::unix::net::UnixListener::bind(&p).unwrap());
        assert!(matches!(connect(&p), Err(ClientError::NotRunning(_))));
    }
}
