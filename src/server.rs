//! The running relay: one glommio executor per shard (pinned to a core), SO_REUSEPORT listeners on every shard,
//! the I/O around each SMTP session, connection limits, and graceful shutdown.
//!
//! Each shard owns its listeners' sockets, its sessions and its [`ShardQueue`]; shards share only read-only
//! configuration and per-shard counters that only their owner writes. A session's finished message is appended to
//! the shard's queue and the 250 is written only after `ShardQueue::durable` confirms the group commit covering it.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_lite::AsyncReadExt;
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};

use crate::anvil::AuthGuard;
use crate::auth::UserDb;
use crate::buffers::{BufferPool, DataBudget};
use crate::config::{Config, ListenerKind};
use crate::delivery::agent::Agent;
use crate::delivery::dispatcher::Dispatcher;
use crate::delivery::log::DeliveryLog;
use crate::delivery::route::Router;
use crate::delivery::{Job, Outcome, ShardMsg};
use crate::dns::MxResolver;
use crate::local::recipients::RecipientTable;
use crate::local::shard::{LocalDelivery, LocalStats};
use crate::net::ServerConn;
use crate::policy::RelayPolicy;
use crate::privileges::{self, MailOwner, PrivilegeError};
use crate::queue::{Envelope, QueueError, QueueStore, ShardQueue};
use crate::sessions::{Refusal, SessionGuard, SessionLimits, SessionTable};
use crate::smtp::reply::{self, Reply};
use crate::smtp::session::{Action, Session, SessionConfig};
use crate::spool::Dir;

type Mesh =
    glommio::channels::channel_mesh::MeshBuilder<ShardMsg, glommio::channels::channel_mesh::Full>;
/// Capacity of each shard-to-shard channel (jobs and outcomes); a full channel makes the sender wait.
const MESH_CHANNEL_CAPACITY: usize = 4096;

/// Smallest locked-memory limit glommio's io_uring rings start with.
const MEMLOCK_MIN_BYTES: u64 = 512 * 1024;
/// Session read buffers kept for reuse per shard (64 KiB each: at most 16 MiB idle).
const READ_BUFFERS_FREE_MAX: usize = 256;
/// Read buffer per session; must hold at least one command line (asserted at start).
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// How often a shard looks at the shutdown flag, publishes counters and runs queue housekeeping.
const TICK: Duration = Duration::from_millis(100);
const HOUSEKEEPING_EVERY_TICKS: u32 = 50;
/// Helper threads per shard for blocking work (fdatasync, segment creation, password checks).
const BLOCKING_THREADS_PER_SHARD: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("locked memory limit (RLIMIT_MEMLOCK) is {have} bytes; glommio's io_uring needs at least {need}. Raise it: `ulimit -l 8192` in the shell, LimitMEMLOCK=8M in a systemd unit, or `* - memlock 8192` in /etc/security/limits.conf")]
    MemLock { have: u64, need: u64 },
    #[error("cannot start shard {shard}: {message}. io_uring must be available (Linux >= 5.8, not disabled by kernel.io_uring_disabled or a seccomp profile) and RLIMIT_MEMLOCK large enough (ulimit -l 8192)")]
    Executor { shard: usize, message: String },
    #[error("cannot listen on {address}: {source}{}", bind_hint(source))]
    Bind {
        address: std::net::SocketAddr,
        source: io::Error,
    },
    #[error("{0}")]
    Privileges(#[from] PrivilegeError),
    #[error("shard {shard}: queue: {source}")]
    Queue { shard: usize, source: QueueError },
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("AUTH: {0}")]
    Auth(#[from] crate::auth::AuthError),
    #[error("signal handling: {0}")]
    Signal(io::Error),
    #[error("local recipient tables: {0}")]
    Recipients(#[from] crate::local::recipients::TableError),
    #[error("a shard failed (see the lines above); the queue is intact, restart the server")]
    ShardFailed,
}

/// Counters one shard publishes (written only by that shard; read by the stats writer).
#[derive(Debug, Default)]
pub struct ShardStats {
    pub sessions_total: AtomicU64,
    pub sessions_open: AtomicU64,
    pub messages_accepted: AtomicU64,
    pub messages_refused: AtomicU64,
    /// Connections refused at accept (connection limits).
    pub sessions_refused: AtomicU64,
    /// Sessions ended by their deadline.
    pub sessions_timed_out: AtomicU64,
    /// Messages refused (452 4.3.1) because the shard's data budget had no room.
    pub messages_refused_memory: AtomicU64,
    /// Failed and malformed AUTH attempts.
    pub auth_failures: AtomicU64,
    /// Bytes of unfinished messages held now.
    pub data_bytes_held: AtomicU64,
    pub queue_syncs: AtomicU64,
    pub pending_messages: AtomicU64,
    /// 1 while this shard's delivery is paused because the queue cannot record outcomes.
    pub delivery_paused: AtomicU64,
    /// Outcomes waiting to be recorded, and pauses since start.
    pub outcomes_unrecorded: AtomicU64,
    pub delivery_pauses: AtomicU64,
}

/// Read-only state shared by all shards.
struct Shared {
    cfg: Arc<Config>,
    listeners: Vec<Arc<SessionConfig>>,
    tls: Option<Arc<rustls::ServerConfig>>,
    users: Option<Arc<UserDb>>,
    shutdown: Arc<AtomicBool>,
    stats: Vec<Arc<ShardStats>>,
    recipients: Arc<RecipientTable>,
    local_stats: Arc<LocalStats>,
    policy: Arc<RelayPolicy>,
    /// AUTH failures per client address, over all shards.
    auth_guard: Arc<AuthGuard>,
}

/// What to do about a listener that cannot be bound.
fn bind_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EADDRINUSE) => {
            " (another server, e.g. Postfix, already listens there: stop it or give the [[listener]] another address)"
        }
        Some(libc::EADDRNOTAVAIL) => " (that address is not on this host: use one of its own)",
        Some(libc::EACCES) => " (ports below 1024 need the server to start as root; set mail_owner to drop privileges after)",
        _ => "",
    }
}

fn check_memlock() -> Result<(), ServerError> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid rlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return Ok(()); // cannot tell; glommio will report
    }
    if lim.rlim_cur >= MEMLOCK_MIN_BYTES {
        return Ok(());
    }
    // Try to raise the soft limit up to the hard limit (works as root or when the hard limit allows).
    let want = (8 << 20).min(lim.rlim_max);
    if want >= MEMLOCK_MIN_BYTES {
        let new = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: new is a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &new) } == 0 {
            return Ok(());
        }
    }
    Err(ServerError::MemLock {
        have: lim.rlim_cur,
        need: MEMLOCK_MIN_BYTES,
    })
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Raises the soft limit on open files to the hard limit and says when it still cannot hold every session
/// the configuration allows (a spare descriptor per shard keeps accept working when they run out).
fn raise_nofile(cfg: &Config, shards: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid rlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur < lim.rlim_max {
        let new = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: new is a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    let want = (cfg.smtpd_connection_limit as u64)
        .saturating_mul(shards as u64)
        .saturating_add(1024);
    if lim.rlim_cur < want {
        eprintln!(
            "shardmta: warning: the open-files limit is {} but {} shards x smtpd_connection_limit {} need about {want}: raise it (LimitNOFILE= in a systemd unit, ulimit -n) or lower smtpd_connection_limit; past the limit clients get 421",
            lim.rlim_cur, shards, cfg.smtpd_connection_limit
        );
    }
}

/// Counts a shard as alive for as long as its executor's future lives (dropped on return or unwinding).
struct Alive(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Starts the relay and blocks until SIGTERM/SIGINT and a clean shutdown.
pub fn run(cfg: Config) -> Result<(), ServerError> {
    check_memlock()?;
    // Message buffers of 256 KiB and more are their own mappings, given back to the system when freed (glibc's
    // moving threshold otherwise keeps freed 10 MB buffers in the heap for good). Fixing that threshold also
    // fixes the heap-trim threshold at its 128 KiB default, which made every shard trim and fault its heap in
    // again all the time (relay CPU per message +15%, measured): it is raised to 64 MiB, and a shard gives
    // freed heap memory back after a burst instead (`Shard::give_back_memory`).
    // SAFETY: mallopt only tunes the allocator; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
    crate::tls::install_crypto_provider();
    let owner = if cfg.mail_owner.is_empty() {
        None
    } else {
        let o = MailOwner::lookup(&cfg.mail_owner)?;
        o.check_local(&cfg.local)?;
        let uid = privileges::euid();
        if uid != 0 && uid != o.uid {
            return Err(PrivilegeError::NotRoot { name: o.name, uid }.into());
        }
        Some(o)
    };
    // Keys and the users file are read while the process may still read root-only files.
    let configured_tls = if cfg.smtpd_tls_cert_file.is_empty() {
        None
    } else {
        Some(crate::tls::server_config(
            Path::new(&cfg.smtpd_tls_cert_file),
            Path::new(&cfg.smtpd_tls_key_file),
        )?)
    };
    let users = if cfg.smtpd_sasl_users_file.is_empty() {
        None
    } else {
        Some(Arc::new(UserDb::load(cfg.smtpd_sasl_users_file.as_ref())?))
    };
    let nshards = cfg.shard_count();
    raise_nofile(&cfg, nshards);
    // Every listening socket, for every shard, is bound now: ports below 1024 need root, and an address in use
    // stops the start here with one clear line.
    let mut sockets: Vec<Vec<(usize, OwnedFd)>> = Vec::with_capacity(nshards);
    for _ in 0..nshards {
        let mut mine = Vec::with_capacity(cfg.listeners.len());
        for (i, l) in cfg.listeners.iter().enumerate() {
            let fd = privileges::bind_listener(l.address).map_err(|source| ServerError::Bind {
                address: l.address,
                source,
            })?;
            mine.push((i, fd));
        }
        sockets.push(mine);
    }
    match &owner {
        Some(o) if privileges::euid() == 0 => {
            privileges::prepare_spool(&cfg.queue_directory, o)?;
            privileges::drop_to(o)?;
            eprintln!(
                "shardmta: running as {} (uid {}, gid {}) with no capabilities",
                o.name, o.uid, o.gid
            );
        }
        Some(_) => {}
        None if privileges::euid() == 0 => eprintln!(
            "shardmta: warning: running as root with every capability; set mail_owner to an unprivileged account (see README, Security model)"
        ),
        None => {}
    }
    let tls = match configured_tls {
        Some(t) => Some(t),
        None => {
            let (cert, key) =
                crate::tls::ensure_self_signed(&cfg.queue_directory, &cfg.myhostname)?;
            Some(crate::tls::server_config(&cert, &key)?)
        }
    };
    let policy = Arc::new(RelayPolicy::new(&cfg));
    let cfg = Arc::new(cfg);
    let recipients = Arc::new(RecipientTable::load(cfg.clone())?);
    for w in &recipients.snapshot().warnings {
        eprintln!("shardmta: warning: {w}");
    }
    let listeners = cfg
        .listeners
        .iter()
        .map(|l| {
            Arc::new(SessionConfig {
                hostname: cfg.myhostname.clone(),
                kind: l.kind,
                message_size_limit: cfg.message_size_limit,
                recipient_limit: cfg.smtpd_recipient_limit,
                hard_error_limit: cfg.smtpd_hard_error_limit,
                line_length_limit: cfg.line_length_limit,
                bare_newline: cfg.smtpd_forbid_bare_newline,
                smtp_line_length_limit: cfg.smtp_line_length_limit,
                tls_available: tls.is_some(),
                auth_available: users.is_some(),
                allow_plaintext_auth: l.allow_plaintext_auth,
                policy: policy.clone(),
                recipients: recipients.clone(),
            })
        })
        .collect();
    let (cfg_auth_limit, cfg_auth_window, cfg_auth_delay) = (
        cfg.smtpd_auth_failure_limit,
        cfg.smtpd_auth_lockout_time.0,
        cfg.smtpd_auth_failure_delay.0,
    );
    let shutdown = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, shutdown.clone()).map_err(ServerError::Signal)?;
    }
    let reload = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone())
        .map_err(ServerError::Signal)?;
    let shared = Arc::new(Shared {
        stats: (0..nshards).map(|_| Arc::default()).collect(),
        cfg,
        listeners,
        tls,
        users,
        shutdown,
        recipients,
        local_stats: Arc::default(),
        auth_guard: Arc::new(AuthGuard::new(
            cfg_auth_limit,
            cfg_auth_window,
            cfg_auth_delay,
        )),
        policy: policy.clone(),
    });
    // Shards talk over a full mesh of bounded channels: jobs to destination owners, outcomes back. The
    // local-delivery shard is the last peer (index nshards).
    let mesh = Mesh::full(nshards + 1, MESH_CHANNEL_CAPACITY);
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), ServerError>>();
    let mut handles = Vec::with_capacity(nshards);
    let alive = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for (shard, mine) in sockets.into_iter().enumerate() {
        let shared = shared.clone();
        let ready = ready_tx.clone();
        let mesh = mesh.clone();
        alive.fetch_add(1, Ordering::SeqCst);
        let guard = Alive(alive.clone());
        let h = LocalExecutorBuilder::new(Placement::Fixed(shard % ncpu))
            .name(&format!("shard-{shard}"))
            // Two unpinned helper threads: a commit's fdatasync never waits behind a segment being created.
            .blocking_thread_pool_placement(glommio::PoolPlacement::Unbound(
                BLOCKING_THREADS_PER_SHARD,
            ))
            .spawn(move || async move {
                let _alive = guard;
                shard_main(shard, shared, mine, ready, mesh).await
            })
            .map_err(|e| ServerError::Executor {
                shard,
                message: e.to_string(),
            })?;
        handles.push(h);
    }
    {
        let shared = shared.clone();
        let ready = ready_tx.clone();
        let mesh = mesh.clone();
        alive.fetch_add(1, Ordering::SeqCst);
        let guard = Alive(alive.clone());
        // Not pinned: it mostly waits on the disk, and must never take an SMTP shard's core from it.
        let h = LocalExecutorBuilder::new(Placement::Unbound)
            .name("local-delivery")
            .blocking_thread_pool_placement(glommio::PoolPlacement::Unbound(
                crate::local::shard::SYNC_THREADS,
            ))
            .spawn(move || async move {
                let _alive = guard;
                local_main(nshards, shared, ready, mesh).await
            })
            .map_err(|e| ServerError::Executor {
                shard: nshards,
                message: e.to_string(),
            })?;
        handles.push(h);
    }
    drop(ready_tx);
    // Every shard reports once: listening (or why not).
    let mut first_error = None;
    for _ in 0..=nshards {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => break,
        }
    }
    if let Some(e) = first_error {
        shared.shutdown.store(true, Ordering::SeqCst);
        for h in handles {
            let _ = h.join();
        }
        return Err(e);
    }
    let addrs: Vec<String> = shared
        .cfg
        .listeners
        .iter()
        .map(|l| format!("{} ({:?})", l.address, l.kind))
        .collect();
    eprintln!(
        "shardmta: {} shard(s) listening on {}; spool {}",
        nshards,
        addrs.join(", "),
        shared.cfg.queue_directory.display()
    );
    let spool = Dir::open_root(&shared.cfg.queue_directory).map_err(|e| ServerError::Queue {
        shard: 0,
        source: e.into(),
    })?;
    let started = Instant::now();
    let mut ticks = 0u32;
    let executors = nshards + 1;
    let mut died = false;
    while !shared.shutdown.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
        if alive.load(Ordering::SeqCst) < executors && !shared.shutdown.load(Ordering::SeqCst) {
            // A shard ended on its own (a panic): the process must not run on with a dead shard.
            eprintln!("shardmta: a shard stopped unexpectedly; shutting down");
            died = true;
            shared.shutdown.store(true, Ordering::SeqCst);
            break;
        }
        write_stats(&spool, &shared, started);
        ticks = ticks.wrapping_add(1);
        // Recipient tables: reloaded on SIGHUP at once, and when a file's mtime/size/inode changed (every 1 s).
        let hup = reload.swap(false, Ordering::SeqCst);
        if hup || ticks.is_multiple_of(5) {
            match shared.recipients.reload_if_changed(hup) {
                Ok(true) => {
                    eprintln!("shardmta: recipient tables reloaded");
                    for w in &shared.recipients.snapshot().warnings {
                        eprintln!("shardmta: warning: {w}");
                    }
                }
                Ok(false) => {}
                Err(e) => eprintln!("shardmta: recipient tables not reloaded (old ones stay): {e}"),
            }
        }
    }
    eprintln!("shardmta: shutting down");
    let mut failed = 0;
    for h in handles {
        if let Err(e) = h.join() {
            eprintln!("shardmta: a shard failed: {e}");
            failed += 1;
        }
    }
    write_stats(&spool, &shared, started);
    if died || failed > 0 {
        eprintln!("shardmta: stopped after a shard failure");
        return Err(ServerError::ShardFailed);
    }
    eprintln!("shardmta: stopped");
    Ok(())
}

/// Writes `<queue_directory>/stats.json` (atomically, by rename, never through a symlink): summed shard
/// counters, for benchmarks and `shardmta stats`.
fn write_stats(spool: &Dir, shared: &Shared, started: Instant) {
    let sum = |f: fn(&ShardStats) -> &AtomicU64| {
        shared
            .stats
            .iter()
            .map(|s| f(s).load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let v = serde_json::json!({
        "uptime_s": started.elapsed().as_secs_f64(),
        "shards": shared.stats.len(),
        "sessions_total": sum(|s| &s.sessions_total),
        "sessions_open": sum(|s| &s.sessions_open),
        "messages_accepted": sum(|s| &s.messages_accepted),
        "messages_refused": sum(|s| &s.messages_refused),
        "sessions_refused": sum(|s| &s.sessions_refused),
        "sessions_timed_out": sum(|s| &s.sessions_timed_out),
        "messages_refused_memory": sum(|s| &s.messages_refused_memory),
        "auth_failures": sum(|s| &s.auth_failures),
        "data_bytes_held": sum(|s| &s.data_bytes_held),
        "queue_syncs": sum(|s| &s.queue_syncs),
        "pending_messages": sum(|s| &s.pending_messages),
        "delivery_paused_shards": sum(|s| &s.delivery_paused),
        "outcomes_unrecorded": sum(|s| &s.outcomes_unrecorded),
        "delivery_pauses": sum(|s| &s.delivery_pauses),
        "local_delivered": shared.local_stats.delivered.load(Ordering::Relaxed),
        "local_deferred": shared.local_stats.deferred.load(Ordering::Relaxed),
        "local_bounced": shared.local_stats.bounced.load(Ordering::Relaxed),
        "local_batches": shared.local_stats.batches.load(Ordering::Relaxed),
        "local_file_syncs": shared.local_stats.file_syncs.load(Ordering::Relaxed),
        "local_dir_syncs": shared.local_stats.dir_syncs.load(Ordering::Relaxed),
        "local_fs_syncs": shared.local_stats.fs_syncs.load(Ordering::Relaxed),
    });
    let written = spool
        .create_file("stats.json.tmp")
        .is_ok_and(|mut f| std::io::Write::write_all(&mut f, v.to_string().as_bytes()).is_ok());
    if written {
        let _ = spool.rename("stats.json.tmp", spool, "stats.json");
    }
}

/// One shard's state, owned by its executor thread.
struct Shard {
    id: usize,
    shared: Arc<Shared>,
    links: Rc<Links>,
    queue: Rc<ShardQueue>,
    stats: Arc<ShardStats>,
    draining: Cell<bool>,
    /// Open sessions: limits, deadlines, stress.
    sessions: Rc<SessionTable>,
    /// Session read buffers (at most READ_BUFFERS_FREE_MAX kept for reuse).
    read_buffers: BufferPool,
    /// Bytes of unfinished messages this shard may hold in memory.
    data_budget: DataBudget,
    /// A descriptor kept open for the moment the process runs out of them: closed to accept one connection and
    /// tell it 421, then reopened (so EMFILE never stops the listeners).
    spare_fd: Cell<Option<std::fs::File>>,
}

async fn shard_main(
    id: usize,
    shared: Arc<Shared>,
    sockets: Vec<(usize, OwnedFd)>,
    ready: std::sync::mpsc::Sender<Result<(), ServerError>>,
    mesh: Mesh,
) {
    let cfg = &shared.cfg;
    // The mesh first: every peer waits in `join` until all have joined, so a shard that returned before
    // joining (its queue cannot be opened) would leave the others, and the process, waiting for ever.
    let (senders, receivers) = match join_mesh(mesh, id).await {
        Ok(sr) => sr,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let store = match QueueStore::open_shard(&cfg.queue_directory, id as u8, cfg.queue_segment_size)
    {
        Ok((store, report)) => {
            for note in &report.notes {
                eprintln!("shardmta: shard {id}: {note}");
            }
            if report.pending_messages > 0 || report.torn_tails > 0 || report.corrupt_records > 0 {
                eprintln!(
                    "shardmta: shard {id}: recovered {} pending message(s), {} recipient(s) from {} segment(s) ({} record(s); {} torn tail(s), {} damaged region(s) skipped, {} file(s) set aside)",
                    report.pending_messages,
                    report.pending_recipients,
                    report.segments_scanned,
                    report.records,
                    report.torn_tails,
                    report.corrupt_records,
                    report.files_set_aside
                );
            }
            store
        }
        Err(source) => {
            let _ = ready.send(Err(ServerError::Queue { shard: id, source }));
            return;
        }
    };
    let listeners: Vec<(usize, Rc<TcpListener>)> = sockets
        .into_iter()
        .map(|(i, fd)| {
            // SAFETY: a listening socket bound for this shard at start; ownership passes to the listener.
            (
                i,
                Rc::new(unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) }),
            )
        })
        .collect();
    let queue = ShardQueue::new(store);
    let links = Links::start(id, &shared, queue.clone(), senders, receivers);
    let shard = Rc::new(Shard {
        id,
        stats: shared.stats[id].clone(),
        shared: shared.clone(),
        links,
        queue,
        draining: Cell::new(false),
        sessions: SessionTable::new(SessionLimits::from_config(&shared.cfg)),
        read_buffers: BufferPool::new(
            READ_BUFFER_BYTES.max(2 * shared.cfg.line_length_limit + 16 * 1024),
            READ_BUFFERS_FREE_MAX,
        ),
        data_budget: DataBudget::new(shared.cfg.smtpd_data_memory_limit),
        spare_fd: Cell::new(std::fs::File::open("/dev/null").ok()),
    });
    let _ = ready.send(Ok(()));
    // Each accept loop races its accept against this channel; dropping the sender stops it.
    let (stop_accepting, accept_stop_rx) = glommio::channels::local_channel::new_bounded::<()>(1);
    let accept_stop_rx = Rc::new(accept_stop_rx);
    let mut accept_tasks = Vec::new();
    for (idx, l) in listeners {
        let shard = shard.clone();
        accept_tasks.push(glommio::spawn_local(accept_loop(
            shard,
            l,
            idx,
            accept_stop_rx.clone(),
        )));
    }
    // Tick: publish counters, housekeeping, watch for shutdown.
    let mut ticks = 0u32;
    // Fault injection for the test of what happens when a shard dies (debug builds only).
    #[cfg(debug_assertions)]
    let panic_at = std::env::var("SHARDMTA_TEST_PANIC_SHARD_AFTER_TICKS")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|_| id == 0);
    while !shard.shared.shutdown.load(Ordering::Relaxed) {
        glommio::timer::sleep(TICK).await;
        #[cfg(debug_assertions)]
        if panic_at.is_some_and(|n| ticks >= n) {
            panic!("shard {id}: fault injected by SHARDMTA_TEST_PANIC_SHARD_AFTER_TICKS");
        }
        ticks = ticks.wrapping_add(1);
        shard.sessions.reap(Instant::now());
        if ticks.is_multiple_of(10) {
            shard.give_back_memory().await;
        }
        shard.publish_stats();
        if ticks.is_multiple_of(HOUSEKEEPING_EVERY_TICKS) {
            let now = unix_now().as_secs();
            if let Err(e) = shard.queue.housekeeping(now).await {
                eprintln!("shardmta: shard {id}: housekeeping: {e}");
            }
        }
    }
    // Drain: stop accepting (the listeners close when their loops end), let sessions finish.
    shard.draining.set(true);
    drop(stop_accepting);
    for t in accept_tasks {
        t.await;
    }
    let deadline = Instant::now() + shard.shared.cfg.shutdown_timeout.0;
    while !shard.sessions.is_empty() && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    // Sessions still open: end their reads; each then answers 421 4.3.2 and closes.
    shard.sessions.shut_all_reads();
    let hard_deadline = Instant::now() + Duration::from_secs(2);
    while !shard.sessions.is_empty() && Instant::now() < hard_deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    shard.queue.shutdown().await;
    shard.publish_stats();
}

/// A burst of unfinished messages this large (peak held minus held now) is given back to the system once over.
const GIVE_BACK_AFTER_BYTES: u64 = 32 << 20;

impl Shard {
    /// After a burst of large messages has ended (much released, little held), hands the freed heap memory
    /// back to the system (`malloc_trim`, on a helper thread): buffers below the mmap threshold stay in the
    /// heap otherwise, and the heap is not trimmed on every free (that cost 15% of relay CPU).
    async fn give_back_memory(&self) {
        let used = self.data_budget.used();
        let peak = self.data_budget.take_peak();
        let burst = GIVE_BACK_AFTER_BYTES.min(self.data_budget.limit() / 4);
        if peak.saturating_sub(used) >= burst && used < self.data_budget.limit() / 4 {
            // SAFETY: malloc_trim only releases free heap memory; it has no preconditions.
            glommio::executor()
                .spawn_blocking(|| unsafe { libc::malloc_trim(0) })
                .await;
        }
    }

    fn publish_stats(&self) {
        self.stats
            .queue_syncs
            .store(self.queue.sync_count(), Ordering::Relaxed);
        let pending = self.queue.store().pending_count() as u64;
        self.stats
            .pending_messages
            .store(pending, Ordering::Relaxed);
        let d = self.links.dispatcher();
        self.stats
            .delivery_paused
            .store(d.paused() as u64, Ordering::Relaxed);
        self.stats
            .outcomes_unrecorded
            .store(d.unrecorded_count() as u64, Ordering::Relaxed);
        self.stats
            .delivery_pauses
            .store(d.pause_count(), Ordering::Relaxed);
        self.stats
            .sessions_timed_out
            .store(self.sessions.reaped(), Ordering::Relaxed);
        self.stats
            .data_bytes_held
            .store(self.data_budget.used(), Ordering::Relaxed);
    }
}

async fn accept_loop(
    shard: Rc<Shard>,
    listener: Rc<TcpListener>,
    idx: usize,
    stop: Rc<glommio::channels::local_channel::LocalReceiver<()>>,
) {
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            let _ = stop.recv().await;
            None
        })
        .await;
        let Some(accepted) = accepted else { return };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                if shard.draining.get() || shard.shared.shutdown.load(Ordering::Relaxed) {
                    return;
                }
                if is_fd_exhaustion(&e) {
                    shard.refuse_one_without_fds(&listener).await;
                    continue;
                }
                // Other accept errors: back off briefly instead of spinning.
                eprintln!("shardmta: shard {}: accept: {e}", shard.id);
                glommio::timer::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if shard.draining.get() {
            return;
        }
        let shard = shard.clone();
        glommio::spawn_local(async move {
            if let Err(e) = serve_connection(&shard, stream, idx).await {
                if e.kind() != io::ErrorKind::TimedOut
                    && e.kind() != io::ErrorKind::ConnectionReset
                    && e.kind() != io::ErrorKind::BrokenPipe
                    && e.kind() != io::ErrorKind::UnexpectedEof
                {
                    eprintln!("shardmta: shard {}: session: {e}", shard.id);
                }
            }
        })
        .detach();
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

impl Shard {
    /// Out of descriptors: gives the spare one back, accepts one waiting connection, tells it 421 and closes
    /// it, then takes the spare again. Clients are refused politely and the listener keeps working.
    async fn refuse_one_without_fds(&self, listener: &TcpListener) {
        static LOGGED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        if LOGGED.fetch_add(1, Ordering::Relaxed).is_multiple_of(1000) {
            eprintln!(
                "shardmta: shard {}: out of file descriptors: refusing connections with 421 (raise LimitNOFILE / ulimit -n, or lower smtpd_connection_limit)",
                self.id
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

async fn serve_connection(shard: &Shard, stream: TcpStream, listener: usize) -> io::Result<()> {
    let cfg = &shard.shared.cfg;
    let ip = stream.peer_addr()?.ip();
    let fd = stream.as_raw_fd();
    let listener_cfg = shard.shared.listeners[listener].clone();
    let tls_listener = listener_cfg.kind == ListenerKind::Submissions;
    let mut conn = Conn::Plain(stream);
    let mut out = Vec::with_capacity(1024);
    // Limits are checked before anything else, a TLS handshake included: a half-open connection holds a slot.
    let now = Instant::now();
    let trusted = shard.shared.policy.in_mynetworks(ip);
    let guard = match shard.sessions.admit(ip, fd, trusted, now) {
        Ok(g) => g,
        Err(refusal) => {
            shard.stats.sessions_refused.fetch_add(1, Ordering::Relaxed);
            if tls_listener {
                // No plaintext reply is possible before TLS: just close.
                return Ok(());
            }
            let r = match refusal {
                Refusal::Busy => reply::TOO_MANY_CONNECTIONS,
                Refusal::TooManyFromClient => reply::TOO_MANY_CONNECTIONS_FROM_YOU,
            };
            r.write_to(&mut out);
            return conn.send_and_close(&mut out).await;
        }
    };
    if let Conn::Plain(tcp) = &conn {
        tcp.set_nodelay(true)?;
        // A backstop per read and write; the request deadlines are the reaper's (see sessions).
        tcp.set_read_timeout(Some(cfg.smtpd_timeout.0))?;
        tcp.set_write_timeout(Some(cfg.smtpd_timeout.0))?;
    }
    shard.stats.sessions_open.fetch_add(1, Ordering::Relaxed);
    shard.stats.sessions_total.fetch_add(1, Ordering::Relaxed);
    let _open = OpenCount(&shard.stats);
    let mut session = Session::new(listener_cfg, ip);
    session.budget_data();
    if tls_listener {
        let Some(tls) = &shard.shared.tls else {
            return Ok(());
        };
        guard.slot().handshake(now);
        let info = conn.accept_tls(tls).await.map(crate::tls::describe)?;
        session.tls_started(info);
    }
    guard.slot().request(Instant::now());
    session.greeting().write_to(&mut out);
    let mut inbuf = shard.read_buffers.take();
    let mut held = 0u64;
    let r = session_io(
        shard,
        &guard,
        &mut conn,
        &mut out,
        &mut session,
        &mut inbuf,
        &mut held,
    )
    .await;
    shard.data_budget.release(held);
    r
}

/// Counts an open session in the shard's published counters for as long as it lives.
struct OpenCount<'a>(&'a ShardStats);

impl Drop for OpenCount<'_> {
    fn drop(&mut self) {
        self.0.sessions_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long a session waits for room in the shard's data budget before its message is refused (452 4.3.1).
const DATA_BUDGET_WAIT: Duration = Duration::from_secs(2);
/// Smallest free space in a message buffer before a read; the buffer grows in steps of at least this.
const DATA_GROW_MIN: usize = 64 * 1024;
/// Largest single growth step of a message buffer.
const DATA_GROW_MAX: usize = 8 << 20;

/// Bytes of a message buffer's free room kept back from the content allowance: a CR taken at the end of one
/// step is stored (as CRLF) by the next.
const DATA_ROOM_SLACK: usize = 8;

/// Before message content is taken (read, or already in the read buffer): makes room in the session's message
/// buffer, within the shard's data budget (waiting up to [`DATA_BUDGET_WAIT`] for room, else the message is
/// refused and its buffer freed), and lets the session take as much content as that room holds. Returns the
/// most bytes the read may take (content can at most double when bare line ends become CRLF).
async fn data_room(shard: &Shard, session: &mut Session, held: &mut u64, read_max: usize) -> usize {
    if !session.receiving_data() || session.storage_refused() {
        return read_max;
    }
    let (len, cap) = (session.data_len(), session.data_capacity());
    if cap - len < DATA_GROW_MIN {
        let step = cap.clamp(DATA_GROW_MIN, DATA_GROW_MAX);
        let limit = shard.shared.cfg.message_size_limit as usize + DATA_GROW_MIN;
        let target = (len + step).min(limit.max(len + DATA_GROW_MIN));
        let grow = (target - cap) as u64;
        if shard.data_budget.take(grow, DATA_BUDGET_WAIT).await {
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
    let allowance =
        (session.data_capacity() - session.data_len()).saturating_sub(DATA_ROOM_SLACK) / 2;
    session.set_data_allowance(allowance);
    allowance.clamp(1, read_max.max(1))
}

/// Keeps the budget's count equal to what the session's message buffer holds.
fn settle_budget(shard: &Shard, session: &Session, held: &mut u64) {
    let cap = session.data_capacity() as u64;
    if cap < *held {
        shard.data_budget.release(*held - cap);
    } else if cap > *held {
        shard.data_budget.force_take(cap - *held);
    }
    *held = cap;
}

/// The read-feed-write loop of one session; `inbuf` is the shard's reusable read buffer, `held` the bytes of
/// the shard's data budget this session's message buffer holds.
async fn session_io(
    shard: &Shard,
    guard: &SessionGuard,
    conn: &mut Conn,
    out: &mut Vec<u8>,
    session: &mut Session,
    inbuf: &mut [u8],
    held: &mut u64,
) -> io::Result<()> {
    let slot = guard.slot();
    let limits = shard.sessions.limits();
    let (mut start, mut end) = (0usize, 0usize);
    loop {
        let (n, action) = session.feed(&inbuf[start..end], out);
        start += n;
        debug_assert!(start <= end);
        match action {
            Action::NeedMore => {
                conn.send(out).await?;
                if start == end {
                    (start, end) = (0, 0);
                } else if start > 0 {
                    inbuf.copy_within(start..end, 0);
                    (start, end) = (0, end - start);
                }
                debug_assert!(end < inbuf.len(), "session keeps at most one partial line");
                settle_budget(shard, session, held);
                let now = Instant::now();
                if session.receiving_data() {
                    slot.data(now);
                } else if end == 0 && !session.skipping_line() {
                    // A new request (an overlong line being dropped is still the same one).
                    slot.request(now);
                }
                let room = data_room(shard, session, held, inbuf.len() - end).await;
                if session.receiving_data() && end > 0 {
                    // Content read with the command before it (pipelined) waited for that room: take it
                    // before reading more.
                    settle_budget(shard, session, held);
                    continue;
                }
                let got = match conn.read(&mut inbuf[end..end + room]).await {
                    Ok(0) => {
                        if slot.expired() {
                            reply::TIMEOUT.write_to(out);
                            let _ = conn.send_and_close(out).await;
                        } else if shard.draining.get() {
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
                let outcome = enqueue(shard, session).await;
                // Waiting for the client again: for it to take the reply, then for its next command.
                slot.request(Instant::now());
                let a = match outcome {
                    Ok(id) => {
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
                let Some(tls) = &shard.shared.tls else {
                    return Ok(());
                };
                slot.handshake(Instant::now());
                let info = conn.accept_tls(tls).await.map(crate::tls::describe)?;
                session.tls_started(info);
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
                let verified = match &shard.shared.users {
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
async fn enqueue(shard: &Shard, session: &Session) -> Result<crate::queue::QueueId, Reply> {
    let txn = session.transaction();
    let now = unix_now();
    let ticket = {
        let mut store = shard.queue.store();
        let id = store.allocate_id();
        let received = session.received_header(&id.to_string(), now.as_secs());
        let env = Envelope {
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
        };
        match store.append_message(id, &env, &received, &txn.data) {
            Ok(t) => (id, t),
            Err(e) => return Err(queue_error_reply(&e, shard.shared.cfg.message_size_limit)),
        }
    };
    let (id, ticket) = ticket;
    match shard.queue.durable(ticket).await {
        Ok(()) => {
            shard.links.dispatcher().submit(id);
            Ok(id)
        }
        Err(e) => Err(queue_error_reply(&e, shard.shared.cfg.message_size_limit)),
    }
}

fn queue_error_reply(e: &QueueError, limit: u64) -> Reply {
    match e {
        QueueError::TooLarge { .. } => Reply::message_too_big(limit),
        _ => {
            eprintln!("shardmta: queue write failed: {e}");
            reply::QUEUE_WRITE_FAILED
        }
    }
}

/// One shard's delivery wiring: its dispatcher (for messages it accepted), its agent (for destinations it owns),
/// and the mesh to the other shards. Same-shard hand-offs are direct calls, without a channel hop.
struct Links {
    shard: usize,
    senders: Rc<MeshSenders>,
    agent: std::cell::OnceCell<Rc<Agent>>,
    dispatcher: std::cell::OnceCell<Rc<Dispatcher>>,
}

impl Links {
    fn start(
        shard: usize,
        shared: &Arc<Shared>,
        queue: Rc<ShardQueue>,
        senders: glommio::channels::channel_mesh::Senders<ShardMsg>,
        mut receivers: glommio::channels::channel_mesh::Receivers<ShardMsg>,
    ) -> Rc<Links> {
        let cfg = shared.cfg.clone();
        let links = Rc::new(Links {
            shard,
            senders: Rc::new(senders),
            agent: Default::default(),
            dispatcher: Default::default(),
        });
        let router = Rc::new(Router::new(&cfg));
        let log = Rc::new(DeliveryLog::open(&delivery_log_path(&cfg)));
        glommio::spawn_local(log.clone().run()).detach();
        let resolver = MxResolver::new(cfg.dns.clone());
        let l = links.clone();
        let agent = Agent::new(
            cfg.clone(),
            router.clone(),
            resolver,
            log,
            Box::new(move |origin, o| l.send_outcome(origin, o)),
        );
        let l = links.clone();
        let policy = Arc::new(RelayPolicy::new(&cfg));
        let nshards = shared.stats.len();
        let dispatcher = Dispatcher::new(
            shard,
            nshards,
            cfg,
            queue,
            router,
            policy,
            Box::new(move |owner, job| l.send_job(owner, job)),
        );
        let _ = links.agent.set(agent);
        let _ = links.dispatcher.set(dispatcher.clone());
        glommio::spawn_local(dispatcher.run()).detach();
        for (_, stream) in receivers.streams() {
            let l = links.clone();
            glommio::spawn_local(async move {
                use futures_lite::StreamExt;
                let mut stream = stream;
                while let Some(msg) = stream.next().await {
                    match msg {
                        ShardMsg::Job(job) => l.agent().enqueue(*job),
                        ShardMsg::Outcome(o) => l.dispatcher().on_outcome(o),
                    }
                }
            })
            .detach();
        }
        links
    }

    fn agent(&self) -> &Rc<Agent> {
        self.agent.get().expect("set at start")
    }

    fn dispatcher(&self) -> &Rc<Dispatcher> {
        self.dispatcher.get().expect("set at start")
    }

    fn send_job(self: &Rc<Self>, owner: usize, job: Job) {
        if owner == self.shard {
            self.agent().enqueue(job);
        } else {
            self.send(owner, ShardMsg::Job(Box::new(job)));
        }
    }

    fn send_outcome(self: &Rc<Self>, origin: usize, o: Outcome) {
        if origin == self.shard {
            self.dispatcher().on_outcome(o);
        } else {
            self.send(origin, ShardMsg::Outcome(o));
        }
    }

    fn send(self: &Rc<Self>, to: usize, msg: ShardMsg) {
        mesh_send(&self.senders, self.shard, to, msg);
    }
}

type MeshSenders = glommio::channels::channel_mesh::Senders<ShardMsg>;

/// Sends over the mesh; when the channel is full, waits for room in a task of its own (bounded by the number
/// of messages in flight).
fn mesh_send(senders: &Rc<MeshSenders>, from: usize, to: usize, msg: ShardMsg) {
    if let Err(msg) = senders.try_send_to(to, msg) {
        let msg = match msg {
            glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(m)) => m,
            other => {
                eprintln!("shardmta: shard {from}: mesh send to shard {to} failed: {other}");
                return;
            }
        };
        let senders = senders.clone();
        glommio::spawn_local(async move {
            let _ = senders.send_to(to, msg).await;
        })
        .detach();
    }
}

fn delivery_log_path(cfg: &Config) -> PathBuf {
    if cfg.delivery.delivery_log.is_empty() {
        cfg.queue_directory.join("delivery.log")
    } else {
        PathBuf::from(&cfg.delivery.delivery_log)
    }
}

type MeshReceivers = glommio::channels::channel_mesh::Receivers<ShardMsg>;

/// Joins the shard mesh; peer `id` must get index `id` (executors are created in shard order, and the mesh
/// orders peers by executor id), since shards address each other by index.
async fn join_mesh(mesh: Mesh, id: usize) -> Result<(MeshSenders, MeshReceivers), ServerError> {
    let err = |message: String| ServerError::Executor { shard: id, message };
    let (senders, receivers) = mesh
        .join()
        .await
        .map_err(|e| err(format!("cannot join the shard mesh: {e}")))?;
    if senders.peer_id() != id {
        return Err(err(format!(
            "joined the shard mesh as peer {}",
            senders.peer_id()
        )));
    }
    Ok((senders, receivers))
}

/// The local-delivery shard's executor: joins the mesh as its last peer, takes jobs for local mailboxes from
/// every accepting shard and sends their outcomes back.
async fn local_main(
    id: usize,
    shared: Arc<Shared>,
    ready: std::sync::mpsc::Sender<Result<(), ServerError>>,
    mesh: Mesh,
) {
    let (senders, mut receivers) = match join_mesh(mesh, id).await {
        Ok(sr) => sr,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let senders = Rc::new(senders);
    let log = Rc::new(DeliveryLog::open(&delivery_log_path(&shared.cfg)));
    let (jobs_tx, jobs_rx) =
        glommio::channels::local_channel::new_bounded(crate::local::shard::JOB_QUEUE_MAX);
    let jobs_tx = Rc::new(jobs_tx);
    for (_, stream) in receivers.streams() {
        let tx = jobs_tx.clone();
        glommio::spawn_local(async move {
            use futures_lite::StreamExt;
            let mut stream = stream;
            while let Some(msg) = stream.next().await {
                match msg {
                    ShardMsg::Job(job) => {
                        if tx.send(*job).await.is_err() {
                            return;
                        }
                    }
                    ShardMsg::Outcome(o) => {
                        eprintln!("shardmta: local shard: unexpected outcome for {}", o.id)
                    }
                }
            }
        })
        .detach();
    }
    let s = senders.clone();
    let local = LocalDelivery::new(
        shared.cfg.clone(),
        shared.recipients.clone(),
        shared.local_stats.clone(),
        log,
        Box::new(move |origin, o| mesh_send(&s, id, origin, ShardMsg::Outcome(o))),
    );
    let _ = ready.send(Ok(()));
    local.run(jobs_rx, shared.shutdown.clone()).await;
}
