//! The shard mesh: jobs from accepting shards to destination owners and outcomes back (`ShardMsg`), and the
//! outboxes that feed it.
//!
//! One full mesh of bounded channels (glommio's `channel_mesh`), the local-delivery shard its last peer. A
//! receiver never waits on another shard: a job goes to the agent's destination queue (which hands a job back,
//! postponed, when that queue is full rather than wait), an outcome to the dispatcher (a synchronous queue append,
//! after room for it is made: at worst a segment created on this shard's blocking pool, which depends on no other
//! shard). So every channel drains, and no two shards can wait on each other. (A receiver that waited for room
//! in a destination queue could: outcomes queued behind its job would hold up the workers that make the room.)
//! The local-delivery shard's receivers wait for room in its batch queue; they carry only its jobs.
//!
//! Producers that cannot wait (the dispatcher decides in synchronous code, the agent reports from several
//! places) push into an [`Outbox`]; one courier task per outbox and peer takes that peer's items in order and
//! awaits its channel, so a full channel makes its courier wait (the backpressure), a slow peer holds up only
//! what goes to it, and no task is spawned per message.
//! An outbox's length is bounded by its producer: the dispatcher has at most `DELIVERY_MESSAGES_IN_FLIGHT_MAX`
//! messages out (one job per destination group each), the agent one outcome per job it holds.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::task::{Poll, Waker};

use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers, Senders};

use crate::delivery::{Job, Outcome, ShardMsg};
use crate::limits::MESH_CHANNEL_MESSAGES_MAX;

/// The mesh, before the shards join it.
#[derive(Clone)]
pub struct MeshPlan(MeshBuilder<ShardMsg, Full>);

impl MeshPlan {
    /// A mesh for `peers` executors (the SMTP shards and the local-delivery shard).
    pub fn new(peers: usize) -> MeshPlan {
        MeshPlan(MeshBuilder::full(peers, MESH_CHANNEL_MESSAGES_MAX))
    }

    /// Joins the mesh as peer `id`. Every peer waits here until all have joined, so a shard that cannot start
    /// must still join (or the process must give up on the others). Peer ids follow executor creation order; a
    /// mismatch is an error because shards address each other by index.
    ///
    /// The join is the first thing a shard does, so it once met a glommio 0.9 bug head on: an executor could park
    /// with a task ready (its run loop parked when `run_task_queues` returned before running anything because
    /// the preemption timer had fired while the thread was descheduled) and, with no timer or I/O of its own yet,
    /// never wake; the server never started (about 1 start in 200-400 with four servers starting at once on two
    /// cores). The vendored glommio (`vendor/glommio/PATCHES.md`) polls again instead of parking while tasks are
    /// queued; the test below is that patch's regression test.
    pub async fn join(self, id: usize) -> Result<(MeshLink, Receivers<ShardMsg>), String> {
        let result = self.0.join().await;
        let (tx, rx) = result.map_err(|e| format!("cannot join the shard mesh: {e}"))?;
        if tx.peer_id() != id {
            return Err(format!(
                "joined the shard mesh as peer {}, not {id}",
                tx.peer_id()
            ));
        }
        Ok((MeshLink { id, tx }, rx))
    }
}

/// A shard's sending side of the mesh.
pub struct MeshLink {
    id: usize,
    tx: Senders<ShardMsg>,
}

impl MeshLink {
    pub fn id(&self) -> usize {
        self.id
    }

    /// Sends a job to peer `to` (not this shard), waiting while its channel is full.
    pub async fn send_job(&self, to: usize, job: Job) {
        self.send(to, ShardMsg::Job(Box::new(job))).await
    }

    /// Sends an outcome to peer `to` (not this shard), waiting while its channel is full.
    pub async fn send_outcome(&self, to: usize, o: Outcome) {
        self.send(to, ShardMsg::Outcome(o)).await
    }

    async fn send(&self, to: usize, msg: ShardMsg) {
        debug_assert_ne!(to, self.id, "same-shard messages take no channel");
        if let Err(e) = self.tx.send_to(to, msg).await {
            // Only a peer that has gone away (shutdown) or a bad index; the message stays queued and is
            // retried from the queue after a restart.
            tracing::error!(
                target: crate::eventlog::MASTER,
                "shard {}: message to shard {to} not sent: {e}",
                self.id
            );
        }
    }
}

/// Items waiting for their couriers: one queue per peer, each in order. Pushing never waits; each peer's
/// courier does (see the module doc), so a peer that drains slowly holds up only what goes to it.
pub struct Outbox<T> {
    /// Per peer (grown on first use): its items and its courier's waker.
    peers: RefCell<Vec<(VecDeque<T>, Option<Waker>)>>,
    /// Any-peer reader's waker ([`Outbox::next`]).
    any: RefCell<Option<Waker>>,
    len: Cell<usize>,
    closed: Cell<bool>,
}

impl<T> Default for Outbox<T> {
    fn default() -> Self {
        Outbox {
            peers: RefCell::new(Vec::new()),
            any: RefCell::new(None),
            len: Cell::new(0),
            closed: Cell::new(false),
        }
    }
}

impl<T> Outbox<T> {
    pub fn new() -> Rc<Outbox<T>> {
        Rc::new(Outbox::default())
    }

    /// Queues `item` for peer `to` and wakes that peer's courier.
    pub fn push(&self, to: usize, item: T) {
        let waker = {
            let mut peers = self.peers.borrow_mut();
            if peers.len() <= to {
                peers.resize_with(to + 1, || (VecDeque::new(), None));
            }
            peers[to].0.push_back(item);
            peers[to].1.take()
        };
        self.len.set(self.len.get() + 1);
        if let Some(w) = waker {
            w.wake();
        }
        if let Some(w) = self.any.borrow_mut().take() {
            w.wake();
        }
    }

    /// Items waiting, over all peers.
    pub fn len(&self) -> usize {
        self.len.get()
    }

    pub fn is_empty(&self) -> bool {
        self.len.get() == 0
    }

    /// Ends the couriers once the items queued so far are taken.
    pub fn close(&self) {
        self.closed.set(true);
        let wakers: Vec<Waker> = self
            .peers
            .borrow_mut()
            .iter_mut()
            .filter_map(|p| p.1.take())
            .collect();
        for w in wakers {
            w.wake();
        }
        if let Some(w) = self.any.borrow_mut().take() {
            w.wake();
        }
    }

    /// The next item for peer `to`, waiting for one; `None` once closed and empty.
    pub async fn next_for(&self, to: usize) -> Option<T> {
        futures_lite::future::poll_fn(|cx| {
            let mut peers = self.peers.borrow_mut();
            if peers.len() <= to {
                peers.resize_with(to + 1, || (VecDeque::new(), None));
            }
            if let Some(item) = peers[to].0.pop_front() {
                self.len.set(self.len.get() - 1);
                return Poll::Ready(Some(item));
            }
            if self.closed.get() {
                return Poll::Ready(None);
            }
            peers[to].1 = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// The next item for any peer (the lowest peer first), waiting for one; `None` once closed and empty.
    pub async fn next(&self) -> Option<(usize, T)> {
        futures_lite::future::poll_fn(|cx| {
            let mut peers = self.peers.borrow_mut();
            for (to, p) in peers.iter_mut().enumerate() {
                if let Some(item) = p.0.pop_front() {
                    self.len.set(self.len.get() - 1);
                    return Poll::Ready(Some((to, item)));
                }
            }
            if self.closed.get() {
                return Poll::Ready(None);
            }
            *self.any.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The regression test for the start that never finished. A preemption timer of 500 µs often fires between
    /// glommio's `poll_io` and its `run_task_queues` (as the default 100 ms one does when the thread is
    /// descheduled right there), which made upstream glommio park an executor whose first task or mesh connector
    /// was ready to run (see [`MeshPlan::join`]); the peers then waited for each other for ever.
    #[test]
    fn every_peer_joins_the_mesh_even_when_glommio_parks_with_a_task_ready() {
        use std::time::{Duration, Instant};
        const PEERS: usize = 3;
        const ROUNDS: usize = 16;
        for round in 0..ROUNDS {
            let plan = MeshPlan::new(PEERS);
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            let mut executors = Vec::new();
            for id in 0..PEERS {
                let (plan, done_tx) = (plan.clone(), done_tx.clone());
                let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
                    .preempt_timer(Duration::from_micros(500))
                    .spawn(move || async move {
                        let joined = plan.join(id).await.map(|(link, _)| link.id());
                        let _ = done_tx.send(joined);
                    })
                    .expect("executor");
                executors.push(ex);
            }
            drop(plan);
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut joined = Vec::new();
            while joined.len() < PEERS {
                let left = deadline.saturating_duration_since(Instant::now());
                match done_rx.recv_timeout(left) {
                    Ok(r) => joined.push(r),
                    // The stuck executors are left behind: the test has failed.
                    Err(_) => panic!(
                        "round {round}: only {} of {PEERS} peers joined the mesh: {joined:?}",
                        joined.len()
                    ),
                }
            }
            joined.sort();
            assert_eq!(joined, (0..PEERS).map(Ok).collect::<Vec<_>>());
            for ex in executors {
                ex.join().expect("executor ends");
            }
        }
    }

    #[test]
    fn outbox_keeps_each_peers_order_and_a_stalled_peer_holds_up_no_other() {
        glommio::LocalExecutor::default().run(async {
            let o: Rc<Outbox<u32>> = Outbox::new();
            // Peer 0's courier runs; nobody reads peer 1's queue (its channel is full, say).
            let courier0 = {
                let o = o.clone();
                glommio::spawn_local(async move {
                    let mut got = Vec::new();
                    while let Some(v) = o.next_for(0).await {
                        got.push(v);
                    }
                    got
                })
            };
            for (to, v) in [(1, 10), (0, 1), (1, 11), (0, 2), (0, 3)] {
                o.push(to, v);
            }
            glommio::executor().yield_task_queue_now().await;
            assert_eq!(o.len(), 2, "peer 0's items went, peer 1's wait");
            o.close();
            assert_eq!(courier0.await, vec![1, 2, 3]);
            assert_eq!(o.next_for(1).await, Some(10));
            assert_eq!(o.next_for(1).await, Some(11));
            assert_eq!(o.next_for(1).await, None);
            assert!(o.is_empty());
            assert_eq!(o.next().await, None);
        });
    }
}
