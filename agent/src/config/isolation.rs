//! The control endpoint stays off the brokers' data-plane ports: the check config validation
//! runs on `discovery.listener_ports` and start-up runs on discovered listeners. Pure: it reads
//! nothing (who holds a busy port is `server::isolation`'s).

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
