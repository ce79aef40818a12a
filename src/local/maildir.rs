//! The Maildir format as shardmta writes it: where a user's Maildir is, the unique file names, the headers
//! added at delivery (Return-Path, Delivered-To), mail-loop detection, and how file-system errors map to
//! delivery results. Maildirs are opened and created by [`super::safe_path`]; the batched tmp/ -> fsync ->
//! new/ -> directory fsync sequence runs in [`super::shard`].
//!
//! File names are `<arrival seconds>.Q<queue id>R<recipient index>.<host>,S=<size>`: unique per the Maildir
//! rules (the queue id is unique on this host across restarts) and the same on every attempt, so a delivery
//! repeated after a crash replaces its own earlier copy in new/ instead of adding a second one. Content is
//! stored with LF line ends, as Postfix's local(8) and Dovecot's LDA do.

use std::io;
use std::path::{Path, PathBuf};

use super::maps::Account;
use crate::queue::QueueId;

/// Where Maildirs are: the `mailbox_path` template resolved for one user.
#[derive(Debug, Clone)]
pub struct MailboxLayout {
    template: String,
    /// Base of relative templates (the queue directory).
    base: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("mailbox_path uses {{home}} but {0} has no system account")]
    NoHome(String),
}

impl MailboxLayout {
    pub fn new(template: &str, base: &Path) -> MailboxLayout {
        MailboxLayout {
            template: template.to_string(),
            base: base.to_path_buf(),
        }
    }

    /// The Maildir of `user` (no extension, lower case, checked by
    /// [`super::recipients::valid_mailbox_name`]) in `domain`.
    pub fn maildir(
        &self,
        user: &str,
        domain: &str,
        account: Option<&Account>,
    ) -> Result<PathBuf, LayoutError> {
        let mut p = self
            .template
            .replace("{user}", user)
            .replace("{domain}", domain);
        if p.contains("{home}") {
            let home = account
                .map(|a| a.home.as_str())
                .filter(|h| h.starts_with('/'))
                .ok_or_else(|| LayoutError::NoHome(user.to_string()))?;
            p = p.replace("{home}", home);
        }
        // Relative: below the queue directory (itself relative to the working directory if it is relative).
        Ok(self.base.join(p))
    }
}

/// The file name of recipient `index` of message `id` (see the module doc).
pub fn file_name(arrival_unix_s: u64, id: QueueId, index: u32, host: &str, size: usize) -> String {
    let mut h = String::with_capacity(host.len());
    for c in host.chars() {
        match c {
            '/' => h.push_str("\\057"),
            ':' => h.push_str("\\072"),
            _ => h.push(c),
        }
    }
    format!("{arrival_unix_s}.Q{id}R{index}.{h},S={size}")
}

/// Counts `Delivered-To:` header fields in `header` whose value is `rcpt` (case-insensitive).
pub fn delivered_to_count(header: &[u8], rcpt: &str) -> usize {
    const NAME: &[u8] = b"delivered-to:";
    header
        .split(|&b| b == b'\n')
        .filter(|line| {
            line.len() > NAME.len() && line[..NAME.len()].eq_ignore_ascii_case(NAME) && {
                let v = line[NAME.len()..].trim_ascii();
                let v = v.strip_prefix(b"<").unwrap_or(v);
                let v = v.strip_suffix(b">").unwrap_or(v);
                v.eq_ignore_ascii_case(rcpt.as_bytes())
            }
        })
        .count()
}

/// The header section of a message (up to the first empty line), or all of it if there is no body.
pub fn header_section(data: &[u8]) -> &[u8] {
    match memchr::memmem::find(data, b"\r\n\r\n") {
        Some(i) => &data[..i + 2],
        None => data,
    }
}

/// Appends `src` to `out` with CRLF line ends turned into LF (one pass, memchr-driven).
pub fn push_lf(out: &mut Vec<u8>, src: &[u8]) {
    let mut rest = src;
    while let Some(i) = memchr::memchr(b'\r', rest) {
        out.extend_from_slice(&rest[..i]);
        if rest.get(i + 1) == Some(&b'\n') {
            rest = &rest[i + 1..];
        } else {
            out.push(b'\r');
            rest = &rest[i + 1..];
        }
    }
    out.extend_from_slice(rest);
}

/// The file content for one recipient: Return-Path and Delivered-To, then the stored Received header and the
/// message, LF line ends.
pub fn content(sender: &str, rcpt: &str, received: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + sender.len() + rcpt.len() + received.len() + data.len());
    out.extend_from_slice(b"Return-Path: <");
    out.extend_from_slice(sender.as_bytes());
    out.extend_from_slice(b">\nDelivered-To: ");
    out.extend_from_slice(rcpt.as_bytes());
    out.push(b'\n');
    push_lf(&mut out, received);
    push_lf(&mut out, data);
    out
}

/// Permissions of delivered files.
pub const FILE_MODE: u32 = 0o600;

/// The deferral reply for a file-system error: 4.2.2 when the disk or quota is full, else 4.3.0.
pub fn defer_reply(what: &str, path: &Path, e: &io::Error) -> String {
    let full = matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) || matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT));
    if full {
        format!(
            "452 4.2.2 mailbox full: cannot {what} {}: {e}",
            path.display()
        )
    } else {
        format!("451 4.3.0 cannot {what} {}: {e}", path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_templates() {
        let l = MailboxLayout::new("mail/{domain}/{user}/Maildir", Path::new("/spool"));
        assert_eq!(
            l.maildir("alice", "example.com", None).unwrap(),
            PathBuf::from("/spool/mail/example.com/alice/Maildir")
        );
        let h = MailboxLayout::new("{home}/Maildir", Path::new("/spool"));
        let acct = Account {
            uid: 1000,
            gid: 1000,
            home: "/home/alice".into(),
        };
        assert_eq!(
            h.maildir("alice", "x", Some(&acct)).unwrap(),
            PathBuf::from("/home/alice/Maildir")
        );
        assert_eq!(
            h.maildir("bob", "x", None),
            Err(LayoutError::NoHome("bob".into()))
        );
        // The default spool is relative (./spool): so is the Maildir below it.
        let rel = MailboxLayout::new("mail/{domain}/{user}/Maildir", Path::new("./spool"));
        assert_eq!(
            rel.maildir("root", "localhost", None).unwrap(),
            PathBuf::from("./spool/mail/localhost/root/Maildir")
        );
    }

    #[test]
    fn names_are_stable_and_safe() {
        let id = QueueId::from_parts(1_700_000_000, 1, 42);
        let a = file_name(1_700_000_123, id, 3, "mx/a:b", 1024);
        assert_eq!(a, format!("1700000123.Q{id}R3.mx\\057a\\072b,S=1024"));
        assert_eq!(a, file_name(1_700_000_123, id, 3, "mx/a:b", 1024));
        assert_ne!(a, file_name(1_700_000_123, id, 4, "mx/a:b", 1024));
    }

    #[test]
    fn delivered_to_counting() {
        let h = b"Received: x\r\nDelivered-To: Alice@Example.com\r\ndelivered-to: <alice@example.com>\r\nDelivered-To: bob@example.com\r\nSubject: s\r\n";
        assert_eq!(delivered_to_count(h, "alice@example.com"), 2);
        assert_eq!(delivered_to_count(h, "bob@example.com"), 1);
        assert_eq!(delivered_to_count(h, "carol@example.com"), 0);
        assert_eq!(
            header_section(b"A: b\r\n\r\nDelivered-To: x\r\n"),
            b"A: b\r\n"
        );
    }

    #[test]
    fn content_has_lf_line_ends_and_headers_first() {
        let c = content(
            "s@x",
            "r@y",
            b"Received: by h\r\n",
            b"Subject: t\r\n\r\na\rb\r\n",
        );
        assert_eq!(
            c,
            b"Return-Path: <s@x>\nDelivered-To: r@y\nReceived: by h\nSubject: t\n\na\rb\n".to_vec()
        );
    }

    #[test]
    fn error_classes() {
        let full = io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(defer_reply("write", Path::new("/m"), &full).starts_with("452 4.2.2"));
        let ro = io::Error::from_raw_os_error(libc::EROFS);
        assert!(defer_reply("write", Path::new("/m"), &ro).starts_with("451 4.3.0"));
    }
}
