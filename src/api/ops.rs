//! Operational routes and the cross-cutting layers around every route:
//! request id + span, HTTP metrics, per-request timeout, API keys.
//! `startup` calls [`wrap`] once on the plain route table from `api::router`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use tokio::sync::watch;

use super::AppState;
use crate::auth::Auth;
use crate::error::{ApiError, ErrorKind};

/// Adds `GET /metrics` and `GET /openapi.json`, then the layers. Outermost first:
/// request id (so every log line of the request carries it), metrics (so it sees
/// every answer, rejections and timeouts included), timeout, auth, handler.
/// Added with `Router::layer`, so each layer sees the matched route template.
pub fn wrap(router: Router, state: &AppState) -> anyhow::Result<Router> {
    let config = &state.config;
    let auth = Auth::from_config(config, &state.metrics)?;
    log_effective_config(config, &auth);
    state
        .metrics
        .queue_capacity
        .set(i64::try_from(config.engine.queue_capacity).unwrap_or(i64::MAX));

    let timeout = Duration::from_millis(config.request_timeout_ms.max(1));
    let max_body = config.max_body_bytes;
    let ops_routes = Router::new()
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(super::openapi::openapi_json))
        .with_state(state.clone());
    Ok(router
        .merge(ops_routes)
        .layer(middleware::from_fn_with_state(
            Arc::new(auth),
            crate::auth::middleware,
        ))
        .layer(middleware::from_fn_with_state(
            max_body,
            refuse_declared_oversize,
        ))
        .layer(middleware::from_fn_with_state(timeout, request_timeout))
        .layer(middleware::from_fn_with_state(
            state.shutdown_deadline.clone(),
            answer_by_shutdown_deadline,
        ))
        .layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            crate::metrics::track_http,
        ))
        .layer(middleware::from_fn(crate::telemetry::request_id)))
}

/// Logs the configuration in force. The keys file's path is logged, its keys never
/// (they are not part of `Config`); so is a warning when the API is open.
fn log_effective_config(config: &crate::config::Config, auth: &Auth) {
    match serde_json::to_string(config) {
        Ok(json) => tracing::info!(config = %json, "effective configuration"),
        Err(e) => tracing::warn!(error = %e, "cannot serialise the configuration"),
    }
    match &auth.keys {
        Some(keys) => tracing::info!(keys = keys.len(), "API keys required"),
        None => tracing::warn!(
            "no --api-keys-file: the API is open to anyone who can reach {}",
            config.listen
        ),
    }
}

/// Bounds each request's time; the handler future is dropped on expiry, which
/// also drops its place in the inference queue.
async fn request_timeout(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::new(
            ErrorKind::Timeout,
            format!("request not answered within {} ms", limit.as_millis()),
        )
        .into_response(),
    }
}

/// A body whose `Content-Length` already exceeds the limit is refused before any of it is
/// read, instead of waiting for bytes that will be thrown away (or never come).
async fn refuse_declared_oversize(State(max): State<usize>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(n) if n > max as u64 => {
            let mut resp = ApiError::new(
                ErrorKind::PayloadTooLarge,
                format!("request body of {n} bytes is larger than the limit of {max} bytes"),
            )
            .into_response();
            // The unread body makes the connection unusable for another request.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            resp
        }
        _ => next.run(req).await,
    }
}

/// Answers 503 for a request still running when the shutdown timeout runs out, so its
/// client learns the outcome instead of seeing the connection drop.
async fn answer_by_shutdown_deadline(
    State(deadline): State<Arc<watch::Sender<bool>>>,
    req: Request,
    next: Next,
) -> Response {
    let mut passed = deadline.subscribe();
    let expired = async move {
        if passed.wait_for(|d| *d).await.is_err() {
            // The sender lives in the app state; without it there is no deadline.
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        resp = next.run(req) => resp,
        _ = expired => ApiError::new(
            ErrorKind::Unavailable,
            "the server is shutting down and could not finish this request in time; retry",
        )
        .into_response(),
    }
}

/// Prometheus text exposition.
#[utoipa::path(
    get,
    path = "/metrics",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")),
    tag = "operations"
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics.render(),
    )
        .into_response()
}
