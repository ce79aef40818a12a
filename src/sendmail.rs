//! `shardmta sendmail`: the sendmail(8) command line that applications, cron and PHP call, as a drop-in
//! /usr/sbin/sendmail (and, invoked under those names, `mailq` and `newaliases`). It owns the command line
//! ([`parse_command_line`]) and the preparation of a message before the relay sees it: recipients from the
//! headers with `-t`, bare local names qualified with `@myhostname` (Postfix's myorigin), `Date:`,
//! `Message-ID:` and `From:` added when missing ([`add_missing_headers`], as Postfix's cleanup does). The message
//! goes to the running relay over SMTP on loopback (its first `smtp` listener), the SMTP dialogue being the
//! library's client session ([`crate::smtp::client_session`]) pumped over a blocking socket ([`submit`]); one
//! refused recipient does not refuse the others. `-bs` joins stdin/stdout to that listener byte for byte
//! ([`relay_smtp_session`]); `-bp` (`mailq`) and `-q` run `shardmta queue list` and `queue flush --all`;
//! `-bv` asks the relay about each recipient without sending anything. Exit codes follow sysexits(3).
//!
//! Bounds: the message read from stdin is at most [`limits::SENDMAIL_INPUT_BYTES_MAX`] (so are the recipients
//! `-t` finds in it); `-bs` holds one [`limits::SENDMAIL_PROXY_BUFFER_BYTES`] buffer in each direction and
//! waits at most [`limits::SENDMAIL_PROXY_DRAIN_AFTER`] for the relay to close once stdin has ended; every
//! wait on the relay has the client session's per-phase timeout.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::config::{Config, ListenerKind};
use crate::limits;
use crate::smtp::client_session::{
    ClientSession, Event, Params, SessionError, Timeouts, Transaction, TxnOptions,
};

/// sysexits(3) codes.
pub mod exit {
    pub const OK: u8 = 0;
    pub const USAGE: u8 = 64;
    pub const DATAERR: u8 = 65;
    pub const NOINPUT: u8 = 66;
    pub const NOUSER: u8 = 67;
    pub const UNAVAILABLE: u8 = 69;
    pub const OSERR: u8 = 71;
    pub const IOERR: u8 = 74;
    pub const TEMPFAIL: u8 = 75;
    pub const CONFIG: u8 = 78;
}

/// What the command does (`-b` modes; the name it was invoked as sets the first one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    /// `-bm`: read a message and submit it.
    #[default]
    Deliver,
    /// `-bs`: SMTP on stdin/stdout, joined to the relay's listener.
    Smtp,
    /// `-bp`, `mailq`: list the queue.
    ListQueue,
    /// `-bv`: ask the relay about each recipient; send nothing.
    Verify,
    /// `-q`: flush the queue.
    Flush,
    /// `-bi`, `-I`, `newaliases`: check the alias files.
    NewAliases,
}

/// A bad command line (exit [`exit::USAGE`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(String);

fn usage<T>(s: impl Into<String>) -> Result<T, UsageError> {
    Err(UsageError(s.into()))
}

/// sendmail's command line, parsed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Options {
    pub mode: Mode,
    /// `-f`/`-r`: the envelope sender as given (qualified later).
    pub from: Option<String>,
    /// `-F`: the sender's full name, for an added `From:`.
    pub full_name: Option<String>,
    /// `-t`: recipients from To, Cc and Bcc (Bcc removed).
    pub extract_recipients: bool,
    /// `-i`, `-oi`: a line holding a single dot does not end the input.
    pub ignore_dots: bool,
    /// `-B 8BITMIME`.
    pub eight_bit: bool,
    /// `-N`: the DSN NOTIFY value, upper case (`NEVER` or a list of SUCCESS, FAILURE, DELAY).
    pub notify: Option<String>,
    /// `-C`: the configuration file (instead of `$SHARDMTA_CONFIG`).
    pub config: Option<PathBuf>,
    /// Recipient addresses from the arguments (each argument an address list), as given.
    pub recipients: Vec<String>,
    /// Remarks for stderr about options accepted without their effect (`-q30m`'s interval).
    pub notes: Vec<String>,
}

/// Options that take a value, glued (`-fme@x`) or as the next argument (`-f me@x`), as in Postfix's sendmail.
/// Those not handled below are accepted and ignored: `-A`, `-L`, `-O`, `-X`, `-e`, `-h`, `-p`, and `-o` other
/// than `-oi` (`-odi`, `-oem`, `-oA...`).
const OPTIONS_WITH_VALUE: &str = "ABCFLNORVXbefhopr";
/// Flags accepted and ignored: `-G`, `-U`, `-c`, `-m`, `-n`, `-v`, `-x`.
const FLAGS_IGNORED: &str = "GUcmnvx";

/// The mode a program name stands for, if sendmail's command line is what it takes: `sendmail`, `mailq`,
/// `newaliases` (the last part of `argv0`).
pub fn invoked_as(argv0: &str) -> Option<Mode> {
    match Path::new(argv0).file_name()?.to_str()? {
        "sendmail" => Some(Mode::Deliver),
        "mailq" => Some(Mode::ListQueue),
        "newaliases" => Some(Mode::NewAliases),
        _ => None,
    }
}

/// Parses sendmail's command line (the arguments after `sendmail`) for the default mode.
pub fn parse_args(args: &[String]) -> Result<Options, UsageError> {
    parse_command_line(Mode::Deliver, args)
}

/// Parses sendmail's command line the way getopt does (`-ti` is `-t -i`; a value glued or in the next
/// argument), recipients anywhere before `--` and all after it. `mode`: the one the program name gives; `-b`
/// changes it (the last one counts).
pub fn parse_command_line(mode: Mode, args: &[String]) -> Result<Options, UsageError> {
    let mut o = Options {
        mode,
        ..Options::default()
    };
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if arg == "--" {
            for a in &args[i..] {
                o.add_recipients(a)?;
            }
            break;
        }
        let Some(cluster) = arg.strip_prefix('-') else {
            o.add_recipients(arg)?;
            continue;
        };
        if cluster.is_empty() {
            return usage("a lone '-' is not an option");
        }
        for (at, c) in cluster.char_indices() {
            let rest = &cluster[at + c.len_utf8()..];
            if c == 'q' {
                // `-q` takes its value glued only: `-q30m`, `-qRsite`.
                o.mode = Mode::Flush;
                if !rest.is_empty() {
                    o.notes.push(format!(
                        "-q{rest}: only a flush of the whole queue is done (the relay retries deferred mail on its own schedule)"
                    ));
                }
                break;
            }
            if OPTIONS_WITH_VALUE.contains(c) {
                let value = if rest.is_empty() {
                    let Some(v) = args.get(i) else {
                        return usage(format!("-{c} needs a value"));
                    };
                    i += 1;
                    v.as_str()
                } else {
                    rest
                };
                o.apply_value(c, value)?;
                break;
            }
            match c {
                't' => o.extract_recipients = true,
                'i' => o.ignore_dots = true,
                'I' => o.mode = Mode::NewAliases,
                c if FLAGS_IGNORED.contains(c) => {}
                c => return usage(format!("unsupported option -{c}")),
            }
        }
    }
    match o.mode {
        Mode::Deliver if o.recipients.is_empty() && !o.extract_recipients => {
            usage("no recipients (give addresses or -t)")
        }
        Mode::Verify if o.recipients.is_empty() && !o.extract_recipients => {
            usage("-bv needs recipients")
        }
        _ => Ok(o),
    }
}

impl Options {
    fn add_recipients(&mut self, arg: &str) -> Result<(), UsageError> {
        let found = address_list(arg);
        if found.is_empty() {
            return usage(format!("no address in argument {arg:?}"));
        }
        for a in found {
            if !is_safe_address(&a) {
                return usage(format!("bad recipient address {a:?}"));
            }
            self.recipients.push(a);
        }
        Ok(())
    }

    fn apply_value(&mut self, c: char, v: &str) -> Result<(), UsageError> {
        match c {
            'b' => {
                self.mode = match v {
                    "m" => Mode::Deliver,
                    "s" => Mode::Smtp,
                    "p" => Mode::ListQueue,
                    "v" => Mode::Verify,
                    "i" => Mode::NewAliases,
                    "d" | "D" | "l" => {
                        return usage(format!("-b{v}: run `shardmta serve` for the daemon"))
                    }
                    _ => return usage(format!("unsupported mode -b{v}")),
                }
            }
            'f' | 'r' => {
                let s = sender_address(v);
                if v.chars().any(char::is_control) || !is_safe_address(&s) {
                    return usage(format!("bad sender address {v:?}"));
                }
                self.from = Some(s);
            }
            'F' => {
                if v.chars().any(char::is_control) {
                    return usage("-F: the full name has control characters");
                }
                self.full_name = Some(v.trim().to_string());
            }
            'B' => {
                self.eight_bit = match v.to_ascii_uppercase().as_str() {
                    "8BITMIME" => true,
                    "7BIT" => false,
                    _ => return usage(format!("-B {v}: the body type is 7BIT or 8BITMIME")),
                }
            }
            'N' => self.notify = Some(parse_notify(v)?),
            'R' if !v.eq_ignore_ascii_case("full") && !v.eq_ignore_ascii_case("hdrs") => {
                return usage(format!("-R {v}: the DSN return is full or hdrs"));
            }
            'V' if v.is_empty() || v.len() > 100 || !v.bytes().all(|b| b.is_ascii_graphic()) => {
                return usage(format!(
                    "-V {v:?}: the DSN envelope id is 1 to 100 printable characters"
                ));
            }
            'C' => self.config = Some(PathBuf::from(v)),
            'o' if v == "i" => self.ignore_dots = true,
            // -R and -V when valid (DSN RET and ENVID: not sent, the relay offers no DSN yet), -A -L -O -X -e
            // -h -p, and -o other than -oi: nothing to do here.
            _ => {}
        }
        Ok(())
    }
}

/// `-N` (RFC 3461 NOTIFY): `never`, or a comma list of `success`, `failure`, `delay`; upper-cased.
pub fn parse_notify(v: &str) -> Result<String, UsageError> {
    let words: Vec<String> = v
        .split(',')
        .map(|w| w.trim().to_ascii_uppercase())
        .collect();
    let known = |w: &str| matches!(w, "SUCCESS" | "FAILURE" | "DELAY");
    let ok = if words.iter().any(|w| w == "NEVER") {
        words.len() == 1
    } else {
        words.iter().all(|w| known(w)) && (1..words.len()).all(|k| !words[..k].contains(&words[k]))
    };
    if !ok {
        return usage(format!(
            "-N {v}: expected never, or a comma list of success, failure, delay"
        ));
    }
    Ok(words.join(","))
}

/// An address fit for a MAIL or RCPT command line: no control characters (a CR or LF could end the command
/// and start another), no angle brackets, not longer than an SMTP path.
fn is_safe_address(a: &str) -> bool {
    a.len() <= limits::SMTP_PATH_BYTES_MAX
        && !a.chars().any(|c| c.is_control() || c == '<' || c == '>')
}

/// `-f` value: `<a@b>` and `a@b` are the same; `<>` and `""` the null sender.
fn sender_address(v: &str) -> String {
    let t = v.trim();
    match (t.find('<'), t.rfind('>')) {
        (Some(i), Some(j)) if i < j => t[i + 1..j].trim().to_string(),
        _ if t == "\"\"" => String::new(),
        _ => t.to_string(),
    }
}

/// `addr@myhostname` for a bare local name (Postfix's myorigin, which defaults to myhostname); anything
/// with a domain, and the null sender, unchanged.
pub fn qualify(addr: &str, myhostname: &str) -> String {
    let has_domain = addr
        .rfind('@')
        .is_some_and(|i| !addr[i + 1..].contains('"'));
    if addr.is_empty() || has_domain {
        addr.to_string()
    } else {
        format!("{addr}@{myhostname}")
    }
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
        if out.len() > limits::SENDMAIL_INPUT_BYTES_MAX {
            return Err(format!(
                "message larger than {} bytes",
                limits::SENDMAIL_INPUT_BYTES_MAX
            ));
        }
    }
    Ok(out)
}

/// The end of the header section (where added fields go), and whether an empty line must follow them (the
/// message's first non-header line is not empty: it starts the body). A field's name is printable ASCII
/// without spaces or colons (spaces before the colon allowed, as RFC 5322's obsolete syntax); lines starting
/// with a space or tab continue the field before them.
fn header_section(msg: &[u8]) -> (usize, bool) {
    let mut pos = 0;
    while pos < msg.len() {
        let end = memchr::memchr(b'\n', &msg[pos..]).map_or(msg.len(), |i| pos + i + 1);
        let line = &msg[pos..end];
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        if text.is_empty() {
            return (pos, false);
        }
        let header = if text[0] == b' ' || text[0] == b'\t' {
            pos > 0
        } else {
            field_name(text).is_some()
        };
        if !header {
            return (pos, true);
        }
        pos = end;
    }
    (msg.len(), false)
}

/// The name of the header field `line` starts, if it is one.
fn field_name(line: &[u8]) -> Option<&[u8]> {
    let colon = memchr::memchr(b':', line)?;
    let name = &line[..colon];
    let name = match name.iter().rposition(|&b| b != b' ' && b != b'\t') {
        Some(i) => &name[..=i],
        None => return None,
    };
    name.iter()
        .all(|&b| (33..=126).contains(&b))
        .then_some(name)
}

/// Field values for [`add_missing_headers`] (without the names).
pub struct HeaderValues<'a> {
    pub date: &'a str,
    pub message_id: &'a str,
    pub from: &'a str,
}

/// `msg` with `Date:`, `Message-ID:` and `From:` added at the end of its header section for each it lacks
/// (only the header section counts, up to the first empty line; names compare case-insensitively; a folded
/// line is part of the field before it). A message whose first line is not a header field has no header
/// section: the fields go first, then an empty line. Added lines end as the message's first line does (CRLF,
/// or LF for a message with bare LF line ends).
pub fn add_missing_headers(msg: &[u8], v: &HeaderValues<'_>) -> Vec<u8> {
    let (end, separate) = header_section(msg);
    let mut has = [false; 3];
    const NAMES: [&[u8]; 3] = [b"date", b"message-id", b"from"];
    for line in msg[..end].split(|&b| b == b'\n') {
        if let Some(name) =
            field_name(line).filter(|_| !line.starts_with(b" ") && !line.starts_with(b"\t"))
        {
            for (k, n) in NAMES.iter().enumerate() {
                has[k] |= name.eq_ignore_ascii_case(n);
            }
        }
    }
    let eol: &[u8] = match memchr::memchr(b'\n', msg) {
        Some(i) if i == 0 || msg[i - 1] != b'\r' => b"\n",
        _ => b"\r\n",
    };
    let mut out = Vec::with_capacity(msg.len() + 256);
    out.extend_from_slice(&msg[..end]);
    if end > 0 && !msg[..end].ends_with(b"\n") {
        out.extend_from_slice(eol);
    }
    let fields = [
        ("Date", v.date),
        ("Message-ID", v.message_id),
        ("From", v.from),
    ];
    for (k, (name, value)) in fields.iter().enumerate() {
        if !has[k] {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(eol);
        }
    }
    if separate {
        out.extend_from_slice(eol);
    }
    out.extend_from_slice(&msg[end..]);
    out
}

/// A `From:` value: the address alone, or with `name` as the display name: as it is when it is plain words,
/// else quoted (ASCII) or as an RFC 2047 encoded word (UTF-8).
pub fn from_value(addr: &str, name: Option<&str>) -> String {
    let Some(name) = name.map(str::trim).filter(|n| !n.is_empty()) else {
        return addr.to_string();
    };
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c);
    let display = if name.chars().all(|c| atext(c) || c == ' ') {
        name.to_string()
    } else if name.chars().all(|c| c.is_ascii() && !c.is_ascii_control()) {
        let mut q = String::with_capacity(name.len() + 2);
        q.push('"');
        for c in name.chars() {
            if c == '"' || c == '\\' {
                q.push('\\');
            }
            q.push(c);
        }
        q.push('"');
        q
    } else {
        encoded_words(name)
    };
    format!("{display} <{addr}>")
}

/// RFC 2047 `=?UTF-8?B?...?=` words (each under 75 characters, split between characters), space-separated.
fn encoded_words(text: &str) -> String {
    use base64::Engine as _;
    const CHUNK_BYTES_MAX: usize = 45;
    let mut words = Vec::new();
    let mut start = 0;
    let mut end = 0;
    for (i, c) in text.char_indices() {
        if i + c.len_utf8() - start > CHUNK_BYTES_MAX {
            words.push(&text[start..end]);
            start = i;
        }
        end = i + c.len_utf8();
    }
    words.push(&text[start..end]);
    words
        .iter()
        .map(|w| {
            format!(
                "=?UTF-8?B?{}?=",
                base64::engine::general_purpose::STANDARD.encode(w)
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A new Message-ID: `<unix time.random@myhostname>`.
pub fn new_message_id(myhostname: &str) -> String {
    let mut r = [0u8; 8];
    let random = match rustix::rand::getrandom(&mut r[..], rustix::rand::GetRandomFlags::empty()) {
        Ok(8) => u64::from_le_bytes(r),
        // No getrandom: the clock's nanoseconds and the process id still make it unique on this host.
        _ => {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            (u64::from(std::process::id()) << 32) | u64::from(nanos)
        }
    };
    format!("<{}.{random:016x}@{myhostname}>", unix_now())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The addresses of an RFC 5322 address list: `a@b, "Doe, J." <c@d>, root (Cron Daemon), team: e@f;` gives
/// `a@b`, `c@d`, `root`, `e@f`. Commas inside quotes, comments, angle brackets and domain literals do not
/// split; comments are dropped; a group's name is dropped; an entry that is no single address (words with
/// spaces outside quotes) is skipped.
pub fn address_list(v: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut angle: Option<String> = None;
    let (mut quoted, mut escaped, mut comment, mut literal, mut in_angle) =
        (false, false, 0u32, false, false);
    let finish = |cur: &mut String, angle: &mut Option<String>, out: &mut Vec<String>| {
        let a = match angle.take() {
            Some(a) => a.trim().to_string(),
            None => cur.trim().to_string(),
        };
        cur.clear();
        let mut in_q = false;
        let spaced = a.chars().any(|c| {
            if c == '"' {
                in_q = !in_q;
            }
            !in_q && c.is_whitespace()
        });
        if !a.is_empty() && !spaced {
            out.push(a);
        }
    };
    for c in v.chars() {
        if escaped {
            escaped = false;
            if comment == 0 {
                push_to(&mut cur, &mut angle, in_angle, c);
            }
            continue;
        }
        if comment > 0 {
            match c {
                '\\' => escaped = true,
                '(' => comment += 1,
                ')' => comment -= 1,
                _ => {}
            }
            if comment == 0 {
                // A comment separates like a space.
                push_to(&mut cur, &mut angle, in_angle, ' ');
            }
            continue;
        }
        if quoted {
            match c {
                '\\' => escaped = true,
                '"' => quoted = false,
                _ => {}
            }
            push_to(&mut cur, &mut angle, in_angle, c);
            continue;
        }
        match c {
            '"' => {
                quoted = true;
                push_to(&mut cur, &mut angle, in_angle, c);
            }
            '(' if !literal => comment = 1,
            '[' => {
                literal = true;
                push_to(&mut cur, &mut angle, in_angle, c);
            }
            ']' => {
                literal = false;
                push_to(&mut cur, &mut angle, in_angle, c);
            }
            '<' if !literal => {
                in_angle = true;
                angle = Some(String::new());
            }
            '>' if in_angle => in_angle = false,
            ',' | ';' if !literal && !in_angle => finish(&mut cur, &mut angle, &mut out),
            // `name:` starts a group: what came before is its display name.
            ':' if !literal && !in_angle && angle.is_none() => cur.clear(),
            c => push_to(&mut cur, &mut angle, in_angle, c),
        }
    }
    finish(&mut cur, &mut angle, &mut out);
    out
}

fn push_to(cur: &mut String, angle: &mut Option<String>, in_angle: bool, c: char) {
    match angle {
        Some(a) if in_angle => a.push(c),
        // Text after `<...>` (other than comments) is not part of the address.
        Some(_) => {}
        None => cur.push(c),
    }
}

/// Addresses in the To, Cc and Bcc headers, and the message with Bcc removed (for `-t`).
pub fn extract_recipients(msg: &[u8]) -> (Vec<String>, Vec<u8>) {
    let (end, _) = header_section(msg);
    let (head, body) = msg.split_at(end);
    let mut rcpts = Vec::new();
    let mut kept = Vec::with_capacity(msg.len());
    // The field being read: its value so far and whether it names recipients; whether it is dropped (Bcc).
    let mut current: Option<(Vec<u8>, bool)> = None;
    let mut skip = false;
    let flush = |cur: &mut Option<(Vec<u8>, bool)>, rcpts: &mut Vec<String>| {
        if let Some((v, true)) = cur.take() {
            rcpts.extend(address_list(&String::from_utf8_lossy(&v)));
        }
    };
    for line in head.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b" ") || line.starts_with(b"\t") {
            if let Some((v, _)) = current.as_mut() {
                v.extend_from_slice(line);
            }
            if !skip {
                kept.extend_from_slice(line);
            }
            continue;
        }
        flush(&mut current, &mut rcpts);
        let name = field_name(line).unwrap_or(b"");
        let is_rcpt = [&b"to"[..], b"cc", b"bcc"]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n));
        skip = name.eq_ignore_ascii_case(b"bcc");
        if let Some(colon) = memchr::memchr(b':', line) {
            current = Some((line[colon + 1..].to_vec(), is_rcpt));
        }
        if !skip {
            kept.extend_from_slice(line);
        }
    }
    flush(&mut current, &mut rcpts);
    kept.extend_from_slice(body);
    (rcpts, kept)
}

/// The default sender: `$USER@hostname` (or `$LOGNAME`, else root).
pub fn default_sender(hostname: &str) -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty() && is_safe_address(u) && !u.contains('@'))
        .unwrap_or_else(|| "root".into());
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

/// The exit code for a refusal of the whole message: 4xx temporary, else EX_UNAVAILABLE.
fn refused(code: u16, text: String) -> (u8, String) {
    let ex = if code / 100 == 4 {
        exit::TEMPFAIL
    } else {
        exit::UNAVAILABLE
    };
    (ex, text)
}

fn session_failed(e: &SessionError) -> (u8, String) {
    match e {
        SessionError::Refused { reply, .. } | SessionError::Closing { reply, .. } => {
            refused(reply.code, reply.one_line())
        }
        other => (exit::TEMPFAIL, other.to_string()),
    }
}

/// The envelope of a submission.
pub struct Envelope<'a> {
    pub sender: &'a str,
    pub recipients: &'a [String],
    /// DSN NOTIFY for every recipient (sent only if the relay offers DSN).
    pub notify: Option<&'a str>,
    pub eight_bit: bool,
}

/// How a submission (or a `-bv` check) went.
#[derive(Debug, Default)]
pub struct Report {
    /// sysexits(3) code.
    pub exit: u8,
    /// Per recipient, in order: `None` accepted, else the relay's refusal (code, one line).
    pub refusals: Vec<Option<(u16, String)>>,
    /// Why the whole submission failed (empty if it did not).
    pub error: String,
}

impl Report {
    fn failed((exit, error): (u8, String), refusals: Vec<Option<(u16, String)>>) -> Report {
        Report {
            exit,
            refusals,
            error,
        }
    }
}

/// Sends `content` (CRLF line ends, not dot-stuffed) over SMTP to `server` with the library's client session
/// over a blocking socket, one command at a time. A refused recipient does not stop the others: the message
/// goes to those accepted, and the exit code is EX_NOUSER (67) when any was refused (EX_TEMPFAIL when every
/// one was refused with 4xx). `verify_only`: MAIL and RCPTs only (`-bv`), then RSET.
pub fn submit(
    server: SocketAddr,
    helo: &str,
    env: &Envelope<'_>,
    content: &[u8],
    verify_only: bool,
) -> Report {
    let mut refusals: Vec<Option<(u16, String)>> = vec![None; env.recipients.len()];
    let params = Params {
        pipelining: false,
        timeouts: Timeouts {
            connect: limits::SENDMAIL_CONNECT_TIMEOUT,
            rset: limits::SENDMAIL_QUIT_TIMEOUT,
            quit: limits::SENDMAIL_QUIT_TIMEOUT,
            ..Timeouts::default()
        },
        ..Params::new(helo)
    };
    let mut s = ClientSession::new(params, Instant::now());
    let mut stream = match TcpStream::connect_timeout(&server, limits::SENDMAIL_CONNECT_TIMEOUT) {
        Ok(t) => t,
        Err(e) => {
            let why = format!("cannot connect to the relay at {server}: {e}");
            return Report::failed((exit::TEMPFAIL, why), refusals);
        }
    };
    let _ = stream.set_nodelay(true);
    s.connected(Instant::now());
    loop {
        match pump(&mut stream, &mut s) {
            Ok(Event::Ready { .. }) => break,
            Ok(Event::Failed(e)) => return Report::failed(session_failed(&e), refusals),
            Ok(Event::Closed) => {
                let why = "connection closed by the relay".to_string();
                return Report::failed((exit::TEMPFAIL, why), refusals);
            }
            Ok(_) => {}
            Err(e) => return Report::failed((exit::TEMPFAIL, e), refusals),
        }
    }
    let smtputf8 = !env.sender.is_ascii() || env.recipients.iter().any(|r| !r.is_ascii());
    let txn = Transaction {
        sender: env.sender,
        recipients: env.recipients,
        body: &[content],
        size: content.len() as u64,
        eight_bit: env.eight_bit,
        smtputf8,
        wire: false,
        external: 0,
    };
    // -N: the same NOTIFY for every recipient (checked by `parse_notify`).
    let notify = env
        .notify
        .and_then(|n| crate::smtp::dsn::Notify::parse(n).ok());
    let rcpt_dsn: Vec<crate::smtp::dsn::RcptDsn> = match notify {
        Some(n) => vec![
            crate::smtp::dsn::RcptDsn {
                notify: Some(n),
                orcpt: None,
            };
            env.recipients.len()
        ],
        None => Vec::new(),
    };
    let opts = TxnOptions {
        rcpt_dsn: &rcpt_dsn,
        verify_only,
        ..TxnOptions::default()
    };
    if let Err(e) = s.start_transaction_with(&txn, &opts, Instant::now()) {
        return Report::failed((exit::USAGE, e.to_string()), refusals);
    }
    let accepted = loop {
        match pump(&mut stream, &mut s) {
            Ok(Event::Mail { reply, .. }) if reply.class() != 2 => {
                let r = s.server_reply(reply);
                return Report::failed(refused(r.code, r.one_line()), refusals);
            }
            Ok(Event::Rcpt { index, reply, .. }) if reply.class() != 2 => {
                if let Some(slot) = refusals.get_mut(index) {
                    *slot = Some((reply.code, s.server_reply(reply).one_line()));
                }
            }
            Ok(Event::Data { reply, .. }) if reply.code != 354 => {
                let r = s.server_reply(reply);
                return Report::failed(refused(r.code, r.one_line()), refusals);
            }
            Ok(Event::DataDone { reply, .. }) if reply.class() != 2 => {
                let r = s.server_reply(reply);
                return Report::failed(refused(r.code, r.one_line()), refusals);
            }
            Ok(Event::MessageDone { accepted, .. }) => break accepted,
            Ok(Event::Failed(e)) => return Report::failed(session_failed(&e), refusals),
            Ok(Event::Closed) => {
                let why = "connection closed by the relay".to_string();
                return Report::failed((exit::TEMPFAIL, why), refusals);
            }
            Ok(_) => {}
            Err(e) => return Report::failed((exit::IOERR, e), refusals),
        }
    };
    // The message is queued (or nothing was to be sent): RSET and QUIT are best effort.
    let now = Instant::now();
    if verify_only {
        let _ = s.rset(now);
    }
    s.quit(now);
    while let Ok(e) = pump(&mut stream, &mut s) {
        if matches!(e, Event::Closed | Event::Failed(_)) {
            break;
        }
    }
    let refused_count = refusals.iter().flatten().count();
    let all_temporary = refusals.iter().flatten().all(|(code, _)| code / 100 == 4);
    let exit = if refused_count == 0 {
        exit::OK
    } else if !accepted && !verify_only && all_temporary {
        exit::TEMPFAIL
    } else {
        exit::NOUSER
    };
    Report {
        exit,
        refusals,
        error: String::new(),
    }
}

/// How the client side of a `-bs` session ended.
struct InputEnd {
    at: Instant,
    error: Option<String>,
}

/// `-bs`: joins `input`/`output` (stdin/stdout) to the relay's listener at `server`, byte for byte in both
/// directions, until the relay closes the connection; the relay's SMTP session does all the work (its limits,
/// mynetworks). When `input` ends, the relay gets a half-close (its session ends as for any client that
/// hangs up) and its last replies still reach `output`; if it stays silent for
/// [`limits::SENDMAIL_PROXY_DRAIN_AFTER`] after that, sendmail stops waiting. When the relay cannot be reached,
/// `output` gets a `421` reply so the SMTP client on the other side sees why. Returns a sysexits code and a
/// message for stderr.
pub fn relay_smtp_session<R, W>(
    server: SocketAddr,
    myhostname: &str,
    mut input: R,
    output: &mut W,
) -> (u8, String)
where
    R: Read + Send + 'static,
    W: Write,
{
    let sock = match TcpStream::connect_timeout(&server, limits::SENDMAIL_CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            let _ = write!(
                output,
                "421 4.3.0 {myhostname} mail relay unavailable, try again later\r\n"
            );
            let _ = output.flush();
            return (
                exit::TEMPFAIL,
                format!("cannot connect to the relay at {server}: {e}"),
            );
        }
    };
    let _ = sock.set_nodelay(true);
    let to_relay = match sock.try_clone() {
        Ok(s) => s,
        Err(e) => return (exit::OSERR, format!("cannot share the socket: {e}")),
    };
    let input_end: Arc<OnceLock<InputEnd>> = Arc::default();
    let ended = input_end.clone();
    std::thread::spawn(move || {
        let mut to_relay = to_relay;
        let mut buf = vec![0u8; limits::SENDMAIL_PROXY_BUFFER_BYTES];
        let error = loop {
            match input.read(&mut buf) {
                Ok(0) => break None,
                Ok(n) => {
                    // The relay gone: the other direction sees it and ends the session.
                    if to_relay.write_all(&buf[..n]).is_err() {
                        break None;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => break Some(format!("reading standard input: {e}")),
            }
        };
        let _ = ended.set(InputEnd {
            at: Instant::now(),
            error,
        });
        let _ = to_relay.shutdown(Shutdown::Write);
    });
    if let Err(e) = sock.set_read_timeout(Some(limits::SENDMAIL_PROXY_POLL_INTERVAL)) {
        return (exit::OSERR, format!("socket: {e}"));
    }
    let mut buf = vec![0u8; limits::SENDMAIL_PROXY_BUFFER_BYTES];
    let mut from_relay = &sock;
    loop {
        match from_relay.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Err(e) = output.write_all(&buf[..n]).and_then(|()| output.flush()) {
                    let _ = sock.shutdown(Shutdown::Both);
                    return (exit::IOERR, format!("writing standard output: {e}"));
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if input_end
                    .get()
                    .is_some_and(|end| end.at.elapsed() >= limits::SENDMAIL_PROXY_DRAIN_AFTER)
                {
                    let _ = sock.shutdown(Shutdown::Both);
                    return (
                        exit::TEMPFAIL,
                        format!(
                            "the relay did not end the session within {:?} after the input ended",
                            limits::SENDMAIL_PROXY_DRAIN_AFTER
                        ),
                    );
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return (exit::IOERR, format!("reading from the relay: {e}")),
        }
    }
    match input_end.get().and_then(|end| end.error.clone()) {
        Some(e) => (exit::IOERR, e),
        None => (exit::OK, String::new()),
    }
}

/// The configuration file: `-C`, else `$SHARDMTA_CONFIG`, else /etc/shardmta/shardmta.toml if it exists
/// (else none: the embedded defaults).
fn config_path(opts: &Options) -> Option<PathBuf> {
    opts.config
        .clone()
        .or_else(|| std::env::var_os("SHARDMTA_CONFIG").map(PathBuf::from))
        .or_else(|| {
            let p = PathBuf::from("/etc/shardmta/shardmta.toml");
            p.exists().then_some(p)
        })
}

/// Runs the command line of `sendmail`, `mailq` or `newaliases` (`mode`: the one the program name gives);
/// returns the exit code. `-bp` and `-q` do not return when they can run `shardmta queue ...` (it replaces
/// this process, as Postfix's sendmail execs postqueue).
pub fn main(mode: Mode, args: &[String]) -> u8 {
    let name = match mode {
        Mode::ListQueue => "mailq",
        Mode::NewAliases => "newaliases",
        _ => "sendmail",
    };
    let opts = match parse_command_line(mode, args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{name}: {e}");
            return exit::USAGE;
        }
    };
    for n in &opts.notes {
        eprintln!("{name}: note: {n}");
    }
    let path = config_path(&opts);
    match opts.mode {
        Mode::ListQueue => return exec_queue_command(name, &["queue", "list"], path.as_deref()),
        Mode::Flush => {
            return exec_queue_command(name, &["queue", "flush", "--all"], path.as_deref())
        }
        _ => {}
    }
    let cfg = match path.as_deref().map(Config::load) {
        None => Config::default(),
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            eprintln!("{name}: {e}");
            return exit::CONFIG;
        }
    };
    if opts.mode == Mode::NewAliases {
        return newaliases(&cfg);
    }
    let Some(listener) = cfg.listeners.iter().find(|l| l.kind == ListenerKind::Smtp) else {
        eprintln!("{name}: the configuration has no smtp listener to submit to");
        return exit::CONFIG;
    };
    let mut addr = listener.address;
    if addr.ip().is_unspecified() {
        match addr {
            SocketAddr::V4(_) => addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into()),
            SocketAddr::V6(_) => addr.set_ip(std::net::Ipv6Addr::LOCALHOST.into()),
        }
    }
    let (code, why) = match opts.mode {
        Mode::Smtp => {
            let mut out = std::io::stdout();
            relay_smtp_session(addr, &cfg.myhostname, std::io::stdin(), &mut out)
        }
        Mode::Verify => verify(addr, &cfg, &opts),
        _ => deliver(addr, &cfg, &opts),
    };
    if !why.is_empty() {
        eprintln!("{name}: {why}");
    }
    code
}

/// Replaces this process with `<this executable> ARGS [--config PATH]`; returns only when that fails.
fn exec_queue_command(name: &str, args: &[&str], config: Option<&Path>) -> u8 {
    use std::os::unix::process::CommandExt as _;
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{name}: cannot find the shardmta executable: {e}");
            return exit::OSERR;
        }
    };
    let mut cmd = std::process::Command::new(&exe);
    // Named `shardmta`, whatever this copy is called, so that it runs the subcommand.
    cmd.arg0("shardmta").args(args);
    if let Some(p) = config {
        cmd.arg("--config").arg(p);
    }
    let e = cmd.exec();
    eprintln!(
        "{name}: cannot run {} {}: {e}",
        exe.display(),
        args.join(" ")
    );
    exit::OSERR
}

/// `newaliases`: loads the recipient tables as the server does and reports what it found.
fn newaliases(cfg: &Config) -> u8 {
    use crate::local::maps::MapError;
    use crate::local::recipients::{RecipientMaps, TableError};
    match RecipientMaps::load(cfg) {
        Ok(maps) => {
            for w in &maps.warnings {
                eprintln!("newaliases: warning: {w}");
            }
            let files: Vec<&str> = cfg
                .alias_maps
                .iter()
                .map(|s| crate::local::maps::map_path(s))
                .collect();
            if files.is_empty() {
                println!("newaliases: no alias_maps configured; nothing to do");
            } else {
                println!(
                    "newaliases: {}: {} aliases; the running server re-reads changed alias files within a second by itself (no rebuild or reload needed)",
                    files.join(", "),
                    maps.alias_count()
                );
            }
            exit::OK
        }
        Err(e) => {
            eprintln!("newaliases: {e}");
            match e {
                TableError::Map(MapError::Read { .. }) => exit::NOINPUT,
                TableError::Map(MapError::Syntax { .. }) => exit::DATAERR,
            }
        }
    }
}

/// The recipients of `opts` (arguments, then `-t`'s), qualified, without repeats.
fn envelope_recipients(found: Vec<String>, cfg: &Config) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::with_capacity(found.len());
    for r in found {
        if !is_safe_address(&r) {
            return Err(format!("bad recipient address {r:?}"));
        }
        let q = qualify(&r, &cfg.myhostname);
        if !out.contains(&q) {
            out.push(q);
        }
    }
    Ok(out)
}

fn print_refusals(report: &Report, rcpts: &[String], verbose_ok: bool) {
    for (r, refusal) in rcpts.iter().zip(&report.refusals) {
        match refusal {
            Some((_, reply)) => {
                if verbose_ok {
                    println!("{r}: {reply}");
                } else {
                    eprintln!("sendmail: {r}: refused: {reply}");
                }
            }
            None if verbose_ok => println!("{r}: deliverable"),
            None => {}
        }
    }
}

/// `-bv`: MAIL FROM:<> and a RCPT for each recipient; prints `address: deliverable` or the relay's reply.
fn verify(server: SocketAddr, cfg: &Config, opts: &Options) -> (u8, String) {
    let mut found = opts.recipients.clone();
    if opts.extract_recipients {
        let msg = match read_message(std::io::stdin().lock(), opts.ignore_dots) {
            Ok(m) => m,
            Err(e) => return (exit::DATAERR, e),
        };
        found.extend(extract_recipients(&msg).0);
    }
    let rcpts = match envelope_recipients(found, cfg) {
        Ok(r) => r,
        Err(e) => return (exit::USAGE, e),
    };
    if rcpts.is_empty() {
        return (exit::USAGE, "no recipients found".into());
    }
    let env = Envelope {
        sender: "",
        recipients: &rcpts,
        notify: None,
        eight_bit: false,
    };
    let report = submit(server, &cfg.myhostname, &env, b"", true);
    if report.error.is_empty() {
        print_refusals(&report, &rcpts, true);
    }
    (report.exit, report.error)
}

/// The default mode: read, prepare and submit the message.
fn deliver(server: SocketAddr, cfg: &Config, opts: &Options) -> (u8, String) {
    let mut msg = match read_message(std::io::stdin().lock(), opts.ignore_dots) {
        Ok(m) => m,
        Err(e) => return (exit::DATAERR, e),
    };
    let mut found = opts.recipients.clone();
    if opts.extract_recipients {
        let (from_headers, without_bcc) = extract_recipients(&msg);
        found.extend(from_headers);
        msg = without_bcc;
    }
    let rcpts = match envelope_recipients(found, cfg) {
        Ok(r) => r,
        Err(e) => return (exit::DATAERR, e),
    };
    if rcpts.is_empty() {
        return (exit::USAGE, "no recipients found".into());
    }
    let sender = match &opts.from {
        Some(f) => qualify(f, &cfg.myhostname),
        None => default_sender(&cfg.myhostname),
    };
    let from_addr = if sender.is_empty() {
        format!("MAILER-DAEMON@{}", cfg.myhostname)
    } else {
        sender.clone()
    };
    let date = crate::smtp::session::rfc5322_date(unix_now());
    let message_id = new_message_id(&cfg.myhostname);
    let from = from_value(&from_addr, opts.full_name.as_deref());
    let msg = add_missing_headers(
        &msg,
        &HeaderValues {
            date: &date,
            message_id: &message_id,
            from: &from,
        },
    );
    let env = Envelope {
        sender: &sender,
        recipients: &rcpts,
        notify: opts.notify.as_deref(),
        eight_bit: opts.eight_bit || !msg.is_ascii(),
    };
    let report = submit(server, &cfg.myhostname, &env, &msg, false);
    print_refusals(&report, &rcpts, false);
    (report.exit, report.error)
}

#[cfg(test)]
mod tests;
