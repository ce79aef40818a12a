//! Outbound transport security per MX host: which policy applies (DANE, RFC 7672; MTA-STS, RFC 8461; or the
//! configured TLS level), and the TLS client configuration that enforces it. The owner of this decision; the
//! agent asks it once per host before connecting, [`super::outbound`] applies what it says.
//!
//! Order (DANE takes precedence over MTA-STS, RFC 8461 section 2):
//! 1. Level `none` or `verify`: the operator's explicit choice, nothing else applies.
//! 2. DANE, with `dns.dnssec = "trust-ad"`, when the MX answer and the host's addresses were validated (for a
//!    `[host]` route: its address answer): the TLSA records of `_<port>._tcp.<host>` (an alias: of its
//!    CNAME-expanded name first, then of the name itself, RFC 7672 section 2.2.3). Validated and usable:
//!    TLS mandatory, the certificate must match (`dane`). Validated but none usable: TLS mandatory without
//!    authentication (at least `encrypt`, RFC 7672 section 2.2), and no DANE: steps 3 to 5 still apply.
//!    Not validated, or none: no DANE. The lookup failed (SERVFAIL, timeout) on an otherwise validated path:
//!    this host is not used (it may be an attack).
//! 3. `dane-only`: without DANE-authenticated TLS (usable records) the host is not used.
//! 4. MTA-STS (MX routes only), `enforce`: only hosts matching the policy's `mx` patterns, TLS mandatory, the
//!    certificate verified for the host name (`mta-sts-enforce`). `testing`: delivery as the level says, with
//!    what would have failed recorded (`mta-sts-testing`).
//! 5. Otherwise the level (`dane` without DANE is `may`).

use std::sync::Arc;

use super::tls_rpt::{PolicyApplied, TlsResult};
use super::trouble::{Scope, Trouble};
use crate::config::TlsLevel;
use crate::dane::{self, TlsaVerdict};
use crate::dns::{Dnssec, MxResolver, TlsaRecord};
use crate::mta_sts::{Mode, Policy, Sts, TestingVerifier};
use crate::smtp::reply_parser::EnhancedCode;

/// The DANE side of one host, as looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tlsa {
    /// Not looked up (no trust in the resolver, or the path to the host was not validated).
    NotApplicable,
    /// The TLSA answer was not validated.
    Insecure,
    /// The lookup failed.
    Failed(String),
    /// A validated answer.
    Validated(TlsaVerdict),
}

/// What applies to one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// DANE-authenticated TLS with these usable records.
    Dane(Vec<TlsaRecord>),
    /// MTA-STS enforce: TLS with a certificate verified for the host name.
    StsEnforce,
    /// MTA-STS testing: `level`, what would fail is recorded (`note`: already known, e.g. the host is not
    /// in the policy).
    StsTesting {
        level: TlsLevel,
        note: Option<String>,
    },
    /// A plain level (`encrypt` also for an unusable TLSA set).
    Level(TlsLevel),
    /// Do not use this host: the policy named `label` forbids it, for the reason `why` (its TLS-RPT result
    /// type: `result`).
    Refuse {
        label: &'static str,
        why: String,
        result: TlsResult,
    },
}

impl Choice {
    /// The policy's name in the delivery log.
    pub fn label(&self) -> &'static str {
        match self {
            Choice::Dane(_) => "dane",
            Choice::StsEnforce => "mta-sts-enforce",
            Choice::StsTesting { .. } => "mta-sts-testing",
            Choice::Level(l) => l.as_str(),
            Choice::Refuse { label, .. } => label,
        }
    }
}

/// Whether the level lets DANE apply (see the module documentation).
pub fn dane_applies(level: TlsLevel) -> bool {
    matches!(
        level,
        TlsLevel::May | TlsLevel::Encrypt | TlsLevel::Dane | TlsLevel::DaneOnly
    )
}

/// The decision for `host` (pure; see the module documentation).
pub fn choose(level: TlsLevel, tlsa: &Tlsa, sts: Option<&Policy>, host: &str) -> Choice {
    if !dane_applies(level) {
        return Choice::Level(level);
    }
    // A validated TLSA set with no usable record: TLS is mandatory, unauthenticated (RFC 7672 section 2.2), but
    // it is not a working DANE: `dane-only` refuses it, MTA-STS still applies (RFC 8461 section 2).
    let mut unusable = false;
    match tlsa {
        Tlsa::Validated(TlsaVerdict::Usable(records)) => return Choice::Dane(records.clone()),
        Tlsa::Validated(TlsaVerdict::Unusable) => unusable = true,
        Tlsa::Failed(e) => {
            return Choice::Refuse {
                label: "dane",
                why: format!("TLSA lookup for {host} failed on a DNSSEC-validated path: {e}"),
                result: TlsResult::DnssecInvalid,
            }
        }
        Tlsa::NotApplicable | Tlsa::Insecure | Tlsa::Validated(TlsaVerdict::None) => {}
    }
    if level == TlsLevel::DaneOnly {
        return Choice::Refuse {
            label: "dane-only",
            why: format!("dane-only: {host} has no usable DNSSEC-validated TLSA records"),
            result: TlsResult::DaneRequired,
        };
    }
    let level = if unusable {
        TlsLevel::Encrypt
    } else if level == TlsLevel::Dane {
        TlsLevel::May
    } else {
        level
    };
    match sts {
        Some(p) if p.mode == Mode::Enforce => {
            if p.allows(host) {
                Choice::StsEnforce
            } else {
                Choice::Refuse {
                    label: "mta-sts-enforce",
                    why: format!(
                        "MTA-STS policy (enforce) does not list MX host {host} (mx: {})",
                        p.mx.join(", ")
                    ),
                    result: TlsResult::ValidationFailure,
                }
            }
        }
        Some(p) if p.mode == Mode::Testing => Choice::StsTesting {
            level,
            note: (!p.allows(host)).then(|| format!("MX host {host} is not in the policy")),
        },
        _ => Choice::Level(level),
    }
}

/// What the agent needs to connect to one host under its policy.
pub struct HostSecurity {
    /// The level the session runs at (`Encrypt` for DANE and MTA-STS enforce: TLS mandatory).
    pub level: TlsLevel,
    /// The client configuration of DANE or MTA-STS (None: the level's).
    pub config: Option<Arc<rustls::ClientConfig>>,
    pub label: &'static str,
    /// MTA-STS testing: the verifier recording certificate failures, and what is already known to fail.
    pub testing: Option<(Arc<TestingVerifier>, Option<String>)>,
}

impl HostSecurity {
    /// The security for the next address of the same host: the same, except that MTA-STS testing gets a fresh
    /// recording verifier, so what one address's handshake found is not reported for another's connection.
    pub fn for_next_address(&self, sts_state: &Sts) -> HostSecurity {
        let testing = self.testing.as_ref().map(|(_, note)| {
            let (cfg, v) = sts_state.testing_config();
            (cfg, v, note.clone())
        });
        match testing {
            Some((cfg, v, note)) => HostSecurity {
                level: self.level,
                config: self.config.as_ref().map(|_| cfg),
                label: self.label,
                testing: Some((v, note)),
            },
            None => HostSecurity {
                level: self.level,
                config: self.config.clone(),
                label: self.label,
                testing: None,
            },
        }
    }

    /// After a connection under MTA-STS testing: what enforce would have refused (None: nothing).
    pub fn would_fail(&self, tls_on: bool) -> Option<String> {
        let (v, note) = self.testing.as_ref()?;
        let mut why: Vec<String> = note.iter().cloned().collect();
        if !tls_on {
            why.push("no TLS".into());
        }
        why.extend(v.failure());
        (!why.is_empty()).then(|| why.join("; "))
    }
}

/// The refusal of a host (4.7.5, try the next host).
pub fn refusal(why: &str) -> Trouble {
    Trouble::local(
        Scope::Site,
        true,
        EnhancedCode::new(4, 7, 5),
        why.to_string(),
    )
}

/// One host to decide for.
pub struct Target<'a> {
    pub host: &'a str,
    pub port: u16,
    /// The MX answer (for a route: nothing) and the host's address answers were DNSSEC-validated.
    pub validated: bool,
    /// The destination's configured level.
    pub level: TlsLevel,
    /// The host name's CNAME expansion (when its address answer followed a chain; validated as `validated` says).
    pub expanded: Option<&'a str>,
}

/// The TLSA records of `host` (RFC 7672 section 2.2.3, RFC 7671 section 7): when its (validated) address
/// answer came through a CNAME chain, at the expanded name first; a validated denial there (no records) falls
/// back to the original name. An unvalidated answer at the expanded name is no DANE, a failed lookup fails.
async fn lookup_tlsa(resolver: &MxResolver, port: u16, host: &str, expanded: Option<&str>) -> Tlsa {
    let at = |name: &str| format!("_{port}._tcp.{name}");
    if let Some(e) = expanded {
        match resolver.lookup_tlsa(&at(e)).await {
            Ok(s) if s.authentic && !s.value.is_empty() => {
                return Tlsa::Validated(dane::verdict(&s.value))
            }
            Ok(s) if s.authentic => {}
            Ok(_) => return Tlsa::Insecure,
            Err(err) => return Tlsa::Failed(err.to_string()),
        }
    }
    match resolver.lookup_tlsa(&at(host)).await {
        Ok(s) if s.authentic => Tlsa::Validated(dane::verdict(&s.value)),
        Ok(_) => Tlsa::Insecure,
        Err(e) => Tlsa::Failed(e.to_string()),
    }
}

/// Looks up what is needed for the target host and decides. `sts`: the domain's policy in force (MX routes
/// only). `Err((policy, trouble))`: the host must not be used.
pub async fn for_host(
    resolver: &MxResolver,
    dnssec: Dnssec,
    sts_state: &Sts,
    target: Target<'_>,
    sts: Option<&Policy>,
) -> Result<HostSecurity, (PolicyApplied, Trouble)> {
    let Target {
        host,
        port,
        validated,
        level,
        expanded,
    } = target;
    let tlsa = if dnssec == Dnssec::TrustAd && validated && dane_applies(level) {
        lookup_tlsa(resolver, port, host, expanded).await
    } else {
        Tlsa::NotApplicable
    };
    let choice = choose(level, &tlsa, sts, host);
    let label = choice.label();
    Ok(match choice {
        Choice::Dane(records) => HostSecurity {
            level: TlsLevel::Encrypt,
            config: Some(
                dane::DaneVerifier::new(records, host)
                    .with_alias(expanded)
                    .client_config(),
            ),
            label,
            testing: None,
        },
        Choice::StsEnforce => HostSecurity {
            level: TlsLevel::Encrypt,
            config: Some(sts_state.enforce_config().map_err(|e| {
                (
                    PolicyApplied::new(label, Some(TlsResult::ValidationFailure)),
                    refusal(&format!("MTA-STS enforce: {e}")),
                )
            })?),
            label,
            testing: None,
        },
        Choice::StsTesting { level, note } => {
            let (cfg, v) = sts_state.testing_config();
            HostSecurity {
                level,
                config: (level != TlsLevel::None).then_some(cfg),
                label,
                testing: Some((v, note)),
            }
        }
        Choice::Level(level) => HostSecurity {
            level,
            config: None,
            label,
            testing: None,
        },
        Choice::Refuse { label, why, result } => {
            return Err((PolicyApplied::new(label, Some(result)), refusal(&why)))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pol(mode: Mode) -> Policy {
        Policy {
            mode,
            mx: vec!["*.good.test".into()],
            max_age: 86_400,
        }
    }

    fn ee() -> Vec<TlsaRecord> {
        vec![TlsaRecord {
            usage: 3,
            selector: 1,
            matching: 1,
            data: vec![1; 32],
        }]
    }

    #[test]
    fn precedence() {
        use TlsLevel::{Dane, DaneOnly, Encrypt, May, Verify};
        let usable = Tlsa::Validated(TlsaVerdict::Usable(ee()));
        let enforce = pol(Mode::Enforce);
        let testing = pol(Mode::Testing);
        // DANE first, whatever MTA-STS says.
        for level in [May, Encrypt, Dane, DaneOnly] {
            assert_eq!(
                choose(level, &usable, Some(&enforce), "mx.bad.test"),
                Choice::Dane(ee())
            );
        }
        // none and verify are the operator's explicit choice.
        assert_eq!(
            choose(TlsLevel::None, &usable, Some(&enforce), "mx.bad.test"),
            Choice::Level(TlsLevel::None)
        );
        assert_eq!(
            choose(Verify, &usable, None, "mx.good.test"),
            Choice::Level(Verify)
        );
        // Unusable TLSA: encrypt.
        let unusable = Tlsa::Validated(TlsaVerdict::Unusable);
        assert_eq!(choose(May, &unusable, None, "h"), Choice::Level(Encrypt));
        assert_eq!(choose(May, &unusable, None, "h").label(), "encrypt");
        // A failed lookup on a validated path: not this host.
        assert_eq!(
            choose(May, &Tlsa::Failed("SERVFAIL".into()), None, "h").label(),
            "dane"
        );
        assert!(matches!(
            choose(May, &Tlsa::Failed("x".into()), None, "h"),
            Choice::Refuse { .. }
        ));
        // Insecure TLSA, or none: MTA-STS.
        for t in [
            Tlsa::Insecure,
            Tlsa::NotApplicable,
            Tlsa::Validated(TlsaVerdict::None),
        ] {
            assert_eq!(
                choose(May, &t, Some(&enforce), "mx.good.test"),
                Choice::StsEnforce
            );
            let refused = choose(May, &t, Some(&enforce), "mx.bad.test");
            assert_eq!(refused.label(), "mta-sts-enforce");
            assert!(matches!(refused, Choice::Refuse { why, .. } if why.contains("mx.bad.test")));
            assert_eq!(
                choose(Dane, &t, Some(&testing), "mx.bad.test"),
                Choice::StsTesting {
                    level: May,
                    note: Some("MX host mx.bad.test is not in the policy".into())
                }
            );
            assert_eq!(
                choose(DaneOnly, &t, Some(&testing), "mx.good.test").label(),
                "dane-only"
            );
            assert_eq!(choose(Dane, &t, None, "h"), Choice::Level(May));
            assert_eq!(
                choose(Encrypt, &t, Some(&pol(Mode::None)), "h"),
                Choice::Level(Encrypt)
            );
        }
    }

    /// `dane-only` is satisfied only by usable records: a validated set of only unusable records (PKIX-EE
    /// `1 1 1` here) is refused like no TLSA at all, whatever MTA-STS says.
    #[test]
    fn dane_only_refuses_unusable_tlsa() {
        let unusable = Tlsa::Validated(dane::verdict(&[TlsaRecord {
            usage: 1,
            selector: 1,
            matching: 1,
            data: vec![7; 32],
        }]));
        assert_eq!(unusable, Tlsa::Validated(TlsaVerdict::Unusable));
        for sts in [None, Some(pol(Mode::Enforce)), Some(pol(Mode::Testing))] {
            let c = choose(TlsLevel::DaneOnly, &unusable, sts.as_ref(), "mx.good.test");
            assert_eq!(c.label(), "dane-only", "{c:?}");
            assert!(
                matches!(&c, Choice::Refuse { why, .. } if why.contains("mx.good.test")),
                "{c:?}"
            );
        }
    }

    /// An unusable TLSA set is no working DANE, so it does not take precedence over MTA-STS (RFC 8461
    /// section 2): enforce still limits the MX hosts and verifies the certificate; testing still records, with
    /// TLS mandatory (RFC 7672 section 2.2).
    #[test]
    fn unusable_tlsa_keeps_mta_sts_enforce() {
        use TlsLevel::{Dane, Encrypt, May};
        let unusable = Tlsa::Validated(TlsaVerdict::Unusable);
        let enforce = pol(Mode::Enforce);
        for level in [May, Encrypt, Dane] {
            assert_eq!(
                choose(level, &unusable, Some(&enforce), "mx.good.test"),
                Choice::StsEnforce
            );
            let refused = choose(level, &unusable, Some(&enforce), "mx.bad.test");
            assert_eq!(refused.label(), "mta-sts-enforce", "{refused:?}");
            assert!(matches!(refused, Choice::Refuse { .. }));
            assert_eq!(
                choose(level, &unusable, Some(&pol(Mode::Testing)), "mx.bad.test"),
                Choice::StsTesting {
                    level: Encrypt,
                    note: Some("MX host mx.bad.test is not in the policy".into())
                }
            );
            assert_eq!(choose(level, &unusable, None, "h"), Choice::Level(Encrypt));
        }
    }
}

#[cfg(test)]
mod next_address_tests {
    use super::*;

    /// Each address of a host gets its own MTA-STS testing verifier (a certificate problem found on one
    /// address is not reported for the connection made to the next); other policies are kept as they are.
    #[test]
    fn each_address_gets_a_fresh_testing_verifier() {
        glommio::LocalExecutor::default().run(async {
            let dns = crate::dns::DnsConfig {
                servers: vec!["127.0.0.1:9".parse().unwrap()],
                ..Default::default()
            };
            let sts = Sts::new(
                &crate::mta_sts::MtaStsConfig::default(),
                None,
                MxResolver::new(dns),
            );
            let (cfg, v) = sts.testing_config();
            let first = HostSecurity {
                level: TlsLevel::May,
                config: Some(cfg),
                label: "mta-sts-testing",
                testing: Some((v.clone(), Some("MX host h is not in the policy".into()))),
            };
            let next = first.for_next_address(&sts);
            let (v2, note) = next.testing.as_ref().expect("still testing");
            assert!(!Arc::ptr_eq(&v, v2), "a fresh verifier");
            assert_eq!(note.as_deref(), Some("MX host h is not in the policy"));
            assert!(next.config.is_some() && next.label == "mta-sts-testing");
            let plain = HostSecurity {
                level: TlsLevel::Encrypt,
                config: None,
                label: "encrypt",
                testing: None,
            }
            .for_next_address(&sts);
            assert!(plain.testing.is_none() && plain.config.is_none());
            assert_eq!(plain.level, TlsLevel::Encrypt);
        });
    }
}
