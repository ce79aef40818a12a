//! The command line: check-config, passwd, queue list with the server stopped.

mod common;

use std::process::Command;

use common::BIN;

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_prints_effective_defaults() {
    let (ok, out, _) = run(&["check-config"]);
    assert!(ok);
    for line in [
        "message_size_limit = 10240000",
        "smtpd_recipient_limit = 1000",
        "smtpd_timeout = \"5m\"",
        "maximal_queue_lifetime = \"5d\"",
        "address = \"127.0.0.1:2525\"",
        "kind = \"submission\"",
    ] {
        assert!(out.contains(line), "{line} missing in:\n{out}");
    }
}

#[test]
fn check_config_names_bad_keys_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.toml");
    for (text, must) in [
        ("mynetwork = [\"10.0.0.0/8\"]\n", "mynetwork"),
        ("smtpd_timeout = \"ten\"\n", "ten"),
        ("mynetworks = [\"300.0.0.0/8\"]\n", "300.0.0.0/8"),
        ("relay_domains = [\"bad_domain!\"]\n", "bad_domain!"),
        ("message_size_limit = \"big\"\n", "message_size_limit"),
        ("recipient_delimiter = \"a\"\n", "recipient_delimiter"),
        (
            "[local]\nmailbox_path = \"/var/mail/shared\"\n",
            "local.mailbox_path",
        ),
        ("[local]\nsync_method = \"sometimes\"\n", "sometimes"),
        (
            "alias_maps = [\"/nonexistent/aliases\"]\n",
            "/nonexistent/aliases",
        ),
    ] {
        std::fs::write(&f, text).unwrap();
        let (ok, _, err) = run(&["check-config", "--config", f.to_str().unwrap()]);
        assert!(!ok, "{text} accepted");
        assert!(
            err.contains(must),
            "error for {text:?} does not name {must:?}: {err}"
        );
    }
    let (ok, _, err) = run(&["check-config", "--config", "/nonexistent/x.toml"]);
    assert!(!ok && err.contains("/nonexistent/x.toml"), "{err}");
    // A broken alias file is named with its line; unsupported targets are warnings.
    let aliases = dir.path().join("aliases");
    std::fs::write(&aliases, "ok: alice\nbroken line\n").unwrap();
    std::fs::write(&f, format!("alias_maps = [\"{}\"]\n", aliases.display())).unwrap();
    let (ok, _, err) = run(&["check-config", "--config", f.to_str().unwrap()]);
    assert!(
        !ok && err.contains(&format!("{}:2", aliases.display())),
        "{err}"
    );
    std::fs::write(&aliases, "ok: alice, |/usr/bin/procmail\n").unwrap();
    let (ok, _, err) = run(&["check-config", "--config", f.to_str().unwrap()]);
    assert!(ok && err.contains("not supported"), "{err}");
}

#[test]
fn queue_list_on_empty_or_missing_spool() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.toml");
    std::fs::write(
        &f,
        format!(
            "queue_directory = \"{}\"\n",
            dir.path().join("spool").display()
        ),
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("spool")).unwrap();
    let (ok, out, err) = run(&["queue", "list", "--config", f.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("0 message(s)"), "{out}");
}

#[test]
fn too_little_locked_memory_is_a_clear_start_error() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.toml");
    let port = common::free_port();
    std::fs::write(
        &f,
        format!("queue_directory = \"{}\"\n[[listener]]\naddress = \"127.0.0.1:{port}\"\nkind = \"smtp\"\n", dir.path().join("spool").display()),
    )
    .unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -l 0 && exec {BIN} serve --config {}",
            f.display()
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("RLIMIT_MEMLOCK") && err.contains("ulimit -l"),
        "{err}"
    );
}

/// A shard that dies (here a panic injected into shard 0 of a debug build) stops the whole process with a
/// non-zero exit, instead of leaving it running with a dead shard (or exiting 0 after a panicked shutdown).
#[test]
fn a_panicking_shard_stops_the_process_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    let port = common::free_port();
    std::fs::write(
        &cfg,
        format!(
            "queue_directory = \"{}\"\nmyhostname = \"mx.test\"\nshards = 2\n[[listener]]\naddress = \"127.0.0.1:{port}\"\nkind = \"smtp\"\n",
            dir.path().join("spool").display()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(common::BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("SHARDMTA_TEST_PANIC_SHARD_AFTER_TICKS", "5")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(std::time::Instant::now() < deadline, "still running");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{status}: {err}");
    assert!(err.contains("a shard"), "{err}");
}
