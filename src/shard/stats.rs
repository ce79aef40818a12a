//! Per-shard counters: each shard writes only its own [`ShardStats`]; the main thread sums them, and lists them
//! per shard, into `<queue_directory>/stats.json` (read by `shardmta stats` and the benchmarks); the HTTP
//! executor merges them at each `/metrics` scrape (`crate::http::metrics`).
//!
//! Every counter is an atomic written with `Relaxed` by its own shard only (no lock, no shared cache line
//! written by two cores). The one structured value, the busiest destinations, is kept by the shard in a plain
//! table ([`DestinationTally`]) and copied once per tick into a mutex-guarded snapshot that the scrape reads:
//! the shard only ever `try_lock`s it (a scrape holding it makes the shard skip that tick's copy), so the lock
//! is never waited for on a shard's reactor.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::delivery::{Outcome, RcptResult};
use crate::limits;
use crate::local::shard::LocalStats;
use crate::nexthop::Nexthop;
use crate::smtp::reply::Rejection;
use crate::spool::Dir;

/// Upper bounds, in microseconds, of the buckets of [`LatencyHistogram`] (Prometheus `le` bounds from 100 µs to
/// 10 s); one more bucket counts what is slower.
pub const LATENCY_BUCKETS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// A latency histogram with fixed buckets ([`LATENCY_BUCKETS_US`]), written by one shard.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Observations per bucket (not cumulative); the last one is past the largest bound.
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl LatencyHistogram {
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = LATENCY_BUCKETS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Adds this histogram's buckets and sum (µs) into `buckets` and `sum_us`.
    pub fn add_to(&self, buckets: &mut [u64; LATENCY_BUCKETS_US.len() + 1], sum_us: &mut u64) {
        for (b, a) in buckets.iter_mut().zip(&self.buckets) {
            *b += a.load(Ordering::Relaxed);
        }
        *sum_us = sum_us.saturating_add(self.sum_us.load(Ordering::Relaxed));
    }
}

/// One destination's recipient results, as published for `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationCount {
    /// The next hop's key (`example.com:25`, `[10.0.0.5]:2525`).
    pub destination: Arc<str>,
    pub delivered: u64,
    pub deferred: u64,
    pub bounced: u64,
}

impl DestinationCount {
    pub fn total(&self) -> u64 {
        self.delivered + self.deferred + self.bounced
    }
}

/// Recipient results per destination for the busiest [`limits::METRICS_DESTINATIONS_PER_SHARD_MAX`]
/// destinations a shard owns; a new destination in a full table replaces the least busy one (whose counts are
/// lost: its series restarts from zero if it comes back). Owned by the shard's agent; published once per tick.
#[derive(Debug, Default)]
pub struct DestinationTally {
    entries: HashMap<Nexthop, DestinationCount>,
    changed: bool,
}

impl DestinationTally {
    /// Counts one job's results (postponed recipients were not attempted and are not counted).
    pub fn count(&mut self, hop: &Nexthop, results: &[(u32, RcptResult)]) {
        let (mut delivered, mut deferred, mut bounced) = (0u64, 0u64, 0u64);
        for (_, r) in results {
            match r {
                RcptResult::Delivered { .. } => delivered += 1,
                RcptResult::Deferred { .. } => deferred += 1,
                RcptResult::Bounced { .. } => bounced += 1,
                RcptResult::Postponed { .. } => {}
            }
        }
        if delivered + deferred + bounced == 0 {
            return;
        }
        if !self.entries.contains_key(hop) {
            if self.entries.len() >= limits::METRICS_DESTINATIONS_PER_SHARD_MAX {
                let least = self
                    .entries
                    .iter()
                    .min_by_key(|(_, c)| c.total())
                    .map(|(h, _)| h.clone());
                if let Some(h) = least {
                    self.entries.remove(&h);
                }
            }
            self.entries.insert(
                hop.clone(),
                DestinationCount {
                    destination: hop.key().into(),
                    delivered: 0,
                    deferred: 0,
                    bounced: 0,
                },
            );
        }
        if let Some(c) = self.entries.get_mut(hop) {
            c.delivered += delivered;
            c.deferred += deferred;
            c.bounced += bounced;
        }
        self.changed = true;
    }

    /// Copies the table into `snapshot` if it changed and the lock is free now (never waits for it).
    pub fn publish(&mut self, snapshot: &Mutex<Vec<DestinationCount>>) {
        if !self.changed {
            return;
        }
        if let Ok(mut s) = snapshot.try_lock() {
            s.clear();
            s.extend(self.entries.values().cloned());
            self.changed = false;
        }
    }
}

thread_local! {
    /// Outbound SMTP connections open on this thread (a shard's agent): see [`OutboundConnection`].
    static OUTBOUND_CONNECTIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Held by each open outbound connection; counts it in its shard's thread-local gauge while it lives.
#[derive(Debug)]
pub struct OutboundConnection(());

impl OutboundConnection {
    pub fn open() -> OutboundConnection {
        OUTBOUND_CONNECTIONS.with(|c| c.set(c.get() + 1));
        OutboundConnection(())
    }

    /// Outbound connections open now on the calling thread.
    pub fn count() -> u64 {
        OUTBOUND_CONNECTIONS.with(|c| c.get())
    }
}

impl Drop for OutboundConnection {
    fn drop(&mut self) {
        OUTBOUND_CONNECTIONS.with(|c| c.set(c.get().saturating_sub(1)));
    }
}

/// Counters one shard publishes (written only by that shard).
#[derive(Debug, Default)]
pub struct ShardStats {
    pub sessions_total: AtomicU64,
    pub sessions_open: AtomicU64,
    pub messages_accepted: AtomicU64,
    pub messages_refused: AtomicU64,
    /// Connections refused at accept (connection limits).
    pub sessions_refused: AtomicU64,
    /// Sessions ended by their deadline.
    pub sessions_timed_out: AtomicU64,
    /// Messages refused (452 4.3.1) because the shard's data budget had no room.
    pub messages_refused_memory: AtomicU64,
    /// Failed and malformed AUTH attempts.
    pub auth_failures: AtomicU64,
    /// Bytes of unfinished messages held now.
    pub data_bytes_held: AtomicU64,
    pub queue_syncs: AtomicU64,
    pub pending_messages: AtomicU64,
    /// 1 while this shard's delivery is paused because the queue cannot record outcomes.
    pub delivery_paused: AtomicU64,
    /// Outcomes waiting to be recorded, and pauses since start.
    pub outcomes_unrecorded: AtomicU64,
    pub delivery_pauses: AtomicU64,
    /// Jobs this shard's destinations hold (queued, not yet on a connection).
    pub jobs_queued: AtomicU64,
    /// Destinations this shard owns now (idle ones are evicted).
    pub destinations: AtomicU64,
    /// Queue segments created on the shard's own thread (0 unless a room estimate fell short or the blocking
    /// pool could not create one).
    pub segments_created_inline: AtomicU64,
    /// Refusals sent to clients, indexed by [`Rejection`].
    pub rejected: [AtomicU64; Rejection::COUNT],
    /// Recipient results of delivery attempts of this shard's messages (counted where the outcome arrives).
    pub deliveries_delivered: AtomicU64,
    pub deliveries_deferred: AtomicU64,
    pub deliveries_bounced: AtomicU64,
    /// Deferrals (index 0) and bounces (index 1) of those results by bounce class
    /// ([`crate::delivery::bounce_class::BounceClass::index`]).
    pub failure_classes: [[AtomicU64; crate::delivery::bounce_class::BounceClass::COUNT]; 2],
    /// Outbound SMTP connections open now (this shard's destinations).
    pub connections_outbound: AtomicU64,
    /// Messages this shard signed with DKIM, and signings that failed (the message was accepted unsigned).
    pub dkim_signed: AtomicU64,
    pub dkim_sign_failures: AtomicU64,
    /// Egress sources suspended because their address could not be bound (`crate::egress`).
    pub egress_source_suspensions: AtomicU64,
    /// Queued messages by state: on hold (`held`); else some recipient waits for its first attempt or is being
    /// tried (`pending`), or every open recipient waits for a retry (`deferred`).
    pub queue_pending: AtomicU64,
    pub queue_deferred: AtomicU64,
    pub queue_held: AtomicU64,
    /// From the end of a message's data to its 250 (the queue append and the group commit).
    pub data_to_250: LatencyHistogram,
    /// The busiest destinations this shard owns, copied from its agent's [`DestinationTally`] once per tick.
    pub destinations_top: Mutex<Vec<DestinationCount>>,
    /// What the shard's thread has cost since start ([`ThreadCost`]), copied once per tick.
    pub cpu_us: AtomicU64,
    pub parks: AtomicU64,
    pub foreign_wakeups: AtomicU64,
    pub syscalls: AtomicU64,
    pub ring_enters: AtomicU64,
    pub context_switches: AtomicU64,
}

/// What a shard's thread has cost since it started: its CPU time and context switches (`getrusage` of the
/// thread) and its reactor's counts (`glommio::reactor_counters`: parks, wakeups by other threads, direct
/// system calls, io_uring submit/wait calls). Read on the shard's own thread; published once per tick so that
/// `shardmta stats` and `/metrics` show the cost per message and a regression is seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadCost {
    pub cpu_us: u64,
    pub context_switches: u64,
    pub parks: u64,
    pub foreign_wakeups: u64,
    pub syscalls: u64,
    pub ring_enters: u64,
}

impl ThreadCost {
    /// The calling thread's cost (its reactor's counts are zero outside a glommio executor).
    pub fn of_this_thread() -> ThreadCost {
        let r = glommio::reactor_counters();
        // SAFETY: getrusage writes the struct it is given and nothing else; a failure leaves it zeroed.
        let u = unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_THREAD, &mut u);
            u
        };
        let us = |t: libc::timeval| {
            (t.tv_sec.max(0) as u64).saturating_mul(1_000_000) + t.tv_usec.max(0) as u64
        };
        ThreadCost {
            cpu_us: us(u.ru_utime).saturating_add(us(u.ru_stime)),
            context_switches: (u.ru_nvcsw.max(0) as u64).saturating_add(u.ru_nivcsw.max(0) as u64),
            parks: r.parks,
            foreign_wakeups: r.foreign_wakeups,
            syscalls: r.syscalls,
            ring_enters: r.ring_enters,
        }
    }

    /// Stores it into `s`'s counters.
    pub fn publish(&self, s: &ShardStats) {
        let set = |c: &AtomicU64, v: u64| c.store(v, Ordering::Relaxed);
        set(&s.cpu_us, self.cpu_us);
        set(&s.context_switches, self.context_switches);
        set(&s.parks, self.parks);
        set(&s.foreign_wakeups, self.foreign_wakeups);
        set(&s.syscalls, self.syscalls);
        set(&s.ring_enters, self.ring_enters);
    }
}

/// The cost counters of [`ShardStats`] that `stats.json` also gives per accepted message (`cost_per_message`).
const COST_COUNTERS: [(&str, Field); 6] = [
    ("cpu_us", |s| &s.cpu_us),
    ("parks", |s| &s.parks),
    ("foreign_wakeups", |s| &s.foreign_wakeups),
    ("syscalls", |s| &s.syscalls),
    ("ring_enters", |s| &s.ring_enters),
    ("context_switches", |s| &s.context_switches),
];

impl ShardStats {
    /// Adds the refusals a session took from its state machine (`Session::take_rejections`).
    pub fn add_rejections(&self, counts: Option<[u32; Rejection::COUNT]>) {
        for (c, n) in self.rejected.iter().zip(counts.unwrap_or_default()) {
            if n > 0 {
                c.fetch_add(u64::from(n), Ordering::Relaxed);
            }
        }
    }

    pub fn rejected_one(&self, kind: Rejection) {
        self.rejected[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts the recipient results of an outcome that came back to this shard.
    pub fn count_outcome(&self, o: &Outcome) {
        for (_, r) in &o.results {
            let (c, failed) = match r {
                RcptResult::Delivered { .. } => (&self.deliveries_delivered, None),
                RcptResult::Deferred { .. } => (&self.deliveries_deferred, Some(0)),
                RcptResult::Bounced { .. } => (&self.deliveries_bounced, Some(1)),
                RcptResult::Postponed { .. } => continue,
            };
            c.fetch_add(1, Ordering::Relaxed);
            if let Some(i) = failed {
                let class = crate::delivery::bounce_class::classify(r.reply());
                self.failure_classes[i][class.index()].fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A counter's field.
type Field = fn(&ShardStats) -> &AtomicU64;

/// The names under which each counter appears in `stats.json` (summed at the top level; per shard in `per_shard`).
const COUNTERS: [(&str, Field); 17] = [
    ("sessions_total", |s| &s.sessions_total),
    ("sessions_open", |s| &s.sessions_open),
    ("messages_accepted", |s| &s.messages_accepted),
    ("messages_refused", |s| &s.messages_refused),
    ("sessions_refused", |s| &s.sessions_refused),
    ("sessions_timed_out", |s| &s.sessions_timed_out),
    ("messages_refused_memory", |s| &s.messages_refused_memory),
    ("auth_failures", |s| &s.auth_failures),
    ("data_bytes_held", |s| &s.data_bytes_held),
    ("queue_syncs", |s| &s.queue_syncs),
    ("pending_messages", |s| &s.pending_messages),
    ("delivery_paused_shards", |s| &s.delivery_paused),
    ("outcomes_unrecorded", |s| &s.outcomes_unrecorded),
    ("delivery_pauses", |s| &s.delivery_pauses),
    ("jobs_queued", |s| &s.jobs_queued),
    ("destinations", |s| &s.destinations),
    ("segments_created_inline", |s| &s.segments_created_inline),
];

/// The cost counters of `shards` divided by `accepted` (every shard's accepted messages: a message accepted on
/// one shard and delivered by another costs on both), rounded to 0.01; `null` before the first message.
fn cost_per_message(shards: &[&ShardStats], accepted: u64) -> serde_json::Value {
    if accepted == 0 {
        return serde_json::Value::Null;
    }
    let m: serde_json::Map<String, serde_json::Value> = COST_COUNTERS
        .iter()
        .map(|(name, f)| {
            let sum: u64 = shards.iter().map(|s| f(s).load(Ordering::Relaxed)).sum();
            let per = (sum as f64 / accepted as f64 * 100.0).round() / 100.0;
            (name.to_string(), per.into())
        })
        .collect();
    m.into()
}

/// Every shard's counters and the local-delivery shard's, and the main thread's own.
pub struct StatsBoard {
    pub shards: Vec<Arc<ShardStats>>,
    pub local: Arc<LocalStats>,
    /// Recipient-table reloads (SIGHUP or a changed file) that succeeded, and that failed (the old tables
    /// stay); written by the main thread.
    pub table_reloads: AtomicU64,
    pub table_reload_failures: AtomicU64,
    /// Configuration reloads (SIGHUP, `shardmta reload`) that put new settings in place, and that failed (the
    /// old configuration stays); written by the main thread.
    pub config_reloads: AtomicU64,
    pub config_reload_failures: AtomicU64,
}

impl StatsBoard {
    pub fn new(shards: usize) -> StatsBoard {
        StatsBoard {
            shards: (0..shards).map(|_| Arc::default()).collect(),
            local: Arc::default(),
            table_reloads: AtomicU64::new(0),
            table_reload_failures: AtomicU64::new(0),
            config_reloads: AtomicU64::new(0),
            config_reload_failures: AtomicU64::new(0),
        }
    }

    /// The counters as JSON: sums at the top level, each shard's own under `per_shard`.
    pub fn to_json(&self, started: Instant) -> serde_json::Value {
        let mut top = serde_json::Map::new();
        top.insert("uptime_s".into(), started.elapsed().as_secs_f64().into());
        top.insert("shards".into(), self.shards.len().into());
        for &(name, f) in COUNTERS.iter().chain(&COST_COUNTERS) {
            let sum: u64 = self
                .shards
                .iter()
                .map(|s| f(s).load(Ordering::Relaxed))
                .sum();
            top.insert(name.into(), sum.into());
        }
        let l = &self.local;
        for (name, v) in [
            ("local_delivered", &l.delivered),
            ("local_deferred", &l.deferred),
            ("local_bounced", &l.bounced),
            ("local_batches", &l.batches),
            ("local_file_syncs", &l.file_syncs),
            ("local_dir_syncs", &l.dir_syncs),
            ("local_fs_syncs", &l.fs_syncs),
            ("table_reloads", &self.table_reloads),
            ("table_reload_failures", &self.table_reload_failures),
            ("config_reloads", &self.config_reloads),
            ("config_reload_failures", &self.config_reload_failures),
        ] {
            top.insert(name.into(), v.load(Ordering::Relaxed).into());
        }
        let accepted: u64 = self
            .shards
            .iter()
            .map(|s| s.messages_accepted.load(Ordering::Relaxed))
            .sum();
        let per_shard: Vec<serde_json::Value> = self
            .shards
            .iter()
            .map(|s| {
                let mut m: serde_json::Map<String, serde_json::Value> = COUNTERS
                    .iter()
                    .chain(&COST_COUNTERS)
                    .map(|(name, f)| (name.to_string(), f(s).load(Ordering::Relaxed).into()))
                    .collect();
                m.insert(
                    "cost_per_message".into(),
                    cost_per_message(&[&**s], accepted),
                );
                m.into()
            })
            .collect();
        top.insert("per_shard".into(), per_shard.into());
        let all: Vec<&ShardStats> = self.shards.iter().map(|s| &**s).collect();
        top.insert("cost_per_message".into(), cost_per_message(&all, accepted));
        if let Some(c) = crate::cluster::stats_json() {
            top.insert("cluster".into(), c);
        }
        top.into()
    }

    /// Writes `stats.json` in the spool (atomically, by rename, never through a symlink).
    pub fn write(&self, spool: &Dir, started: Instant) {
        let v = self.to_json(started);
        let _ = spool.replace_file("stats.json", v.to_string().as_bytes(), false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_and_per_shard_values() {
        let b = StatsBoard::new(2);
        b.shards[0].messages_accepted.store(3, Ordering::Relaxed);
        b.shards[1].messages_accepted.store(4, Ordering::Relaxed);
        b.shards[1].delivery_paused.store(1, Ordering::Relaxed);
        b.local.delivered.store(7, Ordering::Relaxed);
        let v = b.to_json(Instant::now());
        assert_eq!(v["messages_accepted"], 7);
        assert_eq!(v["delivery_paused_shards"], 1);
        assert_eq!(v["local_delivered"], 7);
        assert_eq!(v["per_shard"][0]["messages_accepted"], 3);
        assert_eq!(v["per_shard"][1]["messages_accepted"], 4);
        assert_eq!(v["shards"], 2);
    }

    #[test]
    fn cost_per_message_divides_by_every_shards_accepted_messages() {
        let b = StatsBoard::new(2);
        assert!(b.to_json(Instant::now())["cost_per_message"].is_null());
        b.shards[0].messages_accepted.store(3, Ordering::Relaxed);
        b.shards[1].messages_accepted.store(1, Ordering::Relaxed);
        ThreadCost {
            cpu_us: 400,
            parks: 10,
            syscalls: 3,
            ..ThreadCost::default()
        }
        .publish(&b.shards[0]);
        b.shards[1].cpu_us.store(200, Ordering::Relaxed);
        let v = b.to_json(Instant::now());
        assert_eq!(v["cpu_us"], 600);
        assert_eq!(v["cost_per_message"]["cpu_us"], 150.0);
        assert_eq!(v["cost_per_message"]["parks"], 2.5);
        assert_eq!(v["cost_per_message"]["syscalls"], 0.75);
        assert_eq!(v["per_shard"][0]["cost_per_message"]["cpu_us"], 100.0);
        assert_eq!(v["per_shard"][1]["cost_per_message"]["cpu_us"], 50.0);
        assert_eq!(v["per_shard"][1]["parks"], 0);
    }

    /// The vendored glommio's timer patch (`vendor/glommio/PATCHES.md`): a turn of the executor's run loop that
    /// does not sleep keeps the pending preemption timers instead of cancelling and re-arming both, so such turns
    /// do not enter the kernel; a park still does (cancel the timer, arm the sleep's, sleep, re-arm: 4 enters
    /// when this was written). Upstream enters it on every turn: 7,825-8,068 times for these 2,000 sleeps with
    /// 7-67 parks, against 20-1,650 enters with 5-411 parks patched (the executor sometimes parks for the timer).
    #[test]
    fn the_executors_run_loop_does_not_enter_the_kernel_on_every_turn() {
        const TURNS: u64 = 2_000;
        let (before, after) = glommio::LocalExecutorBuilder::default()
            .spin_before_park(Duration::from_secs(1))
            .spawn(|| async {
                let before = ThreadCost::of_this_thread();
                for _ in 0..TURNS {
                    glommio::timer::sleep(Duration::from_micros(1)).await;
                }
                (before, ThreadCost::of_this_thread())
            })
            .expect("executor")
            .join()
            .expect("join");
        let enters = after.ring_enters - before.ring_enters;
        let parks = after.parks - before.parks;
        assert!(
            enters <= 5 * parks + TURNS / 10,
            "{enters} ring enters for {TURNS} turns with {parks} parks"
        );
    }

    /// On a glommio executor the reactor counts its parks and calls; CPU time grows with work.
    #[test]
    fn a_shards_thread_cost_counts_its_reactors_work() {
        let (before, after) = glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let before = ThreadCost::of_this_thread();
                for _ in 0..3 {
                    glommio::timer::sleep(Duration::from_millis(2)).await;
                }
                let mut x = 0u64;
                for i in 0..3_000_000u64 {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                }
                std::hint::black_box(x);
                (before, ThreadCost::of_this_thread())
            })
            .expect("executor")
            .join()
            .expect("join");
        assert!(after.parks >= before.parks + 3, "{before:?} {after:?}");
        assert!(
            after.ring_enters > before.ring_enters,
            "{before:?} {after:?}"
        );
        assert!(after.cpu_us > before.cpu_us, "{before:?} {after:?}");
        assert_eq!(
            ThreadCost::of_this_thread().parks,
            0,
            "no reactor on the test's thread"
        );
    }

    #[test]
    fn latency_buckets_take_their_upper_bound() {
        let h = LatencyHistogram::default();
        for us in [0, 100, 101, 10_000_000, 10_000_001, u64::MAX / 2] {
            h.observe(Duration::from_micros(us));
        }
        let mut b = [0u64; LATENCY_BUCKETS_US.len() + 1];
        let mut sum = 0;
        h.add_to(&mut b, &mut sum);
        assert_eq!(b[0], 2, "0 and 100 µs are within le=100µs: {b:?}");
        assert_eq!(b[1], 1);
        assert_eq!(b[LATENCY_BUCKETS_US.len() - 1], 1);
        assert_eq!(b[LATENCY_BUCKETS_US.len()], 2);
        assert_eq!(b.iter().sum::<u64>(), 6);
        assert!(sum >= u64::MAX / 2);
        h.add_to(&mut b, &mut sum);
        assert_eq!(b.iter().sum::<u64>(), 12, "add_to accumulates");
    }

    fn hop(i: usize) -> Nexthop {
        Nexthop::Mx {
            domain: format!("d{i}.example"),
            port: 25,
        }
    }

    fn results(delivered: usize, deferred: usize) -> Vec<(u32, RcptResult)> {
        let d = (0..delivered).map(|i| {
            (
                i as u32,
                RcptResult::Delivered {
                    reply: "250".into(),
                },
            )
        });
        let f = (0..deferred).map(|i| {
            (
                i as u32,
                RcptResult::Deferred {
                    reply: "451".into(),
                },
            )
        });
        d.chain(f).collect()
    }

    #[test]
    fn destination_tally_is_bounded_and_keeps_the_busiest() {
        let mut t = DestinationTally::default();
        let max = limits::METRICS_DESTINATIONS_PER_SHARD_MAX;
        // A busy destination first, then many that are seen once.
        t.count(&hop(0), &results(100, 7));
        for i in 1..=(3 * max) {
            t.count(&hop(i), &results(1, 0));
        }
        let snap = Mutex::new(Vec::new());
        t.publish(&snap);
        let v = snap.lock().unwrap().clone();
        assert_eq!(v.len(), max);
        let busy = v
            .iter()
            .find(|c| &*c.destination == "d0.example:25")
            .expect("the busiest stays");
        assert_eq!((busy.delivered, busy.deferred, busy.bounced), (100, 7, 0));
        // Postponed recipients are not attempts; an unchanged table is not copied again.
        let postponed = vec![(
            0,
            RcptResult::Postponed {
                reply: "4.4.5".into(),
            },
        )];
        t.count(&hop(0), &postponed);
        snap.lock().unwrap().clear();
        t.publish(&snap);
        assert!(snap.lock().unwrap().is_empty());
        // A held lock makes the shard skip, not wait; the next tick publishes.
        t.count(&hop(0), &results(1, 0));
        {
            let _held = snap.lock().unwrap();
            t.publish(&snap);
        }
        t.publish(&snap);
        assert_eq!(snap.lock().unwrap().len(), max);
    }

    #[test]
    fn outbound_connections_are_counted_while_open() {
        let before = OutboundConnection::count();
        let a = OutboundConnection::open();
        let b = OutboundConnection::open();
        assert_eq!(OutboundConnection::count(), before + 2);
        drop(a);
        assert_eq!(OutboundConnection::count(), before + 1);
        drop(b);
        assert_eq!(OutboundConnection::count(), before);
    }

    #[test]
    fn outcomes_and_rejections_are_counted() {
        let s = ShardStats::default();
        let mut r = results(2, 1);
        r.push((
            9,
            RcptResult::Postponed {
                reply: "4.4.5".into(),
            },
        ));
        s.count_outcome(&Outcome {
            id: crate::queue::QueueId(1),
            results: r,
            remote: None,
            attempted_unix_ms: 0,
            next_hop_dsn: false,
            retry: None,
        });
        assert_eq!(s.deliveries_delivered.load(Ordering::Relaxed), 2);
        assert_eq!(s.deliveries_deferred.load(Ordering::Relaxed), 1);
        assert_eq!(s.deliveries_bounced.load(Ordering::Relaxed), 0);
        let mut k = [0u32; Rejection::COUNT];
        k[Rejection::Size as usize] = 3;
        s.add_rejections(Some(k));
        s.add_rejections(None);
        s.rejected_one(Rejection::Limits);
        assert_eq!(
            s.rejected[Rejection::Size as usize].load(Ordering::Relaxed),
            3
        );
        assert_eq!(
            s.rejected[Rejection::Limits as usize].load(Ordering::Relaxed),
            1
        );
    }
}
