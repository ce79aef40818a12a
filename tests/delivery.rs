//! Outbound delivery end to end: shardmta relays to SMTP sinks (`shardmta-loadtest sink`) on 127.0.0.x, with MX
//! records served by a DNS responder the test starts itself. Nothing leaves the loopback network.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use common::*;
use shardmta::dns::testserver::TestDns;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn send(s: &Server, from: &str, to: &[&str], subject: &str) -> String {
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO client.test");
    let id = queued_id(&c.send_mail(from, to, &format!("Subject: {subject}\r\nMessage-ID: <{subject}@client.test>\r\n\r\nbody of {subject}\r\n..dot line\r\n")));
    c.cmd("QUIT");
    id
}

fn rcpt_states(s: &Server, id: &str) -> Vec<(String, String)> {
    s.queue()
        .iter()
        .find(|m| m["id"] == id)
        .map(|m| {
            m["recipients"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    (
                        r["address"].as_str().unwrap().to_string(),
                        r["state"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn mx_preference_and_fallback_when_first_mx_refuses() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("pref.test", 10, "mx1.pref.test");
    dns.add_mx("pref.test", 20, "mx2.pref.test");
    dns.add_a("mx1.pref.test", ip("127.0.0.11")); // nothing listens there: refused
    dns.add_a("mx2.pref.test", ip("127.0.0.12"));
    let sink = Sink::start("127.0.0.12", port, &[]);
    let s = Server::start(&relay_config(port, &dns, "", ""));
    let id = send(&s, "a@client.test", &["bob@pref.test"], "pref");
    sink.wait_messages(1);
    wait_gone(&s, &id);
    let m = &sink.messages()[0];
    assert!(
        m.contains("X-Sink-Rcpt-To: <bob@pref.test>")
            && m.contains("X-Sink-Mail-From: <a@client.test>"),
        "{m}"
    );
    assert!(
        m.contains("Received: from client.test") && m.contains("\r\n.dot line\r\n"),
        "data intact, dot unstuffed at the sink: {m}"
    );
    let log = delivery_log_with(&s, |l| l["result"] == "delivered");
    assert!(
        log.iter().any(|l| l["result"] == "delivered"
            && l["host"] == "mx2.pref.test"
            && l["ip"] == "127.0.0.12"
            && l["queue_id"] == id.as_str()),
        "{log:?}"
    );
}

#[test]
fn implicit_mx_null_mx_and_nxdomain() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_a("implicit.test", ip("127.0.0.13"));
    dns.null_mx("nullmx.test");
    dns.set_nxdomain("nowhere.test");
    dns.add_mx("client.test", 10, "mx.client.test");
    dns.add_a("mx.client.test", ip("127.0.0.14"));
    let sink = Sink::start("127.0.0.13", port, &[]);
    let bounces = Sink::start("127.0.0.14", port, &[]);
    let s = Server::start(&relay_config(port, &dns, "", ""));
    send(&s, "a@client.test", &["x@implicit.test"], "implicit");
    sink.wait_messages(1);
    send(&s, "a@client.test", &["y@nullmx.test"], "nullmx");
    send(&s, "a@client.test", &["z@nowhere.test"], "nxdomain");
    bounces.wait_messages(2);
    let all = bounces.messages().join("\n");
    assert_eq!(
        all.matches("X-Sink-Mail-From: <>").count(),
        2,
        "bounces use the null sender: {all}"
    );
    assert!(
        all.contains("Final-Recipient: rfc822; y@nullmx.test") && all.contains("Status: 5.1.10"),
        "{all}"
    );
    assert!(
        all.contains("Final-Recipient: rfc822; z@nowhere.test") && all.contains("Status: 5.1.2"),
        "{all}"
    );
    assert!(
        all.contains("Subject: nullmx") && all.contains("Subject: nxdomain"),
        "original headers returned: {all}"
    );
}

#[test]
fn servfail_defers_then_recovers() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("flaky.test", 10, "mx.flaky.test");
    dns.add_a("mx.flaky.test", ip("127.0.0.15"));
    dns.set_servfail("flaky.test", true);
    let sink = Sink::start("127.0.0.15", port, &[]);
    let s = Server::start(&relay_config(port, &dns, "", ""));
    let id = send(&s, "a@client.test", &["x@flaky.test"], "flaky");
    wait_for(
        || {
            rcpt_states(&s, &id)
                .first()
                .is_some_and(|(_, st)| st == "deferred")
        },
        "a deferral",
    );
    assert_eq!(sink.count("messages"), 0);
    dns.set_servfail("flaky.test", false);
    sink.wait_messages(1);
    wait_gone(&s, &id);
}

#[test]
fn tempfail_then_success_and_permfail_bounce_to_sender_domain() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("dest.test", 10, "mx.dest.test");
    dns.add_a("mx.dest.test", ip("127.0.0.16"));
    dns.add_mx("client.test", 10, "mx.client.test");
    dns.add_a("mx.client.test", ip("127.0.0.17"));
    let sink = Sink::start("127.0.0.16", port, &[]);
    let bounces = Sink::start("127.0.0.17", port, &[]);
    let s = Server::start(&relay_config(port, &dns, "", ""));
    let id = send(
        &s,
        "alice@client.test",
        &["ok@dest.test", "permfail@dest.test"],
        "mixed",
    );
    bounces.wait_messages(1);
    sink.wait_messages(1);
    wait_gone(&s, &id);
    let b = &bounces.messages()[0];
    assert!(b.contains("X-Sink-Rcpt-To: <alice@client.test>"), "{b}");
    assert!(
        b.contains("Final-Recipient: rfc822; permfail@dest.test")
            && b.contains("Status: 5.1.1")
            && !b.contains("Final-Recipient: rfc822; ok@"),
        "{b}"
    );
    assert!(b.contains("Remote-MTA: dns; mx.dest.test"), "{b}");
    // A sink that first says 451 and then (restarted without the trigger) accepts.
    drop(sink);
    let sink = Sink::start("127.0.0.16", port, &["--tempfail-rate", "1"]);
    let id = send(&s, "alice@client.test", &["later@dest.test"], "later");
    wait_for(
        || {
            rcpt_states(&s, &id)
                .first()
                .is_some_and(|(_, st)| st == "deferred")
        },
        "a deferral",
    );
    drop(sink);
    let sink = Sink::start("127.0.0.16", port, &[]);
    sink.wait_messages(1);
    wait_gone(&s, &id);
    let log = delivery_log_with(&s, |l| {
        l["rcpt"] == "later@dest.test" && l["result"] == "delivered"
    });
    let attempts: Vec<_> = log
        .iter()
        .filter(|l| l["rcpt"] == "later@dest.test")
        .map(|l| {
            (
                l["result"].as_str().unwrap().to_string(),
                l["attempt"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(
        attempts
            .first()
            .is_some_and(|(r, a)| r == "deferred" && *a == 1),
        "{attempts:?}"
    );
    assert!(
        attempts
            .last()
            .is_some_and(|(r, a)| r == "delivered" && *a >= 2),
        "{attempts:?}"
    );
}

#[test]
fn expiry_bounces_with_4_4_7() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("slow.test", 10, "mx.slow.test");
    dns.add_a("mx.slow.test", ip("127.0.0.18"));
    dns.add_mx("client.test", 10, "mx.client.test");
    dns.add_a("mx.client.test", ip("127.0.0.19"));
    let _sink = Sink::start("127.0.0.18", port, &["--tempfail-rate", "1"]);
    let bounces = Sink::start("127.0.0.19", port, &[]);
    let s = Server::start(&relay_config(
        port,
        &dns,
        "",
        "maximal_queue_lifetime = \"3s\"",
    ));
    let id = send(&s, "alice@client.test", &["never@slow.test"], "expire");
    bounces.wait_messages(1);
    wait_gone(&s, &id);
    let b = &bounces.messages()[0];
    assert!(
        b.contains("Status: 4.4.7") && b.contains("delivery time expired"),
        "{b}"
    );
}

#[test]
fn many_messages_share_few_connections_and_recipients_share_transactions() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("bulk.test", 10, "mx.bulk.test");
    dns.add_a("mx.bulk.test", ip("127.0.0.20"));
    let sink = Sink::start("127.0.0.20", port, &[]);
    let s = Server::start(&relay_config(
        port,
        &dns,
        "destination_concurrency_limit = 2\ndestination_recipient_limit = 3",
        "",
    ));
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO client.test");
    for i in 0..40 {
        queued_id(&c.send_mail(
            "a@client.test",
            &["r1@bulk.test"],
            &format!("Subject: bulk {i}\r\n\r\nx\r\n"),
        ));
    }
    // One message to 7 recipients: transactions of at most 3 recipients.
    let rcpts: Vec<String> = (0..7).map(|i| format!("m{i}@bulk.test")).collect();
    let refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    queued_id(&c.send_mail("a@client.test", &refs, "Subject: many\r\n\r\nx\r\n"));
    sink.wait_messages(43);
    let st = sink.stats();
    assert!(
        st["max_concurrent_connections"].as_u64().unwrap() <= 2,
        "{st}"
    );
    assert!(
        st["connections"].as_u64().unwrap() <= 8,
        "40 messages should share few connections: {st}"
    );
    assert_eq!(st["recipients_accepted"].as_u64().unwrap(), 47, "{st}");
    let many: Vec<String> = sink
        .messages()
        .into_iter()
        .filter(|m| m.contains("Subject: many"))
        .collect();
    assert_eq!(many.len(), 3);
    let mut per_txn: Vec<usize> = many
        .iter()
        .map(|m| m.matches("X-Sink-Rcpt-To:").count())
        .collect();
    per_txn.sort();
    assert_eq!(per_txn, vec![1, 3, 3]);
}

#[test]
fn starttls_used_and_plaintext_fallback_when_tls_is_broken() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("tls.test", 10, "mx.tls.test");
    dns.add_a("mx.tls.test", ip("127.0.0.21"));
    dns.add_mx("broken.test", 10, "mx.broken.test");
    dns.add_a("mx.broken.test", ip("127.0.0.22"));
    let tls = Sink::start("127.0.0.21", port, &["--starttls"]);
    let broken = Sink::start("127.0.0.22", port, &["--broken-tls"]);
    let s = Server::start(&relay_config(port, &dns, "", ""));
    send(&s, "a@client.test", &["x@tls.test"], "tls");
    send(&s, "a@client.test", &["y@broken.test"], "broken");
    tls.wait_messages(1);
    broken.wait_messages(1);
    assert!(
        tls.messages()[0].contains("X-Sink-TLS: TLSv1"),
        "{}",
        tls.messages()[0]
    );
    assert!(
        broken.messages()[0].contains("X-Sink-TLS: none"),
        "{}",
        broken.messages()[0]
    );
    delivery_log_with(&s, |l| {
        l["rcpt"] == "x@tls.test" && l["tls"].as_str().is_some_and(|t| t.starts_with("TLSv1"))
    });
}

#[test]
fn required_tls_refuses_plaintext() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("secure.test", 10, "mx.secure.test");
    dns.add_a("mx.secure.test", ip("127.0.0.23"));
    let sink = Sink::start("127.0.0.23", port, &[]); // no STARTTLS offered
    let s = Server::start(&relay_config(
        port,
        &dns,
        "",
        "[smtp_tls_policy]\n\"secure.test\" = \"encrypt\"",
    ));
    let id = send(&s, "a@client.test", &["x@secure.test"], "secure");
    wait_for(
        || {
            rcpt_states(&s, &id)
                .first()
                .is_some_and(|(_, st)| st == "deferred")
        },
        "a deferral",
    );
    assert_eq!(sink.count("messages"), 0);
    delivery_log_with(&s, |l| {
        l["reply"].as_str().is_some_and(|r| r.contains("4.7.4"))
    });
}

#[test]
fn relayhost_with_auth_and_per_domain_route() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    let smart = Sink::start(
        "127.0.0.24",
        port,
        &["--starttls", "--auth", "relayuser:relaypass"],
    );
    let routed = Sink::start("127.0.0.25", port, &[]);
    let top = format!(
        "relayhost = \"[127.0.0.24]\"\n[transport]\n\"routed.test\" = \"[127.0.0.25]:{port}\""
    );
    let s = Server::start(&relay_config(
        port,
        &dns,
        "smtp_sasl_username = \"relayuser\"\nsmtp_sasl_password = \"relaypass\"",
        &top,
    ));
    send(
        &s,
        "a@client.test",
        &["x@anywhere.test", "y@elsewhere.test"],
        "smarthost",
    );
    send(&s, "a@client.test", &["z@routed.test"], "routed");
    smart.wait_messages(1);
    routed.wait_messages(1);
    let m = &smart.messages()[0];
    assert!(
        m.contains("X-Sink-Auth: relayuser") && m.contains("X-Sink-TLS: TLSv1"),
        "{m}"
    );
    assert_eq!(
        m.matches("X-Sink-Rcpt-To:").count(),
        2,
        "both domains in one transaction to the smarthost: {m}"
    );
    assert!(routed.messages()[0].contains("X-Sink-Rcpt-To: <z@routed.test>"));
    assert_eq!(dns.queries(), 0, "bracketed next hops need no DNS");
}

#[test]
fn restart_mid_queue_keeps_pending_recipients_and_schedule() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("later.test", 10, "mx.later.test");
    dns.add_a("mx.later.test", ip("127.0.0.26"));
    let sink = Sink::start("127.0.0.26", port, &["--tempfail-rate", "1"]);
    let mut s = Server::start(&relay_config(
        port,
        &dns,
        "",
        "minimal_backoff_time = \"30s\"\nmaximal_backoff_time = \"60s\"",
    ));
    let id = send(
        &s,
        "a@client.test",
        &["one@later.test", "two@later.test"],
        "restart",
    );
    wait_for(
        || {
            rcpt_states(&s, &id)
                .iter()
                .filter(|(_, st)| st == "deferred")
                .count()
                == 2
        },
        "two deferrals",
    );
    let before: Vec<serde_json::Value> = s.queue();
    s.kill9();
    s.spawn();
    let after = s.queue();
    let pick = |q: &[serde_json::Value]| {
        q.iter()
            .find(|m| m["id"] == id.as_str())
            .map(|m| m["recipients"].clone())
    };
    assert_eq!(
        pick(&before),
        pick(&after),
        "states and next attempt times survive the restart"
    );
    let r = pick(&after).unwrap();
    assert!(
        r[0]["next_attempt_unix_s"].as_u64().unwrap() > 0 && r[0]["attempts"] == 1,
        "{r}"
    );
    // Not retried before its time: the sink sees no new connection for 2 s of the server's uptime, all of
    // it before the recorded next attempt (so the window cannot miss a retry that is due).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        r[0]["next_attempt_unix_s"].as_u64().unwrap() > now + 2,
        "{r}"
    );
    let conns = sink.count("connections");
    wait_server_window(&s, Duration::from_secs(2));
    assert_eq!(sink.count("connections"), conns);
}

#[test]
fn destination_rate_limit_spaces_messages() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("rate.test", 10, "mx.rate.test");
    dns.add_a("mx.rate.test", ip("127.0.0.28"));
    let sink = Sink::start("127.0.0.28", port, &[]);
    let s = Server::start(&relay_config(
        port,
        &dns,
        "",
        "[destination_rate_limit]\n\"rate.test\" = \"5/s\"",
    ));
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO client.test");
    for i in 0..6 {
        queued_id(&c.send_mail(
            "a@client.test",
            &["r@rate.test"],
            &format!("Subject: rate {i}\r\n\r\nx\r\n"),
        ));
    }
    sink.wait_messages(6);
    let mut log = Vec::new();
    wait_for(
        || {
            log = delivery_log_with(&s, |l| l["result"] == "delivered");
            log.iter().filter(|l| l["result"] == "delivered").count() == 6
        },
        "6 delivered lines in the log",
    );
    let ts: Vec<f64> = log
        .iter()
        .filter(|l| l["result"] == "delivered")
        .map(|l| l["ts"].as_f64().unwrap())
        .collect();
    let span =
        ts.iter().cloned().fold(f64::MIN, f64::max) - ts.iter().cloned().fold(f64::MAX, f64::min);
    assert_eq!(ts.len(), 6);
    assert!(
        span >= 0.9,
        "6 messages at 5/s need at least 1 s, took {span:.3} s"
    );
}

#[test]
fn a_421_backs_the_destination_off() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("busy.test", 10, "mx.busy.test");
    dns.add_a("mx.busy.test", ip("127.0.0.29"));
    let sink = Sink::start("127.0.0.29", port, &["--greeting-code", "421"]);
    // Sink::start's readiness probe is a connection too.
    wait_for(|| sink.count("connections") >= 1, "the probe to be counted");
    let probe = sink.count("connections");
    let s = Server::start(&relay_config(
        port,
        &dns,
        "destination_backoff_time = \"30s\"",
        "",
    ));
    let first = send(&s, "a@client.test", &["x@busy.test"], "busy1");
    wait_for(
        || {
            rcpt_states(&s, &first)
                .first()
                .is_some_and(|(_, st)| st == "deferred")
        },
        "a deferral",
    );
    let second = send(&s, "a@client.test", &["y@busy.test"], "busy2");
    wait_for(
        || {
            rcpt_states(&s, &second)
                .first()
                .is_some_and(|(_, st)| st == "deferred")
        },
        "the second deferral",
    );
    delivery_log_with(&s, |l| {
        l["rcpt"] == "y@busy.test"
            && l["reply"]
                .as_str()
                .is_some_and(|r| r.contains("backing off"))
    });
    assert_eq!(
        sink.count("connections"),
        probe + 1,
        "the backed-off destination is not connected to again"
    );
}

#[test]
fn unsupported_smtputf8_bounces_and_bounces_never_bounce() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("ascii.test", 10, "mx.ascii.test");
    dns.add_a("mx.ascii.test", ip("127.0.0.30"));
    dns.add_mx("client.test", 10, "mx.client.test");
    dns.add_a("mx.client.test", ip("127.0.0.31"));
    let ascii = Sink::start("127.0.0.30", port, &["--no-smtputf8"]);
    let bounces = Sink::start("127.0.0.31", port, &[]);
    let s = Server::start(&relay_config(port, &dns, "", ""));
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO client.test");
    assert!(c
        .cmd("MAIL FROM:<alice@client.test> SMTPUTF8")
        .starts_with("250"));
    assert!(c.cmd("RCPT TO:<jörg@ascii.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send("Subject: utf8\r\n\r\nGrüße\r\n.\r\n".as_bytes());
    let utf8_id = queued_id(&c.reply());
    // A message from the null sender that bounces: no bounce is sent for it.
    assert!(c.cmd("MAIL FROM:<>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<permfail@ascii.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: a bounce\r\n\r\nx\r\n.\r\n");
    let null_id = queued_id(&c.reply());
    bounces.wait_messages(1);
    wait_gone(&s, &utf8_id);
    wait_gone(&s, &null_id);
    let b = &bounces.messages()[0];
    assert!(
        b.contains("Status: 5.6.7") && b.contains("Subject: utf8"),
        "{b}"
    );
    // A bounce would be a queued message of its own: once the queue is empty, any bounce made has reached
    // the sink.
    wait_for(|| s.queue().is_empty(), "the queue to drain");
    assert_eq!(
        bounces.count("messages"),
        1,
        "no bounce for the null-sender message"
    );
    assert_eq!(ascii.count("messages"), 0);
}

#[test]
fn relayhost_with_implicit_tls() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    let smart = Sink::start(
        "127.0.0.32",
        port,
        &["--implicit-tls", "--auth", "u465:p465"],
    );
    let s = Server::start(&relay_config(
        port,
        &dns,
        "smtp_tls_wrappermode = true\nsmtp_sasl_username = \"u465\"\nsmtp_sasl_password = \"p465\"",
        "relayhost = \"[127.0.0.32]\"",
    ));
    send(&s, "a@client.test", &["x@anywhere.test"], "wrapper");
    smart.wait_messages(1);
    let m = &smart.messages()[0];
    assert!(
        m.contains("X-Sink-TLS: TLSv1") && m.contains("X-Sink-Auth: u465"),
        "{m}"
    );
}

#[test]
fn verify_level_refuses_an_unverifiable_certificate() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("strict.test", 10, "mx.strict.test");
    dns.add_a("mx.strict.test", ip("127.0.0.33"));
    let sink = Sink::start("127.0.0.33", port, &["--starttls"]); // self-signed certificate
    let s = Server::start(&relay_config(
        port,
        &dns,
        "",
        "[smtp_tls_policy]\n\"strict.test\" = \"verify\"",
    ));
    let id = send(&s, "a@client.test", &["x@strict.test"], "strict");
    wait_for(
        || {
            rcpt_states(&s, &id)
                .first()
                .is_some_and(|(_, st)| st == "deferred")
        },
        "a deferral",
    );
    delivery_log_with(&s, |l| {
        l["rcpt"] == "x@strict.test" && l["reply"].as_str().is_some_and(|r| r.contains("4.7.5"))
    });
    assert_eq!(
        sink.count("messages"),
        0,
        "no plaintext fallback under verify"
    );
}

#[test]
fn delivers_over_ipv6_to_an_aaaa_only_mx() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("six.test", 10, "mx.six.test");
    dns.add_aaaa("mx.six.test", std::net::Ipv6Addr::LOCALHOST);
    let sink = Sink::start("[::1]", port, &[]);
    let s = Server::start(&relay_config(port, &dns, "", ""));
    let id = send(&s, "a@client.test", &["v6@six.test"], "six");
    sink.wait_messages(1);
    wait_gone(&s, &id);
    assert!(
        sink.messages()[0].contains("X-Sink-Local: [::1]:"),
        "{}",
        sink.messages()[0]
    );
    delivery_log_with(&s, |l| l["rcpt"] == "v6@six.test" && l["ip"] == "::1");
}

/// No message leaves with a bare CR or a bare LF (the SMTP smuggling sequences `CR.CR`, `CR.CRLF`, `CRLF.CR`,
/// `LF.CR` included), whether it came by DATA or by BDAT, and no line is longer than 998 bytes.
#[test]
fn bare_line_ends_and_long_lines_never_reach_the_sink() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("smuggle.test", 10, "mx.smuggle.test");
    dns.add_a("mx.smuggle.test", ip("127.0.0.23"));
    let sink = Sink::start("127.0.0.23", port, &[]);
    let s = Server::start(&relay_config(port, &dns, "", ""));
    let long = "Q".repeat(5000);
    let body = format!(
        "Subject: smuggle\r\n\r\na\r.\rMAIL FROM:<evil@x.test>\r\nb\r\n.\rc\n.\rd\r.\r\ne\n{long}\r\nend\r"
    );
    // DATA.
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO client.test");
    let r = c.send_mail("a@client.test", &["x@smuggle.test"], &format!("{body}\r\n"));
    assert!(r.starts_with("250 "), "{r}");
    // BDAT, the same bytes as they are.
    assert!(c.cmd("MAIL FROM:<a@client.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<y@smuggle.test>").starts_with("250"));
    c.send(format!("BDAT {} LAST\r\n", body.len()).as_bytes());
    c.send(body.as_bytes());
    let r = c.reply();
    assert!(r.starts_with("250 "), "{r}");
    c.cmd("QUIT");
    sink.wait_messages(2);
    for m in sink.messages() {
        let b = m.as_bytes();
        for (i, &ch) in b.iter().enumerate() {
            match ch {
                b'\r' => assert_eq!(b.get(i + 1), Some(&b'\n'), "bare CR at {i}: {m:?}"),
                b'\n' => assert_eq!(b[i - 1], b'\r', "bare LF at {i}: {m:?}"),
                _ => {}
            }
        }
        assert!(
            m.split("\r\n").all(|l| l.len() <= 998),
            "a line over 998 bytes"
        );
        // Nothing was lost: the long line is all there, folded; the smuggled command is content.
        assert_eq!(m.matches('Q').count(), 5000);
        assert!(m.contains("\r\nMAIL FROM:<evil@x.test>\r\n"), "{m}");
        assert!(m.contains("\r\nend\r\n"), "{m}");
    }
}

/// A recipient domain's TLS policy holds on a `[transport]` route too. Before, the policy was looked up by next
/// hop only, so `"tlsenc.test" = "encrypt"` with a route to a host without STARTTLS sent the mail in plaintext.
/// A domain without a policy on the same route still goes in plaintext (opportunistic TLS).
#[test]
fn recipient_domain_tls_policy_holds_on_a_transport_route() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    let sink = Sink::start("127.0.0.26", port, &[]); // no STARTTLS offered
    let top = format!(
        "[transport]\n\"tlsenc.test\" = \"[127.0.0.26]:{port}\"\n\"plain.test\" = \"[127.0.0.26]:{port}\"\n[smtp_tls_policy]\n\"TLSenc.test\" = \"encrypt\""
    );
    let s = Server::start(&relay_config(port, &dns, "", &top));
    let id = send(
        &s,
        "a@client.test",
        &["x@tlsenc.test", "y@plain.test"],
        "route",
    );
    sink.wait_messages(1);
    wait_for(
        || {
            rcpt_states(&s, &id)
                .iter()
                .any(|(a, st)| a == "x@tlsenc.test" && st == "deferred")
        },
        "the encrypt domain deferred",
    );
    let m = sink.messages();
    assert_eq!(m.len(), 1);
    assert!(m[0].contains("X-Sink-Rcpt-To: <y@plain.test>"), "{}", m[0]);
    assert!(!m[0].contains("x@tlsenc.test>\r\n"), "sent in plaintext");
    delivery_log_with(&s, |l| {
        l["rcpt"] == "x@tlsenc.test" && l["reply"].as_str().is_some_and(|r| r.contains("4.7.4"))
    });
}

/// A receiver that drops the connection while taking one message (a "poison" message) defers that message
/// only. Before, the lost connection put the whole destination into backoff on every retry, deferring all its
/// other mail (3,480 deferrals in the report).
#[test]
fn a_connection_lost_during_one_message_defers_only_that_message() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("poison.test", 10, "mx.poison.test");
    dns.add_a("mx.poison.test", ip("127.0.0.27"));
    let sink = Sink::start("127.0.0.27", port, &[]);
    let s = Server::start(&relay_config(
        port,
        &dns,
        "destination_backoff_time = \"1h\"",
        "minimal_backoff_time = \"1h\"\nmaximal_backoff_time = \"1h\"",
    ));
    let poison = send(&s, "a@client.test", &["dropdata@poison.test"], "poison");
    delivery_log_with(&s, |l| {
        l["queue_id"] == poison.as_str()
            && l["result"] == "deferred"
            && l["reply"]
                .as_str()
                .is_some_and(|r| r.contains("while sending the message"))
    });
    // Other mail for the same destination goes on at once (no 1 h destination backoff).
    let ok1 = send(&s, "a@client.test", &["ok1@poison.test"], "after1");
    let ok2 = send(&s, "a@client.test", &["ok2@poison.test"], "after2");
    sink.wait_messages(2);
    wait_gone(&s, &ok1);
    wait_gone(&s, &ok2);
    assert!(s.queue().iter().any(|m| m["id"] == poison.as_str()));
}

/// Every deferral and bounce names its bounce class in the delivery log and the event log (JSON): the sink
/// answers each recipient with a real provider's reply, a domain without DNS is a DNS failure, and a rule of
/// the operator's file (`bounce_classification_file`) comes before the built-in ones.
#[test]
fn failures_carry_their_bounce_class() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("dest.test", 10, "mx.dest.test");
    dns.add_a("mx.dest.test", ip("127.0.0.18"));
    dns.set_nxdomain("gone.test");
    let _sink = Sink::start(
        "127.0.0.18",
        port,
        &[
            "--rcpt-reply",
            "quota=452 4.2.2 The email account that you tried to reach is over quota.",
            "--rcpt-reply",
            "throttled=451 4.7.650 The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation.",
            "--rcpt-reply",
            "nouser=550 5.1.1 The email account that you tried to reach does not exist.",
            "--rcpt-reply",
            "listed=554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
            "--rcpt-reply",
            "custom=550 5.7.1 frobnicated by the filter",
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("bounce-rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\ntext = \"frobnicated\"\nclass = \"content_rejected\"\n",
    )
    .unwrap();
    let log = dir.path().join("maillog");
    let top = format!(
        "bounce_classification_file = \"{}\"\nmaillog_file = \"{}\"\nlog_format = \"json\"\n",
        path_str(&rules),
        path_str(&log)
    );
    let s = Server::start(&relay_config(port, &dns, "", &top));
    let rcpts = [
        "quota@dest.test",
        "throttled@dest.test",
        "nouser@dest.test",
        "listed@dest.test",
        "custom@dest.test",
        "x@gone.test",
    ];
    send(&s, "", &rcpts, "classes");
    let want = [
        ("quota@dest.test", "deferred", "mailbox_full"),
        ("throttled@dest.test", "deferred", "rate_limit"),
        ("nouser@dest.test", "bounced", "invalid_recipient"),
        ("listed@dest.test", "bounced", "policy_block"),
        ("custom@dest.test", "bounced", "content_rejected"),
        ("x@gone.test", "bounced", "dns_failure"),
    ];
    let lines = delivery_log_with(&s, |l| l["rcpt"] == "x@gone.test");
    let lines = if want
        .iter()
        .all(|(r, _, _)| lines.iter().any(|l| l["rcpt"] == *r))
    {
        lines
    } else {
        delivery_log_with(&s, |_| {
            let all = std::fs::read_to_string(s.spool().join("delivery.log")).unwrap_or_default();
            want.iter()
                .all(|(r, _, _)| all.contains(&format!("\"{r}\"")))
        })
    };
    for (rcpt, result, class) in want {
        let l = lines
            .iter()
            .find(|l| l["rcpt"] == rcpt)
            .unwrap_or_else(|| panic!("no line for {rcpt}: {lines:?}"));
        assert_eq!(l["result"], result, "{l}");
        assert_eq!(l["class"], class, "{l}");
    }
    // The event log's delivery events carry the same class.
    wait_for(
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .any(|e| {
                    e["event"] == "delivery"
                        && e["rcpt"] == "throttled@dest.test"
                        && e["class"] == "rate_limit"
                })
        },
        "the event log's delivery line with its class",
    );
    // A delivered recipient has no class.
    let _ok = Sink::start("127.0.0.19", port, &[]);
    dns.add_mx("fine.test", 10, "mx.fine.test");
    dns.add_a("mx.fine.test", ip("127.0.0.19"));
    send(&s, "", &["a@fine.test"], "fine");
    let lines = delivery_log_with(&s, |l| l["rcpt"] == "a@fine.test");
    let l = lines.iter().find(|l| l["rcpt"] == "a@fine.test").unwrap();
    assert_eq!(l["result"], "delivered");
    assert!(l.get("class").is_none(), "{l}");
}

/// Pipelined transactions (`smtp_transaction_pipelining_limit`, 2 by default): messages queued for one
/// destination share a connection's round trips, the next message's MAIL, RCPT and DATA going in the write
/// that ends the content before it. The sink keeps transaction state as Postfix's smtpd does, and the first
/// message's only recipient is refused: its DATA gets 554 and the sink still holds its MAIL, so without an RSET
/// the next pipelined MAIL would get 503 "nested MAIL command" and a good message would bounce.
#[test]
fn pipelined_transactions_follow_the_content_and_a_refused_one_is_reset() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("pipe.test", 10, "mx.pipe.test");
    dns.add_a("mx.pipe.test", ip("127.0.0.34"));
    // The greeting waits, so that all four messages are queued when the first transaction starts.
    let sink = RecordingSink::start_with(
        "127.0.0.34",
        port,
        RecordingSinkOptions {
            offer_pipelining: true,
            strict: true,
            greeting_delay: Duration::from_millis(700),
            ..RecordingSinkOptions::default()
        },
    );
    let s = Server::start(&relay_config(
        port,
        &dns,
        "destination_concurrency_limit = 1\ninitial_destination_concurrency = 1\n",
        "",
    ));
    let refused = send(&s, "a@client.test", &["permfail@pipe.test"], "refused");
    let good: Vec<String> = (0..3)
        .map(|i| {
            send(
                &s,
                "a@client.test",
                &[&format!("r{i}@pipe.test")],
                &format!("good{i}"),
            )
        })
        .collect();
    sink.wait_messages(3);
    for id in &good {
        wait_gone(&s, id);
    }
    let log = delivery_log_with(&s, |l| l["queue_id"] == refused.as_str());
    let result = |id: &str| -> Vec<String> {
        log.iter()
            .filter(|e| e["queue_id"] == id)
            .map(|e| format!("{} {}", e["result"], e["reply"]))
            .collect()
    };
    for id in &good {
        assert!(
            result(id).iter().any(|r| r.starts_with("\"delivered\"")),
            "{id}: {:?}\nsink: {:?}",
            result(id),
            sink.lines()
        );
    }
    assert!(
        result(&refused)
            .iter()
            .any(|r| r.starts_with("\"bounced\"") && r.contains("550 5.1.1")),
        "{:?}",
        result(&refused)
    );
    let lines = sink.lines();
    let data = lines.iter().position(|l| l == "DATA").unwrap();
    assert_eq!(
        lines.get(data + 1).map(String::as_str),
        Some("RSET"),
        "an RSET follows the refused DATA: {lines:?}"
    );
    assert!(
        sink.commands_behind_content() >= 1,
        "a MAIL came in the write that ended a content: {lines:?}"
    );
}
