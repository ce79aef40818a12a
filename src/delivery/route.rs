//! Routing: where mail for a domain goes (Postfix relayhost and transport_maps semantics); the next-hop type
//! itself is [`crate::nexthop`], ownership of a destination [`crate::shard::owner`].
//!
//! A next hop is written `[host]:port` (no MX lookup: the host's A/AAAA), `host:port` or `host` (MX lookup of
//! `host`), or `local`. A missing port means `[delivery] smtp_port`.

use std::collections::BTreeMap;

pub use crate::nexthop::{parse_nexthop, Nexthop};

/// One shard's routing: the current [`Routes`], replaced when the configuration is reloaded
/// ([`Router::replace`]; a shard's dispatcher and agent share it).
#[derive(Debug)]
pub struct Router {
    routes: std::cell::RefCell<Routes>,
}

impl Router {
    pub fn new(cfg: &crate::config::Config) -> Router {
        Router {
            routes: std::cell::RefCell::new(Routes::new(cfg)),
        }
    }

    /// The routes of a reloaded configuration, for the jobs made from now on.
    pub fn replace(&self, cfg: &crate::config::Config) {
        *self.routes.borrow_mut() = Routes::new(cfg);
    }

    /// See [`Routes::policy_key`].
    pub fn policy_key(&self, domain: &str) -> Option<String> {
        self.routes.borrow().policy_key(domain)
    }

    /// See [`Routes::is_relayhost`].
    pub fn is_relayhost(&self, hop: &Nexthop) -> bool {
        self.routes.borrow().is_relayhost(hop)
    }

    /// See [`Routes::route`].
    pub fn route(&self, domain: &str) -> Nexthop {
        self.routes.borrow().route(domain)
    }
}

/// The routing table: transport entries, then relayhost, then MX of the recipient domain; and which
/// recipient domains have a delivery policy of their own (`[smtp_tls_policy]`, `[destination_rate_limit]`).
#[derive(Debug, Clone)]
pub struct Routes {
    transport: BTreeMap<String, Nexthop>,
    relayhost: Option<Nexthop>,
    default_port: u16,
    /// Keys of the per-domain policy tables (normalised).
    policy_domains: std::collections::BTreeSet<String>,
}

impl Routes {
    pub fn new(cfg: &crate::config::Config) -> Routes {
        let port = cfg.delivery.smtp_port;

        Routes {
            transport: cfg
                .transport
                .iter()
                .map(|(d, t)| {
                    (
                        crate::smtp::address::normalize_domain(d),
                        t.clone().with_default_port(port),
                    )
                })
                .collect(),
            relayhost: cfg.relayhost.clone().map(|r| r.with_default_port(port)),
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
            .insert("special.example".into(), "[127.0.0.9]:25".parse().unwrap());
        cfg.transport
            .insert(".sub.example".into(), "local".parse().unwrap());
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
        cfg.relayhost = Some("[smarthost.example]".parse().unwrap());
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
        // A reload replaces the routes in place: the relayhost is gone, the transport entry changed.
        cfg.relayhost = None;
        cfg.transport
            .insert("special.example".into(), "[127.0.0.10]:26".parse().unwrap());
        r.replace(&cfg);
        assert!(!r.is_relayhost(&hop));
        assert_eq!(r.route("other.example").key(), "other.example:2526");
        assert_eq!(r.route("special.example").key(), "[127.0.0.10]:26");
    }
}
