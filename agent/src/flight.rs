//! Single flight: concurrent requests for an expensive, always-fresh value share one
//! computation.
//!
//! A request gets a value whose computation started after it arrived, or joins the computation
//! in progress when it got there. So concurrent requests cost one computation and wait at most
//! one; none sees state from before the computation in progress at its arrival (the value is at
//! most one computation old), and a lone request always gets a value of its own.
//!
//! [`Flight::get`] blocks its thread while it waits; [`Flight::get_async`] waits as a task and
//! runs only the computation on a side-by-side thread ([`crate::tasks::on_side`]), so
//! concurrent scrapes do not each hold a thread (and pay its wake-ups) to wait for one render.

use std::{
    sync::{Arc, Condvar, Mutex},
    time::Instant,
};

use crate::locks::Recover as _;

pub struct Flight<T> {
    state: Mutex<State<T>>,
    /// Signalled when a computation ends (done or unwound), for threads.
    done: Condvar,
    /// The same, for tasks.
    ended: tokio::sync::Notify,
}

struct State<T> {
    /// Computations completed so far.
    generation: u64,
    computing: bool,
    /// The thread running the computation in progress, once it runs.
    computing_on: Option<std::thread::ThreadId>,
    /// The last value and when its computation started.
    last: Option<(Instant, T)>,
}

impl<T> Default for Flight<T> {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                generation: 0,
                computing: false,
                computing_on: None,
                last: None,
            }),
            done: Condvar::new(),
            ended: tokio::sync::Notify::new(),
        }
    }
}

impl<T: Clone> Flight<T> {
    /// The value for a request that arrived at `arrived`, computed by `compute` unless a
    /// computation that serves it is done or in progress.
    pub fn get(&self, arrived: Instant, compute: impl FnOnce() -> T) -> T {
        let mut state = self.lock();
        // The computation in progress, if any, is the one this request may join.
        let joinable = state.computing.then_some(state.generation + 1);
        loop {
            if let Some((started, value)) = state.last.as_ref()
                && (*started >= arrived || joinable.is_some_and(|g| state.generation >= g))
            {
                return value.clone();
            }
            if !state.computing {
                break;
            }
            // This thread runs the computation in progress, further up its stack (a thread of
            // a pool that took other work while it waited inside the computation): waiting
            // would be waiting for itself, so it computes a value of its own.
            if state.computing_on == Some(std::thread::current().id()) {
                drop(state);
                return compute();
            }
            state = self.done.wait(state).recover();
        }
        state.computing = true;
        drop(state);
        self.compute_and_publish(compute)
    }
}

impl<T: Clone + Send + 'static> Flight<T> {
    /// [`Flight::get`] for a task: waits without a thread, computes on a side-by-side thread.
    /// `None` when the computation panicked.
    pub async fn get_async(
        self: Arc<Self>,
        arrived: Instant,
        compute: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let mut joinable = None;
        let mut first = true;
        loop {
            // Registered before the check: a computation ending in between still wakes it.
            let ended = self.ended.notified();
            {
                let mut state = self.lock();
                if first {
                    joinable = state.computing.then_some(state.generation + 1);
                    first = false;
                }
                if let Some((started, value)) = state.last.as_ref()
                    && (*started >= arrived || joinable.is_some_and(|g| state.generation >= g))
                {
                    return Some(value.clone());
                }
                if !state.computing {
                    state.computing = true;
                    break;
                }
            }
            ended.await;
        }
        // The guard lives on the computing thread: a scrape that goes away meanwhile still
        // leaves the flight open for the next.
        crate::tasks::on_side(move || self.compute_and_publish(compute)).await
    }
}

impl<T: Clone> Flight<T> {
    /// Runs the computation this caller has claimed (`computing` set) and publishes its value
    /// as the next generation. Clears `computing` and wakes the waiters even if `compute`
    /// panics: they then compute their own.
    fn compute_and_publish(&self, compute: impl FnOnce() -> T) -> T {
        let computing = Computing(self);
        self.lock().computing_on = Some(std::thread::current().id());
        let started = Instant::now();
        let value = compute();
        {
            let mut state = self.lock();
            state.generation += 1;
            state.last = Some((started, value.clone()));
        }
        drop(computing);
        value
    }
}

impl<T> Flight<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().recover()
    }
}

struct Computing<'a, T>(&'a Flight<T>);

impl<T> Drop for Computing<'_, T> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.computing = false;
        state.computing_on = None;
        drop(state);
        self.0.done.notify_all();
        self.0.ended.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicU32, Ordering},
        },
        time::Duration,
    };

    use super::*;

    #[test]
    fn the_computing_thread_asking_again_computes_its_own_instead_of_waiting_for_itself() {
        // A page build's thread that, waiting inside the snapshot's computation for a part
        // another thread runs, takes another page build: that one asks for the snapshot too.
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let flight = Flight::default();
            let outer = flight.get(Instant::now(), || {
                let inner = flight.get(Instant::now(), || "inner".to_string());
                format!("outer around {inner}")
            });
            done.send(outer).unwrap();
        });
        assert_eq!(
            result.recv_timeout(Duration::from_secs(10)).unwrap(),
            "outer around inner"
        );
    }

    #[test]
    fn a_request_never_gets_a_value_finished_before_it_arrived() {
        let flight = Flight::default();
        let runs = AtomicU32::new(0);
        let compute = || runs.fetch_add(1, Ordering::SeqCst);
        assert_eq!(flight.get(Instant::now(), compute), 0);
        assert_eq!(flight.get(Instant::now(), compute), 1);
    }

    #[test]
    fn requests_that_arrived_before_a_computation_started_share_it() {
        let flight = Flight::default();
        let arrived = Instant::now();
        let first = flight.get(arrived, || Arc::new(1));
        assert!(Arc::ptr_eq(&first, &flight.get(arrived, || Arc::new(2))));
    }

    /// Runs a computation that finishes with `held` once a second request has arrived while it
    /// ran; returns what each got: the first request's outcome, the second's value.
    fn with_second_arrival(
        flight: &Flight<&'static str>,
        held: impl FnOnce() -> &'static str + Send,
    ) -> (std::thread::Result<&'static str>, &'static str) {
        std::thread::scope(|scope| {
            let (entered, wait) = std::sync::mpsc::channel();
            let (release, hold) = std::sync::mpsc::channel::<()>();
            let first = scope.spawn(|| {
                flight.get(Instant::now(), move || {
                    entered.send(()).unwrap();
                    hold.recv().unwrap();
                    held()
                })
            });
            wait.recv().unwrap();
            // Arrives while the computation that started before it runs.
            let second = scope.spawn(|| flight.get(Instant::now(), || "own"));
            // Time for the second to get there and wait.
            std::thread::sleep(Duration::from_millis(200));
            release.send(()).unwrap();
            (first.join(), second.join().unwrap())
        })
    }

    #[test]
    fn a_request_joins_the_computation_in_progress_at_its_arrival() {
        let flight = Flight::default();
        let (first, second) = with_second_arrival(&flight, || "in flight");
        assert_eq!(first.unwrap(), "in flight");
        assert_eq!(second, "in flight");
    }

    #[test]
    fn a_computation_that_panics_leaves_the_waiters_to_compute_their_own() {
        let flight = Flight::default();
        let (first, second) = with_second_arrival(&flight, || panic!("compute failed"));
        assert!(first.is_err());
        assert_eq!(second, "own");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_joins_the_computation_in_progress_and_a_panic_frees_the_flight() {
        let flight = Arc::new(Flight::default());
        let (entered, wait) = std::sync::mpsc::channel();
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let first = tokio::spawn(flight.clone().get_async(Instant::now(), move || {
            entered.send(()).unwrap();
            hold.recv().unwrap();
            "in flight"
        }));
        tokio::task::spawn_blocking(move || wait.recv().unwrap())
            .await
            .unwrap();
        // Arrives while the computation runs: joins it, computes nothing of its own.
        let second = tokio::spawn(flight.clone().get_async(Instant::now(), || "own"));
        tokio::time::sleep(Duration::from_millis(200)).await;
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap(), Some("in flight"));
        assert_eq!(second.await.unwrap(), Some("in flight"));
        // A computation that panics answers None and leaves the next request its own.
        let failed = flight
            .clone()
            .get_async(Instant::now(), || panic!("compute failed"))
            .await;
        assert_eq!(failed, None);
        assert_eq!(
            flight.get_async(Instant::now(), || "after").await,
            Some("after")
        );
    }
}
