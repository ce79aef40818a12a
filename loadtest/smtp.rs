//! The load tester's message pieces: message ids and the test-message generator. The SMTP dialogue is the
//! library's client session ([`shardmta::smtp::client_session`]) and its one reply parser.

use std::io::Write as _;

pub use shardmta::smtp::reply_parser::ParseError;

/// Unique message token: run nonce + message index, fixed width.
pub fn message_id_token(out: &mut String, nonce: u64, index: u64) {
    use std::fmt::Write as _;
    out.clear();
    let _ = write!(out, "{nonce:016x}-{index:010}");
}

/// Printable filler without '.', so no generated line can start with a dot.
const FILL: &[u8] =
    b"Lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor \
incididunt ut labore et dolore magna aliqua 0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ ";
/// Content bytes per full body line (CRLF excluded).
const BODY_LINE: usize = 76;

/// Builds a message of exactly `size` bytes (when `size` exceeds the
/// headers, and is not headers + 1), without the terminating `.\r\n`.
/// Every line is CRLF-terminated printable ASCII, at most 998 bytes, and
/// none starts with '.'.
pub fn build_message(out: &mut Vec<u8>, id: &str, from: &str, size: usize) {
    out.clear();
    let _ = write!(
        out,
        "From: <{from}>\r\nTo: undisclosed-recipients:;\r\nSubject: shardmta loadtest {id}\r\n\
         Message-ID: <{id}@loadtest.shardmta.invalid>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=us-ascii\r\nX-Loadtest-Id: {id}\r\n\r\n"
    );
    let mut remaining = size.saturating_sub(out.len());
    let mut line_no = 0usize;
    while remaining > 0 {
        let full = BODY_LINE + 2;
        let content = if remaining >= full + 3 || remaining == full {
            BODY_LINE
        } else if remaining > full {
            // Leave exactly three bytes for a final one-character line.
            remaining - 5
        } else {
            // Final line; with remaining == 1 this overshoots by one byte.
            remaining.saturating_sub(2)
        };
        let off = (line_no * 7) % FILL.len();
        let mut left = content;
        let mut at = off;
        while left > 0 {
            let take = left.min(FILL.len() - at);
            out.extend_from_slice(&FILL[at..at + take]);
            left -= take;
            at = 0;
        }
        out.extend_from_slice(b"\r\n");
        remaining = remaining.saturating_sub(content + 2);
        line_no += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_message(m: &[u8]) {
        assert!(m.ends_with(b"\r\n"));
        let body = &m[..m.len() - 2];
        for line in body.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            assert!(!line.contains(&b'\r'), "bare CR");
            assert!(!line.starts_with(b"."), "dot line");
            assert!(line.len() <= 998);
            assert!(line.iter().all(|b| (0x20..0x7f).contains(b)), "unprintable");
        }
        // Every LF is preceded by CR.
        for (i, b) in m.iter().enumerate() {
            if *b == b'\n' {
                assert!(i > 0 && m[i - 1] == b'\r');
            }
        }
    }

    #[test]
    fn message_exact_size_and_clean_lines() {
        let mut id = String::new();
        message_id_token(&mut id, 0xdead_beef, 7);
        let mut m = Vec::new();
        build_message(&mut m, &id, "loadtest@example.com", 0);
        let header_len = m.len();
        check_message(&m);
        for size in (header_len..header_len + 400)
            .chain([1024, 4096, 65536, 1 << 20])
            .filter(|&s| s != header_len + 1)
        {
            build_message(&mut m, &id, "loadtest@example.com", size);
            assert_eq!(m.len(), size, "size {size}");
            check_message(&m);
        }
    }

    #[test]
    fn message_has_unique_id_headers() {
        let mut a = String::new();
        let mut b = String::new();
        message_id_token(&mut a, 1, 1);
        message_id_token(&mut b, 1, 2);
        assert_ne!(a, b);
        assert_eq!(a.len(), b.len());
        let mut m = Vec::new();
        build_message(&mut m, &a, "x@y", 1024);
        let text = String::from_utf8(m).expect("ascii");
        assert!(text.contains(&format!("Message-ID: <{a}@")));
        assert!(text.contains(&format!("Subject: shardmta loadtest {a}\r\n")));
        let mut ids = std::collections::HashSet::new();
        for i in 0..10_000 {
            message_id_token(&mut a, 99, i);
            assert!(ids.insert(a.clone()));
        }
    }
}
