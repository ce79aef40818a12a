//! Traffic shaping: owns the shaping rules (the built-in provider defaults of `defaults.toml` and the operator's
//! `shaping_file`), the answer to "what applies to this destination" (its **site**, KumoMTA's name for the group
//! of domains that share an MX host set or a provider, and its effective [`Limits`], each value with the rule
//! that set it), and the per-shard cache of those answers ([`Shaping`]). The actions taken on the providers'
//! throttle replies (suspend, lower, restore) are [`automation`]'s.
//!
//! Matching: a `[site.NAME]` entry with `match = ["*.google.com", "mx.example.net"]` names the site of every
//! domain whose MX hosts all match one of its patterns (`*.suffix` or `.suffix`: a host below that suffix; else
//! the exact host); the first such site in file order wins (the file's own sites before the built-in ones).
//! Without a matching provider, the site is the MX host set, sorted and joined with `,`, or the domain itself
//! when its MX hosts are not known. A `[site.NAME]` entry without `match` gives values to the site of that name.
//! Precedence, lowest first: the site's values, the domain's (`[domain."x"]`), the site's for the egress source
//! (`[site.NAME.sources.SOURCE]`), the domain's for the source; within one entry the shaping file's values over
//! the built-in ones, parameter by parameter. A parameter nobody sets leaves the server's `[delivery]` setting.
//!
//! Bounds: a shaping file of at most 1 MiB, `ENTRIES_MAX` entries, `MATCH_MAX` patterns per site; the per-shard
//! cache holds at most `CACHE_MAX` answers (emptied when full or when the rules change).

pub mod automation;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{PfDuration, Rate};

/// Largest shaping file read.
const FILE_MAX: u64 = 1 << 20;
/// Most site and domain entries (each) in a file.
const ENTRIES_MAX: usize = 10_000;
/// Most `match` patterns of one site.
const MATCH_MAX: usize = 100;
/// Most sources sub-tables of one entry.
const SOURCES_MAX: usize = 1_000;
/// Answers a shard's [`Shaping`] cache keeps.
pub const CACHE_MAX: usize = 4_096;

/// The built-in rules.
const DEFAULTS: &str = include_str!("defaults.toml");

/// Why a shaping file was refused (each names the file and, where there is one, the entry).
#[derive(Debug, thiserror::Error)]
pub enum ShapingError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: larger than {FILE_MAX} bytes")]
    TooLarge { path: String },
    #[error("{path}: {message}")]
    Syntax { path: String, message: String },
    #[error("{path}: {entry}: {message}")]
    Entry {
        path: String,
        entry: String,
        message: String,
    },
}

/// The parameter names, in [`Limits`] order (the index of each value's origin in [`Applied::origins`]).
pub const PARAMS: [&str; 7] = [
    "max_connections",
    "max_messages_per_connection",
    "max_message_rate",
    "max_connection_rate",
    "max_recipients_per_transaction",
    "retry_interval",
    "max_retry_interval",
];

/// Limits a rule may set; `None`: not set here (the server's `[delivery]` value applies).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// Most concurrent connections to the site (`destination_concurrency_limit`).
    pub max_connections: Option<usize>,
    /// Messages sent over one connection before it is closed (`smtp_connection_reuse_count_limit`).
    pub max_messages_per_connection: Option<u32>,
    /// Messages a second to the site (`destination_rate_limit`).
    pub max_message_rate: Option<Rate>,
    /// New connections a second to the site.
    pub max_connection_rate: Option<Rate>,
    /// Recipients per transaction (`destination_recipient_limit`).
    pub max_recipients_per_transaction: Option<usize>,
    /// First retry delay of a deferred recipient (`minimal_backoff_time`).
    pub retry_interval: Option<Duration>,
    /// Longest retry delay (`maximal_backoff_time`).
    pub max_retry_interval: Option<Duration>,
}

impl Limits {
    /// Whether parameter `i` (of [`PARAMS`]) is set.
    fn is_set(&self, i: usize) -> bool {
        match i {
            0 => self.max_connections.is_some(),
            1 => self.max_messages_per_connection.is_some(),
            2 => self.max_message_rate.is_some(),
            3 => self.max_connection_rate.is_some(),
            4 => self.max_recipients_per_transaction.is_some(),
            5 => self.retry_interval.is_some(),
            _ => self.max_retry_interval.is_some(),
        }
    }

    /// Parameter `i`'s value as written in a shaping file (None: not set).
    pub fn show(&self, i: usize) -> Option<String> {
        let dur = |d: &Duration| PfDuration(*d).to_string();
        match i {
            0 => self.max_connections.map(|v| v.to_string()),
            1 => self.max_messages_per_connection.map(|v| v.to_string()),
            2 => self.max_message_rate.clone().map(String::from),
            3 => self.max_connection_rate.clone().map(String::from),
            4 => self.max_recipients_per_transaction.map(|v| v.to_string()),
            5 => self.retry_interval.as_ref().map(dur),
            _ => self.max_retry_interval.as_ref().map(dur),
        }
    }

    /// Copies parameter `i` from `other`.
    fn take(&mut self, other: &Limits, i: usize) {
        match i {
            0 => self.max_connections = other.max_connections,
            1 => self.max_messages_per_connection = other.max_messages_per_connection,
            2 => self.max_message_rate = other.max_message_rate.clone(),
            3 => self.max_connection_rate = other.max_connection_rate.clone(),
            4 => self.max_recipients_per_transaction = other.max_recipients_per_transaction,
            5 => self.retry_interval = other.retry_interval,
            _ => self.max_retry_interval = other.max_retry_interval,
        }
    }
}

/// Values with where each came from (a label such as `site google (built-in)`).
#[derive(Debug, Clone, Default)]
struct Layer {
    limits: Limits,
    origins: [Option<Arc<str>>; 7],
}

impl Layer {
    /// `other`'s set values over this layer's.
    fn overlay(&mut self, other: &Layer) {
        for i in 0..PARAMS.len() {
            if other.limits.is_set(i) {
                self.limits.take(&other.limits, i);
                self.origins[i] = other.origins[i].clone();
            }
        }
    }
}

/// One site or domain entry: its general values and those per egress source.
#[derive(Debug, Clone, Default)]
struct Entry {
    general: Layer,
    sources: HashMap<String, Layer>,
}

impl Entry {
    fn overlay(&mut self, other: &Entry) {
        self.general.overlay(&other.general);
        for (name, l) in &other.sources {
            self.sources.entry(name.clone()).or_default().overlay(l);
        }
    }
}

/// An MX host pattern of a site's `match`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum MxPattern {
    /// `*.google.com` or `.google.com`, kept as `.google.com`: a host below it.
    Suffix(String),
    /// One host.
    Exact(String),
}

impl MxPattern {
    fn parse(s: &str) -> Result<MxPattern, String> {
        let t = s.trim().trim_end_matches('.').to_ascii_lowercase();
        let suffix = t.strip_prefix('*').unwrap_or(&t);
        if suffix.is_empty() || suffix == "." || suffix.contains(['*', ' ', '@', ',']) {
            return Err(format!(
                "match {s:?}: a host name or a suffix such as \"*.google.com\""
            ));
        }
        Ok(if suffix.starts_with('.') {
            MxPattern::Suffix(suffix.to_string())
        } else if t.starts_with('*') {
            return Err(format!("match {s:?}: write \"*.{}\"", suffix));
        } else {
            MxPattern::Exact(t)
        })
    }

    /// `host`: lowercase, without a trailing dot.
    fn matches(&self, host: &str) -> bool {
        match self {
            MxPattern::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
            MxPattern::Exact(h) => host == h,
        }
    }

    fn show(&self) -> String {
        match self {
            MxPattern::Suffix(s) => format!("*{s}"),
            MxPattern::Exact(h) => h.clone(),
        }
    }
}

#[derive(Debug, Clone)]
struct Site {
    name: String,
    matches: Vec<MxPattern>,
    entry: Entry,
}

/// The shaping rules in force: built-in and file merged, checked.
#[derive(Debug)]
pub struct Rules {
    /// Sites in match order (the file's own first, then the built-in ones).
    sites: Vec<Site>,
    site_index: HashMap<String, usize>,
    domains: HashMap<String, Entry>,
    pub(crate) automation: Vec<automation::Rule>,
    /// The file these rules came from (None: built-in only).
    pub file: Option<String>,
    /// Some entry sets a retry delay.
    sets_retry: bool,
}

/// What applies to one destination (domain, MX set, source).
#[derive(Debug, Clone)]
pub struct Applied {
    /// The site: a matched provider's name, else the MX hosts sorted and joined with `,`, else the domain.
    pub site: String,
    /// The provider site whose `match` matched, and the pattern, if any.
    pub matched: Option<(String, String)>,
    pub limits: Limits,
    /// Per parameter (see [`PARAMS`]), the rule that set it.
    pub origins: [Option<Arc<str>>; 7],
}

// ----- the file -----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    #[serde(default)]
    replace_defaults: bool,
    #[serde(default)]
    site: BTreeMap<String, EntrySpec>,
    #[serde(default)]
    domain: BTreeMap<String, EntrySpec>,
    #[serde(default)]
    automation: Vec<automation::RuleSpec>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ParamsSpec {
    max_connections: Option<u32>,
    max_messages_per_connection: Option<u32>,
    max_message_rate: Option<String>,
    max_connection_rate: Option<String>,
    max_recipients_per_transaction: Option<u32>,
    retry_interval: Option<PfDuration>,
    max_retry_interval: Option<PfDuration>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntrySpec {
    #[serde(rename = "match")]
    matches: Option<Vec<String>>,
    #[serde(default)]
    sources: BTreeMap<String, ParamsSpec>,
    max_connections: Option<u32>,
    max_messages_per_connection: Option<u32>,
    max_message_rate: Option<String>,
    max_connection_rate: Option<String>,
    max_recipients_per_transaction: Option<u32>,
    retry_interval: Option<PfDuration>,
    max_retry_interval: Option<PfDuration>,
}

impl EntrySpec {
    fn params(&self) -> ParamsSpec {
        ParamsSpec {
            max_connections: self.max_connections,
            max_messages_per_connection: self.max_messages_per_connection,
            max_message_rate: self.max_message_rate.clone(),
            max_connection_rate: self.max_connection_rate.clone(),
            max_recipients_per_transaction: self.max_recipients_per_transaction,
            retry_interval: self.retry_interval,
            max_retry_interval: self.max_retry_interval,
        }
    }
}

fn rate(name: &str, v: &Option<String>) -> Result<Option<Rate>, String> {
    v.as_ref()
        .map(|s| {
            let r = Rate::try_from(s.clone()).map_err(|e| format!("{name}: {e}"))?;
            if r.per_second() <= 0.0 {
                return Err(format!("{name}: must be a rate such as \"10/s\", not 0"));
            }
            Ok(r)
        })
        .transpose()
}

fn positive(name: &str, v: Option<u32>) -> Result<Option<u32>, String> {
    match v {
        Some(0) => Err(format!(
            "{name}: must be at least 1 (to stop sending, use an automation rule's \"suspend\")"
        )),
        v => Ok(v),
    }
}

impl ParamsSpec {
    fn layer(&self, label: &Arc<str>) -> Result<Layer, String> {
        let dur = |name: &str, d: Option<PfDuration>| -> Result<Option<Duration>, String> {
            match d {
                Some(PfDuration(d)) if d.is_zero() => Err(format!("{name}: must be more than 0s")),
                d => Ok(d.map(|d| d.0)),
            }
        };
        let limits = Limits {
            max_connections: positive("max_connections", self.max_connections)?.map(|v| v as usize),
            max_messages_per_connection: positive(
                "max_messages_per_connection",
                self.max_messages_per_connection,
            )?,
            max_message_rate: rate("max_message_rate", &self.max_message_rate)?,
            max_connection_rate: rate("max_connection_rate", &self.max_connection_rate)?,
            max_recipients_per_transaction: positive(
                "max_recipients_per_transaction",
                self.max_recipients_per_transaction,
            )?
            .map(|v| v as usize),
            retry_interval: dur("retry_interval", self.retry_interval)?,
            max_retry_interval: dur("max_retry_interval", self.max_retry_interval)?,
        };
        if let (Some(a), Some(b)) = (limits.retry_interval, limits.max_retry_interval) {
            if a > b {
                return Err("retry_interval is longer than max_retry_interval".into());
            }
        }
        let mut origins: [Option<Arc<str>>; 7] = Default::default();
        for (i, o) in origins.iter_mut().enumerate() {
            if limits.is_set(i) {
                *o = Some(label.clone());
            }
        }
        Ok(Layer { limits, origins })
    }
}

/// A domain or site name as the rules key it: lowercase, no trailing dot.
fn norm(s: &str) -> String {
    s.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// The checked form of one file (`from`: "built-in" or the path, for labels and errors).
struct Parsed {
    replace_defaults: bool,
    sites: Vec<(String, Option<Vec<MxPattern>>, Entry)>,
    domains: HashMap<String, Entry>,
    automation: Vec<automation::Rule>,
}

fn parse_text(text: &str, from: &str) -> Result<Parsed, ShapingError> {
    let spec: FileSpec = toml::from_str(text).map_err(|e| ShapingError::Syntax {
        path: from.to_string(),
        message: e.to_string().trim().replace('\n', " "),
    })?;
    let entry_err = |entry: String, message: String| ShapingError::Entry {
        path: from.to_string(),
        entry,
        message,
    };
    if spec.site.len() > ENTRIES_MAX || spec.domain.len() > ENTRIES_MAX {
        return Err(ShapingError::Syntax {
            path: from.to_string(),
            message: format!("more than {ENTRIES_MAX} site or domain entries"),
        });
    }
    let entry = |kind: &str, name: &str, e: &EntrySpec| -> Result<Entry, ShapingError> {
        let what = format!("{kind} {name:?}");
        if e.sources.len() > SOURCES_MAX {
            return Err(entry_err(what, format!("more than {SOURCES_MAX} sources")));
        }
        let label: Arc<str> = Arc::from(format!("{kind} {name} ({from})"));
        let general = e
            .params()
            .layer(&label)
            .map_err(|m| entry_err(what.clone(), m))?;
        let mut sources = HashMap::new();
        for (src, p) in &e.sources {
            if src.trim().is_empty() {
                return Err(entry_err(what.clone(), "an empty source name".into()));
            }
            let label: Arc<str> = Arc::from(format!("{kind} {name} source {src} ({from})"));
            let l = p
                .layer(&label)
                .map_err(|m| entry_err(format!("{what} source {src:?}"), m))?;
            sources.insert(src.clone(), l);
        }
        Ok(Entry { general, sources })
    };
    let mut sites = Vec::new();
    for (name, e) in &spec.site {
        let n = norm(name);
        if n.is_empty() {
            return Err(entry_err("site \"\"".into(), "an empty site name".into()));
        }
        let matches = match &e.matches {
            None => None,
            Some(m) if m.is_empty() || m.len() > MATCH_MAX => {
                return Err(entry_err(
                    format!("site {name:?}"),
                    format!("match: 1 to {MATCH_MAX} patterns"),
                ))
            }
            Some(m) => Some(
                m.iter()
                    .map(|p| MxPattern::parse(p))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|msg| entry_err(format!("site {name:?}"), msg))?,
            ),
        };
        sites.push((n, matches, entry("site", name, e)?));
    }
    let mut domains = HashMap::new();
    for (name, e) in &spec.domain {
        if e.matches.is_some() {
            return Err(entry_err(
                format!("domain {name:?}"),
                "\"match\" belongs to a [site.NAME] entry".into(),
            ));
        }
        let n = norm(name);
        if n.is_empty() || n.contains(|c: char| c.is_whitespace() || c == '@') {
            return Err(entry_err(
                format!("domain {name:?}"),
                "not a domain name".into(),
            ));
        }
        let e = entry("domain", name, e)?;
        domains.entry(n).or_insert_with(Entry::default).overlay(&e);
    }
    let automation = automation::compile(&spec.automation, from)?;
    Ok(Parsed {
        replace_defaults: spec.replace_defaults,
        sites,
        domains,
        automation,
    })
}

impl Rules {
    /// The built-in rules alone.
    pub fn defaults() -> Rules {
        Rules::build(None).unwrap_or_else(|_| Rules {
            sites: Vec::new(),
            site_index: HashMap::new(),
            domains: HashMap::new(),
            automation: Vec::new(),
            file: None,
            sets_retry: false,
        })
    }

    /// The rules of `path` over the built-in ones (`None`: the built-in ones). Every problem names the file and
    /// the entry.
    pub fn load(path: Option<&Path>) -> Result<Rules, ShapingError> {
        let Some(path) = path else {
            return Rules::build(None);
        };
        let shown = path.display().to_string();
        let read_err = |e| ShapingError::Read {
            path: shown.clone(),
            source: e,
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        if meta.len() > FILE_MAX {
            return Err(ShapingError::TooLarge { path: shown });
        }
        let bytes = crate::spool::read_regular_file(path).map_err(read_err)?;
        if bytes.len() as u64 > FILE_MAX {
            return Err(ShapingError::TooLarge { path: shown });
        }
        let text = String::from_utf8(bytes).map_err(|_| ShapingError::Syntax {
            path: shown.clone(),
            message: "not UTF-8".into(),
        })?;
        Rules::build(Some((&text, &shown)))
    }

    /// The rules of `text` (a shaping file's content, `from` naming it) over the built-in ones.
    pub fn from_text(text: &str, from: &str) -> Result<Rules, ShapingError> {
        Rules::build(Some((text, from)))
    }

    fn build(file: Option<(&str, &str)>) -> Result<Rules, ShapingError> {
        let builtin = parse_text(DEFAULTS, "built-in")?;
        let file_parsed = file.map(|(t, from)| parse_text(t, from)).transpose()?;
        let mut sites: Vec<Site> = Vec::new();
        let mut domains: HashMap<String, Entry> = HashMap::new();
        let mut automation = Vec::new();
        let replace = file_parsed.as_ref().is_some_and(|f| f.replace_defaults);
        if !replace {
            for (name, matches, entry) in builtin.sites {
                sites.push(Site {
                    name,
                    matches: matches.unwrap_or_default(),
                    entry,
                });
            }
            domains.extend(builtin.domains);
            automation = builtin.automation;
        }
        if let Some(f) = file_parsed {
            // The file's new sites come first in match order; one the built-in rules have takes the file's
            // values over its own, parameter by parameter (and the file's `match`, when given).
            let mut added = Vec::new();
            for (name, matches, entry) in f.sites {
                match sites.iter_mut().find(|s| s.name == name) {
                    Some(s) => {
                        s.entry.overlay(&entry);
                        if let Some(m) = matches {
                            s.matches = m;
                        }
                    }
                    None => added.push(Site {
                        name,
                        matches: matches.unwrap_or_default(),
                        entry,
                    }),
                }
            }
            added.append(&mut sites);
            sites = added;
            for (name, entry) in f.domains {
                domains.entry(name).or_default().overlay(&entry);
            }
            // The file's automation rules first; one of the same name replaces the built-in one.
            let mut merged = f.automation;
            let names: Vec<Arc<str>> = merged.iter().map(|r| r.name.clone()).collect();
            merged.extend(automation.into_iter().filter(|r| !names.contains(&r.name)));
            automation = merged;
        }
        let site_index = sites
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        let retry = |e: &Entry| {
            std::iter::once(&e.general)
                .chain(e.sources.values())
                .any(|l| l.limits.retry_interval.is_some() || l.limits.max_retry_interval.is_some())
        };
        let sets_retry = sites.iter().any(|s| retry(&s.entry)) || domains.values().any(retry);
        Ok(Rules {
            sites,
            site_index,
            domains,
            automation,
            file: file.map(|(_, f)| f.to_string()),
            sets_retry,
        })
    }

    /// Whether some entry sets `retry_interval` or `max_retry_interval` (else outcomes need not look).
    pub fn sets_retry(&self) -> bool {
        self.sets_retry
    }

    /// The automation rules (for status and show).
    pub fn automation_rules(&self) -> &[automation::Rule] {
        &self.automation
    }

    /// What applies to `domain` with MX hosts `mx_hosts` (any order, any case; empty when not known) sending
    /// from egress source `source`. Allocates: [`Shaping::lookup`] caches it.
    pub fn resolve(
        &self,
        domain: &str,
        mx_hosts: &[impl AsRef<str>],
        source: Option<&str>,
    ) -> Applied {
        let domain = norm(domain);
        let mut mx: Vec<String> = mx_hosts.iter().map(|h| norm(h.as_ref())).collect();
        mx.sort();
        mx.dedup();
        mx.retain(|h| !h.is_empty());
        let mut matched = None;
        let mut site_name = None;
        if !mx.is_empty() {
            for s in self.sites.iter().filter(|s| !s.matches.is_empty()) {
                let mut first = None;
                let all = mx.iter().all(|h| {
                    s.matches
                        .iter()
                        .find(|p| p.matches(h))
                        .inspect(|p| {
                            first.get_or_insert((*p).clone());
                        })
                        .is_some()
                });
                if all {
                    site_name = Some(s.name.clone());
                    matched = first.map(|p| (s.name.clone(), p.show()));
                    break;
                }
            }
        }
        let site = site_name.unwrap_or_else(|| {
            if mx.is_empty() {
                domain.clone()
            } else {
                mx.join(",")
            }
        });
        let site_entry = self.site_index.get(&site).map(|&i| &self.sites[i].entry);
        let domain_entry = self.domains.get(&domain);
        let mut layer = Layer::default();
        for e in [site_entry, domain_entry].into_iter().flatten() {
            layer.overlay(&e.general);
        }
        if let Some(src) = source {
            for e in [site_entry, domain_entry].into_iter().flatten() {
                if let Some(l) = e.sources.get(src) {
                    layer.overlay(l);
                }
            }
        }
        Applied {
            site,
            matched,
            limits: layer.limits,
            origins: layer.origins,
        }
    }

    /// The "why" of [`Rules::resolve`]: the site and how it was chosen, then each parameter with its value and
    /// the rule that set it (or the server setting that applies), then the automation rules for the site.
    pub fn explain(
        &self,
        domain: &str,
        mx_hosts: &[impl AsRef<str>],
        source: Option<&str>,
    ) -> Vec<String> {
        let a = self.resolve(domain, mx_hosts, source);
        let mut out = Vec::new();
        let hosts: Vec<&str> = mx_hosts.iter().map(AsRef::as_ref).collect();
        out.push(format!(
            "domain {}: MX {}",
            norm(domain),
            if hosts.is_empty() {
                "(none known)".to_string()
            } else {
                hosts.join(" ")
            }
        ));
        out.push(match &a.matched {
            Some((name, pat)) => format!(
                "site {}: every MX host matches {pat} of site {name}",
                a.site
            ),
            None if hosts.is_empty() => format!("site {}: the domain (no MX host known)", a.site),
            None => format!("site {}: no provider matches: the MX host set", a.site),
        });
        if let Some(s) = source {
            out.push(format!("source {s}"));
        }
        for (i, p) in PARAMS.iter().enumerate() {
            out.push(match (a.limits.show(i), &a.origins[i]) {
                (Some(v), Some(o)) => format!("{p} = {v}  (set by {o})"),
                _ => format!("{p}: not set  (the server's {} applies)", server_setting(i)),
            });
        }
        for r in &self.automation {
            if r.applies_to_site(&a.site) {
                out.push(format!("automation {}", r.describe()));
            }
        }
        out
    }
}

/// The `[delivery]` (or top-level) setting a parameter replaces.
pub fn server_setting(i: usize) -> &'static str {
    match i {
        0 => "destination_concurrency_limit",
        1 => "smtp_connection_reuse_count_limit",
        2 => "destination_rate_limit",
        3 => "connection rate (no limit)",
        4 => "destination_recipient_limit",
        5 => "minimal_backoff_time",
        _ => "maximal_backoff_time",
    }
}

// ----- the per-shard cache -----

/// One cached answer, with the key it was asked for (normalized) to check a hash hit.
struct Cached {
    domain: Box<str>,
    mx: Box<[Box<str>]>,
    source: Option<Box<str>>,
    applied: Rc<Applied>,
}

/// A shard's view of the rules with its cache of answers: a hit hashes the key and compares it, no allocation.
pub struct Shaping {
    rules: RefCell<Arc<Rules>>,
    cache: RefCell<HashMap<u64, Cached>>,
}

/// `s` as the rules compare it (ASCII case folded, trailing dots ignored).
fn trimmed(s: &str) -> &str {
    s.trim_end_matches('.')
}

/// A hash of the name, eight bytes at a time (FxHash's mix), trailing dots ignored. Case is folded by setting
/// bit 0x20 of every byte: exact for letters, a no-op for digits, `-` and `.`; other bytes may collide, which a
/// hit's comparison catches (a cache key: speed matters more than spread).
fn hash_name(s: &str) -> u64 {
    const FOLD: u64 = 0x2020_2020_2020_2020;
    let mix = |h: u64, w: u64| (h.rotate_left(5) ^ w).wrapping_mul(0x517c_c1b7_2722_0a95);
    let b = trimmed(s).as_bytes();
    let mut h = mix(0, b.len() as u64);
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = mix(h, u64::from_le_bytes(w) | FOLD);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        h = mix(h, u64::from_le_bytes(w) | FOLD);
    }
    h ^ (h >> 32)
}

/// `stored` (lowercase) and `given` name the same host: byte-equal (the usual case, one memcmp), else equal
/// ignoring ASCII case.
fn same_name(stored: &str, given: &str) -> bool {
    stored.len() == given.len() && (stored == given || stored.eq_ignore_ascii_case(given))
}

impl Shaping {
    pub fn new(rules: Arc<Rules>) -> Shaping {
        Shaping {
            rules: RefCell::new(rules),
            cache: RefCell::new(HashMap::new()),
        }
    }

    /// The rules in force.
    pub fn rules(&self) -> Arc<Rules> {
        self.rules.borrow().clone()
    }

    /// New rules (a reload): the cache starts afresh. Nothing happens when they are the same rules.
    pub fn replace(&self, rules: Arc<Rules>) {
        if Arc::ptr_eq(&self.rules.borrow(), &rules) {
            return;
        }
        *self.rules.borrow_mut() = rules;
        self.cache.borrow_mut().clear();
    }

    /// [`Rules::resolve`], cached: the MX hosts in any order and case.
    pub fn lookup(
        &self,
        domain: &str,
        mx_hosts: &[impl AsRef<str>],
        source: Option<&str>,
    ) -> Rc<Applied> {
        // Order-independent over the MX hosts: their hashes are added.
        let mut key = hash_name(domain);
        let mut set = 0u64;
        for h in mx_hosts {
            set = set.wrapping_add(hash_name(h.as_ref()));
        }
        key = key.rotate_left(17) ^ set;
        if let Some(s) = source {
            key = key.rotate_left(5) ^ hash_name(s) ^ 0x9e37_79b9_7f4a_7c15;
        }
        if let Some(c) = self.cache.borrow().get(&key) {
            let same_mx = mx_hosts.len() >= c.mx.len()
                && mx_hosts
                    .iter()
                    .all(|h| c.mx.iter().any(|m| same_name(m, trimmed(h.as_ref()))));
            if same_mx && same_name(&c.domain, trimmed(domain)) && c.source.as_deref() == source {
                return c.applied.clone();
            }
        }
        let applied = Rc::new(self.rules.borrow().resolve(domain, mx_hosts, source));
        let mut cache = self.cache.borrow_mut();
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        let mut mx: Vec<Box<str>> = mx_hosts
            .iter()
            .map(|h| Box::from(norm(h.as_ref())))
            .collect();
        mx.sort();
        mx.dedup();
        cache.insert(
            key,
            Cached {
                domain: Box::from(norm(domain)),
                mx: mx.into_boxed_slice(),
                source: source.map(Box::from),
                applied: applied.clone(),
            },
        );
        applied
    }

    /// Whether the rules set a retry delay anywhere (see [`Rules::sets_retry`]).
    pub fn sets_retry(&self) -> bool {
        self.rules.borrow().sets_retry
    }

    /// Whether `domain` has an entry of its own (`[domain."..."]`): its limits are not its site's.
    pub fn has_domain_entry(&self, domain: &str) -> bool {
        let rules = self.rules.borrow();
        !rules.domains.is_empty() && rules.domains.contains_key(&norm(domain))
    }

    /// Answers cached now.
    pub fn cached(&self) -> usize {
        self.cache.borrow().len()
    }
}

#[cfg(test)]
mod tests;
