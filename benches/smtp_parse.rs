//! SMTP engine hot paths: command parsing, DATA dot-unstuffing, and one pipelined transaction through the
//! session state machine (no sockets).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use shardmta::config::{Config, ListenerKind};
use shardmta::policy::RelayPolicy;
use shardmta::smtp::command::parse_command;
use shardmta::smtp::data::{BareNewline, DataDecoder};
use shardmta::smtp::session::{Action, Session, SessionConfig};

fn commands(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse_command");
    for (name, line) in [
        (
            "mail",
            &b"MAIL FROM:<sender@client.example.com> SIZE=1024 BODY=8BITMIME"[..],
        ),
        ("rcpt", b"RCPT TO:<recipient.name@destination.example.org>"),
        ("ehlo", b"EHLO client.example.com"),
        ("data", b"DATA"),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| black_box(parse_command(black_box(line), false)).is_ok())
        });
    }
    g.finish();
}

fn message(size: usize) -> Vec<u8> {
    let mut m = b"From: a@client.example\r\nTo: b@example.org\r\nSubject: bench\r\n\r\n".to_vec();
    let mut i = 0;
    while m.len() < size {
        // Some lines start with a dot, to exercise unstuffing.
        if i % 10 == 0 {
            m.extend_from_slice(b"..");
        }
        m.extend_from_slice(
            b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n",
        );
        i += 1;
    }
    m.extend_from_slice(b".\r\n");
    m
}

fn data(c: &mut Criterion) {
    let mut g = c.benchmark_group("data_decode");
    for size in [1024usize, 100 * 1024] {
        let input = message(size);
        let mut out = Vec::with_capacity(input.len());
        g.throughput(Throughput::Bytes(input.len() as u64));
        g.bench_function(format!("{size}B"), |b| {
            b.iter(|| {
                out.clear();
                let mut d = DataDecoder::new(BareNewline::Normal, 10_240_000, 998);
                black_box(d.feed(black_box(&input), &mut out))
            })
        });
    }
    g.finish();
}

fn session(c: &mut Criterion) {
    let cfg = Config::default();
    let sc = Arc::new(SessionConfig {
        hostname: "mx.bench".into(),
        kind: ListenerKind::Smtp,
        message_size_limit: cfg.message_size_limit,
        recipient_limit: cfg.smtpd_recipient_limit,
        hard_error_limit: cfg.smtpd_hard_error_limit,
        line_length_limit: cfg.line_length_limit,
        bare_newline: BareNewline::Normal,
        smtp_line_length_limit: 998,
        tls_available: false,
        auth_available: false,
        allow_plaintext_auth: false,
    });
    let check = shardmta::policy::RecipientCheck::new(
        Arc::new(RelayPolicy::new(&cfg)),
        Arc::new(
            shardmta::local::recipients::RecipientTable::load(Arc::new(cfg.clone()))
                .expect("default tables"),
        ),
    );
    let mut batch =
        b"MAIL FROM:<sender@client.example.com>\r\nRCPT TO:<rcpt@example.org>\r\nDATA\r\n".to_vec();
    batch.extend_from_slice(&message(1024));
    let mut g = c.benchmark_group("session");
    g.throughput(Throughput::Elements(1));
    g.bench_function("pipelined_1k_transaction", |b| {
        let mut s = Session::new(sc.clone(), "127.0.0.1".parse().unwrap(), true);
        let mut out = Vec::with_capacity(4096);
        s.feed(b"EHLO client.example.com\r\n", &mut out);
        b.iter(|| {
            out.clear();
            // The I/O layer's part: the RCPT verdict between two feeds.
            let (n, a) = s.feed(black_box(&batch), &mut out);
            let Action::Recipient(req) = a else {
                panic!("{a:?}")
            };
            let v = check.check(req, s.targets_mut());
            s.rcpt_result(v, &mut out);
            let (m, a) = s.feed(black_box(&batch[n..]), &mut out);
            assert_eq!((n + m, a), (batch.len(), Action::Message));
            s.message_done(Ok("0123456789ABCDEF"), &mut out);
            black_box(out.len())
        })
    });
    g.finish();
}

criterion_group!(benches, commands, data, session);
criterion_main!(benches);
