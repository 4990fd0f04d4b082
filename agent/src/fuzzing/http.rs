//! The HTTP API: the real router (access guard, routes, operator routes) driven with `oneshot`
//! as the route tests do, over a model holding three brokers.
//!
//! Input: `METHOD TARGET` on the first line, `Name: value` header lines, an empty line, then the
//! body. What hyper would refuse before routing (a method or header that is not a token, a
//! target that is neither origin- nor absolute-form) is skipped. Every answer must be below
//! 500, but for the readiness routes' 503 (not ready is their answer), and an error must say
//! what was wrong in a JSON body (but to HEAD, which has none); no request may hang.
//! `GET /v1/diagnostics` is left out (see [`http`]).

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use axum::{
    body::Body,
    http::{HeaderName, HeaderValue, Method, Request, StatusCode, Uri, header},
};
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

use crate::{
    broker::{Broker, Cgroup, Evidence, Listener, ProcessStatus},
    config::{AccessLog, Config},
    control::{Control, logs::LogRing},
    model::Model,
    server::{
        ListenerPolicy,
        identity::{ClientIdentity, Name},
        routes,
    },
    stats::ServerStats,
};

/// Longest any answer may take (a fuzz run's own timeout is much longer: a hang here is a
/// finding of its own, not a stuck run).
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => panic!("cannot start a runtime: {e}"),
        }
    })
}

/// A pid no process has: the state tracker finds nothing listening and says starting.
const NO_PID: u32 = u32::MAX - 7;

fn broker(id: &str, pid: u32, state: ProcessStatus, ports: &[(&str, u16)]) -> Broker {
    Broker {
        id: id.into(),
        state,
        pid,
        pod: Some(format!("kafka-{id}")),
        netns: Some(4_026_531_840),
        cgroup: Cgroup::default(),
        start_time_ticks: 1000,
        started_at: Some(1_700_000_000),
        restarts: 0,
        cmdline_hash: 0,
        process_roles: vec!["broker".into()],
        listeners: ports
            .iter()
            .map(|&(name, port)| Listener {
                name: name.into(),
                host: String::new(),
                port,
                security_protocol: Some("PLAINTEXT".into()),
            })
            .collect(),
        log_dirs: vec!["/var/lib/kafka/data".into()],
        log_dir_filesystems: vec!["ext4".into()],
        evidence: Evidence::default(),
    }
}

/// The router as `run` builds it: one shared by the requests that change nothing, a fresh one
/// for each PATCH (a config change must not leak into the next input).
fn app(method: &Method) -> axum::Router {
    static SHARED: OnceLock<axum::Router> = OnceLock::new();
    if method == Method::PATCH {
        return fresh_app();
    }
    SHARED.get_or_init(fresh_app).clone()
}

fn fresh_app() -> axum::Router {
    let config = Config::default();
    let mut section = config.server.clone();
    // High enough that a run never hits the limit: 429 is right, but would hide the route.
    section.rate_limit_rps = 100_000;
    section.rate_limit_burst = 1_000_000;
    section.access_log = AccessLog::Off;
    let server = ListenerPolicy::new(&section, Arc::new(ServerStats::default()));
    let model = Arc::new(Model::default());
    model.set_brokers(vec![
        broker("0", NO_PID, ProcessStatus::Running, &[("PLAINTEXT", 9092)]),
        broker("1", NO_PID - 1, ProcessStatus::NotRunning, &[]),
        broker("2", NO_PID - 2, ProcessStatus::Running, &[]),
    ]);
    let (_, handle) =
        tracing_subscriber::reload::Layer::new(tracing_subscriber::EnvFilter::new("info"));
    let control = Control::new(
        config,
        None,
        model.clone(),
        server.clone(),
        None,
        crate::control::logs::LogLevel::new(handle),
        Arc::new(LogRing::default()),
    );
    routes::router_with(model, server, control)
}

/// The request the input describes, or None when hyper would not have passed it on.
fn request(data: &[u8]) -> Option<Request<Body>> {
    let (line, mut rest) = super::scratch::first_line(data);
    let line = std::str::from_utf8(line).ok()?;
    let (method, target) = line.split_once(' ').unwrap_or(("GET", line));
    let method = Method::from_bytes(method.as_bytes()).ok()?;
    if !(target.starts_with('/') || target.starts_with("http://") || target.starts_with("https://"))
    {
        return None;
    }
    let uri = Uri::try_from(target).ok()?;
    let mut builder = Request::builder().method(method).uri(uri);
    loop {
        let (h, after) = super::scratch::first_line(rest);
        rest = after;
        if h.is_empty() {
            break;
        }
        let colon = h.iter().position(|&b| b == b':')?;
        let name = HeaderName::from_bytes(&h[..colon]).ok()?;
        let value = HeaderValue::from_bytes(h[colon + 1..].trim_ascii()).ok()?;
        builder = builder.header(name, value);
    }
    let operator = Arc::new(ClientIdentity::from_names(vec![
        Name::Cn("cluster-operator".into()),
        Name::Dns("cluster-operator.kafka.svc".into()),
    ]));
    builder
        .extension(operator)
        .body(Body::from(rest.to_vec()))
        .ok()
}

/// Where 503 is an answer, not a failure: "not ready" (the model has no probes; a starting
/// broker).
fn may_be_unavailable(path: &str) -> bool {
    matches!(path, "/ready" | "/v1/ready" | "/v1/ready/")
}

pub fn http(data: &[u8]) {
    let Some(request) = request(data) else {
        return;
    };
    // The diagnostics capture turns the kernel's BPF run-time statistics on for a 1-second
    // window whatever the request says: a node-wide side effect, and a second an input.
    if request.uri().path() == "/v1/diagnostics"
        && matches!(*request.method(), Method::GET | Method::HEAD)
    {
        return;
    }
    let shown = format!("{} {}", request.method(), request.uri());
    // A HEAD answer has the headers of a GET and no body.
    let head = request.method() == Method::HEAD;
    let path = request.uri().path().to_string();
    let app = app(request.method());
    runtime().block_on(async move {
        let answer = tokio::time::timeout(ANSWER_WITHIN, async {
            let response = match app.oneshot(request).await {
                Ok(r) => r,
                Err(e) => match e {},
            };
            let status = response.status();
            let streaming = response
                .headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            // An event stream never ends: its status and headers are the answer.
            let body = if streaming {
                Vec::new()
            } else {
                match response.into_body().collect().await {
                    Ok(b) => b.to_bytes().to_vec(),
                    Err(e) => panic!("{shown}: the body failed: {e}"),
                }
            };
            (status, body)
        })
        .await;
        let Ok((status, body)) = answer else {
            panic!("{shown}: no answer within {ANSWER_WITHIN:?}");
        };
        let text = String::from_utf8_lossy(&body);
        assert!(
            status.as_u16() < 500
                || (status == StatusCode::SERVICE_UNAVAILABLE && may_be_unavailable(&path)),
            "{shown}: {status} {text}"
        );
        if status.is_client_error() && !head {
            let error = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string));
            assert!(
                error.is_some_and(|e| !e.is_empty()),
                "{shown}: {status} without a JSON error: {text}"
            );
        }
    });
}
