//! Counters shared by all shards, per-shard latency histograms, and the
//! final summary (text and JSON).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Connection-level failure classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrKind {
    Refused,
    Reset,
    Timeout,
    Closed,
    Protocol,
    Rejected,
    Tls,
    Other,
}

impl ErrKind {
    pub const ALL: [ErrKind; 8] = [
        ErrKind::Refused,
        ErrKind::Reset,
        ErrKind::Timeout,
        ErrKind::Closed,
        ErrKind::Protocol,
        ErrKind::Rejected,
        ErrKind::Tls,
        ErrKind::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ErrKind::Refused => "refused",
            ErrKind::Reset => "reset",
            ErrKind::Timeout => "timeout",
            ErrKind::Closed => "closed",
            ErrKind::Protocol => "protocol",
            ErrKind::Rejected => "rejected",
            ErrKind::Tls => "tls",
            ErrKind::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Live counters, updated by every shard, read by the progress printer.
#[derive(Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub tempfail: AtomicU64,
    pub permfail: AtomicU64,
    pub rcpt_rejected: AtomicU64,
    pub record_errors: AtomicU64,
    /// Connection slots still busy when the run was cut off (abort, or the
    /// --duration deadline plus grace).
    pub cut_off: AtomicU64,
    conn_errors: [AtomicU64; 8],
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub accepted: u64,
    pub tempfail: u64,
    pub permfail: u64,
    pub conn_errors: u64,
}

impl Snapshot {
    pub fn done(&self) -> u64 {
        self.accepted + self.tempfail + self.permfail
    }
}

impl Counters {
    /// Counts a connection error; returns the previous count of that kind.
    pub fn conn_error(&self, kind: ErrKind) -> u64 {
        self.conn_errors[kind.index()].fetch_add(1, Relaxed)
    }

    pub fn conn_errors_total(&self) -> u64 {
        self.conn_errors.iter().map(|c| c.load(Relaxed)).sum()
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            accepted: self.accepted.load(Relaxed),
            tempfail: self.tempfail.load(Relaxed),
            permfail: self.permfail.load(Relaxed),
            conn_errors: self.conn_errors_total(),
        }
    }

    pub fn error_kinds(&self) -> Vec<(&'static str, u64)> {
        ErrKind::ALL
            .iter()
            .map(|k| (k.name(), self.conn_errors[k.index()].load(Relaxed)))
            .collect()
    }
}

/// Highest latency recorded (values above saturate): one hour in µs.
const MAX_US: u64 = 3_600_000_000;

pub struct Hists {
    pub connect: Histogram<u64>,
    pub greeting: Histogram<u64>,
    pub mail_rcpt: Histogram<u64>,
    pub data_to_250: Histogram<u64>,
    /// With --starttls: the TLS handshake after the 220 to STARTTLS.
    pub tls_handshake: Histogram<u64>,
    /// With `--rate`: from the message's scheduled start to its final reply (open-loop latency, free of
    /// coordinated omission: a slow server delays later sends, and that delay is counted).
    pub scheduled_to_250: Histogram<u64>,
}

fn new_hist() -> Result<Histogram<u64>, String> {
    Histogram::new_with_bounds(1, MAX_US, 3).map_err(|e| format!("histogram: {e}"))
}

pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
    h.saturating_record(us);
}

impl Hists {
    pub fn new() -> Result<Self, String> {
        Ok(Hists {
            connect: new_hist()?,
            greeting: new_hist()?,
            mail_rcpt: new_hist()?,
            data_to_250: new_hist()?,
            tls_handshake: new_hist()?,
            scheduled_to_250: new_hist()?,
        })
    }

    pub fn merge(&mut self, other: &Hists) -> Result<(), String> {
        let err = |e: hdrhistogram::AdditionError| format!("histogram merge: {e}");
        self.connect.add(&other.connect).map_err(err)?;
        self.greeting.add(&other.greeting).map_err(err)?;
        self.mail_rcpt.add(&other.mail_rcpt).map_err(err)?;
        self.data_to_250.add(&other.data_to_250).map_err(err)?;
        self.tls_handshake.add(&other.tls_handshake).map_err(err)?;
        self.scheduled_to_250
            .add(&other.scheduled_to_250)
            .map_err(err)?;
        Ok(())
    }

    fn rows(&self) -> Vec<(&'static str, &Histogram<u64>)> {
        let mut rows = vec![
            ("connect", &self.connect),
            ("greeting", &self.greeting),
            ("mail_rcpt", &self.mail_rcpt),
            ("data_to_250", &self.data_to_250),
        ];
        if !self.tls_handshake.is_empty() {
            rows.push(("tls_handshake", &self.tls_handshake));
        }
        if !self.scheduled_to_250.is_empty() {
            rows.push(("scheduled_to_250", &self.scheduled_to_250));
        }
        rows
    }
}

#[derive(Debug, Serialize)]
pub struct LatencyRow {
    pub name: &'static str,
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct RunConfig {
    pub targets: Vec<String>,
    pub connections: usize,
    pub messages: u64,
    pub duration_s: Option<f64>,
    pub size: usize,
    pub rcpts: usize,
    pub shards: usize,
    pub pipelining: bool,
    /// `--chunking` (BDAT) and its `--window`.
    pub chunking: bool,
    pub window: usize,
    pub new_connection: bool,
    /// `--close-with-reset`: an RST after the reply to QUIT.
    pub close_with_reset: bool,
    /// Recipient domains as `name:weight`.
    pub domains: Vec<String>,
    /// `--eml` path and the number of messages loaded from it.
    pub eml: Option<String>,
    pub eml_messages: usize,
    pub starttls: bool,
    pub auth: bool,
}

#[cfg(test)]
impl RunConfig {
    /// A run of `messages` 1 KB messages over `connections` to 127.0.0.1:2525, for the renderers' tests.
    pub fn sample(connections: usize, messages: u64) -> Self {
        RunConfig {
            targets: vec!["127.0.0.1:2525".into()],
            connections,
            messages,
            size: 1024,
            rcpts: 1,
            shards: 1,
            pipelining: true,
            ..Default::default()
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub sent: u64,
    pub accepted: u64,
    pub tempfail: u64,
    pub permfail: u64,
    pub conn_errors: u64,
    pub conn_error_kinds: std::collections::BTreeMap<&'static str, u64>,
    pub rcpt_rejected: u64,
    pub record_errors: u64,
    /// Connections closed mid-work at the hard stop (see Counters::cut_off).
    pub cut_off: u64,
    pub aborted: Option<String>,
    pub elapsed_s: f64,
    pub msgs_per_s: f64,
    pub latency_us: Vec<LatencyRow>,
    pub config: RunConfig,
    /// One point per second of the run (see series.rs).
    pub series: Vec<crate::series::Point>,
    /// More seconds than `series::MAX_POINTS`: the rest were dropped.
    pub series_truncated: bool,
}

impl Summary {
    pub fn build(
        counters: &Counters,
        hists: &Hists,
        elapsed: Duration,
        aborted: Option<String>,
        config: RunConfig,
    ) -> Summary {
        let s = counters.snapshot();
        let elapsed_s = elapsed.as_secs_f64();
        let latency_us = hists
            .rows()
            .iter()
            .map(|(name, h)| LatencyRow {
                name,
                count: h.len(),
                p50: h.value_at_quantile(0.5),
                p90: h.value_at_quantile(0.9),
                p99: h.value_at_quantile(0.99),
                p999: h.value_at_quantile(0.999),
                max: h.max(),
                mean: h.mean(),
            })
            .collect();
        Summary {
            sent: s.done(),
            accepted: s.accepted,
            tempfail: s.tempfail,
            permfail: s.permfail,
            conn_errors: s.conn_errors,
            conn_error_kinds: counters.error_kinds().into_iter().collect(),
            rcpt_rejected: counters.rcpt_rejected.load(Relaxed),
            record_errors: counters.record_errors.load(Relaxed),
            cut_off: counters.cut_off.load(Relaxed),
            aborted,
            elapsed_s,
            msgs_per_s: if elapsed_s > 0.0 {
                s.done() as f64 / elapsed_s
            } else {
                0.0
            },
            latency_us,
            config,
            series: Vec::new(),
            series_truncated: false,
        }
    }

    pub fn to_text(&self) -> String {
        let mut out = format!(
            "messages: sent {} accepted {} tempfail {} permfail {} conn_errors {}\n\
             elapsed_s: {:.3}  msgs_per_s: {:.1}\n",
            self.sent,
            self.accepted,
            self.tempfail,
            self.permfail,
            self.conn_errors,
            self.elapsed_s,
            self.msgs_per_s
        );
        out.push_str(&format!(
            "{:<14}{:>9}{:>9}{:>9}{:>9}{:>9}{:>9}\n",
            "latency_us", "p50", "p90", "p99", "p99.9", "max", "count"
        ));
        for r in &self.latency_us {
            if r.count == 0 {
                out.push_str(&format!(
                    "{:<14}{:>9}{:>9}{:>9}{:>9}{:>9}{:>9}\n",
                    r.name, "-", "-", "-", "-", "-", 0
                ));
            } else {
                out.push_str(&format!(
                    "{:<14}{:>9}{:>9}{:>9}{:>9}{:>9}{:>9}\n",
                    r.name, r.p50, r.p90, r.p99, r.p999, r.max, r.count
                ));
            }
        }
        let kinds: Vec<String> = self
            .conn_error_kinds
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !kinds.is_empty() {
            out.push_str(&format!("conn_error_kinds: {}\n", kinds.join(" ")));
        }
        if self.rcpt_rejected > 0 {
            out.push_str(&format!("rcpt_rejected: {}\n", self.rcpt_rejected));
        }
        if self.record_errors > 0 {
            out.push_str(&format!("record_errors: {}\n", self.record_errors));
        }
        if self.cut_off > 0 {
            out.push_str(&format!(
                "cut_off: {} connection(s) closed mid-work at the stop\n",
                self.cut_off
            ));
        }
        if let Some(why) = &self.aborted {
            out.push_str(&format!("aborted: {why}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_text_layout() {
        let c = Counters::default();
        c.accepted.store(9, Relaxed);
        c.permfail.store(1, Relaxed);
        c.conn_error(ErrKind::Refused);
        let mut h = Hists::new().expect("hist");
        record(&mut h.connect, Duration::from_micros(120));
        let mut other = Hists::new().expect("hist");
        record(&mut other.connect, Duration::from_micros(80));
        h.merge(&other).expect("merge");
        let s = Summary::build(
            &c,
            &h,
            Duration::from_secs(2),
            None,
            RunConfig::sample(1, 10),
        );
        let t = s.to_text();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "messages: sent 10 accepted 9 tempfail 0 permfail 1 conn_errors 1"
        );
        assert_eq!(lines[1], "elapsed_s: 2.000  msgs_per_s: 5.0");
        assert!(lines[2].starts_with("latency_us"));
        assert!(lines[3].starts_with("connect"));
        assert!(lines[3].ends_with(" 2"));
        assert!(lines[6].starts_with("data_to_250"));
        assert_eq!(lines[7], "conn_error_kinds: refused=1");
        let json = serde_json::to_string(&s).expect("json");
        assert!(json.contains("\"accepted\":9"));
    }
}
