//! Start failures, tried as a new user would meet them: each stops `serve` within seconds, with a non-zero exit
//! and one line naming the cause and the fix (before the shard runtime, `shards = 64` on a small host spun a
//! core at 100% and ignored SIGTERM).

mod common;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, Server, BIN};

/// Runs `serve` with `toml` (plus a spool in a fresh directory) and returns (exit code, stderr, elapsed);
/// panics if it is still running after 15 s.
fn serve_fails(dir: &std::path::Path, toml: &str) -> (i32, String, Duration) {
    let config = dir.join("shardmta.toml");
    let spool = dir.join("spool");
    let mut text = format!(
        "queue_directory = \"{}\"\n[delivery]\nenabled = false\n",
        spool.display()
    );
    if !toml.contains("[[listener]]") {
        text = format!(
            "{toml}\n{text}[[listener]]\naddress = \"127.0.0.1:{}\"\nkind = \"smtp\"\n",
            free_port()
        );
    } else {
        text = format!("{text}{toml}\n");
    }
    std::fs::write(&config, text).unwrap();
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (st.code().unwrap_or(-1), err, started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve still running after 15 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last line of stderr (the one that says why), asserted to hold every one of `words`.
fn last_line_says(err: &str, words: &[&str]) {
    let last = err.lines().last().unwrap_or("");
    for w in words {
        assert!(
            last.contains(w),
            "{w:?} not in the last line {last:?}; stderr:\n{err}"
        );
    }
}

#[test]
fn address_in_use_stops_the_start_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let (code, err, took) = serve_fails(
        dir.path(),
        &format!("[[listener]]\naddress = \"{addr}\"\nkind = \"smtp\""),
    );
    assert_ne!(code, 0);
    last_line_says(
        &err,
        &[
            &addr.to_string(),
            "Address already in use",
            "already listens there",
        ],
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn address_not_on_this_host_stops_the_start_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    // TEST-NET-1: never assigned to a host; binding fails locally, nothing is sent anywhere.
    let (code, err, took) = serve_fails(
        dir.path(),
        "[[listener]]\naddress = \"192.0.2.7:2525\"\nkind = \"smtp\"",
    );
    assert_ne!(code, 0);
    last_line_says(&err, &["192.0.2.7:2525", "not on this host"]);
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn more_shards_than_cpus_stops_the_start_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cpus = std::thread::available_parallelism().unwrap().get();
    for shards in [cpus + 1, 64.max(cpus + 1)] {
        let (code, err, took) = serve_fails(dir.path(), &format!("shards = {shards}"));
        assert_ne!(code, 0);
        last_line_says(
            &err,
            &[
                &format!("shards = {shards}"),
                &format!("at most {cpus}"),
                "shards = 0",
            ],
        );
        assert!(took < Duration::from_secs(5), "{took:?}");
    }
}

#[test]
fn a_spool_in_use_by_another_instance_stops_the_start_with_one_line() {
    let first = Server::start("");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("second.toml");
    std::fs::write(
        &config,
        format!(
            "queue_directory = \"{}\"\nshards = 2\n[delivery]\nenabled = false\n[[listener]]\naddress = \"127.0.0.1:{}\"\nkind = \"smtp\"\n",
            first.spool().display(),
            free_port()
        ),
    )
    .unwrap();
    let started = Instant::now();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    last_line_says(
        &err,
        &[
            "is locked by another process",
            "give this one its own queue_directory",
        ],
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // The first instance is untouched and still answers.
    let mut c = common::Client::greeted(first.smtp);
    assert!(c.cmd("EHLO x").starts_with("250"));
}
