use super::*;
use crate::smtp::reply;

/// The message part of each text line (after `shardmta/<component>[pid]: `), with its component.
fn messages(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(|l| {
            let (ts, rest) = l.split_once(' ').unwrap();
            assert_eq!(ts.len(), TIMESTAMP_LEN, "{l}");
            let (tag, msg) = rest.split_once(": ").unwrap();
            let component = tag
                .strip_prefix("shardmta/")
                .and_then(|t| t.strip_suffix(&format!("[{}]", std::process::id())))
                .unwrap_or_else(|| panic!("tag {tag:?}"));
            (component.to_string(), msg.to_string())
        })
        .collect()
}

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn id() -> QueueId {
    QueueId(0x6B11_7F96_0000_0001)
}

#[test]
fn timestamps_are_rfc3339_utc_with_milliseconds() {
    let at = |ms: u64| {
        let mut b = [0u8; TIMESTAMP_LEN];
        timestamp(UNIX_EPOCH + std::time::Duration::from_millis(ms), &mut b).to_string()
    };
    assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
    // A leap day, the last millisecond of it.
    assert_eq!(at(951_868_799_999), "2000-02-29T23:59:59.999Z");
    assert_eq!(at(1_748_772_000_123), "2025-06-01T10:00:00.123Z");
    assert_eq!(at(4_102_444_800_000), "2100-01-01T00:00:00.000Z");
}

#[test]
fn dsn_is_read_from_replies_and_diagnostics() {
    let d = |s: &str, class: u8| Dsn(s, class).to_string();
    assert_eq!(d("250 2.0.0 Ok: queued as X", 2), "2.0.0");
    assert_eq!(d("550-5.1.1 no such user", 5), "5.1.1");
    assert_eq!(d("451 4.7.500 busy", 4), "4.7.500");
    assert_eq!(d("4.4.1 connection refused", 4), "4.4.1");
    assert_eq!(d("451 try later", 4), "4.0.0");
    assert_eq!(d("250 Ok", 2), "2.0.0");
    // A code and an enhanced code of another class: the code's class.
    assert_eq!(d("550 4.1.1 odd", 5), "5.0.0");
    assert_eq!(d("lost connection with mx: reset", 4), "4.0.0");
    assert_eq!(d("", 5), "5.0.0");
    assert_eq!(d("4.4.7x", 4), "4.0.0");
}

#[test]
fn foreign_text_stays_on_one_line_and_bounded() {
    assert_eq!(
        Clean("a\r\nb\tc\x1b[31m\u{85}d").to_string(),
        "a??b?c?[31m?d"
    );
    let long = "é".repeat(limits::EVENTLOG_FIELD_BYTES_MAX);
    let shown = Clean(&long).to_string();
    assert!(shown.ends_with("..."));
    assert!(shown.len() <= limits::EVENTLOG_FIELD_BYTES_MAX + 3);
    // Non-ASCII text (SMTPUTF8 addresses) is kept as it is.
    assert_eq!(Clean("jörg@exämple.test").to_string(), "jörg@exämple.test");
}

#[test]
fn message_ids_are_found_in_the_header_section_only() {
    assert_eq!(
        message_id(b"Subject: x\r\nMessage-ID: <a@b>\r\n\r\nbody"),
        Some("<a@b>")
    );
    assert_eq!(
        message_id(b"MESSAGE-id:\r\n\t<folded@b> (comment)\r\n\r\n"),
        Some("<folded@b>")
    );
    assert_eq!(
        message_id(b"message-id: bare-id@b\r\n\r\n"),
        Some("bare-id@b")
    );
    // In the body, it is not the message's.
    assert_eq!(message_id(b"Subject: x\r\n\r\nMessage-ID: <a@b>\r\n"), None);
    assert_eq!(message_id(b"Message-IDx: <a@b>\r\n\r\n"), None);
    assert_eq!(message_id(b"Message-ID:\r\n\r\n"), None);
    assert_eq!(message_id(b""), None);
    // An unclosed bracket runs to the end of what is scanned, never past it.
    let mut big = b"Message-ID: <".to_vec();
    big.resize(limits::EVENTLOG_HEADER_SCAN_BYTES_MAX * 2, b'a');
    assert!(message_id(&big).is_none());
}

#[test]
fn smtpd_lines_read_as_postfix_writes_them() {
    let ip: IpAddr = "192.0.2.7".parse().unwrap();
    let text = capture(LogFormat::Text, || {
        connect(ip);
        reject(&Rejection {
            stage: "RCPT",
            client: ip,
            reply: &reply::RELAY_DENIED,
            sender: Some("a@b.test"),
            rcpt: Some("x@y.test"),
            proto: "ESMTP",
            helo: Some("client\r\nfake"),
        });
        reject(&Rejection {
            stage: "CONNECT",
            client: ip,
            reply: &reply::TOO_MANY_CONNECTIONS,
            sender: None,
            rcpt: None,
            proto: "SMTP",
            helo: None,
        });
        auth_failed(ip, "LOGIN", Some("alice"), "authentication failure");
        too_many_errors(ip, "RCPT");
        lost_connection(ip, "DATA", true);
        disconnect(ip, &"ehlo=1 commands=1", 1, 1);
    });
    let m = messages(&text);
    let smtpd = |s: &str| ("smtpd".to_string(), s.to_string());
    assert_eq!(
        m,
        vec![
            smtpd("connect from unknown[192.0.2.7]"),
            smtpd("NOQUEUE: reject: RCPT from unknown[192.0.2.7]: 554 5.7.1 <x@y.test>: Relay access denied; from=<a@b.test> to=<x@y.test> proto=ESMTP helo=<client??fake>"),
            smtpd("NOQUEUE: reject: CONNECT from unknown[192.0.2.7]: 421 4.7.0 Error: too many connections; proto=SMTP"),
            smtpd("warning: unknown[192.0.2.7]: SASL LOGIN authentication failed: authentication failure"),
            smtpd("too many errors after RCPT from unknown[192.0.2.7]"),
            smtpd("timeout after DATA from unknown[192.0.2.7]"),
            smtpd("disconnect from unknown[192.0.2.7] ehlo=1 commands=1"),
        ]
    );
}

#[test]
fn reception_delivery_and_queue_lines() {
    let ip: IpAddr = "2001:db8::7".parse().unwrap();
    let text = capture(LogFormat::Text, || {
        received(&Reception {
            queue_id: id(),
            client: ip,
            helo: "client.test",
            proto: "ESMTPSA",
            sender: "a@b.test",
            size: 1234,
            nrcpt: 2,
            message_id: Some("<m@b.test>"),
            tls: Some("TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384"),
            sasl_method: Some("PLAIN"),
            sasl_username: Some("alice"),
        });
        received(&Reception {
            queue_id: id(),
            client: ip,
            helo: "unknown",
            proto: "SMTP",
            sender: "",
            size: 10,
            nrcpt: 1,
            message_id: None,
            tls: None,
            sasl_method: None,
            sasl_username: None,
        });
        let mx = Relay::Host {
            host: "mx.dest.test",
            ip: "192.0.2.25".parse().unwrap(),
            port: Some(25),
        };
        for (status, reply, relay) in [
            (Status::Sent, "250 2.0.0 Ok: queued as X", mx),
            (Status::Deferred, "4.4.1 connection refused", Relay::None),
            (
                Status::Bounced,
                "550 5.1.1 <r@dest.test>: no\r\nsuch user",
                mx,
            ),
            (Status::Expired { returned: true }, "451 4.7.0 later", mx),
            (Status::Expired { returned: false }, "451 later", mx),
            (Status::Sent, "250 2.0.0 delivered", Relay::Local),
        ] {
            delivery(&Attempt {
                queue_id: id(),
                rcpt: "r@dest.test",
                relay,
                delay_s: 1.5,
                attempt: 1,
                status,
                reply,
                tls: None,
                tls_policy: None,
                class: None,
                source: None,
            });
        }
        bounce_queued(id(), QueueId(2));
        bounce_dropped(id());
        removed(id());
        queue_changed(id(), QueueChange::Held, "held by the administrator");
        queue_changed(id(), QueueChange::Released, "");
    });
    let qid = id().to_string();
    let line = |c: &str, m: &str| (c.to_string(), format!("{qid}: {m}"));
    assert_eq!(
        messages(&text),
        vec![
            line("smtpd", "client=unknown[2001:db8::7], helo=<client.test>, proto=ESMTPSA, from=<a@b.test>, size=1234, nrcpt=2, message-id=<m@b.test>, tls=TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384, sasl_method=PLAIN, sasl_username=alice"),
            line("smtpd", "client=unknown[2001:db8::7], helo=<unknown>, proto=SMTP, from=<>, size=10, nrcpt=1"),
            line("smtp", "to=<r@dest.test>, relay=mx.dest.test[192.0.2.25]:25, delay=1.50, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as X)"),
            line("smtp", "to=<r@dest.test>, relay=none, delay=1.50, dsn=4.4.1, status=deferred (4.4.1 connection refused)"),
            line("smtp", "to=<r@dest.test>, relay=mx.dest.test[192.0.2.25]:25, delay=1.50, dsn=5.1.1, status=bounced (550 5.1.1 <r@dest.test>: no??such user)"),
            line("smtp", "to=<r@dest.test>, relay=mx.dest.test[192.0.2.25]:25, delay=1.50, dsn=4.4.7, status=expired, returned to sender (451 4.7.0 later)"),
            line("smtp", "to=<r@dest.test>, relay=mx.dest.test[192.0.2.25]:25, delay=1.50, dsn=4.4.7, status=expired, not returned (null sender) (451 later)"),
            line("local", "to=<r@dest.test>, relay=local, delay=1.50, dsn=2.0.0, status=sent (250 2.0.0 delivered)"),
            line("bounce", &format!("sender non-delivery notification: {}", QueueId(2))),
            line("qmgr", "no non-delivery notification: the sender is null (a bounce is not bounced)"),
            line("qmgr", "removed"),
            line("postsuper", "placed on hold (held by the administrator)"),
            line("postsuper", "released from hold"),
        ]
    );
}

#[test]
fn json_lines_carry_the_fields_and_escape_what_they_must() {
    let ip: IpAddr = "192.0.2.7".parse().unwrap();
    let text = capture(LogFormat::Json, || {
        reject(&Rejection {
            stage: "RCPT",
            client: ip,
            reply: &reply::USER_UNKNOWN,
            sender: Some("a\"quote\\@b.test"),
            rcpt: Some("x@y.test"),
            proto: "ESMTP",
            helo: None,
        });
        received(&Reception {
            queue_id: id(),
            client: ip,
            helo: "h\u{1}",
            proto: "ESMTP",
            sender: "a@b.test",
            size: 99,
            nrcpt: 3,
            message_id: None,
            tls: None,
            sasl_method: None,
            sasl_username: None,
        });
        delivery(&Attempt {
            queue_id: id(),
            rcpt: "r@dest.test",
            relay: Relay::None,
            delay_s: 0.25,
            attempt: 3,
            status: Status::Expired { returned: true },
            reply: "451 4.7.0 later",
            tls: Some("TLSv1.3"),
            tls_policy: Some("mta-sts-enforce"),
            class: Some("rate_limit"),
            source: None,
        });
        queue_changed(id(), QueueChange::Deleted, "");
        tracing::warn!(target: MASTER, "a notice with \"quotes\"\nand a newline");
    });
    let v = json_lines(&text);
    assert_eq!(v.len(), 5, "{text}");
    for e in &v {
        assert_eq!(e["ts"].as_str().unwrap().len(), TIMESTAMP_LEN);
    }
    let r = &v[0];
    assert_eq!(r["level"], "info");
    assert_eq!(r["component"], "smtpd");
    assert_eq!(r["event"], "reject");
    assert_eq!(r["stage"], "RCPT");
    assert_eq!(r["client_ip"], "192.0.2.7");
    assert_eq!(r["code"], 550);
    assert_eq!(r["dsn"], "5.1.1");
    assert_eq!(
        r["reason"],
        "Recipient address rejected: User unknown in local recipient table"
    );
    assert_eq!(r["sender"], "a\"quote\\@b.test");
    assert_eq!(r["rcpt"], "x@y.test");
    assert!(r.get("helo").is_none(), "{r}");
    assert!(r["message"]
        .as_str()
        .unwrap()
        .starts_with("NOQUEUE: reject: RCPT from unknown[192.0.2.7]: 550 5.1.1 <x@y.test>:"));
    let rec = &v[1];
    assert_eq!(rec["event"], "received");
    assert_eq!(rec["queue_id"], id().to_string());
    assert_eq!(rec["helo"], "h?");
    assert_eq!(rec["size"], 99);
    assert_eq!(rec["nrcpt"], 3);
    assert!(rec.get("message_id").is_none() && rec.get("tls").is_none());
    let d = &v[2];
    assert_eq!(d["component"], "smtp");
    assert_eq!(d["event"], "delivery");
    assert_eq!(d["status"], "expired");
    assert_eq!(d["dsn"], "4.4.7");
    assert_eq!(d["relay"], "none");
    assert_eq!(d["delay_s"], 0.25);
    assert_eq!(d["attempt"], 3);
    assert_eq!(d["tls"], "TLSv1.3");
    assert_eq!(d["class"], "rate_limit");
    assert!(v[0].get("class").is_none());
    assert_eq!(d["tls_policy"], "mta-sts-enforce");
    assert!(
        d["message"].as_str().is_some_and(|m| m.ends_with(
            "delay=0.25, dsn=4.4.7, status=expired, returned to sender (451 4.7.0 later), tls_policy=mta-sts-enforce, class=rate_limit"
        )),
        "{d}"
    );
    assert_eq!(v[3]["action"], "delete");
    assert!(v[3].get("reason").is_none());
    assert_eq!(v[4]["level"], "warning");
    assert_eq!(v[4]["component"], "master");
    assert_eq!(v[4]["message"], "a notice with \"quotes\"\nand a newline");
    // Text mode keeps that notice on one line.
    let text = capture(LogFormat::Text, || {
        tracing::error!(target: QUEUE, "two\nlines");
    });
    assert_eq!(
        messages(&text),
        vec![("queue".to_string(), "error: two?lines".to_string())]
    );
}

/// The writer end: lines are batched until the batch ends; a reopen request takes effect at the next batch,
/// so after logrotate's rename the lines go to a new file with the old name.
#[test]
fn the_sink_reopens_its_file_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mail.log");
    let reopen = Arc::new(AtomicBool::new(false));
    let mut sink = LineSink {
        target: Target::File {
            file: open_log_file(&path).unwrap(),
            path: path.clone(),
        },
        pending: Vec::new(),
        reopen: reopen.clone(),
        failing: false,
    };
    sink.write_all(b"one\n").unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "", "batched");
    sink.flush().unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\n");
    let rotated = dir.path().join("mail.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    sink.write_all(b"two\n").unwrap();
    sink.flush().unwrap();
    assert_eq!(std::fs::read_to_string(&rotated).unwrap(), "one\ntwo\n");
    reopen.store(true, Ordering::SeqCst);
    sink.write_all(b"three\n").unwrap();
    sink.flush().unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "three\n");
    assert_eq!(std::fs::read_to_string(&rotated).unwrap(), "one\ntwo\n");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o640
    );
    // A big batch is written as it grows, never held whole.
    for _ in 0..(3 * limits::EVENTLOG_WRITE_BUFFER_BYTES / 100) {
        sink.write_all(&[b'x'; 99]).unwrap();
        sink.write_all(b"\n").unwrap();
    }
    assert!(sink.pending.len() <= limits::EVENTLOG_WRITE_BUFFER_BYTES);
}

#[test]
fn a_planted_symlink_or_fifo_is_not_opened() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("shadow");
    std::fs::write(&target, "secret\n").unwrap();
    let link = dir.path().join("mail.log");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert!(open_log_file(&link).is_err());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "secret\n");
    let fifo = dir.path().join("fifo.log");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // Refused without blocking: with no reader, open fails (ENXIO); with one, it is not a regular file.
    assert!(open_log_file(&fifo).is_err());
    use std::os::unix::fs::OpenOptionsExt;
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let e = open_log_file(&fifo).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
}
