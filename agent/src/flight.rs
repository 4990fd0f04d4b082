//! Single flight: concurrent requests for an expensive, always-fresh value share one
//! computation.
//!
//! A request gets a value whose computation started after it arrived, or joins the computation
//! in progress when it got there. So concurrent requests cost one computation and wait at most
//! one; none sees state from before the computation in progress at its arrival (the value is at
//! most one computation old), and a lone request always gets a value of its own.

use std::{
    sync::{Condvar, Mutex},
    time::Instant,
};

pub struct Flight<T> {
    state: Mutex<State<T>>,
    /// Signalled when a computation ends (done or unwound).
    done: Condvar,
}

struct State<T> {
    /// Computations completed so far.
    generation: u64,
    computing: bool,
    /// The last value and when its computation started.
    last: Option<(Instant, T)>,
}

impl<T> Default for Flight<T> {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                generation: 0,
                computing: false,
                last: None,
            }),
            done: Condvar::new(),
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
            state = self.done.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.computing = true;
        drop(state);
        // Clears `computing` and wakes the waiters even if `compute` panics: they then compute
        // their own.
        let computing = Computing(self);
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
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Computing<'a, T>(&'a Flight<T>);

impl<T> Drop for Computing<'_, T> {
    fn drop(&mut self) {
        self.0.lock().computing = false;
        self.0.done.notify_all();
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
}
