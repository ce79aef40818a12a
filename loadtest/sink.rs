//! `shardmta-loadtest sink`: an SMTP server that accepts and counts, for
//! end-to-end tests of outbound delivery and for benchmarks.
//!
//! Shape: the main thread parses options, starts N glommio executors (each
//! binds every `--listen` address with SO_REUSEPORT), handles SIGTERM/SIGINT,
//! `--duration` and `--max-messages`, prints progress and writes the stats
//! file. Each shard runs its sessions ([`crate::sink_session::Session`], the
//! sans-IO state machine) around plaintext or rustls streams.
//!
//! Saved message format (`--save-dir DIR`, file `DIR/<shard>-<n>.eml`, where
//! `<shard>-<n>` is also the id in `250 2.0.0 Ok: queued as <shard>-<n>`):
//!
//! ```text
//! X-Sink-Mail-From: <sender>          (empty for the null sender: <>)
//! X-Sink-Rcpt-To: <rcpt>              (one line per accepted recipient)
//! X-Sink-TLS: TLSv1.3 | TLSv1.2 | none
//! X-Sink-Auth: <user> | none
//! X-Sink-Peer: 127.0.0.1:40000
//! X-Sink-Local: 127.0.0.1:2526
//! <the message data exactly as received, after dot-unstuffing,
//!  without the terminating ".\r\n">
//! ```
//!
//! The X-Sink lines end with CRLF and come straight before the message's own
//! first header line, so the file is the message with a few trace headers
//! prepended. Files are written to a temporary name and renamed, before the
//! `250` reply is sent: once a client has its 250, the file is there.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use futures_lite::io::AsyncReadExt;
use glommio::net::{TcpListener, TcpStream};
use hdrhistogram::Histogram;

use crate::sink_session::{Action, Session, SinkConfig, Tally};
use shardmta::buffers::BufferPool;
use shardmta::net::ServerConn;
use shardmta::shard::runtime::{Executors, Ready, Signals};

#[derive(Args, Debug, Clone)]
pub struct SinkArgs {
    /// Address IP:PORT to listen on; repeat to listen on several at once.
    #[arg(long = "listen", default_value = "127.0.0.1:2526")]
    pub listen: Vec<String>,
    /// Allow listen addresses outside 127.0.0.0/8 and ::1.
    #[arg(long)]
    pub allow_remote: bool,
    /// Number of glommio executors; each binds every address (SO_REUSEPORT).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub shards: u32,
    /// Pin shard N to the N-th usable CPU (default: unpinned, so the sink does
    /// not compete with a pinned load client or server on the same cores).
    #[arg(long)]
    pub pin: bool,
    /// Name in the greeting and the EHLO reply.
    #[arg(long, default_value = "sink.localhost")]
    pub hostname: String,
    /// Delay before each RCPT reply and each final DATA reply, in ms (the delays
    /// of a pipelined batch add up before its one write).
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// Extra uniform random delay 0..=N ms per delayed reply.
    #[arg(long, default_value_t = 0)]
    pub random_delay_ms: u64,
    /// Holds each write of replies this long, once however many replies it carries, as a round trip to a
    /// distant server would (at most 10,000 ms). Pipelining clients pay it once per batch.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub rtt_ms: u64,
    /// Fraction of RCPTs answered `451 4.3.0` at random.
    #[arg(long, default_value_t = 0.0)]
    pub tempfail_rate: f64,
    /// Fraction of RCPTs answered `550 5.1.1` at random.
    #[arg(long, default_value_t = 0.0)]
    pub permfail_rate: f64,
    /// LOCAL=REPLY (repeatable): RCPT to an address whose local part is LOCAL is answered REPLY, a whole
    /// reply line such as `quota=452 4.2.2 Mailbox full` (code 400-599 first).
    #[arg(long = "rcpt-reply")]
    pub rcpt_reply: Vec<String>,
    /// Answer the greeting with this code (e.g. 421, 554) and close.
    #[arg(long, value_parser = clap::value_parser!(u16).range(200..=599))]
    pub greeting_code: Option<u16>,
    /// Do not advertise PIPELINING.
    #[arg(long)]
    pub no_pipelining: bool,
    /// Do not advertise 8BITMIME (BODY=8BITMIME gets 555).
    #[arg(long = "no-8bitmime")]
    pub no_8bitmime: bool,
    /// Do not advertise SMTPUTF8 (the SMTPUTF8 parameter gets 555).
    #[arg(long)]
    pub no_smtputf8: bool,
    /// Do not advertise CHUNKING (BDAT is then an unknown command).
    #[arg(long)]
    pub no_chunking: bool,
    /// Advertise SIZE N and enforce it (`552 5.3.4`).
    #[arg(long)]
    pub size_limit: Option<u64>,
    /// Offer STARTTLS (self-signed certificate generated at start; TLS 1.2 and 1.3).
    #[arg(long)]
    pub starttls: bool,
    /// Offer STARTTLS, answer 220, then close instead of handshaking.
    #[arg(long)]
    pub broken_tls: bool,
    /// TLS from the first byte (port-465 style) on every listen address.
    #[arg(long)]
    pub implicit_tls: bool,
    /// With --starttls/--implicit-tls: present this certificate chain (PEM) instead of a self-signed one.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// USER:PASS: offer AUTH PLAIN LOGIN and require it before MAIL.
    #[arg(long)]
    pub auth: Option<String>,
    /// Answer MAIL with 421 and close after N messages on one connection.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_messages_per_connection: Option<u64>,
    /// Write each accepted message to DIR/<shard>-<n>.eml (see the format in
    /// the README section of the loadtest).
    #[arg(long)]
    pub save_dir: Option<PathBuf>,
    /// Write counters as JSON to FILE (atomically) every 50 ms while they
    /// change, and at exit.
    #[arg(long)]
    pub stats_file: Option<PathBuf>,
    /// Stop after this many seconds.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Stop once this many messages were accepted.
    #[arg(long)]
    pub max_messages: Option<u64>,
    /// Idle timeout per connection, in seconds.
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
}

/// Validated settings shared by the shards.
struct Opts {
    listen: Vec<SocketAddr>,
    delay: Duration,
    random_delay_ms: u64,
    rtt: Duration,
    implicit_tls: bool,
    broken_tls: bool,
    save_dir: Option<PathBuf>,
    timeout: Duration,
}

/// Counters one shard publishes for the main thread (single writer).
#[derive(Default)]
struct ShardStats {
    transactions: AtomicU64,
    messages: AtomicU64,
    recipients_accepted: AtomicU64,
    recipients_tempfailed: AtomicU64,
    recipients_permfailed: AtomicU64,
    data_tempfailed: AtomicU64,
    data_permfailed: AtomicU64,
    bytes: AtomicU64,
    auth_ok: AtomicU64,
    auth_failed: AtomicU64,
    connections: AtomicU64,
    tls_connections: AtomicU64,
    tls_failed: AtomicU64,
    save_errors: AtomicU64,
    /// Microseconds since start of the first / last accepted message (0: none).
    first_msg_us: AtomicU64,
    last_msg_us: AtomicU64,
    /// Per listen address: (connections, messages).
    per_listener: Vec<(AtomicU64, AtomicU64)>,
    /// Messages per peer (client) address, with `--save-dir` only (the peer is looked up for saved messages
    /// only); at most `PEERS_COUNTED_MAX` addresses, the others counted under "other".
    per_peer: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

/// Peer addresses counted one by one in the stats (`per_peer`).
const PEERS_COUNTED_MAX: usize = 1024;

struct Shared {
    opts: Opts,
    cfg: SinkConfig,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: AtomicBool,
    start: Instant,
    stats: Vec<ShardStats>,
    open: AtomicU64,
    max_open: AtomicU64,
}

/// Histograms a shard returns at the end.
struct SinkHists {
    size: Histogram<u64>,
    msgs_per_conn: Histogram<u64>,
}

impl SinkHists {
    fn new() -> Result<Self, String> {
        let h = || Histogram::new_with_bounds(1, 1 << 40, 3).map_err(|e| format!("histogram: {e}"));
        Ok(SinkHists {
            size: h()?,
            msgs_per_conn: h()?,
        })
    }
}

pub fn resolve_listen(list: &[String], allow_remote: bool) -> Result<Vec<SocketAddr>, String> {
    let mut out: Vec<SocketAddr> = Vec::with_capacity(list.len());
    for l in list {
        let addr: SocketAddr = l
            .parse()
            .map_err(|_| format!("--listen {l}: expected IP:PORT (e.g. 127.0.0.2:2526)"))?;
        if !allow_remote && !crate::is_loopback(&addr) {
            return Err(format!(
                "--listen {l} is not a loopback address; pass --allow-remote to listen elsewhere"
            ));
        }
        if addr.port() == 0 {
            return Err(format!(
                "--listen {l}: give a port (0 would differ per shard)"
            ));
        }
        if out.contains(&addr) {
            return Err(format!("--listen {l} given twice"));
        }
        out.push(addr);
    }
    Ok(out)
}

fn build_config(a: &SinkArgs) -> Result<SinkConfig, String> {
    crate::check_token("--hostname", &a.hostname)?;
    for (name, v) in [
        ("--tempfail-rate", a.tempfail_rate),
        ("--permfail-rate", a.permfail_rate),
    ] {
        if !(0.0..=1.0).contains(&v) {
            return Err(format!("{name} {v}: must be between 0 and 1"));
        }
    }
    if a.tempfail_rate + a.permfail_rate > 1.0 {
        return Err("--tempfail-rate + --permfail-rate must not exceed 1".into());
    }
    if a.implicit_tls && a.broken_tls {
        return Err("--implicit-tls and --broken-tls exclude each other".into());
    }
    let auth = match &a.auth {
        None => None,
        Some(s) => match s.split_once(':') {
            Some((u, p)) if !u.is_empty() => Some((u.to_string(), p.to_string())),
            _ => return Err(format!("--auth {s:?}: expected USER:PASS")),
        },
    };
    let mut rcpt_replies = Vec::with_capacity(a.rcpt_reply.len());
    for r in &a.rcpt_reply {
        let bad = || format!("--rcpt-reply {r:?}: expected LOCAL=CODE TEXT, CODE 400-599");
        let (local, reply) = r.split_once('=').ok_or_else(bad)?;
        let code: u16 = reply
            .get(..3)
            .and_then(|c| c.parse().ok())
            .ok_or_else(bad)?;
        let text = reply.get(3..).unwrap_or("").trim();
        if local.is_empty() || !(400..600).contains(&code) || text.contains(['\r', '\n']) {
            return Err(bad());
        }
        rcpt_replies.push((local.as_bytes().to_vec(), code, text.as_bytes().to_vec()));
    }
    Ok(SinkConfig {
        rcpt_replies,
        hostname: a.hostname.clone(),
        greeting_code: a.greeting_code,
        pipelining: !a.no_pipelining,
        eightbitmime: !a.no_8bitmime,
        smtputf8: !a.no_smtputf8,
        chunking: !a.no_chunking,
        size_limit: a.size_limit,
        starttls: (a.starttls || a.broken_tls) && !a.implicit_tls,
        auth,
        tempfail_rate: a.tempfail_rate,
        permfail_rate: a.permfail_rate,
        max_messages_per_connection: a.max_messages_per_connection,
        keep_data: a.save_dir.is_some(),
    })
}

/// A self-signed certificate for `hostname` and localhost; TLS 1.2 and 1.3.
fn tls_config(hostname: &str) -> Result<Arc<rustls::ServerConfig>, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ck = rcgen::generate_simple_self_signed(vec![hostname.to_string(), "localhost".into()])
        .map_err(|e| format!("generating a self-signed certificate: {e}"))?;
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let cfg = rustls::ServerConfig::builder_with_protocol_versions(&[
        &rustls::version::TLS13,
        &rustls::version::TLS12,
    ])
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .map_err(|e| format!("TLS configuration: {e}"))?;
    Ok(Arc::new(cfg))
}

pub fn sink(a: SinkArgs) -> Result<ExitCode, String> {
    let listen = resolve_listen(&a.listen, a.allow_remote)?;
    let cfg = build_config(&a)?;
    if !(a.timeout.is_finite() && a.timeout > 0.0) {
        return Err("--timeout must be > 0".into());
    }
    let duration = match a.duration {
        Some(d) if d.is_finite() && d > 0.0 => Some(Duration::from_secs_f64(d)),
        Some(d) => return Err(format!("--duration {d}: must be > 0")),
        None => None,
    };
    if let Some(dir) = &a.save_dir {
        std::fs::create_dir_all(dir).map_err(|e| format!("--save-dir {}: {e}", dir.display()))?;
    }
    let tls = if let (true, Some(c), Some(k)) =
        (cfg.starttls || a.implicit_tls, &a.tls_cert, &a.tls_key)
    {
        Some(shardmta::tls::server_config(c, k).map_err(|e| format!("--tls-cert/--tls-key: {e}"))?)
    } else if cfg.starttls || a.implicit_tls {
        Some(tls_config(&a.hostname)?)
    } else {
        None
    };
    let shards = a.shards as usize;
    let stop_flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        // A second signal while stopping exits at once.
        signal_hook::flag::register_conditional_shutdown(sig, 1, stop_flag.clone())
            .map_err(|e| format!("signal handling: {e}"))?;
        signal_hook::flag::register(sig, stop_flag.clone())
            .map_err(|e| format!("signal handling: {e}"))?;
    }
    let shared = Arc::new(Shared {
        opts: Opts {
            listen: listen.clone(),
            delay: Duration::from_millis(a.delay_ms),
            random_delay_ms: a.random_delay_ms,
            rtt: Duration::from_millis(a.rtt_ms),
            implicit_tls: a.implicit_tls,
            broken_tls: a.broken_tls,
            save_dir: a.save_dir.clone(),
            timeout: Duration::from_secs_f64(a.timeout),
        },
        cfg,
        tls,
        stop: AtomicBool::new(false),
        start: Instant::now(),
        stats: (0..shards)
            .map(|_| ShardStats {
                per_listener: listen.iter().map(|_| Default::default()).collect(),
                ..Default::default()
            })
            .collect(),
        open: AtomicU64::new(0),
        max_open: AtomicU64::new(0),
    });

    crate::raise_memlock();
    let cpus = crate::usable_cpus();
    // The server's runtime: one executor per shard, each reporting once that it listens (or why not).
    let finished: Arc<std::sync::Mutex<Vec<SinkHists>>> = Arc::default();
    let mut executors: Executors<String> = Executors::new();
    for s in 0..shards {
        let cpu = a.pin.then(|| cpus[s % cpus.len()]);
        let (sh, done) = (shared.clone(), finished.clone());
        executors
            .spawn_with_io_memory(
                &format!("sink-{s}"),
                cpu,
                2,
                Some(64 * 1024),
                move |ready| run_shard(s, sh, ready, done),
            )
            .map_err(|e| e.to_string())?;
    }
    let signals = Signals {
        shutdown: stop_flag.clone(),
        reload: Arc::default(),
        reopen_logs: Arc::default(),
    };
    if let Err(e) = executors.wait_ready(&signals) {
        shared.stop.store(true, Relaxed);
        executors.join(Instant::now() + Duration::from_secs(3));
        eprintln!("shardmta-loadtest sink: {e}");
        return Ok(ExitCode::from(1));
    }
    let addrs: Vec<String> = listen.iter().map(|a| a.to_string()).collect();
    eprintln!(
        "shardmta-loadtest sink: {shards} shard(s) listening on {}{}",
        addrs.join(", "),
        if a.implicit_tls {
            " (implicit TLS)"
        } else {
            ""
        }
    );

    let write_stats = |finished: bool| -> Option<String> {
        let p = a.stats_file.as_ref()?;
        let json = stats_json(&shared, &addrs, finished).to_string();
        let tmp = p.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, &json).and_then(|_| std::fs::rename(&tmp, p)) {
            eprintln!("shardmta-loadtest sink: --stats-file {}: {e}", p.display());
        }
        Some(json)
    };
    let mut last_json = write_stats(false);
    let mut last_stats = Instant::now();
    let mut next_tick = shared.start + Duration::from_secs(1);
    let mut last_msgs = 0u64;
    let mut last_tick = shared.start;
    let why = loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = Instant::now();
        let msgs = sum(&shared, |s| &s.messages);
        if stop_flag.load(Relaxed) {
            break "signal";
        }
        if duration.is_some_and(|d| now >= shared.start + d) {
            break "--duration reached";
        }
        if a.max_messages.is_some_and(|m| msgs >= m) {
            break "--max-messages reached";
        }
        if executors.alive() < executors.len() {
            break "a shard stopped";
        }
        if a.stats_file.is_some() && now.duration_since(last_stats) >= Duration::from_millis(50) {
            let json = stats_json(&shared, &addrs, false);
            // Rewrite when anything but the clock readings changed (the last message time moves with the count).
            let mut cmp = json.clone();
            cmp["uptime_s"] = serde_json::Value::Null;
            cmp["last_message_unix_s"] = serde_json::Value::Null;
            let cmp = cmp.to_string();
            if last_json.as_deref() != Some(cmp.as_str()) {
                write_stats(false);
                last_json = Some(cmp);
            }
            last_stats = now;
        }
        if now >= next_tick {
            let dt = now.duration_since(last_tick).as_secs_f64();
            eprintln!(
                "[{:>5.0}s] conns {} open {} msgs {} ({:.0}/s) rcpt ok {} temp {} perm {} data_failed {}",
                now.duration_since(shared.start).as_secs_f64(),
                sum(&shared, |s| &s.connections),
                shared.open.load(Relaxed),
                msgs,
                (msgs - last_msgs) as f64 / dt.max(1e-9),
                sum(&shared, |s| &s.recipients_accepted),
                sum(&shared, |s| &s.recipients_tempfailed),
                sum(&shared, |s| &s.recipients_permfailed),
                sum(&shared, |s| &s.data_tempfailed) + sum(&shared, |s| &s.data_permfailed),
            );
            last_msgs = msgs;
            last_tick = now;
            next_tick += Duration::from_secs(1);
        }
    };
    eprintln!("shardmta-loadtest sink: stopping ({why})");
    shared.stop.store(true, Relaxed);
    let mut hists = SinkHists::new()?;
    // Sessions get their 421 within 2 s of the stop (see run_shard).
    let failed = executors.join(Instant::now() + Duration::from_secs(10)) > 0;
    for sh in finished
        .lock()
        .map(|mut v| std::mem::take(&mut *v))
        .unwrap_or_default()
    {
        let _ = hists.size.add(&sh.size);
        let _ = hists.msgs_per_conn.add(&sh.msgs_per_conn);
    }
    write_stats(true);
    print!("{}", summary_text(&shared, &addrs, &hists));
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn sum(shared: &Shared, f: fn(&ShardStats) -> &AtomicU64) -> u64 {
    shared.stats.iter().map(|s| f(s).load(Relaxed)).sum()
}

/// Seconds between the first and the last accepted message (0 if < 2).
fn active_secs(shared: &Shared) -> f64 {
    let first = shared
        .stats
        .iter()
        .map(|s| s.first_msg_us.load(Relaxed))
        .filter(|&v| v > 0)
        .min();
    let last = shared
        .stats
        .iter()
        .map(|s| s.last_msg_us.load(Relaxed))
        .max();
    match (first, last) {
        (Some(f), Some(l)) if l > f => (l - f) as f64 / 1e6,
        _ => 0.0,
    }
}

fn stats_json(shared: &Shared, addrs: &[String], finished: bool) -> serde_json::Value {
    let mut listeners = serde_json::Map::new();
    for (i, a) in addrs.iter().enumerate() {
        let c: u64 = shared
            .stats
            .iter()
            .map(|s| s.per_listener[i].0.load(Relaxed))
            .sum();
        let m: u64 = shared
            .stats
            .iter()
            .map(|s| s.per_listener[i].1.load(Relaxed))
            .sum();
        listeners.insert(
            a.clone(),
            serde_json::json!({"connections": c, "messages": m}),
        );
    }
    let data_temp = sum(shared, |s| &s.data_tempfailed);
    let data_perm = sum(shared, |s| &s.data_permfailed);
    let mut peers = std::collections::BTreeMap::<String, u64>::new();
    for s in &shared.stats {
        if let Ok(m) = s.per_peer.lock() {
            for (k, v) in m.iter() {
                *peers.entry(k.clone()).or_insert(0) += v;
            }
        }
    }
    // When the last accepted message was accepted, as Unix time (null: none yet), so a benchmark polling the
    // stats file times its last message exactly rather than to the 25 ms + 50 ms of publishing and writing.
    let last_us = shared
        .stats
        .iter()
        .map(|s| s.last_msg_us.load(Relaxed))
        .max()
        .unwrap_or(0);
    let uptime = shared.start.elapsed().as_secs_f64();
    let last_message_unix_s = (last_us > 0).then(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        now - uptime + (last_us - 1) as f64 / 1e6
    });
    serde_json::json!({
        "uptime_s": uptime,
        "last_message_unix_s": last_message_unix_s,
        "finished": finished,
        "shards": shared.stats.len(),
        "connections": sum(shared, |s| &s.connections),
        "tls_connections": sum(shared, |s| &s.tls_connections),
        "tls_failed": sum(shared, |s| &s.tls_failed),
        "open_connections": shared.open.load(Relaxed),
        "max_concurrent_connections": shared.max_open.load(Relaxed),
        "transactions": sum(shared, |s| &s.transactions),
        "messages": sum(shared, |s| &s.messages),
        "recipients_accepted": sum(shared, |s| &s.recipients_accepted),
        "recipients_tempfailed": sum(shared, |s| &s.recipients_tempfailed),
        "recipients_permfailed": sum(shared, |s| &s.recipients_permfailed),
        "data_failed": data_temp + data_perm,
        "data_tempfailed": data_temp,
        "data_permfailed": data_perm,
        "bytes": sum(shared, |s| &s.bytes),
        "auth_ok": sum(shared, |s| &s.auth_ok),
        "auth_failed": sum(shared, |s| &s.auth_failed),
        "save_errors": sum(shared, |s| &s.save_errors),
        "listeners": listeners,
        "peers": peers,
    })
}

fn summary_text(shared: &Shared, addrs: &[String], h: &SinkHists) -> String {
    let msgs = sum(shared, |s| &s.messages);
    let active = active_secs(shared);
    let mut out = format!(
        "sink: uptime_s {:.3} connections {} (tls {}) max_concurrent {}\n\
         messages: accepted {} tempfailed {} permfailed {} transactions {} bytes {}\n\
         recipients: accepted {} tempfailed {} permfailed {}\n\
         msgs_per_s: {:.1} (first to last accepted message, {:.3} s)\n",
        shared.start.elapsed().as_secs_f64(),
        sum(shared, |s| &s.connections),
        sum(shared, |s| &s.tls_connections),
        shared.max_open.load(Relaxed),
        msgs,
        sum(shared, |s| &s.data_tempfailed),
        sum(shared, |s| &s.data_permfailed),
        sum(shared, |s| &s.transactions),
        sum(shared, |s| &s.bytes),
        sum(shared, |s| &s.recipients_accepted),
        sum(shared, |s| &s.recipients_tempfailed),
        sum(shared, |s| &s.recipients_permfailed),
        if active > 0.0 {
            msgs as f64 / active
        } else {
            0.0
        },
        active,
    );
    out.push_str(&format!(
        "{:<14}{:>9}{:>9}{:>9}{:>9}{:>9}\n",
        "", "p50", "p90", "p99", "max", "count"
    ));
    for (name, h) in [("size_bytes", &h.size), ("msgs_per_conn", &h.msgs_per_conn)] {
        if h.is_empty() {
            out.push_str(&format!(
                "{name:<14}{:>9}{:>9}{:>9}{:>9}{:>9}\n",
                "-", "-", "-", "-", 0
            ));
        } else {
            out.push_str(&format!(
                "{name:<14}{:>9}{:>9}{:>9}{:>9}{:>9}\n",
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.9),
                h.value_at_quantile(0.99),
                h.max(),
                h.len()
            ));
        }
    }
    for (i, a) in addrs.iter().enumerate() {
        let c: u64 = shared
            .stats
            .iter()
            .map(|s| s.per_listener[i].0.load(Relaxed))
            .sum();
        let m: u64 = shared
            .stats
            .iter()
            .map(|s| s.per_listener[i].1.load(Relaxed))
            .sum();
        out.push_str(&format!("listen {a}: connections {c} messages {m}\n"));
    }
    let errs = sum(shared, |s| &s.save_errors);
    if errs > 0 {
        out.push_str(&format!("save_errors: {errs}\n"));
    }
    out
}

/// One shard's state, owned by its executor thread.
struct ShardCtx {
    id: usize,
    shared: Arc<Shared>,
    tally: RefCell<Tally>,
    first_msg: Cell<Option<Duration>>,
    last_msg: Cell<Duration>,
    hists: RefCell<SinkHists>,
    /// Open sessions' sockets, to end their reads at shutdown.
    open: RefCell<HashMap<u64, RawFd>>,
    next_conn: Cell<u64>,
    rng: Cell<u64>,
    /// Session input buffers (at most `FREE_BUFS_MAX` kept for reuse).
    in_bufs: BufferPool,
}

impl ShardCtx {
    fn stats(&self) -> &ShardStats {
        &self.shared.stats[self.id]
    }

    fn publish(&self) {
        let t = self.tally.borrow();
        let s = self.stats();
        s.transactions.store(t.transactions, Relaxed);
        s.messages.store(t.messages, Relaxed);
        s.recipients_accepted.store(t.recipients_accepted, Relaxed);
        s.recipients_tempfailed
            .store(t.recipients_tempfailed, Relaxed);
        s.recipients_permfailed
            .store(t.recipients_permfailed, Relaxed);
        s.data_tempfailed.store(t.data_tempfailed, Relaxed);
        s.data_permfailed.store(t.data_permfailed, Relaxed);
        s.bytes.store(t.bytes, Relaxed);
        s.auth_ok.store(t.auth_ok, Relaxed);
        s.auth_failed.store(t.auth_failed, Relaxed);
        if let Some(f) = self.first_msg.get() {
            s.first_msg_us.store(f.as_micros() as u64 + 1, Relaxed);
            s.last_msg_us
                .store(self.last_msg.get().as_micros() as u64 + 1, Relaxed);
        }
    }

    fn random(&self) -> u64 {
        let mut x = self.rng.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.set(x);
        x
    }
}

/// One sink shard's life inside its executor: listen (reported through `ready`), serve until the stop, then
/// hand its histograms to `done`.
async fn run_shard(
    id: usize,
    shared: Arc<Shared>,
    mut ready: Ready<String>,
    done: Arc<std::sync::Mutex<Vec<SinkHists>>>,
) {
    let hists = match SinkHists::new() {
        Ok(h) => h,
        Err(e) => return ready.failed(e),
    };
    let seed = (shared.start.elapsed().as_nanos() as u64) ^ ((id as u64 + 1) << 48) | 1;
    let ctx = Rc::new(ShardCtx {
        id,
        shared: shared.clone(),
        tally: RefCell::new(Tally::default()),
        first_msg: Cell::new(None),
        last_msg: Cell::new(Duration::ZERO),
        hists: RefCell::new(hists),
        open: RefCell::new(HashMap::new()),
        next_conn: Cell::new(0),
        rng: Cell::new(seed),
        in_bufs: BufferPool::new(IN_BUF, FREE_BUFS_MAX),
    });
    {
        let mut listeners = Vec::new();
        for (i, addr) in ctx.shared.opts.listen.iter().enumerate() {
            // The relay's own listener: SO_REUSEPORT (one per shard), non-blocking, and TCP_NODELAY that
            // every accepted connection inherits.
            match shardmta::privileges::bind_listener(*addr) {
                // SAFETY: a bound, listening socket whose ownership passes to the listener.
                Ok(fd) => {
                    listeners.push((i, unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) }))
                }
                Err(e) => {
                    return ready.failed(format!("shard {id}: cannot listen on {addr}: {e}"));
                }
            }
        }
        ready.ready();
        let (stop_tx, stop_rx) = glommio::channels::local_channel::new_bounded::<()>(1);
        let stop_rx = Rc::new(stop_rx);
        let accept_tasks: Vec<_> = listeners
            .into_iter()
            .map(|(i, l)| glommio::spawn_local(accept_loop(ctx.clone(), l, i, stop_rx.clone())))
            .collect();
        while !ctx.shared.stop.load(Relaxed) {
            glommio::timer::sleep(Duration::from_millis(25)).await;
            ctx.publish();
        }
        drop(stop_tx);
        for t in accept_tasks {
            t.await;
        }
        // End the reads of open sessions: each answers 421 and closes.
        for fd in ctx.open.borrow().values() {
            // SAFETY: the fd belongs to a live session socket (removed from
            // the map before the socket is dropped).
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) };
            let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Read);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while !ctx.open.borrow().is_empty() && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        ctx.publish();
    }
    ctx.publish();
    if let Ok(h) = SinkHists::new() {
        let h = std::mem::replace(&mut *ctx.hists.borrow_mut(), h);
        if let Ok(mut v) = done.lock() {
            v.push(h);
        }
    }
}

async fn accept_loop(
    ctx: Rc<ShardCtx>,
    listener: TcpListener,
    idx: usize,
    stop: Rc<glommio::channels::local_channel::LocalReceiver<()>>,
) {
    loop {
        let Some(accepted) = shardmta::net::accept_or_stop(&listener, &stop).await else {
            return;
        };
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                if ctx.shared.stop.load(Relaxed) {
                    return;
                }
                eprintln!("shardmta-loadtest sink: shard {}: accept: {e}", ctx.id);
                glommio::timer::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            if let Err(e) = serve(&ctx, stream, peer, idx).await {
                if !matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                        | io::ErrorKind::UnexpectedEof
                ) {
                    eprintln!("shardmta-loadtest sink: shard {}: session: {e}", ctx.id);
                }
            }
        })
        .detach();
    }
}

/// A plaintext or TLS connection (the crate's shared type).
type Conn = ServerConn;

/// "TLSv1.3" / "TLSv1.2" for the saved messages' X-Sink-TLS line.
fn tls_version_name(c: &rustls::ServerConnection) -> &'static str {
    match c.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "TLS",
    }
}

/// Takes the session off the shard's books when it ends, however it ends.
struct ConnGuard<'a> {
    ctx: &'a ShardCtx,
    key: u64,
    messages: Cell<u64>,
}

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        self.ctx.open.borrow_mut().remove(&self.key);
        self.ctx.shared.open.fetch_sub(1, Relaxed);
        self.ctx
            .hists
            .borrow_mut()
            .msgs_per_conn
            .saturating_record(self.messages.get().max(1));
    }
}

const IN_BUF: usize = 64 * 1024;
/// Input buffers a shard keeps for reuse (64 KiB each).
const FREE_BUFS_MAX: usize = 256;

async fn serve(
    ctx: &ShardCtx,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    listener: usize,
) -> io::Result<()> {
    let opts = &ctx.shared.opts;
    // TCP_NODELAY comes from the listener.
    // The ACKs of the client's commands ride on the replies (a sink answers every command at once).
    shardmta::net::delay_acks(&stream)?;
    stream.set_read_timeout(Some(opts.timeout))?;
    stream.set_write_timeout(Some(opts.timeout))?;
    // Only saved messages name the peer (its address came with the accept).
    let peer = opts.save_dir.as_ref().map(|_| peer);
    let local = opts.listen[listener];
    let key = ctx.next_conn.get();
    ctx.next_conn.set(key + 1);
    ctx.open.borrow_mut().insert(key, stream.as_raw_fd());
    let open = ctx.shared.open.fetch_add(1, Relaxed) + 1;
    ctx.shared.max_open.fetch_max(open, Relaxed);
    let stats = ctx.stats();
    stats.connections.fetch_add(1, Relaxed);
    stats.per_listener[listener].0.fetch_add(1, Relaxed);
    let guard = ConnGuard {
        ctx,
        key,
        messages: Cell::new(0),
    };

    let mut conn = Conn::Plain(stream);
    let mut tls_version: Option<&'static str> = None;
    if opts.implicit_tls {
        let Some(tls) = &ctx.shared.tls else {
            return Ok(());
        };
        match conn.accept_tls(tls).await.map(tls_version_name) {
            Ok(v) => {
                tls_version = Some(v);
                stats.tls_connections.fetch_add(1, Relaxed);
            }
            Err(e) => {
                stats.tls_failed.fetch_add(1, Relaxed);
                return Err(e);
            }
        }
    }
    let mut session = Session::new(&ctx.shared.cfg, ctx.id, tls_version.is_some(), ctx.random());
    let mut inbuf = ctx.in_bufs.take();
    let mut have = 0usize;
    let mut out = Vec::with_capacity(1024);
    if session.greeting(&mut out) == Action::Close {
        return conn.send_and_close(&mut out).await;
    }
    loop {
        let (used, action) = {
            let mut t = ctx.tally.borrow_mut();
            session.feed(&inbuf[..have], &mut out, &mut t)
        };
        if used > 0 {
            inbuf.copy_within(used..have, 0);
            have -= used;
        }
        match action {
            Action::NeedMore => {
                delay(ctx, &mut session, !out.is_empty()).await;
                conn.send(&mut out).await?;
                if have == inbuf.len() {
                    return Err(io::Error::other("input buffer full"));
                }
                let n = conn.read(&mut inbuf[have..]).await?;
                if n == 0 {
                    if ctx.shared.stop.load(Relaxed) {
                        out.extend_from_slice(b"421 4.3.2 Service shutting down\r\n");
                        let _ = conn.send_and_close(&mut out).await;
                    }
                    return Ok(());
                }
                have += n;
            }
            Action::Message => {
                let saved = match (&opts.save_dir, peer) {
                    (Some(dir), Some(peer)) => {
                        let ok = save(ctx, dir, &session, tls_version, peer, local).await;
                        if !ok {
                            stats.save_errors.fetch_add(1, Relaxed);
                        }
                        ok
                    }
                    _ => true,
                };
                let size = session.message().size;
                session.complete_message(saved, &mut out, &mut ctx.tally.borrow_mut());
                if saved {
                    let now = ctx.shared.start.elapsed();
                    if ctx.first_msg.get().is_none() {
                        ctx.first_msg.set(Some(now));
                    }
                    ctx.last_msg.set(now);
                    stats.per_listener[listener].1.fetch_add(1, Relaxed);
                    if let (Some(peer), Ok(mut m)) = (peer, stats.per_peer.lock()) {
                        let ip = peer.ip().to_string();
                        let key = if m.len() < PEERS_COUNTED_MAX || m.contains_key(&ip) {
                            ip
                        } else {
                            "other".to_string()
                        };
                        *m.entry(key).or_insert(0) += 1;
                    }
                    guard.messages.set(guard.messages.get() + 1);
                    ctx.hists.borrow_mut().size.saturating_record(size.max(1));
                }
            }
            Action::StartTls => {
                delay(ctx, &mut session, !out.is_empty()).await;
                conn.send(&mut out).await?;
                // Anything pipelined after STARTTLS is discarded (RFC 3207).
                have = 0;
                if opts.broken_tls {
                    return Ok(());
                }
                let Some(tls) = &ctx.shared.tls else {
                    return Ok(());
                };
                match conn.accept_tls(tls).await.map(tls_version_name) {
                    Ok(v) => {
                        tls_version = Some(v);
                        stats.tls_connections.fetch_add(1, Relaxed);
                        session.tls_started();
                    }
                    Err(e) => {
                        stats.tls_failed.fetch_add(1, Relaxed);
                        return Err(e);
                    }
                }
            }
            Action::Close => {
                delay(ctx, &mut session, !out.is_empty()).await;
                return conn.send_and_close(&mut out).await;
            }
        }
    }
}

/// Sleeps for the reply delays the session owes, and for the round trip when replies are about to be written
/// (`writing`).
async fn delay(ctx: &ShardCtx, session: &mut Session<'_>, writing: bool) {
    let n = session.take_delays();
    let opts = &ctx.shared.opts;
    let rtt = if writing { opts.rtt } else { Duration::ZERO };
    if (n == 0 || (opts.delay.is_zero() && opts.random_delay_ms == 0)) && rtt.is_zero() {
        return;
    }
    let mut total = opts.delay * n + rtt;
    if opts.random_delay_ms > 0 {
        for _ in 0..n {
            total += Duration::from_millis(ctx.random() % (opts.random_delay_ms + 1));
        }
    }
    glommio::timer::sleep(total).await;
}

/// The saved file's bytes: X-Sink trace lines, then the data as received.
pub fn saved_message(
    m: &crate::sink_session::MessageView<'_>,
    tls: Option<&str>,
    peer: SocketAddr,
    local: SocketAddr,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(m.data.len() + 256);
    f.extend_from_slice(b"X-Sink-Mail-From: <");
    f.extend_from_slice(m.mail_from);
    f.extend_from_slice(b">\r\n");
    for r in &m.rcpts {
        f.extend_from_slice(b"X-Sink-Rcpt-To: <");
        f.extend_from_slice(r);
        f.extend_from_slice(b">\r\n");
    }
    // Writing to a Vec cannot fail.
    let _ = write!(
        f,
        "X-Sink-TLS: {}\r\nX-Sink-Auth: {}\r\nX-Sink-Peer: {peer}\r\nX-Sink-Local: {local}\r\n",
        tls.unwrap_or("none"),
        m.auth_user.unwrap_or("none"),
    );
    f.extend_from_slice(m.data);
    f
}

/// Writes the message on a helper thread (temp file + rename).
async fn save(
    ctx: &ShardCtx,
    dir: &std::path::Path,
    session: &Session<'_>,
    tls: Option<&str>,
    peer: SocketAddr,
    local: SocketAddr,
) -> bool {
    let m = session.message();
    let bytes = saved_message(&m, tls, peer, local);
    let path = dir.join(format!("{}-{}.eml", ctx.id, m.id));
    let tmp = dir.join(format!(".{}-{}.tmp", ctx.id, m.id));
    let r = glommio::executor()
        .spawn_blocking(move || {
            std::fs::write(&tmp, &bytes)
                .and_then(|_| std::fs::rename(&tmp, &path))
                .map_err(|e| format!("{}: {e}", path.display()))
        })
        .await;
    match r {
        Ok(()) => true,
        Err(e) => {
            if ctx.stats().save_errors.load(Relaxed) == 0 {
                eprintln!("shardmta-loadtest sink: --save-dir: {e}");
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[test]
    fn listen_loopback_only_by_default() {
        assert!(resolve_listen(&["127.0.0.2:2526".into()], false).is_ok());
        assert!(resolve_listen(&["[::1]:2526".into()], false).is_ok());
        assert!(resolve_listen(&["10.0.0.1:25".into()], false).is_err());
        assert!(resolve_listen(&["10.0.0.1:25".into()], true).is_ok());
        assert!(resolve_listen(&["127.0.0.1:0".into()], false).is_err());
        assert!(resolve_listen(&["localhost:25".into()], false).is_err());
        assert!(resolve_listen(&["127.0.0.1:25".into(), "127.0.0.1:25".into()], false).is_err());
    }

    #[test]
    fn options_parse_and_validate() {
        let cli = crate::Cli::try_parse_from([
            "shardmta-loadtest",
            "sink",
            "--listen",
            "127.0.0.2:2526",
            "--listen",
            "127.0.0.3:2526",
            "--tempfail-rate",
            "0.1",
            "--auth",
            "u:p:x",
            "--no-8bitmime",
            "--size-limit",
            "1000",
        ])
        .expect("parse");
        let crate::Cmd::Sink(a) = cli.cmd else {
            panic!("not sink")
        };
        assert_eq!(a.listen.len(), 2);
        let c = build_config(&a).expect("valid");
        assert_eq!(c.auth, Some(("u".into(), "p:x".into())));
        assert!(!c.eightbitmime && c.smtputf8 && c.pipelining);
        assert_eq!(c.size_limit, Some(1000));
        assert!(!c.keep_data);
        let mut bad = a.clone();
        bad.tempfail_rate = 0.7;
        bad.permfail_rate = 0.7;
        assert!(build_config(&bad).is_err());
        let mut bad = a.clone();
        bad.auth = Some("nopass".into());
        assert!(build_config(&bad).is_err());
        let mut b = a.clone();
        b.broken_tls = true;
        assert!(build_config(&b).expect("valid").starttls);
        b.implicit_tls = true;
        assert!(build_config(&b).is_err());
        assert!(crate::Cli::try_parse_from(["x", "sink", "--greeting-code", "99"]).is_err());
    }

    #[test]
    fn saved_message_format() {
        let cfg = SinkConfig::test();
        let mut s = Session::new(&cfg, 3, false, 1);
        let mut out = Vec::new();
        let mut t = Tally::default();
        let input = b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\nSubject: s\r\n\r\n..body\r\n.\r\n";
        let (_, a) = s.feed(input, &mut out, &mut t);
        assert_eq!(a, Action::Message);
        let f = saved_message(
            &s.message(),
            Some("TLSv1.3"),
            "127.0.0.1:4000".parse().unwrap(),
            "127.0.0.2:2526".parse().unwrap(),
        );
        assert_eq!(
            String::from_utf8(f).unwrap(),
            "X-Sink-Mail-From: <a@x>\r\nX-Sink-Rcpt-To: <b@y>\r\nX-Sink-Rcpt-To: <c@y>\r\n\
             X-Sink-TLS: TLSv1.3\r\nX-Sink-Auth: none\r\nX-Sink-Peer: 127.0.0.1:4000\r\n\
             X-Sink-Local: 127.0.0.2:2526\r\nSubject: s\r\n\r\n.body\r\n"
        );
    }

    #[test]
    fn stats_json_has_the_documented_keys() {
        let shared = Shared {
            opts: Opts {
                listen: vec!["127.0.0.1:1".parse().unwrap()],
                delay: Duration::ZERO,
                random_delay_ms: 0,
                rtt: Duration::ZERO,
                implicit_tls: false,
                broken_tls: false,
                save_dir: None,
                timeout: Duration::from_secs(1),
            },
            cfg: SinkConfig::test(),
            tls: None,
            stop: AtomicBool::new(false),
            start: Instant::now(),
            stats: vec![ShardStats {
                per_listener: vec![Default::default()],
                ..Default::default()
            }],
            open: AtomicU64::new(0),
            max_open: AtomicU64::new(0),
        };
        shared.stats[0].messages.store(5, Relaxed);
        shared.stats[0].per_listener[0].1.store(5, Relaxed);
        let v = stats_json(&shared, &["127.0.0.1:1".into()], true);
        for k in [
            "connections",
            "tls_connections",
            "transactions",
            "messages",
            "recipients_accepted",
            "recipients_tempfailed",
            "recipients_permfailed",
            "data_failed",
            "bytes",
            "max_concurrent_connections",
            "listeners",
            "finished",
            "last_message_unix_s",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
        assert_eq!(v["messages"], 5);
        assert_eq!(v["listeners"]["127.0.0.1:1"]["messages"], 5);
        let text = summary_text(&shared, &["127.0.0.1:1".into()], &SinkHists::new().unwrap());
        assert!(text.contains("listen 127.0.0.1:1: connections 0 messages 5"));
    }
}
