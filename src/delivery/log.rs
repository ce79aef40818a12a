//! The delivery log: one JSON line per recipient per delivery attempt, appended to one file by every shard.
//! Lines are buffered per shard and written with one `write` (O_APPEND) per flush on a helper thread, so the
//! reactor never blocks on the file and lines from different shards never interleave.

use std::cell::RefCell;
use std::fs::File;
use std::io::Write;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{Job, RcptResult};

/// Flush interval; also flushed when the buffer passes `FLUSH_BYTES`.
const FLUSH_EVERY: Duration = Duration::from_millis(200);
const FLUSH_BYTES: usize = 256 * 1024;
/// Past this much unwritten log (a stuck disk), new lines are dropped and counted.
const BUFFER_BYTES_MAX: usize = 16 << 20;

pub struct DeliveryLog {
    file: Option<Arc<File>>,
    buf: RefCell<Vec<u8>>,
    dropped: std::cell::Cell<u64>,
}

/// One attempt's outcome for one recipient.
#[derive(serde::Serialize)]
pub struct LogLine<'a> {
    pub ts: f64,
    pub queue_id: String,
    pub rcpt: &'a str,
    pub result: &'static str,
    pub destination: &'a str,
    pub host: Option<&'a str>,
    pub ip: Option<String>,
    pub tls: Option<&'a str>,
    pub reply: &'a str,
    pub delay_s: f64,
    pub attempt: u32,
}

impl DeliveryLog {
    /// Opens (creating, 0600) the log at `path` for appending, never through a symlink: its directory must
    /// belong to the server's user and not be writable by others (see [`crate::spool`]).
    pub fn open(path: &std::path::Path) -> DeliveryLog {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => std::path::Path::new("."),
        };
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("delivery.log");
        let file = crate::spool::Dir::open_root(parent)
            .and_then(|d| d.open_append(name))
            .map_err(|e| eprintln!("shardmta: delivery log {}: {e}", path.display()))
            .ok();
        DeliveryLog {
            file: file.map(Arc::new),
            buf: RefCell::new(Vec::with_capacity(64 * 1024)),
            dropped: Default::default(),
        }
    }

    pub fn record(&self, line: &LogLine<'_>) {
        let mut buf = self.buf.borrow_mut();
        if self.file.is_none() || buf.len() > BUFFER_BYTES_MAX {
            self.dropped.set(self.dropped.get() + 1);
            return;
        }
        if serde_json::to_writer(&mut *buf, line).is_ok() {
            buf.push(b'\n');
        }
    }

    /// One line per result of `job` (`destination` is the next hop's key, or "local").
    pub fn record_job(
        &self,
        job: &Job,
        results: &[(u32, RcptResult)],
        destination: &str,
        host: Option<&str>,
        ip: Option<IpAddr>,
        tls: Option<&str>,
    ) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        for (idx, r) in results {
            let Some(rc) = job.rcpts.iter().find(|x| x.index == *idx) else {
                continue;
            };
            self.record(&LogLine {
                ts: now,
                queue_id: job.id.to_string(),
                rcpt: &rc.address,
                result: match r {
                    RcptResult::Delivered { .. } => "delivered",
                    RcptResult::Deferred { .. } => "deferred",
                    RcptResult::Bounced { .. } => "bounced",
                    RcptResult::Postponed { .. } => "postponed",
                },
                destination,
                host,
                ip: ip.map(|i| i.to_string()),
                tls,
                reply: r.reply(),
                delay_s: (now - job.arrival_unix_ms as f64 / 1000.0).max(0.0),
                attempt: rc.attempts + 1,
            });
        }
    }

    /// The flush task: runs until the executor ends.
    pub async fn run(self: Rc<Self>) {
        loop {
            glommio::timer::sleep(FLUSH_EVERY).await;
            self.flush().await;
        }
    }

    pub async fn flush(&self) {
        let Some(file) = self.file.clone() else {
            return;
        };
        let cap = self.buf.borrow().capacity().min(FLUSH_BYTES);
        let data = std::mem::replace(&mut *self.buf.borrow_mut(), Vec::with_capacity(cap));
        if data.is_empty() {
            return;
        }
        let _ = glommio::executor()
            .spawn_blocking(move || (&*file).write_all(&data))
            .await;
    }
}
