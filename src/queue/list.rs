//! [`list_queue`]: a read-only scan of a whole queue directory (every
//! `shard-*/`), usable with the server stopped or running. It reads segment
//! files with plain `read` (no mapping, no lock, never writes, never through a
//! symlink), applies the same recovery rules as [`super::QueueStore::open_shard`]
//! in memory, and returns the pending messages.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::record::{self, Record};
use super::segment;
use super::store::Index;
use super::{QueueError, QueueId, RcptState};

/// One recipient of a queued message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QueuedRecipient {
    pub address: String,
    /// "pending", "deferred", "delivered" or "bounced".
    pub state: &'static str,
    /// For deferred recipients: next attempt (unix seconds) and attempts so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_unix_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
}

/// One queued message as reported by [`list_queue`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QueuedMessage {
    /// Queue id (16 hex digits).
    pub id: String,
    pub shard: u8,
    pub arrival_unix_ms: u64,
    /// Size of the message data in bytes.
    pub size: u64,
    pub sender: String,
    pub recipients: Vec<QueuedRecipient>,
}

/// Lists every pending message under `queue_directory`, sorted by arrival
/// time then id. Never modifies anything.
pub fn list_queue(queue_directory: &Path) -> Result<Vec<QueuedMessage>, QueueError> {
    let mut out = Vec::new();
    for (shard, dir) in shard_dirs(queue_directory)? {
        let index = scan_shard(&dir)?;
        for m in index.msgs.into_values() {
            let recipients = m
                .envelope
                .recipients
                .iter()
                .zip(m.states.iter())
                .map(|(a, s)| {
                    let (next, attempts) = match *s {
                        RcptState::Deferred {
                            next_attempt_unix_s,
                            attempts,
                        } => (Some(next_attempt_unix_s), Some(attempts)),
                        _ => (None, None),
                    };
                    QueuedRecipient {
                        address: a.clone(),
                        state: s.name(),
                        next_attempt_unix_s: next,
                        attempts,
                    }
                })
                .collect();
            out.push(QueuedMessage {
                id: m.id.to_string(),
                shard,
                arrival_unix_ms: m.envelope.arrival_unix_ms,
                size: m.size,
                sender: m.envelope.sender.clone(),
                recipients,
            });
        }
    }
    out.sort_by(|a, b| (a.arrival_unix_ms, &a.id).cmp(&(b.arrival_unix_ms, &b.id)));
    Ok(out)
}

/// The `shard-N/` directories under `queue_directory`, in shard order.
fn shard_dirs(queue_directory: &Path) -> Result<Vec<(u8, PathBuf)>, QueueError> {
    let mut shard_dirs = Vec::new();
    let rd =
        std::fs::read_dir(queue_directory).map_err(|e| QueueError::io_at(queue_directory, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| QueueError::io_at(queue_directory, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(n) = name.strip_prefix("shard-") else {
            continue;
        };
        let Ok(shard) = n.parse::<u8>() else { continue };
        // A real directory only: a symlink named shard-N is not the server's (it refuses one too).
        if std::fs::symlink_metadata(entry.path()).is_ok_and(|m| m.is_dir()) {
            shard_dirs.push((shard, entry.path()));
        }
    }
    shard_dirs.sort();
    Ok(shard_dirs)
}

/// Rebuilds one shard's pending index from its segments (read-only, one segment in memory at a time).
fn scan_shard(dir: &Path) -> Result<Index, QueueError> {
    let mut seqs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| QueueError::io_at(dir, e))? {
        let entry = entry.map_err(|e| QueueError::io_at(dir, e))?;
        if let Some(seq) = entry
            .file_name()
            .to_str()
            .and_then(segment::parse_file_name)
        {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    let mut index = Index::default();
    for seq in seqs {
        let path = dir.join(segment::file_name(seq));
        let bytes = match crate::spool::read_regular_file(&path) {
            Ok(b) => b,
            // Deleted by a running server between listing and reading.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            // Not a segment of ours (a symlink, a FIFO, ...): the server sets it aside at start; skip it.
            Err(e)
                if e.raw_os_error() == Some(libc::ELOOP)
                    || e.kind() == std::io::ErrorKind::InvalidData =>
            {
                continue
            }
            Err(e) => return Err(QueueError::io_at(&path, e)),
        };
        segment::scan(&bytes, |off, len, rec| index.apply(seq, off, len, &rec));
    }
    Ok(index)
}

/// A queue ID and its stored bytes (Received header + data), `None` when it is not pending.
pub type StoredMessage = (QueueId, Option<Vec<u8>>);

/// The stored bytes (Received header followed by the data) of each pending message in `ids`, read-only, in the
/// order asked; an id that is not pending is `None`. Like `postcat -q`.
pub fn read_messages(
    queue_directory: &Path,
    ids: &[QueueId],
) -> Result<Vec<StoredMessage>, QueueError> {
    let mut found: std::collections::HashMap<QueueId, Vec<u8>> = std::collections::HashMap::new();
    for (_, dir) in shard_dirs(queue_directory)? {
        let index = scan_shard(&dir)?;
        // Group the wanted records by segment so each segment is read once.
        let mut by_seg: std::collections::BTreeMap<u64, Vec<(QueueId, u64, u64)>> =
            std::collections::BTreeMap::new();
        for id in ids {
            if let Some(m) = index.msgs.get(id) {
                by_seg
                    .entry(m.segment_seq)
                    .or_default()
                    .push((*id, m.record_offset, m.record_len));
            }
        }
        for (seq, wanted) in by_seg {
            let path = dir.join(segment::file_name(seq));
            let bytes = match crate::spool::read_regular_file(&path) {
                Ok(b) => b,
                // Deleted by a running server meanwhile (the message was done).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(QueueError::io_at(&path, e)),
            };
            let Ok(fmt) = record::decode_segment_header(&bytes).map(|h| h.format()) else {
                continue;
            };
            for (id, off, len) in wanted {
                let rec = usize::try_from(off)
                    .ok()
                    .zip(usize::try_from(off + len).ok())
                    .and_then(|(a, b)| bytes.get(a..b));
                if let Some(Ok((Record::Message(m), _))) =
                    rec.map(|r| record::decode_record(r, &fmt, off))
                {
                    let mut v = Vec::with_capacity(m.received.len() + m.data.len());
                    v.extend_from_slice(m.received);
                    v.extend_from_slice(m.data);
                    found.insert(id, v);
                }
            }
        }
    }
    Ok(ids.iter().map(|id| (*id, found.remove(id))).collect())
}
