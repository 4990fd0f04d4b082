//! The operator's control routes: `/v1/config`, `/v1/logs`, `/v1/diagnostics`, `/v1/events`.
//! Thin: parse the request, call `control`, shape the answer.

use std::sync::Arc;

use axum::{
    Extension, Json,
    body::Bytes,
    extract::{Query, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::json;

use super::{
    api::{ApiError, AppState},
    identity::ClientIdentity,
};
use crate::control::{config::ChangeError, logs};

/// Response header carrying the config generation.
pub const GENERATION_HEADER: &str = "brokerscope-config-generation";

fn with_generation(mut response: Response, generation: u64) -> Response {
    response
        .headers_mut()
        .insert(GENERATION_HEADER, HeaderValue::from(generation));
    response
}

pub async fn get_config(State(state): State<AppState>) -> Response {
    let live = &state.control.config;
    with_generation(Json(live.view()).into_response(), live.generation())
}

pub async fn patch_config(
    State(state): State<AppState>,
    identity: Option<Extension<Arc<ClientIdentity>>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let who = identity.map_or_else(|| "unknown".to_string(), |i| i.display.clone());
    let control = state.control.clone();
    let result = tokio::task::spawn_blocking(move || control.config.patch(&who, &body))
        .await
        .map_err(|_| ApiError::Internal)?;
    match result {
        Ok(applied) => {
            let body = json!({
                "generation": applied.generation,
                "changed": applied.changed,
                "config": state.control.config.view(),
            });
            Ok(with_generation(
                (StatusCode::OK, Json(body)).into_response(),
                applied.generation,
            ))
        }
        Err(ChangeError::Invalid { fields }) => Err(ApiError::InvalidConfig { fields }),
        Err(e) => {
            tracing::error!(error = %e, "live config change failed; nothing changed");
            Err(ApiError::Internal)
        }
    }
}

/// `?since=&level=` of `/v1/logs`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    since: Option<String>,
    level: Option<String>,
}

/// `since`: RFC 3339, or a number of seconds back from now.
fn parse_since(text: &str, now: time::OffsetDateTime) -> Option<i128> {
    if let Ok(seconds) = text.parse::<f64>() {
        if !(0.0..=1e9).contains(&seconds) {
            return None;
        }
        return Some(now.unix_timestamp_nanos() - (seconds * 1e9) as i128);
    }
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp_nanos())
}

pub async fn logs(
    State(state): State<AppState>,
    query: Result<Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadParameter {
        parameter: "query".into(),
        reason: format!("{}; known: since, level", e.body_text()),
    })?;
    let since = match query.since.as_deref() {
        None => None,
        Some(text) => Some(
            parse_since(text, time::OffsetDateTime::now_utc()).ok_or_else(|| {
                ApiError::BadParameter {
                    parameter: "since".into(),
                    reason:
                        "must be RFC 3339 (2026-11-26T17:00:00Z) or seconds back from now (300)"
                            .into(),
                }
            })?,
        ),
    };
    let level = match query.level.as_deref() {
        None => None,
        Some(text) => Some(
            logs::parse_level(text).ok_or_else(|| ApiError::BadParameter {
                parameter: "level".into(),
                reason: "must be one of error, warn, info, debug, trace".into(),
            })?,
        ),
    };
    let lines = state.control.logs.query(since, level);
    let mut response = Json(json!({
        "dropped": state.control.logs.dropped(),
        "lines": lines,
    }))
    .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// `GET /v1/diagnostics`: JSON, or a tar.gz when `Accept` asks for `application/gzip` or
/// `application/x-tar+gzip`.
pub async fn diagnostics(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let gzip = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| {
            accept.split(',').any(|range| {
                let media = range.split(';').next().unwrap_or("").trim();
                media.eq_ignore_ascii_case("application/gzip")
                    || media.eq_ignore_ascii_case("application/x-tar+gzip")
            })
        });
    let (model, control) = (state.model.clone(), state.control.clone());
    tokio::task::spawn_blocking(move || {
        let bundle = crate::control::diagnostics::capture(&model, &control);
        if gzip {
            crate::control::diagnostics::tar_gz(&bundle, &control.config.current().to_toml())
                .map(|bytes| {
                    (
                        [
                            (header::CONTENT_TYPE, "application/gzip"),
                            (
                                header::CONTENT_DISPOSITION,
                                "attachment; filename=\"brokerscope-diagnostics.tar.gz\"",
                            ),
                        ],
                        bytes,
                    )
                        .into_response()
                })
                .map_err(|e| {
                    tracing::error!(error = %e, "cannot build the diagnostics archive");
                    ApiError::Internal
                })
        } else {
            Ok(Json(bundle).into_response())
        }
    })
    .await
    .map_err(|_| ApiError::Internal)?
}

/// Comment line sent on a quiet stream so the connection is never taken for a stalled reader.
const SSE_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(15);

/// `GET /v1/events`: Server-Sent Events, filtered by `?broker=&listener=&kind=` (each a
/// comma-separated list). A subscriber that falls behind gets `event: dropped` with the number
/// of events it lost, then the stream goes on from the oldest event still buffered.
pub async fn events(
    State(state): State<AppState>,
    query: Result<Query<crate::events::Filter>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    use tokio::sync::broadcast::error::RecvError;

    let Query(filter) = query.map_err(|e| ApiError::BadParameter {
        parameter: "query".into(),
        reason: format!("{}; known: broker, listener, kind", e.body_text()),
    })?;
    if let Some(kind) = filter.unknown_kind() {
        return Err(ApiError::BadParameter {
            parameter: "kind".into(),
            reason: format!(
                "unknown kind `{}`; known: {}",
                kind.chars().take(64).collect::<String>(),
                crate::events::KINDS.join(", ")
            ),
        });
    }
    let subscription = state.model.events.subscribe();
    let stats = state.server.stats.clone();
    let stream = futures_util::stream::unfold(
        (subscription, filter, stats),
        |(mut sub, filter, stats)| async move {
            loop {
                match sub.rx.recv().await {
                    Ok(event) => {
                        if !filter.matches(&event) {
                            continue;
                        }
                        let sse = SseEvent::default()
                            .event(event.kind)
                            .json_data(&*event)
                            .unwrap_or_else(|_| SseEvent::default().comment("unencodable event"));
                        return Some((
                            Ok::<_, std::convert::Infallible>(sse),
                            (sub, filter, stats),
                        ));
                    }
                    Err(RecvError::Lagged(lost)) => {
                        stats
                            .events_dropped
                            .fetch_add(lost, std::sync::atomic::Ordering::Relaxed);
                        let sse = SseEvent::default()
                            .event("dropped")
                            .data(json!({ "lost": lost }).to_string());
                        return Some((Ok(sse), (sub, filter, stats)));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        },
    );
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(SSE_KEEPALIVE))
        .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_rfc3339_or_seconds_back() {
        let now = time::macros::datetime!(2026-11-26 17:00:00 UTC);
        let at = now.unix_timestamp_nanos();
        assert_eq!(parse_since("60", now), Some(at - 60_000_000_000));
        assert_eq!(
            parse_since("2026-11-26T16:59:00Z", now),
            Some(at - 60_000_000_000)
        );
        assert_eq!(parse_since("-5", now), None);
        assert_eq!(parse_since("yesterday", now), None);
    }
}
