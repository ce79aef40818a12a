//! `shardmta sendmail` against a running relay, as a drop-in /usr/sbin/sendmail: exit codes (sysexits), what
//! lands in the queue and in Maildirs (bare names qualified, Date/Message-ID/From added only when missing),
//! cron's and Symfony's command lines, `-bs` through a real subprocess, `-bv`, partial refusals, and the
//! binary invoked as `mailq` and `newaliases`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn sendmail(s: &Server, args: &[&str], stdin: &[u8]) -> (i32, String) {
    let (code, _, err) = run_with_config(Command::new(BIN).arg("sendmail"), &s.config, args, stdin);
    (code, err)
}

/// Runs `cmd ARGS` with `SHARDMTA_CONFIG=config` and `USER=tester`, `stdin` as its input: (exit code, stdout,
/// stderr).
fn run_with_config(
    cmd: &mut Command,
    config: &Path,
    args: &[&str],
    stdin: &[u8],
) -> (i32, String, String) {
    let mut child = cmd
        .args(args)
        .env("SHARDMTA_CONFIG", config)
        .env("USER", "tester")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A mode that reads nothing may have exited already.
    let _ = child.stdin.take().unwrap().write_all(stdin);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A relay whose `mydestination` holds myhostname (mx.test), with local users root and alice and delivery on
/// (DNS goes nowhere: only local mail is delivered). `top`: more top-level keys.
fn local_server(top: &str) -> Server {
    Server::start(&format!(
        "mydestination = [\"mx.test\", \"localhost\"]\n{top}\n[delivery]\n\n\
         [local]\nusers = [\"root\", \"alice\"]\nsystem_users = false\n"
    ))
}

fn maildir(s: &Server, user: &str) -> PathBuf {
    s.spool()
        .join("mail")
        .join("mx.test")
        .join(user)
        .join("Maildir")
}

/// The messages in `user`'s Maildir once it has `n` (sorted).
fn delivered(s: &Server, user: &str, n: usize) -> Vec<String> {
    let new = maildir(s, user).join("new");
    wait_for(
        || read_files(&new).len() >= n,
        &format!("{n} message(s) for {user}"),
    );
    read_files(&new)
}

/// The header section of a delivered message (up to the first empty line), its last line end included.
fn header_of(msg: &str) -> &str {
    &msg[..msg.find("\n\n").map_or(msg.len(), |i| i + 1)]
}

fn count_fields(head: &str, name: &str) -> usize {
    head.lines()
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        })
        .count()
}

/// A symlink named `name` to the binary, in a fresh directory.
fn linked_as(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join(name);
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    (dir, link)
}

#[test]
fn sendmail_submits_with_arguments_and_with_t() {
    let s = Server::start("");
    let (code, err) = sendmail(
        &s,
        &["-oi", "-f", "app@client.test", "bob@localhost"],
        b"Subject: one\n\nline\n.\nafter dot\n",
    );
    assert_eq!(code, 0, "{err}");
    let (code, err) = sendmail(
        &s,
        &["-t", "-f", "app@client.test"],
        b"To: A <a@localhost>\nBcc: hidden@localhost\nSubject: two\n\nbody\n.\nnot sent\n",
    );
    assert_eq!(code, 0, "{err}");
    let q = s.queue();
    assert_eq!(q.len(), 2);
    let one = q
        .iter()
        .find(|m| m["recipients"][0]["address"] == "bob@localhost")
        .unwrap();
    let two = q
        .iter()
        .find(|m| m["recipients"][0]["address"] == "a@localhost")
        .unwrap();
    assert_eq!(
        two["recipients"].as_array().unwrap().len(),
        2,
        "Bcc recipient kept in the envelope"
    );
    let body_one = String::from_utf8(s.queue_cat(one["id"].as_str().unwrap())).unwrap();
    assert!(
        body_one.contains("\r\nSubject: one\r\n")
            && body_one.ends_with("\r\n\r\nline\r\n.\r\nafter dot\r\n"),
        "-oi keeps the dot line: {body_one:?}"
    );
    let body_two = String::from_utf8(s.queue_cat(two["id"].as_str().unwrap())).unwrap();
    assert!(
        !body_two.contains("hidden") && body_two.ends_with("body\r\n"),
        "Bcc removed, input ended at the dot: {body_two:?}"
    );
    assert_eq!(one["sender"], "app@client.test");
}

#[test]
fn sendmail_exit_codes() {
    let s = Server::start("mynetworks = [\"192.0.2.0/24\"]\n");
    let (code, err) = sendmail(
        &s,
        &["-f", "app@client.test", "x@remote.example"],
        b"Subject: x\n\nx\n",
    );
    assert_eq!(code, 67, "a refused recipient is EX_NOUSER: {err}");
    assert!(err.contains("554 5.7.1"), "{err}");
    let (code, err) = sendmail(&s, &["-Z", "a@localhost"], b"");
    assert_eq!(code, 64, "bad usage is EX_USAGE: {err}");
    let (code, err) = sendmail(&s, &["-N", "sometimes", "a@localhost"], b"x\n");
    assert_eq!(code, 64, "a bad -N value is EX_USAGE: {err}");
    let mut dead = Server::start("");
    dead.kill9();
    let (code, err) = sendmail(&dead, &["a@localhost"], b"x\n");
    assert_eq!(code, 75, "no relay running is EX_TEMPFAIL: {err}");
}

#[test]
fn bare_names_are_qualified_and_missing_headers_added() {
    let s = local_server("");
    // No Date, Message-ID or From: all three are added; the sender is $USER@myhostname, -F its name.
    let (code, err) = sendmail(
        &s,
        &["-F", "Test User", "root"],
        b"Subject: one\n\nbody one\n",
    );
    assert_eq!(code, 0, "{err}");
    let msgs = delivered(&s, "root", 1);
    let head = header_of(&msgs[0]);
    assert!(head.contains("Delivered-To: root@mx.test\n"), "{head}");
    assert!(head.contains("Return-Path: <tester@mx.test>\n"), "{head}");
    assert!(
        head.contains("\nFrom: Test User <tester@mx.test>\n"),
        "{head}"
    );
    assert_eq!(count_fields(head, "Date"), 1, "{head}");
    assert_eq!(count_fields(head, "Message-ID"), 1, "{head}");
    let mid = head
        .lines()
        .find_map(|l| l.strip_prefix("Message-ID: "))
        .unwrap();
    assert!(mid.starts_with('<') && mid.ends_with("@mx.test>"), "{mid}");
    let date = head.lines().find_map(|l| l.strip_prefix("Date: ")).unwrap();
    assert!(date.ends_with(" +0000") && date.len() > 25, "{date}");
    assert!(msgs[0].ends_with("\n\nbody one\n"), "{}", msgs[0]);

    // The message's own fields are kept and never doubled (any case, folded); a bare -f sender is qualified.
    let (code, err) = sendmail(
        &s,
        &["-f", "app", "-F", "Ignored Name", "alice"],
        b"from: Me\n <me@client.test>\nDATE: Mon, 1 Jan 2024 10:00:00 +0100\nMessage-Id: <mine@client.test>\nSubject: two\n\nDate: in the body\n",
    );
    assert_eq!(code, 0, "{err}");
    let msgs = delivered(&s, "alice", 1);
    let head = header_of(&msgs[0]);
    assert!(head.contains("Return-Path: <app@mx.test>\n"), "{head}");
    assert!(head.contains("Delivered-To: alice@mx.test\n"), "{head}");
    for (name, n) in [("Date", 1), ("Message-ID", 1), ("From", 1)] {
        assert_eq!(count_fields(head, name), n, "{name} in {head}");
    }
    assert!(head.contains("from: Me\n <me@client.test>\nDATE: Mon, 1 Jan 2024 10:00:00 +0100\nMessage-Id: <mine@client.test>\nSubject: two"), "{head}");
    assert!(!msgs[0].contains("Ignored Name"));
    assert!(msgs[0].ends_with("\n\nDate: in the body\n"));

    // No header section at all: the fields go first, then an empty line, then the text as the body.
    let (code, err) = sendmail(
        &s,
        &["-f", "app", "-N", "success,failure", "root"],
        b"just a line\n",
    );
    assert_eq!(code, 0, "{err}");
    let msgs = delivered(&s, "root", 2);
    let m = msgs.iter().find(|m| m.contains("just a line")).unwrap();
    assert!(m.ends_with("\nFrom: app@mx.test\n\njust a line\n"), "{m}");
}

#[test]
fn cron_command_lines_deliver_to_root() {
    let s = local_server("");
    // cronie: `-FCronDaemon -i -odi -oem -oi -t -f root`, the recipient from `To: root`.
    let cronie = b"From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@host> echo cronie\nContent-Type: text/plain; charset=UTF-8\nAuto-Submitted: auto-generated\nX-Cron-Env: <SHELL=/bin/sh>\n\ncronie output\n.\nafter a dot line\n";
    let (code, err) = sendmail(
        &s,
        &[
            "-FCronDaemon",
            "-i",
            "-odi",
            "-oem",
            "-oi",
            "-t",
            "-f",
            "root",
        ],
        cronie,
    );
    assert_eq!(code, 0, "cronie: {err}");
    // Debian's cron: `-FCronDaemon -i -B8BITMIME -oem root` (MAILTO=root), 8-bit output.
    let debian = "From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@host> echo debian\nMIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\nContent-Transfer-Encoding: 8bit\n\ndébian output\n";
    let (code, err) = sendmail(
        &s,
        &["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
        debian.as_bytes(),
    );
    assert_eq!(code, 0, "debian: {err}");
    // Older Debian and other crons: `-i -FCronDaemon -B8BITMIME -oem root`, `-FCronDaemon -odi -oem -oi -t`.
    let (code, err) = sendmail(
        &s,
        &["-i", "-FCronDaemon", "-B8BITMIME", "-oem", "root"],
        b"Subject: third\n\nthird output\n",
    );
    assert_eq!(code, 0, "{err}");
    let msgs = delivered(&s, "root", 3);
    let c = msgs.iter().find(|m| m.contains("cronie output")).unwrap();
    assert!(c.contains("Return-Path: <root@mx.test>\n"), "{c}");
    assert!(
        c.ends_with("\n\ncronie output\n.\nafter a dot line\n"),
        "-i keeps reading: {c}"
    );
    assert_eq!(
        count_fields(header_of(c), "From"),
        1,
        "the message's From kept alone"
    );
    assert!(header_of(c).contains("From: root (Cron Daemon)"));
    let d = msgs.iter().find(|m| m.contains("débian output")).unwrap();
    assert!(d.contains("Return-Path: <tester@mx.test>\n"), "{d}");
    let t = msgs.iter().find(|m| m.contains("third output")).unwrap();
    assert!(
        header_of(t).contains("\nFrom: CronDaemon <tester@mx.test>"),
        "{t}"
    );
}

#[test]
fn one_refused_recipient_does_not_refuse_the_others() {
    // Loopback is outside mynetworks: a remote recipient is relay-denied; local ones are accepted.
    let s = local_server("mynetworks = [\"192.0.2.0/24\"]");
    let (code, err) = sendmail(
        &s,
        &[
            "-f",
            "app@client.test",
            "x@remote.example",
            "root",
            "nobody",
        ],
        b"Subject: partial\n\npartial body\n",
    );
    assert_eq!(code, 67, "refused recipients give EX_NOUSER: {err}");
    assert!(
        err.contains("x@remote.example: refused: 554 5.7.1"),
        "{err}"
    );
    assert!(err.contains("nobody@mx.test: refused: 550 5.1.1"), "{err}");
    assert!(!err.contains("root@mx.test"), "{err}");
    let msgs = delivered(&s, "root", 1);
    assert!(msgs[0].contains("partial body"));
    assert!(msgs[0].contains("Delivered-To: root@mx.test"));
    // Every recipient refused: nothing is queued.
    let (code, err) = sendmail(&s, &["x@remote.example", "nobody"], b"Subject: none\n\nx\n");
    assert_eq!(code, 67, "{err}");
    wait_for(|| s.queue().is_empty(), "the queue to empty");
    assert_eq!(read_files(&maildir(&s, "root").join("new")).len(), 1);
}

#[test]
fn bv_reports_each_recipient_and_sends_nothing() {
    let s = local_server("mynetworks = [\"192.0.2.0/24\"]");
    let (code, out, err) = run_with_config(
        Command::new(BIN).arg("sendmail"),
        &s.config,
        &["-bv", "root", "nobody", "x@remote.example", "alice@mx.test"],
        b"",
    );
    assert_eq!(code, 67, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert_eq!(lines[0], "root@mx.test: deliverable");
    assert!(lines[1].starts_with("nobody@mx.test: 550 5.1.1 "), "{out}");
    assert!(
        lines[2].starts_with("x@remote.example: 554 5.7.1 "),
        "{out}"
    );
    assert_eq!(lines[3], "alice@mx.test: deliverable");
    let (code, out, err) = run_with_config(
        Command::new(BIN).arg("sendmail"),
        &s.config,
        &["-bv", "root,alice"],
        b"",
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out,
        "root@mx.test: deliverable\nalice@mx.test: deliverable\n"
    );
    // Nothing was sent: the queue and the Maildirs stay empty.
    wait_server_window(&s, Duration::from_millis(500));
    assert!(s.queue().is_empty());
    assert!(read_files(&maildir(&s, "root").join("new")).is_empty());
}

/// One SMTP reply from `r` (all its lines).
fn read_reply(r: &mut impl BufRead) -> String {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap() == 0 {
            return all;
        }
        all.push_str(&line);
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            return all;
        }
    }
}

fn spawn_bs(config: &Path) -> std::process::Child {
    Command::new(BIN)
        .args(["sendmail", "-bs"])
        .env("SHARDMTA_CONFIG", config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` to exit, at most `limit`.
fn wait_exit(child: &mut std::process::Child, limit: Duration) -> i32 {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("sendmail -bs did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bs_runs_a_whole_smtp_session_on_stdin_and_stdout() {
    let s = local_server("");
    let mut child = spawn_bs(&s.config);
    let mut input = child.stdin.take().unwrap();
    let mut output = BufReader::new(child.stdout.take().unwrap());
    let mut cmd = |line: &str, output: &mut BufReader<std::process::ChildStdout>| {
        input.write_all(line.as_bytes()).unwrap();
        input.flush().unwrap();
        read_reply(output)
    };
    let greeting = read_reply(&mut output);
    assert!(greeting.starts_with("220 "), "{greeting}");
    let ehlo = cmd("EHLO app.test\r\n", &mut output);
    assert!(
        ehlo.starts_with("250-") && ehlo.contains("PIPELINING"),
        "{ehlo}"
    );
    assert!(cmd("MAIL FROM:<app@client.test>\r\n", &mut output).starts_with("250 "));
    assert!(cmd("RCPT TO:<root@mx.test>\r\n", &mut output).starts_with("250 "));
    assert!(cmd("RCPT TO:<nobody@mx.test>\r\n", &mut output).starts_with("550 5.1.1"));
    assert!(cmd("DATA\r\n", &mut output).starts_with("354 "));
    let done = cmd(
        "Subject: via -bs\r\nMessage-ID: <bs@app.test>\r\n\r\nbs body\r\n..dot\r\n.\r\n",
        &mut output,
    );
    let id = queued_id(&done);
    // Pipelined commands in one write come back in order.
    input.write_all(b"RSET\r\nNOOP\r\nQUIT\r\n").unwrap();
    input.flush().unwrap();
    assert!(read_reply(&mut output).starts_with("250 "));
    assert!(read_reply(&mut output).starts_with("250 "));
    assert!(read_reply(&mut output).starts_with("221 "));
    let mut rest = String::new();
    output.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "", "EOF after the 221");
    assert_eq!(wait_exit(&mut child, Duration::from_secs(10)), 0);
    let msgs = delivered(&s, "root", 1);
    assert!(
        msgs[0].contains("Subject: via -bs\n") && msgs[0].ends_with("\n\nbs body\n.dot\n"),
        "{}",
        msgs[0]
    );
    let names: Vec<String> = std::fs::read_dir(maildir(&s, "root").join("new"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names[0].contains(&format!(".Q{id}R")),
        "the queue id from the 250 names the file: {names:?}"
    );
}

#[test]
fn bs_ends_when_either_side_closes() {
    let mut s = local_server("");
    // The client hangs up without QUIT: the relay gets a half-close, ends its session, and sendmail exits.
    let mut child = spawn_bs(&s.config);
    let mut output = BufReader::new(child.stdout.take().unwrap());
    assert!(read_reply(&mut output).starts_with("220 "));
    let mut input = child.stdin.take().unwrap();
    input
        .write_all(b"EHLO app.test\r\nMAIL FROM:<a@client.test>\r\n")
        .unwrap();
    drop(input);
    let started = Instant::now();
    let code = wait_exit(&mut child, Duration::from_secs(20));
    assert_eq!(code, 0);
    assert!(started.elapsed() < Duration::from_secs(10));
    let mut rest = String::new();
    output.read_to_string(&mut rest).unwrap();
    assert!(
        rest.starts_with("250-"),
        "the replies sent before the close still arrive: {rest}"
    );
    assert!(rest.contains("\r\n250 2.1.0"), "{rest}");
    wait_for(
        || server_stats(&s)["sessions_open"] == 0,
        "the relay to end the session",
    );

    // The relay goes away mid-session: sendmail exits although its stdin stays open.
    let mut child = spawn_bs(&s.config);
    let _input = child.stdin.take().unwrap();
    let mut output = BufReader::new(child.stdout.take().unwrap());
    assert!(read_reply(&mut output).starts_with("220 "));
    s.kill9();
    let code = wait_exit(&mut child, Duration::from_secs(20));
    assert!(code == 0 || code == 74, "{code}");

    // No relay at all: a 421 on stdout for the SMTP client, EX_TEMPFAIL.
    let mut child = spawn_bs(&s.config);
    let mut output = BufReader::new(child.stdout.take().unwrap());
    let r = read_reply(&mut output);
    assert!(r.starts_with("421 4.3.0 "), "{r}");
    assert_eq!(wait_exit(&mut child, Duration::from_secs(20)), 75);
}

#[test]
fn mailq_and_bp_list_the_queue() {
    // Delivery off: what is submitted stays queued.
    let s = Server::start("");
    let (code, err) = sendmail(
        &s,
        &["-f", "app@client.test", "bob@localhost"],
        b"Subject: q\n\nq\n",
    );
    assert_eq!(code, 0, "{err}");
    let id = s.queue()[0]["id"].as_str().unwrap().to_string();
    let (_dir, mailq) = linked_as("mailq");
    for (cmd, args) in [
        (Command::new(&mailq), vec![]),
        (Command::new(BIN), vec!["sendmail", "-bp"]),
    ] {
        let mut cmd = cmd;
        let (code, out, err) = run_with_config(&mut cmd, &s.config, &args, b"");
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(out.starts_with("ID "), "{out}");
        // The message's line (ID, age, size, sender), then a line per recipient with its state.
        let mut lines = out.lines().skip_while(|l| !l.starts_with(&id));
        let line = lines.next().unwrap_or_else(|| panic!("{id} in {out}"));
        assert!(line.contains("app@client.test"), "{line}");
        let rcpt = lines.next().unwrap_or_default();
        assert!(rcpt.contains("bob@localhost (pending)"), "{out}");
        assert!(out.contains("\n-- 1 message(s), 1 Kbytes\n"), "{out}");
    }
}

#[test]
fn q_flushes_the_deferred_queue() {
    use shardmta::dns::testserver::TestDns;
    let ip = |s: &str| -> std::net::Ipv4Addr { s.parse().unwrap() };
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("later.test", 10, "mx.later.test");
    dns.add_a("mx.later.test", ip("127.0.0.41"));
    dns.set_servfail("later.test", true);
    let s = Server::start(&relay_config(
        port,
        &dns,
        "",
        "minimal_backoff_time = \"1h\"\nmaximal_backoff_time = \"2h\"",
    ));
    let (code, err) = sendmail(
        &s,
        &["-f", "app@client.test", "x@later.test"],
        b"Subject: later\n\nx\n",
    );
    assert_eq!(code, 0, "{err}");
    wait_for(
        || {
            s.queue()
                .first()
                .is_some_and(|m| m["recipients"][0]["state"] == "deferred")
        },
        "a deferral",
    );
    let sink = Sink::start("127.0.0.41", port, &[]);
    dns.set_servfail("later.test", false);
    let (code, _, err) = run_with_config(
        Command::new(BIN).arg("sendmail"),
        &s.config,
        &["-q30m"],
        b"",
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("-q30m"),
        "the interval is noted as ignored: {err}"
    );
    sink.wait_messages(1);
}

#[test]
fn newaliases_checks_the_alias_files() {
    let dir = tempfile::tempdir().unwrap();
    let aliases = dir.path().join("aliases");
    std::fs::write(
        &aliases,
        "# comment\npostmaster: root\nops: root,\n  alice@example.org\npipe: |/usr/bin/true\n",
    )
    .unwrap();
    let config = dir.path().join("shardmta.toml");
    std::fs::write(
        &config,
        format!("alias_maps = [\"hash:{}\"]\n", aliases.display()),
    )
    .unwrap();
    let (_bin, newaliases) = linked_as("newaliases");
    let (code, out, err) = run_with_config(&mut Command::new(&newaliases), &config, &[], b"");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("3 aliases") && out.contains("within a second"),
        "{out}"
    );
    assert!(
        err.contains("warning:") && err.contains("|/usr/bin/true"),
        "{err}"
    );
    // `sendmail -bi` and `-I` are the same.
    for flag in ["-bi", "-I"] {
        let (code, out, _) =
            run_with_config(Command::new(BIN).arg("sendmail"), &config, &[flag], b"");
        assert_eq!(code, 0);
        assert!(out.contains("3 aliases"), "{out}");
    }
    // A line that does not parse: EX_DATAERR naming the file and line.
    std::fs::write(&aliases, "postmaster: root\nbroken line\n").unwrap();
    let (code, out, err) = run_with_config(&mut Command::new(&newaliases), &config, &[], b"");
    assert_eq!(code, 65, "{out}{err}");
    assert!(err.contains(&format!("{}:2:", aliases.display())), "{err}");
    // A missing file: EX_NOINPUT.
    std::fs::remove_file(&aliases).unwrap();
    let (code, _, err) = run_with_config(&mut Command::new(&newaliases), &config, &[], b"");
    assert_eq!(code, 66, "{err}");
    assert!(err.contains("cannot read"), "{err}");
}

#[test]
fn symfony_t_i_with_glued_sender() {
    // Symfony Mailer's `sendmail -t -i` adds `-f'sender'`; the message has LF line ends and a Bcc.
    let s = local_server("");
    let (code, err) = sendmail(
        &s,
        &["-t", "-i", "-fapp@client.test"],
        b"From: App <app@client.test>\nTo: \"Root, the\" <root@mx.test>\nBcc: alice\nSubject: symfony\nDate: Mon, 1 Jan 2024 10:00:00 +0000\nMessage-ID: <s@client.test>\n\n.\nbody\n",
    );
    assert_eq!(code, 0, "{err}");
    let r = delivered(&s, "root", 1);
    let a = delivered(&s, "alice", 1);
    assert_eq!(
        r[0].lines().skip(2).collect::<Vec<_>>(),
        a[0].lines().skip(2).collect::<Vec<_>>()
    );
    assert!(
        !r[0].contains("Bcc") && r[0].ends_with("\n\n.\nbody\n"),
        "{}",
        r[0]
    );
}
