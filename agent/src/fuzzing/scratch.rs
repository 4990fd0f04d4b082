//! What the targets share: scratch files for targets that go through a file, and splitting
//! input into lines. Below every target.

/// A scratch directory of this process for targets that must go through a file (the config
/// file, a fake /proc tree): one per target, so replaying targets in parallel tests is safe.
pub(super) fn scratch(target: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("brokerscope-fuzz-{}-{target}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("cannot create {}: {e}", dir.display());
    }
    dir
}

/// Writes a scratch file; a failure is the machine's, not the input's: panic loudly.
pub(super) fn write(path: &std::path::Path, bytes: &[u8]) {
    if let Err(e) = std::fs::write(path, bytes) {
        panic!("cannot write {}: {e}", path.display());
    }
}

/// Splits off the first `\n`-terminated line (the rest is empty when there is none).
pub(super) fn first_line(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}
