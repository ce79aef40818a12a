//! `mail_owner`: the server binds its listeners (a privileged port included) and reads its keys as root, then
//! runs as the unprivileged account with no capabilities; every spool file is 0600 and every spool directory
//! 0700, local mail included. (Before: uid 0 with every capability, segments and the delivery log 0644.)

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::*;

fn status_field(pid: u32, name: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        .unwrap()
}

/// Every file and directory under `dir`: (path, is_dir, mode, uid).
fn tree(dir: &Path, out: &mut Vec<(String, bool, u32, u32)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let md = std::fs::symlink_metadata(e.path()).unwrap();
        out.push((
            e.path().display().to_string(),
            md.is_dir(),
            md.permissions().mode() & 0o7777,
            md.uid(),
        ));
        if md.is_dir() {
            tree(&e.path(), out);
        }
    }
}

#[test]
fn runs_as_mail_owner_without_capabilities_and_keeps_its_files_private() {
    let dir = tempfile::tempdir().unwrap();
    // The unprivileged account must be able to reach its spool below the test's directory.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let nobody = shardmta::privileges::MailOwner::lookup("nobody").unwrap();
    // A port below 1024, which only root may bind.
    let low = (1000u16..1024)
        .find(|p| std::net::TcpListener::bind(("127.0.0.77", *p)).is_ok())
        .expect("a free privileged port on 127.0.0.77");
    let s = Server::start_in(
        dir,
        &format!(
            "mail_owner = \"nobody\"\n[[listener]]\naddress = \"127.0.0.77:{low}\"\nkind = \"smtp\"\n[delivery]\nenabled = true\n"
        ),
    );
    let pid = s.child.as_ref().unwrap().id();
    let ids = format!("{0}\t{0}\t{0}\t{0}", nobody.uid);
    assert_eq!(status_field(pid, "Uid:"), ids);
    assert_eq!(status_field(pid, "CapEff:"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm:"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
    // Mail comes in on the privileged port and is delivered locally, as mail_owner.
    let addr: std::net::SocketAddr = format!("127.0.0.77:{low}").parse().unwrap();
    let mut c = Client::greeted(addr);
    c.cmd("EHLO c");
    let id = queued_id(&c.send_mail(
        "a@client.test",
        &["someone@localhost"],
        "Subject: private\r\n\r\nhi\r\n",
    ));
    wait_gone(&s, &id);
    let maildir = s.spool().join("mail/localhost/someone/Maildir/new");
    wait_for(
        || std::fs::read_dir(&maildir).is_ok_and(|mut d| d.next().is_some()),
        "the local delivery",
    );
    let mut files = Vec::new();
    tree(&s.spool(), &mut files);
    let spool_md = std::fs::metadata(s.spool()).unwrap();
    assert_eq!(spool_md.uid(), nobody.uid);
    assert_eq!(spool_md.permissions().mode() & 0o777, 0o700);
    let mut seen_segment = false;
    for (path, is_dir, mode, uid) in &files {
        assert_eq!(*uid, nobody.uid, "{path} owned by {uid}");
        if *is_dir {
            // The parents local delivery makes for Maildirs may be traversable; nothing is writable by others.
            assert_eq!(mode & 0o022, 0, "{path} mode {mode:o}");
            if !path.contains("/mail") {
                assert_eq!(*mode, 0o700, "{path} mode {mode:o}");
            }
        } else {
            assert_eq!(*mode, 0o600, "{path} mode {mode:o}");
            seen_segment |= path.ends_with(".seg");
        }
    }
    assert!(seen_segment);
    assert!(files.iter().any(|f| f.0.ends_with("delivery.log")));
    assert!(files.iter().any(|f| f.0.ends_with("selfsigned-key.pem")));
}

/// A spool that belongs to another user is refused at start with what to do, and the process exits non-zero.
#[test]
fn mail_owner_refuses_a_spool_it_does_not_own() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let cfg = dir.path().join("c.toml");
    let port = free_port();
    std::fs::write(
        &cfg,
        format!(
            "mail_owner = \"nobody\"\nqueue_directory = \"{}\"\nmyhostname = \"mx.test\"\n[[listener]]\naddress = \"127.0.0.1:{port}\"\nkind = \"smtp\"\n",
            spool.display()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chown -R nobody:"), "{err}");
}

/// Files the server rewrites in the spool are never written through a link planted under their temporary name
/// (the old code wrote stats.json through `stats.json.tmp` with a plain create, following a symlink there).
#[test]
fn links_planted_in_the_spool_are_not_written_through() {
    let mut s = Server::start("shards = 1\n");
    s.kill9();
    let victim = s.dir.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    for name in ["stats.json.tmp", "delivery.log"] {
        let _ = std::fs::remove_file(s.spool().join(name));
        std::os::unix::fs::symlink(&victim, s.spool().join(name)).unwrap();
    }
    s.spawn();
    // stats.json is rewritten every 200 ms; several rewrites (counted) later the victim is untouched.
    wait_stats_rewrites(&s, 3);
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    let md = std::fs::symlink_metadata(s.spool().join("stats.json")).unwrap();
    assert!(md.file_type().is_file(), "stats.json is a real file");
}
