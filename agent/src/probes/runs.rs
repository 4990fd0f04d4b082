//! How often and how long the loaded programs ran, as the kernel counts it: what the diagnostics
//! bundle reports. The kernel counts run time only while someone holds a `BPF_ENABLE_STATS`
//! fd ([`RunTimeStats`]), which costs every program a clock read per run.

use std::{collections::HashMap, os::fd::OwnedFd, time::Duration};

/// Program counters as the kernel reports them, by program id.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProgramRun {
    pub run_count: u64,
    pub run_time: Duration,
}

/// The counters of the programs among `ids` that are loaded now.
pub fn program_runs(ids: &[u32]) -> HashMap<u32, ProgramRun> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| ids.contains(&p.id()))
        .map(|p| {
            (
                p.id(),
                ProgramRun {
                    run_count: p.run_count(),
                    run_time: p.run_time(),
                },
            )
        })
        .collect()
}

/// The kernel counts programs' run time while this lives.
pub struct RunTimeStats {
    _fd: OwnedFd,
}

/// The kernel refused to count run time (`BPF_ENABLE_STATS`).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct RunTimeStatsError(#[from] aya::sys::SyscallError);

/// Turns on run-time counting until the returned guard is dropped.
pub fn enable_run_time_stats() -> Result<RunTimeStats, RunTimeStatsError> {
    let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    Ok(RunTimeStats { _fd: fd })
}
