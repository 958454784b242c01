"""Graph-level levers on raw onnxruntime, as ratios measured in one run (model card's table).

    target/bench-venv/bin/python benches/ort_levers.py [--seconds 3] [--rounds 3] [--threads 1]

Each lever is a pair of sessions on the same input, timed in alternation for --rounds rounds
(the median round counts), so load drift on a shared machine hits both sides:
  - graph optimisation level: all (the service's) vs basic, and vs extended (the difference
    between extended and all is the CPU's NCHWc blocked, channels-last-like layout);
  - a saved optimised model (optimized_model_filepath at level all) vs the plain file: start-up
    and speed;
  - a face and its mirror as one batch of 2 vs two runs of 1 (what flip costs each way);
  - int8 (models/mobiface-int8.onnx, when present) vs fp32, batch 2.
ORT spin-waiting is off in every session, as in the service.
"""
import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import onnxruntime as ort

LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def session(path, threads, level="all", save_to=None):
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    o.graph_optimization_level = LEVELS[level]
    if save_to:
        o.optimized_model_filepath = save_to
    t = time.perf_counter()
    s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    return s, time.perf_counter() - t


def rate(fn, images, seconds):
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n * images / (time.perf_counter() - t0)


def compare(name, a, b, seconds, rounds):
    """a and b: (label, callable, images per call). Ratio = a / b images/s, median round."""
    ra, rb = [], []
    for _ in range(rounds):
        ra.append(rate(a[1], a[2], seconds))
        rb.append(rate(b[1], b[2], seconds))
    ma, mb = statistics.median(ra), statistics.median(rb)
    print(f"{name:<44} {a[0]} {ma:7.1f} vs {b[0]} {mb:7.1f} images/s  ratio {ma / mb:.2f}x")
    return ma / mb


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="models/mobiface.onnx")
    p.add_argument("--int8", default="models/mobiface-int8.onnx")
    p.add_argument("--seconds", type=float, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    x1 = np.random.default_rng(0).standard_normal((1, 3, 112, 112)).astype(np.float32)
    x2 = np.concatenate([x1, x1[..., ::-1]]).copy()
    run = lambda s, x: (lambda: s.run(None, {"input": x}))  # noqa: E731
    print(f"raw onnxruntime {ort.__version__}, {a.threads} intra-op thread(s), {a.seconds:g} s x {a.rounds} rounds")
    full, t_full = session(a.model, a.threads)
    for lvl in ("basic", "extended"):
        s, _ = session(a.model, a.threads, lvl)
        compare(f"optimisation level all vs {lvl}", ("all", run(full, x2), 2), (lvl, run(s, x2), 2),
                a.seconds, a.rounds)
    with tempfile.TemporaryDirectory() as d:
        saved = os.path.join(d, "opt.onnx")
        session(a.model, a.threads, save_to=saved)
        s, t_saved = session(saved, a.threads, "basic")
        print(f"{'saved optimised model: session start-up':<44} plain {t_full * 1e3:.0f} ms vs saved {t_saved * 1e3:.0f} ms")
        compare("saved optimised model vs plain file", ("saved", run(s, x2), 2), ("plain", run(full, x2), 2),
                a.seconds, a.rounds)
    compare("face + mirror: one batch of 2 vs 2 runs of 1", ("batch", run(full, x2), 2),
            ("2 runs", lambda: (full.run(None, {"input": x1}), full.run(None, {"input": x1[..., ::-1].copy()})), 2),
            a.seconds, a.rounds)
    if os.path.exists(a.int8):
        q, _ = session(a.int8, a.threads)
        compare("int8 vs fp32, batch 2", ("int8", run(q, x2), 2), ("fp32", run(full, x2), 2), a.seconds, a.rounds)


if __name__ == "__main__":
    main()
