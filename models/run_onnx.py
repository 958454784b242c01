"""Run onnxruntime directly on a raw little-endian float32 tensor; write the raw float32 output.

    .venv/bin/python models/run_onnx.py --model models/mobiface.onnx \
        --input in.f32 --shape N,3,112,112 --output out.f32

An independent reference for the Rust engine's tests: no preprocessing, no normalisation,
just the model's first output for exactly the given tensor.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnxruntime as ort


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", required=True, help="raw little-endian float32 file")
    ap.add_argument("--shape", required=True, help="comma-separated, e.g. 4,3,112,112")
    ap.add_argument("--output", required=True, help="raw little-endian float32 file to write")
    ap.add_argument("--output-name", default=None, help="output to write (default: the first)")
    args = ap.parse_args(argv)

    try:
        shape = tuple(int(s) for s in args.shape.split(","))
    except ValueError:
        ap.error(f"bad --shape {args.shape!r}")
    data = np.fromfile(args.input, dtype="<f4")
    if data.size != int(np.prod(shape)):
        print(f"error: {args.input} holds {data.size} floats, shape {shape} needs "
              f"{int(np.prod(shape))}", file=sys.stderr)
        return 2
    x = data.reshape(shape).astype(np.float32)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    out_name = args.output_name or sess.get_outputs()[0].name
    y = sess.run([out_name], {in_name: x})[0]
    np.ascontiguousarray(y, dtype="<f4").tofile(args.output)
    print(f"{out_name}: shape {list(y.shape)} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
