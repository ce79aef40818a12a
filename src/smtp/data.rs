//! DATA content decoding: dot-unstuffing, end-of-data detection and line-end policy, streaming over chunks.
//!
//! End of data is recognised only as `CRLF . CRLF` (the `.` line must start right after a CRLF and end with
//! CRLF). Bare LF and bare CR never end the data, so `LF.LF`, `CR.CR`, `LF.CRLF` and `CRLF.LF` stay content
//! (SMTP smuggling). With [`BareNewline::Normal`] (Postfix 3.9's `smtpd_forbid_bare_newline = normal`) a line
//! ending in bare LF is kept and stored with CRLF; with [`BareNewline::Reject`] the first bare LF aborts the
//! message. Output is bounded: past `limit` bytes the decoder keeps parsing to find the end but stores nothing.

use memchr::memchr;

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
    /// Inside a line; `cr` = the last byte taken was CR.
    InLine { cr: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataStatus {
    /// All input consumed, end not seen yet.
    More,
    /// End of data seen; the decoder consumed exactly up to and including the final CRLF.
    Done,
    /// A bare LF under [`BareNewline::Reject`].
    BareLf,
}

/// Streaming decoder for one message's DATA content.
#[derive(Debug)]
pub struct DataDecoder {
    state: State,
    mode: BareNewline,
    limit: u64,
    /// Bytes of content seen (stored or not), after unstuffing.
    seen: u64,
    saw_8bit: bool,
}

impl DataDecoder {
    pub fn new(mode: BareNewline, limit: u64) -> Self {
        DataDecoder {
            state: State::LineStart { clean: true },
            mode,
            limit,
            seen: 0,
            saw_8bit: false,
        }
    }

    /// Content bytes received so far (may exceed the limit: then nothing past the limit was stored).
    pub fn seen(&self) -> u64 {
        self.seen
    }

    pub fn over_limit(&self) -> bool {
        self.seen > self.limit
    }

    pub fn saw_8bit(&self) -> bool {
        self.saw_8bit
    }

    fn emit(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        let room = self.limit.saturating_sub(self.seen);
        let take = (bytes.len() as u64).min(room) as usize;
        out.extend_from_slice(&bytes[..take]);
        self.seen += bytes.len() as u64;
    }

    /// Feeds `input`; appends decoded content to `out`. Returns bytes consumed and the status.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, DataStatus) {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::InLine { cr } => {
                    // Bulk copy up to the next LF: the hot path, one memchr per line.
                    let rest = &input[i..];
                    match memchr(b'\n', rest) {
                        None => {
                            self.note_8bit(rest);
                            self.emit(out, rest);
                            self.state = State::InLine {
                                cr: rest.last() == Some(&b'\r'),
                            };
                            i = input.len();
                        }
                        Some(j) => {
                            let line = &rest[..j];
                            self.note_8bit(line);
                            let crlf = if j == 0 { cr } else { line[j - 1] == b'\r' };
                            if !crlf && self.mode == BareNewline::Reject {
                                return (i + j + 1, DataStatus::BareLf);
                            }
                            self.emit(out, line);
                            self.emit(out, if crlf { b"\n" } else { b"\r\n" });
                            self.state = State::LineStart { clean: crlf };
                            i += j + 1;
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
                        if self.mode == BareNewline::Reject {
                            return (i + 1, DataStatus::BareLf);
                        }
                        self.emit(out, b"\r\n");
                        self.state = State::LineStart { clean: false };
                        i += 1;
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
                        // "LF . CRLF": the dot line follows a bare LF, so it is content.
                        self.emit(out, b"\r\n");
                        self.state = State::LineStart { clean: true };
                    } else {
                        // ". CR x": the CR is content of a dot-stuffed line.
                        self.emit(out, b"\r");
                        self.state = State::InLine { cr: true };
                    }
                }
            }
        }
        (i, DataStatus::More)
    }

    fn note_8bit(&mut self, bytes: &[u8]) {
        if !self.saw_8bit && !bytes.is_ascii() {
            self.saw_8bit = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(mode: BareNewline, input: &[u8]) -> (Vec<u8>, DataStatus, usize) {
        let mut d = DataDecoder::new(mode, 1 << 20);
        let mut out = Vec::new();
        let (n, st) = d.feed(input, &mut out);
        (out, st, n)
    }

    /// Feeding one byte at a time gives the same result as one chunk.
    fn decode_bytewise(input: &[u8]) -> (Vec<u8>, DataStatus, usize) {
        let mut d = DataDecoder::new(BareNewline::Normal, 1 << 20);
        let mut out = Vec::new();
        for (k, b) in input.iter().enumerate() {
            let (_, st) = d.feed(std::slice::from_ref(b), &mut out);
            if st != DataStatus::More {
                return (out, st, k + 1);
            }
        }
        (out, DataStatus::More, input.len())
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

    #[test]
    fn reject_mode_stops_at_bare_lf() {
        assert_eq!(
            decode(BareNewline::Reject, b"ok\r\nbad\nmore").1,
            DataStatus::BareLf
        );
        assert_eq!(
            decode(BareNewline::Reject, b"ok\r\n.\n").1,
            DataStatus::BareLf
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
        assert_eq!(a.0, b"H: v\r\n.a\r\nb\r\nc\r\r\n\xc3\xa9\r\n");
    }

    #[test]
    fn limit_bounds_output_but_finds_end() {
        let mut d = DataDecoder::new(BareNewline::Normal, 10);
        let mut out = Vec::new();
        let body = [b"x".repeat(100), b"\r\n.\r\n".to_vec()].concat();
        let (_, st) = d.feed(&body, &mut out);
        assert_eq!(st, DataStatus::Done);
        assert_eq!(out.len(), 10);
        assert!(d.over_limit());
    }
}
