//! Subjects and their enrolled faces: create, list, read, delete; add and
//! delete faces.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::input::{FaceOptions, FaceReport, ImageInput, JsonOrMultipart, MultipartFields};
use super::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::gallery::{Subject, SubjectDetail, SubjectPage};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSubject {
    /// Display name, 1 to 256 characters (trimmed).
    pub name: String,
    /// Free-form JSON object, at most 16 KiB serialised.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Box<serde_json::value::RawValue>>,
}

impl MultipartFields for CreateSubject {}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<usize>,
    /// The `next` cursor of the previous page.
    pub after: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddFace {
    /// The face to enrol (multipart: an `image` file part).
    pub image: ImageInput,
    /// Run the face detector even on a 112x112 image without landmarks (otherwise taken as an
    /// aligned crop).
    #[serde(default)]
    pub detect: Option<bool>,
    /// Refuse (422 `multiple_faces`) a photo holding several recognisable faces instead of
    /// using the largest.
    #[serde(default)]
    pub single_face: bool,
}

impl MultipartFields for AddFace {}

#[derive(Debug, Serialize, ToSchema)]
pub struct FaceCreated {
    #[schema(value_type = String)]
    pub face_id: Uuid,
    #[schema(value_type = String)]
    pub subject_id: Uuid,
    /// The face that was enrolled.
    #[serde(flatten)]
    pub face: FaceReport,
}

/// Ids in paths: anything that is not a UUID cannot name a stored object, so
/// it is "not found" (404), the same answer as a well-formed unknown id.
pub(crate) fn parse_id(raw: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found(format!("no {what} with id {raw:?}")))
}

fn path_error(e: PathRejection) -> ApiError {
    ApiError::not_found(format!("bad path: {e}"))
}

/// Largest `metadata` text parsed; the gallery's own limit (16 KiB serialised) is checked
/// after. Whitespace makes the text longer than its serialised form, hence the margin; the
/// point is that a 16 MiB value is refused before it becomes a `Value` tree.
const MAX_METADATA_TEXT: usize = 64 * 1024;

fn parse_metadata(raw: &serde_json::value::RawValue) -> Result<serde_json::Value, ApiError> {
    if raw.get().len() > MAX_METADATA_TEXT {
        return Err(ApiError::invalid(format!(
            "metadata is {} bytes of JSON; the limit is 16 KiB serialised",
            raw.get().len()
        )));
    }
    serde_json::from_str(raw.get()).map_err(|e| ApiError::invalid(format!("bad metadata: {e}")))
}

#[utoipa::path(
    post,
    path = "/subjects",
    request_body(content = CreateSubject, description = "JSON (or multipart with `name` and `metadata` fields)"),
    responses(
        (status = 201, body = Subject),
        (status = 422, description = "Empty or long name, metadata not an object or too large, wrong JSON shape", body = ErrorBody),
        (status = 503, description = "Gallery database unreachable (PostgreSQL backend; see Retry-After)", body = ErrorBody),
    ),
    tag = "gallery"
)]
pub async fn create_subject(
    State(state): State<AppState>,
    JsonOrMultipart(req): JsonOrMultipart<CreateSubject>,
) -> Result<(StatusCode, Json<Subject>), ApiError> {
    let metadata = req.metadata.as_deref().map(parse_metadata).transpose()?;
    let subject = state.gallery.create_subject(req.name, metadata).await?;
    Ok((StatusCode::CREATED, Json(subject)))
}

#[utoipa::path(
    get,
    path = "/subjects",
    params(ListParams),
    responses(
        (status = 200, body = SubjectPage, description = "Subjects in creation order"),
        (status = 422, description = "Bad limit or cursor", body = ErrorBody),
        (status = 503, description = "Gallery database unreachable (PostgreSQL backend; see Retry-After)", body = ErrorBody),
    ),
    tag = "gallery"
)]
pub async fn list_subjects(
    State(state): State<AppState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<SubjectPage>, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::invalid(format!("bad query string: {e}")))?;
    Ok(Json(state.gallery.list_subjects(p.limit, p.after).await?))
}

#[utoipa::path(
    get,
    path = "/subjects/{id}",
    params(("id" = String, Path, description = "Subject id (UUID)")),
    responses(
        (status = 200, body = SubjectDetail),
        (status = 404, description = "No such subject", body = ErrorBody),
        (status = 503, description = "Gallery database unreachable (PostgreSQL backend; see Retry-After)", body = ErrorBody),
    ),
    tag = "gallery"
)]
pub async fn get_subject(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<SubjectDetail>, ApiError> {
    let Path(id) = id.map_err(path_error)?;
    let id = parse_id(&id, "subject")?;
    Ok(Json(state.gallery.get_subject(id).await?))
}

#[utoipa::path(
    delete,
    path = "/subjects/{id}",
    params(("id" = String, Path, description = "Subject id (UUID)")),
    responses(
        (status = 204, description = "Deleted, with all its faces"),
        (status = 404, description = "No such subject", body = ErrorBody),
        (status = 503, description = "Gallery database unreachable (PostgreSQL backend; see Retry-After)", body = ErrorBody),
    ),
    tag = "gallery"
)]
pub async fn delete_subject(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let Path(id) = id.map_err(path_error)?;
    let id = parse_id(&id, "subject")?;
    state.gallery.delete_subject(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post,
    path = "/subjects/{id}/faces",
    params(("id" = String, Path, description = "Subject id (UUID)")),
    request_body(content = AddFace, description = "JSON, or multipart with an `image` file part"),
    responses(
        (status = 201, body = FaceCreated),
        (status = 400, description = "Undecodable image or bad landmarks", body = ErrorBody),
        (status = 404, description = "No such subject", body = ErrorBody),
        (status = 413, description = "Body or image too large", body = ErrorBody),
        (status = 422, description = "Wrong JSON shape, or no usable face (`no_face`, `face_too_small`, `multiple_faces`)", body = ErrorBody),
        (status = 503, description = "Inference queue full, or the gallery database unreachable (see Retry-After)", body = ErrorBody),
    ),
    tag = "gallery"
)]
pub async fn add_face(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    JsonOrMultipart(req): JsonOrMultipart<AddFace>,
) -> Result<(StatusCode, Json<FaceCreated>), ApiError> {
    let Path(id) = id.map_err(path_error)?;
    let subject_id = parse_id(&id, "subject")?;
    if !state.gallery.subject_exists(&subject_id).await? {
        return Err(ApiError::not_found(format!(
            "no subject with id {subject_id}"
        )));
    }
    let opts = FaceOptions::new(req.detect, req.single_face);
    let (embedding, face) = state.embed_one(&req.image, opts).await?;
    let face_id = state.gallery.add_face(subject_id, embedding).await?;
    Ok((
        StatusCode::CREATED,
        Json(FaceCreated {
            face_id,
            subject_id,
            face,
        }),
    ))
}

#[utoipa::path(
    delete,
    path = "/subjects/{id}/faces/{face_id}",
    params(
        ("id" = String, Path, description = "Subject id (UUID)"),
        ("face_id" = String, Path, description = "Face id (UUID)"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such subject, or no such face under it", body = ErrorBody),
        (status = 503, description = "Gallery database unreachable (PostgreSQL backend; see Retry-After)", body = ErrorBody),
    ),
    tag = "gallery"
)]
pub async fn delete_face(
    State(state): State<AppState>,
    ids: Result<Path<(String, String)>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let Path((id, face)) = ids.map_err(path_error)?;
    let subject_id = parse_id(&id, "subject")?;
    let face_id = parse_id(&face, "face")?;
    state.gallery.delete_face(subject_id, face_id).await?;
    Ok(StatusCode::NO_CONTENT)
}
