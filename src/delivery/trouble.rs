//! The one outcome classifier of outbound delivery (named after Postfix's smtp_trouble.c): every server reply,
//! connection error, TLS error, session failure and DNS error becomes one typed [`Trouble`]: its scope (the
//! session, the site, the message or one recipient), its severity (temporary or permanent), whether the next
//! MX host is worth trying, and a [`Diagnostic`] (reply code, one [`EnhancedCode`], text). No decision is made
//! on a string: codes are numbers, phases are [`Phase`] values.
//!
//! Rules (Postfix-like):
//! - a 421 anywhere: the server closes the session; session scope, temporary, next MX for what is left;
//! - 4xx/5xx during the greeting, EHLO/HELO, STARTTLS or AUTH: site scope, temporary (Postfix skips a host
//!   that will not talk: smtp_skip_5xx_greeting, smtp_sasl_auth_soft_bounce), next MX;
//! - MAIL, DATA, end of data, BDAT: message scope; RCPT: recipient scope; 4xx temporary (next MX), 5xx
//!   permanent (no next MX: the answer would be the same);
//! - RSET and QUIT: session scope, temporary;
//! - connection refused, unreachable, timeouts, lost connections, TLS failures: site scope, temporary, next MX
//!   (a connection lost while the content was on the wire is the message's: message scope, no next MX);
//! - DNS: NXDOMAIN and null MX permanent, SERVFAIL and the like temporary; site scope, no other MX to try.

use std::fmt;

use super::RcptResult;
use crate::dns::DnsError;
use crate::smtp::client::ServerReply;
use crate::smtp::client_session::{Phase, SessionError};
use crate::smtp::reply_parser::EnhancedCode;

/// What a trouble is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// This SMTP session is over (421, a timeout or loss mid-session); what is left goes elsewhere or later.
    Session,
    /// The host (or the destination as a whole) cannot be used now.
    Site,
    /// This message, for every recipient of the transaction.
    Message,
    /// One recipient.
    Recipient,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Severity {
    Temporary,
    Permanent,
}

/// The diagnostic kept with a recipient's state and put into DSNs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The server's reply code, when a server answered.
    pub code: Option<u16>,
    pub status: EnhancedCode,
    pub text: String,
}

impl fmt::Display for Diagnostic {
    /// `550 5.1.1 No such user` for replies (as the server said it), `4.4.1 connection refused` otherwise.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(c) => write!(f, "{c} {}", self.text),
            None => write!(f, "{} {}", self.status, self.text),
        }
    }
}

/// One classified failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trouble {
    pub scope: Scope,
    pub severity: Severity,
    /// Trying the next MX host (for the recipients concerned) can help.
    pub next_mx: bool,
    pub diag: Diagnostic,
}

impl Trouble {
    fn new(scope: Scope, severity: Severity, next_mx: bool, diag: Diagnostic) -> Trouble {
        Trouble {
            scope,
            severity,
            next_mx,
            diag,
        }
    }

    /// A failure without a server reply, temporary unless the status says 5.
    pub fn local(scope: Scope, next_mx: bool, status: EnhancedCode, text: String) -> Trouble {
        let severity = if status.is_permanent() {
            Severity::Permanent
        } else {
            Severity::Temporary
        };
        Trouble::new(
            scope,
            severity,
            next_mx,
            Diagnostic {
                code: None,
                status,
                text,
            },
        )
    }

    pub fn is_permanent(&self) -> bool {
        self.severity == Severity::Permanent
    }

    /// The recipient result this trouble gives.
    pub fn rcpt_result(&self) -> RcptResult {
        let reply = self.diag.to_string();
        match self.severity {
            Severity::Permanent => RcptResult::Bounced {
                reply,
                status: self.diag.status,
            },
            Severity::Temporary => RcptResult::Deferred { reply },
        }
    }

    /// The server's reply `r` to the command of `phase`. A 2xx is not a trouble, but classifies (as temporary,
    /// no scope beyond the recipient) so that callers need no special case.
    pub fn reply(phase: Phase, r: &ServerReply) -> Trouble {
        let permanent = r.class() == 5;
        let severity = if permanent {
            Severity::Permanent
        } else {
            Severity::Temporary
        };
        let status = r
            .enhanced()
            .or_else(|| EnhancedCode::generic(r.code))
            .unwrap_or(EnhancedCode::new(4, 0, 0));
        let diag = Diagnostic {
            code: Some(r.code),
            status,
            text: r.text.replace('\n', " "),
        };
        if r.code == 421 {
            return Trouble::new(Scope::Session, Severity::Temporary, true, diag);
        }
        let scope = match phase {
            // Greeting, EHLO/HELO, STARTTLS, the handshake, AUTH: a host that will not talk.
            p if p.is_setup() => {
                return Trouble::new(Scope::Site, Severity::Temporary, true, diag);
            }
            Phase::Rset | Phase::Quit => {
                return Trouble::new(Scope::Session, Severity::Temporary, true, diag);
            }
            Phase::Rcpt => Scope::Recipient,
            Phase::Mail | Phase::Data | Phase::DataXfer | Phase::DataDone | Phase::Bdat => {
                Scope::Message
            }
            // The setup phases, taken by the first arm.
            _ => Scope::Site,
        };
        Trouble::new(scope, severity, !permanent, diag)
    }

    /// A session that ended abnormally.
    pub fn session(e: &SessionError, host: &str) -> Trouble {
        match e {
            SessionError::Refused { phase, reply } | SessionError::Closing { phase, reply } => {
                Trouble::reply(*phase, reply)
            }
            SessionError::TlsRequired => Trouble::local(
                Scope::Site,
                true,
                EnhancedCode::new(4, 7, 4),
                "TLS is required but was not offered".into(),
            ),
            SessionError::StartTlsInjection => Trouble::local(
                Scope::Site,
                true,
                EnhancedCode::new(4, 7, 0),
                format!("{host}: {e}"),
            ),
            SessionError::Timeout { phase } | SessionError::Lost { phase } => {
                Trouble::lost(*phase, host, &e.to_string())
            }
            SessionError::Protocol { phase, .. } => Trouble::lost(*phase, host, &e.to_string()),
            SessionError::EventsNotDrained => Trouble::local(
                Scope::Session,
                true,
                EnhancedCode::new(4, 3, 0),
                e.to_string(),
            ),
        }
    }

    /// The connection broke (or timed out) during `phase`.
    pub fn lost(phase: Phase, host: &str, why: &str) -> Trouble {
        if phase.is_setup() {
            return Trouble::connect(why);
        }
        if phase.is_content() {
            return Trouble::local(
                Scope::Message,
                false,
                EnhancedCode::new(4, 4, 2),
                format!("lost connection with {host} while sending the message: {why}"),
            );
        }
        Trouble::local(
            Scope::Session,
            true,
            EnhancedCode::new(4, 4, 2),
            format!("lost connection with {host}: {why}"),
        )
    }

    /// TCP connect failed (refused, unreachable, timed out) or broke before the session was ready.
    pub fn connect(why: &str) -> Trouble {
        Trouble::local(
            Scope::Site,
            true,
            EnhancedCode::new(4, 4, 1),
            format!("connection failed: {why}"),
        )
    }

    /// The TLS handshake failed.
    pub fn tls(why: &str) -> Trouble {
        Trouble::local(
            Scope::Site,
            true,
            EnhancedCode::new(4, 7, 5),
            format!("TLS handshake failed: {why}"),
        )
    }

    /// MX or address lookup failed.
    pub fn dns(e: &DnsError) -> Trouble {
        Trouble::local(Scope::Site, false, e.enhanced_code(), e.to_string())
    }

    /// Something the relay refuses to send to this server (SIZE, SMTPUTF8, 8BITMIME): the message's, permanent.
    pub fn unsendable(code: u16, status: EnhancedCode, text: String) -> Trouble {
        Trouble::new(
            Scope::Message,
            Severity::Permanent,
            false,
            Diagnostic {
                code: Some(code),
                status,
                text: format!("{status} {text}"),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(raw: &[u8]) -> ServerReply {
        ServerReply::from_test_bytes(raw)
    }

    use Phase::*;
    use Scope::*;
    use Severity::*;

    /// One row: (phase answered, reply, scope, severity, next MX, status).
    type Row = (Phase, &'static [u8], Scope, Severity, bool, &'static str);

    /// Real provider replies.
    #[test]
    fn provider_replies() {
        let table: &[Row] = &[
            // Gmail
            (Rcpt, b"421-4.7.28 Gmail has detected an unusual rate of unsolicited mail originating from your IP\r\n421-4.7.28 address. To protect our users from spam, mail sent from your IP address\r\n421 4.7.28 has been temporarily rate limited. gsmtp\r\n", Session, Temporary, true, "4.7.28"),
            (DataDone, b"550-5.7.26 This mail is unauthenticated, which poses a security risk to the\r\n550-5.7.26 sender and Gmail users, and has been blocked. The sender must\r\n550 5.7.26 authenticate with at least one of SPF or DKIM (DMARC). gsmtp\r\n", Message, Permanent, false, "5.7.26"),
            (Rcpt, b"550-5.1.1 The email account that you tried to reach does not exist.\r\n550 5.1.1 https://support.google.com/mail/?p=NoSuchUser gsmtp\r\n", Recipient, Permanent, false, "5.1.1"),
            // Yahoo
            (Greeting, b"421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes\r\n", Session, Temporary, true, "4.7.0"),
            (Mail, b"421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints\r\n", Session, Temporary, true, "4.7.0"),
            // Microsoft
            (Rcpt, b"550 5.7.1 Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3150).\r\n", Recipient, Permanent, false, "5.7.1"),
            (Mail, b"550 5.7.1 Unfortunately, messages from [192.0.2.1] weren't sent. (S3150)\r\n", Message, Permanent, false, "5.7.1"),
            (Rcpt, b"451 4.7.500 Server busy. Please try again later from [192.0.2.1]. (S77714)\r\n", Recipient, Temporary, true, "4.7.500"),
            (DataDone, b"451 4.7.500 Server busy. Please try again later\r\n", Message, Temporary, true, "4.7.500"),
            // Orange
            (Greeting, b"421 mwinf5c10 ME Service refuse. Veuillez essayer plus tard. OFR004_104 [104]\r\n", Session, Temporary, true, "4.0.0"),
            (Rcpt, b"550 5.7.1 Service refuse. Veuillez essayer plus tard. OFR_999 [999]\r\n", Recipient, Permanent, false, "5.7.1"),
            (Greeting, b"554 mwinf5c10 ME Service refuse. Veuillez essayer plus tard. OFR005_108\r\n", Site, Temporary, true, "5.0.0"),
            // Mail.ru
            (DataDone, b"550 spam message rejected. Please visit https://help.mail.ru/notspam-support\r\n", Message, Permanent, false, "5.0.0"),
            (Mail, b"421 Try again later\r\n", Session, Temporary, true, "4.0.0"),
            // Generic
            (Data, b"554 5.5.1 Error: no valid recipients\r\n", Message, Permanent, false, "5.5.1"),
            (Rcpt, b"452 4.5.3 Error: too many recipients\r\n", Recipient, Temporary, true, "4.5.3"),
            (Ehlo, b"550 5.7.1 go away\r\n", Site, Temporary, true, "5.7.1"),
            (Auth, b"535 5.7.8 Error: authentication failed\r\n", Site, Temporary, true, "5.7.8"),
            (Rset, b"500 what\r\n", Session, Temporary, true, "5.0.0"),
        ];
        for (phase, raw, scope, severity, next_mx, status) in table {
            let r = reply(raw);
            let t = Trouble::reply(*phase, &r);
            let what = String::from_utf8_lossy(raw);
            assert_eq!(t.scope, *scope, "scope of {what}");
            assert_eq!(t.severity, *severity, "severity of {what}");
            assert_eq!(t.next_mx, *next_mx, "next MX for {what}");
            assert_eq!(t.diag.status.to_string(), *status, "status of {what}");
            assert_eq!(t.diag.code, Some(r.code));
            assert!(!t.diag.text.contains('\n'));
            match t.rcpt_result() {
                RcptResult::Bounced { reply, status } => {
                    assert!(t.is_permanent());
                    assert_eq!(status, t.diag.status);
                    assert!(reply.starts_with(&r.code.to_string()));
                }
                RcptResult::Deferred { .. } => assert!(!t.is_permanent()),
                RcptResult::Delivered { .. } | RcptResult::Postponed { .. } => {
                    panic!("a trouble is never delivered or postponed")
                }
            }
        }
    }

    #[test]
    fn connection_tls_and_dns_errors() {
        let t = Trouble::connect("Connection refused (os error 111)");
        assert_eq!((t.scope, t.severity, t.next_mx), (Site, Temporary, true));
        assert_eq!(
            t.diag.to_string(),
            "4.4.1 connection failed: Connection refused (os error 111)"
        );
        let t = Trouble::session(&SessionError::Timeout { phase: Greeting }, "mx");
        assert_eq!((t.scope, t.severity, t.next_mx), (Site, Temporary, true));
        let t = Trouble::session(&SessionError::Lost { phase: DataDone }, "mx");
        assert_eq!(
            (t.scope, t.severity, t.next_mx),
            (Message, Temporary, false)
        );
        let t = Trouble::session(&SessionError::Timeout { phase: Rcpt }, "mx");
        assert_eq!((t.scope, t.severity), (Session, Temporary));
        let t = Trouble::tls("bad certificate");
        assert_eq!((t.scope, t.severity, t.next_mx), (Site, Temporary, true));
        assert_eq!(t.diag.status, EnhancedCode::new(4, 7, 5));
        let t = Trouble::session(&SessionError::StartTlsInjection, "mx");
        assert_eq!((t.scope, t.severity), (Site, Temporary));
        let t = Trouble::dns(&DnsError::NxDomain);
        assert_eq!((t.scope, t.severity, t.next_mx), (Site, Permanent, false));
        assert_eq!(t.diag.status, EnhancedCode::new(5, 1, 2));
        assert!(matches!(t.rcpt_result(), RcptResult::Bounced { .. }));
        let t = Trouble::dns(&DnsError::Temporary("SERVFAIL".into()));
        assert_eq!((t.scope, t.severity), (Site, Temporary));
        assert!(matches!(t.rcpt_result(), RcptResult::Deferred { .. }));
        let t = Trouble::unsendable(552, EnhancedCode::new(5, 3, 4), "too big".into());
        assert_eq!(t.diag.to_string(), "552 5.3.4 too big");
        assert!(t.is_permanent() && t.scope == Message);
    }
}
