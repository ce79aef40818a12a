//! Owns the suppression list: recipient addresses and whole domains that mail is never delivered to (the
//! dispatcher bounces them before routing), its file in the spool, and the shared snapshot every shard reads.
//!
//! Entries: a full address (`user@example.com`; compared without case, as the relay compares recipients) or a
//! domain (`@example.com` or `example.com`; the domain itself, not its subdomains), each with a reason, the
//! time it was added and an optional expiry (an expired entry no longer matches and is left out of the next
//! write). At most [`ENTRIES_MAX`] entries.
//!
//! The file `<queue_directory>/suppression.list` is one entry per line,
//! `TARGET<TAB>ADDED_UNIX<TAB>EXPIRES_UNIX<TAB>REASON` (`-`: never expires)
//! (`#` lines and blank lines are comments), at most [`LINE_BYTES_MAX`] bytes a line. It is rewritten whole on
//! each change: a temporary file (0600, `O_EXCL|O_NOFOLLOW`), fsync, rename over the list, fsync of the spool
//! directory; a crash leaves the old list or the new one. A line that does not parse is an error naming the
//! line (the server does not start on it; nothing is dropped silently).
//!
//! Who runs what: shards read the current [`List`] through a [`View`] (one atomic load a check until the
//! generation moves). Changes ([`Suppression::add`], [`Suppression::remove`]) do file I/O and run on the HTTP
//! executor's blocking pool or on the list's writer thread (automatic adds from bounces, sent with
//! [`Suppression::auto_add`], which never blocks: a full channel drops the add and logs it).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// The list's file name in the spool.
pub const FILE_NAME: &str = "suppression.list";
const TEMP_NAME: &str = "suppression.list.tmp";
/// Entries the list holds at most.
pub const ENTRIES_MAX: usize = 1_000_000;
/// A line of the file at most (target + time + reason).
pub const LINE_BYTES_MAX: usize = 2048;
/// A reason at most (longer ones are cut at a character boundary).
pub const REASON_BYTES_MAX: usize = 512;
/// The file at most (ENTRIES_MAX full lines).
const FILE_BYTES_MAX: u64 = (ENTRIES_MAX * LINE_BYTES_MAX) as u64;
/// Automatic adds waiting for the writer thread at most.
const AUTO_ADDS_QUEUED_MAX: usize = 1024;

/// Why the list cannot be read, parsed or changed.
#[derive(Debug, thiserror::Error)]
pub enum SuppressionError {
    #[error("{0}")]
    Spool(#[from] crate::spool::SpoolError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {message}")]
    BadLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error(
        "bad entry {0:?}: an address (user@example.com) or a domain (@example.com or example.com)"
    )]
    BadTarget(String),
    #[error("the suppression list is full ({ENTRIES_MAX} entries)")]
    Full,
    #[error("{path}: larger than {FILE_BYTES_MAX} bytes")]
    TooLarge { path: PathBuf },
}

/// What an entry suppresses.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// One address, stored lowercased.
    Address(String),
    /// Every address of this domain, stored lowercased without a trailing dot.
    Domain(String),
}

impl Target {
    /// `user@example.com` is an address; `@example.com` and `example.com` are domains.
    pub fn parse(s: &str) -> Result<Target, SuppressionError> {
        let bad = || SuppressionError::BadTarget(s.chars().take(100).collect());
        let t = s.trim();
        if t.is_empty()
            || t.len() > 320
            || t.chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>')
        {
            return Err(bad());
        }
        let domain_ok = |d: &str| {
            !d.is_empty()
                && d.len() <= 255
                && !d.contains('@')
                && !d.starts_with('.')
                && !d.ends_with('.')
                && !d.contains("..")
        };
        match t.rsplit_once('@') {
            Some(("", d)) => {
                let d = crate::smtp::address::normalize_domain(d);
                domain_ok(&d).then_some(Target::Domain(d)).ok_or_else(bad)
            }
            Some((local, d)) => {
                let d = crate::smtp::address::normalize_domain(d);
                if local.len() > 64 * 4 || local.contains('@') || !domain_ok(&d) {
                    return Err(bad());
                }
                Ok(Target::Address(format!("{}@{d}", local.to_lowercase())))
            }
            None => {
                let d = crate::smtp::address::normalize_domain(t);
                domain_ok(&d).then_some(Target::Domain(d)).ok_or_else(bad)
            }
        }
    }

    /// The key as written in the file and shown (`user@example.com` or `@example.com`).
    pub fn key(&self) -> String {
        match self {
            Target::Address(a) => a.clone(),
            Target::Domain(d) => format!("@{d}"),
        }
    }
}

/// One entry as listed (JSON for `list --json` and the API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// `user@example.com` or `@example.com`.
    pub entry: String,
    /// `address` or `domain`.
    pub kind: &'static str,
    pub reason: String,
    pub added_unix: u64,
    /// When it stops applying (unix seconds); absent: never.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_unix: Option<u64>,
}

#[derive(Debug, Clone)]
struct Value {
    reason: Arc<str>,
    added_unix: u64,
    expires_unix: Option<u64>,
}

impl Value {
    fn live(&self, now: u64) -> bool {
        self.expires_unix.is_none_or(|e| now < e)
    }
}

/// One snapshot of the list (immutable; replaced whole on a change).
#[derive(Debug, Default, Clone)]
pub struct List {
    addresses: HashMap<String, Value>,
    domains: HashMap<String, Value>,
}

/// Why a recipient is suppressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    /// The entry that matched (`user@example.com` or `@example.com`).
    pub entry: String,
    pub reason: Arc<str>,
}

fn clean_reason(r: &str) -> String {
    let mut s: String = r
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.len() > REASON_BYTES_MAX {
        let mut cut = REASON_BYTES_MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s.trim().to_string()
}

impl List {
    pub fn len(&self) -> usize {
        self.addresses.len() + self.domains.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entry suppressing `rcpt` (an address; the whole-address entry first, then its domain's).
    pub fn check(&self, rcpt: &str) -> Option<Hit> {
        self.check_at(rcpt, now_unix())
    }

    /// [`Self::check`] at `now` (unix seconds): expired entries do not match.
    pub fn check_at(&self, rcpt: &str, now: u64) -> Option<Hit> {
        if self.is_empty() {
            return None;
        }
        let lower = rcpt.to_lowercase();
        let lower = lower.trim_end_matches('.');
        if let Some(v) = self.addresses.get(lower).filter(|v| v.live(now)) {
            return Some(Hit {
                entry: lower.to_string(),
                reason: v.reason.clone(),
            });
        }
        let (_, d) = lower.rsplit_once('@')?;
        self.domains.get(d).filter(|v| v.live(now)).map(|v| Hit {
            entry: format!("@{d}"),
            reason: v.reason.clone(),
        })
    }

    fn map_of(&mut self, t: &Target) -> (&mut HashMap<String, Value>, String) {
        match t {
            Target::Address(a) => (&mut self.addresses, a.clone()),
            Target::Domain(d) => (&mut self.domains, d.clone()),
        }
    }

    /// Adds (or replaces the reason of) `t`; false if it was there already.
    fn insert(
        &mut self,
        t: &Target,
        reason: &str,
        added_unix: u64,
        expires_unix: Option<u64>,
    ) -> Result<bool, SuppressionError> {
        let full = self.len() >= ENTRIES_MAX;
        let (map, k) = self.map_of(t);
        let v = Value {
            reason: clean_reason(reason).into(),
            added_unix,
            expires_unix,
        };
        match map.insert(k.clone(), v) {
            Some(_) => Ok(false),
            None if full => {
                map.remove(&k);
                Err(SuppressionError::Full)
            }
            None => Ok(true),
        }
    }

    /// Every entry, sorted by key.
    pub fn entries(&self) -> Vec<Entry> {
        let mut v: Vec<Entry> = self
            .addresses
            .iter()
            .map(|(k, v)| Entry {
                entry: k.clone(),
                kind: "address",
                reason: v.reason.to_string(),
                added_unix: v.added_unix,
                expires_unix: v.expires_unix,
            })
            .chain(self.domains.iter().map(|(k, v)| Entry {
                entry: format!("@{k}"),
                kind: "domain",
                reason: v.reason.to_string(),
                added_unix: v.added_unix,
                expires_unix: v.expires_unix,
            }))
            .collect();
        v.sort_by(|a, b| a.entry.cmp(&b.entry));
        v
    }

    /// The file's text (entries expired at `now` left out).
    pub fn render(&self, now: u64) -> String {
        let mut s = String::from(
            "# shardmta suppression list: TARGET<TAB>ADDED_UNIX<TAB>EXPIRES_UNIX or -<TAB>REASON\n",
        );
        for e in self.entries() {
            if e.expires_unix.is_some_and(|x| x <= now) {
                continue;
            }
            let exp = e.expires_unix.map_or("-".to_string(), |x| x.to_string());
            s.push_str(&format!(
                "{}\t{}\t{exp}\t{}\n",
                e.entry, e.added_unix, e.reason
            ));
        }
        s
    }

    /// Parses the file's text (`path` names it in errors).
    pub fn parse(text: &[u8], path: &Path) -> Result<List, SuppressionError> {
        let mut list = List::default();
        for (i, raw) in text.split(|&b| b == b'\n').enumerate() {
            let bad = |message: String| SuppressionError::BadLine {
                path: path.to_path_buf(),
                line: i + 1,
                message,
            };
            if raw.len() > LINE_BYTES_MAX {
                return Err(bad(format!("longer than {LINE_BYTES_MAX} bytes")));
            }
            let line = std::str::from_utf8(raw).map_err(|_| bad("not UTF-8".into()))?;
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let mut f = line.splitn(4, '\t');
            let target = f.next().unwrap_or("");
            let t = Target::parse(target).map_err(|e| bad(e.to_string()))?;
            let added: u64 = f
                .next()
                .ok_or_else(|| {
                    bad("no time added (TARGET<TAB>ADDED_UNIX<TAB>EXPIRES_UNIX<TAB>REASON)".into())
                })?
                .parse()
                .map_err(|_| bad("the time added is not a number".into()))?;
            let expires = match f.next() {
                None | Some("-") => None,
                Some(x) => Some(
                    x.parse::<u64>()
                        .map_err(|_| bad("the expiry is not a number or -".into()))?,
                ),
            };
            let reason = f.next().unwrap_or("");
            list.insert(&t, reason, added, expires)
                .map_err(|e| bad(e.to_string()))?;
        }
        Ok(list)
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// A change made on another node of the cluster, for [`Suppression::apply_shared`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedOp {
    Add {
        target: Target,
        reason: String,
        expires_unix: Option<u64>,
    },
    Remove(Target),
}

/// The list of a spool, shared by every thread: the current snapshot, its generation, and the file.
pub struct Suppression {
    dir: PathBuf,
    current: RwLock<Arc<List>>,
    generation: AtomicU64,
    /// Serializes changes (read, change, write, publish).
    writing: Mutex<()>,
    /// Automatic adds for the writer thread (None until [`Suppression::start_writer`]).
    auto: Mutex<Option<mpsc::SyncSender<(Target, String)>>>,
    /// Recipients not delivered because suppressed (all shards).
    pub suppressed_total: AtomicU64,
    /// Automatic adds dropped because the writer's channel was full, or failed to be written.
    pub auto_add_failures: AtomicU64,
}

impl Suppression {
    /// Reads `<queue_directory>/suppression.list` (an empty list when missing).
    pub fn open(queue_directory: &Path) -> Result<Arc<Suppression>, SuppressionError> {
        let list = read(queue_directory)?;
        Ok(Arc::new(Suppression {
            dir: queue_directory.to_path_buf(),
            current: RwLock::new(Arc::new(list)),
            generation: AtomicU64::new(0),
            writing: Mutex::new(()),
            auto: Mutex::new(None),
            suppressed_total: AtomicU64::new(0),
            auto_add_failures: AtomicU64::new(0),
        }))
    }

    pub fn snapshot(&self) -> Arc<List> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn change(
        &self,
        f: impl FnOnce(&mut List) -> Result<bool, SuppressionError>,
    ) -> Result<bool, SuppressionError> {
        let _w = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = (*self.snapshot()).clone();
        if !f(&mut next)? {
            return Ok(false);
        }
        write(&self.dir, &next)?;
        match self.current.write() {
            Ok(mut g) => *g = Arc::new(next),
            Err(p) => *p.into_inner() = Arc::new(next),
        }
        self.generation.fetch_add(1, Ordering::Release);
        Ok(true)
    }

    /// Adds `target` (or replaces its reason) and makes the file durable before returning (blocking I/O: the
    /// HTTP executor's blocking pool or the writer thread). True if it is new.
    pub fn add(
        &self,
        target: &Target,
        reason: &str,
        expires_unix: Option<u64>,
    ) -> Result<bool, SuppressionError> {
        let mut new = false;
        self.change(|l| {
            new = l.insert(target, reason, now_unix(), expires_unix)?;
            Ok(true)
        })?;
        Ok(new)
    }

    /// Removes `target`; false if it was not listed. Durable before returning (blocking I/O).
    pub fn remove(&self, target: &Target) -> Result<bool, SuppressionError> {
        self.change(|l| {
            let (map, k) = l.map_of(target);
            Ok(map.remove(&k).is_some())
        })
    }

    /// Applies changes made on other nodes (`crate::cluster::suppression`) with at most one write of the file:
    /// an add of an entry not listed, or listed with another reason or expiry, and a remove of a listed one.
    /// Returns how many changed the list (0: nothing written). Blocking I/O, as [`Self::add`].
    pub fn apply_shared(&self, ops: &[SharedOp]) -> Result<usize, SuppressionError> {
        let mut changed = 0;
        let now = now_unix();
        self.change(|l| {
            for op in ops {
                match op {
                    SharedOp::Add {
                        target,
                        reason,
                        expires_unix,
                    } => {
                        let (map, k) = l.map_of(target);
                        let same = map.get(&k).is_some_and(|v| {
                            *v.reason == clean_reason(reason) && v.expires_unix == *expires_unix
                        });
                        if !same && l.insert(target, reason, now, *expires_unix).is_ok() {
                            changed += 1;
                        }
                    }
                    SharedOp::Remove(target) => {
                        let (map, k) = l.map_of(target);
                        if map.remove(&k).is_some() {
                            changed += 1;
                        }
                    }
                }
            }
            Ok(changed > 0)
        })?;
        Ok(changed)
    }

    /// Adds the entries of `batch` not listed yet, with one write of the file; each is logged, a failure
    /// counted in `auto_add_failures`.
    fn add_batch(&self, batch: &[(Target, String)]) {
        let mut added: Vec<&Target> = Vec::new();
        let mut refused = 0u64;
        let now = now_unix();
        let r = self.change(|l| {
            for (t, reason) in batch {
                if l.check_target(t) {
                    continue;
                }
                match l.insert(t, reason, now, None) {
                    Ok(_) => added.push(t),
                    Err(_) => refused += 1,
                }
            }
            Ok(!added.is_empty())
        });
        match r {
            Ok(_) => {
                for t in &added {
                    tracing::info!(target: crate::eventlog::QMGR, "suppression: added {} automatically", t.key());
                }
                if refused > 0 {
                    self.auto_add_failures.fetch_add(refused, Ordering::Relaxed);
                    tracing::error!(target: crate::eventlog::QMGR, "suppression: {refused} automatic add(s) refused: the list is full");
                }
            }
            Err(e) => {
                self.auto_add_failures
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                tracing::error!(target: crate::eventlog::QMGR, "suppression: cannot write {} automatic add(s): {e}", batch.len());
            }
        }
    }

    /// Starts the thread that writes automatic adds ([`Self::auto_add`]); it ends when the list is dropped
    /// (its channel's sender goes with it).
    pub fn start_writer(self: &Arc<Self>) -> std::io::Result<()> {
        let (tx, rx) = mpsc::sync_channel::<(Target, String)>(AUTO_ADDS_QUEUED_MAX);
        let me = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("suppression".into())
            .spawn(move || {
                // Adds that arrive together are written together (one rewrite of the file per batch).
                while let Ok(first) = rx.recv() {
                    let Some(s) = me.upgrade() else { return };
                    let mut batch = vec![first];
                    while batch.len() < AUTO_ADDS_QUEUED_MAX {
                        match rx.try_recv() {
                            Ok(x) => batch.push(x),
                            Err(_) => break,
                        }
                    }
                    s.add_batch(&batch);
                }
            })?;
        *self.auto.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        Ok(())
    }

    /// Asks the writer thread to add `address` (never blocks; a full channel drops it, counted and logged).
    pub fn auto_add(&self, address: &str, reason: &str) {
        let Ok(t @ Target::Address(_)) = Target::parse(address) else {
            return;
        };
        if self.snapshot().check_target(&t) {
            return;
        }
        let tx = self.auto.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let sent = tx.is_some_and(|tx| tx.try_send((t, reason.to_string())).is_ok());
        if !sent {
            self.auto_add_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: crate::eventlog::QMGR, "suppression: automatic add of {address} dropped (writer busy)");
        }
    }
}

impl std::fmt::Debug for crate::suppression::Suppression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Suppression({} entries)", self.snapshot().len())
    }
}

impl List {
    fn check_target(&self, t: &Target) -> bool {
        match t {
            Target::Address(a) => self.addresses.contains_key(a),
            Target::Domain(d) => self.domains.contains_key(d),
        }
    }
}

/// Reads and parses the list of a spool (empty when the file is missing). Works on a stopped spool.
pub fn read(queue_directory: &Path) -> Result<List, SuppressionError> {
    let dir = crate::spool::Dir::open_root(queue_directory)?;
    let path = queue_directory.join(FILE_NAME);
    let mut f = match dir.open_file(FILE_NAME, false) {
        Ok(f) => f,
        Err(e) if e.io_error().map(|e| e.kind()) == Some(std::io::ErrorKind::NotFound) => {
            return Ok(List::default())
        }
        Err(e) => return Err(e.into()),
    };
    let mut text = Vec::new();
    (&mut f)
        .take(FILE_BYTES_MAX + 1)
        .read_to_end(&mut text)
        .map_err(|source| SuppressionError::Io {
            path: path.clone(),
            source,
        })?;
    if text.len() as u64 > FILE_BYTES_MAX {
        return Err(SuppressionError::TooLarge { path });
    }
    List::parse(&text, &path)
}

/// Writes `list` as the spool's list: temporary file, fsync, rename, directory fsync
/// ([`crate::spool::Dir::replace_file`]).
pub fn write(queue_directory: &Path, list: &List) -> Result<(), SuppressionError> {
    let dir = crate::spool::Dir::open_root(queue_directory)?;
    debug_assert_eq!(TEMP_NAME, format!("{FILE_NAME}.tmp"));
    dir.replace_file(FILE_NAME, list.render(now_unix()).as_bytes(), true)?;
    Ok(())
}

/// A shard's view of the list: the snapshot it holds, refreshed when the generation moves (one atomic load a
/// check otherwise).
pub struct View {
    shared: Arc<Suppression>,
    held: RefCell<(u64, Arc<List>)>,
}

impl View {
    pub fn new(shared: Arc<Suppression>) -> View {
        let g = shared.generation();
        let l = shared.snapshot();
        View {
            shared,
            held: RefCell::new((g, l)),
        }
    }

    /// The entry suppressing `rcpt`, if any (counted in `shardmta_suppressed_total` by the caller).
    pub fn check(&self, rcpt: &str) -> Option<Hit> {
        let g = self.shared.generation();
        if self.held.borrow().0 == g && self.held.borrow().1.is_empty() {
            return None; // the usual case: no list, no clock read
        }
        if self.held.borrow().0 != g {
            *self.held.borrow_mut() = (g, self.shared.snapshot());
        }
        self.held.borrow().1.check(rcpt)
    }

    pub fn shared(&self) -> &Arc<Suppression> {
        &self.shared
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(
            d.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .expect("chmod");
        d
    }

    #[test]
    fn targets_parse_as_addresses_or_domains() {
        assert_eq!(
            Target::parse("User@Example.COM").expect("address"),
            Target::Address("user@example.com".into())
        );
        assert_eq!(
            Target::parse("@Example.com.").expect("domain"),
            Target::Domain("example.com".into())
        );
        assert_eq!(
            Target::parse("example.com").expect("domain"),
            Target::Domain("example.com".into())
        );
        for bad in [
            "",
            "a b@x",
            "@",
            "user@",
            "<a@b>",
            "a@b..c",
            "a@@b",
            "example.com..",
            "a@x.test..",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn matching_is_without_case_and_by_address_then_domain() {
        let mut l = List::default();
        l.insert(&Target::parse("bob@example.com").unwrap(), "gone", 1, None)
            .unwrap();
        l.insert(
            &Target::parse("@blocked.test").unwrap(),
            "complaints",
            2,
            None,
        )
        .unwrap();
        let h = l.check("BOB@Example.com").expect("address hit");
        assert_eq!((h.entry.as_str(), &*h.reason), ("bob@example.com", "gone"));
        let h = l.check("anyone@BLOCKED.test").expect("domain hit");
        assert_eq!(h.entry, "@blocked.test");
        assert!(l.check("alice@example.com").is_none());
        assert!(l.check("x@sub.blocked.test").is_none());
    }

    #[test]
    fn the_file_round_trips_and_changes_are_durable() {
        let d = tmp();
        let s = Suppression::open(d.path()).expect("open");
        assert!(s.snapshot().is_empty());
        let g0 = s.generation();
        assert!(s
            .add(
                &Target::parse("a@x.test").unwrap(),
                "550 5.1.1 no\tsuch\nuser",
                None
            )
            .unwrap());
        assert!(s.add(&Target::parse("y.test").unwrap(), "", None).unwrap());
        assert!(s.generation() > g0);
        let again = read(d.path()).expect("read");
        assert_eq!(again.entries(), s.snapshot().entries());
        assert_eq!(
            again.check("A@X.test").unwrap().reason.as_ref(),
            "550 5.1.1 no such user"
        );
        assert!(s.remove(&Target::parse("a@x.test").unwrap()).unwrap());
        assert!(!s.remove(&Target::parse("a@x.test").unwrap()).unwrap());
        assert_eq!(read(d.path()).unwrap().len(), 1);
        // No temporary file is left behind.
        assert!(!d.path().join(TEMP_NAME).exists());
    }

    /// Changes from other nodes: one write per batch, none when they change nothing.
    #[test]
    fn shared_changes_write_only_what_changes() {
        let d = tmp();
        let s = Suppression::open(d.path()).expect("open");
        let bob = Target::parse("bob@x.test").unwrap();
        let add = |r: &str| SharedOp::Add {
            target: bob.clone(),
            reason: r.into(),
            expires_unix: None,
        };
        let ops = vec![
            add("gone"),
            SharedOp::Remove(Target::parse("@y.test").unwrap()),
        ];
        assert_eq!(s.apply_shared(&ops).unwrap(), 1);
        let g = s.generation();
        assert_eq!(s.apply_shared(&ops).unwrap(), 0, "the same again");
        assert_eq!(s.generation(), g, "nothing written");
        assert_eq!(s.apply_shared(&[add("new reason")]).unwrap(), 1);
        assert_eq!(
            read(d.path())
                .unwrap()
                .check("bob@x.test")
                .unwrap()
                .reason
                .as_ref(),
            "new reason"
        );
        assert_eq!(s.apply_shared(&[SharedOp::Remove(bob.clone())]).unwrap(), 1);
        assert!(read(d.path()).unwrap().is_empty());
    }

    #[test]
    fn a_crash_before_the_rename_leaves_the_old_list() {
        let d = tmp();
        let s = Suppression::open(d.path()).expect("open");
        s.add(&Target::parse("a@x.test").unwrap(), "r", None)
            .unwrap();
        // A half-written temporary file of a crashed write is ignored and replaced by the next one.
        std::fs::write(d.path().join(TEMP_NAME), "garbage\tnot a list").unwrap();
        assert_eq!(read(d.path()).unwrap().len(), 1);
        s.add(&Target::parse("b@x.test").unwrap(), "r", None)
            .unwrap();
        assert_eq!(read(d.path()).unwrap().len(), 2);
    }

    #[test]
    fn a_hostile_file_is_an_error_naming_the_line() {
        let d = tmp();
        let p = d.path().join(FILE_NAME);
        let cases: Vec<(Vec<u8>, usize)> = vec![
            (
                b"# c\na@x.test\t1\t-\tok\nnot an entry\t1\t-\tr\n".to_vec(),
                3,
            ),
            (b"a@x.test\tsoon\tr\n".to_vec(), 1),
            (b"a@x.test\n".to_vec(), 1),
            ([b"\n".to_vec(), vec![b'a'; LINE_BYTES_MAX + 1]].concat(), 2),
            (b"a@x.test\t1\t-\t\xff\n".to_vec(), 1),
            (b"a@x.test\t1\tnever\tr\n".to_vec(), 1),
        ];
        for (text, line) in cases {
            std::fs::write(&p, &text).unwrap();
            match read(d.path()) {
                Err(SuppressionError::BadLine { line: l, .. }) => assert_eq!(l, line),
                other => panic!("{other:?}"),
            }
        }
        // A symlink in its place is refused, not followed.
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &p).unwrap();
        assert!(matches!(read(d.path()), Err(SuppressionError::Spool(_))));
    }

    #[test]
    fn an_expired_entry_no_longer_matches_and_is_not_written_again() {
        let d = tmp();
        let s = Suppression::open(d.path()).expect("open");
        s.add(&Target::parse("a@x.test").unwrap(), "r", Some(1_000))
            .unwrap();
        s.add(&Target::parse("@y.test").unwrap(), "r", Some(u64::MAX))
            .unwrap();
        let l = s.snapshot();
        assert!(l.check_at("a@x.test", 999).is_some());
        assert!(l.check_at("a@x.test", 1_000).is_none());
        assert!(l.check("b@y.test").is_some());
        // Written long after 1,000: only the live entry is in the file.
        let again = read(d.path()).unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again.entries()[0].expires_unix, Some(u64::MAX));
    }

    #[test]
    fn a_view_follows_the_generation() {
        let d = tmp();
        let s = Suppression::open(d.path()).expect("open");
        let v = View::new(s.clone());
        assert!(v.check("a@x.test").is_none());
        s.add(&Target::parse("@x.test").unwrap(), "r", None)
            .unwrap();
        assert!(v.check("a@x.test").is_some());
    }

    #[test]
    fn a_batch_is_one_write_and_skips_listed_entries() {
        let d = tmp();
        let s = Suppression::open(d.path()).expect("open");
        s.add(&Target::parse("a@x.test").unwrap(), "by hand", None)
            .unwrap();
        let g = s.generation();
        let t = |a: &str| (Target::parse(a).unwrap(), format!("550 5.1.1 {a}"));
        s.add_batch(&[t("a@x.test"), t("b@x.test"), t("c@x.test"), t("b@x.test")]);
        assert_eq!(s.generation(), g + 1);
        let l = read(d.path()).unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l.check("a@x.test").unwrap().reason.as_ref(), "by hand");
        assert!(l.check("c@x.test").is_some());
        // Nothing new: no write.
        s.add_batch(&[t("c@x.test")]);
        assert_eq!(s.generation(), g + 1);
    }

    #[test]
    fn the_writer_thread_adds_automatically() {
        let d = tmp();
        let s = Suppression::open(d.path()).expect("open");
        s.start_writer().expect("thread");
        s.auto_add("Gone@X.test", "550 5.1.1 unknown");
        for _ in 0..200 {
            if !s.snapshot().is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(read(d.path()).unwrap().check("gone@x.test").is_some());
    }
}
