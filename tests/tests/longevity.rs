//! Months on a node: counters that survive an agent's death (pinned maps and links adopted by
//! the next agent), listeners of stopped brokers released with their series, maps that return
//! to what is live.

use std::{
    net::TcpStream,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use brokerscope_tests::{
    Agent, FakeBroker, FakeBrokerSpec, NetNs, PinDir, discovery_config, eventually, fake_request,
    find_sample, privileged, wait_broker_running,
};

/// Bytes one fake-broker request puts on the wire each way: `R`, u32 N, u32 M, N bytes → M.
fn request_bytes(n: u32, m: u32) -> (u64, u64) {
    (9 + u64::from(n), u64::from(m))
}

const LABELS: [(&str, &str); 3] = [("broker", "1"), ("listener", "PLAINTEXT"), ("port", "9092")];

/// (accepted, closed, active, bytes received, bytes sent) of broker 1's listener.
fn counts(agent: &Agent) -> Option<[u64; 5]> {
    let (code, body) = agent.get("/metrics");
    assert_eq!(code, 200, "{body}");
    let get = |name: &str| find_sample(&body, name, &LABELS).map(|v| v as u64);
    Some([
        get("brokerscope_connections_accepted_total")?,
        get("brokerscope_connections_closed_total")?,
        get("brokerscope_connections_active")?,
        get("brokerscope_bytes_received_total")?,
        get("brokerscope_bytes_sent_total")?,
    ])
}

/// Client traffic to `addr` on a thread: one request per connection, until stopped. What it
/// did: connections, bytes the broker received, bytes it sent.
struct Traffic {
    stop: Arc<AtomicBool>,
    totals: Arc<[AtomicU64; 3]>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(addr: std::net::SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let totals: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
        let (s, t) = (stop.clone(), totals.clone());
        let thread = std::thread::spawn(move || {
            let mut i = 0u32;
            while !s.load(Ordering::SeqCst) {
                i += 1;
                let (n, m) = (100 + i % 977, 1000 + (i * 31) % 4096);
                let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                    .expect("connect to the broker");
                c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                fake_request(&mut c, n, m).expect("request");
                drop(c);
                let (r, w) = request_bytes(n, m);
                t[0].fetch_add(1, Ordering::SeqCst);
                t[1].fetch_add(r, Ordering::SeqCst);
                t[2].fetch_add(w, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Self {
            stop,
            totals,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> [u64; 3] {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("traffic thread");
        }
        [0, 1, 2].map(|i| self.totals[i].load(Ordering::SeqCst))
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn metric(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    agent.metric(name, labels)
}

#[test]
fn kill_9_and_restart_under_traffic_loses_no_count_and_counts_none_twice() {
    if !privileged("kill_9_and_restart_under_traffic_loses_no_count_and_counts_none_twice") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = discovery_config(dir.path(), "");
    let pins = PinDir::new();
    let mut first = Agent::start_pinned(&config, pins.clone());
    first.wait_ready();

    let props = dir.path().join("server.properties");
    std::fs::write(&props, "node.id=1\nlisteners=PLAINTEXT://:9092\n").unwrap();
    let ns = NetNs::new();
    let _veth = ns.veth("169.254.221.1/30", "169.254.221.2/30");
    let broker = FakeBroker::start(FakeBrokerSpec {
        netns: Some(&ns),
        ..FakeBrokerSpec::new(&props)
    });
    wait_broker_running(&first, "1", broker.pid);
    let addr: std::net::SocketAddr = "169.254.221.2:9092".parse().unwrap();

    // One connection lives across the restart, with a request on each side of it.
    let mut long = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    long.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    fake_request(&mut long, 4000, 40_000).unwrap();
    let traffic = Traffic::start(addr);
    let mut last = [0u64; 5];
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(now) = counts(&first) {
            last = now;
        }
    }
    assert!(last[0] > 1, "traffic counted before the kill: {last:?}");
    let since = metric(
        &first,
        "brokerscope_counters_start_time_seconds",
        &[("pinned", "true")],
    )
    .expect("counters start time");

    first.kill();
    // Connections made while no agent runs: the pinned programs count them.
    let down_before = traffic.totals[0].load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(800));
    let made_while_down = traffic.totals[0].load(Ordering::SeqCst) - down_before;
    assert!(made_while_down > 0);
    assert_eq!(pins.layouts().len(), 1, "pins stay after kill -9");

    let second = Agent::start_pinned(&config, pins.clone());
    second.wait_ready();
    wait_broker_running(&second, "1", broker.pid);
    let log = second.wait_for_log("adopting the pinned maps and links");
    assert!(log.contains(&pins.path().display().to_string()), "{log}");
    // Never below what the first agent reported.
    let resumed = counts(&second).expect("broker 1's counters after the restart");
    for i in [0, 1, 3, 4] {
        assert!(
            resumed[i] >= last[i],
            "counter {i} went back: {resumed:?} after {last:?}"
        );
    }
    assert!(
        resumed[0] >= last[0] + made_while_down,
        "connections made while down are counted: {resumed:?}, {last:?}, {made_while_down}"
    );
    fake_request(&mut long, 5000, 50_000).unwrap();
    let [connections, received, sent] = traffic.finish();
    drop(long);
    let (long_r, long_w) = {
        let (r1, w1) = request_bytes(4000, 40_000);
        let (r2, w2) = request_bytes(5000, 50_000);
        (r1 + r2, w1 + w2)
    };
    let want = [
        connections + 1,
        connections + 1,
        0,
        received + long_r,
        sent + long_w,
    ];
    eventually(
        "every connection and byte counted once",
        Duration::from_secs(10),
        || {
            let now = counts(&second)?;
            (now == want).then_some(())
        },
    );
    // The same counting, not a new one; the broker is the same broker.
    assert_eq!(
        metric(
            &second,
            "brokerscope_counters_start_time_seconds",
            &[("pinned", "true")]
        ),
        Some(since)
    );
    assert_eq!(
        metric(
            &second,
            "brokerscope_broker_restarts_total",
            &[("broker", "1")]
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &second,
            "brokerscope_probe_errors_total",
            &[("kind", "map_full")]
        )
        .unwrap_or(0.0),
        0.0
    );
    eprintln!(
        "{connections} connections ({made_while_down} while no agent ran), {received} bytes \
         received, {sent} sent: all counted once"
    );

    // The broker restarts while no agent runs: the next agent counts that restart, and the
    // listener (same namespace and port) continues its counts.
    let mut second = second;
    second.kill();
    broker.kill();
    let broker = FakeBroker::start(FakeBrokerSpec {
        netns: Some(&ns),
        ..FakeBrokerSpec::new(&props)
    });
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    fake_request(&mut c, 10, 20).unwrap();
    drop(c);
    let third = Agent::start_pinned(&config, pins.clone());
    wait_broker_running(&third, "1", broker.pid);
    assert_eq!(
        metric(
            &third,
            "brokerscope_broker_restarts_total",
            &[("broker", "1")]
        ),
        Some(1.0)
    );
    let (r, w) = request_bytes(10, 20);
    let want = [want[0] + 1, want[1] + 1, 0, want[3] + r, want[4] + w];
    eventually(
        "the restarted broker's connection",
        Duration::from_secs(10),
        || (counts(&third)? == want).then_some(()),
    );
}

/// The series of `/metrics` (sample lines), without the agent's own HTTP figures, which grow
/// with the scrapes themselves; `broker_info` by its name alone (its labels name the current
/// process and namespace).
fn series(body: &str) -> Vec<String> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("brokerscope_http_"))
        .map(|l| l.rsplit_once(' ').map_or(l, |(name, _)| name))
        .map(|s| match s.split_once('{') {
            Some(("brokerscope_broker_info", _)) => "brokerscope_broker_info".to_string(),
            _ => s.to_string(),
        })
        .collect()
}

#[test]
fn a_stopped_brokers_listeners_are_released_with_their_series_after_the_grace_period() {
    if !privileged(
        "a_stopped_brokers_listeners_are_released_with_their_series_after_the_grace_period",
    ) {
        return;
    }
    const CYCLES: usize = 20;
    // Longer than the restarts take (about 10 s here), so the stopped listeners are all still
    // held when the last broker runs.
    const GRACE_S: u64 = 20;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&discovery_config(
        dir.path(),
        &format!("[probes]\nlistener_release_seconds = {GRACE_S}\n"),
    ));
    agent.wait_ready();
    let props = dir.path().join("server.properties");
    std::fs::write(&props, "node.id=2\nlisteners=PLAINTEXT://:9092\n").unwrap();
    let addr: std::net::SocketAddr = "169.254.222.2:9092".parse().unwrap();
    // A broker pod restarted again and again, each time in a new network namespace, with a
    // connection each time (a listener without counters has no series).
    // The old namespaces are kept until the end: a namespace's inode number is reused once it
    // is freed, and a listener is (namespace inode, port), so freed ones could make all the
    // restarts one listener.
    let mut live = None;
    let mut old_namespaces = Vec::new();
    let mut after_first = None;
    let mut first_stop = None;
    for cycle in 0..CYCLES {
        if let Some((broker, veth, ns)) = live.take() {
            drop((broker, veth));
            first_stop.get_or_insert_with(std::time::Instant::now);
            old_namespaces.push(ns);
        }
        let ns = NetNs::new();
        let veth = ns.veth("169.254.222.1/30", "169.254.222.2/30");
        let broker = FakeBroker::start(FakeBrokerSpec {
            netns: Some(&ns),
            ..FakeBrokerSpec::new(&props)
        });
        wait_broker_running(&agent, "2", broker.pid);
        let labels = [("broker", "2"), ("listener", "PLAINTEXT"), ("port", "9092")];
        let closed = |agent: &Agent| {
            let (_, body) = agent.get("/metrics");
            find_sample(&body, "brokerscope_connections_closed_total", &labels)
        };
        assert_eq!(
            closed(&agent),
            None,
            "a new namespace's listener starts without series"
        );
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        fake_request(&mut c, 10, 10).unwrap();
        drop(c);
        eventually("the connection counted", Duration::from_secs(10), || {
            (closed(&agent) == Some(1.0)).then_some(())
        });
        if cycle == 0 {
            let (_, body) = agent.get("/metrics");
            after_first = Some(series(&body));
        }
        // The namespace goes with the pod: broker first, then its links and the namespace.
        live = Some((broker, veth, ns));
    }
    // The pods are gone: their namespaces with them.
    drop(old_namespaces);
    let (_, before) = agent.get("/metrics");
    let slots = |body: &str| {
        find_sample(body, "brokerscope_map_entries", &[("map", "listeners")]).unwrap_or(-1.0)
    };
    let held_for = first_stop.map(|t| t.elapsed()).unwrap_or_default();
    if held_for < Duration::from_secs(GRACE_S) {
        // (One more where a broker was first seen before it entered its namespace.)
        assert!(
            slots(&before) >= CYCLES as f64,
            "within the grace period every stopped broker's listener keeps its slot: {}",
            slots(&before)
        );
    } else {
        eprintln!("the restarts took {held_for:?}, more than the grace period: not checking it");
    }
    let want = after_first.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(GRACE_S + 10);
    loop {
        let (_, body) = agent.get("/metrics");
        let now = series(&body);
        if now == want && slots(&body) == 1.0 {
            break;
        }
        if std::time::Instant::now() > deadline {
            let extra: Vec<&String> = now.iter().filter(|s| !want.contains(s)).collect();
            let missing: Vec<&String> = want.iter().filter(|s| !now.contains(s)).collect();
            panic!(
                "not only the live broker's series after the grace period: {} slots; extra \
                 {extra:#?}; missing {missing:#?}",
                slots(&body)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, after) = agent.get("/metrics");
    let per_broker = series(&after)
        .iter()
        .filter(|s| s.contains("broker=\"2\"") && !s.contains("listener="))
        .count();
    let per_listener = series(&after)
        .iter()
        .filter(|s| s.contains("listener=\"PLAINTEXT\""))
        .count();
    eprintln!("series: {per_broker} per broker, {per_listener} per listener (broker 2, PLAINTEXT)");
    eprintln!(
        "{CYCLES} broker restarts in new namespaces: /metrics {} bytes, {} series, {} listener \
         slots before the grace period ended; {} bytes, {} series, 1 slot after (one restart: \
         {} series)",
        before.len(),
        series(&before).len(),
        slots(&before),
        after.len(),
        series(&after).len(),
        want.len()
    );
    assert!(
        agent
            .log_text()
            .contains("released: unwatched for probes.listener_release_seconds"),
        "{}",
        agent.log_text()
    );
}

#[test]
fn after_ten_thousand_short_connections_each_on_its_own_thread_the_maps_hold_only_what_lives() {
    if !privileged(
        "after_ten_thousand_short_connections_each_on_its_own_thread_the_maps_hold_only_what_lives",
    ) {
        return;
    }
    const CONNECTIONS: u64 = 10_000;
    const CLIENTS: u64 = 16;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&discovery_config(dir.path(), ""));
    agent.wait_ready();
    let props = brokerscope_tests::broker_properties(dir.path(), "server.properties", "3");
    let broker = FakeBroker::start(FakeBrokerSpec::new(&props));
    wait_broker_running(&agent, "3", broker.pid);
    let (name, port) = broker.listeners[0].clone();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let port = port.to_string();
    let labels = [
        ("broker", "3"),
        ("listener", name.as_str()),
        ("port", port.as_str()),
    ];
    let entries = |map: &str| agent.metric("brokerscope_map_entries", &[("map", map)]);
    // Only the broker's threads take slots: what lives of them bounds the map's fill.
    let live_threads = || {
        std::fs::read_dir(format!("/proc/{}/task", broker.pid))
            .map(|d| d.count() as f64)
            .unwrap_or(0.0)
    };

    // The fake broker serves each connection on a thread of its own, which exits at close:
    // 10,000 threads born and dead, and 10,000 connections opened and closed.
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            std::thread::spawn(move || {
                for i in 0..CONNECTIONS / CLIENTS {
                    let mut c =
                        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
                    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    fake_request(&mut c, 1 + (i % 100) as u32, 1).expect("request");
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client");
    }
    let done = |name: &str| find_sample(&agent.get("/metrics").1, name, &labels);
    eventually("every connection closed", Duration::from_secs(20), || {
        (done("brokerscope_connections_closed_total") == Some(CONNECTIONS as f64)).then_some(())
    });
    assert_eq!(
        done("brokerscope_connections_accepted_total"),
        Some(CONNECTIONS as f64)
    );
    assert_eq!(done("brokerscope_connections_active"), Some(0.0));
    assert_eq!(entries("connections"), Some(0.0));
    // Each thread's slot is freed by its last switch-out; the count is at most a second old.
    let (mut held, mut live) = (None, 0.0);
    let freed = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        (held, live) = (entries("threads"), live_threads());
        held.is_some_and(|h| h <= live)
    });
    assert!(
        freed,
        "thread slots back to at most the broker's {live} live threads: {held:?}"
    );
    assert_eq!(
        agent.metric("brokerscope_map_evictions_total", &[("map", "threads")]),
        Some(0.0)
    );
    eprintln!(
        "{CONNECTIONS} connections on as many threads: connections map 0, threads map {held:?} \
         with {live} broker threads alive, no eviction"
    );
}

#[test]
fn another_layouts_pins_are_removed_and_counting_starts_over_visibly() {
    if !privileged("another_layouts_pins_are_removed_and_counting_starts_over_visibly") {
        return;
    }
    let pins = PinDir::new();
    let since = |agent: &Agent| {
        agent.metric(
            "brokerscope_counters_start_time_seconds",
            &[("pinned", "true")],
        )
    };
    let mut first = Agent::start_pinned("[probes]\nlisteners_capacity = 4096\n", pins.clone());
    first.wait_ready();
    let first_since = since(&first).expect("pinned counters");
    let old = pins.layouts();
    assert_eq!(old.len(), 1, "{old:?}");
    assert!(first.terminate().success());
    // As after an upgrade: the same pin directory, maps of another size.
    std::thread::sleep(Duration::from_millis(50));
    let second = Agent::start_pinned("[probes]\nlisteners_capacity = 2048\n", pins.clone());
    second.wait_ready();
    let line = second.wait_for_log("pinned maps and links of another layout");
    assert!(line.contains(&old[0].display().to_string()), "{line}");
    let now = pins.layouts();
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now, old);
    assert!(
        since(&second).expect("pinned counters") > first_since,
        "the counters start over, visibly"
    );
    assert!(
        !second.log_text().contains("adopting the pinned maps"),
        "{}",
        second.log_text()
    );
}

#[test]
fn a_pin_directory_off_bpffs_is_named_and_counting_goes_on_unpinned() {
    if !privileged("a_pin_directory_off_bpffs_is_named_and_counting_goes_on_unpinned") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&format!(
        "[probes]\npin_dir = \"{}\"\n",
        dir.path().join("pins").display()
    ));
    agent.wait_ready();
    let line = agent.wait_for_log("maps and links not pinned");
    assert!(line.contains("is not on a BPF filesystem"), "{line}");
    assert!(
        agent
            .metric(
                "brokerscope_counters_start_time_seconds",
                &[("pinned", "false")]
            )
            .is_some()
    );
    assert!(!dir.path().join("pins").exists());
}
