//! Which Linux capabilities the agent runs with, checked once at start against what each part
//! needs, so a DaemonSet that withholds one is told which, and what it costs, in one log line
//! (rather than a bare EPERM from deep inside discovery or the loader).
//!
//! Owns only the reading of `/proc/self/status`; it changes nothing. The set was found by
//! experiment (docs/kubernetes.md, "Capabilities: found by experiment"; the runc test in
//! tests/tests/image.rs).

/// A capability the agent uses, by number (linux/capability.h) and name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    pub bit: u32,
    pub name: &'static str,
}

pub const CAP_DAC_READ_SEARCH: Cap = Cap {
    bit: 2,
    name: "CAP_DAC_READ_SEARCH",
};
pub const CAP_SYS_PTRACE: Cap = Cap {
    bit: 19,
    name: "CAP_SYS_PTRACE",
};
pub const CAP_SYS_ADMIN: Cap = Cap {
    bit: 21,
    name: "CAP_SYS_ADMIN",
};
pub const CAP_PERFMON: Cap = Cap {
    bit: 38,
    name: "CAP_PERFMON",
};
pub const CAP_BPF: Cap = Cap {
    bit: 39,
    name: "CAP_BPF",
};

/// One need: satisfied when any of `any_of` is effective.
pub struct Need {
    pub any_of: &'static [Cap],
    /// What is lost without it.
    pub lost: &'static str,
}

/// Everything the agent needs beyond an unprivileged process. The kernel takes CAP_SYS_ADMIN
/// wherever it asks for CAP_BPF (`bpf_capable`) or CAP_PERFMON (`perfmon_capable`), so a set
/// with CAP_SYS_ADMIN, which `setns` needs anyway, needs neither.
pub const NEEDS: &[Need] = &[
    Need {
        any_of: &[CAP_BPF, CAP_SYS_ADMIN],
        lost: "loading the kernel programs and reading their maps (no kernel counters; no broker reads RUNNING)",
    },
    Need {
        any_of: &[CAP_PERFMON, CAP_SYS_ADMIN],
        lost: "attaching tracepoint programs (no kernel counters; no broker reads RUNNING)",
    },
    Need {
        any_of: &[CAP_SYS_ADMIN],
        lost: "entering brokers' network namespaces (setns) to sweep their open connections at the first scrape",
    },
    Need {
        any_of: &[CAP_SYS_PTRACE],
        lost: "brokers' /proc/<pid>/root, cwd, fd and ns when they run as another user or with capabilities (no properties, listeners, log dirs or network namespace: brokers read UNKNOWN)",
    },
    Need {
        any_of: &[CAP_DAC_READ_SEARCH],
        lost: "brokers' /proc/<pid>/environ (mode 0400, the broker's own user): no pod names",
    },
];

/// The effective set from `/proc/self/status` (`CapEff:` in hex). Kept over procfs 0.18
/// `status()`: 30.5 µs vs 14.8 µs here, measured 2026-12-05 by `cargo xtask bench --procfs-only` (medians; this pid, pid 1).
pub fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_cap_eff(&status)
}

pub(crate) fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

/// Each need none of whose capabilities is in `effective`, with the capabilities to grant.
pub fn missing(effective: u64) -> Vec<(String, &'static str)> {
    NEEDS
        .iter()
        .filter(|n| n.any_of.iter().all(|c| effective & (1 << c.bit) == 0))
        .map(|n| {
            let names: Vec<&str> = n.any_of.iter().map(|c| c.name).collect();
            (names.join(" or "), n.lost)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(caps: &[Cap]) -> u64 {
        caps.iter().fold(0, |s, c| s | (1 << c.bit))
    }

    #[test]
    fn reads_the_effective_set() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
    }

    #[test]
    fn root_and_the_daemonset_set_miss_nothing() {
        assert!(missing(u64::MAX).is_empty());
        assert!(missing(set(&[CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH])).is_empty());
    }

    #[test]
    fn each_withheld_capability_is_named_with_what_it_costs() {
        let all = [CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH];
        let without = |cap: Cap| set(&all) & !(1 << cap.bit);
        let ptrace = missing(without(CAP_SYS_PTRACE));
        assert_eq!(ptrace.len(), 1);
        assert_eq!(ptrace[0].0, "CAP_SYS_PTRACE");
        assert!(ptrace[0].1.contains("/proc/<pid>/root"));
        assert_eq!(
            missing(without(CAP_DAC_READ_SEARCH))[0].0,
            "CAP_DAC_READ_SEARCH"
        );
        // Without CAP_SYS_ADMIN, CAP_BPF and CAP_PERFMON still load and attach; setns is lost.
        let admin = missing(set(&[
            CAP_BPF,
            CAP_PERFMON,
            CAP_SYS_PTRACE,
            CAP_DAC_READ_SEARCH,
        ]));
        assert_eq!(admin.len(), 1);
        assert_eq!(admin[0].0, "CAP_SYS_ADMIN");
        assert!(admin[0].1.contains("setns"));
        let none = missing(0);
        assert_eq!(none.len(), NEEDS.len());
        assert_eq!(none[0].0, "CAP_BPF or CAP_SYS_ADMIN");
    }
}
