//! The HTTP routes: a plain `Router` value, testable with `oneshot` and no sockets.
//!
//! [`router`] is the API hardened by [`harden`]: JSON 404/405, a panic in a handler becomes a
//! JSON 500 (the server keeps serving), a body limit for extractors, and [`access::guard`]
//! (authorization, rate limit, caps, metrics, access log) around every route. The handlers'
//! shared state and errors are `api`'s.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::DefaultBodyLimit,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::json;
use tower_http::catch_panic::CatchPanicLayer;

use super::{
    ListenerPolicy, access,
    api::{ApiError, AppState},
    limits::MAX_BODY_BYTES,
    operator,
    pages::Encoding,
};
use crate::{
    broker::Broker,
    control::Control,
    model::Model,
    render::{self, Format},
    strimzi::StateView,
    views::{self, BrokerWithCounters},
};

/// Builds the router over the shared model and the endpoint's state, with a detached control
/// channel (defaults; no discovery or log filter to switch): for tests.
#[cfg(test)]
pub fn router(model: Arc<Model>, server: Arc<ListenerPolicy>) -> Router {
    let control = Control::detached(model.clone(), server.clone());
    router_with(model, server, control)
}

/// Builds the router over the shared model, the endpoint's state and the control channel.
pub fn router_with(
    model: Arc<Model>,
    server: Arc<ListenerPolicy>,
    control: Arc<Control>,
) -> Router {
    let api = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/v1/brokers", get(brokers))
        .route("/v1/brokers/{id}", get(broker))
        .route("/v1/broker-state", get(broker_state))
        .route("/v1/broker-state/", get(broker_state))
        .route("/v1/ready", get(broker_ready))
        .route("/v1/ready/", get(broker_ready))
        .route("/metrics", get(metrics))
        .route(
            "/v1/config",
            get(operator::get_config).patch(operator::patch_config),
        )
        .route("/v1/logs", get(operator::logs))
        .route("/v1/diagnostics", get(operator::diagnostics))
        .route("/v1/events", get(operator::events))
        .with_state(AppState {
            model,
            server: server.clone(),
            control,
            pages: Arc::default(),
        });
    harden(api, server)
}

/// What a pod listener's handlers read: the one broker it answers for, which `pods` changes
/// when another process (a restart, perhaps under another id) runs in the pod's namespace.
#[derive(Clone)]
struct PodRoute {
    model: Arc<Model>,
    broker: tokio::sync::watch::Receiver<Arc<str>>,
}

/// A pod listener's router (`server::pods`): its broker's `/v1/broker-state[/]` and
/// `/v1/ready[/]`, as the node listener answers them, and 404 for everything else. The query
/// string is not read: nothing about another broker is reachable here.
pub fn pod_router(
    model: Arc<Model>,
    server: Arc<ListenerPolicy>,
    broker: tokio::sync::watch::Receiver<Arc<str>>,
) -> Router {
    let api = Router::new()
        .route("/v1/broker-state", get(pod_broker_state))
        .route("/v1/broker-state/", get(pod_broker_state))
        .route("/v1/ready", get(pod_broker_ready))
        .route("/v1/ready/", get(pod_broker_ready))
        .with_state(PodRoute { model, broker });
    harden(api, server)
}

async fn pod_state(route: PodRoute) -> Result<StateView, ApiError> {
    let id = route.broker.borrow().clone();
    tokio::task::spawn_blocking(move || {
        let broker = route
            .model
            .broker(&id)
            .filter(Broker::is_running)
            .ok_or(ApiError::NotFound)?;
        Ok(route.model.broker_state(&broker))
    })
    .await
    .map_err(|_| ApiError::Internal)?
}

async fn pod_broker_state(axum::extract::State(route): axum::extract::State<PodRoute>) -> Response {
    state_response(pod_state(route).await)
}

async fn pod_broker_ready(axum::extract::State(route): axum::extract::State<PodRoute>) -> Response {
    ready_response(pod_state(route).await)
}

/// Wraps any router (the API, or a test's) in the endpoint's error handling and access control.
pub fn harden(routes: Router, server: Arc<ListenerPolicy>) -> Router {
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(CatchPanicLayer::custom(panicked))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(server, access::guard))
}

fn panicked(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into());
    tracing::error!(panic = %what, "handler panicked; answered 500");
    ApiError::Internal.into_response()
}

pub(super) type State = axum::extract::State<AppState>;

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn ready(axum::extract::State(state): State) -> Response {
    let readiness = state.model.readiness();
    let code = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(readiness)).into_response()
}

async fn metrics(axum::extract::State(state): State, headers: HeaderMap) -> Response {
    let arrived = std::time::Instant::now();
    let format = negotiate(headers.get(header::ACCEPT));
    let encoding = Encoding::negotiate(headers.get(header::ACCEPT_ENCODING));
    // Map reads are syscalls, rendering and gzip are CPU: the build runs off the async
    // workers, on a side-by-side thread.
    let pages = state.pages.clone();
    let body = pages
        .get(arrived, format, encoding, move || {
            let snapshot = state.model.snapshot_since(arrived);
            let mut server = state.server.stats.snapshot();
            server.log_lines_dropped = state.control.logs.dropped();
            move |part| render::exposition_part(&snapshot, &server, format, part)
        })
        .await;
    let Some(body) = body else {
        return ApiError::Internal.into_response();
    };
    let mut response = (
        [
            (header::CONTENT_TYPE, format.content_type()),
            (header::VARY, "accept, accept-encoding"),
        ],
        body,
    )
        .into_response();
    if encoding == Encoding::Gzip {
        response
            .headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    response
}

/// Every broker with its Kafka state and its listeners' counters. Both read the kernel and
/// /proc: off the async workers.
async fn brokers(
    axum::extract::State(state): State,
) -> Result<Json<Vec<BrokerWithCounters>>, ApiError> {
    let arrived = std::time::Instant::now();
    tokio::task::spawn_blocking(move || {
        let snapshot = state.model.snapshot_since(arrived);
        views::with_counters(&snapshot, state.model.broker_views())
    })
    .await
    .map(Json)
    .map_err(|_| ApiError::Internal)
}

async fn broker(
    axum::extract::State(state): State,
    id: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<BrokerWithCounters>, ApiError> {
    // axum's own rejection would be a text/plain 400: errors are JSON.
    let axum::extract::Path(id) = id.map_err(|_| ApiError::BadParameter {
        parameter: "id".into(),
        reason: "not UTF-8 once percent-decoded".into(),
    })?;
    let arrived = std::time::Instant::now();
    // An unknown id costs nothing.
    let b = state.model.broker(&id).ok_or(ApiError::NotFound)?;
    tokio::task::spawn_blocking(move || {
        let snapshot = state.model.snapshot_since(arrived);
        views::with_counters(&snapshot, vec![state.model.broker_view(b)])
    })
    .await
    .map_err(|_| ApiError::Internal)?
    .pop()
    .map(Json)
    .ok_or(ApiError::NotFound)
}

type Query = Result<
    axum::extract::Query<std::collections::HashMap<String, String>>,
    axum::extract::rejection::QueryRejection,
>;

/// The broker a Strimzi-style request is about: `?broker=ID`; else the one running broker in the
/// network namespace the request arrived in; else the only broker on the node.
///
/// The request arrived in the agent's own network namespace (the listening socket's), so the
/// second rule picks a broker that shares it (host-network brokers, or an agent run as a
/// sidecar). An agent on the host network serving brokers in pod namespaces never sees a request
/// arrive in a broker's namespace; the other two rules apply then.
fn select_broker(model: &Model, query: Query) -> Result<Broker, ApiError> {
    let axum::extract::Query(params) = query.map_err(|_| ApiError::BadQuery {
        parameter: "query string".into(),
    })?;
    if let Some(name) = params.keys().find(|k| k.as_str() != "broker") {
        return Err(ApiError::BadQuery {
            parameter: name.chars().take(64).collect(),
        });
    }
    if let Some(id) = params.get("broker") {
        return model.broker(id).ok_or(ApiError::NotFound);
    }
    let brokers = model.brokers();
    let own = own_netns();
    let mut here = brokers
        .iter()
        .filter(|b| b.is_running() && own.is_some() && b.netns == own);
    if let (Some(b), None) = (here.next(), here.next()) {
        return Ok(b.clone());
    }
    match brokers.as_slice() {
        [] => Err(ApiError::NotFound),
        [only] => Ok(only.clone()),
        many => Err(ApiError::ChooseBroker {
            brokers: many.iter().map(|b| b.id.clone()).collect(),
        }),
    }
}

/// The agent's network namespace, read once: the process's (its main thread's) never changes;
/// pod listeners enter pods' namespaces on threads of their own.
fn own_netns() -> Option<u32> {
    static OWN: std::sync::LazyLock<Option<u32>> =
        std::sync::LazyLock::new(|| crate::proc::ProcFs::default().own_netns().ok());
    *OWN
}

/// Strimzi's `{"brokerState":N}`, with `recoveryState` in RECOVERY: nothing else, ever.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct StrimziState {
    broker_state: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovery_state: Option<crate::strimzi::Recovery>,
}

async fn strimzi_state(state: AppState, query: Query) -> Result<StateView, ApiError> {
    tokio::task::spawn_blocking(move || {
        let broker = select_broker(&state.model, query)?;
        Ok(state.model.broker_state(&broker))
    })
    .await
    .map_err(|_| ApiError::Internal)?
}

async fn broker_state(axum::extract::State(state): State, query: Query) -> Response {
    state_response(strimzi_state(state, query).await)
}

fn state_response(view: Result<StateView, ApiError>) -> Response {
    match view {
        Ok(view) => Json(StrimziState {
            broker_state: view.state.number(),
            recovery_state: view.recovery,
        })
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// 204 when 3 ≤ state ≠ 127, else 503 with the state; 404 without a broker.
async fn broker_ready(axum::extract::State(state): State, query: Query) -> Response {
    ready_response(strimzi_state(state, query).await)
}

fn ready_response(view: Result<StateView, ApiError>) -> Response {
    match view {
        Ok(view) if view.state.is_ready() => StatusCode::NO_CONTENT.into_response(),
        Ok(view) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(StrimziState {
                broker_state: view.state.number(),
                recovery_state: view.recovery,
            }),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

/// OpenMetrics when the `Accept` header ranks it at least as high as the Prometheus text format
/// (and above zero); the text format otherwise, including with no `Accept` at all.
pub fn negotiate(accept: Option<&HeaderValue>) -> Format {
    let Some(accept) = accept.and_then(|v| v.to_str().ok()) else {
        return Format::Prometheus;
    };
    let mut openmetrics = 0.0_f32;
    let mut text = 0.0_f32;
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.strip_prefix("q="))
            .find_map(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "application/openmetrics-text" => openmetrics = openmetrics.max(q),
            "text/plain" | "text/*" | "*/*" => text = text.max(q),
            _ => {}
        }
    }
    if openmetrics > 0.0 && openmetrics >= text {
        Format::OpenMetrics
    } else {
        Format::Prometheus
    }
}

async fn not_found() -> Response {
    ApiError::NotFound.into_response()
}

async fn method_not_allowed() -> Response {
    ApiError::MethodNotAllowed.into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::{
        config::ServerConfig as ServerSection,
        server::{identity::ClientIdentity, identity::Name},
        stats::ServerStats,
    };

    fn server(allowed: &[&str], rps: u32, burst: u32) -> Arc<ListenerPolicy> {
        let section = ServerSection {
            allowed_client_names: allowed.iter().map(|s| s.to_string()).collect(),
            rate_limit_rps: rps,
            rate_limit_burst: burst,
            ..ServerSection::default()
        };
        ListenerPolicy::new(&section, Arc::new(ServerStats::default()))
    }

    fn operator() -> Arc<ClientIdentity> {
        Arc::new(ClientIdentity::from_names(vec![
            Name::Cn("cluster-operator".into()),
            Name::Dns("cluster-operator".into()),
        ]))
    }

    struct Answer {
        code: StatusCode,
        body: Vec<u8>,
        headers: HeaderMap,
    }

    impl Answer {
        fn text(&self) -> &str {
            std::str::from_utf8(&self.body).unwrap()
        }
        fn header(&self, name: header::HeaderName) -> Option<&str> {
            self.headers.get(name).map(|v| v.to_str().unwrap())
        }
    }

    async fn send(app: &Router, request: axum::http::Request<Body>) -> Answer {
        let response = app.clone().oneshot(request).await.unwrap();
        let code = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Answer {
            code,
            body: body.to_vec(),
            headers,
        }
    }

    fn request(method: &str, path: &str) -> axum::http::request::Builder {
        axum::http::Request::builder()
            .method(method)
            .uri(path)
            .extension(operator())
    }

    async fn get(app: &Router, path: &str) -> Answer {
        send(app, request("GET", path).body(Body::empty()).unwrap()).await
    }

    fn app() -> Router {
        router(Arc::new(Model::default()), server(&[], 1000, 1000))
    }

    #[tokio::test]
    async fn health_is_200_even_when_not_ready() {
        let a = get(&app(), "/health").await;
        assert_eq!(a.code, StatusCode::OK);
        assert_eq!(a.text(), r#"{"status":"ok"}"#);
    }

    #[tokio::test]
    async fn ready_is_503_with_reasons_until_probes_attach() {
        let model = Arc::new(Model::default());
        let app = router(model.clone(), server(&[], 1000, 1000));
        let a = get(&app, "/ready").await;
        assert_eq!(a.code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            a.text(),
            r#"{"ready":false,"reasons":["probes not attached yet","discovery has not run yet"]}"#
        );

        model.set_probe_error("tracepoint sock:inet_sock_set_state: EPERM".into());
        let a = get(&app, "/ready").await;
        assert_eq!(a.code, StatusCode::SERVICE_UNAVAILABLE);
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v["ready"], false);
        assert_eq!(
            v["reasons"],
            json!([
                "probes not attached: tracepoint sock:inet_sock_set_state: EPERM",
                "discovery has not run yet"
            ])
        );
    }

    #[tokio::test]
    async fn metrics_is_prometheus_text_by_default() {
        let a = get(&app(), "/metrics").await;
        assert_eq!(a.code, StatusCode::OK);
        assert_eq!(
            a.header(header::CONTENT_TYPE),
            Some(render::PROMETHEUS_CONTENT_TYPE)
        );
        assert!(a.text().lines().any(|l| l == "brokerscope_agent_ready 0"));
        assert!(!a.text().contains("# EOF"));
        assert_eq!(a.header(header::CONTENT_ENCODING), None);
    }

    #[tokio::test]
    async fn ready_needs_a_discovery_scan() {
        let model = Arc::new(Model::default());
        let app = router(model.clone(), server(&[], 1000, 1000));
        model.set_discovery_error("cannot list processes: /proc: EACCES".into());
        let v: serde_json::Value = serde_json::from_slice(&get(&app, "/ready").await.body).unwrap();
        assert_eq!(
            v["reasons"][1],
            "discovery has not run yet: cannot list processes: /proc: EACCES"
        );
        model.set_brokers(vec![]);
        let a = get(&app, "/ready").await;
        // Only the probes are missing now.
        assert_eq!(a.code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            a.text(),
            r#"{"ready":false,"reasons":["probes not attached yet"]}"#
        );
    }

    #[tokio::test]
    async fn metrics_is_openmetrics_when_asked() {
        // What Prometheus 2.42 sends.
        let accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                      version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let a = send(
            &app(),
            request("GET", "/metrics")
                .header(header::ACCEPT, accept)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(a.code, StatusCode::OK);
        assert_eq!(
            a.header(header::CONTENT_TYPE),
            Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
        );
        assert!(a.text().ends_with("# EOF\n"), "{}", a.text());
    }

    #[test]
    fn negotiation_follows_q_values() {
        let f = |s: &'static str| negotiate(Some(&HeaderValue::from_static(s)));
        assert_eq!(negotiate(None), Format::Prometheus);
        assert_eq!(f("*/*"), Format::Prometheus);
        assert_eq!(f("text/plain"), Format::Prometheus);
        assert_eq!(f("application/openmetrics-text"), Format::OpenMetrics);
        assert_eq!(
            f("application/openmetrics-text; version=1.0.0; q=0.9, text/plain; q=0.5"),
            Format::OpenMetrics
        );
        assert_eq!(
            f("application/openmetrics-text;q=0.2,text/plain;q=0.5"),
            Format::Prometheus
        );
        assert_eq!(f("application/openmetrics-text;q=0"), Format::Prometheus);
        assert_eq!(f("Application/OpenMetrics-Text"), Format::OpenMetrics);
    }

    #[tokio::test]
    async fn metrics_is_gzipped_when_accepted() {
        let app = app();
        let plain = get(&app, "/metrics").await;
        let a = send(
            &app,
            request("GET", "/metrics")
                .header(header::ACCEPT_ENCODING, "gzip")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(a.code, StatusCode::OK);
        assert_eq!(a.header(header::CONTENT_ENCODING), Some("gzip"));
        let mut text = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&a.body[..]), &mut text)
            .unwrap();
        // The second page also counts the first request: compare the families, not counts.
        let families = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| l.starts_with("# TYPE"))
                .map(String::from)
                .collect()
        };
        assert_eq!(families(&text), families(plain.text()));
        assert!(text.contains("brokerscope_agent_ready 0"));
    }

    #[tokio::test]
    async fn unknown_path_is_json_404_and_wrong_method_json_405() {
        let a = get(&app(), "/nope").await;
        assert_eq!(a.code, StatusCode::NOT_FOUND);
        assert_eq!(a.text(), r#"{"error":"not found"}"#);
        assert_eq!(a.header(header::CONTENT_TYPE), Some("application/json"));
        let a = send(
            &app(),
            request("POST", "/health").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(a.code, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(a.text(), r#"{"error":"method not allowed"}"#);
    }

    #[tokio::test]
    async fn client_not_in_the_allow_list_gets_403_naming_it() {
        let model = Arc::new(Model::default());
        let denied = router(model.clone(), server(&["prometheus"], 1000, 1000));
        let a = get(&denied, "/health").await;
        assert_eq!(a.code, StatusCode::FORBIDDEN);
        assert_eq!(
            a.text(),
            r#"{"error":"forbidden","identity":"cluster-operator"}"#
        );
        // Unknown paths too: a refused client learns nothing about what exists.
        assert_eq!(get(&denied, "/nope").await.code, StatusCode::FORBIDDEN);

        let allowed = router(
            model,
            server(&["prometheus", "cluster-operator"], 1000, 1000),
        );
        assert_eq!(get(&allowed, "/health").await.code, StatusCode::OK);

        // A request that did not come through the TLS listener has no identity.
        let a = send(
            &allowed,
            axum::http::Request::get("/health")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(a.code, StatusCode::FORBIDDEN);
        assert_eq!(a.text(), r#"{"error":"forbidden","identity":"unknown"}"#);
    }

    #[tokio::test]
    async fn over_the_rate_limit_is_429_with_retry_after() {
        let state = server(&[], 1, 2);
        let app = router(Arc::new(Model::default()), state.clone());
        assert_eq!(get(&app, "/health").await.code, StatusCode::OK);
        assert_eq!(get(&app, "/health").await.code, StatusCode::OK);
        let a = get(&app, "/health").await;
        assert_eq!(a.code, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(a.header(header::RETRY_AFTER), Some("1"));
        assert_eq!(
            a.text(),
            r#"{"error":"rate limited","retry_after_seconds":1}"#
        );
        let s = state.stats.snapshot();
        assert_eq!(
            s.requests,
            [
                ("/health".to_string(), 200, 2),
                ("/health".to_string(), 429, 1)
            ]
        );
    }

    #[tokio::test]
    async fn brokers_list_and_one_by_id() {
        use crate::broker::tests::broker;
        let model = Arc::new(Model::default());
        let app = router(model.clone(), server(&[], 1000, 1000));
        let a = get(&app, "/v1/brokers").await;
        assert_eq!((a.code, a.text()), (StatusCode::OK, "[]"));

        let mut b = broker("1", 4242, 4026532000, &[("PLAINTEXT", 9092)]);
        b.pod = Some("kafka-1".into());
        model.set_brokers(vec![broker("0", 10, 1, &[]), b]);
        let a = get(&app, "/v1/brokers").await;
        assert_eq!(a.code, StatusCode::OK);
        assert_eq!(a.header(header::CONTENT_TYPE), Some("application/json"));
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        let ids: Vec<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, vec!["0", "1"]);

        let a = get(&app, "/v1/brokers/1").await;
        assert_eq!(a.code, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v["pid"], 4242);
        assert_eq!(v["pod"], "kafka-1");
        assert_eq!(v["netns"], 4026532000u32);
        assert_eq!(v["state"], "running");
        assert_eq!(v["restarts"], 0);
        assert_eq!(
            v["listeners"],
            json!([{"name":"PLAINTEXT","host":"","port":9092,"security_protocol":null}])
        );
        assert_eq!(v["evidence"]["properties_read"], false);

        let a = get(&app, "/v1/brokers/unknown").await;
        assert_eq!(
            (a.code, a.text()),
            (StatusCode::NOT_FOUND, r#"{"error":"not found"}"#)
        );
    }

    #[tokio::test]
    async fn a_pod_router_answers_only_for_its_broker_as_the_node_does() {
        use crate::broker::tests::broker;
        let model = Arc::new(Model::default());
        let node = router(model.clone(), server(&[], 1000, 1000));
        let (_serves, broker_id) = tokio::sync::watch::channel(Arc::from("2"));
        let pod = pod_router(model.clone(), server(&[], 1000, 1000), broker_id);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let me = std::process::id();
        let mut own = broker("2", me, 1, &[("PLAINTEXT", port)]);
        own.start_time_ticks = crate::strimzi::start_ticks_of_pid(me).unwrap();
        model.set_brokers(vec![
            broker("1", u32::MAX - 7, 1, &[("PLAINTEXT", 9092)]),
            own,
        ]);
        model.assume_sigterm_observed();
        for (mine, theirs) in [
            ("/v1/broker-state", "/v1/broker-state?broker=2"),
            ("/v1/broker-state/", "/v1/broker-state/?broker=2"),
            ("/v1/ready", "/v1/ready?broker=2"),
            ("/v1/ready/", "/v1/ready/?broker=2"),
            // The query is not read: another broker's id still answers for this one.
            ("/v1/broker-state/?broker=1", "/v1/broker-state/?broker=2"),
        ] {
            let (a, b) = (get(&pod, mine).await, get(&node, theirs).await);
            assert_eq!((a.code, a.text()), (b.code, b.text()), "{mine}");
            assert_eq!(
                a.header(header::CONTENT_TYPE),
                b.header(header::CONTENT_TYPE)
            );
        }
        assert_eq!(get(&pod, "/v1/ready/").await.code, StatusCode::NO_CONTENT);
        for other in [
            "/v1/brokers",
            "/v1/brokers/1",
            "/metrics",
            "/health",
            "/ready",
            "/v1/config",
        ] {
            let a = get(&pod, other).await;
            assert_eq!(
                (a.code, a.text()),
                (StatusCode::NOT_FOUND, r#"{"error":"not found"}"#),
                "{other}"
            );
        }
        // Its broker gone: 404, as the node answers for an unknown broker.
        model.set_brokers(vec![broker("1", u32::MAX - 7, 1, &[("PLAINTEXT", 9092)])]);
        assert_eq!(
            get(&pod, "/v1/broker-state/").await.code,
            StatusCode::NOT_FOUND
        );
    }

    #[tokio::test]
    async fn broker_state_in_strimzi_format_and_the_choice_of_broker() {
        use crate::broker::tests::broker;
        let model = Arc::new(Model::default());
        let app = router(model.clone(), server(&[], 1000, 1000));
        for path in [
            "/v1/broker-state",
            "/v1/broker-state/",
            "/v1/ready",
            "/v1/ready/",
        ] {
            let a = get(&app, path).await;
            assert_eq!(
                (a.code, a.text()),
                (StatusCode::NOT_FOUND, r#"{"error":"not found"}"#)
            );
        }
        // No such process: its listening sockets cannot be read, so its state is not known,
        // and never RUNNING.
        let pid = u32::MAX - 7;
        model.set_brokers(vec![broker("1", pid, 1, &[("PLAINTEXT", 9092)])]);
        let a = get(&app, "/v1/broker-state/").await;
        assert_eq!(
            (a.code, a.text()),
            (StatusCode::OK, r#"{"brokerState":127}"#)
        );
        let a = get(&app, "/v1/ready/").await;
        assert_eq!(
            (a.code, a.text()),
            (StatusCode::SERVICE_UNAVAILABLE, r#"{"brokerState":127}"#)
        );
        // This process, listening on its one listener: UNKNOWN while a SIGTERM could not be
        // seen (no probes), RUNNING once it could.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let me = std::process::id();
        let mut own = broker("2", me, 1, &[("PLAINTEXT", port)]);
        own.start_time_ticks = crate::strimzi::start_ticks_of_pid(me).unwrap();
        model.set_brokers(vec![broker("1", pid, 1, &[("PLAINTEXT", 9092)]), own]);
        let a = get(&app, "/v1/broker-state?broker=2").await;
        assert_eq!(
            (a.code, a.text()),
            (StatusCode::OK, r#"{"brokerState":127}"#)
        );
        let a = get(&app, "/v1/brokers/2").await;
        let v: serde_json::Value = serde_json::from_str(a.text()).unwrap();
        assert_eq!(
            v["broker_state"]["unknown"],
            "listening, but a SIGTERM would not be seen (the signal_deliver probe is not attached)"
        );
        model.assume_sigterm_observed();
        let a = get(&app, "/v1/broker-state?broker=2").await;
        assert_eq!((a.code, a.text()), (StatusCode::OK, r#"{"brokerState":3}"#));
        let a = get(&app, "/v1/ready?broker=2").await;
        assert_eq!((a.code, a.text()), (StatusCode::NO_CONTENT, ""));
        let a = get(&app, "/v1/broker-state/").await;
        assert_eq!(a.code, StatusCode::BAD_REQUEST);
        assert_eq!(
            a.text(),
            r#"{"brokers":["1","2"],"error":"several brokers on this node: choose one with ?broker=ID"}"#
        );
        let a = get(&app, "/v1/broker-state/?broker=3").await;
        assert_eq!(a.code, StatusCode::NOT_FOUND);
        let a = get(&app, "/v1/broker-state/?brokers=1").await;
        assert_eq!(a.code, StatusCode::BAD_REQUEST);
        assert!(
            a.text().contains(r#""parameter":"brokers""#),
            "{}",
            a.text()
        );
        let v: serde_json::Value =
            serde_json::from_slice(&get(&app, "/v1/brokers/2").await.body).unwrap();
        assert_eq!(v["broker_state"], json!({"name":"RUNNING","number":3}));
        assert_eq!(v["state_changes"][0]["to"], "UNKNOWN");
        assert_eq!(v["state_changes"][1]["to"], "RUNNING");
        assert_eq!(v["state"], "running");
    }

    #[tokio::test]
    async fn a_broker_id_that_is_not_utf8_is_a_json_400() {
        // Found by the `http` fuzz target: axum's path rejection answered in plain text.
        let a = get(&app(), "/v1/brokers/%FF").await;
        assert_eq!(a.code, StatusCode::BAD_REQUEST);
        assert_eq!(
            a.text(),
            r#"{"error":"bad parameter","parameter":"id","reason":"not UTF-8 once percent-decoded"}"#
        );
        let a = get(&app(), "/v1/brokers/%6B%61fka-0").await;
        assert_eq!(a.code, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn a_declared_body_over_the_limit_is_413() {
        let a = send(
            &app(),
            request("POST", "/metrics")
                .header(header::CONTENT_LENGTH, (10 * 1024 * 1024).to_string())
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(a.code, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            a.text(),
            r#"{"error":"body too large","limit_bytes":1048576}"#
        );
    }

    #[tokio::test]
    async fn requests_beyond_the_in_flight_cap_get_503_and_the_access_level_switches_live() {
        let state = server(&[], 1000, 1000);
        let app = router(Arc::new(Model::default()), state.clone());
        let all = state
            .in_flight
            .clone()
            .try_acquire_many_owned(crate::server::limits::MAX_IN_FLIGHT as u32)
            .unwrap();
        let a = get(&app, "/health").await;
        assert_eq!(a.code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(a.text(), r#"{"error":"overloaded"}"#);
        drop(all);
        assert_eq!(get(&app, "/health").await.code, StatusCode::OK);

        assert_eq!(state.access_log(), crate::config::AccessLog::Info);
        for level in [
            crate::config::AccessLog::Debug,
            crate::config::AccessLog::Off,
            crate::config::AccessLog::Info,
        ] {
            state.set_access_log(level);
            assert_eq!(state.access_log(), level);
        }
    }

    async fn boom() -> &'static str {
        panic!("secret internal detail")
    }

    #[tokio::test]
    async fn a_panicking_handler_is_a_json_500_and_the_router_keeps_serving() {
        let state = server(&[], 1000, 1000);
        let app = harden(
            Router::new()
                .route("/boom", axum::routing::get(boom))
                .route("/fine", axum::routing::get(|| async { "fine" })),
            state.clone(),
        );
        let a = get(&app, "/boom").await;
        assert_eq!(a.code, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(a.text(), r#"{"error":"internal error"}"#);
        let a = get(&app, "/fine").await;
        assert_eq!((a.code, a.text()), (StatusCode::OK, "fine"));
        let s = state.stats.snapshot();
        assert_eq!(
            s.requests,
            [("/boom".to_string(), 500, 1), ("/fine".to_string(), 200, 1)]
        );
    }

    #[tokio::test]
    async fn requests_are_counted_by_route_template_or_other() {
        let state = server(&[], 1000, 1000);
        let app = router(Arc::new(Model::default()), state.clone());
        get(&app, "/health").await;
        get(&app, "/x/1").await;
        get(&app, "/x/2").await;
        let s = state.stats.snapshot();
        assert_eq!(
            s.requests,
            [
                ("/health".to_string(), 200, 1),
                ("other".to_string(), 404, 2)
            ]
        );
        assert_eq!(s.durations.len(), 2);
        assert_eq!(s.durations[1].1.count(), 2);
    }
}
