//! `cargo xtask vmtest`: the privileged end-to-end tests inside real Debian distribution
//! kernels under QEMU, and captures of those kernels' tracepoint formats and BTF for the probe
//! loader's unit tests. docs/vmtest.md says how to run it and why it is built this way.
//!
//! The guest runs the host's own binaries: QEMU exports the host's root file system read-only
//! over 9p, the guest's /init puts a tmpfs overlay on top and switches into it, so curl,
//! openssl, java, promtool, ip, tc and the test binaries are found at their host paths and
//! nothing in the guest can write to the host. Only the kernel and its modules come from the
//! Debian package. The guest side of a run is this same binary (`--guest PLAN`), so the host
//! capture and the guest capture are one function.
//!
//! Owns target/vmtest/ (package cache, extracted kernels, initramfs, snapshot of the binaries,
//! console logs) and, with `--capture`, the capture directory. Touches nothing else.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{cmd::run, setup};

/// The end-to-end tests run in each guest: (test binary, test name). One or more per probe
/// family and hook form; the whole suite is for the host (`cargo xtask test`), where it runs
/// twenty times faster. docs/vmtest.md says why each one is here.
pub const SUBSET: &[(&str, &str)] = &[
    // Sockets: per-port accept/active/close counts; exact payload bytes, resets and lifetimes
    // through each hook form (BTF tracepoint, raw tracepoint, classic tracepoint); retransmits
    // against the namespace's own RetransSegs; listen drops against the kernel's own count.
    ("sockets", "accepted_active_and_closed_are_exact_per_port"),
    ("sockets", "payload_bytes_resets_and_lifetimes_are_exact"),
    (
        "sockets",
        "payload_bytes_resets_and_lifetimes_are_exact_through_the_raw_tracepoint",
    ),
    (
        "sockets",
        "payload_bytes_resets_and_lifetimes_are_exact_through_the_classic_tracepoint",
    ),
    ("sockets", "retransmits_agree_with_the_namespaces_own_count"),
    ("sockets", "listen_drops_match_the_kernels_own_count"),
    (
        "sockets",
        "scrapes_read_open_sockets_without_walking_the_socket_table_and_follow_a_reopened_listener",
    ),
    // Process discovery from exec/exit events, both exit hook forms; sendfile accounting.
    (
        "discovery",
        "a_killed_broker_stops_and_its_restart_keeps_identity",
    ),
    (
        "discovery",
        "a_killed_broker_is_seen_stopped_through_the_classic_exit_tracepoint_too",
    ),
    ("discovery", "fake_broker_serves_requests_and_sendfile"),
    // Container files: resolved inside the broker's root by openat2(RESOLVE_IN_ROOT).
    (
        "hostile",
        "links_and_dot_dots_out_of_a_container_never_reach_the_node",
    ),
    // Broker state: recovery from the log dirs, and the operator's Java client.
    (
        "state",
        "start_recovery_running_shutdown_and_exit_in_strimzi_format",
    ),
    (
        "state",
        "several_brokers_need_a_choice_and_the_java_client_reads_the_state_strictly",
    ),
    // Resources: CPU time and fsyncs, fsyncs on each filesystem's own hooks (ext4, xfs and btrfs
    // are modules on Debian), run-queue latency (both scheduler hook forms), block I/O.
    (
        "resources",
        "cpu_time_agrees_with_proc_and_fsyncs_are_counted_exactly",
    ),
    (
        "resources",
        "fsyncs_are_exact_on_ext4_xfs_and_btrfs_without_a_syscall_hook",
    ),
    (
        "resources",
        "runqueue_latency_grows_when_two_burners_share_a_cpu",
    ),
    (
        "resources",
        "direct_io_bytes_on_a_loop_device_match_what_was_written",
    ),
    // Attach/detach as a whole, the metrics page's format, the mTLS endpoint.
    (
        "lifecycle",
        "ready_reports_attached_probes_and_sigterm_leaves_them_pinned_until_cleanup",
    ),
    // Pinned maps and links, adopted by a restarted agent: exact counts across kill -9.
    (
        "longevity",
        "kill_9_and_restart_under_traffic_loses_no_count_and_counts_none_twice",
    ),
    ("server", "promtool_accepts_the_metrics_page"),
    ("tls", "http1_and_http2_with_the_client_cert_get_200"),
];

/// Guest size: two vCPUs like the CI machines, and room for the tmpfs overlay, /tmp and the
/// loop device images the tests make.
const GUEST_CPUS: &str = "2";
const GUEST_MEMORY: &str = "3584M";

/// TCG with one host thread for all vCPUs. Multi-threaded TCG (QEMU 7.2) runs the vCPUs in
/// parallel, but a JVM in the guest crashes there now and then (SIGSEGV at the entry of a method
/// its JIT just compiled on the other vCPU, about one run in eight); one thread costs the subset
/// little time (docs/vmtest.md).
const ACCEL_TCG: &str = "tcg,thread=single";

/// BROKERSCOPE_TEST_TIME_SCALE under TCG: guests took up to 14 times the host's budget for the
/// same step (a killed broker seen stopped: 0.41-1.39 s against 100 ms).
const TIME_SCALE_TCG: u32 = 20;

/// The CPU QEMU's TCG emulates for the guest: everything it can, as a node's CPU would offer.
const CPU_TCG: &str = "max";

/// 9p message size: the largest both kernels' virtio transport accepts comfortably; the default
/// (8 KiB on 6.1) makes reading the 160 MB debug agent binary several times slower.
const MSIZE: &str = "262144";

/// Modules the initramfs loads before it can mount the host's root (with their dependencies
/// from modules.dep; any of them may be built in).
const INITRAMFS_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];

/// Tracepoint categories a capture copies whole, with the module that registers them when they
/// are not built in.
const CAPTURE_CATEGORIES: &[(&str, Option<&str>)] = &[
    ("sock", None),
    ("tcp", None),
    ("sched", None),
    ("signal", None),
    ("block", None),
    ("ext4", Some("ext4")),
    ("xfs", Some("xfs")),
    ("btrfs", Some("btrfs")),
];

/// The only syscall tracepoints a capture copies (each as sys_enter_ and sys_exit_).
const CAPTURE_SYSCALLS: &[&str] = &["openat", "openat2", "fsync", "fdatasync"];

#[derive(clap::Args)]
pub struct Args {
    /// `6.1` or `6.12` (the newest Debian 12 package of that series), `all` (both), or
    /// `host` (the running kernel, no VM: only with --capture).
    #[arg(long, required_unless_present = "guest")]
    kernel: Option<String>,
    /// Only subset tests whose name contains this.
    filter: Option<String>,
    /// Instead of running tests, copy the kernel's tracepoint formats, BTF and name into DIR
    /// (default agent/testdata/kernels/debian12-<series>/, or dev-<major.minor>/ for host).
    #[arg(long, value_name = "DIR", num_args = 0..=1)]
    capture: Option<Option<PathBuf>>,
    /// QEMU -accel: emulation with one host thread for both vCPUs (the default; see
    /// docs/vmtest.md), `tcg` (multi-threaded), or `kvm` where KVM works (not nested on the CI
    /// machines).
    #[arg(long, default_value = ACCEL_TCG)]
    accel: String,
    /// QEMU -cpu model (default `max` under TCG, `host` under KVM).
    #[arg(long)]
    cpu: Option<String>,
    /// Hard limit for one VM, in minutes: QEMU is killed and the run fails.
    #[arg(long, default_value_t = 20)]
    timeout_minutes: u64,
    /// Limit for one test in the guest, in minutes: the test is killed and counted failed.
    #[arg(long, default_value_t = 5)]
    test_timeout_minutes: u64,
    /// BROKERSCOPE_TEST_TIME_SCALE in the guest: how many times longer the tests' time budgets
    /// may be (default 20 under TCG, 1 under KVM).
    #[arg(long)]
    time_scale: Option<u32>,
    /// Run this shell command in the guest (root, the tests' environment) instead of the tests:
    /// for looking at the guest, e.g. `--exec 'bpftool feature probe kernel | head'`.
    #[arg(long, value_name = "COMMAND", conflicts_with = "capture")]
    exec: Option<String>,
    /// Inside the guest: carry out this plan (written by the host side).
    #[arg(long, hide = true, value_name = "PLAN")]
    guest: Option<PathBuf>,
}

/// A Debian 12 kernel series the tests run on.
#[derive(Clone, Copy)]
struct Series {
    name: &'static str,
    /// The number that orders this series' packages, if `package` is one of them:
    /// linux-image-6.1.0-<N>-amd64 and linux-image-6.12.<N>+deb12-amd64 (the standard flavour:
    /// the cloud one has no 9p).
    build_number: fn(&str) -> Option<u32>,
}

fn number(s: &str) -> Option<u32> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

const SERIES: &[Series] = &[
    Series {
        name: "6.1",
        build_number: |p| {
            number(
                p.strip_prefix("linux-image-6.1.0-")?
                    .strip_suffix("-amd64")?,
            )
        },
    },
    Series {
        name: "6.12",
        build_number: |p| {
            number(
                p.strip_prefix("linux-image-6.12.")?
                    .strip_suffix("+deb12-amd64")?,
            )
        },
    },
];

pub fn main(root: &Path, args: Args) -> anyhow::Result<()> {
    if let Some(plan) = &args.guest {
        return guest(plan);
    }
    let kernel = args.kernel.as_deref().unwrap_or_default();
    let series: Vec<Series> = match kernel {
        "host" => return capture_host(root, args.capture.as_ref()),
        "all" => SERIES.to_vec(),
        name => vec![
            *SERIES
                .iter()
                .find(|s| s.name == name)
                .with_context(|| format!("unknown --kernel {name}: use 6.1, 6.12, all or host"))?,
        ],
    };
    if series.len() > 1 && matches!(args.capture, Some(Some(_))) {
        bail!("--capture DIR takes one kernel; with `--kernel all` leave DIR out");
    }
    setup::ensure(setup::Needs::Vmtest)?;
    let vm = Vm {
        cpu: args.cpu.clone(),
        accel: args.accel.clone(),
        timeout: Duration::from_secs(args.timeout_minutes * 60),
    };
    let work = work_dir(root)?;
    let _lock = lock(&work)?;
    let snapshot = work.join("bin");
    let job = if let Some(dir) = &args.capture {
        Job::Capture {
            xtask: snapshot_xtask(&snapshot)?,
            dir: dir.clone(),
        }
    } else if let Some(command) = &args.exec {
        Job::Exec {
            xtask: snapshot_xtask(&snapshot)?,
            command: command.clone(),
        }
    } else {
        let tests = select(args.filter.as_deref())?;
        Job::Tests(TestPlan {
            binaries: build(root, &snapshot)?,
            tests,
            time_scale: args.time_scale.unwrap_or(if args.accel.starts_with("kvm") {
                1
            } else {
                TIME_SCALE_TCG
            }),
            test_timeout: Duration::from_secs(args.test_timeout_minutes * 60),
        })
    };
    let mut failed = Vec::new();
    for s in &series {
        match Kernel::fetch(&work, s).and_then(|kernel| job.run(root, &vm, &kernel)) {
            Ok(true) => {}
            Ok(false) => failed.push(s.name),
            Err(e) => {
                println!("vmtest {}: {e:#}", s.name);
                failed.push(s.name);
            }
        }
    }
    if !failed.is_empty() {
        bail!("vmtest failed on {}", failed.join(", "));
    }
    Ok(())
}

/// Runs `command(xtask, out)` as root in a guest of the Debian 12 kernel `series` (`6.1` or
/// `6.12`; TCG, as `cargo xtask vmtest` runs by default, for `timeout` at most). The guest sees
/// the host's files read-only, `xtask` being this xtask binary's copy for it; `out` is a
/// directory it may write that the host keeps. Whether the command succeeded, and `out`.
pub fn exec_in_series(
    root: &Path,
    series: &str,
    timeout: Duration,
    command: impl Fn(&Path, &Path) -> String,
) -> anyhow::Result<(bool, PathBuf)> {
    let series = SERIES
        .iter()
        .find(|s| s.name == series)
        .with_context(|| format!("unknown kernel series {series}"))?;
    setup::ensure(setup::Needs::Vmtest)?;
    let vm = Vm {
        cpu: None,
        accel: ACCEL_TCG.to_string(),
        timeout,
    };
    let work = work_dir(root)?;
    let _lock = lock(&work)?;
    let xtask = snapshot_xtask(&work.join("bin"))?;
    let kernel = Kernel::fetch(&work, series)?;
    // `exec_in_vm` empties it before the guest starts.
    let out = kernel.dir.join("out");
    let ok = exec_in_vm(&vm, &kernel, &xtask, &command(&xtask, &out))?;
    Ok((ok, out))
}

/// `--kernel host`: no VM; with `--capture`, the running kernel captured (by default into
/// agent/testdata/kernels/dev-<series>).
fn capture_host(root: &Path, capture: Option<&Option<PathBuf>>) -> anyhow::Result<()> {
    let Some(dir) = capture else {
        bail!(
            "`--kernel host` runs no VM: the end-to-end tests on the running kernel are \
             `sudo -E cargo xtask test`; `--kernel host --capture` captures it"
        );
    };
    let release = uname_r()?;
    let dir = dir.clone().unwrap_or_else(|| {
        let series = release.split('.').take(2).collect::<Vec<_>>().join(".");
        root.join("agent/testdata/kernels")
            .join(format!("dev-{series}"))
    });
    capture_running_kernel(&dir, None, false)?;
    println!("vmtest host: captured {release} into {}", dir.display());
    Ok(())
}

/// target/vmtest, created and resolved: the guest's /init resolves these paths inside the
/// host's root, so no symlinks in them (and no whitespace: they are named unquoted).
fn work_dir(root: &Path) -> anyhow::Result<PathBuf> {
    let work = root.join("target/vmtest");
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let work = work
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", work.display()))?;
    if work
        .to_str()
        .is_none_or(|r| r.contains(char::is_whitespace))
    {
        bail!(
            "{} holds whitespace or is not UTF-8: the guest's plan and init script name host \
             paths unquoted",
            work.display()
        );
    }
    Ok(work)
}

/// What each kernel's guest does.
enum Job {
    /// Copy its tracepoint formats, BTF and name into `dir` (default: agent/testdata/kernels/).
    Capture {
        xtask: PathBuf,
        dir: Option<PathBuf>,
    },
    /// Run a shell command.
    Exec { xtask: PathBuf, command: String },
    /// Run the end-to-end tests.
    Tests(TestPlan),
}

impl Job {
    /// Ok(false) when a test, the command or the capture failed in the guest.
    fn run(&self, root: &Path, vm: &Vm, kernel: &Kernel) -> anyhow::Result<bool> {
        match self {
            Job::Capture { xtask, dir } => {
                let dest = dir.clone().unwrap_or_else(|| {
                    root.join("agent/testdata/kernels")
                        .join(format!("debian12-{}", kernel.series))
                });
                capture_in_vm(vm, kernel, xtask, &dest).map(|()| true)
            }
            Job::Exec { xtask, command } => exec_in_vm(vm, kernel, xtask, command),
            Job::Tests(plan) => test_in_vm(vm, kernel, plan),
        }
    }
}

/// One run at a time: runs share target/vmtest/bin and each kernel's plan, initramfs, console
/// log and results share, so a second run would change them under the first one's guest. The
/// lock is held until the returned file is dropped (or the process ends).
fn lock(work: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd as _;
    let path = work.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        eprintln!(
            "vmtest: another vmtest run holds {}; waiting for it to finish",
            path.display()
        );
        // SAFETY: as above.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    Ok(file)
}

fn uname_r() -> anyhow::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("cannot read /proc/sys/kernel/osrelease")?
        .trim()
        .to_string())
}

use crate::cmd::output;

/// A distribution kernel unpacked under target/vmtest/<release>/root.
struct Kernel {
    /// `6.1`, `6.12`.
    series: &'static str,
    package: String,
    version: String,
    /// `uname -r` of it (the directory under lib/modules).
    release: String,
    dir: PathBuf,
    root: PathBuf,
}

impl Kernel {
    /// Resolves the series' newest package, downloads it once into `work`/cache (target/vmtest)
    /// and unpacks it once (with depmod run, so modprobe works in the guest).
    fn fetch(work: &Path, series: &Series) -> anyhow::Result<Self> {
        let package = newest_package(series)?;
        let cache = work.join("cache");
        let deb = cached_deb(&cache, &package)?;
        let version = output(
            Command::new("dpkg-deb")
                .args(["-f"])
                .arg(&deb)
                .arg("Version"),
        )?
        .trim()
        .to_string();
        let release = package
            .strip_prefix("linux-image-")
            .context("kernel packages are named linux-image-<release>")?
            .to_string();
        let dir = work.join(&release);
        let root = dir.join("root");
        let stamp = dir.join("unpacked-from");
        let deb_name = deb.file_name().unwrap_or_default().to_string_lossy();
        let unpacked = std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == deb_name);
        if !unpacked {
            eprintln!("vmtest: unpacking {deb_name}");
            let _ = std::fs::remove_dir_all(&root);
            let _ = std::fs::remove_file(&stamp);
            let partial = dir.join("root.partial");
            let _ = std::fs::remove_dir_all(&partial);
            std::fs::create_dir_all(&partial)
                .with_context(|| format!("cannot create {}", partial.display()))?;
            run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
            std::fs::rename(&partial, &root)?;
            run(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
            std::fs::write(&stamp, format!("{deb_name}\n"))?;
        }
        for needed in [
            root.join("boot").join(format!("vmlinuz-{release}")),
            root.join("lib/modules").join(&release).join("modules.dep"),
        ] {
            if !needed.exists() {
                bail!(
                    "{} is missing from {deb_name}: is {package} a kernel image package?",
                    needed.display()
                );
            }
        }
        Ok(Kernel {
            series: series.name,
            package,
            version,
            release,
            dir,
            root,
        })
    }

    fn vmlinuz(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }

    fn modules(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }
}

/// The newest package of `series` apt knows, by build number (no number is pinned: Debian
/// moves the ABI number with every security update). Updates empty package lists once.
fn newest_package(series: &Series) -> anyhow::Result<String> {
    for attempt in 0..2 {
        let names = output(Command::new("apt-cache").args(["pkgnames", "linux-image-6."]))?;
        let mut found: Vec<(u32, &str)> = names
            .lines()
            .filter_map(|p| Some(((series.build_number)(p)?, p)))
            .collect();
        found.sort_unstable();
        // pkgnames also lists names only mentioned by other packages: take the newest one
        // that can be downloaded.
        for (_, package) in found.iter().rev() {
            let policy = output(Command::new("apt-cache").args(["policy", package]))?;
            let candidate = policy
                .lines()
                .find_map(|l| l.trim().strip_prefix("Candidate:"))
                .map(str::trim);
            if candidate.is_some_and(|c| c != "(none)") {
                return Ok(package.to_string());
            }
        }
        if attempt == 0 {
            if !crate::cmd::is_root() {
                bail!(
                    "apt knows no {} kernel package: run `sudo apt-get update` (Debian 12 \
                     lists, main and security)",
                    series.name
                );
            }
            eprintln!(
                "vmtest: no {} kernel in apt's lists; running apt-get update",
                series.name
            );
            run(Command::new("apt-get").args(["update", "-qq"]))?;
        }
    }
    bail!(
        "no downloadable {} kernel package in apt's lists (want linux-image-6.1.0-<N>-amd64 or \
         linux-image-6.12.<N>+deb12-amd64 from Debian 12's main or security suite)",
        series.name
    )
}

/// target/vmtest/cache/<package>_*.deb, downloaded with `apt-get download` unless present.
fn cached_deb(cache: &Path, package: &str) -> anyhow::Result<PathBuf> {
    let find = || -> anyhow::Result<Option<PathBuf>> {
        let prefix = format!("{package}_");
        Ok(std::fs::read_dir(cache)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
            }))
    };
    std::fs::create_dir_all(cache).with_context(|| format!("cannot create {}", cache.display()))?;
    if let Some(deb) = find()? {
        return Ok(deb);
    }
    // Into a scratch directory first: an interrupted download never looks cached.
    let partial = cache.join("partial");
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial)?;
    eprintln!("vmtest: downloading {package}");
    run(Command::new("apt-get")
        // apt drops to its _apt user to download, which cannot write into target/.
        .args(["-q", "-o", "APT::Sandbox::User=root", "download", package])
        .current_dir(&partial))?;
    for entry in std::fs::read_dir(&partial)? {
        let path = entry?.path();
        if let Some(name) = path.file_name() {
            std::fs::rename(&path, cache.join(name))?;
        }
    }
    let _ = std::fs::remove_dir(&partial);
    find()?.with_context(|| format!("apt-get download {package} left no .deb"))
}

/// The binaries a guest runs, copied out of target/debug so a concurrent rebuild cannot
/// change them under a running VM.
struct Binaries {
    agent: PathBuf,
    fake_broker: PathBuf,
    xtask: PathBuf,
    /// Test binary name (sockets, state, ...) to its copy.
    tests: BTreeMap<String, PathBuf>,
}

fn copy_into(dir: &Path, from: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let to = dir.join(name);
    // A new inode each time: a guest still reading the old one keeps it.
    let _ = std::fs::remove_file(&to);
    std::fs::copy(from, &to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    Ok(to)
}

fn snapshot_xtask(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let me = std::env::current_exe().context("cannot find this xtask binary")?;
    copy_into(dir, &me, "xtask")
}

/// Builds the agent and the end-to-end test binaries (without running them) and snapshots them.
fn build(root: &Path, dir: &Path) -> anyhow::Result<Binaries> {
    let agent = crate::cmd::build_agent(root, false)?;
    let mut cmd = crate::cmd::cargo(root);
    cmd.args([
        "test",
        "--package",
        "brokerscope-tests",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    let shown = format!("{cmd:?}");
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed: {}", out.status);
    }
    let mut tests = BTreeMap::new();
    let mut fake_broker = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let (Some(exe), Some(name)) = (msg["executable"].as_str(), msg["target"]["name"].as_str())
        else {
            continue;
        };
        let kinds = msg["target"]["kind"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if kinds.iter().any(|k| k == "test") {
            tests.insert(name.to_string(), PathBuf::from(exe));
        } else if kinds.iter().any(|k| k == "bin")
            && name == "fake-broker"
            // Not the bin's own unit-test harness, which `--no-run` builds too.
            && msg["profile"]["test"] == false
        {
            fake_broker = Some(PathBuf::from(exe));
        }
    }
    let fake_broker = fake_broker.unwrap_or_else(|| root.join("target/debug/fake-broker"));
    std::fs::create_dir_all(dir)?;
    let mut copies = BTreeMap::new();
    for (name, exe) in &tests {
        copies.insert(name.clone(), copy_into(dir, exe, &format!("test-{name}"))?);
    }
    Ok(Binaries {
        agent: copy_into(dir, &agent, "brokerscope")?,
        fake_broker: copy_into(dir, &fake_broker, "fake-broker")?,
        xtask: snapshot_xtask(dir)?,
        tests: copies,
    })
}

/// The subset, narrowed by `filter` (a substring of `binary::name`).
fn select(filter: Option<&str>) -> anyhow::Result<Vec<(&'static str, &'static str)>> {
    let tests: Vec<_> = SUBSET
        .iter()
        .copied()
        .filter(|(bin, name)| filter.is_none_or(|f| format!("{bin}::{name}").contains(f)))
        .collect();
    if tests.is_empty() {
        bail!(
            "no test of the vmtest subset matches {:?} (see SUBSET in xtask/src/vmtest.rs)",
            filter.unwrap_or_default()
        );
    }
    Ok(tests)
}

struct TestPlan {
    binaries: Binaries,
    tests: Vec<(&'static str, &'static str)>,
    time_scale: u32,
    test_timeout: Duration,
}

struct Vm {
    cpu: Option<String>,
    accel: String,
    timeout: Duration,
}

/// What the host learns from one guest's console.
#[derive(Default)]
struct Console {
    /// The guest's /init exit code for the plan (`VMTEST-RESULT rc=N`).
    rc: Option<i32>,
    /// Since QEMU started: /init running, and the plan starting (mounts done).
    booted: Option<Duration>,
    ready: Option<Duration>,
    elapsed: Duration,
    timed_out: bool,
    /// `VMTEST-TEST` lines: (status, seconds, name).
    tests: Vec<(String, String, String)>,
}

/// Runs the subset in one guest; Ok(false) when a test failed.
fn test_in_vm(vm: &Vm, kernel: &Kernel, plan: &TestPlan) -> anyhow::Result<bool> {
    let out = fresh_out_dir(kernel)?;
    let mut text = String::new();
    let env = [
        (
            "BROKERSCOPE_TEST_BIN",
            plan.binaries.agent.display().to_string(),
        ),
        (
            "BROKERSCOPE_FAKE_BROKER_BIN",
            plan.binaries.fake_broker.display().to_string(),
        ),
        ("BROKERSCOPE_TEST_TIME_SCALE", plan.time_scale.to_string()),
        ("RUST_BACKTRACE", "1".to_string()),
    ];
    for (k, v) in env {
        writeln!(text, "env {k}={v}")?;
    }
    writeln!(text, "out {}", out.display())?;
    writeln!(text, "timeout {}", plan.test_timeout.as_secs())?;
    for (bin, name) in &plan.tests {
        let exe = plan.binaries.tests.get(*bin).with_context(|| {
            format!("cargo built no test binary `{bin}` in brokerscope-tests (SUBSET is stale?)")
        })?;
        writeln!(text, "test {} {name}", exe.display())?;
    }
    let plan_file = kernel.dir.join("plan.txt");
    std::fs::write(&plan_file, text)?;
    let console = boot(vm, kernel, &plan.binaries.xtask, &plan_file, &out)?;

    println!();
    println!(
        "vmtest {} ({} {}): boot {}, ready {}, total {:.0} s",
        kernel.series,
        kernel.package,
        kernel.version,
        secs(console.booted),
        secs(console.ready),
        console.elapsed.as_secs_f64()
    );
    for (status, seconds, name) in &console.tests {
        println!("  {status:<7} {seconds:>6} s  {name}");
    }
    // A test the guest never reported (it stopped early) counts as failed.
    let passed = console.tests.iter().filter(|t| t.0 == "passed").count();
    let failed = plan.tests.len() - passed.min(plan.tests.len());
    println!("vmtest {}: {passed} passed, {failed} failed", kernel.series);
    Ok(console.finished(vm, kernel) && console.rc == Some(0) && failed == 0)
}

/// Runs `command` in a guest (`--exec`); Ok(false) when it fails there.
fn exec_in_vm(vm: &Vm, kernel: &Kernel, xtask: &Path, command: &str) -> anyhow::Result<bool> {
    let out = fresh_out_dir(kernel)?;
    let plan = kernel.dir.join("plan.txt");
    std::fs::write(&plan, format!("out {}\nexec {command}\n", out.display()))?;
    let console = boot(vm, kernel, xtask, &plan, &out)?;
    println!(
        "vmtest {}: `{command}` exited with {} (boot {}, total {:.0} s)",
        kernel.series,
        console.rc.map_or("no result".into(), |rc| rc.to_string()),
        secs(console.booted),
        console.elapsed.as_secs_f64()
    );
    Ok(console.finished(vm, kernel) && console.rc == Some(0))
}

impl Console {
    /// Whether the guest ran its plan to the end; says why not otherwise.
    fn finished(&self, vm: &Vm, kernel: &Kernel) -> bool {
        let log = kernel.dir.join("console.log");
        if self.timed_out {
            println!(
                "vmtest {}: the VM ran past --timeout-minutes={} and was killed (console in {})",
                kernel.series,
                vm.timeout.as_secs() / 60,
                log.display()
            );
        } else if self.rc.is_none() {
            println!(
                "vmtest {}: the guest stopped without a result (console in {})",
                kernel.series,
                log.display()
            );
        }
        !self.timed_out && self.rc.is_some()
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1} s", d.as_secs_f64()))
}

/// Boots the kernel, runs the capture in it and copies the result into `dest`.
fn capture_in_vm(vm: &Vm, kernel: &Kernel, xtask: &Path, dest: &Path) -> anyhow::Result<()> {
    let out = fresh_out_dir(kernel)?;
    let plan_file = kernel.dir.join("plan.txt");
    std::fs::write(
        &plan_file,
        format!(
            "out {}\npackage {} {}\ncapture {}\n",
            out.display(),
            kernel.package,
            kernel.version,
            out.display()
        ),
    )?;
    let console = boot(vm, kernel, xtask, &plan_file, &out)?;
    if console.rc != Some(0) {
        bail!(
            "the capture in the guest failed (rc {:?}; console in {})",
            console.rc,
            kernel.dir.join("console.log").display()
        );
    }
    std::fs::create_dir_all(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    for file in CAPTURE_FILES {
        std::fs::copy(out.join(file), dest.join(file))
            .with_context(|| format!("the guest wrote no {file}"))?;
    }
    println!(
        "vmtest {}: captured {} {} into {} (boot {}, total {:.0} s)",
        kernel.release,
        kernel.package,
        kernel.version,
        dest.display(),
        secs(console.booted),
        console.elapsed.as_secs_f64()
    );
    Ok(())
}

const CAPTURE_FILES: &[&str] = &["formats.txt", "vmlinux.btf.gz", "kernel.txt"];

/// target/vmtest/<release>/out, emptied: the guest's only writable share.
fn fresh_out_dir(kernel: &Kernel) -> anyhow::Result<PathBuf> {
    let out = kernel.dir.join("out");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    Ok(out)
}

/// Builds the initramfs, boots QEMU, echoes and logs its console, and reads the markers.
fn boot(
    vm: &Vm,
    kernel: &Kernel,
    xtask: &Path,
    plan: &Path,
    out: &Path,
) -> anyhow::Result<Console> {
    let initramfs = kernel.dir.join("initramfs.cpio");
    write_initramfs(kernel, xtask, plan, out, &initramfs)?;
    let log_path = kernel.dir.join("console.log");
    let mut log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;

    let mut cmd = qemu_command(vm, kernel, &initramfs, out)?;
    let shown = format!("{cmd:?}");
    eprintln!("vmtest: booting {} ({})", kernel.release, vm.accel);
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {shown}: is qemu-system-x86 installed?"))?;
    let stdout = child.stdout.take().context("stdout is piped")?;
    let (reader, rx) = console_lines(stdout);

    let mut console = Console::default();
    let deadline = started + vm.timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                println!("{line}");
                let _ = writeln!(log, "{line}");
                read_marker(&line, started.elapsed(), &mut console);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                console.timed_out = true;
                eprintln!(
                    "vmtest: {} still running after {} min: killing QEMU",
                    kernel.release,
                    vm.timeout.as_secs() / 60
                );
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait().context("waiting for QEMU")?;
    let _ = reader.join();
    console.elapsed = started.elapsed();
    if !status.success() && !console.timed_out {
        eprintln!("vmtest: QEMU exited with {status}");
    }
    Ok(console)
}

/// QEMU for `kernel` and its initramfs: the host's root read-only and `out` writable over
/// 9p, the console on stdout; killed when this process dies.
fn qemu_command(vm: &Vm, kernel: &Kernel, initramfs: &Path, out: &Path) -> anyhow::Result<Command> {
    let mut cmd = Command::new("qemu-system-x86_64");
    let cpu = match vm.accel.split(',').next() {
        Some("tcg") => CPU_TCG,
        Some("kvm") => "host",
        _ => bail!("unknown --accel {}: use tcg or kvm", vm.accel),
    };
    cmd.args([
        "-accel",
        &vm.accel,
        "-cpu",
        vm.cpu.as_deref().unwrap_or(cpu),
    ]);
    cmd.args(["-smp", GUEST_CPUS, "-m", GUEST_MEMORY])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-no-reboot", "-serial", "stdio"])
        .arg("-kernel")
        .arg(kernel.vmlinuz())
        .arg("-initrd")
        .arg(initramfs)
        // mitigations=off: they cost an emulated guest time and protect nothing in a throwaway
        // VM. tsc=reliable: otherwise the emulated TSCs are found unsynchronised and every
        // clock read (bpf_ktime_get_ns too) goes to the emulated HPET.
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet mitigations=off tsc=reliable rdinit=/init",
        ])
        .args([
            "-fsdev",
            "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-fsdev",
        ])
        .arg(format!(
            "local,id=out,path={},security_model=none,multidevs=remap",
            out.display()
        ))
        .args(["-device", "virtio-9p-pci,fsdev=out,mount_tag=vmtestout"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl, which
    // is async-signal-safe. QEMU is killed when this process dies, however it dies.
    unsafe {
        use std::os::unix::process::CommandExt as _;
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// QEMU's console, a line at a time, on a thread of its own.
fn console_lines(
    stdout: std::process::ChildStdout,
) -> (std::thread::JoinHandle<()>, mpsc::Receiver<String>) {
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        // Bytes, not UTF-8 lines: a test may print anything.
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line)
                        .trim_end_matches(['\r', '\n'])
                        .to_string();
                    if tx.send(text).is_err() {
                        break;
                    }
                }
            }
        }
    });
    (reader, rx)
}

fn read_marker(line: &str, at: Duration, console: &mut Console) {
    // The console may put kernel messages in front of a marker on the same line.
    let Some(i) = line.find("VMTEST-") else {
        return;
    };
    let marker = &line[i..];
    let mut words = marker.split_whitespace();
    match words.next() {
        Some("VMTEST-BOOTED") => console.booted = Some(at),
        Some("VMTEST-READY") => console.ready = Some(at),
        Some("VMTEST-RESULT") => {
            console.rc = words
                .next()
                .and_then(|w| w.strip_prefix("rc="))
                .and_then(|n| n.parse().ok());
        }
        Some("VMTEST-TEST") => {
            if let (Some(status), Some(seconds), Some(name)) =
                (words.next(), words.next(), words.next())
            {
                console
                    .tests
                    .push((status.into(), seconds.into(), name.into()));
            }
        }
        _ => {}
    }
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The guest's /init: loads the 9p and overlay modules, mounts the host's root read-only under
/// a tmpfs overlay, mounts what a node has (proc, sysfs, devtmpfs, devpts, tracefs, bpffs, pure
/// cgroup v2), puts the Debian kernel's modules at /lib/modules, and switches into that root
/// to run this xtask's guest side on `plan`. It prints `VMTEST-RESULT rc=N` and powers off.
// Long: one shell script template, in the order the guest runs it.
fn init_script(kernel: &Kernel, xtask: &Path, plan: &Path, out: &Path) -> String {
    let q = |p: &Path| sh_quote(&p.display().to_string());
    let run = format!(
        "{xtask} vmtest --guest {plan}; rc=$?; echo \"VMTEST-RESULT rc=$rc\"; sync; \
         echo o > /proc/sysrq-trigger; while :; do :; done",
        xtask = q(xtask),
        plan = q(plan),
    );
    format!(
        r#"#!/bin/busybox sh
# Generated by xtask/src/vmtest.rs for {release}.
/bin/busybox --install -s /bin
export PATH=/bin
fail() {{
    echo "vmtest: $*"
    echo "VMTEST-RESULT rc=125"
    poweroff -f
    sleep 60
}}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "VMTEST-BOOTED uptime=$(cut -d' ' -f1 /proc/uptime)"
for m in /modules/*.ko; do
    insmod "$m" || fail "insmod $m failed"
done
mkdir -p /lower /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize={msize} hostroot /lower \
    || fail "cannot mount the host's root (9p tag hostroot)"
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || fail "cannot mount the overlay on the host's root"
R=/newroot
# The workspace may sit under /tmp, /var/tmp or /run (a clone made there, as CI's may be),
# which get tmpfs of their own below: its view through the overlay is kept aside and put back.
W={workspace}
case "$W/" in
    /tmp/*|/var/tmp/*|/run/*) mkdir -p /ws && mount --bind "$R$W" /ws || fail "cannot keep $W" ;;
esac
mount -t tmpfs -o mode=1777 tmpfs $R/tmp
mount -t tmpfs -o mode=1777 tmpfs $R/var/tmp
mount -t tmpfs -o mode=0755 tmpfs $R/run
case "$W/" in
    /tmp/*|/var/tmp/*|/run/*) mkdir -p "$R$W" && mount --bind /ws "$R$W" || fail "cannot put $W back" ;;
esac
mount -t 9p -o trans=virtio,version=9p2000.L,msize={msize} vmtestout /newroot{out} \
    || fail "cannot mount the results share (9p tag vmtestout) on {out}"
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
ln -sf /proc/self/fd $R/dev/fd
ln -sf /proc/self/fd/0 $R/dev/stdin
ln -sf /proc/self/fd/1 $R/dev/stdout
ln -sf /proc/self/fd/2 $R/dev/stderr
mount -t tracefs tracefs $R/sys/kernel/tracing || fail "cannot mount tracefs"
mount -t debugfs debugfs $R/sys/kernel/debug || true
mount -t bpf bpf $R/sys/fs/bpf || fail "cannot mount bpffs"
mount -t cgroup2 -o nsdelegate cgroup2 $R/sys/fs/cgroup || fail "cannot mount cgroup2"
for c in $(cat $R/sys/fs/cgroup/cgroup.controllers); do
    echo "+$c" > $R/sys/fs/cgroup/cgroup.subtree_control || true
done
# Device nodes whose opening loads their module (/dev/loop-control, /dev/net/tun, ...), as
# systemd's kmod-static-nodes makes them.
grep -v '^#' $R{modules}/modules.devname | while read module node dev; do
    mkdir -p "$(dirname "$R/dev/$node")"
    type=${{dev%%[0-9]*}}; numbers=${{dev#?}}
    [ -e "$R/dev/$node" ] || mknod -m 0600 "$R/dev/$node" "$type" "${{numbers%:*}}" "${{numbers#*:}}"
done
mkdir -p $R/lib/modules/{release}
mount --bind $R{modules} $R/lib/modules/{release} || fail "cannot bind the kernel's modules"
hostname vmtest
ip link set lo up || fail "cannot bring lo up"
echo "VMTEST-READY uptime=$(cut -d' ' -f1 /proc/uptime)"
exec switch_root /newroot /usr/bin/env -i \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    LANG=C.UTF-8 TERM=dumb /bin/sh -c {run}
"#,
        release = kernel.release,
        msize = MSIZE,
        out = out.display(),
        workspace = sh_quote(&crate::cmd::workspace_root().display().to_string()),
        modules = kernel.modules().display(),
        run = sh_quote(&run),
    )
}

/// Modules to insmod in order (dependencies first), from modules.dep; built-in ones are skipped.
fn initramfs_modules(kernel: &Kernel) -> anyhow::Result<Vec<PathBuf>> {
    let dir = kernel.modules();
    let dep = std::fs::read_to_string(dir.join("modules.dep"))?;
    let builtin = std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
    let name_of = |path: &str| {
        let file = path.rsplit('/').next().unwrap_or(path);
        file.split(".ko").next().unwrap_or(file).replace('-', "_")
    };
    let deps: BTreeMap<String, (String, Vec<String>)> = dep
        .lines()
        .filter_map(|l| {
            let (module, deps) = l.split_once(':')?;
            Some((
                name_of(module),
                (
                    module.to_string(),
                    deps.split_whitespace().map(str::to_string).collect(),
                ),
            ))
        })
        .collect();
    let mut order: Vec<String> = Vec::new();
    for want in INITRAMFS_MODULES {
        let Some((path, needs)) = deps.get(*want) else {
            if builtin.lines().any(|l| name_of(l) == *want) {
                continue;
            }
            bail!(
                "{} has neither a module nor a built-in {want}: the guest cannot mount the host's \
                 root (is this the standard flavour? the cloud one has no 9p)",
                kernel.package
            );
        };
        // modules.dep lists what a module needs with the first-loaded last.
        for p in needs.iter().rev().chain([path]) {
            if !order.contains(p) {
                order.push(p.clone());
            }
        }
    }
    Ok(order.into_iter().map(|p| dir.join(p)).collect())
}

/// A module's bytes, decompressed (busybox's insmod takes plain ELF).
fn module_bytes(path: &Path) -> anyhow::Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return std::fs::read(path).with_context(|| format!("cannot read {name}"));
    };
    let out = Command::new(tool)
        .args(["-dc"])
        .arg(path)
        .output()
        .with_context(|| format!("cannot run {tool} (to decompress {name})"))?;
    if !out.status.success() {
        bail!(
            "{tool} -dc {name} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

fn write_initramfs(
    kernel: &Kernel,
    xtask: &Path,
    plan: &Path,
    out: &Path,
    to: &Path,
) -> anyhow::Result<()> {
    const DIR: u32 = 0o040_755;
    const EXE: u32 = 0o100_755;
    let busybox = Path::new("/bin/busybox");
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "modules", "newroot"] {
        cpio.entry(dir, DIR, &[], 0);
    }
    // The kernel opens /dev/console for /init before anything is mounted.
    cpio.entry("dev/console", 0o020_600, &[], (5 << 8) | 1);
    let busybox_bytes =
        std::fs::read(busybox).context("no /bin/busybox: install busybox-static")?;
    cpio.entry("bin/busybox", EXE, &busybox_bytes, 0);
    cpio.entry(
        "init",
        EXE,
        init_script(kernel, xtask, plan, out).as_bytes(),
        0,
    );
    for (i, module) in initramfs_modules(kernel)?.iter().enumerate() {
        let stem = module
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split(".ko").next())
            .unwrap_or("module");
        cpio.entry(
            &format!("modules/{i:02}-{stem}.ko"),
            0o100_644,
            &module_bytes(module)?,
            0,
        );
    }
    // Uncompressed: decompressing in the emulated guest costs more than reading it.
    std::fs::write(to, cpio.finish()).with_context(|| format!("cannot write {}", to.display()))
}

/// A cpio archive in the "newc" format the kernel unpacks as its initramfs.
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    inode: u32,
}

impl Cpio {
    /// `rdev` is major << 8 | minor (for device nodes).
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: u32) {
        self.inode += 1;
        let fields = [
            self.inode,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev >> 8,
            rdev & 0xff,
            name.len() as u32 + 1,
            0,
        ];
        self.bytes.extend_from_slice(b"070701");
        for f in fields {
            self.bytes.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], 0);
        self.bytes
    }
}

/// Copies the running kernel's tracepoint formats (CAPTURE_CATEGORIES whole, CAPTURE_SYSCALLS'
/// entry and exit), its BTF (gzip) and its name into `dir`. With `load_modules`, modprobes the
/// categories that are modules first (in a guest; never on the host).
fn capture_running_kernel(
    dir: &Path,
    package: Option<(&str, &str)>,
    load_modules: bool,
) -> anyhow::Result<()> {
    let events = [
        "/sys/kernel/tracing/events",
        "/sys/kernel/debug/tracing/events",
    ]
    .into_iter()
    .map(Path::new)
    .find(|p| p.is_dir())
    .context(
        "no tracefs: mount it (`mount -t tracefs tracefs /sys/kernel/tracing`) and try again",
    )?;
    let mut formats = String::new();
    let mut add = |category: &str, event: &str| -> anyhow::Result<()> {
        let path = events.join(category).join(event).join("format");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        writeln!(formats, "== {category}/{event}")?;
        formats.push_str(&text);
        if !text.ends_with('\n') {
            formats.push('\n');
        }
        Ok(())
    };
    for (category, module) in CAPTURE_CATEGORIES {
        let path = events.join(category);
        if !path.is_dir()
            && let (Some(module), true) = (module, load_modules)
        {
            run(Command::new("modprobe").arg(module))?;
        }
        let mut names: Vec<String> = std::fs::read_dir(&path)
            .with_context(|| {
                format!(
                    "the running kernel has no {category} tracepoints ({} is missing{})",
                    path.display(),
                    module.map_or(String::new(), |m| format!(": is the {m} module loaded?"))
                )
            })?
            .filter_map(Result::ok)
            .filter(|e| e.path().join("format").is_file())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        for name in names {
            add(category, &name)?;
        }
    }
    for call in CAPTURE_SYSCALLS {
        for side in ["sys_enter_", "sys_exit_"] {
            add("syscalls", &format!("{side}{call}"))?;
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join("formats.txt"), formats)?;

    let btf_path = dir.join("vmlinux.btf.gz");
    let btf = std::fs::File::create(&btf_path)
        .with_context(|| format!("cannot create {}", btf_path.display()))?;
    run(Command::new("gzip")
        .args(["-9", "-n", "-c", "/sys/kernel/btf/vmlinux"])
        .stdout(btf))
    .context("the running kernel's BTF (/sys/kernel/btf/vmlinux; CONFIG_DEBUG_INFO_BTF)")?;

    let mut kernel = format!("uname -r: {}\n", uname_r()?);
    let version = std::fs::read_to_string("/proc/sys/kernel/version").unwrap_or_default();
    writeln!(kernel, "uname -v: {}", version.trim())?;
    match package {
        Some((name, version)) => writeln!(kernel, "package: {name} {version}")?,
        None => writeln!(kernel, "package: none (not a distribution package)")?,
    }
    std::fs::write(dir.join("kernel.txt"), kernel)?;
    Ok(())
}

/// The guest side: carries out a plan the host wrote. Runs as root in the guest, on the host's
/// root file system under a tmpfs overlay; prints markers the host reads off the console.
fn guest(plan: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(plan)
        .with_context(|| format!("cannot read the plan {}", plan.display()))?;
    let mut env = Vec::new();
    let mut package = None;
    let mut tests = Vec::new();
    let mut timeout = Duration::from_secs(600);
    let mut out = None;
    for line in text.lines() {
        let Some((word, rest)) = line.split_once(' ') else {
            continue;
        };
        match word {
            "env" => {
                let (k, v) = rest.split_once('=').context("env KEY=VALUE")?;
                env.push((k.to_string(), v.to_string()));
            }
            "out" => out = Some(PathBuf::from(rest)),
            "timeout" => timeout = Duration::from_secs(rest.parse()?),
            "package" => package = rest.split_once(' '),
            "capture" => {
                capture_running_kernel(Path::new(rest), package, true)?;
                println!("vmtest: captured {}", uname_r()?);
            }
            "exec" => {
                let status = Command::new("/bin/sh")
                    .args(["-c", rest])
                    .status()
                    .context("cannot run /bin/sh")?;
                if !status.success() {
                    bail!("`{rest}` failed: {status}");
                }
            }
            "test" => {
                let (bin, name) = rest.split_once(' ').context("test BINARY NAME")?;
                tests.push((PathBuf::from(bin), name.to_string()));
            }
            _ => bail!("unknown plan line {line:?}"),
        }
    }
    if tests.is_empty() {
        return Ok(());
    }
    let mut results = String::new();
    let mut failed = 0;
    for (bin, name) in &tests {
        let started = Instant::now();
        let status = guest_test(bin, name, &env, timeout)?;
        let seconds = format!("{:.1}", started.elapsed().as_secs_f64());
        let label = format!(
            "{}::{name}",
            bin.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .trim_start_matches("test-")
        );
        if status != "passed" {
            failed += 1;
        }
        println!("VMTEST-TEST {status} {seconds} {label}");
        writeln!(results, "{status} {seconds} {label}")?;
    }
    if let Some(out) = out {
        let path = out.join("results.txt");
        std::fs::write(&path, results)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if failed > 0 {
        bail!("{failed} of {} tests failed", tests.len());
    }
    Ok(())
}

/// Runs one test alone (`--exact`), echoing its output; "passed", "failed", "timeout",
/// "ignored" or "missing" (the binary has no such test). Only "passed" passes.
fn guest_test(
    bin: &Path,
    name: &str,
    env: &[(String, String)],
    timeout: Duration,
) -> anyhow::Result<&'static str> {
    use std::os::unix::process::CommandExt as _;
    println!("vmtest: running {name}");
    let mut child = Command::new(bin)
        .args([name, "--exact", "--test-threads=1"])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // Its own process group, so a timeout takes the agent and brokers it started too.
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let mut stdout = child.stdout.take().context("stdout is piped")?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            let _ = std::io::stdout().write_all(&buf[..n]);
            let _ = std::io::stdout().flush();
        }
        let _ = tx.send(all);
    });
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            println!("vmtest: {name} still running after {timeout:?}: killing it");
            // SAFETY: kill has no memory preconditions; the group is the test's own.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Whatever the test left running in its group (it is done or killed).
    // SAFETY: as above.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let output = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
    let _ = reader.join();
    let text = String::from_utf8_lossy(&output);
    Ok(if timed_out {
        "timeout"
    } else if text.contains("test result: ok. 0 passed; 0 failed; 1 ignored") {
        "ignored"
    } else if text.contains("test result: ok. 0 passed") {
        "missing"
    } else if status.success() && text.contains("test result: ok. 1 passed") {
        "passed"
    } else {
        "failed"
    })
}
