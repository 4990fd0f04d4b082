//! Builds the kernel programs (agent-ebpf) for the BPF target with the nightly toolchain and
//! bpf-linker, so `include_bytes_aligned!` in the loader can embed the object.
//!
//! Under `cargo fuzz` (`--cfg fuzzing` in the target's flags, seen here as `CARGO_CFG_FUZZING`)
//! the kernel object is not built: the nested nightly BPF build would run under the fuzzer's
//! sanitizer and coverage flags, and no fuzz target loads programs. An empty object stands in,
//! so the loader compiles unchanged (loading it would fail: nothing under fuzzing does).

fn main() -> anyhow::Result<()> {
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
