use std::path::PathBuf;

use serde::Deserialize;

use super::yunet::RawOutputs;
use super::*;
use crate::imaging::{decode, DecodeLimits};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn face(x: f32, side: f32, eyes: f32) -> Face {
    let (cx, cy) = (x + side / 2.0, side / 2.0);
    Face {
        bbox: BoundingBox {
            x,
            y: 0.0,
            width: side,
            height: side,
        },
        score: 0.9,
        landmarks: [
            [cx - eyes / 2.0, cy - 5.0],
            [cx + eyes / 2.0, cy - 5.0],
            [cx, cy + 5.0],
            [cx - eyes / 2.5, cy + 15.0],
            [cx + eyes / 2.5, cy + 15.0],
        ],
    }
}

fn code(r: Result<Chosen, ApiError>) -> ErrorKind {
    match r {
        Ok(c) => panic!("expected an error, chose {:?}", c.face),
        Err(e) => e.kind,
    }
}

#[test]
fn the_largest_face_is_chosen_and_aligned() {
    let img = RgbImage::new(300, 100);
    let faces = vec![
        face(0.0, 60.0, 25.0),
        face(150.0, 90.0, 30.0),
        face(80.0, 40.0, 15.0),
    ];
    let chosen = choose(faces.clone(), &img, Multiple::Largest, 10.0).unwrap();
    assert_eq!(chosen.face, faces[1]);
    assert_eq!(chosen.faces_detected, 3);
    assert_eq!(chosen.crop.dimensions(), (112, 112));

    assert_eq!(
        code(choose(faces.clone(), &img, Multiple::Refuse, 10.0)),
        ErrorKind::MultipleFaces
    );
    // Faces too small to recognise do not make a photo "several people".
    let one = choose(faces.clone(), &img, Multiple::Refuse, 26.0).unwrap();
    assert_eq!(one.face, faces[1]);
    assert_eq!(one.faces_detected, 3);
}

#[test]
fn no_face_and_small_faces_are_refused() {
    let img = RgbImage::new(64, 64);
    assert_eq!(
        code(choose(vec![], &img, Multiple::Largest, 10.0)),
        ErrorKind::NoFace
    );
    assert_eq!(
        code(choose(
            vec![face(0.0, 30.0, 8.0)],
            &img,
            Multiple::Largest,
            10.0
        )),
        ErrorKind::FaceTooSmall
    );
}

#[test]
fn landmark_offsets_move_points_by_template_pixels_scaled_and_turned_with_the_face() {
    // A face at twice the template's scale, turned 90 degrees: template (x, y) -> photo
    // (-2y + 300, 2x).
    let lm: Landmarks =
        imaging::TEMPLATE.map(|p| [(300.0 - 2.0 * p[1]) as f32, (2.0 * p[0]) as f32]);
    let f = Face {
        bbox: BoundingBox {
            x: 0.0,
            y: 0.0,
            width: 1.0,
            height: 1.0,
        },
        score: 1.0,
        landmarks: lm,
    };
    let moved = to_training_convention(f);
    for ((p, q), o) in moved.landmarks.iter().zip(&lm).zip(&LANDMARK_OFFSETS) {
        let want = [q[0] as f64 - 2.0 * o[1], q[1] as f64 + 2.0 * o[0]];
        assert!(
            (f64::from(p[0]) - want[0]).abs() < 1e-3 && (f64::from(p[1]) - want[1]).abs() < 1e-3,
            "{p:?} vs {want:?}"
        );
    }
}

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    engine: EngineConfig,
    #[command(flatten)]
    detector: DetectorConfig,
}

#[derive(Deserialize)]
struct Golden {
    score_threshold: f32,
    nms_iou: f32,
    photos: Vec<GoldenPhoto>,
}

#[derive(Deserialize)]
struct GoldenPhoto {
    image: String,
    faces: Vec<GoldenFace>,
}

#[derive(Deserialize)]
struct GoldenFace {
    #[serde(rename = "box")]
    bbox: [f32; 4],
    landmarks: [[f32; 2]; 5],
    score: f32,
}

/// The real ONNX Runtime run of the fp32 fold, decoded here, against OpenCV's own YuNet on the
/// wheel's int8 file (tests/data/yunet_golden.json, `make detector-golden`). The two decode the
/// JPEGs with different libraries (a grey level here and there), hence the tolerances.
#[test]
fn decoding_matches_opencv_on_real_photos() {
    let golden: Golden = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/data/yunet_golden.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(golden.nms_iou, yunet::NMS_IOU);
    let Cli {
        mut engine,
        mut detector,
    } = clap::Parser::parse_from(["x"]);
    engine.ort_dylib = std::env::var("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join(&engine.ort_dylib));
    detector.detector = root().join(&detector.detector);
    detector.detector_score = golden.score_threshold;
    let cfg = detector;
    let detector = Detector::load(&cfg, &engine, Arc::new(Metrics::new())).unwrap();
    let limits = DecodeLimits {
        max_side: 4096,
        max_decoded_bytes: 1 << 26,
    };
    let (mut errors, mut worst_score) = (Vec::new(), 0f32);
    for photo in &golden.photos {
        let bytes = std::fs::read(root().join("../shared/lfw").join(&photo.image)).unwrap();
        let img = decode(&bytes, &limits).unwrap();
        let faces = detector.detect_raw(&img).unwrap();
        assert_eq!(faces.len(), photo.faces.len(), "{}: {faces:?}", photo.image);
        for want in &photo.faces {
            let wb = BoundingBox {
                x: want.bbox[0],
                y: want.bbox[1],
                width: want.bbox[2],
                height: want.bbox[3],
            };
            let got = faces
                .iter()
                .max_by(|a, b| yunet::iou(&a.bbox, &wb).total_cmp(&yunet::iou(&b.bbox, &wb)))
                .unwrap();
            assert!(
                yunet::iou(&got.bbox, &wb) > 0.95,
                "{}: {got:?}",
                photo.image
            );
            // Where two neighbouring anchors score within a hair of each other, the decoders'
            // grey-level differences can make NMS keep the other one: a few pixels off on one
            // face here. A decoding bug (wrong cell, stride or offset) is many times that.
            for (g, w) in got.landmarks.iter().zip(&want.landmarks) {
                let e = (g[0] - w[0]).hypot(g[1] - w[1]);
                assert!(e < 0.05 * wb.width, "{}: {got:?}", photo.image);
                errors.push(e);
            }
            worst_score = worst_score.max((got.score - want.score).abs());
        }
    }
    assert!(
        errors.len() >= 50,
        "golden file too small: {} points",
        errors.len()
    );
    errors.sort_by(f32::total_cmp);
    let median = errors[errors.len() / 2];
    assert!(median < 0.2, "landmarks differ by {median} px (median)");
    assert!(worst_score < 0.005, "scores differ by up to {worst_score}");
}

/// A session that panics in every run, as a bug in a backend would.
struct Panicking;

impl DetectorBackend for Panicking {
    fn run(&mut self, _input: &[f32]) -> anyhow::Result<RawOutputs> {
        panic!("backend bug");
    }
}

#[test]
fn a_panicking_session_fails_its_request_and_returns_to_the_pool() {
    let cfg = DetectorConfig {
        detector: PathBuf::new(),
        detector_score: 0.5,
        detector_sessions: 1,
        detector_intra_threads: 1,
        min_eye_distance: 10.0,
    };
    let detector =
        Detector::with_backends(vec![Box::new(Panicking)], &cfg, Arc::new(Metrics::new()));
    let img = RgbImage::new(64, 64);
    // The pool holds one session: had the first panic lost it, the second
    // call would wait for it forever.
    for _ in 0..2 {
        let err = detector.detect(&img).expect_err("the run panicked");
        assert_eq!(err.kind, ErrorKind::Internal);
    }
}
