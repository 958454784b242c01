//! The shipped model is trained and calibrated: its ONNX metadata carries the
//! thresholds, the service answers with them when a request gives none, and the
//! default threshold separates a known same-person pair of the evaluation set
//! from a known different-person pair.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::process::Command;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{
    b64, json_of, lfw_dir, manifest_dir, read, spawn_app, spawn_app_with, venv_python, TestApp,
};

/// Pairs from `pairs-eval.txt` that the shipped model (1.4.0) gets right at its
/// calibrated threshold (0.241), with and without flip-averaging: cosine 0.747 for
/// the same person and 0.078 for the different people (flip-averaged), so this
/// guards the pipeline (model file, preprocessing, flip-averaging, threshold),
/// not the accuracy. Retraining may require picking new ones:
/// `mobiface eval --scores FILE` lists every pair's similarity.
const SAME: (&str, &str) = (
    "Albrecht_Mentz/Albrecht_Mentz_0001.jpg",
    "Albrecht_Mentz/Albrecht_Mentz_0002.jpg",
);
const DIFFERENT: (&str, &str) = (
    "Aaron_Guiel/Aaron_Guiel_0001.jpg",
    "Pascal_Rheaume/Pascal_Rheaume_0001.jpg",
);

/// The model's `mobiface.*` metadata, read with the `onnx` package rather than
/// the service's own loader.
fn model_metadata() -> HashMap<String, String> {
    serde_json::from_slice(&onnx_meta(&[])).expect("metadata JSON")
}

/// `models/onnx_meta.py` on the shipped model with `args`; its stdout.
fn onnx_meta(args: &[&OsStr]) -> Vec<u8> {
    let out = Command::new(venv_python())
        .arg(manifest_dir().join("models/onnx_meta.py"))
        .arg(manifest_dir().join("models/mobiface.onnx"))
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "onnx_meta.py {args:?} failed: {out:?}"
    );
    out.stdout
}

fn threshold_key(meta: &HashMap<String, String>, key: &str) -> f64 {
    let v = meta
        .get(key)
        .unwrap_or_else(|| panic!("model metadata lacks {key}: {meta:?}"));
    let t: f64 = v.parse().unwrap_or_else(|e| panic!("{key} = {v:?}: {e}"));
    assert!((-1.0..=1.0).contains(&t), "{key} = {t} is not a cosine");
    t
}

fn crop(name: &str) -> String {
    b64(&read(&lfw_dir().join("eval-aligned").join(name)))
}

async fn verify(app: &TestApp, pair: (&str, &str)) -> Value {
    let body = json!({"image1": crop(pair.0), "image2": crop(pair.1)});
    let (status, v) = json_of(app.post_json("/verify", &body).await).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v
}

#[tokio::test]
async fn verify_and_identify_default_to_the_models_calibrated_threshold() {
    let meta = model_metadata();
    assert_eq!(
        meta.get("mobiface.trained").map(String::as_str),
        Some("true")
    );
    let threshold = threshold_key(&meta, "mobiface.threshold");
    let far_1e2 = threshold_key(&meta, "mobiface.threshold_far_1e-2");
    let far_1e3 = threshold_key(&meta, "mobiface.threshold_far_1e-3");
    assert!(
        threshold <= far_1e2 && far_1e2 <= far_1e3,
        "stricter operating points need higher thresholds: {threshold} {far_1e2} {far_1e3}"
    );

    let app = spawn_app().await;
    let v = verify(&app, (SAME.0, DIFFERENT.1)).await;
    let used = v["threshold"].as_f64().expect("threshold");
    assert!(
        (used - threshold).abs() < 1e-6,
        "verify used {used}, model says {threshold}"
    );
    let similarity = v["similarity"].as_f64().expect("similarity");
    assert_eq!(v["match"].as_bool(), Some(similarity >= used), "{v}");

    let body = json!({"image": crop(SAME.0)});
    let (status, v) = json_of(app.post_json("/identify", &body).await).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let used = v["threshold"].as_f64().expect("threshold");
    assert!(
        (used - threshold).abs() < 1e-6,
        "identify used {used}, model says {threshold}"
    );
}

#[tokio::test]
async fn trained_model_separates_a_known_same_and_different_pair() {
    let threshold = threshold_key(&model_metadata(), "mobiface.threshold");
    let app = spawn_app().await;

    let same = verify(&app, SAME).await;
    let s = same["similarity"].as_f64().expect("similarity");
    assert!(s > threshold, "same person {SAME:?}: {s} <= {threshold}");
    assert_eq!(same["match"], true, "{same}");

    let different = verify(&app, DIFFERENT).await;
    let d = different["similarity"].as_f64().expect("similarity");
    assert!(
        d < threshold,
        "different people {DIFFERENT:?}: {d} >= {threshold}"
    );
    assert_eq!(different["match"], false, "{different}");
}

async fn readyz_model(app: &TestApp) -> Value {
    let (status, v) = json_of(app.get("/readyz").await).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["model"].clone()
}

/// Weights can inherit terms from their training data (`export.py` writes
/// `mobiface.licence` for UTKFace-trained ones); operators see them in `/readyz`.
#[tokio::test]
async fn readyz_reports_the_models_licence_terms() {
    let shipped = readyz_model(&spawn_app().await).await;
    assert_eq!(
        shipped.get("licence").and_then(Value::as_str),
        model_metadata().get("mobiface.licence").map(String::as_str),
        "{shipped}"
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join("licensed.onnx");
    let terms = "non-commercial research use only (test)";
    let set = format!("mobiface.licence={terms}");
    onnx_meta(&[
        "--set".as_ref(),
        set.as_ref(),
        "--out".as_ref(),
        copy.as_os_str(),
    ]);
    let app = spawn_app_with(|c| c.engine.model = copy.clone()).await;
    let model = readyz_model(&app).await;
    assert_eq!(model["licence"], terms, "{model}");
}
