"""Checks the exported ONNX model against the MobiFace table (no PyTorch needed).

    .venv/bin/python models/test_model.py [--model models/mobiface.onnx]

Plain script: prints one line per check, then `N passed, M failed`; exits 1 on any failure.
The expected structure below is written from the paper's table, independently of
models/mobiface.py, so a change to the network that breaks the table fails here.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper, shape_inference

HERE = os.path.dirname(os.path.abspath(__file__))

# The table, as (expansion, output channels, stride, repeats, residual) per bottleneck row.
TABLE = [
    (128, 64, 2, 1, False),
    (128, 64, 1, 2, True),
    (256, 128, 2, 1, False),
    (256, 128, 1, 3, True),
    (512, 256, 2, 1, False),
    (512, 256, 1, 6, True),
]
# 3x3 depthwise convs in order: (channels, stride)
EXPECTED_DW = [(64, 1)] + [(e, s if i == 0 else 1) for e, _, s, n, _ in TABLE for i in range(n)]
# residual additions: (channels, spatial)
EXPECTED_ADDS = [(64, 28)] * 2 + [(128, 14)] * 3 + [(256, 7)] * 6


def expected_conv_sequence() -> list[tuple[str, int, int, int, int, bool]]:
    """(role, cin, cout, kernel, stride, followed by PReLU) for every conv, in graph order."""
    seq = [("stem", 3, 64, 3, 2, True), ("dw", 64, 64, 3, 1, True)]
    cin = 64
    for e, c, s, n, _ in TABLE:
        for i in range(n):
            seq += [("expand", cin, e, 1, 1, True), ("dw", e, e, 3, s if i == 0 else 1, True),
                    ("project", e, c, 1, 1, False)]
            cin = c
    seq.append(("final1x1", cin, 512, 1, 1, True))
    return seq


def expected_torch_params(head: str) -> int:
    """Parameter count of the table's network with BN (2/channel) and PReLU (1/channel)."""
    total = 0
    for role, cin, cout, k, _, act in expected_conv_sequence():
        groups = cout if role == "dw" else 1
        total += cout * (cin // groups) * k * k + 2 * cout + (cout if act else 0)
    if head == "gdc":
        total += 512 * 49 + 2 * 512  # 7x7 depthwise + BN
        total += 512 * 512 + 2 * 512  # FC (no bias; BN follows) + BatchNorm1d
    else:
        total += 512 * 7 * 7 * 512 + 2 * 512
    return total


class Graph:
    def __init__(self, model: onnx.ModelProto):
        self.model = shape_inference.infer_shapes(model)
        g = self.model.graph
        self.nodes = list(g.node)
        self.init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
            for o in n.output:
                self.producer[o] = n
        self.shapes = {}
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param
                    for d in vi.type.tensor_type.shape.dim]
            self.shapes[vi.name] = dims

    def attr(self, node, name, default=None):
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def const(self, name):
        if name in self.init:
            return self.init[name]
        p = self.producer.get(name)
        if p is not None and p.op_type == "Constant":
            return numpy_helper.to_array(self.attr(p, "value"))
        return None

    def prelu_after(self, x: str):
        """If x feeds relu(x) - a * relu(-x), return (output name, slope array), else None."""
        cons = self.consumers.get(x, [])
        relu = [n for n in cons if n.op_type == "Relu"]
        neg = [n for n in cons if n.op_type == "Neg"]
        if len(relu) != 1 or len(neg) != 1 or len(cons) != 2:
            return None
        relu_neg = self.consumers.get(neg[0].output[0], [])
        if len(relu_neg) != 1 or relu_neg[0].op_type != "Relu":
            return None
        mul = self.consumers.get(relu_neg[0].output[0], [])
        if len(mul) != 1 or mul[0].op_type != "Mul":
            return None
        other = [i for i in mul[0].input if i != relu_neg[0].output[0]]
        slope = self.const(other[0]) if len(other) == 1 else None
        if slope is None:
            return None
        sub = self.consumers.get(mul[0].output[0], [])
        if (len(sub) != 1 or sub[0].op_type != "Sub"
                or list(sub[0].input) != [relu[0].output[0], mul[0].output[0]]):
            return None
        return sub[0].output[0], slope, (relu[0], neg[0], relu_neg[0], mul[0], sub[0])


def conv_info(g: Graph, n):
    w = g.const(n.input[1])
    cout, cin_g, kh, kw = w.shape
    group = g.attr(n, "group", 1)
    stride = g.attr(n, "strides", [1, 1])
    return {"cin": cin_g * group, "cout": cout, "k": kh, "kw": kw, "group": group,
            "stride": stride[0], "stride_w": stride[1], "w": w}


# --------------------------------------------------------------------------------------------
CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


@check
def depthwise_convs(ctx):
    g = ctx["g"]
    dws = []
    for n in g.nodes:
        if n.op_type == "Conv":
            c = conv_info(g, n)
            if c["k"] == 3 and c["group"] > 1:
                assert c["group"] == c["cin"] == c["cout"], f"conv {n.name} is grouped but not depthwise"
                dws.append((c["cout"], c["stride"]))
    assert len(dws) == 15, f"expected 15 3x3 depthwise convs, found {len(dws)}"
    assert dws == EXPECTED_DW, f"depthwise (channels, stride) {dws} != table {EXPECTED_DW}"
    return f"15 3x3 depthwise convs, channels/strides as the table: {dws}"


@check
def conv_sequence_and_activations(ctx):
    g = ctx["g"]
    convs = [n for n in g.nodes if n.op_type == "Conv"]
    exp = expected_conv_sequence()
    body, head_convs = convs[:len(exp)], convs[len(exp):]
    assert len(body) == len(exp), f"expected {len(exp)} body convs, found {len(body)}"
    for i, (n, (role, cin, cout, k, s, act)) in enumerate(zip(body, exp)):
        c = conv_info(g, n)
        got = (c["cin"], c["cout"], c["k"], c["stride"])
        assert got == (cin, cout, k, s), f"conv #{i} ({role}): (cin,cout,k,stride) {got} != {(cin, cout, k, s)}"
        assert c["k"] == c["kw"] and c["stride"] == c["stride_w"], f"conv #{i} not square"
        p = g.prelu_after(n.output[0])
        if act:
            assert p is not None, f"conv #{i} ({role}, {cout} ch) must be followed by relu(x) - a*relu(-x)"
            slope = p[1]
            assert slope.size == cout and slope.shape in ((1, cout, 1, 1), (cout, 1, 1)), \
                f"conv #{i}: PReLU slope shape {slope.shape}, want one per channel ({cout})"
        else:
            assert p is None, f"conv #{i} ({role}) is a linear projection but has an activation"
            nxt = g.consumers.get(n.output[0], [])
            assert all(x.op_type in ("Add", "Conv") for x in nxt), \
                f"linear projection #{i} feeds {[x.op_type for x in nxt]}"
    n_act = sum(1 for e in exp if e[5])
    ctx["head_convs"] = head_convs
    return (f"{len(exp)} body convs match the table; PReLU after {n_act} convs, none after the "
            f"{len(exp) - n_act} linear projections")


@check
def prelu_count(ctx):
    g = ctx["g"]
    n_native = sum(1 for n in g.nodes if n.op_type == "PRelu")
    assert n_native == 0, f"{n_native} native PRelu ops left (export must decompose them)"
    pats = [n for n in g.nodes if g.prelu_after(n.output[0]) is not None]
    assert len(pats) == 31, f"expected 31 PReLU patterns, found {len(pats)}"
    return "31 PReLUs, all written as relu(x) - a*relu(-x), no native PRelu op"


@check
def residual_additions(ctx):
    g = ctx["g"]
    adds = [n for n in g.nodes if n.op_type == "Add"
            and all(i not in g.init and g.const(i) is None for i in n.input)]
    assert len(adds) == 11, f"expected 11 residual additions, found {len(adds)}"
    got = []
    for a in adds:
        shp = g.shapes.get(a.output[0])
        assert shp and len(shp) == 4, f"add {a.name}: unknown shape"
        got.append((shp[1], shp[2]))
        assert shp[2] == shp[3]
        srcs = [g.producer.get(i) for i in a.input]
        # one branch is a linear projection conv; the other is the block input
        proj = [s for s in srcs if s is not None and s.op_type == "Conv"
                and conv_info(g, s)["k"] == 1 and g.prelu_after(s.output[0]) is None]
        assert proj, f"add {a.name}: no linear 1x1 projection among its inputs"
    assert got == EXPECTED_ADDS, f"residual (channels, size) {got} != {EXPECTED_ADDS}"
    return f"11 residual additions at {sorted(set(got), reverse=True)}"


@check
def head(ctx):
    g, meta = ctx["g"], ctx["meta"]
    head = meta.get("mobiface.head", "gdc")
    hc = ctx.get("head_convs")
    assert hc is not None, "conv sequence check did not run"
    out_name = g.model.graph.output[0].name
    if head == "gdc":
        assert len(hc) == 1, f"gdc head: expected 1 conv after the body, found {len(hc)}"
        c = conv_info(g, hc[0])
        assert (c["k"], c["group"], c["cin"], c["cout"]) == (7, 512, 512, 512), \
            f"gdc conv is {c['k']}x{c['k']} group {c['group']} {c['cin']}->{c['cout']}"
        assert g.prelu_after(hc[0].output[0]) is None, "gdc conv must be linear"
        assert g.shapes[hc[0].output[0]][1:] == [512, 1, 1], g.shapes[hc[0].output[0]]
        fc_in = 512
    else:
        assert not hc, f"flatten head: unexpected convs after the body: {len(hc)}"
        fc_in = 512 * 7 * 7
    fcs = [n for n in g.nodes if n.op_type in ("MatMul", "Gemm")]
    assert len(fcs) == 1, f"expected one FC, found {len(fcs)}"
    w = g.const(fcs[0].input[1])
    assert w is not None and sorted(w.shape) == sorted((fc_in, 512)), f"FC weight {None if w is None else w.shape}"
    bn = g.consumers.get(fcs[0].output[0], [])
    if fcs[0].op_type == "Gemm" and not bn:
        pass
    assert bn and bn[0].op_type in ("BatchNormalization", "Add", "Mul"), \
        f"FC must be followed by BatchNorm1d (or its folded affine), got {[n.op_type for n in bn]}"
    assert any(o == out_name for n in g.nodes[-3:] for o in n.output)
    return f"head '{head}': {'7x7 depthwise linear conv + ' if head == 'gdc' else 'flatten + '}FC {fc_in}->512 + BatchNorm1d"


@check
def params_and_macs(ctx):
    g, meta = ctx["g"], ctx["meta"]
    head = meta.get("mobiface.head", "gdc")
    body_macs = head_macs = 0
    n_body = len(expected_conv_sequence())
    convs = [n for n in g.nodes if n.op_type == "Conv"]
    for i, n in enumerate(convs):
        c = conv_info(g, n)
        out = g.shapes[n.output[0]]
        macs = out[1] * out[2] * out[3] * (c["cin"] // c["group"]) * c["k"] * c["kw"]
        if i < n_body:
            body_macs += macs
        else:
            head_macs += macs
    for n in g.nodes:
        if n.op_type in ("MatMul", "Gemm"):
            head_macs += int(np.prod(g.const(n.input[1]).shape))
    onnx_params = int(sum(v.size for v in g.init.values()))
    want = expected_torch_params(head)
    got = int(meta.get("mobiface.params", -1))
    print(f"    parameters: {got:,} (PyTorch, from metadata; the table gives {want:,}); "
          f"{onnx_params:,} stored in ONNX (BatchNorm folded into convs)")
    print(f"    MACs per image: body {body_macs / 1e6:.1f}M + head {head_macs / 1e6:.2f}M "
          f"= {(body_macs + head_macs) / 1e6:.1f}M")
    assert got == want, f"metadata mobiface.params {got} != table's {want}"
    assert 225e6 <= body_macs <= 240e6, f"body MACs {body_macs / 1e6:.1f}M not ~232M"
    ctx["macs"] = (body_macs, head_macs)
    return f"params {got:,} ({head} head), body {body_macs / 1e6:.1f}M MACs"


@check
def io_contract_and_dynamic_batch(ctx):
    sess = ctx["sess"]
    ins, outs = sess.get_inputs(), sess.get_outputs()
    assert [i.name for i in ins] == ["input"], [i.name for i in ins]
    assert outs[0].name == "embedding", outs[0].name
    assert ins[0].type == "tensor(float)" and outs[0].type == "tensor(float)"
    assert ins[0].shape[1:] == [3, 112, 112] and isinstance(ins[0].shape[0], str), ins[0].shape
    assert outs[0].shape[1:] == [512] and isinstance(outs[0].shape[0], str), outs[0].shape
    x = ctx["x"]
    full = sess.run(["embedding"], {"input": x})[0]
    assert full.shape == (len(x), 512), full.shape
    assert np.isfinite(full).all()
    for n in (1, 2):
        part = sess.run(["embedding"], {"input": x[:n]})[0]
        assert part.shape == (n, 512), part.shape
        d = float(np.abs(part - full[:n]).max())
        assert d < 1e-4 * max(1.0, float(np.abs(full).max())), f"batch {n} vs {len(x)}: diff {d}"
    norms = np.linalg.norm(full, axis=1)
    assert (norms > 1e-3).all(), f"degenerate embeddings, norms {norms}"
    not_unit = float(np.abs(norms - 1).max()) > 1e-3
    assert not_unit, "embedding looks L2-normalised; the contract says it is not"
    return f"input [N,3,112,112] -> embedding [N,512] float32, dynamic N (1, 2, {len(x)} agree)"


def to_native_prelu(g: Graph) -> onnx.ModelProto:
    """Graph surgery: replace every relu(x) - a*relu(-x) by ONNX's PRelu(x, a)."""
    model = onnx.ModelProto()
    model.CopyFrom(g.model)
    del model.graph.value_info[:]
    drop, new_nodes, k = set(), {}, 0
    for n in g.nodes:
        p = g.prelu_after(n.output[0])
        if p is None:
            continue
        out, slope, pat = p
        name = f"prelu_slope_{k}"
        c = slope.size
        model.graph.initializer.append(numpy_helper.from_array(
            slope.reshape(c, 1, 1).astype(np.float32), name))
        for m in pat:
            drop.add(id(m))
        new_nodes[id(pat[-1])] = helper.make_node("PRelu", [n.output[0], name], [out], name=f"PRelu_{k}")
        k += 1
    nodes = []
    for n in g.nodes:
        if id(n) in new_nodes:
            nodes.append(new_nodes[id(n)])
        elif id(n) not in drop:
            nodes.append(n)
    # keep topological order: the Sub was last of its pattern, so the PRelu replaces it in place
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    inits = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    onnx.checker.check_model(model)
    return model, k


@check
def decomposed_prelu_equals_native(ctx):
    g = ctx["g"]
    native, k = to_native_prelu(g)
    assert k == 31, f"rewrote {k} PReLUs, expected 31"
    assert sum(1 for n in native.graph.node if n.op_type == "PRelu") == 31
    assert not any(n.op_type in ("Neg", "Sub") for n in native.graph.node)
    s2 = ort.InferenceSession(native.SerializeToString(), providers=["CPUExecutionProvider"])
    x = ctx["x"]
    a = ctx["sess"].run(["embedding"], {"input": x})[0]
    b = s2.run(["embedding"], {"input": x})[0]
    d = float(np.abs(a - b).max())
    scale = float(np.abs(b).max())
    assert d <= 1e-4 * max(1.0, scale), f"decomposed vs native PRelu: max abs diff {d} (scale {scale})"
    ca = a / np.linalg.norm(a, axis=1, keepdims=True)
    cb = b / np.linalg.norm(b, axis=1, keepdims=True)
    cos = float((ca * cb).sum(1).min())
    assert cos > 0.99999, cos
    # the slopes must matter, or the comparison proves nothing: PRelu with slope 0 differs
    return f"31 PReLUs rewritten to native PRelu: max abs diff {d:.2e} (output scale {scale:.2f}), min cosine {cos:.7f}"


@check
def slopes_matter(ctx):
    """Guard for the previous check: zeroing the slopes must change the output."""
    g = ctx["g"]
    native, _ = to_native_prelu(g)
    for t in native.graph.initializer:
        if t.name.startswith("prelu_slope_"):
            t.CopyFrom(numpy_helper.from_array(np.zeros(numpy_helper.to_array(t).shape, np.float32), t.name))
    s = ort.InferenceSession(native.SerializeToString(), providers=["CPUExecutionProvider"])
    x = ctx["x"]
    a = ctx["sess"].run(["embedding"], {"input": x})[0]
    b = s.run(["embedding"], {"input": x})[0]
    d = float(np.abs(a - b).max())
    assert d > 1e-3, f"zeroing PReLU slopes changed nothing ({d}); the equivalence test is vacuous"
    return f"zero slopes change the output by {d:.3f} (the equivalence check is not vacuous)"


@check
def metadata(ctx):
    meta = ctx["meta"]
    need = {"mobiface.name": "MobiFace", "mobiface.embedding_dim": "512", "mobiface.input_mean": "127.5",
            "mobiface.input_scale": "128", "mobiface.color": "RGB"}
    for k, v in need.items():
        assert meta.get(k) == v, f"metadata {k} = {meta.get(k)!r}, want {v!r}"
    for k in ("mobiface.version", "mobiface.head", "mobiface.trained", "mobiface.threshold",
              "mobiface.params", "mobiface.training_data", "mobiface.objective"):
        assert meta.get(k), f"metadata {k} missing"
    assert meta["mobiface.head"] in ("gdc", "flatten")
    assert meta["mobiface.trained"] in ("true", "false")
    t = float(meta["mobiface.threshold"])
    assert -1 <= t <= 1, t
    if meta["mobiface.trained"] == "true":
        for k in ("mobiface.threshold_far_1e-2", "mobiface.threshold_far_1e-3"):
            assert meta.get(k), f"trained model lacks {k}"
            assert -1 <= float(meta[k]) <= 1
        assert float(meta["mobiface.threshold_far_1e-3"]) >= float(meta["mobiface.threshold_far_1e-2"]), \
            "a lower false-accept rate needs a higher threshold"
    else:
        assert "mobiface.threshold_far_1e-2" not in meta, "untrained model must not claim calibrated FAR thresholds"
        assert meta.get("mobiface.threshold_calibrated") == "false"
    return (f"metadata: {meta['mobiface.name']} {meta['mobiface.version']}, head {meta['mobiface.head']}, "
            f"trained={meta['mobiface.trained']}, threshold {meta['mobiface.threshold']}")


def sample_input(n: int = 5) -> np.ndarray:
    """Real training crops when the shared data is there (else seeded noise), normalised."""
    rng = np.random.default_rng(0)
    root = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "lfw", "train-aligned"))
    imgs = []
    if os.path.isdir(root):
        from PIL import Image
        for d in sorted(os.listdir(root))[:n]:
            f = sorted(os.listdir(os.path.join(root, d)))[0]
            imgs.append(np.asarray(Image.open(os.path.join(root, d, f)).convert("RGB"), np.float32))
    while len(imgs) < n:
        imgs.append(rng.uniform(0, 255, (112, 112, 3)).astype(np.float32))
    x = (np.stack(imgs) - 127.5) / 128.0
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=os.path.join(HERE, "mobiface.onnx"))
    args = ap.parse_args(argv)
    model = onnx.load(args.model)
    onnx.checker.check_model(model)
    ctx = {
        "g": Graph(model),
        "meta": {p.key: p.value for p in model.metadata_props},
        "sess": ort.InferenceSession(args.model, providers=["CPUExecutionProvider"]),
        "x": sample_input(),
    }
    print(f"model {args.model} ({os.path.getsize(args.model):,} bytes, opset "
          f"{[o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')]})")
    passed = failed = 0
    for fn in CHECKS:
        try:
            msg = fn(ctx)
            print(f"ok   {fn.__name__}: {msg}")
            passed += 1
        except Exception as e:  # noqa: BLE001 - report every check, then fail at the end
            print(f"FAIL {fn.__name__}: {e}")
            if not isinstance(e, AssertionError):
                traceback.print_exc()
            failed += 1
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
