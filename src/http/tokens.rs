//! The bearer tokens of `[http] api_token_file`: read once at start (a missing or unreadable file, or a bad
//! line, stops the start with its name), and each presented token compared with every configured one in
//! constant time (no early exit, no comparison that stops at the first differing byte).
//!
//! File format: one token a line, `name:token` or `token`; blank lines and lines starting with `#` are ignored;
//! surrounding spaces are trimmed. A token has at least [`limits::HTTP_TOKEN_BYTES_MIN`] bytes, no spaces.

use std::path::{Path, PathBuf};

use crate::limits;

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("http.api_token_file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("http.api_token_file {path} line {line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

struct Token {
    /// The name before the colon, if the line has one (the `auth_user` of what it injects).
    name: Option<String>,
    secret: Vec<u8>,
}

/// The configured tokens (none: only trusted networks and the control socket may call).
#[derive(Default)]
pub struct ApiTokens {
    tokens: Vec<Token>,
}

impl std::fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets.
        write!(f, "ApiTokens({} token(s))", self.tokens.len())
    }
}

/// What a presented token matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenMatch {
    pub name: Option<String>,
}

impl ApiTokens {
    /// Reads `path` (at most [`limits::HTTP_TOKEN_FILE_BYTES_MAX`] bytes).
    pub fn load(path: &Path) -> Result<ApiTokens, TokenFileError> {
        use std::io::Read;
        let read = |source| TokenFileError::Read {
            path: path.to_path_buf(),
            source,
        };
        let f = std::fs::File::open(path).map_err(read)?;
        let mut bytes = Vec::new();
        f.take(limits::HTTP_TOKEN_FILE_BYTES_MAX + 1)
            .read_to_end(&mut bytes)
            .map_err(read)?;
        if bytes.len() as u64 > limits::HTTP_TOKEN_FILE_BYTES_MAX {
            return Err(read(std::io::Error::other(format!(
                "larger than {} bytes",
                limits::HTTP_TOKEN_FILE_BYTES_MAX
            ))));
        }
        let text =
            String::from_utf8(bytes).map_err(|_| read(std::io::Error::other("not UTF-8 text")))?;
        Self::parse(&text).map_err(|(line, reason)| TokenFileError::Line {
            path: path.to_path_buf(),
            line,
            reason,
        })
    }

    /// Parses the file's text; `Err((line number, reason))`.
    pub fn parse(text: &str) -> Result<ApiTokens, (usize, String)> {
        let mut tokens = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, secret) = match line.split_once(':') {
                Some((name, secret)) => {
                    let name = name.trim();
                    if name.is_empty()
                        || name.len() > limits::HTTP_TOKEN_BYTES_MAX
                        || !name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
                    {
                        return Err((
                            n,
                            "a name is letters, digits and - _ . @ before the colon".into(),
                        ));
                    }
                    (Some(name.to_string()), secret.trim())
                }
                None => (None, line),
            };
            if secret.len() < limits::HTTP_TOKEN_BYTES_MIN {
                return Err((
                    n,
                    format!(
                        "a token needs at least {} characters (e.g. `openssl rand -hex 32`)",
                        limits::HTTP_TOKEN_BYTES_MIN
                    ),
                ));
            }
            if secret.len() > limits::HTTP_TOKEN_BYTES_MAX
                || !secret.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err((
                    n,
                    format!(
                        "a token is printable ASCII without spaces, at most {} characters",
                        limits::HTTP_TOKEN_BYTES_MAX
                    ),
                ));
            }
            tokens.push(Token {
                name,
                secret: secret.as_bytes().to_vec(),
            });
        }
        Ok(ApiTokens { tokens })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The token `presented` matches, if any. Every configured token is compared, each in time that depends
    /// only on its own length.
    pub fn check(&self, presented: &[u8]) -> Option<TokenMatch> {
        let mut found: Option<&Token> = None;
        for t in &self.tokens {
            if constant_time_eq(&t.secret, presented) && found.is_none() {
                found = Some(t);
            }
        }
        found.map(|t| TokenMatch {
            name: t.name.clone(),
        })
    }
}

/// `secret == presented`, in time that depends on `secret.len()` only.
fn constant_time_eq(secret: &[u8], presented: &[u8]) -> bool {
    let mut diff = u8::from(secret.len() != presented.len());
    for (i, s) in secret.iter().enumerate() {
        // A shorter presented token is read cyclically (its length already made `diff` non-zero).
        let p = if presented.is_empty() {
            0
        } else {
            presented[i % presented.len()]
        };
        diff |= s ^ p;
    }
    std::hint::black_box(diff) == 0
}

/// The token of an `Authorization: Bearer <token>` header value (the scheme without case).
pub fn bearer(header: &[u8]) -> Option<&[u8]> {
    let s = std::str::from_utf8(header).ok()?.trim();
    let (scheme, token) = s.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_names_comments_and_errors() {
        let t = ApiTokens::parse(
            "# ops tokens\n\n  grafana: 0123456789abcdef0123 \n0123456789ABCDEFXYZ\n",
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            t.check(b"0123456789abcdef0123"),
            Some(TokenMatch {
                name: Some("grafana".into())
            })
        );
        assert_eq!(
            t.check(b"0123456789ABCDEFXYZ"),
            Some(TokenMatch { name: None })
        );
        for bad in [
            b"0123456789abcdef012".as_slice(),
            b"0123456789abcdef01234",
            b"",
            b"grafana:0123456789abcdef0123",
            b"0123456789ABCDEFXY",
        ] {
            assert_eq!(t.check(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        for (text, line) in [
            ("short\n", 1),
            ("# c\nname:\n", 2),
            (":0123456789abcdef0123\n", 1),
            ("bad name:0123456789abcdef0123\n", 1),
            ("0123456789abcdef 0123\n", 1),
        ] {
            assert_eq!(
                ApiTokens::parse(text).err().map(|e| e.0),
                Some(line),
                "{text}"
            );
        }
        assert!(ApiTokens::parse("").unwrap().is_empty());
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let e = ApiTokens::load(&missing).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
        let f = dir.path().join("tokens");
        std::fs::write(&f, "x\n").unwrap();
        let e = ApiTokens::load(&f).unwrap_err().to_string();
        assert!(e.contains("tokens line 1"), "{e}");
        std::fs::write(&f, "a:0123456789abcdef0123\n").unwrap();
        assert_eq!(ApiTokens::load(&f).unwrap().len(), 1);
    }

    #[test]
    fn bearer_header() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer   abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer"), None);
        assert_eq!(bearer(b"\xff"), None);
    }

    #[test]
    fn comparison_is_exact() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abcabc"));
        assert!(!constant_time_eq(b"abcabc", b"abc"));
        assert!(!constant_time_eq(b"abc", b""));
        assert!(!constant_time_eq(b"abc", b"abd"));
    }
}
