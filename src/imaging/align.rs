//! The 112x112 face crop: 5-point similarity alignment onto the ArcFace template.

use image::RgbImage;

use super::FACE_SIZE;
use crate::error::{ApiError, ErrorKind};

/// Five (x, y) points in image pixels, (0, 0) at the centre of the top-left pixel: left eye,
/// right eye, nose tip, left mouth corner, right mouth corner (left = as seen by the viewer).
pub type Landmarks = [[f32; 2]; 5];

/// Where the five landmarks land in the 112x112 crop (the ArcFace template).
pub const TEMPLATE: [[f64; 2]; 5] = [
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
];

/// Coordinates beyond this are certainly not in an image we accept, and keeping them bounded
/// keeps the fit well away from f32/f64 overflow.
const MAX_COORD: f64 = 1.0e6;

/// Eyes closer than this give a face a couple of pixels wide: the fit "succeeds" but the crop
/// would be meaningless magnification of noise.
const MIN_EYE_DISTANCE: f64 = 1.0;

/// Validates request landmarks: exactly 5 points of 2 finite numbers, not degenerate.
pub fn parse_landmarks(points: &[Vec<f64>]) -> Result<Landmarks, ApiError> {
    let bad = |msg: String| ApiError::new(ErrorKind::BadLandmarks, msg);
    if points.len() != 5 {
        return Err(bad(format!(
            "expected 5 landmarks (left eye, right eye, nose tip, left mouth corner, right mouth corner), got {}",
            points.len()
        )));
    }
    let mut out = [[0f32; 2]; 5];
    for (i, p) in points.iter().enumerate() {
        if p.len() != 2 {
            return Err(bad(format!(
                "landmarks[{i}] must be [x, y], got {} numbers",
                p.len()
            )));
        }
        for (j, &v) in p.iter().enumerate() {
            if !v.is_finite() {
                return Err(bad(format!("landmarks[{i}] is not finite")));
            }
            if v.abs() > MAX_COORD {
                return Err(bad(format!(
                    "landmarks[{i}] is out of range (coordinates must be within +-{MAX_COORD})"
                )));
            }
            out[i][j] = v as f32;
        }
    }
    let (le, re) = (out[0], out[1]);
    let eye_dist = f64::from(le[0] - re[0]).hypot(f64::from(le[1] - re[1]));
    if eye_dist < MIN_EYE_DISTANCE {
        return Err(bad(format!(
            "the two eyes are {eye_dist:.2} pixels apart; they must be at least {MIN_EYE_DISTANCE} pixel apart"
        )));
    }
    if fit_similarity(&out).is_none() {
        return Err(bad(
            "landmarks are degenerate: no similarity transform maps them onto a face".into(),
        ));
    }
    Ok(out)
}

/// The 112x112 RGB crop the model consumes: the photo aligned onto [`TEMPLATE`] through the
/// five points (always, even for a 112x112 photo: landmarks are an explicit request to align).
/// None for points no similarity maps onto the template (`parse_landmarks` refuses those).
pub fn align(img: &RgbImage, landmarks: &Landmarks) -> Option<RgbImage> {
    let inv = fit_similarity(landmarks).and_then(invert)?;
    Some(warp_affine(img, &inv))
}

/// Least-squares similarity (rotation, uniform scale, translation) taking `src` onto
/// [`TEMPLATE`], as `[a, -b, tx, b, a, ty]` (row-major 2x3). For a similarity the Umeyama /
/// skimage `SimilarityTransform.estimate` solution reduces to this closed form: with both point
/// sets centred, a = sum(s.d) / sum(|s|^2) and b = sum(s x d) / sum(|s|^2).
pub(crate) fn fit_similarity(src: &Landmarks) -> Option<[f64; 6]> {
    let n = src.len() as f64;
    let (mut msx, mut msy, mut mdx, mut mdy) = (0.0, 0.0, 0.0, 0.0);
    for (s, d) in src.iter().zip(&TEMPLATE) {
        msx += f64::from(s[0]);
        msy += f64::from(s[1]);
        mdx += d[0];
        mdy += d[1];
    }
    (msx, msy, mdx, mdy) = (msx / n, msy / n, mdx / n, mdy / n);
    let (mut dot, mut cross, mut var) = (0.0, 0.0, 0.0);
    for (s, d) in src.iter().zip(&TEMPLATE) {
        let (sx, sy) = (f64::from(s[0]) - msx, f64::from(s[1]) - msy);
        let (dx, dy) = (d[0] - mdx, d[1] - mdy);
        dot += sx * dx + sy * dy;
        cross += sx * dy - sy * dx;
        var += sx * sx + sy * sy;
    }
    // Points (nearly) all in one place: the scale is undefined.
    if var.is_nan() || var <= 1e-9 {
        return None;
    }
    let (a, b) = (dot / var, cross / var);
    let scale_sq = a * a + b * b;
    if !scale_sq.is_finite() || scale_sq <= 1e-12 {
        return None;
    }
    let tx = mdx - (a * msx - b * msy);
    let ty = mdy - (b * msx + a * msy);
    Some([a, -b, tx, b, a, ty])
}

/// Inverse of a 2x3 affine map (OpenCV's `invertAffineTransform` formula).
fn invert(m: [f64; 6]) -> Option<[f64; 6]> {
    let det = m[0] * m[4] - m[1] * m[3];
    if det == 0.0 || !det.is_finite() {
        return None;
    }
    let d = 1.0 / det;
    let (a11, a22, a12, a21) = (m[4] * d, m[0] * d, -m[1] * d, -m[3] * d);
    let b1 = -a11 * m[2] - a12 * m[5];
    let b2 = -a21 * m[2] - a22 * m[5];
    Some([a11, a12, b1, a21, a22, b2])
}

/// Bilinear warp into a 112x112 crop through the inverse map `inv` (output -> source), black
/// outside the source, pixel centres at integer coordinates, as `cv2.warpAffine(..., borderValue=0)`
/// does, but with exact floating-point weights rather than OpenCV's 1/32-pixel quantised ones.
///
/// Why exact weights: the shared LFW crops turned out to be made that way. Fed the same decoded
/// photo and re-encoded like them, this exact warp reproduces them to 0.001 grey levels on
/// average, while OpenCV's quantised grid leaves 0.49.
fn warp_affine(img: &RgbImage, inv: &[f64; 6]) -> RgbImage {
    const N: usize = FACE_SIZE as usize;
    let (w, h) = (i64::from(img.width()), i64::from(img.height()));
    let (wf, hf) = (w as f64, h as f64);
    let src = img.as_raw();
    let stride = w as usize * 3;
    let mut out = vec![0u8; N * N * 3];
    for (y, row) in out.chunks_exact_mut(N * 3).enumerate() {
        let (bx, by) = (inv[1] * y as f64 + inv[2], inv[4] * y as f64 + inv[5]);
        for (x, px) in row.chunks_exact_mut(3).enumerate() {
            let sx = inv[0] * x as f64 + bx;
            let sy = inv[3] * x as f64 + by;
            // No neighbour inside the photo (this also keeps NaN and huge values away from the
            // integer conversion below): stays black.
            if !(sx > -1.0 && sy > -1.0 && sx < wf && sy < hf) {
                continue;
            }
            let (fx0, fy0) = (sx.floor(), sy.floor());
            let (fx, fy) = (sx - fx0, sy - fy0);
            let (x0, y0) = (fx0 as i64, fy0 as i64);
            let weights = [
                (1.0 - fx) * (1.0 - fy),
                fx * (1.0 - fy),
                (1.0 - fx) * fy,
                fx * fy,
            ];
            let mut acc = [0f64; 3];
            if x0 >= 0 && y0 >= 0 && x0 + 1 < w && y0 + 1 < h {
                let i = y0 as usize * stride + x0 as usize * 3;
                let taps = [i, i + 3, i + stride, i + stride + 3];
                for (&t, &wt) in taps.iter().zip(&weights) {
                    for c in 0..3 {
                        acc[c] += wt * f64::from(src[t + c]);
                    }
                }
            } else {
                // Straddles the border: neighbours outside the photo count as black.
                for (k, &wt) in weights.iter().enumerate() {
                    let (nx, ny) = (x0 + (k & 1) as i64, y0 + (k >> 1) as i64);
                    if nx >= 0 && ny >= 0 && nx < w && ny < h {
                        let i = ny as usize * stride + nx as usize * 3;
                        for c in 0..3 {
                            acc[c] += wt * f64::from(src[i + c]);
                        }
                    }
                }
            }
            for c in 0..3 {
                // Round half up; `as` saturates, so rounding error above 255 cannot wrap.
                px[c] = (acc[c] + 0.5).floor() as u8;
            }
        }
    }
    RgbImage::from_raw(FACE_SIZE, FACE_SIZE, out)
        .unwrap_or_else(|| RgbImage::new(FACE_SIZE, FACE_SIZE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imaging::{decode, DecodeLimits};
    use image::Rgb;
    use std::path::PathBuf;

    fn lfw_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/lfw")
    }

    fn pts(p: &[[f64; 2]]) -> Vec<Vec<f64>> {
        p.iter().map(|q| q.to_vec()).collect()
    }

    fn err_of(points: &[Vec<f64>]) -> String {
        match parse_landmarks(points) {
            Ok(l) => panic!("expected BadLandmarks, got {l:?}"),
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::BadLandmarks);
                e.message
            }
        }
    }

    #[test]
    fn landmark_parsing_rejects_malformed_input() {
        let good = pts(&TEMPLATE);
        let parsed = parse_landmarks(&good).unwrap();
        assert_eq!(parsed[2], [56.0252f32, 71.7366f32]);

        let mut six = good.clone();
        six.push(vec![1.0, 2.0]);
        assert!(
            err_of(&six).contains("expected 5 landmarks"),
            "{}",
            err_of(&six)
        );
        assert!(err_of(&good[..4]).contains("got 4"));
        assert!(err_of(&[]).contains("got 0"));

        let mut nan = good.clone();
        nan[2][1] = f64::NAN;
        assert_eq!(err_of(&nan), "landmarks[2] is not finite");
        let mut inf = good.clone();
        inf[4][0] = f64::INFINITY;
        assert_eq!(err_of(&inf), "landmarks[4] is not finite");
        let mut huge = good.clone();
        huge[0][0] = 1e300; // finite in f64, infinite as f32
        assert!(err_of(&huge).contains("out of range"));

        let mut three = good.clone();
        three[1] = vec![1.0, 2.0, 3.0];
        assert_eq!(err_of(&three), "landmarks[1] must be [x, y], got 3 numbers");
        let mut one = good.clone();
        one[3] = vec![1.0];
        assert!(err_of(&one).contains("landmarks[3]"));
    }

    #[test]
    fn landmark_parsing_rejects_degenerate_sets() {
        let same = vec![vec![50.0, 50.0]; 5];
        assert!(err_of(&same).contains("eyes"));
        let mut eyes = pts(&TEMPLATE);
        eyes[1] = eyes[0].clone();
        assert!(err_of(&eyes).contains("eyes"));
        // Distinct eyes but the fit has no scale: impossible with distinct points, so check the
        // fit guard directly on a set whose points coincide.
        assert!(fit_similarity(&[[3.0, 4.0]; 5]).is_none());
    }

    #[test]
    fn similarity_fit_recovers_a_known_transform() {
        // Template identity.
        let t: Landmarks = TEMPLATE.map(|p| [p[0] as f32, p[1] as f32]);
        let m = fit_similarity(&t).unwrap();
        for (got, want) in m.iter().zip([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]) {
            assert!((got - want).abs() < 1e-5, "{m:?}");
        }
        // Source = template mapped by scale 2.5, rotation 30 degrees, shift (40, -7): the fit
        // must be that map's inverse.
        let (s, th) = (2.5f64, 30f64.to_radians());
        let (c, sn) = (s * th.cos(), s * th.sin());
        let src: Landmarks = TEMPLATE.map(|p| {
            [
                (c * p[0] - sn * p[1] + 40.0) as f32,
                (sn * p[0] + c * p[1] - 7.0) as f32,
            ]
        });
        let m = fit_similarity(&src).unwrap();
        for (p, q) in src.iter().zip(&TEMPLATE) {
            let x = m[0] * f64::from(p[0]) + m[1] * f64::from(p[1]) + m[2];
            let y = m[3] * f64::from(p[0]) + m[4] * f64::from(p[1]) + m[5];
            assert!(
                (x - q[0]).abs() < 1e-3 && (y - q[1]).abs() < 1e-3,
                "{x},{y} vs {q:?}"
            );
        }
        let scale = (m[0] * m[0] + m[3] * m[3]).sqrt();
        assert!((scale - 1.0 / s).abs() < 1e-6, "scale {scale}");
    }

    #[test]
    fn warp_with_identity_landmarks_copies_the_image_and_blacks_out_the_outside() {
        let img = RgbImage::from_fn(112, 112, |x, y| Rgb([x as u8, y as u8, (x ^ y) as u8]));
        let t: Landmarks = TEMPLATE.map(|p| [p[0] as f32, p[1] as f32]);
        let out = align(&img, &t).unwrap();
        assert_eq!(out, img);

        // Template shifted right by 20.25 px in the source: output column x samples source
        // x + 20.25, and the right edge runs off the photo into black.
        let shifted: Landmarks = TEMPLATE.map(|p| [p[0] as f32 + 20.25, p[1] as f32]);
        let out = align(&img, &shifted).unwrap();
        assert_eq!(out.get_pixel(10, 5).0[..2], [30, 5]); // 0.75 * 30 + 0.25 * 31 = 30.25
        assert_eq!(out.get_pixel(90, 5).0[0], 110); // source 110.25, both neighbours inside
        assert_eq!(out.get_pixel(91, 5).0[0], 83); // source 111.25: 0.75 * 111 + 0.25 * black
        assert_eq!(out.get_pixel(92, 5).0, [0, 0, 0]);
        assert_eq!(out.get_pixel(100, 5).0, [0, 0, 0]);
    }

    struct Row {
        image: String,
        landmarks: Landmarks,
    }

    fn read_landmarks_csv() -> Vec<Row> {
        let path = lfw_dir().join("landmarks.csv");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("shared LFW data missing at {}: {e}", path.display()));
        text.lines()
            .skip(1)
            .map(|line| {
                let f: Vec<&str> = line.split(',').collect();
                assert_eq!(f.len(), 12, "bad csv line {line}");
                let v: Vec<f64> = f[1..11].iter().map(|s| s.parse().unwrap()).collect();
                let points: Vec<Vec<f64>> = v.chunks(2).map(|c| c.to_vec()).collect();
                Row {
                    image: f[0].to_string(),
                    landmarks: parse_landmarks(&points).unwrap(),
                }
            })
            .collect()
    }

    fn mean_abs_diff(a: &RgbImage, b: &RgbImage) -> f64 {
        assert_eq!(a.dimensions(), b.dimensions());
        let sum: u64 = a
            .as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(x, y)| u64::from(x.abs_diff(*y)))
            .sum();
        sum as f64 / a.as_raw().len() as f64
    }

    /// Aligns 60 LFW photos (every 172nd row of `landmarks.csv`, so both train and eval) from
    /// their landmarks and compares with the shared crops, which are stored as JPEG q95 4:4:4.
    ///
    /// Measured (`cargo test --lib imaging::align -- --nocapture`): mean abs difference 0.98
    /// grey levels over the 60 crops, worst single crop 1.28. That is the JPEG floor: our
    /// un-encoded crop differs from its own q95 re-encoding by 0.94 on average, and zune-jpeg
    /// vs libjpeg decoding of the raw photo adds the rest. Bounds: 2.0 on the mean, 3.0 per
    /// crop. The same landmarks moved by 1.5 px give 5.9+ (checked below), so a wrong fit, a
    /// half-pixel convention slip or swapped axes cannot pass.
    #[test]
    fn alignment_reproduces_the_shared_lfw_crops() {
        let rows = read_landmarks_csv();
        assert!(rows.len() > 10_000, "landmarks.csv has {} rows", rows.len());
        let limits = DecodeLimits::default();
        let read = |rel: &str| {
            let bytes = std::fs::read(lfw_dir().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
            decode(&bytes, &limits).unwrap_or_else(|e| panic!("{rel}: {e:?}"))
        };
        let (mut total, mut count, mut worst, mut splits) =
            (0.0f64, 0usize, (0.0f64, String::new()), [0; 2]);
        let mut min_shifted = f64::INFINITY;
        for row in rows.iter().step_by(rows.len() / 60).take(60) {
            let aligned = if let Some(rest) = row.image.strip_prefix("train/") {
                splits[0] += 1;
                format!("train-aligned/{rest}")
            } else if let Some(rest) = row.image.strip_prefix("eval/") {
                splits[1] += 1;
                format!("eval-aligned/{rest}")
            } else {
                panic!("unexpected image path {}", row.image);
            };
            let reference = read(&aligned);
            let photo = read(&row.image);
            assert_eq!(photo.dimensions(), (250, 250));
            let ours = align(&photo, &row.landmarks).unwrap();
            let mean = mean_abs_diff(&ours, &reference);
            assert!(mean < 3.0, "{}: mean abs difference {mean:.3}", row.image);
            if mean > worst.0 {
                worst = (mean, row.image.clone());
            }
            total += mean;
            count += 1;

            if count <= 5 {
                let moved = row.landmarks.map(|p| [p[0] + 1.5, p[1]]);
                let off = mean_abs_diff(&align(&photo, &moved).unwrap(), &reference);
                assert!(
                    off > 3.0,
                    "{}: a 1.5 px shift only changes the crop by {off:.3}",
                    row.image
                );
                min_shifted = min_shifted.min(off);
            }
        }
        assert!(
            splits[0] > 10 && splits[1] > 5,
            "sampled train/eval {splits:?}"
        );
        let mean = total / count as f64;
        eprintln!(
            "alignment vs shared crops: {count} images, mean {mean:.3}, worst {:.3} ({}); \
             landmarks moved 1.5 px: at least {min_shifted:.3}",
            worst.0, worst.1
        );
        assert!(
            mean < 2.0,
            "mean abs difference {mean:.3} over {count} crops"
        );
    }
}
