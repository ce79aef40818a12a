//! The `shardmta` command: `serve`, `check-config`, `queue` (list, cat, hold, release, delete, flush, bounce),
//! `reload`, `passwd`, `stats`, `suppression`, `shaping` (show, status, cancel), `dkim keygen`; and `sendmail` (also when invoked as `sendmail`, `mailq` or `newaliases`),
//! handed to [`shardmta::sendmail`].
//!
//! The configuration: `--config FILE`, else `$SHARDMTA_CONFIG`, else `/etc/shardmta/shardmta.toml` when it
//! exists, else the embedded defaults.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shardmta::config::Config;
use shardmta::control::client;
use shardmta::control::{QueueAction, QueueCommand, QueueCommandReport, Selector};

#[derive(Parser)]
#[command(
    name = "shardmta",
    version,
    about = "Thread-per-core outbound mail relay and smarthost"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the relay (embedded defaults when no --config is given).
    Serve {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration and print the effective settings, defaults included.
    CheckConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Inspect the queue (works with the server stopped).
    Queue {
        #[command(subcommand)]
        command: QueueCmd,
    },
    /// Print a users-file line (`user:{SHA512-CRYPT}$6$...`) for smtpd_sasl_users_file; reads the password from stdin.
    Passwd { user: String },
    /// Print the running server's counters (<queue_directory>/stats.json).
    Stats {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Ask the running server to reload its configuration (as SIGHUP does).
    Reload {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// The suppression list: recipients and domains never delivered to (bounced before routing).
    Suppression {
        #[command(subcommand)]
        command: SuppressionCmd,
    },
    /// Traffic shaping: what applies to a domain, and the automation's actions.
    Shaping {
        #[command(subcommand)]
        command: ShapingCmd,
    },
    /// DKIM keys.
    Dkim {
        #[command(subcommand)]
        command: DkimCmd,
    },
}

#[derive(Subcommand)]
enum SuppressionCmd {
    /// Add an address (user@example.com) or a domain (@example.com or example.com).
    Add {
        entry: String,
        /// Why (shown in the bounce: "recipient suppressed: REASON").
        #[arg(long)]
        reason: Option<String>,
        /// The entry stops applying after this long (Postfix time units: 3600s, 12h, 30d); default: never.
        #[arg(long)]
        expires_in: Option<shardmta::config::PfDuration>,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Remove an entry.
    Remove {
        entry: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print every entry (read from the spool's file: the server running or stopped).
    List {
        #[arg(long)]
        json: bool,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Say whether an address is suppressed, and by which entry (exit status 1 if it is not).
    Check {
        address: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ShapingCmd {
    /// Resolve DOMAIN's MX hosts as the server would and print its site, each limit with the rule that set
    /// it, and the automation rules that watch the site.
    Show {
        domain: String,
        /// The egress source the mail would leave from.
        #[arg(long)]
        source: Option<String>,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// The automation's active actions (from the running server; from the spool's files when it is stopped).
    Status {
        #[arg(long)]
        json: bool,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// End an active action now (the running server's).
    Cancel {
        id: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DkimCmd {
    /// Write a new signing key (mode 0600; never over an existing file) and print the DNS TXT record to
    /// publish and the [[dkim]] entry to add.
    Keygen {
        /// The signing domain (d=).
        #[arg(long)]
        domain: String,
        /// The selector (s=).
        #[arg(long)]
        selector: String,
        /// rsa-2048 or ed25519.
        #[arg(long, default_value = "rsa-2048")]
        algorithm: shardmta::dkim::KeyAlgorithm,
        /// The key file to write. Default: ./<domain>.<selector>.pem
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Which messages a queue change applies to: IDs, `--all`, or `--domain`.
#[derive(clap::Args)]
struct Selection {
    /// Queue IDs (16 hex digits), as `queue list` shows them.
    ids: Vec<String>,
    /// Every queued message.
    #[arg(long, conflicts_with_all = ["ids", "domain"])]
    all: bool,
    /// Messages with a recipient in this domain, or whose next hop is this host (for `flush`: only those
    /// recipients).
    #[arg(long, conflicts_with = "ids")]
    domain: Option<String>,
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum QueueCmd {
    /// ID, age, size, sender and recipients with their state and the reason of their last deferral, like
    /// `mailq` (`!` after the ID: held).
    List {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
        /// Only held messages.
        #[arg(long, conflicts_with = "deferred")]
        held: bool,
        /// Only messages with a deferred recipient (not held).
        #[arg(long)]
        deferred: bool,
        /// Open recipients per domain and age, like qshape (with --json: the same as JSON).
        #[arg(long)]
        summary: bool,
    },
    /// Print queued messages as stored (Received header + data), like `postcat -q`. With several IDs each is
    /// preceded by a line `==> ID <==`.
    Cat {
        #[arg(required = true)]
        ids: Vec<String>,
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Only the stored message, without the envelope section.
        #[arg(long, short = 'm')]
        message_only: bool,
    },
    /// Hold messages: never delivered until released (postsuper -h).
    Hold(Selection),
    /// Release held messages; their due recipients are tried at once (postsuper -H).
    Release(Selection),
    /// Delete messages without a bounce (postsuper -d).
    Delete(Selection),
    /// Make deferred recipients due now (postqueue -f, -s).
    Flush(Selection),
    /// Return messages to their senders now, with a bounce (DSN).
    Bounce(Selection),
}

/// `dkim keygen`: the key file, then the DNS record and the configuration entry on stdout.
fn dkim_keygen(
    domain: &str,
    selector: &str,
    algorithm: shardmta::dkim::KeyAlgorithm,
    out: Option<PathBuf>,
) -> Result<(), String> {
    use shardmta::dkim::{key, normalize, SigningKey};
    let domain = normalize(domain);
    // The same checks as the configuration's.
    let probe = Config {
        dkim: vec![shardmta::config::DkimKeyConfig {
            domain: domain.clone(),
            selector: selector.to_string(),
            private_key_file: PathBuf::new(),
            headers: None,
        }],
        ..Config::default()
    };
    if let Some(p) = probe.problems().into_iter().find(|p| p.starts_with("dkim")) {
        return Err(p);
    }
    let path = out.unwrap_or_else(|| PathBuf::from(format!("{domain}.{selector}.pem")));
    let pem = key::generate_pem(algorithm)?;
    let k = SigningKey::from_pem(pem.as_bytes())
        .map_err(|e| format!("the new key does not read back: {e:?}"))?;
    key::write_new_key_file(&path, &pem).map_err(|e| {
        format!(
            "cannot write {}: {e} (an existing file is never replaced)",
            path.display()
        )
    })?;
    let abs = std::fs::canonicalize(&path).unwrap_or(path.clone());
    println!("; the DNS record to publish:");
    println!(
        "{}",
        key::dns_txt_line(&domain, selector, &k.dns_record_value())
    );
    println!();
    println!("# the entry for the configuration:");
    println!("[[dkim]]");
    println!("domain = \"{domain}\"");
    println!("selector = \"{selector}\"");
    println!("private_key_file = \"{}\"", abs.display());
    eprintln!("wrote {} ({}, mode 0600)", path.display(), k.algorithm());
    Ok(())
}

/// The configuration file to read: the one given, else `$SHARDMTA_CONFIG`, else `/etc/shardmta/shardmta.toml`
/// when it exists; `None`: the embedded defaults.
fn config_path(given: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = given {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("SHARDMTA_CONFIG").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let p = PathBuf::from("/etc/shardmta/shardmta.toml");
    p.exists().then_some(p)
}

fn load(given: Option<&Path>) -> Result<Config, String> {
    match config_path(given) {
        Some(p) => Config::load(&p).map_err(|e| e.to_string()),
        None => Ok(Config::default()),
    }
}

fn main() -> ExitCode {
    // `shardmta sendmail ...`, or the binary installed as `sendmail`, `mailq` or `newaliases`: sendmail's own
    // command line. Arguments that are not UTF-8 are taken lossily (the relay refuses such an address).
    let argv: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    use shardmta::sendmail;
    if let Some(mode) = argv.first().and_then(|a| sendmail::invoked_as(a)) {
        return ExitCode::from(sendmail::main(mode, &argv[1..]));
    }
    if argv.get(1).map(String::as_str) == Some("sendmail") {
        return ExitCode::from(sendmail::main(sendmail::Mode::Deliver, &argv[2..]));
    }
    finish(run(Cli::parse()))
}

fn finish(r: Result<(), String>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shardmta: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    if !matches!(cli.command, Cmd::Serve { .. }) {
        // A listing piped into `head` ends quietly when the reader goes away, as cat(1) does, instead of
        // failing on EPIPE with "Broken pipe". (The server keeps ignoring SIGPIPE.)
        // SAFETY: restores the default disposition of one signal before any thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match cli.command {
        Cmd::Serve { config } => {
            // The file found is the one a reload reads again (None: the embedded defaults).
            let path = config_path(config.as_deref());
            let cfg = load(path.as_deref())?;
            // The configuration's warnings go to the event log, with the server's other lines.
            shardmta::server::run(cfg, path.as_deref()).map_err(|e| e.to_string())
        }
        Cmd::CheckConfig { config } => {
            // Every problem, one per line: the first bad value, every problem of meaning (listeners,
            // placeholders, unsupported keys), and every file the configuration names that cannot be read or
            // does not parse (users, certificate and key, which must match, maps, the CA file).
            let (cfg, mut problems) = match config_path(config.as_deref()) {
                Some(p) => Config::load_listing_problems(&p).map_err(|e| e.to_string())?,
                None => (Config::default(), Vec::new()),
            };
            problems.extend(shardmta::reloadable::check_files(&cfg));
            for w in cfg.warnings() {
                eprintln!("warning: {w}");
            }
            if !problems.is_empty() {
                for p in &problems {
                    eprintln!("error: {p}");
                }
                return Err(format!(
                    "{} problem(s) in the configuration",
                    problems.len()
                ));
            }
            let maps = shardmta::local::recipients::RecipientMaps::load(&cfg)
                .map_err(|e| format!("local recipient tables: {e}"))?;
            for w in &maps.warnings {
                eprintln!("warning: {w}");
            }
            print!("{}", cfg.to_toml());
            Ok(())
        }
        Cmd::Queue {
            command:
                QueueCmd::List {
                    config,
                    json,
                    held,
                    deferred,
                    summary,
                },
        } => {
            let cfg = load(config.as_deref())?;
            let mut msgs = list_messages(&cfg)?;
            msgs.retain(|m| (!held || m.held) && (!deferred || m.is_deferred()));
            let mut out = std::io::stdout().lock();
            let now = shardmta::queue::now_unix_ms();
            if summary {
                let lines = shardmta::queue::list::summary(&msgs, now, SUMMARY_DOMAINS_MAX);
                if json {
                    serde_json::to_writer_pretty(&mut out, &lines).map_err(|e| e.to_string())?;
                    return writeln!(out).map_err(|e| e.to_string());
                }
                return print_summary(&mut out, &lines).map_err(|e| e.to_string());
            }
            if json {
                serde_json::to_writer_pretty(&mut out, &msgs).map_err(|e| e.to_string())?;
                writeln!(out).map_err(|e| e.to_string())?;
                return Ok(());
            }
            print_queue_table(&mut out, &msgs, now).map_err(|e| e.to_string())
        }
        Cmd::Queue {
            command:
                QueueCmd::Cat {
                    ids,
                    config,
                    message_only,
                },
        } => {
            let cfg = load(config.as_deref())?;
            let parsed = ids
                .iter()
                .map(|s| {
                    s.parse::<shardmta::queue::QueueId>()
                        .map_err(|_| format!("not a queue ID: {s:?}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let msgs = shardmta::queue::read_messages(&cfg.queue_directory, &parsed)
                .map_err(|e| e.to_string())?;
            let envelopes: std::collections::HashMap<String, shardmta::queue::QueuedMessage> =
                if message_only {
                    Default::default()
                } else {
                    shardmta::queue::list_queue(&cfg.queue_directory)
                        .map_err(|e| e.to_string())?
                        .into_iter()
                        .map(|m| (m.id.clone(), m))
                        .collect()
                };
            let mut out = std::io::stdout().lock();
            let mut missing = Vec::new();
            let now = shardmta::queue::now_unix_ms();
            for (id, bytes) in msgs {
                match bytes {
                    Some(b) => {
                        if parsed.len() > 1 {
                            writeln!(out, "==> {id} <==").map_err(|e| e.to_string())?;
                        }
                        if let Some(m) = envelopes.get(&id.to_string()) {
                            print_envelope(&mut out, m, now).map_err(|e| e.to_string())?;
                        }
                        out.write_all(&b).map_err(|e| e.to_string())?;
                    }
                    None => missing.push(id.to_string()),
                }
            }
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("not in the queue: {}", missing.join(" ")))
            }
        }
        Cmd::Queue {
            command: QueueCmd::Hold(s),
        } => queue_change(QueueAction::Hold, s),
        Cmd::Queue {
            command: QueueCmd::Release(s),
        } => queue_change(QueueAction::Release, s),
        Cmd::Queue {
            command: QueueCmd::Delete(s),
        } => queue_change(QueueAction::Delete, s),
        Cmd::Queue {
            command: QueueCmd::Flush(s),
        } => queue_change(QueueAction::Flush, s),
        Cmd::Queue {
            command: QueueCmd::Bounce(s),
        } => queue_change(QueueAction::Bounce, s),
        Cmd::Reload { config } => {
            let cfg = load(config.as_deref())?;
            let socket = client::socket_path(&cfg.queue_directory);
            let stream = client::connect(&socket).map_err(|e| {
                format!(
                    "{e}: is the server running with queue_directory {}?",
                    cfg.queue_directory.display()
                )
            })?;
            let a = client::request(stream, &socket, "POST", "/api/v1/reload", None)
                .map_err(|e| e.to_string())?;
            a.success()?;
            println!(
                "reload requested; the server's log says whether the new configuration was taken"
            );
            Ok(())
        }
        Cmd::Suppression { command } => suppression(command),
        Cmd::Shaping { command } => shaping(command),
        Cmd::Dkim {
            command:
                DkimCmd::Keygen {
                    domain,
                    selector,
                    algorithm,
                    out,
                },
        } => dkim_keygen(&domain, &selector, algorithm, out),
        Cmd::Passwd { user } => {
            if user.is_empty() || user.contains(':') || user.contains(char::is_whitespace) {
                return Err(format!("bad user name {user:?}: no ':' or spaces"));
            }
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                eprint!("password for {user} (echoed): ");
            }
            let mut line = String::new();
            stdin
                .lock()
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            let password = line.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                return Err("empty password".into());
            }
            println!(
                "{}",
                shardmta::auth::passwd_line(&user, password).map_err(|e| e.to_string())?
            );
            Ok(())
        }
        Cmd::Stats { config } => {
            let cfg = load(config.as_deref())?;
            let p = cfg.queue_directory.join("stats.json");
            let s = std::fs::read_to_string(&p).map_err(|e| {
                format!("cannot read {}: {e} (is the server running?)", p.display())
            })?;
            println!("{s}");
            Ok(())
        }
    }
}

/// The `mailq` table: a line per message (`!` after the ID: held), then a line per open recipient with its
/// state, and the reason of its last deferral in parentheses.
fn print_queue_table(
    out: &mut impl Write,
    msgs: &[shardmta::queue::list::QueuedMessage],
    now_ms: u64,
) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<17} {:>7} {:>9}  sender / recipients",
        "ID", "age", "size"
    )?;
    let mut bytes = 0u64;
    for m in msgs {
        bytes += m.size;
        let age = shardmta::queue::list::human_age(now_ms.saturating_sub(m.arrival_unix_ms) / 1000);
        let sender = if m.sender.is_empty() {
            "<>"
        } else {
            m.sender.as_str()
        };
        let id = format!("{}{}", m.id, if m.held { "!" } else { "" });
        writeln!(out, "{id:<17} {age:>7} {:>9}  {sender}", m.size)?;
        for r in &m.recipients {
            let mut line = format!("{:>37}{} ({}", "", r.address, r.state);
            if let Some(a) = r.attempts {
                line.push_str(&format!(", {a} attempt(s)"));
            }
            if let Some(next) = r.next_attempt_unix_s {
                let wait = next.saturating_sub(now_ms / 1000);
                if wait > 0 {
                    line.push_str(&format!(
                        ", next in {}",
                        shardmta::queue::list::human_age(wait)
                    ));
                }
            }
            line.push(')');
            writeln!(out, "{line}")?;
            if let Some(reason) = &r.last_reason {
                writeln!(out, "{:>39}({reason})", "")?;
            }
        }
    }
    writeln!(
        out,
        "-- {} message(s), {} Kbytes",
        msgs.len(),
        bytes.div_ceil(1024)
    )
}

/// Domains `queue list --summary` shows (the busiest).
const SUMMARY_DOMAINS_MAX: usize = 50;

/// The queue listing, read from the spool files (server running or stopped: the read never writes or locks).
fn list_messages(cfg: &Config) -> Result<Vec<shardmta::queue::QueuedMessage>, String> {
    shardmta::queue::list_queue(&cfg.queue_directory).map_err(|e| e.to_string())
}

/// `shardmta queue hold|release|delete|flush|bounce`: through the running server's control socket, else on
/// the stopped spool under its lock.
fn queue_change(action: QueueAction, sel: Selection) -> Result<(), String> {
    let cfg = load(sel.config.as_deref())?;
    let selector = if sel.all {
        Selector::All
    } else if let Some(d) = sel.domain {
        let d = d.trim().trim_end_matches('.').to_ascii_lowercase();
        if d.is_empty() || d.contains(|c: char| c.is_whitespace() || c == '@') {
            return Err(format!("bad domain {d:?}"));
        }
        Selector::Domain(d)
    } else if !sel.ids.is_empty() {
        Selector::Ids(
            sel.ids
                .iter()
                .map(|s| {
                    s.parse::<shardmta::queue::QueueId>()
                        .map_err(|_| format!("not a queue ID: {s:?}"))
                })
                .collect::<Result<_, _>>()?,
        )
    } else {
        return Err(format!(
            "say which messages: queue IDs, --all, or --domain DOMAIN (shardmta queue {} --help)",
            action.name()
        ));
    };
    let command = QueueCommand { action, selector };
    let socket = client::socket_path(&cfg.queue_directory);
    let report = match client::connect(&socket) {
        Ok(stream) => {
            let body = serde_json::to_vec(&command.selector).map_err(|e| e.to_string())?;
            let path = format!("/api/v1/queue/{}", action.name());
            let a = client::request(stream, &socket, "POST", &path, Some(&body))
                .map_err(|e| e.to_string())?;
            if a.status != 200 {
                return Err(format!(
                    "the server answered {}: {}",
                    a.status,
                    String::from_utf8_lossy(&a.body).trim()
                ));
            }
            serde_json::from_slice::<QueueCommandReport>(&a.body)
                .map_err(|e| format!("malformed answer from the server: {e}"))?
        }
        Err(client::ClientError::NotRunning(_)) => {
            // The files the server will read must stay its own: act as mail_owner, as it does.
            if !cfg.mail_owner.is_empty() && shardmta::privileges::euid() == 0 {
                let o = shardmta::privileges::MailOwner::lookup(&cfg.mail_owner)
                    .map_err(|e| e.to_string())?;
                shardmta::privileges::drop_to(&o).map_err(|e| e.to_string())?;
            }
            shardmta::delivery::admin::on_stopped_spool(&cfg, &command).map_err(|e| match e {
                shardmta::queue::QueueError::Locked(p) => format!(
                    "{} is locked by a running server, but its control socket {} does not answer",
                    p.display(),
                    socket.display()
                ),
                e => e.to_string(),
            })?
        }
        Err(e) => return Err(e.to_string()),
    };
    let done = match action {
        QueueAction::Hold => ("held", "already held"),
        QueueAction::Release => ("released", "not held"),
        QueueAction::Delete => ("deleted", "unchanged"),
        QueueAction::Flush => ("flushed", "nothing deferred"),
        QueueAction::Bounce => ("returned to sender", "nothing left to return"),
    };
    let mut out = std::io::stdout().lock();
    for id in &report.changed {
        writeln!(out, "{id}: {}", done.0).map_err(|e| e.to_string())?;
    }
    for id in &report.unchanged {
        writeln!(out, "{id}: {}", done.1).map_err(|e| e.to_string())?;
    }
    writeln!(
        out,
        "shardmta: {} {} message(s)",
        done.0,
        report.changed.len()
    )
    .map_err(|e| e.to_string())?;
    if report.not_found.is_empty() {
        Ok(())
    } else {
        Err(format!("not in the queue: {}", report.not_found.join(" ")))
    }
}

/// `shardmta suppression ...`: changes through the running server's control socket (durable when it
/// answers), else on the stopped spool's file directly; `list` and `check` read the file.
fn suppression(command: SuppressionCmd) -> Result<(), String> {
    use shardmta::suppression::{self, Suppression, Target};
    let change = |config: Option<PathBuf>,
                  method: &str,
                  entry: &str,
                  reason: Option<String>,
                  expires_in: Option<u64>|
     -> Result<(), String> {
        let cfg = load(config.as_deref())?;
        let target = Target::parse(entry).map_err(|e| e.to_string())?;
        let key = target.key();
        let socket = client::socket_path(&cfg.queue_directory);
        match client::connect(&socket) {
            Ok(stream) => {
                let (path, body) = if method == "POST" {
                    let field = match target {
                        Target::Address(_) => "address",
                        Target::Domain(_) => "domain",
                    };
                    let mut v = serde_json::json!({ field: key.trim_start_matches('@') });
                    if let Some(r) = &reason {
                        v["reason"] = serde_json::Value::String(r.clone());
                    }
                    if let Some(x) = expires_in {
                        v["expires_in_s"] = serde_json::Value::from(x);
                    }
                    ("/api/v1/suppression".to_string(), Some(v.to_string()))
                } else {
                    (format!("/api/v1/suppression/{key}"), None)
                };
                let a = client::request(
                    stream,
                    &socket,
                    method,
                    &path,
                    body.as_deref().map(str::as_bytes),
                )
                .map_err(|e| e.to_string())?;
                a.success()?;
            }
            Err(client::ClientError::NotRunning(_)) => {
                if !cfg.mail_owner.is_empty() && shardmta::privileges::euid() == 0 {
                    let o = shardmta::privileges::MailOwner::lookup(&cfg.mail_owner)
                        .map_err(|e| e.to_string())?;
                    shardmta::privileges::drop_to(&o).map_err(|e| e.to_string())?;
                }
                let s = Suppression::open(&cfg.queue_directory).map_err(|e| e.to_string())?;
                if method == "POST" {
                    let reason = reason.unwrap_or_else(|| "added by the administrator".into());
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_secs();
                    let expires = expires_in.map(|x| now.saturating_add(x));
                    s.add(&target, &reason, expires)
                        .map_err(|e| e.to_string())?;
                } else if !s.remove(&target).map_err(|e| e.to_string())? {
                    return Err(format!("not listed: {key}"));
                }
            }
            Err(e) => return Err(e.to_string()),
        }
        println!(
            "{key}: {}",
            if method == "POST" {
                "suppressed"
            } else {
                "removed"
            }
        );
        Ok(())
    };
    match command {
        SuppressionCmd::Add {
            entry,
            reason,
            expires_in,
            config,
        } => change(
            config,
            "POST",
            &entry,
            reason,
            expires_in.map(|d| d.0.as_secs()),
        ),
        SuppressionCmd::Remove { entry, config } => change(config, "DELETE", &entry, None, None),
        SuppressionCmd::List { json, config } => {
            let cfg = load(config.as_deref())?;
            let list = suppression::read(&cfg.queue_directory).map_err(|e| e.to_string())?;
            let entries = list.entries();
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer(&mut out, &entries).map_err(|e| e.to_string())?;
                writeln!(out).map_err(|e| e.to_string())?;
            } else {
                for e in &entries {
                    let exp = e.expires_unix.map_or("-".to_string(), |x| x.to_string());
                    writeln!(out, "{}\t{}\t{exp}\t{}", e.entry, e.added_unix, e.reason)
                        .map_err(|e| e.to_string())?;
                }
            }
            Ok(())
        }
        SuppressionCmd::Check { address, config } => {
            let cfg = load(config.as_deref())?;
            let list = suppression::read(&cfg.queue_directory).map_err(|e| e.to_string())?;
            match list.check(&address) {
                Some(h) => {
                    println!("{address}: suppressed by {} ({})", h.entry, h.reason);
                    Ok(())
                }
                None => Err(format!("{address}: not suppressed")),
            }
        }
    }
}

/// `shardmta shaping ...`.
fn shaping(command: ShapingCmd) -> Result<(), String> {
    use shardmta::shaping::{automation, Rules};
    match command {
        ShapingCmd::Show {
            domain,
            source,
            config,
        } => {
            let cfg = load(config.as_deref())?;
            let rules = Rules::load(cfg.shaping_file.as_deref())
                .map_err(|e| format!("shaping_file: {e}"))?;
            let _ = shardmta::shard::runtime::raise_memlock(shardmta::limits::MEMLOCK_BYTES_MIN);
            let dns = cfg.dns.clone();
            let name = domain.clone();
            let resolved = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
                .spawn(move || async move {
                    let r = shardmta::dns::MxResolver::new(dns);
                    r.resolve_mx(&name)
                        .await
                        .map(|d| d.into_iter().map(|d| d.host).collect::<Vec<String>>())
                        .map_err(|e| e.to_string())
                })
                .map_err(|e| format!("cannot start the resolver: {e}"))?
                .join()
                .map_err(|e| format!("the resolver: {e}"))?;
            let hosts = match resolved {
                Ok(h) => h,
                Err(e) => {
                    println!("MX lookup of {domain} failed: {e}");
                    Vec::new()
                }
            };
            for line in rules.explain(&domain, &hosts, source.as_deref()) {
                println!("{line}");
            }
            Ok(())
        }
        ShapingCmd::Status { json, config } => {
            let cfg = load(config.as_deref())?;
            let socket = client::socket_path(&cfg.queue_directory);
            let actions: Vec<automation::Action> = match client::connect(&socket) {
                Ok(stream) => {
                    let a = client::request(stream, &socket, "GET", "/api/v1/shaping", None)
                        .map_err(|e| e.to_string())?;
                    let a = a.success()?;
                    let v: serde_json::Value =
                        serde_json::from_slice(&a.body).map_err(|e| e.to_string())?;
                    serde_json::from_value(v["actions"].clone()).map_err(|e| e.to_string())?
                }
                Err(client::ClientError::NotRunning(_)) => {
                    automation::read_all(&cfg.queue_directory, automation::now_ms())?
                }
                Err(e) => return Err(e.to_string()),
            };
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer(&mut out, &actions).map_err(|e| e.to_string())?;
                writeln!(out).map_err(|e| e.to_string())?;
            } else {
                let now = automation::now_ms();
                writeln!(
                    out,
                    "ID\tSITE\tSOURCE\tACTION\tSTATE\tSINCE\tUNTIL\tENDS\tRULE"
                )
                .map_err(|e| e.to_string())?;
                for a in &actions {
                    writeln!(out, "{}", automation::status_line(a, now))
                        .map_err(|e| e.to_string())?;
                }
            }
            Ok(())
        }
        ShapingCmd::Cancel { id, config } => {
            let cfg = load(config.as_deref())?;
            let socket = client::socket_path(&cfg.queue_directory);
            let stream = client::connect(&socket).map_err(|e| e.to_string())?;
            let path = format!("/api/v1/shaping/{id}");
            let a = client::request(stream, &socket, "DELETE", &path, None)
                .map_err(|e| e.to_string())?;
            a.success()?;
            println!("{id}: cancelled");
            Ok(())
        }
    }
}

fn print_envelope(
    out: &mut impl Write,
    m: &shardmta::queue::QueuedMessage,
    now_ms: u64,
) -> std::io::Result<()> {
    let sender = if m.sender.is_empty() { "" } else { &m.sender };
    writeln!(out, "*** ENVELOPE ***")?;
    writeln!(out, "queue_id: {}", m.id)?;
    writeln!(
        out,
        "arrival: {} ({} ago)",
        shardmta::smtp::session::rfc5322_date(m.arrival_unix_ms / 1000),
        shardmta::queue::list::human_age(now_ms.saturating_sub(m.arrival_unix_ms) / 1000)
    )?;
    writeln!(out, "sender: <{sender}>")?;
    if !m.client_addr.is_empty() {
        writeln!(out, "client: {} helo={}", m.client_addr, m.client_helo)?;
    }
    if !m.tls.is_empty() {
        writeln!(out, "tls: {}", m.tls)?;
    }
    if !m.auth_user.is_empty() {
        writeln!(out, "sasl_username: {}", m.auth_user)?;
    }
    if m.held {
        writeln!(out, "held: yes")?;
    }
    if let Some(ret) = m.dsn_ret {
        writeln!(out, "dsn_ret: {ret}")?;
    }
    if let Some(envid) = &m.dsn_envid {
        writeln!(out, "dsn_envid: {envid}")?;
    }
    if m.delay_warned {
        writeln!(out, "delay_warned: yes")?;
    }
    for r in &m.recipients {
        write!(out, "recipient: <{}> {}", r.address, r.state)?;
        if let Some(n) = &r.notify {
            write!(out, " notify={n}")?;
        }
        if let Some(o) = &r.orcpt {
            write!(out, " orcpt={o}")?;
        }
        if let Some(a) = r.attempts {
            write!(out, ", {a} attempt(s)")?;
        }
        if let Some(reason) = &r.last_reason {
            write!(out, " ({reason})")?;
        }
        writeln!(out)?;
    }
    writeln!(out, "*** MESSAGE CONTENTS ***")
}

fn print_summary(
    out: &mut impl Write,
    lines: &[shardmta::queue::list::SummaryLine],
) -> std::io::Result<()> {
    write!(out, "{:<32} {:>6}", "", "T")?;
    for b in shardmta::queue::list::SUMMARY_BUCKETS_MIN {
        write!(out, " {b:>5}")?;
    }
    writeln!(out, " {:>5}", "1280+")?;
    for l in lines {
        write!(out, "{:<32} {:>6}", l.domain, l.total)?;
        for n in l.buckets {
            write!(out, " {n:>5}")?;
        }
        writeln!(out)?;
    }
    Ok(())
}
