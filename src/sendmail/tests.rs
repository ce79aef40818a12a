use super::*;

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

fn parse(s: &str) -> Options {
    parse_args(&args(s)).unwrap_or_else(|e| panic!("{s}: {e}"))
}

#[test]
fn options() {
    let o = parse("-oi -f app@x.test -Fname a@b.test c@d.test");
    assert_eq!(
        o,
        Options {
            from: Some("app@x.test".into()),
            full_name: Some("name".into()),
            ignore_dots: true,
            recipients: vec!["a@b.test".into(), "c@d.test".into()],
            ..Options::default()
        }
    );
    assert!(parse("-t").extract_recipients);
    assert_eq!(parse("-fme@x.test a@b").from.as_deref(), Some("me@x.test"));
    assert_eq!(
        parse("-r <me@x.test> a@b").from.as_deref(),
        Some("me@x.test")
    );
    assert_eq!(parse("-f <> a@b").from.as_deref(), Some(""));
    // Each argument is an address list; options may follow recipients; after `--` all are recipients.
    assert_eq!(
        parse("a@x,b@y -i -- -c@z").recipients,
        vec!["a@x", "b@y", "-c@z"]
    );
    assert!(parse_args(&args("-i")).is_err(), "no recipients");
    assert!(parse_args(&args("-Z a@b")).is_err());
    assert!(parse_args(&args("-bd")).is_err());
    assert!(parse_args(&args("-bx a@b")).is_err());
    assert!(parse_args(&args("a@b -f")).is_err(), "-f without a value");
    assert!(parse_args(&args("-B 9BIT a@b")).is_err());
    assert!(parse_args(&args("-R hdrs -V env.id-1 a@b")).is_ok());
    assert!(parse_args(&args("-R some a@b")).is_err());
    assert!(parse_args(&["-V".into(), "with space".into(), "a@b".into()]).is_err());
    assert!(
        parse_args(&["-f".into(), "a@b\r\nRCPT TO:<x@y>".into(), "c@d".into()]).is_err(),
        "a CR or LF in an address could inject a command"
    );
    assert!(parse_args(&["a@b\nc@d".into()]).is_err());
    assert!(parse_args(&["-F".into(), "Name\nBcc: x@y".into(), "a@b".into()]).is_err());
}

#[test]
fn callers_option_sets() {
    // cronie: recipients from the To header, sender root.
    let o = parse("-FCronDaemon -i -odi -oem -oi -t -f root");
    assert_eq!(
        o,
        Options {
            from: Some("root".into()),
            full_name: Some("CronDaemon".into()),
            extract_recipients: true,
            ignore_dots: true,
            ..Options::default()
        }
    );
    // Debian's cron (both orders seen in the wild).
    for line in [
        "-FCronDaemon -i -B8BITMIME -oem root",
        "-i -FCronDaemon -B8BITMIME -oem root",
    ] {
        let o = parse(line);
        assert_eq!(
            o,
            Options {
                full_name: Some("CronDaemon".into()),
                ignore_dots: true,
                eight_bit: true,
                recipients: vec!["root".into()],
                ..Options::default()
            },
            "{line}"
        );
    }
    // systemd-cron, busybox, Symfony Mailer, PHP's mail().
    let o = parse("-i -B 8BITMIME user@example.org");
    assert!(o.eight_bit && o.ignore_dots && o.recipients == ["user@example.org"]);
    let o = parse("-ti");
    assert!(o.extract_recipients && o.ignore_dots);
    assert_eq!(parse("-bs").mode, Mode::Smtp);
    let o = parse("-t -i -fapp@example.org");
    assert!(o.extract_recipients && o.from.as_deref() == Some("app@example.org"));
    let o = parse("-t -i -odb -oA/etc/aliases -o m -v -U -G -n -x -m -c -h 5 -L label -X /dev/null -O Opt=1 -p smtp -e q -A m");
    assert!(
        o.extract_recipients && o.ignore_dots,
        "ignored options keep their values"
    );
}

#[test]
fn modes_and_invocation_names() {
    assert_eq!(parse("-bp").mode, Mode::ListQueue);
    assert_eq!(parse("-bi").mode, Mode::NewAliases);
    assert_eq!(parse("-I").mode, Mode::NewAliases);
    assert_eq!(parse("-bv root").mode, Mode::Verify);
    assert!(parse_args(&args("-bv")).is_err(), "-bv needs recipients");
    assert_eq!(parse("-bm a@b").mode, Mode::Deliver);
    assert_eq!(
        parse("-bs -bm a@b").mode,
        Mode::Deliver,
        "the last -b counts"
    );
    let o = parse("-q");
    assert!(o.mode == Mode::Flush && o.notes.is_empty());
    let o = parse("-q30m");
    assert_eq!(o.mode, Mode::Flush);
    assert!(o.notes[0].contains("-q30m"), "{:?}", o.notes);
    assert_eq!(invoked_as("/usr/sbin/sendmail"), Some(Mode::Deliver));
    assert_eq!(invoked_as("mailq"), Some(Mode::ListQueue));
    assert_eq!(invoked_as("/usr/bin/newaliases"), Some(Mode::NewAliases));
    assert_eq!(invoked_as("/usr/local/bin/shardmta"), None);
    let o = parse_command_line(Mode::ListQueue, &[]).unwrap();
    assert_eq!(o.mode, Mode::ListQueue, "mailq needs no recipients");
    let o = parse_command_line(Mode::NewAliases, &args("-C /etc/x.toml")).unwrap();
    assert_eq!(o.config.as_deref(), Some(Path::new("/etc/x.toml")));
}

#[test]
fn notify_values() {
    assert_eq!(parse("-N never a@b").notify.as_deref(), Some("NEVER"));
    assert_eq!(
        parse("-N success,Failure,delay a@b").notify.as_deref(),
        Some("SUCCESS,FAILURE,DELAY")
    );
    assert_eq!(parse("-Nfailure a@b").notify.as_deref(), Some("FAILURE"));
    for bad in [
        "never,success",
        "sometimes",
        "",
        "success,success",
        "failure,",
    ] {
        assert!(parse_notify(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn bare_names_get_myhostname() {
    assert_eq!(qualify("root", "mx.test"), "root@mx.test");
    assert_eq!(qualify("root@other.test", "mx.test"), "root@other.test");
    assert_eq!(qualify("", "mx.test"), "", "the null sender stays null");
    assert_eq!(qualify("\"a@b\"", "mx.test"), "\"a@b\"@mx.test");
}

#[test]
fn address_lists() {
    assert_eq!(
        address_list(
            "a@b, \"Doe, J.\" <c@d>, root (Cron, Daemon), team: e@f, g@h;, <i@[1.2.3.4]> (x)"
        ),
        vec!["a@b", "c@d", "root", "e@f", "g@h", "i@[1.2.3.4]"]
    );
    assert_eq!(
        address_list("undisclosed-recipients:;"),
        Vec::<String>::new()
    );
    assert_eq!(
        address_list("\"john doe\"@x.test"),
        vec!["\"john doe\"@x.test"]
    );
    assert_eq!(
        address_list("two words, ok@x"),
        vec!["ok@x"],
        "an entry that is no address is skipped"
    );
    assert_eq!(
        address_list("A\r\n <a@x>,\r\n\tb@y"),
        vec!["a@x", "b@y"],
        "folded"
    );
}

#[test]
fn dots_and_line_ends() {
    assert_eq!(
        read_message(&b"a\nb\n.\nc\n"[..], false).unwrap(),
        b"a\r\nb\r\n"
    );
    assert_eq!(
        read_message(&b"a\n.\nc"[..], true).unwrap(),
        b"a\r\n.\r\nc\r\n"
    );
}

#[test]
fn t_extracts_and_drops_bcc() {
    let m = b"To: A <a@x.test>, b@y.test\r\nCc: c@z.test\r\nBcc: hidden@w.test,\r\n other@w.test\r\nSubject: s\r\n\r\nBcc: body@q.test\r\n";
    let (r, out) = extract_recipients(m);
    assert_eq!(
        r,
        vec![
            "a@x.test",
            "b@y.test",
            "c@z.test",
            "hidden@w.test",
            "other@w.test"
        ]
    );
    let out = String::from_utf8(out).unwrap();
    assert!(
        !out.contains("hidden")
            && !out.contains("other@w")
            && out.contains("Subject: s")
            && out.ends_with("Bcc: body@q.test\r\n")
    );
    // cronie's message: a bare name, the From with a comment.
    let (r, _) = extract_recipients(
        b"From: root (Cron Daemon)\r\nTo: root\r\nSubject: Cron <root@h> ls\r\n\r\nout\r\n",
    );
    assert_eq!(r, vec!["root"]);
}

const V: HeaderValues<'static> = HeaderValues {
    date: "Thu, 1 Jan 2026 00:00:00 +0000",
    message_id: "<1.2@mx.test>",
    from: "CronDaemon <root@mx.test>",
};

fn added(msg: &[u8]) -> String {
    String::from_utf8(add_missing_headers(msg, &V)).unwrap()
}

#[test]
fn headers_added_only_when_missing() {
    assert_eq!(
        added(b"Subject: s\r\n\r\nbody\r\n"),
        "Subject: s\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\nMessage-ID: <1.2@mx.test>\r\nFrom: CronDaemon <root@mx.test>\r\n\r\nbody\r\n"
    );
    let all = b"DATE: x\r\nmessage-id: <a@b>\r\nfrom: me@x\r\n\r\nbody\r\n";
    assert_eq!(
        added(all).as_bytes(),
        all,
        "never a second one, whatever the case"
    );
    // Only Message-ID missing: added after the last header, before the empty line.
    assert_eq!(
        added(b"From : a@b\r\nDate: d\r\nSubject: s\r\n\r\nMessage-ID: <in@body>\r\n"),
        "From : a@b\r\nDate: d\r\nSubject: s\r\nMessage-ID: <1.2@mx.test>\r\n\r\nMessage-ID: <in@body>\r\n"
    );
}

#[test]
fn folded_headers_and_lookalikes_do_not_count() {
    let m = b"Subject: one\r\n Date: folded, not a field\r\n\tFrom: folded\r\nX-Date: y\r\nResent-From: z\r\n\r\nDate: in the body\r\n";
    let out = added(m);
    assert!(
        out.starts_with("Subject: one\r\n Date: folded, not a field\r\n\tFrom: folded\r\nX-Date: y\r\nResent-From: z\r\nDate: Thu"),
        "{out}"
    );
    assert_eq!(out.matches("\r\nMessage-ID: ").count(), 1);
    assert!(out.contains("\r\nFrom: CronDaemon <root@mx.test>\r\n\r\nDate: in the body\r\n"));
}

#[test]
fn no_header_section() {
    // The first line is no header: the fields go first, then an empty line, then the text as the body.
    assert_eq!(
        added(b"just text\r\nSubject: not a header here\r\n"),
        "Date: Thu, 1 Jan 2026 00:00:00 +0000\r\nMessage-ID: <1.2@mx.test>\r\nFrom: CronDaemon <root@mx.test>\r\n\r\njust text\r\nSubject: not a header here\r\n"
    );
    // Starts with the empty line: an empty header section.
    assert_eq!(
        added(b"\r\nbody\r\n"),
        "Date: Thu, 1 Jan 2026 00:00:00 +0000\r\nMessage-ID: <1.2@mx.test>\r\nFrom: CronDaemon <root@mx.test>\r\n\r\nbody\r\n"
    );
    // A continuation line first is no header either.
    assert!(added(b" indented\r\n").ends_with("\r\n\r\n indented\r\n"));
    // An mbox "From " line is not a header.
    assert!(added(b"From someone Thu Jan 1\r\nSubject: s\r\n")
        .ends_with("\r\n\r\nFrom someone Thu Jan 1\r\nSubject: s\r\n"));
    // Empty input: only the fields.
    assert!(added(b"").ends_with("From: CronDaemon <root@mx.test>\r\n"));
}

#[test]
fn header_section_ending_at_eof() {
    assert_eq!(
        added(b"Subject: s\r\nFrom: a@b\r\n"),
        "Subject: s\r\nFrom: a@b\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\nMessage-ID: <1.2@mx.test>\r\n"
    );
    // Without a final line end: one is added before the new fields.
    assert_eq!(
        added(b"Subject: s\r\nFrom: a@b"),
        "Subject: s\r\nFrom: a@b\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\nMessage-ID: <1.2@mx.test>\r\n"
    );
}

#[test]
fn crlf_and_lf_input() {
    let lf = b"Subject: s\n folded\nFrom: a@b\n\nbody\n.\nafter\n";
    let crlf = b"Subject: s\r\n folded\r\nFrom: a@b\r\n\r\nbody\r\n.\r\nafter\r\n";
    let a = add_missing_headers(&read_message(&lf[..], false).unwrap(), &V);
    let b = add_missing_headers(&read_message(&crlf[..], false).unwrap(), &V);
    assert_eq!(a, b);
    assert_eq!(
        String::from_utf8(a).unwrap(),
        "Subject: s\r\n folded\r\nFrom: a@b\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\nMessage-ID: <1.2@mx.test>\r\n\r\nbody\r\n"
    );
    // Bare LF given straight to the function: the added lines end with LF too.
    assert_eq!(
        added(b"Subject: s\n\nbody\n"),
        "Subject: s\nDate: Thu, 1 Jan 2026 00:00:00 +0000\nMessage-ID: <1.2@mx.test>\nFrom: CronDaemon <root@mx.test>\n\nbody\n"
    );
}

#[test]
fn from_display_names() {
    assert_eq!(from_value("root@mx.test", None), "root@mx.test");
    assert_eq!(from_value("root@mx.test", Some(" ")), "root@mx.test");
    assert_eq!(
        from_value("root@mx.test", Some("Cron Daemon")),
        "Cron Daemon <root@mx.test>"
    );
    assert_eq!(
        from_value("a@b", Some("Doe, John \"JD\" \\o/")),
        "\"Doe, John \\\"JD\\\" \\\\o/\" <a@b>"
    );
    assert_eq!(from_value("a@b", Some("J. Doe")), "\"J. Doe\" <a@b>");
    assert_eq!(
        from_value("a@b", Some("Jürgen")),
        "=?UTF-8?B?SsO8cmdlbg==?= <a@b>"
    );
    // Long names become several encoded words, each under 76 characters, split between characters.
    let long = "é".repeat(60);
    let v = from_value("a@b", Some(&long));
    let words: Vec<&str> = v.trim_end_matches(" <a@b>").split(' ').collect();
    assert!(words.len() > 1);
    let mut decoded = Vec::new();
    for w in &words {
        assert!(w.len() <= 75, "{w}");
        use base64::Engine as _;
        let b64 = w
            .strip_prefix("=?UTF-8?B?")
            .unwrap()
            .strip_suffix("?=")
            .unwrap();
        let part = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert!(
            std::str::from_utf8(&part).is_ok(),
            "each word is whole characters"
        );
        decoded.extend(part);
    }
    assert_eq!(String::from_utf8(decoded).unwrap(), long);
}

#[test]
fn message_ids_are_unique_and_well_formed() {
    let a = new_message_id("mx.test");
    let b = new_message_id("mx.test");
    assert_ne!(a, b);
    assert!(a.starts_with('<') && a.ends_with("@mx.test>"), "{a}");
    assert!(!a[1..a.len() - 1].contains(['<', '>', ' ']));
}
