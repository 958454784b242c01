//! YuNet's input and output: the photo on a fixed 640x640 canvas, and the decoding of its three
//! stride heads (8, 16, 32 pixels) into scored boxes with 5 landmarks, then non-maximum
//! suppression. Mirrors OpenCV's `FaceDetectorYN` (objdetect/src/face_detect.cpp), which the
//! golden test below checks on real photos.

use image::imageops;
use image::RgbImage;

use super::{BoundingBox, Face};

/// Side of the square input the model file takes (its input shape is fixed).
pub const SIDE: usize = 640;
/// Floats in one input (3 x 640 x 640, CHW).
pub const INPUT_LEN: usize = 3 * SIDE * SIDE;
/// The strides of the three heads, in the order of [`OUTPUT_NAMES`].
pub const STRIDES: [usize; 3] = [8, 16, 32];
/// IoU above which the lower-scored of two boxes is dropped (OpenCV's default for YuNet).
pub const NMS_IOU: f32 = 0.3;

/// Output tensor names, per head: classification, objectness, box, landmarks.
pub fn output_names(stride: usize) -> [String; 4] {
    ["cls", "obj", "bbox", "kps"].map(|k| format!("{k}_{stride}"))
}

/// Raw outputs of one run, one entry per stride in [`STRIDES`] order.
#[derive(Debug, Clone, Default)]
pub struct RawOutputs {
    pub heads: Vec<Head>,
}

#[derive(Debug, Clone, Default)]
pub struct Head {
    /// One per anchor point (row-major over the stride's grid).
    pub cls: Vec<f32>,
    pub obj: Vec<f32>,
    /// 4 per anchor: centre offset (dx, dy) in cells, log width and height in cells.
    pub bbox: Vec<f32>,
    /// 10 per anchor: five (dx, dy) offsets in cells from the anchor's cell corner.
    pub kps: Vec<f32>,
}

/// The photo scaled to fit the canvas (never enlarged: faces of small photos are already at a
/// scale the detector sees well) at its top-left corner, black elsewhere, as BGR 0..255 CHW
/// floats. Returns the input and the factor from canvas pixels back to photo pixels.
pub fn letterbox(img: &RgbImage) -> (Vec<f32>, f32) {
    let (w, h) = img.dimensions();
    let longest = w.max(h).max(1);
    let (scaled, back) = if longest as usize <= SIDE {
        (None, 1.0)
    } else {
        let s = SIDE as f64 / f64::from(longest);
        let nw = ((f64::from(w) * s).round() as u32).clamp(1, SIDE as u32);
        let nh = ((f64::from(h) * s).round() as u32).clamp(1, SIDE as u32);
        // Box averaging (integer arithmetic, alias-free): a Triangle resize of a 1920x1080
        // frame cost more than the detector run itself.
        let resized = imageops::thumbnail(img, nw, nh);
        (Some(resized), longest as f32 / SIDE as f32)
    };
    let src = scaled.as_ref().unwrap_or(img);
    let mut input = vec![0f32; INPUT_LEN];
    let plane = SIDE * SIDE;
    for (x, y, p) in src.enumerate_pixels() {
        let i = y as usize * SIDE + x as usize;
        // BGR: the model was trained on OpenCV's channel order.
        input[i] = f32::from(p[2]);
        input[plane + i] = f32::from(p[1]);
        input[2 * plane + i] = f32::from(p[0]);
    }
    (input, back)
}

/// Every anchor scoring at least `threshold`, decoded into canvas pixels, after NMS; best first.
pub fn decode(out: &RawOutputs, threshold: f32) -> Vec<Face> {
    let mut faces = Vec::new();
    for (head, &stride) in out.heads.iter().zip(&STRIDES) {
        let cols = SIDE / stride;
        let st = stride as f32;
        let n = head
            .cls
            .len()
            .min(head.obj.len())
            .min(head.bbox.len() / 4)
            .min(head.kps.len() / 10);
        for i in 0..n {
            let cls = head.cls[i].clamp(0.0, 1.0);
            let obj = head.obj[i].clamp(0.0, 1.0);
            let score = (cls * obj).sqrt();
            // NaN scores are dropped too.
            if score.is_nan() || score < threshold {
                continue;
            }
            let (c, r) = ((i % cols) as f32, (i / cols) as f32);
            let b = &head.bbox[4 * i..4 * i + 4];
            let (cx, cy) = ((c + b[0]) * st, (r + b[1]) * st);
            let (w, h) = (b[2].exp() * st, b[3].exp() * st);
            let k = &head.kps[10 * i..10 * i + 10];
            let landmarks = std::array::from_fn(|j| [(k[2 * j] + c) * st, (k[2 * j + 1] + r) * st]);
            let face = Face {
                bbox: BoundingBox {
                    x: cx - w / 2.0,
                    y: cy - h / 2.0,
                    width: w,
                    height: h,
                },
                score,
                landmarks,
            };
            if face.is_finite() {
                faces.push(face);
            }
        }
    }
    nms(faces, NMS_IOU)
}

/// Greedy non-maximum suppression, best score first (ties keep decoding order, as OpenCV's
/// stable sort does).
pub fn nms(mut faces: Vec<Face>, iou_limit: f32) -> Vec<Face> {
    faces.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<Face> = Vec::new();
    for f in faces {
        if kept.iter().all(|k| iou(&k.bbox, &f.bbox) <= iou_limit) {
            kept.push(f);
        }
    }
    kept
}

/// Intersection over union of two boxes (0 for empty ones).
pub fn iou(a: &BoundingBox, b: &BoundingBox) -> f32 {
    let ix = (a.x + a.width).min(b.x + b.width) - a.x.max(b.x);
    let iy = (a.y + a.height).min(b.y + b.height) - a.y.max(b.y);
    if ix <= 0.0 || iy <= 0.0 {
        return 0.0;
    }
    let inter = ix * iy;
    let union = a.width * a.height + b.width * b.height - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bx(x: f32, y: f32, w: f32, h: f32) -> BoundingBox {
        BoundingBox {
            x,
            y,
            width: w,
            height: h,
        }
    }

    fn face(b: BoundingBox, score: f32) -> Face {
        Face {
            bbox: b,
            score,
            landmarks: [[0.0; 2]; 5],
        }
    }

    #[test]
    fn iou_of_known_boxes() {
        assert_eq!(
            iou(&bx(0.0, 0.0, 10.0, 10.0), &bx(0.0, 0.0, 10.0, 10.0)),
            1.0
        );
        assert_eq!(
            iou(&bx(0.0, 0.0, 10.0, 10.0), &bx(10.0, 0.0, 10.0, 10.0)),
            0.0
        );
        // Half overlap: 50 / 150.
        let v = iou(&bx(0.0, 0.0, 10.0, 10.0), &bx(5.0, 0.0, 10.0, 10.0));
        assert!((v - 1.0 / 3.0).abs() < 1e-6, "{v}");
        assert_eq!(iou(&bx(0.0, 0.0, 0.0, 0.0), &bx(0.0, 0.0, 0.0, 0.0)), 0.0);
    }

    #[test]
    fn nms_keeps_the_best_of_overlapping_boxes_and_all_separate_ones() {
        let faces = vec![
            face(bx(0.0, 0.0, 10.0, 10.0), 0.7),
            face(bx(1.0, 0.0, 10.0, 10.0), 0.9), // IoU 0.82 with the first: it wins
            face(bx(5.0, 0.0, 10.0, 10.0), 0.8), // IoU 0.43 with the winner: dropped
            face(bx(100.0, 0.0, 10.0, 10.0), 0.6),
            face(bx(7.0, 0.0, 10.0, 10.0), 0.65), // IoU 0.25 with the winner: kept
        ];
        let kept = nms(faces, 0.3);
        let scores: Vec<f32> = kept.iter().map(|f| f.score).collect();
        assert_eq!(scores, [0.9, 0.65, 0.6]);
    }

    /// One anchor lit on each head, everything else zero; checks the grid arithmetic.
    #[test]
    fn decoding_places_anchors_on_their_grid_cells() {
        let mut out = RawOutputs::default();
        for &stride in &STRIDES {
            let n = (SIDE / stride) * (SIDE / stride);
            out.heads.push(Head {
                cls: vec![0.0; n],
                obj: vec![0.0; n],
                bbox: vec![0.0; 4 * n],
                kps: vec![0.0; 10 * n],
            });
        }
        // Stride 16: row 3, column 5 of a 40-wide grid; score sqrt(0.81 * 1.0) = 0.9.
        let h = &mut out.heads[1];
        let i = 3 * 40 + 5;
        h.cls[i] = 0.81;
        h.obj[i] = 1.7; // clamped to 1
        h.bbox[4 * i..4 * i + 4].copy_from_slice(&[0.5, 0.25, 2f32.ln(), 0.0]);
        h.kps[10 * i..10 * i + 2].copy_from_slice(&[1.0, -1.0]);
        // Stride 32: below the threshold.
        out.heads[2].cls[0] = 0.2;
        out.heads[2].obj[0] = 0.2;
        // A NaN anywhere must not produce a face.
        out.heads[0].cls[7] = f32::NAN;
        out.heads[0].obj[7] = 1.0;

        let faces = decode(&out, 0.5);
        assert_eq!(faces.len(), 1, "{faces:?}");
        let f = &faces[0];
        assert!((f.score - 0.9).abs() < 1e-6);
        // Centre ((5 + 0.5) * 16, (3 + 0.25) * 16) = (88, 52), size (32, 16).
        assert_eq!(
            (f.bbox.x, f.bbox.y, f.bbox.width, f.bbox.height),
            (72.0, 44.0, 32.0, 16.0)
        );
        assert_eq!(f.landmarks[0], [96.0, 32.0]);
        assert_eq!(f.landmarks[1], [80.0, 48.0]);
    }

    #[test]
    fn letterbox_keeps_small_photos_at_scale_and_shrinks_big_ones() {
        let img = RgbImage::from_fn(30, 20, |x, _| image::Rgb([x as u8, 100, 200]));
        let (input, back) = letterbox(&img);
        assert_eq!(back, 1.0);
        assert_eq!(input.len(), INPUT_LEN);
        let plane = SIDE * SIDE;
        // BGR planes.
        assert_eq!(input[7], 200.0);
        assert_eq!(input[plane + 7], 100.0);
        assert_eq!(input[2 * plane + 7], 7.0);
        // Black outside the photo.
        assert_eq!(input[30], 0.0);
        assert_eq!(input[20 * SIDE], 0.0);

        let big = RgbImage::from_pixel(1920, 1080, image::Rgb([10, 20, 30]));
        let (input, back) = letterbox(&big);
        assert!((back - 3.0).abs() < 1e-6);
        assert_eq!(input[2 * plane + 359 * SIDE + 639], 10.0);
        assert_eq!(input[2 * plane + 360 * SIDE], 0.0);
    }
}
