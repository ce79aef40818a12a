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
use glommio::{LocalExecutorBuilder, Placement};
use shardmta::net::ClientConn;

use crate::domains::Domains;

use crate::report::{record, Counters, ErrKind, Hists};
use crate::series::{self, Event};
use crate::smtp::{self, ParseError, ReplyReader};

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
    /// `--auth`: the whole `AUTH PLAIN ...\r\n` command.
    pub auth_cmd: Option<Vec<u8>>,
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

/// Messages up to this size are copied into one write with their header
/// and terminator; bigger ones are written from the shared copy.
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

/// Runs one shard on the current thread (pinned to `cpu` if given) until
/// its connections finish. Returns its histograms.
pub fn run_shard(
    shard: usize,
    cpu: Option<usize>,
    conn_ids: Vec<usize>,
    shared: Arc<Shared>,
) -> Result<Hists, String> {
    let placement = match cpu {
        Some(c) => Placement::Fixed(c),
        None => Placement::Unbound,
    };
    let ex = LocalExecutorBuilder::new(placement)
        .name(&format!("loadtest-{shard}"))
        // No file I/O here: keep locked (registered) memory small.
        .io_memory(64 * 1024)
        .make()
        .map_err(|e| {
            format!(
                "shard {shard}: cannot start glommio executor{}: {e} \
                 (glommio needs io_uring and RLIMIT_MEMLOCK >= 512 KiB; check `ulimit -l`)",
                cpu.map(|c| format!(" on cpu {c}")).unwrap_or_default()
            )
        })?;
    let record_file = match &shared.record_file {
        Some(f) => Some(
            f.try_clone()
                .map_err(|e| format!("shard {shard}: --record-ids file: {e}"))?,
        ),
        None => None,
    };
    let ctx = Rc::new(ShardCtx {
        shared,
        hists: RefCell::new(Hists::new()?),
        ids: RefCell::new(IdRecorder {
            file: record_file,
            buf: Vec::new(),
            last_flush: Instant::now(),
        }),
        series: RefCell::new(series::Local::new(shard)?),
    });
    let run_ctx = ctx.clone();
    ex.run(async move {
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
    });
    ctx.ids.borrow_mut().flush(&ctx.shared);
    ctx.series.borrow_mut().finish(&ctx.shared.series);
    // Every task has finished, so this is the last reference.
    match Rc::try_unwrap(ctx) {
        Ok(c) => Ok(c.hists.into_inner()),
        Err(_) => Err(format!("shard {shard}: connection tasks outlived the run")),
    }
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

/// What the server's EHLO reply offers.
#[derive(Debug, Clone, Copy, Default)]
struct Ehlo {
    pipelining: bool,
    chunking: bool,
    starttls: bool,
    auth_plain: bool,
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

/// Appends the RCPT of recipient `r` (0-based) of message `index`: user<N>@<domain picked for N>.
fn push_rcpt_of(cmd: &mut Vec<u8>, cfg: &Config, index: u64, r: u64) {
    let n = index.saturating_mul(cfg.rcpts as u64) + r;
    smtp::push_rcpt(cmd, n, cfg.domains.pick(n));
}

/// Counts a transaction's final reply code by class.
fn count_final(ctx: &ShardCtx, final_code: u16) -> Result<(), ConnError> {
    let counters = &ctx.shared.counters;
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
    rr: ReplyReader,
    cmd: Vec<u8>,
    msg: Vec<u8>,
    id: String,
}

impl Conn {
    fn new(cfg: &Config) -> Self {
        Conn {
            rr: ReplyReader::new(smtp::MAX_REPLY + 4096),
            cmd: Vec::with_capacity(64 + cfg.rcpts * 64),
            msg: Vec::with_capacity(cfg.size + 512),
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
        self.rr.clear();
        let t0 = Instant::now();
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
        let head = self.fill_reply(&mut s).await?;
        let greeting = self.rr.take(head);
        if greeting.code != 220 {
            return Err(ConnError::Rejected(greeting.summary()));
        }
        record(&mut ctx.hists.borrow_mut().greeting, t1.elapsed());

        let mut ehlo = self.hello(&mut s, cfg).await?;
        if let Some(tls) = &cfg.tls {
            if !ehlo.starttls {
                return Err(ConnError::Rejected("server does not offer STARTTLS".into()));
            }
            put(&mut s, b"STARTTLS\r\n").await?;
            let code = self.read_code(&mut s).await?;
            if code != 220 {
                return Err(ConnError::Rejected(format!("STARTTLS: {code}")));
            }
            // Nothing may follow the 220 in plaintext (CVE-2011-0411 class).
            if self.rr.pending() > 0 {
                return Err(ConnError::Protocol(
                    "STARTTLS",
                    "plaintext bytes after the 220".into(),
                ));
            }
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
            ehlo = self.hello(&mut s, cfg).await?;
        }
        if let Some(cmd) = &cfg.auth_cmd {
            if !ehlo.auth_plain {
                return Err(ConnError::Rejected(
                    "server does not offer AUTH PLAIN".into(),
                ));
            }
            put(&mut s, cmd).await?;
            let code = self.read_code(&mut s).await?;
            if code != 235 {
                return Err(ConnError::Rejected(format!("AUTH PLAIN: {code}")));
            }
        }
        let pipelining = ehlo.pipelining && cfg.pipelining;
        if cfg.chunking {
            if !(ehlo.chunking && ehlo.pipelining) {
                return Err(ConnError::Rejected(
                    "--chunking: the server does not offer CHUNKING and PIPELINING".into(),
                ));
            }
            match self.chunked(&mut s, ctx, pending).await? {
                Outcome::Closing => return Ok(()),
                Outcome::QuitSent => {
                    let _ = self.read_code(&mut s).await;
                    Self::end(&s, cfg);
                    return Ok(());
                }
                Outcome::Done => {}
            }
        } else {
            while let Some(&index) = pending.front() {
                let outcome = self.transaction(&mut s, ctx, index, pipelining).await?;
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
        put(&mut s, b"QUIT\r\n").await?;
        // Best effort: the server may close without a 221.
        let _ = self.read_code(&mut s).await;
        Self::end(&s, cfg);
        Ok(())
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

    /// EHLO (or HELO if EHLO is refused); returns what the server offers.
    async fn hello(&mut self, s: &mut ClientConn, cfg: &Config) -> Result<Ehlo, ConnError> {
        self.cmd.clear();
        self.cmd.extend_from_slice(b"EHLO ");
        self.cmd.extend_from_slice(cfg.helo.as_bytes());
        self.cmd.extend_from_slice(b"\r\n");
        put(s, &self.cmd).await?;
        let head = self.fill_reply(s).await?;
        let r = self.rr.take(head);
        if r.code == 250 {
            return Ok(Ehlo {
                pipelining: r.has_extension("PIPELINING"),
                chunking: r.has_extension("CHUNKING"),
                starttls: r.has_extension("STARTTLS"),
                auth_plain: r.extension_has_param("AUTH", "PLAIN"),
            });
        }
        // Fall back to HELO (no extensions).
        self.cmd.clear();
        self.cmd.extend_from_slice(b"HELO ");
        self.cmd.extend_from_slice(cfg.helo.as_bytes());
        self.cmd.extend_from_slice(b"\r\n");
        put(s, &self.cmd).await?;
        let code = self.read_code(s).await?;
        if code != 250 {
            return Err(ConnError::Rejected(format!("HELO: {code}")));
        }
        Ok(Ehlo::default())
    }

    async fn read_code(&mut self, s: &mut ClientConn) -> Result<u16, ConnError> {
        let head = self.fill_reply(s).await?;
        Ok(self.rr.take(head).code)
    }

    /// Reads until a complete reply is buffered; does not consume it.
    async fn fill_reply(&mut self, s: &mut ClientConn) -> Result<smtp::ReplyHead, ConnError> {
        loop {
            if let Some(h) = self.rr.peek()? {
                return Ok(h);
            }
            let n = s.read(self.rr.spare()?).await?;
            if n == 0 {
                return Err(ConnError::Closed);
            }
            self.rr.filled(n);
        }
    }

    /// Puts message `index` (id in `self.id`) into `self.msg`: generated, or the --eml one after an
    /// `X-Loadtest-Id` header. An --eml message bigger than `INLINE_EML_BYTES` is not copied: `self.msg` then
    /// holds the header only and the message is returned, to be written from the shared copy. Generated
    /// messages have no line starting with '.', so their DATA and BDAT forms are the same.
    fn fill_msg<'c>(&mut self, cfg: &'c Config, index: u64) -> Option<&'c [u8]> {
        let Some(list) = &cfg.eml else {
            smtp::build_message(&mut self.msg, &self.id, &cfg.from, cfg.size);
            return None;
        };
        let n = list.len().max(1) as u64;
        let m = list.get((index % n) as usize).map_or(&[][..], |m| &m[..]);
        self.msg.clear();
        self.msg.extend_from_slice(b"X-Loadtest-Id: ");
        self.msg.extend_from_slice(self.id.as_bytes());
        self.msg.extend_from_slice(b"\r\n");
        if m.len() <= INLINE_EML_BYTES {
            self.msg.extend_from_slice(m);
            return None;
        }
        Some(m)
    }

    /// Appends message `index` in its BDAT form (`X-Loadtest-Id` header first for --eml ones) to `self.cmd`,
    /// or, for an --eml message bigger than `INLINE_EML_BYTES`, writes what is buffered and then the message.
    async fn push_chunked(
        &mut self,
        s: &mut ClientConn,
        cfg: &Config,
        nonce: u64,
        index: u64,
    ) -> Result<(), ConnError> {
        smtp::message_id_token(&mut self.id, nonce, index);
        smtp::push_mail(&mut self.cmd, &cfg.from);
        for r in 0..cfg.rcpts as u64 {
            push_rcpt_of(&mut self.cmd, cfg, index, r);
        }
        let big = self.fill_msg(cfg, index);
        let len = self.msg.len() + big.map_or(0, <[u8]>::len);
        // Writing to a Vec cannot fail.
        let _ = write!(self.cmd, "BDAT {len} LAST\r\n");
        self.cmd.extend_from_slice(&self.msg);
        if let Some(body) = big {
            put(s, &self.cmd).await?;
            self.cmd.clear();
            put(s, body).await?;
        }
        Ok(())
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
        let mut quit = false;
        loop {
            self.cmd.clear();
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
                self.push_chunked(s, cfg, shared.nonce, index).await?;
                batch += 1;
                if cfg.new_connection {
                    self.cmd.extend_from_slice(b"QUIT\r\n");
                    quit = true;
                }
            }
            if batch > 0 {
                let t = if cfg.rate.is_some() {
                    Instant::now()
                } else {
                    t_batch
                };
                if !self.cmd.is_empty() {
                    put(s, &self.cmd).await?;
                }
                sent.extend(std::iter::repeat_n((t, due), batch));
            }
            debug_assert!(sent.len() <= window && sent.len() <= pending.len());
            let Some((t_sent, due)) = sent.pop_front() else {
                break;
            };
            let index = pending[0];
            let mail = self.read_code(s).await?;
            let mut saw_421 = mail == 421;
            let (mut rcpt_ok, mut last_rcpt) = (0usize, 0u16);
            for _ in 0..cfg.rcpts {
                let c = self.read_code(s).await?;
                saw_421 |= c == 421;
                last_rcpt = c;
                if c / 100 == 2 {
                    rcpt_ok += 1;
                }
            }
            record(&mut ctx.hists.borrow_mut().mail_rcpt, t_sent.elapsed());
            if mail / 100 == 2 && rcpt_ok < cfg.rcpts {
                shared
                    .counters
                    .rcpt_rejected
                    .fetch_add((cfg.rcpts - rcpt_ok) as u64, Relaxed);
            }
            let head = self.fill_reply(s).await?;
            ctx.data_latency(t_sent.elapsed());
            if let Some(due) = due {
                record(&mut ctx.hists.borrow_mut().scheduled_to_250, due.elapsed());
            }
            let reply = self.rr.take(head);
            saw_421 |= reply.code == 421;
            let final_code = if mail / 100 != 2 {
                mail
            } else if rcpt_ok == 0 {
                last_rcpt
            } else {
                if reply.class() == 2 && ctx.ids.borrow().enabled() {
                    smtp::message_id_token(&mut self.id, shared.nonce, index);
                    ctx.ids
                        .borrow_mut()
                        .push(shared, &self.id, reply.queue_id());
                }
                reply.code
            };
            pending.pop_front();
            count_final(ctx, final_code)?;
            if saw_421 {
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
        pipelining: bool,
    ) -> Result<Outcome, ConnError> {
        let shared = &ctx.shared;
        let cfg = &shared.cfg;
        let counters = &shared.counters;
        smtp::message_id_token(&mut self.id, shared.nonce, index);
        let mut saw_421 = false;
        let due = wait_due(cfg, index).await;

        // MAIL + RCPTs (+ DATA when pipelining), timed to the last RCPT reply.
        let t_mail = Instant::now();
        self.cmd.clear();
        smtp::push_mail(&mut self.cmd, &cfg.from);
        if pipelining {
            for r in 0..cfg.rcpts as u64 {
                push_rcpt_of(&mut self.cmd, cfg, index, r);
            }
            self.cmd.extend_from_slice(b"DATA\r\n");
        }
        put(s, &self.cmd).await?;
        let mail_code = self.read_code(s).await?;
        saw_421 |= mail_code == 421;
        let mail_ok = mail_code / 100 == 2;
        let mut rcpt_ok = 0usize;
        let mut rcpt_answered = 0usize;
        let mut last_rcpt_code = 0u16;
        for r in 0..cfg.rcpts as u64 {
            if !pipelining {
                if !mail_ok || saw_421 {
                    break;
                }
                self.cmd.clear();
                push_rcpt_of(&mut self.cmd, cfg, index, r);
                put(s, &self.cmd).await?;
            }
            let c = self.read_code(s).await?;
            saw_421 |= c == 421;
            rcpt_answered += 1;
            last_rcpt_code = c;
            if c / 100 == 2 {
                rcpt_ok += 1;
            }
        }
        record(&mut ctx.hists.borrow_mut().mail_rcpt, t_mail.elapsed());
        if mail_ok && rcpt_answered > rcpt_ok {
            counters
                .rcpt_rejected
                .fetch_add((rcpt_answered - rcpt_ok) as u64, Relaxed);
        }

        let early_fail = if !mail_ok {
            Some(mail_code)
        } else if rcpt_ok == 0 {
            Some(last_rcpt_code)
        } else {
            None
        };
        // Without pipelining, DATA is only sent when it can succeed.
        let data_code = if pipelining {
            Some(self.read_code(s).await?)
        } else if early_fail.is_none() && !saw_421 {
            put(s, b"DATA\r\n").await?;
            Some(self.read_code(s).await?)
        } else {
            None
        };
        saw_421 |= data_code == Some(421);

        let final_code = match (early_fail, data_code) {
            (Some(fail), Some(354)) => {
                // Server wants data despite the failure: end it empty.
                put(s, b".\r\n").await?;
                self.read_code(s).await?;
                fail
            }
            (Some(fail), _) => fail,
            (None, Some(354)) => {
                // A big --eml message is written from the shared copy.
                let big = self.fill_msg(cfg, index);
                let t_data = if let Some(body) = big {
                    put(s, &self.msg).await?;
                    put(s, body).await?;
                    let t = Instant::now();
                    put(s, b".\r\n").await?;
                    t
                } else if pipelining {
                    self.msg.extend_from_slice(b".\r\n");
                    let t = Instant::now();
                    put(s, &self.msg).await?;
                    t
                } else {
                    put(s, &self.msg).await?;
                    let t = Instant::now();
                    put(s, b".\r\n").await?;
                    t
                };
                let head = self.fill_reply(s).await?;
                ctx.data_latency(t_data.elapsed());
                if let Some(due) = due {
                    record(&mut ctx.hists.borrow_mut().scheduled_to_250, due.elapsed());
                }
                let reply = self.rr.take(head);
                if reply.class() == 2 {
                    ctx.ids
                        .borrow_mut()
                        .push(shared, &self.id, reply.queue_id());
                }
                saw_421 |= reply.code == 421;
                reply.code
            }
            (None, Some(code)) => code,
            // Only reachable when a RCPT said 421 without pipelining.
            (None, None) => 421,
        };

        count_final(ctx, final_code)?;
        if saw_421 {
            return Ok(Outcome::Closing);
        }
        // MAIL accepted but no data phase: the transaction is still open.
        if mail_ok && data_code != Some(354) {
            put(s, b"RSET\r\n").await?;
            if self.read_code(s).await? == 421 {
                return Ok(Outcome::Closing);
            }
        }
        Ok(Outcome::Done)
    }
}
