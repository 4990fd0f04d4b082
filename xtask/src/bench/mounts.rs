//! Filesystems the node-tax bench makes for the brokers' log dirs: ext4, xfs and btrfs on loop
//! devices over sparse files, and tmpfs. Each piece is a guard undone when dropped, in reverse
//! order of making (unmount, detach the loop device, delete the backing file), so an error or a
//! panic anywhere leaves nothing mounted; [`clean_leftovers`] undoes what an interrupted run
//! (killed, so no destructor ran) left under the bench's directory.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};

/// Size of each loop filesystem's sparse backing file: mkfs.xfs wants at least 300 MiB.
const LOOP_FS_BYTES: u64 = 512 << 20;

/// A filesystem mounted for the bench, unmounted (and its device detached, its backing file
/// deleted) when dropped.
pub struct Mounted {
    mount: Mount,
    /// Dropped after the mount.
    _device: Option<LoopDevice>,
    /// Dropped last.
    _file: Option<BackingFile>,
}

impl Mounted {
    /// A fresh `fs` (`ext4`, `xfs` or `btrfs`) on a loop device over a sparse file
    /// `<dir>/<fs>.img`, mounted on `<dir>/mnt/<fs>`.
    pub fn loop_fs(dir: &Path, fs: &str) -> anyhow::Result<Self> {
        let file = BackingFile::create(&dir.join(format!("{fs}.img")))?;
        let device = LoopDevice::attach(&file.0)?;
        let mkfs = format!("mkfs.{fs}");
        let mut cmd = Command::new(&mkfs);
        match fs {
            "ext4" => cmd.args(["-q", "-F"]),
            "xfs" | "btrfs" => cmd.args(["-q", "-f"]),
            _ => bail!("no loop filesystem {fs}"),
        };
        quiet(cmd.arg(&device.0))
            .with_context(|| format!("{mkfs} (xfsprogs, btrfs-progs: `cargo xtask setup`)"))?;
        let mount = Mount::new(&dir.join("mnt").join(fs), &["-t", fs, &device.0])?;
        Ok(Self {
            mount,
            _device: Some(device),
            _file: Some(file),
        })
    }

    /// A tmpfs of 64 MiB on `<dir>/mnt/tmpfs`.
    pub fn tmpfs(dir: &Path) -> anyhow::Result<Self> {
        let mount = Mount::new(
            &dir.join("mnt/tmpfs"),
            &["-t", "tmpfs", "-o", "size=64m", "bench-tmpfs"],
        )?;
        Ok(Self {
            mount,
            _device: None,
            _file: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.mount.0
    }
}

/// Runs a command, its output kept for the error only.
fn quiet(cmd: &mut Command) -> anyhow::Result<()> {
    crate::cmd::output(cmd).map(drop)
}

/// A sparse file, deleted when dropped.
struct BackingFile(PathBuf);

impl BackingFile {
    fn create(path: &Path) -> anyhow::Result<Self> {
        let file =
            std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
        let guard = Self(path.into());
        file.set_len(LOOP_FS_BYTES)?;
        Ok(guard)
    }
}

impl Drop for BackingFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A loop device over a file, detached when dropped.
struct LoopDevice(String);

impl LoopDevice {
    fn attach(file: &Path) -> anyhow::Result<Self> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .context("run losetup")?;
        if !out.status.success() {
            bail!(
                "losetup --find --show {}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !device.starts_with("/dev/loop") {
            bail!("losetup named no loop device: {device:?}");
        }
        Ok(Self(device))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Err(e) = quiet(Command::new("losetup").args(["-d", &self.0])) {
            eprintln!("bench: {e}");
        }
    }
}

/// A mount point, unmounted and removed when dropped.
struct Mount(PathBuf);

impl Mount {
    /// `mount <args> <point>`, the point made first.
    fn new(point: &Path, args: &[&str]) -> anyhow::Result<Self> {
        std::fs::create_dir_all(point)?;
        if let Err(e) = quiet(Command::new("mount").args(args).arg(point)) {
            let _ = std::fs::remove_dir(point);
            return Err(e);
        }
        Ok(Self(point.into()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        unmount(&self.0);
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Unmounts `point`, retrying while something still has a file open there (a broker being
/// killed), then lazily: the mount goes once the last user does.
fn unmount(point: &Path) {
    for _ in 0..10 {
        if quiet(Command::new("umount").arg(point)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if let Err(e) = quiet(Command::new("umount").arg("-l").arg(point)) {
        eprintln!("bench: cannot unmount {}: {e}", point.display());
    }
}

/// Unmounts whatever is mounted under `<dir>/mnt` and detaches the loop devices over
/// `<dir>/*.img`, then deletes those files: what a run killed before its guards dropped left.
pub fn clean_leftovers(dir: &Path) -> anyhow::Result<()> {
    let under = dir.join("mnt");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    // Deepest first. Mount points are the fifth field, with spaces escaped as \040.
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(&under))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in points {
        eprintln!(
            "bench: unmounting {} (left by an earlier run)",
            point.display()
        );
        unmount(&point);
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "img") {
            continue;
        }
        let out = Command::new("losetup").arg("-j").arg(&path).output()?;
        // `/dev/loop3: []: (/path/to/file)`, one line per device over the file.
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((device, _)) = line.split_once(':') {
                eprintln!(
                    "bench: detaching {device} over {} (left by an earlier run)",
                    path.display()
                );
                drop(LoopDevice(device.to_string()));
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    Ok(())
}
