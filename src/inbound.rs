//! Inbound SMTP on one shard: accepting connections, connection limits, the read-feed-write loop around each
//! [`Session`], and handing each finished message to the queue (the 250 goes out only after the group commit
//! that covers it). Session tasks run inside the shard's [`Gate`], so a drain waits for them to end instead of
//! polling.

use std::cell::Cell;
use std::io;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_lite::AsyncReadExt;
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::Gate;

use crate::buffers::{BufferPool, DataBudget};
use crate::config::ListenerKind;
use crate::dkim;
use crate::eventlog::{self, QUEUE, SMTPD};
use crate::limits;
use crate::net::ServerConn;
use crate::policy::RecipientCheck;
use crate::queue::{Envelope, QueueError};
use crate::reloadable::{Settings, SettingsView};
use crate::sessions::{Refusal, SessionGuard, SessionLimits, SessionTable};
use crate::shard::stats::ShardStats;
use crate::shard::Shard;
use crate::smtp::reply::{self, Reply};
use crate::smtp::session::{Action, Session};

/// One shard's inbound side: its sessions, their read buffers and data budget, the spare descriptor.
pub struct Inbound {
    shard: Rc<Shard>,
    draining: Cell<bool>,
    /// Open sessions: limits, deadlines, stress.
    sessions: Rc<SessionTable>,
    /// Every session task holds a pass; the drain closes the gate and waits for them.
    gate: Gate,
    /// Session read buffers (at most limits::SESSION_READ_BUFFERS_FREE_MAX kept for reuse).
    read_buffers: BufferPool,
    /// Bytes of unfinished messages this shard may hold in memory.
    data_budget: DataBudget,
    /// The verdict on each RCPT (relay policy, local users, aliases), through this shard's view of the tables.
    rcpt_check: RecipientCheck,
    /// This shard's view of the reloadable settings; each session keeps the snapshot it started with.
    settings: SettingsView,
    /// A descriptor kept open for the moment the process runs out of them: closed to accept one connection and
    /// tell it 421, then reopened (so EMFILE never stops the listeners).
    spare_fd: Cell<Option<std::fs::File>>,
}

impl Inbound {
    pub fn new(shard: Rc<Shard>) -> Rc<Inbound> {
        let cfg = &shard.shared.cfg;
        Rc::new(Inbound {
            draining: Cell::new(false),
            sessions: SessionTable::new(SessionLimits::from_config(cfg)),
            gate: Gate::new(),
            read_buffers: BufferPool::new(
                limits::SESSION_READ_BUFFER_BYTES.max(2 * cfg.line_length_limit + 16 * 1024),
                limits::SESSION_READ_BUFFERS_FREE_MAX,
            ),
            data_budget: DataBudget::new(cfg.smtpd_data_memory_limit),
            rcpt_check: RecipientCheck::new(
                shard.shared.live.snapshot().policy.clone(),
                shard.shared.recipients.clone(),
            ),
            settings: SettingsView::new(shard.shared.live.clone()),
            spare_fd: Cell::new(std::fs::File::open("/dev/null").ok()),
            shard,
        })
    }

    /// Accepts on `listeners` (index into the configured listeners, socket) until `stop` is closed.
    pub fn start_accepting(
        self: &Rc<Self>,
        listeners: Vec<(usize, Rc<TcpListener>)>,
    ) -> (
        glommio::channels::local_channel::LocalSender<()>,
        Vec<glommio::task::JoinHandle<()>>,
    ) {
        // Each accept loop races its accept against this channel; dropping the sender stops it.
        let (stop, stop_rx) = glommio::channels::local_channel::new_bounded::<()>(1);
        let stop_rx = Rc::new(stop_rx);
        let tasks = listeners
            .into_iter()
            .map(|(idx, l)| {
                glommio::spawn_local(accept_loop(self.clone(), l, idx, stop_rx.clone())).detach()
            })
            .collect();
        (stop, tasks)
    }

    /// Each tick: ends sessions past their deadlines.
    pub fn reap(&self, now: Instant) {
        self.sessions.reap(now);
    }

    /// Drain: no more accepts (the caller has stopped the accept loops), sessions get `timeout` to finish;
    /// then their reads are ended (each answers 421 4.3.2 and closes) and they get a little longer. The gate
    /// is closed in a task of its own, which lives until the last session has left.
    pub async fn drain(&self, timeout: Duration) {
        self.draining.set(true);
        let (done_tx, done_rx) = glommio::channels::local_channel::new_bounded::<()>(1);
        let gate = self.gate.clone();
        glommio::spawn_local(async move {
            let _ = gate.close().await;
            drop(done_tx);
        })
        .detach();
        // The receiver sees the sender dropped (None) once the gate has closed.
        let done = Rc::new(done_rx);
        let closed_within = |d: Duration| {
            let done = done.clone();
            futures_lite::future::or(
                async move {
                    let _ = done.recv().await;
                    true
                },
                async move {
                    glommio::timer::sleep(d).await;
                    false
                },
            )
        };
        if closed_within(timeout).await {
            return;
        }
        self.sessions.shut_all_reads();
        if closed_within(limits::SHARD_DRAIN_AFTER_SHUT_READS).await {
            return;
        }
        // Sessions stuck in a write to a client that does not read: both directions end now, every session's
        // next I/O fails, and the gate's last pass is released. Waiting for that to the end (not dropping the
        // gate's close half-way) keeps the gate's closing notification from firing into nothing.
        tracing::warn!(
            target: SMTPD,
            "shard {}: closing {} session(s) that did not end after the drain",
            self.shard.id,
            self.sessions.len()
        );
        self.sessions.shut_all_connections();
        let _ = done.recv().await;
    }

    pub fn sessions_timed_out(&self) -> u64 {
        self.sessions.reaped()
    }

    pub fn data_bytes_held(&self) -> u64 {
        self.data_budget.used()
    }

    /// After a burst of large messages has ended (much released, little held), hands the freed heap memory
    /// back to the system (`malloc_trim`, on a helper thread): buffers below the mmap threshold stay in the
    /// heap otherwise, and the heap is not trimmed on every free (that cost 15% of relay CPU).
    pub async fn give_back_memory(&self) {
        let used = self.data_budget.used();
        let peak = self.data_budget.take_peak();
        let burst = limits::SHARD_GIVE_BACK_AFTER_BYTES.min(self.data_budget.limit() / 4);
        if peak.saturating_sub(used) >= burst && used < self.data_budget.limit() / 4 {
            // SAFETY: malloc_trim only releases free heap memory; it has no preconditions.
            glommio::executor()
                .spawn_blocking(|| unsafe { libc::malloc_trim(0) })
                .await;
        }
    }
}

async fn accept_loop(
    inb: Rc<Inbound>,
    listener: Rc<TcpListener>,
    idx: usize,
    stop: Rc<glommio::channels::local_channel::LocalReceiver<()>>,
) {
    let shard = &inb.shard;
    loop {
        let Some(accepted) = crate::net::accept_or_stop(&listener, &stop).await else {
            return;
        };
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                if inb.draining.get() || shard.shared.shutdown.load(Ordering::Relaxed) {
                    return;
                }
                if is_fd_exhaustion(&e) {
                    inb.refuse_one_without_fds(&listener).await;
                    continue;
                }
                // Other accept errors: back off briefly instead of spinning.
                tracing::error!(target: SMTPD, "shard {}: accept: {e}", shard.id);
                glommio::timer::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if inb.draining.get() {
            return;
        }
        let task = {
            let inb = inb.clone();
            async move {
                let shard = &inb.shard;
                if let Err(e) = serve_connection(&inb, stream, peer.ip(), idx).await {
                    if e.kind() != io::ErrorKind::TimedOut
                        && e.kind() != io::ErrorKind::ConnectionReset
                        && e.kind() != io::ErrorKind::BrokenPipe
                        && e.kind() != io::ErrorKind::UnexpectedEof
                    {
                        tracing::warn!(target: SMTPD, "shard {}: session: {e}", shard.id);
                    }
                }
            }
        };
        // A closed gate means the shard is draining: the connection is dropped unanswered, as after the
        // listener closes.
        if let Ok(t) = inb.gate.spawn(task) {
            t.detach();
        }
    }
}

/// EMFILE/ENFILE: the process (or the system) is out of file descriptors.
fn is_fd_exhaustion(e: &glommio::GlommioError<()>) -> bool {
    let os = match e {
        glommio::GlommioError::IoError(e) => e.raw_os_error(),
        glommio::GlommioError::EnhancedIoError { source, .. } => source.raw_os_error(),
        _ => None,
    };
    matches!(os, Some(libc::EMFILE) | Some(libc::ENFILE))
}

impl Inbound {
    /// Out of descriptors: gives the spare one back, accepts one waiting connection, tells it 421 and closes
    /// it, then takes the spare again. Clients are refused politely and the listener keeps working.
    async fn refuse_one_without_fds(&self, listener: &TcpListener) {
        static LOGGED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        if LOGGED.fetch_add(1, Ordering::Relaxed).is_multiple_of(1000) {
            tracing::error!(
                target: SMTPD,
                "shard {}: out of file descriptors: refusing connections with 421 (raise LimitNOFILE / ulimit -n, or lower smtpd_connection_limit)",
                self.shard.id
            );
        }
        drop(self.spare_fd.take());
        let r = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            glommio::timer::sleep(Duration::from_millis(10)).await;
            None
        })
        .await;
        if let Some(Ok(stream)) = r {
            let mut conn = Conn::Plain(stream);
            let mut out = Vec::with_capacity(64);
            reply::TOO_MANY_CONNECTIONS.write_to(&mut out);
            let _ = conn.send_and_close(&mut out).await;
        }
        let spare = std::fs::File::open("/dev/null").ok();
        let none_to_spare = spare.is_none();
        self.spare_fd.set(spare);
        if none_to_spare {
            // Still none to spare: do not spin on the listener.
            glommio::timer::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A session's connection.
type Conn = ServerConn;

async fn serve_connection(
    inb: &Inbound,
    stream: TcpStream,
    ip: std::net::IpAddr,
    listener: usize,
) -> io::Result<()> {
    let shard = &inb.shard;
    let cfg = &shard.shared.cfg;
    eventlog::connect(ip);
    let fd = stream.as_raw_fd();
    // The reloadable settings as they are now: this session's for its whole life.
    let settings = inb.settings.get();
    let listener_cfg = settings.listeners[listener].clone();
    let tls_listener = listener_cfg.kind == ListenerKind::Submissions;
    let mut conn = Conn::Plain(stream);
    let mut out = Vec::with_capacity(1024);
    // Limits are checked before anything else, a TLS handshake included: a half-open connection holds a slot.
    let now = Instant::now();
    let trusted = settings.policy.in_mynetworks(ip);
    let guard = match inb.sessions.admit(ip, fd, trusted, now) {
        Ok(g) => g,
        Err(refusal) => {
            shard.stats.sessions_refused.fetch_add(1, Ordering::Relaxed);
            shard
                .stats
                .rejected_one(crate::smtp::reply::Rejection::Limits);
            let r = match refusal {
                Refusal::Busy => reply::TOO_MANY_CONNECTIONS,
                Refusal::TooManyFromClient => reply::TOO_MANY_CONNECTIONS_FROM_YOU,
            };
            eventlog::reject(&eventlog::Rejection {
                stage: "CONNECT",
                client: ip,
                reply: &r,
                sender: None,
                rcpt: None,
                proto: "SMTP",
                helo: None,
            });
            let none = crate::smtp::session::CommandCounts::default();
            eventlog::disconnect(ip, &none, 0, 0);
            if tls_listener {
                // No plaintext reply is possible before TLS: just close.
                return Ok(());
            }
            r.write_to(&mut out);
            return conn.send_and_close(&mut out).await;
        }
    };
    if let Conn::Plain(tcp) = &conn {
        // TCP_NODELAY comes from the listener (privileges::bind_listener).
        // A backstop per read and write; the request deadlines are the reaper's (see sessions).
        tcp.set_read_timeout(Some(cfg.smtpd_timeout.0))?;
        tcp.set_write_timeout(Some(cfg.smtpd_timeout.0))?;
    }
    shard.stats.sessions_open.fetch_add(1, Ordering::Relaxed);
    shard.stats.sessions_total.fetch_add(1, Ordering::Relaxed);
    let _open = OpenCount(&shard.stats);
    let mut session = Session::new(listener_cfg, ip, trusted);
    session.budget_data();
    let r = async {
        if tls_listener {
            let Some(tls) = &settings.tls else {
                return Ok(());
            };
            guard.slot().handshake(now);
            let info = conn.accept_tls(tls).await.map(crate::tls::describe)?;
            session.tls_started(info);
        }
        guard.slot().request(Instant::now());
        session.greeting().write_to(&mut out);
        let mut inbuf = inb.read_buffers.take();
        let mut held = 0u64;
        let r = session_io(
            inb,
            &settings,
            &guard,
            &mut conn,
            &mut out,
            &mut session,
            &mut inbuf,
            &mut held,
        )
        .await;
        inb.data_budget.release(held);
        r
    }
    .await;
    shard.stats.add_rejections(session.take_rejections());
    // How the session ended: the client quit or was told to go (nothing more to say), or it went away, or it
    // ran out of time; a drain's 421 is the server's doing.
    if !session.is_closed() {
        let timeout = guard.slot().expired()
            || r.as_ref()
                .is_err_and(|e| e.kind() == io::ErrorKind::TimedOut);
        if timeout || !inb.draining.get() {
            eventlog::lost_connection(ip, session.last_command(), timeout);
        }
    }
    let counts = session.end_counts();
    eventlog::disconnect(ip, counts, counts.accepted(), counts.total());
    r
}

/// Counts an open session in the shard's published counters for as long as it lives.
struct OpenCount<'a>(&'a ShardStats);

impl Drop for OpenCount<'_> {
    fn drop(&mut self) {
        self.0.sessions_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Before message content is taken (read, or already in the read buffer): makes room in the session's message
/// buffer, within the shard's data budget (waiting up to [`limits::SESSION_DATA_BUDGET_WAIT_MAX`] for room, else the message is
/// refused and its buffer freed), and lets the session take as much content as that room holds. Returns the
/// most bytes the read may take (content can at most double when bare line ends become CRLF).
async fn data_room(inb: &Inbound, session: &mut Session, held: &mut u64, read_max: usize) -> usize {
    let shard = &inb.shard;
    if !session.receiving_data() || session.storage_refused() {
        return read_max;
    }
    let (len, cap) = (session.data_len(), session.data_capacity());
    if cap - len < limits::SESSION_DATA_GROW_BYTES_MIN {
        let step = cap.clamp(
            limits::SESSION_DATA_GROW_BYTES_MIN,
            limits::SESSION_DATA_GROW_BYTES_MAX,
        );
        let limit = session.message_size_limit() as usize + limits::SESSION_DATA_GROW_BYTES_MIN;
        let target = (len + step).min(limit.max(len + limits::SESSION_DATA_GROW_BYTES_MIN));
        let grow = (target - cap) as u64;
        if inb
            .data_budget
            .take(grow, limits::SESSION_DATA_BUDGET_WAIT_MAX)
            .await
        {
            session.reserve_data(target - len);
            *held += grow;
        } else {
            shard
                .stats
                .messages_refused_memory
                .fetch_add(1, Ordering::Relaxed);
            session.refuse_storage();
            return read_max;
        }
    }
    let allowance = (session.data_capacity() - session.data_len())
        .saturating_sub(limits::SESSION_DATA_ROOM_SLACK_BYTES)
        / 2;
    session.set_data_allowance(allowance);
    allowance.clamp(1, read_max.max(1))
}

/// Keeps the budget's count equal to what the session's message buffer holds.
fn settle_budget(inb: &Inbound, session: &Session, held: &mut u64) {
    let cap = session.data_capacity() as u64;
    if cap < *held {
        inb.data_budget.release(*held - cap);
    } else if cap > *held {
        inb.data_budget.force_take(cap - *held);
    }
    *held = cap;
}

/// The read-feed-write loop of one session; `inbuf` is the shard's reusable read buffer, `held` the bytes of
/// the shard's data budget this session's message buffer holds.
#[allow(clippy::too_many_arguments)]
async fn session_io(
    inb: &Inbound,
    settings: &Settings,
    guard: &SessionGuard,
    conn: &mut Conn,
    out: &mut Vec<u8>,
    session: &mut Session,
    inbuf: &mut [u8],
    held: &mut u64,
) -> io::Result<()> {
    let shard = &inb.shard;
    let slot = guard.slot();
    let limits = inb.sessions.limits();
    let (mut start, mut end) = (0usize, 0usize);
    loop {
        let (n, action) = session.feed(&inbuf[start..end], out);
        start += n;
        debug_assert!(start <= end);
        match action {
            Action::NeedMore => {
                shard.stats.add_rejections(session.take_rejections());
                conn.send(out).await?;
                if start == end {
                    (start, end) = (0, 0);
                } else if start > 0 {
                    inbuf.copy_within(start..end, 0);
                    (start, end) = (0, end - start);
                }
                debug_assert!(end < inbuf.len(), "session keeps at most one partial line");
                settle_budget(inb, session, held);
                let now = Instant::now();
                if session.receiving_data() {
                    slot.data(now);
                } else if end == 0 && !session.skipping_line() {
                    // A new request (an overlong line being dropped is still the same one).
                    slot.request(now);
                }
                let room = data_room(inb, session, held, inbuf.len() - end).await;
                if session.receiving_data() && end > 0 {
                    // Content read with the command before it (pipelined) waited for that room: take it
                    // before reading more.
                    settle_budget(inb, session, held);
                    continue;
                }
                let got = match conn.read(&mut inbuf[end..end + room]).await {
                    Ok(0) => {
                        if slot.expired() {
                            reply::TIMEOUT.write_to(out);
                            let _ = conn.send_and_close(out).await;
                        } else if inb.draining.get() {
                            reply::SHUTTING_DOWN.write_to(out);
                            let _ = conn.send_and_close(out).await;
                        }
                        return Ok(());
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::TimedOut || slot.expired() => {
                        reply::TIMEOUT.write_to(out);
                        let _ = conn.send_and_close(out).await;
                        return Err(io::Error::new(io::ErrorKind::TimedOut, e));
                    }
                    Err(e) => return Err(e),
                };
                // The clock matters after a read only when each read restarts the timeout.
                let after = if limits.per_request_deadline {
                    now
                } else {
                    Instant::now()
                };
                slot.received(got, after, limits);
                end += got;
            }
            Action::Message => {
                slot.busy();
                let data_end = Instant::now();
                let outcome = enqueue(inb, settings, session).await;
                // Waiting for the client again: for it to take the reply, then for its next command.
                slot.request(Instant::now());
                let a = match outcome {
                    Ok(id) => {
                        shard.stats.data_to_250.observe(data_end.elapsed());
                        shard
                            .stats
                            .messages_accepted
                            .fetch_add(1, Ordering::Relaxed);
                        session.message_done(Ok(&id.to_string()), out)
                    }
                    Err(r) => {
                        shard.stats.messages_refused.fetch_add(1, Ordering::Relaxed);
                        session.message_done(Err(r), out)
                    }
                };
                if a == Action::Close {
                    return conn.send_and_close(out).await;
                }
            }
            Action::StartTls => {
                conn.send(out).await?;
                // Plaintext read past STARTTLS is dropped (CVE-2011-0411 class of command injection).
                (start, end) = (0, 0);
                let Some(tls) = &settings.tls else {
                    return Ok(());
                };
                slot.handshake(Instant::now());
                let info = conn.accept_tls(tls).await.map(crate::tls::describe)?;
                session.tls_started(info);
            }
            Action::Recipient(req) => {
                let verdict =
                    inb.rcpt_check
                        .check_classified(&settings.policy, req, session.targets_mut());
                let verdict = verdict.map(|(address, disposition)| {
                    if disposition == crate::policy::Disposition::Local {
                        session.local_recipient_accepted();
                    }
                    address
                });
                if session.rcpt_result(verdict, out) == Action::Close {
                    return conn.send_and_close(out).await;
                }
            }
            Action::Authenticate { user, password } => {
                let ip = session.client_ip();
                let guard_auth = &shard.shared.auth_guard;
                if guard_auth.begin_check(ip, Instant::now()).is_err() {
                    // Locked out (or as many checks running as may still fail): the credentials are not
                    // even looked at.
                    if session.auth_locked(out) == Action::Close {
                        return conn.send_and_close(out).await;
                    }
                    continue;
                }
                let verified = match &settings.users {
                    Some(db) => {
                        let db = db.clone();
                        let u = user.clone();
                        glommio::executor()
                            .spawn_blocking(move || db.verify(&u, &password))
                            .await
                    }
                    None => false,
                };
                let delay = guard_auth.check_done(ip, verified, Instant::now());
                if !verified {
                    // Slow down guessing: the delay grows with the address's failures, over all sessions.
                    shard.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
                    glommio::timer::sleep(delay).await;
                }
                if session.auth_result(verified.then_some(user), out) == Action::Close {
                    return conn.send_and_close(out).await;
                }
            }
            Action::AuthFailed => {
                let delay = shard
                    .shared
                    .auth_guard
                    .failure(session.client_ip(), Instant::now());
                shard.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
                glommio::timer::sleep(delay).await;
            }
            Action::Close => {
                let _ = conn.send_and_close(out).await;
                return Ok(());
            }
        }
    }
}

/// Appends the finished message to the shard's queue and waits for the group commit that makes it durable.
async fn enqueue(
    inb: &Inbound,
    settings: &Settings,
    session: &Session,
) -> Result<crate::queue::QueueId, Reply> {
    let shard = &inb.shard;
    let txn = session.transaction();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let id = shard.queue.store().allocate_id();
    let received = session.received_header(&id.to_string(), now.as_secs());
    // The egress pool header: removed from every message before signing and storing, honoured only from a
    // trusted client (mynetworks, AUTH). A copy of the data only when the header is there.
    let (stripped, pool_header) = match settings.cfg.egress_pool_header.as_deref() {
        Some(name) => match crate::egress::strip_header(&txn.data, name) {
            Some((data, value)) => (Some(data), session.may_relay().then_some(value)),
            None => (None, None),
        },
        None => (None, None),
    };
    let data: &[u8] = stripped.as_deref().unwrap_or(&txn.data);
    let egress_pool = if settings.cfg.egress_pool.is_empty() {
        None
    } else {
        crate::egress::pool_for_message(&settings.cfg, None, pool_header.as_deref(), &txn.sender)
    };
    // Signed here, once: the DKIM-Signature fields are stored in front of the Received header (the record's
    // trace headers), and every delivery sends them with the data unchanged.
    let origin = if settings.dkim.is_empty() || session.may_relay() {
        // (Without keys nothing is signed whatever the origin: no need to look at the recipients.)
        dkim::Origin::Trusted
    } else {
        // Relayed only if no RCPT named a local domain: mail to a local address that an alias forwards
        // elsewhere is still mail to us, never signed for an outsider.
        dkim::Origin::Outsider {
            all_relayed: !txn.local_rcpt
                && txn
                    .recipients
                    .iter()
                    .all(|t| matches!(t, crate::local::recipients::Target::Remote(_))),
        }
    };
    let received = dkim::trace_headers(
        &settings.dkim,
        origin,
        settings.cfg.dkim_sign_relayed,
        data,
        now.as_secs(),
        received,
    )
    .await;
    let env = Envelope {
        egress_pool,
        sender: txn.sender.clone(),
        recipients: txn
            .recipients
            .iter()
            .map(|t| t.address().to_string())
            .collect(),
        arrival_unix_ms: now.as_millis() as u64,
        client_addr: session.client_ip().to_string(),
        client_helo: session.helo_name().to_string(),
        tls: session.tls_info().unwrap_or("").to_string(),
        auth_user: session.auth_user().unwrap_or("").to_string(),
        smtputf8: txn.smtputf8,
        body_8bitmime: txn.body_8bitmime,
        dsn: txn.envelope_dsn(),
    };
    // Through the ShardQueue: a segment that must be created first is created on the blocking pool.
    let ticket = shard
        .queue
        .append_message(id, &env, &received, data)
        .await
        .map_err(|e| queue_error_reply(&e, session.message_size_limit()))?;
    match shard.queue.durable(ticket).await {
        Ok(()) => {
            eventlog::received(&eventlog::Reception {
                queue_id: id,
                client: session.client_ip(),
                helo: session.helo_name(),
                proto: session.protocol(),
                sender: &txn.sender,
                size: (received.len() + data.len()) as u64,
                nrcpt: env.recipients.len(),
                message_id: eventlog::message_id(data),
                tls: session.tls_info(),
                sasl_method: session.auth_mechanism(),
                sasl_username: session.auth_user(),
            });
            shard.dispatcher.submit(id);
            // NOTIFY=SUCCESS on an address expanded into several: one "expanded" report (RFC 3461 6.2.7.3).
            shard
                .dispatcher
                .queue_expanded_report(id, &env, &txn.expanded)
                .await;
            Ok(id)
        }
        Err(e) => Err(queue_error_reply(&e, session.message_size_limit())),
    }
}

fn queue_error_reply(e: &QueueError, limit: u64) -> Reply {
    match e {
        QueueError::TooLarge { .. } => Reply::message_too_big(limit),
        _ => {
            tracing::error!(target: QUEUE, "queue write failed: {e}");
            reply::QUEUE_WRITE_FAILED
        }
    }
}
