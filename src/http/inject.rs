//! `POST /api/v1/inject` bodies: the JSON forms turned into RFC 5322 messages (CRLF line ends) and their
//! envelopes, pure and without I/O. The HTTP layer hands each [`Prepared`] message to the control plane.
//!
//! Two forms (after KumoMTA's inject API):
//! - **raw**: `{"envelope_sender": "a@x", "recipients": ["b@y", ...], "content": "<RFC 5322 message>"}`: one
//!   message for all recipients; line ends become CRLF; a missing `Date:` or `Message-ID:` is added.
//! - **built**: `from`, `subject`, `text_body`, `html_body`, `headers`, `reply_to`, `attachments`, either at the
//!   top level or inside `"content": {...}`; `recipients` are addresses or `{"email", "name", "substitutions"}`;
//!   a top-level `substitutions` object applies to every recipient. One message per recipient (its own `To:`),
//!   with `{{key}}` (or `{{ key }}`) in the subject and bodies replaced by the recipient's value, else the
//!   global one; a placeholder with no value is left as written. Values in `html_body` are HTML-escaped.
//!   text only: `text/plain`; text and HTML: `multipart/alternative`; attachments (base64 in the JSON unless
//!   `"base64": false`): `multipart/mixed` around it; non-ASCII header text is RFC 2047 encoded.
//!
//! Refused (400, naming the field): bad JSON, a bad address, a header name or value with CR, LF or another
//! control character (header injection), a header the builder sets itself, bad base64, too many recipients,
//! headers, attachments or substitutions. A message over `message_size_limit` is [`InjectError::TooLarge`]; the
//! built form's copies (one per recipient) over [`limits::HTTP_INJECT_BUILT_BYTES_MAX`] together are
//! [`InjectError::RequestTooLarge`].

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::limits;
use crate::smtp::address::parse_mailbox;

/// What the request may hold.
#[derive(Debug, Clone)]
pub struct InjectLimits {
    pub message_size_limit: u64,
    /// Recipients per request (`smtpd_recipient_limit`).
    pub recipient_limit: usize,
    /// The host name in generated Message-IDs (`myhostname`).
    pub hostname: String,
}

/// One message ready for the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// "" for the null sender.
    pub envelope_sender: String,
    pub recipients: Vec<String>,
    /// RFC 5322 bytes, CRLF line ends.
    pub content: Vec<u8>,
    /// The request's `pool` field: the egress pool to send through (`crate::egress`).
    pub pool: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    /// The request is wrong (400); the text names what.
    #[error("{0}")]
    Bad(String),
    /// A message exceeds `message_size_limit` (413).
    #[error("message of {size} bytes exceeds message_size_limit ({limit} bytes)")]
    TooLarge { size: u64, limit: u64 },
    /// The built form's copies (one per recipient) together exceed their bound (413).
    #[error("the messages of this request (one per recipient) need more than {limit} bytes together ({size} so far): split the recipients over several requests")]
    RequestTooLarge { size: u64, limit: u64 },
}

fn bad(s: impl Into<String>) -> InjectError {
    InjectError::Bad(s.into())
}

/// The request as sent; fields are checked one by one after, so errors can name them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InjectWire {
    #[serde(default)]
    envelope_sender: Option<String>,
    recipients: Vec<Value>,
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    substitutions: Option<Map<String, Value>>,
    /// The egress pool for the message(s).
    #[serde(default)]
    pool: Option<String>,
    #[serde(flatten)]
    built: BuiltWire,
}

/// The fields of the built form (top level, or the `content` object).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BuiltWire {
    #[serde(default)]
    from: Option<Value>,
    #[serde(default)]
    reply_to: Option<Value>,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    text_body: Option<String>,
    #[serde(default)]
    html_body: Option<String>,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    attachments: Option<Vec<AttachmentWire>>,
}

impl BuiltWire {
    fn is_empty(&self) -> bool {
        self.from.is_none()
            && self.reply_to.is_none()
            && self.subject.is_none()
            && self.text_body.is_none()
            && self.html_body.is_none()
            && self.headers.is_none()
            && self.attachments.is_none()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AttachmentWire {
    data: String,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default, alias = "filename")]
    file_name: Option<String>,
    /// `data` is base64 (default) or the content itself.
    #[serde(default)]
    base64: Option<bool>,
}

/// A mailbox for a header: display name and address.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mailbox {
    name: Option<String>,
    email: String,
}

struct Recipient {
    mailbox: Mailbox,
    substitutions: Map<String, Value>,
}

struct Attachment {
    content_type: String,
    file_name: String,
    data: Vec<u8>,
}

/// Turns a request body into the messages to queue. `now_unix_s` dates them.
pub fn prepare(
    body: &[u8],
    lim: &InjectLimits,
    now_unix_s: u64,
) -> Result<Vec<Prepared>, InjectError> {
    let mut wire: InjectWire =
        serde_json::from_slice(body).map_err(|e| bad(format!("bad JSON: {e}")))?;
    let pool = wire.pool.take();
    if let Some(p) = pool
        .as_deref()
        .filter(|p| !crate::egress::valid_pool_name(p))
    {
        return Err(bad(format!("pool {p:?}: not a pool name")));
    }
    if wire.recipients.is_empty() {
        return Err(bad("\"recipients\" is empty"));
    }
    if wire.recipients.len() > lim.recipient_limit {
        return Err(bad(format!(
            "{} recipients; at most {} (smtpd_recipient_limit) a request",
            wire.recipients.len(),
            lim.recipient_limit
        )));
    }
    let recipients = wire
        .recipients
        .iter()
        .enumerate()
        .map(|(i, v)| recipient(v, &format!("recipients[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let sender = match wire.envelope_sender.as_deref() {
        Some(s) => Some(envelope_address(s, "envelope_sender")?),
        None => None,
    };
    let prepared = match wire.content {
        Some(Value::String(raw)) => {
            if !wire.built.is_empty() {
                return Err(bad(
                    "\"content\" is a whole message: the built form's fields (from, subject, ...) do not go with it",
                ));
            }
            if wire.substitutions.is_some()
                || recipients.iter().any(|r| !r.substitutions.is_empty())
            {
                return Err(bad("substitutions apply to the built form only"));
            }
            let sender = sender
                .ok_or_else(|| bad("\"envelope_sender\" is needed with a raw \"content\""))?;
            let content = raw_message(raw.as_bytes(), lim, now_unix_s)?;
            check_size(&content, lim)?;
            Ok(vec![Prepared {
                envelope_sender: sender,
                recipients: recipients.into_iter().map(|r| r.mailbox.email).collect(),
                content,
                pool: None,
            }])
        }
        Some(Value::Object(m)) => {
            if !wire.built.is_empty() {
                return Err(bad(
                    "give the built form's fields either inside \"content\" or at the top level, not both",
                ));
            }
            let built: BuiltWire = serde_json::from_value(Value::Object(m))
                .map_err(|e| bad(format!("content: {e}")))?;
            build_all(
                built,
                sender,
                recipients,
                wire.substitutions,
                lim,
                now_unix_s,
            )
        }
        Some(_) => Err(bad(
            "\"content\" is a string (a whole message) or an object (the parts to build one from)",
        )),
        None => build_all(
            wire.built,
            sender,
            recipients,
            wire.substitutions,
            lim,
            now_unix_s,
        ),
    };
    prepared.map(|mut v| {
        for p in &mut v {
            p.pool.clone_from(&pool);
        }
        v
    })
}

fn check_size(content: &[u8], lim: &InjectLimits) -> Result<(), InjectError> {
    if content.len() as u64 > lim.message_size_limit {
        return Err(InjectError::TooLarge {
            size: content.len() as u64,
            limit: lim.message_size_limit,
        });
    }
    Ok(())
}

/// An envelope address: "" (the null sender) or `local@domain`, ASCII (no SMTPUTF8 for injected mail).
fn envelope_address(s: &str, field: &str) -> Result<String, InjectError> {
    if s.is_empty() {
        return Ok(String::new());
    }
    address(s, field)
}

/// `local@domain`, checked as SMTP checks a path (ASCII only), in canonical form.
fn address(s: &str, field: &str) -> Result<String, InjectError> {
    parse_mailbox(s, false)
        .map(|m| m.to_canonical())
        .map_err(|e| bad(format!("{field}: {s:?}: {e}")))
}

fn mailbox(v: &Value, field: &str) -> Result<Mailbox, InjectError> {
    match v {
        Value::String(s) => Ok(Mailbox {
            name: None,
            email: address(s, field)?,
        }),
        Value::Object(m) => {
            if let Some(k) = m.keys().find(|k| *k != "email" && *k != "name") {
                return Err(bad(format!("{field}: unknown field {k:?} (email, name)")));
            }
            mailbox_of(m, field)
        }
        _ => Err(bad(format!(
            "{field}: an address, or an object with \"email\" and \"name\""
        ))),
    }
}

fn mailbox_of(m: &Map<String, Value>, field: &str) -> Result<Mailbox, InjectError> {
    let email = match m.get("email") {
        Some(Value::String(s)) => address(s, &format!("{field}.email"))?,
        Some(_) => return Err(bad(format!("{field}.email: a string is needed"))),
        None => return Err(bad(format!("{field}: \"email\" is missing"))),
    };
    let name = match m.get("name") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            header_text(s, &format!("{field}.name"))?;
            (!s.is_empty()).then(|| s.clone())
        }
        Some(_) => return Err(bad(format!("{field}.name: a string is needed"))),
    };
    Ok(Mailbox { name, email })
}

fn recipient(v: &Value, field: &str) -> Result<Recipient, InjectError> {
    match v {
        Value::Object(m) => {
            if let Some(k) = m
                .keys()
                .find(|k| !matches!(k.as_str(), "email" | "name" | "substitutions"))
            {
                return Err(bad(format!(
                    "{field}: unknown field {k:?} (email, name, substitutions)"
                )));
            }
            let substitutions = match m.get("substitutions") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(s)) => s.clone(),
                Some(_) => return Err(bad(format!("{field}.substitutions: an object is needed"))),
            };
            Ok(Recipient {
                mailbox: mailbox_of(m, field)?,
                substitutions,
            })
        }
        _ => Ok(Recipient {
            mailbox: mailbox(v, field)?,
            substitutions: Map::new(),
        }),
    }
}

/// Header text: no CR, LF or other control character (tab allowed): a value can never start a new header.
fn header_text(s: &str, field: &str) -> Result<(), InjectError> {
    if let Some(c) = s.chars().find(|c| c.is_control() && *c != '\t') {
        return Err(bad(format!(
            "{field}: control character {c:?} in a header value (header injection is refused)"
        )));
    }
    Ok(())
}

/// Headers the builder writes itself (a request cannot set them through `headers`).
const BUILT_HEADERS: [&str; 8] = [
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "reply-to",
    "content-transfer-encoding",
];

fn check_header(name: &str, value: &str) -> Result<(), InjectError> {
    let field = format!("headers.{name:?}");
    if name.is_empty()
        || name.len() > 76
        || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
    {
        return Err(bad(format!(
            "{field}: a header name is printable ASCII without spaces or ':', at most 76 characters"
        )));
    }
    let lower = name.to_ascii_lowercase();
    if BUILT_HEADERS.contains(&lower.as_str()) || lower.starts_with("content-") {
        return Err(bad(format!(
            "{field}: set by the builder (use from, recipients, subject, reply_to, the bodies and attachments)"
        )));
    }
    header_text(value, &field)
}

/// A substitution value as text (strings as they are; numbers and booleans written out; null is "").
fn substitution_text(v: &Value, field: &str) -> Result<String, InjectError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Null => Ok(String::new()),
        _ => Err(bad(format!(
            "{field}: a substitution is a string, a number or a boolean"
        ))),
    }
}

/// Escapes text for HTML (element content and attribute values).
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Replaces `{{key}}` / `{{ key }}` in `template` with `values[key]`; unknown keys stay as written. The output
/// is bounded: past `max` bytes it stops with [`InjectError::TooLarge`].
fn substitute(
    template: &str,
    values: &dyn Fn(&str) -> Option<String>,
    max: u64,
) -> Result<String, InjectError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else {
            out.push_str(&rest[open..]);
            rest = "";
            break;
        };
        let key = after[..close].trim();
        let valid = !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
        match valid.then(|| values(key)).flatten() {
            Some(v) => out.push_str(&v),
            None => out.push_str(&rest[open..open + 2 + close + 2]),
        }
        rest = &after[close + 2..];
        if out.len() as u64 > max {
            return Err(InjectError::TooLarge {
                size: out.len() as u64,
                limit: max,
            });
        }
    }
    out.push_str(rest);
    if out.len() as u64 > max {
        return Err(InjectError::TooLarge {
            size: out.len() as u64,
            limit: max,
        });
    }
    Ok(out)
}

/// `s` with every line end (CRLF, bare LF, bare CR) as CRLF.
pub fn crlf(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + s.len() / 32);
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                if s.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

fn message_id(hostname: &str, now_unix_s: u64) -> String {
    let mut r = [0u8; 12];
    // A short read leaves zeros; the time part still separates IDs across seconds.
    let _ = rustix::rand::getrandom(&mut r, rustix::rand::GetRandomFlags::empty());
    let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
    format!("{now_unix_s:x}.{hex}@{hostname}")
}

/// The raw form's message: CRLF line ends; `Date:` and `Message-ID:` added at the top when the header section
/// has none.
fn raw_message(raw: &[u8], lim: &InjectLimits, now_unix_s: u64) -> Result<Vec<u8>, InjectError> {
    if raw.is_empty() {
        return Err(bad("\"content\" is empty"));
    }
    if raw.len() as u64 > lim.message_size_limit {
        return Err(InjectError::TooLarge {
            size: raw.len() as u64,
            limit: lim.message_size_limit,
        });
    }
    let body = crlf(raw);
    let header_end = memchr::memmem::find(&body, b"\r\n\r\n").map_or(body.len(), |i| i + 2);
    let has = |name: &[u8]| {
        body[..header_end].split(|&b| b == b'\n').any(|line| {
            line.len() > name.len()
                && line[..name.len()].eq_ignore_ascii_case(name)
                && line[name.len()] == b':'
        })
    };
    let mut out = Vec::with_capacity(body.len() + 128);
    if !has(b"date") {
        out.extend_from_slice(b"Date: ");
        out.extend_from_slice(crate::smtp::session::rfc5322_date(now_unix_s).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !has(b"message-id") {
        out.extend_from_slice(
            format!(
                "Message-ID: <{}>\r\n",
                message_id(&lim.hostname, now_unix_s)
            )
            .as_bytes(),
        );
    }
    out.extend_from_slice(&body);
    end_with_crlf(&mut out);
    Ok(out)
}

/// A message ends with a line end (as one received by SMTP does).
fn end_with_crlf(m: &mut Vec<u8>) {
    if !m.ends_with(b"\r\n") {
        m.extend_from_slice(b"\r\n");
    }
}

fn attachment(a: AttachmentWire, i: usize) -> Result<Attachment, InjectError> {
    let field = format!("attachments[{i}]");
    let content_type = a
        .content_type
        .unwrap_or_else(|| "application/octet-stream".into());
    let valid_token = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    match content_type.split_once('/') {
        Some((t, s)) if valid_token(t) && valid_token(s) => {}
        _ => {
            return Err(bad(format!(
                "{field}.content_type: {content_type:?} is not a MIME type (type/subtype)"
            )))
        }
    }
    let file_name = a
        .file_name
        .unwrap_or_else(|| format!("attachment-{}", i + 1));
    header_text(&file_name, &format!("{field}.file_name"))?;
    if file_name.is_empty() || file_name.contains(['/', '\\']) {
        return Err(bad(format!(
            "{field}.file_name: a file name without a path is needed"
        )));
    }
    let data = if a.base64.unwrap_or(true) {
        // Line breaks inside the base64 are allowed (as in a MIME body).
        let compact: Vec<u8> = a
            .data
            .bytes()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        base64::engine::general_purpose::STANDARD
            .decode(&compact)
            .map_err(|e| bad(format!("{field}.data: bad base64: {e}")))?
    } else {
        a.data.into_bytes()
    };
    Ok(Attachment {
        content_type,
        file_name,
        data,
    })
}

/// The built form: one message per recipient.
fn build_all(
    b: BuiltWire,
    sender: Option<String>,
    recipients: Vec<Recipient>,
    global: Option<Map<String, Value>>,
    lim: &InjectLimits,
    now_unix_s: u64,
) -> Result<Vec<Prepared>, InjectError> {
    let from = match &b.from {
        Some(v) => mailbox(v, "from")?,
        None => {
            return Err(bad(
                "\"content\" (a whole message) or \"from\" (to build one) is needed",
            ))
        }
    };
    let reply_to = b
        .reply_to
        .as_ref()
        .map(|v| mailbox(v, "reply_to"))
        .transpose()?;
    let subject = b.subject.unwrap_or_default();
    if b.text_body.is_none() && b.html_body.is_none() {
        return Err(bad("\"text_body\" or \"html_body\" is needed"));
    }
    let headers: Vec<(String, String)> = b.headers.unwrap_or_default().into_iter().collect();
    if headers.len() > limits::HTTP_INJECT_HEADERS_MAX {
        return Err(bad(format!(
            "at most {} headers",
            limits::HTTP_INJECT_HEADERS_MAX
        )));
    }
    for (n, v) in &headers {
        check_header(n, v)?;
    }
    let attachments = b.attachments.unwrap_or_default();
    if attachments.len() > limits::HTTP_INJECT_ATTACHMENTS_MAX {
        return Err(bad(format!(
            "at most {} attachments",
            limits::HTTP_INJECT_ATTACHMENTS_MAX
        )));
    }
    let attachments = attachments
        .into_iter()
        .enumerate()
        .map(|(i, a)| attachment(a, i))
        .collect::<Result<Vec<_>, _>>()?;
    let attached: u64 = attachments.iter().map(|a| a.data.len() as u64).sum();
    if attached > lim.message_size_limit {
        return Err(InjectError::TooLarge {
            size: attached,
            limit: lim.message_size_limit,
        });
    }
    // Every recipient's copy is held until the request is queued: bound them together (a copy holds at least
    // the attachments, so too many is known before building any).
    let total_max = limits::HTTP_INJECT_BUILT_BYTES_MAX.max(lim.message_size_limit);
    let attached_total = attached.saturating_mul(recipients.len() as u64);
    if attached_total > total_max {
        return Err(InjectError::RequestTooLarge {
            size: attached_total,
            limit: total_max,
        });
    }
    let mut total: u64 = 0;
    let global = global.unwrap_or_default();
    let sender = sender.unwrap_or_else(|| from.email.clone());
    let text = b.text_body.map(|t| String::from_utf8(crlf(t.as_bytes())));
    let html = b.html_body.map(|t| String::from_utf8(crlf(t.as_bytes())));
    // crlf() only inserts ASCII bytes next to ASCII bytes: UTF-8 stays UTF-8.
    let text = text.transpose().map_err(|_| bad("text_body: not UTF-8"))?;
    let html = html.transpose().map_err(|_| bad("html_body: not UTF-8"))?;
    let mut out = Vec::with_capacity(recipients.len());
    for (i, r) in recipients.into_iter().enumerate() {
        if global.len() + r.substitutions.len() > limits::HTTP_INJECT_SUBSTITUTIONS_MAX {
            return Err(bad(format!(
                "recipients[{i}]: at most {} substitutions",
                limits::HTTP_INJECT_SUBSTITUTIONS_MAX
            )));
        }
        // Check every value once (its type), so a bad one is refused even if no placeholder uses it.
        for (k, v) in global.iter().chain(r.substitutions.iter()) {
            substitution_text(v, &format!("substitutions.{k}"))?;
        }
        let lookup = |key: &str| {
            r.substitutions
                .get(key)
                .or_else(|| global.get(key))
                .and_then(|v| substitution_text(v, key).ok())
        };
        let lookup_html = |key: &str| lookup(key).map(|v| html_escape(&v));
        let max = lim.message_size_limit;
        let subject = substitute(&subject, &lookup, max)?;
        header_text(&subject, &format!("subject (for recipients[{i}])"))?;
        let text = text
            .as_deref()
            .map(|t| substitute(t, &lookup, max))
            .transpose()?;
        let html = html
            .as_deref()
            .map(|t| substitute(t, &lookup_html, max))
            .transpose()?;
        let content = build_one(
            &from,
            reply_to.as_ref(),
            &r.mailbox,
            &subject,
            text,
            html,
            &headers,
            &attachments,
            lim,
            now_unix_s,
        )?;
        check_size(&content, lim)?;
        total = total.saturating_add(content.len() as u64);
        if total > total_max {
            return Err(InjectError::RequestTooLarge {
                size: total,
                limit: total_max,
            });
        }
        out.push(Prepared {
            envelope_sender: sender.clone(),
            recipients: vec![r.mailbox.email],
            content,
            pool: None,
        });
    }
    Ok(out)
}

fn address_header(m: &Mailbox) -> mail_builder::headers::address::Address<'_> {
    mail_builder::headers::address::Address::new_address(m.name.as_deref(), m.email.as_str())
}

#[allow(clippy::too_many_arguments)]
fn build_one(
    from: &Mailbox,
    reply_to: Option<&Mailbox>,
    to: &Mailbox,
    subject: &str,
    text: Option<String>,
    html: Option<String>,
    headers: &[(String, String)],
    attachments: &[Attachment],
    lim: &InjectLimits,
    now_unix_s: u64,
) -> Result<Vec<u8>, InjectError> {
    use mail_builder::headers::text::Text;
    use mail_builder::MessageBuilder;
    let mut m = MessageBuilder::new()
        .from(address_header(from))
        .to(address_header(to));
    if let Some(r) = reply_to {
        m = m.reply_to(address_header(r));
    }
    m = m
        .subject(subject)
        .date(mail_builder::headers::date::Date::new(
            i64::try_from(now_unix_s).unwrap_or(i64::MAX),
        ))
        .message_id(message_id(&lim.hostname, now_unix_s));
    for (n, v) in headers {
        m = m.header(n.as_str(), Text::new(v.as_str()));
    }
    if let Some(t) = text {
        m = m.text_body(t);
    }
    if let Some(h) = html {
        m = m.html_body(h);
    }
    for a in attachments {
        m = m.attachment(
            a.content_type.as_str(),
            a.file_name.as_str(),
            a.data.as_slice(),
        );
    }
    let mut out = m
        .write_to_vec()
        .map_err(|e| bad(format!("cannot build the message: {e}")))?;
    end_with_crlf(&mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim() -> InjectLimits {
        InjectLimits {
            message_size_limit: 100_000,
            recipient_limit: 5,
            hostname: "mx.test".into(),
        }
    }

    fn prep(json: &str) -> Result<Vec<Prepared>, InjectError> {
        prepare(json.as_bytes(), &lim(), 1_700_000_000)
    }

    fn text(p: &Prepared) -> String {
        String::from_utf8(p.content.clone()).unwrap()
    }

    fn bad_text(json: &str) -> String {
        match prep(json) {
            Err(InjectError::Bad(s)) => s,
            other => panic!("{json}: {other:?}"),
        }
    }

    #[test]
    fn raw_form_gets_crlf_and_missing_headers() {
        let v = prep(r#"{"envelope_sender":"a@x.example","recipients":["b@y.example","C@Y.EXAMPLE"],"content":"From: a@x.example\nSubject: hi\n\nline\rtwo\r\n"}"#).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].envelope_sender, "a@x.example");
        assert_eq!(v[0].recipients, vec!["b@y.example", "C@y.example"]);
        let t = text(&v[0]);
        assert!(
            t.starts_with("Date: Tue, 14 Nov 2023 22:13:20 +0000\r\nMessage-ID: <"),
            "{t}"
        );
        assert!(
            t.ends_with("From: a@x.example\r\nSubject: hi\r\n\r\nline\r\ntwo\r\n"),
            "{t}"
        );
        assert!(!t.replace("\r\n", "").contains('\n'));
        // Present headers are not added again; a Date: in the body does not count.
        let v = prep(r#"{"envelope_sender":"","recipients":["b@y.example"],"content":"message-id: <1@x>\r\nDATE: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nbody"}"#).unwrap();
        assert_eq!(v[0].envelope_sender, "");
        assert!(text(&v[0]).starts_with("message-id: <1@x>"));
        let v = prep(r#"{"envelope_sender":"a@x.example","recipients":["b@y.example"],"content":"Subject: s\r\n\r\nDate: not a header\r\n"}"#).unwrap();
        assert!(text(&v[0]).starts_with("Date: "));
        // The last line gets its line end.
        let v = prep(r#"{"envelope_sender":"a@x.example","recipients":["b@y.example"],"content":"Subject: s\n\nno end"}"#).unwrap();
        assert!(text(&v[0]).ends_with("\r\n\r\nno end\r\n"));
        let v = prep(r#"{"from":"a@x.example","recipients":["b@y.example"],"text_body":"no end"}"#)
            .unwrap();
        assert!(text(&v[0]).ends_with("no end\r\n"), "{}", text(&v[0]));
    }

    #[test]
    fn bad_requests_name_the_field() {
        for (json, want) in [
            ("{", "bad JSON"),
            (r#"{"recipients":[]}"#, "\"recipients\" is empty"),
            (
                r#"{"recipients":["a@b.c"],"content":"x"}"#,
                "envelope_sender",
            ),
            (
                r#"{"envelope_sender":"a@b","recipients":["not an address"],"content":"x"}"#,
                "recipients[0]",
            ),
            (
                r#"{"envelope_sender":"a@b","recipients":[{"mail":"a@b.c"}],"content":"x"}"#,
                "unknown field \"mail\"",
            ),
            (
                r#"{"envelope_sender":"a@b","recipients":["a@b.c"],"content":""}"#,
                "empty",
            ),
            (
                r#"{"envelope_sender":"a@b","recipients":["a@b.c"],"content":5}"#,
                "\"content\" is a string",
            ),
            (
                r#"{"envelope_sender":"a@b","recipients":["a@b.c"],"content":"x","subject":"s"}"#,
                "do not go with it",
            ),
            (
                r#"{"envelope_sender":"a@b","recipients":[{"email":"a@b.c","substitutions":{"a":"b"}}],"content":"x"}"#,
                "built form only",
            ),
            (
                r#"{"recipients":["a@b.c"],"subject":"s","text_body":"t"}"#,
                "\"from\"",
            ),
            (r#"{"recipients":["a@b.c"],"from":"f@x.y"}"#, "text_body"),
            (
                r#"{"recipients":["a@b.c"],"from":"f@x.y","text_body":"t","subject":"a\r\nBcc: victim@x.y"}"#,
                "header injection",
            ),
            (
                r#"{"recipients":["a@b.c"],"from":{"email":"f@x.y","name":"F\nX-Evil: 1"},"text_body":"t"}"#,
                "from.name",
            ),
            (
                r#"{"recipients":["a@b.c"],"from":"f@x.y","text_body":"t","headers":{"X-A":"1\r\nX-B: 2"}}"#,
                "header injection",
            ),
            (
                r#"{"recipients":["a@b.c"],"from":"f@x.y","text_body":"t","headers":{"X A":"1"}}"#,
                "header name",
            ),
            (
                r#"{"recipients":["a@b.c"],"from":"f@x.y","text_body":"t","headers":{"content-type":"text/evil"}}"#,
                "set by the builder",
            ),
            (
                r#"{"recipients":["a@b.c"],"from":"f@x.y","text_body":"t","attachments":[{"data":"!!!"}]}"#,
                "bad base64",
            ),
            (
                r#"{"recipients":["a@b.c"],"from":"f@x.y","text_body":"t","attachments":[{"data":"","content_type":"text"}]}"#,
                "MIME type",
            ),
            (
                r#"{"recipients":["a@b.c"],"from":"f@x.y","text_body":"t","attachments":[{"data":"","file_name":"../x"}]}"#,
                "file name",
            ),
            (
                r#"{"recipients":["a@b.c"],"from":"f@x.y","text_body":"t","substitutions":{"a":[1]}}"#,
                "substitutions.a",
            ),
            (
                r#"{"recipients":["a@b.c"],"content":{"from":"f@x.y","text_body":"t"},"subject":"s"}"#,
                "not both",
            ),
            (
                r#"{"recipients":["a@b.c"],"content":{"from":"f@x.y","body":"t"}}"#,
                "content: unknown field `body`",
            ),
            (
                r#"{"recipients":["1@b.c","2@b.c","3@b.c","4@b.c","5@b.c","6@b.c"],"from":"f@x.y","text_body":"t"}"#,
                "at most 5",
            ),
            (
                r#"{"recipients":["a@b.c"],"from":"f@x.y","text_body":"t","bogus":1}"#,
                "bogus",
            ),
            (
                r#"{"recipients":["ü@b.c"],"from":"f@x.y","text_body":"t"}"#,
                "recipients[0]",
            ),
        ] {
            let e = bad_text(json);
            assert!(e.contains(want), "{json}: {e}");
        }
        // serde_json's message says where.
        assert!(bad_text("{\"recipients\": [\n  \"a@b.c\",\n]}").contains("line 3"));
    }

    #[test]
    fn built_form_one_message_per_recipient_with_substitutions() {
        let v = prep(
            r#"{
            "from": {"email": "news@x.example", "name": "Die Zeitung"},
            "reply_to": "help@x.example",
            "subject": "Hallo {{name}}, {{ unknown }} {{ count }}",
            "text_body": "Dear {{name}},\nyou have {{count}} items.\n{{ name",
            "html_body": "<p>Dear {{name}}</p>",
            "headers": {"X-Campaign": "spring", "List-Unsubscribe": "<mailto:u@x.example>"},
            "substitutions": {"count": 3, "name": "friend"},
            "recipients": [
                {"email": "ann@y.example", "name": "Ann", "substitutions": {"name": "Ann <&>"}},
                "bob@y.example"
            ]
        }"#,
        )
        .unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].recipients, vec!["ann@y.example"]);
        assert_eq!(v[1].recipients, vec!["bob@y.example"]);
        assert_eq!(v[0].envelope_sender, "news@x.example");
        let a = text(&v[0]);
        assert!(
            a.contains("To: \"Ann\" <ann@y.example>") || a.contains("To: Ann <ann@y.example>"),
            "{a}"
        );
        assert!(
            a.contains("Subject: Hallo Ann <&>, {{ unknown }} 3\r\n"),
            "{a}"
        );
        assert!(
            a.contains("Dear Ann <&>,\r\nyou have 3 items.\r\n{{ name"),
            "{a}"
        );
        assert!(a.contains("<p>Dear Ann &lt;&amp;&gt;</p>"), "{a}");
        assert!(a.contains("multipart/alternative"), "{a}");
        assert!(a.contains("X-Campaign: spring\r\n"), "{a}");
        assert!(a.contains("Message-ID: <"), "{a}");
        assert!(a.contains("MIME-Version: 1.0\r\n"), "{a}");
        assert!(
            a.contains("Reply-To: <help@x.example>") || a.contains("Reply-To: help@x.example"),
            "{a}"
        );
        let b = text(&v[1]);
        assert!(
            b.contains("Subject: Hallo friend, {{ unknown }} 3\r\n"),
            "{b}"
        );
        assert!(!b.contains("ann@"), "one recipient per message: {b}");
        for m in [&a, &b] {
            assert!(!m.replace("\r\n", "").contains('\n'), "bare LF in {m}");
            assert!(m.lines().all(|l| l.len() <= 998));
        }
    }

    #[test]
    fn built_form_structure_and_encodings() {
        // Text only: text/plain, no multipart.
        let v = prep(r#"{"from":"f@x.example","recipients":["t@y.example"],"subject":"Grüße","text_body":"plain"}"#).unwrap();
        let t = text(&v[0]);
        assert!(t.contains("Content-Type: text/plain"), "{t}");
        assert!(!t.contains("multipart"), "{t}");
        assert!(t.contains("Subject: =?utf-8?"), "RFC 2047: {t}");
        // Attachments: multipart/mixed, base64 in lines of at most 76.
        let data = base64::engine::general_purpose::STANDARD.encode(vec![0xA5u8; 3000]);
        let json = format!(
            r#"{{"content":{{"from":"f@x.example","text_body":"t","html_body":"<b>h</b>","attachments":[{{"data":"{data}","content_type":"application/pdf","file_name":"r.pdf"}},{{"data":"plain text","base64":false,"content_type":"text/plain"}}]}},"recipients":["t@y.example"]}}"#
        );
        let v = prep(&json).unwrap();
        let t = text(&v[0]);
        assert!(t.contains("multipart/mixed"), "{t}");
        assert!(t.contains("multipart/alternative"), "{t}");
        assert!(t.contains("r.pdf"), "{t}");
        assert!(t.contains("attachment-2"), "{t}");
        let b64_lines: Vec<&str> = t
            .split("\r\n")
            .filter(|l| {
                l.len() > 40
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
            })
            .collect();
        assert!(!b64_lines.is_empty(), "{t}");
        assert!(b64_lines.iter().all(|l| l.len() <= 76), "{b64_lines:?}");
    }

    #[test]
    fn sizes_are_bounded() {
        let big = "x".repeat(100_001);
        let json =
            format!(r#"{{"envelope_sender":"a@b.c","recipients":["a@b.c"],"content":"{big}"}}"#);
        assert!(matches!(prep(&json), Err(InjectError::TooLarge { .. })));
        // A substitution used many times cannot blow the message up past the limit.
        let many = "{{v}}".repeat(1000);
        let json = format!(
            r#"{{"from":"f@x.y","recipients":["a@b.c"],"text_body":"{many}","substitutions":{{"v":"{}"}}}}"#,
            "y".repeat(1000)
        );
        assert!(matches!(prep(&json), Err(InjectError::TooLarge { .. })));
    }

    #[test]
    fn built_copies_for_many_recipients_are_bounded_together() {
        // Each recipient's copy is under message_size_limit, but the request as a whole would hold
        // 1200 x 60 kB = 72 MB in memory before the first one is queued.
        let lim = InjectLimits {
            message_size_limit: 100_000,
            recipient_limit: 2000,
            hostname: "mx.test".into(),
        };
        let rcpts: Vec<String> = (0..1200).map(|i| format!("\"r{i}@y.example\"")).collect();
        let json = format!(
            r#"{{"from":"f@x.example","recipients":[{}],"text_body":"{}"}}"#,
            rcpts.join(","),
            "x".repeat(60_000)
        );
        match prepare(json.as_bytes(), &lim, 1_700_000_000) {
            Err(InjectError::RequestTooLarge { limit, .. }) => {
                assert_eq!(limit, limits::HTTP_INJECT_BUILT_BYTES_MAX)
            }
            Err(e) => panic!("{e}"),
            Ok(v) => panic!(
                "{} messages, {} bytes together",
                v.len(),
                v.iter().map(|p| p.content.len()).sum::<usize>()
            ),
        }
        // The same with attachments is refused before anything is built.
        let data = base64::engine::general_purpose::STANDARD.encode(vec![7u8; 60_000]);
        let json = format!(
            r#"{{"from":"f@x.example","recipients":[{}],"text_body":"t","attachments":[{{"data":"{data}"}}]}}"#,
            rcpts.join(",")
        );
        assert!(matches!(
            prepare(json.as_bytes(), &lim, 1_700_000_000),
            Err(InjectError::RequestTooLarge { .. })
        ));
    }

    #[test]
    fn line_ends_become_crlf() {
        assert_eq!(crlf(b"a\nb\rc\r\nd\n\n"), b"a\r\nb\r\nc\r\nd\r\n\r\n");
        assert_eq!(crlf(b""), b"");
        assert_eq!(crlf(b"\r"), b"\r\n");
    }

    #[test]
    fn substitution_edges() {
        let vals = |k: &str| (k == "a").then(|| "A".to_string());
        for (t, want) in [
            ("{{a}}", "A"),
            ("{{ a }}x", "Ax"),
            ("{{b}}", "{{b}}"),
            ("{{", "{{"),
            ("{{a", "{{a"),
            ("}}{{a}}{{", "}}A{{"),
            ("{{a b}}", "{{a b}}"),
            ("{{}}", "{{}}"),
            ("ü{{a}}ü", "üAü"),
        ] {
            assert_eq!(substitute(t, &vals, 1000).unwrap(), want, "{t}");
        }
    }
}
