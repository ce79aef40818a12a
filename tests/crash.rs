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
