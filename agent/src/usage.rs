//! Per-broker resources that /proc and cgroup v2 already count exactly, read when scraped:
//! memory, file descriptors, threads, page faults, storage I/O, cgroup memory and pressure.
//! The kernel-counted ones (CPU, scheduling, block I/O, fsync) come from `probes::resources`.
//!
//! Page faults come from `/proc/<pid>/stat` (`minflt`, `majflt`): `exceptions:page_fault_user`
//! fires on every fault without telling minor from major, so the kernel's own per-process
//! counts are both cheaper and exact.
//!
//! Reads only; every value is optional (a process may exit mid-read, a cgroup may lack a
//! controller).

use std::path::{Path, PathBuf};

/// Directory entries of `/proc/<pid>/fd` counted at most.
const MAX_FDS_COUNTED: usize = 4 * 1024 * 1024;

/// One broker process's /proc and cgroup figures.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcStats {
    pub rss_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub threads: Option<u64>,
    pub minor_faults: Option<u64>,
    pub major_faults: Option<u64>,
    /// `/proc/<pid>/io` `read_bytes`/`write_bytes`: what the process made the storage layer
    /// fetch or send (page-cache writeback included).
    pub storage_read_bytes: Option<u64>,
    pub storage_written_bytes: Option<u64>,
    /// cgroup v2 `memory.current` of the broker's cgroup.
    pub cgroup_memory_bytes: Option<u64>,
    /// cgroup v2 PSI `total` (seconds): (resource cpu|memory|io, kind some|full, seconds).
    pub pressure: Vec<(&'static str, &'static str, f64)>,
}

/// Kept over the procfs crate, which opens each file again per read (from a kept `Process`):
/// procfs 0.18 `stat()` 8.8/8.3 µs vs 4.0/3.5 µs here, `io()` 6.4 µs vs 1.4 µs, `limits()`
/// 16.2/16.0 µs vs 4.8/4.8 µs, `fd_count()` 1.2/1.3 µs vs 0.5/0.7 µs (kept handle + pread or
/// fstat), measured 2026-12-05 by `cargo xtask bench --procfs-only` (medians; this pid, pid 1).
///
/// The brokers' /proc and cgroup files, kept open between scrapes: each is re-read from
/// offset 0 with one `pread` (procfs and cgroupfs build the text afresh on every read from the
/// start) instead of open, stat, read, read and close. A file that fails is reopened by path
/// once; a process that exited fails both (`ESRCH`), so a reused pid never reads another
/// process's figures through an old descriptor. A path found absent is tried again only after
/// [`ABSENT_RETRY`]. Bounded by the brokers: files of pids that are no longer brokers are
/// closed by [`ProcFiles::retain`].
///
/// Each broker's files have a lock of their own, so a snapshot reads several brokers at once
/// (see `Model::snapshot`) without holding the map's.
#[derive(Default)]
pub struct ProcFiles {
    by_pid: std::collections::HashMap<u32, std::sync::Arc<std::sync::Mutex<BrokerFiles>>>,
}

/// One broker process's kept files.
pub struct BrokerFiles {
    pid: u32,
    stat: Cached,
    limits: Cached,
    io: Cached,
    fd_dir: Cached,
    cgroup: Option<CgroupFiles>,
    /// Reused text buffer.
    buf: Vec<u8>,
}

struct CgroupFiles {
    dir: PathBuf,
    memory_current: Cached,
    /// cpu, memory and io `.pressure`.
    pressure: [(&'static str, Cached); 3],
}

impl CgroupFiles {
    fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            memory_current: Cached::new(dir.join("memory.current")),
            pressure: ["cpu", "memory", "io"]
                .map(|r| (r, Cached::new(dir.join(format!("{r}.pressure"))))),
        }
    }
}

/// Longest text read from one of these files (limits is the largest, about 1.5 KB).
const MAX_TEXT: usize = 64 * 1024;

/// How long a file that could not be opened is left alone before the next try. Some are absent
/// for good (the root cgroup has no `memory.current`, a kernel booted without PSI has no
/// `.pressure` files) and a failed open walks the path each time: ten brokers in the root
/// cgroup paid two failed opens each per scrape, about 2 % of the agent's CPU at a few
/// thousand scrapes a second (2026-12-06). A controller enabled later shows within this.
const ABSENT_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

/// A file read from its start on each use, opened on first use.
pub(crate) struct Cached {
    path: PathBuf,
    file: Option<std::fs::File>,
    /// When opening it last found no such file (see [`ABSENT_RETRY`]).
    absent_since: Option<std::time::Instant>,
}

impl Cached {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self {
            path,
            file: None,
            absent_since: None,
        }
    }

    /// The kept file, opened if need be; `None` while the path was recently found absent.
    fn file(&mut self) -> Option<&std::fs::File> {
        if self.file.is_none() {
            if self
                .absent_since
                .is_some_and(|at| at.elapsed() < ABSENT_RETRY)
            {
                return None;
            }
            match std::fs::File::open(&self.path) {
                Ok(file) => {
                    self.file = Some(file);
                    self.absent_since = None;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.absent_since = Some(std::time::Instant::now());
                }
                Err(_) => {}
            }
        }
        self.file.as_ref()
    }

    /// `op` on the kept file; a failure closes it and tries once more on the path reopened.
    fn with_file<T>(
        &mut self,
        mut op: impl FnMut(&std::fs::File) -> std::io::Result<T>,
    ) -> Option<T> {
        for _ in 0..2 {
            match op(self.file()?) {
                Ok(v) => return Some(v),
                Err(_) => self.file = None,
            }
        }
        None
    }

    /// The whole text, or `None` when the file cannot be opened or read.
    pub(crate) fn read<'b>(&mut self, buf: &'b mut Vec<u8>) -> Option<&'b str> {
        let len = self.with_file(|file| read_from_start(file, buf))?;
        std::str::from_utf8(&buf[..len]).ok()
    }

    /// The open file's metadata (for the fd directory, whose size is its entry count).
    pub(crate) fn metadata(&mut self) -> Option<std::fs::Metadata> {
        self.with_file(std::fs::File::metadata)
    }
}

/// Reads `file` from offset 0 into `buf`. A read that comes back short of the buffer reached
/// the end (these are seq_files, which fill a read up to its size unless the text ends).
fn read_from_start(file: &std::fs::File, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt as _;
    if buf.len() < 4096 {
        buf.resize(4096, 0);
    }
    let mut len = 0;
    loop {
        let n = file.read_at(&mut buf[len..], len as u64)?;
        len += n;
        if n == 0 || len < buf.len() {
            return Ok(len);
        }
        if buf.len() >= MAX_TEXT {
            return Err(std::io::Error::other("longer than expected"));
        }
        buf.resize(buf.len() * 2, 0);
    }
}

impl ProcFiles {
    /// The kept files of `pid`, made (not yet opened) on first use.
    pub fn of(&mut self, pid: u32) -> std::sync::Arc<std::sync::Mutex<BrokerFiles>> {
        self.by_pid
            .entry(pid)
            .or_insert_with(|| {
                let proc = PathBuf::from(format!("/proc/{pid}"));
                std::sync::Arc::new(std::sync::Mutex::new(BrokerFiles {
                    pid,
                    stat: Cached::new(proc.join("stat")),
                    limits: Cached::new(proc.join("limits")),
                    io: Cached::new(proc.join("io")),
                    fd_dir: Cached::new(proc.join("fd")),
                    cgroup: None,
                    buf: Vec::new(),
                }))
            })
            .clone()
    }

    /// Reads a process's figures; `cgroup` is its cgroup v2 directory on this host, if known.
    #[cfg(test)]
    pub fn read(&mut self, pid: u32, cgroup: Option<&Path>) -> ProcStats {
        crate::locks::lock(&self.of(pid)).read(cgroup)
    }

    /// Closes the files of processes not in `pids`.
    pub fn retain(&mut self, pids: &[u32]) {
        self.by_pid.retain(|pid, _| pids.contains(pid));
    }
}

impl BrokerFiles {
    /// Reads the process's figures; `cgroup` is its cgroup v2 directory on this host, if known.
    pub fn read(&mut self, cgroup: Option<&Path>) -> ProcStats {
        if self.cgroup.as_ref().map(|c| c.dir.as_path()) != cgroup {
            self.cgroup = cgroup.map(CgroupFiles::new);
        }
        let buf = &mut self.buf;
        let mut s = ProcStats::default();
        if let Some(stat) = self.stat.read(buf) {
            parse_stat(stat, page_size(), &mut s);
        }
        s.open_fds = open_fds(self.pid, &mut self.fd_dir);
        if let Some(limits) = self.limits.read(buf) {
            s.max_fds = parse_max_fds(limits);
        }
        if let Some(io) = self.io.read(buf) {
            s.storage_read_bytes = field(io, "read_bytes:");
            s.storage_written_bytes = field(io, "write_bytes:");
        }
        if let Some(cg) = self.cgroup.as_mut() {
            s.cgroup_memory_bytes = cg
                .memory_current
                .read(buf)
                .and_then(|t| t.trim().parse().ok());
            for (resource, file) in &mut cg.pressure {
                if let Some(text) = file.read(buf) {
                    for (kind, secs) in parse_pressure(text) {
                        s.pressure.push((resource, kind, secs));
                    }
                }
            }
        }
        s
    }
}

/// Open descriptors of `pid`. Since Linux 6.2 the size of `/proc/<pid>/fd` is their number: one
/// stat instead of listing tens of thousands of entries (a broker keeps every log segment
/// open). Older kernels report 0 there, and get the listing.
pub(crate) fn open_fds(pid: u32, dir: &mut Cached) -> Option<u64> {
    match dir.metadata() {
        Some(meta) if meta.len() > 0 => Some(meta.len()),
        Some(_) => std::fs::read_dir(format!("/proc/{pid}/fd"))
            .ok()
            .map(|d| d.take(MAX_FDS_COUNTED).count() as u64),
        None => None,
    }
}

pub(crate) fn page_size() -> u64 {
    // SAFETY: sysconf has no memory preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).unwrap_or(4096)
}

/// Fields after the command (which may hold spaces and parentheses): field N of proc(5) is
/// index N-3 here.
pub(crate) fn parse_stat(stat: &str, page: u64, s: &mut ProcStats) {
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let at = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    s.minor_faults = at(10);
    s.major_faults = at(12);
    s.threads = at(20);
    // More pages than bytes can count is no size (and must not overflow).
    s.rss_bytes = at(24).and_then(|pages| pages.checked_mul(page));
}

pub(crate) fn parse_max_fds(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub(crate) fn field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
}

/// `some avg10=0.00 avg60=0.00 avg300=0.00 total=123` lines: total is in microseconds.
pub(crate) fn parse_pressure(text: &str) -> Vec<(&'static str, f64)> {
    text.lines()
        .filter_map(|l| {
            let kind = match l.split_whitespace().next()? {
                "some" => "some",
                "full" => "full",
                _ => return None,
            };
            let total: u64 = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("total="))?
                .parse()
                .ok()?;
            Some((kind, total as f64 / 1e6))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_files_read_fresh_figures_and_a_gone_process_reads_nothing() {
        use std::io::{BufRead as _, Write as _};
        // A shell that says it runs, opens three more files when told to, then waits.
        let mut child = std::process::Command::new("sh")
            .args([
                "-c",
                "echo up; read go; exec 5</dev/null 6</dev/null 7</dev/null; read done",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Counted only once the shell runs: until its exec completes, the child can still
        // hold descriptors of this (multi-threaded) test process.
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "up\n");
        let mut files = ProcFiles::default();
        let first = files.read(child.id(), None);
        assert_eq!(first.threads, Some(1));
        assert!(first.max_fds.is_some());
        let fds = first.open_fds.unwrap();

        // Through the same kept descriptors, the new files show.
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"go\n").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while files.read(child.id(), None).open_fds != Some(fds + 3) {
            assert!(
                std::time::Instant::now() < deadline,
                "fd count never moved from {fds} to {}: {:?}",
                fds + 3,
                files.read(child.id(), None).open_fds
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let me = std::process::id();
        assert!(files.read(me, None).threads.is_some());

        // Reaped: its kept files fail, the path is gone, and nothing is reported.
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(files.read(child.id(), None), ProcStats::default());
        files.retain(&[me]);
        assert_eq!(files.by_pid.len(), 1);
    }

    #[test]
    fn an_absent_file_is_tried_again_only_after_a_while() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.current");
        let mut file = Cached::new(path.clone());
        let mut buf = Vec::new();
        assert_eq!(file.read(&mut buf), None);
        // It appears: not looked for again yet.
        std::fs::write(&path, "4096\n").unwrap();
        assert_eq!(file.read(&mut buf), None);
        // Once the wait is over, it is opened and kept.
        file.absent_since = Some(std::time::Instant::now() - ABSENT_RETRY);
        assert_eq!(file.read(&mut buf), Some("4096\n"));
        assert_eq!(file.absent_since, None);
        std::fs::write(&path, "8192\n").unwrap();
        assert_eq!(file.read(&mut buf), Some("8192\n"));
    }

    #[test]
    fn stat_fields_after_a_tricky_command() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 1500 0 7 0 100 50 0 0 20 0 12 0 \
                    8000 123456789 300 18446744073709551615";
        let mut s = ProcStats::default();
        parse_stat(stat, 4096, &mut s);
        assert_eq!(s.minor_faults, Some(1500));
        assert_eq!(s.major_faults, Some(7));
        assert_eq!(s.threads, Some(12));
        assert_eq!(s.rss_bytes, Some(300 * 4096));
    }

    #[test]
    fn an_rss_beyond_what_bytes_count_is_unknown() {
        // Found by the `proc` fuzz target: pages times the page size overflowed (a panic where
        // overflow is checked).
        let mut fields = vec!["0"; 21];
        fields[16] = "1"; // field 20: threads
        fields[20] = "18446744073709551615"; // field 24: rss, in pages
        let stat = format!("1 (x) S {}", fields.join(" "));
        let mut s = ProcStats::default();
        parse_stat(&stat, 4096, &mut s);
        assert_eq!(s.rss_bytes, None);
        assert_eq!(s.threads, Some(1));
        parse_stat(
            &stat.replace("18446744073709551615", "4503599627370495"),
            4096,
            &mut s,
        );
        assert_eq!(s.rss_bytes, Some(4_503_599_627_370_495 * 4096));
    }

    #[test]
    fn limits_io_and_pressure() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1048576              1048576              files\n";
        assert_eq!(parse_max_fds(limits), Some(1_048_576));
        let io = "rchar: 10\nwchar: 20\nread_bytes: 4096\nwrite_bytes: 8192\n";
        assert_eq!(field(io, "read_bytes:"), Some(4096));
        assert_eq!(field(io, "write_bytes:"), Some(8192));
        let psi = "some avg10=0.00 avg60=0.00 avg300=0.00 total=2500000\n\
                   full avg10=0.00 avg60=0.00 avg300=0.00 total=1000\n";
        assert_eq!(parse_pressure(psi), vec![("some", 2.5), ("full", 0.001)]);
    }

    #[test]
    fn our_own_process_reads() {
        let s = ProcFiles::default().read(std::process::id(), None);
        assert!(s.rss_bytes.unwrap() > 0);
        assert!(s.open_fds.unwrap() >= 3);
        assert!(s.max_fds.unwrap() > 0);
        assert!(s.threads.unwrap() >= 1);
        assert!(s.minor_faults.is_some());
    }
}
