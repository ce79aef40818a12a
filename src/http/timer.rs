//! hyper's timer for the HTTP executor (its header-read timeout needs one): hyper wants `Send + Sync` sleeps,
//! which glommio's timers are not, so a sleep here is a deadline in a shared list, and a task on the same
//! executor ([`TickTimer::run`]) wakes the expired ones every [`limits::HTTP_TIMER_TICK_INTERVAL`]. Every
//! sleep is made and polled on the HTTP executor's thread; the list's mutex is never contended and never
//! touched by a shard.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::limits;

struct SleepState {
    deadline: Instant,
    fired: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

/// A `hyper::rt::Timer` whose sleeps end at the first tick at or after their deadline.
#[derive(Clone, Default)]
pub struct TickTimer {
    /// Sleeps that have been polled and not yet fired (a dropped one is removed at the next tick).
    waiting: Arc<Mutex<Vec<Arc<SleepState>>>>,
}

impl TickTimer {
    /// Wakes every sleep whose deadline has passed; forgets sleeps nobody holds any more.
    pub fn tick(&self, now: Instant) {
        let mut fired = Vec::new();
        if let Ok(mut w) = self.waiting.lock() {
            w.retain(|s| {
                if s.deadline <= now {
                    fired.push(s.clone());
                    false
                } else {
                    // Only the list holds it: the sleep was dropped.
                    Arc::strong_count(s) > 1
                }
            });
        }
        for s in fired {
            s.fired.store(true, Ordering::Release);
            let waker = s.waker.lock().ok().and_then(|mut w| w.take());
            if let Some(w) = waker {
                w.wake();
            }
        }
    }

    /// Sleeps waiting now (for tests and bounds).
    pub fn waiting(&self) -> usize {
        self.waiting.lock().map(|w| w.len()).unwrap_or(0)
    }

    /// Ticks until `stop` returns true (runs as a task on the HTTP executor).
    pub async fn run(self, stop: impl Fn() -> bool) {
        while !stop() {
            glommio::timer::sleep(limits::HTTP_TIMER_TICK_INTERVAL).await;
            self.tick(Instant::now());
        }
        // Whoever still sleeps is woken, so nothing waits on a timer that no longer ticks.
        self.tick(Instant::now() + Duration::from_secs(365 * 86400));
    }
}

/// One sleep of a [`TickTimer`].
pub struct TickSleep {
    state: Arc<SleepState>,
    registered: bool,
    timer: TickTimer,
}

impl Future for TickSleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.state.fired.load(Ordering::Acquire) || Instant::now() >= self.state.deadline {
            return Poll::Ready(());
        }
        if let Ok(mut w) = self.state.waker.lock() {
            match w.as_ref() {
                Some(old) if old.will_wake(cx.waker()) => {}
                _ => *w = Some(cx.waker().clone()),
            }
        }
        if !self.registered {
            self.registered = true;
            if let Ok(mut w) = self.timer.waiting.lock() {
                w.push(self.state.clone());
            }
        }
        Poll::Pending
    }
}

impl hyper::rt::Sleep for TickSleep {}

impl hyper::rt::Timer for TickTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(TickSleep {
            state: Arc::new(SleepState {
                deadline,
                fired: AtomicBool::new(false),
                waker: Mutex::new(None),
            }),
            registered: false,
            timer: self.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer as _;

    #[test]
    fn sleeps_end_at_the_first_tick_past_their_deadline_and_dropped_ones_are_forgotten() {
        let t = TickTimer::default();
        let mut cx = Context::from_waker(Waker::noop());
        let start = Instant::now();
        let mut long = t.sleep(Duration::from_secs(3600));
        let mut short = t.sleep_until(start + Duration::from_millis(1));
        let mut dropped = t.sleep(Duration::from_secs(3600));
        assert!(long.as_mut().poll(&mut cx).is_pending());
        assert!(dropped.as_mut().poll(&mut cx).is_pending());
        // Not yet due when polled (or already due: then it is ready at once, which is right too).
        let short_pending = short.as_mut().poll(&mut cx).is_pending();
        drop(dropped);
        assert_eq!(t.waiting(), 2 + usize::from(short_pending));
        t.tick(start + Duration::from_millis(2));
        assert!(short.as_mut().poll(&mut cx).is_ready());
        assert!(long.as_mut().poll(&mut cx).is_pending());
        assert_eq!(t.waiting(), 1, "the fired and the dropped sleeps are gone");
        t.tick(start + Duration::from_secs(3601));
        assert!(long.as_mut().poll(&mut cx).is_ready());
        assert_eq!(t.waiting(), 0);
    }
}
