//! Broker state (kernel side: agent-ebpf/src/state.rs): file opens and SIGTERMs of registered
//! brokers, from a ring buffer into a bounded channel for the state tracker (`crate::strimzi`).

use aya::Ebpf;
use brokerscope_common::state::{
    MAX_PATH, STATE_EVENT_OPEN, STATE_EVENT_SIGTERM, STATE_EVENTS_MAP, StateEvent, StateOffsets,
};
use tokio::sync::mpsc;

use brokerscope_common::telemetry::Program;

use super::{error::ProbesError, lacks::Lacks, maps::spawn_ring_channel, tracefs::Format};

/// What the state tracker hears from the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateSignal {
    /// A broker thread opened `path` (as passed to the syscall) relative to `dfd`.
    Open { tgid: u32, dfd: i32, path: String },
    /// SIGTERM was delivered to a broker thread.
    Sigterm { tgid: u32 },
    /// Events were lost (channel full).
    Lost,
}

/// Capacity of the channel from the ring reader to the tracker.
const CHANNEL_CAPACITY: usize = 8192;

/// The opened path of the two open syscalls' records, and the delivered signal's number.
pub fn resolve_offsets(read: impl Fn(&str, &str) -> Format, lacks: &mut Lacks) -> StateOffsets {
    use Program::{StateOpenat, StateOpenat2, StateSignal};
    let openat = read("syscalls", "sys_enter_openat");
    let openat2 = read("syscalls", "sys_enter_openat2");
    let deliver = read("signal", "signal_deliver");
    StateOffsets {
        openat_dfd: lacks.offset(&[StateOpenat], openat.field("dfd", 8)),
        openat_filename: lacks.offset(&[StateOpenat], openat.field("filename", 8)),
        openat2_dfd: lacks.offset(&[StateOpenat2], openat2.field("dfd", 8)),
        openat2_filename: lacks.offset(&[StateOpenat2], openat2.field("filename", 8)),
        signal_sig: lacks.offset(&[StateSignal], deliver.field("sig", 4)),
        _pad: 0,
    }
}

/// Starts the task that drains the ring buffer into a bounded channel; the tracker gets
/// [`StateSignal::Lost`] when it fell behind.
pub fn spawn_reader(ebpf: &mut Ebpf) -> Result<mpsc::Receiver<StateSignal>, ProbesError> {
    spawn_ring_channel(
        ebpf,
        STATE_EVENTS_MAP,
        CHANNEL_CAPACITY,
        parse,
        StateSignal::Lost,
        None,
    )
}

fn parse(bytes: &[u8]) -> Option<StateSignal> {
    if bytes.len() < size_of::<StateEvent>() {
        return None;
    }
    // SAFETY: StateEvent is Pod and the slice is long enough; unaligned read.
    let event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<StateEvent>()) };
    match event.kind {
        STATE_EVENT_OPEN => {
            let len = (event.len as usize).min(MAX_PATH);
            let path = &event.path[..len];
            // The helper's length may count the NUL.
            let path = path.strip_suffix(&[0]).unwrap_or(path);
            Some(StateSignal::Open {
                tgid: event.tgid,
                dfd: event.dfd,
                path: String::from_utf8_lossy(path).into_owned(),
            })
        }
        STATE_EVENT_SIGTERM => Some(StateSignal::Sigterm { tgid: event.tgid }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u32, path: &[u8]) -> Vec<u8> {
        let mut e = StateEvent {
            kind,
            tgid: 7,
            ts_ns: 1,
            dfd: -100,
            len: path.len() as u32,
            path: [0; MAX_PATH],
        };
        e.path[..path.len()].copy_from_slice(path);
        // SAFETY: StateEvent is plain old data.
        unsafe { std::slice::from_raw_parts((&raw const e).cast::<u8>(), size_of::<StateEvent>()) }
            .to_vec()
    }

    #[test]
    fn parses_opens_and_sigterms() {
        assert_eq!(
            parse(&event(STATE_EVENT_OPEN, b"/data/t-0/0.log\0")),
            Some(StateSignal::Open {
                tgid: 7,
                dfd: -100,
                path: "/data/t-0/0.log".into()
            })
        );
        assert_eq!(
            parse(&event(STATE_EVENT_SIGTERM, b"")),
            Some(StateSignal::Sigterm { tgid: 7 })
        );
        assert_eq!(parse(&event(9, b"")), None);
        assert_eq!(parse(&[0; 8]), None);
    }
}
