"""Measure an exported model on an LFW pairs file with onnxruntime; optionally write thresholds.

    .venv/bin/python models/calibrate.py --model models/mobiface.onnx \
        --pairs ../shared/lfw/pairs-eval.txt --images ../shared/lfw/eval-aligned [--write]

Preprocessing is the service's: the 112x112 RGB crop, (pixel - 127.5) / 128, NCHW; with flip the
embedding of the crop and of its mirror are averaged, then L2-normalised; scores are cosines.
Prints k-fold accuracy (k = folds in the file), AUC, TAR at FAR 1e-2 / 1e-3, without and with
flip. With --write, stores in the model's metadata (from the flip-averaged scores, which is how
the service runs by default): mobiface.threshold = the best-accuracy threshold over all pairs,
mobiface.threshold_far_1e-2 / _1e-3 = the lowest thresholds whose false-accept rate on the
file's impostor pairs is at most 1e-2 / 1e-3, and the accuracy figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from pairs import read_pairs, report  # noqa: E402


def embed(sess, paths, flip: bool, bs: int = 32) -> np.ndarray:
    out = []
    for i in range(0, len(paths), bs):
        x = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) for p in paths[i:i + bs]])
        x = ((x - 127.5) / 128.0).transpose(0, 3, 1, 2)
        if flip:
            both = np.ascontiguousarray(np.concatenate([x, x[..., ::-1]]), np.float32)
            e = sess.run(["embedding"], {"input": both})[0]
            e = (e[: len(x)] + e[len(x):]) / 2
        else:
            e = sess.run(["embedding"], {"input": np.ascontiguousarray(x, np.float32)})[0]
        out.append(e / np.linalg.norm(e, axis=1, keepdims=True))
    return np.concatenate(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(HERE, "mobiface.onnx"))
    ap.add_argument("--pairs", default=os.path.join(HERE, "..", "..", "shared", "lfw", "pairs-eval.txt"))
    ap.add_argument("--images", default=os.path.join(HERE, "..", "..", "shared", "lfw", "eval-aligned"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="write thresholds into the model's metadata")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    n_folds, pairs = read_pairs(args.pairs)
    names = sorted({p for a, b, _, _ in pairs for p in (a, b)})
    idx = {n: i for i, n in enumerate(names)}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])
    labels = np.array([p[2] for p in pairs])
    folds = np.array([p[3] for p in pairs])
    results = {}
    paths = [os.path.join(args.images, n) for n in names]
    for flip in (False, True):
        e = embed(sess, paths, flip)
        sc = np.array([float(e[idx[a]] @ e[idx[b]]) for a, b, _, _ in pairs])
        r = report(sc, labels, folds, n_folds)
        results["flip" if flip else "noflip"] = r
        print(f"{os.path.basename(args.model)} flip={'true' if flip else 'false'}: {n_folds}-fold accuracy "
              f"{r['accuracy'] * 100:.2f}% (std {r['accuracy_std'] * 100:.2f}), AUC {r['auc']:.4f}, "
              f"TAR@FAR1e-2 {r['tar_far_1e-2'] * 100:.1f}%, TAR@FAR1e-3 {r['tar_far_1e-3'] * 100:.1f}%, "
              f"best-accuracy threshold {r['best_threshold']:.4f} ({r['best_threshold_accuracy'] * 100:.2f}% "
              f"on all pairs), FAR thresholds 1e-2 {r['threshold_far_1e-2']:.4f} 1e-3 {r['threshold_far_1e-3']:.4f}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.write:
        from onnx_meta import get_metadata, set_metadata
        m = onnx.load(args.model)
        if get_metadata(m).get("mobiface.trained") != "true":
            print("refusing to write calibrated thresholds into an untrained model", file=sys.stderr)
            return 1
        r = results["flip"]
        set_metadata(m, {
            "mobiface.threshold": f"{r['best_threshold']:.6f}",
            "mobiface.threshold_far_1e-2": f"{r['threshold_far_1e-2']:.6f}",
            "mobiface.threshold_far_1e-3": f"{r['threshold_far_1e-3']:.6f}",
            "mobiface.threshold_calibrated": "true",
            "mobiface.threshold_note": (
                f"cosine of flip-averaged, L2-normalised embeddings; calibrated on "
                f"{os.path.basename(args.pairs)} ({len(pairs)} pairs, {int((labels == 0).sum())} impostor); "
                f"FAR 1e-3 from so few impostor pairs is a rough estimate"),
            "mobiface.eval_accuracy_flip": f"{r['accuracy']:.4f}",
            "mobiface.eval_accuracy_noflip": f"{results['noflip']['accuracy']:.4f}",
        })
        onnx.save(m, args.model)
        print(f"wrote thresholds into {args.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
