//! The sink's SMTP server session as a sans-IO state machine: bytes in,
//! reply bytes out, plus an [`Action`] telling the runner what to do next.
//! No sockets, no clock; randomness comes from a seeded xorshift so tests are
//! deterministic.
//!
//! The runner keeps an input buffer, calls [`Session::feed`] with everything
//! unconsumed, drops the consumed prefix and acts on the returned action.
//! Replies to a pipelined batch accumulate in one output buffer that the
//! runner writes when the session needs more input, so a batch is answered
//! with one write.

use std::io::Write as _;

use base64::Engine as _;

/// Longest command line kept (CRLF included); longer ones are discarded as
/// they stream in and answered `500 5.5.2`.
pub const MAX_LINE: usize = 4096;
/// Longest AUTH exchange line.
pub const MAX_AUTH_LINE: usize = 12 * 1024;
/// Recipients per transaction; more get `452 4.5.3`.
pub const MAX_RCPTS: usize = 1000;
/// Bytes of one message kept in memory without `--size-limit`.
pub const DEFAULT_MAX_MESSAGE: u64 = 256 << 20;

/// Behaviour of every session, fixed for the run.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub hostname: String,
    /// Answer the greeting with this code and close (None: 220).
    pub greeting_code: Option<u16>,
    pub pipelining: bool,
    pub eightbitmime: bool,
    pub smtputf8: bool,
    pub chunking: bool,
    /// Advertised and enforced (`552 5.3.4`).
    pub size_limit: Option<u64>,
    /// Offer STARTTLS (the runner does the handshake, or closes with --broken-tls).
    pub starttls: bool,
    /// `(user, password)`: offer AUTH PLAIN LOGIN and require it before MAIL.
    pub auth: Option<(String, String)>,
    /// Fractions of RCPTs answered 451 / 550 at random.
    pub tempfail_rate: f64,
    pub permfail_rate: f64,
    /// `421` at the MAIL after this many accepted messages on one connection.
    pub max_messages_per_connection: Option<u64>,
    /// Keep the message data (for --save-dir); otherwise it is only counted.
    pub keep_data: bool,
    /// `--rcpt-reply`: (local part, code, text) answered to RCPT for that local part.
    pub rcpt_replies: Vec<(Vec<u8>, u16, Vec<u8>)>,
}

impl SinkConfig {
    /// A plain configuration (every extension on, no failures) for tests.
    #[cfg(test)]
    pub fn test() -> Self {
        SinkConfig {
            hostname: "sink.test".into(),
            greeting_code: None,
            pipelining: true,
            eightbitmime: true,
            smtputf8: true,
            chunking: true,
            size_limit: None,
            starttls: false,
            auth: None,
            tempfail_rate: 0.0,
            permfail_rate: 0.0,
            max_messages_per_connection: None,
            keep_data: true,
            rcpt_replies: Vec::new(),
        }
    }

    fn message_limit(&self) -> u64 {
        self.size_limit.unwrap_or(DEFAULT_MAX_MESSAGE)
    }

    /// EHLO reply lines after the first, ending with the last (`250 `) line.
    fn ehlo_tail(&self, tls_active: bool, authed: bool) -> Vec<u8> {
        let mut kw: Vec<String> = Vec::new();
        if self.pipelining {
            kw.push("PIPELINING".into());
        }
        if let Some(n) = self.size_limit {
            kw.push(format!("SIZE {n}"));
        }
        if self.starttls && !tls_active {
            kw.push("STARTTLS".into());
        }
        if self.auth.is_some() && !authed {
            kw.push("AUTH PLAIN LOGIN".into());
        }
        kw.push("ENHANCEDSTATUSCODES".into());
        if self.eightbitmime {
            kw.push("8BITMIME".into());
        }
        if self.smtputf8 {
            kw.push("SMTPUTF8".into());
        }
        if self.chunking {
            kw.push("CHUNKING".into());
        }
        let mut out = Vec::new();
        for (i, k) in kw.iter().enumerate() {
            out.extend_from_slice(if i + 1 == kw.len() { b"250 " } else { b"250-" });
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out
    }
}

/// What the runner does after [`Session::feed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Every complete command was consumed: write the output, read more.
    NeedMore,
    /// A message was accepted by the decoder; its final reply is not written
    /// yet. Save it (see [`Session::message`]) and call
    /// [`Session::complete_message`], then feed the rest.
    Message,
    /// `220` to STARTTLS is in the output: write it, discard any unread input,
    /// do the handshake (or close, for --broken-tls) and call
    /// [`Session::tls_started`].
    StartTls,
    /// Write the output and close the connection.
    Close,
}

/// Counters a session adds to; the runner owns one per shard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    pub transactions: u64,
    pub messages: u64,
    pub recipients_accepted: u64,
    pub recipients_tempfailed: u64,
    pub recipients_permfailed: u64,
    pub data_tempfailed: u64,
    pub data_permfailed: u64,
    pub bytes: u64,
    pub auth_ok: u64,
    pub auth_failed: u64,
    /// Number the next accepted message gets (`queued as <shard>-<n>`).
    pub next_msg: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataState {
    LineStart,
    Mid,
    Cr,
    Dot,
    DotCr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthStep {
    Plain,
    LoginUser,
    LoginPass,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the greeting was produced.
    Start,
    Command,
    Data(DataState),
    /// Inside a BDAT chunk: bytes left, LAST, discard (no valid transaction).
    Bdat {
        left: u64,
        last: bool,
        discard: bool,
    },
    Auth(AuthStep),
    /// Message decoded; waiting for `complete_message`.
    Finishing,
    Closed,
}

/// One accepted message's envelope and data (data only with `keep_data`).
pub struct MessageView<'a> {
    pub mail_from: &'a [u8],
    pub rcpts: Vec<&'a [u8]>,
    pub data: &'a [u8],
    pub size: u64,
    pub auth_user: Option<&'a str>,
    pub id: u64,
}

pub struct Session<'c> {
    cfg: &'c SinkConfig,
    shard: usize,
    state: State,
    tls_active: bool,
    greeted: bool,
    authed: Option<String>,
    login_user: Vec<u8>,
    /// Discarding an over-long line until its end.
    skipping: bool,
    // Transaction.
    in_mail: bool,
    mail_from: Vec<u8>,
    /// Accepted recipients, concatenated; `rcpt_ends[i]` ends the i-th.
    rcpt_buf: Vec<u8>,
    rcpt_ends: Vec<usize>,
    rcpts_seen: usize,
    trigger_datafail: bool,
    trigger_tempdata: bool,
    /// A recipient `dropdata...`: the connection is dropped after the data, with no reply (a receiver that
    /// chokes on one message).
    trigger_dropdata: bool,
    data: Vec<u8>,
    data_size: u64,
    msg_id: u64,
    messages_here: u64,
    rng: u64,
    /// Reply delays owed (one per RCPT reply and per final DATA reply).
    delays: u32,
}

fn starts_with_ci(s: &[u8], p: &[u8]) -> bool {
    s.len() >= p.len() && s[..p.len()].eq_ignore_ascii_case(p)
}

fn trim_ascii(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|b| *b != b' ').unwrap_or(s.len());
    let end = s.iter().rposition(|b| *b != b' ').map_or(start, |e| e + 1);
    &s[start..end.max(start)]
}

/// Splits `<path> params` after `FROM:` / `TO:`. Returns (address without
/// brackets, parameters).
fn parse_path(arg: &[u8]) -> Option<(&[u8], &[u8])> {
    let arg = trim_ascii(arg);
    if let Some(rest) = arg.strip_prefix(b"<") {
        let close = memchr::memchr(b'>', rest)?;
        Some((&rest[..close], trim_ascii(&rest[close + 1..])))
    } else {
        // Lenient: a bare address up to the first space.
        let end = memchr::memchr(b' ', arg).unwrap_or(arg.len());
        if end == 0 {
            return None;
        }
        Some((&arg[..end], trim_ascii(&arg[end..])))
    }
}

fn local_part(addr: &[u8]) -> &[u8] {
    match memchr::memrchr(b'@', addr) {
        Some(at) => &addr[..at],
        None => addr,
    }
}

impl<'c> Session<'c> {
    /// A new session; `tls_active` for implicit TLS; `seed` for the
    /// random tempfail/permfail decisions.
    pub fn new(cfg: &'c SinkConfig, shard: usize, tls_active: bool, seed: u64) -> Self {
        Session {
            cfg,
            shard,
            state: State::Start,
            tls_active,
            greeted: false,
            authed: None,
            login_user: Vec::new(),
            skipping: false,
            in_mail: false,
            mail_from: Vec::with_capacity(64),
            rcpt_buf: Vec::with_capacity(256),
            rcpt_ends: Vec::with_capacity(8),
            rcpts_seen: 0,
            trigger_datafail: false,
            trigger_tempdata: false,
            trigger_dropdata: false,
            data: Vec::new(),
            data_size: 0,
            msg_id: 0,
            messages_here: 0,
            rng: seed | 1,
            delays: 0,
        }
    }

    /// Writes the greeting. `Action::Close` when `--greeting-code` refuses.
    pub fn greeting(&mut self, out: &mut Vec<u8>) -> Action {
        match self.cfg.greeting_code {
            Some(code) if code != 220 => {
                let text = if code / 100 == 4 {
                    "4.3.2 Service temporarily unavailable"
                } else {
                    "5.3.2 Service not available"
                };
                push_line(out, code, &[text.as_bytes()]);
                self.state = State::Closed;
                Action::Close
            }
            _ => {
                push_line(
                    out,
                    220,
                    &[self.cfg.hostname.as_bytes(), b" ESMTP shardmta-sink"],
                );
                self.state = State::Command;
                Action::NeedMore
            }
        }
    }

    /// Takes the number of reply delays owed since the last call.
    pub fn take_delays(&mut self) -> u32 {
        std::mem::take(&mut self.delays)
    }

    /// After a successful STARTTLS handshake: the session starts over
    /// (RFC 3207: forget EHLO, AUTH and the transaction).
    pub fn tls_started(&mut self) {
        self.tls_active = true;
        self.greeted = false;
        self.authed = None;
        self.reset_txn();
        self.state = State::Command;
    }

    /// The message just decoded (valid after `Action::Message`).
    pub fn message(&self) -> MessageView<'_> {
        let mut rcpts = Vec::with_capacity(self.rcpt_ends.len());
        let mut start = 0;
        for &end in &self.rcpt_ends {
            rcpts.push(&self.rcpt_buf[start..end]);
            start = end;
        }
        MessageView {
            mail_from: &self.mail_from,
            rcpts,
            data: &self.data,
            size: self.data_size,
            auth_user: self.authed.as_deref(),
            id: self.msg_id,
        }
    }

    /// Writes the final reply for the message returned with
    /// `Action::Message`: `250` if `saved`, else `451 4.3.0`.
    pub fn complete_message(&mut self, saved: bool, out: &mut Vec<u8>, t: &mut Tally) {
        if self.state != State::Finishing {
            return;
        }
        if saved {
            t.messages += 1;
            t.bytes += self.data_size;
            self.messages_here += 1;
            // Writing to a Vec cannot fail.
            let _ = write!(
                out,
                "250 2.0.0 Ok: queued as {}-{}\r\n",
                self.shard, self.msg_id
            );
        } else {
            t.data_tempfailed += 1;
            push_line(out, 451, &[b"4.3.0 Error: cannot save message"]);
        }
        self.reset_txn();
        self.state = State::Command;
    }

    fn reset_txn(&mut self) {
        self.in_mail = false;
        self.mail_from.clear();
        self.rcpt_buf.clear();
        self.rcpt_ends.clear();
        self.rcpts_seen = 0;
        self.trigger_datafail = false;
        self.trigger_tempdata = false;
        self.trigger_dropdata = false;
        self.data_size = 0;
        if self.data.capacity() > (1 << 20) {
            self.data = Vec::new();
        } else {
            self.data.clear();
        }
    }

    fn random(&mut self) -> f64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Consumes as much of `input` as it can, appending replies to `out`.
    /// Returns bytes consumed and what to do next. After `Message`,
    /// `StartTls` or `Close`, unconsumed bytes may remain.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>, t: &mut Tally) -> (usize, Action) {
        let mut pos = 0;
        loop {
            match self.state {
                State::Start => {
                    let a = self.greeting(out);
                    if a != Action::NeedMore {
                        return (pos, a);
                    }
                }
                State::Closed => return (pos, Action::Close),
                State::Finishing => return (pos, Action::Message),
                State::Data(ds) => {
                    let (n, done) = self.data_bytes(ds, &input[pos..]);
                    pos += n;
                    if !done {
                        return (pos, Action::NeedMore);
                    }
                    if let Some(a) = self.end_of_message(out, t) {
                        return (pos, a);
                    }
                }
                State::Bdat {
                    left,
                    last,
                    discard,
                } => {
                    let take = (input.len() - pos).min(usize::try_from(left).unwrap_or(usize::MAX));
                    if !discard {
                        self.append_data(&input[pos..pos + take]);
                    }
                    pos += take;
                    let left = left - take as u64;
                    if left > 0 {
                        self.state = State::Bdat {
                            left,
                            last,
                            discard,
                        };
                        return (pos, Action::NeedMore);
                    }
                    self.state = State::Command;
                    if discard {
                        // The error reply was given with the BDAT command.
                    } else if last {
                        if let Some(a) = self.end_of_message(out, t) {
                            return (pos, a);
                        }
                    } else {
                        let _ = write!(out, "250 2.0.0 {} octets received\r\n", self.data_size);
                    }
                }
                State::Command | State::Auth(_) => {
                    let rest = &input[pos..];
                    let limit = if matches!(self.state, State::Auth(_)) {
                        MAX_AUTH_LINE
                    } else {
                        MAX_LINE
                    };
                    let window = &rest[..rest.len().min(limit)];
                    let Some(nl) = memchr::memchr(b'\n', window) else {
                        if rest.len() >= limit {
                            // Over-long line: drop what we have, keep dropping.
                            self.skipping = true;
                            return (input.len(), Action::NeedMore);
                        }
                        return (pos, Action::NeedMore);
                    };
                    let line = &rest[..nl];
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    pos += nl + 1;
                    if std::mem::take(&mut self.skipping) {
                        if matches!(self.state, State::Auth(_)) {
                            self.state = State::Command;
                            t.auth_failed += 1;
                        }
                        push_line(out, 500, &[b"5.5.2 Error: line too long"]);
                        continue;
                    }
                    let a = match self.state {
                        State::Auth(step) => self.auth_line(step, line, out, t),
                        _ => self.command(line, out, t),
                    };
                    if a != Action::NeedMore {
                        return (pos, a);
                    }
                }
            }
        }
    }

    fn append_data(&mut self, bytes: &[u8]) {
        let limit = self.cfg.message_limit();
        let before = self.data_size;
        self.data_size += bytes.len() as u64;
        if self.cfg.keep_data && before < limit {
            let room = usize::try_from(limit - before).unwrap_or(usize::MAX);
            self.data.extend_from_slice(&bytes[..bytes.len().min(room)]);
        }
    }

    /// Decodes DATA bytes (dot-unstuffing, `CRLF.CRLF` end). Returns bytes
    /// consumed and whether the end was reached.
    fn data_bytes(&mut self, mut ds: DataState, input: &[u8]) -> (usize, bool) {
        let mut i = 0;
        while i < input.len() {
            match ds {
                DataState::Mid => {
                    let rest = &input[i..];
                    match memchr::memchr(b'\r', rest) {
                        Some(cr) => {
                            self.append_data(&rest[..=cr]);
                            i += cr + 1;
                            ds = DataState::Cr;
                        }
                        None => {
                            self.append_data(rest);
                            i = input.len();
                        }
                    }
                }
                DataState::Cr => match input[i] {
                    b'\n' => {
                        self.append_data(b"\n");
                        i += 1;
                        ds = DataState::LineStart;
                    }
                    b'\r' => {
                        self.append_data(b"\r");
                        i += 1;
                    }
                    _ => ds = DataState::Mid,
                },
                DataState::LineStart => {
                    if input[i] == b'.' {
                        i += 1;
                        ds = DataState::Dot;
                    } else {
                        ds = DataState::Mid;
                    }
                }
                DataState::Dot => {
                    if input[i] == b'\r' {
                        i += 1;
                        ds = DataState::DotCr;
                    } else {
                        // Unstuffing: the leading dot goes, the rest stays.
                        ds = DataState::Mid;
                    }
                }
                DataState::DotCr => {
                    if input[i] == b'\n' {
                        self.state = State::Command;
                        return (i + 1, true);
                    }
                    // ".\r" then something else: drop the dot, keep the CR.
                    self.append_data(b"\r");
                    ds = DataState::Cr;
                }
            }
        }
        self.state = State::Data(ds);
        (i, false)
    }

    /// The message's data is complete: decide the final reply.
    fn end_of_message(&mut self, out: &mut Vec<u8>, t: &mut Tally) -> Option<Action> {
        self.delays += 1;
        if self.data_size > self.cfg.message_limit() {
            t.data_permfailed += 1;
            push_line(out, 552, &[b"5.3.4 Error: message file too big"]);
        } else if self.trigger_datafail {
            t.data_permfailed += 1;
            push_line(out, 554, &[b"5.6.0 Error: message content rejected"]);
        } else if self.trigger_dropdata {
            self.reset_txn();
            self.state = State::Closed;
            return Some(Action::Close);
        } else if self.trigger_tempdata {
            t.data_tempfailed += 1;
            push_line(out, 451, &[b"4.3.0 Error: try again later"]);
        } else {
            self.msg_id = t.next_msg;
            t.next_msg += 1;
            self.state = State::Finishing;
            return Some(Action::Message);
        }
        self.reset_txn();
        self.state = State::Command;
        None
    }

    fn command(&mut self, line: &[u8], out: &mut Vec<u8>, t: &mut Tally) -> Action {
        let (verb, arg) = match memchr::memchr(b' ', line) {
            Some(sp) => (&line[..sp], &line[sp + 1..]),
            None => (line, &b""[..]),
        };
        let is = |v: &[u8]| verb.eq_ignore_ascii_case(v);
        if is(b"EHLO") || is(b"HELO") {
            if trim_ascii(arg).is_empty() {
                push_line(out, 501, &[b"5.5.4 Syntax: EHLO hostname"]);
                return Action::NeedMore;
            }
            self.reset_txn();
            self.greeted = true;
            if is(b"HELO") {
                push_line(out, 250, &[self.cfg.hostname.as_bytes()]);
            } else {
                out.extend_from_slice(b"250-");
                out.extend_from_slice(self.cfg.hostname.as_bytes());
                out.extend_from_slice(b"\r\n");
                let tail = self.cfg.ehlo_tail(self.tls_active, self.authed.is_some());
                out.extend_from_slice(&tail);
            }
        } else if is(b"MAIL") {
            self.mail(arg, out, t);
        } else if is(b"RCPT") {
            self.rcpt(arg, out, t);
        } else if is(b"DATA") {
            if !self.in_mail {
                push_line(out, 503, &[b"5.5.1 Error: need MAIL command"]);
            } else if self.rcpt_ends.is_empty() {
                push_line(out, 554, &[b"5.5.1 Error: no valid recipients"]);
            } else {
                push_line(out, 354, &[b"End data with <CR><LF>.<CR><LF>"]);
                self.state = State::Data(DataState::LineStart);
            }
        } else if is(b"BDAT") && self.cfg.chunking {
            return self.bdat(arg, out);
        } else if is(b"RSET") {
            self.reset_txn();
            push_line(out, 250, &[b"2.0.0 Ok"]);
        } else if is(b"NOOP") {
            push_line(out, 250, &[b"2.0.0 Ok"]);
        } else if is(b"QUIT") {
            push_line(
                out,
                221,
                &[
                    b"2.0.0 ",
                    self.cfg.hostname.as_bytes(),
                    b" closing connection",
                ],
            );
            self.state = State::Closed;
            return Action::Close;
        } else if is(b"VRFY") {
            push_line(out, 252, &[b"2.0.0 Cannot VRFY user"]);
        } else if is(b"STARTTLS") {
            if !self.cfg.starttls {
                push_line(out, 502, &[b"5.5.1 Error: command not implemented"]);
            } else if self.tls_active {
                push_line(out, 503, &[b"5.5.1 Error: TLS already active"]);
            } else if !arg.is_empty() {
                push_line(out, 501, &[b"5.5.4 Syntax: STARTTLS"]);
            } else {
                push_line(out, 220, &[b"2.0.0 Ready to start TLS"]);
                return Action::StartTls;
            }
        } else if is(b"AUTH") {
            self.auth(arg, out, t);
        } else {
            push_line(out, 500, &[b"5.5.2 Error: command not recognized"]);
        }
        Action::NeedMore
    }

    fn mail(&mut self, arg: &[u8], out: &mut Vec<u8>, t: &mut Tally) {
        if !self.greeted {
            push_line(out, 503, &[b"5.5.1 Error: send HELO/EHLO first"]);
            return;
        }
        if self.cfg.auth.is_some() && self.authed.is_none() {
            push_line(out, 530, &[b"5.7.0 Authentication required"]);
            return;
        }
        if self.in_mail {
            push_line(out, 503, &[b"5.5.1 Error: nested MAIL command"]);
            return;
        }
        if let Some(max) = self.cfg.max_messages_per_connection {
            if self.messages_here >= max {
                push_line(
                    out,
                    421,
                    &[b"4.7.0 Error: too many messages on this connection"],
                );
                self.state = State::Closed;
                return;
            }
        }
        if !arg
            .get(..5)
            .is_some_and(|p| p.eq_ignore_ascii_case(b"FROM:"))
        {
            push_line(out, 501, &[b"5.5.4 Syntax: MAIL FROM:<address>"]);
            return;
        }
        let Some((addr, params)) = parse_path(&arg[5..]) else {
            push_line(out, 501, &[b"5.1.7 Bad sender address syntax"]);
            return;
        };
        let mut utf8 = false;
        for p in params.split(|&b| b == b' ').filter(|p| !p.is_empty()) {
            let (k, v) = match memchr::memchr(b'=', p) {
                Some(eq) => (&p[..eq], &p[eq + 1..]),
                None => (p, &b""[..]),
            };
            if k.eq_ignore_ascii_case(b"SIZE") {
                let n = std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok());
                match (n, self.cfg.size_limit) {
                    (None, _) => {
                        push_line(out, 501, &[b"5.5.4 Bad SIZE parameter"]);
                        return;
                    }
                    (Some(n), Some(lim)) if n > lim => {
                        push_line(out, 552, &[b"5.3.4 Message size exceeds fixed limit"]);
                        return;
                    }
                    _ => {}
                }
            } else if k.eq_ignore_ascii_case(b"BODY") {
                let ok = v.eq_ignore_ascii_case(b"7BIT")
                    || (v.eq_ignore_ascii_case(b"8BITMIME") && self.cfg.eightbitmime);
                if !ok {
                    push_line(out, 555, &[b"5.5.4 Unsupported BODY parameter"]);
                    return;
                }
            } else if k.eq_ignore_ascii_case(b"SMTPUTF8") && self.cfg.smtputf8 {
                utf8 = true;
            } else if k.eq_ignore_ascii_case(b"AUTH")
                || k.eq_ignore_ascii_case(b"RET")
                || k.eq_ignore_ascii_case(b"ENVID")
            {
                // Accepted and ignored.
            } else {
                push_line(out, 555, &[b"5.5.4 Unsupported MAIL parameter"]);
                return;
            }
        }
        if !utf8 && !addr.is_ascii() {
            push_line(out, 553, &[b"5.6.7 Non-ASCII address requires SMTPUTF8"]);
            return;
        }
        self.reset_txn();
        self.in_mail = true;
        self.mail_from.extend_from_slice(addr);
        t.transactions += 1;
        push_line(out, 250, &[b"2.1.0 Ok"]);
    }

    fn rcpt(&mut self, arg: &[u8], out: &mut Vec<u8>, t: &mut Tally) {
        if !self.in_mail {
            push_line(out, 503, &[b"5.5.1 Error: need MAIL command"]);
            return;
        }
        let Some((addr, _params)) = arg
            .get(..3)
            .filter(|p| p.eq_ignore_ascii_case(b"TO:"))
            .and_then(|_| parse_path(&arg[3..]))
            .filter(|(a, _)| !a.is_empty())
        else {
            push_line(out, 501, &[b"5.5.4 Syntax: RCPT TO:<address>"]);
            return;
        };
        if self.rcpts_seen >= MAX_RCPTS {
            push_line(out, 452, &[b"4.5.3 Error: too many recipients"]);
            return;
        }
        self.rcpts_seen += 1;
        self.delays += 1;
        let local = local_part(addr);
        if let Some((_, code, text)) = self
            .cfg
            .rcpt_replies
            .iter()
            .find(|(l, _, _)| l.eq_ignore_ascii_case(local))
        {
            if *code < 500 {
                t.recipients_tempfailed += 1;
            } else {
                t.recipients_permfailed += 1;
            }
            push_line(out, *code, &[text]);
            return;
        }
        let (temp, perm) = if starts_with_ci(local, b"tempfail") {
            (true, false)
        } else if starts_with_ci(local, b"permfail") {
            (false, true)
        } else if self.cfg.tempfail_rate > 0.0 || self.cfg.permfail_rate > 0.0 {
            let r = self.random();
            (
                r < self.cfg.tempfail_rate,
                r >= self.cfg.tempfail_rate && r < self.cfg.tempfail_rate + self.cfg.permfail_rate,
            )
        } else {
            (false, false)
        };
        if temp {
            t.recipients_tempfailed += 1;
            push_line(out, 451, &[b"4.3.0 Try again later"]);
        } else if perm {
            t.recipients_permfailed += 1;
            push_line(out, 550, &[b"5.1.1 No such user"]);
        } else {
            t.recipients_accepted += 1;
            if starts_with_ci(local, b"datafail") {
                self.trigger_datafail = true;
            }
            if starts_with_ci(local, b"tempdata") {
                self.trigger_tempdata = true;
            }
            if starts_with_ci(local, b"dropdata") {
                self.trigger_dropdata = true;
            }
            self.rcpt_buf.extend_from_slice(addr);
            self.rcpt_ends.push(self.rcpt_buf.len());
            push_line(out, 250, &[b"2.1.5 Ok"]);
        }
    }

    fn bdat(&mut self, arg: &[u8], out: &mut Vec<u8>) -> Action {
        let mut words = arg.split(|&b| b == b' ').filter(|w| !w.is_empty());
        let size = words
            .next()
            .and_then(|w| std::str::from_utf8(w).ok())
            .and_then(|s| s.parse::<u64>().ok());
        let last = match words.next() {
            None => false,
            Some(w) if w.eq_ignore_ascii_case(b"LAST") => true,
            Some(_) => {
                push_line(out, 501, &[b"5.5.4 Syntax: BDAT size [LAST]"]);
                return Action::NeedMore;
            }
        };
        let Some(size) = size else {
            // Cannot know how many bytes follow: the stream is lost.
            push_line(out, 501, &[b"5.5.4 Syntax: BDAT size [LAST]"]);
            self.state = State::Closed;
            return Action::Close;
        };
        let discard = if !self.in_mail {
            push_line(out, 503, &[b"5.5.1 Error: need MAIL command"]);
            true
        } else if self.rcpt_ends.is_empty() {
            push_line(out, 554, &[b"5.5.1 Error: no valid recipients"]);
            true
        } else {
            false
        };
        if discard {
            self.reset_txn();
        }
        self.state = State::Bdat {
            left: size,
            last,
            discard,
        };
        Action::NeedMore
    }

    fn auth(&mut self, arg: &[u8], out: &mut Vec<u8>, t: &mut Tally) {
        if self.cfg.auth.is_none() {
            push_line(out, 502, &[b"5.5.1 Error: authentication not enabled"]);
            return;
        }
        if self.authed.is_some() {
            push_line(out, 503, &[b"5.5.1 Error: already authenticated"]);
            return;
        }
        if self.in_mail {
            push_line(out, 503, &[b"5.5.1 Error: MAIL transaction in progress"]);
            return;
        }
        let (mech, initial) = match memchr::memchr(b' ', arg) {
            Some(sp) => (&arg[..sp], Some(trim_ascii(&arg[sp + 1..]))),
            None => (arg, None),
        };
        if mech.eq_ignore_ascii_case(b"PLAIN") {
            match initial {
                Some(resp) => self.auth_line(AuthStep::Plain, resp, out, t),
                None => {
                    out.extend_from_slice(b"334 \r\n");
                    self.state = State::Auth(AuthStep::Plain);
                    Action::NeedMore
                }
            };
        } else if mech.eq_ignore_ascii_case(b"LOGIN") {
            match initial {
                Some(resp) => self.auth_line(AuthStep::LoginUser, resp, out, t),
                None => {
                    out.extend_from_slice(b"334 VXNlcm5hbWU6\r\n");
                    self.state = State::Auth(AuthStep::LoginUser);
                    Action::NeedMore
                }
            };
        } else {
            push_line(out, 504, &[b"5.5.4 Unsupported authentication mechanism"]);
        }
    }

    fn auth_line(
        &mut self,
        step: AuthStep,
        line: &[u8],
        out: &mut Vec<u8>,
        t: &mut Tally,
    ) -> Action {
        self.state = State::Command;
        if line == b"*" {
            t.auth_failed += 1;
            push_line(out, 501, &[b"5.7.0 Authentication aborted"]);
            return Action::NeedMore;
        }
        let decoded = if line == b"=" {
            Some(Vec::new())
        } else {
            base64::engine::general_purpose::STANDARD.decode(line).ok()
        };
        let Some(decoded) = decoded else {
            t.auth_failed += 1;
            push_line(out, 501, &[b"5.5.2 Cannot decode response"]);
            return Action::NeedMore;
        };
        let (user, pass): (Vec<u8>, Vec<u8>) = match step {
            AuthStep::LoginUser => {
                self.login_user = decoded;
                out.extend_from_slice(b"334 UGFzc3dvcmQ6\r\n");
                self.state = State::Auth(AuthStep::LoginPass);
                return Action::NeedMore;
            }
            AuthStep::LoginPass => (std::mem::take(&mut self.login_user), decoded),
            AuthStep::Plain => {
                let mut parts = decoded.split(|&b| b == 0);
                let (_authz, user, pass) = (parts.next(), parts.next(), parts.next());
                match (user, pass, parts.next()) {
                    (Some(u), Some(p), None) => (u.to_vec(), p.to_vec()),
                    _ => {
                        t.auth_failed += 1;
                        push_line(out, 501, &[b"5.5.2 Malformed PLAIN response"]);
                        return Action::NeedMore;
                    }
                }
            }
        };
        let ok = self
            .cfg
            .auth
            .as_ref()
            .is_some_and(|(u, p)| u.as_bytes() == user && p.as_bytes() == pass);
        if ok {
            t.auth_ok += 1;
            self.authed = Some(String::from_utf8_lossy(&user).into_owned());
            push_line(out, 235, &[b"2.7.0 Authentication successful"]);
        } else {
            t.auth_failed += 1;
            push_line(out, 535, &[b"5.7.8 Error: authentication failed"]);
        }
        Action::NeedMore
    }
}

/// Appends `CODE text\r\n` (text given in pieces).
fn push_line(out: &mut Vec<u8>, code: u16, parts: &[&[u8]]) {
    let c = [
        b'0' + (code / 100 % 10) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
        b' ',
    ];
    out.extend_from_slice(&c);
    for p in parts {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in one piece, completing messages as saved; returns
    /// the replies and the last action.
    fn run(s: &mut Session<'_>, t: &mut Tally, input: &[u8]) -> (String, Action) {
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            let (n, a) = s.feed(&input[pos..], &mut out, t);
            pos += n;
            if a == Action::Message {
                s.complete_message(true, &mut out, t);
                continue;
            }
            if a == Action::NeedMore {
                assert_eq!(pos, input.len(), "NeedMore leaves only a partial line");
            }
            return (String::from_utf8(out).unwrap(), a);
        }
    }

    fn codes(replies: &str) -> Vec<&str> {
        replies
            .split("\r\n")
            .filter(|l| l.len() >= 4 && &l[3..4] == " ")
            .map(|l| &l[..3])
            .collect()
    }

    fn started(cfg: &SinkConfig) -> (Session<'_>, Tally) {
        let mut s = Session::new(cfg, 0, false, 42);
        let mut out = Vec::new();
        assert_eq!(s.greeting(&mut out), Action::NeedMore);
        assert_eq!(out, b"220 sink.test ESMTP shardmta-sink\r\n");
        (s, Tally::default())
    }

    #[test]
    fn pipelined_batch_is_answered_at_once() {
        let cfg = SinkConfig::test();
        let (mut s, mut t) = started(&cfg);
        let (r, a) = run(&mut s, &mut t, b"EHLO client\r\n");
        assert_eq!(a, Action::NeedMore);
        assert!(r.starts_with("250-sink.test\r\n250-PIPELINING\r\n"));
        assert!(r.contains("250-8BITMIME\r\n") && r.ends_with("250 CHUNKING\r\n"));
        assert!(!r.contains("STARTTLS") && !r.contains("AUTH") && !r.contains("SIZE"));
        let (r, a) = run(
            &mut s,
            &mut t,
            b"MAIL FROM:<a@x> BODY=8BITMIME SIZE=100\r\nRCPT TO:<b@y>\r\nRCPT TO:<permfail1@y>\r\nRCPT TO:<c@y>\r\nDATA\r\n",
        );
        assert_eq!(a, Action::NeedMore);
        assert_eq!(codes(&r), ["250", "250", "550", "250", "354"]);
        assert_eq!(s.take_delays(), 3);
        let (r, _) = run(&mut s, &mut t, b"hello\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n");
        assert_eq!(
            r,
            "250 2.0.0 Ok: queued as 0-0\r\n250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n221 2.0.0 sink.test closing connection\r\n"
        );
        assert_eq!(t.transactions, 1);
        assert_eq!(t.messages, 1);
        assert_eq!(t.recipients_accepted, 2);
        assert_eq!(t.recipients_permfailed, 1);
        assert_eq!(t.bytes, 7);
        assert_eq!(t.next_msg, 1);
    }

    #[test]
    fn whole_session_in_one_buffer_and_byte_by_byte() {
        let input: &[u8] = b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<u@d>\r\nDATA\r\nA: b\r\n\r\n..x\r\n.\r\nMAIL FROM:<s@d>\r\nRCPT TO:<v@d>\r\nDATA\r\n.\r\nQUIT\r\n";
        let cfg = SinkConfig::test();
        let (mut s, mut t) = started(&cfg);
        let (all, a) = run(&mut s, &mut t, input);
        assert_eq!(a, Action::Close);
        assert_eq!(
            codes(&all),
            ["250", "250", "250", "354", "250", "250", "250", "354", "250", "221"]
        );
        // Same bytes one at a time, the runner's way (keep the unconsumed tail).
        let (mut s, mut t2) = started(&cfg);
        let mut out = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        let mut datas = Vec::new();
        for &b in input {
            buf.push(b);
            loop {
                let (n, a) = s.feed(&buf, &mut out, &mut t2);
                buf.drain(..n);
                if a == Action::Message {
                    datas.push(s.message().data.to_vec());
                    s.complete_message(true, &mut out, &mut t2);
                    continue;
                }
                break;
            }
        }
        assert_eq!(String::from_utf8(out).unwrap(), all);
        assert_eq!(datas, vec![b"A: b\r\n\r\n.x\r\n".to_vec(), Vec::new()]);
        assert_eq!(t2.messages, 2);
    }

    #[test]
    fn dot_unstuffing_and_end_detection() {
        let cfg = SinkConfig::test();
        let cases: &[(&[u8], &[u8])] = &[
            (b".\r\n", b""),
            (b"a\r\n.\r\n", b"a\r\n"),
            (b"..\r\n.\r\n", b".\r\n"),
            (b"...x\r\n.\r\n", b"..x\r\n"),
            (b".a\r\n.\r\n", b"a\r\n"),
            // Not the end: dot not after CRLF, bare LF, dot followed by text.
            (b"a.\r\nb\n.\nc\r\n.x\r\n.\r\n", b"a.\r\nb\n.\nc\r\nx\r\n"),
            (b"a\r\r\n.\r\n", b"a\r\r\n"),
            (b".\rx\r\n.\r\n", b"\rx\r\n"),
            (b"x\r\n.\r\r\n.\r\n", b"x\r\n\r\r\n"),
        ];
        for (body, want) in cases {
            for split in 0..=body.len() {
                let (mut s, mut t) = started(&cfg);
                let mut out = Vec::new();
                let (n, a) = s.feed(
                    b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n",
                    &mut out,
                    &mut t,
                );
                assert_eq!((n, a), (46, Action::NeedMore));
                let (n1, a1) = s.feed(&body[..split], &mut out, &mut t);
                let mut rest = body[n1..].to_vec();
                if a1 != Action::Message {
                    assert_eq!(n1, split);
                    let (n2, a2) = s.feed(&body[split..], &mut out, &mut t);
                    assert_eq!(a2, Action::Message, "{body:?} split {split}");
                    rest = body[split + n2..].to_vec();
                }
                assert!(rest.is_empty());
                assert_eq!(
                    s.message().data,
                    *want,
                    "{:?} split {split}",
                    String::from_utf8_lossy(body)
                );
                assert_eq!(s.message().size, want.len() as u64);
            }
        }
    }

    #[test]
    fn data_not_kept_is_still_counted() {
        let mut cfg = SinkConfig::test();
        cfg.keep_data = false;
        let (mut s, mut t) = started(&cfg);
        let mut out = Vec::new();
        s.feed(
            b"HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n..ab\r\n",
            &mut out,
            &mut t,
        );
        let (_, a) = s.feed(b".\r\n", &mut out, &mut t);
        assert_eq!(a, Action::Message);
        assert!(s.message().data.is_empty());
        assert_eq!(s.message().size, 5);
    }

    #[test]
    fn recipient_and_data_triggers() {
        let cfg = SinkConfig::test();
        let (mut s, mut t) = started(&cfg);
        let (r, _) = run(
            &mut s,
            &mut t,
            b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<tempfail@d>\r\nRCPT TO:<PermFail.x@d>\r\nRCPT TO:<ok@d>\r\nDATA\r\n",
        );
        assert!(r.contains(
            "451 4.3.0 Try again later\r\n550 5.1.1 No such user\r\n250 2.1.5 Ok\r\n354 "
        ));
        let (r, _) = run(&mut s, &mut t, b"x\r\n.\r\n");
        assert!(r.starts_with("250 2.0.0 Ok: queued as 0-0"));
        let (r, _) = run(
            &mut s,
            &mut t,
            b"MAIL FROM:<a@b>\r\nRCPT TO:<datafail@d>\r\nRCPT TO:<ok@d>\r\nDATA\r\nx\r\n.\r\n",
        );
        assert!(
            r.ends_with("554 5.6.0 Error: message content rejected\r\n"),
            "{r}"
        );
        let (r, _) = run(
            &mut s,
            &mut t,
            b"MAIL FROM:<a@b>\r\nRCPT TO:<tempdata@d>\r\nDATA\r\nx\r\n.\r\n",
        );
        assert!(r.ends_with("451 4.3.0 Error: try again later\r\n"), "{r}");
        // Only rejected recipients: DATA is refused.
        let (r, _) = run(
            &mut s,
            &mut t,
            b"MAIL FROM:<a@b>\r\nRCPT TO:<permfail@d>\r\nDATA\r\nRSET\r\n",
        );
        assert_eq!(codes(&r), ["250", "550", "554", "250"]);
        assert_eq!(t.messages, 1);
        assert_eq!(t.data_permfailed, 1);
        assert_eq!(t.data_tempfailed, 1);
        assert_eq!(t.recipients_tempfailed, 1);
        assert_eq!(t.recipients_permfailed, 2);
        assert_eq!(t.transactions, 4);
    }

    #[test]
    fn random_failure_rates() {
        let mut cfg = SinkConfig::test();
        cfg.tempfail_rate = 1.0;
        let (mut s, mut t) = started(&cfg);
        let (r, _) = run(
            &mut s,
            &mut t,
            b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@d>\r\n",
        );
        assert!(r.ends_with("451 4.3.0 Try again later\r\n"));
        cfg.tempfail_rate = 0.25;
        cfg.permfail_rate = 0.25;
        let (mut s, mut t) = started(&cfg);
        let mut input = b"EHLO c\r\nMAIL FROM:<a@b>\r\n".to_vec();
        for _ in 0..1000 {
            input.extend_from_slice(b"RCPT TO:<x@d>\r\n");
        }
        run(&mut s, &mut t, &input);
        assert_eq!(
            t.recipients_accepted + t.recipients_tempfailed + t.recipients_permfailed,
            1000
        );
        for n in [t.recipients_tempfailed, t.recipients_permfailed] {
            assert!((180..=320).contains(&n), "{t:?}");
        }
    }

    #[test]
    fn size_limit_advertised_and_enforced() {
        let mut cfg = SinkConfig::test();
        cfg.size_limit = Some(10);
        let (mut s, mut t) = started(&cfg);
        let (r, _) = run(&mut s, &mut t, b"EHLO c\r\n");
        assert!(r.contains("250-SIZE 10\r\n"));
        let (r, _) = run(&mut s, &mut t, b"MAIL FROM:<a@b> SIZE=11\r\n");
        assert_eq!(r, "552 5.3.4 Message size exceeds fixed limit\r\n");
        let (r, _) = run(
            &mut s,
            &mut t,
            b"MAIL FROM:<a@b> SIZE=10\r\nRCPT TO:<c@d>\r\nDATA\r\n0123456789\r\n.\r\n",
        );
        assert!(
            r.ends_with("552 5.3.4 Error: message file too big\r\n"),
            "{r}"
        );
        let (r, _) = run(
            &mut s,
            &mut t,
            b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n01234567\r\n.\r\n",
        );
        assert!(r.ends_with("queued as 0-0\r\n"), "{r}");
        assert_eq!(s.message().size, 0, "transaction reset");
        // BDAT counts too.
        let (r, _) = run(
            &mut s,
            &mut t,
            b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 6\r\n012345BDAT 6 LAST\r\n012345",
        );
        assert!(
            r.ends_with("250 2.0.0 6 octets received\r\n552 5.3.4 Error: message file too big\r\n"),
            "{r}"
        );
        assert_eq!(t.messages, 1);
        assert_eq!(t.data_permfailed, 2);
    }

    #[test]
    fn bdat_chunks() {
        let cfg = SinkConfig::test();
        let (mut s, mut t) = started(&cfg);
        let mut out = Vec::new();
        let (n, a) = s.feed(
            b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 6\r\nab",
            &mut out,
            &mut t,
        );
        assert_eq!(a, Action::NeedMore);
        assert_eq!(n, 50);
        let (_, a) = s.feed(b"c\r\n.BDAT 0 LAST\r\n", &mut out, &mut t);
        assert_eq!(a, Action::Message);
        assert_eq!(s.message().data, b"abc\r\n.");
        s.complete_message(true, &mut out, &mut t);
        let r = String::from_utf8(out).unwrap();
        assert!(r.ends_with("250 2.0.0 6 octets received\r\n250 2.0.0 Ok: queued as 0-0\r\n"));
        // BDAT without a transaction: refused, its bytes skipped.
        let (r, _) = run(&mut s, &mut t, b"BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n");
        assert_eq!(codes(&r), ["503", "250"]);
    }

    #[test]
    fn auth_plain_and_login() {
        let mut cfg = SinkConfig::test();
        cfg.auth = Some(("user".into(), "secret".into()));
        let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        let (mut s, mut t) = started(&cfg);
        let (r, _) = run(&mut s, &mut t, b"EHLO c\r\nMAIL FROM:<a@b>\r\n");
        assert!(r.contains("250-AUTH PLAIN LOGIN\r\n"));
        assert!(r.ends_with("530 5.7.0 Authentication required\r\n"));
        let bad = format!("AUTH PLAIN {}\r\n", b64(b"\0user\0wrong"));
        let (r, _) = run(&mut s, &mut t, bad.as_bytes());
        assert_eq!(r, "535 5.7.8 Error: authentication failed\r\n");
        let (r, _) = run(&mut s, &mut t, b"AUTH PLAIN\r\n");
        assert_eq!(r, "334 \r\n");
        let good = format!("{}\r\nMAIL FROM:<a@b>\r\n", b64(b"\0user\0secret"));
        let (r, _) = run(&mut s, &mut t, good.as_bytes());
        assert_eq!(r, "235 2.7.0 Authentication successful\r\n250 2.1.0 Ok\r\n");
        assert_eq!(s.message().auth_user, Some("user"));
        let (r, _) = run(&mut s, &mut t, b"RSET\r\nAUTH PLAIN\r\n");
        assert!(r.ends_with("503 5.5.1 Error: already authenticated\r\n"));

        let (mut s, mut t) = started(&cfg);
        let login = format!(
            "EHLO c\r\nAUTH LOGIN\r\n{}\r\n{}\r\nMAIL FROM:<a@b>\r\n",
            b64(b"user"),
            b64(b"secret")
        );
        let (r, _) = run(&mut s, &mut t, login.as_bytes());
        assert!(r.ends_with("334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n235 2.7.0 Authentication successful\r\n250 2.1.0 Ok\r\n"), "{r}");
        let (mut s, mut t) = started(&cfg);
        let login = format!(
            "EHLO c\r\nAUTH LOGIN {}\r\n{}\r\nAUTH LOGIN\r\n*\r\n",
            b64(b"user"),
            b64(b"nope")
        );
        let (r, _) = run(&mut s, &mut t, login.as_bytes());
        assert!(r.ends_with("334 UGFzc3dvcmQ6\r\n535 5.7.8 Error: authentication failed\r\n334 VXNlcm5hbWU6\r\n501 5.7.0 Authentication aborted\r\n"), "{r}");
        assert_eq!((t.auth_ok, t.auth_failed), (0, 2));
    }

    #[test]
    fn starttls_offer_and_restart() {
        let mut cfg = SinkConfig::test();
        cfg.starttls = true;
        let (mut s, mut t) = started(&cfg);
        let (r, a) = run(&mut s, &mut t, b"EHLO c\r\nSTARTTLS\r\n");
        assert!(r.contains("250-STARTTLS\r\n"));
        assert!(r.ends_with("220 2.0.0 Ready to start TLS\r\n"));
        assert_eq!(a, Action::StartTls);
        s.tls_started();
        let (r, _) = run(&mut s, &mut t, b"MAIL FROM:<a@b>\r\nEHLO c\r\nSTARTTLS\r\n");
        assert!(r.starts_with("503 5.5.1 Error: send HELO/EHLO first\r\n"));
        assert!(!r.contains("STARTTLS\r\n2"));
        assert!(r.ends_with("503 5.5.1 Error: TLS already active\r\n"));
    }

    #[test]
    fn greeting_code_refuses() {
        let mut cfg = SinkConfig::test();
        cfg.greeting_code = Some(554);
        let mut s = Session::new(&cfg, 0, false, 1);
        let mut out = Vec::new();
        assert_eq!(s.greeting(&mut out), Action::Close);
        assert_eq!(out, b"554 5.3.2 Service not available\r\n");
        cfg.greeting_code = Some(421);
        let mut s = Session::new(&cfg, 0, false, 1);
        out.clear();
        assert_eq!(s.greeting(&mut out), Action::Close);
        assert!(out.starts_with(b"421 4.3.2"));
    }

    #[test]
    fn extensions_can_be_withheld() {
        let mut cfg = SinkConfig::test();
        cfg.pipelining = false;
        cfg.eightbitmime = false;
        cfg.smtputf8 = false;
        cfg.chunking = false;
        let (mut s, mut t) = started(&cfg);
        let (r, _) = run(&mut s, &mut t, b"EHLO c\r\n");
        assert_eq!(r, "250-sink.test\r\n250 ENHANCEDSTATUSCODES\r\n");
        let (r, _) = run(
            &mut s,
            &mut t,
            "MAIL FROM:<a@b> BODY=8BITMIME\r\nMAIL FROM:<a@b> SMTPUTF8\r\nMAIL FROM:<j\u{f6}@b>\r\nBDAT 1 LAST\r\n".as_bytes(),
        );
        assert_eq!(codes(&r), ["555", "555", "553", "500"]);
    }

    #[test]
    fn max_messages_per_connection() {
        let mut cfg = SinkConfig::test();
        cfg.max_messages_per_connection = Some(2);
        let (mut s, mut t) = started(&cfg);
        let one: &[u8] = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n.\r\n";
        let mut input = b"EHLO c\r\n".to_vec();
        for _ in 0..3 {
            input.extend_from_slice(one);
        }
        let (r, a) = run(&mut s, &mut t, &input);
        assert_eq!(a, Action::Close);
        assert!(
            r.ends_with(
                "queued as 0-1\r\n421 4.7.0 Error: too many messages on this connection\r\n"
            ),
            "{r}"
        );
        assert_eq!(t.messages, 2);
    }

    #[test]
    fn long_lines_and_errors() {
        let cfg = SinkConfig::test();
        let (mut s, mut t) = started(&cfg);
        let mut out = Vec::new();
        let long = vec![b'x'; MAX_LINE + 10];
        let (n, a) = s.feed(&long, &mut out, &mut t);
        assert_eq!((n, a), (long.len(), Action::NeedMore));
        let (r, _) = run(
            &mut s,
            &mut t,
            b"yyy\r\nRCPT TO:<a@b>\r\nDATA\r\nFOO\r\nEHLO\r\n",
        );
        assert_eq!(codes(&r), ["500", "503", "503", "500", "501"]);
        // A failed save answers 451.
        let (_, a) = s.feed(
            b"HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n.\r\n",
            &mut out,
            &mut t,
        );
        assert_eq!(a, Action::Message);
        out.clear();
        s.complete_message(false, &mut out, &mut t);
        assert_eq!(out, b"451 4.3.0 Error: cannot save message\r\n");
        assert_eq!((t.messages, t.data_tempfailed), (0, 1));
    }
}
