//! What one delivery outcome means for the queue, as a pure function: from the recipients' current states, the
//! envelope, the job's results, the time and the retry policy to a [`Plan`] (the new state and diagnostic of
//! each recipient, the recipients to report in a bounce, and whether a bounce is sent at all). No queue, no
//! clock, no I/O: the dispatcher applies the plan ([`super::dispatcher`]).
//!
//! Rules (Postfix-like): a delivered or bounced result is final; a deferral schedules the next attempt with
//! backoff, unless the message has been queued longer than `maximal_queue_lifetime` (`bounce_queue_lifetime`
//! for a bounce), when the recipient bounces with 4.4.7; results for recipients already final, or unknown,
//! are ignored; failed recipients of a message with the null sender get no DSN (no bounce of a bounce): they
//! are dropped and logged.

use std::time::Duration;

use super::{backoff, RcptResult};
use crate::queue::{Envelope, RcptState};
use crate::smtp::reply_parser::EnhancedCode;

/// The retry and expiry policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub maximal_queue_lifetime: Duration,
    pub bounce_queue_lifetime: Duration,
    pub minimal_backoff_time: Duration,
    pub maximal_backoff_time: Duration,
}

impl Policy {
    pub fn from_config(cfg: &crate::config::Config) -> Policy {
        Policy {
            maximal_queue_lifetime: cfg.maximal_queue_lifetime.0,
            bounce_queue_lifetime: cfg.bounce_queue_lifetime.0,
            minimal_backoff_time: cfg.minimal_backoff_time.0,
            maximal_backoff_time: cfg.maximal_backoff_time.0,
        }
    }

    /// When a message from `sender` (empty: the null sender, i.e. a bounce) that arrived at `arrival_unix_ms`
    /// expires: a deferral at or after this time (unix ms) bounces it. The delivery logs decide "expired" with
    /// the same rule and the same attempt time ([`super::Outcome::attempted_unix_ms`]), so their line and the
    /// recipient's recorded state agree.
    pub fn expires_at_ms(&self, sender: &str, arrival_unix_ms: u64) -> u64 {
        let lifetime = if sender.is_empty() {
            self.bounce_queue_lifetime
        } else {
            self.maximal_queue_lifetime
        };
        arrival_unix_ms.saturating_add(ms(lifetime))
    }
}

/// A recipient to report as failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    pub index: u32,
    pub address: String,
    pub status: EnhancedCode,
    pub diagnostic: String,
}

/// Whether the failed recipients are reported to the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BounceDecision {
    /// Nothing failed.
    None,
    /// A DSN to the envelope sender.
    Send,
    /// The sender is null (the message is itself a bounce): no DSN, the failure is logged only.
    Drop,
}

/// What an outcome writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// (recipient index, new state, diagnostic), in the order of the results.
    pub updates: Vec<(u32, RcptState, String)>,
    pub failed: Vec<Failed>,
    /// Some recipient bounced because the message expired (the DSN says so).
    pub expired: bool,
    pub bounce: BounceDecision,
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// The plan for `results` of a message in `states` (one per recipient of `env`) at `now_ms`.
pub fn plan(
    states: &[RcptState],
    env: &Envelope,
    results: &[(u32, RcptResult)],
    now_ms: u64,
    policy: &Policy,
) -> Plan {
    let expires = policy.expires_at_ms(&env.sender, env.arrival_unix_ms);
    let mut p = Plan {
        updates: Vec::with_capacity(results.len()),
        failed: Vec::new(),
        expired: false,
        bounce: BounceDecision::None,
    };
    for (idx, r) in results {
        let (Some(prev), Some(addr)) =
            (states.get(*idx as usize), env.recipients.get(*idx as usize))
        else {
            continue;
        };
        if prev.is_final() {
            continue;
        }
        match r {
            RcptResult::Delivered { reply } => {
                p.updates.push((*idx, RcptState::Delivered, reply.clone()))
            }
            RcptResult::Bounced { reply, status } => {
                p.updates.push((*idx, RcptState::Bounced, reply.clone()));
                p.failed.push(Failed {
                    index: *idx,
                    address: addr.clone(),
                    status: *status,
                    diagnostic: reply.clone(),
                });
            }
            // Not attempted: nothing to record; the dispatcher offers the recipient again shortly.
            RcptResult::Postponed { .. } => {}
            RcptResult::Deferred { reply } => {
                let attempts = match prev {
                    RcptState::Deferred { attempts, .. } => attempts.saturating_add(1),
                    _ => 1,
                };
                if now_ms >= expires {
                    p.expired = true;
                    let why = format!("4.4.7 delivery time expired; last error: {reply}");
                    p.updates.push((*idx, RcptState::Bounced, why.clone()));
                    p.failed.push(Failed {
                        index: *idx,
                        address: addr.clone(),
                        status: EnhancedCode::new(4, 4, 7),
                        diagnostic: why,
                    });
                } else {
                    let next = now_ms.saturating_add(ms(backoff(
                        attempts,
                        policy.minimal_backoff_time,
                        policy.maximal_backoff_time,
                    )));
                    p.updates.push((
                        *idx,
                        RcptState::Deferred {
                            next_attempt_unix_s: next.div_ceil(1000),
                            attempts,
                        },
                        reply.clone(),
                    ));
                }
            }
        }
    }
    p.bounce = match (p.failed.is_empty(), env.sender.is_empty()) {
        (true, _) => BounceDecision::None,
        (false, false) => BounceDecision::Send,
        (false, true) => BounceDecision::Drop,
    };
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_MS: u64 = 86_400_000;

    fn policy() -> Policy {
        Policy {
            maximal_queue_lifetime: Duration::from_secs(5 * 86_400),
            bounce_queue_lifetime: Duration::from_secs(86_400),
            minimal_backoff_time: Duration::from_secs(300),
            maximal_backoff_time: Duration::from_secs(4000),
        }
    }

    fn env(sender: &str, n: usize) -> Envelope {
        Envelope {
            egress_pool: None,
            sender: sender.into(),
            recipients: (0..n).map(|i| format!("r{i}@x.test")).collect(),
            arrival_unix_ms: 1_000_000,
            client_addr: String::new(),
            client_helo: String::new(),
            tls: String::new(),
            auth_user: String::new(),
            smtputf8: false,
            body_8bitmime: false,
            dsn: Default::default(),
        }
    }

    fn deferred(s: &str) -> RcptResult {
        RcptResult::Deferred { reply: s.into() }
    }

    #[test]
    fn partial_delivery_in_one_outcome() {
        let e = env("s@a.test", 4);
        let states = [
            RcptState::Pending,
            RcptState::Pending,
            RcptState::Deferred {
                next_attempt_unix_s: 0,
                attempts: 2,
            },
            RcptState::Delivered,
        ];
        let results = vec![
            (
                0,
                RcptResult::Delivered {
                    reply: "250 ok".into(),
                },
            ),
            (
                1,
                RcptResult::Bounced {
                    reply: "550 5.1.1 no".into(),
                    status: EnhancedCode::new(5, 1, 1),
                },
            ),
            (2, deferred("451 4.7.500 busy")),
            // Already final: ignored. Unknown index: ignored.
            (3, deferred("451 late")),
            (9, deferred("451 nobody")),
        ];
        let now = e.arrival_unix_ms + 1000;
        let p = plan(&states, &e, &results, now, &policy());
        assert_eq!(p.updates.len(), 3);
        assert_eq!(p.updates[0], (0, RcptState::Delivered, "250 ok".into()));
        assert_eq!(p.updates[1].1, RcptState::Bounced);
        // Third attempt: 300s doubled twice = 1200s.
        assert_eq!(
            p.updates[2].1,
            RcptState::Deferred {
                next_attempt_unix_s: (now + 1_200_000).div_ceil(1000),
                attempts: 3
            }
        );
        assert_eq!(p.failed.len(), 1);
        assert_eq!(p.failed[0].address, "r1@x.test");
        assert_eq!(p.failed[0].status, EnhancedCode::new(5, 1, 1));
        assert!(!p.expired);
        assert_eq!(p.bounce, BounceDecision::Send);
    }

    /// A recipient handed back because its destination's queue was full was not attempted: nothing is
    /// written, no attempt counted, even past the queue lifetime (it expires on a real attempt).
    #[test]
    fn a_postponed_recipient_keeps_its_state() {
        let e = env("s@a.test", 2);
        let states = [
            RcptState::Pending,
            RcptState::Deferred {
                next_attempt_unix_s: 0,
                attempts: 2,
            },
        ];
        let postponed = || RcptResult::Postponed {
            reply: "4.4.5 destination x has 4096 messages waiting".into(),
        };
        let results = vec![(0, postponed()), (1, postponed())];
        let late = e.arrival_unix_ms + 10 * 86_400_000;
        let p = plan(&states, &e, &results, late, &policy());
        assert!(p.updates.is_empty());
        assert!(p.failed.is_empty());
        assert_eq!(p.bounce, BounceDecision::None);
    }

    #[test]
    fn a_deferral_past_the_queue_lifetime_bounces() {
        let e = env("s@a.test", 2);
        let states = [RcptState::Pending; 2];
        let results = vec![(0, deferred("421 4.7.0 later")), (1, deferred("451 busy"))];
        let just_before = e.arrival_unix_ms + 5 * DAY_MS - 1;
        let p = plan(&states, &e, &results, just_before, &policy());
        assert!(!p.expired && p.failed.is_empty());
        assert_eq!(p.bounce, BounceDecision::None);
        let at = e.arrival_unix_ms + 5 * DAY_MS;
        let p = plan(&states, &e, &results, at, &policy());
        assert!(p.expired);
        assert_eq!(p.bounce, BounceDecision::Send);
        assert!(p.updates.iter().all(|u| u.1 == RcptState::Bounced));
        assert_eq!(p.failed[0].status, EnhancedCode::new(4, 4, 7));
        assert!(p.failed[1]
            .diagnostic
            .starts_with("4.4.7 delivery time expired; last error: 451 busy"));
    }

    /// The delivery logs call a deferral "expired" by `expires_at_ms`: exactly when the plan bounces it.
    #[test]
    fn expires_at_is_the_plans_expiry() {
        for sender in ["s@a.test", ""] {
            let e = env(sender, 1);
            let at = policy().expires_at_ms(sender, e.arrival_unix_ms);
            let lifetime = if sender.is_empty() {
                DAY_MS
            } else {
                5 * DAY_MS
            };
            assert_eq!(at, e.arrival_unix_ms + lifetime);
            let d = vec![(0, deferred("451 busy"))];
            let states = [RcptState::Pending];
            assert!(plan(&states, &e, &d, at, &policy()).expired);
            assert!(!plan(&states, &e, &d, at - 1, &policy()).expired);
        }
        assert_eq!(policy().expires_at_ms("s@a.test", u64::MAX), u64::MAX);
    }

    #[test]
    fn a_bounce_that_fails_is_dropped_not_bounced() {
        let e = env("", 1);
        let states = [RcptState::Pending];
        let bounced = vec![(
            0,
            RcptResult::Bounced {
                reply: "550 5.1.1 no".into(),
                status: EnhancedCode::new(5, 1, 1),
            },
        )];
        let p = plan(&states, &e, &bounced, e.arrival_unix_ms, &policy());
        assert_eq!(p.bounce, BounceDecision::Drop);
        assert_eq!(p.updates[0].1, RcptState::Bounced);
        // A bounce expires after bounce_queue_lifetime (1 day here), not maximal_queue_lifetime.
        let d = vec![(0, deferred("451 busy"))];
        let p = plan(&states, &e, &d, e.arrival_unix_ms + DAY_MS, &policy());
        assert!(p.expired);
        assert_eq!(p.bounce, BounceDecision::Drop);
        let p = plan(&states, &e, &d, e.arrival_unix_ms + DAY_MS - 1, &policy());
        assert!(!p.expired);
        assert_eq!(p.bounce, BounceDecision::None);
    }
}
