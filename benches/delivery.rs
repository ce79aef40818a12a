//! Delivery hot paths: encoding one outbound transaction (MAIL, RCPT, dot-stuffed DATA), the resolver's
//! answer cache (hit on a warm cache, miss, insert with eviction), and the cross-shard hand-off of a
//! `ShardMsg` between two glommio executors over a bounded channel mesh, as src/server.rs does it.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shardmta::delivery::{Outcome, RcptResult, ShardMsg};
use shardmta::dns::cache::{Cache, Cached};
use shardmta::dns::wire::{QType, Rdata};
use shardmta::queue::QueueId;
use shardmta::smtp::client::{encode_data, encode_mail, encode_rcpt, Capabilities, MailParams};

const RECEIVED: &[u8] =
    b"Received: from client.example.org (127.0.0.1) by relay; Tue, 1 Jan 2030 00:00:00 +0000\r\n";

/// A message body of about `size` bytes in which every tenth line starts with a dot (to be stuffed).
fn body(size: usize) -> Vec<u8> {
    let mut m = b"From: a@client.example\r\nTo: b@example.org\r\nSubject: bench\r\n\r\n".to_vec();
    let mut i = 0;
    while m.len() < size {
        if i % 10 == 0 {
            m.push(b'.');
        }
        m.extend_from_slice(
            b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n",
        );
        i += 1;
    }
    m
}

fn encode(c: &mut Criterion) {
    let caps = Capabilities {
        pipelining: true,
        size: Some(0),
        eight_bit_mime: true,
        ..Capabilities::default()
    };
    let mut g = c.benchmark_group("client_encode");
    for size in [1024usize, 100 * 1024] {
        let data = body(size);
        let total = (RECEIVED.len() + data.len()) as u64;
        let mut out = Vec::with_capacity(data.len() * 2);
        g.throughput(Throughput::Bytes(total));
        g.bench_function(format!("transaction_{size}B"), |b| {
            b.iter(|| {
                out.clear();
                encode_mail(
                    &mut out,
                    black_box("sender@client.example.com"),
                    &caps,
                    &MailParams {
                        size: total,
                        eight_bit: true,
                        ..Default::default()
                    },
                );
                encode_rcpt(
                    &mut out,
                    black_box("recipient.name@destination.example.org"),
                    None,
                );
                out.extend_from_slice(b"DATA\r\n");
                encode_data(&mut out, &[RECEIVED, black_box(&data)]);
                black_box(out.len())
            })
        });
    }
    g.finish();
}

const CACHE_NAMES: usize = 10_000;

fn mx(i: usize) -> Cached {
    Cached::Records(vec![
        Rdata::Mx {
            preference: 10,
            exchange: format!("mx1.domain{i}.example"),
        },
        Rdata::Mx {
            preference: 20,
            exchange: format!("mx2.domain{i}.example"),
        },
    ])
}

fn dns_cache(c: &mut Criterion) {
    let t0 = Instant::now();
    let names: Vec<String> = (0..2 * CACHE_NAMES)
        .map(|i| format!("domain{i}.example"))
        .collect();
    let mut cache = Cache::new(CACHE_NAMES);
    for (i, n) in names[..CACHE_NAMES].iter().enumerate() {
        cache.insert(n, QType::Mx, mx(i), 3600, t0);
    }
    assert_eq!(cache.len(), CACHE_NAMES);
    let mut g = c.benchmark_group("dns_cache_10k");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("hit", |b| {
        b.iter(|| {
            i = (i + 1) % CACHE_NAMES;
            let hit = cache.get(black_box(&names[i]), QType::Mx, t0);
            assert!(hit.is_some());
            hit
        })
    });
    g.bench_function("miss", |b| {
        b.iter(|| {
            let miss = cache.get(black_box("absent.example"), QType::Mx, t0);
            assert!(miss.is_none());
            miss
        })
    });
    // The cache is full and holds the last 10,000 of the 20,000 names inserted in order, so cycling
    // through all of them always inserts an absent name and evicts the soonest-expiring entry.
    let value = mx(0);
    let mut j = CACHE_NAMES;
    g.bench_function("insert_evict", |b| {
        b.iter(|| {
            cache.insert(black_box(&names[j]), QType::Mx, value.clone(), 3600, t0);
            j = (j + 1) % names.len();
        })
    });
    assert_eq!(cache.len(), CACHE_NAMES);
    g.finish();
}

/// Messages per criterion iteration of the hand-off bench.
const HANDOFF_BATCH: u64 = 100_000;
/// As src/server.rs's `MESH_CHANNEL_CAPACITY`.
const MESH_CHANNEL_CAPACITY: usize = 4096;

type Mesh =
    glommio::channels::channel_mesh::MeshBuilder<ShardMsg, glommio::channels::channel_mesh::Full>;

/// Sends `iters * HANDOFF_BATCH` clones of `template` as `ShardMsg::Outcome` from mesh peer 0 to peer 1
/// (each on its own Unbound executor); returns the time from the first send to the last receive.
fn run_handoff(iters: u64, template: &Outcome) -> Duration {
    let total = iters * HANDOFF_BATCH;
    let mesh = Mesh::full(2, MESH_CHANNEL_CAPACITY);
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let mesh = mesh.clone();
            let template = template.clone();
            glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
                .spawn(move || async move { handoff_peer(mesh, total, template).await })
                .expect("executor")
        })
        .collect();
    let (mut start, mut end) = (None, None);
    for h in handles {
        match h.join().expect("join") {
            Side::Sender(t) => start = Some(t),
            Side::Receiver(t) => end = Some(t),
        }
    }
    end.expect("receiver") - start.expect("sender")
}

enum Side {
    Sender(Instant),
    Receiver(Instant),
}

async fn handoff_peer(mesh: Mesh, total: u64, template: Outcome) -> Side {
    let (senders, mut receivers) = mesh.join().await.expect("join mesh");
    if senders.peer_id() == 0 {
        let start = Instant::now();
        for _ in 0..total {
            // Like src/server.rs's `mesh_send`: try first, wait for room only when the channel is full.
            let msg = ShardMsg::Outcome(template.clone());
            if let Err(e) = senders.try_send_to(1, msg) {
                let msg = match e {
                    glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(m)) => m,
                    other => panic!("mesh send failed: {other}"),
                };
                assert!(senders.send_to(1, msg).await.is_ok(), "mesh send failed");
            }
        }
        Side::Sender(start)
    } else {
        use futures_lite::StreamExt;
        let (_, mut stream) = receivers
            .streams()
            .into_iter()
            .next()
            .expect("one peer stream");
        for _ in 0..total {
            match stream.next().await {
                Some(ShardMsg::Outcome(o)) => {
                    black_box(o);
                }
                _ => unreachable!("the sender sends exactly `total` outcomes"),
            }
        }
        Side::Receiver(Instant::now())
    }
}

fn cross_shard(c: &mut Criterion) {
    let empty = Outcome {
        id: QueueId(1),
        results: Vec::new(),
        remote: None,
        attempted_unix_ms: 0,
        next_hop_dsn: false,
        retry: None,
    };
    let one_rcpt = Outcome {
        id: QueueId(1),
        results: vec![(
            0,
            RcptResult::Delivered {
                reply: "250 2.0.0 Ok: queued as 4Bq2Xy0ZlVz9sWF".into(),
            },
        )],
        remote: Some("mx1.destination.example.org".into()),
        attempted_unix_ms: 0,
        next_hop_dsn: false,
        retry: None,
    };
    let mut g = c.benchmark_group("cross_shard_handoff");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(HANDOFF_BATCH));
    for (name, template) in [("outcome_empty", &empty), ("outcome_1rcpt", &one_rcpt)] {
        g.bench_with_input(BenchmarkId::from_parameter(name), template, |b, t| {
            b.iter_custom(|iters| run_handoff(iters, t))
        });
    }
    g.finish();
}

criterion_group!(benches, encode, dns_cache, cross_shard);
criterion_main!(benches);
