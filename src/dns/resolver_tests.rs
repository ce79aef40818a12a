//! Tests of [`MxResolver`] against the std-thread [`TestDns`] responder on 127.0.0.53, each on its own
//! glommio executor.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use super::*;
use crate::dns::testserver::TestDns;

const LOOPBACK_DNS: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53));

fn run<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    glommio::LocalExecutorBuilder::default()
        .spawn(f)
        .expect("spawn executor")
        .join()
        .expect("executor panicked");
}

fn cfg(dns: &TestDns) -> DnsConfig {
    DnsConfig {
        servers: vec![dns.addr()],
        timeout: Duration::from_millis(300),
        ..DnsConfig::default()
    }
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn mx_preference_order_and_shuffle() {
    run(|| async {
        let dns = TestDns::start(LOOPBACK_DNS);
        dns.add_mx("example.com", 20, "mx3.example.com");
        dns.add_mx("example.com", 10, "mx1.example.com");
        dns.add_mx("example.com", 10, "MX2.example.com.");
        dns.add_a("mx1.example.com", v4("192.0.2.1"));
        dns.add_a("mx2.example.com", v4("192.0.2.2"));
        dns.add_a("mx3.example.com", v4("192.0.2.3"));
        let r = MxResolver::new(cfg(&dns));
        let mut first = std::collections::HashSet::new();
        for _ in 0..64 {
            let d = r.resolve_mx("example.com").await.unwrap();
            let prefs: Vec<u16> = d.iter().map(|d| d.preference).collect();
            assert_eq!(prefs, [10, 10, 20]);
            assert_eq!(d[2].host, "mx3.example.com");
            assert_eq!(d[2].addrs, [ip("192.0.2.3")]);
            first.insert(d[0].host.clone());
        }
        assert_eq!(
            first.len(),
            2,
            "both orders of equal preferences appear: {first:?}"
        );
        // 1 MX + 3 x (A + AAAA) queries; everything after came from the cache.
        assert_eq!(dns.queries(), 7);
        assert_eq!(r.stats().queries_sent, 7);
        assert!(r.stats().cache_hits >= 63 * 7);
    });
}

#[test]
fn implicit_mx_and_ipv6() {
    run(|| async {
        let dns = TestDns::start(LOOPBACK_DNS);
        dns.add_aaaa("plain.example", "2001:db8::25".parse().unwrap());
        dns.add_a("plain.example", v4("192.0.2.25"));
        dns.add_mx("six.example", 5, "mx.six.example");
        dns.add_aaaa("mx.six.example", Ipv6Addr::LOCALHOST);
        let r = MxResolver::new(cfg(&dns));
        let d = r.resolve_mx("Plain.Example.").await.unwrap();
        assert_eq!(
            d,
            vec![Destination {
                host: "plain.example".into(),
                preference: 0,
                addrs: vec![ip("192.0.2.25"), ip("2001:db8::25")],
                mx_authentic: false,
                addr_authentic: false,
                expanded: None,
            }]
        );
        let d = r.resolve_mx("six.example").await.unwrap();
        assert_eq!(d[0].host, "mx.six.example");
        assert_eq!(d[0].addrs, [ip("::1")]);
        assert_eq!(r.lookup_ip("mx.six.example").await.unwrap(), [ip("::1")]);
        // A name with neither MX nor addresses.
        dns.add_mx("other.example", 1, "mx.other.example");
        dns.set_nxdomain("other.example");
        assert_eq!(r.resolve_mx("other.example").await, Err(DnsError::NxDomain));
    });
}

#[test]
fn null_mx_and_nxdomain_are_permanent_and_cached() {
    run(|| async {
        let dns = TestDns::start(LOOPBACK_DNS);
        dns.null_mx("nomail.example");
        let r = MxResolver::new(cfg(&dns));
        let e = r.resolve_mx("nomail.example").await.unwrap_err();
        assert_eq!(e, DnsError::NullMx);
        assert!(e.is_permanent());
        let e = r.resolve_mx("missing.example").await.unwrap_err();
        assert_eq!(e, DnsError::NxDomain);
        assert_eq!(
            e.enhanced_code(),
            crate::smtp::reply_parser::EnhancedCode::new(5, 1, 2)
        );
        let before = dns.queries();
        assert_eq!(
            r.resolve_mx("MISSING.example").await,
            Err(DnsError::NxDomain)
        );
        assert_eq!(
            r.lookup_ip("missing.example").await,
            Err(DnsError::NxDomain)
        );
        // The MX NXDOMAIN is cached; the A/AAAA lookups are new questions.
        assert_eq!(dns.queries(), before + 2);
        assert_eq!(
            r.lookup_ip("missing.example").await,
            Err(DnsError::NxDomain)
        );
        assert_eq!(dns.queries(), before + 2);
    });
}

#[test]
fn servfail_is_temporary_not_cached_and_recovers() {
    run(|| async {
        let dns = TestDns::start(LOOPBACK_DNS);
        dns.add_mx("flaky.example", 10, "mx.flaky.example");
        dns.add_a("mx.flaky.example", v4("192.0.2.7"));
        dns.set_servfail("flaky.example", true);
        let r = MxResolver::new(cfg(&dns));
        let e = r.resolve_mx("flaky.example").await.unwrap_err();
        assert!(
            matches!(e, DnsError::Temporary(ref m) if m.contains("SERVFAIL") || m.contains("Server Failure")),
            "{e:?}"
        );
        assert!(!e.is_permanent());
        assert_eq!(
            e.enhanced_code(),
            crate::smtp::reply_parser::EnhancedCode::new(4, 4, 3)
        );
        // Two attempts against the one server, nothing cached.
        assert_eq!(dns.queries(), 2);
        let e2 = r.resolve_mx("flaky.example").await.unwrap_err();
        assert!(matches!(e2, DnsError::Temporary(_)));
        assert_eq!(dns.queries(), 4);
        dns.set_servfail("flaky.example", false);
        let d = r.resolve_mx("flaky.example").await.unwrap();
        assert_eq!(d[0].addrs, [ip("192.0.2.7")]);
        // A host that SERVFAILs is skipped; with no other host the temporary error is returned.
        dns.add_a("mx2.flaky.example", v4("192.0.2.8"));
        dns.set_servfail("mx2.flaky.example", true);
        dns.add_mx("flaky2.example", 10, "mx2.flaky.example");
        let e = r.resolve_mx("flaky2.example").await.unwrap_err();
        assert!(matches!(e, DnsError::Temporary(_)), "{e:?}");
    });
}

#[test]
fn timeout_is_temporary_within_configured_time() {
    run(|| async {
        let dns = TestDns::start(LOOPBACK_DNS);
        dns.set_drop("slow.example", true);
        let r = MxResolver::new(DnsConfig {
            servers: vec![dns.addr()],
            timeout: Duration::from_millis(200),
            attempts: 2,
            ..DnsConfig::default()
        });
        let t0 = Instant::now();
        let e = r.resolve_mx("slow.example").await.unwrap_err();
        let took = t0.elapsed();
        assert!(
            matches!(e, DnsError::Temporary(ref m) if m.contains("within 200 ms")),
            "{e:?}"
        );
        assert!(took >= Duration::from_millis(390), "{took:?}");
        assert!(took < Duration::from_millis(1200), "{took:?}");
        assert_eq!(r.stats().timeouts, 2);
        assert_eq!(dns.queries(), 2);
    });
}

#[test]
fn falls_back_to_tcp_on_truncation() {
    run(|| async {
        let dns = TestDns::start(LOOPBACK_DNS);
        dns.add_mx("big.example", 10, "mx.big.example");
        dns.add_a("mx.big.example", v4("192.0.2.10"));
        dns.add_aaaa("mx.big.example", "2001:db8::10".parse().unwrap());
        dns.set_truncate_udp(true);
        let r = MxResolver::new(cfg(&dns));
        let d = r.resolve_mx("big.example").await.unwrap();
        assert_eq!(d[0].addrs, [ip("192.0.2.10"), ip("2001:db8::10")]);
        let s = r.stats();
        assert_eq!(s.tcp_fallbacks, 3);
        assert_eq!(s.queries_sent, 6);
        assert_eq!(dns.queries(), 6);
    });
}

#[test]
fn cache_hits_and_ttl_expiry() {
    run(|| async {
        let dns = TestDns::start(LOOPBACK_DNS);
        dns.set_ttl(1);
        dns.add_a("host.example", v4("192.0.2.20"));
        let r = MxResolver::new(cfg(&dns));
        assert_eq!(
            r.lookup_ip("host.example").await.unwrap(),
            [ip("192.0.2.20")]
        );
        assert_eq!(dns.queries(), 2);
        assert_eq!(
            r.lookup_ip("HOST.example.").await.unwrap(),
            [ip("192.0.2.20")]
        );
        assert_eq!(dns.queries(), 2, "answered from the cache");
        assert_eq!(r.stats().cache_hits, 2);
        glommio::timer::sleep(Duration::from_millis(1100)).await;
        dns.add_a("host.example", v4("192.0.2.21"));
        assert_eq!(
            r.lookup_ip("host.example").await.unwrap(),
            [ip("192.0.2.20"), ip("192.0.2.21")]
        );
        assert_eq!(dns.queries(), 4, "refetched after the TTL");
    });
}

#[test]
fn address_literals_need_no_dns() {
    run(|| async {
        let dns = TestDns::start(LOOPBACK_DNS);
        let r = MxResolver::new(cfg(&dns));
        let d = r.resolve_mx("[192.0.2.1]").await.unwrap();
        assert_eq!(d[0].addrs, [ip("192.0.2.1")]);
        assert_eq!(d[0].host, "[192.0.2.1]");
        assert_eq!(
            r.resolve_mx("[IPv6:::1]").await.unwrap()[0].addrs,
            [ip("::1")]
        );
        assert_eq!(
            r.resolve_mx("[ipv6:2001:db8::1]").await.unwrap()[0].addrs,
            [ip("2001:db8::1")]
        );
        for bad in [
            "[300.1.1.1]",
            "[IPv6:192.0.2.1x]",
            "[192.0.2.1",
            "[]",
            "[IPv6:]",
        ] {
            assert_eq!(r.resolve_mx(bad).await, Err(DnsError::NxDomain), "{bad}");
        }
        assert_eq!(r.lookup_ip("192.0.2.9").await.unwrap(), [ip("192.0.2.9")]);
        assert_eq!(r.lookup_ip("[192.0.2.9]").await.unwrap(), [ip("192.0.2.9")]);
        assert_eq!(r.stats().queries_sent, 0);
        assert_eq!(dns.queries(), 0);
    });
}

#[test]
fn caps_on_hosts_and_addresses_and_skipped_hosts() {
    run(|| async {
        let dns = TestDns::start(LOOPBACK_DNS);
        for h in 0..8u8 {
            let host = format!("mx{h}.many.example");
            dns.add_mx("many.example", u16::from(h), &host);
            for a in 0..3u8 {
                dns.add_a(&host, Ipv4Addr::new(192, 0, 2, h * 10 + a));
            }
        }
        let r = MxResolver::new(cfg(&dns));
        let d = r.resolve_mx("many.example").await.unwrap();
        let counts: Vec<usize> = d.iter().map(|d| d.addrs.len()).collect();
        assert_eq!(counts, [3, 3, 3, 1], "10 addresses in all");
        let r = MxResolver::new(DnsConfig {
            max_addresses: 100,
            ..cfg(&dns)
        });
        let d = r.resolve_mx("many.example").await.unwrap();
        assert_eq!(d.len(), 5, "at most max_mx_hosts hosts");
        assert_eq!(d[4].host, "mx4.many.example");

        // Hosts without addresses are skipped; none at all: NoAddress (temporary).
        dns.add_mx("partial.example", 1, "gone.partial.example");
        dns.add_mx("partial.example", 2, "noaddr.partial.example");
        dns.add_mx("partial.example", 3, "ok.partial.example");
        dns.add_mx("noaddr.partial.example", 1, "x.example");
        dns.add_a("ok.partial.example", v4("192.0.2.99"));
        let d = r.resolve_mx("partial.example").await.unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].host, "ok.partial.example");
        dns.add_mx("dead.example", 1, "gone.partial.example");
        dns.add_mx("dead.example", 2, "noaddr.partial.example");
        let e = r.resolve_mx("dead.example").await.unwrap_err();
        assert_eq!(e, DnsError::NoAddress);
        assert!(!e.is_permanent());
    });
}

#[test]
fn round_robin_over_servers_and_cache_bound() {
    run(|| async {
        let dns = TestDns::start(LOOPBACK_DNS);
        // A loopback port nobody answers on: connection refused, then the next server.
        let dead = {
            let s = std::net::UdpSocket::bind((LOOPBACK_DNS, 0)).unwrap();
            s.local_addr().unwrap()
        };
        for i in 0..10u8 {
            dns.add_a(&format!("h{i}.example"), Ipv4Addr::new(192, 0, 2, i));
        }
        let r = MxResolver::new(DnsConfig {
            servers: vec![dead, dns.addr()],
            cache_entries_max: 4,
            ..cfg(&dns)
        });
        assert_eq!(r.servers().len(), 2);
        for i in 0..10u8 {
            let got = r.lookup_ip(&format!("h{i}.example")).await.unwrap();
            assert_eq!(got, [IpAddr::V4(Ipv4Addr::new(192, 0, 2, i))]);
            assert!(r.cached_entries() <= 4);
        }
        assert_eq!(r.cached_entries(), 4);
        // Nothing configured and nothing reachable: temporary, never a panic.
        let none = MxResolver::new(DnsConfig {
            servers: vec![dead],
            timeout: Duration::from_millis(100),
            ..DnsConfig::default()
        });
        assert!(matches!(
            none.resolve_mx("h1.example").await,
            Err(DnsError::Temporary(_))
        ));
    });
}

#[test]
fn invalid_names_are_nxdomain_without_queries() {
    run(|| async {
        let dns = TestDns::start(LOOPBACK_DNS);
        let r = MxResolver::new(cfg(&dns));
        let long = "a".repeat(70);
        for bad in ["", ".", &format!("{long}.example"), "a..b"] {
            assert_eq!(r.resolve_mx(bad).await, Err(DnsError::NxDomain), "{bad:?}");
        }
        assert_eq!(dns.queries(), 0);
    });
}

/// With `dnssec = "trust-ad"` the queries carry AD and an answer counts as validated only when its AD bit
/// is set; the status is kept per answer (MX, addresses, TLSA) and survives the cache. With `off` nothing
/// counts as validated, whatever the server says.
#[test]
fn ad_bit_marks_validated_answers_only_when_trusted() {
    run(|| async {
        let dns = TestDns::start(LOOPBACK_DNS);
        dns.add_mx("signed.example", 10, "mx.signed.example");
        dns.add_mx("signed.example", 20, "mx.unsigned.example");
        dns.add_a("mx.signed.example", v4("192.0.2.1"));
        dns.add_a("mx.unsigned.example", v4("192.0.2.2"));
        dns.add_tlsa("_25._tcp.mx.signed.example", 3, 1, 1, &[0xab; 32]);
        dns.add_txt("_mta-sts.signed.example", "v=STSv1; id=1");
        for n in [
            "signed.example",
            "mx.signed.example",
            "_25._tcp.mx.signed.example",
        ] {
            dns.set_authentic(n, true);
        }
        let mut c = cfg(&dns);
        c.dnssec = Dnssec::TrustAd;
        let r = MxResolver::new(c.clone());
        for round in 0..2 {
            let d = r.resolve_mx("signed.example").await.unwrap();
            assert_eq!(d.len(), 2);
            assert_eq!(d[0].host, "mx.signed.example");
            assert!(d[0].mx_authentic && d[0].addr_authentic, "round {round}");
            assert!(d[1].mx_authentic && !d[1].addr_authentic, "round {round}");
            let t = r.lookup_tlsa("_25._tcp.mx.signed.example").await.unwrap();
            assert!(t.authentic);
            assert_eq!(
                t.value,
                vec![TlsaRecord {
                    usage: 3,
                    selector: 1,
                    matching: 1,
                    data: vec![0xab; 32]
                }]
            );
            let none = r.lookup_tlsa("_25._tcp.mx.unsigned.example").await.unwrap();
            assert!(none.value.is_empty() && !none.authentic);
            let txt = r.lookup_txt("_mta-sts.signed.example").await.unwrap();
            assert_eq!(txt.value, vec!["v=STSv1; id=1".to_string()]);
            assert!(!txt.authentic);
        }
        assert!(
            r.stats().cache_hits > 0,
            "the second round came from the cache"
        );
        // The server sets AD, but the operator does not trust it.
        c.dnssec = Dnssec::Off;
        let off = MxResolver::new(c);
        let d = off.resolve_mx("signed.example").await.unwrap();
        assert!(!d[0].mx_authentic && !d[0].addr_authentic);
        assert!(
            !off.lookup_tlsa("_25._tcp.mx.signed.example")
                .await
                .unwrap()
                .authentic
        );
        // A TLSA lookup that fails is an error, not "no TLSA".
        dns.set_servfail("_25._tcp.mx.signed.example", true);
        let fresh = MxResolver::new(cfg(&dns));
        assert!(matches!(
            fresh.lookup_tlsa("_25._tcp.mx.signed.example").await,
            Err(DnsError::Temporary(_))
        ));
    });
}

/// An MX host that is a CNAME: the addresses come from the chain's final name, which is reported (for DANE's
/// TLSA lookup, RFC 7672 section 2.2.3), validated only if every link is; a plain name reports none.
#[test]
fn cname_expansion_is_reported() {
    run(|| async {
        let dns = TestDns::start(LOOPBACK_DNS);
        dns.add_mx("alias.example", 10, "mx.alias.example");
        dns.add_cname("mx.alias.example", "Hop.Provider.Example");
        dns.add_cname("hop.provider.example", "host.provider.example");
        dns.add_a("host.provider.example", v4("192.0.2.80"));
        dns.add_mx("plain.example", 10, "host.provider.example");
        for n in [
            "alias.example",
            "mx.alias.example",
            "hop.provider.example",
            "host.provider.example",
            "plain.example",
        ] {
            dns.set_authentic(n, true);
        }
        let r = MxResolver::new(DnsConfig {
            dnssec: Dnssec::TrustAd,
            ..cfg(&dns)
        });
        let d = r.resolve_mx("alias.example").await.unwrap();
        assert_eq!(d[0].host, "mx.alias.example");
        assert_eq!(d[0].addrs, [ip("192.0.2.80")]);
        assert_eq!(d[0].expanded.as_deref(), Some("host.provider.example"));
        assert!(d[0].mx_authentic && d[0].addr_authentic);
        let (a, e) = r.lookup_ip_expanded("mx.alias.example").await.unwrap();
        assert_eq!((a.value, a.authentic), (vec![ip("192.0.2.80")], true));
        assert_eq!(e.as_deref(), Some("host.provider.example"));
        // Not an alias: nothing expanded.
        let d = r.resolve_mx("plain.example").await.unwrap();
        assert_eq!(d[0].expanded, None);
        // One unsigned link: the addresses are not validated.
        dns.set_authentic("hop.provider.example", false);
        let r = MxResolver::new(DnsConfig {
            dnssec: Dnssec::TrustAd,
            ..cfg(&dns)
        });
        let (a, e) = r.lookup_ip_expanded("mx.alias.example").await.unwrap();
        assert!(!a.authentic);
        assert_eq!(e.as_deref(), Some("host.provider.example"));
    });
}
