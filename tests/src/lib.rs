//! Helpers for the privileged end-to-end tests: the real agent binary with a throwaway PKI,
//! real clients (curl, openssl, bpftool), and guards that clean up even when a test panics.
//!
//! The binary comes from `BROKERSCOPE_TEST_BIN` (set by `cargo xtask test`) or target/debug.

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
        let mut agent = Self::spawn(pki, files, extra);
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
        let mut agent = Self::spawn(pki, files, extra);
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

    fn spawn(pki: Pki, files: TlsFiles, extra: &str) -> Self {
        let config_dir = tempfile::tempdir().expect("tempdir");
        let config = config_dir.path().join("brokerscope.toml");
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\n{extra}",
            files.cert.display(),
            files.key.display(),
            files.client_ca.display(),
        );
        std::fs::write(&config, text).expect("write config");
        let mut child = Command::new(agent_bin())
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
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port())
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
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

    /// Program ids the agent logged as attached.
    pub fn program_ids(&self) -> Vec<u32> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(" attached "))
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
    let out = Command::new("curl")
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
