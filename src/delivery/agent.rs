//! The destination owner: per destination a job queue, a connection pool bounded by
//! `destination_concurrency_limit` (reached gradually: adaptive concurrency), idle reuse, a message rate limit
//! and a backoff after 421s or repeated failures. Jobs arrive from any shard; outcomes go back to the job's
//! accepting shard.
//!
//! A destination is a **site** for MX-routed domains (KumoMTA's name): every domain whose MX hosts form the same
//! set (sorted host names and port) shares one destination, so `gmail.com`, `googlemail.com` and the hosted
//! domains behind the same MX hosts share one set of limits and connections, and a connection carries
//! transactions for any of the site's domains. The domain's owner (by next hop) looks the site up (MX, cached
//! `SITE_REMEMBER_FOR`) and hands the job to the site's owner (`owner_of_site`), so a site's limits hold across the
//! whole process. Routes, the relayhost and domains with a policy entry of their own (`[smtp_tls_policy]`,
//! `[destination_rate_limit]`) stay keyed by next hop; so does a domain whose MX lookup failed (its worker
//! reports the DNS trouble). With egress sources (`crate::egress`), a destination is one per site (or next hop)
//! and source: the job's pool's source is chosen here, and limits and warm-up caps hold per site x source.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use super::log::{AttemptedHost, DeliveryLog};
use super::outbound::{
    ClientTls, ConnectParams, Connection, HostError, OutboundMessage, TransactionOutcome,
};
use super::route::{destination_key, Nexthop, Router};
use super::tls_rpt::{self, PolicyApplied, TlsResult};
use super::trouble::{Scope, Trouble};
use super::{Job, JobRcpt, Outcome, RcptResult, Site};
use crate::config::{Config, TlsLevel};
use crate::dns::MxResolver;
use crate::limits::{
    DESTINATIONS_IDLE_EVICT_AFTER, DESTINATIONS_MAX, DESTINATION_FAILURES_CONSECUTIVE_MAX,
    DESTINATION_JOBS_QUEUED_MAX, SITES_REMEMBERED_MAX, SITE_LOOKUPS_MAX,
    SITE_LOOKUP_FAILED_REMEMBER_FOR, SITE_REMEMBER_FOR, TLS_BROKEN_HOSTS_MAX,
    TLS_BROKEN_REMEMBER_FOR,
};
use crate::mta_sts::Policy as StsPolicy;
use crate::shard::mesh::Outbox;
use crate::shard::owner::owner_of_site;

pub struct Agent {
    /// This shard's own copy of the running configuration (replaced by [`Agent::reconfigure`]); an `Rc`, so
    /// taking it costs no write to memory other shards share, and it may be held across an await.
    cfg: RefCell<Rc<Config>>,
    router: Rc<Router>,
    resolver: Rc<MxResolver>,
    tls: ClientTls,
    /// This shard's MTA-STS policies (for the MX destinations it owns); replaced (cache emptied) by a reload that
    /// changes `[mta_sts]` or `smtp_tls_ca_file`.
    sts: RefCell<Rc<crate::mta_sts::Sts>>,
    log: Rc<DeliveryLog>,
    destinations: RefCell<HashMap<String, Rc<Destination>>>,
    /// Outcomes for their accepting shards (the shard's outcome courier takes them; see `shard::mesh`).
    outcomes: Rc<Outbox<Outcome>>,
    /// Hosts whose STARTTLS handshake failed recently (opportunistic TLS falls back to plaintext).
    tls_broken: RefCell<HashMap<SocketAddr, Instant>>,
    pub connections_opened: Cell<u64>,
    /// Recipient results per destination, for `/metrics` (published by the shard's tick).
    pub tally: RefCell<crate::shard::stats::DestinationTally>,
    /// This shard's index, the number of SMTP shards, and its job outbox (a job whose site another shard owns
    /// goes there).
    shard: usize,
    shards: usize,
    jobs: Rc<Outbox<Job>>,
    /// The site of each MX-routed domain this shard owns (`None`: the lookup failed), until when it holds; at
    /// most `SITES_REMEMBERED_MAX`.
    sites: RefCell<HashMap<String, SiteMemo>>,
    /// Jobs waiting for their domain's site lookup (at most `SITE_LOOKUPS_MAX` domains, each at most
    /// `DESTINATION_JOBS_QUEUED_MAX` jobs).
    site_lookups: RefCell<HashMap<String, Vec<Job>>>,
    // --- egress (issue 14): sources and pools; None without `[[egress_source]]` ---
    /// This shard's egress state (source choice, suspensions, warm-up counts); rebuilt by a reload.
    egress: RefCell<Option<Rc<crate::egress::Egress>>>,
    /// `[cluster]`: connection leases and message rate shared with other nodes through Redis; `None`: local
    /// limits only (see `crate::cluster`).
    cluster: Option<Rc<crate::cluster::SharedLimits>>,
    // --- shaping (crate::shaping): the rules' answers for this shard's destinations, and the automation engine
    // of the sites it owns (see `Agent::shape`, `Agent::shaping_hold`, `Agent::observe_replies`).
    pub shaping: crate::shaping::Shaping,
    pub automation: crate::shaping::automation::Engine,
}

/// A domain's site (`None`: its lookup failed) and until when it holds.
type SiteMemo = (Option<Arc<Site>>, Instant);

struct Destination {
    key: String,
    hop: Nexthop,
    /// Jobs waiting for a connection (at most `DESTINATION_JOBS_QUEUED_MAX`; past that a job is deferred at once).
    queue: RefCell<VecDeque<Job>>,
    active: Cell<usize>,
    waiters: RefCell<Vec<Waker>>,
    /// When a job last arrived (for the eviction of idle destinations).
    last_used: Cell<Instant>,
    backoff_until: Cell<Option<Instant>>,
    backoff_reason: RefCell<String>,
    failures: Cell<u32>,
    /// The recipient domain's policy key (see `route::destination_key`), if any.
    policy: Option<String>,
    /// Adaptive concurrency: how many connections may be open now (at most `destination_concurrency_limit`).
    window: RefCell<ConcurrencyWindow>,
    /// Seconds between messages (0: no rate limit) and the earliest start of the next one.
    interval: Cell<Duration>,
    next_start: Cell<Instant>,
    tls_level: Cell<TlsLevel>,
    relayhost: Cell<bool>,
    /// Egress: the source this destination's connections are bound to (its key names it); None: no pool. Replaced by a reload that changes it.
    source: RefCell<Option<Rc<crate::egress::Source>>>,
    // --- shaping (crate::shaping) ---
    /// What the shaping rules apply here: the site and its limits (set at creation, on a reload, and when the
    /// MX hosts are known).
    shaped: RefCell<Rc<crate::shaping::Applied>>,
    /// The MX hosts last resolved (empty until the first connection), for a reload's new answer.
    mx_hosts: RefCell<Vec<String>>,
    /// Least time between two new connections (shaping's `max_connection_rate`; zero: none), and the next slot.
    conn_interval: Cell<Duration>,
    next_connect: Cell<Instant>,
}

impl Destination {
    /// While backing off: the deferral reply for its recipients. Clears an expired backoff.
    fn backing_off(&self) -> Option<String> {
        let until = self.backoff_until.get()?;
        if Instant::now() < until {
            return Some(format!(
                "4.4.1 destination {} backing off: {}",
                self.key,
                self.backoff_reason.borrow()
            ));
        }
        self.backoff_until.set(None);
        None
    }

    /// Whether this destination is a site (its key is a site key, see `site_key`).
    fn is_site(&self) -> bool {
        self.key.starts_with("site:")
    }

    /// Takes the next queued job.
    fn take_job(&self) -> Option<Job> {
        self.queue.borrow_mut().pop_front()
    }
}

/// Adaptive concurrency per destination (Postfix's slow start idea): a destination starts with
/// `initial_destination_concurrency` connections; each transaction accepted adds 1/window (so the window grows
/// by about one per window's worth of successes), a transaction refused with 4xx takes one away, and a session
/// or site trouble (421, a lost connection, a timeout, every host down) halves it; never below 1, never above
/// the destination's limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConcurrencyWindow {
    window: f64,
}

impl ConcurrencyWindow {
    pub fn new(initial: usize) -> ConcurrencyWindow {
        ConcurrencyWindow {
            window: initial.max(1) as f64,
        }
    }

    /// Connections allowed now, given the destination's limit.
    pub fn allowed(&self, limit: usize) -> usize {
        (self.window as usize).max(1).min(limit)
    }

    pub fn success(&mut self, limit: usize) {
        self.window = (self.window + 1.0 / self.window).min(limit.max(1) as f64);
    }

    pub fn soft_failure(&mut self) {
        self.window = (self.window - 1.0).max(1.0);
    }

    pub fn hard_failure(&mut self) {
        self.window = (self.window / 2.0).max(1.0);
    }
}

impl Agent {
    /// `shard`: this shard's index among `shards`; `jobs`: its job outbox (for jobs whose site another shard owns).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Arc<Config>,
        router: Rc<Router>,
        resolver: Rc<MxResolver>,
        log: Rc<DeliveryLog>,
        outcomes: Rc<Outbox<Outcome>>,
        shard: usize,
        shards: usize,
        jobs: Rc<Outbox<Job>>,
    ) -> Rc<Agent> {
        let tls = ClientTls::new(cfg.delivery.smtp_tls_ca_file.as_deref());
        let sts = crate::mta_sts::Sts::new(
            &cfg.mta_sts,
            cfg.delivery.smtp_tls_ca_file.as_deref(),
            resolver.clone(),
        );
        Rc::new(Agent {
            cfg: RefCell::new(Rc::new(Config::clone(&cfg))),
            router,
            resolver,
            tls,
            sts: RefCell::new(sts),
            log,
            destinations: RefCell::new(HashMap::new()),
            outcomes,
            tls_broken: RefCell::new(HashMap::new()),
            connections_opened: Cell::new(0),
            tally: RefCell::default(),
            shard,
            shards,
            jobs,
            sites: RefCell::new(HashMap::new()),
            site_lookups: RefCell::new(HashMap::new()),
            egress: RefCell::new(crate::egress::Egress::new(&cfg).map(Rc::new)),
            cluster: crate::cluster::SharedLimits::from_config(&cfg),
            shaping: crate::shaping::Shaping::new(Arc::new(crate::shaping::Rules::defaults())),
            automation: crate::shaping::automation::Engine::new(
                0,
                Arc::new(crate::shaping::Rules::defaults()),
            ),
        })
    }

    fn cfg(&self) -> Rc<Config> {
        self.cfg.borrow().clone()
    }

    /// A configuration reload: the new delivery settings apply from the next job and connection on, and every
    /// known destination takes its new TLS level and rate limit now (the router is replaced by the shard).
    /// `[mta_sts]` and `smtp_tls_ca_file` are not among them (`reloadable::merge` keeps the running values: a
    /// restart applies them), so the MTA-STS state and its cache stay.
    pub fn reconfigure(&self, cfg: &Config) {
        *self.cfg.borrow_mut() = Rc::new(cfg.clone());
        // Egress: new sources and pools, the running suspensions and today's warm-up counts kept.
        let egress = crate::egress::Egress::new(cfg).map(Rc::new);
        if let (Some(new), Some(old)) = (&egress, self.egress.borrow().as_ref()) {
            new.carry_over(old);
        }
        *self.egress.borrow_mut() = egress.clone();
        for d in self.destinations.borrow().values() {
            // A source changed by the reload (address, EHLO name) is used from the next connection on.
            let renewed = match (&egress, d.source.borrow().as_ref()) {
                (Some(e), Some(old)) => e.index_of(&old.name).and_then(|i| e.source(i).cloned()),
                _ => None,
            };
            if let Some(new) = renewed {
                *d.source.borrow_mut() = Some(new);
            }
            let (tls_level, interval, relayhost) =
                self.destination_policy(&d.hop, d.policy.as_deref(), d.is_site());
            d.tls_level.set(tls_level);
            d.interval.set(interval);
            d.relayhost.set(relayhost);
            self.shape(d);
        }
    }

    // --- shaping (crate::shaping) ---

    /// New shaping rules (at start and on a reload): every known destination takes its new limits.
    pub fn set_shaping_rules(&self, rules: Arc<crate::shaping::Rules>) {
        self.shaping.replace(rules.clone());
        self.automation.replace_rules(rules);
        for d in self.destinations.borrow().values() {
            self.shape(d);
        }
    }

    /// Looks up what the shaping rules apply to `d` (its domain or host and its MX hosts, when known) and sets
    /// its site and its limits: message rate and connection rate (a rule's value, else the server's).
    fn shape(&self, d: &Destination) {
        let name = match &d.hop {
            Nexthop::Mx { domain, .. } => domain.as_str(),
            Nexthop::Host { host, .. } => host.as_str(),
            Nexthop::Local => d.key.as_str(),
        };
        let source = d.source.borrow().clone();
        let source = source.as_ref().map(|s| s.name.as_str());
        let applied = self.shaping.lookup(name, &d.mx_hosts.borrow(), source);
        if let Some(r) = &applied.limits.max_message_rate {
            d.interval.set(r.interval());
        } else if applied.limits.max_message_rate.is_none()
            && d.shaped.borrow().limits.max_message_rate.is_some()
        {
            d.interval.set(
                self.destination_policy(&d.hop, d.policy.as_deref(), d.is_site())
                    .1,
            );
        }
        d.conn_interval.set(
            applied
                .limits
                .max_connection_rate
                .as_ref()
                .map_or(Duration::ZERO, |r| r.interval()),
        );
        *d.shaped.borrow_mut() = applied;
    }

    /// The MX hosts of `d` are known (a connection resolved them): its site may be a provider's now.
    fn shape_with_mx(&self, d: &Destination, hosts: &[crate::dns::Destination]) {
        let same = {
            let known = d.mx_hosts.borrow();
            known.len() == hosts.len() && known.iter().zip(hosts).all(|(a, b)| *a == b.host)
        };
        if !same {
            *d.mx_hosts.borrow_mut() = hosts.iter().map(|h| h.host.clone()).collect();
            self.shape(d);
        }
    }

    /// Most connections to `d` now: the shaping rule's or `destination_concurrency_limit`, lowered by an active
    /// automation action.
    fn max_connections(&self, d: &Destination) -> usize {
        let base = d
            .shaped
            .borrow()
            .limits
            .max_connections
            .unwrap_or(self.cfg().delivery.destination_concurrency_limit);
        match self.shaping_effect(d) {
            // At least one connection: an action read back from a hand-edited file cannot stop a site for good.
            Some(e) => e.max_connections.map_or(base, |c| c.clamp(1, base.max(1))),
            None => base,
        }
    }

    /// The automation's effect on `d`'s site now (None, without reading the clock, when no action is active).
    fn shaping_effect(&self, d: &Destination) -> Option<crate::shaping::automation::Effect> {
        if self.automation.active_count() == 0 {
            return None;
        }
        let now = crate::shaping::automation::now_ms();
        let source = d.source.borrow();
        let source = source.as_ref().map(|s| s.name.as_str());
        Some(self.automation.effect(&d.shaped.borrow().site, source, now))
    }

    /// While `d`'s site is suspended by an automation action: the deferral reply for its recipients.
    fn shaping_hold(&self, d: &Destination) -> Option<String> {
        self.shaping_effect(d)?.suspended
    }

    /// Shows the automation the 4xx/5xx server replies of a job's results (each distinct reply once).
    fn observe_replies<'a>(&self, d: &Destination, replies: impl Iterator<Item = &'a str>) {
        if !self.automation.watching() {
            return;
        }
        // No copy and no clock for a job without a failure.
        let shaped = d.shaped.borrow();
        let mut now = None;
        let mut last: Option<&str> = None;
        for r in replies {
            if !matches!(r.as_bytes().first(), Some(b'4' | b'5')) || last == Some(r) {
                continue;
            }
            last = Some(r);
            let t = *now.get_or_insert_with(crate::shaping::automation::now_ms);
            let source = d.source.borrow();
            let source = source.as_ref().map(|s| s.name.as_str());
            self.automation.observe(&shaped.site, source, r, t);
        }
    }

    /// Shaping's retry delays for a job's deferrals (see `Outcome::retry`): None, without a lookup, unless some
    /// rule sets `retry_interval` or `max_retry_interval` and a recipient was deferred.
    fn shaped_retry(
        &self,
        hop: &Nexthop,
        policy: Option<&str>,
        site: Option<&Arc<Site>>,
        results: &[(u32, RcptResult)],
    ) -> Option<(Duration, Duration)> {
        if !self.shaping.sets_retry()
            || !results
                .iter()
                .any(|(_, r)| matches!(r, RcptResult::Deferred { .. }))
        {
            return None;
        }
        let key = match site {
            Some(s) => s.key.clone(),
            None => destination_key(hop, policy),
        };
        // With egress sources the destination's key also names its source (any of them will do: they share
        // the site's rules).
        let d = {
            let map = self.destinations.borrow();
            match map.get(&key) {
                Some(d) => d.clone(),
                None => {
                    let prefix = format!("{key} via ");
                    map.iter().find(|(k, _)| k.starts_with(&prefix))?.1.clone()
                }
            }
        };
        let shaped = d.shaped.borrow();
        let l = &shaped.limits;
        if l.retry_interval.is_none() && l.max_retry_interval.is_none() {
            return None;
        }
        let cfg = self.cfg();
        let min = l.retry_interval.unwrap_or(cfg.minimal_backoff_time.0);
        let max = l
            .max_retry_interval
            .unwrap_or(cfg.maximal_backoff_time.0)
            .max(min);
        Some((min, max))
    }

    /// The shard's tick: ends the automation's expired actions and writes its file when they changed.
    pub fn shaping_tick(&self) {
        if self.automation.active_count() > 0 {
            self.automation.expire(crate::shaping::automation::now_ms());
        }
        self.automation.persist();
    }

    /// A destination's TLS level, least time between messages and whether it is the relayhost.
    /// A site (`site`) takes the defaults only: its domains have no entries of their own (`groups_by_site`), and
    /// the first domain's names must not decide for the others (an entry added by a reload for one domain
    /// applies to its next jobs, which then leave the site).
    fn destination_policy(
        &self,
        hop: &Nexthop,
        policy: Option<&str>,
        site: bool,
    ) -> (TlsLevel, Duration, bool) {
        let cfg = self.cfg();
        // The recipient domain's entry first (a route or the relayhost does not lose it), then the next hop's.
        let names: Vec<String> = if site {
            Vec::new()
        } else {
            policy
                .map(str::to_string)
                .into_iter()
                .chain(hop.policy_names())
                .collect()
        };
        let relayhost = self.router.is_relayhost(hop);
        let mut tls_level = names
            .iter()
            .find_map(|n| cfg.smtp_tls_policy.get(n).copied())
            .unwrap_or(cfg.delivery.smtp_tls_security_level);
        if relayhost
            && !cfg.delivery.smtp_sasl_username.is_empty()
            && matches!(tls_level, TlsLevel::None | TlsLevel::May)
        {
            tls_level = TlsLevel::Encrypt; // credentials never travel in plaintext
        }
        let rate = names
            .iter()
            .find_map(|n| cfg.destination_rate_limit.get(n))
            .unwrap_or(&cfg.delivery.default_destination_rate_limit);
        (tls_level, rate.interval(), relayhost)
    }

    /// Remembers that `addr`'s STARTTLS failed, within `TLS_BROKEN_HOSTS_MAX` entries: expired ones go first,
    /// then the oldest.
    fn remember_tls_broken(&self, addr: SocketAddr, now: Instant) {
        let mut m = self.tls_broken.borrow_mut();
        if m.len() >= TLS_BROKEN_HOSTS_MAX && !m.contains_key(&addr) {
            m.retain(|_, t| now.saturating_duration_since(*t) < TLS_BROKEN_REMEMBER_FOR);
            if m.len() >= TLS_BROKEN_HOSTS_MAX {
                if let Some(oldest) = m.iter().min_by_key(|(_, t)| **t).map(|(a, _)| *a) {
                    m.remove(&oldest);
                }
            }
        }
        m.insert(addr, now);
    }

    /// Ends the backoff of the destinations whose next hop is `host` (every destination: `None`), as Postfix's
    /// `postqueue -f` flushes "dead" destinations: the operator's flush is tried at once. Returns how many were
    /// in backoff.
    pub fn clear_backoff(&self, host: Option<&str>) -> usize {
        let mut n = 0;
        for d in self.destinations.borrow().values() {
            let name = match &d.hop {
                Nexthop::Mx { domain, .. } => domain.as_str(),
                Nexthop::Host { host, .. } => host.as_str(),
                Nexthop::Local => "",
            };
            // A site answers to any of its MX hosts as well.
            if host.is_some_and(|h| {
                !name.trim_end_matches('.').eq_ignore_ascii_case(h)
                    && !d
                        .mx_hosts
                        .borrow()
                        .iter()
                        .any(|s| s.eq_ignore_ascii_case(h))
            }) {
                continue;
            }
            if d.backoff_until.take().is_some() {
                n += 1;
            }
            d.failures.set(0);
        }
        n
    }

    /// Forgets destinations with nothing to do (no job, no connection, no backoff) that have been idle for
    /// `DESTINATIONS_IDLE_EVICT_AFTER`, or the longest idle ones while there are more than `DESTINATIONS_MAX`.
    /// Their limits start afresh if mail for them comes back. Called from the shard's housekeeping tick.
    pub fn evict_idle_destinations(&self, now: Instant) -> usize {
        let mut map = self.destinations.borrow_mut();
        let idle = |d: &Destination| {
            d.active.get() == 0
                && d.queue.borrow().is_empty()
                && d.backoff_until.get().is_none_or(|u| u <= now)
        };
        let mut sites = self.sites.borrow_mut();
        sites.retain(|_, (_, until)| *until > now);
        drop(sites);
        let before = map.len();
        map.retain(|_, d| {
            !(idle(d)
                && now.saturating_duration_since(d.last_used.get())
                    >= DESTINATIONS_IDLE_EVICT_AFTER)
        });
        if map.len() > DESTINATIONS_MAX {
            let mut idle_keys: Vec<(Instant, String)> = map
                .iter()
                .filter(|(_, d)| idle(d))
                .map(|(k, d)| (d.last_used.get(), k.clone()))
                .collect();
            idle_keys.sort();
            let excess = map.len() - DESTINATIONS_MAX;
            for (_, k) in idle_keys.into_iter().take(excess) {
                map.remove(&k);
            }
        }
        before - map.len()
    }

    /// Jobs queued over all destinations, and the number of destinations (for the shard's counters).
    pub fn load(&self) -> (usize, usize) {
        let d = self.destinations.borrow();
        (d.values().map(|x| x.queue.borrow().len()).sum(), d.len())
    }

    /// The destination of a next hop (with a policy key), or of a site, without an egress source.
    fn destination(
        &self,
        hop: &Nexthop,
        policy: Option<&str>,
        site: Option<&Arc<Site>>,
    ) -> Rc<Destination> {
        if let Some(site) = site {
            if let Some(d) = self.destinations.borrow().get(&site.key) {
                return d.clone();
            }
        }
        let key = match site {
            Some(site) => site.key.clone(),
            None => destination_key(hop, policy),
        };
        self.destination_with(key, hop, policy, site, None)
    }

    /// Egress suspensions so far (for `/metrics`).
    pub fn egress_suspensions(&self) -> u64 {
        self.egress
            .borrow()
            .as_ref()
            .map_or(0, |e| e.suspensions.get())
    }

    /// Egress: the destination for `job` through a source of its pool, chosen now (the key is the next hop's
    /// with ` via <source>`: each source has its own connections and rate); without sources or a pool, the
    /// plain destination. `Err`: the deferral reply when no source of the pool can take the job (all
    /// suspended, or all at their warm-up cap for the site today).
    fn egress_destination(&self, job: &mut Job) -> Result<Rc<Destination>, String> {
        let egress = self.egress.borrow().clone();
        let chosen = egress
            .filter(|_| !matches!(job.nexthop, Nexthop::Local))
            .and_then(|e| e.pool_of(job.egress_pool.as_deref()).map(|p| (e, p)));
        let Some((e, pool)) = chosen else {
            return Ok(self.destination(&job.nexthop, job.policy.as_deref(), job.site.as_ref()));
        };
        let base = match &job.site {
            Some(site) => site.key.clone(),
            None => destination_key(&job.nexthop, job.policy.as_deref()),
        };
        let site = warmup_site(&base);
        let day = crate::egress::today();
        let i = e
            .choose(pool, site, Instant::now(), day)
            .map_err(|n| n.reply(e.pool_name(pool), site))?;
        job.warmup_counted = Some((i, day));
        let src = e.source(i).cloned();
        let key = format!(
            "{base} via {}",
            src.as_ref().map_or("", |s| s.name.as_str())
        );
        Ok(self.destination_with(
            key,
            &job.nexthop,
            job.policy.as_deref(),
            job.site.as_ref(),
            src,
        ))
    }

    fn destination_with(
        &self,
        key: String,
        hop: &Nexthop,
        policy: Option<&str>,
        site: Option<&Arc<Site>>,
        source: Option<Rc<crate::egress::Source>>,
    ) -> Rc<Destination> {
        if let Some(d) = self.destinations.borrow().get(&key) {
            return d.clone();
        }
        let (tls_level, interval, relayhost) = self.destination_policy(hop, policy, site.is_some());
        let d = Rc::new(Destination {
            key: key.clone(),
            hop: hop.clone(),
            queue: RefCell::new(VecDeque::new()),
            active: Cell::new(0),
            waiters: RefCell::new(Vec::new()),
            last_used: Cell::new(Instant::now()),
            backoff_until: Cell::new(None),
            backoff_reason: RefCell::new(String::new()),
            failures: Cell::new(0),
            policy: policy.map(str::to_string),
            window: RefCell::new(ConcurrencyWindow::new(
                self.cfg().delivery.initial_destination_concurrency,
            )),
            interval: Cell::new(interval),
            next_start: Cell::new(Instant::now()),
            tls_level: Cell::new(tls_level),
            relayhost: Cell::new(relayhost),
            source: RefCell::new(source),
            shaped: RefCell::new(Rc::new(crate::shaping::Applied {
                site: String::new(),
                matched: None,
                limits: Default::default(),
                origins: Default::default(),
            })),
            mx_hosts: RefCell::new(site.map(|s| s.mx_hosts.clone()).unwrap_or_default()),
            conn_interval: Cell::new(Duration::ZERO),
            next_connect: Cell::new(Instant::now()),
        });
        self.shape(&d);
        self.destinations.borrow_mut().insert(key, d.clone());
        d
    }

    /// Takes a job for a destination this shard owns. A destination that already holds
    /// `DESTINATION_JOBS_QUEUED_MAX` jobs hands the new one back at once as postponed (not attempted; the
    /// accepting shard offers it again a second later) instead of making its sender wait: waiting would hold up
    /// every other destination's jobs behind it in the same courier and mesh channel.
    ///
    /// An MX-routed job without a site yet is first given its domain's site (looked up once per
    /// `SITE_REMEMBER_FOR`; jobs arriving meanwhile wait with the lookup) and goes to the site's owner.
    pub fn enqueue(self: &Rc<Self>, mut job: Job) {
        if job.site.is_none() && self.groups_by_site(&job) {
            let Nexthop::Mx { domain, .. } = &job.nexthop else {
                return self.enqueue_here(job);
            };
            let known = self
                .sites
                .borrow()
                .get(domain.as_str())
                .filter(|(_, until)| *until > Instant::now())
                .map(|(site, _)| site.clone());
            match known {
                Some(site) => job.site = site,
                None => return self.look_up_site(job),
            }
        }
        if let Some(site) = &job.site {
            let owner = owner_of_site(&site.key, self.shards);
            if owner != self.shard {
                self.jobs.push(owner, job);
                return;
            }
        }
        self.enqueue_here(job)
    }

    /// Whether a job's destination is its domain's site: MX-routed, and neither the domain nor the next hop has
    /// a policy entry of its own (those keep their own destination, limits and TLS level).
    fn groups_by_site(&self, job: &Job) -> bool {
        if job.policy.is_some() || !matches!(job.nexthop, Nexthop::Mx { .. }) {
            return false;
        }
        let cfg = self.cfg.borrow();
        if cfg.smtp_tls_policy.is_empty() && cfg.destination_rate_limit.is_empty() {
            return true;
        }
        !job.nexthop.policy_names().iter().any(|n| {
            cfg.smtp_tls_policy.contains_key(n) || cfg.destination_rate_limit.contains_key(n)
        })
    }

    /// Queues a job until its domain's site is known, starting the lookup if none is under way.
    fn look_up_site(self: &Rc<Self>, job: Job) {
        let Nexthop::Mx { domain, port } = &job.nexthop else {
            return self.enqueue_here(job);
        };
        let (domain, port) = (domain.clone(), *port);
        let mut lookups = self.site_lookups.borrow_mut();
        if let Some(waiting) = lookups.get_mut(&domain) {
            if waiting.len() < DESTINATION_JOBS_QUEUED_MAX {
                waiting.push(job);
                return;
            }
            drop(lookups);
            // As many as a destination holds are waiting: this one is offered again later.
            return self.postpone(&job, "4.4.5 site lookup has too many messages waiting");
        }
        if lookups.len() >= SITE_LOOKUPS_MAX {
            drop(lookups);
            return self.enqueue_here(job);
        }
        lookups.insert(domain.clone(), vec![job]);
        drop(lookups);
        let agent = self.clone();
        glommio::spawn_local(async move {
            let site = match agent.resolver.resolve_mx(&domain).await {
                Ok(hosts) => agent.site_of(&domain, port, &hosts),
                Err(_) => None,
            };
            let until = Instant::now()
                + if site.is_some() {
                    SITE_REMEMBER_FOR
                } else {
                    SITE_LOOKUP_FAILED_REMEMBER_FOR
                };
            {
                let mut sites = agent.sites.borrow_mut();
                if sites.len() >= SITES_REMEMBERED_MAX {
                    let now = Instant::now();
                    sites.retain(|_, (_, u)| *u > now);
                    if sites.len() >= SITES_REMEMBERED_MAX {
                        sites.clear();
                    }
                }
                sites.insert(domain.clone(), (site.clone(), until));
            }
            let waiting = agent
                .site_lookups
                .borrow_mut()
                .remove(&domain)
                .unwrap_or_default();
            for mut job in waiting {
                match &site {
                    Some(s) => {
                        job.site = Some(s.clone());
                        agent.enqueue(job);
                    }
                    None => agent.enqueue_here(job),
                }
            }
        })
        .detach();
    }

    /// The site of `domain` whose MX hosts are `hosts`: named by the shaping rules (a provider, else the sorted
    /// MX host set); a domain with a shaping entry of its own gets a site of its own (its own limits), still
    /// under the provider's name for the automation.
    fn site_of(
        &self,
        domain: &str,
        port: u16,
        hosts: &[crate::dns::Destination],
    ) -> Option<Arc<Site>> {
        let mx_hosts: Vec<String> = hosts
            .iter()
            .map(|h| h.host.trim_end_matches('.').to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        if mx_hosts.is_empty() {
            return None;
        }
        let applied = self.shaping.lookup(domain, &mx_hosts, None);
        let own = self.shaping.has_domain_entry(domain).then_some(domain);
        Some(Arc::new(Site {
            key: site_key(&applied.site, port, own),
            mx_hosts,
        }))
    }

    /// Egress warm-up: a job counted against its source's cap that is not sent after all gives its count back.
    fn give_back_warmup(&self, job: &Job) {
        let (Some((i, day)), Some(e)) = (job.warmup_counted, self.egress.borrow().clone()) else {
            return;
        };
        let base = match &job.site {
            Some(site) => site.key.clone(),
            None => destination_key(&job.nexthop, job.policy.as_deref()),
        };
        e.uncount(i, warmup_site(&base), day);
    }

    /// Hands a job back unattempted (its accepting shard offers it again shortly): not an attempt, no log
    /// line, no attempt counted.
    fn postpone(&self, job: &Job, reply: &str) {
        self.give_back_warmup(job);
        let results = job
            .rcpts
            .iter()
            .map(|r| {
                (
                    r.index,
                    RcptResult::Postponed {
                        reply: reply.to_string(),
                    },
                )
            })
            .collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.report(job, results, None, now, false);
    }

    /// Queues a job on this shard's destination for it (its next hop's, or its site's).
    fn enqueue_here(self: &Rc<Self>, mut job: Job) {
        debug_assert!(job
            .site
            .as_deref()
            .is_none_or(|s| owner_of_site(&s.key, self.shards) == self.shard));
        let dest = match self.egress_destination(&mut job) {
            Ok(d) => d,
            Err(reply) => {
                self.finish_all(&job, RcptResult::Deferred { reply }, None);
                return;
            }
        };
        dest.last_used.set(Instant::now());
        if dest.queue.borrow().len() >= DESTINATION_JOBS_QUEUED_MAX {
            let reply = format!(
                "4.4.5 destination {} has {} messages waiting",
                dest.key, DESTINATION_JOBS_QUEUED_MAX
            );
            self.postpone(&job, &reply);
            return;
        }
        if let Some(reason) = dest.backing_off() {
            self.finish_all(&job, RcptResult::Deferred { reply: reason }, None);
            return;
        }
        if let Some(reason) = self.shaping_hold(&dest) {
            self.finish_all(&job, RcptResult::Deferred { reply: reason }, None);
            return;
        }
        dest.queue.borrow_mut().push_back(job);
        if let Some(w) = dest.waiters.borrow_mut().pop() {
            w.wake();
        }
        let active = dest.active.get();
        let queued = dest.queue.borrow().len();
        let allowed = dest.window.borrow().allowed(self.max_connections(&dest));
        if active < allowed && (active == 0 || queued > active) {
            dest.active.set(active + 1);
            let agent = self.clone();
            glommio::spawn_local(async move { agent.worker(dest).await }).detach();
        }
    }

    /// Next job, waiting up to `idle` for one.
    async fn next_job(&self, dest: &Destination, idle: Duration) -> Option<Job> {
        if let Some(j) = dest.take_job() {
            return Some(j);
        }
        if idle.is_zero() {
            return None;
        }
        let wait = futures_lite::future::poll_fn(|cx| {
            if let Some(j) = dest.take_job() {
                return Poll::Ready(Some(j));
            }
            let mut w = dest.waiters.borrow_mut();
            if !w.iter().any(|x| x.will_wake(cx.waker())) {
                w.push(cx.waker().clone());
            }
            Poll::Pending
        });
        futures_lite::future::or(wait, async {
            glommio::timer::sleep(idle).await;
            None
        })
        .await
    }

    async fn worker(self: Rc<Self>, dest: Rc<Destination>) {
        let mut conn: Option<Connection> = None;
        // The next hop the connection was opened for, and the MTA-STS policy it was opened under.
        let mut opened_for: Option<(Nexthop, Option<Rc<StsPolicy>>)> = None;
        // [cluster]: the shared lease of `conn`, dropped (released) after its QUIT.
        let mut lease: Option<crate::cluster::Lease> = None;
        let idle = self.cfg().delivery.smtp_connection_cache_time_limit.0;
        while let Some(job) = self
            .next_job(&dest, if conn.is_some() { idle } else { Duration::ZERO })
            .await
        {
            if let Some(reason) = dest.backing_off() {
                self.finish_all(&job, RcptResult::Deferred { reply: reason }, None);
                continue;
            }
            // A site's connection carries the next domain's transaction when that domain's TLS policy is met by
            // it; otherwise a connection is opened for that domain.
            if let (Some(c), Some((hop, sts))) = (conn.as_ref(), opened_for.as_ref()) {
                if *hop != job.nexthop && !self.connection_fits(&dest, &job, c, sts.as_ref()).await
                {
                    if let Some(c) = conn.take() {
                        c.quit().await;
                    }
                    // [cluster]: the closed connection's lease goes back before another is asked for.
                    lease = None;
                }
            }
            if let Some(reason) = self.shaping_hold(&dest) {
                self.finish_all(&job, RcptResult::Deferred { reply: reason }, None);
                continue;
            }
            if conn.is_none() {
                // Shaping's connection rate: wait for this destination's next slot.
                let ci = dest.conn_interval.get();
                if !ci.is_zero() {
                    let now = Instant::now();
                    let start = dest.next_connect.get().max(now);
                    dest.next_connect.set(start + ci);
                    if start > now {
                        glommio::timer::sleep(start - now).await;
                    }
                }
                // [cluster] begin: a connection needs a shared lease; refused, the job goes back to the head of
                // the queue and this worker asks again after the retry interval (or ends if another took it).
                if let Some(cl) = &self.cluster {
                    let limit = self.max_connections(&dest);
                    match cl.acquire_connection(&dest.key, limit).await {
                        Some(l) => lease = Some(l),
                        None => {
                            dest.queue.borrow_mut().push_front(job);
                            glommio::timer::sleep(cl.retry_interval()).await;
                            continue;
                        }
                    }
                }
                // [cluster] end
                match self.connect(&dest, &job).await {
                    Ok((c, sts)) => {
                        // The MX hosts just resolved may put the destination in a suspended site (shaping).
                        if let Some(reason) = self.shaping_hold(&dest) {
                            c.quit().await;
                            lease = None;
                            self.finish_all(&job, RcptResult::Deferred { reply: reason }, None);
                            continue;
                        }
                        conn = Some(c);
                        opened_for = Some((job.nexthop.clone(), sts));
                    }
                    Err(_) if self.source_lost(&dest) => {
                        lease = None;
                        // Egress: this source cannot bind (suspended now): its jobs go through another source
                        // of their pool, or are deferred naming the pool.
                        let mut jobs = vec![job];
                        jobs.extend(dest.queue.borrow_mut().drain(..));
                        for mut j in jobs {
                            self.give_back_warmup(&j);
                            j.warmup_counted = None;
                            self.enqueue(j);
                        }
                        continue;
                    }
                    Err((t, policy)) if t.is_permanent() => {
                        lease = None;
                        self.finish_all(&job, t.rcpt_result(), policy);
                        continue;
                    }
                    Err((t, policy)) => {
                        lease = None;
                        // Every host failed (or the lookup did): the destination backs off.
                        let reason = t.diag.to_string();
                        self.observe_replies(&dest, std::iter::once(reason.as_str()));
                        self.note_failure(&dest, &reason);
                        self.finish_all(&job, RcptResult::Deferred { reply: reason }, policy);
                        continue;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            // Message rate limit: wait for this destination's next slot (an automation action may lower it).
            let mut interval = dest.interval.get();
            if let Some(r) = self.shaping_effect(&dest).and_then(|e| e.max_message_rate) {
                interval = interval.max(Duration::from_secs_f64(1.0 / r.max(1.0 / 86_400.0)));
            }
            // [cluster]: the shared rate (GCRA in Redis) instead of the local interval.
            if let (false, Some(cl)) = (interval.is_zero(), &self.cluster) {
                let wait = cl
                    .message_slot(&dest.key, 1.0 / interval.as_secs_f64())
                    .await;
                if !wait.is_zero() {
                    glommio::timer::sleep(wait).await;
                }
            } else if !interval.is_zero() {
                let now = Instant::now();
                let start = dest.next_start.get().max(now);
                dest.next_start.set(start + interval);
                if start > now {
                    glommio::timer::sleep(start - now).await;
                }
            }
            let per_transaction = dest
                .shaped
                .borrow()
                .limits
                .max_recipients_per_transaction
                .unwrap_or(self.cfg().delivery.destination_recipient_limit);
            let reuse_limit = dest
                .shaped
                .borrow()
                .limits
                .max_messages_per_connection
                .unwrap_or(self.cfg().delivery.smtp_connection_reuse_count_limit);
            // Pipelined transactions: when every connection the destination may have is busy, jobs waiting now
            // for the same next hop ride behind this one on this connection instead of waiting for a free one
            // (no message rate to keep, one transaction each, within the reuse limit and
            // `SMTP_PIPELINED_BYTES_MAX` of content held at once).
            let mut batch = vec![job];
            let all_busy =
                dest.active.get() >= dest.window.borrow().allowed(self.max_connections(&dest));
            if all_busy && interval.is_zero() && batch[0].rcpts.len() <= per_transaction {
                let room = c
                    .transactions_at_once()
                    .min(reuse_limit.saturating_sub(c.messages) as usize);
                let mut bytes = 0;
                while batch.len() < room {
                    let Some(next) = dest.take_job() else { break };
                    let fits = next.nexthop == batch[0].nexthop
                        && next.rcpts.len() <= per_transaction
                        && bytes + next.body.size() <= crate::limits::SMTP_PIPELINED_BYTES_MAX
                        && dest.backing_off().is_none();
                    if !fits {
                        dest.queue.borrow_mut().push_front(next);
                        break;
                    }
                    bytes += next.body.size();
                    batch.push(next);
                }
            }
            // Per job: its results, whether its failure was in the content's transfer, and whether what ended
            // the session cut it short.
            struct Settled {
                results: Vec<(u32, RcptResult)>,
                failed_in_data: bool,
                cut_short: bool,
            }
            let mut settled: Vec<Settled> = Vec::with_capacity(batch.len());
            let mut reusable = true;
            if batch.len() > 1 {
                let msgs: Vec<OutboundMessage<'_>> = batch
                    .iter()
                    .map(|j| outbound_message(j, &j.rcpts))
                    .collect();
                let (outcomes, ok) = c.send_all(&msgs).await;
                reusable = ok;
                for (j, o) in batch.iter().zip(outcomes) {
                    let results = j.rcpts.iter().map(|r| r.index).zip(o.results).collect();
                    settled.push(Settled {
                        results,
                        failed_in_data: o.failed_in_data,
                        cut_short: o.cut_short,
                    });
                }
            } else {
                let job = &batch[0];
                let mut results = Vec::with_capacity(job.rcpts.len());
                let mut failed_in_data = false;
                for chunk in job.rcpts.chunks(per_transaction) {
                    if !reusable {
                        results.extend(chunk.iter().map(|r| {
                            (
                                r.index,
                                RcptResult::Deferred {
                                    reply: "4.4.2 connection closed during delivery".into(),
                                },
                            )
                        }));
                        continue;
                    }
                    let (mut outcomes, ok) = c.send_all(&[outbound_message(job, chunk)]).await;
                    reusable = ok;
                    let o = outcomes.pop().unwrap_or_else(|| TransactionOutcome {
                        results: Vec::new(),
                        failed_in_data: false,
                        cut_short: false,
                    });
                    failed_in_data = o.failed_in_data;
                    results.extend(chunk.iter().map(|r| r.index).zip(o.results));
                }
                settled.push(Settled {
                    results,
                    failed_in_data,
                    cut_short: !reusable,
                });
            }
            // A session's end backs the destination off once per batch, not once per message it cut short.
            let mut backed_off = false;
            for (
                job,
                Settled {
                    results,
                    failed_in_data,
                    cut_short,
                },
            ) in batch.iter().zip(settled)
            {
                let any_temp = results
                    .iter()
                    .any(|(_, r)| matches!(r, RcptResult::Deferred { .. }));
                let all_temp = results
                    .iter()
                    .all(|(_, r)| matches!(r, RcptResult::Deferred { .. }));
                if failed_in_data {
                    // The receiver dropped this message's transfer: the message is deferred, the destination is
                    // not (other messages go on over a new connection).
                } else if all_temp && any_temp {
                    let reply = results
                        .first()
                        .map(|(_, r)| r.reply().to_string())
                        .unwrap_or_default();
                    // A session or site trouble (a 421, a lost connection) that cut this message short backs the
                    // destination off at once; a message or recipient one (4xx to MAIL, RCPT or DATA, a message
                    // finished before the session ended) only after several in a row.
                    if cut_short {
                        if !backed_off {
                            self.note_failure(&dest, &reply);
                            backed_off = true;
                        }
                    } else {
                        self.note_failure_soft(&dest, &reply);
                    }
                } else {
                    dest.failures.set(0);
                    let limit = self.max_connections(&dest);
                    dest.window.borrow_mut().success(limit);
                }
                self.observe_replies(&dest, results.iter().map(|(_, r)| r.reply()));
                let remote = Some(format!("{} [{}]", c.host, c.addr.ip()));
                self.finish_with_conn(job, results, c, remote);
            }
            if !reusable || c.messages >= reuse_limit {
                if let Some(c) = conn.take() {
                    if reusable {
                        c.quit().await;
                    }
                }
                lease = None;
            }
            // A lowered limit (an automation action, a shrunk window) retires the workers beyond it; at least one
            // stays (allowed >= 1), so the queue is never left without one.
            if dest.active.get() > dest.window.borrow().allowed(self.max_connections(&dest)) {
                break;
            }
        }
        if let Some(c) = conn.take() {
            c.quit().await;
        }
        drop(lease);
        dest.active.set(dest.active.get() - 1);
        // A job that arrived while this worker was leaving is not stranded.
        if dest.active.get() == 0 && !dest.queue.borrow().is_empty() {
            dest.active.set(1);
            let agent = self.clone();
            glommio::spawn_local(async move { agent.worker(dest).await }).detach();
        }
    }

    /// A hard failure (421, a lost connection, every host down): the destination backs off.
    fn note_failure(&self, dest: &Destination, reason: &str) {
        dest.failures.set(0);
        dest.window.borrow_mut().hard_failure();
        dest.backoff_until.set(Some(
            Instant::now() + self.cfg().delivery.destination_backoff_time.0,
        ));
        *dest.backoff_reason.borrow_mut() = reason.to_string();
        // Everything queued for it is deferred now rather than tried against a dead destination.
        let queued: Vec<Job> = dest.queue.borrow_mut().drain(..).collect();
        for job in queued {
            let r = format!("4.4.1 destination {} backing off: {reason}", dest.key);
            self.finish_all(&job, RcptResult::Deferred { reply: r.clone() }, None);
        }
    }

    /// A 4xx to a whole transaction: backs off after `DESTINATION_FAILURES_CONSECUTIVE_MAX` in a row.
    fn note_failure_soft(&self, dest: &Destination, reason: &str) {
        dest.failures.set(dest.failures.get() + 1);
        dest.window.borrow_mut().soft_failure();
        if dest.failures.get() >= DESTINATION_FAILURES_CONSECUTIVE_MAX {
            self.note_failure(dest, reason);
        }
    }

    /// Connects to the first usable host of the destination. `Err`: the trouble of the last host (or of the
    /// lookup), and the TLS policy that applied to it, for the log.
    /// Whether a connection a site's worker opened for another of the site's domains may carry `job`: the
    /// connection's host is one of the job's domain's MX hosts, and the job's domain has no MTA-STS policy, or the connection is under DANE (the host's own policy, whatever the
    /// domain), or it was opened under an MTA-STS policy of the same mode and MX patterns. The TLS level is the
    /// destination's, the same for every domain of the site.
    async fn connection_fits(
        &self,
        dest: &Destination,
        job: &Job,
        c: &Connection,
        opened_under: Option<&Rc<StsPolicy>>,
    ) -> bool {
        let (Nexthop::Mx { domain, .. }, Some(site)) = (&job.nexthop, &job.site) else {
            return false;
        };
        // Only to one of the job's own domain's MX hosts: a provider's site joins several MX sets (regional
        // or tenant hosts), which share limits, not connections. DANE and a broken STARTTLS are per host, so the
        // same host means the same for them.
        let host = c.host.trim_end_matches('.');
        if !site.mx_hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
            return false;
        }
        let sts_state = self.sts.borrow().clone();
        if dest.relayhost.get()
            || !sts_state.enabled()
            || matches!(dest.tls_level.get(), TlsLevel::None | TlsLevel::Verify)
        {
            return true;
        }
        match (sts_state.policy(domain).await, opened_under) {
            (None, _) => true,
            (Some(_), _) if c.tls_policy.starts_with("dane") => true,
            (Some(p), Some(q)) => p.mode == q.mode && p.mx == q.mx,
            (Some(_), None) => false,
        }
    }

    /// Connects to the first usable host of the job's next hop (for a site: the job's domain, whose MX hosts
    /// are the site's), with the MTA-STS policy it was opened under.
    async fn connect(
        &self,
        dest: &Destination,
        job: &Job,
    ) -> Result<(Connection, Option<Rc<StsPolicy>>), (Trouble, Option<PolicyApplied>)> {
        let dns_err = |e: &crate::dns::DnsError| (Trouble::dns(e), None);
        let sts_state = self.sts.borrow().clone();
        // (host, addresses, DNSSEC-validated path to the host, the host's CNAME expansion)
        let (targets, port, sts) = match &job.nexthop {
            Nexthop::Host { host, port } => {
                let (addrs, expanded) = match host.parse::<IpAddr>() {
                    Ok(ip) => (
                        crate::dns::Secured {
                            value: vec![ip],
                            authentic: false,
                        },
                        None,
                    ),
                    Err(_) => self
                        .resolver
                        .lookup_ip_expanded(host)
                        .await
                        .map_err(|e| dns_err(&e))?,
                };
                (
                    vec![(host.clone(), addrs.value, addrs.authentic, expanded)],
                    *port,
                    None,
                )
            }
            Nexthop::Mx { domain, port } => {
                let dests = self
                    .resolver
                    .resolve_mx(domain)
                    .await
                    .map_err(|e| dns_err(&e))?;
                self.shape_with_mx(dest, &dests);
                // MTA-STS: MX-routed recipient domains only, never the relayhost.
                let sts = if dest.relayhost.get()
                    || !sts_state.enabled()
                    || matches!(dest.tls_level.get(), TlsLevel::None | TlsLevel::Verify)
                {
                    None
                } else {
                    sts_state.policy(domain).await
                };
                (
                    dests
                        .into_iter()
                        .map(|d| {
                            (
                                d.host,
                                d.addrs,
                                d.mx_authentic && d.addr_authentic,
                                d.expanded,
                            )
                        })
                        .collect(),
                    *port,
                    sts,
                )
            }
            Nexthop::Local => {
                return Err((
                    Trouble::local(
                        Scope::Site,
                        false,
                        crate::smtp::reply_parser::EnhancedCode::new(4, 3, 0),
                        "local delivery is not available yet".into(),
                    ),
                    None,
                ));
            }
        };
        let cfg = self.cfg();
        let d = &cfg.delivery;
        let relayhost = dest.relayhost.get();
        let sasl = (relayhost && !d.smtp_sasl_username.is_empty())
            .then_some((d.smtp_sasl_username.as_str(), d.smtp_sasl_password.as_str()));
        let mut last = Trouble::connect("no address to connect to");
        let mut last_policy = None;
        for (host, addrs, validated, expanded) in &targets {
            let security = match super::secure::for_host(
                &self.resolver,
                cfg.dns.dnssec,
                &sts_state,
                super::secure::Target {
                    host,
                    port,
                    validated: *validated,
                    level: dest.tls_level.get(),
                    expanded: expanded.as_deref(),
                },
                sts.as_deref(),
            )
            .await
            {
                Ok(s) => s,
                Err((policy, t)) => {
                    // The policy forbids this host: nothing is sent to it.
                    tracing::info!(target: crate::eventlog::SMTP, "{}: {host}: not used: {}", dest.key, t.diag.text);
                    last = t;
                    last_policy = Some(policy);
                    continue;
                }
            };
            last_policy = Some(PolicyApplied::new(security.label, None));
            // (A copy: a reload may replace the destination's source while this connects.)
            let source = dest.source.borrow().clone();
            for ip in addrs {
                // MTA-STS testing records what this address's handshake finds, not an earlier address's.
                let security = security.for_next_address(&sts_state);
                let addr = SocketAddr::new(*ip, port);
                let broken = self
                    .tls_broken
                    .borrow()
                    .get(&addr)
                    .is_some_and(|t| t.elapsed() < TLS_BROKEN_REMEMBER_FOR);
                let level = if broken && security.level == TlsLevel::May {
                    TlsLevel::None
                } else {
                    security.level
                };
                let params = ConnectParams {
                    helo: source.as_ref().map_or(&cfg.myhostname, |s| &s.ehlo),
                    tls_level: level,
                    tls: &self.tls,
                    sasl,
                    wrapper: relayhost && d.smtp_tls_wrappermode,
                    timeouts: d.client_timeouts(),
                    transactions_at_once: d.smtp_transaction_pipelining_limit,
                    tls_config: security.config.clone(),
                    tls_policy: security.label,
                    source: source.as_ref(),
                };
                self.connections_opened
                    .set(self.connections_opened.get() + 1);
                match Connection::open(host, addr, &params).await {
                    Ok(mut c) => {
                        c.tls_note = security.would_fail(c.tls.is_some());
                        if let Some(n) = &c.tls_note {
                            tracing::warn!(target: crate::eventlog::SMTP, "{}: MTA-STS testing: enforce would refuse {host}[{ip}]: {n}", dest.key);
                        }
                        return Ok((c, sts));
                    }
                    Err(HostError::TlsFailed(tls_trouble, _)) if level == TlsLevel::May => {
                        // Opportunistic TLS: a broken receiver must not block mail. Retry this host in plaintext.
                        self.remember_tls_broken(addr, Instant::now());
                        let plain = ConnectParams {
                            tls_level: TlsLevel::None,
                            ..params
                        };
                        match Connection::open(host, addr, &plain).await {
                            Ok(mut c) => {
                                c.tls_note = security.would_fail(false);
                                return Ok((c, sts));
                            }
                            Err(e2) => {
                                last = e2.trouble().clone();
                                last.diag.text = format!(
                                    "{} (after TLS failure: {})",
                                    last.diag.text, tls_trouble.diag.text
                                );
                            }
                        }
                    }
                    Err(HostError::SourceUnusable(t)) => {
                        // Egress: no host can be reached from this source: suspend it (the worker hands the
                        // job to another source of the pool).
                        self.suspend_source(dest, &t.diag.text);
                        return Err((t, None));
                    }
                    Err(e) => {
                        last_policy = Some(PolicyApplied::new(security.label, e.tls_result()));
                        last = e.trouble().clone();
                        last.diag.text = format!("{} (host {host}[{ip}])", last.diag.text);
                    }
                }
            }
        }
        // Whatever the last host said, the destination as a whole is only deferred.
        last.severity = super::trouble::Severity::Temporary;
        Err((last, last_policy))
    }

    /// Egress: suspends `dest`'s source (it cannot bind), once; logged and counted by [`crate::egress`].
    fn suspend_source(&self, dest: &Destination, why: &str) {
        let (Some(src), Some(e)) = (dest.source.borrow().clone(), self.egress.borrow().clone())
        else {
            return;
        };
        if let Some(i) = e.index_of(&src.name) {
            e.suspend(i, Instant::now(), why);
        }
    }

    /// Egress: whether `dest`'s source is suspended (its jobs must move to another source).
    fn source_lost(&self, dest: &Destination) -> bool {
        let (Some(src), Some(e)) = (dest.source.borrow().clone(), self.egress.borrow().clone())
        else {
            return false;
        };
        e.index_of(&src.name)
            .is_some_and(|i| e.is_suspended(i, Instant::now()))
    }

    fn finish_with_conn(
        &self,
        job: &Job,
        results: Vec<(u32, RcptResult)>,
        c: &Connection,
        remote: Option<String>,
    ) {
        let at = self.log.record_job(
            job,
            &results,
            &job.nexthop.key(),
            &AttemptedHost {
                host: Some(&c.host),
                ip: Some(c.addr.ip()),
                tls: c.tls.as_deref(),
                tls_policy: Some(c.tls_policy),
                tls_policy_failure: c.tls_note.as_deref(),
                source: c.source.as_ref().map(|s| s.name.as_str()),
                // MTA-STS testing records what would have failed (the mail went anyway): a validation failure.
                tls_result: tls_rpt::policy_type(c.tls_policy).map(|_| {
                    if c.tls_note.is_some() {
                        TlsResult::ValidationFailure.name()
                    } else {
                        TlsResult::Success.name()
                    }
                }),
            },
        );
        self.report(job, results, remote, at, c.caps.dsn);
    }

    /// Reports the same result for every recipient of a job that never reached a server; `policy`: the TLS
    /// policy the attempt was under, when a host was chosen, and its TLS-RPT result (the log names them).
    fn finish_all(&self, job: &Job, result: RcptResult, policy: Option<PolicyApplied>) {
        self.give_back_warmup(job);
        let results: Vec<(u32, RcptResult)> = job
            .rcpts
            .iter()
            .map(|r| (r.index, result.clone()))
            .collect();
        let at = self.log.record_job(
            job,
            &results,
            &job.nexthop.key(),
            &AttemptedHost {
                tls_policy: policy.map(|p| p.label),
                tls_result: policy.and_then(|p| p.result).map(TlsResult::name),
                ..Default::default()
            },
        );
        self.report(job, results, None, at, false);
    }

    /// Sends a job's results back to its accepting shard (through the outcome outbox); `at`: when they were
    /// decided (and logged); `next_hop_dsn`: whether the next hop offered DSN (and got the job's DSN
    /// parameters).
    fn report(
        &self,
        job: &Job,
        results: Vec<(u32, RcptResult)>,
        remote: Option<String>,
        at: u64,
        next_hop_dsn: bool,
    ) {
        self.tally.borrow_mut().count(&job.nexthop, &results);
        let retry = self.shaped_retry(
            &job.nexthop,
            job.policy.as_deref(),
            job.site.as_ref(),
            &results,
        );
        self.outcomes.push(
            job.origin_shard,
            Outcome {
                id: job.id,
                results,
                remote,
                attempted_unix_ms: at,
                next_hop_dsn,
                retry,
            },
        );
    }
}

/// `rcpts` of `job` as one transaction.
fn outbound_message<'a>(job: &'a Job, rcpts: &'a [JobRcpt]) -> OutboundMessage<'a> {
    OutboundMessage {
        sender: &job.sender,
        rcpts,
        body: &job.body,
        eight_bit: job.eight_bit,
        smtputf8: job.smtputf8,
        ret: job.dsn_ret,
        envid: job.dsn_envid.as_deref(),
    }
}

/// A site's destination key: `site:<name>:<port>` (no next-hop key has that form), plus ` for <domain>` for a
/// domain with limits of its own.
pub fn site_key(name: &str, port: u16, own: Option<&str>) -> String {
    match own {
        Some(d) => format!("site:{name}:{port} for {d}"),
        None => format!("site:{name}:{port}"),
    }
}

#[cfg(test)]
mod site_tests {
    use super::*;

    #[test]
    fn a_site_is_named_by_the_shaping_rules() {
        let dir = tempfile::tempdir().unwrap();
        glommio::LocalExecutor::default().run(async {
            let a = super::bounds_tests::agent(dir.path());
            let dest = |h: &str| crate::dns::Destination {
                host: h.into(),
                preference: 10,
                addrs: vec![],
                mx_authentic: false,
                addr_authentic: false,
                expanded: None,
            };
            let s1 = a
                .site_of(
                    "a.example",
                    25,
                    &[dest("mx2.Example.test."), dest("mx1.example.test")],
                )
                .unwrap();
            let s2 = a
                .site_of(
                    "b.example",
                    25,
                    &[dest("mx1.example.test"), dest("MX2.example.test")],
                )
                .unwrap();
            assert_eq!(s1.key, "site:mx1.example.test,mx2.example.test:25");
            assert_eq!(s1.key, s2.key);
            assert_ne!(
                s1.key,
                a.site_of(
                    "a.example",
                    2525,
                    &[dest("mx1.example.test"), dest("mx2.example.test")]
                )
                .unwrap()
                .key
            );
            assert_eq!(a.site_of("a.example", 25, &[]), None);
            // Gmail and a Workspace domain: other MX hosts, one provider, one site.
            let g = a
                .site_of(
                    "gmail.com",
                    25,
                    &[
                        dest("gmail-smtp-in.l.google.com"),
                        dest("alt1.gmail-smtp-in.l.google.com"),
                    ],
                )
                .unwrap();
            let w = a
                .site_of(
                    "corp.example",
                    25,
                    &[dest("aspmx.l.google.com"), dest("alt1.aspmx.l.google.com")],
                )
                .unwrap();
            assert_eq!(g.key, "site:google:25");
            assert_eq!(g.key, w.key);
            assert_eq!(
                w.mx_hosts,
                ["aspmx.l.google.com", "alt1.aspmx.l.google.com"]
            );
            // A domain with an entry of its own in the shaping file: a site of its own, under the provider's name.
            a.set_shaping_rules(Arc::new(
                crate::shaping::Rules::from_text(
                    "[domain.\"corp.example\"]\nmax_connections = 2\n",
                    "test",
                )
                .unwrap(),
            ));
            let w = a
                .site_of("corp.example", 25, &[dest("aspmx.l.google.com")])
                .unwrap();
            assert_eq!(w.key, "site:google:25 for corp.example");
        });
    }

    #[test]
    fn the_window_starts_low_grows_with_success_and_shrinks_on_trouble() {
        let limit = 20;
        let mut w = ConcurrencyWindow::new(5);
        assert_eq!(w.allowed(limit), 5);
        assert_eq!(w.allowed(3), 3, "never above the limit");
        // About one more connection per window's worth of accepted transactions.
        for _ in 0..5 {
            w.success(limit);
        }
        assert_eq!(w.allowed(limit), 5, "not yet");
        for _ in 0..2 {
            w.success(limit);
        }
        assert_eq!(w.allowed(limit), 6);
        for _ in 0..10_000 {
            w.success(limit);
        }
        assert_eq!(w.allowed(limit), limit, "capped");
        w.hard_failure();
        assert_eq!(w.allowed(limit), 10);
        w.soft_failure();
        assert_eq!(w.allowed(limit), 9);
        for _ in 0..100 {
            w.hard_failure();
            w.soft_failure();
        }
        assert_eq!(w.allowed(limit), 1, "never below one");
        assert_eq!(ConcurrencyWindow::new(0).allowed(limit), 1);
    }
}

/// The "site" a warm-up cap counts against: the destination's key without its source, i.e. the site's key for
/// an MX-routed domain grouped into its site, else the next hop's (and policy key).
fn warmup_site(destination_key: &str) -> &str {
    destination_key
}

#[cfg(test)]
mod bounds_tests {
    use super::*;

    pub(super) fn agent(dir: &std::path::Path) -> Rc<Agent> {
        let cfg = Arc::new(Config::default());
        Agent::new(
            cfg.clone(),
            Rc::new(Router::new(&cfg)),
            MxResolver::new(cfg.dns.clone()),
            Rc::new(DeliveryLog::open(
                &dir.join("delivery.log"),
                crate::delivery::plan::Policy::from_config(&cfg),
            )),
            Outbox::new(),
            0,
            1,
            Outbox::new(),
        )
    }

    fn mx(i: usize) -> Nexthop {
        Nexthop::Mx {
            domain: format!("d{i}.example"),
            port: 25,
        }
    }

    #[test]
    fn idle_destinations_are_forgotten_and_busy_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        glommio::LocalExecutor::default().run(async {
            let a = agent(dir.path());
            let now = Instant::now();
            let old = now - DESTINATIONS_IDLE_EVICT_AFTER - Duration::from_secs(1);
            for i in 0..3 {
                a.destination(&mx(i), None, None).last_used.set(old);
            }
            // d1 backs off, d2 has a connection: both stay.
            a.destination(&mx(1), None, None)
                .backoff_until
                .set(Some(now + Duration::from_secs(60)));
            a.destination(&mx(2), None, None).active.set(1);
            a.destination(&mx(3), None, None); // fresh
            assert_eq!(a.evict_idle_destinations(now), 1);
            assert_eq!(a.load().1, 3);
            assert!(!a
                .destinations
                .borrow()
                .contains_key(&destination_key(&mx(0), None)));
            // Over the cap, the longest idle go first, whatever their age.
            for i in 10..10 + DESTINATIONS_MAX {
                a.destination(&mx(i), None, None);
            }
            a.evict_idle_destinations(Instant::now());
            assert_eq!(a.load().1, DESTINATIONS_MAX);
            assert!(a
                .destinations
                .borrow()
                .contains_key(&destination_key(&mx(2), None)));
        });
    }

    /// A reload gives known destinations their new TLS level and rate limit, and the relayhost's credentials
    /// still force encryption.
    #[test]
    fn a_reload_reaches_known_destinations() {
        let dir = tempfile::tempdir().unwrap();
        glommio::LocalExecutor::default().run(async {
            let a = agent(dir.path());
            let d = a.destination(&mx(1), None, None);
            assert_eq!(d.tls_level.get(), TlsLevel::May);
            assert!(d.interval.get().is_zero());
            let mut cfg = Config::default();
            cfg.smtp_tls_policy
                .insert("d1.example".into(), TlsLevel::Verify);
            cfg.destination_rate_limit
                .insert("d1.example".into(), "2/s".to_string().try_into().unwrap());
            cfg.relayhost = Some("[smart.example]:2525".parse().unwrap());
            cfg.delivery.smtp_sasl_username = "u".into();
            cfg.delivery.smtp_sasl_password = "p".into();
            a.router.replace(&cfg);
            a.reconfigure(&cfg);
            assert_eq!(d.tls_level.get(), TlsLevel::Verify);
            assert_eq!(d.interval.get(), Duration::from_millis(500));
            let smart = a.router.route("any.example");
            let s = a.destination(&smart, None, None);
            assert!(s.relayhost.get());
            // A site first created for d1's job keeps the defaults when a reload gives d1 an entry: d1's next
            // jobs leave the site (`groups_by_site`), the site's other domains are not held to d1's policy.
            let site = Arc::new(Site {
                key: "site:mx.d1.example:25".into(),
                mx_hosts: vec!["mx.d1.example".into()],
            });
            let sd = a.destination(&mx(1), None, Some(&site));
            assert_eq!(sd.tls_level.get(), TlsLevel::May, "not d1's verify");
            assert!(sd.interval.get().is_zero(), "not d1's rate");
            a.reconfigure(&cfg);
            assert_eq!(sd.tls_level.get(), TlsLevel::May);
            assert_eq!(s.tls_level.get(), TlsLevel::Encrypt);
            assert_eq!(a.cfg().delivery.smtp_sasl_username, "u");
        });
    }

    /// A destination holding its maximum of queued jobs hands the next one back at once, postponed (not an
    /// attempt), instead of making the courier wait; its queue stays at the bound.
    #[test]
    fn a_full_destination_defers_new_jobs_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("body");
        std::fs::write(&file, b"Received: x\r\nSubject: y\r\n\r\nz\r\n").unwrap();
        let map =
            Arc::new(unsafe { memmap2::Mmap::map(&std::fs::File::open(&file).unwrap()) }.unwrap());
        glommio::LocalExecutor::default().run(async {
            let mut cfg = Config::default();
            cfg.dns.servers = vec!["127.0.0.1:9".parse().unwrap()];
            // No worker starts: the queue only fills.
            cfg.delivery.destination_concurrency_limit = 0;
            let cfg = Arc::new(cfg);
            let outcomes: Rc<Outbox<Outcome>> = Outbox::new();
            let a = Agent::new(
                cfg.clone(),
                Rc::new(Router::new(&cfg)),
                MxResolver::new(cfg.dns.clone()),
                Rc::new(DeliveryLog::open(
                    &dir.path().join("delivery.log"),
                    crate::delivery::plan::Policy::from_config(&cfg),
                )),
                outcomes.clone(),
                0,
                1,
                Outbox::new(),
            );
            let job = |n: u64| Job {
                origin_shard: 1,
                id: crate::queue::QueueId::from_parts(1, 0, n as u32),
                sender: "s@example.org".into(),
                rcpts: vec![super::super::JobRcpt {
                    index: 0,
                    address: "r@d0.example".into(),
                    attempts: 0,
                    dsn: Default::default(),
                }],
                body: crate::queue::MessageBody {
                    map: map.clone(),
                    received: 0..13,
                    data: 13..map.len(),
                },
                smtputf8: false,
                eight_bit: false,
                arrival_unix_ms: 0,
                nexthop: mx(0),
                policy: None,
                dsn_ret: None,
                dsn_envid: None,
                site: Some(Arc::new(Site {
                    key: "site:mx.test:25".into(),
                    mx_hosts: vec!["mx.test".into()],
                })),
                egress_pool: None,
                warmup_counted: None,
            };
            for n in 0..DESTINATION_JOBS_QUEUED_MAX as u64 {
                a.enqueue(job(n));
            }
            assert!(outcomes.is_empty());
            a.enqueue(job(99_999));
            assert_eq!(outcomes.len(), 1);
            assert_eq!(a.load().0, DESTINATION_JOBS_QUEUED_MAX);
            outcomes.close();
            let (to, o) = outcomes.next().await.unwrap();
            assert_eq!(to, 1, "back to the accepting shard");
            assert!(matches!(&o.results[..], [(0, RcptResult::Postponed { reply })] if reply.starts_with("4.4.5 ")));
        });
    }

    /// Shaping: a rule's limits replace the `[delivery]` values for its destination (and a reload's new rules
    /// reach known destinations); an automation action lowers them and a suspension holds the site.
    #[test]
    fn shaping_limits_and_actions_apply_to_a_destination() {
        let dir = tempfile::tempdir().unwrap();
        glommio::LocalExecutor::default().run(async {
            let a = agent(dir.path());
            let d = a.destination(&mx(1), None, None);
            assert_eq!(a.max_connections(&d), 20, "destination_concurrency_limit");
            assert!(d.interval.get().is_zero());
            let rules = crate::shaping::Rules::from_text(
                "[domain.\"d1.example\"]\nmax_connections = 3\nmax_message_rate = \"4/s\"\nmax_connection_rate = \"2/s\"\nretry_interval = \"10m\"\n\n[[automation]]\nname = \"t\"\ncode = \"421\"\naction = \"lower\"\nmax_connections = 1\nduration = \"1h\"\n",
                "test",
            )
            .unwrap();
            let deferred = [(0, RcptResult::Deferred { reply: "451 4.3.0 later".into() })];
            assert_eq!(a.shaped_retry(&mx(1), None, None, &deferred), None, "no rule sets one");
            a.set_shaping_rules(Arc::new(rules));
            assert_eq!(d.shaped.borrow().site, "d1.example");
            // retry_interval replaces minimal_backoff_time; the maximum stays the configuration's.
            assert_eq!(
                a.shaped_retry(&mx(1), None, None, &deferred),
                Some((Duration::from_secs(600), Duration::from_secs(4000)))
            );
            let delivered = [(0, RcptResult::Delivered { reply: "250 ok".into() })];
            assert_eq!(a.shaped_retry(&mx(1), None, None, &delivered), None);
            assert_eq!(a.shaped_retry(&mx(2), None, None, &deferred), None, "another destination");
            assert_eq!(a.max_connections(&d), 3);
            assert_eq!(d.interval.get(), Duration::from_millis(250));
            assert_eq!(d.conn_interval.get(), Duration::from_millis(500));
            a.observe_replies(&d, ["421 4.7.0 slow down", "421 4.7.0 slow down"].into_iter());
            assert_eq!(a.automation.active_count(), 1, "one action for one distinct reply");
            assert_eq!(a.max_connections(&d), 1, "lowered");
            assert!(a.shaping_hold(&d).is_none());
            // Back to the built-in rules: the [delivery] values again.
            a.set_shaping_rules(Arc::new(crate::shaping::Rules::defaults()));
            assert!(d.interval.get().is_zero());
            let id = a.automation.actions()[0].id.clone();
            a.automation.cancel(&id);
            assert_eq!(a.max_connections(&d), 20);
        });
    }

    #[test]
    fn broken_tls_memory_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        glommio::LocalExecutor::default().run(async {
            let a = agent(dir.path());
            let t0 = Instant::now();
            for i in 0..TLS_BROKEN_HOSTS_MAX + 5 {
                let addr = SocketAddr::new([127, 0, (i >> 8) as u8, i as u8].into(), 25);
                a.remember_tls_broken(addr, t0 + Duration::from_millis(i as u64));
            }
            let m = a.tls_broken.borrow();
            assert_eq!(m.len(), TLS_BROKEN_HOSTS_MAX);
            // The oldest were dropped.
            assert!(!m.contains_key(&SocketAddr::new([127, 0, 0, 0].into(), 25)));
        });
    }
}
