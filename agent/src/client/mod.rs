//! The operator's command-line client (`brokerscope get|set|events|logs`): one request to the
//! agent's mTLS endpoint with the same identity files, the answer printed as a table or JSON,
//! and a clear sentence for every way it can be refused.
//!
//! Owns nothing of the agent; it only speaks HTTP/1.1 over rustls to `--url`.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Connect and handshake must finish within this; a stream (events) has no overall limit.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A plain request must be answered within this (diagnostics take about a second).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest answer read into memory.
const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// Where and as whom to connect.
#[derive(Clone, Debug, clap::Args)]
pub struct Connection {
    /// The agent's endpoint.
    #[arg(
        long,
        env = "BROKERSCOPE_URL",
        default_value = "https://localhost:8443",
        global = true
    )]
    pub url: String,
    /// CA bundle that signed the agent's certificate.
    #[arg(long, default_value = "/etc/brokerscope/tls/ca.crt", global = true)]
    pub cacert: PathBuf,
    /// Our client certificate (PEM).
    #[arg(long, default_value = "/etc/brokerscope/tls/client.crt", global = true)]
    pub cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long, default_value = "/etc/brokerscope/tls/client.key", global = true)]
    pub key: PathBuf,
    /// How answers are printed.
    #[arg(long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Json,
    Table,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum What {
    Brokers,
    State,
    Metrics,
    Diagnostics,
    Config,
}

/// Why a command failed; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("--url {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} holds no usable {expected}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("TLS setup: {source}")]
    Tls {
        #[source]
        source: rustls::Error,
    },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error(
        "the server refused our client certificate ({alert}); check --cert/--key and that the agent's server.client_ca_file trusts its CA"
    )]
    ClientCertRefused { alert: String },
    #[error(
        "the server's certificate is not trusted: {reason}; check --cacert and the host in --url"
    )]
    ServerCertUntrusted { reason: String },
    #[error("TLS failed: {reason}")]
    Handshake { reason: String },
    #[error("HTTP: {reason}")]
    Http { reason: String },
    #[error(
        "forbidden: the agent knows us as `{identity}`, which is not in its server.allowed_client_names"
    )]
    Forbidden { identity: String },
    #[error("rate limited by the agent; retry after {retry_after}s")]
    RateLimited { retry_after: String },
    #[error("the agent is not ready or overloaded (503): {detail}")]
    Unavailable { detail: String },
    #[error("refused ({status}): {detail}")]
    Refused { status: u16, detail: String },
    #[error("`{arg}`: {reason}")]
    Usage { arg: String, reason: String },
}

/// One answer.
pub struct Answer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

/// A connected-on-demand client.
pub struct Client {
    host: String,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    server_name: rustls::pki_types::ServerName<'static>,
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::Read {
        what,
        path: path.into(),
        source,
    })
}

impl Client {
    pub fn new(c: &Connection) -> Result<Self, ClientError> {
        let url_err = |reason: &str| ClientError::Url {
            url: c.url.clone(),
            reason: reason.into(),
        };
        let rest = c
            .url
            .strip_prefix("https://")
            .ok_or_else(|| url_err("must start with https:// (the agent only speaks mTLS)"))?;
        let authority = rest.split('/').next().unwrap_or("");
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                let port = p.parse().map_err(|_| url_err("the port is not a number"))?;
                (h.trim_start_matches('[').trim_end_matches(']'), port)
            }
            _ => (authority.trim_start_matches('[').trim_end_matches(']'), 443),
        };
        if host.is_empty() {
            return Err(url_err("no host"));
        }
        let server_name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|_| url_err("the host is not a DNS name or IP address"))?;

        let ca = read_file("--cacert", &c.cacert)?;
        let mut roots = rustls::RootCertStore::empty();
        for der in rustls_pemfile::certs(&mut ca.as_slice()).flatten() {
            let _ = roots.add(der);
        }
        if roots.is_empty() {
            return Err(ClientError::Pem {
                what: "--cacert",
                path: c.cacert.clone(),
                expected: "CA certificate",
            });
        }
        let cert = read_file("--cert", &c.cert)?;
        let chain: Vec<_> = rustls_pemfile::certs(&mut cert.as_slice())
            .flatten()
            .collect();
        if chain.is_empty() {
            return Err(ClientError::Pem {
                what: "--cert",
                path: c.cert.clone(),
                expected: "certificate",
            });
        }
        let key = read_file("--key", &c.key)?;
        let key = rustls_pemfile::private_key(&mut key.as_slice())
            .ok()
            .flatten()
            .ok_or_else(|| ClientError::Pem {
                what: "--key",
                path: c.key.clone(),
                expected: "private key",
            })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|source| ClientError::Tls { source })?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|source| ClientError::Tls { source })?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            host: host.to_string(),
            port,
            tls: Arc::new(tls),
            server_name,
        })
    }

    fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Sends one request; returns the response with its body still to read.
    pub async fn send(
        &self,
        method: hyper::Method,
        path: &str,
        accept: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let addr = self.addr();
        let timeout = || ClientError::Timeout {
            addr: addr.clone(),
            timeout: CONNECT_TIMEOUT,
        };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&addr))
            .await
            .map_err(|_| timeout())?
            .map_err(|source| ClientError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let tls = tokio::time::timeout(
            CONNECT_TIMEOUT,
            connector.connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| timeout())?
        .map_err(|e| classify(&e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| classify(&e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let host = if self.port == 443 {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host)
            .header(hyper::header::ACCEPT, accept)
            .header(
                hyper::header::USER_AGENT,
                concat!("brokerscope-cli/", env!("CARGO_PKG_VERSION")),
            );
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/merge-patch+json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Http {
                reason: e.to_string(),
            })?;
        sender.send_request(request).await.map_err(|e| classify(&e))
    }

    /// A request whose whole answer is read; refusals become errors.
    pub async fn call(
        &self,
        method: hyper::Method,
        path: &str,
        accept: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, ClientError> {
        let addr = self.addr();
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let response = self.send(method, path, accept, body).await?;
            let (parts, body) = response.into_parts();
            let body = http_body_util::Limited::new(body, MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| ClientError::Http {
                    reason: format!("reading the answer: {e}"),
                })?
                .to_bytes();
            Ok::<_, ClientError>(Answer {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            })
        })
        .await
        .map_err(|_| ClientError::Timeout {
            addr,
            timeout: REQUEST_TIMEOUT,
        })??;
        check(answer)
    }
}

/// Turns a non-2xx answer into the error that explains it.
fn check(answer: Answer) -> Result<Answer, ClientError> {
    if (200..300).contains(&answer.status) {
        return Ok(answer);
    }
    let json: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
    let text = || {
        String::from_utf8_lossy(&answer.body)
            .chars()
            .take(2000)
            .collect::<String>()
    };
    Err(match answer.status {
        403 => ClientError::Forbidden {
            identity: json["identity"].as_str().unwrap_or("unknown").to_string(),
        },
        429 => ClientError::RateLimited {
            retry_after: answer
                .headers
                .get(hyper::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
                .to_string(),
        },
        503 => ClientError::Unavailable {
            detail: match json["reasons"].as_array() {
                Some(reasons) => reasons
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("; "),
                None => text(),
            },
        },
        status => ClientError::Refused {
            status,
            detail: match json["fields"].as_array() {
                Some(fields) => fields
                    .iter()
                    .map(|f| {
                        format!(
                            "{}: {}",
                            f["key"].as_str().unwrap_or("?"),
                            f["reason"].as_str().unwrap_or("?")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
                None if json["parameter"].is_string() => format!(
                    "parameter `{}`: {}",
                    json["parameter"].as_str().unwrap_or(""),
                    json["reason"].as_str().unwrap_or("")
                ),
                None => text(),
            },
        },
    })
}

/// Finds the rustls error under an I/O or hyper error and says what it means.
fn classify(e: &(dyn std::error::Error + 'static)) -> ClientError {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let tls = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(tls) = tls {
            use rustls::AlertDescription as A;
            return match tls {
                rustls::Error::AlertReceived(
                    alert @ (A::BadCertificate
                    | A::UnknownCA
                    | A::CertificateRequired
                    | A::CertificateUnknown
                    | A::CertificateRevoked
                    | A::CertificateExpired
                    | A::UnsupportedCertificate
                    | A::AccessDenied
                    | A::DecryptError),
                ) => ClientError::ClientCertRefused {
                    alert: format!("{alert:?}"),
                },
                rustls::Error::InvalidCertificate(reason) => ClientError::ServerCertUntrusted {
                    reason: format!("{reason:?}"),
                },
                other => ClientError::Handshake {
                    reason: other.to_string(),
                },
            };
        }
        cur = err.source();
    }
    ClientError::Http {
        reason: e.to_string(),
    }
}

/// `brokerscope set config KEY=VALUE`: the merge patch for one dotted key. The value is JSON
/// when it parses as JSON (`5`, `true`, `["a"]`), else a string.
pub fn patch_for(assignment: &str) -> Result<Value, ClientError> {
    let usage = |reason: &str| ClientError::Usage {
        arg: assignment.chars().take(200).collect(),
        reason: reason.into(),
    };
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| usage("expected KEY=VALUE, e.g. server.access_log=debug"))?;
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(usage("KEY is section.key, e.g. server.rate_limit_rps"));
    }
    let mut value =
        serde_json::from_str::<Value>(raw).unwrap_or_else(|_| Value::String(raw.into()));
    for part in parts.iter().rev() {
        let mut map = serde_json::Map::new();
        map.insert((*part).to_string(), value);
        value = Value::Object(map);
    }
    Ok(value)
}

/// Adds `more` to the merge patch `patch`. Not a merge patch applied (that would delete the
/// keys set to null): a null stays, meaning "back to the default" when the agent applies it.
fn combine(patch: &mut Value, more: Value) {
    match (patch, more) {
        (Value::Object(into), Value::Object(more)) => {
            for (key, value) in more {
                match into.get_mut(&key) {
                    Some(existing) if existing.is_object() && value.is_object() => {
                        combine(existing, value)
                    }
                    _ => {
                        into.insert(key, value);
                    }
                }
            }
        }
        (patch, more) => *patch = more,
    }
}

/// Percent-encodes a query value.
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b',' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn query(pairs: &[(&str, Option<&str>)]) -> String {
    let q: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={}", encode(v))))
        .collect();
    if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    }
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn parse_json(answer: &Answer) -> Result<Value, ClientError> {
    serde_json::from_slice(&answer.body).map_err(|e| ClientError::Http {
        reason: format!("the agent answered something that is not JSON: {e}"),
    })
}

/// `brokerscope get ...`.
pub async fn get(c: &Connection, what: What, broker: Option<&str>) -> Result<(), ClientError> {
    let client = Client::new(c)?;
    let get = |path: String, accept: &'static str| {
        let client = &client;
        async move { client.call(hyper::Method::GET, &path, accept, None).await }
    };
    match what {
        What::Metrics => {
            let a = get("/metrics".into(), "text/plain").await?;
            std::io::stdout().write_all(&a.body).ok();
        }
        What::Brokers => {
            let path = match broker {
                Some(id) => format!("/v1/brokers/{}", encode(id)),
                None => "/v1/brokers".into(),
            };
            let v = parse_json(&get(path, "application/json").await?)?;
            let list = match v {
                Value::Array(list) => list,
                one => vec![one],
            };
            match c.output {
                Output::Json => print_json(&Value::Array(list)),
                Output::Table => print_brokers(&list),
            }
        }
        What::State => {
            let path = format!("/v1/broker-state/{}", query(&[("broker", broker)]));
            let v = parse_json(&get(path, "application/json").await?)?;
            match c.output {
                Output::Json => print_json(&v),
                Output::Table => {
                    println!("STATE    RECOVERY");
                    println!(
                        "{:<8} {}",
                        v["brokerState"],
                        v.get("recoveryState").map_or("-".into(), |r| r.to_string())
                    );
                }
            }
        }
        What::Diagnostics => {
            let v = parse_json(&get("/v1/diagnostics".into(), "application/json").await?)?;
            match c.output {
                Output::Json => print_json(&v),
                Output::Table => print_diagnostics(&v),
            }
        }
        What::Config => {
            let v = parse_json(&get("/v1/config".into(), "application/json").await?)?;
            match c.output {
                Output::Json => print_json(&v),
                Output::Table => print_config(&v),
            }
        }
    }
    Ok(())
}

/// `brokerscope set config KEY=VALUE...`.
pub async fn set_config(c: &Connection, assignments: &[String]) -> Result<(), ClientError> {
    let mut patch = Value::Object(serde_json::Map::new());
    for a in assignments {
        combine(&mut patch, patch_for(a)?);
    }
    let client = Client::new(c)?;
    let body = serde_json::to_vec(&patch).unwrap_or_default();
    let a = client
        .call(
            hyper::Method::PATCH,
            "/v1/config",
            "application/json",
            Some(body),
        )
        .await?;
    let v = parse_json(&a)?;
    match c.output {
        Output::Json => print_json(&v),
        Output::Table => {
            let changed = v["changed"].as_array().cloned().unwrap_or_default();
            if changed.is_empty() {
                println!("nothing changed (generation {})", v["generation"]);
            }
            for ch in changed {
                println!(
                    "{}: {} -> {}",
                    ch["key"].as_str().unwrap_or("?"),
                    ch["old"],
                    ch["new"]
                );
            }
            println!("generation {}", v["generation"]);
        }
    }
    Ok(())
}

/// `brokerscope logs`.
pub async fn logs(
    c: &Connection,
    since: Option<&str>,
    level: Option<&str>,
) -> Result<(), ClientError> {
    let client = Client::new(c)?;
    let path = format!("/v1/logs{}", query(&[("since", since), ("level", level)]));
    let v = parse_json(
        &client
            .call(hyper::Method::GET, &path, "application/json", None)
            .await?,
    )?;
    match c.output {
        Output::Json => print_json(&v),
        Output::Table => {
            for l in v["lines"].as_array().into_iter().flatten() {
                println!(
                    "{} {:5} {}: {}",
                    l["time"].as_str().unwrap_or(""),
                    l["level"].as_str().unwrap_or("").to_uppercase(),
                    l["target"].as_str().unwrap_or(""),
                    l["message"].as_str().unwrap_or("")
                );
            }
            if v["dropped"].as_u64().unwrap_or(0) > 0 {
                eprintln!("({} older lines were dropped from the ring)", v["dropped"]);
            }
        }
    }
    Ok(())
}

/// `brokerscope events`: prints each event as it arrives until the stream ends or Ctrl-C.
pub async fn events(
    c: &Connection,
    broker: Option<&str>,
    listener: Option<&str>,
    kind: Option<&str>,
) -> Result<(), ClientError> {
    let client = Client::new(c)?;
    let path = format!(
        "/v1/events{}",
        query(&[("broker", broker), ("listener", listener), ("kind", kind)])
    );
    let response = client
        .send(hyper::Method::GET, &path, "text/event-stream", None)
        .await?;
    if !response.status().is_success() {
        let (parts, body) = response.into_parts();
        let body = http_body_util::Limited::new(body, 1 << 20)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        check(Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })?;
        return Ok(());
    }
    let mut body = response.into_body();
    let mut buffer = String::new();
    let mut event = String::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| classify(&e))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buffer.push_str(&String::from_utf8_lossy(&data));
        while let Some(at) = buffer.find('\n') {
            let line: String = buffer.drain(..=at).collect();
            let line = line.trim_end();
            if let Some(e) = line.strip_prefix("event: ") {
                event = e.to_string();
            } else if let Some(d) = line.strip_prefix("data: ") {
                print_event(c.output, &std::mem::take(&mut event), d);
            }
        }
        if buffer.len() > MAX_ANSWER {
            buffer.clear();
        }
    }
    Ok(())
}

fn print_event(output: Output, event: &str, data: &str) {
    let v: Value = serde_json::from_str(data).unwrap_or(Value::String(data.into()));
    match output {
        Output::Json => println!("{}", json_line(event, &v)),
        Output::Table if event == "dropped" => {
            println!(
                "-- {} events dropped (this client was too slow) --",
                v["lost"]
            )
        }
        Output::Table => println!(
            "{} {:<16} broker={} listener={} {}",
            v["time_ms"],
            event,
            v["broker"].as_str().unwrap_or("-"),
            v["listener"].as_str().unwrap_or("-"),
            v["detail"]
        ),
    }
    let _ = std::io::stdout().flush();
}

fn json_line(event: &str, v: &Value) -> String {
    if event == "dropped" {
        serde_json::json!({"kind": "dropped", "lost": v["lost"]}).to_string()
    } else {
        v.to_string()
    }
}

fn print_brokers(list: &[Value]) {
    println!(
        "{:<12} {:<12} {:>8} {:<20} {:>8}  LISTENERS",
        "ID", "STATE", "PID", "POD", "RESTARTS"
    );
    for b in list {
        let listeners: Vec<String> = b["listeners"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| format!("{}:{}", l["name"].as_str().unwrap_or("?"), l["port"]))
            .collect();
        println!(
            "{:<12} {:<12} {:>8} {:<20} {:>8}  {}",
            b["id"].as_str().unwrap_or("?"),
            b["state"].as_str().unwrap_or("?"),
            b["pid"],
            b["pod"].as_str().unwrap_or("-"),
            b["restarts"],
            listeners.join(",")
        );
    }
}

fn print_config(v: &Value) {
    for (section, keys) in v.as_object().into_iter().flatten() {
        for (key, value) in keys.as_object().into_iter().flatten() {
            println!("{section}.{key} = {value}");
        }
    }
}

fn print_diagnostics(v: &Value) {
    println!(
        "agent    {} (pid {})",
        v["agent"]["version"].as_str().unwrap_or("?"),
        v["agent"]["pid"]
    );
    println!(
        "kernel   {}",
        v["kernel"]["release"].as_str().unwrap_or("?")
    );
    println!("ready    {}", v["readiness"]["ready"]);
    println!(
        "{:<16} {:<44} {:>6} {:>12} {:>14}",
        "PROGRAM", "HOOK", "ID", "RUNS(1s)", "RUN_NS(1s)"
    );
    for p in v["programs"].as_array().into_iter().flatten() {
        println!(
            "{:<16} {:<44} {:>6} {:>12} {:>14}",
            p["program"].as_str().unwrap_or("?"),
            p["hook"].as_str().unwrap_or("?"),
            p["id"],
            p["window_run_count"],
            p["window_run_time_ns"]
        );
    }
    for m in v["maps"].as_array().into_iter().flatten() {
        println!(
            "map {:<12} {}/{}",
            m["map"].as_str().unwrap_or("?"),
            m["entries"],
            m["capacity"]
        );
    }
    println!("brokers  {}", v["brokers"].as_array().map_or(0, Vec::len));
    println!("(--output json for the whole bundle)");
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn assignments_combine_into_one_patch_that_keeps_nulls() {
        let mut patch = json!({});
        for a in [
            "server.rate_limit_rps=null",
            "server.access_log=debug",
            "discovery.listener_ports=[9092]",
            "server.access_log=null",
        ] {
            combine(&mut patch, patch_for(a).unwrap());
        }
        assert_eq!(
            patch,
            json!({
                "server": {"rate_limit_rps": null, "access_log": null},
                "discovery": {"listener_ports": [9092]}
            })
        );
    }

    #[test]
    fn dotted_assignments_become_merge_patches() {
        assert_eq!(
            patch_for("server.access_log=debug").unwrap(),
            json!({"server": {"access_log": "debug"}})
        );
        assert_eq!(
            patch_for("server.rate_limit_rps=50").unwrap(),
            json!({"server": {"rate_limit_rps": 50}})
        );
        assert_eq!(
            patch_for(r#"discovery.cmdline_patterns=["kafka\\.Kafka"]"#).unwrap(),
            json!({"discovery": {"cmdline_patterns": ["kafka\\.Kafka"]}})
        );
        assert_eq!(
            patch_for("discovery.listener_ports=null").unwrap(),
            json!({"discovery": {"listener_ports": null}})
        );
        assert_eq!(
            patch_for("server.listen=0.0.0.0:9443").unwrap(),
            json!({"server": {"listen": "0.0.0.0:9443"}})
        );
        assert!(matches!(
            patch_for("server"),
            Err(ClientError::Usage { .. })
        ));
        assert!(matches!(
            patch_for("server=1"),
            Err(ClientError::Usage { .. })
        ));
        assert!(matches!(patch_for(".x=1"), Err(ClientError::Usage { .. })));
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(
            query(&[
                ("since", Some("2026-11-26T17:00:00+01:00")),
                ("level", None)
            ]),
            "?since=2026-11-26T17%3A00%3A00%2B01%3A00"
        );
        assert_eq!(query(&[("kind", Some("a,b"))]), "?kind=a,b");
        assert_eq!(query(&[]), "");
    }

    #[test]
    fn refusals_explain_themselves() {
        let answer = |status, body: &str| Answer {
            status,
            headers: {
                let mut h = hyper::HeaderMap::new();
                h.insert(hyper::header::RETRY_AFTER, "3".parse().unwrap());
                h
            },
            body: Bytes::from(body.to_string()),
        };
        let msg = |a| check(a).err().unwrap().to_string();
        assert_eq!(
            msg(answer(
                403,
                r#"{"error":"forbidden","identity":"cluster-operator"}"#
            )),
            "forbidden: the agent knows us as `cluster-operator`, which is not in its server.allowed_client_names"
        );
        assert_eq!(
            msg(answer(429, "{}")),
            "rate limited by the agent; retry after 3s"
        );
        assert_eq!(
            msg(answer(503, r#"{"ready":false,"reasons":["a","b"]}"#)),
            "the agent is not ready or overloaded (503): a; b"
        );
        assert_eq!(
            msg(answer(
                400,
                r#"{"error":"invalid config","fields":[{"key":"server.x","reason":"unknown key"}]}"#
            )),
            "refused (400): server.x: unknown key"
        );
    }
}
