//! DKIM signing end to end: keys made with `shardmta dkim keygen` (its `[[dkim]]` entry pasted into the
//! configuration as printed), mail relayed to an SMTP sink on 127.0.0.x or delivered to a local Maildir, and
//! every signature checked by an independent verifier, Python's dkimpy, with the TXT records keygen printed
//! served by a `dnsfunc` (no DNS). Nothing leaves the loopback network.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// dkimpy over one message: every DKIM-Signature verified (`DKIM.verify(idx=i)`), with `records` as DNS.
const VERIFY_PY: &str = r#"
import json, sys, dkim
msg = open(sys.argv[1], 'rb').read()
records = json.load(open(sys.argv[2]))
def dnsfunc(name, timeout=5):
    if isinstance(name, bytes):
        name = name.decode()
    return records.get(name.rstrip('.').lower(), '').encode()
d = dkim.DKIM(msg)
n = sum(1 for k, _ in d.headers if k.lower() == b'dkim-signature')
out = []
for i in range(n):
    try:
        ok = d.verify(idx=i, dnsfunc=dnsfunc)
    except Exception as e:
        ok = False
    f = d.signature_fields or {}
    out.append({'ok': bool(ok), 'd': f.get(b'd', b'').decode(), 's': f.get(b's', b'').decode(),
                'a': f.get(b'a', b'').decode(), 'h': f.get(b'h', b'').decode()})
print(json.dumps(out))
"#;

/// Runs `shardmta dkim keygen`; returns the printed TXT record's name and value (its strings joined) and the
/// `[[dkim]]` entry as printed.
fn keygen(dir: &Path, domain: &str, selector: &str, alg: &str) -> (String, String, String) {
    let out = dir.join(format!("{domain}.{selector}.pem"));
    let o = Command::new(BIN)
        .args([
            "dkim",
            "keygen",
            "--domain",
            domain,
            "--selector",
            selector,
            "--algorithm",
            alg,
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.contains(" IN TXT "))
        .expect("a TXT line");
    let (name, strings) = line.split_once(" IN TXT ").unwrap();
    assert_eq!(name, format!("{selector}._domainkey.{domain}."));
    // "v=DKIM1; ..." "..." : each string at most 255 bytes, joined by the resolver.
    let parts: Vec<&str> = strings
        .split('"')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, p)| p)
        .collect();
    assert!(parts.iter().all(|p| p.len() <= 255), "{line}");
    let value = parts.concat();
    let k = if alg == "ed25519" { "ed25519" } else { "rsa" };
    assert!(value.starts_with(&format!("v=DKIM1; k={k}; p=")), "{value}");
    let entry = stdout[stdout.find("[[dkim]]").expect("the [[dkim]] entry")..].to_string();
    let abs = std::fs::canonicalize(&out).unwrap();
    assert!(
        entry.contains(&format!("private_key_file = \"{}\"", abs.display())),
        "{entry}"
    );
    (name.trim_end_matches('.').to_string(), value, entry)
}

/// Keys for the tests: (the `[[dkim]]` entries, the DNS records as a JSON object).
struct Keys {
    entries: String,
    records: serde_json::Map<String, Value>,
}

impl Keys {
    fn new() -> Keys {
        Keys {
            entries: String::new(),
            records: serde_json::Map::new(),
        }
    }

    fn add(&mut self, dir: &Path, domain: &str, selector: &str, alg: &str) {
        let (name, value, entry) = keygen(dir, domain, selector, alg);
        self.entries.push_str(&entry);
        self.entries.push('\n');
        self.records.insert(name, Value::String(value));
    }
}

/// The verdicts of dkimpy on `msg`, one per DKIM-Signature, top down.
fn verify(msg: &[u8], records: &serde_json::Map<String, Value>) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("msg");
    let r = dir.path().join("records.json");
    let py = dir.path().join("verify.py");
    std::fs::write(&m, msg).unwrap();
    std::fs::write(&r, Value::Object(records.clone()).to_string()).unwrap();
    std::fs::write(&py, VERIFY_PY).unwrap();
    let o = Command::new("python3")
        .arg(&py)
        .arg(&m)
        .arg(&r)
        .stderr(Stdio::piped())
        .output()
        .expect("python3");
    assert!(
        o.status.success(),
        "dkimpy (python3 -m pip install dkimpy pynacl): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array().unwrap().clone()
}

/// The message as the sink received it: its saved file without the sink's own X-Sink lines.
fn sink_message(sink: &Sink, marker: &str) -> Vec<u8> {
    let dir = sink_dir(sink);
    let mut found = None;
    wait_for(
        || {
            found = std::fs::read_dir(&dir).ok().and_then(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| std::fs::read(e.path()).unwrap_or_default())
                    .find(|b| memmem(b, marker.as_bytes()))
            });
            found.is_some()
        },
        &format!("the message {marker} at the sink"),
    );
    let raw = found.unwrap();
    let mut at = 0;
    while raw[at..].starts_with(b"X-Sink-") {
        at += raw[at..].iter().position(|&b| b == b'\n').unwrap() + 1;
    }
    raw[at..].to_vec()
}

fn memmem(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The sink's message directory (the harness keeps it private: found from its stats file's directory).
fn sink_dir(sink: &Sink) -> PathBuf {
    sink.stats_path().parent().unwrap().join("msgs")
}

fn signatures(msg: &[u8]) -> usize {
    String::from_utf8_lossy(msg)
        .lines()
        .filter(|l| l.starts_with("DKIM-Signature:"))
        .count()
}

fn send_raw(c: &mut Client, from: &str, mail_params: &str, to: &[&str], data: &[u8]) -> String {
    let r = c.cmd(&format!("MAIL FROM:<{from}>{mail_params}"));
    assert!(r.starts_with("250"), "MAIL: {r}");
    for t in to {
        let r = c.cmd(&format!("RCPT TO:<{t}>"));
        assert!(r.starts_with("250"), "RCPT {t}: {r}");
    }
    let r = c.cmd("DATA");
    assert!(r.starts_with("354"), "DATA: {r}");
    c.send(data);
    c.send(b".\r\n");
    c.reply()
}

/// About 300 KB (the body is hashed in 64 KiB slices with yields between them), with WSP runs, tabs and
/// trailing WSP on many lines, and a slice boundary inside a CRLF somewhere.
fn large_message() -> Vec<u8> {
    let mut m = b"From: a@rsa.test\r\nSubject: large case\r\n\r\n".to_vec();
    let mut i = 0u32;
    while m.len() < 300_000 {
        m.extend_from_slice(
            format!(
                "line {i}\t with  runs of   white space {}\r\n",
                " ".repeat((i % 3) as usize)
            )
            .as_bytes(),
        );
        i += 1;
    }
    m.extend_from_slice(b"\r\n\r\n");
    m
}

fn all_ok(v: &[Value]) -> bool {
    !v.is_empty() && v.iter().all(|s| s["ok"] == true)
}

#[test]
fn rsa_ed25519_and_dual_signatures_verify_with_dkimpy() {
    let dir = tempfile::tempdir().unwrap();
    let mut keys = Keys::new();
    keys.add(dir.path(), "rsa.test", "r1", "rsa-2048");
    keys.add(dir.path(), "ed.test", "e1", "ed25519");
    keys.add(dir.path(), "dual.test", "r2026", "rsa-2048");
    keys.add(dir.path(), "dual.test", "e2026", "ed25519");
    let port = free_port();
    let sink = Sink::start("127.0.0.61", port, &[]);
    let mail = dir.path().join("mailroot");
    let top = format!(
        "relayhost = \"[127.0.0.61]:{port}\"\nmydestination = [\"localhost\"]\n\n{}\n\
         [delivery]\nenabled = true\nsmtp_connect_timeout = \"2s\"\n\
         [local]\nusers = [\"carol\"]\nsystem_users = false\nmailbox_path = \"{}/{{user}}/Maildir\"\n",
        keys.entries,
        mail.display()
    );
    let s = Server::start_in(dir, &top);
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO client.test");
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        (
            "rsa",
            "",
            b"From: Alice <alice@rsa.test>\r\nTo: bob@dest.test\r\nSubject: rsa case\r\nMessage-ID: <rsa@rsa.test>\r\n\r\nHello from RSA.\r\n".to_vec(),
        ),
        (
            "ed",
            "",
            b"From: a@mail.ed.test\r\nTo: bob@dest.test\r\nSubject: ed case\r\n\r\nHello from Ed25519, a subdomain.\r\n".to_vec(),
        ),
        (
            "dual",
            "",
            // Every default header (two To: fields), so that h= is folded over several lines.
            b"From: \"Dual, Sender\" <d@dual.test>\r\nTo: bob@dest.test\r\nTo: bob2@dest.test\r\nCc: c@dest.test\r\n\
Subject: dual case\r\nDate: Thu, 03 Dec 2026 17:00:00 +0000\r\nMessage-ID: <dual@dual.test>\r\nReply-To: r@dual.test\r\n\
MIME-Version: 1.0\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: 7bit\r\n\
List-Unsubscribe: <https://dual.test/u>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\r\nSigned twice.\r\n".to_vec(),
        ),
        (
            "folded",
            "",
            b"From: a@rsa.test\r\nTo:   bob@dest.test ,\r\n\tcc@dest.test   \r\nSubject: folded case \t\r\n   over  three\r\n lines\t \r\nContent-Type: text/plain;\r\n charset=us-ascii\r\n\r\nline with trailing spaces   \r\n  indented\t\tline \t\r\n\r\n\r\n\r\n".to_vec(),
        ),
        (
            "empty",
            "",
            b"From: a@ed.test\r\nSubject: empty case\r\n\r\n".to_vec(),
        ),
        (
            "8bit",
            " BODY=8BITMIME",
            "From: a@dual.test\r\nSubject: 8bit case\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGr\u{fc}\u{df}e, na\u{ef}ve caf\u{e9} \u{2014} \u{65e5}\u{672c}\r\n"
                .as_bytes()
                .to_vec(),
        ),
        (
            "large",
            "",
            large_message(),
        ),
    ];
    for (_, params, data) in &cases {
        let r = send_raw(
            &mut c,
            "sender@client.test",
            params,
            &["bob@dest.test"],
            data,
        );
        assert!(r.starts_with("250"), "{r}");
    }
    let expect = |name: &str| -> Vec<(&str, &str)> {
        match name {
            "rsa" | "folded" | "large" => vec![("rsa.test", "rsa-sha256")],
            "ed" | "empty" => vec![("ed.test", "ed25519-sha256")],
            _ => vec![("dual.test", "rsa-sha256"), ("dual.test", "ed25519-sha256")],
        }
    };
    let mut rsa_copy = Vec::new();
    for (name, _, _) in &cases {
        let msg = sink_message(&sink, &format!("Subject: {name} case"));
        let v = verify(&msg, &keys.records);
        let want = expect(name);
        assert_eq!(
            v.len(),
            want.len(),
            "{name}: {v:?}\n{}",
            String::from_utf8_lossy(&msg)
        );
        for (sig, (d, a)) in v.iter().zip(&want) {
            assert_eq!(sig["d"], *d, "{name}: {v:?}");
            assert_eq!(sig["a"], *a, "{name}: {v:?}");
        }
        assert!(
            all_ok(&v),
            "{name}: {v:?}\n{}",
            String::from_utf8_lossy(&msg)
        );
        // From: signed and oversigned; the signature fields come first, then the Received header.
        assert!(
            v[0]["h"].as_str().unwrap().matches("from").count() >= 2,
            "{v:?}"
        );
        assert!(msg.starts_with(b"DKIM-Signature: "), "{name}");
        if *name == "dual" {
            for sig in &v {
                assert_eq!(
                    sig["h"]
                        .as_str()
                        .unwrap()
                        .replace([' ', '\t', '\r', '\n'], ""),
                    "from:to:to:cc:subject:date:message-id:reply-to:mime-version:content-type:\
                     content-transfer-encoding:list-unsubscribe:list-unsubscribe-post:from",
                    "{}",
                    String::from_utf8_lossy(&msg)
                );
            }
        }
        if *name == "rsa" {
            rsa_copy = msg;
        }
    }
    // Modified after signing: the body, or a signed header, or a From: added: each fails.
    let text = String::from_utf8(rsa_copy).unwrap();
    for changed in [
        text.replace("Hello from RSA.", "Hello from RSA!"),
        text.replace("Subject: rsa case", "Subject: rsa kase"),
        text.replace("\r\n\r\nHello", "\r\nFrom: mallory@rsa.test\r\n\r\nHello"),
    ] {
        assert_ne!(changed, text);
        let v = verify(changed.as_bytes(), &keys.records);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0]["ok"], false, "a modified message verified: {changed}");
    }
    // Local delivery sends the same bytes (LF line ends in the Maildir): verified as a reader sees them.
    let r = send_raw(
        &mut c,
        "sender@client.test",
        "",
        &["carol@localhost"],
        b"From: a@ed.test\r\nSubject: local case\r\n\r\nTo a mailbox.\r\n",
    );
    assert!(r.starts_with("250"), "{r}");
    let new = mail.join("carol/Maildir/new");
    let mut file = None;
    wait_for(
        || {
            file = std::fs::read_dir(&new)
                .ok()
                .and_then(|mut rd| rd.next())
                .and_then(|e| e.ok())
                .map(|e| e.path());
            file.is_some()
        },
        "the local delivery",
    );
    let stored = std::fs::read(file.unwrap()).unwrap();
    let crlf = String::from_utf8(stored).unwrap().replace('\n', "\r\n");
    let v = verify(crlf.as_bytes(), &keys.records);
    assert!(v.len() == 1 && all_ok(&v), "{v:?}\n{crlf}");
    c.cmd("QUIT");
}

fn counter(s: &Server, key: &str) -> u64 {
    server_stats(s)[key].as_u64().unwrap_or(0)
}

#[test]
fn outsiders_relayed_mail_is_signed_only_with_dkim_sign_relayed_and_never_to_local_mailboxes() {
    let dir = tempfile::tempdir().unwrap();
    let mut keys = Keys::new();
    keys.add(dir.path(), "org.test", "k1", "ed25519");
    keys.add(dir.path(), "org.test", "k2", "ed25519");
    let port = free_port();
    let sink = Sink::start("127.0.0.62", port, &[]);
    let mail = dir.path().join("mailroot");
    // A local alias that forwards elsewhere: mail to it is mail to us, even though it leaves again.
    let aliases = dir.path().join("aliases");
    std::fs::write(&aliases, "fwd: elsewhere@relay.test\n").unwrap();
    // k2's entry is left out for now: a reload adds it below.
    let k2_at = keys.entries.rfind("[[dkim]]").unwrap();
    let k2_entry = keys.entries[k2_at..].to_string();
    let top = format!(
        "relayhost = \"[127.0.0.62]:{port}\"\nmynetworks = [\"127.0.0.1/32\"]\nrelay_domains = [\"relay.test\"]\n\
         mydestination = [\"localhost\"]\ndkim_sign_relayed = false\nalias_maps = [\"{}\"]\n\n{}\n\
         [delivery]\nenabled = true\nsmtp_connect_timeout = \"2s\"\n\
         [local]\nusers = [\"carol\"]\nsystem_users = false\nmailbox_path = \"{}/{{user}}/Maildir\"\n",
        aliases.display(),
        &keys.entries[..k2_at],
        mail.display()
    );
    let s = Server::start_in(dir, &top);
    let outsider = |subject: &str, to: &str| {
        let mut c =
            Client::from_stream(connect_from("127.0.0.2".parse().unwrap(), s.smtp).unwrap());
        c.reply();
        c.cmd("EHLO outside.test");
        let data = format!("From: a@org.test\r\nSubject: {subject}\r\n\r\nfrom outside\r\n");
        let r = send_raw(&mut c, "a@org.test", "", &[to], data.as_bytes());
        assert!(r.starts_with("250"), "{r}");
        c.cmd("QUIT");
    };
    outsider("outsider unsigned", "x@relay.test");
    let msg = sink_message(&sink, "Subject: outsider unsigned");
    assert_eq!(signatures(&msg), 0, "{}", String::from_utf8_lossy(&msg));
    // A trusted client's mail from the same domain is signed (the keys work).
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO inside.test");
    let r = send_raw(
        &mut c,
        "a@org.test",
        "",
        &["y@relay.test"],
        b"From: a@org.test\r\nSubject: trusted one\r\n\r\nx\r\n",
    );
    assert!(r.starts_with("250"), "{r}");
    let v = verify(&sink_message(&sink, "Subject: trusted one"), &keys.records);
    assert!(v.len() == 1 && all_ok(&v) && v[0]["s"] == "k1", "{v:?}");
    // dkim_sign_relayed = true, and k2 added, by a reload.
    reload_config(&s, |t| {
        t.replace("dkim_sign_relayed = false", "dkim_sign_relayed = true")
            .replace("[delivery]", &format!("{k2_entry}\n[delivery]"))
    });
    assert_eq!(counter(&s, "config_reload_failures"), 0);
    outsider("outsider signed", "x@relay.test");
    let v = verify(
        &sink_message(&sink, "Subject: outsider signed"),
        &keys.records,
    );
    assert!(
        v.len() == 2 && all_ok(&v),
        "both keys after the reload: {v:?}"
    );
    // ... but never mail from outsiders to a local address, even one an alias forwards to a relayed domain.
    outsider("outsider to a forwarding alias", "fwd@localhost");
    let msg = sink_message(&sink, "Subject: outsider to a forwarding alias");
    assert!(
        String::from_utf8_lossy(&msg).contains("from outside"),
        "the forwarded copy"
    );
    assert_eq!(signatures(&msg), 0, "{}", String::from_utf8_lossy(&msg));
    // ... nor to local mailboxes.
    outsider("outsider to a mailbox", "carol@localhost");
    let new = mail.join("carol/Maildir/new");
    wait_for(
        || {
            std::fs::read_dir(&new)
                .map(|rd| rd.count() == 1)
                .unwrap_or(false)
        },
        "the local delivery",
    );
    let stored = read_files(&new).concat();
    assert!(stored.contains("Subject: outsider to a mailbox"));
    assert!(!stored.contains("DKIM-Signature"), "{stored}");
    // A reload naming a key that cannot be read fails and keeps the running keys.
    let k2_path = k2_entry
        .lines()
        .find_map(|l| l.strip_prefix("private_key_file = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_string();
    let broken = format!("{k2_path}.missing");
    reload_config(&s, |t| t.replace(&k2_path, &broken));
    assert_eq!(counter(&s, "config_reload_failures"), 1);
    // (A session keeps the settings it started with: a new one sees what the reloads left.)
    c.cmd("QUIT");
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO inside.test");
    let r = send_raw(
        &mut c,
        "a@org.test",
        "",
        &["z@relay.test"],
        b"From: a@org.test\r\nSubject: after a failed reload\r\n\r\nx\r\n",
    );
    assert!(r.starts_with("250"), "{r}");
    let v = verify(
        &sink_message(&sink, "Subject: after a failed reload"),
        &keys.records,
    );
    assert!(v.len() == 2 && all_ok(&v), "the old keys stay: {v:?}");
    c.cmd("QUIT");
}

#[test]
fn http_injected_mail_is_signed() {
    let dir = tempfile::tempdir().unwrap();
    let mut keys = Keys::new();
    keys.add(dir.path(), "app.test", "web", "rsa-2048");
    let port = free_port();
    let sink = Sink::start("127.0.0.63", port, &[]);
    let http = free_port();
    let top = format!(
        "relayhost = \"[127.0.0.63]:{port}\"\n\n{}\n[delivery]\nenabled = true\nsmtp_connect_timeout = \"2s\"\n\
         [http]\nlisten = \"127.0.0.1:{http}\"\n",
        keys.entries
    );
    let _s = Server::start_in(dir, &top);
    let body = serde_json::json!({
        "envelope_sender": "news@app.test",
        "recipients": ["reader@dest.test"],
        "content": "From: News <news@app.test>\nTo: reader@dest.test\nSubject: injected case\n\nover HTTP\n"
    });
    let o = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "30",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
        ])
        .arg(body.to_string())
        .arg(format!("http://127.0.0.1:{http}/api/v1/inject"))
        .output()
        .expect("curl");
    let answer: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)));
    assert_eq!(
        answer["accepted"],
        serde_json::json!(["reader@dest.test"]),
        "{answer}"
    );
    let msg = sink_message(&sink, "Subject: injected case");
    let v = verify(&msg, &keys.records);
    assert!(
        v.len() == 1 && all_ok(&v) && v[0]["d"] == "app.test",
        "{v:?}"
    );
    // Counted in /metrics (copied from the shards every 100 ms).
    let signed = || {
        let o = Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .arg(format!("http://127.0.0.1:{http}/metrics"))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("shardmta_dkim_signings_total{result=\"signed\"} "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    wait_for(|| signed() >= 1.0, "the signing counted in /metrics");
}

#[test]
fn keygen_never_replaces_a_file_and_a_bad_key_stops_the_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (_, _, entry) = keygen(dir.path(), "k.test", "s1", "ed25519");
    let path = dir.path().join("k.test.s1.pem");
    assert!(
        entry.contains("domain = \"k.test\"") && entry.contains("selector = \"s1\""),
        "{entry}"
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let before = std::fs::read(&path).unwrap();
    let o = Command::new(BIN)
        .args([
            "dkim",
            "keygen",
            "--domain",
            "k.test",
            "--selector",
            "s1",
            "--out",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("never replaced"));
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // A key file that is not a key: serve stops at once with a line naming the file.
    let bad = dir.path().join("bad.pem");
    std::fs::write(
        &bad,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "queue_directory = \"{}\"\n[[dkim]]\ndomain = \"k.test\"\nselector = \"s1\"\nprivate_key_file = \"{}\"\n\
             [delivery]\nenabled = false\n[[listener]]\naddress = \"127.0.0.1:{}\"\nkind = \"smtp\"\n",
            dir.path().join("spool").display(),
            bad.display(),
            free_port()
        ),
    )
    .unwrap();
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "serve still running"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains("bad.pem") && err.contains("dkim"),
        "stderr: {err}"
    );
    // check-config reads the key too.
    let o = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("bad.pem")
            || String::from_utf8_lossy(&o.stderr).contains("bad.pem")
    );
}

/// A bounce returns the message as it was sent on, our trace fields included: the DKIM signature in the
/// returned copy still verifies (RET=FULL), so the sender can see that its mail left signed.
#[test]
fn a_bounce_returns_the_signed_message_whose_signature_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let mut keys = Keys::new();
    keys.add(dir.path(), "ed.test", "e1", "ed25519");
    let port = free_port();
    let sink = Sink::start("127.0.0.64", port, &[]);
    let top = format!(
        "relayhost = \"[127.0.0.64]:{port}\"\n\n{}\n[delivery]\nenabled = true\nsmtp_connect_timeout = \"2s\"\n",
        keys.entries
    );
    let s = Server::start_in(dir, &top);
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO client.test");
    let r = send_raw(
        &mut c,
        "alice@ed.test",
        " RET=FULL",
        &["permfail@dest.test"],
        b"From: Alice <alice@ed.test>\r\nTo: permfail@dest.test\r\nSubject: returned case\r\n\r\nThe body comes back.\r\n",
    );
    assert!(r.starts_with("250"), "{r}");
    c.cmd("QUIT");
    let bounce = sink_message(&sink, "Content-Type: message/rfc822");
    let marker = b"Content-Type: message/rfc822\r\n\r\n";
    let start = bounce
        .windows(marker.len())
        .position(|w| w == marker)
        .unwrap()
        + marker.len();
    let end = bounce
        .windows(4)
        .rposition(|w| w == b"\r\n--")
        .expect("the closing boundary");
    let returned = &bounce[start..end + 2];
    assert!(
        returned.starts_with(b"DKIM-Signature:") && memmem(returned, b"The body comes back."),
        "{}",
        String::from_utf8_lossy(returned)
    );
    let v = verify(returned, &keys.records);
    assert!(
        v.len() == 1 && all_ok(&v) && v[0]["d"] == "ed.test",
        "{v:?}"
    );
}
