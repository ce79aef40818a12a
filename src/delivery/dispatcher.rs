//! The accepting shard's side of delivery: which recipients of its queued messages are due, grouped into jobs by
//! next hop and sent to the destination owners; outcomes applied as progress records; retries scheduled with
//! backoff; expiry; bounces (DSNs) queued as new messages with the null sender.
//!
//! An outcome is recorded (bounce first, then one progress record per recipient) before anything else happens
//! to its message. When the queue cannot record it (a full disk, a failing segment), the outcome is kept in
//! memory, the message is not attempted again, and the shard's delivery pauses: no new job leaves until every
//! kept outcome is recorded, retried each tick; a log line says when delivery pauses and when it resumes, and
//! the shard's counters show it. (Before: a delivered recipient whose record failed stayed due and was sent
//! again every cycle.)
//!
//! Bounds: at most `DELIVERY_MESSAGES_IN_FLIGHT_MAX` messages out at a time per shard (the rest wait in the schedule);
//! the schedule holds at most one entry per pending message plus stale duplicates that are dropped when popped;
//! outcomes kept while paused are at most one per job out, so bounded by the same limit.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::dsn::{self, FailedRcpt, QueuedBounce, ReportKind};
use super::route::{Nexthop, Router};
use super::{plan, Job, JobRcpt, Outcome, RcptResult};
use crate::config::Config;
use crate::eventlog;
use crate::policy::RelayPolicy;
use crate::queue::{
    CommitTicket, Envelope, QueueError, QueueId, QueueStore, RcptState, ShardQueue,
};
use crate::shard::mesh::Outbox;
use crate::shard::owner::owner_of;

use crate::limits::{
    DELIVERY_MESSAGES_IN_FLIGHT_MAX, DELIVERY_TICK_INTERVAL, POSTPONED_RETRY_AFTER_MS,
};

/// What the dispatcher needs for the suppression list.
struct Suppressing {
    view: crate::suppression::View,
    log: Rc<super::log::DeliveryLog>,
    outcomes: Rc<Outbox<Outcome>>,
    auto_add: bool,
}

/// A group of recipients' destination: the next hop and the recipient domain's policy key, if any.
type DestinationOf = (Nexthop, Option<String>);

pub struct Dispatcher {
    shard: usize,
    /// SMTP shards; the local-delivery shard is the mesh peer after them (index `shards`).
    shards: usize,
    cfg: Arc<Config>,
    queue: Rc<ShardQueue>,
    router: Rc<Router>,
    /// Which domains are local (`mydestination`); replaced by a configuration reload ([`Dispatcher::set_policy`]).
    policy: RefCell<Arc<RelayPolicy>>,
    /// (due unix ms, id).
    schedule: RefCell<BTreeSet<(u64, QueueId)>>,
    /// Jobs still out per message.
    in_flight: RefCell<HashMap<QueueId, u32>>,
    /// Jobs for their destination owners (the shard's job courier takes them; see `shard::mesh`).
    jobs: Rc<Outbox<Job>>,
    /// Outcomes the queue could not record yet, oldest first; while any is here, delivery is paused.
    unrecorded: RefCell<VecDeque<Recording>>,
    /// Messages with an outcome in `unrecorded`: never attempted until it is recorded.
    blocked: RefCell<HashSet<QueueId>>,
    /// The suppression list and what a suppressed recipient needs (set by [`Dispatcher::set_suppression`]).
    suppression: RefCell<Option<Suppressing>>,
    /// Times delivery paused since start.
    pauses: Cell<u64>,
    /// Messages with recipients handed back postponed: not offered again before this time (unix ms), even when
    /// another of their jobs comes back first.
    postponed_until: RefCell<HashMap<QueueId, u64>>,
}

/// Bytes a progress record's diagnostic may have beyond the reply it quotes (the expiry prefix).
const DIAGNOSTIC_SLACK_BYTES: u64 = 128;
/// A bound on a bounce's message record: its envelope and report text around the original's header section
/// (at most `DSN_ORIGINAL_HEADER_BYTES_MAX`).
const BOUNCE_RECORD_BYTES_BOUND: u64 =
    crate::limits::DSN_ORIGINAL_HEADER_BYTES_MAX as u64 + 64 * 1024;

/// What one outcome must write to the queue: the reports (bounce, delay warning, success) first, then the
/// "delay warned" mark, then the recipients' new states.
#[derive(Debug)]
struct Recording {
    id: QueueId,
    /// DSN messages to queue, in order, each with what it reports.
    reports: Vec<(ReportKind, QueuedBounce)>,
    /// A delay warning is among the reports: mark the message (a control record) so it never gets another.
    delay_warned: bool,
    /// (recipient index, new state, diagnostic).
    updates: Vec<(u32, RcptState, String)>,
}

impl Recording {
    /// The bytes its records take in the queue, at most.
    fn len_bound(&self) -> u64 {
        let reports: u64 = self
            .reports
            .iter()
            .map(|(_, b)| {
                crate::queue::record::message_record_len(&b.env, b.received.len(), b.data.len())
            })
            .sum();
        let mark = if self.delay_warned {
            crate::queue::record::CONTROL_RECORD_LEN
        } else {
            0
        };
        reports
            + mark
            + self
                .updates
                .iter()
                .map(|(_, _, d)| crate::queue::record::progress_record_len(d))
                .sum::<u64>()
    }
}

/// Whether a queue error may go away by itself (a full disk, I/O); the others say the record is moot.
fn retryable(e: &QueueError) -> bool {
    !matches!(
        e,
        QueueError::UnknownId(_)
            | QueueError::BadRecipientIndex { .. }
            | QueueError::TooLarge { .. }
    )
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn domain_of(addr: &str) -> &str {
    addr.rsplit_once('@').map(|(_, d)| d).unwrap_or("")
}

impl Dispatcher {
    pub fn new(
        shard: usize,
        shards: usize,
        cfg: Arc<Config>,
        queue: Rc<ShardQueue>,
        router: Rc<Router>,
        policy: Arc<RelayPolicy>,
        jobs: Rc<Outbox<Job>>,
    ) -> Rc<Dispatcher> {
        Rc::new(Dispatcher {
            shard,
            shards,
            cfg,
            queue,
            router,
            policy: RefCell::new(policy),
            schedule: RefCell::new(BTreeSet::new()),
            in_flight: RefCell::new(HashMap::new()),
            jobs,
            unrecorded: RefCell::new(VecDeque::new()),
            blocked: RefCell::new(HashSet::new()),
            pauses: Cell::new(0),
            postponed_until: RefCell::new(HashMap::new()),
            suppression: RefCell::new(None),
        })
    }

    /// Consults `view` before routing: a suppressed recipient is bounced (5.7.1, "recipient suppressed:
    /// REASON"), logged in `log`, its outcome sent through `outcomes` to this shard like any job's. With
    /// `auto_add`, a remote permanent failure of class `invalid_recipient` adds its recipient to the list.
    pub fn set_suppression(
        &self,
        view: crate::suppression::View,
        log: Rc<super::log::DeliveryLog>,
        outcomes: Rc<Outbox<Outcome>>,
        auto_add: bool,
    ) {
        *self.suppression.borrow_mut() = Some(Suppressing {
            view,
            log,
            outcomes,
            auto_add,
        });
    }

    /// A configuration reload: which domains are local, for the jobs made from now on.
    pub fn set_policy(&self, policy: Arc<RelayPolicy>) {
        *self.policy.borrow_mut() = policy;
    }

    /// True while outcomes wait to be recorded (no new delivery starts).
    pub fn paused(&self) -> bool {
        !self.unrecorded.borrow().is_empty()
    }

    /// Outcomes waiting to be recorded.
    pub fn unrecorded_count(&self) -> usize {
        self.unrecorded.borrow().len()
    }

    /// Times delivery paused since start.
    pub fn pause_count(&self) -> u64 {
        self.pauses.get()
    }

    /// Schedules everything recovered from the queue and runs the schedule until the executor ends.
    pub async fn run(self: Rc<Self>) {
        {
            let store = self.queue.store();
            let mut sched = self.schedule.borrow_mut();
            for pm in store.pending() {
                let due = pm
                    .open_recipients()
                    .map(|(_, _, s)| due_ms(s))
                    .min()
                    .unwrap_or(0);
                sched.insert((due, pm.id));
            }
        }
        loop {
            if self.paused() {
                // Room for the oldest kept outcome first (a segment is created on the blocking pool, not here).
                let need = self.unrecorded.borrow().front().map(Recording::len_bound);
                if let Some(len) = need {
                    let _ = self.queue.room_for(len).await;
                }
                self.retry_unrecorded();
            }
            self.run_due();
            glommio::timer::sleep(DELIVERY_TICK_INTERVAL).await;
        }
    }

    fn run_due(&self) {
        if self.paused() {
            return;
        }
        let now = now_ms();
        loop {
            if self.in_flight.borrow().len() >= DELIVERY_MESSAGES_IN_FLIGHT_MAX {
                return;
            }
            let first = self.schedule.borrow().first().copied();
            match first {
                Some((due, id)) if due <= now => {
                    self.schedule.borrow_mut().remove(&(due, id));
                    self.submit(id);
                }
                _ => return,
            }
        }
    }

    /// Sends the due recipients of `id` to their destination owners (no-op if it has jobs out already).
    pub fn submit(&self, id: QueueId) {
        if !self.cfg.delivery.enabled
            || self.in_flight.borrow().contains_key(&id)
            || self.blocked.borrow().contains(&id)
        {
            return;
        }
        if self.in_flight.borrow().len() >= DELIVERY_MESSAGES_IN_FLIGHT_MAX || self.paused() {
            self.schedule.borrow_mut().insert((0, id));
            return;
        }
        let now = now_ms();
        let mut groups: Vec<(DestinationOf, Vec<JobRcpt>)> = Vec::new();
        let mut later: Option<u64> = None;
        // Suppressed recipients: (index, address, reply, attempts).
        let mut suppressed: Vec<(u32, String, String, u32)> = Vec::new();
        let suppression = self.suppression.borrow();
        let store = self.queue.store();
        let Some(pm) = store.get(id) else { return };
        if pm.held {
            // Held by the operator: out of the schedule until released (`after_admin`).
            return;
        }
        for (i, addr, state) in pm.open_recipients() {
            let due = due_ms(state);
            if due > now {
                later = Some(later.map_or(due, |l| l.min(due)));
                continue;
            }
            let attempts = match state {
                RcptState::Deferred { attempts, .. } => attempts,
                _ => 0,
            };
            if let Some(hit) = suppression.as_ref().and_then(|s| s.view.check(addr)) {
                let reply = format!("5.7.1 recipient suppressed: {}", hit.reason);
                suppressed.push((i as u32, addr.to_string(), reply, attempts));
                continue;
            }
            let domain = domain_of(addr);
            // mydestination and `transport = "local"` domains go to the local-delivery shard.
            let hop = if self.policy.borrow().is_local_domain(domain) {
                (Nexthop::Local, None)
            } else {
                let d = crate::smtp::address::normalize_domain(domain);
                (self.router.route(&d), self.router.policy_key(&d))
            };
            let r = JobRcpt {
                index: i as u32,
                address: addr.to_string(),
                attempts,
                dsn: pm.envelope.dsn.rcpt(i),
            };
            match groups.iter_mut().find(|(h, _)| *h == hop) {
                Some((_, v)) => v.push(r),
                None => groups.push((hop, vec![r])),
            }
        }
        if let Some(l) = later {
            self.schedule.borrow_mut().insert((l, id));
        }
        if groups.is_empty() && suppressed.is_empty() {
            return;
        }
        let body = if groups.is_empty() {
            None
        } else {
            match store.message_body(id) {
                Some(b) => Some(b),
                None => {
                    // Not in the file yet (its sync is still running): look again shortly.
                    self.schedule.borrow_mut().insert((now + 100, id));
                    return;
                }
            }
        };
        let env: &Envelope = &pm.envelope;
        let jobs: Vec<Job> = groups
            .into_iter()
            .filter_map(|g| body.clone().map(|b| (g, b)))
            .map(|(((nexthop, policy), rcpts), body)| Job {
                origin_shard: self.shard,
                id,
                sender: env.sender.clone(),
                rcpts,
                body,
                smtputf8: env.smtputf8,
                eight_bit: env.body_8bitmime,
                arrival_unix_ms: env.arrival_unix_ms,
                nexthop,
                policy,
                dsn_ret: env.dsn.ret,
                dsn_envid: env.dsn.envid.clone(),
                site: None,
                egress_pool: env.egress_pool.clone(),
                warmup_counted: None,
            })
            .collect();
        let arrival = env.arrival_unix_ms;
        drop(store);
        let extra = u32::from(!suppressed.is_empty());
        self.in_flight
            .borrow_mut()
            .insert(id, jobs.len() as u32 + extra);
        for job in jobs {
            let owner = owner_of(&job.nexthop, self.shards).index(self.shards);
            self.jobs.push(owner, job);
        }
        if let (Some(s), false) = (suppression.as_ref(), suppressed.is_empty()) {
            let mut at = now;
            let results = suppressed
                .into_iter()
                .map(|(index, addr, reply, attempts)| {
                    at = s
                        .log
                        .record_suppressed(id, &addr, &reply, arrival, attempts + 1);
                    s.view
                        .shared()
                        .suppressed_total
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let status = crate::smtp::reply_parser::EnhancedCode {
                        class: 5,
                        subject: 7,
                        detail: 1,
                    };
                    (index, RcptResult::Bounced { reply, status })
                })
                .collect();
            s.outcomes.push(
                self.shard,
                Outcome {
                    id,
                    results,
                    remote: None,
                    attempted_unix_ms: at,
                    next_hop_dsn: false,
                    retry: None,
                },
            );
        }
    }

    /// With `suppression_auto_add`: the recipients of `o` a remote server refused permanently as invalid
    /// (bounce class `invalid_recipient` of a real reply, `5xx ...`) go to the suppression list's writer.
    fn auto_suppress(&self, o: &Outcome) {
        let s = self.suppression.borrow();
        let Some(s) = s.as_ref().filter(|s| s.auto_add) else {
            return;
        };
        if o.remote.is_none() {
            return;
        }
        let store = self.queue.store();
        let Some(pm) = store.get(o.id) else { return };
        for (i, r) in &o.results {
            let RcptResult::Bounced { reply, .. } = r else {
                continue;
            };
            let remote_reply = reply.as_bytes().first().is_some_and(|b| *b == b'5')
                && reply
                    .as_bytes()
                    .get(1..3)
                    .is_some_and(|d| d.iter().all(u8::is_ascii_digit));
            if remote_reply
                && super::bounce_class::classify(reply)
                    == super::bounce_class::BounceClass::InvalidRecipient
            {
                if let Some(addr) = pm.envelope.recipients.get(*i as usize) {
                    s.view.shared().auto_add(addr, reply);
                }
            }
        }
    }

    /// Makes room in the queue for what `o` may write (its progress records and a bounce) before
    /// [`Self::on_outcome`] runs, so that no segment file is created on the reactor thread: a segment that is
    /// needed is created on the blocking pool while the caller waits. The caller calls `on_outcome` right after,
    /// without yielding in between. An estimate that falls short only means the append creates the segment
    /// itself (counted in the queue's `segments_created_inline`).
    pub async fn make_room(&self, o: &Outcome) {
        let mut len: u64 = o
            .results
            .iter()
            .map(|(_, r)| {
                crate::queue::record::progress_record_len(r.reply()) + DIAGNOSTIC_SLACK_BYTES
            })
            .sum();
        if o.results.iter().any(|(_, r)| {
            !matches!(
                r,
                RcptResult::Delivered { .. } | RcptResult::Postponed { .. }
            )
        }) {
            len += BOUNCE_RECORD_BYTES_BOUND;
        }
        // A delay warning (and its mark) or a success report.
        if o.results
            .iter()
            .any(|(_, r)| matches!(r, RcptResult::Deferred { .. }))
            && self.delay_warning_ms().is_some()
        {
            len += BOUNCE_RECORD_BYTES_BOUND + crate::queue::record::CONTROL_RECORD_LEN;
        }
        // A success report only for a message some recipient of which asked for one (NOTIFY=SUCCESS).
        if o.results
            .iter()
            .any(|(_, r)| matches!(r, RcptResult::Delivered { .. }))
            && self.queue.store().get(o.id).is_some_and(|pm| {
                pm.envelope
                    .dsn
                    .rcpts
                    .iter()
                    .any(crate::smtp::dsn::RcptDsn::wants_success)
            })
        {
            len += BOUNCE_RECORD_BYTES_BOUND;
        }
        let _ = self.queue.room_for(len).await;
    }

    /// Applies one job's results: progress records, retries, expiry, bounces.
    pub fn on_outcome(self: &Rc<Self>, o: Outcome) {
        self.auto_suppress(&o);
        let rec = {
            let mut store = self.queue.store();
            self.recording(&mut store, &o)
        };
        {
            let mut inf = self.in_flight.borrow_mut();
            if let Some(n) = inf.get_mut(&o.id) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    inf.remove(&o.id);
                }
            }
        }
        // Recipients handed back unattempted (a full destination queue) are offered again a second later, even
        // those whose retry time has passed: never at once, which would loop.
        if o.results
            .iter()
            .any(|(_, r)| matches!(r, RcptResult::Postponed { .. }))
        {
            let until = now_ms() + POSTPONED_RETRY_AFTER_MS;
            let mut p = self.postponed_until.borrow_mut();
            let e = p.entry(o.id).or_insert(until);
            *e = (*e).max(until);
        }
        let Some(rec) = rec else {
            self.reschedule(o.id);
            return;
        };
        if self.paused() {
            // Keep the order: nothing is recorded past an outcome that is waiting.
            self.keep(rec, None);
            return;
        }
        let result = {
            let mut store = self.queue.store();
            self.record(&mut store, rec)
        };
        match result {
            Ok(reports) => {
                self.reschedule(o.id);
                self.submit_reports(reports);
            }
            Err((rest, e)) => self.keep(rest, Some(e)),
        }
    }

    /// `delay_warning_time` in ms, when delay warnings are on.
    fn delay_warning_ms(&self) -> Option<u64> {
        self.cfg
            .delay_warning_time
            .filter(|d| !d.0.is_zero())
            .map(|d| d.0.as_millis().min(u128::from(u64::MAX)) as u64)
    }

    /// The records an outcome calls for (None: nothing to record, e.g. the message is gone): the pure
    /// [`plan::plan`], then the reports it calls for: the bounce when the plan sends one (for the failed
    /// recipients whose NOTIFY allows it), a success report for recipients delivered here or relayed to a next
    /// hop without DSN that asked for one (NOTIFY=SUCCESS), and the message's one delay warning.
    fn recording(&self, store: &mut QueueStore, o: &Outcome) -> Option<Recording> {
        let now = now_ms();
        let mut policy = plan::Policy::from_config(&self.cfg);
        if let Some((min, max)) = o.retry {
            // The destination's shaping rule (see `Outcome::retry`).
            policy.minimal_backoff_time = min;
            policy.maximal_backoff_time = max;
        }
        // At the attempt's time: a recipient the delivery logs called expired expires here too.
        let at = match o.attempted_unix_ms {
            0 => now,
            t => t,
        };
        let pm = store.get(o.id)?;
        let env = pm.envelope.clone();
        let plan::Plan {
            updates,
            failed,
            expired,
            bounce,
        } = plan::plan(&pm.states, &env, &o.results, at, &policy);
        // The states before this outcome, for success reports and the delay warning only (none is made
        // without a sender, a NOTIFY=SUCCESS or a delay_warning_time): no copy per outcome otherwise.
        let reports_possible = !env.sender.is_empty()
            && (self.delay_warning_ms().is_some()
                || env
                    .dsn
                    .rcpts
                    .iter()
                    .any(crate::smtp::dsn::RcptDsn::wants_success));
        let states = if reports_possible {
            pm.states.clone()
        } else {
            Vec::new()
        };
        let mut reports = Vec::new();
        if bounce == plan::BounceDecision::Send {
            let report: Vec<FailedRcpt<'_>> = failed
                .iter()
                .map(|f| FailedRcpt {
                    index: f.index,
                    address: &f.address,
                    status: f.status,
                    diagnostic: &f.diagnostic,
                    remote_mta: o.remote.as_deref(),
                })
                .collect();
            let kind = ReportKind::Failed { expired };
            match dsn::queued_report(store, &self.cfg.myhostname, o.id, &env, &report, now, kind) {
                Some(b) => reports.push((kind, b)),
                None => tracing::info!(
                    target: eventlog::BOUNCE,
                    event = "bounce_not_requested",
                    queue_id = %o.id,
                    "{}: no non-delivery notification: the failed recipients' NOTIFY excludes FAILURE",
                    o.id
                ),
            }
        } else if bounce == plan::BounceDecision::Drop {
            eventlog::bounce_dropped(o.id);
        }
        if !env.sender.is_empty() {
            self.success_reports(store, o, &env, &states, now, &mut reports);
        }
        let mut delay_warned = false;
        if let Some(b) = self.delay_warning(store, o.id, &env, &states, &updates, at, &policy) {
            reports.push(b);
            delay_warned = true;
        }
        if updates.is_empty() && reports.is_empty() {
            return None;
        }
        Some(Recording {
            id: o.id,
            reports,
            delay_warned,
            updates,
        })
    }

    /// Success reports (RFC 3461 5.2.3): "delivered" for recipients delivered to a mailbox here, "relayed" for
    /// recipients accepted by a next hop without DSN, each only with NOTIFY=SUCCESS. A next hop with DSN got
    /// the parameters and reports itself.
    fn success_reports(
        &self,
        store: &mut QueueStore,
        o: &Outcome,
        env: &Envelope,
        states: &[RcptState],
        now: u64,
        reports: &mut Vec<(ReportKind, QueuedBounce)>,
    ) {
        let mut delivered: Vec<FailedRcpt<'_>> = Vec::new();
        let mut relayed: Vec<FailedRcpt<'_>> = Vec::new();
        for (idx, r) in &o.results {
            let i = *idx as usize;
            let (RcptResult::Delivered { reply }, Some(addr), Some(s)) =
                (r, env.recipients.get(i), states.get(i))
            else {
                continue;
            };
            if s.is_final() || !env.dsn.rcpt_ref(i).wants_success() {
                continue;
            }
            let local = self.policy.borrow().is_local_domain(domain_of(addr));
            let f = FailedRcpt {
                index: *idx,
                address: addr,
                status: crate::smtp::reply_parser::EnhancedCode::new(2, 0, 0),
                diagnostic: reply,
                remote_mta: if local { None } else { o.remote.as_deref() },
            };
            if local {
                delivered.push(f);
            } else if !o.next_hop_dsn {
                relayed.push(f);
            }
        }
        for (kind, list) in [
            (ReportKind::Delivered, delivered),
            (ReportKind::Relayed, relayed),
        ] {
            if list.is_empty() {
                continue;
            }
            if let Some(b) =
                dsn::queued_report(store, &self.cfg.myhostname, o.id, env, &list, now, kind)
            {
                reports.push((kind, b));
            }
        }
    }

    /// The message's one delay warning (`delay_warning_time`): when this outcome defers a recipient, the
    /// message is older than the warning time and has had no warning, a "delayed" report on every recipient
    /// still deferred after the outcome whose NOTIFY allows DELAY (none such: no report, and the message may
    /// be warned later).
    #[allow(clippy::too_many_arguments)]
    fn delay_warning(
        &self,
        store: &mut QueueStore,
        id: QueueId,
        env: &Envelope,
        states: &[RcptState],
        updates: &[(u32, RcptState, String)],
        at: u64,
        policy: &plan::Policy,
    ) -> Option<(ReportKind, QueuedBounce)> {
        let warn_ms = self.delay_warning_ms()?;
        // A warning already made whose mark waits in `unrecorded` (delivery paused) counts as given.
        let warning_kept = self
            .unrecorded
            .borrow()
            .iter()
            .any(|r| r.id == id && r.delay_warned);
        if env.sender.is_empty()
            || env.dsn.delay_warned
            || warning_kept
            || at < env.arrival_unix_ms.saturating_add(warn_ms)
            || !updates
                .iter()
                .any(|(_, s, _)| matches!(s, RcptState::Deferred { .. }))
        {
            return None;
        }
        let mut after: Vec<(RcptState, &str)> = states.iter().map(|s| (*s, "")).collect();
        for (i, s, d) in updates {
            if let Some(slot) = after.get_mut(*i as usize) {
                *slot = (*s, d.as_str());
            }
        }
        let list: Vec<FailedRcpt<'_>> = after
            .iter()
            .enumerate()
            .filter(|(i, (s, _))| {
                matches!(s, RcptState::Deferred { .. }) && env.dsn.rcpt_ref(*i).wants_delay()
            })
            .filter_map(|(i, (_, diag))| {
                let address = env.recipients.get(i)?;
                // The first 4.x.x in the reply (it may be prefixed by the host it came from).
                let status = diag
                    .split(' ')
                    .take(8)
                    .filter_map(|w| crate::smtp::reply_parser::EnhancedCode::parse(w.as_bytes()))
                    .find(|c| c.class == 4)
                    .unwrap_or(crate::smtp::reply_parser::EnhancedCode::new(4, 0, 0));
                Some(FailedRcpt {
                    index: i as u32,
                    address,
                    status,
                    diagnostic: diag,
                    remote_mta: None,
                })
            })
            .collect();
        let kind = ReportKind::Delayed {
            will_retry_until_unix_s: policy.expires_at_ms(&env.sender, env.arrival_unix_ms) / 1000,
        };
        dsn::queued_report(store, &self.cfg.myhostname, id, env, &list, now_ms(), kind)
            .map(|b| (kind, b))
    }

    /// Writes a recording: the reports go into the queue before the records that make them necessary (a crash
    /// between the two can repeat the attempt, or a report, never lose one), then the delay-warned mark, then
    /// the progress records. On a retryable failure returns what is left to write (a report is not written
    /// twice); a record that became moot is dropped. Returns the reports written, to submit once durable.
    #[allow(clippy::result_large_err)]
    fn record(
        self: &Rc<Self>,
        store: &mut QueueStore,
        mut rec: Recording,
    ) -> Result<Vec<(QueueId, CommitTicket)>, (Recording, QueueError)> {
        let mut written = Vec::new();
        while let Some((kind, b)) = rec.reports.first() {
            match store.append_message(b.id, &b.env, &b.received, &b.data) {
                Ok(t) => {
                    match kind {
                        ReportKind::Failed { .. } => eventlog::bounce_queued(rec.id, b.id),
                        ReportKind::Delayed { .. } => tracing::info!(
                            target: eventlog::BOUNCE,
                            event = "delay_warning",
                            queue_id = %rec.id,
                            bounce_id = %b.id,
                            "{}: sender delay notification: {}",
                            rec.id,
                            b.id
                        ),
                        ReportKind::Delivered | ReportKind::Relayed | ReportKind::Expanded => {
                            tracing::info!(
                                target: eventlog::BOUNCE,
                                event = "success_report",
                                queue_id = %rec.id,
                                bounce_id = %b.id,
                                "{}: sender delivery status notification: {}",
                                rec.id,
                                b.id
                            )
                        }
                    }
                    written.push((b.id, t));
                    rec.reports.remove(0);
                }
                Err(e) if retryable(&e) => {
                    self.submit_reports(written);
                    return Err((rec, e));
                }
                Err(e) => {
                    tracing::error!(
                        target: eventlog::BOUNCE,
                        "shard {}: cannot queue a report for {}: {e}",
                        self.shard,
                        rec.id
                    );
                    rec.reports.remove(0);
                }
            }
        }
        if rec.delay_warned {
            match store.append_control(rec.id, crate::queue::record::ControlOp::DelayWarned) {
                Ok(_) => rec.delay_warned = false,
                Err(e) if retryable(&e) => {
                    self.submit_reports(written);
                    return Err((rec, e));
                }
                Err(_) => rec.delay_warned = false,
            }
        }
        for i in 0..rec.updates.len() {
            let (idx, state, diag) = &rec.updates[i];
            match store.append_progress(rec.id, *idx, *state, diag) {
                Ok(_) => {}
                Err(e) if retryable(&e) => {
                    // What is written stays written; the rest is kept. The reports written are not written
                    // again, but submitted once recorded.
                    rec.updates.drain(..i);
                    self.submit_reports(written);
                    return Err((rec, e));
                }
                Err(e) => tracing::error!(
                    target: eventlog::QMGR,
                    "shard {}: progress for {}: {e}",
                    self.shard,
                    rec.id
                ),
            }
        }
        if !rec.updates.is_empty() && store.get(rec.id).is_none() {
            eventlog::removed(rec.id);
        }
        Ok(written)
    }

    /// Keeps an outcome the queue could not record and pauses delivery (logged once per pause).
    fn keep(&self, rec: Recording, error: Option<QueueError>) {
        let was_paused = self.paused();
        self.blocked.borrow_mut().insert(rec.id);
        self.unrecorded.borrow_mut().push_back(rec);
        if !was_paused {
            self.pauses.set(self.pauses.get() + 1);
            tracing::error!(
                target: eventlog::QMGR,
                "shard {}: delivery paused: the queue cannot record delivery outcomes ({}); no message is attempted again until they are recorded",
                self.shard,
                error.map_or_else(|| "earlier failure".to_string(), |e| e.to_string())
            );
        }
    }

    /// Tries to write the kept outcomes, oldest first; resumes delivery once all are written.
    fn retry_unrecorded(self: &Rc<Self>) {
        let mut written = Vec::new();
        loop {
            let Some(rec) = self.unrecorded.borrow_mut().pop_front() else {
                break;
            };
            let id = rec.id;
            let result = {
                let mut store = self.queue.store();
                self.record(&mut store, rec)
            };
            match result {
                Ok(reports) => {
                    written.push(id);
                    self.submit_reports(reports);
                }
                Err((rest, _)) => {
                    self.unrecorded.borrow_mut().push_front(rest);
                    break;
                }
            }
        }
        if written.is_empty() {
            return;
        }
        let still: HashSet<QueueId> = self.unrecorded.borrow().iter().map(|r| r.id).collect();
        for id in written {
            if !still.contains(&id) {
                self.blocked.borrow_mut().remove(&id);
                self.reschedule(id);
            }
        }
        if !self.paused() {
            tracing::info!(
                target: eventlog::QMGR,
                "shard {}: delivery resumed: every kept outcome is recorded",
                self.shard
            );
        }
    }

    /// After an outcome: a message still pending with no job out is scheduled for its earliest due recipient.
    /// Puts `id` back in the schedule at its earliest open recipient's due time (not before the end of a
    /// postponement).
    fn reschedule(&self, id: QueueId) {
        if self.in_flight.borrow().contains_key(&id) || self.blocked.borrow().contains(&id) {
            return;
        }
        // Recipients handed back unattempted (a full destination queue) wait their second, whichever of the
        // message's outcomes comes last.
        let not_before = self.postponed_until.borrow_mut().remove(&id).unwrap_or(0);
        let store = self.queue.store();
        let Some(pm) = store.get(id) else { return };
        if pm.held {
            return;
        }
        // A recipient still pending here had no result (cannot happen with complete outcomes): look again in a
        // second rather than at once, so nothing loops hot and nothing is forgotten.
        let floor = now_ms() + 1000;
        let due = pm
            .open_recipients()
            .map(|(_, _, s)| match due_ms(s) {
                0 => floor,
                d => d,
            })
            .min()
            .map(|d| d.max(not_before));
        if let Some(due) = due {
            self.schedule.borrow_mut().insert((due, id));
        }
    }

    /// After an operator's change to `id` (its records appended): a released or flushed message is looked at
    /// at once (its due recipients leave; `submit` puts the others back in the schedule); a bounce queued for
    /// it leaves once durable. Hold and delete need nothing: a held or gone message is skipped when its
    /// schedule entry comes up, and an outcome for it finds nothing to schedule.
    pub fn after_admin(
        self: &Rc<Self>,
        action: crate::control::QueueAction,
        id: QueueId,
        bounce: Option<(QueueId, CommitTicket)>,
    ) {
        use crate::control::QueueAction;
        if matches!(action, QueueAction::Release | QueueAction::Flush) {
            self.postponed_until.borrow_mut().remove(&id);
            self.schedule.borrow_mut().insert((0, id));
        }
        self.submit_bounce(bounce);
    }

    /// The message `id`, just accepted and durable with the envelope `env`, had addresses that aliases
    /// expanded into several recipients with NOTIFY=SUCCESS (`expanded`: each address as given, with its
    /// RCPT's parameters): queues its one "expanded" report (RFC 3461 6.2.7.3) right after it, submitted once
    /// durable. Never for the null sender. A queue that cannot take it logs that the report is lost; the
    /// message stays accepted.
    pub async fn queue_expanded_report(
        self: &Rc<Self>,
        id: QueueId,
        env: &Envelope,
        expanded: &[(String, crate::smtp::dsn::RcptDsn)],
    ) {
        if expanded.is_empty() || env.sender.is_empty() {
            return;
        }
        let _ = self.queue.room_for(BOUNCE_RECORD_BYTES_BOUND).await;
        let written = {
            let mut store = self.queue.store();
            let Some(b) = dsn::queued_expanded(
                &mut store,
                &self.cfg.myhostname,
                id,
                env,
                expanded,
                now_ms(),
            ) else {
                return;
            };
            match store.append_message(b.id, &b.env, &b.received, &b.data) {
                Ok(t) => {
                    tracing::info!(
                        target: eventlog::BOUNCE,
                        event = "success_report",
                        queue_id = %id,
                        bounce_id = %b.id,
                        "{}: sender delivery status notification: {}",
                        id,
                        b.id
                    );
                    Some((b.id, t))
                }
                Err(e) => {
                    tracing::error!(
                        target: eventlog::BOUNCE,
                        "shard {}: cannot queue the expanded report for {id}: {e}",
                        self.shard
                    );
                    None
                }
            }
        };
        self.submit_bounce(written);
    }

    /// Submits queued reports once their records are durable.
    fn submit_reports(self: &Rc<Self>, reports: Vec<(QueueId, CommitTicket)>) {
        for r in reports {
            self.submit_bounce(Some(r));
        }
    }

    /// Submits a queued bounce once its record is durable.
    fn submit_bounce(self: &Rc<Self>, dsn: Option<(QueueId, CommitTicket)>) {
        if let Some((bid, ticket)) = dsn {
            let me = self.clone();
            glommio::spawn_local(async move {
                if me.queue.durable(ticket).await.is_ok() {
                    me.submit(bid);
                }
            })
            .detach();
        }
    }
}

/// When a recipient is due: now for pending ones, its next attempt for deferred ones.
fn due_ms(s: RcptState) -> u64 {
    match s {
        RcptState::Deferred {
            next_attempt_unix_s,
            ..
        } => next_attempt_unix_s * 1000,
        _ => 0,
    }
}

/// Test helpers: a durable message in a shard queue, a recipient deferred with a retry time long past.
#[cfg(test)]
mod test_support {
    use super::*;

    pub async fn queued_message(queue: &ShardQueue, rcpts: &[&str]) -> QueueId {
        let (id, ticket) = {
            let mut st = queue.store();
            let id = st.allocate_id();
            let env = Envelope {
                egress_pool: None,
                sender: "s@client.example".into(),
                recipients: rcpts.iter().map(|r| r.to_string()).collect(),
                arrival_unix_ms: now_ms(),
                client_addr: "127.0.0.1".into(),
                client_helo: "c".into(),
                tls: String::new(),
                auth_user: String::new(),
                smtputf8: false,
                body_8bitmime: false,
                dsn: Default::default(),
            };
            let t = st
                .append_message(id, &env, b"Received: x\r\n", b"Subject: t\r\n\r\nhi\r\n")
                .unwrap();
            (id, t)
        };
        queue.durable(ticket).await.unwrap();
        id
    }

    /// Shard 0's dispatcher among `shards`, its jobs going to `jobs`.
    pub fn dispatcher(
        queue: &Rc<ShardQueue>,
        cfg: &Arc<Config>,
        shards: usize,
        jobs: &Rc<Outbox<Job>>,
    ) -> Rc<Dispatcher> {
        Dispatcher::new(
            0,
            shards,
            cfg.clone(),
            queue.clone(),
            Rc::new(Router::new(cfg)),
            Arc::new(RelayPolicy::new(cfg)),
            jobs.clone(),
        )
    }

    pub async fn deferred_long_ago(queue: &ShardQueue, id: QueueId, index: u32) {
        let state = RcptState::Deferred {
            next_attempt_unix_s: 1, // long past: due at once
            attempts: 1,
        };
        let t = queue
            .store()
            .append_progress(id, index, state, "451 earlier")
            .unwrap();
        queue.durable(t).await.unwrap();
    }
}

#[cfg(test)]
mod routing_tests {
    use super::test_support::*;
    use super::*;
    use crate::shard::owner::Peer;

    fn cfg() -> Arc<Config> {
        let mut c = Config {
            mydestination: vec!["localhost".into()],
            ..Config::default()
        };
        c.transport
            .insert("special.example".into(), "[127.0.0.9]:25".parse().unwrap());
        Arc::new(c)
    }

    /// `submit` groups a message's due recipients by destination and hands each group to its owner's outbox
    /// slot (the local-delivery peer for mydestination); an outcome that makes every recipient final ends the
    /// message, and one that defers keeps it with a retry time.
    #[test]
    fn recipients_are_grouped_by_destination_and_sent_to_their_owners() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg();
        glommio::LocalExecutor::default().run(async {
            let (store, _) = QueueStore::open_shard(dir.path(), 0, 1 << 20).unwrap();
            let queue = ShardQueue::new(store);
            let rcpts = [
                "a@localhost",
                "b@special.example",
                "c@other.example",
                "d@other.example",
                "e@yahoo.example",
            ];
            let id = queued_message(&queue, &rcpts).await;
            let jobs: Rc<Outbox<Job>> = Outbox::new();
            let shards = 4;
            let d = dispatcher(&queue, &cfg, shards, &jobs);
            d.submit(id);
            assert_eq!(
                jobs.len(),
                4,
                "local, the [transport] host, other.example, yahoo.example"
            );
            jobs.close();
            let mut out = Vec::new();
            while let Some((to, job)) = jobs.next().await {
                let want = owner_of(&job.nexthop, shards).index(shards);
                assert_eq!(to, want, "{:?}", job.nexthop);
                let mut who: Vec<String> = job.rcpts.iter().map(|r| r.address.clone()).collect();
                who.sort_unstable();
                out.push((job.nexthop.clone(), who, job));
            }
            let local = out.iter().find(|(h, _, _)| *h == Nexthop::Local).unwrap();
            assert_eq!(local.1, ["a@localhost"]);
            assert_eq!(owner_of(&local.0, shards), Peer::Local);
            let other = out
                .iter()
                .find(|(_, w, _)| w.iter().any(|a| a == "c@other.example"))
                .unwrap();
            assert_eq!(other.1, ["c@other.example", "d@other.example"]);
            assert!(out.iter().any(|(h, _, _)| *h
                == Nexthop::Host {
                    host: "127.0.0.9".into(),
                    port: 25
                }));
            // Every job delivered except yahoo's recipient, deferred: the message stays, one recipient open.
            for (hop, _, job) in &out {
                let deferred = *hop
                    == Nexthop::Mx {
                        domain: "yahoo.example".into(),
                        port: 25,
                    };
                d.on_outcome(Outcome {
                    id,
                    results: job
                        .rcpts
                        .iter()
                        .map(|r| {
                            let res = if deferred {
                                RcptResult::Deferred {
                                    reply: "451 4.7.0 try later".into(),
                                }
                            } else {
                                RcptResult::Delivered {
                                    reply: "250 ok".into(),
                                }
                            };
                            (r.index, res)
                        })
                        .collect(),
                    remote: None,
                    attempted_unix_ms: now_ms(),
                    next_hop_dsn: false,
                    retry: None,
                });
            }
            {
                let st = queue.store();
                let pm = st.get(id).expect("still pending: one recipient deferred");
                let open: Vec<&str> = pm.open_recipients().map(|(_, a, _)| a).collect();
                assert_eq!(open, ["e@yahoo.example"]);
                assert!(matches!(
                    pm.states[4],
                    RcptState::Deferred { attempts: 1, .. }
                ));
                assert!(matches!(pm.states[0], RcptState::Delivered));
            }
            // Handed back unattempted (its destination's queue was full): no attempt counted, nothing written,
            // and offered again a second later, not at once (its old retry time does not make it due now).
            let before = now_ms();
            deferred_long_ago(&queue, id, 4).await;
            d.schedule.borrow_mut().clear();
            d.on_outcome(Outcome {
                id,
                results: vec![(
                    4,
                    RcptResult::Postponed {
                        reply: "4.4.5 full".into(),
                    },
                )],
                remote: None,
                attempted_unix_ms: now_ms(),
                next_hop_dsn: false,
                retry: None,
            });
            let st = queue.store();
            assert!(matches!(
                st.get(id).unwrap().states[4],
                RcptState::Deferred { attempts: 1, .. }
            ));
            let sched: Vec<(u64, QueueId)> = d.schedule.borrow().iter().copied().collect();
            assert_eq!(sched.len(), 1);
            assert!(sched[0].0 >= before + POSTPONED_RETRY_AFTER_MS, "{sched:?}");
        });
    }
}

#[cfg(test)]
mod postponed_tests {
    use super::test_support::*;
    use super::*;

    /// A message with two destination groups: one job comes back postponed while the other is still out. The
    /// postponement holds when the second outcome arrives and reschedules the message (a review found it was
    /// lost: the recipient went straight back to the full destination).
    #[test]
    fn postponed_delay_survives_a_later_outcome_of_the_same_message() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Arc::new(Config::default());
        glommio::LocalExecutor::default().run(async {
            let (store, _) = QueueStore::open_shard(dir.path(), 0, 1 << 20).unwrap();
            let queue = ShardQueue::new(store);
            let id = queued_message(&queue, &["a@x.example", "b@y.example"]).await;
            for i in 0..2 {
                deferred_long_ago(&queue, id, i).await;
            }
            let jobs: Rc<Outbox<Job>> = Outbox::new();
            let d = dispatcher(&queue, &cfg, 2, &jobs);
            d.submit(id);
            assert_eq!(jobs.len(), 2);
            jobs.close();
            let mut out = Vec::new();
            while let Some((_, job)) = jobs.next().await {
                out.push(job);
            }
            let before = now_ms();
            let job_for = |a: &str| out.iter().find(|j| j.rcpts[0].address == a).unwrap();
            d.on_outcome(Outcome {
                id,
                remote: None,
                attempted_unix_ms: now_ms(),
                next_hop_dsn: false,
                retry: None,
                results: vec![(
                    job_for("a@x.example").rcpts[0].index,
                    RcptResult::Postponed {
                        reply: "4.4.5 full".into(),
                    },
                )],
            });
            d.on_outcome(Outcome {
                id,
                remote: None,
                attempted_unix_ms: now_ms(),
                next_hop_dsn: false,
                retry: None,
                results: vec![(
                    job_for("b@y.example").rcpts[0].index,
                    RcptResult::Deferred {
                        reply: "451 4.7.0 later".into(),
                    },
                )],
            });
            let sched: Vec<(u64, QueueId)> = d.schedule.borrow().iter().copied().collect();
            assert!(!sched.is_empty());
            assert!(
                sched
                    .iter()
                    .all(|(due, _)| *due >= before + POSTPONED_RETRY_AFTER_MS),
                "postponed recipient rescheduled at once: {sched:?} (before = {before})"
            );
            assert!(
                d.postponed_until.borrow().is_empty(),
                "consumed by the reschedule"
            );
        });
    }

    /// A shaping rule's retry delay (`Outcome::retry`) replaces `minimal_backoff_time` for that deferral.
    #[test]
    fn a_shaped_retry_delay_schedules_the_next_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Arc::new(Config::default());
        glommio::LocalExecutor::default().run(async {
            let (store, _) = QueueStore::open_shard(dir.path(), 0, 1 << 20).unwrap();
            let queue = ShardQueue::new(store);
            let id = queued_message(&queue, &["a@x.example", "b@y.example"]).await;
            let jobs: Rc<Outbox<Job>> = Outbox::new();
            let d = dispatcher(&queue, &cfg, 1, &jobs);
            let before = now_ms();
            let deferred = |i: u32| {
                vec![(
                    i,
                    RcptResult::Deferred {
                        reply: "451 4.7.0 later".into(),
                    },
                )]
            };
            d.on_outcome(Outcome {
                id,
                remote: None,
                attempted_unix_ms: before,
                next_hop_dsn: false,
                retry: Some((
                    std::time::Duration::from_secs(7200),
                    std::time::Duration::from_secs(9000),
                )),
                results: deferred(0),
            });
            d.on_outcome(Outcome {
                id,
                remote: None,
                attempted_unix_ms: before,
                next_hop_dsn: false,
                retry: None,
                results: deferred(1),
            });
            let due = |i: usize| due_ms(queue.store().get(id).unwrap().states[i]);
            assert!(due(0) >= before + 7_200_000, "the shaped delay");
            assert!(due(1) < before + 7_200_000, "minimal_backoff_time (300s)");
            assert!(due(1) >= before + 300_000);
        });
    }
}

#[cfg(test)]
mod report_tests {
    use super::test_support::*;
    use super::*;
    use crate::smtp::dsn::{EnvelopeDsn, Notify, RcptDsn};

    /// Reports queued so far: (sender, recipients, content) of every null-sender message in the queue.
    fn reports(queue: &ShardQueue) -> Vec<String> {
        let st = queue.store();
        st.pending()
            .filter(|pm| pm.envelope.sender.is_empty())
            .map(|pm| String::from_utf8_lossy(st.message_data(pm.id).unwrap().1).into_owned())
            .collect()
    }

    fn outcome(id: QueueId, results: Vec<(u32, RcptResult)>) -> Outcome {
        Outcome {
            id,
            results,
            remote: Some("mx.remote.example [192.0.2.1]".into()),
            attempted_unix_ms: now_ms(),
            next_hop_dsn: false,
            retry: None,
        }
    }

    fn deferred() -> RcptResult {
        RcptResult::Deferred {
            reply: "451 4.7.1 greylisted".into(),
        }
    }

    /// NOTIFY decides who is in which report; the delay warning is sent once per message and marked in the
    /// queue (its recovery: `queue::tests::dsn_facts_and_delay_warning_survive_recovery_and_compaction`); a
    /// next hop with DSN gets no "relayed" report from here.
    #[test]
    fn notify_decides_and_the_delay_warning_is_sent_once() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Arc::new(Config {
            delay_warning_time: Some(crate::config::PfDuration(std::time::Duration::from_secs(
                60,
            ))),
            ..Config::default()
        });
        glommio::LocalExecutor::default().run(async {
            let (store, _) = QueueStore::open_shard(dir.path(), 0, 1 << 20).unwrap();
            let queue = ShardQueue::new(store);
            let n = |s: &str| RcptDsn {
                notify: Notify::parse(s).ok(),
                orcpt: None,
            };
            let (id, ticket) = {
                let mut st = queue.store();
                let id = st.allocate_id();
                let env = Envelope {
                    sender: "s@client.example".into(),
                    recipients: [
                        "never@r.example",
                        "fail@r.example",
                        "ok@r.example",
                        "dsn@r.example",
                        "late@r.example",
                    ]
                    .iter()
                    .map(|r| r.to_string())
                    .collect(),
                    // Two minutes old: past the one-minute delay_warning_time.
                    arrival_unix_ms: now_ms() - 120_000,
                    dsn: EnvelopeDsn {
                        rcpts: vec![
                            n("NEVER"),
                            n("FAILURE"),
                            n("SUCCESS"),
                            n("SUCCESS"),
                            RcptDsn::default(),
                        ],
                        ..Default::default()
                    },
                    ..Default::default()
                };
                let t = st
                    .append_message(id, &env, b"Received: x\r\n", b"Subject: t\r\n\r\nhi\r\n")
                    .unwrap();
                (id, t)
            };
            queue.durable(ticket).await.unwrap();
            let jobs: Rc<Outbox<Job>> = Outbox::new();
            let d = dispatcher(&queue, &cfg, 1, &jobs);
            let bounced = |r: &str| RcptResult::Bounced {
                reply: r.into(),
                status: crate::smtp::reply_parser::EnhancedCode::new(5, 1, 1),
            };
            // Both fail: only FAILURE's recipient is reported. ok@ is delivered by a host without DSN: relayed.
            // Two deferrals: one delay report, for late@ only (fail@'s NOTIFY has no DELAY; never@ is final).
            d.on_outcome(outcome(
                id,
                vec![
                    (0, bounced("550 5.1.1 no")),
                    (1, bounced("550 5.1.1 no")),
                    (
                        2,
                        RcptResult::Delivered {
                            reply: "250 ok".into(),
                        },
                    ),
                    (4, deferred()),
                ],
            ));
            let r = reports(&queue);
            assert_eq!(r.len(), 3, "{r:#?}");
            let failed = r.iter().find(|m| m.contains("Action: failed")).unwrap();
            assert!(
                failed.contains("Final-Recipient: rfc822; fail@r.example"),
                "{failed}"
            );
            assert!(!failed.contains("never@"), "{failed}");
            let relayed = r.iter().find(|m| m.contains("Action: relayed")).unwrap();
            assert!(
                relayed.contains("Final-Recipient: rfc822; ok@r.example"),
                "{relayed}"
            );
            let delayed = r.iter().find(|m| m.contains("Action: delayed")).unwrap();
            assert!(
                delayed.contains("Final-Recipient: rfc822; late@r.example")
                    && delayed.contains("Status: 4.7.1")
                    && delayed.contains("Will-Retry-Until: "),
                "{delayed}"
            );
            assert!(queue.store().get(id).unwrap().envelope.dsn.delay_warned);
            // Another deferral: no second warning. dsn@ delivered by a host with DSN: no report from here.
            d.on_outcome(Outcome {
                next_hop_dsn: true,
                retry: None,
                ..outcome(
                    id,
                    vec![
                        (
                            3,
                            RcptResult::Delivered {
                                reply: "250 ok".into(),
                            },
                        ),
                        (4, deferred()),
                    ],
                )
            });
            assert_eq!(reports(&queue).len(), 3, "{:#?}", reports(&queue));
        });
    }

    /// A durable message from `s@client.example`, `age_ms` old, to `rcpts` with these DSN facts.
    async fn queued_with(
        queue: &ShardQueue,
        rcpts: &[&str],
        dsn: Vec<RcptDsn>,
        age_ms: u64,
    ) -> QueueId {
        let (id, ticket) = {
            let mut st = queue.store();
            let id = st.allocate_id();
            let env = Envelope {
                sender: "s@client.example".into(),
                recipients: rcpts.iter().map(|r| r.to_string()).collect(),
                arrival_unix_ms: now_ms() - age_ms,
                dsn: EnvelopeDsn {
                    rcpts: dsn,
                    ..Default::default()
                },
                ..Default::default()
            };
            let t = st
                .append_message(id, &env, b"Received: x\r\n", b"Subject: t\r\n\r\nhi\r\n")
                .unwrap();
            (id, t)
        };
        queue.durable(ticket).await.unwrap();
        id
    }

    /// While delivery is paused (an earlier outcome waits to be recorded), two deferring outcomes of one
    /// message past `delay_warning_time` make one delay warning, not two (the first one's "delay warned" mark
    /// was not in the queue yet when the second was looked at).
    #[test]
    fn one_delay_warning_while_delivery_is_paused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Arc::new(Config {
            delay_warning_time: Some(crate::config::PfDuration(std::time::Duration::from_secs(
                60,
            ))),
            ..Config::default()
        });
        glommio::LocalExecutor::default().run(async {
            let (store, _) = QueueStore::open_shard(dir.path(), 0, 1 << 20).unwrap();
            let queue = ShardQueue::new(store);
            let other = queued_message(&queue, &["o@r.example"]).await;
            let id =
                queued_with(&queue, &["a@r.example", "b@r.example"], Vec::new(), 120_000).await;
            let jobs: Rc<Outbox<Job>> = Outbox::new();
            let d = dispatcher(&queue, &cfg, 1, &jobs);
            // Paused: another message's outcome waits to be recorded.
            d.keep(
                Recording {
                    id: other,
                    reports: Vec::new(),
                    delay_warned: false,
                    updates: Vec::new(),
                },
                None,
            );
            assert!(d.paused());
            d.on_outcome(outcome(id, vec![(0, deferred())]));
            d.on_outcome(outcome(id, vec![(1, deferred())]));
            assert_eq!(d.unrecorded_count(), 3);
            d.retry_unrecorded();
            assert!(!d.paused());
            let r = reports(&queue);
            let delayed = r.iter().filter(|m| m.contains("Action: delayed")).count();
            assert_eq!(delayed, 1, "{r:#?}");
            assert!(queue.store().get(id).unwrap().envelope.dsn.delay_warned);
        });
    }

    /// An address that appears twice among a message's recipients: each copy's own NOTIFY decides (the facts
    /// were looked up by address, so both copies got the first one's NOTIFY=NEVER).
    #[test]
    fn a_recipient_listed_twice_keeps_its_own_notify() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Arc::new(Config::default());
        glommio::LocalExecutor::default().run(async {
            let (store, _) = QueueStore::open_shard(dir.path(), 0, 1 << 20).unwrap();
            let queue = ShardQueue::new(store);
            let n = |s: &str| RcptDsn {
                notify: Notify::parse(s).ok(),
                orcpt: None,
            };
            let id = queued_with(
                &queue,
                &["x@r.example", "x@r.example"],
                vec![n("NEVER"), n("FAILURE")],
                0,
            )
            .await;
            let jobs: Rc<Outbox<Job>> = Outbox::new();
            let d = dispatcher(&queue, &cfg, 1, &jobs);
            let bounced = || RcptResult::Bounced {
                reply: "550 5.1.1 no".into(),
                status: crate::smtp::reply_parser::EnhancedCode::new(5, 1, 1),
            };
            d.on_outcome(outcome(id, vec![(0, bounced()), (1, bounced())]));
            let r = reports(&queue);
            assert_eq!(r.len(), 1, "{r:#?}");
            assert_eq!(
                r[0].matches("Final-Recipient: rfc822; x@r.example").count(),
                1,
                "{}",
                r[0]
            );
        });
    }
}
