//! POST /detect: every face in a photo, with its box, score and landmarks, and on request its
//! aligned 112x112 crop.

use axum::extract::State;
use axum::Json;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::input::{decode_reserved, ImageInput, JsonOrMultipart, MultipartFields};
use super::AppState;
use crate::detection::Face;
use crate::error::{ApiError, ErrorBody, ErrorKind};
use crate::imaging;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DetectRequest {
    /// The photo (multipart: an `image` file part). Landmarks are not taken here.
    pub image: ImageInput,
    /// Also return each face aligned onto the 112x112 template, as base64 PNG: the crop the
    /// other endpoints embed.
    #[serde(default)]
    pub crops: bool,
}

impl MultipartFields for DetectRequest {}

#[derive(Debug, Serialize, ToSchema)]
pub struct DetectedFace {
    #[serde(flatten)]
    pub face: Face,
    /// Base64 PNG of the aligned 112x112 face (with `"crops": true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crop: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DetectResponse {
    /// Of the image as decoded (EXIF orientation applied): the frame of boxes and landmarks.
    pub width: u32,
    pub height: u32,
    /// Largest first; empty when there is none.
    pub faces: Vec<DetectedFace>,
}

fn png(img: &image::RgbImage) -> Result<String, ApiError> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(ApiError::internal)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(out.into_inner()))
}

#[utoipa::path(
    post,
    path = "/detect",
    request_body(content = DetectRequest, description = "JSON, or multipart with an `image` file part and an optional `crops` field"),
    responses(
        (status = 200, body = DetectResponse),
        (status = 400, description = "Undecodable image or bad base64", body = ErrorBody),
        (status = 413, description = "Body or image too large", body = ErrorBody),
        (status = 415, description = "Unsupported content type", body = ErrorBody),
        (status = 422, description = "Wrong JSON shape, or landmarks given", body = ErrorBody),
    ),
    tag = "embeddings"
)]
pub async fn detect(
    State(state): State<AppState>,
    JsonOrMultipart(req): JsonOrMultipart<DetectRequest>,
) -> Result<Json<DetectResponse>, ApiError> {
    let data = match req.image {
        ImageInput::Base64(data) => data,
        ImageInput::WithLandmarks {
            data,
            landmarks: None,
        } => data,
        ImageInput::WithLandmarks { .. } => {
            return Err(ApiError::new(
                ErrorKind::InvalidArgument,
                "/detect finds the landmarks itself; send the image without them",
            ))
        }
    };
    let limits = state.decode_limits();
    let detector = state.detector.clone();
    let budget = state.decode_budget.clone();
    let crops = req.crops;
    let response = tokio::task::spawn_blocking(move || {
        // Held until the crops exist, as for the other image endpoints.
        let (_room, img) = decode_reserved(&data, &limits, &budget)?;
        let faces = detector
            .detect(&img)?
            .into_iter()
            .map(|face| {
                let crop = match crops {
                    true => imaging::align(&img, &face.landmarks)
                        .map(|c| png(&c))
                        .transpose()?,
                    false => None,
                };
                Ok(DetectedFace { face, crop })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        Ok::<_, ApiError>(DetectResponse {
            width: img.width(),
            height: img.height(),
            faces,
        })
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(Json(response))
}
