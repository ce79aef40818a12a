//! The delivery log: one JSON line per recipient per delivery attempt, appended to one file by every shard.
//! Lines are buffered per shard and written with one `write` (O_APPEND) per flush on a helper thread, so the
//! reactor never blocks on the file and lines from different shards never interleave. Each attempt is also
//! one `delivery` event of the event log ([`crate::eventlog`]).
//!
//! `result` is `delivered`, `deferred`, `bounced`, `postponed` (not attempted: the destination's queue was
//! full), or `expired`: deferred again after the message's queue lifetime, so the recipient bounces with 4.4.7
//! (the same rule and time as the queue's record: [`super::plan::Policy::expires_at_ms`]). An expired
//! recipient's last line therefore says `expired`, never `deferred`. A deferral, expiry or bounce also names its
//! bounce `class` ([`super::bounce_class`]).
//!
//! `tls_policy` names the TLS policy applied to the attempt (`none`, `may`, `encrypt`, `verify`, `dane`,
//! `dane-only`, `mta-sts-testing`, `mta-sts-enforce`; see `delivery::secure`), absent when no host was tried;
//! `tls_policy_failure` says, in MTA-STS testing mode, what enforce would have refused. `source` names the
//! egress source the connection was bound to (`crate::egress`), when the message went through a pool.

use std::cell::RefCell;
use std::fs::File;
use std::io::Write;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{plan, Job, RcptResult};
use crate::eventlog::{self, Relay, Status};
use crate::nexthop::Nexthop;

/// Flush interval; also flushed when the buffer passes `FLUSH_BYTES`.
const FLUSH_EVERY: Duration = Duration::from_millis(200);
const FLUSH_BYTES: usize = 256 * 1024;
/// Past this much unwritten log (a stuck disk), new lines are dropped and counted.
const BUFFER_BYTES_MAX: usize = 16 << 20;

/// What is known of the host an attempt reached (all `None` when none was: a DNS failure, a backoff, local
/// delivery).
#[derive(Debug, Clone, Copy, Default)]
pub struct AttemptedHost<'a> {
    pub host: Option<&'a str>,
    pub ip: Option<IpAddr>,
    /// The TLS version and cipher, when the session was encrypted.
    pub tls: Option<&'a str>,
    /// The TLS policy applied (`none`, `may`, `encrypt`, `verify`, `dane`, `dane-only`, `mta-sts-testing`,
    /// `mta-sts-enforce`; see `delivery::secure`).
    pub tls_policy: Option<&'a str>,
    /// MTA-STS testing: what `enforce` would have refused (the mail went anyway).
    pub tls_policy_failure: Option<&'a str>,
    /// Under a policy TLS-RPT covers (DANE, MTA-STS): `success` or the RFC 8460 result type of the failure
    /// ([`super::tls_rpt`]).
    pub tls_result: Option<&'static str>,
    /// The egress source the connection was bound to (`crate::egress`), when the message has a pool.
    pub source: Option<&'a str>,
}

pub struct DeliveryLog {
    /// The queue lifetimes: a deferral past them is logged as `expired`.
    expiry: plan::Policy,
    file: Option<Arc<File>>,
    buf: RefCell<Vec<u8>>,
    dropped: std::cell::Cell<u64>,
}

/// One attempt's outcome for one recipient.
#[derive(serde::Serialize)]
pub struct LogLine<'a> {
    pub ts: f64,
    pub queue_id: String,
    pub rcpt: &'a str,
    pub result: &'static str,
    pub destination: &'a str,
    pub host: Option<&'a str>,
    pub ip: Option<String>,
    pub tls: Option<&'a str>,
    pub reply: &'a str,
    /// The bounce class of a deferral or bounce ([`super::bounce_class`]); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<&'static str>,
    pub delay_s: f64,
    pub attempt: u32,
    /// The TLS policy applied: `none`, `may`, `encrypt`, `verify`, `dane`, `dane-only`, `mta-sts-testing`,
    /// `mta-sts-enforce` (absent when no host was tried, e.g. a DNS failure or a backoff).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_policy: Option<&'a str>,
    /// MTA-STS testing: what `enforce` would have refused (the mail went anyway).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_policy_failure: Option<&'a str>,
    /// TLS-RPT (RFC 8460): `success` or the failure's result type, under DANE or MTA-STS only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_result: Option<&'static str>,
    /// The egress source used (`crate::egress`), when the message went through a pool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<&'a str>,
}

impl DeliveryLog {
    /// Opens (creating, 0600) the log at `path` for appending, never through a symlink: its directory must
    /// belong to the server's user and not be writable by others (see [`crate::spool`]).
    pub fn open(path: &std::path::Path, expiry: plan::Policy) -> DeliveryLog {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => std::path::Path::new("."),
        };
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("delivery.log");
        let file = crate::spool::Dir::open_root(parent)
            .and_then(|d| d.open_append(name))
            .map_err(
                |e| tracing::error!(target: eventlog::QMGR, "delivery log {}: {e}", path.display()),
            )
            .ok();
        DeliveryLog {
            expiry,
            file: file.map(Arc::new),
            buf: RefCell::new(Vec::with_capacity(64 * 1024)),
            dropped: Default::default(),
        }
    }

    pub fn record(&self, line: &LogLine<'_>) {
        let mut buf = self.buf.borrow_mut();
        if self.file.is_none() || buf.len() > BUFFER_BYTES_MAX {
            self.dropped.set(self.dropped.get() + 1);
            return;
        }
        if serde_json::to_writer(&mut *buf, line).is_ok() {
            buf.push(b'\n');
        }
    }

    /// One line per result of `job` (`destination` is the next hop's key, or "local"), in this log and in the
    /// event log, with what is known of the host tried (`attempt`). Returns the attempt's time (unix ms), for
    /// the outcome ([`super::Outcome::attempted_unix_ms`]).
    pub fn record_job(
        &self,
        job: &Job,
        results: &[(u32, RcptResult)],
        destination: &str,
        attempt: &AttemptedHost<'_>,
    ) -> u64 {
        let AttemptedHost {
            host,
            ip,
            tls,
            tls_policy,
            tls_policy_failure,
            tls_result,
            source,
        } = *attempt;
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let at_ms = at.as_millis() as u64;
        let now = at.as_secs_f64();
        let expired = at_ms >= self.expiry.expires_at_ms(&job.sender, job.arrival_unix_ms);
        let relay = match (&job.nexthop, host, ip) {
            (Nexthop::Local, _, _) => Relay::Local,
            (hop, Some(host), Some(ip)) => Relay::Host {
                host,
                ip,
                port: match hop {
                    Nexthop::Mx { port, .. } | Nexthop::Host { port, .. } => Some(*port),
                    Nexthop::Local => None,
                },
            },
            _ => Relay::None,
        };
        let delay_s = (now - job.arrival_unix_ms as f64 / 1000.0).max(0.0);
        // Taken from the process-wide slot only when a result is a failure (a delivered job never reads it).
        let classifier = std::cell::OnceCell::new();
        for (idx, r) in results {
            let Some(rc) = job.rcpts.iter().find(|x| x.index == *idx) else {
                continue;
            };
            let class = match r {
                RcptResult::Deferred { reply } | RcptResult::Bounced { reply, .. } => Some(
                    classifier
                        .get_or_init(super::bounce_class::current)
                        .classify(reply)
                        .name(),
                ),
                RcptResult::Delivered { .. } | RcptResult::Postponed { .. } => None,
            };
            let status = match r {
                RcptResult::Delivered { .. } => Some(Status::Sent),
                RcptResult::Deferred { .. } if expired => Some(Status::Expired {
                    returned: !job.sender.is_empty(),
                }),
                RcptResult::Deferred { .. } => Some(Status::Deferred),
                RcptResult::Bounced { .. } => Some(Status::Bounced),
                // Not an attempt: no event (a full destination offers it again every second).
                RcptResult::Postponed { .. } => None,
            };
            if let Some(status) = status {
                eventlog::delivery(&eventlog::Attempt {
                    queue_id: job.id,
                    rcpt: &rc.address,
                    relay,
                    delay_s,
                    attempt: rc.attempts + 1,
                    status,
                    reply: r.reply(),
                    tls,
                    tls_policy,
                    class,
                    source,
                });
            }
            self.record(&LogLine {
                ts: now,
                queue_id: job.id.to_string(),
                rcpt: &rc.address,
                result: match r {
                    RcptResult::Delivered { .. } => "delivered",
                    RcptResult::Deferred { .. } if expired => "expired",
                    RcptResult::Deferred { .. } => "deferred",
                    RcptResult::Bounced { .. } => "bounced",
                    RcptResult::Postponed { .. } => "postponed",
                },
                destination,
                host,
                ip: ip.map(|i| i.to_string()),
                tls,
                reply: r.reply(),
                class,
                delay_s,
                attempt: rc.attempts + 1,
                tls_policy,
                tls_policy_failure,
                tls_result,
                source,
            });
        }
        at_ms
    }

    /// One line for a recipient the suppression list stopped before routing ([`crate::suppression`]): result
    /// `bounced`, destination `suppressed`, class `suppressed`, no host. Returns the time (unix ms).
    pub fn record_suppressed(
        &self,
        id: crate::queue::QueueId,
        rcpt: &str,
        reply: &str,
        arrival_unix_ms: u64,
        attempt: u32,
    ) -> u64 {
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let now = at.as_secs_f64();
        let delay_s = (now - arrival_unix_ms as f64 / 1000.0).max(0.0);
        eventlog::delivery(&eventlog::Attempt {
            queue_id: id,
            rcpt,
            relay: Relay::None,
            delay_s,
            attempt,
            status: Status::Bounced,
            reply,
            tls: None,
            tls_policy: None,
            class: Some("suppressed"),
            source: None,
        });
        self.record(&LogLine {
            ts: now,
            queue_id: id.to_string(),
            rcpt,
            result: "bounced",
            destination: "suppressed",
            host: None,
            ip: None,
            tls: None,
            reply,
            class: Some("suppressed"),
            delay_s,
            attempt,
            tls_policy: None,
            tls_policy_failure: None,
            tls_result: None,
            source: None,
        });
        at.as_millis() as u64
    }

    /// The flush task: runs until the executor ends.
    pub async fn run(self: Rc<Self>) {
        loop {
            glommio::timer::sleep(FLUSH_EVERY).await;
            self.flush().await;
        }
    }

    pub async fn flush(&self) {
        let Some(file) = self.file.clone() else {
            return;
        };
        let cap = self.buf.borrow().capacity().min(FLUSH_BYTES);
        let data = std::mem::replace(&mut *self.buf.borrow_mut(), Vec::with_capacity(cap));
        if data.is_empty() {
            return;
        }
        let _ = glommio::executor()
            .spawn_blocking(move || (&*file).write_all(&data))
            .await;
    }
}
