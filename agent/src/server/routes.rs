//! The HTTP routes: a plain `Router` value, testable with `oneshot` and no sockets.

use std::sync::Arc;

use axum::{
    Json, Router,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::json;

use crate::{model::Model, render};

/// Builds the router over the shared model.
pub fn router(model: Arc<Model>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/brokers", get(brokers))
        .route("/v1/brokers/{id}", get(broker))
        .fallback(not_found)
        .with_state(model)
}

type State = axum::extract::State<Arc<Model>>;

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn ready(axum::extract::State(model): State) -> Response {
    let readiness = model.readiness();
    let code = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(readiness)).into_response()
}

async fn metrics(axum::extract::State(model): State) -> Response {
    // Map reads are syscalls: keep them off the async workers.
    let text = tokio::task::spawn_blocking(move || render::prometheus(&model.snapshot())).await;
    match text {
        Ok(text) => (
            [(header::CONTENT_TYPE, render::PROMETHEUS_CONTENT_TYPE)],
            text,
        )
            .into_response(),
        Err(_) => ApiError::Internal.into_response(),
    }
}

async fn brokers(axum::extract::State(model): State) -> Json<Vec<crate::discovery::Broker>> {
    Json(model.brokers())
}

async fn broker(
    axum::extract::State(model): State,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<crate::discovery::Broker>, ApiError> {
    model.broker(&id).map(Json).ok_or(ApiError::NotFound)
}

async fn not_found() -> Response {
    ApiError::NotFound.into_response()
}

/// Errors as HTTP responses; bodies never carry internals.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("not found")]
    NotFound,
    #[error("internal error")]
    Internal,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, error) = match self {
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not found"),
            ApiError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
        };
        (code, Json(json!({ "error": error }))).into_response()
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    async fn get(model: Arc<Model>, path: &str) -> (StatusCode, String, Option<String>) {
        let response = router(model)
            .oneshot(axum::http::Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let ctype = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap(), ctype)
    }

    #[tokio::test]
    async fn health_is_200_even_when_not_ready() {
        let (code, body, _) = get(Arc::new(Model::default()), "/health").await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body, r#"{"status":"ok"}"#);
    }

    #[tokio::test]
    async fn ready_is_503_with_reasons_until_probes_attach() {
        let model = Arc::new(Model::default());
        let (code, body, _) = get(model.clone(), "/ready").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            r#"{"ready":false,"reasons":["probes not attached yet","discovery has not run yet"]}"#
        );

        model.set_probe_error("tracepoint sock:inet_sock_set_state: EPERM".into());
        let (code, body, _) = get(model, "/ready").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["ready"], false);
        assert!(
            v["reasons"][0].as_str().unwrap().contains("EPERM"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn metrics_is_prometheus_text() {
        let (code, body, ctype) = get(Arc::new(Model::default()), "/metrics").await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(ctype.as_deref(), Some(render::PROMETHEUS_CONTENT_TYPE));
        assert!(body.contains("brokerscope_agent_ready 0"), "{body}");
    }

    #[tokio::test]
    async fn ready_needs_a_discovery_scan() {
        let model = Arc::new(Model::default());
        model.set_discovery_error("cannot list processes: /proc: EACCES".into());
        let (_, body, _) = get(model.clone(), "/ready").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v["reasons"][1],
            "discovery has not run yet: cannot list processes: /proc: EACCES"
        );
        model.set_brokers(vec![]);
        let (code, body, _) = get(model, "/ready").await;
        // Only the probes are missing now.
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            r#"{"ready":false,"reasons":["probes not attached yet"]}"#
        );
    }

    #[tokio::test]
    async fn brokers_list_and_one_by_id() {
        use crate::discovery::broker::tests::broker;
        let model = Arc::new(Model::default());
        let (code, body, _) = get(model.clone(), "/v1/brokers").await;
        assert_eq!((code, body.as_str()), (StatusCode::OK, "[]"));

        let mut b = broker("1", 4242, 4026532000, &[("PLAINTEXT", 9092)]);
        b.pod = Some("kafka-1".into());
        model.set_brokers(vec![broker("0", 10, 1, &[]), b]);
        let (code, body, ctype) = get(model.clone(), "/v1/brokers").await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(ctype.as_deref(), Some("application/json"));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let ids: Vec<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, vec!["0", "1"]);

        let (code, body, _) = get(model.clone(), "/v1/brokers/1").await;
        assert_eq!(code, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
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

        let (code, body, _) = get(model, "/v1/brokers/unknown").await;
        assert_eq!(
            (code, body.as_str()),
            (StatusCode::NOT_FOUND, r#"{"error":"not found"}"#)
        );
    }

    #[tokio::test]
    async fn unknown_path_is_json_404() {
        let (code, body, ctype) = get(Arc::new(Model::default()), "/nope").await;
        assert_eq!(code, StatusCode::NOT_FOUND);
        assert_eq!(body, r#"{"error":"not found"}"#);
        assert_eq!(ctype.as_deref(), Some("application/json"));
    }
}
