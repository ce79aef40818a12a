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
//! - [`server`]: the shards (one glommio executor per core), listeners and the I/O around each session.
//! - [`net`]: a connection that is plaintext or TLS (`MaybeTls`), shared by the server, the outbound client and
//!   the load tester, and how such a connection ends at the TCP level.
//! - [`dns`]: MX and address resolution for delivery, one resolver per shard, with its bounded cache (the
//!   test responder `dns::testserver` only in test builds and with the `test-support` feature).
//! - [`delivery`]: outbound delivery: routing, the per-shard dispatcher, SMTP delivery agents, bounces (DSN)
//!   and the delivery log.
//! - [`local`]: local delivery for `mydestination`: recipient tables, symlink-safe Maildir writing and the
//!   local-delivery shard.
//! - [`sendmail`]: the `shardmta sendmail` command (sendmail(8) interface over SMTP on loopback).
//! - `fuzzing` (hidden): the fuzz targets' entry points and invariants, shared by `fuzz/` and the corpus replay test.

pub mod anvil;
pub mod auth;
pub mod buffers;
pub mod config;
pub mod delivery;
pub mod dns;
#[doc(hidden)]
pub mod fuzzing;
pub mod limits;
pub mod local;
pub mod net;
pub mod policy;
pub mod privileges;
pub mod queue;
pub mod sendmail;
pub mod server;
pub mod sessions;
pub mod smtp;
pub mod spool;
pub mod tls;
