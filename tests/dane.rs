//! DANE (RFC 7672) end to end: shardmta relays to SMTP sinks on 127.0.0.x presenting certificates made at test
//! time, with MX, A and TLSA records from the test DNS responder, which sets the AD bit for the names the test
//! marks as signed. `dns.dnssec = "trust-ad"` makes the relay believe it. Nothing leaves the loopback network.

mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::*;
use shardmta::dns::testserver::TestDns;
use shardmta::tls::test_pki::{Leaf, TestCa};

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn send(s: &Server, to: &str, subject: &str) -> String {
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO client.test");
    let id = queued_id(&c.send_mail(
        "a@client.test",
        &[to],
        &format!("Subject: {subject}\r\n\r\nbody of {subject}\r\n"),
    ));
    c.cmd("QUIT");
    id
}

/// A STARTTLS sink presenting `leaf` (its PEM files written under `dir`).
fn sink_with(dir: &std::path::Path, ip: &str, port: u16, leaf: &Leaf) -> Sink {
    sink_with_chain(dir, ip, port, &leaf.cert_pem, &leaf.key_pem)
}

fn sink_with_chain(dir: &std::path::Path, ip: &str, port: u16, chain: &str, key: &str) -> Sink {
    let cert = write_file(dir, &format!("{ip}-cert.pem"), chain);
    let key = write_file(dir, &format!("{ip}-key.pem"), key);
    Sink::start(
        ip,
        port,
        &[
            "--starttls",
            "--tls-cert",
            &path_str(&cert),
            "--tls-key",
            &path_str(&key),
        ],
    )
}

/// MX `mx.<domain>` at `addr`, with the domain, the MX host and its TLSA name marked signed (`signed`).
fn zone(dns: &TestDns, domain: &str, addr: &str, port: u16, signed: bool) -> String {
    let mx = format!("mx.{domain}");
    let tlsa = format!("_{port}._tcp.{mx}");
    dns.add_mx(domain, 10, &mx);
    dns.add_a(&mx, ip(addr));
    for n in [domain, &mx, &tlsa] {
        dns.set_authentic(n, signed);
    }
    tlsa
}

fn config(port: u16, dns: &TestDns, log: &std::path::Path) -> String {
    relay_config(
        port,
        dns,
        "",
        &format!("maillog_file = \"{}\"", path_str(log)),
    )
    .replace("[dns]\n", "[dns]\ndnssec = \"trust-ad\"\n")
}

fn log_lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A DANE-EE `3 1 1` record matching the sink's key: delivered over TLS, and both logs say `dane`.
#[test]
fn dane_ee_match_delivers() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    let ca = TestCa::new(); // any issuer: DANE-EE does not look at it
    let leaf = ca.leaf("mx.dane.test");
    let tlsa = zone(&dns, "dane.test", "127.0.0.61", port, true);
    let spki = shardmta::dane::association(leaf.der.as_ref(), 1, 1).unwrap();
    dns.add_tlsa(&tlsa, 3, 1, 1, &spki);
    let sink = sink_with(dir.path(), "127.0.0.61", port, &leaf);
    let log = dir.path().join("maillog");
    let s = Server::start(&config(port, &dns, &log));
    send(&s, "x@dane.test", "dane-ee");
    sink.wait_messages(1);
    assert!(sink.messages()[0].contains("X-Sink-TLS: TLSv1"));
    let lines = delivery_log_with(&s, |l| {
        l["rcpt"] == "x@dane.test" && l["result"] == "delivered"
    });
    let l = lines
        .iter()
        .find(|l| l["rcpt"] == "x@dane.test" && l["result"] == "delivered")
        .unwrap();
    assert_eq!(l["tls_policy"], "dane", "{l}");
    assert_eq!(l["tls_result"], "success", "{l}");
    wait_for(
        || {
            log_lines(&log).iter().any(|l| {
                l.contains("to=<x@dane.test>")
                    && l.ends_with("), tls_policy=dane")
                    && l.contains("status=sent")
            })
        },
        "the event log line naming the policy",
    );
}

/// A DANE-EE record that does not match (and a full-certificate SHA-512 one of another key): deferred with
/// 4.7.5, nothing reaches the sink, no plaintext fallback.
#[test]
fn dane_ee_mismatch_defers() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    let ca = TestCa::new();
    let leaf = ca.leaf("mx.wrong.test");
    let other = ca.leaf("mx.wrong.test");
    let tlsa = zone(&dns, "wrong.test", "127.0.0.62", port, true);
    dns.add_tlsa(
        &tlsa,
        3,
        1,
        1,
        &shardmta::dane::association(other.der.as_ref(), 1, 1).unwrap(),
    );
    dns.add_tlsa(
        &tlsa,
        3,
        0,
        2,
        &shardmta::dane::association(other.der.as_ref(), 0, 2).unwrap(),
    );
    let sink = sink_with(dir.path(), "127.0.0.62", port, &leaf);
    let log = dir.path().join("maillog");
    let s = Server::start(&config(port, &dns, &log));
    send(&s, "x@wrong.test", "dane-mismatch");
    let lines = delivery_log_with(&s, |l| {
        l["rcpt"] == "x@wrong.test" && l["result"] == "deferred"
    });
    let l = lines
        .iter()
        .find(|l| l["rcpt"] == "x@wrong.test" && l["result"] == "deferred")
        .unwrap();
    assert_eq!(l["tls_policy"], "dane", "{l}");
    assert_eq!(l["tls_result"], "tlsa-invalid", "{l}");
    assert_eq!(l["class"], "tls_failure", "{l}");
    let reply = l["reply"].as_str().unwrap();
    assert!(reply.contains("4.7.5") && reply.contains("DANE"), "{reply}");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(
        sink.count("messages"),
        0,
        "nothing delivered to a host failing DANE"
    );
}

/// The same records without the AD bit (an unsigned zone, or a resolver that did not validate): no DANE, the
/// mail goes with opportunistic TLS and the logs say `may`. A TLSA lookup failing on a validated path defers.
#[test]
fn tlsa_without_ad_is_no_dane_and_a_failed_lookup_defers() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    let ca = TestCa::new();
    let leaf = ca.leaf("mx.plain.test");
    let other = ca.leaf("mx.plain.test");
    let tlsa = zone(&dns, "plain.test", "127.0.0.63", port, false);
    // A record that would not match: ignored, since it is not validated.
    dns.add_tlsa(
        &tlsa,
        3,
        1,
        1,
        &shardmta::dane::association(other.der.as_ref(), 1, 1).unwrap(),
    );
    let sink = sink_with(dir.path(), "127.0.0.63", port, &leaf);
    // A signed domain whose TLSA lookup fails.
    let failing = zone(&dns, "servfail.test", "127.0.0.63", port, true);
    dns.set_servfail(&failing, true);
    let log = dir.path().join("maillog");
    let s = Server::start(&config(port, &dns, &log));
    send(&s, "x@plain.test", "no-ad");
    sink.wait_messages(1);
    let lines = delivery_log_with(&s, |l| {
        l["rcpt"] == "x@plain.test" && l["result"] == "delivered"
    });
    let l = lines
        .iter()
        .find(|l| l["rcpt"] == "x@plain.test" && l["result"] == "delivered")
        .unwrap();
    assert_eq!(l["tls_policy"], "may", "{l}");
    assert!(
        l.get("tls_result").is_none(),
        "may is not a TLS-RPT policy: {l}"
    );
    assert!(
        l["tls"].as_str().is_some_and(|t| t.starts_with("TLSv1")),
        "{l}"
    );

    send(&s, "y@servfail.test", "servfail");
    let lines = delivery_log_with(&s, |l| {
        l["rcpt"] == "y@servfail.test" && l["result"] == "deferred"
    });
    let l = lines
        .iter()
        .find(|l| l["rcpt"] == "y@servfail.test")
        .unwrap();
    assert_eq!(l["tls_policy"], "dane", "{l}");
    assert_eq!(l["tls_result"], "dnssec-invalid", "{l}");
    assert!(l["reply"].as_str().unwrap().contains("TLSA lookup"), "{l}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(sink.count("messages"), 1, "nothing more reached the sink");
}

/// DANE-TA `2 0 1` naming the CA that the sink's chain includes: delivered; a per-domain `dane-only` for a
/// domain without TLSA defers.
#[test]
fn dane_ta_delivers_and_dane_only_without_tlsa_defers() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    let ca = TestCa::new();
    let leaf = ca.leaf("mx.ta.test");
    let tlsa = zone(&dns, "ta.test", "127.0.0.64", port, true);
    dns.add_tlsa(
        &tlsa,
        2,
        0,
        1,
        &shardmta::dane::association(ca.cert_der().as_ref(), 0, 1).unwrap(),
    );
    // The sink presents leaf + CA.
    let chain = format!("{}{}", leaf.cert_pem, ca.cert_pem());
    let sink = sink_with_chain(dir.path(), "127.0.0.64", port, &chain, &leaf.key_pem);
    zone(&dns, "only.test", "127.0.0.64", port, true);
    let log = dir.path().join("maillog");
    let text = config(port, &dns, &log).replace(
        "[delivery]",
        "[smtp_tls_policy]\n\"only.test\" = \"dane-only\"\n[delivery]",
    );
    let s = Server::start(&text);
    send(&s, "x@ta.test", "dane-ta");
    sink.wait_messages(1);
    let lines = delivery_log_with(&s, |l| {
        l["rcpt"] == "x@ta.test" && l["result"] == "delivered"
    });
    let l = lines.iter().find(|l| l["rcpt"] == "x@ta.test").unwrap();
    assert_eq!(l["tls_policy"], "dane", "{l}");
    assert_eq!(l["tls_result"], "success", "{l}");
    send(&s, "y@only.test", "dane-only");
    let lines = delivery_log_with(&s, |l| {
        l["rcpt"] == "y@only.test" && l["result"] == "deferred"
    });
    let l = lines.iter().find(|l| l["rcpt"] == "y@only.test").unwrap();
    assert_eq!(l["tls_policy"], "dane-only", "{l}");
    assert_eq!(l["tls_result"], "dane-required", "{l}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(sink.count("messages"), 1);
}

/// `dane` and `dane-only` without `dns.dnssec = "trust-ad"` are configuration errors.
#[test]
fn dane_levels_need_trust_ad() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_file(
        dir.path(),
        "c.toml",
        &format!(
            "queue_directory = \"{}\"\n[smtp_tls_policy]\n\"x.test\" = \"dane-only\"\n",
            path_str(&dir.path().join("spool"))
        ),
    );
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("trust-ad"), "{err}");
}

/// With usable TLSA records TLS is mandatory: a host that does not offer STARTTLS gets nothing (no plaintext
/// downgrade), the mail is deferred.
#[test]
fn dane_never_downgrades_to_plaintext() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    let leaf = TestCa::new().leaf("mx.notls.test");
    let tlsa = zone(&dns, "notls.test", "127.0.0.65", port, true);
    dns.add_tlsa(
        &tlsa,
        3,
        1,
        1,
        &shardmta::dane::association(leaf.der.as_ref(), 1, 1).unwrap(),
    );
    let sink = Sink::start("127.0.0.65", port, &[]); // no STARTTLS
    let log = dir.path().join("maillog");
    let s = Server::start(&config(port, &dns, &log));
    send(&s, "x@notls.test", "no-starttls");
    let lines = delivery_log_with(&s, |l| {
        l["rcpt"] == "x@notls.test" && l["result"] == "deferred"
    });
    let l = lines.iter().find(|l| l["rcpt"] == "x@notls.test").unwrap();
    assert_eq!(l["tls_policy"], "dane", "{l}");
    assert_eq!(l["tls_result"], "starttls-not-supported", "{l}");
    assert!(l["reply"].as_str().unwrap().starts_with("4.7.4"), "{l}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(sink.count("messages"), 0);
}

/// `dane-only` with a validated TLSA set that is all unusable (a PKIX-EE `1 1 1` record, which RFC 7672 section
/// 3.1.3 rules out for SMTP) and a sink with a certificate nobody vouches for: not DANE-authenticated, so the mail
/// is deferred (4.7.5) and the sink gets nothing (not even over unauthenticated TLS).
#[test]
fn dane_only_with_unusable_tlsa_defers() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    let leaf = TestCa::new().leaf("mx.unusable.test");
    let tlsa = zone(&dns, "unusable.test", "127.0.0.66", port, true);
    dns.add_tlsa(
        &tlsa,
        1,
        1,
        1,
        &shardmta::dane::association(leaf.der.as_ref(), 1, 1).unwrap(),
    );
    let sink = sink_with(dir.path(), "127.0.0.66", port, &leaf);
    // The readiness probe of `Sink::start` is one connection; none other may follow.
    wait_for(|| sink.count("connections") >= 1, "the probe counted");
    let probes = sink.count("connections");
    let log = dir.path().join("maillog");
    let text = config(port, &dns, &log).replace(
        "[delivery]",
        "[smtp_tls_policy]\n\"unusable.test\" = \"dane-only\"\n[delivery]",
    );
    let s = Server::start(&text);
    send(&s, "x@unusable.test", "dane-only-unusable");
    let lines = delivery_log_with(&s, |l| {
        l["rcpt"] == "x@unusable.test" && l["result"] == "deferred"
    });
    let l = lines
        .iter()
        .find(|l| l["rcpt"] == "x@unusable.test")
        .unwrap();
    assert_eq!(l["tls_policy"], "dane-only", "{l}");
    assert_eq!(l["tls_result"], "dane-required", "{l}");
    assert!(l["reply"].as_str().unwrap().starts_with("4.7.5"), "{l}");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(
        sink.count("connections"),
        probes,
        "no connection to the host"
    );
    assert_eq!(sink.count("messages"), 0);
}

/// MX hosts that are aliases (CNAME, RFC 7672 section 2.2.3): TLSA records are looked up at the expanded name
/// first. `a`: TLSA at the expanded name only, the host offers no STARTTLS: deferred 4.7.4, nothing sent. `b`:
/// DANE-TA at the expanded name, the certificate names only the expanded name (a reference identifier too,
/// section 3.2.2): delivered, `dane`. `c`: a validated denial at the expanded name, TLSA at the MX name: those
/// apply (delivered, `dane`).
#[test]
fn tlsa_at_cname_target_applies() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    let ca = TestCa::new();
    let alias = |domain: &str, target: &str, addr: &str| {
        let mx = format!("mx.{domain}");
        dns.add_mx(domain, 10, &mx);
        dns.add_cname(&mx, target);
        dns.add_a(target, ip(addr));
        for n in [domain, &mx, target] {
            dns.set_authentic(n, true);
        }
        let (expanded, original) = (
            format!("_{port}._tcp.{target}"),
            format!("_{port}._tcp.{mx}"),
        );
        dns.set_authentic(&expanded, true);
        dns.set_authentic(&original, true);
        (expanded, original)
    };
    // a: no STARTTLS at the alias's target.
    let leaf_a = ca.leaf("host-a.provider.test");
    let (tlsa_a, _) = alias("a.cname.test", "host-a.provider.test", "127.0.0.67");
    dns.add_tlsa(
        &tlsa_a,
        3,
        1,
        1,
        &shardmta::dane::association(leaf_a.der.as_ref(), 1, 1).unwrap(),
    );
    let sink_a = Sink::start("127.0.0.67", port, &[]);
    // b: DANE-TA, the certificate names the expanded name only.
    let leaf_b = ca.leaf("host-b.provider.test");
    let (tlsa_b, _) = alias("b.cname.test", "host-b.provider.test", "127.0.0.68");
    dns.add_tlsa(
        &tlsa_b,
        2,
        0,
        1,
        &shardmta::dane::association(ca.cert_der().as_ref(), 0, 1).unwrap(),
    );
    let chain = format!("{}{}", leaf_b.cert_pem, ca.cert_pem());
    let sink_b = sink_with_chain(dir.path(), "127.0.0.68", port, &chain, &leaf_b.key_pem);
    // c: nothing at the expanded name (validated), DANE-EE at the MX name.
    let leaf_c = TestCa::new().leaf("elsewhere.test");
    let (_, tlsa_c) = alias("c.cname.test", "host-c.provider.test", "127.0.0.69");
    dns.add_tlsa(
        &tlsa_c,
        3,
        1,
        1,
        &shardmta::dane::association(leaf_c.der.as_ref(), 1, 1).unwrap(),
    );
    let sink_c = sink_with(dir.path(), "127.0.0.69", port, &leaf_c);
    let log = dir.path().join("maillog");
    let s = Server::start(&config(port, &dns, &log));

    send(&s, "x@a.cname.test", "cname-a");
    let lines = delivery_log_with(&s, |l| {
        l["rcpt"] == "x@a.cname.test" && l["result"] == "deferred"
    });
    let l = lines
        .iter()
        .find(|l| l["rcpt"] == "x@a.cname.test")
        .unwrap();
    assert_eq!(l["tls_policy"], "dane", "{l}");
    assert!(l["reply"].as_str().unwrap().starts_with("4.7.4"), "{l}");

    send(&s, "x@b.cname.test", "cname-b");
    sink_b.wait_messages(1);
    let lines = delivery_log_with(&s, |l| {
        l["rcpt"] == "x@b.cname.test" && l["result"] == "delivered"
    });
    let l = lines
        .iter()
        .find(|l| l["rcpt"] == "x@b.cname.test")
        .unwrap();
    assert_eq!(l["tls_policy"], "dane", "{l}");

    send(&s, "x@c.cname.test", "cname-c");
    sink_c.wait_messages(1);
    let lines = delivery_log_with(&s, |l| {
        l["rcpt"] == "x@c.cname.test" && l["result"] == "delivered"
    });
    let l = lines
        .iter()
        .find(|l| l["rcpt"] == "x@c.cname.test")
        .unwrap();
    assert_eq!(l["tls_policy"], "dane", "{l}");

    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(sink_a.count("messages"), 0, "nothing sent without TLS");
}
