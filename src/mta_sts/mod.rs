//! MTA-STS (RFC 8461) for MX-routed destinations: one shard's policy cache and fetcher ([`Sts`]), its
//! configuration (`[mta_sts]`, [`MtaStsConfig`]) and the TLS configurations that enforce a policy.
//!
//! - [`policy`]: the `_mta-sts` TXT record, the policy file and MX pattern matching (pure).
//! - [`fetch`]: the HTTPS GET of the policy (bounded in size and time, no redirects).
//!
//! The cache belongs to the destination owner's shard (the shard that resolves and connects), holds at most
//! `cache_entries_max` domains (when full, expired entries go first, then the least recently used) and keeps each
//! policy for its `max_age`. On each connection to a domain the TXT
//! record is looked up (through the resolver's cache); a new `id` or a policy past half its age is fetched again
//! in the background while the cached policy stays in force; a failed fetch keeps the cached unexpired policy
//! (RFC 8461 section 5.1); without a cached policy the first fetch happens before connecting. A failed fetch of
//! an id is not tried again for [`REFRESH_RETRY_AFTER`] (so a broken policy server does not hold up every
//! connection, nor get a request per connection).
//!
//! Test knobs (`test_policy_port`, `test_ca_file`) let the end-to-end tests run on loopback with their own CA;
//! a configuration that sets them is refused unless the environment has `SHARDMTA_TEST_KNOBS=1`
//! ([`MtaStsConfig::problems`]), and a server running with them logs a warning at start.

pub mod fetch;
pub mod policy;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};

pub use policy::{Mode, Policy};

use crate::dns::MxResolver;

/// RFC 8461 section 3.3: a policy file larger than 64 KiB is refused.
pub const POLICY_BYTES_MAX: usize = 64 * 1024;
/// The environment variable that allows the test knobs.
pub const TEST_KNOBS_ENV: &str = "SHARDMTA_TEST_KNOBS";
/// The system CA bundle, the default of `smtp_tls_ca_file`.
pub const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// `[mta_sts]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MtaStsConfig {
    /// Look up and apply MTA-STS policies of MX-routed destinations (true).
    pub enabled: bool,
    /// Domains whose policy one shard keeps (each shard caches the destinations it owns).
    pub cache_entries_max: usize,
    /// The whole policy fetch: connect, TLS, request, response (milliseconds).
    pub fetch_timeout_ms: u64,
    /// TEST ONLY: fetch policies from this port instead of 443. Needs `SHARDMTA_TEST_KNOBS=1`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_policy_port: Option<u16>,
    /// TEST ONLY: an extra CA (PEM) trusted for policy fetches and MTA-STS certificate checks. Needs
    /// `SHARDMTA_TEST_KNOBS=1`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_ca_file: Option<PathBuf>,
}

impl Default for MtaStsConfig {
    fn default() -> Self {
        MtaStsConfig {
            enabled: true,
            cache_entries_max: 10_000,
            fetch_timeout_ms: 10_000,
            test_policy_port: None,
            test_ca_file: None,
        }
    }
}

impl MtaStsConfig {
    /// Whether a test knob is set.
    pub fn test_knobs(&self) -> bool {
        self.test_policy_port.is_some() || self.test_ca_file.is_some()
    }

    /// Problems of meaning; `knobs_allowed`: whether `SHARDMTA_TEST_KNOBS=1` is in the environment.
    pub fn problems(&self, knobs_allowed: bool) -> Vec<String> {
        let mut p = Vec::new();
        if self.test_knobs() && !knobs_allowed {
            p.push(format!(
                "[mta_sts] test_policy_port / test_ca_file are for tests only: they need the environment variable {TEST_KNOBS_ENV}=1"
            ));
        }
        if self.test_policy_port == Some(0) {
            p.push("[mta_sts] test_policy_port = 0 is not a port".into());
        }
        if self.fetch_timeout_ms == 0 {
            p.push("[mta_sts] fetch_timeout_ms must be more than 0".into());
        }
        p
    }

    /// Whether the environment allows the test knobs.
    pub fn knobs_allowed_by_env() -> bool {
        std::env::var(TEST_KNOBS_ENV).is_ok_and(|v| v == "1")
    }
}

/// Trust anchors from PEM files (missing files are an error, empty files contribute nothing).
pub fn load_roots(paths: &[&Path]) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for path in paths {
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()).flatten() {
            let _ = roots.add(cert);
        }
    }
    if roots.is_empty() {
        return Err("no CA certificates".into());
    }
    Ok(roots)
}

/// The CA files whose certificates are MTA-STS's trust anchors (policy fetches and `enforce`): the system
/// bundle `system` (when it exists; without any other file it is listed anyway, so that its absence is the
/// error), plus `smtp_tls_ca_file` and the test CA when set. The CA file adds to the system bundle rather than
/// replacing it: it is there for `verify` next hops (often a private CA), and must not make every MTA-STS
/// domain on the internet unverifiable.
pub fn root_paths<'a>(
    system: &'a Path,
    system_exists: bool,
    ca_file: Option<&'a Path>,
    test_ca_file: Option<&'a Path>,
) -> Vec<&'a Path> {
    let extra: Vec<&Path> = ca_file.into_iter().chain(test_ca_file).collect();
    let mut paths = Vec::with_capacity(1 + extra.len());
    if system_exists || extra.is_empty() {
        paths.push(system);
    }
    for p in extra {
        if !paths.contains(&p) {
            paths.push(p);
        }
    }
    paths
}

/// A first fetch under way (see `Sts::first_fetches`): ended (removed, its waiters woken) when dropped, also
/// when the connection that fetches is cancelled.
struct FirstFetch<'a> {
    sts: &'a Sts,
    domain: String,
    done: Rc<glommio::sync::Semaphore>,
}

impl<'a> FirstFetch<'a> {
    fn start(sts: &'a Sts, domain: &str) -> FirstFetch<'a> {
        let done = Rc::new(glommio::sync::Semaphore::new(0));
        sts.first_fetches
            .borrow_mut()
            .insert(domain.to_string(), done.clone());
        FirstFetch {
            sts,
            domain: domain.to_string(),
            done,
        }
    }
}

impl Drop for FirstFetch<'_> {
    fn drop(&mut self) {
        self.sts.first_fetches.borrow_mut().remove(&self.domain);
        self.done.close();
    }
}

/// The verifier of `testing` mode: checks the certificate as `enforce` would, records why it would fail, and
/// lets the handshake go on (signatures are still checked).
#[derive(Debug)]
pub struct TestingVerifier {
    inner: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    failure: Mutex<Option<String>>,
}

impl TestingVerifier {
    /// What the certificate check found wrong, if anything.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|g| g.clone())
    }

    fn record(&self, why: String) {
        if let Ok(mut g) = self.failure.lock() {
            g.get_or_insert(why);
        }
    }
}

impl ServerCertVerifier for TestingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.inner {
            Some(v) => {
                if let Err(e) = v.verify_server_cert(end_entity, intermediates, name, ocsp, now) {
                    self.record(format!("certificate not verified: {e}"));
                }
            }
            None => self.record("no CA certificates to verify with".into()),
        }
        Ok(ServerCertVerified::assertion())
    }

    crate::tls::provider_signature_checks!();
}

struct Entry {
    policy: Rc<Policy>,
    id: String,
    fetched: Instant,
    expires: Instant,
    /// The last background refresh that failed: its id and when (not retried for [`REFRESH_RETRY_AFTER`]).
    failed: Option<(String, Instant)>,
    /// When the entry was last stored or used, on the cache's own clock ([`Sts::tick`]): the least recently
    /// used entry is the one evicted.
    used: u64,
}

/// A failed background refresh for the same id is not tried again sooner than this.
pub const REFRESH_RETRY_AFTER: Duration = Duration::from_secs(60);

/// One shard's MTA-STS state; see the module documentation.
pub struct Sts {
    cfg: MtaStsConfig,
    resolver: Rc<MxResolver>,
    roots: Result<Arc<rustls::RootCertStore>, String>,
    cache: RefCell<HashMap<String, Entry>>,
    /// The cache's use counter (see `Entry::used`).
    tick: std::cell::Cell<u64>,
    /// Domains with a background refresh under way (at most one each).
    refreshing: RefCell<HashSet<String>>,
    /// Domains without a cached policy whose fetch failed: (id, when); the fetch (which a connection waits
    /// for) is not tried again for that id sooner than [`REFRESH_RETRY_AFTER`]. Bounded like the cache.
    failed_first: RefCell<HashMap<String, (String, Instant)>>,
    /// First fetches under way, by domain: a connection that needs the same domain's policy meanwhile waits for
    /// that fetch (the semaphore is closed when it ends) instead of fetching it again. At most one per domain,
    /// and no more than the connections waiting.
    first_fetches: RefCell<HashMap<String, Rc<glommio::sync::Semaphore>>>,
}

static KNOBS_WARNING: std::sync::Once = std::sync::Once::new();

impl Sts {
    /// `ca_file`: `smtp_tls_ca_file`, added to the system bundle (see [`root_paths`]), as is the test CA file.
    pub fn new(cfg: &MtaStsConfig, ca_file: Option<&Path>, resolver: Rc<MxResolver>) -> Rc<Sts> {
        crate::tls::install_crypto_provider();
        if cfg.test_knobs() {
            KNOBS_WARNING.call_once(|| {
                tracing::warn!(
                    target: crate::eventlog::SMTP,
                    "MTA-STS TEST KNOBS ACTIVE ({TEST_KNOBS_ENV}=1): policies fetched from port {:?}, extra CA {:?}; never in production",
                    cfg.test_policy_port,
                    cfg.test_ca_file
                );
            });
        }
        let system = Path::new(SYSTEM_CA_FILE);
        let paths = root_paths(
            system,
            system.exists(),
            ca_file,
            cfg.test_ca_file.as_deref(),
        );
        Rc::new(Sts {
            cfg: cfg.clone(),
            resolver,
            roots: load_roots(&paths).map(Arc::new),
            cache: RefCell::new(HashMap::new()),
            tick: std::cell::Cell::new(0),
            refreshing: RefCell::new(HashSet::new()),
            failed_first: RefCell::new(HashMap::new()),
            first_fetches: RefCell::new(HashMap::new()),
        })
    }

    pub fn enabled(&self) -> bool {
        self.cfg.enabled
    }

    /// Policies cached (at most `cache_entries_max`).
    pub fn cached(&self) -> usize {
        self.cache.borrow().len()
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// The client configuration of `enforce`: certificates verified with the CA bundle (and the test CA), for
    /// the MX host name.
    pub fn enforce_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        let roots = self.roots.clone()?;
        Ok(Arc::new(
            rustls::ClientConfig::builder_with_provider(Self::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth(),
        ))
    }

    /// The client configuration of `testing`, and its verifier (to read what would have failed).
    pub fn testing_config(&self) -> (Arc<rustls::ClientConfig>, Arc<TestingVerifier>) {
        let inner = self.roots.clone().ok().and_then(|r| {
            rustls::client::WebPkiServerVerifier::builder_with_provider(r, Self::provider())
                .build()
                .ok()
        });
        let v = Arc::new(TestingVerifier {
            inner,
            provider: Self::provider(),
            failure: Mutex::new(None),
        });
        let cfg = rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_safe_default_protocol_versions()
            .map(|b| {
                b.dangerous()
                    .with_custom_certificate_verifier(v.clone())
                    .with_no_client_auth()
            })
            .unwrap_or_else(|_| {
                rustls::ClientConfig::builder()
                    .dangerous()
                    .with_custom_certificate_verifier(v.clone())
                    .with_no_client_auth()
            });
        (Arc::new(cfg), v)
    }

    /// The next value of the use counter.
    fn next_tick(&self) -> u64 {
        let t = self.tick.get().wrapping_add(1);
        self.tick.set(t);
        t
    }

    /// The unexpired cached policy of `domain`, marked as used.
    fn live(&self, domain: &str, now: Instant) -> Option<(Rc<Policy>, String, Instant)> {
        let tick = self.next_tick();
        let mut c = self.cache.borrow_mut();
        let e = c.get_mut(domain).filter(|e| e.expires > now)?;
        e.used = tick;
        Some((e.policy.clone(), e.id.clone(), e.fetched))
    }

    /// The policy in force for `domain` (None: no policy, or mode none). See the module documentation.
    pub async fn policy(self: &Rc<Self>, domain: &str) -> Option<Rc<Policy>> {
        if !self.cfg.enabled {
            return None;
        }
        let domain = crate::dns::wire::normalize(domain);
        let now = Instant::now();
        let cached = self.live(&domain, now);
        let id = match self
            .resolver
            .lookup_txt(&format!("_mta-sts.{domain}"))
            .await
        {
            Ok(txt) => policy::select_record(&txt.value),
            Err(_) => None,
        };
        let found = match (cached, id) {
            (Some((p, cached_id, fetched)), Some(id)) => {
                let half = Duration::from_secs(p.max_age / 2);
                if cached_id != id || now.saturating_duration_since(fetched) >= half {
                    self.refresh_in_background(&domain, id);
                }
                Some(p)
            }
            // No record (or the lookup failed): a cached policy stays in force until it expires.
            (Some((p, _, _)), None) => Some(p),
            (None, Some(id)) if self.failed_recently(&domain, &id, now) => None,
            (None, Some(id)) => {
                let under_way = self.first_fetches.borrow().get(&domain).cloned();
                if let Some(done) = under_way {
                    // Another connection is fetching this policy: wait for it (at most the fetch's own time
                    // limit), then take what it stored.
                    let limit = Duration::from_millis(self.cfg.fetch_timeout_ms);
                    let _ = glommio::timer::timeout(limit, async {
                        let _ = done.acquire(1).await;
                        Ok(())
                    })
                    .await;
                    return self
                        .live(&domain, Instant::now())
                        .map(|(p, _, _)| p)
                        .filter(|p| p.mode != Mode::None);
                }
                let fetching = FirstFetch::start(self, &domain);
                let fetched = self.fetch_and_store(&domain, &id).await;
                drop(fetching);
                self.first_fetch_result(&domain, id, fetched, now)
            }
            (None, None) => None,
        };
        found.filter(|p| p.mode != Mode::None)
    }

    /// The outcome of a first fetch: the policy, or None with the failure remembered (bounded like the cache).
    fn first_fetch_result(
        &self,
        domain: &str,
        id: String,
        fetched: Result<Rc<Policy>, String>,
        now: Instant,
    ) -> Option<Rc<Policy>> {
        match fetched {
            Ok(p) => {
                self.failed_first.borrow_mut().remove(domain);
                Some(p)
            }
            Err(e) => {
                tracing::info!(
                    target: crate::eventlog::SMTP,
                    "MTA-STS: {domain}: no policy in force: {e}"
                );
                let mut f = self.failed_first.borrow_mut();
                if f.len() >= self.cfg.cache_entries_max {
                    f.retain(|_, (_, at)| now.saturating_duration_since(*at) < REFRESH_RETRY_AFTER);
                    if f.len() >= self.cfg.cache_entries_max {
                        f.clear();
                    }
                }
                f.insert(domain.to_string(), (id, Instant::now()));
                None
            }
        }
    }

    fn failed_recently(&self, domain: &str, id: &str, now: Instant) -> bool {
        self.failed_first
            .borrow()
            .get(domain)
            .is_some_and(|(fid, at)| {
                fid == id && now.saturating_duration_since(*at) < REFRESH_RETRY_AFTER
            })
    }

    fn refresh_in_background(self: &Rc<Self>, domain: &str, id: String) {
        let now = Instant::now();
        let recently_failed = self.cache.borrow().get(domain).is_some_and(|e| {
            e.failed.as_ref().is_some_and(|(fid, at)| {
                *fid == id && now.saturating_duration_since(*at) < REFRESH_RETRY_AFTER
            })
        });
        if recently_failed || !self.refreshing.borrow_mut().insert(domain.to_string()) {
            return;
        }
        let sts = self.clone();
        let domain = domain.to_string();
        glommio::spawn_local(async move {
            if let Err(e) = sts.fetch_and_store(&domain, &id).await {
                if let Some(entry) = sts.cache.borrow_mut().get_mut(&domain) {
                    entry.failed = Some((id.clone(), Instant::now()));
                }
                tracing::info!(
                    target: crate::eventlog::SMTP,
                    "MTA-STS: {domain}: refresh failed, the cached policy stays in force: {e}"
                );
            }
            sts.refreshing.borrow_mut().remove(&domain);
        })
        .detach();
    }

    /// Fetches, parses and caches the policy of `domain` announced with `id`.
    pub async fn fetch_and_store(&self, domain: &str, id: &str) -> Result<Rc<Policy>, String> {
        let host = format!("mta-sts.{domain}");
        let addrs = self
            .resolver
            .lookup_ip(&host)
            .await
            .map_err(|e| format!("{host}: {e}"))?;
        let roots = self.roots.clone()?;
        let tls = Arc::new(
            rustls::ClientConfig::builder_with_provider(Self::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let body = fetch::fetch(
            domain,
            &addrs,
            self.cfg.test_policy_port.unwrap_or(443),
            tls,
            Duration::from_millis(self.cfg.fetch_timeout_ms),
        )
        .await
        .map_err(|e| format!("fetching https://{host}/.well-known/mta-sts.txt: {e}"))?;
        let p = Rc::new(policy::parse_policy(&body).map_err(|e| e.to_string())?);
        self.store(domain, id, p.clone(), Instant::now());
        Ok(p)
    }

    /// Caches `p` within the bound: expired entries go first, then the least recently used one (a domain mail
    /// keeps going to stays; one that had a long `max_age` but no mail for a long time goes).
    fn store(&self, domain: &str, id: &str, p: Rc<Policy>, now: Instant) {
        let used = self.next_tick();
        let mut c = self.cache.borrow_mut();
        if self.cfg.cache_entries_max == 0 {
            return;
        }
        if !c.contains_key(domain) && c.len() >= self.cfg.cache_entries_max {
            c.retain(|_, e| e.expires > now);
            if c.len() >= self.cfg.cache_entries_max {
                if let Some(k) = c.iter().min_by_key(|(_, e)| e.used).map(|(k, _)| k.clone()) {
                    c.remove(&k);
                }
            }
        }
        let expires = now + Duration::from_secs(p.max_age);
        c.insert(
            domain.to_string(),
            Entry {
                policy: p,
                id: id.to_string(),
                fetched: now,
                expires,
                failed: None,
                used,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_knobs_need_the_environment() {
        let mut c = MtaStsConfig::default();
        assert!(c.problems(false).is_empty());
        c.test_policy_port = Some(8443);
        assert_eq!(c.problems(false).len(), 1);
        assert!(c.problems(false)[0].contains(TEST_KNOBS_ENV));
        assert!(c.problems(true).is_empty());
        c.test_policy_port = None;
        c.test_ca_file = Some("/tmp/ca.pem".into());
        assert_eq!(c.problems(false).len(), 1);
        let parsed: MtaStsConfig =
            toml::from_str("test_policy_port = 8443\nfetch_timeout_ms = 500").unwrap();
        assert_eq!(parsed.test_policy_port, Some(8443));
        assert!(toml::from_str::<MtaStsConfig>("policy_port = 1").is_err());
    }

    /// `smtp_tls_ca_file` adds to the system bundle for MTA-STS (it does not replace it); a missing system
    /// bundle is skipped when another file is there, and named (the error) when not.
    #[test]
    fn ca_file_adds_to_the_system_bundle() {
        let sys = Path::new("/sys.pem");
        let ca = Path::new("/ca.pem");
        let test = Path::new("/test.pem");
        assert_eq!(root_paths(sys, true, None, None), [sys]);
        assert_eq!(root_paths(sys, false, None, None), [sys]);
        assert_eq!(root_paths(sys, true, Some(ca), None), [sys, ca]);
        assert_eq!(root_paths(sys, false, Some(ca), None), [ca]);
        assert_eq!(root_paths(sys, true, Some(ca), Some(test)), [sys, ca, test]);
        assert_eq!(root_paths(sys, false, None, Some(test)), [test]);
        assert_eq!(root_paths(sys, true, Some(sys), None), [sys]);
        // With real files: the store holds both the CA file's certificate and the system bundle's.
        let dir = tempfile::tempdir().unwrap();
        let ca_pem = dir.path().join("ca.pem");
        std::fs::write(&ca_pem, crate::tls::test_pki::TestCa::new().cert_pem()).unwrap();
        let other_pem = dir.path().join("other.pem");
        std::fs::write(&other_pem, crate::tls::test_pki::TestCa::new().cert_pem()).unwrap();
        let both = load_roots(&root_paths(&other_pem, true, Some(&ca_pem), None)).unwrap();
        assert_eq!(both.len(), 2);
    }

    /// A policy cache of three entries (its resolver is never asked).
    fn small_sts() -> Rc<Sts> {
        let cfg = MtaStsConfig {
            cache_entries_max: 3,
            ..MtaStsConfig::default()
        };
        let dns = crate::dns::DnsConfig {
            servers: vec!["127.0.0.1:9".parse().unwrap()],
            ..Default::default()
        };
        Sts::new(&cfg, None, MxResolver::new(dns))
    }

    /// An enforce policy for `mx.test` with this `max_age`.
    fn pol(max_age: u64) -> Rc<Policy> {
        Rc::new(Policy {
            mode: Mode::Enforce,
            mx: vec!["mx.test".into()],
            max_age,
        })
    }

    /// When the cache is full, the entry used longest ago goes, not the one expiring soonest: a busy domain
    /// with a short `max_age` stays, an idle one with a long `max_age` goes.
    #[test]
    fn store_evicts_least_recently_used() {
        glommio::LocalExecutor::default().run(async {
            let sts = small_sts();
            let now = Instant::now();
            sts.store("busy.test", "1", pol(86_400), now);
            sts.store("idle.test", "1", pol(86_400 * 300), now);
            sts.store("other.test", "1", pol(86_400 * 2), now);
            // busy.test is used (a connection looked its policy up); idle.test never is again.
            assert!(sts.live("busy.test", now).is_some());
            sts.store("new.test", "1", pol(86_400 * 2), now);
            assert_eq!(sts.cached(), 3);
            assert!(sts.live("idle.test", now).is_none(), "the idle one went");
            assert!(
                sts.live("busy.test", now).is_some(),
                "expiring soonest, kept"
            );
            assert!(sts.live("other.test", now).is_some());
            assert!(sts.live("new.test", now).is_some());
            // Now other.test was used before busy.test and new.test (in the line above, in that order).
            assert!(sts.live("busy.test", now).is_some());
            assert!(sts.live("new.test", now).is_some());
            sts.store("fifth.test", "1", pol(86_400), now);
            assert!(sts.live("other.test", now).is_none());
            assert!(sts.live("busy.test", now).is_some());
        });
    }

    #[test]
    fn the_cache_is_bounded_and_keeps_the_latest() {
        glommio::LocalExecutor::default().run(async {
            let sts = small_sts();
            let now = Instant::now();
            sts.store("a.test", "1", pol(86_400 * 3), now);
            sts.store("b.test", "1", pol(86_400), now);
            sts.store("c.test", "1", pol(86_400 * 2), now);
            sts.store("d.test", "1", pol(86_400 * 5), now);
            assert_eq!(sts.cached(), 3);
            assert!(
                sts.live("a.test", now).is_none(),
                "the least recently used went"
            );
            assert!(sts.live("d.test", now).is_some());
            // An expired entry goes before any live one.
            let later = now + Duration::from_secs(86_401);
            sts.store("e.test", "1", pol(86_400), later);
            assert!(sts.live("b.test", later).is_none());
            assert!(sts.live("c.test", later).is_some() && sts.live("d.test", later).is_some());
            // Replacing keeps one entry, with the new id.
            sts.store("d.test", "2", pol(86_400), now);
            assert_eq!(sts.cached(), 3);
            assert_eq!(sts.live("d.test", now).unwrap().1, "2");
            // Expired: not in force.
            assert!(sts
                .live("d.test", now + Duration::from_secs(86_401))
                .is_none());
        });
    }
}
