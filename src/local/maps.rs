//! Parsers for the lookup files of local delivery: aliases(5), Postfix virtual(5) and the local users file.
//!
//! All three work on borrowed text and return owned tables with lower-case keys (lookups are case-insensitive,
//! as in Postfix). Lines starting with `#` are comments; a line starting with white space continues the previous
//! entry. Bounds: a file is read whole, at most [`crate::limits::LOCAL_MAP_FILE_BYTES_MAX`]; entries are as many as its lines.

use std::collections::HashMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MapError {
    #[error("{file}:{line}: {reason}")]
    Syntax {
        file: String,
        line: usize,
        reason: String,
    },
    #[error("cannot read {file}: {reason}")]
    Read { file: String, reason: String },
}

/// Joins continuation lines: yields (first line number, logical entry) without comments or blank lines.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim_end_matches('\r');
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, last)) = out.last_mut() {
                last.push(' ');
                last.push_str(trimmed);
                continue;
            }
        }
        out.push((i + 1, trimmed.to_string()));
    }
    out
}

/// Splits a right-hand side on commas and white space (quoted parts keep their spaces and commas).
fn split_targets(rhs: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in rhs.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ',' | ' ' | '\t' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// What an alias may point to. Only addresses are delivered; the others are reported and skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AliasTarget {
    /// `alice`, `alice@example.org`.
    Address(String),
    /// `/path`, `|command`, `:include:/file`: not supported by shardmta (logged at load, skipped).
    Unsupported(String),
}

/// An aliases(5) table: `name: target, target, ...`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AliasTable {
    pub entries: HashMap<String, Vec<String>>,
    /// `(line, target)` of every target that is not an address.
    pub unsupported: Vec<(usize, String)>,
}

/// Parses aliases(5) text. `file` only names the source in errors.
pub fn parse_aliases(text: &str, file: &str) -> Result<AliasTable, MapError> {
    let mut t = AliasTable::default();
    for (line, entry) in logical_lines(text) {
        let err = |reason: &str| MapError::Syntax {
            file: file.into(),
            line,
            reason: reason.into(),
        };
        let (name, rhs) = entry
            .split_once(':')
            .ok_or_else(|| err("expected `name: target, ...`"))?;
        let name = name.trim().trim_matches('"').to_lowercase();
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(err("alias name is empty or has spaces"));
        }
        let mut targets = Vec::new();
        for raw in split_targets(rhs) {
            match classify_alias_target(&raw) {
                AliasTarget::Address(a) => targets.push(a),
                AliasTarget::Unsupported(u) => t.unsupported.push((line, u)),
            }
        }
        if targets.is_empty() && !t.unsupported.iter().any(|(l, _)| *l == line) {
            return Err(err("alias has no target"));
        }
        t.entries.entry(name).or_default().extend(targets);
    }
    Ok(t)
}

fn classify_alias_target(raw: &str) -> AliasTarget {
    let unq = raw.trim_matches('"');
    if unq.starts_with('/') || unq.starts_with('|') || unq.starts_with(":include:") {
        AliasTarget::Unsupported(unq.to_string())
    } else {
        AliasTarget::Address(
            unq.strip_prefix('<')
                .unwrap_or(unq)
                .trim_end_matches('>')
                .to_lowercase(),
        )
    }
}

/// A virtual(5) table. Keys are `user@domain`, `@domain` (catch-all) or `user`; a key that is a bare domain
/// (`example.com  anything`) declares a virtual alias domain instead.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VirtualTable {
    pub entries: HashMap<String, Vec<String>>,
    pub domains: Vec<String>,
}

/// Parses Postfix virtual(5) text.
pub fn parse_virtual(text: &str, file: &str) -> Result<VirtualTable, MapError> {
    let mut t = VirtualTable::default();
    for (line, entry) in logical_lines(text) {
        let err = |reason: &str| MapError::Syntax {
            file: file.into(),
            line,
            reason: reason.into(),
        };
        let (key, rhs) = entry
            .split_once(char::is_whitespace)
            .ok_or_else(|| err("expected `pattern target, ...`"))?;
        let key = key.to_lowercase();
        if !key.contains('@') && key.contains('.') {
            t.domains.push(crate::smtp::address::normalize_domain(&key));
            continue;
        }
        let targets: Vec<String> = split_targets(rhs)
            .into_iter()
            .map(|a| a.trim_matches(['<', '>']).to_lowercase())
            .collect();
        if targets.is_empty() {
            return Err(err("pattern has no target"));
        }
        if let Some(bad) = targets
            .iter()
            .find(|a| a.starts_with(['/', '|']) || a.starts_with(":include:"))
        {
            return Err(err(&format!(
                "{bad:?}: virtual aliases map to addresses only"
            )));
        }
        t.entries.entry(key).or_default().extend(targets);
    }
    Ok(t)
}

/// Parses a users file: one name per line (the first word; `#` comments).
pub fn parse_users(text: &str) -> Vec<String> {
    logical_lines(text)
        .into_iter()
        .filter_map(|(_, l)| l.split_whitespace().next().map(str::to_lowercase))
        .collect()
}

/// A system account (from /etc/passwd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// Parses passwd(5) text into name -> account; malformed lines are skipped.
pub fn parse_passwd(text: &str) -> HashMap<String, Account> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 || f[0].is_empty() {
                return None;
            }
            Some((
                f[0].to_lowercase(),
                Account {
                    uid: f[2].parse().ok()?,
                    gid: f[3].parse().ok()?,
                    home: f[5].to_string(),
                },
            ))
        })
        .collect()
}

/// The path in a Postfix map reference: `hash:/etc/aliases` -> `/etc/aliases`.
pub fn map_path(spec: &str) -> &str {
    match spec.split_once(':') {
        Some((kind, path))
            if !kind.is_empty() && kind.bytes().all(|b| b.is_ascii_alphanumeric()) =>
        {
            path
        }
        _ => spec,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_format() {
        let t = parse_aliases(
            "# comment\nSales: alice, Bob@Example.ORG\n  carol\npostmaster: root\nlog: /var/log/mail, |/bin/x, dave\n\"quoted\": eve\n",
            "aliases",
        )
        .unwrap();
        assert_eq!(
            t.entries["sales"],
            vec!["alice", "bob@example.org", "carol"]
        );
        assert_eq!(t.entries["postmaster"], vec!["root"]);
        assert_eq!(t.entries["log"], vec!["dave"]);
        assert_eq!(t.entries["quoted"], vec!["eve"]);
        assert_eq!(
            t.unsupported,
            vec![(5, "/var/log/mail".to_string()), (5, "|/bin/x".to_string())]
        );
        assert!(matches!(
            parse_aliases("nocolon alice\n", "f"),
            Err(MapError::Syntax { line: 1, .. })
        ));
        assert!(parse_aliases("empty:\n", "f").is_err());
    }

    #[test]
    fn virtual_format() {
        let t = parse_virtual(
            "example.com anything\nsales@example.com alice@example.com, bob@example.org\n@catch.example  postmaster\nroot   admin@example.net\n",
            "virtual",
        )
        .unwrap();
        assert_eq!(t.domains, vec!["example.com"]);
        assert_eq!(
            t.entries["sales@example.com"],
            vec!["alice@example.com", "bob@example.org"]
        );
        assert_eq!(t.entries["@catch.example"], vec!["postmaster"]);
        assert_eq!(t.entries["root"], vec!["admin@example.net"]);
        assert!(parse_virtual("lonely@example.com\n", "v").is_err());
        assert!(parse_virtual("a@example.com |/bin/sh\n", "v").is_err());
    }

    #[test]
    fn users_and_passwd() {
        assert_eq!(
            parse_users("Alice\n# x\nbob extra\n\n"),
            vec!["alice", "bob"]
        );
        let p = parse_passwd(
            "root:x:0:0:root:/root:/bin/bash\nbad line\nu:x:1000:100::/home/u:/bin/sh\n",
        );
        assert_eq!(p["u"].uid, 1000);
        assert_eq!(p["u"].home, "/home/u");
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn map_paths() {
        assert_eq!(map_path("hash:/etc/aliases"), "/etc/aliases");
        assert_eq!(map_path("/etc/aliases"), "/etc/aliases");
        assert_eq!(map_path("texthash:/x:y"), "/x:y");
    }
}
