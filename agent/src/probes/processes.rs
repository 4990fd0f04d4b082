//! Processes (kernel side: agent-ebpf/src/processes.rs): exec/exit events for discovery, and
//! the set of broker pids whose exit the kernel reports.

use std::time::Duration;

use aya::{
    Ebpf,
    maps::{Array, MapData},
};
use brokerscope_common::processes::{
    BROKER_PIDS_MAP, EVENT_EXEC, EVENT_EXIT, EXEC_WAKE_LAG_MS, PROCESS_EVENTS_MAP, ProcessEvent,
    ProcessOffsets, broker_bit,
};
use tokio::sync::mpsc;

use brokerscope_common::telemetry::Program;

use super::{
    error::ProbesError,
    lacks::Lacks,
    maps::{map_error, spawn_ring_channel, take_map},
    tracefs::Format,
};

/// What discovery hears from the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessSignal {
    Exec(u32),
    Exit(u32),
    /// Events were lost (ring or channel full): rescan /proc.
    Lost,
}

/// Capacity of the channel from the ring reader to discovery.
const CHANNEL_CAPACITY: usize = 4096;

/// The exec record's pid (the exec program needs it) and the exit record's `group_dead`
/// (optional: without it the program takes the leader's exit).
pub fn resolve_offsets(read: impl Fn(&str, &str) -> Format, lacks: &mut Lacks) -> ProcessOffsets {
    let exec = read("sched", "sched_process_exec");
    let exit = read("sched", "sched_process_exit");
    ProcessOffsets {
        exec_pid: lacks.offset(&[Program::ProcessExec], exec.field("pid", 4)),
        exit_group_dead: Lacks::optional(exit.field("group_dead", 1)),
    }
}

/// The broker pid set in the kernel.
pub struct BrokerPids {
    map: Array<MapData, u64>,
    /// The words last written, by index (the map holds exactly these non-zero words).
    words: std::collections::BTreeMap<u32, u64>,
}

impl BrokerPids {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, ProbesError> {
        Ok(Self {
            map: take_map(ebpf, BROKER_PIDS_MAP)?,
            words: std::collections::BTreeMap::new(),
        })
    }

    /// Takes over the words an earlier agent wrote, so the next [`Self::set`] clears those of
    /// brokers gone meanwhile.
    pub fn adopt(&mut self) {
        self.words = (0..self.map.len())
            .filter_map(|i| Some((i, self.map.get(&i, 0).ok()?)))
            .filter(|(_, word)| *word != 0)
            .collect();
    }

    /// Replaces the set with `pids`, writing only the words that change. A word is written
    /// whole: the kernel side only reads, and this is the only writer.
    pub fn set(&mut self, pids: &[u32]) -> Result<(), ProbesError> {
        let err = map_error(BROKER_PIDS_MAP);
        let mut wanted = std::collections::BTreeMap::<u32, u64>::new();
        for &pid in pids {
            let (word, bit) = broker_bit(pid);
            *wanted.entry(word).or_default() |= bit;
        }
        let touched: std::collections::BTreeSet<u32> =
            self.words.keys().chain(wanted.keys()).copied().collect();
        for word in touched {
            let value = wanted.get(&word).copied().unwrap_or(0);
            if self.words.get(&word).copied().unwrap_or(0) != value {
                self.map.set(word, value, 0).map_err(err)?;
            }
        }
        self.words = wanted;
        Ok(())
    }
}

/// Starts the task that drains the ring buffer into a bounded channel. When discovery falls
/// behind, it gets [`ProcessSignal::Lost`] and rescans.
pub fn spawn_reader(ebpf: &mut Ebpf) -> Result<mpsc::Receiver<ProcessSignal>, ProbesError> {
    spawn_ring_channel(
        ebpf,
        PROCESS_EVENTS_MAP,
        CHANNEL_CAPACITY,
        parse,
        ProcessSignal::Lost,
        Some(Duration::from_millis(EXEC_WAKE_LAG_MS)),
    )
}

fn parse(bytes: &[u8]) -> Option<ProcessSignal> {
    if bytes.len() < size_of::<ProcessEvent>() {
        return None;
    }
    // SAFETY: ProcessEvent is Pod and the slice is long enough; unaligned read.
    let event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ProcessEvent>()) };
    match event.kind {
        EVENT_EXEC => Some(ProcessSignal::Exec(event.pid)),
        EVENT_EXIT => Some(ProcessSignal::Exit(event.pid)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(e: ProcessEvent) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&e.kind.to_ne_bytes());
        v.extend_from_slice(&e.pid.to_ne_bytes());
        v.extend_from_slice(&e.ts_ns.to_ne_bytes());
        v
    }

    #[test]
    fn parses_events_and_ignores_garbage() {
        let exec = ProcessEvent {
            kind: EVENT_EXEC,
            pid: 42,
            ts_ns: 1,
        };
        assert_eq!(parse(&bytes(exec)), Some(ProcessSignal::Exec(42)));
        let exit = ProcessEvent {
            kind: EVENT_EXIT,
            pid: 7,
            ts_ns: 2,
        };
        assert_eq!(parse(&bytes(exit)), Some(ProcessSignal::Exit(7)));
        assert_eq!(
            parse(&bytes(ProcessEvent {
                kind: 99,
                pid: 1,
                ts_ns: 0
            })),
            None
        );
        assert_eq!(parse(&[1, 2, 3]), None);
    }
}
