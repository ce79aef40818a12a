//! A full disk: the server answers 452 4.3.1, keeps running, and every message it acknowledged stays queued;
//! when delivery outcomes cannot be recorded, delivery pauses and no recipient is delivered twice.
//! The spool is a small tmpfs mounted by the test (needs root, as CI and the development machines run).

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::Duration;

use common::*;
use shardmta::dns::testserver::TestDns;

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
        .args(["-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs"])
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

fn stats(s: &Server) -> serde_json::Value {
    std::fs::read(s.spool().join("stats.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// Messages wait deferred (their destination is down) when the disk fills up, so their delivery outcomes can
/// no longer be recorded. Then the destination comes back. Before: every cycle sent the deferred messages
/// again, since their "delivered" record could not be written (10,754 messages became 31,776 deliveries), and
/// messages whose record failed were never retried until a restart. Now delivery pauses while outcomes cannot be
/// recorded and resumes once the disk has room: every message is delivered exactly once.
#[test]
fn full_disk_pauses_delivery_and_nothing_is_delivered_twice() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs"])
        .arg(&spool)
        .status()
        .unwrap();
    assert!(st.success(), "mounting a tmpfs for the spool failed");
    let _mount = Mount(spool.clone());
    // Space another program holds on the same file system, freed later.
    let filler = spool.join("filler");
    std::fs::write(&filler, vec![1u8; 1 << 20]).unwrap();
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4("127.0.0.53".parse::<Ipv4Addr>().unwrap()));
    dns.add_mx("full.test", 10, "mx.full.test");
    dns.add_a("mx.full.test", "127.0.0.24".parse().unwrap());
    let cfg = relay_config(
        port,
        &dns,
        "",
        "message_size_limit = 100000\nqueue_segment_size = 1179648\nshards = 1\n",
    );
    let mut s = Server::start_in(dir, &cfg);
    // Nothing listens at the destination yet: every attempt is deferred.
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO c");
    let mut acked: HashMap<String, String> = HashMap::new();
    let mut n = 0;
    // Big messages until the disk is full, then small ones to fill what is left of the last segment.
    for size in [90usize, 10, 1] {
        loop {
            n += 1;
            let token = format!("tok-{n}");
            let body = format!(
                "Subject: {token}\r\nX-Token: {token}\r\n\r\n{}",
                format!("{}\r\n", "z".repeat(998)).repeat(size)
            );
            let r = c.send_mail("a@client.test", &[&format!("r{n}@full.test")], &body);
            if r.starts_with("250 ") {
                acked.insert(token, queued_id(&r));
            } else {
                assert!(r.starts_with("452 4.3.1"), "{r}");
                break;
            }
        }
    }
    c.cmd("QUIT");
    assert!(acked.len() >= 10, "{} acknowledged", acked.len());
    // Deferrals fill the rest; then outcomes cannot be recorded and delivery pauses.
    wait_for_within(
        Duration::from_secs(60),
        || stats(&s)["delivery_pauses"].as_u64() >= Some(1),
        "delivery to pause",
    );
    // The destination comes back while the disk is still full: nothing may be sent twice meanwhile.
    let sink = Sink::start("127.0.0.24", port, &[]);
    // 4 s of the server's own uptime (its dispatcher retries the kept outcomes every tick meanwhile).
    wait_server_window(&s, Duration::from_secs(4));
    assert_eq!(
        stats(&s)["delivery_paused_shards"],
        1,
        "resumed on a full disk"
    );
    // Room again: the kept outcomes are recorded, delivery resumes, everything is delivered.
    std::fs::remove_file(&filler).unwrap();
    wait_for_within(
        Duration::from_secs(90),
        || s.queue().is_empty(),
        "the queue to drain",
    );
    wait_for(
        || stats(&s)["delivery_paused_shards"] == 0,
        "the pause to end in stats.json",
    );
    let st = stats(&s);
    assert!(st["delivery_pauses"].as_u64() >= Some(1), "{st}");
    sink.wait_messages(acked.len() as u64);
    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in sink.messages() {
        let token = m
            .lines()
            .find_map(|l| l.strip_prefix("X-Token: "))
            .expect("token")
            .to_string();
        *seen.entry(token).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, &k)| k > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    for token in acked.keys() {
        assert_eq!(seen.get(token), Some(&1), "{token} not delivered");
    }
    s.kill9();
}
