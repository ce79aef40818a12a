//! SMTP command lines -> [`Command`] values, on borrowed bytes (one line, CRLF already removed).
//!
//! Only syntax lives here; whether a command is allowed now is the session's business.

use super::address::{parse_path, AddressError, Path};
use super::dsn::{self, DsnParamError, Notify, Ret};
use super::reply::{self, Reply};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    SevenBit,
    EightBitMime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailParams<'a> {
    pub size: Option<u64>,
    pub body: Body,
    pub smtputf8: bool,
    /// DSN `RET=` (RFC 3461).
    pub ret: Option<Ret>,
    /// DSN `ENVID=`, as sent (checked xtext; [`dsn::decode_xtext`] decodes it).
    pub envid: Option<&'a str>,
}

/// The DSN parameters of a RCPT (RFC 3461), checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RcptParams<'a> {
    pub notify: Option<Notify>,
    /// `ORCPT=`: (addr-type, address as checked xtext).
    pub orcpt: Option<(&'a str, &'a str)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMechanism {
    Plain,
    Login,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    Ehlo(&'a str),
    Helo(&'a str),
    Mail {
        from: Path<'a>,
        params: MailParams<'a>,
    },
    Rcpt {
        to: Path<'a>,
        params: RcptParams<'a>,
    },
    Data,
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy,
    Help,
    StartTls,
    Auth {
        mechanism: AuthMechanism,
        initial: Option<&'a str>,
    },
}

/// Why a line is not a command; each maps to exactly one reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    Unrecognized,
    NotImplemented,
    Syntax,
    BadSender,
    BadRecipient,
    NeedsUtf8,
    UnsupportedParam,
    HeloRequired,
    BadBdat,
    UnknownMechanism,
    /// A DSN parameter that breaks RFC 3461's rules: `501 5.5.4` naming the rule.
    Dsn(DsnParamError),
}

impl CommandError {
    pub fn reply(&self) -> Reply {
        match self {
            CommandError::Unrecognized => reply::SYNTAX_UNRECOGNIZED,
            CommandError::NotImplemented => reply::NOT_IMPLEMENTED,
            CommandError::Syntax => reply::SYNTAX_PARAMS,
            CommandError::BadSender => reply::BAD_SENDER,
            CommandError::BadRecipient => reply::BAD_RECIPIENT,
            CommandError::NeedsUtf8 => reply::NEEDS_SMTPUTF8,
            CommandError::UnsupportedParam => reply::PARAM_NOT_IMPLEMENTED,
            CommandError::HeloRequired => reply::HELO_REQUIRED,
            CommandError::BadBdat => reply::BAD_BDAT,
            CommandError::UnknownMechanism => reply::AUTH_UNKNOWN_MECH,
            CommandError::Dsn(e) => Reply::new(501, Some(reply::Enhanced(5, 5, 4)), e.to_string()),
        }
    }
}

/// Splits `VERB rest`, the verb compared case-insensitively.
fn verb(line: &str) -> (&str, &str) {
    match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    }
}

/// Strips `FROM:` / `TO:` (case-insensitive; spaces after the colon tolerated, as Postfix does).
fn strip_keyword<'a>(rest: &'a str, kw: &str) -> Option<&'a str> {
    let head = rest.get(..kw.len())?;
    head.eq_ignore_ascii_case(kw).then(|| &rest[kw.len()..])
}

/// Parses one command line. `utf8_allowed` is true when the MAIL of this transaction said SMTPUTF8 (or, for
/// MAIL itself, it is decided from the parameters).
pub fn parse_command(line: &[u8], utf8_allowed: bool) -> Result<Command<'_>, CommandError> {
    let line = std::str::from_utf8(line).map_err(|_| CommandError::Syntax)?;
    let line = line.trim_end_matches([' ', '\t']);
    let (v, rest) = verb(line);
    let is = |name: &str| v.eq_ignore_ascii_case(name);
    if is("MAIL") {
        let arg = strip_keyword(rest, "FROM:").ok_or(CommandError::Syntax)?;
        // SMTPUTF8 is a MAIL parameter, so look for it before validating the address.
        let smtputf8 = arg.split(' ').any(|p| p.eq_ignore_ascii_case("SMTPUTF8"));
        let (from, params) = parse_path(arg, smtputf8).map_err(|e| match e {
            AddressError::NeedsUtf8 => CommandError::NeedsUtf8,
            _ => CommandError::BadSender,
        })?;
        if from == Path::Postmaster {
            return Err(CommandError::BadSender);
        }
        let params = parse_mail_params(params)?;
        Ok(Command::Mail { from, params })
    } else if is("RCPT") {
        let arg = strip_keyword(rest, "TO:").ok_or(CommandError::Syntax)?;
        let (to, params) = parse_path(arg, utf8_allowed).map_err(|e| match e {
            AddressError::NeedsUtf8 => CommandError::NeedsUtf8,
            _ => CommandError::BadRecipient,
        })?;
        if to == Path::Null {
            return Err(CommandError::BadRecipient);
        }
        let params = parse_rcpt_params(params)?;
        Ok(Command::Rcpt { to, params })
    } else if is("EHLO") || is("HELO") {
        let name = rest.trim();
        // No spaces, and no control characters (NUL, CR, tabs, DEL): the name is logged and stored.
        if name.is_empty() || name.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(CommandError::HeloRequired);
        }
        Ok(if is("EHLO") {
            Command::Ehlo(name)
        } else {
            Command::Helo(name)
        })
    } else if is("DATA") {
        no_args(rest, Command::Data)
    } else if is("BDAT") {
        let mut it = rest.split(' ').filter(|s| !s.is_empty());
        let size = it
            .next()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or(CommandError::BadBdat)?;
        let last = match it.next() {
            None => false,
            Some(s) if s.eq_ignore_ascii_case("LAST") => true,
            Some(_) => return Err(CommandError::BadBdat),
        };
        if it.next().is_some() {
            return Err(CommandError::BadBdat);
        }
        Ok(Command::Bdat { size, last })
    } else if is("RSET") {
        no_args(rest, Command::Rset)
    } else if is("NOOP") {
        Ok(Command::Noop)
    } else if is("QUIT") {
        no_args(rest, Command::Quit)
    } else if is("VRFY") {
        Ok(Command::Vrfy)
    } else if is("HELP") {
        Ok(Command::Help)
    } else if is("STARTTLS") {
        no_args(rest, Command::StartTls)
    } else if is("AUTH") {
        let mut it = rest.split(' ').filter(|s| !s.is_empty());
        let mech = it.next().ok_or(CommandError::Syntax)?;
        let mechanism = if mech.eq_ignore_ascii_case("PLAIN") {
            AuthMechanism::Plain
        } else if mech.eq_ignore_ascii_case("LOGIN") {
            AuthMechanism::Login
        } else {
            return Err(CommandError::UnknownMechanism);
        };
        let initial = it.next();
        if it.next().is_some() {
            return Err(CommandError::Syntax);
        }
        Ok(Command::Auth { mechanism, initial })
    } else if is("EXPN") || is("TURN") || is("ETRN") || is("SEND") || is("SOML") || is("SAML") {
        Err(CommandError::NotImplemented)
    } else {
        Err(CommandError::Unrecognized)
    }
}

fn no_args<'a>(rest: &str, c: Command<'a>) -> Result<Command<'a>, CommandError> {
    if rest.trim().is_empty() {
        Ok(c)
    } else {
        Err(CommandError::Syntax)
    }
}

/// RCPT's parameters: only the DSN ones (`NOTIFY`, `ORCPT`), each at most once.
fn parse_rcpt_params(s: &str) -> Result<RcptParams<'_>, CommandError> {
    let mut p = RcptParams::default();
    for param in s.split(' ').filter(|x| !x.is_empty()) {
        let (k, v) = match param.find('=') {
            Some(i) => (&param[..i], Some(&param[i + 1..])),
            None => (param, None),
        };
        if k.eq_ignore_ascii_case("NOTIFY") {
            if p.notify.is_some() {
                return Err(CommandError::Dsn(DsnParamError::Duplicate("NOTIFY")));
            }
            let v = v.ok_or(CommandError::Dsn(DsnParamError::MissingValue("NOTIFY")))?;
            p.notify = Some(Notify::parse(v).map_err(CommandError::Dsn)?);
        } else if k.eq_ignore_ascii_case("ORCPT") {
            if p.orcpt.is_some() {
                return Err(CommandError::Dsn(DsnParamError::Duplicate("ORCPT")));
            }
            let v = v.ok_or(CommandError::Dsn(DsnParamError::MissingValue("ORCPT")))?;
            p.orcpt = Some(dsn::parse_orcpt(v).map_err(CommandError::Dsn)?);
        } else {
            return Err(CommandError::UnsupportedParam);
        }
    }
    Ok(p)
}

fn parse_mail_params(s: &str) -> Result<MailParams<'_>, CommandError> {
    let mut p = MailParams {
        size: None,
        body: Body::SevenBit,
        smtputf8: false,
        ret: None,
        envid: None,
    };
    for param in s.split(' ').filter(|x| !x.is_empty()) {
        let (k, v) = match param.find('=') {
            Some(i) => (&param[..i], Some(&param[i + 1..])),
            None => (param, None),
        };
        if k.eq_ignore_ascii_case("SIZE") {
            p.size = Some(v.and_then(|v| v.parse().ok()).ok_or(CommandError::Syntax)?);
        } else if k.eq_ignore_ascii_case("BODY") {
            p.body = match v {
                Some(v) if v.eq_ignore_ascii_case("7BIT") => Body::SevenBit,
                Some(v) if v.eq_ignore_ascii_case("8BITMIME") => Body::EightBitMime,
                _ => return Err(CommandError::UnsupportedParam),
            };
        } else if k.eq_ignore_ascii_case("SMTPUTF8") && v.is_none() {
            p.smtputf8 = true;
        } else if k.eq_ignore_ascii_case("AUTH") && v.is_some() {
            // RFC 4954 AUTH=<mailbox>: accepted and ignored, as Postfix does for untrusted clients.
        } else if k.eq_ignore_ascii_case("RET") {
            if p.ret.is_some() {
                return Err(CommandError::Dsn(DsnParamError::Duplicate("RET")));
            }
            let v = v.ok_or(CommandError::Dsn(DsnParamError::MissingValue("RET")))?;
            p.ret = Some(Ret::parse(v).map_err(CommandError::Dsn)?);
        } else if k.eq_ignore_ascii_case("ENVID") {
            if p.envid.is_some() {
                return Err(CommandError::Dsn(DsnParamError::Duplicate("ENVID")));
            }
            let v = v.ok_or(CommandError::Dsn(DsnParamError::MissingValue("ENVID")))?;
            dsn::check_envid(v).map_err(CommandError::Dsn)?;
            p.envid = Some(v);
        } else {
            return Err(CommandError::UnsupportedParam);
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_commands() {
        assert_eq!(
            parse_command(b"ehlo client.example", false),
            Ok(Command::Ehlo("client.example"))
        );
        assert_eq!(parse_command(b"DATA", false), Ok(Command::Data));
        assert_eq!(
            parse_command(b"BDAT 100 LAST", false),
            Ok(Command::Bdat {
                size: 100,
                last: true
            })
        );
        assert_eq!(parse_command(b"QUIT  ", false), Ok(Command::Quit));
        match parse_command(b"MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME", false) {
            Ok(Command::Mail { params, .. }) => {
                assert_eq!(params.size, Some(1000));
                assert_eq!(params.body, Body::EightBitMime);
            }
            x => panic!("{x:?}"),
        }
        assert!(matches!(
            parse_command(b"mail from: <>", false),
            Ok(Command::Mail {
                from: Path::Null,
                ..
            })
        ));
        assert!(matches!(
            parse_command(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==", false),
            Ok(Command::Auth {
                mechanism: AuthMechanism::Plain,
                initial: Some(_)
            })
        ));
    }

    #[test]
    fn errors_map_to_precise_replies() {
        let code = |l: &[u8]| {
            parse_command(l, false)
                .unwrap_err()
                .reply()
                .to_wire_string()
        };
        assert!(code(b"FOO").starts_with("500 5.5.2"));
        assert!(code(b"EXPN list").starts_with("502 5.5.2"));
        assert!(code(b"MAIL TO:<a@b>").starts_with("501 5.5.4"));
        assert!(code(b"MAIL FROM:a@b.example").starts_with("501 5.1.7"));
        assert!(code(b"RCPT TO:<>").starts_with("501 5.1.3"));
        assert!(code(b"RCPT TO:<a@b.example> FOO=BAR").starts_with("555 5.5.4"));
        assert!(code(b"MAIL FROM:<a@b.example> BODY=BINARYMIME").starts_with("555 5.5.4"));
        assert!(code(b"EHLO").starts_with("501 5.5.4"));
        assert!(code(b"BDAT x").starts_with("501 5.5.4"));
        assert!(code(b"AUTH CRAM-MD5").starts_with("504 5.5.4"));
        assert!(code(b"RCPT TO:<j\xc3\xb6@b.example>").starts_with("553 5.6.7"));
        assert!(code(b"DATA now").starts_with("501 5.5.4"));
        assert!(code(b"\xff\xfe").starts_with("501"));
    }

    #[test]
    fn dsn_parameters() {
        match parse_command(
            b"MAIL FROM:<a@b.example> RET=hdrs ENVID=QQ+2B1 SIZE=10",
            false,
        ) {
            Ok(Command::Mail { params, .. }) => {
                assert_eq!(params.ret, Some(Ret::Hdrs));
                assert_eq!(params.envid, Some("QQ+2B1"));
                assert_eq!(params.size, Some(10));
            }
            x => panic!("{x:?}"),
        }
        match parse_command(
            b"RCPT TO:<c@d.example> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;C+40d.example",
            false,
        ) {
            Ok(Command::Rcpt { params, .. }) => {
                assert_eq!(params.notify.map(|n| n.bits()), Some(5));
                assert_eq!(params.orcpt, Some(("rfc822", "C+40d.example")));
            }
            x => panic!("{x:?}"),
        }
        let wire = |l: &[u8]| {
            parse_command(l, false)
                .unwrap_err()
                .reply()
                .to_wire_string()
        };
        let cases: &[(&[u8], &str)] = &[
            (
                b"MAIL FROM:<a@b.example> RET=FULL RET=HDRS",
                "Duplicate RET parameter",
            ),
            (
                b"MAIL FROM:<a@b.example> RET=ALL",
                "RET must be FULL or HDRS",
            ),
            (
                b"MAIL FROM:<a@b.example> RET",
                "RET parameter needs a value",
            ),
            (
                b"MAIL FROM:<a@b.example> ENVID=a ENVID=b",
                "Duplicate ENVID parameter",
            ),
            (
                b"MAIL FROM:<a@b.example> ENVID=a=b",
                "malformed xtext in ENVID",
            ),
            (
                b"MAIL FROM:<a@b.example> ENVID=a+0Ab",
                "ENVID decodes to a control",
            ),
            (
                b"RCPT TO:<c@d.example> NOTIFY=NEVER NOTIFY=NEVER",
                "Duplicate NOTIFY parameter",
            ),
            (
                b"RCPT TO:<c@d.example> NOTIFY=NEVER,DELAY",
                "NOTIFY=NEVER must not be combined",
            ),
            (
                b"RCPT TO:<c@d.example> NOTIFY=",
                "NOTIFY must be NEVER or a list",
            ),
            (
                b"RCPT TO:<c@d.example> NOTIFY=DELAY,DELAY",
                "NOTIFY lists a value twice",
            ),
            (
                b"RCPT TO:<c@d.example> ORCPT=rfc822;x ORCPT=rfc822;y",
                "Duplicate ORCPT parameter",
            ),
            (
                b"RCPT TO:<c@d.example> ORCPT=x@y",
                "ORCPT must be addr-type;xtext",
            ),
            (
                b"RCPT TO:<c@d.example> ORCPT",
                "ORCPT parameter needs a value",
            ),
        ];
        for (line, text) in cases {
            let w = wire(line);
            assert!(w.starts_with(&format!("501 5.5.4 {text}")), "{w}");
        }
        let long = format!("MAIL FROM:<a@b.example> ENVID={}", "x".repeat(101));
        assert!(wire(long.as_bytes()).starts_with("501 5.5.4 ENVID longer than 100"));
        let long = format!("RCPT TO:<c@d.example> ORCPT=rfc822;{}", "x".repeat(494));
        assert!(wire(long.as_bytes()).starts_with("501 5.5.4 ORCPT longer than 500"));
    }

    #[test]
    fn smtputf8_param_allows_utf8_sender() {
        assert!(parse_command("MAIL FROM:<jö@b.example> SMTPUTF8".as_bytes(), false).is_ok());
        assert!(parse_command("RCPT TO:<jö@b.example>".as_bytes(), true).is_ok());
    }
}
