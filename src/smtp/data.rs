//! Message content decoding as it is received: DATA (dot-unstuffing, end-of-data detection) and BDAT chunks,
//! both with one line-end policy and line folding, streaming over chunks.
//!
//! End of data is recognised only as `CRLF . CRLF` (the `.` line must start right after a CRLF and end with
//! CRLF). Bare LF and bare CR never end the data, so `LF.LF`, `CR.CR`, `LF.CRLF`, `CRLF.LF`, `CR.CRLF` and
//! `CRLF.CR` stay content (SMTP smuggling). No stored message holds a bare CR or a bare LF, so none leaves
//! with one: with [`BareNewline::Normal`] (Postfix 3.9's `smtpd_forbid_bare_newline = normal`) a bare LF or a
//! bare CR (a CR not followed by LF) ends its line and is stored as CRLF; with [`BareNewline::Reject`] the
//! first one aborts the message. Lines longer than the fold length (`smtp_line_length_limit`, 998 by default
//! as RFC 5321 allows 1000 with the CRLF) are broken by inserting CRLF SPACE, as Postfix's SMTP client does.
//! Output is bounded: past `limit` bytes the decoder keeps parsing to find the end but stores nothing.

use memchr::memchr2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BareNewline {
    Normal,
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the first byte of a line; `clean` = the previous line ended with CRLF.
    LineStart { clean: bool },
    /// Saw `.` at line start.
    Dot { clean: bool },
    /// Saw `.` CR at line start.
    DotCr { clean: bool },
    /// Inside a line; `cr` = the last byte taken was a CR not yet known to be followed by LF (not stored yet).
    InLine { cr: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataStatus {
    /// All input consumed, end not seen yet.
    More,
    /// End of data seen; the decoder consumed exactly up to and including the final CRLF.
    Done,
    /// A bare LF or bare CR under [`BareNewline::Reject`].
    BareLineEnd,
}

/// Line breaking and length accounting shared by DATA and BDAT: stores content, ends lines with CRLF, folds
/// lines longer than `fold` bytes (0: never) with CRLF SPACE, and bounds what is stored by `limit`.
#[derive(Debug)]
struct LineWriter {
    limit: u64,
    fold: usize,
    /// Bytes of content seen (stored or not).
    seen: u64,
    /// Bytes on the current line so far.
    line_len: usize,
    saw_8bit: bool,
}

impl LineWriter {
    fn new(limit: u64, fold: usize) -> Self {
        LineWriter {
            limit,
            // A continuation line holds its SPACE and at least one byte, so no fold below 2 can be honoured;
            // 1 is taken as 2 (with 1 the folding loop never advanced: a hang, found by fuzzing).
            fold: if fold == 1 { 2 } else { fold },
            seen: 0,
            line_len: 0,
            saw_8bit: false,
        }
    }

    fn emit(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        let room = self.limit.saturating_sub(self.seen);
        let take = (bytes.len() as u64).min(room) as usize;
        out.extend_from_slice(&bytes[..take]);
        self.seen += bytes.len() as u64;
    }

    /// Content without line ends.
    #[inline]
    fn content(&mut self, out: &mut Vec<u8>, mut bytes: &[u8]) {
        if !self.saw_8bit && !bytes.is_ascii() {
            self.saw_8bit = true;
        }
        while self.fold > 0 && self.line_len + bytes.len() > self.fold {
            let take = self.fold - self.line_len.min(self.fold);
            self.emit(out, &bytes[..take]);
            self.emit(out, b"\r\n ");
            self.line_len = 1;
            bytes = &bytes[take..];
        }
        self.emit(out, bytes);
        self.line_len += bytes.len();
    }

    /// More content came than `limit` (nothing past it was stored).
    fn over_limit(&self) -> bool {
        self.seen > self.limit
    }

    /// Stores nothing more (what follows is still counted).
    fn stop_storing(&mut self) {
        self.limit = self.limit.min(self.seen);
    }

    #[inline]
    fn end_line(&mut self, out: &mut Vec<u8>) {
        self.emit(out, b"\r\n");
        self.line_len = 0;
    }
}

/// Streaming decoder for one message's DATA content.
#[derive(Debug)]
pub struct DataDecoder {
    state: State,
    mode: BareNewline,
    w: LineWriter,
}

impl DataDecoder {
    /// `limit`: most bytes stored; `fold`: longest line stored (0: no folding; 1 is taken as 2).
    pub fn new(mode: BareNewline, limit: u64, fold: usize) -> Self {
        DataDecoder {
            state: State::LineStart { clean: true },
            mode,
            w: LineWriter::new(limit, fold),
        }
    }

    /// Content bytes received so far (may exceed the limit: then nothing past the limit was stored).
    pub fn seen(&self) -> u64 {
        self.w.seen
    }

    pub fn over_limit(&self) -> bool {
        self.w.over_limit()
    }

    pub fn saw_8bit(&self) -> bool {
        self.w.saw_8bit
    }

    /// Stores nothing more (the rest is still parsed, to find the end).
    pub fn stop_storing(&mut self) {
        self.w.stop_storing()
    }

    /// A line ended by a bare LF or bare CR: stored as CRLF, or the message refused.
    fn bare_end(&mut self, out: &mut Vec<u8>) -> bool {
        if self.mode == BareNewline::Reject {
            return false;
        }
        self.w.end_line(out);
        self.state = State::LineStart { clean: false };
        true
    }

    /// Feeds `input`; appends decoded content to `out`. Returns bytes consumed and the status.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, DataStatus) {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::InLine { cr: true } => {
                    if input[i] == b'\n' {
                        i += 1;
                        self.w.end_line(out);
                        self.state = State::LineStart { clean: true };
                    } else if !self.bare_end(out) {
                        // A bare CR; the byte after it is looked at again at the start of the next line.
                        return (i, DataStatus::BareLineEnd);
                    }
                }
                State::InLine { cr: false } => {
                    // Bulk copy up to the next CR or LF: the hot path, one memchr2 per line.
                    let rest = &input[i..];
                    match memchr2(b'\r', b'\n', rest) {
                        None => {
                            self.w.content(out, rest);
                            i = input.len();
                        }
                        Some(j) => {
                            self.w.content(out, &rest[..j]);
                            if rest[j] == b'\n' {
                                i += j + 1;
                                if !self.bare_end(out) {
                                    return (i, DataStatus::BareLineEnd);
                                }
                            } else if rest.get(j + 1) == Some(&b'\n') {
                                i += j + 2;
                                self.w.end_line(out);
                                self.state = State::LineStart { clean: true };
                            } else {
                                i += j + 1;
                                self.state = State::InLine { cr: true };
                            }
                        }
                    }
                }
                State::LineStart { clean } => {
                    if input[i] == b'.' {
                        self.state = State::Dot { clean };
                        i += 1;
                    } else {
                        self.state = State::InLine { cr: false };
                    }
                }
                State::Dot { clean } => match input[i] {
                    b'\r' => {
                        self.state = State::DotCr { clean };
                        i += 1;
                    }
                    b'\n' => {
                        // ".\n": a dot line ended by bare LF is content, never the end.
                        i += 1;
                        if !self.bare_end(out) {
                            return (i, DataStatus::BareLineEnd);
                        }
                    }
                    // Transparency: drop the leading dot; the rest of the line is content.
                    _ => self.state = State::InLine { cr: false },
                },
                State::DotCr { clean } => {
                    if input[i] == b'\n' {
                        i += 1;
                        if clean {
                            self.state = State::LineStart { clean: true };
                            return (i, DataStatus::Done);
                        }
                        // "LF . CRLF" / "CR . CRLF": the dot line follows a bare line end, so it is content.
                        self.w.end_line(out);
                        self.state = State::LineStart { clean: true };
                    } else if !self.bare_end(out) {
                        // ". CR x": the bare CR ends the (empty, unstuffed) dot line.
                        return (i, DataStatus::BareLineEnd);
                    }
                }
            }
        }
        (i, DataStatus::More)
    }
}

/// Line-end normalisation and folding of BDAT chunks (RFC 3030 content is taken as it is, without
/// dot-stuffing or an end marker): a bare LF or bare CR ends its line as CRLF, or, under
/// [`BareNewline::Reject`], is reported.
#[derive(Debug)]
pub struct ChunkDecoder {
    mode: BareNewline,
    cr: bool,
    bare: bool,
    w: LineWriter,
}

impl ChunkDecoder {
    pub fn new(mode: BareNewline, limit: u64, fold: usize) -> Self {
        ChunkDecoder {
            mode,
            cr: false,
            bare: false,
            w: LineWriter::new(limit, fold),
        }
    }

    /// Takes the next bytes of a chunk (all of them).
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            if std::mem::take(&mut self.cr) {
                if input[0] == b'\n' {
                    input = &input[1..];
                    self.w.end_line(out);
                    continue;
                }
                self.bare_end(out);
            }
            match memchr2(b'\r', b'\n', input) {
                None => {
                    self.w.content(out, input);
                    return;
                }
                Some(j) => {
                    self.w.content(out, &input[..j]);
                    if input[j] == b'\n' {
                        self.bare_end(out);
                        input = &input[j + 1..];
                    } else if input.get(j + 1) == Some(&b'\n') {
                        self.w.end_line(out);
                        input = &input[j + 2..];
                    } else {
                        self.cr = true;
                        input = &input[j + 1..];
                    }
                }
            }
        }
    }

    fn bare_end(&mut self, out: &mut Vec<u8>) {
        if self.mode == BareNewline::Reject {
            self.bare = true;
        }
        self.w.end_line(out);
    }

    /// The last chunk ended: a CR left at its very end is a bare one.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if std::mem::take(&mut self.cr) {
            self.bare_end(out);
        }
    }

    /// A bare line end was seen under [`BareNewline::Reject`].
    pub fn saw_bare_line_end(&self) -> bool {
        self.bare
    }

    pub fn over_limit(&self) -> bool {
        self.w.over_limit()
    }

    pub fn saw_8bit(&self) -> bool {
        self.w.saw_8bit
    }

    /// Stores nothing more.
    pub fn stop_storing(&mut self) {
        self.w.stop_storing()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(mode: BareNewline, input: &[u8]) -> (Vec<u8>, DataStatus, usize) {
        let mut d = DataDecoder::new(mode, 1 << 20, 998);
        let mut out = Vec::new();
        let (n, st) = d.feed(input, &mut out);
        (out, st, n)
    }

    /// Feeding one byte at a time gives the same result as one chunk.
    fn decode_bytewise(input: &[u8]) -> (Vec<u8>, DataStatus, usize) {
        let mut d = DataDecoder::new(BareNewline::Normal, 1 << 20, 998);
        let mut out = Vec::new();
        for (k, b) in input.iter().enumerate() {
            let (_, st) = d.feed(std::slice::from_ref(b), &mut out);
            if st != DataStatus::More {
                return (out, st, k + 1);
            }
        }
        (out, DataStatus::More, input.len())
    }

    /// No bare CR and no bare LF: every CR is followed by LF and every LF preceded by CR.
    fn only_crlf(b: &[u8]) -> bool {
        b.iter().enumerate().all(|(i, &c)| match c {
            b'\r' => b.get(i + 1) == Some(&b'\n'),
            b'\n' => i > 0 && b[i - 1] == b'\r',
            _ => true,
        })
    }

    #[test]
    fn simple_message_and_unstuffing() {
        let (out, st, n) = decode(
            BareNewline::Normal,
            b"Subject: x\r\n\r\n..dot\r\n.\r\nMAIL FROM",
        );
        assert_eq!(st, DataStatus::Done);
        assert_eq!(out, b"Subject: x\r\n\r\n.dot\r\n");
        assert_eq!(n, b"Subject: x\r\n\r\n..dot\r\n.\r\n".len());
    }

    #[test]
    fn empty_message() {
        let (out, st, _) = decode(BareNewline::Normal, b".\r\n");
        assert_eq!((out.as_slice(), st), (&b""[..], DataStatus::Done));
    }

    #[test]
    fn smuggling_sequences_never_end_data() {
        for seq in [
            &b"a\n.\nMAIL"[..],
            b"a\r.\rMAIL",
            b"a\n.\r\nMAIL",
            b"a\r\n.\nMAIL",
            b"a\r\n.\r.\r\nX",
            b"a\r.\r\nMAIL",
            b"a\r\n.\rMAIL",
        ] {
            let (_, st, _) = decode(BareNewline::Normal, seq);
            assert_eq!(st, DataStatus::More, "{seq:?}");
            let (_, st, _) = decode_bytewise(seq);
            assert_eq!(st, DataStatus::More, "{seq:?}");
        }
        // The smuggled command stays inside the message and the real end still works.
        let (out, st, _) = decode(BareNewline::Normal, b"a\n.\r\nMAIL FROM:<x@y>\r\n.\r\n");
        assert_eq!(st, DataStatus::Done);
        assert_eq!(out, b"a\r\n\r\nMAIL FROM:<x@y>\r\n");
    }

    /// The SMTP-smuggling sequences with bare CR: stored with CRLF only, so no receiver can take them as
    /// line ends of its own (or as an end of data), and the dot lines are plain content lines.
    #[test]
    fn bare_cr_is_stored_as_a_line_end() {
        for (input, want) in [
            (&b"a\r.\rMAIL\r\n.\r\n"[..], &b"a\r\n\r\nMAIL\r\n"[..]),
            (b"a\r.\r\nMAIL\r\n.\r\n", b"a\r\n\r\nMAIL\r\n"),
            (b"a\r\n.\rMAIL\r\n.\r\n", b"a\r\n\r\nMAIL\r\n"),
            (b"a\n.\rMAIL\r\n.\r\n", b"a\r\n\r\nMAIL\r\n"),
            (b"x\ry\r\r\n.\r\n", b"x\r\ny\r\n\r\n"),
            (b"..\rz\r\n.\r\n", b".\r\nz\r\n"),
        ] {
            let (out, st, n) = decode(BareNewline::Normal, input);
            assert_eq!(st, DataStatus::Done, "{input:?}");
            assert_eq!(n, input.len(), "{input:?}");
            assert_eq!(out, want, "{input:?}");
            assert!(only_crlf(&out));
            let (out2, st2, _) = decode_bytewise(input);
            assert_eq!((out2, st2), (out, st), "{input:?} bytewise");
        }
        // Reject mode refuses a bare CR as it refuses a bare LF.
        for input in [&b"ok\r\nbad\rmore"[..], b"ok\r\n.\rx", b"ok\r\nbad\r"] {
            let mut d = DataDecoder::new(BareNewline::Reject, 1 << 20, 998);
            let mut out = Vec::new();
            let (_, st) = d.feed(input, &mut out);
            let st = if st == DataStatus::More {
                d.feed(b"x", &mut out).1
            } else {
                st
            };
            assert_eq!(st, DataStatus::BareLineEnd, "{input:?}");
        }
    }

    #[test]
    fn reject_mode_stops_at_bare_lf() {
        assert_eq!(
            decode(BareNewline::Reject, b"ok\r\nbad\nmore").1,
            DataStatus::BareLineEnd
        );
        assert_eq!(
            decode(BareNewline::Reject, b"ok\r\n.\n").1,
            DataStatus::BareLineEnd
        );
        assert_eq!(
            decode(BareNewline::Reject, b"ok\r\n.\r\n").1,
            DataStatus::Done
        );
    }

    #[test]
    fn bytewise_equals_chunked() {
        let input = b"H: v\r\n..a\r\n.b\nc\r\r\n\xc3\xa9\r\n.\r\n";
        let a = decode(BareNewline::Normal, input);
        let b = decode_bytewise(input);
        assert_eq!(a, b);
        assert_eq!(a.0, b"H: v\r\n.a\r\nb\r\nc\r\n\r\n\xc3\xa9\r\n");
    }

    #[test]
    fn limit_bounds_output_but_finds_end() {
        let mut d = DataDecoder::new(BareNewline::Normal, 10, 998);
        let mut out = Vec::new();
        let body = [b"x".repeat(100), b"\r\n.\r\n".to_vec()].concat();
        let (_, st) = d.feed(&body, &mut out);
        assert_eq!(st, DataStatus::Done);
        assert_eq!(out.len(), 10);
        assert!(d.over_limit());
    }

    /// Lines over the fold length are broken with CRLF SPACE (RFC 5321's 1,000 bytes with the CRLF); every
    /// stored line is then at most 998 bytes, in any chunking.
    #[test]
    fn long_lines_are_folded() {
        let line = vec![b'a'; 5000];
        let input = [&b"Subject: x\r\n\r\n"[..], &line, b"\r\nshort\r\n.\r\n"].concat();
        let (out, st, _) = decode(BareNewline::Normal, &input);
        assert_eq!(st, DataStatus::Done);
        for l in out.split(|&b| b == b'\n') {
            assert!(l.len() <= 999, "line of {}", l.len());
        }
        let joined: Vec<u8> = out
            .windows(3)
            .filter(|w| w != b"\r\n ")
            .map(|w| w[0])
            .collect();
        assert_eq!(joined.iter().filter(|&&b| b == b'a').count(), 5000);
        assert!(out.ends_with(b"\r\nshort\r\n"));
        let (out2, _, _) = decode_bytewise(&input);
        assert_eq!(out2, out);
        // Exactly 998 bytes: untouched.
        let input = [vec![b'b'; 998], b"\r\n.\r\n".to_vec()].concat();
        let (out, _, _) = decode(BareNewline::Normal, &input);
        assert_eq!(out, [vec![b'b'; 998], b"\r\n".to_vec()].concat());
        // Fold 0: nothing folded.
        let mut d = DataDecoder::new(BareNewline::Normal, 1 << 20, 0);
        let mut out = Vec::new();
        d.feed(
            &[vec![b'c'; 3000], b"\r\n.\r\n".to_vec()].concat(),
            &mut out,
        );
        assert_eq!(out.len(), 3002);
    }

    /// Fold length 1 (below what the configuration allows, but the constructors take any) looped forever
    /// inserting CRLF SPACE without taking a byte; it is now taken as 2.
    #[test]
    fn fold_of_one_terminates() {
        let mut d = DataDecoder::new(BareNewline::Normal, 1 << 20, 1);
        let mut out = Vec::new();
        assert_eq!(d.feed(b"abc\r\n.\r\n", &mut out), (8, DataStatus::Done));
        assert_eq!(out, b"ab\r\n c\r\n");
        let mut c = ChunkDecoder::new(BareNewline::Normal, 1 << 20, 1);
        let mut out = Vec::new();
        c.feed(b"xyz", &mut out);
        c.feed(b"w", &mut out);
        c.finish(&mut out);
        assert_eq!(out, b"xy\r\n z\r\n w");
    }

    #[test]
    fn chunks_are_normalised_in_any_split() {
        let input = b"a\rb\nc\r\nd\r\r\n.\r.\r\nend\r";
        let want = b"a\r\nb\r\nc\r\nd\r\n\r\n.\r\n.\r\nend\r\n";
        for split in 0..input.len() {
            let mut d = ChunkDecoder::new(BareNewline::Normal, 1 << 20, 998);
            let mut out = Vec::new();
            d.feed(&input[..split], &mut out);
            d.feed(&input[split..], &mut out);
            d.finish(&mut out);
            assert_eq!(out, want, "split at {split}");
            assert!(!d.saw_bare_line_end());
        }
        let mut d = ChunkDecoder::new(BareNewline::Reject, 1 << 20, 998);
        let mut out = Vec::new();
        d.feed(b"fine\r\n", &mut out);
        assert!(!d.saw_bare_line_end());
        d.feed(b"x\ry", &mut out);
        assert!(d.saw_bare_line_end());
        let mut d = ChunkDecoder::new(BareNewline::Normal, 1 << 20, 10);
        let mut out = Vec::new();
        d.feed(&[b'z'; 25], &mut out);
        d.finish(&mut out);
        assert_eq!(out, b"zzzzzzzzzz\r\n zzzzzzzzz\r\n zzzzzz");
    }
}
