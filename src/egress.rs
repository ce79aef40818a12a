//! Egress sources and pools: the outbound source addresses (`[[egress_source]]`: bind address, EHLO name,
//! warm-up schedule), the pools that group them with weights (`[[egress_pool]]`), which pool a message takes
//! (the HTTP inject field, a header from trusted clients, the sender domain map, else `default_egress_pool`),
//! and, in the shard that owns a destination, the choice of a source for each job ([`Egress::choose`]: smooth
//! weighted round-robin, skipping suspended sources and sources whose warm-up cap for the site is reached
//! today). Binding the outbound socket to a source address is [`connect_from`].
//!
//! Without `[[egress_source]]` none of this runs: the kernel picks the address and EHLO says `myhostname`.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How long a source that cannot bind (its address is not on this host) is left out before it is tried again.
pub const SOURCE_SUSPEND_FOR: Duration = Duration::from_secs(300);
/// Sites (next hops) whose warm-up counts one shard keeps for the current day; past it, the counts of other
/// days go first, then an arbitrary site's (whose sources may then pass their cap there by that many).
pub const WARMUP_SITES_MAX: usize = 65_536;
/// Longest warm-up schedule (days).
pub const WARMUP_DAYS_MAX: usize = 366;
/// Most sources and pools (each).
pub const EGRESS_ENTRIES_MAX: usize = 4096;

/// One `[[egress_source]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressSourceConfig {
    pub name: String,
    /// The local address outbound connections are bound to (IPv4 or IPv6).
    pub source_address: String,
    /// The EHLO name used from this address. Default: `myhostname`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ehlo_name: Option<String>,
    /// First day (UTC, `YYYY-MM-DD`) of the warm-up schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_start: Option<String>,
    /// Messages per day per site on day 1, 2, ... of the warm-up; after the last day, no cap.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warmup_per_day: Vec<u32>,
}

/// One `[[egress_pool]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressPoolConfig {
    pub name: String,
    pub sources: Vec<PoolMemberConfig>,
}

/// A source of a pool and its weight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolMemberConfig {
    pub name: String,
    #[serde(default = "weight_default")]
    pub weight: u32,
}

fn weight_default() -> u32 {
    1
}

/// Days since 1970-01-01 of a `YYYY-MM-DD` date (proleptic Gregorian), or None.
pub fn parse_day(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&m) || d < 1 || d > days_in[(m - 1) as usize] {
        return None;
    }
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

/// Today (UTC) in days since 1970-01-01.
pub fn today() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| (d.as_secs() / 86_400) as i64)
}

/// Longest pool name (bytes).
pub const POOL_NAME_BYTES_MAX: usize = 64;

/// A pool name the configuration accepts and a queue record may hold: 1 to [`POOL_NAME_BYTES_MAX`] printable
/// ASCII bytes, no space.
pub fn valid_pool_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= POOL_NAME_BYTES_MAX && n.bytes().all(|b| b.is_ascii_graphic())
}

fn valid_header_name(n: &str) -> bool {
    !n.is_empty() && n.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

/// The configuration's egress problems (see `Config::problems`).
pub fn problems(cfg: &crate::config::Config) -> Vec<String> {
    let mut p = Vec::new();
    let mut names: BTreeMap<&str, ()> = BTreeMap::new();
    if cfg.egress_source.len() > EGRESS_ENTRIES_MAX || cfg.egress_pool.len() > EGRESS_ENTRIES_MAX {
        p.push(format!(
            "egress: at most {EGRESS_ENTRIES_MAX} [[egress_source]] and {EGRESS_ENTRIES_MAX} [[egress_pool]] entries"
        ));
    }
    for s in &cfg.egress_source {
        if s.name.is_empty() {
            p.push("[[egress_source]] without a name".into());
        } else if names.insert(&s.name, ()).is_some() {
            p.push(format!(
                "[[egress_source]] {:?} is defined twice: give each source its own name",
                s.name
            ));
        }
        if s.source_address.parse::<IpAddr>().is_err() {
            p.push(format!(
                "[[egress_source]] {:?}: source_address {:?} is not an IPv4 or IPv6 address",
                s.name, s.source_address
            ));
        }
        if let Some(h) = &s.ehlo_name {
            if h.is_empty() || !h.bytes().all(|b| b.is_ascii_graphic()) {
                p.push(format!(
                    "[[egress_source]] {:?}: ehlo_name {h:?} is not a host name",
                    s.name
                ));
            }
        }
        match (&s.warmup_start, s.warmup_per_day.is_empty()) {
            (Some(d), false) => {
                if parse_day(d).is_none() {
                    p.push(format!(
                        "[[egress_source]] {:?}: warmup_start {d:?} is not a date (YYYY-MM-DD)",
                        s.name
                    ));
                }
                if s.warmup_per_day.len() > WARMUP_DAYS_MAX {
                    p.push(format!(
                        "[[egress_source]] {:?}: warmup_per_day has {} days, at most {WARMUP_DAYS_MAX}",
                        s.name,
                        s.warmup_per_day.len()
                    ));
                }
            }
            (None, true) => {}
            _ => p.push(format!(
                "[[egress_source]] {:?}: warmup_start and warmup_per_day go together (a start day and the messages per day per site)",
                s.name
            )),
        }
    }
    let mut pools: BTreeMap<&str, ()> = BTreeMap::new();
    for pool in &cfg.egress_pool {
        if !valid_pool_name(&pool.name) {
            p.push(format!(
                "[[egress_pool]] name {:?}: 1 to {POOL_NAME_BYTES_MAX} printable ASCII characters, no space",
                pool.name
            ));
        } else if pools.insert(&pool.name, ()).is_some() {
            p.push(format!(
                "[[egress_pool]] {:?} is defined twice: give each pool its own name",
                pool.name
            ));
        }
        if pool.sources.is_empty() {
            p.push(format!("[[egress_pool]] {:?} has no sources", pool.name));
        }
        for (i, m) in pool.sources.iter().enumerate() {
            if !names.contains_key(m.name.as_str()) {
                p.push(format!(
                    "[[egress_pool]] {:?}: unknown source {:?} (not an [[egress_source]] name)",
                    pool.name, m.name
                ));
            }
            if m.weight == 0 {
                p.push(format!(
                    "[[egress_pool]] {:?}: source {:?} has weight 0: give it a weight of 1 or more, or leave it out",
                    pool.name, m.name
                ));
            }
            if pool.sources[..i].iter().any(|o| o.name == m.name) {
                p.push(format!(
                    "[[egress_pool]] {:?}: source {:?} is listed twice",
                    pool.name, m.name
                ));
            }
        }
    }
    if let Some(d) = &cfg.default_egress_pool {
        if !pools.contains_key(d.as_str()) {
            p.push(format!(
                "default_egress_pool {d:?}: unknown pool (not an [[egress_pool]] name)"
            ));
        }
    }
    for (domain, pool) in &cfg.egress_pool_by_sender_domain {
        if crate::smtp::address::normalize_domain(domain) != *domain || domain.is_empty() {
            p.push(format!(
                "egress_pool_by_sender_domain {domain:?}: write the domain as {:?} (lower case, no trailing dot)",
                crate::smtp::address::normalize_domain(domain)
            ));
        }
        if !pools.contains_key(pool.as_str()) {
            p.push(format!(
                "egress_pool_by_sender_domain {domain:?} = {pool:?}: unknown pool (not an [[egress_pool]] name)"
            ));
        }
    }
    if let Some(h) = &cfg.egress_pool_header {
        if !valid_header_name(h) {
            p.push(format!(
                "egress_pool_header {h:?} is not a header field name (printable ASCII, no colon or space)"
            ));
        }
    }
    p
}

/// Which pool a message accepted now takes, to store with it: the HTTP inject field, else the pool header (its
/// value, from a trusted client only), else the sender domain map (the domain, then its parents). `None`: the
/// default pool applies at delivery (it is not stored, so a change of `default_egress_pool` reaches queued
/// mail). A named pool that does not exist is ignored.
pub fn pool_for_message(
    cfg: &crate::config::Config,
    inject_field: Option<&str>,
    header: Option<&str>,
    sender: &str,
) -> Option<String> {
    let known = |n: &str| cfg.egress_pool.iter().any(|p| p.name == n);
    if let Some(f) = inject_field.filter(|f| known(f)) {
        return Some(f.to_string());
    }
    if let Some(h) = header.map(str::trim) {
        if known(h) {
            return Some(h.to_string());
        }
        tracing::info!(target: crate::eventlog::SMTP, "{} header names unknown pool {h:?}: ignored",
            cfg.egress_pool_header.as_deref().unwrap_or(""));
    }
    if cfg.egress_pool_by_sender_domain.is_empty() {
        return None;
    }
    let domain = sender.rsplit_once('@').map(|(_, d)| d)?;
    let domain = crate::smtp::address::normalize_domain(domain);
    let mut d = domain.as_str();
    loop {
        if let Some(p) = cfg.egress_pool_by_sender_domain.get(d) {
            return Some(p.clone());
        }
        match d.find('.') {
            Some(i) => d = &d[i + 1..],
            None => return None,
        }
    }
}

/// Removes every `name:` field (and its continuation lines) from the header section of `data`. `None` when
/// there is none (nothing copied); else the message without them and the first field's value (unfolded,
/// trimmed, at most 256 bytes of it kept).
pub fn strip_header(data: &[u8], name: &str) -> Option<(Vec<u8>, String)> {
    // Header fields: lines up to the first empty line (or the end).
    let mut fields: Vec<std::ops::Range<usize>> = Vec::new();
    let mut pos = 0;
    let mut in_match = false;
    while pos < data.len() {
        let end = data[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(data.len(), |i| pos + i + 1);
        let line = &data[pos..end];
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        if continuation {
            if in_match {
                if let Some(r) = fields.last_mut() {
                    r.end = end;
                }
            }
        } else {
            in_match = line.len() > name.len()
                && line[..name.len()].eq_ignore_ascii_case(name.as_bytes())
                && line[name.len()..]
                    .iter()
                    .find(|&&b| b != b' ' && b != b'\t')
                    == Some(&b':');
            if in_match {
                fields.push(pos..end);
            }
        }
        pos = end;
    }
    let first = fields.first()?.clone();
    let raw = &data[first];
    let colon = raw.iter().position(|&b| b == b':').unwrap_or(0);
    let value: String = String::from_utf8_lossy(&raw[colon + 1..])
        .split(['\r', '\n'])
        .collect::<Vec<_>>()
        .join("")
        .trim()
        .chars()
        .take(256)
        .collect();
    let mut out = Vec::with_capacity(data.len());
    let mut at = 0;
    for r in &fields {
        out.extend_from_slice(&data[at..r.start]);
        at = r.end;
    }
    out.extend_from_slice(&data[at..]);
    Some((out, value))
}

/// Longest pause between two looks at a connect in progress ([`connect_from`]).
const CONNECT_POLL_MAX: Duration = Duration::from_millis(20);

/// Binds a socket to `source` (any port) and connects it to `addr` within `timeout`. glommio's connect has no
/// bind step and its reactor takes no foreign descriptor to wait on, so the connect is non-blocking and its
/// completion is looked at (SO_ERROR, then getpeername) after pauses of 1 ms doubling up to
/// [`CONNECT_POLL_MAX`]: a few system calls per connection, the reactor never blocked and no helper thread
/// held. The connected socket is made blocking again, as glommio's own sockets are (io_uring does the waiting).
pub async fn connect_from(
    source: IpAddr,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<glommio::net::TcpStream, ConnectError> {
    use socket2::{Domain, Protocol, Socket, Type};
    if source.is_ipv6() != addr.is_ipv6() {
        return Err(ConnectError::Connect(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!("source address {source} cannot reach {addr} (other address family)"),
        )));
    }
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let s =
        Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).map_err(ConnectError::Connect)?;
    s.bind(&SocketAddr::new(source, 0).into())
        .map_err(ConnectError::Bind)?;
    s.set_nonblocking(true).map_err(ConnectError::Connect)?;
    match s.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            let deadline = Instant::now() + timeout;
            let mut pause = Duration::from_millis(1);
            // Bounded by the deadline.
            loop {
                if let Some(e) = s.take_error().map_err(ConnectError::Connect)? {
                    return Err(ConnectError::Connect(e));
                }
                match s.peer_addr() {
                    Ok(_) => break,
                    Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {}
                    Err(e) => return Err(ConnectError::Connect(e)),
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(ConnectError::Connect(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connection timed out",
                    )));
                }
                glommio::timer::sleep(pause.min(deadline - now)).await;
                pause = (pause * 2).min(CONNECT_POLL_MAX);
            }
        }
        Err(e) => return Err(ConnectError::Connect(e)),
    }
    s.set_nonblocking(false).map_err(ConnectError::Connect)?;
    Ok(glommio::net::TcpStream::from(s))
}

/// Why [`connect_from`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The source address cannot be bound (EADDRNOTAVAIL: not an address of this host).
    #[error("cannot bind: {0}")]
    Bind(std::io::Error),
    #[error("{0}")]
    Connect(std::io::Error),
}

impl ConnectError {
    /// The source itself is unusable (its address is not on this host), not just this connection.
    pub fn source_unusable(&self) -> bool {
        matches!(self, ConnectError::Bind(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL))
    }
}

/// Tries to bind each source's address (at start): the sources that cannot, with the error.
pub fn check_sources(cfg: &crate::config::Config) -> Vec<(String, std::io::Error)> {
    let mut bad = Vec::new();
    for s in &cfg.egress_source {
        let Ok(ip) = s.source_address.parse::<IpAddr>() else {
            continue;
        };
        if let Err(e) = std::net::UdpSocket::bind(SocketAddr::new(ip, 0)) {
            bad.push((s.name.clone(), e));
        }
    }
    bad
}

/// A source as the owner shard uses it.
#[derive(Debug)]
pub struct Source {
    pub name: String,
    pub addr: IpAddr,
    /// The EHLO name (the source's `ehlo_name`, else `myhostname`).
    pub ehlo: String,
    /// (first day, caps per day) of the warm-up schedule.
    warmup: Option<(i64, Vec<u32>)>,
    /// Until when the source is left out (it could not bind).
    suspended_until: Cell<Option<Instant>>,
}

impl Source {
    /// The warm-up cap (messages per site) on `day`, or None (no schedule, or past its last day). Before the
    /// first day the first day's cap applies.
    pub fn cap(&self, day: i64) -> Option<u32> {
        let (start, caps) = self.warmup.as_ref()?;
        let i = usize::try_from((day - start).max(0)).ok()?;
        caps.get(i).copied()
    }
}

struct Pool {
    name: String,
    /// (source index, weight)
    members: Vec<(usize, i64)>,
    /// Smooth weighted round-robin state, one per member.
    current: Vec<Cell<i64>>,
}

/// Why no source of a pool could be chosen: the deferral reply says which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoSource {
    /// Every source of the pool is suspended (cannot bind).
    Suspended,
    /// Every usable source reached its warm-up cap for the site today.
    WarmupFull,
}

impl NoSource {
    /// The deferral reply for the recipients.
    pub fn reply(&self, pool: &str, site: &str) -> String {
        match self {
            NoSource::Suspended => format!(
                "4.4.0 egress pool {pool}: no usable source (every source suspended: its address cannot be bound)"
            ),
            NoSource::WarmupFull => format!(
                "4.7.0 egress pool {pool}: warm-up rate limit reached today for {site} on every source"
            ),
        }
    }
}

/// Warm-up counts of one site: the day they are for and one count per source.
struct SiteCounts {
    day: i64,
    counts: Vec<u32>,
}

/// One shard's egress state: sources, pools with their round-robin state, suspensions and warm-up counts
/// (kept in memory only: after a restart every source starts the day at 0 again).
pub struct Egress {
    sources: Vec<std::rc::Rc<Source>>,
    pools: Vec<Pool>,
    default_pool: Option<usize>,
    any_warmup: bool,
    warm: RefCell<HashMap<String, SiteCounts>>,
    /// Suspensions so far (a source that could not bind), for `/metrics`.
    pub suspensions: Cell<u64>,
}

impl Egress {
    /// The egress state of `cfg`, or None when it has no sources (then nothing of this runs).
    pub fn new(cfg: &crate::config::Config) -> Option<Egress> {
        if cfg.egress_source.is_empty() {
            return None;
        }
        let sources: Vec<std::rc::Rc<Source>> = cfg
            .egress_source
            .iter()
            .filter_map(|s| {
                Some(std::rc::Rc::new(Source {
                    name: s.name.clone(),
                    addr: s.source_address.parse().ok()?,
                    ehlo: s
                        .ehlo_name
                        .clone()
                        .unwrap_or_else(|| cfg.myhostname.clone()),
                    warmup: s
                        .warmup_start
                        .as_deref()
                        .and_then(parse_day)
                        .filter(|_| !s.warmup_per_day.is_empty())
                        .map(|d| (d, s.warmup_per_day.clone())),
                    suspended_until: Cell::new(None),
                }))
            })
            .collect();
        let pools: Vec<Pool> = cfg
            .egress_pool
            .iter()
            .map(|p| {
                let members: Vec<(usize, i64)> = p
                    .sources
                    .iter()
                    .filter(|m| m.weight > 0)
                    .filter_map(|m| {
                        let i = sources.iter().position(|s| s.name == m.name)?;
                        Some((i, i64::from(m.weight)))
                    })
                    .collect();
                Pool {
                    name: p.name.clone(),
                    current: members.iter().map(|_| Cell::new(0)).collect(),
                    members,
                }
            })
            .collect();
        let default_pool = cfg
            .default_egress_pool
            .as_deref()
            .and_then(|d| pools.iter().position(|p| p.name == d));
        let any_warmup = sources.iter().any(|s| s.warmup.is_some());
        Some(Egress {
            sources,
            pools,
            default_pool,
            any_warmup,
            warm: RefCell::new(HashMap::new()),
            suspensions: Cell::new(0),
        })
    }

    /// Carries the suspensions and today's warm-up counts of `old` over to the same-named sources (a reload).
    pub fn carry_over(&self, old: &Egress) {
        let map: Vec<Option<usize>> = old
            .sources
            .iter()
            .map(|o| self.sources.iter().position(|s| s.name == o.name))
            .collect();
        for (o, n) in old.sources.iter().zip(&map) {
            if let Some(n) = n {
                self.sources[*n]
                    .suspended_until
                    .set(o.suspended_until.get());
            }
        }
        let mut warm = self.warm.borrow_mut();
        for (site, c) in old.warm.borrow().iter() {
            let mut counts = vec![0; self.sources.len()];
            for (i, n) in map.iter().enumerate() {
                if let (Some(n), Some(v)) = (n, c.counts.get(i)) {
                    counts[*n] = *v;
                }
            }
            warm.insert(site.clone(), SiteCounts { day: c.day, counts });
        }
        self.suspensions.set(old.suspensions.get());
    }

    /// The pool a message takes: its stored pool (one that still exists), else the default pool.
    pub fn pool_of(&self, stored: Option<&str>) -> Option<usize> {
        stored
            .and_then(|n| self.pools.iter().position(|p| p.name == n))
            .or(self.default_pool)
    }

    pub fn pool_name(&self, pool: usize) -> &str {
        self.pools.get(pool).map_or("", |p| p.name.as_str())
    }

    pub fn source(&self, i: usize) -> Option<&std::rc::Rc<Source>> {
        self.sources.get(i)
    }

    /// The index of the source named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.sources.iter().position(|s| s.name == name)
    }

    /// Whether source `i` is suspended at `now`.
    pub fn is_suspended(&self, i: usize, now: Instant) -> bool {
        self.sources
            .get(i)
            .and_then(|s| s.suspended_until.get())
            .is_some_and(|t| now < t)
    }

    fn suspended(&self, i: usize, now: Instant) -> bool {
        let s = &self.sources[i];
        match s.suspended_until.get() {
            Some(t) if now < t => true,
            Some(_) => {
                s.suspended_until.set(None);
                tracing::info!(target: crate::eventlog::SMTP, "egress source {} ({}): suspension over, trying it again", s.name, s.addr);
                false
            }
            None => false,
        }
    }

    fn has_room(&self, i: usize, site: &str, day: i64) -> bool {
        let Some(cap) = self.sources[i].cap(day) else {
            return true;
        };
        let warm = self.warm.borrow();
        let used = warm
            .get(site)
            .filter(|c| c.day == day)
            .and_then(|c| c.counts.get(i).copied())
            .unwrap_or(0);
        used < cap
    }

    fn count(&self, i: usize, site: &str, day: i64) {
        if self.sources[i].warmup.is_none() {
            return;
        }
        let mut warm = self.warm.borrow_mut();
        if let Some(c) = warm.get_mut(site) {
            if c.day != day {
                c.day = day;
                c.counts.iter_mut().for_each(|x| *x = 0);
            }
            if let Some(x) = c.counts.get_mut(i) {
                *x += 1;
            }
            return;
        }
        if warm.len() >= WARMUP_SITES_MAX {
            warm.retain(|_, c| c.day == day);
            if warm.len() >= WARMUP_SITES_MAX {
                if let Some(k) = warm.keys().next().cloned() {
                    warm.remove(&k);
                }
            }
        }
        let mut counts = vec![0; self.sources.len()];
        counts[i] = 1;
        warm.insert(site.to_string(), SiteCounts { day, counts });
    }

    /// Chooses a source of `pool` for one message to `site` (smooth weighted round-robin over the sources that
    /// are usable now: not suspended, and under their warm-up cap for `site` on `day`) and counts the message
    /// against the chosen source's warm-up cap. No allocation, except the first count of a site on a day.
    pub fn choose(
        &self,
        pool: usize,
        site: &str,
        now: Instant,
        day: i64,
    ) -> Result<usize, NoSource> {
        let Some(p) = self.pools.get(pool) else {
            return Err(NoSource::Suspended);
        };
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        let mut any_unsuspended = false;
        for (k, &(i, w)) in p.members.iter().enumerate() {
            if self.suspended(i, now) {
                continue;
            }
            any_unsuspended = true;
            if self.any_warmup && !self.has_room(i, site, day) {
                continue;
            }
            total += w;
            let c = p.current[k].get() + w;
            p.current[k].set(c);
            if best.is_none_or(|b| c > p.current[b].get()) {
                best = Some(k);
            }
        }
        let Some(k) = best else {
            return Err(if any_unsuspended {
                NoSource::WarmupFull
            } else {
                NoSource::Suspended
            });
        };
        p.current[k].set(p.current[k].get() - total);
        let i = p.members[k].0;
        self.count(i, site, day);
        Ok(i)
    }

    /// Gives back a message counted by [`Egress::choose`] that was not sent after all (postponed, deferred
    /// before a transaction, or moved to another source).
    pub fn uncount(&self, i: usize, site: &str, day: i64) {
        if let Some(c) = self.warm.borrow_mut().get_mut(site) {
            if c.day == day {
                if let Some(x) = c.counts.get_mut(i) {
                    *x = x.saturating_sub(1);
                }
            }
        }
    }

    /// Leaves source `i` out for [`SOURCE_SUSPEND_FOR`] (it could not bind). Logged (warn) and counted once per
    /// suspension; false when it was suspended already.
    pub fn suspend(&self, i: usize, now: Instant, why: &str) -> bool {
        let Some(s) = self.sources.get(i) else {
            return false;
        };
        if s.suspended_until.get().is_some_and(|t| now < t) {
            return false;
        }
        s.suspended_until.set(Some(now + SOURCE_SUSPEND_FOR));
        self.suspensions.set(self.suspensions.get() + 1);
        tracing::warn!(target: crate::eventlog::SMTP, "egress source {} ({}) suspended for {}s: {why}", s.name, s.addr, SOURCE_SUSPEND_FOR.as_secs());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn cfg(toml_text: &str) -> Config {
        toml::from_str(toml_text).expect("config parses")
    }

    const TWO: &str = r#"
        [[egress_source]]
        name = "ip1"
        source_address = "127.0.0.2"
        ehlo_name = "mta1.example"
        [[egress_source]]
        name = "ip2"
        source_address = "::1"
        [[egress_pool]]
        name = "bulk"
        sources = [{ name = "ip1", weight = 3 }, { name = "ip2", weight = 1 }]
    "#;

    #[test]
    fn a_good_config_has_no_problems_and_bad_ones_are_named() {
        let c = cfg(&format!("default_egress_pool = \"bulk\"\negress_pool_header = \"X-Pool\"\n{TWO}\n[egress_pool_by_sender_domain]\n\"news.example\" = \"bulk\"\n"));
        assert_eq!(problems(&c), Vec::<String>::new());
        let bad = cfg(r#"
            default_egress_pool = "nope"
            egress_pool_header = "X Pool:"
            [egress_pool_by_sender_domain]
            "a.example" = "missing"
            "News.Example." = "p"
            [[egress_source]]
            name = "ip1"
            source_address = "not-an-ip"
            warmup_per_day = [1, 2]
            [[egress_source]]
            name = "ip1"
            source_address = "10.0.0.1"
            warmup_start = "2026-02-30"
            warmup_per_day = [5]
            [[egress_pool]]
            name = "p"
            sources = [{ name = "ip1", weight = 0 }, { name = "ghost" }, { name = "ip1" }]
            [[egress_pool]]
            name = "p"
            sources = []
        "#);
        let p = problems(&bad).join("\n");
        for want in [
            "\"ip1\" is defined twice",
            "source_address \"not-an-ip\" is not an IPv4 or IPv6 address",
            "warmup_start and warmup_per_day go together",
            "warmup_start \"2026-02-30\" is not a date",
            "unknown source \"ghost\"",
            "has weight 0",
            "source \"ip1\" is listed twice",
            "[[egress_pool]] \"p\" is defined twice",
            "[[egress_pool]] \"p\" has no sources",
            "default_egress_pool \"nope\": unknown pool",
            "egress_pool_by_sender_domain \"a.example\" = \"missing\": unknown pool",
            "egress_pool_header \"X Pool:\" is not a header field name",
            "egress_pool_by_sender_domain \"News.Example.\": write the domain as \"news.example\"",
        ] {
            assert!(p.contains(want), "missing {want:?} in:\n{p}");
        }
        // Config::problems reports them too.
        assert!(bad
            .problems()
            .iter()
            .any(|l| l.contains("unknown source \"ghost\"")));
    }

    #[test]
    fn dates_parse_to_days() {
        assert_eq!(parse_day("1970-01-01"), Some(0));
        assert_eq!(parse_day("2000-03-01"), Some(11_017));
        assert_eq!(parse_day("2024-02-29"), Some(19_782));
        for bad in [
            "2023-02-29",
            "2026-13-01",
            "2026-1-01",
            "x026-01-01",
            "2026-00-10",
            "",
        ] {
            assert_eq!(parse_day(bad), None, "{bad}");
        }
    }

    /// Smooth weighted round-robin: 3:1 gives exactly 3 of every 4, interleaved (never 3 in a row of the heavy
    /// source followed by the light one only at the end of a long run), and is the same every time.
    #[test]
    fn weighted_choice_is_smooth_and_exact() {
        let e = Egress::new(&cfg(TWO)).unwrap();
        let now = Instant::now();
        let picks: Vec<usize> = (0..8).map(|_| e.choose(0, "s", now, 0).unwrap()).collect();
        assert_eq!(picks, vec![0, 0, 1, 0, 0, 0, 1, 0]);
        let mut n = [0usize; 2];
        for _ in 0..400 {
            n[e.choose(0, "s", now, 0).unwrap()] += 1;
        }
        assert_eq!(n, [300, 100]);
    }

    #[test]
    fn suspended_sources_are_skipped_and_come_back() {
        let e = Egress::new(&cfg(TWO)).unwrap();
        let now = Instant::now();
        assert!(e.suspend(0, now, "test"));
        assert!(!e.suspend(0, now, "again"), "one suspension, one log line");
        assert_eq!(e.suspensions.get(), 1);
        for _ in 0..10 {
            assert_eq!(e.choose(0, "s", now, 0), Ok(1));
        }
        e.suspend(1, now, "test");
        assert_eq!(e.choose(0, "s", now, 0), Err(NoSource::Suspended));
        assert!(NoSource::Suspended
            .reply("bulk", "s")
            .contains("egress pool bulk"));
        // After the suspension the source is tried again.
        let later = now + SOURCE_SUSPEND_FOR + Duration::from_secs(1);
        assert!(e.choose(0, "s", later, 0).is_ok());
    }

    #[test]
    fn warmup_caps_count_per_site_and_day() {
        let c = cfg(r#"
            [[egress_source]]
            name = "new"
            source_address = "127.0.0.2"
            warmup_start = "1970-01-03"
            warmup_per_day = [2, 3]
            [[egress_pool]]
            name = "p"
            sources = [{ name = "new" }]
        "#);
        let e = Egress::new(&c).unwrap();
        let now = Instant::now();
        let src = e.source(0).unwrap();
        assert_eq!(src.cap(0), Some(2), "before the start: day 1's cap");
        assert_eq!(src.cap(3), Some(3));
        assert_eq!(src.cap(4), None, "after the last day: no cap");
        // Day 2 (days since epoch: 2): 2 per site.
        assert_eq!(e.choose(0, "a", now, 2), Ok(0));
        assert_eq!(e.choose(0, "a", now, 2), Ok(0));
        assert_eq!(e.choose(0, "a", now, 2), Err(NoSource::WarmupFull));
        let r = NoSource::WarmupFull.reply("p", "a");
        assert!(r.starts_with("4.7.0 ") && r.contains("warm-up"), "{r}");
        // Classified as a rate limit (a deferral of ours, not the destination's).
        assert_eq!(
            crate::delivery::bounce_class::BounceClassifier::default().classify(&r),
            crate::delivery::bounce_class::BounceClass::RateLimit
        );
        assert_eq!(
            e.choose(0, "b", now, 2),
            Ok(0),
            "another site has its own count"
        );
        // The next day the count starts again, with that day's cap.
        for _ in 0..3 {
            assert_eq!(e.choose(0, "a", now, 3), Ok(0));
        }
        assert_eq!(e.choose(0, "a", now, 3), Err(NoSource::WarmupFull));
        // A reload keeps today's counts.
        let e2 = Egress::new(&c).unwrap();
        e2.carry_over(&e);
        assert_eq!(e2.choose(0, "a", now, 3), Err(NoSource::WarmupFull));
    }

    #[test]
    fn a_pool_is_chosen_by_field_header_then_sender_domain() {
        let c = cfg(&format!(
            "{TWO}\n[[egress_pool]]\nname = \"tx\"\nsources = [{{ name = \"ip2\" }}]\n[egress_pool_by_sender_domain]\n\"news.example\" = \"bulk\"\n"
        ));
        assert_eq!(
            pool_for_message(&c, None, None, "a@x.News.Example").as_deref(),
            Some("bulk")
        );
        assert_eq!(
            pool_for_message(&c, None, None, "a@news.example").as_deref(),
            Some("bulk")
        );
        assert_eq!(pool_for_message(&c, None, None, "a@other.example"), None);
        assert_eq!(pool_for_message(&c, None, None, ""), None);
        assert_eq!(
            pool_for_message(&c, None, Some(" tx "), "a@news.example").as_deref(),
            Some("tx")
        );
        assert_eq!(
            pool_for_message(&c, None, Some("nope"), "a@news.example").as_deref(),
            Some("bulk")
        );
        assert_eq!(
            pool_for_message(&c, Some("tx"), Some("bulk"), "a@n.example").as_deref(),
            Some("tx")
        );
    }

    /// The bound connect: the peer sees the source address; an address not on this host is a bind failure that
    /// makes the source unusable; a refused connection and a family mismatch are plain connect failures.
    #[test]
    fn connect_from_binds_the_source_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let to = listener.local_addr().unwrap();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let t = Duration::from_secs(5);
        glommio::LocalExecutor::default().run(async move {
            let c = connect_from("127.0.0.2".parse().unwrap(), to, t)
                .await
                .unwrap();
            let (_, peer) = listener.accept().unwrap();
            assert_eq!(peer.ip(), "127.0.0.2".parse::<IpAddr>().unwrap());
            assert_eq!(c.local_addr().unwrap().ip(), peer.ip());
            let e = connect_from("192.0.2.10".parse().unwrap(), to, t)
                .await
                .unwrap_err();
            assert!(e.source_unusable(), "{e}");
            let e = connect_from("127.0.0.2".parse().unwrap(), closed, t)
                .await
                .unwrap_err();
            assert!(!e.source_unusable(), "{e}");
            assert!(e.to_string().contains("refused"), "{e}");
            let e = connect_from("::1".parse().unwrap(), to, t)
                .await
                .unwrap_err();
            assert!(!e.source_unusable(), "{e}");
        });
    }

    #[test]
    fn the_pool_header_is_stripped_with_its_continuations() {
        let m = b"From: a@b\r\nx-pool: bulk\r\n  more\r\nSubject: s\r\nX-Pool : tx\r\nX-Pooled: keep\r\n\r\nX-Pool: body\r\n";
        let (out, v) = strip_header(m, "X-Pool").unwrap();
        assert_eq!(v, "bulk  more");
        assert_eq!(
            out,
            b"From: a@b\r\nSubject: s\r\nX-Pooled: keep\r\n\r\nX-Pool: body\r\n".to_vec()
        );
        assert!(strip_header(b"From: a\r\n\r\nX-Pool: b\r\n", "X-Pool").is_none());
        assert!(strip_header(b"", "X-Pool").is_none());
    }
}
