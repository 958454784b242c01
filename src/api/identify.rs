//! POST /identify: 1:N, who among the enrolled subjects is this face?

use std::time::Instant;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::input::{FaceOptions, FaceReport, ImageInput, JsonOrMultipart, MultipartFields};
use super::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::gallery::{self, Match};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentifyRequest {
    pub image: ImageInput,
    /// Most subjects to return, 1 to 100 (default 5).
    #[serde(
        default = "default_top_k",
        deserialize_with = "super::bounded::integral"
    )]
    pub top_k: i64,
    /// Least similarity a match needs, in [-1, 1]; default: the service's threshold.
    pub threshold: Option<f32>,
    /// Run the face detector even on a 112x112 image without landmarks (otherwise taken as an
    /// aligned crop).
    #[serde(default)]
    pub detect: Option<bool>,
    /// Refuse (422 `multiple_faces`) a photo holding several recognisable faces instead of
    /// using the largest.
    #[serde(default)]
    pub single_face: bool,
}

fn default_top_k() -> i64 {
    5
}

impl MultipartFields for IdentifyRequest {}

#[derive(Debug, Serialize, ToSchema)]
pub struct IdentifyResponse {
    /// Best first; empty means "unknown".
    pub matches: Vec<Match>,
    pub threshold: f32,
    /// Subjects that have at least one face of the running model: what was searched.
    pub gallery_size: usize,
    /// The probe face that was searched for.
    #[serde(flatten)]
    pub face: FaceReport,
}

#[utoipa::path(
    post,
    path = "/identify",
    request_body(content = IdentifyRequest, description = "JSON, or multipart with an `image` file part and `top_k` / `threshold` fields"),
    responses(
        (status = 200, body = IdentifyResponse),
        (status = 400, description = "Undecodable image or bad landmarks", body = ErrorBody),
        (status = 413, description = "Body or image too large", body = ErrorBody),
        (status = 422, description = "top_k outside 1..=100, threshold outside [-1, 1], wrong JSON shape, no usable face (`no_face`, `face_too_small`, `multiple_faces`)", body = ErrorBody),
        (status = 503, description = "Inference queue full (see Retry-After)", body = ErrorBody),
    ),
    tag = "matching"
)]
pub async fn identify(
    State(state): State<AppState>,
    JsonOrMultipart(req): JsonOrMultipart<IdentifyRequest>,
) -> Result<Json<IdentifyResponse>, ApiError> {
    let start = Instant::now();
    let threshold = req.threshold.unwrap_or(state.threshold);
    // Signed on the wire so a negative top_k gets this message, not a serde one.
    let top_k = usize::try_from(req.top_k).unwrap_or(0);
    // Checked before the model runs: a bad knob should not cost an inference.
    gallery::check_search_params(top_k, threshold).map_err(|e| match top_k {
        0 => ApiError::invalid(format!(
            "top_k must be between 1 and {}, got {}",
            gallery::MAX_TOP_K,
            req.top_k
        )),
        _ => e.into(),
    })?;
    let opts = FaceOptions::new(req.detect, req.single_face);
    let (probe, face) = state.embed_one(&req.image, opts).await?;
    // Searched without the threshold so the best score is observed even when
    // it is below it: the similarity histogram then shows drift in unknown
    // faces too. Filtering afterwards gives the same answer (exact search).
    let found = state.gallery.identify(probe, top_k, -1.0).await?;
    if let Some(best) = found.matches.first() {
        state.metrics.similarity.observe(f64::from(best.similarity));
    }
    let matches = found
        .matches
        .into_iter()
        .filter(|m| m.similarity >= threshold)
        .collect();
    state
        .metrics
        .identify_duration
        .observe(start.elapsed().as_secs_f64());
    Ok(Json(IdentifyResponse {
        matches,
        threshold,
        gallery_size: found.gallery_size,
        face,
    }))
}
