//! Routing: where mail for a domain goes (Postfix relayhost and transport_maps semantics), and which shard owns
//! a destination.
//!
//! A next hop is written `[host]:port` (no MX lookup: the host's A/AAAA), `host:port` or `host` (MX lookup of
//! `host`), or `local`. A missing port means `[delivery] smtp_port`.

use std::collections::BTreeMap;

/// Where one domain's mail goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Nexthop {
    /// MX lookup of `domain`, port `port`.
    Mx { domain: String, port: u16 },
    /// Straight to this host's addresses (bracketed form), port `port`.
    Host { host: String, port: u16 },
    /// The local-delivery shard (mydestination, or a transport entry saying `local`).
    Local,
}

/// Parses a next-hop string; `Mx`/`Host` carry port 0 when none was written (filled from the default later).
pub fn parse_nexthop(s: &str) -> Result<Nexthop, String> {
    let s = s.trim();
    let s = s.strip_prefix("smtp:").unwrap_or(s);
    if s.eq_ignore_ascii_case("local") {
        return Ok(Nexthop::Local);
    }
    let bad = || format!("not a next hop: {s:?} (use [host]:port, host:port, host or local)");
    let (host, port, bracketed) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(bad)?;
        let port = match after {
            "" => 0,
            p => p
                .strip_prefix(':')
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|&p| p > 0)
                .ok_or_else(bad)?,
        };
        (h, port, true)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(bad)?,
                false,
            ),
            None => (s, 0, false),
        }
    };
    let valid = if bracketed {
        host.parse::<std::net::IpAddr>().is_ok() || crate::smtp::address::valid_domain(host, false)
    } else {
        crate::smtp::address::valid_domain(host, false)
    };
    if host.is_empty() || !valid {
        return Err(bad());
    }
    let host = host.to_ascii_lowercase();
    Ok(if bracketed {
        Nexthop::Host { host, port }
    } else {
        Nexthop::Mx { domain: host, port }
    })
}

/// The routing table: transport entries, then relayhost, then MX of the recipient domain; and which
/// recipient domains have a delivery policy of their own (`[smtp_tls_policy]`, `[destination_rate_limit]`).
#[derive(Debug, Clone)]
pub struct Router {
    transport: BTreeMap<String, Nexthop>,
    relayhost: Option<Nexthop>,
    default_port: u16,
    /// Keys of the per-domain policy tables (normalised).
    policy_domains: std::collections::BTreeSet<String>,
}

fn with_port(n: Nexthop, default_port: u16) -> Nexthop {
    match n {
        Nexthop::Mx { domain, port: 0 } => Nexthop::Mx {
            domain,
            port: default_port,
        },
        Nexthop::Host { host, port: 0 } => Nexthop::Host {
            host,
            port: default_port,
        },
        other => other,
    }
}

impl Router {
    pub fn new(cfg: &crate::config::Config) -> Router {
        let port = cfg.delivery.smtp_port;
        let parse = |s: &str| parse_nexthop(s).map(|n| with_port(n, port)).ok();
        Router {
            transport: cfg
                .transport
                .iter()
                .filter_map(|(d, t)| Some((crate::smtp::address::normalize_domain(d), parse(t)?)))
                .collect(),
            relayhost: if cfg.relayhost.is_empty() {
                None
            } else {
                parse(&cfg.relayhost)
            },
            default_port: port,
            policy_domains: cfg
                .smtp_tls_policy
                .keys()
                .chain(cfg.destination_rate_limit.keys())
                .map(|k| crate::smtp::address::normalize_domain(k))
                .collect(),
        }
    }

    /// The policy-table key that applies to a (normalised) recipient domain: the domain itself, or a parent
    /// written with a leading dot. Recipients with such a key are delivered under it, whatever their next hop
    /// (a `[transport]` route or the relayhost does not lose a domain's `encrypt`); the next hop's own entry
    /// applies to the others.
    pub fn policy_key(&self, domain: &str) -> Option<String> {
        if self.policy_domains.is_empty() {
            return None;
        }
        if self.policy_domains.contains(domain) {
            return Some(domain.to_string());
        }
        let mut d = domain;
        while let Some(i) = d.find('.') {
            d = &d[i + 1..];
            let k = format!(".{d}");
            if self.policy_domains.contains(&k) {
                return Some(k);
            }
        }
        None
    }

    /// Whether mail to the smarthost goes with AUTH/wrapper settings.
    pub fn is_relayhost(&self, hop: &Nexthop) -> bool {
        self.relayhost.as_ref() == Some(hop)
    }

    /// The next hop for a (normalised) recipient domain. Transport entries match the domain or a parent domain
    /// written with a leading dot (`.example.com`).
    pub fn route(&self, domain: &str) -> Nexthop {
        if let Some(n) = self.transport.get(domain) {
            return n.clone();
        }
        let mut d = domain;
        while let Some(i) = d.find('.') {
            d = &d[i + 1..];
            if let Some(n) = self.transport.get(&format!(".{d}")) {
                return n.clone();
            }
        }
        if let Some(r) = &self.relayhost {
            return r.clone();
        }
        Nexthop::Mx {
            domain: domain.to_string(),
            port: self.default_port,
        }
    }
}

/// The key of a destination: its next hop, plus the recipient domain's policy key when it has one (such
/// recipients get a pool, limits and TLS level of their own). Pools, limits and ownership are per key.
pub fn destination_key(hop: &Nexthop, policy: Option<&str>) -> String {
    match policy {
        Some(p) => format!("{} for {p}", hop.key()),
        None => hop.key(),
    }
}

impl Nexthop {
    /// The names a policy entry may give this next hop, most specific first: `[host]:port`, `[host]`, `host`
    /// for a bracketed host; `domain:port`, `domain` for an MX lookup.
    pub fn policy_names(&self) -> Vec<String> {
        match self {
            Nexthop::Mx { domain, port } => vec![format!("{domain}:{port}"), domain.clone()],
            Nexthop::Host { host, port } => {
                vec![
                    format!("[{host}]:{port}"),
                    format!("[{host}]"),
                    host.clone(),
                ]
            }
            Nexthop::Local => vec![],
        }
    }

    /// The key that identifies the next hop.
    pub fn key(&self) -> String {
        match self {
            Nexthop::Mx { domain, port } => format!("{domain}:{port}"),
            Nexthop::Host { host, port } => format!("[{host}]:{port}"),
            Nexthop::Local => "local".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nexthop_forms() {
        assert_eq!(
            parse_nexthop("[127.0.0.2]:2526"),
            Ok(Nexthop::Host {
                host: "127.0.0.2".into(),
                port: 2526
            })
        );
        assert_eq!(
            parse_nexthop("smtp:[relay.example]"),
            Ok(Nexthop::Host {
                host: "relay.example".into(),
                port: 0
            })
        );
        assert_eq!(
            parse_nexthop("mx.Example.com:587"),
            Ok(Nexthop::Mx {
                domain: "mx.example.com".into(),
                port: 587
            })
        );
        assert_eq!(parse_nexthop("local"), Ok(Nexthop::Local));
        for bad in [
            "[x",
            "[127.0.0.1]:0",
            "host:port",
            "",
            "a b",
            "[1.2.3.4]:99999",
        ] {
            assert!(parse_nexthop(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn routing_order_and_ownership() {
        let mut cfg = crate::config::Config::default();
        cfg.delivery.smtp_port = 2526;
        cfg.transport
            .insert("special.example".into(), "[127.0.0.9]:25".into());
        cfg.transport.insert(".sub.example".into(), "local".into());
        let r = Router::new(&cfg);
        assert_eq!(
            r.route("special.example"),
            Nexthop::Host {
                host: "127.0.0.9".into(),
                port: 25
            }
        );
        assert_eq!(r.route("a.sub.example"), Nexthop::Local);
        assert_eq!(
            r.route("other.example"),
            Nexthop::Mx {
                domain: "other.example".into(),
                port: 2526
            }
        );
        cfg.relayhost = "[smarthost.example]".into();
        let r = Router::new(&cfg);
        let hop = r.route("other.example");
        assert_eq!(
            hop,
            Nexthop::Host {
                host: "smarthost.example".into(),
                port: 2526
            }
        );
        assert!(r.is_relayhost(&hop));
        assert_eq!(hop.key(), "[smarthost.example]:2526");
    }
}
