//! Access control around every route: authorization of the authenticated client, its rate
//! limit, the body size and in-flight caps; then the request's metrics and access-log line.
//!
//! Runs after routing (so the route template is known) and before any handler.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use axum::{
    body::{Body, Bytes},
    extract::{MatchedPath, Request, State},
    http::{Method, Version, header},
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::{
    ListenerPolicy,
    api::ApiError,
    identity::ClientIdentity,
    limits::{MAX_BODY_BYTES, Verdict, retry_after_secs},
};
use crate::{config::AccessLog, stats::OTHER_PATH};

/// Longest request path written to the access log; the rest is cut.
const MAX_LOGGED_PATH: usize = 256;

/// The middleware (`axum::middleware::from_fn_with_state`).
pub async fn guard(
    State(state): State<Arc<ListenerPolicy>>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let template = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(OTHER_PATH, |m| m.as_str())
        .to_string();
    let identity = request.extensions().get::<Arc<ClientIdentity>>().cloned();
    let level = state.access_log();
    let line = (level != AccessLog::Off).then(|| AccessLine {
        level,
        listener: state.listener.clone(),
        identity: identity
            .as_ref()
            .map_or_else(|| "unknown".to_string(), |i| i.display.clone()),
        method: request.method().clone(),
        path: logged_path(&request),
        version: request.version(),
        template: template.clone(),
        user_agent: request
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(MAX_LOGGED_PATH).collect()),
        status: 0,
        bytes: 0,
        started,
    });

    let response = match admit(&state, identity.as_deref(), &request, started) {
        Ok(permit) => {
            let response = next.run(request).await;
            drop(permit);
            response
        }
        Err(e) => e.into_response(),
    };
    state
        .stats
        .record(&template, response.status().as_u16(), started.elapsed());
    match line {
        None => response,
        Some(mut line) => {
            line.status = response.status().as_u16();
            let (parts, body) = response.into_parts();
            Response::from_parts(parts, Body::new(Logged { inner: body, line }))
        }
    }
}

/// Authorization, rate limit, body size, in-flight cap, in that order: a client that is not
/// allowed learns nothing else, and a rate-limited one costs nothing more.
fn admit(
    state: &ListenerPolicy,
    identity: Option<&ClientIdentity>,
    request: &Request,
    now: Instant,
) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    // No identity means the request did not come through the TLS listener: refuse.
    let Some(identity) = identity else {
        return Err(ApiError::Forbidden {
            identity: "unknown".into(),
        });
    };
    if !identity.is_allowed(&state.allowed_client_names()) {
        return Err(ApiError::Forbidden {
            identity: identity.display.clone(),
        });
    }
    if let Verdict::Deny { retry_after } = state.limiter.check(&identity.display, now) {
        return Err(ApiError::RateLimited {
            retry_after_secs: retry_after_secs(retry_after),
        });
    }
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(ApiError::PayloadTooLarge {
            limit_bytes: MAX_BODY_BYTES,
        });
    }
    state
        .in_flight
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Overloaded)
}

fn logged_path(request: &Request) -> String {
    let path = request.uri().path();
    match path.char_indices().nth(MAX_LOGGED_PATH) {
        Some((cut, _)) => format!("{}...", &path[..cut]),
        None => path.to_string(),
    }
}

/// One access-log line, written when the response body is done (or dropped), so `bytes` and
/// `latency` cover the whole response.
struct AccessLine {
    level: AccessLog,
    /// `node` or `pod/<name>`.
    listener: String,
    identity: String,
    method: Method,
    path: String,
    version: Version,
    template: String,
    user_agent: Option<String>,
    status: u16,
    bytes: u64,
    started: Instant,
}

impl Drop for AccessLine {
    fn drop(&mut self) {
        let latency_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        match self.level {
            AccessLog::Off => {}
            AccessLog::Info => tracing::info!(
                target: "brokerscope::access",
                listener = %self.listener,
                identity = %self.identity,
                method = %self.method,
                path = %self.path,
                status = self.status,
                bytes = self.bytes,
                latency_ms = format_args!("{latency_ms:.3}"),
                "request"
            ),
            AccessLog::Debug => tracing::info!(
                target: "brokerscope::access",
                listener = %self.listener,
                identity = %self.identity,
                method = %self.method,
                path = %self.path,
                status = self.status,
                bytes = self.bytes,
                latency_ms = format_args!("{latency_ms:.3}"),
                route = %self.template,
                version = ?self.version,
                user_agent = self.user_agent.as_deref().unwrap_or("-"),
                "request"
            ),
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that counts the bytes it yields for the access log.
    struct Logged {
        #[pin]
        inner: Body,
        line: AccessLine,
    }
}

impl http_body::Body for Logged {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.line.bytes += data.len() as u64;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
