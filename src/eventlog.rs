//! The event log (Postfix's maillog): one line per event, each with a timestamp (RFC 3339, UTC, milliseconds)
//! and a component tag, as text shaped like Postfix's smtpd/qmgr/smtp lines (so fail2ban's stock `postfix` and
//! `postfix-sasl` filters match them) or as JSON (`log_format`), to stderr (journald) or to `maillog_file`.
//! Owns the `tracing` subscriber, the two line formats, the writer that reopens its file on SIGUSR1/SIGHUP,
//! and the vocabulary below; the modules that see an event call the function named after it.
//!
//! A line is formatted on the thread that logs it (into the formatter's thread-local buffer) and handed to
//! a bounded channel ([`limits::EVENTLOG_LINES_QUEUED_MAX`] lines; past that, lines are dropped and counted,
//! never waited for) that one writer thread drains every [`limits::EVENTLOG_DRAIN_INTERVAL`] without being
//! woken, writing each batch with one `write` to stderr or the file. A shard's reactor never does a blocking write.
//!
//! Text: `2025-06-01T10:00:00.123Z shardmta/smtpd[4711]: connect from unknown[192.0.2.7]`: the time, then
//! `shardmta/<component>[<pid>]:` (one token, as fail2ban's line prefix allows), then the message; warnings
//! start with `warning: `, errors with `error: `. JSON: one object per line, `{"ts":..,"level":..,
//! "component":..,"message":<the text line's message>,"event":..,<the fields below>}`; an optional field that
//! has no value is left out. Everything a client or a remote server said is written with control characters
//! replaced by `?` and cut at [`limits::EVENTLOG_FIELD_BYTES_MAX`] bytes, so no input can start a line of its
//! own (which could make fail2ban ban an innocent address).
//!
//! | event (`event` field) | component | text (after the tag) | fields |
//! |---|---|---|---|
//! | `connect` | smtpd | `connect from unknown[IP]` | `client_ip` |
//! | `disconnect` | smtpd | `disconnect from unknown[IP] ehlo=1 mail=1 rcpt=1/2 data=1 quit=1 commands=5/6` (per command `ok` or `ok/total`) | `client_ip`, `commands` (the counts as in the text), `commands_ok`, `commands_total` |
//! | `lost_connection` | smtpd | `lost connection after RCPT from unknown[IP]` or `timeout after DATA from unknown[IP]` | `client_ip`, `after`, `timeout` |
//! | `reject` | smtpd | `NOQUEUE: reject: RCPT from unknown[IP]: 554 5.7.1 <to>: Relay access denied; from=<s> to=<to> proto=ESMTP helo=<h>` (stages CONNECT, MAIL, RCPT, DATA, BDAT, END-OF-MESSAGE) | `stage`, `client_ip`, `code`, `dsn`, `reason` (the reply's text), `sender`, `rcpt`, `proto`, `helo` |
//! | `too_many_errors` | smtpd | `too many errors after RCPT from unknown[IP]` | `client_ip`, `after` |
//! | `auth_failed` | smtpd | `warning: unknown[IP]: SASL PLAIN authentication failed: authentication failure` (or `malformed response`, `invalid base64 data`, `locked out after too many failures`) | `client_ip`, `mechanism`, `sasl_username`, `reason` |
//! | `received` | smtpd | `QID: client=unknown[IP], helo=<h>, proto=ESMTPS, from=<s>, size=N, nrcpt=N, message-id=<m>, tls=TLSv1.3 with cipher X, sasl_method=PLAIN, sasl_username=u` (absent parts left out) | `queue_id`, `client_ip`, `helo`, `proto`, `sender`, `size`, `nrcpt`, `message_id`, `tls`, `sasl_method`, `sasl_username` |
//! | `delivery` | smtp, local | `QID: to=<r>, relay=host[ip]:port, delay=1.25, dsn=2.0.0, status=sent (250 2.0.0 Ok)`; status `sent`, `deferred`, `bounced`, or `expired, returned to sender` | `queue_id`, `rcpt`, `relay`, `delay_s`, `attempt`, `dsn`, `status`, `reply`, `tls`, `tls_policy` (`, tls_policy=dane` in the text after `delay=`, when a host was tried), `source` (`, source=ip1` at the end, when an egress source was used) |
//! | `bounce` | bounce | `QID: sender non-delivery notification: BOUNCE_QID` | `queue_id`, `bounce_id` |
//! | `bounce_dropped` | qmgr | `QID: no non-delivery notification: the sender is null (a bounce is not bounced)` | `queue_id` |
//! | `removed` | qmgr | `QID: removed` (every recipient delivered or bounced) | `queue_id` |
//! | `queue_changed` | postsuper | `QID: placed on hold (reason)`, `released from hold`, `removed`, `returned to sender`, `requeued` | `queue_id`, `action` (hold, release, delete, bounce, flush), `reason` |
//! | (none) | master, queue, … | the server's own notices: start, reload, warnings, shard errors | — |
//!
//! Queue changes by the administrator ([`queue_changed`]) are logged by the process that makes them (the
//! server); a command that changes a stopped server's queue prints its own line instead.

use std::fmt::{self, Write as _};
use std::fs::File;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::limits;
use crate::queue::QueueId;
use crate::smtp::reply::Reply;

/// Component tags (the event's `tracing` target), after Postfix's daemon names.
pub const SMTPD: &str = "smtpd";
pub const SMTP: &str = "smtp";
pub const LOCAL: &str = "local";
pub const QMGR: &str = "qmgr";
pub const BOUNCE: &str = "bounce";
pub const POSTSUPER: &str = "postsuper";
/// The process itself: start, stop, reloads, signals.
pub const MASTER: &str = "master";
/// A shard's queue and its housekeeping.
pub const QUEUE: &str = "queue";

/// The line format (`log_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Postfix-like lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    #[error("maillog_file {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
}

/// The running event log: dropping it writes out every line logged before and stops the writer thread (the
/// process's last lines on stderr then come after it).
pub struct EventLog {
    /// The writer thread and its stop flag.
    worker: Option<(std::thread::JoinHandle<()>, Arc<AtomicBool>)>,
    dropped: Arc<std::sync::atomic::AtomicUsize>,
    reopen: Arc<AtomicBool>,
    file: Option<PathBuf>,
    /// Whether this log's subscriber is the process's (false: one was installed before, e.g. by a test).
    installed: bool,
}

impl EventLog {
    /// Starts the event log: `file` None means stderr. The file is opened now (before any privilege drop),
    /// appended to, created 0640 if missing, never through a symlink.
    pub fn start(file: Option<&Path>, format: LogFormat) -> Result<EventLog, EventLogError> {
        let target = match file {
            Some(p) => Target::File {
                file: open_log_file(p).map_err(|source| EventLogError::Open {
                    path: p.to_path_buf(),
                    source,
                })?,
                path: p.to_path_buf(),
            },
            None => Target::Stderr,
        };
        Ok(Self::start_to(target, format, file))
    }

    /// The same event log writing to `w` (benchmarks: `std::io::sink()`); no reopening.
    pub fn start_to_writer(w: impl Write + Send + 'static, format: LogFormat) -> EventLog {
        Self::start_to(Target::Other(Box::new(w)), format, None)
    }

    fn start_to(target: Target, format: LogFormat, file: Option<&Path>) -> EventLog {
        let reopen = Arc::new(AtomicBool::new(false));
        let sink = LineSink {
            target,
            pending: Vec::with_capacity(limits::EVENTLOG_WRITE_BUFFER_BYTES),
            reopen: reopen.clone(),
            failing: false,
        };
        let (tx, rx) = flume::bounded(limits::EVENTLOG_LINES_QUEUED_MAX);
        let dropped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let writer = LineQueue {
            tx,
            dropped: dropped.clone(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let worker = {
            let flag = stop.clone();
            let mut sink = sink;
            std::thread::Builder::new()
                .name("eventlog".into())
                .spawn(move || drain_lines(&rx, &mut sink, &flag))
                .ok()
                .map(|h| (h, stop))
        };
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(Level::INFO)
            .event_format(LineFormat::new(format))
            .with_writer(writer)
            .finish();
        let installed = tracing::subscriber::set_global_default(subscriber).is_ok();
        EventLog {
            worker,
            dropped,
            reopen,
            file: file.map(Path::to_path_buf),
            installed,
        }
    }

    /// Reopens the log file (after logrotate renamed it) before the next line is written; logs that it did.
    /// Nothing to do on stderr.
    pub fn reopen(&self) {
        if let Some(p) = &self.file {
            self.reopen.store(true, Ordering::SeqCst);
            // This line wakes the writer, which reopens the file first: it is the new file's first line.
            tracing::info!(target: MASTER, "reopening log file {}", p.display());
        }
    }

    /// Lines dropped since the start because the writer fell behind.
    pub fn dropped_lines(&self) -> usize {
        self.dropped.load(Ordering::Relaxed)
    }

    pub fn to_file(&self) -> bool {
        self.file.is_some()
    }

    pub fn installed(&self) -> bool {
        self.installed
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        // The writer drains what is queued, writes it and ends (within one drain interval).
        if let Some((h, stop)) = self.worker.take() {
            stop.store(true, Ordering::SeqCst);
            let _ = h.join();
        }
    }
}

/// The shards' end of the log: each line goes into a bounded channel (a full one drops the line and counts it:
/// a shard never waits on the log). The writer thread is never woken per line: it drains the channel every
/// [`limits::EVENTLOG_DRAIN_INTERVAL`] on its own. (A wake per line, as tracing-appender's worker blocked in
/// `recv`, cost a futex call and a context switch per line: about 10 µs of relay CPU per 1 KB message.)
struct LineQueue {
    tx: flume::Sender<Vec<u8>>,
    dropped: Arc<std::sync::atomic::AtomicUsize>,
}

impl Write for &LineQueue {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.tx.try_send(buf.to_vec()).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LineQueue {
    type Writer = &'a LineQueue;
    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

/// The writer thread: every drain interval, takes what the channel holds (at most its capacity a round),
/// writes it as one batch (reopening the file first when asked), until `stop` is set; then one last drain.
fn drain_lines(rx: &flume::Receiver<Vec<u8>>, sink: &mut LineSink, stop: &AtomicBool) {
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        for line in rx.try_iter().take(limits::EVENTLOG_LINES_QUEUED_MAX) {
            let _ = sink.write(&line);
        }
        let _ = sink.flush();
        if stopping {
            return;
        }
        std::thread::sleep(limits::EVENTLOG_DRAIN_INTERVAL);
    }
}

/// Opens (creating, 0640) `path` for appending: O_NOFOLLOW (a planted symlink is refused, not followed), and
/// only a regular file (a FIFO would block the writer).
fn open_log_file(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(f)
}

enum Target {
    Stderr,
    File { path: PathBuf, file: File },
    Other(Box<dyn Write + Send>),
}

/// The writer thread's end: collects a batch of lines and writes it with one `write` when the batch ends
/// (`drain_lines` flushes after draining the channel), reopening the file first when asked.
struct LineSink {
    target: Target,
    pending: Vec<u8>,
    reopen: Arc<AtomicBool>,
    /// A write failed and was reported; the next failure is reported only after a success.
    failing: bool,
}

impl LineSink {
    fn write_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let r = match &mut self.target {
            Target::Stderr => io::stderr().lock().write_all(&self.pending),
            Target::File { file, .. } => file.write_all(&self.pending),
            Target::Other(w) => w.write_all(&self.pending),
        };
        match r {
            Ok(()) => self.failing = false,
            Err(e) if !self.failing => {
                // The lines are lost (a full disk); say so once, where somebody may see it.
                eprintln!("shardmta: event log: write failed, lines lost: {e}");
                self.failing = true;
            }
            Err(_) => {}
        }
        self.pending.clear();
        if self.pending.capacity() > 4 * limits::EVENTLOG_WRITE_BUFFER_BYTES {
            self.pending = Vec::with_capacity(limits::EVENTLOG_WRITE_BUFFER_BYTES);
        }
    }

    fn reopen_file(&mut self) {
        if let Target::File { path, file } = &mut self.target {
            match open_log_file(path) {
                Ok(f) => *file = f,
                Err(e) => eprintln!(
                    "shardmta: event log: cannot reopen {} (still writing to the old file): {e}",
                    path.display()
                ),
            }
        }
    }
}

impl Write for LineSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.pending.len() + buf.len() > limits::EVENTLOG_WRITE_BUFFER_BYTES {
            self.write_pending();
        }
        self.pending.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.reopen.swap(false, Ordering::SeqCst) {
            self.reopen_file();
        }
        self.write_pending();
        Ok(())
    }
}

// ------------------------------------------------------------------ the two line formats

/// Formats one event as a text or JSON line.
pub struct LineFormat {
    format: LogFormat,
    /// `[4711]: `, after the component.
    pid_tag: String,
}

thread_local! {
    /// A message or field value formatted here first, then sanitized or escaped in one pass.
    static SCRATCH: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Runs `f` with this thread's scratch string, emptied (a fresh one if it is in use: an event logged while
/// one is formatted).
fn with_scratch<R>(f: impl FnOnce(&mut String) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => {
            s.clear();
            let r = f(&mut s);
            if s.capacity() > limits::EVENTLOG_WRITE_BUFFER_BYTES {
                *s = String::new();
            }
            r
        }
        Err(_) => f(&mut String::new()),
    })
}

impl LineFormat {
    pub fn new(format: LogFormat) -> LineFormat {
        LineFormat {
            format,
            pid_tag: format!("[{}]: ", std::process::id()),
        }
    }

    /// Writes `event` as one line (with its newline) to `w`.
    pub fn write_line(&self, w: &mut dyn fmt::Write, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        let mut ts = [0u8; TIMESTAMP_LEN];
        let ts = timestamp(SystemTime::now(), &mut ts);
        match self.format {
            LogFormat::Text => {
                w.write_str(ts)?;
                w.write_str(" shardmta/")?;
                w.write_str(meta.target())?;
                w.write_str(&self.pid_tag)?;
                match *meta.level() {
                    Level::ERROR => w.write_str("error: ")?,
                    Level::WARN => w.write_str("warning: ")?,
                    _ => {}
                }
                let mut v = TextVisitor { w, result: Ok(()) };
                event.record(&mut v);
                v.result?;
                w.write_char('\n')
            }
            LogFormat::Json => {
                w.write_str("{\"ts\":\"")?;
                w.write_str(ts)?;
                w.write_str("\",\"level\":\"")?;
                w.write_str(match *meta.level() {
                    Level::ERROR => "error",
                    Level::WARN => "warning",
                    Level::INFO => "info",
                    Level::DEBUG => "debug",
                    Level::TRACE => "trace",
                })?;
                w.write_str("\",\"component\":\"")?;
                JsonEscaped(w).write_str(meta.target())?;
                w.write_char('"')?;
                let mut v = JsonVisitor { w, result: Ok(()) };
                event.record(&mut v);
                v.result?;
                w.write_str("}\n")
            }
        }
    }
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        self.write_line(&mut writer, event)
    }
}

/// Text: only the message is written (the fields are for JSON), with control characters as `?`.
struct TextVisitor<'a> {
    w: &'a mut dyn fmt::Write,
    result: fmt::Result,
}

impl Visit for TextVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" && self.result.is_ok() {
            self.result = with_scratch(|s| {
                write!(s, "{value:?}")?;
                Sanitized(self.w).write_str(s)
            });
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" && self.result.is_ok() {
            self.result = Sanitized(self.w).write_str(value);
        }
    }
}

struct JsonVisitor<'a> {
    w: &'a mut dyn fmt::Write,
    result: fmt::Result,
}

impl JsonVisitor<'_> {
    fn key(&mut self, field: &Field) -> fmt::Result {
        self.w.write_str(",\"")?;
        JsonEscaped(self.w).write_str(field.name())?;
        self.w.write_str("\":")
    }

    fn put(&mut self, field: &Field, f: impl FnOnce(&mut dyn fmt::Write) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|_| f(self.w));
        }
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, |w| {
            w.write_char('"')?;
            with_scratch(|s| {
                write!(s, "{value:?}")?;
                JsonEscaped(w).write_str(s)
            })?;
            w.write_char('"')
        });
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, |w| {
            w.write_char('"')?;
            JsonEscaped(w).write_str(value)?;
            w.write_char('"')
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, |w| write!(w, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, |w| write!(w, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, |w| w.write_str(if value { "true" } else { "false" }));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, |w| {
            if value.is_finite() {
                write!(w, "{value}")
            } else {
                w.write_str("null")
            }
        });
    }
}

/// Writes JSON string content: `"`, `\` and control characters escaped.
struct JsonEscaped<'a>(&'a mut dyn fmt::Write);

impl fmt::Write for JsonEscaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut start = 0;
        for (i, b) in s.bytes().enumerate() {
            let esc: &str = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f => "",
                _ => continue,
            };
            self.0.write_str(&s[start..i])?;
            if esc.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(esc)?;
            }
            start = i + 1;
        }
        self.0.write_str(&s[start..])
    }
}

/// Writes text with every control character (C0, DEL, C1) replaced by `?`: a text line stays one line.
struct Sanitized<'a, 'b>(&'a mut (dyn fmt::Write + 'b));

impl fmt::Write for Sanitized<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // C1 controls are U+0080..U+009F: 0xC2 0x80..0x9F in UTF-8.
        if !s.bytes().any(|b| b < 0x20 || b == 0x7f || b == 0xc2) {
            return self.0.write_str(s);
        }
        for c in s.chars() {
            self.0.write_char(if c.is_control() { '?' } else { c })?;
        }
        Ok(())
    }
}

const TIMESTAMP_LEN: usize = 24;

/// `2025-06-01T10:00:00.123Z` (RFC 3339, UTC, milliseconds) into `buf`.
fn timestamp(t: SystemTime, buf: &mut [u8; TIMESTAMP_LEN]) -> &str {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    let y = y.clamp(0, 9999) as u32;
    let mut put = |at: usize, v: u32, digits: usize| {
        let mut v = v;
        for i in (0..digits).rev() {
            buf[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, y, 4);
    put(5, m, 2);
    put(8, day, 2);
    put(11, (s / 3600) as u32, 2);
    put(14, (s % 3600 / 60) as u32, 2);
    put(17, (s % 60) as u32, 2);
    put(20, d.subsec_millis(), 3);
    for (i, c) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (23, b'Z'),
    ] {
        buf[i] = c;
    }
    // Only ASCII digits and separators were written.
    std::str::from_utf8(buf).unwrap_or("0000-00-00T00:00:00.000Z")
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's civil_from_days).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

// ------------------------------------------------------------------ pieces of lines

/// A client as Postfix names it: `unknown[192.0.2.7]` (no reverse lookup is made).
#[derive(Clone, Copy)]
pub struct Client(pub IpAddr);

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown[{}]", self.0)
    }
}

/// What somebody else said (a client's HELO, an address, a header, a remote reply), as written to the log:
/// control characters become `?`, at most [`limits::EVENTLOG_FIELD_BYTES_MAX`] bytes are kept.
#[derive(Clone, Copy)]
pub struct Clean<'a>(pub &'a str);

impl fmt::Display for Clean<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        let cut = if s.len() > limits::EVENTLOG_FIELD_BYTES_MAX {
            let mut end = limits::EVENTLOG_FIELD_BYTES_MAX;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            &s[..end]
        } else {
            s
        };
        let mut w = Sanitized(f);
        w.write_str(cut)?;
        if cut.len() < s.len() {
            w.write_str("...")?;
        }
        Ok(())
    }
}

/// `prefix` and the value, or nothing when there is no value.
struct Opt<'a, T>(&'a str, Option<T>);

impl<T: fmt::Display> fmt::Display for Opt<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.1 {
            Some(v) => write!(f, "{}{v}", self.0),
            None => Ok(()),
        }
    }
}

/// An SMTP reply as the log shows it: `554 5.7.1 <rcpt>: Relay access denied` (the address in angle brackets
/// before the text when the reply is about one, as Postfix's replies read).
struct ReplyLine<'a> {
    reply: &'a Reply,
    about: Option<&'a str>,
}

impl fmt::Display for ReplyLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.reply.code)?;
        if let Some(e) = self.reply.enhanced {
            write!(f, " {}.{}.{}", e.0, e.1, e.2)?;
        }
        if let Some(a) = self.about {
            write!(f, " <{}>:", Clean(a))?;
        }
        write!(f, " {}", Clean(&self.reply.text))
    }
}

/// The enhanced status code of a reply, for `dsn=`.
struct EnhancedOf<'a>(&'a Reply);

impl fmt::Display for EnhancedOf<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.enhanced {
            Some(e) => write!(f, "{}.{}.{}", e.0, e.1, e.2),
            None => write!(f, "{}.0.0", self.0.code / 100),
        }
    }
}

/// The enhanced status code a reply or diagnostic carries, for `dsn=`: `250 2.0.0 Ok` and `550-5.1.1 x` give
/// theirs, `4.4.1 connection refused` its first word, `451 busy` its class (`4.0.0`); anything else the class
/// given (the result's: 2 delivered, 4 deferred, 5 bounced).
pub struct Dsn<'a>(pub &'a str, pub u8);

fn is_enhanced(word: &str) -> bool {
    let mut parts = word.split('.');
    let (Some(class), Some(subject), Some(detail), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    matches!(class, "2" | "4" | "5")
        && [subject, detail]
            .iter()
            .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
}

impl fmt::Display for Dsn<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut words = self.0.trim_start().split([' ', '-']);
        let first = words.next().unwrap_or("");
        if is_enhanced(first) {
            return f.write_str(first);
        }
        let b = first.as_bytes();
        if b.len() == 3 && b.iter().all(u8::is_ascii_digit) && matches!(b[0], b'2' | b'4' | b'5') {
            if let Some(second) = words
                .next()
                .filter(|w| is_enhanced(w) && w.as_bytes()[0] == b[0])
            {
                return f.write_str(second);
            }
            return write!(f, "{}.0.0", char::from(b[0]));
        }
        write!(f, "{}.0.0", self.1)
    }
}

// ------------------------------------------------------------------ the events

/// A client connected (before the admission check).
pub fn connect(client: IpAddr) {
    tracing::info!(target: SMTPD, event = "connect", client_ip = %client, "connect from {}", Client(client));
}

/// A session ended; `counts` writes the per-command counts (`ehlo=1 mail=1 rcpt=1/2 ... commands=5/6`).
pub fn disconnect(client: IpAddr, counts: &dyn fmt::Display, ok: u32, total: u32) {
    tracing::info!(
        target: SMTPD,
        event = "disconnect",
        client_ip = %client,
        commands = %counts,
        commands_ok = ok,
        commands_total = total,
        "disconnect from {} {}",
        Client(client),
        counts
    );
}

/// The client went away (or timed out) in the middle of a session, after command `after` (e.g. `RCPT`).
pub fn lost_connection(client: IpAddr, after: &str, timeout: bool) {
    let what = if timeout {
        "timeout"
    } else {
        "lost connection"
    };
    tracing::info!(
        target: SMTPD,
        event = "lost_connection",
        client_ip = %client,
        after,
        timeout,
        "{what} after {after} from {}",
        Client(client)
    );
}

/// A refused request, as Postfix's `NOQUEUE: reject:` line.
pub struct Rejection<'a> {
    /// CONNECT, MAIL, RCPT, DATA, BDAT, END-OF-MESSAGE or AUTH.
    pub stage: &'a str,
    pub client: IpAddr,
    pub reply: &'a Reply,
    /// The envelope sender so far (None before MAIL).
    pub sender: Option<&'a str>,
    /// The recipient refused (RCPT).
    pub rcpt: Option<&'a str>,
    /// `SMTP` or `ESMTP`.
    pub proto: &'a str,
    pub helo: Option<&'a str>,
}

pub fn reject(r: &Rejection<'_>) {
    tracing::info!(
        target: SMTPD,
        event = "reject",
        stage = r.stage,
        client_ip = %r.client,
        code = r.reply.code,
        dsn = %EnhancedOf(r.reply),
        reason = %Clean(&r.reply.text),
        sender = r.sender.map(|s| tracing::field::display(Clean(s))),
        rcpt = r.rcpt.map(|s| tracing::field::display(Clean(s))),
        proto = r.proto,
        helo = r.helo.map(|s| tracing::field::display(Clean(s))),
        "NOQUEUE: reject: {} from {}: {};{}{} proto={}{}",
        r.stage,
        Client(r.client),
        ReplyLine { reply: r.reply, about: r.rcpt },
        Opt(" from=", r.sender.map(AngleAddr)),
        Opt(" to=", r.rcpt.map(AngleAddr)),
        r.proto,
        Opt(" helo=", r.helo.map(AngleAddr)),
    );
}

/// `<text>`, cleaned.
struct AngleAddr<'a>(&'a str);

impl fmt::Display for AngleAddr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{}>", Clean(self.0))
    }
}

/// The session reached `smtpd_hard_error_limit` after command `after` and is closed.
pub fn too_many_errors(client: IpAddr, after: &str) {
    tracing::info!(
        target: SMTPD,
        event = "too_many_errors",
        client_ip = %client,
        after,
        "too many errors after {after} from {}",
        Client(client)
    );
}

/// A failed AUTH (wrong credentials, a malformed exchange, or a locked-out address); `reason` is a fixed
/// phrase of letters and spaces (what fail2ban's `postfix-sasl` filter accepts after the colon).
pub fn auth_failed(client: IpAddr, mechanism: &str, user: Option<&str>, reason: &str) {
    tracing::warn!(
        target: SMTPD,
        event = "auth_failed",
        client_ip = %client,
        mechanism,
        sasl_username = user.map(|u| tracing::field::display(Clean(u))),
        reason,
        "{}: SASL {mechanism} authentication failed: {reason}",
        Client(client)
    );
}

/// The reception record: a message is durable in the queue (logged before its 250 is sent).
pub struct Reception<'a> {
    pub queue_id: QueueId,
    pub client: IpAddr,
    pub helo: &'a str,
    /// `SMTP`, `ESMTP`, `ESMTPS`, `ESMTPA`, `ESMTPSA`.
    pub proto: &'a str,
    pub sender: &'a str,
    /// Bytes of the message as stored (Received header and data).
    pub size: u64,
    pub nrcpt: usize,
    /// The Message-ID header's value, if the message has one.
    pub message_id: Option<&'a str>,
    pub tls: Option<&'a str>,
    pub sasl_method: Option<&'a str>,
    pub sasl_username: Option<&'a str>,
}

pub fn received(r: &Reception<'_>) {
    tracing::info!(
        target: SMTPD,
        event = "received",
        queue_id = %r.queue_id,
        client_ip = %r.client,
        helo = %Clean(r.helo),
        proto = r.proto,
        sender = %Clean(r.sender),
        size = r.size,
        nrcpt = r.nrcpt as u64,
        message_id = r.message_id.map(|m| tracing::field::display(Clean(m))),
        tls = r.tls,
        sasl_method = r.sasl_method,
        sasl_username = r.sasl_username.map(|u| tracing::field::display(Clean(u))),
        "{}: client={}, helo=<{}>, proto={}, from=<{}>, size={}, nrcpt={}{}{}{}{}",
        r.queue_id,
        Client(r.client),
        Clean(r.helo),
        r.proto,
        Clean(r.sender),
        r.size,
        r.nrcpt,
        Opt(", message-id=", r.message_id.map(Clean)),
        Opt(", tls=", r.tls.map(Clean)),
        Opt(", sasl_method=", r.sasl_method),
        Opt(", sasl_username=", r.sasl_username.map(Clean)),
    );
}

/// Where a delivery attempt went.
#[derive(Clone, Copy)]
pub enum Relay<'a> {
    /// No server was reached (DNS, connection or TLS failure, backoff).
    None,
    /// The local-delivery shard (a Maildir).
    Local,
    Host {
        host: &'a str,
        ip: IpAddr,
        port: Option<u16>,
    },
}

impl fmt::Display for Relay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Relay::None => f.write_str("none"),
            Relay::Local => f.write_str("local"),
            Relay::Host { host, ip, port } => {
                write!(f, "{}[{ip}]", Clean(host))?;
                match port {
                    Some(p) => write!(f, ":{p}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// A recipient's state after an attempt.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Status {
    Sent,
    Deferred,
    Bounced,
    /// The message has been queued longer than its lifetime: the recipient bounces (4.4.7); `returned`:
    /// the sender gets a bounce (false for a null sender).
    Expired {
        returned: bool,
    },
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Sent => "sent",
            Status::Deferred => "deferred",
            Status::Bounced => "bounced",
            Status::Expired { .. } => "expired",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Expired { returned: true } => f.write_str("expired, returned to sender"),
            Status::Expired { returned: false } => {
                f.write_str("expired, not returned (null sender)")
            }
            s => f.write_str(s.word()),
        }
    }
}

/// One recipient's delivery attempt.
pub struct Attempt<'a> {
    pub queue_id: QueueId,
    pub rcpt: &'a str,
    pub relay: Relay<'a>,
    /// Seconds since the message arrived.
    pub delay_s: f64,
    /// 1 for the first attempt.
    pub attempt: u32,
    pub status: Status,
    /// The reply or diagnostic.
    pub reply: &'a str,
    pub tls: Option<&'a str>,
    /// The TLS policy applied (`may`, `dane`, `mta-sts-enforce`, ...), shown as `tls_policy=` when known.
    pub tls_policy: Option<&'a str>,
    /// The bounce class of a deferral or bounce ([`crate::delivery::bounce_class`]), shown as `class=`.
    pub class: Option<&'static str>,
    /// The egress source the connection was bound to ([`crate::egress`]), shown as `source=`.
    pub source: Option<&'a str>,
}

/// `, name=X` when the value is known, else nothing: fields of ours after Postfix's own, at the end of the line
/// (after `status=... (reply)`), so that tools reading Postfix's delivery lines (pflogsumm and the like, whose
/// patterns expect `delay=`, `delays=`, `dsn=`, `status=` in a row) still read ours.
struct TrailingField<'a>(&'static str, Option<&'a str>);

impl fmt::Display for TrailingField<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1 {
            Some(v) => write!(f, ", {}={v}", self.0),
            None => Ok(()),
        }
    }
}

macro_rules! attempt_event {
    ($target:expr, $a:expr) => {{
        let a = $a;
        let class = match a.status {
            Status::Sent => 2,
            Status::Deferred => 4,
            Status::Bounced => 5,
            Status::Expired { .. } => 4,
        };
        let dsn: &dyn fmt::Display = match a.status {
            Status::Expired { .. } => &"4.4.7",
            _ => &Dsn(a.reply, class),
        };
        tracing::info!(
            target: $target,
            event = "delivery",
            queue_id = %a.queue_id,
            rcpt = %Clean(a.rcpt),
            relay = %a.relay,
            delay_s = a.delay_s,
            attempt = a.attempt,
            dsn = %dsn,
            status = a.status.word(),
            reply = %Clean(a.reply),
            tls = a.tls,
            tls_policy = a.tls_policy,
            class = a.class,
            source = a.source,
            "{}: to=<{}>, relay={}, delay={:.2}, dsn={}, status={} ({}){}{}{}",
            a.queue_id,
            Clean(a.rcpt),
            a.relay,
            a.delay_s,
            dsn,
            a.status,
            Clean(a.reply),
            TrailingField("tls_policy", a.tls_policy),
            TrailingField("class", a.class),
            TrailingField("source", a.source)
        );
    }};
}

/// A delivery attempt's result for one recipient (component `local` for the local-delivery shard).
pub fn delivery(a: &Attempt<'_>) {
    match a.relay {
        Relay::Local => attempt_event!(LOCAL, a),
        _ => attempt_event!(SMTP, a),
    }
}

/// A bounce (DSN) for `id` was queued as `bounce_id`.
pub fn bounce_queued(id: QueueId, bounce_id: QueueId) {
    tracing::info!(
        target: BOUNCE,
        event = "bounce",
        queue_id = %id,
        bounce_id = %bounce_id,
        "{id}: sender non-delivery notification: {bounce_id}"
    );
}

/// Recipients of `id` failed but its sender is null: no bounce is sent (a bounce is never bounced).
pub fn bounce_dropped(id: QueueId) {
    tracing::info!(
        target: QMGR,
        event = "bounce_dropped",
        queue_id = %id,
        "{id}: no non-delivery notification: the sender is null (a bounce is not bounced)"
    );
}

/// Every recipient of `id` is delivered or bounced: the message leaves the queue.
pub fn removed(id: QueueId) {
    tracing::info!(target: QMGR, event = "removed", queue_id = %id, "{id}: removed");
}

/// What the administrator did to a queued message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueChange {
    /// Not delivered until released.
    Held,
    Released,
    /// Removed without a bounce.
    Deleted,
    /// Open recipients bounced to the sender.
    Bounced,
    /// Open recipients due now.
    Flushed,
}

impl QueueChange {
    /// The `action` field: hold, release, delete, bounce, flush.
    pub fn action(self) -> &'static str {
        match self {
            QueueChange::Held => "hold",
            QueueChange::Released => "release",
            QueueChange::Deleted => "delete",
            QueueChange::Bounced => "bounce",
            QueueChange::Flushed => "flush",
        }
    }

    fn phrase(self) -> &'static str {
        match self {
            QueueChange::Held => "placed on hold",
            QueueChange::Released => "released from hold",
            QueueChange::Deleted => "removed",
            QueueChange::Bounced => "returned to sender",
            QueueChange::Flushed => "requeued",
        }
    }
}

/// The administrator held, released, deleted, bounced or flushed message `id`; `reason` may be empty.
/// Call it in the server process, where the change is made: `eventlog::queue_changed(id,
/// QueueChange::Held, "held by the administrator")`.
pub fn queue_changed(id: QueueId, change: QueueChange, reason: &str) {
    let why = (!reason.is_empty()).then_some(reason);
    tracing::info!(
        target: POSTSUPER,
        event = "queue_changed",
        queue_id = %id,
        action = change.action(),
        reason = why.map(|r| tracing::field::display(Clean(r))),
        "{id}: {}{}",
        change.phrase(),
        Opt(" ", why.map(|r| Parens(Clean(r)))),
    );
}

/// `(text)`.
struct Parens<T>(T);

impl<T: fmt::Display> fmt::Display for Parens<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({})", self.0)
    }
}

/// The value of the first `Message-ID:` header in the header section of `data` (the `<...>` token, or the
/// value's first word), if there is one. Reads at most [`limits::EVENTLOG_HEADER_SCAN_BYTES_MAX`] bytes.
pub fn message_id(data: &[u8]) -> Option<&str> {
    let data = &data[..data.len().min(limits::EVENTLOG_HEADER_SCAN_BYTES_MAX)];
    let mut pos = 0;
    while pos < data.len() {
        let end = memchr::memchr(b'\n', &data[pos..]).map_or(data.len(), |i| pos + i + 1);
        let line = &data[pos..end];
        if line == b"\r\n" || line == b"\n" {
            return None; // end of the header section
        }
        if line.len() > 11 && line[..11].eq_ignore_ascii_case(b"message-id:") {
            // The value may be folded onto the next lines: take the first token after the colon.
            let rest = &data[pos + 11..];
            let start = rest.iter().position(|b| !b" \t\r\n".contains(b))?;
            let rest = &rest[start..];
            let len = if rest.first() == Some(&b'<') {
                memchr::memchr(b'>', rest).map_or(0, |i| i + 1)
            } else {
                rest.iter()
                    .position(|b| b" \t\r\n".contains(b))
                    .unwrap_or(rest.len())
            };
            return std::str::from_utf8(&rest[..len])
                .ok()
                .filter(|s| !s.is_empty());
        }
        pos = end;
    }
    None
}

/// Runs `f` with a subscriber of this module's `format` on this thread and returns the lines it logged (tests).
#[cfg(test)]
pub(crate) fn capture(format: LogFormat, f: impl FnOnce()) -> String {
    #[derive(Clone, Default)]
    struct Buffer(Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Buffer {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| io::ErrorKind::Other)?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let buf = Buffer::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(Level::INFO)
        .event_format(LineFormat::new(format))
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let bytes = buf.0.lock().map(|b| b.clone()).unwrap_or_default();
    String::from_utf8(bytes).expect("lines are UTF-8")
}

#[cfg(test)]
mod tests;
