//! DKIM private keys: reading a PEM file (RSA as PKCS#1 or PKCS#8, Ed25519 as PKCS#8) into a ring key pair, the
//! public key as a DNS TXT record (`p=`), and `dkim keygen`'s new keys.
//!
//! ring signs (constant-time RSA and Ed25519); ring cannot generate RSA keys, so `keygen --algorithm rsa-2048`
//! uses the RustCrypto `rsa` crate for that one step only (its timing advisory, RUSTSEC-2023-0071, is about
//! decryption and signing with a key, which this program never does with it; generation runs once, offline, in
//! the CLI). The key it writes is read back with ring before it is kept.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair, RsaKeyPair};

/// Largest key file read (a 4096-bit RSA key in PEM is about 3.3 KB).
pub const KEY_FILE_BYTES_MAX: u64 = 64 * 1024;

/// A signing key; the algorithm comes from the key.
#[derive(Clone)]
pub enum SigningKey {
    Rsa(Arc<RsaKeyPair>),
    Ed25519(Arc<Ed25519KeyPair>),
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.algorithm())
    }
}

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: larger than {KEY_FILE_BYTES_MAX} bytes: not a key file", path.display())]
    TooLarge { path: PathBuf },
    #[error("{}: no PEM private key (expected BEGIN PRIVATE KEY or BEGIN RSA PRIVATE KEY)", path.display())]
    NoKey { path: PathBuf },
    #[error("{}: {what}", path.display())]
    Bad { path: PathBuf, what: String },
}

impl SigningKey {
    /// `a=` of the signature.
    pub fn algorithm(&self) -> &'static str {
        match self {
            SigningKey::Rsa(_) => "rsa-sha256",
            SigningKey::Ed25519(_) => "ed25519-sha256",
        }
    }

    /// `k=` of the DNS record.
    pub fn key_type(&self) -> &'static str {
        match self {
            SigningKey::Rsa(_) => "rsa",
            SigningKey::Ed25519(_) => "ed25519",
        }
    }

    /// Whether one signature costs enough (RSA: about a millisecond) to be made off the reactor thread.
    pub fn is_slow(&self) -> bool {
        matches!(self, SigningKey::Rsa(_))
    }

    /// Reads a PEM key file: the first private key in it.
    pub fn load(path: &Path) -> Result<SigningKey, KeyError> {
        let f = std::fs::File::open(path).map_err(|source| KeyError::Read {
            path: path.into(),
            source,
        })?;
        let mut text = Vec::new();
        f.take(KEY_FILE_BYTES_MAX + 1)
            .read_to_end(&mut text)
            .map_err(|source| KeyError::Read {
                path: path.into(),
                source,
            })?;
        if text.len() as u64 > KEY_FILE_BYTES_MAX {
            return Err(KeyError::TooLarge { path: path.into() });
        }
        Self::from_pem(&text).map_err(|e| match e {
            None => KeyError::NoKey { path: path.into() },
            Some(what) => KeyError::Bad {
                path: path.into(),
                what,
            },
        })
    }

    /// The first private key of a PEM text. Err(None): there is none; Err(Some(reason)): it is unusable.
    pub fn from_pem(text: &[u8]) -> Result<SigningKey, Option<String>> {
        use rustls_pemfile::Item;
        let mut r = text;
        loop {
            match rustls_pemfile::read_one(&mut r) {
                Ok(Some(Item::Pkcs1Key(k))) => {
                    return RsaKeyPair::from_der(k.secret_pkcs1_der())
                        .map(|k| SigningKey::Rsa(Arc::new(k)))
                        .map_err(|e| {
                            Some(format!("RSA key (PKCS#1) refused: {e} (2048 to 4096 bits)"))
                        });
                }
                Ok(Some(Item::Pkcs8Key(k))) => {
                    let der = k.secret_pkcs8_der();
                    if let Ok(rsa) = RsaKeyPair::from_pkcs8(der) {
                        return Ok(SigningKey::Rsa(Arc::new(rsa)));
                    }
                    return match Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
                        Ok(ed) => Ok(SigningKey::Ed25519(Arc::new(ed))),
                        Err(_) => Err(Some(
                            "PKCS#8 key is neither RSA (2048 to 4096 bits) nor Ed25519".into(),
                        )),
                    };
                }
                Ok(Some(Item::Sec1Key(_))) => {
                    return Err(Some("EC keys cannot sign DKIM: use RSA or Ed25519".into()))
                }
                Ok(Some(_)) => continue, // a certificate or other item before the key
                Ok(None) => return Err(None),
                Err(e) => return Err(Some(format!("bad PEM: {e:?}"))),
            }
        }
    }

    /// The public key as DKIM's `p=` wants it: for RSA the DER SubjectPublicKeyInfo, for Ed25519 the raw 32
    /// bytes (RFC 8463 section 4.2), base64.
    pub fn public_key_b64(&self) -> String {
        let b64 = &base64::engine::general_purpose::STANDARD;
        match self {
            SigningKey::Rsa(k) => b64.encode(rsa_spki(k.public().as_ref())),
            SigningKey::Ed25519(k) => b64.encode(k.public_key().as_ref()),
        }
    }

    /// The TXT record's value: `v=DKIM1; k=...; p=...`.
    pub fn dns_record_value(&self) -> String {
        format!(
            "v=DKIM1; k={}; p={}",
            self.key_type(),
            self.public_key_b64()
        )
    }

    /// The signature (`b=`) over `input`, the canonical header hash input: RSASSA-PKCS1-v1_5 with SHA-256
    /// over it, or (RFC 8463 section 3) PureEdDSA over its SHA-256.
    pub fn sign(&self, input: &[u8]) -> Result<Vec<u8>, ring::error::Unspecified> {
        match self {
            SigningKey::Rsa(k) => {
                let mut sig = vec![0u8; k.public().modulus_len()];
                let rng = ring::rand::SystemRandom::new();
                k.sign(&ring::signature::RSA_PKCS1_SHA256, &rng, input, &mut sig)?;
                Ok(sig)
            }
            SigningKey::Ed25519(k) => {
                let hash = ring::digest::digest(&ring::digest::SHA256, input);
                Ok(k.sign(hash.as_ref()).as_ref().to_vec())
            }
        }
    }
}

/// DER length octets.
fn der_len(n: usize, out: &mut Vec<u8>) {
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes = n.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

fn der(tag: u8, content: &[u8], out: &mut Vec<u8>) {
    out.push(tag);
    der_len(content.len(), out);
    out.extend_from_slice(content);
}

/// SubjectPublicKeyInfo { AlgorithmIdentifier { rsaEncryption, NULL }, BIT STRING { RSAPublicKey } }.
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    // 1.2.840.113549.1.1.1 and NULL.
    const ALG: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bits = Vec::with_capacity(pkcs1.len() + 1);
    bits.push(0); // no unused bits
    bits.extend_from_slice(pkcs1);
    let mut inner = ALG.to_vec();
    der(0x03, &bits, &mut inner);
    let mut out = Vec::with_capacity(inner.len() + 4);
    der(0x30, &inner, &mut out);
    out
}

/// `dkim keygen`'s algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    Rsa2048,
    Ed25519,
}

impl std::str::FromStr for KeyAlgorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "rsa-2048" | "rsa" => Ok(KeyAlgorithm::Rsa2048),
            "ed25519" => Ok(KeyAlgorithm::Ed25519),
            _ => Err(format!("{s:?}: expected rsa-2048 or ed25519")),
        }
    }
}

/// A new private key as PKCS#8 PEM.
pub fn generate_pem(alg: KeyAlgorithm) -> Result<String, String> {
    match alg {
        KeyAlgorithm::Ed25519 => {
            let rng = ring::rand::SystemRandom::new();
            let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| e.to_string())?;
            Ok(pem("PRIVATE KEY", doc.as_ref()))
        }
        KeyAlgorithm::Rsa2048 => {
            use rsa::pkcs8::EncodePrivateKey;
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
                .map_err(|e| e.to_string())?;
            let doc = key.to_pkcs8_der().map_err(|e| e.to_string())?;
            Ok(pem("PRIVATE KEY", doc.as_bytes()))
        }
    }
}

/// PEM with 64-column base64 lines.
fn pem(label: &str, der: &[u8]) -> String {
    let b = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for chunk in b.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(chunk));
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

/// Writes `text` to a new file `path`, mode 0600: refuses to replace an existing file and never follows a
/// symlink (O_CREAT | O_EXCL, which fails on any existing name, a dangling symlink included).
pub fn write_new_key_file(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// The zone-file line for `selector._domainkey.domain.`, its value split into strings of at most 255 bytes.
pub fn dns_txt_line(domain: &str, selector: &str, value: &str) -> String {
    let chunks: Vec<String> = value
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    let domain = domain.trim_end_matches('.');
    format!(
        "{selector}._domainkey.{domain}. IN TXT {}",
        chunks.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ed25519_keys_round_trip_through_pem() {
        let pem = generate_pem(KeyAlgorithm::Ed25519).unwrap();
        let k = SigningKey::from_pem(pem.as_bytes()).unwrap();
        assert_eq!(k.algorithm(), "ed25519-sha256");
        let p = base64::engine::general_purpose::STANDARD
            .decode(k.public_key_b64())
            .unwrap();
        assert_eq!(p.len(), 32);
        // A signature made with it verifies with the public key as published (over the input's SHA-256).
        let sig = k.sign(b"hello").unwrap();
        let hash = ring::digest::digest(&ring::digest::SHA256, b"hello");
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &p)
            .verify(hash.as_ref(), &sig)
            .unwrap();
    }

    #[test]
    fn rsa_keys_round_trip_and_publish_spki() {
        let pem = generate_pem(KeyAlgorithm::Rsa2048).unwrap();
        let k = SigningKey::from_pem(pem.as_bytes()).unwrap();
        assert_eq!(k.algorithm(), "rsa-sha256");
        let spki = base64::engine::general_purpose::STANDARD
            .decode(k.public_key_b64())
            .unwrap();
        // The SPKI wraps the PKCS#1 key ring verifies with.
        let SigningKey::Rsa(kp) = &k else { panic!() };
        let pkcs1 = kp.public().as_ref();
        assert!(spki.ends_with(pkcs1) && spki[0] == 0x30 && spki.len() > pkcs1.len() + 20);
        let sig = k.sign(b"hello").unwrap();
        assert_eq!(sig.len(), 256);
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            pkcs1,
        )
        .verify(b"hello", &sig)
        .unwrap();
    }

    #[test]
    fn bad_key_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pem");
        std::fs::write(&p, "not a key\n").unwrap();
        let e = SigningKey::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("k.pem") && e.contains("no PEM private key"),
            "{e}"
        );
        let e = SigningKey::load(&dir.path().join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.pem"), "{e}");
        std::fs::write(
            &p,
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = SigningKey::load(&p).unwrap_err().to_string();
        assert!(e.contains("neither RSA"), "{e}");
    }

    #[test]
    fn key_files_are_new_0600_and_never_through_a_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("new.pem");
        write_new_key_file(&p, "x").unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(write_new_key_file(&p, "y").is_err(), "no overwrite");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "x");
        let target = dir.path().join("target");
        let link = dir.path().join("link.pem");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(write_new_key_file(&link, "z").is_err());
        assert!(!target.exists(), "the dangling symlink was not followed");
    }

    #[test]
    fn long_txt_values_are_split_at_255_bytes() {
        let v = "a".repeat(300);
        let line = dns_txt_line("example.com.", "s1", &v);
        assert_eq!(
            line,
            format!(
                "s1._domainkey.example.com. IN TXT \"{}\" \"{}\"",
                "a".repeat(255),
                "a".repeat(45)
            )
        );
    }
}
