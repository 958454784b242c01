//! `mobiface eval`: LFW-protocol verification metrics through the service's
//! own preprocessing and inference engine, so the figures describe what the
//! service does, not what a separate script does.

pub mod metrics;
pub mod pairs;
pub mod roc;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{ArgAction, Args};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use self::metrics::{CrossValidation, Eer, Scored, TarAtFar, ThresholdChoice};
use self::pairs::{ImageRef, PairsFile};
use crate::api::input::{prepare_image, FaceOptions};
use crate::config::{DetectorConfig, EngineConfig};
use crate::detection::Detector;
use crate::engine::Engine;
use crate::error::ErrorKind;
use crate::imaging::{self, DecodeLimits};
use crate::metrics::Metrics;

/// The FAR operating points reported (and stored in the model metadata).
pub const TARGET_FARS: [f64; 2] = [1e-2, 1e-3];

/// Everything `mobiface eval` takes.
#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// Pairs file in the standard LFW format (`folds<TAB>n` header, then per
    /// fold n matched and n mismatched lines), e.g. ../shared/lfw/pairs-eval.txt.
    #[arg(long)]
    pub pairs: PathBuf,
    /// Folder of `<name>/<name>_<i:04>.jpg` images. 112x112 images are taken
    /// as aligned crops; in any other photo the face is detected and aligned, as the service
    /// does with a photo sent without landmarks.
    #[arg(long)]
    pub images: PathBuf,
    /// Flip-averaging: embed each face and its mirror, average the features.
    #[arg(long, default_value_t = true, action = ArgAction::Set, value_name = "true|false")]
    pub flip: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Draw the ROC curve (log FAR axis) into this PNG file.
    #[arg(long, value_name = "PATH.png")]
    pub roc: Option<PathBuf>,
    /// Write every pair's score as TSV (fold, same, score, image a, image b).
    #[arg(long, value_name = "PATH.tsv")]
    pub scores: Option<PathBuf>,
    #[command(flatten)]
    pub engine: EngineConfig,
    #[command(flatten)]
    pub detection: DetectorConfig,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    pub id: String,
    pub trained: bool,
    pub head: String,
    pub dim: usize,
    /// `mobiface.threshold` from the model file.
    pub threshold: f32,
}

/// The whole result; `--json` prints exactly this.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub model: ModelSummary,
    pub flip: bool,
    pub pairs_file: String,
    pub images_dir: String,
    pub folds: usize,
    pub pairs: usize,
    pub matched: usize,
    pub mismatched: usize,
    pub images: usize,
    /// Photos in which no usable face was found (`no_face` or `face_too_small` from the
    /// service); every pair with one of them is scored -1, a certain non-match.
    pub images_without_face: usize,
    pub pairs_without_face: usize,
    #[serde(flatten)]
    pub figures: Figures,
    /// Wall time spent reading, decoding and embedding the images.
    pub embed_seconds: f64,
}

/// The metrics of a report, computed from scored pairs alone.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    /// k-fold cross-validated accuracy; absent for a one-fold file.
    pub accuracy: Option<CrossValidation>,
    pub auc: f64,
    pub eer: Option<Eer>,
    pub tar_at_far: Vec<TarAtFar>,
    /// The accuracy-maximising threshold over all pairs (not cross-validated).
    pub best: ThresholdChoice,
    /// Accuracy over all pairs at the model's own `mobiface.threshold`.
    pub accuracy_at_model_threshold: f64,
}

/// Every distinct image once, with the first line that names it (for errors).
struct Images {
    refs: Vec<(ImageRef, usize)>,
    /// Per pair: indices of its two images in `refs`.
    pair_index: Vec<(usize, usize)>,
}

fn distinct_images(file: &PairsFile) -> Images {
    let mut seen: HashMap<ImageRef, usize> = HashMap::new();
    let mut refs = Vec::new();
    let mut index = |r: &ImageRef, line: usize| -> usize {
        *seen.entry(r.clone()).or_insert_with(|| {
            refs.push((r.clone(), line));
            refs.len() - 1
        })
    };
    let pair_index = file
        .pairs
        .iter()
        .map(|p| (index(&p.a, p.line), index(&p.b, p.line)))
        .collect();
    Images { refs, pair_index }
}

/// Cosine similarity, in f64 so that nothing depends on summation order in f32.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    dot / (na.sqrt() * nb.sqrt())
}

/// Generous limits: eval reads local files the operator chose, but a stray
/// huge file should still fail cleanly rather than exhaust memory.
const EVAL_DECODE_LIMITS: DecodeLimits = DecodeLimits {
    max_side: 8192,
    max_decoded_bytes: 256 * 1024 * 1024,
};

/// The face the service would embed for this photo; None when it would answer 422 for want of
/// a usable face.
fn load_face(
    path: &Path,
    line: usize,
    detector: &Detector,
) -> anyhow::Result<Option<image::RgbImage>> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("reading {} (pairs line {line})", path.display()))?;
    let img = imaging::decode(&bytes, &EVAL_DECODE_LIMITS)
        .with_context(|| format!("decoding {} (pairs line {line})", path.display()))?;
    match prepare_image(&img, None, FaceOptions::default(), detector) {
        Ok(p) => Ok(Some(p.crop)),
        Err(e) if matches!(e.kind, ErrorKind::NoFace | ErrorKind::FaceTooSmall) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("{} (pairs line {line})", path.display())),
    }
}

/// Embeds the images in chunks of about one model run each, keeping every
/// inference worker busy while the next chunk is decoded.
async fn embed_all(
    engine: &Engine,
    detector: &Detector,
    cfg: &EngineConfig,
    root: &Path,
    refs: &[(ImageRef, usize)],
    flip: bool,
) -> anyhow::Result<Vec<Option<Vec<f32>>>> {
    let copies = if flip { 2 } else { 1 };
    let chunk = (cfg.max_batch() / copies).max(1);
    let in_flight = (cfg.workers.max(1) + 1).min(cfg.queue_capacity.max(1));
    let chunks: Vec<Vec<Item>> = refs
        .chunks(chunk)
        .map(|c| {
            c.iter()
                .map(|(r, line)| Item {
                    path: r.path(root),
                    line: *line,
                })
                .collect()
        })
        .collect();
    let total = refs.len();
    let mut done = 0usize;
    let results: Vec<Vec<Option<Vec<f32>>>> = futures::stream::iter(chunks)
        .map(|items| {
            let faces: anyhow::Result<Vec<Option<image::RgbImage>>> = items
                .iter()
                .map(|it| load_face(&it.path, it.line, detector))
                .collect();
            async move {
                let faces = faces?;
                let found: Vec<image::RgbImage> = faces.iter().flatten().cloned().collect();
                let n = found.len();
                let mut out = if n == 0 {
                    Vec::new()
                } else {
                    engine.embed(found, flip).await.with_context(|| {
                        format!(
                            "embedding {} (and the rest of its chunk)",
                            items[0].path.display()
                        )
                    })?
                };
                if out.len() != n {
                    bail!("the engine returned {} embeddings for {n} faces", out.len());
                }
                // Back into photo order, None where no face was found.
                out.reverse();
                Ok::<Vec<Option<Vec<f32>>>, anyhow::Error>(
                    faces
                        .iter()
                        .map(|f| f.as_ref().and_then(|_| out.pop()))
                        .collect(),
                )
            }
        })
        .buffered(in_flight)
        .inspect_ok(|out: &Vec<Option<Vec<f32>>>| {
            // A full run takes minutes on a small CPU: say how far it is, about every 10%.
            let before = done;
            done += out.len();
            if done * 10 / total.max(1) > before * 10 / total.max(1) {
                eprintln!("mobiface eval: embedded {done}/{total} images");
            }
        })
        .try_collect()
        .await?;
    Ok(results.into_iter().flatten().collect())
}

struct Item {
    path: PathBuf,
    line: usize,
}

/// Fails before the model is loaded if any image is missing, listing a few.
fn check_files_exist(root: &Path, refs: &[(ImageRef, usize)]) -> anyhow::Result<()> {
    let missing: Vec<String> = refs
        .iter()
        .filter(|(r, _)| !r.path(root).is_file())
        .map(|(r, line)| format!("{} (pairs line {line})", r.path(root).display()))
        .collect();
    if !missing.is_empty() {
        let shown = missing
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        bail!(
            "{} of {} images are missing under {}: {shown}{}",
            missing.len(),
            refs.len(),
            root.display(),
            if missing.len() > 5 { ", ..." } else { "" }
        );
    }
    Ok(())
}

/// Every metric of the report from the scored pairs.
pub fn evaluate(
    scored: &[Scored],
    fold_of: &[usize],
    folds: usize,
    model_threshold: f64,
) -> anyhow::Result<Figures> {
    metrics::validate(scored)?;
    let accuracy = if folds >= 2 {
        Some(metrics::cross_validate(scored, fold_of, folds)?)
    } else {
        None
    };
    let auc = metrics::roc_auc(scored)?;
    let roc = metrics::roc_curve(scored)?;
    let eer = metrics::eer(&roc);
    let mismatched = scored.iter().filter(|s| !s.same).count();
    let tar_at_far = TARGET_FARS
        .iter()
        .filter_map(|&f| metrics::tar_at_far(&roc, f, mismatched))
        .collect();
    Ok(Figures {
        accuracy,
        auc,
        eer,
        tar_at_far,
        best: metrics::best_threshold(scored)?,
        accuracy_at_model_threshold: metrics::accuracy_at(scored, model_threshold),
    })
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.pairs)
        .with_context(|| format!("reading the pairs file {}", args.pairs.display()))?;
    let file = pairs::parse(&text).with_context(|| format!("{}", args.pairs.display()))?;
    let images = distinct_images(&file);
    check_files_exist(&args.images, &images.refs)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let metrics = Arc::new(Metrics::new());
    let engine =
        Engine::start(&args.engine, metrics.clone()).context("starting the inference engine")?;
    let detector = Detector::load(&args.detection, &args.engine, metrics)
        .context("loading the face detector")?;
    let info = engine.info().clone();
    eprintln!(
        "mobiface eval: {} pairs, {} images, model {} (trained: {}), flip {}",
        file.pairs.len(),
        images.refs.len(),
        info.id(),
        info.trained,
        if args.flip { "on" } else { "off" }
    );
    let started = Instant::now();
    let embeddings = runtime.block_on(embed_all(
        &engine,
        &detector,
        &args.engine,
        &args.images,
        &images.refs,
        args.flip,
    ))?;
    let embed_seconds = started.elapsed().as_secs_f64();
    for (e, (r, line)) in embeddings.iter().zip(&images.refs) {
        let Some(e) = e else { continue };
        if e.len() != info.dim || e.iter().any(|x| !x.is_finite()) {
            bail!(
                "embedding of {} (pairs line {line}) has {} values or non-finite ones; expected {} finite",
                r.path(&args.images).display(),
                e.len(),
                info.dim
            );
        }
    }

    let scored: Vec<Scored> = file
        .pairs
        .iter()
        .zip(&images.pair_index)
        .map(|(p, &(a, b))| Scored {
            score: match (&embeddings[a], &embeddings[b]) {
                (Some(x), Some(y)) => cosine(x, y),
                _ => -1.0,
            },
            same: p.same,
        })
        .collect();
    let images_without_face = embeddings.iter().filter(|e| e.is_none()).count();
    let pairs_without_face = images
        .pair_index
        .iter()
        .filter(|&&(a, b)| embeddings[a].is_none() || embeddings[b].is_none())
        .count();
    let fold_of: Vec<usize> = file.pairs.iter().map(|p| p.fold).collect();

    if let Some(path) = &args.scores {
        write_scores(path, &file, &scored)?;
    }

    let figures = evaluate(&scored, &fold_of, file.folds, f64::from(info.threshold))?;
    let matched = scored.iter().filter(|s| s.same).count();
    let report = Report {
        model: ModelSummary {
            id: info.id(),
            trained: info.trained,
            head: info.head.clone(),
            dim: info.dim,
            threshold: info.threshold,
        },
        flip: args.flip,
        pairs_file: args.pairs.display().to_string(),
        images_dir: args.images.display().to_string(),
        folds: file.folds,
        pairs: scored.len(),
        matched,
        mismatched: scored.len() - matched,
        images: images.refs.len(),
        images_without_face,
        pairs_without_face,
        figures,
        embed_seconds,
    };

    if let Some(path) = &args.roc {
        let roc = metrics::roc_curve(&scored)?;
        roc::draw(
            &roc::RocPlot {
                roc: &roc,
                auc: report.figures.auc,
                eer: report.figures.eer,
                operating_points: &report.figures.tar_at_far,
                subtitle: format!(
                    "{}  flip {}  {} pairs",
                    report.model.id,
                    if report.flip { "on" } else { "off" },
                    report.pairs
                ),
            },
            path,
        )?;
    }

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", human(&report));
    }
    Ok(())
}

fn write_scores(path: &Path, file: &PairsFile, scored: &[Scored]) -> anyhow::Result<()> {
    let mut out = String::from("fold\tsame\tscore\timage_a\timage_b\n");
    for (p, s) in file.pairs.iter().zip(scored) {
        let _ = writeln!(
            out,
            "{}\t{}\t{:.9}\t{}/{}_{:04}.jpg\t{}/{}_{:04}.jpg",
            p.fold + 1,
            u8::from(p.same),
            s.score,
            p.a.name,
            p.a.name,
            p.a.number,
            p.b.name,
            p.b.name,
            p.b.number
        );
    }
    std::fs::write(path, out).with_context(|| format!("writing scores to {}", path.display()))
}

fn pct(x: f64) -> String {
    format!("{:.2}%", x * 100.0)
}

/// The human-readable report.
pub fn human(r: &Report) -> String {
    let f = &r.figures;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "model      {} (head {}, dim {}, trained: {}), flip-averaging {}",
        r.model.id,
        r.model.head,
        r.model.dim,
        r.model.trained,
        if r.flip { "on" } else { "off" }
    );
    let _ = writeln!(
        s,
        "pairs      {}: {} folds, {} matched + {} mismatched, {} images",
        r.pairs_file, r.folds, r.matched, r.mismatched, r.images
    );
    if r.images_without_face > 0 {
        let _ = writeln!(
            s,
            "no face    {} of {} images (pairs with one, {} here, are scored -1: a non-match)",
            r.images_without_face, r.images, r.pairs_without_face
        );
    }
    match &f.accuracy {
        Some(cv) => {
            let _ = writeln!(
                s,
                "accuracy   {} ± {} ({}-fold cross-validated threshold)",
                pct(cv.mean),
                pct(cv.std),
                r.folds
            );
            for fold in &cv.folds {
                let _ = writeln!(
                    s,
                    "  fold {:<3} {} of {} pairs at threshold {:.4} (chosen on the other folds, {} there)",
                    fold.fold,
                    pct(fold.accuracy),
                    fold.pairs,
                    fold.threshold,
                    pct(fold.train_accuracy)
                );
            }
        }
        None => {
            let _ = writeln!(s, "accuracy   n/a: cross-validation needs at least 2 folds");
        }
    }
    let _ = writeln!(s, "ROC AUC    {:.4}", f.auc);
    if let Some(e) = f.eer {
        let _ = writeln!(
            s,
            "EER        {} at threshold {:.4}",
            pct(e.eer),
            e.threshold
        );
    }
    for t in &f.tar_at_far {
        let _ = writeln!(
            s,
            "TAR@FAR={:.0e} {} at threshold {:.4} (measured FAR {}){}",
            t.target_far,
            pct(t.tar),
            t.threshold,
            pct(t.far),
            if t.below_resolution {
                format!(
                    "; {} mismatched pairs are too few to measure FAR {:.0e}: \
                     this is the no-false-accept point",
                    r.mismatched, t.target_far
                )
            } else {
                String::new()
            }
        );
    }
    let _ = writeln!(
        s,
        "best       {} at threshold {:.4} over all pairs (not cross-validated)",
        pct(f.best.accuracy),
        f.best.threshold
    );
    let _ = writeln!(
        s,
        "model thr  {} at the model's mobiface.threshold {:.4}",
        pct(f.accuracy_at_model_threshold),
        r.model.threshold
    );
    let _ = writeln!(s, "embedding  {:.1} s", r.embed_seconds);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_image_is_embedded_once_and_pairs_point_at_it() {
        let file = pairs::parse("1\t2\nA\t1\t2\nB\t1\t2\nA\t2\tB\t1\nC\t1\tA\t1\n").unwrap();
        let im = distinct_images(&file);
        let names: Vec<String> = im
            .refs
            .iter()
            .map(|(r, line)| format!("{}{}@{line}", r.name, r.number))
            .collect();
        assert_eq!(names, ["A1@2", "A2@2", "B1@3", "B2@3", "C1@5"]);
        assert_eq!(im.pair_index, [(0, 1), (2, 3), (1, 2), (4, 0)]);
    }

    #[test]
    fn cosine_ignores_length_and_handles_zero() {
        assert!((cosine(&[1.0, 0.0], &[3.0, 3.0]) - 0.5f64.sqrt()).abs() < 1e-12);
        assert!((cosine(&[1.0, 2.0], &[-2.0, -4.0]) + 1.0).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }
}
