"""Static int8 quantisation of the exported MobiFace model (QDQ, per-channel weights).

    .venv/bin/python models/quantize.py --model models/mobiface.onnx --out models/mobiface-int8.onnx
    .venv/bin/python models/calibrate.py --model models/mobiface-int8.onnx --write   # its own thresholds

Calibration runs on aligned *training* crops (../shared/lfw/train-aligned, each with its mirror,
as the service runs them), never on the evaluation identities. Weights are signed 8-bit per
output channel, activations unsigned 8-bit per tensor (what the VNNI kernels take), and only
Conv, MatMul and Gemm are quantised: the quantisation's defaults (signed activations, every op)
leave most convolutions in fp32 between quantise/dequantise pairs and run slower than fp32.
The copy keeps the source's `mobiface.*` metadata with its own version tag (`<version>-int8`),
so the gallery never compares its embeddings with the fp32 model's; calibrate.py then
replaces the thresholds with its own. Prints raw onnxruntime speed of both files.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))


class Crops(CalibrationDataReader):
    def __init__(self, root: str, n: int, seed: int, mean: float, scale: float, batch: int = 16):
        paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith((".jpg", ".png")))
        if not paths:
            raise SystemExit(f"no crops under {root}")
        random.Random(seed).shuffle(paths)
        self.paths, self.mean, self.scale, self.batch = paths[:n], mean, scale, batch
        self.i = 0

    def get_next(self):
        if self.i >= len(self.paths):
            return None
        chunk = self.paths[self.i:self.i + self.batch]
        self.i += self.batch
        x = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) for p in chunk])
        x = ((x - self.mean) / self.scale).transpose(0, 3, 1, 2)
        x = np.concatenate([x, x[..., ::-1]])
        return {"input": np.ascontiguousarray(x, np.float32)}


def speed(path: str, threads: int, batch: int, seconds: float) -> float:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 3, 112, 112)).astype(np.float32)
    s.run(None, {"input": x})
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        s.run(None, {"input": x})
        n += 1
    return n * batch / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(HERE, "mobiface.onnx"))
    ap.add_argument("--out", default=os.path.join(HERE, "mobiface-int8.onnx"))
    ap.add_argument("--crops", default=os.path.join(HERE, "..", "..", "shared", "lfw", "train-aligned"))
    ap.add_argument("--n", type=int, default=512, help="calibration crops (each also mirrored)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", choices=["minmax", "percentile", "entropy"], default="minmax")
    ap.add_argument("--ops", default="Conv,MatMul,Gemm", help="op types to quantise")
    ap.add_argument("--speed-seconds", type=float, default=5)
    args = ap.parse_args(argv)

    src = onnx.load(args.model)
    meta = {p.key: p.value for p in src.metadata_props}
    reader = Crops(args.crops, args.n, args.seed, float(meta.get("mobiface.input_mean", 127.5)),
                   float(meta.get("mobiface.input_scale", 128.0)))
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[args.method]
    quantize_static(args.model, args.out, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=args.ops.split(","), calibrate_method=method)

    out = onnx.load(args.out)
    meta["mobiface.version"] = meta.get("mobiface.version", "0") + "-int8"
    meta["mobiface.quantisation"] = (f"static int8 QDQ, per-channel s8 weights, u8 activations, ops {args.ops}, "
                                     f"{args.method} calibration on {len(reader.paths)} training crops + mirrors")
    del out.metadata_props[:]
    for k, v in meta.items():
        out.metadata_props.add(key=k, value=v)
    onnx.save(out, args.out)
    print(f"wrote {args.out} (version {meta['mobiface.version']})")
    for threads in (1, 2):
        f = speed(args.model, threads, 2, args.speed_seconds)
        q = speed(args.out, threads, 2, args.speed_seconds)
        print(f"batch 2, {threads} thread(s): fp32 {f:.1f} images/s, int8 {q:.1f} images/s, {q / f:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
