//! Request bodies: JSON, or multipart with the same field names, and the
//! IMAGE value every image-taking endpoint shares.

use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use base64::Engine as _;
use bytes::Bytes;
use image::RgbImage;
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::ToSchema;

use super::admission::{DecodeBudget, Reservation};
pub use super::bounded::LandmarkInput;
use super::AppState;
use crate::detection::{BoundingBox, Detector, Multiple};
use crate::error::{ApiError, ErrorKind};
use crate::imaging::{self, DecodeLimits, Landmarks, FACE_SIZE};

/// An image: a base64 string, or an object with the base64 data and optional
/// 5-point landmarks (left eye, right eye, nose, left and right mouth corners,
/// in image pixels) used to align the face. Without landmarks the face is found by the
/// detector (a 112x112 image is taken as an aligned crop unless the request asks `detect`).
/// Deserialised by hand (see `bounded`), so a hostile `landmarks` array is never buffered
/// or allocated beyond five points.
#[derive(Debug, Clone)]
pub enum ImageInput {
    Base64(String),
    WithLandmarks {
        data: String,
        landmarks: Option<LandmarkInput>,
    },
}

impl ImageInput {
    fn parts(&self) -> (&str, Option<&LandmarkInput>) {
        match self {
            ImageInput::Base64(data) => (data, None),
            ImageInput::WithLandmarks { data, landmarks } => (data, landmarks.as_ref()),
        }
    }
}

/// Base64 as clients send it: standard alphabet, padding optional, and a
/// `data:image/...;base64,` prefix tolerated.
pub(crate) fn decode_base64(data: &str) -> Result<Vec<u8>, ApiError> {
    let data = match data.split_once(";base64,") {
        Some((prefix, rest)) if prefix.starts_with("data:") => rest,
        _ => data,
    };
    let data = data.trim_end_matches('=');
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(data.trim())
        .map_err(|e| {
            ApiError::new(
                ErrorKind::BadImage,
                format!("image is not valid base64: {e}"),
            )
        })
}

/// How a 112x112 face was obtained from a request image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FaceSource {
    /// Found by the face detector and aligned through its landmarks.
    Detected,
    /// Aligned through the landmarks the request gave.
    Landmarks,
    /// A 112x112 image without landmarks, taken as an already aligned crop.
    AlignedCrop,
}

/// The face a result was computed from.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UsedFace {
    pub source: FaceSource,
    /// The detected face's box, in the pixels of the image as decoded (EXIF orientation applied).
    #[serde(rename = "box", skip_serializing_if = "Option::is_none")]
    pub bbox: Option<BoundingBox>,
    /// Detector confidence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
    /// The five points the face was aligned with (absent for an aligned crop).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Vec<f32>>>)]
    pub landmarks: Option<Landmarks>,
}

/// `face` and `faces_detected`, side by side in every result computed from an image.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FaceReport {
    pub face: UsedFace,
    /// Faces the detector found in the image (present when it ran); the largest is used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub faces_detected: Option<usize>,
}

/// Per-request choices about faces: every image-taking request has the fields `detect` and
/// `single_face`.
#[derive(Debug, Clone, Copy, Default)]
pub struct FaceOptions {
    /// Run the detector even on a 112x112 image (otherwise taken as an aligned crop).
    pub detect: bool,
    pub multiple: Multiple,
}

impl FaceOptions {
    pub fn new(detect: Option<bool>, single_face: bool) -> Self {
        Self {
            detect: detect.unwrap_or(false),
            multiple: if single_face {
                Multiple::Refuse
            } else {
                Multiple::Largest
            },
        }
    }
}

/// A request image made ready for the model.
pub struct Prepared {
    pub crop: RgbImage,
    pub report: FaceReport,
}

/// Decode, validate landmarks or detect, and produce the 112x112 face, all off the async runtime.
fn prepare(
    input: &ImageInput,
    opts: FaceOptions,
    limits: &DecodeLimits,
    detector: &Detector,
    budget: &DecodeBudget,
) -> Result<Prepared, ApiError> {
    let (data, landmarks) = input.parts();
    let landmarks = landmarks.map(LandmarkInput::parse).transpose()?;
    // Held until the crop exists: the decoded image is the memory being bounded.
    let (_room, img) = decode_reserved(data, limits, budget)?;
    prepare_image(&img, landmarks, opts, detector)
}

/// Decodes base64 image data after reserving decode budget for it; the budget stays held
/// until the caller drops the returned reservation. Every endpoint that decodes goes through it.
pub(crate) fn decode_reserved<'b>(
    data: &str,
    limits: &DecodeLimits,
    budget: &'b DecodeBudget,
) -> Result<(Reservation<'b>, RgbImage), ApiError> {
    let bytes = decode_base64(data)?;
    imaging::decode_admitted(&bytes, limits, |size| budget.reserve(size))
}

/// The one rule for turning a decoded image into the model's face (also `mobiface eval`'s).
pub fn prepare_image(
    img: &RgbImage,
    landmarks: Option<Landmarks>,
    opts: FaceOptions,
    detector: &Detector,
) -> Result<Prepared, ApiError> {
    let plain = |source, landmarks| FaceReport {
        face: UsedFace {
            source,
            bbox: None,
            score: None,
            landmarks,
        },
        faces_detected: None,
    };
    if let Some(points) = landmarks {
        let crop = imaging::align(img, &points)
            .ok_or_else(|| ApiError::new(ErrorKind::BadLandmarks, "landmarks are degenerate"))?;
        return Ok(Prepared {
            crop,
            report: plain(FaceSource::Landmarks, Some(points)),
        });
    }
    if img.dimensions() == (FACE_SIZE, FACE_SIZE) && !opts.detect {
        return Ok(Prepared {
            crop: img.clone(),
            report: plain(FaceSource::AlignedCrop, None),
        });
    }
    let chosen = detector.choose(img, opts.multiple)?;
    Ok(Prepared {
        crop: chosen.crop,
        report: FaceReport {
            face: UsedFace {
                source: FaceSource::Detected,
                bbox: Some(chosen.face.bbox),
                score: Some(chosen.face.score),
                landmarks: Some(chosen.face.landmarks),
            },
            faces_detected: Some(chosen.faces_detected),
        },
    })
}

impl AppState {
    pub fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_side: self.config.max_image_side,
            max_decoded_bytes: self.config.max_decoded_bytes,
        }
    }

    /// Turns request images into 112x112 faces, refusing too many before any decoding.
    pub async fn load_faces(
        &self,
        inputs: Vec<ImageInput>,
        opts: FaceOptions,
    ) -> Result<Vec<Prepared>, ApiError> {
        if inputs.is_empty() {
            return Err(ApiError::new(
                ErrorKind::InvalidRequest,
                "at least one image is required",
            ));
        }
        let max = self.config.max_images_per_request;
        if inputs.len() > max {
            return Err(ApiError::new(
                ErrorKind::TooManyImages,
                format!("{} images in one request; the limit is {max}", inputs.len()),
            ));
        }
        let limits = self.decode_limits();
        let budget = self.decode_budget.clone();
        let detector = self.detector.clone();
        tokio::task::spawn_blocking(move || {
            inputs
                .iter()
                .enumerate()
                .map(|(i, input)| {
                    prepare(input, opts, &limits, &detector, &budget)
                        .map_err(|e| ApiError::new(e.kind, format!("image {i}: {}", e.message)))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(ApiError::internal)?
    }

    pub async fn load_face(
        &self,
        input: &ImageInput,
        opts: FaceOptions,
    ) -> Result<Prepared, ApiError> {
        let limits = self.decode_limits();
        let input = input.clone();
        let detector = self.detector.clone();
        let budget = self.decode_budget.clone();
        tokio::task::spawn_blocking(move || prepare(&input, opts, &limits, &detector, &budget))
            .await
            .map_err(ApiError::internal)?
    }

    /// Embeds request images: decode, align or detect, run the model (flip-averaged if asked).
    pub async fn embed_inputs(
        &self,
        inputs: Vec<ImageInput>,
        opts: FaceOptions,
        flip: bool,
    ) -> Result<Vec<(Vec<f32>, FaceReport)>, ApiError> {
        let (crops, reports): (Vec<_>, Vec<_>) = self
            .load_faces(inputs, opts)
            .await?
            .into_iter()
            .map(|p| (p.crop, p.report))
            .unzip();
        let vectors = self.engine.embed(crops, flip).await?;
        if vectors.len() != reports.len() {
            return Err(ApiError::internal(
                "engine returned the wrong number of embeddings",
            ));
        }
        Ok(vectors.into_iter().zip(reports).collect())
    }

    /// One image's flip-averaged embedding.
    pub async fn embed_one(
        &self,
        input: &ImageInput,
        opts: FaceOptions,
    ) -> Result<(Vec<f32>, FaceReport), ApiError> {
        let face = self.load_face(input, opts).await?;
        let embedding = self
            .engine
            .embed(vec![face.crop], true)
            .await?
            .pop()
            .ok_or_else(|| ApiError::internal("engine returned no embedding"))?;
        Ok((embedding, face.report))
    }
}

/// How a request type maps multipart fields onto its JSON shape.
pub trait MultipartFields {
    /// Multipart fields whose repeated parts fill a JSON array under another
    /// name (e.g. repeated `image` parts become `images`).
    const ARRAY_FIELDS: &'static [(&'static str, &'static str)] = &[];
}

/// A body that is JSON, or multipart/form-data whose file parts become base64
/// strings under their field names and whose text parts are read as JSON
/// values (falling back to strings).
pub struct JsonOrMultipart<T>(pub T);

// Generic over the state (it reads none), so the fuzz targets can run it without an app.
impl<T, S> FromRequest<S> for JsonOrMultipart<T>
where
    T: DeserializeOwned + MultipartFields + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        // The media type without parameters: `application/json; charset=utf-8` is JSON,
        // `application/jsonfoo` is not.
        let essence = content_type.split(';').next().unwrap_or("").trim();
        let json = match essence {
            "application/json" => {
                let body = Bytes::from_request(req, state)
                    .await
                    .map_err(|e| body_error(e.status(), e.body_text()))?;
                if body.is_empty() {
                    return Err(ApiError::new(
                        ErrorKind::MalformedBody,
                        "request body is empty; expected JSON",
                    ));
                }
                body
            }
            "multipart/form-data" => {
                let multipart = Multipart::from_request(req, state)
                    .await
                    .map_err(|e| body_error(e.status(), e.body_text()))?;
                Bytes::from(multipart_to_json(multipart, T::ARRAY_FIELDS).await?)
            }
            _ => {
                return Err(ApiError::new(
                    ErrorKind::UnsupportedMediaType,
                    format!(
                        "content type {:?} is not supported; send application/json or multipart/form-data",
                        if content_type.is_empty() { "(none)" } else { content_type.as_str() }
                    ),
                ))
            }
        };
        // Straight into the typed request: no intermediate `Value` tree, and every array
        // in the request types is capped (see `bounded`), so a body's memory stays a small
        // multiple of its size whatever it holds.
        serde_json::from_slice::<T>(&json)
            .map(JsonOrMultipart)
            .map_err(json_error)
    }
}

/// Syntax errors are a malformed body (400); a well-formed body of the wrong shape is 422.
fn json_error(e: serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => ApiError::new(
            ErrorKind::MalformedBody,
            format!("body is not valid JSON: {e}"),
        ),
        Category::Data => ApiError::new(
            ErrorKind::InvalidRequest,
            format!("invalid request body: {e}"),
        ),
    }
}

fn body_error(status: StatusCode, text: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            ErrorKind::PayloadTooLarge,
            "request body is larger than the configured limit",
        )
    } else {
        ApiError::new(
            ErrorKind::MalformedBody,
            format!("cannot read request body: {text}"),
        )
    }
}

/// Builds the JSON text of a multipart body: file parts become base64 strings, text parts
/// that are valid JSON are spliced in as they are (checked without building them), other
/// text parts become strings. The typed, bounded parse then reads it like a JSON body.
async fn multipart_to_json(
    mut multipart: Multipart,
    arrays: &[(&str, &str)],
) -> Result<String, ApiError> {
    // Field name -> JSON fragments, in arrival order.
    let mut fields: Vec<(String, Vec<String>, bool)> = Vec::new();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => return Err(body_error(e.status(), e.body_text())),
        };
        let name = field.name().unwrap_or_default().to_string();
        let is_file = field.file_name().is_some()
            || field
                .content_type()
                .is_some_and(|ct| !ct.starts_with("text/plain"));
        let data = field
            .bytes()
            .await
            .map_err(|e| body_error(e.status(), e.body_text()))?;
        let fragment = if is_file {
            format!(
                "\"{}\"",
                base64::engine::general_purpose::STANDARD.encode(&data)
            )
        } else {
            let text = String::from_utf8_lossy(&data);
            if serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok() {
                text.into_owned()
            } else {
                json_string(&text)
            }
        };
        let (target, is_array) = match arrays.iter().find(|(from, _)| *from == name) {
            Some((_, target)) => (target.to_string(), true),
            None => (name.clone(), false),
        };
        match fields.iter_mut().find(|(n, _, _)| *n == target) {
            None => fields.push((target, vec![fragment], is_array)),
            Some((_, parts, true)) if is_array => parts.push(fragment),
            // A text field may already sit under the target name; that is a client error.
            Some(_) if is_array => {
                return Err(ApiError::new(
                    ErrorKind::InvalidRequest,
                    format!("multipart field {target:?} conflicts with {name:?} parts"),
                ))
            }
            Some(_) => {
                return Err(ApiError::new(
                    ErrorKind::InvalidRequest,
                    format!("multipart field {name:?} given twice"),
                ))
            }
        }
    }
    let mut out = String::from("{");
    for (i, (name, parts, is_array)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&json_string(name));
        out.push(':');
        if *is_array {
            out.push('[');
            out.push_str(&parts.join(","));
            out.push(']');
        } else {
            out.push_str(&parts[0]);
        }
    }
    out.push('}');
    Ok(out)
}

fn json_string(text: &str) -> String {
    // Serialising a &str cannot fail.
    serde_json::to_string(text).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_accepts_padding_and_data_urls() {
        assert_eq!(decode_base64("aGk=").unwrap(), b"hi");
        assert_eq!(decode_base64("aGk").unwrap(), b"hi");
        assert_eq!(decode_base64("data:image/png;base64,aGk=").unwrap(), b"hi");
        assert_eq!(decode_base64("!!!").unwrap_err().kind, ErrorKind::BadImage);
    }
}
