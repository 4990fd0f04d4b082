//! The operator's command-line client (`brokerscope get|set|events|logs|top`): requests to the
//! agent's mTLS endpoint with the same identity files, the answer printed as an aligned table,
//! JSON or YAML, a clear sentence for every way it can be refused, and an exit code that says
//! which ([`ClientError::exit_code`]).
//!
//! Owns nothing of the agent; it only speaks HTTP/1.1 over rustls to `--url`. [`table`] shapes
//! answers for people, [`time`] reads and writes durations and times, [`metrics`] reads
//! `/metrics` back, [`top`] is the live terminal view.

mod metrics;
mod table;
mod time;
pub mod top;

use std::{
    io::{IsTerminal as _, Write as _},
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
/// A request refused for the rate limit (429) is sent again after the agent's `Retry-After`, at
/// most this many times: the agent's limit is per client identity, and an operator's burst of
/// commands (or a script's loop) should slow down rather than fail.
const RATE_LIMIT_RETRIES: u32 = 5;
/// Longest `Retry-After` honoured in one wait; a longer one is an error at once.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

pub use self::time::{Since, init_local_offset, parse_duration, parse_since};

/// The process's exit codes (docs/cli.md, "Exit codes"; in short in the README, "The CLI").
pub mod exit {
    pub const OK: u8 = 0;
    /// Anything else: a refusal, a bad answer, a local file that cannot be read.
    pub const ERROR: u8 = 1;
    /// The command line is wrong (clap's own errors exit 2 too).
    pub const USAGE: u8 = 2;
    /// The broker (or anything asked for by name) is not there.
    pub const NOT_FOUND: u8 = 3;
    /// The agent refused who we are: our certificate, its trust, or our identity.
    pub const DENIED: u8 = 4;
    /// The agent could not be reached, is not ready, or kept rate-limiting us.
    pub const UNAVAILABLE: u8 = 5;
}

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
}

/// `get -o`: how an answer is printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum GetOutput {
    /// Aligned columns for people.
    #[default]
    Table,
    /// The table with more columns.
    Wide,
    Json,
    Yaml,
    /// The diagnostics bundle as the agent archives it (`get diagnostics` only; redirect it).
    #[value(name = "tar.gz")]
    TarGz,
}

/// `-o` of `set`, `logs` and `events`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Lines for people.
    #[default]
    Table,
    /// JSON (`logs -f` and `events`: one object per line).
    Json,
    /// YAML (`logs -f` and `events`: one document per event).
    Yaml,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum What {
    /// `/health`: exits 0 when the agent serves (the DaemonSet's liveness probe).
    Health,
    /// `/ready`: exits 0 when ready, 5 naming the reasons when not (its readiness probe).
    Ready,
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
    #[error("{what}")]
    NotFound { what: String },
    #[error(
        "several brokers on this node ({}): choose one with --broker ID, e.g. --broker {}",
        brokers.join(", "),
        brokers.first().map_or("ID", String::as_str)
    )]
    ChooseBroker { brokers: Vec<String> },
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
    #[error(
        "rate limited by the agent (server.rate_limit_rps, per client identity); retry after {retry_after}s"
    )]
    RateLimited { retry_after: String },
    #[error("the agent is not ready or overloaded (503): {detail}")]
    Unavailable { detail: String },
    #[error("refused ({status}): {detail}")]
    Refused { status: u16, detail: String },
    #[error("`{arg}`: {reason}")]
    Usage { arg: String, reason: String },
    #[error("cannot write the answer: {source}")]
    Write {
        #[source]
        source: std::io::Error,
    },
    #[error("the terminal: {source}")]
    Terminal {
        #[source]
        source: std::io::Error,
    },
}

impl ClientError {
    /// The process's exit code for this error ([`exit`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Url { .. }
            | ClientError::Usage { .. }
            | ClientError::ChooseBroker { .. } => exit::USAGE,
            ClientError::NotFound { .. } => exit::NOT_FOUND,
            ClientError::ClientCertRefused { .. }
            | ClientError::ServerCertUntrusted { .. }
            | ClientError::Forbidden { .. } => exit::DENIED,
            ClientError::Connect { .. }
            | ClientError::Timeout { .. }
            | ClientError::RateLimited { .. }
            | ClientError::Unavailable { .. } => exit::UNAVAILABLE,
            ClientError::Read { .. }
            | ClientError::Pem { .. }
            | ClientError::Tls { .. }
            | ClientError::Handshake { .. }
            | ClientError::Http { .. }
            | ClientError::Refused { .. }
            | ClientError::Write { .. }
            | ClientError::Terminal { .. } => exit::ERROR,
        }
    }
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

    /// A request whose whole answer is read; refusals become errors. A 429 is sent again after
    /// the agent's `Retry-After` ([`RATE_LIMIT_RETRIES`]), said on stderr.
    pub async fn call(
        &self,
        method: hyper::Method,
        path: &str,
        accept: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, ClientError> {
        let mut retries = 0;
        loop {
            match self
                .call_once(method.clone(), path, accept, body.clone())
                .await
            {
                Err(ClientError::RateLimited { retry_after }) if retries < RATE_LIMIT_RETRIES => {
                    back_off(retry_after, &mut retries).await?
                }
                other => return other,
            }
        }
    }

    /// One request, refusals as errors, no retry.
    pub async fn call_once(
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

/// How long a `Retry-After` of whole seconds asks to wait; None when it is not one, or longer
/// than [`MAX_RETRY_AFTER`].
/// Waits out a 429's `Retry-After` (said on stderr) and counts the retry; the 429 itself when
/// its wait is not one to take.
async fn back_off(retry_after: String, retries: &mut u32) -> Result<(), ClientError> {
    let wait = retry_after_wait(&retry_after).ok_or(ClientError::RateLimited { retry_after })?;
    *retries += 1;
    eprintln!(
        "brokerscope: rate limited by the agent; retrying in {}s",
        wait.as_secs()
    );
    tokio::time::sleep(wait).await;
    Ok(())
}

fn retry_after_wait(value: &str) -> Option<Duration> {
    let secs: u64 = value.trim().parse().ok()?;
    let wait = Duration::from_secs(secs.max(1));
    (wait <= MAX_RETRY_AFTER).then_some(wait)
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
        404 => ClientError::NotFound {
            what: "not found".into(),
        },
        400 if json["brokers"].is_array() => ClientError::ChooseBroker {
            brokers: json["brokers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|b| b.as_str().map(str::to_string))
                .collect(),
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

fn usage(arg: &str, reason: &str) -> ClientError {
    ClientError::Usage {
        arg: arg.into(),
        reason: reason.into(),
    }
}

/// Writes to stdout. A reader that went away ends the process quietly: client commands run
/// with SIGPIPE at its default (see `main`).
fn emit(text: &[u8]) -> Result<(), ClientError> {
    let mut out = std::io::stdout().lock();
    out.write_all(text)
        .and_then(|()| out.flush())
        .map_err(|source| ClientError::Write { source })
}

/// The value as pretty JSON or YAML, ending in a newline.
fn structured(v: &Value, yaml: bool) -> String {
    if yaml {
        serde_yaml::to_string(v).unwrap_or_default()
    } else {
        let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// One record of a stream (`logs -f`, `events`): a JSON line or a YAML document.
fn streamed(v: &Value, yaml: bool) -> String {
    if yaml {
        format!("---\n{}", serde_yaml::to_string(v).unwrap_or_default())
    } else {
        format!("{v}\n")
    }
}

fn parse_json(answer: &Answer) -> Result<Value, ClientError> {
    serde_json::from_slice(&answer.body).map_err(|e| ClientError::Http {
        reason: format!("the agent answered something that is not JSON: {e}"),
    })
}

fn now() -> ::time::OffsetDateTime {
    ::time::OffsetDateTime::now_utc()
}

/// The not-found error for broker `id` (or for none), naming the brokers the agent has.
async fn no_such_broker(client: &Client, id: Option<&str>) -> ClientError {
    let ids: Vec<String> = match client
        .call(hyper::Method::GET, "/v1/brokers", "application/json", None)
        .await
        .and_then(|a| parse_json(&a))
    {
        Ok(Value::Array(list)) => list
            .iter()
            .filter_map(|b| b["id"].as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    let here = if ids.is_empty() {
        "the agent tracks no broker on this node".to_string()
    } else {
        format!("brokers here: {} (--broker ID)", ids.join(", "))
    };
    ClientError::NotFound {
        what: match id {
            Some(id) => format!("no broker `{id}` on this node; {here}"),
            None => format!("no broker on this node; {here}"),
        },
    }
}

/// `brokerscope get ...`.
pub async fn get(
    c: &Connection,
    what: What,
    broker: Option<&str>,
    output: GetOutput,
) -> Result<(), ClientError> {
    check_get_flags(what, broker, output)?;
    let client = Client::new(c)?;
    let yaml = output == GetOutput::Yaml;
    let wide = output == GetOutput::Wide;
    let get = |path: String, accept: &'static str| {
        let client = &client;
        async move { client.call(hyper::Method::GET, &path, accept, None).await }
    };
    let text = match what {
        // The DaemonSet's exec probes: exit 0 with `ok`, or the error's exit code.
        What::Health | What::Ready => {
            let path = if matches!(what, What::Health) {
                "/health"
            } else {
                "/ready"
            };
            let v = parse_json(&get(path.into(), "application/json").await?)?;
            match output {
                GetOutput::Json | GetOutput::Yaml => structured(&v, yaml),
                _ => "ok\n".to_string(),
            }
        }
        What::Metrics => {
            let a = get("/metrics".into(), "text/plain").await?;
            match output {
                GetOutput::Json | GetOutput::Yaml => {
                    let samples = metrics::parse(&String::from_utf8_lossy(&a.body));
                    structured(&serde_json::to_value(samples).unwrap_or_default(), yaml)
                }
                _ => return emit(&a.body),
            }
        }
        What::Brokers => get_brokers(&client, broker, output).await?,
        What::State => get_state(&client, broker, output).await?,
        What::Diagnostics if output == GetOutput::TarGz => {
            return get_diagnostics_archive(&client).await;
        }
        What::Diagnostics => {
            let v = parse_json(&get("/v1/diagnostics".into(), "application/json").await?)?;
            match output {
                GetOutput::Json | GetOutput::Yaml => structured(&v, yaml),
                _ => table::diagnostics(&v, wide),
            }
        }
        What::Config => {
            let v = parse_json(&get("/v1/config".into(), "application/json").await?)?;
            match output {
                GetOutput::Json | GetOutput::Yaml => structured(&v, yaml),
                _ => table::config(&v),
            }
        }
    };
    emit(text.as_bytes())
}

/// The flags `get` refuses for what it gets.
fn check_get_flags(what: What, broker: Option<&str>, output: GetOutput) -> Result<(), ClientError> {
    if broker.is_some() && !matches!(what, What::Brokers | What::State) {
        return Err(usage(
            "--broker",
            "applies to `get brokers` and `get state` only",
        ));
    }
    if output == GetOutput::TarGz && !matches!(what, What::Diagnostics) {
        return Err(usage(
            "-o tar.gz",
            "only `get diagnostics` is an archive; use -o json or -o yaml",
        ));
    }
    Ok(())
}

/// `get brokers`: one broker or all, a table or structured.
async fn get_brokers(
    client: &Client,
    broker: Option<&str>,
    output: GetOutput,
) -> Result<String, ClientError> {
    let yaml = output == GetOutput::Yaml;
    let wide = output == GetOutput::Wide;
    let path = match broker {
        Some(id) => format!("/v1/brokers/{}", encode(id)),
        None => "/v1/brokers".into(),
    };
    let answer = get_broker_json(client, &path, broker).await?;
    let list = match parse_json(&answer)? {
        Value::Array(list) => list,
        one => vec![one],
    };
    Ok(match output {
        GetOutput::Json | GetOutput::Yaml => structured(&Value::Array(list), yaml),
        _ => table::brokers(&list, wide, now()),
    })
}

/// GET `path` as JSON; a 404 becomes the CLI's "no such broker" error naming `broker`.
async fn get_broker_json(
    client: &Client,
    path: &str,
    broker: Option<&str>,
) -> Result<Answer, ClientError> {
    match client
        .call(hyper::Method::GET, path, "application/json", None)
        .await
    {
        Err(ClientError::NotFound { .. }) => Err(no_such_broker(client, broker).await),
        other => other,
    }
}

/// `get state`: Strimzi's broker state, a table or structured.
async fn get_state(
    client: &Client,
    broker: Option<&str>,
    output: GetOutput,
) -> Result<String, ClientError> {
    let yaml = output == GetOutput::Yaml;
    let path = format!("/v1/broker-state/{}", query(&[("broker", broker)]));
    let answer = get_broker_json(client, &path, broker).await?;
    let v = parse_json(&answer)?;
    Ok(match output {
        GetOutput::Json | GetOutput::Yaml => structured(&v, yaml),
        _ => table::state(&v),
    })
}

/// `get diagnostics -o tar.gz`: the archive, to anything but a terminal.
async fn get_diagnostics_archive(client: &Client) -> Result<(), ClientError> {
    if std::io::stdout().is_terminal() {
        return Err(usage(
            "-o tar.gz",
            "will not write a gzip archive to a terminal; redirect it: \
             brokerscope get diagnostics -o tar.gz > diagnostics.tar.gz",
        ));
    }
    let a = client
        .call(
            hyper::Method::GET,
            "/v1/diagnostics",
            "application/gzip",
            None,
        )
        .await?;
    if a.body.get(..2) != Some(&[0x1f, 0x8b]) {
        return Err(ClientError::Http {
            reason: "the agent did not answer with a gzip archive (an older agent?)".into(),
        });
    }
    emit(&a.body)
}

/// `brokerscope set config KEY=VALUE...`.
pub async fn set_config(
    c: &Connection,
    assignments: &[String],
    output: Output,
) -> Result<(), ClientError> {
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
    let text = match output {
        Output::Json => structured(&v, false),
        Output::Yaml => structured(&v, true),
        Output::Table => table::config_change(&v),
    };
    emit(text.as_bytes())
}

/// How often `logs -f` asks for new lines: one request a second stays far below the agent's
/// default rate limit (20 per second, per client identity) with room for other commands.
const FOLLOW_POLL: Duration = Duration::from_secs(1);

/// `brokerscope logs`: the agent's recent lines; with `follow`, new ones as they come (polled,
/// each asked from the newest time seen, lines seen at that time skipped).
pub async fn logs(
    c: &Connection,
    since: Option<Since>,
    level: Option<&str>,
    follow: bool,
    output: Output,
) -> Result<(), ClientError> {
    let client = Client::new(c)?;
    let mut since = since.map(|s| s.query_value());
    // Lines at the newest time printed so far: the next answer starts at that time again.
    let mut newest: Option<String> = None;
    let mut printed_at_newest: Vec<String> = Vec::new();
    let mut dropped = None;
    loop {
        let path = format!(
            "/v1/logs{}",
            query(&[("since", since.as_deref()), ("level", level)])
        );
        let v = parse_json(
            &client
                .call(hyper::Method::GET, &path, "application/json", None)
                .await?,
        )?;
        let lines = v["lines"].as_array().cloned().unwrap_or_default();
        if !follow {
            let text = match output {
                Output::Json => structured(&v, false),
                Output::Yaml => structured(&v, true),
                Output::Table => lines.iter().map(|l| table::log_line(l) + "\n").collect(),
            };
            emit(text.as_bytes())?;
            if output == Output::Table && v["dropped"].as_u64().unwrap_or(0) > 0 {
                eprintln!("({} older lines were dropped from the ring)", v["dropped"]);
            }
            return Ok(());
        }
        let now_dropped = v["dropped"].as_u64().unwrap_or(0);
        if let Some(before) = dropped
            && now_dropped > before
            && newest.is_some()
        {
            // Lines went out of the ring between two polls; some may not have been seen.
            eprintln!(
                "brokerscope: the agent's log ring dropped {} lines since the last poll",
                now_dropped - before
            );
        }
        dropped = Some(now_dropped);
        let mut text = String::new();
        for l in &lines {
            let time = l["time"].as_str().unwrap_or("").to_string();
            let key = l.to_string();
            if newest.as_deref() == Some(time.as_str()) {
                if printed_at_newest.contains(&key) {
                    continue;
                }
            } else {
                newest = Some(time);
                printed_at_newest.clear();
            }
            printed_at_newest.push(key);
            match output {
                Output::Table => {
                    text.push_str(&table::log_line(l));
                    text.push('\n');
                }
                Output::Json => text.push_str(&streamed(l, false)),
                Output::Yaml => text.push_str(&streamed(l, true)),
            }
        }
        emit(text.as_bytes())?;
        if newest.is_some() {
            since.clone_from(&newest);
        }
        tokio::time::sleep(FOLLOW_POLL).await;
    }
}

/// `brokerscope events`: prints each event as it arrives until the stream ends or Ctrl-C.
pub async fn events(
    c: &Connection,
    broker: Option<&str>,
    listener: Option<&str>,
    kind: Option<&str>,
    output: Output,
) -> Result<(), ClientError> {
    let client = Client::new(c)?;
    let path = format!(
        "/v1/events{}",
        query(&[("broker", broker), ("listener", listener), ("kind", kind)])
    );
    let mut retries = 0;
    let response = loop {
        let response = client
            .send(hyper::Method::GET, &path, "text/event-stream", None)
            .await?;
        if response.status().is_success() {
            break response;
        }
        let (parts, body) = response.into_parts();
        let body = http_body_util::Limited::new(body, 1 << 20)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        match check(Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }) {
            Err(ClientError::RateLimited { retry_after }) if retries < RATE_LIMIT_RETRIES => {
                back_off(retry_after, &mut retries).await?
            }
            Err(e) => return Err(e),
            Ok(_) => return Ok(()),
        }
    };
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
                emit(event_text(output, &std::mem::take(&mut event), d).as_bytes())?;
            }
        }
        if buffer.len() > MAX_ANSWER {
            buffer.clear();
        }
    }
    Ok(())
}

fn event_text(output: Output, event: &str, data: &str) -> String {
    let v: Value = serde_json::from_str(data).unwrap_or(Value::String(data.into()));
    let v = if event == "dropped" {
        serde_json::json!({"kind": "dropped", "lost": v["lost"]})
    } else {
        v
    };
    match output {
        Output::Json => streamed(&v, false),
        Output::Yaml => streamed(&v, true),
        Output::Table => table::event_line(event, &v) + "\n",
    }
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
    fn retry_after_is_honoured_within_bounds() {
        assert_eq!(retry_after_wait("3"), Some(Duration::from_secs(3)));
        assert_eq!(retry_after_wait("0"), Some(Duration::from_secs(1)));
        assert_eq!(retry_after_wait("60"), None);
        assert_eq!(retry_after_wait("?"), None);
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
            "rate limited by the agent (server.rate_limit_rps, per client identity); retry after 3s"
        );
        assert_eq!(msg(answer(404, r#"{"error":"not found"}"#)), "not found");
        let choose = check(answer(
            400,
            r#"{"error":"several brokers on this node: choose one with ?broker=ID","brokers":["1","2"]}"#,
        ))
        .err()
        .unwrap();
        assert_eq!(
            choose.to_string(),
            "several brokers on this node (1, 2): choose one with --broker ID, e.g. --broker 1"
        );
        assert_eq!(choose.exit_code(), exit::USAGE);
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
