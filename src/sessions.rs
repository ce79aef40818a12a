//! Owns a shard's table of open SMTP sessions: admission (`smtpd_connection_limit`, the per-client limit, the
//! slots kept for `mynetworks` clients), each session's deadline, the shard's stress state, and the reaper that
//! ends sessions past their deadline.
//!
//! A deadline is per request, as Postfix's `smtpd_per_request_deadline`: a command line must arrive whole
//! within `smtpd_timeout` of the moment the session started waiting for it (one byte every few seconds does not
//! keep a session alive), message content within `smtpd_timeout` plus the bytes received divided by
//! `smtpd_min_data_rate`, and a TLS handshake within `smtpd_starttls_timeout`. Under stress (a shard's sessions
//! at 80% of its limit or more) every one of these times is `smtpd_stress_timeout` instead, so idle
//! connections cannot hold every slot. The reaper runs on the shard's tick: an expired session's socket is shut
//! for reading, so its pending read ends at once; the session then answers `421 4.4.2` and closes.
//!
//! Bounds: the table holds at most `smtpd_connection_limit` sessions; the per-address counts at most as many
//! addresses.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::RawFd;

use rustix::net::Shutdown;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::limits;

/// The limits a table enforces, from the configuration.
#[derive(Clone, Debug)]
pub struct SessionLimits {
    pub connections: usize,
    pub per_client: usize,
    /// Slots only `mynetworks` clients may take.
    pub reserve: usize,
    /// Sessions from which the shard is under stress.
    pub stress_at: usize,
    pub timeout: Duration,
    pub starttls_timeout: Duration,
    pub stress_timeout: Duration,
    pub per_request_deadline: bool,
    pub min_data_rate: u64,
}

impl SessionLimits {
    pub fn from_config(cfg: &Config) -> SessionLimits {
        let connections = cfg.smtpd_connection_limit;
        SessionLimits {
            connections,
            per_client: cfg.smtpd_client_connection_count_limit,
            reserve: connections * cfg.smtpd_mynetworks_reserve_percent as usize / 100,
            stress_at: (connections * 4).div_ceil(5).max(1),
            timeout: cfg.smtpd_timeout.0,
            starttls_timeout: cfg.smtpd_starttls_timeout.0,
            stress_timeout: cfg.smtpd_stress_timeout.0,
            per_request_deadline: cfg.smtpd_per_request_deadline,
            min_data_rate: cfg.smtpd_min_data_rate.max(1),
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The shard is full (or only the `mynetworks` reserve is left).
    Busy,
    /// The client already has `smtpd_client_connection_count_limit` sessions on this shard.
    TooManyFromClient,
}

/// What a session is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// A command (or the rest of one).
    Request,
    /// Message content (DATA or BDAT).
    Data,
    /// A TLS handshake.
    Handshake,
    /// Nothing from the client: the session is queueing a message (its reply must not be cut off).
    Busy,
}

/// One session's entry: what it waits for, since when, and whether the reaper ended it.
#[derive(Debug)]
pub struct Slot {
    fd: RawFd,
    ip: IpAddr,
    wait: Cell<Wait>,
    since: Cell<Instant>,
    /// Content bytes received in the current data request.
    bytes: Cell<u64>,
    expired: Cell<bool>,
    /// When the reaper ended it (the session still owes the client its 421).
    expired_at: Cell<Option<Instant>>,
    /// The reaper saw the shard under stress while this session was open: its deadlines stay the stress
    /// timeout for its life (as a Postfix smtpd started under stress). Without this, reaping the first idle
    /// sessions ended the stress and spared the others, which had connected a tick later, for `smtpd_timeout`.
    stress_seen: Cell<bool>,
}

impl Slot {
    /// Starts waiting for a new command.
    pub fn request(&self, now: Instant) {
        self.wait.set(Wait::Request);
        self.since.set(now);
        self.bytes.set(0);
    }

    /// Message content starts (its deadline grows with the bytes received).
    pub fn data(&self, now: Instant) {
        if self.wait.get() != Wait::Data {
            self.wait.set(Wait::Data);
            self.since.set(now);
            self.bytes.set(0);
        }
    }

    /// The session works for the client (queueing its message): no deadline until it waits again.
    pub fn busy(&self) {
        self.wait.set(Wait::Busy);
    }

    /// A TLS handshake starts.
    pub fn handshake(&self, now: Instant) {
        self.wait.set(Wait::Handshake);
        self.since.set(now);
    }

    /// `n` bytes arrived. Without per-request deadlines every read restarts the clock (a timeout per read).
    pub fn received(&self, n: usize, now: Instant, limits: &SessionLimits) {
        if !limits.per_request_deadline {
            self.since.set(now);
        } else if self.wait.get() == Wait::Data {
            self.bytes.set(self.bytes.get().saturating_add(n as u64));
        }
    }

    /// True once the reaper ended this session (it owes the client a 421 timeout).
    pub fn expired(&self) -> bool {
        self.expired.get()
    }

    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    fn deadline(&self, limits: &SessionLimits, stressed: bool) -> Instant {
        let base = match (self.wait.get(), stressed || self.stress_seen.get()) {
            (_, true) => limits.stress_timeout,
            (Wait::Handshake, false) => limits.starttls_timeout,
            (_, false) => limits.timeout,
        };
        let extra = match self.wait.get() {
            Wait::Data if limits.per_request_deadline => {
                Duration::from_secs(self.bytes.get() / limits.min_data_rate)
            }
            _ => Duration::ZERO,
        };
        self.since.get() + base + extra
    }
}

/// A shard's open sessions.
pub struct SessionTable {
    limits: SessionLimits,
    slots: RefCell<HashMap<u64, Rc<Slot>>>,
    per_client: RefCell<HashMap<IpAddr, usize>>,
    next: Cell<u64>,
    reaped: Cell<u64>,
}

impl SessionTable {
    pub fn new(limits: SessionLimits) -> Rc<SessionTable> {
        Rc::new(SessionTable {
            limits,
            slots: RefCell::new(HashMap::new()),
            per_client: RefCell::new(HashMap::new()),
            next: Cell::new(0),
            reaped: Cell::new(0),
        })
    }

    pub fn limits(&self) -> &SessionLimits {
        &self.limits
    }

    /// Admits a new connection from `ip` (socket `fd`) unless a limit says no; `trusted`: the client is in
    /// `mynetworks` and may use the reserve. The entry leaves the table when the guard is dropped.
    pub fn admit(
        self: &Rc<Self>,
        ip: IpAddr,
        fd: RawFd,
        trusted: bool,
        now: Instant,
    ) -> Result<SessionGuard, Refusal> {
        let open = self.slots.borrow().len();
        let room = if trusted {
            self.limits.connections
        } else {
            self.limits.connections.saturating_sub(self.limits.reserve)
        };
        if open >= room {
            return Err(Refusal::Busy);
        }
        {
            let mut per = self.per_client.borrow_mut();
            let n = per.entry(ip).or_insert(0);
            if *n >= self.limits.per_client {
                return Err(Refusal::TooManyFromClient);
            }
            *n += 1;
        }
        let key = self.next.get();
        self.next.set(key + 1);
        let slot = Rc::new(Slot {
            fd,
            ip,
            wait: Cell::new(Wait::Request),
            since: Cell::new(now),
            bytes: Cell::new(0),
            expired: Cell::new(false),
            expired_at: Cell::new(None),
            stress_seen: Cell::new(false),
        });
        self.slots.borrow_mut().insert(key, slot.clone());
        Ok(SessionGuard {
            table: self.clone(),
            key,
            slot,
        })
    }

    /// Sessions open now.
    pub fn len(&self) -> usize {
        self.slots.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True while the shard is under stress (short timeouts).
    pub fn stressed(&self) -> bool {
        self.len() >= self.limits.stress_at
    }

    /// Sessions the reaper ended since start.
    pub fn reaped(&self) -> u64 {
        self.reaped.get()
    }

    /// Ends every session past its deadline: marks it expired and shuts its socket for reading, so its
    /// pending read returns at once. Returns how many it ended now.
    pub fn reap(&self, now: Instant) -> usize {
        let stressed = self.stressed();
        let mut n = 0;
        for slot in self.slots.borrow().values() {
            if stressed {
                slot.stress_seen.set(true);
            }
            if slot.wait.get() == Wait::Busy {
                continue;
            }
            if !slot.expired.get() && now >= slot.deadline(&self.limits, stressed) {
                slot.expired.set(true);
                slot.expired_at.set(Some(now));
                shutdown(slot.fd, Shutdown::Read);
                n += 1;
            } else if slot
                .expired_at
                .get()
                .is_some_and(|at| now >= at + limits::SESSION_EXPIRED_GRACE)
            {
                // Still here: stuck writing to a client that does not read (its replies, or the 421). A
                // write is not ended by shutting the read side, and every byte the client takes would
                // restart the socket's write timeout: end the connection both ways.
                slot.expired_at.set(None);
                shutdown(slot.fd, Shutdown::Both);
            }
        }
        self.reaped.set(self.reaped.get() + n as u64);
        n
    }

    /// Shuts the read side of every open session (shutdown: each then answers 421 4.3.2 and closes).
    pub fn shut_all_reads(&self) {
        self.shut_all(Shutdown::Read);
    }

    /// Shuts both directions of every open session: its next read or write fails at once, so it ends.
    pub fn shut_all_connections(&self) {
        self.shut_all(Shutdown::Both);
    }

    fn shut_all(&self, how: Shutdown) {
        for slot in self.slots.borrow().values() {
            shutdown(slot.fd, how);
        }
    }
}

/// shutdown(2) of a session's socket; an error (the peer is gone already) changes nothing. A negative `fd`
/// (an entry without a socket, as in the tests) is skipped.
fn shutdown(fd: RawFd, how: Shutdown) {
    if fd < 0 {
        return;
    }
    // SAFETY: `fd` is a table entry's descriptor, which belongs to a live session socket: the entry leaves the
    // table before the socket is dropped (see SessionGuard), and the table is used on its shard's thread only.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let _ = rustix::net::shutdown(fd, how);
}

/// A session's place in the table; dropping it frees the place.
pub struct SessionGuard {
    table: Rc<SessionTable>,
    key: u64,
    slot: Rc<Slot>,
}

impl SessionGuard {
    pub fn slot(&self) -> &Slot {
        &self.slot
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.table.slots.borrow_mut().remove(&self.key);
        let mut per = self.table.per_client.borrow_mut();
        if let Some(n) = per.get_mut(&self.slot.ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.slot.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> SessionLimits {
        SessionLimits {
            connections: 10,
            per_client: 3,
            reserve: 2,
            stress_at: 8,
            timeout: Duration::from_secs(60),
            starttls_timeout: Duration::from_secs(30),
            stress_timeout: Duration::from_secs(10),
            per_request_deadline: true,
            min_data_rate: 500,
        }
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, n])
    }

    #[test]
    fn admission_limits_and_reserve() {
        let t = SessionTable::new(limits());
        let now = Instant::now();
        let mut g = Vec::new();
        for i in 0..3 {
            g.push(t.admit(ip(1), -1, false, now).unwrap());
            let _ = i;
        }
        assert_eq!(
            t.admit(ip(1), -1, false, now).err(),
            Some(Refusal::TooManyFromClient)
        );
        for i in 2..7 {
            g.push(t.admit(ip(i), -1, false, now).unwrap());
        }
        // 8 open: only the reserve is left, for mynetworks clients.
        assert_eq!(t.admit(ip(50), -1, false, now).err(), Some(Refusal::Busy));
        g.push(t.admit(ip(51), -1, true, now).unwrap());
        g.push(t.admit(ip(52), -1, true, now).unwrap());
        assert_eq!(t.admit(ip(53), -1, true, now).err(), Some(Refusal::Busy));
        assert!(t.stressed());
        g.truncate(5);
        assert_eq!(t.len(), 5);
        assert!(!t.stressed());
        drop(g);
        assert!(t.is_empty());
        assert!(t.per_client.borrow().is_empty());
    }

    #[test]
    fn deadlines_per_request_data_rate_and_stress() {
        let l = limits();
        let now = Instant::now();
        let t = SessionTable::new(l.clone());
        let g = t.admit(ip(1), -1, false, now).unwrap();
        let s = g.slot();
        // A trickled command line does not move the deadline.
        s.received(1, now + Duration::from_secs(30), &l);
        assert_eq!(s.deadline(&l, false), now + Duration::from_secs(60));
        // Content: 500 bytes per second earn a second each.
        s.data(now);
        s.received(5000, now + Duration::from_secs(1), &l);
        assert_eq!(s.deadline(&l, false), now + Duration::from_secs(70));
        // A handshake has its own time; stress shortens everything.
        s.handshake(now);
        assert_eq!(s.deadline(&l, false), now + Duration::from_secs(30));
        assert_eq!(s.deadline(&l, true), now + Duration::from_secs(10));
        // Without per-request deadlines each read restarts the clock.
        let mut per_read = l.clone();
        per_read.per_request_deadline = false;
        s.request(now);
        s.received(1, now + Duration::from_secs(50), &per_read);
        assert_eq!(s.deadline(&per_read, false), now + Duration::from_secs(110));
        // The reaper marks expired sessions (fd -1: no socket to shut down).
        s.request(now);
        assert_eq!(t.reap(now + Duration::from_secs(59)), 0);
        assert_eq!(t.reap(now + Duration::from_secs(61)), 1);
        assert!(s.expired());
        assert_eq!(t.reap(now + Duration::from_secs(62)), 0, "reaped once");
        // Still there after the grace (a write the client does not take): shut both ways, once.
        assert!(s.expired_at.get().is_some());
        t.reap(now + Duration::from_secs(61) + limits::SESSION_EXPIRED_GRACE);
        assert!(s.expired_at.get().is_none());
        assert!(s.expired());
    }

    /// Idle sessions that connected a little apart under stress: reaping the first ones takes the shard out
    /// of stress, and the later ones must still get the stress timeout, not `smtpd_timeout` (seen in CI under
    /// load: the test's last idle outsiders waited 60 s).
    #[test]
    fn sessions_seen_under_stress_keep_the_stress_timeout() {
        let l = limits();
        let now = Instant::now();
        let t = SessionTable::new(l.clone());
        let mut early: Vec<_> = (0..4)
            .map(|i| t.admit(ip(i), -1, false, now).unwrap())
            .collect();
        let later = now + Duration::from_secs(5);
        let late: Vec<_> = (4..8)
            .map(|i| t.admit(ip(i), -1, false, later).unwrap())
            .collect();
        for g in early.iter().chain(&late) {
            g.slot()
                .request(if late.iter().any(|l| std::ptr::eq(l, g)) {
                    later
                } else {
                    now
                });
        }
        assert!(t.stressed());
        // The early four are due (10 s of stress timeout), the late four not yet.
        assert_eq!(t.reap(now + Duration::from_secs(11)), 4);
        early.clear();
        assert!(!t.stressed(), "4 of 10 open");
        assert_eq!(t.reap(now + Duration::from_secs(14)), 0);
        // The late four still get the stress timeout (15 s), not smtpd_timeout (65 s).
        assert_eq!(t.reap(now + Duration::from_secs(16)), 4);
        assert!(late.iter().all(|g| g.slot().expired()));
    }
}
