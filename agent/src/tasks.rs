//! The one place the agent starts its long-running work: async tasks on the runtime (ring
//! readers, the rescan, the config file watch, the TLS reloaders, the pod listeners and their
//! certificate followers) and threads for loops that block (discovery's event feed, the broker
//! state tracker, the standby programs' demand, the file workers). A connection's own task
//! lives as long as the connection and is started by the server that accepted it. Each long-running
//! one has a name: in the log when it starts and stops, and, for a thread, as its name in
//! `/proc/<pid>/task/*/comm`.
//!
//! A page build runs on one of two threads of its own, started once and kept ([`on_side`]), and
//! its independent parts (the kernel maps and /proc; the page's two parts, each rendered and
//! deflated) run side by side on both ([`side_by_side`]).
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

/// Runs `a` and `b` at once and returns both results; a panic in either reaches the caller.
/// On a side-by-side thread (a page build, see [`on_side`]), `a` runs there and `b` is left
/// for the other thread, which takes it at once if it is idle; if it has not by the time `a` is
/// done, the caller runs `b` itself. Elsewhere both run in turn. Kept threads rather than one
/// started per call: starting and joining a thread cost about 60 µs, handing a pair of empty
/// parts to the kept ones about 17 µs (2026-12-06). A caller waiting for `b` may meanwhile run
/// other work given to these threads (another page build), so the parts must not hold a lock
/// that such work takes: page builds give them only reads, rendering and compression.
pub fn side_by_side<A, B, RA, RB>(a: A, b: B) -> (RA, RB)
where
    A: FnOnce() -> RA + Send,
    B: FnOnce() -> RB + Send,
    RA: Send,
    RB: Send,
{
    match side_by_side_pool() {
        // From one of the two threads (a page build, see [`on_side`]) the part left to the
        // other is taken back if it has not begun. A thread outside them runs both in turn: it
        // must never wait for these threads, which may be waiting for what it computes.
        Some(pool) if pool.current_thread_index().is_some() => pool.join(a, b),
        _ => (a(), b()),
    }
}

/// `f` of each item, in order, split between the two side-by-side threads as [`side_by_side`]
/// splits two parts (halves of halves, so each thread takes the next item that is left).
pub fn each_side_by_side<T, R, F>(items: &[T], f: &F) -> Vec<R>
where
    T: Sync,
    R: Send,
    F: Fn(&T) -> R + Sync,
{
    match items {
        [] => Vec::new(),
        [one] => vec![f(one)],
        _ => {
            let (left, right) = items.split_at(items.len() / 2);
            let (mut left, mut right) = side_by_side(
                || each_side_by_side(left, f),
                || each_side_by_side(right, f),
            );
            left.append(&mut right);
            left
        }
    }
}

/// Runs `job` on a side-by-side thread and resolves to its result (`None` if it panicked), for
/// a page build: its [`side_by_side`] parts then start there, one on the thread itself and one
/// for the other thread to take (the build runs its first part itself if the other has not
/// taken the second by then), with no hand-off from a blocking thread and back. `job` may wait
/// for a value another thread computes only if that computation never needs these threads.
/// Without them, it runs on the blocking pool.
pub async fn on_side<T, F>(job: F) -> Option<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let Some(pool) = side_by_side_pool() else {
        return tokio::task::spawn_blocking(job).await.ok();
    };
    let (done, result) = tokio::sync::oneshot::channel();
    pool.spawn(move || {
        // rayon aborts the process on a panic in a spawned job: it is caught and reported.
        let _ = done.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)));
    });
    result.await.ok()?.ok()
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

    fn name() -> Option<String> {
        std::thread::current().name().map(str::to_string)
    }

    #[tokio::test]
    async fn a_job_on_the_side_runs_its_parts_on_the_named_threads_and_a_panic_reaches_it() {
        let (a, b) = on_side(|| side_by_side(name, name)).await.unwrap();
        for name in [a, b] {
            assert!(name.unwrap().starts_with("side-by-side-"));
        }
        // A panic in a part reaches the job, and the job's caller sees None.
        assert_eq!(
            on_side(|| side_by_side(|| 1, || panic!("part b"))).await,
            None
        );
        // The threads survive it.
        assert_eq!(on_side(|| side_by_side(|| 1, || 2)).await, Some((1, 2)));
        // Elsewhere, both parts run in turn on the caller's thread: it never waits for the
        // side-by-side threads.
        let here = name();
        assert_eq!(side_by_side(name, name), (here.clone(), here));
    }

    #[tokio::test]
    async fn each_item_in_order_on_both_threads() {
        // Other tests share the two threads and may hold one for a while: a few tries.
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let items: Vec<u32> = (0..10).collect();
            let each = on_side(move || {
                each_side_by_side(&items, &|i| {
                    // Long enough that the other thread takes some.
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    (*i, name())
                })
            })
            .await
            .unwrap();
            assert_eq!(
                each.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
                (0..10).collect::<Vec<_>>()
            );
            seen = each.into_iter().map(|(_, n)| n.unwrap()).collect();
            if seen.len() == 2 {
                break;
            }
        }
        assert_eq!(
            seen.iter()
                .filter(|n| n.starts_with("side-by-side-"))
                .count(),
            2,
            "{seen:?}"
        );
        // Elsewhere, in turn on the caller's thread.
        assert_eq!(each_side_by_side(&[1, 2, 3], &|i| i * 2), [2, 4, 6]);
        assert_eq!(each_side_by_side(&[0u8; 0], &|i| *i), Vec::<u8>::new());
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
