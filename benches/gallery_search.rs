//! 1:N search benchmark (not a test): exact search over N random 512-d unit
//! vectors with the gallery's in-memory index, and the gallery's start-up load
//! time from SQLite. Writes the same vectors and queries to files so
//! `benches/faiss_search.py` can time FAISS `IndexFlatIP` on identical data;
//! `benches/gallery_search.sh` runs both and prints the comparison.
//!
//! cargo bench --bench gallery_search -- --out DIR [--sizes 10000,100000,1000000]
//!     [--queries 200] [--load-sizes 100000,1000000] [--top-k 5]

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use mobiface::gallery::index::Index;
use mobiface::gallery::{sqlite, Gallery};
use mobiface::metrics::Metrics;
use uuid::Uuid;

const DIM: usize = 512;
const MODEL: &str = "bench@1";

/// SplitMix64: fast, seedable, and plenty random for benchmark vectors
/// (generating 512M floats with a cryptographic RNG would dominate the run).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Approximately Gaussian (sum of four uniforms), so normalised vectors
    /// point in nearly uniform directions.
    fn unit(&mut self, out: &mut [f32]) {
        for x in out.iter_mut() {
            let r = self.next();
            *x = (0..4)
                .map(|i| ((r >> (16 * i)) & 0xFFFF) as f32 / 65535.0 - 0.5)
                .sum();
        }
        let n = out.iter().map(|x| x * x).sum::<f32>().sqrt();
        out.iter_mut().for_each(|x| *x /= n);
    }
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn write_f32(w: &mut impl Write, v: &[f32]) -> std::io::Result<()> {
    for x in v {
        w.write_all(&x.to_le_bytes())?;
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Args {
    out: PathBuf,
    sizes: Vec<usize>,
    load_sizes: Vec<usize>,
    queries: usize,
    top_k: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        out: PathBuf::from("target/bench-gallery"),
        sizes: vec![10_000, 100_000, 1_000_000],
        load_sizes: vec![100_000, 1_000_000],
        queries: 200,
        top_k: 5,
    };
    let list =
        |s: &str| -> Vec<usize> { s.split(',').filter_map(|x| x.trim().parse().ok()).collect() };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--out" => a.out = PathBuf::from(val),
            "--sizes" => a.sizes = list(&val),
            "--load-sizes" => a.load_sizes = list(&val),
            "--queries" => a.queries = val.parse().unwrap_or(a.queries),
            "--top-k" => a.top_k = val.parse().unwrap_or(a.top_k),
            // `cargo bench` passes `--bench`; ignore it and anything unknown.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

/// Search latency at one size; returns the JSON fragment for it.
fn bench_search(a: &Args, n: usize) -> anyhow::Result<serde_json::Value> {
    let mut rng = Rng(0x5EED ^ n as u64);
    let vec_path = a.out.join(format!("vectors-{n}.f32"));
    let q_path = a.out.join(format!("queries-{n}.f32"));
    let mut vw = BufWriter::new(std::fs::File::create(&vec_path)?);

    let rss0 = rss_bytes();
    let t = Instant::now();
    // One face per subject, so "top-k subjects" and FAISS's "top-k vectors" are
    // the same question and the results can be compared id for id.
    let mut index = Index::with_capacity(DIM, n, n);
    let mut v = vec![0f32; DIM];
    for _ in 0..n {
        rng.unit(&mut v);
        write_f32(&mut vw, &v)?;
        let (s, f) = (Uuid::new_v4(), Uuid::new_v4());
        index.add_subject(s, String::new());
        index.add_face(f, &s, &v);
    }
    vw.flush()?;
    let build_s = t.elapsed().as_secs_f64();
    let rss_per_face = (rss_bytes().saturating_sub(rss0)) as f64 / n as f64;
    let heap_per_face = index.heap_bytes() as f64 / n as f64;

    let mut qw = BufWriter::new(std::fs::File::create(&q_path)?);
    let mut lat = Vec::with_capacity(a.queries);
    let mut top = Vec::with_capacity(a.queries);
    let mut q = vec![0f32; DIM];
    for _ in 0..a.queries {
        rng.unit(&mut q);
        write_f32(&mut qw, &q)?;
        let t = Instant::now();
        let hits = index.search(&q, a.top_k, -1.0);
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        // Rows equal insertion order here (no deletes), which is FAISS's numbering.
        top.push(
            hits.iter()
                .filter_map(|h| index.row_of_face(&h.face_id))
                .collect::<Vec<_>>(),
        );
    }
    qw.flush()?;
    let mut sorted = lat.clone();
    sorted.sort_by(f64::total_cmp);
    let (med, p99) = (percentile(&sorted, 0.5), percentile(&sorted, 0.99));
    eprintln!(
        "mobiface index  n={n:>8}  median {med:8.3} ms  p99 {p99:8.3} ms  rss/face {rss_per_face:7.0} B  \
         heap/face {heap_per_face:6.0} B  build {build_s:.1} s"
    );
    drop(index);
    Ok(serde_json::json!({
        "n": n, "dim": DIM, "queries": a.queries, "top_k": a.top_k,
        "median_ms": med, "p99_ms": p99,
        "rss_bytes_per_face": rss_per_face, "heap_bytes_per_face": heap_per_face,
        "vectors": vec_path, "query_file": q_path, "top_rows": top,
    }))
}

/// Start-up load time: N faces written to a fresh SQLite file, then
/// `Gallery::open` timed (migrations check plus the streaming index load).
fn bench_load(a: &Args, n: usize) -> anyhow::Result<serde_json::Value> {
    let path = a.out.join(format!("load-{n}.db"));
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", path.display()));
    }
    let t = Instant::now();
    {
        let conn = sqlite::open(&path)?;
        // Bulk import in one transaction: per-row fsync is what the service
        // does for acknowledged writes, but would make this set-up take hours.
        let tx = conn.unchecked_transaction()?;
        let mut rng = Rng(0x10AD ^ n as u64);
        let mut v = vec![0f32; DIM];
        for i in 0..n {
            let s = Uuid::new_v4();
            sqlite::insert_subject(&tx, &s, &format!("subject {i}"), "{}")?;
            rng.unit(&mut v);
            sqlite::insert_face(&tx, &Uuid::new_v4(), &s, &v, MODEL)?;
        }
        tx.commit()?;
        sqlite::checkpoint(&conn)?;
    }
    let write_s = t.elapsed().as_secs_f64();
    let file_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let t = Instant::now();
    let g = Gallery::open(&path, MODEL, DIM, Arc::new(Metrics::new()))?;
    let load_s = t.elapsed().as_secs_f64();
    let faces = g.counts().faces;
    anyhow::ensure!(faces == n, "loaded {faces} faces, wrote {n}");
    drop(g);
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", path.display()));
    }
    eprintln!(
        "gallery load    n={n:>8}  {load_s:6.2} s  ({:.0} faces/s, file {:.0} MiB, page cache warm; bulk write {write_s:.1} s)",
        n as f64 / load_s,
        file_bytes as f64 / 1048576.0
    );
    Ok(
        serde_json::json!({ "n": n, "load_s": load_s, "file_bytes": file_bytes, "write_s": write_s }),
    )
}

fn run(a: &Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.out)?;
    let mut search = Vec::new();
    for &n in &a.sizes {
        search.push(bench_search(a, n)?);
    }
    let mut load = Vec::new();
    for &n in &a.load_sizes {
        load.push(bench_load(a, n)?);
    }
    let report = serde_json::json!({ "search": search, "load": load });
    let path: &Path = &a.out.join("mobiface.json");
    std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn main() {
    let a = parse_args();
    if let Err(e) = run(&a) {
        eprintln!("gallery_search bench failed: {e:#}");
        std::process::exit(1);
    }
}
