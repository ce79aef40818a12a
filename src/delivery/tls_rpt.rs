//! TLS-RPT awareness (RFC 8460): the result of a delivery attempt under a policy that TLS reporting covers
//! (DANE: policy type `tlsa`; MTA-STS: `sts`), named with RFC 8460's result types, so that the delivery log
//! holds what a report would aggregate (per policy domain and MX host: successes and failures by type). No
//! report is sent (see README, "Secure delivery").

/// RFC 8460 section 4.3 result types (and `success`), as the delivery log's `tls_result` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsResult {
    Success,
    /// STARTTLS was not offered (or refused) where the policy requires TLS.
    StarttlsNotSupported,
    /// The certificate does not name the host.
    CertificateHostMismatch,
    CertificateExpired,
    /// The certificate chain does not lead to a trusted root (MTA-STS).
    CertificateNotTrusted,
    /// Any other failure to validate: an MX host the MTA-STS policy does not list, a policy whose CA bundle
    /// cannot be read, a failure MTA-STS testing mode records.
    ValidationFailure,
    /// No TLSA record of the validated set matches the presented certificate (DANE).
    TlsaInvalid,
    /// The TLSA lookup failed on a DNSSEC-validated path (no valid records returned).
    DnssecInvalid,
    /// `dane-only` and the host has no usable validated TLSA records.
    DaneRequired,
}

impl TlsResult {
    pub fn name(self) -> &'static str {
        match self {
            TlsResult::Success => "success",
            TlsResult::StarttlsNotSupported => "starttls-not-supported",
            TlsResult::CertificateHostMismatch => "certificate-host-mismatch",
            TlsResult::CertificateExpired => "certificate-expired",
            TlsResult::CertificateNotTrusted => "certificate-not-trusted",
            TlsResult::ValidationFailure => "validation-failure",
            TlsResult::TlsaInvalid => "tlsa-invalid",
            TlsResult::DnssecInvalid => "dnssec-invalid",
            TlsResult::DaneRequired => "dane-required",
        }
    }
}

/// The TLS-RPT policy type of a delivery-log policy label: `tlsa` (DANE), `sts` (MTA-STS), None for the
/// configured levels (`none`, `may`, `encrypt`, `verify`), which TLS-RPT does not report on.
pub fn policy_type(label: &str) -> Option<&'static str> {
    match label {
        "dane" | "dane-only" => Some("tlsa"),
        "mta-sts-enforce" | "mta-sts-testing" => Some("sts"),
        _ => None,
    }
}

/// `result` when the policy `label` is one TLS-RPT covers, else None (nothing to report).
pub fn under(label: &str, result: TlsResult) -> Option<TlsResult> {
    policy_type(label).map(|_| result)
}

/// The result type of a failed TLS handshake under the policy `label`: the certificate errors rustls reports
/// (the error travels inside the I/O error of the handshake), by kind. Under DANE a certificate that is not
/// named or trusted is one no TLSA record vouches for (`tlsa-invalid`); under MTA-STS (WebPKI) it is
/// `certificate-not-trusted`.
pub fn of_handshake_error(label: &str, e: &std::io::Error) -> TlsResult {
    use rustls::CertificateError as C;
    let dane = policy_type(label) == Some("tlsa");
    let untrusted = if dane {
        TlsResult::TlsaInvalid
    } else {
        TlsResult::CertificateNotTrusted
    };
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                TlsResult::CertificateHostMismatch
            }
            C::Expired | C::ExpiredContext { .. } => TlsResult::CertificateExpired,
            _ => untrusted,
        },
        // Our DANE verifier's mismatch (see `dane::DaneVerifier`).
        Some(rustls::Error::General(_)) if dane => TlsResult::TlsaInvalid,
        _ => TlsResult::ValidationFailure,
    }
}

/// The TLS policy an attempt that reached no server was under (its delivery-log label), and its result type
/// when TLS-RPT covers that policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyApplied {
    pub label: &'static str,
    pub result: Option<TlsResult>,
}

impl PolicyApplied {
    /// `label` with `result` kept only when TLS-RPT covers the policy.
    pub fn new(label: &'static str, result: Option<TlsResult>) -> PolicyApplied {
        PolicyApplied {
            label,
            result: result.filter(|_| policy_type(label).is_some()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(e: rustls::Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn policy_types() {
        assert_eq!(policy_type("dane"), Some("tlsa"));
        assert_eq!(policy_type("dane-only"), Some("tlsa"));
        assert_eq!(policy_type("mta-sts-enforce"), Some("sts"));
        assert_eq!(policy_type("mta-sts-testing"), Some("sts"));
        for l in ["none", "may", "encrypt", "verify", ""] {
            assert_eq!(policy_type(l), None, "{l}");
            assert_eq!(under(l, TlsResult::Success), None);
        }
        assert_eq!(
            under("dane", TlsResult::Success).map(TlsResult::name),
            Some("success")
        );
    }

    #[test]
    fn handshake_errors_by_kind_and_policy() {
        use rustls::CertificateError as C;
        let cert = |c| io(rustls::Error::InvalidCertificate(c));
        for label in ["dane", "mta-sts-enforce"] {
            assert_eq!(
                of_handshake_error(label, &cert(C::NotValidForName)),
                TlsResult::CertificateHostMismatch
            );
            assert_eq!(
                of_handshake_error(label, &cert(C::Expired)),
                TlsResult::CertificateExpired
            );
        }
        assert_eq!(
            of_handshake_error("mta-sts-enforce", &cert(C::UnknownIssuer)),
            TlsResult::CertificateNotTrusted
        );
        assert_eq!(
            of_handshake_error("dane", &cert(C::UnknownIssuer)),
            TlsResult::TlsaInvalid
        );
        assert_eq!(
            of_handshake_error("dane", &io(rustls::Error::General("DANE: no match".into()))),
            TlsResult::TlsaInvalid
        );
        assert_eq!(
            of_handshake_error("mta-sts-enforce", &io(rustls::Error::General("x".into()))),
            TlsResult::ValidationFailure
        );
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(
            of_handshake_error("dane", &reset),
            TlsResult::ValidationFailure
        );
    }
}
