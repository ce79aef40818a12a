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
//! Housekeeping's segment deletions (unlink + directory fsync, one segment at
//! a time) and any segment creation an append needs ([`ShardQueue::append_message`],
//! [`ShardQueue::append_progress`]) run on the blocking pool too.
//!
//! Invariant (asserted): [`ShardQueue::durable`] returns `Ok` only if the
//! ticket is not in a range whose sync failed and the target of the last
//! *successful* sync (a watermark kept apart from the completion watermark
//! `synced`, and the store's own durable position) is at or past the ticket.

use std::cell::{RefCell, RefMut};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use glommio::timer::Timer;

use futures_lite::future::poll_fn;

use super::segment::{self, Segment};
use super::store::{
    delete_segment_file, CommitTicket, HousekeepingReport, QueueStats, QueueStore, Room,
};
use super::QueueError;
use crate::limits;

#[derive(Default)]
struct CommitState {
    /// Every ticket at or below this position has been through a completed
    /// sync (successful, or failed and then listed in `failed`).
    synced: CommitTicket,
    /// Target of the last successful sync: every ticket at or below it is in
    /// the file and synced (unless in a failed range, which always wins).
    durable: CommitTicket,
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
    /// The last spare creation failed (`room_for` then lets the append report the error).
    spare_failed: bool,
    /// A failed spare creation was logged; cleared by the next success.
    spare_failure_logged: bool,
    /// Appends waiting for the spare being created; bounded by the sessions of the shard.
    spare_waiters: Vec<Waker>,
    pacing: SyncPacing,
    syncs: u64,
    sync_failures: u64,
    /// The most recent sync failed (cleared by the next that succeeds): the health check's "not writable".
    last_sync_failed: bool,
    tickets_ok: u64,
    batched_bytes: u64,
}

/// A broken queue invariant (a bug, never an I/O condition).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvariantError {
    #[error("ticket {ticket:?} is past the completed syncs ({synced:?}) and in no failed range, but the last successful sync covers only {durable:?}")]
    NotCovered {
        ticket: CommitTicket,
        synced: CommitTicket,
        durable: CommitTicket,
    },
}

impl CommitState {
    /// What `durable(t)` answers now: `None` while no completed sync covers `t`. Panics if the answer would
    /// be `Ok` without a successful sync covering `t` (see [`CommitState::check_covered`]).
    fn verdict(
        &self,
        t: CommitTicket,
        store_durable: Option<CommitTicket>,
    ) -> Option<Result<(), QueueError>> {
        if self.ticket_failed(t) {
            return Some(Err(QueueError::SyncFailed(format!(
                "sync covering segment {} offset {} failed",
                t.seq, t.offset
            ))));
        }
        if self.synced < t {
            return None;
        }
        if let Err(e) = self.check_covered(t, store_durable) {
            panic!("shardmta: queue invariant: {e}");
        }
        Some(Ok(()))
    }

    /// The durability check proper: a ticket that a completed sync reached and that is in no failed range must
    /// be at or below the last successful sync's target, and at or below the store's durable position (when
    /// known; both are moved only by a successful sync, by different code).
    fn check_covered(
        &self,
        t: CommitTicket,
        store_durable: Option<CommitTicket>,
    ) -> Result<(), InvariantError> {
        let durable = store_durable.map_or(self.durable, |d| d.min(self.durable));
        if durable >= t {
            Ok(())
        } else {
            Err(InvariantError::NotCovered {
                ticket: t,
                synced: self.synced,
                durable,
            })
        }
    }

    fn ticket_failed(&self, t: CommitTicket) -> bool {
        self.poisoned
            || self
                .failed
                .iter()
                .any(|&(seq, from)| t.seq == seq && t.offset > from)
    }
}

/// When the committer starts a requested sync: at once when the shard's queue was quiet, or after
/// `queue_commit_delay_us` when syncs follow each other and each serves several sessions (under load). Lockstep
/// clients send a message's commands and content over a few round trips after their previous 250, so a sync
/// started the moment the first of them ends its DATA covers one or two messages; a short wait lets the others
/// in the middle of their transaction join it. Fewer fdatasyncs (each one a disk cache flush) for at most the
/// delay added to a 250. Never delayed: the first sync, a sync requested [`SyncPacing::LOAD_WINDOW_FACTOR`]
/// delays or more after the previous one ended (a quiet shard), and a sync after one that woke fewer than
/// [`SyncPacing::SIBLINGS_MIN`] waiting sessions (a lone client sending message after message has nobody to
/// wait for). PostgreSQL's `commit_delay` and `commit_siblings` are the same idea.
#[derive(Debug, Default, Clone, Copy)]
pub struct SyncPacing {
    /// `queue_commit_delay_us`; zero: every sync starts at once.
    delay: Duration,
    /// When the last sync ended.
    last_end: Option<Instant>,
    /// Sessions the last sync woke.
    last_waiters: usize,
}

impl SyncPacing {
    /// A sync requested within this many delays of the previous one's end counts as load.
    pub const LOAD_WINDOW_FACTOR: u32 = 8;
    /// A sync is delayed only after one that woke at least this many waiting sessions.
    pub const SIBLINGS_MIN: usize = 2;

    pub fn new(delay: Duration) -> SyncPacing {
        SyncPacing {
            delay,
            last_end: None,
            last_waiters: 0,
        }
    }

    /// How long to wait before starting a sync requested at `now`.
    pub fn delay_before_sync(&self, now: Instant) -> Duration {
        match self.last_end {
            Some(end)
                if !self.delay.is_zero()
                    && self.last_waiters >= Self::SIBLINGS_MIN
                    && now.saturating_duration_since(end)
                        < self.delay * Self::LOAD_WINDOW_FACTOR =>
            {
                self.delay
            }
            _ => Duration::ZERO,
        }
    }

    /// A sync ended at `now` and woke `waiters` sessions.
    pub fn sync_ended(&mut self, now: Instant, waiters: usize) {
        self.last_end = Some(now);
        self.last_waiters = waiters;
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
        Self::with_commit_delay(store, Duration::ZERO)
    }

    /// [`new`](ShardQueue::new), with syncs paced by `commit_delay` under load ([`SyncPacing`]).
    pub fn with_commit_delay(store: QueueStore, commit_delay: Duration) -> Rc<ShardQueue> {
        let durable = store.durable_position();
        let q = Rc::new(ShardQueue {
            store: RefCell::new(store),
            st: RefCell::new(CommitState {
                synced: durable,
                durable,
                requested: durable,
                pacing: SyncPacing::new(commit_delay),
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
            // The store is never borrowed across an await; if a caller holds it here, check without it.
            let store_durable = self.store.try_borrow().ok().map(|s| s.durable_position());
            if let Some(v) = st.verdict(ticket, store_durable) {
                if v.is_ok() {
                    st.tickets_ok += 1;
                }
                return Poll::Ready(v);
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
    /// The most recent sync failed (no later one succeeded yet).
    pub fn sync_failing(&self) -> bool {
        self.st.borrow().last_sync_failed || self.st.borrow().poisoned
    }

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
    ///
    /// The unlinks and directory fsyncs run on the blocking pool, one segment
    /// at a time (each deletion durable before the next).
    pub async fn housekeeping(&self, now_unix_s: u64) -> Result<HousekeepingReport, QueueError> {
        let deleted = self.run_deletions().await?;
        let mut r = self.store.borrow_mut().compact_and_plan(now_unix_s)?;
        r.segments_deleted = deleted + self.run_deletions().await?;
        r.deletions_waiting_for_sync = self.store.borrow().deletions_planned();
        if r.deletions_waiting_for_sync > 0 {
            let pos = self.store.borrow().position();
            self.durable(pos).await?;
            let deleted = self.run_deletions().await?;
            let r2 = self.store.borrow_mut().compact_and_plan(now_unix_s)?;
            r.segments_deleted += deleted + self.run_deletions().await?;
            r.messages_copied += r2.messages_copied;
            r.bytes_copied += r2.bytes_copied;
            r.deletions_waiting_for_sync = self.store.borrow().deletions_planned();
        }
        Ok(r)
    }

    /// Runs the store's planned deletions that may run now, each on the blocking pool.
    async fn run_deletions(&self) -> Result<u64, QueueError> {
        let mut n = 0;
        loop {
            let next = {
                let mut store = self.store.borrow_mut();
                match store.next_deletion() {
                    Some(name) => Some((store.dir_handle()?, name)),
                    None => None,
                }
            };
            let Some((dir, name)) = next else {
                return Ok(n);
            };
            glommio::executor()
                .spawn_blocking(move || delete_segment_file(&dir, &name))
                .await?;
            self.store.borrow_mut().deletion_done();
            n += 1;
        }
    }

    /// Makes sure a record of `len` bytes can be appended without creating a segment file on this thread:
    /// waits for the spare being created, or creates the next segment on the blocking pool. A record too large
    /// for any segment returns at once (the append reports it).
    pub async fn room_for(&self, len: u64) -> Result<(), QueueError> {
        // Each round returns, or waits for one segment creation to finish; another round follows only when
        // other appends used up the new segment's room meanwhile (every round is progress of the log).
        loop {
            let room = self.store.borrow_mut().room_for(len);
            match room {
                Room::Ready => return Ok(()),
                Room::InFlight => {
                    if !self.st.borrow().spare_in_progress {
                        // Nobody is creating it (cannot happen: both creators set the flag); let the append
                        // create it rather than wait forever.
                        return Ok(());
                    }
                    poll_fn(|cx| {
                        if self.st.borrow().spare_in_progress {
                            self.st.borrow_mut().spare_waiters.push(cx.waker().clone());
                            Poll::Pending
                        } else {
                            Poll::Ready(())
                        }
                    })
                    .await
                }
                Room::Create(dir, header) => {
                    self.st.borrow_mut().spare_in_progress = true;
                    make_spare(self, dir, header).await;
                    let st = self.st.borrow();
                    if st.spare_failed {
                        drop(st);
                        self.st.borrow_mut().spare_failed = false;
                        // Let the append try (and report) the creation itself.
                        return Ok(());
                    }
                }
            }
        }
    }

    /// [`QueueStore::append_message`] after [`room_for`](Self::room_for): never creates a segment file on the
    /// reactor thread.
    pub async fn append_message(
        &self,
        id: super::QueueId,
        env: &super::Envelope,
        received_header: &[u8],
        data: &[u8],
    ) -> Result<CommitTicket, QueueError> {
        let len = super::record::message_record_len(env, received_header.len(), data.len());
        self.room_for(len).await?;
        self.store
            .borrow_mut()
            .append_message(id, env, received_header, data)
    }

    /// [`QueueStore::append_progress`] after [`room_for`](Self::room_for).
    pub async fn append_progress(
        &self,
        id: super::QueueId,
        rcpt_index: u32,
        state: super::RcptState,
        diagnostic: &str,
    ) -> Result<CommitTicket, QueueError> {
        self.room_for(super::record::progress_record_len(diagnostic))
            .await?;
        self.store
            .borrow_mut()
            .append_progress(id, rcpt_index, state, diagnostic)
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
        // Under load, let the sessions in the middle of a transaction catch this sync (see `SyncPacing`).
        let delay = {
            let st = q.st.borrow();
            if st.shutdown {
                Duration::ZERO
            } else {
                st.pacing.delay_before_sync(Instant::now())
            }
        };
        if !delay.is_zero() {
            glommio::timer::sleep(delay).await;
        }

        let batch = q.store.borrow_mut().take_sync_batch();
        let target = batch.target;
        let bytes: u64 = batch.files.iter().map(|f| f.bytes).sum();
        let seqs: Vec<u64> = batch.files.iter().map(|f| f.seq).collect();
        let files: Vec<_> = batch.files.into_iter().map(|f| (f.file, f.write)).collect();
        let result: Result<(), String> = if files.is_empty() {
            Ok(())
        } else {
            // One pwrite of the batch's staged records, then one fdatasync, per touched file.
            let seqs = seqs.clone();
            glommio::executor()
                .spawn_blocking(move || {
                    for ((f, write), seq) in files.iter().zip(&seqs) {
                        if let Some((at, bytes)) = write {
                            segment::write_at(f, *at, bytes)
                                .map_err(|e| format!("write of segment {seq}: {e}"))?;
                        }
                        segment::fdatasync(f)
                            .map_err(|e| format!("fdatasync of segment {seq}: {e}"))?;
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
                    st.last_sync_failed = false;
                    st.batched_bytes += bytes;
                    if target > st.durable {
                        st.durable = target;
                    }
                }
                Err(e) => {
                    // The OS error (EIO, ENOSPC, ...) is in `e`; every ticket of the batch fails.
                    tracing::error!(
                        target: crate::eventlog::QUEUE,
                        "queue sync failed in {}: {e}; the batch's messages are refused, \
                         segments {seqs:?} sealed, segment deletion stopped until restart",
                        store.dir().display()
                    );
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
                    st.last_sync_failed = true;
                }
            }
            if target > st.synced {
                st.synced = target;
            }
            let woken = st.waiters.len();
            st.pacing.sync_ended(Instant::now(), woken);
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
                    let q = q.clone();
                    glommio::spawn_local(async move { make_spare(&q, dir, header).await }).detach();
                }
            }
        }
    }
}

/// Creates the next segment on the blocking pool and installs it as the spare; wakes the appends waiting for
/// it. The caller set `spare_in_progress`.
async fn make_spare(q: &ShardQueue, dir: crate::spool::Dir, header: super::record::SegmentHeader) {
    let seq = header.seq;
    let seg = glommio::executor()
        .spawn_blocking(move || Segment::create(&dir, &header))
        .await;
    let unneeded = {
        let mut st = q.st.borrow_mut();
        match &seg {
            // Logged once per run of failures (a full disk fails every attempt, after every sync).
            Err(e) if !st.spare_failure_logged => {
                tracing::error!(
                    target: crate::eventlog::QUEUE,
                    "creating queue segment {seq} failed: {e}"
                );
                st.spare_failure_logged = true;
            }
            Err(_) => {}
            Ok(_) => st.spare_failure_logged = false,
        }
        let failed = seg.is_err();
        let unneeded = q.store.borrow_mut().install_spare(seg);
        st.spare_in_progress = false;
        st.spare_failed = failed;
        for w in st.spare_waiters.drain(..) {
            w.wake();
        }
        unneeded
    };
    // The store rolled past it meanwhile (its sequence was skipped): removed on the blocking pool too.
    if let Some(name) = unneeded {
        let Ok(dir) = q.store.borrow().dir_handle() else {
            return;
        };
        let removed = glommio::executor()
            .spawn_blocking(move || delete_segment_file(&dir, &name))
            .await;
        if removed.is_ok() {
            q.store.borrow_mut().deletion_done();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(seq: u64, offset: u64) -> CommitTicket {
        CommitTicket { seq, offset }
    }

    /// A state after a successful sync to (1, 100).
    fn synced_to_100() -> CommitState {
        CommitState {
            synced: t(1, 100),
            durable: t(1, 100),
            requested: t(1, 100),
            ..Default::default()
        }
    }

    /// The pacing waits only under load: not for the first sync, not when the delay is zero, not once the
    /// shard has been quiet for the load window, not after a sync that woke a single session; then the sync
    /// after one that ended just now and woke several waits the delay.
    #[test]
    fn sync_pacing_delays_only_syncs_that_follow_each_other() {
        let d = Duration::from_micros(500);
        let t0 = Instant::now();
        let mut p = SyncPacing::new(d);
        assert_eq!(p.delay_before_sync(t0), Duration::ZERO, "first sync");
        p.sync_ended(t0, 3);
        assert_eq!(p.delay_before_sync(t0 + Duration::from_micros(100)), d);
        let window = d * SyncPacing::LOAD_WINDOW_FACTOR;
        assert_eq!(
            p.delay_before_sync(t0 + window - Duration::from_micros(1)),
            d
        );
        assert_eq!(
            p.delay_before_sync(t0 + window),
            Duration::ZERO,
            "quiet shard"
        );
        // A sync that woke one session: a lone client, nobody to wait for.
        p.sync_ended(t0, 1);
        assert_eq!(
            p.delay_before_sync(t0 + Duration::from_micros(100)),
            Duration::ZERO
        );
        let mut off = SyncPacing::new(Duration::ZERO);
        off.sync_ended(t0, 3);
        assert_eq!(off.delay_before_sync(t0), Duration::ZERO, "pacing off");
    }

    #[test]
    fn covered_ticket_is_durable_and_later_ones_wait() {
        let st = synced_to_100();
        assert!(matches!(
            st.verdict(t(1, 64), Some(t(1, 100))),
            Some(Ok(()))
        ));
        assert!(matches!(st.verdict(t(1, 100), None), Some(Ok(()))));
        assert!(st.verdict(t(1, 108), Some(t(1, 100))).is_none());
        assert!(st.verdict(t(2, 8), None).is_none());
    }

    #[test]
    fn failed_range_wins_over_a_later_successful_sync() {
        let mut st = synced_to_100();
        // The sync of segment 1 past offset 100 failed; a later sync (of segment 2) succeeded to (2, 64).
        st.failed.push((1, 100));
        st.synced = t(2, 64);
        st.durable = t(2, 64);
        assert!(matches!(st.verdict(t(1, 64), None), Some(Ok(()))));
        assert!(matches!(
            st.verdict(t(1, 108), None),
            Some(Err(QueueError::SyncFailed(_)))
        ));
        assert!(matches!(st.verdict(t(2, 64), None), Some(Ok(()))));
    }

    /// The check can fail: a completion watermark past the ticket with no failed range and no successful sync
    /// covering it (e.g. the failure branch forgot to record its range) is reported...
    #[test]
    fn check_covered_reports_a_ticket_no_successful_sync_covers() {
        let mut st = synced_to_100();
        st.synced = t(1, 200);
        assert_eq!(st.check_covered(t(1, 100), None), Ok(()));
        assert_eq!(
            st.check_covered(t(1, 150), None),
            Err(InvariantError::NotCovered {
                ticket: t(1, 150),
                synced: t(1, 200),
                durable: t(1, 100),
            })
        );
        // ... and so is a store whose durable position disagrees with the committer's.
        st.durable = t(1, 200);
        assert_eq!(st.check_covered(t(1, 150), Some(t(1, 200))), Ok(()));
        assert!(st.check_covered(t(1, 150), Some(t(1, 120))).is_err());
    }

    /// ... and `durable()` would panic rather than answer Ok.
    #[test]
    #[should_panic(expected = "queue invariant")]
    fn verdict_panics_on_an_uncovered_ticket() {
        let mut st = synced_to_100();
        st.synced = t(1, 200);
        let _ = st.verdict(t(1, 150), None);
    }
}
