//! HTTP layer: shared state, the router, and one thin handler module per resource.

pub mod admission;
pub mod bounded;
pub mod detect;
pub mod embed;
pub mod health;
pub mod identify;
pub mod input;
pub mod openapi;
pub mod ops;
pub mod subjects;
pub mod verify;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

use crate::config::Config;
use crate::detection::Detector;
use crate::engine::Engine;
use crate::error::{ApiError, ErrorKind};
use crate::gallery::Gallery;
use crate::metrics::Metrics;

/// Everything a handler may touch; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    /// Finds faces in images sent without landmarks.
    pub detector: Arc<Detector>,
    pub gallery: Gallery,
    pub metrics: Arc<Metrics>,
    pub config: Arc<Config>,
    /// Default match threshold: `--threshold`, else the model's calibrated one.
    pub threshold: f32,
    /// Cleared when shutdown starts, so readiness fails and load balancers drain us.
    pub accepting: Arc<AtomicBool>,
    /// Set when the shutdown timeout runs out: requests still running are answered 503.
    pub shutdown_deadline: Arc<tokio::sync::watch::Sender<bool>>,
    /// Decoded bytes in flight across all requests (see `admission`).
    pub decode_budget: Arc<admission::DecodeBudget>,
}

/// The application router. Cross-cutting layers (auth, metrics, request ids,
/// timeouts) are added in `startup`, so this stays a plain route table.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config.max_body_bytes;
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/embed", post(embed::embed))
        .route("/detect", post(detect::detect))
        // -- gallery routes (gallery helper) --
        .route(
            "/subjects",
            post(subjects::create_subject).get(subjects::list_subjects),
        )
        .route(
            "/subjects/{id}",
            get(subjects::get_subject).delete(subjects::delete_subject),
        )
        .route("/subjects/{id}/faces", post(subjects::add_face))
        .route(
            "/subjects/{id}/faces/{face_id}",
            axum::routing::delete(subjects::delete_face),
        )
        .route("/verify", post(verify::verify))
        .route("/identify", post(identify::identify))
        // -- end gallery routes --
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorKind::NotFound, "no such route")
}

async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::new(
        ErrorKind::MethodNotAllowed,
        format!("method {method} is not allowed on this route"),
    )
}
