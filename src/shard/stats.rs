//! Per-shard counters: each shard writes only its own [`ShardStats`]; the main thread sums them, and lists them
//! per shard, into `<queue_directory>/stats.json` (read by `shardmta stats` and the benchmarks).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::local::shard::LocalStats;
use crate::spool::Dir;

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
}

/// The names under which each counter appears in `stats.json` (summed at the top level; per shard in `per_shard`).
/// A counter's field.
type Field = fn(&ShardStats) -> &AtomicU64;

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
        for (name, f) in COUNTERS {
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
        let per_shard: Vec<serde_json::Value> = self
            .shards
            .iter()
            .map(|s| {
                let m: serde_json::Map<String, serde_json::Value> = COUNTERS
                    .iter()
                    .map(|(name, f)| (name.to_string(), f(s).load(Ordering::Relaxed).into()))
                    .collect();
                m.into()
            })
            .collect();
        top.insert("per_shard".into(), per_shard.into());
        top.into()
    }

    /// Writes `stats.json` in the spool (atomically, by rename, never through a symlink).
    pub fn write(&self, spool: &Dir, started: Instant) {
        let v = self.to_json(started);
        let written = spool
            .create_file("stats.json.tmp")
            .is_ok_and(|mut f| std::io::Write::write_all(&mut f, v.to_string().as_bytes()).is_ok());
        if written {
            let _ = spool.rename("stats.json.tmp", spool, "stats.json");
        }
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
}
