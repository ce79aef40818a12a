//! The cluster: limits shared by several shardmta nodes through a Redis server (`[cluster]`). This module owns
//! the shared connection leases and the shared message rate per destination key, the node heartbeats, and the
//! fallback to each node's share of a limit while Redis is unreachable; [`redis`] owns the Redis connection.
//!
//! Redis keys (all under `shardmta:`):
//! - `shardmta:conn:<key>`: a sorted set, one member per connection open to the destination anywhere,
//!   `<node>:<shard>:<lease id>`, scored by its expiry (Redis server time, ms). [`SCRIPT_LEASE`] drops expired
//!   members, counts, and adds one when below the limit, atomically. The holder refreshes its leases every
//!   `lease_ttl / 3` (one [`SCRIPT_REFRESH`] call per shard for all its leases) and removes its member after
//!   QUIT; a dead node's leases expire after `lease_ttl` and the others get the whole limit back.
//! - `shardmta:rate:<key>`: GCRA (the theoretical arrival time, µs); [`SCRIPT_RATE`] reserves the next slot
//!   and returns how long to wait for it (the same "reserve, then sleep" as the local limit).
//! - `shardmta:nodes`: a sorted set of node names scored by heartbeat expiry, written with every refresh; the
//!   live count (with `nodes` from the configuration, whichever is larger) sizes the fallback share.
//!
//! When a call fails (refused, timed out, in backoff), the node falls back to its share: `ceil(limit / nodes)`
//! connections per destination and `rate / nodes`, counted locally (leases granted so are refreshed into Redis
//! once it answers again). Each change between up and down is logged once per process and shown as
//! `shardmta_cluster_redis_up` / `shardmta_cluster_fallback_total`. Without `[cluster]` nothing here exists:
//! the delivery agent holds `None` and pays one branch per connection and per rate-limited message.
//! [`suppression`] shares the suppression list's changes between the nodes.

pub mod redis;
pub mod suppression;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use self::redis::{encode_command, integer, Client, RedisError, RedisUrl};
use crate::config::PfDuration;

/// `[cluster]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `redis://[[user]:password@]host[:port][/db]`.
    pub redis_url: String,
    /// This node's name in Redis (lease members, heartbeats). Empty (default): `myhostname`.
    pub node_name: String,
    /// A connection lease (and a node heartbeat) lasts this long unless refreshed (every third of it).
    pub lease_ttl: PfDuration,
    /// Deadline of each Redis call; past it the node falls back to its share.
    pub redis_timeout: PfDuration,
    /// Nodes expected in the cluster, for the fallback share when Redis is down (the live count seen in
    /// Redis is used when larger).
    pub nodes: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            redis_url: "redis://127.0.0.1:6379".into(),
            node_name: String::new(),
            lease_ttl: PfDuration(Duration::from_secs(30)),
            redis_timeout: PfDuration(Duration::from_secs(1)),
            nodes: 1,
        }
    }
}

impl ClusterConfig {
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Err(e) = RedisUrl::parse(&self.redis_url) {
            p.push(format!("cluster.{e}"));
        }
        if self.lease_ttl.0 < Duration::from_secs(2) {
            p.push(format!(
                "cluster.lease_ttl {}: at least 2s (leases are refreshed every third of it)",
                self.lease_ttl
            ));
        }
        if self.redis_timeout.0.is_zero() || self.redis_timeout.0 >= self.lease_ttl.0 {
            p.push(format!(
                "cluster.redis_timeout {}: more than 0s and less than lease_ttl",
                self.redis_timeout
            ));
        }
        if self.nodes == 0 {
            p.push("cluster.nodes 0: at least 1".into());
        }
        if self
            .node_name
            .contains(|c: char| c.is_whitespace() || c == ':')
        {
            p.push(format!(
                "cluster.node_name {:?}: no spaces or ':'",
                self.node_name
            ));
        }
        p
    }
}

/// The fallback share of a connection limit: `ceil(limit / nodes)` (a node never gets 0 of a non-zero limit).
pub fn connection_share(limit: usize, nodes: usize) -> usize {
    limit.div_ceil(nodes.max(1))
}

/// The fallback share of a message rate: `per_second / nodes`.
pub fn rate_share(per_second: f64, nodes: usize) -> f64 {
    per_second / nodes.max(1) as f64
}

/// A Lua script and its SHA1 (for EVALSHA).
pub struct Script {
    pub body: &'static str,
    sha: String,
}

impl Script {
    fn new(body: &'static str) -> Script {
        let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, body.as_bytes());
        let sha = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Script { body, sha }
    }

    /// `EVALSHA sha n keys.. args..` (or `EVAL body ...`).
    fn command(&self, by_sha: bool, keys: &[&[u8]], args: &[&[u8]]) -> Result<Vec<u8>, RedisError> {
        let n = keys.len().to_string();
        let mut a: Vec<&[u8]> = Vec::with_capacity(3 + keys.len() + args.len());
        if by_sha {
            a.extend([b"EVALSHA".as_slice(), self.sha.as_bytes()]);
        } else {
            a.extend([b"EVAL".as_slice(), self.body.as_bytes()]);
        }
        a.push(n.as_bytes());
        a.extend_from_slice(keys);
        a.extend_from_slice(args);
        let mut out = Vec::new();
        encode_command(&mut out, &a)?;
        Ok(out)
    }
}

/// Takes a connection lease. KEYS[1] the destination's set; ARGV: ttl (ms), limit, member. Returns 1 (taken)
/// or 0 (the limit is reached). Times are the Redis server's (no clock skew between nodes).
pub const SCRIPT_LEASE: &str = r#"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
if redis.call('ZSCORE', KEYS[1], ARGV[3]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], string.format('%.0f', now + ttl), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ttl * 2)
  return 1
end
return 0
"#;

/// Returns leases: KEYS the lease sets, ARGV the members (one per set).
pub const SCRIPT_RELEASE: &str = r#"
for i = 1, #KEYS do
  redis.call('ZREM', KEYS[i], ARGV[i])
end
return #KEYS
"#;

/// Refreshes a shard's leases and its node's heartbeat. KEYS[1] `shardmta:nodes`, KEYS[2..] lease sets;
/// ARGV[1] ttl (ms), ARGV[2] node name, ARGV[3..] the members (one per lease set). Returns the live nodes.
pub const SCRIPT_REFRESH: &str = r#"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local exp = string.format('%.0f', now + ttl)
for i = 2, #KEYS do
  redis.call('ZADD', KEYS[i], exp, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], ttl * 2)
end
redis.call('ZADD', KEYS[1], exp, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return redis.call('ZCARD', KEYS[1])
"#;

/// GCRA message rate. KEYS[1] the destination's rate key; ARGV[1] the interval between messages (µs); ARGV[2]
/// the longest wait a caller takes (µs). Reserves the next slot and returns the wait for it (µs, 0: now); a
/// slot further away than ARGV[2] is not reserved (the caller waits that long and asks again), so the
/// theoretical arrival time never runs more than one wait ahead of the clock however many workers ask.
pub const SCRIPT_RATE: &str = r#"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
local wait = tat - now
if wait > tonumber(ARGV[2]) then return wait end
redis.call('SET', KEYS[1], string.format('%.0f', tat + interval), 'PX', math.floor((wait + interval) / 1000) + 1000)
return wait
"#;

/// Most nodes believed alive (a larger count from Redis is taken as this).
pub const NODES_MAX: usize = 1024;
/// Released leases waiting for the release task, per shard.
pub const RELEASES_QUEUED_MAX: usize = 4096;
/// Longest wait a rate reply may ask for (a hostile or broken reply cannot park a worker for longer).
pub const RATE_WAIT_MAX: Duration = Duration::from_secs(60);
/// Fallback rate entries kept per shard before the idle ones are dropped.
pub const LOCAL_RATES_MAX: usize = 4096;
/// Most leases refreshed in one script call (two arguments each, under `redis::ARGS_MAX`).
pub const REFRESH_BATCH_MAX: usize = 2048;

/// 0 unknown, 1 up, 2 down: the last state any shard of this process saw (transitions are logged once).
static REDIS_STATE: AtomicU8 = AtomicU8::new(0);
static ENABLED: AtomicBool = AtomicBool::new(false);
/// Decisions taken on the fallback share (a lease or a rate slot while Redis did not answer).
pub static FALLBACK_TOTAL: AtomicU64 = AtomicU64::new(0);
/// Connection leases refused (the shared limit, or the fallback share, was reached).
pub static LEASES_REFUSED_TOTAL: AtomicU64 = AtomicU64::new(0);
/// Live nodes last seen in Redis (heartbeats), for the metrics.
pub static NODES_SEEN: AtomicU64 = AtomicU64::new(0);

/// Whether Redis answered the last call (any shard); `None` before the first call or without `[cluster]`.
pub fn redis_up() -> Option<bool> {
    match REDIS_STATE.load(Ordering::Relaxed) {
        1 => Some(true),
        2 => Some(false),
        _ => None,
    }
}

/// The cluster's counters for `stats.json`, when `[cluster]` is configured.
pub fn stats_json() -> Option<serde_json::Value> {
    ENABLED.load(Ordering::Relaxed).then(|| {
        serde_json::json!({
            "redis_up": redis_up().map_or(-1, i64::from),
            "fallback_total": FALLBACK_TOTAL.load(Ordering::Relaxed),
            "leases_refused_total": LEASES_REFUSED_TOTAL.load(Ordering::Relaxed),
            "nodes_seen": NODES_SEEN.load(Ordering::Relaxed),
        })
    })
}

fn note_state(up: bool, why: Option<&RedisError>) {
    let new = if up { 1 } else { 2 };
    // A load first: the common case (no change) writes nothing to the line every shard reads.
    if REDIS_STATE.load(Ordering::Relaxed) == new {
        return;
    }
    let old = REDIS_STATE.swap(new, Ordering::Relaxed);
    if old == new {
        return;
    }
    match (up, why) {
        (true, _) if old == 2 => {
            tracing::warn!("cluster: redis answers again: shared limits apply again")
        }
        (true, _) => tracing::info!("cluster: redis connected: limits are shared"),
        (false, e) => tracing::warn!(
            "cluster: redis unusable ({}): each node falls back to its share of the limits",
            e.map_or_else(String::new, ToString::to_string)
        ),
    }
}

/// A released lease: its id and destination key.
type Released = (u64, Rc<str>);

/// One shard's handle on the shared limits (see the module documentation).
pub struct SharedLimits {
    client: Client,
    node: String,
    shard: usize,
    ttl: Duration,
    nodes_configured: usize,
    nodes_seen: Cell<usize>,
    next_lease: Cell<u64>,
    /// Leases held by this shard: id -> destination key (bounded by the connections open).
    held: RefCell<HashMap<u64, Rc<str>>>,
    /// Leases held per destination key (shared and fallback ones), for the fallback share.
    per_key: RefCell<HashMap<Rc<str>, usize>>,
    /// Fallback rate: per destination key the earliest start of its next message (at most `LOCAL_RATES_MAX`).
    local_rate: RefCell<HashMap<String, Instant>>,
    refresher: Cell<bool>,
    /// Leases dropped, for the release task (at most `RELEASES_QUEUED_MAX`; past that a lease just expires).
    releases: flume::Sender<Released>,
    releases_rx: RefCell<Option<flume::Receiver<Released>>>,
    lease: Script,
    release: Script,
    refresh: Script,
    rate: Script,
}

impl SharedLimits {
    /// The shard's handle, when `[cluster]` is configured. No connection is opened until the first use.
    pub fn from_config(cfg: &crate::config::Config) -> Option<Rc<SharedLimits>> {
        let c = cfg.cluster.as_ref()?;
        let url = match RedisUrl::parse(&c.redis_url) {
            Ok(u) => u,
            Err(e) => {
                // Config::problems refuses it first; never panic on a value from a file.
                tracing::error!("cluster: {e}: limits stay local");
                return None;
            }
        };
        ENABLED.store(true, Ordering::Relaxed);
        let node = if c.node_name.is_empty() {
            cfg.myhostname.clone()
        } else {
            c.node_name.clone()
        };
        let (lease, release, refresh, rate) = (
            Script::new(SCRIPT_LEASE),
            Script::new(SCRIPT_RELEASE),
            Script::new(SCRIPT_REFRESH),
            Script::new(SCRIPT_RATE),
        );
        let mut setup = Vec::new();
        for s in [&lease, &release, &refresh, &rate] {
            let mut out = Vec::new();
            // Cannot fail: three arguments.
            if encode_command(&mut out, &[b"SCRIPT", b"LOAD", s.body.as_bytes()]).is_ok() {
                setup.push(out);
            }
        }
        let (releases, releases_rx) = flume::bounded(RELEASES_QUEUED_MAX);
        // Lease ids start from the clock, so a node restarted under the same name does not reuse its
        // predecessor's members.
        let first_id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        Some(Rc::new(SharedLimits {
            client: Client::new(url, c.redis_timeout.0, setup),
            node,
            shard: glommio::executor().id(),
            ttl: c.lease_ttl.0,
            nodes_configured: c.nodes.max(1),
            nodes_seen: Cell::new(0),
            next_lease: Cell::new(first_id),
            held: RefCell::default(),
            per_key: RefCell::default(),
            local_rate: RefCell::default(),
            refresher: Cell::new(false),
            releases,
            releases_rx: RefCell::new(Some(releases_rx)),
            lease,
            release,
            refresh,
            rate,
        }))
    }

    /// Nodes sharing the limits: the configured count or the live count seen, whichever is larger.
    pub fn nodes(&self) -> usize {
        self.nodes_configured.max(self.nodes_seen.get())
    }

    /// How long a worker refused a lease waits before asking again: a sixth of the lease TTL, within
    /// 100 ms .. 1 s.
    pub fn retry_interval(&self) -> Duration {
        (self.ttl / 6).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }

    async fn eval(&self, s: &Script, keys: &[&[u8]], args: &[&[u8]]) -> Result<i64, RedisError> {
        let r = match self.client.call(s.command(true, keys, args)?).await {
            Err(RedisError::Reply(e)) if e.starts_with("NOSCRIPT") => {
                self.client.call(s.command(false, keys, args)?).await
            }
            r => r,
        };
        match r {
            Ok(f) => {
                note_state(true, None);
                integer(&f)
            }
            Err(e) => {
                note_state(false, Some(&e));
                Err(e)
            }
        }
    }

    fn start_refresher(self: &Rc<Self>) {
        if self.refresher.replace(true) {
            return;
        }
        let weak = Rc::downgrade(self);
        glommio::spawn_local(refresh_loop(weak.clone())).detach();
        if let Some(rx) = self.releases_rx.borrow_mut().take() {
            glommio::spawn_local(release_loop(weak, rx)).detach();
        }
    }

    /// A lease for one more connection to `key` under `limit` connections over the cluster; `None`: the limit
    /// is reached (ask again after [`Self::retry_interval`]). While Redis does not answer, the node's share
    /// `ceil(limit / nodes)` counted locally.
    pub async fn acquire_connection(self: &Rc<Self>, key: &str, limit: usize) -> Option<Lease> {
        self.start_refresher();
        let id = self.next_lease.get();
        self.next_lease.set(id + 1);
        let member = self.member(id);
        let rkey = format!("shardmta:conn:{key}");
        let ttl_ms = self.ttl.as_millis().to_string();
        let limit_s = limit.to_string();
        let granted = match self
            .eval(
                &self.lease,
                &[rkey.as_bytes()],
                &[ttl_ms.as_bytes(), limit_s.as_bytes(), member.as_bytes()],
            )
            .await
        {
            Ok(n) => n == 1,
            // This shard's own calls are backed up, Redis is not down: refused, asked again later (granting the
            // fallback share here would take the node over the shared limit).
            Err(redis::RedisError::Busy) => false,
            Err(e) => {
                if e == redis::RedisError::Timeout {
                    // The script may have run after all: its member is removed (re-added by the refresher only
                    // if the fallback below grants the lease).
                    let _ = self.releases.try_send((id, Rc::from(key)));
                }
                FALLBACK_TOTAL.fetch_add(1, Ordering::Relaxed);
                let held = self.per_key.borrow().get(key).copied().unwrap_or(0);
                held < connection_share(limit, self.nodes())
            }
        };
        if !granted {
            LEASES_REFUSED_TOTAL.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let key: Rc<str> = match self.per_key.borrow().get_key_value(key) {
            Some((k, _)) => k.clone(),
            None => Rc::from(key),
        };
        *self.per_key.borrow_mut().entry(key.clone()).or_insert(0) += 1;
        self.held.borrow_mut().insert(id, key);
        Some(Lease {
            limits: self.clone(),
            id,
        })
    }

    /// Reserves the next message slot of `key` under `per_second` messages over the cluster; returns how long
    /// to wait for it. While Redis does not answer, the node's share `per_second / nodes`, counted locally.
    pub async fn message_slot(self: &Rc<Self>, key: &str, per_second: f64) -> Duration {
        if per_second <= 0.0 || !per_second.is_finite() {
            return Duration::ZERO;
        }
        self.start_refresher();
        let interval_us = ((1e6 / per_second).round() as u64).max(1);
        let rkey = format!("shardmta:rate:{key}");
        let iv = interval_us.to_string();
        let max_us = RATE_WAIT_MAX.as_micros() as i64;
        let max = max_us.to_string();
        loop {
            match self
                .eval(
                    &self.rate,
                    &[rkey.as_bytes()],
                    &[iv.as_bytes(), max.as_bytes()],
                )
                .await
            {
                // Not reserved (too far away): wait the longest and ask again.
                Ok(us) if us > max_us => glommio::timer::sleep(RATE_WAIT_MAX).await,
                Ok(us) => return Duration::from_micros(us.max(0) as u64),
                Err(_) => {
                    FALLBACK_TOTAL.fetch_add(1, Ordering::Relaxed);
                    return self.local_slot(
                        key,
                        rate_share(per_second, self.nodes()),
                        Instant::now(),
                    );
                }
            }
        }
    }

    /// The fallback rate: reserves the next local slot of `key` at `per_second`.
    fn local_slot(&self, key: &str, per_second: f64, now: Instant) -> Duration {
        // At most a day between messages (a share of a tiny rate cannot overflow a Duration).
        let day = Duration::from_secs(86_400);
        let interval = Duration::try_from_secs_f64(1.0 / per_second)
            .unwrap_or(day)
            .min(day);
        let mut m = self.local_rate.borrow_mut();
        if m.len() >= LOCAL_RATES_MAX && !m.contains_key(key) {
            m.retain(|_, t| *t > now);
            if m.len() >= LOCAL_RATES_MAX {
                m.clear();
            }
        }
        let next = m.entry(key.to_string()).or_insert(now);
        let start = (*next).max(now);
        *next = start + interval;
        start - now
    }

    fn member(&self, id: u64) -> String {
        format!("{}:{}:{id}", self.node, self.shard)
    }

    /// One refresh round: every lease held (in batches of `REFRESH_BATCH_MAX`) and the node's heartbeat.
    async fn refresh_all(&self) {
        let leases: Vec<(String, String)> = self
            .held
            .borrow()
            .iter()
            .map(|(id, k)| (format!("shardmta:conn:{k}"), self.member(*id)))
            .collect();
        let ttl_ms = self.ttl.as_millis().to_string();
        let mut chunks: Vec<&[(String, String)]> = leases.chunks(REFRESH_BATCH_MAX).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        for chunk in chunks {
            let mut keys: Vec<&[u8]> = vec![b"shardmta:nodes"];
            let mut args: Vec<&[u8]> = vec![ttl_ms.as_bytes(), self.node.as_bytes()];
            for (k, m) in chunk {
                keys.push(k.as_bytes());
                args.push(m.as_bytes());
            }
            match self.eval(&self.refresh, &keys, &args).await {
                Ok(n) => {
                    // Bounded: a broken reply cannot make the fallback share vanishingly small.
                    let n = usize::try_from(n).unwrap_or(0).min(NODES_MAX);
                    self.nodes_seen.set(n);
                    NODES_SEEN.store(n as u64, Ordering::Relaxed);
                }
                Err(_) => return,
            }
        }
    }

    /// A lease dropped: uncounted here at once; its member is removed from Redis by the release task.
    fn release(&self, id: u64) {
        let Some(key) = self.held.borrow_mut().remove(&id) else {
            return;
        };
        let mut pk = self.per_key.borrow_mut();
        if let Some(n) = pk.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                pk.remove(&key);
            }
        }
        // Full queue: the member expires after the TTL instead.
        let _ = self.releases.try_send((id, key));
    }
}

/// Sends the shard's released leases to Redis: every release due (up to `REFRESH_BATCH_MAX`) in one call.
async fn release_loop(weak: Weak<SharedLimits>, rx: flume::Receiver<Released>) {
    let mut batch = Vec::with_capacity(REFRESH_BATCH_MAX);
    while let Ok(first) = rx.recv_async().await {
        batch.push(first);
        while batch.len() < REFRESH_BATCH_MAX {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let Some(me) = weak.upgrade() else { return };
        let sets: Vec<String> = batch
            .iter()
            .map(|(_, k)| format!("shardmta:conn:{k}"))
            .collect();
        let members: Vec<String> = batch.iter().map(|(id, _)| me.member(*id)).collect();
        let keys: Vec<&[u8]> = sets.iter().map(|k| k.as_bytes()).collect();
        let args: Vec<&[u8]> = members.iter().map(|m| m.as_bytes()).collect();
        // On failure the members expire after the TTL.
        let _ = me.eval(&me.release, &keys, &args).await;
        batch.clear();
    }
}

/// Refreshes the shard's leases every `lease_ttl / 3` while the shard's `SharedLimits` lives.
async fn refresh_loop(weak: Weak<SharedLimits>) {
    loop {
        let Some(me) = weak.upgrade() else { return };
        let period = me.ttl / 3;
        me.refresh_all().await;
        drop(me);
        glommio::timer::sleep(period).await;
    }
}

/// A connection lease: held for the connection's life; dropping it (after QUIT) gives the slot back.
pub struct Lease {
    limits: Rc<SharedLimits>,
    id: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.limits.release(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_shares() {
        assert_eq!(connection_share(20, 3), 7);
        assert_eq!(connection_share(2, 2), 1);
        assert_eq!(connection_share(1, 4), 1, "never zero of a non-zero limit");
        assert_eq!(connection_share(5, 0), 5);
        assert!((rate_share(10.0, 4) - 2.5).abs() < 1e-9);
    }

    #[test]
    fn config_problems() {
        assert!(ClusterConfig::default().problems().is_empty());
        let c = ClusterConfig {
            redis_url: "http://x".into(),
            lease_ttl: PfDuration(Duration::from_secs(1)),
            nodes: 0,
            node_name: "a:b".into(),
            ..Default::default()
        };
        let p = c.problems();
        assert_eq!(p.len(), 5, "{p:?}");
    }

    #[test]
    fn the_section_parses_and_is_checked() {
        let parse = |t: &str| crate::config::Config::parse(t, std::path::Path::new("t.toml"));
        let c = parse("[cluster]\nredis_url = \"redis://:pw@10.0.0.9:6380/1\"\nnode_name = \"mta1\"\nlease_ttl = \"20s\"\nnodes = 3\n")
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(
            (c.node_name.as_str(), c.lease_ttl.0.as_secs(), c.nodes),
            ("mta1", 20, 3)
        );
        assert_eq!(c.redis_timeout, ClusterConfig::default().redis_timeout);
        let e = parse("[cluster]\nredis_url = \"http://x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("redis://"), "{e}");
        assert!(parse("[cluster]\nbogus = 1\n").is_err());
        assert!(parse("").unwrap().cluster.is_none(), "absent: off");
    }

    #[test]
    fn script_commands() {
        let s = Script::new("return 1");
        // sha1("return 1"), as redis-cli SCRIPT LOAD prints it.
        assert_eq!(s.sha, "e0e1f9fabfc9d4800c877a703b823ac0578ff8db");
        let c = s.command(true, &[b"k"], &[b"a"]).unwrap();
        assert_eq!(
            c,
            b"*5\r\n$7\r\nEVALSHA\r\n$40\r\ne0e1f9fabfc9d4800c877a703b823ac0578ff8db\r\n$1\r\n1\r\n$1\r\nk\r\n$1\r\na\r\n"
        );
    }
}
