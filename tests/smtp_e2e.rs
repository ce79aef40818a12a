//! End-to-end SMTP tests over real loopback sockets against a `shardmta serve` process.

mod common;

use common::*;
use std::time::{Duration, Instant};

const MSG: &str = "Subject: test\r\nMessage-ID: <t1@client.test>\r\n\r\nHello\r\n..leading dot\r\n";

#[test]
fn whole_session_is_queued_with_received_header_and_data() {
    let s = Server::start("");
    let mut c = Client::greeted(s.smtp);
    let ehlo = c.cmd("EHLO client.test");
    for kw in [
        "PIPELINING",
        "SIZE 10240000",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "STARTTLS",
    ] {
        assert!(ehlo.contains(kw), "{kw} missing from {ehlo}");
    }
    let id = queued_id(&c.send_mail(
        "sender@client.test",
        &["bob@remote.example", "alice@localhost"],
        MSG,
    ));
    assert!(c.cmd("QUIT").starts_with("221 2.0.0"));
    let q = s.queue();
    let m = q
        .iter()
        .find(|m| m["id"] == id.as_str())
        .expect("message listed");
    assert_eq!(m["sender"], "sender@client.test");
    let rcpts: Vec<_> = m["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["address"].as_str().unwrap(), r["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        rcpts,
        vec![
            ("bob@remote.example", "pending"),
            ("alice@localhost", "pending")
        ]
    );
    let stored = String::from_utf8(s.queue_cat(&id)).unwrap();
    assert!(
        stored.starts_with("Received: from client.test ([127.0.0.1])"),
        "{stored}"
    );
    assert!(stored.contains(&format!("with ESMTP id {id}")), "{stored}");
    assert!(
        stored.ends_with("\r\n\r\nHello\r\n.leading dot\r\n"),
        "dot-unstuffed data kept exactly: {stored:?}"
    );
    // The 221 and the FIN share a segment: SYN-ACK, greeting, the ACK of QUIT, 221 + FIN.
    assert_eq!(segments_in_quit_session(s.smtp), 4);
}

#[test]
fn pipelined_batch_is_answered_in_order() {
    let s = Server::start("");
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO client.test");
    let mut batch = String::new();
    for i in 0..5 {
        batch.push_str(&format!("MAIL FROM:<a@client.test>\r\nRCPT TO:<b{i}@localhost>\r\nRCPT TO:<x@remote.example>\r\nDATA\r\nSubject: {i}\r\n\r\nbody {i}\r\n.\r\n"));
    }
    batch.push_str("QUIT\r\n");
    c.send(batch.as_bytes());
    for _ in 0..5 {
        assert!(c.reply().starts_with("250 2.1.0"));
        assert!(c.reply().starts_with("250 2.1.5"));
        assert!(c.reply().starts_with("250 2.1.5"));
        assert!(c.reply().starts_with("354"));
        queued_id(&c.reply());
    }
    assert!(c.reply().starts_with("221"));
    assert_eq!(s.queue().len(), 5);
}

#[test]
fn bdat_chunking() {
    let s = Server::start("");
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<a@client.test>");
    c.cmd("RCPT TO:<b@localhost>");
    c.send(b"BDAT 10\r\nSubject: x");
    assert_eq!(c.reply(), "250 2.0.0 10 octets received\r\n");
    c.send(b"BDAT 8 LAST\r\n\r\n\r\nbody");
    let id = queued_id(&c.reply());
    assert!(String::from_utf8(s.queue_cat(&id))
        .unwrap()
        .ends_with("Subject: x\r\n\r\nbody"));
}

#[test]
fn starttls_then_auth_on_submission() {
    let s = Server::start("");
    let mut c = Client::greeted(s.submission);
    let e = c.cmd("EHLO client.test");
    assert!(e.contains("STARTTLS") && !e.contains("AUTH"), "{e}");
    assert!(c.cmd("MAIL FROM:<a@client.test>").starts_with("530 5.7.0"));
    assert!(c
        .cmd(&format!("AUTH PLAIN {}", b64("\0alice\0secret")))
        .starts_with("538 5.7.11"));
    let mut c = c.starttls();
    let e = c.cmd("EHLO client.test");
    assert!(
        e.contains("AUTH PLAIN LOGIN") && !e.contains("STARTTLS"),
        "{e}"
    );
    assert!(c
        .cmd("MAIL FROM:<a@client.test>")
        .starts_with("530 5.7.0 Authentication required"));
    assert!(c
        .cmd(&format!("AUTH PLAIN {}", b64("\0alice\0wrong")))
        .starts_with("535 5.7.8"));
    assert!(c
        .cmd(&format!("AUTH PLAIN {}", b64("\0nobody\0secret")))
        .starts_with("535 5.7.8"));
    assert!(c.cmd("AUTH LOGIN").starts_with("334 VXNlcm5hbWU6"));
    assert!(c.cmd(&b64("alice")).starts_with("334 UGFzc3dvcmQ6"));
    assert!(c.cmd(&b64("secret")).starts_with("235 2.7.0"));
    // Authenticated: may relay anywhere.
    let id = queued_id(&c.send_mail("alice@client.test", &["someone@far.example"], MSG));
    let stored = String::from_utf8(s.queue_cat(&id)).unwrap();
    assert!(
        stored.contains("with ESMTPSA id")
            && stored.contains("(Authenticated sender: alice)")
            && stored.contains("using TLSv1.3"),
        "{stored}"
    );
}

#[test]
fn implicit_tls_submissions_requires_auth() {
    let s = Server::start("");
    let mut c = Client::tls(s.submissions);
    assert!(c.reply().starts_with("220 "));
    let e = c.cmd("EHLO client.test");
    assert!(
        e.contains("AUTH PLAIN LOGIN") && !e.contains("STARTTLS"),
        "{e}"
    );
    assert!(c.cmd("MAIL FROM:<a@client.test>").starts_with("530 5.7.0"));
    assert!(c
        .cmd(&format!("AUTH PLAIN {}", b64("\0alice\0secret")))
        .starts_with("235"));
    queued_id(&c.send_mail("alice@client.test", &["x@far.example"], MSG));
}

#[test]
fn plaintext_after_starttls_is_not_executed() {
    let s = Server::start("");
    let mut raw = std::net::TcpStream::connect(s.smtp).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    use std::io::{Read, Write};
    let mut buf = [0u8; 512];
    let n = raw.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"220 "));
    raw.write_all(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<evil@client.test>\r\n")
        .unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    raw.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    while Instant::now() < deadline {
        match raw.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    let got = String::from_utf8_lossy(&got);
    assert!(got.contains("220 2.0.0 Ready to start TLS"), "{got}");
    assert!(!got.contains("2.1.0"), "injected MAIL was answered: {got}");
}

#[test]
fn relay_denied_in_every_form_for_strangers() {
    // Loopback is not in mynetworks here, so the client is a stranger.
    let s = Server::start("mynetworks = [\"192.0.2.0/24\"]\nrelay_domains = [\"relay.example\"]\n");
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO client.test");
    assert!(c.cmd("MAIL FROM:<a@client.test>").starts_with("250"));
    for rcpt in [
        "<x@remote.example>",
        "<x%remote.example@localhost>",
        "<remote.example!x@localhost>",
        "<\"x@remote.example\"@localhost>",
        "<\"x%remote.example\"@localhost>",
        "<@localhost:x@remote.example>",
        "<@localhost,@relay.example:x@remote.example>",
        "<x@[192.0.2.1]>",
        "<x@remote.example.>",
    ] {
        let r = c.cmd(&format!("RCPT TO:{rcpt}"));
        assert_eq!(r, "554 5.7.1 Relay access denied\r\n", "{rcpt}");
    }
    assert!(c
        .cmd("RCPT TO:<x@remote.example@localhost>")
        .starts_with("501 5.1.3"));
    assert!(c.cmd("RCPT TO:<x@relay.example>").starts_with("250 2.1.5"));
    assert!(c.cmd("RCPT TO:<x@localhost>").starts_with("250 2.1.5"));
    assert!(c.cmd("RCPT TO:<Postmaster>").starts_with("250 2.1.5"));
}

#[test]
fn smuggling_attempts_stay_inside_one_message() {
    let s = Server::start("");
    for smuggle in ["\n.\r\n", "\r\n.\n", "\n.\n", "\r.\r", "\r.\r\n"] {
        let mut c = Client::greeted(s.smtp);
        c.cmd("EHLO client.test");
        c.cmd("MAIL FROM:<a@client.test>");
        c.cmd("RCPT TO:<b@localhost>");
        assert!(c.cmd("DATA").starts_with("354"));
        let body = format!("Subject: s\r\n\r\nfirst{smuggle}MAIL FROM:<evil@client.test>\r\nRCPT TO:<victim@localhost>\r\nDATA\r\nevil\r\n.\r\n");
        c.send(body.as_bytes());
        let id = queued_id(&c.reply());
        assert!(
            c.cmd("NOOP").starts_with("250 2.0.0"),
            "exactly one reply for one message ({smuggle:?})"
        );
        let stored = String::from_utf8(s.queue_cat(&id)).unwrap();
        assert!(
            stored.contains("MAIL FROM:<evil@client.test>"),
            "smuggled text is content: {stored:?}"
        );
    }
    assert_eq!(s.queue().len(), 5);
}

#[test]
fn bare_newline_reject_mode_disconnects() {
    let s = Server::start("smtpd_forbid_bare_newline = \"reject\"\n");
    let mut c = Client::greeted(s.smtp);
    c.send(b"EHLO c\n");
    assert_eq!(c.reply(), "521 5.5.2 Error: bare <CR> or <LF> received\r\n");
    assert_eq!(c.reply(), "", "connection closed");
}

#[test]
fn size_limit_enforced_while_streaming() {
    let s = Server::start("message_size_limit = 20000\n");
    let mut c = Client::greeted(s.smtp);
    assert!(c.cmd("EHLO c").contains("SIZE 20000"));
    assert!(c
        .cmd("MAIL FROM:<a@client.test> SIZE=20001")
        .starts_with("552 5.3.4"));
    c.cmd("MAIL FROM:<a@client.test>");
    c.cmd("RCPT TO:<b@localhost>");
    c.cmd("DATA");
    let line = format!("{}\r\n", "x".repeat(998));
    for _ in 0..100 {
        c.send(line.as_bytes());
    }
    c.send(b".\r\n");
    assert!(c.reply().starts_with("552 5.3.4"));
    assert!(c.cmd("NOOP").starts_with("250"));
    assert!(s.queue().is_empty());
}

#[test]
fn recipient_limit_line_limit_and_error_limit() {
    let s = Server::start("smtpd_recipient_limit = 2\nsmtpd_hard_error_limit = 5\n");
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO c");
    c.cmd("MAIL FROM:<a@client.test>");
    assert!(c.cmd("RCPT TO:<b@localhost>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<c@localhost>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<d@localhost>").starts_with("452 4.5.3"));
    assert!(c
        .cmd(&format!("NOOP {}", "y".repeat(5000)))
        .starts_with("500 5.5.2 Error: line too long"));
    for _ in 0..2 {
        assert!(c.cmd("BOGUS").starts_with("500 5.5.2"));
    }
    // The fifth error reply is followed by the 421 and the close.
    assert!(c.cmd("BOGUS").starts_with("500 5.5.2"));
    assert_eq!(c.reply(), "421 4.7.0 Error: too many errors\r\n");
    assert_eq!(c.reply(), "");
}

#[test]
fn idle_timeout_gives_421() {
    let s = Server::start("smtpd_timeout = \"1s\"\n");
    let mut c = Client::greeted(s.smtp);
    let t = Instant::now();
    assert_eq!(c.reply(), "421 4.4.2 Error: timeout exceeded\r\n");
    assert!(t.elapsed() >= Duration::from_millis(900));
}

#[test]
fn connection_limits_per_client() {
    let s = Server::start("smtpd_client_connection_count_limit = 2\nshards = 1\n");
    let _a = Client::greeted(s.smtp);
    let _b = Client::greeted(s.smtp);
    let mut c = Client::connect(s.smtp);
    assert_eq!(
        c.reply(),
        "421 4.7.0 Error: too many connections from your address\r\n"
    );
    drop(_a);
    wait_for(
        || {
            let mut d = Client::connect(s.smtp);
            d.reply().starts_with("220")
        },
        "a slot to free up",
    );
}

#[test]
fn sigterm_lets_idle_sessions_go_with_421_and_exits_0() {
    let mut s = Server::start("");
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO c");
    let st = s.terminate();
    assert!(st.success(), "{st}");
    assert_eq!(
        c.reply(),
        "421 4.3.2 Service shutting down, closing connection\r\n"
    );
}

#[test]
fn queue_survives_restart() {
    let mut s = Server::start("");
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO c");
    let id = queued_id(&c.send_mail("a@client.test", &["b@localhost"], MSG));
    drop(c);
    assert!(s.terminate().success());
    s.spawn();
    assert!(s.queue().iter().any(|m| m["id"] == id.as_str()));
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO c");
    let id2 = queued_id(&c.send_mail("a@client.test", &["b@localhost"], MSG));
    assert_ne!(id, id2);
}

#[test]
fn failed_auth_is_slowed_down_more_each_time() {
    let s = Server::start("smtpd_auth_failure_delay = \"1s\"\n");
    let mut c = Client::tls(s.submissions);
    c.reply();
    c.cmd("EHLO c");
    let wrong = format!("AUTH PLAIN {}", b64("\0alice\0wrong"));
    let t = Instant::now();
    assert!(c.cmd(&wrong).starts_with("535 5.7.8"));
    let first = t.elapsed();
    let t = Instant::now();
    assert!(c.cmd(&wrong).starts_with("535 5.7.8"));
    let second = t.elapsed();
    assert!(first >= Duration::from_millis(950), "{first:?}");
    assert!(second >= Duration::from_millis(1950), "{second:?}");
    // A right password is not delayed.
    let t = Instant::now();
    assert!(c
        .cmd(&format!("AUTH PLAIN {}", b64("\0alice\0secret")))
        .starts_with("235"));
    assert!(t.elapsed() < Duration::from_millis(900));
}
