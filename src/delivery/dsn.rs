//! Delivery status notifications (RFC 3464): the multipart/report message sent to the envelope sender, with the
//! null sender, when recipients bounce or expire. Never for a message whose own sender is null (no bounce of a
//! bounce).

use std::fmt::Write as _;

use crate::smtp::session::rfc5322_date;

/// Most bytes of the original header copied into the report.
const ORIGINAL_HEADER_BYTES_MAX: usize = 64 * 1024;

/// One failed recipient in the report.
pub struct FailedRcpt<'a> {
    pub address: &'a str,
    pub status: crate::smtp::reply_parser::EnhancedCode,
    /// The remote reply or the reason (`550 5.1.1 No such user`).
    pub diagnostic: &'a str,
    pub remote_mta: Option<&'a str>,
}

/// The original message's header section (up to the first empty line), bounded.
pub fn header_section(data: &[u8]) -> &[u8] {
    let end = memchr::memmem::find(data, b"\r\n\r\n")
        .map(|i| i + 2)
        .unwrap_or(data.len());
    &data[..end.min(ORIGINAL_HEADER_BYTES_MAX)]
}

/// A bounce ready to be queued: its id (allocated from the original's queue), its null-sender envelope, its
/// Received header and content.
#[derive(Debug)]
pub struct QueuedBounce {
    pub id: crate::queue::QueueId,
    pub env: crate::queue::Envelope,
    pub received: Vec<u8>,
    pub data: Vec<u8>,
}

#[allow(clippy::too_many_arguments)]
/// The bounce of `original` (pending in `store`) for `failed`, to its sender, with the original's header
/// section; its id is allocated from `store`. The caller queues it (never for a null sender).
pub fn queued_bounce(
    store: &mut crate::queue::QueueStore,
    hostname: &str,
    original: crate::queue::QueueId,
    env: &crate::queue::Envelope,
    failed: &[FailedRcpt<'_>],
    now_unix_ms: u64,
    expired: bool,
) -> QueuedBounce {
    let headers = store
        .message_data(original)
        .map(|(_, data)| header_section(data).to_vec())
        .unwrap_or_default();
    let data = build(
        hostname,
        &env.sender,
        &original.to_string(),
        env.arrival_unix_ms / 1000,
        now_unix_ms / 1000,
        failed,
        &headers,
        expired,
    );
    let id = store.allocate_id();
    let received = format!(
        "Received: by {hostname} (shardmta) id {id}; {}\r\n",
        crate::smtp::session::rfc5322_date(now_unix_ms / 1000)
    )
    .into_bytes();
    QueuedBounce {
        id,
        env: crate::queue::Envelope {
            sender: String::new(),
            recipients: vec![env.sender.clone()],
            arrival_unix_ms: now_unix_ms,
            ..Default::default()
        },
        received,
        data,
    }
}

/// Builds the whole DSN message (headers and body, CRLF line ends).
#[allow(clippy::too_many_arguments)]
pub fn build(
    hostname: &str,
    sender: &str,
    original_id: &str,
    arrival_unix_s: u64,
    now_unix_s: u64,
    failed: &[FailedRcpt<'_>],
    original_headers: &[u8],
    expired: bool,
) -> Vec<u8> {
    let boundary = format!("{original_id}.{now_unix_s}/{hostname}");
    let mut m = String::with_capacity(2048 + original_headers.len());
    let _ = write!(
        m,
        "From: MAILER-DAEMON@{hostname} (Mail Delivery System)\r\n\
         To: {sender}\r\n\
         Subject: Undelivered Mail Returned to Sender\r\n\
         Date: {}\r\n\
         Message-ID: <{original_id}.{now_unix_s}.dsn@{hostname}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\
         \r\n\
         This is a MIME-encapsulated message.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Description: Notification\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         This is the mail system at host {hostname}.\r\n\
         \r\n\
         I'm sorry to have to inform you that your message could not\r\n\
         be delivered to one or more recipients{}.\r\n\
         \r\n",
        rfc5322_date(now_unix_s),
        if expired { " within the time allowed" } else { "" },
    );
    for f in failed {
        let _ = write!(m, "<{}>: {}\r\n", f.address, ascii_line(f.diagnostic));
    }
    let _ = write!(
        m,
        "\r\n--{boundary}\r\n\
         Content-Description: Delivery report\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; {hostname}\r\n\
         X-Shardmta-Queue-ID: {original_id}\r\n\
         Arrival-Date: {}\r\n",
        rfc5322_date(arrival_unix_s)
    );
    for f in failed {
        let status = f.status;
        let _ = write!(
            m,
            "\r\nFinal-Recipient: rfc822; {}\r\nAction: failed\r\nStatus: {status}\r\n",
            f.address
        );
        if let Some(r) = f.remote_mta {
            let _ = write!(m, "Remote-MTA: dns; {}\r\n", ascii_line(r));
        }
        let _ = write!(m, "Diagnostic-Code: smtp; {}\r\n", ascii_line(f.diagnostic));
    }
    let _ = write!(m, "\r\n--{boundary}\r\nContent-Description: Undelivered Message Headers\r\nContent-Type: text/rfc822-headers\r\n\r\n");
    let mut out = m.into_bytes();
    out.extend_from_slice(original_headers);
    if !original_headers.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// One line of printable ASCII (reply texts are untrusted).
fn ascii_line(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                ' '
            }
        })
        .take(990)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_has_the_rfc3464_parts() {
        let orig = b"Subject: hi\r\nMessage-ID: <x@y>\r\n\r\nbody that must not be copied\r\n";
        let dsn = build(
            "mx.test",
            "alice@client.test",
            "ABCDEF0123456789",
            0,
            60,
            &[FailedRcpt {
                address: "bob@remote.test",
                status: crate::smtp::reply_parser::EnhancedCode::new(5, 1, 1),
                diagnostic: "550 5.1.1 No such user\r\nX",
                remote_mta: Some("mx.remote.test"),
            }],
            header_section(orig),
            false,
        );
        let s = String::from_utf8(dsn).unwrap();
        assert!(s.contains("Content-Type: multipart/report; report-type=delivery-status;"));
        assert!(s.contains(
            "Final-Recipient: rfc822; bob@remote.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        ));
        assert!(s.contains("Diagnostic-Code: smtp; 550 5.1.1 No such user  X\r\n"));
        assert!(s.contains(
            "Content-Type: text/rfc822-headers\r\n\r\nSubject: hi\r\nMessage-ID: <x@y>\r\n"
        ));
        assert!(!s.contains("body that must not be copied"));
        assert!(s.ends_with("--\r\n"));
        assert!(
            !s.contains("\n.") || !s.lines().any(|l| l == "."),
            "no bare dot lines"
        );
    }
}
