//! The cost of shaping per message (`shaping`): the per-shard cached lookup of a destination's site and limits
//! (a hit: hash and compare, no allocation), the same answer computed without the cache (a miss), the
//! automation's per-job check with no action active and with one, and the observation of one throttle reply.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use shardmta::shaping::automation::Engine;
use shardmta::shaping::{Rules, Shaping};

fn lookup(c: &mut Criterion) {
    let rules = Arc::new(Rules::defaults());
    let shaping = Shaping::new(rules.clone());
    let mx = [
        "gmail-smtp-in.l.google.com",
        "alt1.gmail-smtp-in.l.google.com",
        "alt2.gmail-smtp-in.l.google.com",
        "alt3.gmail-smtp-in.l.google.com",
        "alt4.gmail-smtp-in.l.google.com",
    ];
    shaping.lookup("gmail.com", &mx, None);
    let mut g = c.benchmark_group("shaping");
    g.bench_function("lookup_cached", |b| {
        b.iter(|| shaping.lookup(black_box("gmail.com"), black_box(&mx), None))
    });
    g.bench_function("lookup_cached_source", |b| {
        shaping.lookup("gmail.com", &mx, Some("ip1"));
        b.iter(|| shaping.lookup(black_box("gmail.com"), black_box(&mx), Some("ip1")))
    });
    g.bench_function("resolve_uncached", |b| {
        b.iter(|| rules.resolve(black_box("gmail.com"), black_box(&mx), None))
    });
    let engine = Engine::new(0, rules.clone());
    g.bench_function("effect_no_action", |b| {
        b.iter(|| engine.effect(black_box("google"), None, black_box(1_000)))
    });
    let t = 1_000_000;
    engine.observe(
        "yahoo",
        None,
        "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred",
        t,
    );
    g.bench_function("effect_one_action_other_site", |b| {
        b.iter(|| engine.effect(black_box("google"), None, black_box(t + 1)))
    });
    g.bench_function("observe_throttle_reply", |b| {
        b.iter(|| {
            engine.observe(
                black_box("google"),
                None,
                black_box("451 4.3.0 Try again later"),
                black_box(t + 2),
            )
        })
    });
    g.finish();
}

criterion_group!(benches, lookup);
criterion_main!(benches);
