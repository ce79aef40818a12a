//! The configuration: Postfix-named settings read from TOML, with defaults, validation and printing.
//!
//! `Config::default()` is the embedded default configuration (`shardmta serve` with no file): loopback
//! listeners on 2525 (smtp) and 2587 (submission), spool under `./spool`, `myhostname` the fully qualified host
//! name, `mydestination = ["$myhostname", "localhost.$mydomain", "localhost"]` (Postfix's default, expanded at
//! load), `mynetworks` = loopback. Unknown keys and bad values are errors that name the key and the value; the
//! checks of meaning (two listeners on one address, unknown placeholders, unsupported keys) are all listed at
//! once ([`Config::problems`]).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::limits;
use crate::nexthop::Nexthop;
use crate::smtp::data::BareNewline;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("bad value for {key}: {value:?}: {reason}")]
    Value {
        key: String,
        value: String,
        reason: String,
    },
    /// Every problem of meaning found, one per line.
    #[error("{}", problems.iter().map(|p| format!("{}: {p}", path.display())).collect::<Vec<_>>().join("\n"))]
    Problems {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// A duration written Postfix-style: `300s`, `5m`, `2h`, `5d`, `1w`, or a bare number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PfDuration(pub Duration);

impl FromStr for PfDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
            Some(i) => (&s[..i], &s[i..]),
            None => (s, "s"),
        };
        let n: u64 = num
            .parse()
            .map_err(|_| format!("not a duration: {s:?} (use e.g. 300s, 5m, 2h, 5d)"))?;
        let mult = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86400,
            "w" => 7 * 86400,
            _ => {
                return Err(format!(
                    "unknown time unit {unit:?} in {s:?} (use s, m, h, d or w)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(|v| PfDuration(Duration::from_secs(v)))
            .ok_or_else(|| format!("duration too large: {s:?}"))
    }
}

impl fmt::Display for PfDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.as_secs();
        for (unit, m) in [("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)] {
            if s >= m && s.is_multiple_of(m) {
                return write!(f, "{}{unit}", s / m);
            }
        }
        write!(f, "{s}s")
    }
}

impl Serialize for PfDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PfDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(PfDuration(Duration::from_secs(n))),
            Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// An IPv4 or IPv6 network in CIDR form (`127.0.0.0/8`, `::1/128`; a bare address means a host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// 127.0.0.0/8 and ::1/128: the default `mynetworks` and HTTP `trusted_networks`.
    pub fn loopback() -> Vec<Cidr> {
        vec![
            Cidr {
                addr: [127, 0, 0, 0].into(),
                prefix: 8,
            },
            Cidr {
                addr: std::net::Ipv6Addr::LOCALHOST.into(),
                prefix: 128,
            },
        ]
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4-mapped IPv6 client matches IPv4 networks.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix)
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix)
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        // Postfix writes IPv6 networks as [::1]/128; accept both forms.
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let a = a.trim_start_matches('[').trim_end_matches(']');
        let addr: IpAddr = a.parse().map_err(|_| format!("not an IP network: {s:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|&n| n <= max)
                .ok_or_else(|| format!("bad prefix length in {s:?}"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

pub use crate::smtp::session::ListenerKind;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    pub kind: ListenerKind,
    /// Offer AUTH without TLS on this listener (Postfix: smtpd_tls_auth_only = no). Default false.
    #[serde(default)]
    pub allow_plaintext_auth: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The host name in the greeting, EHLO reply and Received headers. Default: the system's fully qualified
    /// host name (gethostname, else its canonical name in /etc/hosts; never DNS).
    pub myhostname: String,
    /// Domains delivered on this machine (local-delivery shard). `$myhostname` and `$mydomain` (myhostname
    /// without its first label) are replaced at load. Default, as Postfix's:
    /// `["$myhostname", "localhost.$mydomain", "localhost"]`, so mail to `root@<this host>` is not lost.
    #[serde(default = "mydestination_default")]
    pub mydestination: Vec<String>,
    /// Clients allowed to relay to any domain.
    pub mynetworks: Vec<Cidr>,
    /// Domains accepted from anyone and relayed onward.
    pub relay_domains: Vec<String>,
    /// Smarthost for all non-local mail, `[host]:port` (used by outbound delivery). Empty: deliver by MX.
    #[serde(with = "crate::nexthop::optional")]
    pub relayhost: Option<Nexthop>,
    /// Largest message accepted, in bytes (Postfix default 10240000).
    pub message_size_limit: u64,
    /// Most recipients per message (Postfix default 1000); extras get 452 4.5.3.
    pub smtpd_recipient_limit: usize,
    /// Idle time allowed while waiting for a command or data (Postfix default 300s).
    pub smtpd_timeout: PfDuration,
    /// Errors in one session before it is closed with 421 (Postfix default 20).
    pub smtpd_hard_error_limit: u32,
    /// Longest command line accepted, in bytes (Postfix's line_length_limit, default 2048).
    pub line_length_limit: usize,
    /// Concurrent sessions per shard; more get 421 4.7.0.
    pub smtpd_connection_limit: usize,
    /// Concurrent sessions from one client IP per shard (Postfix: smtpd_client_connection_count_limit, 50).
    pub smtpd_client_connection_count_limit: usize,
    /// Bare LF and bare CR handling: "normal" (stored as a CRLF line end, never taken as the end of data) or
    /// "reject" (521 and disconnect).
    pub smtpd_forbid_bare_newline: BareNewline,
    /// Add a recipient to the suppression list when a remote server bounces it permanently with the bounce
    /// class `invalid_recipient` (opt-in; see [`crate::suppression`]).
    pub suppression_auto_add: bool,
    /// Longest line of a message as it is stored and sent on (Postfix's smtp_line_length_limit, 998): longer
    /// lines are broken by inserting CRLF SPACE when the message is received. 0: never.
    pub smtp_line_length_limit: usize,
    /// Extra delay before answering a failed AUTH, multiplied by the client address's recent failures.
    pub smtpd_auth_failure_delay: PfDuration,
    /// Failed or malformed AUTH attempts from one client address (an IPv6 /64), over all sessions and shards,
    /// after which AUTH is refused from it (454 4.7.0) for smtpd_auth_lockout_time.
    pub smtpd_auth_failure_limit: u32,
    /// How long failures are remembered and a lockout lasts.
    pub smtpd_auth_lockout_time: PfDuration,
    /// Postfix semantics: smtpd_timeout limits a whole request (a command line; for DATA/BDAT the content,
    /// extended by the bytes received / smtpd_min_data_rate) instead of each read. Default true.
    pub smtpd_per_request_deadline: bool,
    /// Slowest accepted DATA/BDAT transfer, bytes per second, with per-request deadlines (Postfix: 500).
    pub smtpd_min_data_rate: u64,
    /// Time allowed for a TLS handshake (implicit TLS or STARTTLS).
    pub smtpd_starttls_timeout: PfDuration,
    /// smtpd_timeout and smtpd_starttls_timeout while a shard is under stress (its sessions at 80% of
    /// smtpd_connection_limit or more): Postfix's `${stress?{10}:{300}}s`.
    pub smtpd_stress_timeout: PfDuration,
    /// Per cent of each shard's smtpd_connection_limit kept for clients in mynetworks: others are refused
    /// once only this reserve is left.
    pub smtpd_mynetworks_reserve_percent: u32,
    /// Bytes of unfinished message content (DATA/BDAT being received) held in memory per shard. A session that
    /// needs more waits for room; if none frees up within 2 s, its message is received to the end but not
    /// stored, and answered 452 4.3.1.
    pub smtpd_data_memory_limit: u64,
    /// Give up on a message after this long in the queue (Postfix default 5d).
    pub maximal_queue_lifetime: PfDuration,
    /// Smallest and largest delay between delivery attempts of a deferred recipient (Postfix 300s, 4000s).
    pub minimal_backoff_time: PfDuration,
    pub maximal_backoff_time: PfDuration,
    /// Postfix's delay warnings: a message still deferred this long after its arrival gets one "delayed" DSN
    /// (RFC 3464) to its sender, for its deferred recipients whose NOTIFY allows DELAY. Absent or "0": never
    /// (Postfix's default). Must be shorter than `maximal_queue_lifetime`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay_warning_time: Option<PfDuration>,
    /// Same for bounces (Postfix default 5d).
    pub bounce_queue_lifetime: PfDuration,
    /// The bounce classifier's rules file (TOML `[[rule]]` entries: code, status, text, class), tried before
    /// the built-in rules (see `crate::delivery::bounce_class`). Empty (default): the built-in rules. Read at
    /// start and on reload.
    #[serde(with = "optional_path")]
    pub bounce_classification_file: Option<PathBuf>,
    /// The shaping file (TOML: per-site, per-domain and per-source limits, automation rules; see
    /// `crate::shaping`), over the built-in provider rules. Empty (default): the built-in rules. Read at start
    /// and on reload.
    #[serde(with = "optional_path")]
    pub shaping_file: Option<PathBuf>,
    /// Spool root; each shard owns `shard-N/` below it. Default `./spool`.
    pub queue_directory: PathBuf,
    /// Size of each preallocated queue segment file, in bytes. Must exceed message_size_limit.
    pub queue_segment_size: u64,
    /// Group commit pacing, in microseconds: under load a shard waits this long after a sync is requested
    /// before it starts it, so that more messages share one fdatasync (`queue::commit::SyncPacing`); a quiet
    /// shard syncs at once. 0: every sync starts at once. At most limits::QUEUE_COMMIT_DELAY_US_MAX.
    pub queue_commit_delay_us: u64,
    /// Server certificate and key (PEM). Empty: a self-signed pair is generated in the spool at first start.
    #[serde(with = "optional_path")]
    pub smtpd_tls_cert_file: Option<PathBuf>,
    #[serde(with = "optional_path")]
    pub smtpd_tls_key_file: Option<PathBuf>,
    /// Users for AUTH PLAIN/LOGIN: lines `user:{SHA512-CRYPT}$6$...` (Dovecot passwd-file style). Empty: no AUTH.
    #[serde(with = "optional_path")]
    pub smtpd_sasl_users_file: Option<PathBuf>,
    /// DKIM signing keys (`[[dkim]]` entries): mail whose From: domain is an entry's domain or below it is
    /// signed at acceptance with each entry of the most specific such domain (see `crate::dkim`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dkim: Vec<DkimKeyConfig>,
    /// Sign mail relayed from clients outside mynetworks that did not authenticate (to relay_domains) too.
    /// Default false: only mynetworks, authenticated and HTTP-injected mail is signed.
    pub dkim_sign_relayed: bool,
    /// Number of shards (executors, one per core); 0 = one per available core.
    pub shards: usize,
    /// The unprivileged account the server runs as once its listeners are bound and its keys read (Postfix's
    /// name). Empty: no switch (a server started as root stays root, with a warning).
    pub mail_owner: String,
    /// Time sessions get to finish at shutdown before they are told 421 4.3.2.
    pub shutdown_timeout: PfDuration,
    /// The event log's file (Postfix's name): appended to, reopened on SIGUSR1 or SIGHUP (logrotate). Empty
    /// (default): stderr, for journald. Its directory must exist.
    #[serde(with = "optional_path")]
    pub maillog_file: Option<PathBuf>,
    /// The event log's lines: "text" (default, Postfix-like: fail2ban's postfix filters match them) or "json"
    /// (one object per line).
    pub log_format: crate::eventlog::LogFormat,
    #[serde(rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    /// Outbound delivery settings.
    pub delivery: DeliveryConfig,
    /// DNS for MX lookups: `servers = ["127.0.0.1:5353"]` (default: /etc/resolv.conf), `timeout_ms`, `attempts`.
    pub dns: crate::dns::DnsConfig,
    /// Per-domain routes (Postfix transport_maps): `"example.com" = "[10.0.0.5]:2525"` (no MX lookup),
    /// `"host.example:25"` (MX lookup of host), or `"local"`.
    pub transport: std::collections::BTreeMap<String, Nexthop>,
    /// Per-domain TLS policy (Postfix smtp_tls_policy_maps): `"example.com" = "verify"`.
    pub smtp_tls_policy: std::collections::BTreeMap<String, TlsLevel>,
    /// MTA-STS (RFC 8461) for MX-routed destinations: `enabled`, `cache_entries_max`, `fetch_timeout_ms`, and
    /// the test-only `test_policy_port` / `test_ca_file`.
    pub mta_sts: crate::mta_sts::MtaStsConfig,
    /// Per-domain message rate limits: `"example.com" = "10/s"` or `"600/m"`.
    pub destination_rate_limit: std::collections::BTreeMap<String, Rate>,
    /// aliases(5) files for `mydestination` (Postfix alias_maps; `hash:` and similar prefixes are ignored).
    /// Default: none.
    pub alias_maps: Vec<String>,
    /// virtual(5) files (Postfix virtual_alias_maps): `sales@example.com alice@example.com, bob@example.org`.
    pub virtual_alias_maps: Vec<String>,
    /// Domains whose every address must be rewritten by virtual_alias_maps; other addresses get 550 5.1.1.
    pub virtual_alias_domains: Vec<String>,
    /// Separator(s) of address extensions, e.g. "+": alice+news@ is delivered to alice. Empty: none.
    pub recipient_delimiter: String,
    /// Deepest alias nesting followed (Postfix default 1000).
    pub virtual_alias_recursion_limit: usize,
    /// Most addresses one recipient may expand to (Postfix default 1000).
    pub virtual_alias_expansion_limit: usize,
    /// Local delivery (`mydestination`): who exists and where their Maildirs are.
    pub local: LocalConfig,
    /// The HTTP API and metrics (`/api/v1/...`, `/metrics`, `/health`).
    pub http: HttpConfig,
    /// Outbound source addresses (`[[egress_source]]`: name, source_address, ehlo_name, warm-up schedule; see
    /// `crate::egress`). None (default): the kernel picks the address, EHLO says `myhostname`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub egress_source: Vec<crate::egress::EgressSourceConfig>,
    /// Pools of sources with weights (`[[egress_pool]]`: name, sources = [{ name, weight }]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub egress_pool: Vec<crate::egress::EgressPoolConfig>,
    /// The pool of messages no rule gives one. Absent: such messages use no pool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_egress_pool: Option<String>,
    /// Pool by sender domain (the domain, then its parent domains): `"news.example.com" = "bulk"`.
    pub egress_pool_by_sender_domain: std::collections::BTreeMap<String, String>,
    /// A header naming the pool (e.g. "X-Pool"), honoured from trusted clients (mynetworks, AUTH) and removed
    /// from every message at acceptance. Absent: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_pool_header: Option<String>,
    /// Limits shared with other nodes through Redis (`crate::cluster`). Absent (default): limits are local.
    /// Read at start (a reload keeps the running value).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

/// One `[[dkim]]` entry: a signing key for a domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimKeyConfig {
    /// `d=`: signs mail whose From: domain is this domain or a subdomain of it.
    pub domain: String,
    /// `s=`: the key's DNS record is `<selector>._domainkey.<domain>` TXT.
    pub selector: String,
    /// RSA (PKCS#1 or PKCS#8 PEM, 2048 to 4096 bits) or Ed25519 (PKCS#8 PEM); the algorithm comes from the key.
    pub private_key_file: PathBuf,
    /// Header fields to sign (those present; From is always signed, and oversigned). Default: From, To, Cc,
    /// Subject, Date, Message-ID, Reply-To, MIME-Version, Content-Type, Content-Transfer-Encoding,
    /// List-Unsubscribe, List-Unsubscribe-Post.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Vec<String>>,
}

/// The HTTP API: one TCP listener when `listen` is set (off by default); the control socket
/// `<queue_directory>/control.sock` is always served (see `crate::http`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the HTTP listener, e.g. "127.0.0.1:8025". Empty (default): no TCP listener.
    #[serde(with = "optional_socket_addr")]
    pub listen: Option<SocketAddr>,
    /// Clients that may call without a token. Default: loopback.
    pub trusted_networks: Vec<Cidr>,
    /// Bearer tokens for other clients, one a line: `name:token` or `token` (`#` comments). Empty: none.
    #[serde(with = "optional_path")]
    pub api_token_file: Option<PathBuf>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: None,
            trusted_networks: Cidr::loopback(),
            api_token_file: None,
        }
    }
}

/// A socket address that may be left empty ("" for none), as `[http] listen`.
pub mod optional_socket_addr {
    use std::net::SocketAddr;

    pub fn serialize<S: serde::Serializer>(
        v: &Option<SocketAddr>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(a) => s.collect_str(a),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SocketAddr>, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        let s = s.trim();
        if s.is_empty() {
            return Ok(None);
        }
        s.parse().map(Some).map_err(|_| {
            serde::de::Error::custom(format!(
                "not a socket address: {s:?} (use e.g. \"127.0.0.1:8025\" or \"[::1]:8025\")"
            ))
        })
    }
}

/// Local delivery settings (the local-delivery shard and the recipient check at RCPT).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    /// Local user names (lower case compared).
    pub users: Vec<String>,
    /// File of local user names, one per line (`#` comments). Empty: none.
    #[serde(with = "optional_path")]
    pub users_file: Option<PathBuf>,
    /// The system's accounts (/etc/passwd) are local users too (Postfix's default local_recipient_maps).
    pub system_users: bool,
    /// Accept every local part of `mydestination` (Postfix: empty local_recipient_maps). Default false:
    /// unknown users get 550 5.1.1 at RCPT.
    pub accept_unknown_users: bool,
    /// Maildir of a user: `{user}`, `{domain}` and `{home}` (system accounts) are replaced; a relative path is
    /// below queue_directory. Default `mail/{domain}/{user}/Maildir`.
    pub mailbox_path: String,
    /// Owner of created Maildirs and messages (Postfix virtual_uid_maps/virtual_gid_maps = static:N).
    /// Unset: a system account's own uid/gid, else the server's.
    pub mailbox_uid: Option<u32>,
    pub mailbox_gid: Option<u32>,
    /// A message that already has this many Delivered-To: headers naming the recipient is a mail loop and
    /// is bounced (5.4.6). Default 1, as Postfix's local(8).
    pub delivered_to_limit: u32,
    /// How a batch of Maildir files is made durable: "file" (default: fdatasync of every file, fsync of every
    /// new/ directory, all in flight together) or "filesystem" (one syncfs(2) per file system before the
    /// renames and one after; for a file system that holds mailboxes only).
    pub sync_method: LocalSync,
}

/// How the local-delivery shard makes Maildir files durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalSync {
    File,
    Filesystem,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            users: vec![],
            users_file: None,
            system_users: true,
            accept_unknown_users: false,
            mailbox_path: "mail/{domain}/{user}/Maildir".into(),
            mailbox_uid: None,
            mailbox_gid: None,
            delivered_to_limit: 1,
            sync_method: LocalSync::File,
        }
    }
}

/// Outbound TLS policy (Postfix smtp_tls_security_level).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsLevel {
    /// Never STARTTLS.
    None,
    /// Opportunistic: STARTTLS when offered; plaintext if not offered or if the handshake fails.
    #[serde(alias = "opportunistic")]
    May,
    /// TLS required, certificate not verified.
    #[serde(alias = "required")]
    Encrypt,
    /// TLS required with a certificate that verifies for the host name.
    Verify,
    /// DANE (RFC 7672) when the MX host publishes validated, usable TLSA records, else `may` (Postfix `dane`);
    /// needs `dns.dnssec = "trust-ad"`.
    Dane,
    /// DANE or nothing: mail waits unless the host is DANE-authenticated (Postfix `dane-only`).
    #[serde(rename = "dane-only")]
    DaneOnly,
}

impl TlsLevel {
    /// The level's name as configured (and as the delivery log names the policy applied).
    pub fn as_str(self) -> &'static str {
        match self {
            TlsLevel::None => "none",
            TlsLevel::May => "may",
            TlsLevel::Encrypt => "encrypt",
            TlsLevel::Verify => "verify",
            TlsLevel::Dane => "dane",
            TlsLevel::DaneOnly => "dane-only",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Deliver queued mail (true). false: accept and queue only (Postfix: a stopped queue manager), e.g. for
    /// accept benchmarks.
    pub enabled: bool,
    /// TCP port of outbound SMTP (25); tests point it at sinks on loopback.
    pub smtp_port: u16,
    /// Most concurrent connections per destination (Postfix default_destination_concurrency_limit, 20).
    pub destination_concurrency_limit: usize,
    /// Connections a destination starts with (Postfix initial_destination_concurrency, 5); it grows with
    /// accepted transactions up to `destination_concurrency_limit` and shrinks on 4xx, 421s and timeouts
    /// (adaptive concurrency, see `delivery::agent::ConcurrencyWindow`).
    pub initial_destination_concurrency: usize,
    /// Most recipients per transaction (Postfix default_destination_recipient_limit, 50).
    pub destination_recipient_limit: usize,
    /// How long an idle connection is kept for reuse (Postfix smtp_connection_cache_time_limit, 2s).
    pub smtp_connection_cache_time_limit: PfDuration,
    /// Most messages sent over one connection before it is closed.
    pub smtp_connection_reuse_count_limit: u32,
    /// Most messages one connection takes at once when the server offers PIPELINING (8): when every connection
    /// of the destination is busy, messages waiting for it go behind the one being sent, each one's MAIL, RCPTs
    /// and DATA in the write that ends the content before it (RFC 2920), so n messages cost n+1 round trips
    /// instead of 2n. 1: one message at a time, as Postfix does. At most 32; the messages behind the first
    /// hold at most 1 MiB of content (`limits::SMTP_PIPELINED_BYTES_MAX`).
    pub smtp_transaction_pipelining_limit: usize,
    /// The TCP connection (Postfix smtp_connect_timeout, 30s).
    pub smtp_connect_timeout: PfDuration,
    /// The greeting and the EHLO/HELO (and AUTH) replies (Postfix smtp_helo_timeout, 300s).
    pub smtp_helo_timeout: PfDuration,
    /// The STARTTLS reply and the TLS handshake (Postfix smtp_starttls_timeout, 300s).
    pub smtp_starttls_timeout: PfDuration,
    /// The reply to MAIL FROM (Postfix smtp_mail_timeout, 300s).
    pub smtp_mail_timeout: PfDuration,
    /// The reply to each RCPT TO (Postfix smtp_rcpt_timeout, 300s).
    pub smtp_rcpt_timeout: PfDuration,
    /// The reply to DATA (Postfix smtp_data_init_timeout, 120s).
    pub smtp_data_init_timeout: PfDuration,
    /// Progress while sending the content (Postfix smtp_data_xfer_timeout, 180s).
    pub smtp_data_xfer_timeout: PfDuration,
    /// Time allowed for the reply after the end of data (Postfix smtp_data_done_timeout, 600s).
    pub smtp_data_done_timeout: PfDuration,
    /// The reply to RSET (Postfix smtp_rset_timeout, 20s).
    pub smtp_rset_timeout: PfDuration,
    /// The reply to QUIT (Postfix smtp_quit_timeout, 300s).
    pub smtp_quit_timeout: PfDuration,
    /// Older key, kept working: when set, no reply timeout above (helo, starttls, mail, rcpt, data_init,
    /// rset, quit) is longer than this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smtp_reply_timeout: Option<PfDuration>,
    /// Default TLS policy: none, may (opportunistic, default), encrypt (required), verify.
    pub smtp_tls_security_level: TlsLevel,
    /// CA bundle for "verify" (PEM). Default: /etc/ssl/certs/ca-certificates.crt.
    #[serde(with = "optional_path")]
    pub smtp_tls_ca_file: Option<PathBuf>,
    /// Credentials for the relayhost (AUTH PLAIN/LOGIN, only over TLS).
    pub smtp_sasl_username: String,
    pub smtp_sasl_password: String,
    /// The relayhost speaks TLS from the first byte (port 465 style; Postfix smtp_tls_wrappermode).
    pub smtp_tls_wrappermode: bool,
    /// A destination that answered 421 or failed every host is not tried again for this long.
    pub destination_backoff_time: PfDuration,
    /// Default message rate limit per destination ("0" = none), e.g. "100/s" or "6000/m".
    pub default_destination_rate_limit: Rate,
    /// JSON lines, one per delivery attempt outcome. Empty: `<queue_directory>/delivery.log`.
    #[serde(with = "optional_path")]
    pub delivery_log: Option<PathBuf>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        let d = |s| PfDuration(Duration::from_secs(s));
        DeliveryConfig {
            enabled: true,
            smtp_port: 25,
            destination_concurrency_limit: 20,
            initial_destination_concurrency: 5,
            destination_recipient_limit: 50,
            smtp_connection_cache_time_limit: d(2),
            smtp_connection_reuse_count_limit: 1000,
            smtp_transaction_pipelining_limit: 8,
            smtp_connect_timeout: d(30),
            smtp_helo_timeout: d(300),
            smtp_starttls_timeout: d(300),
            smtp_mail_timeout: d(300),
            smtp_rcpt_timeout: d(300),
            smtp_data_init_timeout: d(120),
            smtp_data_xfer_timeout: d(180),
            smtp_data_done_timeout: d(600),
            smtp_rset_timeout: d(20),
            smtp_quit_timeout: d(300),
            smtp_reply_timeout: None,
            smtp_tls_security_level: TlsLevel::May,
            smtp_tls_ca_file: None,
            smtp_sasl_username: String::new(),
            smtp_sasl_password: String::new(),
            smtp_tls_wrappermode: false,
            destination_backoff_time: d(60),
            default_destination_rate_limit: Rate::UNLIMITED,
            delivery_log: None,
        }
    }
}

/// File paths in the configuration: an empty string (the default) is "none"; anything else is a path, kept as
/// written (relative paths are relative to the working directory, as in Postfix's main.cf).
pub mod optional_path {
    use std::path::{Path, PathBuf};

    pub fn serialize<S: serde::Serializer>(v: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(show(v))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<PathBuf>, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        if s.contains('\0') {
            return Err(serde::de::Error::custom("a path cannot hold a NUL byte"));
        }
        Ok((!s.trim().is_empty()).then(|| PathBuf::from(s)))
    }

    /// As written ("" for none; a path that is not UTF-8 shows as "?").
    pub fn show(v: &Option<PathBuf>) -> &str {
        v.as_deref()
            .map_or("", |p: &Path| p.to_str().unwrap_or("?"))
    }
}

/// A message rate as written ("100/s", "6000/m", "0" for none), parsed at load.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Rate {
    per_second: f64,
    written: String,
}

impl Rate {
    pub const UNLIMITED: Rate = Rate {
        per_second: 0.0,
        written: String::new(),
    };

    /// Messages per second; 0: no limit.
    pub fn per_second(&self) -> f64 {
        self.per_second
    }

    /// The least time between two messages (zero: no limit).
    pub fn interval(&self) -> Duration {
        if self.per_second > 0.0 {
            Duration::from_secs_f64(1.0 / self.per_second)
        } else {
            Duration::ZERO
        }
    }
}

/// Equal when they allow the same rate, however written.
impl PartialEq for Rate {
    fn eq(&self, other: &Rate) -> bool {
        self.per_second == other.per_second
    }
}

impl TryFrom<String> for Rate {
    type Error = String;

    fn try_from(s: String) -> Result<Rate, String> {
        Ok(Rate {
            per_second: parse_rate(&s)?,
            written: s.trim().to_string(),
        })
    }
}

impl From<Rate> for String {
    fn from(r: Rate) -> String {
        if r.written.is_empty() {
            "0".into()
        } else {
            r.written
        }
    }
}

impl DeliveryConfig {
    /// The outbound client's per-phase timeouts (`smtp_reply_timeout`, when set, caps the reply ones).
    pub fn client_timeouts(&self) -> crate::smtp::client_session::Timeouts {
        let cap = |v: PfDuration| match self.smtp_reply_timeout {
            Some(r) => v.0.min(r.0),
            None => v.0,
        };
        crate::smtp::client_session::Timeouts {
            connect: self.smtp_connect_timeout.0,
            helo: cap(self.smtp_helo_timeout),
            starttls: cap(self.smtp_starttls_timeout),
            mail: cap(self.smtp_mail_timeout),
            rcpt: cap(self.smtp_rcpt_timeout),
            data_init: cap(self.smtp_data_init_timeout),
            data_xfer: self.smtp_data_xfer_timeout.0,
            data_done: self.smtp_data_done_timeout.0,
            rset: cap(self.smtp_rset_timeout),
            quit: cap(self.smtp_quit_timeout),
        }
    }
}

/// Parses "100/s", "6000/m", "0": messages per second (0 = unlimited).
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(0.0);
    }
    let (n, unit) = s
        .split_once('/')
        .ok_or_else(|| format!("not a rate: {s:?} (use e.g. 100/s or 600/m)"))?;
    let n: f64 = n.trim().parse().map_err(|_| format!("not a rate: {s:?}"))?;
    let per = match unit.trim() {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("unknown rate unit in {s:?} (use /s, /m or /h)")),
    };
    if !(n.is_finite() && n > 0.0) {
        return Err(format!("rate must be > 0: {s:?}"));
    }
    let per_s = n / per;
    // At least one message a day, at most a million a second: the interval always fits a Duration.
    if !(1.0 / 86400.0..=1e6).contains(&per_s) {
        return Err(format!(
            "rate out of range: {s:?} (between 1 message a day and 1000000/s)"
        ));
    }
    Ok(per_s)
}

/// The default `myhostname`: the system's host name (gethostname(2), uname's nodename on Linux) when it is fully
/// qualified, else its canonical name from /etc/hosts (the first name of the line that lists it, or an alias
/// of that line that extends it), else the bare name (`Config::warnings` says so). Never asks DNS.
pub fn system_hostname() -> String {
    let uname = rustix::system::uname();
    let name = match uname.nodename().to_str() {
        Ok(s) if !s.is_empty() => s.to_string(),
        _ => return "localhost".to_string(),
    };
    if name.contains('.') {
        return name;
    }
    read_hosts_file(Path::new("/etc/hosts"))
        .and_then(|text| canonical_name_in_hosts(&name, &text))
        .unwrap_or(name)
}

/// /etc/hosts, when readable and not larger than `limits::HOSTS_FILE_BYTES_MAX`.
fn read_hosts_file(path: &Path) -> Option<String> {
    use std::io::Read;
    let f = std::fs::File::open(path).ok()?;
    let mut text = String::new();
    f.take(limits::HOSTS_FILE_BYTES_MAX)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// The fully qualified name hosts(5) `text` gives the short host name `name`: on the first line that lists
/// `name`, the canonical (first) name if it has a dot, else an alias `name.<domain>`. None when there is none.
pub fn canonical_name_in_hosts(name: &str, text: &str) -> Option<String> {
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut fields = line.split_whitespace();
        if fields.next().is_none() {
            continue;
        }
        let names: Vec<&str> = fields.collect();
        if !names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            continue;
        }
        let fqdn = names
            .iter()
            .find(|n| {
                n.len() > name.len() + 1
                    && n.as_bytes()[name.len()] == b'.'
                    && n[..name.len()].eq_ignore_ascii_case(name)
            })
            .or_else(|| names.first().filter(|n| n.contains('.')))?;
        let fqdn = fqdn.trim_end_matches('.').to_ascii_lowercase();
        return crate::smtp::address::valid_domain(&fqdn, false).then_some(fqdn);
    }
    None
}

/// Postfix's default `mydestination`, expanded at load.
fn mydestination_default() -> Vec<String> {
    ["$myhostname", "localhost.$mydomain", "localhost"]
        .map(String::from)
        .to_vec()
}

/// The placeholders `local.mailbox_path` knows (replaced by `local::maildir`).
pub const MAILBOX_PATH_PLACEHOLDERS: [&str; 3] = ["{user}", "{domain}", "{home}"];
/// The placeholders `mydestination` knows (replaced at load).
pub const MYDESTINATION_PLACEHOLDERS: [&str; 2] = ["$myhostname", "$mydomain"];

/// Whether two listening addresses conflict as the kernel sees them: the same port, and the same address, or
/// one of them the wildcard of a family the other is in (`[::]` takes IPv4 too: IPV6_V6ONLY is not set).
/// SO_REUSEPORT would let one process bind both and split their connections, so two such listeners are a
/// configuration error.
pub fn listeners_conflict(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() {
        return false;
    }
    let plain = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    let (x, y) = (plain(a.ip()), plain(b.ip()));
    let covers = |w: IpAddr, other: IpAddr| match w {
        IpAddr::V4(v4) => v4.is_unspecified() && other.is_ipv4(),
        IpAddr::V6(v6) => v6.is_unspecified(),
    };
    x == y || covers(x, y) || covers(y, x)
}

/// The first `{name}` in `template` that is not one of `known` (an unclosed `{` counts as unknown).
fn unknown_braced_placeholder(template: &str, known: &[&str]) -> Option<String> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open..];
        let Some(close) = after.find('}') else {
            return Some(after.to_string());
        };
        let name = &after[..=close];
        if !known.contains(&name) {
            return Some(name.to_string());
        }
        rest = &after[close + 1..];
    }
    None
}

impl Default for Config {
    fn default() -> Self {
        let d = |s| PfDuration(Duration::from_secs(s));
        let mut c = Config {
            myhostname: system_hostname(),
            mydestination: mydestination_default(),
            mynetworks: Cidr::loopback(),
            relay_domains: vec![],
            relayhost: None,
            message_size_limit: limits::MESSAGE_SIZE_BYTES_DEFAULT,
            smtpd_recipient_limit: 1000,
            smtpd_timeout: d(300),
            smtpd_hard_error_limit: 20,
            line_length_limit: limits::SMTP_COMMAND_LINE_BYTES_DEFAULT,
            smtpd_connection_limit: 2000,
            smtpd_client_connection_count_limit: 50,
            smtpd_forbid_bare_newline: BareNewline::Normal,
            suppression_auto_add: false,
            smtp_line_length_limit: limits::SMTP_TEXT_LINE_BYTES_MAX,
            smtpd_auth_failure_delay: d(1),
            smtpd_auth_failure_limit: 10,
            smtpd_auth_lockout_time: d(600),
            smtpd_per_request_deadline: true,
            smtpd_min_data_rate: 500,
            smtpd_starttls_timeout: d(300),
            smtpd_stress_timeout: d(10),
            smtpd_mynetworks_reserve_percent: 10,
            smtpd_data_memory_limit: 256 << 20,
            maximal_queue_lifetime: d(5 * 86400),
            minimal_backoff_time: d(300),
            maximal_backoff_time: d(4000),
            delay_warning_time: None,
            bounce_classification_file: None,
            shaping_file: None,
            bounce_queue_lifetime: d(5 * 86400),
            queue_directory: PathBuf::from("./spool"),
            queue_segment_size: limits::QUEUE_SEGMENT_BYTES_DEFAULT,
            queue_commit_delay_us: limits::QUEUE_COMMIT_DELAY_US_DEFAULT,
            smtpd_tls_cert_file: None,
            smtpd_tls_key_file: None,
            smtpd_sasl_users_file: None,
            dkim: Vec::new(),
            dkim_sign_relayed: false,
            shards: 0,
            mail_owner: String::new(),
            shutdown_timeout: d(10),
            maillog_file: None,
            log_format: crate::eventlog::LogFormat::Text,
            listeners: vec![
                ListenerConfig {
                    address: "127.0.0.1:2525".parse().expect("literal"),
                    kind: ListenerKind::Smtp,
                    allow_plaintext_auth: false,
                },
                ListenerConfig {
                    address: "127.0.0.1:2587".parse().expect("literal"),
                    kind: ListenerKind::Submission,
                    allow_plaintext_auth: false,
                },
            ],
            delivery: DeliveryConfig::default(),
            dns: Default::default(),
            transport: Default::default(),
            smtp_tls_policy: Default::default(),
            egress_source: Vec::new(),
            egress_pool: Vec::new(),
            default_egress_pool: None,
            egress_pool_by_sender_domain: Default::default(),
            egress_pool_header: None,
            mta_sts: Default::default(),
            destination_rate_limit: Default::default(),
            alias_maps: vec![],
            virtual_alias_maps: vec![],
            virtual_alias_domains: vec![],
            recipient_delimiter: String::new(),
            virtual_alias_recursion_limit: 1000,
            virtual_alias_expansion_limit: 1000,
            local: LocalConfig::default(),
            http: HttpConfig::default(),
            cluster: None,
        };
        c.expand_mydestination();
        c.normalize();
        c
    }
}

fn bad(key: &str, value: impl fmt::Display, reason: &str) -> ConfigError {
    ConfigError::Value {
        key: key.into(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let (cfg, first_error, problems) = Self::parse_checked(text, path)?;
        if problems.is_empty() {
            return match first_error {
                Some(e) => Err(e),
                None => Ok(cfg),
            };
        }
        let problems = first_error
            .map(|e| e.to_string())
            .into_iter()
            .chain(problems)
            .collect();
        Err(ConfigError::Problems {
            path: path.into(),
            problems,
        })
    }

    /// Reads a TOML file for `check-config`: the configuration as far as it parses, and every problem found
    /// (the first bad value, then each problem of meaning), one per entry. Err only when the file cannot be
    /// read or is not TOML for this configuration.
    pub fn load_listing_problems(path: &Path) -> Result<(Config, Vec<String>), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let (cfg, first_error, problems) = Self::parse_checked(&text, path)?;
        let all = first_error
            .map(|e| e.to_string())
            .into_iter()
            .chain(problems)
            .collect();
        Ok((cfg, all))
    }

    /// Parses, expands and normalises; returns the configuration, the first bad value (`validate`) and the
    /// problems of meaning ([`Config::problems`]).
    fn parse_checked(
        text: &str,
        path: &Path,
    ) -> Result<(Config, Option<ConfigError>, Vec<String>), ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        cfg.expand_mydestination();
        cfg.normalize();
        let first_error = cfg.validate().err();
        let problems = cfg.problems();
        Ok((cfg, first_error, problems))
    }

    /// Replaces `$myhostname` and `$mydomain` (myhostname without its first label; "localdomain" when it has
    /// none, as Postfix) in `mydestination`, and drops repeated entries. Unknown `$names` stay, for
    /// [`Config::problems`] to name.
    fn expand_mydestination(&mut self) {
        let host = self.myhostname.trim_end_matches('.').to_ascii_lowercase();
        let domain = match host.split_once('.') {
            Some((_, d)) if !d.is_empty() => d.to_string(),
            _ => "localdomain".to_string(),
        };
        let mut seen = std::collections::HashSet::new();
        self.mydestination = std::mem::take(&mut self.mydestination)
            .into_iter()
            .map(|d| {
                d.replace("${myhostname}", &host)
                    .replace("$myhostname", &host)
                    .replace("${mydomain}", &domain)
                    .replace("$mydomain", &domain)
            })
            .filter(|d| seen.insert(crate::smtp::address::normalize_domain(d)))
            .collect();
    }

    /// Problems of meaning, each a line naming the key: two listeners on one address, a placeholder nobody
    /// replaces, a key that is accepted but not acted on. Refused at load (`serve` and reloads) and listed all
    /// together by `check-config`.
    pub fn problems(&self) -> Vec<String> {
        let mut p = crate::egress::problems(self);
        for (i, a) in self.listeners.iter().enumerate() {
            for b in &self.listeners[..i] {
                if listeners_conflict(a.address, b.address) {
                    let what = if a.address == b.address {
                        "the same address".to_string()
                    } else {
                        "addresses the kernel cannot tell apart (a wildcard and an address it covers, same port)"
                            .to_string()
                    };
                    p.push(format!(
                        "[[listener]] {} ({:?}) and {} ({:?}) are {what}: give each listener its own address or port",
                        b.address, b.kind, a.address, a.kind
                    ));
                }
            }
        }
        let mp = &self.local.mailbox_path;
        if let Some(unknown) = unknown_braced_placeholder(mp, &MAILBOX_PATH_PLACEHOLDERS) {
            p.push(format!(
                "local.mailbox_path {mp:?}: unknown placeholder {unknown}; known: {}",
                MAILBOX_PATH_PLACEHOLDERS.join(", ")
            ));
        }
        for d in self.mydestination.iter().filter(|d| d.contains('$')) {
            p.push(format!(
                "mydestination {d:?}: unknown placeholder; known: {}",
                MYDESTINATION_PLACEHOLDERS.join(", ")
            ));
        }
        p.extend(
            self.mta_sts
                .problems(crate::mta_sts::MtaStsConfig::knobs_allowed_by_env()),
        );
        if let Some(c) = &self.cluster {
            p.extend(c.problems());
        }
        if self.dns.dnssec == crate::dns::Dnssec::Off {
            let dane = std::iter::once((
                "smtp_tls_security_level",
                &self.delivery.smtp_tls_security_level,
            ))
            .chain(self.smtp_tls_policy.iter().map(|(k, v)| (k.as_str(), v)))
            .filter(|(_, l)| matches!(l, TlsLevel::Dane | TlsLevel::DaneOnly));
            for (k, l) in dane {
                p.push(format!(
                    "{k} = \"{}\" needs validated DNS: set [dns] dnssec = \"trust-ad\" with a local validating resolver",
                    l.as_str()
                ));
            }
        }
        p.extend(self.dkim_problems());
        if let Some(d) = self.delay_warning_time.filter(|d| !d.0.is_zero()) {
            if d.0 >= self.maximal_queue_lifetime.0 {
                p.push(format!(
                    "delay_warning_time = \"{d}\" is not shorter than maximal_queue_lifetime = \"{}\": no delay warning would ever be sent; shorten it (or set it to \"0\")",
                    self.maximal_queue_lifetime
                ));
            }
        }
        p
    }

    /// Problems of the `[[dkim]]` entries (the key files are read by `reloadable::read_dkim_keys`).
    fn dkim_problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for e in &self.dkim {
            let d = crate::dkim::normalize(&e.domain);
            if !crate::smtp::address::valid_domain(&d, false)
                || !d.contains('.')
                || d.starts_with('[')
            {
                p.push(format!(
                    "dkim domain {:?}: not a domain name with a dot",
                    e.domain
                ));
            }
            let sel_ok = !e.selector.is_empty()
                && e.selector.len() <= 63 * 4
                && e.selector.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                });
            if !sel_ok {
                p.push(format!(
                    "dkim selector {:?} (domain {}): letters, digits, '-' and '_' in dot-separated labels",
                    e.selector, e.domain
                ));
            }
            if !seen.insert((d.clone(), e.selector.to_ascii_lowercase())) {
                p.push(format!(
                    "dkim domain {} selector {}: listed twice",
                    e.domain, e.selector
                ));
            }
            if let Some(h) = &e.headers {
                if h.len() > crate::dkim::SIGNED_HEADER_NAMES_MAX {
                    p.push(format!(
                        "dkim headers (domain {}): {} names, at most {}",
                        e.domain,
                        h.len(),
                        crate::dkim::SIGNED_HEADER_NAMES_MAX
                    ));
                }
                if let Some(bad) = h.iter().find(|n| {
                    n.is_empty() || !n.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b':')
                }) {
                    p.push(format!(
                        "dkim headers (domain {}): {bad:?} is not a header field name",
                        e.domain
                    ));
                }
            }
        }
        p
    }

    fn normalize(&mut self) {
        use crate::smtp::address::normalize_domain;
        for list in [
            &mut self.mydestination,
            &mut self.relay_domains,
            &mut self.virtual_alias_domains,
        ] {
            for d in list.iter_mut() {
                *d = normalize_domain(d);
            }
        }
        // Policy tables are looked up by normalised domain or next-hop name.
        self.smtp_tls_policy = std::mem::take(&mut self.smtp_tls_policy)
            .into_iter()
            .map(|(k, v)| (normalize_domain(&k), v))
            .collect();
        self.destination_rate_limit = std::mem::take(&mut self.destination_rate_limit)
            .into_iter()
            .map(|(k, v)| (normalize_domain(&k), v))
            .collect();
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        use crate::smtp::address::valid_domain;
        self.check_ranges()?;
        if !valid_domain(&self.myhostname, false) {
            return Err(bad("myhostname", &self.myhostname, "not a valid host name"));
        }
        for (key, list) in [
            ("mydestination", &self.mydestination),
            ("relay_domains", &self.relay_domains),
            ("virtual_alias_domains", &self.virtual_alias_domains),
        ] {
            // An unknown `$placeholder` is one of `problems()`, named there.
            if let Some(d) = list
                .iter()
                .find(|d| !(valid_domain(d, true) || key == "mydestination" && d.contains('$')))
            {
                return Err(bad(key, d, "not a valid domain name"));
            }
        }
        if self.message_size_limit == 0 {
            return Err(bad("message_size_limit", 0, "must be > 0"));
        }
        // A message record (envelope + Received header + data) must fit in one segment.
        let min_segment = self.message_size_limit + limits::QUEUE_SEGMENT_HEADROOM_BYTES;
        if self.queue_segment_size < min_segment {
            return Err(bad(
                "queue_segment_size",
                self.queue_segment_size,
                &format!("must be at least message_size_limit + 1 MiB = {min_segment}"),
            ));
        }
        if self.queue_segment_size > limits::QUEUE_SEGMENT_BYTES_MAX {
            return Err(bad(
                "queue_segment_size",
                self.queue_segment_size,
                "must be below 4 GiB",
            ));
        }
        if self.smtpd_recipient_limit == 0 {
            return Err(bad("smtpd_recipient_limit", 0, "must be > 0"));
        }
        if self.line_length_limit < limits::SMTP_COMMAND_LINE_BYTES_MIN {
            return Err(bad(
                "line_length_limit",
                self.line_length_limit,
                "must be at least 512 (RFC 5321)",
            ));
        }
        if self.smtpd_hard_error_limit == 0 {
            return Err(bad("smtpd_hard_error_limit", 0, "must be > 0"));
        }
        if self.smtpd_connection_limit == 0 || self.smtpd_client_connection_count_limit == 0 {
            return Err(bad(
                "smtpd_connection_limit",
                self.smtpd_connection_limit,
                "limits must be > 0",
            ));
        }
        if self.smtpd_timeout.0.is_zero() {
            return Err(bad("smtpd_timeout", self.smtpd_timeout, "must be > 0"));
        }
        if self.shards > 256 {
            return Err(bad("shards", self.shards, "at most 256"));
        }
        if self.listeners.is_empty() {
            return Err(bad("listener", "[]", "at least one listener is needed"));
        }
        self.check_maillog_file()?;
        if self.minimal_backoff_time.0.is_zero()
            || self.maximal_backoff_time.0 < self.minimal_backoff_time.0
        {
            return Err(bad(
                "maximal_backoff_time",
                self.maximal_backoff_time,
                "must be >= minimal_backoff_time > 0",
            ));
        }
        let dl = &self.delivery;
        if dl.destination_concurrency_limit == 0 || dl.destination_recipient_limit == 0 {
            return Err(bad(
                "delivery.destination_concurrency_limit",
                dl.destination_concurrency_limit,
                "limits must be > 0",
            ));
        }
        if dl.smtp_port == 0 {
            return Err(bad("delivery.smtp_port", 0, "must be > 0"));
        }
        if dl.smtp_sasl_username.is_empty() != dl.smtp_sasl_password.is_empty() {
            return Err(bad(
                "delivery.smtp_sasl_password",
                "",
                "set both smtp_sasl_username and smtp_sasl_password, or neither",
            ));
        }
        if self.virtual_alias_recursion_limit == 0 || self.virtual_alias_expansion_limit == 0 {
            return Err(bad(
                "virtual_alias_expansion_limit",
                self.virtual_alias_expansion_limit,
                "alias limits must be > 0",
            ));
        }
        if let Some(c) = self
            .recipient_delimiter
            .chars()
            .find(|c| !c.is_ascii_punctuation() || *c == '@' || *c == '"')
        {
            return Err(bad(
                "recipient_delimiter",
                &self.recipient_delimiter,
                &format!("{c:?} cannot separate an extension (use e.g. \"+\" or \"+-\")"),
            ));
        }
        let mp = &self.local.mailbox_path;
        if mp.is_empty() || (!mp.contains("{user}") && !mp.contains("{home}")) {
            return Err(bad(
                "local.mailbox_path",
                mp,
                "must contain {user} or {home}, so that users do not share a Maildir",
            ));
        }
        if self.local.delivered_to_limit == 0 {
            return Err(bad("local.delivered_to_limit", 0, "must be > 0"));
        }
        if let Some(a) = self.http.listen {
            if a.port() == 0 {
                return Err(bad("http.listen", a, "needs a port"));
            }
            if self.listeners.iter().any(|l| l.address == a) {
                return Err(bad("http.listen", a, "is also an SMTP [[listener]]"));
            }
        }
        if self.smtpd_tls_cert_file.is_none() != self.smtpd_tls_key_file.is_none() {
            return Err(bad(
                "smtpd_tls_key_file",
                optional_path::show(&self.smtpd_tls_key_file),
                "set both smtpd_tls_cert_file and smtpd_tls_key_file, or neither",
            ));
        }
        Ok(())
    }

    /// Every numeric value within a sane range, so that nothing later overflows a clock, a size or an
    /// allocation (a hostile or mistyped configuration fails here, naming the key, never at run time).
    fn check_ranges(&self) -> Result<(), ConfigError> {
        const MIN: u64 = 60;
        const HOUR: u64 = 3600;
        const DAY: u64 = 86400;
        let dur = |key: &str, v: PfDuration, lo: u64, hi: u64| -> Result<(), ConfigError> {
            let s = v.0.as_secs();
            if s < lo || s > hi {
                return Err(bad(
                    key,
                    v,
                    &format!(
                        "must be between {} and {}",
                        PfDuration(Duration::from_secs(lo)),
                        PfDuration(Duration::from_secs(hi))
                    ),
                ));
            }
            Ok(())
        };
        let num = |key: &str, v: u64, lo: u64, hi: u64| -> Result<(), ConfigError> {
            if v < lo || v > hi {
                return Err(bad(key, v, &format!("must be between {lo} and {hi}")));
            }
            Ok(())
        };
        dur("smtpd_timeout", self.smtpd_timeout, 1, HOUR)?;
        dur(
            "smtpd_starttls_timeout",
            self.smtpd_starttls_timeout,
            1,
            HOUR,
        )?;
        dur("smtpd_stress_timeout", self.smtpd_stress_timeout, 1, HOUR)?;
        dur("shutdown_timeout", self.shutdown_timeout, 0, HOUR)?;
        dur(
            "smtpd_auth_failure_delay",
            self.smtpd_auth_failure_delay,
            0,
            MIN,
        )?;
        dur(
            "smtpd_auth_lockout_time",
            self.smtpd_auth_lockout_time,
            1,
            DAY,
        )?;
        dur(
            "maximal_queue_lifetime",
            self.maximal_queue_lifetime,
            0,
            100 * DAY,
        )?;
        dur(
            "bounce_queue_lifetime",
            self.bounce_queue_lifetime,
            0,
            100 * DAY,
        )?;
        dur("minimal_backoff_time", self.minimal_backoff_time, 1, DAY)?;
        dur(
            "maximal_backoff_time",
            self.maximal_backoff_time,
            1,
            7 * DAY,
        )?;
        let dl = &self.delivery;
        dur(
            "delivery.smtp_connection_cache_time_limit",
            dl.smtp_connection_cache_time_limit,
            0,
            HOUR,
        )?;
        dur(
            "delivery.smtp_connect_timeout",
            dl.smtp_connect_timeout,
            1,
            HOUR,
        )?;
        for (key, v) in [
            ("delivery.smtp_helo_timeout", dl.smtp_helo_timeout),
            ("delivery.smtp_starttls_timeout", dl.smtp_starttls_timeout),
            ("delivery.smtp_mail_timeout", dl.smtp_mail_timeout),
            ("delivery.smtp_rcpt_timeout", dl.smtp_rcpt_timeout),
            ("delivery.smtp_data_init_timeout", dl.smtp_data_init_timeout),
            ("delivery.smtp_data_xfer_timeout", dl.smtp_data_xfer_timeout),
            ("delivery.smtp_rset_timeout", dl.smtp_rset_timeout),
            ("delivery.smtp_quit_timeout", dl.smtp_quit_timeout),
        ] {
            dur(key, v, 1, HOUR)?;
        }
        if let Some(v) = dl.smtp_reply_timeout {
            dur("delivery.smtp_reply_timeout", v, 1, HOUR)?;
        }
        dur(
            "delivery.smtp_data_done_timeout",
            dl.smtp_data_done_timeout,
            1,
            2 * HOUR,
        )?;
        dur(
            "delivery.destination_backoff_time",
            dl.destination_backoff_time,
            0,
            DAY,
        )?;
        num(
            "message_size_limit",
            self.message_size_limit,
            1,
            limits::MESSAGE_SIZE_BYTES_MAX,
        )?;
        num(
            "queue_segment_size",
            self.queue_segment_size,
            limits::QUEUE_SEGMENT_BYTES_MIN,
            limits::QUEUE_SEGMENT_BYTES_MAX,
        )?;
        num(
            "queue_commit_delay_us",
            self.queue_commit_delay_us,
            0,
            limits::QUEUE_COMMIT_DELAY_US_MAX,
        )?;
        if !self.queue_segment_size.is_multiple_of(8) {
            return Err(bad(
                "queue_segment_size",
                self.queue_segment_size,
                "must be a multiple of 8",
            ));
        }
        num(
            "smtpd_recipient_limit",
            self.smtpd_recipient_limit as u64,
            1,
            100_000,
        )?;
        num(
            "smtpd_hard_error_limit",
            self.smtpd_hard_error_limit as u64,
            1,
            1000,
        )?;
        num(
            "line_length_limit",
            self.line_length_limit as u64,
            limits::SMTP_COMMAND_LINE_BYTES_MIN as u64,
            limits::SMTP_COMMAND_LINE_BYTES_MAX as u64,
        )?;
        if self.smtp_line_length_limit != 0 {
            num(
                "smtp_line_length_limit",
                self.smtp_line_length_limit as u64,
                limits::SMTP_TEXT_LINE_BYTES_MIN as u64,
                limits::SMTP_TEXT_LINE_BYTES_MAX as u64,
            )?;
        }
        num(
            "smtpd_connection_limit",
            self.smtpd_connection_limit as u64,
            1,
            1_000_000,
        )?;
        num(
            "smtpd_client_connection_count_limit",
            self.smtpd_client_connection_count_limit as u64,
            1,
            1_000_000,
        )?;
        num("smtpd_min_data_rate", self.smtpd_min_data_rate, 1, 1 << 40)?;
        num(
            "smtpd_auth_failure_limit",
            self.smtpd_auth_failure_limit as u64,
            1,
            1_000_000,
        )?;
        num(
            "smtpd_mynetworks_reserve_percent",
            self.smtpd_mynetworks_reserve_percent as u64,
            0,
            50,
        )?;
        num(
            "smtpd_data_memory_limit",
            self.smtpd_data_memory_limit,
            1 << 20,
            1 << 40,
        )?;
        num("shards", self.shards as u64, 0, limits::SHARDS_MAX as u64)?;
        num(
            "delivery.destination_concurrency_limit",
            dl.destination_concurrency_limit as u64,
            1,
            10_000,
        )?;
        num(
            "delivery.initial_destination_concurrency",
            dl.initial_destination_concurrency as u64,
            1,
            10_000,
        )?;
        num(
            "delivery.destination_recipient_limit",
            dl.destination_recipient_limit as u64,
            1,
            100_000,
        )?;
        num(
            "delivery.smtp_connection_reuse_count_limit",
            dl.smtp_connection_reuse_count_limit as u64,
            1,
            u32::MAX as u64,
        )?;
        num(
            "delivery.smtp_transaction_pipelining_limit",
            dl.smtp_transaction_pipelining_limit as u64,
            1,
            limits::SMTP_TRANSACTIONS_IN_FLIGHT_MAX as u64,
        )?;
        num(
            "virtual_alias_recursion_limit",
            self.virtual_alias_recursion_limit as u64,
            1,
            100_000,
        )?;
        num(
            "virtual_alias_expansion_limit",
            self.virtual_alias_expansion_limit as u64,
            1,
            1_000_000,
        )?;
        num(
            "local.delivered_to_limit",
            self.local.delivered_to_limit as u64,
            1,
            1000,
        )?;
        num(
            "dns.timeout_ms",
            self.dns.timeout.as_millis().min(u64::MAX as u128) as u64,
            1,
            60_000,
        )?;
        num("dns.attempts", self.dns.attempts as u64, 1, 10)?;
        num(
            "dns.cache_entries_max",
            self.dns.cache_entries_max as u64,
            1,
            10_000_000,
        )?;
        num("dns.max_mx_hosts", self.dns.max_mx_hosts as u64, 1, 100)?;
        num("dns.max_addresses", self.dns.max_addresses as u64, 1, 1000)?;
        Ok(())
    }

    /// `maillog_file`: its directory exists, and it is not a directory itself.
    fn check_maillog_file(&self) -> Result<(), ConfigError> {
        let Some(path) = &self.maillog_file else {
            return Ok(());
        };
        let shown = path.display();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if path.file_name().is_none() {
            return Err(bad("maillog_file", shown, "names no file"));
        }
        if !dir.is_dir() {
            return Err(bad(
                "maillog_file",
                shown,
                &format!("its directory {} does not exist", dir.display()),
            ));
        }
        if path.is_dir() {
            return Err(bad("maillog_file", shown, "is a directory"));
        }
        Ok(())
    }

    /// Settings that are valid but probably not what the administrator wants.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if !self.myhostname.contains('.') {
            w.push(format!(
                "myhostname {:?} has no dot: other servers expect a fully qualified name in EHLO and bounces name it; set myhostname = \"mail.example.com\" (or give the host its full name in /etc/hosts: `127.0.1.1 mail.example.com {}`)",
                self.myhostname, self.myhostname
            ));
        }
        // A network this wide holds public addresses by the million (no private range is wider than 10/8 or
        // fc00::/7): every client in it may relay. Said at start and on each reload that takes it.
        for n in &self.mynetworks {
            let wide = match n.addr {
                IpAddr::V4(_) => n.prefix < 8,
                IpAddr::V6(_) => n.prefix < 7,
            };
            if wide {
                w.push(format!(
                    "mynetworks has {n}: every client in it may relay mail through this server to anywhere (an open relay); list your own networks only"
                ));
            }
        }
        // Policy entries that can never apply: a next-hop name no route uses, or a locally delivered domain.
        let hops: Vec<Nexthop> = self
            .transport
            .values()
            .chain(self.relayhost.iter())
            .map(|n| n.clone().with_default_port(self.delivery.smtp_port))
            .collect();
        let local = |d: &str| {
            let d = d.trim_start_matches('.');
            self.mydestination.iter().any(|m| m == d)
                || self.transport.get(d).is_some_and(|t| *t == Nexthop::Local)
        };
        for (table, key) in self
            .smtp_tls_policy
            .keys()
            .map(|k| ("smtp_tls_policy", k))
            .chain(
                self.destination_rate_limit
                    .keys()
                    .map(|k| ("destination_rate_limit", k)),
            )
        {
            let next_hop_form = key.starts_with('[') || key.contains(':');
            if next_hop_form {
                if !hops
                    .iter()
                    .any(|h| h.policy_names().iter().any(|n| n == key))
                {
                    w.push(format!(
                        "[{table}] \"{key}\" matches nothing: no [transport] entry or relayhost is that next hop (a recipient domain is written without brackets or port)"
                    ));
                }
            } else if local(key) {
                w.push(format!(
                    "[{table}] \"{key}\" matches nothing: that domain is delivered locally"
                ));
            } else if !crate::smtp::address::valid_domain(key.trim_start_matches('.'), false) {
                w.push(format!(
                    "[{table}] \"{key}\" matches nothing: not a domain name"
                ));
            }
        }
        for l in &self.listeners {
            if l.kind != ListenerKind::Smtp && self.smtpd_sasl_users_file.is_none() {
                w.push(format!(
                    "listener {} ({:?}) requires AUTH but smtpd_sasl_users_file is empty: it will refuse MAIL with 530 5.7.0",
                    l.address, l.kind
                ));
            }
        }
        if let Some(a) = self.http.listen {
            if let Some(n) = self.http.trusted_networks.iter().find(|n| n.prefix == 0) {
                w.push(format!(
                    "http.trusted_networks has {n}: every client that reaches {a} may inject mail and change the queue without a token"
                ));
            }
        }
        w.extend(self.dnssec_warnings());
        w
    }

    /// `dns.dnssec = "trust-ad"` believes the AD bit of the configured resolvers: only a resolver on this host
    /// (loopback) is reached over a path nobody else can write to.
    fn dnssec_warnings(&self) -> Vec<String> {
        if self.dns.dnssec != crate::dns::Dnssec::TrustAd {
            return Vec::new();
        }
        if self.dns.servers.is_empty() {
            return vec![
                "dns.dnssec = \"trust-ad\" with dns.servers empty: the resolvers of /etc/resolv.conf are trusted to validate, and DANE then trusts the network path to them (an AD bit can be forged on the way); list a validating resolver on this host, e.g. servers = [\"127.0.0.1\"]".into(),
            ];
        }
        self.dns
            .servers
            .iter()
            .filter(|a| !a.ip().is_loopback())
            .map(|a| {
                format!(
                    "dns.dnssec = \"trust-ad\" with the remote resolver {a}: DANE then trusts the network path to it (an AD bit can be forged on the way); use a validating resolver on this host, or a path you trust"
                )
            })
            .collect()
    }

    /// The effective settings, defaults included, as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self)
            .unwrap_or_else(|e| format!("# cannot print configuration: {e}\n"))
    }

    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("test.toml"))
    }

    #[test]
    fn defaults_validate_and_round_trip() {
        let c = Config::default();
        c.validate().unwrap();
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        // The submission listener without a users file; and a host name without a dot, on a host that has one.
        let no_dot = usize::from(!c.myhostname.contains('.'));
        assert_eq!(c.warnings().len(), 1 + no_dot, "{:?}", c.warnings());
        let again = parse(&c.to_toml()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn mydestination_defaults_to_postfixs_and_follows_myhostname() {
        let c = parse("myhostname = \"mx.example.com\"\n").unwrap();
        assert_eq!(
            c.mydestination,
            ["mx.example.com", "localhost.example.com", "localhost"]
        );
        // Postfix's own forms, in any entry; a host name without a dot gives $mydomain "localdomain".
        let c = parse(
            "myhostname = \"Host\"\nmydestination = [\"$myhostname\", \"${mydomain}\", \"mail.$mydomain\", \"localhost\"]\n",
        )
        .unwrap();
        assert_eq!(
            c.mydestination,
            ["host", "localdomain", "mail.localdomain", "localhost"]
        );
        assert!(c.warnings().iter().any(|w| w.contains("has no dot")));
        // The embedded defaults hold the system's name.
        let d = Config::default();
        assert_eq!(d.mydestination[0], d.myhostname.to_ascii_lowercase());
        assert!(d.mydestination.contains(&"localhost".to_string()));
    }

    #[test]
    fn canonical_name_comes_from_etc_hosts() {
        let hosts = "127.0.0.1 localhost\n# 10.0.0.9 box.wrong.example box\n127.0.1.1\tbox.example.org box  # comment\n10.0.0.5 other other.example.net\n";
        assert_eq!(
            canonical_name_in_hosts("box", hosts).as_deref(),
            Some("box.example.org")
        );
        // The canonical name has no dot, an alias extends the name: that alias.
        assert_eq!(
            canonical_name_in_hosts("other", hosts).as_deref(),
            Some("other.example.net")
        );
        assert_eq!(
            canonical_name_in_hosts("BOX", hosts).as_deref(),
            Some("box.example.org")
        );
        assert_eq!(canonical_name_in_hosts("vm", "127.0.0.1 vm\n"), None);
        assert_eq!(canonical_name_in_hosts("nothere", hosts), None);
        // A line that is not a host name is not taken.
        assert_eq!(
            canonical_name_in_hosts("x", "1.2.3.4 x.-bad-.example x\n"),
            None
        );
    }

    #[test]
    fn listener_conflicts_as_the_kernel_sees_them() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(listeners_conflict(a("127.0.0.1:25"), a("127.0.0.1:25")));
        assert!(!listeners_conflict(a("127.0.0.1:25"), a("127.0.0.1:26")));
        assert!(!listeners_conflict(a("127.0.0.1:25"), a("127.0.0.2:25")));
        assert!(listeners_conflict(a("0.0.0.0:25"), a("127.0.0.1:25")));
        assert!(listeners_conflict(a("127.0.0.1:25"), a("0.0.0.0:25")));
        assert!(listeners_conflict(a("[::]:25"), a("127.0.0.1:25")));
        assert!(listeners_conflict(a("[::]:25"), a("0.0.0.0:25")));
        assert!(listeners_conflict(a("[::]:25"), a("[::1]:25")));
        assert!(listeners_conflict(
            a("[::ffff:127.0.0.1]:25"),
            a("127.0.0.1:25")
        ));
        assert!(!listeners_conflict(a("0.0.0.0:25"), a("[::1]:25")));
        assert!(!listeners_conflict(a("[::1]:25"), a("[::2]:25")));
    }

    #[test]
    fn problems_of_meaning_are_all_listed() {
        let text = "[local]\nmailbox_path = \"/var/mail/{dommain}/{user}\"\n[[listener]]\naddress = \"127.0.0.1:2525\"\nkind = \"smtp\"\n[[listener]]\naddress = \"0.0.0.0:2525\"\nkind = \"submission\"\n";
        let text = format!("delay_warning_time = \"6d\"\nmydestination = [\"$myhost\"]\n{text}");
        let e = parse(&text).unwrap_err().to_string();
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines.len(), 4, "{e}");
        assert!(
            e.contains("127.0.0.1:2525") && e.contains("0.0.0.0:2525"),
            "{e}"
        );
        assert!(
            e.contains("{dommain}") && e.contains("known: {user}, {domain}, {home}"),
            "{e}"
        );
        assert!(
            e.contains("\"$myhost\"") && e.contains("$myhostname, $mydomain"),
            "{e}"
        );
        assert!(
            e.contains("delay_warning_time") && e.contains("maximal_queue_lifetime"),
            "{e}"
        );
        assert!(lines.iter().all(|l| l.starts_with("test.toml: ")), "{e}");
        // Unclosed braces are unknown too; "0" for delay_warning_time is what happens anyway.
        let e = parse("[local]\nmailbox_path = \"mail/{user\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown placeholder {user"), "{e}");
        let c = parse("delay_warning_time = \"0s\"\n").unwrap();
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
        // check-config's form: the first bad value and every problem of meaning.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, format!("smtpd_timeout = \"0s\"\n{text}")).unwrap();
        let (_, problems) = Config::load_listing_problems(&p).unwrap();
        assert_eq!(problems.len(), 5, "{problems:?}");
        assert!(problems[0].contains("smtpd_timeout"), "{problems:?}");
    }

    #[test]
    fn client_timeouts_postfix_defaults_and_the_older_key() {
        let t = Config::default().delivery.client_timeouts();
        assert_eq!(t, crate::smtp::client_session::Timeouts::default());
        assert_eq!(t.data_init, Duration::from_secs(120));
        assert_eq!(t.rset, Duration::from_secs(20));
        let c = parse("[delivery]\nsmtp_reply_timeout = \"5s\"\nsmtp_rset_timeout = \"3s\"\nsmtp_data_xfer_timeout = \"1m\"\n").unwrap();
        let t = c.delivery.client_timeouts();
        assert_eq!(
            (t.helo, t.mail, t.rcpt, t.rset, t.data_xfer, t.data_done),
            (
                Duration::from_secs(5),
                Duration::from_secs(5),
                Duration::from_secs(5),
                Duration::from_secs(3),
                Duration::from_secs(60),
                Duration::from_secs(600)
            )
        );
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
        assert!(parse("[delivery]\nsmtp_rcpt_timeout = \"0s\"\n").is_err());
    }

    #[test]
    fn postfix_style_values() {
        let c = parse(
            "myhostname = \"mx.example.com\"\nmynetworks = [\"10.0.0.0/8\", \"[2001:db8::]/32\"]\nsmtpd_timeout = \"5m\"\nmaximal_queue_lifetime = \"2d\"\nmydestination = [\"Example.COM.\"]\n",
        )
        .unwrap();
        assert_eq!(c.smtpd_timeout.0, Duration::from_secs(300));
        assert_eq!(c.maximal_queue_lifetime.0, Duration::from_secs(2 * 86400));
        assert_eq!(c.mydestination, vec!["example.com"]);
        assert!(c.mynetworks[0].contains("10.1.2.3".parse().unwrap()));
        assert!(!c.mynetworks[0].contains("11.1.2.3".parse().unwrap()));
        assert!(c.mynetworks[1].contains("2001:db8::5".parse().unwrap()));
    }

    #[test]
    fn errors_name_key_and_value() {
        let e = parse("no_such_key = 1\n").unwrap_err().to_string();
        assert!(e.contains("no_such_key"), "{e}");
        let e = parse("smtpd_timeout = \"5x\"\n").unwrap_err().to_string();
        assert!(e.contains("smtpd_timeout") && e.contains("5x"), "{e}");
        let e = parse("mynetworks = [\"10.0.0.0/33\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mynetworks") && e.contains("10.0.0.0/33"), "{e}");
        let e = parse("message_size_limit = 100000000\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("queue_segment_size"), "{e}");
        let e = parse("[[listener]]\naddress = \"127.0.0.1:25\"\nkind = \"smtps\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("smtps"), "{e}");
    }

    /// Values that passed check-config before and then panicked or wrapped at run time (Instant overflow,
    /// a 2 TB allocation, every deferral bouncing at once, a segment size the store refuses) are errors now,
    /// naming the key.
    #[test]
    fn hostile_values_are_refused_at_load() {
        let max = u64::MAX;
        for (text, key) in [
            (format!("smtpd_timeout = {max}\n"), "smtpd_timeout"),
            (format!("shutdown_timeout = {max}\n"), "shutdown_timeout"),
            (
                format!("[delivery]\ndestination_backoff_time = {}\n", i64::MAX),
                "delivery.destination_backoff_time",
            ),
            (
                "line_length_limit = 1000000000000\n".to_string(),
                "line_length_limit",
            ),
            (
                format!("maximal_queue_lifetime = \"{}w\"\n", max / 604800),
                "maximal_queue_lifetime",
            ),
            (
                "queue_segment_size = 67108868\n".to_string(),
                "queue_segment_size",
            ),
            ("smtpd_timeout = \"0s\"\n".to_string(), "smtpd_timeout"),
            (
                "smtp_line_length_limit = 10\n".to_string(),
                "smtp_line_length_limit",
            ),
            (
                "smtpd_min_data_rate = 0\n".to_string(),
                "smtpd_min_data_rate",
            ),
            (
                "[dns]\ntimeout_ms = 100000000\n".to_string(),
                "dns.timeout_ms",
            ),
            (
                // Parsed into a Rate at load: TOML's error names the line and the key.
                "[delivery]\ndefault_destination_rate_limit = \"0.0000001/s\"\n".to_string(),
                "rate out of range",
            ),
            ("shards = 100000\n".to_string(), "shards"),
            (
                "queue_commit_delay_us = 10001\n".to_string(),
                "queue_commit_delay_us",
            ),
            // Typed at load: a path with a NUL byte, next hops that are not one.
            (
                "smtpd_sasl_users_file = \"/etc/x\\u0000/../shadow\"\n".to_string(),
                "NUL byte",
            ),
            ("relayhost = \"[x\"\n".to_string(), "not a next hop"),
            (
                "relayhost = \"[127.0.0.1]:99999\"\n".to_string(),
                "not a next hop",
            ),
            (
                "[transport]\n\"a.example\" = \"host with space\"\n".to_string(),
                "not a next hop",
            ),
        ] {
            let e = parse(&text).expect_err(&text).to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
        // The limits themselves are fine.
        parse("smtpd_timeout = \"1h\"\nmaximal_queue_lifetime = \"100d\"\nsmtp_line_length_limit = 0\n").unwrap();
    }

    #[test]
    fn policy_entries_that_match_nothing_are_warned_about() {
        let c = parse(
            "mydestination = [\"localhost\"]\n[transport]\n\"routed.test\" = \"[10.0.0.5]:2525\"\n[smtp_tls_policy]\n\"Bank.Example\" = \"verify\"\n\"[10.0.0.5]:2525\" = \"encrypt\"\n\"[10.0.0.6]\" = \"encrypt\"\n\"localhost\" = \"encrypt\"\n[destination_rate_limit]\n\"big.example\" = \"10/s\"\n",
        )
        .unwrap();
        assert!(c.smtp_tls_policy.contains_key("bank.example"));
        let w = c.warnings().join("\n");
        assert!(w.contains("\"[10.0.0.6]\" matches nothing"), "{w}");
        assert!(w.contains("\"localhost\" matches nothing"), "{w}");
        assert!(!w.contains("bank.example"), "{w}");
        assert!(!w.contains("[10.0.0.5]:2525"), "{w}");
        assert!(!w.contains("big.example"), "{w}");
    }

    #[test]
    fn trust_ad_with_a_remote_or_unnamed_resolver_is_warned_about() {
        let warned = |c: &Config| {
            c.warnings()
                .iter()
                .filter(|w| w.contains("trust-ad"))
                .count()
        };
        let c = parse("[dns]\ndnssec = \"trust-ad\"\nservers = [\"127.0.0.1\", \"[::1]:53\"]\n")
            .unwrap();
        assert_eq!(warned(&c), 0, "{:?}", c.warnings());
        let c = parse("[dns]\ndnssec = \"trust-ad\"\nservers = [\"127.0.0.1\", \"192.0.2.53\"]\n")
            .unwrap();
        assert_eq!(warned(&c), 1, "{:?}", c.warnings());
        assert!(c.warnings().iter().any(|w| w.contains("192.0.2.53")));
        let c = parse("[dns]\ndnssec = \"trust-ad\"\n").unwrap();
        assert_eq!(warned(&c), 1, "{:?}", c.warnings());
        assert!(c.warnings().iter().any(|w| w.contains("resolv.conf")));
        assert!(
            c.problems().iter().all(|p| !p.contains("resolv.conf")),
            "a warning, not an error"
        );
        // Without trust-ad nothing is trusted, nothing to say.
        let c = parse("[dns]\nservers = [\"192.0.2.53\"]\n").unwrap();
        assert_eq!(warned(&c), 0, "{:?}", c.warnings());
    }

    #[test]
    fn http_section_loads_validates_and_prints() {
        let c = Config::default();
        assert_eq!(c.http.listen, None);
        assert!(c.to_toml().contains("[http]"), "{}", c.to_toml());
        let c = parse(
            "[http]\nlisten = \"127.0.0.1:8025\"\ntrusted_networks = [\"10.0.0.0/8\", \"::1/128\"]\napi_token_file = \"/etc/shardmta/tokens\"\n",
        )
        .unwrap();
        assert_eq!(c.http.listen, Some("127.0.0.1:8025".parse().unwrap()));
        assert!(c.http.trusted_networks[0].contains("10.1.2.3".parse().unwrap()));
        assert_eq!(
            c.http.api_token_file.as_deref(),
            Some(Path::new("/etc/shardmta/tokens"))
        );
        let text = c.to_toml();
        assert!(text.contains("listen = \"127.0.0.1:8025\""), "{text}");
        assert_eq!(parse(&text).unwrap(), c);
        for (bad_text, key) in [
            ("[http]\nlisten = \"localhost\"\n", "not a socket address"),
            ("[http]\nlisten = \"127.0.0.1:0\"\n", "http.listen"),
            (
                "[http]\ntrusted_networks = [\"10.0.0.0/40\"]\n",
                "10.0.0.0/40",
            ),
            ("[http]\napi_token_file = \"a\\u0000b\"\n", "NUL byte"),
            ("[http]\nport = 8025\n", "port"),
        ] {
            let e = parse(bad_text).expect_err(bad_text).to_string();
            assert!(e.contains(key), "{bad_text}: {e}");
        }
        for (networks, open_relay) in [
            ("[\"0.0.0.0/0\"]", true),
            ("[\"10.0.0.0/8\", \"0.0.0.0/1\"]", true),
            ("[\"::/0\"]", true),
            ("[\"10.0.0.0/8\", \"192.168.0.0/16\", \"fc00::/7\"]", false),
        ] {
            let c = parse(&format!("mynetworks = {networks}\n")).unwrap();
            assert_eq!(
                c.warnings().iter().any(|w| w.contains("open relay")),
                open_relay,
                "{networks}: {:?}",
                c.warnings()
            );
        }
        let open = parse("[http]\nlisten = \"0.0.0.0:8025\"\ntrusted_networks = [\"0.0.0.0/0\"]\n")
            .unwrap();
        assert!(open
            .warnings()
            .iter()
            .any(|w| w.contains("without a token")));
    }

    #[test]
    fn event_log_keys_are_checked() {
        let c = parse("").unwrap();
        assert_eq!(c.maillog_file, None);
        assert_eq!(c.log_format, crate::eventlog::LogFormat::Text);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("shardmta.log");
        let c = parse(&format!(
            "maillog_file = \"{}\"\nlog_format = \"json\"\n",
            file.display()
        ))
        .unwrap();
        assert_eq!(c.maillog_file.as_deref(), Some(file.as_path()));
        assert_eq!(c.log_format, crate::eventlog::LogFormat::Json);
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
        for (text, says) in [
            ("log_format = \"xml\"\n".to_string(), "unknown variant"),
            (
                format!(
                    "maillog_file = \"{}/no/such/dir/x.log\"\n",
                    dir.path().display()
                ),
                "does not exist",
            ),
            (
                format!("maillog_file = \"{}\"\n", dir.path().display()),
                "is a directory",
            ),
        ] {
            let e = parse(&text).expect_err(&text).to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn cidr_matching() {
        let c: Cidr = "127.0.0.0/8".parse().unwrap();
        assert!(c.contains("127.9.9.9".parse().unwrap()));
        assert!(c.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!c.contains("128.0.0.1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
    }
}
