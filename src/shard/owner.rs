//! Which mesh peer owns a destination: a stable hash of the next hop, so limits and pooled connections for
//! one next hop live on exactly one shard. Ownership is computed, never stored: a restart with another shard
//! count routes every destination somewhere. The local-delivery shard is its own peer, after the SMTP shards.

use crate::delivery::route::Nexthop;

/// A peer of the shard mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// SMTP shard `n` (0-based; also its mesh index).
    Smtp(usize),
    /// The local-delivery shard (mesh index = the number of SMTP shards).
    Local,
}

impl Peer {
    /// The peer's index in the mesh, given the number of SMTP shards.
    pub fn index(self, shards: usize) -> usize {
        match self {
            Peer::Smtp(n) => n,
            Peer::Local => shards,
        }
    }
}

/// The peer that owns `hop` among `shards` SMTP shards: the local-delivery shard for [`Nexthop::Local`],
/// otherwise CRC-32C of the next hop's key modulo the shard count. Every policy variant of one next hop has
/// the same owner (its pools are separate, on that one shard).
pub fn owner_of(hop: &Nexthop, shards: usize) -> Peer {
    debug_assert!(shards > 0);
    // CRC-32C of the next hop's key (`domain:port`, `[host]:port`), computed over its parts: no allocation per
    // job. `key_hash_matches_the_key` holds it equal to the hash of `Nexthop::key`.
    let (open, name, close, port) = match hop {
        Nexthop::Local => return Peer::Local,
        Nexthop::Mx { domain, port } => ("", domain.as_str(), ":", *port),
        Nexthop::Host { host, port } => ("[", host.as_str(), "]:", *port),
    };
    let mut digits = [0u8; 5]; // u16::MAX has 5
    let mut rest = &mut digits[..];
    let _ = std::io::Write::write_fmt(&mut rest, format_args!("{port}"));
    let n = 5 - rest.len();
    let crc = [
        open.as_bytes(),
        name.as_bytes(),
        close.as_bytes(),
        &digits[..n],
    ]
    .iter()
    .fold(0, |c, part| crc32c::crc32c_append(c, part));
    Peer::Smtp(crc as usize % shards.max(1))
}

/// The SMTP shard that owns a site (see `delivery::agent`: the destination of every MX-routed domain whose MX
/// hosts form that site): CRC-32C of the site key modulo the shard count. A domain's own site under a provider
/// (`site:google:25 for corp.example`) has its provider site's owner, so one shard's automation engine sees every
/// reply of the provider and holds all of its destinations.
pub fn owner_of_site(site: &str, shards: usize) -> usize {
    let base = site.split_once(" for ").map_or(site, |(b, _)| b);
    crc32c::crc32c(base.as_bytes()) as usize % shards.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mx(d: &str) -> Nexthop {
        Nexthop::Mx {
            domain: d.into(),
            port: 25,
        }
    }

    /// Pins the hash: a change here moves destinations between shards (harmless across a restart, but it
    /// must be a decision, not an accident).
    #[test]
    fn a_domains_own_site_lives_with_its_provider() {
        for n in 1..=8 {
            assert_eq!(
                owner_of_site("site:google:25 for corp.example", n),
                owner_of_site("site:google:25", n)
            );
        }
        assert!((1..=8)
            .any(|n| owner_of_site("site:google:25", n) != owner_of_site("site:yahoo:25", n)));
    }

    #[test]
    fn golden_owners() {
        let host = Nexthop::Host {
            host: "127.0.0.2".into(),
            port: 2526,
        };
        let cases: [(Nexthop, usize, Peer); 9] = [
            (mx("gmail.com"), 1, Peer::Smtp(0)),
            (mx("gmail.com"), 2, Peer::Smtp(1)),
            (mx("gmail.com"), 8, Peer::Smtp(5)),
            (mx("yahoo.com"), 4, Peer::Smtp(1)),
            (mx("yahoo.com"), 8, Peer::Smtp(5)),
            (host.clone(), 4, Peer::Smtp(2)),
            (host, 8, Peer::Smtp(6)),
            (Nexthop::Local, 1, Peer::Local),
            (Nexthop::Local, 8, Peer::Local),
        ];
        for (hop, shards, want) in cases {
            assert_eq!(owner_of(&hop, shards), want, "{hop:?} over {shards}");
        }
        // The hash itself: CRC-32C (Castagnoli) of the next hop's key.
        assert_eq!(crc32c::crc32c(b"gmail.com:25"), 0xf52b_8ead);
        assert_eq!(crc32c::crc32c(b"[127.0.0.2]:2526"), 0x1a24_2286);
        assert_eq!(Peer::Local.index(3), 3);
        assert_eq!(Peer::Smtp(2).index(3), 2);
    }

    #[test]
    fn key_hash_matches_the_key() {
        for hop in [
            mx("gmail.com"),
            Nexthop::Mx {
                domain: "a.example".into(),
                port: 0,
            },
            Nexthop::Mx {
                domain: "b.example".into(),
                port: 65535,
            },
            Nexthop::Host {
                host: "::1".into(),
                port: 2526,
            },
        ] {
            let want = crc32c::crc32c(hop.key().as_bytes()) as usize % 97;
            assert_eq!(owner_of(&hop, 97), Peer::Smtp(want), "{hop:?}");
        }
    }

    #[test]
    fn owners_spread_over_shards() {
        let mut seen = [0u32; 4];
        for i in 0..400 {
            match owner_of(&mx(&format!("d{i}.example")), 4) {
                Peer::Smtp(n) => seen[n] += 1,
                Peer::Local => panic!("an MX hop is never local"),
            }
        }
        assert!(seen.iter().all(|&n| n > 60), "{seen:?}");
    }
}
