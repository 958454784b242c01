//! The detector model behind a synchronous trait, like the embedding model's
//! (`engine::backend`): its own ONNX Runtime sessions, the same environment and provider.

use anyhow::{anyhow, bail};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::TensorRef;

use super::yunet::{output_names, Head, RawOutputs, SIDE, STRIDES};
use crate::config::{DetectorConfig, EngineConfig};
use crate::engine::backend::{environment, register_provider};

/// Runs the detector on one 640x640 BGR CHW input.
pub trait DetectorBackend: Send + 'static {
    fn run(&mut self, input: &[f32]) -> anyhow::Result<RawOutputs>;
}

pub struct OrtDetector {
    session: Session,
}

impl OrtDetector {
    pub fn load(cfg: &DetectorConfig, engine: &EngineConfig) -> anyhow::Result<Self> {
        let env = environment(&engine.ort_dylib)?;
        if !cfg.detector.is_file() {
            bail!(
                "face detector not found at {} (run `make detector` to fetch it, or set --detector / MOBIFACE_DETECTOR)",
                cfg.detector.display()
            );
        }
        let mut builder = Session::builder(env)
            .map_err(|e| anyhow!("{e}"))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| anyhow!("{e}"))?
            .with_intra_threads(cfg.detector_intra_threads.max(1))
            .map_err(|e| anyhow!("{e}"))?;
        builder = register_provider(builder, engine)?;
        let session = builder
            .commit_from_file(&cfg.detector)
            .map_err(|e| anyhow!("cannot load detector {}: {e}", cfg.detector.display()))?;
        let has_input = session.inputs().iter().any(|i| i.name() == "input");
        let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        let missing: Vec<String> = STRIDES
            .iter()
            .flat_map(|&s| output_names(s))
            .filter(|n| !outputs.contains(&n.as_str()))
            .collect();
        if !has_input || !missing.is_empty() {
            bail!(
                "{} is not a YuNet detector: needs an input `input` and outputs cls/obj/bbox/kps_{{8,16,32}} (missing {missing:?})",
                cfg.detector.display()
            );
        }
        Ok(Self { session })
    }
}

impl DetectorBackend for OrtDetector {
    fn run(&mut self, input: &[f32]) -> anyhow::Result<RawOutputs> {
        let tensor = TensorRef::from_array_view(([1, 3, SIDE, SIDE], input))?;
        let outputs = self.session.run(ort::inputs!["input" => tensor])?;
        let mut raw = RawOutputs::default();
        for &stride in &STRIDES {
            let anchors = (SIDE / stride) * (SIDE / stride);
            let [cls, obj, bbox, kps] = output_names(stride).map(|name| {
                outputs[name.as_str()]
                    .try_extract_tensor::<f32>()
                    .map(|(_, data)| data.to_vec())
            });
            let head = Head {
                cls: cls?,
                obj: obj?,
                bbox: bbox?,
                kps: kps?,
            };
            if head.cls.len() != anchors
                || head.obj.len() != anchors
                || head.bbox.len() != 4 * anchors
                || head.kps.len() != 10 * anchors
            {
                bail!("detector head {stride} returned tensors of unexpected sizes");
            }
            raw.heads.push(head);
        }
        Ok(raw)
    }
}
