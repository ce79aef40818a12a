//! Queue benchmarks: the pure record codec (encode/decode of a 1 KB message
//! record) and append + group commit on a real temporary directory with a
//! glommio executor, at several session concurrencies (the throughput shows
//! how many appends one fdatasync serves).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shardmta::queue::record::{self, Record};
use shardmta::queue::{Envelope, QueueId, QueueStore, RcptState, ShardQueue};

fn envelope() -> Envelope {
    Envelope {
        egress_pool: None,
        sender: "sender@example.org".into(),
        recipients: vec!["rcpt@example.com".into()],
        arrival_unix_ms: 1_700_000_000_000,
        client_addr: "127.0.0.1:40000".into(),
        client_helo: "client.example.org".into(),
        tls: "TLSv1.3".into(),
        auth_user: String::new(),
        smtputf8: false,
        body_8bitmime: false,
        dsn: Default::default(),
    }
}

const RECEIVED: &[u8] =
    b"Received: from client.example.org (127.0.0.1) by relay; Tue, 1 Jan 2030 00:00:00 +0000\r\n";

fn body_1k() -> Vec<u8> {
    let mut d = b"Subject: bench\r\n\r\n".to_vec();
    while d.len() < 1024 {
        d.extend_from_slice(b"lorem ipsum dolor sit amet consectetur\r\n");
    }
    d.truncate(1024);
    d
}

fn codec(c: &mut Criterion) {
    let env = envelope();
    let data = body_1k();
    let states = [RcptState::Pending];
    let len = record::message_record_len(&env, RECEIVED.len(), data.len()) as usize;
    let mut buf = vec![0u8; len];
    let mut g = c.benchmark_group("queue_codec");
    g.throughput(Throughput::Bytes(len as u64));
    let key = record::SegmentKey {
        key: *b"bench-segment-ky",
        seq: 1,
    };
    let fmt = record::RecordFormat::V2(key);
    // Encoding plus the keyed tag the segment adds at append time.
    g.bench_function("encode_message_1k", |b| {
        b.iter(|| {
            let n = record::encode_message(
                black_box(&mut buf),
                QueueId(1),
                black_box(&env),
                &states,
                RECEIVED,
                black_box(&data),
            );
            record::seal(&mut buf, &key, 4096);
            n
        })
    });
    record::encode_message(&mut buf, QueueId(1), &env, &states, RECEIVED, &data);
    record::seal(&mut buf, &key, 4096);
    g.bench_function("decode_message_1k", |b| {
        b.iter(
            || match record::decode_record(black_box(&buf), &fmt, 4096) {
                Ok((Record::Message(m), n)) => (m.data.len(), n),
                _ => unreachable!("bench record must decode"),
            },
        )
    });
    g.finish();
}

/// Runs `iters` appends of a 1 KB message + `durable()` spread over
/// `sessions` concurrent tasks; returns the time and the number of syncs.
fn run_appends(iters: u64, sessions: u64) -> (Duration, u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_path_buf();
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            let (store, _) = QueueStore::open_shard(&path, 0, 64 * 1024 * 1024).expect("open");
            let q = ShardQueue::new(store);
            let env = std::rc::Rc::new(envelope());
            let data = std::rc::Rc::new(body_1k());
            let start = Instant::now();
            let mut tasks = Vec::new();
            for s in 0..sessions {
                let n = iters / sessions + u64::from(s < iters % sessions);
                let (q, env, data) = (q.clone(), env.clone(), data.clone());
                tasks.push(glommio::spawn_local(async move {
                    for _ in 0..n {
                        let t = q.with_store(|st| {
                            let id = st.allocate_id();
                            st.append_message(id, &env, RECEIVED, &data)
                                .expect("append")
                        });
                        q.durable(t).await.expect("durable");
                    }
                }));
            }
            for t in tasks {
                t.await;
            }
            let elapsed = start.elapsed();
            let syncs = q.sync_count();
            q.shutdown().await;
            (elapsed, syncs)
        })
        .expect("executor")
        .join()
        .expect("join")
}

fn append_group_commit(c: &mut Criterion) {
    let mut g = c.benchmark_group("queue_append_group_commit");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(1));
    for sessions in [1u64, 16, 128] {
        g.bench_with_input(
            BenchmarkId::from_parameter(sessions),
            &sessions,
            |b, &sessions| b.iter_custom(|iters| run_appends(iters, sessions).0),
        );
        let (t, syncs) = run_appends(5000, sessions);
        eprintln!(
            "queue_append: {sessions} sessions: 5000 appends in {:?}, {syncs} syncs ({:.1} appends/sync)",
            t,
            5000.0 / syncs.max(1) as f64
        );
    }
    g.finish();
}

criterion_group!(benches, codec, append_group_commit);
criterion_main!(benches);
