//! The `shardmta` command: `serve`, `check-config`, `queue list`, `passwd`, `stats`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shardmta::config::Config;

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
}

#[derive(Subcommand)]
enum QueueCmd {
    /// ID, age, size, sender and recipients with their state.
    List {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print queued messages as stored (Received header + data), like `postcat -q`. With several IDs each is
    /// preceded by a line `==> ID <==`.
    Cat {
        #[arg(required = true)]
        ids: Vec<String>,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn load(path: Option<&Path>) -> Result<Config, String> {
    match path {
        Some(p) => Config::load(p).map_err(|e| e.to_string()),
        None => Ok(Config::default()),
    }
}

fn main() -> ExitCode {
    // `shardmta sendmail ...` (or the binary installed as `sendmail`) takes sendmail's own options.
    let argv: Vec<String> = std::env::args().collect();
    let invoked_as_sendmail = argv
        .first()
        .is_some_and(|a| a.rsplit('/').next() == Some("sendmail"));
    if invoked_as_sendmail || argv.get(1).map(String::as_str) == Some("sendmail") {
        let rest = if invoked_as_sendmail {
            &argv[1..]
        } else {
            &argv[2..]
        };
        return ExitCode::from(sendmail(rest));
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shardmta: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Cmd::Serve { config } => {
            let cfg = load(config.as_deref())?;
            // The configuration's warnings go to the event log, with the server's other lines.
            shardmta::server::run(cfg).map_err(|e| e.to_string())
        }
        Cmd::CheckConfig { config } => {
            let cfg = load(config.as_deref())?;
            for w in cfg.warnings() {
                eprintln!("warning: {w}");
            }
            // The alias, virtual and users files must parse too.
            let maps = shardmta::local::recipients::RecipientMaps::load(&cfg)
                .map_err(|e| format!("local recipient tables: {e}"))?;
            for w in &maps.warnings {
                eprintln!("warning: {w}");
            }
            print!("{}", cfg.to_toml());
            Ok(())
        }
        Cmd::Queue {
            command: QueueCmd::List { config, json },
        } => {
            let cfg = load(config.as_deref())?;
            let msgs =
                shardmta::queue::list_queue(&cfg.queue_directory).map_err(|e| e.to_string())?;
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &msgs).map_err(|e| e.to_string())?;
                writeln!(out).map_err(|e| e.to_string())?;
                return Ok(());
            }
            print_queue_table(&mut out, &msgs).map_err(|e| e.to_string())
        }
        Cmd::Queue {
            command: QueueCmd::Cat { ids, config },
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
            let mut out = std::io::stdout().lock();
            let mut missing = Vec::new();
            for (id, bytes) in msgs {
                match bytes {
                    Some(b) => {
                        if parsed.len() > 1 {
                            writeln!(out, "==> {id} <==").map_err(|e| e.to_string())?;
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

fn print_queue_table(
    out: &mut impl Write,
    msgs: &[shardmta::queue::list::QueuedMessage],
) -> std::io::Result<()> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    writeln!(
        out,
        "{:<16} {:>8} {:>9}  {:<30} recipients",
        "ID", "age", "size", "sender"
    )?;
    for m in msgs {
        let age_s = now_ms.saturating_sub(m.arrival_unix_ms) / 1000;
        let sender = if m.sender.is_empty() {
            "<>"
        } else {
            m.sender.as_str()
        };
        let rcpts: Vec<String> = m
            .recipients
            .iter()
            .map(|r| format!("{} ({})", r.address, r.state))
            .collect();
        writeln!(
            out,
            "{:<16} {:>7}s {:>9}  {:<30} {}",
            m.id,
            age_s,
            m.size,
            sender,
            rcpts.join(", ")
        )?;
    }
    writeln!(out, "-- {} message(s)", msgs.len())
}

/// The sendmail(8) interface: configuration from $SHARDMTA_CONFIG, else /etc/shardmta/shardmta.toml if it exists,
/// else the embedded defaults; the message goes to the first `smtp` listener.
fn sendmail(args: &[String]) -> u8 {
    use shardmta::sendmail::{self as sm, exit};
    let opts = match sm::parse_args(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("sendmail: {e}");
            return exit::USAGE;
        }
    };
    let path = std::env::var_os("SHARDMTA_CONFIG")
        .map(PathBuf::from)
        .or_else(|| {
            let p = PathBuf::from("/etc/shardmta/shardmta.toml");
            p.exists().then_some(p)
        });
    let cfg = match load(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sendmail: {e}");
            return exit::USAGE;
        }
    };
    let Some(listener) = cfg
        .listeners
        .iter()
        .find(|l| l.kind == shardmta::config::ListenerKind::Smtp)
    else {
        eprintln!("sendmail: the configuration has no smtp listener to submit to");
        return exit::UNAVAILABLE;
    };
    let mut msg = match sm::read_message(std::io::stdin().lock(), opts.ignore_dots) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("sendmail: {e}");
            return exit::DATAERR;
        }
    };
    let mut rcpts = opts.recipients.clone();
    if opts.extract_recipients {
        let (found, without_bcc) = sm::extract_recipients(&msg);
        rcpts.extend(found);
        msg = without_bcc;
    }
    if rcpts.is_empty() {
        eprintln!("sendmail: no recipients found");
        return exit::USAGE;
    }
    let from = opts
        .from
        .clone()
        .unwrap_or_else(|| sm::default_sender(&cfg.myhostname));
    let mut addr = listener.address;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let (code, why) = sm::submit(addr, &cfg.myhostname, &from, &rcpts, &msg);
    if code != exit::OK {
        eprintln!("sendmail: {why}");
    }
    code
}
