//! Replicas on one PostgreSQL, for `make bench`:
//!
//!     cargo run --release --example bench_replicas -- [SECONDS_PER_CASE]
//!
//! Starts a throwaway PostgreSQL cluster (Debian's postgresql-15, `make postgres`), then
//! one and three full applications (real model, real HTTP on loopback, each with its own
//! index) on one database, and measures:
//! - enrolments/s with 4 concurrent clients spread over the replicas,
//! - identify latency (median, p99) over the replicas, sequential,
//! - visibility: time from a 201 on replica A until replica B's index holds the face
//!   (median, p99 over 200 enrolments), read in-process so no HTTP round trip is counted.
//!
//! All replicas share this machine's cores, so enrolment throughput cannot grow with
//! replicas here: on separate machines it would. Compare ratios within one run.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use clap::Parser;
use mobiface::config::Config;
use mobiface::gallery::testing::TestCluster;
use mobiface::startup::Application;
use serde_json::{json, Value};

#[derive(Parser)]
struct ConfigArgs {
    #[command(flatten)]
    config: Config,
}

struct Replica {
    address: String,
    state: mobiface::api::AppState,
}

async fn start_replica(url: &str) -> Replica {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dylib = std::env::var("ORT_DYLIB_PATH").unwrap_or_else(|_| {
        root.join("third_party/onnxruntime/libonnxruntime.so.1.31.1")
            .display()
            .to_string()
    });
    let args = [
        "bench".to_string(),
        "--listen=127.0.0.1:0".into(),
        format!("--model={}", root.join("models/mobiface.onnx").display()),
        format!("--ort-dylib={dylib}"),
        format!("--database={url}"),
    ];
    let config = ConfigArgs::try_parse_from(args).expect("config").config;
    let app = Application::build(config)
        .await
        .expect("application builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let state = app.state().clone();
    tokio::spawn(app.run_until_stopped());
    Replica { address, state }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn crop_b64() -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/lfw/eval-aligned");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("../shared/lfw/eval-aligned")
        .map(|d| d.unwrap().path())
        .collect();
    dirs.sort();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dirs[0])
        .unwrap()
        .map(|f| f.unwrap().path())
        .collect();
    files.sort();
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(&files[0]).unwrap())
}

async fn post(client: &reqwest::Client, url: String, body: &Value) -> (u16, Value) {
    let r = client.post(url).json(body).send().await.expect("sent");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn subject(client: &reqwest::Client, r: &Replica) -> String {
    let (s, v) = post(
        client,
        format!("{}/subjects", r.address),
        &json!({"name": "bench"}),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    v["id"].as_str().unwrap().to_string()
}

async fn case(replicas: &[Replica], seconds: f64, image: &str) {
    let client = reqwest::Client::new();
    let mut sids = Vec::new();
    for r in replicas {
        sids.push(subject(&client, r).await);
    }
    // Enrolment throughput: 4 clients, round-robin over replicas.
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..4 {
        let (client, done, stop) = (client.clone(), done.clone(), stop.clone());
        let targets: Vec<(String, String)> = replicas
            .iter()
            .zip(&sids)
            .map(|(r, s)| (r.address.clone(), s.clone()))
            .collect();
        let image = image.to_string();
        tasks.push(tokio::spawn(async move {
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                let (a, s) = &targets[i % targets.len()];
                let (st, v) = post(
                    &client,
                    format!("{a}/subjects/{s}/faces"),
                    &json!({"image": image}),
                )
                .await;
                assert_eq!(st, 201, "{v}");
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let rate = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();

    // Identify latency, sequential, round-robin.
    let mut lat = Vec::new();
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut i = 0;
    while Instant::now() < deadline || lat.len() < 20 {
        let r = &replicas[i % replicas.len()];
        let t = Instant::now();
        let (st, v) = post(
            &client,
            format!("{}/identify", r.address),
            &json!({"image": image, "top_k": 5}),
        )
        .await;
        assert_eq!(st, 200, "{v}");
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        i += 1;
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "replicas={} enrol/s={rate:.1} (4 clients)  identify ms: median {:.1} p99 {:.1} (n={})",
        replicas.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.len()
    );
}

/// Commit on A (the 201) -> B's index holds the face, polled in-process every 50 µs.
async fn visibility(a: &Replica, b: &Replica, image: &str, n: usize) {
    let client = reqwest::Client::new();
    let sid = subject(&client, a).await;
    let mut lat = Vec::new();
    for _ in 0..n {
        let before = b.state.gallery.counts().faces;
        let (st, v) = post(
            &client,
            format!("{}/subjects/{sid}/faces", a.address),
            &json!({"image": image}),
        )
        .await;
        assert_eq!(st, 201, "{v}");
        let t = Instant::now();
        while b.state.gallery.counts().faces == before {
            assert!(t.elapsed() < Duration::from_secs(10), "never visible on B");
            tokio::time::sleep(Duration::from_micros(50)).await;
        }
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "visibility on another replica after the 201: median {:.2} ms, p99 {:.2} ms (n={n})",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
}

#[tokio::main]
async fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(8.0);
    let cluster = TestCluster::start().unwrap_or_else(|e| panic!("{e:#}"));
    let image = crop_b64();

    let url = cluster.create_database("bench_one").expect("database");
    let one = vec![start_replica(&url).await];
    case(&one, seconds, &image).await;

    let url = cluster.create_database("bench_three").expect("database");
    let mut three = Vec::new();
    for _ in 0..3 {
        three.push(start_replica(&url).await);
    }
    case(&three, seconds, &image).await;
    visibility(&three[0], &three[1], &image, 200).await;
    // The cluster is stopped and removed when `cluster` drops.
}
