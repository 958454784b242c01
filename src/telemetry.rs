//! Logging set-up and the per-request span. Human-readable lines by default, one
//! JSON object per line with `--log-format json` (for log shippers); the level comes
//! from `RUST_LOG` (default `info`).
//!
//! Every request runs inside an `http_request` span that carries its request id, so
//! events logged while it waits in the inference queue or runs in a batch name the
//! request they belong to.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::{Instrument, Span};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Installs the global subscriber. Safe to call more than once (tests start several
/// applications in one process): only the first call takes effect.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal, never into files or log collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_target(true);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

/// Longest client-sent request id kept; longer (or non-printable) ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

fn acceptable_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= MAX_REQUEST_ID_LEN && b.iter().all(|c| c.is_ascii_graphic())
}

/// Axum middleware (`axum::middleware::from_fn(telemetry::request_id)`), outermost:
/// keeps the client's `x-request-id` (or makes one), runs the request inside its
/// span, logs one line when it is answered, and echoes the id in the response.
pub async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .filter(|v| acceptable_request_id(v))
        .cloned()
        .or_else(|| HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()).ok());
    if let Some(id) = &id {
        req.headers_mut().insert(REQUEST_ID_HEADER, id.clone());
    } else {
        req.headers_mut().remove(REQUEST_ID_HEADER);
    }
    let span = request_span(&req);
    // Probes and scrapes come every few seconds: keep them out of info logs.
    let quiet = matches!(req.uri().path(), "/healthz" | "/readyz" | "/metrics");
    let start = Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    let latency_ms = (start.elapsed().as_secs_f64() * 1e6).round() / 1e3;
    span.in_scope(|| {
        if quiet {
            tracing::debug!(status, latency_ms, "request");
        } else if status >= 500 {
            tracing::warn!(status, latency_ms, "request");
        } else {
            tracing::info!(status, latency_ms, "request");
        }
    });
    if let Some(id) = id {
        resp.headers_mut().insert(REQUEST_ID_HEADER, id);
    }
    resp
}

/// The span every request runs in. Uses the route template, never the raw path,
/// so ids in URLs do not end up in every log line's span fields.
pub fn request_span(req: &Request) -> Span {
    let request_id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str)
        .unwrap_or("unmatched");
    tracing::info_span!(
        "http_request",
        request_id = %request_id,
        method = %req.method(),
        route = %route,
    )
}
