//! [`ShardQueue`]: the group-commit front end of one shard's [`QueueStore`],
//! shared (`Rc`) by every session of the shard on its glommio executor.
//!
//! One background task per shard (the committer) repeatedly takes everything
//! appended so far, fdatasyncs the touched segment files on glommio's
//! blocking thread pool (never a blocking syscall on the reactor thread), and
//! then wakes every waiter whose ticket the sync covers. Appends made while a
//! sync is in flight form the next batch, so under load one sync serves many
//! messages. A failed sync fails every ticket it covered, seals the segments
//! involved (appends roll to a new segment) and stops segment deletion.
//! Records nobody waits for are flushed within [`limits::QUEUE_IDLE_FLUSH_AFTER`]; the committer
//! also pre-creates the next segment on the blocking pool when the active one
//! is half full, so rollover normally does no file creation on the reactor.
//!
//! Invariant (asserted): [`ShardQueue::durable`] returns `Ok` only if the
//! synced position is at or past the ticket and the ticket is not in a range
//! whose sync failed.

use crate::limits;
use std::cell::{RefCell, RefMut};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Poll, Waker};

use glommio::timer::Timer;

use futures_lite::future::poll_fn;

use super::segment::{self, Segment};
use super::store::{CommitTicket, HousekeepingReport, QueueStats, QueueStore};
use super::QueueError;

#[derive(Default)]
struct CommitState {
    /// Every ticket at or below this position has been through a completed
    /// sync (successful, or failed and then listed in `failed`).
    synced: CommitTicket,
    /// Highest ticket a waiter asked for.
    requested: CommitTicket,
    /// (segment seq, durable offset in it before the failed sync): tickets in
    /// that segment past that offset failed. Bounded by limits::QUEUE_FAILED_RANGES_MAX.
    failed: Vec<(u64, u64)>,
    poisoned: bool,
    /// Wakers of pending `durable()` calls; all woken after each sync.
    /// Bounded by the number of concurrent `durable()` polls (one per session).
    waiters: Vec<Waker>,
    committer: Option<Waker>,
    shutdown: bool,
    stopped: bool,
    spare_in_progress: bool,
    syncs: u64,
    sync_failures: u64,
    tickets_ok: u64,
    batched_bytes: u64,
}

impl CommitState {
    fn ticket_failed(&self, t: CommitTicket) -> bool {
        self.poisoned
            || self
                .failed
                .iter()
                .any(|&(seq, from)| t.seq == seq && t.offset > from)
    }
}

/// Group-commit wrapper around one shard's store.
pub struct ShardQueue {
    store: RefCell<QueueStore>,
    st: RefCell<CommitState>,
}

impl ShardQueue {
    /// Wraps `store` and spawns the committer task on the current glommio
    /// executor (panics if called outside one). Call [`shutdown`] before
    /// dropping the last handle to make everything durable and stop the task.
    ///
    /// [`shutdown`]: ShardQueue::shutdown
    pub fn new(store: QueueStore) -> Rc<ShardQueue> {
        let durable = store.durable_position();
        let q = Rc::new(ShardQueue {
            store: RefCell::new(store),
            st: RefCell::new(CommitState {
                synced: durable,
                requested: durable,
                ..Default::default()
            }),
        });
        glommio::spawn_local(committer(q.clone())).detach();
        q
    }

    /// Borrows the store. Never hold the borrow across an `.await`.
    pub fn store(&self) -> RefMut<'_, QueueStore> {
        self.store.borrow_mut()
    }

    /// Runs `f` with the store borrowed.
    pub fn with_store<R>(&self, f: impl FnOnce(&mut QueueStore) -> R) -> R {
        f(&mut self.store.borrow_mut())
    }

    /// Waits until a sync covering `ticket` has completed.
    pub async fn durable(&self, ticket: CommitTicket) -> Result<(), QueueError> {
        poll_fn(|cx| {
            let mut st = self.st.borrow_mut();
            if st.ticket_failed(ticket) {
                return Poll::Ready(Err(QueueError::SyncFailed(format!(
                    "sync covering segment {} offset {} failed",
                    ticket.seq, ticket.offset
                ))));
            }
            if st.synced >= ticket {
                assert!(st.synced >= ticket && !st.ticket_failed(ticket));
                st.tickets_ok += 1;
                return Poll::Ready(Ok(()));
            }
            if st.stopped {
                return Poll::Ready(Err(QueueError::Shutdown));
            }
            if ticket > st.requested {
                st.requested = ticket;
            }
            st.waiters.push(cx.waker().clone());
            if let Some(w) = st.committer.take() {
                w.wake();
            }
            Poll::Pending
        })
        .await
    }

    /// Number of completed sync batches (successful or not).
    pub fn sync_count(&self) -> u64 {
        self.st.borrow().syncs
    }

    /// Number of failed sync batches.
    pub fn sync_failures(&self) -> u64 {
        self.st.borrow().sync_failures
    }

    /// Number of `durable()` calls that returned Ok.
    pub fn tickets_committed(&self) -> u64 {
        self.st.borrow().tickets_ok
    }

    /// Bytes made durable by the committer.
    pub fn synced_bytes(&self) -> u64 {
        self.st.borrow().batched_bytes
    }

    /// Highest position covered by a completed sync.
    pub fn synced_position(&self) -> CommitTicket {
        self.st.borrow().synced
    }

    /// A copy of the store's counters.
    pub fn stats(&self) -> QueueStats {
        self.store.borrow().stats().clone()
    }

    /// Housekeeping through the committer: runs the store's housekeeping,
    /// and if deletions wait for durability (e.g. after compaction copies),
    /// waits for a sync and runs it again.
    pub async fn housekeeping(&self, now_unix_s: u64) -> Result<HousekeepingReport, QueueError> {
        let mut r = self.store.borrow_mut().housekeeping(now_unix_s)?;
        if r.deletions_waiting_for_sync > 0 {
            let pos = self.store.borrow().position();
            self.durable(pos).await?;
            let r2 = self.store.borrow_mut().housekeeping(now_unix_s)?;
            r.segments_deleted += r2.segments_deleted;
            r.messages_copied += r2.messages_copied;
            r.bytes_copied += r2.bytes_copied;
            r.deletions_waiting_for_sync = r2.deletions_waiting_for_sync;
        }
        Ok(r)
    }

    /// Final sync of everything appended, then stops the committer. Later
    /// `durable()` calls for unsynced tickets return `Err(Shutdown)`.
    pub async fn shutdown(&self) {
        {
            let mut st = self.st.borrow_mut();
            let pos = self.store.borrow().position();
            if pos > st.requested {
                st.requested = pos;
            }
            st.shutdown = true;
            if let Some(w) = st.committer.take() {
                w.wake();
            }
        }
        poll_fn(|cx| {
            let mut st = self.st.borrow_mut();
            if st.stopped {
                Poll::Ready(())
            } else {
                st.waiters.push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

/// The committer task: one per shard.
async fn committer(q: Rc<ShardQueue>) {
    loop {
        // Wait for a request, or for the idle-flush timer with unsynced data.
        let mut idle = Timer::new(limits::QUEUE_IDLE_FLUSH_AFTER);
        poll_fn(|cx| {
            let mut st = q.st.borrow_mut();
            if st.requested > st.synced || st.shutdown {
                return Poll::Ready(());
            }
            if Pin::new(&mut idle).poll(cx).is_ready() {
                if q.store.borrow().has_unsynced() {
                    return Poll::Ready(());
                }
                idle = Timer::new(limits::QUEUE_IDLE_FLUSH_AFTER);
                // Arms the new timer (cannot be ready yet).
                let _ = Pin::new(&mut idle).poll(cx);
            }
            st.committer = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        // Let sessions that are runnable right now append first: bigger batch.
        futures_lite::future::yield_now().await;

        let batch = q.store.borrow_mut().take_sync_batch();
        let target = batch.target;
        let bytes: u64 = batch.files.iter().map(|f| f.bytes).sum();
        let seqs: Vec<u64> = batch.files.iter().map(|f| f.seq).collect();
        let files: Vec<_> = batch.files.into_iter().map(|f| (f.file, f.write)).collect();
        let result: Result<(), String> = if files.is_empty() {
            Ok(())
        } else {
            // One pwrite of the batch's staged records, then one fdatasync, per touched file.
            glommio::executor()
                .spawn_blocking(move || {
                    for (f, write) in &files {
                        if let Some((at, bytes)) = write {
                            segment::write_at(f, *at, bytes).map_err(|e| e.to_string())?;
                        }
                        segment::fdatasync(f).map_err(|e| e.to_string())?;
                    }
                    Ok(())
                })
                .await
        };

        {
            let mut store = q.store.borrow_mut();
            let mut st = q.st.borrow_mut();
            match result {
                Ok(()) => {
                    store.complete_sync(target, bytes, &seqs);
                    st.batched_bytes += bytes;
                }
                Err(_e) => {
                    let durable = store.durable_position();
                    for &seq in &seqs {
                        let from = if seq == durable.seq {
                            durable.offset
                        } else if seq < durable.seq {
                            u64::MAX
                        } else {
                            0
                        };
                        if st.failed.len() >= limits::QUEUE_FAILED_RANGES_MAX {
                            st.poisoned = true;
                        } else {
                            st.failed.push((seq, from));
                        }
                    }
                    store.fail_sync(&seqs);
                    st.sync_failures += 1;
                }
            }
            if target > st.synced {
                st.synced = target;
            }
            st.syncs += 1;
            let shutdown_done = st.shutdown && st.requested <= st.synced;
            if shutdown_done {
                st.stopped = true;
            }
            for w in st.waiters.drain(..) {
                w.wake();
            }
            if shutdown_done {
                return;
            }
            // Pre-create the next segment off the reactor thread.
            if !st.spare_in_progress {
                if let Some((dir, header)) = store.spare_wanted() {
                    st.spare_in_progress = true;
                    glommio::spawn_local(make_spare(q.clone(), dir, header)).detach();
                }
            }
        }
    }
}

async fn make_spare(
    q: Rc<ShardQueue>,
    dir: crate::spool::Dir,
    header: super::record::SegmentHeader,
) {
    let seg = glommio::executor()
        .spawn_blocking(move || Segment::create(&dir, &header))
        .await;
    q.store.borrow_mut().install_spare(seg);
    q.st.borrow_mut().spare_in_progress = false;
}
