//! The resolver's answer cache: (name, type) -> positive records or a negative answer, each until its
//! TTL runs out. A plain struct with the clock passed in (`now`), so it is tested without sockets.
//!
//! Bound: at most `max_entries` entries. When full, the entry that expires first goes (an expired
//! entry always expires before a live one), found through an index ordered by expiry. Only
//! cacheable answers come in here: records, NODATA and NXDOMAIN; server errors are never cached.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::wire::{QType, Rdata};

/// A cached answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    Records(Vec<Rdata>),
    NoData,
    NxDomain,
}

type Key = (String, QType);

#[derive(Debug)]
struct Entry {
    value: Cached,
    /// The answer was DNSSEC-validated (AD set by a trusted resolver).
    authentic: bool,
    expires: Instant,
    seq: u64,
}

/// A bounded TTL cache; `name` keys are expected normalized (lower case, no trailing dot).
#[derive(Debug)]
pub struct Cache {
    map: HashMap<Key, Entry>,
    /// (expiry, insertion sequence, key): the first element is the next to evict.
    by_expiry: BTreeSet<(Instant, u64, Key)>,
    max_entries: usize,
    seq: u64,
}

impl Cache {
    pub fn new(max_entries: usize) -> Cache {
        Cache {
            map: HashMap::new(),
            by_expiry: BTreeSet::new(),
            max_entries,
            seq: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The live answer for (name, qtype) at `now`; an expired entry is removed and misses.
    pub fn get(&mut self, name: &str, qtype: QType, now: Instant) -> Option<Cached> {
        self.get_ad(name, qtype, now).map(|(v, _)| v)
    }

    /// [`Cache::get`] with the answer's validation status.
    pub fn get_ad(&mut self, name: &str, qtype: QType, now: Instant) -> Option<(Cached, bool)> {
        let key = (name.to_string(), qtype);
        let entry = self.map.get(&key)?;
        if entry.expires > now {
            return Some((entry.value.clone(), entry.authentic));
        }
        self.remove(&key);
        None
    }

    /// Stores `value` for `ttl` seconds from `now` (a TTL of 0 is not stored), replacing any
    /// previous entry for the key and evicting the soonest-expiring entries beyond the bound.
    pub fn insert(&mut self, name: &str, qtype: QType, value: Cached, ttl: u32, now: Instant) {
        self.insert_ad(name, qtype, value, false, ttl, now)
    }

    /// [`Cache::insert`] keeping whether the answer was validated (`authentic`).
    pub fn insert_ad(
        &mut self,
        name: &str,
        qtype: QType,
        value: Cached,
        authentic: bool,
        ttl: u32,
        now: Instant,
    ) {
        if ttl == 0 || self.max_entries == 0 {
            return;
        }
        let key = (name.to_string(), qtype);
        self.remove(&key);
        // Bounded: each pass removes one entry, and there are at most max_entries of them.
        while self.map.len() >= self.max_entries {
            let Some(first) = self.by_expiry.pop_first() else {
                break;
            };
            self.map.remove(&first.2);
        }
        let expires = now + Duration::from_secs(u64::from(ttl));
        self.seq = self.seq.wrapping_add(1);
        self.by_expiry.insert((expires, self.seq, key.clone()));
        self.map.insert(
            key,
            Entry {
                value,
                authentic,
                expires,
                seq: self.seq,
            },
        );
    }

    fn remove(&mut self, key: &Key) {
        if let Some(old) = self.map.remove(key) {
            self.by_expiry.remove(&(old.expires, old.seq, key.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Cached {
        Cached::Records(vec![Rdata::Ip(s.parse().unwrap())])
    }

    #[test]
    fn ttl_is_respected() {
        let t0 = Instant::now();
        let mut c = Cache::new(10);
        c.insert("a.example", QType::A, ip("192.0.2.1"), 5, t0);
        c.insert("a.example", QType::Mx, Cached::NoData, 60, t0);
        assert_eq!(c.get("a.example", QType::A, t0), Some(ip("192.0.2.1")));
        assert_eq!(
            c.get("a.example", QType::A, t0 + Duration::from_millis(4999)),
            Some(ip("192.0.2.1"))
        );
        assert_eq!(
            c.get("a.example", QType::A, t0 + Duration::from_secs(5)),
            None
        );
        assert_eq!(c.len(), 1, "the expired entry is dropped on lookup");
        assert_eq!(
            c.get("a.example", QType::Mx, t0 + Duration::from_secs(59)),
            Some(Cached::NoData)
        );
        assert_eq!(c.get("a.example", QType::Aaaa, t0), None);
        // TTL 0 is not cached.
        c.insert("z.example", QType::A, ip("192.0.2.9"), 0, t0);
        assert_eq!(c.get("z.example", QType::A, t0), None);
    }

    #[test]
    fn replace_keeps_one_entry() {
        let t0 = Instant::now();
        let mut c = Cache::new(10);
        c.insert("a.example", QType::A, ip("192.0.2.1"), 5, t0);
        c.insert("a.example", QType::A, Cached::NxDomain, 50, t0);
        assert_eq!(c.len(), 1);
        assert_eq!(c.by_expiry.len(), 1);
        assert_eq!(
            c.get("a.example", QType::A, t0 + Duration::from_secs(10)),
            Some(Cached::NxDomain)
        );
    }

    #[test]
    fn bounded_evicting_expired_then_soonest() {
        let t0 = Instant::now();
        let mut c = Cache::new(3);
        c.insert("long.example", QType::A, ip("192.0.2.1"), 1000, t0);
        c.insert("short.example", QType::A, ip("192.0.2.2"), 1, t0);
        c.insert("mid.example", QType::A, ip("192.0.2.3"), 100, t0);
        let later = t0 + Duration::from_secs(2);
        // short.example has expired: it is the one evicted.
        c.insert("new.example", QType::A, ip("192.0.2.4"), 500, later);
        assert_eq!(c.len(), 3);
        assert_eq!(c.get("short.example", QType::A, t0), None);
        assert!(c.get("long.example", QType::A, later).is_some());
        // Nothing expired now: the soonest to expire (mid.example) goes.
        c.insert("newer.example", QType::A, ip("192.0.2.5"), 500, later);
        assert_eq!(c.len(), 3);
        assert_eq!(c.get("mid.example", QType::A, later), None);
        for i in 0..1000u32 {
            c.insert(
                &format!("n{i}.example"),
                QType::A,
                ip("192.0.2.6"),
                1 + i,
                later,
            );
            assert!(c.len() <= 3);
        }
        assert_eq!(c.by_expiry.len(), c.len());
        // The validation status is kept with the answer, and replaced with it.
        c.insert_ad("ad.example", QType::Tlsa, Cached::NoData, true, 50, later);
        assert_eq!(
            c.get_ad("ad.example", QType::Tlsa, later),
            Some((Cached::NoData, true))
        );
        c.insert("ad.example", QType::Tlsa, Cached::NoData, 50, later);
        assert_eq!(
            c.get_ad("ad.example", QType::Tlsa, later),
            Some((Cached::NoData, false))
        );
        let mut zero = Cache::new(0);
        zero.insert("a.example", QType::A, ip("192.0.2.1"), 5, t0);
        assert!(zero.is_empty());
    }
}
