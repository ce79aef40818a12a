//! The event log's cost per event on the thread that logs it (a shard's reactor): the `tracing` dispatch, the
//! line formatted into the formatter's thread-local buffer, and the hand-over to `tracing-appender`'s
//! non-blocking writer (one allocation and a channel send); the writer thread writes to a sink that counts
//! lines. Text through the process-wide subscriber, as the server runs; JSON through a scoped one (there is one
//! process-wide subscriber per process).
//!
//! Criterion's loops log far faster than a server does, and on a busy 2-core machine the writer thread then
//! falls behind and lines are dropped (a cheaper path: no wake-up). The `*_no_drops` figures therefore log in
//! batches of 256 and time only the logging, waiting between batches (untimed) until the writer has written
//! every line: each figure is a hand-over into a channel with room, as in a server under its usual load.

use std::hint::black_box;
use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use shardmta::eventlog::{self, Attempt, EventLog, LogFormat, Reception, Relay, Status};
use shardmta::queue::QueueId;

/// A writer that counts the lines it is given and drops them.
#[derive(Clone, Default)]
struct CountingSink(Arc<AtomicU64>);

impl Write for CountingSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = b.iter().filter(|&&c| c == b'\n').count() as u64;
        self.0.fetch_add(n, Ordering::Relaxed);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const HEADER: &[u8] = b"Received: from client.example.org (client.example.org [192.0.2.7])\r\n\tby relay.example.org with ESMTPS id 4Bq2Xy0ZlVz9sWF; Sun, 1 Jun 2025 10:00:00 +0000\r\nFrom: Sender Name <sender@example.org>\r\nTo: Recipient Name <recipient@destination.example.com>\r\nSubject: A message of the kind the load tester sends\r\nDate: Sun, 1 Jun 2025 10:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nMessage-ID: <20250601100000.12345.67890@client.example.org>\r\n\r\nbody\r\n";

fn received() {
    eventlog::received(&Reception {
        queue_id: black_box(QueueId(0x6B11_7F96_0100_0001)),
        client: "192.0.2.7".parse().unwrap(),
        helo: "client.example.org",
        proto: "ESMTPS",
        sender: "sender@example.org",
        size: 4096,
        nrcpt: 1,
        message_id: eventlog::message_id(black_box(HEADER)),
        tls: Some("TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384"),
        sasl_method: None,
        sasl_username: None,
    })
}

fn connect_disconnect() {
    let ip: IpAddr = black_box("192.0.2.7".parse().unwrap());
    eventlog::connect(ip);
    eventlog::disconnect(ip, &"ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5", 5, 5);
}

fn delivery() {
    eventlog::delivery(&Attempt {
        queue_id: black_box(QueueId(0x6B11_7F96_0100_0001)),
        rcpt: "recipient@destination.example.com",
        relay: Relay::Host {
            host: "mx1.destination.example.com",
            ip: "198.51.100.25".parse().unwrap(),
            port: Some(25),
        },
        delay_s: 0.52,
        attempt: 1,
        status: Status::Sent,
        reply: "250 2.0.0 Ok: queued as 4Bq2Xy0ZlVz9sWF",
        tls: Some("TLSv1.3"),
        tls_policy: Some("may"),
        class: None,
        source: None,
    })
}

const EVENTS: [(&str, fn(), u64); 3] = [
    ("received (with the Message-ID scan)", received, 1),
    ("connect + disconnect", connect_disconnect, 2),
    ("delivery", delivery, 1),
];

fn events(c: &mut Criterion, group: &str) {
    let mut g = c.benchmark_group(group);
    for (name, f, _) in EVENTS {
        g.bench_function(name, |b| b.iter(f));
    }
    g.finish();
}

/// Timed batches of 256 events, each into a channel the writer has emptied (`written` counts its lines).
fn events_no_drops(c: &mut Criterion, group: &str, written: &AtomicU64) {
    let mut g = c.benchmark_group(group);
    for (name, f, lines) in EVENTS {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    let n = (iters - done).min(256);
                    let expect = written.load(Ordering::Relaxed) + n * lines;
                    let t = Instant::now();
                    for _ in 0..n {
                        f();
                    }
                    timed += t.elapsed();
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while written.load(Ordering::Relaxed) < expect {
                        assert!(Instant::now() < deadline, "lines were dropped");
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    done += n;
                }
                timed
            })
        });
    }
    g.finish();
}

fn text(c: &mut Criterion) {
    let sink = CountingSink::default();
    let written = sink.0.clone();
    let log = EventLog::start_to_writer(sink, LogFormat::Text);
    assert!(log.installed());
    events_no_drops(c, "eventlog_text_no_drops", &written);
    let dropped = log.dropped_lines();
    assert_eq!(dropped, 0);
    events(c, "eventlog_text");
    eprintln!(
        "eventlog_text: {} line(s) dropped of {}",
        log.dropped_lines() - dropped,
        written.load(Ordering::Relaxed) + (log.dropped_lines() - dropped) as u64
    );
}

fn json(c: &mut Criterion) {
    // The process-wide subscriber is the text one: JSON goes through a scoped subscriber on this thread.
    let sink = CountingSink::default();
    let written = sink.0.clone();
    let (writer, _guard) = tracing_appender::non_blocking(sink);
    let subscriber = tracing_subscriber::fmt()
        .event_format(eventlog::LineFormat::new(LogFormat::Json))
        .with_writer(writer)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        events_no_drops(c, "eventlog_json_no_drops", &written)
    });
}

/// The same events formatted but written straight to `io::sink()` on this thread: the cost without the
/// hand-over to the writer thread.
fn text_without_channel(c: &mut Criterion) {
    let subscriber = tracing_subscriber::fmt()
        .event_format(eventlog::LineFormat::new(LogFormat::Text))
        .with_writer(std::io::sink)
        .finish();
    tracing::subscriber::with_default(subscriber, || events(c, "eventlog_text_no_channel"));
}

fn message_id(c: &mut Criterion) {
    c.bench_function("message_id scan (10 header lines)", |b| {
        b.iter(|| eventlog::message_id(black_box(HEADER)))
    });
}

criterion_group!(benches, text, json, text_without_channel, message_id);
criterion_main!(benches);
