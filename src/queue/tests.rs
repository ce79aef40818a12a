//! Tests of the queue store, recovery, housekeeping, group commit and listing.

use std::collections::HashSet;
use std::path::Path;

use super::record::SEGMENT_HEADER_LEN;
use super::*;

const SMALL: u64 = 16 * 1024;

fn env(n_rcpt: usize) -> Envelope {
    Envelope {
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
    QueueStore::open(dir, 0, size).expect("open")
}

fn add(store: &mut QueueStore, n_rcpt: usize, len: usize) -> QueueId {
    let id = store.allocate_id();
    store
        .append_message(id, &env(n_rcpt), b"Received: by test\r\n", &data(id.0, len))
        .expect("append");
    id
}

fn seg_path(dir: &Path, seq: u64) -> std::path::PathBuf {
    dir.join(segment::file_name(seq))
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

#[test]
fn torn_tail_is_truncated_and_appends_continue() {
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
    patch(
        &seg_path(dir, last.segment_seq),
        last.record_offset + last.record_len / 2,
        &[0u8; 64],
    );
    let (mut s, r) = open(dir, SMALL * 4);
    assert_eq!(r.torn_tails, 1);
    assert_eq!(r.corrupt_records, 0);
    assert_eq!(r.pending_messages, 2);
    assert!(s.get(a).is_some() && s.get(b).is_some() && s.get(c).is_none());
    assert_eq!(s.message_data(b).unwrap().1, &data(b.0, 600)[..]);
    // Appends continue right after the last valid record.
    let d = add(&mut s, 2, 800);
    assert!(s.get(d).unwrap().record_offset <= last.record_offset + 64);
    s.sync_blocking().unwrap();
    drop(s);
    let (s, r) = open(dir, SMALL * 4);
    assert_eq!(r.torn_tails, 0);
    assert_eq!(r.corrupt_records, 0);
    assert_eq!(r.pending_messages, 3);
    assert_eq!(r.pending_recipients, 4);
    assert_eq!(s.message_data(d).unwrap().1, &data(d.0, 800)[..]);
    assert_eq!(s.message_data(d).unwrap().0, b"Received: by test\r\n");
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
        QueueStore::open(tmp.path(), 0, SMALL),
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
    std::fs::write(seg_path(dir, 1), &bytes).unwrap();
    std::fs::write(seg_path(dir, 2), &bytes[..100]).unwrap();
    std::fs::write(seg_path(dir, 3), b"").unwrap();
    let (mut s, r) = open(dir, SMALL);
    assert_eq!(r.pending_messages, 0);
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
            let (store, _) = QueueStore::open(&dir, 3, 1 << 20).unwrap();
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

#[test]
fn shard_queue_housekeeping_deletes_after_sync() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            let (store, _) = QueueStore::open(&dir, 0, SMALL).unwrap();
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
    let (mut s0, _) = QueueStore::open(&shard_dir(qdir, 0), 0, SMALL).unwrap();
    let (mut s1, _) = QueueStore::open(&shard_dir(qdir, 1), 1, SMALL).unwrap();
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
    // Appends reach the file at the next group commit (the server's committer runs within IDLE_FLUSH).
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
            let (store, _) = QueueStore::open(&dir, 0, SMALL).unwrap();
            let q = ShardQueue::new(store);
            let pos = q.with_store(|s| {
                let id = add(s, 2, 100);
                s.append_progress(id, 0, RcptState::Delivered, "250")
                    .unwrap()
            });
            assert!(q.synced_position() < pos);
            glommio::timer::sleep(commit::IDLE_FLUSH * 3).await;
            assert!(q.synced_position() >= pos);
            assert!(q.store().durable_position() >= pos);
            assert_eq!(q.sync_count(), 1);
            q.shutdown().await;
        })
        .unwrap()
        .join()
        .unwrap();
}
