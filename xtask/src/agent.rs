//! The agent under test for the benches: a throwaway PKI made by the agent's own `pki dev`, the
//! agent started on a free port and stopped on drop, and mTLS GETs against it. Used by `bench`
//! (and its soak) and by `scrape`; it uses neither.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, bail};

/// A throwaway PKI for a bench's agent and clients, made by the agent's own `pki dev`.
pub fn dev_pki(bin: &Path, out: &Path) -> anyhow::Result<()> {
    crate::cmd::run(
        Command::new(bin)
            .args(["pki", "dev", "--out"])
            .arg(out)
            .stdout(Stdio::null()),
    )
}

/// Every agent the bench starts counts from zero and leaves nothing pinned: each run compares
/// its own A against B.
pub const PIN_NOTHING: &str = "pin_dir = \"\"\n";

/// The agent under test, on a free port with a throwaway PKI.
pub struct Agent {
    /// The agent's process (the soak kills it and reaps it itself).
    pub child: Child,
    port: u16,
    /// The throwaway PKI its clients use.
    pub pki: PathBuf,
}

impl Agent {
    /// The agent with `probes` as its `[probes]` section, config and PKI under `dir`.
    pub fn start_with(bin: &Path, dir: &Path, probes: &str) -> anyhow::Result<Self> {
        let pki = dir.join("pki");
        if !pki.join("client.key").exists() {
            dev_pki(bin, &pki)?;
        }
        let config = dir.join("bench.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\ncert_file = \"{p}/tls.crt\"\nkey_file = \"{p}/tls.key\"\nclient_ca_file = \"{p}/ca.crt\"\naccess_log = \"off\"\n[probes]\n{PIN_NOTHING}{extra}",
                p = pki.display(),
                extra = probes
            ),
        )?;
        Self::launch(bin, &config, pki)
    }

    /// Runs the agent on `config` and waits until it listens.
    pub fn launch(bin: &Path, config: &Path, pki: PathBuf) -> anyhow::Result<Self> {
        Self::launch_with_env(bin, config, pki, &[])
    }

    /// As [`Agent::launch`], with `env` added to the agent's environment (the soak's allocator
    /// settings).
    pub fn launch_with_env(
        bin: &Path,
        config: &Path,
        pki: PathBuf,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut child = Command::new(bin)
            .args(["run", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn,brokerscope=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("start the agent")?;
        let stderr = child.stderr.take().context("stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let port = loop {
            let Some(Ok(line)) = lines.next() else {
                bail!("agent exited before listening");
            };
            if let Some(addr) = line.split("listening addr=").nth(1) {
                break addr.trim().rsplit(':').next().unwrap_or("0").parse()?;
            }
        };
        // Keep draining stderr so the agent never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(Self { child, port, pki })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }

    /// GET /metrics over mTLS; the body.
    pub fn metrics(&self) -> anyhow::Result<String> {
        curl(&self.pki, &self.url("/metrics"))
    }
}

/// The dev PKI's CA and client identity as arguments of curl or oha.
pub fn client_tls(pki: &Path) -> [std::ffi::OsString; 6] {
    [
        "--cacert",
        "ca.crt",
        "--cert",
        "client.crt",
        "--key",
        "client.key",
    ]
    .map(|a| {
        if a.starts_with("--") {
            a.into()
        } else {
            pki.join(a).into_os_string()
        }
    })
}

/// GET over mTLS with curl; the body.
pub fn curl(pki: &Path, url: &str) -> anyhow::Result<String> {
    let out = Command::new("curl")
        .arg("-sS")
        .args(client_tls(pki))
        .arg(url)
        .output()?;
    if !out.status.success() {
        bail!("GET {url}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}
