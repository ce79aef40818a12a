//! Shaping automation: owns the `[[automation]]` rules (which replies count, "N within T", the action), a shard's
//! engine that counts the replies of the sites it owns and holds their active actions (suspend the site, or lower
//! its rate or connection limit, for a duration, then restore in steps), the actions' persistence in the spool,
//! their event-log lines and metrics. No second daemon: the owner shard's agent calls [`Engine::observe`] after a
//! transaction and [`Engine::effect`] before a job.
//!
//! An action lasts `duration`; then, for `restore_steps` steps of `restore_step` each, its limits double from step
//! to step (a suspension restores from `max_connections`, default 1, and its `max_message_rate` if given); then it
//! ends. A reply counts for the first rule (in order: the file's, then the built-in ones) that watches its site and
//! matches it. A rule that triggers again while its action for the same site (and source) runs extends that action.
//!
//! Persistence: each shard's actions in `<queue_directory>/shaping-actions.<shard>.json` (replaced atomically
//! with [`crate::spool::Dir::replace_file`], written on the shard's blocking pool at its next tick after a change),
//! read at start (a file of a shard beyond the current count goes to shard `n % shards`), ended ones dropped.
//!
//! Bounds: at most `ACTIONS_MAX` active actions and `WINDOWS_MAX` reply counters per shard (the counters are
//! emptied when full); a counter keeps at most `count` times; `count` at most 1,000; `within` at most a day;
//! `duration` at most a week; 10 restore steps.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};

use super::ShapingError;
use crate::config::{PfDuration, Rate};
use crate::delivery::bounce_class::{self, BounceClass, CodePattern, Diag, StatusPattern};

/// Most active actions per shard.
pub const ACTIONS_MAX: usize = 10_000;
/// Most reply counters (rule x site x source) per shard.
pub const WINDOWS_MAX: usize = 10_000;
const COUNT_MAX: u32 = 1_000;
const WITHIN_MAX: Duration = Duration::from_secs(86_400);
const DURATION_MAX: Duration = Duration::from_secs(7 * 86_400);
const STEPS_MAX: u32 = 10;
/// Largest actions file read at start.
const FILE_MAX: u64 = 16 << 20;
/// After a failed write of the actions file, the next try.
const PERSIST_RETRY_AFTER: Duration = Duration::from_secs(5);
/// The event log's tag for shaping lines.
pub const EVENT_TARGET: &str = "shaping";

/// What an action does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// No delivery to the site (its recipients are deferred with the action's reply).
    Suspend,
    /// Lower `max_message_rate` and/or `max_connections`.
    Lower,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Suspend => "suspend",
            Kind::Lower => "lower",
        }
    }
}

/// An `[[automation]]` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RuleSpec {
    name: String,
    /// Sites it watches (empty: every site).
    #[serde(default)]
    sites: Vec<String>,
    code: Option<String>,
    status: Option<String>,
    text: Option<String>,
    class: Option<BounceClass>,
    count: Option<u32>,
    within: Option<PfDuration>,
    action: Kind,
    duration: PfDuration,
    /// The action applies to the site x egress source that got the replies, not the whole site.
    #[serde(default)]
    per_source: bool,
    max_message_rate: Option<String>,
    max_connections: Option<u32>,
    restore_steps: Option<u32>,
    restore_step: Option<PfDuration>,
}

/// A checked automation rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: Arc<str>,
    sites: Vec<String>,
    code: Option<CodePattern>,
    status: Option<StatusPattern>,
    text: Option<Regex>,
    class: Option<BounceClass>,
    pub count: u32,
    pub within: Duration,
    pub kind: Kind,
    pub duration: Duration,
    pub per_source: bool,
    /// Messages a second while lowered.
    pub max_message_rate: Option<f64>,
    pub max_connections: Option<usize>,
    pub restore_steps: u32,
    pub restore_step: Duration,
    written: String,
}

pub(crate) fn compile(specs: &[RuleSpec], from: &str) -> Result<Vec<Rule>, ShapingError> {
    let mut out: Vec<Rule> = Vec::with_capacity(specs.len());
    for (i, s) in specs.iter().enumerate() {
        let entry = if s.name.is_empty() {
            format!("automation #{}", i + 1)
        } else {
            format!("automation {:?}", s.name)
        };
        let r = compile_one(s).map_err(|message| ShapingError::Entry {
            path: from.to_string(),
            entry: entry.clone(),
            message,
        })?;
        if out.iter().any(|o| o.name == r.name) {
            return Err(ShapingError::Entry {
                path: from.to_string(),
                entry,
                message: "a second rule of this name".into(),
            });
        }
        out.push(r);
    }
    Ok(out)
}

fn compile_one(s: &RuleSpec) -> Result<Rule, String> {
    if s.name.trim().is_empty() || s.name.contains(char::is_whitespace) {
        return Err("name: a word such as \"yahoo-tss04\"".into());
    }
    if s.code.is_none() && s.status.is_none() && s.text.is_none() && s.class.is_none() {
        return Err("give at least one of code, status, text, class".into());
    }
    let count = s.count.unwrap_or(1);
    if !(1..=COUNT_MAX).contains(&count) {
        return Err(format!("count: 1 to {COUNT_MAX}"));
    }
    let within = s.within.map_or(Duration::from_secs(3600), |d| d.0);
    if within.is_zero() || within > WITHIN_MAX {
        return Err("within: more than 0s, at most 1d".into());
    }
    let duration = s.duration.0;
    if duration.is_zero() || duration > DURATION_MAX {
        return Err("duration: more than 0s, at most 1w".into());
    }
    let max_message_rate = s
        .max_message_rate
        .as_ref()
        .map(|r| {
            Rate::try_from(r.clone())
                .map_err(|e| format!("max_message_rate: {e}"))
                .and_then(|r| {
                    if r.per_second() > 0.0 {
                        Ok(r.per_second())
                    } else {
                        Err("max_message_rate: must be a rate such as \"1/m\", not 0".into())
                    }
                })
        })
        .transpose()?;
    if s.max_connections == Some(0) {
        return Err(
            "max_connections: at least 1 (to stop sending, use action = \"suspend\")".into(),
        );
    }
    if s.kind_needs_limits() && max_message_rate.is_none() && s.max_connections.is_none() {
        return Err("action \"lower\" needs max_message_rate or max_connections".into());
    }
    let restore_steps = s.restore_steps.unwrap_or(match s.action {
        Kind::Suspend => 0,
        Kind::Lower => 3,
    });
    if restore_steps > STEPS_MAX {
        return Err(format!("restore_steps: at most {STEPS_MAX}"));
    }
    let restore_step = s
        .restore_step
        .map_or((duration / 4).max(Duration::from_secs(1)), |d| d.0);
    if restore_step.is_zero() || restore_step > DURATION_MAX {
        return Err("restore_step: more than 0s, at most 1w".into());
    }
    let text = s
        .text
        .as_deref()
        .map(|t| {
            RegexBuilder::new(t)
                .case_insensitive(true)
                .size_limit(256 * 1024)
                .build()
                .map_err(|e| format!("text {t:?}: {e}"))
        })
        .transpose()?;
    let mut written = Vec::new();
    if let Some(c) = &s.code {
        written.push(format!("code {c}"));
    }
    if let Some(c) = &s.status {
        written.push(format!("status {c}"));
    }
    if let Some(t) = &s.text {
        written.push(format!("text /{t}/"));
    }
    if let Some(c) = s.class {
        written.push(format!("class {}", c.name()));
    }
    Ok(Rule {
        name: Arc::from(s.name.as_str()),
        sites: s.sites.iter().map(|x| super::norm(x)).collect(),
        code: s.code.as_deref().map(CodePattern::parse).transpose()?,
        status: s.status.as_deref().map(StatusPattern::parse).transpose()?,
        text,
        class: s.class,
        count,
        within,
        kind: s.action,
        duration,
        per_source: s.per_source,
        max_message_rate,
        max_connections: s.max_connections.map(|c| c as usize),
        restore_steps,
        restore_step,
        written: written.join(", "),
    })
}

impl RuleSpec {
    fn kind_needs_limits(&self) -> bool {
        self.action == Kind::Lower
    }
}

impl Rule {
    /// Whether the rule watches site `site`.
    pub fn applies_to_site(&self, site: &str) -> bool {
        self.sites.is_empty() || self.sites.iter().any(|s| s.eq_ignore_ascii_case(site))
    }

    /// Whether reply `d` (of the full reply `reply`) counts for this rule.
    fn matches(&self, d: &Diag<'_>, reply: &str, class: &mut Option<BounceClass>) -> bool {
        if !(self.code.as_ref().is_none_or(|c| c.matches(d.code))
            && self.status.is_none_or(|s| s.matches(d.status))
            && self.text.as_ref().is_none_or(|t| t.is_match(d.text)))
        {
            return false;
        }
        match self.class {
            None => true,
            Some(want) => *class.get_or_insert_with(|| bounce_class::classify(reply)) == want,
        }
    }

    /// One line: what it watches and does.
    pub fn describe(&self) -> String {
        let mut limits = Vec::new();
        if let Some(r) = self.max_message_rate {
            limits.push(format!("max_message_rate {}", show_rate(r)));
        }
        if let Some(c) = self.max_connections {
            limits.push(format!("max_connections {c}"));
        }
        format!(
            "{}: on {} ({} within {}): {}{} for {}{}{}",
            self.name,
            self.written,
            self.count,
            PfDuration(self.within),
            self.kind.name(),
            if self.per_source {
                " site x source"
            } else {
                " site"
            },
            PfDuration(self.duration),
            if limits.is_empty() {
                String::new()
            } else {
                format!(" ({})", limits.join(", "))
            },
            if self.restore_steps > 0 {
                format!(
                    ", then {} restore steps of {}",
                    self.restore_steps,
                    PfDuration(self.restore_step)
                )
            } else {
                String::new()
            }
        )
    }
}

/// A rate per second as `N/s`, `N/m` or `N/h`.
pub fn show_rate(per_s: f64) -> String {
    if per_s >= 1.0 {
        format!("{}/s", (per_s * 1000.0).round() / 1000.0)
    } else if per_s * 60.0 >= 1.0 {
        format!("{}/m", (per_s * 60_000.0).round() / 1000.0)
    } else {
        format!("{}/h", (per_s * 3_600_000.0).round() / 1000.0)
    }
}

/// An action in force (also its persisted form, one element of the file's `actions`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    pub id: String,
    pub site: String,
    /// The egress source it is limited to (None: the whole site).
    pub source: Option<String>,
    pub rule: String,
    pub action: Kind,
    pub since_unix_ms: u64,
    /// End of the action proper (then the restore steps).
    pub until_unix_ms: u64,
    pub restore_steps: u32,
    pub restore_step_ms: u64,
    pub max_connections: Option<usize>,
    /// Messages a second.
    pub max_message_rate: Option<f64>,
    /// The reply that triggered it.
    pub reply: String,
}

impl Action {
    /// When it ends, restore steps included.
    pub fn end_unix_ms(&self) -> u64 {
        self.until_unix_ms.saturating_add(
            self.restore_step_ms
                .saturating_mul(u64::from(self.restore_steps)),
        )
    }

    /// 0 during the action proper, `i` in restore step `i`, None once ended.
    pub fn step_at(&self, now_ms: u64) -> Option<u32> {
        if now_ms >= self.end_unix_ms() {
            return None;
        }
        if now_ms < self.until_unix_ms {
            return Some(0);
        }
        let step = (now_ms - self.until_unix_ms) / self.restore_step_ms.max(1) + 1;
        Some(step.min(u64::from(self.restore_steps)) as u32)
    }

    /// "suspended", "lowered" or "restoring 2/3" at `now_ms`.
    pub fn state(&self, now_ms: u64) -> String {
        match self.step_at(now_ms) {
            None => "ended".into(),
            Some(0) if self.action == Kind::Suspend => "suspended".into(),
            Some(0) => "lowered".into(),
            Some(i) => format!("restoring {i}/{}", self.restore_steps),
        }
    }
}

/// What the active actions impose on a site (x source) now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Effect {
    /// Suspended: the deferral reply for its recipients (`4.4.5 shaping: ...`, bounce class `rate_limit`).
    pub suspended: Option<String>,
    pub max_connections: Option<usize>,
    /// Messages a second.
    pub max_message_rate: Option<f64>,
}

/// The actions file.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionsFile {
    version: u32,
    actions: Vec<Action>,
}

/// Metrics (process-wide): actions started, extended, expired, cancelled; actions active.
pub struct Counters {
    pub suspend: AtomicU64,
    pub lower: AtomicU64,
    pub extend: AtomicU64,
    pub expire: AtomicU64,
    pub cancel: AtomicU64,
    pub active: AtomicI64,
}

pub static COUNTERS: Counters = Counters {
    suspend: AtomicU64::new(0),
    lower: AtomicU64::new(0),
    extend: AtomicU64::new(0),
    expire: AtomicU64::new(0),
    cancel: AtomicU64::new(0),
    active: AtomicI64::new(0),
};

/// The name of shard `shard`'s actions file.
pub fn file_name(shard: usize) -> String {
    format!("shaping-actions.{shard}.json")
}

/// A counter's key: rule, site, source.
type WindowKey = (Arc<str>, String, Option<String>);

/// One shard's automation: reply counters and active actions for the sites it owns.
pub struct Engine {
    shard: Cell<usize>,
    rules: RefCell<Arc<super::Rules>>,
    windows: RefCell<HashMap<WindowKey, VecDeque<u64>>>,
    active: RefCell<Vec<Action>>,
    /// `active.len()`: the per-job check reads it and nothing else when no action is active.
    count: Cell<usize>,
    seq: Cell<u64>,
    /// Changed since the last write of the file.
    dirty: std::rc::Rc<Cell<bool>>,
    /// The last write failed (its error was logged; the next ones are not until one succeeds), and when to
    /// try again (`PERSIST_RETRY_AFTER` later).
    failing: std::rc::Rc<Cell<bool>>,
    retry_at: std::rc::Rc<Cell<Option<std::time::Instant>>>,
    /// A write is in flight (on the blocking pool).
    writing: std::rc::Rc<Cell<bool>>,
    store: RefCell<Option<Arc<crate::spool::Dir>>>,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `ms` as an RFC 3339 UTC time (seconds).
pub fn show_time(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    httpdate_like(t)
}

fn httpdate_like(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

impl Engine {
    pub fn new(shard: usize, rules: Arc<super::Rules>) -> Engine {
        Engine {
            shard: Cell::new(shard),
            rules: RefCell::new(rules),
            windows: RefCell::new(HashMap::new()),
            active: RefCell::new(Vec::new()),
            count: Cell::new(0),
            seq: Cell::new(0),
            dirty: std::rc::Rc::new(Cell::new(false)),
            failing: std::rc::Rc::new(Cell::new(false)),
            retry_at: std::rc::Rc::new(Cell::new(None)),
            writing: std::rc::Rc::new(Cell::new(false)),
            store: RefCell::new(None),
        }
    }

    /// New rules (a reload): the counters start afresh; actions in force keep their own values.
    pub fn replace_rules(&self, rules: Arc<super::Rules>) {
        if !Arc::ptr_eq(&self.rules.borrow(), &rules) {
            *self.rules.borrow_mut() = rules;
            self.windows.borrow_mut().clear();
        }
    }

    /// Whether any rule could act (else the agent need not show it replies).
    pub fn watching(&self) -> bool {
        !self.rules.borrow().automation.is_empty()
    }

    /// Actions active.
    pub fn active_count(&self) -> usize {
        self.count.get()
    }

    fn set_active(&self, v: Vec<Action>) {
        let before = self.count.get() as i64;
        self.count.set(v.len());
        COUNTERS
            .active
            .fetch_add(v.len() as i64 - before, Ordering::Relaxed);
        *self.active.borrow_mut() = v;
        self.dirty.set(true);
    }

    /// Counts reply `reply` (a server's `4xx`/`5xx` reply to a transaction to `site` from `source`) for the first
    /// rule that watches the site and matches it; returns the action it started or extended, if any.
    pub fn observe(
        &self,
        site: &str,
        source: Option<&str>,
        reply: &str,
        now_ms: u64,
    ) -> Vec<Action> {
        let rules = self.rules.borrow().clone();
        if rules.automation.is_empty() {
            return Vec::new();
        }
        let d = Diag::parse(reply);
        if d.code.is_none() {
            return Vec::new(); // not a server's reply
        }
        let mut class = None;
        let mut out = Vec::new();
        for r in &rules.automation {
            if !r.applies_to_site(site) || !r.matches(&d, reply, &mut class) {
                continue;
            }
            // The first rule that matches counts the reply (the file's rules before the built-in ones).
            let src = if r.per_source {
                source.map(str::to_string)
            } else {
                None
            };
            let key: WindowKey = (r.name.clone(), site.to_string(), src.clone());
            let fire = {
                let mut w = self.windows.borrow_mut();
                if w.len() >= WINDOWS_MAX && !w.contains_key(&key) {
                    w.clear();
                }
                let q = w.entry(key.clone()).or_default();
                let window_ms = r.within.as_millis() as u64;
                while q
                    .front()
                    .is_some_and(|&t| now_ms.saturating_sub(t) >= window_ms)
                {
                    q.pop_front();
                }
                q.push_back(now_ms);
                while q.len() > r.count as usize {
                    q.pop_front();
                }
                if q.len() >= r.count as usize {
                    w.remove(&key);
                    true
                } else {
                    false
                }
            };
            if fire {
                if let Some(a) = self.trigger(r, site, src, reply, now_ms) {
                    out.push(a);
                }
            }
            break;
        }
        out
    }

    /// Starts `r`'s action for `site` (x `source`), or extends the one running.
    fn trigger(
        &self,
        r: &Rule,
        site: &str,
        source: Option<String>,
        reply: &str,
        now_ms: u64,
    ) -> Option<Action> {
        let until = now_ms.saturating_add(r.duration.as_millis() as u64);
        let mut active = self.active.borrow().clone();
        if let Some(a) = active.iter_mut().find(|a| {
            a.rule == *r.name && a.site == site && a.source == source && a.step_at(now_ms).is_some()
        }) {
            a.until_unix_ms = a.until_unix_ms.max(until);
            a.reply = reply.to_string();
            let a = a.clone();
            self.set_active(active);
            COUNTERS.extend.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: EVENT_TARGET, "action {} extended: {} {}{} until {} by rule {}: {}", a.id, a.action.name(), a.site, source_note(a.source.as_deref()), show_time(a.until_unix_ms), a.rule, a.reply);
            return Some(a);
        }
        if active.len() >= ACTIONS_MAX {
            tracing::error!(target: EVENT_TARGET, "rule {} for site {site}: {ACTIONS_MAX} actions already active; not started", r.name);
            return None;
        }
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        let a = Action {
            id: format!("{now_ms:x}-{}-{seq}", self.shard.get()),
            site: site.to_string(),
            source,
            rule: r.name.to_string(),
            action: r.kind,
            since_unix_ms: now_ms,
            until_unix_ms: until,
            restore_steps: r.restore_steps,
            restore_step_ms: r.restore_step.as_millis() as u64,
            max_connections: match r.kind {
                Kind::Suspend if r.restore_steps > 0 => Some(r.max_connections.unwrap_or(1)),
                _ => r.max_connections,
            },
            max_message_rate: r.max_message_rate,
            reply: reply.chars().take(512).collect(),
        };
        active.push(a.clone());
        self.set_active(active);
        match r.kind {
            Kind::Suspend => COUNTERS.suspend.fetch_add(1, Ordering::Relaxed),
            Kind::Lower => COUNTERS.lower.fetch_add(1, Ordering::Relaxed),
        };
        tracing::warn!(target: EVENT_TARGET, "action {} started: {} {}{} until {}{} by rule {}: {}", a.id, a.action.name(), a.site, source_note(a.source.as_deref()), show_time(a.until_unix_ms), limits_note(&a), a.rule, a.reply);
        Some(a)
    }

    /// What the active actions impose on `site` (x `source`) at `now_ms`. No action active: returns at once.
    pub fn effect(&self, site: &str, source: Option<&str>, now_ms: u64) -> Effect {
        let mut e = Effect::default();
        if self.count.get() == 0 {
            return e;
        }
        for a in self.active.borrow().iter() {
            if a.site != site || (a.source.is_some() && a.source.as_deref() != source) {
                continue;
            }
            let Some(step) = a.step_at(now_ms) else {
                continue;
            };
            if step == 0 && a.action == Kind::Suspend {
                if e.suspended.is_none() {
                    e.suspended = Some(format!(
                        "4.4.5 shaping: site {}{} suspended until {} by rule {} (action {})",
                        a.site,
                        source_note(a.source.as_deref()),
                        show_time(a.until_unix_ms),
                        a.rule,
                        a.id
                    ));
                }
                continue;
            }
            let factor = 1u64 << step.min(20);
            if let Some(c) = a.max_connections {
                let c = c.saturating_mul(factor as usize);
                e.max_connections = Some(e.max_connections.map_or(c, |x| x.min(c)));
            }
            if let Some(r) = a.max_message_rate {
                let r = r * factor as f64;
                e.max_message_rate = Some(e.max_message_rate.map_or(r, |x| x.min(r)));
            }
        }
        e
    }

    /// Ends the actions past their last restore step (one event-log line each). Returns how many.
    pub fn expire(&self, now_ms: u64) -> usize {
        if self.count.get() == 0
            || self
                .active
                .borrow()
                .iter()
                .all(|a| a.step_at(now_ms).is_some())
        {
            return 0;
        }
        let (keep, gone): (Vec<Action>, Vec<Action>) = self
            .active
            .borrow()
            .iter()
            .cloned()
            .partition(|a| a.step_at(now_ms).is_some());
        if gone.is_empty() {
            return 0;
        }
        for a in &gone {
            COUNTERS.expire.fetch_add(1, Ordering::Relaxed);
            tracing::info!(target: EVENT_TARGET, "action {} expired: {} {}{} (rule {}, since {})", a.id, a.action.name(), a.site, source_note(a.source.as_deref()), a.rule, show_time(a.since_unix_ms));
        }
        self.set_active(keep);
        gone.len()
    }

    /// Ends action `id` (the administrator's cancel). Returns it, if it was here.
    pub fn cancel(&self, id: &str) -> Option<Action> {
        let mut active = self.active.borrow().clone();
        let i = active.iter().position(|a| a.id == id)?;
        let a = active.remove(i);
        self.set_active(active);
        COUNTERS.cancel.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target: EVENT_TARGET, "action {} cancelled by the administrator: {} {}{} (rule {})", a.id, a.action.name(), a.site, source_note(a.source.as_deref()), a.rule);
        Some(a)
    }

    /// The active actions.
    pub fn actions(&self) -> Vec<Action> {
        self.active.borrow().clone()
    }

    /// The file's bytes for the actions now.
    pub fn render(&self) -> Vec<u8> {
        render(&self.active.borrow())
    }

    /// Takes the actions read at start ([`read_for_shard`]), one event-log line each.
    pub fn adopt(&self, mut got: Vec<Action>) {
        got.truncate(ACTIONS_MAX);
        for a in &got {
            tracing::info!(target: EVENT_TARGET, "action {} restored after a restart: {} {}{} until {} (rule {})", a.id, a.action.name(), a.site, source_note(a.source.as_deref()), show_time(a.until_unix_ms), a.rule);
        }
        self.set_active(got);
    }

    /// This engine is shard `shard`'s; its actions are written in `dir` (the spool root) by the next
    /// [`Engine::persist`].
    pub fn set_store(&self, shard: usize, dir: Arc<crate::spool::Dir>) {
        self.shard.set(shard);
        *self.store.borrow_mut() = Some(dir);
        self.dirty.set(true);
    }

    /// Writes the actions file on the blocking pool when they changed and no write is in flight (the shard's
    /// tick calls it). Must run on a glommio executor.
    pub fn persist(&self) {
        if !self.dirty.get() || self.writing.get() {
            return;
        }
        if self
            .retry_at
            .get()
            .is_some_and(|t| std::time::Instant::now() < t)
        {
            return;
        }
        let Some(dir) = self.store.borrow().clone() else {
            return;
        };
        self.dirty.set(false);
        self.writing.set(true);
        let bytes = self.render();
        let shard = self.shard.get();
        let name = file_name(shard);
        let (writing, dirty, failing, retry_at) = (
            self.writing.clone(),
            self.dirty.clone(),
            self.failing.clone(),
            self.retry_at.clone(),
        );
        glommio::spawn_local(async move {
            let r = glommio::executor()
                .spawn_blocking(move || dir.replace_file(&name, &bytes, true))
                .await;
            match r {
                Ok(()) => {
                    failing.set(false);
                    retry_at.set(None);
                }
                Err(e) => {
                    retry_at.set(Some(std::time::Instant::now() + PERSIST_RETRY_AFTER));
                    // Tried again after PERSIST_RETRY_AFTER; said once per run of failures.
                    if !failing.replace(true) {
                        tracing::error!(target: EVENT_TARGET, "shard {shard}: cannot write the shaping actions (retrying): {e}");
                    }
                    dirty.set(true);
                }
            }
            writing.set(false);
        })
        .detach();
    }

    /// Whether a change waits to be written.
    pub fn dirty(&self) -> bool {
        self.dirty.get() || self.writing.get()
    }
}

/// Reads the actions files of `dir` (the spool root) that belong to shard `shard` of `shards` (its own; one of a
/// shard `n` beyond the count when `n % shards` is this one), keeps those not ended at `now_ms`. Blocking: the
/// blocking pool's.
pub fn read_for_shard(
    dir: &crate::spool::Dir,
    shard: usize,
    shards: usize,
    now_ms: u64,
) -> Result<Vec<Action>, String> {
    let mut got = Vec::new();
    let mut foreign = Vec::new();
    for name in dir.names().map_err(|e| e.to_string())? {
        let Some(n) = name
            .strip_prefix("shaping-actions.")
            .and_then(|r| r.strip_suffix(".json"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if n != shard && !(n >= shards && n % shards.max(1) == shard) {
            continue;
        }
        let bytes = read_file(dir, &name)?;
        let f = parse(&bytes).map_err(|e| format!("{}: {e}", dir.path().join(&name).display()))?;
        got.extend(f.into_iter().filter(|a| a.step_at(now_ms).is_some()));
        if n != shard {
            foreign.push(name);
        }
    }
    if !foreign.is_empty() {
        // A file of a shard that no longer exists: its actions go into this shard's file, then it goes (so a
        // later cancel or expiry is not undone by reading it again).
        dir.replace_file(&file_name(shard), &render(&got), true)
            .map_err(|e| e.to_string())?;
        for name in foreign {
            dir.unlink(&name).map_err(|e| e.to_string())?;
        }
        dir.sync().map_err(|e| e.to_string())?;
    }
    Ok(got)
}

fn read_file(dir: &crate::spool::Dir, name: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let f = dir.open_file(name, false).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    f.take(FILE_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: {e}", dir.path().join(name).display()))?;
    if bytes.len() as u64 > FILE_MAX {
        return Err(format!(
            "{}: larger than {FILE_MAX} bytes",
            dir.path().join(name).display()
        ));
    }
    Ok(bytes)
}

/// The actions file's bytes.
pub fn render(actions: &[Action]) -> Vec<u8> {
    let f = ActionsFile {
        version: 1,
        actions: actions.to_vec(),
    };
    let mut v = serde_json::to_vec_pretty(&f).unwrap_or_default();
    v.push(b'\n');
    v
}

/// The actions of a file's bytes.
pub fn parse(bytes: &[u8]) -> Result<Vec<Action>, String> {
    let f: ActionsFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if f.version != 1 {
        return Err(format!("version {} (this server reads 1)", f.version));
    }
    for a in &f.actions {
        check_read_back(a)?;
    }
    Ok(f.actions)
}

/// The rules' bounds, checked again on an action read back from a file (which anyone with the spool's rights
/// could have edited): at least one connection, at least one message a day, an end within `DURATION_MAX` (and
/// its restore steps) of its start, at most `STEPS_MAX` steps, and bounded text.
fn check_read_back(a: &Action) -> Result<(), String> {
    let bad = |what: &str| {
        Err(format!(
            "action {:?}: {what}",
            a.id.chars().take(64).collect::<String>()
        ))
    };
    if a.max_connections == Some(0) {
        return bad("max_connections 0");
    }
    if a.max_message_rate
        .is_some_and(|r| !r.is_finite() || r < 1.0 / 86_400.0)
    {
        return bad("max_message_rate below one a day");
    }
    if a.restore_steps > STEPS_MAX {
        return bad("too many restore steps");
    }
    let longest = DURATION_MAX.as_millis() as u64;
    if a.until_unix_ms.saturating_sub(a.since_unix_ms) > longest || a.restore_step_ms > longest {
        return bad("longer than the longest action");
    }
    if [&a.id, &a.site, &a.rule, &a.reply]
        .iter()
        .any(|t| t.len() > 4096)
        || a.source.as_ref().is_some_and(|t| t.len() > 4096)
    {
        return bad("a field is too long");
    }
    Ok(())
}

/// Every action in the actions files of the spool at `queue_directory` (for `shaping status` on a stopped
/// server), ended ones left out.
pub fn read_all(queue_directory: &std::path::Path, now_ms: u64) -> Result<Vec<Action>, String> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(queue_directory) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(format!("{}: {e}", queue_directory.display())),
    };
    for ent in rd.flatten() {
        let name = ent.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("shaping-actions.") && name.ends_with(".json")) {
            continue;
        }
        let bytes = crate::spool::read_regular_file(&ent.path())
            .map_err(|e| format!("{}: {e}", ent.path().display()))?;
        out.extend(
            parse(&bytes)
                .map_err(|e| format!("{}: {e}", ent.path().display()))?
                .into_iter()
                .filter(|a| a.step_at(now_ms).is_some()),
        );
    }
    out.sort_by(|a, b| a.since_unix_ms.cmp(&b.since_unix_ms).then(a.id.cmp(&b.id)));
    Ok(out)
}

/// The clock the engine's callers use (unix milliseconds).
pub fn now_ms() -> u64 {
    unix_ms()
}

fn source_note(source: Option<&str>) -> String {
    source.map_or(String::new(), |s| format!(" source {s}"))
}

fn limits_note(a: &Action) -> String {
    let mut v = Vec::new();
    if let Some(c) = a.max_connections {
        v.push(format!("max_connections {c}"));
    }
    if let Some(r) = a.max_message_rate {
        v.push(format!("max_message_rate {}", show_rate(r)));
    }
    if v.is_empty() {
        String::new()
    } else {
        format!(" ({})", v.join(", "))
    }
}

/// One line of `shaping status`: id, site, source, action, state, since, until, ends, rule.
pub fn status_line(a: &Action, now_ms: u64) -> String {
    format!(
        "{}\t{}\t{}\t{}{}\t{}\t{}\t{}\t{}\t{}",
        a.id,
        a.site,
        a.source.as_deref().unwrap_or("-"),
        a.action.name(),
        limits_note(a),
        a.state(now_ms),
        show_time(a.since_unix_ms),
        show_time(a.until_unix_ms),
        show_time(a.end_unix_ms()),
        a.rule
    )
}
