//! The bodies of the fuzz targets in `fuzz/` (cargo-fuzz, nightly), kept here so that a
//! normal `cargo test` replays every committed corpus file (`fuzz/corpus/<target>/`) on
//! stable: each past crash stays a regression test. Each function must return without
//! panicking for any input; an error answer is fine.

use std::path::Path;

use axum::body::Body;
use axum::extract::FromRequest;
use axum::http::{header, Request};

use crate::api::embed::EmbedRequest;
use crate::api::identify::IdentifyRequest;
use crate::api::input::JsonOrMultipart;
use crate::api::subjects::{AddFace, CreateSubject};
use crate::api::verify::VerifyRequest;
use crate::imaging::{self, DecodeLimits};

/// Small limits keep each run fast; the code paths are the same as the service's.
const LIMITS: DecodeLimits = DecodeLimits {
    max_side: 1024,
    max_decoded_bytes: 4 << 20,
};

/// Image bytes through the decoder and the aligned face crop, as the service runs them
/// (with the template's points scaled to the picture standing in for the detector's, which
/// needs its ONNX model).
pub fn decode_and_crop(data: &[u8]) {
    if let Ok(size) = imaging::decoded_size(data, &LIMITS) {
        assert!(size <= LIMITS.max_decoded_bytes);
    }
    if let Ok(img) = imaging::decode(data, &LIMITS) {
        assert!(img.width() <= LIMITS.max_side && img.height() <= LIMITS.max_side);
        let (sx, sy) = (
            img.width() as f32 / imaging::FACE_SIZE as f32,
            img.height() as f32 / imaging::FACE_SIZE as f32,
        );
        let points = imaging::TEMPLATE.map(|[x, y]| [x as f32 * sx, y as f32 * sy]);
        if let Some(face) = imaging::align(&img, &points) {
            assert_eq!(face.dimensions(), (imaging::FACE_SIZE, imaging::FACE_SIZE));
        }
    }
}

/// Ten little-endian f32 (five points) and a picture size from the input, through the
/// landmark checks and the aligned crop.
pub fn align(data: &[u8]) {
    if data.len() < 42 {
        return;
    }
    let f = |i: usize| {
        f64::from(f32::from_le_bytes(
            data[i * 4..i * 4 + 4].try_into().unwrap_or([0; 4]),
        ))
    };
    let points: Vec<Vec<f64>> = (0..5).map(|p| vec![f(2 * p), f(2 * p + 1)]).collect();
    let (w, h) = (u32::from(data[40]) + 1, u32::from(data[41]) + 1);
    if let Ok(landmarks) = imaging::parse_landmarks(&points) {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 128]));
        if let Some(face) = imaging::align(&img, &landmarks) {
            assert_eq!(face.dimensions(), (imaging::FACE_SIZE, imaging::FACE_SIZE));
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime builds")
}

async fn parse_all(content_type: &str, data: &[u8]) {
    let request = || {
        Request::builder()
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::from(data.to_vec()))
            .expect("static request parts are valid")
    };
    // Every request type the service parses from a body.
    if let Ok(JsonOrMultipart(r)) =
        JsonOrMultipart::<EmbedRequest>::from_request(request(), &()).await
    {
        for image in r.images.items {
            check_image(&image);
        }
    }
    if let Ok(JsonOrMultipart(r)) =
        JsonOrMultipart::<VerifyRequest>::from_request(request(), &()).await
    {
        for image in [r.image, r.image1, r.image2].into_iter().flatten() {
            check_image(&image);
        }
    }
    if let Ok(JsonOrMultipart(r)) =
        JsonOrMultipart::<IdentifyRequest>::from_request(request(), &()).await
    {
        check_image(&r.image);
    }
    if let Ok(JsonOrMultipart(r)) = JsonOrMultipart::<AddFace>::from_request(request(), &()).await {
        check_image(&r.image);
    }
    let _ = JsonOrMultipart::<CreateSubject>::from_request(request(), &()).await;
}

fn check_image(image: &crate::api::input::ImageInput) {
    if let crate::api::input::ImageInput::WithLandmarks {
        landmarks: Some(l), ..
    } = image
    {
        assert!(l.items.len() <= 5 && l.items.iter().all(|p| p.items.len() <= 2));
        let _ = l.parse();
    }
}

/// A JSON body, parsed as every request type.
pub fn json_body(data: &[u8]) {
    runtime().block_on(parse_all("application/json", data));
}

/// A multipart body with boundary `XyZ`, parsed as every request type.
pub fn multipart_body(data: &[u8]) {
    runtime().block_on(parse_all("multipart/form-data; boundary=XyZ", data));
}

/// Runs `target` over every file of `fuzz/corpus/<name>/`; the number of files run.
pub fn replay_corpus(name: &str, target: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        target(&data);
    }
    files.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_committed_fuzz_input_still_passes() {
        for (name, target) in [
            ("decode_and_crop", decode_and_crop as fn(&[u8])),
            ("align", align),
            ("json_body", json_body),
            ("multipart_body", multipart_body),
        ] {
            let n = replay_corpus(name, target);
            assert!(n >= 3, "fuzz/corpus/{name} has only {n} files");
        }
    }
}
