//! shardmta-loadtest: SMTP load generator (thread-per-core, glommio).
//!
//! `shardmta-loadtest send` drives any SMTP server over loopback and
//! reports throughput, outcome counts and latency percentiles.
//! `shardmta-loadtest sink` is an SMTP server that accepts and counts (see
//! sink.rs for the saved-message format and the stats file).
//! Exit status: 0 on a completed run, 1 if a shard failed to start, the run
//! was aborted (--max-conn-errors) or no message got a final reply, 2 on
//! bad options.

mod chart;
mod domains;
mod eml;
mod progress;
mod report;
mod series;
mod shard;
mod sink;
mod sink_session;
mod smtp;

use shardmta::shard::runtime::Executors;
use std::fs::{File, OpenOptions};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};

use domains::Domains;
use report::{Hists, RunConfig, Summary};
use shard::{Config, Shared};

#[derive(Parser, Debug)]
#[command(
    name = "shardmta-loadtest",
    version,
    about = "SMTP load generator for shardmta"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Send messages to an SMTP server and report throughput and latency.
    Send(SendArgs),
    /// Accept and count mail: an SMTP server for end-to-end tests and benchmarks.
    Sink(sink::SinkArgs),
    /// Answer DNS queries (UDP and TCP) from a few MX and A records given on the command line, so a benchmark
    /// can route by MX on loopback; prints `listening on IP:PORT` and runs until killed or `--duration`. Built
    /// only with the `test-support` feature (`cargo build --release --features test-support --bin
    /// shardmta-loadtest`), as the responder is test support.
    #[cfg(feature = "test-support")]
    Dns(DnsArgs),
}

#[cfg(feature = "test-support")]
#[derive(Args, Debug, Clone)]
struct DnsArgs {
    /// Loopback address to listen on (an ephemeral port is chosen and printed).
    #[arg(long, default_value = "127.0.0.53")]
    listen: std::net::IpAddr,
    /// DOMAIN=HOST: an MX record (preference 10); repeatable.
    #[arg(long = "mx")]
    mx: Vec<String>,
    /// HOST=IPV4: an A record; repeatable.
    #[arg(long = "a")]
    a: Vec<String>,
    /// Stop after this many seconds (default: run until killed).
    #[arg(long)]
    duration: Option<f64>,
}

#[cfg(feature = "test-support")]
fn dns(args: DnsArgs) -> Result<ExitCode, String> {
    if !args.listen.is_loopback() {
        return Err(format!("{}: only loopback addresses", args.listen));
    }
    let pair = |s: &str| {
        s.split_once('=')
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .ok_or_else(|| format!("{s:?}: expected NAME=VALUE"))
    };
    let server = shardmta::dns::testserver::TestDns::start(args.listen);
    for m in &args.mx {
        let (domain, host) = pair(m)?;
        server.add_mx(&domain, 10, &host);
    }
    for a in &args.a {
        let (host, ip) = pair(a)?;
        let ip: std::net::Ipv4Addr = ip.parse().map_err(|e| format!("{a:?}: {e}"))?;
        server.add_a(&host, ip);
    }
    println!("listening on {}", server.addr());
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let until = args
        .duration
        .map(|d| std::time::Instant::now() + std::time::Duration::from_secs_f64(d.clamp(0.0, 1e7)));
    loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        if until.is_some_and(|u| std::time::Instant::now() >= u) {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

#[derive(Args, Debug, Clone)]
struct SendArgs {
    /// SMTP server HOST:PORT; repeat to spread connections round-robin.
    #[arg(long = "target", default_value = "127.0.0.1:2525")]
    targets: Vec<String>,
    /// Allow targets outside 127.0.0.0/8 and ::1.
    #[arg(long)]
    allow_remote: bool,
    /// Concurrent connections (split across shards).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    connections: u32,
    /// Total messages to send.
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    /// Stop after this many seconds even if messages remain.
    #[arg(long)]
    duration: Option<f64>,
    /// Open-loop target rate in messages per second over all connections: message N starts at N/RATE seconds
    /// (or as soon as a connection is free after that); adds the scheduled_to_250 latency row.
    #[arg(long)]
    rate: Option<f64>,
    /// Message size in bytes (headers + body, without the final ".").
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(0..=(1u64 << 30)))]
    size: u64,
    /// Recipients per message.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    rcpts: u32,
    /// Envelope sender.
    #[arg(long, default_value = "loadtest@example.com")]
    from: String,
    /// Recipient domain; recipients are user<N>@DOMAIN.
    #[arg(long, default_value = "example.net")]
    to_domain: String,
    /// DOMAIN[:WEIGHT] (weight 1 to 1000000, default 1); repeat to spread
    /// recipients over domains by weight (instead of --to-domain).
    #[arg(long = "domain", conflicts_with = "to_domain")]
    domains: Vec<String>,
    /// Send these messages instead of generated ones: a .eml file or a
    /// directory of *.eml files (each at most 64 MiB, at most 100000 entries),
    /// cycled round-robin; LF becomes CRLF, lines are dot-stuffed, and an
    /// X-Loadtest-Id header is prepended.
    #[arg(long, conflicts_with = "size")]
    eml: Option<PathBuf>,
    /// Issue STARTTLS after EHLO (the server's certificate is not verified)
    /// and fail the connection if it is not offered.
    #[arg(long)]
    starttls: bool,
    /// USER:PASSWORD: authenticate with AUTH PLAIN after EHLO (needs
    /// --starttls unless --auth-plaintext).
    #[arg(long)]
    auth: Option<String>,
    /// Allow --auth without TLS.
    #[arg(long, requires = "auth")]
    auth_plaintext: bool,
    /// EHLO name.
    #[arg(long, default_value = "loadtest.localhost")]
    helo: String,
    /// Open a new connection for every message.
    #[arg(long)]
    new_connection: bool,
    /// After the reply to QUIT, close with an RST (SO_LINGER 0) instead of a FIN: neither side keeps the
    /// connection in TIME_WAIT, so --new-connection does not run out of ephemeral ports against a server that
    /// waits for the client to close. The server sees a reset after its 221.
    #[arg(long)]
    close_with_reset: bool,
    /// Do not pipeline MAIL/RCPT/DATA even if the server offers PIPELINING.
    #[arg(long)]
    no_pipelining: bool,
    /// Send each message with BDAT (RFC 3030) instead of DATA: MAIL, the RCPTs, `BDAT <size> LAST` and the
    /// message go out in one write. Needs CHUNKING and PIPELINING from the server (the connection fails
    /// otherwise).
    #[arg(long, conflicts_with = "no_pipelining")]
    chunking: bool,
    /// With --chunking: transactions in flight per connection (1 to 64); the next ones are written before the
    /// replies to the earlier ones are read. Not with --rate.
    #[arg(long, default_value_t = 1, requires = "chunking", conflicts_with = "rate",
          value_parser = clap::value_parser!(u32).range(1..=64))]
    window: u32,
    /// Number of glommio executors (default: number of usable CPUs).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    shards: Option<u32>,
    /// Do not pin shards to CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Write the summary and the per-second series as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a report: FILE.html is a self-contained page (charts and tables),
    /// FILE.svg the charts alone.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Append "<message-id-token> <queue-id>" for every accepted message.
    #[arg(long)]
    record_ids: Option<PathBuf>,
    /// Connect / read / write timeout in seconds.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Pause before reconnecting after a connection error, in milliseconds.
    #[arg(long, default_value_t = 100)]
    retry_pause_ms: u64,
    /// Abort the run after this many connection errors (0 = never).
    #[arg(long, default_value_t = 1000)]
    max_conn_errors: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Send(args) => match send(args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("shardmta-loadtest: error: {e}");
                ExitCode::from(2)
            }
        },
        #[cfg(feature = "test-support")]
        Cmd::Dns(args) => match dns(args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("shardmta-loadtest dns: error: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::Sink(args) => match sink::sink(args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("shardmta-loadtest sink: error: {e}");
                ExitCode::from(2)
            }
        },
    }
}

fn is_loopback(addr: &SocketAddr) -> bool {
    match addr {
        SocketAddr::V4(a) => a.ip().is_loopback(),
        SocketAddr::V6(a) => {
            a.ip().is_loopback() || a.ip().to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

fn resolve_targets(targets: &[String], allow_remote: bool) -> Result<Vec<SocketAddr>, String> {
    let mut out = Vec::with_capacity(targets.len());
    for t in targets {
        let addr = t
            .to_socket_addrs()
            .map_err(|e| format!("--target {t}: {e}"))?
            .next()
            .ok_or_else(|| format!("--target {t}: resolves to no address"))?;
        if !allow_remote && !is_loopback(&addr) {
            return Err(format!(
                "--target {t} ({addr}) is not a loopback address; pass --allow-remote to load a remote server"
            ));
        }
        out.push(addr);
    }
    Ok(out)
}

/// Rejects values that would corrupt the SMTP commands or headers.
fn check_token(name: &str, v: &str) -> Result<(), String> {
    if v.is_empty()
        || v.len() > 255
        || v.bytes()
            .any(|b| !(0x21..0x7f).contains(&b) || b == b'<' || b == b'>')
    {
        return Err(format!(
            "{name} {v:?}: must be 1-255 printable ASCII characters without spaces or <>"
        ));
    }
    Ok(())
}

/// CPUs this process may run on.
/// The CPUs this process may run on (the server's placement rule).
fn usable_cpus() -> Vec<usize> {
    shardmta::shard::runtime::usable_cpus().unwrap_or_else(|_| {
        (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
    })
}

/// glommio refuses to start below 512 KiB of lockable memory: raise the soft limit (failure is harmless here:
/// glommio then reports it).
fn raise_memlock() {
    let _ = shardmta::shard::runtime::raise_memlock(8 << 20);
}

/// `AUTH PLAIN <base64(\0user\0password)>\r\n` from `USER:PASSWORD`.
fn auth_credentials(user_pass: &str) -> Result<(String, String), String> {
    let Some((user, pass)) = user_pass.split_once(':') else {
        return Err("--auth: expected USER:PASSWORD".into());
    };
    if user.is_empty() || user.len() > 255 || pass.len() > 255 || user_pass.contains('\0') {
        return Err("--auth: USER must be 1-255 bytes, PASSWORD at most 255, no NUL".into());
    }
    Ok((user.to_string(), pass.to_string()))
}

/// TLS client settings for --starttls: test servers have self-signed
/// certificates, so none is verified.
fn tls_client_config() -> Arc<rustls::ClientConfig> {
    shardmta::tls::install_crypto_provider();
    Arc::new(
        rustls::ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(shardmta::delivery::outbound::NoVerify))
            .with_no_client_auth(),
    )
}

fn run_nonce() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 40)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReportKind {
    Html,
    Svg,
}

fn report_kind(p: &Path) -> Result<ReportKind, String> {
    let ext = p
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("html" | "htm") => Ok(ReportKind::Html),
        Some("svg") => Ok(ReportKind::Svg),
        _ => Err(format!(
            "--report {}: the name must end in .html or .svg",
            p.display()
        )),
    }
}

fn send(a: SendArgs) -> Result<ExitCode, String> {
    let targets = resolve_targets(&a.targets, a.allow_remote)?;
    let report = match &a.report {
        Some(p) => Some((p.clone(), report_kind(p)?)),
        None => None,
    };
    check_token("--from", &a.from)?;
    check_token("--to-domain", &a.to_domain)?;
    check_token("--helo", &a.helo)?;
    if a.to_domain.contains('@') {
        return Err("--to-domain must not contain '@'".into());
    }
    let domains = if a.domains.is_empty() {
        Domains::single(&a.to_domain)
    } else {
        Domains::parse(&a.domains, |d| check_token("--domain", d))?
    };
    let auth = match &a.auth {
        Some(up) => {
            if !a.starttls && !a.auth_plaintext {
                return Err(
                    "--auth sends the password: use it with --starttls, or add --auth-plaintext"
                        .into(),
                );
            }
            Some(auth_credentials(up)?)
        }
        None => None,
    };
    let tls = a.starttls.then(tls_client_config);
    let eml = match &a.eml {
        Some(p) => Some(Arc::new(eml::load(p, !a.chunking)?)),
        None => None,
    };
    if !(a.timeout.is_finite() && a.timeout > 0.0 && a.timeout <= 86_400.0) {
        return Err("--timeout must be > 0 and at most 86400".into());
    }
    let io_timeout = Duration::from_secs_f64(a.timeout);
    let duration = match a.duration {
        // At most a year: keeps the deadline arithmetic far from overflow.
        Some(d) if d.is_finite() && d > 0.0 && d <= 366.0 * 86_400.0 => {
            Some(Duration::from_secs_f64(d))
        }
        Some(d) => return Err(format!("--duration {d}: must be > 0 and at most a year")),
        None => None,
    };
    // Bounded so that message N's start, N / RATE seconds, stays a valid Duration.
    if let Some(r) = a
        .rate
        .filter(|r| !(r.is_finite() && (0.001..=1e9).contains(r)))
    {
        return Err(format!("--rate {r}: must be 0.001 to 1e9"));
    }
    let record_file: Option<File> = match &a.record_ids {
        Some(p) => Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| format!("--record-ids {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let cpus = usable_cpus();
    let connections = a.connections as usize;
    let shards = (a.shards.map_or(cpus.len(), |s| s as usize))
        .min(connections)
        .max(1);

    raise_memlock();
    let start = Instant::now();
    let cfg = Config {
        targets,
        messages: a.messages,
        deadline: duration.map(|d| start + d),
        start,
        rate: a.rate,
        size: a.size as usize,
        rcpts: a.rcpts as usize,
        from: a.from.clone(),
        domains: domains.clone(),
        eml: eml.clone(),
        tls,
        auth,
        helo: a.helo.clone(),
        new_connection: a.new_connection,
        close_with_reset: a.close_with_reset,
        pipelining: !a.no_pipelining,
        chunking: a.chunking,
        window: a.window as usize,
        io_timeout,
        retry_pause: Duration::from_millis(a.retry_pause_ms),
        max_conn_errors: a.max_conn_errors,
        stop_grace: io_timeout.min(Duration::from_secs(2)),
    };
    let shared = Arc::new(Shared::new(cfg, shards, run_nonce(), record_file));

    // The server's runtime: one executor per shard (no file I/O here: little registered memory).
    let done: Arc<std::sync::Mutex<Vec<Result<Hists, String>>>> = Arc::default();
    let mut executors: Executors<String> = Executors::new();
    for s in 0..shards {
        let conn_ids: Vec<usize> = (s..connections).step_by(shards).collect();
        let cpu = (!a.no_pin).then(|| cpus[s % cpus.len()]);
        let (sh, d) = (shared.clone(), done.clone());
        executors
            .spawn_with_io_memory(
                &format!("loadtest-{s}"),
                cpu,
                1,
                Some(64 * 1024),
                move |ready| shard::run_shard(s, conn_ids, sh, ready, d),
            )
            .map_err(|e| e.to_string())?;
    }

    // Progress, once a second, until every shard is done.
    progress::set_live(progress::stderr_is_tty());
    let mut last = shared.counters.snapshot();
    let mut last_t = start;
    let mut next_tick = start + Duration::from_secs(1);
    while executors.alive() > 0 {
        std::thread::sleep(Duration::from_millis(20));
        let now = Instant::now();
        if now >= next_tick {
            let cur = shared.counters.snapshot();
            let dt = now.duration_since(last_t).as_secs_f64();
            let rate = (cur.done() - last.done()) as f64 / dt.max(1e-9);
            let point = shared.series.last();
            progress::show(&progress::line(
                now.duration_since(start).as_secs_f64(),
                rate,
                &cur,
                point.as_ref(),
            ));
            last = cur;
            last_t = now;
            next_tick += Duration::from_secs(1);
        }
    }
    progress::set_live(false);
    let elapsed = start.elapsed();

    let mut hists = Hists::new()?;
    // An executor that could not even start never reported: the join says so.
    let mut failed = executors.join(Instant::now() + Duration::from_secs(10)) > 0;
    let reports = done
        .lock()
        .map(|mut v| std::mem::take(&mut *v))
        .unwrap_or_default();
    if reports.len() < shards {
        eprintln!("shardmta-loadtest: a shard did not start (io_uring and RLIMIT_MEMLOCK >= 512 KiB are needed; check `ulimit -l`)");
        failed = true;
    }
    for r in reports {
        match r {
            Ok(sh) => hists.merge(&sh)?,
            Err(e) => {
                eprintln!("shardmta-loadtest: {e}");
                failed = true;
            }
        }
    }

    let config = RunConfig {
        targets: shared.cfg.targets.iter().map(|t| t.to_string()).collect(),
        connections,
        messages: a.messages,
        duration_s: a.duration,
        size: a.size as usize,
        rcpts: a.rcpts as usize,
        shards,
        pipelining: !a.no_pipelining,
        chunking: a.chunking,
        window: a.window as usize,
        new_connection: a.new_connection,
        close_with_reset: a.close_with_reset,
        domains: domains.describe(),
        eml: a.eml.as_ref().map(|p| p.display().to_string()),
        eml_messages: eml.as_ref().map_or(0, |e| e.len()),
        starttls: a.starttls,
        auth: a.auth.is_some(),
    };
    let aborted = shared.abort_reason();
    let mut summary = Summary::build(&shared.counters, &hists, elapsed, aborted.clone(), config);
    (summary.series, summary.series_truncated) = shared.series.finish(elapsed.as_secs_f64());
    print!("{}", summary.to_text());
    if let Some(p) = &a.json {
        let json = serde_json::to_string_pretty(&summary).map_err(|e| format!("json: {e}"))?;
        std::fs::write(p, json + "\n").map_err(|e| format!("--json {}: {e}", p.display()))?;
    }
    if let Some((p, kind)) = &report {
        let text = match kind {
            ReportKind::Html => chart::render_html(&summary, &hists),
            ReportKind::Svg => chart::render_svg(&summary, &hists),
        };
        std::fs::write(p, text).map_err(|e| format!("--report {}: {e}", p.display()))?;
    }
    // Non-zero when the run could not do its job: a shard failed, it was
    // aborted, or not a single message got a final reply.
    let nothing_sent = a.messages > 0 && summary.sent == 0;
    if nothing_sent {
        eprintln!("shardmta-loadtest: no message got a final reply");
    }
    Ok(if failed || aborted.is_some() || nothing_sent {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_only_by_default() {
        assert!(resolve_targets(&["127.0.0.1:2525".into()], false).is_ok());
        assert!(resolve_targets(&["127.9.9.9:25".into()], false).is_ok());
        assert!(resolve_targets(&["[::1]:2525".into()], false).is_ok());
        assert!(resolve_targets(&["[::ffff:127.0.0.1]:25".into()], false).is_ok());
        assert!(resolve_targets(&["10.0.0.1:25".into()], false).is_err());
        assert!(resolve_targets(&["[2001:db8::1]:25".into()], false).is_err());
        assert!(resolve_targets(&["10.0.0.1:25".into()], true).is_ok());
        assert!(resolve_targets(&["no-port".into()], false).is_err());
    }

    #[test]
    fn tokens_validated() {
        assert!(check_token("--from", "a@b.c").is_ok());
        assert!(check_token("--from", "a b").is_err());
        assert!(check_token("--from", "a\r\nRCPT").is_err());
        assert!(check_token("--from", "").is_err());
        assert!(check_token("--from", "<x>").is_err());
    }

    #[test]
    fn report_kind_from_extension() {
        assert_eq!(report_kind(Path::new("r.html")), Ok(ReportKind::Html));
        assert_eq!(report_kind(Path::new("/x/R.HTM")), Ok(ReportKind::Html));
        assert_eq!(report_kind(Path::new("r.svg")), Ok(ReportKind::Svg));
        assert!(report_kind(Path::new("r.png")).is_err());
        assert!(report_kind(Path::new("report")).is_err());
    }

    #[test]
    fn auth_plain_encoding() {
        let (u, p) = auth_credentials("tim:tanstaaftanstaaf").expect("ok");
        assert_eq!(
            shardmta::smtp::client::auth_plain(&u, &p),
            "AUTH PLAIN AHRpbQB0YW5zdGFhZnRhbnN0YWFm\r\n"
        );
        // The password may contain ':'.
        assert_eq!(
            auth_credentials("u:p:q").expect("ok"),
            ("u".to_string(), "p:q".to_string())
        );
        assert!(auth_credentials("nocolon").is_err());
        assert!(auth_credentials(":p").is_err());
    }

    #[test]
    fn option_conflicts() {
        let parse = |v: &[&str]| Cli::try_parse_from([&["shardmta-loadtest", "send"], v].concat());
        assert!(parse(&["--domain", "a.net:2", "--domain", "b.org"]).is_ok());
        assert!(parse(&["--domain", "a.net", "--to-domain", "b.org"]).is_err());
        assert!(parse(&["--eml", "x.eml", "--size", "10"]).is_err());
        assert!(parse(&["--auth-plaintext"]).is_err());
        assert!(parse(&["--auth", "u:p", "--auth-plaintext"]).is_ok());
    }

    #[test]
    fn cli_defaults() {
        let cli = Cli::try_parse_from(["shardmta-loadtest", "send"]).expect("parse");
        let Cmd::Send(a) = cli.cmd else {
            panic!("not send")
        };
        assert_eq!(a.targets, vec!["127.0.0.1:2525".to_string()]);
        assert_eq!(a.connections, 50);
        assert_eq!(a.messages, 10_000);
        assert_eq!(a.size, 1024);
        assert_eq!(a.rcpts, 1);
        let cli = Cli::try_parse_from([
            "shardmta-loadtest",
            "send",
            "--target",
            "127.0.0.1:1",
            "--target",
            "127.0.0.1:2",
        ])
        .expect("parse");
        let Cmd::Send(a) = cli.cmd else {
            panic!("not send")
        };
        assert_eq!(a.targets.len(), 2);
    }
}
