//! MTA-STS texts (RFC 8461), pure and on borrowed input: the `_mta-sts` TXT record (section 3.1), the policy
//! file (section 3.2) and MX host pattern matching (section 4.1). Everything here is hostile input: every
//! function returns a value or an error, never panics; the policy file is at most
//! [`super::POLICY_BYTES_MAX`] bytes (the fetcher's bound) and at most [`MX_PATTERNS_MAX`] `mx` lines are kept.

/// Most `mx` patterns kept from one policy.
pub const MX_PATTERNS_MAX: usize = 64;
/// RFC 8461 section 3.2: max_age is at most 31557600 s (a year); we keep a policy at least a day.
pub const MAX_AGE_MAX_SECS: u64 = 31_557_600;
pub const MAX_AGE_MIN_SECS: u64 = 86_400;

/// The policy mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Testing,
    None,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }
}

/// A parsed policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// Lower case, without a trailing dot; `*.example.com` wildcards kept as written.
    pub mx: Vec<String>,
    /// Seconds, clamped to `MAX_AGE_MIN_SECS..=MAX_AGE_MAX_SECS`.
    pub max_age: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy is not UTF-8")]
    NotText,
    #[error("policy has no \"version: STSv1\" line")]
    Version,
    #[error("policy mode missing or not enforce, testing or none")]
    Mode,
    #[error("policy max_age missing or not a number")]
    MaxAge,
    #[error("policy in mode {0} has no mx line")]
    NoMx(&'static str),
}

/// The `id` of the one valid `v=STSv1` record among the TXT records of `_mta-sts.<domain>`; None when there is
/// none or more than one (RFC 8461 section 3.1: then the domain has no available policy). Records that do not
/// begin with `v=STSv1;` are discarded first; the grammar (`sts-version 1*(*WSP %x3B ...)`) lets spaces or tabs
/// stand before that `;`.
pub fn select_record(txts: &[String]) -> Option<String> {
    let mut found = txts
        .iter()
        .filter(|t| is_sts_record(t))
        .map(|t| parse_record(t));
    let first = found.next()?;
    if found.next().is_some() {
        return None;
    }
    first
}

/// Whether a TXT record begins with `v=STSv1` and `;` (optional WSP between them).
fn is_sts_record(txt: &str) -> bool {
    txt.strip_prefix("v=STSv1")
        .is_some_and(|rest| rest.trim_start_matches([' ', '\t']).starts_with(';'))
}

/// `v=STSv1; id=20160831085700Z;` -> the id (1 to 32 letters and digits). Fields are `key=value` separated by
/// `;` and optional spaces; `v` must come first; unknown fields are ignored.
pub fn parse_record(txt: &str) -> Option<String> {
    let mut fields = txt.split(';').map(|f| f.trim_matches([' ', '\t']));
    if fields.next()? != "v=STSv1" {
        return None;
    }
    let mut id = None;
    for f in fields {
        if f.is_empty() {
            continue;
        }
        let (k, v) = f.split_once('=')?;
        if k == "id" {
            if v.is_empty() || v.len() > 32 || !v.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return None;
            }
            id = Some(v.to_string());
        }
    }
    id
}

/// Parses a policy file (RFC 8461 section 3.2): `key: value` lines ending in LF or CRLF; `version`, `mode`,
/// `max_age` and (unless mode is none) at least one `mx` are required; unknown keys are ignored.
pub fn parse_policy(body: &[u8]) -> Result<Policy, PolicyError> {
    let text = std::str::from_utf8(body).map_err(|_| PolicyError::NotText)?;
    let (mut version, mut mode, mut max_age) = (false, None, None);
    let mut mx = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim_matches([' ', '\t']);
        match k.trim_matches([' ', '\t']) {
            "version" if v == "STSv1" => version = true,
            "mode" => {
                mode = match v {
                    "enforce" => Some(Mode::Enforce),
                    "testing" => Some(Mode::Testing),
                    "none" => Some(Mode::None),
                    _ => return Err(PolicyError::Mode),
                }
            }
            "max_age" => {
                if v.is_empty() || v.len() > 10 || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(PolicyError::MaxAge);
                }
                let secs: u64 = v.parse().map_err(|_| PolicyError::MaxAge)?;
                max_age = Some(secs.clamp(MAX_AGE_MIN_SECS, MAX_AGE_MAX_SECS));
            }
            "mx" if !v.is_empty() && mx.len() < MX_PATTERNS_MAX => {
                let p = v.trim_end_matches('.').to_ascii_lowercase();
                if !mx.contains(&p) {
                    mx.push(p);
                }
            }
            _ => {}
        }
    }
    if !version {
        return Err(PolicyError::Version);
    }
    let mode = mode.ok_or(PolicyError::Mode)?;
    let max_age = max_age.ok_or(PolicyError::MaxAge)?;
    if mx.is_empty() && mode != Mode::None {
        return Err(PolicyError::NoMx(mode.as_str()));
    }
    Ok(Policy { mode, mx, max_age })
}

/// Whether MX host `host` matches `pattern` (RFC 8461 section 4.1): equal ignoring case and a trailing dot,
/// or `*.suffix` with exactly one label in place of the `*`.
pub fn mx_matches(pattern: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.');
    let pattern = pattern.trim_end_matches('.');
    if let Some(suffix) = pattern.strip_prefix("*.") {
        match host.split_once('.') {
            Some((label, rest)) => !label.is_empty() && rest.eq_ignore_ascii_case(suffix),
            None => false,
        }
    } else {
        !pattern.is_empty() && pattern.eq_ignore_ascii_case(host)
    }
}

impl Policy {
    /// Whether `host` matches one of the policy's `mx` patterns.
    pub fn allows(&self, host: &str) -> bool {
        self.mx.iter().any(|p| mx_matches(p, host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_records() {
        assert_eq!(
            parse_record("v=STSv1; id=20160831085700Z;"),
            Some("20160831085700Z".into())
        );
        assert_eq!(parse_record("v=STSv1;id=abc"), Some("abc".into()));
        assert_eq!(parse_record("v=STSv1; id=abc; ext=1"), Some("abc".into()));
        assert_eq!(parse_record("v=STSv1"), None, "no id");
        assert_eq!(parse_record("v=STSv2; id=abc"), None);
        assert_eq!(parse_record("id=abc; v=STSv1"), None, "v first");
        assert_eq!(parse_record("v=STSv1; id=a-b"), None, "id alphanumeric");
        assert_eq!(
            parse_record(&format!("v=STSv1; id={}", "a".repeat(33))),
            None
        );
        assert_eq!(parse_record("v=STSv1; id=abc; junk"), None);
        let one = |t: &[&str]| select_record(&t.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(one(&["v=spf1 -all", "v=STSv1; id=x1"]), Some("x1".into()));
        assert_eq!(
            one(&["v=STSv1; id=x1", "v=STSv1; id=x2"]),
            None,
            "two records"
        );
        assert_eq!(one(&["v=spf1 -all"]), None);
        assert_eq!(one(&[]), None);
        // Only records beginning with "v=STSv1;" count (RFC 8461 section 3.1): another one that merely starts
        // with the same letters is discarded, not taken as a second (invalid) STS record.
        assert_eq!(one(&["v=STSv1; id=a", "v=STSv1x"]), Some("a".into()));
        assert_eq!(one(&["v=STSv10; id=b", "v=STSv1; id=a"]), Some("a".into()));
        // WSP before the ';' is in the grammar.
        assert_eq!(one(&["v=STSv1 \t; id=a", "v=STSv1x"]), Some("a".into()));
        assert_eq!(
            one(&["v=STSv1 ;id=a", "v=STSv1; id=b"]),
            None,
            "two records"
        );
    }

    #[test]
    fn policy_files() {
        let p = parse_policy(
            b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.Example.NET.\r\nmax_age: 604800\r\nfoo: bar\r\n",
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.mx, vec!["mail.example.com", "*.example.net"]);
        assert_eq!(p.max_age, 604_800);
        // LF only, no final newline, spaces around values.
        let p = parse_policy(b"version:STSv1\nmode:  testing \nmx: a.example\nmax_age: 5").unwrap();
        assert_eq!(p.mode, Mode::Testing);
        assert_eq!(p.max_age, MAX_AGE_MIN_SECS, "clamped up to a day");
        let p = parse_policy(b"version: STSv1\nmode: none\nmax_age: 99999999999").unwrap_err();
        assert_eq!(p, PolicyError::MaxAge, "11 digits");
        let p = parse_policy(b"version: STSv1\nmode: none\nmax_age: 9999999999").unwrap();
        assert_eq!((p.mode, p.max_age), (Mode::None, MAX_AGE_MAX_SECS));
        assert_eq!(
            parse_policy(b"mode: enforce\nmx: a\nmax_age: 86400"),
            Err(PolicyError::Version)
        );
        assert_eq!(
            parse_policy(b"version: STSv1\nmode: strict\nmx: a\nmax_age: 86400"),
            Err(PolicyError::Mode)
        );
        assert_eq!(
            parse_policy(b"version: STSv1\nmode: enforce\nmax_age: 86400"),
            Err(PolicyError::NoMx("enforce"))
        );
        assert_eq!(
            parse_policy(b"version: STSv1\nmode: enforce\nmx: a\nmax_age: -1"),
            Err(PolicyError::MaxAge)
        );
        assert_eq!(parse_policy(b"\xff\xfe"), Err(PolicyError::NotText));
        // Bounded: many mx lines keep MX_PATTERNS_MAX.
        let mut big = String::from("version: STSv1\nmode: enforce\nmax_age: 86400\n");
        for i in 0..1000 {
            big.push_str(&format!("mx: mx{i}.example\n"));
        }
        assert_eq!(
            parse_policy(big.as_bytes()).unwrap().mx.len(),
            MX_PATTERNS_MAX
        );
    }

    #[test]
    fn mx_patterns() {
        assert!(mx_matches("mail.example.com", "MAIL.example.com."));
        assert!(!mx_matches("mail.example.com", "mail2.example.com"));
        assert!(mx_matches("*.example.com", "mx1.example.com"));
        assert!(
            !mx_matches("*.example.com", "a.b.example.com"),
            "one label only"
        );
        assert!(!mx_matches("*.example.com", "example.com"));
        assert!(!mx_matches("*.example.com", ".example.com"));
        assert!(!mx_matches("*.example.com", "mx1.example.com.evil"));
        assert!(!mx_matches("", ""));
        assert!(!mx_matches("*.", "a"));
        let p = Policy {
            mode: Mode::Enforce,
            mx: vec!["*.good.test".into(), "exact.test".into()],
            max_age: 86400,
        };
        assert!(p.allows("mx.good.test") && p.allows("exact.test"));
        assert!(!p.allows("mx.bad.test"));
    }

    /// Hostile bytes never panic.
    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let alphabet =
            b"version: STSv1\nmode:enforce testing none\r\nmx:*.max_age0123456789;=id\xff";
        for _ in 0..20_000 {
            let len = (x % 200) as usize;
            let mut v = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push(alphabet[(x % alphabet.len() as u64) as usize]);
            }
            let _ = parse_policy(&v);
            let s = String::from_utf8_lossy(&v);
            let _ = parse_record(&s);
            let _ = mx_matches(&s, "a.b");
            let _ = mx_matches("*.b", &s);
        }
    }
}
