//! Network namespaces by inode: finding a handle to one, and running code inside it.
//!
//! BPF socket iterators see the namespace of the thread that creates them, so the loader enters
//! each watched namespace on a short-lived thread of its own; the agent's other threads never
//! change namespace.

use std::{
    collections::HashMap,
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("setns into network namespace {inode}: {source}")]
    Enter {
        inode: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("the namespace thread panicked")]
    Thread,
}

/// Remembers one process per namespace inode, so a handle can be opened without a /proc walk.
#[derive(Default)]
pub struct Namespaces {
    pid_of: HashMap<u32, u32>,
}

fn netns_inode(pid: u32) -> Option<u32> {
    crate::proc::ProcFs::default().netns(pid).ok()
}

impl Namespaces {
    /// An open handle for each inode that still has a process in it. `hints` are pids tried
    /// first; unknown inodes cost one walk of /proc.
    pub fn resolve(&mut self, inodes: &[u32], hints: &[u32]) -> Vec<(u32, File)> {
        for &pid in hints {
            if let Some(inode) = netns_inode(pid) {
                self.pid_of.insert(inode, pid);
            }
        }
        let missing = |map: &HashMap<u32, u32>, inode: &u32| {
            map.get(inode)
                .is_none_or(|&pid| netns_inode(pid) != Some(*inode))
        };
        if inodes.iter().any(|i| missing(&self.pid_of, i)) {
            self.pid_of
                .retain(|inode, pid| netns_inode(*pid) == Some(*inode));
            if let Ok(dir) = std::fs::read_dir("/proc") {
                for entry in dir.flatten() {
                    let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                        continue;
                    };
                    if let Some(inode) = netns_inode(pid).filter(|i| inodes.contains(i)) {
                        self.pid_of.entry(inode).or_insert(pid);
                    }
                }
            }
        }
        // Bounded: only namespaces still asked for are remembered.
        self.pid_of.retain(|inode, _| inodes.contains(inode));
        inodes
            .iter()
            .filter_map(|&inode| {
                let pid = *self.pid_of.get(&inode)?;
                let file = File::open(format!("/proc/{pid}/ns/net")).ok()?;
                // The process may have exited and its pid been reused meanwhile.
                (file.metadata().ok()?.ino() as u32 == inode).then_some((inode, file))
            })
            .collect()
    }
}

/// Runs `f` on a new thread that has entered the namespace `ns`.
pub fn run_in<T: Send>(ns: &File, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    let inode = ns.metadata().map(|m| m.ino() as u32).unwrap_or(0);
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on a valid namespace fd; it only changes this thread, which
                // exits when `f` returns.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(NetnsError::Enter {
                        inode,
                        source: std::io::Error::last_os_error(),
                    });
                }
                Ok(f())
            })
            .join()
            .map_err(|_| NetnsError::Thread)?
    })
}
