"""Average the weights of checkpoints fine-tuned from one starting point, recompute BatchNorm
statistics on training crops, and report the held-out training-identity validation figure
(the one train.py logs; never eval).

    .venv-train/bin/python models/soup.py models/checkpoints/ft/swa.pt models/checkpoints/ft2/swa.pt \
        [--out models/checkpoints/soup.pt]
    .venv-train/bin/python models/soup.py models/checkpoints/mobiface2.pt models/cache/init-1.4.0.pt \
        --weights 0.5,0.6,0.8 [--out models/checkpoints/mobiface2-w0.5.pt]

Only checkpoints of one basin average into a working model (two independent runs do not).
--out keeps the first checkpoint's record (args, init chain; for a 2.0 resume checkpoint its
sets, sessions and images seen, so export.py describes it) with the averaged weights.

--weights (two checkpoints: a 2.0 resume checkpoint, then the model it started from) interpolates
W x first + (1 - W) x second for each W, recomputes BatchNorm for W > 0 (W = 1 too: a run's own
statistics, gathered on augmented batches, score below clean ones) and validates like a 2.0 run
(train.py's validate_sets, on the sets the first was trained on); --out then takes one W and
writes the candidate `make export-2.0` ships (export.py refuses a 2.0 checkpoint that is not one).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import targets  # noqa: E402
from train import CKPT_FORMAT, Data, SetsData, _half, load_student, recalibrate_bn, validate, validate_sets  # noqa: E402


def mix(states: list[dict], weights: list[float]) -> dict:
    return {k: sum(w * s[k] for w, s in zip(weights, states)) if v.is_floating_point() else v
            for k, v in states[0].items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--weights", help="comma-separated W: W x first + (1 - W) x second (2.0)")
    ap.add_argument("--out")
    ap.add_argument("--split-seed", type=int, default=0, help="train.py's --split-seed")
    ap.add_argument("--val-ids", type=int, default=80)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    loaded = [load_student(p) for p in args.checkpoints]
    # copies: a state_dict shares storage with its model, so loading a mix into the first model
    # would otherwise rewrite "first" for the next W
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m, _ in loaded]
    model, record = loaded[0]
    if not args.weights:
        data = Data(args.split_seed, args.val_ids)
        model.load_state_dict(mix(states, [1 / len(states)] * len(states)))
        recalibrate_bn(model, data, device)
        acc, gap = validate(model, data, device)
        print(f"average of {len(states)}: held-out training-identity accuracy {acc * 100:.2f}% "
              f"(pos-neg cosine gap {gap:.3f})")
        if args.out:
            torch.save(dict(record, model=model.state_dict(), averaged=args.checkpoints), args.out)
            print(f"wrote {args.out}")
        return 0

    weights = [float(w) for w in args.weights.split(",")]
    if len(states) != 2 or record.get("format") != CKPT_FORMAT:
        ap.error("--weights takes a 2.0 resume checkpoint and the model it started from")
    if args.out and len(weights) != 1:
        ap.error("--out takes one --weights value")
    data = SetsData(record["sets"], targets.parse_crops(record["args"].get("crops")), record["teacher"], device)
    for w in weights:
        model.load_state_dict(mix(states, [w, 1 - w]))
        # the running statistics of mixed weights belong to neither model; and a run's own,
        # gathered on augmented batches, score below ones recomputed on clean crops (model card)
        if w > 0:
            recalibrate_bn(model, data, device)
        v = validate_sets(model, data, device)
        print(f"W {w:g}: " + ", ".join(f"{k} {x:.2f}%" for k, x in v.items()), flush=True)
    if args.out:
        torch.save(dict(record, model=_half(model.state_dict()), val=v, batchnorm_recomputed=weights[0] > 0,
                        interpolated={"weight": weights[0], "with": args.checkpoints[1]}), args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
