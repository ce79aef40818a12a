//! The local-delivery shard: one glommio executor (not pinned; it mostly waits on the disk) that owns every
//! Maildir write, so that file-system work never stalls an SMTP shard. Accepting shards send it jobs over the
//! shard mesh like any destination owner; it sends each job's [`Outcome`] back to the accepting shard, which
//! records it. A recipient is reported delivered only after its file was synced, renamed into new/ and new/
//! itself synced.
//!
//! Group commit: jobs that arrive while a batch is on the disk form the next batch (at most
//! [`BATCH_RCPTS_MAX`] recipients). In a batch every file is written to tmp/ and all their `fdatasync`s are in
//! flight together on io_uring (at most [`WRITES_IN_FLIGHT_MAX`]), so the file system commits them in a few
//! journal transactions; then all renames; then one `fsync` per distinct new/ directory, also concurrently.
//!
//! Bounds: [`JOB_QUEUE_MAX`] jobs wait in the shard's channel (senders wait beyond that); the set of Maildirs
//! known to exist holds at most [`MAILDIR_CACHE_MAX`] paths (then it is cleared).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use glommio::channels::local_channel::LocalReceiver;

use super::maildir::{self, MailboxLayout};
use super::recipients::{valid_mailbox_name, RecipientMaps, RecipientTable};
use crate::config::Config;
use crate::delivery::log::{DeliveryLog, LogLine};
use crate::delivery::{Job, Outcome, RcptResult};

/// Most recipients in one batch.
pub const BATCH_RCPTS_MAX: usize = 512;
/// Most file writes (open, write, fdatasync, close) in flight at once.
pub const WRITES_IN_FLIGHT_MAX: usize = 256;
/// Jobs waiting for the local shard.
pub const JOB_QUEUE_MAX: usize = 4096;
/// Maildirs remembered as existing.
pub const MAILDIR_CACHE_MAX: usize = 100_000;
/// How often an idle shard looks at the shutdown flag.
const TICK: Duration = Duration::from_millis(100);

/// Counters of the local shard (written by it only; read for stats.json).
#[derive(Debug, Default)]
pub struct LocalStats {
    pub delivered: AtomicU64,
    pub deferred: AtomicU64,
    pub bounced: AtomicU64,
    pub batches: AtomicU64,
    /// `fdatasync` of delivered files.
    pub file_syncs: AtomicU64,
    /// `fsync` of new/ directories.
    pub dir_syncs: AtomicU64,
}

type OutcomeSink = Box<dyn Fn(usize, Outcome)>;

pub struct LocalDelivery {
    cfg: Arc<Config>,
    table: Arc<RecipientTable>,
    layout: MailboxLayout,
    known_maildirs: RefCell<HashSet<PathBuf>>,
    stats: Arc<LocalStats>,
    log: Rc<DeliveryLog>,
    send_outcome: OutcomeSink,
}

/// A file to write: (item index, tmp/ path, content, owner).
type FileWrite = (usize, PathBuf, Vec<u8>, Option<(u32, u32)>);

/// One recipient in a batch.
struct Item {
    job: usize,
    index: u32,
    new_dir: PathBuf,
    name: String,
    result: Option<RcptResult>,
}

fn unix_now_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl LocalDelivery {
    pub fn new(
        cfg: Arc<Config>,
        table: Arc<RecipientTable>,
        stats: Arc<LocalStats>,
        log: Rc<DeliveryLog>,
        send_outcome: OutcomeSink,
    ) -> Rc<LocalDelivery> {
        let layout = MailboxLayout::new(&cfg.local.mailbox_path, &cfg.queue_directory);
        Rc::new(LocalDelivery {
            cfg,
            table,
            layout,
            known_maildirs: RefCell::new(HashSet::new()),
            stats,
            log,
            send_outcome,
        })
    }

    /// Takes batches from `jobs` until the channel closes or `shutdown` is set (the batch on the disk is
    /// finished first).
    pub async fn run(self: Rc<Self>, jobs: LocalReceiver<Job>, shutdown: Arc<AtomicBool>) {
        loop {
            let first = futures_lite::future::or(async { Ok(jobs.recv().await) }, async {
                glommio::timer::sleep(TICK).await;
                Err(())
            })
            .await;
            let mut batch = match first {
                Ok(Some(job)) => vec![job],
                Ok(None) => return,
                Err(()) if shutdown.load(Ordering::Relaxed) => return,
                Err(()) => continue,
            };
            let mut rcpts = batch[0].rcpts.len();
            while rcpts < BATCH_RCPTS_MAX {
                match futures_lite::future::poll_once(jobs.recv()).await {
                    Some(Some(job)) => {
                        rcpts += job.rcpts.len();
                        batch.push(job);
                    }
                    _ => break,
                }
            }
            self.deliver(batch).await;
            self.log.flush().await;
        }
    }

    /// Delivers one batch and sends every job's outcome.
    pub async fn deliver(&self, jobs: Vec<Job>) {
        let maps = self.table.snapshot();
        let mut items = Vec::with_capacity(jobs.iter().map(|j| j.rcpts.len()).sum());
        let mut writes: Vec<FileWrite> = Vec::new();
        for (j, job) in jobs.iter().enumerate() {
            let header = maildir::header_section(job.body.data());
            for r in &job.rcpts {
                let mut item = Item {
                    job: j,
                    index: r.index,
                    new_dir: PathBuf::new(),
                    name: String::new(),
                    result: None,
                };
                match self.prepare(&maps, job, &r.address, header) {
                    Ok((maildir, owner)) => {
                        let content = maildir::content(
                            &job.sender,
                            &r.address,
                            job.body.received(),
                            job.body.data(),
                        );
                        item.name = maildir::file_name(
                            job.arrival_unix_ms / 1000,
                            job.id,
                            r.index,
                            &self.cfg.myhostname,
                            content.len(),
                        );
                        item.new_dir = maildir.join("new");
                        writes.push((
                            items.len(),
                            maildir.join("tmp").join(&item.name),
                            content,
                            owner,
                        ));
                    }
                    Err(result) => item.result = Some(result),
                }
                items.push(item);
            }
        }
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        // 1. Write and fdatasync every file in tmp/, concurrently.
        let mut tmp_paths: HashMap<usize, PathBuf> = HashMap::with_capacity(writes.len());
        let mut pending = writes.into_iter().peekable();
        while pending.peek().is_some() {
            let tasks: Vec<_> = pending
                .by_ref()
                .take(WRITES_IN_FLIGHT_MAX)
                .map(|(i, path, content, owner)| {
                    tmp_paths.insert(i, path.clone());
                    let t = glommio::spawn_local(write_synced(path.clone(), content, owner));
                    (i, path, t)
                })
                .collect();
            for (i, path, t) in tasks {
                let r = t.await;
                self.stats.file_syncs.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = r {
                    let _ = std::fs::remove_file(&path);
                    items[i].result = Some(RcptResult::Deferred {
                        reply: maildir::defer_reply("write", &path, &e),
                    });
                }
            }
        }
        // 2. Rename into new/ (each file is complete and synced).
        let mut dirs: HashMap<PathBuf, Vec<usize>> = HashMap::new();
        for (i, item) in items.iter_mut().enumerate() {
            if item.result.is_some() {
                continue;
            }
            let Some(tmp) = tmp_paths.get(&i) else {
                continue;
            };
            let new = item.new_dir.join(&item.name);
            match std::fs::rename(tmp, &new) {
                Ok(()) => dirs.entry(item.new_dir.clone()).or_default().push(i),
                Err(e) => {
                    let _ = std::fs::remove_file(tmp);
                    item.result = Some(RcptResult::Deferred {
                        reply: maildir::defer_reply("rename into", &new, &e),
                    });
                }
            }
        }
        // 3. Sync each new/ directory once, concurrently; only then are its files delivered.
        let syncs: Vec<_> = dirs
            .into_iter()
            .map(|(dir, members)| (glommio::spawn_local(sync_dir(dir.clone())), dir, members))
            .collect();
        for (t, dir, members) in syncs {
            let r = t.await;
            self.stats.dir_syncs.fetch_add(1, Ordering::Relaxed);
            for i in members {
                let item = &mut items[i];
                item.result = Some(match &r {
                    Ok(()) => RcptResult::Delivered {
                        reply: format!("250 2.0.0 delivered to maildir {}", dir.display()),
                    },
                    // The file is in new/ but not known durable: deferred. The retry writes the same name, so a
                    // reader never sees two copies.
                    Err(e) => RcptResult::Deferred {
                        reply: maildir::defer_reply("sync", &dir, e),
                    },
                });
            }
        }
        self.report(&jobs, items);
    }

    /// The Maildir and owner for one recipient, with the Maildir created; or the result that ends it here.
    fn prepare(
        &self,
        maps: &RecipientMaps,
        job: &Job,
        rcpt: &str,
        header: &[u8],
    ) -> Result<(PathBuf, Option<(u32, u32)>), RcptResult> {
        let limit = self.cfg.local.delivered_to_limit as usize;
        if maildir::delivered_to_count(header, rcpt) >= limit {
            return Err(RcptResult::Bounced {
                reply: format!(
                    "554 5.4.6 mail forwarding loop for {rcpt}: message already has Delivered-To: {rcpt}"
                ),
                status: (5, 4, 6),
            });
        }
        let (local, domain) = rcpt.rsplit_once('@').unwrap_or((rcpt, ""));
        let user = maps.strip_extension(local).to_lowercase();
        if !valid_mailbox_name(&user) {
            return Err(RcptResult::Bounced {
                reply: format!("550 5.1.3 {rcpt}: not a valid local mailbox name"),
                status: (5, 1, 3),
            });
        }
        let account = maps.account(&user);
        // Owner: the configured uid/gid, else (when running as root) the system account's.
        let owner = match (self.cfg.local.mailbox_uid, self.cfg.local.mailbox_gid) {
            (None, None) => account
                .filter(|_| current_uid() == 0)
                .map(|a| (a.uid, a.gid)),
            (uid, gid) => Some((
                uid.or(account.map(|a| a.uid)).unwrap_or_else(current_uid),
                gid.or(account.map(|a| a.gid)).unwrap_or_else(current_gid),
            )),
        };
        let md = self
            .layout
            .maildir(&user, domain, account)
            .map_err(|e| RcptResult::Deferred {
                reply: format!("451 4.3.0 {rcpt}: {e}"),
            })?;
        if !self.known_maildirs.borrow().contains(&md) {
            maildir::ensure_maildir(&md, owner).map_err(|e| RcptResult::Deferred {
                reply: maildir::defer_reply("create Maildir", &md, &e),
            })?;
            let mut known = self.known_maildirs.borrow_mut();
            if known.len() >= MAILDIR_CACHE_MAX {
                known.clear();
            }
            known.insert(md.clone());
        }
        debug_assert!(job.rcpts.iter().any(|r| r.address == rcpt));
        Ok((md, owner))
    }

    /// Counts, logs and sends each job's results to its accepting shard.
    fn report(&self, jobs: &[Job], items: Vec<Item>) {
        let now = unix_now_f64();
        let mut per_job: Vec<Vec<(u32, RcptResult)>> = jobs.iter().map(|_| Vec::new()).collect();
        for item in items {
            let result = item.result.unwrap_or_else(|| RcptResult::Deferred {
                reply: "451 4.3.0 local delivery did not finish".into(),
            });
            let counter = match &result {
                RcptResult::Delivered { .. } => &self.stats.delivered,
                RcptResult::Deferred { .. } => {
                    // A Maildir that failed may have been removed or changed: look again next time.
                    self.known_maildirs.borrow_mut().clear();
                    &self.stats.deferred
                }
                RcptResult::Bounced { .. } => &self.stats.bounced,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            per_job[item.job].push((item.index, result));
        }
        for (job, results) in jobs.iter().zip(per_job) {
            for (idx, r) in &results {
                let Some(rc) = job.rcpts.iter().find(|x| x.index == *idx) else {
                    continue;
                };
                self.log.record(&LogLine {
                    ts: now,
                    queue_id: job.id.to_string(),
                    rcpt: &rc.address,
                    result: match r {
                        RcptResult::Delivered { .. } => "delivered",
                        RcptResult::Deferred { .. } => "deferred",
                        RcptResult::Bounced { .. } => "bounced",
                    },
                    destination: "local",
                    host: None,
                    ip: None,
                    tls: None,
                    reply: r.reply(),
                    delay_s: (now - job.arrival_unix_ms as f64 / 1000.0).max(0.0),
                    attempt: rc.attempts + 1,
                });
            }
            (self.send_outcome)(
                job.origin_shard,
                Outcome {
                    id: job.id,
                    results,
                    remote: None,
                },
            );
        }
    }
}

fn current_uid() -> u32 {
    // SAFETY: getuid cannot fail and has no preconditions.
    unsafe { libc::getuid() }
}

fn current_gid() -> u32 {
    // SAFETY: getgid cannot fail and has no preconditions.
    unsafe { libc::getgid() }
}

/// Writes `content` to a new file at `path` (replacing a leftover of an earlier attempt), hands it to `owner`
/// and syncs it: open, write, fchown, fdatasync and close, all but fchown on io_uring.
async fn write_synced(
    path: PathBuf,
    content: Vec<u8>,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    let f = glommio::io::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(maildir::FILE_MODE)
        .buffered_open(&path)
        .await?;
    let len = content.len();
    let n = f.write_at(content, 0).await?;
    if n < len {
        // A short write on a regular file means the next write fails with the reason (usually ENOSPC).
        f.write_at(vec![b'\n'], n as u64).await?;
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
    }
    if let Some((uid, gid)) = owner {
        // SAFETY: the descriptor is open for the lifetime of `f`.
        if unsafe { libc::fchown(f.as_raw_fd(), uid, gid) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    f.fdatasync().await?;
    f.close().await?;
    Ok(())
}

async fn sync_dir(dir: PathBuf) -> io::Result<()> {
    let d = glommio::io::Directory::open(&dir).await?;
    d.sync().await?;
    d.close().await?;
    Ok(())
}
