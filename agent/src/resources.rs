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

use std::path::Path;

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

/// Reads a process's figures; `cgroup` is its cgroup v2 directory on this host, if known.
pub fn read(pid: u32, cgroup: Option<&Path>) -> ProcStats {
    let mut s = ProcStats::default();
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        parse_stat(&stat, page_size(), &mut s);
    }
    s.open_fds = open_fds(pid);
    if let Ok(limits) = std::fs::read_to_string(format!("/proc/{pid}/limits")) {
        s.max_fds = parse_max_fds(&limits);
    }
    if let Ok(io) = std::fs::read_to_string(format!("/proc/{pid}/io")) {
        s.storage_read_bytes = field(&io, "read_bytes:");
        s.storage_written_bytes = field(&io, "write_bytes:");
    }
    if let Some(cg) = cgroup {
        s.cgroup_memory_bytes = std::fs::read_to_string(cg.join("memory.current"))
            .ok()
            .and_then(|t| t.trim().parse().ok());
        for resource in ["cpu", "memory", "io"] {
            if let Ok(text) = std::fs::read_to_string(cg.join(format!("{resource}.pressure"))) {
                for (kind, secs) in parse_pressure(&text) {
                    s.pressure.push((resource, kind, secs));
                }
            }
        }
    }
    s
}

/// Open descriptors of `pid`. Since Linux 6.2 the size of `/proc/<pid>/fd` is their number: one
/// stat instead of listing tens of thousands of entries (a broker keeps every log segment
/// open). Older kernels report 0 there, and get the listing.
fn open_fds(pid: u32) -> Option<u64> {
    let dir = format!("/proc/{pid}/fd");
    match std::fs::metadata(&dir) {
        Ok(meta) if meta.len() > 0 => Some(meta.len()),
        Ok(_) => std::fs::read_dir(&dir)
            .ok()
            .map(|d| d.take(MAX_FDS_COUNTED).count() as u64),
        Err(_) => None,
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).unwrap_or(4096)
}

/// Fields after the command (which may hold spaces and parentheses): field N of proc(5) is
/// index N-3 here.
fn parse_stat(stat: &str, page: u64, s: &mut ProcStats) {
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let at = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    s.minor_faults = at(10);
    s.major_faults = at(12);
    s.threads = at(20);
    s.rss_bytes = at(24).map(|pages| pages * page);
}

fn parse_max_fds(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
}

/// `some avg10=0.00 avg60=0.00 avg300=0.00 total=123` lines: total is in microseconds.
fn parse_pressure(text: &str) -> Vec<(&'static str, f64)> {
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
        let s = read(std::process::id(), None);
        assert!(s.rss_bytes.unwrap() > 0);
        assert!(s.open_fds.unwrap() >= 3);
        assert!(s.max_fds.unwrap() > 0);
        assert!(s.threads.unwrap() >= 1);
        assert!(s.minor_faults.is_some());
    }
}
