//! Pins: the kernel maps and the counting programs' links, kept under bpffs so the kernel goes
//! on counting while the agent is down (killed, OOM-killed, upgraded) and the next agent adopts
//! them and continues every counter where it is.
//!
//! One directory per *layout*: `<probes.pin_dir>/v<FORMAT>-<hash>/`, the hash taking in the
//! patched object (programs and map definitions), the offsets it is loaded with and the map
//! capacities, so an agent only ever adopts maps and programs that are exactly the ones it
//! would create. `maps/<MAP>` holds every map of the object but the global sections; `links/
//! <program>` the link of each attached hook. Another layout's directory found at start
//! (an upgrade, changed capacities) is removed, its programs detached with it, and counting
//! starts over: said in the log, and visible as `brokerscope_counters_start_time_seconds`.
//!
//! Owns nothing but paths: the loader opens the maps; [`Pins::adopt_link`] and
//! [`Pins::pin_link`] the links, which the agent holds as [`Held`].

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::programs::{links::FdLink, trace_point::TracePointLink};
use brokerscope_common::telemetry::Program;

use super::{error::ProbesError, sys::sys_bpf};

/// Bumped when the meaning of the pinned directory changes in a way the hash cannot see.
pub const FORMAT: u32 = 1;

/// `BPF_FS_MAGIC`: what statfs says of a bpffs mount.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// A layout's identity: FNV-1a over everything that decides the maps and programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout(u64);

impl Layout {
    pub fn of(parts: &[&[u8]]) -> Self {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for part in parts {
            // Each part's length first, so no two different lists of parts hash alike by
            // moving bytes across a boundary.
            for byte in (part.len() as u64).to_le_bytes().iter().chain(*part) {
                hash ^= u64::from(*byte);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        }
        Self(hash)
    }

    /// The layout's directory name under the pin directory.
    pub fn dir_name(self) -> String {
        format!("v{FORMAT}-{:016x}", self.0)
    }
}

/// The pinned directory of this agent's layout.
#[derive(Debug)]
pub struct Pins {
    dir: PathBuf,
    /// The directory existed: maps and links in it are adopted.
    adopted: bool,
}

impl Pins {
    /// Opens (creating it if needed) `base/<layout>`, after removing every other layout's
    /// directory under `base`. `base` must be on bpffs.
    pub fn open(base: &Path, layout: Layout) -> Result<Self, ProbesError> {
        let err = |path: &Path, reason: String| ProbesError::Pin {
            path: path.to_path_buf(),
            reason,
        };
        on_bpffs(base).map_err(|reason| err(base, reason))?;
        std::fs::create_dir_all(base).map_err(|e| err(base, format!("cannot create: {e}")))?;
        let name = layout.dir_name();
        let entries =
            std::fs::read_dir(base).map_err(|e| err(base, format!("cannot list: {e}")))?;
        for entry in entries.flatten() {
            let other = entry.file_name();
            let other = other.to_string_lossy();
            if other == name || !is_layout_name(&other) {
                continue;
            }
            let path = entry.path();
            tracing::warn!(
                path = %path.display(),
                layout = %name,
                "pinned maps and links of another layout (the agent was upgraded or its map \
                 capacities changed): removing them; every kernel counter starts over"
            );
            std::fs::remove_dir_all(&path)
                .map_err(|e| err(&path, format!("cannot remove: {e}")))?;
        }
        let dir = base.join(&name);
        let adopted = dir.join("maps").is_dir();
        for sub in ["maps", "links"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path)
                .map_err(|e| err(&path, format!("cannot create: {e}")))?;
        }
        Ok(Self { dir, adopted })
    }

    /// Whether an earlier agent made this directory: its maps hold counts to continue.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn map_path(&self, map: &str) -> PathBuf {
        self.dir.join("maps").join(map)
    }

    fn link_path(&self, program: Program) -> PathBuf {
        self.dir.join("links").join(program.name())
    }

    /// The link an earlier agent pinned for `program`, if any: still attached, still
    /// counting.
    pub fn adopt_link(&self, program: Program) -> Option<Result<Adopted, ProbesError>> {
        let path = self.link_path(program);
        if !path.exists() {
            return None;
        }
        let err = |reason: String| ProbesError::Pin {
            path: path.clone(),
            reason,
        };
        Some(
            obj_get(&path)
                .map_err(|e| err(format!("cannot open the pinned link: {e}")))
                .and_then(|link| {
                    let program_id = link_program_id(&link)
                        .map_err(|e| err(format!("cannot read the pinned link: {e}")))?;
                    Ok(Adopted {
                        link: Held::Link(link),
                        program_id,
                        program: prog_fd_by_id(program_id).ok(),
                    })
                }),
        )
    }

    /// Pins `program`'s link, so it stays attached after the agent is gone.
    pub fn pin_link(&self, program: Program, link: &Held) -> Result<(), ProbesError> {
        let path = self.link_path(program);
        let reason = match link {
            Held::Link(fd) => match obj_pin(fd.as_fd(), &path) {
                Ok(()) => return Ok(()),
                Err(e) => format!("cannot pin the link: {e}"),
            },
            Held::Perf { .. } => {
                "this kernel attaches tracepoints without a BPF link (before Linux \
                              5.15): it cannot be pinned"
                    .to_string()
            }
        };
        Err(ProbesError::Pin { path, reason })
    }

    /// Removes `program`'s pin: its link detaches when the agent drops it.
    pub fn unpin_link(&self, program: Program) {
        let path = self.link_path(program);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot unpin"),
        }
    }
}

/// A hook's link, held by the agent: dropping it detaches the program unless it is pinned.
pub enum Held {
    /// A BPF link, by a descriptor of our own.
    Link(OwnedFd),
    /// Before Linux 5.15 a tracepoint is attached through its perf event, without a BPF link.
    Perf { _link: TracePointLink },
}

impl Held {
    /// Holds what aya attached: a BPF link by a descriptor of our own (aya's may then go;
    /// the kernel keeps a link while any descriptor or pin holds it).
    pub fn link(link: FdLink) -> Result<Self, ProbesError> {
        let err = |reason: String| ProbesError::Held { reason };
        let id = link
            .info()
            .map_err(|e| err(format!("cannot read the link: {e}")))?
            .id();
        let fd = link_fd_by_id(id).map_err(|e| err(format!("cannot hold link {id}: {e}")))?;
        drop(link);
        Ok(Self::Link(fd))
    }

    /// As [`Self::link`], for a tracepoint.
    pub fn tracepoint(link: TracePointLink) -> Result<Self, ProbesError> {
        if !aya::features().bpf_perf_link() {
            return Ok(Self::Perf { _link: link });
        }
        // With perf links, aya attaches every tracepoint through one.
        let link = FdLink::try_from(link).map_err(|e| ProbesError::Held {
            reason: format!("the tracepoint link is not a BPF link: {e}"),
        })?;
        Self::link(link)
    }
}

/// A pinned link found at start.
pub struct Adopted {
    pub link: Held,
    /// The program it runs (loaded by the earlier agent).
    pub program_id: u32,
    /// That program, for its run statistics.
    pub program: Option<OwnedFd>,
}

/// `vN-<16 hex digits>`: a layout directory (anything else under the pin directory is not
/// ours to remove).
fn is_layout_name(name: &str) -> bool {
    let Some((version, hash)) = name.strip_prefix('v').and_then(|r| r.split_once('-')) else {
        return false;
    };
    !version.is_empty()
        && version.bytes().all(|b| b.is_ascii_digit())
        && hash.len() == 16
        && hash.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `path`, or the nearest ancestor that exists, is on bpffs.
fn on_bpffs(path: &Path) -> Result<(), String> {
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .ok_or_else(|| "no part of the path exists".to_string())?;
    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(existing.as_os_str()))
        .map_err(|_| "the path holds a NUL byte".to_string())?;
    // SAFETY: all zeroes is a valid statfs; `c` is NUL-terminated and `buf` writable.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut buf) } != 0 {
        return Err(format!("statfs: {}", io::Error::last_os_error()));
    }
    if buf.f_type as i64 != BPF_FS_MAGIC {
        return Err(format!(
            "{} is not on a BPF filesystem (mount one: `mount -t bpf bpf /sys/fs/bpf`), or set \
             probes.pin_dir = \"\" to pin nothing",
            existing.display()
        ));
    }
    Ok(())
}

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;

/// `union bpf_attr` for BPF_OBJ_PIN and BPF_OBJ_GET.
#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

fn c_path(path: &Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    // SAFETY: `pathname` points to a NUL-terminated string alive for the call.
    unsafe { sys_bpf(BPF_OBJ_PIN, &mut attr) }.map(drop)
}

fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: as in `obj_pin`.
    let fd = unsafe { sys_bpf(BPF_OBJ_GET, &mut attr) }?;
    // SAFETY: the call returned a new descriptor, ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `union bpf_attr` for the BPF_*_GET_FD_BY_ID commands.
#[repr(C)]
struct ByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

fn fd_by_id(cmd: libc::c_long, id: u32) -> io::Result<OwnedFd> {
    let mut attr = ByIdAttr {
        id,
        next_id: 0,
        open_flags: 0,
    };
    // SAFETY: the attribute holds no pointer.
    let fd = unsafe { sys_bpf(cmd, &mut attr) }?;
    // SAFETY: the call returned a new descriptor, ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn link_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    fd_by_id(BPF_LINK_GET_FD_BY_ID, id)
}

pub fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    fd_by_id(BPF_PROG_GET_FD_BY_ID, id)
}

/// The program a link runs: `struct bpf_link_info`'s first fields (type, id, prog_id).
fn link_program_id(link: &OwnedFd) -> io::Result<u32> {
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // The whole bpf_link_info is 40-some bytes on the kernels here; the kernel fills what it
    // has and refuses nothing shorter than its own.
    let mut info = [0u32; 32];
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `info` is valid for `info_len` bytes during the call.
    unsafe { sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    match info[2] {
        0 => Err(io::Error::other("the link runs no program")),
        id => Ok(id),
    }
}

/// What `brokerscope cleanup` removed: every layout directory under `base`, then `base` if
/// that left it empty. Not an error if there is nothing.
pub fn cleanup(base: &Path) -> Result<Vec<PathBuf>, ProbesError> {
    let err = |path: &Path, e: io::Error| ProbesError::Pin {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let entries = match std::fs::read_dir(base) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(err(base, e)),
    };
    on_bpffs(base).map_err(|reason| ProbesError::Pin {
        path: base.to_path_buf(),
        reason,
    })?;
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| err(base, e))?;
        if !is_layout_name(&entry.file_name().to_string_lossy()) {
            continue;
        }
        let path = entry.path();
        std::fs::remove_dir_all(&path).map_err(|e| err(&path, e))?;
        removed.push(path);
    }
    // Only if nothing else is there: the directory may be shared.
    let _ = std::fs::remove_dir(base);
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_differ_with_any_part_and_name_their_format() {
        let a = Layout::of(&[b"object", b"4096"]);
        assert_eq!(a, Layout::of(&[b"object", b"4096"]));
        assert_ne!(a, Layout::of(&[b"object", b"4097"]));
        assert_ne!(a, Layout::of(&[b"objec", b"t4096"]));
        let name = a.dir_name();
        assert!(name.starts_with(&format!("v{FORMAT}-")), "{name}");
        assert!(is_layout_name(&name), "{name}");
        for other in [
            "v1",
            "v-0123456789abcdef",
            "vx-0123456789abcdef",
            "v1-0123",
            "maps",
            "",
        ] {
            assert!(!is_layout_name(other), "{other}");
        }
    }

    #[test]
    fn refuses_a_directory_off_bpffs() {
        let dir = tempfile::tempdir().unwrap();
        let e = Pins::open(&dir.path().join("pins"), Layout::of(&[b"x"])).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("not on a BPF filesystem"), "{text}");
        assert!(text.contains("probes.pin_dir"), "{text}");
        assert!(!dir.path().join("pins").exists());
    }
}
