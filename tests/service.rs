//! Running as a service: configuration reloads (SIGHUP), systemd notifications, one instance per address,
//! start errors that name the file, `check-config`'s checks of meaning, and the Postfix-like defaults. Every
//! server runs on loopback, started by the test.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{connect_from, free_port, greeting_from, server_stats, wait_for, Client, Server, BIN};

/// Restarts `s` on the same configuration and spool with its stderr in a file (returned) and `env` set, and
/// waits as the harness does: stats.json written and a 220 on the smtp listener.
fn respawn_logged(s: &mut Server, env: &[(&str, &std::ffi::OsStr)]) -> PathBuf {
    if s.child.is_some() {
        assert!(s.terminate().success());
    }
    static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = STARTS.fetch_add(1, Ordering::Relaxed);
    let log = s.dir.path().join(format!("stderr-{n}.log"));
    let stats = s.spool().join("stats.json");
    let _ = std::fs::remove_file(&stats);
    let child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&s.config)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    s.child = Some(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) = s.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("server exited at start: {st}\n{}", read(&log));
        }
        if stats.exists() && greeting_from(s.smtp) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "server did not start:\n{}",
            read(&log)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn signal(s: &Server, sig: i32) {
    let pid = s.child.as_ref().expect("running").id() as i32;
    // SAFETY: a signal to the server this test started.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

fn counter(s: &Server, name: &str) -> u64 {
    server_stats(s)[name].as_u64().unwrap_or(0)
}

/// SIGHUP, then waits until the reload has finished (succeeded or failed: one of the two counters moved).
fn sighup_and_wait(s: &Server) {
    let before = counter(s, "config_reloads") + counter(s, "config_reload_failures");
    signal(s, libc::SIGHUP);
    wait_for(
        || counter(s, "config_reloads") + counter(s, "config_reload_failures") > before,
        "the reload to finish",
    );
}

/// Rewrites the server's configuration file, replacing `from` (which must be there) with `to`.
fn rewrite_config(s: &Server, from: &str, to: &str) {
    let text = read(&s.config);
    assert!(text.contains(from), "{from:?} not in:\n{text}");
    std::fs::write(&s.config, text.replacen(from, to, 1)).unwrap();
}

/// RCPT to a remote domain from 127.0.0.2 (outside a mynetworks of 127.0.0.1/32): the reply.
fn relay_attempt_from_127_0_0_2(s: &Server) -> (Client, String) {
    let mut c = Client::from_stream(connect_from([127, 0, 0, 2].into(), s.smtp).unwrap());
    assert!(c.reply().starts_with("220 "));
    assert!(c.cmd("EHLO outside.test").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<a@outside.test>").starts_with("250"));
    let r = c.cmd("RCPT TO:<someone@remote.example>");
    (c, r)
}

#[test]
fn sighup_changes_mynetworks() {
    let mut s = Server::start("mynetworks = [\"127.0.0.1/32\"]\n");
    let log = respawn_logged(&mut s, &[]);
    let (mut c, r) = relay_attempt_from_127_0_0_2(&s);
    assert!(r.starts_with("554 5.7.1"), "{r}");
    c.cmd("QUIT");
    rewrite_config(
        &s,
        "mynetworks = [\"127.0.0.1/32\"]",
        "mynetworks = [\"127.0.0.1/32\", \"127.0.0.2/32\"]",
    );
    sighup_and_wait(&s);
    assert_eq!(counter(&s, "config_reloads"), 1, "{}", read(&log));
    assert_eq!(counter(&s, "config_reload_failures"), 0);
    // The same client may relay now, and its message is queued.
    let (mut c, r) = relay_attempt_from_127_0_0_2(&s);
    assert!(r.starts_with("250"), "{r}");
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: relayed after a reload\r\n\r\nhello\r\n.\r\n");
    let r = c.reply();
    common::queued_id(&r);
    assert!(
        read(&log).contains("configuration reloaded from"),
        "{}",
        read(&log)
    );
}

#[test]
fn sighup_with_a_broken_file_keeps_the_running_configuration() {
    let mut s = Server::start("mynetworks = [\"127.0.0.1/32\"]\n");
    let log = respawn_logged(&mut s, &[]);
    let good = read(&s.config);
    // Not TOML: the file is named, the old configuration stays, the failure is counted.
    std::fs::write(
        &s.config,
        good.replacen(
            "mynetworks = [\"127.0.0.1/32\"]",
            "mynetworks = [\"127.0.0.2/32\"",
            1,
        ),
    )
    .unwrap();
    sighup_and_wait(&s);
    assert_eq!(counter(&s, "config_reload_failures"), 1);
    assert_eq!(counter(&s, "config_reloads"), 0);
    let l = read(&log);
    assert!(
        l.contains("configuration not reloaded from")
            && l.contains("the running one stays")
            && l.contains("shardmta.toml"),
        "{l}"
    );
    // A users file that is not there: named, nothing changes (mynetworks would have, with it).
    std::fs::write(
        &s.config,
        good.replacen(
            "mynetworks = [\"127.0.0.1/32\"]",
            "mynetworks = [\"127.0.0.2/32\"]",
            1,
        )
        .replacen("/users\"", "/users-gone\"", 1),
    )
    .unwrap();
    sighup_and_wait(&s);
    assert_eq!(counter(&s, "config_reload_failures"), 2);
    let l = read(&log);
    assert!(l.contains("users-gone"), "{l}");
    // Still serving, under the old rules: 127.0.0.1 relays, 127.0.0.2 does not.
    let (_, r) = relay_attempt_from_127_0_0_2(&s);
    assert!(r.starts_with("554 5.7.1"), "{r}");
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO inside.test");
    common::queued_id(&c.send_mail(
        "a@inside.test",
        &["b@remote.example"],
        "Subject: x\r\n\r\ny\r\n",
    ));
    // And AUTH still works with the users file in use.
    let mut c = Client::greeted(s.submission).starttls();
    c.cmd("EHLO inside.test");
    let r = c.cmd(&format!("AUTH PLAIN {}", common::b64("\0alice\0secret")));
    assert!(r.starts_with("235"), "{r}");
}

#[test]
fn sighup_with_a_changed_listener_keeps_the_listener_and_says_restart() {
    let mut s = Server::start("mynetworks = [\"127.0.0.1/32\"]\n");
    let log = respawn_logged(&mut s, &[]);
    let new_port = free_port();
    let old = format!("address = \"{}\"", s.smtp);
    let new = format!("address = \"127.0.0.1:{new_port}\"");
    rewrite_config(&s, &old, &new);
    rewrite_config(
        &s,
        "mynetworks = [\"127.0.0.1/32\"]",
        "mynetworks = [\"127.0.0.1/32\", \"127.0.0.2/32\"]",
    );
    sighup_and_wait(&s);
    // The rest of the file is in use; the listener is as it was, and the log says why.
    assert_eq!(counter(&s, "config_reloads"), 1);
    let l = read(&log);
    assert!(
        l.contains(
            "listener changed but the listeners changed: binding new addresses needs a restart"
        ),
        "{l}"
    );
    assert!(greeting_from(s.smtp));
    assert!(TcpStream::connect(("127.0.0.1", new_port)).is_err());
    let (_, r) = relay_attempt_from_127_0_0_2(&s);
    assert!(r.starts_with("250"), "{r}");
}

/// A client that does TLS from the first byte and keeps the certificate the server presented.
fn presented_certificate(addr: SocketAddr) -> Vec<u8> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cfg = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(shardmta::delivery::outbound::NoVerify))
        .with_no_client_auth();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), "mx.test".try_into().unwrap()).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut greeting = [0u8; 4];
    tls.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"220 ");
    let der = tls.conn.peer_certificates().unwrap()[0].to_vec();
    let _ = tls.write_all(b"QUIT\r\n");
    der
}

#[test]
fn a_certificate_replaced_on_sighup_is_served_to_the_next_client() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let one = rcgen::generate_simple_self_signed(vec!["one.test".into()]).unwrap();
    let two = rcgen::generate_simple_self_signed(vec!["two.test".into()]).unwrap();
    std::fs::write(&cert, one.cert.pem()).unwrap();
    std::fs::write(&key, one.signing_key.serialize_pem()).unwrap();
    let mut s = Server::start_in(
        dir,
        &format!(
            "smtpd_tls_cert_file = \"{}\"\nsmtpd_tls_key_file = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    let log = respawn_logged(&mut s, &[]);
    assert_eq!(
        presented_certificate(s.submissions),
        one.cert.der().to_vec()
    );
    // A half-replaced pair (the new certificate, the old key) is refused: the old pair stays in use.
    std::fs::write(&cert, two.cert.pem()).unwrap();
    sighup_and_wait(&s);
    assert_eq!(counter(&s, "config_reload_failures"), 1);
    let l = read(&log);
    assert!(l.contains("cert.pem") && l.contains("key.pem"), "{l}");
    assert_eq!(
        presented_certificate(s.submissions),
        one.cert.der().to_vec()
    );
    // Both replaced: the next client gets the new certificate.
    std::fs::write(&key, two.signing_key.serialize_pem()).unwrap();
    sighup_and_wait(&s);
    assert_eq!(counter(&s, "config_reloads"), 1, "{}", read(&log));
    assert_eq!(
        presented_certificate(s.submissions),
        two.cert.der().to_vec()
    );
    // STARTTLS on the smtp listener too.
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO x");
    let _ = c.starttls();
}

#[test]
fn systemd_hears_ready_reloading_and_stopping() {
    let mut s = Server::start("");
    let sock_path = s.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let recv = || {
        let mut b = vec![0u8; 8192];
        let n = sock.recv(&mut b).expect("a notification");
        String::from_utf8(b[..n].to_vec()).unwrap()
    };
    respawn_logged(&mut s, &[("NOTIFY_SOCKET", sock_path.as_os_str())]);
    // STATUS=starting, then READY=1 once every shard is up.
    let mut m = recv();
    while !m.contains("READY=1") {
        assert!(m.starts_with("STATUS="), "{m}");
        m = recv();
    }
    assert!(m.contains("STATUS=2 shard(s) listening on"), "{m}");
    signal(&s, libc::SIGHUP);
    let m = recv();
    assert!(m.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{m}");
    let m = recv();
    assert!(
        m.starts_with("READY=1\n") && m.contains("configuration reloaded"),
        "{m}"
    );
    signal(&s, libc::SIGTERM);
    let m = recv();
    assert!(m.starts_with("STOPPING=1"), "{m}");
    let st = s.child.take().unwrap().wait().unwrap();
    assert!(st.success(), "{st}");
}

/// Runs `serve` on `config` and returns (exit code, stderr), failing the test if it still runs after 15 s.
fn serve_exit(config: &Path) -> (i32, String) {
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .as_mut()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (st.code().unwrap_or(-1), err);
        }
        if started.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve still running after 15 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_second_instance_on_the_same_port_is_refused() {
    let first = Server::start("");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("second.toml");
    std::fs::write(
        &config,
        format!(
            "myhostname = \"second.test\"\nqueue_directory = \"{}\"\nshards = 2\n[delivery]\nenabled = false\n[[listener]]\naddress = \"{}\"\nkind = \"smtp\"\n",
            dir.path().join("spool").display(),
            first.smtp
        ),
    )
    .unwrap();
    // Clients keep connecting while the second instance tries to start: every one must meet the first.
    let stop = Arc::new(AtomicBool::new(false));
    let before = counter(&first, "sessions_total");
    let hammer = {
        let (stop, addr) = (stop.clone(), first.smtp);
        std::thread::spawn(move || {
            let mut greetings = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let mut c = Client::connect(addr);
                greetings.push(c.reply());
                c.cmd("QUIT");
            }
            greetings
        })
    };
    let (code, err) = serve_exit(&config);
    stop.store(true, Ordering::Relaxed);
    let greetings = hammer.join().unwrap();
    assert_eq!(code, 1, "{err}");
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.contains(&first.smtp.to_string())
            && last.contains("in use by another process")
            && last.contains("another shardmta instance"),
        "{err}"
    );
    assert!(!greetings.is_empty());
    for g in &greetings {
        assert!(
            g.starts_with("220 mx.test "),
            "a connection met another server: {g}"
        );
    }
    // The first counted every one of them (stats.json is rewritten every 200 ms).
    let want = before + greetings.len() as u64;
    wait_for(
        || counter(&first, "sessions_total") >= want,
        "the first's session count",
    );
    assert_eq!(counter(&first, "sessions_total"), want);
    assert!(
        !dir.path().join("spool").join("shard-0").exists(),
        "the second made a queue"
    );
}

#[test]
fn two_listeners_on_one_address_are_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "queue_directory = \"{}\"\n[[listener]]\naddress = \"127.0.0.1:{port}\"\nkind = \"smtp\"\n[[listener]]\naddress = \"0.0.0.0:{port}\"\nkind = \"submission\"\n",
            dir.path().join("spool").display()
        ),
    )
    .unwrap();
    let (code, err) = serve_exit(&config);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "127.0.0.1:{port} (Smtp) and 0.0.0.0:{port} (Submission)"
        )),
        "{err}"
    );
    assert!(!dir.path().join("spool").exists(), "nothing was started");
}

#[test]
fn unreadable_certificate_or_users_file_stops_the_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.pem");
    let ck = rcgen::generate_simple_self_signed(vec!["mx.test".into()]).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let missing_cert = dir.path().join("no-such-cert.pem");
    // A directory cannot be read as a file, even by root.
    let users_dir = dir.path().join("users.d");
    std::fs::create_dir(&users_dir).unwrap();
    let config = dir.path().join("c.toml");
    let base = format!(
        "queue_directory = \"{}\"\n[delivery]\nenabled = false\n[[listener]]\naddress = \"127.0.0.1:{}\"\nkind = \"smtp\"\n",
        dir.path().join("spool").display(),
        free_port()
    );
    for (top, names) in [
        (
            format!(
                "smtpd_tls_cert_file = \"{}\"\nsmtpd_tls_key_file = \"{}\"\n",
                missing_cert.display(),
                key.display()
            ),
            vec!["smtpd_tls_cert_file", "no-such-cert.pem"],
        ),
        (
            format!("smtpd_sasl_users_file = \"{}\"\n", users_dir.display()),
            vec!["smtpd_sasl_users_file", "users.d"],
        ),
    ] {
        std::fs::write(&config, format!("{top}{base}")).unwrap();
        let (code, err) = serve_exit(&config);
        assert_eq!(code, 1, "{err}");
        let last = err.lines().last().unwrap_or("");
        for n in names {
            assert!(last.contains(n), "{n} not in the last line; stderr:\n{err}");
        }
    }
}

#[test]
fn check_config_lists_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let one = rcgen::generate_simple_self_signed(vec!["one.test".into()]).unwrap();
    let two = rcgen::generate_simple_self_signed(vec!["two.test".into()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, one.cert.pem()).unwrap();
    std::fs::write(&key, two.signing_key.serialize_pem()).unwrap();
    let users = dir.path().join("users");
    std::fs::write(&users, "alice:{PLAIN}secret\n").unwrap();
    let config = dir.path().join("c.toml");
    let text = format!(
        "delay_warning_time = \"6d\"\nsmtpd_tls_cert_file = \"{}\"\nsmtpd_tls_key_file = \"{}\"\nsmtpd_sasl_users_file = \"{}\"\nalias_maps = [\"{}\"]\n[local]\nmailbox_path = \"/var/mail/{{dommain}}/{{user}}\"\n[[listener]]\naddress = \"127.0.0.1:2525\"\nkind = \"smtp\"\n[[listener]]\naddress = \"127.0.0.1:2525\"\nkind = \"submission\"\n",
        cert.display(),
        key.display(),
        users.display(),
        dir.path().join("no-aliases").display()
    );
    std::fs::write(&config, &text).unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let problems: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(problems.len(), 6, "{err}");
    for must in [
        "127.0.0.1:2525 (Smtp) and 127.0.0.1:2525 (Submission)",
        "unknown placeholder {dommain}; known: {user}, {domain}, {home}",
        "delay_warning_time",
        "cert.pem and smtpd_tls_key_file",
        "smtpd_sasl_users_file",
        "no-aliases",
    ] {
        assert!(
            problems.iter().any(|p| p.contains(must)),
            "{must:?} not listed:\n{err}"
        );
    }
    assert!(
        err.lines().last().unwrap().contains("6 problem(s)"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    // Mended, the same file passes and is printed.
    let users_line = String::from_utf8(
        Command::new(BIN)
            .args(["passwd", "alice"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin.take().unwrap().write_all(b"secret\n")?;
                c.wait_with_output()
            })
            .unwrap()
            .stdout,
    )
    .unwrap();
    std::fs::write(&users, users_line).unwrap();
    std::fs::write(&key, one.signing_key.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("no-aliases"), "postmaster: root\n").unwrap();
    let fixed = text
        .replace("delay_warning_time = \"6d\"\n", "")
        .replace("{dommain}", "{domain}")
        .replacen(
            "127.0.0.1:2525\"\nkind = \"submission\"",
            "127.0.0.1:2587\"\nkind = \"submission\"",
            1,
        );
    std::fs::write(&config, fixed).unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("mailbox_path = \"/var/mail/{domain}/{user}\""));
}

/// Postfix's default mydestination includes $myhostname: mail to root@<myhostname> from outside mynetworks is
/// local, not refused as relaying (so bounces to root@<host> are not lost).
#[test]
fn mail_to_root_at_myhostname_is_local_by_default() {
    let s = Server::start("mynetworks = [\"127.0.0.1/32\"]\n");
    let mut c = Client::from_stream(connect_from([127, 0, 0, 2].into(), s.smtp).unwrap());
    assert!(c.reply().starts_with("220 mx.test "));
    c.cmd("EHLO outside.test");
    for local in ["root@mx.test", "root@localhost", "root@localhost.test"] {
        assert!(c.cmd("MAIL FROM:<a@outside.test>").starts_with("250"));
        let r = c.cmd(&format!("RCPT TO:<{local}>"));
        assert!(r.starts_with("250"), "{local}: {r}");
        c.cmd("RSET");
    }
    assert!(c.cmd("MAIL FROM:<a@outside.test>").starts_with("250"));
    let r = c.cmd("RCPT TO:<root@elsewhere.test>");
    assert!(r.starts_with("554 5.7.1"), "{r}");
    let out = s.cli(&["check-config"]);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains(
            "mydestination = [\n    \"mx.test\",\n    \"localhost.test\",\n    \"localhost\",\n]"
        ),
        "{printed}"
    );
}
