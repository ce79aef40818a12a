//! The bounce classifier: which kind of failure a deferral or a bounce is (invalid recipient, mailbox full,
//! policy block, rate limit, ...), from an ordered rules table matched against the diagnostic's reply code,
//! enhanced status code and text, as KumoMTA's bounce classifier does. The class goes into the delivery log,
//! the event log and the metrics; it changes no delivery decision (scope and severity are [`super::trouble`]'s).
//!
//! Input is the diagnostic as recorded for a recipient (`RcptResult::reply`): `550 5.1.1 text` for a server's
//! reply, `4.4.1 text` for a failure of ours (no reply code). Rules are tried in order and the first that
//! matches gives the class; nothing matching is [`BounceClass::Other`]. The built-in rules come from real
//! provider replies (Gmail, Yahoo, Microsoft, Orange, Mail.ru and common MTAs, see the tests); an operator's
//! file (`bounce_classification_file`) puts its rules before them, or instead of them with
//! `replace_defaults = true`.
//!
//! Bounds: a rules file of at most 1 MiB and 10,000 rules; a text pattern is a `regex` (linear time, compiled
//! with a size limit), matched against at most the first 1,024 bytes of a diagnostic.

use std::path::Path;
use std::sync::{Arc, RwLock};

use regex::{Regex, RegexBuilder};
use serde::Deserialize;

use crate::smtp::reply_parser::EnhancedCode;

/// Largest rules file read.
const RULES_FILE_MAX: u64 = 1 << 20;
/// Most rules in a file.
const RULES_MAX: usize = 10_000;
/// Compiled size limit of one text pattern.
const PATTERN_SIZE_MAX: usize = 256 * 1024;
/// Bytes of a diagnostic's text that patterns see.
const TEXT_MAX: usize = 1024;

/// The kinds of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BounceClass {
    /// The address does not exist or is disabled (`5.1.1`, "no such user").
    InvalidRecipient,
    /// The mailbox is over quota (`x.2.2`).
    MailboxFull,
    /// Refused as spam or by policy: block lists, authentication (SPF/DKIM/DMARC), reverse DNS (`5.7.1`).
    PolicyBlock,
    /// Slowed down: reputation or rate limits, "try again later" throttles (Yahoo TSS04, Gmail 4.7.28).
    RateLimit,
    /// The destination's DNS: no such domain, null MX, lookups failing.
    DnsFailure,
    /// TLS could not be set up or the server could not be authenticated (STARTTLS, certificate, DANE, MTA-STS).
    TlsFailure,
    /// The content was refused (spam content, virus, `x.6.x`).
    ContentRejected,
    /// Larger than the server takes (`x.3.4`, `552` size).
    MessageTooLarge,
    /// Anything else (connections refused or lost, timeouts, protocol errors).
    Other,
}

impl BounceClass {
    pub const ALL: [BounceClass; 9] = [
        BounceClass::InvalidRecipient,
        BounceClass::MailboxFull,
        BounceClass::PolicyBlock,
        BounceClass::RateLimit,
        BounceClass::DnsFailure,
        BounceClass::TlsFailure,
        BounceClass::ContentRejected,
        BounceClass::MessageTooLarge,
        BounceClass::Other,
    ];
    pub const COUNT: usize = Self::ALL.len();

    /// The name in logs, metrics and rules files.
    pub fn name(self) -> &'static str {
        match self {
            BounceClass::InvalidRecipient => "invalid_recipient",
            BounceClass::MailboxFull => "mailbox_full",
            BounceClass::PolicyBlock => "policy_block",
            BounceClass::RateLimit => "rate_limit",
            BounceClass::DnsFailure => "dns_failure",
            BounceClass::TlsFailure => "tls_failure",
            BounceClass::ContentRejected => "content_rejected",
            BounceClass::MessageTooLarge => "message_too_large",
            BounceClass::Other => "other",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A diagnostic split into its parts (borrowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Diag<'a> {
    /// The server's reply code; `None` for a failure of ours (no server answered).
    pub code: Option<u16>,
    pub status: Option<EnhancedCode>,
    pub text: &'a str,
}

impl<'a> Diag<'a> {
    /// Splits `550 5.1.1 text`, `550 text`, `4.4.1 text` or plain text.
    pub fn parse(reply: &'a str) -> Diag<'a> {
        let mut rest = reply.trim_start();
        let mut code = None;
        if let Some(head) = rest.get(..3) {
            let after = &rest[3..];
            if head.bytes().all(|b| b.is_ascii_digit())
                && (after.is_empty() || after.starts_with([' ', '-']))
            {
                code = head.parse::<u16>().ok().filter(|c| (200..600).contains(c));
                if code.is_some() {
                    rest = after.get(1..).unwrap_or("").trim_start();
                }
            }
        }
        let word_end = rest.find(' ').unwrap_or(rest.len());
        let status = EnhancedCode::parse(&rest.as_bytes()[..word_end]);
        if status.is_some() {
            rest = rest[word_end..].trim_start();
        }
        let text = match rest.char_indices().nth(TEXT_MAX) {
            Some((i, _)) => &rest[..i],
            None => rest,
        };
        Diag { code, status, text }
    }
}

/// A reply code pattern: `550`, `5xx`, `55x`, or `none` (a failure of ours: no server reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CodePattern {
    None,
    /// Three positions, each a digit or any (`x`).
    Digits([Option<u8>; 3]),
}

impl CodePattern {
    pub(crate) fn parse(s: &str) -> Result<CodePattern, String> {
        if s.eq_ignore_ascii_case("none") {
            return Ok(CodePattern::None);
        }
        let b = s.as_bytes();
        if b.len() != 3 {
            return Err(format!(
                "code {s:?}: three characters (550, 5xx, 55x) or \"none\""
            ));
        }
        let mut d = [None; 3];
        for (i, c) in b.iter().enumerate() {
            d[i] = match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'x' | b'X' => None,
                _ => return Err(format!("code {s:?}: digits or x")),
            };
        }
        if !matches!(d[0], Some(2..=5) | None) {
            return Err(format!("code {s:?}: a reply code starts with 2 to 5"));
        }
        Ok(CodePattern::Digits(d))
    }

    pub(crate) fn matches(&self, code: Option<u16>) -> bool {
        match (self, code) {
            (CodePattern::None, c) => c.is_none(),
            (CodePattern::Digits(_), None) => false,
            (CodePattern::Digits(d), Some(c)) => {
                let digits = [(c / 100) as u8, (c / 10 % 10) as u8, (c % 10) as u8];
                d.iter()
                    .zip(digits)
                    .all(|(want, got)| want.is_none_or(|w| w == got))
            }
        }
    }
}

/// An enhanced status pattern: `5.1.1`, `x.7.1`, `5.7.*`, `*.2.2` (`x` or `*` for any part).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StatusPattern([Option<u16>; 3]);

impl StatusPattern {
    pub(crate) fn parse(s: &str) -> Result<StatusPattern, String> {
        let parts: Vec<&str> = s.split('.').collect();
        if parts.len() != 3 {
            return Err(format!(
                "status {s:?}: class.subject.detail, e.g. 5.1.1 or x.7.*"
            ));
        }
        let mut p = [None; 3];
        for (i, part) in parts.iter().enumerate() {
            p[i] = match *part {
                "x" | "X" | "*" => None,
                n if !n.is_empty() && n.len() <= 3 && n.bytes().all(|b| b.is_ascii_digit()) => {
                    Some(n.parse::<u16>().map_err(|e| format!("status {s:?}: {e}"))?)
                }
                _ => return Err(format!("status {s:?}: each part is a number, x or *")),
            };
        }
        Ok(StatusPattern(p))
    }

    pub(crate) fn matches(&self, status: Option<EnhancedCode>) -> bool {
        let Some(s) = status else {
            return false;
        };
        let got = [u16::from(s.class), s.subject, s.detail];
        self.0
            .iter()
            .zip(got)
            .all(|(want, got)| want.is_none_or(|w| w == got))
    }
}

/// One rule: every condition given must hold.
#[derive(Debug, Clone)]
struct Rule {
    code: Option<CodePattern>,
    status: Option<StatusPattern>,
    text: Option<Regex>,
    class: BounceClass,
}

impl Rule {
    fn matches(&self, d: &Diag<'_>) -> bool {
        self.code.as_ref().is_none_or(|c| c.matches(d.code))
            && self.status.is_none_or(|s| s.matches(d.status))
            && self.text.as_ref().is_none_or(|t| t.is_match(d.text))
    }
}

/// A rule as written in a rules file or the built-in table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    status: Option<String>,
    /// A regular expression, matched case-insensitively anywhere in the text.
    #[serde(default)]
    text: Option<String>,
    class: BounceClass,
}

impl RuleSpec {
    fn compile(&self) -> Result<Rule, String> {
        if self.code.is_none() && self.status.is_none() && self.text.is_none() {
            return Err("a rule needs at least one of code, status, text".into());
        }
        Ok(Rule {
            code: self.code.as_deref().map(CodePattern::parse).transpose()?,
            status: self
                .status
                .as_deref()
                .map(StatusPattern::parse)
                .transpose()?,
            text: self
                .text
                .as_deref()
                .map(|t| {
                    RegexBuilder::new(t)
                        .case_insensitive(true)
                        .size_limit(PATTERN_SIZE_MAX)
                        .build()
                        .map_err(|e| format!("text {t:?}: {e}"))
                })
                .transpose()?,
            class: self.class,
        })
    }
}

/// A rules file: `[[rule]]` entries (code, status, text, class), tried before the built-in rules unless
/// `replace_defaults = true`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    replace_defaults: bool,
    #[serde(default)]
    rule: Vec<RuleSpec>,
}

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: larger than {RULES_FILE_MAX} bytes")]
    TooLarge { path: String },
    #[error("{path}: {message}")]
    Syntax { path: String, message: String },
    #[error("{path}: rule {index}: {message}")]
    Rule {
        path: String,
        index: usize,
        message: String,
    },
}

/// The built-in rules, most specific first. Each was checked against real replies (tests below).
/// (code, status, text, class), as in a rules file.
type DefaultRule = (
    Option<&'static str>,
    Option<&'static str>,
    Option<&'static str>,
    BounceClass,
);

const DEFAULT_RULES: &[DefaultRule] = {
    use BounceClass::*;
    &[
        // Our own diagnoses (no server reply): DNS and TLS failures by their status.
        (Some("none"), Some("x.4.3"), None, DnsFailure),
        (Some("none"), Some("x.1.2"), None, DnsFailure),
        (Some("none"), Some("x.1.10"), None, DnsFailure),
        // An egress source's warm-up cap (`crate::egress`): our own throttle, before the TLS statuses.
        (Some("none"), Some("4.7.x"), Some(r"\bwarm-up\b"), RateLimit),
        // A site suspended by the shaping automation (`crate::shaping::automation`).
        (Some("none"), None, Some(r"^shaping: "), RateLimit),
        (Some("none"), Some("x.7.x"), None, TlsFailure),
        (
            Some("none"),
            None,
            Some(r"\b(tls|starttls|certificate|dane|tlsa|mta-sts)\b"),
            TlsFailure,
        ),
        (Some("none"), Some("5.3.4"), None, MessageTooLarge),
        (Some("none"), None, None, Other),
        // Throttling and reputation, before the generic x.7.x and x.2.1 rules they would otherwise meet.
        (None, None, Some(r"\[TSS0[0-9]\]|\bTS0[0-9]\b"), RateLimit),
        (None, Some("x.7.28"), None, RateLimit),
        (None, Some("4.7.650"), None, RateLimit),
        (None, Some("4.7.500"), None, RateLimit),
        (
            None,
            None,
            Some(
                r"rate.?limit|too many (messages|mails|connections|sessions)|throttl|slow down|unusual rate|unexpected volume|temporarily (deferred|rate limited)|reputation|server busy|\bS77714\b|receiving mail at a rate",
            ),
            RateLimit,
        ),
        (Some("421"), None, None, RateLimit),
        // Content, before the block rules that mention spam.
        (None, Some("x.6.x"), None, ContentRejected),
        (
            None,
            None,
            Some(
                r"virus|malware|phishing|spam message|message (was )?(rejected|identified|detected|classified) as spam|(looks|considered|detected as|likely) (like )?spam|content (rejected|not accepted)|message content|suspicious (content|url|link)|potential security issue",
            ),
            ContentRejected,
        ),
        // Mailbox full and too large.
        (None, Some("x.2.2"), None, MailboxFull),
        (
            None,
            None,
            Some(
                r"over ?quota|quota (exceeded|full)|mailbox (is )?full|mailbox size limit|insufficient (user )?storage",
            ),
            MailboxFull,
        ),
        (None, Some("x.3.4"), None, MessageTooLarge),
        (None, Some("x.2.3"), None, MessageTooLarge),
        (
            Some("552"),
            None,
            Some(r"size|too (big|large)|exceeds"),
            MessageTooLarge,
        ),
        (
            None,
            None,
            Some(
                r"message (size )?(is )?too (big|large)|message size exceeds|exceeds (the )?(maximum|size)",
            ),
            MessageTooLarge,
        ),
        // TLS asked for by the server.
        (None, Some("x.7.10"), None, TlsFailure),
        (
            None,
            None,
            Some(
                r"must issue a starttls|starttls (is )?required|tls (is )?required|encryption required",
            ),
            TlsFailure,
        ),
        // Invalid recipients.
        (None, Some("x.1.1"), None, InvalidRecipient),
        (
            None,
            Some("x.1.0"),
            Some(r"user|mailbox|recipient|address"),
            InvalidRecipient,
        ),
        (None, Some("x.1.3"), None, InvalidRecipient),
        (None, Some("x.1.6"), None, InvalidRecipient),
        (Some("5xx"), Some("5.2.1"), None, InvalidRecipient),
        (
            Some("5xx"),
            None,
            Some(
                r"no such (user|mailbox|recipient)|user unknown|unknown (user|recipient)|does not exist|doesn't exist|invalid (recipient|mailbox|address)|recipient (address )?rejected|mailbox (unavailable|not found|disabled|inactive)|account (has been )?(disabled|suspended)|address rejected|unrouteable address|no mailbox|doesn't have an? [\w.-]+ account",
            ),
            InvalidRecipient,
        ),
        (Some("5xx"), Some("5.1.2"), None, DnsFailure),
        // Policy and spam blocks.
        (None, Some("x.7.1"), None, PolicyBlock),
        (None, Some("x.7.23"), None, PolicyBlock),
        (None, Some("x.7.25"), None, PolicyBlock),
        (None, Some("x.7.26"), None, PolicyBlock),
        (None, Some("x.7.27"), None, PolicyBlock),
        (
            None,
            None,
            Some(
                r"block ?list|black ?list|blocked|spamhaus|barracuda|spamcop|\b(rbl|dnsbl)\b|\bS3150\b|policy|not allowed|access denied|refused|\bspf\b|\bdmarc\b|\bdkim\b|unauthenticated|reverse dns|\bptr\b|spam",
            ),
            PolicyBlock,
        ),
        (None, Some("x.7.x"), None, PolicyBlock),
    ]
};

/// The compiled rules.
#[derive(Debug, Clone)]
pub struct BounceClassifier {
    rules: Vec<Rule>,
}

impl Default for BounceClassifier {
    fn default() -> Self {
        BounceClassifier {
            rules: default_rules(),
        }
    }
}

fn default_rules() -> Vec<Rule> {
    DEFAULT_RULES
        .iter()
        .map(|(code, status, text, class)| {
            RuleSpec {
                code: code.map(str::to_owned),
                status: status.map(str::to_owned),
                text: text.map(str::to_owned),
                class: *class,
            }
            .compile()
            // The built-in table is fixed and covered by `the_built_in_rules_compile`.
            .unwrap_or_else(|e| panic!("built-in bounce rule: {e}"))
        })
        .collect()
}

impl BounceClassifier {
    /// The class of a recorded diagnostic (`550 5.1.1 text`, `4.4.1 text`).
    pub fn classify(&self, reply: &str) -> BounceClass {
        let d = Diag::parse(reply);
        self.rules
            .iter()
            .find(|r| r.matches(&d))
            .map_or(BounceClass::Other, |r| r.class)
    }

    /// The classifier of `bounce_classification_file` (`None`: the built-in rules).
    pub fn load(path: Option<&Path>) -> Result<BounceClassifier, RulesError> {
        let Some(path) = path else {
            return Ok(BounceClassifier::default());
        };
        let shown = path.display().to_string();
        let read = || -> std::io::Result<Option<String>> {
            use std::io::Read;
            let f = std::fs::File::open(path)?;
            let mut s = String::new();
            f.take(RULES_FILE_MAX + 1).read_to_string(&mut s)?;
            Ok((s.len() as u64 <= RULES_FILE_MAX).then_some(s))
        };
        let text = read()
            .map_err(|source| RulesError::Read {
                path: shown.clone(),
                source,
            })?
            .ok_or_else(|| RulesError::TooLarge {
                path: shown.clone(),
            })?;
        Self::from_toml(&text).map_err(|e| match e {
            (None, message) => RulesError::Syntax {
                path: shown.clone(),
                message,
            },
            (Some(index), message) => RulesError::Rule {
                path: shown.clone(),
                index,
                message,
            },
        })
    }

    /// Rules from a file's text; the error names the rule (1-based) when one is at fault.
    fn from_toml(text: &str) -> Result<BounceClassifier, (Option<usize>, String)> {
        let file: RulesFile = toml::from_str(text).map_err(|e| (None, e.to_string()))?;
        if file.rule.len() > RULES_MAX {
            return Err((None, format!("more than {RULES_MAX} rules")));
        }
        let mut rules = Vec::with_capacity(file.rule.len() + DEFAULT_RULES.len());
        for (i, spec) in file.rule.iter().enumerate() {
            rules.push(spec.compile().map_err(|m| (Some(i + 1), m))?);
        }
        if !file.replace_defaults {
            rules.extend(default_rules());
        }
        Ok(BounceClassifier { rules })
    }
}

/// The classifier in use, shared by every shard: read on each failure (never on a delivered recipient),
/// replaced at start and on reload.
static CURRENT: RwLock<Option<Arc<BounceClassifier>>> = RwLock::new(None);

/// Puts `c` in use (at start and on a configuration reload).
pub fn install(c: BounceClassifier) {
    let c = Arc::new(c);
    match CURRENT.write() {
        Ok(mut g) => *g = Some(c),
        Err(p) => *p.into_inner() = Some(c),
    }
}

/// The classifier in use (the built-in rules until one is installed).
pub fn current() -> Arc<BounceClassifier> {
    let got = match CURRENT.read() {
        Ok(g) => g.clone(),
        Err(p) => p.into_inner().clone(),
    };
    got.unwrap_or_else(|| {
        let c = Arc::new(BounceClassifier::default());
        if let Ok(mut g) = CURRENT.write() {
            g.get_or_insert_with(|| c.clone());
        }
        c
    })
}

/// The class of `reply` with the classifier in use.
pub fn classify(reply: &str) -> BounceClass {
    current().classify(reply)
}

#[cfg(test)]
mod tests {
    use super::BounceClass::*;
    use super::*;

    #[test]
    fn the_built_in_rules_compile() {
        assert_eq!(default_rules().len(), DEFAULT_RULES.len());
    }

    #[test]
    fn diagnostics_split_into_code_status_and_text() {
        let d = Diag::parse("550 5.1.1 No such user");
        assert_eq!(d.code, Some(550));
        assert_eq!(d.status, Some(EnhancedCode::new(5, 1, 1)));
        assert_eq!(d.text, "No such user");
        let d = Diag::parse("4.4.1 connection failed: refused");
        assert_eq!((d.code, d.status), (None, Some(EnhancedCode::new(4, 4, 1))));
        assert_eq!(d.text, "connection failed: refused");
        let d = Diag::parse("421 Try again later");
        assert_eq!(
            (d.code, d.status, d.text),
            (Some(421), None, "Try again later")
        );
        let d = Diag::parse("550-5.7.1 multi");
        assert_eq!(
            (d.code, d.status),
            (Some(550), Some(EnhancedCode::new(5, 7, 1)))
        );
        for junk in [
            "",
            "5",
            "55",
            "5500 x",
            "999 9.9.9 x",
            "ü550 5.1.1",
            "550 5.1.",
            "\u{0}",
        ] {
            let d = Diag::parse(junk);
            assert!(d.code.is_none_or(|c| (200..600).contains(&c)), "{junk:?}");
        }
        let long = format!("550 5.1.1 {}", "é".repeat(5000));
        assert_eq!(Diag::parse(&long).text.chars().count(), TEXT_MAX);
    }

    /// Real replies (providers' documentation and logs) and our own diagnostics, with the class each gets.
    #[test]
    fn provider_replies_get_their_class() {
        let c = BounceClassifier::default();
        let table: &[(&str, BounceClass)] = &[
            // Gmail
            ("550 5.1.1 The email account that you tried to reach does not exist. Please try double-checking the recipient's email address for typos or unnecessary spaces. https://support.google.com/mail/?p=NoSuchUser gsmtp", InvalidRecipient),
            ("552 5.2.2 The email account that you tried to reach is over quota. https://support.google.com/mail/?p=OverQuotaPerm gsmtp", MailboxFull),
            ("452 4.2.2 The email account that you tried to reach is over quota. gsmtp", MailboxFull),
            ("421 4.7.28 Gmail has detected an unusual rate of unsolicited mail originating from your IP address. To protect our users from spam, mail sent from your IP address has been temporarily rate limited. gsmtp", RateLimit),
            ("450 4.2.1 The user you are trying to contact is receiving mail at a rate that prevents additional messages from being delivered. gsmtp", RateLimit),
            ("550 5.7.26 This mail is unauthenticated, which poses a security risk to the sender and Gmail users, and has been blocked. The sender must authenticate with at least one of SPF or DKIM (DMARC). gsmtp", PolicyBlock),
            ("550 5.7.25 The IP address sending this message does not have a PTR record setup gsmtp", PolicyBlock),
            ("550 5.7.1 Our system has detected that this message is likely unsolicited mail. To reduce the amount of spam sent to Gmail, this message has been blocked. gsmtp", PolicyBlock),
            ("552 5.7.0 This message was blocked because its content presents a potential security issue. gsmtp", ContentRejected),
            ("552 5.3.4 Your message exceeded Google's message size limits. gsmtp", MessageTooLarge),
            ("550 5.2.1 The email account that you tried to reach is disabled. gsmtp", InvalidRecipient),
            ("530 5.7.0 Must issue a STARTTLS command first. gsmtp", TlsFailure),
            // Yahoo
            ("421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes", RateLimit),
            ("554 5.7.9 Message not accepted for policy reasons. See https://postmaster.yahooinc.com/error-codes", PolicyBlock),
            ("553 5.7.2 [TSS09] All messages from 192.0.2.1 will be permanently deferred; Retrying will NOT succeed.", RateLimit),
            ("554 delivery error: dd This user doesn't have a yahoo.com account (someone@yahoo.com) [0] - mta1234.mail.ne1.yahoo.com", InvalidRecipient),
            ("552 1 Requested mail action aborted, mailbox not found", InvalidRecipient),
            // Microsoft
            ("550 5.7.1 Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3150).", PolicyBlock),
            ("451 4.7.500 Server busy. Please try again later from [192.0.2.1]. (S77714)", RateLimit),
            ("451 4.7.650 The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation.", RateLimit),
            ("550 5.5.0 Requested action not taken: mailbox unavailable (S2017062302). [AM4PEPF00027A5F.eurprd04.prod.outlook.com]", InvalidRecipient),
            ("550 5.4.1 Recipient address rejected: Access denied. AS(201806281)", InvalidRecipient),
            ("552 5.2.2 Mailbox size limit exceeded", MailboxFull),
            // Orange, Mail.ru, generic MTAs
            ("421 mwinf5c10 ME Service refuse. Veuillez essayer plus tard. OFR004_104 [104]", RateLimit),
            ("550 spam message rejected. Please visit https://help.mail.ru/notspam-support", ContentRejected),
            ("550 5.1.1 <bob@example.com>: Recipient address rejected: User unknown in virtual mailbox table", InvalidRecipient),
            ("554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org", PolicyBlock),
            ("550 5.7.1 Message rejected as spam by Content Filtering.", ContentRejected),
            ("554 5.6.0 Message contains a virus", ContentRejected),
            ("552 5.3.4 Message size exceeds fixed limit", MessageTooLarge),
            ("552 Message size exceeds maximum permitted", MessageTooLarge),
            ("452 4.5.3 Error: too many recipients", Other),
            ("451 4.3.0 Try again later", Other),
            ("554 5.5.1 Error: no valid recipients", Other),
            ("500 5.5.2 Error: bad syntax", Other),
            // Our own diagnostics (trouble.rs, dns)
            ("4.4.1 connection failed: Connection refused (os error 111)", Other),
            ("4.4.2 lost connection with mx.example: timed out", Other),
            ("5.1.2 Host or domain name not found", DnsFailure),
            ("5.1.10 the domain accepts no mail (null MX)", DnsFailure),
            ("4.4.3 DNS lookup failed: SERVFAIL", DnsFailure),
            ("4.7.5 TLS handshake failed: invalid peer certificate: UnknownIssuer", TlsFailure),
            ("4.7.4 TLS is required but was not offered", TlsFailure),
            ("4.4.5 shaping: site yahoo suspended until 2026-12-03T20:12:56Z by rule yahoo-tss04 (action 1a23d89c27e-0-0)", RateLimit),
            ("4.7.0 mx.example: plaintext after STARTTLS (command injection)", TlsFailure),
            ("5.3.4 message too big for mx.example (SIZE 1000)", MessageTooLarge),
            ("451 4.3.0 Maildir /var/mail/bob: permission denied", Other),
            ("452 4.2.2 Maildir /var/mail/bob: disk quota exceeded", MailboxFull),
        ];
        let mut wrong = Vec::new();
        for (reply, want) in table {
            let got = c.classify(reply);
            if got != *want {
                wrong.push(format!("{reply}\n    want {want:?}, got {got:?}"));
            }
        }
        assert!(wrong.is_empty(), "misclassified:\n{}", wrong.join("\n"));
    }

    #[test]
    fn a_rules_file_comes_first_or_replaces_the_defaults() {
        let c = BounceClassifier::from_toml(
            r#"
            [[rule]]
            code = "550"
            text = "mailbox unavailable"
            class = "mailbox_full"
            "#,
        )
        .expect("valid");
        assert_eq!(c.classify("550 5.5.0 mailbox unavailable"), MailboxFull);
        assert_eq!(
            c.classify("550 5.1.1 No such user"),
            InvalidRecipient,
            "defaults after"
        );
        let c = BounceClassifier::from_toml(
            r#"
            replace_defaults = true
            [[rule]]
            status = "5.1.*"
            class = "policy_block"
            "#,
        )
        .expect("valid");
        assert_eq!(c.classify("550 5.1.1 No such user"), PolicyBlock);
        assert_eq!(c.classify("552 5.2.2 full"), Other, "no defaults");
    }

    #[test]
    fn bad_rules_files_name_the_fault() {
        let cases: &[(&str, &str)] = &[
            ("[[rule]]\nclass = \"other\"\n", "rule 1: a rule needs"),
            ("[[rule]]\ncode = \"6xx\"\nclass = \"other\"\n", "rule 1: code"),
            ("[[rule]]\ncode = \"55\"\nclass = \"other\"\n", "rule 1: code"),
            ("[[rule]]\nstatus = \"5.1\"\nclass = \"other\"\n", "rule 1: status"),
            ("[[rule]]\nstatus = \"5.a.1\"\nclass = \"other\"\n", "rule 1: status"),
            ("[[rule]]\ntext = \"(\"\nclass = \"other\"\n", "rule 1: text"),
            ("[[rule]]\ncode = \"550\"\nclass = \"nope\"\n", "unknown variant"),
            ("[[rule]]\ncode = \"550\"\nclass = \"other\"\ncolour = 1\n", "unknown field"),
            ("[[rule]]\ncode = \"550\"\nclass = \"other\"\n[[rule]]\ntext = \"[\"\nclass = \"other\"\n", "rule 2: text"),
        ];
        for (text, want) in cases {
            let err = match BounceClassifier::from_toml(text) {
                Ok(_) => panic!("{text:?} was accepted"),
                Err((Some(i), m)) => format!("rule {i}: {m}"),
                Err((None, m)) => m,
            };
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn load_reads_a_file_and_refuses_a_missing_or_huge_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("rules.toml");
        std::fs::write(
            &p,
            "[[rule]]\ntext = \"frobnicated\"\nclass = \"content_rejected\"\n",
        )
        .expect("write");
        let c = BounceClassifier::load(Some(&p)).expect("loads");
        assert_eq!(c.classify("554 frobnicated"), ContentRejected);
        let e = BounceClassifier::load(Some(&dir.path().join("missing"))).expect_err("missing");
        assert!(matches!(e, RulesError::Read { .. }), "{e}");
        std::fs::write(&p, vec![b'#'; RULES_FILE_MAX as usize + 1]).expect("write");
        let e = BounceClassifier::load(Some(&p)).expect_err("huge");
        assert!(matches!(e, RulesError::TooLarge { .. }), "{e}");
        assert_eq!(
            BounceClassifier::load(None).expect("defaults").rules.len(),
            DEFAULT_RULES.len()
        );
    }

    #[test]
    fn names_are_unique_and_indexes_dense() {
        let names: std::collections::BTreeSet<_> =
            BounceClass::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), BounceClass::COUNT);
        for (i, c) in BounceClass::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
        }
    }
}
