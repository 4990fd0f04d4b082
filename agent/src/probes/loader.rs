//! Loading the object: this kernel's offsets, the object with its direct loads patched, and the
//! load with the configured capacities, its maps pinned or adopted.

use std::path::Path;

use aya::{Ebpf, EbpfLoader};
use brokerscope_common::{
    processes::PROCESS_OFFSETS_GLOBAL,
    records::SLOT_KEYS_MAP,
    resources::RESOURCE_OFFSETS_GLOBAL,
    sockets::{
        CONN_BUCKETS_GLOBAL, CONN_STATES_MAP, CONN_WAYS, CONNECTIONS_MAP, CONNECTIONS_SPILL_MAP,
        EVENT_OFFSETS_GLOBAL, LISTEN_SOCKS_MAP, LISTENERS_AUTO_MAP, LISTENERS_MAP,
        SOCKET_OFFSETS_GLOBAL, WATCHED_MAP, connection_tiers,
    },
    state::STATE_OFFSETS_GLOBAL,
    telemetry::Program,
};

use super::{Offsets, ProbesError, btf, fields, lacks, maps::read_file, pins, records, tracefs};
use crate::{config::ProbesConfig, kernel::KernelFacts};

/// The kernel programs, built by build.rs (aya-build) and embedded in the binary.
pub(super) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/brokerscope-ebpf"));

/// This kernel's offsets, what it lacks by program, and the object with the BTF programs'
/// direct loads patched to its field offsets (an error: those programs are not loaded, and
/// their fallbacks serve).
pub(super) fn resolve_for(
    kernel: &KernelFacts,
) -> Result<
    (
        Offsets,
        lacks::Lacks,
        Result<fields::Object, fields::PatchError>,
    ),
    ProbesError,
> {
    // Parsed once: a few MiB of kernel type information.
    let kernel_types = btf::Btf::parse(&read_file(&kernel.btf)?)?;
    let (all, lacks) = Offsets::resolve(
        |category: &str, name: &str| tracefs::Format::read(&kernel.tracefs, category, name),
        &kernel_types,
    );
    tracing::debug!(offsets = ?all, "resolved offsets");
    for (program, reason) in lacks.iter() {
        tracing::info!(
            program = program.name(),
            reason,
            "this kernel lacks what the program reads"
        );
    }
    let patched =
        fields::FieldOffsets::resolve(&kernel_types, &all.sockets, &all.events, &all.resources)
            .and_then(|field_offsets| {
                tracing::debug!(cast = ?field_offsets.cast(), "socket cast to struct tcp_sock");
                fields::patch(EBPF_OBJECT, &field_offsets)
            });
    Ok((all, lacks, patched))
}

/// Says whether the maps and links in `pins` were adopted from an earlier agent (counting since
/// `counting_since`) or pinned afresh.
pub(super) fn log_pins(pins: &pins::Pins, adopting: bool, counting_since: std::time::SystemTime) {
    if adopting {
        tracing::info!(
            dir = %pins.dir().display(),
            since = %records::rfc3339(counting_since),
            "adopting the pinned maps and links of an earlier agent: counters continue"
        );
    } else {
        tracing::info!(dir = %pins.dir().display(), "maps and links pinned: counting survives a restart");
    }
}

/// The object to load (patched, or as built if it could not be), and the BTF programs that
/// cannot run from it, each with why.
pub(super) fn object_and_refusals(
    patched: &Result<fields::Object, fields::PatchError>,
) -> (&[u8], Vec<(Program, fields::PatchError)>) {
    let (object, unpatched) = match patched {
        Ok(object) => {
            tracing::debug!(
                instructions = object.patched,
                refused = ?object.refused,
                "patched direct loads"
            );
            (object.bytes(), None)
        }
        Err(e) => {
            tracing::warn!(error = %e, "direct loads not patched: BTF programs not loaded");
            (EBPF_OBJECT, Some(e.clone()))
        }
    };
    let refusals = Program::ALL
        .into_iter()
        .filter(|p| p.btf_tracepoint().is_some())
        .filter_map(|p| match (patched, &unpatched) {
            (_, Some(e)) => Some((p, e.clone())),
            (Ok(object), None) => object.refusal(p.hook()).map(|e| (p, e.clone())),
            (Err(_), None) => None,
        })
        .collect();
    (object, refusals)
}

/// Loads `object` with this kernel's offsets and the configured capacities, its maps pinned
/// (or adopted) under the layout's pin directory when pinning is on.
pub(super) fn load_object(
    object: &[u8],
    all: &Offsets,
    config: &ProbesConfig,
) -> Result<(Ebpf, Option<pins::Pins>), ProbesError> {
    let (first_tier, spill_tier) = connection_tiers(config.connections_capacity);
    let buckets = first_tier / CONN_WAYS as u32;
    // Everything that decides the maps and the programs, so only exactly these are adopted.
    let layout = pins::Layout::of(&[
        object,
        format!(
            "{buckets} {all:?} {} {}",
            config.listeners_capacity, config.connections_capacity
        )
        .as_bytes(),
    ]);
    let pins = open_pins(&config.pin_dir, layout);
    let map_paths: Vec<(String, std::path::PathBuf)> = match &pins {
        Some(pins) => pinned_maps(object)?
            .into_iter()
            .map(|name| {
                let path = pins.map_path(&name);
                (name, path)
            })
            .collect(),
        None => Vec::new(),
    };
    let mut loader = EbpfLoader::new();
    for (name, path) in &map_paths {
        loader.map_pin_path(name.as_str(), path.as_path());
    }
    let ebpf = loader
        .override_global(CONN_BUCKETS_GLOBAL, &buckets, true)
        .override_global(SOCKET_OFFSETS_GLOBAL, &all.sockets, true)
        .override_global(EVENT_OFFSETS_GLOBAL, &all.events, true)
        .override_global(PROCESS_OFFSETS_GLOBAL, &all.processes, true)
        .override_global(STATE_OFFSETS_GLOBAL, &all.state, true)
        .override_global(RESOURCE_OFFSETS_GLOBAL, &all.resources, true)
        .map_max_entries(LISTENERS_MAP, config.listeners_capacity)
        .map_max_entries(LISTENERS_AUTO_MAP, config.listeners_capacity)
        .map_max_entries(WATCHED_MAP, config.listeners_capacity)
        .map_max_entries(LISTEN_SOCKS_MAP, config.listeners_capacity)
        .map_max_entries(CONNECTIONS_MAP, buckets)
        .map_max_entries(CONN_STATES_MAP, first_tier)
        // A map cannot be empty; an unused spill tier is switched off after the load.
        .map_max_entries(CONNECTIONS_SPILL_MAP, spill_tier.max(1))
        .map_max_entries(SLOT_KEYS_MAP, config.listeners_capacity)
        .load(object)
        .map_err(|e| ProbesError::Load(Box::new(e)))?;
    Ok((ebpf, pins))
}

/// Opens the pin directory of `layout` under `base` (`None`: pinning is off, or the directory
/// cannot be used, which is logged: counting then starts over with each agent).
pub(super) fn open_pins(base: &Path, layout: pins::Layout) -> Option<pins::Pins> {
    if base.as_os_str().is_empty() {
        tracing::info!(
            "probes.pin_dir is empty: nothing pinned, counters start over with each agent"
        );
        return None;
    }
    match pins::Pins::open(base, layout) {
        Ok(pins) => Some(pins),
        Err(e) => {
            tracing::warn!(error = %e, "maps and links not pinned: counters start over with each agent");
            None
        }
    }
}

/// The object's maps that are pinned: all but the global sections (`.rodata`, `.bss`, ...),
/// which each load fills with its own values.
pub(super) fn pinned_maps(object: &[u8]) -> Result<Vec<String>, ProbesError> {
    let parsed =
        aya_obj::Object::parse(object).map_err(|e| ProbesError::Load(Box::new(e.into())))?;
    let mut names: Vec<String> = parsed
        .maps
        .into_keys()
        .filter(|name| !name.starts_with('.'))
        .collect();
    names.sort_unstable();
    Ok(names)
}
