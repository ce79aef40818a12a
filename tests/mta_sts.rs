//! MTA-STS (RFC 8461) end to end: the relay looks up `_mta-sts.<domain>` at the test DNS responder, fetches the
//! policy over HTTPS from a test server on 127.0.0.x presenting a certificate of a CA made at test time (the
//! `[mta_sts]` test knobs point it there), and delivers to SMTP sinks presenting certificates of that CA or
//! self-signed ones. Nothing leaves the loopback network.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use common::*;
use shardmta::dns::testserver::TestDns;
use shardmta::tls::test_pki::TestCa;

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

/// One domain with an MTA-STS policy: DNS, the CA, the policy server, and the relay's configuration.
struct Sts {
    dns: TestDns,
    ca: TestCa,
    dir: tempfile::TempDir,
    policy: PolicyServer,
    port: u16,
}

/// `domain`'s MX is `mx` at `mx_ip`; its policy (`body`) is served from `policy_ip`.
fn setup(domain: &str, mx: &str, mx_ip: &str, policy_ip: &str, body: &str) -> Sts {
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx(domain, 10, mx);
    dns.add_a(mx, ip(mx_ip));
    dns.add_txt(
        &format!("_mta-sts.{domain}"),
        "v=STSv1; id=20260101T000000;",
    );
    dns.add_a(&format!("mta-sts.{domain}"), ip(policy_ip));
    let ca = TestCa::new();
    let leaf = ca.leaf(&format!("mta-sts.{domain}"));
    let policy = PolicyServer::start(policy_ip, leaf.server_config(&[]), policy_response(body));
    Sts {
        dns,
        ca,
        dir: tempfile::tempdir().unwrap(),
        policy,
        port: free_port(),
    }
}

impl Sts {
    fn config(&self) -> String {
        let ca = write_file(self.dir.path(), "ca.pem", &self.ca.cert_pem());
        format!(
            "{}\n[mta_sts]\ntest_policy_port = {}\ntest_ca_file = \"{}\"\nfetch_timeout_ms = 3000\n",
            relay_config(
                self.port,
                &self.dns,
                "",
                &format!(
                    "maillog_file = \"{}\"",
                    path_str(&self.dir.path().join("maillog"))
                )
            ),
            self.policy.addr.port(),
            path_str(&ca)
        )
    }

    /// A STARTTLS sink on `ip` presenting a certificate of the test CA for `name`.
    fn ca_sink(&self, ip: &str, name: &str) -> Sink {
        let leaf = self.ca.leaf(name);
        let cert = write_file(self.dir.path(), &format!("{ip}.crt"), &leaf.cert_pem);
        let key = write_file(self.dir.path(), &format!("{ip}.key"), &leaf.key_pem);
        Sink::start(
            ip,
            self.port,
            &[
                "--starttls",
                "--tls-cert",
                &path_str(&cert),
                "--tls-key",
                &path_str(&key),
            ],
        )
    }

    fn maillog(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("maillog"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

fn line_for(s: &Server, rcpt: &str, result: &str) -> serde_json::Value {
    delivery_log_with(s, |l| l["rcpt"] == rcpt && l["result"] == result)
        .into_iter()
        .find(|l| l["rcpt"] == rcpt && l["result"] == result)
        .unwrap()
}

const ENFORCE: &str = "version: STSv1\nmode: enforce\nmx: *.good.test\nmax_age: 86400\n";

/// enforce, a listed MX host with a certificate of a trusted CA for its name: delivered over verified TLS, the
/// logs say `mta-sts-enforce`, and the policy is fetched once for two connections (cached).
#[test]
fn enforce_delivers_to_a_listed_host_with_a_ca_signed_certificate() {
    let env = setup(
        "good.test",
        "mx1.good.test",
        "127.0.0.71",
        "127.0.0.81",
        ENFORCE,
    );
    let sink = env.ca_sink("127.0.0.71", "mx1.good.test");
    let s = Server::start(&env.config());
    send(&s, "x@good.test", "enforce-1");
    sink.wait_messages(1);
    assert!(sink.messages()[0].contains("X-Sink-TLS: TLSv1"));
    let l = line_for(&s, "x@good.test", "delivered");
    assert_eq!(l["tls_policy"], "mta-sts-enforce", "{l}");
    assert_eq!(l["tls_result"], "success", "{l}");
    assert!(l.get("tls_policy_failure").is_none(), "{l}");
    // The pooled connection is gone after 1 s: the second message connects again, with the cached policy.
    std::thread::sleep(Duration::from_millis(1500));
    send(&s, "y@good.test", "enforce-2");
    sink.wait_messages(2);
    assert_eq!(
        line_for(&s, "y@good.test", "delivered")["tls_policy"],
        "mta-sts-enforce"
    );
    assert_eq!(env.policy.requests(), 1, "the policy is cached");
    wait_for(
        || {
            env.maillog().iter().any(|l| {
                l.contains("to=<x@good.test>")
                    && l.ends_with("), tls_policy=mta-sts-enforce")
                    && l.contains("status=sent")
            })
        },
        "the event log line naming the policy",
    );
    assert!(
        env.maillog()
            .iter()
            .any(|l| l.contains("MTA-STS TEST KNOBS ACTIVE")),
        "a server running with the test knobs says so"
    );
}

/// enforce, the only MX host is not in the policy's mx list (its certificate would even verify): deferred
/// with 4.7.5, nothing sent to it.
#[test]
fn enforce_refuses_an_mx_host_outside_the_policy() {
    let env = setup(
        "good.test",
        "mx.evil.test",
        "127.0.0.72",
        "127.0.0.82",
        ENFORCE,
    );
    let sink = env.ca_sink("127.0.0.72", "mx.evil.test");
    let s = Server::start(&env.config());
    // The sink's own readiness probe was a connection.
    let probes = sink.count("connections");
    send(&s, "x@good.test", "outside");
    let l = line_for(&s, "x@good.test", "deferred");
    assert_eq!(l["tls_policy"], "mta-sts-enforce", "{l}");
    assert_eq!(l["tls_result"], "validation-failure", "{l}");
    let reply = l["reply"].as_str().unwrap();
    assert!(
        reply.starts_with("4.7.5") && reply.contains("does not list MX host mx.evil.test"),
        "{reply}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sink.count("connections"), probes, "not even a connection");
    assert_eq!(sink.count("messages"), 0);
}

/// enforce, a listed MX host with a self-signed certificate: the TLS handshake fails, deferred with 4.7.5, no
/// plaintext fallback.
#[test]
fn enforce_refuses_a_self_signed_certificate() {
    let env = setup(
        "good.test",
        "mx2.good.test",
        "127.0.0.73",
        "127.0.0.83",
        ENFORCE,
    );
    let sink = Sink::start("127.0.0.73", env.port, &["--starttls"]); // self-signed
    let s = Server::start(&env.config());
    send(&s, "x@good.test", "self-signed");
    let l = line_for(&s, "x@good.test", "deferred");
    assert_eq!(l["tls_policy"], "mta-sts-enforce", "{l}");
    assert_eq!(l["tls_result"], "certificate-not-trusted", "{l}");
    let reply = l["reply"].as_str().unwrap();
    assert!(
        reply.starts_with("4.7.5") && reply.contains("TLS handshake failed"),
        "{reply}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        sink.count("messages"),
        0,
        "no plaintext fallback under enforce"
    );
}

/// testing: a self-signed certificate on a host outside the policy: delivered as usual, and the delivery log
/// line says what enforce would have refused; the event log warns.
#[test]
fn testing_mode_delivers_and_logs_what_would_have_failed() {
    let body = "version: STSv1\nmode: testing\nmx: *.good.test\nmax_age: 86400\n";
    let env = setup(
        "good.test",
        "mx.elsewhere.test",
        "127.0.0.74",
        "127.0.0.84",
        body,
    );
    let sink = Sink::start("127.0.0.74", env.port, &["--starttls"]); // self-signed
    let s = Server::start(&env.config());
    send(&s, "x@good.test", "testing");
    sink.wait_messages(1);
    let l = line_for(&s, "x@good.test", "delivered");
    assert_eq!(l["tls_policy"], "mta-sts-testing", "{l}");
    assert_eq!(
        l["tls_result"], "validation-failure",
        "testing records the would-be failure: {l}"
    );
    let why = l["tls_policy_failure"].as_str().unwrap_or_default();
    assert!(
        why.contains("mx.elsewhere.test is not in the policy") && why.contains("certificate"),
        "{l}"
    );
    wait_for(
        || {
            env.maillog()
                .iter()
                .any(|l| l.contains("MTA-STS testing: enforce would refuse mx.elsewhere.test"))
        },
        "the testing-mode warning",
    );
}

/// A policy the relay cannot use (served as text/html) is no policy: the mail goes as the level says (`may`),
/// even to a host a policy would not list.
#[test]
fn an_unusable_policy_is_no_policy() {
    let env = setup(
        "good.test",
        "mx.other.test",
        "127.0.0.75",
        "127.0.0.85",
        ENFORCE,
    );
    *env.policy.response.lock().unwrap() = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\r\n{ENFORCE}",
        ENFORCE.len()
    );
    let sink = Sink::start("127.0.0.75", env.port, &["--starttls"]);
    let s = Server::start(&env.config());
    send(&s, "x@good.test", "html");
    sink.wait_messages(1);
    assert_eq!(
        line_for(&s, "x@good.test", "delivered")["tls_policy"],
        "may"
    );
    assert_eq!(env.policy.requests(), 1, "the policy was asked for");
    // The failed fetch is not repeated for the next connection (same id, within a minute).
    std::thread::sleep(Duration::from_millis(1500));
    send(&s, "y@good.test", "html-2");
    sink.wait_messages(2);
    assert_eq!(
        line_for(&s, "y@good.test", "delivered")["tls_policy"],
        "may"
    );
    assert_eq!(env.policy.requests(), 1);
}

/// RFC 8461 section 5.1: a new `id` in the TXT record makes the relay fetch the policy again, in the
/// background, while the cached one stays in force; a failed fetch keeps the cached policy; a successful one
/// replaces it for the next connections.
#[test]
fn a_new_id_refetches_in_the_background_and_a_failed_fetch_keeps_the_cached_policy() {
    let env = setup(
        "good.test",
        "mx1.good.test",
        "127.0.0.76",
        "127.0.0.86",
        ENFORCE,
    );
    env.dns.set_ttl(1);
    let sink = env.ca_sink("127.0.0.76", "mx1.good.test");
    let s = Server::start(&env.config());
    let txt = "_mta-sts.good.test";
    send(&s, "a@good.test", "first");
    sink.wait_messages(1);
    assert_eq!(
        line_for(&s, "a@good.test", "delivered")["tls_policy"],
        "mta-sts-enforce"
    );
    assert_eq!(env.policy.requests(), 1);
    // A new id, and the policy server fails: the cached policy stays in force.
    env.dns.set_txt(txt, &["v=STSv1; id=2;"]);
    *env.policy.response.lock().unwrap() =
        "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n".into();
    std::thread::sleep(Duration::from_millis(1500)); // DNS TTL and pooled connection gone
    send(&s, "b@good.test", "second");
    sink.wait_messages(2);
    assert_eq!(
        line_for(&s, "b@good.test", "delivered")["tls_policy"],
        "mta-sts-enforce"
    );
    wait_for(|| env.policy.requests() == 2, "the background refetch");
    // Another id, and a testing policy now: fetched in the background, in force for the next connection.
    env.dns.set_txt(txt, &["v=STSv1; id=3;"]);
    *env.policy.response.lock().unwrap() =
        policy_response("version: STSv1\nmode: testing\nmx: *.good.test\nmax_age: 86400\n");
    std::thread::sleep(Duration::from_millis(1500));
    send(&s, "c@good.test", "third");
    sink.wait_messages(3);
    assert_eq!(
        line_for(&s, "c@good.test", "delivered")["tls_policy"],
        "mta-sts-enforce"
    );
    wait_for(|| env.policy.requests() == 3, "the background refetch");
    std::thread::sleep(Duration::from_millis(1500));
    send(&s, "d@good.test", "fourth");
    sink.wait_messages(4);
    assert_eq!(
        line_for(&s, "d@good.test", "delivered")["tls_policy"],
        "mta-sts-testing"
    );
    assert_eq!(env.policy.requests(), 3, "the same id is not fetched again");
}

/// DANE takes precedence over MTA-STS: an MX host outside the enforce policy but with validated, matching
/// TLSA records gets the mail, under `dane`.
#[test]
fn dane_takes_precedence_over_mta_sts() {
    let env = setup(
        "good.test",
        "mx.evil.test",
        "127.0.0.77",
        "127.0.0.87",
        ENFORCE,
    );
    let leaf = env.ca.leaf("mx.evil.test");
    let tlsa = format!("_{}._tcp.mx.evil.test", env.port);
    env.dns.add_tlsa(
        &tlsa,
        3,
        1,
        1,
        &shardmta::dane::association(leaf.der.as_ref(), 1, 1).unwrap(),
    );
    for n in ["good.test", "mx.evil.test", tlsa.as_str()] {
        env.dns.set_authentic(n, true);
    }
    let cert = write_file(env.dir.path(), "evil.crt", &leaf.cert_pem);
    let key = write_file(env.dir.path(), "evil.key", &leaf.key_pem);
    let sink = Sink::start(
        "127.0.0.77",
        env.port,
        &[
            "--starttls",
            "--tls-cert",
            &path_str(&cert),
            "--tls-key",
            &path_str(&key),
        ],
    );
    let s = Server::start(
        &env.config()
            .replace("[dns]\n", "[dns]\ndnssec = \"trust-ad\"\n"),
    );
    send(&s, "x@good.test", "dane-first");
    sink.wait_messages(1);
    assert_eq!(
        line_for(&s, "x@good.test", "delivered")["tls_policy"],
        "dane"
    );
}

/// The test knobs are refused unless SHARDMTA_TEST_KNOBS=1 is in the environment.
#[test]
fn test_knobs_need_the_environment_variable() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_file(
        dir.path(),
        "c.toml",
        &format!(
            "queue_directory = \"{}\"\n[mta_sts]\ntest_policy_port = 8443\n",
            path_str(&dir.path().join("spool"))
        ),
    );
    let run = |env: Option<&str>| {
        let mut c = std::process::Command::new(BIN);
        c.args(["check-config", "--config"]).arg(&cfg);
        match env {
            Some(v) => c.env("SHARDMTA_TEST_KNOBS", v),
            None => c.env_remove("SHARDMTA_TEST_KNOBS"),
        };
        c.output().unwrap()
    };
    for env in [None, Some("0"), Some("yes")] {
        let out = run(env);
        assert!(!out.status.success(), "{env:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("SHARDMTA_TEST_KNOBS=1"), "{err}");
    }
    let out = run(Some("1"));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("SHARDMTA_TEST_KNOBS"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Connections that need a domain's policy while its first fetch is under way wait for that fetch instead of
/// fetching it again: four messages delivered at once over four connections, one request at the (slow) policy
/// host, every delivery under enforce.
#[test]
fn concurrent_first_connections_fetch_the_policy_once() {
    let env = setup(
        "good.test",
        "mx1.good.test",
        "127.0.0.71",
        "127.0.0.81",
        ENFORCE,
    );
    env.policy
        .delay_ms
        .store(700, std::sync::atomic::Ordering::SeqCst);
    let sink = env.ca_sink("127.0.0.71", "mx1.good.test");
    let s = Server::start(&env.config());
    let rcpts = [
        "c1@good.test",
        "c2@good.test",
        "c3@good.test",
        "c4@good.test",
    ];
    for (i, r) in rcpts.iter().enumerate() {
        send(&s, r, &format!("concurrent-{i}"));
    }
    sink.wait_messages(4);
    for r in rcpts {
        assert_eq!(
            line_for(&s, r, "delivered")["tls_policy"],
            "mta-sts-enforce"
        );
    }
    assert_eq!(env.policy.requests(), 1, "one fetch for every connection");
}

/// Two domains share a site (the same MX host), one with an enforce policy. A connection opened for the domain
/// without a policy (opportunistic TLS, `may`) does not carry the enforce domain's mail: a connection is opened
/// under its policy. That one (verified TLS to a listed host) then carries the other domain's mail too. Without
/// the check the enforce domain's message went over the `may` connection.
#[test]
fn a_site_connection_carries_another_domain_only_when_it_meets_that_domains_policy() {
    let env = setup(
        "good.test",
        "mx1.good.test",
        "127.0.0.72",
        "127.0.0.82",
        ENFORCE,
    );
    env.dns.add_mx("plain.test", 10, "mx1.good.test");
    let sink = env.ca_sink("127.0.0.72", "mx1.good.test");
    let s = Server::start(&env.config().replace(
        "[delivery]\n",
        "[delivery]\ndestination_concurrency_limit = 1\n",
    ));
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO client.test");
    for (to, subject) in [
        ("x@plain.test", "site-1"),
        ("y@good.test", "site-2"),
        ("z@plain.test", "site-3"),
    ] {
        let r = c.send_mail(
            "a@client.test",
            &[to],
            &format!("Subject: {subject}\r\n\r\nb\r\n"),
        );
        assert!(r.starts_with("250"), "{r}");
        // One at a time, so the order of the site's queue is the order sent.
        sink.wait_messages(subject[5..].parse().unwrap());
    }
    c.cmd("QUIT");
    assert_eq!(
        line_for(&s, "x@plain.test", "delivered")["tls_policy"],
        "may"
    );
    let y = line_for(&s, "y@good.test", "delivered");
    assert_eq!(y["tls_policy"], "mta-sts-enforce", "{y}");
    let z = line_for(&s, "z@plain.test", "delivered");
    assert_eq!(
        z["tls_policy"], "mta-sts-enforce",
        "the enforce connection carries it: {z}"
    );
    let peer = |subject: &str| {
        sink.messages()
            .into_iter()
            .find(|m| m.contains(&format!("Subject: {subject}")))
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("X-Sink-Peer:"))
                    .map(str::to_string)
            })
            .unwrap()
    };
    assert_ne!(peer("site-1"), peer("site-2"));
    assert_eq!(peer("site-2"), peer("site-3"));
}
