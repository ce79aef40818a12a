// shardmta's addition to glommio 0.9.0 (see vendor/glommio/PATCHES.md): what the reactor of the calling thread
// has cost so far, so that an application can report it per unit of work (shardmta: per message per shard).

//! Counters of the reactor's work on the calling thread: parks (the executor went to sleep), direct system
//! calls glommio made, calls that entered io_uring (submit or wait), and wakeups by other threads (the
//! executor's eventfd was written while it slept). Each is a thread-local `Cell`: counting costs a few
//! instructions and no atomic operation.

use std::cell::Cell;

thread_local! {
    static PARKS: Cell<u64> = const { Cell::new(0) };
    static SYSCALLS: Cell<u64> = const { Cell::new(0) };
    static RING_ENTERS: Cell<u64> = const { Cell::new(0) };
    static FOREIGN_WAKEUPS: Cell<u64> = const { Cell::new(0) };
}

#[inline]
fn bump(c: &'static std::thread::LocalKey<Cell<u64>>) {
    // `try_with`: a count during thread teardown is dropped, never a panic.
    let _ = c.try_with(|c| c.set(c.get().wrapping_add(1)));
}

#[inline]
pub(crate) fn park() {
    bump(&PARKS)
}

#[inline]
pub(crate) fn syscall() {
    bump(&SYSCALLS)
}

#[inline]
pub(crate) fn ring_enter() {
    bump(&RING_ENTERS)
}

#[inline]
pub(crate) fn foreign_wakeup() {
    bump(&FOREIGN_WAKEUPS)
}

/// The reactor's counts on the calling thread since it started (they only grow, wrapping at `u64::MAX`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReactorCounters {
    /// Times the executor went to sleep in the kernel because it had nothing to run.
    pub parks: u64,
    /// System calls glommio made directly (send, recv, accept, eventfd writes, ...), not through io_uring.
    pub syscalls: u64,
    /// Calls into io_uring to submit requests or wait for completions (each at most one `io_uring_enter`).
    pub ring_enters: u64,
    /// Completions of the executor's eventfd: another thread woke it (a channel message, a foreign waker, a
    /// blocking-pool result).
    pub foreign_wakeups: u64,
}

/// The calling thread's [`ReactorCounters`].
pub fn reactor_counters() -> ReactorCounters {
    let get = |c: &'static std::thread::LocalKey<Cell<u64>>| c.try_with(Cell::get).unwrap_or(0);
    ReactorCounters {
        parks: get(&PARKS),
        syscalls: get(&SYSCALLS),
        ring_enters: get(&RING_ENTERS),
        foreign_wakeups: get(&FOREIGN_WAKEUPS),
    }
}
