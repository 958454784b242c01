//! Face detection cost, for `make bench`:
//!
//!     cargo run --release --example bench_detect -- [SECONDS_PER_CASE]
//!
//! 1. The detector alone (canvas, ONNX Runtime run, decoding) on one LFW photo at 250x250, and
//!    the same face enlarged into 640x480 and 1920x1080 frames: median and p99 per photo.
//! 2. End to end over HTTP (`POST /embed`, one image per request, 4 callers, flip-averaged):
//!    faces/s for whole 250x250 photos (detected and aligned) vs their 112x112 aligned crops.
//!
//! All cases run in one process: compare ratios within one run; the machine is shared and noisy.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use clap::Parser;
use image::imageops::{self, FilterType};
use image::{GenericImage, RgbImage};
use mobiface::config::{Config, Database};
use mobiface::detection::Detector;
use mobiface::metrics::Metrics;
use mobiface::startup::Application;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    config: Config,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn lfw(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/lfw")
        .join(rel)
}

/// The photo scaled to the frame's height, centred on a grey frame.
fn framed(photo: &RgbImage, w: u32, h: u32) -> RgbImage {
    let face = imageops::resize(photo, h, h, FilterType::Triangle);
    let mut frame = RgbImage::from_pixel(w, h, image::Rgb([110; 3]));
    frame
        .copy_from(&face, (w - h) / 2, 0)
        .expect("the face fits the frame");
    frame
}

async fn embed_rate(base: &str, body: serde_json::Value, secs: f64) -> (f64, f64) {
    let client = reqwest::Client::new();
    let body = Arc::new(body);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (client, body, url) = (client.clone(), body.clone(), format!("{base}/embed"));
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let resp = client.post(&url).json(&*body).send().await.expect("send");
                    assert_eq!(
                        resp.status(),
                        200,
                        "{}",
                        resp.text().await.unwrap_or_default()
                    );
                    resp.bytes().await.expect("body");
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("caller"));
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    (lat.len() as f64 / elapsed, percentile(&lat, 0.5))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(4.0);
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gallery.db");
    let mut config = Args::parse_from(["bench", "--listen=127.0.0.1:0"]).config;
    config.gallery.database = Database::Sqlite(db);

    let rel = "eval/Aaron_Eckhart/Aaron_Eckhart_0001.jpg";
    let raw = std::fs::read(lfw(rel))?;
    let photo = image::load_from_memory(&raw)?.to_rgb8();
    let detector = Detector::load(&config.detection, &config.engine, Arc::new(Metrics::new()))?;
    println!("detector alone (1 session, 1 thread)   median ms  p99 ms  faces");
    for (what, img) in [
        ("250x250 LFW photo", photo.clone()),
        ("640x480 frame", framed(&photo, 640, 480)),
        ("1920x1080 frame", framed(&photo, 1920, 1080)),
    ] {
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let (mut lat, mut faces) = (Vec::new(), 0);
        while Instant::now() < deadline {
            let t = Instant::now();
            faces = detector.detect(&img)?.len();
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        }
        lat.sort_by(f64::total_cmp);
        println!(
            "{what:<38} {:>9.1}  {:>6.1}  {faces:>5}",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99)
        );
    }
    drop(detector);

    let app = Application::build(config).await?;
    let base = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until_stopped());
    let crop = std::fs::read(lfw(&rel.replacen("eval/", "eval-aligned/", 1)))?;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    println!("POST /embed, 4 callers, 1 image each    faces/s  p50 ms");
    for (what, bytes) in [
        ("whole 250x250 photo (detected)", &raw),
        ("112x112 aligned crop", &crop),
    ] {
        let (rate, p50) =
            embed_rate(&base, serde_json::json!({"images": [b64(bytes)]}), secs).await;
        println!("{what:<38} {rate:>7.1}  {p50:>6.1}");
    }
    Ok(())
}
