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
    /// The diagnostic of its last progress record that had one: for a deferred recipient, why its last attempt
    /// failed (not kept when the message was copied forward by compaction).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_reason: Option<String>,
    /// DSN `NOTIFY=` (`NEVER`, or e.g. `SUCCESS,FAILURE`) and `ORCPT=` (`rfc822;address`), when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notify: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
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
    /// Held by the operator (`shardmta queue hold`): not delivered until released.
    pub held: bool,
    /// Where it came from: the client's address and HELO name, its TLS and AUTH user (empty when none).
    pub client_addr: String,
    pub client_helo: String,
    pub tls: String,
    pub auth_user: String,
    pub recipients: Vec<QueuedRecipient>,
    /// DSN `RET=` (`FULL`, `HDRS`) and `ENVID=` (decoded), when given; whether the delay warning was sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dsn_ret: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dsn_envid: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub delay_warned: bool,
}

impl QueuedMessage {
    /// Deferred: not held, and at least one open recipient has been tried and deferred.
    pub fn is_deferred(&self) -> bool {
        !self.held && self.recipients.iter().any(|r| r.state == "deferred")
    }
}

/// Lists every pending message under `queue_directory`, sorted by arrival
/// time then id. Never modifies anything.
pub fn list_queue(queue_directory: &Path) -> Result<Vec<QueuedMessage>, QueueError> {
    let mut out = Vec::new();
    for (shard, dir) in shard_dirs(queue_directory)? {
        let mut index = scan_shard(&dir)?;
        let mut reasons = index.diagnostics.take().unwrap_or_default();
        for m in index.msgs.into_values() {
            let recipients = m
                .envelope
                .recipients
                .iter()
                .zip(m.states.iter())
                .enumerate()
                .map(|(i, (a, s))| {
                    let (next, attempts) = match *s {
                        RcptState::Deferred {
                            next_attempt_unix_s,
                            attempts,
                        } => (Some(next_attempt_unix_s), Some(attempts)),
                        _ => (None, None),
                    };
                    let dsn = m.envelope.dsn.rcpt_ref(i);
                    QueuedRecipient {
                        address: a.clone(),
                        state: s.name(),
                        next_attempt_unix_s: next,
                        attempts,
                        notify: dsn.notify.map(|n| n.to_string()),
                        orcpt: dsn
                            .orcpt
                            .as_ref()
                            .map(|o| format!("{};{}", o.addr_type, o.address)),
                        last_reason: if s.is_final() {
                            None
                        } else {
                            reasons.get_mut(&m.id).and_then(|r| r.remove(&(i as u32)))
                        },
                    }
                })
                .collect();
            out.push(QueuedMessage {
                id: m.id.to_string(),
                shard,
                arrival_unix_ms: m.envelope.arrival_unix_ms,
                size: m.size,
                sender: m.envelope.sender.clone(),
                held: m.held,
                client_addr: m.envelope.client_addr.clone(),
                client_helo: m.envelope.client_helo.clone(),
                tls: m.envelope.tls.clone(),
                auth_user: m.envelope.auth_user.clone(),
                recipients,
                dsn_ret: m.envelope.dsn.ret.map(|r| r.as_str()),
                dsn_envid: m.envelope.dsn.envid.clone(),
                delay_warned: m.envelope.dsn.delay_warned,
            });
        }
    }
    out.sort_by(|a, b| (a.arrival_unix_ms, &a.id).cmp(&(b.arrival_unix_ms, &b.id)));
    Ok(out)
}

/// The shard numbers that have a directory under `queue_directory`, in order.
pub fn shard_numbers(queue_directory: &Path) -> Result<Vec<u8>, QueueError> {
    Ok(shard_dirs(queue_directory)?
        .into_iter()
        .map(|(n, _)| n)
        .collect())
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
    let mut index = Index {
        diagnostics: Some(Default::default()),
        ..Index::default()
    };
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

/// An age as people write it: `45s`, `12m`, `2h13m`, `3d4h`.
pub fn human_age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// The upper bounds (minutes) of the age buckets of [`summary`], as Postfix's qshape: each twice the last.
pub const SUMMARY_BUCKETS_MIN: [u64; 9] = [5, 10, 20, 40, 80, 160, 320, 640, 1280];

/// One line of [`summary`]: a recipient domain, its open recipients in all, and per age bucket (the last
/// counts everything older than 1280 minutes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SummaryLine {
    pub domain: String,
    pub total: u64,
    pub buckets: [u64; SUMMARY_BUCKETS_MIN.len() + 1],
}

/// Open recipients per recipient domain and message age, like `qshape`: the first line is `TOTAL`, then the
/// domains with the most recipients first (at most `max_domains`; held messages are counted too).
pub fn summary(msgs: &[QueuedMessage], now_unix_ms: u64, max_domains: usize) -> Vec<SummaryLine> {
    let mut by: std::collections::HashMap<String, SummaryLine> = std::collections::HashMap::new();
    let empty = |d: &str| SummaryLine {
        domain: d.to_string(),
        total: 0,
        buckets: [0; SUMMARY_BUCKETS_MIN.len() + 1],
    };
    let mut total = empty("TOTAL");
    for m in msgs {
        let age_min = now_unix_ms.saturating_sub(m.arrival_unix_ms) / 60_000;
        let b = SUMMARY_BUCKETS_MIN
            .iter()
            .position(|&lim| age_min < lim)
            .unwrap_or(SUMMARY_BUCKETS_MIN.len());
        for r in m
            .recipients
            .iter()
            .filter(|r| r.state == "pending" || r.state == "deferred")
        {
            let d = r
                .address
                .rsplit_once('@')
                .map_or("", |x| x.1)
                .to_ascii_lowercase();
            let line = by.entry(d.clone()).or_insert_with(|| empty(&d));
            for l in [line, &mut total] {
                l.total += 1;
                l.buckets[b] += 1;
            }
        }
    }
    let mut lines: Vec<SummaryLine> = by.into_values().collect();
    lines.sort_by(|a, b| b.total.cmp(&a.total).then_with(|| a.domain.cmp(&b.domain)));
    lines.truncate(max_domains);
    lines.insert(0, total);
    lines
}

#[cfg(test)]
mod report_tests {
    use super::*;

    #[test]
    fn ages_read_like_people_write_them() {
        assert_eq!(human_age(0), "0s");
        assert_eq!(human_age(59), "59s");
        assert_eq!(human_age(60), "1m");
        assert_eq!(human_age(3599), "59m");
        assert_eq!(human_age(2 * 3600 + 13 * 60 + 5), "2h13m");
        assert_eq!(human_age(86_400 * 3 + 4 * 3600 + 59), "3d4h");
    }

    fn msg(age_min: u64, rcpts: &[(&str, &'static str)]) -> QueuedMessage {
        QueuedMessage {
            id: "0".into(),
            shard: 0,
            arrival_unix_ms: 1_000_000_000 - age_min * 60_000,
            size: 1,
            sender: String::new(),
            held: false,
            client_addr: String::new(),
            client_helo: String::new(),
            tls: String::new(),
            auth_user: String::new(),
            recipients: rcpts
                .iter()
                .map(|(a, s)| QueuedRecipient {
                    address: a.to_string(),
                    state: s,
                    next_attempt_unix_s: None,
                    attempts: None,
                    last_reason: None,
                    notify: None,
                    orcpt: None,
                })
                .collect(),
            dsn_ret: None,
            dsn_envid: None,
            delay_warned: false,
        }
    }

    #[test]
    fn summary_counts_open_recipients_by_domain_and_age() {
        let msgs = vec![
            msg(
                1,
                &[("a@B.example", "pending"), ("b@c.example", "delivered")],
            ),
            msg(7, &[("a@b.example", "deferred")]),
            msg(
                5000,
                &[("x@c.example", "deferred"), ("y@b.example", "deferred")],
            ),
        ];
        let s = summary(&msgs, 1_000_000_000, 10);
        assert_eq!(s[0].domain, "TOTAL");
        assert_eq!(s[0].total, 4);
        assert_eq!(s[0].buckets[0], 1);
        assert_eq!(s[0].buckets[1], 1);
        assert_eq!(s[0].buckets[9], 2);
        assert_eq!(s[1].domain, "b.example");
        assert_eq!(s[1].total, 3);
        assert_eq!(s[2].domain, "c.example");
        assert_eq!(s[2].total, 1);
        assert_eq!(summary(&msgs, 1_000_000_000, 1).len(), 2);
    }
}
