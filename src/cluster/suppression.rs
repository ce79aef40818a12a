//! The suppression list shared between the nodes of a cluster: every `add`/`remove` made on a node (API or
//! `shardmta suppression`) is appended to the Redis stream `shardmta:suppression` (fields `node`, `op` add or
//! remove, `entry`, `reason`, `expires` unix seconds or `-`; trimmed to about `STREAM_LEN_MAX` entries), and
//! each node reads the changes of the others from it every `MERGE_EVERY` and applies them to its own list
//! (`Suppression::apply_shared`: one file write per batch, none when nothing changes). A node that starts reads
//! the stream from its beginning, so it learns the entries added before. Runs on the HTTP executor (its blocking
//! pool writes the file). While Redis is down a local change waits in a bounded queue and is sent when Redis answers
//! again; the others' changes are read then too (the stream keeps them).

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use redis_protocol::resp2::types::OwnedFrame;

use super::redis::{encode_command, Client, RedisError, RedisUrl};
use crate::suppression::{SharedOp, Suppression, Target};

pub const STREAM: &str = "shardmta:suppression";
/// Entries the stream keeps (about: `XADD MAXLEN ~`).
pub const STREAM_LEN_MAX: usize = 100_000;
/// Changes read and applied per round.
pub const READ_BATCH_MAX: usize = 1000;
/// Local changes waiting for Redis at most (past that the oldest is dropped, logged).
pub const PENDING_MAX: usize = 10_000;
/// How often a node reads the others' changes.
pub const MERGE_EVERY: Duration = Duration::from_secs(1);

/// One node's end of the shared list (on the HTTP executor).
pub struct SharedSuppression {
    client: Client,
    node: String,
    list: Arc<Suppression>,
    /// The last stream id read.
    last_id: RefCell<String>,
    /// Local changes not sent yet (Redis down), encoded, oldest first (at most `PENDING_MAX`).
    pending: RefCell<std::collections::VecDeque<Vec<u8>>>,
    flushing: std::cell::Cell<bool>,
}

impl SharedSuppression {
    pub fn from_config(
        cfg: &crate::config::Config,
        list: Arc<Suppression>,
    ) -> Option<std::rc::Rc<SharedSuppression>> {
        let c = cfg.cluster.as_ref()?;
        let url = RedisUrl::parse(&c.redis_url).ok()?;
        let node = if c.node_name.is_empty() {
            cfg.myhostname.clone()
        } else {
            c.node_name.clone()
        };
        Some(std::rc::Rc::new(SharedSuppression {
            client: Client::new(url, c.redis_timeout.0, Vec::new()),
            node,
            list,
            last_id: RefCell::new("0".into()),
            pending: RefCell::default(),
            flushing: std::cell::Cell::new(false),
        }))
    }

    /// Shares a change made on this node. While Redis does not answer, the change waits in this node's queue
    /// (at most `PENDING_MAX`, oldest dropped past that, logged) and is sent, in order, once it answers.
    pub async fn publish(&self, target: &Target, add: Option<(&str, Option<u64>)>) {
        let (op, reason, expires) = match add {
            Some((r, e)) => (
                "add",
                r,
                e.map_or_else(|| "-".to_string(), |e| e.to_string()),
            ),
            None => ("remove", "", "-".to_string()),
        };
        let mut cmd = Vec::new();
        let key = target.key();
        let maxlen = STREAM_LEN_MAX.to_string();
        let encoded = encode_command(
            &mut cmd,
            &[
                b"XADD",
                STREAM.as_bytes(),
                b"MAXLEN",
                b"~",
                maxlen.as_bytes(),
                b"*",
                b"node",
                self.node.as_bytes(),
                b"op",
                op.as_bytes(),
                b"entry",
                key.as_bytes(),
                b"reason",
                reason.as_bytes(),
                b"expires",
                expires.as_bytes(),
            ],
        );
        if let Err(e) = encoded {
            tracing::warn!(target: crate::eventlog::QMGR, "suppression: {op} {key} not shared with the cluster: {e}");
            return;
        }
        {
            let mut p = self.pending.borrow_mut();
            if p.len() >= PENDING_MAX {
                p.pop_front();
                tracing::error!(target: crate::eventlog::QMGR, "suppression: more than {PENDING_MAX} changes wait for redis: the oldest is not shared");
            }
            p.push_back(cmd);
        }
        if let Err(e) = self.flush().await {
            tracing::warn!(target: crate::eventlog::QMGR, "suppression: {op} {key} not shared with the cluster yet (sent when redis answers): {e}");
        }
    }

    /// Sends the changes waiting, in order; stops at the first failure (they stay queued).
    async fn flush(&self) -> Result<(), RedisError> {
        // One flush at a time, so the changes keep their order.
        if self.flushing.replace(true) {
            return Ok(());
        }
        let r = async {
            loop {
                let Some(cmd) = self.pending.borrow().front().cloned() else {
                    return Ok(());
                };
                self.client.call(cmd).await?;
                self.pending.borrow_mut().pop_front();
            }
        }
        .await;
        self.flushing.set(false);
        r
    }

    /// Reads and applies the other nodes' changes every `MERGE_EVERY`, while the node runs.
    pub async fn run(self: std::rc::Rc<Self>, stop: impl Fn() -> bool) {
        while !stop() {
            if !self.pending.borrow().is_empty() && self.flush().await.is_ok() {
                tracing::info!(target: crate::eventlog::QMGR, "suppression: the changes made while redis was unreachable are shared");
            }
            // A full batch: more are waiting, read on at once.
            match self.merge_once().await {
                Ok(n) if n >= READ_BATCH_MAX => continue,
                Ok(_) => {}
                Err(e) if e.is_down() => {} // the cluster module logs the state of Redis
                Err(e) => {
                    tracing::warn!(target: crate::eventlog::QMGR, "suppression: reading the shared changes: {e}")
                }
            }
            glommio::timer::sleep(MERGE_EVERY).await;
        }
    }

    /// One round: reads up to `READ_BATCH_MAX` changes after the last one read, applies the others' ones.
    /// Returns how many stream entries were read.
    pub async fn merge_once(&self) -> Result<usize, RedisError> {
        let last = self.last_id.borrow().clone();
        let count = READ_BATCH_MAX.to_string();
        let mut cmd = Vec::new();
        encode_command(
            &mut cmd,
            &[
                b"XREAD",
                b"COUNT",
                count.as_bytes(),
                b"STREAMS",
                STREAM.as_bytes(),
                last.as_bytes(),
            ],
        )?;
        let reply = self.client.call(cmd).await?;
        let StreamRead {
            ops,
            entries: n,
            last_id,
        } = parse_xread(&reply, &self.node)?;
        let Some(last_id) = last_id else {
            return Ok(0);
        };
        if !ops.is_empty() {
            let list = self.list.clone();
            let applied = glommio::executor()
                .spawn_blocking(move || list.apply_shared(&ops))
                .await;
            match applied {
                Ok(k) if k > 0 => {
                    tracing::info!(target: crate::eventlog::QMGR, "suppression: {k} change(s) from other nodes applied")
                }
                Ok(_) => {}
                Err(e) => {
                    // Not marked read: tried again next round.
                    tracing::error!(target: crate::eventlog::QMGR, "suppression: cannot apply the shared changes: {e}");
                    return Ok(0);
                }
            }
        }
        *self.last_id.borrow_mut() = last_id;
        Ok(n)
    }
}

fn text(f: &OwnedFrame) -> Option<&str> {
    match f {
        OwnedFrame::BulkString(b) | OwnedFrame::SimpleString(b) => std::str::from_utf8(b).ok(),
        _ => None,
    }
}

/// What one XREAD gave.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StreamRead {
    /// The other nodes' changes.
    pub ops: Vec<SharedOp>,
    /// Stream entries read (own ones and unparsable ones included).
    pub entries: usize,
    /// The id of the last entry read (`None`: nothing new).
    pub last_id: Option<String>,
}

/// An XREAD reply: `[[stream, [[id, [field, value, ...]], ...]]]` or null. Returns the changes made by nodes
/// other than `me` (entries that do not parse are skipped), how many entries were read, and the last id.
pub fn parse_xread(reply: &OwnedFrame, me: &str) -> Result<StreamRead, RedisError> {
    let bad = || RedisError::Protocol("unexpected XREAD reply".into());
    let streams = match reply {
        OwnedFrame::Null => return Ok(StreamRead::default()),
        OwnedFrame::Array(a) => a,
        _ => return Err(bad()),
    };
    let mut ops = Vec::new();
    let mut n = 0;
    let mut last = None;
    for s in streams {
        let OwnedFrame::Array(pair) = s else {
            return Err(bad());
        };
        let Some(OwnedFrame::Array(entries)) = pair.get(1) else {
            return Err(bad());
        };
        for e in entries {
            let OwnedFrame::Array(e) = e else {
                return Err(bad());
            };
            let (Some(id), Some(OwnedFrame::Array(fields))) = (e.first().and_then(text), e.get(1))
            else {
                return Err(bad());
            };
            n += 1;
            last = Some(id.to_string());
            let field = |name: &str| {
                fields
                    .chunks(2)
                    .find(|kv| kv.first().and_then(text) == Some(name))
                    .and_then(|kv| kv.get(1).and_then(text))
            };
            if field("node") == Some(me) {
                continue;
            }
            let Some(target) = field("entry").and_then(|k| Target::parse(k).ok()) else {
                continue;
            };
            match field("op") {
                Some("add") => ops.push(SharedOp::Add {
                    target,
                    reason: field("reason").unwrap_or("").to_string(),
                    expires_unix: field("expires").and_then(|e| e.parse().ok()),
                }),
                Some("remove") => ops.push(SharedOp::Remove(target)),
                _ => {}
            }
        }
    }
    Ok(StreamRead {
        ops,
        entries: n,
        last_id: last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> OwnedFrame {
        OwnedFrame::BulkString(s.as_bytes().to_vec())
    }

    fn entry(id: &str, kv: &[&str]) -> OwnedFrame {
        OwnedFrame::Array(vec![
            bulk(id),
            OwnedFrame::Array(kv.iter().map(|s| bulk(s)).collect()),
        ])
    }

    #[test]
    fn xread_replies() {
        let reply = OwnedFrame::Array(vec![OwnedFrame::Array(vec![
            bulk(STREAM),
            OwnedFrame::Array(vec![
                entry(
                    "1-0",
                    &[
                        "node",
                        "a",
                        "op",
                        "add",
                        "entry",
                        "bob@x.example",
                        "reason",
                        "r",
                        "expires",
                        "-",
                    ],
                ),
                entry(
                    "2-0",
                    &[
                        "node",
                        "me",
                        "op",
                        "add",
                        "entry",
                        "own@x.example",
                        "reason",
                        "",
                        "expires",
                        "-",
                    ],
                ),
                entry(
                    "3-0",
                    &[
                        "node",
                        "b",
                        "op",
                        "remove",
                        "entry",
                        "@y.example",
                        "reason",
                        "",
                        "expires",
                        "-",
                    ],
                ),
                entry(
                    "4-0",
                    &[
                        "node",
                        "b",
                        "op",
                        "add",
                        "entry",
                        "not an entry",
                        "reason",
                        "",
                        "expires",
                        "-",
                    ],
                ),
                entry(
                    "5-0",
                    &[
                        "node",
                        "b",
                        "op",
                        "add",
                        "entry",
                        "c@x.example",
                        "reason",
                        "t",
                        "expires",
                        "99",
                    ],
                ),
            ]),
        ])]);
        let r = parse_xread(&reply, "me").unwrap();
        assert_eq!((r.entries, r.last_id.as_deref()), (5, Some("5-0")));
        assert_eq!(
            r.ops,
            vec![
                SharedOp::Add {
                    target: Target::parse("bob@x.example").unwrap(),
                    reason: "r".into(),
                    expires_unix: None
                },
                SharedOp::Remove(Target::parse("@y.example").unwrap()),
                SharedOp::Add {
                    target: Target::parse("c@x.example").unwrap(),
                    reason: "t".into(),
                    expires_unix: Some(99)
                },
            ]
        );
        assert_eq!(
            parse_xread(&OwnedFrame::Null, "me").unwrap(),
            StreamRead::default()
        );
        assert!(parse_xread(&OwnedFrame::Integer(1), "me").is_err());
        assert!(parse_xread(&OwnedFrame::Array(vec![OwnedFrame::Integer(1)]), "me").is_err());
    }
}
