//! The one storage trait the gallery talks to, and the changes a backend
//! reports so every replica's in-memory index ends up the same.
//!
//! Two implementations: [`super::sqlite`] (one process, one file: the embedded
//! default) and [`super::postgres`] (many replicas on one server, kept in step
//! through a change log). Handlers and the index never know which one runs.

use async_trait::async_trait;
use uuid::Uuid;

use super::{Result, Subject, SubjectDetail};

/// One committed write, as the index must replay it. Every backend applies
/// its own writes through this type, and PostgreSQL replicas apply each
/// other's from the change log, so there is one code path into the index.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    SubjectAdded {
        id: Uuid,
        name: String,
    },
    /// Its faces go too. `other_model_faces`: how many of them were of another
    /// model, when the backend knows (else the count is re-read).
    SubjectDeleted {
        id: Uuid,
        other_model_faces: Option<u64>,
    },
    /// A face of the running model (the only kind this service writes).
    FaceAdded {
        face_id: Uuid,
        subject_id: Uuid,
        embedding: Vec<f32>,
    },
    FaceDeleted {
        face_id: Uuid,
        of_running_model: bool,
    },
}

/// Durable storage of subjects and faces. A write returns only after it is
/// committed AND visible in this process's index (so a client that got a 201
/// finds its face on the same replica at once); other replicas see it through
/// the backend's own replication, if any.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Where the data lives, for logs; never contains a password.
    fn describe(&self) -> String;

    /// Whether the backend can serve writes now (`/readyz`).
    fn available(&self) -> bool {
        true
    }

    /// Replication state, for backends that replicate.
    fn replication(&self) -> Option<super::replication::Status> {
        None
    }

    async fn create_subject(&self, id: Uuid, name: String, metadata: String) -> Result<Subject>;

    /// Subjects in creation order after cursor `after`, and the next cursor.
    async fn list_subjects(&self, limit: usize, after: i64) -> Result<(Vec<Subject>, Option<i64>)>;

    async fn get_subject(&self, id: Uuid) -> Result<Option<SubjectDetail>>;

    /// `false` when there was no such subject.
    async fn delete_subject(&self, id: Uuid) -> Result<bool>;

    /// `false` when the subject does not exist (any more).
    async fn add_face(&self, face_id: Uuid, subject_id: Uuid, embedding: Vec<f32>) -> Result<bool>;

    /// `false` when the subject has no such face.
    async fn delete_face(&self, subject_id: Uuid, face_id: Uuid) -> Result<bool>;

    /// Flushes and releases the backend; later calls fail with `Closed`.
    async fn close(&self) -> Result<()>;
}
