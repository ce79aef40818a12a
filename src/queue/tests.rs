//! Tests of the queue store, recovery, housekeeping, group commit and listing.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use super::record::SEGMENT_HEADER_LEN;
use super::*;
use crate::limits;

const SMALL: u64 = 16 * 1024;

fn env(n_rcpt: usize) -> Envelope {
    Envelope {
        egress_pool: None,
        sender: "sender@example.org".into(),
        recipients: (0..n_rcpt)
            .map(|i| format!("rcpt{i}@example.com"))
            .collect(),
        arrival_unix_ms: 1_700_000_000_000,
        client_addr: "127.0.0.1:40000".into(),
        client_helo: "client.example.org".into(),
        tls: String::new(),
        auth_user: "user".into(),
        smtputf8: false,
        body_8bitmime: true,
        dsn: Default::default(),
    }
}

fn data(tag: u64, len: usize) -> Vec<u8> {
    let mut d = format!("Subject: message {tag}\r\n\r\n").into_bytes();
    while d.len() < len {
        d.extend_from_slice(b"0123456789abcdefghijklmnopqrstuvwxyz\r\n");
    }
    d.truncate(len);
    d
}

fn open(dir: &Path, size: u64) -> (QueueStore, RecoveryReport) {
    QueueStore::open_shard(dir, 0, size).expect("open")
}

fn add(store: &mut QueueStore, n_rcpt: usize, len: usize) -> QueueId {
    let id = store.allocate_id();
    store
        .append_message(id, &env(n_rcpt), b"Received: by test\r\n", &data(id.0, len))
        .expect("append");
    id
}

fn seg_path(dir: &Path, seq: u64) -> std::path::PathBuf {
    shard_dir(dir, 0).join(segment::file_name(seq))
}

fn corrupt_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("corrupt"))
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

#[test]
fn torn_tail_is_kept_and_appends_go_to_a_new_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut s, _) = open(dir, SMALL * 4);
    let a = add(&mut s, 1, 500);
    let b = add(&mut s, 1, 600);
    let c = add(&mut s, 1, 700);
    let last = s.get(c).unwrap().clone();
    s.sync_blocking().unwrap();
    drop(s);
    // Zero the middle of the last record.
    let seg = seg_path(dir, last.segment_seq);
    patch(&seg, last.record_offset + last.record_len / 2, &[0u8; 64]);
    let image = std::fs::read(&seg).unwrap();
    let (mut s, r) = open(dir, SMALL * 4);
    assert_eq!(r.torn_tails, 1);
    assert_eq!(r.corrupt_records, 0);
    assert_eq!(r.regions_kept, 1);
    assert_eq!(r.pending_messages, 2);
    assert!(s.get(a).is_some() && s.get(b).is_some() && s.get(c).is_none());
    assert_eq!(s.message_data(b).unwrap().1, &data(b.0, 600)[..]);
    // Nothing destroyed: the damaged segment is as it was (but for the recovery sync), and the unreadable
    // bytes are copied to corrupt/ for an operator.
    assert_eq!(std::fs::read(&seg).unwrap(), image);
    let kept = corrupt_files(dir);
    assert_eq!(kept.len(), 1, "{kept:?}");
    let copy = std::fs::read(dir.join("corrupt").join(&kept[0])).unwrap();
    let at = last.record_offset as usize;
    assert_eq!(copy, image[at..at + copy.len()]);
    assert!(copy.len() as u64 <= last.record_len);
    assert!(!r.notes.is_empty());
    // Appends go to a new segment, never after the damage.
    let d = add(&mut s, 2, 800);
    assert!(s.get(d).unwrap().segment_seq > last.segment_seq);
    s.sync_blocking().unwrap();
    drop(s);
    let (s, r) = open(dir, SMALL * 4);
    // The same damage is seen again, but kept only once.
    assert_eq!(r.torn_tails, 1);
    assert_eq!(r.regions_kept, 0);
    assert_eq!(corrupt_files(dir).len(), 1);
    assert_eq!(r.pending_messages, 3);
    assert_eq!(r.pending_recipients, 4);
    assert_eq!(s.message_data(d).unwrap().1, &data(d.0, 800)[..]);
    assert_eq!(s.message_data(d).unwrap().0, b"Received: by test\r\n");
}

/// What an unauthenticated client could do before segment keys: put a complete, checksummed queue record in
/// a message body (BDAT keeps bytes as they are), and when the outer record is torn, recovery resynchronised
/// into it and queued an envelope of the client's choosing. Now the embedded record is never applied.
#[test]
fn record_forged_inside_a_body_is_never_recovered() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut s, _) = open(dir, SMALL * 16);
    let before = add(&mut s, 1, 300);
    // The forgery: a message record for a victim, in the old framing (16-byte header, crc over it all) and in
    // the keyed framing with guessed keys, at every 8-byte alignment.
    let evil = Envelope {
        egress_pool: None,
        sender: "attacker@evil.example".into(),
        recipients: vec!["victim@elsewhere.example".into()],
        auth_user: "admin".into(),
        ..env(1)
    };
    let forged_id = QueueId::from_parts(0x7000_0000, 0, 1);
    let mut body = b"Subject: hello\r\n\r\n".to_vec();
    body.extend(crate::fuzzing::forged_records(&evil, forged_id, 1, 8));
    let outer = s.allocate_id();
    s.append_message(outer, &env(1), b"Received: x\r\n", &body)
        .unwrap();
    let pm = s.get(outer).unwrap().clone();
    s.sync_blocking().unwrap();
    drop(s);
    // Tear the outer record: its header is lost, its body survives.
    patch(
        &seg_path(dir, pm.segment_seq),
        pm.record_offset,
        &[0xEE; 24],
    );
    let (s, r) = open(dir, SMALL * 16);
    assert!(s.get(forged_id).is_none(), "forged record recovered");
    assert!(
        !s.pending()
            .any(|m| m.envelope.sender.starts_with("attacker")),
        "forged envelope recovered"
    );
    assert!(s.get(before).is_some());
    assert!(s.get(outer).is_none());
    assert_eq!(r.pending_messages, 1);
    assert!(r.torn_tails == 1 && r.regions_kept == 1, "{r:?}");
    // queue list (read-only) agrees.
    let listed = list_queue(dir).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, before.to_string());
}

/// Segments written before segment keys (format 1) are read, then sealed: new records go to a keyed segment.
#[test]
fn old_format_segment_is_read_and_never_appended_to() {
    use super::record::{self, SegmentHeader, RECORD_MAGIC};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let shard = shard_dir(dir, 0);
    std::fs::create_dir_all(&shard).unwrap();
    let mut img = vec![0u8; SMALL as usize];
    record::encode_segment_header(
        &mut img,
        &SegmentHeader {
            shard: 0,
            seq: 1,
            created_unix_ms: 1,
            segment_size: SMALL,
            id_epoch: 1000,
            key: None,
        },
    );
    // One format-1 message record: the payload of a keyed encoding, framed the old way.
    let id = QueueId::from_parts(1000, 0, 3);
    let d = data(7, 200);
    let len = record::message_record_len(&env(2), 5, d.len()) as usize;
    let mut r = vec![0u8; len];
    record::encode_message(
        &mut r,
        id,
        &env(2),
        &[RcptState::Pending; 2],
        b"Rcv\r\n",
        &d,
    );
    let plen = u32::from_le_bytes(r[8..12].try_into().unwrap()) as usize;
    let at = SEGMENT_HEADER_LEN;
    img[at..at + 4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    img[at + 4] = 1;
    img[at + 5] = 1;
    img[at + 8..at + 12].copy_from_slice(&(plen as u32).to_le_bytes());
    img[at + 16..at + 16 + plen].copy_from_slice(&r[24..24 + plen]);
    let crc = crc32c::crc32c(&img[at..at + 16 + plen]);
    img[at + 12..at + 16].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(seg_path(dir, 1), &img).unwrap();
    let (mut s, r) = open(dir, SMALL);
    assert_eq!(r.old_format_segments, 1);
    assert_eq!(r.pending_messages, 1);
    assert_eq!(s.message_data(id).unwrap(), (&b"Rcv\r\n"[..], &d[..]));
    s.append_progress(id, 0, RcptState::Delivered, "250")
        .unwrap();
    let n = add(&mut s, 1, 100);
    assert!(s.get(n).unwrap().segment_seq > 1);
    s.sync_blocking().unwrap();
    drop(s);
    let (s, r) = open(dir, SMALL);
    assert_eq!(r.pending_messages, 2);
    assert_eq!(s.get(id).unwrap().states[0], RcptState::Delivered);
    assert_eq!(
        std::fs::read(seg_path(dir, 1)).unwrap(),
        img,
        "old segment modified"
    );
}

/// A `*.seg` symlink (as root, the old loader opened its target read-write and zeroed it) is moved aside
/// untouched, as are foreign and hard-linked files; the spool's files are private.
#[test]
fn symlinks_and_foreign_files_are_set_aside_untouched() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("spool");
    let shard = shard_dir(&dir, 0);
    std::fs::create_dir_all(&shard).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let victim = tmp.path().join("passwd");
    let original = b"root:x:0:0:root:/root:/bin/bash\n".repeat(20);
    std::fs::write(&victim, &original).unwrap();
    std::os::unix::fs::symlink(&victim, seg_path(&dir, 1)).unwrap();
    let linked = tmp.path().join("linked");
    std::fs::write(&linked, vec![7u8; 4096]).unwrap();
    std::fs::hard_link(&linked, seg_path(&dir, 2)).unwrap();
    let (mut s, r) = open(&dir, SMALL);
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        original,
        "symlink target written"
    );
    assert_eq!(std::fs::read(&linked).unwrap(), vec![7u8; 4096]);
    assert_eq!(r.files_set_aside, 2, "{:?}", r.notes);
    let aside = corrupt_files(&dir);
    assert_eq!(
        aside,
        vec![
            "shard-0.0000000000000001.seg".to_string(),
            "shard-0.0000000000000002.seg".to_string()
        ]
    );
    assert!(
        std::fs::symlink_metadata(dir.join("corrupt").join(&aside[0]))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let id = add(&mut s, 1, 100);
    s.sync_blocking().unwrap();
    // Modes: directories 0700, files 0600.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&shard), 0o700);
    assert_eq!(mode(&dir.join("corrupt")), 0o700);
    assert_eq!(mode(&shard.join("lock")), 0o600);
    let seq = s.get(id).unwrap().segment_seq;
    assert_eq!(mode(&seg_path(&dir, seq)), 0o600);
    drop(s);
    // A spool directory others may write to is refused with a clear error.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = QueueStore::open_shard(&dir, 0, SMALL)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("chmod 700"), "{e}");
}

#[test]
fn bad_checksum_in_middle_is_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut s, _) = open(dir, SMALL * 4);
    let a = add(&mut s, 1, 500);
    let b = add(&mut s, 1, 600);
    let c = add(&mut s, 1, 700);
    let mid = s.get(b).unwrap().clone();
    s.sync_blocking().unwrap();
    drop(s);
    patch(
        &seg_path(dir, mid.segment_seq),
        mid.record_offset + mid.record_len - 40,
        b"XX",
    );
    let (s, r) = open(dir, SMALL * 4);
    assert_eq!(r.corrupt_records, 1);
    assert_eq!(r.torn_tails, 0);
    assert!(s.get(a).is_some() && s.get(b).is_none() && s.get(c).is_some());
    assert_eq!(s.message_data(c).unwrap().1, &data(c.0, 700)[..]);
}

#[test]
fn progress_records_are_applied_on_recovery() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut s, _) = open(dir, SMALL * 4);
    let id = add(&mut s, 3, 300);
    let deferred = RcptState::Deferred {
        next_attempt_unix_s: 1_800_000_000,
        attempts: 2,
    };
    s.append_progress(id, 0, RcptState::Delivered, "250 ok")
        .unwrap();
    s.append_progress(id, 1, deferred, "451 later").unwrap();
    assert!(matches!(
        s.append_progress(id, 3, RcptState::Delivered, ""),
        Err(QueueError::BadRecipientIndex { .. })
    ));
    assert!(matches!(
        s.append_progress(QueueId(1), 0, RcptState::Delivered, ""),
        Err(QueueError::UnknownId(_))
    ));
    s.sync_blocking().unwrap();
    drop(s);
    let (mut s, r) = open(dir, SMALL * 4);
    assert_eq!(r.pending_messages, 1);
    assert_eq!(r.pending_recipients, 2);
    let pm = s.get(id).unwrap();
    assert_eq!(
        pm.states,
        vec![RcptState::Delivered, deferred, RcptState::Pending]
    );
    let open_idx: Vec<usize> = pm.open_recipients().map(|(i, _, _)| i).collect();
    assert_eq!(open_idx, vec![1, 2]);
    s.append_progress(id, 1, RcptState::Delivered, "250")
        .unwrap();
    s.append_progress(id, 2, RcptState::Bounced, "550 no such user")
        .unwrap();
    assert!(s.get(id).is_none());
    s.sync_blocking().unwrap();
    drop(s);
    let (s, r) = open(dir, SMALL * 4);
    assert_eq!(r.pending_messages, 0);
    assert_eq!(s.pending().count(), 0);
}

#[test]
fn rollover_when_full_and_too_large() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut s, _) = open(dir, SMALL);
    let ids: Vec<QueueId> = (0..20).map(|_| add(&mut s, 1, 2000)).collect();
    assert!(s.segment_count() >= 3, "{} segments", s.segment_count());
    let too_big = vec![b'x'; SMALL as usize];
    let id = s.allocate_id();
    assert!(matches!(
        s.append_message(id, &env(1), b"", &too_big),
        Err(QueueError::TooLarge { .. })
    ));
    // Largest record that fits exactly still works after a TooLarge.
    add(&mut s, 1, 100);
    s.sync_blocking().unwrap();
    drop(s);
    let (s, r) = open(dir, SMALL);
    assert_eq!(r.pending_messages, 21);
    for id in ids {
        assert_eq!(s.message_data(id).unwrap().1, &data(id.0, 2000)[..]);
    }
}

#[test]
fn done_segments_are_deleted_by_housekeeping_and_open() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut s, _) = open(dir, SMALL);
    let ids: Vec<QueueId> = (0..20).map(|_| add(&mut s, 1, 2000)).collect();
    let first_seq = s.get(ids[0]).unwrap().segment_seq;
    let seqs_before = s.segment_seqs();
    assert!(seqs_before.len() >= 2);
    // Finish every message living in the first segment.
    for id in &ids {
        if s.get(*id).unwrap().segment_seq == first_seq {
            s.append_progress(*id, 0, RcptState::Delivered, "250")
                .unwrap();
        }
    }
    let r = s.housekeeping(0).unwrap();
    // The progress records are not durable yet: the deletion waits.
    assert_eq!(r.segments_deleted, 0);
    assert!(r.deletions_waiting_for_sync >= 1);
    assert!(seg_path(dir, first_seq).exists());
    s.sync_blocking().unwrap();
    let r = s.housekeeping(0).unwrap();
    assert_eq!(r.segments_deleted, 1);
    assert!(!seg_path(dir, first_seq).exists());
    assert_eq!(s.stats().segments_deleted, 1);

    // Finish everything else: reopening deletes every sealed segment.
    let rest: Vec<QueueId> = s.pending().map(|m| m.id).collect();
    for id in rest {
        s.append_progress(id, 0, RcptState::Bounced, "550").unwrap();
    }
    s.sync_blocking().unwrap();
    let active = *s.segment_seqs().last().unwrap();
    drop(s);
    let (s, r) = open(dir, SMALL);
    assert_eq!(r.pending_messages, 0);
    assert!(r.segments_deleted >= 1);
    assert_eq!(s.segment_seqs(), vec![active]);
}

#[test]
fn compaction_copies_long_deferred_message_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut s, _) = open(dir, SMALL);
    let old = add(&mut s, 2, 700);
    let deferred = RcptState::Deferred {
        next_attempt_unix_s: 10_000,
        attempts: 5,
    };
    s.append_progress(old, 0, RcptState::Delivered, "250")
        .unwrap();
    s.append_progress(old, 1, deferred, "451 greylisted")
        .unwrap();
    let old_seq = s.get(old).unwrap().segment_seq;
    // Fill several segments with messages that then get delivered.
    for _ in 0..20 {
        let id = add(&mut s, 1, 1500);
        s.append_progress(id, 0, RcptState::Delivered, "250")
            .unwrap();
    }
    assert!(s.segment_count() >= 3);
    s.sync_blocking().unwrap();
    // Not yet long-deferred relative to "now": no copy.
    let r = s.housekeeping(10_000).unwrap();
    assert_eq!(r.messages_copied, 0);
    assert!(seg_path(dir, old_seq).exists());
    // Now the retry is far away: the message is copied forward.
    let r = s.housekeeping(1_000).unwrap();
    assert_eq!(r.messages_copied, 1);
    assert!(s.get(old).unwrap().segment_seq > old_seq);
    assert!(
        seg_path(dir, old_seq).exists(),
        "deleted before the copy was durable"
    );
    s.sync_blocking().unwrap();
    let r = s.housekeeping(1_000).unwrap();
    assert!(r.segments_deleted >= 2, "{r:?}");
    assert!(!seg_path(dir, old_seq).exists());
    assert_eq!(s.segment_count(), 1);
    drop(s);
    let (s, r) = open(dir, SMALL);
    assert_eq!(r.pending_messages, 1);
    let pm = s.get(old).unwrap();
    assert_eq!(pm.states, vec![RcptState::Delivered, deferred]);
    assert_eq!(s.message_data(old).unwrap().1, &data(old.0, 700)[..]);
    assert_eq!(s.message_data(old).unwrap().0, b"Received: by test\r\n");
}

/// A message's DSN facts (RET, ENVID, NOTIFY, ORCPT) and its delay warning survive a restart and a compaction
/// copy (the copy carries them in its own record: the control record that set the warning goes with the old
/// segment).
#[test]
fn dsn_facts_and_delay_warning_survive_recovery_and_compaction() {
    use crate::smtp::dsn::{EnvelopeDsn, Notify, Orcpt, RcptDsn, Ret};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut s, _) = open(dir, SMALL);
    let mut e = env(2);
    e.dsn = EnvelopeDsn {
        ret: Some(Ret::Full),
        envid: Some("T-1".into()),
        rcpts: vec![
            RcptDsn::default(),
            RcptDsn {
                notify: Notify::parse("DELAY,FAILURE").ok(),
                orcpt: Some(Orcpt {
                    addr_type: "rfc822".into(),
                    address: "orig@example.com".into(),
                }),
            },
        ],
        delay_warned: false,
    };
    let id = s.allocate_id();
    s.append_message(id, &e, b"Received: x\r\n", &data(1, 700))
        .unwrap();
    let plain = add(&mut s, 1, 300);
    let deferred = RcptState::Deferred {
        next_attempt_unix_s: 10_000,
        attempts: 1,
    };
    s.append_progress(id, 0, deferred, "451").unwrap();
    s.append_progress(id, 1, deferred, "451").unwrap();
    s.append_control(id, super::record::ControlOp::DelayWarned)
        .unwrap();
    s.append_progress(plain, 0, deferred, "451").unwrap();
    assert!(s.get(id).unwrap().envelope.dsn.delay_warned);
    s.sync_blocking().unwrap();
    drop(s);
    let (mut s, _) = open(dir, SMALL);
    let mut want = e.dsn.clone();
    want.delay_warned = true;
    assert_eq!(s.get(id).unwrap().envelope.dsn, want);
    assert_eq!(s.get(plain).unwrap().envelope.dsn, EnvelopeDsn::default());
    let old_seq = s.get(id).unwrap().segment_seq;
    for _ in 0..20 {
        let x = add(&mut s, 1, 1500);
        s.append_progress(x, 0, RcptState::Delivered, "250")
            .unwrap();
    }
    s.sync_blocking().unwrap();
    let r = s.housekeeping(1_000).unwrap();
    assert_eq!(r.messages_copied, 2);
    s.sync_blocking().unwrap();
    let r = s.housekeeping(1_000).unwrap();
    assert!(r.segments_deleted >= 1, "{r:?}");
    assert!(!seg_path(dir, old_seq).exists());
    drop(s);
    let (s, _) = open(dir, SMALL);
    assert_eq!(s.get(id).unwrap().envelope.dsn, want);
    assert_eq!(s.get(plain).unwrap().envelope.dsn, EnvelopeDsn::default());
}

/// A message's egress pool survives a restart and a compaction copy; a message without one stays without.
#[test]
fn the_egress_pool_survives_recovery_and_compaction() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut s, _) = open(dir, SMALL);
    let mut e = env(1);
    e.egress_pool = Some("bulk".into());
    let id = s.allocate_id();
    s.append_message(id, &e, b"Received: x\r\n", &data(1, 700))
        .unwrap();
    let plain = add(&mut s, 1, 300);
    let deferred = RcptState::Deferred {
        next_attempt_unix_s: 10_000,
        attempts: 1,
    };
    s.append_progress(id, 0, deferred, "451").unwrap();
    s.append_progress(plain, 0, deferred, "451").unwrap();
    s.sync_blocking().unwrap();
    drop(s);
    let (mut s, _) = open(dir, SMALL);
    assert_eq!(
        s.get(id).unwrap().envelope.egress_pool.as_deref(),
        Some("bulk")
    );
    assert_eq!(s.get(plain).unwrap().envelope.egress_pool, None);
    let old_seq = s.get(id).unwrap().segment_seq;
    for _ in 0..20 {
        let x = add(&mut s, 1, 1500);
        s.append_progress(x, 0, RcptState::Delivered, "250")
            .unwrap();
    }
    s.sync_blocking().unwrap();
    let r = s.housekeeping(1_000).unwrap();
    assert_eq!(r.messages_copied, 2);
    s.sync_blocking().unwrap();
    let r = s.housekeeping(1_000).unwrap();
    assert!(r.segments_deleted >= 1, "{r:?}");
    assert!(!seg_path(dir, old_seq).exists());
    drop(s);
    let (s, _) = open(dir, SMALL);
    assert_eq!(
        s.get(id).unwrap().envelope.egress_pool.as_deref(),
        Some("bulk")
    );
    assert_eq!(s.get(plain).unwrap().envelope.egress_pool, None);
}

#[test]
fn a_hold_survives_a_crash_between_the_copy_and_its_hold_record() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut s, _) = open(dir, SMALL);
    let held = add(&mut s, 1, 700);
    s.append_control(held, super::record::ControlOp::Hold)
        .unwrap();
    let old_seq = s.get(held).unwrap().segment_seq;
    for _ in 0..20 {
        let id = add(&mut s, 1, 1500);
        s.append_progress(id, 0, RcptState::Delivered, "250")
            .unwrap();
    }
    s.sync_blocking().unwrap();
    // Compaction copies the held message forward, then writes its hold again after the copy.
    let r = s.housekeeping(1_000).unwrap();
    assert_eq!(r.messages_copied, 1);
    let pm = s.get(held).unwrap();
    assert!(pm.held);
    let (seq, hold_at) = (pm.segment_seq, pm.record_offset + pm.record_len);
    assert!(seq > old_seq);
    s.sync_blocking().unwrap();
    drop(s);
    // A crash with the copy on the disk but not the hold record after it (the log's tail is torn there); the
    // old segment, with the first hold, is still there (its deletion waits for the next housekeeping).
    assert!(seg_path(dir, old_seq).exists());
    let f = std::fs::read(seg_path(dir, seq)).unwrap();
    let hold_len = super::record::CONTROL_RECORD_LEN as usize;
    assert!(f[hold_at as usize..][..hold_len].iter().any(|&b| b != 0));
    patch(&seg_path(dir, seq), hold_at, &vec![0u8; hold_len]);
    let (s, _) = open(dir, SMALL);
    assert!(
        s.get(held).unwrap().held,
        "the copy released a held message"
    );
}

#[test]
fn queue_ids_unique_across_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut seen = HashSet::new();
    let mut last_epoch = 0;
    for round in 0..4 {
        let (mut s, _) = open(dir, SMALL);
        let ids: Vec<QueueId> = (0..50).map(|_| s.allocate_id()).collect();
        for id in &ids {
            assert!(seen.insert(*id), "id {id} reused");
            assert_eq!(id.shard(), 0);
            assert!(id.epoch() > last_epoch || round == 0);
        }
        last_epoch = ids[0].epoch();
        // Only sometimes write a message: ids must be unique regardless.
        if round % 2 == 0 {
            s.append_message(ids[0], &env(1), b"", b"x").unwrap();
        }
        s.sync_blocking().unwrap();
    }
}

#[test]
fn second_open_of_same_shard_is_locked() {
    let tmp = tempfile::tempdir().unwrap();
    let (_s, _) = open(tmp.path(), SMALL);
    assert!(matches!(
        QueueStore::open_shard(tmp.path(), 0, SMALL),
        Err(QueueError::Locked(_))
    ));
}

#[test]
fn garbage_segment_files_do_not_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = 0x1234_5678_9ABC_DEF1u64;
    let mut bytes = vec![0u8; SMALL as usize];
    for b in bytes.iter_mut() {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        *b = rng as u8;
    }
    std::fs::create_dir_all(shard_dir(dir, 0)).unwrap();
    std::fs::write(seg_path(dir, 1), &bytes).unwrap();
    std::fs::write(seg_path(dir, 2), &bytes[..100]).unwrap();
    std::fs::write(seg_path(dir, 3), b"").unwrap();
    let (mut s, r) = open(dir, SMALL);
    assert_eq!(r.pending_messages, 0);
    // None of them is a segment: all three are moved aside, untouched.
    assert_eq!(r.files_set_aside, 3);
    assert_eq!(
        std::fs::read(dir.join("corrupt").join("shard-0.0000000000000001.seg")).unwrap(),
        bytes
    );
    let id = add(&mut s, 1, 100);
    s.sync_blocking().unwrap();
    drop(s);
    let (s, _) = open(dir, SMALL);
    assert!(s.get(id).is_some());
}

#[test]
fn group_commit_batches_syncs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            let (store, _) = QueueStore::open_shard(&dir, 3, 1 << 20).unwrap();
            let q = ShardQueue::new(store);
            let mut tasks = Vec::new();
            for i in 0..100u64 {
                let q = q.clone();
                tasks.push(glommio::spawn_local(async move {
                    let ticket = {
                        let mut s = q.store();
                        let id = s.allocate_id();
                        s.append_message(id, &env(1), b"R: x\r\n", &data(i, 1000))
                            .unwrap()
                    };
                    q.durable(ticket).await.unwrap();
                    assert!(q.synced_position() >= ticket);
                    ticket
                }));
            }
            let mut max_ticket = CommitTicket::default();
            for t in tasks {
                max_ticket = max_ticket.max(t.await);
            }
            let syncs = q.sync_count();
            assert!((1..20).contains(&syncs), "{syncs} syncs for 100 appends");
            assert_eq!(q.tickets_committed(), 100);
            assert!(q.store().durable_position() >= max_ticket);
            // After shutdown, everything appended is durable.
            let t = {
                let mut s = q.store();
                let id = s.allocate_id();
                s.append_message(id, &env(1), b"", b"last").unwrap()
            };
            q.shutdown().await;
            assert!(q.synced_position() >= t);
            q.durable(t).await.unwrap();
        })
        .unwrap()
        .join()
        .unwrap();
}

/// `queue_commit_delay_us`: four sessions send five messages each, one after another with a few ms between them
/// (as lockstep clients do), their messages spread in time. Once a sync has served several of them, the pacing
/// holds each sync back long enough for all four to join it: about one sync per round. Without pacing each
/// message gets its own sync (about 20) unless the disk is slow enough to batch them by itself. Every ticket is
/// still durable before `durable` returns. (That a lone client is never delayed is the unit test
/// `sync_pacing_delays_only_syncs_that_follow_each_other`.)
#[test]
fn commit_delay_lets_spread_messages_share_a_sync() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let syncs = glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            let (store, _) = QueueStore::open_shard(&dir, 4, 1 << 20).unwrap();
            let q = ShardQueue::with_commit_delay(store, Duration::from_millis(30));
            let mut tasks = Vec::new();
            for k in 0..4u64 {
                let q = q.clone();
                tasks.push(glommio::spawn_local(async move {
                    // Bounded: 5 messages per session.
                    for i in 0..5u64 {
                        let ticket = {
                            let mut s = q.store();
                            let id = s.allocate_id();
                            s.append_message(id, &env(1), b"R: x\r\n", &data(10 * k + i, 1000))
                                .unwrap()
                        };
                        q.durable(ticket).await.unwrap();
                        assert!(q.store().durable_position() >= ticket);
                        // The next message comes 2, 5, 8 or 11 ms after this one's 250.
                        glommio::timer::sleep(Duration::from_millis(2 + 3 * k)).await;
                    }
                }));
            }
            for t in tasks {
                t.await;
            }
            let syncs = q.sync_count();
            q.shutdown().await;
            syncs
        })
        .unwrap()
        .join()
        .unwrap();
    assert!(
        syncs <= 8,
        "{syncs} syncs for 4 sessions x 5 messages with a 30 ms commit delay"
    );
}

#[test]
fn shard_queue_housekeeping_deletes_after_sync() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            let (store, _) = QueueStore::open_shard(&dir, 0, SMALL).unwrap();
            let q = ShardQueue::new(store);
            for _ in 0..30 {
                let t = q.with_store(|s| {
                    let id = add(s, 1, 1500);
                    s.append_progress(id, 0, RcptState::Delivered, "250")
                        .unwrap()
                });
                q.durable(t).await.unwrap();
            }
            let r = q.housekeeping(0).await.unwrap();
            assert!(r.segments_deleted >= 2, "{r:?}");
            assert_eq!(q.store().segment_count(), 1);
            q.shutdown().await;
        })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn list_queue_is_read_only() {
    let tmp = tempfile::tempdir().unwrap();
    let qdir = tmp.path();
    let (mut s0, _) = QueueStore::open_shard(qdir, 0, SMALL).unwrap();
    let (mut s1, _) = QueueStore::open_shard(qdir, 1, SMALL).unwrap();
    let a = add(&mut s0, 2, 100);
    let b = add(&mut s1, 1, 200);
    let done = add(&mut s1, 1, 200);
    s0.append_progress(
        a,
        1,
        RcptState::Deferred {
            next_attempt_unix_s: 99,
            attempts: 1,
        },
        "451",
    )
    .unwrap();
    s1.append_progress(done, 0, RcptState::Delivered, "250")
        .unwrap();
    // Appends reach the file at the next group commit (the server's committer runs within limits::QUEUE_IDLE_FLUSH_AFTER).
    s1.sync_blocking().unwrap();
    s0.sync_blocking().unwrap();
    drop(s0); // shard 0 stopped, shard 1 still open (locked) while listing

    let snapshot = || {
        let mut v = Vec::new();
        for shard in 0..2 {
            let d = shard_dir(qdir, shard);
            let mut names: Vec<_> = std::fs::read_dir(&d)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            names.sort();
            for p in names {
                let md = std::fs::metadata(&p).unwrap();
                v.push((
                    p.clone(),
                    md.modified().unwrap(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
        v
    };
    let before = snapshot();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let list = list_queue(qdir).unwrap();
    assert!(before == snapshot(), "list_queue modified the queue");
    assert_eq!(list.len(), 2);
    let la = list.iter().find(|m| m.id == a.to_string()).unwrap();
    assert_eq!(la.shard, 0);
    assert_eq!(la.size, 100);
    assert_eq!(la.sender, "sender@example.org");
    assert_eq!(la.recipients[0].state, "pending");
    assert_eq!(la.recipients[1].state, "deferred");
    assert_eq!(la.recipients[1].next_attempt_unix_s, Some(99));
    assert!(list.iter().any(|m| m.id == b.to_string() && m.shard == 1));
    let json = serde_json::to_string(&list).unwrap();
    assert!(json.contains("\"deferred\""));
    drop(s1);
}

#[test]
fn segment_header_len_is_aligned() {
    assert_eq!(SEGMENT_HEADER_LEN % 8, 0);
}

#[test]
fn idle_flush_syncs_unawaited_records() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            let (store, _) = QueueStore::open_shard(&dir, 0, SMALL).unwrap();
            let q = ShardQueue::new(store);
            let pos = q.with_store(|s| {
                let id = add(s, 2, 100);
                s.append_progress(id, 0, RcptState::Delivered, "250")
                    .unwrap()
            });
            assert!(q.synced_position() < pos);
            glommio::timer::sleep(limits::QUEUE_IDLE_FLUSH_AFTER * 3).await;
            assert!(q.synced_position() >= pos);
            assert!(q.store().durable_position() >= pos);
            assert_eq!(q.sync_count(), 1);
            q.shutdown().await;
        })
        .unwrap()
        .join()
        .unwrap();
}

/// A directory named like a leftover temp file, a segment whose header names another shard, and a file with an
/// upper-case segment name never stop the start nor get scanned as segments.
#[test]
fn odd_names_and_foreign_headers_are_set_aside_or_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut s, _) = open(dir, SMALL);
    let id = add(&mut s, 1, 100);
    s.sync_blocking().unwrap();
    let seq = s.get(id).unwrap().segment_seq;
    drop(s);
    let shard0 = shard_dir(dir, 0);
    std::fs::create_dir(shard0.join("00000000000000aa.seg.tmp")).unwrap();
    // A second name for the same segment (upper-case hex): must not be read as another copy.
    std::fs::copy(
        seg_path(dir, seq),
        shard0.join(format!("{:015x}A.seg", seq >> 4)),
    )
    .unwrap();
    // Shard 1 gets a copy of shard 0's segment: its header names shard 0.
    std::fs::create_dir_all(shard_dir(dir, 1)).unwrap();
    std::fs::copy(
        seg_path(dir, seq),
        shard_dir(dir, 1).join(segment::file_name(seq)),
    )
    .unwrap();
    let (s, r) = open(dir, SMALL);
    assert_eq!(r.pending_messages, 1);
    assert!(s.get(id).is_some());
    assert_eq!(r.files_set_aside, 1, "{:?}", r.notes);
    drop(s);
    let (s1, r1) = QueueStore::open_shard(dir, 1, SMALL).unwrap();
    assert_eq!(r1.pending_messages, 0);
    assert_eq!(r1.files_set_aside, 1, "{:?}", r1.notes);
    assert!(s1.get(id).is_none());
}

/// Appends through `ShardQueue::append_*` never create a segment file on the reactor thread: rollover finds a
/// spare made on the blocking pool (by the committer, or by `room_for` when none is ready). The same appends
/// straight on a store create their segments inline (the counter can tell).
#[test]
fn shard_queue_appends_create_no_segment_inline() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    {
        let (mut store, _) = open(&tmp.path().join("direct"), SMALL);
        for _ in 0..30 {
            add(&mut store, 1, 1500);
        }
        assert!(
            store.stats().segments_created_inline >= 2,
            "{:?}",
            store.stats()
        );
    }
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            let (store, _) = QueueStore::open_shard(&dir, 0, SMALL).unwrap();
            let q = ShardQueue::new(store);
            let e = env(1);
            for i in 0..30 {
                let id = q.store().allocate_id();
                let t = q
                    .append_message(id, &e, b"Received: by test\r\n", &data(i, 1500))
                    .await
                    .unwrap();
                if i % 2 == 0 {
                    // Every other one is not waited for: appends run ahead of the syncs.
                    q.durable(t).await.unwrap();
                }
                let t = q
                    .append_progress(id, 0, RcptState::Delivered, "250 ok")
                    .await
                    .unwrap();
                q.durable(t).await.unwrap();
            }
            let stats = q.stats();
            assert!(stats.segments_created >= 2, "{stats:?}");
            assert_eq!(stats.segments_created_inline, 0, "{stats:?}");
            assert_eq!(q.store().pending_count(), 0);
            q.shutdown().await;
        })
        .unwrap()
        .join()
        .unwrap();
}
