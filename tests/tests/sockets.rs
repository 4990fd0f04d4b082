//! TCP sockets, end to end: real loopback connections counted by the real kernel program and
//! read back over mTLS from /metrics.

use std::{
    io::Write as _,
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    time::Duration,
};

use brokerscope_tests::{Agent, eventually, find_sample, own_netns, privileged};

/// These tests use plain listeners, not brokers: count every listener on the node.
const WATCH_ALL: &str = "[probes]\nwatch_all_listeners = true\n";

/// In watch-all mode each test's agent also sees the other tests' connections. Counts per port
/// stay exact regardless, but node-wide figures (map fill, map-full errors) need the tests of
/// this file to run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn counters(agent: &Agent, netns: &str, port: &str) -> (Option<f64>, Option<f64>, Option<f64>) {
    let labels = [("netns", netns), ("port", port)];
    let (code, body) = agent.get("/metrics");
    assert_eq!(code, 200);
    (
        brokerscope_tests::find_sample(&body, "brokerscope_connections_accepted_total", &labels),
        brokerscope_tests::find_sample(&body, "brokerscope_connections_active", &labels),
        brokerscope_tests::find_sample(&body, "brokerscope_connections_closed_total", &labels),
    )
}

/// Closes with RST instead of FIN (SO_LINGER 0): the socket goes ESTABLISHED -> CLOSE at once.
fn reset(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket fd and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER");
    drop(stream);
}

#[test]
fn accepted_active_and_closed_are_exact_per_port() {
    if !privileged("accepted_active_and_closed_are_exact_per_port") {
        return;
    }
    let _serial = serial();
    const N: usize = 40;
    const CLOSED_FIN: usize = 10;
    const CLOSED_RST: usize = 5;

    let agent = Agent::start(WATCH_ALL);
    agent.wait_ready();

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let netns = own_netns().to_string();

    // Before any connection the listener is unknown to the agent: nothing is invented.
    assert_eq!(counters(&agent, &netns, &port), (None, None, None));

    let mut pairs = Vec::new();
    for _ in 0..N {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        pairs.push((client, server));
    }
    let want_open = (Some(N as f64), Some(N as f64), Some(0.0));
    eventually("N accepted", Duration::from_secs(10), || {
        (counters(&agent, &netns, &port) == want_open).then_some(())
    });

    // Orderly closes from the server side (FIN, TIME_WAIT hand-over) and from the client side
    // (CLOSE_WAIT -> LAST_ACK), then resets.
    for (i, (mut client, server)) in pairs.drain(..CLOSED_FIN).enumerate() {
        client.write_all(b"bye").unwrap();
        if i % 2 == 0 {
            drop(server);
            drop(client);
        } else {
            drop(client);
            drop(server);
        }
    }
    for (client, server) in pairs.drain(..CLOSED_RST) {
        reset(server);
        drop(client);
    }
    let closed = CLOSED_FIN + CLOSED_RST;
    let want = (
        Some(N as f64),
        Some((N - closed) as f64),
        Some(closed as f64),
    );
    eventually("closes counted", Duration::from_secs(10), || {
        (counters(&agent, &netns, &port) == want).then_some(())
    });

    // The client ends of those connections are active opens on ephemeral ports: never counted
    // as accepts anywhere. Scrape again: nothing moved.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        counters(&agent, &netns, &port),
        want,
        "counts must be stable"
    );

    drop(pairs);
    let all_closed = (Some(N as f64), Some(0.0), Some(N as f64));
    eventually("all closed", Duration::from_secs(10), || {
        (counters(&agent, &netns, &port) == all_closed).then_some(())
    });
}

#[test]
fn connections_open_before_the_agent_are_not_invented() {
    if !privileged("connections_open_before_the_agent_are_not_invented") {
        return;
    }
    let _serial = serial();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let netns = own_netns().to_string();
    let early_client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (early_server, _) = listener.accept().unwrap();

    let agent = Agent::start(WATCH_ALL);
    agent.wait_ready();
    // Closing a connection the agent never saw open is not a close either.
    drop(early_server);
    drop(early_client);

    let late_client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (_late_server, _) = listener.accept().unwrap();
    let want = (Some(1.0), Some(1.0), Some(0.0));
    eventually("one accept", Duration::from_secs(10), || {
        (counters(&agent, &netns, &port) == want).then_some(())
    });
    drop(late_client);
}

/// How a test connection ends.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Close {
    ServerFirst,
    ClientFirst,
    ServerReset,
    ClientReset,
}

/// Sends `len` bytes of a temporary file over `stream` with sendfile(2), Kafka's fetch path.
fn sendfile_all(stream: &TcpStream, len: usize) {
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&vec![7u8; len]).unwrap();
    let mut offset: libc::off_t = 0;
    while (offset as usize) < len {
        // SAFETY: valid fds; offset is a valid pointer for the call.
        let n = unsafe {
            libc::sendfile(
                stream.as_raw_fd(),
                std::os::fd::AsRawFd::as_raw_fd(&file),
                &mut offset,
                len - offset as usize,
            )
        };
        assert!(n > 0, "sendfile: {}", std::io::Error::last_os_error());
    }
}

#[test]
fn payload_bytes_resets_and_lifetimes_are_exact() {
    if !privileged("payload_bytes_resets_and_lifetimes_are_exact") {
        return;
    }
    let _serial = serial();
    use std::io::Read as _;
    const N: usize = 24;
    const SENDFILE_LEN: usize = (1 << 20) + 7;
    let agent = Agent::start(WATCH_ALL);
    agent.wait_ready();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let netns = own_netns().to_string();
    let labels = [("netns", netns.as_str()), ("port", port.as_str())];

    let (mut want_in, mut want_out, mut want_rst_sent, mut want_rst_received) = (0, 0, 0, 0);
    for i in 0..N {
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let request = vec![1u8; 1000 + 37 * i];
        client.write_all(&request).unwrap();
        let mut got = vec![0u8; request.len()];
        server.read_exact(&mut got).unwrap();
        // Every fourth connection answers with sendfile, the rest with write(2).
        let answer = if i % 4 == 3 {
            SENDFILE_LEN
        } else {
            5000 + 101 * i
        };
        if i % 4 == 3 {
            sendfile_all(&server, answer);
        } else {
            server.write_all(&vec![2u8; answer]).unwrap();
        }
        let mut got = vec![0u8; answer];
        client.read_exact(&mut got).unwrap();
        want_in += request.len();
        want_out += answer;
        let close = [
            Close::ServerFirst,
            Close::ClientFirst,
            Close::ServerReset,
            Close::ClientReset,
        ][i % 4];
        match close {
            Close::ServerFirst => {
                drop(server);
                let mut rest = Vec::new();
                client.read_to_end(&mut rest).unwrap();
                drop(client);
            }
            Close::ClientFirst => {
                drop(client);
                let mut rest = Vec::new();
                server.read_to_end(&mut rest).unwrap();
                drop(server);
            }
            Close::ServerReset => {
                reset(server);
                want_rst_sent += 1;
                drop(client);
            }
            Close::ClientReset => {
                reset(client);
                want_rst_received += 1;
                // Wait for the RST to land before closing our end.
                let mut rest = Vec::new();
                let _ = server.read_to_end(&mut rest);
                drop(server);
            }
        }
    }

    eventually("all closed", Duration::from_secs(10), || {
        let closed = agent.metric("brokerscope_connections_closed_total", &labels);
        (closed == Some(N as f64)).then_some(())
    });
    let (code, body) = agent.get("/metrics");
    assert_eq!(code, 200);
    let get = |name: &str| find_sample(&body, name, &labels);
    assert_eq!(
        get("brokerscope_connections_accepted_total"),
        Some(N as f64)
    );
    assert_eq!(get("brokerscope_connections_active"), Some(0.0));
    assert_eq!(
        get("brokerscope_bytes_received_total"),
        Some(want_in as f64),
        "exact bytes in"
    );
    assert_eq!(
        get("brokerscope_bytes_sent_total"),
        Some(want_out as f64),
        "exact bytes out"
    );
    assert_eq!(
        get("brokerscope_tcp_resets_sent_total"),
        Some(want_rst_sent as f64)
    );
    assert_eq!(
        get("brokerscope_tcp_resets_received_total"),
        Some(want_rst_received as f64)
    );
    // No assertion on retransmits here: on a loaded machine a tail-loss probe can fire on
    // loopback too. The retransmit test drops packets on purpose and compares with the kernel.
    assert_eq!(
        get("brokerscope_connection_duration_seconds_count"),
        Some(N as f64)
    );
    let rtt = get("brokerscope_tcp_rtt_seconds_count").unwrap();
    assert!(
        rtt >= 1.0 && rtt <= N as f64,
        "one RTT sample per connection at most: {rtt}"
    );
}

#[test]
fn open_connections_show_live_bytes_and_earlier_ones_are_adopted() {
    if !privileged("open_connections_show_live_bytes_and_earlier_ones_are_adopted") {
        return;
    }
    let _serial = serial();
    use std::io::Read as _;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let netns = own_netns().to_string();
    let labels = [("netns", netns.as_str()), ("port", port.as_str())];

    // Opened, and used, before the agent starts: this history must never be counted.
    let mut early_client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut early_server, _) = listener.accept().unwrap();
    early_client.write_all(&[0u8; 100_000]).unwrap();
    early_server.read_exact(&mut vec![0u8; 100_000]).unwrap();

    let agent = Agent::start(WATCH_ALL);
    agent.wait_ready();
    let mut late_client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut late_server, _) = listener.accept().unwrap();
    // The listener now has counters; the next scrape's iterator adopts the early connection.
    eventually("early connection adopted", Duration::from_secs(10), || {
        (agent.metric("brokerscope_connections_active", &labels) == Some(2.0)).then_some(())
    });
    assert_eq!(
        agent.metric("brokerscope_connections_accepted_total", &labels),
        Some(1.0)
    );

    // Traffic on both, connections still open: the iterator reports it live.
    early_client.write_all(&[1u8; 777]).unwrap();
    early_server.read_exact(&mut [0u8; 777]).unwrap();
    early_server.write_all(&[2u8; 555]).unwrap();
    early_client.read_exact(&mut [0u8; 555]).unwrap();
    late_client.write_all(&[3u8; 1234]).unwrap();
    late_server.read_exact(&mut [0u8; 1234]).unwrap();
    late_server.write_all(&[4u8; 4321]).unwrap();
    late_client.read_exact(&mut [0u8; 4321]).unwrap();
    let want = (Some(777.0 + 1234.0), Some(555.0 + 4321.0));
    let (code, body) = agent.get("/metrics");
    assert_eq!(code, 200);
    let got = (
        find_sample(&body, "brokerscope_bytes_received_total", &labels),
        find_sample(&body, "brokerscope_bytes_sent_total", &labels),
    );
    assert_eq!(got, want, "live bytes of open connections, exact");

    // Closing hands the bytes from the iterator to the closed totals: nothing moves.
    drop((early_client, early_server, late_client, late_server));
    eventually("both closed", Duration::from_secs(10), || {
        (agent.metric("brokerscope_connections_closed_total", &labels) == Some(2.0)).then_some(())
    });
    let (_, body) = agent.get("/metrics");
    assert_eq!(
        find_sample(&body, "brokerscope_connections_active", &labels),
        Some(0.0)
    );
    assert_eq!(
        find_sample(&body, "brokerscope_bytes_received_total", &labels),
        want.0
    );
    assert_eq!(
        find_sample(&body, "brokerscope_bytes_sent_total", &labels),
        want.1
    );
    // Only the accepted connection's lifetime is known.
    assert_eq!(
        find_sample(
            &body,
            "brokerscope_connection_duration_seconds_count",
            &labels
        ),
        Some(1.0)
    );
}

/// `ss -tlnm` reports a listening socket's drop counter as `d<N>` in its skmem.
fn ss_listen_drops(port: &str) -> u64 {
    let out = std::process::Command::new("ss")
        .args(["-tlnmH", &format!("sport = :{port}")])
        .output()
        .expect("ss (iproute2) is installed by cargo xtask setup");
    let text = String::from_utf8_lossy(&out.stdout);
    let skmem = text
        .split("skmem:(")
        .nth(1)
        .unwrap_or_else(|| panic!("no skmem: {text}"));
    skmem
        .split([',', ')'])
        .find_map(|f| f.strip_prefix('d').and_then(|n| n.parse().ok()))
        .unwrap_or_else(|| panic!("no drop count in {skmem}"))
}

#[test]
fn listen_drops_match_the_kernels_own_count() {
    if !privileged("listen_drops_match_the_kernels_own_count") {
        return;
    }
    let _serial = serial();
    let agent = Agent::start(WATCH_ALL);
    agent.wait_ready();
    // Backlog 1 and nobody accepting: the accept queue overflows.
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    // SAFETY: listen(2) on a valid socket fd, shrinking its backlog.
    assert_eq!(unsafe { libc::listen(socket.as_raw_fd(), 1) }, 0);
    let port = addr.port().to_string();
    let netns = own_netns().to_string();
    let labels = [("netns", netns.as_str()), ("port", port.as_str())];

    // One accepted connection gives the listener counters (watch-all only counts listeners that
    // accepted something).
    let first = TcpStream::connect(addr).unwrap();
    let (first_server, _) = socket.accept().unwrap();
    let mut clients = Vec::new();
    for _ in 0..8 {
        if let Ok(c) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            clients.push(c);
        }
    }
    let drops = eventually("drops seen", Duration::from_secs(10), || {
        let ours = agent.metric("brokerscope_listen_drops_total", &labels)? as u64;
        let kernel = ss_listen_drops(&port);
        (ours > 0 && ours == kernel).then_some(ours)
    });
    assert!(drops > 0);
    drop((clients, first, first_server));
}

/// Resident memory of a process, from /proc/<pid>/status.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_full_connection_map_counts_what_it_cannot_track_and_stays_bounded() {
    if !privileged("a_full_connection_map_counts_what_it_cannot_track_and_stays_bounded") {
        return;
    }
    let _serial = serial();
    const CAPACITY: usize = 64;
    const FLOOD: usize = 400;
    let agent = Agent::start(&format!(
        "{WATCH_ALL}connections_capacity = {CAPACITY}\nlisteners_capacity = 64\n"
    ));
    agent.wait_ready();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let netns = own_netns().to_string();
    let labels = [("netns", netns.as_str()), ("port", port.as_str())];
    let rss_before = rss_kib(agent.pid());

    // Tests here run one at a time (see SERIAL), and the agent ignores its own scrapes: the
    // connection map holds only this flood.
    let mut held = Vec::new();
    for _ in 0..FLOOD {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        held.push((client, server));
    }
    let full = [("kind", "connections_map_full")];
    eventually("flood counted", Duration::from_secs(10), || {
        let accepted = agent.metric("brokerscope_connections_accepted_total", &labels)?;
        (accepted == FLOOD as f64).then_some(())
    });
    // Watch-all mode also sees whatever else on the node accepts connections meanwhile (CI
    // runs nothing else; a developer machine may), so the figures are bounded by the map, and
    // our own untracked connections are all in the error count.
    let (_, body) = agent.get("/metrics");
    let tracked = find_sample(&body, "brokerscope_connections_active", &labels).unwrap();
    let errors = find_sample(&body, "brokerscope_probe_errors_total", &full).unwrap();
    assert!(
        tracked <= CAPACITY as f64 && tracked > 0.0,
        "tracked {tracked}"
    );
    assert!(
        errors >= FLOOD as f64 - tracked,
        "{errors} map-full errors for {tracked} tracked"
    );
    assert_eq!(
        find_sample(&body, "brokerscope_map_entries", &[("map", "connections")]),
        Some(CAPACITY as f64),
        "the map is full, not over-full"
    );

    drop(held);
    eventually("tracked ones closed", Duration::from_secs(10), || {
        let closed = agent.metric("brokerscope_connections_closed_total", &labels)?;
        (closed == tracked).then_some(())
    });
    assert_eq!(
        agent.metric("brokerscope_connections_active", &labels),
        Some(0.0)
    );
    // The map is preallocated: the flood did not grow the agent.
    let rss_after = rss_kib(agent.pid());
    assert!(
        rss_after < rss_before + 8 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}

#[test]
fn a_thousand_concurrent_short_connections_are_counted_exactly() {
    if !privileged("a_thousand_concurrent_short_connections_are_counted_exactly") {
        return;
    }
    let _serial = serial();
    use std::io::Read as _;
    const N: usize = 1000;
    let agent = Agent::start(WATCH_ALL);
    agent.wait_ready();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let port = addr.port().to_string();
    let netns = own_netns().to_string();
    let labels = [("netns", netns.as_str()), ("port", port.as_str())];

    let server = std::thread::spawn(move || {
        let mut handlers = Vec::new();
        for _ in 0..N {
            let (mut s, _) = listener.accept().unwrap();
            handlers.push(std::thread::spawn(move || {
                let mut request = [0u8; 64];
                s.read_exact(&mut request).unwrap();
                s.write_all(&[9u8; 128]).unwrap();
            }));
        }
        for h in handlers {
            h.join().unwrap();
        }
    });
    let clients: Vec<_> = (0..N)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = TcpStream::connect(addr).unwrap();
                c.write_all(&[8u8; 64]).unwrap();
                let mut answer = [0u8; 128];
                c.read_exact(&mut answer).unwrap();
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    server.join().unwrap();
    let want = (Some(N as f64), Some(N as f64));
    eventually("all counted", Duration::from_secs(15), || {
        let closed = agent.metric("brokerscope_connections_closed_total", &labels);
        let accepted = agent.metric("brokerscope_connections_accepted_total", &labels);
        ((accepted, closed) == want).then_some(())
    });
    let (_, body) = agent.get("/metrics");
    assert_eq!(
        find_sample(&body, "brokerscope_bytes_received_total", &labels),
        Some(64.0 * N as f64)
    );
    assert_eq!(
        find_sample(&body, "brokerscope_bytes_sent_total", &labels),
        Some(128.0 * N as f64)
    );
    assert_eq!(
        find_sample(&body, "brokerscope_connections_active", &labels),
        Some(0.0)
    );
}
