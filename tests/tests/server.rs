//! The control endpoint under real clients: keep-alive and HTTP/2 multiplexing, limits and bad
//! input, hot certificate rotation, and the metrics page as promtool and Prometheus read it.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use brokerscope_tests::{
    Agent, KillOnDrop, Pki, TlsFiles, eventually, find_sample, free_port, privileged, run_ok,
    s_client,
};

/// curl with the agent's client certificate, then `args`, every body to /dev/null; stdout (so
/// use `-w`).
fn curl_w(agent: &Agent, args: &[&str]) -> String {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10"])
        .args(agent.client_args());
    // Each URL's body goes to its own `-o`: one per URL.
    for arg in args {
        if arg.starts_with("https://") {
            cmd.args(["-o", "/dev/null"]);
        }
        cmd.arg(arg);
    }
    run_ok(&mut cmd)
}

fn metric(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    agent.metric(name, labels)
}

#[test]
fn keep_alive_and_http2_multiplexing_use_one_connection() {
    if !privileged("keep_alive_and_http2_multiplexing_use_one_connection") {
        return;
    }
    let agent = Agent::start("");
    let url = agent.url("/health");
    // HTTP/1.1: five requests one after another on one kept-alive connection.
    let out = curl_w(
        &agent,
        &[
            "--http1.1",
            "-w",
            "%{http_version} %{http_code} %{num_connects}\n",
            &url,
            &url,
            &url,
            &url,
            &url,
        ],
    );
    assert_eq!(
        out,
        "1.1 200 1\n1.1 200 0\n1.1 200 0\n1.1 200 0\n1.1 200 0\n"
    );
    // HTTP/2: five requests in parallel, multiplexed as streams of one connection.
    let out = curl_w(
        &agent,
        &[
            "--http2",
            "--parallel",
            "--parallel-max",
            "5",
            "-w",
            "%{http_version} %{http_code} %{num_connects}\n",
            &url,
            &url,
            &url,
            &url,
            &url,
        ],
    );
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        ["2 200 0", "2 200 0", "2 200 0", "2 200 0", "2 200 1"],
        "{out}"
    );
}

#[test]
fn a_10_mb_body_gets_413_and_malformed_requests_get_400() {
    if !privileged("a_10_mb_body_gets_413_and_malformed_requests_get_400") {
        return;
    }
    let agent = Agent::start("access_log = \"debug\"\n");
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body");
    std::fs::write(&body, vec![b'x'; 10 * 1024 * 1024]).unwrap();
    let data = format!("@{}", body.display());
    assert_eq!(
        agent.curl(&["--http1.1", "--data-binary", &data, &agent.url("/metrics")]),
        Ok((
            413,
            r#"{"error":"body too large","limit_bytes":1048576}"#.to_string()
        ))
    );
    // HTTP/2: the server answers 413 at once and resets the rest of the upload (RST_STREAM
    // NO_ERROR, RFC 9113 8.1); curl 7.88 reports that as error 92 instead of showing the 413,
    // so the server's side is checked.
    let err = agent
        .curl(&["--http2", "--data-binary", &data, &agent.url("/metrics")])
        .unwrap_err();
    assert!(err.starts_with("curl exit Some(92)"), "{err}");
    let line = agent.wait_for_log("version=HTTP/2.0");
    assert!(line.contains("status=413"), "{line}");
    assert_eq!(
        metric(
            &agent,
            "brokerscope_http_requests_total",
            &[("path", "/metrics"), ("code", "413")]
        ),
        Some(2.0)
    );
    // Not HTTP at all, over a valid mTLS session: hyper answers 400 and closes.
    let mut child = Command::new("openssl")
        .args(["s_client", "-quiet", "-ign_eof", "-alpn", "http/1.1"])
        .args(["-connect", &format!("127.0.0.1:{}", agent.port())])
        .args(["-cert", agent.pki.path("client.crt").to_str().unwrap()])
        .args(["-key", agent.pki.path("client.key").to_str().unwrap()])
        .args(["-CAfile", agent.pki.path("ca.crt").to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"THIS IS NOT HTTP\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child.wait().unwrap();
    assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out:?}");
    // The endpoint still serves.
    assert_eq!(agent.get("/health").0, 200);
}

#[test]
fn a_burst_beyond_the_rate_limit_gets_429_with_retry_after_then_recovers() {
    if !privileged("a_burst_beyond_the_rate_limit_gets_429_with_retry_after_then_recovers") {
        return;
    }
    let agent = Agent::start("rate_limit_rps = 1\nrate_limit_burst = 3\n");
    let url = agent.url("/health");
    let out = curl_w(
        &agent,
        &[
            "-w",
            "%{http_code} %header{retry-after}\n",
            &url,
            &url,
            &url,
            &url,
            &url,
        ],
    );
    assert_eq!(out, "200 \n200 \n200 \n429 1\n429 1\n");
    let (code, body) = agent.curl(&[&url]).unwrap();
    assert_eq!(
        (code, body.as_str()),
        (429, r#"{"error":"rate limited","retry_after_seconds":1}"#)
    );
    // One token a second: a retry after Retry-After succeeds.
    let started = Instant::now();
    let recovered = eventually("a 200 after the 429s", Duration::from_secs(3), || {
        let (code, _) = agent.curl(&[&url]).unwrap();
        (code == 200).then(|| started.elapsed())
    });
    assert!(recovered <= Duration::from_millis(1500), "{recovered:?}");
}

#[test]
fn access_log_has_one_line_per_request_and_can_be_off() {
    if !privileged("access_log_has_one_line_per_request_and_can_be_off") {
        return;
    }
    let agent = Agent::start("");
    let (code, _) = agent.get("/health");
    assert_eq!(code, 200);
    let line = agent.wait_for_log("brokerscope::access");
    for field in [
        "identity=cluster-operator",
        "method=GET",
        "path=/health",
        "status=200",
        "bytes=15",
        "latency_ms=",
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
    assert!(!line.contains("user_agent"), "{line}");

    let agent = Agent::start("access_log = \"debug\"\n");
    agent.get("/nope");
    let line = agent.wait_for_log("brokerscope::access");
    for field in [
        "path=/nope",
        "status=404",
        "route=other",
        "user_agent=\"curl/",
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }

    let agent = Agent::start("access_log = \"off\"\n");
    for _ in 0..3 {
        agent.get("/health");
    }
    // The requests were served and counted, and none was logged.
    assert_eq!(
        metric(
            &agent,
            "brokerscope_http_requests_total",
            &[("path", "/health"), ("code", "200")]
        ),
        Some(3.0)
    );
    assert!(
        !agent.log_text().contains("brokerscope::access"),
        "{}",
        agent.log_text()
    );
}

#[test]
fn request_metrics_use_route_templates_gzip_and_openmetrics() {
    if !privileged("request_metrics_use_route_templates_gzip_and_openmetrics") {
        return;
    }
    let agent = Agent::start("");
    for path in ["/health", "/nope/1", "/nope/2", "/ready"] {
        agent.get(path);
    }
    let (code, text) = agent.get("/metrics");
    assert_eq!(code, 200);
    for (labels, value) in [
        ([("path", "/health"), ("code", "200")], 1.0),
        ([("path", "other"), ("code", "404")], 2.0),
    ] {
        assert_eq!(
            find_sample(&text, "brokerscope_http_requests_total", &labels),
            Some(value),
            "{labels:?}\n{text}"
        );
    }
    assert_eq!(
        find_sample(
            &text,
            "brokerscope_http_request_duration_seconds_count",
            &[("path", "other")]
        ),
        Some(2.0)
    );
    assert!(!text.contains("/nope"), "raw paths never become labels");
    let expiry = find_sample(&text, "brokerscope_tls_cert_expiry_timestamp_seconds", &[]);
    let enddate = run_ok(
        Command::new("openssl")
            .args(["x509", "-noout", "-enddate", "-dateopt", "iso_8601", "-in"])
            .arg(agent.pki.path("tls.crt")),
    );
    let unix = run_ok(Command::new("date").args([
        "-u",
        "+%s",
        "-d",
        enddate.trim().trim_start_matches("notAfter="),
    ]));
    assert_eq!(expiry, Some(unix.trim().parse::<f64>().unwrap()));

    // gzip when accepted.
    let url = agent.url("/metrics");
    let sizes = curl_w(
        &agent,
        &[
            "-H",
            "Accept-Encoding: gzip",
            "-w",
            "%header{content-encoding} %{size_download}",
            &url,
        ],
    );
    let (encoding, gz_size) = sizes.split_once(' ').unwrap();
    assert_eq!(encoding, "gzip");
    let gz_size: usize = gz_size.parse().unwrap();
    assert!(
        gz_size * 3 < text.len(),
        "gzip {gz_size} bytes vs {} plain",
        text.len()
    );
    // --compressed decodes it back to the same families.
    let (code, decoded) = agent.curl(&["--compressed", &url]).unwrap();
    assert_eq!(code, 200);
    assert!(decoded.contains("# TYPE brokerscope_http_requests_total counter"));

    // OpenMetrics when asked.
    let ctype = curl_w(
        &agent,
        &[
            "-H",
            "Accept: application/openmetrics-text; version=1.0.0",
            "-w",
            "%{content_type}",
            &url,
        ],
    );
    assert_eq!(
        ctype,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let (_, om) = agent
        .curl(&[
            "-H",
            "Accept: application/openmetrics-text; version=1.0.0",
            &url,
        ])
        .unwrap();
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE brokerscope_http_requests counter\n"));
}

/// Opens `n` TCP connections that never send a byte.
fn silent_connections(port: u16, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            TcpStream::connect(("127.0.0.1", port))
                .unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect()
}

/// True when the server has closed `stream` (EOF or reset), waiting at most `wait`.
fn closed_by_server(stream: &mut TcpStream, wait: Duration) -> bool {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn silent_connections_are_closed_by_the_handshake_timeout_and_do_not_block_scrapes() {
    if !privileged(
        "silent_connections_are_closed_by_the_handshake_timeout_and_do_not_block_scrapes",
    ) {
        return;
    }
    let agent = Agent::start("");
    let opened = Instant::now();
    // 7: under half of one address's 32 pending handshakes, so the full 10 s timeout applies
    // (tests/tests/flood.rs has the floods).
    let mut silent = silent_connections(agent.port(), 7);
    // A legitimate scrape meanwhile: served, and it sees the 7 silent connections and itself.
    let (code, text) = agent.get("/metrics");
    assert_eq!(code, 200);
    assert_eq!(
        find_sample(&text, "brokerscope_http_connections_active", &[]),
        Some(8.0)
    );
    // And one client that completes mTLS, then sends half a request and stalls.
    let slow_started = Instant::now();
    let mut slow = Command::new("openssl")
        .args(["s_client", "-quiet", "-ign_eof", "-alpn", "http/1.1"])
        .args(["-connect", &format!("127.0.0.1:{}", agent.port())])
        .args(["-cert", agent.pki.path("client.crt").to_str().unwrap()])
        .args(["-key", agent.pki.path("client.key").to_str().unwrap()])
        .args(["-CAfile", agent.pki.path("ca.crt").to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut slow_in = slow.stdin.take().unwrap();
    slow_in
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut slow_out = slow.stdout.take().unwrap();
    let slow_closed = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = slow_out.read_to_string(&mut out);
        (slow_started.elapsed(), out)
    });
    let slow = KillOnDrop(slow);

    // Every silent connection is closed by the server, after the 10 s handshake timeout.
    for (i, stream) in silent.iter_mut().enumerate() {
        let left = Duration::from_secs(13).saturating_sub(opened.elapsed());
        assert!(
            closed_by_server(stream, left.max(Duration::from_millis(1))),
            "connection {i} still open after {:?}",
            opened.elapsed()
        );
    }
    let elapsed = opened.elapsed();
    assert!(
        elapsed >= Duration::from_secs(10),
        "closed before the timeout: {elapsed:?}"
    );
    eprintln!("7 silent connections closed after {elapsed:?}");
    // The stalled request: closed by the 10 s header-read timeout, without a response.
    let (slow_elapsed, out) = slow_closed.join().unwrap();
    drop((slow_in, slow));
    assert_eq!(out, "");
    assert!(
        (Duration::from_secs(10)..Duration::from_secs(13)).contains(&slow_elapsed),
        "{slow_elapsed:?}"
    );
    eprintln!("half-sent request closed after {slow_elapsed:?}");
    assert_eq!(
        metric(&agent, "brokerscope_http_connections_active", &[]),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &agent,
            "brokerscope_tls_handshake_failures_total",
            &[("reason", "timeout")]
        ),
        Some(7.0)
    );
}

#[test]
fn pending_connections_beyond_32_from_one_address_shed_the_oldest_and_are_counted() {
    if !privileged("pending_connections_beyond_32_from_one_address_shed_the_oldest_and_are_counted")
    {
        return;
    }
    let agent = Agent::start("");
    let conns = silent_connections(agent.port(), 36);
    for c in &conns {
        c.set_nonblocking(true).unwrap();
    }
    // 32 handshakes may be pending per address; each one beyond sheds the oldest silent one,
    // at once: the first 4 are closed, the newest 32 wait.
    let closed = |conns: &[TcpStream]| -> Vec<usize> {
        let mut buf = [0u8; 8];
        conns
            .iter()
            .enumerate()
            .filter(|(_, s)| match (&mut &**s).read(&mut buf) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            })
            .map(|(i, _)| i)
            .collect()
    };
    let started = Instant::now();
    let seen = eventually("4 connections closed", Duration::from_secs(2), || {
        let c = closed(&conns);
        (c.len() >= 4).then_some(c)
    });
    let elapsed = started.elapsed();
    assert_eq!(seen, (0..4).collect::<Vec<_>>());
    eprintln!("4 oldest pending connections shed within {elapsed:?}");
    // The newest 32 are still open a while later (their timeout is 3 s under this pressure).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(closed(&conns), (0..4).collect::<Vec<_>>());
    drop(conns);
    // Scraped from another address, whose budget is its own.
    let resolve = format!("localhost:{}:127.0.0.1", agent.port());
    let scrape = || {
        agent.curl(&[
            "--interface",
            "127.0.0.3",
            "--resolve",
            &resolve,
            &agent.url("/metrics"),
        ])
    };
    let sample = |text: &str, reason: &str| {
        find_sample(
            text,
            "brokerscope_tls_handshake_failures_total",
            &[("reason", reason)],
        )
    };
    let text = eventually("the 32 closes counted", Duration::from_secs(5), || {
        let (code, text) = scrape().ok()?;
        (code == 200 && sample(&text, "peer_closed") == Some(32.0)).then_some(text)
    });
    assert_eq!(sample(&text, "shed_per_peer"), Some(4.0));
    assert_eq!(sample(&text, "shed_total"), Some(0.0));
    assert_eq!(
        find_sample(&text, "brokerscope_http_connections_rejected_total", &[]),
        Some(4.0)
    );
    assert_eq!(
        find_sample(&text, "brokerscope_http_connections_pending", &[]),
        Some(0.0)
    );
}

/// A Kubernetes Secret volume: `dir/..<version>/{tls.crt,tls.key,ca.crt}`, `dir/..data` a
/// symlink to the current version, and `dir/<file>` symlinks to `..data/<file>`.
struct SecretVolume {
    dir: tempfile::TempDir,
}

impl SecretVolume {
    fn new(version: &str, files: &[(&str, &Path)]) -> Self {
        let volume = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        volume.write_version(version, files);
        std::os::unix::fs::symlink(format!("..{version}"), volume.dir.path().join("..data"))
            .unwrap();
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), volume.dir.path().join(name))
                .unwrap();
        }
        volume
    }

    fn write_version(&self, version: &str, files: &[(&str, &Path)]) {
        let target = self.dir.path().join(format!("..{version}"));
        std::fs::create_dir(&target).unwrap();
        for (name, source) in files {
            std::fs::copy(source, target.join(name)).unwrap();
        }
    }

    /// What the kubelet does: write the new version, then rename a new `..data` link over the
    /// old one (atomic).
    fn swap(&self, version: &str, files: &[(&str, &Path)]) {
        self.write_version(version, files);
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

/// The serial of the certificate the server presents to a new handshake.
fn served_serial(agent: &Agent) -> String {
    let (ok, text) = s_client(
        agent.port(),
        &[
            "-CAfile",
            agent.pki.path("ca.crt").to_str().unwrap(),
            "-cert",
            agent.pki.path("client.crt").to_str().unwrap(),
            "-key",
            agent.pki.path("client.key").to_str().unwrap(),
        ],
    );
    assert!(ok, "{text}");
    let start = text.find("-----BEGIN CERTIFICATE-----").unwrap();
    let end = text.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----".len();
    let mut child = Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&text.as_bytes()[start..end])
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_string()
}

/// A new server certificate for `localhost` from the same CA, with a chosen serial.
fn reissue(pki: &Pki, dir: &Path, serial: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = dir.join(format!("{serial}.key"));
    let csr = dir.join(format!("{serial}.csr"));
    let crt = dir.join(format!("{serial}.crt"));
    let ext = dir.join(format!("{serial}.ext"));
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run_ok(
        Command::new("openssl")
            .args(["req", "-new", "-nodes", "-newkey", "ec"])
            .args([
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-subj",
                "/CN=brokerscope",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&csr),
    );
    run_ok(
        Command::new("openssl")
            .args([
                "x509",
                "-req",
                "-days",
                "2",
                "-set_serial",
                &format!("0x{serial}"),
            ])
            .arg("-in")
            .arg(&csr)
            .arg("-CA")
            .arg(pki.path("ca.crt"))
            .arg("-CAkey")
            .arg(pki.path("ca.key"))
            .arg("-extfile")
            .arg(&ext)
            .arg("-out")
            .arg(&crt),
    );
    (crt, key)
}

#[test]
fn rotation_by_secret_volume_swap_and_in_place_rewrite_drops_nothing() {
    if !privileged("rotation_by_secret_volume_swap_and_in_place_rewrite_drops_nothing") {
        return;
    }
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let ca = pki.path("ca.crt");
    let volume = SecretVolume::new(
        "2026_01",
        &[
            ("tls.crt", &pki.path("tls.crt")),
            ("tls.key", &pki.path("tls.key")),
            ("ca.crt", &ca),
        ],
    );
    let files = TlsFiles {
        cert: volume.path("tls.crt"),
        key: volume.path("tls.key"),
        client_ca: volume.path("ca.crt"),
    };
    let agent = Agent::start_with(
        pki,
        files,
        "rate_limit_rps = 1000\nrate_limit_burst = 1000\n",
    );
    let first = served_serial(&agent);

    // A keep-alive client requesting all along: 120 requests at 20/s on one connection.
    let url = agent.url("/health");
    let mut client = Command::new("curl");
    client
        .args(["-sS", "--http1.1", "--rate", "20/s"])
        .args(["-w", "%{http_code} %{num_connects}\n"])
        .args(agent.client_args());
    for _ in 0..120 {
        client.args(["-o", "/dev/null"]).arg(&url);
    }
    let client = client
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let client = KillOnDrop(client);
    std::thread::sleep(Duration::from_millis(300)); // let the client connect first

    // 1. Secret volume swap: new handshakes see the new certificate within 2 s.
    let (crt, key) = reissue(&agent.pki, work.path(), "2026AB01");
    let swapped = Instant::now();
    volume.swap(
        "2026_02",
        &[("tls.crt", &crt), ("tls.key", &key), ("ca.crt", &ca)],
    );
    eventually("the swapped certificate", Duration::from_secs(2), || {
        (served_serial(&agent) == "2026AB01").then_some(())
    });
    eprintln!(
        "symlink swap visible to new handshakes after {:?}",
        swapped.elapsed()
    );
    assert_ne!(first, "2026AB01");
    assert_eq!(
        metric(&agent, "brokerscope_tls_reloads_total", &[]),
        Some(1.0)
    );

    // 2. A corrupt replacement is refused; the old certificate stays.
    let garbage = work.path().join("garbage.crt");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    volume.swap(
        "2026_03",
        &[("tls.crt", &garbage), ("tls.key", &key), ("ca.crt", &ca)],
    );
    eventually(
        "the refused reload to be counted",
        Duration::from_secs(3),
        || {
            (metric(&agent, "brokerscope_tls_reload_failures_total", &[]) == Some(1.0))
                .then_some(())
        },
    );
    let log = agent.wait_for_log("TLS reload refused");
    assert!(log.contains("tls.crt"), "{log}");
    assert_eq!(served_serial(&agent), "2026AB01");

    // 3. Plain in-place rewrite of the files the links point at (cert, then key).
    let (crt2, key2) = reissue(&agent.pki, work.path(), "2026AB02");
    let current = volume.dir.path().join("..2026_03");
    let rewritten = Instant::now();
    std::fs::copy(&crt2, current.join("tls.crt")).unwrap();
    std::fs::copy(&key2, current.join("tls.key")).unwrap();
    eventually("the rewritten certificate", Duration::from_secs(2), || {
        (served_serial(&agent) == "2026AB02").then_some(())
    });
    eprintln!("in-place rewrite visible after {:?}", rewritten.elapsed());
    assert_eq!(
        metric(&agent, "brokerscope_tls_reload_failures_total", &[]),
        Some(1.0),
        "the half-written state (new cert, old key) was never tried"
    );
    assert_eq!(
        metric(&agent, "brokerscope_tls_reloads_total", &[]),
        Some(2.0)
    );

    // The keep-alive client never failed and never reconnected.
    let out = client_output(client);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 120, "{out}");
    assert_eq!(lines[0], "200 1");
    assert!(lines[1..].iter().all(|l| *l == "200 0"), "{out}");
}

fn client_output(mut client: KillOnDrop) -> String {
    let child = &mut client.0;
    let status = child.wait().unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{err}");
    out
}

#[test]
fn promtool_accepts_the_metrics_page() {
    if !privileged("promtool_accepts_the_metrics_page") {
        return;
    }
    let agent = Agent::start("");
    agent.get("/health");
    agent.get("/nope");
    let (code, text) = agent.get("/metrics");
    assert_eq!(code, 200);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed by cargo xtask setup (Debian package prometheus)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
}

#[test]
fn prometheus_scrapes_the_agent_over_mtls() {
    if !privileged("prometheus_scrapes_the_agent_over_mtls") {
        return;
    }
    let agent = Agent::start("access_log = \"debug\"\n");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    let p = |f: &str| agent.pki.path(f).display().to_string();
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: brokerscope\n    scheme: https\n\
             \x20   tls_config:\n      ca_file: {}\n      cert_file: {}\n      key_file: {}\n\
             \x20   static_configs:\n      - targets: ['localhost:{}']\n",
            p("ca.crt"),
            p("client.crt"),
            p("client.key"),
            agent.port()
        ),
    )
    .unwrap();
    let port = free_port();
    let _prometheus = KillOnDrop(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus is installed by cargo xtask setup"),
    );
    let api = |path: &str| -> Option<serde_json::Value> {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5"])
            .arg(format!("http://127.0.0.1:{port}{path}"))
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    };
    let target = eventually("the target to be up", Duration::from_secs(30), || {
        let v = api("/api/v1/targets")?;
        let t = v["data"]["activeTargets"].get(0)?.clone();
        (t["health"] == "up").then_some(t)
    });
    assert_eq!(target["lastError"], "");
    assert_eq!(
        target["scrapeUrl"],
        format!("https://localhost:{}/metrics", agent.port())
    );
    // Prometheus asked for OpenMetrics and parsed it: a counter reads back with its value.
    let v = eventually("a sample in the TSDB", Duration::from_secs(10), || {
        let v = api("/api/v1/query?query=brokerscope_tls_reload_failures_total")?;
        v["data"]["result"].get(0).cloned()
    });
    assert_eq!(v["value"][1], "0");
    // And the access log names the scraper and its client certificate.
    let log = agent.wait_for_log("user_agent=\"Prometheus/");
    assert!(
        log.contains("identity=cluster-operator method=GET path=/metrics status=200"),
        "{log}"
    );
}

#[test]
fn listen_port_that_is_a_broker_port_is_refused_naming_both_keys() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("brokerscope.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:18443\"\n[discovery]\nlistener_ports = [9092, 18443]\n",
    )
    .unwrap();
    for args in [&["run", "--config"][..], &["check-config"][..]] {
        let out = Command::new(brokerscope_tests::agent_bin())
            .args(args)
            .arg(&config)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!(
                "config key `server.listen` ({} line 2) is invalid: server.listen port 18443 is \
                 also a broker data-plane port (from discovery.listener_ports)",
                config.display()
            )),
            "{args:?}: {stderr}"
        );
    }
}
