//! Builds the kernel programs (agent-ebpf) for the BPF target with the nightly toolchain and
//! bpf-linker, so `include_bytes_aligned!` in the loader can embed the object.
//!
//! Under `cargo fuzz` (`--cfg fuzzing` in the target's flags, seen here as `CARGO_CFG_FUZZING`)
//! the kernel object is not built: the nested nightly BPF build would run under the fuzzer's
//! sanitizer and coverage flags, and no fuzz target loads programs. An empty object stands in,
//! so the loader compiles unchanged (loading it would fail: nothing under fuzzing does).
//!
//! It also sets `BROKERSCOPE_GIT_REV` for `brokerscope --version`: the variable itself when the
//! build environment sets it (a release or a package built outside git), else the commit git
//! reports, else `unknown`.

fn main() -> anyhow::Result<()> {
    git_revision();
    println!("cargo::rerun-if-env-changed=CARGO_CFG_FUZZING");
    if std::env::var_os("CARGO_CFG_FUZZING").is_some() {
        let out = std::path::PathBuf::from(
            std::env::var_os("OUT_DIR").ok_or_else(|| anyhow::anyhow!("OUT_DIR is not set"))?,
        );
        std::fs::write(out.join("brokerscope-ebpf"), [])?;
        return Ok(());
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {root:?}"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "brokerscope-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

/// Sets `BROKERSCOPE_GIT_REV` and asks cargo to run again when HEAD moves.
fn git_revision() {
    println!("cargo::rerun-if-env-changed=BROKERSCOPE_GIT_REV");
    if let Ok(rev) = std::env::var("BROKERSCOPE_GIT_REV") {
        println!("cargo::rustc-env=BROKERSCOPE_GIT_REV={rev}");
        return;
    }
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let rev = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo::rustc-env=BROKERSCOPE_GIT_REV={rev}");
    // HEAD names the branch; the branch's ref (loose or packed) names the commit. A worktree
    // has a HEAD of its own and shares the refs.
    for (dir_arg, file) in [
        ("--git-dir", "HEAD".to_string()),
        ("--git-common-dir", "packed-refs".to_string()),
    ] {
        if let Some(dir) = git(&["rev-parse", dir_arg]) {
            watch(&abs(&dir).join(file));
        }
    }
    if let (Some(dir), Some(branch)) = (
        git(&["rev-parse", "--git-common-dir"]),
        git(&["symbolic-ref", "-q", "HEAD"]),
    ) {
        watch(&abs(&dir).join(branch));
    }
}

/// git prints paths relative to the directory it ran in.
fn abs(dir: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir)
}

/// A file cargo watches; one that does not exist would make every build run this script again.
fn watch(path: &std::path::Path) {
    if path.exists() {
        println!("cargo::rerun-if-changed={}", path.display());
    }
}
