"""False matches by demographic group, from UTKFace's attributes (the only attributes ../shared has).

    .venv-train/bin/python models/groups.py --model models/mobiface.onnx [--per-group 200] [--flip on]

UTKFace has no identity labels but its people are almost all different, so two crops of one group
are an impostor pair. For each group (gender x race as UTKFace labels them, and age bands) this
draws --per-group crops (seeded), embeds them with the exported model through ONNX Runtime (the
service's input normalisation, flip-averaged unless --flip off), and reports the impostor scores
of every pair within the group: mean, 99th percentile, and the false-match rate at the model's
calibrated thresholds (its best-accuracy threshold and its FAR 1e-3 one, from the ONNX metadata)
and at a threshold of its own that needs no calibration: the one where pairs drawn across all the
gender x race groups together falsely match at --pool-fmr (so two models, calibrated or not,
compare on how unevenly their false matches fall at the same overall rate).
A group whose impostors score higher is one where the service confuses people more often.

Caveats, printed with the table: UTKFace's crops are dlib-aligned and low resolution; a few pairs
may be the same person; and UTKFace is in 2.0's training data (not 1.4.0's), so for 2.0 these are
training crops, not held-out ones (the table says which).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
EXTRA = os.path.join(HERE, "..", "..", "shared", "faces-extra")
GENDER = {0: "male", 1: "female"}
RACE = {0: "White", 1: "Black", 2: "Asian", 3: "Indian", 4: "Others"}
AGES = ((0, 12), (13, 19), (20, 39), (40, 59), (60, 200))


def attributes(extra: str) -> list[tuple[str, int, int, int]]:
    """(crop path, age, gender, race) for every crop whose source name parses."""
    out = []
    with open(os.path.join(extra, "index.csv")) as f:
        for row in csv.DictReader(f):
            parts = os.path.basename(row["source"]).split("_")
            try:
                age, gender, race = int(parts[0]), int(parts[1]), int(parts[2])
            except (IndexError, ValueError):
                continue  # a few UTKFace names lack a field
            if gender in GENDER and race in RACE:
                out.append((os.path.join(extra, row["image"]), age, gender, race))
    return out


def groups(rows) -> dict[str, list[str]]:
    g: dict[str, list[str]] = {}
    for path, age, gender, race in rows:
        g.setdefault(f"{GENDER[gender]} {RACE[race]}", []).append(path)
        lo, hi = next(b for b in AGES if b[0] <= age <= b[1])
        g.setdefault(f"age {lo}-{hi}" if hi < 200 else f"age {lo}+", []).append(path)
    return g


def embed(sess: ort.InferenceSession, paths: list[str], flip: bool) -> np.ndarray:
    x = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) for p in paths])
    x = ((x - 127.5) / 128.0).transpose(0, 3, 1, 2)
    name = sess.get_inputs()[0].name
    feats = []
    for i in range(0, len(x), 32):
        b = np.ascontiguousarray(x[i:i + 32])
        f = sess.run(None, {name: b})[0]
        if flip:
            f = f + sess.run(None, {name: np.ascontiguousarray(b[..., ::-1])})[0]
        feats.append(f)
    f = np.concatenate(feats)
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(HERE, "mobiface.onnx"))
    ap.add_argument("--extra", default=EXTRA, help="../shared/faces-extra")
    ap.add_argument("--per-group", type=int, default=200)
    ap.add_argument("--flip", choices=["on", "off"], default="on")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool-fmr", type=float, default=1e-3, help="false-match rate of the pooled threshold")
    args = ap.parse_args(argv)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    thresholds = {k: float(meta[f"mobiface.{k}"]) for k in ("threshold", "threshold_far_1e-3") if f"mobiface.{k}" in meta}
    rng = np.random.default_rng(args.seed)
    print(f"model {meta.get('mobiface.version', '?')}, flip {args.flip}, up to {args.per_group} crops per group, "
          f"seed {args.seed}; thresholds {thresholds}")
    by_group = groups(attributes(args.extra))
    feats = {}
    for name, paths in sorted(by_group.items()):
        pick = sorted(rng.choice(len(paths), min(args.per_group, len(paths)), replace=False))
        feats[name] = embed(sess, [paths[i] for i in pick], args.flip == "on")
    # a threshold of the model's own, independent of calibration on LFW: the one at which pairs
    # across the whole pool (gender x race groups together) falsely match at --pool-fmr; so two
    # models compare on how unevenly their false matches fall, at the same overall rate
    pool = np.concatenate([f for k, f in feats.items() if not k.startswith("age")])
    ps = (pool @ pool.T)[np.triu_indices(len(pool), 1)]
    thresholds[f"pooled FMR {args.pool_fmr:g}"] = float(np.quantile(ps, 1 - args.pool_fmr))
    head = " | ".join(f"FMR at {k} {v:.3f}" for k, v in thresholds.items())
    print(f"| group | crops | impostor pairs | mean cosine | 99th pct | {head} |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(thresholds))
    for name, f in feats.items():
        s = (f @ f.T)[np.triu_indices(len(f), 1)]
        fmr = " | ".join(f"{100 * np.mean(s >= v):.2f}%" for v in thresholds.values())
        print(f"| {name} | {len(f)} | {len(s):,} | {s.mean():.3f} | {np.quantile(s, 0.99):.3f} | {fmr} |", flush=True)
    data = meta.get("mobiface.training_data")
    seen = ("its training data is not in the file" if data is None
            else "it TRAINED on these crops" if "utk" in data.lower() else "it never saw UTKFace in training")
    print("Caveats: UTKFace has no identities (a few pairs may be one person); dlib alignment, low "
          f"resolution; {seen}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
