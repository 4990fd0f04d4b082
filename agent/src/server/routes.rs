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
            r#"{"ready":false,"reasons":["probes not attached yet"]}"#
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
    async fn unknown_path_is_json_404() {
        let (code, body, ctype) = get(Arc::new(Model::default()), "/nope").await;
        assert_eq!(code, StatusCode::NOT_FOUND);
        assert_eq!(body, r#"{"error":"not found"}"#);
        assert_eq!(ctype.as_deref(), Some("application/json"));
    }
}
