//! The SMTP client session as a plain state machine (quinn-proto shape): it owns the client side of one SMTP
//! conversation, from the greeting to QUIT, and nothing else. No sockets, no clock reads: the caller feeds the
//! bytes it read ([`ClientSession::handle_input`] or [`ClientSession::input_buffer`]), sends what
//! [`ClientSession::poll_transmit`] gives (then [`ClientSession::advance_transmit`]), sleeps until
//! [`ClientSession::poll_timeout`] and calls [`ClientSession::handle_timeout`], and takes [`Event`]s from
//! [`ClientSession::poll_event`]. The TLS handshake is the caller's: the session says [`Event::NeedTls`] and
//! waits for [`ClientSession::tls_established`].
//!
//! Transactions ([`ClientSession::start_transaction`]) are pipelined when the server offers PIPELINING (MAIL,
//! RCPTs and DATA, or with CHUNKING the whole `BDAT n LAST` transaction, in one write), sent in lockstep
//! otherwise; up to [`Params::max_in_flight`] may be on the wire at once (in DATA mode the next transaction's
//! commands go in the write that ends the content before them, RFC 2920; after a transaction that ended before
//! its content, with its MAIL accepted, an RSET goes first). Each reply becomes an event carrying a
//! [`ReplyRef`] to read it with [`ClientSession::reply`], without allocating.
//!
//! Per-phase timeouts follow Postfix's names and defaults ([`Timeouts`]).
//!
//! Bounds: the receive buffer holds at most one reply ([`MAX_REPLY`] plus slack); the transmit buffer holds the
//! commands and contents of at most `max_in_flight` transactions (plus RSET and QUIT); the transaction queue
//! and the pool of recycled transactions at most `max_in_flight` each; the event queue at most the events of
//! those transactions' replies plus a few session events; the reply arena at most [`ARENA_BYTES_MAX`] (replies
//! of events not yet drained; the caller drains events after each input, else the session fails).
//!
//! Contents are copied once, into the transmit buffer (BDAT) or into their DATA wire form (dot-stuffed), kept
//! until the 354 and then handed over without another copy when nothing else is waiting to be sent. With BDAT
//! the caller may keep the content (or its tail) and write it itself where [`ClientSession::poll_external`]
//! says ([`Transaction::external`]): no copy at all.

use std::collections::VecDeque;
use std::fmt;
use std::io::Write as _;
use std::time::{Duration, Instant};

use super::client::{self, Capabilities, ServerReply};
use super::reply_parser::{ParseError, Reply, ReplyReader, MAX_REPLY};

/// Most bytes of replies referenced by undrained events.
pub const ARENA_BYTES_MAX: usize = 4 * MAX_REPLY;

/// Most capacity a finished transaction's content buffer keeps for the next one.
const SPARE_BODY_KEPT_MAX: usize = 64 * 1024;

/// Postfix's client timeouts (defaults as in Postfix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// smtp_connect_timeout (30s): the TCP connection.
    pub connect: Duration,
    /// smtp_helo_timeout (300s): the greeting and the EHLO/HELO reply (and AUTH).
    pub helo: Duration,
    /// smtp_starttls_timeout (300s): the STARTTLS reply and the handshake.
    pub starttls: Duration,
    /// smtp_mail_timeout (300s).
    pub mail: Duration,
    /// smtp_rcpt_timeout (300s).
    pub rcpt: Duration,
    /// smtp_data_init_timeout (120s): the reply to DATA.
    pub data_init: Duration,
    /// smtp_data_xfer_timeout (180s): progress while sending the content.
    pub data_xfer: Duration,
    /// smtp_data_done_timeout (600s): the reply after the end of the content (or BDAT LAST).
    pub data_done: Duration,
    /// smtp_rset_timeout (20s).
    pub rset: Duration,
    /// smtp_quit_timeout (300s).
    pub quit: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        let s = Duration::from_secs;
        Timeouts {
            connect: s(30),
            helo: s(300),
            starttls: s(300),
            mail: s(300),
            rcpt: s(300),
            data_init: s(120),
            data_xfer: s(180),
            data_done: s(600),
            rset: s(20),
            quit: s(300),
        }
    }
}

/// What the session does about TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Never STARTTLS.
    Off,
    /// STARTTLS when offered; plaintext when not offered or refused.
    Opportunistic,
    /// STARTTLS or fail with [`SessionError::TlsRequired`].
    Required,
    /// TLS from the first byte (the caller handshakes before feeding the greeting).
    Implicit,
}

/// How to run the session.
#[derive(Debug, Clone)]
pub struct Params {
    pub helo: String,
    pub tls: TlsMode,
    /// AUTH credentials (PLAIN if offered or LOGIN is not, else LOGIN).
    pub auth: Option<(String, String)>,
    /// Credentials are sent only over TLS (else [`SessionError::TlsRequired`]). Only a test tool turns it off.
    pub auth_requires_tls: bool,
    /// Pipeline when the server offers PIPELINING.
    pub pipelining: bool,
    /// Use `BDAT n LAST` when the server offers CHUNKING and PIPELINING.
    pub chunking: bool,
    /// Most transactions on the wire at once (1 without pipelining).
    pub max_in_flight: usize,
    pub timeouts: Timeouts,
}

impl Params {
    pub fn new(helo: &str) -> Params {
        Params {
            helo: helo.to_string(),
            tls: TlsMode::Off,
            auth: None,
            auth_requires_tls: true,
            pipelining: true,
            chunking: false,
            max_in_flight: 1,
            timeouts: Timeouts::default(),
        }
    }
}

/// Which command a reply answers (or what the session waits for).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    Connect,
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    TlsHandshake,
    Auth,
    Mail,
    Rcpt,
    /// The reply to DATA (354 expected).
    Data,
    /// Sending the content.
    DataXfer,
    /// The reply after the content's end (DATA).
    DataDone,
    /// The reply to `BDAT n LAST`.
    Bdat,
    Rset,
    Quit,
}

impl Phase {
    /// Setup phases: before the session is ready for mail.
    pub fn is_setup(self) -> bool {
        matches!(
            self,
            Phase::Connect
                | Phase::Greeting
                | Phase::Ehlo
                | Phase::Helo
                | Phase::StartTls
                | Phase::TlsHandshake
                | Phase::Auth
        )
    }

    /// The transaction is past DATA's 354 (or in BDAT): a failure now is the message's.
    pub fn is_content(self) -> bool {
        matches!(self, Phase::DataXfer | Phase::DataDone | Phase::Bdat)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Connect => "connect",
            Phase::Greeting => "greeting",
            Phase::Ehlo => "EHLO",
            Phase::Helo => "HELO",
            Phase::StartTls => "STARTTLS",
            Phase::TlsHandshake => "TLS handshake",
            Phase::Auth => "AUTH",
            Phase::Mail => "MAIL FROM",
            Phase::Rcpt => "RCPT TO",
            Phase::Data => "DATA",
            Phase::DataXfer => "message transfer",
            Phase::DataDone => "end of data",
            Phase::Bdat => "BDAT",
            Phase::Rset => "RSET",
            Phase::Quit => "QUIT",
        })
    }
}

/// Why a session ended abnormally.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("timeout during {phase}")]
    Timeout { phase: Phase },
    #[error("refused during {phase}: {}", reply.one_line())]
    Refused { phase: Phase, reply: ServerReply },
    /// A 421 (the server closes the session).
    #[error("server closing during {phase}: {}", reply.one_line())]
    Closing { phase: Phase, reply: ServerReply },
    #[error("TLS is required but was not offered")]
    TlsRequired,
    #[error("plaintext bytes after the 220 to STARTTLS (injection refused)")]
    StartTlsInjection,
    #[error("bad reply during {phase}: {error}")]
    Protocol { phase: Phase, error: ParseError },
    #[error("connection lost during {phase}")]
    Lost { phase: Phase },
    #[error("reply arena full: events are not drained")]
    EventsNotDrained,
}

/// A reply held by the session until the events are drained (see [`ClientSession::reply`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyRef {
    pub code: u16,
    start: u32,
    end: u32,
}

impl ReplyRef {
    pub fn class(&self) -> u16 {
        self.code / 100
    }
}

pub type TxnId = u64;

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The server's 2xx greeting arrived.
    Greeted,
    /// Greeting, EHLO, STARTTLS and AUTH are done: transactions may start.
    Ready {
        caps: Capabilities,
        tls: bool,
    },
    /// The 220 to STARTTLS arrived with nothing after it: handshake now, then call `tls_established`.
    NeedTls,
    Mail {
        txn: TxnId,
        reply: ReplyRef,
    },
    Rcpt {
        txn: TxnId,
        index: usize,
        reply: ReplyRef,
    },
    /// The reply to DATA (354 or a refusal).
    Data {
        txn: TxnId,
        reply: ReplyRef,
    },
    /// The final reply (after the content, or to BDAT LAST).
    DataDone {
        txn: TxnId,
        reply: ReplyRef,
    },
    /// The transaction is over; `accepted`: the final reply was 2xx with at least one recipient accepted.
    MessageDone {
        txn: TxnId,
        accepted: bool,
    },
    RsetDone {
        reply: ReplyRef,
    },
    /// QUIT answered (or the server closed after QUIT).
    Closed,
    Failed(SessionError),
}

/// The envelope and content of one transaction.
pub struct Transaction<'a, R: AsRef<str>> {
    pub sender: &'a str,
    pub recipients: &'a [R],
    /// The content in parts (e.g. a Received header and the stored message), not dot-stuffed.
    pub body: &'a [&'a [u8]],
    /// SIZE= value.
    pub size: u64,
    /// The parts are already in DATA's wire form (CRLF line ends, dot-stuffed, ending with CRLF): only the end
    /// line is added. With BDAT they must not be stuffed and this is ignored.
    pub wire: bool,
    /// BDAT only: bytes of content after `body` that the caller writes itself, from its own copy (e.g. a big
    /// mapped message), when [`ClientSession::poll_external`] says so. 0: none.
    pub external: usize,
    pub eight_bit: bool,
    pub smtputf8: bool,
}

/// What a transaction does beyond [`Transaction`] (see [`ClientSession::start_transaction_with`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxnOptions<'a> {
    /// DSN `RET=` for the MAIL (RFC 3461), sent only when the server offers DSN.
    pub ret: Option<super::dsn::Ret>,
    /// DSN `ENVID=` (decoded; sent as xtext) for the MAIL, only when the server offers DSN.
    pub envid: Option<&'a str>,
    /// DSN `NOTIFY=`/`ORCPT=` per recipient, in the order of [`Transaction::recipients`] (a shorter slice: no
    /// parameters for the rest), sent only when the server offers DSN.
    pub rcpt_dsn: &'a [super::dsn::RcptDsn],
    /// MAIL and RCPTs only, no content (sendmail's `-bv`): the transaction ends after the last RCPT reply,
    /// its [`Event::MessageDone`] saying whether MAIL and at least one RCPT were accepted; the caller then
    /// sends RSET (or QUIT). The transaction's body, size and `external` are ignored.
    pub verify_only: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    #[error("the session is not ready for this command")]
    NotReady,
    #[error("{0} transactions are already in flight")]
    Busy(usize),
    #[error("a transaction needs at least one recipient")]
    NoRecipients,
    #[error("external content needs BDAT (CHUNKING and PIPELINING offered and asked for)")]
    ExternalNeedsBdat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    AwaitTls,
    AuthPlain,
    AuthLoginUser,
    AuthLoginPass,
    AuthLoginDone,
    Open,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Mail,
    Rcpt(usize),
    Data,
    DataDone,
    Bdat,
    /// The end of an empty content sent after a 354 that no recipient needed.
    Discard,
    Rset,
    Quit,
}

impl Expect {
    fn phase(self) -> Phase {
        match self {
            Expect::Mail => Phase::Mail,
            Expect::Rcpt(_) => Phase::Rcpt,
            Expect::Data => Phase::Data,
            Expect::DataDone | Expect::Discard => Phase::DataDone,
            Expect::Bdat => Phase::Bdat,
            Expect::Rset => Phase::Rset,
            Expect::Quit => Phase::Quit,
        }
    }
}

/// Appends a transaction's content in its wire form: `BDAT n LAST` and the content (`external` more bytes
/// counted in `n` come from the caller); or for DATA the content dot-stuffed (unless `wire`: already stuffed)
/// and the end line.
fn encode_body(out: &mut Vec<u8>, body: &[&[u8]], chunked: bool, wire: bool, external: usize) {
    if chunked {
        let len: usize = body.iter().map(|p| p.len()).sum::<usize>() + external;
        let _ = write!(out, "BDAT {len} LAST\r\n");
        for p in body {
            out.extend_from_slice(p);
        }
    } else if wire {
        for p in body {
            out.extend_from_slice(p);
        }
        out.extend_from_slice(b".\r\n");
    } else {
        client::encode_data(out, body);
    }
}

/// One transaction on the wire. Recycled (its buffers keep their capacity).
#[derive(Debug, Default)]
struct Txn {
    id: TxnId,
    /// Encoded RCPT lines (lockstep sends them one by one) and where each ends.
    rcpt_lines: Vec<u8>,
    rcpt_ends: Vec<usize>,
    next_rcpt: usize,
    /// The MAIL FROM line.
    mail: Vec<u8>,
    /// The content as it goes on the wire (DATA: dot-stuffed with its end line, sent after the 354; BDAT: the
    /// `BDAT n LAST` line and the content), when it is not written at once.
    body: Vec<u8>,
    mail_ok: bool,
    rcpt_ok: usize,
    rcpt_answered: usize,
    /// Its commands are written (pipelined) or the lockstep sequence has begun.
    started: bool,
    /// Content bytes the caller writes itself (BDAT).
    external: usize,
    chunked: bool,
    /// No content: done after the last RCPT reply ([`TxnOptions::verify_only`]).
    verify_only: bool,
}

/// The client side of one SMTP session.
pub struct ClientSession {
    params: Params,
    state: State,
    caps: Capabilities,
    tls: bool,
    rx: ReplyReader,
    out: Vec<u8>,
    sent: usize,
    /// `out[..body_end]` holds content: while it is unsent, the data_xfer timeout applies.
    body_end: usize,
    /// Where in `out` the caller's own content goes (offset, length), oldest first; at most `max_in_flight`.
    holes: VecDeque<(usize, usize)>,
    events: VecDeque<Event>,
    arena: Vec<u8>,
    expect: VecDeque<Expect>,
    txns: VecDeque<Txn>,
    spare: Vec<Txn>,
    next_txn: TxnId,
    /// RSET and QUIT asked for, written once no transaction needs the wire before them.
    rset_wanted: bool,
    quit_wanted: bool,
    /// The last transaction ended after its MAIL was accepted but before any content (every RCPT refused, or
    /// DATA refused): the server may still hold that MAIL (Postfix answers a second one with 503 "nested MAIL
    /// command"), so an RSET goes before the next transaction's MAIL.
    rset_before_next: bool,
    last_progress: Instant,
    /// Session setup waits (greeting, EHLO, ...): the phase timed.
    setup_phase: Phase,
}

impl ClientSession {
    /// A session whose TCP connection is being opened (the connect timeout runs from `now`).
    pub fn new(params: Params, now: Instant) -> ClientSession {
        let tls = params.tls == TlsMode::Implicit;
        ClientSession {
            params,
            state: State::Connecting,
            caps: Capabilities::default(),
            tls,
            rx: ReplyReader::new(MAX_REPLY + 4096),
            out: Vec::with_capacity(4096),
            sent: 0,
            body_end: 0,
            holes: VecDeque::new(),
            events: VecDeque::new(),
            arena: Vec::new(),
            expect: VecDeque::new(),
            txns: VecDeque::new(),
            spare: Vec::new(),
            next_txn: 1,
            rset_wanted: false,
            quit_wanted: false,
            rset_before_next: false,
            last_progress: now,
            setup_phase: Phase::Connect,
        }
    }

    /// Starts over for a new connection with the same parameters, keeping the buffers' allocations.
    pub fn reset(&mut self, now: Instant) {
        self.state = State::Connecting;
        self.caps = Capabilities::default();
        self.tls = self.params.tls == TlsMode::Implicit;
        self.rx.clear();
        self.out.clear();
        self.sent = 0;
        self.body_end = 0;
        self.holes.clear();
        self.events.clear();
        self.arena.clear();
        self.expect.clear();
        while let Some(t) = self.txns.pop_front() {
            self.spare.push(t);
        }
        self.rset_wanted = false;
        self.quit_wanted = false;
        self.rset_before_next = false;
        self.last_progress = now;
        self.setup_phase = Phase::Connect;
    }

    /// The TCP connection (and, in implicit TLS mode, the handshake) is up: the greeting is awaited.
    pub fn connected(&mut self, now: Instant) {
        if self.state == State::Connecting {
            self.state = State::Greeting;
            self.setup_phase = Phase::Greeting;
            self.last_progress = now;
        }
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Ready for transactions (setup done, not closed).
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Transactions started and not yet done.
    pub fn in_flight(&self) -> usize {
        self.txns.len()
    }

    /// What the session is waiting for now.
    pub fn phase(&self) -> Phase {
        if self.state != State::Open {
            return self.setup_phase;
        }
        if self.sent < self.body_end || !self.holes.is_empty() {
            return Phase::DataXfer;
        }
        self.expect.front().map_or(Phase::Mail, |e| e.phase())
    }

    /// A reply referenced by an event; valid until the next input or timeout call after the events were
    /// drained.
    pub fn reply(&self, r: ReplyRef) -> Reply<'_> {
        let raw = self
            .arena
            .get(r.start as usize..r.end as usize)
            .unwrap_or(&[]);
        Reply { code: r.code, raw }
    }

    /// The owned form of a referenced reply.
    pub fn server_reply(&self, r: ReplyRef) -> ServerReply {
        ServerReply::from(self.reply(r))
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Bytes to send now (up to where the caller's own content goes, see [`Self::poll_external`]).
    pub fn poll_transmit(&self) -> Option<&[u8]> {
        let end = self.holes.front().map_or(self.out.len(), |h| h.0);
        (self.sent < end).then(|| &self.out[self.sent..end])
    }

    /// `n` bytes of [`Self::poll_transmit`] were written.
    pub fn advance_transmit(&mut self, n: usize, now: Instant) {
        let end = self.holes.front().map_or(self.out.len(), |h| h.0);
        self.sent = (self.sent + n).min(end);
        if n > 0 {
            self.last_progress = now;
        }
        self.compact_out();
    }

    /// The caller must now write this many bytes of its own content (the `external` part of the oldest
    /// transaction that has one), then call [`Self::external_written`].
    pub fn poll_external(&self) -> Option<usize> {
        self.holes.front().filter(|h| h.0 == self.sent).map(|h| h.1)
    }

    /// The content [`Self::poll_external`] asked for is written.
    pub fn external_written(&mut self, now: Instant) {
        if self.poll_external().is_some() {
            self.holes.pop_front();
            self.last_progress = now;
            self.compact_out();
        }
    }

    /// Everything sent: the buffer starts over (keeping its allocation).
    fn compact_out(&mut self) {
        if self.sent == self.out.len() && self.holes.is_empty() {
            self.out.clear();
            self.sent = 0;
            self.body_end = 0;
        }
    }

    /// Nothing to send and nothing of the caller's to wait for.
    fn nothing_to_send(&self) -> bool {
        self.poll_transmit().is_none() && self.holes.is_empty()
    }

    /// The next deadline, if the session waits for anything.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let t = &self.params.timeouts;
        let d = match self.state {
            State::Closed => return None,
            State::Open if self.expect.is_empty() && self.nothing_to_send() => return None,
            State::Open => match self.phase() {
                Phase::Mail => t.mail,
                Phase::Rcpt => t.rcpt,
                Phase::Data => t.data_init,
                Phase::DataXfer => t.data_xfer,
                Phase::DataDone | Phase::Bdat => t.data_done,
                Phase::Rset => t.rset,
                Phase::Quit => t.quit,
                _ => t.helo,
            },
            State::Connecting => t.connect,
            State::StartTls | State::AwaitTls => t.starttls,
            _ => t.helo,
        };
        Some(self.last_progress + d)
    }

    /// Fails the session if its deadline has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.maybe_clear_arena();
        if self.poll_timeout().is_some_and(|d| now >= d) {
            let phase = self.phase();
            self.fail(SessionError::Timeout { phase });
        }
    }

    /// The peer closed the connection (read returned 0).
    pub fn handle_eof(&mut self) {
        match self.state {
            State::Closed => {}
            State::Open if self.quitting() => {
                self.state = State::Closed;
                self.events.push_back(Event::Closed);
            }
            _ => {
                let phase = self.phase();
                self.fail(SessionError::Lost { phase });
            }
        }
    }

    /// Space to read into directly (no copy); report the count with [`Self::input_filled`].
    pub fn input_buffer(&mut self) -> &mut [u8] {
        match self.rx.spare() {
            Ok(s) => s,
            // Full without a complete reply: `input_filled` reports the error.
            Err(_) => &mut [],
        }
    }

    /// `n` bytes were read into [`Self::input_buffer`].
    pub fn input_filled(&mut self, n: usize, now: Instant) {
        self.maybe_clear_arena();
        if self.state == State::Closed {
            return;
        }
        if n == 0 && self.rx.spare().is_err() {
            let phase = self.phase();
            self.fail(SessionError::Protocol {
                phase,
                error: ParseError::ReplyTooLong,
            });
            return;
        }
        self.rx.filled(n);
        self.process(now);
    }

    /// Bytes read from the server.
    pub fn handle_input(&mut self, mut bytes: &[u8], now: Instant) {
        self.maybe_clear_arena();
        while !bytes.is_empty() && self.state != State::Closed {
            let spare = match self.rx.spare() {
                Ok(s) => s,
                Err(error) => {
                    let phase = self.phase();
                    return self.fail(SessionError::Protocol { phase, error });
                }
            };
            let n = spare.len().min(bytes.len());
            spare[..n].copy_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            self.rx.filled(n);
            self.process(now);
        }
    }

    /// The TLS handshake after STARTTLS succeeded: EHLO again over TLS.
    pub fn tls_established(&mut self, now: Instant) {
        if self.state != State::AwaitTls {
            return;
        }
        self.tls = true;
        self.rx.clear();
        self.caps = Capabilities::default();
        self.last_progress = now;
        self.send_ehlo();
    }

    /// Starts a transaction. Its events carry the returned id.
    pub fn start_transaction<R: AsRef<str>>(
        &mut self,
        t: &Transaction<'_, R>,
        now: Instant,
    ) -> Result<TxnId, CommandError> {
        self.start_transaction_with(t, &TxnOptions::default(), now)
    }

    /// [`Self::start_transaction`] with DSN parameters or without content ([`TxnOptions`]).
    pub fn start_transaction_with<R: AsRef<str>>(
        &mut self,
        t: &Transaction<'_, R>,
        opts: &TxnOptions<'_>,
        now: Instant,
    ) -> Result<TxnId, CommandError> {
        let external = if opts.verify_only { 0 } else { t.external };
        if self.state != State::Open || self.quitting() {
            return Err(CommandError::NotReady);
        }
        if t.recipients.is_empty() {
            return Err(CommandError::NoRecipients);
        }
        let max = self.transactions_at_once();
        if self.txns.len() >= max {
            return Err(CommandError::Busy(self.txns.len()));
        }
        if external > 0 && !self.chunking() {
            return Err(CommandError::ExternalNeedsBdat);
        }
        let mut txn = self.spare.pop().unwrap_or_default();
        txn.id = self.next_txn;
        self.next_txn += 1;
        txn.rcpt_lines.clear();
        txn.rcpt_ends.clear();
        txn.body.clear();
        txn.next_rcpt = 0;
        txn.mail_ok = false;
        txn.rcpt_ok = 0;
        txn.rcpt_answered = 0;
        txn.started = false;
        txn.verify_only = opts.verify_only;
        txn.chunked = self.chunking() && !opts.verify_only;
        txn.external = external;
        let dsn = self.caps.dsn;
        for (i, r) in t.recipients.iter().enumerate() {
            let params = opts.rcpt_dsn.get(i).filter(|_| dsn);
            client::encode_rcpt(&mut txn.rcpt_lines, r.as_ref(), params);
            txn.rcpt_ends.push(txn.rcpt_lines.len());
        }
        txn.mail.clear();
        client::encode_mail(
            &mut txn.mail,
            t.sender,
            &self.caps,
            &client::MailParams {
                size: t.size,
                eight_bit: t.eight_bit,
                smtputf8: t.smtputf8,
                ret: opts.ret.filter(|_| dsn),
                envid: opts.envid.filter(|_| dsn),
            },
        );
        let id = txn.id;
        let chunked = txn.chunked;
        self.touch_if_idle(now);
        self.txns.push_back(txn);
        // Written now if it may be: a BDAT transaction's content then goes straight into the transmit buffer
        // (one copy); otherwise the content is kept in its wire form until it may go.
        self.write_ready(Some((id, t.body, t.wire)));
        if let Some(txn) = self.txns.back_mut().filter(|x| x.id == id) {
            if !(opts.verify_only || chunked && txn.started) {
                encode_body(&mut txn.body, t.body, chunked, t.wire, external);
            }
        }
        Ok(id)
    }

    /// Most transactions [`Self::start_transaction`] takes at once: [`Params::max_in_flight`] when the server
    /// offers PIPELINING (and it is asked for), else 1.
    pub fn transactions_at_once(&self) -> usize {
        if self.pipelining() {
            self.params.max_in_flight.max(1)
        } else {
            1
        }
    }

    /// RSET (after a failed transaction, to reuse the connection); sent after the transactions in flight.
    pub fn rset(&mut self, now: Instant) -> Result<(), CommandError> {
        if self.state != State::Open || self.quitting() {
            return Err(CommandError::NotReady);
        }
        self.touch_if_idle(now);
        self.rset_wanted = true;
        self.write_ready_txns();
        Ok(())
    }

    /// QUIT, after the transactions in flight (a session still in setup quits at once).
    pub fn quit(&mut self, now: Instant) {
        match self.state {
            State::Closed => {}
            State::Connecting => {
                self.state = State::Closed;
                self.events.push_back(Event::Closed);
            }
            _ if self.quitting() => {}
            State::Open => {
                self.touch_if_idle(now);
                self.quit_wanted = true;
                self.write_ready_txns();
            }
            _ => {
                // Mid-setup: nothing else is awaited.
                self.touch_if_idle(now);
                self.state = State::Open;
                self.setup_phase = Phase::Quit;
                self.quit_wanted = true;
                self.write_ready_txns();
            }
        }
    }

    fn quitting(&self) -> bool {
        self.quit_wanted || self.expect.contains(&Expect::Quit)
    }

    /// A command while nothing was awaited: its timer starts now.
    fn touch_if_idle(&mut self, now: Instant) {
        if self.expect.is_empty() && self.nothing_to_send() {
            self.last_progress = now;
        }
    }

    fn pipelining(&self) -> bool {
        self.params.pipelining && self.caps.pipelining
    }

    fn chunking(&self) -> bool {
        self.params.chunking && self.caps.chunking && self.pipelining()
    }

    fn maybe_clear_arena(&mut self) {
        if self.events.is_empty() {
            self.arena.clear();
        }
    }

    fn fail(&mut self, e: SessionError) {
        self.state = State::Closed;
        self.rset_wanted = false;
        self.quit_wanted = false;
        self.rset_before_next = false;
        self.expect.clear();
        self.out.clear();
        self.sent = 0;
        self.body_end = 0;
        self.holes.clear();
        while let Some(t) = self.txns.pop_front() {
            self.spare.push(t);
        }
        self.events.push_back(Event::Failed(e));
    }

    fn push_out(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    fn send_ehlo(&mut self) {
        self.out.extend_from_slice(b"EHLO ");
        let helo = std::mem::take(&mut self.params.helo);
        self.out.extend_from_slice(helo.as_bytes());
        self.params.helo = helo;
        self.out.extend_from_slice(b"\r\n");
        self.state = State::Ehlo;
        self.setup_phase = Phase::Ehlo;
    }

    /// Writes what the queued transactions may send now, then a wanted RSET or QUIT once nothing before it is
    /// left to write (lockstep: once the transactions are done).
    fn write_ready_txns(&mut self) {
        self.write_ready(None);
    }

    /// [`Self::write_ready_txns`]; `fresh`: the content of the transaction just started, written straight
    /// into the transmit buffer if it goes now.
    fn write_ready(&mut self, fresh: Option<(TxnId, &[&[u8]], bool)>) {
        if self.state != State::Open {
            return;
        }
        self.write_txns(fresh);
        let clear = if self.pipelining() {
            self.txns.iter().all(|t| t.started) && !self.expect.contains(&Expect::Data)
        } else {
            self.txns.is_empty()
        };
        if clear && self.rset_wanted {
            self.rset_wanted = false;
            self.rset_before_next = false;
            self.push_out(b"RSET\r\n");
            self.expect.push_back(Expect::Rset);
        }
        if clear && self.quit_wanted {
            self.quit_wanted = false;
            self.push_out(b"QUIT\r\n");
            self.expect.push_back(Expect::Quit);
        }
    }

    fn write_txns(&mut self, fresh: Option<(TxnId, &[&[u8]], bool)>) {
        let pipelining = self.pipelining();
        for i in 0..self.txns.len() {
            if self.txns[i].started {
                // DATA mode: the next transaction waits until this one's content is out (its 354 came).
                if !self.txns[i].chunked && self.expect.contains(&Expect::Data) {
                    return;
                }
                continue;
            }
            if !pipelining && i > 0 {
                return;
            }
            if self.rset_before_next {
                self.rset_before_next = false;
                self.push_out(b"RSET\r\n");
                self.expect.push_back(Expect::Rset);
            }
            let mut txn = std::mem::take(&mut self.txns[i]);
            txn.started = true;
            self.out.extend_from_slice(&txn.mail);
            self.expect.push_back(Expect::Mail);
            if pipelining {
                self.out.extend_from_slice(&txn.rcpt_lines);
                for k in 0..txn.rcpt_ends.len() {
                    self.expect.push_back(Expect::Rcpt(k));
                }
                txn.next_rcpt = txn.rcpt_ends.len();
                if txn.verify_only {
                    // Nothing after the RCPTs: the next transaction (or RSET) may follow at once.
                } else if txn.chunked {
                    match fresh {
                        Some((id, body, wire)) if id == txn.id => {
                            encode_body(&mut self.out, body, true, wire, txn.external)
                        }
                        _ => self.out.extend_from_slice(&txn.body),
                    }
                    self.body_end = self.out.len();
                    if txn.external > 0 {
                        self.holes.push_back((self.out.len(), txn.external));
                    }
                    self.expect.push_back(Expect::Bdat);
                } else {
                    self.out.extend_from_slice(b"DATA\r\n");
                    self.expect.push_back(Expect::Data);
                }
            }
            let waits_data = !txn.chunked && !txn.verify_only;
            self.txns[i] = txn;
            if waits_data {
                return;
            }
        }
    }

    fn process(&mut self, now: Instant) {
        loop {
            if self.state == State::Closed {
                return;
            }
            if self.state == State::AwaitTls && self.rx.pending() > 0 {
                return self.fail(SessionError::StartTlsInjection);
            }
            let head = match self.rx.peek() {
                Ok(Some(h)) => h,
                Ok(None) => return,
                Err(error) => {
                    let phase = self.phase();
                    return self.fail(SessionError::Protocol { phase, error });
                }
            };
            if self.state == State::Connecting {
                let phase = self.phase();
                return self.fail(SessionError::Protocol {
                    phase,
                    error: ParseError::Malformed("reply before the connection is up".into()),
                });
            }
            // Kept for events (and errors) past the receive buffer.
            if self.arena.len() + head.len > ARENA_BYTES_MAX {
                return self.fail(SessionError::EventsNotDrained);
            }
            self.last_progress = now;
            let reply = self.rx.take(head);
            let start = self.arena.len() as u32;
            self.arena.extend_from_slice(reply.raw);
            let r = ReplyRef {
                code: head.code,
                start,
                end: self.arena.len() as u32,
            };
            if self.state == State::Open {
                self.on_txn_reply(r);
            } else {
                self.on_setup_reply(r);
            }
        }
    }

    fn refuse(&mut self, phase: Phase, r: ReplyRef) {
        let reply = self.server_reply(r);
        self.fail(if r.code == 421 {
            SessionError::Closing { phase, reply }
        } else {
            SessionError::Refused { phase, reply }
        });
    }

    fn on_setup_reply(&mut self, r: ReplyRef) {
        let ok = r.class() == 2;
        match self.state {
            State::Greeting => {
                if !ok {
                    return self.refuse(Phase::Greeting, r);
                }
                self.events.push_back(Event::Greeted);
                self.send_ehlo();
            }
            State::Ehlo => {
                if !ok {
                    if r.code == 421 {
                        return self.refuse(Phase::Ehlo, r);
                    }
                    self.push_out(b"HELO ");
                    let helo = std::mem::take(&mut self.params.helo);
                    self.out.extend_from_slice(helo.as_bytes());
                    self.params.helo = helo;
                    self.push_out(b"\r\n");
                    self.state = State::Helo;
                    self.setup_phase = Phase::Helo;
                    return;
                }
                self.caps = Capabilities::from_reply(&self.reply(r));
                self.after_hello();
            }
            State::Helo => {
                if !ok {
                    return self.refuse(Phase::Helo, r);
                }
                self.caps = Capabilities::default();
                self.after_hello();
            }
            State::StartTls => {
                if ok && self.rx.pending() > 0 {
                    // Anything after the 220 was sent in plaintext to be read as if it came over TLS.
                    self.fail(SessionError::StartTlsInjection);
                } else if ok {
                    self.state = State::AwaitTls;
                    self.setup_phase = Phase::TlsHandshake;
                    self.events.push_back(Event::NeedTls);
                } else if r.code == 421 {
                    self.refuse(Phase::StartTls, r);
                } else if self.params.tls == TlsMode::Required {
                    self.fail(SessionError::TlsRequired);
                } else {
                    self.after_tls();
                }
            }
            State::AuthPlain | State::AuthLoginDone => {
                if !ok {
                    return self.refuse(Phase::Auth, r);
                }
                self.open();
            }
            State::AuthLoginUser | State::AuthLoginPass => {
                if r.code != 334 {
                    return self.refuse(Phase::Auth, r);
                }
                let (user, pass) = self.params.auth.clone().unwrap_or_default();
                let (word, next) = if self.state == State::AuthLoginUser {
                    (user, State::AuthLoginPass)
                } else {
                    (pass, State::AuthLoginDone)
                };
                use base64::Engine as _;
                let b64 = base64::engine::general_purpose::STANDARD.encode(word);
                self.push_out(b64.as_bytes());
                self.push_out(b"\r\n");
                self.state = next;
            }
            State::Connecting | State::AwaitTls | State::Open | State::Closed => {}
        }
    }

    fn after_hello(&mut self) {
        let wants_tls = matches!(self.params.tls, TlsMode::Opportunistic | TlsMode::Required);
        if wants_tls && !self.tls {
            if self.caps.starttls {
                self.push_out(b"STARTTLS\r\n");
                self.state = State::StartTls;
                self.setup_phase = Phase::StartTls;
                return;
            }
            if self.params.tls == TlsMode::Required {
                return self.fail(SessionError::TlsRequired);
            }
        }
        self.after_tls();
    }

    fn after_tls(&mut self) {
        let Some((user, pass)) = self.params.auth.clone() else {
            return self.open();
        };
        if !self.tls && self.params.auth_requires_tls {
            return self.fail(SessionError::TlsRequired);
        }
        self.setup_phase = Phase::Auth;
        if self.caps.auth_plain || !self.caps.auth_login {
            let cmd = client::auth_plain(&user, &pass);
            self.push_out(cmd.as_bytes());
            self.state = State::AuthPlain;
        } else {
            self.push_out(b"AUTH LOGIN\r\n");
            self.state = State::AuthLoginUser;
        }
    }

    fn open(&mut self) {
        self.state = State::Open;
        self.setup_phase = Phase::Mail;
        self.events.push_back(Event::Ready {
            caps: self.caps.clone(),
            tls: self.tls,
        });
        self.write_ready_txns();
    }

    /// Ends the front transaction.
    fn finish_txn(&mut self, accepted: bool) {
        if let Some(mut t) = self.txns.pop_front() {
            self.events.push_back(Event::MessageDone {
                txn: t.id,
                accepted,
            });
            // A recycled transaction keeps no big content buffer: each of the `max_in_flight` spares would.
            if t.body.capacity() > SPARE_BODY_KEPT_MAX {
                t.body = Vec::new();
            }
            self.spare.push(t);
        }
        self.write_ready_txns();
    }

    fn on_txn_reply(&mut self, r: ReplyRef) {
        let Some(exp) = self.expect.pop_front() else {
            // A reply nobody asked for.
            return self.fail(SessionError::Protocol {
                phase: Phase::Mail,
                error: ParseError::Malformed("unexpected reply".into()),
            });
        };
        let ok = r.class() == 2;
        let pipelining = self.pipelining();
        let closing = r.code == 421;
        match exp {
            Expect::Rset => {
                self.events.push_back(Event::RsetDone { reply: r });
                if !ok {
                    self.refuse(Phase::Rset, r);
                }
            }
            Expect::Quit => {
                self.state = State::Closed;
                self.events.push_back(Event::Closed);
            }
            Expect::Discard => {
                if closing {
                    self.refuse(Phase::DataDone, r);
                }
            }
            Expect::Mail | Expect::Rcpt(_) | Expect::Data | Expect::DataDone | Expect::Bdat => {
                let Some(txn) = self.txns.front_mut() else {
                    return self.fail(SessionError::Protocol {
                        phase: exp.phase(),
                        error: ParseError::Malformed("reply without a transaction".into()),
                    });
                };
                let id = txn.id;
                match exp {
                    Expect::Mail => {
                        txn.mail_ok = ok;
                        self.events.push_back(Event::Mail { txn: id, reply: r });
                        if closing {
                            self.finish_txn(false);
                            return self.refuse(Phase::Mail, r);
                        }
                        if !pipelining {
                            if ok {
                                self.send_next_rcpt();
                            } else {
                                self.finish_txn(false);
                            }
                        }
                    }
                    Expect::Rcpt(index) => {
                        txn.rcpt_answered += 1;
                        if ok {
                            txn.rcpt_ok += 1;
                        }
                        self.events.push_back(Event::Rcpt {
                            txn: id,
                            index,
                            reply: r,
                        });
                        if closing {
                            self.finish_txn(false);
                            return self.refuse(Phase::Rcpt, r);
                        }
                        let txn = &self.txns[0];
                        if txn.verify_only && txn.rcpt_answered == txn.rcpt_ends.len() {
                            let accepted = txn.mail_ok && txn.rcpt_ok > 0;
                            self.finish_txn(accepted);
                        } else if !pipelining {
                            if txn.next_rcpt < txn.rcpt_ends.len() {
                                self.send_next_rcpt();
                            } else if txn.rcpt_ok > 0 {
                                self.push_out(b"DATA\r\n");
                                self.expect.push_back(Expect::Data);
                            } else {
                                // Every RCPT refused: the MAIL may still stand.
                                self.rset_before_next = !txn.chunked;
                                self.finish_txn(false);
                            }
                        }
                    }
                    Expect::Data => {
                        self.events.push_back(Event::Data { txn: id, reply: r });
                        let wanted = txn.mail_ok && txn.rcpt_ok > 0;
                        if r.code == 354 {
                            if wanted {
                                let mut body = std::mem::take(&mut txn.body);
                                if self.out.is_empty() && self.holes.is_empty() {
                                    std::mem::swap(&mut self.out, &mut body);
                                    self.sent = 0;
                                } else {
                                    self.out.extend_from_slice(&body);
                                }
                                self.body_end = self.out.len();
                                if let Some(t) = self.txns.front_mut() {
                                    t.body = body;
                                }
                                self.expect.push_front(Expect::DataDone);
                            } else {
                                // Pipelined DATA accepted although nothing is wanted: end an empty content.
                                self.push_out(b".\r\n");
                                self.expect.push_front(Expect::Discard);
                                self.finish_txn(false);
                            }
                            self.write_ready_txns();
                        } else {
                            // DATA refused: no content went, the MAIL may still stand.
                            self.rset_before_next = txn.mail_ok && !txn.chunked;
                            self.finish_txn(false);
                            if closing {
                                self.refuse(Phase::Data, r);
                            }
                        }
                    }
                    Expect::DataDone | Expect::Bdat => {
                        let accepted = ok && txn.mail_ok && txn.rcpt_ok > 0;
                        self.events.push_back(Event::DataDone { txn: id, reply: r });
                        self.finish_txn(accepted);
                        if closing {
                            self.refuse(exp.phase(), r);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Lockstep: the next RCPT of the front transaction.
    fn send_next_rcpt(&mut self) {
        let Some(txn) = self.txns.front_mut() else {
            return;
        };
        let k = txn.next_rcpt;
        let start = match k {
            0 => 0,
            _ => txn.rcpt_ends.get(k - 1).copied().unwrap_or(0),
        };
        let Some(line) = txn
            .rcpt_ends
            .get(k)
            .and_then(|&end| txn.rcpt_lines.get(start..end))
        else {
            return;
        };
        txn.next_rcpt += 1;
        self.out.extend_from_slice(line);
        self.expect.push_back(Expect::Rcpt(k));
    }
}

#[cfg(test)]
mod tests;
