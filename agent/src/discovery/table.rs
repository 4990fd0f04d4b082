//! The brokers discovery tracks, keyed by id: which process is which broker, restarts, exits,
//! and the cap on how many are kept.
//!
//! Pure: whether a process still lives is asked through a closure, so restart detection is
//! unit-tested without processes.

use std::collections::{BTreeMap, HashSet};

use crate::broker::{Broker, IdSource, ProcessStatus, Remembered};

/// Most brokers tracked, running or not. A node hosts a handful; the cap bounds memory if a
/// pattern matches far more than intended.
pub const MAX_BROKERS: usize = 256;

/// A process: pid and start time (a reused pid has another start time).
pub type ProcessKey = (u32, u64);

/// What [`BrokerTable::observe`] did with a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    /// A broker id seen for the first time.
    New { id: String },
    /// A new process took over a known id: restarts was incremented.
    Restarted { id: String, restarts: u64 },
    /// The same process as before; nothing changed.
    Known { id: String },
    /// The table is full of running brokers; the process is not tracked.
    Full,
}

#[derive(Debug)]
struct Tracked {
    broker: Broker,
    /// Order in which records stopped running (the oldest goes first when full).
    stopped_seq: u64,
}

/// Brokers by id.
#[derive(Debug)]
pub struct BrokerTable {
    brokers: BTreeMap<String, Tracked>,
    capacity: usize,
    seq: u64,
    /// Brokers an earlier agent tracked, not seen since this one started (bounded as the
    /// table: what [`Self::remember`] was given).
    remembered: BTreeMap<String, Remembered>,
}

impl Default for BrokerTable {
    fn default() -> Self {
        Self::with_capacity(MAX_BROKERS)
    }
}

impl BrokerTable {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            brokers: BTreeMap::new(),
            capacity,
            seq: 0,
            remembered: BTreeMap::new(),
        }
    }

    /// Brokers an earlier agent tracked: when one is seen again, it keeps its restart count,
    /// one more if another process runs it now (it restarted while no agent watched).
    pub fn remember(&mut self, records: Vec<Remembered>) {
        self.remembered = records
            .into_iter()
            .take(self.capacity)
            .map(|r| (r.id.clone(), r))
            .collect();
    }

    /// The running broker with this pid, whatever its start time.
    pub fn running_pid(&self, pid: u32) -> Option<&Broker> {
        self.brokers
            .values()
            .map(|t| &t.broker)
            .find(|b| b.is_running() && b.pid == pid)
    }

    /// Records a broker process that discovery just examined. `alive` tells whether another
    /// process still runs (to tell a restart from two processes claiming one id).
    pub fn observe(&mut self, mut broker: Broker, alive: impl Fn(ProcessKey) -> bool) -> Observed {
        let process = (broker.pid, broker.start_time_ticks);
        // The pid's previous process (pid reuse, or an exec seen before its exit) is over.
        if let Some(old) = self
            .running_pid(broker.pid)
            .filter(|b| (b.pid, b.start_time_ticks) != process || b.id != broker.id)
            .map(|b| b.id.clone())
        {
            self.stop(&old);
        }
        if let Some(existing) = self.brokers.get(&broker.id).map(|t| &t.broker) {
            let existing_process = (existing.pid, existing.start_time_ticks);
            if existing.is_running() && existing_process == process {
                // Read again (after an exec): the newer facts replace the old, same identity.
                broker.restarts = existing.restarts;
                let id = broker.id.clone();
                if let Some(t) = self.brokers.get_mut(&id) {
                    t.broker = broker;
                }
                return Observed::Known { id };
            }
            if existing.is_running() && alive(existing_process) {
                // Two live processes claim one id: keep the first, track the second apart.
                broker.evidence.error(format!(
                    "broker id {} is already claimed by running pid {}",
                    broker.id, existing.pid
                ));
                broker.id = format!("pid-{}", broker.pid);
                broker.evidence.id_source = Some(IdSource::Pid);
                return self.observe(broker, alive);
            }
            broker.restarts = existing.restarts + 1;
            let (id, restarts) = (broker.id.clone(), broker.restarts);
            self.brokers.insert(
                id.clone(),
                Tracked {
                    broker,
                    stopped_seq: 0,
                },
            );
            return Observed::Restarted { id, restarts };
        }
        if self.brokers.len() >= self.capacity && !self.evict_oldest_stopped() {
            return Observed::Full;
        }
        let id = broker.id.clone();
        if let Some(earlier) = self.remembered.remove(&id) {
            let same = earlier.running && (earlier.pid, earlier.start_time_ticks) == process;
            broker.restarts = earlier.restarts + u64::from(!same);
            let restarts = broker.restarts;
            self.brokers.insert(
                id.clone(),
                Tracked {
                    broker,
                    stopped_seq: 0,
                },
            );
            return if same {
                Observed::Known { id }
            } else {
                Observed::Restarted { id, restarts }
            };
        }
        self.brokers.insert(
            id.clone(),
            Tracked {
                broker,
                stopped_seq: 0,
            },
        );
        Observed::New { id }
    }

    /// The process `pid` exited. Returns the id of the broker that stopped.
    pub fn exited(&mut self, pid: u32) -> Option<String> {
        let id = self.running_pid(pid)?.id.clone();
        self.stop(&id);
        Some(id)
    }

    /// After a full scan: every running broker whose process is not in `seen` has stopped.
    /// Returns the ids that stopped.
    pub fn stop_unseen(&mut self, seen: &HashSet<ProcessKey>) -> Vec<String> {
        let gone: Vec<String> = self
            .brokers
            .values()
            .map(|t| &t.broker)
            .filter(|b| b.is_running() && !seen.contains(&(b.pid, b.start_time_ticks)))
            .map(|b| b.id.clone())
            .collect();
        for id in &gone {
            self.stop(id);
        }
        gone
    }

    /// Applies `f` to every running broker (live config changes).
    pub fn update_running(&mut self, mut f: impl FnMut(&mut Broker)) {
        for t in self.brokers.values_mut().filter(|t| t.broker.is_running()) {
            f(&mut t.broker);
        }
    }

    /// Every broker, sorted by id: numeric ids in numeric order (2 before 10), then the others.
    pub fn snapshot(&self) -> Vec<Broker> {
        let mut out: Vec<Broker> = self.brokers.values().map(|t| t.broker.clone()).collect();
        out.sort_by(|a, b| id_order(&a.id).cmp(&id_order(&b.id)));
        out
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.brokers.len()
    }

    fn stop(&mut self, id: &str) {
        self.seq += 1;
        if let Some(t) = self.brokers.get_mut(id) {
            t.broker.state = ProcessStatus::NotRunning;
            t.stopped_seq = self.seq;
        }
    }

    fn evict_oldest_stopped(&mut self) -> bool {
        let oldest = self
            .brokers
            .iter()
            .filter(|(_, t)| !t.broker.is_running())
            .min_by_key(|(_, t)| t.stopped_seq)
            .map(|(id, _)| id.clone());
        match oldest {
            Some(id) => {
                self.brokers.remove(&id);
                true
            }
            None => false,
        }
    }
}

fn id_order(id: &str) -> (bool, u64, &str) {
    match id.parse::<u64>() {
        Ok(n) => (false, n, id),
        Err(_) => (true, 0, id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::tests::broker;

    fn with_start(mut b: Broker, start: u64) -> Broker {
        b.start_time_ticks = start;
        b
    }

    fn dead(_: ProcessKey) -> bool {
        false
    }

    fn state(t: &BrokerTable) -> Vec<(String, u32, ProcessStatus, u64)> {
        t.snapshot()
            .into_iter()
            .map(|b| (b.id, b.pid, b.state, b.restarts))
            .collect()
    }

    #[test]
    fn same_process_is_known_and_a_new_one_with_the_id_is_a_restart() {
        let mut t = BrokerTable::default();
        let b = broker("1", 100, 7, &[("P", 9092)]);
        assert_eq!(t.observe(b.clone(), dead), Observed::New { id: "1".into() });
        assert_eq!(t.observe(b, dead), Observed::Known { id: "1".into() });

        assert_eq!(t.exited(100), Some("1".into()));
        assert_eq!(t.exited(100), None);
        assert_eq!(
            state(&t),
            vec![("1".into(), 100, ProcessStatus::NotRunning, 0)]
        );

        // Same id, new pid: identity kept, one restart.
        let r = t.observe(broker("1", 200, 7, &[("P", 9092)]), dead);
        assert_eq!(
            r,
            Observed::Restarted {
                id: "1".into(),
                restarts: 1
            }
        );
        assert_eq!(
            state(&t),
            vec![("1".into(), 200, ProcessStatus::Running, 1)]
        );
    }

    #[test]
    fn a_restart_seen_before_the_exit_is_still_a_restart() {
        let mut t = BrokerTable::default();
        t.observe(broker("1", 100, 7, &[]), dead);
        // The old process is gone (alive says so) but no exit event came.
        assert_eq!(
            t.observe(broker("1", 101, 7, &[]), dead),
            Observed::Restarted {
                id: "1".into(),
                restarts: 1
            }
        );
        t.observe(broker("1", 102, 7, &[]), dead);
        assert_eq!(
            state(&t),
            vec![("1".into(), 102, ProcessStatus::Running, 2)]
        );
    }

    #[test]
    fn a_reused_pid_with_another_start_time_is_a_new_process() {
        let mut t = BrokerTable::default();
        t.observe(with_start(broker("1", 100, 7, &[]), 5), dead);
        assert_eq!(
            t.observe(with_start(broker("1", 100, 7, &[]), 6), dead),
            Observed::Restarted {
                id: "1".into(),
                restarts: 1
            }
        );
        // The pid now runs another broker id: the old record stops.
        assert_eq!(
            t.observe(with_start(broker("2", 100, 7, &[]), 9), dead),
            Observed::New { id: "2".into() }
        );
        assert_eq!(
            state(&t),
            vec![
                ("1".into(), 100, ProcessStatus::NotRunning, 1),
                ("2".into(), 100, ProcessStatus::Running, 0)
            ]
        );
    }

    #[test]
    fn two_live_processes_with_one_id_are_kept_apart() {
        let mut t = BrokerTable::default();
        t.observe(broker("1", 100, 7, &[]), dead);
        let r = t.observe(broker("1", 200, 8, &[]), |p| p.0 == 100);
        assert_eq!(
            r,
            Observed::New {
                id: "pid-200".into()
            }
        );
        let snap = t.snapshot();
        assert_eq!(snap[0].id, "1");
        assert_eq!((snap[0].pid, snap[0].restarts), (100, 0));
        assert_eq!(snap[1].id, "pid-200");
        assert_eq!(
            snap[1].evidence.errors,
            vec!["broker id 1 is already claimed by running pid 100"]
        );
    }

    #[test]
    fn unseen_processes_stop_after_a_full_scan() {
        let mut t = BrokerTable::default();
        t.observe(broker("1", 100, 7, &[]), dead);
        t.observe(broker("2", 200, 7, &[]), dead);
        let seen = HashSet::from([(200, 1200)]);
        assert_eq!(t.stop_unseen(&seen), vec!["1".to_string()]);
        assert_eq!(
            state(&t),
            vec![
                ("1".into(), 100, ProcessStatus::NotRunning, 0),
                ("2".into(), 200, ProcessStatus::Running, 0)
            ]
        );
    }

    #[test]
    fn full_table_evicts_the_longest_stopped_and_never_a_running_broker() {
        let mut t = BrokerTable::with_capacity(3);
        for (id, pid) in [("a", 1), ("b", 2), ("c", 3)] {
            t.observe(broker(id, pid, 7, &[]), dead);
        }
        assert_eq!(t.observe(broker("d", 4, 7, &[]), dead), Observed::Full);
        t.exited(2);
        t.exited(1);
        assert_eq!(
            t.observe(broker("d", 4, 7, &[]), dead),
            Observed::New { id: "d".into() }
        );
        // b stopped first, so b went.
        let ids: Vec<String> = t.snapshot().into_iter().map(|b| b.id).collect();
        assert_eq!(ids, vec!["a", "c", "d"]);
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn snapshot_orders_numeric_ids_numerically() {
        let mut t = BrokerTable::default();
        for (i, id) in ["10", "pod-a", "2", "0", "pid-7"].iter().enumerate() {
            t.observe(broker(id, i as u32 + 1, 7, &[]), dead);
        }
        let ids: Vec<String> = t.snapshot().into_iter().map(|b| b.id).collect();
        assert_eq!(ids, vec!["0", "2", "10", "pid-7", "pod-a"]);
    }
}

#[cfg(test)]
mod remembered_tests {
    use super::*;
    use crate::broker::tests::broker;

    fn record(id: &str, pid: u32, start: u64, restarts: u64, running: bool) -> Remembered {
        Remembered {
            id: id.into(),
            pid,
            start_time_ticks: start,
            restarts,
            running,
        }
    }

    fn started(id: &str, pid: u32, start: u64) -> Broker {
        let mut b = broker(id, pid, 1, &[]);
        b.start_time_ticks = start;
        b
    }

    #[test]
    fn an_earlier_agents_brokers_keep_their_restarts_and_count_one_missed_restart() {
        let mut t = BrokerTable::default();
        t.remember(vec![
            record("1", 100, 7, 3, true),
            record("2", 200, 8, 1, true),
            record("3", 300, 9, 5, false),
        ]);
        // The same process: nothing happened while no agent watched.
        assert_eq!(
            t.observe(started("1", 100, 7), |_| false),
            Observed::Known { id: "1".into() }
        );
        // Another process runs broker 2, and broker 3 (stopped then) runs again: a restart each.
        assert_eq!(
            t.observe(started("2", 201, 50), |_| false),
            Observed::Restarted {
                id: "2".into(),
                restarts: 2
            }
        );
        assert_eq!(
            t.observe(started("3", 300, 60), |_| false),
            Observed::Restarted {
                id: "3".into(),
                restarts: 6
            }
        );
        let restarts: Vec<(String, u64)> = t
            .snapshot()
            .into_iter()
            .map(|b| (b.id, b.restarts))
            .collect();
        assert_eq!(
            restarts,
            [("1".into(), 3), ("2".into(), 2), ("3".into(), 6)]
        );
        // A record is used once: the next process of broker 1 is an ordinary restart.
        assert_eq!(
            t.observe(started("4", 400, 70), |_| false),
            Observed::New { id: "4".into() }
        );
        let back: Vec<Remembered> = t.snapshot().iter().map(Remembered::of).collect();
        assert_eq!(back[0], record("1", 100, 7, 3, true));
    }
}
