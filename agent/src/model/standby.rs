//! The standby programs: attached by their own thread while some running broker needs them,
//! detached once none has for [`STANDBY_LINGER`].

use super::{LastWanted, Model};
use crate::broker::Broker;
use crate::locks::{Recover as _, lock};

/// A standby program stays attached this long after the last time it was wanted, so a broker
/// that comes and goes does not make the agent attach and detach each time (detaching waits
/// for an RCU grace period per program: 72-80 ms each, measured here).
pub const STANDBY_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// How often the demand thread passes without being asked.
const DEMAND_RECHECK: std::time::Duration = std::time::Duration::from_millis(250);

impl Model {
    /// Asks the demand thread to attach the standby programs (see
    /// [`brokerscope_common::telemetry::Program::standby`]) a running broker needs now and to
    /// detach those no broker has needed for [`STANDBY_LINGER`]: the file-open hooks while a
    /// broker has not been seen RUNNING yet, the syscall fsync hooks while a broker has a log
    /// dir off ext4 (or the ext4 hooks are not attached). Cheap: callers (discovery, the state
    /// tick) never wait for an attach.
    pub fn sync_demand(&self) {
        *lock(&self.demand.pending) = true;
        self.demand.wake.notify_one();
    }

    /// The thread behind [`Model::sync_demand`]. Each pass works the demand out from the
    /// current broker table and state tracker, so requests coalesce and the last pass's answer
    /// stands; it also passes every [`DEMAND_RECHECK`] to let lingering programs go.
    pub fn spawn_demand_thread(self: &std::sync::Arc<Self>) {
        let model = std::sync::Arc::downgrade(self);
        let spawned = crate::tasks::thread("standby", move || {
            let mut last_wanted = LastWanted::default();
            loop {
                let Some(model) = model.upgrade() else { return };
                {
                    let pending = lock(&model.demand.pending);
                    let (mut pending, _) = model
                        .demand
                        .wake
                        .wait_timeout_while(pending, DEMAND_RECHECK, |p| !*p)
                        .recover();
                    *pending = false;
                }
                model.apply_demand(&mut last_wanted);
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the standby thread: standby programs stay detached");
        }
    }

    fn apply_demand(&self, last_wanted: &mut LastWanted) {
        let cover = {
            let mut probes = lock(&self.probes);
            let Some(p) = probes.as_mut() else { return };
            // A filesystem mounted after the start loads its module, and with it its fsync
            // tracepoint: its program attaches then.
            if p.attach_appeared_tracepoints() {
                let mut status = self.status_mut();
                status.attached = p.attached().to_vec();
                status.degraded = p.degraded().iter().map(|d| d.describe()).collect();
                status.missing = p.missing();
                status.fsync_cover = p.fsync_cover();
            }
            p.fsync_cover()
        };
        let wanted = {
            // Copied out first: `states()` takes the tracker's lock and then the table's, so
            // the table's must not be held while waiting for the tracker's.
            let running: Vec<Broker> = self
                .brokers_state()
                .brokers
                .iter()
                .filter(|b| b.is_running())
                .cloned()
                .collect();
            // The tracker as it is: a broker it has not followed yet counts as starting.
            let states = lock(&self.states);
            crate::probes::Demand {
                broker_starting: running
                    .iter()
                    .any(|b| !states.settled(&b.id, b.pid, b.start_time_ticks)),
                fsync_uncovered: running
                    .iter()
                    .any(|b| !b.log_dirs_covered(|fs| cover.covers(fs))),
            }
        };
        let now = std::time::Instant::now();
        let linger = |want: bool, last: &mut Option<std::time::Instant>| {
            if want {
                *last = Some(now);
            }
            last.is_some_and(|t| now.duration_since(t) < STANDBY_LINGER)
        };
        let demand = crate::probes::Demand {
            broker_starting: linger(wanted.broker_starting, &mut last_wanted.broker_starting),
            fsync_uncovered: linger(wanted.fsync_uncovered, &mut last_wanted.fsync_uncovered),
        };
        let (attached, detached) = {
            let mut probes = lock(&self.probes);
            let Some(p) = probes.as_mut() else { return };
            let (changed, detached) = p.set_demand(demand);
            if !changed {
                return;
            }
            (p.attached().to_vec(), detached)
        };
        self.status_mut().attached = attached;
        // Detached here, with no lock held: each waits for an RCU grace period.
        drop(detached);
    }
}
