//! Who holds a port the endpoint cannot bind, for the error that says so. The port-clash check
//! against brokers' ports is `config::isolation`'s.

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
    for pid in crate::proc::ProcFs::default().pids().ok()? {
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
    if crate::strimzi::listen_port(line)? != port {
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
