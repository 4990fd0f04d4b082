//! Paths a process names, resolved inside that process's own root and nowhere else.
//!
//! A broker's container controls its files: a `server.properties` that is an absolute symlink,
//! a `log.dirs` entry full of `..`, a FIFO or a device where a file should be. Opened naively
//! through `/proc/<pid>/root/...`, the kernel would follow such links from the agent's root, the
//! node's. Here every path is resolved from a descriptor of `/proc/<pid>/root` with
//! `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`: absolute links and `..` stop at the
//! process's root, and `/proc/<pid>/root`-style magic links inside the container are refused.
//! Where `openat2` is refused (a seccomp profile, ENOSYS), an equally strict walk resolves one
//! component at a time with `O_PATH | O_NOFOLLOW`, following symlinks as text inside the root.
//!
//! Only regular files are read, and only after an `O_PATH` descriptor was checked with `fstat`
//! (opening a device can have effects: a watchdog, a tape), then reopened through
//! `/proc/self/fd` with `O_NONBLOCK`. Directories are listed through their own descriptor, their
//! entries opened one component at a time without following links. Every read is bounded in
//! bytes and every listing in entries; time is bounded by the caller ([`super::workers`]).
//!
//! Errors name the path as the process named it, never the node's view of it, and say nothing
//! of a refused file's size.

use std::{
    ffi::{CStr, CString, OsStr},
    io::Read as _,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

/// Symlinks followed while resolving one path (the kernel's own limit is 40).
const MAX_SYMLINKS: u32 = 40;
/// Longest path accepted (the kernel's `PATH_MAX`).
const MAX_PATH: usize = 4096;

/// Why a path of a process was not read.
#[derive(Debug, thiserror::Error)]
pub enum ConfinedError {
    #[error("{path}: no such file or directory")]
    NotFound { path: String },
    #[error("{path}: not a regular file ({kind})")]
    NotRegular { path: String, kind: &'static str },
    #[error("{path}: not a directory")]
    NotDirectory { path: String },
    #[error("{path}: larger than {max} bytes")]
    TooLarge { path: String, max: u64 },
    #[error("{path}: too many levels of symbolic links, or a magic link such as /proc/<pid>/root")]
    Loop { path: String },
    #[error("{path}: invalid path ({what})")]
    Invalid { path: String, what: &'static str },
    #[error("{path}: the working directory is not inside the process's root")]
    CwdOutsideRoot { path: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("process {pid}: {what}")]
    Process { pid: u32, what: String },
}

impl ConfinedError {
    fn io(path: &str, source: std::io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::ENOENT) => ConfinedError::NotFound { path: path.into() },
            Some(libc::ELOOP) => ConfinedError::Loop { path: path.into() },
            Some(libc::ENOTDIR) => ConfinedError::NotDirectory { path: path.into() },
            _ => ConfinedError::Io {
                path: path.into(),
                source,
            },
        }
    }

    /// The path (or one of its ancestors) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ConfinedError::NotFound { .. })
    }
}

/// How paths are resolved: the kernel's `openat2`, or the component walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolver {
    /// `openat2`, falling back to the walk (for good) the first time the kernel refuses it.
    Auto,
    /// The component walk only (tests use it to check both agree).
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "the walk is chosen by Auto in production")
    )]
    Walk,
}

/// One process's root (and working directory), as descriptors taken once.
#[derive(Debug)]
pub struct ProcessRoot {
    root: OwnedFd,
    /// The working directory as a path inside the root, verified to be the same inode as
    /// `/proc/<pid>/cwd` (None: it is not inside the root).
    cwd: Option<String>,
    resolver: Resolver,
}

/// What an `O_PATH` descriptor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    mode: u32,
    pub size: u64,
}

impl Identity {
    fn of(fd: RawFd) -> std::io::Result<Self> {
        // SAFETY: all zeroes is a valid `stat` (plain integers).
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is an open descriptor for the call, the empty path with AT_EMPTY_PATH
        // names it, and `st` is valid and writable.
        let rc = unsafe { libc::fstatat(fd, c"".as_ptr(), &mut st, libc::AT_EMPTY_PATH) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Identity {
            dev: st.st_dev,
            ino: st.st_ino,
            mode: st.st_mode & libc::S_IFMT,
            size: u64::try_from(st.st_size).unwrap_or(0),
        })
    }

    fn kind(self) -> &'static str {
        match self.mode {
            libc::S_IFREG => "regular file",
            libc::S_IFDIR => "directory",
            libc::S_IFIFO => "FIFO",
            libc::S_IFCHR => "character device",
            libc::S_IFBLK => "block device",
            libc::S_IFSOCK => "socket",
            libc::S_IFLNK => "symbolic link",
            _ => "unknown type",
        }
    }

    fn is_dir(self) -> bool {
        self.mode == libc::S_IFDIR
    }

    fn is_symlink(self) -> bool {
        self.mode == libc::S_IFLNK
    }
}

impl ProcessRoot {
    /// Takes `<proc_dir>/root` (`proc_dir` is `/proc/<pid>`) and the working directory of
    /// `pid`, checking afterwards that the pid still names the process that started at
    /// `start_ticks` (field 22 of its stat), so a reused pid is never read as the broker.
    pub fn open(
        proc_dir: &Path,
        pid: u32,
        start_ticks: Option<u64>,
    ) -> Result<Self, ConfinedError> {
        Self::open_with(proc_dir, pid, start_ticks, Resolver::Auto)
    }

    pub fn open_with(
        proc_dir: &Path,
        pid: u32,
        start_ticks: Option<u64>,
        resolver: Resolver,
    ) -> Result<Self, ConfinedError> {
        let process = |what: String| ConfinedError::Process { pid, what };
        let root = open_raw(
            &proc_dir.join("root").to_string_lossy(),
            libc::O_PATH | libc::O_DIRECTORY,
        )
        .map_err(|e| process(format!("cannot open its root: {e}")))?;
        if let Some(start) = start_ticks {
            let stat = std::fs::read_to_string(proc_dir.join("stat"))
                .map_err(|e| process(format!("cannot read its stat: {e}")))?;
            if crate::proc::parse_stat(&stat).map(|s| s.start_ticks) != Some(start) {
                return Err(process("the pid names another process now".into()));
            }
        }
        let mut this = ProcessRoot {
            root,
            cwd: None,
            resolver,
        };
        this.cwd = this.cwd_inside_root(proc_dir);
        Ok(this)
    }

    /// A directory taken as the root directly (tests).
    #[cfg(test)]
    pub fn at(dir: &std::path::Path, cwd: Option<&str>, resolver: Resolver) -> Self {
        let root = open_raw(&dir.to_string_lossy(), libc::O_PATH | libc::O_DIRECTORY)
            .expect("open the test root");
        ProcessRoot {
            root,
            cwd: cwd.map(str::to_string),
            resolver,
        }
    }

    /// `/proc/<pid>/cwd` as a path inside the root: the kernel prints it from the namespace's
    /// root (or ours), the root likewise, so the one minus the other names it; trusted only when
    /// resolving that name inside the root reaches the very directory the process is in.
    fn cwd_inside_root(&self, proc_dir: &Path) -> Option<String> {
        let link = |name: &str| std::fs::read_link(proc_dir.join(name)).ok();
        let cwd = link("cwd")?;
        let root = link("root")?;
        let inside = cwd.strip_prefix(&root).ok()?;
        let inside = format!("/{}", inside.to_str()?);
        let actual = open_raw(&proc_dir.join("cwd").to_string_lossy(), libc::O_PATH)
            .and_then(|fd| Identity::of(fd.as_raw_fd()))
            .ok()?;
        let resolved = self.resolve(&inside, true).ok()?;
        let seen = Identity::of(resolved.as_raw_fd()).ok()?;
        (seen.dev == actual.dev && seen.ino == actual.ino).then_some(inside)
    }

    /// The path inside the root that `path`, as the process names it, means: absolute paths
    /// from the root, relative ones from the working directory.
    fn absolute(&self, path: &str) -> Result<String, ConfinedError> {
        if path.is_empty() {
            return Err(ConfinedError::Invalid {
                path: path.into(),
                what: "empty",
            });
        }
        if path.len() > MAX_PATH || path.contains('\0') {
            return Err(ConfinedError::Invalid {
                path: path.chars().take(200).collect(),
                what: "too long or holds a NUL",
            });
        }
        if path.starts_with('/') {
            return Ok(path.into());
        }
        match &self.cwd {
            Some(cwd) => Ok(format!("{}/{path}", cwd.trim_end_matches('/'))),
            None => Err(ConfinedError::CwdOutsideRoot { path: path.into() }),
        }
    }

    /// An `O_PATH` descriptor of `path` (inside the root), following a final symlink when
    /// `follow` (always inside the root).
    fn resolve(&self, path: &str, follow: bool) -> Result<OwnedFd, ConfinedError> {
        self.resolve_as(path, path, follow)
    }

    /// [`ProcessRoot::resolve`], errors naming `label` (the path as the process named it).
    fn resolve_as(&self, path: &str, label: &str, follow: bool) -> Result<OwnedFd, ConfinedError> {
        if self.resolver == Resolver::Auto && openat2_usable() {
            let mut flags = libc::O_PATH;
            if !follow {
                flags |= libc::O_NOFOLLOW;
            }
            match openat2_in_root(self.root.as_raw_fd(), path, flags) {
                Ok(fd) => return Ok(fd),
                Err(e) if openat2_refused(&e) => {
                    tracing::warn!(error = %e, "openat2 refused: container paths are resolved by a component walk from now on");
                    OPENAT2_REFUSED.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => return Err(ConfinedError::io(label, e)),
            }
        }
        walk(self.root.as_raw_fd(), path, follow).map_err(|e| ConfinedError::io(label, e))
    }

    /// The file's bytes: `path` must resolve (inside the root) to a regular file of at most
    /// `max` bytes.
    pub fn read_file(&self, path: &str, max: u64) -> Result<Vec<u8>, ConfinedError> {
        let inside = self.absolute(path)?;
        let fd = self.resolve_as(&inside, path, true)?;
        let id = Identity::of(fd.as_raw_fd()).map_err(|e| ConfinedError::io(path, e))?;
        if id.mode != libc::S_IFREG {
            return Err(ConfinedError::NotRegular {
                path: path.into(),
                kind: id.kind(),
            });
        }
        if id.size > max {
            return Err(ConfinedError::TooLarge {
                path: path.into(),
                max,
            });
        }
        let file = reopen(&fd, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY)
            .map_err(|e| ConfinedError::io(path, e))?;
        let mut buf = Vec::new();
        std::fs::File::from(file)
            .take(max + 1)
            .read_to_end(&mut buf)
            .map_err(|e| ConfinedError::io(path, e))?;
        if buf.len() as u64 > max {
            // It grew while read.
            return Err(ConfinedError::TooLarge {
                path: path.into(),
                max,
            });
        }
        Ok(buf)
    }

    /// The directory `path` (inside the root), opened for listing.
    pub fn open_dir(&self, path: &str) -> Result<Dir, ConfinedError> {
        let inside = self.absolute(path)?;
        let fd = self.resolve_as(&inside, path, true)?;
        let id = Identity::of(fd.as_raw_fd()).map_err(|e| ConfinedError::io(path, e))?;
        if !id.is_dir() {
            return Err(ConfinedError::NotDirectory { path: path.into() });
        }
        let fd = reopen(&fd, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NONBLOCK)
            .map_err(|e| ConfinedError::io(path, e))?;
        Ok(Dir { fd })
    }

    /// `statfs(2)`'s `f_type` of the filesystem holding `path` (inside the root), from its
    /// nearest existing ancestor: a log dir the broker has yet to create is made on its parent's
    /// filesystem.
    pub fn filesystem(&self, path: &str) -> Result<u64, ConfinedError> {
        let mut at = self.absolute(path)?;
        loop {
            match self.resolve_as(&at, path, true) {
                Ok(fd) => {
                    return fstatfs_type(fd.as_raw_fd()).map_err(|e| ConfinedError::io(path, e));
                }
                Err(e) if e.is_not_found() && at != "/" => {
                    at = match at.trim_end_matches('/').rsplit_once('/') {
                        Some(("", _)) | None => "/".into(),
                        Some((parent, _)) => parent.into(),
                    };
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// An open directory of a process, listed by its descriptor.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
}

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: Vec<u8>,
    /// `d_type` said directory (or, where the filesystem does not say, `fstatat` did).
    pub is_dir: bool,
}

impl Entry {
    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

impl Dir {
    /// At most `max` entries (`.` and `..` left out); whether there were more.
    pub fn entries(&self, max: usize) -> std::io::Result<(Vec<Entry>, bool)> {
        // SAFETY: dup of a descriptor we own; the new one is handed to fdopendir below.
        let dup = unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `dup` is a fresh descriptor of a directory; fdopendir takes it over (closed by
        // closedir below), or leaves it to us on failure.
        let dir = unsafe { libc::fdopendir(dup) };
        if dir.is_null() {
            let e = std::io::Error::last_os_error();
            // SAFETY: fdopendir failed, so `dup` is still ours to close.
            unsafe { libc::close(dup) };
            return Err(e);
        }
        // The descriptor's position is shared with every dup of it: from the start each time.
        // SAFETY: `dir` is a valid DIR*.
        unsafe { libc::rewinddir(dir) };
        let mut out = Vec::new();
        let mut more = false;
        loop {
            // SAFETY: `dir` is a valid DIR* until closedir below.
            let ent = unsafe { libc::readdir64(dir) };
            if ent.is_null() {
                break;
            }
            // SAFETY: readdir returned a valid entry whose d_name is NUL-terminated; it stays
            // valid until the next readdir on `dir`, and is copied out before that.
            let (name, d_type) = unsafe {
                (
                    CStr::from_ptr((*ent).d_name.as_ptr()).to_bytes().to_vec(),
                    (*ent).d_type,
                )
            };
            if name == b"." || name == b".." {
                continue;
            }
            if out.len() == max {
                more = true;
                break;
            }
            let is_dir = match d_type {
                libc::DT_DIR => true,
                libc::DT_UNKNOWN => self.child_identity(&name).is_ok_and(Identity::is_dir),
                _ => false,
            };
            out.push(Entry { name, is_dir });
        }
        // SAFETY: `dir` came from fdopendir and is closed once.
        unsafe { libc::closedir(dir) };
        Ok((out, more))
    }

    fn child_identity(&self, name: &[u8]) -> std::io::Result<Identity> {
        let fd = self.open_child(name, libc::O_PATH)?;
        Identity::of(fd.as_raw_fd())
    }

    fn open_child(&self, name: &[u8], flags: i32) -> std::io::Result<OwnedFd> {
        if name.is_empty() || name.contains(&b'/') || name == b"." || name == b".." {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        let c = CString::new(name).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        openat_raw(
            self.fd.as_raw_fd(),
            &c,
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    }

    /// The entry `name` as a directory: one component, never a symlink.
    pub fn child_dir(&self, name: &[u8]) -> std::io::Result<Dir> {
        let fd = self.open_child(name, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NONBLOCK)?;
        Ok(Dir { fd })
    }
}

/// `openat2` refused once: the walk from then on.
static OPENAT2_REFUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn openat2_usable() -> bool {
    !OPENAT2_REFUSED.load(std::sync::atomic::Ordering::Relaxed)
}

/// ENOSYS: kernel or seccomp without it; EPERM: a seccomp profile refusing it. (openat2 itself
/// never answers EPERM for a path: permission is EACCES.)
fn openat2_refused(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM))
}

fn openat2_in_root(root: RawFd, path: &str, flags: i32) -> std::io::Result<OwnedFd> {
    let c = CString::new(path).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: all zeroes is a valid open_how (plain integers).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `root` is an open directory descriptor, `c` a NUL-terminated path and `how` a
    // valid open_how whose size is passed; the kernel reads both only during the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Resolves `path` from `root` one component at a time, as `RESOLVE_IN_ROOT` does: `..` never
/// climbs above `root`, symlinks are read as text and resolved inside `root` (absolute ones from
/// `root`), at most [`MAX_SYMLINKS`] of them. Never follows a magic link magically: its text is
/// resolved like any other link's.
fn walk(root: RawFd, path: &str, follow: bool) -> std::io::Result<OwnedFd> {
    let mut stack: Vec<OwnedFd> = Vec::new();
    let mut pending: std::collections::VecDeque<Vec<u8>> = split(path.as_bytes()).collect();
    let mut links = 0u32;
    while let Some(name) = pending.pop_front() {
        if name == b".." {
            stack.pop();
            continue;
        }
        let dir = stack.last().map_or(root, |fd| fd.as_raw_fd());
        let c = CString::new(name).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        let fd = openat_raw(dir, &c, libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)?;
        let id = Identity::of(fd.as_raw_fd())?;
        let last = pending.is_empty();
        if id.is_symlink() && (!last || follow) {
            links += 1;
            if links > MAX_SYMLINKS {
                return Err(std::io::Error::from_raw_os_error(libc::ELOOP));
            }
            let target = readlink_fd(fd.as_raw_fd())?;
            if target.first() == Some(&b'/') {
                stack.clear();
            }
            for part in split(&target).collect::<Vec<_>>().into_iter().rev() {
                pending.push_front(part);
            }
            continue;
        }
        if !last && !id.is_dir() {
            return Err(std::io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        stack.push(fd);
    }
    match stack.pop() {
        Some(fd) => Ok(fd),
        // The root itself.
        None => openat_raw(root, c".", libc::O_PATH | libc::O_CLOEXEC),
    }
}

/// The components of a path, `.` and empty ones dropped.
fn split(path: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    path.split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(<[u8]>::to_vec)
}

fn readlink_fd(fd: RawFd) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; MAX_PATH];
    // SAFETY: `fd` is an O_PATH descriptor of a symlink; the empty path names it; `buf` is
    // writable for its length.
    let n = unsafe { libc::readlinkat(fd, c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn openat_raw(dir: RawFd, name: &CStr, flags: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: `dir` is an open directory descriptor (or AT_FDCWD) and `name` NUL-terminated.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_raw(path: &str, flags: i32) -> std::io::Result<OwnedFd> {
    let c = CString::new(path).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    openat_raw(libc::AT_FDCWD, &c, flags | libc::O_CLOEXEC)
}

/// Opens the inode behind an `O_PATH` descriptor for real, through `/proc/self/fd`: the same
/// inode by construction, whatever the path it was found by has become since.
fn reopen(fd: &OwnedFd, flags: i32) -> std::io::Result<OwnedFd> {
    let path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    let c = CString::new(OsStr::as_bytes(path.as_os_str()))
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let file = openat_raw(libc::AT_FDCWD, &c, flags | libc::O_CLOEXEC)?;
    let (a, b) = (
        Identity::of(fd.as_raw_fd())?,
        Identity::of(file.as_raw_fd())?,
    );
    if (a.dev, a.ino) != (b.dev, b.ino) {
        return Err(std::io::Error::other("reopened another file"));
    }
    Ok(file)
}

fn fstatfs_type(fd: RawFd) -> std::io::Result<u64> {
    // SAFETY: all zeroes is a valid `statfs` (plain integers).
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open (O_PATH) descriptor and `buf` a valid, writable statfs.
    if unsafe { libc::fstatfs(fd, &mut buf) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(buf.f_type as u64)
}

#[cfg(test)]
mod tests;
