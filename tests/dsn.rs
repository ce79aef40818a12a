//! The DSN extension (RFC 3461) and delay warnings (RFC 3464) end to end: shardmta relays to sinks on
//! 127.0.0.6x with MX records from a DNS responder the test starts; reports go to a sink for the sender's
//! domain. Nothing leaves the loopback network.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use common::*;
use shardmta::dns::testserver::TestDns;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// One transaction with the given MAIL and RCPT parameters; returns the queue id.
fn send_with(s: &Server, mail: &str, rcpts: &[&str], subject: &str) -> String {
    let mut c = Client::greeted(s.smtp);
    let r = c.cmd("EHLO client.test");
    assert!(
        r.contains("250-DSN\r\n") || r.contains("250 DSN\r\n"),
        "{r}"
    );
    let r = c.cmd(&format!("MAIL FROM:{mail}"));
    assert!(r.starts_with("250"), "MAIL {mail}: {r}");
    for t in rcpts {
        let r = c.cmd(&format!("RCPT TO:{t}"));
        assert!(r.starts_with("250"), "RCPT {t}: {r}");
    }
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(
        format!("Subject: {subject}\r\nMessage-ID: <{subject}@client.test>\r\n\r\nbody of {subject}\r\n.\r\n")
            .as_bytes(),
    );
    let id = queued_id(&c.reply());
    c.cmd("QUIT");
    id
}

/// The per-message and per-recipient fields of a report's message/delivery-status part, parsed by Python's
/// `email` module (an independent MIME parser): one line `envid=...` then one line per recipient
/// `original|final|action|status`, plus `returned=<content type of the third part>` and `body=<0|1>` (whether
/// the returned part holds the original's body line).
fn parse_report(saved: &str) -> Vec<String> {
    // The sink's X-Sink-* trace lines come before the message itself.
    let msg: String = saved
        .split_inclusive("\r\n")
        .skip_while(|l| l.starts_with("X-Sink-"))
        .collect();
    let script = r#"
import email, sys
m = email.message_from_bytes(sys.stdin.buffer.read())
assert m.get_content_type() == 'multipart/report', m.get_content_type()
assert m.get_param('report-type') == 'delivery-status'
parts = m.get_payload()
ds = parts[1]
assert ds.get_content_type() == 'message/delivery-status'
blocks = ds.get_payload()
print('envid=%s' % blocks[0].get('Original-Envelope-Id', ''))
for b in blocks[1:]:
    print('%s|%s|%s|%s' % (b.get('Original-Recipient', ''), b.get('Final-Recipient'), b.get('Action'), b.get('Status')))
ret = parts[2]
print('returned=%s' % ret.get_content_type())
print('body=%d' % (b'body of' in ret.as_bytes()))
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(msg.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python: {}\n{msg}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// (1) A next hop that offers DSN gets RET/ENVID on MAIL and NOTIFY/ORCPT on RCPT, re-encoded as xtext, and
/// no "relayed" report is made here (the next hop reports).
#[test]
fn dsn_parameters_are_passed_to_a_next_hop_that_offers_dsn() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("dsn.test", 10, "mx.dsn.test");
    dns.add_a("mx.dsn.test", ip("127.0.0.61"));
    dns.add_mx("client.test", 10, "mx.client.test");
    dns.add_a("mx.client.test", ip("127.0.0.62"));
    let next = RecordingSink::start("127.0.0.61", port, true);
    let reports = Sink::start("127.0.0.62", port, &[]);
    let s = Server::start(&relay_config(port, &dns, "", ""));
    let id = send_with(
        &s,
        "<a@client.test> RET=HDRS ENVID=env+2B1",
        &[
            "<bob@dsn.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob+2Bx+40dsn.test",
            "<carol@dsn.test>",
        ],
        "pass",
    );
    next.wait_messages(1);
    wait_gone(&s, &id);
    let lines = next.lines();
    let mail: Vec<&String> = lines.iter().filter(|l| l.starts_with("MAIL")).collect();
    assert_eq!(mail.len(), 1, "{lines:?}");
    assert!(mail[0].ends_with(" RET=HDRS ENVID=env+2B1"), "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l
                == "RCPT TO:<bob@dsn.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob+2Bx@dsn.test"),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l == "RCPT TO:<carol@dsn.test>"),
        "{lines:?}"
    );
    // No success report from here: the next hop got NOTIFY=SUCCESS.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(reports.count("messages"), 0, "{:?}", reports.messages());
}

/// (2) A next hop without DSN: no parameters are sent to it, and the sender gets a "relayed" report (RFC 3461
/// 5.2.3) for the recipient with NOTIFY=SUCCESS only, with the ENVID and ORCPT in it.
#[test]
fn relayed_report_for_a_next_hop_without_dsn() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("plain.test", 10, "mx.plain.test");
    dns.add_a("mx.plain.test", ip("127.0.0.63"));
    dns.add_mx("client.test", 10, "mx.client.test");
    dns.add_a("mx.client.test", ip("127.0.0.64"));
    let next = RecordingSink::start("127.0.0.63", port, false);
    let reports = Sink::start("127.0.0.64", port, &[]);
    let s = Server::start(&relay_config(port, &dns, "", ""));
    let id = send_with(
        &s,
        "<a@client.test> ENVID=QQ314",
        &[
            "<bob@plain.test> NOTIFY=SUCCESS ORCPT=rfc822;orig+2Bx@plain.test",
            "<carol@plain.test>",
        ],
        "relay",
    );
    next.wait_messages(1);
    wait_gone(&s, &id);
    let lines = next.lines();
    assert!(
        lines.iter().any(|l| l == "MAIL FROM:<a@client.test>")
            && lines.iter().any(|l| l == "RCPT TO:<bob@plain.test>"),
        "no DSN parameters to a host without DSN: {lines:?}"
    );
    reports.wait_messages(1);
    let r = &reports.messages()[0];
    assert!(r.contains("X-Sink-Mail-From: <>\r\n"), "{r}");
    assert!(r.contains("X-Sink-Rcpt-To: <a@client.test>\r\n"), "{r}");
    assert!(
        r.contains("Subject: Successful Mail Delivery Report"),
        "{r}"
    );
    let fields = parse_report(r);
    assert_eq!(
        fields,
        [
            "envid=QQ314",
            "rfc822;orig+x@plain.test|rfc822; bob@plain.test|relayed|2.0.0",
            "returned=text/rfc822-headers",
            "body=0",
        ],
        "{r}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(reports.count("messages"), 1, "one report only");
}

/// (3) NOTIFY=NEVER: a permanently failing recipient gets no bounce; NOTIFY=FAILURE beside it does.
#[test]
fn notify_never_gets_no_bounce() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("never.test", 10, "mx.never.test");
    dns.add_a("mx.never.test", ip("127.0.0.65"));
    dns.add_mx("client.test", 10, "mx.client.test");
    dns.add_a("mx.client.test", ip("127.0.0.66"));
    let _next = Sink::start("127.0.0.65", port, &[]);
    let reports = Sink::start("127.0.0.66", port, &[]);
    let s = Server::start(&relay_config(port, &dns, "", ""));
    let id = send_with(
        &s,
        "<a@client.test>",
        &["<permfail-1@never.test> NOTIFY=NEVER"],
        "never",
    );
    wait_gone(&s, &id);
    let id = send_with(
        &s,
        "<a@client.test>",
        &[
            "<permfail-2@never.test> NOTIFY=NEVER",
            "<permfail-3@never.test> NOTIFY=FAILURE",
        ],
        "mixed",
    );
    wait_gone(&s, &id);
    reports.wait_messages(1);
    std::thread::sleep(Duration::from_millis(1000));
    let all = reports.messages();
    assert_eq!(all.len(), 1, "{all:?}");
    let fields = parse_report(&all[0]);
    assert_eq!(fields[0], "envid=");
    assert_eq!(
        fields[1..fields.len() - 2],
        ["|rfc822; permfail-3@never.test|failed|5.1.1"],
        "{all:?}"
    );
    assert!(all[0].contains("Subject: mixed"), "{all:?}");
}

/// (4) RET=HDRS: the bounce returns the header section only; without RET the whole message comes back.
#[test]
fn ret_hdrs_bounce_has_no_body() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("ret.test", 10, "mx.ret.test");
    dns.add_a("mx.ret.test", ip("127.0.0.67"));
    dns.add_mx("client.test", 10, "mx.client.test");
    dns.add_a("mx.client.test", ip("127.0.0.68"));
    let _next = Sink::start("127.0.0.67", port, &[]);
    let reports = Sink::start("127.0.0.68", port, &[]);
    let s = Server::start(&relay_config(port, &dns, "", ""));
    send_with(
        &s,
        "<a@client.test> RET=HDRS",
        &["<permfail@ret.test>"],
        "hdrs",
    );
    send_with(&s, "<a@client.test>", &["<permfail@ret.test>"], "full");
    reports.wait_messages(2);
    let all = reports.messages();
    let hdrs = all.iter().find(|m| m.contains("Subject: hdrs")).unwrap();
    let full = all.iter().find(|m| m.contains("Subject: full")).unwrap();
    let f = parse_report(hdrs);
    assert_eq!(
        f[f.len() - 2..],
        ["returned=text/rfc822-headers", "body=0"],
        "{hdrs}"
    );
    assert!(!hdrs.contains("body of hdrs"), "{hdrs}");
    let f = parse_report(full);
    assert_eq!(
        f[f.len() - 2..],
        ["returned=message/rfc822", "body=1"],
        "{full}"
    );
    assert!(full.contains("body of full"), "{full}");
}

/// (5) delay_warning_time: a recipient the next hop keeps answering 451 gets exactly one "delayed" report
/// (with Will-Retry-Until), not repeated by later deferrals nor by a restart, then the bounce when the message
/// expires.
#[test]
fn one_delay_warning_then_the_final_bounce() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("slow.test", 10, "mx.slow.test");
    dns.add_a("mx.slow.test", ip("127.0.0.69"));
    dns.add_mx("client.test", 10, "mx.client.test");
    dns.add_a("mx.client.test", ip("127.0.0.70"));
    let _next = Sink::start("127.0.0.69", port, &[]);
    let reports = Sink::start("127.0.0.70", port, &[]);
    let mut s = Server::start(&relay_config(
        port,
        &dns,
        "",
        "delay_warning_time = \"2s\"\nmaximal_queue_lifetime = \"7s\"\n",
    ));
    let id = send_with(
        &s,
        "<a@client.test> ENVID=slow-1",
        &[
            "<tempfail-1@slow.test>",
            "<tempfail-2@slow.test> NOTIFY=FAILURE",
        ],
        "slow",
    );
    reports.wait_messages(1);
    let first = reports.messages();
    assert_eq!(first.len(), 1);
    let d = &first[0];
    assert!(
        d.contains("Subject: Delayed Mail (still being retried)"),
        "{d}"
    );
    assert!(d.contains("Will-Retry-Until: "), "{d}");
    assert_eq!(
        parse_report(d),
        [
            "envid=slow-1",
            "|rfc822; tempfail-1@slow.test|delayed|4.3.0",
            "returned=text/rfc822-headers",
            "body=0",
        ],
        "NOTIFY=FAILURE leaves tempfail-2 out: {d}"
    );
    // The queue shows the DSN facts and the warning's mark.
    wait_for(
        || {
            s.queue()
                .iter()
                .any(|m| m["id"] == id.as_str() && m["delay_warned"] == true)
        },
        "delay_warned in queue list",
    );
    let q = s.queue();
    let m = q.iter().find(|m| m["id"] == id.as_str()).unwrap();
    assert_eq!(m["dsn_envid"], "slow-1", "{m}");
    assert_eq!(m["recipients"][1]["notify"], "FAILURE", "{m}");
    assert!(m["recipients"][0].get("notify").is_none(), "{m}");
    let out = s.cli(&["queue", "cat", &id]);
    let cat = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        cat.contains("dsn_envid: slow-1\n") && cat.contains("delay_warned: yes\n"),
        "{cat}"
    );
    // A restart and more deferrals send no second warning; the message then expires and bounces.
    s.terminate();
    s.spawn();
    wait_gone(&s, &id);
    reports.wait_messages(2);
    std::thread::sleep(Duration::from_millis(1000));
    let all = reports.messages();
    assert_eq!(all.len(), 2, "{all:?}");
    let b = all.iter().find(|m| !m.contains("Delayed Mail")).unwrap();
    let f = parse_report(b);
    assert_eq!(f[0], "envid=slow-1");
    let mut rcpts = f[1..3].to_vec();
    rcpts.sort();
    assert_eq!(
        rcpts,
        [
            "|rfc822; tempfail-1@slow.test|failed|4.4.7",
            "|rfc822; tempfail-2@slow.test|failed|4.4.7",
        ],
        "{b}"
    );
}

/// (6) Bad DSN parameters get 501 5.5.4 naming the rule; the session goes on.
#[test]
fn bad_dsn_parameters_get_501() {
    let s = Server::start("");
    let mut c = Client::greeted(s.smtp);
    let r = c.cmd("EHLO client.test");
    assert!(r.contains("DSN\r\n"), "{r}");
    for (cmd, want) in [
        (
            "MAIL FROM:<a@client.test> RET=FULL RET=HDRS",
            "501 5.5.4 Duplicate RET parameter",
        ),
        (
            "MAIL FROM:<a@client.test> RET=BODY",
            "501 5.5.4 RET must be FULL or HDRS",
        ),
        (
            "MAIL FROM:<a@client.test> ENVID=a+0Db",
            "501 5.5.4 ENVID decodes to a control or non-ASCII character",
        ),
    ] {
        let r = c.cmd(cmd);
        assert!(r.starts_with(want), "{cmd}: {r}");
    }
    let long = format!("MAIL FROM:<a@client.test> ENVID={}", "x".repeat(101));
    assert!(c
        .cmd(&long)
        .starts_with("501 5.5.4 ENVID longer than 100 characters"));
    assert!(c
        .cmd("MAIL FROM:<a@client.test> RET=HDRS ENVID=ok")
        .starts_with("250"));
    for (cmd, want) in [
        (
            "RCPT TO:<b@localhost> NOTIFY=NEVER,SUCCESS",
            "501 5.5.4 NOTIFY=NEVER must not be combined with other values",
        ),
        (
            "RCPT TO:<b@localhost> NOTIFY=SOMETIMES",
            "501 5.5.4 NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY",
        ),
        (
            "RCPT TO:<b@localhost> NOTIFY=DELAY NOTIFY=DELAY",
            "501 5.5.4 Duplicate NOTIFY parameter",
        ),
        (
            "RCPT TO:<b@localhost> ORCPT=b@localhost",
            "501 5.5.4 ORCPT must be addr-type;xtext",
        ),
        (
            "RCPT TO:<b@localhost> ORCPT=rfc822;b=c",
            "501 5.5.4 malformed xtext in ORCPT",
        ),
        ("RCPT TO:<b@localhost> FOO=1", "555 5.5.4"),
    ] {
        let r = c.cmd(cmd);
        assert!(r.starts_with(want), "{cmd}: {r}");
    }
    let long = format!("RCPT TO:<b@localhost> ORCPT=rfc822;{}", "x".repeat(494));
    assert!(c
        .cmd(&long)
        .starts_with("501 5.5.4 ORCPT longer than 500 characters"));
    c.cmd("QUIT");
}

/// (7) An alias expanded into several recipients (a mailing list, RFC 3461 6.2.7.3) with NOTIFY=SUCCESS: one
/// "expanded" report on the address the client gave, made at acceptance, naming no member; the members lose
/// SUCCESS (two local mailboxes get no "delivered" report, the forwarded member's RCPT to a DSN-capable next hop
/// carries no SUCCESS). An alias of one address (6.2.7.1) keeps today's "delivered" report on the final address
/// with the alias as its Original-Recipient.
#[test]
fn expanded_report_for_an_alias_with_several_members() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.53")));
    dns.add_mx("client.test", 10, "mx.client.test");
    dns.add_a("mx.client.test", ip("127.0.0.72"));
    dns.add_mx("fwd.test", 10, "mx.fwd.test");
    dns.add_a("mx.fwd.test", ip("127.0.0.73"));
    let reports = Sink::start("127.0.0.72", port, &[]);
    let next = RecordingSink::start("127.0.0.73", port, true);
    let dir = tempfile::tempdir().unwrap();
    let aliases = dir.path().join("aliases");
    std::fs::write(&aliases, "team: alice, bob, dave@fwd.test\nsolo: carol\n").unwrap();
    let top = format!(
        "mydestination = [\"localhost\"]\nalias_maps = [\"{}\"]\n",
        aliases.display()
    );
    let cfg = relay_config(port, &dns, "", &top);
    let s = Server::start_in(
        dir,
        &format!("{cfg}\n[local]\nusers = [\"alice\", \"bob\", \"carol\"]\nsystem_users = false\n"),
    );
    let id = send_with(
        &s,
        "<a@client.test> ENVID=loc",
        &[
            "<team@localhost> NOTIFY=SUCCESS,FAILURE",
            "<solo@localhost> NOTIFY=SUCCESS",
        ],
        "local",
    );
    next.wait_messages(1);
    wait_gone(&s, &id);
    reports.wait_messages(2);
    // Nothing more comes (the members' deliveries report nothing).
    std::thread::sleep(Duration::from_millis(1500));
    let all = reports.messages();
    assert_eq!(all.len(), 2, "{all:#?}");
    let expanded: Vec<&String> = all
        .iter()
        .filter(|m| m.contains("Action: expanded"))
        .collect();
    assert_eq!(expanded.len(), 1, "{all:#?}");
    let e = expanded[0];
    assert_eq!(
        parse_report(e),
        [
            "envid=loc",
            "|rfc822; team@localhost|expanded|2.0.0",
            "returned=text/rfc822-headers",
            "body=0",
        ],
        "{e}"
    );
    for member in ["alice", "bob", "dave@fwd.test", "carol"] {
        assert!(!e.contains(member), "{member} in the expanded report: {e}");
    }
    assert!(e.contains("X-Sink-Mail-From: <>\r\n"), "{e}");
    let delivered = all
        .iter()
        .find(|m| !m.contains("Action: expanded"))
        .unwrap();
    assert_eq!(
        parse_report(delivered)[1..],
        [
            "rfc822;solo@localhost|rfc822; carol@localhost|delivered|2.0.0",
            "returned=text/rfc822-headers",
            "body=0",
        ],
        "{delivered}"
    );
    let lines = next.lines();
    let rcpt: Vec<&String> = lines.iter().filter(|l| l.starts_with("RCPT")).collect();
    assert_eq!(
        rcpt,
        ["RCPT TO:<dave@fwd.test> NOTIFY=FAILURE ORCPT=rfc822;team@localhost"],
        "{lines:?}"
    );
}
