"""Score the dlib ResNet teacher on an LFW pairs file (for the model card only).

    .venv-train/bin/python models/teacher_eval.py --pairs ../shared/lfw/pairs-eval.txt \
        --images ../shared/lfw/eval-aligned [--procs 2]

Feeds dlib exactly as models/teacher.py does (the 112x112 aligned crop, upscaled, dlib's 5-point
predictor in a fixed box, dlib's 150x150 chip). Reports k-fold accuracy (k = folds in the file)
with cosine similarity, without and with flip-averaging. It reads eval images because it only
measures the teacher; nothing here feeds training. Embeddings are cached in
models/cache/teacher-eval.npz.
"""

from __future__ import annotations

import argparse
import os
import sys
from multiprocessing import Pool

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from pairs import read_pairs, report  # noqa: E402
from teacher import embed_paths  # noqa: E402


def _job(a):
    paths, mirror = a
    return embed_paths(paths, mirror)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default=os.path.join(HERE, "..", "..", "shared", "lfw", "pairs-eval.txt"))
    ap.add_argument("--images", default=os.path.join(HERE, "..", "..", "shared", "lfw", "eval-aligned"))
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--cache", default=os.path.join(HERE, "cache", "teacher-eval.npz"))
    args = ap.parse_args(argv)

    n_folds, pairs = read_pairs(args.pairs)
    names = sorted({p for a, b, _, _ in pairs for p in (a, b)})
    emb = {}
    if os.path.exists(args.cache):
        z = np.load(args.cache)
        emb = {(str(n), bool(m)): e for n, m, e in zip(z["names"], z["mirror"], z["emb"])}
    todo = [(n, m) for m in (False, True) for n in names if (n, m) not in emb]
    if todo:
        print(f"embedding {len(todo)} crops with dlib ({args.procs} processes)", flush=True)
        chunks = []
        for m in (False, True):
            ns = [n for n, mm in todo if mm == m]
            for i in range(0, len(ns), 64):
                chunks.append((ns[i:i + 64], m))
        with Pool(args.procs) as pool:
            res = pool.map(_job, [([os.path.join(args.images, n) for n in c], m) for c, m in chunks])
        for (c, m), e in zip(chunks, res):
            for n, v in zip(c, e):
                emb[(n, m)] = v
        keys = sorted(emb)
        os.makedirs(os.path.dirname(args.cache), exist_ok=True)
        np.savez(args.cache, names=np.array([k[0] for k in keys]), mirror=np.array([k[1] for k in keys]),
                 emb=np.stack([emb[k] for k in keys]))

    labels = np.array([p[2] for p in pairs])
    folds = np.array([p[3] for p in pairs])
    for flip in (False, True):
        def f(n):
            v = emb[(n, False)] + (emb[(n, True)] if flip else 0)
            return v / np.linalg.norm(v)
        sc = np.array([float(f(a) @ f(b)) for a, b, _, _ in pairs])
        r = report(sc, labels, folds, n_folds)
        print(f"dlib teacher, flip={'true' if flip else 'false'}: {n_folds}-fold accuracy "
              f"{r['accuracy'] * 100:.2f}% (std {r['accuracy_std'] * 100:.2f}), AUC {r['auc']:.4f}, "
              f"TAR@FAR1e-2 {r['tar_far_1e-2'] * 100:.1f}%, TAR@FAR1e-3 {r['tar_far_1e-3'] * 100:.1f}%, "
              f"best threshold (cosine) {r['best_threshold']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
