//! Where the inventory of a process's log dirs is: taken on a file worker, so a huge or hung
//! log dir never holds the tracker, and tried again when it could not start.

use std::{
    path::PathBuf,
    sync::mpsc::Receiver,
    time::{Duration, Instant},
};

use super::inventory::Inventory;
use crate::broker::Broker;
use crate::files::{ConfinedError, ProcessRoot};

/// How long the tracker waits for an inventory before it says UNKNOWN (the listing goes on, off
/// its lock, and is used when it ends).
pub const INVENTORY_DEADLINE: Duration = Duration::from_secs(2);
/// A listing that could not start (an earlier one of the process still hangs, every file
/// worker busy) is tried again after this long.
pub(super) const INVENTORY_RETRY: Duration = Duration::from_secs(5);

/// Where the inventory of a process's log dirs is: listed on a file worker
/// ([`crate::files::workers::files`]), so a huge or hung log dir never holds the tracker.
#[derive(Debug)]
pub(super) enum Listing {
    Pending {
        since: Instant,
        done: Receiver<Result<Inventory, ConfinedError>>,
    },
    Done,
    /// Could not be listed (`retry`: the listing could not start, tried again after
    /// [`INVENTORY_RETRY`]).
    Failed {
        at: Instant,
        retry: bool,
    },
}

/// Lists the log dirs of `broker`'s process on a file worker (see [`Inventory::take`]).
pub(super) fn start_listing(broker: &Broker, files: &crate::files::Workers) -> Listing {
    let (pid, start, dirs) = (broker.pid, broker.start_time_ticks, broker.log_dirs.clone());
    let spawned = files.spawn(
        LISTING_KEY | u64::from(pid),
        format!("listing the log dirs of broker {} (pid {pid})", broker.id),
        INVENTORY_DEADLINE,
        move || {
            let dir = PathBuf::from(format!("/proc/{pid}"));
            ProcessRoot::open(&dir, pid, Some(start)).map(|root| Inventory::take(&root, &dirs))
        },
    );
    match spawned {
        Ok(done) => Listing::Pending {
            since: Instant::now(),
            done,
        },
        Err(e) => {
            tracing::info!(broker = %broker.id, pid, error = %e, "broker state: cannot list the log dirs now; tried again later");
            Listing::Failed {
                at: Instant::now(),
                retry: true,
            }
        }
    }
}

/// File-worker keys of log-dir listings (a pid's own reads, by discovery, use the pid).
const LISTING_KEY: u64 = 1 << 32;
