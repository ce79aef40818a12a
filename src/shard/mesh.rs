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
//! places) push into an [`Outbox`]; one courier task per outbox takes its items in order and awaits the
//! channel, so a full channel makes the courier wait (the backpressure) and no task is spawned per message.
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
    pub async fn join(self, id: usize) -> Result<(MeshLink, Receivers<ShardMsg>), String> {
        let (tx, rx) = self
            .0
            .join()
            .await
            .map_err(|e| format!("cannot join the shard mesh: {e}"))?;
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
            eprintln!(
                "shardmta: shard {}: message to shard {to} not sent: {e}",
                self.id
            );
        }
    }
}

/// Items waiting for their courier, in order. Pushing never waits; the courier does (see the module doc).
pub struct Outbox<T> {
    items: RefCell<VecDeque<(usize, T)>>,
    waker: RefCell<Option<Waker>>,
    closed: Cell<bool>,
}

impl<T> Default for Outbox<T> {
    fn default() -> Self {
        Outbox {
            items: RefCell::new(VecDeque::new()),
            waker: RefCell::new(None),
            closed: Cell::new(false),
        }
    }
}

impl<T> Outbox<T> {
    pub fn new() -> Rc<Outbox<T>> {
        Rc::new(Outbox::default())
    }

    /// Queues `item` for peer `to` and wakes the courier.
    pub fn push(&self, to: usize, item: T) {
        self.items.borrow_mut().push_back((to, item));
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    pub fn len(&self) -> usize {
        self.items.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.borrow().is_empty()
    }

    /// Ends the courier once the items queued so far are taken.
    pub fn close(&self) {
        self.closed.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// The next item, waiting for one; `None` once closed and empty.
    pub async fn next(&self) -> Option<(usize, T)> {
        futures_lite::future::poll_fn(|cx| {
            if let Some(item) = self.items.borrow_mut().pop_front() {
                return Poll::Ready(Some(item));
            }
            if self.closed.get() {
                return Poll::Ready(None);
            }
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_keeps_order_and_ends_when_closed() {
        glommio::LocalExecutor::default().run(async {
            let o: Rc<Outbox<u32>> = Outbox::new();
            let reader = {
                let o = o.clone();
                glommio::spawn_local(async move {
                    let mut got = Vec::new();
                    while let Some((to, v)) = o.next().await {
                        got.push((to, v));
                    }
                    got
                })
            };
            for v in 0..5 {
                o.push(v as usize % 2, v);
                glommio::yield_if_needed().await;
            }
            o.push(1, 99);
            o.close();
            let got = reader.await;
            assert_eq!(got, vec![(0, 0), (1, 1), (0, 2), (1, 3), (0, 4), (1, 99)]);
            assert!(o.is_empty());
        });
    }
}
