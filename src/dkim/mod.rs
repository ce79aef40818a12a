//! DKIM signing (RFC 6376, RFC 8463): owns the signers a configuration's `[[dkim]]` entries make (keys read at
//! start and on reload), the choice of signers for a message (the From: domain or its nearest configured
//! parent), which mail is signed (`should_sign`), and the DKIM-Signature header fields themselves
//! (relaxed/relaxed, rsa-sha256 and ed25519-sha256, on ring).
//!
//! A message is signed once, when it is accepted: the fields are stored in front of its Received header (the
//! queue record's trace headers), so every delivery attempt sends the signed bytes unchanged and no attempt
//! signs again. [`Dkim::select`] and [`Selected::finish`] do the cheap part (header selection, the body hash
//! streamed in slices with a yield of the reactor between them, the header hash input) on the shard's thread;
//! [`Prepared::sign`] does the private-key operation, which for RSA (about half a millisecond) the server runs
//! on the shard's blocking pool ([`Prepared::is_slow`]).

pub mod canon;
pub mod key;

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine as _;

pub use key::{KeyAlgorithm, KeyError, SigningKey};

use crate::config::Config;

/// Headers signed when a `[[dkim]]` entry names none (those present in the message; From: is oversigned).
pub const DEFAULT_SIGNED_HEADERS: [&str; 12] = [
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "list-unsubscribe",
    "list-unsubscribe-post",
];

/// Names one `[[dkim]]` entry may list at most (`headers`).
pub const SIGNED_HEADER_NAMES_MAX: usize = 64;

/// Length of the lines the DKIM-Signature field is folded at (well under 998).
const FOLD_COLUMN: usize = 76;

/// One `[[dkim]]` entry with its key read.
#[derive(Debug)]
pub struct Signer {
    /// `d=`: lower case, no final dot.
    pub domain: String,
    /// `s=`.
    pub selector: String,
    pub key: SigningKey,
    /// Header names to sign (lower case; `from` always among them).
    pub headers: Vec<String>,
}

/// Why a signature could not be made (ring refused: it does not happen with a key it accepted).
#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error("signing with {domain} selector {selector} failed")]
    Sign { domain: String, selector: String },
}

/// Where a message came from, for [`should_sign`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// An SMTP client in `mynetworks`, or one that authenticated.
    Trusted,
    /// The HTTP injection API (its clients are trusted networks or token holders).
    Injected,
    /// Any other SMTP client; `all_relayed`: every final recipient is relayed (none in `mydestination`).
    Outsider { all_relayed: bool },
}

/// Whether a message from `origin` is signed: trusted and injected mail always; an outsider's only when
/// `dkim_sign_relayed` is on and none of its recipients is local (mail to `mydestination` from outsiders is
/// never signed: a forged From: of our domain must not arrive in a local mailbox with our signature).
pub fn should_sign(origin: Origin, sign_relayed: bool) -> bool {
    match origin {
        Origin::Trusted | Origin::Injected => true,
        Origin::Outsider { all_relayed } => sign_relayed && all_relayed,
    }
}

/// The signers of a configuration, by domain.
#[derive(Debug, Default)]
pub struct Dkim {
    by_domain: HashMap<String, Vec<Arc<Signer>>>,
}

/// A domain as `d=` and the lookup use it: lower case, without a final dot (the relay's one domain form,
/// [`crate::smtp::address::normalize_domain`]), surrounding white space dropped (a configuration value).
pub fn normalize(domain: &str) -> String {
    crate::smtp::address::normalize_domain(domain.trim())
}

impl Dkim {
    /// No signers: nothing is signed.
    pub fn empty() -> Dkim {
        Dkim::default()
    }

    /// Reads every `[[dkim]]` key of `cfg`; every problem listed, each naming the entry and its file.
    pub fn load(cfg: &Config) -> Result<Dkim, Vec<String>> {
        let mut by_domain: HashMap<String, Vec<Arc<Signer>>> = HashMap::new();
        let mut problems = Vec::new();
        for e in &cfg.dkim {
            let key = match SigningKey::load(&e.private_key_file) {
                Ok(k) => k,
                Err(err) => {
                    problems.push(format!(
                        "dkim (domain {}, selector {}) private_key_file {err}",
                        e.domain, e.selector
                    ));
                    continue;
                }
            };
            let mut headers: Vec<String> = match &e.headers {
                Some(h) => h.iter().map(|n| n.trim().to_ascii_lowercase()).collect(),
                None => DEFAULT_SIGNED_HEADERS
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            };
            let mut seen = std::collections::HashSet::new();
            headers.retain(|h| seen.insert(h.clone()));
            if !headers.iter().any(|h| h == "from") {
                headers.insert(0, "from".into());
            }
            let domain = normalize(&e.domain);
            by_domain
                .entry(domain.clone())
                .or_default()
                .push(Arc::new(Signer {
                    domain,
                    selector: e.selector.trim().to_string(),
                    key,
                    headers,
                }));
        }
        if problems.is_empty() {
            Ok(Dkim { by_domain })
        } else {
            Err(problems)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_domain.is_empty()
    }

    /// The signers for mail from `from_domain`: those of the domain itself, else of its nearest configured
    /// parent.
    pub fn signers_for(&self, from_domain: &str) -> Option<&[Arc<Signer>]> {
        let mut d = from_domain;
        loop {
            if let Some(s) = self.by_domain.get(d) {
                return Some(s);
            }
            d = d.split_once('.')?.1;
        }
    }

    /// The signers of `data` (the message as stored: CRLF line ends) and its header fields: None when it has
    /// no single From: with one parseable address, no signer for its domain, or more than
    /// [`canon::HEADER_FIELDS_MAX`] header fields.
    pub fn select<'a, 'd>(&'a self, data: &'d [u8]) -> Option<Selected<'a, 'd>> {
        if self.is_empty() {
            return None;
        }
        let (fields, body_at) = canon::header_fields(data)?;
        let mut froms = fields
            .iter()
            .filter(|f| f.name.eq_ignore_ascii_case(b"from"));
        let from = froms.next()?;
        if froms.next().is_some() {
            return None;
        }
        let domain = from_domain(from.raw)?;
        let signers = self.signers_for(&domain)?;
        Some(Selected {
            signers,
            fields,
            body_at,
        })
    }

    /// Everything but the private-key operations for the signatures of `data` ([`Dkim::select`], the body
    /// hash in one go, [`Selected::finish`]).
    pub fn prepare(&self, data: &[u8], now_unix_s: u64) -> Option<Prepared> {
        let sel = self.select(data)?;
        let mut body = canon::BodyHasher::new();
        body.update(&data[sel.body_at..]);
        Some(sel.finish(body.finish(), now_unix_s))
    }

    /// [`Dkim::prepare`] and [`Prepared::sign`] in one (benchmarks, tests).
    pub fn sign_now(&self, data: &[u8], now_unix_s: u64) -> Option<Result<Vec<u8>, DkimError>> {
        self.prepare(data, now_unix_s).map(Prepared::sign)
    }
}

/// A message's signers and header fields, waiting for its body hash.
pub struct Selected<'a, 'd> {
    signers: &'a [Arc<Signer>],
    fields: Vec<canon::Field<'d>>,
    body_at: usize,
}

impl Selected<'_, '_> {
    /// Where the body starts in the message.
    pub fn body_at(&self) -> usize {
        self.body_at
    }

    /// The signatures' fields up to `b=` and their header hash inputs, given the body's relaxed SHA-256.
    pub fn finish(self, body_hash: ring::digest::Digest, now_unix_s: u64) -> Prepared {
        let bh = base64::engine::general_purpose::STANDARD.encode(body_hash.as_ref());
        let parts = self
            .signers
            .iter()
            .map(|s| prepare_one(s, &self.fields, &bh, now_unix_s))
            .collect();
        Prepared { parts }
    }
}

/// Body bytes hashed between two yields of the shard's reactor (about 130 µs at the measured 480 MiB/s), so a
/// large message does not hold up the shard's other sessions.
pub const BODY_HASH_SLICE_BYTES: usize = 64 * 1024;

/// A message's signatures, ready for their private-key operations.
pub struct Prepared {
    /// Per signer: the field up to `b=` (as it will be written) and the bytes to sign.
    parts: Vec<(Arc<Signer>, String, Vec<u8>)>,
}

impl Prepared {
    /// Whether one of the signatures is RSA (too slow for the reactor thread).
    pub fn is_slow(&self) -> bool {
        self.parts.iter().any(|(s, _, _)| s.key.is_slow())
    }

    /// The DKIM-Signature fields, CRLF-terminated, in the order of the `[[dkim]]` entries.
    pub fn sign(self) -> Result<Vec<u8>, DkimError> {
        let mut out = Vec::with_capacity(self.parts.len() * 700);
        for (signer, head, input) in self.parts {
            let sig = signer.key.sign(&input).map_err(|_| DkimError::Sign {
                domain: signer.domain.clone(),
                selector: signer.selector.clone(),
            })?;
            out.extend_from_slice(head.as_bytes());
            let b = base64::engine::general_purpose::STANDARD.encode(sig);
            // The value follows "\tb=" (a tab, 8 columns, and 2), folded.
            let mut col = 10;
            for chunk in b.as_bytes().chunks(FOLD_COLUMN - 12) {
                if col + chunk.len() > FOLD_COLUMN {
                    out.extend_from_slice(b"\r\n\t");
                    col = 8;
                }
                out.extend_from_slice(chunk);
                col += chunk.len();
            }
            out.extend_from_slice(b"\r\n");
        }
        Ok(out)
    }
}

/// The trace headers an accepted message is stored with: its DKIM-Signature fields (when mail from `origin`
/// is signed and a signer matches its From: domain) followed by `received`. RSA signatures are made on the
/// shard's blocking pool, Ed25519 ones here. A signature that fails is left out (logged): the message is still
/// accepted, unsigned.
pub async fn trace_headers(
    dkim: &Dkim,
    origin: Origin,
    sign_relayed: bool,
    data: &[u8],
    now_unix_s: u64,
    received: Vec<u8>,
) -> Vec<u8> {
    if dkim.is_empty() || !should_sign(origin, sign_relayed) {
        return received;
    }
    let Some(sel) = dkim.select(data) else {
        tracing::debug!(target: crate::eventlog::SMTPD, "not signed: no single From: domain with a [[dkim]] key");
        return received;
    };
    // The body hash in slices, the reactor free to run other tasks between them.
    let mut body = canon::BodyHasher::new();
    let mut slices = data[sel.body_at()..]
        .chunks(BODY_HASH_SLICE_BYTES)
        .peekable();
    while let Some(slice) = slices.next() {
        body.update(slice);
        if slices.peek().is_some() {
            futures_lite::future::yield_now().await;
        }
    }
    let prepared = sel.finish(body.finish(), now_unix_s);
    let signed = if prepared.is_slow() {
        glommio::executor()
            .spawn_blocking(move || prepared.sign())
            .await
    } else {
        prepared.sign()
    };
    match signed {
        Ok(mut fields) => {
            SIGNED.with(|c| c.set(c.get() + 1));
            fields.extend_from_slice(&received);
            fields
        }
        Err(e) => {
            SIGN_FAILURES.with(|c| c.set(c.get() + 1));
            tracing::warn!(target: crate::eventlog::SMTPD, "{e}: message accepted unsigned");
            received
        }
    }
}

thread_local! {
    /// Messages signed on this thread (a shard), and signings that failed (the message went unsigned): the
    /// shard copies them into its stats each tick ([`signing_counts`]).
    static SIGNED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    static SIGN_FAILURES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// (messages signed, signings failed) on the calling thread since it started.
pub fn signing_counts() -> (u64, u64) {
    (SIGNED.with(|c| c.get()), SIGN_FAILURES.with(|c| c.get()))
}

/// One signer's DKIM-Signature up to `b=`, and the header hash input.
fn prepare_one(
    s: &Arc<Signer>,
    fields: &[canon::Field<'_>],
    bh: &str,
    now_unix_s: u64,
) -> (Arc<Signer>, String, Vec<u8>) {
    // h=: each named field as often as it occurs, From: once more at the end (oversigned: a From: added
    // later breaks the signature).
    let mut names: Vec<&str> = Vec::new();
    for h in &s.headers {
        let n = fields
            .iter()
            .filter(|f| f.name.eq_ignore_ascii_case(h.as_bytes()))
            .count();
        names.extend(std::iter::repeat_n(h.as_str(), n));
    }
    names.push("from");
    let mut head = format!(
        "DKIM-Signature: v=1; a={}; c=relaxed/relaxed;\r\n\td={}; s={};\r\n\tt={now_unix_s}; h=",
        s.key.algorithm(),
        s.domain,
        s.selector
    );
    // The line so far: a tab (8 columns), "t=...; h=".
    let mut col = 8 + format!("t={now_unix_s}; h=").len();
    for (i, n) in names.iter().enumerate() {
        if i > 0 {
            head.push(':');
            col += 1;
        }
        if col + n.len() + 1 > FOLD_COLUMN {
            head.push_str("\r\n\t");
            col = 8;
        }
        head.push_str(n);
        col += n.len();
    }
    head.push_str(";\r\n\tbh=");
    head.push_str(bh);
    head.push_str(";\r\n\tb=");
    // The hash input: the named fields from the bottom up, each name's next instance (none left: nothing),
    // then this field with an empty b=, without its CRLF.
    let mut input = Vec::with_capacity(1024);
    let mut used: HashMap<&str, usize> = HashMap::new();
    for n in &names {
        let k = used.entry(n).or_insert(0);
        if let Some(f) = fields
            .iter()
            .rev()
            .filter(|f| f.name.eq_ignore_ascii_case(n.as_bytes()))
            .nth(*k)
        {
            canon::relaxed_header(f.raw, &mut input, true);
        }
        *k += 1;
    }
    canon::relaxed_header(head.as_bytes(), &mut input, false);
    (s.clone(), head, input)
}

/// The domain of the single address in a From: field (`From: Name <a@b.example>`, `From: a@b.example (c)`),
/// lower case without a final dot; None for none, several, a group, or an address literal.
pub fn from_domain(raw: &[u8]) -> Option<String> {
    let colon = memchr::memchr(b':', raw)?;
    let value = &raw[colon + 1..];
    // Outside quoted strings and comments: the angle address, the commas, the text.
    let mut text = Vec::with_capacity(value.len());
    let mut angle: Option<Vec<u8>> = None;
    let mut in_angle: Option<Vec<u8>> = None;
    let (mut quoted, mut depth, mut escaped) = (false, 0usize, false);
    for &b in value {
        if escaped {
            escaped = false;
            continue;
        }
        match b {
            b'\\' if quoted || depth > 0 => escaped = true,
            b'"' if depth == 0 => quoted = !quoted,
            _ if quoted => {}
            b'(' => depth = depth.saturating_add(1).min(64),
            b')' if depth > 0 => depth -= 1,
            _ if depth > 0 => {}
            b'<' => {
                if angle.is_some() || in_angle.is_some() {
                    return None;
                }
                in_angle = Some(Vec::new());
            }
            b'>' => angle = Some(in_angle.take()?),
            b',' | b';' => return None, // several mailboxes, or a group
            _ => match &mut in_angle {
                Some(a) => a.push(b),
                None => text.push(b),
            },
        }
    }
    if in_angle.is_some() || quoted {
        return None;
    }
    let addr = angle.unwrap_or(text);
    let at = memchr::memrchr(b'@', &addr)?;
    let domain: Vec<u8> = addr[at + 1..]
        .iter()
        .copied()
        .filter(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        .collect();
    let domain = std::str::from_utf8(&domain).ok()?;
    let domain = normalize(domain);
    let ok = !domain.is_empty()
        && domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !domain.starts_with('.')
        && !domain.contains("..");
    ok.then_some(domain)
}

#[cfg(test)]
mod tests;
