//! Rebuild when bpf-linker changes, and say how to get it when it is missing.

fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!(
            "cargo:warning=bpf-linker is not on PATH: run `cargo xtask setup` to build it \
             against the nightly toolchain's LLVM"
        ),
    }
}
