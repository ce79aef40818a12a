//! `GET /metrics`: the per-shard counters of [`StatsBoard`] merged at each scrape (summed over the shards, never
//! locked on a shard's path; see [`crate::shard::stats`]) and written by prometheus-client's encoders, in the
//! Prometheus text format 0.0.4 by default or in OpenMetrics when the scraper asks for it (`Accept`).
//!
//! The merge happens in a [`Collector`] registered once: every scrape reads the atomics then and there, so
//! there is no second copy of any counter to keep in step.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::delivery::bounce_class::BounceClass;
use crate::limits;
use crate::shard::stats::{DestinationCount, ShardStats, StatsBoard, LATENCY_BUCKETS_US};
use crate::smtp::reply::Rejection;

/// The exposition format of a scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4 (curl, older scrapers, Python's `prometheus_client.parser`).
    Prometheus,
    /// OpenMetrics 1.0 text, for scrapers that ask for it in `Accept`.
    OpenMetrics,
}

impl Format {
    /// OpenMetrics when `accept` names it, else the Prometheus text format.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// A registry whose one collector reads `stats` at each scrape.
pub fn registry(stats: Arc<StatsBoard>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(ShardCounters { stats }));
    r
}

/// The scrape's text.
pub fn render(registry: &Registry, format: Format) -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(8 * 1024);
    match format {
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, registry)?
        }
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, registry)?,
    }
    Ok(out)
}

struct ShardCounters {
    stats: Arc<StatsBoard>,
}

impl std::fmt::Debug for ShardCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShardCounters({} shards)", self.stats.shards.len())
    }
}

impl ShardCounters {
    fn sum(&self, f: impl Fn(&ShardStats) -> &AtomicU64) -> u64 {
        self.stats
            .shards
            .iter()
            .map(|s| f(s).load(Ordering::Relaxed))
            .fold(0u64, u64::saturating_add)
    }

    /// The busiest destinations over every shard, at most [`limits::METRICS_DESTINATIONS_EXPORTED_MAX`],
    /// busiest first, the local-delivery shard's as `local`.
    fn destinations(&self) -> Vec<DestinationCount> {
        let mut all: Vec<DestinationCount> = Vec::new();
        for s in &self.stats.shards {
            // The shard only try_locks this; the scrape holds it for one copy.
            if let Ok(v) = s.destinations_top.lock() {
                for c in v.iter() {
                    // A destination has one owner shard, so a name appears once (summed if ever not).
                    match all.iter_mut().find(|a| a.destination == c.destination) {
                        Some(a) => {
                            a.delivered += c.delivered;
                            a.deferred += c.deferred;
                            a.bounced += c.bounced;
                        }
                        None => all.push(c.clone()),
                    }
                }
            }
        }
        let l = &self.stats.local;
        let local = DestinationCount {
            destination: "local".into(),
            delivered: l.delivered.load(Ordering::Relaxed),
            deferred: l.deferred.load(Ordering::Relaxed),
            bounced: l.bounced.load(Ordering::Relaxed),
        };
        if local.total() > 0 {
            all.push(local);
        }
        all.sort_by(|a, b| {
            b.total()
                .cmp(&a.total())
                .then_with(|| a.destination.cmp(&b.destination))
        });
        all.truncate(limits::METRICS_DESTINATIONS_EXPORTED_MAX);
        all
    }
}

type Fmt = Result<(), std::fmt::Error>;

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Fmt {
    enc.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, u64, u64>(&v, None)
}

fn counter_family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> Fmt {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (l, v) in values {
        m.encode_family(&[(label, *l)])?
            .encode_counter::<NoLabelSet, u64, u64>(v, None)?;
    }
    Ok(())
}

fn gauge_family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> Fmt {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (l, v) in values {
        m.encode_family(&[(label, *l)])?.encode_gauge(v)?;
    }
    Ok(())
}

impl Collector for ShardCounters {
    fn encode(&self, mut enc: DescriptorEncoder) -> Fmt {
        counter(
            &mut enc,
            "shardmta_messages_accepted",
            "Messages accepted over SMTP (answered 250 after the queue sync).",
            self.sum(|s| &s.messages_accepted),
        )?;
        let rejected: Vec<(&str, u64)> = Rejection::ALL
            .iter()
            .map(|k| (k.name(), self.sum(|s| &s.rejected[*k as usize])))
            .collect();
        counter_family(
            &mut enc,
            "shardmta_messages_rejected",
            "Refusals of mail sent to SMTP clients (connection, MAIL, RCPT, message, AUTH), by reason.",
            "reason",
            &rejected,
        )?;
        counter_family(
            &mut enc,
            "shardmta_deliveries",
            "Recipient results of delivery attempts (remote and local).",
            "result",
            &[
                ("delivered", self.sum(|s| &s.deliveries_delivered)),
                ("deferred", self.sum(|s| &s.deliveries_deferred)),
                ("bounced", self.sum(|s| &s.deliveries_bounced)),
            ],
        )?;
        {
            let mut m = enc.encode_descriptor(
                "shardmta_delivery_failures",
                "Deferred and bounced recipient results by bounce class (invalid_recipient, mailbox_full, policy_block, rate_limit, dns_failure, tls_failure, content_rejected, message_too_large, other).",
                None,
                MetricType::Counter,
            )?;
            for (i, result) in ["deferred", "bounced"].into_iter().enumerate() {
                for class in BounceClass::ALL {
                    let v = self.sum(|s| &s.failure_classes[i][class.index()]);
                    m.encode_family(&[("result", result), ("class", class.name())])?
                        .encode_counter::<NoLabelSet, u64, u64>(&v, None)?;
                }
            }
        }
        gauge_family(
            &mut enc,
            "shardmta_queue_messages",
            "Queued messages: on hold (held); else some recipient not yet tried or being tried (pending), or every open one waiting for a retry (deferred).",
            "state",
            &[
                ("pending", self.sum(|s| &s.queue_pending)),
                ("deferred", self.sum(|s| &s.queue_deferred)),
                ("held", self.sum(|s| &s.queue_held)),
            ],
        )?;
        counter_family(
            &mut enc,
            "shardmta_dkim_signings",
            "Messages signed with DKIM at acceptance (result=signed; all their signatures), and signings that failed (result=failed: the message was accepted unsigned).",
            "result",
            &[
                ("signed", self.sum(|s| &s.dkim_signed)),
                ("failed", self.sum(|s| &s.dkim_sign_failures)),
            ],
        )?;
        counter(
            &mut enc,
            "shardmta_egress_source_suspensions",
            "Egress sources suspended for a while because their address could not be bound (not on this host).",
            self.sum(|s| &s.egress_source_suspensions),
        )?;
        {
            // What each shard's thread has cost (divide by shardmta_messages_accepted for the cost per message).
            let names: Vec<String> = (0..self.stats.shards.len())
                .map(|i| i.to_string())
                .collect();
            let per_shard = |f: fn(&ShardStats) -> &AtomicU64| -> Vec<(&str, u64)> {
                names
                    .iter()
                    .zip(&self.stats.shards)
                    .map(|(n, s)| (n.as_str(), f(s).load(Ordering::Relaxed)))
                    .collect()
            };
            for (name, help, f) in [
                (
                    "shardmta_shard_cpu_microseconds",
                    "CPU time of each shard's thread (user and system).",
                    (|s| &s.cpu_us) as fn(&ShardStats) -> &AtomicU64,
                ),
                (
                    "shardmta_shard_parks",
                    "Times each shard's executor went to sleep for want of work.",
                    |s| &s.parks,
                ),
                (
                    "shardmta_shard_foreign_wakeups",
                    "Times another thread woke each shard's executor (channel messages, blocking-pool results).",
                    |s| &s.foreign_wakeups,
                ),
                (
                    "shardmta_shard_syscalls",
                    "System calls each shard's reactor made directly (not through io_uring).",
                    |s| &s.syscalls,
                ),
                (
                    "shardmta_shard_ring_enters",
                    "Calls into io_uring (submit or wait) of each shard's reactor.",
                    |s| &s.ring_enters,
                ),
                (
                    "shardmta_shard_context_switches",
                    "Context switches of each shard's thread (voluntary and involuntary).",
                    |s| &s.context_switches,
                ),
            ] {
                counter_family(&mut enc, name, help, "shard", &per_shard(f))?;
            }
        }
        counter(
            &mut enc,
            "shardmta_queue_syncs",
            "Group commits of the queue (pwrite and fdatasync of a batch of records).",
            self.sum(|s| &s.queue_syncs),
        )?;
        gauge_family(
            &mut enc,
            "shardmta_connections",
            "Open SMTP connections: sessions with clients (inbound), delivery connections (outbound).",
            "direction",
            &[
                ("inbound", self.sum(|s| &s.sessions_open)),
                ("outbound", self.sum(|s| &s.connections_outbound)),
            ],
        )?;
        {
            let dests = self.destinations();
            let mut m = enc.encode_descriptor(
                "shardmta_destination_deliveries",
                "Recipient results per destination (next hop), for the busiest destinations.",
                None,
                MetricType::Counter,
            )?;
            for d in &dests {
                for (result, v) in [
                    ("delivered", d.delivered),
                    ("deferred", d.deferred),
                    ("bounced", d.bounced),
                ] {
                    m.encode_family(&[("destination", &*d.destination), ("result", result)])?
                        .encode_counter::<NoLabelSet, u64, u64>(&v, None)?;
                }
            }
        }
        {
            let mut buckets = [0u64; LATENCY_BUCKETS_US.len() + 1];
            let mut sum_us = 0u64;
            for s in &self.stats.shards {
                s.data_to_250.add_to(&mut buckets, &mut sum_us);
            }
            let count = buckets.iter().fold(0u64, |a, b| a.saturating_add(*b));
            let bounds: Vec<(f64, u64)> = LATENCY_BUCKETS_US
                .iter()
                .map(|us| *us as f64 / 1e6)
                .chain(std::iter::once(f64::INFINITY))
                .zip(buckets)
                .collect();
            enc.encode_descriptor(
                "shardmta_smtp_data_to_250",
                "Time from the end of a message's data to its 250 reply (queue append and group commit).",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?
            .encode_histogram::<NoLabelSet>(sum_us as f64 / 1e6, count, &bounds, None)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_merged_over_shards_in_both_formats() {
        let board = Arc::new(StatsBoard::new(2));
        board.shards[0]
            .messages_accepted
            .store(3, Ordering::Relaxed);
        board.shards[1]
            .messages_accepted
            .store(4, Ordering::Relaxed);
        board.shards[1].rejected_one(Rejection::RelayDenied);
        board.shards[0].sessions_open.store(2, Ordering::Relaxed);
        board.shards[0]
            .data_to_250
            .observe(std::time::Duration::from_micros(300));
        board.shards[1]
            .data_to_250
            .observe(std::time::Duration::from_secs(20));
        *board.shards[1].destinations_top.lock().unwrap() = vec![DestinationCount {
            destination: "[127.0.0.1]:25\"x".into(),
            delivered: 5,
            deferred: 1,
            bounced: 0,
        }];
        let reg = registry(board);
        let text = render(&reg, Format::Prometheus).unwrap();
        for line in [
            "# TYPE shardmta_messages_accepted_total counter",
            "shardmta_messages_accepted_total 7",
            "shardmta_messages_rejected_total{reason=\"relay_denied\"} 1",
            "shardmta_messages_rejected_total{reason=\"size\"} 0",
            "shardmta_connections{direction=\"inbound\"} 2",
            // A label value is escaped.
            "shardmta_destination_deliveries_total{destination=\"[127.0.0.1]:25\\\"x\",result=\"delivered\"} 5",
            "shardmta_smtp_data_to_250_seconds_bucket{le=\"0.0005\"} 1",
            "shardmta_smtp_data_to_250_seconds_bucket{le=\"10\"} 1",
            "shardmta_smtp_data_to_250_seconds_bucket{le=\"+Inf\"} 2",
            "shardmta_smtp_data_to_250_seconds_count 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        }
        assert!(!text.contains("# EOF"));
        let om = render(&reg, Format::OpenMetrics).unwrap();
        assert!(
            om.contains("# TYPE shardmta_messages_accepted counter"),
            "{om}"
        );
        assert!(om.ends_with("# EOF\n"));
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
            )),
            Format::OpenMetrics
        );
        assert_eq!(Format::from_accept(Some("*/*")), Format::Prometheus);
        assert_eq!(Format::from_accept(None), Format::Prometheus);
    }

    #[test]
    fn destinations_are_bounded_busiest_first_with_local() {
        let board = Arc::new(StatsBoard::new(2));
        let n = limits::METRICS_DESTINATIONS_EXPORTED_MAX;
        for (i, s) in board.shards.iter().enumerate() {
            *s.destinations_top.lock().unwrap() = (0..n)
                .map(|j| DestinationCount {
                    destination: format!("s{i}-{j}:25").into(),
                    delivered: (i * n + j) as u64,
                    deferred: 0,
                    bounced: 0,
                })
                .collect();
        }
        board.local.delivered.store(1_000_000, Ordering::Relaxed);
        let c = ShardCounters { stats: board };
        let d = c.destinations();
        assert_eq!(d.len(), n);
        assert_eq!(&*d[0].destination, "local");
        assert_eq!(&*d[1].destination, &format!("s1-{}:25", n - 1));
        assert!(d.windows(2).all(|w| w[0].total() >= w[1].total()));
    }
}

/// The suppression list's metrics: `shardmta_suppressed_total` (recipients not delivered because suppressed),
/// `shardmta_suppression_entries` (entries listed) and `shardmta_suppression_auto_add_failures_total`.
pub fn register_suppression(r: &mut Registry, list: Arc<crate::suppression::Suppression>) {
    r.register_collector(Box::new(SuppressionMetrics { list }));
}

#[derive(Debug)]
struct SuppressionMetrics {
    list: Arc<crate::suppression::Suppression>,
}

impl Collector for SuppressionMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> Fmt {
        counter(
            &mut enc,
            "shardmta_suppressed",
            "Recipients not delivered because the suppression list names them (bounced before routing).",
            self.list.suppressed_total.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "shardmta_suppression_auto_add_failures",
            "Automatic suppression-list adds dropped (writer busy) or not written.",
            self.list.auto_add_failures.load(Ordering::Relaxed),
        )?;
        enc.encode_descriptor(
            "shardmta_suppression_entries",
            "Entries in the suppression list.",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&(self.list.snapshot().len() as i64))
    }
}

/// The cluster's metrics (`[cluster]` only): `shardmta_cluster_redis_up` (1: Redis answered the last call, 0:
/// it did not, -1: not used yet), `shardmta_cluster_fallback_total` (lease and rate decisions taken on the
/// node's fallback share), `shardmta_cluster_leases_refused_total` and `shardmta_cluster_nodes` (live nodes
/// seen in Redis).
pub fn register_cluster(r: &mut Registry) {
    r.register_collector(Box::new(ClusterMetrics));
}

#[derive(Debug)]
struct ClusterMetrics;

impl Collector for ClusterMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> Fmt {
        use crate::cluster as c;
        enc.encode_descriptor(
            "shardmta_cluster_redis_up",
            "1 when Redis answered the last call, 0 when it did not (limits fall back to this node's share), -1 before the first call.",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&c::redis_up().map_or(-1i64, i64::from))?;
        counter(
            &mut enc,
            "shardmta_cluster_fallback",
            "Connection leases and rate slots decided on this node's fallback share because Redis did not answer.",
            c::FALLBACK_TOTAL.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "shardmta_cluster_leases_refused",
            "Connection leases refused (the shared limit or the fallback share was reached).",
            c::LEASES_REFUSED_TOTAL.load(Ordering::Relaxed),
        )?;
        enc.encode_descriptor(
            "shardmta_cluster_nodes",
            "Live nodes seen in Redis (heartbeats).",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&(c::NODES_SEEN.load(Ordering::Relaxed) as i64))
    }
}

#[cfg(test)]
mod cluster_tests {
    use super::*;

    #[test]
    fn cluster_metrics_render_in_both_formats() {
        let mut r = Registry::default();
        register_cluster(&mut r);
        crate::cluster::FALLBACK_TOTAL.fetch_add(1, Ordering::Relaxed);
        for f in [Format::Prometheus, Format::OpenMetrics] {
            let text = render(&r, f).unwrap();
            for name in [
                "shardmta_cluster_redis_up ",
                "shardmta_cluster_fallback_total ",
                "shardmta_cluster_leases_refused_total ",
                "shardmta_cluster_nodes ",
            ] {
                assert!(text.contains(name), "{name} in {text}");
            }
            assert!(
                !text.contains("shardmta_cluster_fallback_total 0\n"),
                "{text}"
            );
        }
    }
}

/// The shaping automation's metrics (`crate::shaping::automation::COUNTERS`, process-wide):
/// `shardmta_shaping_actions_total{action}` (suspend, lower, extend, expire, cancel) and
/// `shardmta_shaping_actions_active`.
pub fn register_shaping(r: &mut Registry) {
    r.register_collector(Box::new(ShapingMetrics));
}

#[derive(Debug)]
struct ShapingMetrics;

impl Collector for ShapingMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> Fmt {
        let c = &crate::shaping::automation::COUNTERS;
        let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        counter_family(
            &mut enc,
            "shardmta_shaping_actions",
            "Shaping automation actions: started (suspend, lower), extended, expired, cancelled.",
            "action",
            &[
                ("suspend", l(&c.suspend)),
                ("lower", l(&c.lower)),
                ("extend", l(&c.extend)),
                ("expire", l(&c.expire)),
                ("cancel", l(&c.cancel)),
            ],
        )?;
        enc.encode_descriptor(
            "shardmta_shaping_actions_active",
            "Shaping automation actions in force.",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&c.active.load(Ordering::Relaxed).max(0))
    }
}
