//! A shard: one glommio executor pinned to one CPU, owning its listeners' sockets, its sessions, its queue and
//! the destinations that hash to it. This module is the shard's context ([`Shard`]) and the wiring of one
//! shard's life: join the mesh, open the queue, start inbound and delivery, tick, drain.
//!
//! - [`runtime`]: executors, placement, the ready handshake, signals.
//! - [`mesh`]: jobs to destination owners and outcomes back (`ShardMsg`), with backpressure.
//! - [`owner`]: which peer owns a destination.
//! - [`stats`]: per-shard counters and `stats.json`.
//! - [`control`]: the shard's side of the control plane (queue changes, injection, health).
//!
//! Who talks to whom: the [`Dispatcher`] (this shard's queued messages) pushes jobs into an outbox; the job
//! courier hands each to this shard's [`Agent`] or sends it over the mesh; the agent (destinations this shard
//! owns) pushes outcomes into another outbox, whose courier hands each to the dispatcher of the accepting shard.
//! Neither holds the other: the shard context owns both and the couriers.

pub mod control;
pub mod mesh;
pub mod owner;
pub mod runtime;
pub mod stats;

use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_lite::StreamExt;
use glommio::channels::channel_mesh::Receivers;
use glommio::net::TcpListener;

use crate::anvil::AuthGuard;
use crate::config::Config;
use crate::control::{ControlPlane, ShardRequests};
use crate::delivery::agent::Agent;
use crate::delivery::dispatcher::Dispatcher;
use crate::delivery::log::DeliveryLog;
use crate::delivery::route::Router;
use crate::delivery::{Job, Outcome, ShardMsg};
use crate::dns::MxResolver;
use crate::inbound::Inbound;
use crate::limits;
use crate::local::recipients::RecipientTable;
use crate::local::shard::LocalDelivery;
use crate::queue::{QueueError, QueueStore, ShardQueue};
use crate::reloadable::{Live, ReloadControl, SettingsView};
use mesh::{MeshLink, MeshPlan, Outbox};
use owner::{owner_of, Peer};
use runtime::Ready;
use stats::{ShardStats, StatsBoard};

/// Why a shard could not start; carried to the main thread by the ready handshake.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("shard {shard}: {message}")]
    Mesh { shard: usize, message: String },
    #[error("shard {shard}: queue: {source}")]
    Queue { shard: usize, source: QueueError },
}

/// State shared by all shards.
pub struct Shared {
    /// The configuration the server started with: what needs a restart (listeners, spool, limits of the
    /// session table, ...). What a reload changes is read from `live`.
    pub cfg: Arc<Config>,
    /// The reloadable settings (relay policy, session settings per listener, TLS, AUTH users, routing): each
    /// shard reads them through its own [`SettingsView`].
    pub live: Arc<Live>,
    pub shutdown: Arc<AtomicBool>,
    pub stats: Arc<StatsBoard>,
    pub recipients: Arc<RecipientTable>,
    /// AUTH failures per client address, over all shards.
    pub auth_guard: Arc<AuthGuard>,
    /// Asks the main thread for a configuration reload (as SIGHUP does) and tells what it came to.
    pub reload: Arc<ReloadControl>,
    /// The control plane's handle (the HTTP API uses it) and each SMTP shard's request channel, in shard order.
    pub control: ControlPlane,
    pub control_requests: Vec<ShardRequests>,
    /// The suppression list (read by every dispatcher, changed by the HTTP executor and its writer thread).
    pub suppression: Arc<crate::suppression::Suppression>,
}

impl Shared {
    /// SMTP shards (the local-delivery shard is the mesh peer after them).
    pub fn shards(&self) -> usize {
        self.stats.shards.len()
    }
}

/// One SMTP shard's context, owned by its executor thread.
pub struct Shard {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub queue: Rc<ShardQueue>,
    pub stats: Arc<ShardStats>,
    pub dispatcher: Rc<Dispatcher>,
    pub agent: Rc<Agent>,
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

fn delivery_log_path(cfg: &Config) -> std::path::PathBuf {
    cfg.delivery
        .delivery_log
        .clone()
        .unwrap_or_else(|| cfg.queue_directory.join("delivery.log"))
}

/// The life of SMTP shard `id`: join the mesh (first: every peer waits there for all), open and recover the
/// queue, start delivery and the listeners, report ready, tick until shutdown, drain.
pub async fn smtp_shard(
    id: usize,
    shared: Arc<Shared>,
    sockets: Vec<(usize, OwnedFd)>,
    mut ready: Ready<ShardError>,
    plan: MeshPlan,
) {
    let cfg = shared.cfg.clone();
    let (link, inbox) = match plan.join(id).await {
        Ok(x) => x,
        Err(message) => return ready.failed(ShardError::Mesh { shard: id, message }),
    };
    let store = match QueueStore::open_shard(&cfg.queue_directory, id as u8, cfg.queue_segment_size)
    {
        Ok((store, report)) => {
            for note in &report.notes {
                tracing::warn!(target: crate::eventlog::QUEUE, "shard {id}: {note}");
            }
            if report.pending_messages > 0 || report.torn_tails > 0 || report.corrupt_records > 0 {
                tracing::info!(
                    target: crate::eventlog::QUEUE,
                    "shard {id}: recovered {} pending message(s), {} recipient(s) from {} segment(s) ({} record(s); {} torn tail(s), {} damaged region(s) skipped, {} file(s) set aside)",
                    report.pending_messages,
                    report.pending_recipients,
                    report.segments_scanned,
                    report.records,
                    report.torn_tails,
                    report.corrupt_records,
                    report.files_set_aside
                );
            }
            store
        }
        Err(source) => return ready.failed(ShardError::Queue { shard: id, source }),
    };
    let listeners: Vec<(usize, Rc<TcpListener>)> = sockets
        .into_iter()
        .map(|(i, fd)| {
            // SAFETY: a listening socket bound for this shard at start; ownership passes to the listener.
            (
                i,
                Rc::new(unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) }),
            )
        })
        .collect();
    let queue = ShardQueue::with_commit_delay(
        store,
        std::time::Duration::from_micros(cfg.queue_commit_delay_us),
    );
    let shards = shared.shards();
    // This shard's view of the reloadable settings: delivery takes a reload at the next tick.
    let settings = SettingsView::new(shared.live.clone());
    let router = Rc::new(Router::new(&settings.get().cfg));
    let log = Rc::new(DeliveryLog::open(
        &delivery_log_path(&cfg),
        crate::delivery::plan::Policy::from_config(&settings.get().cfg),
    ));
    glommio::spawn_local(log.clone().run()).detach();
    let jobs: Rc<Outbox<Job>> = Outbox::new();
    let outcomes: Rc<Outbox<Outcome>> = Outbox::new();
    let agent = Agent::new(
        settings.get().cfg.clone(),
        router.clone(),
        MxResolver::new(cfg.dns.clone()),
        log.clone(),
        outcomes.clone(),
        id,
        shards,
        jobs.clone(),
    );
    // Shaping: the rules of the running settings; the automation's actions of this shard as persisted.
    agent.set_shaping_rules(settings.get().shaping.clone());
    start_shaping(&agent, id, shards, &cfg.queue_directory).await;
    let dispatcher = Dispatcher::new(
        id,
        shards,
        cfg.clone(),
        queue.clone(),
        router.clone(),
        settings.get().policy.clone(),
        jobs.clone(),
    );
    dispatcher.set_suppression(
        crate::suppression::View::new(shared.suppression.clone()),
        log,
        outcomes.clone(),
        cfg.suppression_auto_add,
    );
    let shard = Rc::new(Shard {
        id,
        stats: shared.stats.shards[id].clone(),
        shared: shared.clone(),
        queue,
        dispatcher: dispatcher.clone(),
        agent: agent.clone(),
    });
    let link = Rc::new(link);
    start_couriers(&shard, &link, jobs.clone(), outcomes.clone());
    start_inbox(&shard, inbox);
    glommio::spawn_local(control::serve(
        shard.clone(),
        shared.control_requests[id].clone(),
    ))
    .detach();
    glommio::spawn_local(dispatcher.clone().run()).detach();
    let inbound = Inbound::new(shard.clone());
    let (stop_accepting, accept_tasks) = inbound.start_accepting(listeners);
    ready.ready();
    let mut ticks = 0u32;
    // Fault injection for the test of what happens when a shard dies (debug builds only).
    #[cfg(debug_assertions)]
    let panic_at = std::env::var("SHARDMTA_TEST_PANIC_SHARD_AFTER_TICKS")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|_| id == 0);
    while !shared.shutdown.load(Ordering::Relaxed) {
        glommio::timer::sleep(limits::SHARD_TICK_INTERVAL).await;
        #[cfg(debug_assertions)]
        if panic_at.is_some_and(|n| ticks >= n) {
            panic!("shard {id}: fault injected by SHARDMTA_TEST_PANIC_SHARD_AFTER_TICKS");
        }
        ticks = ticks.wrapping_add(1);
        if let Some(now) = settings.changed() {
            router.replace(&now.cfg);
            shard.agent.reconfigure(&now.cfg);
            shard.agent.set_shaping_rules(now.shaping.clone());
            shard.dispatcher.set_policy(now.policy.clone());
        }
        inbound.reap(Instant::now());
        if ticks.is_multiple_of(10) {
            inbound.give_back_memory().await;
        }
        shard.publish_stats(&inbound, &jobs, &outcomes, ticks);
        shard.agent.shaping_tick();
        if ticks.is_multiple_of(limits::SHARD_HOUSEKEEPING_INTERVAL_TICKS) {
            shard.agent.evict_idle_destinations(Instant::now());
            if let Err(e) = shard.queue.housekeeping(unix_now().as_secs()).await {
                tracing::error!(target: crate::eventlog::QUEUE, "shard {id}: housekeeping: {e}");
            }
        }
    }
    // Drain: stop accepting (the listeners close when their loops end), let sessions finish.
    drop(stop_accepting);
    for t in accept_tasks {
        t.await;
    }
    inbound.drain(cfg.shutdown_timeout.0).await;
    shard.queue.shutdown().await;
    shard.publish_stats(&inbound, &jobs, &outcomes, 0);
}

impl Shard {
    /// Copies the shard's state into its counters (every tick, `ticks` since start). The queue is counted by
    /// state (a walk over the pending index) every tick while it holds at most
    /// `METRICS_QUEUE_STATES_EVERY_TICK_MESSAGES_MAX` messages, else once per housekeeping interval.
    fn publish_stats(
        &self,
        inbound: &Inbound,
        jobs: &Outbox<Job>,
        outcomes: &Outbox<Outcome>,
        ticks: u32,
    ) {
        let s = &self.stats;
        let set = |c: &std::sync::atomic::AtomicU64, v: u64| c.store(v, Ordering::Relaxed);
        stats::ThreadCost::of_this_thread().publish(s);
        set(&s.queue_syncs, self.queue.sync_count());
        set(
            &s.pending_messages,
            self.queue.store().pending_count() as u64,
        );
        let d = &self.dispatcher;
        set(&s.delivery_paused, d.paused() as u64);
        set(&s.outcomes_unrecorded, d.unrecorded_count() as u64);
        set(&s.delivery_pauses, d.pause_count());
        set(&s.sessions_timed_out, inbound.sessions_timed_out());
        set(&s.data_bytes_held, inbound.data_bytes_held());
        let (queued, destinations) = self.agent.load();
        set(
            &s.jobs_queued,
            (queued + jobs.len() + outcomes.len()) as u64,
        );
        set(&s.destinations, destinations as u64);
        set(&s.connections_outbound, stats::OutboundConnection::count());
        let (signed, failed) = crate::dkim::signing_counts();
        set(&s.dkim_signed, signed);
        set(&s.dkim_sign_failures, failed);
        self.agent.tally.borrow_mut().publish(&s.destinations_top);
        set(
            &s.egress_source_suspensions,
            self.agent.egress_suspensions(),
        );
        let store = self.queue.store();
        if store.pending_count() <= limits::METRICS_QUEUE_STATES_EVERY_TICK_MESSAGES_MAX
            || ticks.is_multiple_of(limits::SHARD_HOUSEKEEPING_INTERVAL_TICKS)
        {
            let (mut held, mut deferred) = (0u64, 0u64);
            for m in store.pending() {
                if m.held {
                    held += 1;
                } else if m
                    .open_recipients()
                    .all(|(_, _, st)| matches!(st, crate::queue::RcptState::Deferred { .. }))
                {
                    deferred += 1;
                }
            }
            set(&s.queue_held, held);
            set(&s.queue_deferred, deferred);
            set(
                &s.queue_pending,
                (store.pending_count() as u64).saturating_sub(held + deferred),
            );
        }
    }
}

/// The couriers of an SMTP shard, one per peer and direction: jobs to their owners (this shard's agent
/// directly, others over the mesh) and outcomes to their accepting shards (this shard's dispatcher directly).
fn start_couriers(
    shard: &Rc<Shard>,
    link: &Rc<MeshLink>,
    jobs: Rc<Outbox<Job>>,
    outcomes: Rc<Outbox<Outcome>>,
) {
    // One courier per peer and direction: a peer whose channel is full holds up only what goes to it.
    for to in 0..=shard.shared.shards() {
        let (s, l, jobs) = (shard.clone(), link.clone(), jobs.clone());
        glommio::spawn_local(async move {
            while let Some(job) = jobs.next_for(to).await {
                if to == s.id {
                    s.agent.enqueue(job);
                } else {
                    l.send_job(to, job).await;
                }
            }
        })
        .detach();
        let (s, l, outcomes) = (shard.clone(), link.clone(), outcomes.clone());
        glommio::spawn_local(async move {
            while let Some(o) = outcomes.next_for(to).await {
                if to == s.id {
                    s.stats.count_outcome(&o);
                    s.dispatcher.make_room(&o).await;
                    s.dispatcher.on_outcome(o);
                } else {
                    l.send_outcome(to, o).await;
                }
            }
        })
        .detach();
    }
}

/// One task per peer and direction: jobs from other shards to this shard's agent, outcomes from the shards that
/// delivered to this shard's dispatcher. Neither waits on anything but its channel.
fn start_inbox(shard: &Rc<Shard>, mut inbox: Receivers<ShardMsg>) {
    let shards = shard.shared.shards();
    for (_, mut stream) in inbox.streams() {
        let s = shard.clone();
        glommio::spawn_local(async move {
            while let Some(msg) = stream.next().await {
                match msg {
                    ShardMsg::Job(job) => {
                        // The sender routed by the same hash; a job for another owner would split a
                        // destination's limits over two shards.
                        debug_assert!(match &job.site {
                            Some(site) => owner::owner_of_site(&site.key, shards) == s.id,
                            None => owner_of(&job.nexthop, shards) == Peer::Smtp(s.id),
                        });
                        s.agent.enqueue(*job);
                    }
                    ShardMsg::Outcome(o) => {
                        s.stats.count_outcome(&o);
                        s.dispatcher.make_room(&o).await;
                        s.dispatcher.on_outcome(o);
                    }
                }
            }
        })
        .detach();
    }
}

/// The local-delivery shard: joins the mesh as its last peer, takes jobs for local mailboxes from every SMTP
/// shard and sends their outcomes back.
pub async fn local_shard(shared: Arc<Shared>, mut ready: Ready<ShardError>, plan: MeshPlan) {
    let id = shared.shards();
    let (link, mut inbox) = match plan.join(id).await {
        Ok(x) => x,
        Err(message) => return ready.failed(ShardError::Mesh { shard: id, message }),
    };
    let link = Rc::new(link);
    let log = Rc::new(DeliveryLog::open(
        &delivery_log_path(&shared.cfg),
        crate::delivery::plan::Policy::from_config(&shared.cfg),
    ));
    let (jobs_tx, jobs_rx) =
        glommio::channels::local_channel::new_bounded(limits::LOCAL_JOBS_QUEUED_MAX);
    let jobs_tx = Rc::new(jobs_tx);
    for (_, mut stream) in inbox.streams() {
        let tx = jobs_tx.clone();
        glommio::spawn_local(async move {
            while let Some(msg) = stream.next().await {
                match msg {
                    ShardMsg::Job(job) => {
                        debug_assert_eq!(owner_of(&job.nexthop, id), Peer::Local);
                        if tx.send(*job).await.is_err() {
                            return;
                        }
                    }
                    ShardMsg::Outcome(o) => {
                        tracing::error!(
                            target: crate::eventlog::LOCAL,
                            "local shard: unexpected outcome for {}",
                            o.id
                        )
                    }
                }
            }
        })
        .detach();
    }
    let outcomes: Rc<Outbox<Outcome>> = Outbox::new();
    // One outcome courier per SMTP shard: a shard that drains slowly holds up only its own outcomes.
    for to in 0..id {
        let (outcomes, link) = (outcomes.clone(), link.clone());
        glommio::spawn_local(async move {
            while let Some(o) = outcomes.next_for(to).await {
                link.send_outcome(to, o).await;
            }
        })
        .detach();
    }
    let local = LocalDelivery::new(
        shared.cfg.clone(),
        shared.recipients.clone(),
        shared.stats.local.clone(),
        log,
        outcomes,
    );
    ready.ready();
    local.run(jobs_rx, shared.shutdown.clone()).await;
}

/// The shaping automation's persistence for shard `id`: its actions read back from the spool (ended ones
/// dropped) and the spool root its engine writes to. A file that cannot be read is logged and left alone (the
/// shard starts without those actions; the next change replaces it).
async fn start_shaping(agent: &Rc<Agent>, id: usize, shards: usize, spool: &std::path::Path) {
    use crate::shaping::automation;
    let path = spool.to_path_buf();
    let now = automation::now_ms();
    let r = glommio::executor()
        .spawn_blocking(move || {
            let dir = crate::spool::Dir::open_root(&path).map_err(|e| e.to_string())?;
            let actions = automation::read_for_shard(&dir, id, shards, now);
            Ok::<_, String>((dir, actions))
        })
        .await;
    match r {
        Ok((dir, actions)) => {
            match actions {
                Ok(a) => agent.automation.adopt(a),
                Err(e) => {
                    tracing::error!(target: automation::EVENT_TARGET, "shard {id}: shaping actions not restored: {e}")
                }
            }
            agent.automation.set_store(id, Arc::new(dir));
        }
        Err(e) => {
            tracing::error!(target: automation::EVENT_TARGET, "shard {id}: shaping actions not restored, not persisted: {e}")
        }
    }
}
