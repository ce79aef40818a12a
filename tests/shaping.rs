//! Shaping end to end on loopback: `shaping show` names the built-in Yahoo site matched by the MX hosts the test
//! DNS gives and the rule that set each value; a `421 4.7.0 [TSS04]` reply from the sink suspends the site (the
//! next message is deferred with the action's reply, `shaping status` and the metrics show it), the action
//! survives a restart, delivery resumes once it expires; `shaping cancel` ends a second one at once; a
//! `451 4.7.650` reply lowers the site's message rate (the sink sees the messages spaced out).

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use common::*;
use shardmta::dns::testserver::TestDns;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn send(s: &Server, to: &str, subject: &str) -> String {
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO client.test");
    let id = queued_id(&c.send_mail(
        "sender@client.test",
        &[to],
        &format!("Subject: {subject}\r\nMessage-ID: <{subject}@client.test>\r\n\r\nbody of {subject}\r\n"),
    ));
    c.cmd("QUIT");
    id
}

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `shaping status --json`.
fn status(s: &Server) -> Vec<serde_json::Value> {
    let out = ok(s.cli(&["shaping", "status", "--json"]));
    serde_json::from_str(&out).unwrap()
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn metrics(http: u16) -> String {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .arg(format!("http://127.0.0.1:{http}/metrics"))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A delivery log line for `rcpt` whose reply contains `text`.
fn log_line(s: &Server, rcpt: &str, text: &str) -> serde_json::Value {
    let want = |l: &serde_json::Value| {
        l["rcpt"] == rcpt && l["reply"].as_str().is_some_and(|r| r.contains(text))
    };
    delivery_log_with(s, want)
        .into_iter()
        .find(|l| want(l))
        .expect("line")
}

#[test]
fn a_tss04_reply_suspends_the_site_across_a_restart_until_it_expires_or_is_cancelled() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    // Yahoo's MX naming: the built-in site "yahoo" matches *.yahoodns.net.
    dns.add_mx("yahoo.test", 10, "mta5.am0.yahoodns.net");
    dns.add_a("mta5.am0.yahoodns.net", ip("127.0.0.71"));
    dns.add_mx("client.test", 10, "mx.client.test");
    dns.add_a("mx.client.test", ip("127.0.0.72"));
    let tss = "421 4.7.0 [TSS04] Messages from 127.0.0.1 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes";
    let sink = Sink::start(
        "127.0.0.71",
        port,
        &[
            "--rcpt-reply",
            &format!("tss={tss}"),
            "--rcpt-reply",
            &format!("tss2={tss}"),
        ],
    );
    let _bounces = Sink::start("127.0.0.72", port, &[]);
    let dir = tempfile::tempdir().unwrap();
    // The built-in rule of the same name, with a test-sized duration.
    let shaping = write_file(
        dir.path(),
        "shaping.toml",
        "[[automation]]\nname = \"yahoo-tss04\"\nsites = [\"yahoo\"]\ntext = '\\[TS?S04\\]'\naction = \"suspend\"\nduration = \"8s\"\n\n[domain.\"yahoo.test\"]\nmax_recipients_per_transaction = 7\n[domain.\"yahoo.test\".sources.ip1]\nmax_connections = 2\n",
    );
    let http = free_port();
    let mut s = Server::start(&format!(
        "shaping_file = \"{}\"\n{}\n[http]\nlisten = \"127.0.0.1:{http}\"\ntrusted_networks = [\"127.0.0.1/32\"]\n",
        path_str(&shaping),
        relay_config(port, &dns, "", "")
    ));

    // What applies, and why.
    let show = ok(s.cli(&["shaping", "show", "yahoo.test"]));
    assert!(
        show.contains("site yahoo: every MX host matches *.yahoodns.net of site yahoo"),
        "{show}"
    );
    assert!(
        show.contains("max_messages_per_connection = 20  (set by site yahoo (built-in))"),
        "{show}"
    );
    assert!(
        show.contains(&format!(
            "max_recipients_per_transaction = 7  (set by domain yahoo.test ({}))",
            shaping.display()
        )),
        "{show}"
    );
    assert!(
        show.contains("automation yahoo-tss04: on text /\\[TS?S04\\]/"),
        "{show}"
    );
    let with_source = ok(s.cli(&["shaping", "show", "yahoo.test", "--source", "ip1"]));
    assert!(
        with_source.contains(&format!(
            "max_connections = 2  (set by domain yahoo.test source ip1 ({}))",
            shaping.display()
        )),
        "{with_source}"
    );
    assert!(
        show.contains(
            "max_connections: not set  (the server's destination_concurrency_limit applies)"
        ),
        "{show}"
    );
    assert!(status(&s).is_empty());

    // The throttle reply: the site is suspended.
    let bad = send(&s, "tss@yahoo.test", "tss");
    log_line(&s, "tss@yahoo.test", "[TSS04]");
    wait_for(|| !status(&s).is_empty(), "an active shaping action");
    let st = status(&s);
    assert_eq!(st.len(), 1, "{st:?}");
    let action = st[0].clone();
    assert_eq!(action["site"], "yahoo");
    assert_eq!(action["rule"], "yahoo-tss04");
    assert_eq!(action["action"], "suspend");
    let until = action["until_unix_ms"].as_u64().unwrap();
    // The message that drew it would draw it again on its retries: gone.
    ok(s.cli(&["queue", "delete", &bad]));
    let text = ok(s.cli(&["shaping", "status"]));
    assert!(
        text.contains(action["id"].as_str().unwrap())
            && text.contains("\tyahoo\t-\tsuspend\tsuspended\t"),
        "{text}"
    );
    let m = metrics(http);
    assert!(
        m.contains("shardmta_shaping_actions_total{action=\"suspend\"} 1"),
        "{m}"
    );
    assert!(m.contains("shardmta_shaping_actions_active 1"), "{m}");

    // The next message to the site is deferred with the action's reply, and nothing reaches the sink.
    send(&s, "ok@yahoo.test", "held");
    let held = log_line(&s, "ok@yahoo.test", "shaping: site yahoo suspended until");
    assert!(
        held["reply"]
            .as_str()
            .unwrap()
            .contains("by rule yahoo-tss04"),
        "{held}"
    );
    assert!(
        held["reply"].as_str().unwrap().starts_with("4.4.5 "),
        "{held}"
    );
    assert_eq!(held["result"], "deferred");
    assert_eq!(held["class"], "rate_limit");
    assert_eq!(sink.count("messages"), 0);

    // A restart keeps the action (the file is written at the shard's next tick).
    wait_for(
        || {
            std::fs::read_dir(s.spool()).unwrap().flatten().any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("shaping-actions.")
                    && std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains("yahoo-tss04"))
            })
        },
        "the actions file",
    );
    s.terminate();
    // Stopped: status reads the spool's files.
    assert_eq!(status(&s)[0]["id"], action["id"]);
    s.spawn();
    let st = status(&s);
    assert_eq!(st.len(), 1, "{st:?}");
    assert_eq!(
        st[0]["id"], action["id"],
        "the same action after the restart"
    );
    assert_eq!(sink.count("messages"), 0);

    // Once it expires, the held message goes through.
    sink.wait_messages(1);
    assert!(unix_ms() >= until, "delivered before the action's end");
    wait_for(|| status(&s).is_empty(), "the action to expire");
    let m = metrics(http);
    assert!(
        m.contains("shardmta_shaping_actions_total{action=\"expire\"} 1"),
        "{m}"
    );
    assert!(m.contains("shardmta_shaping_actions_active 0"), "{m}");

    // A second action, cancelled by the administrator: delivery resumes long before it would have ended.
    let bad2 = send(&s, "tss2@yahoo.test", "tss2");
    wait_for(|| !status(&s).is_empty(), "a second action");
    let second = status(&s)[0].clone();
    let until2 = second["until_unix_ms"].as_u64().unwrap();
    ok(s.cli(&["queue", "delete", &bad2]));
    send(&s, "ok2@yahoo.test", "held2");
    log_line(&s, "ok2@yahoo.test", "shaping: site yahoo suspended until");
    let id2 = second["id"].as_str().unwrap().to_string();
    let out = ok(s.cli(&["shaping", "cancel", &id2]));
    assert!(out.contains("cancelled"), "{out}");
    assert!(status(&s).is_empty());
    let again = s.cli(&["shaping", "cancel", &id2]);
    assert!(!again.status.success(), "a second cancel finds nothing");
    let started = Instant::now();
    sink.wait_messages(2);
    assert!(
        unix_ms() < until2,
        "delivered only after the cancelled action's end"
    );
    assert!(started.elapsed() < Duration::from_secs(8));
    let m = metrics(http);
    assert!(
        m.contains("shardmta_shaping_actions_total{action=\"cancel\"} 1"),
        "{m}"
    );
}

/// A shaping file with a bad entry is refused, naming the file and the entry.
#[test]
fn a_bad_shaping_file_is_refused_naming_the_file_and_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write_file(
        dir.path(),
        "shaping.toml",
        "[domain.\"a.test\"]\nmax_connections = 0\n",
    );
    let cfg = write_file(
        dir.path(),
        "cfg.toml",
        &format!("shaping_file = \"{}\"\n", path_str(&bad)),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardmta"))
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "{}: domain \"a.test\": max_connections",
            bad.display()
        )),
        "{err}"
    );
    // `serve` refuses to start with it, naming the file and the entry.
    let spool = dir.path().join("spool");
    let serve_cfg = write_file(
        dir.path(),
        "serve.toml",
        &format!(
            "shaping_file = \"{}\"\nqueue_directory = \"{}\"\nmyhostname = \"mx.test\"\nshards = 1\n[[listener]]\naddress = \"127.0.0.1:{}\"\nkind = \"smtp\"\n[delivery]\nenabled = false\n[local]\nsystem_users = false\n",
            path_str(&bad),
            path_str(&spool),
            free_port()
        ),
    );
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_shardmta"))
        .args(["serve", "--config"])
        .arg(&serve_cfg)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve started with a bad shaping file");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "{}: domain \"a.test\": max_connections",
            bad.display()
        )),
        "{err}"
    );
}

/// Microsoft's `451 4.7.650` lowers the site's rate (a test-sized rule of the built-in name): the messages that
/// follow reach the sink spaced by the lowered rate, not at once; `shaping status` says "lowered".
#[test]
fn a_4_7_650_reply_lowers_the_sites_message_rate() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("ms.test", 10, "ms-test.mail.protection.outlook.com");
    dns.add_a("ms-test.mail.protection.outlook.com", ip("127.0.0.73"));
    dns.add_mx("client.test", 10, "mx.client.test");
    dns.add_a("mx.client.test", ip("127.0.0.74"));
    let sink = Sink::start(
        "127.0.0.73",
        port,
        &[
            "--rcpt-reply",
            "rl=451 4.7.650 The mail server [127.0.0.1] has been temporarily rate limited due to IP reputation.",
        ],
    );
    let _bounces = Sink::start("127.0.0.74", port, &[]);
    let dir = tempfile::tempdir().unwrap();
    let shaping = write_file(
        dir.path(),
        "shaping.toml",
        "[[automation]]\nname = \"microsoft-4.7.650\"\nsites = [\"office365\"]\nstatus = \"4.7.650\"\naction = \"lower\"\nmax_message_rate = \"30/m\"\nmax_connections = 1\nduration = \"1m\"\nrestore_steps = 0\n",
    );
    let s = Server::start(&format!(
        "shaping_file = \"{}\"\n{}",
        path_str(&shaping),
        relay_config(port, &dns, "", "")
    ));
    let bad = send(&s, "rl@ms.test", "rl");
    wait_for(|| !status(&s).is_empty(), "an active shaping action");
    ok(s.cli(&["queue", "delete", &bad]));
    let text = ok(s.cli(&["shaping", "status"]));
    assert!(
        text.contains(
            "\toffice365\t-\tlower (max_connections 1, max_message_rate 30/m)\tlowered\t"
        ),
        "{text}"
    );
    for n in 0..3 {
        send(&s, &format!("m{n}@ms.test"), &format!("m{n}"));
    }
    sink.wait_messages(3);
    let msgs = sink.stats_path().parent().unwrap().join("msgs");
    let mut times: Vec<std::time::SystemTime> = std::fs::read_dir(&msgs)
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().modified().unwrap())
        .collect();
    times.sort();
    assert_eq!(times.len(), 3);
    // One message every 2 s at 30/m (the first at once): at least ~4 s from the first to the third.
    let span = times[2].duration_since(times[0]).unwrap();
    assert!(span >= Duration::from_millis(3_500), "{span:?}");
}
