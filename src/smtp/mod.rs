//! The SMTP engine: addresses, commands, replies, DATA decoding and the server session state machine.
//! Everything here is sans-IO and works on borrowed bytes.

pub mod address;
pub mod client;
pub mod client_session;
pub mod command;
pub mod data;
pub mod reply;
pub mod reply_parser;
pub mod session;
