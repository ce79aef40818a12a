//! Delivery status notifications (RFC 3464): the multipart/report message sent to the envelope sender, with the
//! null sender, when recipients bounce or expire ("failed"), are still deferred after `delay_warning_time`
//! ("delayed"), or were delivered or relayed and asked for it with `NOTIFY=SUCCESS` ("delivered", "relayed"),
//! or, at acceptance, were addresses that aliases expanded into several recipients ("expanded", on the address
//! given, never on its members).
//! Never for a message whose own sender is null (no report of a report).
//!
//! The DSN extension's facts decide (RFC 3461): a recipient is in a failure report unless its NOTIFY leaves out
//! FAILURE (NEVER included), in a delay report unless its NOTIFY leaves out DELAY, in a success report only with
//! SUCCESS; its ORCPT is its `Original-Recipient:`, the message's ENVID the report's `Original-Envelope-Id:`.
//! A failure report returns the whole message (`message/rfc822`) when it is at most
//! `DSN_ORIGINAL_HEADER_BYTES_MAX` bytes, else its header section, and only the header section with `RET=HDRS`;
//! delay and success reports return the header section (RFC 3461 4.3). A returned part with 8-bit bytes is
//! marked `Content-Transfer-Encoding: 8bit` and the report is queued as 8BITMIME. Each report's Message-ID and
//! MIME boundary come from its own queue id.

use std::fmt::Write as _;

use crate::smtp::session::rfc5322_date;

/// Most bytes of the original copied into the report (its header section, or the whole message).
const ORIGINAL_HEADER_BYTES_MAX: usize = crate::limits::DSN_ORIGINAL_HEADER_BYTES_MAX;

/// One recipient in the report (failed, delayed, delivered...).
pub struct FailedRcpt<'a> {
    /// Its index among the original's recipients, where its DSN facts are (NOTIFY, ORCPT).
    pub index: u32,
    pub address: &'a str,
    pub status: crate::smtp::reply_parser::EnhancedCode,
    /// The remote reply or the reason (`550 5.1.1 No such user`).
    pub diagnostic: &'a str,
    pub remote_mta: Option<&'a str>,
}

/// What a report says happened (RFC 3464 `Action:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportKind {
    /// Bounced; `expired`: because the message's time in the queue ran out.
    Failed { expired: bool },
    /// Still deferred; retried until this time (unix s).
    Delayed { will_retry_until_unix_s: u64 },
    /// Delivered into a mailbox here.
    Delivered,
    /// Handed to a next hop that does not offer DSN.
    Relayed,
    /// Accepted for an alias or virtual address expanded here into several (RFC 3461 6.2.7.3: a mailing list);
    /// its members get no success report.
    Expanded,
}

impl ReportKind {
    fn action(self) -> &'static str {
        match self {
            ReportKind::Failed { .. } => "failed",
            ReportKind::Delayed { .. } => "delayed",
            ReportKind::Delivered => "delivered",
            ReportKind::Relayed => "relayed",
            ReportKind::Expanded => "expanded",
        }
    }

    /// Whether recipient parameters `d` ask for this kind of report.
    pub fn wanted_by(self, d: &crate::smtp::dsn::RcptDsn) -> bool {
        match self {
            ReportKind::Failed { .. } => d.wants_failure(),
            ReportKind::Delayed { .. } => d.wants_delay(),
            ReportKind::Delivered | ReportKind::Relayed | ReportKind::Expanded => d.wants_success(),
        }
    }
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
/// The bounce of `original` (pending in `store`) for `failed`, to its sender; its id is allocated from
/// `store`. `None` when no recipient's NOTIFY asks for a failure report (or the sender is null). The caller
/// queues it.
pub fn queued_bounce(
    store: &mut crate::queue::QueueStore,
    hostname: &str,
    original: crate::queue::QueueId,
    env: &crate::queue::Envelope,
    failed: &[FailedRcpt<'_>],
    now_unix_ms: u64,
    expired: bool,
) -> Option<QueuedBounce> {
    queued_report(
        store,
        hostname,
        original,
        env,
        failed,
        now_unix_ms,
        ReportKind::Failed { expired },
    )
}

/// The report of `kind` on `original` (pending in `store`) for those of `rcpts` whose DSN parameters ask for
/// it, to its sender; its id is allocated from `store`. `None` when nobody asks for it or the sender is null.
pub fn queued_report(
    store: &mut crate::queue::QueueStore,
    hostname: &str,
    original: crate::queue::QueueId,
    env: &crate::queue::Envelope,
    rcpts: &[FailedRcpt<'_>],
    now_unix_ms: u64,
    kind: ReportKind,
) -> Option<QueuedBounce> {
    if env.sender.is_empty() {
        return None;
    }
    let chosen: Vec<(&FailedRcpt<'_>, crate::smtp::dsn::RcptDsn)> = rcpts
        .iter()
        .map(|r| (r, env.dsn.rcpt(r.index as usize)))
        .filter(|(_, d)| kind.wanted_by(d))
        .collect();
    report_message(store, hostname, original, env, &chosen, now_unix_ms, kind)
}

/// The "expanded" report (RFC 3461 6.2.7.3) on `original` (pending in `store`, queued with the envelope
/// `env`) for the addresses the client gave that were expanded here into several recipients, each with the
/// DSN parameters of its RCPT (only those with NOTIFY=SUCCESS are reported). It names the address given, never
/// the members. `None` when nobody asks for it or the sender is null. The caller queues it.
pub fn queued_expanded(
    store: &mut crate::queue::QueueStore,
    hostname: &str,
    original: crate::queue::QueueId,
    env: &crate::queue::Envelope,
    expanded: &[(String, crate::smtp::dsn::RcptDsn)],
    now_unix_ms: u64,
) -> Option<QueuedBounce> {
    if env.sender.is_empty() {
        return None;
    }
    let kind = ReportKind::Expanded;
    let rcpts: Vec<(FailedRcpt<'_>, &crate::smtp::dsn::RcptDsn)> = expanded
        .iter()
        .filter(|(_, d)| kind.wanted_by(d))
        .map(|(a, d)| {
            let f = FailedRcpt {
                // Not one of the queued recipients: its facts are given here.
                index: u32::MAX,
                address: a,
                status: crate::smtp::reply_parser::EnhancedCode::new(2, 0, 0),
                diagnostic: "250 2.0.0 expanded by alias",
                remote_mta: None,
            };
            (f, d)
        })
        .collect();
    let chosen: Vec<(&FailedRcpt<'_>, crate::smtp::dsn::RcptDsn)> =
        rcpts.iter().map(|(f, d)| (f, (*d).clone())).collect();
    report_message(store, hostname, original, env, &chosen, now_unix_ms, kind)
}

/// The report of `kind` on `chosen` (each with its DSN facts) as a queued message with its own id.
fn report_message(
    store: &mut crate::queue::QueueStore,
    hostname: &str,
    original: crate::queue::QueueId,
    env: &crate::queue::Envelope,
    chosen: &[(&FailedRcpt<'_>, crate::smtp::dsn::RcptDsn)],
    now_unix_ms: u64,
    kind: ReportKind,
) -> Option<QueuedBounce> {
    if chosen.is_empty() {
        return None;
    }
    let returned = store
        .message_data(original)
        .map(|(trace, data)| Returned::of(trace, data, kind, env.dsn.ret))
        .unwrap_or(Returned::Headers(Vec::new()));
    // The report's own id makes its Message-ID and MIME boundary unique.
    let id = store.allocate_id();
    let data = build_report(
        &Report {
            hostname,
            sender: &env.sender,
            original_id: &original.to_string(),
            report_id: &id.to_string(),
            envid: env.dsn.envid.as_deref(),
            arrival_unix_s: env.arrival_unix_ms / 1000,
            now_unix_s: now_unix_ms / 1000,
            kind,
        },
        chosen,
        &returned,
    );
    let received = format!(
        "Received: by {hostname} (shardmta) id {id}; {}\r\n",
        crate::smtp::session::rfc5322_date(now_unix_ms / 1000)
    )
    .into_bytes();
    Some(QueuedBounce {
        id,
        env: crate::queue::Envelope {
            sender: String::new(),
            recipients: vec![env.sender.clone()],
            arrival_unix_ms: now_unix_ms,
            // The returned original has 8-bit bytes: declared (its part says `8bit`).
            body_8bitmime: returned.is_8bit(),
            ..Default::default()
        },
        received,
        data,
    })
}

/// What of the original a report carries.
pub enum Returned {
    /// The header section (`text/rfc822-headers`).
    Headers(Vec<u8>),
    /// The whole message (`message/rfc822`).
    Full(Vec<u8>),
}

impl Returned {
    /// Whether the returned bytes have any octet above 127 (then the part is `8bit`).
    pub fn is_8bit(&self) -> bool {
        let (Returned::Headers(v) | Returned::Full(v)) = self;
        !v.is_ascii()
    }

    /// The part of the message (`trace`: the header fields this relay put in front of `data` when it queued it,
    /// i.e. its DKIM signatures and Received header; `data`: the message as received) a report of `kind` returns
    /// under `ret`. The trace fields are returned too, so the returned message is the one that was sent on (a
    /// DKIM signature in it still verifies).
    pub fn of(
        trace: &[u8],
        data: &[u8],
        kind: ReportKind,
        ret: Option<crate::smtp::dsn::Ret>,
    ) -> Returned {
        let full = matches!(kind, ReportKind::Failed { .. })
            && ret != Some(crate::smtp::dsn::Ret::Hdrs)
            && trace.len() + data.len() <= ORIGINAL_HEADER_BYTES_MAX;
        let part = if full { data } else { header_section(data) };
        let mut v = Vec::with_capacity(trace.len() + part.len());
        v.extend_from_slice(trace);
        v.extend_from_slice(part);
        if full {
            Returned::Full(v)
        } else {
            Returned::Headers(v)
        }
    }
}

/// The per-message facts of a report.
pub struct Report<'a> {
    pub hostname: &'a str,
    pub sender: &'a str,
    pub original_id: &'a str,
    /// The report's own queue id (its Message-ID and MIME boundary are made from it: unique).
    pub report_id: &'a str,
    /// The message's ENVID (decoded), if it had one.
    pub envid: Option<&'a str>,
    pub arrival_unix_s: u64,
    pub now_unix_s: u64,
    pub kind: ReportKind,
}

/// Builds a whole report (headers and body, CRLF line ends) on the recipients `rcpts` (each with its DSN
/// parameters, for `Original-Recipient:`).
pub fn build_report(
    r: &Report<'_>,
    rcpts: &[(&FailedRcpt<'_>, crate::smtp::dsn::RcptDsn)],
    returned: &Returned,
) -> Vec<u8> {
    let (hostname, original_id, now_unix_s) = (r.hostname, r.original_id, r.now_unix_s);
    let report_id = r.report_id;
    let boundary = format!("{report_id}.{now_unix_s}/{hostname}");
    let (subject, intro) = match r.kind {
        ReportKind::Failed { expired } => (
            "Undelivered Mail Returned to Sender",
            format!(
                "I'm sorry to have to inform you that your message could not\r\nbe delivered to one or more recipients{}.",
                if expired { " within the time allowed" } else { "" }
            ),
        ),
        ReportKind::Delayed { .. } => (
            "Delayed Mail (still being retried)",
            "Your message could not be delivered yet to one or more recipients.\r\nIt will be retried until it is too old; no action is needed on your part.".to_string(),
        ),
        ReportKind::Delivered | ReportKind::Relayed | ReportKind::Expanded => (
            "Successful Mail Delivery Report",
            "Your message was successfully delivered to the destination(s)\r\nlisted below. If the message was delivered to a mailbox you will\r\nreceive no further notifications. Otherwise you may still receive\r\nnotifications of mail delivery errors from other systems.".to_string(),
        ),
    };
    let mut m = String::with_capacity(2048);
    let _ = write!(
        m,
        "From: MAILER-DAEMON@{hostname} (Mail Delivery System)\r\n\
         To: {}\r\n\
         Subject: {subject}\r\n\
         Date: {}\r\n\
         Message-ID: <{report_id}.{now_unix_s}.{}@{hostname}>\r\n\
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
         {intro}\r\n\
         \r\n",
        ascii_line(r.sender),
        rfc5322_date(now_unix_s),
        r.kind.action(),
    );
    for (f, _) in rcpts {
        let _ = write!(
            m,
            "<{}>: {}\r\n",
            ascii_line(f.address),
            ascii_line(f.diagnostic)
        );
    }
    let _ = write!(
        m,
        "\r\n--{boundary}\r\n\
         Content-Description: Delivery report\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; {hostname}\r\n"
    );
    if let Some(id) = r.envid {
        let _ = write!(m, "Original-Envelope-Id: {}\r\n", ascii_line(id));
    }
    let _ = write!(
        m,
        "X-Shardmta-Queue-ID: {original_id}\r\nArrival-Date: {}\r\n",
        rfc5322_date(r.arrival_unix_s)
    );
    for (f, d) in rcpts {
        m.push_str("\r\n");
        if let Some(o) = &d.orcpt {
            let _ = write!(
                m,
                "Original-Recipient: {};{}\r\n",
                ascii_line(&o.addr_type),
                ascii_line(&o.address)
            );
        }
        let _ = write!(
            m,
            "Final-Recipient: rfc822; {}\r\nAction: {}\r\nStatus: {}\r\n",
            ascii_line(f.address),
            r.kind.action(),
            f.status
        );
        if let Some(rm) = f.remote_mta {
            let _ = write!(m, "Remote-MTA: dns; {}\r\n", ascii_line(rm));
        }
        if !f.diagnostic.is_empty() {
            let _ = write!(m, "Diagnostic-Code: smtp; {}\r\n", ascii_line(f.diagnostic));
        }
        if let ReportKind::Delayed {
            will_retry_until_unix_s,
        } = r.kind
        {
            let _ = write!(
                m,
                "Will-Retry-Until: {}\r\n",
                rfc5322_date(will_retry_until_unix_s)
            );
        }
    }
    let (description, ctype, original) = match returned {
        Returned::Full(d) => ("Undelivered Message", "message/rfc822", d),
        Returned::Headers(h) => (
            match r.kind {
                ReportKind::Failed { .. } => "Undelivered Message Headers",
                _ => "Message Headers",
            },
            "text/rfc822-headers",
            h,
        ),
    };
    let _ = write!(
        m,
        "\r\n--{boundary}\r\nContent-Description: {description}\r\nContent-Type: {ctype}\r\n"
    );
    if returned.is_8bit() {
        m.push_str("Content-Transfer-Encoding: 8bit\r\n");
    }
    m.push_str("\r\n");
    let mut out = m.into_bytes();
    out.extend_from_slice(original);
    if !original.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// A failure report on `failed` returning `original_headers` (the form bounces had before the DSN extension).
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
    let rcpts: Vec<(&FailedRcpt<'_>, crate::smtp::dsn::RcptDsn)> =
        failed.iter().map(|f| (f, Default::default())).collect();
    build_report(
        &Report {
            hostname,
            sender,
            original_id,
            report_id: original_id,
            envid: None,
            arrival_unix_s,
            now_unix_s,
            kind: ReportKind::Failed { expired },
        },
        &rcpts,
        &Returned::Headers(original_headers.to_vec()),
    )
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
    use crate::smtp::dsn::{Notify, Orcpt, RcptDsn, Ret};

    /// A delay report carries the ENVID, each recipient's ORCPT, Will-Retry-Until, and the headers only; what is
    /// returned follows the kind and RET.
    #[test]
    fn delay_report_fields_and_what_is_returned() {
        let orig = b"Subject: hi\r\n\r\nthe body\r\n";
        let f = FailedRcpt {
            index: 0,
            address: "bob@remote.test",
            status: crate::smtp::reply_parser::EnhancedCode::new(4, 3, 0),
            diagnostic: "451 4.3.0 later",
            remote_mta: None,
        };
        let d = RcptDsn {
            notify: Notify::parse("DELAY").ok(),
            orcpt: Some(Orcpt {
                addr_type: "rfc822".into(),
                address: "Bob@Remote.test".into(),
            }),
        };
        let kind = ReportKind::Delayed {
            will_retry_until_unix_s: 86_400,
        };
        let r = build_report(
            &Report {
                hostname: "mx.test",
                sender: "alice@client.test",
                original_id: "0123456789ABCDEF",
                report_id: "0123456789ABCDF0",
                envid: Some("E-1"),
                arrival_unix_s: 0,
                now_unix_s: 60,
                kind,
            },
            &[(&f, d.clone())],
            &Returned::of(b"", orig, kind, None),
        );
        let s = String::from_utf8(r).unwrap();
        assert!(
            s.contains("Subject: Delayed Mail (still being retried)\r\n"),
            "{s}"
        );
        assert!(
            s.contains("Reporting-MTA: dns; mx.test\r\nOriginal-Envelope-Id: E-1\r\n"),
            "{s}"
        );
        assert!(s.contains(
            "\r\nOriginal-Recipient: rfc822;Bob@Remote.test\r\nFinal-Recipient: rfc822; bob@remote.test\r\nAction: delayed\r\nStatus: 4.3.0\r\n"
        ), "{s}");
        assert!(
            s.contains("Will-Retry-Until: Fri, 2 Jan 1970 00:00:00 +0000\r\n"),
            "{s}"
        );
        assert!(
            s.contains("Content-Type: text/rfc822-headers\r\n\r\nSubject: hi\r\n"),
            "{s}"
        );
        assert!(!s.contains("the body"), "{s}");
        assert!(kind.wanted_by(&d) && !ReportKind::Relayed.wanted_by(&d));
        assert!(!ReportKind::Failed { expired: false }.wanted_by(&d));
        let failed = ReportKind::Failed { expired: false };
        assert!(matches!(
            Returned::of(b"", orig, failed, None),
            Returned::Full(_)
        ));
        assert!(matches!(
            Returned::of(b"", orig, failed, Some(Ret::Full)),
            Returned::Full(_)
        ));
        assert!(matches!(
            Returned::of(b"", orig, failed, Some(Ret::Hdrs)),
            Returned::Headers(_)
        ));
        assert!(matches!(
            Returned::of(b"", orig, ReportKind::Relayed, Some(Ret::Full)),
            Returned::Headers(_)
        ));
        // Our trace fields (DKIM signatures, Received) come back in front of the original.
        match Returned::of(b"Received: by us\r\n", orig, failed, None) {
            Returned::Full(v) => {
                assert!(v.starts_with(b"Received: by us\r\n") && v.ends_with(orig))
            }
            Returned::Headers(_) => panic!("a small message comes back whole"),
        }
        match Returned::of(b"Received: by us\r\n", orig, failed, Some(Ret::Hdrs)) {
            Returned::Headers(v) => assert!(v.starts_with(b"Received: by us\r\nSubject:")),
            Returned::Full(_) => panic!("RET=HDRS"),
        }
        let big = vec![b'x'; ORIGINAL_HEADER_BYTES_MAX + 1];
        assert!(matches!(
            Returned::of(b"", &big, failed, None),
            Returned::Headers(_)
        ));
    }

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
                index: 0,
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

    /// A store holding one message from `s@client.example` to `rcpts`, with content `data`.
    fn store_with(
        dir: &std::path::Path,
        rcpts: &[&str],
        dsn: crate::smtp::dsn::EnvelopeDsn,
        data: &[u8],
    ) -> (
        crate::queue::QueueStore,
        crate::queue::QueueId,
        crate::queue::Envelope,
    ) {
        let (mut store, _) = crate::queue::QueueStore::open_shard(dir, 0, 1 << 20).unwrap();
        let id = store.allocate_id();
        let env = crate::queue::Envelope {
            sender: "s@client.example".into(),
            recipients: rcpts.iter().map(|r| r.to_string()).collect(),
            dsn,
            ..Default::default()
        };
        store
            .append_message(id, &env, b"Received: by us\r\n", data)
            .unwrap();
        (store, id, env)
    }

    fn bounced(address: &str) -> FailedRcpt<'_> {
        FailedRcpt {
            index: 0,
            address,
            status: crate::smtp::reply_parser::EnhancedCode::new(5, 1, 1),
            diagnostic: "550 5.1.1 no",
            remote_mta: None,
        }
    }

    /// A full-return failure report of an 8-bit message declares it: the report's envelope asks for 8BITMIME
    /// and the message/rfc822 part says `Content-Transfer-Encoding: 8bit`; a 7-bit one stays as it was.
    #[test]
    fn full_return_of_an_8bit_message_is_declared_8bit() {
        let dir = tempfile::tempdir().unwrap();
        let data = "Subject: caf\u{e9}\r\n\r\nna\u{ef}ve body\r\n".as_bytes();
        let (mut store, id, env) =
            store_with(dir.path(), &["x@r.example"], Default::default(), data);
        let b = queued_bounce(
            &mut store,
            "mx.test",
            id,
            &env,
            &[bounced("x@r.example")],
            5_000,
            false,
        )
        .unwrap();
        let s = String::from_utf8_lossy(&b.data);
        assert!(
            b.env.body_8bitmime,
            "8-bit bytes in the report, 8BITMIME not asked for"
        );
        assert!(
            s.contains("Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"),
            "{s}"
        );
        let ascii = b"Subject: plain\r\n\r\nbody\r\n";
        let dir2 = tempfile::tempdir().unwrap();
        let (mut store, id, env) =
            store_with(dir2.path(), &["x@r.example"], Default::default(), ascii);
        let b = queued_bounce(
            &mut store,
            "mx.test",
            id,
            &env,
            &[bounced("x@r.example")],
            5_000,
            false,
        )
        .unwrap();
        assert!(!b.env.body_8bitmime);
        assert!(!String::from_utf8_lossy(&b.data).contains("Content-Transfer-Encoding"));
    }

    /// Two reports on one message made within the same second get different Message-IDs and MIME boundaries
    /// (they were built from the original's id, the time and the kind only).
    #[test]
    fn two_reports_in_one_second_have_different_message_ids() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, id, env) = store_with(
            dir.path(),
            &["x@r.example"],
            Default::default(),
            b"Subject: t\r\n\r\nhi\r\n",
        );
        let field = |data: &[u8], name: &str| {
            String::from_utf8_lossy(data)
                .lines()
                .find_map(|l| l.strip_prefix(name).map(str::to_string))
                .unwrap()
        };
        let r: Vec<QueuedBounce> = (0..2)
            .map(|_| {
                queued_bounce(
                    &mut store,
                    "mx.test",
                    id,
                    &env,
                    &[bounced("x@r.example")],
                    5_000,
                    false,
                )
                .unwrap()
            })
            .collect();
        assert_ne!(
            field(&r[0].data, "Message-ID: "),
            field(&r[1].data, "Message-ID: ")
        );
        assert_ne!(
            field(&r[0].data, "\tboundary="),
            field(&r[1].data, "\tboundary=")
        );
        assert!(field(&r[0].data, "Message-ID: ").contains(&r[0].id.to_string()));
    }

    /// The "expanded" report names the address the client gave (with its ORCPT), never a member, returns the
    /// headers, and is made only for NOTIFY=SUCCESS and a non-null sender.
    #[test]
    fn expanded_report_names_the_alias_only() {
        use crate::smtp::dsn::{Notify, Orcpt, RcptDsn};
        let dir = tempfile::tempdir().unwrap();
        let (mut store, id, mut env) = store_with(
            dir.path(),
            &["alice@localhost", "bob@localhost"],
            Default::default(),
            b"Subject: t\r\n\r\nthe body\r\n",
        );
        let d = |n: &str| RcptDsn {
            notify: Notify::parse(n).ok(),
            orcpt: Some(Orcpt {
                addr_type: "rfc822".into(),
                address: "Team@localhost".into(),
            }),
        };
        let wanted = [("team@localhost".to_string(), d("SUCCESS,FAILURE"))];
        let b = queued_expanded(&mut store, "mx.test", id, &env, &wanted, 5_000).unwrap();
        let s = String::from_utf8_lossy(&b.data);
        assert!(s.contains(
            "\r\nOriginal-Recipient: rfc822;Team@localhost\r\nFinal-Recipient: rfc822; team@localhost\r\nAction: expanded\r\nStatus: 2.0.0\r\n"
        ), "{s}");
        assert_eq!(s.matches("Final-Recipient:").count(), 1, "{s}");
        assert!(
            !s.contains("alice") && !s.contains("bob") && !s.contains("the body"),
            "{s}"
        );
        assert_eq!(b.env.sender, "");
        assert_eq!(b.env.recipients, ["s@client.example"]);
        let unwanted = [("team@localhost".to_string(), d("FAILURE"))];
        assert!(queued_expanded(&mut store, "mx.test", id, &env, &unwanted, 5_000).is_none());
        env.sender.clear();
        assert!(queued_expanded(&mut store, "mx.test", id, &env, &wanted, 5_000).is_none());
    }
}
