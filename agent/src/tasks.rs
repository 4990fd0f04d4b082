//! The one place the agent starts its long-running work: async tasks on the runtime (ring
//! readers, the rescan, the config file watch, the TLS reloaders, the pod listeners and their
//! certificate followers) and threads for loops that block (discovery's event feed, the broker
//! state tracker, the standby programs' demand, the file workers). A connection's own task
//! lives as long as the connection and is started by the server that accepted it. Each long-running
//! one has a name: in the log when it starts and stops, and, for a thread, as its name in
//! `/proc/<pid>/task/*/comm`.
//!
//! A page build's independent parts (the kernel maps and /proc; the page's two parts, each
//! rendered and deflated) run side by side on two threads of their own, [`side_by_side`],
//! started once and kept.
//!
//! [`shutdown`] aborts every running task at the agent's stop, before the kernel programs are
//! detached. Threads cannot be aborted: each loop ends by itself when what it serves is gone
//! (its channel closes or its model is dropped), else with the process. It knows no other
//! module of the agent but `locks`.

use std::{future::Future, sync::Mutex};

use tokio::task::{AbortHandle, JoinHandle};

use crate::locks::Recover as _;

/// Tasks started and not yet seen finished, by name. Finished ones are dropped at each start,
/// so it holds the handful of live tasks and never grows.
#[derive(Default)]
struct Registry(Mutex<Vec<(&'static str, AbortHandle)>>);

impl Registry {
    const fn new() -> Self {
        Self(Mutex::new(Vec::new()))
    }

    fn spawn<F>(&self, name: &'static str, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let handle = tokio::spawn(task);
        let mut running = self.0.lock().recover();
        running.retain(|(_, h)| !h.is_finished());
        running.push((name, handle.abort_handle()));
        tracing::debug!(task = name, "task started");
        handle
    }

    fn shutdown(&self) {
        let running = std::mem::take(&mut *self.0.lock().recover());
        for (name, handle) in running.iter().filter(|(_, h)| !h.is_finished()) {
            tracing::debug!(task = name, "task stopped");
            handle.abort();
        }
    }
}

/// The agent's tasks.
static RUNNING: Registry = Registry::new();

/// Starts `task` on the current runtime under `name`; [`shutdown`] aborts it.
pub fn spawn<F>(name: &'static str, task: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    RUNNING.spawn(name, task)
}

/// Starts `body` on a thread of its own named `name` (at most 15 bytes show in `comm`).
pub fn thread<F>(name: impl Into<String>, body: F) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let name = name.into();
    tracing::debug!(thread = %name, "thread started");
    std::thread::Builder::new().name(name).spawn(body)
}

/// Threads of the side-by-side pool: a page build has two parts to run at once.
const SIDE_BY_SIDE_THREADS: usize = 2;

/// The pool behind [`side_by_side`]: `None` when its threads could not be started (each call
/// then runs both parts in turn on its own thread).
fn side_by_side_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(SIDE_BY_SIDE_THREADS)
            .thread_name(|i| format!("side-by-side-{i}"))
            .build()
            .inspect(|_| tracing::debug!(thread = "side-by-side", "threads started"))
            .inspect_err(|e| {
                tracing::warn!(error = %e, "cannot start the side-by-side threads; page builds run their parts in turn");
            })
            .ok()
    })
    .as_ref()
}

/// Runs `a` and `b` at once on the two side-by-side threads, the caller waiting, and returns
/// both results. A panic in either part reaches the caller. Kept threads rather than one
/// started per call: starting and joining a thread cost about 60 µs, handing a pair of empty
/// parts to the kept ones about 17 µs (2026-12-06). The parts must not wait for work that
/// itself needs these threads (they are two): page builds give them only reads, rendering
/// and compression.
pub fn side_by_side<A, B, RA, RB>(a: A, b: B) -> (RA, RB)
where
    A: FnOnce() -> RA + Send,
    B: FnOnce() -> RB + Send,
    RA: Send,
    RB: Send,
{
    match side_by_side_pool() {
        Some(pool) => pool.join(a, b),
        None => (a(), b()),
    }
}

/// Aborts every task still running (the agent is stopping).
pub fn shutdown() {
    RUNNING.shutdown();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_aborts_what_is_still_running() {
        // A registry of its own: the agent's would abort other tests' tasks.
        let registry = Registry::default();
        let forever = registry.spawn("test-forever", std::future::pending::<()>());
        let done = registry.spawn("test-done", async { 7 });
        assert_eq!(done.await.unwrap(), 7);
        registry.shutdown();
        assert!(forever.await.unwrap_err().is_cancelled());
    }

    #[test]
    fn side_by_side_runs_both_on_the_named_threads_and_passes_a_panic_on() {
        let (a, b) = side_by_side(
            || std::thread::current().name().map(str::to_string),
            || std::thread::current().name().map(str::to_string),
        );
        for name in [a, b] {
            assert!(name.unwrap().starts_with("side-by-side-"));
        }
        let panicked = std::panic::catch_unwind(|| side_by_side(|| 1, || panic!("part b")));
        assert!(panicked.is_err());
        // The pool survives a part's panic.
        assert_eq!(side_by_side(|| 1, || 2), (1, 2));
    }

    #[test]
    fn threads_carry_their_name() {
        let named = thread("test-named", || {
            assert_eq!(std::thread::current().name(), Some("test-named"));
        })
        .unwrap();
        named.join().unwrap();
    }
}
