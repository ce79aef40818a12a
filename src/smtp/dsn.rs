//! The DSN extension's parameter values (RFC 3461): xtext, `NOTIFY=`, `RET=`, `ENVID=` and `ORCPT=`, parsed on
//! borrowed bytes and encoded for a next hop; the owned per-message and per-recipient forms the queue stores.
//!
//! Rules (RFC 3461 section 4): xtext is printable ASCII (`!` to `~`) except `+` and `=`, with `+HH` standing
//! for any octet (upper-case hex per the RFC; lower case is accepted too). Decoded values must be printable
//! ASCII (space allowed, no control or 8-bit octet: they end up in report headers). `ENVID` is at most 100
//! characters and `ORCPT` at most 500, both counted as sent (encoded). `NOTIFY` is `NEVER` alone or a
//! non-empty list of distinct `SUCCESS`, `FAILURE`, `DELAY`. Keywords are case-insensitive.

use std::fmt;

/// Longest `ENVID=` value (RFC 3461 4.4), in characters as sent.
pub const ENVID_MAX: usize = 100;
/// Longest `ORCPT=` value (RFC 3461 4.2), in characters as sent.
pub const ORCPT_MAX: usize = 500;

/// Why a DSN parameter is refused (each is a `501 5.5.4` with this text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DsnParamError {
    #[error("Duplicate {0} parameter")]
    Duplicate(&'static str),
    #[error("{0} parameter needs a value")]
    MissingValue(&'static str),
    #[error("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")]
    BadNotify,
    #[error("NOTIFY=NEVER must not be combined with other values")]
    NeverNotAlone,
    #[error("NOTIFY lists a value twice")]
    NotifyRepeated,
    #[error("RET must be FULL or HDRS")]
    BadRet,
    #[error("ENVID longer than 100 characters")]
    EnvidTooLong,
    #[error("ORCPT longer than 500 characters")]
    OrcptTooLong,
    #[error("ORCPT must be addr-type;xtext")]
    BadOrcpt,
    #[error("malformed xtext in {0}")]
    BadXtext(&'static str),
    #[error("{0} decodes to a control or non-ASCII character")]
    NotPrintable(&'static str),
}

/// `RET=`: what a failure report returns of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ret {
    Full,
    Hdrs,
}

impl Ret {
    pub fn parse(v: &str) -> Result<Ret, DsnParamError> {
        if v.eq_ignore_ascii_case("FULL") {
            Ok(Ret::Full)
        } else if v.eq_ignore_ascii_case("HDRS") {
            Ok(Ret::Hdrs)
        } else {
            Err(DsnParamError::BadRet)
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Ret::Full => "FULL",
            Ret::Hdrs => "HDRS",
        }
    }
}

/// `NOTIFY=`: `NEVER`, or a non-empty set of SUCCESS, FAILURE, DELAY. Stored as its bits (the queue's byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notify(u8);

impl Notify {
    pub const SUCCESS: u8 = 1;
    pub const FAILURE: u8 = 2;
    pub const DELAY: u8 = 4;
    pub const NEVER: u8 = 8;

    /// From the stored bits: `NEVER` alone or a non-empty subset of the others.
    pub fn from_bits(b: u8) -> Option<Notify> {
        (b == Self::NEVER || (b != 0 && b & !(Self::SUCCESS | Self::FAILURE | Self::DELAY) == 0))
            .then_some(Notify(b))
    }

    pub fn bits(self) -> u8 {
        self.0
    }

    pub fn never(self) -> bool {
        self.0 == Self::NEVER
    }
    pub fn success(self) -> bool {
        self.0 & Self::SUCCESS != 0
    }
    pub fn failure(self) -> bool {
        self.0 & Self::FAILURE != 0
    }
    pub fn delay(self) -> bool {
        self.0 & Self::DELAY != 0
    }

    /// Parses a `NOTIFY=` value.
    pub fn parse(v: &str) -> Result<Notify, DsnParamError> {
        let mut bits = 0u8;
        let mut n = 0usize;
        for word in v.split(',') {
            let b = if word.eq_ignore_ascii_case("NEVER") {
                Self::NEVER
            } else if word.eq_ignore_ascii_case("SUCCESS") {
                Self::SUCCESS
            } else if word.eq_ignore_ascii_case("FAILURE") {
                Self::FAILURE
            } else if word.eq_ignore_ascii_case("DELAY") {
                Self::DELAY
            } else {
                return Err(DsnParamError::BadNotify);
            };
            if bits & b != 0 {
                return Err(DsnParamError::NotifyRepeated);
            }
            bits |= b;
            n += 1;
        }
        if bits & Self::NEVER != 0 && n > 1 {
            return Err(DsnParamError::NeverNotAlone);
        }
        Ok(Notify(bits))
    }
}

impl fmt::Display for Notify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.never() {
            return f.write_str("NEVER");
        }
        let mut first = true;
        for (bit, name) in [
            (Self::SUCCESS, "SUCCESS"),
            (Self::FAILURE, "FAILURE"),
            (Self::DELAY, "DELAY"),
        ] {
            if self.0 & bit != 0 {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        Ok(())
    }
}

/// Checks an xtext value (`what` names the parameter in the error); returns its decoded length.
pub fn check_xtext(v: &str, what: &'static str) -> Result<usize, DsnParamError> {
    let b = v.as_bytes();
    let mut i = 0;
    let mut n = 0;
    while i < b.len() {
        let c = b[i];
        let decoded = if c == b'+' {
            let hex = b.get(i + 1..i + 3).ok_or(DsnParamError::BadXtext(what))?;
            i += 3;
            hex_pair(hex).ok_or(DsnParamError::BadXtext(what))?
        } else if (0x21..=0x7e).contains(&c) && c != b'=' {
            i += 1;
            c
        } else {
            return Err(DsnParamError::BadXtext(what));
        };
        if !(0x20..=0x7e).contains(&decoded) {
            return Err(DsnParamError::NotPrintable(what));
        }
        n += 1;
    }
    Ok(n)
}

fn hex_pair(h: &[u8]) -> Option<u8> {
    let d = |c: u8| (c as char).to_digit(16).map(|x| x as u8);
    Some(d(h[0])? << 4 | d(h[1])?)
}

/// Decodes an xtext value already checked by [`check_xtext`] (anything malformed is dropped).
pub fn decode_xtext(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+' {
            if let Some(c) = b.get(i + 1..i + 3).and_then(hex_pair) {
                out.push(c as char);
            }
            i += 3;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// Appends `v` as xtext: printable ASCII except `+` and `=` as is, every other octet as `+HH`.
pub fn encode_xtext(out: &mut Vec<u8>, v: &str) {
    for &c in v.as_bytes() {
        if (0x21..=0x7e).contains(&c) && c != b'+' && c != b'=' {
            out.push(c);
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.extend_from_slice(&[b'+', HEX[(c >> 4) as usize], HEX[(c & 15) as usize]]);
        }
    }
}

/// Checks an `ENVID=` value (xtext, at most [`ENVID_MAX`] characters).
pub fn check_envid(v: &str) -> Result<(), DsnParamError> {
    if v.len() > ENVID_MAX {
        return Err(DsnParamError::EnvidTooLong);
    }
    check_xtext(v, "ENVID")?;
    Ok(())
}

/// Splits and checks an `ORCPT=` value: `addr-type;xtext` (addr-type an RFC 822 atom), at most
/// [`ORCPT_MAX`] characters. Returns (addr-type, xtext address), borrowed.
pub fn parse_orcpt(v: &str) -> Result<(&str, &str), DsnParamError> {
    if v.len() > ORCPT_MAX {
        return Err(DsnParamError::OrcptTooLong);
    }
    let (ty, addr) = v.split_once(';').ok_or(DsnParamError::BadOrcpt)?;
    let atom = |c: u8| c.is_ascii_graphic() && !b"()<>@,;:\\\".[]".contains(&c);
    if ty.is_empty() || !ty.bytes().all(atom) || addr.is_empty() {
        return Err(DsnParamError::BadOrcpt);
    }
    check_xtext(addr, "ORCPT")?;
    Ok((ty, addr))
}

/// An original recipient (`ORCPT=`), decoded: `rfc822` and the address as the sender gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orcpt {
    pub addr_type: String,
    pub address: String,
}

/// What a recipient asked for: `NOTIFY=` and `ORCPT=` (both optional).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RcptDsn {
    pub notify: Option<Notify>,
    pub orcpt: Option<Orcpt>,
}

impl RcptDsn {
    /// A failure is reported unless NOTIFY was given without FAILURE (NEVER included).
    pub fn wants_failure(&self) -> bool {
        self.notify.is_none_or(|n| n.failure())
    }
    /// A delay is reported unless NOTIFY was given without DELAY (absent: allowed, as Postfix does).
    pub fn wants_delay(&self) -> bool {
        self.notify.is_none_or(|n| n.delay())
    }
    /// Success is reported only when asked for.
    pub fn wants_success(&self) -> bool {
        self.notify.is_some_and(|n| n.success())
    }
    pub fn is_empty(&self) -> bool {
        self.notify.is_none() && self.orcpt.is_none()
    }
}

/// The DSN facts of a queued message: `RET=`, `ENVID=` (decoded), per recipient `NOTIFY`/`ORCPT` (parallel to
/// the recipients, or empty when none was given), and whether its one delay warning was sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvelopeDsn {
    pub ret: Option<Ret>,
    pub envid: Option<String>,
    pub rcpts: Vec<RcptDsn>,
    pub delay_warned: bool,
}

impl EnvelopeDsn {
    /// Nothing to store: an old record (or a message without any DSN parameter) looks like this.
    pub fn is_empty(&self) -> bool {
        self.ret.is_none()
            && self.envid.is_none()
            && self.rcpts.iter().all(RcptDsn::is_empty)
            && !self.delay_warned
    }

    /// The parameters of recipient `i` (none when not given).
    pub fn rcpt(&self, i: usize) -> RcptDsn {
        self.rcpt_ref(i).clone()
    }

    /// [`Self::rcpt`] by reference (no copy of the ORCPT address to read a flag).
    pub fn rcpt_ref(&self, i: usize) -> &RcptDsn {
        const NONE: RcptDsn = RcptDsn {
            notify: None,
            orcpt: None,
        };
        self.rcpts.get(i).unwrap_or(&NONE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_values() {
        assert_eq!(Notify::parse("NEVER").unwrap().to_string(), "NEVER");
        let n = Notify::parse("delay,Success").unwrap();
        assert!(n.success() && n.delay() && !n.failure() && !n.never());
        assert_eq!(n.to_string(), "SUCCESS,DELAY");
        assert_eq!(Notify::parse("SUCCESS,FAILURE,DELAY").unwrap().bits(), 7);
        assert_eq!(Notify::parse(""), Err(DsnParamError::BadNotify));
        assert_eq!(Notify::parse("SUCCESS,"), Err(DsnParamError::BadNotify));
        assert_eq!(Notify::parse("SOMETIMES"), Err(DsnParamError::BadNotify));
        assert_eq!(
            Notify::parse("NEVER,FAILURE"),
            Err(DsnParamError::NeverNotAlone)
        );
        assert_eq!(
            Notify::parse("FAILURE,NEVER"),
            Err(DsnParamError::NeverNotAlone)
        );
        assert_eq!(
            Notify::parse("FAILURE,failure"),
            Err(DsnParamError::NotifyRepeated)
        );
        assert_eq!(Notify::from_bits(8).map(Notify::bits), Some(8));
        assert_eq!(Notify::from_bits(9), None);
        assert_eq!(Notify::from_bits(0), None);
        assert_eq!(Notify::from_bits(16), None);
    }

    #[test]
    fn ret_values() {
        assert_eq!(Ret::parse("hdrs"), Ok(Ret::Hdrs));
        assert_eq!(Ret::parse("FULL"), Ok(Ret::Full));
        assert_eq!(Ret::parse("HEADERS"), Err(DsnParamError::BadRet));
        assert_eq!(Ret::parse(""), Err(DsnParamError::BadRet));
    }

    #[test]
    fn xtext_round_trip_and_errors() {
        assert_eq!(check_xtext("abc+2Bdef", "ENVID"), Ok(7));
        assert_eq!(decode_xtext("abc+2Bdef+20x"), "abc+def x");
        assert_eq!(decode_xtext("+3d"), "=");
        let mut out = Vec::new();
        encode_xtext(&mut out, "a+b=c d");
        assert_eq!(out, b"a+2Bb+3Dc+20d");
        assert_eq!(
            check_xtext("a+2", "ENVID"),
            Err(DsnParamError::BadXtext("ENVID"))
        );
        assert_eq!(
            check_xtext("a+ZZ", "ENVID"),
            Err(DsnParamError::BadXtext("ENVID"))
        );
        assert_eq!(
            check_xtext("a=b", "ENVID"),
            Err(DsnParamError::BadXtext("ENVID"))
        );
        assert_eq!(
            check_xtext("a\tb", "ENVID"),
            Err(DsnParamError::BadXtext("ENVID"))
        );
        assert_eq!(
            check_xtext("é", "ENVID"),
            Err(DsnParamError::BadXtext("ENVID"))
        );
        assert_eq!(
            check_xtext("x+0D+0AInjected: yes", "ENVID"),
            Err(DsnParamError::NotPrintable("ENVID"))
        );
        assert_eq!(
            check_xtext("+C3", "ORCPT"),
            Err(DsnParamError::NotPrintable("ORCPT"))
        );
        // Whatever is encoded decodes back.
        let s = "id=1+2; <x@y> ~!";
        let mut e = Vec::new();
        encode_xtext(&mut e, s);
        let e = String::from_utf8(e).unwrap();
        assert!(check_xtext(&e, "ENVID").is_ok());
        assert_eq!(decode_xtext(&e), s);
    }

    #[test]
    fn envid_and_orcpt_limits() {
        assert!(check_envid(&"a".repeat(100)).is_ok());
        assert_eq!(
            check_envid(&"a".repeat(101)),
            Err(DsnParamError::EnvidTooLong)
        );
        assert_eq!(parse_orcpt("rfc822;a+40b"), Ok(("rfc822", "a+40b")));
        let long = format!("rfc822;{}", "a".repeat(493));
        assert_eq!(long.len(), 500);
        assert!(parse_orcpt(&long).is_ok());
        assert_eq!(
            parse_orcpt(&format!("{long}a")),
            Err(DsnParamError::OrcptTooLong)
        );
        assert_eq!(parse_orcpt("rfc822"), Err(DsnParamError::BadOrcpt));
        assert_eq!(parse_orcpt(";a@b"), Err(DsnParamError::BadOrcpt));
        assert_eq!(parse_orcpt("rfc822;"), Err(DsnParamError::BadOrcpt));
        assert_eq!(parse_orcpt("rf@c;a@b"), Err(DsnParamError::BadOrcpt));
        assert_eq!(
            parse_orcpt("rfc822;a b"),
            Err(DsnParamError::BadXtext("ORCPT"))
        );
    }

    #[test]
    fn what_a_recipient_wants() {
        let none = RcptDsn::default();
        assert!(none.wants_failure() && none.wants_delay() && !none.wants_success());
        let never = RcptDsn {
            notify: Notify::parse("NEVER").ok(),
            orcpt: None,
        };
        assert!(!never.wants_failure() && !never.wants_delay() && !never.wants_success());
        let s = RcptDsn {
            notify: Notify::parse("SUCCESS").ok(),
            orcpt: None,
        };
        assert!(!s.wants_failure() && !s.wants_delay() && s.wants_success());
    }
}
