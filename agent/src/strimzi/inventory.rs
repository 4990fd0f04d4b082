//! The inventory of a process's log segments: the `*.log` files under its log dirs when the
//! agent first saw it, counted down as the broker is seen opening them.

use std::collections::HashMap;

use super::view::Recovery;
use crate::files::ProcessRoot;

/// Segments tracked by path per process; beyond it the rest are counted but cannot be seen
/// opened (recovery then ends by [`QUIET`](super::derive::QUIET)).
pub const MAX_SEGMENTS: usize = 200_000;
/// Directory entries read per log dir and per partition dir while taking the inventory.
const MAX_DIR_ENTRIES: usize = 200_000;
/// Directory entries read in all for one inventory.
const MAX_LISTED: usize = 2_000_000;

/// Log segments found under a process's log dirs when the agent first saw it.
#[derive(Debug, Default)]
pub(super) struct Inventory {
    /// Segment path as the broker sees it -> index of its log.
    pub(super) segments: HashMap<String, usize>,
    /// Unopened segments per log.
    remaining_per_log: Vec<u32>,
    pub(super) logs_remaining: u32,
    pub(super) segments_remaining: u32,
    /// Log dirs as configured, without a trailing slash.
    log_dirs: Vec<String>,
}

impl Inventory {
    /// Partition directories (logs) holding at least one `*.log` file (segments), under every
    /// log dir, listed inside the process's own root (see [`crate::files::confine`]): a log dir
    /// that is a link out of it, or a partition that is a link at all, is not followed. At most
    /// [`MAX_DIR_ENTRIES`] entries per directory and [`MAX_LISTED`] in all. Slow on a large or
    /// hung filesystem: it runs on a file worker, never under the tracker's lock.
    pub(super) fn take(root: &ProcessRoot, log_dirs: &[String]) -> Self {
        let mut inv = Inventory {
            log_dirs: log_dirs
                .iter()
                .map(|d| {
                    let t = d.trim_end_matches('/');
                    if t.is_empty() { "/".into() } else { t.into() }
                })
                .collect(),
            ..Inventory::default()
        };
        let mut listed = 0usize;
        for dir in inv.log_dirs.clone() {
            let Ok(logs) = root.open_dir(&dir) else {
                continue;
            };
            let Ok((parts, _)) = logs.entries(MAX_DIR_ENTRIES.min(MAX_LISTED - listed)) else {
                continue;
            };
            listed += parts.len();
            for part in parts.iter().filter(|p| p.is_dir) {
                if listed >= MAX_LISTED {
                    break;
                }
                let Ok(files) = logs
                    .child_dir(&part.name)
                    .and_then(|d| d.entries(MAX_DIR_ENTRIES.min(MAX_LISTED - listed)))
                else {
                    continue;
                };
                listed += files.0.len();
                let part_name = part.name_lossy();
                let mut count = 0u32;
                for file in &files.0 {
                    if !file.name.ends_with(b".log") {
                        continue;
                    }
                    if inv.segments.len() < MAX_SEGMENTS {
                        let log = inv.remaining_per_log.len();
                        inv.segments
                            .insert(format!("{dir}/{part_name}/{}", file.name_lossy()), log);
                    }
                    count += 1;
                }
                if count > 0 {
                    inv.remaining_per_log.push(count);
                    inv.logs_remaining += 1;
                    inv.segments_remaining += count;
                }
            }
        }
        inv
    }

    /// Marks a segment opened; whether it was one not opened before.
    pub(super) fn opened(&mut self, path: &str) -> bool {
        let Some(log) = self.segments.remove(path) else {
            return false;
        };
        self.segments_remaining = self.segments_remaining.saturating_sub(1);
        if let Some(left) = self.remaining_per_log.get_mut(log) {
            *left = left.saturating_sub(1);
            if *left == 0 {
                self.logs_remaining = self.logs_remaining.saturating_sub(1);
            }
        }
        true
    }

    /// A log dir itself, or anything under one.
    pub(super) fn in_log_dirs(&self, path: &str) -> bool {
        self.log_dirs.iter().any(|d| d == path) || self.under_log_dirs(path)
    }

    pub(super) fn under_log_dirs(&self, path: &str) -> bool {
        self.log_dirs.iter().any(|d| {
            path.strip_prefix(d.as_str())
                .is_some_and(|r| r.starts_with('/'))
        })
    }

    pub(super) fn recovery(&self) -> Recovery {
        let fit = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
        Recovery {
            remaining_logs_to_recover: fit(self.logs_remaining),
            remaining_segments_to_recover: fit(self.segments_remaining),
        }
    }
}
