//! Per-shard runner: one glommio executor (pinned to a CPU) running its
//! share of the connections as local tasks.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use shardmta::net::ClientConn;
use shardmta::shard::runtime::Ready;

use crate::domains::Domains;

use crate::report::{record, Counters, ErrKind, Hists};
use crate::series::{self, Event};
use crate::smtp::{self, ParseError};
use shardmta::smtp::client_session::{
    ClientSession, Event as SmtpEvent, Params, SessionError, Timeouts, TlsMode, Transaction,
};
use shardmta::smtp::reply_parser::Reply;

/// Resolved, validated run settings shared by every shard.
#[derive(Debug, Clone)]
pub struct Config {
    pub targets: Vec<SocketAddr>,
    pub messages: u64,
    pub deadline: Option<Instant>,
    /// Start of the run: the origin of the `--rate` schedule.
    pub start: Instant,
    /// Open-loop rate (messages per second over the whole run).
    pub rate: Option<f64>,
    pub size: usize,
    pub rcpts: usize,
    pub from: String,
    /// Recipient domains, picked by weight per recipient.
    pub domains: Domains,
    /// `--eml`: messages in wire form, sent round-robin (None: generated).
    pub eml: Option<Arc<Vec<Vec<u8>>>>,
    /// `--starttls`: client config (certificates not verified).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// `--auth`: user and password (AUTH PLAIN).
    pub auth: Option<(String, String)>,
    pub helo: String,
    pub new_connection: bool,
    /// Close with an RST after the reply to QUIT (no TIME_WAIT on either side).
    pub close_with_reset: bool,
    pub pipelining: bool,
    /// `--chunking`: BDAT instead of DATA, each transaction in one write.
    pub chunking: bool,
    /// `--window`: transactions in flight per connection with `chunking` (1 otherwise).
    pub window: usize,
    pub io_timeout: Duration,
    pub retry_pause: Duration,
    pub max_conn_errors: u64,
    /// After the --duration deadline, in-flight transactions get this long to
    /// finish before their connections are closed.
    pub stop_grace: Duration,
}

/// --eml messages up to this size are copied with their commands into one write; bigger ones (with
/// --chunking) are written from the shared copy.
const INLINE_EML_BYTES: usize = 64 * 1024;

/// State shared across shards (threads).
pub struct Shared {
    pub cfg: Config,
    pub counters: Counters,
    pub series: series::Aggregator,
    pub nonce: u64,
    next_msg: AtomicU64,
    stop: AtomicBool,
    abort_reason: Mutex<Option<String>>,
    record_file: Option<File>,
}

impl Shared {
    pub fn new(cfg: Config, shards: usize, nonce: u64, record_file: Option<File>) -> Self {
        Shared {
            cfg,
            counters: Counters::default(),
            series: series::Aggregator::new(shards),
            nonce,
            next_msg: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            abort_reason: Mutex::new(None),
            record_file,
        }
    }

    fn time_is_up(&self) -> bool {
        self.stop.load(Relaxed) || self.cfg.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Takes the next message index, or None when the run is over.
    fn claim(&self) -> Option<u64> {
        if self.time_is_up() {
            return None;
        }
        let n = self.next_msg.fetch_add(1, Relaxed);
        (n < self.cfg.messages).then_some(n)
    }

    pub fn abort(&self, why: String) {
        self.stop.store(true, Relaxed);
        if let Ok(mut g) = self.abort_reason.lock() {
            g.get_or_insert(why);
        }
    }

    pub fn abort_reason(&self) -> Option<String> {
        self.abort_reason.lock().ok().and_then(|g| g.clone())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("connection closed by server")]
    Closed,
    #[error("bad reply: {0}")]
    Parse(#[from] ParseError),
    #[error("unexpected reply to {0}: {1}")]
    Protocol(&'static str, String),
    #[error("server refused session: {0}")]
    Rejected(String),
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
}

impl ConnError {
    pub fn kind(&self) -> ErrKind {
        match self {
            ConnError::Connect(e) | ConnError::Io(e) => match e.kind() {
                io::ErrorKind::ConnectionRefused => ErrKind::Refused,
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe => ErrKind::Reset,
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ErrKind::Timeout,
                io::ErrorKind::UnexpectedEof => ErrKind::Closed,
                _ => ErrKind::Other,
            },
            ConnError::Closed => ErrKind::Closed,
            ConnError::Parse(_) | ConnError::Protocol(..) => ErrKind::Protocol,
            ConnError::Rejected(_) => ErrKind::Rejected,
            ConnError::Tls(_) => ErrKind::Tls,
        }
    }
}

/// Appends `id queue_id` lines for accepted messages; flushed at least
/// once a second and at the end of the run.
struct IdRecorder {
    file: Option<File>,
    buf: Vec<u8>,
    last_flush: Instant,
}

impl IdRecorder {
    /// Whether `--record-ids` is on.
    fn enabled(&self) -> bool {
        self.file.is_some()
    }

    fn push(&mut self, shared: &Shared, id: &str, queue_id: Option<&[u8]>) {
        if self.file.is_none() {
            return;
        }
        self.buf.extend_from_slice(id.as_bytes());
        self.buf.push(b' ');
        self.buf.extend_from_slice(queue_id.unwrap_or(b"-"));
        self.buf.push(b'\n');
        if self.buf.len() >= 64 * 1024 || self.last_flush.elapsed() >= Duration::from_secs(1) {
            self.flush(shared);
        }
    }

    fn flush(&mut self, shared: &Shared) {
        self.last_flush = Instant::now();
        if self.buf.is_empty() {
            return;
        }
        if let Some(f) = self.file.as_mut() {
            if let Err(e) = f.write_all(&self.buf) {
                if shared.counters.record_errors.fetch_add(1, Relaxed) == 0 {
                    crate::progress::log(&format!(
                        "shardmta-loadtest: writing --record-ids file: {e}"
                    ));
                }
            }
        }
        self.buf.clear();
    }
}

struct ShardCtx {
    shared: Arc<Shared>,
    hists: RefCell<Hists>,
    ids: RefCell<IdRecorder>,
    series: RefCell<series::Local>,
}

impl ShardCtx {
    /// Whole seconds since the start of the run.
    fn second(&self) -> u64 {
        self.shared.cfg.start.elapsed().as_secs()
    }

    fn event(&self, ev: Event) {
        self.series
            .borrow_mut()
            .event(self.second(), ev, &self.shared.series);
    }

    fn data_latency(&self, d: Duration) {
        record(&mut self.hists.borrow_mut().data_to_250, d);
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.series
            .borrow_mut()
            .latency(self.second(), us, &self.shared.series);
    }
}

/// One load shard's life inside its executor (see `shardmta::shard::runtime`): runs its connections until they
/// finish, then hands its histograms (or why it could not run) to `done`. A shard that cannot start aborts the run.
pub async fn run_shard(
    shard: usize,
    conn_ids: Vec<usize>,
    shared: Arc<Shared>,
    mut ready: Ready<String>,
    done: Arc<Mutex<Vec<Result<Hists, String>>>>,
) {
    let report = |r: Result<Hists, String>| {
        if let Ok(mut v) = done.lock() {
            v.push(r);
        }
    };
    let ctx = match shard_ctx(shard, shared.clone()) {
        Ok(c) => Rc::new(c),
        Err(e) => {
            shared.abort(e.clone());
            report(Err(e.clone()));
            return ready.failed(e);
        }
    };
    ready.ready();
    {
        let run_ctx = ctx.clone();
        // Hands in finished seconds even when this shard is idle.
        let tick_ctx = run_ctx.clone();
        let ticker = glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(Duration::from_millis(200)).await;
                let now = tick_ctx.second();
                tick_ctx
                    .series
                    .borrow_mut()
                    .roll(now, &tick_ctx.shared.series);
            }
        });
        let tasks: Vec<_> = conn_ids
            .into_iter()
            .map(|id| glommio::spawn_local(conn_loop(id, run_ctx.clone())))
            .collect();
        for t in tasks {
            t.await;
        }
        ticker.cancel().await;
    }
    ctx.ids.borrow_mut().flush(&ctx.shared);
    ctx.series.borrow_mut().finish(&ctx.shared.series);
    // Every task has finished, so this is the last reference.
    report(match Rc::try_unwrap(ctx) {
        Ok(c) => Ok(c.hists.into_inner()),
        Err(_) => Err(format!("shard {shard}: connection tasks outlived the run")),
    });
}

/// A shard's state: its histograms, id recorder and time series.
fn shard_ctx(shard: usize, shared: Arc<Shared>) -> Result<ShardCtx, String> {
    let record_file = match &shared.record_file {
        Some(f) => Some(
            f.try_clone()
                .map_err(|e| format!("shard {shard}: --record-ids file: {e}"))?,
        ),
        None => None,
    };
    Ok(ShardCtx {
        shared,
        hists: RefCell::new(Hists::new()?),
        ids: RefCell::new(IdRecorder {
            file: record_file,
            buf: Vec::new(),
            last_flush: Instant::now(),
        }),
        series: RefCell::new(series::Local::new(shard)?),
    })
}

/// One connection slot, cut off (mid-read or mid-write) when the run is
/// aborted or the --duration deadline plus the grace has passed.
async fn conn_loop(conn_id: usize, ctx: Rc<ShardCtx>) {
    let work = async {
        conn_work(conn_id, &ctx).await;
        false
    };
    let cut = async {
        hard_stop(&ctx.shared).await;
        true
    };
    if futures_lite::future::or(work, cut).await {
        ctx.shared.counters.cut_off.fetch_add(1, Relaxed);
    }
}

/// Resolves when the run is aborted or past its deadline plus grace.
async fn hard_stop(shared: &Shared) {
    const POLL: Duration = Duration::from_millis(250);
    loop {
        if shared.stop.load(Relaxed) {
            return;
        }
        let wait = match shared.cfg.deadline {
            Some(d) => {
                let cut = d + shared.cfg.stop_grace;
                let now = Instant::now();
                if now >= cut {
                    return;
                }
                (cut - now).min(POLL)
            }
            None => POLL,
        };
        glommio::timer::sleep(wait).await;
    }
}

/// Connects, runs transactions, reconnects after errors (with a pause)
/// until the run is over.
async fn conn_work(conn_id: usize, ctx: &ShardCtx) {
    let shared = &ctx.shared;
    let cfg = &shared.cfg;
    let target = cfg.targets[conn_id % cfg.targets.len()];
    let mut conn = Conn::new(cfg);
    // Messages claimed but not answered, oldest first (at most `cfg.window`): a connection error leaves them
    // here and they are sent again on the next connection.
    let mut pending: VecDeque<u64> = VecDeque::with_capacity(cfg.window);
    loop {
        if pending.is_empty() {
            pending.extend(shared.claim());
        } else if shared.time_is_up() {
            pending.clear();
        }
        if pending.is_empty() {
            break;
        }
        if let Err(e) = conn.session(target, ctx, &mut pending).await {
            let kind = e.kind();
            let prev = shared.counters.conn_error(kind);
            ctx.event(Event::ConnError);
            if prev == 0 || prev.is_power_of_two() {
                crate::progress::log(&format!(
                    "shardmta-loadtest: conn {conn_id} -> {target}: {e} ({} #{})",
                    kind.name(),
                    prev + 1
                ));
            }
            let total = shared.counters.conn_errors_total();
            if cfg.max_conn_errors > 0 && total >= cfg.max_conn_errors {
                shared.abort(format!(
                    "{total} connection errors (limit --max-conn-errors {})",
                    cfg.max_conn_errors
                ));
                break;
            }
            glommio::timer::sleep(cfg.retry_pause).await;
        }
    }
}

/// Writes and flushes (TLS keeps written bytes until flushed).
async fn put(s: &mut ClientConn, bytes: &[u8]) -> io::Result<()> {
    s.write_all(bytes).await?;
    s.flush().await
}

/// Outcome of one transaction (or of a connection's chunked transactions).
enum Outcome {
    Done,
    /// Server said 421: it is closing the connection.
    Closing,
    /// QUIT went out with the last transaction; only its reply is left.
    QuitSent,
}

/// Writes what the session has to send and reads until it has an event (no allocation: replies stay in the
/// session's buffers). The socket's read and write timeouts (`--timeout`) bound every wait.
async fn next_event(s: &mut ClientConn, cs: &mut ClientSession) -> Result<SmtpEvent, ConnError> {
    loop {
        if let Some(e) = cs.poll_event() {
            return Ok(e);
        }
        if let Some(bytes) = cs.poll_transmit() {
            let n = bytes.len();
            put(s, bytes).await?;
            cs.advance_transmit(n, Instant::now());
            continue;
        }
        if cs.is_closed() {
            return Ok(SmtpEvent::Closed);
        }
        if cs.poll_external().is_some() {
            return Err(ConnError::Protocol("BDAT", "content not written".into()));
        }
        let buf = cs.input_buffer();
        if buf.is_empty() {
            cs.input_filled(0, Instant::now());
            continue;
        }
        let n = s.read(buf).await?;
        if n == 0 {
            cs.handle_eof();
        } else {
            cs.input_filled(n, Instant::now());
        }
    }
}

/// A failed session as the load tester counts it.
fn conn_error(e: SessionError) -> ConnError {
    match e {
        SessionError::Lost { .. } => ConnError::Closed,
        SessionError::Protocol { error, .. } => ConnError::Parse(error),
        SessionError::Timeout { .. } => ConnError::Io(io::ErrorKind::TimedOut.into()),
        SessionError::StartTlsInjection => {
            ConnError::Protocol("STARTTLS", "plaintext bytes after the 220".into())
        }
        SessionError::TlsRequired => ConnError::Rejected("server does not offer STARTTLS".into()),
        SessionError::Refused { phase, reply } | SessionError::Closing { phase, reply } => {
            ConnError::Rejected(format!("{phase}: {}", reply.one_line()))
        }
        e @ SessionError::EventsNotDrained => ConnError::Protocol("session", e.to_string()),
    }
}

/// When message `index` is due under `--rate` (None: closed loop).
fn due_of(cfg: &Config, index: u64) -> Option<Instant> {
    cfg.rate.map(|r| {
        // Capped at a year (beyond any --duration): no overflow.
        let off = Duration::try_from_secs_f64(index as f64 / r)
            .unwrap_or(Duration::MAX)
            .min(Duration::from_secs(366 * 86_400));
        cfg.start + off
    })
}

/// Open loop: sleeps until message `index`'s slot in the `--rate` schedule; returns the slot.
async fn wait_due(cfg: &Config, index: u64) -> Option<Instant> {
    let due = due_of(cfg, index)?;
    let now = Instant::now();
    if due > now {
        glommio::timer::sleep(due - now).await;
    }
    Some(due)
}

/// Puts the recipients of message `index` into `out` (reusing its strings): user<N>@<domain picked for N>.
fn rcpts_of(out: &mut Vec<String>, cfg: &Config, index: u64) {
    use std::fmt::Write as _;
    out.resize_with(cfg.rcpts, String::new);
    for (r, a) in out.iter_mut().enumerate() {
        let n = index.saturating_mul(cfg.rcpts as u64) + r as u64;
        a.clear();
        // Writing to a String cannot fail.
        let _ = write!(a, "user{n}@{}", cfg.domains.pick(n));
    }
}

/// What one transaction's replies said.
#[derive(Debug, Default)]
struct Replies {
    mail: u16,
    rcpt_ok: usize,
    rcpt_answered: usize,
    last_rcpt: u16,
    data: Option<u16>,
    done: Option<u16>,
    last: u16,
    saw_421: bool,
}

impl Replies {
    fn note(&mut self, code: u16) {
        self.last = code;
        self.saw_421 |= code == 421;
    }

    /// The code that decides the transaction: MAIL's refusal, the last RCPT's when none was accepted, else
    /// the final reply (or DATA's refusal).
    fn final_code(&self) -> u16 {
        if self.mail / 100 != 2 {
            self.mail
        } else if self.rcpt_ok == 0 {
            self.last_rcpt
        } else {
            self.done.or(self.data).unwrap_or(self.last)
        }
    }
}

/// Counts a transaction's refused recipients (when MAIL was accepted) and its final reply code by class.
fn count_final(ctx: &ShardCtx, r: &Replies) -> Result<(), ConnError> {
    let counters = &ctx.shared.counters;
    if r.mail / 100 == 2 && r.rcpt_answered > r.rcpt_ok {
        counters
            .rcpt_rejected
            .fetch_add((r.rcpt_answered - r.rcpt_ok) as u64, Relaxed);
    }
    let final_code = r.final_code();
    let (counter, ev) = match final_code / 100 {
        2 => (&counters.accepted, Event::Accepted),
        4 => (&counters.tempfail, Event::TempFail),
        5 => (&counters.permfail, Event::PermFail),
        _ => {
            return Err(ConnError::Protocol(
                "transaction",
                format!("final reply code {final_code}"),
            ))
        }
    };
    counter.fetch_add(1, Relaxed);
    ctx.event(ev);
    Ok(())
}

/// Per-connection reusable buffers and state.
struct Conn {
    cs: ClientSession,
    rcpts: Vec<String>,
    msg: Vec<u8>,
    hdr: Vec<u8>,
    id: String,
}

impl Conn {
    fn new(cfg: &Config) -> Self {
        let t = cfg.io_timeout;
        let params = Params {
            helo: cfg.helo.clone(),
            tls: if cfg.tls.is_some() {
                TlsMode::Required
            } else {
                TlsMode::Off
            },
            auth: cfg.auth.clone(),
            auth_requires_tls: false,
            pipelining: cfg.pipelining,
            chunking: cfg.chunking,
            max_in_flight: if cfg.chunking { cfg.window.max(1) } else { 1 },
            timeouts: Timeouts {
                connect: t,
                helo: t,
                starttls: t,
                mail: t,
                rcpt: t,
                data_init: t,
                data_xfer: t,
                data_done: t,
                rset: t,
                quit: t,
            },
        };
        Conn {
            cs: ClientSession::new(params, Instant::now()),
            rcpts: Vec::with_capacity(cfg.rcpts),
            msg: Vec::with_capacity(cfg.size + 512),
            hdr: Vec::with_capacity(64),
            id: String::new(),
        }
    }

    async fn session(
        &mut self,
        target: SocketAddr,
        ctx: &ShardCtx,
        pending: &mut VecDeque<u64>,
    ) -> Result<(), ConnError> {
        let cfg = &ctx.shared.cfg;
        let t0 = Instant::now();
        self.cs.reset(t0);
        let tcp = TcpStream::connect_timeout(target, cfg.io_timeout)
            .await
            .map_err(|e| ConnError::Connect(e.into()))?;
        record(&mut ctx.hists.borrow_mut().connect, t0.elapsed());
        tcp.set_nodelay(true).map_err(|e| ConnError::Io(e.into()))?;
        // The ACKs of the server's replies ride on the next command.
        shardmta::net::delay_acks(&tcp).map_err(ConnError::Io)?;
        tcp.set_read_timeout(Some(cfg.io_timeout))
            .map_err(|e| ConnError::Io(e.into()))?;
        tcp.set_write_timeout(Some(cfg.io_timeout))
            .map_err(|e| ConnError::Io(e.into()))?;
        let mut s = ClientConn::Plain(tcp);

        let t1 = Instant::now();
        self.cs.connected(t1);
        let caps = loop {
            match next_event(&mut s, &mut self.cs).await? {
                SmtpEvent::Greeted => record(&mut ctx.hists.borrow_mut().greeting, t1.elapsed()),
                SmtpEvent::NeedTls => {
                    let Some(tls) = &cfg.tls else {
                        return Err(ConnError::Protocol("STARTTLS", "not asked for".into()));
                    };
                    let t_tls = Instant::now();
                    let Some(tcp) = s.take_plain() else {
                        return Err(ConnError::Protocol("STARTTLS", "TLS already on".into()));
                    };
                    let name = rustls::pki_types::ServerName::from(target.ip());
                    let stream = futures_rustls::TlsConnector::from(tls.clone())
                        .connect(name, tcp)
                        .await
                        .map_err(ConnError::Tls)?;
                    s = ClientConn::Tls(Box::new(stream));
                    record(&mut ctx.hists.borrow_mut().tls_handshake, t_tls.elapsed());
                    self.cs.tls_established(Instant::now());
                }
                SmtpEvent::Ready { caps, .. } => break caps,
                SmtpEvent::Failed(e) => return Err(conn_error(e)),
                SmtpEvent::Closed => return Err(ConnError::Closed),
                _ => {}
            }
        };
        if cfg.chunking {
            if !(caps.chunking && caps.pipelining) {
                return Err(ConnError::Rejected(
                    "--chunking: the server does not offer CHUNKING and PIPELINING".into(),
                ));
            }
            match self.chunked(&mut s, ctx, pending).await? {
                Outcome::Closing => return Ok(()),
                Outcome::QuitSent => {
                    self.finish_quit(&mut s).await;
                    Self::end(&s, cfg);
                    return Ok(());
                }
                Outcome::Done => {}
            }
        } else {
            while let Some(&index) = pending.front() {
                let outcome = self.transaction(&mut s, ctx, index).await?;
                pending.pop_front();
                if matches!(outcome, Outcome::Closing) {
                    return Ok(());
                }
                if cfg.new_connection {
                    break;
                }
                pending.extend(ctx.shared.claim());
            }
        }
        self.cs.quit(Instant::now());
        self.finish_quit(&mut s).await;
        Self::end(&s, cfg);
        Ok(())
    }

    /// Sends what is left (QUIT) and waits for its reply; best effort: the server may close without a 221.
    async fn finish_quit(&mut self, s: &mut ClientConn) {
        while let Ok(e) = next_event(s, &mut self.cs).await {
            if matches!(e, SmtpEvent::Closed | SmtpEvent::Failed(_)) {
                break;
            }
        }
    }

    /// After the reply to QUIT: with --close-with-reset, the close that follows (the drop of `s`) sends an RST.
    fn end(s: &ClientConn, cfg: &Config) {
        if !cfg.close_with_reset {
            return;
        }
        let tcp = match s {
            ClientConn::Plain(tcp) => tcp,
            ClientConn::Tls(tls) => tls.get_ref().0,
            ClientConn::Gone => return,
        };
        // Best effort: without it the close is an ordinary FIN.
        let _ = shardmta::net::reset_on_close(tcp);
    }

    /// Starts message `index` in the session: generated, or the --eml one after an `X-Loadtest-Id` header
    /// (the --eml messages are kept in the form the mode needs: dot-stuffed for DATA, raw for BDAT; generated
    /// ones have no line starting with '.', so both forms are the same).
    ///
    /// With --chunking, an --eml message bigger than `INLINE_EML_BYTES` is not copied: it is returned, to be
    /// written from the shared copy where the session asks for it ([`ClientSession::poll_external`]).
    fn start<'c>(
        &mut self,
        cfg: &'c Config,
        nonce: u64,
        index: u64,
    ) -> Result<Option<&'c [u8]>, ConnError> {
        smtp::message_id_token(&mut self.id, nonce, index);
        rcpts_of(&mut self.rcpts, cfg, index);
        let eml = cfg.eml.as_ref().map(|list| {
            let n = list.len().max(1) as u64;
            list.get((index % n) as usize).map_or(&[][..], |m| &m[..])
        });
        let parts: [&[u8]; 2];
        let mut external = None;
        let body: &[&[u8]] = match eml {
            None => {
                smtp::build_message(&mut self.msg, &self.id, &cfg.from, cfg.size);
                parts = [&self.msg, &[]];
                &parts[..1]
            }
            Some(m) => {
                self.hdr.clear();
                self.hdr.extend_from_slice(b"X-Loadtest-Id: ");
                self.hdr.extend_from_slice(self.id.as_bytes());
                self.hdr.extend_from_slice(b"\r\n");
                if cfg.chunking && m.len() > INLINE_EML_BYTES {
                    external = Some(m);
                    parts = [&self.hdr, &[]];
                    &parts[..1]
                } else {
                    parts = [&self.hdr, m];
                    &parts
                }
            }
        };
        let external_len = external.map_or(0, <[u8]>::len);
        let size = body.iter().map(|p| p.len() as u64).sum::<u64>() + external_len as u64;
        let t = Transaction {
            sender: &cfg.from,
            recipients: &self.rcpts,
            body,
            size,
            eight_bit: false,
            smtputf8: false,
            wire: true,
            external: external_len,
        };
        self.cs
            .start_transaction(&t, Instant::now())
            .map(|_| external)
            .map_err(|e| ConnError::Protocol("transaction", e.to_string()))
    }

    /// Reads the events of the oldest transaction in flight up to its end. `t_data`: when its content went
    /// out (set at the 354 for DATA); `on_final` gets the final reply (latency, queue id).
    async fn replies(
        &mut self,
        s: &mut ClientConn,
        ctx: &ShardCtx,
        t_start: Instant,
        mut on_final: impl FnMut(&ShardCtx, Instant, Reply<'_>),
    ) -> Result<Replies, ConnError> {
        let cfg = &ctx.shared.cfg;
        let mut r = Replies::default();
        let mut t_data = t_start;
        let mut timed = false;
        loop {
            match next_event(s, &mut self.cs).await? {
                SmtpEvent::Mail { reply, .. } => {
                    r.note(reply.code);
                    r.mail = reply.code;
                }
                SmtpEvent::Rcpt { reply, .. } => {
                    r.note(reply.code);
                    r.rcpt_answered += 1;
                    r.last_rcpt = reply.code;
                    if reply.class() == 2 {
                        r.rcpt_ok += 1;
                    }
                    if r.rcpt_answered == cfg.rcpts {
                        record(&mut ctx.hists.borrow_mut().mail_rcpt, t_start.elapsed());
                        timed = true;
                    }
                }
                SmtpEvent::Data { reply, .. } => {
                    r.note(reply.code);
                    r.data = Some(reply.code);
                    if reply.code == 354 {
                        // The content goes out with the next write.
                        t_data = Instant::now();
                    }
                }
                SmtpEvent::DataDone { reply, .. } => {
                    r.note(reply.code);
                    r.done = Some(reply.code);
                    on_final(ctx, t_data, self.cs.reply(reply));
                }
                SmtpEvent::MessageDone { .. } => {
                    if !timed {
                        record(&mut ctx.hists.borrow_mut().mail_rcpt, t_start.elapsed());
                    }
                    return Ok(r);
                }
                SmtpEvent::Failed(e) => return Err(conn_error(e)),
                SmtpEvent::Closed => return Err(ConnError::Closed),
                _ => {}
            }
        }
    }

    /// `--chunking`: whole transactions (MAIL, RCPTs, `BDAT <n> LAST` and the message), up to `cfg.window` of
    /// them written (in one write) before the replies to the oldest are read. `pending` holds the claimed
    /// messages not yet answered, oldest first; the first `sent.len()` of them are on the wire. With
    /// --new-connection, the one message and QUIT go out in one write.
    async fn chunked(
        &mut self,
        s: &mut ClientConn,
        ctx: &ShardCtx,
        pending: &mut VecDeque<u64>,
    ) -> Result<Outcome, ConnError> {
        let shared = &ctx.shared;
        let cfg = &shared.cfg;
        let window = if cfg.new_connection {
            1
        } else {
            cfg.window.max(1)
        };
        // For each message on the wire: when it was written (the start of its transaction) and its --rate slot.
        let mut sent: VecDeque<(Instant, Option<Instant>)> = VecDeque::with_capacity(window);
        // Big --eml messages of the batch, written from the shared copy where the session asks, oldest first.
        let mut big: VecDeque<&[u8]> = VecDeque::with_capacity(window);
        let mut quit = false;
        loop {
            let mut batch = 0usize;
            let mut due = None;
            let t_batch = Instant::now();
            while !quit && sent.len() + batch < window {
                let k = sent.len() + batch;
                if k >= pending.len() {
                    match shared.claim() {
                        Some(n) => pending.push_back(n),
                        None => break,
                    }
                }
                let index = pending[k];
                // Open loop (--rate is only allowed with a window of 1, so nothing is in flight here).
                due = wait_due(cfg, index).await;
                big.extend(self.start(cfg, shared.nonce, index)?);
                batch += 1;
                if cfg.new_connection {
                    self.cs.quit(Instant::now());
                    quit = true;
                }
            }
            if batch > 0 {
                let t = if cfg.rate.is_some() {
                    Instant::now()
                } else {
                    t_batch
                };
                // The whole batch in one write (big --eml messages go in writes of their own).
                loop {
                    if let Some(bytes) = self.cs.poll_transmit() {
                        let n = bytes.len();
                        put(s, bytes).await?;
                        self.cs.advance_transmit(n, Instant::now());
                    } else if let Some(n) = self.cs.poll_external() {
                        let Some(m) = big.pop_front().filter(|m| m.len() == n) else {
                            return Err(ConnError::Protocol("BDAT", "content out of step".into()));
                        };
                        put(s, m).await?;
                        self.cs.external_written(Instant::now());
                    } else {
                        break;
                    }
                }
                sent.extend(std::iter::repeat_n((t, due), batch));
            }
            debug_assert!(sent.len() <= window && sent.len() <= pending.len());
            let Some((t_sent, due)) = sent.pop_front() else {
                break;
            };
            let index = pending[0];
            let record_ids = ctx.ids.borrow().enabled();
            // `self.id` names the newest message started; the oldest one's is made again if needed.
            let mut id = std::mem::take(&mut self.id);
            let r = self
                .replies(s, ctx, t_sent, |ctx, _, reply| {
                    ctx.data_latency(t_sent.elapsed());
                    if let Some(due) = due {
                        record(&mut ctx.hists.borrow_mut().scheduled_to_250, due.elapsed());
                    }
                    if reply.class() == 2 && record_ids {
                        smtp::message_id_token(&mut id, shared.nonce, index);
                        ctx.ids.borrow_mut().push(shared, &id, reply.queue_id());
                    }
                })
                .await;
            self.id = id;
            let r = r?;
            pending.pop_front();
            count_final(ctx, &r)?;
            if r.saw_421 {
                return Ok(Outcome::Closing);
            }
        }
        Ok(if quit {
            Outcome::QuitSent
        } else {
            Outcome::Done
        })
    }

    async fn transaction(
        &mut self,
        s: &mut ClientConn,
        ctx: &ShardCtx,
        index: u64,
    ) -> Result<Outcome, ConnError> {
        let shared = &ctx.shared;
        let cfg = &shared.cfg;
        let due = wait_due(cfg, index).await;
        // MAIL + RCPTs (+ DATA when pipelining), timed to the last RCPT reply.
        let t_mail = Instant::now();
        // DATA: no external content (it is only used with BDAT).
        self.start(cfg, shared.nonce, index)?;
        let id = std::mem::take(&mut self.id);
        let r = self
            .replies(s, ctx, t_mail, |ctx, t_data, reply| {
                ctx.data_latency(t_data.elapsed());
                if let Some(due) = due {
                    record(&mut ctx.hists.borrow_mut().scheduled_to_250, due.elapsed());
                }
                if reply.class() == 2 {
                    ctx.ids.borrow_mut().push(shared, &id, reply.queue_id());
                }
            })
            .await;
        self.id = id;
        let r = r?;
        count_final(ctx, &r)?;
        if r.saw_421 {
            return Ok(Outcome::Closing);
        }
        // MAIL accepted but no data phase: the transaction is still open.
        if r.mail / 100 == 2 && r.data != Some(354) && r.done.is_none() {
            self.cs
                .rset(Instant::now())
                .map_err(|e| ConnError::Protocol("RSET", e.to_string()))?;
            loop {
                match next_event(s, &mut self.cs).await? {
                    SmtpEvent::RsetDone { reply } if reply.code == 421 => {
                        return Ok(Outcome::Closing)
                    }
                    SmtpEvent::RsetDone { .. } => break,
                    SmtpEvent::Failed(e) => return Err(conn_error(e)),
                    SmtpEvent::Closed => return Err(ConnError::Closed),
                    _ => {}
                }
            }
        }
        Ok(Outcome::Done)
    }
}
