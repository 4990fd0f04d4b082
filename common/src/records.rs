//! The agent's own records, kept in maps beside the counters they describe so that they are
//! pinned, adopted and removed with them (see `agent/src/probes/pins.rs`). No program reads or
//! writes these maps: they exist in the object only so the loader creates and pins them with
//! the rest, in one layout.

use crate::sockets::ListenerKey;

/// Name of the one-entry array holding [`AgentMeta`].
pub const AGENT_META_MAP: &str = "AGENT_META";

/// When the counters in this set of maps began, and how often they were adopted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentMeta {
    /// Wall-clock time the maps were created (ns since the epoch); 0 until the first agent
    /// writes it. Every counter in them counts from then: `brokerscope_counters_start_time_seconds`.
    pub created_unix_ns: u64,
    /// Agent starts that adopted the maps after the one that created them.
    pub adoptions: u64,
}

/// Name of the array giving, by listener slot (the index into `LISTENERS`), the listener the
/// slot belongs to (a zero key: free). `WATCHED` says it only while the listener is watched;
/// a slot stays its listener's for a while after, and a restarted agent must still know whose
/// counters it holds. Sized as `LISTENERS`.
pub const SLOT_KEYS_MAP: &str = "SLOT_KEYS";

/// A [`SLOT_KEYS_MAP`] value.
pub type SlotKey = ListenerKey;

/// Name of the array holding the broker records (identity, process, restarts) as one byte
/// string cut into [`BROKER_RECORD_CHUNKS`] chunks of [`BROKER_RECORD_CHUNK`] bytes; the first
/// 8 bytes of chunk 0 are the string's length, little-endian.
pub const BROKER_RECORDS_MAP: &str = "BROKER_RECORDS";
/// Bytes per chunk (the map's value size).
pub const BROKER_RECORD_CHUNK: usize = 4096;
/// Chunks: 64 KiB in all, room for a few hundred brokers' records.
pub const BROKER_RECORD_CHUNKS: u32 = 16;
/// Longest record string that fits.
pub const BROKER_RECORDS_MAX: usize = BROKER_RECORD_CHUNK * BROKER_RECORD_CHUNKS as usize - 8;

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C) structs of integers with no padding.
    unsafe impl aya::Pod for super::AgentMeta {}
}
