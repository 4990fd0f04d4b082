//! The set of broker tgids every family filters by (`BROKER_PIDS`, filled by the loader from
//! discovery): the processes family reports their exits, the state and resources families
//! watch only them. Below those families; it knows none of them.

use aya_ebpf::{macros::map, maps::Array};
use brokerscope_common::processes::{BROKER_PID_WORDS, broker_bit};

/// Brokers (tgids) whose exit is reported, and whose opens, signals and resources the state and
/// resources families watch: a bitmap over every possible pid (see `BROKER_PIDS_MAP`).
#[map(name = "BROKER_PIDS")]
static BROKER_PIDS: Array<u64> = Array::with_max_entries(BROKER_PID_WORDS, 0);

/// Whether `tgid` is a registered broker (shared with the state and resources families).
#[inline(always)]
pub fn is_broker(tgid: u32) -> bool {
    let (word, bit) = broker_bit(tgid);
    BROKER_PIDS.get(word).is_some_and(|w| w & bit != 0)
}
