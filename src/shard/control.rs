//! A shard's side of the control plane ([`crate::control`]): one task per SMTP shard takes the requests of its
//! channel one at a time and acts on the shard's own queue and dispatcher (queue changes through
//! [`crate::delivery::admin`], injection with the same recipient checks as SMTP), or reports its health.
//! Requests are served in order; each answer is sent after its records are durable. A queue change makes room
//! for each message's records first (a segment is created on the blocking pool, never on the reactor).

use std::rc::Rc;
use std::sync::atomic::Ordering;

use crate::control::QueueAction;
use crate::control::{
    ControlError, InjectMessage, InjectReport, QueueCommand, QueueCommandReport, RefusedRecipient,
    Selector, ShardHealth, ShardRequest, ShardRequests,
};
use crate::delivery::admin;
use crate::delivery::route::Router;
use crate::eventlog::{self, QueueChange};
use crate::local::recipients::Target;
use crate::policy::RecipientCheck;
use crate::queue::{Envelope, QueueError};
use crate::smtp::address::{parse_path, Path};
use crate::smtp::data::{BareNewline, ChunkDecoder};
use crate::smtp::session::RcptRequest;

use super::Shard;

/// Serves `requests` until every sender is gone (the server is stopping).
pub async fn serve(shard: Rc<Shard>, requests: ShardRequests) {
    // Checks under the current reloadable settings (see `inject`).
    let rcpt_check = RecipientCheck::new(
        shard.shared.live.snapshot().policy.clone(),
        shard.shared.recipients.clone(),
    );
    while let Ok(req) = requests.recv_async().await {
        match req {
            ShardRequest::ClearBackoff { host, answer } => {
                let _ = answer.try_send(shard.agent.clear_backoff(host.as_deref()));
            }
            ShardRequest::ShapingStatus { answer } => {
                let _ = answer.try_send(shard.agent.automation.actions());
            }
            ShardRequest::ShapingCancel { id, answer } => {
                let _ = answer.try_send(shard.agent.automation.cancel(&id).is_some());
            }
            ShardRequest::Health { answer } => {
                let _ = answer.try_send(health(&shard));
            }
            ShardRequest::Queue { command, answer } => {
                let r = queue_command(&shard, command).await;
                let _ = answer.try_send(r);
            }
            ShardRequest::Inject { message, answer } => {
                let r = inject(&shard, &rcpt_check, *message).await;
                let _ = answer.try_send(r);
            }
        }
    }
}

fn health(shard: &Shard) -> ShardHealth {
    ShardHealth {
        shard: shard.id,
        answered: true,
        queue_writable: !shard.dispatcher.paused() && !shard.queue.sync_failing(),
        pending_messages: shard.queue.store().pending_count() as u64,
    }
}

fn queue_error(e: QueueError) -> ControlError {
    match e {
        QueueError::Shutdown => ControlError::ShuttingDown,
        e => ControlError::Queue(e.to_string()),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Applies `command` to this shard's messages, then waits for the sync of everything it wrote.
async fn queue_command(
    shard: &Rc<Shard>,
    command: QueueCommand,
) -> Result<QueueCommandReport, ControlError> {
    // The routes of the configuration as last reloaded.
    let live = shard.shared.live.snapshot();
    let cfg = &live.cfg;
    let router = Router::new(cfg);
    let ids = admin::select(&shard.queue.store(), &router, &command.selector);
    let domain = match &command.selector {
        Selector::Domain(d) => Some(d.as_str()),
        _ => None,
    };
    let mut report = QueueCommandReport::default();
    let mut last = None;
    let mut failure = None;
    for id in ids {
        let need = admin::room_needed(&shard.queue.store(), command.action, id);
        if let Err(e) = shard.queue.room_for(need).await {
            failure = Some(e);
            break;
        }
        let applied = {
            let mut store = shard.queue.store();
            admin::apply(
                &mut store,
                &router,
                &cfg.myhostname,
                command.action,
                id,
                domain,
                now_ms(),
            )
        };
        match applied {
            Ok(a) if a.changed => {
                last = a.ticket.or(last);
                report.changed.push(id.to_string());
                shard
                    .dispatcher
                    .after_admin(command.action, id, a.bounce.zip(a.ticket));
                let change = match command.action {
                    QueueAction::Hold => QueueChange::Held,
                    QueueAction::Release => QueueChange::Released,
                    QueueAction::Delete => QueueChange::Deleted,
                    QueueAction::Flush => QueueChange::Flushed,
                    QueueAction::Bounce => QueueChange::Bounced,
                };
                eventlog::queue_changed(id, change, "by the administrator");
            }
            Ok(_) => report.unchanged.push(id.to_string()),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    // What was written is made durable even when a later message failed.
    if let Some(t) = last {
        shard.queue.durable(t).await.map_err(queue_error)?;
    }
    match failure {
        Some(e) => Err(queue_error(e)),
        None => Ok(report),
    }
}

/// Queues an injected message for its accepted recipients (the SMTP RCPT checks, as for an authenticated
/// client: relaying allowed, local recipients must exist), answering after its sync.
async fn inject(
    shard: &Rc<Shard>,
    rcpt_check: &RecipientCheck,
    m: InjectMessage,
) -> Result<InjectReport, ControlError> {
    // The configuration as last reloaded (limits, relay policy).
    let settings = shard.shared.live.snapshot();
    let cfg = &settings.cfg;
    if m.content.len() as u64 > cfg.message_size_limit {
        return Err(ControlError::TooLarge {
            size: m.content.len() as u64,
            limit: cfg.message_size_limit,
        });
    }
    if m.recipients.len() > cfg.smtpd_recipient_limit {
        return Err(ControlError::BadRequest(format!(
            "{} recipients: at most {} a message (smtpd_recipient_limit)",
            m.recipients.len(),
            cfg.smtpd_recipient_limit
        )));
    }
    if let Some(p) = &m.pool {
        if !cfg.egress_pool.iter().any(|x| &x.name == p) {
            return Err(ControlError::BadRequest(format!(
                "pool {p:?}: no such egress pool ([[egress_pool]])"
            )));
        }
    }
    let sender_path = format!("<{}>", m.envelope_sender);
    let (sender, mut smtputf8) = match parse_path(&sender_path, true) {
        Ok((Path::Null, "")) => (String::new(), false),
        Ok((Path::Mailbox(mb), "")) => (mb.to_canonical(), mb.utf8),
        _ => {
            return Err(ControlError::BadRequest(format!(
                "envelope_sender {:?}: bad address syntax",
                m.envelope_sender
            )))
        }
    };
    let mut report = InjectReport::default();
    let mut targets: Vec<Target> = Vec::new();
    for r in &m.recipients {
        let path = format!("<{r}>");
        let req = match parse_path(&path, true) {
            Ok((Path::Mailbox(mb), "")) => {
                smtputf8 |= mb.utf8;
                RcptRequest {
                    address: mb.to_canonical(),
                    postmaster: false,
                    routing_chars: mb.routing_chars,
                    may_relay: true,
                }
            }
            Ok((Path::Postmaster, "")) => RcptRequest {
                address: String::new(),
                postmaster: true,
                routing_chars: false,
                may_relay: true,
            },
            _ => {
                report.refused.push(RefusedRecipient {
                    recipient: r.clone(),
                    reason: "501 5.1.3 Bad recipient address syntax".into(),
                });
                continue;
            }
        };
        match rcpt_check.check_with(&settings.policy, req, &mut targets) {
            Ok(_) => report.accepted.push(r.clone()),
            Err(reply) => report.refused.push(RefusedRecipient {
                recipient: r.clone(),
                reason: {
                    let mut b = Vec::new();
                    reply.write_to(&mut b);
                    String::from_utf8_lossy(&b).trim_end().to_string()
                },
            }),
        }
    }
    if targets.is_empty() {
        return Ok(report);
    }
    // Line ends made CRLF and long lines folded as for SMTP content (the stored form is what is sent on).
    let mut data = Vec::with_capacity(m.content.len() + m.content.len() / 32 + 2);
    let mut dec = ChunkDecoder::new(
        BareNewline::Normal,
        cfg.message_size_limit,
        cfg.smtp_line_length_limit,
    );
    dec.feed(&m.content, &mut data);
    dec.finish(&mut data);
    if !data.is_empty() && !data.ends_with(b"\r\n") {
        data.extend_from_slice(b"\r\n");
    }
    if dec.over_limit() {
        return Err(ControlError::TooLarge {
            size: data.len() as u64,
            limit: cfg.message_size_limit,
        });
    }
    // The egress pool header is removed from injected mail too (and honoured: HTTP clients are trusted).
    let mut pool_header = None;
    if let Some(name) = cfg.egress_pool_header.as_deref() {
        if let Some((stripped, value)) = crate::egress::strip_header(&data, name) {
            data = stripped;
            pool_header = Some(value);
        }
    }
    let egress_pool = if cfg.egress_pool.is_empty() {
        None
    } else {
        crate::egress::pool_for_message(cfg, m.pool.as_deref(), pool_header.as_deref(), &sender)
    };
    let now = now_ms();
    let id = shard.queue.store().allocate_id();
    let mut received = format!(
        "Received: from [{}]\r\n\tby {} (shardmta)",
        m.client, cfg.myhostname
    );
    if let Some(u) = &m.auth_user {
        let u: String = u
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(crate::limits::RECEIVED_HELO_BYTES_MAX)
            .collect();
        received.push_str(&format!("\r\n\t(Authenticated sender: {u})"));
    }
    received.push_str(&format!(
        "\r\n\twith HTTP id {id}; {}\r\n",
        crate::smtp::session::rfc5322_date(now / 1000)
    ));
    // HTTP-injected mail is signed (its clients are trusted networks or token holders): the DKIM-Signature
    // fields go in front of the Received header, as for SMTP.
    let trace = crate::dkim::trace_headers(
        &settings.dkim,
        crate::dkim::Origin::Injected,
        cfg.dkim_sign_relayed,
        &data,
        now / 1000,
        received.into_bytes(),
    )
    .await;
    let env = Envelope {
        egress_pool,
        sender,
        recipients: targets.iter().map(|t| t.address().to_string()).collect(),
        arrival_unix_ms: now,
        client_addr: m.client.to_string(),
        client_helo: String::new(),
        tls: String::new(),
        auth_user: m.auth_user.clone().unwrap_or_default(),
        smtputf8,
        body_8bitmime: dec.saw_8bit(),
        dsn: Default::default(),
    };
    let ticket = shard
        .queue
        .append_message(id, &env, &trace, &data)
        .await
        .map_err(|e| match e {
            QueueError::TooLarge { size, .. } => ControlError::TooLarge {
                size,
                limit: cfg.message_size_limit,
            },
            e => queue_error(e),
        })?;
    shard.queue.durable(ticket).await.map_err(queue_error)?;
    shard.dispatcher.submit(id);
    shard
        .stats
        .messages_accepted
        .fetch_add(1, Ordering::Relaxed);
    report.queue_id = Some(id.to_string());
    Ok(report)
}
