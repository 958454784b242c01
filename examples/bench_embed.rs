//! Embedding throughput and latency of the engine (no HTTP), for `make bench`.
//!
//!     cargo run --release --example bench_embed -- [SECONDS_PER_CASE]
//!
//! For each engine layout (workers x intra-op threads, max batch) and number of concurrent
//! callers, embeds real LFW crops with flip-averaging for a fixed time and
//! prints faces/s and per-request latency (median, p99). All cases run in one
//! process, so compare ratios within one run; the machine is shared and noisy.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use mobiface::config::EngineConfig;
use mobiface::engine::Engine;
use mobiface::metrics::Metrics;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    engine: EngineConfig,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn crops(n: usize) -> Vec<image::RgbImage> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/lfw/eval-aligned");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("../shared/lfw/eval-aligned")
        .flat_map(|d| {
            std::fs::read_dir(d.unwrap().path())
                .unwrap()
                .map(|f| f.unwrap().path())
        })
        .collect();
    files.sort();
    files
        .iter()
        .take(n)
        .map(|p| image::open(p).expect("crop decodes").to_rgb8())
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(4.0);
    let base = Args::parse_from(["bench"]).engine;
    let faces = Arc::new(crops(64));
    println!("workers x threads, max batch   callers  faces/s  p50 ms  p99 ms  largest run");
    let layouts = [
        (1, 1, 2),
        (1, 1, 8),
        (1, 1, 16),
        (1, 2, 2),
        (1, 2, 16),
        (2, 1, 2),
        (2, 1, 16),
    ];
    for (workers, intra, max_batch) in layouts {
        for callers in [1usize, 4, 16] {
            let cfg = EngineConfig {
                workers,
                intra_threads: intra,
                max_batch: Some(max_batch),
                ..base.clone()
            };
            let engine = Engine::start(&cfg, Arc::new(Metrics::new()))?;
            let deadline = Instant::now() + Duration::from_secs_f64(secs);
            let start = Instant::now();
            let tasks: Vec<_> = (0..callers)
                .map(|c| {
                    let (engine, faces) = (engine.clone(), faces.clone());
                    tokio::spawn(async move {
                        let mut lat = Vec::new();
                        let mut i = c;
                        while Instant::now() < deadline {
                            let t = Instant::now();
                            engine
                                .embed(vec![faces[i % faces.len()].clone()], true)
                                .await
                                .expect("embed");
                            lat.push(t.elapsed().as_secs_f64() * 1e3);
                            i += callers;
                        }
                        lat
                    })
                })
                .collect();
            let mut lat = Vec::new();
            for t in tasks {
                lat.extend(t.await?);
            }
            let elapsed = start.elapsed().as_secs_f64();
            lat.sort_by(f64::total_cmp);
            println!(
                "{workers} x {intra}, max batch {max_batch:>2}  {callers:>16}  {:>7.1}  {:>6.1}  {:>6.1}  {:>4}",
                lat.len() as f64 / elapsed,
                percentile(&lat, 0.5),
                percentile(&lat, 0.99),
                engine.stats().largest_run
            );
        }
    }
    Ok(())
}
