//! The bounce classifier's cost per classified failure (`delivery::bounce_class`): it runs twice per deferred or
//! bounced recipient (the owner's log line, the origin's metrics), never for a delivered one. The cases: the
//! common mass-deferral diagnostic of our own (a connection refused), a plain "no such user", and long provider
//! replies that reach the text patterns late in the table.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use shardmta::delivery::bounce_class::BounceClassifier;

fn classify(c: &mut Criterion) {
    let classifier = BounceClassifier::default();
    let mut g = c.benchmark_group("bounce_class");
    for (name, reply) in [
        ("connection_refused", "4.4.1 connection failed: IO error occurred: Connection refused (os error 111) (host mx.example.com[192.0.2.7])"),
        ("no_such_user", "550 5.1.1 <bob@example.com>: Recipient address rejected: User unknown in virtual mailbox table"),
        ("gmail_rate_limit", "421 4.7.28 Gmail has detected an unusual rate of unsolicited mail originating from your IP address. To protect our users from spam, mail sent from your IP address has been temporarily rate limited. gsmtp"),
        ("generic_tempfail", "451 4.3.0 Try again later"),
        ("spamhaus", "554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org; https://www.spamhaus.org/query/ip/192.0.2.1"),
    ] {
        g.bench_function(name, |b| b.iter(|| classifier.classify(black_box(reply))));
    }
    g.finish();
}

criterion_group!(benches, classify);
criterion_main!(benches);
