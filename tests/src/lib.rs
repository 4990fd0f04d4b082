//! Helpers for the privileged end-to-end tests: the real agent binary with a throwaway PKI,
//! real clients (curl, openssl, bpftool), and guards that clean up even when a test panics.
//!
//! The binary comes from `BROKERSCOPE_TEST_BIN` (set by `cargo xtask test`) or target/debug.

pub mod deploy;
pub mod image;
pub mod kernel;

use std::{
    io::{BufRead as _, BufReader},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

/// Path of the agent binary under test.
pub fn agent_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("BROKERSCOPE_TEST_BIN") {
        return bin.into();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/brokerscope")
}

/// True when running as root; otherwise prints why the test is skipped. `cargo xtask test`
/// refuses to run these tests unprivileged, so a skip only happens under a bare `cargo test`.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!(
            "SKIPPED {test}: needs root (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN) to load eBPF programs"
        );
    }
    root
}

/// How many times longer than on a real machine the tests' time budgets may be:
/// `BROKERSCOPE_TEST_TIME_SCALE` (default 1). `cargo xtask vmtest` sets it in its emulated
/// guests (TCG), where the same work takes 5-20 times as long.
pub fn time_scale() -> u32 {
    std::env::var("BROKERSCOPE_TEST_TIME_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

/// `budget` times [`time_scale`].
pub fn scaled(budget: Duration) -> Duration {
    budget * time_scale()
}

/// A throwaway PKI made by `brokerscope pki dev`.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Self {
        Self::with_args(&[])
    }

    /// `brokerscope pki dev` with extra arguments, e.g. `--not-after=-1d`.
    pub fn with_args(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = Command::new(agent_bin())
            .args(["pki", "dev", "--out"])
            .arg(dir.path())
            .args(args)
            .stdout(Stdio::null())
            .status()
            .expect("run brokerscope pki dev");
        assert!(
            status.success(),
            "brokerscope pki dev {args:?} failed: {status}"
        );
        Self { dir }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

/// The inode of this process's network namespace, as the agent labels it.
pub fn own_netns() -> u32 {
    std::fs::metadata("/proc/self/ns/net")
        .expect("stat /proc/self/ns/net")
        .ino() as u32
}

/// Where the tests' agents pin their maps and links: a directory of each test's own below it.
pub const TEST_PIN_ROOT: &str = "/sys/fs/bpf/brokerscope-tests";

/// A pin directory of a test's own under bpffs (`probes.pin_dir`), removed with everything
/// pinned in it when the last holder drops it: the programs detach, the maps go. An agent
/// holds its own, so nothing pinned outlives a test, even one that panicked; tests that restart
/// an agent on the same pins share one.
#[derive(Debug)]
pub struct PinDir(PathBuf);

impl PinDir {
    pub fn new() -> Arc<Self> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Arc::new(Self(
            Path::new(TEST_PIN_ROOT).join(format!("{}-{n}", std::process::id())),
        ))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The layout directories pinned in it now.
    pub fn layouts(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.0)
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("cannot remove the test pins {}: {e}", self.0.display());
        }
        // The root too, once no test uses it (fails harmlessly while others do).
        let _ = std::fs::remove_dir(TEST_PIN_ROOT);
    }
}

/// `text` (an agent config) with `probes.pin_dir` set to `pins`, unless it sets one itself.
fn with_pin_dir(text: &str, pins: &Path) -> String {
    if text.contains("pin_dir") {
        return text.to_string();
    }
    let line = format!("pin_dir = \"{}\"\n", pins.display());
    match text.split_once("[probes]\n") {
        Some((before, after)) => format!("{before}[probes]\n{line}{after}"),
        None => format!("{text}\n[probes]\n{line}"),
    }
}

/// A running agent. Dropping it kills the process, which closes every program, link and map fd
/// it holds: nothing outlives a test, even one that panicked.
pub struct Agent {
    child: Child,
    pub pki: Pki,
    pub addr: std::net::SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
    listening: Option<mpsc::Receiver<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
    _config_dir: tempfile::TempDir,
    /// Dropped after the process is killed (see `Drop`).
    pins: Arc<PinDir>,
}

/// Where the agent reads its TLS material from (defaults: the PKI's own files).
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

impl TlsFiles {
    pub fn of(pki: &Pki) -> Self {
        Self {
            cert: pki.path("tls.crt"),
            key: pki.path("tls.key"),
            client_ca: pki.path("ca.crt"),
        }
    }
}

impl Agent {
    /// Starts the agent on 127.0.0.1:0 with a fresh PKI and `extra` TOML appended to the config,
    /// and waits until it listens. `extra` may add `[server]` keys (it continues that section).
    pub fn start(extra: &str) -> Self {
        let pki = Pki::new();
        let files = TlsFiles::of(&pki);
        Self::start_with(pki, files, extra)
    }

    /// As [`Agent::start`], with the given PKI (used by [`Agent::get`]) and TLS files.
    pub fn start_with(pki: Pki, files: TlsFiles, extra: &str) -> Self {
        Self::started(Self::spawn(pki, files, extra, &[], PinDir::new()))
    }

    /// As [`Agent::start`], pinning into `pins` (shared with an earlier agent: a restart).
    pub fn start_pinned(extra: &str, pins: Arc<PinDir>) -> Self {
        let pki = Pki::new();
        let files = TlsFiles::of(&pki);
        Self::started(Self::spawn(pki, files, extra, &[], pins))
    }

    /// The pin directory this agent was given.
    pub fn pins(&self) -> Arc<PinDir> {
        self.pins.clone()
    }

    /// SIGKILL, as the OOM killer or a node drain gone wrong would: nothing runs in the agent
    /// after it. Waits for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// As [`Agent::start`], run by `setpriv` without the capabilities that load BPF programs
    /// (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN: dropped from its bounding and inheritable sets),
    /// as in a DaemonSet that was not granted them. It keeps root's other capabilities, so it
    /// still reads /proc.
    pub fn start_without_bpf(extra: &str) -> Self {
        let pki = Pki::new();
        let files = TlsFiles::of(&pki);
        let drop = "-bpf,-perfmon,-sys_admin";
        let wrapper = [
            "setpriv".to_string(),
            format!("--inh-caps={drop}"),
            format!("--bounding-set={drop}"),
        ];
        Self::started(Self::spawn(pki, files, extra, &wrapper, PinDir::new()))
    }

    fn started(mut agent: Self) -> Self {
        match agent
            .listening
            .take()
            .map(|rx| rx.recv_timeout(Duration::from_secs(30)))
        {
            Some(Ok(addr)) => agent.addr = addr.parse().expect("listening address"),
            _ => panic!("agent did not start listening:\n{}", agent.log_text()),
        }
        agent
    }

    /// Runs `brokerscope run` until it exits (for configurations it must refuse); returns its
    /// exit status and stderr.
    pub fn run_to_exit(
        pki: Pki,
        files: TlsFiles,
        extra: &str,
    ) -> (std::process::ExitStatus, String) {
        let mut agent = Self::spawn(pki, files, extra, &[], PinDir::new());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = agent.child.try_wait().expect("wait") {
                // Let the reader thread drain stderr.
                let _ = agent.reader.take().map(std::thread::JoinHandle::join);
                return (status, agent.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "agent kept running:\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts `brokerscope run`, behind `wrapper` (a command and its arguments) when given.
    fn spawn(
        pki: Pki,
        files: TlsFiles,
        extra: &str,
        wrapper: &[String],
        pins: Arc<PinDir>,
    ) -> Self {
        let config_dir = tempfile::tempdir().expect("tempdir");
        let config = config_dir.path().join("brokerscope.toml");
        // Tests poll /metrics in tight loops: only the tests about rate limiting get the
        // default limits (or set their own).
        let limits = if extra.contains("rate_limit_") {
            ""
        } else {
            "rate_limit_rps = 100000\nrate_limit_burst = 100000\n"
        };
        // An `extra` naming its own address replaces the ephemeral one.
        let listen = if extra
            .lines()
            .any(|l| l.starts_with("listen ") || l.starts_with("listen="))
        {
            ""
        } else {
            "listen = \"127.0.0.1:0\"\n"
        };
        let text = format!(
            "[server]\n{listen}cert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\n{limits}{extra}",
            files.cert.display(),
            files.key.display(),
            files.client_ca.display(),
        );
        std::fs::write(&config, with_pin_dir(&text, pins.path())).expect("write config");
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(agent_bin());
                cmd
            }
            None => Command::new(agent_bin()),
        };
        let mut child = cmd
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info,brokerscope=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn brokerscope run");
        let stderr = child.stderr.take().expect("stderr piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening addr=").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
                // `log.format = "json"`: the same event as an object.
                if line.starts_with('{')
                    && let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && v["fields"]["message"] == "step 5/5: listening"
                    && let Some(addr) = v["fields"]["addr"].as_str()
                {
                    let _ = tx.send(addr.to_string());
                }
                sink.lock().unwrap().push(line);
            }
        });
        Agent {
            child,
            pki,
            addr: "0.0.0.0:0".parse().unwrap(),
            log,
            listening: Some(rx),
            reader: Some(reader),
            _config_dir: config_dir,
            pins,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port())
    }

    /// The config file the agent was started with (tests may rewrite it: live reload).
    pub fn config_path(&self) -> PathBuf {
        self._config_dir.path().join("brokerscope.toml")
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The agent's log lines so far that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        let log = self.log.lock().unwrap();
        log.iter().filter(|l| l.contains(needle)).cloned().collect()
    }

    /// GET with curl, the operator's client certificate and the dev CA. Returns (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        self.curl(&[&self.url(path)])
            .unwrap_or_else(|e| panic!("curl {path}: {e}\nagent log:\n{}", self.log_text()))
    }

    /// curl (as [`curl`]) with the dev CA and the operator's client certificate, then `args`.
    pub fn curl(&self, args: &[&str]) -> Result<(u16, String), String> {
        let mut all = self.client_args();
        all.extend(args.iter().map(|s| s.to_string()));
        curl(&all.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// `--cacert ca.crt --cert client.crt --key client.key` of this agent's PKI.
    pub fn client_args(&self) -> Vec<String> {
        let p = |f: &str| self.pki.path(f).to_str().unwrap().to_string();
        vec![
            "--cacert".into(),
            p("ca.crt"),
            "--cert".into(),
            p("client.crt"),
            "--key".into(),
            p("client.key"),
        ]
    }

    /// Agent log lines containing `needle`, waited for up to 5 s; the first one.
    pub fn wait_for_log(&self, needle: &str) -> String {
        eventually(needle, Duration::from_secs(5), || {
            self.log
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
                .cloned()
        })
    }

    /// Polls /ready until 200.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (code, body) = self.get("/ready");
            if code == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not ready: {code} {body}\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Scrapes /metrics and returns the value of the sample whose name and labels match exactly
    /// (labels in any order).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let (code, body) = self.get("/metrics");
        assert_eq!(code, 200, "/metrics: {body}");
        find_sample(&body, name, labels)
    }

    /// Whether `program` is attached (on whichever hook), per `brokerscope_probe_attached`.
    pub fn attached(&self, program: &str) -> bool {
        let (_, body) = self.get("/metrics");
        body.contains(&format!(
            "brokerscope_probe_attached{{program=\"{program}\""
        ))
    }

    /// Program ids the agent logged as attached at start.
    pub fn program_ids(&self) -> Vec<u32> {
        self.logged_ids(" attached ")
    }

    /// Program ids the agent logged as loaded on standby (attached only while needed).
    pub fn standby_program_ids(&self) -> Vec<u32> {
        self.logged_ids(" loaded, on standby ")
    }

    fn logged_ids(&self, message: &str) -> Vec<u32> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(message))
            .filter_map(|l| l.split(" id=").nth(1))
            .filter_map(|id| id.split_whitespace().next()?.parse().ok())
            .collect()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent ignored SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs curl with `-s -o body -w %{http_code}`. Err when curl itself fails (TLS refused, ...),
/// with curl's exit code and message.
pub fn curl(args: &[&str]) -> Result<(u16, String), String> {
    curl_in(Command::new("curl"), args)
}

/// As [`curl`], run by `curl` (a command that runs curl: inside a namespace, say).
pub fn curl_in(mut curl: Command, args: &[&str]) -> Result<(u16, String), String> {
    let out = curl
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .map_err(|e| format!("cannot run curl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "curl exit {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').ok_or("no status line")?;
    Ok((
        code.trim()
            .parse()
            .map_err(|_| format!("bad status {code:?}"))?,
        body.to_string(),
    ))
}

/// `openssl s_client` against 127.0.0.1:`port` with `args`, stdin closed. Returns
/// (success, stdout and stderr together).
pub fn s_client(port: u16, args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", "localhost"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("openssl is installed by cargo xtask setup");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| panic!("{shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `dir/name`: the `server.properties` of broker `id` with one PLAINTEXT listener on a free
/// loopback port.
pub fn broker_properties(dir: &Path, name: &str, id: &str) -> PathBuf {
    let path = dir.join(name);
    let text = format!(
        "node.id={id}\nlisteners=PLAINTEXT://127.0.0.1:{}\n",
        free_port()
    );
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// A loopback port nobody listens on right now (for servers that cannot bind port 0 and report
/// it, such as Prometheus).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A child process killed when dropped, even when the test panics.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Finds `name{labels} value` in Prometheus text.
pub fn find_sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let mut found: Vec<(&str, &str)> = label_text
                .split(',')
                .filter(|p| !p.is_empty())
                .filter_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    Some((k, v.trim_matches('"')))
                })
                .collect();
            let mut want = labels.to_vec();
            found.sort();
            want.sort();
            (found == want).then(|| value.parse().ok())?
        })
}

/// Polls `f` until it returns Some or the deadline passes.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Runs a command that must succeed; panics with its stderr otherwise.
fn must(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A unique short name (interface names are limited to 15 bytes).
fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// A network namespace made with `ip netns add`, loopback up. Dropping it deletes it (and any
/// veth whose peer lives in it), even when the test panicked.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new() -> Self {
        let name = unique_name("bs");
        must(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs { name };
        must(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        ns
    }

    /// The namespace's inode as `ip netns exec NAME stat -L /proc/self/ns/net` sees it.
    pub fn inode(&self) -> u32 {
        must(Command::new("ip").args([
            "netns",
            "exec",
            &self.name,
            "stat",
            "-L",
            "-c",
            "%i",
            "/proc/self/ns/net",
        ]))
        .trim()
        .parse()
        .expect("stat prints an inode")
    }

    /// `ip netns exec NAME program`: the program runs in this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// A veth pair: `host_addr` (CIDR) on the side in our namespace, `ns_addr` (CIDR) inside.
    /// Addresses must be ones the test owns (link-local 169.254.x.y/30 is a good choice).
    pub fn veth(&self, host_addr: &str, ns_addr: &str) -> Veth {
        let host = unique_name("vh");
        let peer = unique_name("vn");
        must(Command::new("ip").args([
            "link", "add", &host, "type", "veth", "peer", "name", &peer, "netns", &self.name,
        ]));
        let veth = Veth {
            host: host.clone(),
            peer: peer.clone(),
        };
        must(Command::new("ip").args(["addr", "add", host_addr, "dev", &host]));
        must(Command::new("ip").args(["link", "set", &host, "up"]));
        must(Command::new("ip").args(["-n", &self.name, "addr", "add", ns_addr, "dev", &peer]));
        must(Command::new("ip").args(["-n", &self.name, "link", "set", &peer, "up"]));
        veth
    }
}

impl Default for NetNs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// The host side of a veth pair; dropping it deletes the pair.
pub struct Veth {
    pub host: String,
    /// The peer's name inside the namespace.
    pub peer: String,
}

impl Drop for Veth {
    fn drop(&mut self) {
        // Already gone when its namespace was deleted first: not an error.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host])
            .stderr(Stdio::null())
            .status();
    }
}

/// Agent config (TOML) whose discovery matches only fake brokers whose properties files live
/// under `dir`, so parallel tests and other fake brokers on the machine never interfere.
pub fn discovery_config(dir: &Path, extra: &str) -> String {
    let pattern = format!(
        r"kafka\.Kafka {}/",
        regex::escape(&dir.display().to_string())
    );
    format!("[discovery]\ncmdline_patterns = ['{pattern}']\n{extra}")
}

/// Polls /v1/brokers until broker `id` runs with `pid`.
pub fn wait_broker_running(agent: &Agent, id: &str, pid: u32) {
    eventually(
        &format!("broker {id} (pid {pid}) running"),
        Duration::from_secs(10),
        || {
            let (code, body) = agent.get(&format!("/v1/brokers/{id}"));
            (code == 200
                && body.contains(&format!("\"pid\":{pid},"))
                && body.contains("\"state\":\"running\""))
            .then_some(())
        },
    );
}

/// How soon after a broker process is spawned it must be listed in /v1/brokers: kernel exec
/// events drive discovery (the /proc rescan is only a 30 s safety net).
pub const DISCOVERY_LATENCY_BUDGET: Duration = Duration::from_millis(100);

/// `/v1/brokers/{id}`, or None on 404.
pub fn broker(agent: &Agent, id: &str) -> Option<serde_json::Value> {
    let (code, body) = agent.get(&format!("/v1/brokers/{id}"));
    match code {
        200 => Some(serde_json::from_str(&body).expect("JSON")),
        404 => None,
        _ => panic!("/v1/brokers/{id}: {code} {body}"),
    }
}

/// Polls until broker `id` runs with `pid`; returns it and how long after `since` it appeared.
/// Polls back to back (each poll is a curl run, a TLS handshake and a snapshot: `eventually`'s
/// 25 ms pause would add up to 25 ms of the test's own to the figure).
pub fn wait_running(
    agent: &Agent,
    id: &str,
    pid: u32,
    since: Instant,
) -> (serde_json::Value, Duration) {
    let deadline = Instant::now() + DISCOVERY_LATENCY_BUDGET + Duration::from_secs(5);
    loop {
        if let Some(b) = broker(agent, id).filter(|b| b["pid"] == pid && b["state"] == "running") {
            return (b, since.elapsed());
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for broker {id} (pid {pid}) in /v1/brokers"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Path of the fake broker binary (built with this crate: target/<profile>/fake-broker).
pub fn fake_broker_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("BROKERSCOPE_FAKE_BROKER_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    // Test binaries live in target/<profile>/deps; bins one level up.
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("fake-broker")
}

/// How to start a [`FakeBroker`].
pub struct FakeBrokerSpec<'a> {
    /// The server.properties path on its command line (need not exist).
    pub properties: &'a Path,
    /// `--override key=value` arguments.
    pub overrides: &'a [&'a str],
    /// Run inside this namespace (`ip netns exec`).
    pub netns: Option<&'a NetNs>,
    /// `HOSTNAME` in its environment (the pod name discovery reports).
    pub hostname: Option<&'a str>,
    /// Fake-broker options after the overrides (`--defer-listen`, `--term-wait-ms N`).
    pub options: &'a [&'a str],
    /// Run inside this container: its own mount namespace, chrooted to its root, working
    /// directory `cwd` there; `properties` is then a path inside the container.
    pub container: Option<(&'a Container, &'a str)>,
    /// Do not read the properties file (it may be a FIFO, a device, a link out): listen on
    /// nothing, as with a missing file.
    pub skip_properties: bool,
    /// Run as this user and group id (as Strimzi runs Kafka, uid 1001), without capabilities.
    /// The binary must then be where that user can reach it: see `bin`.
    pub uid: Option<u32>,
    /// The fake-broker binary to run instead of the one built with the tests (a copy in a
    /// directory another user may enter: the workspace may be under a 0700 directory).
    pub bin: Option<&'a Path>,
}

impl<'a> FakeBrokerSpec<'a> {
    /// In our namespace, no overrides, no HOSTNAME.
    pub fn new(properties: &'a Path) -> Self {
        Self {
            properties,
            overrides: &[],
            netns: None,
            hostname: None,
            options: &[],
            container: None,
            skip_properties: false,
            uid: None,
            bin: None,
        }
    }
}

/// A container as far as discovery can tell: a root directory that a process enters in its own
/// mount namespace with `chroot`, holding the fake broker (bind-mounted with the host's /usr, in
/// that namespace only), beside a "node" directory outside it that nothing in it can name.
/// [`Container::pivoted`] enters it with `pivot_root` instead, as runc does: the node's root is
/// then no mount of the process's namespace at all (the kernel prints its descriptors' paths
/// as it sees them, where a chroot's are printed from the node's root).
pub struct Container {
    dir: tempfile::TempDir,
    pivot: bool,
}

impl Container {
    /// A chroot-style container.
    pub fn new() -> Self {
        Self::with_entry(false)
    }

    /// A `pivot_root` container (what container runtimes make).
    pub fn pivoted() -> Self {
        Self::with_entry(true)
    }

    fn with_entry(pivot: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("brokerscope-container-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path().join("root");
        for d in ["usr", ".bs", "tmp"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir in root");
        }
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).expect("lib link");
        std::os::unix::fs::symlink("usr/lib64", root.join("lib64")).expect("lib64 link");
        std::fs::create_dir_all(dir.path().join("node")).expect("mkdir node");
        Self { dir, pivot }
    }

    /// The container's root, as the node sees it.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// `inside` (an absolute path in the container) as the node sees it.
    pub fn path(&self, inside: &str) -> PathBuf {
        self.root().join(inside.trim_start_matches('/'))
    }

    /// A directory of the node outside the root (its path, as the node sees it, is never
    /// reachable from inside).
    pub fn node(&self) -> PathBuf {
        self.dir.path().join("node")
    }

    /// Writes `text` at `inside`, making its directories.
    pub fn write(&self, inside: &str, text: &str) -> PathBuf {
        let p = self.path(inside);
        std::fs::create_dir_all(p.parent().expect("a parent")).expect("mkdir");
        std::fs::write(&p, text).expect("write");
        p
    }

    /// `inside` as a symlink to `target` (taken as is: absolute targets mean the container's
    /// root to the process, and the node's root to a careless reader).
    pub fn link(&self, target: &str, inside: &str) {
        let p = self.path(inside);
        std::fs::create_dir_all(p.parent().expect("a parent")).expect("mkdir");
        std::os::unix::fs::symlink(target, p).expect("symlink");
    }

    /// Sets up `cmd` to enter the container before it execs (`program` is then resolved inside).
    /// In `netns` (a namespace file) too when given.
    fn enter(&self, cmd: &mut Command, cwd: &str, netns: Option<std::fs::File>) {
        use std::{ffi::CString, os::unix::ffi::OsStrExt as _, os::unix::process::CommandExt as _};
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("no NUL");
        let root = self.root();
        let bs_src = fake_broker_bin()
            .parent()
            .expect("a directory")
            .to_path_buf();
        let binds = [
            (c(Path::new("/usr")), c(&root.join("usr"))),
            (c(&bs_src), c(&root.join(".bs"))),
        ];
        let (root, cwd) = (c(&root), CString::new(cwd).expect("no NUL"));
        let pivot = self.pivot;
        let check = |rc: libc::c_int| {
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        };
        // SAFETY: the closure runs in the forked child before exec and only makes syscalls on
        // memory prepared before the fork (no allocation, no locks).
        unsafe {
            cmd.pre_exec(move || {
                if let Some(ns) = &netns {
                    use std::os::fd::AsRawFd as _;
                    check(libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET))?;
                }
                check(libc::unshare(libc::CLONE_NEWNS))?;
                check(libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                for (src, dst) in &binds {
                    check(libc::mount(
                        src.as_ptr(),
                        dst.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ))?;
                }
                if pivot {
                    // The root made a mount of its own (with the binds above), then swapped for
                    // the namespace's root; the old root, stacked on it, is detached.
                    check(libc::mount(
                        root.as_ptr(),
                        root.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ))?;
                    check(libc::chdir(root.as_ptr()))?;
                    let rc =
                        libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as i32;
                    check(rc)?;
                    check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
                    check(libc::chdir(c"/".as_ptr()))?;
                } else {
                    check(libc::chroot(root.as_ptr()))?;
                }
                check(libc::chdir(cwd.as_ptr()))?;
                Ok(())
            });
        }
    }
}

impl Default for Container {
    fn default() -> Self {
        Self::new()
    }
}

/// A running fake broker (see src/bin/fake-broker.rs). Dropping it kills the process.
pub struct FakeBroker {
    child: Child,
    pub pid: u32,
    /// (listener name, port) as bound.
    pub listeners: Vec<(String, u16)>,
    /// When it printed `ready`.
    pub ready_at: Instant,
    /// Its stdout lines after `ready`.
    lines: mpsc::Receiver<String>,
}

impl FakeBroker {
    /// Starts it and waits (10 s at most) until it listens.
    pub fn start(spec: FakeBrokerSpec<'_>) -> Self {
        let bin = match (spec.container, spec.bin) {
            (Some(_), _) => PathBuf::from("/.bs/fake-broker"),
            (None, Some(bin)) => bin.to_path_buf(),
            (None, None) => fake_broker_bin(),
        };
        let mut cmd = match (spec.netns, spec.container) {
            (Some(ns), None) => ns.command(&bin),
            _ => Command::new(&bin),
        };
        if let Some((container, cwd)) = spec.container {
            // `ip netns exec` would run chrooted and not find the namespace: entered here.
            let netns = spec.netns.map(|ns| {
                std::fs::File::open(format!("/var/run/netns/{}", ns.name)).expect("netns file")
            });
            container.enter(&mut cmd, cwd, netns);
        }
        if spec.skip_properties {
            cmd.env("FAKE_BROKER_SKIP_PROPERTIES", "1");
        }
        if let Some(uid) = spec.uid {
            use std::os::unix::process::CommandExt as _;
            // std drops supplementary groups when root sets a uid.
            cmd.uid(uid).gid(uid);
        }
        cmd.arg("kafka.Kafka").arg(spec.properties);
        for o in spec.overrides {
            cmd.args(["--override", o]);
        }
        cmd.args(spec.options);
        cmd.env_remove("HOSTNAME");
        if let Some(h) = spec.hostname {
            cmd.env("HOSTNAME", h);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut broker = FakeBroker {
            child,
            pid: 0,
            listeners: Vec::new(),
            ready_at: Instant::now(),
            lines: rx,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = broker.lines.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "fake broker did not get ready ({spec_path})",
                    spec_path = spec.properties.display()
                )
            });
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["pid", pid] => broker.pid = pid.parse().expect("pid"),
                ["listening", name, port] => broker
                    .listeners
                    .push((name.to_string(), port.parse().expect("port"))),
                ["ready"] => break,
                _ => {}
            }
        }
        broker.ready_at = Instant::now();
        broker
    }

    /// Sends a command (see src/bin/fake-broker.rs) and returns its answer line (`timeout` at
    /// most); `listening` lines on the way are recorded.
    pub fn command(&mut self, command: &str, timeout: Duration) -> String {
        self.send(command);
        self.next_line(timeout)
            .unwrap_or_else(|| panic!("fake broker did not answer `{command}` in {timeout:?}"))
    }

    /// Sends a command without waiting for its answer (read it with [`Self::next_line`]).
    pub fn send(&mut self, command: &str) {
        use std::io::Write as _;
        let stdin = self.child.stdin.as_mut().expect("stdin piped");
        writeln!(stdin, "{command}").expect("write a command to the fake broker");
        stdin.flush().expect("flush");
    }

    /// The next stdout line other than `listening ...` (recorded), or None after `timeout`.
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).ok()?;
            let words: Vec<&str> = line.split_whitespace().collect();
            if let ["listening", name, port] = words.as_slice() {
                self.listeners
                    .push((name.to_string(), port.parse().expect("port")));
                continue;
            }
            return Some(line);
        }
    }

    /// Sends a signal (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill has no memory preconditions; the pid is our child's, not yet reaped.
        let rc = unsafe { libc::kill(self.pid as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill {} {signal}", self.pid);
    }

    /// Waits for the process to exit (reaping it); its status, or None after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL and reap, as an OOM kill or a node problem would end a broker.
    pub fn kill(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One fake-broker request: sends `n` bytes, reads the `m` bytes it answers.
pub fn fake_request(stream: &mut std::net::TcpStream, n: u32, m: u32) -> std::io::Result<()> {
    use std::io::{Read as _, Write as _};
    let mut req = Vec::with_capacity(9 + n as usize);
    req.push(b'R');
    req.extend_from_slice(&n.to_be_bytes());
    req.extend_from_slice(&m.to_be_bytes());
    req.resize(9 + n as usize, b'q');
    stream.write_all(&req)?;
    let mut left = u64::from(m);
    let got = std::io::copy(&mut stream.take(left), &mut std::io::sink())?;
    left -= got;
    if left > 0 {
        return Err(std::io::Error::other(format!("{left} bytes missing")));
    }
    Ok(())
}

/// Asks the fake broker to sendfile(2) `path`; returns the file length it announced after
/// reading that many bytes.
pub fn fake_fetch_file(stream: &mut std::net::TcpStream, path: &Path) -> std::io::Result<u64> {
    use std::io::{Read as _, Write as _};
    let p = path.as_os_str().as_encoded_bytes();
    let len = u16::try_from(p.len()).map_err(|_| std::io::Error::other("path too long"))?;
    let mut req = vec![b'F'];
    req.extend_from_slice(&len.to_be_bytes());
    req.extend_from_slice(p);
    stream.write_all(&req)?;
    let mut size = [0u8; 8];
    stream.read_exact(&mut size)?;
    let size = u64::from_be_bytes(size);
    let got = std::io::copy(&mut stream.take(size), &mut std::io::sink())?;
    if got != size {
        return Err(std::io::Error::other(format!("{got} of {size} bytes")));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_samples_by_exact_labels() {
        let text = "# TYPE x counter\nx{a=\"1\",b=\"2\"} 5\nx{a=\"1\"} 7\ny 3\n";
        assert_eq!(find_sample(text, "x", &[("b", "2"), ("a", "1")]), Some(5.0));
        assert_eq!(find_sample(text, "x", &[("a", "1")]), Some(7.0));
        assert_eq!(find_sample(text, "y", &[]), Some(3.0));
        assert_eq!(find_sample(text, "x", &[("a", "2")]), None);
    }
}
