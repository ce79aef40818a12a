//! The suppression list end to end on loopback: entries added through the CLI (running and stopped server)
//! and the HTTP API (curl), suppressed recipients bounced before routing without any connection to their
//! destination while the message's other recipients are delivered, removal, the automatic add on a remote
//! `550 5.1.1`, and the list surviving a restart.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use common::*;
use shardmta::dns::testserver::TestDns;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn send(s: &Server, from: &str, to: &[&str], subject: &str) -> String {
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO client.test");
    let id = queued_id(&c.send_mail(
        from,
        to,
        &format!("Subject: {subject}\r\nMessage-ID: <{subject}@client.test>\r\n\r\nbody of {subject}\r\n"),
    ));
    c.cmd("QUIT");
    id
}

/// (status, body) of one curl exchange.
fn curl(method: &str, url: &str, body: Option<&str>) -> (u16, String) {
    curl_from(&[], method, url, body)
}

/// `curl` with `args` before the URL (e.g. `--interface 127.0.0.2`).
fn curl_from(args: &[&str], method: &str, url: &str, body: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "-X", method])
        .args(args);
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    cmd.arg("-w").arg("\n%{http_code}").arg(url);
    let out = cmd.output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
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

fn suppressed_line(s: &Server, id: &str, rcpt: &str) -> serde_json::Value {
    let lines = delivery_log_with(s, |l| {
        l["queue_id"] == id && l["rcpt"] == rcpt && l["class"] == "suppressed"
    });
    lines
        .into_iter()
        .find(|l| l["queue_id"] == id && l["rcpt"] == rcpt)
        .expect("line")
}

/// An address added with the CLI and a domain added with curl are bounced (5.7.1, "recipient suppressed:
/// REASON" in the sender's DSN, class `suppressed` in the delivery log) without any connection to their
/// destinations, while the same message's other recipient is delivered; the metrics count them; after their
/// removal (curl DELETE, CLI remove) mail goes through.
#[test]
fn suppressed_recipients_bounce_before_routing_and_removal_lets_mail_through() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("dest.test", 10, "mx.dest.test");
    dns.add_a("mx.dest.test", ip("127.0.0.61"));
    dns.add_mx("blocked.test", 10, "mx.blocked.test");
    dns.add_a("mx.blocked.test", ip("127.0.0.62"));
    dns.add_mx("client.test", 10, "mx.client.test");
    dns.add_a("mx.client.test", ip("127.0.0.63"));
    let dest = Sink::start("127.0.0.61", port, &[]);
    let blocked = Sink::start("127.0.0.62", port, &[]);
    let bounces = Sink::start("127.0.0.63", port, &[]);
    let http = free_port();
    let api = format!("http://127.0.0.1:{http}");
    let s = Server::start(&format!(
        "{}\n[http]\nlisten = \"127.0.0.1:{http}\"\ntrusted_networks = [\"127.0.0.1/32\"]\n",
        relay_config(port, &dns, "", "")
    ));
    ok(s.cli(&[
        "suppression",
        "add",
        "Bob@Dest.test",
        "--reason",
        "asked to stop",
    ]));
    let (code, body) = curl(
        "POST",
        &format!("{api}/api/v1/suppression"),
        Some(r#"{"domain": "blocked.test", "reason": "complaints"}"#),
    );
    assert_eq!(code, 201, "{body}");
    let (code, body) = curl(
        "POST",
        &format!("{api}/api/v1/suppression"),
        Some(r#"{"address": "not an address"}"#),
    );
    assert_eq!(code, 400, "{body}");
    let (code, body) = curl("GET", &format!("{api}/api/v1/suppression"), None);
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["count"], 2, "{body}");
    assert_eq!(v["entries"][0]["entry"], "@blocked.test", "{body}");
    assert_eq!(v["entries"][1]["entry"], "bob@dest.test", "{body}");
    assert_eq!(v["entries"][1]["reason"], "asked to stop", "{body}");
    // The API's authorization holds: a client outside trusted_networks without a token may not add.
    let (code, _) = curl_from(
        &["--interface", "127.0.0.2"],
        "POST",
        &format!("{api}/api/v1/suppression"),
        Some(r#"{"address": "ok@dest.test"}"#),
    );
    assert_eq!(code, 401);
    let (code, body) = curl(
        "GET",
        &format!("{api}/api/v1/suppression/anyone@BLOCKED.test"),
        None,
    );
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["suppressed"], true, "{body}");
    assert_eq!(v["entry"], "@blocked.test", "{body}");
    let (_, body) = curl(
        "GET",
        &format!("{api}/api/v1/suppression/ok@dest.test"),
        None,
    );
    assert!(body.contains("\"suppressed\":false"), "{body}");
    let check = ok(s.cli(&["suppression", "check", "BOB@dest.test"]));
    assert!(check.contains("suppressed by bob@dest.test"), "{check}");
    assert!(!s
        .cli(&["suppression", "check", "ok@dest.test"])
        .status
        .success());

    // (The sink's own readiness probe is a connection.)
    let blocked_connections = blocked.count("connections");
    let id = send(
        &s,
        "alice@client.test",
        &["ok@dest.test", "bob@dest.test", "x@blocked.test"],
        "mixed",
    );
    bounces.wait_messages(1);
    dest.wait_messages(1);
    wait_gone(&s, &id);
    let b = &bounces.messages()[0];
    assert!(b.contains("X-Sink-Rcpt-To: <alice@client.test>"), "{b}");
    assert!(
        b.contains("Final-Recipient: rfc822; bob@dest.test")
            && b.contains("Final-Recipient: rfc822; x@blocked.test")
            && b.contains("Status: 5.7.1")
            && b.contains("recipient suppressed: asked to stop")
            && b.contains("recipient suppressed: complaints")
            && !b.contains("Final-Recipient: rfc822; ok@"),
        "{b}"
    );
    // The suppressed ones were never offered: one recipient at dest's sink, no connection at all to blocked's.
    assert_eq!(dest.count("recipients_accepted"), 1);
    let m = &dest.messages()[0];
    assert!(
        m.contains("X-Sink-Rcpt-To: <ok@dest.test>") && !m.contains("bob@"),
        "{m}"
    );
    assert_eq!(blocked.count("connections"), blocked_connections);
    assert_eq!(blocked.count("transactions"), 0);
    let l = suppressed_line(&s, &id, "bob@dest.test");
    assert_eq!(l["result"], "bounced", "{l}");
    assert_eq!(l["destination"], "suppressed", "{l}");
    assert!(l["host"].is_null(), "{l}");
    suppressed_line(&s, &id, "x@blocked.test");
    let (_, metrics) = curl("GET", &format!("{api}/metrics"), None);
    assert!(metrics.contains("shardmta_suppressed_total 2"), "{metrics}");
    assert!(
        metrics.contains("shardmta_suppression_entries 2"),
        "{metrics}"
    );

    // Removal: DELETE (percent-encoded) and the CLI.
    let (code, body) = curl(
        "DELETE",
        &format!("{api}/api/v1/suppression/bob%40dest.test"),
        None,
    );
    assert_eq!(code, 200, "{body}");
    let (code, _) = curl(
        "DELETE",
        &format!("{api}/api/v1/suppression/bob@dest.test"),
        None,
    );
    assert_eq!(code, 404);
    ok(s.cli(&["suppression", "remove", "@blocked.test"]));
    assert_eq!(ok(s.cli(&["suppression", "list"])).trim(), "");
    let id = send(
        &s,
        "alice@client.test",
        &["bob@dest.test", "y@blocked.test"],
        "after",
    );
    dest.wait_messages(2);
    blocked.wait_messages(1);
    wait_gone(&s, &id);
    assert_eq!(bounces.count("messages"), 1);
    // Expiry: an entry for an hour is listed with its end; one that ends now no longer matches.
    ok(s.cli(&["suppression", "add", "tmp@dest.test", "--expires-in", "1h"]));
    let listed = ok(s.cli(&["suppression", "list"]));
    let fields: Vec<&str> = listed.trim().split('\t').collect();
    assert_eq!(fields[0], "tmp@dest.test", "{listed}");
    let (added, expires): (u64, u64) = (fields[1].parse().unwrap(), fields[2].parse().unwrap());
    assert_eq!(expires - added, 3600, "{listed}");
    let (code, body) = curl(
        "POST",
        &format!("{api}/api/v1/suppression"),
        Some(r#"{"address": "gone@dest.test", "expires_in_s": 0}"#),
    );
    assert_eq!(code, 201, "{body}");
    let (_, body) = curl(
        "GET",
        &format!("{api}/api/v1/suppression/gone@dest.test"),
        None,
    );
    assert!(body.contains("\"suppressed\":false"), "{body}");
}

/// With `suppression_auto_add = true`, a remote `550 5.1.1` adds the recipient (reason: the reply); the next
/// message to it is bounced without contacting the sink; the list survives a restart, and an entry added with
/// the CLI while the server is stopped is in force after it starts.
#[test]
fn invalid_recipient_is_added_automatically_and_the_list_survives_a_restart() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("dest.test", 10, "mx.dest.test");
    dns.add_a("mx.dest.test", ip("127.0.0.64"));
    let sink = Sink::start(
        "127.0.0.64",
        port,
        &["--rcpt-reply", "nouser=550 5.1.1 no such user here"],
    );
    let mut s = Server::start(&relay_config(
        port,
        &dns,
        "",
        "suppression_auto_add = true\n",
    ));
    let first = send(&s, "", &["nouser@dest.test"], "first");
    wait_gone(&s, &first);
    assert_eq!(sink.count("recipients_permfailed"), 1);
    wait_for(
        || {
            s.cli(&["suppression", "check", "nouser@dest.test"])
                .status
                .success()
        },
        "the automatic add",
    );
    let listed: serde_json::Value =
        serde_json::from_str(&ok(s.cli(&["suppression", "list", "--json"]))).unwrap();
    assert_eq!(listed[0]["entry"], "nouser@dest.test", "{listed}");
    assert!(
        listed[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("550 5.1.1 no such user here")),
        "{listed}"
    );
    let connections = sink.count("connections");
    let second = send(&s, "", &["nouser@dest.test"], "second");
    suppressed_line(&s, &second, "nouser@dest.test");
    wait_gone(&s, &second);
    assert_eq!(sink.count("recipients_permfailed"), 1);
    assert_eq!(sink.count("connections"), connections);

    // Restart; an entry added on the stopped spool.
    assert!(s.terminate().success());
    ok(s.cli(&["suppression", "add", "later@dest.test"]));
    s.spawn();
    let third = send(&s, "", &["nouser@dest.test", "later@dest.test"], "third");
    suppressed_line(&s, &third, "nouser@dest.test");
    suppressed_line(&s, &third, "later@dest.test");
    wait_gone(&s, &third);
    assert_eq!(sink.count("recipients_permfailed"), 1);
    assert_eq!(sink.count("recipients_accepted"), 0);
}
