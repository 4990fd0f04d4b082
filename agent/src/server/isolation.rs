//! The control endpoint stays off the brokers' data-plane ports.

use std::net::SocketAddr;

/// `server.listen` uses a port a broker serves on.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "server.listen port {port} is also a broker data-plane port (from {source_of_port}); \
     the control endpoint must listen on a port of its own"
)]
pub struct PortClash {
    pub port: u16,
    /// Where the clashing port came from, e.g. `discovery.listener_ports`.
    pub source_of_port: String,
}

/// Checks the endpoint's address against broker ports (from configuration now; discovered
/// listeners can be passed the same way later). Port 0 (ephemeral, tests) never clashes.
pub fn check_isolation(
    listen: SocketAddr,
    broker_ports: impl IntoIterator<Item = u16>,
    source_of_port: &str,
) -> Result<(), PortClash> {
    let port = listen.port();
    if port != 0 && broker_ports.into_iter().any(|p| p == port) {
        return Err(PortClash {
            port,
            source_of_port: source_of_port.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clashing_port_is_named_with_its_source() {
        let listen: SocketAddr = "0.0.0.0:9092".parse().unwrap();
        let err = check_isolation(listen, [9093, 9092], "discovery.listener_ports").unwrap_err();
        assert_eq!(
            err,
            PortClash {
                port: 9092,
                source_of_port: "discovery.listener_ports".into()
            }
        );
        assert!(err.to_string().contains("server.listen port 9092"), "{err}");
        assert_eq!(
            check_isolation("0.0.0.0:8443".parse().unwrap(), [9092], "x"),
            Ok(())
        );
        assert_eq!(
            check_isolation("127.0.0.1:0".parse().unwrap(), [0], "x"),
            Ok(())
        );
    }
}

/// Who listens on TCP `port` in the agent's network namespace, as `pid <pid> (<comm>)`, from
/// `/proc/net/tcp{,6}` (the listening socket's inode) and the processes' descriptors; None if
/// /proc does not tell (another user's process without the privilege to read its fds).
pub fn port_holder(port: u16) -> Option<String> {
    let inodes: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(|line| listening_inode(line, port))
                .collect::<Vec<_>>()
        })
        .collect();
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for pid in crate::discovery::proc::ProcFs::default().pids().ok()? {
        let dir = std::path::PathBuf::from(format!("/proc/{pid}"));
        let Ok(fds) = std::fs::read_dir(dir.join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| wanted.iter().any(|w| target.as_os_str() == w.as_str()))
        });
        if holds {
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            return Some(format!("pid {pid} ({})", comm.trim()));
        }
    }
    None
}

/// The inode of a `/proc/net/tcp` line's socket if it listens on `port`.
fn listening_inode(line: &str, port: u16) -> Option<String> {
    if crate::state::listen_port(line)? != port {
        return None;
    }
    line.split_whitespace().nth(9).map(str::to_string)
}

#[cfg(test)]
mod holder_tests {
    use super::*;

    #[test]
    fn the_holder_of_a_port_is_named() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let holder = port_holder(port).expect("this process listens");
        assert!(
            holder.starts_with(&format!("pid {} (", std::process::id())),
            "{holder}"
        );
        drop(listener);
        assert_eq!(port_holder(port), None);
    }
}
