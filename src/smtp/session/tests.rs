use super::*;
use crate::config::Config;

/// The verdicts the harness gives at RCPT: mydestination localhost (any user), relay_domains relay.example.
fn check() -> crate::policy::RecipientCheck {
    let c = Arc::new(Config {
        mydestination: vec!["localhost".into()],
        relay_domains: vec!["relay.example".into()],
        local: crate::config::LocalConfig {
            accept_unknown_users: true,
            system_users: false,
            ..Default::default()
        },
        ..Config::default()
    });
    crate::policy::RecipientCheck::new(
        Arc::new(crate::policy::RelayPolicy::new(&c)),
        Arc::new(crate::local::recipients::RecipientTable::load(c).unwrap()),
    )
}

fn cfg(kind: ListenerKind) -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        hostname: "mx.test".into(),
        kind,
        message_size_limit: 1000,
        recipient_limit: 3,
        hard_error_limit: 20,
        line_length_limit: 600,
        bare_newline: BareNewline::Normal,
        smtp_line_length_limit: 998,
        tls_available: true,
        auth_available: true,
        allow_plaintext_auth: false,
    })
}

struct Harness {
    s: Session,
    check: crate::policy::RecipientCheck,
    out: Vec<u8>,
    pending: Vec<u8>,
}

impl Harness {
    fn new(kind: ListenerKind, ip: &str) -> Self {
        Self::with_config(cfg(kind), ip)
    }

    fn with_config(cfg: Arc<SessionConfig>, ip: &str) -> Self {
        let ip: std::net::IpAddr = ip.parse().unwrap();
        let check = check();
        Harness {
            s: Session::new(cfg, ip, check.policy.in_mynetworks(ip)),
            check,
            out: Vec::new(),
            pending: Vec::new(),
        }
    }

    /// An `smtp` listener's session with `smtpd_forbid_bare_newline = reject`, from 127.0.0.1.
    fn rejecting_bare_newlines() -> Self {
        let mut c = (*cfg(ListenerKind::Smtp)).clone();
        c.bare_newline = BareNewline::Reject;
        Self::with_config(Arc::new(c), "127.0.0.1")
    }

    /// Feeds bytes; returns the replies written and the last action. Messages are "queued" as Q1, Q2...
    fn send(&mut self, bytes: &[u8]) -> (String, Action) {
        self.pending.extend_from_slice(bytes);
        let mut queued = 0;
        loop {
            let (n, act) = self.s.feed(&self.pending, &mut self.out);
            self.pending.drain(..n);
            match act {
                Action::Message => {
                    queued += 1;
                    let id = format!("Q{queued}");
                    let a = self.s.message_done(Ok(&id), &mut self.out);
                    if a != Action::NeedMore {
                        return (self.take(), a);
                    }
                }
                Action::Recipient(req) => {
                    let v = self.check.check(req, self.s.targets_mut());
                    let a = self.s.rcpt_result(v, &mut self.out);
                    if a != Action::NeedMore {
                        return (self.take(), a);
                    }
                }
                Action::Authenticate { user, password } => {
                    let ok = (password == "secret").then_some(user);
                    let a = self.s.auth_result(ok, &mut self.out);
                    if a != Action::NeedMore {
                        return (self.take(), a);
                    }
                }
                other => return (self.take(), other),
            }
        }
    }

    fn take(&mut self) -> String {
        String::from_utf8(std::mem::take(&mut self.out)).unwrap()
    }
}

fn codes(replies: &str) -> Vec<&str> {
    replies
        .lines()
        .filter(|l| l.as_bytes().get(3) == Some(&b' '))
        .map(|l| &l[..l.len().min(9)])
        .collect()
}

#[test]
fn whole_session_pipelined_in_one_batch() {
    let mut h = Harness::new(ListenerKind::Smtp, "192.0.2.1");
    let (r, a) = h.send(b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\nRCPT TO:<bob@localhost>\r\nDATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n");
    assert_eq!(a, Action::Close);
    assert!(
        r.contains("250-PIPELINING\r\n")
            && r.contains("250-SIZE 1000\r\n")
            && r.contains("250-STARTTLS\r\n")
    );
    assert!(!r.contains("AUTH"), "no AUTH offered before TLS: {r}");
    assert_eq!(
        codes(&r),
        vec![
            "250 CHUNK",
            "250 2.1.0",
            "250 2.1.5",
            "354 End d",
            "250 2.0.0",
            "221 2.0.0"
        ]
    );
    assert!(r.contains("250 2.0.0 Ok: queued as Q1\r\n"));
}

#[test]
fn transaction_contents_and_received_header() {
    let mut h = Harness::new(ListenerKind::Smtp, "127.0.0.1");
    h.send(b"EHLO c.example\r\nMAIL FROM:<a@C.example>\r\nRCPT TO:<x@remote.example>\r\nDATA\r\n");
    h.s.feed(b"..x\r\n.\r\n", &mut h.out);
    let t = h.s.transaction();
    assert_eq!(t.sender, "a@c.example");
    assert_eq!(
        t.recipients,
        vec![Target::Remote("x@remote.example".into())]
    );
    assert_eq!(t.data, b".x\r\n");
    let rh = String::from_utf8(h.s.received_header("ABC", 0)).unwrap();
    assert!(
        rh.starts_with("Received: from c.example ([127.0.0.1])"),
        "{rh}"
    );
    assert!(
        rh.contains("with ESMTP id ABC")
            && rh.contains("for <x@remote.example>")
            && rh.ends_with("Thu, 1 Jan 1970 00:00:00 +0000\r\n"),
        "{rh}"
    );
}

#[test]
fn sequence_errors() {
    let mut h = Harness::new(ListenerKind::Smtp, "192.0.2.1");
    assert!(h
        .send(b"MAIL FROM:<a@b.example>\r\n")
        .0
        .starts_with("503 5.5.1"));
    h.send(b"HELO c\r\n");
    assert!(h
        .send(b"RCPT TO:<a@localhost>\r\n")
        .0
        .starts_with("503 5.5.1"));
    assert!(h.send(b"DATA\r\n").0.starts_with("503 5.5.1"));
    h.send(b"MAIL FROM:<>\r\n");
    assert!(h
        .send(b"MAIL FROM:<>\r\n")
        .0
        .starts_with("503 5.5.1 Error: nested"));
    assert!(h.send(b"DATA\r\n").0.starts_with("554 5.5.1"));
    assert!(h.send(b"FOO\r\n").0.starts_with("500 5.5.2"));
    assert!(h.send(b"RSET\r\n").0.starts_with("250 2.0.0"));
    assert!(h.send(b"VRFY x\r\n").0.starts_with("252"));
    assert!(h.send(b"NOOP\r\n").0.starts_with("250"));
    assert!(h.send(b"HELP\r\n").0.starts_with("214"));
}

#[test]
fn relay_denied_for_strangers_and_allowed_for_mynetworks() {
    let mut h = Harness::new(ListenerKind::Smtp, "192.0.2.1");
    h.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n");
    for rcpt in [
        &b"<x@remote.example>"[..],
        b"<x%remote.example@localhost>",
        b"<\"x@remote.example\"@localhost>",
        b"<remote.example!x@localhost>",
        b"<@localhost:x@remote.example>",
    ] {
        let (r, _) = h.send(&[b"RCPT TO:", rcpt, b"\r\n"].concat());
        assert_eq!(
            r,
            "554 5.7.1 Relay access denied\r\n",
            "{}",
            String::from_utf8_lossy(rcpt)
        );
    }
    assert!(h
        .send(b"RCPT TO:<x@relay.example>\r\n")
        .0
        .starts_with("250 2.1.5"));
    assert!(h
        .send(b"RCPT TO:<postmaster>\r\n")
        .0
        .starts_with("250 2.1.5"));
    let mut t = Harness::new(ListenerKind::Smtp, "127.0.0.1");
    t.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n");
    assert!(t
        .send(b"RCPT TO:<x@remote.example>\r\n")
        .0
        .starts_with("250 2.1.5"));
}

#[test]
fn recipient_and_size_limits() {
    let mut h = Harness::new(ListenerKind::Smtp, "127.0.0.1");
    h.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n");
    for _ in 0..3 {
        assert!(h.send(b"RCPT TO:<x@localhost>\r\n").0.starts_with("250"));
    }
    assert!(h
        .send(b"RCPT TO:<x@localhost>\r\n")
        .0
        .starts_with("452 4.5.3"));
    h.send(b"RSET\r\n");
    assert!(h
        .send(b"MAIL FROM:<a@b.example> SIZE=1001\r\n")
        .0
        .starts_with("552 5.3.4"));
    h.send(b"MAIL FROM:<a@b.example> SIZE=10\r\nRCPT TO:<x@localhost>\r\nDATA\r\n");
    let big = [b"x".repeat(1200), b"\r\n.\r\n".to_vec()].concat();
    assert!(h.send(&big).0.starts_with("552 5.3.4"));
    // The session goes on after the refusal.
    assert!(h.send(b"NOOP\r\n").0.starts_with("250"));
}

#[test]
fn long_lines_are_refused_and_buffering_is_bounded() {
    let mut h = Harness::new(ListenerKind::Smtp, "127.0.0.1");
    h.send(b"EHLO c\r\n");
    let (r, _) = h.send(&b"NOOP ".repeat(200));
    assert_eq!(r, "");
    assert!(
        h.pending.is_empty(),
        "overlong partial line must not be kept"
    );
    assert!(h
        .send(b"x\r\nNOOP\r\n")
        .0
        .starts_with("500 5.5.2 Error: line too long\r\n250"));
}

#[test]
fn hard_error_limit_closes() {
    let mut h = Harness::new(ListenerKind::Smtp, "127.0.0.1");
    let (r, a) = h.send(&b"BOGUS\r\n".repeat(25));
    assert_eq!(a, Action::Close);
    assert_eq!(r.matches("500 5.5.2").count(), 20);
    assert!(r.ends_with("421 4.7.0 Error: too many errors\r\n"));
}

#[test]
fn bdat_chunks() {
    let mut h = Harness::new(ListenerKind::Smtp, "127.0.0.1");
    h.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@localhost>\r\n");
    assert_eq!(
        h.send(b"BDAT 5\r\nab\r\nc").0,
        "250 2.0.0 5 octets received\r\n"
    );
    let (r, _) = h.send(b"BDAT 3 LAST\r\nd\r\nQUIT\r\n");
    assert_eq!(codes(&r), vec!["250 2.0.0", "221 2.0.0"]);
    // Without a transaction the chunk is still consumed, then refused.
    let mut h = Harness::new(ListenerKind::Smtp, "127.0.0.1");
    h.send(b"EHLO c\r\n");
    assert_eq!(
        codes(&h.send(b"BDAT 6 LAST\r\nNOOP\r\nNOOP\r\n").0),
        vec!["503 5.5.1", "250 2.0.0"]
    );
    // Too big.
    h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@localhost>\r\n");
    let chunk = [b"BDAT 1200 LAST\r\n".to_vec(), b"y".repeat(1200)].concat();
    assert!(h.send(&chunk).0.starts_with("552 5.3.4"));
}

#[test]
fn smuggled_commands_stay_in_the_message() {
    let mut h = Harness::new(ListenerKind::Smtp, "127.0.0.1");
    let (r, _) = h.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@localhost>\r\nDATA\r\nhi\n.\r\nMAIL FROM:<evil@b.example>\r\nRCPT TO:<y@localhost>\r\nDATA\r\nevil\r\n.\r\n");
    assert_eq!(r.matches("queued as").count(), 1, "{r}");
}

#[test]
fn bare_lf_reject_mode() {
    let mut h = Harness::rejecting_bare_newlines();
    let (r, a) = h.send(
        b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@localhost>\r\nDATA\r\nhi\nthere\r\n.\r\n",
    );
    assert_eq!(a, Action::Close);
    assert!(
        r.ends_with("521 5.5.2 Error: bare <CR> or <LF> received\r\n"),
        "{r}"
    );
    assert!(!r.contains("queued"));
}

#[test]
fn starttls_then_auth() {
    let mut h = Harness::new(ListenerKind::Submission, "192.0.2.1");
    h.send(b"EHLO c\r\n");
    assert!(h
        .send(b"MAIL FROM:<a@b.example>\r\n")
        .0
        .starts_with("530 5.7.0 Must issue a STARTTLS"));
    assert!(h
        .send(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
        .0
        .starts_with("538 5.7.11"));
    let (r, a) = h.send(b"STARTTLS\r\nEHLO injected\r\n");
    assert_eq!(
        (r.as_str(), a),
        ("220 2.0.0 Ready to start TLS\r\n", Action::StartTls)
    );
    h.pending.clear(); // the I/O layer drops plaintext read past STARTTLS
    h.s.tls_started("TLSv1.3".into());
    assert!(
        h.send(b"MAIL FROM:<a@b.example>\r\n")
            .0
            .starts_with("503 5.5.1"),
        "EHLO is needed again after TLS"
    );
    let (r, _) = h.send(b"EHLO c\r\n");
    assert!(
        r.contains("250-AUTH PLAIN LOGIN") && !r.contains("STARTTLS"),
        "{r}"
    );
    assert!(h
        .send(b"MAIL FROM:<a@b.example>\r\n")
        .0
        .starts_with("530 5.7.0 Authentication required"));
    // alice/wrong
    assert!(h
        .send(b"AUTH PLAIN AGFsaWNlAHdyb25n\r\n")
        .0
        .starts_with("535 5.7.8"));
    assert_eq!(h.s.auth_failures(), 1);
    // LOGIN: alice / secret
    assert_eq!(h.send(b"AUTH LOGIN\r\n").0, "334 VXNlcm5hbWU6\r\n");
    assert_eq!(h.send(b"YWxpY2U=\r\n").0, "334 UGFzc3dvcmQ6\r\n");
    assert!(h.send(b"c2VjcmV0\r\n").0.starts_with("235 2.7.0"));
    assert_eq!(h.s.protocol(), "ESMTPSA");
    assert!(h
        .send(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
        .0
        .starts_with("503 5.5.1"));
    assert!(h
        .send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<z@anywhere.example>\r\n")
        .0
        .ends_with("250 2.1.5 Ok\r\n"));
}

#[test]
fn auth_cancel_and_bad_base64() {
    let mut h = Harness::new(ListenerKind::Smtp, "127.0.0.1");
    h.s.tls_started("TLSv1.3".into());
    h.send(b"EHLO c\r\n");
    assert_eq!(h.send(b"AUTH PLAIN\r\n").0, "334 \r\n");
    assert!(h.send(b"*\r\n").0.starts_with("501 5.7.0"));
    assert!(h.send(b"AUTH PLAIN !!!\r\n").0.starts_with("501 5.5.2"));
}

#[test]
fn partial_lines_across_feeds() {
    let mut h = Harness::new(ListenerKind::Smtp, "127.0.0.1");
    assert_eq!(h.send(b"EH").0, "");
    assert!(h.send(b"LO c\r\n").0.starts_with("250-mx.test"));
}

#[test]
fn dates() {
    assert_eq!(
        rfc5322_date(1_795_326_854),
        "Sun, 22 Nov 2026 05:54:14 +0000"
    );
    assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
}

#[test]
fn local_recipients_checked_and_expanded_at_rcpt() {
    let dir = tempfile::tempdir().unwrap();
    let aliases = dir.path().join("aliases");
    std::fs::write(&aliases, "team: alice, carol@remote.example\n").unwrap();
    let c = Config {
        mydestination: vec!["localhost".into()],
        recipient_delimiter: "+".into(),
        alias_maps: vec![aliases.display().to_string()],
        local: crate::config::LocalConfig {
            users: vec!["alice".into()],
            system_users: false,
            ..Default::default()
        },
        ..Config::default()
    };
    let mut sc = (*cfg(ListenerKind::Smtp)).clone();
    sc.recipient_limit = 10;
    let c = Arc::new(c);
    let mut h = Harness {
        s: Session::new(Arc::new(sc), "192.0.2.1".parse().unwrap(), false),
        check: crate::policy::RecipientCheck::new(
            Arc::new(crate::policy::RelayPolicy::new(&c)),
            Arc::new(crate::local::recipients::RecipientTable::load(c).unwrap()),
        ),
        out: Vec::new(),
        pending: Vec::new(),
    };
    h.send(b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\n");
    assert!(h
        .send(b"RCPT TO:<bob@localhost>\r\n")
        .0
        .starts_with("550 5.1.1 "));
    assert!(h
        .send(b"RCPT TO:<alice+x@localhost>\r\n")
        .0
        .starts_with("250 "));
    assert!(h
        .send(b"RCPT TO:<team@localhost>\r\n")
        .0
        .starts_with("250 "));
    assert!(h
        .send(b"RCPT TO:<Alice+X@localhost>\r\n")
        .0
        .starts_with("250 "));
    assert!(h.send(b"RCPT TO:<Postmaster>\r\n").0.starts_with("250 "));
    let t = h.s.transaction();
    assert_eq!(
        t.recipients,
        vec![
            Target::Local("alice+x@localhost".into()),
            Target::Local("alice@localhost".into()),
            Target::Remote("carol@remote.example".into()),
            Target::Local("postmaster@localhost".into()),
        ],
        "expanded, duplicates collapsed; the remote alias target relays although the client may not"
    );
    assert_eq!(t.rcpt_count, 4);
}

/// BDAT bytes are no longer stored as they came: a bare CR or LF becomes CRLF (the SMTP-smuggling sequences
/// cannot leave the relay), and under `reject` the message is refused as with DATA.
#[test]
fn bdat_line_ends_are_normalised_or_refused() {
    let mut h = Harness::new(ListenerKind::Smtp, "127.0.0.1");
    h.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@localhost>\r\n");
    let body = b"a\r.\rMAIL FROM:<e@v>\r\n.\r\nb\n";
    let cmd = [
        format!("BDAT {} LAST\r\n", body.len()).into_bytes(),
        body.to_vec(),
    ]
    .concat();
    h.s.feed(&cmd, &mut h.out);
    assert_eq!(
        h.s.transaction().data,
        b"a\r\n.\r\nMAIL FROM:<e@v>\r\n.\r\nb\r\n".to_vec()
    );
    let mut h = Harness::rejecting_bare_newlines();
    h.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@localhost>\r\n");
    let (r, a) = h.send(b"BDAT 4\r\nx\ry\r\n");
    assert_eq!(a, Action::Close);
    assert!(r.starts_with("521 5.5.2"), "{r}");
}

/// A HELO name with control characters is refused; an 8-bit one is accepted but only printable ASCII reaches
/// the Received header (a 7-bit header of a 7-bit message).
#[test]
fn helo_names_are_checked_and_sanitised() {
    let mut h = Harness::new(ListenerKind::Smtp, "127.0.0.1");
    assert!(h.send(b"EHLO a\x00b\r\n").0.starts_with("501"));
    assert!(h.send(b"HELO a\x01\r\n").0.starts_with("501"));
    assert!(h.send(b"EHLO a\x7fb\r\n").0.starts_with("501"));
    let r = h.send("EHLO héllo.example\r\n".as_bytes()).0;
    assert!(r.starts_with("250"), "{r}");
    h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@localhost>\r\nDATA\r\n");
    h.s.feed(b"hi\r\n.\r\n", &mut h.out);
    let rh = h.s.received_header("ID", 0);
    assert!(rh.is_ascii());
    let rh = String::from_utf8(rh).unwrap();
    assert!(
        rh.starts_with("Received: from h??llo.example ([127.0.0.1])"),
        "{rh}"
    );
    assert_eq!(printable(&"x".repeat(300), 255).len(), 255);
}

/// With a data budget, content pipelined behind DATA or BDAT is taken only within the allowance the I/O
/// layer gave after making room (it used to be stored at once, growing the buffer outside the budget), and
/// what is stored never outgrows the room reserved for it.
#[test]
fn content_waits_for_its_allowance() {
    let mut s = Session::new(cfg(ListenerKind::Smtp), "192.0.2.9".parse().unwrap(), false);
    s.budget_data();
    let mut out = Vec::new();
    let head = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@localhost>\r\n";
    for (start, body) in [
        (&b"DATA\r\n"[..], &b"\n\n\n\n\n\n\n\n\n\n\r\n.\r\n"[..]),
        (b"BDAT 12 LAST\r\n", b"\n\n\n\n\n\n\n\n\n\n\r\n"),
    ] {
        let input = [&head[..], start, body].concat();
        let check = check();
        let mut n = 0;
        let act = loop {
            let (k, a) = s.feed(&input[n..], &mut out);
            n += k;
            match a {
                Action::Recipient(req) => {
                    let v = check.check(req, s.targets_mut());
                    s.rcpt_result(v, &mut out);
                }
                a => break a,
            }
        };
        assert_eq!(act, Action::NeedMore);
        assert_eq!(n, head.len() + start.len(), "nothing taken without room");
        s.reserve_data(8);
        s.set_data_allowance(4);
        let cap = s.data_capacity();
        let (m, act) = s.feed(&input[n..], &mut out);
        assert_eq!((m, act), (4, Action::NeedMore));
        assert_eq!(s.data_len(), 8);
        assert_eq!(s.data_capacity(), cap, "stored within the room");
        s.set_data_allowance(usize::MAX);
        let (_, act) = s.feed(&input[n + m..], &mut out);
        assert_eq!(act, Action::Message);
        assert_eq!(s.transaction().data, b"\r\n".repeat(11));
        s.message_done(Ok("Q"), &mut out);
    }
}

/// The session decides nothing about a recipient itself: it asks (Action::Recipient, with what it parsed) and
/// answers with the verdict it is given, counting only accepted recipients against the limit.
#[test]
fn rcpt_verdict_comes_from_the_io_layer() {
    let mut s = Session::new(cfg(ListenerKind::Smtp), "192.0.2.9".parse().unwrap(), true);
    let mut out = Vec::new();
    s.feed(b"EHLO c\r\nMAIL FROM:<a@b>\r\n", &mut out);
    out.clear();
    let (_, a) = s.feed(b"RCPT TO:<x%y@Elsewhere.example>\r\n", &mut out);
    assert_eq!(
        a,
        Action::Recipient(RcptRequest {
            address: "x%y@elsewhere.example".into(),
            postmaster: false,
            routing_chars: true,
            may_relay: true,
        })
    );
    assert!(out.is_empty(), "no reply before the verdict");
    assert_eq!(
        s.rcpt_result(Err(reply::RELAY_DENIED), &mut out),
        Action::NeedMore
    );
    assert!(String::from_utf8_lossy(&out).starts_with("554 5.7.1"));
    out.clear();
    let (_, a) = s.feed(b"RCPT TO:<Postmaster>\r\n", &mut out);
    assert!(matches!(
        a,
        Action::Recipient(RcptRequest {
            postmaster: true,
            ..
        })
    ));
    s.targets_mut()
        .push(Target::Remote("postmaster@mx.test".into()));
    s.rcpt_result(Ok("postmaster@mx.test".into()), &mut out);
    assert!(String::from_utf8_lossy(&out).starts_with("250 2.1.5"));
    out.clear();
    // Only the accepted recipient is in the transaction: DATA goes ahead.
    let (_, a) = s.feed(b"DATA\r\n", &mut out);
    assert_eq!(a, Action::NeedMore);
    assert!(
        String::from_utf8_lossy(&out).starts_with("354"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(s.transaction().rcpt_count, 1);
    assert_eq!(s.transaction().first_rcpt, "postmaster@mx.test");
}

#[test]
fn refusals_are_counted_by_kind_and_taken_once() {
    let mut h = Harness::new(ListenerKind::Smtp, "192.0.2.1");
    assert_eq!(h.s.take_rejections(), None);
    h.send(b"EHLO c\r\nMAIL FROM:<a@b.example> SIZE=5000\r\nMAIL FROM:<a@b.example>\r\n");
    h.send(b"RCPT TO:<x@remote.example>\r\nRCPT TO:<x@remote.example>\r\nBOGUS\r\n");
    let mut want = [0u32; Rejection::COUNT];
    want[Rejection::Size as usize] = 1;
    want[Rejection::RelayDenied as usize] = 2;
    // The unknown command is a protocol error, not a refusal of mail.
    assert_eq!(h.s.take_rejections(), Some(want));
    assert_eq!(h.s.take_rejections(), None);
    for _ in 0..4 {
        h.send(b"RCPT TO:<x@localhost>\r\n");
    }
    let got = h.s.take_rejections().unwrap();
    assert_eq!(got[Rejection::Limits as usize], 1, "{got:?}");
    assert_eq!(got.iter().sum::<u32>(), 1);
}

/// The disconnect line's counts: every command once answered, accepted or not; intermediate replies (354,
/// 334) do not end a command; a command cut off by the end of the connection counts as refused.
#[test]
fn commands_are_counted_as_postfix_counts_them() {
    let mut h = Harness::new(ListenerKind::Submission, "192.0.2.1");
    h.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nSTARTTLS\r\n");
    h.pending.clear();
    h.s.tls_started("TLSv1.3".into());
    h.send(b"EHLO c\r\nAUTH PLAIN AGFsaWNlAHdyb25n\r\nAUTH LOGIN\r\nYWxpY2U=\r\nc2VjcmV0\r\n");
    h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<z@anywhere.example>\r\nRCPT TO:<>\r\n");
    h.send(b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\nNOOP\r\nXYZZY\r\nDATA\r\n");
    assert_eq!(
        h.s.end_counts().to_string(),
        "ehlo=2 starttls=1 auth=1/2 mail=1/2 rcpt=1/2 data=1/2 noop=1 unknown=0/1 commands=8/13"
    );
    assert_eq!(
        (h.s.end_counts().accepted(), h.s.end_counts().total()),
        (8, 13)
    );
    assert_eq!(h.s.last_command(), "DATA");
    // Content cut off: the DATA that got its 354 counts as refused when the connection ends.
    let mut h = Harness::new(ListenerKind::Smtp, "127.0.0.1");
    assert_eq!(h.s.last_command(), "CONNECT");
    h.send(b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<bob@localhost>\r\nDATA\r\npart of it");
    assert_eq!(h.s.last_command(), "DATA");
    assert_eq!(
        h.s.end_counts().to_string(),
        "helo=1 mail=1 rcpt=1 data=0/1 commands=3/4"
    );
    assert_eq!(
        Harness::new(ListenerKind::Smtp, "127.0.0.1")
            .s
            .end_counts()
            .to_string(),
        "commands=0/0"
    );
}

/// Refusals of MAIL, RCPT, DATA and message content are logged with the reply, the sender and the recipient;
/// AUTH failures as Postfix's SASL warning; other errors only in the counts.
#[test]
fn refusals_are_logged_with_their_reason() {
    let mut h = Harness::new(ListenerKind::Smtp, "192.0.2.1");
    let text = crate::eventlog::capture(crate::eventlog::LogFormat::Text, || {
        h.send(b"EHLO spam.example\r\nMAIL FROM:<s@spam.example> SIZE=5000\r\nMAIL FROM:<s@spam.example>\r\n");
        h.send(b"RCPT TO:<v@elsewhere.example>\r\nRCPT TO:<bob@localhost>\r\nBOGUS\r\n");
        h.send(b"DATA\r\n");
        h.send(&[b'x'; 1200]);
        h.send(b"\r\n.\r\nDATA\r\n");
        h.s.tls_started("TLSv1.3".into());
        h.send(
            b"EHLO spam.example\r\nAUTH PLAIN AGFsaWNlAHdyb25n\r\nAUTH LOGIN\r\nYWxpY2U=\r\n!!\r\n",
        );
    });
    let msgs: Vec<&str> = text
        .lines()
        .map(|l| l.split_once("]: ").unwrap().1)
        .collect();
    assert_eq!(
        msgs,
        [
            "NOQUEUE: reject: MAIL from unknown[192.0.2.1]: 552 5.3.4 Message size exceeds fixed limit of 1000 bytes; from=<s@spam.example> proto=ESMTP helo=<spam.example>",
            "NOQUEUE: reject: RCPT from unknown[192.0.2.1]: 554 5.7.1 <v@elsewhere.example>: Relay access denied; from=<s@spam.example> to=<v@elsewhere.example> proto=ESMTP helo=<spam.example>",
            "NOQUEUE: reject: END-OF-MESSAGE from unknown[192.0.2.1]: 552 5.3.4 Message size exceeds fixed limit of 1000 bytes; from=<s@spam.example> proto=ESMTP helo=<spam.example>",
            "NOQUEUE: reject: DATA from unknown[192.0.2.1]: 503 5.5.1 Error: need MAIL command; proto=ESMTP helo=<spam.example>",
            "warning: unknown[192.0.2.1]: SASL PLAIN authentication failed: authentication failure",
            "warning: unknown[192.0.2.1]: SASL LOGIN authentication failed: invalid base64 data",
        ],
        "{text}"
    );
}

/// The last error before the hard limit is logged as Postfix's `too many errors after ...`.
#[test]
fn too_many_errors_is_logged() {
    let mut c = (*cfg(ListenerKind::Smtp)).clone();
    c.hard_error_limit = 2;
    let mut h = Harness::with_config(Arc::new(c), "192.0.2.1");
    let text = crate::eventlog::capture(crate::eventlog::LogFormat::Text, || {
        let (_, a) = h.send(b"EHLO c\r\nRCPT TO:<a@b.example>\r\nRCPT TO:<a@b.example>\r\n");
        assert_eq!(a, Action::Close);
    });
    assert!(
        text.lines()
            .last()
            .unwrap()
            .ends_with("]: too many errors after RCPT from unknown[192.0.2.1]"),
        "{text}"
    );
}

#[test]
fn a_line_names_its_command_by_its_first_word() {
    for k in CommandKind::ALL {
        if k != CommandKind::Unknown {
            assert_eq!(CommandKind::of_line(k.verb().as_bytes()), k);
            let lower = format!("{} x", k.verb().to_ascii_lowercase());
            assert_eq!(CommandKind::of_line(lower.as_bytes()), k);
        }
    }
    for line in [
        &b""[..],
        b" MAIL",
        b"MAILX FROM:<>",
        b"STARTTLSX",
        b"\xff\xfe",
        b"EXPN x",
    ] {
        assert_eq!(CommandKind::of_line(line), CommandKind::Unknown);
    }
}

/// DSN (RFC 3461): offered in EHLO; RET/ENVID kept with the transaction (ENVID decoded), NOTIFY/ORCPT with each
/// final recipient, in order; a RCPT naming a recipient already there adds nothing; a refused parameter
/// leaves the transaction as it was; RSET forgets it all.
#[test]
fn dsn_parameters_kept_per_recipient() {
    use crate::smtp::dsn::{Notify, Ret};
    let mut h = Harness::new(ListenerKind::Smtp, "127.0.0.1");
    let (r, _) = h.send(b"EHLO c.example\r\n");
    assert!(r.contains("250-DSN\r\n"), "{r}");
    let (r, _) = h.send(
        b"MAIL FROM:<a@c.example> RET=HDRS ENVID=a+2Bb\r\n\
          RCPT TO:<x@relay.example> NOTIFY=SUCCESS ORCPT=rfc822;X+40y\r\n\
          RCPT TO:<y@relay.example>\r\n\
          RCPT TO:<x@relay.example> NOTIFY=NEVER\r\n\
          RCPT TO:<z@relay.example> NOTIFY=NEVER,DELAY\r\n",
    );
    assert_eq!(
        codes(&r),
        vec![
            "250 2.1.0",
            "250 2.1.5",
            "250 2.1.5",
            "250 2.1.5",
            "501 5.5.4"
        ]
    );
    let d = h.s.transaction().envelope_dsn();
    assert_eq!(d.ret, Some(Ret::Hdrs));
    assert_eq!(d.envid.as_deref(), Some("a+b"));
    assert_eq!(d.rcpts.len(), 2);
    assert_eq!(d.rcpts[0].notify, Notify::parse("SUCCESS").ok());
    let o = d.rcpts[0].orcpt.as_ref().unwrap();
    assert_eq!(
        (o.addr_type.as_str(), o.address.as_str()),
        ("rfc822", "X@y")
    );
    assert!(d.rcpts[1].is_empty());
    h.send(b"RSET\r\n");
    assert!(h.s.transaction().envelope_dsn().is_empty());
}

/// A second MAIL inside an open transaction is refused (503) and leaves the first MAIL's RET and ENVID as they
/// were (a review found it overwrote them).
#[test]
fn nested_mail_keeps_the_first_mails_dsn_parameters() {
    use crate::smtp::dsn::Ret;
    let mut h = Harness::new(ListenerKind::Smtp, "127.0.0.1");
    h.send(b"EHLO c.example\r\n");
    let (r, _) = h.send(
        b"MAIL FROM:<a@c.example> RET=HDRS ENVID=first\r\n\
          MAIL FROM:<b@c.example> RET=FULL ENVID=second\r\n\
          RCPT TO:<x@relay.example> NOTIFY=FAILURE\r\n",
    );
    assert_eq!(
        codes(&r),
        vec!["250 2.1.0", "503 5.5.1", "250 2.1.5"],
        "{r}"
    );
    let d = h.s.transaction().envelope_dsn();
    assert_eq!(d.ret, Some(Ret::Hdrs));
    assert_eq!(d.envid.as_deref(), Some("first"));
    assert_eq!(h.s.transaction().sender, "a@c.example");
}

/// An alias expanded into several recipients (a mailing list, RFC 3461 6.2.7.3) with NOTIFY=SUCCESS is noted
/// for one "expanded" report on the address given, and its members lose SUCCESS (they keep FAILURE; NEVER when
/// SUCCESS was all); an alias of exactly one address keeps its NOTIFY whole (6.2.7.1).
#[test]
fn alias_expanded_into_several_takes_success_from_its_members() {
    use crate::smtp::dsn::Notify;
    let dir = tempfile::tempdir().unwrap();
    let aliases = dir.path().join("aliases");
    std::fs::write(
        &aliases,
        "team: alice, bob\nlist: dave, erin\nsolo: carol\n",
    )
    .unwrap();
    let c = Arc::new(Config {
        mydestination: vec!["localhost".into()],
        alias_maps: vec![aliases.display().to_string()],
        local: crate::config::LocalConfig {
            users: ["alice", "bob", "carol", "dave", "erin"]
                .iter()
                .map(|u| u.to_string())
                .collect(),
            system_users: false,
            ..Default::default()
        },
        ..Config::default()
    });
    let mut sc = (*cfg(ListenerKind::Smtp)).clone();
    sc.recipient_limit = 10;
    let mut h = Harness {
        s: Session::new(Arc::new(sc), "192.0.2.1".parse().unwrap(), false),
        check: crate::policy::RecipientCheck::new(
            Arc::new(crate::policy::RelayPolicy::new(&c)),
            Arc::new(crate::local::recipients::RecipientTable::load(c).unwrap()),
        ),
        out: Vec::new(),
        pending: Vec::new(),
    };
    let (r, _) = h.send(
        b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\n\
          RCPT TO:<team@localhost> NOTIFY=SUCCESS,FAILURE\r\n\
          RCPT TO:<list@localhost> NOTIFY=SUCCESS ORCPT=rfc822;List@localhost\r\n\
          RCPT TO:<solo@localhost> NOTIFY=SUCCESS\r\n",
    );
    assert_eq!(
        codes(&r)[2..],
        ["250 2.1.5", "250 2.1.5", "250 2.1.5"],
        "{r}"
    );
    let t = h.s.transaction();
    let addrs: Vec<&str> = t.recipients.iter().map(|t| t.address()).collect();
    assert_eq!(
        addrs,
        [
            "alice@localhost",
            "bob@localhost",
            "dave@localhost",
            "erin@localhost",
            "carol@localhost"
        ]
    );
    let n = |s: &str| Notify::parse(s).ok();
    let notify: Vec<Option<Notify>> = t.rcpt_dsn.iter().map(|d| d.notify).collect();
    assert_eq!(
        notify,
        [
            n("FAILURE"),
            n("FAILURE"),
            n("NEVER"),
            n("NEVER"),
            n("SUCCESS")
        ]
    );
    let orcpt: Vec<&str> = t
        .rcpt_dsn
        .iter()
        .map(|d| d.orcpt.as_ref().map_or("", |o| o.address.as_str()))
        .collect();
    assert_eq!(
        orcpt,
        [
            "team@localhost",
            "team@localhost",
            "List@localhost",
            "List@localhost",
            "solo@localhost"
        ]
    );
    let expanded: Vec<(&str, Option<Notify>, Option<&str>)> = t
        .expanded
        .iter()
        .map(|(a, d)| {
            (
                a.as_str(),
                d.notify,
                d.orcpt.as_ref().map(|o| o.address.as_str()),
            )
        })
        .collect();
    assert_eq!(
        expanded,
        [
            ("team@localhost", n("SUCCESS,FAILURE"), None),
            ("list@localhost", n("SUCCESS"), Some("List@localhost"))
        ]
    );
    h.send(b"RSET\r\n");
    assert!(h.s.transaction().expanded.is_empty());
}
