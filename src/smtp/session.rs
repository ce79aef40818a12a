//! The SMTP server session as a plain state machine: bytes in, reply bytes and [`Action`]s out. No sockets, no clock.
//!
//! The I/O layer (`server`) reads into a buffer, calls [`Session::feed`], writes what the session appended to the
//! output buffer when the session needs more input (so a pipelined batch is answered in one write), and carries out
//! the actions that need I/O: queueing a finished message, starting TLS, checking a password, closing.

use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine as _;
use memchr::memchr;

use super::address::Path;
use super::command::{parse_command, AuthMechanism, Body, Command, CommandError};
use super::data::{BareNewline, ChunkDecoder, DataDecoder, DataStatus};
use super::dsn::{self, Orcpt, RcptDsn, Ret};
use super::reply::{self, Rejection, Reply};
use crate::eventlog;
use crate::limits;
use crate::local::recipients::Target;

/// What a listener is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerKind {
    /// Port-25 style: no AUTH needed; relaying only per policy.
    Smtp,
    /// Port-587 style: STARTTLS and AUTH required before MAIL.
    Submission,
    /// Port-465 style: implicit TLS, AUTH required.
    Submissions,
}

/// A recipient the session has parsed and now needs a verdict on (relay policy, local users, aliases): the I/O
/// layer gets it in [`Action::Recipient`] and answers with [`Session::rcpt_result`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptRequest {
    /// Canonical address (`local@domain`); for `<postmaster>`, empty (the tables know the postmaster).
    pub address: String,
    /// `RCPT TO:<Postmaster>` without a domain.
    pub postmaster: bool,
    /// The address had source-routing characters (`%`, `!`, `@` in the local part).
    pub routing_chars: bool,
    /// The client is in mynetworks or authenticated.
    pub may_relay: bool,
}

/// What a listener allows; shared by all sessions of a listener.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub hostname: String,
    pub kind: ListenerKind,
    pub message_size_limit: u64,
    pub recipient_limit: usize,
    pub hard_error_limit: u32,
    pub line_length_limit: usize,
    pub bare_newline: BareNewline,
    /// Longest line stored in a message; longer ones are folded with CRLF SPACE (0: never).
    pub smtp_line_length_limit: usize,
    pub tls_available: bool,
    pub auth_available: bool,
    pub allow_plaintext_auth: bool,
}

/// What the I/O layer must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Write the pending output, then read more input and feed it.
    NeedMore,
    /// A message is complete: queue it (see [`Session::transaction`]), then call [`Session::message_done`].
    Message,
    /// Write the pending output (the 220), drop any unread input, start TLS, then call [`Session::tls_started`].
    StartTls,
    /// Give a verdict on this recipient (see [`RcptRequest`]), adding its final targets to
    /// [`Session::targets_mut`] when it is accepted, then call [`Session::rcpt_result`].
    Recipient(RcptRequest),
    /// Check these credentials (off the reactor), then call [`Session::auth_result`].
    Authenticate { user: String, password: String },
    /// A malformed AUTH exchange was refused (the reply is in the output): count it against the client like a
    /// wrong password and delay the reply, then go on feeding.
    AuthFailed,
    /// Write the pending output and close the connection.
    Close,
}

/// The transaction being received.
#[derive(Debug, Default)]
pub struct Transaction {
    /// Envelope sender; empty for the null sender `<>`.
    pub sender: String,
    /// Final recipients (after alias expansion, without duplicates): local mailboxes and remote addresses.
    pub recipients: Vec<Target>,
    /// RCPT commands accepted (the `smtpd_recipient_limit` count), and the first one as the client gave it.
    pub rcpt_count: usize,
    pub first_rcpt: String,
    /// Message content, dot-unstuffed, CRLF line ends.
    pub data: Vec<u8>,
    pub smtputf8: bool,
    pub body_8bitmime: bool,
    /// DSN (RFC 3461): `RET=` and `ENVID=` (decoded) of the MAIL command.
    pub ret: Option<Ret>,
    pub envid: Option<String>,
    /// DSN `NOTIFY=`/`ORCPT=` of each final recipient, parallel to `recipients` (a recipient expanded by
    /// aliases gives each of its targets the original's parameters, SUCCESS left out when it became several;
    /// see [`Session::rcpt_result`]).
    pub rcpt_dsn: Vec<RcptDsn>,
    /// Addresses the client gave with NOTIFY=SUCCESS that aliases expanded into several recipients (a mailing
    /// list), each with its RCPT's parameters: the message's "expanded" report (RFC 3461 6.2.7.3) names them.
    /// At most one per accepted RCPT (`smtpd_recipient_limit`).
    pub expanded: Vec<(String, RcptDsn)>,
    /// The parameters of the RCPT awaiting its verdict.
    pending_dsn: RcptDsn,
    /// Some accepted RCPT named a local domain (`mydestination`, the postmaster), whatever its aliases expand
    /// to (set by the caller through [`Session::local_recipient_accepted`]).
    pub local_rcpt: bool,
    /// The BDAT chunks' line-end normaliser, from the first chunk of the transaction on.
    bdat: Option<ChunkDecoder>,
    /// The shard had no memory for the rest of this message: it is read to its end, not stored, and refused
    /// with 452 4.3.1.
    storage_refused: bool,
}

impl Transaction {
    /// The DSN facts to queue with the message (RET, ENVID, per final recipient NOTIFY and ORCPT).
    pub fn envelope_dsn(&self) -> dsn::EnvelopeDsn {
        dsn::EnvelopeDsn {
            ret: self.ret,
            envid: self.envid.clone(),
            rcpts: if self.rcpt_dsn.iter().all(RcptDsn::is_empty) {
                Vec::new()
            } else {
                self.rcpt_dsn.clone()
            },
            delay_warned: false,
        }
    }
}

/// An SMTP command as the event log counts it (Postfix's names, in the order its disconnect line lists them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    Helo,
    Ehlo,
    Starttls,
    Auth,
    Mail,
    Rcpt,
    Data,
    Bdat,
    Rset,
    Noop,
    Vrfy,
    Help,
    Quit,
    /// Anything else: an unknown verb, an overlong line.
    Unknown,
}

impl CommandKind {
    const ALL: [CommandKind; 14] = [
        CommandKind::Helo,
        CommandKind::Ehlo,
        CommandKind::Starttls,
        CommandKind::Auth,
        CommandKind::Mail,
        CommandKind::Rcpt,
        CommandKind::Data,
        CommandKind::Bdat,
        CommandKind::Rset,
        CommandKind::Noop,
        CommandKind::Vrfy,
        CommandKind::Help,
        CommandKind::Quit,
        CommandKind::Unknown,
    ];

    /// The verb in upper case (`lost connection after RCPT`).
    pub fn verb(self) -> &'static str {
        match self {
            CommandKind::Helo => "HELO",
            CommandKind::Ehlo => "EHLO",
            CommandKind::Starttls => "STARTTLS",
            CommandKind::Auth => "AUTH",
            CommandKind::Mail => "MAIL",
            CommandKind::Rcpt => "RCPT",
            CommandKind::Data => "DATA",
            CommandKind::Bdat => "BDAT",
            CommandKind::Rset => "RSET",
            CommandKind::Noop => "NOOP",
            CommandKind::Vrfy => "VRFY",
            CommandKind::Help => "HELP",
            CommandKind::Quit => "QUIT",
            CommandKind::Unknown => "UNKNOWN",
        }
    }

    /// The command a line holds, by its first word (case-insensitive), whether or not the rest parses.
    pub fn of_line(line: &[u8]) -> CommandKind {
        let word = line.split(|&b| b == b' ').next().unwrap_or(line);
        let mut upper = [0u8; 8];
        let Some(up) = upper.get_mut(..word.len()) else {
            return CommandKind::Unknown;
        };
        for (u, b) in up.iter_mut().zip(word) {
            *u = b.to_ascii_uppercase();
        }
        match &*up {
            b"HELO" => CommandKind::Helo,
            b"EHLO" => CommandKind::Ehlo,
            b"STARTTLS" => CommandKind::Starttls,
            b"AUTH" => CommandKind::Auth,
            b"MAIL" => CommandKind::Mail,
            b"RCPT" => CommandKind::Rcpt,
            b"DATA" => CommandKind::Data,
            b"BDAT" => CommandKind::Bdat,
            b"RSET" => CommandKind::Rset,
            b"NOOP" => CommandKind::Noop,
            b"VRFY" => CommandKind::Vrfy,
            b"HELP" => CommandKind::Help,
            b"QUIT" => CommandKind::Quit,
            _ => CommandKind::Unknown,
        }
    }
}

/// The commands a session answered: per kind, (accepted, total).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CommandCounts {
    counts: [(u32, u32); CommandKind::ALL.len()],
}

impl CommandCounts {
    fn count(&mut self, kind: CommandKind, accepted: bool) {
        let c = &mut self.counts[kind as usize];
        c.0 = c.0.saturating_add(u32::from(accepted));
        c.1 = c.1.saturating_add(1);
    }

    /// (accepted, total) for `kind`.
    pub fn get(&self, kind: CommandKind) -> (u32, u32) {
        self.counts[kind as usize]
    }

    pub fn accepted(&self) -> u32 {
        self.counts.iter().fold(0u32, |n, c| n.saturating_add(c.0))
    }

    pub fn total(&self) -> u32 {
        self.counts.iter().fold(0u32, |n, c| n.saturating_add(c.1))
    }
}

/// Postfix's form: `ehlo=1 mail=1 rcpt=1/2 data=1 quit=1 commands=5/6` (`n` when every one was accepted, else
/// `accepted/total`; kinds never seen are left out; no command at all: `commands=0/0`).
impl std::fmt::Display for CommandCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pair = |f: &mut std::fmt::Formatter<'_>, name: &str, (ok, all): (u32, u32)| {
            if ok == all {
                write!(f, "{name}={all}")
            } else {
                write!(f, "{name}={ok}/{all}")
            }
        };
        for k in CommandKind::ALL {
            let c = self.get(k);
            if c.1 > 0 {
                let verb = k.verb();
                let mut lower = [0u8; 8];
                let name = &mut lower[..verb.len()];
                name.copy_from_slice(verb.as_bytes());
                name.make_ascii_lowercase();
                pair(f, std::str::from_utf8(name).unwrap_or(verb), c)?;
                f.write_str(" ")?;
            }
        }
        match self.total() {
            0 => f.write_str("commands=0/0"),
            total => pair(f, "commands", (self.accepted(), total)),
        }
    }
}

#[derive(Debug)]
enum Phase {
    /// Before EHLO/HELO.
    Fresh,
    /// Greeted, no transaction.
    Ready,
    /// MAIL accepted.
    Mail,
    Data(DataDecoder),
    /// Inside a BDAT chunk: `remaining` octets still to take.
    Bdat {
        remaining: u64,
        last: bool,
        discard: Option<Reply>,
    },
    AuthPlain,
    AuthLoginUser,
    AuthLoginPass {
        user: String,
    },
    Closed,
}

pub struct Session {
    cfg: Arc<SessionConfig>,
    client_ip: IpAddr,
    /// In mynetworks.
    trusted: bool,
    phase: Phase,
    txn: Transaction,
    helo: Option<String>,
    esmtp: bool,
    tls: Option<String>,
    auth_user: Option<String>,
    errors: u32,
    auth_failures: u32,
    /// Commands answered, for the disconnect line.
    counts: CommandCounts,
    /// The command whose final reply is still to come (a 3xx reply does not end it).
    pending_cmd: Option<CommandKind>,
    /// The last command received (None: none yet), for `lost connection after ...`.
    last_cmd: Option<CommandKind>,
    /// The pending DATA got its 354: an error now refuses the content (END-OF-MESSAGE).
    content_started: bool,
    /// The address of the last RCPT, for the log line of its refusal (a buffer reused per RCPT).
    last_rcpt: String,
    /// The mechanism and user name of the last AUTH, for the log line of its failure.
    auth_mechanism: Option<AuthMechanism>,
    auth_attempt_user: Option<String>,
    skipping_long_line: bool,
    /// Input bytes of message content the session may still take before the I/O layer makes room for
    /// their output in the message buffer (`None`: no bound, for callers that do not budget memory). Content
    /// can at most double when stored (bare line ends become CRLF), so room for `2 n` bytes allows `n`.
    data_allowance: Option<usize>,
    /// Refusals sent since [`Session::take_rejections`] last took them, by [`Rejection`] kind.
    rejections: [u32; Rejection::COUNT],
}

impl Session {
    /// A session with a client at `client_ip`; `trusted`: the address is in mynetworks (it may relay).
    pub fn new(cfg: Arc<SessionConfig>, client_ip: IpAddr, trusted: bool) -> Session {
        Session {
            cfg,
            client_ip,
            trusted,
            phase: Phase::Fresh,
            txn: Transaction::default(),
            helo: None,
            esmtp: false,
            tls: None,
            auth_user: None,
            errors: 0,
            auth_failures: 0,
            counts: CommandCounts::default(),
            pending_cmd: None,
            last_cmd: None,
            content_started: false,
            last_rcpt: String::new(),
            auth_mechanism: None,
            auth_attempt_user: None,
            skipping_long_line: false,
            data_allowance: None,
            rejections: [0; Rejection::COUNT],
        }
    }

    /// The refusals sent since the last call, by [`Rejection`] kind (`None`: none), for the shard's counters.
    pub fn take_rejections(&mut self) -> Option<[u32; Rejection::COUNT]> {
        if self.rejections == [0; Rejection::COUNT] {
            return None;
        }
        Some(std::mem::take(&mut self.rejections))
    }

    /// From now on message content is taken only within the allowance set by [`Session::set_data_allowance`]
    /// (zero at the start of each DATA and each BDAT chunk): content already read, e.g. pipelined behind
    /// the DATA or BDAT command, then waits in the caller's buffer until it has made room.
    pub fn budget_data(&mut self) {
        self.data_allowance = Some(0);
    }

    /// Input bytes of content that may be taken now (the caller reserved room for twice as many).
    pub fn set_data_allowance(&mut self, bytes: usize) {
        if self.data_allowance.is_some() {
            self.data_allowance = Some(bytes);
        }
    }

    /// Most input bytes of content the next step may take: unbounded when nothing more is stored.
    fn content_take_max(&self, storing: bool) -> usize {
        match self.data_allowance {
            Some(n) if storing && !self.txn.storage_refused => n,
            _ => usize::MAX,
        }
    }

    fn took_content(&mut self, n: usize) {
        if let Some(a) = self.data_allowance.as_mut() {
            *a = a.saturating_sub(n);
        }
    }

    /// The allowance of a data phase starts at zero: the caller has not made room for it yet.
    fn content_starts(&mut self) {
        if self.data_allowance.is_some() {
            self.data_allowance = Some(0);
        }
    }

    pub fn greeting(&self) -> Reply {
        Reply::greeting(&self.cfg.hostname)
    }

    pub fn transaction(&self) -> &Transaction {
        &self.txn
    }

    /// The largest message this session accepts (its listener's settings when it started).
    pub fn message_size_limit(&self) -> u64 {
        self.cfg.message_size_limit
    }

    pub fn helo_name(&self) -> &str {
        self.helo.as_deref().unwrap_or("unknown")
    }

    pub fn client_ip(&self) -> IpAddr {
        self.client_ip
    }

    pub fn tls_info(&self) -> Option<&str> {
        self.tls.as_deref()
    }

    pub fn auth_user(&self) -> Option<&str> {
        self.auth_user.as_deref()
    }

    pub fn auth_failures(&self) -> u32 {
        self.auth_failures
    }

    /// The AUTH mechanism the client authenticated with (`PLAIN`, `LOGIN`), once it has.
    pub fn auth_mechanism(&self) -> Option<&'static str> {
        self.auth_user.as_ref()?;
        self.auth_mechanism.map(mechanism_name)
    }

    /// The commands answered so far; a command still waiting for its reply (the connection ended first)
    /// counts as refused from now on.
    pub fn end_counts(&mut self) -> &CommandCounts {
        if let Some(k) = self.pending_cmd.take() {
            self.counts.count(k, false);
        }
        &self.counts
    }

    /// The last command received, as `lost connection after ...` names it (`CONNECT` before any).
    pub fn last_command(&self) -> &'static str {
        self.last_cmd.map_or("CONNECT", CommandKind::verb)
    }

    /// True while an overlong command line is being dropped as it streams in (its request is not over).
    pub fn skipping_line(&self) -> bool {
        self.skipping_long_line
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// Received-header protocol name (RFC 3848).
    pub fn protocol(&self) -> &'static str {
        match (self.esmtp, self.tls.is_some(), self.auth_user.is_some()) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, true, false) => "ESMTPS",
            (true, false, true) => "ESMTPA",
            (true, true, true) => "ESMTPSA",
        }
    }

    /// The client may relay: authenticated, or in `mynetworks` (as decided when the session started).
    pub fn may_relay(&self) -> bool {
        self.auth_user.is_some() || self.trusted
    }

    fn auth_offered(&self) -> bool {
        self.cfg.auth_available && (self.tls.is_some() || self.cfg.allow_plaintext_auth)
    }

    /// Appends a reply; error replies count towards `smtpd_hard_error_limit`.
    fn reply(&mut self, out: &mut Vec<u8>, r: &Reply) -> Action {
        r.write_to(out);
        if let Some(k) = r.rejection() {
            self.rejections[k as usize] += 1;
        }
        self.answered(r);
        if r.closes() {
            self.phase = Phase::Closed;
            return Action::Close;
        }
        if r.is_error() {
            self.errors += 1;
            if self.errors >= self.cfg.hard_error_limit {
                eventlog::too_many_errors(self.client_ip, self.last_command());
                reply::TOO_MANY_ERRORS.write_to(out);
                self.phase = Phase::Closed;
                return Action::Close;
            }
        }
        Action::NeedMore
    }

    /// A command was received (the line's first word says which).
    fn note_command(&mut self, kind: CommandKind) {
        if let Some(k) = self.pending_cmd.replace(kind) {
            // Cannot happen (every command is answered before the next is read); counted, not lost.
            self.counts.count(k, false);
        }
        self.last_cmd = Some(kind);
        self.content_started = false;
    }

    /// `r` ends the pending command unless it is an intermediate (3xx) reply: the command is counted, and a
    /// refused MAIL, RCPT, DATA, BDAT or message content is logged.
    fn answered(&mut self, r: &Reply) {
        if (300..400).contains(&r.code) {
            return;
        }
        let Some(kind) = self.pending_cmd.take() else {
            return;
        };
        self.counts.count(kind, !r.is_error());
        let content = std::mem::take(&mut self.content_started);
        if !r.is_error() {
            return;
        }
        let (stage, sender_known) = match kind {
            CommandKind::Mail => ("MAIL", true),
            CommandKind::Rcpt => ("RCPT", self.in_transaction()),
            CommandKind::Data if content => ("END-OF-MESSAGE", true),
            CommandKind::Data => ("DATA", self.in_transaction()),
            CommandKind::Bdat => ("BDAT", self.txn.bdat.is_some()),
            _ => return,
        };
        eventlog::reject(&eventlog::Rejection {
            stage,
            client: self.client_ip,
            reply: r,
            sender: sender_known.then_some(self.txn.sender.as_str()),
            rcpt: (kind == CommandKind::Rcpt).then_some(self.last_rcpt.as_str()),
            proto: if self.esmtp { "ESMTP" } else { "SMTP" },
            helo: self.helo.as_deref(),
        });
    }

    fn reset_transaction(&mut self) {
        self.txn.sender.clear();
        self.txn.recipients.clear();
        self.txn.rcpt_count = 0;
        self.txn.first_rcpt.clear();
        self.txn.data.clear();
        if self.txn.data.capacity() > limits::SESSION_DATA_BUFFER_RETAINED_BYTES_MAX {
            self.txn.data = Vec::new();
        }
        self.txn.smtputf8 = false;
        self.txn.body_8bitmime = false;
        self.txn.ret = None;
        self.txn.envid = None;
        self.txn.local_rcpt = false;
        self.txn.rcpt_dsn.clear();
        self.txn.expanded.clear();
        self.txn.pending_dsn = RcptDsn::default();
        self.txn.bdat = None;
        self.txn.storage_refused = false;
    }

    /// Feeds input. Returns how many bytes were consumed (the caller keeps the rest, at most one partial command
    /// line of `line_length_limit` bytes, for the next call) and what to do next.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, Action) {
        let mut pos = 0;
        loop {
            let step = match &mut self.phase {
                Phase::Closed => return (input.len(), Action::Close),
                Phase::Data(_) => {
                    let max = self.content_take_max(true);
                    let avail = (input.len() - pos).min(max);
                    if avail == 0 && pos < input.len() {
                        // Content is waiting for room in the message buffer.
                        return (pos, Action::NeedMore);
                    }
                    let Phase::Data(dec) = &mut self.phase else {
                        unreachable!("matched above")
                    };
                    let (n, status) = dec.feed(&input[pos..pos + avail], &mut self.txn.data);
                    pos += n;
                    self.took_content(n);
                    let Phase::Data(dec) = &mut self.phase else {
                        unreachable!("matched above")
                    };
                    match status {
                        DataStatus::More => return (pos, Action::NeedMore),
                        DataStatus::BareLineEnd => {
                            // Replied (and logged) with the transaction still known, then forgotten.
                            self.reply(out, &reply::BARE_NEWLINE);
                            self.reset_transaction();
                            self.phase = Phase::Closed;
                            Action::Close
                        }
                        DataStatus::Done => {
                            let (over, eight) = (dec.over_limit(), dec.saw_8bit());
                            self.phase = Phase::Ready;
                            if self.txn.storage_refused {
                                let a = self.reply(out, &reply::QUEUE_WRITE_FAILED);
                                self.reset_transaction();
                                a
                            } else if over {
                                let a = self.reply(
                                    out,
                                    &Reply::message_too_big(self.cfg.message_size_limit),
                                );
                                self.reset_transaction();
                                a
                            } else {
                                self.txn.body_8bitmime |= eight;
                                Action::Message
                            }
                        }
                    }
                }
                Phase::Bdat {
                    remaining, discard, ..
                } => {
                    let storing = discard.is_none();
                    let remaining_now = *remaining;
                    let max = self.content_take_max(storing);
                    let take = remaining_now
                        .min((input.len() - pos) as u64)
                        .min(max as u64) as usize;
                    if take == 0 && remaining_now > 0 && pos < input.len() {
                        // Content is waiting for room in the message buffer.
                        return (pos, Action::NeedMore);
                    }
                    let chunk = &input[pos..pos + take];
                    pos += take;
                    if storing {
                        if let Some(dec) = self.txn.bdat.as_mut() {
                            dec.feed(chunk, &mut self.txn.data);
                        }
                        self.took_content(take);
                    }
                    let Phase::Bdat {
                        remaining,
                        last,
                        discard,
                    } = &mut self.phase
                    else {
                        unreachable!("matched above")
                    };
                    *remaining -= take as u64;
                    if *remaining > 0 {
                        return (pos, Action::NeedMore);
                    }
                    let (last, discard) = (*last, discard.take());
                    self.phase = if self.txn.recipients.is_empty() {
                        Phase::Ready
                    } else {
                        Phase::Mail
                    };
                    self.bdat_chunk_done(out, last, discard)
                }
                _ => {
                    if pos >= input.len() {
                        return (pos, Action::NeedMore);
                    }
                    let rest = &input[pos..];
                    let Some(j) = memchr(b'\n', rest) else {
                        if rest.len() > self.line_limit() {
                            // Drop the overlong line as it streams in; answer when its end arrives.
                            self.skipping_long_line = true;
                            return (input.len(), Action::NeedMore);
                        }
                        return (pos, Action::NeedMore);
                    };
                    pos += j + 1;
                    let raw = &rest[..j];
                    let (line, bare_lf) = match raw.last() {
                        Some(b'\r') => (&raw[..j - 1], false),
                        _ => (raw, true),
                    };
                    if std::mem::take(&mut self.skipping_long_line)
                        || line.len() > self.line_limit()
                    {
                        self.note_command(CommandKind::Unknown);
                        self.reply(out, &reply::LINE_TOO_LONG)
                    } else if bare_lf && self.cfg.bare_newline == BareNewline::Reject {
                        self.note_command(CommandKind::of_line(line));
                        self.reply(out, &reply::BARE_NEWLINE);
                        self.phase = Phase::Closed;
                        Action::Close
                    } else {
                        self.line(line, out)
                    }
                }
            };
            if step != Action::NeedMore {
                return (pos, step);
            }
        }
    }

    /// The most bytes [`Session::feed`] leaves unconsumed when it needs more input outside message content: one
    /// partial line within the current phase's line limit (the fuzz targets check the promise).
    pub(crate) fn pending_line_limit(&self) -> usize {
        self.line_limit()
    }

    fn line_limit(&self) -> usize {
        match self.phase {
            Phase::AuthPlain | Phase::AuthLoginUser | Phase::AuthLoginPass { .. } => {
                limits::SESSION_AUTH_LINE_BYTES_MAX
            }
            _ => self.cfg.line_length_limit,
        }
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<u8>) -> Action {
        match std::mem::replace(&mut self.phase, Phase::Ready) {
            Phase::AuthPlain => self.auth_plain_response(line, out),
            Phase::AuthLoginUser => self.auth_login_user(line, out),
            Phase::AuthLoginPass { user } => self.auth_login_pass(user, line, out),
            other => {
                self.phase = other;
                self.note_command(CommandKind::of_line(line));
                let utf8 = self.txn.smtputf8;
                match parse_command(line, utf8) {
                    Ok(cmd) => self.command(cmd, out),
                    Err(e) => self.command_error(e, out),
                }
            }
        }
    }

    fn command_error(&mut self, e: CommandError, out: &mut Vec<u8>) -> Action {
        self.reply(out, &e.reply())
    }

    fn in_transaction(&self) -> bool {
        matches!(self.phase, Phase::Mail)
    }

    fn command(&mut self, cmd: Command<'_>, out: &mut Vec<u8>) -> Action {
        match cmd {
            Command::Ehlo(name) | Command::Helo(name) => {
                let ehlo = matches!(cmd, Command::Ehlo(_));
                self.reset_transaction();
                self.helo = Some(name.to_string());
                self.esmtp = ehlo;
                self.phase = Phase::Ready;
                if ehlo {
                    let r = Reply::ehlo(&self.cfg.hostname, name, self.ehlo_keywords());
                    self.reply(out, &r)
                } else {
                    self.reply(out, &Reply::helo(&self.cfg.hostname))
                }
            }
            Command::Mail { from, params } => {
                // Only the MAIL that opens the transaction sets RET and ENVID (a nested MAIL gets 503).
                let opens = !self.in_transaction();
                let a = self.mail(from, params.size, params.body, params.smtputf8, out);
                if opens && self.in_transaction() {
                    self.txn.ret = params.ret;
                    self.txn.envid = params.envid.map(dsn::decode_xtext);
                }
                a
            }
            Command::Rcpt { to, params } => {
                self.txn.pending_dsn = RcptDsn {
                    notify: params.notify,
                    orcpt: params.orcpt.map(|(t, a)| Orcpt {
                        addr_type: t.to_string(),
                        address: dsn::decode_xtext(a),
                    }),
                };
                self.rcpt(to, out)
            }
            Command::Data => {
                if self.txn.bdat.is_some() {
                    return self.reply(out, &reply::DATA_AFTER_BDAT);
                }
                if !self.in_transaction() {
                    return self.reply(out, &reply::NEED_MAIL);
                }
                if self.txn.recipients.is_empty() {
                    return self.reply(out, &reply::NEED_RCPT);
                }
                self.content_starts();
                self.phase = Phase::Data(DataDecoder::new(
                    self.cfg.bare_newline,
                    self.cfg.message_size_limit,
                    self.cfg.smtp_line_length_limit,
                ));
                self.content_started = true;
                self.reply(out, &reply::START_DATA)
            }
            Command::Bdat { size, last } => {
                let discard = if !self.in_transaction() {
                    Some(reply::NEED_MAIL)
                } else if self.txn.recipients.is_empty() {
                    Some(reply::NEED_RCPT)
                } else {
                    None
                };
                if discard.is_none() && self.txn.bdat.is_none() {
                    self.txn.bdat = Some(ChunkDecoder::new(
                        self.cfg.bare_newline,
                        self.cfg.message_size_limit,
                        self.cfg.smtp_line_length_limit,
                    ));
                }
                self.content_starts();
                self.phase = Phase::Bdat {
                    remaining: size,
                    last,
                    discard,
                };
                Action::NeedMore
            }
            Command::Rset => {
                self.reset_transaction();
                if !matches!(self.phase, Phase::Fresh) {
                    self.phase = Phase::Ready;
                }
                self.reply(out, &reply::RESET_OK)
            }
            Command::Noop => self.reply(out, &reply::OK),
            Command::Quit => {
                let r = Reply::bye(&self.cfg.hostname);
                self.reply(out, &r)
            }
            Command::Vrfy => self.reply(out, &reply::VRFY_CANNOT),
            Command::Help => self.reply(out, &reply::HELP),
            Command::StartTls => {
                if self.tls.is_some() {
                    self.reply(out, &reply::ALREADY_TLS)
                } else if !self.cfg.tls_available {
                    self.reply(out, &reply::TLS_NOT_AVAILABLE)
                } else if self.in_transaction() {
                    self.reply(out, &reply::BAD_SEQUENCE)
                } else {
                    reply::READY_TLS.write_to(out);
                    self.answered(&reply::READY_TLS);
                    Action::StartTls
                }
            }
            Command::Auth { mechanism, initial } => self.auth(mechanism, initial, out),
        }
    }

    fn ehlo_keywords(&self) -> Vec<std::borrow::Cow<'static, str>> {
        let mut k: Vec<std::borrow::Cow<'static, str>> = vec![
            "PIPELINING".into(),
            format!("SIZE {}", self.cfg.message_size_limit).into(),
        ];
        if self.cfg.tls_available && self.tls.is_none() {
            k.push("STARTTLS".into());
        }
        if self.auth_offered() && self.auth_user.is_none() {
            k.push("AUTH PLAIN LOGIN".into());
        }
        k.extend([
            "ENHANCEDSTATUSCODES".into(),
            "8BITMIME".into(),
            "DSN".into(),
            "SMTPUTF8".into(),
            "CHUNKING".into(),
        ]);
        k
    }

    fn mail(
        &mut self,
        from: Path<'_>,
        size: Option<u64>,
        body: Body,
        smtputf8: bool,
        out: &mut Vec<u8>,
    ) -> Action {
        match self.phase {
            Phase::Fresh => return self.reply(out, &reply::NEED_EHLO),
            Phase::Mail => return self.reply(out, &reply::NESTED_MAIL),
            _ => {}
        }
        // No transaction is open: the sender is noted now, so that a refusal's log line names it.
        self.reset_transaction();
        if let Path::Mailbox(m) = from {
            self.txn.sender = m.to_canonical();
        }
        if self.cfg.kind != ListenerKind::Smtp && self.auth_user.is_none() {
            let r = if self.tls.is_none() && !self.cfg.allow_plaintext_auth {
                reply::TLS_REQUIRED
            } else {
                reply::AUTH_REQUIRED
            };
            return self.reply(out, &r);
        }
        if size.is_some_and(|s| s > self.cfg.message_size_limit) {
            return self.reply(out, &Reply::message_too_big(self.cfg.message_size_limit));
        }
        self.txn.smtputf8 = smtputf8;
        self.txn.body_8bitmime = body == Body::EightBitMime;
        self.phase = Phase::Mail;
        self.reply(out, &reply::SENDER_OK)
    }

    fn rcpt(&mut self, to: Path<'_>, out: &mut Vec<u8>) -> Action {
        let address = match to {
            Path::Mailbox(m) => m.to_canonical(),
            _ => String::new(),
        };
        // For the log line of a refusal (one copy into a reused buffer).
        self.last_rcpt.clear();
        self.last_rcpt.push_str(match to {
            Path::Postmaster => "postmaster",
            _ => &address,
        });
        if !self.in_transaction() {
            return self.reply(out, &reply::NEED_MAIL);
        }
        if self.txn.rcpt_count >= self.cfg.recipient_limit {
            return self.reply(out, &reply::TOO_MANY_RECIPIENTS);
        }
        let may_relay = self.may_relay();
        match to {
            Path::Postmaster => Action::Recipient(RcptRequest {
                address: String::new(),
                postmaster: true,
                routing_chars: false,
                may_relay,
            }),
            Path::Mailbox(m) => Action::Recipient(RcptRequest {
                address,
                postmaster: false,
                routing_chars: m.routing_chars,
                may_relay,
            }),
            Path::Null => self.reply(out, &reply::BAD_RECIPIENT),
        }
    }

    /// The transaction's final recipients so far, for the verdict on an [`Action::Recipient`] to add to.
    pub fn targets_mut(&mut self) -> &mut Vec<Target> {
        &mut self.txn.recipients
    }

    /// The recipient being checked was classified local (see [`Transaction::local_rcpt`]).
    pub fn local_recipient_accepted(&mut self) {
        self.txn.local_rcpt = true;
    }

    /// The verdict on the recipient of the last [`Action::Recipient`]: `Ok(address)` (the address as accepted,
    /// the postmaster's full address for `<postmaster>`) or the refusal to send.
    ///
    /// Each target the verdict added gets the RCPT's DSN parameters; a target whose address differs from the
    /// one accepted (an alias or virtual expansion) and that has no `ORCPT=` gets `rfc822;<accepted address>`,
    /// so a report names the address the sender wrote. A recipient expanded into more than one target (a
    /// mailing list, RFC 3461 6.2.7.3) with NOTIFY=SUCCESS is noted in [`Transaction::expanded`] (one
    /// "expanded" report on the address given, when the message is accepted) and its targets get its NOTIFY
    /// without SUCCESS (NEVER if that was all), so no report reveals who is behind the alias. One target (a
    /// one-to-one rewrite, 6.2.7.1) keeps the whole NOTIFY: its report is on the final address, with ORCPT.
    pub fn rcpt_result(&mut self, verdict: Result<String, Reply>, out: &mut Vec<u8>) -> Action {
        let mut pending = std::mem::take(&mut self.txn.pending_dsn);
        let added = self
            .txn
            .recipients
            .len()
            .saturating_sub(self.txn.rcpt_dsn.len());
        if let (Ok(accepted), true, Some(n)) = (&verdict, added > 1, pending.notify) {
            if n.success() {
                self.txn.expanded.push((accepted.clone(), pending.clone()));
                pending.notify = dsn::Notify::from_bits(n.bits() & !dsn::Notify::SUCCESS)
                    .or(dsn::Notify::from_bits(dsn::Notify::NEVER));
            }
        }
        while self.txn.rcpt_dsn.len() < self.txn.recipients.len() {
            let i = self.txn.rcpt_dsn.len();
            let mut d = pending.clone();
            if let (None, Ok(accepted)) = (&d.orcpt, &verdict) {
                if self.txn.recipients[i].address() != accepted.as_str() && !accepted.is_empty() {
                    d.orcpt = Some(Orcpt {
                        addr_type: "rfc822".into(),
                        address: accepted.clone(),
                    });
                }
            }
            self.txn.rcpt_dsn.push(d);
        }
        match verdict {
            Ok(address) => {
                if self.txn.rcpt_count == 0 {
                    self.txn.first_rcpt = address;
                }
                self.txn.rcpt_count += 1;
                self.reply(out, &reply::RCPT_OK)
            }
            Err(r) => self.reply(out, &r),
        }
    }

    fn bdat_chunk_done(&mut self, out: &mut Vec<u8>, last: bool, discard: Option<Reply>) -> Action {
        if let Some(r) = discard {
            return self.reply(out, &r);
        }
        let Some(dec) = self.txn.bdat.as_mut() else {
            return self.reply(out, &reply::BAD_SEQUENCE);
        };
        if last {
            dec.finish(&mut self.txn.data);
        }
        let (bare, over, eight) = (dec.saw_bare_line_end(), dec.over_limit(), dec.saw_8bit());
        // Each refusal is replied (and logged) with the transaction still known, then forgotten.
        if self.txn.storage_refused {
            self.phase = Phase::Ready;
            let a = self.reply(out, &reply::QUEUE_WRITE_FAILED);
            self.reset_transaction();
            return a;
        }
        if bare {
            self.reply(out, &reply::BARE_NEWLINE);
            self.reset_transaction();
            self.phase = Phase::Closed;
            return Action::Close;
        }
        if over {
            self.phase = Phase::Ready;
            let a = self.reply(out, &Reply::message_too_big(self.cfg.message_size_limit));
            self.reset_transaction();
            return a;
        }
        if last {
            self.phase = Phase::Ready;
            self.txn.body_8bitmime |= eight;
            return Action::Message;
        }
        let r = Reply::bdat_ok(self.txn.data.len() as u64);
        self.reply(out, &r)
    }

    /// True while message content (DATA or a BDAT chunk) is being received.
    pub fn receiving_data(&self) -> bool {
        matches!(self.phase, Phase::Data(_) | Phase::Bdat { .. })
    }

    /// Bytes of the message stored so far, and the capacity of its buffer (what it holds in memory).
    pub fn data_len(&self) -> usize {
        self.txn.data.len()
    }

    pub fn data_capacity(&self) -> usize {
        self.txn.data.capacity()
    }

    /// Grows the message buffer to hold at least `additional` more bytes (the I/O layer took them from the
    /// shard's data budget first).
    pub fn reserve_data(&mut self, additional: usize) {
        self.txn.data.reserve_exact(additional);
    }

    /// True once [`Session::refuse_storage`] was called for this message.
    pub fn storage_refused(&self) -> bool {
        self.txn.storage_refused
    }

    /// The shard has no memory for this message: its buffer is freed, the rest is read to the end without
    /// being stored, and the message is refused with 452 4.3.1 (the client retries later).
    pub fn refuse_storage(&mut self) {
        self.txn.storage_refused = true;
        self.txn.data = Vec::new();
        match &mut self.phase {
            Phase::Data(dec) => dec.stop_storing(),
            _ => {
                if let Some(dec) = self.txn.bdat.as_mut() {
                    dec.stop_storing();
                }
            }
        }
    }

    /// Called after the queue accepted (`Ok(queue id)`) or refused the message from [`Action::Message`].
    pub fn message_done(&mut self, outcome: Result<&str, Reply>, out: &mut Vec<u8>) -> Action {
        self.phase = Phase::Ready;
        // Replied (and a refusal logged) with the transaction still known, then forgotten.
        let a = match outcome {
            Ok(id) => self.reply(out, &Reply::queued(id)),
            Err(r) => self.reply(out, &r),
        };
        self.reset_transaction();
        a
    }

    /// Called once the TLS handshake succeeded; `info` is e.g. `TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384`.
    pub fn tls_started(&mut self, info: String) {
        // RFC 3207: forget everything learned before TLS; the client must EHLO again.
        self.reset_transaction();
        self.helo = None;
        self.esmtp = false;
        self.tls = Some(info);
        self.phase = Phase::Fresh;
    }

    fn auth(&mut self, mech: AuthMechanism, initial: Option<&str>, out: &mut Vec<u8>) -> Action {
        if !self.cfg.auth_available {
            return self.reply(out, &reply::AUTH_NOT_ENABLED);
        }
        if !self.auth_offered() {
            return self.reply(out, &reply::AUTH_NEEDS_TLS);
        }
        if self.auth_user.is_some() {
            return self.reply(out, &reply::ALREADY_AUTH);
        }
        match self.phase {
            Phase::Fresh => return self.reply(out, &reply::NEED_EHLO),
            Phase::Mail => return self.reply(out, &reply::BAD_SEQUENCE),
            _ => {}
        }
        self.auth_mechanism = Some(mech);
        self.auth_attempt_user = None;
        match (mech, initial) {
            (AuthMechanism::Plain, Some(resp)) => self.auth_plain_response(resp.as_bytes(), out),
            (AuthMechanism::Plain, None) => {
                self.phase = Phase::AuthPlain;
                Reply::new(334, None, "").write_to(out);
                Action::NeedMore
            }
            (AuthMechanism::Login, Some(user)) => self.auth_login_user(user.as_bytes(), out),
            (AuthMechanism::Login, None) => {
                self.phase = Phase::AuthLoginUser;
                Reply::new(334, None, "VXNlcm5hbWU6").write_to(out);
                Action::NeedMore
            }
        }
    }

    fn decode_b64(&mut self, line: &[u8], out: &mut Vec<u8>) -> Result<Vec<u8>, Action> {
        self.phase = Phase::Ready;
        if line == b"*" {
            return Err(self.reply(out, &reply::AUTH_CANCELLED));
        }
        if line == b"=" {
            return Ok(Vec::new());
        }
        base64::engine::general_purpose::STANDARD
            .decode(line)
            .map_err(|_| {
                self.auth_failures += 1;
                self.log_auth_failure("invalid base64 data");
                Self::failed(self.reply(out, &reply::AUTH_BAD_BASE64))
            })
    }

    /// A malformed AUTH: counted like a wrong password (unless the session closes anyway).
    fn failed(a: Action) -> Action {
        match a {
            Action::NeedMore => Action::AuthFailed,
            other => other,
        }
    }

    fn malformed_auth(&mut self, out: &mut Vec<u8>) -> Action {
        Self::failed(self.auth_refused(out, "malformed response"))
    }

    /// A failed AUTH, logged as Postfix's `warning: ...: SASL PLAIN authentication failed: <reason>`.
    fn log_auth_failure(&self, reason: &str) {
        eventlog::auth_failed(
            self.client_ip,
            self.auth_mechanism.map_or("PLAIN", mechanism_name),
            self.auth_attempt_user.as_deref(),
            reason,
        );
    }

    fn auth_refused(&mut self, out: &mut Vec<u8>, reason: &str) -> Action {
        self.phase = Phase::Ready;
        self.auth_failures += 1;
        self.log_auth_failure(reason);
        self.reply(out, &reply::AUTH_FAILED)
    }

    fn auth_plain_response(&mut self, line: &[u8], out: &mut Vec<u8>) -> Action {
        let raw = match self.decode_b64(line, out) {
            Ok(r) => r,
            Err(a) => return a,
        };
        let mut parts = raw.split(|&b| b == 0);
        let (authz, user, pass) = (parts.next(), parts.next(), parts.next());
        match (authz, user, pass, parts.next()) {
            (Some(authz), Some(user), Some(pass), None) if authz.is_empty() || authz == user => {
                match (std::str::from_utf8(user), std::str::from_utf8(pass)) {
                    (Ok(u), Ok(p)) => {
                        self.auth_attempt_user = Some(u.to_string());
                        Action::Authenticate {
                            user: u.to_string(),
                            password: p.to_string(),
                        }
                    }
                    _ => self.malformed_auth(out),
                }
            }
            _ => self.malformed_auth(out),
        }
    }

    fn auth_login_user(&mut self, line: &[u8], out: &mut Vec<u8>) -> Action {
        let raw = match self.decode_b64(line, out) {
            Ok(r) => r,
            Err(a) => return a,
        };
        match String::from_utf8(raw) {
            Ok(user) => {
                self.phase = Phase::AuthLoginPass { user };
                Reply::new(334, None, "UGFzc3dvcmQ6").write_to(out);
                Action::NeedMore
            }
            Err(_) => self.malformed_auth(out),
        }
    }

    fn auth_login_pass(&mut self, user: String, line: &[u8], out: &mut Vec<u8>) -> Action {
        let raw = match self.decode_b64(line, out) {
            Ok(r) => r,
            Err(a) => return a,
        };
        self.auth_attempt_user = Some(user.clone());
        match String::from_utf8(raw) {
            Ok(password) => Action::Authenticate { user, password },
            Err(_) => self.malformed_auth(out),
        }
    }

    /// Called instead of [`Session::auth_result`] when the client's address is locked out after too many
    /// failed AUTH attempts: the credentials were not checked.
    pub fn auth_locked(&mut self, out: &mut Vec<u8>) -> Action {
        self.phase = Phase::Ready;
        self.log_auth_failure("locked out after too many failures");
        self.reply(out, &reply::AUTH_LOCKED_OUT)
    }

    /// Called with the verified user name, or `None` when the credentials were wrong.
    pub fn auth_result(&mut self, user: Option<String>, out: &mut Vec<u8>) -> Action {
        self.phase = Phase::Ready;
        match user {
            Some(u) => {
                self.auth_user = Some(u);
                self.reply(out, &reply::AUTH_OK)
            }
            None => self.auth_refused(out, "authentication failure"),
        }
    }

    /// Builds the Received header for a message about to be queued (RFC 5321 §4.4, Postfix-like layout).
    pub fn received_header(&self, queue_id: &str, now_unix_s: u64) -> Vec<u8> {
        use std::fmt::Write as _;
        let mut h = String::with_capacity(256);
        let _ = write!(
            h,
            "Received: from {} ([{}])\r\n\tby {} (shardmta)",
            printable(self.helo_name(), limits::RECEIVED_HELO_BYTES_MAX),
            self.client_ip,
            self.cfg.hostname
        );
        if let Some(tls) = &self.tls {
            let _ = write!(h, "\r\n\t({tls})");
        }
        if let Some(user) = &self.auth_user {
            let _ = write!(
                h,
                "\r\n\t(Authenticated sender: {})",
                printable(user, limits::RECEIVED_HELO_BYTES_MAX)
            );
        }
        let _ = write!(h, "\r\n\twith {} id {}", self.protocol(), queue_id);
        if self.txn.rcpt_count == 1 {
            let _ = write!(h, "\r\n\tfor <{}>", self.txn.first_rcpt);
        }
        let _ = write!(h, "; {}\r\n", rfc5322_date(now_unix_s));
        h.into_bytes()
    }
}

/// `PLAIN` or `LOGIN`, as Postfix's log lines name SASL mechanisms.
fn mechanism_name(m: AuthMechanism) -> &'static str {
    match m {
        AuthMechanism::Plain => "PLAIN",
        AuthMechanism::Login => "LOGIN",
    }
}

/// What a client said, made safe for a 7-bit header (as Postfix's `printable()`): every byte outside
/// printable ASCII becomes `?`, and at most `max` bytes are kept.
pub fn printable(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max && s.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(
        s.bytes()
            .take(max)
            .map(|b| {
                if (0x21..0x7f).contains(&b) {
                    b as char
                } else {
                    '?'
                }
            })
            .collect(),
    )
}

/// `Sun, 22 Nov 2026 05:54:14 +0000` from a Unix time (UTC).
pub fn rfc5322_date(unix_s: u64) -> String {
    let days = (unix_s / 86400) as i64;
    let secs = unix_s % 86400;
    // Civil-from-days (Howard Hinnant), proleptic Gregorian.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    const WD: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MON: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        WD[days.rem_euclid(7) as usize],
        d,
        MON[(m - 1) as usize],
        y,
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests;
