//! Sites: MX-routed domains whose MX hosts form the same set share one destination (limits and connections),
//! and a destination opens connections gradually (adaptive concurrency). A DNS responder and SMTP sinks on
//! 127.0.0.x, started by each test.

mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::*;
use shardmta::dns::testserver::TestDns;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// Sends `n` messages to each recipient over one session.
fn send_all(s: &Server, rcpts: &[&str], n: usize) {
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO client.test");
    for i in 0..n {
        for r in rcpts {
            let reply = c.send_mail(
                "a@client.test",
                &[r],
                &format!("Subject: m{i} to {r}\r\n\r\nbody {i}\r\n"),
            );
            assert!(reply.starts_with("250"), "{reply}");
        }
    }
    c.cmd("QUIT");
}

/// Two domains with the same MX hosts (listed in another order, with other preferences) are one site: with one
/// connection allowed per destination, the site's sink sees one connection carrying both domains' mail, while a
/// domain with other MX hosts has its own. Two shards: the domains' owners hand their jobs to the site's owner.
/// On the old code (destinations per domain) the site's sink saw a connection per domain.
#[test]
fn domains_with_one_mx_set_share_a_site_and_its_connections() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("a.test", 10, "mx1.site.test");
    dns.add_mx("a.test", 20, "mx2.site.test");
    dns.add_mx("b.test", 5, "MX2.site.test.");
    dns.add_mx("b.test", 10, "mx1.site.test");
    dns.add_mx("c.test", 10, "mx.other.test");
    dns.add_a("mx1.site.test", ip("127.0.0.21"));
    dns.add_a("mx2.site.test", ip("127.0.0.21"));
    dns.add_a("mx.other.test", ip("127.0.0.22"));
    let site = Sink::start("127.0.0.21", port, &[]);
    let other = Sink::start("127.0.0.22", port, &[]);
    // Connections stay cached 10 s (not the usual 1 s), so a slow machine does not close one between messages.
    let s = Server::start(
        &relay_config(
            port,
            &dns,
            "destination_concurrency_limit = 1",
            "shards = 2",
        )
        .replace(
            "smtp_connection_cache_time_limit = \"1s\"",
            "smtp_connection_cache_time_limit = \"10s\"",
        ),
    );
    send_all(&s, &["x@a.test", "y@b.test", "z@c.test"], 4);
    site.wait_messages(8);
    other.wait_messages(4);
    let msgs = site.messages();
    for d in ["a.test", "b.test"] {
        assert_eq!(
            msgs.iter()
                .filter(|m| m.contains(&format!(
                    "X-Sink-Rcpt-To: <{}@{d}>",
                    if d == "a.test" { "x" } else { "y" }
                )))
                .count(),
            4,
            "{d}"
        );
    }
    // Connections that carried mail (the sink's own readiness probe is a connection too).
    let peers = |msgs: &[String]| {
        let mut p: Vec<String> = msgs
            .iter()
            .filter_map(|m| m.lines().find(|l| l.starts_with("X-Sink-Peer:")))
            .map(str::to_string)
            .collect();
        p.sort();
        p.dedup();
        p
    };
    assert_eq!(
        peers(&msgs).len(),
        1,
        "one connection for the whole site: {:?}",
        peers(&msgs)
    );
    assert_eq!(site.count("max_concurrent_connections"), 1);
    assert_eq!(peers(&other.messages()).len(), 1);
    // The delivery log names each recipient (and the host of the site that took it).
    let log = delivery_log_with(&s, |l| {
        l["result"] == "delivered" && l["rcpt"] == "y@b.test"
    });
    assert!(
        log.iter()
            .filter(|l| l["rcpt"] == "y@b.test" || l["rcpt"] == "x@a.test")
            .all(|l| l["host"] == "mx1.site.test" || l["host"] == "mx2.site.test"),
        "{log:?}"
    );
}

/// A destination starts with `initial_destination_concurrency` connections, however much is queued: six messages
/// queued at once to a slow sink open at most two connections (the old code opened up to six).
#[test]
fn a_destination_starts_with_its_initial_concurrency() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("slow.test", 10, "mx.slow.test");
    dns.add_a("mx.slow.test", ip("127.0.0.23"));
    let sink = Sink::start("127.0.0.23", port, &["--delay-ms", "300"]);
    let s = Server::start(&relay_config(
        port,
        &dns,
        "initial_destination_concurrency = 2\ndestination_concurrency_limit = 20",
        "",
    ));
    send_all(&s, &["r@slow.test"], 6);
    sink.wait_messages(6);
    assert!(
        sink.count("max_concurrent_connections") <= 2,
        "{}",
        sink.stats()
    );
}

/// A 421 from a site backs off the whole site: after one domain's transaction got a 421, mail for another domain
/// on the same MX hosts is deferred as the site backs off, not tried (with destinations per domain it was
/// delivered).
#[test]
fn a_421_backs_off_every_domain_of_the_site() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("a.test", 10, "mx.site.test");
    dns.add_mx("b.test", 10, "mx.site.test");
    dns.add_a("mx.site.test", ip("127.0.0.24"));
    let sink = Sink::start(
        "127.0.0.24",
        port,
        &["--rcpt-reply", "busy=421 4.3.2 System shutting down"],
    );
    let s = Server::start(&relay_config(
        port,
        &dns,
        "destination_backoff_time = \"60s\"",
        "",
    ));
    send_all(&s, &["busy@a.test"], 1);
    delivery_log_with(&s, |l| {
        l["rcpt"] == "busy@a.test" && l["result"] == "deferred"
    });
    send_all(&s, &["ok@b.test"], 1);
    let log = delivery_log_with(&s, |l| l["rcpt"] == "ok@b.test");
    let line = log.iter().find(|l| l["rcpt"] == "ok@b.test").unwrap();
    assert_eq!(line["result"], "deferred", "{line}");
    let reply = line["reply"].as_str().unwrap();
    assert!(
        reply.contains("backing off") && reply.contains("421 4.3.2"),
        "{reply}"
    );
    assert_eq!(sink.count("messages"), 0);
}

/// A provider of the shaping file (`match` patterns over MX host names) is one site even for domains whose MX host
/// sets differ, and its `max_connections` holds for all of them: two domains on different MX hosts of one provider,
/// one connection allowed by the provider's rule (`destination_concurrency_limit` stays 20), so never two at once
/// at the sink (the old destinations per domain had one each). A connection is not reused for the other domain:
/// each message goes to one of its own domain's MX hosts. Two shards: the domains' owners hand their jobs to the
/// site's owner.
#[test]
fn a_provider_of_the_shaping_file_is_one_site_over_several_mx_sets() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("one.test", 10, "mx1.partner.test");
    dns.add_mx("two.test", 10, "mx2.partner.test");
    dns.add_mx("two.test", 20, "mx3.partner.test");
    for h in ["mx1.partner.test", "mx2.partner.test", "mx3.partner.test"] {
        dns.add_a(h, ip("127.0.0.25"));
    }
    let sink = Sink::start("127.0.0.25", port, &["--delay-ms", "20"]);
    let dir = tempfile::tempdir().unwrap();
    let shaping = dir.path().join("shaping.toml");
    std::fs::write(
        &shaping,
        "[site.partner]\nmatch = [\"*.partner.test\"]\nmax_connections = 1\n",
    )
    .unwrap();
    let s = Server::start(
        &relay_config(
            port,
            &dns,
            "",
            &format!("shards = 2\nshaping_file = \"{}\"", path_str(&shaping)),
        )
        .replace(
            "smtp_connection_cache_time_limit = \"1s\"",
            "smtp_connection_cache_time_limit = \"10s\"",
        ),
    );
    send_all(&s, &["x@one.test", "y@two.test"], 5);
    sink.wait_messages(10);
    assert_eq!(
        sink.count("max_concurrent_connections"),
        1,
        "{}",
        sink.stats()
    );
    let log = delivery_log_with(&s, |l| {
        l["rcpt"] == "y@two.test" && l["result"] == "delivered"
    });
    let delivered: Vec<_> = log.iter().filter(|l| l["result"] == "delivered").collect();
    assert!(
        delivered.iter().any(|l| l["rcpt"] == "x@one.test"),
        "{log:?}"
    );
    for l in delivered {
        let host = l["host"].as_str().unwrap();
        let own = if l["rcpt"] == "x@one.test" {
            host == "mx1.partner.test"
        } else {
            host == "mx2.partner.test" || host == "mx3.partner.test"
        };
        assert!(own, "each message to its own domain's MX hosts: {l}");
    }
}
