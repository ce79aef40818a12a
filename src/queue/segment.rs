//! One segment file of a shard's queue: creation (preallocated, header
//! written, made durable under its final name by rename + directory fsync),
//! the read-write memory mapping used for appends, and the crash-tolerant
//! record scanner shared by recovery and `list_queue`.
//!
//! File name: `<seq:016x>.seg`; a segment being created is `<seq:016x>.seg.tmp`
//! until it is complete (recovery deletes leftover `.tmp` files).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use super::record::{
    self, check_record, decode_record, DecodeError, Record, SegmentHeader, RECORD_ALIGN,
    RECORD_HEADER_LEN, RECORD_MAGIC, SEGMENT_HEADER_LEN,
};
use super::QueueError;

/// File name of segment `seq`.
pub fn file_name(seq: u64) -> String {
    format!("{seq:016x}.seg")
}

/// Parses a segment file name back to its sequence number.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// fsyncs a directory so that creations, renames and unlinks in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), QueueError> {
    let d = File::open(dir).map_err(|e| QueueError::io_at(dir, e))?;
    d.sync_all().map_err(|e| QueueError::io_at(dir, e))
}

/// fdatasync of a file descriptor (blocking).
pub fn fdatasync(file: &File) -> io::Result<()> {
    // SAFETY: plain syscall on a valid, open descriptor.
    let rc = unsafe { libc::fdatasync(file.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Writes `bytes` at `offset` (all of it; blocking).
pub fn write_at(file: &File, offset: u64, bytes: &[u8]) -> io::Result<()> {
    file.write_all_at(bytes, offset)
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
    /// Next append offset (end of the last valid record).
    write_pos: u64,
    /// Never appended to again (rolled over, or a sync of it failed).
    sealed: bool,
    /// Records appended but not yet handed to a sync: file bytes `[write_pos - staged.len(), write_pos)`.
    /// Bounded by the segment size.
    staged: Vec<u8>,
    /// Bytes handed to the sync in flight (offset, bytes), readable until that sync completes.
    inflight: Option<(u64, Arc<Vec<u8>>)>,
}

impl Segment {
    /// Creates segment `seq` in `dir`: preallocates `size` bytes, writes the
    /// header, fsyncs the file, renames it into place and fsyncs the
    /// directory. Blocking: call it from a blocking thread where possible.
    pub fn create(dir: &Path, header: &SegmentHeader) -> Result<Segment, QueueError> {
        let size = header.segment_size;
        if size < (SEGMENT_HEADER_LEN + RECORD_HEADER_LEN) as u64
            || !size.is_multiple_of(RECORD_ALIGN as u64)
        {
            return Err(QueueError::Config(format!("bad segment size {size}")));
        }
        let path = dir.join(file_name(header.seq));
        let tmp = dir.join(format!("{}.tmp", file_name(header.seq)));
        let result = (|| -> Result<File, QueueError> {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(|e| QueueError::io_at(&tmp, e))?;
            preallocate(&file, size).map_err(|e| QueueError::io_at(&tmp, e))?;
            let mut hb = [0u8; SEGMENT_HEADER_LEN];
            record::encode_segment_header(&mut hb, header);
            file.write_all_at(&hb, 0)
                .map_err(|e| QueueError::io_at(&tmp, e))?;
            file.sync_all().map_err(|e| QueueError::io_at(&tmp, e))?;
            std::fs::rename(&tmp, &path).map_err(|e| QueueError::io_at(&path, e))?;
            sync_dir(dir)?;
            Ok(file)
        })();
        let file = match result {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let map = map_file(&file, &path)?;
        Ok(Segment {
            path,
            file: Arc::new(file),
            map,
            seq: header.seq,
            write_pos: SEGMENT_HEADER_LEN as u64,
            sealed: false,
            staged: Vec::new(),
            inflight: None,
        })
    }

    /// Opens and maps an existing segment read-write. The append position is
    /// set to the end of the header; recovery moves it with [`set_write_pos`].
    ///
    /// [`set_write_pos`]: Segment::set_write_pos
    pub fn open(path: &Path, seq: u64) -> Result<Segment, QueueError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| QueueError::io_at(path, e))?;
        let len = file
            .metadata()
            .map_err(|e| QueueError::io_at(path, e))?
            .len();
        if len < (SEGMENT_HEADER_LEN + RECORD_HEADER_LEN) as u64 || len > isize::MAX as u64 {
            return Err(QueueError::Corrupt {
                path: path.to_path_buf(),
                offset: 0,
                reason: format!("segment file of {len} bytes"),
            });
        }
        let map = map_file(&file, path)?;
        Ok(Segment {
            path: path.to_path_buf(),
            file: Arc::new(file),
            map,
            seq,
            write_pos: SEGMENT_HEADER_LEN as u64,
            sealed: false,
            staged: Vec::new(),
            inflight: None,
        })
    }

    pub fn seq(&self) -> u64 {
        self.seq
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
        // Reuse the previous batch's buffer when nobody holds it any more.
        let spare = self
            .inflight
            .take()
            .and_then(|(_, b)| Arc::try_unwrap(b).ok())
            .map(|mut v| {
                v.clear();
                v
            });
        let cap = self.staged.capacity();
        let bytes = std::mem::replace(
            &mut self.staged,
            spare.unwrap_or_else(|| Vec::with_capacity(cap)),
        );
        let at = self.write_pos - bytes.len() as u64;
        let bytes = Arc::new(bytes);
        self.inflight = Some((at, bytes.clone()));
        Some((at, bytes))
    }

    /// The sync of the in-flight bytes completed: they are in the file (and the mapping).
    pub fn sync_done(&mut self) {
        if let Some((_, b)) = self.inflight.take() {
            if self.staged.is_empty() && self.staged.capacity() == 0 {
                if let Ok(mut v) = Arc::try_unwrap(b) {
                    v.clear();
                    self.staged = v;
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
    /// a zeroed staging slice and returns the bytes it wrote). Returns the record's
    /// offset. The caller checked `len <= remaining()`.
    pub fn append_with(&mut self, len: u64, fill: impl FnOnce(&mut [u8]) -> usize) -> u64 {
        debug_assert!(!self.sealed, "append to a sealed segment");
        debug_assert!(len <= self.remaining());
        debug_assert!(len.is_multiple_of(RECORD_ALIGN as u64));
        let off = self.write_pos;
        let start = self.staged.len();
        self.staged.resize(start + len as usize, 0);
        let n = fill(&mut self.staged[start..]);
        debug_assert_eq!(n as u64, len, "encoder wrote a different length");
        self.write_pos = off + len;
        off
    }

    /// Zeroes `[from, size)` and syncs it (torn-tail repair at recovery, before anything is appended).
    pub fn zero_from(&mut self, from: u64) -> Result<(), QueueError> {
        debug_assert!(self.staged.is_empty() && self.inflight.is_none());
        let from = from.min(self.size());
        let zeros = vec![0u8; 1 << 16];
        let mut off = from;
        while off < self.map.len() as u64 {
            let n = (self.map.len() as u64 - off).min(zeros.len() as u64) as usize;
            self.file
                .write_all_at(&zeros[..n], off)
                .map_err(|e| QueueError::io_at(&self.path, e))?;
            off += n as u64;
        }
        debug_assert!(self.map[from as usize..].iter().all(|&b| b == 0));
        fdatasync(&self.file).map_err(|e| QueueError::io_at(&self.path, e))
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
    let len =
        libc::off_t::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: plain syscall on a valid, open descriptor.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => file.set_len(size),
        _ => Err(err),
    }
}

/// Result of scanning one segment's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanOutcome {
    /// The segment header, if valid.
    pub header: Result<SegmentHeader, DecodeError>,
    /// End of the last valid record: where appends continue.
    pub end: u64,
    /// Valid records visited (including ones of unknown kind).
    pub records: u64,
    /// Invalid byte ranges skipped because valid records followed them
    /// (includes records with a good checksum but a malformed payload).
    pub corrupt_skipped: u64,
    /// Non-zero bytes found after `end` (a torn tail).
    pub torn_tail: bool,
}

/// Scans the records of a segment image in order, calling `visit(offset,
/// total_len, record)` for each valid one. Never panics on garbage.
///
/// An invalid record is skipped if a valid record follows it somewhere later
/// (searched at every 8-byte-aligned offset for the magic plus a good
/// checksum); otherwise everything from it on is a torn tail. Bound: the
/// outer loop advances by at least 8 bytes per iteration, so at most
/// `len / 8` iterations; the forward search is also at most `len / 8` steps.
pub fn scan(bytes: &[u8], mut visit: impl FnMut(u64, u64, Record<'_>)) -> ScanOutcome {
    let header = record::decode_segment_header(bytes);
    let len = bytes.len();
    let mut off = SEGMENT_HEADER_LEN;
    let mut records = 0u64;
    let mut corrupt = 0u64;
    let mut end = SEGMENT_HEADER_LEN.min(len);
    while off + RECORD_HEADER_LEN <= len {
        match check_record(&bytes[off..]) {
            Ok((_kind, _plen, total)) => {
                debug_assert!(total >= RECORD_HEADER_LEN && total % RECORD_ALIGN == 0);
                match decode_record(&bytes[off..]) {
                    Ok((rec, _)) => {
                        records += 1;
                        visit(off as u64, total as u64, rec);
                    }
                    Err(_) => corrupt += 1,
                }
                off = off.saturating_add(total);
                end = off.min(len);
            }
            Err(_) => match find_next_valid(bytes, off + RECORD_ALIGN) {
                Some(next) => {
                    corrupt += 1;
                    off = next;
                }
                None => break,
            },
        }
    }
    let torn_tail = bytes
        .get(end..)
        .is_some_and(|rest| rest.iter().any(|&b| b != 0));
    ScanOutcome {
        header,
        end: end as u64,
        records,
        corrupt_skipped: corrupt,
        torn_tail,
    }
}

/// First 8-byte-aligned offset >= `from` holding a record with a valid magic
/// and checksum.
fn find_next_valid(bytes: &[u8], from: usize) -> Option<usize> {
    let magic = RECORD_MAGIC.to_le_bytes();
    let mut p = from;
    while p + RECORD_HEADER_LEN <= bytes.len() {
        if bytes[p..p + 4] == magic && check_record(&bytes[p..]).is_ok() {
            return Some(p);
        }
        p += RECORD_ALIGN;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        assert_eq!(file_name(0x1f), "000000000000001f.seg");
        assert_eq!(parse_file_name("000000000000001f.seg"), Some(0x1f));
        assert_eq!(parse_file_name("000000000000001f.seg.tmp"), None);
        assert_eq!(parse_file_name("1f.seg"), None);
        assert_eq!(parse_file_name("lock"), None);
    }

    #[test]
    fn scan_random_bytes_never_panics() {
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..200 {
            let len = (rng % 4096) as usize;
            let mut buf = Vec::with_capacity(len);
            for _ in 0..len {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                buf.push(rng as u8);
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
}
