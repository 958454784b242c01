//! POST /embed against the real model: flip-averaging, batching, an
//! independent ONNX Runtime reference, alignment, and bad input.

use std::process::Command;

use image::RgbImage;
use serde_json::{json, Value};

use crate::helpers::{
    b64, cosine, embeddings_of, eval_crops, lfw_dir, manifest_dir, png, read, spawn_app,
    spawn_app_with, venv_python,
};

#[tokio::test]
async fn flip_averaging_makes_an_image_and_its_mirror_agree() {
    let app = spawn_app().await;
    let crop = image::load_from_memory(&read(&eval_crops(1)[0]))
        .unwrap()
        .to_rgb8();
    let mirror = image::imageops::flip_horizontal(&crop);
    let images = [png(&crop), png(&mirror)];

    let flipped = app.embed(&images, true).await;
    let plain = app.embed(&images, false).await;

    let with_flip = cosine(&flipped[0], &flipped[1]);
    let without = cosine(&plain[0], &plain[1]);
    assert!(
        with_flip >= 0.9999,
        "flip on: image and mirror should agree, cosine {with_flip}"
    );
    assert!(
        without < 0.9999,
        "flip off: image and mirror should differ, cosine {without}"
    );
    for e in flipped.iter().chain(&plain) {
        let norm = e.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(
            (norm - 1.0).abs() < 1e-4,
            "embeddings are unit length, got {norm}"
        );
        assert_eq!(e.len(), 512);
    }
}

#[tokio::test]
async fn concurrent_requests_are_batched_without_changing_results() {
    // The CPU default runs each face alone; a GPU-style cap lets requests share runs.
    let app = spawn_app_with(|c| c.engine.max_batch = Some(16)).await;
    let images: Vec<Vec<u8>> = eval_crops(32).iter().map(|p| read(p)).collect();

    let mut alone = Vec::new();
    for img in &images {
        alone.push(app.embed(std::slice::from_ref(img), true).await.remove(0));
    }
    let before = app.state.engine.stats();

    let tasks: Vec<_> = images
        .iter()
        .map(|img| {
            let client = app.client.clone();
            let url = app.url("/embed");
            let body = json!({"images": [b64(img)]});
            tokio::spawn(async move {
                let resp = client.post(url).json(&body).send().await.expect("sent");
                assert_eq!(resp.status(), 200);
                embeddings_of(&resp.json::<Value>().await.expect("json")).remove(0)
            })
        })
        .collect();
    let mut together = Vec::new();
    for t in tasks {
        together.push(t.await.expect("task"));
    }

    let max_diff = alone
        .iter()
        .zip(&together)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
        .fold(0.0f32, f32::max);
    assert!(
        max_diff <= 1e-4,
        "batched results differ from single runs by {max_diff}"
    );
    let after = app.state.engine.stats();
    assert!(
        after.merged_runs > before.merged_runs && after.largest_run > 2,
        "concurrent requests should share model runs: {before:?} -> {after:?}"
    );
}

/// Writes `tensor` for onnxruntime's Python API, runs the model there and reads the result.
fn reference_features(tensor: &[f32], n: usize) -> Vec<f32> {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.f32"), dir.path().join("out.f32"));
    let bytes: Vec<u8> = tensor.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(&input, bytes).unwrap();
    let status = Command::new(venv_python())
        .arg(manifest_dir().join("models/run_onnx.py"))
        .arg("--model")
        .arg(manifest_dir().join("models/mobiface.onnx"))
        .arg("--input")
        .arg(&input)
        .arg("--shape")
        .arg(format!("{n},3,112,112"))
        .arg("--output")
        .arg(&output)
        .status()
        .expect("python runs");
    assert!(status.success(), "run_onnx.py failed");
    std::fs::read(&output)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The documented preprocessing, written out independently of the service:
/// RGB, CHW, (pixel - 127.5) / 128, optionally mirrored.
fn tensor_of(img: &RgbImage, mirror: bool) -> Vec<f32> {
    let mut t = vec![0.0; 3 * 112 * 112];
    for y in 0..112u32 {
        for x in 0..112u32 {
            let src = if mirror { 111 - x } else { x };
            let px = img.get_pixel(src, y);
            for c in 0..3 {
                t[c * 112 * 112 + (y * 112 + x) as usize] = (f32::from(px[c]) - 127.5) / 128.0;
            }
        }
    }
    t
}

fn normalised(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / n).collect()
}

#[tokio::test]
async fn embeddings_equal_onnxruntime_run_directly() {
    let app = spawn_app().await;
    let paths = eval_crops(3);
    let imgs: Vec<RgbImage> = paths
        .iter()
        .map(|p| image::load_from_memory(&read(p)).unwrap().to_rgb8())
        .collect();
    // PNG keeps the pixels exact, so both sides see the same decoded image.
    let bytes: Vec<Vec<u8>> = imgs.iter().map(png).collect();
    let plain = app.embed(&bytes, false).await;
    let flipped = app.embed(&bytes, true).await;

    let mut tensor = Vec::new();
    for img in &imgs {
        tensor.extend(tensor_of(img, false));
        tensor.extend(tensor_of(img, true));
    }
    let raw = reference_features(&tensor, 2 * imgs.len());
    for (i, pair) in raw.chunks_exact(2 * 512).enumerate() {
        let (orig, mirror) = pair.split_at(512);
        let expect_plain = normalised(orig);
        let mean: Vec<f32> = orig
            .iter()
            .zip(mirror)
            .map(|(a, b)| (a + b) / 2.0)
            .collect();
        let expect_flip = normalised(&mean);
        for (got, want, what) in [
            (&plain[i], &expect_plain, "plain"),
            (&flipped[i], &expect_flip, "flip"),
        ] {
            let diff = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(
                diff <= 1e-4,
                "image {i} ({what}): service and onnxruntime differ by {diff}"
            );
        }
    }
}

#[tokio::test]
async fn landmarks_align_a_raw_photo_like_the_shared_crops() {
    let app = spawn_app().await;
    let csv = std::fs::read_to_string(lfw_dir().join("landmarks.csv")).unwrap();
    let mut checked = 0;
    for line in csv
        .lines()
        .skip(1)
        .filter(|l| l.starts_with("eval/") && l.ends_with(",1"))
        .take(5)
    {
        let f: Vec<&str> = line.split(',').collect();
        let pts: Vec<f64> = f[1..11].iter().map(|v| v.parse().unwrap()).collect();
        let landmarks: Vec<[f64; 2]> = pts.chunks(2).map(|c| [c[0], c[1]]).collect();
        let raw = read(&lfw_dir().join(f[0]));
        let crop = read(&lfw_dir().join(f[0].replacen("eval/", "eval-aligned/", 1)));
        let body = json!({"images": [{"data": b64(&raw), "landmarks": landmarks}, b64(&crop)], "flip": true});
        let resp = app.post_json("/embed", &body).await;
        assert_eq!(resp.status(), 200);
        let e = embeddings_of(&resp.json::<Value>().await.unwrap());
        let c = cosine(&e[0], &e[1]);
        // Pixel-level agreement is tested in imaging; here the whole path must
        // give (almost) the embedding of the stored crop.
        assert!(
            c > 0.98,
            "{}: aligned-by-service vs stored crop cosine {c}",
            f[0]
        );
        checked += 1;
    }
    assert_eq!(checked, 5);
}

/// A PNG that declares 30000x30000 pixels in a few KB: only its header is valid.
fn png_bomb() -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend(data);
        out.extend(&body);
        out.extend(crc32(&body).to_be_bytes());
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(30000u32.to_be_bytes());
    ihdr.extend(30000u32.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &ihdr);
    // A zlib stream of one stored block of zeros: the first rows of the image.
    let zeros = vec![0u8; 4000];
    let mut idat = vec![0x78, 0x01, 0x01];
    idat.extend((zeros.len() as u16).to_le_bytes());
    idat.extend((!(zeros.len() as u16)).to_le_bytes());
    idat.extend(&zeros);
    idat.extend(1u32.wrapping_add(0).to_be_bytes()); // not a valid adler32; never reached
    chunk(&mut png, b"IDAT", &idat);
    chunk(&mut png, b"IEND", &[]);
    png
}

#[tokio::test]
async fn bad_inputs_get_clear_client_errors_and_the_server_keeps_serving() {
    let app = spawn_app_with(|c| c.max_images_per_request = 4).await;
    let good = read(&eval_crops(1)[0]);
    let truncated = good[..good.len() / 2].to_vec();
    let bomb = png_bomb();
    assert!(bomb.len() < 10_000);
    let landmarks6 = vec![[1.0, 2.0]; 6];

    // (case, content type, body, expected status, expected code)
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("empty body", "application/json", vec![], 400, "malformed_body"),
        ("not JSON", "application/json", b"{images:".to_vec(), 400, "malformed_body"),
        ("wrong JSON shape", "application/json", br#"{"images": 3}"#.to_vec(), 422, "invalid_request"),
        ("no images", "application/json", br#"{"images": []}"#.to_vec(), 422, "invalid_request"),
        ("zero-byte image", "application/json", json!({"images": [""]}).to_string().into_bytes(), 400, "bad_image"),
        (
            "truncated JPEG",
            "application/json",
            json!({"images": [b64(&truncated)]}).to_string().into_bytes(),
            400,
            "bad_image",
        ),
        (
            "text posing as an image",
            "application/json",
            json!({"images": [b64(b"hello, I am not a picture")]}).to_string().into_bytes(),
            400,
            "bad_image",
        ),
        ("raw image body", "image/jpeg", good.clone(), 415, "unsupported_media_type"),
        ("no content type", "", br#"{"images": []}"#.to_vec(), 415, "unsupported_media_type"),
        (
            "30000x30000 PNG bomb",
            "application/json",
            json!({"images": [b64(&bomb)]}).to_string().into_bytes(),
            413,
            "image_too_large",
        ),
        (
            "invalid base64",
            "application/json",
            json!({"images": ["@@@not base64@@@"]}).to_string().into_bytes(),
            400,
            "bad_image",
        ),
        (
            "6 landmarks",
            "application/json",
            json!({"images": [{"data": b64(&good), "landmarks": landmarks6}]}).to_string().into_bytes(),
            400,
            "bad_landmarks",
        ),
        (
            "NaN landmarks (not representable in JSON)",
            "application/json",
            format!(r#"{{"images": [{{"data": "{}", "landmarks": [[NaN, 1], [1, 1], [2, 2], [3, 3], [4, 4]]}}]}}"#, b64(&good))
                .into_bytes(),
            400,
            "malformed_body",
        ),
        (
            "too many images",
            "application/json",
            json!({"images": vec![b64(&good); 5]}).to_string().into_bytes(),
            422,
            "too_many_images",
        ),
    ];

    for (case, content_type, body, status, code) in cases {
        let mut req = app.client.post(app.url("/embed")).body(body);
        if !content_type.is_empty() {
            req = req.header("content-type", content_type);
        }
        let resp = req.send().await.expect("sent");
        let got = resp.status().as_u16();
        let value: Value = resp
            .json()
            .await
            .unwrap_or_else(|e| panic!("{case}: body is not JSON: {e}"));
        assert_eq!(got, status, "{case}: wrong status, body {value}");
        assert_eq!(
            value["error"]["code"], code,
            "{case}: wrong code, body {value}"
        );
        assert!(
            value["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{case}: error needs a message"
        );
    }

    // Multipart: a text file labelled as a JPEG, then a real one.
    let form = reqwest::multipart::Form::new().part(
        "image",
        reqwest::multipart::Part::bytes(b"plain text".to_vec())
            .file_name("x.jpg")
            .mime_str("image/jpeg")
            .unwrap(),
    );
    let resp = app.post_multipart("/embed", form).await;
    assert_eq!(resp.status(), 400, "multipart text-as-JPEG");

    let form = reqwest::multipart::Form::new()
        .part(
            "image",
            reqwest::multipart::Part::bytes(good.clone()).file_name("a.jpg"),
        )
        .part(
            "image",
            reqwest::multipart::Part::bytes(good.clone()).file_name("b.jpg"),
        )
        .text("flip", "false");
    let resp = app.post_multipart("/embed", form).await;
    assert_eq!(resp.status(), 200, "multipart with two images");
    let value: Value = resp.json().await.unwrap();
    assert_eq!(value["embeddings"].as_array().unwrap().len(), 2);
    assert_eq!(value["model"]["flip"], false);

    // Still serving after all of that.
    assert_eq!(app.embed(&[good], true).await.len(), 1);
    assert_eq!(app.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn response_describes_the_model() {
    let app = spawn_app().await;
    let body = json!({"images": [b64(&read(&eval_crops(1)[0]))]});
    let value: Value = app.post_json("/embed", &body).await.json().await.unwrap();
    let info = app.state.engine.info();
    assert_eq!(value["model"]["name"], info.name.as_str());
    assert_eq!(value["model"]["version"], info.version.as_str());
    assert_eq!(value["model"]["dim"], 512);
    assert_eq!(value["model"]["flip"], true);
    assert_eq!(value["model"]["trained"], info.trained);
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), 200);
}
