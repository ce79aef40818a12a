//! The accepting shard's side of delivery: which recipients of its queued messages are due, grouped into jobs by
//! next hop and sent to the destination owners; outcomes applied as progress records; retries scheduled with
//! backoff; expiry; bounces (DSNs) queued as new messages with the null sender.
//!
//! Bounds: at most `IN_FLIGHT_MESSAGES_MAX` messages out at a time per shard (the rest wait in the schedule);
//! the schedule holds at most one entry per pending message plus stale duplicates that are dropped when popped.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::dsn::{self, FailedRcpt};
use super::route::{owner_shard, Nexthop, Router};
use super::{backoff, Job, JobRcpt, Outcome, RcptResult};
use crate::config::Config;
use crate::policy::RelayPolicy;
use crate::queue::{Envelope, QueueId, RcptState, ShardQueue};

/// Most messages with jobs out at once per shard.
pub const IN_FLIGHT_MESSAGES_MAX: usize = 20_000;
/// How often the schedule is looked at.
const TICK: Duration = Duration::from_millis(200);

type JobSink = Box<dyn Fn(usize, Job)>;

pub struct Dispatcher {
    shard: usize,
    /// SMTP shards; the local-delivery shard is the mesh peer after them (index `shards`).
    shards: usize,
    cfg: Arc<Config>,
    queue: Rc<ShardQueue>,
    router: Rc<Router>,
    policy: Arc<RelayPolicy>,
    /// (due unix ms, id).
    schedule: RefCell<BTreeSet<(u64, QueueId)>>,
    /// Jobs still out per message.
    in_flight: RefCell<HashMap<QueueId, u32>>,
    send_job: JobSink,
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
        send_job: JobSink,
    ) -> Rc<Dispatcher> {
        Rc::new(Dispatcher {
            shard,
            shards,
            cfg,
            queue,
            router,
            policy,
            schedule: RefCell::new(BTreeSet::new()),
            in_flight: RefCell::new(HashMap::new()),
            send_job,
        })
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
            self.run_due();
            glommio::timer::sleep(TICK).await;
        }
    }

    fn run_due(&self) {
        let now = now_ms();
        loop {
            if self.in_flight.borrow().len() >= IN_FLIGHT_MESSAGES_MAX {
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
        if !self.cfg.delivery.enabled || self.in_flight.borrow().contains_key(&id) {
            return;
        }
        if self.in_flight.borrow().len() >= IN_FLIGHT_MESSAGES_MAX {
            self.schedule.borrow_mut().insert((0, id));
            return;
        }
        let now = now_ms();
        let mut groups: Vec<(Nexthop, Vec<JobRcpt>)> = Vec::new();
        let mut later: Option<u64> = None;
        let store = self.queue.store();
        let Some(pm) = store.get(id) else { return };
        for (i, addr, state) in pm.open_recipients() {
            let due = due_ms(state);
            if due > now {
                later = Some(later.map_or(due, |l| l.min(due)));
                continue;
            }
            let domain = domain_of(addr);
            // mydestination and `transport = "local"` domains go to the local-delivery shard.
            let hop = if self.policy.is_local_domain(domain) {
                Nexthop::Local
            } else {
                self.router
                    .route(&crate::smtp::address::normalize_domain(domain))
            };
            let attempts = match state {
                RcptState::Deferred { attempts, .. } => attempts,
                _ => 0,
            };
            let r = JobRcpt {
                index: i as u32,
                address: addr.to_string(),
                attempts,
            };
            match groups.iter_mut().find(|(h, _)| *h == hop) {
                Some((_, v)) => v.push(r),
                None => groups.push((hop, vec![r])),
            }
        }
        if let Some(l) = later {
            self.schedule.borrow_mut().insert((l, id));
        }
        if groups.is_empty() {
            return;
        }
        let Some(body) = store.message_body(id) else {
            // Not in the file yet (its sync is still running): look again shortly.
            self.schedule.borrow_mut().insert((now + 100, id));
            return;
        };
        let env: &Envelope = &pm.envelope;
        let jobs: Vec<Job> = groups
            .into_iter()
            .map(|(nexthop, rcpts)| Job {
                origin_shard: self.shard,
                id,
                sender: env.sender.clone(),
                rcpts,
                body: body.clone(),
                smtputf8: env.smtputf8,
                eight_bit: env.body_8bitmime,
                arrival_unix_ms: env.arrival_unix_ms,
                nexthop,
            })
            .collect();
        drop(store);
        self.in_flight.borrow_mut().insert(id, jobs.len() as u32);
        for job in jobs {
            let owner = if job.nexthop == Nexthop::Local {
                self.shards
            } else {
                owner_shard(&job.nexthop.key(), self.shards)
            };
            (self.send_job)(owner, job);
        }
    }

    /// Applies one job's results: progress records, retries, expiry, bounces.
    pub fn on_outcome(self: &Rc<Self>, o: Outcome) {
        let now = now_ms();
        let mut dsn_id = None;
        {
            let mut store = self.queue.store();
            let Some(pm) = store.get(o.id) else {
                self.in_flight.borrow_mut().remove(&o.id);
                return;
            };
            let env = pm.envelope.clone();
            let states = pm.states.clone();
            let lifetime = if env.sender.is_empty() {
                self.cfg.bounce_queue_lifetime.0
            } else {
                self.cfg.maximal_queue_lifetime.0
            };
            let expires = env.arrival_unix_ms + lifetime.as_millis() as u64;
            let mut updates: Vec<(u32, RcptState, String)> = Vec::with_capacity(o.results.len());
            let mut failed: Vec<(String, (u8, u16, u16), String)> = Vec::new();
            let mut expired = false;
            for (idx, r) in &o.results {
                let Some(prev) = states.get(*idx as usize) else {
                    continue;
                };
                if prev.is_final() {
                    continue;
                }
                let addr = env.recipients[*idx as usize].clone();
                match r {
                    RcptResult::Delivered { reply } => {
                        updates.push((*idx, RcptState::Delivered, reply.clone()))
                    }
                    RcptResult::Bounced { reply, status } => {
                        updates.push((*idx, RcptState::Bounced, reply.clone()));
                        failed.push((addr, *status, reply.clone()));
                    }
                    RcptResult::Deferred { reply } => {
                        let attempts = match prev {
                            RcptState::Deferred { attempts, .. } => attempts + 1,
                            _ => 1,
                        };
                        let next = now
                            + backoff(
                                attempts,
                                self.cfg.minimal_backoff_time.0,
                                self.cfg.maximal_backoff_time.0,
                            )
                            .as_millis() as u64;
                        if now >= expires {
                            expired = true;
                            let why = format!("4.4.7 delivery time expired; last error: {reply}");
                            updates.push((*idx, RcptState::Bounced, why.clone()));
                            failed.push((addr, (4, 4, 7), why));
                        } else {
                            updates.push((
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
            // The bounce goes into the queue before the progress records that make it necessary: a crash between
            // the two can repeat the attempt, never lose the bounce.
            if !failed.is_empty() && !env.sender.is_empty() {
                let original = pm_headers(&store, o.id);
                let report: Vec<FailedRcpt<'_>> = failed
                    .iter()
                    .map(|(a, s, d)| FailedRcpt {
                        address: a,
                        status: *s,
                        diagnostic: d,
                        remote_mta: o.remote.as_deref(),
                    })
                    .collect();
                let id_s = o.id.to_string();
                let data = dsn::build(
                    &self.cfg.myhostname,
                    &env.sender,
                    &id_s,
                    env.arrival_unix_ms / 1000,
                    now / 1000,
                    &report,
                    &original,
                    expired,
                );
                let bounce_id = store.allocate_id();
                let received = format!(
                    "Received: by {} (shardmta) id {bounce_id}; {}\r\n",
                    self.cfg.myhostname,
                    crate::smtp::session::rfc5322_date(now / 1000)
                )
                .into_bytes();
                let benv = Envelope {
                    sender: String::new(),
                    recipients: vec![env.sender.clone()],
                    arrival_unix_ms: now,
                    client_addr: String::new(),
                    client_helo: String::new(),
                    tls: String::new(),
                    auth_user: String::new(),
                    smtputf8: false,
                    body_8bitmime: false,
                };
                match store.append_message(bounce_id, &benv, &received, &data) {
                    Ok(t) => dsn_id = Some((bounce_id, t)),
                    Err(e) => eprintln!(
                        "shardmta: shard {}: cannot queue bounce for {}: {e}",
                        self.shard, o.id
                    ),
                }
            } else if !failed.is_empty() {
                eprintln!(
                    "shardmta: shard {}: {} bounced, sender is null: no bounce of a bounce",
                    self.shard, o.id
                );
            }
            for (idx, state, diag) in &updates {
                if let Err(e) = store.append_progress(o.id, *idx, *state, diag) {
                    eprintln!("shardmta: shard {}: progress for {}: {e}", self.shard, o.id);
                }
            }
            let mut inf = self.in_flight.borrow_mut();
            let left = inf.get_mut(&o.id).map(|n| {
                *n = n.saturating_sub(1);
                *n
            });
            if left == Some(0) || left.is_none() {
                inf.remove(&o.id);
                // Still pending: next attempt when its earliest deferred recipient is due.
                if let Some(pm) = store.get(o.id) {
                    let due = pm
                        .open_recipients()
                        .map(|(_, _, s)| due_ms(s))
                        .filter(|&d| d > 0)
                        .min();
                    if let Some(due) = due {
                        self.schedule.borrow_mut().insert((due, o.id));
                    }
                }
            }
        }
        if let Some((bid, ticket)) = dsn_id {
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

/// The original message's header section, for the DSN.
fn pm_headers(store: &crate::queue::QueueStore, id: QueueId) -> Vec<u8> {
    store
        .message_data(id)
        .map(|(_, data)| dsn::header_section(data).to_vec())
        .unwrap_or_default()
}
