//! The model behind a synchronous trait, so the batcher can be tested with a
//! fake and the real ONNX Runtime session stays on its own OS thread.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context};
use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::TensorRef;

use super::ModelInfo;
use crate::config::{EngineConfig, Provider};

/// Side of the square RGB input the model takes.
pub const INPUT_SIDE: usize = 112;
/// Floats in one preprocessed image (3 x 112 x 112, CHW).
pub const IMAGE_LEN: usize = 3 * INPUT_SIDE * INPUT_SIDE;

/// Runs the model on `n` preprocessed images laid out contiguously (NCHW) and
/// returns `n * dim` raw (unnormalised) features.
pub trait Backend: Send + 'static {
    fn run(&mut self, input: &[f32], n: usize) -> anyhow::Result<Vec<f32>>;
}

/// ONNX Runtime allows one environment per process; tests start several
/// engines in one process, so the first one's environment is kept for all.
static ORT_ENV: OnceLock<Environment> = OnceLock::new();

pub(crate) fn environment(dylib: &Path) -> anyhow::Result<&'static Environment> {
    if let Some(env) = ORT_ENV.get() {
        return Ok(env);
    }
    if !dylib.is_file() {
        bail!(
            "ONNX Runtime library not found at {} (run `make ort` to fetch it, or set ORT_DYLIB_PATH)",
            dylib.display()
        );
    }
    let env = ort::init_from(dylib)
        .map_err(|e| anyhow!("cannot load ONNX Runtime from {}: {e}", dylib.display()))?
        .with_name("mobiface")
        .build()
        .map_err(|e| anyhow!("cannot create the ONNX Runtime environment: {e}"))?;
    // A concurrent first start may have won the race; either environment is the process's one.
    Ok(ORT_ENV.get_or_init(|| env))
}

pub struct OrtBackend {
    session: Session,
    dim: usize,
}

impl OrtBackend {
    /// Loads one session. Each inference worker owns one, since `Session::run` takes `&mut self`.
    pub fn load(cfg: &EngineConfig) -> anyhow::Result<(Self, ModelInfo)> {
        let env = environment(&cfg.ort_dylib)?;
        if !cfg.model.is_file() {
            bail!("model file not found: {}", cfg.model.display());
        }
        let mut builder = Session::builder(env)
            .map_err(|e| anyhow!("{e}"))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| anyhow!("{e}"))?;
        if cfg.intra_threads > 0 {
            builder = builder
                .with_intra_threads(cfg.intra_threads)
                .map_err(|e| anyhow!("{e}"))?;
        }
        builder = register_provider(builder, cfg)?;
        let session = builder
            .commit_from_file(&cfg.model)
            .map_err(|e| anyhow!("cannot load model {}: {e}", cfg.model.display()))?;

        let info = ModelInfo::from_session(&session).with_context(|| {
            format!(
                "model {} lacks the metadata the service needs",
                cfg.model.display()
            )
        })?;
        let input_ok = session.inputs().iter().any(|i| i.name() == "input");
        let output_ok = session.outputs().iter().any(|o| o.name() == "embedding");
        if !input_ok || !output_ok {
            bail!("model must have an input named `input` and an output named `embedding`");
        }
        let dim = info.dim;
        Ok((Self { session, dim }, info))
    }
}

pub(crate) fn register_provider(
    builder: ort::session::builder::SessionBuilder,
    cfg: &EngineConfig,
) -> anyhow::Result<ort::session::builder::SessionBuilder> {
    match cfg.provider {
        Provider::Cpu => Ok(builder),
        #[cfg(feature = "cuda")]
        Provider::Cuda => {
            let ep = ort::ep::CUDA::default().with_device_id(cfg.device_id).build().error_on_failure();
            builder
                .with_execution_providers([ep])
                .map_err(|e| anyhow!("cannot register the CUDA execution provider: {e}"))
        }
        #[cfg(feature = "coreml")]
        Provider::Coreml => {
            let ep = ort::ep::CoreML::default().build().error_on_failure();
            builder
                .with_execution_providers([ep])
                .map_err(|e| anyhow!("cannot register the CoreML execution provider: {e}"))
        }
        #[allow(unreachable_patterns)]
        other => bail!(
            "execution provider `{other}` is not compiled into this build; rebuild with `--features {other}`"
        ),
    }
}

impl Backend for OrtBackend {
    fn run(&mut self, input: &[f32], n: usize) -> anyhow::Result<Vec<f32>> {
        let tensor = TensorRef::from_array_view(([n, 3, INPUT_SIDE, INPUT_SIDE], input))?;
        let outputs = self.session.run(ort::inputs!["input" => tensor])?;
        let (shape, data) = outputs["embedding"].try_extract_tensor::<f32>()?;
        if shape.len() != 2 || shape[0] as usize != n || shape[1] as usize != self.dim {
            bail!(
                "model returned shape {shape:?}, expected [{n}, {}]",
                self.dim
            );
        }
        Ok(data.to_vec())
    }
}
