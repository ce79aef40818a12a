//! [`MxResolver`]: one shard's DNS client. Owns the transport (glommio UDP, TCP on truncation), the
//! retry policy across servers, the cache in front of it, and the MX-to-destinations logic of RFC 5321
//! section 5.1 with RFC 7505 null MX.
//!
//! Single-threaded by design: used only on its shard's executor, state in `Cell`/`RefCell`, never
//! borrowed across an await. Bounds: one query is tried at most `attempts x servers` times (attempts
//! capped at [`limits::DNS_ATTEMPTS_MAX`]), each try waits at most `timeout` (UDP, then the TCP fallback gets its
//! own `timeout`), at most [`limits::DNS_STRAY_DATAGRAMS_MAX`] non-matching datagrams are read per try, a TCP
//! answer is at most 65535 bytes (its length prefix), results are capped by `max_mx_hosts` and
//! `max_addresses`.

use std::cell::{Cell, RefCell};
use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use hickory_proto::rr::Name;

use super::cache::{Cache, Cached};
use super::wire::{self, Answer, QType, Rdata, WireError};
use super::{
    system_servers, Destination, DnsConfig, DnsError, DnsStats, Dnssec, Secured, TlsaRecord,
};
use crate::limits;

/// One shard's resolver; see the module documentation.
pub struct MxResolver {
    cfg: DnsConfig,
    cache: RefCell<Cache>,
    next_server: Cell<usize>,
    rng: Cell<u64>,
    stats: Cell<DnsStats>,
}

enum TryError {
    Timeout,
    Other(String),
}

/// Runs `fut` for at most `dur`.
async fn within<T>(dur: Duration, fut: impl Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(fut.await) }, async {
        glommio::timer::sleep(dur).await;
        None
    })
    .await
}

/// "[192.0.2.1]" / "[IPv6:2001:db8::1]" (RFC 5321 section 4.1.3): Some(result) if `s` is bracketed.
fn address_literal(s: &str) -> Option<Result<IpAddr, DnsError>> {
    let inner = s.strip_prefix('[')?;
    let Some(inner) = inner.strip_suffix(']') else {
        return Some(Err(DnsError::NxDomain));
    };
    let parsed = match inner.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("ipv6:") => inner
            .get(5..)
            .and_then(|v6| v6.parse::<Ipv6Addr>().ok())
            .map(IpAddr::V6),
        _ => inner.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
    };
    Some(parsed.ok_or(DnsError::NxDomain))
}

impl MxResolver {
    /// A resolver for the current shard. Empty `cfg.servers`: the system's resolv.conf servers.
    pub fn new(mut cfg: DnsConfig) -> Rc<MxResolver> {
        if cfg.servers.is_empty() {
            cfg.servers = system_servers();
        }
        cfg.attempts = cfg.attempts.clamp(1, limits::DNS_ATTEMPTS_MAX);
        let seed = RandomState::new().hash_one((
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
            std::thread::current().id(),
        ));
        Rc::new(MxResolver {
            cache: RefCell::new(Cache::new(cfg.cache_entries_max)),
            cfg,
            next_server: Cell::new(0),
            rng: Cell::new(seed | 1),
            stats: Cell::new(DnsStats::default()),
        })
    }

    /// The servers queried, in round-robin order.
    pub fn servers(&self) -> &[SocketAddr] {
        &self.cfg.servers
    }

    /// Entries in the cache (at most `cache_entries_max`).
    pub fn cached_entries(&self) -> usize {
        self.cache.borrow().len()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> DnsStats {
        self.stats.get()
    }

    fn bump(&self, f: impl FnOnce(&mut DnsStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// xorshift64* (not cryptographic; ids are also protected by the random source port).
    fn random(&self) -> u64 {
        let mut x = self.rng.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A and AAAA of `name` (queried concurrently), IPv4 first, at most `max_addresses`. A bracketed
    /// address literal or a bare IP resolves to itself. No address at all: `NxDomain` if the name does
    /// not exist, `Temporary` if a lookup failed, else `NoAddress`.
    pub async fn lookup_ip(&self, name: &str) -> Result<Vec<IpAddr>, DnsError> {
        self.lookup_ip_ad(name).await.map(|s| s.value)
    }

    /// [`MxResolver::lookup_ip`], with whether the addresses are DNSSEC-validated: every A/AAAA answer
    /// that came back was (an address literal never is).
    pub async fn lookup_ip_ad(&self, name: &str) -> Result<Secured<Vec<IpAddr>>, DnsError> {
        self.lookup_ip_expanded(name).await.map(|(s, _)| s)
    }

    /// [`MxResolver::lookup_ip_ad`], with the name's CNAME expansion: `Some(final name)` when the address
    /// answers reached their records through a CNAME chain (the A answer's, else the AAAA answer's; normalized,
    /// and different from `name`). Whether the chain was validated is `authentic` (the AD bit covers the whole
    /// answer, chain included).
    pub async fn lookup_ip_expanded(
        &self,
        name: &str,
    ) -> Result<(Secured<Vec<IpAddr>>, Option<String>), DnsError> {
        let plain = |value| Secured {
            value,
            authentic: false,
        };
        if let Some(lit) = address_literal(name.trim()) {
            return lit.map(|ip| (plain(vec![ip]), None));
        }
        if let Ok(ip) = name.trim().parse::<IpAddr>() {
            return Ok((plain(vec![ip]), None));
        }
        let name = wire::normalize(name);
        let (v4, v6) =
            futures_lite::future::zip(self.query(&name, QType::A), self.query(&name, QType::Aaaa))
                .await;
        let mut addrs = Vec::new();
        let mut authentic = true;
        let mut expanded = None;
        for (value, ad) in [&v4, &v6].into_iter().flatten() {
            authentic &= *ad;
            if let Cached::Records(records) = value {
                for rd in records {
                    match rd {
                        Rdata::Ip(ip)
                            if addrs.len() < self.cfg.max_addresses && !addrs.contains(ip) =>
                        {
                            addrs.push(*ip);
                        }
                        Rdata::Cname(target) if *target != name => {
                            expanded.get_or_insert_with(|| target.clone());
                        }
                        _ => {}
                    }
                }
            }
        }
        if !addrs.is_empty() {
            return Ok((
                Secured {
                    value: addrs,
                    authentic,
                },
                expanded,
            ));
        }
        match (v4, v6) {
            (Err(e), _) | (_, Err(e)) => Err(e),
            (Ok((Cached::NxDomain, _)), _) | (_, Ok((Cached::NxDomain, _))) => {
                Err(DnsError::NxDomain)
            }
            _ => Err(DnsError::NoAddress),
        }
    }

    /// The TXT records of `name` (each one's strings concatenated), at most `DNS_ANSWER_RECORDS_MAX`;
    /// none when the name does not exist or has no TXT. Errors are temporary.
    pub async fn lookup_txt(&self, name: &str) -> Result<Secured<Vec<String>>, DnsError> {
        let name = wire::normalize(name);
        let (value, authentic) = self.query(&name, QType::Txt).await?;
        let value = match value {
            Cached::Records(r) => r
                .into_iter()
                .filter_map(|rd| match rd {
                    Rdata::Txt(t) => Some(t),
                    _ => None,
                })
                .collect(),
            Cached::NoData | Cached::NxDomain => Vec::new(),
        };
        Ok(Secured { value, authentic })
    }

    /// The TLSA records of `name` (`_25._tcp.mx.example`); none when the name does not exist or has no
    /// TLSA (`authentic` then says whether that denial was validated). SERVFAIL, timeouts: `Temporary`.
    pub async fn lookup_tlsa(&self, name: &str) -> Result<Secured<Vec<TlsaRecord>>, DnsError> {
        let name = wire::normalize(name);
        let (value, authentic) = self.query(&name, QType::Tlsa).await?;
        let value = match value {
            Cached::Records(r) => r
                .into_iter()
                .filter_map(|rd| match rd {
                    Rdata::Tlsa(t) => Some(t),
                    _ => None,
                })
                .collect(),
            Cached::NoData | Cached::NxDomain => Vec::new(),
        };
        Ok(Secured { value, authentic })
    }

    /// Where to deliver mail for `domain` (RFC 5321 section 5.1): the MX hosts in preference order
    /// (random among equal preferences), at most `max_mx_hosts` hosts and `max_addresses` addresses
    /// in all; hosts whose address lookups fail are skipped. No MX record: the domain itself with
    /// preference 0 (implicit MX). Only a null MX ("."): `NullMx` (RFC 7505). NXDOMAIN: `NxDomain`.
    /// No host with an address: the first temporary error, else `NoAddress`. An address literal
    /// ("[192.0.2.1]", "[IPv6:2001:db8::1]") is its own destination, without DNS. Names compare
    /// case-insensitively, a trailing dot ignored.
    pub async fn resolve_mx(&self, domain: &str) -> Result<Vec<Destination>, DnsError> {
        let domain = domain.trim();
        if let Some(lit) = address_literal(domain) {
            let ip = lit?;
            return Ok(vec![Destination {
                host: domain.to_string(),
                preference: 0,
                addrs: vec![ip],
                mx_authentic: false,
                addr_authentic: false,
                expanded: None,
            }]);
        }
        let domain = wire::normalize(domain);
        let (mx_answer, mx_authentic) = self.query(&domain, QType::Mx).await?;
        let mxs = match mx_answer {
            Cached::NxDomain => return Err(DnsError::NxDomain),
            Cached::NoData => {
                // RFC 5321 section 5.1: no MX records, the domain itself is the implicit MX.
                let (addrs, expanded) = self.lookup_ip_expanded(&domain).await?;
                return Ok(vec![Destination {
                    host: domain,
                    preference: 0,
                    addrs: addrs.value,
                    mx_authentic: mx_authentic && addrs.authentic,
                    addr_authentic: addrs.authentic,
                    expanded,
                }]);
            }
            Cached::Records(records) => records,
        };
        let mut hosts: Vec<(u16, String)> = Vec::new();
        let mut null_mx = false;
        for rd in mxs {
            if let Rdata::Mx {
                preference,
                exchange,
            } = rd
            {
                if exchange.is_empty() {
                    null_mx = true;
                } else if !hosts.iter().any(|(_, h)| *h == exchange) {
                    hosts.push((preference, exchange));
                }
            }
        }
        if hosts.is_empty() {
            // Only "." (RFC 7505); a null MX next to real ones is ignored as invalid.
            return Err(if null_mx {
                DnsError::NullMx
            } else {
                DnsError::NoAddress
            });
        }
        self.order_by_preference(&mut hosts);
        hosts.truncate(self.cfg.max_mx_hosts);

        let mut out = Vec::new();
        let mut budget = self.cfg.max_addresses;
        let mut temp_error = None;
        for (preference, host) in hosts {
            if budget == 0 {
                break;
            }
            match self.lookup_ip_expanded(&host).await {
                Ok((
                    Secured {
                        value: mut addrs,
                        authentic,
                    },
                    expanded,
                )) => {
                    addrs.truncate(budget);
                    budget -= addrs.len();
                    out.push(Destination {
                        host,
                        preference,
                        addrs,
                        mx_authentic,
                        addr_authentic: authentic,
                        expanded,
                    });
                }
                Err(e @ DnsError::Temporary(_)) => {
                    temp_error.get_or_insert(e);
                }
                Err(_) => {}
            }
        }
        if out.is_empty() {
            return Err(temp_error.unwrap_or(DnsError::NoAddress));
        }
        Ok(out)
    }

    /// Sorts by preference and shuffles each run of equal preferences (Fisher-Yates).
    fn order_by_preference(&self, hosts: &mut [(u16, String)]) {
        hosts.sort_by_key(|(p, _)| *p);
        let mut start = 0;
        while start < hosts.len() {
            let pref = hosts[start].0;
            let end = hosts[start..]
                .iter()
                .position(|(p, _)| *p != pref)
                .map_or(hosts.len(), |n| start + n);
            let group = &mut hosts[start..end];
            for i in (1..group.len()).rev() {
                let j = (self.random() % (i as u64 + 1)) as usize;
                group.swap(i, j);
            }
            start = end;
        }
    }

    /// One (name, type) lookup through the cache; `name` is normalized. With the answer: whether it counts
    /// as validated (AD set, and `dnssec = "trust-ad"`).
    async fn query(&self, name: &str, qtype: QType) -> Result<(Cached, bool), DnsError> {
        if let Some(hit) = self.cache.borrow_mut().get_ad(name, qtype, Instant::now()) {
            self.bump(|s| s.cache_hits += 1);
            return Ok(hit);
        }
        let qname = wire::fqdn(name).map_err(|_| DnsError::NxDomain)?;
        let servers = &self.cfg.servers;
        if servers.is_empty() {
            return Err(DnsError::Temporary("no DNS servers configured".into()));
        }
        let start = self.next_server.get() % servers.len();
        self.next_server.set((start + 1) % servers.len());
        let tries = servers.len() * self.cfg.attempts as usize;
        let mut last = String::new();
        for i in 0..tries {
            let server = servers[(start + i) % servers.len()];
            let (value, ttl, ad) = match self.exchange(server, &qname, qtype).await {
                Ok((Answer::Records { records, ttl }, ad)) => (Cached::Records(records), ttl, ad),
                Ok((Answer::NoData { ttl }, ad)) => (Cached::NoData, ttl, ad),
                Ok((Answer::NxDomain { ttl }, ad)) => (Cached::NxDomain, ttl, ad),
                Ok((Answer::ServerError(code), _)) => {
                    last = format!("{code} from {server} for {name} {qtype:?}");
                    continue;
                }
                Ok((Answer::Truncated, _)) => {
                    last = format!("truncated answer over TCP from {server} for {name} {qtype:?}");
                    continue;
                }
                Err(TryError::Timeout) => {
                    self.bump(|s| s.timeouts += 1);
                    last = format!(
                        "no answer from {server} for {name} {qtype:?} within {} ms",
                        self.cfg.timeout.as_millis()
                    );
                    continue;
                }
                Err(TryError::Other(e)) => {
                    last = format!("{server} for {name} {qtype:?}: {e}");
                    continue;
                }
            };
            let authentic = ad && self.cfg.dnssec == Dnssec::TrustAd;
            self.cache.borrow_mut().insert_ad(
                name,
                qtype,
                value.clone(),
                authentic,
                ttl,
                Instant::now(),
            );
            return Ok((value, authentic));
        }
        Err(DnsError::Temporary(last))
    }

    /// One try against one server: UDP, then TCP if the UDP answer is truncated.
    async fn exchange(
        &self,
        server: SocketAddr,
        qname: &Name,
        qtype: QType,
    ) -> Result<(Answer, bool), TryError> {
        let timeout = self.cfg.timeout;
        let ad = self.cfg.dnssec == Dnssec::TrustAd;
        let id = self.random() as u16;
        let query = wire::build_query_ad(id, qname, qtype, ad)
            .map_err(|e| TryError::Other(e.to_string()))?;
        self.bump(|s| s.queries_sent += 1);
        let answer = within(timeout, udp_exchange(server, &query, id, qname, qtype))
            .await
            .ok_or(TryError::Timeout)??;
        if answer.0 != Answer::Truncated {
            return Ok(answer);
        }
        self.bump(|s| {
            s.tcp_fallbacks += 1;
            s.queries_sent += 1;
        });
        let id = self.random() as u16;
        let query = wire::build_query_ad(id, qname, qtype, ad)
            .map_err(|e| TryError::Other(e.to_string()))?;
        within(timeout, tcp_exchange(server, &query, id, qname, qtype))
            .await
            .ok_or(TryError::Timeout)?
    }
}

fn io_err(e: impl std::fmt::Display) -> TryError {
    TryError::Other(e.to_string())
}

/// Sends `query` from a fresh ephemeral UDP port (connected to `server`, so the kernel drops
/// datagrams from elsewhere) and reads until the matching answer; bounded by limits::DNS_STRAY_DATAGRAMS_MAX.
async fn udp_exchange(
    server: SocketAddr,
    query: &[u8],
    id: u16,
    qname: &Name,
    qtype: QType,
) -> Result<(Answer, bool), TryError> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    // Bound with std (glommio's bind sets SO_REUSEPORT, which could let two queries share a port).
    let std_sock = std::net::UdpSocket::bind(local).map_err(io_err)?;
    std_sock.connect(server).map_err(io_err)?;
    // SAFETY: `into_raw_fd` hands over sole ownership of a valid, open UDP socket descriptor.
    let sock = unsafe { glommio::net::UdpSocket::from_raw_fd(std_sock.into_raw_fd()) };
    sock.send(query).await.map_err(io_err)?;
    let mut buf =
        vec![0u8; limits::DNS_UDP_BUFFER_BYTES.max(usize::from(limits::DNS_EDNS_PAYLOAD_BYTES))];
    let mut last = String::from("no datagram");
    for _ in 0..limits::DNS_STRAY_DATAGRAMS_MAX {
        let n = sock.recv(&mut buf).await.map_err(io_err)?;
        match wire::parse_answer_ad(&buf[..n], id, qname, qtype) {
            Ok(answer) => return Ok(answer),
            // Not ours (stale, spoofed or garbage): keep waiting within the deadline.
            Err(e @ (WireError::Mismatch | WireError::Malformed(_) | WireError::Build(_))) => {
                last = e.to_string();
            }
        }
    }
    Err(TryError::Other(format!(
        "{} datagrams without our answer (last: {last})",
        limits::DNS_STRAY_DATAGRAMS_MAX
    )))
}

/// One query over a fresh TCP connection (RFC 1035 section 4.2.2: 2-byte length prefix).
async fn tcp_exchange(
    server: SocketAddr,
    query: &[u8],
    id: u16,
    qname: &Name,
    qtype: QType,
) -> Result<(Answer, bool), TryError> {
    let len = u16::try_from(query.len()).map_err(io_err)?;
    let mut stream = glommio::net::TcpStream::connect(server)
        .await
        .map_err(io_err)?;
    stream.set_nodelay(true).map_err(io_err)?;
    let mut out = Vec::with_capacity(2 + query.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(query);
    stream.write_all(&out).await.map_err(io_err)?;
    stream.flush().await.map_err(io_err)?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.map_err(io_err)?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await.map_err(io_err)?;
    match wire::parse_answer_ad(&buf, id, qname, qtype) {
        Ok(answer) => Ok(answer),
        Err(e) => Err(TryError::Other(e.to_string())),
    }
}

#[cfg(test)]
#[path = "resolver_tests.rs"]
mod tests;
