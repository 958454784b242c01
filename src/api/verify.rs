//! POST /verify: 1:1, either two images or an image against an enrolled subject.

use std::time::Instant;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::input::{FaceOptions, FaceReport, ImageInput, JsonOrMultipart, MultipartFields};
use super::subjects::parse_id;
use super::AppState;
use crate::error::{ApiError, ErrorBody, ErrorKind};
use crate::gallery;

/// `{"image1", "image2"}` compares two images; `{"image", "subject_id"}`
/// compares an image with a subject's enrolled faces (its best one counts).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    pub image1: Option<ImageInput>,
    pub image2: Option<ImageInput>,
    pub image: Option<ImageInput>,
    /// Enrolled subject to compare `image` with.
    pub subject_id: Option<String>,
    /// Match threshold on cosine similarity in [-1, 1]; default: the service's.
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

impl MultipartFields for VerifyRequest {}

#[derive(Debug, Serialize, ToSchema)]
pub struct VerifyResponse {
    /// Cosine similarity of the flip-averaged, L2-normalised embeddings.
    pub similarity: f32,
    pub threshold: f32,
    /// `similarity >= threshold`.
    #[serde(rename = "match")]
    pub is_match: bool,
    /// Against a subject: its enrolled face that matched best.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub face_id: Option<Uuid>,
    /// The faces compared, in request order (`image1`, `image2`; or just the probe).
    pub faces: Vec<FaceReport>,
}

enum Mode {
    Pair(ImageInput, ImageInput),
    Subject(ImageInput, String),
}

fn mode(req: VerifyRequest) -> Result<(Mode, FaceOptions), ApiError> {
    let opts = FaceOptions::new(req.detect, req.single_face);
    let bad = |m: &str| ApiError::new(ErrorKind::InvalidArgument, m);
    let probe = match (req.image1, req.image) {
        (Some(_), Some(_)) => return Err(bad("give `image1` or `image`, not both")),
        (Some(i), None) | (None, Some(i)) => i,
        (None, None) => return Err(bad("`image1` (or `image`) is required")),
    };
    match (req.image2, req.subject_id) {
        (Some(_), Some(_)) => Err(bad(
            "give either `image2` (compare two images) or `subject_id` (compare with a subject), not both",
        )),
        (Some(other), None) => Ok((Mode::Pair(probe, other), opts)),
        (None, Some(s)) => Ok((Mode::Subject(probe, s), opts)),
        (None, None) => Err(bad(
            "give `image2` (compare two images) or `subject_id` (compare with a subject)",
        )),
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let n = (gallery::index::dot(a, a) * gallery::index::dot(b, b)).sqrt();
    if n > 0.0 {
        gallery::index::dot(a, b) / n
    } else {
        0.0
    }
}

#[utoipa::path(
    post,
    path = "/verify",
    request_body(content = VerifyRequest, description = "JSON, or multipart with the same field names (images as file parts)"),
    responses(
        (status = 200, body = VerifyResponse),
        (status = 400, description = "Undecodable image or bad landmarks", body = ErrorBody),
        (status = 404, description = "No such subject", body = ErrorBody),
        (status = 413, description = "Body or image too large", body = ErrorBody),
        (status = 422, description = "Both or neither of image2/subject_id, threshold outside [-1, 1], subject without faces of this model, wrong JSON shape, an image without a usable face (`no_face`, `face_too_small`, `multiple_faces`)", body = ErrorBody),
        (status = 503, description = "Inference queue full (see Retry-After)", body = ErrorBody),
    ),
    tag = "matching"
)]
pub async fn verify(
    State(state): State<AppState>,
    JsonOrMultipart(req): JsonOrMultipart<VerifyRequest>,
) -> Result<Json<VerifyResponse>, ApiError> {
    let start = Instant::now();
    let threshold = req.threshold.unwrap_or(state.threshold);
    gallery::check_threshold(threshold)?;
    let (mode, opts) = mode(req)?;
    let (similarity, face_id, faces) = match mode {
        Mode::Pair(a, b) => {
            let e = state.embed_inputs(vec![a, b], opts, true).await?;
            match e.as_slice() {
                [(x, _), (y, _)] => (
                    cosine(x, y),
                    None,
                    e.into_iter().map(|(_, face)| face).collect(),
                ),
                _ => {
                    return Err(ApiError::internal(
                        "engine returned the wrong number of embeddings",
                    ))
                }
            }
        }
        Mode::Subject(image, subject) => {
            let subject_id = parse_id(&subject, "subject")?;
            // Refuse an unknown subject before spending a model run.
            if !state.gallery.has_subject(&subject_id) {
                return Err(ApiError::not_found(format!(
                    "no subject with id {subject_id}"
                )));
            }
            let (probe, face) = state.embed_one(&image, opts).await?;
            let (s, f) = state.gallery.best_for_subject(subject_id, probe).await?;
            (s, Some(f), vec![face])
        }
    };
    state.metrics.similarity.observe(f64::from(similarity));
    state
        .metrics
        .verify_duration
        .observe(start.elapsed().as_secs_f64());
    Ok(Json(VerifyResponse {
        similarity,
        threshold,
        is_match: similarity >= threshold,
        face_id,
        faces,
    }))
}
