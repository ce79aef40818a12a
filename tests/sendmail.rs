//! `shardmta sendmail` against a running relay: exit codes (sysexits) and what lands in the queue.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;

fn sendmail(s: &Server, args: &[&str], stdin: &[u8]) -> (i32, String) {
    let mut child = Command::new(BIN)
        .arg("sendmail")
        .args(args)
        .env("SHARDMTA_CONFIG", &s.config)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn sendmail_submits_with_arguments_and_with_t() {
    let s = Server::start("");
    let (code, err) = sendmail(
        &s,
        &["-oi", "-f", "app@client.test", "bob@localhost"],
        b"Subject: one\n\nline\n.\nafter dot\n",
    );
    assert_eq!(code, 0, "{err}");
    let (code, err) = sendmail(
        &s,
        &["-t", "-f", "app@client.test"],
        b"To: A <a@localhost>\nBcc: hidden@localhost\nSubject: two\n\nbody\n.\nnot sent\n",
    );
    assert_eq!(code, 0, "{err}");
    let q = s.queue();
    assert_eq!(q.len(), 2);
    let one = q
        .iter()
        .find(|m| m["recipients"][0]["address"] == "bob@localhost")
        .unwrap();
    let two = q
        .iter()
        .find(|m| m["recipients"][0]["address"] == "a@localhost")
        .unwrap();
    assert_eq!(
        two["recipients"].as_array().unwrap().len(),
        2,
        "Bcc recipient kept in the envelope"
    );
    let body_one = String::from_utf8(s.queue_cat(one["id"].as_str().unwrap())).unwrap();
    assert!(
        body_one.ends_with("Subject: one\r\n\r\nline\r\n.\r\nafter dot\r\n"),
        "-oi keeps the dot line: {body_one:?}"
    );
    let body_two = String::from_utf8(s.queue_cat(two["id"].as_str().unwrap())).unwrap();
    assert!(
        !body_two.contains("hidden") && body_two.ends_with("body\r\n"),
        "Bcc removed, input ended at the dot: {body_two:?}"
    );
    assert_eq!(one["sender"], "app@client.test");
}

#[test]
fn sendmail_exit_codes() {
    let s = Server::start("mynetworks = [\"192.0.2.0/24\"]\n");
    let (code, err) = sendmail(
        &s,
        &["-f", "app@client.test", "x@remote.example"],
        b"Subject: x\n\nx\n",
    );
    assert_eq!(code, 67, "a refused recipient is EX_NOUSER: {err}");
    assert!(err.contains("554 5.7.1"), "{err}");
    let (code, _) = sendmail(&s, &["-q"], b"");
    assert_eq!(code, 64, "bad usage is EX_USAGE");
    let mut dead = Server::start("");
    dead.kill9();
    let (code, err) = sendmail(&dead, &["a@localhost"], b"x\n");
    assert_eq!(code, 75, "no relay running is EX_TEMPFAIL: {err}");
}
