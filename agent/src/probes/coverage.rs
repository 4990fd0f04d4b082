//! What the hooks cover and what the standby programs are wanted for: the filesystems whose
//! fsyncs are seen, and the demand that attaches standby programs.

use brokerscope_common::telemetry::Standby;

/// Which filesystems' fsyncs the attached hooks see (see [`super::Probes::fsync_cover`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsyncCover {
    /// The ext4 tracepoints: count and duration.
    pub ext4: bool,
    /// The XFS and Btrfs entry tracepoints: count only.
    pub xfs: bool,
    pub btrfs: bool,
}

impl FsyncCover {
    /// Whether an fsync of a file on `filesystem` (as discovery names it) is counted.
    pub fn covers(self, filesystem: &str) -> bool {
        match filesystem {
            "ext4" => self.ext4,
            "xfs" => self.xfs,
            "btrfs" => self.btrfs,
            _ => false,
        }
    }

    /// How the fsyncs of a file on `filesystem` are measured: `count+duration`, `count`, or
    /// `not measured`.
    pub fn measures(self, filesystem: &str) -> &'static str {
        if filesystem == "ext4" && self.ext4 {
            "count+duration"
        } else if self.covers(filesystem) {
            "count"
        } else {
            "not measured"
        }
    }
}

/// What the standby programs are needed for, now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Demand {
    /// Some running broker is STARTING or in RECOVERY (see [`Standby::BrokerStarting`]).
    pub broker_starting: bool,
    /// Some running broker has a log dir the filesystem fsync hooks do not cover.
    pub fsync_uncovered: bool,
}

impl Demand {
    pub(super) fn wants(self, standby: Standby) -> bool {
        match standby {
            Standby::BrokerStarting => self.broker_starting,
            Standby::FsyncUncovered => self.fsync_uncovered,
        }
    }
}
