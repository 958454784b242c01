//! The gallery: subjects and their face embeddings, stored in SQLite and
//! searched through an in-memory exact index.
//!
//! SQLite is the source of truth; the index mirrors the faces of the running
//! model. Every write commits to SQLite first and updates the index while
//! still holding the connection lock, so the two can never disagree about the
//! order of writes, and an answer is sent only after both.

pub mod index;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use rusqlite::Connection;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::{ApiError, ErrorKind};
use crate::metrics::Metrics;
use index::Index;
pub use store::LoadReport;

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
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<rusqlite::Error> for GalleryError {
    fn from(e: rusqlite::Error) -> Self {
        GalleryError::Internal(e.into())
    }
}

impl From<GalleryError> for ApiError {
    fn from(e: GalleryError) -> Self {
        match e {
            GalleryError::NotFound(m) => ApiError::not_found(m),
            GalleryError::Invalid(m) => ApiError::invalid(m),
            GalleryError::Closed => ApiError::new(ErrorKind::Unavailable, e.to_string()),
            GalleryError::Internal(e) => ApiError::internal(format!("gallery: {e:#}")),
        }
    }
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

struct Inner {
    /// `None` after `close()`.
    conn: Mutex<Option<Connection>>,
    index: RwLock<Index>,
    model: String,
    dim: usize,
    faces_other_model: AtomicU64,
    metrics: Arc<Metrics>,
    path: PathBuf,
}

/// Cheap to clone; all clones share one connection and one index.
#[derive(Clone)]
pub struct Gallery {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Gallery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gallery")
            .field("path", &self.inner.path)
            .field("model", &self.inner.model)
            .finish_non_exhaustive()
    }
}

// A poisoned lock means a panic happened mid-operation elsewhere. The SQLite
// connection rolls back an unfinished transaction by itself, and index updates
// do not panic between their steps, so carrying on beats failing every later
// request.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn read(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }
    fn write(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    fn update_gauges(&self, idx: &Index) {
        self.metrics.gallery_subjects.set(idx.subjects() as i64);
        self.metrics.gallery_faces.set(idx.faces() as i64);
        self.metrics
            .gallery_faces_other_model
            .set(self.faces_other_model.load(Ordering::Relaxed) as i64);
    }

    /// Saturating, so rows another process added behind our back can never
    /// wrap the count around when they are deleted through us.
    fn sub_other_model(&self, n: u64) {
        let _ = self
            .faces_other_model
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
    }

    /// Runs `f` with the connection (the one writer), failing if closed.
    fn with_conn<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let guard = lock(&self.conn);
        let conn = guard.as_ref().ok_or(GalleryError::Closed)?;
        f(conn)
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

impl Gallery {
    /// Opens the database (creating file and folder if missing), applies
    /// migrations and loads the index of `model_id`'s faces. Blocking: call it
    /// at start-up, before serving.
    pub fn open(
        path: &Path,
        model_id: &str,
        dim: usize,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Gallery> {
        let conn = store::open(path)?;
        let (index, report) = store::load_index(&conn, model_id, dim)?;
        tracing::info!(
            path = %path.display(),
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
        let inner = Inner {
            conn: Mutex::new(Some(conn)),
            index: RwLock::new(index),
            model: model_id.to_string(),
            dim,
            faces_other_model: AtomicU64::new(report.faces_other_model),
            metrics,
            path: path.to_path_buf(),
        };
        inner.update_gauges(&inner.read());
        Ok(Gallery {
            inner: Arc::new(inner),
        })
    }

    pub fn model_id(&self) -> &str {
        &self.inner.model
    }

    pub fn dim(&self) -> usize {
        self.inner.dim
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn counts(&self) -> Counts {
        let idx = self.inner.read();
        Counts {
            subjects: idx.subjects(),
            faces: idx.faces(),
            faces_other_model: self.inner.faces_other_model.load(Ordering::Relaxed),
        }
    }

    /// Whether the subject exists; lets handlers refuse an unknown subject
    /// before spending a model run on its image (the write re-checks in SQL).
    pub fn has_subject(&self, id: &Uuid) -> bool {
        self.inner.read().has_subject(id)
    }

    /// Runs blocking work (SQLite, a large scan) off the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| GalleryError::Internal(anyhow::anyhow!("gallery task failed: {e}")))?
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
        let id = Uuid::new_v4();
        self.blocking(move |inner| {
            inner.with_conn(|conn| {
                let subject = store::insert_subject(conn, &id, &name, &metadata)?;
                let mut idx = inner.write();
                idx.add_subject(id, name);
                inner.update_gauges(&idx);
                Ok(subject)
            })
        })
        .await
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
        self.blocking(move |inner| {
            inner.with_conn(|conn| {
                let (subjects, next) = store::list_subjects(conn, limit, after)?;
                Ok(SubjectPage {
                    subjects,
                    next: next.map(|n| n.to_string()),
                })
            })
        })
        .await
    }

    pub async fn get_subject(&self, id: Uuid) -> Result<SubjectDetail> {
        self.blocking(move |inner| {
            inner.with_conn(|conn| {
                store::get_subject(conn, &id)?.ok_or_else(|| subject_not_found(&id))
            })
        })
        .await
    }

    pub async fn delete_subject(&self, id: Uuid) -> Result<()> {
        self.blocking(move |inner| {
            inner.with_conn(|conn| {
                let other = store::delete_subject(conn, &id, &inner.model)?
                    .ok_or_else(|| subject_not_found(&id))?;
                let mut idx = inner.write();
                idx.remove_subject(&id);
                inner.sub_other_model(other);
                inner.update_gauges(&idx);
                Ok(())
            })
        })
        .await
    }

    /// Stores an embedding (made by the running model) under a subject and
    /// makes it searchable; returns the new face id.
    pub async fn add_face(&self, subject_id: Uuid, embedding: Vec<f32>) -> Result<Uuid> {
        check_embedding(&embedding, self.inner.dim)?;
        let face_id = Uuid::new_v4();
        self.blocking(move |inner| {
            inner.with_conn(|conn| {
                store::insert_face(conn, &face_id, &subject_id, &embedding, &inner.model)?
                    .ok_or_else(|| subject_not_found(&subject_id))?;
                let mut idx = inner.write();
                idx.add_face(face_id, &subject_id, &embedding);
                inner.update_gauges(&idx);
                Ok(face_id)
            })
        })
        .await
    }

    pub async fn delete_face(&self, subject_id: Uuid, face_id: Uuid) -> Result<()> {
        self.blocking(move |inner| {
            inner.with_conn(|conn| {
                let model = store::delete_face(conn, &subject_id, &face_id)?.ok_or_else(|| {
                    GalleryError::NotFound(format!("subject {subject_id} has no face {face_id}"))
                })?;
                let mut idx = inner.write();
                if model == inner.model {
                    idx.remove_face(&face_id);
                } else {
                    inner.sub_other_model(1);
                }
                inner.update_gauges(&idx);
                Ok(())
            })
        })
        .await
    }

    /// Best similarity of `query` over the subject's searchable faces, and the
    /// face that gave it.
    pub async fn best_for_subject(&self, subject_id: Uuid, query: Vec<f32>) -> Result<(f32, Uuid)> {
        check_embedding(&query, self.inner.dim)?;
        // A handful of dot products: cheaper than a hop to a blocking thread.
        let idx = self.inner.read();
        let subject = idx
            .subject(&subject_id)
            .ok_or_else(|| subject_not_found(&subject_id))?;
        idx.best_for_subject(subject, &query).ok_or_else(|| {
            GalleryError::Invalid(format!(
                "subject {subject_id} has no face made by the running model ({}) to compare with",
                self.inner.model
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
        check_embedding(&query, self.inner.dim)?;
        check_search_params(top_k, threshold)?;
        self.blocking(move |inner| {
            // The scan runs on a snapshot with the lock released, so enrolments
            // and deletes are not held up for the length of a search.
            let snapshot = inner.read().snapshot();
            let candidates = snapshot.search(&query, top_k, threshold);
            let matches = inner
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
    }

    /// Checkpoints the WAL into the main file and closes the connection; later
    /// writes fail with `Closed`. Safe to call more than once.
    pub async fn close(&self) -> Result<()> {
        self.blocking(|inner| {
            let mut guard = lock(&inner.conn);
            if let Some(conn) = guard.take() {
                store::checkpoint(&conn)?;
                conn.close().map_err(|(_, e)| GalleryError::from(e))?;
                tracing::info!(path = %inner.path.display(), "gallery closed");
            }
            Ok(())
        })
        .await
    }
}

fn subject_not_found(id: &Uuid) -> GalleryError {
    GalleryError::NotFound(format!("no subject with id {id}"))
}

#[cfg(test)]
mod tests;
