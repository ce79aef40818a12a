//! DANE for SMTP (RFC 7672): which TLSA records of an MX host are usable, whether a presented certificate
//! chain matches them, and the rustls [`DaneVerifier`] that makes the TLS handshake enforce that.
//!
//! Usable records (RFC 7672 section 3.1): DANE-TA(2) and DANE-EE(3) with selector Cert(0) or SPKI(1) and
//! matching type Full(0), SHA2-256(1) or SHA2-512(2). PKIX-TA(0)/PKIX-EE(1) are unusable for SMTP (section
//! 3.1.3), as is anything unknown. A DANE-EE record matches the server's own certificate, with no name or
//! expiry check (section 3.1.1). A DANE-TA record matches a certificate of the presented chain; the chain
//! must then validate up to it with the MX host name as the reference identity (section 3.2.2; done by a
//! rustls `WebPkiServerVerifier` whose only trust anchor is the matched certificate). Handshake signatures are
//! still verified (ring provider). The DNS side (validated MX, address and TLSA answers) is the caller's: see
//! `delivery::agent`.

use std::sync::Arc;

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use crate::dns::TlsaRecord;

/// Certificate usages (RFC 7218 acronyms).
pub const DANE_TA: u8 = 2;
pub const DANE_EE: u8 = 3;

/// What a host's TLSA records (from a validated answer) mean for the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsaVerdict {
    /// No TLSA records: DANE does not apply.
    None,
    /// Records exist but none is usable: TLS is mandatory, without authentication (RFC 7672 section 2.2).
    Unusable,
    /// The usable records: TLS is mandatory and the certificate must match one of them.
    Usable(Vec<TlsaRecord>),
}

/// Whether one record is usable for SMTP (see the module documentation).
pub fn usable(r: &TlsaRecord) -> bool {
    matches!(r.usage, DANE_TA | DANE_EE)
        && matches!(r.selector, 0 | 1)
        && match r.matching {
            0 => !r.data.is_empty(),
            1 => r.data.len() == 32,
            2 => r.data.len() == 64,
            _ => false,
        }
}

/// Sorts a validated TLSA answer into [`TlsaVerdict`].
pub fn verdict(records: &[TlsaRecord]) -> TlsaVerdict {
    if records.is_empty() {
        return TlsaVerdict::None;
    }
    let ok: Vec<TlsaRecord> = records.iter().filter(|r| usable(r)).cloned().collect();
    if ok.is_empty() {
        TlsaVerdict::Unusable
    } else {
        TlsaVerdict::Usable(ok)
    }
}

/// Whether `cert` (DER) matches the record's selector and matching type. A certificate that cannot be
/// parsed (for the SPKI selector) matches nothing.
pub fn matches(r: &TlsaRecord, cert: &[u8]) -> bool {
    if cert.is_empty() || r.data.is_empty() {
        return false;
    }
    let spki;
    let selected: &[u8] = match r.selector {
        0 => cert,
        1 => {
            let der = CertificateDer::from(cert);
            match webpki::EndEntityCert::try_from(&der) {
                Ok(ee) => {
                    spki = ee.subject_public_key_info();
                    spki.as_ref()
                }
                Err(_) => return false,
            }
        }
        _ => return false,
    };
    match r.matching {
        0 => selected == r.data.as_slice(),
        1 => ring::digest::digest(&ring::digest::SHA256, selected).as_ref() == r.data.as_slice(),
        2 => ring::digest::digest(&ring::digest::SHA512, selected).as_ref() == r.data.as_slice(),
        _ => false,
    }
}

/// The association data of a record `usage selector matching` for `cert` (what an operator publishes; also
/// the tests' way to make records).
pub fn association(cert: &[u8], selector: u8, matching: u8) -> Option<Vec<u8>> {
    let der = CertificateDer::from(cert);
    let selected: Vec<u8> = match selector {
        0 => cert.to_vec(),
        1 => webpki::EndEntityCert::try_from(&der)
            .ok()?
            .subject_public_key_info()
            .as_ref()
            .to_vec(),
        _ => return None,
    };
    match matching {
        0 => Some(selected),
        1 => Some(
            ring::digest::digest(&ring::digest::SHA256, &selected)
                .as_ref()
                .to_vec(),
        ),
        2 => Some(
            ring::digest::digest(&ring::digest::SHA512, &selected)
                .as_ref()
                .to_vec(),
        ),
        _ => None,
    }
}

/// Checks a presented chain against usable records for `host` (the MX host name). `Ok(text)` names the record
/// that matched; `Err(text)` says why none did.
pub fn check_chain(
    records: &[TlsaRecord],
    host: &str,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<String, String> {
    check_chain_names(records, &[host], end_entity, intermediates, now)
}

/// [`check_chain`] with several reference identifiers for DANE-TA: the MX host name and, when it is an alias,
/// its CNAME-expanded name (RFC 7672 section 3.2.2); the chain must validate for one of them. `names` must not
/// be empty (nothing then validates).
pub fn check_chain_names(
    records: &[TlsaRecord],
    names: &[&str],
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<String, String> {
    let host = names.first().copied().unwrap_or("");
    for r in records.iter().filter(|r| r.usage == DANE_EE) {
        if matches(r, end_entity) {
            return Ok(format!(
                "DANE-EE({} {} {})",
                r.usage, r.selector, r.matching
            ));
        }
    }
    let mut ta_error = None;
    for r in records.iter().filter(|r| r.usage == DANE_TA) {
        for ta in intermediates.iter().filter(|c| matches(r, c)) {
            match chain_to(ta, names, end_entity, intermediates, now) {
                Ok(()) => {
                    return Ok(format!(
                        "DANE-TA({} {} {})",
                        r.usage, r.selector, r.matching
                    ))
                }
                Err(e) => ta_error = Some(e),
            }
        }
    }
    Err(match ta_error {
        Some(e) => format!("DANE-TA: the chain does not validate to the matched trust anchor: {e}"),
        None => format!(
            "no TLSA record of {host} matches the presented certificate chain ({} certificate(s))",
            1 + intermediates.len()
        ),
    })
}

/// PKIX validation of the chain with `ta` as the only trust anchor and one of `names` as the reference identity.
fn chain_to(
    ta: &CertificateDer<'_>,
    names: &[&str],
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ta.clone().into_owned())
        .map_err(|e| e.to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let v = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| e.to_string())?;
    let mut last = String::from("no reference identifier");
    for host in names {
        let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
        match v.verify_server_cert(end_entity, intermediates, &name, &[], now) {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// A rustls verifier that accepts a server certificate only if it matches one of the usable TLSA records of
/// `host` (see the module documentation).
#[derive(Debug)]
pub struct DaneVerifier {
    records: Vec<TlsaRecord>,
    /// The reference identifiers for DANE-TA: the MX host name, then its CNAME expansion if any.
    names: Vec<String>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl DaneVerifier {
    /// `records` should be the usable ones ([`TlsaVerdict::Usable`]); `host` is the MX host name.
    pub fn new(records: Vec<TlsaRecord>, host: &str) -> DaneVerifier {
        DaneVerifier {
            records,
            names: vec![host.to_ascii_lowercase()],
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }

    /// Adds the host's CNAME-expanded name as a second reference identifier (RFC 7672 section 3.2.2).
    pub fn with_alias(mut self, expanded: Option<&str>) -> DaneVerifier {
        if let Some(e) = expanded {
            let e = e.to_ascii_lowercase();
            if !self.names.contains(&e) {
                self.names.push(e);
            }
        }
        self
    }

    /// A client configuration using this verifier.
    pub fn client_config(self) -> Arc<rustls::ClientConfig> {
        crate::tls::install_crypto_provider();
        Arc::new(
            rustls::ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(self))
                .with_no_client_auth(),
        )
    }
}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let names: Vec<&str> = self.names.iter().map(String::as_str).collect();
        check_chain_names(&self.records, &names, end_entity, intermediates, now)
            .map(|_| ServerCertVerified::assertion())
            .map_err(|e| rustls::Error::General(format!("DANE: {e}")))
    }

    crate::tls::provider_signature_checks!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::test_pki::TestCa;

    fn rec(usage: u8, selector: u8, matching: u8, data: Vec<u8>) -> TlsaRecord {
        TlsaRecord {
            usage,
            selector,
            matching,
            data,
        }
    }

    #[test]
    fn usable_records_and_verdicts() {
        assert!(usable(&rec(3, 1, 1, vec![0; 32])));
        assert!(usable(&rec(2, 0, 2, vec![0; 64])));
        assert!(usable(&rec(3, 0, 0, vec![1, 2])));
        assert!(!usable(&rec(1, 1, 1, vec![0; 32])), "PKIX-EE");
        assert!(!usable(&rec(0, 1, 1, vec![0; 32])), "PKIX-TA");
        assert!(!usable(&rec(3, 2, 1, vec![0; 32])), "unknown selector");
        assert!(!usable(&rec(3, 1, 3, vec![0; 32])), "unknown matching");
        assert!(!usable(&rec(3, 1, 1, vec![0; 31])), "wrong digest length");
        assert_eq!(verdict(&[]), TlsaVerdict::None);
        assert_eq!(verdict(&[rec(1, 1, 1, vec![0; 32])]), TlsaVerdict::Unusable);
        assert_eq!(
            verdict(&[rec(1, 1, 1, vec![0; 32]), rec(3, 1, 1, vec![7; 32])]),
            TlsaVerdict::Usable(vec![rec(3, 1, 1, vec![7; 32])])
        );
    }

    #[test]
    fn ee_matching_all_selectors_and_types() {
        let ca = TestCa::new();
        let leaf = ca.leaf("mx.dane.test");
        let other = ca.leaf("mx.other.test");
        let now = UnixTime::now();
        for selector in [0u8, 1] {
            for matching in [0u8, 1, 2] {
                let data = association(leaf.der.as_ref(), selector, matching).unwrap();
                let r = rec(3, selector, matching, data);
                assert!(matches(&r, leaf.der.as_ref()), "{selector} {matching}");
                assert!(!matches(&r, other.der.as_ref()), "{selector} {matching}");
                // DANE-EE: no name check (the record names no host), the issuer is irrelevant.
                assert!(check_chain(
                    std::slice::from_ref(&r),
                    "any.name.test",
                    &leaf.der,
                    &[],
                    now
                )
                .is_ok());
                assert!(check_chain(&[r], "mx.dane.test", &other.der, &[], now).is_err());
            }
        }
        // SPKI selector: a new certificate for the same key still matches; the full one does not.
        let spki = association(leaf.der.as_ref(), 1, 1).unwrap();
        assert_eq!(spki.len(), 32);
        assert_ne!(spki, association(leaf.der.as_ref(), 0, 1).unwrap());
        // Garbage never matches and never panics.
        assert!(!matches(&rec(3, 1, 1, spki), b"\x30\x03\x02\x01"));
        assert!(!matches(&rec(3, 0, 0, vec![]), b""));
    }

    #[test]
    fn ta_matching_validates_the_chain_with_the_mx_name() {
        let ca = TestCa::new();
        let leaf = ca.leaf("mx.dane.test");
        let ca_der = ca.cert_der();
        let now = UnixTime::now();
        for selector in [0u8, 1] {
            let r = rec(
                2,
                selector,
                1,
                association(ca_der.as_ref(), selector, 1).unwrap(),
            );
            let chain = [ca_der.clone()];
            let ok = check_chain(
                std::slice::from_ref(&r),
                "mx.dane.test",
                &leaf.der,
                &chain,
                now,
            );
            assert!(
                ok.as_deref().is_ok_and(|m| m.starts_with("DANE-TA")),
                "{ok:?}"
            );
            // The reference identity is the MX host name.
            let wrong = check_chain(
                std::slice::from_ref(&r),
                "mx.evil.test",
                &leaf.der,
                &chain,
                now,
            );
            assert!(wrong.is_err(), "{wrong:?}");
            // The trust anchor must be in the presented chain.
            assert!(check_chain(&[r], "mx.dane.test", &leaf.der, &[], now).is_err());
        }
        // An alias: the certificate names the CNAME-expanded name; either name is a reference identifier.
        let r = rec(2, 0, 1, association(ca_der.as_ref(), 0, 1).unwrap());
        let chain = [ca_der.clone()];
        assert!(check_chain(
            std::slice::from_ref(&r),
            "mx.alias.test",
            &leaf.der,
            &chain,
            now
        )
        .is_err());
        assert!(check_chain_names(
            std::slice::from_ref(&r),
            &["mx.alias.test", "mx.dane.test"],
            &leaf.der,
            &chain,
            now
        )
        .is_ok());
        // A leaf of another CA does not chain to the matched anchor.
        let ca2 = TestCa::new();
        let stranger = ca2.leaf("mx.dane.test");
        let r = rec(2, 0, 1, association(ca_der.as_ref(), 0, 1).unwrap());
        assert!(check_chain(&[r], "mx.dane.test", &stranger.der, &[ca_der], now).is_err());
    }
}
