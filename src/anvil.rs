//! Owns the per-client-address memory shared by every session on every shard (Postfix's anvil idea): failed
//! and malformed AUTH attempts, the delay that grows with them, and the lockout after too many. One guess per
//! session and a reconnect used to reset the delay; here the count follows the address (an IPv6 client by its
//! /64, which one machine usually holds whole), whatever session or shard it comes through.
//!
//! Bounds: at most [`limits::ANVIL_ENTRIES_MAX`] addresses are remembered; when full, entries whose window has passed are
//! dropped first, then the oldest. The clock is an argument, so the rules are testable without waiting.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::limits;

/// The key an address is counted under: an IPv4 address, or the /64 of an IPv6 one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum ClientKey {
    V4(u32),
    V6Net(u64),
}

fn key(ip: IpAddr) -> ClientKey {
    match ip {
        IpAddr::V4(v4) => ClientKey::V4(u32::from(v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => ClientKey::V4(u32::from(v4)),
            None => ClientKey::V6Net((u128::from(v6) >> 64) as u64),
        },
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    /// Failures since `since`.
    failures: u32,
    since: Instant,
    locked_until: Option<Instant>,
    /// Credential checks started and not finished yet (parallel sessions of the address).
    checking: u32,
}

/// AUTH failures per client address, shared by all shards (a mutex taken once per AUTH attempt).
#[derive(Debug)]
pub struct AuthGuard {
    entries: Mutex<HashMap<ClientKey, Entry>>,
    /// Failures within `window` that lock the address out.
    limit: u32,
    /// How long failures are remembered, and how long a lockout lasts.
    window: Duration,
    /// Delay per failure counted so far.
    delay_unit: Duration,
}

impl AuthGuard {
    pub fn new(limit: u32, window: Duration, delay_unit: Duration) -> AuthGuard {
        AuthGuard {
            entries: Mutex::new(HashMap::new()),
            limit: limit.max(1),
            window,
            delay_unit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ClientKey, Entry>> {
        // A panic while holding the lock cannot leave the map inconsistent (plain inserts and removes).
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Some(remaining)` while `ip` is locked out: AUTH is refused without looking at the credentials.
    pub fn locked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let map = self.lock();
        let until = map.get(&key(ip))?.locked_until?;
        (until > now).then(|| until - now)
    }

    /// Counts a failed or malformed AUTH from `ip`; returns how long to wait before answering it (the
    /// delay unit times the address's failures in the window, at most [`limits::ANVIL_DELAY_MAX`]). Reaching the limit
    /// locks the address out for the window.
    pub fn failure(&self, ip: IpAddr, now: Instant) -> Duration {
        let mut map = self.lock();
        if map.len() >= limits::ANVIL_ENTRIES_MAX && !map.contains_key(&key(ip)) {
            self.evict(&mut map, now);
        }
        let e = self.entry(&mut map, ip, now);
        e.failures = e.failures.saturating_add(1);
        if e.failures >= self.limit && e.locked_until.is_none_or(|u| u <= now) {
            e.locked_until = Some(now + self.window);
        }
        self.delay_unit
            .saturating_mul(e.failures)
            .min(limits::ANVIL_DELAY_MAX)
    }

    /// The address's entry, created if needed and started over when its window and lockout have passed.
    fn entry<'m>(
        &self,
        map: &'m mut HashMap<ClientKey, Entry>,
        ip: IpAddr,
        now: Instant,
    ) -> &'m mut Entry {
        let e = map.entry(key(ip)).or_insert(Entry {
            failures: 0,
            since: now,
            locked_until: None,
            checking: 0,
        });
        if now.saturating_duration_since(e.since) > self.window
            && e.locked_until.is_none_or(|u| u <= now)
        {
            *e = Entry {
                failures: 0,
                since: now,
                locked_until: None,
                checking: e.checking,
            };
        }
        e
    }

    /// Starts checking credentials from `ip`. `Err(remaining)` while the address is locked out, and also
    /// while the checks already running for it could reach the limit: guesses sent at once on parallel
    /// sessions are counted before their outcome is known, so no more than the limit are ever checked in a
    /// window. Every `Ok` must be followed by [`AuthGuard::check_done`].
    pub fn begin_check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        if let Some(left) = self.locked(ip, now) {
            return Err(left);
        }
        let mut map = self.lock();
        if map.len() >= limits::ANVIL_ENTRIES_MAX && !map.contains_key(&key(ip)) {
            self.evict(&mut map, now);
        }
        let limit = self.limit;
        let e = self.entry(&mut map, ip, now);
        if e.failures.saturating_add(e.checking) >= limit {
            return Err(Duration::ZERO);
        }
        e.checking += 1;
        Ok(())
    }

    /// Ends a check started by [`AuthGuard::begin_check`]; a failed one is counted as [`AuthGuard::failure`]
    /// counts it, and its delay returned.
    pub fn check_done(&self, ip: IpAddr, verified: bool, now: Instant) -> Duration {
        if let Some(e) = self.lock().get_mut(&key(ip)) {
            e.checking = e.checking.saturating_sub(1);
        }
        if verified {
            Duration::ZERO
        } else {
            self.failure(ip, now)
        }
    }

    /// Drops entries whose window and lockout have passed; if none, the oldest tenth.
    fn evict(&self, map: &mut HashMap<ClientKey, Entry>, now: Instant) {
        let window = self.window;
        map.retain(|_, e| {
            now.saturating_duration_since(e.since) <= window
                || e.locked_until.is_some_and(|u| u > now)
                || e.checking > 0
        });
        if map.len() >= limits::ANVIL_ENTRIES_MAX {
            let mut ages: Vec<(Instant, ClientKey)> =
                map.iter().map(|(k, e)| (e.since, *k)).collect();
            ages.sort_unstable_by_key(|(t, _)| *t);
            for (_, k) in ages.into_iter().take(limits::ANVIL_ENTRIES_MAX / 10) {
                map.remove(&k);
            }
        }
    }

    /// Addresses remembered now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_grows_per_address_and_locks_out() {
        let g = AuthGuard::new(3, Duration::from_secs(600), Duration::from_secs(1));
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(g.failure(a, t0), Duration::from_secs(1));
        assert_eq!(g.failure(a, t0), Duration::from_secs(2));
        assert!(g.locked(a, t0).is_none());
        assert_eq!(g.failure(b, t0), Duration::from_secs(1), "per address");
        assert_eq!(g.failure(a, t0), Duration::from_secs(3));
        assert_eq!(g.locked(a, t0), Some(Duration::from_secs(600)));
        assert!(g.locked(b, t0).is_none());
        // The lockout ends with its time; then the count starts over.
        let later = t0 + Duration::from_secs(601);
        assert!(g.locked(a, later).is_none());
        assert_eq!(g.failure(a, later), Duration::from_secs(1));
    }

    /// Guesses sent at once on parallel sessions: no more than the limit are checked.
    #[test]
    fn parallel_checks_count_before_their_outcome() {
        let g = AuthGuard::new(3, Duration::from_secs(600), Duration::ZERO);
        let t = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let started = (0..10).filter(|_| g.begin_check(a, t).is_ok()).count();
        assert_eq!(started, 3);
        for _ in 0..3 {
            g.check_done(a, false, t);
        }
        assert!(g.locked(a, t).is_some());
        // A success frees its place without counting.
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..5 {
            assert!(g.begin_check(b, t).is_ok());
            g.check_done(b, true, t);
        }
        assert!(g.locked(b, t).is_none());
    }

    #[test]
    fn ipv6_counts_by_slash_64_and_mapped_v4_as_v4() {
        let g = AuthGuard::new(2, Duration::from_secs(60), Duration::ZERO);
        let t = Instant::now();
        g.failure("2001:db8:1:2::1".parse().unwrap(), t);
        g.failure("2001:db8:1:2:ffff::9".parse().unwrap(), t);
        assert!(g.locked("2001:db8:1:2::77".parse().unwrap(), t).is_some());
        assert!(g.locked("2001:db8:1:3::1".parse().unwrap(), t).is_none());
        g.failure("::ffff:192.0.2.9".parse().unwrap(), t);
        g.failure("192.0.2.9".parse().unwrap(), t);
        assert!(g.locked("192.0.2.9".parse().unwrap(), t).is_some());
    }

    #[test]
    fn memory_is_bounded() {
        let g = AuthGuard::new(5, Duration::from_secs(60), Duration::ZERO);
        let t = Instant::now();
        for i in 0..(limits::ANVIL_ENTRIES_MAX as u32 + 50) {
            g.failure(IpAddr::V4(i.into()), t);
        }
        assert!(g.len() <= limits::ANVIL_ENTRIES_MAX);
        assert!(
            g.failure("10.0.0.1".parse().unwrap(), t + Duration::from_secs(120)) == Duration::ZERO
        );
    }
}
