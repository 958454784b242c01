//! `mobiface align`: detects and aligns every photo under a folder with the service's own code,
//! writing the 112x112 crops under the same relative paths (training data for the model).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use clap::Args;

use super::{Chosen, Detector, Multiple};
use crate::config::{DetectorConfig, EngineConfig};
use crate::error::ErrorKind;
use crate::imaging::{self, DecodeLimits};
use crate::metrics::Metrics;

#[derive(Debug, Clone, Args)]
pub struct AlignArgs {
    /// Folder of photos (JPEG, PNG, WebP, BMP), searched recursively.
    #[arg(long)]
    pub images: PathBuf,
    /// Where the crops go, under the same relative paths (JPEG quality 95 for .jpg/.jpeg, else
    /// PNG), with `detections.csv`: each photo's five points, score and face count.
    #[arg(long)]
    pub out: PathBuf,
    /// Photos aligned at once (each with its own detector session).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    #[command(flatten)]
    pub engine: EngineConfig,
    #[command(flatten)]
    pub detection: DetectorConfig,
}

const LIMITS: DecodeLimits = DecodeLimits {
    max_side: 8192,
    max_decoded_bytes: 256 * 1024 * 1024,
};

fn photos(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                ["jpg", "jpeg", "png", "webp", "bmp"].contains(&e.to_ascii_lowercase().as_str())
            }) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// One photo: Ok(None) when it holds no usable face.
fn align_one(detector: &Detector, path: &Path, out: &Path) -> anyhow::Result<Option<Chosen>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let img =
        imaging::decode(&bytes, &LIMITS).with_context(|| format!("decoding {}", path.display()))?;
    let chosen = match detector.choose(&img, Multiple::Largest) {
        Ok(c) => c,
        Err(e) if matches!(e.kind, ErrorKind::NoFace | ErrorKind::FaceTooSmall) => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("{}", path.display())),
    };
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let jpeg = out
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("jpg") || e.eq_ignore_ascii_case("jpeg"));
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = std::io::BufWriter::new(file);
    if jpeg {
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut w, 95)
            .encode_image(&chosen.crop)?;
    } else {
        chosen.crop.write_to(&mut w, image::ImageFormat::Png)?;
    }
    Ok(Some(chosen))
}

pub fn run(args: AlignArgs) -> anyhow::Result<()> {
    let list = photos(&args.images)?;
    if list.is_empty() {
        bail!("no photos under {}", args.images.display());
    }
    let mut cfg = args.detection.clone();
    cfg.detector_sessions = args.threads.max(1);
    let detector = Detector::load(&cfg, &args.engine, Arc::new(Metrics::new()))
        .context("loading the face detector")?;
    let next = AtomicUsize::new(0);
    let rows: Mutex<Vec<(usize, String)>> = Mutex::new(Vec::new());
    let failed: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let done = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..cfg.detector_sessions {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(path) = list.get(i) else { break };
                if failed.lock().map(|f| f.is_some()).unwrap_or(true) {
                    break;
                }
                let rel = path.strip_prefix(&args.images).unwrap_or(path);
                match align_one(&detector, path, &args.out.join(rel)) {
                    Ok(chosen) => {
                        let mut row = rel.display().to_string();
                        match chosen {
                            Some(c) => {
                                for p in c.face.landmarks {
                                    let _ = write!(row, ",{:.2},{:.2}", p[0], p[1]);
                                }
                                let _ = write!(row, ",{:.4},{}", c.face.score, c.faces_detected);
                            }
                            None => row.push_str(",,,,,,,,,,,,0"),
                        }
                        if let Ok(mut r) = rows.lock() {
                            r.push((i, row));
                        }
                    }
                    Err(e) => {
                        if let Ok(mut f) = failed.lock() {
                            f.get_or_insert(e);
                        }
                    }
                }
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_multiple_of(1000) {
                    eprintln!("mobiface align: {n}/{} photos", list.len());
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().ok().flatten() {
        return Err(e);
    }
    let mut rows = rows.into_inner().unwrap_or_default();
    rows.sort();
    let missing = rows.iter().filter(|(_, r)| r.ends_with(",,0")).count();
    let mut csv = String::from(
        "image,left_eye_x,left_eye_y,right_eye_x,right_eye_y,nose_x,nose_y,mouth_left_x,mouth_left_y,mouth_right_x,mouth_right_y,score,faces\n",
    );
    for (_, r) in &rows {
        csv.push_str(r);
        csv.push('\n');
    }
    std::fs::create_dir_all(&args.out)?;
    let csv_path = args.out.join("detections.csv");
    std::fs::write(&csv_path, csv).with_context(|| format!("writing {}", csv_path.display()))?;
    eprintln!(
        "mobiface align: {} photos, {} aligned, {missing} without a usable face (listed with empty points in {})",
        rows.len(),
        rows.len() - missing,
        csv_path.display()
    );
    Ok(())
}
