//! Egress sources and pools end to end on loopback: the sink sees the source address (127.0.0.2, 127.0.0.3
//! are local addresses on Linux) of each message. Pool chosen by header (and the header gone at the sink), by
//! sender domain and by the HTTP inject field; the header from an untrusted client removed and ignored; a 3:1
//! weighting; a warm-up cap; a source whose address is not on the host suspended, logged and counted, its mail
//! going through the pool's other source.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use common::*;
use shardmta::dns::testserver::TestDns;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// A sink on 127.0.0.61:`port` behind the MX of dest.test, and the DNS that says so.
fn dest(port: u16) -> (TestDns, Sink) {
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("dest.test", 10, "mx.dest.test");
    dns.add_a("mx.dest.test", ip("127.0.0.61"));
    (dns, Sink::start("127.0.0.61", port, &[]))
}

const SOURCES: &str = "\
[[egress_source]]\nname = \"ip2\"\nsource_address = \"127.0.0.2\"\nehlo_name = \"mta2.test\"\n\
[[egress_source]]\nname = \"ip3\"\nsource_address = \"127.0.0.3\"\n";

fn send(addr: std::net::SocketAddr, from: &str, to: &str, headers: &str, subject: &str) -> String {
    let mut c = Client::greeted(addr);
    c.cmd("EHLO client.test");
    let id = queued_id(&c.send_mail(
        from,
        &[to],
        &format!("{headers}Subject: {subject}\r\nMessage-ID: <{subject}@client.test>\r\n\r\nbody of {subject}\r\n"),
    ));
    c.cmd("QUIT");
    id
}

/// Today's date (UTC) as YYYY-MM-DD.
fn today_utc() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        / 86_400;
    // civil_from_days (Howard Hinnant)
    let z = d + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The saved message at the sink whose subject is `subject`.
fn at_sink(sink: &Sink, subject: &str) -> String {
    let want = format!("Subject: {subject}\r\n");
    wait_for(
        || sink.messages().iter().any(|m| m.contains(&want)),
        &format!("message {subject} at the sink"),
    );
    sink.messages()
        .into_iter()
        .find(|m| m.contains(&want))
        .unwrap()
}

/// The address the message came from (the sink's `X-Sink-Peer:` line, without the port).
fn peer_of(m: &str) -> String {
    let line = m
        .lines()
        .find_map(|l| l.strip_prefix("X-Sink-Peer: "))
        .expect("X-Sink-Peer line");
    line.rsplit_once(':').map_or(line, |(a, _)| a).to_string()
}

fn peers(sink: &Sink) -> BTreeMap<String, u64> {
    sink.stats()["peers"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

fn curl(method: &str, url: &str, body: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "-X", method]);
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    cmd.arg("-w").arg("\n%{http_code}").arg(url);
    let out = cmd.output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The pool comes from the header (trusted client; the header is gone at the sink and was not signed or
/// stored), from the sender domain map (a parent domain matches), from the HTTP inject field (which beats the
/// sender domain); without any, no pool (the kernel's address, 127.0.0.1). From a client outside mynetworks
/// the header is removed and ignored. The delivery log and the event log name the source.
#[test]
fn the_pool_is_chosen_by_header_sender_domain_and_inject_field() {
    let port = free_port();
    let (dns, sink) = dest(port);
    let http = free_port();
    let maillog = tempfile::tempdir().unwrap();
    let log = maillog.path().join("mail.log");
    let top = format!(
        "mynetworks = [\"127.0.0.1/32\"]\nrelay_domains = [\"dest.test\"]\negress_pool_header = \"X-Pool\"\nmaillog_file = \"{}\"\n",
        path_str(&log)
    );
    let s = Server::start(&format!(
        "{}\n[http]\nlisten = \"127.0.0.1:{http}\"\ntrusted_networks = [\"127.0.0.1/32\"]\n{SOURCES}\
         [[egress_pool]]\nname = \"two\"\nsources = [{{ name = \"ip2\" }}]\n\
         [[egress_pool]]\nname = \"three\"\nsources = [{{ name = \"ip3\" }}]\n\
         [egress_pool_by_sender_domain]\n\"news.test\" = \"three\"\n",
        relay_config(port, &dns, "", &top)
    ));
    // By header, from a trusted client (mynetworks).
    send(
        s.smtp,
        "a@client.test",
        "r1@dest.test",
        "X-Pool: two\r\n",
        "by-header",
    );
    let m = at_sink(&sink, "by-header");
    assert_eq!(peer_of(&m), "127.0.0.2", "{m}");
    assert!(
        !m.to_ascii_lowercase().contains("x-pool"),
        "header removed: {m}"
    );
    // By sender domain: a subdomain of the map's domain.
    send(s.smtp, "a@lists.news.test", "r2@dest.test", "", "by-domain");
    assert_eq!(peer_of(&at_sink(&sink, "by-domain")), "127.0.0.3");
    // No rule: no pool.
    send(s.smtp, "a@client.test", "r3@dest.test", "", "no-pool");
    assert_eq!(peer_of(&at_sink(&sink, "no-pool")), "127.0.0.1");
    // An untrusted client (outside mynetworks) relaying to relay_domains: the header is removed and ignored.
    let mut c = Client::from_stream(connect_from(ip("127.0.0.9"), s.smtp).unwrap());
    assert!(c.reply().starts_with("220"));
    c.cmd("EHLO outsider.test");
    queued_id(&c.send_mail(
        "a@client.test",
        &["r4@dest.test"],
        "X-Pool: two\r\nSubject: untrusted\r\n\r\nbody\r\n",
    ));
    c.cmd("QUIT");
    let m = at_sink(&sink, "untrusted");
    assert_eq!(peer_of(&m), "127.0.0.1", "ignored: {m}");
    assert!(!m.to_ascii_lowercase().contains("x-pool"), "removed: {m}");
    // The HTTP inject field beats the sender domain map; an unknown pool is refused.
    let inject = format!("http://127.0.0.1:{http}/api/v1/inject");
    let (code, body) = curl(
        "POST",
        &inject,
        Some(
            r#"{"envelope_sender": "a@news.test", "recipients": ["r5@dest.test"], "pool": "two", "content": "Subject: by-field\r\n\r\nbody\r\n"}"#,
        ),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(peer_of(&at_sink(&sink, "by-field")), "127.0.0.2");
    let (code, body) = curl(
        "POST",
        &inject,
        Some(
            r#"{"envelope_sender": "a@news.test", "recipients": ["r6@dest.test"], "pool": "nope", "content": "Subject: x\r\n\r\nbody\r\n"}"#,
        ),
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("nope"), "{body}");
    // The sink's per-peer counts agree (its stats file is rewritten every 50 ms).
    wait_for(
        || peers(&sink).values().sum::<u64>() >= 5,
        "per-peer counts",
    );
    let p = peers(&sink);
    assert_eq!(p.get("127.0.0.2"), Some(&2), "{p:?}");
    assert_eq!(p.get("127.0.0.3"), Some(&1), "{p:?}");
    assert_eq!(p.get("127.0.0.1"), Some(&2), "{p:?}");
    // The delivery log names the source; the event log line ends with it.
    let lines = delivery_log_with(&s, |l| {
        l["rcpt"] == "r5@dest.test" && l["result"] == "delivered"
    });
    let by = |r: &str| lines.iter().find(|l| l["rcpt"] == r).cloned().unwrap();
    assert_eq!(by("r1@dest.test")["source"], "ip2");
    assert_eq!(by("r2@dest.test")["source"], "ip3");
    assert!(by("r3@dest.test").get("source").is_none());
    wait_for(
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .any(|l| {
                    l.contains("to=<r1@dest.test>")
                        && l.contains("status=sent")
                        && l.ends_with(", source=ip2")
                })
        },
        "the event log line naming the source",
    );
}

/// Weights 3:1 over 40 messages: the smooth weighted round-robin is deterministic and gives exactly 30 and 10.
/// (A choice ignoring the weights, 1:1 at random, would give one source 30 or more of 40 with probability about
/// 0.1%; a 1:1 rotation never.)
#[test]
fn weights_split_the_messages() {
    let port = free_port();
    let (dns, sink) = dest(port);
    let s = Server::start(&format!(
        "{}\n{SOURCES}[[egress_pool]]\nname = \"bulk\"\nsources = [{{ name = \"ip2\", weight = 3 }}, {{ name = \"ip3\", weight = 1 }}]\n",
        relay_config(port, &dns, "", "default_egress_pool = \"bulk\"\n")
    ));
    for i in 0..40 {
        send(
            s.smtp,
            "a@client.test",
            &format!("w{i}@dest.test"),
            "",
            &format!("w{i}"),
        );
    }
    sink.wait_messages(40);
    wait_for(
        || peers(&sink).values().sum::<u64>() >= 40,
        "per-peer counts",
    );
    let p = peers(&sink);
    assert_eq!(p.get("127.0.0.2"), Some(&30), "{p:?}");
    assert_eq!(p.get("127.0.0.3"), Some(&10), "{p:?}");
}

/// A source on day 1 of a warm-up schedule of 3 a day (its pool's only source): 3 messages go through it, the others are
/// deferred with a 4.7.0 "warm-up" reply and nothing more reaches the sink.
#[test]
fn a_warmup_cap_defers_the_rest() {
    let port = free_port();
    let (dns, sink) = dest(port);
    // The schedule starts today (UTC): day 1, 3 messages per site (day 2 the same, should the test cross
    // midnight).
    let today = today_utc();
    let s = Server::start(&format!(
        "{}\n[[egress_source]]\nname = \"fresh\"\nsource_address = \"127.0.0.2\"\nwarmup_start = \"{today}\"\nwarmup_per_day = [3, 3]\n\
         [[egress_source]]\nname = \"old\"\nsource_address = \"127.0.0.3\"\n\
         [[egress_pool]]\nname = \"warm\"\nsources = [{{ name = \"fresh\" }}]\n\
         [[egress_pool]]\nname = \"unused\"\nsources = [{{ name = \"old\" }}]\n",
        relay_config(
            port,
            &dns,
            "",
            "default_egress_pool = \"warm\"\nminimal_backoff_time = \"300s\"\nmaximal_backoff_time = \"300s\"\n"
        )
    ));
    for i in 0..6 {
        send(
            s.smtp,
            "a@client.test",
            &format!("c{i}@dest.test"),
            "",
            &format!("c{i}"),
        );
    }
    let read = || delivery_log(&s);
    wait_for(|| read().len() >= 6, "six delivery log lines");
    let lines = read();
    let delivered: Vec<_> = lines
        .iter()
        .filter(|l| l["result"] == "delivered")
        .collect();
    let deferred: Vec<_> = lines.iter().filter(|l| l["result"] == "deferred").collect();
    assert_eq!(delivered.len(), 3, "{lines:?}");
    assert_eq!(deferred.len(), 3, "{lines:?}");
    for d in &delivered {
        assert_eq!(d["source"], "fresh");
    }
    for d in &deferred {
        let r = d["reply"].as_str().unwrap();
        assert!(
            r.starts_with("4.7.0 ") && r.contains("warm-up") && r.contains("warm"),
            "{r}"
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(sink.count("messages"), 3);
    assert_eq!(peers(&sink).get("127.0.0.2"), Some(&3));
}

/// A source whose address is not on this host (192.0.2.10, TEST-NET-1) is named at start, suspended at its
/// first use (one warning, counted in the metrics), its mail goes through the pool's other source, and the
/// server keeps running; a pool with no other source defers its mail with a reply naming the pool.
#[test]
fn an_unbindable_source_is_suspended_and_the_pool_goes_on() {
    let port = free_port();
    let (dns, sink) = dest(port);
    let http = free_port();
    let maillog = tempfile::tempdir().unwrap();
    let log = maillog.path().join("mail.log");
    let s = Server::start(&format!(
        "{}\n[http]\nlisten = \"127.0.0.1:{http}\"\n\
         [[egress_source]]\nname = \"gone\"\nsource_address = \"192.0.2.10\"\n\
         [[egress_source]]\nname = \"ip3\"\nsource_address = \"127.0.0.3\"\n\
         [[egress_pool]]\nname = \"p\"\nsources = [{{ name = \"gone\", weight = 5 }}, {{ name = \"ip3\" }}]\n\
         [[egress_pool]]\nname = \"dead\"\nsources = [{{ name = \"gone\" }}]\n\
         [egress_pool_by_sender_domain]\n\"dead.test\" = \"dead\"\n",
        relay_config(
            port,
            &dns,
            "",
            &format!("default_egress_pool = \"p\"\nmaillog_file = \"{}\"\n", path_str(&log))
        )
    ));
    for i in 0..6 {
        send(
            s.smtp,
            "a@client.test",
            &format!("u{i}@dest.test"),
            "",
            &format!("u{i}"),
        );
    }
    sink.wait_messages(6);
    wait_for(
        || peers(&sink).values().sum::<u64>() >= 6,
        "per-peer counts",
    );
    assert_eq!(peers(&sink).get("127.0.0.3"), Some(&6));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.lines()
            .any(|l| l.contains("egress source gone") && l.contains("cannot be bound")),
        "start-up check: {text}"
    );
    let suspended: Vec<_> = text
        .lines()
        .filter(|l| l.contains("egress source gone (192.0.2.10) suspended"))
        .collect();
    assert_eq!(suspended.len(), 1, "{text}");
    // Published by the shard's next tick.
    wait_for(
        || {
            let (code, metrics) = curl("GET", &format!("http://127.0.0.1:{http}/metrics"), None);
            code == 200
                && metrics.lines().any(|l| {
                    l.starts_with("shardmta_egress_source_suspensions") && l.ends_with(" 1")
                })
        },
        "the suspension counted in /metrics",
    );
    let lines = delivery_log_with(&s, |l| l["rcpt"] == "u5@dest.test");
    assert!(
        lines
            .iter()
            .all(|l| l["result"] == "delivered" && l["source"] == "ip3"),
        "{lines:?}"
    );
    // A pool whose only source is suspended: its mail is deferred with a reply naming the pool.
    send(s.smtp, "a@dead.test", "d@dest.test", "", "dead");
    let lines = delivery_log_with(&s, |l| l["rcpt"] == "d@dest.test");
    let d = lines.iter().find(|l| l["rcpt"] == "d@dest.test").unwrap();
    assert_eq!(d["result"], "deferred");
    let r = d["reply"].as_str().unwrap();
    assert!(r.starts_with("4.4.0 egress pool dead: "), "{r}");
    assert_eq!(sink.count("messages"), 6);
    assert!(greeting_from(s.smtp), "still serving");
}

/// Each source says its own EHLO name: `ehlo_name` when set, else `myhostname` (the harness's "mx.test").
#[test]
fn each_source_says_its_ehlo_name() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("dest.test", 10, "mx.dest.test");
    dns.add_a("mx.dest.test", ip("127.0.0.62"));
    let sink = RecordingSink::start("127.0.0.62", port, false);
    let s = Server::start(&format!(
        "{}\n{SOURCES}[[egress_pool]]\nname = \"both\"\nsources = [{{ name = \"ip2\" }}, {{ name = \"ip3\" }}]\n",
        relay_config(port, &dns, "", "default_egress_pool = \"both\"\n")
    ));
    send(s.smtp, "a@client.test", "e1@dest.test", "", "e1");
    send(s.smtp, "a@client.test", "e2@dest.test", "", "e2");
    sink.wait_messages(2);
    let ehlo: Vec<String> = sink
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("EHLO "))
        .collect();
    assert!(ehlo.contains(&"EHLO mta2.test".to_string()), "{ehlo:?}");
    assert!(ehlo.contains(&"EHLO mx.test".to_string()), "{ehlo:?}");
}

/// A message counted against a warm-up cap but not sent (its destination refused the connection) gives its count
/// back: with a cap of 3, three messages deferred while the receiver is down are all delivered once it is up (the
/// old code had used up the day's cap on the failed attempts and deferred them for warm-up).
#[test]
fn a_message_not_sent_gives_its_warmup_count_back() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("late.test", 10, "mx.late.test");
    dns.add_a("mx.late.test", ip("127.0.0.62"));
    let s = Server::start(&format!(
        "{}\n[[egress_source]]\nname = \"fresh\"\nsource_address = \"127.0.0.2\"\nwarmup_start = \"{}\"\nwarmup_per_day = [3, 3]\n\
         [[egress_pool]]\nname = \"warm\"\nsources = [{{ name = \"fresh\" }}]\n",
        relay_config(port, &dns, "", "default_egress_pool = \"warm\""),
        today_utc()
    ));
    for i in 0..3 {
        send(
            s.smtp,
            "a@client.test",
            &format!("l{i}@late.test"),
            "",
            &format!("l{i}"),
        );
    }
    let read = || delivery_log(&s);
    wait_for(
        || read().iter().filter(|l| l["result"] == "deferred").count() >= 3,
        "three deferrals while the receiver is down",
    );
    let sink = Sink::start("127.0.0.62", port, &[]);
    sink.wait_messages(3);
    assert!(
        !read()
            .iter()
            .any(|l| l["reply"].as_str().unwrap_or("").contains("warm-up")),
        "{:?}",
        read()
    );
}

/// A reload that gives a source another address and EHLO name reaches a destination already in use: the next
/// connection is bound to the new address and says the new name (the destination kept the old source until it
/// was forgotten).
#[test]
fn a_reload_moves_a_source_to_its_new_address() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("dest.test", 10, "mx.dest.test");
    dns.add_a("mx.dest.test", ip("127.0.0.63"));
    let sink = RecordingSink::start("127.0.0.63", port, false);
    let s = Server::start(&format!(
        "{}\n[[egress_source]]\nname = \"ip\"\nsource_address = \"127.0.0.2\"\nehlo_name = \"before.test\"\n\
         [[egress_pool]]\nname = \"p\"\nsources = [{{ name = \"ip\" }}]\n",
        relay_config(port, &dns, "", "default_egress_pool = \"p\"\n")
    ));
    send(s.smtp, "a@client.test", "r1@dest.test", "", "r1");
    sink.wait_messages(1);
    reload_config(&s, |t| {
        t.replace("127.0.0.2", "127.0.0.3")
            .replace("before.test", "after.test")
    });
    // The cached connection (1 s) is gone; the destination is still known.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    send(s.smtp, "a@client.test", "r2@dest.test", "", "r2");
    sink.wait_messages(2);
    let ehlo: Vec<String> = sink
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("EHLO "))
        .collect();
    assert_eq!(ehlo, ["EHLO before.test", "EHLO after.test"], "{ehlo:?}");
}
