//! A full disk: the server answers 452 4.3.1, keeps running, and every message it acknowledged stays queued.
//! The spool is a 3 MiB tmpfs mounted by the test (needs root, as CI and the development machines run).

mod common;

use std::process::Command;

use common::*;

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn full_disk_gives_452_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(&spool)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "mounting a tmpfs for the spool failed (the test suite runs as root)"
    );
    let _mount = Mount(spool.clone());
    // Segments of 1.125 MiB: two fit, the third cannot be created.
    let mut s = Server::start_in(
        dir,
        "message_size_limit = 100000\nqueue_segment_size = 1179648\nshards = 1\n",
    );
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO c");
    let body = format!(
        "Subject: fill\r\n\r\n{}",
        format!("{}\r\n", "z".repeat(998)).repeat(90)
    );
    let mut acked = Vec::new();
    let mut refused = None;
    for _ in 0..60 {
        let r = c.send_mail("a@client.test", &["b@localhost"], &body);
        if r.starts_with("250 ") {
            acked.push(queued_id(&r));
        } else {
            refused = Some(r);
            break;
        }
    }
    let refused = refused.expect("the disk never filled up");
    assert_eq!(refused, "452 4.3.1 Error: insufficient system storage\r\n");
    assert!(
        acked.len() >= 10,
        "{} acknowledged before the disk was full",
        acked.len()
    );
    assert!(c.cmd("NOOP").starts_with("250"), "the session goes on");
    // Everything acknowledged is there, after a restart too.
    s.kill9();
    s.spawn();
    let listed: Vec<String> = s
        .queue()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    for id in &acked {
        assert!(listed.contains(id), "acknowledged {id} missing");
    }
    s.kill9();
}
