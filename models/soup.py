"""Average the weights of checkpoints fine-tuned from one starting point, recompute BatchNorm
statistics on training crops, and report the held-out training-identity validation figure
(the one train.py logs; never eval).

    .venv-train/bin/python models/soup.py models/checkpoints/ft/swa.pt models/checkpoints/ft2/swa.pt \
        [--out models/checkpoints/soup.pt]

Only checkpoints of one basin average into a working model (two independent runs do not).
--out keeps the first checkpoint's record (args, init chain) with the averaged weights.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import Data, load_student, recalibrate_bn, validate  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--out")
    ap.add_argument("--split-seed", type=int, default=0, help="train.py's --split-seed")
    ap.add_argument("--val-ids", type=int, default=80)
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device("cpu")
    data = Data(args.split_seed, args.val_ids)
    loaded = [load_student(p) for p in args.checkpoints]
    states = [m.state_dict() for m, _ in loaded]
    model, record = loaded[0]
    model.load_state_dict({k: sum(s[k] for s in states) / len(states) if v.is_floating_point() else v
                           for k, v in states[0].items()})
    recalibrate_bn(model, data, device)
    acc, gap = validate(model, data, device)
    print(f"average of {len(states)}: held-out training-identity accuracy {acc * 100:.2f}% "
          f"(pos-neg cosine gap {gap:.3f})")
    if args.out:
        torch.save(dict(record, model=model.state_dict(), averaged=args.checkpoints), args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
