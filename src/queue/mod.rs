//! The durable per-shard mail queue: owns the public queue types (`QueueId`,
//! `Envelope`, `RcptState`, `QueueError`) and wires together the submodules.
//!
//! Layout of the module:
//! - [`record`]: the pure on-disk codec (record and segment headers, message and
//!   progress payloads), usable on plain byte slices (benches, fuzzing).
//! - [`segment`]: one preallocated, append-only segment file (appends staged in
//!   memory and written with `pwrite` at group commit; a read-only mapping for
//!   reads) and the crash-tolerant scanner that walks its records.
//! - [`store`]: [`QueueStore`], one per shard: recovery, appends, the pending
//!   index, housekeeping/compaction, statistics.
//! - [`commit`]: [`ShardQueue`], the group-commit front end shared by all
//!   sessions of a shard on a glommio executor.
//! - [`list`]: [`list_queue`], a read-only scan of a queue directory.
//!
//! Every shard owns `<queue_directory>/shard-<N>/` exclusively (enforced with
//! an advisory `flock` on `shard-<N>/lock`).

pub mod commit;
pub mod list;
pub mod record;
pub mod segment;
pub mod store;
#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

pub use commit::ShardQueue;

/// A queued message's stored bytes, shareable across shards: the segment mapping stays alive while any body
/// handle exists, even if the segment file is deleted meanwhile.
#[derive(Clone)]
pub struct MessageBody {
    pub map: std::sync::Arc<memmap2::Mmap>,
    pub received: std::ops::Range<usize>,
    pub data: std::ops::Range<usize>,
}

impl MessageBody {
    pub fn received(&self) -> &[u8] {
        &self.map[self.received.clone()]
    }
    pub fn data(&self) -> &[u8] {
        &self.map[self.data.clone()]
    }
    /// Bytes as sent: the Received header we add and the stored message.
    pub fn size(&self) -> u64 {
        (self.received.len() + self.data.len()) as u64
    }
}

impl std::fmt::Debug for MessageBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MessageBody({} + {} bytes)",
            self.received.len(),
            self.data.len()
        )
    }
}
pub use list::{list_queue, read_messages, QueuedMessage, QueuedRecipient};
pub use store::{
    CommitTicket, HousekeepingPolicy, HousekeepingReport, PendingMessage, QueueStats, QueueStore,
    RecoveryReport,
};

/// The directory of one shard: `<queue_directory>/shard-<N>`.
pub fn shard_dir(queue_directory: &std::path::Path, shard: u8) -> std::path::PathBuf {
    queue_directory.join(format!("shard-{shard}"))
}

/// A queue id, unique per shard and across restarts.
///
/// Layout: high 32 bits an epoch in unix seconds, next 8 bits the shard, low
/// 24 bits a counter. Displayed as 16 uppercase hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(pub u64);

impl QueueId {
    /// Number of counter values per epoch.
    pub const COUNTER_LIMIT: u32 = 1 << 24;

    /// Builds an id from its parts (`counter` is masked to 24 bits).
    pub fn from_parts(epoch: u32, shard: u8, counter: u32) -> QueueId {
        QueueId(((epoch as u64) << 32) | ((shard as u64) << 24) | (counter as u64 & 0x00FF_FFFF))
    }

    /// The epoch (unix seconds at allocation, or later after overflow/restart).
    pub fn epoch(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// The shard that allocated this id.
    pub fn shard(self) -> u8 {
        (self.0 >> 24) as u8
    }

    /// The per-epoch counter.
    pub fn counter(self) -> u32 {
        (self.0 & 0x00FF_FFFF) as u32
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", self.0)
    }
}

impl serde::Serialize for QueueId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for QueueId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Error parsing a [`QueueId`] from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid queue id {0:?}: expected 16 hex digits")]
pub struct ParseQueueIdError(pub String);

impl FromStr for QueueId {
    type Err = ParseQueueIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ParseQueueIdError(s.to_string()));
        }
        u64::from_str_radix(s, 16)
            .map(QueueId)
            .map_err(|_| ParseQueueIdError(s.to_string()))
    }
}

/// The SMTP envelope and session facts of a queued message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Envelope {
    pub sender: String,
    pub recipients: Vec<String>,
    pub arrival_unix_ms: u64,
    pub client_addr: String,
    pub client_helo: String,
    pub tls: String,
    pub auth_user: String,
    pub smtputf8: bool,
    pub body_8bitmime: bool,
    /// DSN (RFC 3461): RET, ENVID, per recipient NOTIFY and ORCPT, and whether the delay warning was sent.
    /// Empty for messages without DSN parameters (and for every record written before it existed).
    pub dsn: crate::smtp::dsn::EnvelopeDsn,
    /// The egress pool chosen at acceptance (`crate::egress`), when the message has one of its own (None: the
    /// default pool, if any, applies at delivery). Stored in the record's pool extension.
    pub egress_pool: Option<String>,
}

/// Delivery state of one recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RcptState {
    /// Not attempted yet.
    Pending,
    /// A temporary failure; retry at `next_attempt_unix_s`.
    Deferred {
        next_attempt_unix_s: u64,
        attempts: u32,
    },
    /// Accepted by the next hop (final).
    Delivered,
    /// Permanently failed (final).
    Bounced,
}

impl RcptState {
    /// True for Delivered and Bounced: no further work for this recipient.
    pub fn is_final(self) -> bool {
        matches!(self, RcptState::Delivered | RcptState::Bounced)
    }

    /// Short lowercase name ("pending", "deferred", "delivered", "bounced").
    pub fn name(self) -> &'static str {
        match self {
            RcptState::Pending => "pending",
            RcptState::Deferred { .. } => "deferred",
            RcptState::Delivered => "delivered",
            RcptState::Bounced => "bounced",
        }
    }
}

/// Errors of the queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("queue I/O error on {path}: {source}")]
    IoAt {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no space left for the queue")]
    NoSpace,
    #[error("corrupt queue data in {path} at offset {offset}: {reason}")]
    Corrupt {
        path: std::path::PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("record of {size} bytes does not fit in a segment of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("queue sync failed: {0}")]
    SyncFailed(String),
    #[error("unknown queue id {0}")]
    UnknownId(QueueId),
    #[error("queue id {id} has no recipient index {index}")]
    BadRecipientIndex { id: QueueId, index: u32 },
    #[error("queue directory {0} is locked by another process (another shardmta on the same spool?): stop it, or give this one its own queue_directory")]
    Locked(std::path::PathBuf),
    #[error("{path}: {reason}")]
    Unsafe {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("invalid queue configuration: {0}")]
    Config(String),
    #[error("queue is shut down")]
    Shutdown,
}

impl QueueError {
    /// Wraps an I/O error with the path it happened on (ENOSPC becomes NoSpace).
    pub(crate) fn io_at(path: &std::path::Path, source: std::io::Error) -> QueueError {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return QueueError::NoSpace;
        }
        QueueError::IoAt {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Current time in unix milliseconds (0 if the clock is before 1970).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod id_tests {
    use super::*;

    #[test]
    fn queue_id_display_parse() {
        let id = QueueId::from_parts(0x6543_2100, 7, 0x00AB_CDEF);
        let s = id.to_string();
        assert_eq!(s.len(), 16);
        assert_eq!(s, "6543210007ABCDEF");
        assert_eq!(s.parse::<QueueId>().unwrap(), id);
        assert_eq!("6543210007abcdef".parse::<QueueId>().unwrap(), id);
        assert_eq!(id.epoch(), 0x6543_2100);
        assert_eq!(id.shard(), 7);
        assert_eq!(id.counter(), 0x00AB_CDEF);
        assert!("".parse::<QueueId>().is_err());
        assert!("6543210007ABCDEG".parse::<QueueId>().is_err());
        assert!("+543210007ABCDEF".parse::<QueueId>().is_err());
        assert!("6543210007ABCDEF0".parse::<QueueId>().is_err());
    }
}
