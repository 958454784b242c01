//! `mobiface eval` end to end: the real binary, the real model on the real ONNX
//! Runtime, real LFW crops read from ../shared/lfw (never copied into the repo).
//!
//! The expected figures are computed here independently of `mobiface::eval`:
//! the test picks the pairs itself (so it knows their labels without parsing
//! a pairs file), decodes the images with the `image` crate directly, embeds
//! each face on its own through the engine (the binary batches them), and
//! recomputes the k-fold accuracy and AUC by brute force.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use mobiface::config::EngineConfig;
use mobiface::engine::Engine;
use mobiface::metrics::Metrics;
use serde_json::Value;

const IMAGES: &str = "../shared/lfw/eval-aligned";

/// Engine settings exactly as the binary's defaults (and environment) give them.
#[derive(Parser)]
struct EngineOnly {
    #[command(flatten)]
    engine: EngineConfig,
}

fn engine_config() -> EngineConfig {
    EngineOnly::parse_from(["test"]).engine
}

#[derive(Clone, Debug)]
struct TestPair {
    a: (String, u32),
    b: (String, u32),
    same: bool,
    fold: usize,
}

fn people() -> Vec<(String, usize)> {
    let mut out: Vec<(String, usize)> = std::fs::read_dir(IMAGES)
        .expect("../shared/lfw/eval-aligned must exist (the LFW data set)")
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            let count = std::fs::read_dir(e.path()).unwrap().count();
            (name, count)
        })
        .collect();
    out.sort();
    out
}

/// `folds` folds of `n` matched + `n` mismatched pairs, chosen
/// deterministically from the real folders.
fn choose_pairs(folds: usize, n: usize) -> Vec<TestPair> {
    let all = people();
    let multi: Vec<&String> = all
        .iter()
        .filter(|(_, c)| *c >= 2)
        .map(|(p, _)| p)
        .collect();
    assert!(multi.len() >= folds * n && all.len() >= 2 * folds * n + 100);
    let mut pairs = Vec::new();
    for fold in 0..folds {
        for k in 0..n {
            let p = multi[fold * n + k].clone();
            pairs.push(TestPair {
                a: (p.clone(), 1),
                b: (p, 2),
                same: true,
                fold,
            });
        }
        for k in 0..n {
            // Far from the matched people, two different people each time.
            let i = 100 + 2 * (fold * n + k);
            pairs.push(TestPair {
                a: (all[i].0.clone(), 1),
                b: (all[i + 1].0.clone(), 1),
                same: false,
                fold,
            });
        }
    }
    pairs
}

fn write_pairs_file(dir: &Path, folds: usize, n: usize, pairs: &[TestPair]) -> PathBuf {
    let mut text = format!("{folds}\t{n}\n");
    for p in pairs {
        if p.same {
            text += &format!("{}\t{}\t{}\n", p.a.0, p.a.1, p.b.1);
        } else {
            text += &format!("{}\t{}\t{}\t{}\n", p.a.0, p.a.1, p.b.0, p.b.1);
        }
    }
    let path = dir.join("pairs.txt");
    std::fs::write(&path, text).unwrap();
    path
}

fn image_path(name: &str, number: u32) -> PathBuf {
    Path::new(IMAGES)
        .join(name)
        .join(format!("{name}_{number:04}.jpg"))
}

fn run_eval(extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mobiface"))
        .arg("eval")
        .args(extra)
        .output()
        .expect("the mobiface binary runs")
}

fn run_eval_json(pairs: &Path, flip: bool) -> Value {
    let out = run_eval(&[
        "--pairs",
        pairs.to_str().unwrap(),
        "--images",
        IMAGES,
        "--flip",
        if flip { "true" } else { "false" },
        "--json",
    ]);
    assert!(
        out.status.success(),
        "mobiface eval failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json prints one JSON document")
}

/// One embedding per image, each in its own engine call.
fn embed_each(engine: &Engine, rt: &tokio::runtime::Runtime, path: &Path, flip: bool) -> Vec<f32> {
    let face = image::open(path).unwrap().to_rgb8();
    assert_eq!(face.dimensions(), (112, 112), "{}", path.display());
    let mut v = rt.block_on(engine.embed(vec![face], flip)).unwrap();
    assert_eq!(v.len(), 1);
    v.pop().unwrap()
}

fn cos(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn accuracy(scores: &[(f64, bool)], t: f64) -> f64 {
    scores.iter().filter(|(s, same)| (*s >= t) == *same).count() as f64 / scores.len() as f64
}

/// The protocol in its plainest form: every midpoint between two distinct
/// training scores, plus one threshold below and one above them all; the most
/// accurate on the training folds (the lowest threshold on ties, as documented
/// in mobiface::eval::metrics), then measured on the held-out fold.
fn brute_kfold(scores: &[(f64, bool, usize)], folds: usize) -> (Vec<f64>, Vec<f64>) {
    let mut accs = Vec::new();
    let mut thresholds = Vec::new();
    for f in 0..folds {
        let train: Vec<(f64, bool)> = scores
            .iter()
            .filter(|s| s.2 != f)
            .map(|s| (s.0, s.1))
            .collect();
        let test: Vec<(f64, bool)> = scores
            .iter()
            .filter(|s| s.2 == f)
            .map(|s| (s.0, s.1))
            .collect();
        let mut distinct: Vec<f64> = train.iter().map(|s| s.0).collect();
        distinct.sort_by(f64::total_cmp);
        distinct.dedup();
        let mut cands = vec![distinct[0] - 1.0, distinct[distinct.len() - 1] + 1.0];
        for w in distinct.windows(2) {
            cands.push(w[0] / 2.0 + w[1] / 2.0);
        }
        let mut best = (f64::INFINITY, -1.0);
        for &t in &cands {
            let a = accuracy(&train, t);
            if a > best.1 || (a == best.1 && t < best.0) {
                best = (t, a);
            }
        }
        thresholds.push(best.0);
        accs.push(accuracy(&test, best.0));
    }
    (thresholds, accs)
}

fn brute_auc(scores: &[(f64, bool, usize)]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for p in scores.iter().filter(|s| s.1) {
        for n in scores.iter().filter(|s| !s.1) {
            den += 1.0;
            num += if p.0 > n.0 {
                1.0
            } else if p.0 == n.0 {
                0.5
            } else {
                0.0
            };
        }
    }
    num / den
}

#[test]
fn eval_accuracy_matches_an_independent_computation() {
    let (folds, n) = (2, 10);
    let pairs = choose_pairs(folds, n);
    let dir = tempfile::tempdir().unwrap();
    let pairs_file = write_pairs_file(dir.path(), folds, n, &pairs);

    let engine = Engine::start(&engine_config(), std::sync::Arc::new(Metrics::new())).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();

    for flip in [true, false] {
        let report = run_eval_json(&pairs_file, flip);

        let scores: Vec<(f64, bool, usize)> = pairs
            .iter()
            .map(|p| {
                let a = embed_each(&engine, &rt, &image_path(&p.a.0, p.a.1), flip);
                let b = embed_each(&engine, &rt, &image_path(&p.b.0, p.b.1), flip);
                (cos(&a, &b), p.same, p.fold)
            })
            .collect();
        let (thresholds, accs) = brute_kfold(&scores, folds);
        let mean = accs.iter().sum::<f64>() / folds as f64;

        let acc = &report["accuracy"];
        assert_eq!(report["flip"], Value::Bool(flip));
        assert_eq!(report["pairs"], 2 * folds * n);
        assert_eq!(report["matched"], folds * n);
        assert_eq!(report["folds"], folds);
        let got_mean = acc["mean"].as_f64().unwrap();
        assert!(
            (got_mean - mean).abs() < 1e-12,
            "flip {flip}: eval says {got_mean}, independent computation {mean} (folds {accs:?})"
        );
        for f in 0..folds {
            let fold = &acc["folds"][f];
            assert_eq!(fold["fold"], f + 1);
            assert!((fold["accuracy"].as_f64().unwrap() - accs[f]).abs() < 1e-12);
            // Thresholds are midpoints of scores; batching may move a score
            // in the last float bits, never by 1e-5.
            let t = fold["threshold"].as_f64().unwrap();
            assert!(
                (t - thresholds[f]).abs() < 1e-5,
                "fold {f}: {t} vs {}",
                thresholds[f]
            );
        }
        let auc = report["auc"].as_f64().unwrap();
        assert!((auc - brute_auc(&scores)).abs() < 1e-9, "auc {auc}");
    }
}

#[test]
fn the_real_pairs_file_parses_and_names_existing_images() {
    let text = std::fs::read_to_string("../shared/lfw/pairs-eval.txt").unwrap();
    let file = mobiface::eval::pairs::parse(&text).unwrap();
    assert_eq!(
        (file.folds, file.per_fold, file.pairs.len()),
        (2, 300, 1200)
    );
    for p in &file.pairs {
        for r in [&p.a, &p.b] {
            let path = r.path(Path::new(IMAGES));
            assert!(
                path.is_file(),
                "line {}: {} is missing",
                p.line,
                path.display()
            );
        }
    }
    // Spot-check the first lines of each kind against the file's text.
    let first = &file.pairs[0];
    assert!(text.lines().nth(1).unwrap().starts_with(&first.a.name));
    assert!(first.same && !file.pairs[300].same && file.pairs[600].fold == 1);
}

#[test]
fn malformed_pairs_file_is_a_clear_error_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.txt");
    std::fs::write(
        &path,
        "1\t1\nAaron_Peirsol\t1\t4\nAaron_Peirsol\t1\tAaron_Guiel\n",
    )
    .unwrap();
    let out = run_eval(&["--pairs", path.to_str().unwrap(), "--images", IMAGES]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 3") && err.contains("mismatched"),
        "{err}"
    );
}

#[test]
fn missing_images_are_listed_before_the_model_loads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pairs.txt");
    std::fs::write(
        &path,
        "1\t1\nNobody_Here\t1\t2\nAaron_Peirsol\t1\tAaron_Guiel\t1\n",
    )
    .unwrap();
    let out = run_eval(&[
        "--pairs",
        path.to_str().unwrap(),
        "--images",
        IMAGES,
        // A model that does not exist: the missing images must be reported first.
        "--model",
        "/nonexistent/model.onnx",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("2 of 4 images are missing") && err.contains("Nobody_Here_0001.jpg"),
        "{err}"
    );
}
