//! The AUTH users file and password verification.
//!
//! Format: Dovecot passwd-file style, one user a line, `name:{SHA512-CRYPT}$6$salt$hash` (further `:`-separated
//! fields are ignored, `#` starts a comment). Schemes: `{SHA512-CRYPT}` / `$6$`, `{SHA256-CRYPT}` / `$5$`.
//! `shardmta passwd` prints such a line. Verifying costs about a millisecond (5000 rounds): callers run it off the
//! reactor thread.

use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read users file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("users file {path} line {line}: {reason}")]
    Syntax {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("cannot hash password: {0}")]
    Hash(String),
}

/// User name -> stored crypt string.
#[derive(Debug, Clone, Default)]
pub struct UserDb {
    users: HashMap<String, String>,
}

impl UserDb {
    pub fn load(path: &Path) -> Result<UserDb, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, path: &str) -> Result<UserDb, AuthError> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |reason: &str| AuthError::Syntax {
                path: path.into(),
                line: i + 1,
                reason: reason.into(),
            };
            let mut fields = line.split(':');
            let name = fields
                .next()
                .filter(|n| !n.is_empty())
                .ok_or_else(|| err("empty user name"))?;
            let hash = fields.next().ok_or_else(|| err("missing password field"))?;
            let crypt = strip_scheme(hash)
                .ok_or_else(|| err("unsupported scheme (use {SHA512-CRYPT} or {SHA256-CRYPT})"))?;
            users.insert(name.to_string(), crypt.to_string());
        }
        Ok(UserDb { users })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Checks a password. Unknown users cost the same as wrong passwords (a dummy hash is checked).
    pub fn verify(&self, user: &str, password: &str) -> bool {
        const DUMMY: &str = "$6$rounds=5000$shardmtadummy$OQ2o0QVuA6n.Wt0e/xNZ2W0N3kmWmBlVpk5E2dVvX1i4xUQc7/0L0d9PgXM1Rz5m3b0eP1zrIDdRvUb0E3Nnq/";
        match self.users.get(user) {
            Some(h) => check(password, h),
            None => {
                let _ = check(password, DUMMY);
                false
            }
        }
    }
}

fn strip_scheme(field: &str) -> Option<&str> {
    let crypt = if let Some(rest) = field.strip_prefix('{') {
        let (scheme, hash) = rest.split_once('}')?;
        match scheme.to_ascii_uppercase().as_str() {
            "SHA512-CRYPT" | "SHA256-CRYPT" | "CRYPT" => hash,
            _ => return None,
        }
    } else {
        field
    };
    (crypt.starts_with("$6$") || crypt.starts_with("$5$")).then_some(crypt)
}

fn check(password: &str, crypt: &str) -> bool {
    if crypt.starts_with("$6$") {
        sha_crypt::sha512_check(password, crypt).is_ok()
    } else {
        sha_crypt::sha256_check(password, crypt).is_ok()
    }
}

/// A users-file line for `user` with a fresh salt: `user:{SHA512-CRYPT}$6$...`.
pub fn passwd_line(user: &str, password: &str) -> Result<String, AuthError> {
    let params =
        sha_crypt::Sha512Params::new(5000).map_err(|e| AuthError::Hash(format!("{e:?}")))?;
    let hash = sha_crypt::sha512_simple(password, &params)
        .map_err(|e| AuthError::Hash(format!("{e:?}")))?;
    Ok(format!("{user}:{{SHA512-CRYPT}}{hash}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_line_verifies() {
        let line = passwd_line("alice", "s3cret pass").unwrap();
        assert!(line.starts_with("alice:{SHA512-CRYPT}$6$"));
        let db = UserDb::parse(&format!("# users\n{line}:1000:1000::/home/alice\n"), "t").unwrap();
        assert_eq!(db.len(), 1);
        assert!(db.verify("alice", "s3cret pass"));
        assert!(!db.verify("alice", "wrong"));
        assert!(!db.verify("bob", "s3cret pass"));
    }

    #[test]
    fn bad_lines_are_named() {
        let e = UserDb::parse("ok:{PLAIN}x\n", "users")
            .unwrap_err()
            .to_string();
        assert!(e.contains("users line 1") && e.contains("scheme"), "{e}");
        assert!(UserDb::parse("nopassword\n", "u").is_err());
    }
}
