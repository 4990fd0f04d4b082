//! The agent's own records (see `brokerscope_common::records`): maps no program touches, in
//! the object so the loader creates and pins them with the counters they describe.

use aya_ebpf::{macros::map, maps::Array};
use brokerscope_common::{
    records::{AgentMeta, BROKER_RECORD_CHUNK, BROKER_RECORD_CHUNKS, SlotKey},
    sockets::LISTENERS_CAPACITY,
};

#[map(name = "AGENT_META")]
static AGENT_META: Array<AgentMeta> = Array::with_max_entries(1, 0);

/// Sized as `LISTENERS` by the loader.
#[map(name = "SLOT_KEYS")]
static SLOT_KEYS: Array<SlotKey> = Array::with_max_entries(LISTENERS_CAPACITY, 0);

#[map(name = "BROKER_RECORDS")]
static BROKER_RECORDS: Array<[u8; BROKER_RECORD_CHUNK]> =
    Array::with_max_entries(BROKER_RECORD_CHUNKS, 0);
