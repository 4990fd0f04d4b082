//! The open descriptors of a starting broker, read from `/proc/<pid>/fd`: how the state tracker
//! sees log recovery without any kernel hook. Kafka keeps each loaded segment's `.log` open (a
//! `FileChannel` per segment), so the segments it recovers and loads accumulate as descriptors.
//!
//! Owns, per polled process, a directory descriptor on `/proc/<pid>/fd` (opened once, after which
//! the process's start time is checked, so a reused pid is never read) and the descriptor numbers
//! already read. A poll lists the directory (getdents64) and reads the link (readlinkat) of each
//! number the previous poll did not list: a closed number that is reused is read again once a
//! poll has seen it missing; a number closed and reused between two polls is not read again.
//!
//! Targets are paths as the broker names them, whatever its container: the kernel prints a
//! link from the reader's root when the file is reachable from there (a chroot-style container:
//! the node's path, `/tmp/c/root/data/t-0/0.log`, and `/proc/<pid>/root` reads
//! `/tmp/c/root`), and from the root of the file's own mount namespace when it is not (a
//! `pivot_root` container, as runc makes: `/data/t-0/0.log`, and the root reads `/`). So each
//! target is taken relative to the process's root link, read when the poll opens (a broker does
//! not change its root later); a target outside that root is none the broker can name, and is
//! skipped.
//!
//! Everything under `/proc/<pid>` is the process's to shape, a container's included: the numbers
//! listed are bounded ([`MAX_FDS`]), so are the links read per poll (the caller's budget) and
//! their length (`PATH_MAX`); targets that are not plain absolute UTF-8 paths (sockets, pipes,
//! anonymous inodes, deleted files) are skipped. Links are read, never followed: no target is
//! opened, so a FIFO or a device cannot block the tracker. It touches nothing else under /proc
//! but `/proc/<pid>/stat` (the start time).

use std::{
    ffi::CStr,
    fs::File,
    io::{self, Read as _, Seek as _, SeekFrom, Write as _},
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
};

/// Descriptor numbers listed per poll, and remembered, per process: far above Kafka's needs
/// (one per segment, [`super::inventory::MAX_SEGMENTS`] tracked) and bounding the memory a
/// process with millions of descriptors could make the tracker use (4 bytes a number, 3
/// vectors).
pub const MAX_FDS: usize = 262_144;
/// Bytes asked of each getdents64 call (about 1300 entries of a descriptor directory).
const DIRENT_BYTES: usize = 32 * 1024;
/// The longest link target read; the kernel's own bound on a path.
const PATH_MAX: usize = libc::PATH_MAX as usize;
/// `/proc/<pid>/stat` bytes read for the start time (the kernel caps the command name at 16
/// bytes, so the line is far shorter).
const MAX_STAT_BYTES: u64 = 4096;

/// Why a process's descriptors could not be polled.
#[derive(Debug, thiserror::Error)]
pub enum FdPollError {
    /// The process exited, or its pid now names another process.
    #[error("process {pid} is gone")]
    Gone { pid: u32 },
    #[error("cannot read /proc/{pid}/{what}: {source}")]
    Io {
        pid: u32,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

impl FdPollError {
    fn io(pid: u32, what: &'static str, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::NotFound || source.raw_os_error() == Some(libc::ESRCH) {
            FdPollError::Gone { pid }
        } else {
            FdPollError::Io { pid, what, source }
        }
    }
}

/// What one poll did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PollStats {
    /// Descriptor numbers listed.
    pub listed: usize,
    /// Links read: numbers the previous poll did not list.
    pub read: usize,
    /// New numbers over the budget, left for the next poll.
    pub deferred: usize,
    /// Time the listing took: what a poll costs however little changed.
    pub listing: std::time::Duration,
}

/// One process's descriptor directory and the numbers already read.
pub struct FdPoll {
    pid: u32,
    dir: File,
    /// `/proc/<pid>/root` as the kernel prints it to the agent (see the module doc).
    root: Vec<u8>,
    /// Numbers listed by the last poll whose link was read (or that closed meanwhile), ascending.
    known: Vec<u32>,
    /// Numbers whose target the caller asked to keep reading (see [`FdPoll::poll`]), with the
    /// target last reported.
    watched: std::collections::HashMap<u32, Box<str>>,
    /// The next `watched` (kept to reuse its allocation).
    spare_watched: std::collections::HashMap<u32, Box<str>>,
    /// Numbers listed by the current poll (kept to reuse its allocation).
    listed: Vec<u32>,
    /// The next `known` (kept to reuse its allocation).
    spare: Vec<u32>,
    dirents: Vec<u8>,
}

impl std::fmt::Debug for FdPoll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdPoll")
            .field("pid", &self.pid)
            .field("known", &self.known.len())
            .finish_non_exhaustive()
    }
}

impl FdPoll {
    /// Opens `/proc/<pid>/fd` of the process that started at `start_time_ticks`
    /// (`/proc/<pid>/stat` field 22).
    pub fn open(pid: u32, start_time_ticks: u64) -> Result<Self, FdPollError> {
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(format!("/proc/{pid}/fd"))
            .map_err(|e| FdPollError::io(pid, "fd", e))?;
        let root = root_link(pid)?;
        // The directory stays bound to the process that held the pid when it was opened (a
        // later read of it fails once that process is gone). Checked after the open: if the pid
        // names the expected process now, that process existed before and so held it then.
        if start_ticks(pid)? != start_time_ticks {
            return Err(FdPollError::Gone { pid });
        }
        Ok(FdPoll {
            pid,
            dir,
            root,
            known: Vec::new(),
            watched: std::collections::HashMap::new(),
            spare_watched: std::collections::HashMap::new(),
            listed: Vec::new(),
            spare: Vec::new(),
            dirents: vec![0; DIRENT_BYTES],
        })
    }

    /// Lists the descriptors and reads the link of each number the previous poll did not list,
    /// at most `budget` of them (the rest wait for the next poll), calling `seen` with each
    /// target that is a path (see [`target_path`]).
    ///
    /// A number listed again is not read again: its file is taken to be the same. When `seen`
    /// returns false for a target, its number is read at every poll instead, and `seen` called
    /// again only when the target changes. That is for files a process opens for a moment (a
    /// directory it lists, a checkpoint it reads): the number is free again at once, and the
    /// next file opened, a segment, takes it, perhaps before the next poll.
    pub fn poll(
        &mut self,
        budget: usize,
        mut seen: impl FnMut(&str) -> bool,
    ) -> Result<PollStats, FdPollError> {
        let started = std::time::Instant::now();
        self.list()?;
        let mut stats = PollStats {
            listed: self.listed.len(),
            listing: started.elapsed(),
            ..PollStats::default()
        };
        let mut next = std::mem::take(&mut self.spare);
        next.clear();
        let mut next_watched = std::mem::take(&mut self.spare_watched);
        next_watched.clear();
        let mut target = [0u8; PATH_MAX];
        let mut old = self.known.iter().copied().peekable();
        for &fd in &self.listed {
            while old.next_if(|&k| k < fd).is_some() {}
            if old.next_if_eq(&fd).is_some() {
                next.push(fd);
                continue;
            }
            if stats.read == budget {
                stats.deferred += 1;
                // Still watched: the next poll reads it.
                if let Some(last) = self.watched.remove(&fd) {
                    next_watched.insert(fd, last);
                }
                continue;
            }
            stats.read += 1;
            match self.read_link(fd, &mut target) {
                Ok(len) => {
                    let inside = target.get(..len).and_then(|t| inside_root(&self.root, t));
                    let Some(path) = inside.and_then(target_path) else {
                        next.push(fd);
                        continue;
                    };
                    match self.watched.remove(&fd) {
                        Some(last) if *last == *path => {
                            next_watched.insert(fd, last);
                        }
                        _ if seen(path) => next.push(fd),
                        _ => {
                            next_watched.insert(fd, path.into());
                        }
                    }
                }
                // Closed since the listing (or the process is exiting: the next listing says).
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => {
                    // Nothing of this poll is kept: the next one reads the same numbers again.
                    self.spare = next;
                    self.spare_watched = next_watched;
                    return Err(FdPollError::io(self.pid, "fd/<n>", e));
                }
            }
        }
        self.spare = std::mem::replace(&mut self.known, next);
        self.spare_watched = std::mem::replace(&mut self.watched, next_watched);
        Ok(stats)
    }

    /// Fills `listed` with the descriptor numbers, ascending, at most [`MAX_FDS`].
    fn list(&mut self) -> Result<(), FdPollError> {
        let pid = self.pid;
        self.listed.clear();
        (&self.dir)
            .seek(SeekFrom::Start(0))
            .map_err(|e| FdPollError::io(pid, "fd", e))?;
        'calls: while self.listed.len() < MAX_FDS {
            // SAFETY: `dirents` is a live, writable buffer of `dirents.len()` bytes and `dir` an
            // open directory descriptor for the duration of the call.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_getdents64,
                    self.dir.as_raw_fd(),
                    self.dirents.as_mut_ptr(),
                    self.dirents.len(),
                )
            };
            let n = match usize::try_from(n) {
                Ok(0) => break,
                Ok(n) => n.min(self.dirents.len()),
                Err(_) => return Err(FdPollError::io(pid, "fd", io::Error::last_os_error())),
            };
            let mut records = &self.dirents[..n];
            while let Some((name, rest)) = next_dirent(records) {
                records = rest;
                if let Some(fd) = parse_fd(name) {
                    if self.listed.len() == MAX_FDS {
                        break 'calls;
                    }
                    self.listed.push(fd);
                }
            }
            if !records.is_empty() {
                return Err(FdPollError::io(
                    pid,
                    "fd",
                    io::Error::new(io::ErrorKind::InvalidData, "malformed directory record"),
                ));
            }
        }
        // The kernel lists a descriptor table in ascending order; the merge in `poll` needs it.
        if !self.listed.is_sorted() {
            self.listed.sort_unstable();
        }
        self.listed.dedup();
        Ok(())
    }

    /// The link of descriptor `fd`, into `target`; its length (`target.len()` when cut).
    fn read_link(&self, fd: u32, target: &mut [u8; PATH_MAX]) -> io::Result<usize> {
        let mut name = [0u8; 12];
        // u32::MAX has 10 digits: the write fits and leaves a NUL.
        let _ = write!(&mut name[..11], "{fd}");
        let name = CStr::from_bytes_until_nul(&name).map_err(io::Error::other)?;
        // SAFETY: `name` is NUL-terminated, `target` is writable for `target.len()` bytes, and
        // `dir` is an open directory descriptor for the duration of the call. readlinkat never
        // opens or follows the link.
        let n = unsafe {
            libc::readlinkat(
                self.dir.as_raw_fd(),
                name.as_ptr(),
                target.as_mut_ptr().cast(),
                target.len(),
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

/// One `linux_dirent64` record off the front of `records`: its name (up to the NUL) and the
/// records after it. None when none is left or the record is malformed.
pub(crate) fn next_dirent(records: &[u8]) -> Option<(&[u8], &[u8])> {
    // d_ino (8), d_off (8), d_reclen (2), d_type (1), then the NUL-terminated name.
    const NAME: usize = 19;
    let reclen = usize::from(u16::from_ne_bytes([*records.get(16)?, *records.get(17)?]));
    if reclen <= NAME || reclen > records.len() {
        return None;
    }
    let name = &records[NAME..reclen];
    let name = name
        .iter()
        .position(|&b| b == 0)
        .map_or(name, |end| &name[..end]);
    Some((name, &records[reclen..]))
}

/// A descriptor directory entry's number (not `.`, `..` or anything else).
pub(crate) fn parse_fd(name: &[u8]) -> Option<u32> {
    if name.is_empty() || name.len() > 10 || !name.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(name).ok()?.parse().ok()
}

/// A link target that may name a file by its path as the process sees it: UTF-8, absolute, not
/// cut at `PATH_MAX`, not deleted. `socket:[..]`, `pipe:[..]` and `anon_inode:..` are not
/// absolute; a deleted file's path ends in ` (deleted)`.
pub fn target_path(target: &[u8]) -> Option<&str> {
    if target.len() >= PATH_MAX {
        return None;
    }
    let path = std::str::from_utf8(target).ok()?;
    (path.starts_with('/') && !path.ends_with(" (deleted)") && !path.contains('\0')).then_some(path)
}

/// `/proc/<pid>/root` as the kernel prints it to this process (see the module doc).
pub fn root_link(pid: u32) -> Result<Vec<u8>, FdPollError> {
    use std::os::unix::ffi::OsStringExt as _;
    std::fs::read_link(format!("/proc/{pid}/root"))
        .map(|p| p.into_os_string().into_vec())
        .map_err(|e| FdPollError::io(pid, "root", e))
}

/// `target` (a link of the process's, as printed to the agent) as a path inside `root` (its
/// root link): the part after `root`, or None when it is not under it. A target cut at
/// `PATH_MAX` stays cut (and so is refused by [`target_path`]).
pub fn inside_root<'a>(root: &[u8], target: &'a [u8]) -> Option<&'a [u8]> {
    if target.len() >= PATH_MAX {
        return Some(target);
    }
    let root = match root {
        b"/" => return Some(target),
        r => r.strip_suffix(b"/").unwrap_or(r),
    };
    match target.strip_prefix(root)? {
        b"" => Some(b"/"),
        rest if rest.starts_with(b"/") => Some(rest),
        _ => None,
    }
}

/// Field 22 of `/proc/<pid>/stat`: the start time in clock ticks after boot. Discovery's
/// stat reader ([`crate::proc::ProcFs::stat`]) is the same read; its procfs figures are there.
pub fn start_ticks(pid: u32) -> Result<u64, FdPollError> {
    let mut text = Vec::new();
    File::open(format!("/proc/{pid}/stat"))
        .and_then(|f| f.take(MAX_STAT_BYTES).read_to_end(&mut text))
        .map_err(|e| FdPollError::io(pid, "stat", e))?;
    // The command name (field 2) is the process's to choose, parentheses included: the fields
    // after it follow the last `)`.
    let after = text
        .iter()
        .rposition(|&b| b == b')')
        .map(|i| &text[i + 1..])
        .unwrap_or_default();
    std::str::from_utf8(after)
        .ok()
        .and_then(|rest| rest.split_ascii_whitespace().nth(19)?.parse().ok())
        .ok_or_else(|| {
            FdPollError::io(
                pid,
                "stat",
                io::Error::new(io::ErrorKind::InvalidData, "no start time"),
            )
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{
        collections::BTreeSet,
        os::{fd::AsRawFd, unix::ffi::OsStrExt as _},
        path::Path,
    };

    use super::*;

    fn own() -> FdPoll {
        let pid = std::process::id();
        FdPoll::open(pid, start_ticks(pid).unwrap()).unwrap()
    }

    /// Every target under `dir` a poll reported (other tests of this process open files too).
    fn poll_under(p: &mut FdPoll, budget: usize, dir: &Path) -> (PollStats, BTreeSet<String>) {
        let prefix = format!("{}/", dir.display());
        let mut seen = BTreeSet::new();
        let stats = p
            .poll(budget, |t| {
                assert!(t.starts_with('/') && !t.ends_with(" (deleted)"), "{t}");
                if t.starts_with(&prefix) {
                    assert!(seen.insert(t.to_string()), "{t} reported twice in one poll");
                }
                true
            })
            .unwrap();
        (stats, seen)
    }

    /// A descriptor moved to a number of the test's own: tests running beside each
    /// other open and close files in this one process, and a number another test
    /// freed between two polls is (rightly) not read again when a test takes it.
    pub(crate) struct Placed(i32);

    impl Placed {
        pub(crate) fn new(file: impl AsRawFd, fd: i32) -> Self {
            // SAFETY: both are descriptors of this process; each test owns its range of
            // numbers (900 and up; `strimzi`'s tests 940 and up), which nothing else uses.
            assert_eq!(unsafe { libc::dup2(file.as_raw_fd(), fd) }, fd);
            Placed(fd)
        }
    }

    impl Drop for Placed {
        fn drop(&mut self) {
            // SAFETY: the number is this guard's (see `new`).
            unsafe { libc::close(self.0) };
        }
    }

    fn names(dir: &Path, files: &[&str]) -> BTreeSet<String> {
        files
            .iter()
            .map(|f| format!("{}/{f}", dir.display()))
            .collect()
    }

    #[test]
    fn new_descriptors_are_read_once_and_odd_targets_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut p = own();
        let (_, before) = poll_under(&mut p, usize::MAX, d);
        assert!(before.is_empty());

        const A: i32 = 920;
        let a = Placed::new(std::fs::File::create(d.join("a.log")).unwrap(), A);
        let b = Placed::new(std::fs::File::create(d.join("b.log")).unwrap(), A + 1);
        // Odd targets, all under the directory: a deleted file, a file whose name is not UTF-8,
        // a FIFO (opened without blocking; the poll must not open it), and, elsewhere, a socket
        // and a pipe.
        let deleted = Placed::new(std::fs::File::create(d.join("gone.log")).unwrap(), A + 2);
        std::fs::remove_file(d.join("gone.log")).unwrap();
        let odd = std::ffi::OsStr::from_bytes(b"odd-\xff.log");
        let not_utf8 = Placed::new(std::fs::File::create(d.join(odd)).unwrap(), A + 3);
        let fifo_path = std::ffi::CString::new(format!("{}/fifo", d.display())).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo_path.as_ptr(), 0o600) }, 0);
        let fifo = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(d.join("fifo"))
            .unwrap();
        let fifo = Placed::new(fifo, A + 4);
        let socket = Placed::new(std::net::TcpListener::bind("127.0.0.1:0").unwrap(), A + 5);
        let (pipe_r, pipe_w) = std::io::pipe().unwrap();
        let (pipe_r, pipe_w) = (Placed::new(pipe_r, A + 6), Placed::new(pipe_w, A + 7));

        let (stats, seen) = poll_under(&mut p, usize::MAX, d);
        assert_eq!(seen, names(d, &["a.log", "b.log", "fifo"]));
        assert!(stats.read >= 8 && stats.deferred == 0, "{stats:?}");
        // Nothing new: nothing read, nothing reported.
        let (stats, seen) = poll_under(&mut p, usize::MAX, d);
        assert!(seen.is_empty(), "{seen:?}");
        assert!(stats.listed >= 9, "{stats:?}");

        // A descriptor closed, a poll, a new one under the same number: read.
        drop(a);
        let _ = poll_under(&mut p, usize::MAX, d);
        let c = Placed::new(std::fs::File::create(d.join("c.log")).unwrap(), A);
        let (_, seen) = poll_under(&mut p, usize::MAX, d);
        assert!(seen.contains(&format!("{}/c.log", d.display())), "{seen:?}");
        drop((b, c, deleted, not_utf8, fifo, socket, pipe_r, pipe_w));
    }

    #[test]
    fn a_reused_number_is_read_again_once_seen_missing() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        const FD: i32 = 900;
        let file = |name: &str| std::fs::File::create(d.join(name)).unwrap();
        let mut p = own();
        let first = Placed::new(file("first.log"), FD);
        let (_, seen) = poll_under(&mut p, usize::MAX, d);
        assert_eq!(seen, names(d, &["first.log"]));
        // Replaced between two polls: the number never went missing, so it is not read again.
        std::mem::forget(first);
        let second = Placed::new(file("second.log"), FD);
        let (_, seen) = poll_under(&mut p, usize::MAX, d);
        assert!(seen.is_empty(), "{seen:?}");
        drop(second);
        let (_, seen) = poll_under(&mut p, usize::MAX, d);
        assert!(seen.is_empty(), "{seen:?}");
        let _third = Placed::new(file("third.log"), FD);
        let (_, seen) = poll_under(&mut p, usize::MAX, d);
        assert_eq!(seen, names(d, &["third.log"]));
    }

    #[test]
    fn a_number_whose_target_is_not_kept_is_read_at_every_poll() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        const FD: i32 = 905;
        let mut p = own();
        let prefix = format!("{}/", d.display());
        // The directory is watched (its number read again each poll), files are kept.
        let poll = |p: &mut FdPoll| {
            let mut seen = Vec::new();
            p.poll(usize::MAX, |t| {
                if !t.starts_with(&prefix) && *t != *d.to_str().unwrap() {
                    return true;
                }
                seen.push(t.to_string());
                t.ends_with(".log")
            })
            .unwrap();
            seen
        };
        let listing = Placed::new(std::fs::File::open(d).unwrap(), FD);
        assert_eq!(poll(&mut p), [d.display().to_string()]);
        // Unchanged: read, not reported again.
        assert!(poll(&mut p).is_empty());
        // The directory closed and a segment opened under its number between two polls: seen.
        std::mem::forget(listing);
        let segment = Placed::new(std::fs::File::create(d.join("0.log")).unwrap(), FD);
        assert_eq!(poll(&mut p), [format!("{}/0.log", d.display())]);
        // A kept one is not read again.
        assert!(poll(&mut p).is_empty());
        drop(segment);
    }

    #[test]
    fn the_budget_defers_new_numbers_to_the_next_polls() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Numbers of their own: tests running beside this one open and close
        // files in the same process, and a number another test freed between two
        // polls is (rightly) not read again when this test takes it.
        const FIRST: i32 = 910;
        let mut p = own();
        let _ = p.poll(usize::MAX, |_| true).unwrap();
        let files: Vec<String> = (0..5).map(|i| format!("{i}.log")).collect();
        let _open: Vec<Placed> = (FIRST..)
            .zip(&files)
            .map(|(fd, f)| Placed::new(std::fs::File::create(d.join(f)).unwrap(), fd))
            .collect();
        let mut all = BTreeSet::new();
        for _ in 0..100 {
            let (stats, seen) = poll_under(&mut p, 2, d);
            assert!(stats.read <= 2, "{stats:?}");
            all.extend(seen);
            if stats.deferred == 0 && stats.read < 2 {
                break;
            }
        }
        let want: Vec<&str> = files.iter().map(String::as_str).collect();
        assert_eq!(all, names(d, &want));
    }

    #[test]
    fn a_gone_or_other_process_is_gone() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(matches!(
            FdPoll::open(pid, 1),
            Err(FdPollError::Gone { pid: p }) if p == pid
        ));
        let own = std::process::id();
        let ticks = start_ticks(own).unwrap();
        assert!(matches!(
            FdPoll::open(own, ticks + 1),
            Err(FdPollError::Gone { .. })
        ));
    }

    #[test]
    fn targets_are_taken_inside_the_process_root() {
        // A pivot_root container (or the node's own processes): printed as the broker sees it.
        assert_eq!(
            inside_root(b"/", b"/data/t-0/0.log"),
            Some(&b"/data/t-0/0.log"[..])
        );
        // A chroot: printed from the node's root, under the root's own node path.
        let root = b"/tmp/c/root";
        assert_eq!(
            inside_root(root, b"/tmp/c/root/data/0.log"),
            Some(&b"/data/0.log"[..])
        );
        assert_eq!(
            inside_root(b"/tmp/c/root/", b"/tmp/c/root/d"),
            Some(&b"/d"[..])
        );
        assert_eq!(inside_root(root, b"/tmp/c/root"), Some(&b"/"[..]));
        // Beside or outside the root: nothing the broker can name.
        assert_eq!(inside_root(root, b"/tmp/c/rootfs/data/0.log"), None);
        assert_eq!(inside_root(root, b"/data/0.log"), None);
        // Not paths at all: left for `target_path` to skip.
        assert_eq!(inside_root(b"/", b"socket:[1]"), Some(&b"socket:[1]"[..]));
        assert_eq!(inside_root(root, b"socket:[1]"), None);
        // Cut at PATH_MAX: never shortened into an acceptable length.
        let mut long = root.to_vec();
        long.resize(PATH_MAX, b'a');
        assert_eq!(inside_root(root, &long).and_then(target_path), None);
    }

    #[test]
    fn targets_and_records() {
        assert_eq!(target_path(b"/d/t-0/0.log"), Some("/d/t-0/0.log"));
        for odd in [
            &b"socket:[1234]"[..],
            b"pipe:[99]",
            b"anon_inode:[eventfd]",
            b"/d/t-0/0.log (deleted)",
            b"/d/\xff.log",
            b"relative/0.log",
            b"",
        ] {
            assert_eq!(target_path(odd), None, "{}", String::from_utf8_lossy(odd));
        }
        let long = [b'/'; PATH_MAX];
        assert_eq!(target_path(&long), None, "cut at PATH_MAX");
        assert_eq!(
            target_path(&long[..PATH_MAX - 1]).map(str::len),
            Some(PATH_MAX - 1)
        );

        assert_eq!(parse_fd(b"17"), Some(17));
        assert_eq!(parse_fd(b"4294967295"), Some(u32::MAX));
        for odd in [
            &b"."[..],
            b"..",
            b"",
            b"4294967296",
            b"12345678901",
            b"1a",
            b"-1",
        ] {
            assert_eq!(parse_fd(odd), None);
        }

        let record = |name: &[u8], reclen: u16| {
            let mut r = vec![0u8; 16];
            r.extend(reclen.to_ne_bytes());
            r.push(0);
            r.extend(name);
            r.resize(usize::from(reclen).max(r.len()), 0);
            r
        };
        let mut two = record(b"3", 24);
        two.extend(record(b"..", 24));
        let (name, rest) = next_dirent(&two).unwrap();
        assert_eq!(name, b"3");
        let (name, rest) = next_dirent(rest).unwrap();
        assert_eq!((name, rest.len()), (&b".."[..], 0));
        assert_eq!(next_dirent(rest), None);
        // A length beyond the buffer or below the header is refused, not followed.
        assert_eq!(next_dirent(&record(b"3", 19)), None);
        let mut cut = record(b"3", 24);
        cut[16..18].copy_from_slice(&200u16.to_ne_bytes());
        assert_eq!(next_dirent(&cut), None);
    }
}
