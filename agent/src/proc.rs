//! Reads what discovery (and the kernel check, the file confinement, the port holder) needs from
//! `/proc/<pid>`: command line, start time, thread group, network namespace, cgroup and
//! environment. The process's own files (through its root and cwd) are read by
//! [`crate::files::confine`], never here. A leaf: it uses no other module of the agent.
//!
//! Every read is bounded in size. The proc root is a parameter so unit tests run over a fake
//! tree in a temporary directory.
//!
//! Kept over the procfs crate (0.18), whose `Process::new_with_root` takes a fake tree and maps
//! ENOENT/ESRCH to `NotFound` as [`ProcError::is_gone`] does, but whose `cmdline()` and
//! `environ()` read the whole file (no bound; `cmdline()` also fails on non-UTF-8) and whose
//! other readers are slower: figures at each reader, measured 2026-12-05 by `cargo xtask bench --procfs-only` (medians; this pid, pid 1).

use std::{
    io::Read as _,
    os::unix::fs::MetadataExt as _,
    path::{Component, Path, PathBuf},
};

/// Longest `/proc/<pid>/cmdline` read (JVM class paths run to tens of KiB).
pub const MAX_CMDLINE_BYTES: u64 = 256 * 1024;
/// Longest `/proc/<pid>/environ` read.
pub const MAX_ENVIRON_BYTES: u64 = 256 * 1024;
/// Longest small file (stat, status, cgroup) read.
const MAX_SMALL_BYTES: u64 = 64 * 1024;

/// A failed read under `/proc/<pid>`.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than {max} bytes")]
    TooLarge { path: PathBuf, max: u64 },
    #[error("{path}: unexpected format ({what})")]
    Format { path: PathBuf, what: &'static str },
    #[error("cgroup path `{path}` is outside this cgroup namespace")]
    OutsideCgroupNamespace { path: String },
}

impl ProcError {
    /// True when the process is gone (or never was): its directory no longer exists.
    pub fn is_gone(&self) -> bool {
        matches!(self, ProcError::Io { source, .. }
            if source.kind() == std::io::ErrorKind::NotFound
                || source.raw_os_error() == Some(libc::ESRCH))
    }
}

/// A proc filesystem: `/proc`, or a fake tree in tests.
#[derive(Clone, Debug)]
pub struct ProcFs {
    root: PathBuf,
}

impl Default for ProcFs {
    fn default() -> Self {
        Self {
            root: "/proc".into(),
        }
    }
}

/// The fields of `/proc/<pid>/stat` discovery uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// Field 22: clock ticks after boot at which the process started. With the pid it names
    /// one process: a reused pid has a later start time.
    pub start_ticks: u64,
    /// Field 3: `Z` for a zombie, which still has a /proc entry but is gone for us.
    pub state: char,
}

impl ProcFs {
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn pid_dir(&self, pid: u32) -> PathBuf {
        self.root.join(pid.to_string())
    }

    /// Every numeric entry of the proc root: thread group ids (threads are not listed).
    pub fn pids(&self) -> Result<Vec<u32>, ProcError> {
        let entries = std::fs::read_dir(&self.root).map_err(|source| ProcError::Io {
            path: self.root.clone(),
            source,
        })?;
        Ok(entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect())
    }

    /// procfs 0.18 `cmdline()`: 9.7/13.6 µs vs 7.0/10.4 µs here, and unbounded.
    pub fn cmdline(&self, pid: u32) -> Result<Vec<u8>, ProcError> {
        // A process's cmdline is its own to rewrite and may exceed the cap: the head is what
        // the patterns need, so it is cut, not refused.
        read_capped(&self.pid_dir(pid).join("cmdline"), MAX_CMDLINE_BYTES, true)
    }

    /// Read here (bounded), parsed by the procfs crate ([`parse_stat`]). procfs 0.18
    /// `Process::new(pid)?.stat()` measured 11.1/10.5 µs against 10.0/9.0 µs for our own
    /// parser: within 20 %, so the crate's parser is the one used.
    pub fn stat(&self, pid: u32) -> Result<Stat, ProcError> {
        let path = self.pid_dir(pid).join("stat");
        let text = read_text(&path)?;
        parse_stat(&text).ok_or(ProcError::Format {
            path,
            what: "stat fields after the command name",
        })
    }

    /// The `Tgid:` of `/proc/<pid>/status`: equal to `pid` for a thread group leader. procfs
    /// 0.18 `status()` (every field parsed): 28.5/28.7 µs vs 14.3/14.2 µs here.
    pub fn tgid(&self, pid: u32) -> Result<u32, ProcError> {
        let path = self.pid_dir(pid).join("status");
        let text = read_text(&path)?;
        text.lines()
            .find_map(|l| l.strip_prefix("Tgid:")?.trim().parse().ok())
            .ok_or(ProcError::Format {
                path,
                what: "no Tgid line",
            })
    }

    /// Inode of `/proc/<pid>/ns/net`: the network namespace as the kernel numbers it. procfs
    /// 0.18 `namespaces()` (stats every namespace): 53.4 µs vs 4.8 µs here.
    pub fn netns(&self, pid: u32) -> Result<u32, ProcError> {
        netns_inode(self.pid_dir(pid).join("ns/net"))
    }

    /// The agent's own network namespace (`/proc/self/ns/net` under this tree).
    pub fn own_netns(&self) -> Result<u32, ProcError> {
        netns_inode(self.root.join("self/ns/net"))
    }

    /// The cgroup v2 path: the `0::/...` line of `/proc/<pid>/cgroup`. procfs 0.18
    /// `cgroups()`: 11.0/10.8 µs vs 8.9/8.2 µs here (23-31 % slower).
    pub fn cgroup2_path(&self, pid: u32) -> Result<String, ProcError> {
        let path = self.pid_dir(pid).join("cgroup");
        let text = read_text(&path)?;
        text.lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(str::to_string)
            .ok_or(ProcError::Format {
                path,
                what: "no cgroup v2 (0::) line",
            })
    }

    /// One variable of `/proc/<pid>/environ` (the environment at exec). procfs 0.18
    /// `environ()` (a map of every variable, unbounded): 20.1 µs vs 13.0 µs here.
    pub fn env_var(&self, pid: u32, name: &str) -> Result<Option<String>, ProcError> {
        let bytes = read_capped(&self.pid_dir(pid).join("environ"), MAX_ENVIRON_BYTES, true)?;
        let prefix = format!("{name}=");
        Ok(bytes
            .split(|&b| b == 0)
            .find_map(|kv| kv.strip_prefix(prefix.as_bytes()))
            .map(|v| String::from_utf8_lossy(v).into_owned()))
    }
}

/// A filesystem type, by its `statfs(2)` magic number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Filesystem(pub u64);

impl Filesystem {
    /// The usual name, or the magic in hex. ext2/3/4 share one magic, and the ext4 driver
    /// serves all three on current kernels: "ext4".
    pub fn name(self) -> String {
        let known = match self.0 {
            0xef53 => "ext4",
            0x5846_5342 => "xfs",
            0x9123_683e => "btrfs",
            0x0102_1994 => "tmpfs",
            0x794c_7630 => "overlay",
            0x6969 => "nfs",
            0x2fc1_2fc1 => "zfs",
            0x00c3_6400 => "ceph",
            0x6573_5546 => "fuse",
            _ => return format!("{:#x}", self.0),
        };
        known.into()
    }
}

fn read_text(path: &Path) -> Result<String, ProcError> {
    let bytes = read_capped(path, MAX_SMALL_BYTES, false)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Reads at most `max` bytes; beyond that, cuts (`truncate`) or refuses.
fn read_capped(path: &Path, max: u64, truncate: bool) -> Result<Vec<u8>, ProcError> {
    let io = |source| ProcError::Io {
        path: path.into(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut buf = Vec::new();
    file.take(max + 1).read_to_end(&mut buf).map_err(io)?;
    if buf.len() as u64 > max {
        if !truncate {
            return Err(ProcError::TooLarge {
                path: path.into(),
                max,
            });
        }
        buf.truncate(max as usize);
    }
    Ok(buf)
}

/// `pid (comm) state ppid ...`, parsed by the procfs crate (comm may hold spaces and
/// parentheses; it counts fields after the last `)`). `None` when the text is not a stat line.
///
/// Only text of the kernel's shape reaches the crate: its parser slices around the parentheses
/// without checking (a `(` first, a `)` last or before the `(`, a multi-byte character next to
/// them panic there), which the kernel never writes but a fake tree or a fuzzer can.
pub fn parse_stat(text: &str) -> Option<Stat> {
    use procfs::FromRead as _;
    let line = text.trim();
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    if close < open || !line[..open].ends_with(' ') || !line[close..].starts_with(") ") {
        return None;
    }
    let stat = procfs::process::Stat::from_read(line.as_bytes()).ok()?;
    Some(Stat {
        state: stat.state,
        start_ticks: stat.starttime,
    })
}

/// The inode of a `ns/net` link: the network namespace as the kernel numbers it.
fn netns_inode(path: PathBuf) -> Result<u32, ProcError> {
    let ino = std::fs::metadata(&path)
        .map_err(|source| ProcError::Io {
            path: path.clone(),
            source,
        })?
        .ino();
    // Namespace inodes are the kernel's `unsigned int inum`.
    u32::try_from(ino).map_err(|_| ProcError::Format {
        path,
        what: "namespace inode above u32",
    })
}

/// Clock ticks per second for `/proc/<pid>/stat` times.
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf reads a constant; no memory is passed.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(100)
}

/// Boot time (`btime` of /proc/stat), seconds since the epoch.
pub fn boot_time(proc: &ProcFs) -> Option<u64> {
    let text = read_text(&proc.root.join("stat")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())
}

/// Inode of the cgroup v2 directory `path` under the cgroup2 mount: the cgroup id that
/// `bpf_get_current_cgroup_id` and `bpf_sk_cgroup_id` return.
pub fn cgroup_id(mount: &Path, path: &str) -> Result<u64, ProcError> {
    let rel = path.trim_start_matches('/');
    if Path::new(rel)
        .components()
        .any(|c| c == Component::ParentDir)
    {
        // A process outside our cgroup namespace shows as /../..: not under our mount.
        return Err(ProcError::OutsideCgroupNamespace { path: path.into() });
    }
    let dir = mount.join(rel);
    Ok(std::fs::metadata(&dir)
        .map_err(|source| ProcError::Io { path: dir, source })?
        .ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_command_names() {
        let tail = "S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 424242 20 21 22 23 24 25 26 \
                    27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49";
        let s = parse_stat(&format!("17 (java) {tail}")).unwrap();
        assert_eq!(
            s,
            Stat {
                state: 'S',
                start_ticks: 424242
            }
        );
        let s = parse_stat(&format!("17 (a) b (c)) {tail}")).unwrap();
        assert_eq!(s.start_ticks, 424242);
        assert_eq!(parse_stat("17 (java) S 1 2"), None);
        assert_eq!(parse_stat("garbage"), None);
        // Shapes the kernel never writes, which the crate's parser would slice wrongly.
        for odd in [
            "(java) S",
            "17 ) (",
            "17é(java) S 1",
            "17 (java)é S",
            " ( ) ",
        ] {
            assert_eq!(parse_stat(&format!("{odd} {tail}")), None, "{odd}");
        }
        for odd in ["17 (java)", "17 (java)é", "17 (", ")"] {
            assert_eq!(parse_stat(odd), None, "{odd}");
        }
    }

    #[test]
    fn capped_reads() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"0123456789").unwrap();
        assert_eq!(read_capped(&f, 10, false).unwrap(), b"0123456789");
        assert!(matches!(
            read_capped(&f, 9, false),
            Err(ProcError::TooLarge { max: 9, .. })
        ));
        assert_eq!(read_capped(&f, 4, true).unwrap(), b"0123");
        let gone = read_capped(&dir.path().join("nope"), 4, true).unwrap_err();
        assert!(gone.is_gone(), "{gone}");
    }

    #[test]
    fn reads_this_process() {
        let p = ProcFs::default();
        let me = std::process::id();
        assert_eq!(p.tgid(me).unwrap(), me);
        let stat = p.stat(me).unwrap();
        assert!(stat.start_ticks > 0);
        assert_eq!(
            p.netns(me).unwrap() as u64,
            std::fs::metadata("/proc/self/ns/net").unwrap().ino()
        );
        assert!(!p.cmdline(me).unwrap().is_empty());
        assert!(p.pids().unwrap().contains(&me));
    }
}
