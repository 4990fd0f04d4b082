//! What the loader reports about the programs: attached hooks, refused programs and what covers
//! for them, programs on standby, and the fill level of bounded maps. Plain data, below every
//! hook family's loader.

use brokerscope_common::telemetry::Program;

use super::pins::Held;

/// A program attached to its hook.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Attachment {
    pub program: &'static str,
    pub hook: &'static str,
    pub id: u32,
    /// `broker-only` or `node-wide` (see [`Program::scope`]).
    pub scope: &'static str,
}

/// A program the kernel refused, and what covers for it.
#[derive(Clone, Debug)]
pub struct Degraded {
    pub program: Program,
    /// One line.
    pub error: String,
    /// The kernel verifier's whole log, when it refused the program (for diagnostics).
    pub verifier_log: Option<String>,
}

impl Degraded {
    /// One line for /ready: program, hook, what happens instead, and why.
    pub fn describe(&self) -> String {
        format!(
            "{} ({}) not attached: {}; {}",
            self.program.name(),
            self.program.hook(),
            self.program.fallback().unwrap_or("no fallback"),
            self.error
        )
    }
}

/// A program on standby (see [`Program::standby`]): loaded at start, so the kernel's refusal
/// shows then, and attached only while its [`Standby`] condition holds.
pub(super) struct OnStandby {
    pub(super) program: Program,
    /// The loaded program's id.
    pub(super) id: u32,
    pub(super) link: Option<Held>,
}

/// Fill level of a bounded map.
#[derive(Clone, Debug)]
pub struct MapStats {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u32,
    /// Entries replaced while live, for a map that counts them (see `EVICTIONS_MAP`).
    pub evictions: Option<u64>,
}
