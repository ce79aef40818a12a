//! Who may receive mail here and where it goes: the recipient check at RCPT time and the expansion of virtual
//! aliases (virtual(5)), aliases (aliases(5)) and address extensions (`recipient_delimiter`).
//!
//! [`RecipientMaps`] is one immutable snapshot of the tables; [`RecipientTable`] holds the current snapshot and
//! replaces it when a source file changes (checked by the main thread: on SIGHUP and by mtime), so sessions and
//! the local-delivery shard read without ever waiting on a file. Expansion happens when the RCPT is accepted:
//! the queue stores the final addresses (local mailboxes and remote addresses), so each one gets its own
//! delivery state and a crash never repeats or loses an expanded recipient.
//!
//! Bounds: nesting is cut at `virtual_alias_recursion_limit`, one recipient expands to at most
//! `virtual_alias_expansion_limit` addresses; a cycle that never reaches a mailbox is an error (5.4.6).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use super::maps::{self, Account, MapError};
use crate::config::Config;
use crate::limits;
use crate::smtp::address::normalize_domain;
use crate::smtp::reply::{self, Reply};

/// One final address of an accepted recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A mailbox here: `user[+ext]@local-domain` (lower case).
    Local(String),
    /// Anything else: relayed by outbound delivery.
    Remote(String),
}

impl Target {
    pub fn address(&self) -> &str {
        match self {
            Target::Local(a) | Target::Remote(a) => a,
        }
    }
}

/// Why a recipient is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecipientError {
    #[error("user unknown in local recipient table")]
    UnknownUser,
    #[error("user unknown in virtual alias table")]
    UnknownVirtual,
    #[error("alias expansion loop")]
    Loop,
    #[error("alias expands to too many addresses")]
    TooMany,
    #[error("not a valid local mailbox name")]
    BadMailbox,
}

impl RecipientError {
    pub fn reply(self) -> Reply {
        match self {
            RecipientError::UnknownUser => reply::USER_UNKNOWN,
            RecipientError::UnknownVirtual => reply::VIRTUAL_UNKNOWN,
            RecipientError::Loop => reply::ALIAS_LOOP,
            RecipientError::TooMany => reply::ALIAS_TOO_BIG,
            RecipientError::BadMailbox => reply::BAD_MAILBOX,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(transparent)]
    Map(#[from] MapError),
}

/// One snapshot of the recipient tables.
#[derive(Debug, Default)]
pub struct RecipientMaps {
    local_domains: HashSet<String>,
    /// The first `mydestination` domain: where bare names in virtual results and `<postmaster>` go.
    primary_domain: String,
    virtual_domains: HashSet<String>,
    aliases: HashMap<String, Vec<String>>,
    virtuals: HashMap<String, Vec<String>>,
    /// Local user -> system account (None for users from the list or file).
    users: HashMap<String, Option<Account>>,
    accept_unknown: bool,
    delimiters: Vec<char>,
    recursion_limit: usize,
    expansion_limit: usize,
    /// Problems worth a log line (unsupported alias targets).
    pub warnings: Vec<String>,
}

fn read_map(path: &Path) -> Result<String, MapError> {
    let err = |reason: String| MapError::Read {
        file: path.display().to_string(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.len() > limits::LOCAL_MAP_FILE_BYTES_MAX {
        return Err(err(format!(
            "larger than {} bytes",
            limits::LOCAL_MAP_FILE_BYTES_MAX
        )));
    }
    std::fs::read_to_string(path).map_err(|e| err(e.to_string()))
}

/// The files a configuration's tables are read from (watched for changes).
pub fn source_files(cfg: &Config) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = cfg
        .alias_maps
        .iter()
        .chain(&cfg.virtual_alias_maps)
        .map(|s| PathBuf::from(maps::map_path(s)))
        .collect();
    if let Some(f) = &cfg.local.users_file {
        v.push(f.clone());
    }
    if cfg.local.system_users {
        v.push(PathBuf::from("/etc/passwd"));
    }
    v
}

/// Every table file the configuration names, each read and parsed on its own: one line per problem (for
/// `check-config`, which lists them all; [`RecipientMaps::load`] stops at the first).
pub fn check_sources(cfg: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    for spec in &cfg.alias_maps {
        let path = maps::map_path(spec);
        if let Err(e) =
            read_map(Path::new(path)).and_then(|t| maps::parse_aliases(&t, path).map(drop))
        {
            problems.push(format!("alias_maps: {e}"));
        }
    }
    for spec in &cfg.virtual_alias_maps {
        let path = maps::map_path(spec);
        if let Err(e) =
            read_map(Path::new(path)).and_then(|t| maps::parse_virtual(&t, path).map(drop))
        {
            problems.push(format!("virtual_alias_maps: {e}"));
        }
    }
    if let Some(f) = &cfg.local.users_file {
        if let Err(e) = read_map(f) {
            problems.push(format!("local.users_file: {e}"));
        }
    }
    problems
}

impl RecipientMaps {
    /// Reads every table the configuration names.
    pub fn load(cfg: &Config) -> Result<RecipientMaps, TableError> {
        let mut m = RecipientMaps {
            local_domains: cfg.mydestination.iter().cloned().collect(),
            primary_domain: cfg
                .mydestination
                .first()
                .cloned()
                .unwrap_or_else(|| normalize_domain(&cfg.myhostname)),
            virtual_domains: cfg.virtual_alias_domains.iter().cloned().collect(),
            accept_unknown: cfg.local.accept_unknown_users,
            delimiters: cfg.recipient_delimiter.chars().collect(),
            recursion_limit: cfg.virtual_alias_recursion_limit,
            expansion_limit: cfg.virtual_alias_expansion_limit,
            ..Default::default()
        };
        for spec in &cfg.alias_maps {
            let path = maps::map_path(spec);
            let t = maps::parse_aliases(&read_map(Path::new(path))?, path)?;
            for (line, target) in &t.unsupported {
                m.warnings.push(format!(
                    "{path}:{line}: alias target {target:?} is not supported (only addresses are); skipped"
                ));
            }
            for (k, v) in t.entries {
                m.aliases.entry(k).or_default().extend(v);
            }
        }
        for spec in &cfg.virtual_alias_maps {
            let path = maps::map_path(spec);
            let t = maps::parse_virtual(&read_map(Path::new(path))?, path)?;
            m.virtual_domains.extend(t.domains);
            for (k, v) in t.entries {
                m.virtuals.entry(k).or_default().extend(v);
            }
        }
        for u in &cfg.local.users {
            m.users.insert(u.to_lowercase(), None);
        }
        if let Some(f) = &cfg.local.users_file {
            let text = read_map(f)?;
            for u in maps::parse_users(&text) {
                m.users.entry(u).or_insert(None);
            }
        }
        if cfg.local.system_users {
            // A system without /etc/passwd simply has no system users.
            if let Ok(text) = std::fs::read_to_string("/etc/passwd") {
                for (name, acct) in maps::parse_passwd(&text) {
                    m.users.insert(name, Some(acct));
                }
            }
        }
        Ok(m)
    }

    /// Alias names in `alias_maps` (for `newaliases`' summary).
    pub fn alias_count(&self) -> usize {
        self.aliases.len()
    }

    pub fn is_local_domain(&self, domain: &str) -> bool {
        self.local_domains.contains(domain)
    }

    /// `postmaster@<primary local domain>`: where `RCPT TO:<postmaster>` goes.
    pub fn postmaster(&self) -> String {
        format!("postmaster@{}", self.primary_domain)
    }

    /// The system account of a local user, if the user is one.
    pub fn account(&self, user: &str) -> Option<&Account> {
        self.users.get(user).and_then(|a| a.as_ref())
    }

    /// Whether this snapshot changes anything for a remote recipient (virtual aliases apply to every address).
    pub fn rewrites_remote(&self) -> bool {
        !self.virtuals.is_empty() || !self.virtual_domains.is_empty()
    }

    /// Removes the address extension: `alice+news` -> `alice` (the first delimiter ends the user name).
    pub fn strip_extension<'a>(&self, local: &'a str) -> &'a str {
        match local.find(|c| self.delimiters.contains(&c)) {
            Some(i) if i > 0 => &local[..i],
            _ => local,
        }
    }

    /// Expands one recipient (canonical `local@domain`) into its final addresses, appended to `out` without
    /// duplicates. An alias edge back into the chain being expanded is dropped (Postfix's "been here"); a
    /// recipient whose expansion ends in nothing but such edges is a loop. On error `out` is left as it was.
    pub fn resolve(&self, address: &str, out: &mut Vec<Target>) -> Result<(), RecipientError> {
        let mut walk = Walk {
            path: Vec::new(),
            first: out.len(),
            looped: false,
        };
        let mut r = self.expand(address, &mut walk, out);
        if r.is_ok() && walk.looped && out.len() == walk.first {
            r = Err(RecipientError::Loop);
        }
        if r.is_err() {
            out.truncate(walk.first);
        }
        r
    }

    fn push(&self, out: &mut Vec<Target>, t: Target, walk: &Walk) -> Result<(), RecipientError> {
        // Duplicates collapse across the whole transaction (two RCPTs reaching one mailbox deliver once).
        if !out.contains(&t) {
            if out.len() - walk.first >= self.expansion_limit {
                return Err(RecipientError::TooMany);
            }
            out.push(t);
        }
        Ok(())
    }

    /// Lookups are case-insensitive; a remote address that no table rewrites keeps its case (its local part
    /// is the remote host's business), local mailboxes are lower case.
    fn expand(
        &self,
        original: &str,
        walk: &mut Walk,
        out: &mut Vec<Target>,
    ) -> Result<(), RecipientError> {
        let addr = original.to_lowercase();
        let (local, domain) = addr.rsplit_once('@').unwrap_or((&addr, ""));
        if let Some(results) = self.virtual_lookup(local, domain) {
            return self.follow(&addr, results, domain, true, walk, out);
        }
        if self.virtual_domains.contains(domain) {
            return Err(RecipientError::UnknownVirtual);
        }
        if !self.is_local_domain(domain) {
            return self.push(out, Target::Remote(original.to_string()), walk);
        }
        let user = self.strip_extension(local);
        if let Some(results) = self.aliases.get(local).or_else(|| self.aliases.get(user)) {
            return self.follow(&addr, results, domain, false, walk, out);
        }
        self.mailbox(&addr, user, walk, out)
    }

    /// A final local address: the user must exist (or `postmaster`, which RFC 5321 requires).
    fn mailbox(
        &self,
        addr: &str,
        user: &str,
        walk: &Walk,
        out: &mut Vec<Target>,
    ) -> Result<(), RecipientError> {
        if !valid_mailbox_name(user) {
            return Err(RecipientError::BadMailbox);
        }
        if !(self.accept_unknown || user == "postmaster" || self.users.contains_key(user)) {
            return Err(RecipientError::UnknownUser);
        }
        self.push(out, Target::Local(addr.to_string()), walk)
    }

    fn virtual_lookup(&self, local: &str, domain: &str) -> Option<&Vec<String>> {
        if self.virtuals.is_empty() {
            return None;
        }
        let base = self.strip_extension(local);
        let full = |l: &str| format!("{l}@{domain}");
        self.virtuals
            .get(&full(local))
            .or_else(|| {
                (base != local)
                    .then(|| self.virtuals.get(&full(base)))
                    .flatten()
            })
            .or_else(|| {
                // A bare `user` pattern matches only local domains (Postfix: $myorigin, $mydestination).
                self.is_local_domain(domain)
                    .then(|| self.virtuals.get(base))
                    .flatten()
            })
            .or_else(|| self.virtuals.get(&format!("@{domain}")))
    }

    /// Expands the targets of a map entry for `addr`. A target equal to `addr` is final (Postfix: an alias that
    /// names itself delivers to the mailbox); one already being expanded above is dropped and noted.
    fn follow(
        &self,
        addr: &str,
        results: &[String],
        domain: &str,
        is_virtual: bool,
        walk: &mut Walk,
        out: &mut Vec<Target>,
    ) -> Result<(), RecipientError> {
        if results.is_empty() {
            return Err(RecipientError::UnknownUser);
        }
        if walk.path.len() >= self.recursion_limit {
            return Err(RecipientError::Loop);
        }
        walk.path.push(addr.to_string());
        for r in results {
            let target = if r.contains('@') {
                r.clone()
            } else if is_virtual {
                format!("{r}@{}", self.primary_domain)
            } else {
                format!("{r}@{domain}")
            };
            let (tl, td) = target.rsplit_once('@').unwrap_or((&target, ""));
            let self_ref = target == addr || {
                // `alice: alice, ...` reached through alice+ext also ends at alice's mailbox.
                let (al, ad) = addr.rsplit_once('@').unwrap_or((addr, ""));
                !is_virtual && td == ad && tl == self.strip_extension(al)
            };
            let r = if self_ref {
                if is_virtual {
                    self.after_virtual(&target, walk, out)
                } else {
                    self.mailbox(&target, tl, walk, out)
                }
            } else if walk.path.contains(&target) {
                walk.looped = true;
                Ok(())
            } else {
                self.expand(&target, walk, out)
            };
            if let Err(e) = r {
                walk.path.pop();
                return Err(e);
            }
        }
        walk.path.pop();
        Ok(())
    }

    /// A virtual alias that maps an address to itself: continue as if virtual aliasing had not matched.
    fn after_virtual(
        &self,
        addr: &str,
        walk: &Walk,
        out: &mut Vec<Target>,
    ) -> Result<(), RecipientError> {
        let (local, domain) = addr.rsplit_once('@').unwrap_or((addr, ""));
        if !self.is_local_domain(domain) {
            return self.push(out, Target::Remote(addr.to_string()), walk);
        }
        let user = self.strip_extension(local);
        self.mailbox(addr, user, walk, out)
    }
}

/// State of one expansion: the chain of addresses above the current one, and whether an edge was dropped.
struct Walk {
    path: Vec<String>,
    first: usize,
    looped: bool,
}

/// A local part that is safe as one path component: no `/`, NUL or leading dot, at most
/// [`limits::LOCAL_MAILBOX_NAME_BYTES_MAX`] bytes.
pub fn valid_mailbox_name(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= limits::LOCAL_MAILBOX_NAME_BYTES_MAX
        && !user.starts_with('.')
        && !user
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_control())
}

/// Identity of a source file's content, to notice changes (mtime alone misses same-second rewrites).
type Fingerprint = Option<(SystemTime, u64, u64)>;

fn fingerprint(p: &Path) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// The current [`RecipientMaps`], replaced when a source file changes.
#[derive(Debug)]
pub struct RecipientTable {
    current: RwLock<Arc<RecipientMaps>>,
    /// Bumped at each reload, so a shard's [`TableView`] knows, with one atomic load, when to take the lock.
    generation: AtomicU64,
    /// `current.rewrites_remote()`, readable without the lock (checked for every relayed RCPT).
    rewrites_remote: AtomicBool,
    /// The configuration the tables are read with (replaced by a configuration reload, see [`RecipientTable::install`]).
    cfg: Mutex<Arc<Config>>,
    sources: Mutex<Vec<(PathBuf, Fingerprint)>>,
}

impl RecipientTable {
    pub fn load(cfg: Arc<Config>) -> Result<RecipientTable, TableError> {
        let sources = fingerprints(&cfg);
        let maps = RecipientMaps::load(&cfg)?;
        Ok(RecipientTable {
            rewrites_remote: AtomicBool::new(maps.rewrites_remote()),
            current: RwLock::new(Arc::new(maps)),
            generation: AtomicU64::new(0),
            cfg: Mutex::new(cfg),
            sources: Mutex::new(sources),
        })
    }

    /// A configuration reload: `maps` (read from `cfg` by the caller, before anything changed) become the
    /// tables, and `cfg` what later reloads read (its files are watched from now on).
    pub fn install(&self, cfg: Arc<Config>, maps: RecipientMaps) {
        let sources = fingerprints(&cfg);
        *lock(&self.cfg) = cfg;
        *lock(&self.sources) = sources;
        self.put(Arc::new(maps));
    }

    fn put(&self, maps: Arc<RecipientMaps>) {
        self.rewrites_remote
            .store(maps.rewrites_remote(), Ordering::Relaxed);
        match self.current.write() {
            Ok(mut g) => *g = maps,
            Err(p) => *p.into_inner() = maps,
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The current snapshot (cheap: one reference count).
    pub fn snapshot(&self) -> Arc<RecipientMaps> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Whether virtual aliases may rewrite a remote address (see [`RecipientMaps::rewrites_remote`]).
    pub fn rewrites_remote(&self) -> bool {
        self.rewrites_remote.load(Ordering::Relaxed)
    }

    /// Reloads when a source file changed (or always, with `force`). Returns whether a new snapshot is in
    /// place; on a bad file the old snapshot stays and the error is returned.
    pub fn reload_if_changed(&self, force: bool) -> Result<bool, TableError> {
        let mut sources = lock(&self.sources);
        let mut changed = force;
        for (p, f) in sources.iter_mut() {
            let now = fingerprint(p);
            if now != *f {
                *f = now;
                changed = true;
            }
        }
        if !changed {
            return Ok(false);
        }
        let cfg = lock(&self.cfg).clone();
        let maps = Arc::new(RecipientMaps::load(&cfg)?);
        self.put(maps);
        Ok(true)
    }

    /// Reloads so far (see [`TableView`]).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

fn fingerprints(cfg: &Config) -> Vec<(PathBuf, Fingerprint)> {
    source_files(cfg)
        .into_iter()
        .map(|p| {
            let f = fingerprint(&p);
            (p, f)
        })
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// One shard's copy of the current tables: a RCPT reads it with one atomic load (the table's generation) and
/// takes the table's lock only after a reload, once per shard.
#[derive(Debug)]
pub struct TableView {
    table: Arc<RecipientTable>,
    cached: std::cell::RefCell<(u64, Arc<RecipientMaps>)>,
}

impl TableView {
    pub fn new(table: Arc<RecipientTable>) -> TableView {
        let g = table.generation();
        let maps = table.snapshot();
        TableView {
            table,
            cached: std::cell::RefCell::new((g, maps)),
        }
    }

    /// The current tables.
    pub fn get(&self) -> Arc<RecipientMaps> {
        let g = self.table.generation();
        let mut c = self.cached.borrow_mut();
        if c.0 != g {
            // Generation first, then the tables: a reload in between is seen at the next call.
            *c = (g, self.table.snapshot());
        }
        c.1.clone()
    }

    /// See [`RecipientTable::rewrites_remote`].
    pub fn rewrites_remote(&self) -> bool {
        self.table.rewrites_remote()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maps(aliases: &str, virtuals: &str, users: &[&str], delim: &str) -> RecipientMaps {
        let mut m = RecipientMaps {
            local_domains: ["example.com", "localhost"].map(String::from).into(),
            primary_domain: "example.com".into(),
            delimiters: delim.chars().collect(),
            recursion_limit: 1000,
            expansion_limit: 1000,
            ..Default::default()
        };
        m.aliases = maps::parse_aliases(aliases, "aliases").unwrap().entries;
        let v = maps::parse_virtual(virtuals, "virtual").unwrap();
        m.virtuals = v.entries;
        m.virtual_domains = v.domains.into_iter().collect();
        m.users = users.iter().map(|u| (u.to_string(), None)).collect();
        m
    }

    fn resolve(m: &RecipientMaps, a: &str) -> Result<Vec<String>, RecipientError> {
        let mut out = Vec::new();
        m.resolve(a, &mut out).map(|_| {
            out.iter()
                .map(|t| match t {
                    Target::Local(a) => format!("L:{a}"),
                    Target::Remote(a) => format!("R:{a}"),
                })
                .collect()
        })
    }

    #[test]
    fn users_extensions_and_unknown() {
        let m = maps("", "", &["alice"], "+");
        assert_eq!(
            resolve(&m, "Alice@example.com"),
            Ok(vec!["L:alice@example.com".into()])
        );
        assert_eq!(
            resolve(&m, "alice+news@example.com"),
            Ok(vec!["L:alice+news@example.com".into()])
        );
        assert_eq!(
            resolve(&m, "bob@example.com"),
            Err(RecipientError::UnknownUser)
        );
        assert_eq!(
            resolve(&m, "postmaster@example.com"),
            Ok(vec!["L:postmaster@example.com".into()])
        );
        assert_eq!(
            resolve(&m, "x@remote.example"),
            Ok(vec!["R:x@remote.example".into()])
        );
        assert_eq!(
            resolve(&m, "John.Doe@remote.example"),
            Ok(vec!["R:John.Doe@remote.example".into()]),
            "a remote local part keeps its case"
        );
        assert_eq!(
            resolve(&m, "../etc@example.com"),
            Err(RecipientError::BadMailbox)
        );
        let no_delim = maps("", "", &["alice"], "");
        assert_eq!(
            resolve(&no_delim, "alice+news@example.com"),
            Err(RecipientError::UnknownUser)
        );
    }

    #[test]
    fn aliases_expand_recursively_with_remote_targets() {
        let m = maps(
            "sales: alice, team\nteam: bob, carol@remote.example\nself: self, alice\n",
            "",
            &["alice", "bob", "self"],
            "+",
        );
        assert_eq!(
            resolve(&m, "sales@example.com"),
            Ok(vec![
                "L:alice@example.com".into(),
                "L:bob@example.com".into(),
                "R:carol@remote.example".into()
            ])
        );
        // Self-reference delivers to the mailbox; duplicates collapse.
        assert_eq!(
            resolve(&m, "self+x@example.com"),
            Ok(vec![
                "L:self@example.com".into(),
                "L:alice@example.com".into()
            ])
        );
        // Aliases are per local domain: a bare name stays in the recipient's domain.
        assert_eq!(
            resolve(&m, "sales@localhost").unwrap()[0],
            "L:alice@localhost"
        );
    }

    #[test]
    fn loops_and_limits() {
        let m = maps("a: b\nb: a\nc: c2\nc2: alice, c\n", "", &["alice"], "");
        assert_eq!(resolve(&m, "a@example.com"), Err(RecipientError::Loop));
        // A cycle that also reaches a mailbox delivers there once.
        assert_eq!(
            resolve(&m, "c@example.com"),
            Ok(vec!["L:alice@example.com".into()])
        );
        let mut big = String::from("big:");
        for i in 0..20 {
            big.push_str(&format!(" u{i}@remote.example,"));
        }
        big.pop();
        let mut m = maps(&big, "", &[], "");
        m.expansion_limit = 10;
        assert_eq!(resolve(&m, "big@example.com"), Err(RecipientError::TooMany));
        let mut out = vec![Target::Remote("keep@x".into())];
        assert!(m.resolve("big@example.com", &mut out).is_err());
        assert_eq!(
            out.len(),
            1,
            "a refused recipient leaves the list as it was"
        );
        let mut deep = maps("a0: a1\na1: a2\na2: a3\na3: alice\n", "", &["alice"], "");
        deep.recursion_limit = 3;
        assert_eq!(resolve(&deep, "a0@example.com"), Err(RecipientError::Loop));
        deep.recursion_limit = 4;
        assert_eq!(
            resolve(&deep, "a0@example.com"),
            Ok(vec!["L:alice@example.com".into()])
        );
    }

    #[test]
    fn virtual_aliases() {
        let m = maps(
            "staff: bob\n",
            "virt.example anything\nsales@virt.example alice@example.com, x@remote.example\n\
             info@virt.example staff@example.com\n@catch.example bob\n\
             alice@example.com alice@example.com, archive@remote.example\n",
            &["alice", "bob"],
            "+",
        );
        assert_eq!(
            resolve(&m, "sales@virt.example"),
            Ok(vec![
                "L:alice@example.com".into(),
                "R:archive@remote.example".into(),
                "R:x@remote.example".into()
            ])
        );
        assert_eq!(
            resolve(&m, "info@virt.example"),
            Ok(vec!["L:bob@example.com".into()])
        );
        assert_eq!(
            resolve(&m, "nobody@virt.example"),
            Err(RecipientError::UnknownVirtual)
        );
        assert_eq!(
            resolve(&m, "any@catch.example"),
            Ok(vec!["L:bob@example.com".into()])
        );
        assert_eq!(
            resolve(&m, "sales+tag@virt.example").unwrap().len(),
            3,
            "extension falls back to the base address"
        );
        let m = maps(
            "",
            "a@example.com b@example.com\nb@example.com a@example.com\n",
            &["a"],
            "",
        );
        assert_eq!(resolve(&m, "a@example.com"), Err(RecipientError::Loop));
    }

    #[test]
    fn table_reloads_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let aliases = dir.path().join("aliases");
        std::fs::write(&aliases, "sales: alice\n").unwrap();
        let cfg = Config {
            alias_maps: vec![format!("hash:{}", aliases.display())],
            local: crate::config::LocalConfig {
                users: vec!["alice".into(), "bob".into()],
                system_users: false,
                ..Default::default()
            },
            ..Config::default()
        };
        let t = Arc::new(RecipientTable::load(Arc::new(cfg)).unwrap());
        let first = |t: &RecipientTable| {
            let mut out = Vec::new();
            t.snapshot().resolve("sales@localhost", &mut out).unwrap();
            out[0].address().to_string()
        };
        // A shard's view: the same tables until a reload, then the new ones.
        let view = TableView::new(t.clone());
        let before = view.get();
        assert_eq!(first(&t), "alice@localhost");
        assert!(!t.reload_if_changed(false).unwrap());
        assert!(
            Arc::ptr_eq(&before, &view.get()),
            "no reload: no new snapshot"
        );
        std::fs::write(&aliases, "sales: bob, alice\n").unwrap();
        assert!(t.reload_if_changed(false).unwrap());
        assert_eq!(first(&t), "bob@localhost");
        let mut out = Vec::new();
        view.get().resolve("sales@localhost", &mut out).unwrap();
        assert_eq!(
            out[0].address(),
            "bob@localhost",
            "the view follows the reload"
        );
        std::fs::write(&aliases, "broken line\n").unwrap();
        assert!(t.reload_if_changed(false).is_err());
        assert_eq!(first(&t), "bob@localhost", "a bad file keeps the old table");
    }
}
