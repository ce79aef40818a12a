//! Shared harness for end-to-end tests: a `shardmta serve` process on free loopback ports with its own spool,
//! and a small blocking SMTP client (plain or TLS). Everything stays on 127.0.0.1.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardmta::dns::testserver::TestDns;

pub const BIN: &str = env!("CARGO_BIN_EXE_shardmta");

/// Whether a server at `addr` answers with a 220 greeting (not merely a completed TCP handshake).
pub fn greeting_from(addr: SocketAddr) -> bool {
    let Ok(mut c) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
    let mut b = [0u8; 4];
    c.read_exact(&mut b).is_ok() && &b == b"220 "
}

/// `N` distinct free ports: each is held bound until all are chosen (ports taken one after the other by
/// `free_port` can be the same, the kernel handing a just-released port out again: a CI run saw the server
/// refuse a configuration with two listeners on one port).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Server {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub smtp: SocketAddr,
    pub submission: SocketAddr,
    pub submissions: SocketAddr,
}

impl Server {
    /// Starts a server; `extra` is TOML added to the generated configuration (top-level keys only).
    pub fn start(extra: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, extra)
    }

    pub fn start_in(dir: tempfile::TempDir, extra: &str) -> Server {
        let [p1, p2, p3] = free_ports::<3>();
        let spool = dir.path().join("spool");
        let users = dir.path().join("users");
        if !users.exists() {
            let out = Command::new(BIN)
                .args(["passwd", "alice"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            out.stdin.as_ref().unwrap().write_all(b"secret\n").unwrap();
            let out = out.wait_with_output().unwrap();
            assert!(out.status.success());
            std::fs::write(&users, out.stdout).unwrap();
        }
        let config = dir.path().join("shardmta.toml");
        // Harness defaults, each left out when the test's own TOML sets the same key.
        let defaults = [
            ("myhostname", "\"mx.test\"".to_string()),
            ("queue_directory", format!("\"{}\"", spool.display())),
            ("shards", "2".to_string()),
            ("smtpd_sasl_users_file", format!("\"{}\"", users.display())),
            ("smtpd_auth_failure_delay", "\"0s\"".to_string()),
            ("queue_segment_size", "16777216".to_string()),
            ("shutdown_timeout", "\"1s\"".to_string()),
        ];
        let mut text = String::new();
        for (k, v) in defaults {
            if !extra
                .lines()
                .any(|l| l.split('=').next().map(str::trim) == Some(k))
            {
                text.push_str(&format!("{k} = {v}\n"));
            }
        }
        text.push_str(extra);
        // No test reaches a real network: delivery is off unless the test configures it, and DNS goes to a
        // loopback port nobody answers on unless the test runs its own responder.
        if !extra.contains("[delivery]") {
            text.push_str("\n[delivery]\nenabled = false\n");
        }
        // Tests written before local users existed send to any local part: accept them (Postfix's empty
        // local_recipient_maps) unless the test configures [local] itself.
        if !extra.contains("[local]") {
            text.push_str("\n[local]\naccept_unknown_users = true\nsystem_users = false\n");
        }
        if !extra.contains("[dns]") {
            text.push_str("\n[dns]\nservers = [\"127.0.0.1:9\"]\ntimeout_ms = 200\n");
        }
        text.push_str(&format!(
            "\n[[listener]]\naddress = \"127.0.0.1:{p1}\"\nkind = \"smtp\"\n\
             [[listener]]\naddress = \"127.0.0.1:{p2}\"\nkind = \"submission\"\n\
             [[listener]]\naddress = \"127.0.0.1:{p3}\"\nkind = \"submissions\"\n"
        ));
        std::fs::write(&config, text).unwrap();
        let mut s = Server {
            child: None,
            dir,
            config,
            smtp: format!("127.0.0.1:{p1}").parse().unwrap(),
            submission: format!("127.0.0.1:{p2}").parse().unwrap(),
            submissions: format!("127.0.0.1:{p3}").parse().unwrap(),
        };
        s.spawn();
        s
    }

    pub fn spawn(&mut self) {
        self.spawn_with_nofile(None)
    }

    /// Starts the server (again) on its spool; `nofile`: its open-files limit, soft and hard.
    pub fn spawn_with_nofile(&mut self, nofile: Option<u64>) {
        // A killed predecessor's counters must not pass for this process's.
        let _ = std::fs::remove_file(self.spool().join("stats.json"));
        let mut cmd = Command::new(BIN);
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; it runs in the child between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let l = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        // MTA-STS test knobs are refused unless the environment allows them (see `mta_sts::TEST_KNOBS_ENV`).
        if std::fs::read_to_string(&self.config)
            .is_ok_and(|t| t.contains("test_policy_port") || t.contains("test_ca_file"))
        {
            cmd.env("SHARDMTA_TEST_KNOBS", "1");
        }
        let child = cmd
            .args(["serve", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let started = Instant::now();
        // Generous: after a SIGKILL under load, recovery syncs every segment while the kernel still writes back
        // what the killed process left dirty, and a CI disk can be slow.
        let deadline = started + Duration::from_secs(60);
        // stats.json appears once every shard has bound its listeners (the server writes it only then).
        let stats = self.spool().join("stats.json");
        while !stats.exists() || !greeting_from(self.smtp) {
            assert!(Instant::now() < deadline, "server did not start");
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("server exited at start: {st}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The readiness probe above (one greeted session) is a session too: wait until the server has seen it close, so tests of
        // connection limits start from zero.
        let idle = || {
            std::fs::read(&stats)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .is_some_and(|v| v["sessions_open"] == 0 && v["sessions_total"].as_u64() >= Some(1))
        };
        while !idle() {
            assert!(
                Instant::now() < deadline,
                "server did not settle: stats.json {:?}",
                std::fs::read_to_string(&stats)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if started.elapsed() > Duration::from_secs(2) {
            eprintln!("server took {:?} to start and settle", started.elapsed());
        }
    }

    pub fn spool(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    /// SIGKILL, then wait until the killed process's listening sockets are gone: the kernel closes sockets
    /// that a dead process's io_uring still references only when it tears the ring down, shortly after the
    /// process is reaped, and a connection that lands there in between is accepted by the kernel and then reset.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            let deadline = Instant::now() + Duration::from_secs(30);
            while TcpStream::connect(self.smtp).is_ok() {
                assert!(
                    Instant::now() < deadline,
                    "the killed server's listener stayed open"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "server did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap()
    }

    /// `queue list --json` parsed.
    pub fn queue(&self) -> Vec<serde_json::Value> {
        let out = self.cli(&["queue", "list", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
    }

    /// `queue cat ID`: the stored message (Received header + data).
    pub fn queue_cat(&self, id: &str) -> Vec<u8> {
        let out = self.cli(&["queue", "cat", "--message-only", id]);
        assert!(
            out.status.success(),
            "queue cat {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// A blocking SMTP client for tests.
pub struct Client {
    r: BufReader<Box<dyn Stream>>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_nodelay(true).unwrap();
        Client {
            r: BufReader::new(Box::new(s)),
        }
    }

    /// Connects and reads the greeting.
    pub fn greeted(addr: SocketAddr) -> Client {
        let mut c = Client::connect(addr);
        let g = c.reply();
        assert!(g.starts_with("220 "), "{g}");
        c
    }

    pub fn tls(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Client {
            r: BufReader::new(Box::new(tls_wrap(s))),
        }
    }

    /// Reads one complete (possibly multi-line) reply; "" on EOF.
    pub fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            match self.r.read_line(&mut line) {
                Ok(0) | Err(_) => return all,
                Ok(_) => {}
            }
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return all;
            }
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        let w = self.r.get_mut();
        w.write_all(bytes).unwrap();
        w.flush().unwrap();
    }

    /// Sends a command line and returns its reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// Upgrades with STARTTLS (asserting the 220).
    pub fn starttls(self) -> Client {
        let mut c = self;
        let r = c.cmd("STARTTLS");
        assert!(r.starts_with("220 2.0.0"), "{r}");
        assert!(c.r.buffer().is_empty());
        let inner = c.r.into_inner();
        Client {
            r: BufReader::new(Box::new(tls_wrap(inner))),
        }
    }

    /// EHLO, MAIL, RCPTs, DATA, body: returns the final reply.
    pub fn send_mail(&mut self, from: &str, to: &[&str], body: &str) -> String {
        let r = self.cmd(&format!("MAIL FROM:<{from}>"));
        assert!(r.starts_with("250"), "MAIL: {r}");
        for t in to {
            let r = self.cmd(&format!("RCPT TO:<{t}>"));
            assert!(r.starts_with("250"), "RCPT {t}: {r}");
        }
        let r = self.cmd("DATA");
        assert!(r.starts_with("354"), "DATA: {r}");
        self.send(body.as_bytes());
        self.send(b".\r\n");
        self.reply()
    }
}

/// The queue ID from `250 2.0.0 Ok: queued as ID`.
pub fn queued_id(reply: &str) -> String {
    let r = reply.trim_end();
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    r.rsplit(' ').next().unwrap().to_string()
}

fn tls_wrap<S: Read + Write + 'static>(s: S) -> rustls::StreamOwned<rustls::ClientConnection, S> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cfg = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(shardmta::delivery::outbound::NoVerify))
        .with_no_client_auth();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), "mx.test".try_into().unwrap()).unwrap();
    rustls::StreamOwned::new(conn, s)
}

pub fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

pub fn wait_for(f: impl FnMut() -> bool, what: &str) {
    wait_for_within(Duration::from_secs(20), f, what)
}

/// [`wait_for`] with its own limit, for waits whose length depends on the disk (draining a crash test's backlog).
pub fn wait_for_within(limit: Duration, mut f: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}

pub const LOADTEST: &str = env!("CARGO_BIN_EXE_shardmta-loadtest");

/// A sink process listening on `ip:port`, saving messages and counters under its own directory.
pub struct Sink {
    pub addr: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
}

impl Sink {
    pub fn start(ip: &str, port: u16, args: &[&str]) -> Sink {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(LOADTEST)
            .args(["sink", "--listen", &format!("{ip}:{port}"), "--save-dir"])
            .arg(dir.path().join("msgs"))
            .arg("--stats-file")
            .arg(dir.path().join("stats.json"))
            .args(["--hostname", &format!("sink-{ip}")])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        let s = Sink { addr, child, dir };
        wait_for(
            || std::net::TcpStream::connect(addr).is_ok() && s.stats_path().exists(),
            "sink to listen",
        );
        s
    }

    pub fn stats_path(&self) -> PathBuf {
        self.dir.path().join("stats.json")
    }

    pub fn stats(&self) -> serde_json::Value {
        std::fs::read(self.stats_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    pub fn count(&self, key: &str) -> u64 {
        self.stats()[key].as_u64().unwrap_or(0)
    }

    /// Saved messages (the sink's `X-Sink-*` lines followed by the data).
    pub fn messages(&self) -> Vec<String> {
        read_files(&self.dir.path().join("msgs"))
    }

    pub fn wait_messages(&self, n: u64) {
        wait_for(
            || self.count("messages") >= n,
            &format!("{n} message(s) at the sink"),
        );
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Config for a relay whose outbound port is `port` and whose DNS is `dns`.
pub fn relay_config(port: u16, dns: &TestDns, more_delivery: &str, top: &str) -> String {
    let backoff = if top.contains("minimal_backoff_time") {
        ""
    } else {
        "minimal_backoff_time = \"1s\"\nmaximal_backoff_time = \"2s\"\n"
    };
    let dest_backoff = if more_delivery.contains("destination_backoff_time") {
        ""
    } else {
        "destination_backoff_time = \"1s\"\n"
    };
    format!(
        "{backoff}{top}\n\
         [delivery]\nsmtp_port = {port}\nsmtp_connection_cache_time_limit = \"1s\"\nsmtp_reply_timeout = \"5s\"\nsmtp_connect_timeout = \"2s\"\n{dest_backoff}{more_delivery}\n\
         [dns]\nservers = [\"{}\"]\ntimeout_ms = 300\n",
        dns.addr()
    )
}

/// The delivery log's lines now (it is flushed every 200 ms).
pub fn delivery_log(s: &Server) -> Vec<serde_json::Value> {
    std::fs::read_to_string(s.spool().join("delivery.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The delivery log's lines, once `pred` holds for one of them (the log is flushed every 200 ms).
pub fn delivery_log_with(
    s: &Server,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    let read = || delivery_log(s);
    wait_for(
        || read().iter().any(&pred),
        "the expected delivery log line",
    );
    read()
}

pub fn wait_gone(s: &Server, id: &str) {
    wait_for(
        || !s.queue().iter().any(|m| m["id"] == id),
        &format!("{id} to leave the queue"),
    );
}

/// Bound on messages per crash-test client per round (the kill normally comes first).
pub const CRASH_MESSAGES_PER_CLIENT_MAX: usize = 5000;

/// One client of a crash test: sends messages carrying unique tokens (`tok-ROUND-CLIENT-N`, in the Subject, an
/// X-Token header and a dot-stuffed last line) to `rcpts(n)`, pipelined, and records each acknowledged token
/// with its queue id in `acked`. Stops at `stop`, at the first failure, or after CRASH_MESSAGES_PER_CLIENT_MAX.
pub fn token_client(
    addr: std::net::SocketAddr,
    round: usize,
    client: usize,
    acked: Arc<Mutex<HashMap<String, String>>>,
    stop: Arc<AtomicBool>,
    rcpts: &dyn Fn(usize) -> Vec<String>,
) {
    let Ok(stream) = std::net::TcpStream::connect(addr) else {
        return;
    };
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
    stream.set_nodelay(true).ok();
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    let mut read_reply = |r: &mut BufReader<std::net::TcpStream>| -> Option<String> {
        loop {
            line.clear();
            if r.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if line.len() >= 4 && line.as_bytes()[3] == b' ' {
                return Some(line.clone());
            }
        }
    };
    read_reply(&mut r);
    if r.get_mut().write_all(b"EHLO crash.test\r\n").is_err() {
        return;
    }
    read_reply(&mut r);
    for n in 0..CRASH_MESSAGES_PER_CLIENT_MAX {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let token = format!("tok-{round}-{client}-{n}");
        let filler = "x".repeat(200 + (n * 37) % 1500);
        let to = rcpts(n);
        let mut msg = format!("MAIL FROM:<c{client}@crash.test>\r\n");
        for t in &to {
            msg.push_str(&format!("RCPT TO:<{t}>\r\n"));
        }
        msg.push_str(&format!(
            "DATA\r\nSubject: {token}\r\nX-Token: {token}\r\n\r\n{filler}\r\n..{token}\r\n.\r\n"
        ));
        if r.get_mut().write_all(msg.as_bytes()).is_err() {
            return;
        }
        for _ in 0..to.len() + 2 {
            if read_reply(&mut r).is_none() {
                return;
            }
        }
        let Some(last) = read_reply(&mut r) else {
            return;
        };
        if let Some(id) = last.trim_end().strip_prefix("250 2.0.0 Ok: queued as ") {
            acked.lock().unwrap().insert(token, id.to_string());
        } else {
            return;
        }
    }
}

/// Small deterministic PRNG (xorshift) seeded from the clock; the seed is printed for reproduction.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The contents of every file in `dir`, sorted (empty if `dir` does not exist).
pub fn read_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Runs `rounds` crash rounds against `s`: `clients` token clients send to `rcpts(n)`; once 50 more messages
/// are acknowledged (and, with `progress`, once it grew by 20 in the round), the server is killed with SIGKILL
/// at a random moment (300..1000 ms after the round started, from `seed`) and restarted on the same spool.
/// The clients stop early once `round_cap` messages were acknowledged in the round, so that a slow disk (whose
/// progress comes late) does not pile up a backlog the later restarts and the final drain must work through.
/// Returns every acknowledged token with its queue id.
pub fn sigkill_rounds(
    s: &mut Server,
    seed: u64,
    rounds: usize,
    clients: usize,
    rcpts: fn(usize) -> Vec<String>,
    progress: Option<&dyn Fn(&Server) -> usize>,
    round_cap: usize,
) -> HashMap<String, String> {
    eprintln!("crash test seed {seed}");
    let mut rng = Rng(seed | 1);
    let acked: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    for round in 0..rounds {
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..clients)
            .map(|c| {
                let (acked, stop, addr) = (acked.clone(), stop.clone(), s.smtp);
                std::thread::spawn(move || token_client(addr, round, c, acked, stop, &rcpts))
            })
            .collect();
        let before = acked.lock().unwrap().len();
        let progress_before = progress.map(|p| p(s));
        let wait_ms = 300 + rng.next() % 700;
        let t = Instant::now();
        wait_for_within(
            Duration::from_secs(60),
            || {
                let n = acked.lock().unwrap().len();
                if n >= before.saturating_add(round_cap) {
                    stop.store(true, Ordering::Relaxed);
                }
                n > before + 50
                    && progress
                        .zip(progress_before)
                        .is_none_or(|(p, b)| p(s) > b + 20)
            },
            "messages to flow",
        );
        std::thread::sleep(Duration::from_millis(wait_ms).saturating_sub(t.elapsed()));
        s.kill9();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        eprintln!(
            "round {round}: killed after {wait_ms} ms, {} acknowledged so far",
            acked.lock().unwrap().len()
        );
        s.spawn();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 150,
        "too little load to prove anything: {}",
        acked.len()
    );
    acked
}

/// Opens a session that only says QUIT and reads to EOF; returns the TCP segments the client received
/// (`tcpi_segs_in`): SYN-ACK, greeting, the ACK of QUIT, and the 221, which carries the FIN when the server ends
/// the connection in one segment (else the FIN is a fifth).
pub fn segments_in_quit_session(addr: SocketAddr) -> u32 {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_nodelay(true).unwrap();
    let mut r = BufReader::new(&s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("220 "), "{line}");
    (&s).write_all(b"QUIT\r\n").unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("221 "), "{line}");
    line.clear();
    assert_eq!(
        r.read_line(&mut line).unwrap(),
        0,
        "EOF after the 221: {line}"
    );
    segments_in(&s)
}

/// The TCP segments this socket has received so far (`tcpi_segs_in` of TCP_INFO).
pub fn segments_in(s: &TcpStream) -> u32 {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain data; the kernel fills at most `len` bytes of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_segs_in
}

/// A TCP connection to `addr` from the local address `from` (e.g. 127.0.0.2, a client outside a `mynetworks`
/// of 127.0.0.1/32), made with plain socket calls since std cannot bind before connecting.
pub fn connect_from(from: std::net::Ipv4Addr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(to) = addr else {
        panic!("IPv4 only")
    };
    // SAFETY: plain socket calls on a descriptor this function owns until it is wrapped.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let s = TcpStream::from_raw_fd(fd);
        let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let local = sin(from, 0);
        if libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sin(*to.ip(), to.port());
        if libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        Ok(s)
    }
}

impl Client {
    /// A plaintext client on an existing stream (see [`connect_from`]).
    pub fn from_stream(s: TcpStream) -> Client {
        Client {
            r: BufReader::new(Box::new(s)),
        }
    }
}

/// The server's counters (`stats.json`, rewritten every 200 ms).
pub fn server_stats(s: &Server) -> serde_json::Value {
    std::fs::read(s.spool().join("stats.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// The server's own clock: `uptime_s` of its latest stats.json (None before the first one).
pub fn server_uptime(s: &Server) -> Option<f64> {
    server_stats(s)["uptime_s"].as_f64()
}

/// Waits until the server has published `n` more stats.json rewrites (each carries a new `uptime_s`): proof
/// that its shards ticked that many times, e.g. before asserting that a file they rewrite was not touched.
pub fn wait_stats_rewrites(s: &Server, n: usize) {
    let mut seen = Vec::with_capacity(n + 1);
    wait_for(
        || {
            if let Some(t) = server_uptime(s) {
                if seen.last() != Some(&t) {
                    seen.push(t);
                }
            }
            seen.len() > n
        },
        "stats.json rewrites",
    );
}

/// Waits until the server's clock (`uptime_s`) has advanced by `window`: for windows in which something must
/// not happen. Unlike a sleep, only time the server was up and publishing counts, so a stalled or dead server
/// cannot make the check that follows pass.
pub fn wait_server_window(s: &Server, window: Duration) {
    let from = server_uptime(s).expect("stats.json with uptime_s");
    wait_for_within(
        window + Duration::from_secs(20),
        || server_uptime(s).is_some_and(|t| t - from >= window.as_secs_f64()),
        "the server's clock to advance",
    );
}

/// An HTTPS server for MTA-STS policies on `ip` (an ephemeral port): answers every request with `response` (a
/// whole HTTP response, changeable while it runs) over rustls with the given configuration, then closes. Counts
/// the requests. A std thread polling a stop flag; stops when dropped.
pub struct PolicyServer {
    pub addr: SocketAddr,
    pub response: Arc<Mutex<String>>,
    pub requests: Arc<std::sync::atomic::AtomicU64>,
    /// Milliseconds to wait before answering each request (a slow policy host).
    pub delay_ms: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A 200 `text/plain` response carrying `body`.
pub fn policy_response(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

impl PolicyServer {
    pub fn start(ip: &str, tls: Arc<rustls::ServerConfig>, response: String) -> PolicyServer {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let response = Arc::new(Mutex::new(response));
        let requests = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, n, st, d) = (
            response.clone(),
            requests.clone(),
            stop.clone(),
            delay_ms.clone(),
        );
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                let Ok((sock, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = sock.set_nonblocking(false);
                let _ = sock.set_read_timeout(Some(Duration::from_secs(5)));
                let Ok(conn) = rustls::ServerConnection::new(tls.clone()) else {
                    continue;
                };
                let mut s = rustls::StreamOwned::new(conn, sock);
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16384 {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => req.extend_from_slice(&buf[..k]),
                    }
                }
                if !req.starts_with(b"GET /.well-known/mta-sts.txt HTTP/1.1\r\n") {
                    continue;
                }
                n.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(d.load(Ordering::SeqCst)));
                let body = r.lock().unwrap().clone();
                let _ = s.write_all(body.as_bytes());
                s.conn.send_close_notify();
                let _ = s.flush();
            }
        });
        PolicyServer {
            addr,
            response,
            requests,
            delay_ms,
            stop,
            thread: Some(thread),
        }
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for PolicyServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A small SMTP sink in a thread of the test (no chunking; PIPELINING only when told): offers `DSN` in its EHLO
/// when told to, answers every MAIL and RCPT with 250 (a RCPT whose local part starts with `tempfail` with 451,
/// `permfail` with 550) and records every command line and every message's content, so a test can see the DSN
/// parameters a relay sent. Serves one connection at a time until dropped.
pub struct RecordingSink {
    pub addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
    messages: Arc<Mutex<Vec<String>>>,
    /// Contents whose end line came in the same read as the command after it (a pipelined next transaction).
    commands_behind_content: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

/// How a [`RecordingSink`] behaves.
#[derive(Clone, Copy, Default)]
pub struct RecordingSinkOptions {
    pub offer_dsn: bool,
    pub offer_pipelining: bool,
    /// Keeps the transaction's state as Postfix's smtpd does: a MAIL while one stands gets 503 "nested MAIL
    /// command"; DATA with no recipient accepted gets 554 and leaves the MAIL standing (RSET or a finished
    /// content clears it).
    pub strict: bool,
    /// Waits this long before the greeting of each connection.
    pub greeting_delay: Duration,
}

impl RecordingSink {
    pub fn start(ip: &str, port: u16, offer_dsn: bool) -> RecordingSink {
        RecordingSink::start_with(
            ip,
            port,
            RecordingSinkOptions {
                offer_dsn,
                ..RecordingSinkOptions::default()
            },
        )
    }

    pub fn start_with(ip: &str, port: u16, opts: RecordingSinkOptions) -> RecordingSink {
        let listener = TcpListener::bind((ip, port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let messages = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let behind = Arc::new(AtomicU64::new(0));
        let (l, m, st, b) = (
            lines.clone(),
            messages.clone(),
            stop.clone(),
            behind.clone(),
        );
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                        std::thread::sleep(opts.greeting_delay);
                        let _ = recording_session(s, opts, &l, &m, &b);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        RecordingSink {
            addr,
            lines,
            messages,
            commands_behind_content: behind,
            stop,
        }
    }

    /// How many contents ended in the same read as the command after them.
    pub fn commands_behind_content(&self) -> u64 {
        self.commands_behind_content.load(Ordering::Relaxed)
    }

    /// The command lines received so far (CRLF removed).
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The messages received so far (content as sent, dot-stuffing removed).
    pub fn messages(&self) -> Vec<String> {
        self.messages.lock().unwrap().clone()
    }

    pub fn wait_messages(&self, n: usize) {
        wait_for(
            || self.messages.lock().unwrap().len() >= n,
            &format!("{n} message(s) at the recording sink"),
        );
    }
}

impl Drop for RecordingSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn recording_session(
    s: TcpStream,
    opts: RecordingSinkOptions,
    lines: &Mutex<Vec<String>>,
    messages: &Mutex<Vec<String>>,
    behind: &AtomicU64,
) -> std::io::Result<()> {
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    w.write_all(b"220 recording.sink ESMTP\r\n")?;
    // The transaction (strict mode): a MAIL stands, and how many RCPTs it has accepted.
    let (mut mail, mut rcpts) = (false, 0usize);
    // Bounded: at most 1000 commands per connection.
    for _ in 0..1000 {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        lines.lock().unwrap().push(line.clone());
        let verb = line.split(' ').next().unwrap_or("").to_ascii_uppercase();
        let strict = opts.strict;
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => {
                let mut ehlo = String::from("250-recording.sink\r\n");
                if opts.offer_pipelining {
                    ehlo.push_str("250-PIPELINING\r\n");
                }
                if opts.offer_dsn {
                    ehlo.push_str("250-DSN\r\n");
                }
                ehlo.push_str("250 8BITMIME\r\n");
                w.write_all(ehlo.as_bytes())?;
                continue;
            }
            "MAIL" if strict && mail => b"503 5.5.1 Error: nested MAIL command\r\n",
            "RCPT" | "DATA" if strict && !mail => b"503 5.5.1 Error: need MAIL command\r\n",
            "RCPT" if line.to_ascii_lowercase().contains("<tempfail") => {
                b"451 4.3.0 Try again later\r\n"
            }
            "RCPT" if line.to_ascii_lowercase().contains("<permfail") => {
                b"550 5.1.1 No such user\r\n"
            }
            "DATA" if strict && rcpts == 0 => b"554 5.5.1 Error: no valid recipients\r\n",
            "MAIL" => {
                (mail, rcpts) = (true, 0);
                b"250 2.0.0 Ok\r\n"
            }
            "RCPT" => {
                rcpts += 1;
                b"250 2.0.0 Ok\r\n"
            }
            "RSET" => {
                (mail, rcpts) = (false, 0);
                b"250 2.0.0 Ok\r\n"
            }
            "NOOP" => b"250 2.0.0 Ok\r\n",
            "DATA" => {
                w.write_all(b"354 go ahead\r\n")?;
                let mut body = String::new();
                loop {
                    let mut l = String::new();
                    if r.read_line(&mut l)? == 0 || body.len() > 1 << 20 {
                        return Ok(());
                    }
                    if l == ".\r\n" {
                        if !r.buffer().is_empty() {
                            behind.fetch_add(1, Ordering::Relaxed);
                        }
                        break;
                    }
                    body.push_str(l.strip_prefix('.').unwrap_or(&l));
                }
                messages.lock().unwrap().push(body);
                (mail, rcpts) = (false, 0);
                b"250 2.0.0 Ok: queued\r\n"
            }
            "QUIT" => {
                w.write_all(b"221 2.0.0 Bye\r\n")?;
                return Ok(());
            }
            _ => b"502 5.5.2 Not implemented\r\n",
        };
        w.write_all(reply)?;
    }
    Ok(())
}

/// Rewrites the server's configuration file with `edit`, asks for a reload and waits until it is done or failed.
pub fn reload_config(s: &Server, edit: impl Fn(String) -> String) {
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(&s.config, edit(text)).unwrap();
    let counter = |key: &str| server_stats(s)[key].as_u64().unwrap_or(0);
    let before = counter("config_reloads") + counter("config_reload_failures");
    let o = s.cli(&["reload"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_for(
        || counter("config_reloads") + counter("config_reload_failures") > before,
        "the reload",
    );
}
