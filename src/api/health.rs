//! Probes: liveness says the process answers; readiness says it should get traffic.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use crate::engine::ModelInfo;
use crate::gallery::replication::Status as Replication;
use crate::gallery::Counts;

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready`; `draining` once shutdown has begun; `database_unavailable`
    /// while the gallery's PostgreSQL server cannot be reached.
    pub status: &'static str,
    pub model: ModelInfo,
    pub provider: String,
    pub gallery: Counts,
    /// PostgreSQL galleries only: this replica's place in the change log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicaState>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReplicaState {
    #[serde(flatten)]
    pub status: Replication,
    /// Digest of the indexed face ids: equal on replicas that hold the same faces.
    pub faces_digest: String,
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
    responses((status = 200, body = Readiness), (status = 503, description = "Shutting down, or the gallery database is unreachable", body = Readiness)),
    tag = "probes"
)]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let accepting = state.accepting.load(Ordering::Relaxed);
    let database = state.gallery.available();
    let body = Readiness {
        status: match (accepting, database) {
            (false, _) => "draining",
            (true, false) => "database_unavailable",
            (true, true) => "ready",
        },
        model: state.engine.info().clone(),
        provider: state.config.engine.provider.to_string(),
        gallery: state.gallery.counts(),
        replication: state.gallery.replication().map(|status| ReplicaState {
            status,
            faces_digest: state.gallery.faces_digest(),
        }),
    };
    let code = if accepting && database {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}
