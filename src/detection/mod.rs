//! Face detection for whole photos: YuNet (box, score and 5 landmarks per face) on its own ONNX
//! Runtime sessions, and the choice of the face to embed.
//!
//! The detector sees every photo on a 640x640 canvas (its input shape is fixed): photos up to
//! 640 pixels a side at their own scale, larger ones shrunk to fit. Boxes and landmarks are
//! returned in the pixels of the photo as decoded (EXIF orientation applied).

pub mod align_dir;
pub mod backend;
pub mod yunet;

use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use image::RgbImage;
use serde::Serialize;
use utoipa::ToSchema;

use self::backend::{DetectorBackend, OrtDetector};
use crate::config::{DetectorConfig, EngineConfig};
use crate::error::{ApiError, ErrorKind};
use crate::imaging::{self, Landmarks};
use crate::metrics::Metrics;

/// Where dlib's five points (those of `../shared/lfw/landmarks.csv`, which the model's training
/// crops were aligned with) lie relative to YuNet's, on average, in 112x112 template pixels:
/// YuNet puts the right eye about 2 px further out and the nose lower. Measured on train photos
/// only (`tools/detector/reference.py offsets`, median over 1023). Moving YuNet's points by these
/// makes its crops more like the training crops: mean point error on held-out train photos 4.83
/// -> 4.50 px, mean cosine to the reference crop's embedding 0.9315 -> 0.9333 (513 photos).
const LANDMARK_OFFSETS: [[f64; 2]; 5] = [
    [0.05, 0.35],
    [-2.16, 0.46],
    [-0.62, -1.62],
    [-0.91, 1.07],
    [-1.41, 0.91],
];

/// The face's points moved by [`LANDMARK_OFFSETS`], taken from template into photo pixels
/// through the inverse of the face's own similarity to the template.
fn to_training_convention(mut face: Face) -> Face {
    let Some(m) = imaging::fit_similarity(&face.landmarks) else {
        return face;
    };
    // m = [a, -b, tx, b, a, ty]; the inverse of its linear part is [a, b; -b, a] / (a^2 + b^2).
    let (a, b) = (m[0], m[3]);
    let n = a * a + b * b;
    for (p, o) in face.landmarks.iter_mut().zip(&LANDMARK_OFFSETS) {
        p[0] += ((a * o[0] + b * o[1]) / n) as f32;
        p[1] += ((-b * o[0] + a * o[1]) / n) as f32;
    }
    face
}

/// A face's box in photo pixels: top-left corner and size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, ToSchema)]
pub struct BoundingBox {
    pub x: f32,
    pub y: f32,
    pub width: f32,
    pub height: f32,
}

/// One detected face.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Face {
    #[serde(rename = "box")]
    pub bbox: BoundingBox,
    /// Detector confidence in [0, 1].
    pub score: f32,
    /// Left eye, right eye, nose tip, left and right mouth corner (left = as seen), in photo pixels.
    #[schema(value_type = Vec<Vec<f32>>)]
    pub landmarks: Landmarks,
}

impl Face {
    pub fn area(&self) -> f32 {
        self.bbox.width.max(0.0) * self.bbox.height.max(0.0)
    }

    pub fn eye_distance(&self) -> f32 {
        let [l, r] = [self.landmarks[0], self.landmarks[1]];
        (l[0] - r[0]).hypot(l[1] - r[1])
    }

    fn is_finite(&self) -> bool {
        let b = &self.bbox;
        [b.x, b.y, b.width, b.height, self.score]
            .iter()
            .chain(self.landmarks.iter().flatten())
            .all(|v| v.is_finite())
    }

    fn scaled(mut self, s: f32) -> Self {
        let b = &mut self.bbox;
        (b.x, b.y, b.width, b.height) = (b.x * s, b.y * s, b.width * s, b.height * s);
        for p in &mut self.landmarks {
            (p[0], p[1]) = (p[0] * s, p[1] * s);
        }
        self
    }
}

/// The face chosen in a photo, its aligned crop, and how many faces the photo held.
#[derive(Debug, Clone)]
pub struct Chosen {
    pub face: Face,
    pub faces_detected: usize,
    pub crop: RgbImage,
}

/// What to do when a photo holds more than one face.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Multiple {
    /// Use the largest (the default).
    #[default]
    Largest,
    /// Refuse with `multiple_faces`.
    Refuse,
}

pub struct Detector {
    /// Idle sessions; `Session::run` takes `&mut self`, so each call borrows one.
    idle: Mutex<Vec<Box<dyn DetectorBackend>>>,
    returned: Condvar,
    score_threshold: f32,
    min_eye_distance: f32,
    metrics: Arc<Metrics>,
}

impl Detector {
    /// Loads `--detector-sessions` sessions of the detector file.
    pub fn load(
        cfg: &DetectorConfig,
        engine: &EngineConfig,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        if !(0.0..=1.0).contains(&cfg.detector_score) {
            anyhow::bail!(
                "--detector-score must be in [0, 1], got {}",
                cfg.detector_score
            );
        }
        let backends = (0..cfg.detector_sessions.max(1))
            .map(|_| {
                OrtDetector::load(cfg, engine).map(|b| Box::new(b) as Box<dyn DetectorBackend>)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self::with_backends(backends, cfg, metrics))
    }

    pub fn with_backends(
        backends: Vec<Box<dyn DetectorBackend>>,
        cfg: &DetectorConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            idle: Mutex::new(backends),
            returned: Condvar::new(),
            score_threshold: cfg.detector_score,
            min_eye_distance: cfg.min_eye_distance,
            metrics,
        }
    }

    /// Smallest eye distance, in photo pixels, of a face that is recognised.
    pub fn min_eye_distance(&self) -> f32 {
        self.min_eye_distance
    }

    /// Every face in the photo, largest first, its landmarks in the convention of the model's
    /// training crops. Blocking: call it off the async runtime.
    pub fn detect(&self, img: &RgbImage) -> Result<Vec<Face>, ApiError> {
        Ok(self
            .detect_raw(img)?
            .into_iter()
            .map(to_training_convention)
            .collect())
    }

    /// Every face as the detector itself places it, largest first.
    pub fn detect_raw(&self, img: &RgbImage) -> Result<Vec<Face>, ApiError> {
        let start = Instant::now();
        let (input, back) = yunet::letterbox(img);
        let raw = self
            .with_backend(|b| b.run(&input))
            .map_err(ApiError::internal)?;
        let (w, h) = (img.width() as f32, img.height() as f32);
        let mut faces: Vec<Face> = yunet::decode(&raw, self.score_threshold)
            .into_iter()
            .map(|f| f.scaled(back))
            // Anchors over the black padding can fire on a photo's edge; a face must at least
            // centre inside the photo.
            .filter(|f| {
                let (cx, cy) = (
                    f.bbox.x + f.bbox.width / 2.0,
                    f.bbox.y + f.bbox.height / 2.0,
                );
                cx >= 0.0 && cy >= 0.0 && cx < w && cy < h
            })
            .collect();
        faces.sort_by(|a, b| b.area().total_cmp(&a.area()));
        self.metrics
            .detection_duration
            .observe(start.elapsed().as_secs_f64());
        self.metrics.faces_per_image.observe(faces.len() as f64);
        if faces.is_empty() {
            self.metrics.no_face.inc();
        }
        Ok(faces)
    }

    /// Detects, chooses the face to embed (the largest) and aligns it onto the 112x112 template.
    pub fn choose(&self, img: &RgbImage, multiple: Multiple) -> Result<Chosen, ApiError> {
        let faces = self.detect(img)?;
        choose(faces, img, multiple, self.min_eye_distance)
    }

    fn with_backend<R>(
        &self,
        f: impl FnOnce(&mut dyn DetectorBackend) -> anyhow::Result<R>,
    ) -> anyhow::Result<R> {
        let mut backend = {
            let mut idle = self
                .idle
                .lock()
                .map_err(|_| anyhow::anyhow!("detector pool poisoned"))?;
            loop {
                if let Some(b) = idle.pop() {
                    break b;
                }
                idle = self
                    .returned
                    .wait(idle)
                    .map_err(|_| anyhow::anyhow!("detector pool poisoned"))?;
            }
        };
        // A panic inside a run becomes this request's error and the session
        // goes back: otherwise each one would shrink the pool until every
        // request waited forever.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(backend.as_mut())))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the face detector panicked")));
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(backend);
            self.returned.notify_one();
        }
        result
    }
}

/// The choice itself: separate from the model so it is tested on made-up faces.
fn choose(
    faces: Vec<Face>,
    img: &RgbImage,
    multiple: Multiple,
    min_eye_distance: f32,
) -> Result<Chosen, ApiError> {
    let Some(face) = faces
        .iter()
        .max_by(|a, b| a.area().total_cmp(&b.area()))
        .cloned()
    else {
        return Err(ApiError::new(
            ErrorKind::NoFace,
            format!(
                "no face found in the {}x{} image",
                img.width(),
                img.height()
            ),
        ));
    };
    let eyes = face.eye_distance();
    if eyes < min_eye_distance {
        return Err(ApiError::new(
            ErrorKind::FaceTooSmall,
            format!(
                "the largest face's eyes are {eyes:.1} pixels apart; at least {min_eye_distance} are needed to recognise it"
            ),
        ));
    }
    let recognisable = faces
        .iter()
        .filter(|f| f.eye_distance() >= min_eye_distance)
        .count();
    if multiple == Multiple::Refuse && recognisable > 1 {
        return Err(ApiError::new(
            ErrorKind::MultipleFaces,
            format!("the image holds {recognisable} faces; send a photo of one person (or allow several faces: the largest is then used)"),
        ));
    }
    let crop = imaging::align(img, &face.landmarks).ok_or_else(|| {
        ApiError::new(
            ErrorKind::FaceTooSmall,
            "the detected landmarks are degenerate: no alignment maps them onto a face",
        )
    })?;
    Ok(Chosen {
        faces_detected: faces.len(),
        face,
        crop,
    })
}

#[cfg(test)]
mod tests;
