//! The delivery log: one JSON line per recipient per delivery attempt, appended to one file by every shard.
//! Lines are buffered per shard and written with one `write` (O_APPEND) per flush on a helper thread, so the
//! reactor never blocks on the file and lines from different shards never interleave.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

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
    pub fn open(path: &std::path::Path) -> DeliveryLog {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
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
