//! A next hop: where one domain's mail goes, parsed from the configuration at load (`relayhost`, `[transport]`).
//!
//! Written `[host]:port` (no MX lookup: the host's A/AAAA), `host:port` or `host` (MX lookup of `host`), or
//! `local`; an optional `smtp:` prefix is accepted as in Postfix. A missing port means `[delivery] smtp_port`,
//! filled in by the router.

use std::fmt;

/// Where one domain's mail goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
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

    /// The same next hop with `default_port` where none was written.
    pub fn with_default_port(self, default_port: u16) -> Nexthop {
        match self {
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
}

impl std::str::FromStr for Nexthop {
    type Err = String;

    fn from_str(s: &str) -> Result<Nexthop, String> {
        parse_nexthop(s)
    }
}

impl TryFrom<String> for Nexthop {
    type Error = String;

    fn try_from(s: String) -> Result<Nexthop, String> {
        parse_nexthop(&s)
    }
}

impl From<Nexthop> for String {
    fn from(n: Nexthop) -> String {
        n.to_string()
    }
}

/// As written in the configuration (a port of 0 is "none written").
impl fmt::Display for Nexthop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Nexthop::Mx { domain, port: 0 } => write!(f, "{domain}"),
            Nexthop::Mx { domain, port } => write!(f, "{domain}:{port}"),
            Nexthop::Host { host, port: 0 } => write!(f, "[{host}]"),
            Nexthop::Host { host, port } => write!(f, "[{host}]:{port}"),
            Nexthop::Local => write!(f, "local"),
        }
    }
}

/// `relayhost`: an empty string (the default, as in Postfix) is no relayhost.
pub mod optional {
    use super::Nexthop;

    pub fn serialize<S: serde::Serializer>(v: &Option<Nexthop>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.as_ref().map(|n| n.to_string()).unwrap_or_default())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Nexthop>, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        if s.trim().is_empty() {
            return Ok(None);
        }
        super::parse_nexthop(&s)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_forms_round_trip() {
        for s in [
            "[127.0.0.2]:2526",
            "[relay.example]",
            "mx.example.com:587",
            "example.com",
            "local",
        ] {
            let n: Nexthop = s.parse().unwrap();
            assert_eq!(n.to_string(), s);
        }
        assert_eq!(
            "smtp:[Relay.Example]"
                .parse::<Nexthop>()
                .unwrap()
                .to_string(),
            "[relay.example]"
        );
        let n: Nexthop = "host.example".parse().unwrap();
        assert_eq!(n.with_default_port(25).to_string(), "host.example:25");
    }
}
