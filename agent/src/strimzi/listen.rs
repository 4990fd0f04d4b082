//! Whether a broker's listeners listen, read from `/proc/<pid>/net/tcp{,6}` of its network
//! namespace.

use std::{io::BufRead as _, time::Duration};

use crate::broker::Broker;

/// Lines of `/proc/<pid>/net/tcp{,6}` read per check (a broker with more sockets than this is
/// checked on the first ones; listeners come first in the kernel's hash order only by chance).
pub(crate) const MAX_TCP_LINES: usize = 200_000;

/// Whether every listener of a broker listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Listening {
    Yes,
    No,
    /// Cannot be told: why.
    Unknown(&'static str),
}

/// How long a listening check is reused.
pub const LISTEN_RECHECK: Duration = Duration::from_millis(250);

/// Kept over procfs 0.18 `tcp()`/`tcp6()`: as fast (6.68 ms both, the kernel's walk of the
/// socket table dominates) but it collects every line with no bound and cannot stop once the
/// ports are found; measured 2026-12-05 by `cargo xtask bench --procfs-only`.
///
/// Whether every configured listener port is in LISTEN in the broker's network namespace
/// (`/proc/<pid>/net/tcp{,6}` show the namespace of that process). A broker with no known
/// listener (config unreadable, no `discovery.listener_ports`) cannot be told.
pub(super) fn listening(broker: &Broker) -> Listening {
    let mut wanted = wanted_ports(broker);
    if wanted.is_empty() {
        return Listening::Unknown("no listener port known");
    }
    let mut read = false;
    for file in ["tcp", "tcp6"] {
        let path = format!("/proc/{}/net/{file}", broker.pid);
        let Ok(f) = std::fs::File::open(&path) else {
            continue;
        };
        read = true;
        for line in std::io::BufReader::new(f)
            .lines()
            .skip(1)
            .take(MAX_TCP_LINES)
            .map_while(Result::ok)
        {
            if let Some(port) = listen_port(&line) {
                wanted.retain(|&w| w != port);
                if wanted.is_empty() {
                    return Listening::Yes;
                }
            }
        }
    }
    if read {
        Listening::No
    } else {
        Listening::Unknown("listening sockets unreadable")
    }
}

/// The configured listener ports (0, an ephemeral port, cannot be checked).
pub(super) fn wanted_ports(broker: &Broker) -> Vec<u16> {
    let mut wanted: Vec<u16> = broker
        .listeners
        .iter()
        .map(|l| l.port)
        .filter(|&p| p != 0)
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    wanted
}

/// The local port of a `/proc/net/tcp{,6}` line in state LISTEN (`0A`).
pub(crate) fn listen_port(line: &str) -> Option<u16> {
    let mut fields = line.split_whitespace();
    let local = fields.nth(1)?;
    let state = fields.nth(1)?;
    if state != "0A" {
        return None;
    }
    let (_, port) = local.rsplit_once(':')?;
    u16::from_str_radix(port, 16).ok()
}
