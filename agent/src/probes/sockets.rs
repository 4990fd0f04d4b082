//! TCP sockets (kernel side: agent-ebpf/src/sockets.rs): resolving the offsets the programs need
//! and reading the per-listener counters.

use std::path::Path;

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};
use brokerscope_common::sockets::{LISTENERS_MAP, ListenerCounters, ListenerKey, SocketOffsets};

use super::{ProbesError, btf::Btf, read_file, tracefs::Format};

/// Counters of one (network namespace, port) listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerStats {
    pub key: ListenerKey,
    pub counters: ListenerCounters,
}

/// Reads `inet_sock_set_state`'s record layout from tracefs and the `struct sock -> net -> inum`
/// path from BTF.
pub fn resolve_offsets(tracefs: &Path, btf_path: &Path) -> Result<SocketOffsets, ProbesError> {
    let format = Format::read(tracefs, "sock", "inet_sock_set_state")?;
    let btf = Btf::parse(&read_file(btf_path)?)?;
    Ok(SocketOffsets {
        tp_skaddr: format.field("skaddr", 8)?,
        tp_oldstate: format.field("oldstate", 4)?,
        tp_newstate: format.field("newstate", 4)?,
        tp_sport: format.field("sport", 2)?,
        tp_protocol: format.field("protocol", 2)?,
        sock_net: btf.offset_of("sock", &["__sk_common", "skc_net", "net"])?,
        net_inum: btf.offset_of("net", &["ns", "inum"])?,
        _pad: 0,
    })
}

/// Owns the LISTENERS map handle.
pub struct SocketsReader {
    listeners: HashMap<MapData, ListenerKey, ListenerCounters>,
}

impl SocketsReader {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, ProbesError> {
        let map = ebpf.take_map(LISTENERS_MAP).ok_or(ProbesError::Missing {
            kind: "map",
            name: LISTENERS_MAP,
        })?;
        let listeners = HashMap::try_from(map).map_err(|e| ProbesError::Map {
            name: LISTENERS_MAP,
            source: Box::new(e),
        })?;
        Ok(Self { listeners })
    }

    /// Every listener's counters, sorted by (netns, port). An entry that vanishes mid-walk is
    /// skipped.
    pub fn read(&self) -> Vec<ListenerStats> {
        let mut out: Vec<ListenerStats> = self
            .listeners
            .iter()
            .filter_map(Result::ok)
            .map(|(key, counters)| ListenerStats { key, counters })
            .collect();
        out.sort_by_key(|l| l.key);
        out
    }
}
