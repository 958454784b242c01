//! The gallery: subjects and their face embeddings, stored durably by one
//! [`Store`] backend and searched through an exact in-memory index.
//!
//! The backend is the source of truth; the index (one per process, see
//! [`mirror`]) mirrors the faces of the running model. A write is answered
//! only once it is committed and visible in this process's index. With
//! SQLite there is one process; with PostgreSQL every replica keeps its own
//! index and applies the others' writes from a change log ([`replication`]).

pub mod index;
pub mod mirror;
pub mod postgres;
pub mod replication;
pub mod sqlite;
pub mod store;
pub mod testing;

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::config::{Database, GalleryConfig};
use crate::error::{ApiError, ErrorKind};
use crate::metrics::Metrics;
use mirror::Mirror;
pub use store::{Change, Store};

/// Longest subject name, in characters.
pub const MAX_NAME_CHARS: usize = 256;
/// Largest metadata object, in bytes of compact JSON.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
/// Page size of `GET /subjects` when the client gives none, and its cap.
pub const DEFAULT_LIST_LIMIT: usize = 100;
pub const MAX_LIST_LIMIT: usize = 1000;
/// Most subjects one identify may return.
pub const MAX_TOP_K: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum GalleryError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the gallery is closed (shutting down)")]
    Closed,
    /// The database cannot be reached now; retrying later may succeed.
    #[error("the gallery database is unreachable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<GalleryError> for ApiError {
    fn from(e: GalleryError) -> Self {
        match e {
            GalleryError::NotFound(m) => ApiError::not_found(m),
            GalleryError::Invalid(m) => ApiError::invalid(m),
            GalleryError::Closed => ApiError::new(ErrorKind::Unavailable, e.to_string()),
            GalleryError::Unavailable(_) => {
                tracing::warn!(error = %e, "gallery write or read refused");
                ApiError::new(
                    ErrorKind::DatabaseUnavailable,
                    "the gallery database is unreachable; retry later",
                )
            }
            GalleryError::Internal(e) => ApiError::internal(format!("gallery: {e:#}")),
        }
    }
}

/// What start-up found in the database.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub subjects: usize,
    pub faces: usize,
    pub faces_other_model: u64,
    /// Rows of the running model whose blob is not `dim` floats (never expected).
    pub faces_malformed: u64,
    pub elapsed: std::time::Duration,
}

pub type Result<T, E = GalleryError> = std::result::Result<T, E>;

/// A subject as stored.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Subject {
    /// UUID.
    pub id: String,
    pub name: String,
    /// Free-form JSON object given at creation.
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// Stored faces of this subject, of any model.
    pub face_count: u64,
}

/// One stored face (the image itself is never kept).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FaceInfo {
    pub id: String,
    pub created_at: String,
    /// `name@version` of the model that made the embedding; only faces of the
    /// running model are searched.
    pub model: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SubjectDetail {
    #[serde(flatten)]
    pub subject: Subject,
    pub faces: Vec<FaceInfo>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SubjectPage {
    pub subjects: Vec<Subject>,
    /// Pass as `after` for the next page; null on the last page.
    pub next: Option<String>,
}

/// One identify result: a subject and its best-matching face.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Match {
    #[schema(value_type = String)]
    pub subject_id: Uuid,
    pub name: String,
    /// Cosine similarity of the probe and the subject's best face.
    pub similarity: f32,
    #[schema(value_type = String)]
    pub face_id: Uuid,
}

#[derive(Debug, Clone)]
pub struct Identified {
    pub matches: Vec<Match>,
    /// Subjects that have at least one searchable face (what was searched).
    pub gallery_size: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct Counts {
    /// All subjects.
    pub subjects: usize,
    /// Faces of the running model (searchable).
    pub faces: usize,
    /// Stored faces of other models: kept, reported, never compared.
    pub faces_other_model: u64,
}

/// Cheap to clone; all clones share one backend and one index.
#[derive(Clone)]
pub struct Gallery {
    store: Arc<dyn Store>,
    mirror: Arc<Mirror>,
}

impl std::fmt::Debug for Gallery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gallery")
            .field("store", &self.store.describe())
            .field("model", &self.mirror.model)
            .finish_non_exhaustive()
    }
}

fn check_embedding(e: &[f32], dim: usize) -> Result<()> {
    if e.len() != dim {
        return Err(GalleryError::Invalid(format!(
            "embedding has {} values, the model makes {dim}",
            e.len()
        )));
    }
    if !e.iter().all(|v| v.is_finite()) {
        return Err(GalleryError::Invalid(
            "embedding has a non-finite value".into(),
        ));
    }
    Ok(())
}

/// Checks identify's knobs; shared by the HTTP layer so both say the same.
pub fn check_search_params(top_k: usize, threshold: f32) -> Result<()> {
    if top_k == 0 || top_k > MAX_TOP_K {
        return Err(GalleryError::Invalid(format!(
            "top_k must be between 1 and {MAX_TOP_K}, got {top_k}"
        )));
    }
    check_threshold(threshold)
}

pub fn check_threshold(threshold: f32) -> Result<()> {
    if !threshold.is_finite() || !(-1.0..=1.0).contains(&threshold) {
        return Err(GalleryError::Invalid(format!(
            "threshold must be a cosine similarity in [-1, 1], got {threshold}"
        )));
    }
    Ok(())
}

fn log_loaded(store: &dyn Store, model_id: &str, report: &LoadReport) {
    tracing::info!(
        database = %store.describe(),
        model = model_id,
        subjects = report.subjects,
        faces = report.faces,
        faces_other_model = report.faces_other_model,
        load_ms = report.elapsed.as_millis() as u64,
        "gallery loaded"
    );
    if report.faces_other_model > 0 {
        tracing::warn!(
            faces_other_model = report.faces_other_model,
            model = model_id,
            "the gallery holds faces made by another model; they are kept but never searched \
             (re-enrol those subjects with this model to make them searchable)"
        );
    }
    if report.faces_malformed > 0 {
        tracing::warn!(
            faces_malformed = report.faces_malformed,
            "skipped faces whose stored embedding does not fit this model's size"
        );
    }
}

impl Gallery {
    /// Opens the configured backend, applies its migrations and loads the
    /// index of `model_id`'s faces (and, for PostgreSQL, starts following the
    /// change log). Call it at start-up, before serving.
    pub async fn connect(
        config: &GalleryConfig,
        model_id: &str,
        dim: usize,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Gallery> {
        match &config.database {
            Database::Sqlite(path) => {
                let (path, model_id) = (path.clone(), model_id.to_string());
                tokio::task::spawn_blocking(move || Gallery::open(&path, &model_id, dim, metrics))
                    .await
                    .map_err(|e| anyhow::anyhow!("gallery start-up panicked: {e}"))?
            }
            Database::Postgres(url) => {
                let mirror = Arc::new(Mirror::new(model_id, dim, metrics.clone())?);
                let (store, report) =
                    postgres::PgStore::connect(url, config, mirror.clone(), metrics).await?;
                log_loaded(&store, model_id, &report);
                Ok(Gallery {
                    store: Arc::new(store),
                    mirror,
                })
            }
        }
    }

    /// Opens a SQLite gallery file (creating file and folder if missing).
    /// Blocking.
    pub fn open(
        path: &Path,
        model_id: &str,
        dim: usize,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Gallery> {
        let mirror = Arc::new(Mirror::new(model_id, dim, metrics)?);
        let (store, report) = sqlite::SqliteStore::open(path, mirror.clone())?;
        log_loaded(&store, model_id, &report);
        Ok(Gallery {
            store: Arc::new(store),
            mirror,
        })
    }

    pub fn model_id(&self) -> &str {
        &self.mirror.model
    }

    pub fn dim(&self) -> usize {
        self.mirror.dim
    }

    /// Where the data lives (a path, or a URL without its password).
    pub fn describe(&self) -> String {
        self.store.describe()
    }

    /// Whether the backend can take writes now (`/readyz` answers 503 when not).
    pub fn available(&self) -> bool {
        self.store.available()
    }

    pub fn counts(&self) -> Counts {
        let idx = self.mirror.read();
        Counts {
            subjects: idx.subjects(),
            faces: idx.faces(),
            faces_other_model: self.mirror.faces_other_model(),
        }
    }

    /// Whether the subject exists; lets handlers refuse an unknown subject
    /// before spending a model run on its image (the write re-checks).
    pub fn has_subject(&self, id: &Uuid) -> bool {
        self.mirror.read().has_subject(id)
    }

    /// Like `has_subject`, but a subject this replica's index has not seen yet
    /// (just created on another replica, milliseconds ago) is looked up in the
    /// shared database, so create-on-A-then-enrol-on-B works behind a load
    /// balancer. Enrolment uses it before spending a model run on the image.
    pub async fn subject_exists(&self, id: &Uuid) -> Result<bool> {
        if self.has_subject(id) {
            return Ok(true);
        }
        if self.store.replication().is_none() {
            return Ok(false);
        }
        Ok(self.store.get_subject(*id).await?.is_some())
    }

    /// Order-independent digest of the indexed face ids (their wrapping sum
    /// as 128-bit integers, hex): equal on replicas holding the same faces, so
    /// operators and tests can compare replicas with each other and with the
    /// table without listing every face.
    pub fn faces_digest(&self) -> String {
        format!("{:032x}", self.mirror.read().faces_digest())
    }

    /// Replication state, for `/readyz` (PostgreSQL only).
    pub fn replication(&self) -> Option<replication::Status> {
        self.store.replication()
    }

    pub async fn create_subject(
        &self,
        name: String,
        metadata: Option<serde_json::Value>,
    ) -> Result<Subject> {
        let name = name.trim().to_string();
        if name.is_empty() {
            return Err(GalleryError::Invalid("name must not be empty".into()));
        }
        if name.chars().count() > MAX_NAME_CHARS {
            return Err(GalleryError::Invalid(format!(
                "name is longer than {MAX_NAME_CHARS} characters"
            )));
        }
        let metadata = match metadata {
            None | Some(serde_json::Value::Null) => serde_json::Value::Object(Default::default()),
            Some(v @ serde_json::Value::Object(_)) => v,
            Some(_) => {
                return Err(GalleryError::Invalid(
                    "metadata must be a JSON object".into(),
                ))
            }
        };
        let metadata = serde_json::to_string(&metadata).map_err(anyhow::Error::from)?;
        if metadata.len() > MAX_METADATA_BYTES {
            return Err(GalleryError::Invalid(format!(
                "metadata is {} bytes of JSON; the limit is {MAX_METADATA_BYTES}",
                metadata.len()
            )));
        }
        // Random v4 ids: replicas creating subjects at once never collide,
        // and the database's UNIQUE constraint would refuse it if they did.
        let id = Uuid::new_v4();
        self.store.create_subject(id, name, metadata).await
    }

    /// A page of subjects in creation order. `after` is the `next` cursor of
    /// the previous page.
    pub async fn list_subjects(
        &self,
        limit: Option<usize>,
        after: Option<String>,
    ) -> Result<SubjectPage> {
        let limit = limit.unwrap_or(DEFAULT_LIST_LIMIT);
        if limit == 0 || limit > MAX_LIST_LIMIT {
            return Err(GalleryError::Invalid(format!(
                "limit must be between 1 and {MAX_LIST_LIMIT}, got {limit}"
            )));
        }
        let after = match after.as_deref() {
            None | Some("") => 0,
            Some(c) => c
                .parse::<i64>()
                .ok()
                .filter(|v| *v >= 0)
                .ok_or_else(|| GalleryError::Invalid(format!("malformed cursor {c:?}")))?,
        };
        let (subjects, next) = self.store.list_subjects(limit, after).await?;
        Ok(SubjectPage {
            subjects,
            next: next.map(|n| n.to_string()),
        })
    }

    pub async fn get_subject(&self, id: Uuid) -> Result<SubjectDetail> {
        self.store
            .get_subject(id)
            .await?
            .ok_or_else(|| subject_not_found(&id))
    }

    pub async fn delete_subject(&self, id: Uuid) -> Result<()> {
        if self.store.delete_subject(id).await? {
            Ok(())
        } else {
            Err(subject_not_found(&id))
        }
    }

    /// Stores an embedding (made by the running model) under a subject and
    /// makes it searchable; returns the new face id.
    pub async fn add_face(&self, subject_id: Uuid, embedding: Vec<f32>) -> Result<Uuid> {
        check_embedding(&embedding, self.mirror.dim)?;
        let face_id = Uuid::new_v4();
        if self.store.add_face(face_id, subject_id, embedding).await? {
            Ok(face_id)
        } else {
            Err(subject_not_found(&subject_id))
        }
    }

    pub async fn delete_face(&self, subject_id: Uuid, face_id: Uuid) -> Result<()> {
        if self.store.delete_face(subject_id, face_id).await? {
            Ok(())
        } else {
            Err(GalleryError::NotFound(format!(
                "subject {subject_id} has no face {face_id}"
            )))
        }
    }

    /// Best similarity of `query` over the subject's searchable faces, and the
    /// face that gave it.
    pub async fn best_for_subject(&self, subject_id: Uuid, query: Vec<f32>) -> Result<(f32, Uuid)> {
        check_embedding(&query, self.mirror.dim)?;
        // A handful of dot products: cheaper than a hop to a blocking thread.
        let idx = self.mirror.read();
        let subject = idx
            .subject(&subject_id)
            .ok_or_else(|| subject_not_found(&subject_id))?;
        idx.best_for_subject(subject, &query).ok_or_else(|| {
            GalleryError::Invalid(format!(
                "subject {subject_id} has no face made by the running model ({}) to compare with",
                self.mirror.model
            ))
        })
    }

    /// Exact 1:N search: at most `top_k` subjects scoring at least `threshold`,
    /// best first.
    pub async fn identify(
        &self,
        query: Vec<f32>,
        top_k: usize,
        threshold: f32,
    ) -> Result<Identified> {
        check_embedding(&query, self.mirror.dim)?;
        check_search_params(top_k, threshold)?;
        // A large scan: off the async workers, on a snapshot with the lock
        // released, so enrolments and deletes are not held up for its length.
        let mirror = self.mirror.clone();
        tokio::task::spawn_blocking(move || {
            let snapshot = mirror.read().snapshot();
            let candidates = snapshot.search(&query, top_k, threshold);
            let matches = mirror
                .read()
                .resolve(candidates, top_k)
                .into_iter()
                .map(|h| Match {
                    subject_id: h.subject_id,
                    name: h.name,
                    similarity: h.similarity,
                    face_id: h.face_id,
                })
                .collect();
            Ok(Identified {
                matches,
                gallery_size: snapshot.searchable_subjects(),
            })
        })
        .await
        .map_err(|e| GalleryError::Internal(anyhow::anyhow!("search task failed: {e}")))?
    }

    /// Flushes and releases the backend (SQLite: checkpoints the WAL into
    /// the main file); later writes fail with `Closed`. Safe to call twice.
    pub async fn close(&self) -> Result<()> {
        self.store.close().await
    }
}

/// See [`Gallery::faces_digest`].
pub fn faces_digest<'a>(ids: impl Iterator<Item = &'a Uuid>) -> u128 {
    ids.fold(0u128, |acc, id| acc.wrapping_add(id.as_u128()))
}

fn subject_not_found(id: &Uuid) -> GalleryError {
    GalleryError::NotFound(format!("no subject with id {id}"))
}

#[cfg(test)]
mod tests;
