//! Local delivery end to end: mail for `mydestination` lands in Maildirs written by the local-delivery shard;
//! users, aliases, virtual aliases and extensions are checked at RCPT; loops bounce; read-only and full
//! mailboxes defer and deliver later. Remote alias targets go to a sink on 127.0.0.x (DNS from the test's
//! own responder). Python's `mailbox.Maildir` reads the result as an independent reader.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use shardmta::dns::testserver::TestDns;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// Files in `<maildir>/new`, read whole.
fn new_messages(maildir: &Path) -> Vec<String> {
    read_files(&maildir.join("new"))
}

fn maildir(s: &Server, domain: &str, user: &str) -> PathBuf {
    s.spool()
        .join("mail")
        .join(domain)
        .join(user)
        .join("Maildir")
}

fn wait_new(md: &Path, n: usize) {
    wait_for(
        || new_messages(md).len() >= n,
        &format!("{n} message(s) in {}", md.display()),
    );
}

fn send(s: &Server, from: &str, to: &[&str], subject: &str, extra_headers: &str) -> String {
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO client.test");
    let r = c.send_mail(
        from,
        to,
        &format!("{extra_headers}Subject: {subject}\r\nMessage-ID: <{subject}@client.test>\r\n\r\nbody of {subject}\r\n..dot line\r\n"),
    );
    c.cmd("QUIT");
    queued_id(&r)
}

/// Reads a Maildir with Python's mailbox module: one line per message, "subject|delivered-to|return-path".
fn python_read(md: &Path) -> Vec<String> {
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import mailbox, sys\n\
             md = mailbox.Maildir(sys.argv[1], create=False)\n\
             for key in sorted(md.keys()):\n\
             \x20   m = md[key]\n\
             \x20   print('%s|%s|%s|%s' % (m['Subject'], m['Delivered-To'], m['Return-Path'], m.get_payload().splitlines()[0]))\n",
        )
        .arg(md)
        .output()
        .expect("python3 runs (.ci/run installs it)");
    assert!(
        out.status.success(),
        "python mailbox.Maildir failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

const LOCAL_USERS: &str = "[local]\nusers = [\"alice\", \"bob\"]\nsystem_users = false\n";

#[test]
fn users_aliases_virtual_and_extensions_end_in_maildirs() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("remote.example", 10, "mx.remote.example");
    dns.add_a("mx.remote.example", ip("127.0.0.31"));
    let sink = Sink::start("127.0.0.31", port, &[]);
    let dir = tempfile::tempdir().unwrap();
    let aliases = dir.path().join("aliases");
    std::fs::write(
        &aliases,
        "# team aliases\nsales: alice,\n  bob\nforward: carol@remote.example, alice\nloop1: loop2\nloop2: loop1\n",
    )
    .unwrap();
    let virt = dir.path().join("virtual");
    std::fs::write(
        &virt,
        "virt.example anything\ninfo@virt.example bob@localhost\n",
    )
    .unwrap();
    let top = format!(
        "mydestination = [\"localhost\"]\nrecipient_delimiter = \"+\"\nalias_maps = [\"hash:{}\"]\nvirtual_alias_maps = [\"{}\"]\n",
        aliases.display(),
        virt.display()
    );
    let cfg = relay_config(port, &dns, "", &top);
    let s = Server::start_in(dir, &format!("{cfg}\n{LOCAL_USERS}"));

    // Unknown users, alias loops and unknown virtual addresses are refused at RCPT, never bounced later.
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<a@client.test>");
    assert!(c
        .cmd("RCPT TO:<nobody@localhost>")
        .starts_with("550 5.1.1 "));
    assert!(c.cmd("RCPT TO:<loop1@localhost>").starts_with("550 5.4.6 "));
    assert!(c
        .cmd("RCPT TO:<other@virt.example>")
        .starts_with("550 5.1.1 "));
    assert!(c
        .cmd("RCPT TO:<\"../x/y\"@localhost>")
        .starts_with("553 5.1.3 "));
    assert!(c.cmd("RCPT TO:<Alice@LOCALHOST>").starts_with("250 "));
    c.cmd("RSET");
    c.cmd("QUIT");

    let ids = [
        send(&s, "a@client.test", &["alice@localhost"], "direct", ""),
        send(&s, "a@client.test", &["alice+news@localhost"], "plus", ""),
        send(&s, "a@client.test", &["sales@localhost"], "alias", ""),
        send(&s, "a@client.test", &["info@virt.example"], "virtual", ""),
        send(
            &s,
            "a@client.test",
            &["forward@localhost"],
            "remote-alias",
            "",
        ),
    ];
    let alice = maildir(&s, "localhost", "alice");
    let bob = maildir(&s, "localhost", "bob");
    wait_new(&alice, 4);
    wait_new(&bob, 2);
    sink.wait_messages(1);
    for id in &ids {
        wait_gone(&s, id);
    }
    // Every file is complete: headers added at delivery, the stored Received header, LF line ends, unstuffed.
    let msgs = new_messages(&alice);
    assert_eq!(msgs.len(), 4, "{msgs:?}");
    let direct = msgs.iter().find(|m| m.contains("Subject: direct")).unwrap();
    assert!(
        direct.starts_with("Return-Path: <a@client.test>\nDelivered-To: alice@localhost\nReceived: from client.test"),
        "{direct}"
    );
    assert!(direct.ends_with("\n\nbody of direct\n.dot line\n") && !direct.contains('\r'));
    let plus = msgs.iter().find(|m| m.contains("Subject: plus")).unwrap();
    assert!(
        plus.contains("Delivered-To: alice+news@localhost\n"),
        "{plus}"
    );
    assert!(
        std::fs::read_dir(alice.join("tmp"))
            .unwrap()
            .next()
            .is_none(),
        "tmp/ is empty"
    );
    // The remote alias target was relayed like any outbound mail.
    let m = &sink.messages()[0];
    assert!(
        m.contains("X-Sink-Rcpt-To: <carol@remote.example>") && m.contains("Subject: remote-alias"),
        "{m}"
    );

    // An independent reader sees the same.
    assert_eq!(
        python_read(&alice),
        vec![
            "alias|alice@localhost|<a@client.test>|body of alias",
            "direct|alice@localhost|<a@client.test>|body of direct",
            "plus|alice+news@localhost|<a@client.test>|body of plus",
            "remote-alias|alice@localhost|<a@client.test>|body of remote-alias",
        ]
    );
    assert_eq!(
        python_read(&bob),
        vec![
            "alias|bob@localhost|<a@client.test>|body of alias",
            "virtual|bob@localhost|<a@client.test>|body of virtual",
        ]
    );
    let log = delivery_log_with(&s, |l| {
        l["destination"] == "local" && l["result"] == "delivered"
    });
    assert!(
        log.iter().filter(|l| l["destination"] == "local").count() >= 6,
        "{log:?}"
    );
}

#[test]
fn delivered_to_loop_is_bounced_to_the_sender() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.54")));
    dns.add_mx("sender.example", 10, "mx.sender.example");
    dns.add_a("mx.sender.example", ip("127.0.0.32"));
    let sink = Sink::start("127.0.0.32", port, &[]);
    let cfg = relay_config(port, &dns, "", "mydestination = [\"localhost\"]\n");
    let s = Server::start(&format!("{cfg}\n{LOCAL_USERS}"));
    let id = send(
        &s,
        "someone@sender.example",
        &["alice@localhost"],
        "looping",
        "Delivered-To: bob@localhost\r\nDelivered-To: Alice@localhost\r\n",
    );
    sink.wait_messages(1);
    wait_gone(&s, &id);
    let dsn = &sink.messages()[0];
    assert!(
        dsn.contains("X-Sink-Rcpt-To: <someone@sender.example>")
            && dsn.contains("X-Sink-Mail-From: <>")
            && dsn.contains("Status: 5.4.6")
            && dsn.contains("mail forwarding loop"),
        "{dsn}"
    );
    assert!(new_messages(&maildir(&s, "localhost", "alice")).is_empty());
    // One Delivered-To for another recipient is no loop.
    let id = send(
        &s,
        "someone@sender.example",
        &["bob@localhost"],
        "once",
        "Delivered-To: alice@localhost\r\n",
    );
    wait_new(&maildir(&s, "localhost", "bob"), 1);
    wait_gone(&s, &id);
}

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount(args: &[&str], at: &Path) {
    let st = Command::new("mount").args(args).arg(at).status().unwrap();
    assert!(
        st.success(),
        "mount {args:?} failed (the test suite runs as root)"
    );
}

#[test]
fn read_only_and_full_mailboxes_defer_then_deliver() {
    let dir = tempfile::tempdir().unwrap();
    let mail = dir.path().join("mailroot");
    std::fs::create_dir(&mail).unwrap();
    mount(&["-t", "tmpfs", "-o", "size=256k", "tmpfs"], &mail);
    let _m = Mount(mail.clone());
    let alice = mail.join("alice/Maildir");
    std::fs::create_dir_all(alice.join("new")).unwrap();
    // Read-only: permission bits do not stop root, a read-only file system does.
    mount(&["-o", "remount,ro"], &mail);
    let top = format!(
        "mydestination = [\"localhost\"]\nminimal_backoff_time = \"1s\"\nmaximal_backoff_time = \"1s\"\n\
         [delivery]\nenabled = true\n[local]\nusers = [\"alice\"]\nsystem_users = false\nmailbox_path = \"{}/{{user}}/Maildir\"\n",
        mail.display()
    );
    let s = Server::start_in(dir, &top);
    let id = send(&s, "a@client.test", &["alice@localhost"], "patience", "");
    delivery_log_with(&s, |l| {
        l["result"] == "deferred" && l["reply"].as_str().unwrap_or("").starts_with("451 4.3.0")
    });
    assert!(
        s.queue().iter().any(|m| m["id"] == id.as_str()),
        "still queued"
    );
    // Writable but full: 4.2.2.
    mount(&["-o", "remount,rw"], &mail);
    let filler = mail.join("filler");
    let _ = std::fs::write(&filler, vec![b'x'; 512 * 1024]); // fails part way: the tmpfs is full
    delivery_log_with(&s, |l| {
        l["result"] == "deferred" && l["reply"].as_str().unwrap_or("").starts_with("452 4.2.2")
    });
    assert!(
        s.queue().iter().any(|m| m["id"] == id.as_str()),
        "still queued"
    );
    assert!(new_messages(&alice).is_empty());
    // Fixed: delivered once, nothing left behind in tmp/.
    std::fs::remove_file(&filler).unwrap();
    wait_new(&alice, 1);
    wait_gone(&s, &id);
    assert_eq!(new_messages(&alice).len(), 1);
    assert!(std::fs::read_dir(alice.join("tmp"))
        .unwrap()
        .next()
        .is_none());
}

#[test]
fn table_changes_apply_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let aliases = dir.path().join("aliases");
    std::fs::write(&aliases, "sales: alice\n").unwrap();
    let users = dir.path().join("local_users");
    std::fs::write(&users, "alice\nbob\n").unwrap();
    let top = format!(
        "mydestination = [\"localhost\"]\nalias_maps = [\"{}\"]\n[local]\nusers_file = \"{}\"\nsystem_users = false\n",
        aliases.display(),
        users.display()
    );
    let s = Server::start_in(dir, &top);
    let rcpt = |addr: &str| {
        let mut c = Client::greeted(s.smtp);
        c.cmd("EHLO client.test");
        c.cmd("MAIL FROM:<a@client.test>");
        let r = c.cmd(&format!("RCPT TO:<{addr}>"));
        c.cmd("QUIT");
        r
    };
    assert!(rcpt("sales@localhost").starts_with("250"));
    assert!(rcpt("carol@localhost").starts_with("550 5.1.1"));
    assert!(rcpt("help@localhost").starts_with("550 5.1.1"));
    // By mtime (looked at every second).
    std::fs::write(&users, "alice\nbob\ncarol\n").unwrap();
    wait_for(
        || rcpt("carol@localhost").starts_with("250"),
        "carol to become a user",
    );
    // On SIGHUP.
    std::fs::write(&aliases, "sales: alice\nhelp: bob\n").unwrap();
    let pid = s.child.as_ref().unwrap().id();
    Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    wait_for(
        || rcpt("help@localhost").starts_with("250"),
        "the new alias",
    );
    // A broken file keeps the old tables.
    std::fs::write(&aliases, "this is not an alias line\n").unwrap();
    Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(rcpt("help@localhost").starts_with("250"));
}

/// SIGKILL while the local shard is writing Maildirs under load, several times, restarting on the same spool:
/// every acknowledged message ends up exactly once in each recipient's Maildir, nothing is left in tmp/.
fn sigkill_during_local_delivery(sync_method: &str) {
    use std::collections::HashMap;
    use std::time::{SystemTime, UNIX_EPOCH};
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let cfg = format!(
        "mydestination = [\"localhost\"]\nrecipient_delimiter = \"+\"\n[delivery]\nenabled = true\n\
         [local]\nusers = [\"alice\", \"bob\"]\nsystem_users = false\nsync_method = \"{sync_method}\"\n"
    );
    let mut s = Server::start(&cfg);
    // Each kill comes once the local shard is writing Maildirs: bob's new/ grew by 20 in the round.
    let in_bobs_new = |s: &Server| {
        std::fs::read_dir(maildir(s, "localhost", "bob").join("new"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let acked = sigkill_rounds(
        &mut s,
        seed,
        3,
        6,
        |n| vec![format!("alice+{n}@localhost"), "bob@localhost".to_string()],
        Some(&in_bobs_new),
        1000,
    );
    wait_for_within(
        std::time::Duration::from_secs(120),
        || s.queue().is_empty(),
        "the queue to drain into the Maildirs",
    );
    for user in ["alice", "bob"] {
        let md = maildir(&s, "localhost", user);
        let mut seen: HashMap<String, usize> = HashMap::new();
        for m in new_messages(&md) {
            let token = m
                .lines()
                .find_map(|l| l.strip_prefix("X-Token: "))
                .unwrap_or_else(|| panic!("{user}: message without token: {m}"))
                .to_string();
            assert!(
                m.ends_with(&format!("\n.{token}\n")),
                "{user}: {token} complete"
            );
            *seen.entry(token).or_default() += 1;
        }
        for token in acked.keys() {
            assert_eq!(
                seen.get(token),
                Some(&1),
                "{user}: acknowledged {token} exactly once"
            );
        }
        let dup: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(dup.is_empty(), "{user}: duplicates {dup:?}");
        assert!(
            std::fs::read_dir(md.join("tmp")).unwrap().next().is_none(),
            "{user}: tmp/ is empty after the retries"
        );
    }
    eprintln!(
        "{} acknowledged messages each delivered exactly once to 2 Maildirs",
        acked.len()
    );
}

#[test]
fn sigkill_during_local_delivery_file_sync() {
    sigkill_during_local_delivery("file");
}

#[test]
fn sigkill_during_local_delivery_filesystem_sync() {
    sigkill_during_local_delivery("filesystem");
}
