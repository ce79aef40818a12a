//! Local delivery for `mydestination`: the recipient tables checked at RCPT time ([`recipients`], parsed by
//! [`maps`]), Maildir writing ([`maildir`]; [`fsid`]: acting as the mailbox owner) and the dedicated local-delivery shard that owns all of it
//! ([`shard`]), so that file-system work never stalls an SMTP shard.

pub mod fsid;
pub mod maildir;
pub mod maps;
pub mod recipients;
pub mod shard;
