//! The inference engine: MobiFace on ONNX Runtime, on dedicated OS threads
//! behind a batching queue, with flip-averaging.

pub mod backend;
pub mod batcher;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use image::RgbImage;
use serde::Serialize;
use tokio::sync::oneshot;
use utoipa::ToSchema;

use self::backend::{Backend, OrtBackend, IMAGE_LEN, INPUT_SIDE};
use self::batcher::{BatchConfig, BatchStats, Job, Queue};
use crate::config::EngineConfig;
use crate::error::{ApiError, ErrorKind};
use crate::metrics::Metrics;

/// What the model file says about itself (ONNX metadata `mobiface.*`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    pub dim: usize,
    /// False for seeded random weights: such a model verifies nothing.
    pub trained: bool,
    pub head: String,
    /// Calibrated best-accuracy threshold on cosine similarity.
    pub threshold: f32,
    pub threshold_far_1e2: Option<f32>,
    pub threshold_far_1e3: Option<f32>,
    /// Terms the weights carry from their training data (e.g. non-commercial use only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub licence: Option<String>,
    #[serde(skip)]
    pub input_mean: f32,
    #[serde(skip)]
    pub input_scale: f32,
}

impl ModelInfo {
    fn from_session(session: &ort::session::Session) -> anyhow::Result<Self> {
        let meta = session.metadata().map_err(|e| anyhow!("{e}"))?;
        let get = |key: &str| meta.custom(&format!("mobiface.{key}"));
        let require =
            |key: &str| get(key).ok_or_else(|| anyhow!("missing metadata key mobiface.{key}"));
        let number = |key: &str| -> anyhow::Result<f32> {
            let raw = require(key)?;
            let v: f32 = raw
                .trim()
                .parse()
                .with_context(|| format!("mobiface.{key} = {raw:?} is not a number"))?;
            if !v.is_finite() {
                bail!("mobiface.{key} is not finite");
            }
            Ok(v)
        };
        let optional = |key: &str| -> anyhow::Result<Option<f32>> {
            if get(key).is_some() {
                number(key).map(Some)
            } else {
                Ok(None)
            }
        };
        let info = Self {
            name: require("name")?,
            version: require("version")?,
            dim: require("embedding_dim")?
                .trim()
                .parse()
                .context("mobiface.embedding_dim")?,
            trained: get("trained").is_some_and(|v| v.trim() == "true"),
            head: get("head").unwrap_or_else(|| "unknown".into()),
            threshold: number("threshold")?,
            threshold_far_1e2: optional("threshold_far_1e-2")?,
            threshold_far_1e3: optional("threshold_far_1e-3")?,
            licence: get("licence"),
            input_mean: number("input_mean")?,
            input_scale: number("input_scale")?,
        };
        if info.dim == 0 || info.input_scale == 0.0 {
            bail!("mobiface.embedding_dim and mobiface.input_scale must be non-zero");
        }
        Ok(info)
    }

    /// Tag stored with every face: faces of another model are never compared.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

/// Snapshot of the batcher's counters.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct EngineStats {
    pub runs: u64,
    pub images: u64,
    pub largest_run: u64,
    pub merged_runs: u64,
    pub abandoned: u64,
}

struct Inner {
    info: ModelInfo,
    queue: Arc<Queue>,
    stats: Arc<BatchStats>,
    metrics: Arc<Metrics>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Workers finish what they hold and exit once the queue is closed.
        self.queue.close();
    }
}

/// Cheap to clone handle to the inference workers.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Loads one session per worker, runs a warm-up batch on each, and starts
    /// the worker threads. Any failure (library, model, provider) is returned,
    /// never papered over with a fallback.
    pub fn start(cfg: &EngineConfig, metrics: Arc<Metrics>) -> anyhow::Result<Engine> {
        let workers = cfg.workers.max(1);
        let batch = BatchConfig {
            max_batch: cfg.max_batch(),
            max_delay: Duration::from_micros(cfg.max_batch_delay_us),
        };
        let queue = Arc::new(Queue::new(cfg.queue_capacity, metrics.clone()));
        let stats = Arc::new(BatchStats::default());
        let mut info = None;
        for i in 0..workers {
            let (mut backend, model) = OrtBackend::load(cfg)?;
            // Warm-up: the first run allocates and plans; readiness waits for it.
            let warm = vec![0.0f32; 2 * IMAGE_LEN];
            backend.run(&warm, 2).context("warm-up inference failed")?;
            let (q, m, s) = (queue.clone(), metrics.clone(), stats.clone());
            let dim = model.dim;
            std::thread::Builder::new()
                .name(format!("inference-{i}"))
                .spawn(move || batcher::worker_loop(backend, q, batch, dim, m, s))
                .context("cannot spawn an inference thread")?;
            info = Some(model);
        }
        let info = info.ok_or_else(|| anyhow!("no inference worker started"))?;
        Ok(Engine {
            inner: Arc::new(Inner {
                info,
                queue,
                stats,
                metrics,
            }),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.inner.info
    }

    pub fn stats(&self) -> EngineStats {
        let s = &self.inner.stats;
        EngineStats {
            runs: s.runs.load(Ordering::Relaxed),
            images: s.images.load(Ordering::Relaxed),
            largest_run: s.largest_run.load(Ordering::Relaxed),
            merged_runs: s.merged_runs.load(Ordering::Relaxed),
            abandoned: s.abandoned.load(Ordering::Relaxed),
        }
    }

    /// Embeds 112x112 faces: one L2-normalised vector per face. With `flip`,
    /// each face runs beside its mirror (in one batch, unless idle workers take
    /// one each) and the two raw features are averaged before normalising
    /// (Flipped-MobiFace).
    pub async fn embed(&self, faces: Vec<RgbImage>, flip: bool) -> Result<Vec<Vec<f32>>, ApiError> {
        if faces.is_empty() {
            return Ok(Vec::new());
        }
        let info = &self.inner.info;
        let copies = if flip { 2 } else { 1 };
        let images = faces.len() * copies;
        let mut input = vec![0.0f32; images * IMAGE_LEN];
        for (i, face) in faces.iter().enumerate() {
            if face.dimensions() != (INPUT_SIDE as u32, INPUT_SIDE as u32) {
                return Err(ApiError::internal(format!(
                    "face {i} is {:?}, not 112x112",
                    face.dimensions()
                )));
            }
            let base = i * copies * IMAGE_LEN;
            write_tensor(face, false, info, &mut input[base..base + IMAGE_LEN]);
            if flip {
                write_tensor(
                    face,
                    true,
                    info,
                    &mut input[base + IMAGE_LEN..base + 2 * IMAGE_LEN],
                );
            }
        }
        // Cut into contiguous runs of images: the answers concatenate back in order.
        let parts = self.inner.queue.spread(images);
        let per = images.div_ceil(parts);
        let mut replies = Vec::with_capacity(parts);
        let chunks = if parts == 1 {
            vec![input]
        } else {
            input.chunks(per * IMAGE_LEN).map(<[f32]>::to_vec).collect()
        };
        for chunk in chunks {
            let (tx, rx) = oneshot::channel();
            self.inner.queue.push(Job {
                images: chunk.len() / IMAGE_LEN,
                input: chunk,
                enqueued: Instant::now(),
                reply: tx,
                span: tracing::Span::current(),
            })?;
            replies.push(rx);
        }
        let mut raw = Vec::with_capacity(images * info.dim);
        for rx in replies {
            raw.extend(rx.await.map_err(|_| {
                ApiError::new(ErrorKind::Unavailable, "the inference engine stopped")
            })??);
        }
        self.inner.metrics.faces_embedded.inc_by(faces.len() as u64);
        Ok(raw
            .chunks_exact(info.dim * copies)
            .map(|group| average_and_normalise(group, info.dim))
            .collect())
    }
}

/// Writes one face as CHW floats, normalised as the model metadata says, optionally mirrored.
fn write_tensor(face: &RgbImage, mirror: bool, info: &ModelInfo, out: &mut [f32]) {
    let plane = INPUT_SIDE * INPUT_SIDE;
    let inv = 1.0 / info.input_scale;
    for (x, y, px) in face.enumerate_pixels() {
        let (x, y) = (x as usize, y as usize);
        let col = if mirror { INPUT_SIDE - 1 - x } else { x };
        let idx = y * INPUT_SIDE + col;
        for c in 0..3 {
            out[c * plane + idx] = (f32::from(px[c]) - info.input_mean) * inv;
        }
    }
}

/// Mean of the `group.len() / dim` feature vectors, then L2-normalised.
fn average_and_normalise(group: &[f32], dim: usize) -> Vec<f32> {
    let mut v = group[..dim].to_vec();
    for other in group[dim..].chunks_exact(dim) {
        for (a, b) in v.iter_mut().zip(other) {
            *a += b;
        }
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averaging_is_the_normalised_mean() {
        let v = average_and_normalise(&[3.0, 0.0, 1.0, 4.0], 2);
        let n = (16.0f32 + 16.0).sqrt();
        assert!((v[0] - 4.0 / n).abs() < 1e-6 && (v[1] - 4.0 / n).abs() < 1e-6);
    }

    #[test]
    fn mirrored_tensor_is_the_horizontal_flip() {
        let info = ModelInfo {
            name: "t".into(),
            version: "0".into(),
            dim: 2,
            trained: false,
            head: "gdc".into(),
            threshold: 0.5,
            threshold_far_1e2: None,
            threshold_far_1e3: None,
            licence: None,
            input_mean: 127.5,
            input_scale: 128.0,
        };
        let face = RgbImage::from_fn(112, 112, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut plain = vec![0.0; IMAGE_LEN];
        let mut flipped = vec![0.0; IMAGE_LEN];
        write_tensor(&face, false, &info, &mut plain);
        write_tensor(&face, true, &info, &mut flipped);
        let at = |t: &[f32], c: usize, y: usize, x: usize| t[c * 112 * 112 + y * 112 + x];
        assert_eq!(at(&plain, 0, 5, 10), (10.0 - 127.5) / 128.0);
        assert_eq!(at(&flipped, 0, 5, 101), at(&plain, 0, 5, 10));
        assert_eq!(at(&plain, 1, 9, 3), (9.0 - 127.5) / 128.0);
        assert_eq!(at(&flipped, 2, 0, 0), (7.0 - 127.5) / 128.0);
    }
}
