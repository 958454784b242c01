//! Probes: liveness says the process answers; readiness says it should get traffic.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use crate::engine::ModelInfo;
use crate::gallery::Counts;

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready`, or `draining` once shutdown has begun.
    pub status: &'static str,
    pub model: ModelInfo,
    pub provider: String,
    pub gallery: Counts,
}

#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Health)), tag = "probes")]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// The engine has loaded the model and run its warm-up batch before the
/// server starts listening, so serving at all means the model is ready.
#[utoipa::path(
    get,
    path = "/readyz",
    responses((status = 200, body = Readiness), (status = 503, description = "Shutting down", body = Readiness)),
    tag = "probes"
)]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let accepting = state.accepting.load(Ordering::Relaxed);
    let body = Readiness {
        status: if accepting { "ready" } else { "draining" },
        model: state.engine.info().clone(),
        provider: state.config.engine.provider.to_string(),
        gallery: state.gallery.counts(),
    };
    let code = if accepting {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}
