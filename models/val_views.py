"""Validation accuracy of checkpoints with and without flip-averaging (held-out TRAINING identities).

    .venv-train/bin/python models/val_views.py [--projection] [--ensemble] [--split-seed N] [--val-ids N] CHECKPOINT [CHECKPOINT ...]
    .venv-train/bin/python models/val_views.py --sets lfw,celeba CHECKPOINT [CHECKPOINT ...]   # 2.0's validation

Training selects on the flip-averaged figure alone, and the Flipped-MobiFace objective only sees
(f(I) + f(mirror I)) / 2, so nothing stops f(I) - f(mirror I) from growing: some runs end with a
mirror-antisymmetric part several times the size of the average, and single-view features that
verify at chance. This prints both accuracies and that ratio, so a release can refuse such a
checkpoint (MobiFace 1.2.0 was chosen this way: models/MODEL_CARD.md). Never reads the eval split.

--projection also scores the cosine of P f + b, the training-only projection to the teacher's 128
dimensions as train.py fits it for --init (ridge regression on the training crops, about 3 minutes
on 2 cores): it answers whether the distilled knowledge sits in that subspace, hidden from the
cosine of f by the other dimensions.

--sets scores MobiFace 2.0's validation instead (targets.py's held-out LFW train and CelebA
identities; 1,098 + 481-crop pairs), as train.py --sets logs it: each set flip-averaged and single
view, and their mean, the 2.0 selection figure. A 1.x model is scored from from_onnx.py's rebuild.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import targets  # noqa: E402
from train import (CosFace, Data, SetsData, load_student, normalised, pair_scores,  # noqa: E402
                   two_fold_accuracy, validate_sets, view_features, warm_start)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--projection", action="store_true", help="also score the cosine of P f + b")
    ap.add_argument("--ensemble", action="store_true", help="also score the mean of the checkpoints' cosines")
    ap.add_argument("--split-seed", type=int, default=0, help="train.py's --split-seed")
    ap.add_argument("--val-ids", type=int, default=80, help="as train.py's --val-ids")
    ap.add_argument("--sets", default="", help="2.0 validation sets, e.g. lfw,celeba")
    ap.add_argument("--crops", action="append", help="SET=DIR, as for targets.py")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    if args.sets:
        data = SetsData(args.sets.split(","), targets.parse_crops(args.crops), "edgeface", cpu)
        for path in args.checkpoints:
            model, st = load_student(path)
            v = validate_sets(model, data, cpu)
            print(f"{path}: step {st.get('step', '-')}, images seen {st.get('images_seen', '-')}: "
                  + ", ".join(f"{k} {x:.2f}%" for k, x in v.items()), flush=True)
        return 0
    data = Data(args.split_seed, args.val_ids)
    idx = np.array(data.val_idx)
    row = {int(j): k for k, j in enumerate(idx)}
    x = normalised(data.lfw[idx], cpu)

    def accuracy(unit: np.ndarray) -> float:
        return two_fold_accuracy(*pair_scores(unit, data.val_pairs, row)) * 100

    members = []
    for path in args.checkpoints:
        model, st = load_student(path)
        with torch.no_grad():
            a, b = map(torch.cat, zip(*(view_features(model, x[i:i + 128], False, cpu)
                                        for i in range(0, len(x), 128))))
        views = {"flip": F.normalize((a + b) / 2, dim=1).numpy(), "single": F.normalize(a, dim=1).numpy()}
        members.append(views["flip"])
        acc = {name: accuracy(e) for name, e in views.items()}
        if args.projection:
            proj = torch.nn.Linear(512, 128)
            warm_start(model, proj, CosFace(512, data.n_classes), data, cpu)
            with torch.no_grad():
                acc["projected"] = accuracy(F.normalize(proj((a + b) / 2), dim=1).numpy())
        anti = float(((a - b).norm(dim=1) / (a + b).norm(dim=1)).median())
        print(f"{path}: step {st.get('step', '-')}, validation {acc['flip']:.2f}% flip-averaged, "
              f"{acc['single']:.2f}% single view; median |f(I)-f(mI)| / |f(I)+f(mI)| {anti:.2f}"
              + (f"; P f + b {acc['projected']:.2f}%" if args.projection else ""), flush=True)
    if args.ensemble:
        acc = accuracy(np.concatenate(members, axis=1) / np.sqrt(len(members)))
        print(f"ensemble of {len(members)}: validation {acc:.2f}% flip-averaged", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
