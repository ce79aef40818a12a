//! Local delivery for `mydestination`: the recipient tables checked at RCPT time ([`recipients`], parsed by
//! [`maps`]), Maildir writing ([`maildir`]: format and names; [`safe_path`]: symlink-safe opening and file
//! creation; [`fsid`]: acting as the mailbox owner) and the dedicated local-delivery shard that owns all of
//! it ([`shard`]), so that file-system work never stalls an SMTP shard.

pub mod fsid;
pub mod maildir;
pub mod maps;
pub mod recipients;
pub mod safe_path;
pub mod shard;
