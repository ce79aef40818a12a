//! DKIM's "relaxed" canonicalisation (RFC 6376 section 3.4.2 and 3.4.4) on borrowed bytes: the header fields of
//! a message as stored (CRLF line ends), one header field made canonical, the body hashed as a stream, and the
//! From: domain. Pure functions, no allocation per body byte.

use ring::digest;

/// Header fields read in one message at most: a message with more is not signed (a signature over the fields
/// within the bound would not verify when a named field also occurs past it, since a verifier takes the named
/// fields from the bottom of the whole header section).
pub const HEADER_FIELDS_MAX: usize = 1000;

/// One header field of the stored message: its name and the whole field (name, colon, value with folding,
/// and the final CRLF).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field<'a> {
    pub name: &'a [u8],
    pub raw: &'a [u8],
}

/// The header fields of `data` (up to the empty line that ends them) and the offset where the body starts
/// (after the empty line; `data.len()` without one: all header, empty body); None for more than
/// [`HEADER_FIELDS_MAX`] fields. A line without a colon ends the header section too (it cannot be a field; what
/// follows is taken as body, as a verifier would see it).
pub fn header_fields(data: &[u8]) -> Option<(Vec<Field<'_>>, usize)> {
    let mut fields = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        if data[pos..].starts_with(b"\r\n") {
            return Some((fields, pos + 2));
        }
        if fields.len() == HEADER_FIELDS_MAX {
            return None;
        }
        // A field runs to the CRLF not followed by WSP.
        let mut end = pos;
        loop {
            match memchr::memmem::find(&data[end..], b"\r\n") {
                Some(i) => {
                    end += i + 2;
                    if end < data.len() && (data[end] == b' ' || data[end] == b'\t') {
                        continue;
                    }
                    break;
                }
                None => {
                    end = data.len();
                    break;
                }
            }
        }
        let raw = &data[pos..end];
        let Some(colon) = memchr::memchr(b':', raw) else {
            return Some((fields, pos));
        };
        let name = trim_wsp_end(&raw[..colon]);
        if name.is_empty() || name.iter().any(|&b| b == b' ' || b == b'\t' || b == b'\r') {
            return Some((fields, pos));
        }
        fields.push(Field { name, raw });
        pos = end;
    }
    // The data ended inside the header section: no body.
    Some((fields, data.len()))
}

fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_wsp_end(s: &[u8]) -> &[u8] {
    let mut e = s.len();
    while e > 0 && is_wsp(s[e - 1]) {
        e -= 1;
    }
    &s[..e]
}

/// Appends the relaxed canonical form of one header field (`name:value` with CRLF) to `out`: the name in lower
/// case, the value unfolded, runs of WSP made one SP, WSP at the end and around the colon removed.
/// `with_crlf = false` leaves the final CRLF off (the DKIM-Signature field itself is hashed so).
pub fn relaxed_header(raw: &[u8], out: &mut Vec<u8>, with_crlf: bool) {
    let Some(colon) = memchr::memchr(b':', raw) else {
        return;
    };
    for &b in trim_wsp_end(&raw[..colon]) {
        out.push(b.to_ascii_lowercase());
    }
    out.push(b':');
    let mut wsp = false;
    let mut started = false;
    for &b in &raw[colon + 1..] {
        match b {
            b'\r' | b'\n' => {} // unfolding; the CRLF before WSP vanishes, the WSP stays as WSP
            b' ' | b'\t' => wsp = true,
            _ => {
                if wsp && started {
                    out.push(b' ');
                }
                wsp = false;
                started = true;
                out.push(b);
            }
        }
    }
    if with_crlf {
        out.extend_from_slice(b"\r\n");
    }
}

/// The relaxed body canonicalisation fed, as the bytes stream past, into a SHA-256: WSP runs within a line become
/// one SP, WSP at a line's end is dropped, empty lines at the end are dropped, a last line without CRLF gets
/// one. Only CRLF ends a line (the stored form has no other line end); a CR alone is content.
pub struct BodyHasher {
    ctx: digest::Context,
    /// Empty lines seen and not yet written (they are dropped if nothing follows them).
    empty_lines: usize,
    /// WSP seen in the current line since its last content byte, not yet written (one SP if content follows).
    wsp: bool,
    /// The current line has content (a non-WSP byte) already written.
    content: bool,
    /// The previous chunk ended with a CR whose LF may come in the next one.
    cr: bool,
    buf: [u8; 512],
    len: usize,
}

impl Default for BodyHasher {
    fn default() -> Self {
        BodyHasher::new()
    }
}

impl BodyHasher {
    pub fn new() -> BodyHasher {
        BodyHasher {
            ctx: digest::Context::new(&digest::SHA256),
            empty_lines: 0,
            wsp: false,
            content: false,
            cr: false,
            buf: [0; 512],
            len: 0,
        }
    }

    fn emit(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() > self.buf.len() {
            self.ctx.update(&self.buf[..self.len]);
            self.len = 0;
            if bytes.len() > self.buf.len() {
                self.ctx.update(bytes);
                return;
            }
        }
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    fn line_end(&mut self) {
        if self.content {
            self.emit(b"\r\n");
        } else {
            self.empty_lines += 1;
        }
        self.content = false;
        self.wsp = false;
    }

    fn content_bytes(&mut self, run: &[u8]) {
        if !self.content {
            while self.empty_lines > 0 {
                self.emit(b"\r\n");
                self.empty_lines -= 1;
            }
            self.content = true;
        }
        // WSP before content (within the line or at its start) is reduced to one SP, never removed.
        if self.wsp {
            self.emit(b" ");
            self.wsp = false;
        }
        self.emit(run);
    }

    /// Feeds the next bytes of the body.
    pub fn update(&mut self, mut input: &[u8]) {
        if self.cr {
            self.cr = false;
            if input.first() == Some(&b'\n') {
                self.line_end();
                input = &input[1..];
            } else {
                self.content_bytes(b"\r");
            }
        }
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            if is_wsp(b) {
                self.wsp = true;
                i += 1;
            } else if b == b'\r' {
                if i + 1 == input.len() {
                    self.cr = true;
                    return;
                }
                if input[i + 1] == b'\n' {
                    self.line_end();
                    i += 2;
                } else {
                    self.content_bytes(b"\r");
                    i += 1;
                }
            } else {
                // A run of plain content bytes, written at once.
                let start = i;
                while i < input.len() && !is_wsp(input[i]) && input[i] != b'\r' {
                    i += 1;
                }
                self.content_bytes(&input[start..i]);
            }
        }
    }

    /// The SHA-256 of the canonical body.
    pub fn finish(mut self) -> digest::Digest {
        if self.cr {
            self.cr = false;
            self.content_bytes(b"\r");
        }
        if self.content {
            self.emit(b"\r\n");
        }
        self.ctx.update(&self.buf[..self.len]);
        self.ctx.finish()
    }
}
