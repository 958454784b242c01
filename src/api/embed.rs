//! POST /embed: faces in, MobiFace embeddings out.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::bounded::ImageList;
use super::input::{FaceOptions, FaceReport, ImageInput, JsonOrMultipart, MultipartFields};
use super::AppState;
use crate::error::{ApiError, ErrorBody};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmbedRequest {
    /// Images in request order (multipart: repeated `image` file parts).
    #[schema(value_type = Vec<ImageInput>, min_items = 1)]
    pub images: ImageList,
    /// Average each face with its mirror image (Flipped-MobiFace). Default true.
    #[serde(default = "default_flip")]
    pub flip: bool,
    /// Run the face detector even on a 112x112 image without landmarks (otherwise taken as an
    /// aligned crop).
    #[serde(default)]
    pub detect: Option<bool>,
    /// Refuse (422 `multiple_faces`) a photo holding several recognisable faces instead of
    /// using the largest.
    #[serde(default)]
    pub single_face: bool,
}

fn default_flip() -> bool {
    true
}

impl MultipartFields for EmbedRequest {
    const ARRAY_FIELDS: &'static [(&'static str, &'static str)] = &[("image", "images")];
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EmbedModel {
    pub name: String,
    pub version: String,
    pub dim: usize,
    pub flip: bool,
    /// False when the model file carries seeded random weights: its embeddings identify nobody.
    pub trained: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Embedding {
    /// Unit-length (L2-normalised) feature vector.
    pub embedding: Vec<f32>,
    /// The face it was computed from.
    #[serde(flatten)]
    pub face: FaceReport,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EmbedResponse {
    pub model: EmbedModel,
    pub embeddings: Vec<Embedding>,
}

#[utoipa::path(
    post,
    path = "/embed",
    request_body(content = EmbedRequest, description = "JSON, or multipart with `image` file parts and an optional `flip` field"),
    responses(
        (status = 200, body = EmbedResponse),
        (status = 400, description = "Undecodable image, bad base64 or bad landmarks", body = ErrorBody),
        (status = 413, description = "Body or image too large", body = ErrorBody),
        (status = 415, description = "Unsupported content type", body = ErrorBody),
        (status = 422, description = "Wrong JSON shape, too many images, or an image without a usable face (`no_face`, `face_too_small`, `multiple_faces`)", body = ErrorBody),
        (status = 503, description = "Inference queue full (see Retry-After)", body = ErrorBody),
    ),
    tag = "embeddings"
)]
pub async fn embed(
    State(state): State<AppState>,
    JsonOrMultipart(req): JsonOrMultipart<EmbedRequest>,
) -> Result<Json<EmbedResponse>, ApiError> {
    let images = req.images.within(state.config.max_images_per_request)?;
    let opts = FaceOptions::new(req.detect, req.single_face);
    let vectors = state.embed_inputs(images, opts, req.flip).await?;
    let info = state.engine.info();
    Ok(Json(EmbedResponse {
        model: EmbedModel {
            name: info.name.clone(),
            version: info.version.clone(),
            dim: info.dim,
            flip: req.flip,
            trained: info.trained,
        },
        embeddings: vectors
            .into_iter()
            .map(|(embedding, face)| Embedding { embedding, face })
            .collect(),
    }))
}
