//! What the running kernel offers: BTF, tracefs, bpffs and the cgroup v2 mount.
//!
//! The first step of startup. Owns the checks and the mounts it may make (tracefs, bpffs when
//! absent); never loads programs.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

pub const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";
pub const TRACEFS_DEFAULT: &str = "/sys/kernel/tracing";
pub const BPFFS_DEFAULT: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "kernel BTF is missing ({BTF_PATH}): brokerscope needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf,
    #[error(
        "kernel {release} is older than {}.{}, the oldest brokerscope runs on: it lacks BPF \
         atomic compare-and-exchange (5.12), with which the state-change programs claim \
         connection slots; run a 5.12 or newer kernel (Debian 12's \
         6.1 or 6.12, Ubuntu 22.04's 5.15, RHEL 9's 5.14)",
        MIN_KERNEL.0,
        MIN_KERNEL.1
    )]
    TooOld { release: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{fstype} is not mounted and mounting it at {target} failed: {source}; mount it \
         (`mount -t {fstype} {fstype} {target}`) or run the agent privileged"
    )]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What the checks found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KernelFacts {
    pub release: String,
    pub btf: PathBuf,
    pub tracefs: PathBuf,
    pub bpffs: PathBuf,
    /// The cgroup v2 mount, when the kernel has one (hybrid hosts mount it under
    /// /sys/fs/cgroup/unified; attaching cgroup programs to a v1 tmpfs fails with EBADF).
    pub cgroup2: Option<PathBuf>,
    /// Whether RLIMIT_MEMLOCK could be lifted; kernels >= 5.11 account BPF memory by memcg and
    /// do not need it.
    pub memlock_raised: bool,
}

/// The oldest kernel the agent runs on (see [`KernelError::TooOld`]).
pub const MIN_KERNEL: (u32, u32) = (5, 12);

/// `(major, minor)` of a kernel release such as `6.1.0-57-amd64` or `5.14.0-427.el9.x86_64`.
pub fn version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Refuses a kernel older than [`MIN_KERNEL`]; a release it cannot read passes (the probes
/// then say what is missing one by one).
pub fn check_version(release: &str) -> Result<(), KernelError> {
    match version(release) {
        Some(v) if v < MIN_KERNEL => Err(KernelError::TooOld {
            release: release.to_string(),
        }),
        _ => Ok(()),
    }
}

/// Runs the checks, mounting tracefs and bpffs where they are missing.
pub fn check() -> Result<KernelFacts, KernelError> {
    let release = read("/proc/sys/kernel/osrelease")?.trim().to_string();
    check_version(&release)?;
    if !Path::new(BTF_PATH).exists() {
        return Err(KernelError::NoBtf);
    }
    let mountinfo = read("/proc/self/mountinfo")?;
    let mounts = parse_mountinfo(&mountinfo);
    let tracefs = ensure_mounted(&mounts, "tracefs", TRACEFS_DEFAULT)?;
    let bpffs = ensure_mounted(&mounts, "bpf", BPFFS_DEFAULT)?;
    let cgroup2 = mounts
        .iter()
        .find(|m| m.fstype == "cgroup2")
        .map(|m| m.mount_point.clone());
    Ok(KernelFacts {
        release,
        btf: BTF_PATH.into(),
        tracefs,
        bpffs,
        cgroup2,
        memlock_raised: raise_memlock(),
    })
}

fn read(path: &str) -> Result<String, KernelError> {
    std::fs::read_to_string(path).map_err(|source| KernelError::Read {
        path: path.into(),
        source,
    })
}

/// One line of /proc/self/mountinfo, the parts we use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub fstype: String,
}

/// Kept over procfs 0.18 `mountinfo()`: 55.3 µs vs 44.8 µs here (23 % slower; read once at
/// start), measured 2026-12-05 by `cargo xtask bench --procfs-only` (medians; this pid, pid 1).
///
/// Parses /proc/<pid>/mountinfo (proc(5)): field 5 is the mount point, and the filesystem type
/// follows the ` - ` separator after the optional fields. Octal escapes (`\040`) are decoded.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let fstype = right.split(' ').next()?;
            Some(Mount {
                mount_point: unescape(mount_point).into(),
                fstype: fstype.to_string(),
            })
        })
        .collect()
}

fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn ensure_mounted(
    mounts: &[Mount],
    fstype: &'static str,
    target: &'static str,
) -> Result<PathBuf, KernelError> {
    if let Some(m) = mounts
        .iter()
        .find(|m| m.fstype == fstype && m.mount_point == Path::new(target))
    {
        return Ok(m.mount_point.clone());
    }
    if let Some(m) = mounts.iter().find(|m| m.fstype == fstype) {
        return Ok(m.mount_point.clone());
    }
    let c = |s: &str| CString::new(s).expect("static strings have no NUL");
    let (source, dir, ty) = (c(fstype), c(target), c(fstype));
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call; no data.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            dir.as_ptr(),
            ty.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(KernelError::Mount {
            fstype,
            target,
            source: std::io::Error::last_os_error(),
        });
    }
    tracing::info!(fstype, target, "mounted");
    Ok(target.into())
}

/// What [`join_host_cgroup_namespace`] found or did.
#[derive(Debug, PartialEq, Eq)]
pub enum CgroupNamespace {
    /// Already in the node's.
    Host,
    /// Was in one of its own, now in the node's, entered through this process's.
    Joined { through: u32 },
    /// Stays in its own: why.
    Kept(String),
}

/// The inode of the initial cgroup namespace, the node's (`PROC_CGROUP_INIT_INO`, fixed since
/// cgroup namespaces exist).
const INIT_CGROUP_NS_INO: u64 = 0xEFFF_FFFB;

/// A container runtime gives each container a cgroup namespace of its own (Kubernetes' default
/// on cgroup v2 nodes), from which every other process's cgroup reads `/..`: brokers would have
/// no cgroup id, memory or pressure figures. With the node's PID namespace (a DaemonSet's
/// `hostPID`) the node's processes are visible, so the agent enters the node's cgroup namespace
/// through one of them: PID 1, else the first process it may inspect that is in it. `setns`
/// moves the calling thread only and threads inherit it, so this runs before any thread
/// starts. Needs CAP_SYS_ADMIN (setns) and ptrace access to that process (CAP_SYS_PTRACE).
pub fn join_host_cgroup_namespace() -> CgroupNamespace {
    use std::os::{fd::AsRawFd as _, unix::fs::MetadataExt as _};
    match std::fs::metadata("/proc/self/ns/cgroup") {
        Ok(m) if m.ino() == INIT_CGROUP_NS_INO => return CgroupNamespace::Host,
        Ok(_) => {}
        // No cgroup namespaces in this kernel: nothing to join.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return CgroupNamespace::Host,
        Err(e) => return CgroupNamespace::Kept(format!("/proc/self/ns/cgroup: {e}")),
    }
    let mut pids = crate::proc::ProcFs::default().pids().unwrap_or_default();
    pids.sort_unstable();
    let mut first_error = None;
    for pid in pids {
        let path = format!("/proc/{pid}/ns/cgroup");
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                first_error.get_or_insert(format!("{path}: {e}"));
                continue;
            }
        };
        if !file.metadata().is_ok_and(|m| m.ino() == INIT_CGROUP_NS_INO) {
            continue;
        }
        // SAFETY: setns takes a descriptor we own for the duration of the call; no memory is
        // passed.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWCGROUP) };
        if rc != 0 {
            return CgroupNamespace::Kept(format!(
                "setns through process {pid}: {}",
                std::io::Error::last_os_error()
            ));
        }
        return CgroupNamespace::Joined { through: pid };
    }
    CgroupNamespace::Kept(format!(
        "no process of the node's cgroup namespace could be inspected ({})",
        first_error.unwrap_or_else(|| "none visible: no hostPID?".into())
    ))
}

/// Lifts RLIMIT_MEMLOCK for kernels that still charge BPF maps to it. Failure is normal where
/// CAP_SYS_RESOURCE is withheld and the kernel accounts by memcg.
fn raise_memlock() -> bool {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass; no other effects on memory.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) };
    rc == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
22 1 252:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
25 22 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
28 25 0:25 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
29 28 0:26 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
30 28 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:11 - cgroup cgroup rw,cpu,cpuacct
40 25 0:12 / /sys/kernel/tracing rw,nosuid,nodev,noexec,relatime shared:20 - tracefs tracefs rw
41 25 0:40 / /sys/fs/bpf rw,relatime master:2 - bpf bpf rw
50 22 0:50 / /mnt/with\\040space rw - tmpfs none rw
";

    #[test]
    fn finds_cgroup2_on_a_hybrid_host() {
        let mounts = parse_mountinfo(HYBRID);
        let cg = mounts.iter().find(|m| m.fstype == "cgroup2").unwrap();
        assert_eq!(cg.mount_point, Path::new("/sys/fs/cgroup/unified"));
        // The v1 tmpfs at /sys/fs/cgroup is not mistaken for it.
        assert_eq!(
            mounts
                .iter()
                .find(|m| m.mount_point == Path::new("/sys/fs/cgroup"))
                .unwrap()
                .fstype,
            "tmpfs"
        );
    }

    #[test]
    fn optional_fields_and_escapes() {
        let mounts = parse_mountinfo(HYBRID);
        assert!(mounts.iter().any(|m| m.fstype == "tracefs"));
        assert!(
            mounts
                .iter()
                .any(|m| m.fstype == "bpf" && m.mount_point == Path::new("/sys/fs/bpf"))
        );
        assert!(
            mounts
                .iter()
                .any(|m| m.mount_point == Path::new("/mnt/with space"))
        );
        assert_eq!(mounts.len(), 8);
    }

    #[test]
    fn kernels_before_the_minimum_are_refused_naming_what_they_lack() {
        for old in ["5.10.0-28-amd64", "4.18.0-513.el8.x86_64", "5.11.22"] {
            let err = check_version(old).unwrap_err().to_string();
            assert!(err.contains(old) && err.contains("5.12"), "{err}");
            assert!(err.contains("compare-and-exchange"), "{err}");
        }
        for ok in [
            "5.12.0",
            "5.14.0-427.el9.x86_64",
            "6.1.0-57-amd64",
            "6.12.118+deb12-amd64",
            "6.18.44-fc-v1252",
            "unreadable",
        ] {
            assert!(check_version(ok).is_ok(), "{ok}");
        }
        assert_eq!(version("6.12.118+deb12-amd64"), Some((6, 12)));
    }

    #[test]
    fn garbage_lines_are_skipped() {
        assert!(parse_mountinfo("nonsense\n\n1 2 3\n").is_empty());
    }
}
