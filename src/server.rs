//! The relay process: reads keys and binds listeners while it may (after making sure no other process holds
//! their addresses), drops privileges, builds the state the shards share, starts them (see [`crate::shard`]),
//! tells systemd it is ready, then writes `stats.json`, reloads the configuration (SIGHUP or
//! [`crate::reloadable::ReloadControl`]) and the recipient tables, and waits for a signal; a start failure or a
//! dead shard stops the process with one line and a non-zero exit.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::anvil::AuthGuard;
use crate::config::Config;
use crate::control::ControlPlane;
use crate::eventlog::{EventLog, MASTER};
use crate::limits;
use crate::local::recipients::RecipientTable;
use crate::privileges::{self, MailOwner, PrivilegeError};
use crate::reloadable::{self, Live, ReloadControl, ReloadOutcome, Settings};
use crate::sd_notify::{notify, Notifier};
use crate::shard::mesh::MeshPlan;
use crate::shard::runtime::{self, Executors, RuntimeError, Signals};
use crate::shard::stats::StatsBoard;
use crate::shard::{ShardError, Shared};
use crate::spool::Dir;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("locked memory limit (RLIMIT_MEMLOCK) is {have} bytes; glommio's io_uring needs at least {need}. Raise it: `ulimit -l 8192` in the shell, LimitMEMLOCK=8M in a systemd unit, or `* - memlock 8192` in /etc/security/limits.conf")]
    MemLock { have: u64, need: u64 },
    #[error("{0}")]
    Start(#[from] RuntimeError<ShardError>),
    #[error("cannot listen on {address}: {source}{}", bind_hint(source))]
    Bind {
        address: std::net::SocketAddr,
        source: io::Error,
    },
    #[error("{0}")]
    Privileges(#[from] PrivilegeError),
    #[error("spool: {0}")]
    Spool(#[from] crate::spool::SpoolError),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("AUTH: {0}")]
    Auth(#[from] crate::auth::AuthError),
    /// Files the configuration names that cannot be read or do not parse (each names its file).
    #[error("{}", .0.join("; "))]
    Files(Vec<String>),
    #[error("suppression list: {0}")]
    Suppression(String),
    #[error("signal handling: {0}")]
    Signal(io::Error),
    #[error("local recipient tables: {0}")]
    Recipients(#[from] crate::local::recipients::TableError),
    #[error("a shard failed (see the lines above); the queue is intact, restart the server")]
    ShardFailed,
    #[error("HTTP API: {0}")]
    Http(#[from] crate::http::HttpError),
    #[error("HTTP API: {0}")]
    HttpStart(RuntimeError<crate::http::HttpError>),
    #[error("event log: {0}")]
    EventLog(#[from] crate::eventlog::EventLogError),
}

/// What to do about a listener that cannot be bound.
fn bind_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EADDRINUSE) => {
            " (in use by another process: another shardmta instance, or another server such as Postfix, already listens there: stop it or give the [[listener]] another address)"
        }
        Some(libc::EADDRNOTAVAIL) => " (that address is not on this host: use one of its own)",
        Some(libc::EACCES) => " (ports below 1024 need the server to start as root; set mail_owner to drop privileges after)",
        _ => "",
    }
}

fn check_memlock() -> Result<(), ServerError> {
    runtime::raise_memlock(limits::MEMLOCK_BYTES_MIN).map_err(|have| ServerError::MemLock {
        have,
        need: limits::MEMLOCK_BYTES_MIN,
    })
}

/// Raises the soft limit on open files to the hard limit and says when it still cannot hold every session
/// the configuration allows (a spare descriptor per shard keeps accept working when they run out).
fn raise_nofile(cfg: &Config, shards: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    // None: unlimited.
    let mut have = lim.current.unwrap_or(u64::MAX);
    if have < lim.maximum.unwrap_or(u64::MAX) {
        let raised = Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            have = lim.maximum.unwrap_or(u64::MAX);
        }
    }
    let want = (cfg.smtpd_connection_limit as u64)
        .saturating_mul(shards as u64)
        .saturating_add(1024);
    if have < want {
        tracing::warn!(
            target: MASTER,
            "the open-files limit is {have} but {} shards x smtpd_connection_limit {} need about {want}: raise it (LimitNOFILE= in a systemd unit, ulimit -n) or lower smtpd_connection_limit; past the limit clients get 421",
            shards, cfg.smtpd_connection_limit
        );
    }
}

/// Makes sure no other process listens on `addr` (see [`privileges::probe_address_free`]), trying again for a
/// moment when it is in use: a process killed just before (a restart after a crash) releases its sockets
/// shortly after it is reaped.
fn probe_listener(addr: std::net::SocketAddr) -> Result<(), ServerError> {
    let mut tries = 0;
    loop {
        match privileges::probe_address_free(addr) {
            Ok(()) => return Ok(()),
            Err(e)
                if e.raw_os_error() == Some(libc::EADDRINUSE)
                    && tries + 1 < limits::LISTENER_PROBE_TRIES_MAX =>
            {
                tries += 1;
                std::thread::sleep(limits::LISTENER_PROBE_RETRY_AFTER);
            }
            Err(source) => {
                return Err(ServerError::Bind {
                    address: addr,
                    source,
                })
            }
        }
    }
}

/// Starts the relay and blocks until SIGTERM/SIGINT and a clean shutdown. `path`: the configuration file `cfg`
/// was read from, read again on SIGHUP (None: the embedded defaults, which do not change).
pub fn run(cfg: Config, path: Option<&Path>) -> Result<(), ServerError> {
    // First: a SIGHUP from a reload script or logrotate during the start must not kill the process (its default
    // action), and a SIGTERM then ends the start at the next check.
    let signals = Signals::install().map_err(ServerError::Signal)?;
    // A NOTIFY_SOCKET that names no socket: said once; a Type=notify unit then times the start out.
    let notifier = Notifier::from_env().unwrap_or_else(|e| {
        eprintln!("shardmta: warning: systemd notifications off: {e}");
        None
    });
    notify(notifier.as_ref(), |n| n.status("starting"));
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
    // The event log's file is opened now, while the process may still open it as root; from here on every
    // line of the server goes through it, with a timestamp. Dropped at the end, it writes out what is queued,
    // so a start error printed by `main` is the last line on stderr.
    let log = EventLog::start(cfg.maillog_file.as_deref(), cfg.log_format)?;
    let result = serve(cfg, path, &signals, &log, notifier.as_ref());
    if let Err(e) = &result {
        // On stderr `main` prints it; a log file gets it too.
        if log.to_file() {
            tracing::error!(target: MASTER, "{e}");
        }
    }
    drop(log);
    result
}

/// The server's life once the event log runs: preparation, the shards, the main loop, the shutdown.
fn serve(
    cfg: Config,
    path: Option<&Path>,
    signals: &Signals,
    log: &EventLog,
    notifier: Option<&Notifier>,
) -> Result<(), ServerError> {
    for w in cfg.warnings() {
        tracing::warn!(target: MASTER, "{w}");
    }
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
    // Keys and the users file are read while the process may still read root-only files (every problem named
    // with its file).
    let (configured_tls, users) = reloadable::read_keys(&cfg).map_err(ServerError::Files)?;
    crate::delivery::bounce_class::install(
        crate::delivery::bounce_class::BounceClassifier::load(
            cfg.bounce_classification_file.as_deref(),
        )
        .map_err(|e| ServerError::Files(vec![format!("bounce_classification_file: {e}")]))?,
    );
    // DKIM keys too: an unreadable or unusable key stops the start, named with its file.
    let dkim = reloadable::read_dkim_keys(&cfg).map_err(ServerError::Files)?;
    // The shaping file: a bad entry stops the start, named with its file and entry.
    let shaping = reloadable::read_shaping(&cfg).map_err(|e| ServerError::Files(vec![e]))?;
    let nshards = cfg.shard_count();
    let usable =
        runtime::usable_cpus().map_err(|m| ServerError::Start(RuntimeError::Topology(m)))?;
    let cpus = runtime::place_shards(nshards, &usable)?;
    raise_nofile(&cfg, nshards);
    // No other process may hold a listener's address: SO_REUSEPORT would let a second instance (same user)
    // bind beside the first and take half of its connections into another spool.
    for l in &cfg.listeners {
        probe_listener(l.address)?;
    }
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
    // The HTTP listener too (and the API tokens, which may be root's to read).
    let http_setup = crate::http::HttpSetup::prepare(&cfg.http)?;
    match &owner {
        Some(o) if privileges::euid() == 0 => {
            privileges::prepare_spool(&cfg.queue_directory, o)?;
            privileges::drop_to(o)?;
            tracing::info!(
                target: MASTER,
                "running as {} (uid {}, gid {}) with no capabilities",
                o.name, o.uid, o.gid
            );
        }
        Some(_) => {}
        None if privileges::euid() == 0 => tracing::warn!(
            target: MASTER,
            "running as root with every capability; set mail_owner to an unprivileged account (see README, Security model)"
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
    // Egress sources whose address is not on this host: said now; delivery suspends them when it tries them.
    for (name, e) in crate::egress::check_sources(&cfg) {
        tracing::warn!(target: MASTER, "egress source {name}: its address cannot be bound ({e}): mail for its pools goes through their other sources");
    }
    let cfg = Arc::new(cfg);
    let recipients = Arc::new(RecipientTable::load(cfg.clone())?);
    for w in &recipients.snapshot().warnings {
        tracing::warn!(target: MASTER, "{w}");
    }
    let live = Arc::new(Live::new(
        Settings::new(cfg.clone(), tls, users)
            .with_dkim(dkim)
            .with_shaping(shaping),
    ));
    let (cfg_auth_limit, cfg_auth_window, cfg_auth_delay) = (
        cfg.smtpd_auth_failure_limit,
        cfg.smtpd_auth_lockout_time.0,
        cfg.smtpd_auth_failure_delay.0,
    );
    let (control, control_requests) =
        ControlPlane::new(nshards, &cfg.queue_directory, signals.reload.clone());
    let suppression = crate::suppression::Suppression::open(&cfg.queue_directory)
        .map_err(|e| ServerError::Suppression(e.to_string()))?;
    suppression
        .start_writer()
        .map_err(|e| ServerError::Suppression(e.to_string()))?;
    let shared = Arc::new(Shared {
        suppression,
        control,
        control_requests,
        stats: Arc::new(StatsBoard::new(nshards)),
        cfg,
        live,
        shutdown: signals.shutdown.clone(),
        recipients,
        auth_guard: Arc::new(AuthGuard::new(
            cfg_auth_limit,
            cfg_auth_window,
            cfg_auth_delay,
        )),
        reload: Arc::new(ReloadControl::new(signals.reload.clone())),
    });
    // Shards talk over full meshes of bounded channels; the local-delivery shard is the last peer.
    let plan = MeshPlan::new(nshards + 1);
    let mut executors: Executors<ShardError> = Executors::new();
    for ((shard, mine), cpu) in sockets.into_iter().enumerate().zip(cpus) {
        let (shared, plan) = (shared.clone(), plan.clone());
        executors.spawn(
            &format!("shard-{shard}"),
            Some(cpu),
            // Two unpinned helper threads: a commit's fdatasync never waits behind a segment being created.
            limits::SHARD_BLOCKING_THREADS_COUNT,
            move |ready| crate::shard::smtp_shard(shard, shared, mine, ready, plan),
        )?;
    }
    {
        let (shared, plan) = (shared.clone(), plan.clone());
        // Not pinned: it mostly waits on the disk, and must never take an SMTP shard's core from it.
        executors.spawn(
            "local-delivery",
            None,
            limits::LOCAL_SYNC_THREADS_COUNT,
            move |ready| crate::shard::local_shard(shared, ready, plan),
        )?;
    }
    drop(plan);
    // Every executor reports once: ready, or why not. A failure or a signal stops the others.
    if let Err(e) = executors.wait_ready(signals) {
        shared.shutdown.store(true, Ordering::SeqCst);
        executors.join(Instant::now() + limits::START_ABORT_GRACE);
        return Err(e.into());
    }
    // The HTTP API on an executor of its own, once the shards answer (its control socket is made now, after the
    // privilege drop, so it belongs to mail_owner).
    let http_address = http_setup.address();
    let mut http: Executors<crate::http::HttpError> = Executors::new();
    let started_http = {
        let shared = shared.clone();
        http.spawn(
            "http",
            None,
            limits::HTTP_BLOCKING_THREADS_COUNT,
            move |ready| crate::http::serve(shared, http_setup, ready),
        )
        .and_then(|()| http.wait_ready(signals))
    };
    if let Err(e) = started_http {
        shared.shutdown.store(true, Ordering::SeqCst);
        http.join(Instant::now() + limits::START_ABORT_GRACE);
        executors.join(Instant::now() + limits::START_ABORT_GRACE);
        return Err(ServerError::HttpStart(e));
    }
    tracing::info!(
        target: MASTER,
        "HTTP API on {}{}",
        http_address.map_or(String::new(), |a| format!("{a} and ")),
        shared
            .cfg
            .queue_directory
            .join(crate::http::CONTROL_SOCKET)
            .display()
    );
    let addrs: Vec<String> = shared
        .cfg
        .listeners
        .iter()
        .map(|l| format!("{} ({:?})", l.address, l.kind))
        .collect();
    let listening = format!(
        "{} shard(s) listening on {}; spool {}",
        nshards,
        addrs.join(", "),
        shared.cfg.queue_directory.display()
    );
    tracing::info!(
        target: MASTER,
        "daemon started -- version {}, {listening}",
        env!("CARGO_PKG_VERSION")
    );
    notify(notifier, |n| n.ready(&listening));
    let spool = Dir::open_root(&shared.cfg.queue_directory)?;
    let started = Instant::now();
    let mut ticks = 0u32;
    let mut died = false;
    let mut dropped_lines = 0;
    while !shared.shutdown.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
        let all_alive = executors.alive() == executors.len() && http.alive() == http.len();
        if !all_alive && !shared.shutdown.load(Ordering::SeqCst) {
            // A shard ended on its own (a panic): the process must not run on with a dead shard.
            tracing::error!(target: MASTER, "a shard stopped unexpectedly; shutting down");
            died = true;
            shared.shutdown.store(true, Ordering::SeqCst);
            break;
        }
        shared.stats.write(&spool, started);
        ticks = ticks.wrapping_add(1);
        // SIGUSR1 (or SIGHUP): logrotate has renamed the log file; the next line goes to a new one.
        if signals.reopen_logs.swap(false, Ordering::SeqCst) {
            log.reopen();
        }
        if ticks.is_multiple_of(25) {
            let dropped = log.dropped_lines();
            if dropped > dropped_lines {
                tracing::warn!(
                    target: MASTER,
                    "{} event log line(s) dropped: the log writer fell behind",
                    dropped - dropped_lines
                );
                dropped_lines = dropped;
            }
        }
        // The configuration: reloaded on SIGHUP or when code asks (`ReloadControl`), its tables with it.
        let mut force_tables = false;
        if shared.reload.take_request() {
            force_tables = !reload_configuration(path, &shared, notifier, &listening);
        }
        // Recipient tables: when a file's mtime/size/inode changed (every 1 s), and on a SIGHUP whose
        // configuration reload failed (the running configuration's tables are read again).
        if force_tables || ticks.is_multiple_of(5) {
            match shared.recipients.reload_if_changed(force_tables) {
                Ok(true) => {
                    shared.stats.table_reloads.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(target: MASTER, "recipient tables reloaded");
                    for w in &shared.recipients.snapshot().warnings {
                        tracing::warn!(target: MASTER, "{w}");
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    shared
                        .stats
                        .table_reload_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        target: MASTER,
                        "recipient tables not reloaded (old ones stay): {e}"
                    )
                }
            }
        }
    }
    tracing::info!(target: MASTER, "shutting down");
    notify(notifier, |n| n.stopping());
    // Sessions get shutdown_timeout, then a little longer to answer 421; the queue's last sync after that.
    let deadline = Instant::now() + shared.cfg.shutdown_timeout.0 + limits::SHUTDOWN_GRACE;
    let failed = executors.join(deadline) + http.join(deadline);
    shared.stats.write(&spool, started);
    if died || failed > 0 {
        tracing::error!(target: MASTER, "stopped after a shard failure");
        return Err(ServerError::ShardFailed);
    }
    tracing::info!(target: MASTER, "stopped");
    Ok(())
}

/// One configuration reload (see [`crate::reloadable`]): everything is read and checked first; then the
/// recipient tables and the settings snapshot are replaced, or, on any problem, nothing is and the reason is
/// logged. systemd hears RELOADING=1 before and READY=1 after, either way. Returns whether new settings are in
/// place.
fn reload_configuration(
    path: Option<&Path>,
    shared: &Shared,
    notifier: Option<&Notifier>,
    listening: &str,
) -> bool {
    notify(notifier, |n| n.reloading());
    let shown = path.map_or_else(|| PathBuf::from("(embedded defaults)"), Path::to_path_buf);
    let running = shared.live.snapshot();
    let outcome = match reloadable::prepare(path, &running) {
        Ok(p) => {
            let mut warnings = reloadable::restart_lines(&p.restart_needed);
            warnings.extend(p.warnings);
            for w in &warnings {
                tracing::warn!(target: MASTER, "reload: {w}");
            }
            shared.recipients.install(p.settings.cfg.clone(), p.maps);
            crate::delivery::bounce_class::install(p.classifier);
            shared.live.publish(p.settings);
            shared.stats.config_reloads.fetch_add(1, Ordering::Relaxed);
            shared.stats.table_reloads.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                target: MASTER,
                "configuration reloaded from {} ({} setting(s) need a restart to change)",
                shown.display(),
                p.restart_needed.len()
            );
            notify(notifier, |n| {
                n.ready(&format!("{listening}; configuration reloaded"))
            });
            ReloadOutcome::Reloaded { warnings }
        }
        Err(e) => {
            shared
                .stats
                .config_reload_failures
                .fetch_add(1, Ordering::Relaxed);
            let reason = e.to_string();
            for line in reason.lines() {
                tracing::error!(
                    target: MASTER,
                    "configuration not reloaded from {} (the running one stays): {line}",
                    shown.display()
                );
            }
            notify(notifier, |n| {
                n.ready(&format!(
                    "{listening}; the last reload failed: {}",
                    reason.replace('\n', "; ")
                ))
            });
            ReloadOutcome::Failed { reason }
        }
    };
    let done = matches!(outcome, ReloadOutcome::Reloaded { .. });
    shared.reload.finish(outcome);
    done
}
