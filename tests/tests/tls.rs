//! The mTLS endpoint against real clients: curl and openssl s_client.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use brokerscope_tests::{Agent, Pki, TlsFiles, curl, eventually, privileged, run_ok, s_client};

/// The first agent log line containing `needle`.
fn wait_for_log(agent: &Agent, needle: &str) -> String {
    eventually(needle, Duration::from_secs(5), || {
        agent
            .log
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains(needle))
            .cloned()
    })
}

#[test]
fn seed_troubleshooting_command_works_verbatim() {
    if !privileged("seed_troubleshooting_command_works_verbatim") {
        return;
    }
    let agent = Agent::start("");
    // `curl -k --cert client.crt --key client.key https://localhost:8443/health`, run from the
    // PKI directory, on the test's port.
    let out = Command::new("curl")
        .current_dir(agent.pki.dir.path())
        .args(["-k", "--cert", "client.crt", "--key", "client.key"])
        .arg(format!("https://localhost:{}/health", agent.port()))
        .args(["-s", "-w", " %{http_code}"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        r#"{"status":"ok"} 200"#
    );
}

#[test]
fn no_client_certificate_is_refused_in_the_handshake() {
    if !privileged("no_client_certificate_is_refused_in_the_handshake") {
        return;
    }
    let agent = Agent::start("");
    let ca = agent.pki.path("ca.crt");
    for http in ["--http1.1", "--http2"] {
        let err = curl(&[
            http,
            "--cacert",
            ca.to_str().unwrap(),
            &agent.url("/health"),
        ])
        .expect_err("no client cert must not get an HTTP answer");
        // curl's exit code depends on when the TLS 1.3 alert arrives (35, 55 or 56); the server
        // side says exactly why.
        assert!(err.starts_with("curl exit"), "{err}");
    }
    let log = wait_for_log(&agent, "TLS handshake refused");
    assert!(log.contains("peer sent no certificates"), "{log}");
}

#[test]
fn client_certificate_from_another_ca_is_refused() {
    if !privileged("client_certificate_from_another_ca_is_refused") {
        return;
    }
    let agent = Agent::start("");
    let stranger = Pki::new();
    let err = curl(&[
        "--cacert",
        agent.pki.path("ca.crt").to_str().unwrap(),
        "--cert",
        stranger.path("client.crt").to_str().unwrap(),
        "--key",
        stranger.path("client.key").to_str().unwrap(),
        &agent.url("/health"),
    ])
    .expect_err("a foreign client cert must not get an HTTP answer");
    assert!(err.starts_with("curl exit"), "{err}");
    let log = wait_for_log(&agent, "TLS handshake refused");
    // Both dev CAs share a subject name, so webpki finds the issuer by name and then
    // rejects the signature.
    assert!(log.contains("invalid peer certificate"), "{log}");
}

#[test]
fn openssl_sees_alpn_and_the_certificate_request() {
    if !privileged("openssl_sees_alpn_and_the_certificate_request") {
        return;
    }
    let agent = Agent::start("");
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{}", agent.port()),
        ])
        .args(["-alpn", "h2,http/1.1", "-tls1_3"])
        .args(["-cert", agent.pki.path("client.crt").to_str().unwrap()])
        .args(["-key", agent.pki.path("client.key").to_str().unwrap()])
        .args(["-CAfile", agent.pki.path("ca.crt").to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ALPN protocol: h2"), "{text}");
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    assert!(text.contains("TLSv1.3"), "{text}");
}

/// curl with the agent's CA and client certificate plus `args`; returns stdout (use `-w`).
fn curl_raw(agent: &Agent, args: &[&str]) -> String {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "-o", "/dev/null"])
        .args(agent.client_args())
        .args(args);
    run_ok(&mut cmd)
}

/// Writes `text` to `dir/name` and returns the path as a String.
fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// An openssl-made certificate signed by `ca`/`ca_key`: a fresh key (`newkey`, e.g.
/// `rsa:2048` or `ec`), the subject, and the v3 extensions. Returns (cert, key) paths.
fn openssl_cert(
    dir: &Path,
    name: &str,
    newkey: &[&str],
    subject: &str,
    extensions: &str,
    (ca, ca_key): (&str, &str),
    serial: &str,
) -> (String, String) {
    let key = dir
        .join(format!("{name}.key"))
        .to_str()
        .unwrap()
        .to_string();
    let csr = dir
        .join(format!("{name}.csr"))
        .to_str()
        .unwrap()
        .to_string();
    let crt = dir
        .join(format!("{name}.crt"))
        .to_str()
        .unwrap()
        .to_string();
    let ext = write(dir, &format!("{name}.ext"), extensions);
    run_ok(
        Command::new("openssl")
            .args(["req", "-new", "-nodes", "-newkey"])
            .args(newkey)
            .args(["-keyout", &key, "-subj", subject, "-out", &csr]),
    );
    run_ok(Command::new("openssl").args([
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        ca,
        "-CAkey",
        ca_key,
        "-set_serial",
        serial,
        "-days",
        "2",
        "-extfile",
        &ext,
        "-out",
        &crt,
    ]));
    (crt, key)
}

fn path_str(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

#[test]
fn http1_and_http2_with_the_client_cert_get_200() {
    if !privileged("http1_and_http2_with_the_client_cert_get_200") {
        return;
    }
    let agent = Agent::start("");
    let url = agent.url("/health");
    assert_eq!(
        curl_raw(
            &agent,
            &["--http1.1", "-w", "%{http_version} %{http_code}", &url]
        ),
        "1.1 200"
    );
    assert_eq!(
        curl_raw(
            &agent,
            &["--http2", "-w", "%{http_version} %{http_code}", &url]
        ),
        "2 200"
    );
}

#[test]
fn expired_and_not_yet_valid_client_certs_are_refused_from_a_ca_bundle() {
    if !privileged("expired_and_not_yet_valid_client_certs_are_refused_from_a_ca_bundle") {
        return;
    }
    let pki = Pki::new();
    let expired = Pki::with_args(&["--not-before=-3d", "--not-after=-1d"]);
    let future = Pki::with_args(&["--not-before=+1d", "--not-after=+3d"]);
    let other = Pki::new();
    // One bundle, four CAs: rotation-style trust of several CAs at once.
    let bundle: String = [&pki, &expired, &future, &other]
        .iter()
        .map(|p| std::fs::read_to_string(p.path("ca.crt")).unwrap())
        .collect();
    let ca_file = pki.path("bundle.crt");
    std::fs::write(&ca_file, bundle).unwrap();
    let files = TlsFiles {
        client_ca: ca_file,
        ..TlsFiles::of(&pki)
    };
    let agent = Agent::start_with(pki, files, "");
    let ca = agent.pki.path("ca.crt");
    let with = |client: &Pki| {
        curl(&[
            "--cacert",
            ca.to_str().unwrap(),
            "--cert",
            client.path("client.crt").to_str().unwrap(),
            "--key",
            client.path("client.key").to_str().unwrap(),
            &agent.url("/health"),
        ])
    };
    assert_eq!(with(&other), Ok((200, r#"{"status":"ok"}"#.to_string())));
    assert_eq!(
        with(&agent.pki),
        Ok((200, r#"{"status":"ok"}"#.to_string()))
    );

    let err = with(&expired).expect_err("an expired client cert must not get an HTTP answer");
    assert!(err.starts_with("curl exit"), "{err}");
    let log = agent.wait_for_log("certificate expired");
    assert!(log.contains("TLS handshake refused"), "{log}");

    let err = with(&future).expect_err("a not-yet-valid client cert must not get an HTTP answer");
    assert!(err.starts_with("curl exit"), "{err}");
    let log = agent.wait_for_log("certificate not valid yet");
    assert!(log.contains("TLS handshake refused"), "{log}");
    // Refused handshakes never reached HTTP: only the two good requests were counted.
    assert_eq!(
        agent.metric(
            "brokerscope_http_requests_total",
            &[("path", "/health"), ("code", "200")]
        ),
        Some(2.0)
    );
}

#[test]
fn a_verified_client_outside_the_allow_list_gets_403_naming_it() {
    if !privileged("a_verified_client_outside_the_allow_list_gets_403_naming_it") {
        return;
    }
    let spiffe = "spiffe://cluster.local/ns/monitoring/sa/prometheus";
    let agent = Agent::start(&format!("allowed_client_names = [\"{spiffe}\"]\n"));
    for http in ["--http1.1", "--http2"] {
        assert_eq!(
            agent.curl(&[http, &agent.url("/metrics")]),
            Ok((
                403,
                r#"{"error":"forbidden","identity":"cluster-operator"}"#.to_string()
            ))
        );
    }
    // An RSA client certificate made by openssl (PKCS#8 key), named by a SAN URI.
    let dir = tempfile::tempdir().unwrap();
    let ca = (
        path_str(&agent.pki.path("ca.crt")),
        path_str(&agent.pki.path("ca.key")),
    );
    let (crt, key) = openssl_cert(
        dir.path(),
        "prometheus",
        &["rsa:2048"],
        "/CN=prometheus",
        &format!(
            "subjectAltName=URI:{spiffe}\nextendedKeyUsage=clientAuth\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n"
        ),
        (&ca.0, &ca.1),
        "0x50",
    );
    let (code, body) = curl(&[
        "--cacert",
        &ca.0,
        "--cert",
        &crt,
        "--key",
        &key,
        &agent.url("/health"),
    ])
    .unwrap();
    assert_eq!((code, body.as_str()), (200, r#"{"status":"ok"}"#));
    // The same key as PKCS#1 works as well.
    let pkcs1 = path_str(&dir.path().join("prometheus.pkcs1.key"));
    run_ok(Command::new("openssl").args(["rsa", "-in", &key, "-traditional", "-out", &pkcs1]));
    assert!(
        std::fs::read_to_string(&pkcs1)
            .unwrap()
            .starts_with("-----BEGIN RSA PRIVATE KEY-----")
    );
    let (code, _) = curl(&[
        "--cacert",
        &ca.0,
        "--cert",
        &crt,
        "--key",
        &pkcs1,
        &agent.url("/health"),
    ])
    .unwrap();
    assert_eq!(code, 200);
}

#[test]
fn rsa_server_key_in_pkcs1_with_its_intermediate_sends_the_full_chain() {
    if !privileged("rsa_server_key_in_pkcs1_with_its_intermediate_sends_the_full_chain") {
        return;
    }
    let pki = Pki::new();
    let dir = pki.dir.path();
    let root = (path_str(&pki.path("ca.crt")), path_str(&pki.path("ca.key")));
    let (int_crt, int_key) = openssl_cert(
        dir,
        "intermediate",
        &["rsa:2048"],
        "/CN=brokerscope test intermediate",
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n",
        (&root.0, &root.1),
        "0x60",
    );
    let (leaf, leaf_key) = openssl_cert(
        dir,
        "rsa-server",
        &["rsa:2048"],
        "/CN=localhost",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n\
         keyUsage=critical,digitalSignature,keyEncipherment\n",
        (&int_crt, &int_key),
        "0x61",
    );
    let chain = format!(
        "{}{}",
        std::fs::read_to_string(&leaf).unwrap(),
        std::fs::read_to_string(&int_crt).unwrap()
    );
    let chain_file = write(dir, "chain.crt", &chain);
    let pkcs1 = path_str(&dir.join("rsa-server.pkcs1.key"));
    run_ok(Command::new("openssl").args(["rsa", "-in", &leaf_key, "-traditional", "-out", &pkcs1]));
    let files = TlsFiles {
        cert: chain_file.into(),
        key: pkcs1.into(),
        client_ca: pki.path("ca.crt"),
    };
    let agent = Agent::start_with(pki, files, "");
    // The client trusts only the root: verification succeeds only if the intermediate is sent.
    let (ok, text) = s_client(
        agent.port(),
        &[
            "-showcerts",
            "-verify_return_error",
            "-CAfile",
            &root.0,
            "-cert",
            agent.pki.path("client.crt").to_str().unwrap(),
            "-key",
            agent.pki.path("client.key").to_str().unwrap(),
        ],
    );
    assert!(ok, "{text}");
    assert_eq!(
        text.matches("-----BEGIN CERTIFICATE-----").count(),
        2,
        "{text}"
    );
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    assert!(text.contains("Server public key is 2048 bit"), "{text}");
    let (code, _) = agent.get("/health");
    assert_eq!(code, 200);
}

#[test]
fn ecdsa_server_key_in_sec1_pem_is_served() {
    if !privileged("ecdsa_server_key_in_sec1_pem_is_served") {
        return;
    }
    let pki = Pki::new();
    let sec1 = pki.path("tls.sec1.key");
    run_ok(Command::new("openssl").args([
        "ec",
        "-in",
        pki.path("tls.key").to_str().unwrap(),
        "-out",
        sec1.to_str().unwrap(),
    ]));
    assert!(
        std::fs::read_to_string(&sec1)
            .unwrap()
            .starts_with("-----BEGIN EC PRIVATE KEY-----")
    );
    let files = TlsFiles {
        key: sec1,
        ..TlsFiles::of(&pki)
    };
    let agent = Agent::start_with(pki, files, "");
    let (code, body) = agent.get("/health");
    assert_eq!((code, body.as_str()), (200, r#"{"status":"ok"}"#));
}

#[test]
fn tls_1_1_is_refused_1_2_and_1_3_are_accepted_with_alpn_h2() {
    if !privileged("tls_1_1_is_refused_1_2_and_1_3_are_accepted_with_alpn_h2") {
        return;
    }
    let agent = Agent::start("");
    let (crt, key, ca) = (
        path_str(&agent.pki.path("client.crt")),
        path_str(&agent.pki.path("client.key")),
        path_str(&agent.pki.path("ca.crt")),
    );
    let client = ["-cert", &crt, "-key", &key, "-CAfile", &ca];
    for (version, protocol) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let mut args = vec![version, "-alpn", "h2,http/1.1"];
        args.extend(&client);
        let (ok, text) = s_client(agent.port(), &args);
        assert!(ok, "{text}");
        assert!(
            text.contains(&format!("New, {protocol}, Cipher is")),
            "{text}"
        );
        assert!(text.contains("ALPN protocol: h2"), "{text}");
        assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    }
    // SECLEVEL=0 so that OpenSSL 3 really offers TLS 1.1 instead of refusing locally.
    let mut args = vec!["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"];
    args.extend(&client);
    let (ok, text) = s_client(agent.port(), &args);
    assert!(!ok, "{text}");
    // The ClientHello went out and the server answered with a fatal alert.
    assert!(text.contains("sslv3 alert handshake failure"), "{text}");
    assert!(text.contains("Cipher is (NONE)"), "{text}");
    let log = agent.wait_for_log("TLS handshake refused");
    assert!(log.contains("peer is incompatible"), "{log}");
}

#[test]
fn pki_dev_validity_flags_make_expired_certificates() {
    let expired = Pki::with_args(&["--not-before=-3d", "--not-after=-1d"]);
    let fresh = Pki::with_args(&["--days", "2"]);
    let checkend = |pki: &Pki, file: &str| {
        Command::new("openssl")
            .args(["x509", "-noout", "-checkend", "0", "-in"])
            .arg(pki.path(file))
            .output()
            .unwrap()
            .status
            .success()
    };
    for file in ["ca.crt", "tls.crt", "client.crt"] {
        assert!(!checkend(&expired, file), "{file} should have expired");
        assert!(checkend(&fresh, file), "{file} should be valid");
    }
    // Two days: still valid in 47 hours, not in 49.
    let valid_for = |secs: u64| {
        Command::new("openssl")
            .args(["x509", "-noout", "-checkend", &secs.to_string(), "-in"])
            .arg(fresh.path("tls.crt"))
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(valid_for(47 * 3600));
    assert!(!valid_for(49 * 3600));

    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(brokerscope_tests::agent_bin())
        .args(["pki", "dev", "--out"])
        .arg(dir.path())
        .arg("--not-after=yesterday")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`yesterday` is not a time"), "{stderr}");
}

#[test]
fn a_server_cert_near_expiry_warns_and_an_expired_one_stops_the_start() {
    if !privileged("a_server_cert_near_expiry_warns_and_an_expired_one_stops_the_start") {
        return;
    }
    // One day from a minute ago: under 24 hours left.
    let pki = Pki::with_args(&["--days", "1"]);
    let files = TlsFiles::of(&pki);
    let agent = Agent::start_with(pki, files, "");
    let line = agent.wait_for_log("less than 24h; rotate it");
    assert!(line.contains("server certificate expires in"), "{line}");
    assert!(line.contains("WARN"), "{line}");
    let expiry = agent
        .metric("brokerscope_tls_cert_expiry_timestamp_seconds", &[])
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now + 23.0 * 3600.0..now + 24.0 * 3600.0).contains(&expiry),
        "{expiry} vs now {now}"
    );

    let expired = Pki::with_args(&["--not-before=-3d", "--not-after=-1d"]);
    let files = TlsFiles::of(&expired);
    let (status, log) = Agent::run_to_exit(expired, files, "");
    assert!(!status.success(), "{log}");
    assert!(log.contains("tls.crt is not valid now"), "{log}");
    assert!(!log.contains("listening"), "{log}");
}
