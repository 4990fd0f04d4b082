//! `cargo xtask setup`: everything a fresh machine of this kind lacks, installed by the project.
//!
//! Each step checks first and does nothing when already satisfied, so `run` and `test` call it
//! every time.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::cmd::run;

/// bpf-linker release known to build with nightly's LLVM here (docs/kernels.md).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the end-to-end tests and `xtask run` use.
/// `prometheus` brings both the server (scraped-by-Prometheus test) and `promtool` (format lint).
const TEST_PACKAGES: &[&str] = &[
    "bpftool",
    "iproute2",
    "curl",
    "openssl",
    "ca-certificates",
    "prometheus",
    // mkfs.ext4, mkfs.xfs, mkfs.btrfs: the fsync tests make their own filesystems on loop
    // devices.
    "e2fsprogs",
    "xfsprogs",
    "btrfs-progs",
    // The image test runs the agent's OCI image the way the DaemonSet runs it (runc), checks
    // that skopeo and buildah take the archive; `cargo xtask image` strips the binary with
    // objcopy.
    "runc",
    "skopeo",
    "buildah",
    "binutils",
    // The `brokerscope top` test drives the terminal view in a real terminal (tmux send-keys,
    // capture-pane, resize-window).
    "tmux",
    // The operator's client in the state and pods tests: tests/java/BrokerStateClient.java,
    // run as a source file (the launcher needs the JDK's compiler).
    "openjdk-17-jdk-headless",
];

/// PyPI packages the manifest test validates with, pinned, in a virtualenv of their own
/// ([`VALIDATOR_VENV`]): kubernetes-validate's strict schemas for the built-in kinds, and models
/// generated from cert-manager's and the Prometheus Operator's CRDs for theirs
/// (tests/deploy/validate.py). The newest cloudcoil models need Python 3.12; these are the
/// newest that install on this machine's 3.11.
const VALIDATOR_PACKAGES: &[(&str, &str)] = &[
    ("kubernetes-validate", "1.37.0"),
    ("cloudcoil-models-cert-manager", "1.17.1.0"),
    ("cloudcoil-models-prometheus-operator", "0.80.1.0"),
];

/// Where [`VALIDATOR_PACKAGES`] live, under $HOME (the tests find its interpreter there too).
pub const VALIDATOR_VENV: &str = ".local/share/brokerscope/venv";

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    Run,
    Test,
    /// The tests' packages, plus node_exporter and oha for the scrape comparison and bpftrace
    /// for the empty-program floor.
    Bench,
    /// The tests' packages (the guest runs the host's own tools over 9p), plus QEMU, a static
    /// busybox for the guest's initramfs and kmod's depmod for the extracted kernels' modules.
    /// The host kernel's facilities are not needed: the tests run in the guest's.
    Vmtest,
    /// cargo-fuzz on nightly and a C++ compiler (`cargo xtask fuzz`); no kernel facility.
    Fuzz,
}

/// Debian packages `cargo xtask vmtest` adds: QEMU (TCG is enough), busybox for the
/// initramfs's /init, depmod, and xz/zstd to unpack compressed modules for busybox's insmod.
const VMTEST_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    "xz-utils",
    "zstd",
];

/// oha release that builds with this toolchain (a load tool that presents client certificates),
/// installed with its own lock file: unlocked, `^1` resolved easy-cast 0.5.5, which needs rustc
/// 1.96.
const OHA_VERSION: &str = "1.16.0";

/// cargo-modules release `cargo xtask layers` draws the module graphs with: 0.28 needs rustc
/// 1.98, newer than this workspace's toolchain.
const CARGO_MODULES_VERSION: &str = "0.27.0";

/// cargo-fuzz release the fuzz targets are built with (`cargo xtask fuzz`, docs/fuzzing.md).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Debian packages the fuzz build adds: libfuzzer-sys compiles libFuzzer's C++ sources.
const FUZZ_PACKAGES: &[&str] = &["g++"];

pub fn ensure(needs: Needs) -> anyhow::Result<()> {
    if needs == Needs::Fuzz {
        // The fuzz build skips the kernel object (agent/build.rs) and loads nothing: neither
        // bpf-linker nor the kernel's facilities are needed.
        debian_packages(FUZZ_PACKAGES)?;
        return cargo_fuzz();
    }
    rust_src()?;
    bpf_linker()?;
    if needs != Needs::Run {
        debian_packages(TEST_PACKAGES)?;
    }
    if needs == Needs::Test {
        // `cargo xtask test` starts with the module-cycle check.
        cargo_modules()?;
        // `cargo xtask test` ends with the fuzz targets.
        debian_packages(FUZZ_PACKAGES)?;
        cargo_fuzz()?;
        // The manifests' offline checks (tests/tests/deploy.rs).
        kubectl()?;
        validators()?;
    }
    if needs == Needs::Bench {
        debian_packages(&["prometheus-node-exporter", "bpftrace"])?;
        if !has_version("oha", OHA_VERSION) {
            eprintln!("setup: installing oha {OHA_VERSION} (load generator with mTLS)");
            cargo_install(None, "oha", OHA_VERSION)?;
        }
    }
    if needs == Needs::Vmtest {
        debian_packages(VMTEST_PACKAGES)?;
    } else {
        kernel()?;
    }
    Ok(())
}

/// [`crate::output`], trimmed.
fn output(cmd: &mut Command) -> anyhow::Result<String> {
    crate::cmd::output(cmd).map(|s| s.trim().to_string())
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .map(PathBuf::from)
        .context(
            "the `nightly` toolchain is needed for the eBPF programs (-Z build-std=core); \
             install it with `rustup toolchain install nightly`",
        )
}

fn rust_src() -> anyhow::Result<()> {
    let sysroot = nightly_sysroot()?;
    if sysroot
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .exists()
    {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into())
}

fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cargo"))
        .join("bin")
}

/// bpf-linker must link against the same LLVM as the nightly rustc that emits the bitcode. The
/// nightly toolchain ships it as lib/libLLVM.so.<ver>-rust-<rustc>-nightly; bpf-linker's build
/// wants an LLVM prefix with lib/libLLVM.so, so a stable prefix of symlinks stands in for one.
fn bpf_linker() -> anyhow::Result<()> {
    let bin = cargo_bin_dir().join("bpf-linker");
    if let Ok(version) = output(Command::new(&bin).arg("--version")) {
        if version.contains(BPF_LINKER_VERSION) {
            return Ok(());
        }
        eprintln!("setup: found {version}, want bpf-linker {BPF_LINKER_VERSION}; rebuilding");
    }
    let sysroot = nightly_sysroot()?;
    let lib_dir = sysroot.join("lib");
    let libllvm = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("cannot list {}", lib_dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}: is nightly complete?",
                lib_dir.display()
            )
        })?;
    let file_name = libllvm
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    // libLLVM.so.22.1-rust-1.97.0-nightly -> major 22
    let major = file_name
        .trim_start_matches("libLLVM.so.")
        .split(['.', '-'])
        .next()
        .filter(|m| m.chars().all(|c| c.is_ascii_digit()) && !m.is_empty())
        .with_context(|| format!("cannot read the LLVM version from {file_name}"))?
        .to_string();

    let prefix = home().join(".local/share/brokerscope/llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("cannot create {}", prefix_lib.display()))?;
    for link in ["libLLVM.so".to_string(), file_name.clone()] {
        let path = prefix_lib.join(&link);
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(&libllvm, &path)
            .with_context(|| format!("cannot link {} -> {}", path.display(), libllvm.display()))?;
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {} (LLVM {major}); about a minute",
        libllvm.display()
    );
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix))
}

/// cargo-modules at [`CARGO_MODULES_VERSION`] (`cargo xtask layers`), installed when missing or
/// another version.
pub fn cargo_modules() -> anyhow::Result<()> {
    if has_version("cargo-modules", CARGO_MODULES_VERSION) {
        return Ok(());
    }
    eprintln!("setup: installing cargo-modules {CARGO_MODULES_VERSION} (the module-cycle check)");
    cargo_install(None, "cargo-modules", CARGO_MODULES_VERSION)
}

/// cargo-fuzz, built by nightly (the fuzz targets need nightly's sanitizer flags anyway).
fn cargo_fuzz() -> anyhow::Result<()> {
    if has_version("cargo-fuzz", CARGO_FUZZ_VERSION) {
        return Ok(());
    }
    nightly_sysroot()?;
    eprintln!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION} (the fuzz targets' runner)");
    cargo_install(Some("+nightly"), "cargo-fuzz", CARGO_FUZZ_VERSION)
}

/// Whether cargo's bin directory holds `tool` at `version` (the last word of its `--version`);
/// says so when it holds another.
fn has_version(tool: &str, version: &str) -> bool {
    let Ok(found) = output(Command::new(cargo_bin_dir().join(tool)).arg("--version")) else {
        return false;
    };
    if found.split_whitespace().last() == Some(version) {
        return true;
    }
    eprintln!(
        "setup: found {}, want {tool} {version}; reinstalling",
        found.trim()
    );
    false
}

/// `cargo install` of `krate` at exactly `version` with its own lock file (unlocked, a newer
/// dependency can need a newer rustc than this workspace's), on `toolchain` if given.
fn cargo_install(toolchain: Option<&str>, krate: &str, version: &str) -> anyhow::Result<()> {
    run(Command::new("cargo").args(toolchain).args([
        "install",
        krate,
        "--locked",
        "--version",
        version,
    ]))
}

fn debian_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                // "install ok installed"; a package dpkg knows of but has not installed (one
                // another package only recommends) reads "unknown ok not-installed".
                .map(|s| s.split_whitespace().last() != Some("installed"))
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !crate::cmd::is_root() {
        bail!(
            "missing Debian packages {missing:?}: install them with `sudo apt-get install {}`",
            missing.join(" ")
        );
    }
    eprintln!("setup: installing Debian packages {missing:?}");
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The image's tools: `objcopy` strips the binary, `ldd` names what it loads.
pub fn image_tools() -> anyhow::Result<()> {
    debian_packages(&["binutils", "libc-bin"])
}

/// kubectl with kustomize v5 (`kubectl kustomize` renders the overlays). Machines of this kind
/// ship it at /usr/bin/kubectl; Debian's kubernetes-client is too old for kustomize v5.
fn kubectl() -> anyhow::Result<()> {
    let version = output(Command::new("kubectl").args(["version", "--client"])).context(
        "kubectl is needed to render deploy/ (`kubectl kustomize`); install kubectl 1.27 or later",
    )?;
    let kustomize_major = version
        .lines()
        .find_map(|l| l.strip_prefix("Kustomize Version: v"))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    match kustomize_major {
        Some(m) if m >= 5 => Ok(()),
        _ => bail!(
            "kubectl with kustomize v5 or later is needed to render deploy/; found:\n{version}"
        ),
    }
}

/// The manifest validators ([`VALIDATOR_PACKAGES`]) in [`VALIDATOR_VENV`], at their pinned
/// versions.
fn validators() -> anyhow::Result<()> {
    let venv = home().join(VALIDATOR_VENV);
    let python = venv.join("bin/python");
    let wanted: Vec<String> = VALIDATOR_PACKAGES
        .iter()
        .map(|(name, version)| format!("{name}=={version}"))
        .collect();
    let check = format!(
        "import importlib.metadata as m; print(' '.join(n + '==' + m.version(n) for n in {:?}))",
        VALIDATOR_PACKAGES
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
    );
    if output(Command::new(&python).args(["-c", &check])).is_ok_and(|have| have == wanted.join(" "))
    {
        return Ok(());
    }
    if !python.exists() {
        if output(Command::new("python3").args(["-m", "venv", "--help"])).is_err() {
            debian_packages(&["python3-venv"])?;
        }
        eprintln!("setup: creating {}", venv.display());
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    eprintln!(
        "setup: installing {wanted:?} from PyPI into {}",
        venv.display()
    );
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(&wanted))
}

fn kernel() -> anyhow::Result<()> {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!(
            "kernel BTF (/sys/kernel/btf/vmlinux) is missing: brokerscope needs CONFIG_DEBUG_INFO_BTF=y"
        );
    }
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("cannot read mountinfo")?;
    let has = |fstype: &str| {
        mountinfo
            .lines()
            .filter_map(|l| l.split_once(" - "))
            .any(|(_, right)| right.split(' ').next() == Some(fstype))
    };
    for (fstype, target) in [("tracefs", "/sys/kernel/tracing"), ("bpf", "/sys/fs/bpf")] {
        if has(fstype) {
            continue;
        }
        if !crate::cmd::is_root() {
            bail!("{fstype} is not mounted: `sudo mount -t {fstype} {fstype} {target}`");
        }
        eprintln!("setup: mounting {fstype} at {target}");
        run(Command::new("mount").args(["-t", fstype, fstype, target]))?;
    }
    if !has("cgroup2") {
        bail!(
            "no cgroup v2 mount in /proc/self/mountinfo: mount one (`mount -t cgroup2 none /sys/fs/cgroup/unified`)"
        );
    }
    Ok(())
}
