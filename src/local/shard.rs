//! The local-delivery shard: one glommio executor (not pinned; it mostly waits on the disk) that owns every
//! Maildir write, so that file-system work never stalls an SMTP shard. Accepting shards send it jobs over the
//! shard mesh like any destination owner; it sends each job's [`Outcome`] back to the accepting shard, which
//! records it. A recipient is reported delivered only after its file was synced, renamed into new/ and new/
//! itself synced.
//!
//! Group commit: the jobs waiting in the channel form a batch (at most [`limits::LOCAL_BATCH_RECIPIENTS_MAX`] recipients), and up
//! to [`limits::LOCAL_BATCHES_IN_FLIGHT_MAX`] batches are on the disk at once. In a batch every file is created and written into
//! tmp/ by [`limits::LOCAL_WRITER_THREADS_COUNT`] helper threads; with `sync_method = "file"` all their `fdatasync`s then run at
//! once on the shard's [`limits::LOCAL_SYNC_THREADS_COUNT`] helper threads (at most [`limits::LOCAL_WRITES_IN_FLIGHT_MAX`] queued), so the file
//! system folds them into a few journal commits; then all renames; then one `fsync` per distinct new/
//! directory, also concurrently. (Through io_uring, whose worker pool by default runs at most 4 blocking file
//! operations per CPU at a time, the same batches drained at 3,300-3,700 msgs/s instead of 4,000-4,100.)
//! With `sync_method = "filesystem"` the two sync steps are one `syncfs` per file system each.
//!
//! Each distinct Maildir of a batch is opened once, on the helper threads, by [`safe_path::open_maildir`]
//! (the symlink-safe walk, creating what is missing); its directory descriptors are shared (`Arc`) by the
//! batch's writes, renames and syncs, which are all relative to them. A root server does every operation
//! inside a Maildir as its owner ([`fsid::as_owner`], one switch per run of files of the same owner on a
//! thread), so the files are the owner's by creation.
//!
//! Bounds: [`limits::LOCAL_JOBS_QUEUED_MAX`] jobs wait in the shard's channel (senders wait beyond that); a batch holds three
//! descriptors per distinct Maildir (at most [`limits::LOCAL_BATCH_RECIPIENTS_MAX`] Maildirs) until it is done.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use glommio::channels::local_channel::LocalReceiver;

use super::fsid::{self, Ident};
use super::maildir::{self, MailboxLayout};
use super::recipients::{valid_mailbox_name, RecipientMaps, RecipientTable};
use super::safe_path::{self, OpenMaildir};
use crate::config::{Config, LocalSync};
use crate::delivery::log::DeliveryLog;
use crate::delivery::{Job, Outcome, RcptResult};
use crate::limits;

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
    /// `syncfs` calls (sync_method = "filesystem").
    pub fs_syncs: AtomicU64,
}

pub struct LocalDelivery {
    cfg: Arc<Config>,
    table: Arc<RecipientTable>,
    layout: MailboxLayout,
    stats: Arc<LocalStats>,
    log: Rc<DeliveryLog>,
    /// Outcomes for their accepting shards (taken by this shard's outcome courier).
    send_outcome: Rc<crate::shard::mesh::Outbox<Outcome>>,
}

/// Owner of a Maildir and what is delivered into it (None: the server itself).
type Owner = Option<Ident>;

/// A Maildir a batch needs: its path and owner.
type MaildirKey = (PathBuf, Owner);
/// A Maildir opened for a batch, or the deferral reply.
type Opened = Result<Arc<OpenMaildir>, String>;

/// A file to write: (item index, content).
type FileWrite = (usize, Vec<u8>);
/// The same with its Maildir and name, for a writer thread.
type FdWrite = (usize, Arc<OpenMaildir>, CString, Vec<u8>);

/// One recipient in a batch.
struct Item {
    job: usize,
    index: u32,
    /// The recipient's Maildir, once opened.
    md: Option<Arc<OpenMaildir>>,
    /// The file's name in tmp/ and new/.
    name: CString,
    result: Option<RcptResult>,
}

impl Item {
    /// The file's path in tmp/, for replies.
    fn tmp_path(&self) -> PathBuf {
        self.md
            .as_ref()
            .map(|md| md.tmp_path(&self.name))
            .unwrap_or_default()
    }

    /// The identity its Maildir is written with.
    fn acting(&self) -> Option<Ident> {
        self.md.as_ref().and_then(|md| md.acting)
    }

    /// Removes its file from tmp/ (as the Maildir's owner); a failure leaves it for the retry to replace.
    fn discard_tmp(&self) {
        if let Some(md) = &self.md {
            let _ = fsid::as_owner(md.acting, || safe_path::unlink(md.tmp.as_fd(), &self.name));
        }
    }

    fn defer(&mut self, reply: String) {
        self.result = Some(RcptResult::Deferred { reply });
    }
}

impl LocalDelivery {
    pub fn new(
        cfg: Arc<Config>,
        table: Arc<RecipientTable>,
        stats: Arc<LocalStats>,
        log: Rc<DeliveryLog>,
        send_outcome: Rc<crate::shard::mesh::Outbox<Outcome>>,
    ) -> Rc<LocalDelivery> {
        let layout = MailboxLayout::new(&cfg.local.mailbox_path, &cfg.queue_directory);
        Rc::new(LocalDelivery {
            cfg,
            table,
            layout,
            stats,
            log,
            send_outcome,
        })
    }

    /// Takes batches from `jobs` until the channel closes or `shutdown` is set, with up to
    /// [`limits::LOCAL_BATCHES_IN_FLIGHT_MAX`] batches on the disk at once (their syncs overlap, so the file system commits
    /// more of them together); the batches on the disk are finished first.
    pub async fn run(self: Rc<Self>, jobs: LocalReceiver<Job>, shutdown: Arc<AtomicBool>) {
        let slots = Rc::new(glommio::sync::Semaphore::new(
            limits::LOCAL_BATCHES_IN_FLIGHT_MAX as u64,
        ));
        loop {
            let first = futures_lite::future::or(async { Ok(jobs.recv().await) }, async {
                glommio::timer::sleep(limits::LOCAL_TICK_INTERVAL).await;
                Err(())
            })
            .await;
            let mut batch = match first {
                Ok(Some(job)) => vec![job],
                Ok(None) => break,
                Err(()) if shutdown.load(Ordering::Relaxed) => break,
                Err(()) => continue,
            };
            let mut rcpts = batch[0].rcpts.len();
            while rcpts < limits::LOCAL_BATCH_RECIPIENTS_MAX {
                match futures_lite::future::poll_once(jobs.recv()).await {
                    Some(Some(job)) => {
                        rcpts += job.rcpts.len();
                        batch.push(job);
                    }
                    _ => break,
                }
            }
            let Ok(slot) = slots.acquire_static_permit(1).await else {
                break;
            };
            let me = self.clone();
            glommio::spawn_local(async move {
                me.deliver(batch).await;
                me.log.flush().await;
                drop(slot);
            })
            .detach();
        }
        let _ = slots
            .acquire(limits::LOCAL_BATCHES_IN_FLIGHT_MAX as u64)
            .await;
    }

    /// Delivers one batch and sends every job's outcome: (1) every file written to tmp/ and made durable,
    /// (2) renamed into new/, (3) new/ made durable; only then is a recipient delivered.
    pub async fn deliver(&self, jobs: Vec<Job>) {
        let (mut items, writes) = self.prepare_batch(&jobs).await;
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        let files = self.write_files(&mut items, writes).await;
        match self.cfg.local.sync_method {
            LocalSync::File => self.sync_files(&mut items, files).await,
            LocalSync::Filesystem => {
                drop(files);
                self.sync_filesystems(&mut items, "sync files in").await;
            }
        }
        let dirs = rename_into_new(&mut items);
        match self.cfg.local.sync_method {
            LocalSync::File => self.sync_dirs(&mut items, dirs).await,
            LocalSync::Filesystem => self.sync_filesystems(&mut items, "sync").await,
        }
        for item in items.iter_mut().filter(|i| i.result.is_none()) {
            let path = item.md.as_ref().map(|md| md.path.display().to_string());
            item.result = Some(RcptResult::Delivered {
                reply: format!(
                    "250 2.0.0 delivered to maildir {}",
                    path.unwrap_or_default()
                ),
            });
        }
        self.report(&jobs, items);
    }

    /// One item per recipient, with its Maildir opened (each distinct one once); the file content for those
    /// that get one.
    async fn prepare_batch(&self, jobs: &[Job]) -> (Vec<Item>, Vec<FileWrite>) {
        let n = jobs.iter().map(|j| j.rcpts.len()).sum();
        let mut items = Vec::with_capacity(n);
        // (item, recipient, index into keys) of the items that have a Maildir to go to.
        let mut wanted: Vec<(usize, &str, usize)> = Vec::with_capacity(n);
        let mut keys: Vec<MaildirKey> = Vec::new();
        {
            let maps = self.table.snapshot();
            let mut slots: HashMap<MaildirKey, usize> = HashMap::new();
            for (j, job) in jobs.iter().enumerate() {
                let header = maildir::header_section(job.body.data());
                for r in &job.rcpts {
                    let mut item = Item {
                        job: j,
                        index: r.index,
                        md: None,
                        name: CString::default(),
                        result: None,
                    };
                    match self.prepare(&maps, &r.address, header) {
                        Ok(key) => {
                            let next = keys.len();
                            let slot = *slots.entry(key).or_insert_with_key(|k| {
                                keys.push(k.clone());
                                next
                            });
                            wanted.push((items.len(), r.address.as_str(), slot));
                        }
                        Err(result) => item.result = Some(result),
                    }
                    items.push(item);
                }
            }
        }
        let opened = open_maildirs(keys).await;
        let mut writes: Vec<FileWrite> = Vec::with_capacity(wanted.len());
        for (i, rcpt, slot) in wanted {
            let item = &mut items[i];
            let md = match opened.get(slot) {
                Some(Ok(md)) => md.clone(),
                Some(Err(reply)) => {
                    item.defer(reply.clone());
                    continue;
                }
                None => {
                    item.defer("451 4.3.0 Maildir not opened".into());
                    continue;
                }
            };
            let job = &jobs[item.job];
            let content = maildir::content(&job.sender, rcpt, job.body.received(), job.body.data());
            let name = maildir::file_name(
                job.arrival_unix_ms / 1000,
                job.id,
                item.index,
                &self.cfg.myhostname,
                content.len(),
            );
            match CString::new(name) {
                Ok(name) => item.name = name,
                Err(_) => {
                    item.defer(format!(
                        "451 4.3.0 the Maildir file name for {rcpt} contains a NUL byte"
                    ));
                    continue;
                }
            }
            item.md = Some(md);
            writes.push((i, content));
        }
        (items, writes)
    }

    /// Writes the batch's files into tmp/ on the helper threads, split in [`limits::LOCAL_WRITER_THREADS_COUNT`] parts (creating
    /// files is kernel CPU work, so more than one core helps); returns the open files. A failed write defers
    /// its recipient and removes the partial file.
    async fn write_files(
        &self,
        items: &mut [Item],
        mut writes: Vec<FileWrite>,
    ) -> Vec<(usize, File)> {
        // Files of the same owner next to each other: a thread switches identity once per run.
        writes.sort_by_key(|(i, _)| items[*i].acting());
        let per_part = writes
            .len()
            .div_ceil(limits::LOCAL_WRITER_THREADS_COUNT)
            .max(1);
        let mut parts: Vec<Vec<FdWrite>> = Vec::with_capacity(limits::LOCAL_WRITER_THREADS_COUNT);
        for (n, (i, content)) in writes.into_iter().enumerate() {
            if n % per_part == 0 {
                parts.push(Vec::with_capacity(per_part));
            }
            if let (Some(p), Some(md)) = (parts.last_mut(), &items[i].md) {
                p.push((i, md.clone(), items[i].name.clone(), content));
            }
        }
        let tasks: Vec<_> = parts
            .into_iter()
            .map(|part| glommio::executor().spawn_blocking(move || write_part(part)))
            .collect();
        let mut files = Vec::with_capacity(items.len());
        for t in tasks {
            for (i, r) in t.await {
                match r {
                    Ok(f) => files.push((i, f)),
                    Err(e) => {
                        let item = &mut items[i];
                        item.discard_tmp();
                        let reply = maildir::defer_reply("write", &item.tmp_path(), &e);
                        item.defer(reply);
                    }
                }
            }
        }
        files
    }

    /// `sync_method = "file"`: an fdatasync per file on the helper threads, [`limits::LOCAL_WRITES_IN_FLIGHT_MAX`] queued at
    /// once (the file is closed when its sync returns).
    async fn sync_files(&self, items: &mut [Item], files: Vec<(usize, File)>) {
        let mut pending = files.into_iter().peekable();
        while pending.peek().is_some() {
            let tasks: Vec<_> = pending
                .by_ref()
                .take(limits::LOCAL_WRITES_IN_FLIGHT_MAX)
                .map(|(i, f)| (i, glommio::executor().spawn_blocking(move || f.sync_data())))
                .collect();
            for (i, t) in tasks {
                let r = t.await;
                self.stats.file_syncs.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = r {
                    let item = &mut items[i];
                    item.discard_tmp();
                    let reply = maildir::defer_reply("sync", &item.tmp_path(), &e);
                    item.defer(reply);
                }
            }
        }
    }

    /// `sync_method = "filesystem"`: one syncfs(2) per file system the batch wrote to, all at once on the
    /// helper threads; a failure defers every recipient on that file system.
    async fn sync_filesystems(&self, items: &mut [Item], what: &str) {
        let mut devs: HashMap<u64, Arc<OpenMaildir>> = HashMap::new();
        for item in items.iter().filter(|i| i.result.is_none()) {
            if let Some(md) = &item.md {
                devs.entry(md.dev).or_insert_with(|| md.clone());
            }
        }
        let tasks: Vec<_> = devs
            .into_iter()
            .map(|(dev, md)| {
                let dir = md.new_path();
                let t =
                    glommio::executor().spawn_blocking(move || safe_path::syncfs(md.dir.as_fd()));
                (dev, dir, t)
            })
            .collect();
        for (dev, dir, t) in tasks {
            let r = t.await;
            self.stats.fs_syncs.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = r {
                for item in items
                    .iter_mut()
                    .filter(|i| i.result.is_none() && i.md.as_ref().is_some_and(|md| md.dev == dev))
                {
                    item.discard_tmp();
                    item.defer(maildir::defer_reply(what, &dir, &e));
                }
            }
        }
    }

    /// `sync_method = "file"`: each new/ directory synced once (through the descriptor the walk opened),
    /// concurrently.
    async fn sync_dirs(&self, items: &mut [Item], dirs: Vec<(Arc<OpenMaildir>, Vec<usize>)>) {
        let syncs: Vec<_> = dirs
            .into_iter()
            .map(|(md, members)| {
                let dir = md.new_path();
                let t =
                    glommio::executor().spawn_blocking(move || safe_path::fsync(md.new.as_fd()));
                (t, dir, members)
            })
            .collect();
        for (t, dir, members) in syncs {
            let r = t.await;
            self.stats.dir_syncs.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = r {
                for i in members {
                    // The file is in new/ but not known durable: deferred. The retry writes the same name, so
                    // a reader never sees two copies.
                    items[i].result = Some(RcptResult::Deferred {
                        reply: maildir::defer_reply("sync", &dir, &e),
                    });
                }
            }
        }
    }

    /// The Maildir and its owner for one recipient; or the result that ends it here.
    fn prepare(
        &self,
        maps: &RecipientMaps,
        rcpt: &str,
        header: &[u8],
    ) -> Result<MaildirKey, RcptResult> {
        let limit = self.cfg.local.delivered_to_limit as usize;
        if maildir::delivered_to_count(header, rcpt) >= limit {
            return Err(RcptResult::Bounced {
                reply: format!(
                    "554 5.4.6 mail forwarding loop for {rcpt}: message already has Delivered-To: {rcpt}"
                ),
                status: crate::smtp::reply_parser::EnhancedCode::new(5, 4, 6),
            });
        }
        let (local, domain) = rcpt.rsplit_once('@').unwrap_or((rcpt, ""));
        let user = maps.strip_extension(local).to_lowercase();
        if !valid_mailbox_name(&user) {
            return Err(RcptResult::Bounced {
                reply: format!("550 5.1.3 {rcpt}: not a valid local mailbox name"),
                status: crate::smtp::reply_parser::EnhancedCode::new(5, 1, 3),
            });
        }
        let account = maps.account(&user);
        // Owner: the configured uid/gid, else (when running as root) the system account's.
        let owner = match (self.cfg.local.mailbox_uid, self.cfg.local.mailbox_gid) {
            (None, None) => account.filter(|_| current_uid() == 0).map(|a| Ident {
                uid: a.uid,
                gid: a.gid,
            }),
            (uid, gid) => Some(Ident {
                uid: uid.or(account.map(|a| a.uid)).unwrap_or_else(current_uid),
                gid: gid.or(account.map(|a| a.gid)).unwrap_or_else(current_gid),
            }),
        };
        let md = self
            .layout
            .maildir(&user, domain, account)
            .map_err(|e| RcptResult::Deferred {
                reply: format!("451 4.3.0 {rcpt}: {e}"),
            })?;
        Ok((md, owner))
    }

    /// Counts, logs and sends each job's results to its accepting shard.
    fn report(&self, jobs: &[Job], items: Vec<Item>) {
        let mut per_job: Vec<Vec<(u32, RcptResult)>> = jobs.iter().map(|_| Vec::new()).collect();
        for item in items {
            let result = item.result.unwrap_or_else(|| RcptResult::Deferred {
                reply: "451 4.3.0 local delivery did not finish".into(),
            });
            let counter = match &result {
                RcptResult::Delivered { .. } => &self.stats.delivered,
                RcptResult::Deferred { .. } | RcptResult::Postponed { .. } => &self.stats.deferred,
                RcptResult::Bounced { .. } => &self.stats.bounced,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            per_job[item.job].push((item.index, result));
        }
        for (job, results) in jobs.iter().zip(per_job) {
            let at = self
                .log
                .record_job(job, &results, "local", &Default::default());
            self.send_outcome.push(
                job.origin_shard,
                Outcome {
                    id: job.id,
                    results,
                    remote: None,
                    attempted_unix_ms: at,
                    next_hop_dsn: false,
                    retry: None,
                },
            );
        }
    }
}

fn current_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

fn current_gid() -> u32 {
    rustix::process::getgid().as_raw()
}

/// Opens the batch's Maildirs (each once) on the helper threads, in [`limits::LOCAL_WRITER_THREADS_COUNT`] parts; in the order
/// of `keys`.
async fn open_maildirs(keys: Vec<MaildirKey>) -> Vec<Opened> {
    let n = keys.len();
    let per_part = n.div_ceil(limits::LOCAL_WRITER_THREADS_COUNT).max(1);
    let mut parts: Vec<Vec<MaildirKey>> = Vec::with_capacity(limits::LOCAL_WRITER_THREADS_COUNT);
    for (k, key) in keys.into_iter().enumerate() {
        if k % per_part == 0 {
            parts.push(Vec::with_capacity(per_part));
        }
        if let Some(p) = parts.last_mut() {
            p.push(key);
        }
    }
    let tasks: Vec<_> = parts
        .into_iter()
        .map(|part| {
            glommio::executor().spawn_blocking(move || {
                part.into_iter()
                    .map(|(path, owner)| {
                        safe_path::open_maildir(&path, owner)
                            .map(Arc::new)
                            .map_err(|e| e.reply(&path))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.extend(t.await);
    }
    out
}

/// A writer thread's share of a batch: each file created afresh in its tmp/, as its Maildir's owner (one
/// identity switch per run of files of the same owner).
fn write_part(part: Vec<FdWrite>) -> Vec<(usize, io::Result<File>)> {
    let mut out = Vec::with_capacity(part.len());
    for run in part.chunk_by(|a, b| a.1.acting == b.1.acting) {
        let acting = run.first().and_then(|w| w.1.acting);
        let written = fsid::as_owner(acting, || {
            run.iter()
                .map(|(i, md, name, content)| {
                    (
                        *i,
                        safe_path::create_fresh(md.tmp.as_fd(), name, content, md.chown),
                    )
                })
                .collect::<Vec<_>>()
        });
        match written {
            Ok(v) => out.extend(v),
            Err(e) => out.extend(
                run.iter()
                    .map(|w| (w.0, Err(io::Error::new(e.kind(), e.to_string())))),
            ),
        }
    }
    out
}

/// Renames every written file into new/ (each is complete and durable), as its Maildir's owner; returns the
/// Maildirs renamed into, with their items.
fn rename_into_new(items: &mut [Item]) -> Vec<(Arc<OpenMaildir>, Vec<usize>)> {
    let mut order: Vec<(Option<Ident>, usize)> = items
        .iter()
        .enumerate()
        .filter(|(_, item)| item.result.is_none() && item.md.is_some())
        .map(|(i, item)| (item.acting(), i))
        .collect();
    order.sort_unstable();
    let mut dirs: HashMap<*const OpenMaildir, (Arc<OpenMaildir>, Vec<usize>)> = HashMap::new();
    for run in order.chunk_by(|a, b| a.0 == b.0) {
        let acting = run.first().and_then(|r| r.0);
        let renamed = fsid::as_owner(acting, || {
            run.iter()
                .filter_map(|&(_, i)| {
                    let item = &items[i];
                    let md = item.md.as_ref()?;
                    Some((
                        i,
                        safe_path::rename(md.tmp.as_fd(), md.new.as_fd(), &item.name),
                    ))
                })
                .collect::<Vec<_>>()
        });
        let renamed = match renamed {
            Ok(v) => v,
            Err(e) => run
                .iter()
                .map(|&(_, i)| (i, Err(io::Error::new(e.kind(), e.to_string()))))
                .collect(),
        };
        for (i, r) in renamed {
            let item = &mut items[i];
            let Some(md) = item.md.clone() else { continue };
            match r {
                Ok(()) => dirs
                    .entry(Arc::as_ptr(&md))
                    .or_insert_with(|| (md.clone(), Vec::new()))
                    .1
                    .push(i),
                Err(e) => {
                    item.discard_tmp();
                    let new = md
                        .new_path()
                        .join(std::ffi::OsStr::from_bytes(item.name.to_bytes()));
                    item.defer(maildir::defer_reply("rename into", &new, &e));
                }
            }
        }
    }
    dirs.into_values().collect()
}
