//! Local delivery end to end: mail for `mydestination` lands in Maildirs written by the local-delivery shard;
//! users, aliases, virtual aliases and extensions are checked at RCPT; loops bounce; read-only and full
//! mailboxes defer and deliver later; root follows no user's symlink or planted tmp/ link, and what it
//! delivers belongs to the mailbox owner. Remote alias targets go to a sink on 127.0.0.x (DNS from the test's
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
    // A broken file keeps the old tables: once the server has counted the failed reload, the alias still works.
    let failures = |s: &Server| server_stats(s)["table_reload_failures"].as_u64();
    assert_eq!(failures(&s), Some(0));
    std::fs::write(&aliases, "this is not an alias line\n").unwrap();
    Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    wait_for(
        || failures(&s) >= Some(1),
        "the failed reload to be counted",
    );
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

/// The mailbox owner of the symlink tests: nobody/nogroup, a system-style user who can plant links in their
/// own directory.
const NOBODY: u32 = 65534;

fn lchown(p: &Path, id: u32) {
    std::os::unix::fs::lchown(p, Some(id), Some(id)).unwrap();
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// (uid, gid, permission bits) of `p` itself (a symlink is not followed).
fn owner_mode(p: &Path) -> (u32, u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

/// Config for Maildirs at `<homes>/<user>/Maildir`, all owned by nobody, retried every second.
fn nobody_config(homes: &Path, users: &str) -> String {
    format!(
        "mydestination = [\"localhost\"]\nrecipient_delimiter = \"+\"\nminimal_backoff_time = \"1s\"\nmaximal_backoff_time = \"1s\"\n\
         [delivery]\nenabled = true\n[local]\nusers = [{users}]\nsystem_users = false\n\
         mailbox_uid = {NOBODY}\nmailbox_gid = {NOBODY}\nmailbox_path = \"{}/{{user}}/Maildir\"\n",
        homes.display()
    )
}

/// Root delivering for a user must not follow that user's symlinks: mallory's Maildir is a symlink she
/// planted into a root-only directory; delivery defers (451 4.3.0, naming the link) and creates nothing
/// there. carol, in the same message, gets a Maildir created as her: everything in it is hers.
#[test]
fn a_users_maildir_symlink_into_a_root_only_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let homes = dir.path().join("homes");
    std::fs::create_dir(&homes).unwrap();
    set_mode(&homes, 0o755);
    let rootonly = dir.path().join("rootonly");
    std::fs::create_dir(&rootonly).unwrap();
    set_mode(&rootonly, 0o700);
    let mallory = homes.join("mallory");
    let carol = homes.join("carol");
    for home in [&mallory, &carol] {
        std::fs::create_dir(home).unwrap();
        lchown(home, NOBODY);
        set_mode(home, 0o700);
    }
    let link = mallory.join("Maildir");
    std::os::unix::fs::symlink(&rootonly, &link).unwrap();
    lchown(&link, NOBODY);
    let s = Server::start_in(dir, &nobody_config(&homes, "\"mallory\", \"carol\""));
    let id = send(
        &s,
        "a@client.test",
        &["mallory@localhost", "carol@localhost"],
        "symlinked",
        "",
    );
    let carol_md = carol.join("Maildir");
    wait_new(&carol_md, 1);
    delivery_log_with(&s, |l| l["rcpt"] == "mallory@localhost");
    let planted: Vec<_> = std::fs::read_dir(&rootonly)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        planted.is_empty(),
        "nothing created in the root-only directory: {planted:?}"
    );
    // Two attempts for mallory (the retry opens the Maildir again, safely again).
    let refused = |l: &serde_json::Value| {
        l["rcpt"] == "mallory@localhost"
            && l["result"] == "deferred"
            && l["reply"].as_str().unwrap_or("").starts_with("451 4.3.0")
    };
    wait_for(
        || {
            std::fs::read_to_string(s.spool().join("delivery.log"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|l| refused(l))
                .count()
                >= 2
        },
        "two deferrals for mallory",
    );
    let log = delivery_log_with(&s, refused);
    let reply = log.iter().find(|l| refused(l)).unwrap()["reply"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reply.contains(&link.display().to_string()) && reply.contains("symlink owned by uid 65534"),
        "{reply}"
    );
    assert_eq!(
        std::fs::read_dir(&rootonly).unwrap().count(),
        0,
        "nothing created in the root-only directory"
    );
    assert_eq!(owner_mode(&rootonly), (0, 0, 0o700));
    let q = s.queue();
    let m = q
        .iter()
        .find(|m| m["id"] == id.as_str())
        .expect("still queued");
    let states: Vec<_> = m["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["address"].as_str().unwrap(), r["state"].as_str().unwrap()))
        .collect();
    assert!(
        states.contains(&("mallory@localhost", "deferred")),
        "{states:?}"
    );
    // carol's Maildir: created by the server as her, the file hers and private.
    assert_eq!(owner_mode(&carol_md), (NOBODY, NOBODY, 0o700));
    for sub in ["tmp", "new", "cur"] {
        assert_eq!(
            owner_mode(&carol_md.join(sub)),
            (NOBODY, NOBODY, 0o700),
            "{sub}"
        );
    }
    let files: Vec<PathBuf> = std::fs::read_dir(carol_md.join("new"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1);
    assert_eq!(owner_mode(&files[0]), (NOBODY, NOBODY, 0o600));
    assert_eq!(owner_mode(&homes), (0, 0, 0o755));
}

/// A user plants `tmp/<the name the delivery will use>` as a symlink (and another as a hard link) to
/// root-owned files: root must not write through them; the messages land in new/ as fresh files of the
/// owner. The names are computed as the server does, from the queue id, the arrival time and the stored
/// message; a first attempt is made to defer (new/ is a plain file) so the links can be planted in time.
#[test]
fn planted_links_in_tmp_are_not_written_through() {
    use shardmta::local::maildir::{content, file_name};
    let dir = tempfile::tempdir().unwrap();
    let homes = dir.path().join("homes");
    std::fs::create_dir(&homes).unwrap();
    set_mode(&homes, 0o755);
    let md = homes.join("mallory/Maildir");
    std::fs::create_dir_all(md.join("tmp")).unwrap();
    std::fs::create_dir_all(md.join("cur")).unwrap();
    std::fs::write(md.join("new"), b"").unwrap();
    for p in [
        homes.join("mallory"),
        md.clone(),
        md.join("tmp"),
        md.join("cur"),
        md.join("new"),
    ] {
        lchown(&p, NOBODY);
        set_mode(&p, 0o700);
    }
    let shadow = dir.path().join("shadow");
    let gshadow = dir.path().join("gshadow");
    for f in [&shadow, &gshadow] {
        std::fs::write(f, b"root:secret\n").unwrap();
        set_mode(f, 0o600);
    }
    let s = Server::start_in(dir, &nobody_config(&homes, "\"mallory\""));
    let rcpts = ["mallory@localhost", "mallory+x@localhost"];
    let id = send(&s, "a@client.test", &rcpts, "planted", "");
    delivery_log_with(&s, |l| {
        l["queue_id"] == id.as_str()
            && l["result"] == "deferred"
            && l["reply"].as_str().unwrap_or("").starts_with("451 4.3.0")
    });
    // The names the retry will use.
    let arrival_ms = s
        .queue()
        .iter()
        .find(|m| m["id"] == id.as_str())
        .and_then(|m| m["arrival_unix_ms"].as_u64())
        .expect("queued with its arrival time");
    let stored = s.queue_cat(&id);
    let names: Vec<String> = rcpts
        .iter()
        .enumerate()
        .map(|(i, rcpt)| {
            let c = content("a@client.test", rcpt, &stored, b"");
            file_name(
                arrival_ms / 1000,
                id.parse().unwrap(),
                i as u32,
                "mx.test",
                c.len(),
            )
        })
        .collect();
    let sym = md.join("tmp").join(&names[0]);
    std::os::unix::fs::symlink(&shadow, &sym).unwrap();
    lchown(&sym, NOBODY);
    // (With fs.protected_hardlinks off a user can link a root file; here root plants it for them.)
    std::fs::hard_link(&gshadow, md.join("tmp").join(&names[1])).unwrap();
    // Now let the retry through.
    std::fs::remove_file(md.join("new")).unwrap();
    // (A retry in between may have created it already.)
    match std::fs::create_dir(md.join("new")) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        r => r.unwrap(),
    }
    lchown(&md.join("new"), NOBODY);
    set_mode(&md.join("new"), 0o700);
    wait_new(&md, 2);
    wait_gone(&s, &id);
    for f in [&shadow, &gshadow] {
        assert_eq!(
            std::fs::read_to_string(f).unwrap(),
            "root:secret\n",
            "{f:?}"
        );
        assert_eq!(owner_mode(f), (0, 0, 0o600), "{f:?}");
    }
    {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&gshadow).unwrap().nlink(), 1);
    }
    let mut in_new: Vec<String> = std::fs::read_dir(md.join("new"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    in_new.sort();
    let mut expected = names.clone();
    expected.sort();
    assert_eq!(in_new, expected, "delivered under the planted names");
    for (name, rcpt) in names.iter().zip(rcpts) {
        let p = md.join("new").join(name);
        assert!(std::fs::symlink_metadata(&p).unwrap().is_file(), "{p:?}");
        assert_eq!(owner_mode(&p), (NOBODY, NOBODY, 0o600), "{p:?}");
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            text.starts_with(&format!(
                "Return-Path: <a@client.test>\nDelivered-To: {rcpt}\n"
            )) && text.contains("Subject: planted"),
            "{text}"
        );
    }
    assert_eq!(
        std::fs::read_dir(md.join("tmp")).unwrap().count(),
        0,
        "tmp/ is empty"
    );
}
