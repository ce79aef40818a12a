//! The settings that change without a restart, and how a reload changes them. Owns the snapshot shards read
//! ([`Settings`], published through [`Live`] with a generation counter; each shard keeps its own copy in a
//! [`SettingsView`]), the reading and checking of every file a configuration names before anything is
//! swapped ([`read_keys`], [`check_files`]), the split between what a reload takes and what needs a restart
//! ([`merge`], [`restart_needed`]), and the handle code uses to ask for a reload ([`ReloadControl`]).
//!
//! What reloads (a SIGHUP, `shardmta reload`): the relay policy (`mynetworks`, `relay_domains`,
//! `mydestination`), the recipient tables and their settings (aliases, virtual aliases, local users), routing
//! (`transport`, `relayhost`), per-destination TLS policy and rate limits, the outbound `[delivery]` settings but
//! `enabled`, `smtp_tls_ca_file` and `delivery_log`, the AUTH users file, the server certificate and key, the DKIM
//! keys (`[[dkim]]`, `dkim_sign_relayed`), the egress sources, pools and pool rules (`[[egress_source]]`, `[[egress_pool]]`, `default_egress_pool`, `egress_pool_by_sender_domain`, `egress_pool_header`), the shaping file (`shaping_file`), and the per-session limits a session reads when it starts (`message_size_limit`, `smtpd_recipient_limit`,
//! `smtpd_hard_error_limit`, `smtpd_forbid_bare_newline`, `smtp_line_length_limit`). Everything else (listeners,
//! shards, the spool, `mail_owner`, session-table limits and timeouts, DNS, `[mta_sts]`, local delivery's layout, ...) keeps
//! its running value, with one warning line per changed key.
//!
//! A session keeps the snapshot it started with (one consistent set of rules for its whole life); a new
//! connection gets the current one. Delivery (routing, TLS policy, rate limits) picks a new snapshot up at the
//! shard's next tick.

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::auth::UserDb;
use crate::config::{Config, ConfigError};
use crate::limits;
use crate::local::recipients::RecipientMaps;
use crate::policy::RelayPolicy;
use crate::smtp::session::SessionConfig;

/// One snapshot of the reloadable settings, shared read-only by every shard.
#[derive(Clone)]
pub struct Settings {
    /// The running configuration: reloadable keys as last loaded, the others as at start.
    pub cfg: Arc<Config>,
    pub policy: Arc<RelayPolicy>,
    /// One per configured listener, in the configuration's order.
    pub listeners: Vec<Arc<SessionConfig>>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub users: Option<Arc<UserDb>>,
    /// The DKIM signers of `cfg.dkim` (keys read by [`read_dkim_keys`]; empty: nothing is signed).
    pub dkim: Arc<crate::dkim::Dkim>,
    /// The shaping rules of `cfg.shaping_file` over the built-in ones (read by [`read_shaping`]).
    pub shaping: Arc<crate::shaping::Rules>,
}

impl Settings {
    /// The snapshot of `cfg` with its keys and users read (see [`read_keys`]).
    pub fn new(
        cfg: Arc<Config>,
        tls: Option<Arc<rustls::ServerConfig>>,
        users: Option<Arc<UserDb>>,
    ) -> Settings {
        let listeners = cfg
            .listeners
            .iter()
            .map(|l| {
                Arc::new(SessionConfig {
                    hostname: cfg.myhostname.clone(),
                    kind: l.kind,
                    message_size_limit: cfg.message_size_limit,
                    recipient_limit: cfg.smtpd_recipient_limit,
                    hard_error_limit: cfg.smtpd_hard_error_limit,
                    line_length_limit: cfg.line_length_limit,
                    bare_newline: cfg.smtpd_forbid_bare_newline,
                    smtp_line_length_limit: cfg.smtp_line_length_limit,
                    tls_available: tls.is_some(),
                    auth_available: users.is_some(),
                    allow_plaintext_auth: l.allow_plaintext_auth,
                })
            })
            .collect();
        Settings {
            policy: Arc::new(RelayPolicy::new(&cfg)),
            cfg,
            listeners,
            tls,
            users,
            dkim: Arc::new(crate::dkim::Dkim::empty()),
            shaping: Arc::new(crate::shaping::Rules::defaults()),
        }
    }

    /// These settings with the shaping rules `shaping` (read from `cfg.shaping_file` by [`read_shaping`]).
    pub fn with_shaping(mut self, shaping: Arc<crate::shaping::Rules>) -> Settings {
        self.shaping = shaping;
        self
    }

    /// These settings with the DKIM signers `dkim` (read from `cfg.dkim` by [`read_dkim_keys`]).
    pub fn with_dkim(mut self, dkim: Arc<crate::dkim::Dkim>) -> Settings {
        self.dkim = dkim;
        self
    }
}

/// The current [`Settings`], replaced as a whole by a reload.
pub struct Live {
    current: RwLock<Arc<Settings>>,
    /// Bumped after each replacement: a shard's [`SettingsView`] compares it (one atomic load) and takes the
    /// lock only when it moved.
    generation: AtomicU64,
}

impl Live {
    pub fn new(s: Settings) -> Live {
        Live {
            current: RwLock::new(Arc::new(s)),
            generation: AtomicU64::new(0),
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Settings> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replacements so far.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Makes `s` the current snapshot (the settings first, then the generation: a view that sees the new
    /// generation finds the new settings).
    pub fn publish(&self, s: Settings) {
        let s = Arc::new(s);
        match self.current.write() {
            Ok(mut g) => *g = s,
            Err(p) => *p.into_inner() = s,
        }
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// One shard's copy of the current settings. [`SettingsView::get`] costs one atomic load and a
/// non-atomic reference count: no lock, and no write to memory another core shares, except once per shard per
/// reload.
pub struct SettingsView {
    live: Arc<Live>,
    cached: RefCell<(u64, Rc<Settings>)>,
}

impl SettingsView {
    pub fn new(live: Arc<Live>) -> SettingsView {
        let g = live.generation();
        let s = Rc::new(Settings::clone(&live.snapshot()));
        SettingsView {
            live,
            cached: RefCell::new((g, s)),
        }
    }

    /// The current settings.
    pub fn get(&self) -> Rc<Settings> {
        self.refresh();
        self.cached.borrow().1.clone()
    }

    /// The current settings if they changed since the last call of `get` or `changed` (for work done once
    /// per reload, e.g. rebuilding a shard's routes).
    pub fn changed(&self) -> Option<Rc<Settings>> {
        self.refresh().then(|| self.cached.borrow().1.clone())
    }

    fn refresh(&self) -> bool {
        let g = self.live.generation();
        let mut c = self.cached.borrow_mut();
        if c.0 == g {
            return false;
        }
        // Generation first, then the settings: a reload in between is seen at the next call.
        *c = (g, Rc::new(Settings::clone(&self.live.snapshot())));
        true
    }
}

/// Reloads asked for by code (`shardmta reload`, the control API): the same flag SIGHUP sets, which the main
/// thread looks at every 200 ms, and what the last reload came to.
pub struct ReloadControl {
    requested: Arc<AtomicBool>,
    finished: AtomicU64,
    last: Mutex<ReloadOutcome>,
}

/// What a reload came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// No reload yet.
    None,
    /// The new settings are in use; the lines say what was kept (needs a restart) or is worth knowing.
    Reloaded { warnings: Vec<String> },
    /// Nothing changed: the old configuration stays, for this reason.
    Failed { reason: String },
}

impl ReloadControl {
    /// `requested`: the flag the SIGHUP handler sets.
    pub fn new(requested: Arc<AtomicBool>) -> ReloadControl {
        ReloadControl {
            requested,
            finished: AtomicU64::new(0),
            last: Mutex::new(ReloadOutcome::None),
        }
    }

    /// Asks for a reload; returns the number of reloads finished so far: once [`ReloadControl::finished`] is
    /// past it, [`ReloadControl::last_outcome`] is this request's (or a later one's) outcome.
    pub fn request(&self) -> u64 {
        let before = self.finished();
        self.requested.store(true, Ordering::SeqCst);
        before
    }

    /// Takes a pending request (the main thread).
    pub fn take_request(&self) -> bool {
        self.requested.swap(false, Ordering::SeqCst)
    }

    /// Reloads finished (done or failed) so far.
    pub fn finished(&self) -> u64 {
        self.finished.load(Ordering::Acquire)
    }

    pub fn last_outcome(&self) -> ReloadOutcome {
        match self.last.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Records a reload's outcome (the main thread).
    pub fn finish(&self, outcome: ReloadOutcome) {
        match self.last.lock() {
            Ok(mut g) => *g = outcome,
            Err(p) => *p.into_inner() = outcome,
        }
        self.finished.fetch_add(1, Ordering::Release);
    }
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// Files the new configuration names that cannot be read or do not parse, one per entry.
    #[error("{}", .0.join("; "))]
    Files(Vec<String>),
    #[error("no configuration file to reload: the server runs on the embedded defaults")]
    NoFile,
}

/// The server's TLS configuration (None: no certificate configured) and AUTH users (None: no AUTH).
pub type Keys = (Option<Arc<rustls::ServerConfig>>, Option<Arc<UserDb>>);

/// The server's TLS configuration and AUTH users as `cfg` names them, every problem listed (each naming its
/// file). Without `smtpd_tls_cert_file`, TLS is None here: the server makes or reuses its self-signed pair
/// (see [`crate::tls::ensure_self_signed`]).
pub fn read_keys(cfg: &Config) -> Result<Keys, Vec<String>> {
    let mut problems = Vec::new();
    let tls = match (&cfg.smtpd_tls_cert_file, &cfg.smtpd_tls_key_file) {
        (Some(cert), Some(key)) => match crate::tls::server_config(cert, key) {
            Ok(t) => Some(t),
            Err(e) => {
                problems.push(tls_problem(cert, key, &e));
                None
            }
        },
        _ => None, // validation refuses one without the other
    };
    let users = match &cfg.smtpd_sasl_users_file {
        Some(f) => match UserDb::load(f) {
            Ok(u) => Some(Arc::new(u)),
            Err(e) => {
                problems.push(format!("smtpd_sasl_users_file: {e}"));
                None
            }
        },
        None => None,
    };
    if problems.is_empty() {
        Ok((tls, users))
    } else {
        Err(problems)
    }
}

/// The DKIM signers of `cfg`'s `[[dkim]]` entries, every key read; each problem names its entry and file.
pub fn read_dkim_keys(cfg: &Config) -> Result<Arc<crate::dkim::Dkim>, Vec<String>> {
    crate::dkim::Dkim::load(cfg).map(Arc::new)
}

/// The shaping rules of `cfg.shaping_file` over the built-in ones; the problem names the file and the entry.
pub fn read_shaping(cfg: &Config) -> Result<Arc<crate::shaping::Rules>, String> {
    crate::shaping::Rules::load(cfg.shaping_file.as_deref())
        .map(Arc::new)
        .map_err(|e| format!("shaping_file: {e}"))
}

/// A TLS error with the files it is about.
fn tls_problem(cert: &Path, key: &Path, e: &crate::tls::TlsError) -> String {
    use crate::tls::TlsError;
    match e {
        TlsError::Read { path, .. } | TlsError::Missing { path, .. } => {
            let key_name = if path == key {
                "smtpd_tls_key_file"
            } else {
                "smtpd_tls_cert_file"
            };
            format!("{key_name}: {e}")
        }
        _ => format!(
            "smtpd_tls_cert_file {} and smtpd_tls_key_file {}: {e} (the key must be the certificate's)",
            cert.display(),
            key.display()
        ),
    }
}

/// Every file `cfg` names, read and parsed as the server would, every problem listed, one per entry (for
/// `check-config`): the certificate and key (which must belong together), the users file, the alias, virtual
/// and local users files, and the CA file for verified delivery.
pub fn check_files(cfg: &Config) -> Vec<String> {
    let mut problems = read_keys(cfg).err().unwrap_or_default();
    problems.extend(read_dkim_keys(cfg).err().unwrap_or_default());
    problems.extend(crate::local::recipients::check_sources(cfg));
    if let Err(e) = crate::delivery::bounce_class::BounceClassifier::load(
        cfg.bounce_classification_file.as_deref(),
    ) {
        problems.push(format!("bounce_classification_file: {e}"));
    }
    if let Err(e) = read_shaping(cfg) {
        problems.push(e);
    }
    if let Some(ca) = &cfg.delivery.smtp_tls_ca_file {
        if let Err(e) = crate::delivery::outbound::ClientTls::new(Some(ca)).verified {
            problems.push(format!("delivery.smtp_tls_ca_file: {e}"));
        }
    }
    problems
}

/// The configuration a reload runs with: `new`'s reloadable keys (see the module's list), `running`'s others.
pub fn merge(running: &Config, new: &Config) -> Config {
    let mut m = running.clone();
    m.mydestination = new.mydestination.clone();
    m.mynetworks = new.mynetworks.clone();
    m.relay_domains = new.relay_domains.clone();
    m.relayhost = new.relayhost.clone();
    m.message_size_limit = new.message_size_limit;
    m.smtpd_recipient_limit = new.smtpd_recipient_limit;
    m.smtpd_hard_error_limit = new.smtpd_hard_error_limit;
    m.smtpd_forbid_bare_newline = new.smtpd_forbid_bare_newline;
    m.smtp_line_length_limit = new.smtp_line_length_limit;
    m.smtpd_tls_cert_file = new.smtpd_tls_cert_file.clone();
    m.smtpd_tls_key_file = new.smtpd_tls_key_file.clone();
    m.smtpd_sasl_users_file = new.smtpd_sasl_users_file.clone();
    m.dkim = new.dkim.clone();
    m.dkim_sign_relayed = new.dkim_sign_relayed;
    m.transport = new.transport.clone();
    m.smtp_tls_policy = new.smtp_tls_policy.clone();
    m.destination_rate_limit = new.destination_rate_limit.clone();
    m.alias_maps = new.alias_maps.clone();
    m.virtual_alias_maps = new.virtual_alias_maps.clone();
    m.virtual_alias_domains = new.virtual_alias_domains.clone();
    m.recipient_delimiter = new.recipient_delimiter.clone();
    m.virtual_alias_recursion_limit = new.virtual_alias_recursion_limit;
    m.virtual_alias_expansion_limit = new.virtual_alias_expansion_limit;
    m.local.users = new.local.users.clone();
    m.local.users_file = new.local.users_file.clone();
    m.local.system_users = new.local.system_users;
    m.local.accept_unknown_users = new.local.accept_unknown_users;
    m.bounce_classification_file = new.bounce_classification_file.clone();
    // Egress: the owner shards rebuild their sources and pools (keeping suspensions and today's warm-up counts).
    m.egress_source = new.egress_source.clone();
    m.egress_pool = new.egress_pool.clone();
    m.default_egress_pool = new.default_egress_pool.clone();
    m.egress_pool_by_sender_domain = new.egress_pool_by_sender_domain.clone();
    m.egress_pool_header = new.egress_pool_header.clone();
    m.shaping_file = new.shaping_file.clone();
    // The delivery agent reads these when it uses them; the CA file is read once per shard, the log opened
    // once, and `enabled` decides whether a dispatcher runs at all.
    let kept = &running.delivery;
    m.delivery = crate::config::DeliveryConfig {
        enabled: kept.enabled,
        smtp_tls_ca_file: kept.smtp_tls_ca_file.clone(),
        delivery_log: kept.delivery_log.clone(),
        ..new.delivery.clone()
    };
    m
}

/// The keys whose new value (`new`) differs from what runs (`merged`, from [`merge`]): each needs a restart.
/// Dotted names (`delivery.delivery_log`); `listener` for the listeners.
pub fn restart_needed(merged: &Config, new: &Config) -> Vec<String> {
    let (Ok(a), Ok(b)) = (toml::Value::try_from(merged), toml::Value::try_from(new)) else {
        return vec!["(the configuration cannot be compared)".into()];
    };
    let mut keys = Vec::new();
    differing_keys("", &a, &b, &mut keys);
    keys
}

/// Appends to `out` the dotted names under which `a` and `b` differ (tables are compared key by key, anything
/// else as a whole).
fn differing_keys(prefix: &str, a: &toml::Value, b: &toml::Value, out: &mut Vec<String>) {
    use toml::Value;
    match (a, b) {
        (Value::Table(x), Value::Table(y)) => {
            let mut names: Vec<&String> = x.keys().chain(y.keys()).collect();
            names.sort();
            names.dedup();
            for k in names {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) => differing_keys(&name, p, q, out),
                    _ => out.push(name),
                }
            }
        }
        _ if a != b => out.push(prefix.to_string()),
        _ => {}
    }
}

/// A reload, read and checked, ready to be put in place.
pub struct Prepared {
    pub settings: Settings,
    /// The recipient tables of the new configuration.
    pub maps: RecipientMaps,
    /// Changed keys that keep their running value until a restart.
    pub restart_needed: Vec<String>,
    /// Warnings about the new configuration and its tables.
    pub warnings: Vec<String>,
    /// The bounce classifier of the new configuration (installed with the settings).
    pub classifier: crate::delivery::bounce_class::BounceClassifier,
}

/// Reads `path` again and everything it names, against the `running` settings; nothing is changed here. Any
/// problem (the file, a value, a users file, a certificate, a key that is not the certificate's, a map) is an
/// error and the running settings stay as they are.
pub fn prepare(path: Option<&Path>, running: &Settings) -> Result<Prepared, ReloadError> {
    let path = path.ok_or(ReloadError::NoFile)?;
    let new = Config::load(path)?;
    let merged = merge(&running.cfg, &new);
    // The new values against the running ones (e.g. message_size_limit against the running segment size).
    merged.validate()?;
    let restart_needed = restart_needed(&merged, &new);
    let mut problems = Vec::new();
    let (tls, users) = match read_keys(&merged) {
        Ok(k) => k,
        Err(p) => {
            problems.extend(p);
            (None, None)
        }
    };
    let tls = match tls {
        Some(t) => Some(t),
        None if merged.smtpd_tls_cert_file.is_some() => None, // a problem, listed above
        // No certificate configured: the self-signed pair in the spool (made at start if it was needed).
        None if running.cfg.smtpd_tls_cert_file.is_none() => running.tls.clone(),
        None => match crate::tls::ensure_self_signed(&merged.queue_directory, &merged.myhostname)
            .and_then(|(c, k)| crate::tls::server_config(&c, &k))
        {
            Ok(t) => Some(t),
            Err(e) => {
                problems.push(format!("the self-signed certificate: {e}"));
                None
            }
        },
    };
    let dkim = match read_dkim_keys(&merged) {
        Ok(d) => Some(d),
        Err(p) => {
            problems.extend(p);
            None
        }
    };
    let maps = match RecipientMaps::load(&merged) {
        Ok(m) => Some(m),
        Err(e) => {
            problems.push(format!("local recipient tables: {e}"));
            None
        }
    };
    let classifier = match crate::delivery::bounce_class::BounceClassifier::load(
        merged.bounce_classification_file.as_deref(),
    ) {
        Ok(c) => Some(c),
        Err(e) => {
            problems.push(format!("bounce_classification_file: {e}"));
            None
        }
    };
    let shaping = match read_shaping(&merged) {
        Ok(s) => Some(s),
        Err(e) => {
            problems.push(e);
            None
        }
    };
    let (Some(maps), Some(dkim), Some(classifier), Some(shaping), true) =
        (maps, dkim, classifier, shaping, problems.is_empty())
    else {
        return Err(ReloadError::Files(problems));
    };
    let mut warnings = merged.warnings();
    warnings.extend(maps.warnings.iter().cloned());
    Ok(Prepared {
        settings: Settings::new(Arc::new(merged), tls, users)
            .with_dkim(dkim)
            .with_shaping(shaping),
        maps,
        restart_needed,
        warnings,
        classifier,
    })
}

/// The warning lines for keys that need a restart, at most `limits::RELOAD_RESTART_KEYS_LISTED_MAX` of them
/// (then a count of the rest).
pub fn restart_lines(keys: &[String]) -> Vec<String> {
    let mut lines: Vec<String> = keys
        .iter()
        .take(limits::RELOAD_RESTART_KEYS_LISTED_MAX)
        .map(|k| {
            let what = if k == "listener" {
                "the listeners changed: binding new addresses"
            } else {
                "this setting"
            };
            format!("{k} changed but {what} needs a restart; the running value stays until then")
        })
        .collect();
    if keys.len() > limits::RELOAD_RESTART_KEYS_LISTED_MAX {
        lines.push(format!(
            "and {} more settings that need a restart",
            keys.len() - limits::RELOAD_RESTART_KEYS_LISTED_MAX
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn running(dir: &Path, extra: &str) -> (PathBuf, Settings) {
        let text = format!(
            "myhostname = \"mx.test\"\nqueue_directory = \"{}\"\n[local]\nsystem_users = false\n{extra}",
            dir.join("spool").display()
        );
        let p = write(dir, "c.toml", &text);
        let cfg = Config::load(&p).unwrap();
        let (tls, users) = read_keys(&cfg).unwrap();
        (p, Settings::new(Arc::new(cfg), tls, users))
    }

    #[test]
    fn a_view_costs_one_load_until_the_generation_moves() {
        let dir = tempfile::tempdir().unwrap();
        let (_, s) = running(dir.path(), "");
        let live = Arc::new(Live::new(s.clone()));
        let view = SettingsView::new(live.clone());
        let first = view.get();
        assert!(
            Rc::ptr_eq(&first, &view.get()),
            "no copy while nothing changed"
        );
        assert!(view.changed().is_none());
        let mut cfg = Config::clone(&s.cfg);
        cfg.mynetworks = vec!["192.0.2.0/24".parse().unwrap()];
        live.publish(Settings::new(Arc::new(cfg), None, None));
        let now = view.changed().expect("a new generation");
        assert!(now.policy.in_mynetworks("192.0.2.9".parse().unwrap()));
        assert!(!first.policy.in_mynetworks("192.0.2.9".parse().unwrap()));
        assert!(view.changed().is_none());
        assert_eq!(live.generation(), 1);
    }

    #[test]
    fn a_reload_takes_the_reloadable_keys_and_names_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let (path, s) = running(dir.path(), "");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            format!("mynetworks = [\"192.0.2.0/24\"]\nshards = 3\nsmtpd_timeout = \"1m\"\n{text}\n[delivery]\ndelivery_log = \"/tmp/x.log\"\ndestination_concurrency_limit = 7\n[[listener]]\naddress = \"127.0.0.1:2600\"\nkind = \"smtp\"\n"),
        )
        .unwrap();
        let p = prepare(Some(&path), &s).unwrap();
        let cfg = &p.settings.cfg;
        assert_eq!(cfg.mynetworks, vec!["192.0.2.0/24".parse().unwrap()]);
        assert_eq!(cfg.delivery.destination_concurrency_limit, 7);
        assert_eq!(cfg.shards, s.cfg.shards);
        assert_eq!(cfg.listeners, s.cfg.listeners);
        assert_eq!(cfg.delivery.delivery_log, None);
        assert_eq!(
            p.restart_needed,
            [
                "delivery.delivery_log",
                "listener",
                "shards",
                "smtpd_timeout"
            ]
        );
        let lines = restart_lines(&p.restart_needed).join("\n");
        assert!(
            lines.contains(
                "listener changed but the listeners changed: binding new addresses needs a restart"
            ),
            "{lines}"
        );
        // Nothing needs a restart when only reloadable keys change.
        std::fs::write(
            &path,
            format!("relay_domains = [\"relay.example\"]\n{text}"),
        )
        .unwrap();
        let p = prepare(Some(&path), &s).unwrap();
        assert!(p.restart_needed.is_empty(), "{:?}", p.restart_needed);
        assert!(
            p.settings
                .policy
                .classify_domain("a.relay.example", false, false)
                == crate::policy::Disposition::Remote
        );
        // The egress keys reload too (the owner shards rebuild their sources and pools).
        std::fs::write(
            &path,
            format!("default_egress_pool = \"p\"\negress_pool_header = \"X-Pool\"\n{text}\n[egress_pool_by_sender_domain]\n\"n.example\" = \"p\"\n[[egress_source]]\nname = \"a\"\nsource_address = \"127.0.0.2\"\n[[egress_pool]]\nname = \"p\"\nsources = [{{ name = \"a\" }}]\n"),
        )
        .unwrap();
        let p = prepare(Some(&path), &s).unwrap();
        assert!(p.restart_needed.is_empty(), "{:?}", p.restart_needed);
        let cfg = &p.settings.cfg;
        assert_eq!(cfg.egress_source.len(), 1);
        assert_eq!(cfg.egress_pool[0].name, "p");
        assert_eq!(cfg.default_egress_pool.as_deref(), Some("p"));
        assert_eq!(cfg.egress_pool_header.as_deref(), Some("X-Pool"));
        assert_eq!(cfg.egress_pool_by_sender_domain.len(), 1);
    }

    /// `[mta_sts]` and the CA file (the MTA-STS trust anchors) are read once per shard: a reload keeps the
    /// running values and names them as needing a restart.
    #[test]
    fn mta_sts_change_needs_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (path, s) = running(dir.path(), "");
        let ca = write(
            dir.path(),
            "ca.pem",
            &crate::tls::test_pki::TestCa::new().cert_pem(),
        );
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            format!(
                "{text}\n[delivery]\nsmtp_tls_ca_file = \"{}\"\ndestination_concurrency_limit = 7\n[mta_sts]\nenabled = false\nfetch_timeout_ms = 500\n",
                ca.display()
            ),
        )
        .unwrap();
        let p = prepare(Some(&path), &s).unwrap();
        let cfg = &p.settings.cfg;
        assert_eq!(cfg.delivery.destination_concurrency_limit, 7, "reloaded");
        assert_eq!(cfg.mta_sts, s.cfg.mta_sts, "kept");
        assert!(cfg.mta_sts.enabled);
        assert_eq!(cfg.delivery.smtp_tls_ca_file, None, "kept");
        assert_eq!(
            p.restart_needed,
            [
                "delivery.smtp_tls_ca_file",
                "mta_sts.enabled",
                "mta_sts.fetch_timeout_ms"
            ]
        );
    }

    #[test]
    fn a_bad_file_changes_nothing_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let (path, s) = running(dir.path(), "");
        let text = std::fs::read_to_string(&path).unwrap();
        // Not TOML.
        std::fs::write(&path, format!("{text}\nmynetworks = [")).unwrap();
        let e = prepare(Some(&path), &s).err().unwrap().to_string();
        assert!(e.contains("c.toml"), "{e}");
        // A value the running spool cannot take.
        std::fs::write(&path, format!("message_size_limit = 999999999\n{text}")).unwrap();
        let e = prepare(Some(&path), &s).err().unwrap().to_string();
        assert!(
            e.contains("message_size_limit") || e.contains("queue_segment_size"),
            "{e}"
        );
        // Files that are missing: each named.
        let missing = dir.path().join("missing");
        std::fs::write(
            &path,
            format!(
                "smtpd_sasl_users_file = \"{m}-users\"\nsmtpd_tls_cert_file = \"{m}-cert\"\nsmtpd_tls_key_file = \"{m}-key\"\nalias_maps = [\"{m}-aliases\"]\nbounce_classification_file = \"{m}-rules\"\n{text}",
                m = missing.display()
            ),
        )
        .unwrap();
        let e = prepare(Some(&path), &s).err().unwrap();
        let ReloadError::Files(problems) = &e else {
            panic!("{e}")
        };
        assert_eq!(problems.len(), 4, "{problems:?}");
        for f in ["-users", "-cert", "-aliases", "bounce_classification_file"] {
            assert!(e.to_string().contains(f), "{f}: {e}");
        }
        assert!(matches!(prepare(None, &s), Err(ReloadError::NoFile)));
    }

    /// A reload takes a changed shaping file; a bad one fails the reload (the running rules stay), naming the
    /// file and the entry.
    #[test]
    fn a_reload_takes_the_shaping_file_or_keeps_the_running_rules() {
        let dir = tempfile::tempdir().unwrap();
        let shaping = write(
            dir.path(),
            "shaping.toml",
            "[domain.\"a.test\"]\nmax_connections = 2\n",
        );
        let (path, s) = running(dir.path(), "");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            format!("shaping_file = \"{}\"\n{text}", shaping.display()),
        )
        .unwrap();
        let p = prepare(Some(&path), &s).unwrap();
        let a = p.settings.shaping.resolve("a.test", &[] as &[&str], None);
        assert_eq!(a.limits.max_connections, Some(2));
        assert!(p.restart_needed.is_empty(), "{:?}", p.restart_needed);
        std::fs::write(&shaping, "[domain.\"a.test\"]\nmax_connections = \"two\"\n").unwrap();
        let e = prepare(Some(&path), &p.settings).err().unwrap().to_string();
        assert!(
            e.contains("shaping_file: ") && e.contains("shaping.toml"),
            "{e}"
        );
        assert!(check_files(&p.settings.cfg)
            .iter()
            .any(|x| x.contains("shaping.toml")));
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let one = rcgen::generate_simple_self_signed(vec!["one.test".into()]).unwrap();
        let two = rcgen::generate_simple_self_signed(vec!["two.test".into()]).unwrap();
        let cert = write(dir.path(), "cert.pem", &one.cert.pem());
        let key = write(dir.path(), "key.pem", &two.signing_key.serialize_pem());
        let mut cfg = Config {
            smtpd_tls_cert_file: Some(cert.clone()),
            smtpd_tls_key_file: Some(key.clone()),
            ..Config::default()
        };
        let problems = check_files(&cfg);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("cert.pem") && problems[0].contains("key.pem"),
            "{problems:?}"
        );
        let good = write(dir.path(), "good.pem", &one.signing_key.serialize_pem());
        cfg.smtpd_tls_key_file = Some(good);
        assert!(check_files(&cfg).is_empty(), "{:?}", check_files(&cfg));
        // A file with no certificate in it.
        cfg.smtpd_tls_cert_file = Some(write(dir.path(), "empty.pem", "nothing\n"));
        let problems = check_files(&cfg);
        assert!(
            problems[0].starts_with("smtpd_tls_cert_file: ") && problems[0].contains("empty.pem"),
            "{problems:?}"
        );
    }

    #[test]
    fn the_control_flag_is_the_signal_flag() {
        let flag = Arc::new(AtomicBool::new(false));
        let c = ReloadControl::new(flag.clone());
        let ticket = c.request();
        assert!(flag.load(Ordering::SeqCst));
        assert!(c.take_request());
        assert!(!c.take_request());
        c.finish(ReloadOutcome::Failed { reason: "x".into() });
        assert!(c.finished() > ticket);
        assert_eq!(
            c.last_outcome(),
            ReloadOutcome::Failed { reason: "x".into() }
        );
    }
}
