//! `shardmta sendmail`: the sendmail(8) interface applications call, handing the message to the running relay
//! over SMTP on loopback. Options: `-t` (recipients from To/Cc/Bcc; Bcc removed), `-f sender`, `-i`/`-oi`
//! (a line with a single dot does not end the input), `-F name` and other `-o` options accepted and ignored,
//! recipients as arguments; the message on stdin. Exit codes follow sysexits(3). The SMTP dialogue is the
//! library's client session ([`crate::smtp::client_session`]) pumped over a blocking socket.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::smtp::client_session::{
    ClientSession, Event, Params, SessionError, Timeouts, Transaction,
};

/// sysexits(3) codes.
pub mod exit {
    pub const OK: u8 = 0;
    pub const USAGE: u8 = 64;
    pub const DATAERR: u8 = 65;
    pub const NOUSER: u8 = 67;
    pub const UNAVAILABLE: u8 = 69;
    pub const IOERR: u8 = 74;
    pub const TEMPFAIL: u8 = 75;
}

/// How long to wait for the relay's TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest message read from stdin (the relay's own limit applies on top).
const INPUT_BYTES_MAX: usize = 64 << 20;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Options {
    pub from: Option<String>,
    pub extract_recipients: bool,
    pub ignore_dots: bool,
    pub recipients: Vec<String>,
}

/// Parses sendmail's command line (the arguments after `sendmail`).
pub fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut o = Options::default();
    let mut it = args.iter().peekable();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-t" => o.extract_recipients = true,
            "-i" | "-oi" => o.ignore_dots = true,
            "-f" | "-r" => o.from = Some(it.next().ok_or("-f needs a sender address")?.clone()),
            "-F" => {
                it.next().ok_or("-F needs a name")?;
            }
            "--" => o.recipients.extend(it.by_ref().cloned()),
            s if s.starts_with("-f") || s.starts_with("-r") => o.from = Some(s[2..].to_string()),
            s if s.starts_with("-F")
                || s.starts_with("-o")
                || s == "-bm"
                || s == "-U"
                || s == "-v" => {}
            s if s.starts_with('-') => return Err(format!("unsupported option {s}")),
            s => o.recipients.push(s.to_string()),
        }
    }
    if o.recipients.is_empty() && !o.extract_recipients {
        return Err("no recipients (give addresses or -t)".into());
    }
    Ok(o)
}

/// Reads the message from `input`: LF line ends become CRLF; without `ignore_dots` a line holding a single dot
/// ends the input, as in sendmail.
pub fn read_message(input: impl Read, ignore_dots: bool) -> Result<Vec<u8>, String> {
    let mut r = BufReader::new(input);
    let mut out = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = r
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("reading the message: {e}"))?;
        if n == 0 {
            break;
        }
        let body = line.strip_suffix(b"\n").unwrap_or(&line);
        let body = body.strip_suffix(b"\r").unwrap_or(body);
        if !ignore_dots && body == b"." {
            break;
        }
        out.extend_from_slice(body);
        out.extend_from_slice(b"\r\n");
        if out.len() > INPUT_BYTES_MAX {
            return Err("message too large".into());
        }
    }
    Ok(out)
}

/// Addresses in the To, Cc and Bcc headers, and the message with Bcc removed (for `-t`).
pub fn extract_recipients(msg: &[u8]) -> (Vec<String>, Vec<u8>) {
    let end = memchr::memmem::find(msg, b"\r\n\r\n")
        .map(|i| i + 2)
        .unwrap_or(msg.len());
    let (head, body) = msg.split_at(end);
    let text = String::from_utf8_lossy(head);
    let mut rcpts = Vec::new();
    let mut kept = String::new();
    let mut current: Option<(String, bool)> = None; // (field value so far, is a recipient field)
    let mut skip = false;
    let flush = |cur: &mut Option<(String, bool)>, rcpts: &mut Vec<String>| {
        if let Some((v, true)) = cur.take() {
            rcpts.extend(addresses(&v));
        }
    };
    for line in text.split_inclusive("\r\n") {
        if line.starts_with(' ') || line.starts_with('\t') {
            if let Some((v, _)) = current.as_mut() {
                v.push_str(line);
            }
            if !skip {
                kept.push_str(line);
            }
            continue;
        }
        flush(&mut current, &mut rcpts);
        let name = line
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let is_rcpt = matches!(name.as_str(), "to" | "cc" | "bcc");
        skip = name == "bcc";
        if line.contains(':') {
            current = Some((
                line.split_once(':')
                    .map(|(_, v)| v.to_string())
                    .unwrap_or_default(),
                is_rcpt,
            ));
        }
        if !skip {
            kept.push_str(line);
        }
    }
    flush(&mut current, &mut rcpts);
    let mut out = kept.into_bytes();
    out.extend_from_slice(body);
    (rcpts, out)
}

/// `a@b, "Name" <c@d>` -> ["a@b", "c@d"] (simple RFC 5322 address lists).
fn addresses(v: &str) -> Vec<String> {
    v.split(',')
        .filter_map(|part| {
            let p = part.trim();
            let a = match (p.rfind('<'), p.rfind('>')) {
                (Some(i), Some(j)) if i < j => &p[i + 1..j],
                _ => p.split_whitespace().next().unwrap_or(""),
            };
            a.contains('@').then(|| a.to_string())
        })
        .collect()
}

/// The default sender: `$USER@hostname`.
pub fn default_sender(hostname: &str) -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "root".into());
    format!("{user}@{hostname}")
}

/// Runs blocking I/O on `stream` until the session has an event (the session's own failures, timeouts
/// included, come as [`Event::Failed`]; `Err`: the socket failed).
fn pump(stream: &mut TcpStream, s: &mut ClientSession) -> Result<Event, String> {
    loop {
        if let Some(e) = s.poll_event() {
            return Ok(e);
        }
        if let Some(bytes) = s.poll_transmit() {
            let n = bytes.len();
            stream.write_all(bytes).map_err(|e| e.to_string())?;
            s.advance_transmit(n, Instant::now());
            continue;
        }
        if s.is_closed() {
            return Ok(Event::Closed);
        }
        let Some(deadline) = s.poll_timeout() else {
            return Err("nothing to wait for".into());
        };
        let now = Instant::now();
        if deadline <= now {
            s.handle_timeout(now);
            continue;
        }
        stream
            .set_read_timeout(Some(deadline - now))
            .map_err(|e| e.to_string())?;
        let buf = s.input_buffer();
        if buf.is_empty() {
            s.input_filled(0, now);
            continue;
        }
        match stream.read(buf) {
            Ok(0) => s.handle_eof(),
            Ok(n) => s.input_filled(n, Instant::now()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                s.handle_timeout(Instant::now())
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// The exit code for a refusal: 4xx temporary, a refused recipient EX_NOUSER, else EX_UNAVAILABLE.
fn refused(code: u16, text: String, rcpt: bool) -> (u8, String) {
    let ex = if code / 100 == 4 {
        exit::TEMPFAIL
    } else if rcpt {
        exit::NOUSER
    } else {
        exit::UNAVAILABLE
    };
    (ex, text)
}

fn session_failed(e: &SessionError) -> (u8, String) {
    match e {
        SessionError::Refused { reply, .. } | SessionError::Closing { reply, .. } => {
            refused(reply.code, reply.one_line(), false)
        }
        other => (exit::TEMPFAIL, other.to_string()),
    }
}

/// Sends over SMTP to `server`, driving the library's client session over a blocking socket, one command at
/// a time (the first refused recipient ends the submission, as before); returns a sysexits code and a message
/// for stderr.
pub fn submit(
    server: SocketAddr,
    helo: &str,
    from: &str,
    rcpts: &[String],
    msg: &[u8],
) -> (u8, String) {
    let params = Params {
        pipelining: false,
        timeouts: Timeouts {
            connect: CONNECT_TIMEOUT,
            ..Timeouts::default()
        },
        ..Params::new(helo)
    };
    let mut s = ClientSession::new(params, Instant::now());
    let mut stream = match TcpStream::connect_timeout(&server, CONNECT_TIMEOUT) {
        Ok(t) => t,
        Err(e) => {
            return (
                exit::TEMPFAIL,
                format!("cannot connect to the relay at {server}: {e}"),
            )
        }
    };
    s.connected(Instant::now());
    loop {
        match pump(&mut stream, &mut s) {
            Ok(Event::Ready { .. }) => break,
            Ok(Event::Failed(e)) => return session_failed(&e),
            Ok(Event::Closed) => return (exit::TEMPFAIL, "connection closed by the relay".into()),
            Ok(_) => {}
            Err(e) => return (exit::TEMPFAIL, e),
        }
    }
    let txn = Transaction {
        sender: from,
        recipients: rcpts,
        body: &[msg],
        size: msg.len() as u64,
        eight_bit: false,
        smtputf8: false,
        wire: false,
        external: 0,
    };
    if let Err(e) = s.start_transaction(&txn, Instant::now()) {
        return (exit::USAGE, e.to_string());
    }
    loop {
        match pump(&mut stream, &mut s) {
            Ok(Event::Mail { reply, .. }) if reply.class() != 2 => {
                return refused(reply.code, s.server_reply(reply).one_line(), false)
            }
            Ok(Event::Rcpt { reply, .. }) if reply.class() != 2 => {
                return refused(reply.code, s.server_reply(reply).one_line(), true)
            }
            Ok(Event::Data { reply, .. }) if reply.code != 354 => {
                return refused(reply.code, s.server_reply(reply).one_line(), false)
            }
            Ok(Event::DataDone { reply, .. }) if reply.class() != 2 => {
                return refused(reply.code, s.server_reply(reply).one_line(), false)
            }
            Ok(Event::MessageDone { .. }) => break,
            Ok(Event::Failed(e)) => return session_failed(&e),
            Ok(Event::Closed) => return (exit::TEMPFAIL, "connection closed by the relay".into()),
            Ok(_) => {}
            Err(e) => return (exit::IOERR, e),
        }
    }
    // The message is queued: QUIT is best effort.
    s.quit(Instant::now());
    while let Ok(e) = pump(&mut stream, &mut s) {
        if matches!(e, Event::Closed | Event::Failed(_)) {
            break;
        }
    }
    (exit::OK, String::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn options() {
        let o = parse_args(&args("-oi -f app@x.test -Fname a@b.test c@d.test")).unwrap();
        assert_eq!(
            o,
            Options {
                from: Some("app@x.test".into()),
                extract_recipients: false,
                ignore_dots: true,
                recipients: vec!["a@b.test".into(), "c@d.test".into()]
            }
        );
        assert!(parse_args(&args("-t")).unwrap().extract_recipients);
        assert_eq!(
            parse_args(&args("-fme@x.test a@b"))
                .unwrap()
                .from
                .as_deref(),
            Some("me@x.test")
        );
        assert!(parse_args(&args("-q a@b")).is_err());
        assert!(parse_args(&args("-i")).is_err());
    }

    #[test]
    fn dots_and_line_ends() {
        assert_eq!(
            read_message(&b"a\nb\n.\nc\n"[..], false).unwrap(),
            b"a\r\nb\r\n"
        );
        assert_eq!(
            read_message(&b"a\n.\nc"[..], true).unwrap(),
            b"a\r\n.\r\nc\r\n"
        );
    }

    #[test]
    fn t_extracts_and_drops_bcc() {
        let m = b"To: A <a@x.test>, b@y.test\r\nCc: c@z.test\r\nBcc: hidden@w.test,\r\n other@w.test\r\nSubject: s\r\n\r\nBcc: body@q.test\r\n";
        let (r, out) = extract_recipients(m);
        assert_eq!(
            r,
            vec![
                "a@x.test",
                "b@y.test",
                "c@z.test",
                "hidden@w.test",
                "other@w.test"
            ]
        );
        let out = String::from_utf8(out).unwrap();
        assert!(
            !out.contains("hidden")
                && !out.contains("other@w")
                && out.contains("Subject: s")
                && out.ends_with("Bcc: body@q.test\r\n")
        );
    }
}
