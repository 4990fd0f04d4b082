//! What the tracker knows about one broker process, and how it learns it: the inventory's
//! listing, the opens seen, the descriptor poll while it starts, the listening check.

use std::time::{Duration, Instant};

use super::fds::FdPollError;
use super::inventory::Inventory;
use super::listen::{LISTEN_RECHECK, Listening, listening, wanted_ports};
use super::listing::{INVENTORY_RETRY, Listing, start_listing};
use super::polling::{FdWatch, Watching};
use crate::broker::Broker;

/// What the tracker knows about one broker process.
#[derive(Debug)]
pub(super) struct Process {
    pub(super) pid: u32,
    pub(super) start_time_ticks: u64,
    /// Empty until `listing` is done.
    pub(super) inventory: Inventory,
    pub(super) listing: Listing,
    /// A tracked segment was opened: recovery began.
    pub(super) recovery_seen: bool,
    pub(super) recovery_over: bool,
    pub(super) last_open: Option<Instant>,
    pub(super) sigterm: bool,
    /// Every listener was seen listening once: RUNNING until shutdown.
    pub(super) running: bool,
    /// The last listening check and its answer (reading `/proc/<pid>/net/tcp` of a namespace
    /// with thousands of sockets takes tens of ms: checked at most every [`LISTEN_RECHECK`]).
    listen_checked: Option<(Instant, Listening)>,
    /// The poll of its open descriptors.
    pub(super) fds: FdWatch,
    /// The descriptor poll failed for a reason other than the process's exit (no privilege to
    /// inspect it): recovery cannot be seen.
    fds_unreadable: bool,
}

impl Process {
    pub(super) fn new(broker: &Broker, files: &crate::files::Workers) -> Self {
        Process {
            pid: broker.pid,
            start_time_ticks: broker.start_time_ticks,
            inventory: Inventory::default(),
            listing: start_listing(broker, files),
            recovery_seen: false,
            recovery_over: false,
            last_open: None,
            sigterm: false,
            running: false,
            listen_checked: None,
            fds: FdWatch::Idle,
            fds_unreadable: false,
        }
    }

    /// Takes the inventory if its listing ended (waiting at most `wait`), or starts the listing
    /// again after a failure to start. Whether it is done.
    pub(super) fn collect_listing(
        &mut self,
        broker: &Broker,
        id: &str,
        files: &crate::files::Workers,
        wait: Duration,
    ) -> bool {
        let (since, done) = match &self.listing {
            Listing::Done => return true,
            Listing::Failed { at, retry } => {
                if *retry && at.elapsed() >= INVENTORY_RETRY {
                    self.listing = start_listing(broker, files);
                }
                return false;
            }
            Listing::Pending { since, done } => (since, done),
        };
        let result = if wait.is_zero() {
            done.try_recv()
                .map_err(|e| e == std::sync::mpsc::TryRecvError::Disconnected)
        } else {
            done.recv_timeout(wait)
                .map_err(|e| e == std::sync::mpsc::RecvTimeoutError::Disconnected)
        };
        let took = since.elapsed();
        match result {
            Ok(Ok(inventory)) => {
                tracing::info!(
                    broker = %id,
                    pid = self.pid,
                    logs = inventory.logs_remaining,
                    segments = inventory.segments_remaining,
                    listing_ms = took.as_millis() as u64,
                    "broker state: log segments counted"
                );
                self.inventory = inventory;
                self.listing = Listing::Done;
                true
            }
            Ok(Err(e)) => {
                tracing::info!(broker = %id, pid = self.pid, error = %e, "broker state: cannot list the log dirs; recovery cannot be seen");
                self.listing = Listing::Failed {
                    at: Instant::now(),
                    retry: false,
                };
                false
            }
            // The worker ended without an answer (it panicked).
            Err(true) => {
                tracing::warn!(broker = %id, pid = self.pid, "broker state: listing the log dirs failed; tried again later");
                self.listing = Listing::Failed {
                    at: Instant::now(),
                    retry: true,
                };
                false
            }
            Err(false) => false,
        }
    }

    /// Why recovery cannot be seen for this process, if it cannot.
    pub(super) fn recovery_unseen(&self, broker: &Broker) -> Option<&'static str> {
        if broker.log_dirs.is_empty() {
            Some("log dirs unknown (properties not read)")
        } else if matches!(self.listing, Listing::Pending { .. }) {
            Some("log dirs not listed yet")
        } else if matches!(self.listing, Listing::Failed { .. }) {
            Some("log dirs could not be listed")
        } else if self.fds_unreadable {
            Some("open descriptors unreadable")
        } else {
            None
        }
    }

    /// Counts an open of `path` (as the broker sees it) against the inventory, from the
    /// descriptor poll or an `openat` hook; whether it told something new.
    pub(super) fn saw_open(&mut self, path: &str) -> bool {
        if self.inventory.opened(path) {
            self.recovery_seen = true;
            self.last_open = Some(Instant::now());
            true
        } else if self.recovery_seen && self.inventory.under_log_dirs(path) {
            self.last_open = Some(Instant::now());
            true
        } else {
            false
        }
    }

    /// Past the point where its opens matter: RUNNING (latched), recovery over, or SIGTERM.
    fn past_recovery(&self) -> Option<&'static str> {
        if self.sigterm {
            Some("SIGTERM delivered")
        } else if self.running {
            Some("RUNNING")
        } else if self.recovery_over {
            Some("recovery over")
        } else {
            None
        }
    }

    /// Polls the open descriptors while the process is starting (stopping for good once it is
    /// not), paced by [`POLL_PACE`](super::polling::POLL_PACE) when `pace`; whether a segment
    /// was seen opened.
    pub(super) fn poll_fds(&mut self, id: &str, pace: bool) -> bool {
        let Some(mut watch) = self.due_poll(id, pace) else {
            return false;
        };
        let (pid, start_time_ticks) = (self.pid, self.start_time_ticks);
        let result = watch.poll_once(pid, start_time_ticks, |path| {
            let first = self.inventory.segments.contains_key(path);
            // Anything else in the log dirs (a directory being listed, the log dir itself, a
            // checkpoint, an index) is open for a moment: its number is read again at each
            // poll, or a segment opened under it before the next poll would go unseen.
            let watch = !first && self.inventory.in_log_dirs(path);
            (first, self.saw_open(path), watch)
        });
        let news = match result {
            Ok(news) => {
                self.fds_unreadable = false;
                news
            }
            Err(FdPollError::Gone { .. }) => {
                self.fds = FdWatch::Polling(watch);
                self.stop_polling(id, "process gone");
                return false;
            }
            // Denied (a process the agent may not inspect) or odd: not worth more than a debug
            // line, once; retried on the next tick.
            Err(e) => {
                self.fds_unreadable = true;
                if !watch.error_logged {
                    tracing::debug!(
                        broker = %id,
                        pid = self.pid,
                        error = %e,
                        "broker state: cannot poll open descriptors"
                    );
                    watch.error_logged = true;
                }
                false
            }
        };
        self.fds = FdWatch::Polling(watch);
        news
    }

    /// The descriptor poll to run now, taken out of `fds` (the caller puts it back), beginning
    /// it on the first call; None when none is due: past recovery (the poll stops for good),
    /// the inventory not taken yet, stopped, or paced.
    fn due_poll(&mut self, id: &str, pace: bool) -> Option<Box<Watching>> {
        if let Some(reason) = self.past_recovery() {
            self.stop_polling(id, reason);
            return None;
        }
        if !matches!(self.listing, Listing::Done) {
            // Opens seen before the inventory would be lost: each descriptor is read once.
            return None;
        }
        match std::mem::replace(&mut self.fds, FdWatch::Stopped) {
            FdWatch::Stopped => None,
            FdWatch::Polling(watch) => {
                if pace && watch.not_before.is_some_and(|t| Instant::now() < t) {
                    self.fds = FdWatch::Polling(watch);
                    return None;
                }
                Some(watch)
            }
            FdWatch::Idle => {
                tracing::info!(
                    broker = %id,
                    pid = self.pid,
                    logs = self.inventory.logs_remaining,
                    segments = self.inventory.segments_remaining,
                    "broker state: polling open descriptors while the broker starts"
                );
                Some(Box::new(Watching::new()))
            }
        }
    }

    /// Ends the descriptor poll for good, logging what it saw if it ran.
    pub(super) fn stop_polling(&mut self, id: &str, reason: &'static str) {
        if let FdWatch::Polling(w) = std::mem::replace(&mut self.fds, FdWatch::Stopped) {
            tracing::info!(
                broker = %id,
                pid = self.pid,
                reason,
                segments_opened = w.segments_opened,
                segments_remaining = self.inventory.segments_remaining,
                polls = w.polls,
                poll_ms = %format_args!("{:.1}", w.busy.as_secs_f64() * 1e3),
                polled_for_ms = w.since.elapsed().as_millis() as u64,
                "broker state: stopped polling open descriptors"
            );
        }
    }

    /// Whether every listener listens. `read`: may read /proc (the tracker's own thread);
    /// otherwise (requests) the last answer is used, "not yet" when there is none.
    pub(super) fn listening(&mut self, broker: &Broker, read: bool) -> Listening {
        if wanted_ports(broker).is_empty() {
            return Listening::Unknown("no listener port known");
        }
        match self.listen_checked {
            Some((at, answer)) if !read || at.elapsed() < LISTEN_RECHECK => answer,
            None if !read => Listening::Unknown("listening not checked yet"),
            _ => {
                let answer = listening(broker);
                self.listen_checked = Some((Instant::now(), answer));
                answer
            }
        }
    }
}
