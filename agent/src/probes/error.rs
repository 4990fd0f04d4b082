//! Why loading, attaching or reading the kernel programs failed: one error type for every
//! hook family's loader, below them all.

use super::{btf, fields, tracefs};

#[derive(Debug, thiserror::Error)]
pub enum ProbesError {
    #[error("cannot read kernel BTF: {0}")]
    Btf(#[from] btf::BtfError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Format(#[from] tracefs::FormatError),
    #[error("disabled by probes.disabled_programs")]
    Disabled,
    #[error("this kernel lacks what it reads: {0}")]
    Lacks(String),
    #[error("its direct loads cannot be patched for this kernel: {0}")]
    Fields(#[source] fields::PatchError),
    #[error("cannot load kernel BTF for the iterator: {0}")]
    KernelBtf(#[source] Box<aya::BtfError>),
    #[error("cannot load the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("eBPF object has no {kind} `{name}` (build mismatch)")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("cannot load or attach program {program} to {hook}: {source}")]
    Program {
        program: &'static str,
        hook: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("cannot link map iterator {program}: {source}")]
    Link {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the kernel log ring: {0}")]
    Log(#[source] aya_log::Error),
    #[error("cannot watch the kernel log ring: {0}")]
    LogFd(#[source] std::io::Error),
    #[error("pin directory {}: {reason}", path.display())]
    Pin {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("{reason}")]
    Held { reason: String },
}

/// Whether `e` is the kernel refusing for want of privileges (EPERM/EACCES), as opposed to
/// lacking something, so the log can say which.
pub fn is_permission_error(e: &ProbesError) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES));
        }
        source = err.source();
    }
    false
}
