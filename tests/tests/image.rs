//! The image `cargo xtask image` builds, run by runc the way the DaemonSet runs it: the config
//! is generated from the rendered DaemonSet (tests/src/image.rs), so capabilities, host PID
//! namespace, user, read-only root and mounts are the manifest's own. Inside, the agent finds
//! a broker running on the host as another user, counts its traffic to the byte, answers its
//! exec probes, and serves mTLS with a Secret-style volume whose `..data` swap rotates the
//! certificate under a scrape loop with no failed scrape. With a capability withheld it names
//! the capability.

use std::{
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use brokerscope_tests::{
    FakeBroker, FakeBrokerSpec, NetNs, Pki, curl, eventually, fake_request, find_sample,
    image::{
        Bpffs, Image, RuncContainer, SecretVolume, Volumes, daemonset_capabilities, daemonset_pod,
        runtime_config,
    },
    privileged,
};
use serde_json::Value;

/// One container at a time: each attaches the full program set.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Strimzi runs Kafka as this user.
const KAFKA_UID: u32 = 1001;

/// A server certificate as cert-manager issues the `brokerscope-server` Certificate (its
/// common name, DNS names, IP addresses and usages; an ECDSA P-256 key in SEC1 PEM, as
/// cert-manager writes it), signed by the test PKI's CA.
fn issue_server_certificate(pki: &Pki, certificate: &Value, serial: u32) -> (Vec<u8>, Vec<u8>) {
    let spec = &certificate["spec"];
    let dir = tempfile::tempdir().unwrap();
    let path = |f: &str| dir.path().join(f);
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    let mut san: Vec<String> = strings(&spec["dnsNames"])
        .into_iter()
        .map(|d| format!("DNS:{d}"))
        .collect();
    san.extend(
        strings(&spec["ipAddresses"])
            .into_iter()
            .map(|ip| format!("IP:{ip}")),
    );
    let eku: Vec<&str> = strings(&spec["usages"])
        .iter()
        .filter_map(|u| match u.as_str() {
            "server auth" => Some("serverAuth"),
            "client auth" => Some("clientAuth"),
            _ => None,
        })
        .collect();
    std::fs::write(
        path("ext"),
        format!(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage={}\nsubjectAltName={}\n",
            eku.join(","),
            san.join(",")
        ),
    )
    .unwrap();
    let cn = spec["commonName"].as_str().expect("commonName");
    let openssl = |args: &[&str]| {
        brokerscope_tests::run_ok(Command::new("openssl").args(args).current_dir(dir.path()))
    };
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "key.p8",
        "-subj",
        &format!("/CN={cn}"),
        "-out",
        "csr",
    ]);
    openssl(&["ec", "-in", "key.p8", "-out", "tls.key"]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "csr",
        "-CA",
        pki.path("ca.crt").to_str().unwrap(),
        "-CAkey",
        pki.path("ca.key").to_str().unwrap(),
        "-set_serial",
        &serial.to_string(),
        "-days",
        "7",
        "-extfile",
        "ext",
        "-out",
        "tls.crt",
    ]);
    (
        std::fs::read(path("tls.crt")).unwrap(),
        std::fs::read(path("tls.key")).unwrap(),
    )
}

fn secret_files(pki: &Pki, cert: (Vec<u8>, Vec<u8>)) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("ca.crt", std::fs::read(pki.path("ca.crt")).unwrap()),
        ("tls.crt", cert.0),
        ("tls.key", cert.1),
    ]
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Everything one container run needs, dropped in reverse: the container first.
struct Pod {
    container: RuncContainer,
    pki: Pki,
    secret: SecretVolume,
    certificate: Value,
    /// The pod's address on the veth, as Prometheus would reach it.
    address: String,
    _veth: brokerscope_tests::Veth,
    _netns: NetNs,
    bpffs: Bpffs,
    config: SecretVolume,
    /// The config as mounted (the ConfigMap's, discovery narrowed).
    config_text: String,
    _image: Image,
}

impl Pod {
    /// Runs the image with the DaemonSet's settings, `without` one of its capabilities when
    /// given, its discovery narrowed to brokers whose properties live under `brokers`.
    fn start(brokers: &Path, subnet: u8, without: Option<&str>) -> Self {
        let image = Image::unpack();
        let objects = brokerscope_tests::deploy::plain();
        let (container, pod) = daemonset_pod(&objects);
        let mut capabilities = daemonset_capabilities(&container);
        if let Some(cap) = without {
            let before = capabilities.len();
            capabilities.retain(|c| c != cap);
            assert_eq!(capabilities.len() + 1, before, "{cap} is in the set");
        }

        // The ConfigMap's config, its discovery narrowed to this test's brokers.
        let config_map =
            brokerscope_tests::deploy::find(&objects, "ConfigMap", "brokerscope-config");
        let shipped = config_map["data"]["brokerscope.toml"].as_str().unwrap();
        let line = r"cmdline_patterns = ['kafka\.Kafka']";
        assert!(shipped.contains(line), "{shipped}");
        let narrowed = shipped.replace(
            line,
            &format!(
                "cmdline_patterns = ['kafka\\.Kafka {}/']",
                regex::escape(&brokers.display().to_string())
            ),
        );
        // A ConfigMap volume is written as a Secret's is: `..data` swapped on every change.
        let config = SecretVolume::new(&[("brokerscope.toml", narrowed.clone().into_bytes())]);

        let pki = Pki::new();
        let certificate =
            brokerscope_tests::deploy::find(&objects, "Certificate", "brokerscope-server").clone();
        let secret = SecretVolume::new(&secret_files(
            &pki,
            issue_server_certificate(&pki, &certificate, 1001),
        ));
        let bpffs = Bpffs::new();
        let netns = NetNs::new();
        let veth = netns.veth(
            &format!("169.254.{subnet}.1/30"),
            &format!("169.254.{subnet}.2/30"),
        );
        let volumes = Volumes {
            sources: vec![
                ("config", config.path().to_path_buf()),
                ("tls", secret.path().to_path_buf()),
                ("bpffs", bpffs.dir.path().to_path_buf()),
            ],
        };
        let spec = runtime_config(&container, &pod, &capabilities, &volumes, &netns.name);
        let container = RuncContainer::run(&image, &spec);
        Pod {
            container,
            pki,
            secret,
            certificate,
            address: format!("169.254.{subnet}.2"),
            _veth: veth,
            _netns: netns,
            bpffs,
            config,
            config_text: narrowed,
            _image: image,
        }
    }

    /// GET over mTLS from the node, as Prometheus reaches the pod: (status, body).
    fn get(&self, path: &str) -> Result<(u16, String), String> {
        let p = |f: &str| self.pki.path(f).display().to_string();
        curl(&[
            "--resolve",
            &format!("localhost:8443:{}", self.address),
            "--cacert",
            &p("ca.crt"),
            "--cert",
            &p("client.crt"),
            "--key",
            &p("client.key"),
            &format!("https://localhost:8443{path}"),
        ])
    }

    fn get_ok(&self, path: &str) -> String {
        match self.get(path) {
            Ok((200, body)) => body,
            other => panic!("{path}: {other:?}\n{}", self.container.log_text()),
        }
    }

    /// The serial number of the certificate the agent presents now.
    fn served_serial(&self) -> String {
        let s_client = Command::new("openssl")
            .args(["s_client", "-connect", &format!("{}:8443", self.address)])
            .args(["-servername", "localhost"])
            .arg("-cert")
            .arg(self.pki.path("client.crt"))
            .arg("-key")
            .arg(self.pki.path("client.key"))
            .stdin(Stdio::null())
            .output()
            .expect("openssl");
        let mut x509 = Command::new("openssl")
            .args(["x509", "-noout", "-serial"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl");
        use std::io::Write as _;
        let _ = x509.stdin.take().unwrap().write_all(&s_client.stdout);
        let out = x509.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs the DaemonSet's exec probe `probe` in the container, as the kubelet does.
    fn probe(&self, probe: &str) -> (bool, String) {
        let objects = brokerscope_tests::deploy::plain();
        let (container, _) = daemonset_pod(&objects);
        let command: Vec<String> = container[probe]["exec"]["command"]
            .as_array()
            .unwrap_or_else(|| panic!("{probe} is an exec probe"))
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        let args: Vec<&str> = command.iter().map(String::as_str).collect();
        self.container.exec(&args)
    }
}

/// A broker of the node, outside the container, run as Kafka's user with a pod name.
fn host_broker(dir: &Path, id: &str) -> (FakeBroker, std::path::PathBuf) {
    chmod(dir, 0o755);
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("topic-0")).unwrap();
    std::fs::write(data.join("topic-0/00000000000000000000.log"), b"").unwrap();
    let props = dir.join("server.properties");
    std::fs::write(
        &props,
        format!(
            "node.id={id}\nlisteners=PLAINTEXT://127.0.0.1:{}\nlog.dirs={}\n",
            brokerscope_tests::free_port(),
            data.display()
        ),
    )
    .unwrap();
    // Kafka's user may not be able to reach the workspace: a copy of the binary beside.
    let bin = dir.join("fake-broker");
    std::fs::copy(brokerscope_tests::fake_broker_bin(), &bin).unwrap();
    brokerscope_tests::run_ok(Command::new("chmod").args(["-R", "a+rX"]).arg(dir));
    let broker = FakeBroker::start(FakeBrokerSpec {
        hostname: Some("kafka-0"),
        uid: Some(KAFKA_UID),
        bin: Some(&bin),
        ..FakeBrokerSpec::new(&props)
    });
    (broker, props)
}

#[test]
fn skopeo_and_buildah_take_the_archive_and_its_labels_name_the_version() {
    let archive = brokerscope_tests::image::archive();
    assert!(
        archive.exists(),
        "{} is missing: run `cargo xtask image`",
        archive.display()
    );
    let source = format!("oci-archive:{}", archive.display());
    let inspect = brokerscope_tests::run_ok(Command::new("skopeo").args(["inspect", &source]));
    let v: Value = serde_json::from_str(&inspect).expect("skopeo inspect prints JSON");
    let labels = &v["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    let revision = labels["org.opencontainers.image.revision"]
        .as_str()
        .unwrap();
    let hex = revision.trim_end_matches("-dirty");
    assert!(
        hex.len() == 40 && hex.chars().all(|c| c.is_ascii_hexdigit()),
        "{revision}"
    );
    assert_eq!(v["Architecture"], "amd64");
    assert_eq!(v["Layers"].as_array().map(Vec::len), Some(1), "{v}");
    let dest = tempfile::tempdir().unwrap();
    brokerscope_tests::run_ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &source,
        &format!("oci:{}:brokerscope", dest.path().display()),
    ]));
    assert!(dest.path().join("index.json").exists());

    // buildah pulls it into a store of the test's own (vfs: no mounts to undo) under the name
    // the index gives it.
    let store = tempfile::tempdir().unwrap();
    let buildah = |args: &[&str]| {
        brokerscope_tests::run_ok(
            Command::new("buildah")
                .arg("--root")
                .arg(store.path().join("root"))
                .arg("--runroot")
                .arg(store.path().join("run"))
                .args(["--storage-driver", "vfs"])
                .args(args),
        )
    };
    buildah(&["pull", "--quiet", &source]);
    let name = format!("brokerscope:{}", env!("CARGO_PKG_VERSION"));
    let labels = buildah(&[
        "inspect",
        "--format",
        "{{index .OCIv1.Config.Labels \"org.opencontainers.image.version\"}}",
        &name,
    ]);
    assert_eq!(labels.trim(), env!("CARGO_PKG_VERSION"));
    buildah(&["rmi", "--all"]);

    // Nothing but the binary and what it loads: no shell, no package manager.
    let image = Image::unpack();
    let files = image.files();
    eprintln!("image files: {files:?}");
    for f in &files {
        let name = f.rsplit('/').next().unwrap();
        assert!(
            f == "usr/local/bin/brokerscope"
                || name.starts_with("ld-linux")
                || name.starts_with("lib") && name.contains(".so"),
            "{f} in the image"
        );
    }
    assert_eq!(
        image.config["config"]["Entrypoint"][0],
        daemonset_pod(&brokerscope_tests::deploy::plain()).0["command"][0]
    );
}

#[test]
fn the_image_runs_as_the_daemonset_says_counts_a_host_broker_and_rotates_its_certificate() {
    if !privileged("the_image_runs_as_the_daemonset_says") {
        return;
    }
    let _serial = serial();
    let brokers = tempfile::tempdir().unwrap();
    let (broker, _) = host_broker(brokers.path(), "71");
    let mut pod = Pod::start(brokers.path(), 213, None);
    let to_listen = pod.container.wait_listening();

    // The kubelet's view: liveness at once, readiness once probes and discovery are done.
    let (live, out) = pod.probe("livenessProbe");
    assert!(
        live,
        "liveness probe failed: {out}\n{}",
        pod.container.log_text()
    );
    let ready_at = eventually("the readiness probe", Duration::from_secs(20), || {
        pod.probe("readinessProbe").0.then(Instant::now)
    });
    eprintln!(
        "image start-up: runc run to listening {to_listen:?}, to ready {:?}",
        ready_at - pod.container.started
    );
    let log = pod.container.log_text();
    assert!(!log.contains("missing capability"), "{log}");

    // The broker on the host, run as Kafka's user: read through its own root and environ.
    let found: Value = eventually("broker 71 listed", Duration::from_secs(10), || {
        let body = pod.get_ok("/v1/brokers/71");
        let b: Value = serde_json::from_str(&body).unwrap();
        (b["pid"] == broker.pid && b["broker_state"]["name"] == "RUNNING").then_some(b)
    });
    assert_eq!(found["pod"], "kafka-0", "{found}");
    assert_eq!(found["evidence"]["properties_read"], true, "{found}");
    assert_eq!(
        found["evidence"]["errors"],
        serde_json::json!([]),
        "{found}"
    );
    // From the container's own cgroup namespace every other cgroup reads /..: the agent joined
    // the node's, so the broker's is the node's path, with its id.
    pod.container
        .wait_for_log("joined the node's cgroup namespace");
    let cgroup = &found["cgroup"];
    assert!(
        cgroup["path"]
            .as_str()
            .is_some_and(|p| !p.starts_with("/.."))
            && cgroup["id"].is_u64(),
        "{found}"
    );

    // Its traffic, to the byte: each request is a 9-byte header and its body up, the answer down.
    let port = broker.listeners[0].1;
    let requests = [(100u32, 1000u32), (2000, 50), (0, 70_000)];
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for (n, m) in requests {
        fake_request(&mut s, n, m).unwrap();
    }
    drop(s);
    let up: u32 = requests.iter().map(|(n, _)| 9 + n).sum();
    let down: u32 = requests.iter().map(|(_, m)| m).sum();
    let port_text = port.to_string();
    let labels = [
        ("broker", "71"),
        ("listener", "PLAINTEXT"),
        ("port", port_text.as_str()),
    ];
    let want = [
        ("brokerscope_connections_accepted_total", 1.0),
        ("brokerscope_connections_closed_total", 1.0),
        ("brokerscope_bytes_received_total", f64::from(up)),
        ("brokerscope_bytes_sent_total", f64::from(down)),
    ];
    eventually("the broker's exact counts", Duration::from_secs(10), || {
        let page = pod.get_ok("/metrics");
        want.iter()
            .all(|(name, v)| find_sample(&page, name, &labels) == Some(*v))
            .then_some(())
    });

    // Certificate rotation, the kubelet's way, under a scrape loop at Prometheus's pace ×300
    // (every 100 ms, within the default rate limit).
    assert_eq!(pod.served_serial(), "serial=03E9");
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let scraper = {
        let (stop, ok, failed, failures) =
            (stop.clone(), ok.clone(), failed.clone(), failures.clone());
        let p = |f: &str| pod.pki.path(f).display().to_string();
        let args: Vec<String> = vec![
            "--resolve".into(),
            format!("localhost:8443:{}", pod.address),
            "--cacert".into(),
            p("ca.crt"),
            "--cert".into(),
            p("client.crt"),
            "--key".into(),
            p("client.key"),
            "https://localhost:8443/metrics".into(),
        ];
        std::thread::spawn(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            while !stop.load(Ordering::Relaxed) {
                match curl(&args) {
                    Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        failures.lock().unwrap().push(format!("{other:?}"));
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let renewed = issue_server_certificate(&pod.pki, &pod.certificate, 1002);
    let files = secret_files(&pod.pki, renewed);
    let swapped = Instant::now();
    let before = ok.load(Ordering::Relaxed);
    pod.secret.swap(&files);
    let rotated = eventually(
        "the renewed certificate served",
        Duration::from_secs(5),
        || (pod.served_serial() == "serial=03EA").then(|| swapped.elapsed()),
    );
    let at_rotation = ok.load(Ordering::Relaxed);
    // Scrapes on the renewed certificate too: a second's worth, and at least 3 however slow
    // the machine.
    std::thread::sleep(Duration::from_secs(1));
    let deadline = Instant::now() + Duration::from_secs(10);
    while ok.load(Ordering::Relaxed) < at_rotation + 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    scraper.join().unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "rotation: served {rotated:?} after the swap; scrapes {ok} ok ({before} before the swap, \
         {} after the renewed certificate was seen), {failed} failed",
        ok - at_rotation
    );
    assert_eq!(failed, 0, "failed scrapes: {:?}", failures.lock().unwrap());
    assert!(
        before >= 3 && ok >= at_rotation + 3,
        "the scrapes did not span the rotation: {before} before, {} after",
        ok - at_rotation
    );
    let page = pod.get_ok("/metrics");
    assert_eq!(
        find_sample(&page, "brokerscope_tls_reloads_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        find_sample(&page, "brokerscope_tls_reload_failures_total", &[]),
        Some(0.0)
    );
    // The probes present the renewed certificate too.
    assert!(pod.probe("readinessProbe").0);

    // An edit of the ConfigMap reaches the agent as a `..data` swap, and applies live.
    let edited = pod
        .config_text
        .replace("[server]\n", "[server]\nrate_limit_rps = 50\n");
    assert_ne!(edited, pod.config_text);
    pod.config
        .swap(&[("brokerscope.toml", edited.into_bytes())]);
    eventually(
        "the edited ConfigMap applied",
        Duration::from_secs(10),
        || {
            let page = pod.get_ok("/metrics");
            (find_sample(&page, "brokerscope_config_generation", &[]) == Some(1.0)).then_some(())
        },
    );
    pod.container
        .wait_for_log("key=server.rate_limit_rps old=20 new=50");

    // bpffs's own preloaded iterators, and nothing pinned that outlives the test's instance.
    eprintln!("bpffs entries at the end: {:?}", pod.bpffs.entries());
    drop(pod);
    drop(broker);
}

#[test]
fn a_capability_withheld_from_the_daemonset_set_is_named() {
    if !privileged("a_capability_withheld_from_the_daemonset_set_is_named") {
        return;
    }
    let _serial = serial();
    let brokers = tempfile::tempdir().unwrap();
    let (broker, _) = host_broker(brokers.path(), "72");
    let mut pod = Pod::start(brokers.path(), 214, Some("CAP_SYS_PTRACE"));
    pod.container.wait_listening();
    let line = pod
        .container
        .wait_for_log("missing capability capability=CAP_SYS_PTRACE");
    assert!(line.contains("/proc/<pid>/root"), "{line}");
    // Only that one: the rest of the set is there.
    let log = pod.container.log_text();
    assert_eq!(log.matches("missing capability").count(), 1, "{log}");
    // And what it costs, where it shows: the broker is listed (by its pod name: environ is
    // still readable) but its root and namespaces cannot be read.
    let found: Value = eventually("the broker listed", Duration::from_secs(10), || {
        let body = pod.get_ok("/v1/brokers");
        let list: Vec<Value> = serde_json::from_str(&body).unwrap();
        list.into_iter().find(|b| b["pid"] == broker.pid)
    });
    assert_eq!(found["id"], "kafka-0", "{found}");
    assert_eq!(found["evidence"]["id_source"], "pod", "{found}");
    assert_eq!(found["broker_state"]["name"], "UNKNOWN", "{found}");
    let errors = found["evidence"]["errors"].to_string();
    assert!(
        errors.contains("cannot open its root: Permission denied"),
        "{errors}"
    );
}

/// Whatever a test leaves when it panics with a container running goes with its guards: the
/// agent's process (and so its programs), the container's cgroups, the test's bpffs and the
/// bundle.
#[test]
fn a_panicking_test_leaves_no_container_behind() {
    if !privileged("a_panicking_test_leaves_no_container_behind") {
        return;
    }
    let _serial = serial();
    let brokers = tempfile::tempdir().unwrap();
    let mut pod = Pod::start(brokers.path(), 215, None);
    pod.container.wait_listening();
    let pid = pod.container.pid();
    let cgroups: Vec<std::path::PathBuf> = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let dir = match controllers {
                "" => "unified".to_string(),
                c => c.trim_start_matches("name=").to_string(),
            };
            Some(
                Path::new("/sys/fs/cgroup")
                    .join(dir)
                    .join(path.trim_start_matches('/')),
            )
        })
        .filter(|p| p.exists())
        .collect();
    assert!(!cgroups.is_empty(), "the container's cgroups are visible");
    // The programs it attached, whose links it pinned in the test's bpffs.
    let programs: Vec<String> = pod
        .container
        .log_text()
        .lines()
        .filter(|l| l.contains(" attached program="))
        .filter_map(|l| l.split(" id=").nth(1))
        .filter_map(|id| id.split_whitespace().next().map(String::from))
        .collect();
    assert!(!programs.is_empty(), "{}", pod.container.log_text());
    assert!(
        !pod.bpffs.entries().is_empty(),
        "the agent pins into the node's /sys/fs/bpf (here the test's)"
    );
    let loaded = |id: &String| {
        Command::new("bpftool")
            .args(["prog", "show", "id", id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    assert!(programs.iter().all(loaded), "bpftool sees {programs:?}");
    let bpffs = pod.bpffs.dir.path().to_path_buf();
    let mounted = |dir: &Path| {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(&format!(" {} ", dir.display()))
    };
    assert!(mounted(&bpffs));

    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _pod = pod;
        panic!("a test failing with its container running");
    }));
    assert!(outcome.is_err());
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the agent (pid {pid}) outlived the test"
    );
    for dir in &cgroups {
        assert!(!dir.exists(), "{} is left", dir.display());
    }
    assert!(!mounted(&bpffs), "{} is still mounted", bpffs.display());
    assert!(!bpffs.exists(), "{} is left", bpffs.display());
    // Its pins went with that bpffs: every program it attached is detached and gone.
    eventually("the pinned programs gone", Duration::from_secs(5), || {
        programs.iter().all(|id| !loaded(id)).then_some(())
    });
}
