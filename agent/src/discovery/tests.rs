//! Discovery over a fake proc tree: every file a real /proc has that discovery reads, in a
//! temporary directory, so scans, exec/exit events and restarts run without privileges.

use std::{os::unix::fs::MetadataExt as _, path::Path};

use super::*;

struct FakeProc {
    dir: tempfile::TempDir,
}

/// One fake process.
struct P<'a> {
    pid: u32,
    args: &'a [&'a str],
    start: u64,
    env: &'a [&'a str],
    /// Files in the process's root, (absolute path, content).
    files: &'a [(&'a str, &'a str)],
    cwd: &'a str,
    cgroup: &'a str,
    /// Network namespace name: same name, same inode.
    netns: &'a str,
}

impl Default for P<'_> {
    fn default() -> Self {
        Self {
            pid: 0,
            args: &[],
            start: 1000,
            env: &[],
            files: &[],
            cwd: "/",
            cgroup: "/kubepods/pod1/c1",
            netns: "host",
        }
    }
}

impl FakeProc {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("proc")).unwrap();
        std::fs::write(
            dir.path().join("proc/stat"),
            "cpu 1 2 3\nbtime 1700000000\n",
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("cgroup/kubepods/pod1/c1")).unwrap();
        Self { dir }
    }

    fn proc(&self) -> ProcFs {
        ProcFs::at(self.dir.path().join("proc"))
    }

    fn cgroup2(&self) -> PathBuf {
        self.dir.path().join("cgroup")
    }

    fn pid_dir(&self, pid: u32) -> PathBuf {
        self.dir.path().join("proc").join(pid.to_string())
    }

    fn spawn(&self, p: P<'_>) {
        let d = self.pid_dir(p.pid);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("ns")).unwrap();
        let cmdline: Vec<u8> = p.args.iter().flat_map(|a| a.bytes().chain([0])).collect();
        std::fs::write(d.join("cmdline"), cmdline).unwrap();
        std::fs::write(d.join("status"), format!("Name:\tjava\nTgid:\t{}\n", p.pid)).unwrap();
        self.set_start(p.pid, p.start, 'S');
        std::fs::write(
            d.join("cgroup"),
            format!("1:name=systemd:/x\n0::{}\n", p.cgroup),
        )
        .unwrap();
        let env: Vec<u8> = p.env.iter().flat_map(|a| a.bytes().chain([0])).collect();
        std::fs::write(d.join("environ"), env).unwrap();
        // A file per namespace name stands in for it: its inode plays the netns inode.
        let ns = self.dir.path().join("netns").join(p.netns);
        std::fs::create_dir_all(ns.parent().unwrap()).unwrap();
        if !ns.exists() {
            std::fs::write(&ns, "").unwrap();
        }
        std::fs::hard_link(&ns, d.join("ns/net")).unwrap();
        let rootfs = self.dir.path().join(format!("rootfs-{}", p.pid));
        let _ = std::fs::remove_dir_all(&rootfs);
        std::fs::create_dir_all(&rootfs).unwrap();
        for (path, content) in p.files {
            let f = rootfs.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, content).unwrap();
        }
        let cwd = rootfs.join(p.cwd.trim_start_matches('/'));
        std::fs::create_dir_all(&cwd).unwrap();
        std::os::unix::fs::symlink(&rootfs, d.join("root")).unwrap();
        std::os::unix::fs::symlink(&cwd, d.join("cwd")).unwrap();
    }

    fn set_start(&self, pid: u32, start: u64, state: char) {
        let fields: Vec<String> = (4..=21).map(|i| i.to_string()).collect();
        std::fs::write(
            self.pid_dir(pid).join("stat"),
            // As long as the kernel writes it (52 fields): the parser wants at least 37.
            format!(
                "{pid} (java) {state} {} {start} {}\n",
                fields.join(" "),
                (23..=52)
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        )
        .unwrap();
    }

    fn kill(&self, pid: u32) {
        std::fs::remove_dir_all(self.pid_dir(pid)).unwrap();
    }

    fn netns(&self, pid: u32) -> u32 {
        std::fs::metadata(self.pid_dir(pid).join("ns/net"))
            .unwrap()
            .ino() as u32
    }

    fn discovery(&self, ports: &[u16]) -> (Arc<Discovery>, Arc<Model>) {
        let model = Arc::new(Model::default());
        let d = Discovery::with_proc(
            Settings {
                cmdline_patterns: vec![r"kafka\.Kafka".into()],
                listener_ports: ports.to_vec(),
                cgroup2: Some(self.cgroup2()),
            },
            model.clone(),
            self.proc(),
            Workers::new("test-files", 4),
        )
        .unwrap();
        (Arc::new(d), model)
    }
}

const KRAFT: &str = "process.roles=broker,controller\n\
node.id=1\n\
listeners=PLAINTEXT://:9092,CONTROLLER://:9093\n\
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
log.dirs=/var/lib/kafka\n";

/// An exec event, waited for (discovery examines on a thread of its own).
fn exec(d: &Arc<Discovery>, pid: u32) {
    if let Some(done) = d.on_exec(pid) {
        done.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the examination ended");
    }
}

fn summary(model: &Model) -> Vec<(String, u32, ProcessStatus, u64)> {
    model
        .brokers()
        .into_iter()
        .map(|b| (b.id, b.pid, b.state, b.restarts))
        .collect()
}

#[test]
fn finds_brokers_and_reads_them_through_their_root() {
    let fake = FakeProc::new();
    fake.spawn(P {
        pid: 100,
        args: &[
            "java",
            "-cp",
            "x",
            "kafka.Kafka",
            "/opt/kafka/server.properties",
        ],
        env: &["PATH=/bin", "HOSTNAME=kafka-0"],
        files: &[("/opt/kafka/server.properties", KRAFT)],
        start: 5000,
        ..P::default()
    });
    fake.spawn(P {
        pid: 200,
        args: &["bash", "-c", "sleep 1"],
        ..P::default()
    });
    let (d, model) = fake.discovery(&[]);
    assert!(!model.readiness().reasons.is_empty());
    assert!(
        model
            .readiness()
            .reasons
            .contains(&"discovery has not run yet".to_string())
    );
    let s = d.scan_all().unwrap();
    assert_eq!(
        s,
        ScanSummary {
            processes: 2,
            running: 1
        }
    );
    assert!(
        !model
            .readiness()
            .reasons
            .iter()
            .any(|r| r.starts_with("discovery"))
    );

    let b = model.broker("1").unwrap();
    assert_eq!(b.pid, 100);
    assert_eq!(b.state, ProcessStatus::Running);
    assert_eq!(b.pod.as_deref(), Some("kafka-0"));
    assert_eq!(b.netns, Some(fake.netns(100)));
    assert_eq!(b.cgroup.path.as_deref(), Some("/kubepods/pod1/c1"));
    assert_eq!(
        b.cgroup.id,
        Some(
            std::fs::metadata(fake.cgroup2().join("kubepods/pod1/c1"))
                .unwrap()
                .ino()
        )
    );
    assert_eq!(b.start_time_ticks, 5000);
    assert_eq!(
        b.started_at,
        Some(1_700_000_000 + 5000 / proc::clock_ticks())
    );
    assert_eq!(b.process_roles, vec!["broker", "controller"]);
    assert_eq!(b.log_dirs, vec!["/var/lib/kafka"]);
    let ls: Vec<(&str, u16, Option<&str>)> = b
        .listeners
        .iter()
        .map(|l| (l.name.as_str(), l.port, l.security_protocol.as_deref()))
        .collect();
    assert_eq!(
        ls,
        vec![
            ("PLAINTEXT", 9092, Some("PLAINTEXT")),
            ("CONTROLLER", 9093, Some("PLAINTEXT"))
        ]
    );
    assert_eq!(
        b.evidence,
        Evidence {
            matched_pattern: r"kafka\.Kafka".into(),
            cmdline: "java -cp x kafka.Kafka /opt/kafka/server.properties".into(),
            id_source: Some(IdSource::NodeId),
            properties_path: Some("/opt/kafka/server.properties".into()),
            properties_read: true,
            overrides: vec![],
            listeners_source: Some(ListenersSource::Properties),
            errors: vec![],
            files_stalled: false,
        }
    );
    assert_eq!(model.brokers().len(), 1);
}

#[test]
fn relative_properties_resolve_against_cwd_and_overrides_win() {
    let fake = FakeProc::new();
    fake.spawn(P {
        pid: 100,
        args: &[
            "java",
            "kafka.Kafka",
            "config/server.properties",
            "--override",
            "node.id=7",
            "--override",
            "listeners=SSL://[::1]:9443",
        ],
        files: &[("/opt/kafka/config/server.properties", KRAFT)],
        cwd: "/opt/kafka",
        ..P::default()
    });
    let (d, model) = fake.discovery(&[]);
    d.scan_all().unwrap();
    let b = model.broker("7").unwrap();
    assert!(b.evidence.properties_read);
    assert_eq!(b.evidence.overrides, vec!["node.id", "listeners"]);
    assert_eq!(b.listeners.len(), 1);
    assert_eq!(
        (
            b.listeners[0].name.as_str(),
            b.listeners[0].host.as_str(),
            b.listeners[0].port
        ),
        ("SSL", "::1", 9443)
    );
    // The file's other settings still apply.
    assert_eq!(b.log_dirs, vec!["/var/lib/kafka"]);
}

#[test]
fn unreadable_config_is_tracked_with_fallbacks_and_the_reason() {
    let fake = FakeProc::new();
    fake.spawn(P {
        pid: 100,
        args: &["java", "kafka.Kafka", "/missing/server.properties"],
        env: &["HOSTNAME=kafka-2"],
        ..P::default()
    });
    fake.spawn(P {
        pid: 101,
        args: &["java", "kafka.Kafka", "/bad.properties"],
        files: &[("/bad.properties", "node.id=\\uXYZ1\n")],
        ..P::default()
    });
    let (d, model) = fake.discovery(&[9092, 9093]);
    d.scan_all().unwrap();
    let brokers = model.brokers();
    let ids: Vec<&str> = brokers.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(ids, vec!["kafka-2", "pid-101"]);

    let b = &brokers[0];
    assert_eq!(b.evidence.id_source, Some(IdSource::Pod));
    assert!(!b.evidence.properties_read);
    assert_eq!(
        b.evidence.listeners_source,
        Some(ListenersSource::ConfiguredPorts)
    );
    let ls: Vec<(&str, u16)> = b
        .listeners
        .iter()
        .map(|l| (l.name.as_str(), l.port))
        .collect();
    assert_eq!(ls, vec![("port-9092", 9092), ("port-9093", 9093)]);
    assert_eq!(b.log_dirs, Vec::<String>::new());
    assert_eq!(b.evidence.errors.len(), 1, "{:?}", b.evidence.errors);
    // The path as the process named it, nothing of where the agent looked.
    assert_eq!(
        b.evidence.errors,
        ["properties file /missing/server.properties: no such file or directory"]
    );

    let b = &brokers[1];
    assert_eq!(b.evidence.id_source, Some(IdSource::Pid));
    assert_eq!(
        b.evidence.errors,
        vec!["properties file /bad.properties not parsed: line 1: malformed \\uXXXX escape"]
    );

    // Live config: the fallback ports change at once; brokers with a read config are untouched.
    d.set_listener_ports(&[19092]);
    let ports: Vec<Vec<u16>> = model
        .brokers()
        .iter()
        .map(|b| b.listeners.iter().map(|l| l.port).collect())
        .collect();
    assert_eq!(ports, vec![vec![19092], vec![19092]]);
}

#[test]
fn exit_and_restart_keep_identity_and_count() {
    let fake = FakeProc::new();
    let broker = |pid, start| P {
        pid,
        start,
        args: &["java", "kafka.Kafka", "/s.properties"],
        files: &[("/s.properties", KRAFT)],
        ..P::default()
    };
    fake.spawn(broker(100, 10));
    let (d, model) = fake.discovery(&[]);
    d.scan_all().unwrap();
    assert_eq!(
        summary(&model),
        vec![("1".into(), 100, ProcessStatus::Running, 0)]
    );

    // Exit event: stops at once, no scan needed.
    fake.kill(100);
    d.on_exit(100);
    assert_eq!(
        summary(&model),
        vec![("1".into(), 100, ProcessStatus::NotRunning, 0)]
    );
    // Exit of an unrelated pid changes nothing.
    d.on_exit(12345);

    // Exec event of the restarted broker.
    fake.spawn(broker(150, 20));
    exec(&d, 150);
    assert_eq!(
        summary(&model),
        vec![("1".into(), 150, ProcessStatus::Running, 1)]
    );
    d.scan_all().unwrap();
    assert_eq!(
        summary(&model),
        vec![("1".into(), 150, ProcessStatus::Running, 1)]
    );

    // A restart only a scan sees (no events): old gone, new there.
    fake.kill(150);
    fake.spawn(broker(160, 30));
    d.scan_all().unwrap();
    assert_eq!(
        summary(&model),
        vec![("1".into(), 160, ProcessStatus::Running, 2)]
    );

    // The pid is reused by a new broker process with a later start time.
    fake.spawn(broker(160, 40));
    d.scan_all().unwrap();
    assert_eq!(
        summary(&model),
        vec![("1".into(), 160, ProcessStatus::Running, 3)]
    );

    // A kill only a scan sees.
    fake.kill(160);
    d.scan_all().unwrap();
    assert_eq!(
        summary(&model),
        vec![("1".into(), 160, ProcessStatus::NotRunning, 3)]
    );
}

#[test]
fn exec_into_something_else_and_zombies_stop_a_broker() {
    let fake = FakeProc::new();
    let p = |pid, args| P {
        pid,
        args,
        files: &[("/s.properties", KRAFT)],
        ..P::default()
    };
    fake.spawn(p(100, &["java", "kafka.Kafka", "/s.properties"]));
    let (d, model) = fake.discovery(&[]);
    d.scan_all().unwrap();
    // Same pid, same start time (exec keeps both), another program.
    fake.spawn(p(100, &["sh", "-c", "true"]));
    exec(&d, 100);
    assert_eq!(
        summary(&model),
        vec![("1".into(), 100, ProcessStatus::NotRunning, 0)]
    );

    fake.spawn(p(100, &["java", "kafka.Kafka", "/s.properties"]));
    exec(&d, 100);
    assert_eq!(
        summary(&model),
        vec![("1".into(), 100, ProcessStatus::Running, 1)]
    );
    fake.set_start(100, 1000, 'Z');
    d.scan_all().unwrap();
    assert_eq!(
        summary(&model),
        vec![("1".into(), 100, ProcessStatus::NotRunning, 1)]
    );
}

#[test]
fn a_wrapper_seen_before_its_exec_is_read_again() {
    let fake = FakeProc::new();
    // `ip netns exec ns1 fake-broker kafka.Kafka /s.properties` before its exec: it matches, but
    // it is still `ip`, in our namespace, without the broker's environment.
    let wrapper = P {
        pid: 100,
        args: &[
            "ip",
            "netns",
            "exec",
            "ns1",
            "java",
            "kafka.Kafka",
            "/s.properties",
        ],
        files: &[("/s.properties", KRAFT)],
        ..P::default()
    };
    fake.spawn(wrapper);
    let (d, model) = fake.discovery(&[]);
    d.scan_all().unwrap();
    assert_eq!(model.broker("1").unwrap().pod, None);
    let old_netns = model.broker("1").unwrap().netns;

    // After the exec: same pid and start time, new command line, namespace and environment.
    let after = || P {
        pid: 100,
        args: &["java", "kafka.Kafka", "/s.properties"],
        env: &["HOSTNAME=kafka-1"],
        files: &[("/s.properties", KRAFT)],
        netns: "ns1",
        ..P::default()
    };
    fake.spawn(after());
    assert_ne!(Some(fake.netns(100)), old_netns);
    d.scan_all().unwrap();
    let b = model.broker("1").unwrap();
    assert_eq!(
        (b.pod.as_deref(), b.netns, b.restarts),
        (Some("kafka-1"), Some(fake.netns(100)), 0)
    );
    assert_eq!(b.evidence.cmdline, "java kafka.Kafka /s.properties");

    // on_exec always reads again, even when the command line did not change.
    std::fs::write(fake.pid_dir(100).join("environ"), "HOSTNAME=kafka-1b\0").unwrap();
    d.scan_all().unwrap();
    assert_eq!(model.broker("1").unwrap().pod.as_deref(), Some("kafka-1"));
    exec(&d, 100);
    let b = model.broker("1").unwrap();
    assert_eq!((b.pod.as_deref(), b.restarts), (Some("kafka-1b"), 0));
    assert_eq!(model.brokers().len(), 1);
}

#[test]
fn threads_and_our_own_process_are_not_brokers() {
    let fake = FakeProc::new();
    fake.spawn(P {
        pid: 100,
        args: &["java", "kafka.Kafka", "/s.properties"],
        files: &[("/s.properties", KRAFT)],
        ..P::default()
    });
    // A thread of 100: /proc/101 exists (reachable by tid) with Tgid 100.
    fake.spawn(P {
        pid: 101,
        args: &["java", "kafka.Kafka", "/s.properties"],
        ..P::default()
    });
    std::fs::write(fake.pid_dir(101).join("status"), "Tgid:\t100\n").unwrap();
    // Our own pid, even if its command line matched.
    let me = std::process::id();
    fake.spawn(P {
        pid: me,
        args: &["brokerscope", "kafka.Kafka"],
        ..P::default()
    });
    let (d, model) = fake.discovery(&[]);
    exec(&d, 101);
    exec(&d, me);
    assert_eq!(model.brokers().len(), 0);
    d.scan_all().unwrap();
    assert_eq!(
        summary(&model),
        vec![("1".into(), 100, ProcessStatus::Running, 0)]
    );
}

#[test]
fn patterns_change_live_and_bad_ones_are_refused() {
    let fake = FakeProc::new();
    fake.spawn(P {
        pid: 100,
        args: &["/bin/my-broker", "kafka.Kafka", "/s.properties"],
        files: &[("/s.properties", KRAFT)],
        ..P::default()
    });
    let (d, model) = fake.discovery(&[]);
    d.set_patterns(&["nothing-matches".into()]).unwrap();
    d.scan_all().unwrap();
    assert_eq!(model.brokers().len(), 0);
    assert!(matches!(
        d.set_patterns(&["(".into()]),
        Err(DiscoveryError::Pattern(_))
    ));
    d.set_patterns(&["my-broker".into()]).unwrap();
    d.scan_all().unwrap();
    let b = model.broker("1").unwrap();
    assert_eq!(b.evidence.matched_pattern, "my-broker");

    // Patterns that no longer match a known broker stop it at the next scan.
    d.set_patterns(&["other-broker".into()]).unwrap();
    d.scan_all().unwrap();
    assert_eq!(
        summary(&model),
        vec![("1".into(), 100, ProcessStatus::NotRunning, 0)]
    );
}

#[test]
fn a_missing_proc_is_a_discovery_error_that_readiness_names() {
    let model = Arc::new(Model::default());
    let d = Discovery::with_proc(
        Settings {
            cmdline_patterns: vec![],
            listener_ports: vec![],
            cgroup2: None,
        },
        model.clone(),
        ProcFs::at(Path::new("/nonexistent-proc")),
        Workers::new("test-files", 1),
    )
    .unwrap();
    let e = d.scan_all().unwrap_err();
    assert!(
        e.to_string()
            .starts_with("cannot list processes: cannot read /nonexistent-proc"),
        "{e}"
    );
    let reasons = model.readiness().reasons;
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("discovery has not run yet: cannot list processes")),
        "{reasons:?}"
    );
}
