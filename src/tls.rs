//! TLS for the SMTP server: the rustls server configuration (TLS 1.2 and 1.3, ring provider) and the first-start
//! self-signed certificate kept in the spool.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no {what} found in PEM file")]
    Missing { path: PathBuf, what: &'static str },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    #[error("bad certificate or key: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The handshake-signature methods of a rustls `ServerCertVerifier` whose certificate check is its own (DANE,
/// MTA-STS testing): TLS 1.2 and 1.3 signatures verified, and the schemes offered, with the algorithms of the
/// verifier's `provider` field (an `Arc<rustls::crypto::CryptoProvider>`). Used inside the `impl` block.
macro_rules! provider_signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}
pub(crate) use provider_signature_checks;

/// Installs the ring crypto provider once per process (rustls panics if two providers are compiled in and none is set).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })
}

fn load_pem(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut read(cert_path)?.as_slice())
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::Missing {
            path: cert_path.into(),
            what: "certificate",
        });
    }
    let key = rustls_pemfile::private_key(&mut read(key_path)?.as_slice())
        .ok()
        .flatten()
        .ok_or_else(|| TlsError::Missing {
            path: key_path.into(),
            what: "private key",
        })?;
    Ok((certs, key))
}

/// Writes a self-signed certificate for `hostname` into the spool `dir` unless one is there; returns (cert, key)
/// paths. Both files are the spool's own (0600, created without following symlinks, see [`crate::spool`]).
pub fn ensure_self_signed(dir: &Path, hostname: &str) -> Result<(PathBuf, PathBuf), TlsError> {
    const CERT: &str = "selfsigned-cert.pem";
    const KEY: &str = "selfsigned-key.pem";
    let write_err = |path: PathBuf| {
        move |e: crate::spool::SpoolError| TlsError::Write {
            path,
            source: std::io::Error::other(e.to_string()),
        }
    };
    let spool = crate::spool::Dir::open_root(dir).map_err(write_err(dir.into()))?;
    let (cert_path, key_path) = (dir.join(CERT), dir.join(KEY));
    if spool.open_file(CERT, false).is_ok() && spool.open_file(KEY, false).is_ok() {
        return Ok((cert_path, key_path));
    }
    let names = vec![hostname.to_string(), "localhost".to_string()];
    let ck =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    spool
        .replace_file(KEY, ck.signing_key.serialize_pem().as_bytes(), true)
        .map_err(write_err(key_path.clone()))?;
    spool
        .replace_file(CERT, ck.cert.pem().as_bytes(), true)
        .map_err(write_err(cert_path.clone()))?;
    Ok((cert_path, key_path))
}

/// A rustls server configuration from PEM files (TLS 1.2 and 1.3).
pub fn server_config(
    cert_path: &Path,
    key_path: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    install_crypto_provider();
    let (certs, key) = load_pem(cert_path, key_path)?;
    let cfg = rustls::ServerConfig::builder_with_protocol_versions(&[
        &rustls::version::TLS13,
        &rustls::version::TLS12,
    ])
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    Ok(Arc::new(cfg))
}

/// `TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384`, for Received headers and the queue's TLS facts.
pub fn describe(conn: &rustls::ServerConnection) -> String {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "TLS",
    };
    let suite = conn
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_default();
    format!("using {version} with cipher {suite}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_is_generated_once_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = ensure_self_signed(dir.path(), "mx.test").unwrap();
        let first = std::fs::read(&c).unwrap();
        server_config(&c, &k).unwrap();
        ensure_self_signed(dir.path(), "mx.test").unwrap();
        assert_eq!(std::fs::read(&c).unwrap(), first, "kept, not regenerated");
    }
}

/// A throw-away certificate authority for tests (unit tests here and, with `test-support`, the integration
/// tests): a CA and leaves for given host names, made with rcgen at test time. Panics on failure: test support.
#[cfg(any(test, feature = "test-support"))]
#[doc(hidden)]
pub mod test_pki {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    /// A leaf certificate and its key.
    pub struct Leaf {
        pub der: CertificateDer<'static>,
        pub cert_pem: String,
        pub key_pem: String,
        key_der: Vec<u8>,
    }

    impl Leaf {
        pub fn key(&self) -> PrivateKeyDer<'static> {
            PrivateKeyDer::Pkcs8(self.key_der.clone().into())
        }

        /// A rustls server configuration presenting this leaf (and `chain` after it).
        pub fn server_config(
            &self,
            chain: &[CertificateDer<'static>],
        ) -> std::sync::Arc<rustls::ServerConfig> {
            super::install_crypto_provider();
            let mut certs = vec![self.der.clone()];
            certs.extend_from_slice(chain);
            std::sync::Arc::new(
                rustls::ServerConfig::builder()
                    .with_no_client_auth()
                    .with_single_cert(certs, self.key())
                    .expect("test pki: server config"),
            )
        }
    }

    /// A CA (self-signed, unconstrained).
    pub struct TestCa {
        issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    }

    impl Default for TestCa {
        fn default() -> Self {
            TestCa::new()
        }
    }

    impl TestCa {
        pub fn new() -> TestCa {
            let mut params =
                rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "shardmta test CA");
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
                rcgen::KeyUsagePurpose::DigitalSignature,
            ];
            let key = rcgen::KeyPair::generate().expect("ca key");
            TestCa {
                issuer: rcgen::CertifiedIssuer::self_signed(params, key).expect("ca cert"),
            }
        }

        pub fn cert_der(&self) -> CertificateDer<'static> {
            self.issuer.der().clone()
        }

        pub fn cert_pem(&self) -> String {
            self.issuer.pem()
        }

        /// A server certificate for `names` (DNS names or IP addresses) signed by this CA.
        pub fn leaf_for(&self, names: &[&str]) -> Leaf {
            let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
            let mut params = rcgen::CertificateParams::new(names).expect("leaf params");
            params.is_ca = rcgen::IsCa::ExplicitNoCa;
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
            let key = rcgen::KeyPair::generate().expect("leaf key");
            let cert = params.signed_by(&key, &self.issuer).expect("leaf cert");
            Leaf {
                der: cert.der().clone(),
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
                key_der: key.serialize_der(),
            }
        }

        pub fn leaf(&self, name: &str) -> Leaf {
            self.leaf_for(&[name])
        }
    }
}
