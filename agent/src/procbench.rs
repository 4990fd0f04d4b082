//! `brokerscope bench-procfs` (hidden; run by `cargo xtask bench --procfs-only`): each of our
//! /proc readers against the `procfs` crate's equivalent, A then B in interleaved rounds in
//! one run, on real processes of this machine. Prints nanoseconds per read (the median of the
//! rounds) for each reader and process; the decisions they back are commented at the readers.
//!
//! The resource readers (stat, io, fd count, limits) are compared as a scrape uses them: ours
//! re-read kept files with `pread`, procfs's from a kept `Process` (its /proc/<pid> directory
//! open; each read opens the file afresh). Discovery's readers read a pid once, so both sides
//! start from the path each time.

use std::{hint::black_box, path::PathBuf, time::Instant};

use procfs::process::Process;

use crate::{
    capabilities, kernel,
    proc::ProcFs,
    usage::{self, Cached, ProcStats},
};

const ROUNDS: usize = 7;

/// One reader's figures on one process: ns per read, ours and procfs's.
pub struct Row {
    pub reader: &'static str,
    pub pid: u32,
    pub ours_ns: f64,
    pub procfs_ns: f64,
}

/// Runs every comparison `iterations` times per round on each of `pids`.
pub fn run(pids: &[u32], iterations: u32) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let fs = ProcFs::default();
    for &pid in pids {
        resource_rows(pid, iterations, &mut rows)?;
        discovery_rows(&fs, pid, iterations, &mut rows);
        // Reading these files walks the node's whole socket table (milliseconds): fewer reads.
        listen_ports_row(pid, iterations.div_ceil(100), &mut rows);
    }
    // The agent's own files, read once at start: mountinfo (kernel check), status CapEff.
    self_rows(iterations, &mut rows);
    Ok(rows)
}

/// Compares `ours` and `theirs` on `pid`, the figures a row of `rows`.
fn push(
    rows: &mut Vec<Row>,
    reader: &'static str,
    pid: u32,
    iterations: u32,
    ours: &mut dyn FnMut() -> bool,
    theirs: &mut dyn FnMut() -> bool,
) {
    let (ours_ns, procfs_ns) = compare(iterations, ours, theirs);
    rows.push(Row {
        reader,
        pid,
        ours_ns,
        procfs_ns,
    });
}

/// The resource readers, as a scrape uses them: ours re-reading kept files, procfs's from a
/// kept `Process`.
fn resource_rows(pid: u32, iterations: u32, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let kept = Process::new(pid as i32)?;
    let page = usage::page_size();
    let mut buf = Vec::new();

    let mut stat = Cached::new(dir.join("stat"));
    let mut io = Cached::new(dir.join("io"));
    let mut limits = Cached::new(dir.join("limits"));
    let mut fd_dir = Cached::new(dir.join("fd"));
    let mut row = |reader, ours: &mut dyn FnMut() -> bool, theirs: &mut dyn FnMut() -> bool| {
        push(rows, reader, pid, iterations, ours, theirs);
    };
    row(
        "stat (resources, kept file)",
        &mut || {
            let mut s = ProcStats::default();
            stat.read(&mut buf)
                .map(|t| usage::parse_stat(t, page, &mut s))
                .is_some()
                && s.threads.is_some()
        },
        &mut || {
            kept.stat()
                .map(|s| black_box((s.minflt, s.majflt, s.num_threads, s.rss * page)))
                .is_ok()
        },
    );
    let mut buf = Vec::new();
    row(
        "io (resources, kept file)",
        &mut || {
            io.read(&mut buf)
                .and_then(|t| {
                    black_box(usage::field(t, "read_bytes:"))?;
                    usage::field(t, "write_bytes:")
                })
                .is_some()
        },
        &mut || {
            kept.io()
                .map(|i| black_box((i.read_bytes, i.write_bytes)))
                .is_ok()
        },
    );
    let mut buf = Vec::new();
    row(
        "limits (resources, kept file)",
        &mut || {
            limits
                .read(&mut buf)
                .and_then(usage::parse_max_fds)
                .is_some()
        },
        &mut || {
            kept.limits()
                .map(|l| black_box(l.max_open_files.soft_limit))
                .is_ok()
        },
    );
    row(
        "fd count (resources)",
        &mut || usage::open_fds(pid, &mut fd_dir).is_some(),
        &mut || kept.fd_count().map(black_box).is_ok(),
    );
    Ok(())
}

/// Discovery's readers, each side starting from the path each time.
fn discovery_rows(fs: &ProcFs, pid: u32, iterations: u32, rows: &mut Vec<Row>) {
    let mut row = |reader, ours: &mut dyn FnMut() -> bool, theirs: &mut dyn FnMut() -> bool| {
        push(rows, reader, pid, iterations, ours, theirs);
    };
    row(
        "stat (discovery: our bounded read, procfs's parser)",
        &mut || fs.stat(pid).map(black_box).is_ok(),
        &mut || {
            Process::new(pid as i32)
                .and_then(|p| p.stat())
                .map(|s| black_box((s.starttime, s.state)))
                .is_ok()
        },
    );
    row(
        "status Tgid (discovery)",
        &mut || fs.tgid(pid).map(black_box).is_ok(),
        &mut || {
            Process::new(pid as i32)
                .and_then(|p| p.status())
                .map(|s| black_box(s.tgid))
                .is_ok()
        },
    );
    row(
        "cmdline (discovery)",
        &mut || fs.cmdline(pid).map(black_box).is_ok(),
        &mut || {
            Process::new(pid as i32)
                .and_then(|p| p.cmdline())
                .map(black_box)
                .is_ok()
        },
    );
    row(
        "environ one variable (discovery)",
        &mut || fs.env_var(pid, "HOSTNAME").map(black_box).is_ok(),
        &mut || {
            Process::new(pid as i32)
                .and_then(|p| p.environ())
                .map(|e| black_box(e.get(std::ffi::OsStr::new("HOSTNAME")).cloned()))
                .is_ok()
        },
    );
    row(
        "cgroup v2 path (discovery)",
        &mut || fs.cgroup2_path(pid).map(black_box).is_ok(),
        &mut || {
            Process::new(pid as i32)
                .and_then(|p| p.cgroups())
                .map(|c| black_box(c.0.into_iter().find(|g| g.hierarchy == 0)))
                .is_ok()
        },
    );
    row(
        "netns inode (discovery)",
        &mut || fs.netns(pid).map(black_box).is_ok(),
        &mut || {
            Process::new(pid as i32)
                .and_then(|p| p.namespaces())
                .map(|n| black_box(n.0.get(std::ffi::OsStr::new("net")).map(|n| n.identifier)))
                .is_ok()
        },
    );
}

/// The LISTEN ports of the process's namespace, from net/tcp and net/tcp6.
fn listen_ports_row(pid: u32, iterations: u32, rows: &mut Vec<Row>) {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    push(
        rows,
        "net/tcp+tcp6 LISTEN ports (state)",
        pid,
        iterations,
        &mut || {
            use std::io::BufRead as _;
            let (mut n, mut read) = (0, false);
            for file in ["tcp", "tcp6"] {
                if let Ok(f) = std::fs::File::open(dir.join("net").join(file)) {
                    read = true;
                    n += std::io::BufReader::new(f)
                        .lines()
                        .skip(1)
                        .take(crate::strimzi::MAX_TCP_LINES)
                        .map_while(Result::ok)
                        .filter_map(|l| crate::strimzi::listen_port(&l))
                        .count();
                }
            }
            black_box(n);
            read
        },
        &mut || {
            let Ok(p) = Process::new(pid as i32) else {
                return false;
            };
            let listen = |e: &procfs::net::TcpNetEntry| e.state == procfs::net::TcpState::Listen;
            let n = p.tcp().map(|v| v.iter().filter(|e| listen(e)).count());
            let n6 = p.tcp6().map(|v| v.iter().filter(|e| listen(e)).count());
            let ok = n.is_ok();
            black_box(n.unwrap_or(0) + n6.unwrap_or(0));
            ok
        },
    );
}

/// The agent's own files, read once at start.
fn self_rows(iterations: u32, rows: &mut Vec<Row>) {
    let me = std::process::id();
    let mut row = |reader, ours: &mut dyn FnMut() -> bool, theirs: &mut dyn FnMut() -> bool| {
        push(rows, reader, me, iterations, ours, theirs);
    };
    row(
        "mountinfo (kernel check, self)",
        &mut || {
            std::fs::read_to_string("/proc/self/mountinfo")
                .map(|t| black_box(kernel::parse_mountinfo(&t)))
                .is_ok()
        },
        &mut || {
            Process::myself()
                .and_then(|p| p.mountinfo())
                .map(black_box)
                .is_ok()
        },
    );
    row(
        "status CapEff (capabilities, self)",
        &mut || {
            std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| capabilities::parse_cap_eff(&s))
                .is_some()
        },
        &mut || {
            Process::myself()
                .and_then(|p| p.status())
                .map(|s| black_box(s.capeff))
                .is_ok()
        },
    );
}

/// Median over [`ROUNDS`] of the ns per call of `a` and of `b`, run alternately. A call that
/// fails is counted (a reader that cannot read this process would look fast): both must work.
fn compare(
    iterations: u32,
    a: &mut dyn FnMut() -> bool,
    b: &mut dyn FnMut() -> bool,
) -> (f64, f64) {
    let mut times = [Vec::new(), Vec::new()];
    let mut failed = [0u32; 2];
    for _ in 0..ROUNDS {
        for i in 0..2 {
            let f: &mut dyn FnMut() -> bool = if i == 0 { &mut *a } else { &mut *b };
            let start = Instant::now();
            for _ in 0..iterations {
                if !f() {
                    failed[i] += 1;
                }
            }
            times[i].push(start.elapsed().as_nanos() as f64 / f64::from(iterations.max(1)));
        }
    }
    let median = |mut v: Vec<f64>, failed: u32| {
        if failed > 0 {
            return f64::NAN;
        }
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let [ta, tb] = times;
    (median(ta, failed[0]), median(tb, failed[1]))
}

/// The table `bench-procfs` prints.
pub fn report(rows: &[Row]) -> String {
    let mut out = format!(
        "procfs {} vs ours, ns per read (median of {ROUNDS} interleaved rounds; NaN: the reader failed)\n\n\
         | reader | pid | ours ns | procfs ns | procfs / ours |\n|---|---|---|---|---|\n",
        PROCFS_VERSION
    );
    for r in rows {
        out += &format!(
            "| {} | {} | {:.0} | {:.0} | {:.2} |\n",
            r.reader,
            r.pid,
            r.ours_ns,
            r.procfs_ns,
            r.procfs_ns / r.ours_ns
        );
    }
    out
}

/// The crate version measured (agent/Cargo.toml).
const PROCFS_VERSION: &str = "0.18";
