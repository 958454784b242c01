"""MobiFace (Duong et al., 2018) in PyTorch, exactly as the paper's table.

Input: float32 [N, 3, 112, 112], RGB, normalised as (pixel - 127.5) / 128.
Output: [N, 512] embedding, not L2-normalised.

| input      | operator                                                              |
|------------|-----------------------------------------------------------------------|
| 112x112x3  | 3x3 Conv, stride 2, 64                                                |
| 56x56x64   | 3x3 depthwise conv, 64                                                |
| 56x56x64   | Block x1  {1x1 Conv 128 - 3x3 DWconv stride 2, 128 - 1x1 Linear 64}   |
| 28x28x64   | RBlock x2 {1x1 Conv 128 - 3x3 DWconv 128 - 1x1 Linear 64}             |
| 28x28x64   | Block x1  {1x1 Conv 256 - 3x3 DWconv stride 2, 256 - 1x1 Linear 128}  |
| 14x14x128  | RBlock x3 {1x1 Conv 256 - 3x3 DWconv 256 - 1x1 Linear 128}            |
| 14x14x128  | Block x1  {1x1 Conv 512 - 3x3 DWconv stride 2, 512 - 1x1 Linear 256}  |
| 7x7x256    | RBlock x6 {1x1 Conv 512 - 3x3 DWconv 512 - 1x1 Linear 256}            |
| 7x7x256    | 1x1 Conv, 512                                                         |
| 7x7x512    | 512-d FC                                                              |

Every conv is followed by BatchNorm and a per-channel PReLU, except the "Linear" 1x1
projections (BatchNorm only). The final "512-d FC" has two readings (see HEADS).
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

EMBEDDING_DIM = 512
INPUT_SIZE = 112
HEADS = ("gdc", "flatten")

# (expansion channels, output channels, stride of the first block, number of blocks, residual)
# One row per table line with a bottleneck; a stride-2 "Block" has no shortcut, an "RBlock" has.
STAGES = [
    (128, 64, 2, 1, False),
    (128, 64, 1, 2, True),
    (256, 128, 2, 1, False),
    (256, 128, 1, 3, True),
    (512, 256, 2, 1, False),
    (512, 256, 1, 6, True),
]


class PReLU(nn.Module):
    """Per-channel PReLU.

    In `decomposed` mode it computes relu(x) - a * relu(-x), which is the same function but
    exports to ONNX as Relu/Neg/Mul/Sub: ONNX Runtime runs that markedly faster on CPU than
    its PRelu operator, which dominates this model's time. Training uses the native op.
    """

    def __init__(self, channels: int, init: float = 0.25):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), init))
        self.decomposed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.decomposed:
            return F.prelu(x, self.weight)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return F.relu(x) - self.weight.view(shape) * F.relu(-x)


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
            act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2 if k > 1 else 0, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(PReLU(cout))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """1x1 expand (BN, PReLU) - 3x3 depthwise (BN, PReLU) - 1x1 linear projection (BN)."""

    def __init__(self, cin: int, expand: int, cout: int, stride: int, residual: bool):
        super().__init__()
        if residual and (stride != 1 or cin != cout):
            raise ValueError("a residual block keeps shape")
        self.residual = residual
        self.expand = conv_bn(cin, expand, 1)
        self.depthwise = conv_bn(expand, expand, 3, stride, groups=expand)
        self.project = conv_bn(expand, cout, 1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class GDCHead(nn.Module):
    """7x7 global depthwise conv (linear, BN), then 512 -> 512 FC and BatchNorm1d."""

    def __init__(self, channels: int = 512, dim: int = EMBEDDING_DIM):
        super().__init__()
        self.gdc = conv_bn(channels, channels, 7, groups=channels, act=False)
        # no padding: a 7x7 kernel on the 7x7 map gives 1x1
        self.gdc[0].padding = (0, 0)
        self.fc = nn.Linear(channels, dim, bias=False)
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gdc(x).flatten(1)
        return self.bn(self.fc(x))


class FlattenHead(nn.Module):
    """Flatten the 7x7x512 map and a 25088 -> 512 FC, then BatchNorm1d."""

    def __init__(self, channels: int = 512, dim: int = EMBEDDING_DIM, spatial: int = 7):
        super().__init__()
        self.fc = nn.Linear(channels * spatial * spatial, dim, bias=False)
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x.flatten(1)))


class MobiFace(nn.Module):
    def __init__(self, head: str = "gdc", dim: int = EMBEDDING_DIM):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.head_name = head
        layers: list[nn.Module] = [
            conv_bn(3, 64, 3, stride=2),
            conv_bn(64, 64, 3, groups=64),
        ]
        cin = 64
        for expand, cout, stride, n, residual in STAGES:
            for i in range(n):
                layers.append(Bottleneck(cin, expand, cout, stride if i == 0 else 1, residual))
                cin = cout
        layers.append(conv_bn(cin, 512, 1))
        self.body = nn.Sequential(*layers)
        self.head = GDCHead(512, dim) if head == "gdc" else FlattenHead(512, dim)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)

    def set_decomposed_prelu(self, on: bool = True) -> "MobiFace":
        for m in self.modules():
            if isinstance(m, PReLU):
                m.decomposed = on
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches) -> None:
    """BatchNorm running statistics set to the exact average over `batches` (input tensors),
    replacing whatever they held; the model is left in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average, not an exponential one
    model.train()
    for x in batches:
        model(x)
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    for h in HEADS:
        m = MobiFace(h).eval()
        with torch.no_grad():
            out = m(torch.zeros(2, 3, INPUT_SIZE, INPUT_SIZE))
        print(f"{h}: params={count_params(m):,} body={count_params(m.body):,} "
              f"head={count_params(m.head):,} out={tuple(out.shape)}")
