//! The in-memory index of one process, and the only way changes reach it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::index::Index;
use super::store::Change;
use crate::metrics::Metrics;

pub struct Mirror {
    index: RwLock<Index>,
    /// Stored faces of other models (reported, never searched).
    faces_other_model: AtomicU64,
    pub model: String,
    pub dim: usize,
    metrics: Arc<Metrics>,
}

impl Mirror {
    /// Fails (rather than panicking at start-up) when the index's spill file
    /// cannot be created in the temporary folder.
    pub fn new(model: &str, dim: usize, metrics: Arc<Metrics>) -> std::io::Result<Mirror> {
        Ok(Mirror {
            index: RwLock::new(Index::try_with_capacity(dim, 0, 0)?),
            faces_other_model: AtomicU64::new(0),
            model: model.to_string(),
            dim,
            metrics,
        })
    }

    // A poisoned lock means a panic elsewhere mid-read; index updates do not
    // panic between their steps, so carrying on beats failing every request.
    pub fn read(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn faces_other_model(&self) -> u64 {
        self.faces_other_model.load(Ordering::Relaxed)
    }

    /// Swaps in a freshly loaded index (start-up, or a replica that fell
    /// behind the pruned change log).
    pub fn replace(&self, index: Index, faces_other_model: u64) {
        let mut idx = self.write();
        *idx = index;
        self.faces_other_model
            .store(faces_other_model, Ordering::Relaxed);
        self.update_gauges(&idx);
    }

    pub fn set_faces_other_model(&self, n: u64) {
        self.faces_other_model.store(n, Ordering::Relaxed);
        self.update_gauges(&self.read());
    }

    /// Replays committed changes in commit order, under one write lock.
    pub fn apply(&self, changes: &[Change]) {
        if changes.is_empty() {
            return;
        }
        let mut idx = self.write();
        for change in changes {
            match change {
                Change::SubjectAdded { id, name } => idx.add_subject(*id, name.clone()),
                Change::SubjectDeleted {
                    id,
                    other_model_faces,
                } => {
                    idx.remove_subject(id);
                    if let Some(n) = other_model_faces {
                        self.sub_other(*n);
                    }
                }
                Change::FaceAdded {
                    face_id,
                    subject_id,
                    embedding,
                } => {
                    // Refused (false) for a subject deleted meanwhile: no orphan row.
                    idx.add_face(*face_id, subject_id, embedding);
                }
                Change::FaceDeleted {
                    face_id,
                    of_running_model: true,
                } => {
                    idx.remove_face(face_id);
                }
                Change::FaceDeleted {
                    of_running_model: false,
                    ..
                } => self.sub_other(1),
            }
        }
        self.update_gauges(&idx);
    }

    /// Saturating, so rows another process added behind our back can never
    /// wrap the count around when they are deleted through us.
    fn sub_other(&self, n: u64) {
        let _ = self
            .faces_other_model
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
    }

    fn update_gauges(&self, idx: &Index) {
        self.metrics.gallery_subjects.set(idx.subjects() as i64);
        self.metrics.gallery_faces.set(idx.faces() as i64);
        self.metrics
            .gallery_faces_other_model
            .set(self.faces_other_model() as i64);
    }
}
