//! The agent's OCI image run the way the DaemonSet runs it: the archive `cargo xtask image`
//! writes, unpacked into a runc bundle whose config.json is generated from the rendered
//! DaemonSet (capabilities, host PID namespace, read-only root, user, host paths, volumes), so
//! the two cannot drift. Guards delete the container, its state, its bpffs and its bundle even
//! when a test panics.
//!
//! Where the container runtime of a node adds something the pod spec does not say (proc, /dev,
//! a read-only sysfs, masked /proc paths, a cgroup namespace of the container's own, as
//! containerd gives on cgroup v2 nodes), the runtime's defaults are written out here. One
//! departure: no `rlimits`/`resources` (refused on this machine's kind; a pod's limits are the
//! kubelet's cgroup settings, which do not change what the agent can do).

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::deploy::workspace;

/// The archive under test: `BROKERSCOPE_TEST_IMAGE`, else what `cargo xtask image` writes.
pub fn archive() -> PathBuf {
    std::env::var_os("BROKERSCOPE_TEST_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/image/brokerscope.oci.tar"))
}

/// An unpacked image: its config (the OCI image config JSON) and root filesystem.
pub struct Image {
    pub dir: tempfile::TempDir,
    pub config: Value,
}

impl Image {
    /// Unpacks the archive as a runtime would: index -> manifest -> config and layers.
    pub fn unpack() -> Self {
        let archive = archive();
        assert!(
            archive.exists(),
            "{} is missing: build it with `cargo xtask image` (cargo xtask test does)",
            archive.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("brokerscope-image-")
            .tempdir()
            .expect("tempdir");
        let layout = dir.path().join("layout");
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(&layout).unwrap();
        std::fs::create_dir_all(&rootfs).unwrap();
        crate::run_ok(
            Command::new("tar")
                .arg("-xf")
                .arg(&archive)
                .arg("-C")
                .arg(&layout),
        );
        let read_json = |p: PathBuf| -> Value {
            serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| {
                panic!("{}: {e}", p.display());
            }))
            .expect("JSON")
        };
        let blob = |digest: &Value| {
            let d = digest.as_str().expect("a digest");
            layout
                .join("blobs/sha256")
                .join(d.trim_start_matches("sha256:"))
        };
        let index = read_json(layout.join("index.json"));
        let manifests = index["manifests"].as_array().expect("manifests");
        assert_eq!(manifests.len(), 1, "{index}");
        let manifest = read_json(blob(&manifests[0]["digest"]));
        let config = read_json(blob(&manifest["config"]["digest"]));
        for layer in manifest["layers"].as_array().expect("layers") {
            assert_eq!(
                layer["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip",
                "{layer}"
            );
            crate::run_ok(
                Command::new("tar")
                    .arg("-xzf")
                    .arg(blob(&layer["digest"]))
                    .arg("-C")
                    .arg(&rootfs),
            );
        }
        Self { dir, config }
    }

    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// Every file in the image (paths relative to its root), sorted.
    pub fn files(&self) -> Vec<String> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
                let p = e.path();
                if e.file_type().unwrap().is_dir() {
                    walk(root, &p, out);
                } else {
                    out.push(p.strip_prefix(root).unwrap().display().to_string());
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.rootfs(), &self.rootfs(), &mut out);
        out.sort();
        out
    }
}

/// A directory laid out as the kubelet lays out a Secret (or ConfigMap) volume: the files in a
/// timestamped directory, `..data` a symlink to it, and each key a symlink through `..data`.
/// [`Self::swap`] updates it as the kubelet does: a new directory, `..data` replaced by
/// rename, the old one removed.
pub struct SecretVolume {
    pub dir: tempfile::TempDir,
    generation: u32,
}

impl SecretVolume {
    pub fn new(files: &[(&str, Vec<u8>)]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("brokerscope-secret-")
            .tempdir()
            .expect("tempdir");
        let mut volume = Self { dir, generation: 0 };
        volume.swap(files);
        for (key, _) in files {
            std::os::unix::fs::symlink(format!("..data/{key}"), volume.dir.path().join(key))
                .expect("key link");
        }
        volume
    }

    /// Writes a new generation of the files and points `..data` at it atomically.
    pub fn swap(&mut self, files: &[(&str, Vec<u8>)]) {
        use std::os::unix::fs::PermissionsExt as _;
        self.generation += 1;
        let root = self.dir.path();
        let name = format!(
            "..2026_12_05_00_00_{:02}.{}",
            self.generation,
            std::process::id()
        );
        let fresh = root.join(&name);
        std::fs::create_dir(&fresh).expect("mkdir generation");
        for (key, data) in files {
            let p = fresh.join(key);
            std::fs::write(&p, data).expect("write key");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
        }
        let old = std::fs::read_link(root.join("..data")).ok();
        let tmp = root.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&name, &tmp).expect("..data_tmp");
        std::fs::rename(&tmp, root.join("..data")).expect("swap ..data");
        if let Some(old) = old {
            std::fs::remove_dir_all(root.join(old)).expect("remove the old generation");
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A bpffs instance of the test's own, standing in for the node's /sys/fs/bpf: whatever the
/// agent pins there goes when it is unmounted, and no other test's pins are ever touched.
pub struct Bpffs {
    pub dir: tempfile::TempDir,
}

impl Bpffs {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("brokerscope-bpffs-")
            .tempdir()
            .expect("tempdir");
        crate::run_ok(
            Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(dir.path()),
        );
        Self { dir }
    }

    /// Entries pinned there now (recursively).
    pub fn entries(&self) -> Vec<String> {
        let out = crate::run_ok(
            Command::new("find")
                .arg(self.dir.path())
                .arg("-mindepth")
                .arg("1"),
        );
        out.lines().map(String::from).collect()
    }
}

impl Default for Bpffs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Where each volume of the pod comes from on this machine: volume name -> host directory.
/// hostPath volumes default to their own path unless named here.
pub struct Volumes<'a> {
    pub sources: Vec<(&'a str, PathBuf)>,
}

/// The container spec of the rendered DaemonSet's only container, and its pod spec.
pub fn daemonset_pod(objects: &[Value]) -> (Value, Value) {
    let ds = crate::deploy::find(objects, "DaemonSet", "brokerscope");
    let pod = ds["spec"]["template"]["spec"].clone();
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "one container: {containers:?}");
    (containers[0].clone(), pod)
}

/// The capabilities the DaemonSet adds, as runc names them (CAP_…).
pub fn daemonset_capabilities(container: &Value) -> Vec<String> {
    let caps = &container["securityContext"]["capabilities"];
    assert_eq!(
        caps["drop"],
        json!(["ALL"]),
        "the DaemonSet drops ALL first"
    );
    caps["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|c| format!("CAP_{}", c.as_str().expect("a name")))
        .collect()
}

/// The OCI runtime config for the DaemonSet's container: its command, user, capabilities
/// (`capabilities` unless overridden), read-only root, host PID namespace, and a mount per
/// volumeMount, from `volumes`; the network namespace is `netns` (the pod's network).
pub fn runtime_config(
    container: &Value,
    pod: &Value,
    capabilities: &[String],
    volumes: &Volumes<'_>,
    netns: &str,
) -> Value {
    let sc = &container["securityContext"];
    assert_eq!(sc["privileged"], json!(false), "{sc}");
    // runc runs it without a seccomp filter: only what the DaemonSet says, Unconfined.
    assert_eq!(sc["seccompProfile"]["type"], json!("Unconfined"), "{sc}");
    let mut args: Vec<Value> = container["command"].as_array().expect("command").clone();
    args.extend(container["args"].as_array().cloned().unwrap_or_default());
    let env = container_env(container);
    let namespaces = namespaces(pod, netns);
    let mounts = mounts(container, pod, volumes);

    let caps = json!(capabilities);
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {
                "uid": sc["runAsUser"].as_u64().expect("runAsUser"),
                "gid": sc["runAsGroup"].as_u64().expect("runAsGroup"),
            },
            "args": args,
            "env": env,
            "cwd": "/",
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps,
            },
            "noNewPrivileges": sc["allowPrivilegeEscalation"] == json!(false),
        },
        "root": {"path": "rootfs", "readonly": sc["readOnlyRootFilesystem"] == json!(true)},
        "hostname": "brokerscope-test",
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "maskedPaths": [
                "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
                "/sys/firmware", "/sys/devices/virtual/powercap"
            ],
            "readonlyPaths": [
                "/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                "/proc/sysrq-trigger"
            ],
        },
    })
}

/// The container's environment: a PATH, then its plain `env` values.
fn container_env(container: &Value) -> Vec<Value> {
    let mut env = vec![json!("PATH=/usr/local/bin")];
    for e in container["env"].as_array().cloned().unwrap_or_default() {
        env.push(json!(format!(
            "{}={}",
            e["name"].as_str().unwrap(),
            e["value"].as_str().expect("plain env values only")
        )));
    }
    env
}

/// The container's namespaces: its own but the network (`netns`), and the host's PID
/// namespace when the pod asks for it.
fn namespaces(pod: &Value, netns: &str) -> Vec<Value> {
    let mut namespaces = vec![
        json!({"type": "mount"}),
        json!({"type": "uts"}),
        json!({"type": "ipc"}),
        json!({"type": "cgroup"}),
        json!({"type": "network", "path": format!("/var/run/netns/{netns}")}),
    ];
    if pod["hostPID"] != json!(true) {
        namespaces.push(json!({"type": "pid"}));
    }
    namespaces
}

/// What containerd gives every non-privileged container, and a bind mount per volumeMount.
fn mounts(container: &Value, pod: &Value, volumes: &Volumes<'_>) -> Vec<Value> {
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]}),
    ];
    let pod_volumes = pod["volumes"].as_array().expect("volumes");
    for m in container["volumeMounts"].as_array().expect("volumeMounts") {
        let name = m["name"].as_str().unwrap();
        let volume = pod_volumes
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"));
        let source = match volumes.sources.iter().find(|(n, _)| *n == name) {
            Some((_, dir)) => dir.clone(),
            None => PathBuf::from(volume["hostPath"]["path"].as_str().unwrap_or_else(|| {
                panic!("volume {name} is not a hostPath: the test must provide it")
            })),
        };
        let ro = m["readOnly"] == json!(true);
        mounts.push(json!({
            "destination": m["mountPath"],
            "type": "bind",
            "source": source,
            "options": ["rbind", "rprivate", if ro { "ro" } else { "rw" }],
        }));
    }
    mounts
}

/// A container run by `runc run` (in the foreground, its stderr collected) from a bundle of
/// its own and a runc state directory of its own. Dropping it kills the container, waits for
/// it, deletes it and removes the bundle.
pub struct RuncContainer {
    pub id: String,
    child: Child,
    state: tempfile::TempDir,
    _bundle: tempfile::TempDir,
    pub log: Arc<Mutex<Vec<String>>>,
    /// When `runc run` was started.
    pub started: Instant,
    /// When the agent logged that it listens.
    pub listening: Option<Instant>,
    listening_rx: Option<mpsc::Receiver<Instant>>,
}

impl RuncContainer {
    /// Runs `image` with `config` (see [`runtime_config`]).
    pub fn run(image: &Image, config: &Value) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "brokerscope-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let bundle = tempfile::Builder::new()
            .prefix("brokerscope-bundle-")
            .tempdir()
            .expect("tempdir");
        // The unpacked image's root, shared by the containers of a test (runc mounts it
        // read-only itself when root.readonly is set).
        let mut config = config.clone();
        config["root"]["path"] = json!(image.rootfs());
        std::fs::write(
            bundle.path().join("config.json"),
            serde_json::to_vec_pretty(&config).unwrap(),
        )
        .unwrap();
        let state = tempfile::tempdir().expect("tempdir");
        let started = Instant::now();
        let mut child = Command::new("runc")
            .arg("--root")
            .arg(state.path())
            .args(["run", "--bundle"])
            .arg(bundle.path())
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("runc is installed by cargo xtask setup");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("step 5/5: listening") {
                    let _ = tx.send(Instant::now());
                }
                sink.lock().unwrap().push(line);
            }
        });
        Self {
            id,
            child,
            state,
            _bundle: bundle,
            log,
            started,
            listening: None,
            listening_rx: Some(rx),
        }
    }

    /// Waits (30 s at most) until the agent logs that it listens; panics with its log if it
    /// exits or does not.
    pub fn wait_listening(&mut self) -> Duration {
        let rx = self.listening_rx.take().expect("waited once");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(at) = rx.recv_timeout(Duration::from_millis(50)) {
                self.listening = Some(at);
                return at - self.started;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                panic!("the container exited ({status}):\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not listen within 30 s:\n{}",
                self.log_text()
            );
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The first log line containing `needle`, waited for up to 10 s.
    pub fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The container's process, as `runc state` reports it.
    pub fn pid(&self) -> u32 {
        let out = crate::run_ok(
            Command::new("runc")
                .arg("--root")
                .arg(self.state.path())
                .args(["state", &self.id]),
        );
        let state: Value = serde_json::from_str(&out).expect("runc state prints JSON");
        state["pid"].as_u64().expect("a pid") as u32
    }

    /// `runc exec` of `args` in the container (as a kubelet exec probe runs): exit status,
    /// stdout and stderr.
    pub fn exec(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("runc")
            .arg("--root")
            .arg(self.state.path())
            .args(["exec", &self.id])
            .args(args)
            .output()
            .expect("runc exec");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

impl Drop for RuncContainer {
    fn drop(&mut self) {
        let runc = |args: &[&str]| {
            Command::new("runc")
                .arg("--root")
                .arg(self.state.path())
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
        };
        let _ = runc(&["kill", &self.id, "KILL"]);
        // `runc run` returns once the container's process is gone; then its cgroups are empty
        // and `delete` can remove them.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !matches!(self.child.try_wait(), Ok(Some(_)) | Err(_)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = runc(&["delete", "--force", &self.id]);
    }
}
