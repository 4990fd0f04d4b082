//! What every handler shares: the state handlers read ([`AppState`]) and the errors they answer
//! with ([`ApiError`], a JSON body that never carries internals). Below `routes`, `access` and
//! `operator`, which all use it.

use std::sync::Arc;

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::json;

use super::{ListenerPolicy, pages::Pages};
use crate::{control::Control, model::Model};

/// What handlers read.
#[derive(Clone)]
pub struct AppState {
    pub model: Arc<Model>,
    pub server: Arc<ListenerPolicy>,
    pub control: Arc<Control>,
    /// Rendered /metrics pages, shared by scrapes that share a snapshot.
    pub pages: Arc<Pages>,
}

/// Errors as HTTP responses; bodies never carry internals.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("client {identity} is not in server.allowed_client_names")]
    Forbidden { identity: String },
    #[error("rate limited; retry in {retry_after_secs}s")]
    RateLimited { retry_after_secs: u64 },
    #[error("request body over {limit_bytes} bytes")]
    PayloadTooLarge { limit_bytes: usize },
    #[error("too many requests in flight")]
    Overloaded,
    #[error("internal error")]
    Internal,
    #[error("invalid config")]
    InvalidConfig {
        fields: Vec<crate::control::config::FieldError>,
    },
    #[error("bad parameter `{parameter}`: {reason}")]
    BadParameter { parameter: String, reason: String },
    #[error("bad query parameter {parameter}")]
    BadQuery { parameter: String },
    #[error("several brokers on this node; choose one with ?broker=")]
    ChooseBroker { brokers: Vec<String> },
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, body) = match &self {
            ApiError::NotFound => (StatusCode::NOT_FOUND, json!({ "error": "not found" })),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                json!({ "error": "method not allowed" }),
            ),
            ApiError::Forbidden { identity } => (
                StatusCode::FORBIDDEN,
                json!({ "error": "forbidden", "identity": identity }),
            ),
            ApiError::RateLimited { retry_after_secs } => (
                StatusCode::TOO_MANY_REQUESTS,
                json!({ "error": "rate limited", "retry_after_seconds": retry_after_secs }),
            ),
            ApiError::PayloadTooLarge { limit_bytes } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({ "error": "body too large", "limit_bytes": limit_bytes }),
            ),
            ApiError::Overloaded => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({ "error": "overloaded" }),
            ),
            ApiError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({ "error": "internal error" }),
            ),
            ApiError::InvalidConfig { fields } => (
                StatusCode::BAD_REQUEST,
                json!({ "error": "invalid config", "fields": fields }),
            ),
            ApiError::BadParameter { parameter, reason } => (
                StatusCode::BAD_REQUEST,
                json!({ "error": "bad parameter", "parameter": parameter, "reason": reason }),
            ),
            ApiError::BadQuery { parameter } => (
                StatusCode::BAD_REQUEST,
                json!({ "error": "unknown or malformed query parameter; only broker=ID is accepted", "parameter": parameter }),
            ),
            ApiError::ChooseBroker { brokers } => (
                StatusCode::BAD_REQUEST,
                json!({ "error": "several brokers on this node: choose one with ?broker=ID", "brokers": brokers }),
            ),
        };
        let mut response = (code, Json(body)).into_response();
        if let ApiError::RateLimited { retry_after_secs } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        response
    }
}
