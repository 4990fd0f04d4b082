//! Hostile clients against the mTLS endpoint: floods of connections that never finish the TLS
//! handshake (silent TCP connections re-opened as they close, certificate-less TLS handshakes,
//! non-TLS bytes), from one source address and from many, while the operator, with a valid
//! client certificate and an address of its own, scrapes `/metrics` and `/v1/broker-state/`.
//! Every operator request must get its 200; the handshake failures the test controls are
//! counted exactly by reason. The operator scraping from the flooding address itself is
//! measured, not asserted: it shares that address's budget.
//!
//! Source addresses are 127.0.0.x, bound before connect. The figures printed (`flood:` lines)
//! are the ones docs/hostile-clients.md quotes.

use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    os::fd::{FromRawFd as _, OwnedFd},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use brokerscope_tests::{
    Agent, FakeBroker, FakeBrokerSpec, broker_properties, discovery_config, eventually,
    find_sample, privileged, scaled, wait_broker_running,
};

/// The floods here load the whole machine: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const OPERATOR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// A TCP connection to 127.0.0.1:`port` from `src` (any 127.0.0.0/8 address is local).
fn connect_from(src: Ipv4Addr, port: u16) -> io::Result<TcpStream> {
    // SAFETY: socket(2) has no memory preconditions.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket nobody else owns; OwnedFd closes it on every return below.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // Ports chosen at connect by the whole 4-tuple, not at bind per source address.
    // SAFETY: setsockopt reads `one`, an int that outlives the call, with its size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let local = sockaddr(SocketAddrV4::new(src, 0));
    // SAFETY: bind reads `len` bytes of `local`, a sockaddr_in that outlives the call.
    if unsafe { libc::bind(fd, (&raw const local).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let remote = sockaddr(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    // SAFETY: connect reads `len` bytes of `remote`, a sockaddr_in that outlives the call.
    if unsafe { libc::connect(fd, (&raw const remote).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpStream::from(socket))
}

/// Whether the server has closed a non-blocking `stream` (EOF, reset).
fn closed(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match (&mut &*stream).read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    }
}

/// Client threads that run until stopped (or dropped: a panicking test stops them too, and
/// their sockets close with them).
struct Flood {
    stop: Arc<AtomicBool>,
    /// Connections (or handshakes) started, all threads together.
    started: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Flood {
    fn new() -> Self {
        Self {
            stop: Arc::new(AtomicBool::new(false)),
            started: Arc::new(AtomicU64::new(0)),
            threads: Vec::new(),
        }
    }

    /// A thread holding `per_source` silent connections from each of `sources`, re-opening
    /// each as soon as the server closes it.
    fn silent(&mut self, port: u16, sources: Vec<Ipv4Addr>, per_source: usize) {
        let (stop, started) = (self.stop.clone(), self.started.clone());
        self.threads.push(std::thread::spawn(move || {
            let mut slots: Vec<(Ipv4Addr, Option<TcpStream>)> = sources
                .iter()
                .flat_map(|&s| std::iter::repeat_n(s, per_source))
                .map(|s| (s, None))
                .collect();
            while !stop.load(Ordering::Relaxed) {
                for (src, slot) in &mut slots {
                    if slot.as_ref().is_some_and(|s| !closed(s)) {
                        continue;
                    }
                    *slot = connect_from(*src, port).ok();
                    if let Some(s) = slot {
                        let _ = s.set_nonblocking(true);
                        started.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }));
    }

    /// A thread running certificate-less TLS handshakes (curl with the CA but no client
    /// certificate) from `src`, one after another.
    fn certless(&mut self, agent: &Agent, src: Ipv4Addr) {
        let (stop, started) = (self.stop.clone(), self.started.clone());
        let args = certless_args(agent, src);
        self.threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = Command::new("curl")
                    .args(&args)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                started.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    /// Stops every thread (closing their connections); returns how many they started.
    fn stop(mut self) -> u64 {
        self.halt();
        self.started.load(Ordering::Relaxed)
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.halt();
    }
}

/// curl arguments for a certificate-less handshake from `src`.
fn certless_args(agent: &Agent, src: Ipv4Addr) -> Vec<String> {
    vec![
        "-sS".into(),
        "--max-time".into(),
        "5".into(),
        "--interface".into(),
        src.to_string(),
        "--resolve".into(),
        format!("localhost:{}:127.0.0.1", agent.port()),
        "--cacert".into(),
        agent.pki.path("ca.crt").display().to_string(),
        agent.url("/health"),
    ]
}

/// One certificate-less handshake (curl with `args` from [`certless_args`]), waited for; must
/// not get an HTTP answer.
fn certless_once(args: &[String]) {
    let out = Command::new("curl").args(args).output().expect("run curl");
    assert!(
        !out.status.success(),
        "a client without a certificate got an answer: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// One connection from `src` that sends an HTTP request instead of a ClientHello and reads
/// until the server closes it.
fn not_tls_once(port: u16, src: Ipv4Addr) {
    let mut s = connect_from(src, port).expect("connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    // At most a TLS alert record, never HTTP.
    assert!(!answer.starts_with(b"HTTP"), "{answer:?}");
}

/// The operator's requests and how long each took.
#[derive(Default)]
struct Scrapes {
    ok: usize,
    failed: Vec<String>,
    times: Vec<Duration>,
    /// curl's own account of the slowest request: TCP connected, TLS done, total (seconds).
    slowest: String,
}

impl Scrapes {
    fn total(&self) -> usize {
        self.ok + self.failed.len()
    }

    /// (median, max) request time, ms.
    fn ms(&self) -> (f64, f64) {
        let mut t: Vec<f64> = self.times.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        t.sort_by(f64::total_cmp);
        (
            t.get(t.len() / 2).copied().unwrap_or(0.0),
            t.last().copied().unwrap_or(0.0),
        )
    }

    fn summary(&self) -> String {
        let (median, max) = self.ms();
        format!(
            "{}/{} requests 200, median {median:.1} ms, max {max:.1} ms (curl: {})",
            self.ok,
            self.total(),
            self.slowest
        )
    }
}

/// Scrapes `/metrics` and `/v1/broker-state/` one after another for `how_long`, each over a
/// new connection (a full mTLS handshake) from `src`, as the operator does.
fn operator_scrapes(agent: &Agent, src: Ipv4Addr, how_long: Duration) -> Scrapes {
    let mut scrapes = Scrapes::default();
    let until = Instant::now() + how_long;
    let interface = src.to_string();
    let resolve = format!("localhost:{}:127.0.0.1", agent.port());
    while Instant::now() < until {
        for path in ["/metrics", "/v1/broker-state/"] {
            let started = Instant::now();
            let result = agent.curl(&[
                "--interface",
                &interface,
                "--resolve",
                &resolve,
                "-w",
                "\nconnect %{time_connect} tls %{time_appconnect} total %{time_total}\n%{http_code}",
                &agent.url(path),
            ]);
            let took = started.elapsed();
            if scrapes.times.iter().all(|t| *t < took)
                && let Ok((_, body)) = &result
            {
                scrapes.slowest = body.lines().last().unwrap_or_default().to_string();
            }
            scrapes.times.push(took);
            match result {
                Ok((200, _)) => scrapes.ok += 1,
                Ok((code, body)) => scrapes.failed.push(format!("{path}: {code} {body}")),
                Err(e) => scrapes.failed.push(format!("{path}: {e}")),
            }
        }
    }
    scrapes
}

/// The endpoint's connection counters, from one scrape.
#[derive(Clone, Debug, Default)]
struct Counters {
    failures: std::collections::BTreeMap<&'static str, u64>,
    rejected: u64,
    active: u64,
    pending: u64,
}

const REASONS: [&str; 7] = [
    "timeout",
    "no_certificate",
    "bad_certificate",
    "protocol",
    "peer_closed",
    "shed_per_peer",
    "shed_total",
];

impl Counters {
    fn read(agent: &Agent) -> Self {
        let (code, text) = agent.get("/metrics");
        assert_eq!(code, 200, "{text}");
        let get = |name: &str, labels: &[(&str, &str)]| {
            find_sample(&text, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?}"))
                as u64
        };
        Self {
            failures: REASONS
                .iter()
                .map(|&r| {
                    let n = get("brokerscope_tls_handshake_failures_total", &[("reason", r)]);
                    (r, n)
                })
                .collect(),
            rejected: get("brokerscope_http_connections_rejected_total", &[]),
            active: get("brokerscope_http_connections_active", &[]),
            pending: get("brokerscope_http_connections_pending", &[]),
        }
    }

    /// Waits until only the scrape reading them holds a connection (every other connection's
    /// task has ended, so has counted), then reads them.
    fn settled(agent: &Agent) -> Self {
        eventually(
            "every flood connection closed and counted",
            scaled(Duration::from_secs(15)),
            || {
                let c = Self::read(agent);
                (c.active == 1 && c.pending == 0).then_some(c)
            },
        )
    }

    fn since(&self, before: &Self) -> Self {
        Self {
            failures: self
                .failures
                .iter()
                .map(|(r, n)| (*r, n - before.failures[r]))
                .collect(),
            rejected: self.rejected - before.rejected,
            active: self.active,
            pending: self.pending,
        }
    }

    fn summary(&self) -> String {
        let reasons: Vec<String> = self
            .failures
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| format!("{r}={n}"))
            .collect();
        format!(
            "handshake failures {{{}}}, rejected {}",
            reasons.join(", "),
            self.rejected
        )
    }
}

/// A running agent that discovered one (fake) broker, so `/v1/broker-state/` answers 200.
struct Setup {
    agent: Agent,
    _broker: FakeBroker,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let props = broker_properties(dir.path(), "server.properties", "7");
    let broker = FakeBroker::start(FakeBrokerSpec::new(&props));
    let agent = Agent::start(&discovery_config(dir.path(), ""));
    wait_broker_running(&agent, "7", broker.pid);
    Setup {
        agent,
        _broker: broker,
        _dir: dir,
    }
}

fn assert_all_ok(agent: &Agent, what: &str, scrapes: &Scrapes) {
    assert!(
        scrapes.failed.is_empty() && scrapes.ok > 0,
        "{what}: {} operator requests failed of {}: {:?}\n{}",
        scrapes.failed.len(),
        scrapes.total(),
        scrapes.failed,
        agent.log_text()
    );
}

#[test]
fn a_flood_of_unauthenticated_connections_never_locks_the_operator_out() {
    if !privileged("a_flood_of_unauthenticated_connections_never_locks_the_operator_out") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let s = setup();
    let agent = &s.agent;
    let port = agent.port();
    let phase = scaled(Duration::from_secs(10));

    // 0. No flood: the reference times.
    let quiet = operator_scrapes(agent, OPERATOR, scaled(Duration::from_secs(3)));
    assert_all_ok(agent, "no flood", &quiet);
    eprintln!("flood: without a flood: {}", quiet.summary());
    let start = Counters::settled(agent);

    // 1. One source address: 600 silent connections held and re-opened as they close, and
    //    certificate-less handshakes back to back, two at a time.
    let flooder = Ipv4Addr::new(127, 0, 0, 2);
    let mut flood = Flood::new();
    flood.silent(port, vec![flooder], 300);
    flood.silent(port, vec![flooder], 300);
    flood.certless(agent, flooder);
    flood.certless(agent, flooder);
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let one = operator_scrapes(agent, OPERATOR, phase);
    let during = Counters::read(agent);
    // From the flooding address itself the operator shares that address's budget: measured,
    // not guaranteed (docs/hostile-clients.md).
    let same = operator_scrapes(agent, flooder, scaled(Duration::from_secs(5)));
    eprintln!(
        "flood: operator from the flooding address itself: {}",
        same.summary()
    );
    let flooded = flood.stop();
    let rate = flooded as f64 / (started.elapsed().as_secs_f64() + 1.0);
    let after_one = Counters::settled(agent);
    let d1 = after_one.since(&start);
    eprintln!(
        "flood: one source, {flooded} connections and handshakes started ({rate:.0}/s), \
         {} pending at one scrape: operator {}; {}",
        during.pending,
        one.summary(),
        d1.summary()
    );
    assert_all_ok(agent, "one flooding source", &one);
    assert!(d1.failures["shed_per_peer"] > 0, "{}", d1.summary());
    assert_eq!(d1.failures["shed_total"], 0, "{}", d1.summary());
    assert!(d1.failures["no_certificate"] > 0, "{}", d1.summary());
    assert!(during.pending <= 32 + 2, "pending {}", during.pending);
    assert_eq!(
        d1.rejected, d1.failures["shed_per_peer"],
        "only sheds were rejected"
    );

    // 2. 24 source addresses, 25 silent connections each (600): more than the 256 pending
    //    handshakes allowed in total. Meanwhile, from an address of their own and one at a
    //    time, exactly N certificate-less handshakes and M connections that are not TLS.
    let sources: Vec<Ipv4Addr> = (10..34).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect();
    let mut flood = Flood::new();
    flood.silent(port, sources[..12].to_vec(), 25);
    flood.silent(port, sources[12..].to_vec(), 25);
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let (n, m) = (20, 20);
    let (many, during) = std::thread::scope(|scope| {
        let src = Ipv4Addr::new(127, 0, 0, 200);
        let certless = certless_args(agent, src);
        let counted = scope.spawn(move || {
            for _ in 0..n {
                certless_once(&certless);
                not_tls_once(port, src);
            }
        });
        let scrapes = operator_scrapes(agent, OPERATOR, phase);
        let during = Counters::read(agent);
        counted.join().expect("counted clients");
        (scrapes, during)
    });
    let flooded = flood.stop();
    let rate = flooded as f64 / (started.elapsed().as_secs_f64() + 1.0);
    let after_many = Counters::settled(agent);
    let d2 = after_many.since(&after_one);
    eprintln!(
        "flood: 24 sources, {flooded} connections started ({rate:.0}/s), {} pending at one \
         scrape: operator {}; {}",
        during.pending,
        many.summary(),
        d2.summary()
    );
    assert_all_ok(agent, "24 flooding sources", &many);
    assert!(d2.failures["shed_total"] > 0, "{}", d2.summary());
    assert!(during.pending <= 256, "pending {}", during.pending);
    // Exact where the test alone makes them: nothing else sends bytes that are not TLS or
    // finishes a handshake without a certificate in this phase.
    assert_eq!(d2.failures["no_certificate"], n, "{}", d2.summary());
    assert_eq!(d2.failures["protocol"], m, "{}", d2.summary());
    assert_eq!(d2.failures["bad_certificate"], 0, "{}", d2.summary());
    assert_eq!(
        d2.rejected,
        d2.failures["shed_per_peer"] + d2.failures["shed_total"]
    );

    // The log says why, a few lines per reason, never a line per flood connection.
    let log = agent.log_text();
    let refused = log.matches("TLS handshake refused").count();
    assert!(refused >= 4, "{log}");
    assert!(refused <= 7 * 10, "{refused} lines:\n{log}");
    assert!(log.contains("reason=shed_per_peer"), "{log}");
    assert!(log.contains("reason=shed_total"), "{log}");
    assert!(log.contains("reason=protocol"), "{log}");
    assert!(log.contains("peer=127.0.0.2:"), "{log}");
    eprintln!("flood: {refused} `TLS handshake refused` log lines in all");
}
