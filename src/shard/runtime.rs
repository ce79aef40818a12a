//! The shard runtime: where each executor runs (placement from glommio's `CpuSet`), starting the executors with a
//! ready handshake that carries each one's start error back, the process signals, and joining them at the end.
//!
//! Every executor reports exactly once: ready, failed with its error, or (when it ends or its executor cannot
//! even be created) "stopped before it was ready" by the drop of its [`Ready`]. The main thread waits for those
//! reports while it watches the signals, so a start that goes wrong, or a SIGTERM during a long recovery, ends
//! the process within a tick instead of leaving it waiting for ever.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement, PoolPlacement};

/// How often the main thread looks at the signals while it waits for the executors.
const READY_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError<E: std::fmt::Display + std::fmt::Debug> {
    #[error("shards = {wanted}, but this server may run on {usable} CPU(s) ({list}): set shards = 0 (one per CPU) or at most {usable}")]
    TooManyShards {
        wanted: usize,
        usable: usize,
        list: String,
    },
    #[error("cannot read this host's CPU topology: {0}")]
    Topology(String),
    #[error("cannot start {name}: {message}. io_uring must be available (Linux >= 5.8, not disabled by kernel.io_uring_disabled or a seccomp profile) and RLIMIT_MEMLOCK large enough (ulimit -l 8192)")]
    Spawn { name: String, message: String },
    #[error("{0}")]
    Failed(E),
    #[error("{name} stopped before it was ready: its executor could not start (io_uring must be available and RLIMIT_MEMLOCK large enough: ulimit -l 8192), or it failed (see the lines above)")]
    Vanished { name: String },
    #[error("interrupted by a signal while starting")]
    Interrupted,
}

/// The CPUs this process may run on (online and in its affinity mask), lowest first.
pub fn usable_cpus() -> Result<Vec<usize>, String> {
    let online = glommio::CpuSet::online().map_err(|e| e.to_string())?;
    let allowed = affinity();
    let mut cpus: Vec<usize> = online
        .iter()
        .map(|l| l.cpu)
        .filter(|c| allowed.as_ref().is_none_or(|a| a.contains(c)))
        .collect();
    cpus.sort_unstable();
    cpus.dedup();
    if cpus.is_empty() {
        return Err("no online CPU is in this process's affinity mask".into());
    }
    Ok(cpus)
}

/// The process's CPU affinity mask (None when it cannot be read: every online CPU is then taken as usable).
fn affinity() -> Option<Vec<usize>> {
    let set = rustix::thread::sched_getaffinity(None).ok()?;
    Some(
        (0..rustix::thread::CpuSet::MAX_CPU)
            .filter(|&c| set.is_set(c))
            .collect(),
    )
}

/// Makes sure at least `min` bytes of memory may be locked (io_uring's rings need it): raises the soft limit
/// towards the hard limit (up to `min` or 8 MiB, whichever is more) when it is lower. Returns the limit that
/// stands when that fails.
pub fn raise_memlock(min: u64) -> Result<(), u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Memlock);
    let have = lim.current.unwrap_or(u64::MAX); // None: unlimited
    if have >= min {
        return Ok(());
    }
    let want = min.max(8 << 20).min(lim.maximum.unwrap_or(u64::MAX));
    if want > have
        && setrlimit(
            Resource::Memlock,
            Rlimit {
                current: Some(want),
                maximum: lim.maximum,
            },
        )
        .is_ok()
    {
        return if want >= min { Ok(()) } else { Err(want) };
    }
    Err(have)
}

/// One CPU per shard: shard `i` on the `i`-th usable CPU. More shards than usable CPUs is a configuration error
/// (they would share cores and the design's one-reactor-per-core premise would not hold).
pub fn place_shards<E: std::fmt::Display + std::fmt::Debug>(
    wanted: usize,
    usable: &[usize],
) -> Result<Vec<usize>, RuntimeError<E>> {
    if wanted > usable.len() {
        return Err(RuntimeError::TooManyShards {
            wanted,
            usable: usable.len(),
            list: cpu_list(usable),
        });
    }
    Ok(usable[..wanted].to_vec())
}

/// `0-3,6` style.
fn cpu_list(cpus: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    out.join(",")
}

/// The process's signals: SIGTERM/SIGINT ask for a shutdown, SIGHUP for a reload, SIGUSR1 (and SIGHUP too)
/// for the event log's file to be reopened (logrotate's `postrotate`).
#[derive(Clone)]
pub struct Signals {
    pub shutdown: Arc<AtomicBool>,
    pub reload: Arc<AtomicBool>,
    pub reopen_logs: Arc<AtomicBool>,
}

impl Signals {
    pub fn install() -> std::io::Result<Signals> {
        let s = Signals {
            shutdown: Arc::default(),
            reload: Arc::default(),
            reopen_logs: Arc::default(),
        };
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(sig, s.shutdown.clone())?;
        }
        signal_hook::flag::register(signal_hook::consts::SIGHUP, s.reload.clone())?;
        for sig in [signal_hook::consts::SIGHUP, signal_hook::consts::SIGUSR1] {
            signal_hook::flag::register(sig, s.reopen_logs.clone())?;
        }
        Ok(s)
    }

    pub fn shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }
}

enum Report<E> {
    Ready,
    Failed(E),
    Vanished,
}

/// An executor's one report of its start. Dropped unsent, it reports "stopped before it was ready".
pub struct Ready<E: Send + 'static> {
    index: usize,
    tx: Option<mpsc::Sender<(usize, Report<E>)>>,
}

impl<E: Send + 'static> Ready<E> {
    /// The executor is up (its listeners, queue and mesh are ready).
    pub fn ready(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send((self.index, Report::Ready));
        }
    }

    /// The executor cannot start: `e` goes to the main thread, which stops the process with it.
    pub fn failed(&mut self, e: E) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send((self.index, Report::Failed(e)));
        }
    }
}

impl<E: Send + 'static> Drop for Ready<E> {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send((self.index, Report::Vanished));
        }
    }
}

/// Marks an executor as running for as long as its future (or, when the executor could not be created, its
/// start closure) lives.
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// The executors of the process.
pub struct Executors<E: Send + 'static> {
    names: Vec<String>,
    handles: Vec<glommio::ExecutorJoinHandle<()>>,
    running: Vec<Arc<AtomicBool>>,
    tx: mpsc::Sender<(usize, Report<E>)>,
    rx: mpsc::Receiver<(usize, Report<E>)>,
}

impl<E: Send + std::fmt::Display + std::fmt::Debug + 'static> Default for Executors<E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<E: Send + std::fmt::Display + std::fmt::Debug + 'static> Executors<E> {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel();
        Executors {
            names: Vec::new(),
            handles: Vec::new(),
            running: Vec::new(),
            tx,
            rx,
        }
    }

    /// Starts an executor named `name` on `cpu` (None: unpinned) with `helpers` blocking-pool threads; `run`
    /// gets its [`Ready`] and must report through it.
    pub fn spawn<F, Fut>(
        &mut self,
        name: &str,
        cpu: Option<usize>,
        helpers: usize,
        run: F,
    ) -> Result<(), RuntimeError<E>>
    where
        F: FnOnce(Ready<E>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + 'static,
    {
        self.spawn_with_io_memory(name, cpu, helpers, None, run)
    }

    /// [`Executors::spawn`] with glommio's `io_memory` (the executor's registered I/O buffer) set to `io_memory`
    /// bytes instead of glommio's default (the load tester's sink uses little of it).
    pub fn spawn_with_io_memory<F, Fut>(
        &mut self,
        name: &str,
        cpu: Option<usize>,
        helpers: usize,
        io_memory: Option<usize>,
        run: F,
    ) -> Result<(), RuntimeError<E>>
    where
        F: FnOnce(Ready<E>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + 'static,
    {
        let ready = Ready {
            index: self.names.len(),
            tx: Some(self.tx.clone()),
        };
        let flag = Arc::new(AtomicBool::new(true));
        let running = Running(flag.clone());
        let placement = match cpu {
            Some(c) => Placement::Fixed(c),
            None => Placement::Unbound,
        };
        let mut builder = LocalExecutorBuilder::new(placement)
            .name(name)
            .blocking_thread_pool_placement(PoolPlacement::Unbound(helpers));
        if let Some(bytes) = io_memory {
            builder = builder.io_memory(bytes);
        }
        let h = builder
            .spawn(move || {
                let running = running;
                async move {
                    let _running = running;
                    run(ready).await
                }
            })
            .map_err(|e| RuntimeError::Spawn {
                name: name.to_string(),
                message: e.to_string(),
            })?;
        self.names.push(name.to_string());
        self.handles.push(h);
        self.running.push(flag);
        Ok(())
    }

    /// Executors whose future is still running.
    pub fn alive(&self) -> usize {
        self.running
            .iter()
            .filter(|r| r.load(Ordering::SeqCst))
            .count()
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Waits until every executor is ready. The first failure (or a signal) ends the wait with its error; the
    /// caller then sets the shutdown flag and calls [`Executors::join`] with a short deadline.
    pub fn wait_ready(&self, signals: &Signals) -> Result<(), RuntimeError<E>> {
        let mut ready = vec![false; self.handles.len()];
        while ready.iter().any(|r| !r) {
            if signals.shutting_down() {
                return Err(RuntimeError::Interrupted);
            }
            match self.rx.recv_timeout(READY_POLL) {
                Ok((i, Report::Ready)) => ready[i] = true,
                Ok((_, Report::Failed(e))) => return Err(RuntimeError::Failed(e)),
                Ok((i, Report::Vanished)) => {
                    return Err(RuntimeError::Vanished {
                        name: self.names[i].clone(),
                    })
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        Ok(())
    }

    /// Joins every executor, giving them until `deadline`; returns how many failed (panicked) or were still
    /// running at the deadline (those are left behind: the process is about to exit).
    pub fn join(self, deadline: Instant) -> usize {
        let mut failed = 0;
        for ((h, name), running) in self.handles.into_iter().zip(self.names).zip(self.running) {
            while running.load(Ordering::SeqCst) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if running.load(Ordering::SeqCst) {
                report_error(&format!("{name} did not stop in time; leaving it"));
                failed += 1;
                continue;
            }
            if let Err(e) = h.join() {
                report_error(&format!("{name} failed: {e}"));
                failed += 1;
            }
        }
        failed
    }
}

/// An error line: into the event log when the process has one (the server), else to stderr (the load tester).
fn report_error(message: &str) {
    if tracing::dispatcher::has_been_set() {
        tracing::error!(target: crate::eventlog::MASTER, "{message}");
    } else {
        eprintln!("shardmta: {message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_placed_one_per_usable_cpu() {
        let usable = [0, 1, 2, 3, 6];
        assert_eq!(place_shards::<String>(2, &usable).unwrap(), vec![0, 1]);
        assert_eq!(
            place_shards::<String>(5, &usable).unwrap(),
            vec![0, 1, 2, 3, 6]
        );
        let e = place_shards::<String>(64, &[0, 1]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "shards = 64, but this server may run on 2 CPU(s) (0-1): set shards = 0 (one per CPU) or at most 2"
        );
        assert_eq!(cpu_list(&[0, 1, 2, 3, 6, 8, 9]), "0-3,6,8-9");
        assert!(!usable_cpus().unwrap().is_empty());
    }

    #[test]
    fn every_executor_reports_once_and_a_failure_ends_the_wait() {
        let signals = Signals {
            shutdown: Arc::default(),
            reload: Arc::default(),
            reopen_logs: Arc::default(),
        };
        let mut ex: Executors<String> = Executors::new();
        ex.spawn("ok", None, 1, |mut r| async move { r.ready() })
            .unwrap();
        ex.spawn("bad", None, 1, |mut r| async move {
            r.failed("the queue is locked".into())
        })
        .unwrap();
        let e = ex.wait_ready(&signals).unwrap_err();
        assert_eq!(e.to_string(), "the queue is locked");
        assert_eq!(ex.join(Instant::now() + Duration::from_secs(5)), 0);

        // An executor that returns without a word is reported too, not waited for.
        let mut ex: Executors<String> = Executors::new();
        ex.spawn("silent", None, 1, |r| async move { drop(r) })
            .unwrap();
        let e = ex.wait_ready(&signals).unwrap_err();
        assert!(
            matches!(e, RuntimeError::Vanished { ref name } if name == "silent"),
            "{e}"
        );
        ex.join(Instant::now() + Duration::from_secs(5));

        // A signal ends the wait for an executor that never reports, and join leaves it behind at the deadline.
        let mut ex: Executors<String> = Executors::new();
        let stuck = Arc::new(AtomicBool::new(true));
        let s = stuck.clone();
        ex.spawn("stuck", None, 1, move |_r| async move {
            while s.load(Ordering::SeqCst) {
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
        })
        .unwrap();
        signals.shutdown.store(true, Ordering::SeqCst);
        assert!(matches!(
            ex.wait_ready(&signals),
            Err(RuntimeError::Interrupted)
        ));
        assert_eq!(ex.alive(), 1);
        let started = Instant::now();
        assert_eq!(ex.join(Instant::now() + Duration::from_millis(200)), 1);
        assert!(started.elapsed() < Duration::from_secs(2));
        stuck.store(false, Ordering::SeqCst);
    }
}
