//! A starting process's descriptor poll: where it is ([`FdWatch`]), one poll of it
//! ([`Watching::poll_once`]) and how polls are paced.

use std::time::{Duration, Instant};

use super::fds::{FdPoll, FdPollError};

/// How often the tracker's thread ticks while some process is having its descriptors polled
/// (otherwise every 250 ms): a segment opened is seen within about this long.
pub const POLL_TICK: Duration = Duration::from_millis(100);
/// A process whose descriptors took `d` to list is listed again no sooner than `POLL_PACE·d`
/// after, so the listing, which every poll pays however little changed, takes at most
/// 1/`POLL_PACE` of a core: the kernel lists about one descriptor a µs (10,000 in 9-30 ms here,
/// so every 200-600 ms rather than every tick; [`fds::MAX_FDS`](super::fds::MAX_FDS), ~0.3 s,
/// every ~6 s). Listings of up to `POLL_TICK / POLL_PACE` (a few thousand descriptors) run
/// every tick. Link reads are not paced: each new descriptor is read once, at most
/// [`MAX_LINKS_PER_POLL`] a poll.
pub const POLL_PACE: u32 = 20;
/// Descriptor links read per process and poll. A broker that opened more since the last poll
/// has the rest read on the next ones (tens of thousands a second at [`POLL_TICK`]); it bounds
/// how long one poll holds the tracker's lock (4096 links take 15-40 ms here, ~4 µs each).
pub const MAX_LINKS_PER_POLL: usize = 4096;

/// Where a process's descriptor poll is.
#[derive(Debug)]
pub(super) enum FdWatch {
    /// Not polled yet: the first tick that finds the process starting begins.
    Idle,
    Polling(Box<Watching>),
    /// Never again for this process.
    Stopped,
}

/// A descriptor poll in progress, and what it saw (for its last log line).
#[derive(Debug)]
pub(super) struct Watching {
    /// None until `/proc/<pid>/fd` could be opened (retried every tick).
    poll: Option<FdPoll>,
    pub(super) since: Instant,
    /// No poll before (see [`POLL_PACE`]).
    pub(super) not_before: Option<Instant>,
    pub(super) polls: u64,
    /// Time spent polling.
    pub(super) busy: Duration,
    /// Tracked segments this poll saw opened first.
    pub(super) segments_opened: u64,
    /// The last error was logged (debug) once.
    pub(super) error_logged: bool,
}

impl Watching {
    /// A poll beginning now, its descriptor directory not opened yet.
    pub(super) fn new() -> Self {
        Watching {
            poll: None,
            since: Instant::now(),
            not_before: None,
            polls: 0,
            busy: Duration::ZERO,
            segments_opened: 0,
            error_logged: false,
        }
    }

    /// One poll of process `pid`'s descriptors (opening `/proc/<pid>/fd` first if it is not
    /// yet): each new link's path goes to `saw`, which says whether it was a tracked segment
    /// not opened before, whether it told something new, and whether its number is to be read
    /// again at each poll (see [`FdPoll::poll`]). At most [`MAX_LINKS_PER_POLL`]
    /// links are read; the poll and its time are counted, and the next one paced. Returns
    /// whether any path told something new.
    pub(super) fn poll_once(
        &mut self,
        pid: u32,
        start_time_ticks: u64,
        mut saw: impl FnMut(&str) -> (bool, bool, bool),
    ) -> Result<bool, FdPollError> {
        let started = Instant::now();
        let result = match self.poll.as_mut() {
            Some(poll) => Ok(poll),
            None => FdPoll::open(pid, start_time_ticks).map(|p| self.poll.insert(p)),
        }
        .and_then(|poll| {
            let mut opened = 0;
            let mut news = false;
            poll.poll(MAX_LINKS_PER_POLL, |path| {
                let (first, new, watch) = saw(path);
                news |= new;
                opened += u64::from(first);
                !watch
            })
            .map(|stats| (opened, news, stats.listing))
        });
        self.polls += 1;
        self.busy += started.elapsed();
        let (opened, news, listing) = result?;
        self.segments_opened += opened;
        self.not_before = paced(started, listing);
        Ok(news)
    }
}

/// When a poll that began at `started` and listed in `listing` lets the next one run: None
/// (next tick) when the listing was cheap.
pub(super) fn paced(started: Instant, listing: Duration) -> Option<Instant> {
    (listing > POLL_TICK / POLL_PACE).then(|| started + listing * POLL_PACE)
}
