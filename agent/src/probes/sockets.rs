//! TCP sockets (kernel side: agent-ebpf/src/sockets.rs): resolving the offsets the programs need
//! and reading the per-listener counters.

use std::path::Path;

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
};
use brokerscope_common::sockets::{
    IGNORE, LISTENERS_MAP, ListenerCounters, ListenerKey, SOCKETS_CONFIG_MAP, SocketOffsets,
    SocketsConfig, WATCHED_MAP,
};

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
    let state = Format::read(tracefs, "sock", "inet_sock_set_state")?;
    let retransmit = Format::read(tracefs, "tcp", "tcp_retransmit_skb")?;
    let send_reset = Format::read(tracefs, "tcp", "tcp_send_reset")?;
    let receive_reset = Format::read(tracefs, "tcp", "tcp_receive_reset")?;
    let btf = Btf::parse(&read_file(btf_path)?)?;
    let tcp = |field: &str| btf.offset_of("tcp_sock", &[field]);
    let sock_done = btf.enum_value("SOCK_DONE")?;
    Ok(SocketOffsets {
        tp_skaddr: state.field("skaddr", 8)?,
        tp_oldstate: state.field("oldstate", 4)?,
        tp_newstate: state.field("newstate", 4)?,
        tp_sport: state.field("sport", 2)?,
        tp_protocol: state.field("protocol", 2)?,
        tp_retransmit_skaddr: retransmit.field("skaddr", 8)?,
        tp_retransmit_err: retransmit.field("err", 4)?,
        tp_send_reset_skaddr: send_reset.field("skaddr", 8)?,
        tp_send_reset_saddr: send_reset.field("saddr", 28)?,
        tp_receive_reset_skaddr: receive_reset.field("skaddr", 8)?,
        tp_receive_reset_sport: receive_reset.field("sport", 2)?,
        sock_net: btf.offset_of("sock", &["__sk_common", "skc_net", "net"])?,
        sock_num: btf.offset_of("sock", &["__sk_common", "skc_num"])?,
        sock_state: btf.offset_of("sock", &["__sk_common", "skc_state"])?,
        sock_flags: btf.offset_of("sock", &["__sk_common", "skc_flags"])?,
        sock_drops: btf.offset_of("sock", &["sk_drops"])?,
        net_inum: btf.offset_of("net", &["ns", "inum"])?,
        tcp_bytes_received: tcp("bytes_received")?,
        tcp_bytes_acked: tcp("bytes_acked")?,
        tcp_snd_una: tcp("snd_una")?,
        tcp_write_seq: tcp("write_seq")?,
        tcp_total_retrans: tcp("total_retrans")?,
        tcp_srtt_us: tcp("srtt_us")?,
        sock_done_bit: u32::try_from(sock_done)
            .ok()
            .filter(|bit| *bit < 64)
            .ok_or(ProbesError::Btf(super::btf::BtfError::NoEnumerator {
                name: "SOCK_DONE (in 0..64)".into(),
            }))?,
    })
}

/// Owns the socket maps' handles.
pub struct SocketsReader {
    listeners: HashMap<MapData, ListenerKey, ListenerCounters>,
    watched: HashMap<MapData, ListenerKey, u32>,
    config: Array<MapData, SocketsConfig>,
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, ProbesError> {
    let map = ebpf
        .take_map(name)
        .ok_or(ProbesError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|e| ProbesError::Map {
        name,
        source: Box::new(e),
    })
}

impl SocketsReader {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, ProbesError> {
        Ok(Self {
            listeners: take(ebpf, LISTENERS_MAP)?,
            watched: take(ebpf, WATCHED_MAP)?,
            config: take(ebpf, SOCKETS_CONFIG_MAP)?,
        })
    }

    /// Count every listener on the node (debugging), not only watched ones. Applied in place.
    pub fn set_watch_all(&mut self, on: bool) -> Result<(), ProbesError> {
        let config = SocketsConfig {
            watch_all: u32::from(on),
            _pad: 0,
        };
        self.config.set(0, config, 0).map_err(|e| ProbesError::Map {
            name: SOCKETS_CONFIG_MAP,
            source: Box::new(e),
        })
    }

    /// Never count (netns, port), even in watch-all mode.
    pub fn ignore(&mut self, netns: u32, port: u16) -> Result<(), ProbesError> {
        self.watched
            .insert(ListenerKey::new(netns, port), IGNORE, 0)
            .map_err(|e| ProbesError::Map {
                name: WATCHED_MAP,
                source: Box::new(e),
            })
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
