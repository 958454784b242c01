"""Training-step throughput of MobiFace on this machine: eager vs channels_last vs torch.compile.

    .venv-train/bin/python models/bench_train.py [--batch 32] [--steps 8]

One forward + backward + AdamW step on random input per measurement; prints images/s from the
median step after two warm-up steps (compilation happens there). Not a test: numbers vary by
machine and load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mobiface import MobiFace  # noqa: E402


def images_per_second(batch: int, channels_last: bool, compile_: bool, steps: int) -> float:
    torch.manual_seed(0)
    model = MobiFace("gdc")
    x = torch.randn(batch, 3, 112, 112)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    fwd = torch.compile(model) if compile_ else model
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = fwd(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    times = sorted(times[2:])
    return batch / times[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32, help="images per step")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for cl, comp in ((False, False), (True, False), (True, True)):
        ips = images_per_second(args.batch, cl, comp, args.steps)
        print(f"batch {args.batch} channels_last {cl} compile {comp}: {ips:.1f} images/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
