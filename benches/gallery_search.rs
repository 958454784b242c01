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

use mobiface::gallery::index::{FaceBatch, Index, BATCH_ROWS};
use mobiface::gallery::{sqlite, Gallery};
use mobiface::metrics::Metrics;
use uuid::Uuid;

const DIM: usize = 512;
const MODEL: &str = "bench@1";
/// Concurrent callers in the second latency measurement.
const CONCURRENT: usize = 8;

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
    let mut index = Index::try_with_capacity(DIM, n, n)?;
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
    // 8 concurrent callers, each running the same queries on its own thread,
    // on snapshots as the service does (scan unlocked).
    let queries = std::fs::read(&q_path)?;
    let queries: Vec<f32> = queries
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let mut lat8: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CONCURRENT)
            .map(|c| {
                let (index, queries) = (&index, &queries);
                s.spawn(move || {
                    let mut lat = Vec::new();
                    for q in queries.chunks_exact(DIM).skip(c).step_by(CONCURRENT) {
                        let t = Instant::now();
                        let snap = index.snapshot();
                        let hits = index.resolve(snap.search(q, a.top_k, -1.0), a.top_k);
                        std::hint::black_box(hits);
                        lat.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    lat
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    lat8.sort_by(f64::total_cmp);
    let (med8, p99_8) = (percentile(&lat8, 0.5), percentile(&lat8, 0.99));
    eprintln!(
        "mobiface index  n={n:>8}  median {med:8.3} ms  p99 {p99:8.3} ms  {CONCURRENT} concurrent: median {med8:8.3} ms  \
         p99 {p99_8:8.3} ms  rss/face {rss_per_face:7.0} B  heap/face {heap_per_face:6.0} B  build {build_s:.1} s"
    );
    let spill_per_face = index.spill_bytes() as f64 / n as f64;
    drop(index);
    Ok(serde_json::json!({
        "n": n, "dim": DIM, "queries": a.queries, "top_k": a.top_k,
        "median_ms": med, "p99_ms": p99,
        "concurrent": CONCURRENT, "concurrent_median_ms": med8, "concurrent_p99_ms": p99_8,
        "spill_bytes_per_face": spill_per_face,
        "rss_bytes_per_face": rss_per_face, "heap_bytes_per_face": heap_per_face,
        "vectors": vec_path, "query_file": q_path, "top_rows": top,
    }))
}

/// Start-up load time: N faces in a SQLite file (written once and kept in the
/// output folder for later runs: a bulk write of 1M faces takes minutes), then
/// `Gallery::open` timed three times after `sync` (migrations check plus the
/// streaming index load, page cache warm); the median counts.
fn bench_load(a: &Args, n: usize) -> anyhow::Result<serde_json::Value> {
    let path = a.out.join(format!("load-{n}.db"));
    let have: Option<i64> = sqlite::open(&path).ok().and_then(|c| {
        c.query_row("SELECT count(*) FROM faces", [], |r| r.get(0))
            .ok()
    });
    let mut write_s = 0.0;
    if have != Some(n as i64) {
        for ext in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{ext}", path.display()));
        }
        let t = Instant::now();
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
        write_s = t.elapsed().as_secs_f64();
    }
    let file_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    // Dirty pages of the write (or of earlier benchmarks) would otherwise be
    // flushed during the timed opens and charged to them.
    let _ = std::process::Command::new("sync").status();
    // Next to each timed open, its two largest parts run alone on one core
    // each: stepping SQLite through the rows the load reads, and writing the
    // spill file's bytes. The load runs them on separate threads, so on two
    // free cores it cannot beat the larger of the two.
    let (mut times, mut read_times, mut spill_times) = (Vec::new(), Vec::new(), Vec::new());
    let mut build_times = Vec::new();
    for _ in 0..3 {
        build_times.push(build_index_alone(n)?);
        let t = Instant::now();
        read_rows_alone(&path)?;
        read_times.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        write_spill_alone(n * DIM * 4)?;
        spill_times.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let g = Gallery::open(&path, MODEL, DIM, Arc::new(Metrics::new()))?;
        times.push(t.elapsed().as_secs_f64());
        let faces = g.counts().faces;
        anyhow::ensure!(faces == n, "loaded {faces} faces, expected {n}");
    }
    for t in [
        &mut times,
        &mut read_times,
        &mut spill_times,
        &mut build_times,
    ] {
        t.sort_by(f64::total_cmp);
    }
    let (load_s, read_s, spill_s) = (times[1], read_times[1], spill_times[1]);
    let build_s = build_times[1];
    eprintln!(
        "gallery load    n={n:>8}  {load_s:6.2} s median of 3 ({:.0} faces/s, file {:.0} MiB, page cache warm; runs {times:.2?}); \
         alone: SQLite read {read_s:.2} s, index build {build_s:.2} s, spill write {spill_s:.2} s",
        n as f64 / load_s,
        file_bytes as f64 / 1048576.0
    );
    Ok(serde_json::json!({
        "n": n, "load_s": load_s, "load_runs_s": times, "file_bytes": file_bytes, "write_s": write_s,
        "sqlite_read_alone_s": read_s, "index_build_alone_s": build_s, "spill_write_alone_s": spill_s,
    }))
}

/// The SQLite part of a load without the index: the same statements, every
/// id parsed and every blob byte touched.
fn read_rows_alone(path: &Path) -> anyhow::Result<()> {
    let conn = sqlite::open(path)?;
    let mut n = 0usize;
    let mut stmt = conn.prepare("SELECT id, name FROM subjects ORDER BY seq")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let id = Uuid::parse_str(row.get_ref(0)?.as_str()?)?;
        let name: String = row.get(1)?;
        n += usize::from(id.as_bytes()[0]) + name.len();
    }
    let mut stmt = conn.prepare(
        "SELECT id, subject_id, model = ?1, CASE WHEN model = ?1 THEN embedding END FROM faces",
    )?;
    let mut rows = stmt.query([MODEL])?;
    let mut buf = Vec::with_capacity(DIM * 4);
    while let Some(row) = rows.next()? {
        let f = Uuid::parse_str(row.get_ref(0)?.as_str()?)?;
        let s = Uuid::parse_str(row.get_ref(1)?.as_str()?)?;
        buf.clear();
        buf.extend_from_slice(row.get_ref(3)?.as_blob()?);
        n += usize::from(f.as_bytes()[0] ^ s.as_bytes()[0]) + usize::from(buf[buf.len() - 1]);
    }
    std::hint::black_box(n);
    Ok(())
}

/// The index's part of a load without SQLite or the spill write: `n`
/// subjects, then `n` faces in the load's batches (one batch of vectors
/// repeated; the ids are made before the clock starts). Returns seconds.
fn build_index_alone(n: usize) -> anyhow::Result<f64> {
    let subjects: Vec<(Uuid, String)> = (0..n)
        .map(|i| (Uuid::new_v4(), format!("subject {i}")))
        .collect();
    let faces: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
    let mut rng = Rng(0xB111D);
    let mut v = vec![0f32; DIM];
    let vectors: Vec<Vec<u8>> = (0..BATCH_ROWS)
        .map(|_| {
            rng.unit(&mut v);
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        })
        .collect();
    let t = Instant::now();
    let mut index = Index::try_with_capacity(DIM, n, n)?;
    let mut batch = FaceBatch::with_capacity(BATCH_ROWS, DIM);
    for (id, name) in subjects.iter().cloned() {
        index.add_subject(id, name);
    }
    for (i, f) in faces.iter().enumerate() {
        batch.push(*f, subjects[i].0, &vectors[i % BATCH_ROWS]);
        if batch.len() == BATCH_ROWS || i + 1 == n {
            let (_, refused) = index.add_batch(&mut batch);
            anyhow::ensure!(refused == 0, "{refused} faces refused");
            batch.clear();
        }
    }
    let s = t.elapsed().as_secs_f64();
    anyhow::ensure!(index.faces() == n, "built {} faces", index.faces());
    Ok(s)
}

/// The spill file's part of a load without the index: `bytes` written to an
/// unlinked file in the temporary folder, 2 MiB at a time, as the load does.
fn write_spill_alone(bytes: usize) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let path = std::env::temp_dir().join(format!("mobiface-bench-spill-{}", std::process::id()));
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    let chunk = vec![1u8; 2 << 20];
    let mut at = 0;
    while at < bytes {
        let m = chunk.len().min(bytes - at);
        file.write_all_at(&chunk[..m], at as u64)?;
        at += m;
    }
    Ok(())
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
