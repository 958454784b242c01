"""Seen against unseen identities: how much of the student's accuracy is memorisation.

    .venv-train/bin/python models/fit_gap.py [--checkpoint models/checkpoints/best.pt]

Builds verification pairs exactly like train.py's validation figure (up to 20 matched pairs per
identity and as many mismatched) for (a) the held-out TRAINING identities the validation figure
uses and (b) as many identities the student trained on, drawn at random (seeded). It prints the
2-fold accuracy of the student (flip-averaged) and of the dlib teacher on both. The teacher saw
neither set, so its two figures show how hard each set is; a student far better on (b) than on
(a) has fitted its training faces more than it has learned faces in general, which is the sign
that more training data, not more passes, is what it needs. Never touches the eval split.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from train import Data, embed_eval, load_student, pair_scores, two_fold_accuracy  # noqa: E402


def accuracy(emb: np.ndarray, pairs) -> float:
    return two_fold_accuracy(*pair_scores(emb, pairs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=os.path.join(HERE, "checkpoints", "best.pt"))
    ap.add_argument("--split-seed", type=int, default=0, help="train.py's --split-seed")
    ap.add_argument("--val-ids", type=int, default=80, help="as train.py's --val-ids")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)

    data = Data(args.split_seed, args.val_ids, use_utk=False)
    held = {data.lfw_ids[i] for i in data.val_idx}
    by_id: dict[str, list[int]] = {}
    for i in data.train_idx:
        by_id.setdefault(data.lfw_ids[i], []).append(i)
    multi = sorted(k for k, v in by_id.items() if len(v) >= 2)
    seen = set(random.Random(args.split_seed + 2).sample(multi, len(held)))
    seen_pairs = data._val_pairs(seen, by_id, args.split_seed)

    model, _ = load_student(args.checkpoint)
    need = sorted({i for a, b, _ in data.val_pairs + seen_pairs for i in (a, b)})
    student = np.zeros((len(data.lfw), 512), np.float32)
    student[need] = embed_eval(model, data.lfw[need], torch.device("cpu"))
    for name, pairs in (("unseen (held-out training identities)", data.val_pairs),
                        ("seen (identities the student trained on)", seen_pairs)):
        print(f"{name}: {len(pairs)} pairs, student {accuracy(student, pairs) * 100:.2f}%, "
              f"teacher {accuracy(data.lfw_t, pairs) * 100:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
