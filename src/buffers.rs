//! A shard's free list of fixed-size session read buffers, so that a new connection neither allocates nor
//! zeroes one; shared by the server's sessions and the load tester's sink.
//!
//! Bound: at most `keep` buffers are kept; a buffer handed back beyond that is freed.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

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
