//! DNS for outbound delivery: MX and address resolution, one [`MxResolver`] per shard.
//!
//! The resolver lives on its shard's glommio executor (`Rc`, `RefCell`, no locks), speaks DNS over
//! glommio UDP with TCP fallback on truncation to the configured recursive servers, and keeps a bounded
//! TTL cache with negative caching. hickory-proto is used only for the wire format.
//!
//! - [`wire`]: query building and untrusted-answer parsing (pure).
//! - [`cache`]: the bounded TTL cache (pure, clock passed in).
//! - [`resolver`]: [`MxResolver`]: transport, retries, MX selection (RFC 5321 section 5.1, RFC 7505), TXT and
//!   TLSA lookups, and with `dnssec = "trust-ad"` whether each answer was validated (the AD bit).
//! - `testserver`: a std-thread DNS responder for tests, built only for the crate's unit tests and with the
//!   `test-support` feature (the integration tests turn it on through a dev-dependency on the crate itself).
//!
//! This module owns [`DnsConfig`], the error type and the result types; see `resolver` for behavior.

pub mod cache;
pub mod resolver;
#[cfg(any(test, feature = "test-support"))]
#[doc(hidden)]
pub mod testserver;
pub mod wire;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::limits;

pub use resolver::MxResolver;

/// Resolver settings. Durations are integer milliseconds (`timeout_ms`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Recursive servers, tried round robin; a server may carry a port ("127.0.0.1:5353"), bare IPs
    /// mean port 53. Empty: the `nameserver` lines of /etc/resolv.conf.
    #[serde(deserialize_with = "de_servers", serialize_with = "ser_servers")]
    pub servers: Vec<SocketAddr>,
    /// Time to wait for one answer from one server.
    #[serde(
        rename = "timeout_ms",
        deserialize_with = "de_millis",
        serialize_with = "ser_millis"
    )]
    pub timeout: Duration,
    /// Rounds over the server list before a query fails as temporary (at least 1 is used).
    pub attempts: u32,
    /// Bound on cached (name, type) answers.
    pub cache_entries_max: usize,
    /// At most this many MX hosts are returned (lowest preference first).
    pub max_mx_hosts: usize,
    /// At most this many addresses over all destinations of one domain.
    pub max_addresses: usize,
    /// Whether answers can count as DNSSEC-validated (Postfix `smtp_dns_support_level = dnssec`): `off`
    /// (default: nothing is validated, no DANE) or `trust-ad`: the servers above are validating resolvers the
    /// operator trusts (on this host or over a trusted path); queries set the AD bit (RFC 6840 section 5.7)
    /// and an answer counts as validated only when its AD bit is set.
    pub dnssec: Dnssec,
}

/// See [`DnsConfig::dnssec`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum Dnssec {
    #[default]
    #[serde(rename = "off")]
    Off,
    #[serde(rename = "trust-ad")]
    TrustAd,
}

/// One TLSA record (RFC 6698): certificate usage, selector, matching type, association data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsaRecord {
    pub usage: u8,
    pub selector: u8,
    pub matching: u8,
    pub data: Vec<u8>,
}

/// A lookup result with whether it was DNSSEC-validated (always false with `dnssec = "off"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secured<T> {
    pub value: T,
    pub authentic: bool,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            servers: Vec::new(),
            timeout: Duration::from_secs(2),
            attempts: 2,
            cache_entries_max: 10_000,
            max_mx_hosts: 5,
            max_addresses: 10,
            dnssec: Dnssec::Off,
        }
    }
}

fn ser_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

fn ser_servers<S: serde::Serializer>(v: &[SocketAddr], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|a| a.to_string()))
}

fn de_millis<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_millis)
}

fn de_servers<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    let raw = Vec::<String>::deserialize(d)?;
    raw.iter()
        .map(|s| {
            parse_server(s).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "invalid DNS server {s:?} (want IP or IP:port, [IPv6]:port)"
                ))
            })
        })
        .collect()
}

/// "192.0.2.1", "192.0.2.1:5353", "2001:db8::1", "[2001:db8::1]:5353" -> a socket address (port 53
/// when absent).
pub fn parse_server(s: &str) -> Option<SocketAddr> {
    let s = s.trim();
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa);
    }
    let ip = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    ip.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53))
}

/// The `nameserver` entries of a resolv.conf text, port 53, in order; bad lines are skipped. A
/// scoped IPv6 address ("fe80::1%eth0") is skipped (no interface index here).
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("nameserver"), Some(addr)) => addr.parse::<IpAddr>().ok(),
                _ => None,
            }
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .take(limits::DNS_RESOLV_CONF_SERVERS_MAX)
        .collect()
}

/// Where the system's recursive servers are listed.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The system's recursive servers from [`RESOLV_CONF`] (empty if unreadable).
pub fn system_servers() -> Vec<SocketAddr> {
    servers_from_file(std::path::Path::new(RESOLV_CONF))
}

/// The `nameserver` entries of the resolv.conf-format file at `path`; empty if it cannot be read (missing, a
/// directory, not UTF-8).
pub fn servers_from_file(path: &std::path::Path) -> Vec<SocketAddr> {
    std::fs::read_to_string(path)
        .map(|t| parse_resolv_conf(&t))
        .unwrap_or_default()
}

/// One place to deliver to: an MX host (or the domain itself for an implicit MX) and its addresses
/// (IPv4 first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub host: String,
    pub preference: u16,
    pub addrs: Vec<IpAddr>,
    /// The MX answer that named this host was DNSSEC-validated (an implicit MX: the address answer was).
    pub mx_authentic: bool,
    /// The host's address answers were DNSSEC-validated.
    pub addr_authentic: bool,
    /// The host name is an alias: the final name of its CNAME chain (RFC 7672 section 2.2.3, where DANE looks
    /// for TLSA records first).
    pub expanded: Option<String>,
}

/// Why a domain or host could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// The domain does not exist (or is not a valid name): permanent.
    #[error("domain does not exist (NXDOMAIN)")]
    NxDomain,
    /// The domain publishes a null MX (RFC 7505): it accepts no mail; permanent.
    #[error("domain does not accept mail (null MX, RFC 7505)")]
    NullMx,
    /// The mail hosts exist but none has an address: temporary.
    #[error("no address found for the mail hosts")]
    NoAddress,
    /// SERVFAIL, REFUSED, timeouts, network errors: temporary.
    #[error("temporary DNS failure: {0}")]
    Temporary(String),
}

impl DnsError {
    /// Whether the message should bounce now rather than be retried later.
    pub fn is_permanent(&self) -> bool {
        matches!(self, DnsError::NxDomain | DnsError::NullMx)
    }

    /// RFC 3463 enhanced status code: null MX 5.1.10 (RFC 7505), NXDOMAIN 5.1.2, others 4.4.3.
    pub fn enhanced_code(&self) -> crate::smtp::reply_parser::EnhancedCode {
        use crate::smtp::reply_parser::EnhancedCode;
        match self {
            DnsError::NullMx => EnhancedCode::new(5, 1, 10),
            DnsError::NxDomain => EnhancedCode::new(5, 1, 2),
            DnsError::NoAddress | DnsError::Temporary(_) => EnhancedCode::new(4, 4, 3),
        }
    }
}

/// Counters of one resolver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DnsStats {
    /// Queries sent (UDP datagrams and TCP queries).
    pub queries_sent: u64,
    /// (name, type) lookups answered from the cache.
    pub cache_hits: u64,
    /// Tries that got no answer in time.
    pub timeouts: u64,
    /// Truncated UDP answers retried over TCP.
    pub tcp_fallbacks: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_parsing() {
        let text = "# generated\n\
                    search example.com\n\
                    nameserver 192.0.2.53\n\
                    nameserver   2001:db8::53 # comment\n\
                    nameserver fe80::1%eth0\n\
                    nameserver not-an-ip\n\
                    nameserver\n\
                    ;nameserver 192.0.2.99\n\
                    options edns0\n\
                    \tnameserver 127.0.0.53\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                "192.0.2.53:53".parse().unwrap(),
                "[2001:db8::53]:53".parse().unwrap(),
                "127.0.0.53:53".parse().unwrap(),
            ]
        );
        let many: String = (0..20)
            .map(|i| format!("nameserver 192.0.2.{i}\n"))
            .collect();
        assert_eq!(
            parse_resolv_conf(&many).len(),
            limits::DNS_RESOLV_CONF_SERVERS_MAX
        );
        assert!(parse_resolv_conf("").is_empty());
    }

    #[test]
    fn servers_are_read_from_a_file_and_unreadable_files_give_none() {
        let tmp = tempfile::tempdir().unwrap();
        let conf = tmp.path().join("resolv.conf");
        std::fs::write(&conf, "nameserver 192.0.2.7\nnameserver ::1\n").unwrap();
        assert_eq!(
            servers_from_file(&conf),
            vec!["192.0.2.7:53".parse().unwrap(), "[::1]:53".parse().unwrap()]
        );
        assert!(servers_from_file(&tmp.path().join("missing")).is_empty());
        assert!(servers_from_file(tmp.path()).is_empty(), "a directory");
        std::fs::write(&conf, b"nameserver 192.0.2.7\n\xff\n").unwrap();
        assert!(servers_from_file(&conf).is_empty(), "not UTF-8");
        // The system list is exactly what this machine's resolv.conf says (or nothing without one).
        let text = std::fs::read_to_string(RESOLV_CONF).unwrap_or_default();
        assert_eq!(system_servers(), parse_resolv_conf(&text));
    }

    #[test]
    fn config_from_toml() {
        let cfg: DnsConfig = toml::from_str(
            "servers = [\"127.0.0.1:5353\", \"192.0.2.1\", \"[::1]:53\"]\ntimeout_ms = 250\nattempts = 3\n",
        )
        .unwrap();
        assert_eq!(
            cfg.servers,
            vec![
                "127.0.0.1:5353".parse().unwrap(),
                "192.0.2.1:53".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
        assert_eq!(cfg.timeout, Duration::from_millis(250));
        assert_eq!(cfg.attempts, 3);
        assert_eq!(cfg.cache_entries_max, 10_000);
        assert_eq!(
            toml::from_str::<DnsConfig>("").unwrap(),
            DnsConfig::default()
        );
        assert!(toml::from_str::<DnsConfig>("timeout = 5").is_err());
        assert!(toml::from_str::<DnsConfig>("servers = [\"dns.example\"]").is_err());
    }

    #[test]
    fn error_codes() {
        assert_eq!(
            DnsError::NullMx.enhanced_code(),
            crate::smtp::reply_parser::EnhancedCode::new(5, 1, 10)
        );
        assert_eq!(
            DnsError::NxDomain.enhanced_code(),
            crate::smtp::reply_parser::EnhancedCode::new(5, 1, 2)
        );
        assert_eq!(
            DnsError::NoAddress.enhanced_code(),
            crate::smtp::reply_parser::EnhancedCode::new(4, 4, 3)
        );
        assert_eq!(
            DnsError::Temporary("x".into()).enhanced_code(),
            crate::smtp::reply_parser::EnhancedCode::new(4, 4, 3)
        );
        assert!(DnsError::NullMx.is_permanent() && DnsError::NxDomain.is_permanent());
        assert!(!DnsError::NoAddress.is_permanent());
        assert!(!DnsError::Temporary("x".into()).is_permanent());
    }
}
