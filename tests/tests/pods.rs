//! Per-pod listeners (`server.pod_listeners`): "pods" are network namespaces on veth pairs to
//! a bridge in a "node" namespace, each running a fake broker in a container whose root holds Strimzi-style certificate files
//! (`/opt/kafka/broker-certs/<pod>.crt|.key`, `/opt/kafka/cluster-ca-certs/ca.crt`) for its own
//! pod DNS name, issued by a test cluster CA. The operator's Java client
//! (tests/java/BrokerStateClient.java: hostname verification on, RSA, mTLS) asks each pod's
//! address for its broker's state, by the pod DNS name (resolved by a hosts file), from an
//! "operator" namespace on the same bridge. The agent runs in the root namespace, which has no
//! route to the pods at all: whatever answers on a pod's address is the socket it bound there.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use brokerscope_tests::*;

const PORT: u16 = 8443;
const CLUSTER: &str = "my-cluster";
const NAMESPACE: &str = "kafka";

/// A test cluster CA (RSA, as Strimzi issues) and what it signs.
struct ClusterCa {
    dir: PathBuf,
}

impl ClusterCa {
    fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        run_ok(Command::new("openssl").current_dir(dir).args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/O=io.strimzi/CN=cluster-ca v0",
        ]));
        Self { dir: dir.into() }
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }

    /// `name.crt` and `name.key` (PKCS#8 PEM) for `sans`, signed by this CA.
    fn issue(&self, name: &str, sans: &[String]) -> (String, String) {
        let ext = self.dir.join(format!("{name}.ext"));
        let san: Vec<String> = sans.iter().map(|s| format!("DNS:{s}")).collect();
        std::fs::write(&ext, format!("subjectAltName={}\n", san.join(","))).unwrap();
        let d = &self.dir;
        run_ok(Command::new("openssl").current_dir(d).args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/O=io.strimzi/CN={name}"),
        ]));
        run_ok(
            Command::new("openssl")
                .current_dir(d)
                .args([
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-out",
                    &format!("{name}.crt"),
                    "-extfile",
                ])
                .arg(&ext),
        );
        let read = |f: String| std::fs::read_to_string(d.join(f)).unwrap();
        (read(format!("{name}.crt")), read(format!("{name}.key")))
    }

    /// The operator's identity as PKCS#12 (password `changeit`).
    fn operator_p12(&self) -> PathBuf {
        self.issue("cluster-operator", &["cluster-operator".into()]);
        let p12 = self.dir.join("operator.p12");
        run_ok(Command::new("openssl").current_dir(&self.dir).args([
            "pkcs12",
            "-export",
            "-in",
            "cluster-operator.crt",
            "-inkey",
            "cluster-operator.key",
            "-certfile",
            "ca.crt",
            "-name",
            "cluster-operator",
            "-passout",
            "pass:changeit",
            "-out",
            "operator.p12",
        ]));
        p12
    }
}

fn pod_dns(pod: &str) -> String {
    format!("{pod}.{CLUSTER}-kafka-brokers.{NAMESPACE}.svc")
}

/// One "pod": its namespace, veth, container with the broker's certificate files.
struct Pod {
    name: String,
    ns: NetNs,
    ip: String,
    container: Container,
    /// The key of its certificate, as written.
    key: String,
}

/// The "node": a namespace holding a bridge (on a /24 of its own) that pods and the operator
/// are plugged into.
struct Node {
    ns: NetNs,
    subnet: u8,
}

impl Node {
    fn new(subnet: u8) -> Self {
        let ns = NetNs::new();
        run_ok(Command::new("ip").args(["-n", &ns.name, "link", "add", "br0", "type", "bridge"]));
        run_ok(Command::new("ip").args(["-n", &ns.name, "link", "set", "br0", "up"]));
        Node { ns, subnet }
    }

    /// A veth from the bridge into `ns`, with address 169.254.<subnet>.<host>/24 there
    /// (deleted with either namespace).
    fn plug(&self, ns: &NetNs, host: u8) -> String {
        let (n, i) = (&self.ns.name, &ns.name);
        let ip = format!("169.254.{}.{host}", self.subnet);
        let outer = format!("p{host}");
        run_ok(Command::new("ip").args([
            "-n", n, "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", i,
        ]));
        run_ok(Command::new("ip").args(["-n", n, "link", "set", &outer, "master", "br0", "up"]));
        run_ok(Command::new("ip").args([
            "-n",
            i,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ]));
        run_ok(Command::new("ip").args(["-n", i, "link", "set", "eth0", "up"]));
        ip
    }
}

/// Runs `f` on a thread inside `ns`.
fn in_ns<T: Send>(ns: &NetNs, f: impl FnOnce() -> T + Send) -> T {
    let file = std::fs::File::open(format!("/var/run/netns/{}", ns.name)).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::os::fd::AsRawFd as _;
            // SAFETY: setns on an open namespace file; it changes only this thread, which
            // exits when `f` returns.
            assert_eq!(
                unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            f()
        })
        .join()
        .unwrap()
    })
}

impl Pod {
    /// `pivoted`: a `pivot_root` container, as runc makes; else a chroot-style one (the kernel
    /// prints the two kinds' descriptor paths differently: the agent must read both).
    fn new(name: &str, host: u8, node: &Node, ca: &ClusterCa, pivoted: bool) -> Self {
        let ns = NetNs::new();
        let ip = node.plug(&ns, host);
        let container = if pivoted {
            Container::pivoted()
        } else {
            Container::new()
        };
        let dns = pod_dns(name);
        let (crt, key) = ca.issue(name, &[dns.clone(), format!("{dns}.cluster.local")]);
        container.write(&format!("/opt/kafka/broker-certs/{name}.crt"), &crt);
        container.write(&format!("/opt/kafka/broker-certs/{name}.key"), &key);
        container.write(
            "/opt/kafka/cluster-ca-certs/ca.crt",
            &std::fs::read_to_string(ca.path("ca.crt")).unwrap(),
        );
        std::fs::create_dir_all(container.path("/data")).unwrap();
        Pod {
            name: name.into(),
            ns,
            ip,
            container,
            key,
        }
    }

    /// Log segments in its log dir: t-0 with 3, t-1 with 2 (2 logs, 5 segments), each with an
    /// index beside it (not a segment).
    fn make_segments(&self) {
        for (part, n) in [("t-0", 3), ("t-1", 2)] {
            for i in 0..n {
                let base = format!("/data/{part}/{:020}", i * 100);
                self.container.write(&format!("{base}.log"), "segment");
                self.container.write(&format!("{base}.index"), "");
            }
        }
    }

    /// A broker in this pod; `deferred`: it listens only when told (`listen`).
    fn start_broker(&self, id: &str, tag: &str, deferred: bool) -> FakeBroker {
        self.container.write(
            "/opt/kafka/server.properties",
            &format!("node.id={id}\nlisteners=PLAINTEXT://0.0.0.0:9092\nlog.dirs=/data\n"),
        );
        let tag_override = format!("pods.tag={tag}");
        let overrides = [tag_override.as_str()];
        FakeBroker::start(FakeBrokerSpec {
            overrides: &overrides,
            netns: Some(&self.ns),
            hostname: Some(&self.name),
            container: Some((&self.container, "/")),
            options: if deferred { &["--defer-listen"] } else { &[] },
            ..FakeBrokerSpec::new(Path::new("/opt/kafka/server.properties"))
        })
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}:{PORT}{path}", pod_dns(&self.name))
    }

    /// Whether something accepts on the pod's [`PORT`], asked from `from`.
    fn answers(&self, from: &NetNs) -> bool {
        let addr = format!("{}:{PORT}", self.ip).parse().unwrap();
        in_ns(from, || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })
    }

    /// curl from `from` by the pod DNS name (resolved to the pod's address), with
    /// `identity`'s certificate.
    fn curl(
        &self,
        from: &NetNs,
        ca: &Path,
        identity: (&Path, &Path),
        path: &str,
    ) -> Result<(u16, String), String> {
        let resolve = format!("{}:{PORT}:{}", pod_dns(&self.name), self.ip);
        ns_curl(
            from,
            &[
                "--resolve",
                &resolve,
                "--cacert",
                ca.to_str().unwrap(),
                "--cert",
                identity.0.to_str().unwrap(),
                "--key",
                identity.1.to_str().unwrap(),
                &self.url(path),
            ],
        )
    }
}

/// [`curl`] run inside `ns`.
fn ns_curl(ns: &NetNs, args: &[&str]) -> Result<(u16, String), String> {
    brokerscope_tests::curl_in(ns.command("curl"), args)
}

/// The operator's client run with `-Djdk.net.hosts.file` so pod DNS names resolve to pod IPs.
fn java_get(
    operator: &NetNs,
    pod: &Pod,
    ca: &ClusterCa,
    p12: &Path,
    hosts: &Path,
) -> (Option<i32>, String, String) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("java/BrokerStateClient.java");
    let out = operator
        .command("java")
        .arg(format!("-Djdk.net.hosts.file={}", hosts.display()))
        .arg(&source)
        .arg(pod.url("/v1/broker-state/"))
        .arg(ca.path("ca.crt"))
        .arg(p12)
        .arg("changeit")
        .arg(scaled(Duration::from_secs(10)).as_secs().to_string())
        .output()
        .expect("java (17) is required for the operator client");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The node listener's answer for broker `id`, and the pod listener's (curl, then the
/// operator's Java client) for the broker in `pod`: the two curl answers byte-exact, the Java
/// client's line as `want_java`.
#[expect(
    clippy::too_many_arguments,
    reason = "a test helper over the test's parts"
)]
fn assert_same_state(
    agent: &Agent,
    id: &str,
    operator: &NetNs,
    pod: &Pod,
    ca: &ClusterCa,
    p12: &Path,
    hosts: &Path,
    want: &str,
    want_java: &str,
) {
    let node = agent.get(&format!("/v1/broker-state/?broker={id}"));
    assert_eq!(node, (200, want.to_string()), "node listener, broker {id}");
    let op = (
        ca.path("cluster-operator.crt"),
        ca.path("cluster-operator.key"),
    );
    let mine = pod
        .curl(
            operator,
            &ca.path("ca.crt"),
            (&op.0, &op.1),
            "/v1/broker-state/",
        )
        .unwrap();
    assert_eq!(mine, node, "{}", pod.name);
    let (code, stdout, stderr) = java_get(operator, pod, ca, p12, hosts);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert_eq!(stdout, want_java, "{}: {stderr}", pod.name);
}

fn recovery(logs: u32, segments: u32) -> String {
    format!(
        r#"{{"brokerState":2,"recoveryState":{{"remainingLogsToRecover":{logs},"remainingSegmentsToRecover":{segments}}}}}"#
    )
}

fn serial(pem: &str) -> String {
    let mut child = Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(pem.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The serial of the certificate the pod listener presents now.
fn served_serial(operator: &NetNs, pod: &Pod, ca: &ClusterCa) -> String {
    let out = operator
        .command("openssl")
        .args(["s_client", "-connect", &format!("{}:{PORT}", pod.ip)])
        .args(["-servername", &pod_dns(&pod.name)])
        .arg("-cert")
        .arg(ca.path("cluster-operator.crt"))
        .arg("-key")
        .arg(ca.path("cluster-operator.key"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    serial(&String::from_utf8_lossy(&out.stdout))
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A socket listening on [`PORT`] in `ns`, as the in-JVM agent's would.
fn hold_port(ns: &NetNs) -> std::net::TcpListener {
    in_ns(ns, || {
        std::net::TcpListener::bind(("0.0.0.0", PORT)).unwrap()
    })
}

fn netns_fds(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .map(|l| l.display().to_string())
                .filter(|l| l.starts_with("net:"))
                .collect()
        })
        .unwrap_or_default()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn each_pod_address_serves_its_own_broker_with_its_own_certificate() {
    if !privileged("pods") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::new(&dir.path().join("cluster-ca"));
    let p12 = ca.operator_p12();
    let tag = format!("pods-{}", std::process::id());
    let node = Node::new(100 + (std::process::id() % 100) as u8);
    let operator = NetNs::new();
    node.plug(&operator, 100);
    // Pods 0 and 1 are chroot-style containers, pod 2 a pivot_root one.
    let pods: Vec<Pod> = (0..3)
        .map(|i| {
            let name = format!("{CLUSTER}-broker-{i}");
            Pod::new(&name, 2 + i as u8, &node, &ca, i == 2)
        })
        .collect();
    pods[2].make_segments();
    // A pod where something already listens on 8443 (the in-JVM agent).
    let busy = Pod::new(&format!("{CLUSTER}-broker-9"), 9, &node, &ca, false);
    // A pod whose key is no key: reported with its path in the container, not listened on.
    let bad = Pod::new(&format!("{CLUSTER}-broker-5"), 5, &node, &ca, true);
    let bad_key = format!("/opt/kafka/broker-certs/{}.key", bad.name);
    bad.container.write(&bad_key, "not a key\n");
    let _jvm_agent = hold_port(&busy.ns);
    eventually("the busy pod's 8443 taken", Duration::from_secs(5), || {
        busy.answers(&operator).then_some(())
    });
    let hosts = dir.path().join("hosts");
    let mut lines = String::new();
    for p in pods.iter().chain([&busy, &bad]) {
        lines.push_str(&format!("{} {}\n", p.ip, pod_dns(&p.name)));
    }
    std::fs::write(&hosts, lines).unwrap();

    let agent = Agent::start(&format!(
        "pod_listeners = true\npod_listen_port = {PORT}\n\
         [discovery]\ncmdline_patterns = ['kafka\\.Kafka .*pods\\.tag={tag}']\n"
    ));
    agent.wait_ready();
    let rss_before = rss_kib(agent.pid());

    // Broker start to its pod's 8443 answering.
    let mut brokers = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let started = Instant::now();
        brokers.push(pod.start_broker(&i.to_string(), &tag, i == 2));
        eventually("8443 in the pod", Duration::from_secs(10), || {
            pod.answers(&operator).then_some(())
        });
        let took = started.elapsed();
        eprintln!("{}: broker spawn to 8443 accepting: {took:?}", pod.name);
        // Discovery's budget, then the issue's 100 ms from discovery to listening.
        assert!(
            took <= scaled(DISCOVERY_LATENCY_BUDGET + Duration::from_millis(100)),
            "{took:?}"
        );
    }
    let busy_broker = busy.start_broker("9", &tag, false);
    wait_running(&agent, "9", busy_broker.pid, Instant::now());
    let rss_after = rss_kib(agent.pid());
    eprintln!(
        "agent RSS {rss_before} KiB before, {rss_after} KiB with 3 pod listeners \
         (~{} KiB per pod, noisy)",
        rss_after.saturating_sub(rss_before) / 3
    );

    // Each pod answers for its own broker: pod 2's has not listened yet (STARTING), then
    // recovers its logs (segments opened and kept open, as Kafka does): RECOVERY with the exact
    // remaining counts, the same bytes as the node listener's, through the pod's address.
    assert_same_state(
        &agent,
        "2",
        &operator,
        &pods[2],
        &ca,
        &p12,
        &hosts,
        r#"{"brokerState":1}"#,
        "HTTP_2 200 brokerState=1",
    );
    for _ in 0..2 {
        let answer = brokers[2].command("recover-step", Duration::from_secs(5));
        assert!(answer.starts_with("opened /data/t-0/"), "{answer}");
    }
    eventually("RECOVERY 2/3", Duration::from_secs(5), || {
        (agent.get("/v1/broker-state/?broker=2").1 == recovery(2, 3)).then_some(())
    });
    assert_same_state(
        &agent,
        "2",
        &operator,
        &pods[2],
        &ca,
        &p12,
        &hosts,
        &recovery(2, 3),
        "HTTP_2 200 brokerState=2 logs=2 segments=3",
    );
    assert_eq!(
        brokers[2].command("recover-step 3", Duration::from_secs(5)),
        "opened 3"
    );
    eventually("RECOVERY 0/0", Duration::from_secs(5), || {
        (agent.get("/v1/broker-state/?broker=2").1 == recovery(0, 0)).then_some(())
    });
    assert_eq!(
        brokers[2].command("listen", Duration::from_secs(5)),
        "listened"
    );
    eventually("RUNNING", Duration::from_secs(5), || {
        (agent.get("/v1/broker-state/?broker=2").1 == r#"{"brokerState":3}"#).then_some(())
    });

    // The operator's strict client, by pod DNS name, gets each broker's own state.
    for pod in &pods {
        let (code, stdout, stderr) = java_get(&operator, pod, &ca, &p12, &hosts);
        assert_eq!(code, Some(0), "{}: {stdout}\n{stderr}", pod.name);
        assert!(
            stdout.ends_with("200 brokerState=3"),
            "{}: {stdout}",
            pod.name
        );
    }
    // Byte-exact with the node listener's answer for the same broker; only the two routes.
    let op = (
        &*ca.path("cluster-operator.crt"),
        &*ca.path("cluster-operator.key"),
    );
    let op = (op.0.to_path_buf(), op.1.to_path_buf());
    let op = (op.0.as_path(), op.1.as_path());
    for (i, pod) in pods.iter().enumerate() {
        let mine = pod
            .curl(&operator, &ca.path("ca.crt"), op, "/v1/broker-state/")
            .unwrap();
        let node = agent.get(&format!("/v1/broker-state/?broker={i}"));
        assert_eq!(mine, node, "{}", pod.name);
        let ready = pod
            .curl(&operator, &ca.path("ca.crt"), op, "/v1/ready")
            .unwrap();
        assert_eq!(ready.0, 204);
        for other in [
            "/v1/brokers",
            "/metrics",
            "/v1/config",
            "/v1/broker-state/?broker=1",
        ] {
            let (code, _) = pod.curl(&operator, &ca.path("ca.crt"), op, other).unwrap();
            if other.contains('?') {
                // The query is not read: still this pod's own broker.
                assert_eq!(code, 200);
            } else {
                assert_eq!(code, 404, "{other} on a pod listener");
            }
        }
    }
    // A client certificate from another CA (the agent's dev PKI) is refused.
    let args = agent.client_args();
    let wrong = pods[0].curl(
        &operator,
        &ca.path("ca.crt"),
        (Path::new(&args[3]), Path::new(&args[5])),
        "/v1/broker-state/",
    );
    assert!(wrong.is_err(), "{wrong:?}");
    // The access log names the pod.
    agent.wait_for_log(&format!("listener=pod/{}", pods[0].name));

    // The taken port: reported, left alone.
    let b9 = broker(&agent, "9").unwrap();
    assert_eq!(b9["pod_listener"]["state"], "port_taken", "{b9}");
    assert_eq!(
        agent.metric(
            "brokerscope_pod_listener",
            &[
                ("broker", "9"),
                ("pod", &busy.name),
                ("state", "port_taken")
            ]
        ),
        Some(1.0)
    );
    agent.wait_for_log("the port is already taken in the pod");
    assert!(busy.answers(&operator), "the other holder keeps its port");

    // The pod with a bad key: failed, named by the pod and the key's path in its container
    // (not the node listener's `server.key_file`), in /v1/brokers, the metric and the log; no
    // listener there. Given its key, it is listened on (retried every second).
    let bad_broker = bad.start_broker("5", &tag, false);
    wait_running(&agent, "5", bad_broker.pid, Instant::now());
    let reason = format!("broker key: {bad_key} holds no PEM private key");
    eventually("the bad key reported", Duration::from_secs(5), || {
        let b5 = broker(&agent, "5")?;
        (b5["pod_listener"]["state"] == "failed").then_some(b5)
    });
    let b5 = broker(&agent, "5").unwrap();
    assert_eq!(
        b5["pod_listener"],
        serde_json::json!({"state": "failed", "port": PORT, "pod": bad.name, "reason": reason}),
    );
    assert_eq!(
        agent.metric(
            "brokerscope_pod_listener",
            &[("broker", "5"), ("pod", &bad.name), ("state", "failed")]
        ),
        Some(1.0)
    );
    let line = agent.wait_for_log("pod listener not opened; retried");
    assert!(
        line.contains(&bad_key) && line.contains(&bad.name) && !line.contains("server."),
        "{line}"
    );
    assert!(!bad.answers(&operator));
    bad.container.write(&bad_key, &bad.key);
    eventually("the fixed pod listened on", Duration::from_secs(5), || {
        bad.answers(&operator).then_some(())
    });
    assert_eq!(
        broker(&agent, "5").unwrap()["pod_listener"]["state"],
        "serving"
    );
    bad_broker.kill();

    // Rotation: a new certificate on disk is served on the next handshake.
    let before = served_serial(&operator, &pods[1], &ca);
    let dns = pod_dns(&pods[1].name);
    let (crt, key) = ca.issue(&format!("{}-new", pods[1].name), &[dns]);
    pods[1].container.write(
        &format!("/opt/kafka/broker-certs/{}.key", pods[1].name),
        &key,
    );
    pods[1].container.write(
        &format!("/opt/kafka/broker-certs/{}.crt", pods[1].name),
        &crt,
    );
    let want = serial(&crt);
    assert_ne!(before, want);
    let rotated = Instant::now();
    eventually(
        "the rotated certificate served",
        Duration::from_secs(5),
        || (served_serial(&operator, &pods[1], &ca) == want).then_some(()),
    );
    eprintln!("rotated certificate served after {:?}", rotated.elapsed());

    // A bad certificate on disk: the one in use is kept, and the error names the file by its
    // path in the container; the good one back clears it.
    let crt_path = format!("/opt/kafka/broker-certs/{}.crt", pods[1].name);
    pods[1].container.write(&crt_path, "not a certificate\n");
    let want_error = format!("broker certificate: {crt_path} holds no PEM certificate");
    eventually(
        "the bad certificate reported",
        Duration::from_secs(5),
        || {
            let b1 = broker(&agent, "1")?;
            (b1["pod_listener"]["certificate_error"] == want_error.as_str()).then_some(())
        },
    );
    assert_eq!(
        broker(&agent, "1").unwrap()["pod_listener"]["state"],
        "serving"
    );
    assert_eq!(served_serial(&operator, &pods[1], &ca), want);
    let line = agent.wait_for_log("broker certificate not reloaded");
    assert!(
        line.contains(&crt_path) && line.contains(&pods[1].name),
        "{line}"
    );
    pods[1].container.write(&crt_path, &crt);
    eventually("the error cleared", Duration::from_secs(5), || {
        let b1 = broker(&agent, "1")?;
        b1["pod_listener"]
            .get("certificate_error")
            .is_none()
            .then_some(())
    });

    // A broker restarted in its pod (same namespace, new pid, its segments to recover): the
    // pod's 8443 is back within discovery's budget of the new process's start and answers
    // for it, RECOVERY counts included (a chroot-style container here).
    pods[1].make_segments();
    let restarted = Instant::now();
    brokers.remove(1).kill();
    let spawned = Instant::now();
    brokers.insert(1, pods[1].start_broker("1", &tag, true));
    eventually(
        "8443 back after the restart",
        Duration::from_secs(10),
        || pods[1].answers(&operator).then_some(()),
    );
    let (gap, back) = (restarted.elapsed(), spawned.elapsed());
    eprintln!(
        "restart in the pod: old broker killed to 8443 accepting again {gap:?}; new broker \
         spawn to 8443 accepting {back:?}"
    );
    assert!(
        back <= scaled(DISCOVERY_LATENCY_BUDGET + Duration::from_millis(100)),
        "{back:?}"
    );
    assert_same_state(
        &agent,
        "1",
        &operator,
        &pods[1],
        &ca,
        &p12,
        &hosts,
        r#"{"brokerState":1}"#,
        "HTTP_2 200 brokerState=1",
    );
    assert_eq!(
        brokers[1].command("recover-step", Duration::from_secs(5)),
        "opened /data/t-0/00000000000000000000.log"
    );
    eventually("RECOVERY 2/4", Duration::from_secs(5), || {
        (agent.get("/v1/broker-state/?broker=1").1 == recovery(2, 4)).then_some(())
    });
    assert_same_state(
        &agent,
        "1",
        &operator,
        &pods[1],
        &ca,
        &p12,
        &hosts,
        &recovery(2, 4),
        "HTTP_2 200 brokerState=2 logs=2 segments=4",
    );
    assert_eq!(
        brokers[1].command("listen", Duration::from_secs(5)),
        "listened"
    );
    eventually("RUNNING after the restart", Duration::from_secs(5), || {
        (agent.get("/v1/broker-state/?broker=1").1 == r#"{"brokerState":3}"#).then_some(())
    });

    // A broker replaced in its pod while discovery sees the next one already (here under
    // another id, started before the old one ends): the same socket stays, answering for the
    // new process; not one connection attempt is refused meanwhile. An attempt every
    // millisecond: a closed socket is refused at once (RST) and a reopened one took over 5 ms
    // above. An attempt that times out instead is not a closed socket (its SYN went unanswered:
    // the accept queue full under a busy machine); those are counted apart and shown.
    let next = pods[1].start_broker("10", &tag, true);
    wait_running(&agent, "10", next.pid, Instant::now());
    let stop = std::sync::atomic::AtomicBool::new(false);
    let addr: std::net::SocketAddr = format!("{}:{PORT}", pods[1].ip).parse().unwrap();
    let (tries, refused, other) = std::thread::scope(|s| {
        let probe = s.spawn(|| {
            in_ns(&operator, || {
                let (mut tries, mut refused, mut other) = (0u32, 0u32, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    tries += 1;
                    match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                            refused += 1;
                        }
                        Err(e) => other.push(e.kind()),
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                (tries, refused, other)
            })
        });
        // Stops the probe however this closure ends (a failed assertion would otherwise leave
        // the scope waiting for it forever).
        let stop_probe = StopOnDrop(&stop);
        brokers.remove(1).kill();
        let kept = agent.wait_for_log("pod listener kept for the broker now running in the pod");
        assert!(
            kept.contains("broker=10") && kept.contains("previous=1"),
            "{kept}"
        );
        // Past the next pass too: the socket is not closed later either.
        std::thread::sleep(Duration::from_millis(300));
        drop(stop_probe);
        probe.join().unwrap()
    });
    eprintln!(
        "broker replaced in its pod: {refused} of {tries} connection attempts refused, other \
         failures: {other:?}"
    );
    assert!(tries > 10 && refused == 0, "{refused} of {tries} refused");
    // Not every attempt lost: the socket answered along the way.
    assert!(other.len() * 2 < tries as usize, "{other:?} of {tries}");
    // (RUNNING: its listener port was in LISTEN in the namespace, the old broker's, when the
    // tracker first looked; the state heuristics read listening per namespace.)
    assert_same_state(
        &agent,
        "10",
        &operator,
        &pods[1],
        &ca,
        &p12,
        &hosts,
        r#"{"brokerState":3}"#,
        "HTTP_2 200 brokerState=3",
    );
    assert_eq!(
        broker(&agent, "10").unwrap()["pod_listener"]["state"],
        "serving"
    );
    brokers.insert(1, next);

    // Live config: the allow list reaches the pod listeners; switching them off closes them.
    let patch = |body: &str| {
        let mut args = agent.client_args();
        args.extend(
            [
                "-X",
                "PATCH",
                "-H",
                "content-type: application/merge-patch+json",
                "--data-binary",
                body,
            ]
            .map(String::from),
        );
        args.push(agent.url("/v1/config"));
        // With the 1 rps limit this test sets, a patch right after a request waits its turn.
        for _ in 0..5 {
            let (code, text) = curl(&args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
            if code == 429 {
                std::thread::sleep(Duration::from_millis(1100));
                continue;
            }
            assert_eq!(code, 200, "{text}");
            return;
        }
        panic!("PATCH /v1/config still rate limited after 5 tries");
    };
    // (the rate limits: the allow list would lock this test's node client out too, as both
    // certificates say cluster-operator)
    patch(r#"{"server":{"rate_limit_rps":1,"rate_limit_burst":1}}"#);
    eventually("429 on the pod listener", Duration::from_secs(5), || {
        let (code, _) = pods[1]
            .curl(&operator, &ca.path("ca.crt"), op, "/v1/broker-state/")
            .unwrap();
        (code == 429).then_some(())
    });
    std::thread::sleep(Duration::from_millis(1100));
    patch(r#"{"server":{"rate_limit_rps":null,"rate_limit_burst":null}}"#);

    // A broker stop closes its pod's 8443 within 100 ms.
    let mut brokers = brokers.into_iter();
    let first = brokers.next().unwrap();
    let stopped = Instant::now();
    first.kill();
    eventually("8443 closed", Duration::from_secs(5), || {
        (!pods[0].answers(&operator)).then_some(())
    });
    let closed = stopped.elapsed();
    eprintln!("broker stop to 8443 closed: {closed:?}");
    assert!(closed <= scaled(Duration::from_millis(100)), "{closed:?}");

    // No descriptor of the agent keeps the dead pod's namespace: deleting it completes.
    let inode = pods[0].ns.inode();
    let fds = netns_fds(agent.pid());
    assert!(
        !fds.contains(&format!("net:[{inode}]")),
        "agent holds the pod's netns: {fds:?}"
    );
    let mut pods = pods.into_iter();
    let pod0 = pods.next().unwrap();
    let name = pod0.ns.name.clone();
    drop(pod0);
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&name));

    let rest: Vec<Pod> = pods.collect();
    assert!(rest.iter().all(|p| p.answers(&operator)));
    patch(r#"{"server":{"pod_listeners":false}}"#);
    eventually("pod listeners closed", Duration::from_secs(5), || {
        (!rest.iter().any(|p| p.answers(&operator))).then_some(())
    });
    assert!(broker(&agent, "10").unwrap().get("pod_listener").is_none());
}
