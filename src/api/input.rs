//! Request bodies: JSON, or multipart with the same field names, and the
//! IMAGE value every image-taking endpoint shares.

use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use base64::Engine as _;
use bytes::Bytes;
use image::RgbImage;
use serde::de::DeserializeOwned;

use super::admission::DecodeBudget;
pub use super::bounded::LandmarkInput;
use super::AppState;
use crate::error::{ApiError, ErrorKind};
use crate::imaging::{self, DecodeLimits};

/// An image: a base64 string, or an object with the base64 data and optional
/// 5-point landmarks (left eye, right eye, nose, left and right mouth corners,
/// in image pixels) used to align the face. Deserialised by hand (see `bounded`), so a
/// hostile `landmarks` array is never buffered or allocated beyond five points.
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
fn decode_base64(data: &str) -> Result<Vec<u8>, ApiError> {
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

/// Decode, validate landmarks and produce the 112x112 face, all off the async runtime.
fn prepare(
    input: &ImageInput,
    limits: &DecodeLimits,
    budget: &DecodeBudget,
) -> Result<RgbImage, ApiError> {
    let (data, landmarks) = input.parts();
    let landmarks = landmarks.map(LandmarkInput::parse).transpose()?;
    let bytes = decode_base64(data)?;
    // Held until the crop exists: the decoded image is the memory being bounded.
    let _room = budget.reserve(imaging::decoded_size(&bytes, limits)?)?;
    let img = imaging::decode(&bytes, limits)?;
    Ok(imaging::face_crop(&img, landmarks.as_ref()))
}

impl AppState {
    fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_side: self.config.max_image_side,
            max_decoded_bytes: self.config.max_decoded_bytes,
        }
    }

    /// Turns request images into 112x112 faces, refusing too many before any decoding.
    pub async fn load_faces(&self, inputs: Vec<ImageInput>) -> Result<Vec<RgbImage>, ApiError> {
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
        tokio::task::spawn_blocking(move || {
            inputs
                .iter()
                .enumerate()
                .map(|(i, input)| {
                    prepare(input, &limits, &budget)
                        .map_err(|e| ApiError::new(e.kind, format!("image {i}: {}", e.message)))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(ApiError::internal)?
    }

    pub async fn load_face(&self, input: &ImageInput) -> Result<RgbImage, ApiError> {
        let limits = self.decode_limits();
        let budget = self.decode_budget.clone();
        let input = input.clone();
        tokio::task::spawn_blocking(move || prepare(&input, &limits, &budget))
            .await
            .map_err(ApiError::internal)?
    }

    /// Embeds request images: decode, align, run the model (flip-averaged if asked).
    pub async fn embed_inputs(
        &self,
        inputs: Vec<ImageInput>,
        flip: bool,
    ) -> Result<Vec<Vec<f32>>, ApiError> {
        let faces = self.load_faces(inputs).await?;
        self.engine.embed(faces, flip).await
    }

    /// One image's flip-averaged embedding.
    pub async fn embed_one(&self, input: &ImageInput) -> Result<Vec<f32>, ApiError> {
        let face = self.load_face(input).await?;
        self.engine
            .embed(vec![face], true)
            .await?
            .pop()
            .ok_or_else(|| ApiError::internal("engine returned no embedding"))
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
