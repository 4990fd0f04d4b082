//! `cargo xtask image`: the agent's OCI image, written as an OCI archive (a tar of an OCI image
//! layout) that `skopeo copy oci-archive:…`, `buildah pull oci-archive:…` and `docker load` take.
//!
//! One layer, built here from scratch: the release binary (debug info stripped) and exactly the
//! shared objects `ldd` names for it, each at the path the dynamic loader looks for it. No shell,
//! no package manager, no other file: a node agent with CAP_SYS_ADMIN should carry nothing an
//! intruder could use. The layer is reproducible: entries sorted, owner root, every time stamp
//! the commit's (or `SOURCE_DATE_EPOCH`), gzip without a name or time.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use serde_json::json;
use sha2::{Digest as _, Sha256};

/// Where `cargo xtask image` writes the archive, relative to the workspace.
pub const ARCHIVE: &str = "target/image/brokerscope.oci.tar";

/// Where the binary lives in the image (the DaemonSet's `command`).
const BIN_IN_IMAGE: &str = "usr/local/bin/brokerscope";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write the OCI archive (default: target/image/brokerscope.oci.tar).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn main(root: &Path, args: Args) -> anyhow::Result<()> {
    crate::setup::ensure(crate::setup::Needs::Run)?;
    crate::setup::image_tools()?;
    let bin = crate::cmd::build_agent(root, true)?;
    let out = args.out.unwrap_or_else(|| root.join(ARCHIVE));
    let image = build(root, &bin, &out)?;
    println!(
        "image: {} ({} bytes; layer {} bytes compressed, {} uncompressed)",
        out.display(),
        image.archive_bytes,
        image.layer_bytes,
        image.layer_uncompressed_bytes
    );
    println!("  version {}  revision {}", image.version, image.revision);
    println!("  files: {}", image.files.join(", "));
    println!(
        "push it with: skopeo copy oci-archive:{} docker://REGISTRY/brokerscope:{}",
        out.display(),
        image.version
    );
    Ok(())
}

/// What [`build`] wrote.
pub struct Built {
    pub version: String,
    pub revision: String,
    /// Paths in the image, sorted.
    pub files: Vec<String>,
    pub archive_bytes: u64,
    pub layer_bytes: u64,
    pub layer_uncompressed_bytes: u64,
}

/// Builds the image of `bin` into the OCI archive `out`.
pub fn build(root: &Path, bin: &Path, out: &Path) -> anyhow::Result<Built> {
    let version = env!("CARGO_PKG_VERSION").to_string();
    let revision = revision(root)?;
    let epoch = source_date_epoch(root)?;
    let created = rfc3339(epoch)?;

    let stripped = out.with_extension("bin");
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    crate::cmd::run(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(bin)
            .arg(&stripped),
    )?;

    // Path in the image -> file on this machine.
    let files = image_files(bin, &stripped)?;
    let layer_tar = layer(&files, epoch)?;
    let _ = std::fs::remove_file(&stripped);
    let diff_id = sha256(&layer_tar);
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    gz.write_all(&layer_tar)?;
    let layer_gz = gz.finish()?;

    let (config, manifest, index) =
        oci_documents(&version, &revision, &created, &diff_id, &layer_gz)?;
    let archive = oci_archive(epoch, &index, &manifest, &config, &layer_gz)?;
    let partial = out.with_extension("tar.partial");
    std::fs::write(&partial, &archive)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    std::fs::rename(&partial, out).with_context(|| format!("cannot write {}", out.display()))?;

    Ok(Built {
        version,
        revision,
        files: files.into_iter().map(|(inside, _)| inside).collect(),
        archive_bytes: archive.len() as u64,
        layer_bytes: layer_gz.len() as u64,
        layer_uncompressed_bytes: layer_tar.len() as u64,
    })
}

/// The image's files, sorted: path in the image -> file on this machine. The stripped binary
/// and the shared objects it loads.
fn image_files(bin: &Path, stripped: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut files: Vec<(String, PathBuf)> = vec![(BIN_IN_IMAGE.into(), stripped.to_path_buf())];
    for lib in shared_objects(bin)? {
        let inside = lib
            .to_str()
            .and_then(|p| p.strip_prefix('/'))
            .with_context(|| format!("ldd named a relative or non-UTF-8 path {}", lib.display()))?
            .to_string();
        files.push((inside, lib));
    }
    files.sort();

    Ok(files)
}

/// The OCI image config, manifest and index for the one layer.
fn oci_documents(
    version: &str,
    revision: &str,
    created: &str,
    diff_id: &str,
    layer_gz: &[u8],
) -> anyhow::Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    let labels = json!({
        "org.opencontainers.image.title": "brokerscope",
        "org.opencontainers.image.description": "eBPF node agent for Kafka brokers",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.created": created,
        "org.opencontainers.image.licenses": "Apache-2.0",
    });
    let config = serde_json::to_vec(&json!({
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": "0:0",
            "Entrypoint": [format!("/{BIN_IN_IMAGE}")],
            "Cmd": ["run"],
            "WorkingDir": "/",
            "Labels": labels,
        },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{diff_id}")] },
        "history": [{ "created": created, "created_by": "cargo xtask image" }],
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", layer_gz)],
        "annotations": labels,
    }))?;
    let mut manifest_descriptor =
        descriptor("application/vnd.oci.image.manifest.v1+json", &manifest);
    manifest_descriptor["annotations"] = json!({
        "org.opencontainers.image.ref.name": version,
        // The name `docker load` gives it.
        "io.containerd.image.name": format!("brokerscope:{version}"),
    });
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest_descriptor],
    }))?;

    Ok((config, manifest, index))
}

/// The OCI layout as a tar archive: `oci-layout`, the index, and the blobs by digest.
fn oci_archive(
    epoch: u64,
    index: &[u8],
    manifest: &[u8],
    config: &[u8],
    layer_gz: &[u8],
) -> anyhow::Result<Vec<u8>> {
    let mut archive = tar::Builder::new(Vec::new());
    let mut entry = |path: &str, data: &[u8]| -> anyhow::Result<()> {
        let mut header = header(tar::EntryType::Regular, 0o644, epoch);
        header.set_size(data.len() as u64);
        archive
            .append_data(&mut header, path, data)
            .with_context(|| format!("archiving {path}"))
    };
    entry("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    entry("index.json", index)?;
    for blob in [manifest, config, layer_gz] {
        entry(&format!("blobs/sha256/{}", sha256(blob)), blob)?;
    }
    Ok(archive.into_inner()?)
}

/// The shared objects the dynamic loader maps for `bin`, the loader itself included, as `ldd`
/// prints them (the vDSO has no file and is left out). A static binary has none.
fn shared_objects(bin: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("cannot run ldd (Debian's libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_ldd(&text)
}

fn parse_ldd(text: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)`, `/lib64/ld-linux-x86-64.so.2
        // (0x…)`, `linux-vdso.so.1 (0x…)`.
        let path = match line.split_once(" => ") {
            Some((name, rest)) => {
                let path = rest.split(" (").next().unwrap_or_default().trim();
                if path == "not found" || path.is_empty() {
                    bail!("ldd: {name} not found on this machine");
                }
                path
            }
            None => line.split(" (").next().unwrap_or_default().trim(),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        } else if !path.starts_with("linux-vdso") && !path.starts_with("linux-gate") {
            bail!("ldd printed a line this does not understand: {line}");
        }
    }
    Ok(libs)
}

/// The layer: every directory on the way to each file, then the files (symlinks followed: the
/// loader finds each object by the path ldd named, so that path holds the bytes).
fn layer(files: &[(String, PathBuf)], epoch: u64) -> anyhow::Result<Vec<u8>> {
    let mut dirs: Vec<String> = ["proc", "sys", "dev", "tmp", "etc/brokerscope"]
        .into_iter()
        .map(String::from)
        .collect();
    for (inside, _) in files {
        let mut path = Path::new(inside.as_str());
        while let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            dirs.push(parent.to_string_lossy().into_owned());
            path = parent;
        }
    }
    // Parents of the fixed directories too (etc for etc/brokerscope).
    let extra: Vec<String> = dirs
        .iter()
        .filter_map(|d| Path::new(d).parent())
        .filter(|p| !p.as_os_str().is_empty())
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    dirs.extend(extra);
    dirs.sort();
    dirs.dedup();

    let mut tar = tar::Builder::new(Vec::new());
    for dir in &dirs {
        let mode = if dir == "tmp" { 0o1777 } else { 0o755 };
        let mut header = header(tar::EntryType::Directory, mode, epoch);
        header.set_size(0);
        tar.append_data(&mut header, format!("{dir}/"), std::io::empty())
            .with_context(|| format!("layer: {dir}"))?;
    }
    for (inside, source) in files {
        let data =
            std::fs::read(source).with_context(|| format!("cannot read {}", source.display()))?;
        let mut header = header(tar::EntryType::Regular, 0o755, epoch);
        header.set_size(data.len() as u64);
        tar.append_data(&mut header, inside, data.as_slice())
            .with_context(|| format!("layer: {inside}"))?;
    }
    Ok(tar.into_inner()?)
}

fn header(kind: tar::EntryType, mode: u32, epoch: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(epoch);
    header
}

fn descriptor(media_type: &str, blob: &[u8]) -> serde_json::Value {
    json!({
        "mediaType": media_type,
        "digest": format!("sha256:{}", sha256(blob)),
        "size": blob.len(),
    })
}

fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The commit the image is built from; `-dirty` when the work tree has changes.
fn revision(root: &Path) -> anyhow::Result<String> {
    let head = crate::cmd::output(
        Command::new("git")
            .current_dir(root)
            .args(["rev-parse", "HEAD"]),
    )?;
    let dirty = !crate::cmd::output(Command::new("git").current_dir(root).args([
        "status",
        "--porcelain",
        "--untracked-files=no",
    ]))?
    .trim()
    .is_empty();
    Ok(format!(
        "{}{}",
        head.trim(),
        if dirty { "-dirty" } else { "" }
    ))
}

/// `SOURCE_DATE_EPOCH` when set, else the commit's time: the same commit gives the same image.
fn source_date_epoch(root: &Path) -> anyhow::Result<u64> {
    if let Ok(s) = std::env::var("SOURCE_DATE_EPOCH") {
        return s
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={s:?} is not a number of seconds"));
    }
    let t = crate::cmd::output(Command::new("git").current_dir(root).args([
        "log",
        "-1",
        "--format=%ct",
    ]))?;
    t.trim()
        .parse()
        .with_context(|| format!("git log printed {t:?} for the commit time"))
}

/// Seconds since the epoch as RFC 3339 UTC (`date` is everywhere the build is).
fn rfc3339(epoch: u64) -> anyhow::Result<String> {
    Ok(crate::cmd::output(Command::new("date").args([
        "-u",
        "-d",
        &format!("@{epoch}"),
        "+%Y-%m-%dT%H:%M:%SZ",
    ]))?
    .trim()
    .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_names_the_loader_and_each_object_but_not_the_vdso() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f24)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f24)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f24)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn a_missing_object_is_an_error_naming_it() {
        let err = parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err();
        assert!(err.to_string().contains("libfoo.so.1"), "{err}");
    }

    #[test]
    fn the_layer_holds_each_directory_once_and_files_at_their_paths() {
        let dir = std::env::temp_dir().join(format!("xtask-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("f");
        std::fs::write(&f, b"x").unwrap();
        let tar = layer(
            &[
                ("usr/local/bin/brokerscope".into(), f.clone()),
                ("lib64/ld.so".into(), f.clone()),
            ],
            1,
        )
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let mut archive = tar::Archive::new(tar.as_slice());
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "usr/",
            "usr/local/",
            "usr/local/bin/",
            "lib64/",
            "etc/",
            "tmp/",
        ] {
            assert_eq!(
                names.iter().filter(|n| *n == want).count(),
                1,
                "{want} in {names:?}"
            );
        }
        assert!(names.contains(&"usr/local/bin/brokerscope".to_string()));
        assert!(names.contains(&"lib64/ld.so".to_string()));
    }
}
