//! The event log end to end: a server with `maillog_file` (text or JSON), driven over loopback, and the lines
//! it writes: connections with their command counts, rejections that fail2ban's stock `postfix` and
//! `postfix-sasl` filters match (their regexes run by Python's `re`, as fail2ban runs them), the reception
//! record, delivery, expiry and bounce lines, JSON that parses, and the file reopened after logrotate renames
//! it (SIGUSR1, SIGHUP).

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use shardmta::dns::testserver::TestDns;

/// A server whose event log goes to `<its dir>/mail.log`; `extra` is more top-level TOML.
fn server_with_log(extra: &str) -> (Server, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("mail.log");
    let s = Server::start_in(
        dir,
        &format!("maillog_file = \"{}\"\n{extra}", path_str(&log)),
    );
    (s, log)
}

fn lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The log's lines once one holds `pred` (the writer thread writes within milliseconds).
fn lines_with(log: &Path, pred: impl Fn(&str) -> bool) -> Vec<String> {
    wait_for_within(
        Duration::from_secs(20),
        || lines(log).iter().any(|l| pred(l)),
        &format!("a line in {}", log.display()),
    );
    lines(log)
}

fn the_line(all: &[String], pred: impl Fn(&str) -> bool) -> &str {
    all.iter()
        .find(|l| pred(l))
        .unwrap_or_else(|| panic!("no such line in:\n{}", all.join("\n")))
}

/// `2025-06-01T10:00:00.123Z shardmta/smtpd[4711]: ` and the rest of the line.
fn split_prefix(line: &str) -> (&str, &str, &str) {
    let (ts, rest) = line.split_once(' ').expect("timestamp");
    assert_eq!(ts.len(), 24, "{line}");
    let b = ts.as_bytes();
    for (i, c) in b.iter().enumerate() {
        let want_digit = !matches!(i, 4 | 7 | 10 | 13 | 16 | 19 | 23);
        assert_eq!(c.is_ascii_digit(), want_digit, "timestamp {ts:?}");
    }
    assert_eq!(
        (b[4], b[7], b[10], b[13], b[16], b[19], b[23]),
        (b'-', b'-', b'T', b':', b':', b'.', b'Z'),
        "{ts}"
    );
    let (tag, msg) = rest.split_once(": ").expect("tag");
    let component = tag
        .strip_prefix("shardmta/")
        .and_then(|t| t.split_once('['))
        .map(|(c, pid)| {
            assert!(pid.trim_end_matches(']').parse::<u32>().is_ok(), "{tag}");
            c
        })
        .unwrap_or_else(|| panic!("tag {tag:?}"));
    (ts, component, msg)
}

#[test]
fn connections_commands_and_the_reception_record() {
    let (s, log) = server_with_log("");
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO client.test");
    assert!(c.cmd("MAIL FROM:<alice@client.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<bob@dest.test>").starts_with("250"));
    // Refused: a null recipient is not an address.
    assert!(c.cmd("RCPT TO:<>").starts_with("501"));
    assert!(c.cmd("DATA").starts_with("354"));
    // A Message-ID with a control character in it (hostile input): logged with `?`, on one line.
    c.send(b"Subject: hi\r\nMessage-ID:\r\n <one\x0btwo@client.test>\r\n\r\nbody\r\n.\r\n");
    let id = queued_id(&c.reply());
    assert!(c.cmd("QUIT").starts_with("221"));
    drop(c);
    // (The harness's readiness probe was a session too: lost connection after CONNECT, commands=0/0.)
    let all = lines_with(&log, |l| {
        l.contains("disconnect from") && l.contains("quit=")
    });
    for l in &all {
        split_prefix(l);
    }
    let (_, component, connect) = split_prefix(the_line(&all, |l| l.contains("connect from")));
    assert_eq!(component, "smtpd");
    assert_eq!(connect, "connect from unknown[127.0.0.1]");
    let received = the_line(&all, |l| l.contains(&format!("{id}: client=")));
    let (_, component, msg) = split_prefix(received);
    assert_eq!(component, "smtpd");
    assert!(
        msg.starts_with(&format!(
            "{id}: client=unknown[127.0.0.1], helo=<client.test>, proto=ESMTP, from=<alice@client.test>, size="
        )),
        "{msg}"
    );
    assert!(
        msg.ends_with(", nrcpt=1, message-id=<one?two@client.test>"),
        "{msg}"
    );
    let size: u64 = msg
        .split(", size=")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    // The stored message: our Received header and the data as received.
    assert_eq!(size as usize, s.queue_cat(&id).len());
    let (_, _, disconnect) = split_prefix(the_line(&all, |l| {
        l.contains("disconnect from") && l.contains("quit=")
    }));
    assert_eq!(
        disconnect,
        "disconnect from unknown[127.0.0.1] ehlo=1 mail=1 rcpt=1/2 data=1 quit=1 commands=5/6"
    );

    // A client that goes away in the middle, and one refused at connect.
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<alice@client.test>");
    drop(c);
    let all = lines_with(&log, |l| l.contains("lost connection after MAIL"));
    let (_, _, lost) = split_prefix(the_line(&all, |l| l.contains("lost connection after MAIL")));
    assert_eq!(lost, "lost connection after MAIL from unknown[127.0.0.1]");
    let all = lines_with(&log, |l| l.ends_with("ehlo=1 mail=1 commands=2"));
    assert_eq!(
        all.iter().filter(|l| l.contains(": connect from")).count(),
        all.iter()
            .filter(|l| l.contains(": disconnect from"))
            .count(),
        "{all:?}"
    );
}

/// The fail2ban filters, run by Python's `re` on lines whose leading date fail2ban's date detector has taken
/// away: prints `filter host` for each line a filter matches. The regexes are the filters' own (fail2ban
/// 1.0's `postfix.conf` modes `more` and `auth` with `common.conf`'s prefix for log files, as fail2ban-regex
/// prints them composed; and the older `postfix.conf` / `postfix-sasl.conf`), with `<HOST>` as an IPv4 or IPv6
/// address and the SASL mechanism's inline `(?i)` scoped to its alternative (Python 3.11 refuses a global flag
/// mid-pattern; fail2ban rewrites it the same way).
const FAIL2BAN: &str = r#"
import re, sys
HOST = r'(?P<host>(?:\d{1,3}\.){3}\d{1,3}|[0-9a-fA-F:]+)'
PORT = r'(?::\d+)?'
def prefix(daemon):
    return (r'(?:\[\])?\s*(?:<[^.]+\.[^.]+>\s+)?(?:\S+\s+)?(?:kernel:\s?\[ *\d+\.\d+\]:?\s+)?(?:@vserver_\S+\s+)?'
            r'(?:(?:(?:\[\d+\])?:\s+[\[\(]?' + daemon + r'(?:\(\S+\))?[\]\)]?:?|[\[\(]?' + daemon +
            r'(?:\(\S+\))?[\]\)]?:?(?:\[\d+\])?:?)\s+)?(?:\[ID \d+ \S+\]\s+)?')
P10 = prefix(r'postfix(-\w+)?/\w+(?:/smtp[ds])?')
SASL = r'SASL ((?i:LOGIN)|PLAIN|(?:CRAM|DIGEST)-MD5) authentication failed'
filters = {
    # fail2ban 1.0 postfix.conf, mode "more" (the [postfix] jail): prefregex, then the failregex on its content.
    'postfix': (P10 + r'(?:\w+: (?:milter-)?reject:|(?:improper command pipelining|too many errors) after \S+) (?P<content>.+)$',
                [r'^[A-Z]{4} from [^[]*\[' + HOST + r'\]' + PORT + r': [45][50][04] [45]\.\d\.\d+ (?:(?:<[^>]*>)?: )?(?:(?:Helo command|(?:Sender|Recipient) address) rejected: )?(?:Service unavailable|(?:Client host|Command|Data command) rejected|Relay access denied|(?:Host|Domain) not found|need fully-qualified hostname|match|[Uu](?:ser unknown|ndeliverable address))\b',
                 r'^from [^[]*\[' + HOST + r'\]' + PORT + r':?']),
    # fail2ban 1.0 postfix.conf, mode "auth" (the [postfix-sasl] jail).
    'postfix-sasl': (P10 + r'warning: (?P<content>.+)$',
                     [r'^[^[]*\[' + HOST + r'\]' + PORT + r': ' + SASL + r':(?! Connection lost to authentication server| Invalid authentication mechanism)']),
    # The older filters: one regex each, on the whole line.
    'old-postfix': (None, [r'^' + prefix(r'postfix(-\w+)?/(submission/)?smtp(d|s)') + r'NOQUEUE: reject: RCPT from \S+\[' + HOST + r'\]: 554 5\.7\.1 .*$']),
    'old-postfix-sasl': (None, [r'^' + prefix(r'postfix(-\w+)?/((?:submission|smtps)/)?smtpd') + r'warning: [-._\w]+\[' + HOST + r'\]: ' + SASL + r'(: [ A-Za-z0-9+/:]*={0,2})?\s*$']),
}
DATE = re.compile(r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\s+')
for line in sys.stdin.read().splitlines():
    d = DATE.match(line)
    if not d:
        print('nodate', line)
        continue
    rest = line[d.end():]
    for name, (pref, regexes) in filters.items():
        content = rest
        if pref is not None:
            m = re.match(pref, rest)
            if not m:
                continue
            content = m.group('content')
        for r in regexes:
            m = re.search(r, content)
            if m:
                print(name, m.group('host'))
                break
"#;

/// (filter, host) for every match of a fail2ban filter in `lines`.
fn fail2ban_matches(lines: &[&str]) -> Vec<(String, String)> {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(FAIL2BAN)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs (.ci/run installs it)");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(lines.join("\n").as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            assert_ne!(a, "nodate", "{b}");
            (a.to_string(), b.to_string())
        })
        .collect()
}

#[test]
fn rejections_and_auth_failures_match_fail2bans_postfix_filters() {
    let (s, log) = server_with_log(
        "mynetworks = [\"127.0.0.1/32\"]\n\
         [local]\nusers = [\"bob\"]\nsystem_users = false\n",
    );
    // Relay denied and an unknown local user, from outside mynetworks.
    let mut c = Client::from_stream(connect_from(Ipv4Addr::new(127, 0, 0, 3), s.smtp).unwrap());
    assert!(c.reply().starts_with("220"));
    c.cmd("EHLO spammer.test");
    assert!(c.cmd("MAIL FROM:<spam@spammer.test>").starts_with("250"));
    let r = c.cmd("RCPT TO:<victim@elsewhere.test>");
    assert!(r.starts_with("554 5.7.1"), "{r}");
    let r = c.cmd("RCPT TO:<nobody@localhost>");
    assert!(r.starts_with("550 5.1.1"), "{r}");
    assert!(c.cmd("RCPT TO:<bob@localhost>").starts_with("250"));
    c.cmd("QUIT");
    // A wrong password (AUTH needs TLS on this listener), from another address.
    let mut c = Client::from_stream(connect_from(Ipv4Addr::new(127, 0, 0, 4), s.smtp).unwrap());
    assert!(c.reply().starts_with("220"));
    c.cmd("EHLO guesser.test");
    let mut c = c.starttls();
    c.cmd("EHLO guesser.test");
    let r = c.cmd(&format!("AUTH PLAIN {}", b64("\0alice\0wrong")));
    assert!(r.starts_with("535"), "{r}");
    let r = c.cmd("AUTH LOGIN");
    assert!(r.starts_with("334"), "{r}");
    c.cmd(&b64("alice"));
    let r = c.cmd(&b64("wrong again"));
    assert!(r.starts_with("535"), "{r}");
    // The right one is no failure.
    let r = c.cmd(&format!("AUTH PLAIN {}", b64("\0alice\0secret")));
    assert!(r.starts_with("235"), "{r}");
    c.cmd("QUIT");

    let all = lines_with(&log, |l| l.contains("disconnect from unknown[127.0.0.4]"));
    let relay = the_line(&all, |l| l.contains("Relay access denied"));
    let (_, component, msg) = split_prefix(relay);
    assert_eq!(component, "smtpd");
    assert_eq!(
        msg,
        "NOQUEUE: reject: RCPT from unknown[127.0.0.3]: 554 5.7.1 <victim@elsewhere.test>: Relay access denied; \
         from=<spam@spammer.test> to=<victim@elsewhere.test> proto=ESMTP helo=<spammer.test>"
    );
    let unknown = the_line(&all, |l| l.contains("User unknown"));
    assert!(
        unknown.contains("NOQUEUE: reject: RCPT from unknown[127.0.0.3]: 550 5.1.1 <nobody@localhost>: Recipient address rejected: User unknown in local recipient table; from=<spam@spammer.test> to=<nobody@localhost>"),
        "{unknown}"
    );
    let auth: Vec<&str> = all
        .iter()
        .filter(|l| l.contains("authentication failed"))
        .map(String::as_str)
        .collect();
    assert_eq!(auth.len(), 2, "{all:?}");
    assert!(
        auth[0].contains(
            "]: warning: unknown[127.0.0.4]: SASL PLAIN authentication failed: authentication failure"
        ),
        "{}",
        auth[0]
    );
    assert!(
        auth[1].contains(
            "]: warning: unknown[127.0.0.4]: SASL LOGIN authentication failed: authentication failure"
        ),
        "{}",
        auth[1]
    );

    let everything: Vec<&str> = all.iter().map(String::as_str).collect();
    let mut hits = fail2ban_matches(&everything);
    hits.sort();
    let want = |f: &str, h: &str| (f.to_string(), h.to_string());
    assert_eq!(
        hits,
        vec![
            want("old-postfix", "127.0.0.3"),
            want("old-postfix-sasl", "127.0.0.4"),
            want("old-postfix-sasl", "127.0.0.4"),
            want("postfix", "127.0.0.3"),
            want("postfix", "127.0.0.3"),
            want("postfix-sasl", "127.0.0.4"),
            want("postfix-sasl", "127.0.0.4"),
        ],
        "lines:\n{}",
        all.join("\n")
    );
}

#[test]
fn json_lines_parse_and_name_their_fields() {
    let (s, log) = server_with_log("log_format = \"json\"\n");
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO client.test");
    let id = queued_id(&c.send_mail(
        "alice@client.test",
        &["bob@dest.test", "carol@dest.test"],
        "Message-ID: <m1@client.test>\r\n\r\nbody \"quoted\" \\ back\r\n",
    ));
    c.cmd("QUIT");
    lines_with(&log, |l| {
        l.contains("\"disconnect\"") && l.contains("quit=")
    });
    let events: Vec<serde_json::Value> = lines(&log)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    for e in &events {
        let ts = e["ts"].as_str().unwrap();
        assert!(ts.len() == 24 && ts.ends_with('Z'), "{e}");
        assert!(e["level"].is_string() && e["component"].is_string(), "{e}");
        assert!(e["message"].is_string(), "{e}");
    }
    let find = |name: &str| {
        events
            .iter()
            .find(|e| e["event"] == name)
            .unwrap_or_else(|| panic!("no {name} in {events:?}"))
    };
    let connect = find("connect");
    assert_eq!(connect["component"], "smtpd");
    assert_eq!(connect["client_ip"], "127.0.0.1");
    assert_eq!(connect["message"], "connect from unknown[127.0.0.1]");
    let received = find("received");
    assert_eq!(received["queue_id"], id.as_str());
    assert_eq!(received["sender"], "alice@client.test");
    assert_eq!(received["nrcpt"], 2);
    assert_eq!(received["helo"], "client.test");
    assert_eq!(received["proto"], "ESMTP");
    assert_eq!(received["message_id"], "<m1@client.test>");
    assert_eq!(
        received["size"].as_u64().unwrap() as usize,
        s.queue_cat(&id).len()
    );
    assert!(received.get("tls").is_none() && received.get("sasl_username").is_none());
    let disconnect = events
        .iter()
        .find(|e| e["event"] == "disconnect" && e["commands"] != "commands=0/0")
        .expect("the session's disconnect");
    assert_eq!(
        disconnect["commands"],
        "ehlo=1 mail=1 rcpt=2 data=1 quit=1 commands=6"
    );
    assert_eq!(disconnect["commands_ok"], 6);
    assert_eq!(disconnect["commands_total"], 6);
    let daemon = events
        .iter()
        .find(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("daemon started"))
        })
        .expect("the start line");
    assert_eq!(daemon["component"], "master");
    assert_eq!(daemon["level"], "info");
}

/// The expiry bug: an expired recipient's last delivery-log line said "deferred" (the attempt was logged
/// before the origin decided it expired). Now the attempt past the queue lifetime is logged as expired in the
/// JSON delivery log and in the event log, followed by the bounce and its delivery.
#[test]
fn delivery_expiry_and_bounce_lines() {
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53)));
    dns.add_mx("slow.test", 10, "mx.slow.test");
    dns.add_a("mx.slow.test", Ipv4Addr::new(127, 0, 0, 28));
    dns.add_mx("client.test", 10, "mx.client.test");
    dns.add_a("mx.client.test", Ipv4Addr::new(127, 0, 0, 29));
    let _slow = Sink::start("127.0.0.28", port, &["--tempfail-rate", "1"]);
    let bounces = Sink::start("127.0.0.29", port, &[]);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("mail.log");
    let s = Server::start_in(
        dir,
        &relay_config(
            port,
            &dns,
            "",
            &format!(
                "maximal_queue_lifetime = \"3s\"\nmaillog_file = \"{}\"\n",
                path_str(&log)
            ),
        ),
    );
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO client.test");
    let id = queued_id(&c.send_mail(
        "alice@client.test",
        &["never@slow.test"],
        "Subject: expire\r\n\r\nbody\r\n",
    ));
    c.cmd("QUIT");
    bounces.wait_messages(1);
    wait_gone(&s, &id);

    // The JSON delivery log: deferred attempts, then the last one says expired.
    let dl = delivery_log_with(&s, |l| {
        l["rcpt"] == "never@slow.test" && l["result"] == "expired"
    });
    let mine: Vec<&serde_json::Value> =
        dl.iter().filter(|l| l["queue_id"] == id.as_str()).collect();
    let last = mine.last().unwrap();
    assert_eq!(last["result"], "expired", "{mine:?}");
    assert!(mine[..mine.len() - 1]
        .iter()
        .all(|l| l["result"] == "deferred"));

    // The event log: the same, then the bounce queued, delivered, and both messages removed.
    let all = lines_with(&log, |l| {
        l.contains("status=sent") && l.contains("to=<alice@client.test>")
    });
    let attempts: Vec<&str> = all
        .iter()
        .filter(|l| l.contains(&format!("{id}: to=<never@slow.test>")))
        .map(String::as_str)
        .collect();
    let (_, component, last) = split_prefix(attempts.last().unwrap());
    assert_eq!(component, "smtp");
    assert!(
        last.contains(", relay=mx.slow.test[127.0.0.28]:")
            && last.contains(", dsn=4.4.7, status=expired, returned to sender ("),
        "{last}"
    );
    assert!(attempts[..attempts.len() - 1]
        .iter()
        .all(|l| l.contains("status=deferred (4")));
    assert_eq!(attempts.len(), mine.len(), "{attempts:?}");
    let bounce = the_line(&all, |l| l.contains("sender non-delivery notification"));
    let (_, component, msg) = split_prefix(bounce);
    assert_eq!(component, "bounce");
    let bounce_id = msg
        .strip_prefix(&format!("{id}: sender non-delivery notification: "))
        .unwrap_or_else(|| panic!("{msg}"));
    let sent = the_line(&all, |l| l.contains("to=<alice@client.test>"));
    assert!(
        sent.contains(&format!(
            "{bounce_id}: to=<alice@client.test>, relay=mx.client.test[127.0.0.29]:"
        )) && sent.contains(", dsn=2.0.0, status=sent (250 "),
        "{sent}"
    );
    let all = lines_with(&log, |l| l.ends_with(&format!(": {bounce_id}: removed")));
    let (_, component, _) =
        split_prefix(the_line(&all, |l| l.ends_with(&format!(": {id}: removed"))));
    assert_eq!(component, "qmgr");
}

#[test]
fn the_log_file_is_reopened_after_logrotate_renames_it() {
    let (mut s, log) = server_with_log("");
    let rotated = log.with_extension("log.1");
    let connect = |s: &Server| {
        let mut c = Client::greeted(s.smtp);
        c.cmd("QUIT");
    };
    connect(&s);
    lines_with(&log, |l| l.ends_with("quit=1 commands=1"));
    std::fs::rename(&log, &rotated).unwrap();
    // Until the signal, lines go on into the renamed file.
    connect(&s);
    lines_with(&rotated, |l| l.contains("commands=1"));
    let pid = s.child.as_ref().unwrap().id() as i32;
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    let fresh = lines_with(&log, |l| l.contains("reopening log file"));
    assert!(
        !fresh.iter().any(|l| l.contains("connect from")),
        "{fresh:?}"
    );
    connect(&s);
    let fresh = lines_with(&log, |l| l.contains("disconnect from"));
    // Sessions of this test (the harness's readiness probe is one too, with commands=0/0).
    let sessions = |v: &[String]| {
        v.iter()
            .filter(|l| l.ends_with("quit=1 commands=1"))
            .count()
    };
    assert_eq!(sessions(&fresh), 1, "{fresh:?}");
    let old = lines(&rotated);
    assert_eq!(sessions(&old), 2, "{old:?}");
    // SIGHUP (a reload) reopens it too.
    let rotated2 = log.with_extension("log.2");
    std::fs::rename(&log, &rotated2).unwrap();
    unsafe { libc::kill(pid, libc::SIGHUP) };
    lines_with(&log, |l| l.contains("reopening log file"));
    connect(&s);
    lines_with(&log, |l| l.contains("disconnect from"));
    assert!(s.terminate().success());
    let last = lines(&log);
    assert!(last.last().unwrap().ends_with("]: stopped"), "{last:?}");
}

#[test]
fn a_client_that_says_nothing_more_is_logged_as_timed_out() {
    let (s, log) = server_with_log("smtpd_timeout = \"1s\"\n");
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO slow.test");
    let r = c.reply();
    assert!(r.starts_with("421 4.4.2"), "{r}");
    let all = lines_with(&log, |l| l.ends_with("ehlo=1 commands=1"));
    let (_, _, msg) = split_prefix(the_line(&all, |l| l.contains("timeout after")));
    assert_eq!(msg, "timeout after EHLO from unknown[127.0.0.1]");
}

/// A start that fails still ends with its one line on stderr (the log's writer has written everything
/// before it), and a log file gets that line too.
#[test]
fn a_start_error_is_the_last_line_on_stderr_and_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("mail.log");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let config = dir.path().join("shardmta.toml");
    std::fs::write(
        &config,
        format!(
            "queue_directory = \"{}\"\nmaillog_file = \"{}\"\n[delivery]\nenabled = false\n[[listener]]\naddress = \"{addr}\"\nkind = \"smtp\"\n",
            path_str(&dir.path().join("spool")),
            path_str(&log)
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.starts_with("shardmta: cannot listen on") && last.contains("already in use"),
        "{err}"
    );
    let in_file = lines(&log);
    let (_, component, msg) = split_prefix(in_file.last().expect("lines in the file"));
    assert_eq!(component, "master");
    assert!(msg.starts_with("error: cannot listen on"), "{msg}");
}
