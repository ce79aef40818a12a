//! The SMTP engine: addresses, commands, replies, DATA decoding, the server session state machine, and the
//! client side (the one reply parser, [`reply_parser`], and the client session state machine,
//! [`client_session`], that the relay's outbound delivery, `sendmail` and the load tester drive). Everything
//! here is sans-IO and works on borrowed bytes.

pub mod address;
pub mod client;
pub mod client_session;
pub mod command;
pub mod data;
pub mod dsn;
pub mod reply;
pub mod reply_parser;
pub mod session;
