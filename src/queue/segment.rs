//! One segment file of a shard's queue: creation (preallocated, header with a fresh random record key,
//! made durable under its final name by rename + directory fsync), the read-only memory mapping, staged
//! appends (each record signed for its offset, see [`super::record::seal`]), and the record scanner shared
//! by recovery and `list_queue`, which resynchronises after a bad record only at a record whose keyed tag
//! proves that this server wrote it there.
//!
//! File name: `<seq:016x>.seg`; a segment being created is `<seq:016x>.seg.tmp`
//! until it is complete (recovery deletes leftover `.tmp` files). Files are opened relative to the shard
//! directory's descriptor, never through a symlink ([`crate::spool`]).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use super::record::{
    self, check_record, decode_record, DecodeError, Record, RecordFormat, SegmentHeader,
    RECORD_ALIGN, RECORD_HEADER_LEN, RECORD_MAGIC, SEGMENT_HEADER_LEN,
};
use super::QueueError;
use crate::limits;
use crate::spool::{Dir, SpoolError};

/// File name of segment `seq`.
pub fn file_name(seq: u64) -> String {
    format!("{seq:016x}.seg")
}

/// Parses a segment file name back to its sequence number.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    if hex.len() != 16
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    // Exactly the name the server writes: no second file (upper case hex) for the same segment.
    u64::from_str_radix(hex, 16)
        .ok()
        .filter(|&seq| file_name(seq) == name)
}

/// fdatasync of a file (blocking).
pub fn fdatasync(file: &File) -> io::Result<()> {
    file.sync_data()
}

/// Writes `bytes` at `offset` (all of it; blocking).
pub fn write_at(file: &File, offset: u64, bytes: &[u8]) -> io::Result<()> {
    file.write_all_at(bytes, offset)
}

impl From<SpoolError> for QueueError {
    fn from(e: SpoolError) -> QueueError {
        match e {
            SpoolError::Io { path, source } => QueueError::io_at(&path, source),
            SpoolError::Unsafe { path, reason } => QueueError::Unsafe { path, reason },
        }
    }
}

/// An open, mapped segment.
///
/// Appends are staged in memory and reach the file with one `pwrite` per group commit (see
/// [`Segment::take_staged`]), right before that commit's fdatasync; the mapping is only read. Writing through
/// the mapping instead costs a page fault per page after every sync (writeback write-protects the dirty
/// pages) and a TLB-shootdown interrupt on every other core of the process: the shards.
pub struct Segment {
    path: PathBuf,
    file: Arc<File>,
    /// Read-only mapping, shared with delivery on other shards (bodies are read from it without copying).
    map: Arc<Mmap>,
    seq: u64,
    /// How records are framed here; appends need format 2 (its key signs them).
    format: RecordFormat,
    /// Next append offset (end of the last valid record).
    write_pos: u64,
    /// Never appended to again (rolled over, recovered with damage, format 1, or a sync of it failed).
    sealed: bool,
    /// Records appended but not yet handed to a sync: file bytes `[write_pos - staged.len(), write_pos)`.
    /// Bounded by the segment size.
    staged: Vec<u8>,
    /// Bytes handed to the sync in flight (offset, bytes), readable until that sync completes.
    inflight: Option<(u64, Arc<Vec<u8>>)>,
    /// A staging buffer to reuse for the next batch (the last synced batch's), at most [`limits::QUEUE_STAGING_SPARE_BYTES_MAX`].
    spare: Option<Vec<u8>>,
}

impl Segment {
    /// Creates segment `header.seq` in `dir`: preallocates `segment_size` bytes, writes the header (which
    /// must carry a key), fsyncs the file, renames it into place and fsyncs the directory. Blocking: call it
    /// from a blocking thread where possible.
    pub fn create(dir: &Dir, header: &SegmentHeader) -> Result<Segment, QueueError> {
        let size = header.segment_size;
        if size < (SEGMENT_HEADER_LEN + RECORD_HEADER_LEN) as u64
            || !size.is_multiple_of(RECORD_ALIGN as u64)
            || header.key.is_none()
        {
            return Err(QueueError::Config(format!("bad segment size {size}")));
        }
        let name = file_name(header.seq);
        let path = dir.path().join(&name);
        let tmp = format!("{name}.tmp");
        let result = (|| -> Result<File, QueueError> {
            let file = dir.create_file(&tmp)?;
            let tmp_path = dir.path().join(&tmp);
            preallocate(&file, size).map_err(|e| QueueError::io_at(&tmp_path, e))?;
            let mut hb = [0u8; SEGMENT_HEADER_LEN];
            record::encode_segment_header(&mut hb, header);
            file.write_all_at(&hb, 0)
                .map_err(|e| QueueError::io_at(&tmp_path, e))?;
            file.sync_all()
                .map_err(|e| QueueError::io_at(&tmp_path, e))?;
            dir.rename(&tmp, dir, &name)?;
            dir.sync()?;
            Ok(file)
        })();
        let file = match result {
            Ok(f) => f,
            Err(e) => {
                let _ = dir.unlink(&tmp);
                return Err(e);
            }
        };
        let map = map_file(&file, &path)?;
        Ok(Segment {
            path,
            file: Arc::new(file),
            map,
            seq: header.seq,
            format: header.format(),
            write_pos: SEGMENT_HEADER_LEN as u64,
            sealed: false,
            staged: Vec::new(),
            inflight: None,
            spare: None,
        })
    }

    /// Opens the existing segment `name` of `dir` read-write (for `pwrite`; never through a symlink; the file must
    /// be ours, see [`Dir::open_file`]), maps it read-only and reads its header. The append position is set to the end of the
    /// header; recovery moves it with [`set_write_pos`]. A file too small to be a segment is
    /// [`QueueError::Corrupt`]; a bad header is returned as the `Err` of the pair, with the mapping (the caller
    /// decides what to do with the file).
    ///
    /// [`set_write_pos`]: Segment::set_write_pos
    pub fn open(
        dir: &Dir,
        name: &str,
        seq: u64,
    ) -> Result<(Segment, Result<SegmentHeader, DecodeError>), QueueError> {
        let path = dir.path().join(name);
        let file = dir.open_file(name, true)?;
        let len = file
            .metadata()
            .map_err(|e| QueueError::io_at(&path, e))?
            .len();
        // Never larger than a segment can be (a huge sparse file would be walked page by page).
        if len < (SEGMENT_HEADER_LEN + RECORD_HEADER_LEN) as u64 || len > u32::MAX as u64 {
            return Err(QueueError::Corrupt {
                path,
                offset: 0,
                reason: format!("segment file of {len} bytes"),
            });
        }
        let map = map_file(&file, &path)?;
        let header = record::decode_segment_header(&map);
        let format = header
            .as_ref()
            .map(|h| h.format())
            .unwrap_or(RecordFormat::V1);
        let seg = Segment {
            path,
            file: Arc::new(file),
            map,
            seq,
            format,
            write_pos: SEGMENT_HEADER_LEN as u64,
            sealed: !matches!(format, RecordFormat::V2(_)),
            staged: Vec::new(),
            inflight: None,
            spare: None,
        };
        Ok((seg, header))
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// How this segment's records are framed.
    pub fn format(&self) -> &RecordFormat {
        &self.format
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Shared handle to the file (for syncing from a blocking thread).
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Usable size of the segment: the mapped length rounded down to the
    /// record alignment (a foreign file of odd length is only read that far).
    pub fn size(&self) -> u64 {
        (self.map.len() & !(RECORD_ALIGN - 1)) as u64
    }

    pub fn write_pos(&self) -> u64 {
        self.write_pos
    }

    pub fn is_sealed(&self) -> bool {
        self.sealed
    }

    pub fn seal(&mut self) {
        self.sealed = true;
    }

    /// Bytes still free for appends.
    pub fn remaining(&self) -> u64 {
        self.size().saturating_sub(self.write_pos)
    }

    /// The whole mapping (what is in the file; staged records are not there yet).
    pub fn bytes(&self) -> &[u8] {
        &self.map[..self.size() as usize]
    }

    /// `len` bytes at `off`, wherever they are now: staged, in the sync in flight, or in the file.
    pub fn slice(&self, off: u64, len: u64) -> Option<&[u8]> {
        let staged_from = self.write_pos - self.staged.len() as u64;
        let (base, bytes): (u64, &[u8]) = if off >= staged_from {
            (staged_from, &self.staged)
        } else {
            match &self.inflight {
                Some((at, b)) if off >= *at && off < *at + b.len() as u64 => (*at, b.as_slice()),
                _ => (0, self.bytes()),
            }
        };
        let start = usize::try_from(off - base).ok()?;
        bytes.get(start..start.checked_add(usize::try_from(len).ok()?)?)
    }

    /// Hands the staged records to a sync: returns (file offset, bytes) to write before the fdatasync.
    /// They stay readable through [`Segment::slice`] until [`Segment::sync_done`].
    pub fn take_staged(&mut self) -> Option<(u64, Arc<Vec<u8>>)> {
        if self.staged.is_empty() {
            return None;
        }
        debug_assert!(self.inflight.is_none(), "one sync in flight per segment");
        // The previous batch's buffer, given back by sync_done, takes the staged one's place: no allocation
        // (and, for large batches, no fresh pages to fault in) per sync.
        let cap = self.staged.capacity();
        let next = self.spare.take().unwrap_or_else(|| Vec::with_capacity(cap));
        let bytes = std::mem::replace(&mut self.staged, next);
        let at = self.write_pos - bytes.len() as u64;
        // Right before the write: every staged record is framed and signed for its offset, back to back up to
        // the append position (a bad encoder or a stray write to the buffer would otherwise reach the disk,
        // and recovery would cut the segment there).
        if let Err((off, e)) = verify_records(&self.format, at, &bytes) {
            panic!(
                "shardmta: queue invariant: record at offset {off} of {} does not verify before its write: {e}",
                self.path.display()
            );
        }
        let bytes = Arc::new(bytes);
        self.inflight = Some((at, bytes.clone()));
        Some((at, bytes))
    }

    /// The sync of the in-flight bytes completed: they are in the file (and the mapping). Their buffer is kept
    /// for the next batch unless it is larger than [`limits::QUEUE_STAGING_SPARE_BYTES_MAX`].
    pub fn sync_done(&mut self) {
        if let Some((_, b)) = self.inflight.take() {
            if let Ok(mut v) = Arc::try_unwrap(b) {
                if v.capacity() <= limits::QUEUE_STAGING_SPARE_BYTES_MAX {
                    v.clear();
                    self.spare = Some(v);
                }
            }
        }
    }

    /// Sets the append position (recovery). Must be aligned and within the file.
    pub fn set_write_pos(&mut self, pos: u64) {
        assert!(
            pos.is_multiple_of(RECORD_ALIGN as u64)
                && pos <= self.size()
                && pos >= SEGMENT_HEADER_LEN as u64
        );
        self.write_pos = pos;
    }

    /// Appends a record of exactly `len` bytes written by `fill` (which gets
    /// a zeroed staging slice and returns the bytes it wrote), then signs it for its
    /// offset with the segment's key. Returns the record's offset. The caller checked
    /// `len <= remaining()`.
    pub fn append_with(&mut self, len: u64, fill: impl FnOnce(&mut [u8]) -> usize) -> u64 {
        debug_assert!(!self.sealed, "append to a sealed segment");
        debug_assert!(len <= self.remaining());
        debug_assert!(len.is_multiple_of(RECORD_ALIGN as u64));
        let off = self.write_pos;
        let start = self.staged.len();
        self.staged.resize(start + len as usize, 0);
        let n = fill(&mut self.staged[start..]);
        debug_assert_eq!(n as u64, len, "encoder wrote a different length");
        match &self.format {
            RecordFormat::V2(key) => record::seal(&mut self.staged[start..], key, off),
            // Format-1 segments are sealed at open and never reach here.
            RecordFormat::V1 => debug_assert!(false, "append to a format-1 segment"),
        }
        self.write_pos = off + len;
        off
    }

    /// Verifies the record of `len` bytes at `off` (framing, tag and crc), wherever its bytes are now (see
    /// [`Segment::slice`]). For debug assertions after reads.
    pub fn verify_record(&self, off: u64, len: u64) -> Result<(), DecodeError> {
        let bytes = self.slice(off, len).ok_or(DecodeError::Truncated)?;
        let (_, _, total) = check_record(bytes, &self.format, off)?;
        if total as u64 != len {
            return Err(DecodeError::BadLength);
        }
        Ok(())
    }

    /// The shared read-only mapping (for bodies handed to delivery on another shard).
    pub fn mapping(&self) -> &Arc<Mmap> {
        &self.map
    }

    /// Blocking write of the staged records plus fdatasync of the whole file.
    pub fn sync_blocking(&mut self) -> Result<(), QueueError> {
        if let Some((at, bytes)) = self.take_staged() {
            write_at(&self.file, at, &bytes)
                .map_err(|e| QueueError::SyncFailed(format!("{}: {e}", self.path.display())))?;
        }
        self.sync_done();
        fdatasync(&self.file)
            .map_err(|e| QueueError::SyncFailed(format!("{}: {e}", self.path.display())))
    }
}

/// Checks that `bytes`, to be written at offset `at` of a segment of format `fmt`, are whole records back to
/// back: each header verifies ([`record::check_header`]: magic, version, keyed tag for its offset, length), and in
/// debug builds each payload's crc too. Returns the offset of the first bad record.
pub(crate) fn verify_records(
    fmt: &RecordFormat,
    at: u64,
    bytes: &[u8],
) -> Result<(), (u64, DecodeError)> {
    let mut pos = 0usize;
    while pos < bytes.len() {
        let off = at + pos as u64;
        let total = record::check_header(&bytes[pos..], fmt, off).map_err(|e| (off, e))?;
        debug_assert!(
            check_record(&bytes[pos..], fmt, off).is_ok(),
            "record at {off} fails its crc before the write"
        );
        if total == 0 {
            return Err((off, DecodeError::BadLength));
        }
        pos += total;
    }
    Ok(())
}

fn map_file(file: &File, path: &Path) -> Result<Arc<Mmap>, QueueError> {
    // SAFETY: the shard directory is owned exclusively by this process (flock
    // on its lock file), so no one else truncates the file while it is mapped;
    // this process only appends to it (pwrite) and never rewrites bytes that a
    // reader holds; the mapping lives as long as its last Arc.
    unsafe { Mmap::map(file) }
        .map(Arc::new)
        .map_err(|e| QueueError::io_at(path, e))
}

/// Reserves `size` bytes with fallocate, so a full disk fails here, at segment creation, and never as SIGBUS
/// on a mapped page or a short write later. The extents stay "unwritten" until appends reach them; zero-filling
/// them at creation was measured and rejected: 64 MiB of zeros competes with the commits' fdatasyncs for the
/// disk and tripled the open-loop p99 (see ARCHITECTURE.md).
fn preallocate(file: &File, size: u64) -> io::Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    use rustix::io::Errno;
    if i64::try_from(size).is_err() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    match fallocate(file, FallocateFlags::empty(), 0, size) {
        Ok(()) => Ok(()),
        Err(Errno::OPNOTSUPP) | Err(Errno::NOSYS) | Err(Errno::INVAL) => file.set_len(size),
        Err(e) => Err(e.into()),
    }
}

/// Result of scanning one segment's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanOutcome {
    /// The segment header, if valid. Without one nothing in the file can be verified and no record is read.
    pub header: Result<SegmentHeader, DecodeError>,
    /// End of the last valid record.
    pub end: u64,
    /// Valid records visited (including ones of unknown kind).
    pub records: u64,
    /// Unreadable byte ranges `[start, end)` (zero runs excluded): damage, or records torn by a crash. Bounded
    /// by the segment length / 8.
    pub bad_regions: Vec<(u64, u64)>,
    /// Bad regions that valid records followed (a resynchronisation happened after each).
    pub corrupt_skipped: u64,
    /// The last bad region reaches past the last valid record (a torn tail).
    pub torn_tail: bool,
}

/// Scans the records of a segment image in order, calling `visit(offset, total_len, record)` for each valid
/// one. Never panics on garbage; time linear in `bytes.len()` plus the payloads of records that verify.
///
/// Records are followed by their framing from the header on. When the record at an offset does not verify,
/// the bytes from there are unreadable up to the next position where a record verifies; in a keyed
/// (format 2) segment that is the next 8-byte-aligned offset holding a record whose tag, keyed with this
/// segment's secret and bound to that offset, matches (a constant-time check per candidate, so a body full of
/// fake magics costs one pass). Message bodies cannot contain such a record: nobody outside knows the key.
/// Format-1 segments (no key) are never resynchronised: everything from their first bad record on is one bad
/// region. Runs of zero bytes are never "bad" (preallocated space not yet written).
pub fn scan(bytes: &[u8], mut visit: impl FnMut(u64, u64, Record<'_>)) -> ScanOutcome {
    let header = record::decode_segment_header(bytes);
    let mut out = ScanOutcome {
        header,
        end: SEGMENT_HEADER_LEN.min(bytes.len()) as u64,
        records: 0,
        bad_regions: Vec::new(),
        corrupt_skipped: 0,
        torn_tail: false,
    };
    let fmt = match &out.header {
        Ok(h) => h.format(),
        Err(_) => return out,
    };
    let hlen = fmt.header_len();
    let len = bytes.len();
    let mut off = SEGMENT_HEADER_LEN;
    while off + hlen <= len {
        if let Ok((_kind, _plen, total)) = check_record(&bytes[off..], &fmt, off as u64) {
            debug_assert!(total >= hlen && total % RECORD_ALIGN == 0);
            match decode_record(&bytes[off..], &fmt, off as u64) {
                Ok((rec, _)) => {
                    out.records += 1;
                    visit(off as u64, total as u64, rec);
                }
                // Framed and signed by us but not decodable (a bug of an older version): its length is
                // trustworthy, so skip exactly it.
                Err(_) => out
                    .bad_regions
                    .push((off as u64, (off + total).min(len) as u64)),
            }
            off = off.saturating_add(total);
            out.end = off.min(len) as u64;
            continue;
        }
        // Not a record here. Zeros up to the next written byte are unwritten space, not damage.
        let Some(nz) = bytes[off..].iter().position(|&b| b != 0).map(|i| off + i) else {
            break;
        };
        let start = nz & !(RECORD_ALIGN - 1);
        // A record may start right after the zeros (a lost page); else search past this offset.
        let from = if start > off {
            start
        } else {
            off + RECORD_ALIGN
        };
        let next = match fmt {
            RecordFormat::V2(_) => find_next_valid(bytes, from, &fmt),
            RecordFormat::V1 => None,
        };
        match next {
            Some(p) => {
                if p > start {
                    out.bad_regions.push((start as u64, p as u64));
                }
                out.corrupt_skipped += 1;
                off = p;
            }
            None => {
                let last = bytes.iter().rposition(|&b| b != 0).unwrap_or(start);
                let stop = (last + RECORD_ALIGN) & !(RECORD_ALIGN - 1);
                out.bad_regions.push((start as u64, stop.min(len) as u64));
                out.torn_tail = true;
                break;
            }
        }
    }
    out
}

/// First 8-byte-aligned offset >= `from` holding a record that verifies at that offset (format 2 only).
fn find_next_valid(bytes: &[u8], from: usize, fmt: &RecordFormat) -> Option<usize> {
    let magic = RECORD_MAGIC.to_le_bytes();
    let mut p = from;
    while p + fmt.header_len() <= bytes.len() {
        if bytes[p..p + 4] == magic && check_record(&bytes[p..], fmt, p as u64).is_ok() {
            return Some(p);
        }
        p += RECORD_ALIGN;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::record::message_record_len;
    use crate::queue::{Envelope, QueueId};

    #[test]
    fn file_names() {
        assert_eq!(file_name(0x1f), "000000000000001f.seg");
        assert_eq!(parse_file_name("000000000000001f.seg"), Some(0x1f));
        assert_eq!(parse_file_name("000000000000001f.seg.tmp"), None);
        assert_eq!(parse_file_name("1f.seg"), None);
        assert_eq!(parse_file_name("lock"), None);
        assert_eq!(parse_file_name("000000000000001F.seg"), None);
    }

    fn header(seq: u64) -> SegmentHeader {
        SegmentHeader {
            shard: 0,
            seq,
            created_unix_ms: 1,
            segment_size: 1 << 20,
            id_epoch: 1,
            key: Some(*b"k3y-of-segment-1"),
        }
    }

    /// The envelope of [`crate::fuzzing::segment_image`]'s messages.
    fn env() -> Envelope {
        Envelope {
            sender: "a@x.example".into(),
            recipients: vec!["b@y.example".into()],
            ..Default::default()
        }
    }

    /// A keyed segment image of `h.segment_size` bytes with `bodies` as messages (see
    /// [`crate::fuzzing::segment_image`]); returns the image and the offsets.
    fn image(h: &SegmentHeader, bodies: &[&[u8]]) -> (Vec<u8>, Vec<usize>) {
        let (mut img, offs) = crate::fuzzing::segment_image(bodies, 0);
        img.resize((h.segment_size as usize).max(img.len()), 0);
        (img, offs)
    }

    /// A body carrying complete records (the old framing, and keyed ones with guessed keys): what a client
    /// could put in a message.
    fn forged_body(at_seq: u64) -> Vec<u8> {
        let mut body = b"Subject: innocent\r\n\r\n".to_vec();
        body.resize(64, b'x');
        let evil = Envelope {
            sender: "attacker@evil".into(),
            recipients: vec!["victim@anywhere".into()],
            ..Default::default()
        };
        body.extend(crate::fuzzing::forged_records(
            &evil,
            QueueId(0xEE),
            at_seq,
            32,
        ));
        body
    }

    #[test]
    fn a_record_inside_a_torn_body_is_never_applied() {
        let h = header(5);
        let body = forged_body(5);
        let (mut img, offs) = image(&h, &[b"first", &body, b"third"]);
        // Tear the outer record of the forged body: its header is lost.
        img[offs[1]..offs[1] + 24].fill(0xAB);
        let mut seen = Vec::new();
        let out = scan(&img, |_, _, r| {
            if let Record::Message(m) = r {
                seen.push(m.sender.to_string());
            }
        });
        assert!(!seen.iter().any(|s| s == "attacker@evil"), "{seen:?}");
        // The real third message after it is found again (resynchronised at a record we signed).
        assert_eq!(seen, vec!["a@x.example", "a@x.example"]);
        assert_eq!(out.corrupt_skipped, 1);
        assert!(!out.torn_tail);
        assert_eq!(out.bad_regions.len(), 1);
        let (a, b) = out.bad_regions[0];
        assert_eq!(a as usize, offs[1]);
        assert_eq!(b as usize, offs[2]);
        // Torn tail: the forged record's outer record is the last one.
        let (mut img, offs) = image(&h, &[b"first", &body]);
        img[offs[1] + 30] ^= 0xFF;
        let mut seen = Vec::new();
        let out = scan(&img, |_, _, r| {
            if let Record::Message(m) = r {
                seen.push(m.sender.to_string());
            }
        });
        assert_eq!(seen, vec!["a@x.example"]);
        assert!(out.torn_tail);
        assert_eq!(out.end as usize, offs[1]);
    }

    #[test]
    fn resync_is_linear_in_a_body_full_of_magics() {
        // 4 MiB of magics at every aligned offset, the outer record torn: one pass, not quadratic.
        let mut h = header(9);
        h.segment_size = 8 << 20;
        let mut body = Vec::with_capacity(4 << 20);
        while body.len() < 4 << 20 {
            body.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
            body.extend_from_slice(&[2, 2, 0, 0]); // kind, version 2
        }
        let (mut img, offs) = image(&h, &[&body, b"after"]);
        img[offs[0]..offs[0] + 24].fill(0x11);
        let t = std::time::Instant::now();
        let mut n = 0;
        let out = scan(&img, |_, _, _| n += 1);
        assert_eq!(n, 1);
        assert_eq!(out.corrupt_skipped, 1);
        // Generous bound for a debug build on a loaded machine; the quadratic scan took minutes.
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn zero_runs_are_not_damage_and_format_1_does_not_resync() {
        let h = header(3);
        let (img, offs) = image(&h, &[b"one", b"two"]);
        let out = scan(&img, |_, _, _| {});
        assert_eq!(out.records, 2);
        assert!(out.bad_regions.is_empty() && !out.torn_tail);
        assert_eq!(
            out.end as usize,
            offs[1] + message_record_len(&env(), 0, 3) as usize
        );
        // A bad header: nothing is read.
        let mut bad = img.clone();
        bad[20] ^= 1;
        let out = scan(&bad, |_, _, _| panic!("read without a header"));
        assert!(out.header.is_err());
    }

    #[test]
    fn scan_random_bytes_never_panics() {
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        for round in 0..200 {
            let len = (rng % 4096) as usize;
            let mut buf = Vec::with_capacity(len);
            for _ in 0..len {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                buf.push(rng as u8);
            }
            if round % 2 == 0 && buf.len() >= SEGMENT_HEADER_LEN {
                record::encode_segment_header(&mut buf, &header(1));
            }
            // Sprinkle magics so the forward search has work to do.
            let mut i = SEGMENT_HEADER_LEN;
            while i + 4 <= buf.len() {
                if rng.is_multiple_of(3) {
                    buf[i..i + 4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
                }
                i += 24;
            }
            let out = scan(&buf, |_, _, _| {});
            assert!(out.end as usize <= buf.len().max(SEGMENT_HEADER_LEN));
        }
    }

    /// The check right before a write passes on records as encoded and fails on a record moved to another
    /// offset (its tag is for the old one), on a torn record and on a flipped length.
    #[test]
    fn verify_records_before_the_write() {
        let h = header(3);
        let fmt = h.format();
        let len = record::EPOCH_RECORD_LEN as usize;
        let at = SEGMENT_HEADER_LEN as u64;
        let mut bytes = vec![0u8; 2 * len];
        for (i, epoch) in [7u32, 8].into_iter().enumerate() {
            let buf = &mut bytes[i * len..(i + 1) * len];
            assert_eq!(record::encode_epoch(buf, epoch), len);
            let RecordFormat::V2(key) = &fmt else {
                unreachable!("keyed header")
            };
            record::seal(buf, key, at + (i * len) as u64);
        }
        assert_eq!(verify_records(&fmt, at, &bytes), Ok(()));
        // Same bytes, claimed one record later: the first tag no longer matches.
        assert_eq!(
            verify_records(&fmt, at + len as u64, &bytes),
            Err((at + len as u64, DecodeError::BadTag))
        );
        // Torn: the second record cut short.
        assert_eq!(
            verify_records(&fmt, at, &bytes[..2 * len - 8]),
            Err((at + len as u64, DecodeError::BadLength))
        );
        // A payload length changed after sealing breaks the tag of that record.
        let mut bad = bytes.clone();
        bad[len + 8] ^= 0x08;
        assert_eq!(
            verify_records(&fmt, at, &bad),
            Err((at + len as u64, DecodeError::BadTag))
        );
    }
}
