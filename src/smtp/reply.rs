//! SMTP replies as values: a code, an enhanced status code and a text, written to the wire in one place.
//!
//! Every reply the server sends is a [`Reply`]; the constants below are the fixed ones, the constructors
//! build the few that carry a variable (queue ID, size limit, EHLO keywords).

use std::borrow::Cow;
use std::fmt::Write as _;

/// An enhanced status code (RFC 3463), e.g. `5.7.1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enhanced(pub u8, pub u16, pub u16);

/// One SMTP reply. Multi-line replies keep each line in `lines`; the code prefixes every line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<Enhanced>,
    pub text: Cow<'static, str>,
    /// Extra lines for multi-line replies (EHLO keywords); the first line is `text`.
    pub more: Vec<Cow<'static, str>>,
}

macro_rules! replies {
    ($($name:ident = $code:expr, $e:expr, $text:expr;)*) => {
        $(pub const $name: Reply = Reply::fixed($code, $e, $text);)*
    };
}

const fn e(c: u8, s: u16, d: u16) -> Option<Enhanced> {
    Some(Enhanced(c, s, d))
}

impl Reply {
    pub const fn fixed(code: u16, enhanced: Option<Enhanced>, text: &'static str) -> Reply {
        Reply {
            code,
            enhanced,
            text: Cow::Borrowed(text),
            more: Vec::new(),
        }
    }

    pub fn new(code: u16, enhanced: Option<Enhanced>, text: impl Into<Cow<'static, str>>) -> Reply {
        Reply {
            code,
            enhanced,
            text: text.into(),
            more: Vec::new(),
        }
    }

    /// `true` for 4xx and 5xx replies.
    pub fn is_error(&self) -> bool {
        self.code >= 400
    }

    /// `421` replies close the connection.
    pub fn closes(&self) -> bool {
        self.code == 421 || self.code == 221
    }

    /// Appends the wire form (with CRLF line ends) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let n = self.more.len();
        self.write_line(out, &self.text, n == 0);
        for (i, line) in self.more.iter().enumerate() {
            self.write_line(out, line, i + 1 == n);
        }
    }

    fn write_line(&self, out: &mut Vec<u8>, text: &str, last: bool) {
        let mut s = String::with_capacity(text.len() + 16);
        let _ = write!(s, "{}{}", self.code, if last { ' ' } else { '-' });
        // EHLO keyword lines carry no enhanced code (RFC 2034 applies to status replies only).
        if let (Some(Enhanced(c, sub, d)), true) = (self.enhanced, self.more.is_empty()) {
            let _ = write!(s, "{c}.{sub}.{d} ");
        }
        out.extend_from_slice(s.as_bytes());
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    /// The wire form as a string (tests and logs).
    pub fn to_wire_string(&self) -> String {
        let mut v = Vec::new();
        self.write_to(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    }

    pub fn queued(id: impl std::fmt::Display) -> Reply {
        Reply::new(250, e(2, 0, 0), format!("Ok: queued as {id}"))
    }

    pub fn message_too_big(limit: u64) -> Reply {
        Reply::new(
            552,
            e(5, 3, 4),
            format!("Message size exceeds fixed limit of {limit} bytes"),
        )
    }

    pub fn greeting(hostname: &str) -> Reply {
        Reply::new(220, None, format!("{hostname} ESMTP shardmta"))
    }

    pub fn ehlo(hostname: &str, client: &str, keywords: Vec<Cow<'static, str>>) -> Reply {
        Reply {
            code: 250,
            enhanced: None,
            text: format!("{hostname} greets {client}").into(),
            more: keywords,
        }
    }

    pub fn helo(hostname: &str) -> Reply {
        Reply::new(250, None, hostname.to_string())
    }

    pub fn bye(hostname: &str) -> Reply {
        Reply::new(221, e(2, 0, 0), format!("{hostname} closing connection"))
    }

    pub fn bdat_ok(octets: u64) -> Reply {
        Reply::new(250, e(2, 0, 0), format!("{octets} octets received"))
    }
}

/// Why a client's mail was refused, as counted for `shardmta_messages_rejected_total{reason}`: each refused
/// connection, MAIL, RCPT, message and failed AUTH counts once. Syntax and sequence errors are not refusals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    RelayDenied = 0,
    UnknownUser = 1,
    AuthFailed = 2,
    Size = 3,
    /// Connection limits, recipient limit, too many errors.
    Limits = 4,
    Other = 5,
}

impl Rejection {
    pub const COUNT: usize = 6;
    pub const ALL: [Rejection; Rejection::COUNT] = [
        Rejection::RelayDenied,
        Rejection::UnknownUser,
        Rejection::AuthFailed,
        Rejection::Size,
        Rejection::Limits,
        Rejection::Other,
    ];

    /// The metric's label value.
    pub fn name(self) -> &'static str {
        match self {
            Rejection::RelayDenied => "relay_denied",
            Rejection::UnknownUser => "unknown_user",
            Rejection::AuthFailed => "auth_failed",
            Rejection::Size => "size",
            Rejection::Limits => "limits",
            Rejection::Other => "other",
        }
    }
}

impl Reply {
    /// The refusal this reply makes, if it is one (see [`Rejection`]).
    pub fn rejection(&self) -> Option<Rejection> {
        if !self.is_error() {
            return None;
        }
        let Enhanced(_, subject, detail) = self.enhanced?;
        Some(match (self.code, subject, detail) {
            (452, 5, 3) | (421, 7, 0) => Rejection::Limits,
            // Syntax, sequence and unknown commands (x.5.x, 500-504, 555), and the end of a session
            // (timeout, shutdown) refuse no mail.
            (500..=504 | 555, _, _) | (_, 5, _) | (421, 4, 2) | (421, 3, 2) => return None,
            (_, 7, 1) => Rejection::RelayDenied,
            (_, 1, 1) => Rejection::UnknownUser,
            (535, _, _) => Rejection::AuthFailed,
            (454, _, _) if *self == AUTH_LOCKED_OUT => Rejection::AuthFailed,
            (552, 3, 4) => Rejection::Size,
            _ => Rejection::Other,
        })
    }
}

replies! {
    OK = 250, e(2, 0, 0), "Ok";
    SENDER_OK = 250, e(2, 1, 0), "Ok";
    RCPT_OK = 250, e(2, 1, 5), "Ok";
    RESET_OK = 250, e(2, 0, 0), "Ok";
    VRFY_CANNOT = 252, e(2, 0, 0), "Cannot VRFY user, but will accept message and attempt delivery";
    HELP = 214, e(2, 0, 0), "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH";
    AUTH_OK = 235, e(2, 7, 0), "Authentication successful";
    START_DATA = 354, None, "End data with <CR><LF>.<CR><LF>";
    READY_TLS = 220, e(2, 0, 0), "Ready to start TLS";
    SHUTTING_DOWN = 421, e(4, 3, 2), "Service shutting down, closing connection";
    TIMEOUT = 421, e(4, 4, 2), "Error: timeout exceeded";
    TOO_MANY_CONNECTIONS = 421, e(4, 7, 0), "Error: too many connections";
    TOO_MANY_CONNECTIONS_FROM_YOU = 421, e(4, 7, 0), "Error: too many connections from your address";
    TOO_MANY_ERRORS = 421, e(4, 7, 0), "Error: too many errors";
    TLS_NOT_AVAILABLE = 454, e(4, 7, 0), "TLS not available due to local problem";
    QUEUE_WRITE_FAILED = 452, e(4, 3, 1), "Error: insufficient system storage";
    TOO_MANY_RECIPIENTS = 452, e(4, 5, 3), "Error: too many recipients";
    AUTH_TEMPFAIL = 454, e(4, 7, 0), "Temporary authentication failure";
    SYNTAX_UNRECOGNIZED = 500, e(5, 5, 2), "Error: command not recognized";
    LINE_TOO_LONG = 500, e(5, 5, 2), "Error: line too long";
    AUTH_LOCKED_OUT = 454, e(4, 7, 0), "Error: too many failed authentication attempts from your address, try again later";
    BARE_NEWLINE = 521, e(5, 5, 2), "Error: bare <CR> or <LF> received";
    SYNTAX_PARAMS = 501, e(5, 5, 4), "Syntax error in parameters or arguments";
    BAD_SENDER = 501, e(5, 1, 7), "Bad sender address syntax";
    BAD_RECIPIENT = 501, e(5, 1, 3), "Bad recipient address syntax";
    HELO_REQUIRED = 501, e(5, 5, 4), "Syntax: EHLO hostname";
    NOT_IMPLEMENTED = 502, e(5, 5, 2), "Error: command not implemented";
    PARAM_NOT_IMPLEMENTED = 555, e(5, 5, 4), "Unsupported MAIL/RCPT parameter";
    BAD_SEQUENCE = 503, e(5, 5, 1), "Error: bad sequence of commands";
    NEED_EHLO = 503, e(5, 5, 1), "Error: send HELO/EHLO first";
    NESTED_MAIL = 503, e(5, 5, 1), "Error: nested MAIL command";
    NEED_MAIL = 503, e(5, 5, 1), "Error: need MAIL command";
    NEED_RCPT = 554, e(5, 5, 1), "Error: no valid recipients";
    ALREADY_AUTH = 503, e(5, 5, 1), "Error: already authenticated";
    ALREADY_TLS = 503, e(5, 5, 1), "Error: TLS already active";
    AUTH_UNKNOWN_MECH = 504, e(5, 5, 4), "Unrecognized authentication type";
    AUTH_NOT_ENABLED = 503, e(5, 5, 1), "Error: authentication not enabled";
    AUTH_NEEDS_TLS = 538, e(5, 7, 11), "Encryption required for requested authentication mechanism";
    AUTH_REQUIRED = 530, e(5, 7, 0), "Authentication required";
    TLS_REQUIRED = 530, e(5, 7, 0), "Must issue a STARTTLS command first";
    AUTH_FAILED = 535, e(5, 7, 8), "Error: authentication failed";
    AUTH_CANCELLED = 501, e(5, 7, 0), "Authentication cancelled";
    AUTH_BAD_BASE64 = 501, e(5, 5, 2), "Error: invalid base64 data";
    RELAY_DENIED = 554, e(5, 7, 1), "Relay access denied";
    USER_UNKNOWN = 550, e(5, 1, 1), "Recipient address rejected: User unknown in local recipient table";
    VIRTUAL_UNKNOWN = 550, e(5, 1, 1), "Recipient address rejected: User unknown in virtual alias table";
    ALIAS_LOOP = 550, e(5, 4, 6), "Recipient address rejected: alias expansion loop";
    ALIAS_TOO_BIG = 550, e(5, 3, 0), "Recipient address rejected: alias expands to too many addresses";
    BAD_MAILBOX = 553, e(5, 1, 3), "Recipient address rejected: not a valid local mailbox name";
    NEEDS_SMTPUTF8 = 553, e(5, 6, 7), "Non-ASCII address requires SMTPUTF8";
    BAD_BDAT = 501, e(5, 5, 4), "Syntax: BDAT size [LAST]";
    DATA_AFTER_BDAT = 503, e(5, 5, 1), "Error: DATA not allowed after BDAT";
    HEADER_LOOP = 554, e(5, 4, 6), "Error: too many hops";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_has_enhanced_code() {
        assert_eq!(
            RELAY_DENIED.to_wire_string(),
            "554 5.7.1 Relay access denied\r\n"
        );
        assert_eq!(
            Reply::queued("ABC").to_wire_string(),
            "250 2.0.0 Ok: queued as ABC\r\n"
        );
    }

    #[test]
    fn refusals_are_classified_and_protocol_errors_are_not() {
        let cases = [
            (RELAY_DENIED, Some(Rejection::RelayDenied)),
            (USER_UNKNOWN, Some(Rejection::UnknownUser)),
            (VIRTUAL_UNKNOWN, Some(Rejection::UnknownUser)),
            (AUTH_FAILED, Some(Rejection::AuthFailed)),
            (AUTH_LOCKED_OUT, Some(Rejection::AuthFailed)),
            (Reply::message_too_big(10), Some(Rejection::Size)),
            (TOO_MANY_RECIPIENTS, Some(Rejection::Limits)),
            (TOO_MANY_CONNECTIONS, Some(Rejection::Limits)),
            (TOO_MANY_CONNECTIONS_FROM_YOU, Some(Rejection::Limits)),
            (ALIAS_LOOP, Some(Rejection::Other)),
            (QUEUE_WRITE_FAILED, Some(Rejection::Other)),
            (AUTH_REQUIRED, Some(Rejection::Other)),
            (TLS_NOT_AVAILABLE, Some(Rejection::Other)),
            (SYNTAX_UNRECOGNIZED, None),
            (BAD_SEQUENCE, None),
            (NEED_RCPT, None),
            (BAD_RECIPIENT, None),
            (BARE_NEWLINE, None),
            (TIMEOUT, None),
            (SHUTTING_DOWN, None),
            (RCPT_OK, None),
            (Reply::queued("X"), None),
        ];
        for (r, want) in cases {
            assert_eq!(r.rejection(), want, "{}", r.to_wire_string());
        }
        let names: Vec<&str> = Rejection::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), Rejection::COUNT);
        for (i, r) in Rejection::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }

    #[test]
    fn multi_line_uses_dash_except_last() {
        let r = Reply::ehlo("mx", "client", vec!["PIPELINING".into(), "SIZE 10".into()]);
        assert_eq!(
            r.to_wire_string(),
            "250-mx greets client\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
        );
    }
}
