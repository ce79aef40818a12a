//! A shard's session buffers: the free list of fixed-size read buffers, so that a new connection neither
//! allocates nor zeroes one (shared by the server's sessions and the load tester's sink), and the
//! [`DataBudget`], the bound on the bytes of unfinished messages a shard holds in memory.
//!
//! Bounds: at most `keep` read buffers are kept; a buffer handed back beyond that is freed. The data budget
//! never grants more than its limit; sessions wait for room (woken when memory is released), for a bounded time.

use std::cell::{Cell, RefCell};
use std::ops::{Deref, DerefMut};
use std::task::{Poll, Waker};
use std::time::Duration;

/// Bytes of unfinished message content (DATA/BDAT being received) one shard may hold in memory, shared by its
/// sessions (not `Sync`: one per shard). A session asks before it grows its message buffer; if the budget is
/// spent it waits for room.
#[derive(Debug)]
pub struct DataBudget {
    limit: u64,
    used: Cell<u64>,
    /// Most bytes held at once since [`DataBudget::take_peak`] was last called.
    peak: Cell<u64>,
    /// Sessions waiting for room; all are woken when memory is released (at most one per session).
    waiters: RefCell<Vec<Waker>>,
}

impl DataBudget {
    pub fn new(limit: u64) -> Self {
        DataBudget {
            limit,
            used: Cell::new(0),
            peak: Cell::new(0),
            waiters: RefCell::new(Vec::new()),
        }
    }

    /// Takes `bytes` if they fit.
    pub fn try_take(&self, bytes: u64) -> bool {
        let used = self.used.get();
        if used.saturating_add(bytes) > self.limit {
            return false;
        }
        self.used.set(used + bytes);
        self.peak.set(self.peak.get().max(used + bytes));
        true
    }

    /// Accounts `bytes` that are in use already (a buffer grew without asking; rare), even past the limit.
    pub fn force_take(&self, bytes: u64) {
        self.used.set(self.used.get().saturating_add(bytes));
        self.peak.set(self.peak.get().max(self.used.get()));
    }

    /// Gives back `bytes` and wakes the sessions waiting for room.
    pub fn release(&self, bytes: u64) {
        self.used.set(self.used.get().saturating_sub(bytes));
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Takes `bytes`, waiting up to `max_wait` for room; false if there was none in time.
    pub async fn take(&self, bytes: u64, max_wait: Duration) -> bool {
        if self.try_take(bytes) {
            return true;
        }
        let wait = futures_lite::future::poll_fn(|cx| {
            if self.try_take(bytes) {
                return Poll::Ready(true);
            }
            let mut w = self.waiters.borrow_mut();
            if !w.iter().any(|x| x.will_wake(cx.waker())) {
                w.push(cx.waker().clone());
            }
            Poll::Pending
        });
        futures_lite::future::or(wait, async {
            glommio::timer::sleep(max_wait).await;
            false
        })
        .await
    }

    /// The most bytes held at once since the last call (to tell when a burst has ended and freed memory is
    /// worth giving back to the system).
    pub fn take_peak(&self) -> u64 {
        self.peak.replace(self.used.get())
    }

    /// Bytes granted now.
    pub fn used(&self) -> u64 {
        self.used.get()
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }
}

/// Free list of buffers of one size (not `Sync`: one per shard).
pub struct BufferPool {
    size: usize,
    keep: usize,
    free: RefCell<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// Buffers of `size` bytes; at most `keep` kept for reuse.
    pub fn new(size: usize, keep: usize) -> Self {
        BufferPool {
            size,
            keep,
            free: RefCell::new(Vec::new()),
        }
    }

    /// A buffer of the pool's size, from the free list when one is there; it goes back when dropped.
    pub fn take(&self) -> PooledBuffer<'_> {
        let buf = self
            .free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| vec![0u8; self.size]);
        debug_assert_eq!(buf.len(), self.size);
        PooledBuffer { pool: self, buf }
    }

    /// Buffers waiting for reuse.
    pub fn kept(&self) -> usize {
        self.free.borrow().len()
    }
}

/// A buffer on loan from a [`BufferPool`].
pub struct PooledBuffer<'a> {
    pool: &'a BufferPool,
    buf: Vec<u8>,
}

impl Drop for PooledBuffer<'_> {
    fn drop(&mut self) {
        let mut free = self.pool.free.borrow_mut();
        if free.len() < self.pool.keep {
            free.push(std::mem::take(&mut self.buf));
        }
    }
}

impl Deref for PooledBuffer<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl DerefMut for PooledBuffer<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_up_to_the_bound() {
        let pool = BufferPool::new(16, 1);
        let mut a = pool.take();
        a[0] = 7;
        drop(a);
        assert_eq!(pool.kept(), 1);
        let again = pool.take();
        assert_eq!(again[0], 7, "the kept buffer comes back, not a new one");
        assert_eq!(pool.kept(), 0);
        let other = pool.take();
        assert_eq!((again.len(), other.len()), (16, 16));
        drop(again);
        drop(other);
        // Two handed back, one kept.
        assert_eq!(pool.kept(), 1);
    }
}
