"""Rebuild a training checkpoint from an exported model, for fine-tuning the shipped weights.

    .venv-train/bin/python models/from_onnx.py [--model models/mobiface.onnx] --out models/cache/init.pt
    .venv-train/bin/python models/train.py --init models/cache/init.pt ...

Checkpoints stay out of git, so a fresh checkout holds the shipped weights only in the ONNX file,
where the exporter has folded every Conv2d's BatchNorm into the convolution (W' = W g / sqrt(v + e),
b' = beta - m g / sqrt(v + e)). The split cannot be undone exactly, but any split with the same
product gives the same network in eval mode. This one scales each channel's convolution to unit
output variance on training crops and their mirrors (weights of an ordinary size for AdamW's
steps and weight decay; near-silent channels keep scale 1, which also keeps every weight inside
half precision for the GPU carry) and sets the running statistics to those the channel then has.
The script checks the rebuild against onnxruntime and prints how far train-mode features (a
batch's own BatchNorm statistics) move from eval-mode ones: for 1.3.0 a median cosine of 0.80,
where a checkpoint trained as such (the GPU run FS in models/MODEL_CARD.md) gives 0.96, so a
fine-tune from a rebuild starts further from its eval-mode network than one from the original
checkpoint would.
Never reads the eval split.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from mobiface import MobiFace, PReLU  # noqa: E402
from export import check_against_torch  # noqa: E402
from teacher import LFW_TRAIN, list_images  # noqa: E402
from train import normalised  # noqa: E402


def folded_layers(proto: onnx.ModelProto):
    """In graph order: the folded (weight, bias) of each Conv and the slope of each PReLU; then
    the head's MatMul weight and BatchNormalization parameters."""
    init = {t.name: numpy_helper.to_array(t).copy() for t in proto.graph.initializer}
    conv, prelu = [], []
    fc = head_bn = None
    for n in proto.graph.node:
        if n.op_type == "Conv":
            conv.append((init[n.input[1]], init[n.input[2]]))
        elif n.op_type == "Mul":  # relu(x) - a * relu(-x): the slope is the constant factor
            prelu.append(next(init[i] for i in n.input if i in init))
        elif n.op_type == "MatMul":
            fc = init[n.input[1]]
        elif n.op_type == "BatchNormalization":
            head_bn = [init[i] for i in n.input[1:5]]
    return conv, prelu, fc, head_bn


def training_crops(n: int, seed: int = 0) -> torch.Tensor:
    """Crops of the whole train split, held-out validation identities included: they only pick
    the split of each folded layer, and the eval-mode network is the ONNX one whatever they are."""
    names = list_images(LFW_TRAIN)
    pick = np.random.default_rng(seed).permutation(len(names))[:n]
    u8 = np.stack([np.asarray(Image.open(os.path.join(LFW_TRAIN, names[i])).convert("RGB")) for i in pick])
    x = normalised(u8, torch.device("cpu"))
    return torch.cat([x, x.flip(3)])


@torch.no_grad()
def rebuild(proto: onnx.ModelProto, crops: torch.Tensor) -> MobiFace:
    conv, prelu, fc, head_bn = folded_layers(proto)
    model = MobiFace("gdc").eval()
    # the network's modules in registration order are its forward order, as in the graph
    pairs = [(m[0], m[1]) for m in model.modules()
             if isinstance(m, torch.nn.Sequential) and isinstance(m[0], torch.nn.Conv2d)]
    prelus = [m for m in model.modules() if isinstance(m, PReLU)]
    if len(pairs) != len(conv) or len(prelus) != len(prelu):
        raise SystemExit(f"graph has {len(conv)} Conv and {len(prelu)} PReLU, MobiFace "
                         f"{len(pairs)} and {len(prelus)}")
    # 1. the folded network exactly: BatchNorm as "add the folded bias"
    for (c, bn), (w, b) in zip(pairs, conv):
        c.weight.copy_(torch.from_numpy(w))
        bn.running_mean.zero_()
        bn.running_var.fill_(1 - bn.eps)
        bn.weight.fill_(1)
        bn.bias.copy_(torch.from_numpy(b))
    for m, a in zip(prelus, prelu):
        m.weight.copy_(torch.from_numpy(a).reshape(m.weight.shape))
    model.head.fc.weight.copy_(torch.from_numpy(fc).T)
    for t, v in zip((model.head.bn.weight, model.head.bn.bias, model.head.bn.running_mean,
                     model.head.bn.running_var), head_bn):
        t.copy_(torch.from_numpy(v))
    # 2. each convolution's output statistics on training crops, under that exact network
    sums = {}

    def hook(i):
        def f(_m, _inp, out):
            y = out.double()
            s = sums.setdefault(i, [0, 0.0, 0.0])
            s[0] += y.numel() // y.shape[1]
            s[1] = s[1] + y.sum((0, 2, 3))
            s[2] = s[2] + (y * y).sum((0, 2, 3))
        return f

    handles = [c.register_forward_hook(hook(i)) for i, (c, _) in enumerate(pairs)]
    for i in range(0, len(crops), 128):
        model(crops[i:i + 128])
    for h in handles:
        h.remove()
    # 3. unit-variance convolutions; BatchNorm undoes the scale and carries the folded bias
    for i, (c, bn) in enumerate(pairs):
        n, s1, s2 = sums[i]
        b = bn.bias.clone()
        mean = s1 / n
        std = (s2 / n - mean * mean).clamp(min=0).sqrt()
        # any positive scale is exact; a near-silent channel keeps its weights, which its
        # standard deviation would blow past half precision's range (the GPU carry is fp16)
        s = torch.where(std > 1e-3, std, torch.ones_like(std))
        c.weight.div_(s.float().reshape(-1, 1, 1, 1))
        bn.running_mean.copy_(mean / s)
        bn.running_var.copy_(std * std / (s * s))
        bn.weight.copy_(s.float() * (bn.running_var + bn.eps).sqrt())
        bn.bias.copy_(b + mean.float())
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(HERE, "mobiface.onnx"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--crops", type=int, default=2048, help="training crops (plus mirrors) for the statistics")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    proto = onnx.load(args.model)
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("mobiface.head") != "gdc":
        raise SystemExit(f"{args.model}: only the gdc head is rebuilt (head {meta.get('mobiface.head')})")
    crops = training_crops(args.crops)
    model = rebuild(proto, crops)

    err = check_against_torch(model, args.model)
    print(f"[from_onnx] rebuilt {args.model} (version {meta.get('mobiface.version')}): "
          f"max relative difference to onnxruntime {err:.2e}")
    if err > 1e-4:
        raise SystemExit("the rebuilt network does not reproduce the ONNX outputs")
    # what a fine-tune's first step sees: BatchNorm on a batch's own statistics
    with torch.no_grad():
        batch = crops[torch.randperm(len(crops), generator=torch.Generator().manual_seed(2))[:128]]
        trained = copy.deepcopy(model).train()  # a train-mode pass moves the running statistics
        cos = torch.nn.functional.cosine_similarity(trained(batch), model(batch)).median()
    print(f"[from_onnx] train-mode against eval-mode features, batch of 128: median cosine {cos:.4f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save({"model": model.state_dict(), "from_onnx": {"path": args.model, "meta": meta}}, args.out)
    print(f"[from_onnx] -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
