//! Durability under SIGKILL: every message that got a 250 is in the queue with its data intact after a restart.
//!
//! Clients send messages carrying unique tokens and record each acknowledged one; the server is killed with
//! SIGKILL at a random moment under load, several times, restarting on the same spool in between.

mod common;

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use common::*;

const ROUNDS: usize = 3;
const CLIENTS: usize = 8;

#[test]
fn sigkill_under_load_loses_no_acknowledged_message() {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut s = Server::start("");
    let acked = sigkill_rounds(
        &mut s,
        seed,
        ROUNDS,
        CLIENTS,
        |n| vec![format!("r{n}@localhost"), format!("s{n}@remote.example")],
        None,
        usize::MAX,
    );
    let listed: HashMap<String, serde_json::Value> = s
        .queue()
        .into_iter()
        .map(|m| (m["id"].as_str().unwrap().to_string(), m))
        .collect();
    for (token, id) in &acked {
        let m = listed
            .get(id)
            .unwrap_or_else(|| panic!("acknowledged message {id} ({token}) lost"));
        assert_eq!(m["recipients"].as_array().unwrap().len(), 2, "{id}");
    }
    // Data intact: every acknowledged message's stored bytes carry its own token, unstuffed.
    let ids: Vec<&str> = acked.values().map(String::as_str).collect();
    for chunk in ids.chunks(500) {
        let mut args = vec!["queue", "cat"];
        args.extend_from_slice(chunk);
        let out = s.cli(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        for part in text.split("==> ").skip(1) {
            let (id, body) = part.split_once(" <==\n").unwrap();
            let token = acked
                .iter()
                .find(|(_, v)| v.as_str() == id)
                .map(|(k, _)| k)
                .unwrap();
            assert!(body.contains(&format!("X-Token: {token}\r\n")), "{id} data");
            assert!(
                body.ends_with(&format!("\r\n.{token}\r\n")),
                "{id} data tail"
            );
        }
        assert_eq!(text.matches("==> ").count(), chunk.len());
    }
    eprintln!("{} acknowledged messages all recovered intact", acked.len());
}

/// A client's BDAT body carrying complete queue records (the old framing, and the keyed one with guessed keys)
/// plus 8 MB of record magics. Its outer record is then torn, as a crash in the middle of its write would leave
/// it. Recovery and `queue list` must not queue the embedded envelope (before: 8 of 20 real kills left forged
/// envelopes, one was delivered), and must not take long (before: `queue list` 82 s, `serve` 308 s for 8 MB).
#[test]
fn records_inside_a_torn_bdat_body_are_never_recovered() {
    use shardmta::queue::record::{self, RecordFormat};
    use shardmta::queue::{Envelope, QueueId};
    use std::time::Instant;

    let mut s = Server::start("shards = 1\n");
    let evil = Envelope {
        sender: "attacker@evil.test".into(),
        recipients: vec!["victim@elsewhere.test".into()],
        auth_user: "admin".into(),
        client_addr: "10.0.0.1".into(),
        ..Default::default()
    };
    let mut body = b"Subject: looks harmless\r\n\r\n".to_vec();
    body.extend(shardmta::fuzzing::forged_records(
        &evil,
        QueueId::from_parts(0x7000_0000, 0, 1),
        1,
        16,
    ));
    // 8 MB of magics at every 8-byte alignment, in lines (folding must not matter).
    let mut line = Vec::new();
    while line.len() < 960 {
        line.extend_from_slice(b"SMQR\x01\x02\0\0");
    }
    line.extend_from_slice(b"\r\n");
    while body.len() < 8 << 20 {
        body.extend_from_slice(&line);
    }
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO attacker");
    assert!(c.cmd("MAIL FROM:<x@client.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<y@localhost>").starts_with("250"));
    c.send(format!("BDAT {} LAST\r\n", body.len()).as_bytes());
    c.send(&body);
    let id = queued_id(&c.reply());
    c.cmd("QUIT");
    s.kill9();
    // Tear the outer record: its 24-byte header is lost.
    let seg = s.spool().join("shard-0").join("0000000000000001.seg");
    let image = std::fs::read(&seg).unwrap();
    let mut at = None;
    let out = shardmta::queue::segment::scan(&image, |off, _, rec| {
        if let record::Record::Message(m) = rec {
            if m.id.to_string() == id {
                at = Some(off);
            }
        }
    });
    assert!(matches!(
        out.header.map(|h| h.format()),
        Ok(RecordFormat::V2(_))
    ));
    let at = at.expect("the message record") as usize;
    let mut torn = image.clone();
    torn[at..at + 24].copy_from_slice(&[0x5A; 24]);
    std::fs::write(&seg, &torn).unwrap();
    let t = Instant::now();
    let listed = s.queue();
    let list_time = t.elapsed();
    let t = Instant::now();
    s.spawn();
    let start_time = t.elapsed();
    let listed_after = s.queue();
    for l in [&listed, &listed_after] {
        assert!(
            l.iter().all(|m| m["sender"] != "attacker@evil.test"),
            "forged envelope queued: {l:?}"
        );
        assert!(l.iter().all(|m| m["id"] != id.as_str()), "{l:?}");
    }
    eprintln!("queue list {list_time:?}, restart {start_time:?} with a torn 8 MB record of magics");
    assert!(
        list_time < std::time::Duration::from_secs(20),
        "{list_time:?}"
    );
    assert!(
        start_time < std::time::Duration::from_secs(30),
        "{start_time:?}"
    );
    // The unreadable bytes were kept for an operator.
    let kept: Vec<_> = std::fs::read_dir(s.spool().join("corrupt"))
        .unwrap()
        .collect();
    assert_eq!(kept.len(), 1);
}
