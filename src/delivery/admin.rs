//! An operator's changes to queued messages (Postfix's `postsuper -h/-H/-d`, `postqueue -f/-s`, and a bounce
//! now): which messages a selector picks, and the durable records each action writes to one shard's
//! [`QueueStore`]. Synchronous and free of I/O beyond the store's appends, so the same code serves a running
//! shard (its control task, `shard::control`, which makes room and waits for the sync around it) and
//! `shardmta queue ...` on a stopped spool (which opens each shard's store under its lock).
//!
//! What each action writes, per message:
//! - hold / release: one control record (the message's `held` flag); nothing for a message already so;
//! - delete: one control record; the message leaves the queue without a bounce;
//! - flush: for each deferred recipient (of the domain, with a domain selector) a progress record making it
//!   due now, its attempt count unchanged; nothing for a message with none;
//! - bounce: the bounce message to the sender (none for a null sender), then a `Bounced` progress record for
//!   each open recipient, diagnostic [`BOUNCED_BY_ADMIN`] (the order of the dispatcher: a crash in between
//!   repeats nothing and loses no bounce).

use crate::control::{QueueAction, Selector};
use crate::queue::record::{ControlOp, CONTROL_RECORD_LEN};
use crate::queue::{CommitTicket, QueueError, QueueId, QueueStore, RcptState};
use crate::smtp::reply_parser::EnhancedCode;

use super::dsn::{self, FailedRcpt};
use super::route::{Nexthop, Router};

/// The diagnostic of a recipient returned by the operator.
pub const BOUNCED_BY_ADMIN: &str = "5.0.0 message returned to sender by the queue administrator";

/// Which of a message's recipients a selection covers.
fn domain_matches(router: &Router, address: &str, domain: &str) -> bool {
    let d = crate::smtp::address::normalize_domain(address.rsplit_once('@').map_or("", |x| x.1));
    if d == domain {
        return true;
    }
    match router.route(&d) {
        Nexthop::Mx { domain: h, .. } | Nexthop::Host { host: h, .. } => {
            crate::smtp::address::normalize_domain(&h) == domain
        }
        Nexthop::Local => false,
    }
}

/// The messages of `store` that `selector` picks, in queue-id order. For IDs, only those in this store.
pub fn select(store: &QueueStore, router: &Router, selector: &Selector) -> Vec<QueueId> {
    let mut ids: Vec<QueueId> = match selector {
        Selector::Ids(ids) => ids
            .iter()
            .copied()
            .filter(|id| store.get(*id).is_some())
            .collect(),
        Selector::All => store.pending().map(|m| m.id).collect(),
        Selector::Domain(d) => store
            .pending()
            .filter(|m| {
                m.open_recipients()
                    .any(|(_, a, _)| domain_matches(router, a, d))
            })
            .map(|m| m.id)
            .collect(),
    };
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// What applying an action to one message did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// A record was written (the message changed).
    pub changed: bool,
    /// The bounce queued for it, to submit once durable.
    pub bounce: Option<QueueId>,
    /// Position past its last record.
    pub ticket: Option<CommitTicket>,
}

/// A bound on the bytes `action` may append for message `id` (for a running shard to make room first).
pub fn room_needed(store: &QueueStore, action: QueueAction, id: QueueId) -> u64 {
    let Some(pm) = store.get(id) else { return 0 };
    let open = pm.open_recipients().count() as u64;
    match action {
        QueueAction::Hold | QueueAction::Release | QueueAction::Delete => CONTROL_RECORD_LEN,
        QueueAction::Flush => open * crate::queue::record::progress_record_len(""),
        QueueAction::Bounce => {
            open * crate::queue::record::progress_record_len(BOUNCED_BY_ADMIN)
                + crate::limits::DSN_ORIGINAL_HEADER_BYTES_MAX as u64
                + 64 * 1024
        }
    }
}

/// Applies `action` to message `id` of `store` (absent: nothing changes). `domain`: with a domain selector,
/// `flush` makes only that domain's recipients due. `hostname` signs the bounce.
pub fn apply(
    store: &mut QueueStore,
    router: &Router,
    hostname: &str,
    action: QueueAction,
    id: QueueId,
    domain: Option<&str>,
    now_unix_ms: u64,
) -> Result<Applied, QueueError> {
    let Some(pm) = store.get(id) else {
        return Ok(Applied::default());
    };
    let mut out = Applied::default();
    match action {
        QueueAction::Hold | QueueAction::Release => {
            let hold = action == QueueAction::Hold;
            if pm.held != hold {
                let op = if hold {
                    ControlOp::Hold
                } else {
                    ControlOp::Release
                };
                out.ticket = Some(store.append_control(id, op)?);
                out.changed = true;
            }
        }
        QueueAction::Delete => {
            out.ticket = Some(store.append_control(id, ControlOp::Delete)?);
            out.changed = true;
        }
        QueueAction::Flush => {
            let now_s = now_unix_ms / 1000;
            let due: Vec<(u32, u32)> = pm
                .open_recipients()
                .filter(|(_, a, _)| domain.is_none_or(|d| domain_matches(router, a, d)))
                .filter_map(|(i, _, s)| match s {
                    RcptState::Deferred {
                        next_attempt_unix_s,
                        attempts,
                    } if next_attempt_unix_s > now_s => Some((i as u32, attempts)),
                    _ => None,
                })
                .collect();
            for (i, attempts) in due {
                let state = RcptState::Deferred {
                    next_attempt_unix_s: now_s,
                    attempts,
                };
                out.ticket = Some(store.append_progress(id, i, state, "")?);
                out.changed = true;
            }
        }
        QueueAction::Bounce => {
            let env = pm.envelope.clone();
            let open: Vec<(u32, String)> = pm
                .open_recipients()
                .map(|(i, a, _)| (i as u32, a.to_string()))
                .collect();
            if open.is_empty() {
                return Ok(out);
            }
            if !env.sender.is_empty() {
                let status = EnhancedCode::new(5, 0, 0);
                let failed: Vec<FailedRcpt<'_>> = open
                    .iter()
                    .map(|(i, a)| FailedRcpt {
                        index: *i,
                        address: a,
                        status,
                        diagnostic: BOUNCED_BY_ADMIN,
                        remote_mta: None,
                    })
                    .collect();
                // None: every recipient's NOTIFY leaves out FAILURE.
                if let Some(b) =
                    dsn::queued_bounce(store, hostname, id, &env, &failed, now_unix_ms, false)
                {
                    out.ticket = Some(store.append_message(b.id, &b.env, &b.received, &b.data)?);
                    out.bounce = Some(b.id);
                }
            }
            for (i, _) in open {
                out.ticket =
                    Some(store.append_progress(id, i, RcptState::Bounced, BOUNCED_BY_ADMIN)?);
            }
            out.changed = true;
        }
    }
    Ok(out)
}

/// `shardmta queue ACTION` with the server stopped: each shard's queue opened under its lock (a running server
/// holds it: [`QueueError::Locked`]), the action applied to its selected messages, everything synced. The
/// server recovers the records at its next start (holds, deferrals made due, bounces queued).
pub fn on_stopped_spool(
    cfg: &crate::config::Config,
    command: &crate::control::QueueCommand,
) -> Result<crate::control::QueueCommandReport, QueueError> {
    let router = Router::new(cfg);
    let domain = match &command.selector {
        Selector::Domain(d) => Some(d.as_str()),
        _ => None,
    };
    let now = crate::queue::now_unix_ms();
    let mut reports = Vec::new();
    for shard in crate::queue::list::shard_numbers(&cfg.queue_directory)? {
        let (mut store, _) =
            QueueStore::open_shard(&cfg.queue_directory, shard, cfg.queue_segment_size)?;
        let mut r = crate::control::QueueCommandReport::default();
        for id in select(&store, &router, &command.selector) {
            let a = apply(
                &mut store,
                &router,
                &cfg.myhostname,
                command.action,
                id,
                domain,
                now,
            )?;
            if a.changed {
                r.changed.push(id.to_string());
            } else {
                r.unchanged.push(id.to_string());
            }
        }
        store.sync_blocking()?;
        reports.push(r);
    }
    let ids = match &command.selector {
        Selector::Ids(ids) => Some(ids.as_slice()),
        _ => None,
    };
    Ok(crate::control::QueueCommandReport::merge(reports, ids))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Envelope;

    fn store(dir: &std::path::Path) -> QueueStore {
        QueueStore::open_shard(dir, 0, 1 << 20).unwrap().0
    }

    fn queued(s: &mut QueueStore, sender: &str, rcpts: &[&str]) -> QueueId {
        let id = s.allocate_id();
        let env = Envelope {
            sender: sender.into(),
            recipients: rcpts.iter().map(|r| r.to_string()).collect(),
            arrival_unix_ms: 1,
            ..Default::default()
        };
        s.append_message(id, &env, b"Received: x\r\n", b"Subject: t\r\n\r\nbody\r\n")
            .unwrap();
        id
    }

    fn router() -> Router {
        let mut cfg = crate::config::Config::default();
        cfg.transport.insert(
            "routed.example".into(),
            crate::nexthop::parse_nexthop("[mx.hub.example]").unwrap(),
        );
        Router::new(&cfg)
    }

    #[test]
    fn hold_release_and_delete_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let r = router();
        let (a, b, c);
        {
            let mut s = store(dir.path());
            a = queued(&mut s, "s@x.example", &["u@one.example"]);
            b = queued(&mut s, "s@x.example", &["u@two.example"]);
            c = queued(&mut s, "s@x.example", &["u@three.example"]);
            let hold = apply(&mut s, &r, "h", QueueAction::Hold, a, None, 0).unwrap();
            assert!(hold.changed);
            // Holding twice writes nothing.
            assert!(
                !apply(&mut s, &r, "h", QueueAction::Hold, a, None, 0)
                    .unwrap()
                    .changed
            );
            apply(&mut s, &r, "h", QueueAction::Hold, b, None, 0).unwrap();
            assert!(
                apply(&mut s, &r, "h", QueueAction::Release, b, None, 0)
                    .unwrap()
                    .changed
            );
            assert!(
                apply(&mut s, &r, "h", QueueAction::Delete, c, None, 0)
                    .unwrap()
                    .changed
            );
            s.sync_blocking().unwrap();
        }
        let s = store(dir.path());
        assert!(s.get(a).unwrap().held);
        assert!(!s.get(b).unwrap().held);
        assert!(s.get(c).is_none(), "a deleted message stays deleted");
        assert_eq!(s.pending_count(), 2);
    }

    #[test]
    fn flush_makes_deferred_recipients_due_keeping_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let r = router();
        let mut s = store(dir.path());
        let id = queued(&mut s, "s@x.example", &["a@one.example", "b@two.example"]);
        let later = RcptState::Deferred {
            next_attempt_unix_s: 10_000,
            attempts: 3,
        };
        s.append_progress(id, 0, later, "451 4.3.0 try later")
            .unwrap();
        s.append_progress(id, 1, later, "451 4.3.0 try later")
            .unwrap();
        // Only one.example's recipient with a domain selector.
        let f = apply(
            &mut s,
            &r,
            "h",
            QueueAction::Flush,
            id,
            Some("one.example"),
            5_000_000,
        )
        .unwrap();
        assert!(f.changed);
        let st = &s.get(id).unwrap().states;
        assert_eq!(
            st[0],
            RcptState::Deferred {
                next_attempt_unix_s: 5_000,
                attempts: 3
            }
        );
        assert_eq!(st[1], later);
        // Nothing deferred into the future is left for one.example: unchanged.
        let again = apply(
            &mut s,
            &r,
            "h",
            QueueAction::Flush,
            id,
            Some("one.example"),
            5_000_000,
        );
        assert!(!again.unwrap().changed);
    }

    #[test]
    fn bounce_queues_a_report_and_finishes_the_message() {
        let dir = tempfile::tempdir().unwrap();
        let r = router();
        let mut s = store(dir.path());
        let id = queued(
            &mut s,
            "sender@x.example",
            &["a@one.example", "b@two.example"],
        );
        s.append_progress(id, 0, RcptState::Delivered, "250 ok")
            .unwrap();
        let b = apply(
            &mut s,
            &r,
            "relay.test",
            QueueAction::Bounce,
            id,
            None,
            1_000,
        )
        .unwrap();
        assert!(b.changed);
        let bid = b.bounce.expect("a bounce to the sender");
        assert!(s.get(id).is_none(), "every recipient is final now");
        let bounce = s.get(bid).unwrap();
        assert_eq!(bounce.envelope.sender, "");
        assert_eq!(
            bounce.envelope.recipients,
            vec!["sender@x.example".to_string()]
        );
        let (_, data) = s.message_data(bid).unwrap();
        let text = String::from_utf8_lossy(data);
        assert!(text.contains("b@two.example"), "{text}");
        assert!(
            !text.contains("Final-Recipient: rfc822; a@one.example"),
            "{text}"
        );
        assert!(text.contains("returned to sender by the queue administrator"));
        // A null sender's message is returned to nobody.
        let null = queued(&mut s, "", &["c@one.example"]);
        let b = apply(
            &mut s,
            &r,
            "relay.test",
            QueueAction::Bounce,
            null,
            None,
            1_000,
        )
        .unwrap();
        assert!(b.changed && b.bounce.is_none());
        assert!(s.get(null).is_none());
    }

    #[test]
    fn selection_by_domain_matches_recipient_domains_and_next_hops() {
        let dir = tempfile::tempdir().unwrap();
        let r = router();
        let mut s = store(dir.path());
        let a = queued(&mut s, "s@x.example", &["u@ONE.example."]);
        let b = queued(&mut s, "s@x.example", &["u@routed.example"]);
        let c = queued(&mut s, "s@x.example", &["u@two.example"]);
        s.append_progress(c, 0, RcptState::Delivered, "").unwrap();
        let d = queued(&mut s, "s@x.example", &["u@three.example"]);
        assert_eq!(
            select(&s, &r, &Selector::Domain("one.example".into())),
            vec![a]
        );
        assert_eq!(
            select(&s, &r, &Selector::Domain("mx.hub.example".into())),
            vec![b]
        );
        assert_eq!(select(&s, &r, &Selector::All), vec![a, b, d]);
        assert_eq!(
            select(&s, &r, &Selector::Ids(vec![d, c, QueueId(7), d])),
            vec![d]
        );
    }

    #[test]
    fn a_held_message_keeps_its_hold_through_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let r = router();
        let id;
        {
            let mut s = QueueStore::open_shard(dir.path(), 0, 64 << 10).unwrap().0;
            id = queued(&mut s, "s@x.example", &["u@one.example"]);
            apply(&mut s, &r, "h", QueueAction::Hold, id, None, 0).unwrap();
            // Fill segments with finished messages so the held one's segment is worth compacting.
            let env = Envelope {
                sender: "s@x.example".into(),
                recipients: vec!["v@one.example".into()],
                ..Default::default()
            };
            for _ in 0..60 {
                let x = s.allocate_id();
                s.append_message(x, &env, b"", &[b'x'; 4096]).unwrap();
                s.append_progress(x, 0, RcptState::Delivered, "").unwrap();
            }
            assert!(s.segment_count() >= 3);
            s.sync_blocking().unwrap();
            let seq_before = s.get(id).unwrap().segment_seq;
            for _ in 0..4 {
                s.housekeeping(0).unwrap();
                s.sync_blocking().unwrap();
                s.housekeeping(0).unwrap();
            }
            assert!(
                s.get(id).unwrap().segment_seq > seq_before,
                "copied forward"
            );
            assert!(
                !s.segment_seqs().contains(&seq_before),
                "its old segment (with the hold record) is gone"
            );
        }
        let s = QueueStore::open_shard(dir.path(), 0, 64 << 10).unwrap().0;
        assert!(
            s.get(id).unwrap().held,
            "still held after compaction and restart"
        );
    }
}
