//! `shardmta sendmail`: the sendmail(8) interface applications call, handing the message to the running relay
//! over SMTP on loopback. Options: `-t` (recipients from To/Cc/Bcc; Bcc removed), `-f sender`, `-i`/`-oi`
//! (a line with a single dot does not end the input), `-F name` and other `-o` options accepted and ignored,
//! recipients as arguments; the message on stdin. Exit codes follow sysexits(3).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

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

/// Sends over SMTP to `server`; returns a sysexits code and a message for stderr.
pub fn submit(
    server: SocketAddr,
    helo: &str,
    from: &str,
    rcpts: &[String],
    msg: &[u8],
) -> (u8, String) {
    let stream = match TcpStream::connect_timeout(&server, Duration::from_secs(10)) {
        Ok(s) => s,
        Err(e) => {
            return (
                exit::TEMPFAIL,
                format!("cannot connect to the relay at {server}: {e}"),
            )
        }
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(300)));
    let mut w = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => return (exit::IOERR, e.to_string()),
    };
    let mut r = BufReader::new(stream);
    let reply = |r: &mut BufReader<TcpStream>| -> Result<(u16, String), String> {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return Err("connection closed by the relay".into());
            }
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
                return Ok((code, all.trim_end().to_string()));
            }
        }
    };
    let fail = |code: u16, text: String, rcpt: bool| {
        let ex = if code / 100 == 4 {
            exit::TEMPFAIL
        } else if rcpt {
            exit::NOUSER
        } else {
            exit::UNAVAILABLE
        };
        (ex, text)
    };
    macro_rules! step {
        ($cmd:expr, $want:expr, $rcpt:expr) => {{
            if let Err(e) = w.write_all($cmd) {
                return (exit::IOERR, e.to_string());
            }
            match reply(&mut r) {
                Ok((c, _)) if c == $want || ($want == 250 && c / 100 == 2) => {}
                Ok((c, t)) => return fail(c, t, $rcpt),
                Err(e) => return (exit::TEMPFAIL, e),
            }
        }};
    }
    match reply(&mut r) {
        Ok((220, _)) => {}
        Ok((c, t)) => return fail(c, t, false),
        Err(e) => return (exit::TEMPFAIL, e),
    }
    step!(format!("EHLO {helo}\r\n").as_bytes(), 250, false);
    step!(format!("MAIL FROM:<{from}>\r\n").as_bytes(), 250, false);
    for rc in rcpts {
        step!(format!("RCPT TO:<{rc}>\r\n").as_bytes(), 250, true);
    }
    step!(b"DATA\r\n", 354, false);
    let mut data = Vec::with_capacity(msg.len() + 64);
    crate::smtp::client::encode_data(&mut data, &[msg]);
    step!(&data, 250, false);
    let _ = w.write_all(b"QUIT\r\n");
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
