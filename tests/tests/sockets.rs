//! TCP sockets, end to end: real loopback connections counted by the real kernel program and
//! read back over mTLS from /metrics.

use std::{
    io::Write as _,
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    time::Duration,
};

use brokerscope_tests::{Agent, eventually, own_netns, privileged};

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
    const N: usize = 40;
    const CLOSED_FIN: usize = 10;
    const CLOSED_RST: usize = 5;

    let agent = Agent::start("");
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
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let netns = own_netns().to_string();
    let early_client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (early_server, _) = listener.accept().unwrap();

    let agent = Agent::start("");
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
