//! DKIM signing at acceptance: a whole signature (header selection, body hash, private-key operation) of a 1 KB
//! message with Ed25519 and with RSA-2048, the private-key operation alone, and the relaxed body hash of 100 KB.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use shardmta::config::{Config, DkimKeyConfig};
use shardmta::dkim::canon::BodyHasher;
use shardmta::dkim::key::{generate_pem, KeyAlgorithm};
use shardmta::dkim::{Dkim, SigningKey};

fn message(size: usize) -> Vec<u8> {
    let mut m = b"From: Sender Name <sender@example.com>\r\nTo: rcpt@example.org\r\n\
Subject: a message for the signing bench\r\nDate: Thu, 03 Dec 2026 17:00:00 +0000\r\n\
Message-ID: <bench.1@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        .to_vec();
    while m.len() < size {
        m.extend_from_slice(b"The quick brown fox jumps over the lazy dog,  twice.  \r\n");
    }
    m
}

fn signer(dir: &std::path::Path, alg: KeyAlgorithm) -> Dkim {
    let path: PathBuf = dir.join(format!("{alg:?}.pem"));
    std::fs::write(&path, generate_pem(alg).unwrap()).unwrap();
    let cfg = Config {
        dkim: vec![DkimKeyConfig {
            domain: "example.com".into(),
            selector: "bench".into(),
            private_key_file: path,
            headers: None,
        }],
        ..Config::default()
    };
    Dkim::load(&cfg).unwrap()
}

fn sign(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let msg = message(1024);
    let mut g = c.benchmark_group("dkim_sign_1k");
    for (name, alg) in [
        ("ed25519", KeyAlgorithm::Ed25519),
        ("rsa2048", KeyAlgorithm::Rsa2048),
    ] {
        let d = signer(dir.path(), alg);
        g.bench_function(name, |b| {
            b.iter(|| {
                black_box(d.sign_now(black_box(&msg), 1_700_000_000))
                    .unwrap()
                    .unwrap()
            })
        });
        g.bench_function(format!("{name}_prepare_only"), |b| {
            b.iter(|| black_box(d.prepare(black_box(&msg), 1_700_000_000)).is_some())
        });
    }
    g.finish();
    let mut g = c.benchmark_group("dkim_key_op");
    for (name, alg) in [
        ("ed25519", KeyAlgorithm::Ed25519),
        ("rsa2048", KeyAlgorithm::Rsa2048),
    ] {
        let k = SigningKey::from_pem(generate_pem(alg).unwrap().as_bytes()).unwrap();
        let input = vec![b'h'; 600];
        g.bench_function(name, |b| b.iter(|| k.sign(black_box(&input)).unwrap()));
    }
    g.finish();
}

fn body_hash(c: &mut Criterion) {
    let msg = message(100 * 1024);
    let mut g = c.benchmark_group("dkim_body_hash");
    g.throughput(Throughput::Bytes(msg.len() as u64));
    g.bench_function("relaxed_100k", |b| {
        b.iter(|| {
            let mut h = BodyHasher::new();
            h.update(black_box(&msg));
            h.finish()
        })
    });
    g.finish();
}

criterion_group!(benches, sign, body_hash);
criterion_main!(benches);
