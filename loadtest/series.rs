//! Per-second series: each shard counts outcomes and DATA-end-to-250
//! latencies in a bucket per second of the run, and hands a finished bucket
//! to the shared [`Aggregator`] when its second is over (on the next event or
//! on the shard's 200 ms tick). A second becomes a [`Point`] once every shard
//! has moved past it, so the main thread can show it live.

use std::collections::BTreeMap;
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Cap on the points kept (one week of seconds); later seconds are dropped
/// and [`Aggregator::truncated`] says so.
pub const MAX_POINTS: usize = 7 * 86_400;
/// Latency range of the per-second histograms (1 µs .. 1 hour), 2 significant
/// digits: percentiles within 1%.
const MAX_US: u64 = 3_600_000_000;

/// One second of the run, all shards merged.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    /// Second since the start of the run (the point covers [t, t+1)).
    pub t: u64,
    /// Length of the second that the run covered (below 1 only for the last).
    pub span_s: f64,
    pub accepted: u64,
    /// Final reply 4xx.
    pub tempfail: u64,
    /// Final reply 5xx.
    pub permfail: u64,
    pub conn_errors: u64,
    /// DATA-end-to-250 percentiles of the messages finished in this second.
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
}

impl Point {
    pub fn failures(&self) -> u64 {
        self.tempfail + self.permfail + self.conn_errors
    }

    /// Accepted messages per second over the span.
    pub fn accepted_rate(&self) -> f64 {
        if self.span_s > 0.0 {
            self.accepted as f64 / self.span_s
        } else {
            0.0
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Accepted,
    TempFail,
    PermFail,
    ConnError,
}

/// One second on one shard.
struct Bucket {
    accepted: u64,
    tempfail: u64,
    permfail: u64,
    conn_errors: u64,
    data_to_250: Histogram<u64>,
}

impl Bucket {
    fn new() -> Result<Self, String> {
        Ok(Bucket {
            accepted: 0,
            tempfail: 0,
            permfail: 0,
            conn_errors: 0,
            data_to_250: Histogram::new_with_bounds(1, MAX_US, 2)
                .map_err(|e| format!("histogram: {e}"))?,
        })
    }

    fn is_empty(&self) -> bool {
        self.accepted + self.tempfail + self.permfail + self.conn_errors == 0
            && self.data_to_250.is_empty()
    }

    fn merge(&mut self, o: &Bucket) {
        self.accepted += o.accepted;
        self.tempfail += o.tempfail;
        self.permfail += o.permfail;
        self.conn_errors += o.conn_errors;
        // Same bounds on both sides: cannot fail.
        let _ = self.data_to_250.add(&o.data_to_250);
    }

    fn point(&self, t: u64) -> Point {
        let h = &self.data_to_250;
        let q = |q: f64| (!h.is_empty()).then(|| h.value_at_quantile(q));
        Point {
            t,
            span_s: 1.0,
            accepted: self.accepted,
            tempfail: self.tempfail,
            permfail: self.permfail,
            conn_errors: self.conn_errors,
            p50_us: q(0.5),
            p99_us: q(0.99),
        }
    }
}

struct Agg {
    /// Buckets handed in for seconds not yet finalized.
    open: BTreeMap<u64, Bucket>,
    /// Per shard: every second below this one is complete on that shard.
    watermarks: Vec<u64>,
    /// First second not yet turned into a point.
    next: u64,
    points: Vec<Point>,
    truncated: bool,
}

impl Agg {
    fn finalize_below(&mut self, end: u64) {
        while self.next < end {
            let t = self.next;
            let p = match self.open.remove(&t) {
                Some(b) => b.point(t),
                None => empty_point(t),
            };
            if self.points.len() < MAX_POINTS {
                self.points.push(p);
            } else {
                self.truncated = true;
            }
            self.next += 1;
        }
    }
}

fn empty_point(t: u64) -> Point {
    Point {
        t,
        span_s: 1.0,
        accepted: 0,
        tempfail: 0,
        permfail: 0,
        conn_errors: 0,
        p50_us: None,
        p99_us: None,
    }
}

/// Shared by all shards and the main thread.
pub struct Aggregator {
    inner: Mutex<Agg>,
}

impl Aggregator {
    pub fn new(shards: usize) -> Self {
        Aggregator {
            inner: Mutex::new(Agg {
                open: BTreeMap::new(),
                watermarks: vec![0; shards],
                next: 0,
                points: Vec::new(),
                truncated: false,
            }),
        }
    }

    /// Shard `shard` hands in its bucket for second `t` (if any) and declares
    /// every second below `watermark` complete.
    fn hand_in(&self, shard: usize, t: u64, bucket: Option<Bucket>, watermark: u64) {
        let Ok(mut g) = self.inner.lock() else {
            return;
        };
        if let Some(b) = bucket {
            if t >= g.next {
                match g.open.get_mut(&t) {
                    Some(have) => have.merge(&b),
                    None => {
                        g.open.insert(t, b);
                    }
                }
            }
        }
        if let Some(w) = g.watermarks.get_mut(shard) {
            *w = (*w).max(watermark);
        }
        let low = g.watermarks.iter().copied().min().unwrap_or(0);
        // A finished shard reports u64::MAX: stop at what was handed in.
        let end = if low == u64::MAX {
            g.open.keys().next_back().map_or(g.next, |&k| k + 1)
        } else {
            low
        };
        g.finalize_below(end);
    }

    /// The latest complete second, for the live progress line.
    pub fn last(&self) -> Option<Point> {
        self.inner
            .lock()
            .ok()
            .and_then(|g| g.points.last().copied())
    }

    /// After every shard finished: all seconds up to the end of the run
    /// (`elapsed_s`), the last one with its partial span.
    pub fn finish(&self, elapsed_s: f64) -> (Vec<Point>, bool) {
        let Ok(mut g) = self.inner.lock() else {
            return (Vec::new(), false);
        };
        let end = (elapsed_s.max(0.0).ceil() as u64).max(1);
        let last_open = g.open.keys().next_back().map_or(0, |&k| k + 1);
        g.finalize_below(end.max(last_open));
        let mut points = std::mem::take(&mut g.points);
        for p in &mut points {
            p.span_s = (elapsed_s - p.t as f64).clamp(0.001, 1.0);
        }
        (points, g.truncated)
    }
}

/// One shard's current bucket.
pub struct Local {
    shard: usize,
    second: u64,
    bucket: Bucket,
}

impl Local {
    pub fn new(shard: usize) -> Result<Self, String> {
        Ok(Local {
            shard,
            second: 0,
            bucket: Bucket::new()?,
        })
    }

    /// Moves to second `now` if it is later, handing in the finished bucket.
    pub fn roll(&mut self, now: u64, agg: &Aggregator) {
        if now <= self.second {
            return;
        }
        let done = match Bucket::new() {
            Ok(fresh) => std::mem::replace(&mut self.bucket, fresh),
            // Out of memory for a histogram: keep counting in the old one.
            Err(_) => return,
        };
        let done = (!done.is_empty()).then_some(done);
        agg.hand_in(self.shard, self.second, done, now);
        self.second = now;
    }

    pub fn event(&mut self, now: u64, ev: Event, agg: &Aggregator) {
        self.roll(now, agg);
        let b = &mut self.bucket;
        match ev {
            Event::Accepted => b.accepted += 1,
            Event::TempFail => b.tempfail += 1,
            Event::PermFail => b.permfail += 1,
            Event::ConnError => b.conn_errors += 1,
        }
    }

    pub fn latency(&mut self, now: u64, us: u64, agg: &Aggregator) {
        self.roll(now, agg);
        self.bucket.data_to_250.saturating_record(us.max(1));
    }

    /// The shard is done: hands in the last bucket.
    pub fn finish(&mut self, agg: &Aggregator) {
        let done = match Bucket::new() {
            Ok(fresh) => std::mem::replace(&mut self.bucket, fresh),
            Err(_) => return,
        };
        let done = (!done.is_empty()).then_some(done);
        agg.hand_in(self.shard, self.second, done, u64::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_complete_only_when_every_shard_passed_them() {
        let agg = Aggregator::new(2);
        let mut a = Local::new(0).expect("local");
        let mut b = Local::new(1).expect("local");
        a.event(0, Event::Accepted, &agg);
        a.latency(0, 1000, &agg);
        b.event(0, Event::Accepted, &agg);
        b.latency(0, 3000, &agg);
        a.event(1, Event::TempFail, &agg);
        // Shard b has not moved past second 0 yet.
        assert_eq!(agg.last(), None);
        b.roll(2, &agg);
        let p = agg.last().expect("second 0 done");
        assert_eq!((p.t, p.accepted, p.tempfail), (0, 2, 0));
        let (p50, p99) = (p.p50_us.expect("p50"), p.p99_us.expect("p99"));
        assert!((990..=1010).contains(&p50), "p50 {p50}");
        assert!((2970..=3030).contains(&p99), "p99 {p99}");
        // Shard a jumps to second 4 (idle in between); b finishes.
        a.event(4, Event::ConnError, &agg);
        a.event(4, Event::PermFail, &agg);
        b.finish(&agg);
        a.finish(&agg);
        let (pts, truncated) = agg.finish(4.5);
        assert!(!truncated);
        let ts: Vec<u64> = pts.iter().map(|p| p.t).collect();
        assert_eq!(ts, vec![0, 1, 2, 3, 4]);
        assert_eq!(pts[1].tempfail, 1);
        assert_eq!(pts[2].accepted, 0);
        assert_eq!(pts[2].p50_us, None);
        assert_eq!((pts[4].conn_errors, pts[4].permfail), (1, 1));
        assert_eq!(pts[4].failures(), 2);
        assert!((pts[4].span_s - 0.5).abs() < 1e-9);
        assert!((pts[0].accepted_rate() - 2.0).abs() < 1e-9);
    }

    #[test]
    fn series_covers_the_whole_run_even_without_events() {
        let agg = Aggregator::new(1);
        let mut a = Local::new(0).expect("local");
        a.event(0, Event::Accepted, &agg);
        a.finish(&agg);
        let (pts, _) = agg.finish(2.2);
        assert_eq!(pts.len(), 3);
        assert_eq!(pts[0].accepted, 1);
        assert!((pts[2].span_s - 0.2).abs() < 1e-9);
    }

    #[test]
    fn late_bucket_for_a_finalized_second_is_ignored() {
        let agg = Aggregator::new(1);
        let mut a = Local::new(0).expect("local");
        a.roll(3, &agg);
        // Seconds 0..3 are final; an (impossible) older bucket is dropped.
        agg.hand_in(0, 1, Bucket::new().ok(), 3);
        a.finish(&agg);
        let (pts, _) = agg.finish(3.0);
        assert_eq!(pts.len(), 3);
        assert!(pts.iter().all(|p| p.accepted == 0));
    }
}
