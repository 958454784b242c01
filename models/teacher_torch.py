"""dlib's face-recognition ResNet as a PyTorch module, so the teacher can run batched, on a GPU,
and on the very view the student sees ("function matching", Beyer et al., 2022).

    .venv-train/bin/python models/teacher_torch.py --xml net.xml     # convert, then check

dlib's Python wheel cannot hand out its weights, so they come out of its own C++ library:
`net_to_xml` on the network type of dlib's dnn_face_recognition_ex.cpp, deserialised from
face_recognition_models' .dat file (models/dlib_dump.cpp, built against Debian's libdlib-dev).
The conversion writes models/cache/teacher_torch.pt and checks it twice on held-out training
crops, never on eval:
  1. on dlib's own 150x150 chips (teacher.py's chip_of), the port's features against
     dlib's compute_face_descriptor (they must agree to float precision);
  2. the port fed through one fixed affine map from the aligned 112x112 crop to the chip (the
     mean of the per-crop landmark maps, fitted here), scored on the validation pairs against
     the landmark pipeline's features: the price of not running a landmark detector per view.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "cache", "teacher_torch.pt")
MEAN_RGB = (122.782, 117.001, 104.298)   # dlib's input_rgb_image_sized: (p - mean) / 256
# blocks per level, input to output: (filters, first block downsamples)
LEVELS = [(32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True)]


def _add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: tensors of different shapes add as if zero-padded at the far ends."""
    shape = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:])]

    def pad(t):
        return F.pad(t, (0, shape[2] - t.shape[3], 0, shape[1] - t.shape[2], 0, shape[0] - t.shape[1]))
    return pad(a) + pad(b)


class Affine(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.register_buffer("gamma", torch.ones(c))
        self.register_buffer("beta", torch.zeros(c))

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1) + self.beta.view(1, -1, 1, 1)


class Block(nn.Module):
    def __init__(self, cin: int, c: int, down: bool):
        super().__init__()
        self.down = down
        self.c1 = nn.Conv2d(cin, c, 3, 2 if down else 1, 0 if down else 1)
        self.a1 = Affine(c)
        self.c2 = nn.Conv2d(c, c, 3, 1, 1)
        self.a2 = Affine(c)

    def forward(self, x):
        y = self.a2(self.c2(F.relu(self.a1(self.c1(x)))))
        return F.relu(_add(F.avg_pool2d(x, 2, 2) if self.down else x, y))


class DlibResNet(nn.Module):
    """Input: float RGB chips [N, 3, 150, 150] in 0..255. Output: dlib's 128-d descriptor."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 7, 2, 0)
        self.stem_a = Affine(32)
        blocks, cin = [], 32
        for c, n, down in LEVELS:
            for i in range(n):
                blocks.append(Block(cin, c, down and i == 0))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(256, 128, bias=False)
        self.register_buffer("mean", torch.tensor(MEAN_RGB).view(1, 3, 1, 1))

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem_a(self.stem((x - self.mean) / 256.0))), 3, 2)
        return self.fc(self.blocks(x).mean((2, 3)))


def from_xml(path: str) -> DlibResNet:
    """Fill the module from net_to_xml's output (layers listed from the output to the input)."""
    text = open(path).read()
    found = [(m.group(1), np.array(m.group(2).split(), dtype=np.float32))
             for m in re.finditer(r"<(affine_con|con|fc_no_bias)[^>]*>([^<]*)<", text)]
    (_, fc), layers = found[0], found[1:][::-1]
    net = DlibResNet()
    convs = [net.stem] + [c for b in net.blocks for c in (b.c1, b.c2)]
    affines = [net.stem_a] + [a for b in net.blocks for a in (b.a1, b.a2)]
    if [k for k, _ in found] != ["fc_no_bias"] + ["affine_con", "con"] * len(convs):
        raise SystemExit(f"{path}: not the layer sequence of dlib's face-recognition ResNet")
    with torch.no_grad():
        for i, (conv, aff) in enumerate(zip(convs, affines)):
            w, p = conv.weight, layers[2 * i][1]
            w.copy_(torch.from_numpy(p[:w.numel()]).view_as(w))
            conv.bias.copy_(torch.from_numpy(p[w.numel():]))
            g = layers[2 * i + 1][1]
            aff.gamma.copy_(torch.from_numpy(g[:len(g) // 2]))
            aff.beta.copy_(torch.from_numpy(g[len(g) // 2:]))
        net.fc.weight.copy_(torch.from_numpy(fc.reshape(256, 128).T))
    return net.eval()


def load(device="cpu") -> tuple[DlibResNet, torch.Tensor]:
    """The converted teacher and its fixed crop-to-chip map (a 2x3 affine_grid theta)."""
    st = torch.load(WEIGHTS, map_location="cpu", weights_only=False)
    net = DlibResNet()
    net.load_state_dict({k: v.float() for k, v in st["model"].items()})
    return net.eval().to(device), st["theta"].float().to(device)


def chips(crops: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """150x150 chips cut from aligned crops [N, 3, 112, 112] (0..255) by the fixed map."""
    grid = F.affine_grid(theta.expand(len(crops), 2, 3), [len(crops), 3, 150, 150], align_corners=False)
    return F.grid_sample(crops, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def flip_averaged(net: DlibResNet, theta: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
    """Teacher targets of aligned crops given as float 0..255 [N, 3, 112, 112], built as
    teacher.py's cached ones are: unit features of each crop and its mirror, averaged, normalised."""
    u = F.normalize(net(chips(torch.cat([crops, crops.flip(3)]), theta)).float(), dim=1)
    return F.normalize(u[:len(crops)] + u[len(crops):], dim=1)


def fit_theta(crops_u8: np.ndarray) -> torch.Tensor:
    """Mean map from the 112x112 crop to dlib's chip over the given crops, as affine_grid's theta.

    teacher.py cuts each chip from the crop upscaled 2x, at landmarks it detects there; the map
    is read off by cutting chips from images whose pixels hold their own coordinates."""
    from teacher import UPSCALE, BOX, _load_models
    dlib, sp5, _ = _load_models()
    from PIL import Image
    s = 112 * UPSCALE
    yy, xx = np.mgrid[0:s, 0:s]
    coords = np.ascontiguousarray(np.stack([xx, yy, np.zeros_like(xx)], 2).astype(np.uint8))
    r, q = np.mgrid[0:150, 0:150]
    maps = []
    for c in crops_u8:
        a = np.ascontiguousarray(np.asarray(Image.fromarray(c).resize((s, s), Image.BICUBIC)))
        shape = sp5(a, dlib.rectangle(*BOX))
        ch = dlib.get_face_chip(coords, shape, size=150, padding=0.25).astype(np.float64)
        inside = (ch[..., 0] > 1) & (ch[..., 0] < s - 2) & (ch[..., 1] > 1) & (ch[..., 1] < s - 2)
        design = np.stack([q[inside], r[inside], np.ones(inside.sum())], 1)
        sol, *_ = np.linalg.lstsq(design, ch[inside][:, :2], rcond=None)
        maps.append(sol.T)   # upscaled-image (x, y) = M @ (chip col, chip row, 1)
    m = np.mean(maps, 0)
    # into affine_grid's normalised coordinates (align_corners=False): u = (2 p + 1) / n - 1
    to_chip = np.array([[75.0, 0, 74.5], [0, 75.0, 74.5], [0, 0, 1]])       # chip norm -> chip px
    to_norm = np.array([[2.0 / s, 0, 1.0 / s - 1], [0, 2.0 / s, 1.0 / s - 1], [0, 0, 1]])  # px -> norm
    # pixel centres: upscaled px p covers crop px (p + 0.5) / 2 - 0.5; the normalised coordinate
    # of a point is the same in both images, so to_norm of the upscaled image serves the crop
    theta = to_norm @ np.vstack([m, [0, 0, 1]]) @ to_chip
    return torch.tensor(theta[:2], dtype=torch.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--xml", required=True, help="net_to_xml output of dlib's .dat (models/dlib_dump.cpp)")
    ap.add_argument("--fit-crops", type=int, default=300)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    from teacher import _load_models, chip_of
    from train import Data, pair_scores, two_fold_accuracy

    net = from_xml(args.xml)
    data = Data(0, 80)
    tr = np.random.default_rng(0).permutation(data.train_idx)[:args.fit_crops]
    theta = fit_theta(data.lfw[tr])
    os.makedirs(os.path.dirname(WEIGHTS), exist_ok=True)
    torch.save({"model": net.state_dict(), "theta": theta}, WEIGHTS)
    print(f"wrote {WEIGHTS}; theta {theta.numpy().round(4).tolist()}")

    _, _, rec = _load_models()
    va = np.array(data.val_idx)
    crops = data.lfw[va]
    ref = np.asarray(rec.compute_face_descriptor([chip_of(c) for c in crops[:64]]), np.float32)
    with torch.no_grad():
        dchips = torch.from_numpy(np.stack([chip_of(c) for c in crops[:64]])).permute(0, 3, 1, 2).float()
        port = net(dchips).numpy()
    err = np.abs(port - ref).max()
    print(f"port vs dlib on dlib's chips: max abs difference {err:.2e} (descriptor norm ~1)")
    if err > 1e-3:
        raise SystemExit("the port does not reproduce dlib")

    row = {int(j): k for k, j in enumerate(va)}
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        fixed = flip_averaged(net, theta, x).numpy()
    acc = two_fold_accuracy(*pair_scores(fixed, data.val_pairs, row)) * 100
    cached = two_fold_accuracy(*pair_scores(data.lfw_t[va], data.val_pairs, row)) * 100
    cos = float((fixed * data.lfw_t[va]).sum(1).mean())
    print(f"validation, flip-averaged: fixed-map port {acc:.2f}%, landmark pipeline (cached targets) "
          f"{cached:.2f}%; mean cosine between the two features {cos:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
