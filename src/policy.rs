//! Relay policy: may this client send to this recipient, and is the recipient local or remote?
//!
//! Postfix semantics: `mydestination` domains are local; `relay_domains` (and their subdomains, as with
//! Postfix's default `parent_domain_matches_subdomains`) are accepted from anyone and relayed; clients in
//! `mynetworks` and authenticated clients may relay anywhere; everyone else gets 554 5.7.1. Address forms that
//! have tricked relays (percent hack, bang paths, quoted local parts holding `@`) are refused outright for
//! clients that may not relay, whatever the domain, so no downstream MTA that interprets them can be used as a
//! relay path. Source routes are removed by the parser; the decision is made on the final domain only.

use std::collections::HashSet;
use std::net::IpAddr;

use std::sync::Arc;

use crate::config::{Cidr, Config};
use crate::local::recipients::{RecipientTable, TableView, Target};
use crate::smtp::address::{normalize_domain, Mailbox};
use crate::smtp::reply::{self, Reply};
use crate::smtp::session::RcptRequest;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// For `mydestination`: delivered by the local-delivery shard.
    Local,
    /// For another domain: delivered by outbound delivery.
    Remote,
    /// 554 5.7.1 Relay access denied.
    Denied,
}

#[derive(Debug, Clone)]
pub struct RelayPolicy {
    mydestination: HashSet<String>,
    relay_domains: Vec<String>,
    mynetworks: Vec<Cidr>,
}

impl RelayPolicy {
    pub fn new(cfg: &Config) -> Self {
        RelayPolicy {
            mydestination: cfg
                .mydestination
                .iter()
                .map(|d| normalize_domain(d))
                .collect(),
            relay_domains: cfg
                .relay_domains
                .iter()
                .map(|d| normalize_domain(d))
                .collect(),
            mynetworks: cfg.mynetworks.clone(),
        }
    }

    pub fn in_mynetworks(&self, ip: IpAddr) -> bool {
        self.mynetworks.iter().any(|n| n.contains(ip))
    }

    pub fn is_local_domain(&self, domain: &str) -> bool {
        self.mydestination.contains(&normalize_domain(domain))
    }

    fn is_relay_domain(&self, domain: &str) -> bool {
        let d = normalize_domain(domain);
        self.relay_domains.iter().any(|r| {
            d == *r
                || (d.len() > r.len()
                    && d.ends_with(r.as_str())
                    && d.as_bytes()[d.len() - r.len() - 1] == b'.')
        })
    }

    /// Classifies one recipient. `may_relay` = the client is in mynetworks or authenticated.
    pub fn classify(&self, rcpt: &Mailbox<'_>, may_relay: bool) -> Disposition {
        self.classify_domain(rcpt.domain, rcpt.routing_chars, may_relay)
    }

    /// Classifies a recipient in `domain`; `routing_chars`: its local part had source-routing characters.
    pub fn classify_domain(
        &self,
        domain: &str,
        routing_chars: bool,
        may_relay: bool,
    ) -> Disposition {
        if routing_chars && !may_relay {
            return Disposition::Denied;
        }
        if self.is_local_domain(domain) {
            Disposition::Local
        } else if may_relay || self.is_relay_domain(domain) {
            Disposition::Remote
        } else {
            Disposition::Denied
        }
    }
}

/// The verdict on a recipient at RCPT: relay policy first, then local users, aliases and virtual aliases (which
/// expand it into final targets). One per shard: it reads the tables through the shard's own [`TableView`].
pub struct RecipientCheck {
    pub policy: Arc<RelayPolicy>,
    tables: TableView,
}

impl RecipientCheck {
    pub fn new(policy: Arc<RelayPolicy>, tables: Arc<RecipientTable>) -> RecipientCheck {
        RecipientCheck {
            policy,
            tables: TableView::new(tables),
        }
    }

    /// Accepts `req` (its final targets added to `targets`, without duplicates; returns the address accepted)
    /// or returns the refusal.
    pub fn check(&self, req: RcptRequest, targets: &mut Vec<Target>) -> Result<String, Reply> {
        self.check_with(&self.policy, req, targets)
    }

    /// [`RecipientCheck::check`] under `policy` (the session's snapshot of the reloadable settings) instead of
    /// the one given at construction.
    pub fn check_with(
        &self,
        policy: &RelayPolicy,
        req: RcptRequest,
        targets: &mut Vec<Target>,
    ) -> Result<String, Reply> {
        self.check_classified(policy, req, targets).map(|(a, _)| a)
    }

    /// [`RecipientCheck::check_with`], also saying how the address the client gave was classified (`Local`
    /// for `mydestination` and the postmaster, whatever its aliases expand to; `Remote` for a relayed one).
    pub fn check_classified(
        &self,
        policy: &RelayPolicy,
        req: RcptRequest,
        targets: &mut Vec<Target>,
    ) -> Result<(String, Disposition), Reply> {
        let (address, disposition) = if req.postmaster {
            (self.tables.get().postmaster(), Disposition::Local)
        } else {
            let domain = req.address.rsplit_once('@').map_or("", |(_, d)| d);
            let d = policy.classify_domain(domain, req.routing_chars, req.may_relay);
            (req.address, d)
        };
        if disposition == Disposition::Denied {
            return Err(reply::RELAY_DENIED);
        }
        // Plain relaying (no virtual aliases) never reads the tables.
        if disposition == Disposition::Local || self.tables.rewrites_remote() {
            self.tables
                .get()
                .resolve(&address, targets)
                .map_err(|e| e.reply())?;
        } else if !targets.iter().any(|t| t.address() == address) {
            targets.push(Target::Remote(address.clone()));
        }
        Ok((address, disposition))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::address::{parse_path, Path};

    fn policy() -> RelayPolicy {
        let cfg = Config {
            relay_domains: vec!["relay.example".into()],
            mydestination: vec!["localhost".into(), "local.example".into()],
            ..Config::default()
        };
        RelayPolicy::new(&cfg)
    }

    fn classify(addr: &str, may_relay: bool) -> Disposition {
        match parse_path(addr, false).unwrap().0 {
            Path::Mailbox(m) => policy().classify(&m, may_relay),
            _ => panic!(),
        }
    }

    #[test]
    fn basic_relay_rules() {
        assert_eq!(classify("<a@LOCALHOST>", false), Disposition::Local);
        assert_eq!(classify("<a@local.example.>", false), Disposition::Local);
        assert_eq!(classify("<a@relay.example>", false), Disposition::Remote);
        assert_eq!(
            classify("<a@sub.relay.example>", false),
            Disposition::Remote
        );
        assert_eq!(classify("<a@notrelay.example>", false), Disposition::Denied);
        assert_eq!(classify("<a@remote.example>", false), Disposition::Denied);
        assert_eq!(classify("<a@remote.example>", true), Disposition::Remote);
        assert_eq!(classify("<a@[192.0.2.1]>", false), Disposition::Denied);
    }

    #[test]
    fn trick_forms_never_open_a_relay() {
        for a in [
            "<user%remote.example@localhost>",
            "<remote.example!user@localhost>",
            "<\"user@remote.example\"@localhost>",
            "<\"user%remote.example\"@relay.example>",
            "<@localhost:user@remote.example>",
            "<@relay.example:user@remote.example>",
        ] {
            assert_eq!(classify(a, false), Disposition::Denied, "{a}");
        }
        // A source route towards a remote host does not make a local address remote.
        assert_eq!(
            classify("<@remote.example:user@localhost>", false),
            Disposition::Local
        );
    }

    #[test]
    fn mynetworks_matching() {
        let p = policy();
        assert!(p.in_mynetworks("127.0.0.2".parse().unwrap()));
        assert!(p.in_mynetworks("::1".parse().unwrap()));
        assert!(!p.in_mynetworks("192.0.2.1".parse().unwrap()));
    }
}
