//! Every offset the programs are loaded with, resolved from one kernel's tracefs and BTF.

use super::{btf, lacks, processes, resources, sockets, sockets_events, state, tracefs};

/// Every offset the programs are loaded with, resolved from one kernel's tracefs and BTF.
#[derive(Clone, Copy, Debug)]
pub struct Offsets {
    pub sockets: brokerscope_common::sockets::SocketOffsets,
    pub processes: brokerscope_common::processes::ProcessOffsets,
    pub events: brokerscope_common::sockets::EventOffsets,
    pub state: brokerscope_common::state::StateOffsets,
    pub resources: brokerscope_common::resources::ResourceOffsets,
}

impl Offsets {
    /// Resolves every offset, with the tracepoint formats from `read` (this kernel's tracefs,
    /// or a captured kernel's in the tests), and what the kernel lacks, by program.
    pub fn resolve(
        read: impl Fn(&str, &str) -> tracefs::Format + Copy,
        btf: &btf::Btf,
    ) -> (Self, lacks::Lacks) {
        let mut lacks = lacks::Lacks::default();
        let offsets = Self {
            sockets: sockets::resolve_offsets(read, btf, &mut lacks),
            processes: processes::resolve_offsets(read, &mut lacks),
            events: sockets_events::resolve_offsets(read, btf, &mut lacks),
            state: state::resolve_offsets(read, &mut lacks),
            resources: resources::resolve_offsets(read, btf, &mut lacks),
        };
        (offsets, lacks)
    }
}
