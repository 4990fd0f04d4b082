//! The mTLS endpoint against real clients: curl and openssl s_client.

use std::process::{Command, Stdio};

use std::time::Duration;

use brokerscope_tests::{Agent, Pki, curl, eventually, privileged};

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
