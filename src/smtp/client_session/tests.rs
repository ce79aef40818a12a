use super::*;

const EHLO_PIPE: &[u8] = b"250-mx.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 100000\r\n";

fn t0() -> Instant {
    Instant::now()
}

/// What the session sent so far (and marks it sent).
fn drain_out(s: &mut ClientSession, now: Instant) -> Vec<u8> {
    let mut v = Vec::new();
    while let Some(b) = s.poll_transmit() {
        v.extend_from_slice(b);
        let n = b.len();
        s.advance_transmit(n, now);
    }
    v
}

/// Events in a comparable form: replies as (code, text).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Greeted,
    Ready(bool),
    NeedTls,
    Mail(TxnId, u16),
    Rcpt(TxnId, usize, u16),
    Data(TxnId, u16),
    Done(TxnId, u16, String),
    Msg(TxnId, bool),
    Rset(u16),
    Closed,
    Failed(SessionError),
}

/// Events, without the `Greeted` that every session starts with.
fn events(s: &mut ClientSession) -> Vec<Ev> {
    all_events(s)
        .into_iter()
        .filter(|e| *e != Ev::Greeted)
        .collect()
}

fn all_events(s: &mut ClientSession) -> Vec<Ev> {
    let mut v = Vec::new();
    while let Some(e) = s.poll_event() {
        v.push(match e {
            Event::Greeted => Ev::Greeted,
            Event::Ready { tls, .. } => Ev::Ready(tls),
            Event::NeedTls => Ev::NeedTls,
            Event::Mail { txn, reply } => Ev::Mail(txn, reply.code),
            Event::Rcpt { txn, index, reply } => Ev::Rcpt(txn, index, reply.code),
            Event::Data { txn, reply } => Ev::Data(txn, reply.code),
            Event::DataDone { txn, reply } => {
                Ev::Done(txn, reply.code, s.server_reply(reply).text.clone())
            }
            Event::MessageDone { txn, accepted } => Ev::Msg(txn, accepted),
            Event::RsetDone { reply } => Ev::Rset(reply.code),
            Event::Closed => Ev::Closed,
            Event::Failed(e) => Ev::Failed(e),
        });
    }
    v
}

fn open_session(params: Params, ehlo: &[u8], now: Instant) -> ClientSession {
    let mut s = ClientSession::new(params, now);
    s.connected(now);
    s.handle_input(b"220 mx.test ESMTP\r\n", now);
    assert_eq!(all_events(&mut s), vec![Ev::Greeted]);
    assert_eq!(drain_out(&mut s, now), b"EHLO client.test\r\n");
    s.handle_input(ehlo, now);
    assert_eq!(events(&mut s), vec![Ev::Ready(false)]);
    s
}

fn txn<'a>(rcpts: &'a [&'a str], body: &'a [&'a [u8]]) -> Transaction<'a, &'a str> {
    Transaction {
        sender: "a@c.test",
        recipients: rcpts,
        body,
        size: 10,
        eight_bit: false,
        smtputf8: false,
        wire: false,
        external: 0,
    }
}

#[test]
fn pipelined_replies_split_at_every_byte_boundary() {
    let replies: &[u8] = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550-5.1.1 no\r\n550 5.1.1 such user\r\n250 2.1.5 Ok\r\n354 go\r\n250 2.0.0 Ok: queued as Q1\r\n";
    let now = t0();
    let mut baseline = None;
    for cut in 0..=replies.len() {
        let mut s = open_session(Params::new("client.test"), EHLO_PIPE, now);
        let rcpts = ["x@r.test", "y@r.test", "z@r.test"];
        let id = s
            .start_transaction(&txn(&rcpts, &[b"Subject: s\r\n\r\n.dot\r\n"]), now)
            .unwrap();
        assert_eq!(
            drain_out(&mut s, now),
            b"MAIL FROM:<a@c.test> SIZE=10\r\nRCPT TO:<x@r.test>\r\nRCPT TO:<y@r.test>\r\nRCPT TO:<z@r.test>\r\nDATA\r\n",
            "one write for the whole envelope"
        );
        let (a, b) = replies.split_at(cut);
        let mut got = Vec::new();
        let mut sent = Vec::new();
        for part in [a, b] {
            // Split further: the 354's body goes out only once the 354 is complete.
            s.handle_input(part, now);
            got.extend(events(&mut s));
            sent.extend(drain_out(&mut s, now));
        }
        assert_eq!(sent, b"Subject: s\r\n\r\n..dot\r\n.\r\n");
        let want = vec![
            Ev::Mail(id, 250),
            Ev::Rcpt(id, 0, 250),
            Ev::Rcpt(id, 1, 550),
            Ev::Rcpt(id, 2, 250),
            Ev::Data(id, 354),
            Ev::Done(id, 250, "2.0.0 Ok: queued as Q1".into()),
            Ev::Msg(id, true),
        ];
        assert_eq!(got, want, "cut at {cut}");
        baseline.get_or_insert(got);
        assert!(s.is_open() && s.in_flight() == 0);
    }
}

#[test]
fn lockstep_without_pipelining_gives_per_recipient_results() {
    let now = t0();
    let mut s = open_session(Params::new("client.test"), b"250 mx.test\r\n", now);
    let rcpts = ["x@r.test", "y@r.test"];
    let id = s
        .start_transaction(&txn(&rcpts, &[b"hi\r\n"]), now)
        .unwrap();
    assert_eq!(drain_out(&mut s, now), b"MAIL FROM:<a@c.test>\r\n");
    s.handle_input(b"250 ok\r\n", now);
    assert_eq!(drain_out(&mut s, now), b"RCPT TO:<x@r.test>\r\n");
    s.handle_input(b"450 4.2.0 greylisted\r\n", now);
    assert_eq!(drain_out(&mut s, now), b"RCPT TO:<y@r.test>\r\n");
    s.handle_input(b"250 ok\r\n", now);
    assert_eq!(drain_out(&mut s, now), b"DATA\r\n");
    s.handle_input(b"354 go\r\n", now);
    assert_eq!(drain_out(&mut s, now), b"hi\r\n.\r\n");
    s.handle_input(b"250 queued\r\n", now);
    assert_eq!(
        events(&mut s),
        vec![
            Ev::Mail(id, 250),
            Ev::Rcpt(id, 0, 450),
            Ev::Rcpt(id, 1, 250),
            Ev::Data(id, 354),
            Ev::Done(id, 250, "queued".into()),
            Ev::Msg(id, true)
        ]
    );
    // All recipients refused: no DATA, the transaction ends; RSET and QUIT follow.
    let id = s
        .start_transaction(&txn(&rcpts[..1], &[b"x"]), now)
        .unwrap();
    drain_out(&mut s, now);
    s.handle_input(b"250 ok\r\n", now);
    drain_out(&mut s, now);
    s.handle_input(b"550 5.1.1 unknown\r\n", now);
    assert_eq!(
        events(&mut s),
        vec![Ev::Mail(id, 250), Ev::Rcpt(id, 0, 550), Ev::Msg(id, false)]
    );
    s.rset(now).unwrap();
    s.quit(now);
    assert_eq!(drain_out(&mut s, now), b"RSET\r\nQUIT\r\n");
    s.handle_input(b"250 ok\r\n221 bye\r\n", now);
    assert_eq!(events(&mut s), vec![Ev::Rset(250), Ev::Closed]);
    assert!(s.is_closed());
}

#[test]
fn a_421_mid_session_ends_it() {
    let now = t0();
    let mut s = open_session(Params::new("client.test"), EHLO_PIPE, now);
    let id = s
        .start_transaction(&txn(&["x@r.test", "y@r.test"], &[b"x"]), now)
        .unwrap();
    drain_out(&mut s, now);
    s.handle_input(
        b"250 ok\r\n421-4.7.28 Gmail has detected an unusual rate\r\n421 4.7.28 of unsolicited mail\r\n",
        now,
    );
    let ev = events(&mut s);
    assert_eq!(
        &ev[..3],
        &[Ev::Mail(id, 250), Ev::Rcpt(id, 0, 421), Ev::Msg(id, false)]
    );
    match &ev[3] {
        Ev::Failed(SessionError::Closing { phase, reply }) => {
            assert_eq!(*phase, Phase::Rcpt);
            assert_eq!(reply.code, 421);
            assert!(reply.text.contains("unusual rate"));
        }
        e => panic!("expected Closing, got {e:?}"),
    }
    assert!(s.is_closed() && s.poll_timeout().is_none());
    assert_eq!(
        s.start_transaction(&txn(&["x@r.test"], &[b"x"]), now),
        Err(CommandError::NotReady)
    );
    // A 421 greeting.
    let mut s = ClientSession::new(Params::new("client.test"), now);
    s.connected(now);
    s.handle_input(b"421 4.7.0 [TSS04] try later\r\n", now);
    assert!(matches!(
        events(&mut s).as_slice(),
        [Ev::Failed(SessionError::Closing {
            phase: Phase::Greeting,
            ..
        })]
    ));
}

fn starttls_params() -> Params {
    Params {
        tls: TlsMode::Required,
        ..Params::new("client.test")
    }
}

#[test]
fn starttls_refuses_plaintext_after_the_220() {
    let now = t0();
    let ehlo = b"250-mx.test\r\n250 STARTTLS\r\n";
    for split in [false, true] {
        let mut s = ClientSession::new(starttls_params(), now);
        s.connected(now);
        s.handle_input(b"220 mx\r\n", now);
        s.handle_input(ehlo, now);
        assert_eq!(drain_out(&mut s, now), b"EHLO client.test\r\nSTARTTLS\r\n");
        if split {
            s.handle_input(b"220 go ahead\r\n", now);
            assert_eq!(events(&mut s), vec![Ev::NeedTls]);
            // Bytes before the handshake is done: injected.
            s.handle_input(b"250-", now);
        } else {
            s.handle_input(b"220 go ahead\r\n250 injected\r\n", now);
        }
        let ev = events(&mut s);
        assert_eq!(
            ev.last(),
            Some(&Ev::Failed(SessionError::StartTlsInjection)),
            "split {split}"
        );
        assert!(!split || ev.len() == 1);
        assert!(split || !ev.contains(&Ev::NeedTls));
    }
    // The clean case: EHLO again after the handshake; TLS required but not offered fails.
    let mut s = ClientSession::new(starttls_params(), now);
    s.connected(now);
    s.handle_input(b"220 mx\r\n", now);
    s.handle_input(ehlo, now);
    s.handle_input(b"220 go ahead\r\n", now);
    assert_eq!(events(&mut s), vec![Ev::NeedTls]);
    drain_out(&mut s, now);
    s.tls_established(now);
    assert_eq!(drain_out(&mut s, now), b"EHLO client.test\r\n");
    s.handle_input(b"250 mx.test\r\n", now);
    assert_eq!(events(&mut s), vec![Ev::Ready(true)]);
    let mut s = ClientSession::new(starttls_params(), now);
    s.connected(now);
    s.handle_input(b"220 mx\r\n250 mx.test\r\n", now);
    assert_eq!(events(&mut s), vec![Ev::Failed(SessionError::TlsRequired)]);
}

#[test]
fn auth_plain_and_login_and_only_over_tls() {
    let now = t0();
    let p = Params {
        tls: TlsMode::Implicit,
        auth: Some(("u".into(), "p".into())),
        ..Params::new("client.test")
    };
    let mut s = ClientSession::new(p.clone(), now);
    s.connected(now);
    s.handle_input(b"220 mx\r\n250-mx\r\n250 AUTH LOGIN\r\n", now);
    assert_eq!(
        drain_out(&mut s, now),
        b"EHLO client.test\r\nAUTH LOGIN\r\n"
    );
    s.handle_input(b"334 VXNlcm5hbWU6\r\n", now);
    assert_eq!(drain_out(&mut s, now), b"dQ==\r\n");
    s.handle_input(b"334 UGFzc3dvcmQ6\r\n", now);
    assert_eq!(drain_out(&mut s, now), b"cA==\r\n");
    s.handle_input(b"235 ok\r\n", now);
    assert_eq!(events(&mut s), vec![Ev::Ready(true)]);
    let mut s = ClientSession::new(
        Params {
            tls: TlsMode::Opportunistic,
            ..p
        },
        now,
    );
    s.connected(now);
    s.handle_input(b"220 mx\r\n250-mx\r\n250 AUTH PLAIN\r\n", now);
    assert_eq!(events(&mut s), vec![Ev::Failed(SessionError::TlsRequired)]);
    assert_eq!(drain_out(&mut s, now), b"", "no credentials in plaintext");
    // A test tool may allow it; `reset` starts the same session over on a new connection.
    let mut s = ClientSession::new(
        Params {
            tls: TlsMode::Off,
            auth_requires_tls: false,
            auth: Some(("u".into(), "p".into())),
            ..Params::new("client.test")
        },
        now,
    );
    for _ in 0..2 {
        s.connected(now);
        s.handle_input(b"220 mx\r\n250-mx\r\n250 AUTH PLAIN\r\n", now);
        assert_eq!(
            drain_out(&mut s, now),
            b"EHLO client.test\r\nAUTH PLAIN AHUAcA==\r\n"
        );
        s.handle_input(b"235 ok\r\n", now);
        assert_eq!(events(&mut s), vec![Ev::Ready(false)]);
        s.reset(now);
    }
}

#[test]
fn wire_form_bodies_are_not_stuffed_again() {
    let now = t0();
    let mut s = open_session(Params::new("client.test"), EHLO_PIPE, now);
    let mut t = txn(&["x@r.test"], &[b"..already stuffed\r\n"]);
    t.wire = true;
    s.start_transaction(&t, now).unwrap();
    drain_out(&mut s, now);
    s.handle_input(b"250 ok\r\n250 ok\r\n354 go\r\n", now);
    assert_eq!(drain_out(&mut s, now), b"..already stuffed\r\n.\r\n");
}

#[test]
fn timeouts_per_phase_follow_the_clock_argument() {
    let t = Timeouts::default();
    let now = t0();
    let mut s = ClientSession::new(Params::new("client.test"), now);
    assert_eq!(s.poll_timeout(), Some(now + t.connect));
    s.handle_timeout(now + t.connect - Duration::from_millis(1));
    assert!(events(&mut s).is_empty());
    let n1 = now + Duration::from_secs(1);
    s.connected(n1);
    assert_eq!(s.poll_timeout(), Some(n1 + t.helo));
    s.handle_input(b"220 mx\r\n", n1);
    drain_out(&mut s, n1);
    s.handle_input(EHLO_PIPE, n1);
    events(&mut s);
    assert_eq!(s.poll_timeout(), None, "idle: no deadline");
    let n2 = n1 + Duration::from_secs(5);
    s.start_transaction(&txn(&["x@r.test"], &[b"body"]), n2)
        .unwrap();
    assert_eq!(s.poll_timeout(), Some(n2 + t.mail));
    drain_out(&mut s, n2);
    s.handle_input(b"250 ok\r\n", n2);
    assert_eq!(s.poll_timeout(), Some(n2 + t.rcpt));
    s.handle_input(b"250 ok\r\n", n2);
    assert_eq!(s.poll_timeout(), Some(n2 + t.data_init));
    let n3 = n2 + Duration::from_secs(1);
    s.handle_input(b"354 go\r\n", n3);
    assert_eq!(s.phase(), Phase::DataXfer);
    assert_eq!(s.poll_timeout(), Some(n3 + t.data_xfer));
    drain_out(&mut s, n3);
    assert_eq!(s.poll_timeout(), Some(n3 + t.data_done));
    s.handle_timeout(n3 + t.data_done);
    let ev = events(&mut s);
    assert_eq!(
        ev.last(),
        Some(&Ev::Failed(SessionError::Timeout {
            phase: Phase::DataDone
        }))
    );
    // RSET and QUIT.
    let mut s = open_session(Params::new("client.test"), EHLO_PIPE, now);
    s.rset(now).unwrap();
    assert_eq!(s.poll_timeout(), Some(now + t.rset));
    drain_out(&mut s, now);
    s.handle_input(b"250 ok\r\n", now);
    s.quit(now);
    assert_eq!(s.poll_timeout(), Some(now + t.quit));
    s.handle_timeout(now + t.quit);
    assert_eq!(
        events(&mut s).last(),
        Some(&Ev::Failed(SessionError::Timeout { phase: Phase::Quit }))
    );
    // The greeting.
    let mut s = ClientSession::new(Params::new("client.test"), now);
    s.connected(now);
    s.handle_timeout(now + t.helo);
    assert_eq!(
        events(&mut s),
        vec![Ev::Failed(SessionError::Timeout {
            phase: Phase::Greeting
        })]
    );
}

/// DATA mode with two transactions in flight: the second one's commands go in the same write as the first
/// one's content (RFC 2920: content may begin a group), so a message costs one round trip, not two. A
/// transaction that ended before its content (DATA refused after every RCPT was) may leave the server holding
/// its MAIL: an RSET goes before the next MAIL. The RSET asked for by the caller is not doubled.
#[test]
fn data_transactions_follow_the_content_before_them_and_an_rset_follows_a_refused_data() {
    let now = t0();
    let p = Params {
        max_in_flight: 2,
        ..Params::new("client.test")
    };
    let mut s = open_session(p, EHLO_PIPE, now);
    let body: &[&[u8]] = &[b"a\r\n"];
    let a = s.start_transaction(&txn(&["x@r.test"], body), now).unwrap();
    let b = s.start_transaction(&txn(&["y@r.test"], body), now).unwrap();
    let envelope = |r: &str| format!("MAIL FROM:<a@c.test> SIZE=10\r\nRCPT TO:<{r}>\r\nDATA\r\n");
    assert_eq!(
        drain_out(&mut s, now),
        envelope("x@r.test").as_bytes(),
        "the second transaction waits for the first one's 354"
    );
    s.handle_input(b"250 ok\r\n250 ok\r\n354 go\r\n", now);
    assert_eq!(
        drain_out(&mut s, now),
        format!("a\r\n.\r\n{}", envelope("y@r.test")).as_bytes(),
        "the content, its end and the next envelope in one write"
    );
    s.handle_input(b"250 queued\r\n250 ok\r\n250 ok\r\n354 go\r\n", now);
    assert_eq!(drain_out(&mut s, now), b"a\r\n.\r\n");
    s.handle_input(b"250 queued\r\n", now);
    let ev = events(&mut s);
    assert!(ev.contains(&Ev::Msg(a, true)) && ev.contains(&Ev::Msg(b, true)));
    assert!(
        ev.iter().position(|e| *e == Ev::Msg(a, true))
            < ev.iter().position(|e| *e == Ev::Mail(b, 250))
    );

    // The first transaction's only RCPT is refused, so is its DATA: RSET, then the second one's envelope.
    let a = s.start_transaction(&txn(&["x@r.test"], body), now).unwrap();
    let b = s.start_transaction(&txn(&["y@r.test"], body), now).unwrap();
    assert_eq!(drain_out(&mut s, now), envelope("x@r.test").as_bytes());
    s.handle_input(
        b"250 ok\r\n550 5.1.1 unknown\r\n554 5.5.1 no valid recipients\r\n",
        now,
    );
    assert_eq!(
        drain_out(&mut s, now),
        format!("RSET\r\n{}", envelope("y@r.test")).as_bytes()
    );
    s.handle_input(b"250 reset\r\n250 ok\r\n250 ok\r\n354 go\r\n", now);
    assert_eq!(drain_out(&mut s, now), b"a\r\n.\r\n");
    s.handle_input(b"250 queued\r\n", now);
    let ev = events(&mut s);
    assert!(ev.contains(&Ev::Msg(a, false)) && ev.contains(&Ev::Msg(b, true)));
    assert!(ev.contains(&Ev::Rset(250)));

    // A refused MAIL leaves nothing standing: no RSET before the next envelope.
    let a = s.start_transaction(&txn(&["x@r.test"], body), now).unwrap();
    let b = s.start_transaction(&txn(&["y@r.test"], body), now).unwrap();
    drain_out(&mut s, now);
    s.handle_input(
        b"451 4.3.0 try later\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n",
        now,
    );
    assert_eq!(drain_out(&mut s, now), envelope("y@r.test").as_bytes());
    s.handle_input(b"250 ok\r\n250 ok\r\n354 go\r\n", now);
    drain_out(&mut s, now);
    s.handle_input(b"250 queued\r\n", now);
    let ev = events(&mut s);
    assert!(ev.contains(&Ev::Msg(a, false)) && ev.contains(&Ev::Msg(b, true)));

    // The last transaction's DATA refused, then the caller's own RSET: one RSET, not two, and none later.
    let a = s.start_transaction(&txn(&["x@r.test"], body), now).unwrap();
    drain_out(&mut s, now);
    s.handle_input(b"250 ok\r\n250 ok\r\n554 5.7.1 no\r\n", now);
    assert!(events(&mut s).contains(&Ev::Msg(a, false)));
    s.rset(now).unwrap();
    assert_eq!(drain_out(&mut s, now), b"RSET\r\n");
    s.handle_input(b"250 ok\r\n", now);
    s.start_transaction(&txn(&["y@r.test"], body), now).unwrap();
    assert_eq!(drain_out(&mut s, now), envelope("y@r.test").as_bytes());
}

#[test]
fn chunking_sends_whole_transactions_and_keeps_a_window() {
    let now = t0();
    let p = Params {
        chunking: true,
        max_in_flight: 3,
        ..Params::new("client.test")
    };
    let mut s = open_session(p, b"250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n", now);
    let body: &[&[u8]] = &[b"a\r\n", b".b\r\n"];
    let ids: Vec<TxnId> = (0..3)
        .map(|_| s.start_transaction(&txn(&["x@r.test"], body), now).unwrap())
        .collect();
    assert_eq!(
        s.start_transaction(&txn(&["x@r.test"], body), now),
        Err(CommandError::Busy(3))
    );
    s.quit(now);
    let one = b"MAIL FROM:<a@c.test>\r\nRCPT TO:<x@r.test>\r\nBDAT 7 LAST\r\na\r\n.b\r\n".to_vec();
    let mut want = one.repeat(3);
    want.extend_from_slice(b"QUIT\r\n");
    assert_eq!(drain_out(&mut s, now), want);
    s.handle_input(&b"250 ok\r\n250 ok\r\n250 queued as A\r\n".repeat(3), now);
    s.handle_input(b"221 bye\r\n", now);
    let ev = events(&mut s);
    for id in &ids {
        assert!(ev.contains(&Ev::Msg(*id, true)));
    }
    assert_eq!(ev.last(), Some(&Ev::Closed));
}

/// The client session against the server session, through byte buffers: `total` messages over one
/// connection, up to `params.max_in_flight` at once; the server's replies reach the client `chunk` bytes at a
/// time. Returns the messages as the server stored them and as they were handed to the client.
fn through_the_server_session(
    params: Params,
    total: usize,
    chunk: usize,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>, usize) {
    use crate::config::{Config, ListenerKind};
    use crate::smtp::data::BareNewline;
    use crate::smtp::session::{Action, Session, SessionConfig};
    use std::sync::Arc;
    let c = Config {
        mydestination: vec!["localhost".into()],
        local: crate::config::LocalConfig {
            accept_unknown_users: true,
            system_users: false,
            ..Default::default()
        },
        ..Config::default()
    };
    let scfg = Arc::new(SessionConfig {
        hostname: "mx.test".into(),
        kind: ListenerKind::Smtp,
        message_size_limit: 1 << 20,
        recipient_limit: 100,
        hard_error_limit: 20,
        line_length_limit: 2048,
        bare_newline: BareNewline::Normal,
        smtp_line_length_limit: 998,
        tls_available: false,
        auth_available: false,
        allow_plaintext_auth: false,
    });
    let c = Arc::new(c);
    let check = crate::policy::RecipientCheck::new(
        Arc::new(crate::policy::RelayPolicy::new(&c)),
        Arc::new(crate::local::recipients::RecipientTable::load(c).unwrap()),
    );
    let window = params.max_in_flight.max(1);
    let mut server = Session::new(scfg, "127.0.0.1".parse().unwrap(), true);
    let now = t0();
    let mut client = ClientSession::new(params, now);
    client.connected(now);
    let mut to_client = Vec::new();
    server.greeting().write_to(&mut to_client);
    let mut to_server: Vec<u8> = Vec::new();
    let mut stored: Vec<Vec<u8>> = Vec::new();
    let mut sent_bodies: Vec<Vec<u8>> = Vec::new();
    let mut accepted = 0usize;
    let mut ready = false;
    let mut next = 0usize;
    let mut peak = 0usize;
    for _round in 0..1_000_000 {
        let take = to_client.len().min(chunk);
        if take > 0 {
            let part: Vec<u8> = to_client.drain(..take).collect();
            client.handle_input(&part, now);
        }
        while let Some(e) = client.poll_event() {
            match e {
                Event::Ready { caps, .. } => {
                    assert!(caps.pipelining);
                    ready = true;
                }
                Event::MessageDone { accepted: a, .. } => {
                    assert!(a, "message refused");
                    accepted += 1;
                }
                Event::Failed(e) => panic!("client failed: {e}"),
                _ => {}
            }
        }
        while ready && client.in_flight() < window && next < total {
            let body =
                format!("Subject: m{next}\r\n\r\n.line with a dot {next}\r\nbody\r\n..two\r\n")
                    .into_bytes();
            let rcpt = format!("u{next}@localhost");
            client
                .start_transaction(
                    &Transaction {
                        sender: "a@c.test",
                        recipients: &[rcpt.as_str()],
                        body: &[&body],
                        size: body.len() as u64,
                        eight_bit: false,
                        smtputf8: false,
                        wire: false,
                        external: 0,
                    },
                    now,
                )
                .unwrap();
            sent_bodies.push(body);
            next += 1;
        }
        peak = peak.max(client.in_flight());
        if ready && client.in_flight() == 0 && next == total && !client.is_closed() {
            client.quit(now);
        }
        while let Some(b) = client.poll_transmit() {
            to_server.extend_from_slice(b);
            let n = b.len();
            client.advance_transmit(n, now);
        }
        let mut out = Vec::new();
        loop {
            let (n, act) = server.feed(&to_server, &mut out);
            to_server.drain(..n);
            match act {
                Action::Message => {
                    stored.push(server.transaction().data.clone());
                    let id = format!("Q{}", stored.len());
                    let _ = server.message_done(Ok(&id), &mut out);
                }
                Action::Recipient(req) => {
                    let v = check.check(req, server.targets_mut());
                    let _ = server.rcpt_result(v, &mut out);
                }
                Action::NeedMore | Action::Close => break,
                other => panic!("unexpected server action {other:?}"),
            }
        }
        to_client.extend_from_slice(&out);
        if client.is_closed() {
            break;
        }
    }
    assert!(client.is_closed(), "QUIT answered");
    assert_eq!(accepted, total);
    (stored, sent_bodies, peak)
}

fn assert_intact(stored: &[Vec<u8>], sent: &[Vec<u8>], total: usize) {
    assert_eq!(stored.len(), total);
    assert_eq!(sent.len(), total);
    for (i, (got, sent)) in stored.iter().zip(sent).enumerate() {
        assert!(got.ends_with(sent), "message {i} not intact");
        assert!(String::from_utf8_lossy(got).contains(&format!("Subject: m{i}\r\n")));
    }
}

#[test]
fn thousand_messages_through_the_server_session() {
    let (stored, sent, peak) =
        through_the_server_session(Params::new("client.test"), 1000, usize::MAX);
    assert_intact(&stored, &sent, 1000);
    assert_eq!(peak, 1);
}

#[test]
fn thousand_chunked_messages_eight_in_flight_replies_byte_by_byte() {
    let p = Params {
        chunking: true,
        max_in_flight: 8,
        ..Params::new("client.test")
    };
    let (stored, sent, peak) = through_the_server_session(p, 1000, 1);
    assert_intact(&stored, &sent, 1000);
    assert_eq!(peak, 8, "eight transactions on the wire at once");
}

#[test]
fn external_content_is_written_by_the_caller_between_the_commands() {
    let now = t0();
    let p = Params {
        chunking: true,
        max_in_flight: 2,
        ..Params::new("client.test")
    };
    let mut s = open_session(p, b"250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n", now);
    let big = b"0123456789".repeat(10);
    let mut ids = Vec::new();
    for _ in 0..2 {
        let mut t = txn(&["x@r.test"], &[b"H: 1\r\n"]);
        t.external = big.len();
        ids.push(s.start_transaction(&t, now).unwrap());
    }
    // The caller's pump: the session's bytes up to each hole, then its own content.
    let mut wire = Vec::new();
    let mut externals = 0;
    loop {
        if let Some(b) = s.poll_transmit() {
            assert!(s.poll_external().is_none());
            wire.extend_from_slice(b);
            let n = b.len();
            s.advance_transmit(n, now);
        } else if let Some(n) = s.poll_external() {
            assert_eq!(n, big.len());
            assert_eq!(s.phase(), Phase::DataXfer);
            assert!(s.poll_timeout().is_some());
            wire.extend_from_slice(&big);
            s.external_written(now);
            externals += 1;
        } else {
            break;
        }
    }
    assert_eq!(externals, 2);
    let one = [
        &b"MAIL FROM:<a@c.test>\r\nRCPT TO:<x@r.test>\r\nBDAT 106 LAST\r\nH: 1\r\n"[..],
        &big,
    ]
    .concat();
    assert_eq!(wire, one.repeat(2));
    s.handle_input(&b"250 ok\r\n250 ok\r\n250 queued\r\n".repeat(2), now);
    let ev = events(&mut s);
    assert!(ev.contains(&Ev::Msg(ids[0], true)) && ev.contains(&Ev::Msg(ids[1], true)));
    assert_eq!(s.poll_timeout(), None, "idle again");
    // Only with BDAT.
    let mut s = open_session(Params::new("client.test"), EHLO_PIPE, now);
    let mut t = txn(&["x@r.test"], &[b"x"]);
    t.external = 5;
    assert_eq!(
        s.start_transaction(&t, now),
        Err(CommandError::ExternalNeedsBdat)
    );
}

#[test]
fn verify_only_sends_no_content_lockstep_and_pipelined() {
    let now = t0();
    let verify = TxnOptions {
        verify_only: true,
        ..TxnOptions::default()
    };
    let rcpts = ["x@r.test", "y@r.test"];
    // Lockstep: MAIL, each RCPT, then the transaction ends without DATA.
    let mut s = open_session(Params::new("client.test"), b"250 mx.test\r\n", now);
    let id = s
        .start_transaction_with(&txn(&rcpts, &[b"never sent\r\n"]), &verify, now)
        .unwrap();
    assert_eq!(drain_out(&mut s, now), b"MAIL FROM:<a@c.test>\r\n");
    s.handle_input(b"250 ok\r\n", now);
    assert_eq!(drain_out(&mut s, now), b"RCPT TO:<x@r.test>\r\n");
    s.handle_input(b"250 ok\r\n", now);
    assert_eq!(drain_out(&mut s, now), b"RCPT TO:<y@r.test>\r\n");
    s.handle_input(b"550 5.1.1 unknown\r\n", now);
    assert_eq!(drain_out(&mut s, now), b"", "no DATA after the last RCPT");
    assert_eq!(
        events(&mut s),
        vec![
            Ev::Mail(id, 250),
            Ev::Rcpt(id, 0, 250),
            Ev::Rcpt(id, 1, 550),
            Ev::Msg(id, true)
        ]
    );
    assert_eq!(s.in_flight(), 0);
    s.rset(now).unwrap();
    s.quit(now);
    assert_eq!(drain_out(&mut s, now), b"RSET\r\nQUIT\r\n");
    s.handle_input(b"250 ok\r\n221 bye\r\n", now);
    assert_eq!(events(&mut s), vec![Ev::Rset(250), Ev::Closed]);

    // Pipelined: the envelope and the RSET in one write, no DATA; every recipient refused is not accepted.
    let mut s = open_session(Params::new("client.test"), EHLO_PIPE, now);
    let id = s
        .start_transaction_with(&txn(&rcpts, &[b"never sent\r\n"]), &verify, now)
        .unwrap();
    s.rset(now).unwrap();
    assert_eq!(
        drain_out(&mut s, now),
        b"MAIL FROM:<a@c.test> SIZE=10\r\nRCPT TO:<x@r.test>\r\nRCPT TO:<y@r.test>\r\nRSET\r\n"
    );
    s.handle_input(
        b"250 ok\r\n550 5.7.1 relay denied\r\n550 5.1.1 unknown\r\n250 ok\r\n",
        now,
    );
    assert_eq!(
        events(&mut s),
        vec![
            Ev::Mail(id, 250),
            Ev::Rcpt(id, 0, 550),
            Ev::Rcpt(id, 1, 550),
            Ev::Msg(id, false),
            Ev::Rset(250)
        ]
    );
    assert!(s.is_open() && s.in_flight() == 0);
}

#[test]
fn dsn_parameters_go_out_only_when_dsn_is_offered() {
    use crate::smtp::dsn::{Notify, Orcpt, RcptDsn, Ret};
    let now = t0();
    let rcpt_dsn = [RcptDsn {
        notify: Notify::parse("SUCCESS,FAILURE").ok(),
        orcpt: Some(Orcpt {
            addr_type: "rfc822".into(),
            address: "Orig+1=x@r.test".into(),
        }),
    }];
    let opts = TxnOptions {
        ret: Some(Ret::Hdrs),
        envid: Some("env 1"),
        rcpt_dsn: &rcpt_dsn,
        ..TxnOptions::default()
    };
    let rcpts = ["x@r.test"];
    let mut s = open_session(Params::new("client.test"), b"250 mx.test\r\n", now);
    s.start_transaction_with(&txn(&rcpts, &[b"hi\r\n"]), &opts, now)
        .unwrap();
    assert_eq!(drain_out(&mut s, now), b"MAIL FROM:<a@c.test>\r\n");
    s.handle_input(b"250 ok\r\n", now);
    assert_eq!(drain_out(&mut s, now), b"RCPT TO:<x@r.test>\r\n");

    let mut s = open_session(
        Params::new("client.test"),
        b"250-mx.test\r\n250 DSN\r\n",
        now,
    );
    assert!(s.capabilities().dsn);
    s.start_transaction_with(&txn(&rcpts, &[b"hi\r\n"]), &opts, now)
        .unwrap();
    assert_eq!(
        drain_out(&mut s, now),
        b"MAIL FROM:<a@c.test> RET=HDRS ENVID=env+201\r\n"
    );
    s.handle_input(b"250 ok\r\n", now);
    assert_eq!(
        drain_out(&mut s, now),
        b"RCPT TO:<x@r.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Orig+2B1+3Dx@r.test\r\n"
    );
}
