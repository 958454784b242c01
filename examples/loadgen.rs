//! Closed-loop HTTP load generator for `make bench`: the same one drives the
//! service and the peer (benches/peer_server.py), so their figures compare.
//!
//!     cargo run --release --example loadgen -- --url http://127.0.0.1:8080/embed \
//!         --callers 8 --faces 1 --seconds 10 [--crops ../shared/lfw/eval-aligned] [--no-flip]
//!
//! Each caller sends `POST /embed` with `--faces` aligned crops (base64 JSON, as
//! the service's API takes them), waits for the answer, and sends the next: the
//! offered load is whatever the server sustains. A short warm-up is not counted.
//! Prints one JSON line: faces/s, requests, errors, latency p50/p99 in ms.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    url: String,
    #[arg(long, default_value_t = 1)]
    callers: usize,
    /// Faces per request.
    #[arg(long, default_value_t = 1)]
    faces: usize,
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    #[arg(long, default_value_t = 1.0)]
    warmup_seconds: f64,
    /// Folder of person folders of aligned 112x112 JPEG crops.
    #[arg(long, default_value = "../shared/lfw/eval-aligned")]
    crops: PathBuf,
    #[arg(long)]
    no_flip: bool,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// 64 request bodies cycling through the first crops in name order.
fn bodies(a: &Args) -> anyhow::Result<Vec<bytes::Bytes>> {
    let mut files = Vec::new();
    for person in std::fs::read_dir(&a.crops)? {
        for f in std::fs::read_dir(person?.path())? {
            files.push(f?.path());
        }
    }
    files.sort();
    files.truncate(64 * a.faces);
    anyhow::ensure!(!files.is_empty(), "no crops under {}", a.crops.display());
    let b64: Vec<String> = files
        .iter()
        .map(|p| std::fs::read(p).map(|b| base64::engine::general_purpose::STANDARD.encode(b)))
        .collect::<Result<_, _>>()?;
    Ok((0..64)
        .map(|i| {
            let images: Vec<&String> = (0..a.faces)
                .map(|j| &b64[(i * a.faces + j) % b64.len()])
                .collect();
            let body = serde_json::json!({ "images": images, "flip": !a.no_flip });
            bytes::Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
        })
        .collect())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let bodies = std::sync::Arc::new(bodies(&a)?);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(a.callers)
        .timeout(Duration::from_secs(120))
        .build()?;
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(a.warmup_seconds);
    let deadline = measure_from + Duration::from_secs_f64(a.seconds);
    let tasks: Vec<_> = (0..a.callers)
        .map(|c| {
            let (client, bodies, url) = (client.clone(), bodies.clone(), a.url.clone());
            tokio::spawn(async move {
                let (mut lat, mut errors, mut i) = (Vec::new(), 0u64, c);
                loop {
                    let t = Instant::now();
                    if t >= deadline {
                        break;
                    }
                    let res = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(bodies[i % bodies.len()].clone())
                        .send()
                        .await;
                    let ok = match res {
                        Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    // Only requests that start after the warm-up and end by the deadline count.
                    let done = Instant::now();
                    if t >= measure_from && done <= deadline {
                        if ok {
                            lat.push((done - t).as_secs_f64() * 1e3);
                        } else {
                            errors += 1;
                        }
                    }
                    i += a.callers;
                }
                (lat, errors)
            })
        })
        .collect();
    let (mut lat, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await?;
        lat.extend(l);
        errors += e;
    }
    lat.sort_by(f64::total_cmp);
    let out = serde_json::json!({
        "callers": a.callers, "faces_per_request": a.faces, "flip": !a.no_flip,
        "seconds": a.seconds, "requests": lat.len(), "errors": errors,
        "faces_per_s": (lat.len() * a.faces) as f64 / a.seconds,
        "p50_ms": percentile(&lat, 0.5), "p99_ms": percentile(&lat, 0.99),
    });
    println!("{out}");
    Ok(())
}
