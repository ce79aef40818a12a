//! Outbound delivery: from a durable queued message to a delivered, deferred or bounced recipient.
//!
//! Data flow (one way): the accepting shard's [`dispatcher::Dispatcher`] groups a message's open recipients by
//! next hop ([`route::Router`]) and hands each group, as a [`Job`] holding a shared handle to the body in the
//! accepting shard's segment mapping, to the shard that owns the destination ([`crate::shard::owner::owner_of`]; the same
//! shard takes no channel hop). That shard's [`agent::Agent`] keeps one queue, connection pool and limits per
//! destination, delivers over pooled connections ([`outbound`]: a socket pump driving
//! [`crate::smtp::client_session`]) and sends each [`Outcome`] back; every failure on the way is classified
//! once, by [`trouble`]. The accepting shard turns the outcome into progress records and a bounce decision
//! ([`plan`], a pure function), schedules retries with backoff and writes bounces ([`dsn`]).

pub mod admin;
pub mod agent;
pub mod bounce_class;
pub mod dispatcher;
pub mod dsn;
pub mod log;
pub mod outbound;
pub mod plan;
pub mod route;
pub mod secure;
pub mod tls_rpt;
pub mod trouble;

use std::time::Duration;

use crate::queue::{MessageBody, QueueId};
use crate::smtp::reply_parser::EnhancedCode;
use route::Nexthop;

/// One recipient of a job.
#[derive(Debug, Clone)]
pub struct JobRcpt {
    /// Index in the message's recipient list (for the progress record).
    pub index: u32,
    pub address: String,
    /// Attempts made before this one.
    pub attempts: u32,
    /// DSN `NOTIFY=`/`ORCPT=` (RFC 3461), passed to a next hop that offers DSN.
    pub dsn: crate::smtp::dsn::RcptDsn,
}

/// Recipients of one message for one destination, sent from the accepting shard to the owning shard.
#[derive(Debug, Clone)]
pub struct Job {
    pub origin_shard: usize,
    pub id: QueueId,
    pub sender: String,
    pub rcpts: Vec<JobRcpt>,
    pub body: MessageBody,
    pub smtputf8: bool,
    pub eight_bit: bool,
    pub arrival_unix_ms: u64,
    pub nexthop: Nexthop,
    /// The recipient domain's policy key (`[smtp_tls_policy]`, `[destination_rate_limit]`), when it has one.
    pub policy: Option<String>,
    /// DSN `RET=` and `ENVID=` (decoded), passed to a next hop that offers DSN.
    pub dsn_ret: Option<crate::smtp::dsn::Ret>,
    pub dsn_envid: Option<String>,
    /// The site (MX host set) of an MX-routed domain, once the domain's owner has looked it up; the job then
    /// goes to the site's owner (`shard::owner::owner_of_site`). `None`: the destination is the next hop.
    pub site: Option<std::sync::Arc<Site>>,
    /// The message's own egress pool (`crate::egress`), if it has one; the owner shard chooses the source.
    pub egress_pool: Option<String>,
    /// The egress source chosen for this attempt and the UTC day its warm-up count was taken on (set by the
    /// owner when it counts the message; given back when the job is not sent after all).
    pub warmup_counted: Option<(usize, i64)>,
}

/// A site: the destination of the MX-routed domains that share an MX host set, or a provider's MX hosts (see
/// `agent` and `crate::shaping`).
#[derive(Debug, PartialEq, Eq)]
pub struct Site {
    /// `site:<name>:<port>`, plus ` for <domain>` for a domain with a shaping entry of its own: the
    /// destination key, hashed to the site's owner. `<name>` is the shaping rules' site name: a provider's
    /// (`google`), else the MX host names sorted and joined with `,`.
    pub key: String,
    /// The MX host names the domain's owner resolved.
    pub mx_hosts: Vec<String>,
}

impl Job {
    pub fn size(&self) -> u64 {
        (self.body.received.len() + self.body.data.len()) as u64
    }
}

/// What happened to one recipient in one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptResult {
    Delivered {
        reply: String,
    },
    Deferred {
        reply: String,
    },
    /// `status` is the enhanced status code for the DSN.
    Bounced {
        reply: String,
        status: EnhancedCode,
    },
    /// Not attempted: the destination's queue was full. Nothing is recorded and no attempt is counted; the
    /// accepting shard offers the recipient again shortly (as Postfix leaves a message in the queue while a
    /// destination's in-memory limit is reached).
    Postponed {
        reply: String,
    },
}

impl RcptResult {
    pub fn reply(&self) -> &str {
        match self {
            RcptResult::Delivered { reply }
            | RcptResult::Deferred { reply }
            | RcptResult::Postponed { reply }
            | RcptResult::Bounced { reply, .. } => reply,
        }
    }
}

/// Results of one job, sent back to the accepting shard.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub id: QueueId,
    /// (recipient index, result); every recipient of the job appears once.
    pub results: Vec<(u32, RcptResult)>,
    /// The remote host that answered (for the DSN's Remote-MTA), if any.
    pub remote: Option<String>,
    /// When the results were decided (unix ms): the time the plan applies them at, the same the delivery logs
    /// used to say whether a deferred recipient expired.
    pub attempted_unix_ms: u64,
    /// The next hop offered DSN and was given the DSN parameters: it reports success itself, so no "relayed"
    /// report is made here (RFC 3461 5.2). False for local delivery and for hosts without DSN.
    pub next_hop_dsn: bool,
    /// Shaping's retry delays for the destination's site (`retry_interval`, `max_retry_interval` of
    /// `crate::shaping`), when a rule sets them: they replace `minimal_backoff_time` and `maximal_backoff_time`
    /// for this outcome's deferrals. None: the configuration's.
    pub retry: Option<(Duration, Duration)>,
}

/// Messages between shards.
#[derive(Debug)]
pub enum ShardMsg {
    Job(Box<Job>),
    Outcome(Outcome),
}

/// Delay before attempt `attempts + 1` (Postfix-like): doubles from `min` and is capped at `max`.
pub fn backoff(attempts: u32, min: Duration, max: Duration) -> Duration {
    let factor = 1u32
        .checked_shl(attempts.saturating_sub(1).min(30))
        .unwrap_or(u32::MAX);
    min.saturating_mul(factor).clamp(min, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let (min, max) = (Duration::from_secs(300), Duration::from_secs(4000));
        assert_eq!(backoff(1, min, max), min);
        assert_eq!(backoff(2, min, max), Duration::from_secs(600));
        assert_eq!(backoff(4, min, max), Duration::from_secs(2400));
        assert_eq!(backoff(5, min, max), max);
        assert_eq!(backoff(200, min, max), max);
    }
}
