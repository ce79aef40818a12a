//! Owns the fuzz targets' entry points: one function per target, taking arbitrary bytes and asserting the
//! target's invariants; used by cargo-fuzz (fuzz/) and by the corpus replay test.
//!
//! Every function here must accept any input without panicking unless an invariant of the code under test is
//! broken: a panic is a finding. Inputs of the targets that take parameters (data, bdat, session, record,
//! segment_scan) start with a few parameter bytes, documented on each function; a short input stands for
//! zeros. The hand-written seeds ([`seeds`]) show the layouts. `fuzz/run.sh` runs the targets; the test at
//! the bottom replays `fuzz/seeds`, `fuzz/corpus` and `fuzz/regressions` on stable.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use crate::config::{Config, ListenerKind};
use crate::dns::wire::{self, Answer, QType, Rdata};
use crate::limits;
use crate::local::recipients::RecipientTable;
use crate::policy::RelayPolicy;
use crate::queue::record::{
    self, align_up, decode_record, decode_segment_header, encode_message, encode_segment_header,
    message_record_len, Record, RecordFormat, SegmentHeader, SegmentKey, RECORD_ALIGN,
    RECORD_HEADER_LEN, RECORD_MAGIC, SEGMENT_HEADER_LEN, SEGMENT_MAGIC,
};
use crate::queue::segment;
use crate::queue::{Envelope, QueueId, RcptState};
use crate::smtp::address::{parse_path, valid_domain, Path};
use crate::smtp::client::parse_reply;
use crate::smtp::command::parse_command;
use crate::smtp::data::{BareNewline, ChunkDecoder, DataDecoder, DataStatus};
use crate::smtp::reply_parser::{MAX_LINES as REPLY_LINES_MAX, MAX_REPLY as REPLY_BYTES_MAX};
use crate::smtp::session::{Action, Session, SessionConfig};

/// A fuzz target: arbitrary bytes in, a panic when an invariant breaks.
pub type Target = fn(&[u8]);

/// The targets, by name (each is `fuzz/fuzz_targets/<name>.rs` and a function here).
pub const TARGETS: &[(&str, Target)] = &[
    ("command", command),
    ("address", address),
    ("data", data),
    ("bdat", bdat),
    ("session", session),
    ("record", record),
    ("segment_scan", segment_scan),
    ("reply", reply),
    ("client_session", client_session),
    ("dns_answer", dns_answer),
    ("config", config),
];

// ---------------------------------------------------------------- helpers

/// Byte `i` of the input, 0 past its end.
fn byte(data: &[u8], i: usize) -> u8 {
    data.get(i).copied().unwrap_or(0)
}

/// Little-endian u16 at `i` (zeros past the end).
fn u16_at(data: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([byte(data, i), byte(data, i + 1)])
}

/// The input after its `n` parameter bytes.
fn rest(data: &[u8], n: usize) -> &[u8] {
    data.get(n..).unwrap_or(&[])
}

/// No bare CR and no bare LF: every CR is followed by LF and every LF preceded by CR.
pub fn only_crlf(b: &[u8]) -> bool {
    b.iter().enumerate().all(|(i, &c)| match c {
        b'\r' => b.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && b[i - 1] == b'\r',
        _ => true,
    })
}

/// Longest line of `b`, lines split on CRLF.
fn longest_line(b: &[u8]) -> usize {
    let mut longest = 0;
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\r' && b.get(i + 1) == Some(&b'\n') {
            longest = longest.max(i - start);
            i += 2;
            start = i;
        } else {
            i += 1;
        }
    }
    longest.max(b.len() - start)
}

/// `b` with every CRLF SPACE removed (what folding inserts; see [`data`]).
fn unfold(b: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"\r\n ") {
            i += 3;
        } else {
            v.push(b[i]);
            i += 1;
        }
    }
    v
}

/// Deterministic chunk lengths from a seed: 1..=max each, until `len` is covered.
fn chunk_lengths(len: usize, seed: u16, max: usize) -> Vec<usize> {
    let mut x = u64::from(seed) | 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::new();
    let mut left = len;
    while left > 0 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = (x % max.max(1) as u64) as usize + 1;
        let n = n.min(left);
        out.push(n);
        left -= n;
    }
    out
}

/// Fold length and storage limit from parameter byte `p` (and `q` for the small values): fold 998 (the
/// default), 0 (never), 78 (the smallest the configuration allows) or any of 0..=31; limit unbounded, 4096,
/// or 0..=255.
fn fold_and_limit(p: u8, q: u8) -> (usize, u64) {
    let fold = match p & 3 {
        0 => 998,
        1 => 0,
        2 => 78,
        _ => usize::from(q % 32),
    };
    let limit = match (p >> 2) & 3 {
        0 | 1 => u64::MAX,
        2 => 4096,
        _ => u64::from(q),
    };
    (fold, limit)
}

const MODES: [BareNewline; 2] = [BareNewline::Normal, BareNewline::Reject];

// ---------------------------------------------------------------- command, address

/// `parse_command` with both `utf8_allowed` values. Invariants: no panic; every refusal maps to a 5xx reply;
/// a line accepted without SMTPUTF8 is accepted the same with it.
pub fn command(data: &[u8]) {
    let strict = parse_command(data, false);
    let lax = parse_command(data, true);
    for r in [&strict, &lax] {
        if let Err(e) = r {
            let code = e.reply().code;
            assert!((500..600).contains(&code), "{e:?} -> {code}");
        }
    }
    if strict.is_ok() {
        assert_eq!(strict, lax, "accepted without SMTPUTF8, different with it");
    }
}

/// `parse_path` on UTF-8 input, both flags. Invariants: no panic; the rest returned is a suffix of the
/// input; a mailbox respects the RFC 5321 lengths and has a valid domain; accepted without UTF-8, the same
/// with it.
pub fn address(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let strict = parse_path(s, false);
    let lax = parse_path(s, true);
    for (r, utf8) in [(&strict, false), (&lax, true)] {
        let Ok((path, rest)) = r else { continue };
        assert!(s.ends_with(rest));
        if let Path::Mailbox(m) = path {
            assert!(
                m.local.len() <= limits::SMTP_LOCAL_PART_BYTES_MAX + 2,
                "{m:?}"
            );
            assert!(m.domain.len() <= limits::SMTP_DOMAIN_BYTES_MAX, "{m:?}");
            assert!(valid_domain(m.domain, utf8), "{m:?}");
            assert!(utf8 || !m.utf8, "{m:?}");
            let _ = m.to_canonical();
        }
    }
    if strict.is_ok() {
        assert_eq!(strict, lax, "accepted without SMTPUTF8, different with it");
    }
}

// ---------------------------------------------------------------- data, bdat

fn decode_data(
    mode: BareNewline,
    limit: u64,
    fold: usize,
    parts: &[&[u8]],
) -> (Vec<u8>, DataStatus, usize, DataDecoder) {
    let mut d = DataDecoder::new(mode, limit, fold);
    let mut out = Vec::new();
    let mut consumed = 0;
    let mut status = DataStatus::More;
    for p in parts {
        let (n, st) = d.feed(p, &mut out);
        assert!(n <= p.len());
        consumed += n;
        status = st;
        if st != DataStatus::More {
            break;
        }
        assert_eq!(n, p.len(), "More without consuming everything");
    }
    (out, status, consumed, d)
}

/// `DataDecoder`. Input: `[p, q, split_lo, split_hi, body...]` where `p`, `q` choose fold and limit (see
/// `fold_and_limit`) and the body is fed in two parts split at the given point. Invariants, in both line-end
/// modes: no panic; one chunk, two chunks and byte by byte agree on output, status and bytes consumed; no
/// bare CR or LF stored (checked on the unbounded output: a bounded one may stop inside a CRLF, and such a
/// message is refused as over the limit); output at most `limit` bytes and exactly the first `limit` bytes
/// of the unbounded output; with folding no stored line is longer than the fold length, and removing the
/// inserted CRLF SPACE gives the unfolded output; `Done` only right after `CRLF . CRLF` (or `. CRLF` at the
/// very start).
pub fn data(data: &[u8]) {
    let (fold, limit) = fold_and_limit(byte(data, 0), byte(data, 1));
    let body = rest(data, 4);
    let split = usize::from(u16_at(data, 2)) % (body.len() + 1);
    for mode in MODES {
        let (out, st, n, d) = decode_data(mode, limit, fold, &[body]);
        let (out2, st2, n2, _) = decode_data(mode, limit, fold, &[&body[..split], &body[split..]]);
        assert_eq!((&out2, st2, n2), (&out, st, n), "split at {split}");
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        let (out3, st3, n3, _) = decode_data(mode, limit, fold, &bytes);
        assert_eq!((&out3, st3, n3), (&out, st, n), "byte by byte");

        assert!(out.len() as u64 <= limit);
        let (full, full_st, full_n, _) = decode_data(mode, u64::MAX, fold, &[body]);
        // Past the limit the output may stop inside a CRLF; such a message is refused (over_limit), never kept.
        assert!(only_crlf(&full), "bare CR or LF stored: {full:?}");
        assert_eq!((full_st, full_n), (st, n));
        let keep = full.len().min(usize::try_from(limit).unwrap_or(usize::MAX));
        assert_eq!(out, full[..keep], "limited output is not a prefix");
        assert_eq!(d.seen(), full.len() as u64);
        assert_eq!(d.over_limit(), full.len() as u64 > limit);
        assert_eq!(d.saw_8bit(), !body[..n].is_ascii());
        if fold > 0 {
            assert!(longest_line(&full) <= fold.max(2), "line over {fold}");
        }
        let (flat, flat_st, flat_n, _) = decode_data(mode, u64::MAX, 0, &[body]);
        assert_eq!((flat_st, flat_n), (st, n));
        assert_eq!(unfold(&full), unfold(&flat), "folding changed content");
        match st {
            DataStatus::Done => {
                let eaten = &body[..n];
                assert!(
                    eaten == b".\r\n" || eaten.ends_with(b"\r\n.\r\n"),
                    "end of data without CRLF.CRLF"
                );
            }
            DataStatus::More => assert_eq!(n, body.len()),
            DataStatus::BareLineEnd => assert_eq!(mode, BareNewline::Reject),
        }
    }
}

fn decode_chunks(
    mode: BareNewline,
    limit: u64,
    fold: usize,
    parts: &[&[u8]],
) -> (Vec<u8>, ChunkDecoder) {
    let mut d = ChunkDecoder::new(mode, limit, fold);
    let mut out = Vec::new();
    for p in parts {
        d.feed(p, &mut out);
    }
    d.finish(&mut out);
    (out, d)
}

/// `ChunkDecoder`. Input: `[p, q, seed_lo, seed_hi, max, body...]`: fold and limit as for [`data`], the body
/// cut into chunks of 1..=`max`+1 bytes from the seed. Invariants, both modes: no panic; no bare CR or LF
/// stored (unbounded output, as for [`data`]); any split gives the same output and flags as one chunk and as byte by byte; output bounded and a
/// prefix of the unbounded output; lines at most the fold length; a bare line end reported only in Reject
/// mode.
pub fn bdat(data: &[u8]) {
    let (fold, limit) = fold_and_limit(byte(data, 0), byte(data, 1));
    let body = rest(data, 5);
    let lens = chunk_lengths(body.len(), u16_at(data, 2), usize::from(byte(data, 4)) + 1);
    let mut parts = Vec::with_capacity(lens.len());
    let mut at = 0;
    for n in lens {
        parts.push(&body[at..at + n]);
        at += n;
    }
    for mode in MODES {
        let (out, d) = decode_chunks(mode, limit, fold, &[body]);
        let (out2, d2) = decode_chunks(mode, limit, fold, &parts);
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        let (out3, d3) = decode_chunks(mode, limit, fold, &bytes);
        assert_eq!(out2, out, "split differently");
        assert_eq!(out3, out, "byte by byte");
        for e in [&d2, &d3] {
            assert_eq!(e.saw_bare_line_end(), d.saw_bare_line_end());
            assert_eq!(e.over_limit(), d.over_limit());
            assert_eq!(e.saw_8bit(), d.saw_8bit());
        }
        assert!(out.len() as u64 <= limit);
        let (full, _) = decode_chunks(mode, u64::MAX, fold, &[body]);
        // Past the limit the output may stop inside a CRLF; such a message is refused (over_limit), never kept.
        assert!(only_crlf(&full), "bare CR or LF stored: {full:?}");
        let keep = full.len().min(usize::try_from(limit).unwrap_or(usize::MAX));
        assert_eq!(out, full[..keep], "limited output is not a prefix");
        assert_eq!(d.over_limit(), full.len() as u64 > limit);
        assert_eq!(d.saw_8bit(), !body.is_ascii());
        if fold > 0 {
            assert!(longest_line(&full) <= fold.max(2), "line over {fold}");
        }
        let (flat, _) = decode_chunks(mode, u64::MAX, 0, &[body]);
        assert_eq!(unfold(&full), unfold(&flat), "folding changed content");
        if mode == BareNewline::Normal {
            assert!(!d.saw_bare_line_end());
        }
    }
}

// ---------------------------------------------------------------- session

/// The relay policy and recipient table every fuzzed session shares (built once: they read no files).
fn session_tables() -> &'static (Arc<RelayPolicy>, Arc<RecipientTable>) {
    static TABLES: OnceLock<(Arc<RelayPolicy>, Arc<RecipientTable>)> = OnceLock::new();
    TABLES.get_or_init(|| {
        let c = Config {
            myhostname: "mx.example".into(),
            mydestination: vec!["localhost".into(), "example.org".into()],
            relay_domains: vec!["relay.example".into()],
            local: crate::config::LocalConfig {
                accept_unknown_users: true,
                system_users: false,
                ..Default::default()
            },
            ..Config::default()
        };
        let policy = Arc::new(RelayPolicy::new(&c));
        let table = RecipientTable::load(Arc::new(c)).expect("a table without map files");
        (policy, Arc::new(table))
    })
}

/// The server session. Input: `[p, seed, max, stream...]`. `p` chooses the listener: bit 0 bare newlines
/// rejected, bit 1 submission, bit 2 plaintext AUTH allowed, bit 3 client in mynetworks, bits 4-5 the fold
/// (998, 0, 78, 998), bit 6 TLS not available; the stream is cut into chunks of 1..=2^(max % 12) bytes from
/// the seed. Actions are answered as the I/O layer would (a message is queued as Q1, every password is
/// wrong, TLS always starts, a close ends the run). Invariants: no panic; after `NeedMore` the unconsumed
/// rest is at most one partial line within the line limit (and nothing inside DATA/BDAT); the output is a
/// sequence of well-formed replies (3-digit code 2xx-5xx, CRLF only, parseable by our own client); a queued
/// message holds no bare CR or LF and fits the size limit.
pub fn session(data: &[u8]) {
    run_session(data);
}

/// [`session`]; returns the session's output (the replies).
fn run_session(data: &[u8]) -> Vec<u8> {
    let p = byte(data, 0);
    let (policy, recipients) = session_tables();
    let cfg = Arc::new(SessionConfig {
        hostname: "mx.example".into(),
        kind: if p & 2 != 0 {
            ListenerKind::Submission
        } else {
            ListenerKind::Smtp
        },
        message_size_limit: 4096,
        recipient_limit: 3,
        hard_error_limit: 20,
        line_length_limit: 512,
        bare_newline: if p & 1 != 0 {
            BareNewline::Reject
        } else {
            BareNewline::Normal
        },
        smtp_line_length_limit: match (p >> 4) & 3 {
            1 => 0,
            2 => 78,
            _ => 998,
        },
        tls_available: p & 64 == 0,
        auth_available: true,
        allow_plaintext_auth: p & 4 != 0,
    });
    let check = crate::policy::RecipientCheck::new(policy.clone(), recipients.clone());
    let ip: IpAddr = if p & 8 != 0 {
        [127, 0, 0, 1].into()
    } else {
        [192, 0, 2, 1].into()
    };
    let stream = rest(data, 3);
    let max = 1usize << (byte(data, 2) % 12);
    let lens = chunk_lengths(stream.len(), u16::from(byte(data, 1)), max);

    let mut s = Session::new(cfg.clone(), ip, policy.in_mynetworks(ip));
    let mut out = Vec::new();
    s.greeting().write_to(&mut out);
    let mut pending: Vec<u8> = Vec::new();
    let mut at = 0;
    'chunks: for n in lens {
        pending.extend_from_slice(&stream[at..at + n]);
        at += n;
        loop {
            let (used, action) = s.feed(&pending, &mut out);
            assert!(used <= pending.len());
            pending.drain(..used);
            match action {
                Action::NeedMore => {
                    if s.receiving_data() {
                        assert!(pending.is_empty(), "content left unconsumed");
                    } else {
                        let limit = s.pending_line_limit() + 2;
                        assert!(
                            pending.len() <= limit,
                            "{} bytes kept over a line limit of {limit}",
                            pending.len()
                        );
                        assert!(!pending.contains(&b'\n'), "a complete line left unread");
                    }
                    continue 'chunks;
                }
                Action::Message => {
                    let t = s.transaction();
                    assert!(only_crlf(&t.data), "bare CR or LF in a message");
                    assert!(t.data.len() as u64 <= cfg.message_size_limit);
                    assert!(!t.recipients.is_empty());
                    if s.message_done(Ok("Q1"), &mut out) == Action::Close {
                        break 'chunks;
                    }
                }
                Action::Recipient(req) => {
                    let v = check.check(req, s.targets_mut());
                    if s.rcpt_result(v, &mut out) == Action::Close {
                        break 'chunks;
                    }
                }
                Action::Authenticate { .. } => {
                    if s.auth_result(None, &mut out) == Action::Close {
                        break 'chunks;
                    }
                }
                Action::StartTls => {
                    // The I/O layer drops what was read before the handshake.
                    pending.clear();
                    s.tls_started("TLSv1.3 x".into());
                    continue 'chunks;
                }
                Action::AuthFailed => {}
                Action::Close => break 'chunks,
            }
        }
    }
    check_replies(&out);
    out
}

/// The server's output: CRLF lines, each a reply line with a 2xx-5xx code, that our client parses back.
fn check_replies(out: &[u8]) {
    assert!(only_crlf(out), "bare CR or LF in replies");
    assert!(out.is_empty() || out.ends_with(b"\r\n"));
    for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        assert!(line.len() >= 3, "short reply line {line:?}");
        assert!(
            matches!(line[0], b'2'..=b'5') && line[1..3].iter().all(u8::is_ascii_digit),
            "reply line without a code: {:?}",
            String::from_utf8_lossy(line)
        );
        assert!(matches!(line.get(3), None | Some(b' ') | Some(b'-')));
    }
    let mut pos = 0;
    while pos < out.len() {
        match parse_reply(&out[pos..]) {
            Ok(Some((_, n))) => pos += n,
            other => panic!(
                "our client cannot read our reply at {pos}: {other:?} {:?}",
                String::from_utf8_lossy(&out[pos..])
            ),
        }
    }
}

// ---------------------------------------------------------------- queue records and segments

/// The fixed, random-looking key of the fuzzed keyed segments (the fuzzer can only learn it the way an
/// attacker cannot: by watching the comparisons).
const FUZZ_KEY: [u8; 16] = *b"\x8f\x1d\xc4\x53\x2a\xe0\x71\x9b\x06\xfd\x3c\x58\xa2\x17\xe9\x44";
const FUZZ_SEQ: u64 = 7;

fn fuzz_header(keyed: bool) -> SegmentHeader {
    SegmentHeader {
        shard: 1,
        seq: FUZZ_SEQ,
        created_unix_ms: 1_700_000_000_000,
        segment_size: 1 << 20,
        id_epoch: 3,
        key: keyed.then_some(FUZZ_KEY),
    }
}

fn rd_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Makes the record at the start of `buf` pass the checks that random bytes cannot: magic, version, a
/// payload length within `buf`, the checksum and (format 2) the tag for `offset`.
fn fix_up_record(buf: &mut [u8], fmt: &RecordFormat, offset: u64) {
    let hlen = fmt.header_len();
    if buf.len() < hlen {
        return;
    }
    buf[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    buf[5] = match fmt {
        RecordFormat::V1 => 1,
        RecordFormat::V2(_) => record::RECORD_VERSION,
    };
    let room = buf.len() - hlen;
    let plen = (rd_u32(buf, 8) as usize).min(room);
    buf[8..12].copy_from_slice(&(plen as u32).to_le_bytes());
    match fmt {
        RecordFormat::V2(key) => {
            let crc = crc32c::crc32c(&buf[hlen..hlen + plen]);
            buf[12..16].copy_from_slice(&crc.to_le_bytes());
            record::seal(buf, key, offset);
        }
        RecordFormat::V1 => {
            buf[12..16].fill(0);
            let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[..hlen]), &buf[hlen..hlen + plen]);
            buf[12..16].copy_from_slice(&crc.to_le_bytes());
        }
    }
}

/// `decode_record` (formats 1 and 2) and `decode_segment_header`. Input: `[p, o, record...]`: bit 0 of `p`
/// format 2 (else 1), bit 1 fix up magic, version, length, checksum and tag so the payload decoders get
/// work; the record sits at offset 64 + 8·`o`. The whole input is also decoded as a segment header (bit 1:
/// with its checksum fixed up). Invariants: no panic; a decoded record's length is aligned, covers its
/// header and stays within the input's padding; the field offsets point at the bytes returned; a decoded
/// message re-encodes to the same record; a decoded segment header re-encodes to itself.
pub fn record(data: &[u8]) {
    let p = byte(data, 0);
    let fmt = if p & 1 != 0 {
        fuzz_header(true).format()
    } else {
        RecordFormat::V1
    };
    let offset = SEGMENT_HEADER_LEN as u64 + 8 * u64::from(byte(data, 1));
    let mut buf = rest(data, 2).to_vec();
    if p & 2 != 0 {
        fix_up_record(&mut buf, &fmt, offset);
    }
    if let Ok((rec, total)) = decode_record(&buf, &fmt, offset) {
        assert!(total >= fmt.header_len() && total % RECORD_ALIGN == 0);
        assert!(total as u64 <= align_up(buf.len() as u64));
        if let Record::Message(m) = &rec {
            assert_eq!(&buf[m.data_at..m.data_at + m.data.len()], m.data);
            assert_eq!(
                &buf[m.received_at..m.received_at + m.received.len()],
                m.received
            );
            if let RecordFormat::V2(key) = &fmt {
                let env = m.envelope();
                let states: Vec<RcptState> = m.recipients.iter().map(|r| r.1).collect();
                let len = message_record_len(&env, m.received.len(), m.data.len()) as usize;
                assert_eq!(len, total, "re-encoded length");
                let mut again = vec![0u8; len];
                encode_message(&mut again, m.id, &env, &states, m.received, m.data);
                record::seal(&mut again, key, offset);
                let (rec2, total2) = decode_record(&again, &fmt, offset).expect("re-encoded");
                assert_eq!((rec2, total2), (rec.clone(), total));
            }
        }
    }

    let mut hb = data.to_vec();
    if p & 2 != 0 && hb.len() >= SEGMENT_HEADER_LEN {
        hb[0..8].copy_from_slice(&SEGMENT_MAGIC);
        let (end, at) = if rd_u32(&hb, 8) == 1 {
            (44, 44)
        } else {
            (60, 60)
        };
        let crc = crc32c::crc32c(&hb[..end]);
        hb[at..at + 4].copy_from_slice(&crc.to_le_bytes());
    }
    if let Ok(h) = decode_segment_header(&hb) {
        let mut again = [0u8; SEGMENT_HEADER_LEN];
        encode_segment_header(&mut again, &h);
        assert_eq!(decode_segment_header(&again).ok(), Some(h));
    }
}

/// What a client could put in a message body to forge queue records: for each of `guesses` keys, a complete
/// message record for `evil` with queue id `id` signed with that guessed key (for segment `seq`, at an offset
/// stepping by 8), then the same payload in the old 16-byte framing (magic, crc32c over header and payload), which
/// the old scanner accepted; separated by a few bytes so they land at every alignment.
pub fn forged_records(evil: &Envelope, id: QueueId, seq: u64, guesses: u8) -> Vec<u8> {
    let mut out = Vec::new();
    let len = message_record_len(evil, 0, 5) as usize;
    let states = vec![RcptState::Pending; evil.recipients.len()];
    for guess in 0..guesses {
        let mut r = vec![0u8; len];
        encode_message(&mut r, id, evil, &states, b"", b"pwned");
        let key = SegmentKey {
            key: [guess; 16],
            seq,
        };
        record::seal(&mut r, &key, 64 + 8 * guess as u64);
        out.extend_from_slice(&r);
        let plen = rd_u32(&r, 8) as usize;
        let mut v1 = b"SMQR\x01\x01\0\0".to_vec();
        v1.extend_from_slice(&(plen as u32).to_le_bytes());
        v1.extend_from_slice(&[0; 4]);
        v1.extend_from_slice(&r[RECORD_HEADER_LEN..RECORD_HEADER_LEN + plen]);
        let crc = crc32c::crc32c(&v1);
        v1[12..16].copy_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&v1);
        out.extend_from_slice(&b"\r\npad"[..(guess as usize % 4) + 1]);
    }
    out
}

fn fuzz_envelope() -> Envelope {
    Envelope {
        sender: "a@x.example".into(),
        recipients: vec!["b@y.example".into()],
        ..Default::default()
    }
}

/// A keyed segment image holding `bodies` as messages with ids 1, 2, ... (each signed at its offset, as
/// [`segment::Segment::append_with`] does), followed by `tail` zero bytes; returns the image and the offsets.
pub fn segment_image(bodies: &[&[u8]], tail: usize) -> (Vec<u8>, Vec<usize>) {
    let h = fuzz_header(true);
    let env = fuzz_envelope();
    let lens: Vec<usize> = bodies
        .iter()
        .map(|b| message_record_len(&env, 0, b.len()) as usize)
        .collect();
    let mut img = vec![0u8; SEGMENT_HEADER_LEN + lens.iter().sum::<usize>() + tail];
    encode_segment_header(&mut img, &h);
    let RecordFormat::V2(key) = h.format() else {
        unreachable!("a keyed header")
    };
    let mut off = SEGMENT_HEADER_LEN;
    let mut offs = Vec::new();
    for (i, (b, len)) in bodies.iter().zip(lens).enumerate() {
        encode_message(
            &mut img[off..off + len],
            QueueId(i as u64 + 1),
            &env,
            &[RcptState::Pending],
            b"",
            b,
        );
        record::seal(&mut img[off..off + len], &key, off as u64);
        offs.push(off);
        off += len;
    }
    (img, offs)
}

/// Scans `img`, checking what holds for any bytes; returns the (offset, queue id) of each message visited.
fn scan_checked(img: &[u8]) -> (segment::ScanOutcome, Vec<(usize, u64)>) {
    let mut seen = Vec::new();
    let mut last_end = 0u64;
    let out = segment::scan(img, |off, total, rec| {
        assert!(off >= SEGMENT_HEADER_LEN as u64 && off % RECORD_ALIGN as u64 == 0);
        assert!(off >= last_end, "records overlap");
        assert!(off + total <= align_up(img.len() as u64));
        last_end = off + total;
        if let Record::Message(m) = rec {
            seen.push((off as usize, m.id.0));
        }
    });
    let len = img.len() as u64;
    assert!(
        out.end <= len.max(SEGMENT_HEADER_LEN as u64),
        "end past the image"
    );
    let mut prev = 0;
    for &(a, b) in &out.bad_regions {
        assert!(a < b && b <= len, "bad region {a}..{b} of {len}");
        assert!(a >= prev, "bad regions out of order");
        prev = b;
    }
    (out, seen)
}

/// `segment::scan`. Input: `[p, patch[24], ...]`.
///
/// First the input itself is scanned as a segment image (bit 0 of `p`: behind a valid keyed header, bit 1:
/// behind a format-1 one): no panic, `end` within the image, bad regions inside it and in order, records
/// inside it and in order.
///
/// Then the forgery property: a keyed segment holds message 1, message 2 whose data is the whole input, and
/// message 3; message 2's header is damaged (bit 2 of `p` clear: its first 24 bytes become `patch`; set: the
/// image is cut inside message 2 at a point taken from `patch`). Every record the scan then visits must be
/// one the harness wrote, at its offset: nothing inside the fuzz-controlled body is taken as a record. After
/// an overwrite, messages 1 and 3 are both found (the scan resynchronises at a record we signed).
pub fn segment_scan(data: &[u8]) {
    let p = byte(data, 0);
    let mut img = Vec::new();
    if p & 3 != 0 {
        let mut h = [0u8; SEGMENT_HEADER_LEN];
        encode_segment_header(&mut h, &fuzz_header(p & 1 != 0));
        img.extend_from_slice(&h);
    }
    img.extend_from_slice(data);
    scan_checked(&img);

    let (mut img, offs) = segment_image(&[b"first", data, b"third"], 64);
    let written: Vec<(usize, u64)> = offs.iter().zip(1u64..).map(|(&o, id)| (o, id)).collect();
    let mut patch = [0u8; 24];
    for (i, b) in patch.iter_mut().enumerate() {
        *b = byte(data, 1 + i);
    }
    let cut = p & 4 != 0;
    if cut {
        let span = offs[2] - offs[1];
        img.truncate(offs[1] + usize::from(u16_at(&patch, 0)) % span);
    } else {
        img[offs[1]..offs[1] + 24].copy_from_slice(&patch);
    }
    let (_, seen) = scan_checked(&img);
    for s in &seen {
        assert!(written.contains(s), "forged record visited: {s:?}");
    }
    assert!(seen.contains(&written[0]), "first message lost");
    if !cut {
        assert!(
            seen.contains(&written[2]),
            "no resynchronisation at the third message"
        );
    }
}

// ---------------------------------------------------------------- client replies, DNS, configuration

/// `parse_reply`. Invariants: no panic; a reply uses at most the input, has a 2xx-5xx code and at most the
/// line limit, and parses the same from exactly the bytes it used; "need more" only while under the size
/// limit.
pub fn reply(data: &[u8]) {
    match parse_reply(data) {
        Ok(Some((r, n))) => {
            assert!(n <= data.len() && n <= REPLY_BYTES_MAX);
            assert!((200..600).contains(&r.code));
            assert!(r.text.split('\n').count() <= REPLY_LINES_MAX);
            assert_eq!(parse_reply(&data[..n]), Ok(Some((r, n))));
        }
        Ok(None) => assert!(data.len() <= REPLY_BYTES_MAX),
        Err(_) => {}
    }
}

/// Most transactions the `client_session` target starts.
const FUZZ_TXNS: usize = 3;

/// `ClientSession` fed arbitrary server bytes. The first byte picks the options (pipelining, chunking,
/// opportunistic STARTTLS, AUTH, up to 4 transactions in flight), the second how many bytes each read holds
/// and how far the clock moves between reads; the session runs up to `FUZZ_TXNS` three-recipient transactions
/// once ready, RSET after a refused one, then QUIT. Invariants: no panic; at most one `Ready`; nothing after
/// `Closed` or `Failed`; every transaction ends once at most, and only one that was started; the transmit
/// buffer stays within what the started transactions and a few commands need.
pub fn client_session(data: &[u8]) {
    use crate::smtp::client_session::{
        ClientSession, Event, Params, Timeouts, TlsMode, Transaction,
    };
    use std::collections::HashSet;
    use std::time::{Duration, Instant};
    let opts = byte(data, 0);
    let step = usize::from(byte(data, 1) % 64) + 1;
    let input = rest(data, 2);
    let params = Params {
        helo: "client.example".into(),
        tls: if opts & 4 != 0 {
            TlsMode::Opportunistic
        } else {
            TlsMode::Off
        },
        auth: (opts & 8 != 0).then(|| ("u".to_string(), "p".to_string())),
        auth_requires_tls: opts & 64 != 0,
        pipelining: opts & 1 != 0,
        chunking: opts & 2 != 0,
        max_in_flight: usize::from(opts >> 4 & 3) + 1,
        timeouts: Timeouts::default(),
    };
    let mut now = Instant::now();
    let mut s = ClientSession::new(params, now);
    s.connected(now);
    let (mut ready, mut over) = (false, false);
    let mut started: HashSet<u64> = HashSet::new();
    let mut done: HashSet<u64> = HashSet::new();
    let body: &[&[u8]] = &[b"Subject: x\r\n\r\n.dot\r\n", b"tail"];
    let rcpts = ["a@x.example", "b@x.example", "c@x.example"];
    let mut quit = false;
    for chunk in input.chunks(step) {
        s.handle_input(chunk, now);
        now += Duration::from_secs(step as u64);
        s.handle_timeout(now);
        while let Some(e) = s.poll_event() {
            assert!(!over, "event after the end: {e:?}");
            match e {
                Event::Ready { .. } => {
                    assert!(!ready, "two Ready");
                    ready = true;
                }
                Event::MessageDone { txn, .. } => {
                    assert!(started.contains(&txn) && done.insert(txn), "txn {txn}");
                }
                Event::Mail { txn, reply }
                | Event::Rcpt { txn, reply, .. }
                | Event::Data { txn, reply }
                | Event::DataDone { txn, reply } => {
                    assert!(started.contains(&txn) && !done.contains(&txn));
                    assert_eq!(s.reply(reply).code, reply.code);
                }
                Event::Closed | Event::Failed(_) => over = true,
                Event::NeedTls => s.tls_established(now),
                Event::Greeted | Event::RsetDone { .. } => {}
            }
        }
        if ready && !over {
            while started.len() < FUZZ_TXNS {
                let t = Transaction {
                    sender: "s@y.example",
                    recipients: &rcpts,
                    body,
                    size: 40,
                    eight_bit: opts & 32 != 0,
                    smtputf8: false,
                    wire: opts & 128 != 0,
                    // With BDAT, part of the content comes from the caller (written below).
                    external: if opts & 3 == 3 { 7 } else { 0 },
                };
                match s.start_transaction(&t, now) {
                    Ok(id) => {
                        started.insert(id);
                    }
                    Err(_) => break,
                }
            }
            if started.len() == FUZZ_TXNS && done.len() == FUZZ_TXNS && !quit {
                let _ = s.rset(now);
                s.quit(now);
                quit = true;
            }
        }
        loop {
            if let Some(b) = s.poll_transmit() {
                let n = b.len();
                assert!(n <= 4096, "transmit buffer {n}");
                s.advance_transmit(n, now);
            } else if let Some(n) = s.poll_external() {
                assert_eq!(n, 7);
                s.external_written(now);
            } else {
                break;
            }
        }
        assert!(!over || s.is_closed());
    }
}

/// `parse_answer` for MX, A and AAAA, as the answer to the query of id (the input's first two bytes) for
/// `example.org`. Invariants: no panic; records only of the asked type, at most `limits::DNS_ANSWER_RECORDS_MAX`, no duplicates;
/// TTLs capped; MX exchanges normalised.
pub fn dns_answer(data: &[u8]) {
    static NAME: OnceLock<Option<hickory_proto::rr::Name>> = OnceLock::new();
    let Some(name) = NAME.get_or_init(|| wire::fqdn("example.org").ok()) else {
        return;
    };
    let id = u16::from_be_bytes([byte(data, 0), byte(data, 1)]);
    for qtype in [QType::Mx, QType::A, QType::Aaaa] {
        match wire::parse_answer(data, id, name, qtype) {
            Ok(Answer::Records { records, ttl }) => {
                assert!(!records.is_empty() && records.len() <= limits::DNS_ANSWER_RECORDS_MAX);
                assert!(ttl <= limits::DNS_POSITIVE_TTL_SECONDS_MAX);
                for (i, r) in records.iter().enumerate() {
                    assert!(!records[..i].contains(r), "duplicate {r:?}");
                    match (r, qtype) {
                        (Rdata::Mx { exchange, .. }, QType::Mx) => {
                            assert_eq!(exchange, &wire::normalize(exchange));
                        }
                        (Rdata::Ip(IpAddr::V4(_)), QType::A) => {}
                        (Rdata::Ip(IpAddr::V6(_)), QType::Aaaa) => {}
                        (Rdata::Cname(c), _) if i == 0 => assert_eq!(c, &wire::normalize(c)),
                        other => panic!("record of the wrong type: {other:?}"),
                    }
                }
            }
            Ok(Answer::NoData { ttl }) | Ok(Answer::NxDomain { ttl }) => {
                assert!(ttl <= limits::DNS_NEGATIVE_TTL_SECONDS_MAX)
            }
            Ok(Answer::Truncated) | Ok(Answer::ServerError(_)) | Err(_) => {}
        }
    }
}

/// `Config::parse` on UTF-8 input. Invariants: no panic; a configuration that parses validates, and the
/// TOML it prints parses back to an equal configuration.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("fuzz.toml");
    let Ok(c) = Config::parse(text, path) else {
        return;
    };
    if let Err(e) = c.validate() {
        panic!("parsed but does not validate: {e}");
    }
    let printed = c.to_toml();
    match Config::parse(&printed, path) {
        Ok(again) => assert_eq!(again, c, "printed config differs:\n{printed}"),
        Err(e) => panic!("printed config does not parse: {e}\n{printed}"),
    }
}

// ---------------------------------------------------------------- seeds

/// Hand-written realistic inputs for each target, as (target, file name, bytes): `fuzz/seeds/` holds them
/// (written by the ignored test `write_seeds`).
pub fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut v: Vec<(&'static str, &'static str, Vec<u8>)> = Vec::new();
    let session =
        b"EHLO client.example\r\nMAIL FROM:<alice@client.example> SIZE=120 BODY=8BITMIME\r\n\
RCPT TO:<bob@example.org>\r\nRCPT TO:<carol@relay.example>\r\nDATA\r\nSubject: hi\r\n\r\n\
..leading dot\r\nbare\nlf and bare\rcr\r\n.\r\nRSET\r\nMAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\n\
BDAT 12\r\nSubject: x\r\nBDAT 6 LAST\r\nbody\r\nNOOP\r\nVRFY x\r\nQUIT\r\n";
    let message = b"Received: from a\r\nSubject: dots\r\n\r\n..one\r\n...two\r\n.\r.\n\
smuggled\n.\nMAIL\r\n.\r\nEHLO after\r\n";
    for (name, line) in [
        ("ehlo", &b"EHLO client.example"[..]),
        (
            "mail",
            b"MAIL FROM:<alice@client.example> SIZE=1000 BODY=8BITMIME SMTPUTF8",
        ),
        (
            "rcpt",
            b"RCPT TO:<@route.example,@b.example:bob@example.org>",
        ),
        ("rcpt-utf8", "RCPT TO:<jörg@exämple.org>".as_bytes()),
        ("bdat", b"BDAT 100 LAST"),
        ("auth", b"AUTH PLAIN AGFsaWNlAHNlY3JldA=="),
        ("quoted", b"MAIL FROM:<\"a b\\\"c\"@[192.0.2.1]> AUTH=<>"),
    ] {
        v.push(("command", name, line.to_vec()));
    }
    for (name, path) in [
        ("plain", "<alice@example.org> SIZE=10"),
        ("quoted", "<\"x@y\"@[IPv6:2001:db8::1]>"),
        ("route", "<@a.example,@b.example:c@d.example>"),
        ("utf8", "<ñ@exämple.org>"),
        ("null", "<>"),
    ] {
        v.push(("address", name, path.as_bytes().to_vec()));
    }
    v.push(("data", "message", [&[0u8, 0, 9, 0][..], message].concat()));
    v.push((
        "data",
        "long-line-fold-78",
        [&[2u8, 0, 40, 0][..], &[b'x'; 300], b"\r\n.\r\n"].concat(),
    ));
    v.push((
        "bdat",
        "chunk",
        [
            &[0u8, 0, 7, 0, 16][..],
            b"Subject: x\r\n\r\nline\rcr\nlf\r\r\n.",
        ]
        .concat(),
    ));
    v.push(("session", "smtp", [&[0u8, 1, 5][..], &session[..]].concat()));
    v.push((
        "session",
        "submission-auth",
        [
            &[2u8 | 4 | 64, 3, 11][..],
            b"EHLO c\r\nAUTH LOGIN\r\nYWxpY2U=\r\nc2VjcmV0\r\nAUTH PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\n\
STARTTLS\r\nMAIL FROM:<a@b.example>\r\nQUIT\r\n",
        ]
        .concat(),
    ));
    v.push((
        "session",
        "long-line-relay-denied",
        [
            &[0u8, 4, 6][..],
            b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@remote.example>\r\nNOOP ",
            &[b'x'; 700],
            b"\r\nRCPT TO:<postmaster@localhost>\r\nDATA\r\n",
            &[b'y'; 1500],
            b"\r\n.\r\nQUIT\r\n",
        ]
        .concat(),
    ));
    v.push((
        "session",
        "starttls",
        [&[8u8, 2, 0][..], b"EHLO c\r\nSTARTTLS\r\nEHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@remote.example>\r\nDATA\r\nx\r\n.\r\n"].concat(),
    ));
    // A keyed message record, fixed up by the harness anyway.
    let (img, offs) = segment_image(&[b"Subject: x\r\n\r\nbody\r\n"], 0);
    let rec = img[offs[0]..].to_vec();
    v.push(("record", "message-v2", [&[3u8, 0][..], &rec].concat()));
    v.push((
        "record",
        "segment-header",
        img[..SEGMENT_HEADER_LEN].to_vec(),
    ));
    let diag = "451 4.7.1 try later";
    let mut pbuf = vec![0u8; record::progress_record_len(diag) as usize];
    record::encode_progress(
        &mut pbuf,
        QueueId(5),
        0,
        RcptState::Deferred {
            next_attempt_unix_s: 1_700_000_300,
            attempts: 2,
        },
        1_700_000_000_000,
        diag,
    );
    v.push(("record", "progress-v2", [&[3u8, 1][..], &pbuf].concat()));
    let (img, _) = segment_image(&[b"one\r\n", b"two\r\n"], 16);
    v.push(("segment_scan", "image", img[SEGMENT_HEADER_LEN..].to_vec()));
    v.push(("segment_scan", "whole-image", img));
    v.push((
        "segment_scan",
        "magic-body",
        [&[4u8][..], &RECORD_MAGIC.to_le_bytes().repeat(40)].concat(),
    ));
    v.push((
        "reply",
        "ehlo",
        b"250-mx.example Hello\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250 CHUNKING\r\n".to_vec(),
    ));
    v.push((
        "reply",
        "error",
        b"550 5.1.1 <x@y>: no such user\r\n".to_vec(),
    ));
    v.push((
        "client_session",
        "pipelined",
        [
            &[0x11u8, 7][..],
            b"220 mx\r\n250-mx\r\n250-PIPELINING\r\n250 SIZE 100\r\n250 ok\r\n250 ok\r\n550 5.1.1 no\r\n250 ok\r\n354 go\r\n250 queued as A\r\n250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n250 queued as B\r\n250 ok\r\n421 4.7.0 bye\r\n",
        ]
        .concat(),
    ));
    v.push((
        "client_session",
        "chunking-window",
        [
            &[0x33u8, 63][..],
            &b"220 mx\r\n250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n"[..],
            &b"250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n250 queued\r\n".repeat(3),
            b"250 reset\r\n221 bye\r\n",
        ]
        .concat(),
    ));
    v.push((
        "client_session",
        "starttls-auth-login",
        [
            &[0x0cu8, 3][..],
            b"220 mx\r\n250-mx\r\n250 STARTTLS\r\n220 go\r\n250-mx\r\n250 AUTH LOGIN\r\n334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n235 ok\r\n250 ok\r\n",
        ]
        .concat(),
    ));
    if let Some(m) = dns_mx_answer() {
        v.push(("dns_answer", "mx", m));
    }
    let mut c = Config {
        myhostname: "mx.example".into(),
        ..Config::default()
    };
    v.push(("config", "default", c.to_toml().into_bytes()));
    c.relay_domains = vec!["relay.example".into()];
    c.relayhost = "[smarthost.example]:587".parse().ok();
    v.push((
        "config",
        "small",
        b"myhostname = \"mx.example\"\nmydestination = [\"example.org\"]\nmessage_size_limit = 1000000\n\
queue_segment_size = 8388608\nsmtp_line_length_limit = 0\n[[listener]]\naddress = \"127.0.0.1:25\"\nkind = \"smtp\"\n"
            .to_vec(),
    ));
    v.push(("config", "relay", c.to_toml().into_bytes()));
    v
}

/// A DNS answer for `example.org MX`: a CNAME, two MX records, one duplicate, and a SOA.
fn dns_mx_answer() -> Option<Vec<u8>> {
    use hickory_proto::op::{Message, OpCode, Query};
    use hickory_proto::rr::rdata::{CNAME, MX, SOA};
    use hickory_proto::rr::{Name, RData, Record as Rr, RecordType};
    let n = |s: &str| Name::from_ascii(s).ok();
    let mut m = Message::response(0x4d58, OpCode::Query);
    m.add_query(Query::query(n("example.org.")?, RecordType::MX));
    m.add_answer(Rr::from_rdata(
        n("example.org.")?,
        300,
        RData::CNAME(CNAME(n("mail.example.org.")?)),
    ));
    for (pref, host) in [
        (10, "MX1.Example.ORG."),
        (20, "mx2.example.net."),
        (20, "mx2.example.net."),
    ] {
        m.add_answer(Rr::from_rdata(
            n("mail.example.org.")?,
            3600,
            RData::MX(MX::new(pref, n(host)?)),
        ));
    }
    m.add_authority(Rr::from_rdata(
        n("example.org.")?,
        600,
        RData::SOA(SOA::new(
            n("ns.example.org.")?,
            n("hostmaster.example.org.")?,
            1,
            3600,
            600,
            86400,
            300,
        )),
    ));
    m.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fuzz_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz")
    }

    /// Every file of `fuzz/seeds/<target>`, `fuzz/corpus/<target>` and `fuzz/regressions/<target>` through
    /// its target: what CI runs instead of the fuzzers (stable, seconds).
    #[test]
    fn replay_corpora() {
        let mut total = 0;
        for (name, f) in TARGETS {
            let mut files = 0;
            for kind in ["seeds", "corpus", "regressions"] {
                let dir = fuzz_dir().join(kind).join(name);
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                let mut paths: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
                paths.sort();
                for p in paths {
                    let bytes = std::fs::read(&p).unwrap();
                    let r = std::panic::catch_unwind(|| f(&bytes));
                    assert!(r.is_ok(), "{} fails target {name}", p.display());
                    files += 1;
                }
            }
            assert!(files > 0, "no inputs for {name}");
            total += files;
        }
        assert!(total >= seeds().len());
        eprintln!("replayed {total} inputs");
    }

    /// Every seed passes its target (and the list names real targets).
    #[test]
    fn seeds_pass() {
        for (target, name, bytes) in seeds() {
            let f = TARGETS
                .iter()
                .find(|t| t.0 == target)
                .unwrap_or_else(|| panic!("unknown target {target}"))
                .1;
            let r = std::panic::catch_unwind(|| f(&bytes));
            assert!(r.is_ok(), "seed {target}/{name}");
        }
    }

    /// The seeds get past the cheap refusals: what a fuzzer starting from them starts from.
    #[test]
    fn seeds_reach_deep() {
        let seed = |target: &str, name: &str| {
            seeds()
                .into_iter()
                .find(|s| s.0 == target && s.1 == name)
                .unwrap()
                .2
        };
        let out = String::from_utf8(run_session(&seed("session", "smtp"))).unwrap();
        assert_eq!(out.matches("queued as Q1").count(), 2, "{out}");
        assert!(
            out.ends_with("221 2.0.0 mx.example closing connection\r\n"),
            "{out}"
        );
        let out =
            String::from_utf8(run_session(&seed("session", "long-line-relay-denied"))).unwrap();
        assert!(
            out.contains("Error: line too long")
                && out.contains("Relay access denied")
                && out.contains("queued as Q1"),
            "{out}"
        );
        let out = String::from_utf8(run_session(&seed("session", "starttls"))).unwrap();
        assert!(
            out.contains("220 2.0.0 Ready to start TLS") && out.contains("queued as Q1"),
            "{out}"
        );
        let out = String::from_utf8(run_session(&seed("session", "submission-auth"))).unwrap();
        assert_eq!(out.matches("535 5.7.8").count(), 2, "{out}");
        for name in ["default", "small", "relay"] {
            let text = String::from_utf8(seed("config", name)).unwrap();
            Config::parse(&text, std::path::Path::new("seed.toml")).unwrap();
        }
        let name = wire::fqdn("example.org").unwrap();
        let answer =
            wire::parse_answer(&seed("dns_answer", "mx"), 0x4d58, &name, QType::Mx).unwrap();
        assert_eq!(
            answer,
            Answer::Records {
                records: vec![
                    // The seed's answer reaches its MX records through a CNAME.
                    Rdata::Cname("mail.example.org".into()),
                    Rdata::Mx {
                        preference: 10,
                        exchange: "mx1.example.org".into()
                    },
                    Rdata::Mx {
                        preference: 20,
                        exchange: "mx2.example.net".into()
                    }
                ],
                ttl: 300
            }
        );
        let rec = seed("record", "message-v2");
        let fmt = fuzz_header(true).format();
        assert!(matches!(
            decode_record(&rec[2..], &fmt, SEGMENT_HEADER_LEN as u64),
            Ok((Record::Message(_), _))
        ));
        let img = seed("segment_scan", "whole-image");
        let (_, offs) = segment_image(&[b"one\r\n", b"two\r\n"], 16);
        assert_eq!(scan_checked(&img).1, vec![(offs[0], 1), (offs[1], 2)]);
    }

    /// Writes `fuzz/seeds/` from [`seeds`]: `cargo test --lib fuzzing::tests::write_seeds -- --ignored`.
    #[test]
    #[ignore]
    fn write_seeds() {
        for (target, name, bytes) in seeds() {
            let dir = fuzz_dir().join("seeds").join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
}
