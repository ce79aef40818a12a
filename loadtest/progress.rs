//! The progress line: once a second, rate, accepted, errors (4xx, 5xx,
//! connection) and the last complete second's DATA-end-to-250 p50/p99. On a
//! terminal (stderr is a TTY) it is one line redrawn in place; otherwise one
//! line per second. Error messages go through [`log`], which clears the live
//! line first so that no message is hidden or garbled.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use crate::chart::fmt_us;
use crate::report::Snapshot;
use crate::series::Point;

static LIVE: AtomicBool = AtomicBool::new(false);

/// True if stderr is a terminal.
pub fn stderr_is_tty() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

/// Turns the in-place line on or off; off ends the line with a newline.
pub fn set_live(on: bool) {
    if LIVE.swap(on, Relaxed) && !on {
        eprintln!();
    }
}

/// Prints a message on its own line (above the live line, if any).
pub fn log(msg: &str) {
    let mut e = std::io::stderr().lock();
    if LIVE.load(Relaxed) {
        let _ = write!(e, "\r\x1b[K{msg}\n");
    } else {
        let _ = writeln!(e, "{msg}");
    }
}

/// Shows one progress update.
pub fn show(line: &str) {
    let mut e = std::io::stderr().lock();
    if LIVE.load(Relaxed) {
        let _ = write!(e, "\r\x1b[K{line}");
        let _ = e.flush();
    } else {
        let _ = writeln!(e, "{line}");
    }
}

pub fn line(elapsed_s: f64, rate: f64, cur: &Snapshot, last: Option<&Point>) -> String {
    let lat = match last.and_then(|p| Some((p.p50_us?, p.p99_us?))) {
        Some((p50, p99)) => format!("p50 {} p99 {}", fmt_us(p50 as f64), fmt_us(p99 as f64)),
        None => "p50 - p99 -".to_string(),
    };
    format!(
        "[{elapsed_s:>5.0}s] {rate:>7.0} msg/s  accepted {}  errors 4xx {} 5xx {} conn {}  DATA-250 {lat}",
        cur.accepted, cur.tempfail, cur.permfail, cur.conn_errors
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_shows_errors_and_latency() {
        let s = Snapshot {
            accepted: 1000,
            tempfail: 2,
            permfail: 3,
            conn_errors: 4,
        };
        let p = Point {
            t: 4,
            span_s: 1.0,
            accepted: 10,
            tempfail: 0,
            permfail: 0,
            conn_errors: 0,
            p50_us: Some(1200),
            p99_us: Some(35_000),
        };
        let l = line(5.0, 250.0, &s, Some(&p));
        assert_eq!(
            l,
            "[    5s]     250 msg/s  accepted 1000  errors 4xx 2 5xx 3 conn 4  DATA-250 p50 1.2ms p99 35ms"
        );
        let l = line(1.0, 0.0, &Snapshot::default(), None);
        assert!(l.contains("errors 4xx 0 5xx 0 conn 0"));
        assert!(l.ends_with("p50 - p99 -"));
    }
}
