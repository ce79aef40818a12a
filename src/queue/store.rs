//! [`QueueStore`]: one shard's durable queue. Owns the shard directory's
//! segments, recovery at open, appends of message/progress records (staged in
//! memory by the active [`Segment`], written to the file by the group commit;
//! reads come from the mapping), the in-memory index of pending messages,
//! housekeeping (segment deletion and compaction) and the statistics.
//!
//! The store itself never waits for durability: appends return a
//! [`CommitTicket`], and [`super::ShardQueue`] batches the syncs (group
//! commit). The store only learns which position is durable (used to decide
//! when a segment may be deleted).
//!
//! # Segment deletion rule
//! Progress records for a message always follow its current copy in log
//! order, so they live in the same or a later segment. Let `min_live` be the
//! lowest segment sequence holding the *current copy* of any pending message
//! (or the active segment if nothing is pending). Every segment below
//! `min_live` holds only: records of finished messages, superseded copies, and
//! progress records that apply to those. Deleting a *prefix* of such segments
//! (oldest first, each unlink made durable by a directory fsync before the
//! next) can therefore never make a pending message or a recipient state
//! disappear or revert, and never resurrects a finished message (its message
//! record is at or below its final progress records, so it is deleted first).
//! A segment is only deleted once everything appended up to the moment the
//! deletion was planned is durable (the records that made it unneeded, e.g.
//! compaction copies or final progress, must survive a crash). The active
//! segment is never deleted. After a failed sync, deletions stop until restart.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use super::record::{
    self, encode_control, encode_epoch, encode_message, encode_progress, message_record_len,
    progress_record_len, ControlOp, Record, SegmentHeader, CONTROL_RECORD_LEN, EPOCH_RECORD_LEN,
    SEGMENT_HEADER_LEN,
};
use super::segment::{self, Segment};
use super::{now_unix_ms, Envelope, QueueError, QueueId, RcptState};
use crate::spool::Dir;

/// A position in the shard's log: (segment sequence, byte offset). An append
/// returns the position just past its record; it is durable once a completed
/// sync covers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct CommitTicket {
    pub seq: u64,
    pub offset: u64,
}

/// A message still queued (at least one recipient neither delivered nor bounced).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingMessage {
    pub id: QueueId,
    pub envelope: Envelope,
    /// State of each recipient, parallel to `envelope.recipients`.
    pub states: Vec<RcptState>,
    /// Size of the message data in bytes.
    pub size: u64,
    /// Segment holding the current copy of the message record.
    pub segment_seq: u64,
    /// Offset and total length of that record.
    pub record_offset: u64,
    pub record_len: u64,
    /// Held by the operator (a control record): never delivered until released.
    pub held: bool,
    received_at: u64,
    received_len: u64,
    data_at: u64,
}

impl PendingMessage {
    /// True when every recipient is Delivered or Bounced.
    pub fn is_done(&self) -> bool {
        self.states.iter().all(|s| s.is_final())
    }

    /// Recipients that still need work: (index, address, state).
    pub fn open_recipients(&self) -> impl Iterator<Item = (usize, &str, RcptState)> {
        self.envelope
            .recipients
            .iter()
            .zip(self.states.iter())
            .enumerate()
            .filter(|(_, (_, s))| !s.is_final())
            .map(|(i, (a, s))| (i, a.as_str(), *s))
    }
}

/// What [`QueueStore::open_shard`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments_scanned: u64,
    pub records: u64,
    /// Segments whose last bad region reached past their last valid record (a write torn by a crash).
    pub torn_tails: u64,
    /// Bad regions that valid records followed (resynchronised at a record this server signed there).
    pub corrupt_records: u64,
    pub bad_segment_headers: u64,
    /// Formats-1 segments read (written by an older version; read only).
    pub old_format_segments: u64,
    pub pending_messages: u64,
    pub pending_recipients: u64,
    pub segments_deleted: u64,
    pub temp_files_removed: u64,
    /// Unreadable byte ranges copied to `<queue_directory>/corrupt/` (the segment itself is left as it was).
    pub regions_kept: u64,
    /// Files that could not be used as segments (bad header, too small, a symlink, not ours) moved, untouched,
    /// to `<queue_directory>/corrupt/`.
    pub files_set_aside: u64,
    /// One line per finding above, for the log.
    pub notes: Vec<String>,
}

/// What one [`QueueStore::housekeeping`] call did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HousekeepingReport {
    pub segments_deleted: u64,
    pub messages_copied: u64,
    pub bytes_copied: u64,
    /// Segments whose deletion waits for the next sync.
    pub deletions_waiting_for_sync: u64,
}

/// Compaction policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HousekeepingPolicy {
    /// Compact the oldest pinning segment only if its live bytes are at most
    /// `segment size / live_fraction_divisor`.
    pub live_fraction_divisor: u64,
    /// Only copy messages none of whose open recipients is due within this
    /// many seconds (Pending counts as due now).
    pub min_deferral_s: u64,
    /// Upper bound of bytes copied per housekeeping call.
    pub max_copy_bytes_per_run: u64,
}

impl Default for HousekeepingPolicy {
    fn default() -> Self {
        HousekeepingPolicy {
            live_fraction_divisor: 8,
            min_deferral_s: 60,
            max_copy_bytes_per_run: crate::limits::QUEUE_COMPACTION_COPY_BYTES_PER_RUN_DEFAULT,
        }
    }
}

/// Counters of the store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub records_appended: u64,
    pub bytes_appended: u64,
    pub syncs: u64,
    pub synced_bytes: u64,
    pub sync_failures: u64,
    pub segments_created: u64,
    /// Of those, created on the appending thread (blocking): 0 on a shard whose appends go through
    /// [`super::ShardQueue::append_message`] / [`super::ShardQueue::append_progress`].
    pub segments_created_inline: u64,
    pub segments_deleted: u64,
    pub messages_copied: u64,
}

/// A file touched since the last sync batch was taken.
#[derive(Clone, Debug)]
pub(crate) struct DirtyFile {
    pub seq: u64,
    pub file: Arc<File>,
    pub bytes: u64,
    /// Staged records to write at this offset before the fdatasync (filled by `take_sync_batch`).
    pub write: Option<(u64, Arc<Vec<u8>>)>,
}

/// Everything that must be synced to make `target` durable.
#[derive(Debug)]
pub(crate) struct SyncBatch {
    pub target: CommitTicket,
    pub files: Vec<DirtyFile>,
}

/// The pending-message index rebuilt from records in log order; shared by
/// recovery and `list_queue`.
#[derive(Default)]
pub(crate) struct Index {
    pub msgs: HashMap<QueueId, PendingMessage>,
    pub max_epoch: u32,
    /// Only for listings (`queue list`), never in a running shard's index: the diagnostic of each
    /// recipient's last progress record that has one (the reason of its last deferral).
    pub diagnostics: Option<HashMap<QueueId, HashMap<u32, String>>>,
}

impl Index {
    /// Applies one record found at (`seq`, `offset`) with total length `len`.
    pub fn apply(&mut self, seq: u64, offset: u64, len: u64, rec: &Record<'_>) {
        match rec {
            Record::Message(m) => {
                self.max_epoch = self.max_epoch.max(m.id.epoch());
                let mut envelope = m.envelope();
                // Like the hold: a copy keeps the delay warning of the message it supersedes.
                envelope.dsn.delay_warned |= self
                    .msgs
                    .get(&m.id)
                    .is_some_and(|p| p.envelope.dsn.delay_warned);
                let pm = PendingMessage {
                    id: m.id,
                    envelope,
                    states: m.recipients.iter().map(|(_, s)| *s).collect(),
                    size: m.data.len() as u64,
                    segment_seq: seq,
                    record_offset: offset,
                    record_len: len,
                    // A copy (compaction) keeps the hold of the message it supersedes: the hold record written
                    // after the copy may be lost in a crash while the first one is still on the disk.
                    held: self.msgs.get(&m.id).is_some_and(|p| p.held),
                    received_at: offset + m.received_at as u64,
                    received_len: m.received.len() as u64,
                    data_at: offset + m.data_at as u64,
                };
                // A later copy supersedes the earlier one.
                if pm.is_done() {
                    self.msgs.remove(&m.id);
                } else {
                    self.msgs.insert(m.id, pm);
                }
            }
            Record::Progress(p) => {
                self.max_epoch = self.max_epoch.max(p.id.epoch());
                let done = match self.msgs.get_mut(&p.id) {
                    Some(pm) => match pm.states.get_mut(p.rcpt_index as usize) {
                        Some(s) => {
                            *s = p.state;
                            pm.is_done()
                        }
                        None => false,
                    },
                    None => false,
                };
                if done {
                    self.msgs.remove(&p.id);
                    if let Some(d) = &mut self.diagnostics {
                        d.remove(&p.id);
                    }
                } else if let Some(d) = &mut self.diagnostics {
                    if !p.diagnostic.is_empty() && self.msgs.contains_key(&p.id) {
                        d.entry(p.id)
                            .or_default()
                            .insert(p.rcpt_index, p.diagnostic.to_string());
                    }
                }
            }
            Record::Control(c) => {
                self.max_epoch = self.max_epoch.max(c.id.epoch());
                match c.op {
                    ControlOp::Hold | ControlOp::Release => {
                        if let Some(pm) = self.msgs.get_mut(&c.id) {
                            pm.held = c.op == ControlOp::Hold;
                        }
                    }
                    ControlOp::Delete => {
                        self.msgs.remove(&c.id);
                        if let Some(d) = &mut self.diagnostics {
                            d.remove(&c.id);
                        }
                    }
                    ControlOp::DelayWarned => {
                        if let Some(pm) = self.msgs.get_mut(&c.id) {
                            pm.envelope.dsn.delay_warned = true;
                        }
                    }
                }
            }
            Record::Epoch { epoch } => self.max_epoch = self.max_epoch.max(*epoch),
            Record::Unknown { .. } => {}
        }
    }

    /// Lowest segment holding the current copy of a pending message.
    pub fn min_live_seq(&self) -> Option<u64> {
        self.msgs.values().map(|m| m.segment_seq).min()
    }
}

/// One shard's queue store. Single-threaded (`!Sync` use), no internal locking.
pub struct QueueStore {
    /// The shard directory, held open: every file is opened relative to it, never through a symlink.
    dir: Dir,
    shard: u8,
    segment_size: u64,
    _lock: File,
    /// Sealed segments by sequence (all older than `active`).
    sealed: BTreeMap<u64, Segment>,
    active: Segment,
    /// Pre-created next segment (sequence `active.seq + 1`), if any.
    spare: Option<Segment>,
    /// Sequence of a spare being created on another thread.
    spare_pending: Option<u64>,
    index: Index,
    epoch: u32,
    counter: u32,
    /// Files touched since the last sync batch; bounded by the number of
    /// segments rolled between two syncs.
    dirty: Vec<DirtyFile>,
    durable: CommitTicket,
    /// Planned deletions: (segment seq, position that must be durable first).
    /// Bounded by the number of segments.
    planned_deletions: BTreeMap<u64, CommitTicket>,
    deletions_blocked: bool,
    policy: HousekeepingPolicy,
    stats: QueueStats,
}

fn now_unix_s() -> u64 {
    now_unix_ms() / 1000
}

impl QueueStore {
    /// Opens (creating if needed) the queue of `shard` under `queue_directory` (its directory
    /// `shard-<N>/`) and recovers it; see the module documentation for the rules. Blocking: call at
    /// startup, not from a busy reactor.
    ///
    /// Recovery never destroys bytes: an unreadable range inside a segment is copied to
    /// `<queue_directory>/corrupt/` and the segment is sealed as it is (no append ever lands after damage);
    /// a file that cannot be a segment of ours (bad header, too small, a symlink, a hard link, another
    /// owner) is moved there untouched. Each finding is a line in the report's `notes`.
    pub fn open_shard(
        queue_directory: &Path,
        shard: u8,
        segment_size: u64,
    ) -> Result<(QueueStore, RecoveryReport), QueueError> {
        let min = (SEGMENT_HEADER_LEN as u64) * 4;
        if segment_size < min || !segment_size.is_multiple_of(8) || segment_size > u32::MAX as u64 {
            return Err(QueueError::Config(format!(
                "segment size {segment_size} must be a multiple of 8 in {min}..=4294967295"
            )));
        }
        let root = Dir::open_root(queue_directory)?;
        let dir = root.subdir(&format!("shard-{shard}"))?;
        let lock = lock_dir(&dir)?;
        let mut report = RecoveryReport::default();
        let mut corrupt = CorruptArea::new(&root, shard);

        // Collect segment files (bounded by the directory's size).
        let mut seqs = Vec::new();
        for name in dir.names()? {
            if name.ends_with(".seg.tmp") {
                match dir.unlink(&name) {
                    Ok(()) => report.temp_files_removed += 1,
                    // Not a leftover of ours (a directory, say): set it aside, do not stop the start.
                    Err(_) => corrupt.set_aside(&dir, &name, "not a file", &mut report)?,
                }
            } else if let Some(seq) = segment::parse_file_name(&name) {
                seqs.push((seq, name));
            }
        }
        seqs.sort_unstable();

        let mut index = Index::default();
        let mut segments: BTreeMap<u64, Segment> = BTreeMap::new();
        for (seq, name) in seqs {
            let (mut seg, header) = match Segment::open(&dir, &name, seq) {
                Ok(sh) => sh,
                Err(e @ (QueueError::Corrupt { .. } | QueueError::Unsafe { .. })) => {
                    corrupt.set_aside(&dir, &name, &e.to_string(), &mut report)?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let header = match header {
                Ok(h) if h.seq == seq && h.shard == shard => h,
                Ok(h) if h.shard != shard => {
                    drop(seg);
                    let why = format!("its header names shard {}", h.shard);
                    corrupt.set_aside(&dir, &name, &why, &mut report)?;
                    continue;
                }
                Ok(h) => {
                    drop(seg);
                    let why = format!("its header names segment {:016x}", h.seq);
                    corrupt.set_aside(&dir, &name, &why, &mut report)?;
                    continue;
                }
                Err(e) => {
                    drop(seg);
                    report.bad_segment_headers += 1;
                    let why = format!("segment header unreadable ({e})");
                    corrupt.set_aside(&dir, &name, &why, &mut report)?;
                    continue;
                }
            };
            report.segments_scanned += 1;
            if header.key.is_none() {
                report.old_format_segments += 1;
            }
            index.max_epoch = index.max_epoch.max(header.id_epoch);
            let out = segment::scan(seg.bytes(), |off, len, rec| {
                index.apply(seq, off, len, &rec)
            });
            report.records += out.records;
            report.corrupt_records += out.corrupt_skipped;
            if out.torn_tail {
                report.torn_tails += 1;
            }
            let n = out.bad_regions.len();
            for (i, &(start, end)) in out.bad_regions.iter().enumerate() {
                let tail = out.torn_tail && i + 1 == n;
                corrupt.keep_region(&seg, start, end, tail, &mut report)?;
            }
            if !out.bad_regions.is_empty() {
                // Never append after damage: later scans must see exactly what this one saw.
                seg.seal();
            }
            seg.set_write_pos(out.end);
            segments.insert(seq, seg);
        }

        let epoch =
            (now_unix_s().min(u32::MAX as u64 - 1) as u32).max(index.max_epoch.saturating_add(1));
        let mut stats = QueueStats::default();
        let newest = segments.pop_last();
        for seg in segments.values_mut() {
            seg.seal();
        }
        let next_seq = newest.as_ref().map_or(1, |(s, _)| s + 1);
        let active = match newest {
            Some((_, seg)) if !seg.is_sealed() => seg,
            other => {
                if let Some((seq, seg)) = other {
                    segments.insert(seq, seg);
                }
                stats.segments_created += 1;
                Segment::create(
                    &dir,
                    &Self::header_for(shard, next_seq, segment_size, epoch)?,
                )?
            }
        };
        let mut store = QueueStore {
            dir,
            shard,
            segment_size,
            _lock: lock,
            sealed: segments,
            active,
            spare: None,
            spare_pending: None,
            index,
            epoch,
            counter: 0,
            dirty: Vec::new(),
            durable: CommitTicket::default(),
            planned_deletions: BTreeMap::new(),
            deletions_blocked: false,
            policy: HousekeepingPolicy::default(),
            stats,
        };
        // Record the epoch in use so ids are never reused even if nothing else
        // is written before the next restart.
        store.append_epoch_mark()?;
        // Make everything we recovered from (possibly only in the page cache
        // after a process crash) durable before deleting anything.
        for seg in store
            .sealed
            .values_mut()
            .chain(std::iter::once(&mut store.active))
        {
            seg.sync_blocking()?;
        }
        store.dirty.clear();
        store.durable = store.position();
        store.plan_deletions();
        report.segments_deleted += store.run_deletions()?;
        report.pending_messages = store.index.msgs.len() as u64;
        report.pending_recipients = store
            .index
            .msgs
            .values()
            .map(|m| m.states.iter().filter(|s| !s.is_final()).count() as u64)
            .sum();
        Ok((store, report))
    }

    /// The header of a new segment, with a fresh random key.
    fn header_for(
        shard: u8,
        seq: u64,
        segment_size: u64,
        epoch: u32,
    ) -> Result<SegmentHeader, QueueError> {
        Ok(SegmentHeader {
            shard,
            seq,
            created_unix_ms: now_unix_ms(),
            segment_size,
            id_epoch: epoch,
            key: Some(record::random_key()?),
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn shard(&self) -> u8 {
        self.shard
    }

    pub fn segment_size(&self) -> u64 {
        self.segment_size
    }

    /// Replaces the compaction policy.
    pub fn set_policy(&mut self, policy: HousekeepingPolicy) {
        self.policy = policy;
    }

    /// Allocates a fresh queue id (see [`QueueId`] for the layout).
    pub fn allocate_id(&mut self) -> QueueId {
        if self.counter >= QueueId::COUNTER_LIMIT {
            let now = now_unix_s().min(u32::MAX as u64 - 1) as u32;
            self.epoch = now.max(self.epoch.saturating_add(1));
            self.counter = 0;
        }
        let id = QueueId::from_parts(self.epoch, self.shard, self.counter);
        self.counter += 1;
        debug_assert!(self.counter <= QueueId::COUNTER_LIMIT);
        id
    }

    /// Largest record a segment can hold.
    pub fn max_record_len(&self) -> u64 {
        self.segment_size - SEGMENT_HEADER_LEN as u64
    }

    /// Appends a message record (all recipients Pending) to the active
    /// segment's staging buffer (it reaches the file with the next group
    /// commit's pwrite; the mapping is never written) and indexes it. The
    /// returned ticket must be durable
    /// (see [`super::ShardQueue::durable`]) before the client gets its 250.
    pub fn append_message(
        &mut self,
        id: QueueId,
        env: &Envelope,
        received_header: &[u8],
        data: &[u8],
    ) -> Result<CommitTicket, QueueError> {
        let states = vec![RcptState::Pending; env.recipients.len()];
        self.append_message_with_states(id, env, &states, received_header, data)
    }

    fn append_message_with_states(
        &mut self,
        id: QueueId,
        env: &Envelope,
        states: &[RcptState],
        received: &[u8],
        data: &[u8],
    ) -> Result<CommitTicket, QueueError> {
        let len = message_record_len(env, received.len(), data.len());
        self.ensure_room(len)?;
        let off = self.active.append_with(len, |buf| {
            encode_message(buf, id, env, states, received, data)
        });
        let pos = self.note_append(len);
        let rec_start = off as usize;
        // Offsets of the header and data inside the record: re-derive them
        // from the encoding (cheap: fixed fields + string lengths).
        let (received_at, data_at) = message_field_offsets(env, received.len());
        let pm = PendingMessage {
            id,
            envelope: env.clone(),
            states: states.to_vec(),
            size: data.len() as u64,
            segment_seq: self.active.seq(),
            record_offset: off,
            record_len: len,
            held: false,
            received_at: off + received_at,
            received_len: received.len() as u64,
            data_at: off + data_at,
        };
        debug_assert_eq!(self.active.slice(pm.data_at, data.len() as u64), Some(data));
        debug_assert!(rec_start < self.active.size() as usize);
        self.index.max_epoch = self.index.max_epoch.max(id.epoch());
        if pm.is_done() {
            self.index.msgs.remove(&id);
        } else {
            self.index.msgs.insert(id, pm);
        }
        Ok(pos)
    }

    /// Appends a progress record for recipient `rcpt_index` of `id` and
    /// applies it to the index (a message whose recipients are all final
    /// leaves the index).
    pub fn append_progress(
        &mut self,
        id: QueueId,
        rcpt_index: u32,
        state: RcptState,
        diagnostic: &str,
    ) -> Result<CommitTicket, QueueError> {
        let n = self
            .index
            .msgs
            .get(&id)
            .ok_or(QueueError::UnknownId(id))?
            .states
            .len();
        if rcpt_index as usize >= n {
            return Err(QueueError::BadRecipientIndex {
                id,
                index: rcpt_index,
            });
        }
        let len = progress_record_len(diagnostic);
        self.ensure_room(len)?;
        let now = now_unix_ms();
        self.active.append_with(len, |buf| {
            encode_progress(buf, id, rcpt_index, state, now, diagnostic)
        });
        let pos = self.note_append(len);
        let done = match self.index.msgs.get_mut(&id) {
            Some(pm) => {
                pm.states[rcpt_index as usize] = state;
                pm.is_done()
            }
            None => false,
        };
        if done {
            self.index.msgs.remove(&id);
        }
        Ok(pos)
    }

    /// Appends a control record for `id` (hold, release or delete) and applies it to the index: a deleted
    /// message leaves it at once, without a bounce.
    pub fn append_control(
        &mut self,
        id: QueueId,
        op: ControlOp,
    ) -> Result<CommitTicket, QueueError> {
        if !self.index.msgs.contains_key(&id) {
            return Err(QueueError::UnknownId(id));
        }
        self.ensure_room(CONTROL_RECORD_LEN)?;
        let now = now_unix_ms();
        self.active
            .append_with(CONTROL_RECORD_LEN, |buf| encode_control(buf, id, op, now));
        let pos = self.note_append(CONTROL_RECORD_LEN);
        match op {
            ControlOp::Hold | ControlOp::Release => {
                if let Some(pm) = self.index.msgs.get_mut(&id) {
                    pm.held = op == ControlOp::Hold;
                }
            }
            ControlOp::Delete => {
                self.index.msgs.remove(&id);
            }
            ControlOp::DelayWarned => {
                if let Some(pm) = self.index.msgs.get_mut(&id) {
                    pm.envelope.dsn.delay_warned = true;
                }
            }
        }
        Ok(pos)
    }

    fn append_epoch_mark(&mut self) -> Result<CommitTicket, QueueError> {
        self.ensure_room(EPOCH_RECORD_LEN)?;
        let epoch = self.epoch;
        self.active
            .append_with(EPOCH_RECORD_LEN, |buf| encode_epoch(buf, epoch));
        Ok(self.note_append(EPOCH_RECORD_LEN))
    }

    fn note_append(&mut self, len: u64) -> CommitTicket {
        self.stats.records_appended += 1;
        self.stats.bytes_appended += len;
        let seq = self.active.seq();
        match self.dirty.last_mut() {
            Some(d) if d.seq == seq => d.bytes += len,
            _ => self.dirty.push(DirtyFile {
                seq,
                file: self.active.file().clone(),
                bytes: len,
                write: None,
            }),
        }
        self.position()
    }

    /// Makes room for a record of `len` bytes, rolling to a new segment if
    /// the active one is sealed or too full.
    fn ensure_room(&mut self, len: u64) -> Result<(), QueueError> {
        if len > self.max_record_len() {
            return Err(QueueError::TooLarge {
                size: len,
                limit: self.max_record_len(),
            });
        }
        if !self.active.is_sealed() && self.active.remaining() >= len {
            return Ok(());
        }
        let mut next_seq = self.active.seq() + 1;
        if self.spare.is_none() && self.spare_pending == Some(next_seq) {
            // A spare for next_seq is being created on another thread: skip
            // its sequence so the two files can never collide (gaps are fine).
            next_seq += 1;
        }
        let next = match self.spare.take() {
            Some(s) if s.seq() == next_seq && s.size() >= len + SEGMENT_HEADER_LEN as u64 => s,
            other => {
                if let Some(s) = other {
                    // Stale spare (cannot happen with the current callers); drop it.
                    let name = segment::file_name(s.seq());
                    drop(s);
                    let _ = self.dir.unlink(&name);
                }
                // Blocking creation on the caller's thread. On a shard the
                // committer pre-creates the spare off the reactor, and
                // ShardQueue::append_* (via room_for) create a missing one
                // on the blocking pool before appending, so this runs only
                // for direct store users (tools, tests, store() callers).
                let h = Self::header_for(self.shard, next_seq, self.segment_size, self.epoch)?;
                let s = Segment::create(&self.dir, &h)?;
                self.stats.segments_created += 1;
                self.stats.segments_created_inline += 1;
                s
            }
        };
        let mut old = std::mem::replace(&mut self.active, next);
        old.seal();
        self.sealed.insert(old.seq(), old);
        Ok(())
    }

    /// Position just past the last appended record.
    pub fn position(&self) -> CommitTicket {
        CommitTicket {
            seq: self.active.seq(),
            offset: self.active.write_pos(),
        }
    }

    /// True if records were appended since the last sync batch was taken.
    pub fn has_unsynced(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Highest position known durable.
    pub fn durable_position(&self) -> CommitTicket {
        self.durable
    }

    /// Pending messages, in no particular order.
    pub fn pending(&self) -> impl Iterator<Item = &PendingMessage> {
        self.index.msgs.values()
    }

    /// Number of pending messages.
    pub fn pending_count(&self) -> usize {
        self.index.msgs.len()
    }

    /// One pending message.
    pub fn get(&self, id: QueueId) -> Option<&PendingMessage> {
        self.index.msgs.get(&id)
    }

    fn segment(&self, seq: u64) -> Option<&Segment> {
        if seq == self.active.seq() {
            Some(&self.active)
        } else {
            self.sealed.get(&seq)
        }
    }

    /// A pending message's body as a shareable handle: the segment's read-only mapping and the byte ranges of
    /// the Received header and the data. Only for records already in the file (durable ones): delivery on any
    /// shard reads the body from the mapping without copying it.
    pub fn message_body(&self, id: QueueId) -> Option<super::MessageBody> {
        let pm = self.index.msgs.get(&id)?;
        let seg = self.segment(pm.segment_seq)?;
        let end = pm.data_at.checked_add(pm.size)?;
        let durable = self.durable
            >= CommitTicket {
                seq: pm.segment_seq,
                offset: pm.record_offset + pm.record_len,
            };
        if !durable || end > seg.mapping().len() as u64 {
            return None;
        }
        // After the read: the record behind the handle is the one indexed (framing, tag, crc).
        debug_assert_eq!(seg.verify_record(pm.record_offset, pm.record_len), Ok(()));
        Some(super::MessageBody {
            map: seg.mapping().clone(),
            received: pm.received_at as usize..(pm.received_at + pm.received_len) as usize,
            data: pm.data_at as usize..end as usize,
        })
    }

    /// The Received header and the data of a pending message, borrowed from
    /// wherever the record is now: the staging buffer, the sync in flight,
    /// or the mapping (see [`Segment::slice`]).
    pub fn message_data(&self, id: QueueId) -> Option<(&[u8], &[u8])> {
        let pm = self.index.msgs.get(&id)?;
        let seg = self.segment(pm.segment_seq)?;
        debug_assert_eq!(seg.verify_record(pm.record_offset, pm.record_len), Ok(()));
        Some((
            seg.slice(pm.received_at, pm.received_len)?,
            seg.slice(pm.data_at, pm.size)?,
        ))
    }

    pub fn stats(&self) -> &QueueStats {
        &self.stats
    }

    /// Number of segment files (sealed + active).
    pub fn segment_count(&self) -> usize {
        self.sealed.len() + 1
    }

    /// Sequences of the segment files (sealed + active), ascending.
    pub fn segment_seqs(&self) -> Vec<u64> {
        self.sealed
            .keys()
            .copied()
            .chain(std::iter::once(self.active.seq()))
            .collect()
    }

    // ------------------------------------------------------------ sync support

    /// Takes everything appended since the last batch.
    pub(crate) fn take_sync_batch(&mut self) -> SyncBatch {
        let mut files = std::mem::take(&mut self.dirty);
        for f in &mut files {
            if let Some(seg) = self.segment_mut(f.seq) {
                f.write = seg.take_staged();
            }
        }
        SyncBatch {
            target: self.position(),
            files,
        }
    }

    fn segment_mut(&mut self, seq: u64) -> Option<&mut Segment> {
        if self.active.seq() == seq {
            Some(&mut self.active)
        } else {
            self.sealed.get_mut(&seq)
        }
    }

    /// A batch's sync completed: `target` is durable.
    pub(crate) fn complete_sync(&mut self, target: CommitTicket, bytes: u64, seqs: &[u64]) {
        for &seq in seqs {
            if let Some(seg) = self.segment_mut(seq) {
                seg.sync_done();
            }
        }
        self.stats.syncs += 1;
        self.stats.synced_bytes += bytes;
        if target > self.durable {
            self.durable = target;
        }
    }

    /// A batch's sync failed: seal every segment in it (never appended to
    /// again) and stop deleting segments until restart.
    pub(crate) fn fail_sync(&mut self, seqs: &[u64]) {
        self.stats.sync_failures += 1;
        self.deletions_blocked = true;
        for &s in seqs {
            if s == self.active.seq() {
                self.active.seal();
            } else if let Some(seg) = self.sealed.get_mut(&s) {
                seg.seal();
            }
        }
    }

    /// Synchronously syncs everything appended so far (for use outside an
    /// executor: tools, tests, shutdown paths). Returns the durable position.
    pub fn sync_blocking(&mut self) -> Result<CommitTicket, QueueError> {
        let batch = self.take_sync_batch();
        let mut bytes = 0;
        for f in &batch.files {
            bytes += f.bytes;
            let written = match &f.write {
                Some((at, data)) => segment::write_at(&f.file, *at, data),
                None => Ok(()),
            };
            if let Err(e) = written.and_then(|_| segment::fdatasync(&f.file)) {
                tracing::error!(
                    target: crate::eventlog::QUEUE,
                    "queue sync of segment {} in {} failed: {e}",
                    f.seq,
                    self.dir.path().display()
                );
                let seqs: Vec<u64> = batch.files.iter().map(|f| f.seq).collect();
                self.fail_sync(&seqs);
                return Err(QueueError::SyncFailed(e.to_string()));
            }
        }
        let seqs: Vec<u64> = batch.files.iter().map(|f| f.seq).collect();
        self.complete_sync(batch.target, bytes, &seqs);
        Ok(self.durable)
    }

    /// Parameters for pre-creating the next segment, if one is needed (the
    /// active segment is more than half full and there is no spare).
    /// The caller must create it off the reactor and hand the result to
    /// [`install_spare`](Self::install_spare).
    pub(crate) fn spare_wanted(&mut self) -> Option<(Dir, SegmentHeader)> {
        if self.spare.is_some()
            || self.spare_pending.is_some()
            || self.active.write_pos() < self.active.size() / 2
        {
            return None;
        }
        let seq = self.active.seq() + 1;
        let header = Self::header_for(self.shard, seq, self.segment_size, self.epoch).ok()?;
        let dir = self.dir.try_clone().ok()?;
        self.spare_pending = Some(seq);
        Some((dir, header))
    }

    /// Installs a pre-created segment (removed if the store rolled past it
    /// meanwhile: its sequence was then skipped, so nobody else uses it).
    ///
    /// Returns the file name of a segment that is not needed after all: the caller removes it off the reactor
    /// ([`delete_segment_file`]) and counts it with [`deletion_done`](Self::deletion_done).
    #[must_use]
    pub(crate) fn install_spare(&mut self, seg: Result<Segment, QueueError>) -> Option<String> {
        let pending = self.spare_pending.take();
        let Ok(seg) = seg else { return None };
        debug_assert_eq!(pending, Some(seg.seq()));
        self.stats.segments_created += 1;
        if self.spare.is_none() && seg.seq() == self.active.seq() + 1 {
            self.spare = Some(seg);
            None
        } else {
            let name = segment::file_name(seg.seq());
            drop(seg);
            Some(name)
        }
    }

    // ------------------------------------------------------------ housekeeping

    /// Deletes sealed segments that hold nothing needed and compacts: when
    /// the oldest segment still pinned holds few live bytes, all of them in
    /// messages not due soon, those messages are copied forward (same queue
    /// id, current states) so the segment can go. See the module docs for
    /// the deletion rule. Deletions planned in this call wait until the
    /// current position is durable (next call after a sync). The unlinks and
    /// directory fsyncs run on the caller's thread here (tools, tests); the
    /// server's shards go through [`super::ShardQueue::housekeeping`], which
    /// runs them on the blocking pool.
    pub fn housekeeping(&mut self, now_unix_s: u64) -> Result<HousekeepingReport, QueueError> {
        let segments_deleted = self.run_deletions()?;
        let mut report = self.compact_and_plan(now_unix_s)?;
        report.segments_deleted = segments_deleted + self.run_deletions()?;
        report.deletions_waiting_for_sync = self.planned_deletions.len() as u64;
        Ok(report)
    }

    /// Housekeeping without the deletions: compaction (bounded by `max_copy_bytes_per_run`), then the planning
    /// of the deletions it allows. The caller runs them ([`next_deletion`](Self::next_deletion)).
    pub(crate) fn compact_and_plan(
        &mut self,
        now_unix_s: u64,
    ) -> Result<HousekeepingReport, QueueError> {
        let mut report = HousekeepingReport::default();
        // Compaction, bounded by max_copy_bytes_per_run.
        let mut budget = self.policy.max_copy_bytes_per_run;
        while let Some(min_seq) = self.index.min_live_seq() {
            if min_seq >= self.active.seq() {
                break;
            }
            let Some(seg) = self.sealed.get(&min_seq) else {
                break;
            };
            let seg_size = seg.size();
            let victims: Vec<(QueueId, u64)> = self
                .index
                .msgs
                .values()
                .filter(|m| m.segment_seq == min_seq)
                .map(|m| (m.id, m.record_len))
                .collect();
            let live: u64 = victims.iter().map(|v| v.1).sum();
            if live > seg_size / self.policy.live_fraction_divisor.max(1) || live > budget {
                break;
            }
            let horizon = now_unix_s.saturating_add(self.policy.min_deferral_s);
            // Held messages are not due either: their copies move on like long-deferred ones.
            let all_deferred = victims.iter().all(|(id, _)| {
                self.index.msgs.get(id).is_some_and(|m| {
                    m.held
                        || m.open_recipients().all(|(_, _, s)| match s {
                            RcptState::Deferred {
                                next_attempt_unix_s,
                                ..
                            } => next_attempt_unix_s >= horizon,
                            _ => false,
                        })
                })
            });
            if !all_deferred {
                break;
            }
            for (id, len) in victims {
                self.copy_forward(id)?;
                report.messages_copied += 1;
                report.bytes_copied += len;
            }
            budget -= live;
        }
        self.plan_deletions();
        report.deletions_waiting_for_sync = self.planned_deletions.len() as u64;
        Ok(report)
    }

    /// Deletions planned and not yet run.
    pub(crate) fn deletions_planned(&self) -> u64 {
        self.planned_deletions.len() as u64
    }

    /// Writes a new copy of a pending message (current states) to the active
    /// segment; the index then points at the copy.
    fn copy_forward(&mut self, id: QueueId) -> Result<(), QueueError> {
        let Some(pm) = self.index.msgs.get(&id) else {
            return Ok(());
        };
        let len = message_record_len(&pm.envelope, pm.received_len as usize, pm.size as usize);
        self.ensure_room(len)?;
        let Some(pm) = self.index.msgs.get_mut(&id) else {
            return Ok(());
        };
        let src = if pm.segment_seq == self.active.seq() {
            return Ok(()); // already in the active segment
        } else {
            self.sealed
                .get(&pm.segment_seq)
                .ok_or_else(|| QueueError::Corrupt {
                    path: self.dir.path().to_path_buf(),
                    offset: 0,
                    reason: format!("segment {} of message {id} missing", pm.segment_seq),
                })?
        };
        let missing = || QueueError::Corrupt {
            path: self.dir.path().to_path_buf(),
            offset: pm.record_offset,
            reason: format!("record of message {id} out of its segment"),
        };
        let received = src
            .slice(pm.received_at, pm.received_len)
            .ok_or_else(missing)?;
        let data = src.slice(pm.data_at, pm.size).ok_or_else(missing)?;
        let (env, states) = (&pm.envelope, &pm.states);
        let off = self.active.append_with(len, |buf| {
            encode_message(buf, id, env, states, received, data)
        });
        let (r_at, d_at) = message_field_offsets(&pm.envelope, pm.received_len as usize);
        pm.segment_seq = self.active.seq();
        pm.record_offset = off;
        pm.record_len = len;
        pm.received_at = off + r_at;
        pm.data_at = off + d_at;
        let held = pm.held;
        self.note_append(len);
        self.stats.messages_copied += 1;
        if held {
            // The hold moves with the copy: the control record that set it may be in a segment deleted later.
            self.ensure_room(CONTROL_RECORD_LEN)?;
            let now = now_unix_ms();
            self.active.append_with(CONTROL_RECORD_LEN, |buf| {
                encode_control(buf, id, ControlOp::Hold, now)
            });
            self.note_append(CONTROL_RECORD_LEN);
        }
        Ok(())
    }

    /// Plans the deletion of every sealed segment below the lowest segment
    /// holding a pending message's current copy, to run once the current
    /// position is durable.
    fn plan_deletions(&mut self) {
        let limit = self
            .index
            .min_live_seq()
            .unwrap_or(u64::MAX)
            .min(self.active.seq());
        let pos = self.position();
        for &seq in self.sealed.range(..limit).map(|(s, _)| s) {
            self.planned_deletions.entry(seq).or_insert(pos);
        }
    }

    /// Runs planned deletions whose condition is durable, oldest first, on the caller's thread (blocking: an
    /// unlink and a directory fsync per segment). [`super::ShardQueue::housekeeping`] runs them on the blocking
    /// pool instead, through [`next_deletion`](Self::next_deletion).
    fn run_deletions(&mut self) -> Result<u64, QueueError> {
        let mut n = 0;
        while let Some(name) = self.next_deletion() {
            delete_segment_file(&self.dir, &name)?;
            self.stats.segments_deleted += 1;
            n += 1;
        }
        Ok(n)
    }

    /// Takes the next planned deletion whose condition is durable (oldest first; stops at the first one that
    /// must still wait, so deletions stay a prefix of the log): the segment leaves the store and its file name
    /// is returned. The caller must then unlink it and fsync the directory ([`delete_segment_file`]) before
    /// taking the next one, and count it with [`deletion_done`](Self::deletion_done).
    pub(crate) fn next_deletion(&mut self) -> Option<String> {
        if self.deletions_blocked {
            return None;
        }
        while let Some((&seq, &needs)) = self.planned_deletions.first_key_value() {
            if needs > self.durable {
                return None;
            }
            // Only a prefix of the log may go: never skip an older segment.
            if self
                .sealed
                .keys()
                .next()
                .is_some_and(|&oldest| oldest < seq)
            {
                return None;
            }
            self.planned_deletions.remove(&seq);
            if seq >= self.active.seq() {
                continue;
            }
            let Some(seg) = self.sealed.remove(&seq) else {
                continue;
            };
            let name = segment::file_name(seg.seq());
            drop(seg);
            return Some(name);
        }
        None
    }

    /// A segment taken with [`next_deletion`](Self::next_deletion) is gone from the disk.
    pub(crate) fn deletion_done(&mut self) {
        self.stats.segments_deleted += 1;
    }

    /// The shard directory, for work on the blocking pool (segment creation and deletion).
    pub(crate) fn dir_handle(&self) -> Result<Dir, QueueError> {
        self.dir
            .try_clone()
            .map_err(|e| QueueError::io_at(self.dir.path(), e))
    }

    /// What appending a record of `len` bytes needs first (see [`Room`]).
    pub(crate) fn room_for(&mut self, len: u64) -> Room {
        if len > self.max_record_len()
            || (!self.active.is_sealed() && self.active.remaining() >= len)
        {
            // Fits, or fails in the append itself (too large): nothing to create.
            return Room::Ready;
        }
        let next_seq = self.active.seq() + 1;
        if let Some(s) = &self.spare {
            if s.seq() == next_seq && s.size() >= len + SEGMENT_HEADER_LEN as u64 {
                return Room::Ready;
            }
        }
        if self.spare.is_none() && self.spare_pending.is_some() {
            return Room::InFlight;
        }
        if self.spare.is_some() {
            // A spare that does not fit (a record larger than a fresh segment cannot be: the append fails).
            return Room::Ready;
        }
        match (
            Self::header_for(self.shard, next_seq, self.segment_size, self.epoch),
            self.dir.try_clone(),
        ) {
            (Ok(header), Ok(dir)) => {
                self.spare_pending = Some(next_seq);
                Room::Create(dir, header)
            }
            // The append reports the error (it tries the same on its own).
            _ => Room::Ready,
        }
    }
}

/// What an append needs before it can run without creating a segment file on the caller's thread.
pub(crate) enum Room {
    /// The active segment, or the ready spare, holds the record (or the append fails on its own).
    Ready,
    /// A spare segment is being created on the blocking pool: wait for it.
    InFlight,
    /// Create this segment (off the reactor) and hand it to [`QueueStore::install_spare`].
    Create(Dir, SegmentHeader),
}

/// Unlinks segment file `name` (already gone is fine) and fsyncs the directory, so that the deletion is durable
/// before the next one (deletions stay a prefix of the log across a crash). Blocking.
pub(crate) fn delete_segment_file(dir: &Dir, name: &str) -> Result<(), QueueError> {
    match dir.unlink(name) {
        Ok(()) => {}
        Err(e)
            if e.io_error()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound) => {}
        Err(e) => return Err(e.into()),
    }
    dir.sync()?;
    Ok(())
}

/// Offsets, relative to the record start, of the Received header bytes and
/// of the data in a message record encoded from `env`.
fn message_field_offsets(env: &Envelope, received_len: usize) -> (u64, u64) {
    let mut n = record::RECORD_HEADER_LEN as u64 + 8 + 8 + 4 + 4;
    for s in [
        &env.sender,
        &env.client_addr,
        &env.client_helo,
        &env.tls,
        &env.auth_user,
    ] {
        n += 4 + s.len() as u64;
    }
    for r in &env.recipients {
        n += 4 + r.len() as u64 + 13;
    }
    let received_at = n + 4;
    let data_at = received_at + received_len as u64 + 4;
    (received_at, data_at)
}

/// Takes an exclusive advisory lock on `dir/lock`.
fn lock_dir(dir: &Dir) -> Result<File, QueueError> {
    use rustix::fs::{flock, FlockOperation};
    let f = dir.open_append("lock")?;
    match flock(&f, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(f),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(QueueError::Locked(dir.path().to_path_buf())),
        Err(e) => Err(QueueError::io_at(&dir.path().join("lock"), e.into())),
    }
}

/// `<queue_directory>/corrupt/`, created on first use: where recovery keeps what it cannot read, for an
/// operator (names start with `shard-<N>.`; nothing there is ever read back or deleted by the server).
struct CorruptArea<'a> {
    root: &'a Dir,
    dir: Option<Dir>,
    shard: u8,
}

impl<'a> CorruptArea<'a> {
    fn new(root: &'a Dir, shard: u8) -> Self {
        CorruptArea {
            root,
            dir: None,
            shard,
        }
    }

    fn dir(&mut self) -> Result<&Dir, QueueError> {
        if self.dir.is_none() {
            self.dir = Some(self.root.subdir("corrupt")?);
        }
        Ok(self.dir.as_ref().expect("just set"))
    }

    /// Moves the file `name` of `from` (whatever it is: a symlink moves as a link) into corrupt/.
    fn set_aside(
        &mut self,
        from: &Dir,
        name: &str,
        why: &str,
        report: &mut RecoveryReport,
    ) -> Result<(), QueueError> {
        let shard = self.shard;
        let dest = self.dir()?;
        let taken = dest.names()?;
        let mut to = format!("shard-{shard}.{name}");
        let mut n = 1;
        while taken.contains(&to) {
            to = format!("shard-{shard}.{name}.{n}");
            n += 1;
        }
        from.rename(name, dest, &to)?;
        dest.sync()?;
        from.sync()?;
        report.files_set_aside += 1;
        report.notes.push(format!(
            "{}: not used as a queue segment: {why}; moved to {}",
            from.path().join(name).display(),
            dest.path().join(&to).display()
        ));
        Ok(())
    }

    /// Copies bytes `[start, end)` of `seg` into corrupt/ (once: a later recovery finds the copy by name).
    fn keep_region(
        &mut self,
        seg: &Segment,
        start: u64,
        end: u64,
        tail: bool,
        report: &mut RecoveryReport,
    ) -> Result<(), QueueError> {
        let name = format!(
            "shard-{}.{:016x}.{start:x}-{end:x}.bad",
            self.shard,
            seg.seq()
        );
        let what = if tail {
            "unreadable at the end of the segment (a write torn by a crash: never acknowledged; or damage)"
        } else {
            "unreadable with valid records after them (damage, or a torn write)"
        };
        let dest = self.dir()?;
        let path = dest.path().join(&name);
        let bytes = seg
            .bytes()
            .get(start as usize..end as usize)
            .unwrap_or_default();
        match dest.create_new(&name) {
            Ok(f) => {
                segment::write_at(&f, 0, bytes).map_err(|e| QueueError::io_at(&path, e))?;
                f.sync_all().map_err(|e| QueueError::io_at(&path, e))?;
                dest.sync()?;
                report.regions_kept += 1;
                report.notes.push(format!(
                    "{}: {} bytes at offset {start} {what}; copied to {}",
                    seg.path().display(),
                    end - start,
                    path.display()
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(QueueError::io_at(&path, e)),
        }
        Ok(())
    }
}
