//! The shard mesh: jobs from accepting shards to destination owners, outcomes back, and the outboxes that feed
//! them.
//!
//! Two full meshes of bounded channels (glommio's `channel_mesh`), one for jobs and one for outcomes, with the
//! local-delivery shard as the last peer. They are separate so that a receiver waiting for room in a
//! destination's job queue never holds up the outcomes behind it: outcome receivers never wait (applying an
//! outcome is a synchronous queue append), so every outcome send completes, workers finish, and job queues
//! drain. One mesh carrying both could deadlock two shards whose job queues are full of each other's work.
//!
//! Producers that cannot wait (the dispatcher decides in synchronous code, the agent reports from several
//! places) push into an [`Outbox`]; one courier task per outbox takes its items in order and awaits the
//! channel, so a full channel makes the courier wait (the backpressure) and no task is spawned per message.
//! An outbox's length is bounded by its producer: the dispatcher has at most `IN_FLIGHT_MESSAGES_MAX` messages
//! out (one job per destination group each), the agent one outcome per job it holds.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::task::{Poll, Waker};

use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers, Senders};

use crate::delivery::{Job, Outcome};

/// Capacity of each shard-to-shard channel; a full channel makes the sender wait.
pub const MESH_CHANNEL_CAPACITY: usize = 4096;

/// Both meshes, before the shards join them.
#[derive(Clone)]
pub struct MeshPlan {
    jobs: MeshBuilder<Box<Job>, Full>,
    outcomes: MeshBuilder<Outcome, Full>,
}

impl MeshPlan {
    /// Meshes for `peers` executors (the SMTP shards and the local-delivery shard).
    pub fn new(peers: usize) -> MeshPlan {
        MeshPlan {
            jobs: MeshBuilder::full(peers, MESH_CHANNEL_CAPACITY),
            outcomes: MeshBuilder::full(peers, MESH_CHANNEL_CAPACITY),
        }
    }

    /// Joins both meshes as peer `id`. Every peer waits here until all have joined, so a shard that cannot
    /// start must still join (or the process must give up on the others). Peer ids follow executor creation
    /// order; a mismatch is an error because shards address each other by index.
    pub async fn join(self, id: usize) -> Result<(MeshLink, MeshInbox), String> {
        let (jobs_tx, jobs_rx) = self
            .jobs
            .join()
            .await
            .map_err(|e| format!("cannot join the shard mesh: {e}"))?;
        let (outcomes_tx, outcomes_rx) = self
            .outcomes
            .join()
            .await
            .map_err(|e| format!("cannot join the shard mesh: {e}"))?;
        for peer in [jobs_tx.peer_id(), outcomes_tx.peer_id()] {
            if peer != id {
                return Err(format!("joined the shard mesh as peer {peer}, not {id}"));
            }
        }
        Ok((
            MeshLink {
                id,
                jobs: jobs_tx,
                outcomes: outcomes_tx,
            },
            MeshInbox {
                jobs: jobs_rx,
                outcomes: outcomes_rx,
            },
        ))
    }
}

/// A shard's sending side of the mesh.
pub struct MeshLink {
    id: usize,
    jobs: Senders<Box<Job>>,
    outcomes: Senders<Outcome>,
}

impl MeshLink {
    pub fn id(&self) -> usize {
        self.id
    }

    /// Sends a job to peer `to` (not this shard), waiting while its channel is full.
    pub async fn send_job(&self, to: usize, job: Job) {
        debug_assert_ne!(to, self.id, "same-shard jobs take no channel");
        if let Err(e) = self.jobs.send_to(to, Box::new(job)).await {
            // Only a peer that has gone away (shutdown) or a bad index; the message stays queued and is
            // retried from the queue after a restart.
            eprintln!(
                "shardmta: shard {}: job to shard {to} not sent: {e}",
                self.id
            );
        }
    }

    /// Sends an outcome to peer `to` (not this shard), waiting while its channel is full.
    pub async fn send_outcome(&self, to: usize, o: Outcome) {
        debug_assert_ne!(to, self.id, "same-shard outcomes take no channel");
        if let Err(e) = self.outcomes.send_to(to, o).await {
            eprintln!(
                "shardmta: shard {}: outcome to shard {to} not sent: {e}",
                self.id
            );
        }
    }
}

/// A shard's receiving side of the mesh: one stream per peer and direction.
pub struct MeshInbox {
    pub jobs: Receivers<Box<Job>>,
    pub outcomes: Receivers<Outcome>,
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
