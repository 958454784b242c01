"""Validation accuracy of checkpoints with and without flip-averaging (held-out TRAINING identities).

    .venv-train/bin/python models/val_views.py [--projection] CHECKPOINT [CHECKPOINT ...]

Training selects on the flip-averaged figure alone, and the Flipped-MobiFace objective only sees
(f(I) + f(mirror I)) / 2, so nothing stops f(I) - f(mirror I) from growing: some runs end with a
mirror-antisymmetric part several times the size of the average, and single-view features that
verify at chance. This prints both accuracies and that ratio, so a release can refuse such a
checkpoint (MobiFace 1.2.0 was chosen this way: models/MODEL_CARD.md). Never reads the eval split.

--projection also scores the cosine of P f + b, the training-only projection to the teacher's 128
dimensions as train.py fits it for --init (ridge regression on the training crops, about 3 minutes
on 2 cores): it answers whether the distilled knowledge sits in that subspace, hidden from the
cosine of f by the other dimensions.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from train import (CosFace, Data, load_student, normalised, pair_scores,  # noqa: E402
                   two_fold_accuracy, warm_start)


def main(argv: list[str]) -> int:
    projection = "--projection" in argv
    argv = [a for a in argv if a != "--projection"]
    if not argv:
        print(__doc__)
        return 2
    torch.set_num_threads(2)
    data = Data(0, 80)
    idx = np.array(data.val_idx)
    row = {int(j): k for k, j in enumerate(idx)}
    x = normalised(data.lfw[idx], torch.device("cpu"))
    for path in argv:
        model, st = load_student(path)
        with torch.no_grad():
            a = torch.cat([model(x[i:i + 128]) for i in range(0, len(x), 128)])
            b = torch.cat([model(x[i:i + 128].flip(3)) for i in range(0, len(x), 128)])
        acc = {}
        for name, e in (("flip", (a + b) / 2), ("single", a)):
            e = F.normalize(e, dim=1).numpy()
            acc[name] = two_fold_accuracy(*pair_scores(e, data.val_pairs, row)) * 100
        if projection:
            proj = torch.nn.Linear(512, 128)
            warm_start(model, proj, CosFace(512, data.n_classes), data, torch.device("cpu"))
            with torch.no_grad():
                e = F.normalize(proj((a + b) / 2), dim=1).numpy()
            acc["projected"] = two_fold_accuracy(*pair_scores(e, data.val_pairs, row)) * 100
        anti = float(((a - b).norm(dim=1) / (a + b).norm(dim=1)).median())
        print(f"{path}: step {st['step']}, validation {acc['flip']:.2f}% flip-averaged, "
              f"{acc['single']:.2f}% single view; median |f(I)-f(mI)| / |f(I)+f(mI)| {anti:.2f}"
              + (f"; P f + b {acc['projected']:.2f}%" if projection else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
