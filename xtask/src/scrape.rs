//! The scrape part of `cargo xtask bench`: the agent's `/metrics` and `/v1/broker-state/` over
//! mTLS keep-alive at concurrency 8 and 64, with 10 fake brokers of 4 listeners each, and
//! prometheus-node-exporter (loadavg collector only) behind the same mTLS material, in the same
//! run and with the same load tool (`oha`, which presents client certificates).

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

const REQUESTS: usize = 4000;
const CONCURRENCY: [usize; 2] = [8, 64];
const BROKERS: usize = 10;
const LISTENERS: usize = 4;

const OURS: &str = "brokerscope /metrics";
const OURS_AS_PROMETHEUS: &str = "brokerscope /metrics, as Prometheus asks (OpenMetrics, gzip)";
const THEIRS: &str = "node_exporter /metrics (loadavg)";
const THEIRS_AS_PROMETHEUS: &str =
    "node_exporter /metrics (loadavg), as Prometheus asks (OpenMetrics, gzip)";

/// One load run's figures.
pub struct Run {
    pub target: String,
    pub concurrency: usize,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub success: f64,
}

/// Kills a child process when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until `line` (printed by `child` on stdout or stderr) contains `needle`; returns it.
fn wait_line(reader: impl std::io::Read, needle: &str) -> anyhow::Result<String> {
    for line in BufReader::new(reader).lines() {
        let line = line?;
        if line.contains(needle) {
            return Ok(line);
        }
    }
    bail!("exited before printing `{needle}`")
}

/// The headers Prometheus 2.x sends with a scrape.
const PROMETHEUS_HEADERS: [&str; 2] = [
    "Accept: application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding: gzip",
];

fn oha(
    url: &str,
    pki: &Path,
    concurrency: usize,
    as_prometheus: bool,
) -> anyhow::Result<(f64, f64, f64, f64)> {
    let headers = if as_prometheus {
        &PROMETHEUS_HEADERS[..]
    } else {
        &[]
    };
    let out = Command::new("oha")
        .args(["--no-tui", "--output-format", "json"])
        .args(["-n", &REQUESTS.to_string(), "-c", &concurrency.to_string()])
        .args(headers.iter().flat_map(|h| ["-H", h]))
        .args(crate::agent::client_tls(pki))
        .arg(url)
        .output()
        .context("run oha (installed by cargo xtask bench)")?;
    if !out.status.success() {
        bail!("oha {url}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("oha's JSON")?;
    let f = |path: &[&str]| {
        path.iter()
            .try_fold(&v, |v, k| v.get(*k))
            .and_then(serde_json::Value::as_f64)
    };
    let rps = f(&["summary", "requestsPerSec"]).context("requestsPerSec")?;
    let success = f(&["summary", "successRate"]).unwrap_or(0.0);
    let p50 = f(&["latencyPercentiles", "p50"]).context("p50")? * 1e3;
    let p99 = f(&["latencyPercentiles", "p99"]).context("p99")? * 1e3;
    Ok((rps, p50, p99, success))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Runs the scrape bench; returns the runs and the agent's idle RSS in KiB.
pub fn run(root: &Path, bin: &Path, out_dir: &Path) -> anyhow::Result<(Vec<Run>, u64)> {
    let dir = out_dir.join("scrape");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let pki = dir.join("pki");
    crate::agent::dev_pki(bin, &pki)?;

    // Ten fake brokers of four listeners each, with one connection per listener so every
    // listener has counters to render.
    crate::cmd::run(crate::cmd::cargo(root).args([
        "build",
        "--package",
        "brokerscope-tests",
        "--bin",
        "fake-broker",
    ]))?;
    let fake = root.join("target/debug/fake-broker");
    let mut brokers = Vec::new();
    let mut ports = Vec::new();
    for id in 0..BROKERS {
        let mine: Vec<u16> = (0..LISTENERS)
            .map(|_| free_port())
            .collect::<Result<_, _>>()?;
        let listeners: Vec<String> = mine
            .iter()
            .enumerate()
            .map(|(i, p)| format!("L{i}://127.0.0.1:{p}"))
            .collect();
        let props = dir.join(format!("broker-{id}.properties"));
        std::fs::write(
            &props,
            format!("node.id={id}\nlisteners={}\n", listeners.join(",")),
        )?;
        let mut child = Command::new(&fake)
            .arg("kafka.Kafka")
            .arg(&props)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("start a fake broker")?;
        let stdout = child.stdout.take().context("stdout")?;
        brokers.push(Guard(child));
        wait_line(stdout, "ready")?;
        ports.extend(mine);
    }

    let port = free_port()?;
    let config = dir.join("agent.toml");
    let pattern = format!(r"kafka\.Kafka {}/", dir.display());
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ncert_file = \"{p}/tls.crt\"\nkey_file = \"{p}/tls.key\"\nclient_ca_file = \"{p}/ca.crt\"\naccess_log = \"off\"\nrate_limit_rps = 100000\nrate_limit_burst = 100000\n[discovery]\ncmdline_patterns = ['{pattern}']\n[probes]\n{}",
            crate::agent::PIN_NOTHING,
            p = pki.display()
        ),
    )?;
    let agent = crate::agent::Agent::launch(bin, &config, pki.clone())?;
    let conns: Vec<_> = ports
        .iter()
        .map(|p| std::net::TcpStream::connect(("127.0.0.1", *p)))
        .collect::<Result<_, _>>()?;

    let ne_port = free_port()?;
    let web = dir.join("web.yml");
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: {p}/tls.crt\n  key_file: {p}/tls.key\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {p}/ca.crt\n",
            p = pki.display()
        ),
    )?;
    let ne = Guard(
        Command::new("prometheus-node-exporter")
            .args(["--collector.disable-defaults", "--collector.loadavg"])
            .arg(format!("--web.listen-address=127.0.0.1:{ne_port}"))
            .arg(format!("--web.config.file={}", web.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start prometheus-node-exporter (Debian package, installed by setup)")?,
    );

    // Ready when both answer and the agent lists the ten brokers.
    let deadline = Instant::now() + Duration::from_secs(30);
    let curl = |url: &str| crate::agent::curl(&pki, url).unwrap_or_default();
    let agent_url = agent.url("");
    loop {
        let listed = curl(&format!("{agent_url}/v1/brokers"))
            .matches("\"broker_state\"")
            .count();
        let ne_up = curl(&format!("https://localhost:{ne_port}/metrics")).contains("node_load1");
        if listed == BROKERS && ne_up {
            break;
        }
        if Instant::now() > deadline {
            bail!("not ready: agent lists {listed} brokers, node_exporter up: {ne_up}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Idle: nothing has loaded it yet but the readiness checks.
    std::thread::sleep(Duration::from_secs(1));
    let idle_rss = rss_kib(agent.pid());

    let payload = curl(&format!("{agent_url}/metrics")).len();
    eprintln!(
        "bench: /metrics payload {payload} bytes for {BROKERS} brokers x {LISTENERS} listeners"
    );
    let ours = format!("{agent_url}/metrics");
    let theirs = format!("https://localhost:{ne_port}/metrics");
    let targets = [
        (OURS, &ours, false),
        (OURS_AS_PROMETHEUS, &ours, true),
        (
            "brokerscope /v1/broker-state/",
            &format!("{agent_url}/v1/broker-state/?broker=3"),
            false,
        ),
        (THEIRS, &theirs, false),
        (THEIRS_AS_PROMETHEUS, &theirs, true),
    ];
    let mut runs = Vec::new();
    for c in CONCURRENCY {
        for (name, url, as_prometheus) in targets {
            let (rps, p50_ms, p99_ms, success) = oha(url, &pki, c, as_prometheus)?;
            eprintln!(
                "bench: {name} c={c}: {rps:.0} req/s, p50 {p50_ms:.2} ms, p99 {p99_ms:.2} ms"
            );
            runs.push(Run {
                target: name.to_string(),
                concurrency: c,
                rps,
                p50_ms,
                p99_ms,
                success,
            });
        }
    }
    drop((conns, ne, agent, brokers));
    Ok((runs, idle_rss))
}

/// Markdown and JSON fragments for the report.
pub fn report(runs: &[Run], idle_rss_kib: u64) -> (String, String) {
    let mut md = format!(
        "\n## Scrapes over mTLS keep-alive\n\n{REQUESTS} requests per run with oha; {BROKERS} fake brokers of \
         {LISTENERS} listeners each. node_exporter runs only its loadavg collector behind the same \
         certificates (exporter-toolkit web config). Agent idle RSS: {:.1} MiB.\n\n\
         | target | concurrency | req/s | p50 ms | p99 ms | success |\n|---|---|---|---|---|---|\n",
        idle_rss_kib as f64 / 1024.0
    );
    let mut json = Vec::new();
    for r in runs {
        md += &format!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.3} |\n",
            r.target, r.concurrency, r.rps, r.p50_ms, r.p99_ms, r.success
        );
        json.push(format!(
            "{{\"target\":\"{}\",\"concurrency\":{},\"rps\":{:.1},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"success\":{:.4}}}",
            r.target, r.concurrency, r.rps, r.p50_ms, r.p99_ms, r.success
        ));
    }
    md += "\n";
    for c in CONCURRENCY {
        let rps = |target: &str| {
            runs.iter()
                .find(|r| r.concurrency == c && r.target == target)
                .map(|r| r.rps)
        };
        for (ours, theirs, how) in [
            (OURS, THEIRS, "plain requests"),
            (
                OURS_AS_PROMETHEUS,
                THEIRS_AS_PROMETHEUS,
                "requests as Prometheus sends them",
            ),
        ] {
            if let (Some(ours), Some(theirs)) = (rps(ours), rps(theirs))
                && theirs > 0.0
            {
                md += &format!(
                    "At concurrency {c}, {how}: brokerscope /metrics serves {:.2}x node_exporter's req/s.\n",
                    ours / theirs
                );
            }
        }
    }
    md +=
        "\nTargets: p99 <= 5 ms at concurrency 8; rps >= 2x node_exporter's; idle RSS <= 30 MB.\n";
    let json = format!(
        "\"scrape\":{{\"idle_rss_kib\":{idle_rss_kib},\"runs\":[{}]}}",
        json.join(",")
    );
    (md, json)
}
