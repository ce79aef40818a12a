//! The pure on-disk codec of the queue: record header, message and progress
//! payloads, segment header, and the keyed tag that makes a record valid only
//! where the server wrote it. Works on plain byte slices (no I/O), never panics
//! on untrusted input (every length is bounds-checked), so it can be used by
//! recovery, `list_queue`, benches and fuzz tests alike.
//!
//! Record layout, format 2 (all integers little endian, records 8-byte aligned):
//! ```text
//! 0  magic u32 | 4 kind u8 | 5 version u8 | 6 reserved u16 | 8 payload_len u32 | 12 payload crc32c u32
//! 16 tag u64 | 24 payload[payload_len] | zero padding to a multiple of 8
//! ```
//! The crc32c covers the payload. The tag is SipHash-2-4, keyed with the segment's random 128-bit key (in the
//! segment header, never sent anywhere), over (segment seq, record offset, header bytes 0..16): a record is
//! valid only at the offset of the segment it was written to, and nobody who does not know the key can make
//! bytes that pass as one. Message bodies are stored verbatim inside records, so without the key a client
//! could embed a complete, checksummed record in its message, and recovery, resynchronising after a torn
//! record, would apply it.
//!
//! Format 1 (segments written before the key existed): a 16-byte header whose crc32c covers the header (crc
//! field zeroed) and the payload; no tag. Such segments are read, never appended to, and never resynchronised
//! (see [`super::segment::scan`]).
//!
//! Message payload: id u64, arrival_unix_ms u64, flags u32, n_rcpt u32, then the
//! strings sender, client_addr, client_helo, tls, auth_user (each u32 length +
//! UTF-8 bytes), then n_rcpt times (address string, state), then the Received
//! header (u32 length + bytes) and the data (u32 length + bytes).
//! A state is 13 bytes: tag u8, attempts u32, next_attempt_unix_s u64.
//!
//! After the data, optionally (absent in records written before it, and when the message has no DSN facts), the
//! DSN extension: magic u32 `"DSN1"`, flags u8 (bit 0: the delay warning was sent), ret u8 (0 none, 1 FULL,
//! 2 HDRS), has_envid u8 and the ENVID string (u32 length + bytes, decoded), n u32 (0, or n_rcpt), then n times
//! (notify u8: 0 absent, else the bits SUCCESS 1 | FAILURE 2 | DELAY 4, or NEVER 8; has_orcpt u8, then
//! addr-type and address strings when set).
//!
//! After that, optionally (absent in records written before it, and when the message has no egress pool of its
//! own), the pool extension: magic u32 `"POOL"` and the pool's name (u32 length + bytes: 1 to
//! [`crate::egress::POOL_NAME_BYTES_MAX`] printable ASCII bytes, no space; see [`crate::egress`]). Bytes after the
//! data that are not exactly these extensions, in this order, are refused.
//!
//! Progress payload: id u64, rcpt_index u32, state (13 bytes), time_unix_ms u64,
//! diagnostic string (at most [`limits::QUEUE_DIAGNOSTIC_BYTES_MAX`] bytes).
//!
//! Control payload (a change to a whole message): id u64, op u8 (1 hold, 2 release, 3 delete, 4 delay warning
//! sent),
//! 7 zero bytes, time_unix_ms u64. A control record with an op this version does not know is skipped like a
//! record of an unknown kind.

use std::hash::Hasher as _;

use super::{Envelope, QueueId, RcptState};
use crate::limits;

/// Magic of every record ("SMQR" little endian).
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"SMQR");
/// Size of the record header (format 2).
pub const RECORD_HEADER_LEN: usize = 24;
/// Size of a format-1 record header.
pub const V1_RECORD_HEADER_LEN: usize = 16;
/// Current record format version.
pub const RECORD_VERSION: u8 = 2;
/// Record alignment.
pub const RECORD_ALIGN: usize = 8;
/// Kind of a message record.
pub const KIND_MESSAGE: u8 = 1;
/// Kind of a progress record.
pub const KIND_PROGRESS: u8 = 2;
/// Kind of an epoch mark (queue-id epoch in use from here on).
pub const KIND_EPOCH: u8 = 3;
/// Kind of a control record (hold, release, delete of one message).
pub const KIND_CONTROL: u8 = 4;

/// Magic at the start of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"SHMTASEG";
/// Current segment format version (records of format 2, keyed).
pub const SEGMENT_VERSION: u32 = 2;
/// Size of the segment header; the first record starts here.
pub const SEGMENT_HEADER_LEN: usize = 64;
/// Bytes of the per-segment record key.
pub const SEGMENT_KEY_LEN: usize = 16;

/// How the records of one segment are framed and verified.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum RecordFormat {
    /// Format 1: crc32c over header and payload, no tag (old segments, read only).
    V1,
    /// Format 2: payload crc32c plus a tag keyed with the segment's key, bound to (seq, offset).
    V2(SegmentKey),
}

impl std::fmt::Debug for RecordFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordFormat::V1 => write!(f, "V1"),
            RecordFormat::V2(k) => write!(f, "V2(seq {})", k.seq),
        }
    }
}

impl RecordFormat {
    /// Header length of this format's records.
    pub fn header_len(&self) -> usize {
        match self {
            RecordFormat::V1 => V1_RECORD_HEADER_LEN,
            RecordFormat::V2(_) => RECORD_HEADER_LEN,
        }
    }
}

/// The secret of one segment (random, written in its header) and its sequence number: what a record's tag
/// is keyed with. Not `Debug`: the key is never printed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SegmentKey {
    pub key: [u8; SEGMENT_KEY_LEN],
    pub seq: u64,
}

impl SegmentKey {
    /// The tag of a record whose first 16 header bytes are `header` at `offset` of this segment.
    pub fn tag(&self, offset: u64, header: &[u8]) -> u64 {
        let mut h = siphasher::sip::SipHasher24::new_with_key(&self.key);
        h.write(&self.seq.to_le_bytes());
        h.write(&offset.to_le_bytes());
        h.write(&header[..16]);
        h.finish()
    }
}

/// A fresh random segment key from the kernel (`getrandom(2)`).
pub fn random_key() -> std::io::Result<[u8; SEGMENT_KEY_LEN]> {
    let mut k = [0u8; SEGMENT_KEY_LEN];
    let mut got = 0;
    // Bounded: each round fills at least one byte or is an interrupted call.
    while got < k.len() {
        match rustix::rand::getrandom(&mut k[got..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(k)
}

const MSG_FLAG_SMTPUTF8: u32 = 1;
const MSG_FLAG_8BITMIME: u32 = 2;
const STATE_LEN: usize = 13;
/// Smallest encoding of one recipient: empty address + state.
const MIN_RCPT_LEN: usize = 4 + STATE_LEN;

/// Why a byte range is not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated")]
    Truncated,
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported version {0}")]
    BadVersion(u8),
    #[error("payload length out of bounds")]
    BadLength,
    #[error("checksum mismatch")]
    BadCrc,
    #[error("tag mismatch: not a record written here")]
    BadTag,
    #[error("malformed payload: {0}")]
    BadPayload(&'static str),
}

/// Rounds `n` up to the record alignment.
#[inline]
pub fn align_up(n: u64) -> u64 {
    (n + (RECORD_ALIGN as u64 - 1)) & !(RECORD_ALIGN as u64 - 1)
}

/// A decoded message record, borrowing from the buffer it was decoded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRef<'a> {
    pub id: QueueId,
    pub arrival_unix_ms: u64,
    pub smtputf8: bool,
    pub body_8bitmime: bool,
    pub sender: &'a str,
    pub client_addr: &'a str,
    pub client_helo: &'a str,
    pub tls: &'a str,
    pub auth_user: &'a str,
    pub recipients: Vec<(&'a str, RcptState)>,
    /// The DSN extension (empty when the record has none).
    pub dsn: crate::smtp::dsn::EnvelopeDsn,
    /// The pool extension: the message's egress pool, when it has one of its own.
    pub egress_pool: Option<&'a str>,
    pub received: &'a [u8],
    pub data: &'a [u8],
    /// Offset of `received` from the start of the record.
    pub received_at: usize,
    /// Offset of `data` from the start of the record.
    pub data_at: usize,
}

impl MessageRef<'_> {
    /// Copies the envelope out of the record.
    pub fn envelope(&self) -> Envelope {
        Envelope {
            sender: self.sender.to_string(),
            recipients: self.recipients.iter().map(|(a, _)| a.to_string()).collect(),
            arrival_unix_ms: self.arrival_unix_ms,
            client_addr: self.client_addr.to_string(),
            client_helo: self.client_helo.to_string(),
            tls: self.tls.to_string(),
            auth_user: self.auth_user.to_string(),
            smtputf8: self.smtputf8,
            body_8bitmime: self.body_8bitmime,
            dsn: self.dsn.clone(),
            egress_pool: self.egress_pool.map(str::to_string),
        }
    }
}

/// A decoded progress record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressRef<'a> {
    pub id: QueueId,
    pub rcpt_index: u32,
    pub state: RcptState,
    pub time_unix_ms: u64,
    pub diagnostic: &'a str,
}

/// What a control record does to its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlOp {
    /// Never delivered until released.
    Hold,
    /// No longer held.
    Release,
    /// Gone from the queue, without a bounce.
    Delete,
    /// The message's delay warning (RFC 3464 "delayed") was queued: never another one.
    DelayWarned,
}

impl ControlOp {
    fn code(self) -> u8 {
        match self {
            ControlOp::Hold => 1,
            ControlOp::Release => 2,
            ControlOp::Delete => 3,
            ControlOp::DelayWarned => 4,
        }
    }

    fn from_code(c: u8) -> Option<ControlOp> {
        Some(match c {
            1 => ControlOp::Hold,
            2 => ControlOp::Release,
            3 => ControlOp::Delete,
            4 => ControlOp::DelayWarned,
            _ => return None,
        })
    }
}

/// A decoded control record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlRef {
    pub id: QueueId,
    pub op: ControlOp,
    pub time_unix_ms: u64,
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    Message(MessageRef<'a>),
    Progress(ProgressRef<'a>),
    Control(ControlRef),
    /// The queue-id epoch the store started using (written at open, so ids
    /// are never reused even if no message was written in that epoch).
    Epoch {
        epoch: u32,
    },
    /// A valid record of a kind this version does not know (skipped).
    Unknown {
        kind: u8,
    },
}

// ---------------------------------------------------------------- encoding

/// Little-endian writer over a slice whose size was computed beforehand.
/// Out-of-bounds writes are programming errors (the caller sized the buffer),
/// so plain slice indexing is used.
struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl Writer<'_> {
    #[inline]
    fn bytes(&mut self, b: &[u8]) {
        self.buf[self.pos..self.pos + b.len()].copy_from_slice(b);
        self.pos += b.len();
    }
    #[inline]
    fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }
    #[inline]
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    #[inline]
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    #[inline]
    fn blob(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.bytes(b);
    }
    fn state(&mut self, s: RcptState) {
        let (tag, attempts, next) = match s {
            RcptState::Pending => (0u8, 0u32, 0u64),
            RcptState::Deferred {
                next_attempt_unix_s,
                attempts,
            } => (1, attempts, next_attempt_unix_s),
            RcptState::Delivered => (2, 0, 0),
            RcptState::Bounced => (3, 0, 0),
        };
        self.u8(tag);
        self.u32(attempts);
        self.u64(next);
    }
}

/// Payload length of a message record, or None if a field exceeds u32.
pub fn message_payload_len(env: &Envelope, received_len: usize, data_len: usize) -> Option<u64> {
    let mut n: u64 = 8 + 8 + 4 + 4;
    for s in [
        &env.sender,
        &env.client_addr,
        &env.client_helo,
        &env.tls,
        &env.auth_user,
    ] {
        if s.len() > u32::MAX as usize {
            return None;
        }
        n += 4 + s.len() as u64;
    }
    if env.recipients.len() > u32::MAX as usize {
        return None;
    }
    for r in &env.recipients {
        if r.len() > u32::MAX as usize {
            return None;
        }
        n += 4 + r.len() as u64 + STATE_LEN as u64;
    }
    if received_len > u32::MAX as usize || data_len > u32::MAX as usize {
        return None;
    }
    n += 4 + received_len as u64 + 4 + data_len as u64;
    n += dsn_ext_len(env)?;
    n += pool_ext_len(env)?;
    if n > u32::MAX as u64 {
        return None;
    }
    Some(n)
}

const DSN_EXT_MAGIC: u32 = u32::from_le_bytes(*b"DSN1");
const POOL_EXT_MAGIC: u32 = u32::from_le_bytes(*b"POOL");

/// Bytes of the pool extension (0 without a pool), or None if the name exceeds u32.
fn pool_ext_len(env: &Envelope) -> Option<u64> {
    match &env.egress_pool {
        None => Some(0),
        Some(p) => (p.len() <= u32::MAX as usize).then_some(4 + 4 + p.len() as u64),
    }
}

/// The recipients' DSN entries the extension holds: none when no recipient has any, else one per recipient.
fn dsn_rcpt_count(env: &Envelope) -> usize {
    if env.dsn.rcpts.iter().all(|r| r.is_empty()) {
        0
    } else {
        env.recipients.len()
    }
}

/// Bytes of the DSN extension (0 when there is nothing to store), or None if a field exceeds u32.
fn dsn_ext_len(env: &Envelope) -> Option<u64> {
    let d = &env.dsn;
    if d.is_empty() {
        return Some(0);
    }
    let s = |x: &str| (x.len() <= u32::MAX as usize).then_some(4 + x.len() as u64);
    let mut n = 4 + 1 + 1 + 1 + s(d.envid.as_deref().unwrap_or(""))? + 4;
    for i in 0..dsn_rcpt_count(env) {
        n += 2;
        if let Some(o) = d.rcpts.get(i).and_then(|r| r.orcpt.as_ref()) {
            n += s(&o.addr_type)? + s(&o.address)?;
        }
    }
    Some(n)
}

/// Total (aligned) length of a message record; `u64::MAX` if unencodable.
pub fn message_record_len(env: &Envelope, received_len: usize, data_len: usize) -> u64 {
    match message_payload_len(env, received_len, data_len) {
        Some(p) => align_up(RECORD_HEADER_LEN as u64 + p),
        None => u64::MAX,
    }
}

/// Truncates a diagnostic to [`limits::QUEUE_DIAGNOSTIC_BYTES_MAX`] bytes at a char boundary.
pub fn clamp_diagnostic(diag: &str) -> &str {
    if diag.len() <= limits::QUEUE_DIAGNOSTIC_BYTES_MAX {
        return diag;
    }
    let mut end = limits::QUEUE_DIAGNOSTIC_BYTES_MAX;
    while end > 0 && !diag.is_char_boundary(end) {
        end -= 1;
    }
    &diag[..end]
}

/// Total (aligned) length of a progress record with this diagnostic.
pub fn progress_record_len(diagnostic: &str) -> u64 {
    let d = clamp_diagnostic(diagnostic).len() as u64;
    align_up(RECORD_HEADER_LEN as u64 + 8 + 4 + STATE_LEN as u64 + 8 + 4 + d)
}

/// Writes the format-2 header of a record whose payload is already in place (tag left zero: see [`seal`]).
fn finish_record(buf: &mut [u8], kind: u8, payload_len: usize) -> usize {
    let total = align_up((RECORD_HEADER_LEN + payload_len) as u64) as usize;
    buf[RECORD_HEADER_LEN + payload_len..total].fill(0);
    buf[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    buf[4] = kind;
    buf[5] = RECORD_VERSION;
    buf[6..8].fill(0);
    buf[8..12].copy_from_slice(&(payload_len as u32).to_le_bytes());
    let crc = crc32c::crc32c(&buf[RECORD_HEADER_LEN..RECORD_HEADER_LEN + payload_len]);
    buf[12..16].copy_from_slice(&crc.to_le_bytes());
    buf[16..24].fill(0);
    total
}

/// Signs an encoded record for its place: `offset` in the segment `key` belongs to. Done by the segment at
/// append time, when the offset is known.
pub fn seal(buf: &mut [u8], key: &SegmentKey, offset: u64) {
    let tag = key.tag(offset, &buf[..16]);
    buf[16..24].copy_from_slice(&tag.to_le_bytes());
}

/// crc32c of a format-1 record: header with the crc field zeroed, then the payload.
fn v1_record_crc(header: &[u8], payload: &[u8]) -> u32 {
    let mut h = [0u8; V1_RECORD_HEADER_LEN];
    h.copy_from_slice(&header[..V1_RECORD_HEADER_LEN]);
    h[12..16].fill(0);
    crc32c::crc32c_append(crc32c::crc32c(&h), payload)
}

/// Encodes a message record into `buf` (which must hold at least
/// [`message_record_len`] bytes) and returns the bytes written (aligned).
/// `states` gives the state of each recipient (same length as
/// `env.recipients`). The data is copied straight from `data` into `buf`.
pub fn encode_message(
    buf: &mut [u8],
    id: QueueId,
    env: &Envelope,
    states: &[RcptState],
    received: &[u8],
    data: &[u8],
) -> usize {
    debug_assert_eq!(states.len(), env.recipients.len());
    let payload_len = message_payload_len(env, received.len(), data.len())
        .expect("caller checked message_record_len") as usize;
    let mut w = Writer {
        buf: &mut buf[RECORD_HEADER_LEN..RECORD_HEADER_LEN + payload_len],
        pos: 0,
    };
    w.u64(id.0);
    w.u64(env.arrival_unix_ms);
    let mut flags = 0;
    if env.smtputf8 {
        flags |= MSG_FLAG_SMTPUTF8;
    }
    if env.body_8bitmime {
        flags |= MSG_FLAG_8BITMIME;
    }
    w.u32(flags);
    w.u32(env.recipients.len() as u32);
    w.blob(env.sender.as_bytes());
    w.blob(env.client_addr.as_bytes());
    w.blob(env.client_helo.as_bytes());
    w.blob(env.tls.as_bytes());
    w.blob(env.auth_user.as_bytes());
    for (i, r) in env.recipients.iter().enumerate() {
        w.blob(r.as_bytes());
        w.state(states.get(i).copied().unwrap_or(RcptState::Pending));
    }
    w.blob(received);
    w.blob(data);
    let d = &env.dsn;
    if !d.is_empty() {
        w.u32(DSN_EXT_MAGIC);
        w.u8(u8::from(d.delay_warned));
        w.u8(match d.ret {
            None => 0,
            Some(crate::smtp::dsn::Ret::Full) => 1,
            Some(crate::smtp::dsn::Ret::Hdrs) => 2,
        });
        w.u8(u8::from(d.envid.is_some()));
        w.blob(d.envid.as_deref().unwrap_or("").as_bytes());
        let n = dsn_rcpt_count(env);
        w.u32(n as u32);
        for i in 0..n {
            let r = d.rcpt_ref(i);
            w.u8(r.notify.map_or(0, |n| n.bits()));
            w.u8(u8::from(r.orcpt.is_some()));
            if let Some(o) = &r.orcpt {
                w.blob(o.addr_type.as_bytes());
                w.blob(o.address.as_bytes());
            }
        }
    }
    if let Some(p) = &env.egress_pool {
        w.u32(POOL_EXT_MAGIC);
        w.blob(p.as_bytes());
    }
    debug_assert_eq!(w.pos, payload_len);
    finish_record(buf, KIND_MESSAGE, payload_len)
}

/// Encodes a progress record into `buf` (at least [`progress_record_len`]
/// bytes) and returns the bytes written (aligned). The diagnostic is
/// truncated to [`limits::QUEUE_DIAGNOSTIC_BYTES_MAX`] bytes.
pub fn encode_progress(
    buf: &mut [u8],
    id: QueueId,
    rcpt_index: u32,
    state: RcptState,
    time_unix_ms: u64,
    diagnostic: &str,
) -> usize {
    let diag = clamp_diagnostic(diagnostic);
    let payload_len = 8 + 4 + STATE_LEN + 8 + 4 + diag.len();
    let mut w = Writer {
        buf: &mut buf[RECORD_HEADER_LEN..RECORD_HEADER_LEN + payload_len],
        pos: 0,
    };
    w.u64(id.0);
    w.u32(rcpt_index);
    w.state(state);
    w.u64(time_unix_ms);
    w.blob(diag.as_bytes());
    debug_assert_eq!(w.pos, payload_len);
    finish_record(buf, KIND_PROGRESS, payload_len)
}

/// Payload length of a control record.
const CONTROL_PAYLOAD_LEN: usize = 24;
/// Total length of a control record.
pub const CONTROL_RECORD_LEN: u64 = (RECORD_HEADER_LEN + CONTROL_PAYLOAD_LEN) as u64;

/// Encodes a control record into `buf` (at least [`CONTROL_RECORD_LEN`] bytes).
pub fn encode_control(buf: &mut [u8], id: QueueId, op: ControlOp, time_unix_ms: u64) -> usize {
    let mut w = Writer {
        buf: &mut buf[RECORD_HEADER_LEN..RECORD_HEADER_LEN + CONTROL_PAYLOAD_LEN],
        pos: 0,
    };
    w.u64(id.0);
    w.bytes(&[op.code(), 0, 0, 0, 0, 0, 0, 0]);
    w.u64(time_unix_ms);
    debug_assert_eq!(w.pos, CONTROL_PAYLOAD_LEN);
    finish_record(buf, KIND_CONTROL, CONTROL_PAYLOAD_LEN)
}

/// Total length of an epoch mark record.
pub const EPOCH_RECORD_LEN: u64 = (RECORD_HEADER_LEN + 8) as u64;

/// Encodes an epoch mark into `buf` (at least [`EPOCH_RECORD_LEN`] bytes).
pub fn encode_epoch(buf: &mut [u8], epoch: u32) -> usize {
    buf[RECORD_HEADER_LEN..RECORD_HEADER_LEN + 4].copy_from_slice(&epoch.to_le_bytes());
    buf[RECORD_HEADER_LEN + 4..RECORD_HEADER_LEN + 8].fill(0);
    finish_record(buf, KIND_EPOCH, 8)
}

// ---------------------------------------------------------------- decoding

/// Bounds-checked little-endian reader.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::BadLength)?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(DecodeError::BadPayload("field past payload end"))?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn blob(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn str(&mut self) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.blob()?)
            .map_err(|_| DecodeError::BadPayload("string is not UTF-8"))
    }
    fn state(&mut self) -> Result<RcptState, DecodeError> {
        let tag = self.u8()?;
        let attempts = self.u32()?;
        let next = self.u64()?;
        match tag {
            0 => Ok(RcptState::Pending),
            1 => Ok(RcptState::Deferred {
                next_attempt_unix_s: next,
                attempts,
            }),
            2 => Ok(RcptState::Delivered),
            3 => Ok(RcptState::Bounced),
            _ => Err(DecodeError::BadPayload("unknown recipient state")),
        }
    }
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }
    /// The next u32, not consumed.
    fn peek_u32(&self) -> Option<u32> {
        let b = self.buf.get(self.pos..self.pos.checked_add(4)?)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

fn rd_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn rd_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Checks the record at the start of `buf`, found at `offset` of a segment of format `fmt`: magic, version,
/// payload length within `buf`, tag (format 2) and checksum. Returns (kind, payload length, total aligned
/// length). The total may exceed `buf` only by alignment padding (which is then absent, e.g. at the very end
/// of a segment); callers advance by it. Cost: constant until the tag matches, then one pass over the
/// payload, so scanning attacker-made bytes for records is linear.
pub fn check_record(
    buf: &[u8],
    fmt: &RecordFormat,
    offset: u64,
) -> Result<(u8, usize, usize), DecodeError> {
    let hlen = fmt.header_len();
    if buf.len() < hlen {
        return Err(DecodeError::Truncated);
    }
    if rd_u32(buf, 0) != RECORD_MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let version = buf[5];
    let want = match fmt {
        RecordFormat::V1 => 1,
        RecordFormat::V2(_) => RECORD_VERSION,
    };
    if version != want {
        return Err(DecodeError::BadVersion(version));
    }
    let payload_len = rd_u32(buf, 8) as usize;
    let end = hlen
        .checked_add(payload_len)
        .ok_or(DecodeError::BadLength)?;
    let stored = rd_u32(buf, 12);
    match fmt {
        RecordFormat::V2(key) => {
            if key.tag(offset, &buf[..16]) != rd_u64(buf, 16) {
                return Err(DecodeError::BadTag);
            }
            if end > buf.len() {
                return Err(DecodeError::BadLength);
            }
            if crc32c::crc32c(&buf[hlen..end]) != stored {
                return Err(DecodeError::BadCrc);
            }
        }
        RecordFormat::V1 => {
            if end > buf.len() {
                return Err(DecodeError::BadLength);
            }
            if v1_record_crc(&buf[..hlen], &buf[hlen..end]) != stored {
                return Err(DecodeError::BadCrc);
            }
        }
    }
    Ok((buf[4], payload_len, align_up(end as u64) as usize))
}

/// Verifies the framing of the record at the start of `buf` (found at `offset` of a segment of format `fmt`):
/// magic, version, length within `buf`, and in format 2 the keyed tag for `offset`, without reading the
/// payload (no crc), so it is cheap enough for every record right before it is written. Returns the record's
/// total aligned length.
pub fn check_header(buf: &[u8], fmt: &RecordFormat, offset: u64) -> Result<usize, DecodeError> {
    let hlen = fmt.header_len();
    if buf.len() < hlen {
        return Err(DecodeError::Truncated);
    }
    if rd_u32(buf, 0) != RECORD_MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let want = match fmt {
        RecordFormat::V1 => 1,
        RecordFormat::V2(_) => RECORD_VERSION,
    };
    if buf[5] != want {
        return Err(DecodeError::BadVersion(buf[5]));
    }
    if let RecordFormat::V2(key) = fmt {
        if key.tag(offset, &buf[..16]) != rd_u64(buf, 16) {
            return Err(DecodeError::BadTag);
        }
    }
    let total = align_up((hlen as u64).saturating_add(rd_u32(buf, 8) as u64));
    if total > buf.len() as u64 {
        return Err(DecodeError::BadLength);
    }
    Ok(total as usize)
}

/// Decodes and verifies the record at the start of `buf` (found at `offset` of a segment of format `fmt`).
/// Returns the record and its total aligned length. Field offsets in the result are from the record start.
pub fn decode_record<'a>(
    buf: &'a [u8],
    fmt: &RecordFormat,
    offset: u64,
) -> Result<(Record<'a>, usize), DecodeError> {
    let (kind, payload_len, total) = check_record(buf, fmt, offset)?;
    let hlen = fmt.header_len();
    let payload = &buf[hlen..hlen + payload_len];
    let rec = match kind {
        KIND_MESSAGE => Record::Message(decode_message_payload(payload, hlen)?),
        KIND_PROGRESS => Record::Progress(decode_progress_payload(payload)?),
        KIND_EPOCH => {
            if payload.len() != 8 {
                return Err(DecodeError::BadPayload("epoch mark length"));
            }
            Record::Epoch {
                epoch: rd_u32(payload, 0),
            }
        }
        KIND_CONTROL => {
            if payload.len() != CONTROL_PAYLOAD_LEN {
                return Err(DecodeError::BadPayload("control record length"));
            }
            match ControlOp::from_code(payload[8]) {
                Some(op) => Record::Control(ControlRef {
                    id: QueueId(rd_u64(payload, 0)),
                    op,
                    time_unix_ms: rd_u64(payload, 16),
                }),
                None => Record::Unknown { kind: KIND_CONTROL },
            }
        }
        other => Record::Unknown { kind: other },
    };
    Ok((rec, total))
}

fn decode_message_payload(payload: &[u8], hlen: usize) -> Result<MessageRef<'_>, DecodeError> {
    let mut r = Reader {
        buf: payload,
        pos: 0,
    };
    let id = QueueId(r.u64()?);
    let arrival_unix_ms = r.u64()?;
    let flags = r.u32()?;
    let n_rcpt = r.u32()? as usize;
    let sender = r.str()?;
    let client_addr = r.str()?;
    let client_helo = r.str()?;
    let tls = r.str()?;
    let auth_user = r.str()?;
    // Bound the allocation by what the payload can actually hold.
    if n_rcpt > r.remaining() / MIN_RCPT_LEN {
        return Err(DecodeError::BadPayload("recipient count exceeds payload"));
    }
    let mut recipients = Vec::with_capacity(n_rcpt);
    for _ in 0..n_rcpt {
        let a = r.str()?;
        let s = r.state()?;
        recipients.push((a, s));
    }
    let received = r.blob()?;
    let received_at = hlen + r.pos - received.len();
    let data = r.blob()?;
    let data_at = hlen + r.pos - data.len();
    let dsn = if r.remaining() == 0 || r.peek_u32() != Some(DSN_EXT_MAGIC) {
        crate::smtp::dsn::EnvelopeDsn::default()
    } else {
        decode_dsn_ext(&mut r, n_rcpt)?
    };
    let egress_pool = if r.remaining() == 0 {
        None
    } else {
        Some(decode_pool_ext(&mut r)?)
    };
    if r.remaining() != 0 {
        return Err(DecodeError::BadPayload("trailing bytes in message"));
    }
    Ok(MessageRef {
        id,
        arrival_unix_ms,
        smtputf8: flags & MSG_FLAG_SMTPUTF8 != 0,
        body_8bitmime: flags & MSG_FLAG_8BITMIME != 0,
        sender,
        client_addr,
        client_helo,
        tls,
        auth_user,
        recipients,
        dsn,
        egress_pool,
        received,
        data,
        received_at,
        data_at,
    })
}

/// The DSN extension after a message's data (see the module's doc).
fn decode_dsn_ext(
    r: &mut Reader<'_>,
    n_rcpt: usize,
) -> Result<crate::smtp::dsn::EnvelopeDsn, DecodeError> {
    use crate::smtp::dsn::{EnvelopeDsn, Notify, Orcpt, RcptDsn, Ret};
    if r.u32()? != DSN_EXT_MAGIC {
        return Err(DecodeError::BadPayload("trailing bytes in message"));
    }
    let flags = r.u8()?;
    if flags > 1 {
        return Err(DecodeError::BadPayload("unknown DSN flags"));
    }
    let ret = match r.u8()? {
        0 => None,
        1 => Some(Ret::Full),
        2 => Some(Ret::Hdrs),
        _ => return Err(DecodeError::BadPayload("unknown DSN RET value")),
    };
    let has_envid = flag(r.u8()?)?;
    let envid = r.str()?;
    if !has_envid && !envid.is_empty() {
        return Err(DecodeError::BadPayload("DSN ENVID without its flag"));
    }
    let n = r.u32()? as usize;
    if n != 0 && n != n_rcpt {
        return Err(DecodeError::BadPayload("DSN recipient count"));
    }
    let mut rcpts = Vec::with_capacity(n.min(r.remaining() / 2));
    for _ in 0..n {
        let notify = match r.u8()? {
            0 => None,
            b => Some(
                Notify::from_bits(b).ok_or(DecodeError::BadPayload("unknown DSN NOTIFY value"))?,
            ),
        };
        let orcpt = if flag(r.u8()?)? {
            Some(Orcpt {
                addr_type: r.str()?.to_string(),
                address: r.str()?.to_string(),
            })
        } else {
            None
        };
        rcpts.push(RcptDsn { notify, orcpt });
    }
    let d = EnvelopeDsn {
        ret,
        envid: has_envid.then(|| envid.to_string()),
        rcpts,
        delay_warned: flags & 1 != 0,
    };
    // Only the encoder's own (canonical) form is accepted: what decodes encodes back to the same bytes.
    if d.is_empty() || (n != 0 && d.rcpts.iter().all(RcptDsn::is_empty)) {
        return Err(DecodeError::BadPayload("empty DSN extension"));
    }
    Ok(d)
}

/// The pool extension (see the module's doc): only a name the configuration could hold is accepted.
fn decode_pool_ext<'a>(r: &mut Reader<'a>) -> Result<&'a str, DecodeError> {
    if r.u32()? != POOL_EXT_MAGIC {
        return Err(DecodeError::BadPayload("trailing bytes in message"));
    }
    let name = r.str()?;
    if !crate::egress::valid_pool_name(name) {
        return Err(DecodeError::BadPayload("bad egress pool name"));
    }
    Ok(name)
}

fn flag(b: u8) -> Result<bool, DecodeError> {
    match b {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(DecodeError::BadPayload("DSN flag not 0 or 1")),
    }
}

fn decode_progress_payload(payload: &[u8]) -> Result<ProgressRef<'_>, DecodeError> {
    let mut r = Reader {
        buf: payload,
        pos: 0,
    };
    let id = QueueId(r.u64()?);
    let rcpt_index = r.u32()?;
    let state = r.state()?;
    let time_unix_ms = r.u64()?;
    let diagnostic = r.str()?;
    if r.remaining() != 0 {
        return Err(DecodeError::BadPayload("trailing bytes in progress"));
    }
    Ok(ProgressRef {
        id,
        rcpt_index,
        state,
        time_unix_ms,
        diagnostic,
    })
}

// ---------------------------------------------------------------- segment header

/// The header at the start of every segment file.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub shard: u8,
    pub seq: u64,
    pub created_unix_ms: u64,
    /// Size the segment was created with.
    pub segment_size: u64,
    /// Highest queue-id epoch in use when the segment was created, so ids
    /// stay unique across restarts even after older segments are deleted.
    pub id_epoch: u32,
    /// The segment's record key (format 2); `None` for a format-1 segment.
    pub key: Option<[u8; SEGMENT_KEY_LEN]>,
}

impl std::fmt::Debug for SegmentHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentHeader")
            .field("shard", &self.shard)
            .field("seq", &self.seq)
            .field("created_unix_ms", &self.created_unix_ms)
            .field("segment_size", &self.segment_size)
            .field("id_epoch", &self.id_epoch)
            .field("keyed", &self.key.is_some())
            .finish()
    }
}

impl SegmentHeader {
    /// How this segment's records are framed.
    pub fn format(&self) -> RecordFormat {
        match self.key {
            Some(key) => RecordFormat::V2(SegmentKey { key, seq: self.seq }),
            None => RecordFormat::V1,
        }
    }
}

/// Encodes a format-2 segment header into the first [`SEGMENT_HEADER_LEN`] bytes of `buf`.
///
/// Layout: magic [8], version u32 (2), shard u32, seq u64, created_unix_ms u64, segment_size u64,
/// id_epoch u32, key [16], crc32c u32 over bytes 0..60. (Format 1: no key, crc32c at 44 over 0..44.)
/// A header without a key is written as format 1 (tests of the upgrade path only).
pub fn encode_segment_header(buf: &mut [u8], h: &SegmentHeader) {
    let b = &mut buf[..SEGMENT_HEADER_LEN];
    b.fill(0);
    b[0..8].copy_from_slice(&SEGMENT_MAGIC);
    let version: u32 = if h.key.is_some() { SEGMENT_VERSION } else { 1 };
    b[8..12].copy_from_slice(&version.to_le_bytes());
    b[12..16].copy_from_slice(&(h.shard as u32).to_le_bytes());
    b[16..24].copy_from_slice(&h.seq.to_le_bytes());
    b[24..32].copy_from_slice(&h.created_unix_ms.to_le_bytes());
    b[32..40].copy_from_slice(&h.segment_size.to_le_bytes());
    b[40..44].copy_from_slice(&h.id_epoch.to_le_bytes());
    match &h.key {
        Some(key) => {
            b[44..60].copy_from_slice(key);
            let crc = crc32c::crc32c(&b[0..60]);
            b[60..64].copy_from_slice(&crc.to_le_bytes());
        }
        None => {
            let crc = crc32c::crc32c(&b[0..44]);
            b[44..48].copy_from_slice(&crc.to_le_bytes());
        }
    }
}

/// Decodes and verifies a segment header (format 1 or 2).
pub fn decode_segment_header(buf: &[u8]) -> Result<SegmentHeader, DecodeError> {
    let b = buf
        .get(..SEGMENT_HEADER_LEN)
        .ok_or(DecodeError::Truncated)?;
    if b[0..8] != SEGMENT_MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let version = rd_u32(b, 8);
    let key = match version {
        1 => {
            if crc32c::crc32c(&b[0..44]) != rd_u32(b, 44) {
                return Err(DecodeError::BadCrc);
            }
            None
        }
        SEGMENT_VERSION => {
            if crc32c::crc32c(&b[0..60]) != rd_u32(b, 60) {
                return Err(DecodeError::BadCrc);
            }
            let mut k = [0u8; SEGMENT_KEY_LEN];
            k.copy_from_slice(&b[44..60]);
            Some(k)
        }
        v => return Err(DecodeError::BadVersion(v.min(255) as u8)),
    };
    Ok(SegmentHeader {
        shard: rd_u32(b, 12) as u8,
        seq: rd_u64(b, 16),
        created_unix_ms: rd_u64(b, 24),
        segment_size: rd_u64(b, 32),
        id_epoch: rd_u32(b, 40),
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample_env() -> Envelope {
        Envelope {
            egress_pool: None,
            sender: "alice@example.org".into(),
            recipients: vec!["bob@example.com".into(), "carol@exämple.net".into()],
            arrival_unix_ms: 1_700_000_000_123,
            client_addr: "192.0.2.7:53211".into(),
            client_helo: "mx.example.org".into(),
            tls: "TLSv1.3 TLS_AES_128_GCM_SHA256".into(),
            auth_user: String::new(),
            smtputf8: true,
            body_8bitmime: false,
            dsn: Default::default(),
        }
    }

    const KEY: SegmentKey = SegmentKey {
        key: *b"0123456789abcdef",
        seq: 7,
    };
    const FMT: RecordFormat = RecordFormat::V2(KEY);

    #[test]
    fn record_codec_round_trip() {
        let env = sample_env();
        let states = [
            RcptState::Pending,
            RcptState::Deferred {
                next_attempt_unix_s: 1_700_000_600,
                attempts: 3,
            },
        ];
        let received = b"Received: from mx.example.org\r\n";
        let data = b"Subject: hi\r\n\r\nhello\r\n.\r\n";
        let len = message_record_len(&env, received.len(), data.len()) as usize;
        assert_eq!(len % RECORD_ALIGN, 0);
        let mut buf = vec![0xAAu8; len + 32];
        let n = encode_message(&mut buf, QueueId(42), &env, &states, received, data);
        assert_eq!(n, len);
        seal(&mut buf, &KEY, 4096);
        let (rec, total) = decode_record(&buf, &FMT, 4096).unwrap();
        assert_eq!(total, len);
        let Record::Message(m) = rec else {
            panic!("not a message")
        };
        assert_eq!(m.id, QueueId(42));
        assert_eq!(m.envelope(), env);
        assert_eq!(m.recipients[1].1, states[1]);
        assert_eq!(m.received, received);
        assert_eq!(m.data, data);
        assert_eq!(&buf[m.data_at..m.data_at + data.len()], data);
        assert_eq!(
            &buf[m.received_at..m.received_at + received.len()],
            received
        );
        // Valid only where it was written: another offset, segment or key rejects it.
        assert_eq!(decode_record(&buf, &FMT, 4104), Err(DecodeError::BadTag));
        let other_seq = RecordFormat::V2(SegmentKey { seq: 8, ..KEY });
        assert_eq!(
            decode_record(&buf, &other_seq, 4096),
            Err(DecodeError::BadTag)
        );
        let other_key = RecordFormat::V2(SegmentKey {
            key: *b"0123456789abcdeX",
            ..KEY
        });
        assert_eq!(
            decode_record(&buf, &other_key, 4096),
            Err(DecodeError::BadTag)
        );

        let diag = "451 4.7.1 try later ".repeat(40);
        let plen = progress_record_len(&diag) as usize;
        let mut pbuf = vec![0u8; plen];
        let n = encode_progress(&mut pbuf, QueueId(42), 1, RcptState::Bounced, 77, &diag);
        assert_eq!(n, plen);
        seal(&mut pbuf, &KEY, 64);
        let (rec, total) = decode_record(&pbuf, &FMT, 64).unwrap();
        assert_eq!(total, plen);
        assert_eq!(
            rec,
            Record::Progress(ProgressRef {
                id: QueueId(42),
                rcpt_index: 1,
                state: RcptState::Bounced,
                time_unix_ms: 77,
                diagnostic: &diag[..limits::QUEUE_DIAGNOSTIC_BYTES_MAX],
            })
        );

        // Any single bit flip is detected.
        let covered = RECORD_HEADER_LEN + rd_u32(&buf, 8) as usize;
        for i in 0..covered {
            let mut b = buf.clone();
            b[i] ^= 0x10;
            assert!(
                decode_record(&b[..len], &FMT, 4096).is_err(),
                "flip at {i} undetected"
            );
        }

        let h = SegmentHeader {
            shard: 3,
            seq: 9,
            created_unix_ms: 5,
            segment_size: 1 << 20,
            id_epoch: 1234,
            key: Some(*b"fedcba9876543210"),
        };
        let mut hb = [0u8; SEGMENT_HEADER_LEN];
        encode_segment_header(&mut hb, &h);
        assert_eq!(decode_segment_header(&hb).unwrap(), h);
        hb[50] ^= 1;
        assert!(decode_segment_header(&hb).is_err());
        let old = SegmentHeader { key: None, ..h };
        encode_segment_header(&mut hb, &old);
        assert_eq!(decode_segment_header(&hb).unwrap(), old);
        assert_eq!(
            decode_segment_header(&hb).unwrap().format(),
            RecordFormat::V1
        );
    }

    /// A format-1 record (written by an older version) still decodes in a format-1 segment.
    #[test]
    fn format_1_records_decode() {
        let data = b"Subject: old\r\n\r\nbody\r\n";
        let env = sample_env();
        let mut buf = vec![0u8; message_record_len(&env, 0, data.len()) as usize];
        let n = encode_message(
            &mut buf,
            QueueId(5),
            &env,
            &[RcptState::Pending; 2],
            b"",
            data,
        );
        // Re-frame the payload as format 1: 16-byte header, crc over header and payload.
        let payload = buf[RECORD_HEADER_LEN..RECORD_HEADER_LEN + rd_u32(&buf, 8) as usize].to_vec();
        let mut v1 = vec![0u8; align_up((V1_RECORD_HEADER_LEN + payload.len()) as u64) as usize];
        v1[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        v1[4] = KIND_MESSAGE;
        v1[5] = 1;
        v1[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        v1[16..16 + payload.len()].copy_from_slice(&payload);
        let crc = v1_record_crc(&v1[..16], &payload);
        v1[12..16].copy_from_slice(&crc.to_le_bytes());
        assert!(n > v1.len());
        let (rec, total) = decode_record(&v1, &RecordFormat::V1, 64).unwrap();
        assert_eq!(total, v1.len());
        let Record::Message(m) = rec else {
            panic!("not a message")
        };
        assert_eq!(m.data, data);
        assert_eq!(&v1[m.data_at..m.data_at + data.len()], data);
        // A format-1 record is not valid in a keyed segment, nor a keyed one in a format-1 segment.
        assert!(decode_record(&v1, &FMT, 64).is_err());
        seal(&mut buf, &KEY, 64);
        assert!(decode_record(&buf, &RecordFormat::V1, 64).is_err());
    }

    /// The DSN extension round-trips; a message without one encodes exactly as before (no extension bytes), so
    /// records written by older versions (which never have it) decode with empty DSN facts.
    #[test]
    fn dsn_extension_round_trip() {
        use crate::smtp::dsn::{EnvelopeDsn, Notify, Orcpt, RcptDsn, Ret};
        let plain = sample_env();
        let mut env = sample_env();
        env.dsn = EnvelopeDsn {
            ret: Some(Ret::Hdrs),
            envid: Some("QQ 314".into()),
            rcpts: vec![
                RcptDsn {
                    notify: Notify::parse("SUCCESS,DELAY").ok(),
                    orcpt: Some(Orcpt {
                        addr_type: "rfc822".into(),
                        address: "Bob@Example.com".into(),
                    }),
                },
                RcptDsn::default(),
            ],
            delay_warned: true,
        };
        let data = b"Subject: x\r\n\r\nbody\r\n";
        for (e, extra) in [(&plain, false), (&env, true)] {
            let len = message_record_len(e, 0, data.len()) as usize;
            let mut buf = vec![0u8; len];
            encode_message(&mut buf, QueueId(9), e, &[RcptState::Pending; 2], b"", data);
            seal(&mut buf, &KEY, 64);
            let (rec, _) = decode_record(&buf, &FMT, 64).unwrap();
            let Record::Message(m) = rec else {
                panic!("not a message")
            };
            assert_eq!(&m.envelope(), e);
            assert_eq!(m.data, data);
            // Without DSN facts the payload ends with the data, as in format-2 records of older versions.
            let plen = rd_u32(&buf, 8) as usize;
            assert_eq!(m.data_at + data.len() == RECORD_HEADER_LEN + plen, !extra);
        }
        // Only NOTIFY on one recipient: the other gets an empty entry, the count matches the recipients.
        let mut one = sample_env();
        one.dsn.rcpts = vec![RcptDsn {
            notify: Notify::parse("NEVER").ok(),
            orcpt: None,
        }];
        let mut buf = vec![0u8; message_record_len(&one, 0, 1) as usize];
        encode_message(
            &mut buf,
            QueueId(9),
            &one,
            &[RcptState::Pending; 2],
            b"",
            b"x",
        );
        seal(&mut buf, &KEY, 64);
        let Ok((Record::Message(m), _)) = decode_record(&buf, &FMT, 64) else {
            panic!()
        };
        assert_eq!(m.dsn.rcpts.len(), 2);
        assert!(m.dsn.rcpt(0).notify.unwrap().never());
        assert!(m.dsn.rcpt(1).is_empty());
        // Any byte of the extension changed (checksum and tag made right again): never a panic, and whatever
        // still decodes encodes back to the same length and value (the fuzz target's invariant).
        let len = message_record_len(&env, 0, data.len()) as usize;
        let mut valid = vec![0u8; len];
        encode_message(
            &mut valid,
            QueueId(9),
            &env,
            &[RcptState::Pending; 2],
            b"",
            data,
        );
        let plen = rd_u32(&valid, 8) as usize;
        let ext_start = RECORD_HEADER_LEN + plen - (dsn_ext_len(&env).unwrap() as usize);
        for i in ext_start..RECORD_HEADER_LEN + plen {
            for v in [0u8, 1, 2, 3, 8, 9, 0xff] {
                let mut m = valid.clone();
                m[i] = v;
                let crc = crc32c::crc32c(&m[RECORD_HEADER_LEN..RECORD_HEADER_LEN + plen]);
                m[12..16].copy_from_slice(&crc.to_le_bytes());
                seal(&mut m, &KEY, 64);
                if let Ok((Record::Message(d), total)) = decode_record(&m, &FMT, 64) {
                    let e2 = d.envelope();
                    assert_eq!(message_record_len(&e2, 0, d.data.len()) as usize, total);
                }
            }
        }
        // Garbage after the data is still refused.
        let mut bad = vec![0u8; message_record_len(&plain, 0, 1) as usize + 8];
        encode_message(
            &mut bad,
            QueueId(9),
            &plain,
            &[RcptState::Pending; 2],
            b"",
            b"x",
        );
        let plen = rd_u32(&bad, 8) as usize + 4;
        bad[8..12].copy_from_slice(&(plen as u32).to_le_bytes());
        let crc = crc32c::crc32c(&bad[RECORD_HEADER_LEN..RECORD_HEADER_LEN + plen]);
        bad[12..16].copy_from_slice(&crc.to_le_bytes());
        seal(&mut bad, &KEY, 64);
        assert!(matches!(
            decode_record(&bad, &FMT, 64),
            Err(DecodeError::BadPayload(_))
        ));
        // The delay-warned control op decodes; an unknown op is skipped.
        let mut c = vec![0u8; CONTROL_RECORD_LEN as usize];
        encode_control(&mut c, QueueId(9), ControlOp::DelayWarned, 5);
        seal(&mut c, &KEY, 64);
        assert!(matches!(
            decode_record(&c, &FMT, 64),
            Ok((
                Record::Control(ControlRef {
                    op: ControlOp::DelayWarned,
                    ..
                }),
                _
            ))
        ));
    }

    /// The pool extension round-trips alone and after the DSN extension; a message without a pool encodes
    /// exactly as before (byte for byte); a forged or damaged extension (a bad name, a wrong magic, the
    /// extensions out of order, bytes after it) is refused.
    #[test]
    fn pool_extension_round_trip_and_forgeries_refused() {
        use crate::smtp::dsn::Ret;
        let data = b"Subject: x\r\n\r\nbody\r\n";
        let enc = |e: &Envelope| {
            let mut buf = vec![0u8; message_record_len(e, 0, data.len()) as usize];
            encode_message(&mut buf, QueueId(9), e, &[RcptState::Pending; 2], b"", data);
            seal(&mut buf, &KEY, 64);
            buf
        };
        let plain = sample_env();
        let mut pooled = sample_env();
        pooled.egress_pool = Some("bulk".into());
        let mut both = pooled.clone();
        both.dsn.ret = Some(Ret::Full);
        for e in [&plain, &pooled, &both] {
            let buf = enc(e);
            let Ok((Record::Message(m), _)) = decode_record(&buf, &FMT, 64) else {
                panic!("decodes")
            };
            assert_eq!(&m.envelope(), e);
        }
        // Without a pool: the same bytes as a record of a version that never knew pools (payload ends with
        // the data).
        let buf = enc(&plain);
        let plen = rd_u32(&buf, 8) as usize;
        let Ok((Record::Message(m), _)) = decode_record(&buf, &FMT, 64) else {
            panic!()
        };
        assert_eq!(m.data_at + data.len(), RECORD_HEADER_LEN + plen);
        assert_eq!(m.egress_pool, None);
        // Forgeries: payload bytes changed, checksum and tag made right again (as a writer knowing the key).
        let reseal = |mut m: Vec<u8>, plen: usize| {
            m[8..12].copy_from_slice(&(plen as u32).to_le_bytes());
            let crc = crc32c::crc32c(&m[RECORD_HEADER_LEN..RECORD_HEADER_LEN + plen]);
            m[12..16].copy_from_slice(&crc.to_le_bytes());
            seal(&mut m, &KEY, 64);
            m
        };
        let valid = enc(&pooled);
        let plen = rd_u32(&valid, 8) as usize;
        let name_at = RECORD_HEADER_LEN + plen - 4;
        for (what, at, v) in [
            ("a space in the name", name_at, b' '),
            ("a control byte", name_at + 1, 0x01),
            ("a non-ASCII byte", name_at + 2, 0xC3),
            ("a wrong magic", name_at - 8, b'X'),
        ] {
            let mut m = valid.clone();
            m[at] = v;
            assert!(
                matches!(
                    decode_record(&reseal(m, plen), &FMT, 64),
                    Err(DecodeError::BadPayload(_))
                ),
                "{what}"
            );
        }
        // An empty name, and a name longer than any configuration may hold.
        for name in [
            String::new(),
            "p".repeat(crate::egress::POOL_NAME_BYTES_MAX + 1),
        ] {
            let mut e = sample_env();
            e.egress_pool = Some(name);
            assert!(matches!(
                decode_record(&enc(&e), &FMT, 64),
                Err(DecodeError::BadPayload(_))
            ));
        }
        // Bytes after the extension.
        let mut m = enc(&pooled);
        m.extend_from_slice(&[0; 8]);
        assert!(matches!(
            decode_record(&reseal(m, plen + 4), &FMT, 64),
            Err(DecodeError::BadPayload(_))
        ));
        // The pool extension before the DSN one (not the encoder's order) is refused: swap them by hand.
        let b = enc(&both);
        let plen_b = rd_u32(&b, 8) as usize;
        let pool_len = 8 + 4;
        let dsn_len = dsn_ext_len(&both).unwrap() as usize;
        let end = RECORD_HEADER_LEN + plen_b;
        let dsn_at = end - pool_len - dsn_len;
        let mut swapped = b[..dsn_at].to_vec();
        swapped.extend_from_slice(&b[end - pool_len..end]);
        swapped.extend_from_slice(&b[dsn_at..end - pool_len]);
        swapped.extend_from_slice(&b[end..]);
        assert!(decode_record(&reseal(swapped, plen_b), &FMT, 64).is_err());
    }

    #[test]
    fn clamp_diagnostic_char_boundary() {
        let s = "é".repeat(400); // 800 bytes
        let c = clamp_diagnostic(&s);
        assert!(c.len() <= limits::QUEUE_DIAGNOSTIC_BYTES_MAX);
        assert!(c.len() >= limits::QUEUE_DIAGNOSTIC_BYTES_MAX - 1);
    }

    /// Fuzz-ish: random bytes, and random mutations of valid records, never panic.
    #[test]
    fn decode_random_bytes_never_panics() {
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let env = sample_env();
        let mut valid = vec![0u8; message_record_len(&env, 3, 5) as usize];
        encode_message(
            &mut valid,
            QueueId(1),
            &env,
            &[RcptState::Pending; 2],
            b"abc",
            b"hello",
        );
        for round in 0..20_000 {
            let len = (next() % 300) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 2 == 0 && len >= 24 {
                buf[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
                buf[5] = if round % 4 == 0 { RECORD_VERSION } else { 1 };
            }
            let _ = decode_record(&buf, &FMT, 64);
            let _ = decode_record(&buf, &RecordFormat::V1, 64);
            let _ = decode_segment_header(&buf);
            // Mutate a valid record and re-sign it so the payload parser sees garbage.
            let mut m = valid.clone();
            let i = RECORD_HEADER_LEN + (next() as usize % (m.len() - RECORD_HEADER_LEN));
            m[i] = next() as u8;
            let plen = rd_u32(&m, 8) as usize;
            let crc = crc32c::crc32c(&m[RECORD_HEADER_LEN..RECORD_HEADER_LEN + plen]);
            m[12..16].copy_from_slice(&crc.to_le_bytes());
            seal(&mut m, &KEY, 64);
            let _ = decode_record(&m, &FMT, 64);
        }
    }
}
