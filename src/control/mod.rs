//! The control plane of a running server: what an operator or the HTTP API asks of the shards (queue
//! changes, message injection, health), as values, and the [`ControlPlane`] handle that carries each request
//! to the shards that must act on it and brings their answers back.
//!
//! Who runs what: every SMTP shard has one bounded request channel ([`limits::CONTROL_REQUESTS_QUEUED_MAX`])
//! and one task that takes its requests one at a time and acts on its own queue (`shard::control_task`). The
//! handle is `Send + Sync`; it is used by the HTTP executor (never a shard's reactor thread), whose await on
//! an answer is a wait on a channel, not on a lock. A request that finds a shard's channel full waits for room;
//! every wait is bounded by [`limits::CONTROL_ANSWER_TIMEOUT`].
//!
//! The same operations on a stopped server are done by [`crate::delivery::admin`] directly on the spool;
//! [`client`] is the command line's way to a running server (HTTP over the control socket).

pub mod client;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::limits;
use crate::queue::QueueId;

/// A change an operator makes to queued messages (Postfix's postsuper/postqueue verbs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueAction {
    /// Never deliver until released (`postsuper -h`).
    Hold,
    /// Undo a hold; the message's due recipients are tried at once (`postsuper -H`).
    Release,
    /// Remove without a bounce (`postsuper -d`).
    Delete,
    /// Make deferred recipients due now (`postqueue -f` / `-s`).
    Flush,
    /// Return to the sender now with a DSN, "returned by the administrator" (`postsuper -b`... as Postfix's
    /// `postqueue`-less bounce).
    Bounce,
}

impl QueueAction {
    pub fn name(self) -> &'static str {
        match self {
            QueueAction::Hold => "hold",
            QueueAction::Release => "release",
            QueueAction::Delete => "delete",
            QueueAction::Flush => "flush",
            QueueAction::Bounce => "bounce",
        }
    }
}

impl std::str::FromStr for QueueAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "hold" => QueueAction::Hold,
            "release" => QueueAction::Release,
            "delete" => QueueAction::Delete,
            "flush" => QueueAction::Flush,
            "bounce" => QueueAction::Bounce,
            _ => {
                return Err(format!(
                    "unknown queue action {s:?} (hold, release, delete, flush, bounce)"
                ))
            }
        })
    }
}

/// Which messages a [`QueueCommand`] applies to. In JSON exactly one of `{"ids": [...]}`, `{"all": true}`,
/// `{"domain": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SelectorWire", into = "SelectorWire")]
pub enum Selector {
    /// These queue IDs (IDs not in the queue are reported, not an error).
    Ids(Vec<QueueId>),
    /// Every queued message.
    All,
    /// Messages with an open recipient in this domain (the recipient's domain or its next hop's host, compared
    /// without case and without a trailing dot). For `flush` only those recipients are made due; the other
    /// actions apply to the whole message.
    Domain(String),
}

/// The JSON form of a [`Selector`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectorWire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ids: Option<Vec<QueueId>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    all: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    domain: Option<String>,
}

impl TryFrom<SelectorWire> for Selector {
    type Error = String;
    fn try_from(w: SelectorWire) -> Result<Self, String> {
        match (w.ids, w.all, w.domain) {
            (Some(ids), None, None) if !ids.is_empty() => {
                if ids.len() > limits::CONTROL_IDS_MAX {
                    return Err(format!("at most {} ids a request", limits::CONTROL_IDS_MAX));
                }
                Ok(Selector::Ids(ids))
            }
            (Some(_), None, None) => Err("\"ids\" is empty".into()),
            (None, Some(true), None) => Ok(Selector::All),
            (None, Some(false), None) => Err("\"all\" must be true".into()),
            (None, None, Some(d)) => {
                let d = d.trim().trim_end_matches('.').to_ascii_lowercase();
                if d.is_empty()
                    || d.len() > 255
                    || d.contains(|c: char| c.is_whitespace() || c == '@')
                {
                    return Err(format!("bad domain {d:?}"));
                }
                Ok(Selector::Domain(d))
            }
            _ => Err("give exactly one of \"ids\", \"all\": true, \"domain\"".into()),
        }
    }
}

impl From<Selector> for SelectorWire {
    fn from(s: Selector) -> Self {
        let mut w = SelectorWire {
            ids: None,
            all: None,
            domain: None,
        };
        match s {
            Selector::Ids(ids) => w.ids = Some(ids),
            Selector::All => w.all = Some(true),
            Selector::Domain(d) => w.domain = Some(d),
        }
        w
    }
}

/// One operator command: an action over a selection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueCommand {
    pub action: QueueAction,
    #[serde(flatten)]
    pub selector: Selector,
}

/// What a [`QueueCommand`] did. IDs are the 16-hex-digit queue IDs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueCommandReport {
    /// Messages the command changed (a durable record was written for each, and synced before this answer).
    pub changed: Vec<String>,
    /// Messages selected but already in the requested state (held and hold, not held and release, nothing
    /// deferred and flush).
    pub unchanged: Vec<String>,
    /// Requested IDs that are not in the queue (delivered, deleted, or never there).
    pub not_found: Vec<String>,
}

impl QueueCommandReport {
    /// Merges the answers of several shards (an ID is not found only if no shard had it).
    pub fn merge(reports: Vec<QueueCommandReport>, requested: Option<&[QueueId]>) -> Self {
        let mut out = QueueCommandReport::default();
        for r in reports {
            out.changed.extend(r.changed);
            out.unchanged.extend(r.unchanged);
        }
        out.changed.sort();
        out.unchanged.sort();
        if let Some(ids) = requested {
            // One set lookup per requested ID (up to CONTROL_IDS_MAX), not a scan of the answers.
            let found: std::collections::HashSet<&str> = out
                .changed
                .iter()
                .chain(&out.unchanged)
                .map(String::as_str)
                .collect();
            let mut missing: Vec<String> = ids
                .iter()
                .map(QueueId::to_string)
                .filter(|s| !found.contains(s.as_str()))
                .collect();
            missing.sort();
            missing.dedup();
            out.not_found = missing;
        }
        out
    }
}

/// A message handed over by the HTTP API, already built (RFC 5322 bytes, CRLF line ends).
#[derive(Clone, Debug)]
pub struct InjectMessage {
    pub envelope_sender: String,
    pub recipients: Vec<String>,
    pub content: Vec<u8>,
    /// The HTTP client's address (for the Received header and the log).
    pub client: IpAddr,
    /// The bearer token's name, if the client authenticated with one (as an AUTH user would).
    pub auth_user: Option<String>,
    /// The request's `pool` field: the egress pool (`crate::egress`), when given.
    pub pool: Option<String>,
}

/// A recipient refused at injection, with the reply SMTP would have given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedRecipient {
    pub recipient: String,
    pub reason: String,
}

/// The answer to an [`InjectMessage`]: queued (durably) for the accepted recipients, or not at all.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InjectReport {
    /// None when no recipient was accepted (nothing queued).
    pub queue_id: Option<String>,
    pub accepted: Vec<String>,
    pub refused: Vec<RefusedRecipient>,
}

/// One shard's answer to a health check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardHealth {
    pub shard: usize,
    /// It answered within the deadline.
    pub answered: bool,
    /// Its queue takes appends (not paused on a full disk, no failed sync).
    pub queue_writable: bool,
    pub pending_messages: u64,
}

/// The health of the whole server: healthy when every shard answered and every queue is writable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub healthy: bool,
    pub shards: Vec<ShardHealth>,
}

/// Why a control request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("no answer from shard {0} within {1:?} (the request may still take effect there)")]
    Timeout(usize, std::time::Duration),
    #[error("message of {size} bytes exceeds message_size_limit ({limit} bytes)")]
    TooLarge { size: u64, limit: u64 },
    #[error("{0}")]
    BadRequest(String),
    #[error("queue: {0}")]
    Queue(String),
}

/// A request to one shard, with the channel its answer goes back on.
pub enum ShardRequest {
    Queue {
        command: QueueCommand,
        answer: flume::Sender<Result<QueueCommandReport, ControlError>>,
    },
    Inject {
        message: Box<InjectMessage>,
        answer: flume::Sender<Result<InjectReport, ControlError>>,
    },
    Health {
        answer: flume::Sender<ShardHealth>,
    },
    /// End the backoff of the destinations this shard owns (those whose next hop is `host`, or all): sent to
    /// every shard before a flush, so flushed recipients are not deferred again by a destination's backoff.
    ClearBackoff {
        host: Option<String>,
        answer: flume::Sender<usize>,
    },
    /// The shaping automation's active actions of the sites this shard owns (`crate::shaping::automation`).
    ShapingStatus {
        answer: flume::Sender<Vec<crate::shaping::automation::Action>>,
    },
    /// End shaping action `id` if this shard holds it (answers whether it did).
    ShapingCancel {
        id: String,
        answer: flume::Sender<bool>,
    },
}

/// The receiving end a shard's control task reads.
pub type ShardRequests = flume::Receiver<ShardRequest>;

/// Carries control requests to the SMTP shards. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct ControlPlane {
    inner: Arc<PlaneInner>,
}

struct PlaneInner {
    shards: Vec<flume::Sender<ShardRequest>>,
    /// Round-robin for injections.
    next: AtomicUsize,
    queue_directory: PathBuf,
    /// Set to ask the main thread for a configuration reload (the flag SIGHUP sets).
    reload: Arc<AtomicBool>,
}

impl ControlPlane {
    /// A plane for `shards` SMTP shards; returns the receivers, one per shard, in shard order.
    pub fn new(
        shards: usize,
        queue_directory: &Path,
        reload: Arc<AtomicBool>,
    ) -> (ControlPlane, Vec<ShardRequests>) {
        let (tx, rx): (Vec<_>, Vec<_>) = (0..shards)
            .map(|_| flume::bounded(limits::CONTROL_REQUESTS_QUEUED_MAX))
            .unzip();
        (
            ControlPlane {
                inner: Arc::new(PlaneInner {
                    shards: tx,
                    next: AtomicUsize::new(0),
                    queue_directory: queue_directory.to_path_buf(),
                    reload,
                }),
            },
            rx,
        )
    }

    /// The spool (for reads that need no shard: `queue list`).
    pub fn queue_directory(&self) -> &Path {
        &self.inner.queue_directory
    }

    /// Number of SMTP shards.
    pub fn shards(&self) -> usize {
        self.inner.shards.len()
    }

    /// Asks the main thread to reload the configuration (as SIGHUP does); it happens within its next poll.
    pub fn request_reload(&self) {
        self.inner.reload.store(true, Ordering::SeqCst);
    }

    /// Sends `req` to shard `shard` and waits for its answer on `rx`, both within the deadline.
    async fn ask<T>(
        &self,
        shard: usize,
        req: ShardRequest,
        rx: flume::Receiver<T>,
    ) -> Result<T, ControlError> {
        self.ask_within(shard, req, rx, limits::CONTROL_ANSWER_TIMEOUT)
            .await
    }

    async fn ask_within<T>(
        &self,
        shard: usize,
        req: ShardRequest,
        rx: flume::Receiver<T>,
        deadline: std::time::Duration,
    ) -> Result<T, ControlError> {
        let tx = &self.inner.shards[shard];
        let work = async {
            tx.send_async(req)
                .await
                .map_err(|_| ControlError::ShuttingDown)?;
            rx.recv_async()
                .await
                .map_err(|_| ControlError::ShuttingDown)
        };
        match glommio::timer::timeout(deadline, async { Ok(work.await) }).await {
            Ok(r) => r,
            Err(_) => Err(ControlError::Timeout(shard, deadline)),
        }
    }

    /// Applies `command` on every shard (each owns its own messages); answers once every change is durable.
    pub async fn queue_command(
        &self,
        command: QueueCommand,
    ) -> Result<QueueCommandReport, ControlError> {
        if command.action == QueueAction::Flush {
            // Every owner first: a flushed recipient may go to any shard's destination.
            let host = match &command.selector {
                Selector::Domain(d) => Some(d.clone()),
                _ => None,
            };
            for shard in 0..self.shards() {
                let (answer, rx) = flume::bounded(1);
                let req = ShardRequest::ClearBackoff {
                    host: host.clone(),
                    answer,
                };
                self.ask(shard, req, rx).await?;
            }
        }
        let mut reports = Vec::with_capacity(self.shards());
        for shard in 0..self.shards() {
            let (answer, rx) = flume::bounded(1);
            let req = ShardRequest::Queue {
                command: command.clone(),
                answer,
            };
            reports.push(self.ask(shard, req, rx).await??);
        }
        let ids = match &command.selector {
            Selector::Ids(ids) => Some(ids.as_slice()),
            _ => None,
        };
        Ok(QueueCommandReport::merge(reports, ids))
    }

    /// Queues `message` on one shard (round-robin); answers once it is durable.
    pub async fn inject(&self, message: InjectMessage) -> Result<InjectReport, ControlError> {
        let shard = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.shards().max(1);
        let (answer, rx) = flume::bounded(1);
        let req = ShardRequest::Inject {
            message: Box::new(message),
            answer,
        };
        self.ask(shard, req, rx).await?
    }

    /// Every shard's active shaping actions, oldest first.
    pub async fn shaping_status(
        &self,
    ) -> Result<Vec<crate::shaping::automation::Action>, ControlError> {
        let mut out = Vec::new();
        for shard in 0..self.shards() {
            let (answer, rx) = flume::bounded(1);
            out.extend(
                self.ask(shard, ShardRequest::ShapingStatus { answer }, rx)
                    .await?,
            );
        }
        out.sort_by(|a, b| {
            a.since_unix_ms
                .cmp(&b.since_unix_ms)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(out)
    }

    /// Ends shaping action `id` on whichever shard holds it; answers whether one did.
    pub async fn shaping_cancel(&self, id: &str) -> Result<bool, ControlError> {
        let mut found = false;
        for shard in 0..self.shards() {
            let (answer, rx) = flume::bounded(1);
            let req = ShardRequest::ShapingCancel {
                id: id.to_string(),
                answer,
            };
            found |= self.ask(shard, req, rx).await?;
        }
        Ok(found)
    }

    /// Asks every shard; a shard that does not answer in time is reported unhealthy.
    pub async fn health(&self) -> Health {
        // All shards at once, each within HEALTH_ANSWER_TIMEOUT: a stuck shard makes the answer 503 in
        // seconds, not CONTROL_ANSWER_TIMEOUT per stuck shard (a probe gives up long before).
        let asks: Vec<_> = (0..self.shards())
            .map(|shard| {
                let me = self.clone();
                glommio::spawn_local(async move {
                    let (answer, rx) = flume::bounded(1);
                    let req = ShardRequest::Health { answer };
                    me.ask_within(shard, req, rx, limits::HEALTH_ANSWER_TIMEOUT)
                        .await
                })
            })
            .collect();
        let mut shards = Vec::with_capacity(asks.len());
        for (shard, ask) in asks.into_iter().enumerate() {
            let h = match ask.await {
                Ok(h) => h,
                Err(_) => ShardHealth {
                    shard,
                    answered: false,
                    queue_writable: false,
                    pending_messages: 0,
                },
            };
            shards.push(h);
        }
        Health {
            healthy: shards.iter().all(|s| s.answered && s.queue_writable),
            shards,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_answers_quickly_when_shards_are_stuck() {
        let (plane, requests) = ControlPlane::new(3, Path::new("/nonexistent"), Arc::default());
        glommio::LocalExecutor::default().run(async move {
            // Shard 1 answers; shards 0 and 2 never take their requests (stuck reactors).
            let answering = requests[1].clone();
            glommio::spawn_local(async move {
                while let Ok(r) = answering.recv_async().await {
                    if let ShardRequest::Health { answer } = r {
                        let _ = answer.try_send(ShardHealth {
                            shard: 1,
                            answered: true,
                            queue_writable: true,
                            pending_messages: 0,
                        });
                    }
                }
            })
            .detach();
            let started = std::time::Instant::now();
            let h = plane.health().await;
            let took = started.elapsed();
            assert!(!h.healthy);
            assert_eq!(
                h.shards.iter().map(|s| s.answered).collect::<Vec<_>>(),
                [false, true, false]
            );
            assert!(
                took < limits::HEALTH_ANSWER_TIMEOUT * 2,
                "/health took {took:?} with two stuck shards"
            );
            drop(requests);
        });
    }

    #[test]
    fn actions_parse_and_print() {
        for a in ["hold", "release", "delete", "flush", "bounce"] {
            assert_eq!(a.parse::<QueueAction>().unwrap().name(), a);
        }
        assert!("requeue".parse::<QueueAction>().is_err());
    }

    #[test]
    fn command_json_shape() {
        let c = QueueCommand {
            action: QueueAction::Hold,
            selector: Selector::Ids(vec![QueueId(0x6543_2100_07AB_CDEF)]),
        };
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(j, r#"{"action":"hold","ids":["6543210007ABCDEF"]}"#);
        assert_eq!(serde_json::from_str::<QueueCommand>(&j).unwrap(), c);
        let d: QueueCommand =
            serde_json::from_str(r#"{"action":"flush","domain":"example.com"}"#).unwrap();
        assert_eq!(d.selector, Selector::Domain("example.com".into()));
        let a: QueueCommand = serde_json::from_str(r#"{"action":"delete","all":true}"#).unwrap();
        assert_eq!(a.selector, Selector::All);
        for bad in [
            r#"{"action":"delete"}"#,
            r#"{"action":"delete","all":false}"#,
            r#"{"action":"delete","ids":[]}"#,
            r#"{"action":"delete","all":true,"domain":"x"}"#,
            r#"{"action":"delete","ids":["12"]}"#,
            r#"{"action":"delete","domain":"a b"}"#,
            r#"{"action":"nuke","all":true}"#,
        ] {
            assert!(serde_json::from_str::<QueueCommand>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reports_merge_and_name_missing_ids() {
        let a = QueueId(1);
        let b = QueueId(2);
        let r = QueueCommandReport::merge(
            vec![
                QueueCommandReport {
                    changed: vec![a.to_string()],
                    ..Default::default()
                },
                QueueCommandReport::default(),
            ],
            Some(&[a, b]),
        );
        assert_eq!(r.changed, vec![a.to_string()]);
        assert_eq!(r.not_found, vec![b.to_string()]);
    }
}
