//! A bounded pool of threads for work that may hang: reads of a container's files, which a hung
//! NFS or FUSE mount can block in the kernel for good.
//!
//! The caller waits at most a deadline ([`Workers::run`]); past it, it goes on with what it has
//! and the job keeps its thread until the kernel lets go. One job per key (a broker process) at a
//! time: a broker whose files hang holds one thread, and its next jobs are refused at once
//! ([`WorkError::Busy`]) instead of piling up. Threads are made on demand up to a cap and leave
//! after a quiet minute. Jobs past their deadline are visible ([`Workers::stalled`]) until they
//! end, which is logged.

use std::{
    collections::{HashMap, VecDeque},
    panic::AssertUnwindSafe,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::locks::Recover as _;

/// An idle thread beyond the first leaves after this long.
const IDLE_EXIT: Duration = Duration::from_secs(60);

/// Why a job gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkError {
    #[error("an earlier read of this process's files has not finished after {}s", .since.as_secs())]
    Busy { since: Duration },
    #[error("every file worker is busy ({threads} threads)")]
    Full { threads: usize },
    #[error("did not finish within {}s (its filesystem may hang); it is retried once that read ends", .after.as_secs_f32())]
    Hung { after: Duration },
    #[error("failed (the worker panicked)")]
    Panicked,
}

/// A job past its deadline, for `/ready` and the logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stalled {
    pub what: String,
    pub running_for: Duration,
}

/// Counters for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkStats {
    pub threads: usize,
    /// Jobs running past their deadline now.
    pub stalled: usize,
    /// Jobs that passed their deadline, ever.
    pub timeouts: u64,
    /// Jobs refused: busy key or every thread taken.
    pub refused: u64,
}

/// Its work, which returns the delivery of its answer: the worker frees the key first, so a
/// caller that got the answer can submit again under the same key at once.
type Deliver = Box<dyn FnOnce() + Send>;

struct Job {
    key: u64,
    abandoned: Arc<AtomicBool>,
    run: Box<dyn FnOnce() -> Deliver + Send>,
}

struct Running {
    what: String,
    started: Instant,
    deadline: Duration,
}

#[derive(Default)]
struct Pool {
    queue: VecDeque<Job>,
    threads: usize,
    idle: usize,
    running: HashMap<u64, Running>,
}

struct Inner {
    name: &'static str,
    max_threads: usize,
    pool: Mutex<Pool>,
    wake: Condvar,
    /// A key was freed.
    freed: Condvar,
    timeouts: AtomicU64,
    refused: AtomicU64,
}

/// The pool. Cheap to clone.
#[derive(Clone)]
pub struct Workers {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("name", &self.inner.name)
            .field("max_threads", &self.inner.max_threads)
            .finish()
    }
}

impl Workers {
    pub fn new(name: &'static str, max_threads: usize) -> Self {
        Workers {
            inner: Arc::new(Inner {
                name,
                max_threads: max_threads.max(1),
                pool: Mutex::new(Pool::default()),
                wake: Condvar::new(),
                freed: Condvar::new(),
                timeouts: AtomicU64::new(0),
                refused: AtomicU64::new(0),
            }),
        }
    }

    /// Runs `f` on a worker and waits for it at most `deadline`. `key` names what the job reads
    /// (a process): one job per key at a time. `what` describes it for logs and `/ready`.
    pub fn run<T: Send + 'static>(
        &self,
        key: u64,
        what: impl Into<String>,
        deadline: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, WorkError> {
        let what = what.into();
        let abandoned = Arc::new(AtomicBool::new(false));
        let rx = self.submit(key, what.clone(), deadline, abandoned.clone(), f)?;
        match rx.recv_timeout(deadline) {
            Ok(value) => Ok(value),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                abandoned.store(true, Ordering::Relaxed);
                self.inner.timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    pool = self.inner.name,
                    what = %what,
                    deadline_ms = deadline.as_millis() as u64,
                    "file work did not finish in time; going on without it"
                );
                Err(WorkError::Hung { after: deadline })
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(WorkError::Panicked),
        }
    }

    /// Runs `f` on a worker without waiting: the receiver gets its answer. `deadline` only says
    /// when it counts as stalled ([`Workers::stalled`]).
    pub fn spawn<T: Send + 'static>(
        &self,
        key: u64,
        what: impl Into<String>,
        deadline: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::sync::mpsc::Receiver<T>, WorkError> {
        self.submit(
            key,
            what.into(),
            deadline,
            Arc::new(AtomicBool::new(false)),
            f,
        )
    }

    fn submit<T: Send + 'static>(
        &self,
        key: u64,
        what: String,
        deadline: Duration,
        abandoned: Arc<AtomicBool>,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::sync::mpsc::Receiver<T>, WorkError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        {
            let mut pool = self.lock();
            // A job of the key within its deadline is waited for (two callers reading the same
            // process at once); one past it is hung, and refused at once.
            while let Some(r) = pool.running.get(&key) {
                let left = r.deadline.saturating_sub(r.started.elapsed());
                if left.is_zero() {
                    self.inner.refused.fetch_add(1, Ordering::Relaxed);
                    return Err(WorkError::Busy {
                        since: r.started.elapsed(),
                    });
                }
                pool = self.inner.freed.wait_timeout(pool, left).recover().0;
            }
            // Every idle thread is spoken for by a queued job: this one needs a new thread.
            let needs_thread = pool.queue.len() >= pool.idle;
            if needs_thread && pool.threads >= self.inner.max_threads {
                self.inner.refused.fetch_add(1, Ordering::Relaxed);
                return Err(WorkError::Full {
                    threads: pool.threads,
                });
            }
            pool.running.insert(
                key,
                Running {
                    what,
                    started: Instant::now(),
                    deadline,
                },
            );
            pool.queue.push_back(Job {
                key,
                abandoned: abandoned.clone(),
                run: Box::new(move || {
                    let value = f();
                    Box::new(move || {
                        // The waiter may have gone: then nobody wants the answer.
                        let _ = tx.send(value);
                    })
                }),
            });
            if needs_thread {
                if let Err(e) = self.spawn_thread(&mut pool) {
                    pool.queue.pop_back();
                    pool.running.remove(&key);
                    tracing::warn!(pool = self.inner.name, error = %e, "cannot start a worker thread");
                    return Err(WorkError::Full {
                        threads: pool.threads,
                    });
                }
            } else {
                self.inner.wake.notify_one();
            }
        }
        Ok(rx)
    }

    /// Jobs running past their deadline, longest first.
    pub fn stalled(&self) -> Vec<Stalled> {
        let pool = self.lock();
        let mut out: Vec<Stalled> = pool
            .running
            .values()
            .filter(|r| r.started.elapsed() > r.deadline)
            .map(|r| Stalled {
                what: r.what.clone(),
                running_for: r.started.elapsed(),
            })
            .collect();
        out.sort_by_key(|s| std::cmp::Reverse(s.running_for));
        out
    }

    pub fn stats(&self) -> WorkStats {
        let pool = self.lock();
        WorkStats {
            threads: pool.threads,
            stalled: pool
                .running
                .values()
                .filter(|r| r.started.elapsed() > r.deadline)
                .count(),
            timeouts: self.inner.timeouts.load(Ordering::Relaxed),
            refused: self.inner.refused.load(Ordering::Relaxed),
        }
    }

    fn spawn_thread(&self, pool: &mut Pool) -> std::io::Result<()> {
        let inner = self.inner.clone();
        crate::tasks::thread(format!("{}-worker", self.inner.name), move || {
            worker(&inner)
        })?;
        pool.threads += 1;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.inner.pool.lock().recover()
    }
}

fn worker(inner: &Inner) {
    let lock = || inner.pool.lock().recover();
    let mut pool = lock();
    loop {
        let Some(job) = pool.queue.pop_front() else {
            pool.idle += 1;
            let (guard, timeout) = inner
                .wake
                .wait_timeout_while(pool, IDLE_EXIT, |p| p.queue.is_empty())
                .recover();
            pool = guard;
            pool.idle -= 1;
            if timeout.timed_out() && pool.queue.is_empty() && pool.threads > 1 {
                pool.threads -= 1;
                return;
            }
            continue;
        };
        drop(pool);
        // A panic is the job's own failure: the waiter sees the channel close.
        let deliver = if job.abandoned.load(Ordering::Relaxed) {
            None
        } else {
            std::panic::catch_unwind(AssertUnwindSafe(job.run)).ok()
        };
        pool = lock();
        if let Some(r) = pool.running.remove(&job.key)
            && r.started.elapsed() > r.deadline
        {
            tracing::info!(
                pool = inner.name,
                what = %r.what,
                after_ms = r.started.elapsed().as_millis() as u64,
                "file work that passed its deadline has ended"
            );
        }
        inner.freed.notify_all();
        drop(pool);
        if let Some(deliver) = deliver {
            deliver();
        }
        pool = lock();
    }
}

/// The pool for brokers' files: discovery's reads and the state tracker's log-dir inventory.
pub fn files() -> &'static Workers {
    static POOL: std::sync::OnceLock<Workers> = std::sync::OnceLock::new();
    POOL.get_or_init(|| Workers::new("files", MAX_FILE_THREADS))
}

/// Threads for brokers' files: each broker whose filesystem hangs holds at most one per kind of
/// job; the rest serve everyone else.
pub const MAX_FILE_THREADS: usize = 32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_within_the_deadline_and_refuses_a_busy_key_at_once() {
        let w = Workers::new("t", 4);
        assert_eq!(w.run(1, "quick", Duration::from_secs(5), || 7), Ok(7));

        let (release, hold) = std::sync::mpsc::channel::<()>();
        let started = Instant::now();
        let hung = w.run(2, "hangs", Duration::from_millis(100), move || {
            let _ = hold.recv();
            1
        });
        assert_eq!(
            hung,
            Err(WorkError::Hung {
                after: Duration::from_millis(100)
            })
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(w.stats().stalled, 1);
        assert_eq!(w.stalled()[0].what, "hangs");
        let t = Instant::now();
        assert!(matches!(
            w.run(2, "again", Duration::from_secs(5), || 2),
            Err(WorkError::Busy { .. })
        ));
        assert!(t.elapsed() < Duration::from_millis(50), "refused at once");
        // Another key is served while key 2 hangs.
        assert_eq!(w.run(3, "other", Duration::from_secs(5), || 3), Ok(3));

        release.send(()).unwrap();
        let t = Instant::now();
        while w.stats().stalled > 0 {
            assert!(t.elapsed() < Duration::from_secs(5), "the hung job ended");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(w.run(2, "after", Duration::from_secs(5), || 4), Ok(4));
        let stats = w.stats();
        assert_eq!((stats.timeouts, stats.refused), (1, 1));
    }

    #[test]
    fn threads_are_capped() {
        let w = Workers::new("t", 2);
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let hold = Arc::new(Mutex::new(hold));
        for key in 0..2 {
            let hold = hold.clone();
            let r = w.run(key, "hangs", Duration::from_millis(20), move || {
                let _ = hold.lock().unwrap().recv();
            });
            assert!(matches!(r, Err(WorkError::Hung { .. })));
        }
        assert_eq!(
            w.run(9, "third", Duration::from_secs(1), || ()),
            Err(WorkError::Full { threads: 2 })
        );
        assert_eq!(w.stats().threads, 2);
        release.send(()).unwrap();
        release.send(()).unwrap();
    }

    #[test]
    fn a_panicking_job_fails_alone() {
        let w = Workers::new("t", 1);
        let r: Result<(), _> = w.run(1, "panics", Duration::from_secs(5), || panic!("boom"));
        assert_eq!(r, Err(WorkError::Panicked));
        // The key and the thread are free once the worker has put the job away (until then
        // the key is busy, or the one thread is), and the thread lives on.
        let t = Instant::now();
        loop {
            match w.run(1, "next", Duration::from_secs(5), || 5) {
                Err(WorkError::Busy { .. } | WorkError::Full { .. })
                    if t.elapsed() < Duration::from_secs(5) =>
                {
                    std::thread::sleep(Duration::from_millis(5))
                }
                r => break assert_eq!(r, Ok(5)),
            }
        }
        assert_eq!(w.stats().threads, 1);
    }
}
