//! Logging set-up and the per-request span. Human-readable lines by default, one
//! JSON object per line with `--log-format json` (for log shippers); the level comes
//! from `RUST_LOG` (default `info`).
//!
//! Every request runs inside an `http_request` span that carries its request id, so
//! events logged while it waits in the inference queue or runs in a batch name the
//! request they belong to.

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue};
use tower_http::request_id::{MakeRequestId, RequestId};
use tracing::Span;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Installs the global subscriber. Safe to call more than once (tests start several
/// applications in one process): only the first call takes effect.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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

pub fn request_id_header() -> HeaderName {
    HeaderName::from_static(REQUEST_ID_HEADER)
}

/// Generates an id for requests that arrive without `x-request-id`.
#[derive(Clone, Copy, Default)]
pub struct UuidRequestId;

impl MakeRequestId for UuidRequestId {
    fn make_request_id<B>(&mut self, _req: &axum::http::Request<B>) -> Option<RequestId> {
        HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
            .ok()
            .map(RequestId::new)
    }
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
