//! Open sockets: the bytes of connections still open and the listening sockets' drops, read by
//! walking (the map iterators over the tracked connections and listeners, or each watched
//! namespace's socket table where the kernel refuses map iterators) — and when a walk is costly,
//! walked by a thread of its own on a period, not by each scrape, so a scrape costs the same
//! with ten or fifty thousand connections open.
//!
//! A walk has three steps, so that its costly one runs without the probes lock:
//! [`super::Probes::begin_walk`] (locked: the closed connections' totals, then one iterator
//! file per map and per namespace to sweep), [`Walk::read`] (unlocked: the kernel runs the
//! iterators while their files are read), [`super::Probes::finish_walk`] (locked: sweeps that
//! failed are redone next time, the result is kept in [`Walks`]).
//!
//! Exactness: a walk's byte totals are the closed connections' totals read *before* it plus the
//! open connections' bytes it found, so never more than the truth at its end (a connection
//! closing in between is missed by both, never counted twice). A scrape reports, per listener,
//! the largest of the last walk's totals, the closed totals it reads itself and what it last
//! reported: monotonic, never above the truth, exact once the connections have closed, and
//! behind the truth by at most what open connections moved since the last walk.

use std::{
    collections::HashMap,
    fs::File,
    time::{Duration, Instant},
};

use brokerscope_common::sockets::ListenerKey;

use super::sockets::{self, Live};

/// A walk cheaper than this runs inside the scrape (fresh and exact, the common case); one
/// dearer moves walks to the background thread. Half of it moves them back.
pub const INLINE_BUDGET: Duration = Duration::from_millis(1);
/// Background walks run at least this often...
pub const PERIOD: Duration = Duration::from_secs(1);
/// ...and take at most 1/this of a CPU: the period is at least this many walks long.
const CPU_SHARE: u32 = 50;
/// Background walks stop this long after the last scrape (an unscraped agent walks nothing);
/// the next scrape walks itself, once, and starts them again.
const DEMAND: Duration = Duration::from_secs(300);

/// What one walk found, per listener.
#[derive(Debug, Default)]
pub struct Walked {
    /// When the walk ended, and how long it took.
    pub at: Option<Instant>,
    pub took: Duration,
    /// Closed totals read before the walk plus the open connections' bytes: (sent, received).
    pub bytes: HashMap<ListenerKey, (u64, u64)>,
    /// `sk_drops` of each listening socket the walk saw.
    pub drops: HashMap<ListenerKey, u64>,
}

/// Iterator files opened under the probes lock, read without it.
pub struct Walk {
    /// The closed connections' (sent, received) per listener, read before the walk.
    pub closed: HashMap<ListenerKey, (u64, u64)>,
    /// Map iterator instances, by program name.
    pub maps: Vec<(&'static str, File)>,
    /// Socket-table iterator instances, by namespace inode.
    pub sweeps: Vec<(u32, File)>,
    /// Namespaces whose iterator could not be opened.
    pub failed: Vec<u32>,
    /// Most records read from one iterator.
    pub max_records: usize,
}

impl Walk {
    /// Runs every iterator (the costly part: the kernel walks as the files are read).
    pub fn read(self) -> (Walked, Vec<u32>) {
        let started = Instant::now();
        let mut live = Live::default();
        let mut failed = self.failed;
        for (program, file) in self.maps {
            match sockets::read_records(file, self.max_records) {
                Ok(records) => live.add(&records),
                Err(e) => tracing::warn!(program, error = %e, "cannot read"),
            }
        }
        for (inode, file) in self.sweeps {
            match sockets::read_records(file, self.max_records) {
                Ok(records) => {
                    tracing::debug!(netns = inode, records = records.len(), "live sockets read");
                    live.add(&records);
                }
                Err(e) => {
                    tracing::warn!(netns = inode, error = %e, "cannot read live sockets");
                    failed.push(inode);
                }
            }
        }
        let mut bytes = self.closed;
        for (key, (sent, received)) in live.sent {
            let e = bytes.entry(key).or_default();
            e.0 += sent;
            e.1 += received;
        }
        let walked = Walked {
            at: Some(Instant::now()),
            took: started.elapsed(),
            bytes,
            drops: live.drops,
        };
        (walked, failed)
    }
}

/// The last walk, and whether walks run in the scrape or on the background thread.
#[derive(Debug, Default)]
pub struct Walks {
    last: Walked,
    background: bool,
    /// When a scrape last wanted a walk.
    wanted: Option<Instant>,
}

impl Walks {
    /// The background period: [`PERIOD`], or longer when walks are so dear that it would cost
    /// more than 1/[`CPU_SHARE`] of a CPU.
    pub fn period(&self) -> Duration {
        PERIOD.max(self.last.took * CPU_SHARE)
    }

    /// For a scrape at `now`: the last walk when it serves (walks run in the background and it
    /// is recent), or None: walk now.
    pub fn for_scrape(&mut self, now: Instant) -> Option<&Walked> {
        self.wanted = Some(now);
        let at = self.last.at?;
        // Two periods: the thread is behind or stopped (no scrape for `DEMAND`).
        (self.background && now.saturating_duration_since(at) <= self.period() * 2)
            .then_some(&self.last)
    }

    /// Whether the background thread should walk now.
    pub fn due(&self, now: Instant) -> bool {
        self.background
            && self
                .wanted
                .is_some_and(|w| now.saturating_duration_since(w) < DEMAND)
            && self
                .last
                .at
                .is_none_or(|at| now.saturating_duration_since(at) >= self.period())
    }

    /// Keeps a walk's result; a dear walk moves walks to the background, a cheap one back.
    pub fn record(&mut self, walked: Walked) {
        if walked.took > INLINE_BUDGET {
            if !self.background {
                tracing::info!(
                    took_ms = walked.took.as_secs_f64() * 1e3,
                    period_s = PERIOD.max(walked.took * CPU_SHARE).as_secs_f64(),
                    "open sockets: a walk costs more than a scrape should; walking them in the background"
                );
            }
            self.background = true;
        } else if walked.took < INLINE_BUDGET / 2 {
            self.background = false;
        }
        self.last = walked;
    }

    pub fn last(&self) -> &Walked {
        &self.last
    }

    /// Whether walks run in the background.
    pub fn background(&self) -> bool {
        self.background
    }
}

/// Opens every iterator in `walk`'s plan; a namespace whose iterator cannot be opened is failed.
pub fn open_sweeps(prog: &mut aya::programs::Iter, handles: Vec<(u32, File)>, walk: &mut Walk) {
    for (inode, handle) in handles {
        match sockets::open_in(prog, &handle) {
            Ok(file) => walk.sweeps.push((inode, file)),
            Err(e) => {
                tracing::warn!(netns = inode, error = %e, "cannot read live sockets");
                walk.failed.push(inode);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walked(took: Duration, at: Instant) -> Walked {
        Walked {
            at: Some(at),
            took,
            ..Walked::default()
        }
    }

    #[test]
    fn cheap_walks_run_in_the_scrape_and_dear_ones_in_the_background() {
        let now = Instant::now();
        let mut walks = Walks::default();
        assert!(walks.for_scrape(now).is_none(), "nothing walked yet");
        walks.record(walked(Duration::from_micros(300), now));
        assert!(
            walks.for_scrape(now).is_none(),
            "a cheap walk: walk in the scrape"
        );
        assert!(!walks.due(now));

        walks.record(walked(Duration::from_millis(40), now));
        assert!(walks.background());
        assert_eq!(walks.period(), Duration::from_secs(2), "50 walks of 40 ms");
        assert!(walks.for_scrape(now).is_some(), "served from the last walk");
        assert!(!walks.due(now + Duration::from_millis(1999)));
        assert!(walks.due(now + Duration::from_secs(2)));
        // Four seconds without a background walk: the thread is behind, the scrape walks.
        assert!(
            walks
                .for_scrape(now + Duration::from_millis(4001))
                .is_none()
        );

        // Hysteresis: between half the budget and the budget, the mode stays.
        walks.record(walked(INLINE_BUDGET * 3 / 4, now));
        assert!(walks.background());
        walks.record(walked(INLINE_BUDGET / 4, now));
        assert!(!walks.background());
        assert_eq!(walks.period(), PERIOD);
    }

    #[test]
    fn background_walks_stop_without_scrapes() {
        let now = Instant::now();
        let mut walks = Walks::default();
        walks.record(walked(Duration::from_millis(5), now));
        assert!(!walks.due(now), "no scrape has wanted one yet");
        let _ = walks.for_scrape(now);
        assert!(walks.due(now + PERIOD));
        assert!(
            !walks.due(now + DEMAND + PERIOD),
            "no scrape for five minutes"
        );
    }

    #[test]
    fn a_walk_adds_open_bytes_to_the_closed_totals_read_before_it() {
        let key = ListenerKey::new(7, 9092);
        let walk = Walk {
            closed: HashMap::from([(key, (100, 200))]),
            maps: Vec::new(),
            sweeps: Vec::new(),
            failed: vec![3],
            max_records: 16,
        };
        let (walked, failed) = walk.read();
        assert_eq!(walked.bytes.get(&key), Some(&(100, 200)));
        assert_eq!(failed, vec![3]);
        assert!(walked.at.is_some());
    }
}
