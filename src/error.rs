//! One table from error kind to HTTP status and wire code, so every endpoint
//! answers the same `{"error": {"code", "message"}}` shape for the same fault.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Body is not syntactically valid JSON (or an empty body).
    MalformedBody,
    /// Body parses but has the wrong shape (missing field, wrong type).
    InvalidRequest,
    /// A field has an invalid value (empty name, top_k 0, threshold out of range...).
    InvalidArgument,
    /// Bytes that do not decode as a supported image.
    BadImage,
    /// Landmarks that are not 5 finite points.
    BadLandmarks,
    /// No face found in a photo sent without landmarks.
    NoFace,
    /// The face found is too small to recognise.
    FaceTooSmall,
    /// Several faces where the request asked for exactly one.
    MultipleFaces,
    /// Too many images in one request.
    TooManyImages,
    /// Request body larger than the configured limit.
    PayloadTooLarge,
    /// Image larger than the decode limits (dimensions or decoded bytes).
    ImageTooLarge,
    UnsupportedMediaType,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    RateLimited,
    /// Inference queue full: retry shortly.
    QueueFull,
    /// Decode budget exhausted for longer than --decode-wait-ms: retry shortly.
    DecodeBusy,
    /// Server is shutting down or the model is not ready.
    Unavailable,
    /// The gallery's database (PostgreSQL) cannot be reached: retry shortly.
    DatabaseUnavailable,
    Timeout,
    Internal,
}

impl ErrorKind {
    /// The single mapping from kind to status and machine-readable code.
    pub fn status_and_code(self) -> (StatusCode, &'static str) {
        use ErrorKind::*;
        match self {
            MalformedBody => (StatusCode::BAD_REQUEST, "malformed_body"),
            InvalidRequest => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            InvalidArgument => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_argument"),
            BadImage => (StatusCode::BAD_REQUEST, "bad_image"),
            BadLandmarks => (StatusCode::BAD_REQUEST, "bad_landmarks"),
            NoFace => (StatusCode::UNPROCESSABLE_ENTITY, "no_face"),
            FaceTooSmall => (StatusCode::UNPROCESSABLE_ENTITY, "face_too_small"),
            MultipleFaces => (StatusCode::UNPROCESSABLE_ENTITY, "multiple_faces"),
            TooManyImages => (StatusCode::UNPROCESSABLE_ENTITY, "too_many_images"),
            PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ImageTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "image_too_large"),
            UnsupportedMediaType => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            NotFound => (StatusCode::NOT_FOUND, "not_found"),
            MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            RateLimited => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            QueueFull => (StatusCode::SERVICE_UNAVAILABLE, "queue_full"),
            DecodeBusy => (StatusCode::SERVICE_UNAVAILABLE, "decode_busy"),
            Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            DatabaseUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable"),
            Timeout => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// Seconds a client should wait before retrying, for the kinds where retrying helps.
    fn retry_after(self) -> Option<u32> {
        match self {
            ErrorKind::QueueFull
            | ErrorKind::DecodeBusy
            | ErrorKind::RateLimited
            | ErrorKind::DatabaseUnavailable => Some(1),
            ErrorKind::Unavailable => Some(5),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    /// Internal faults are logged in full but reported to clients without detail.
    pub fn internal(err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "internal error");
        Self::new(ErrorKind::Internal, "internal error")
    }
}

/// Wire shape of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `bad_image`, `queue_full`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.kind.status_and_code();
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.to_string(),
                message: self.message,
            },
        };
        let mut resp = (status, Json(body)).into_response();
        if let Some(secs) = self.kind.retry_after() {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        // Lets the metrics layer count rejections by reason without parsing bodies.
        resp.extensions_mut().insert(self.kind);
        resp
    }
}
