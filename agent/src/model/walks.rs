//! The background walk of the open sockets, on its own thread, when a walk is too dear for a
//! scrape to do it.

use super::Model;
use crate::locks::lock;

/// How often the walk thread looks whether a background walk is due.
const WALK_RECHECK: std::time::Duration = std::time::Duration::from_millis(100);

impl Model {
    /// The thread that walks the open sockets when a walk is too dear for a scrape to do it
    /// (see [`crate::probes::live`]): it looks every [`WALK_RECHECK`] whether one is due.
    pub fn spawn_walk_thread(self: &std::sync::Arc<Self>) {
        let model = std::sync::Arc::downgrade(self);
        let spawned = crate::tasks::thread("walks", move || {
            loop {
                std::thread::sleep(WALK_RECHECK);
                let Some(model) = model.upgrade() else { return };
                model.walk_if_due();
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the walk thread: scrapes walk the open sockets themselves");
        }
    }

    /// One background walk, if due: its iterators are read without the probes lock, so
    /// scrapes meanwhile read the maps and the previous walk.
    fn walk_if_due(&self) {
        let pids: Vec<u32> = self
            .brokers()
            .iter()
            .filter(|b| b.is_running())
            .map(|b| b.pid)
            .collect();
        let walk = {
            let mut probes = lock(&self.probes);
            let Some(p) = probes.as_mut().filter(|p| p.walk_due()) else {
                return;
            };
            p.begin_walk(&pids)
        };
        let (walked, failed) = walk.read();
        if let Some(p) = lock(&self.probes).as_mut() {
            p.finish_walk(walked, &failed);
        }
    }
}
