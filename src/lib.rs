//! shardmta: a thread-per-core outbound mail relay and smarthost.
//!
//! Layout (data flows one way: session -> queue -> router -> domain shard -> delivery -> completion record):
//! - [`limits`]: every fixed bound (buffer sizes, queue lengths, counts, intervals) and their relations, checked at
//!   compile time.
//! - [`config`]: Postfix-named settings from TOML, with the embedded defaults.
//! - [`smtp`]: the sans-IO SMTP engine (addresses, commands, replies, DATA decoding, the session state machine).
//! - [`policy`]: relay policy (mydestination, relay_domains, mynetworks, authenticated clients).
//! - [`queue`]: per-shard memory-mapped append-only segments, group commit, recovery and compaction.
//! - [`anvil`]: per-client-address AUTH failure counts, delays and lockouts, shared by all shards.
//! - [`sessions`]: a shard's open sessions: admission limits, per-request deadlines, stress, the reaper.
//! - [`auth`]: the users file and password verification for AUTH PLAIN/LOGIN.
//! - [`buffers`]: a shard's free list of session read buffers.
//! - [`spool`]: symlink-safe access to the spool's own files, ownership and mode checks, `corrupt/`.
//! - [`tls`]: rustls server configuration and the first-start self-signed certificate.
//! - [`privileges`]: `mail_owner`: listeners bound and keys read as root, then the switch to no privileges.
//! - [`reloadable`]: the settings that change without a restart (SIGHUP, `shardmta reload`): the snapshot shards
//!   read with one atomic load, how a reload reads and checks files before anything changes, what needs a restart.
//! - [`sd_notify`]: systemd's readiness, reload and stop notifications (`Type=notify`).
//! - [`control`]: the control plane of a running server: queue changes, injection and health as values, carried
//!   to the shards that act on them.
//! - [`http`]: the HTTP API and Prometheus metrics on their own executor (TCP `[http] listen` and the control
//!   socket), the JSON forms of injections, the scrape's merge of the shards' counters.
//! - [`shaping`]: traffic shaping: sites, the per-provider limits of the shaping file and its built-in defaults,
//!   and the automation that suspends or slows a site on its throttle replies.
//! - [`server`]: the process: privileged preparation, the shared state, starting the shards, stats, reloads.
//! - [`shard`]: one shard's context and life; its runtime (executors, placement, ready handshake, signals), the
//!   mesh (jobs and outcomes between shards), destination ownership, per-shard counters.
//! - [`inbound`]: a shard's SMTP side: accept, admission, the I/O loop around each session, enqueue, drain.
//! - [`delivery`]: from a durable message to delivered, deferred or bounced recipients (dispatcher, agent,
//!   outbound connections, DSNs, the delivery log).
//! - [`dkim`]: DKIM signing at acceptance (relaxed/relaxed, rsa-sha256 and ed25519-sha256 on ring), the keys of
//!   `[[dkim]]` and `dkim keygen`.
//! - [`eventlog`]: the event log (maillog): connections, rejections, receptions, deliveries, expiry, bounces,
//!   queue changes, as Postfix-like text or JSON lines to stderr or a file, reopened on SIGUSR1/SIGHUP.
//! - [`nexthop`]: where one domain's mail goes (`[host]:port`, `host:port`, `local`), parsed at load.
//! - [`dns`]: MX and address resolution for delivery, one resolver per shard, with its bounded cache (the
//!   test responder `dns::testserver` only in test builds and with the `test-support` feature).
//! - [`local`]: local delivery to Maildirs: recipient tables, safe paths, the local-delivery shard.
//! - [`net`]: a plaintext-or-TLS connection and the socket helpers the server, client and sink share.
//! - [`sendmail`]: the sendmail(8) interface for applications.
//! - `fuzzing` (hidden): the fuzz targets' entry points and invariants, shared by `fuzz/` and the corpus replay test.

pub mod anvil;
pub mod auth;
pub mod buffers;
pub mod cluster;
pub mod config;
pub mod control;
pub mod dane;
pub mod delivery;
pub mod dkim;
pub mod dns;
pub mod egress;
pub mod eventlog;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod inbound;
pub mod limits;
pub mod local;
pub mod mta_sts;
pub mod net;
pub mod nexthop;
pub mod policy;
pub mod privileges;
pub mod queue;
pub mod reloadable;
pub mod sd_notify;
pub mod sendmail;
pub mod server;
pub mod sessions;
pub mod shaping;
pub mod shard;
pub mod smtp;
pub mod spool;
pub mod suppression;
pub mod tls;
