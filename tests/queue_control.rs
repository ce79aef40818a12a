//! Queue control end to end: `shardmta queue hold|release|delete|flush|bounce` on a running server (through its
//! control socket) and on a stopped spool (under its lock), `queue list` (held, deferred, reasons, summary),
//! `queue cat` with the envelope, and `mailq`. Mail goes to sinks on 127.0.0.x found through the test's own DNS.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use common::*;
use shardmta::dns::testserver::TestDns;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn send(s: &Server, to: &[&str], subject: &str) -> String {
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO client.test");
    let id = queued_id(&c.send_mail(
        "sender@client.test",
        to,
        &format!("Subject: {subject}\r\nMessage-ID: <{subject}@client.test>\r\n\r\nbody of {subject}\r\n"),
    ));
    c.cmd("QUIT");
    id
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn message(s: &Server, id: &str) -> Option<serde_json::Value> {
    s.queue().into_iter().find(|m| m["id"] == id)
}

/// The message's recipients are deferred at least once (their destination refuses connections).
fn wait_deferred(s: &Server, id: &str) {
    wait_for(
        || {
            message(s, id).is_some_and(|m| {
                m["recipients"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|r| r["state"] == "deferred")
            })
        },
        &format!("{id} deferred"),
    );
}

/// DNS for `dest.test` (MX -> 127.0.0.`n`) and `client.test` (the senders' domain, MX -> 127.0.0.`n+1`).
fn dns_for(n: u8) -> TestDns {
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("dest.test", 10, "mx.dest.test");
    dns.add_a("mx.dest.test", Ipv4Addr::new(127, 0, 0, n));
    dns.add_mx("client.test", 10, "mx.client.test");
    dns.add_a("mx.client.test", Ipv4Addr::new(127, 0, 0, n + 1));
    dns
}

/// The proof: a held message is not delivered, across a restart, until it is released; then it is.
#[test]
fn held_message_waits_across_a_restart_until_released() {
    let port = free_port();
    let dns = dns_for(31);
    let mut s = Server::start(&relay_config(port, &dns, "", ""));
    let id = send(&s, &["bob@dest.test"], "held");
    // Nothing listens at the MX yet: deferred, retried every 1-2 s.
    wait_deferred(&s, &id);
    let out = ok(&s.cli(&["queue", "hold", &id]));
    assert!(out.contains(&format!("{id}: held")), "{out}");
    // Held twice: unchanged, said so.
    let out = ok(&s.cli(&["queue", "hold", &id]));
    assert!(out.contains("already held"), "{out}");
    let sink = Sink::start("127.0.0.31", port, &[]);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(sink.count("messages"), 0, "a held message was delivered");
    assert_eq!(message(&s, &id).unwrap()["held"], true);
    let listed = ok(&s.cli(&["queue", "list"]));
    assert!(listed.contains(&format!("{id}!")), "{listed}");
    // Across a restart (the hold is a durable record).
    assert!(s.terminate().success());
    s.spawn();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(sink.count("messages"), 0, "delivered after the restart");
    let held = ok(&s.cli(&["queue", "list", "--held", "--json"]));
    assert!(held.contains(&id), "{held}");
    let deferred = ok(&s.cli(&["queue", "list", "--deferred", "--json"]));
    assert!(
        !deferred.contains(&id),
        "a held message is not listed as deferred"
    );
    let out = ok(&s.cli(&["queue", "release", &id]));
    assert!(out.contains(&format!("{id}: released")), "{out}");
    sink.wait_messages(1);
    wait_gone(&s, &id);
}

/// The same verbs with the server stopped: the spool is edited under its lock, and the server finds the
/// changes at its next start. Delete removes without a bounce.
#[test]
fn changes_on_a_stopped_spool_take_effect_at_the_next_start() {
    let port = free_port();
    let dns = dns_for(33);
    let mut s = Server::start(&relay_config(port, &dns, "", ""));
    let keep = send(&s, &["a@dest.test"], "keep");
    let gone = send(&s, &["b@dest.test"], "gone");
    wait_deferred(&s, &keep);
    wait_deferred(&s, &gone);
    assert!(s.terminate().success());
    ok(&s.cli(&["queue", "hold", &keep]));
    let out = ok(&s.cli(&["queue", "delete", &gone]));
    assert!(out.contains(&format!("{gone}: deleted")), "{out}");
    // An ID that is not there is an error naming it.
    let missing = s.cli(&["queue", "delete", "0000000000000001"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not in the queue: 0000000000000001"));
    let sink = Sink::start("127.0.0.33", port, &[]);
    let bounces = Sink::start("127.0.0.34", port, &[]);
    s.spawn();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(sink.count("messages"), 0);
    assert_eq!(bounces.count("messages"), 0, "delete sends no bounce");
    assert!(message(&s, &gone).is_none());
    assert_eq!(message(&s, &keep).unwrap()["held"], true);
    // While it runs, the spool is locked: the CLI goes through the control socket instead (not an error).
    assert!(s.terminate().success());
    ok(&s.cli(&["queue", "release", "--all"]));
    s.spawn();
    sink.wait_messages(1);
    wait_gone(&s, &keep);
}

/// Bounce: the sender gets a DSN at once, naming the recipient and the administrator; the message is gone.
#[test]
fn bounce_returns_the_message_to_its_sender_now() {
    let port = free_port();
    let dns = dns_for(35);
    let bounces = Sink::start("127.0.0.36", port, &[]);
    let s = Server::start(&relay_config(port, &dns, "", ""));
    let id = send(&s, &["carol@dest.test"], "returned");
    wait_deferred(&s, &id);
    let out = ok(&s.cli(&["queue", "bounce", "--domain", "dest.test"]));
    assert!(out.contains(&format!("{id}: returned to sender")), "{out}");
    wait_gone(&s, &id);
    bounces.wait_messages(1);
    let dsn = &bounces.messages()[0];
    assert!(
        dsn.contains("X-Sink-Rcpt-To: <sender@client.test>"),
        "{dsn}"
    );
    assert!(dsn.contains("X-Sink-Mail-From: <>"), "{dsn}");
    assert!(
        dsn.contains("Final-Recipient: rfc822; carol@dest.test"),
        "{dsn}"
    );
    assert!(
        dsn.contains("returned to sender by the queue administrator"),
        "{dsn}"
    );
}

/// Flush: deferred recipients are tried at once instead of at their retry time an hour away.
#[test]
fn flush_delivers_deferred_mail_at_once() {
    let port = free_port();
    let dns = dns_for(37);
    let s = Server::start(&relay_config(
        port,
        &dns,
        "",
        "minimal_backoff_time = \"1h\"\nmaximal_backoff_time = \"2h\"",
    ));
    let id = send(&s, &["dave@dest.test"], "flushed");
    wait_deferred(&s, &id);
    let m = message(&s, &id).unwrap();
    let r = &m["recipients"][0];
    // The last deferral's reason and the next attempt are listed.
    assert!(
        r["last_reason"]
            .as_str()
            .is_some_and(|t| t.contains("127.0.0.37")),
        "{m}"
    );
    let table = ok(&s.cli(&["queue", "list"]));
    assert!(
        table.contains("next in 59m") || table.contains("next in 1h"),
        "{table}"
    );
    let summary = ok(&s.cli(&["queue", "list", "--summary"]));
    assert!(
        summary
            .lines()
            .any(|l| l.starts_with("dest.test") && l.split_whitespace().nth(1) == Some("1")),
        "{summary}"
    );
    let sink = Sink::start("127.0.0.37", port, &[]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(sink.count("messages"), 0, "not before its retry time");
    let out = ok(&s.cli(&["queue", "flush", "--all"]));
    assert!(out.contains(&format!("{id}: flushed")), "{out}");
    wait_for_within(
        Duration::from_secs(10),
        || sink.count("messages") == 1,
        "the flushed message at the sink",
    );
    wait_gone(&s, &id);
}

/// `queue cat` shows the envelope before the message; `mailq` is `queue list`; a listing piped into `head`
/// ends quietly.
#[test]
fn cat_shows_the_envelope_and_mailq_lists() {
    let s = Server::start("");
    let id = send(&s, &["erin@example.org"], "shown");
    let cat = ok(&s.cli(&["queue", "cat", &id]));
    let (env, msg) = cat.split_once("*** MESSAGE CONTENTS ***\n").unwrap();
    assert!(env.starts_with("*** ENVELOPE ***\n"), "{cat}");
    assert!(env.contains("sender: <sender@client.test>"), "{env}");
    assert!(env.contains("client: 127.0.0.1 helo=client.test"), "{env}");
    assert!(
        env.contains("recipient: <erin@example.org> pending"),
        "{env}"
    );
    assert!(msg.starts_with("Received: "), "{msg}");
    assert!(msg.contains("Subject: shown"), "{msg}");
    // mailq: the binary invoked by that name.
    let bin_dir = tempfile::tempdir().unwrap();
    let mailq = bin_dir.path().join("mailq");
    std::os::unix::fs::symlink(BIN, &mailq).unwrap();
    let out = std::process::Command::new(&mailq)
        .env("SHARDMTA_CONFIG", &s.config)
        .output()
        .unwrap();
    let text = ok(&out);
    assert!(
        text.contains(&id) && text.contains("erin@example.org"),
        "{text}"
    );
    // Piped into head: no "Broken pipe" error, no failure of ours.
    for _ in 0..300 {
        send(&s, &["x@example.org"], "many");
    }
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{BIN} queue list --config {} | head -1",
            s.config.display()
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("Broken pipe"), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
}

/// Selecting nothing is a usage error; a bad ID is named.
#[test]
fn queue_changes_need_a_selection() {
    let s = Server::start("");
    let out = s.cli(&["queue", "hold"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--all"));
    let out = s.cli(&["queue", "hold", "XYZ"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a queue ID: \"XYZ\""));
    let out = s.cli(&["queue", "hold", "--all", "--domain", "x.test"]);
    assert!(!out.status.success());
}

/// Every change is an event log line naming the message, and the command line finds the configuration through
/// `$SHARDMTA_CONFIG` when no `--config` is given.
#[test]
fn queue_changes_are_logged_and_the_cli_reads_shardmta_config() {
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("mail.log");
    let s = Server::start(&format!("maillog_file = \"{}\"\n", log.display()));
    let id = send(&s, &["fay@example.org"], "logged");
    let cli = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .env("SHARDMTA_CONFIG", &s.config)
            .output()
            .unwrap()
    };
    let out = ok(&cli(&["queue", "hold", &id]));
    assert!(out.contains(&format!("{id}: held")), "{out}");
    let listed = ok(&cli(&["queue", "list", "--held"]));
    assert!(listed.contains(&format!("{id}!")), "{listed}");
    ok(&cli(&["queue", "release", &id]));
    ok(&cli(&["queue", "delete", &id]));
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for(
        || read().contains(&format!("{id}: removed")),
        "the delete in the event log",
    );
    let text = read();
    let hold = text.find(&format!("{id}: placed on hold")).expect(&text);
    let release = text
        .find(&format!("{id}: released from hold"))
        .expect(&text);
    assert!(hold < release, "{text}");
}
