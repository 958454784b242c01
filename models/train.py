"""Train MobiFace by Flipped-MobiFace distillation from the dlib ResNet teacher.

    make train            # = .venv-train/bin/python models/train.py --budget-minutes 120
    .venv-train/bin/python models/train.py --budget-minutes 75 [--resume]

Objective, per sample I (a training crop after augmentation), with the flip-averaged feature
f = (f(I) + f(mirror I)) / 2 (both halves in the same batch; the 512-d output before any
normalisation):
  * distillation (the paper's l2 loss): || P f + b - t ||^2, with P, b a learned 512 -> 128 affine
    projection used only in training and t the teacher's feature of the same face (dlib ResNet,
    flip-averaged when the mirror's embedding is cached, L2-normalised);
  * relational distillation: (cos(f_i, f_j) - cos(tc_i, tc_j))^2 over the pairs in a batch, with
    tc the teacher feature centred on the training-set mean; it shapes the cosine geometry of f
    itself (what verification uses), which P alone does not constrain;
  * CosFace (large-margin cosine loss, s=32, m=0.25) over LFW training identities with >= 2
    training images.
With --utk, UTKFace crops (no labels) that have cached teacher embeddings join with the two
distillation terms only; LFW crops get random black borders (like UTKFace's bands) half of the
time either way. UTKFace is off by default: on a 2-core CPU the dlib teacher (~0.1 s per crop)
and the student's throughput cannot cover it in the budget, and it would put UTKFace's
non-commercial licence on the weights.

Data: ../shared/lfw/train-aligned minus a held-out slice of TRAINING identities used for the
validation figure (and, with --utk, ../shared/faces-extra/utkface-aligned). Never the eval split.

The learning-rate schedule follows the fraction of the wall-clock budget used (warm-up, then
cosine decay to zero at the end of the budget), so the same command fits a 2-core CPU and a GPU.
Data order, initialisation and augmentation are seeded; the schedule's dependence on wall time
is the one non-deterministic element (pass --total-steps for a fully step-based schedule).
Checkpoints: models/checkpoints/{last,best}.pt (best = highest validation accuracy).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time

# Idle OpenMP threads must sleep, not spin: on a small shared CPU spinning threads steal time
# from the one doing work (measured here: 2 threads, 5.9 -> 8.3 img/s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from mobiface import MobiFace, PReLU, count_params  # noqa: E402
from teacher import LFW_TRAIN, UTK, list_images, load_teacher  # noqa: E402

CACHE = os.path.join(HERE, "cache")
CKPT = os.path.join(HERE, "checkpoints")


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S ") + msg, flush=True)


# ---------------------------------------------------------------------------- data
def load_u8(root: str, names: list[str], cache_name: str) -> np.ndarray:
    """All crops as uint8 [N,112,112,3], decoded once and cached as .npy (outside git)."""
    path = os.path.join(CACHE, cache_name)
    if os.path.exists(path):
        arr = np.load(path, mmap_mode="r")
        if arr.shape[0] == len(names):
            return np.ascontiguousarray(arr)
    arr = np.empty((len(names), 112, 112, 3), np.uint8)
    for i, n in enumerate(names):
        arr[i] = np.asarray(Image.open(os.path.join(root, n)).convert("RGB"))
    os.makedirs(CACHE, exist_ok=True)
    np.save(path + ".tmp.npy", arr)
    os.replace(path + ".tmp.npy", path)
    return arr


class Data:
    def __init__(self, seed: int, val_ids: int, use_utk: bool):
        self.lfw_names = list_images(LFW_TRAIN)
        ids = [n.split(os.sep)[0] for n in self.lfw_names]
        by_id: dict[str, list[int]] = {}
        for i, k in enumerate(ids):
            by_id.setdefault(k, []).append(i)
        multi = sorted(k for k, v in by_id.items() if len(v) >= 2)
        rng = random.Random(seed)
        held = set(rng.sample(multi, val_ids))
        self.val_idx = sorted(i for k in held for i in by_id[k])
        self.train_idx = [i for i in range(len(ids)) if ids[i] not in held]
        # CosFace classes: training identities with >= 2 training images
        cls_ids = sorted(k for k in multi if k not in held)
        self.class_of = {k: c for c, k in enumerate(cls_ids)}
        self.n_classes = len(cls_ids)
        self.lfw_label = np.array([self.class_of.get(k, -1) for k in ids], np.int64)
        self.lfw_ids = ids
        self.val_pairs = self._val_pairs(held, by_id, seed)
        log(f"LFW train: {len(self.train_idx)} images, {self.n_classes} CosFace classes; "
            f"held-out validation: {len(held)} training identities, {len(self.val_idx)} images, "
            f"{len(self.val_pairs)} pairs")
        self.lfw = load_u8(LFW_TRAIN, self.lfw_names, "lfw_train_u8.npy")
        self.use_utk = use_utk
        self.utk_names = list_images(UTK) if use_utk else []
        self.utk = load_u8(UTK, self.utk_names, "utk_u8.npy") if use_utk else None
        self.refresh_targets()

    def _val_pairs(self, held, by_id, seed):
        rng = random.Random(seed + 1)
        pos, neg = [], []
        hs = sorted(held)
        for k in hs:
            v = by_id[k]
            cand = [(a, b) for ai, a in enumerate(v) for b in v[ai + 1:]]
            rng.shuffle(cand)
            pos += [(a, b, 1) for a, b in cand[:4]]
        while len(neg) < len(pos):
            k1, k2 = rng.sample(hs, 2)
            neg.append((rng.choice(by_id[k1]), rng.choice(by_id[k2]), 0))
        pairs = pos + neg
        rng.shuffle(pairs)
        return pairs

    def refresh_targets(self) -> None:
        """(Re)load teacher embeddings; UTK shards may still be arriving from teacher.py."""
        def table(names, plain, mirror):
            t = np.zeros((len(names), 128), np.float32)
            have = np.zeros(len(names), bool)
            for i, n in enumerate(names):
                e = plain.get(n)
                if e is None:
                    continue
                m = mirror.get(n)
                if m is not None:
                    e = e + m
                t[i] = e / np.linalg.norm(e)
                have[i] = True
            return t, have

        self.lfw_t, self.lfw_have = table(self.lfw_names, load_teacher("lfw"), load_teacher("lfw-mirror"))
        if self.use_utk:
            self.utk_t, self.utk_have = table(self.utk_names, load_teacher("utk"), load_teacher("utk-mirror"))
        else:
            self.utk_t, self.utk_have = np.zeros((0, 128), np.float32), np.zeros(0, bool)
        tr = np.array(self.train_idx)
        pool = np.concatenate([self.lfw_t[tr][self.lfw_have[tr]], self.utk_t[self.utk_have]])
        self.t_mean = pool.mean(0) if len(pool) else np.zeros(128, np.float32)

    def epoch_items(self, rng: np.random.Generator) -> np.ndarray:
        """Shuffled (source, index) rows: source 0 = LFW, 1 = UTK (only crops with a target)."""
        lfw = np.array([(0, i) for i in self.train_idx], np.int64)
        utk_i = np.nonzero(self.utk_have)[0]
        utk = np.stack([np.ones_like(utk_i), utk_i], 1) if len(utk_i) else np.zeros((0, 2), np.int64)
        items = np.concatenate([lfw, utk])
        return items[rng.permutation(len(items))]

    def batch(self, rows: np.ndarray):
        imgs, tgt, have, label, is_lfw = [], [], [], [], []
        for src, i in rows:
            if src == 0:
                imgs.append(self.lfw[i]); tgt.append(self.lfw_t[i]); have.append(self.lfw_have[i])
                label.append(self.lfw_label[i]); is_lfw.append(True)
            else:
                imgs.append(self.utk[i]); tgt.append(self.utk_t[i]); have.append(self.utk_have[i])
                label.append(-1); is_lfw.append(False)
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()
        return (x, torch.from_numpy(np.stack(tgt)), torch.from_numpy(np.array(have)),
                torch.from_numpy(np.array(label)), torch.from_numpy(np.array(is_lfw)))


# ---------------------------------------------------------------------------- augmentation
def augment(x: torch.Tensor, is_lfw: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """x: float [B,3,112,112] in 0..255. Returns normalised (x - 127.5) / 128."""
    B = x.shape[0]

    def U(lo, hi, n=B):
        return lo + (hi - lo) * torch.rand(n, generator=g)

    # random black borders on LFW crops, like UTKFace's bands
    mask_p = (torch.rand(B, generator=g) < 0.5) & is_lfw
    if mask_p.any():
        rows = torch.arange(112).view(1, 112, 1)
        cols = torch.arange(112).view(1, 1, 112)
        top = (U(0, 30)).long().view(B, 1, 1)
        bot = (U(0, 10)).long().view(B, 1, 1)
        lft = (U(0, 14)).long().view(B, 1, 1)
        rgt = (U(0, 14)).long().view(B, 1, 1)
        keep = (rows >= top) & (rows < 112 - bot) & (cols >= lft) & (cols < 112 - rgt)
        keep = keep | ~mask_p.view(B, 1, 1)
        x = x * keep.unsqueeze(1)
    # small similarity jitter: scale, rotation, shift (black outside, as in the crops)
    s = U(0.92, 1.08)
    r = U(-6, 6) * math.pi / 180
    tx, ty = U(-4, 4) / 56, U(-4, 4) / 56
    theta = torch.stack([
        torch.stack([torch.cos(r) / s, -torch.sin(r) / s, tx], 1),
        torch.stack([torch.sin(r) / s, torch.cos(r) / s, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # colour: brightness, contrast, saturation, occasional grey
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    sat = U(0.6, 1.4).view(B, 1, 1, 1)
    sat = torch.where(torch.rand(B, 1, 1, 1, generator=g) < 0.05, torch.zeros_like(sat), sat)
    x = grey + (x - grey) * sat
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * U(0.7, 1.3).view(B, 1, 1, 1)
    x = x * U(0.7, 1.3).view(B, 1, 1, 1) + U(-12, 12).view(B, 1, 1, 1)
    # blur / low resolution on a quarter of the batch
    blur = torch.nonzero(torch.rand(B, generator=g) < 0.25).flatten()
    if len(blur):
        size = int(torch.randint(40, 96, (1,), generator=g))
        small = F.interpolate(x[blur], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x[blur] = F.interpolate(small, size=(112, 112), mode="bilinear", align_corners=False)
    # mirror half of them (the pair below adds the other orientation anyway)
    flip = torch.rand(B, generator=g) < 0.5
    x = torch.where(flip.view(B, 1, 1, 1), x.flip(3), x)
    return (x.clamp(0, 255) - 127.5) / 128.0


# ---------------------------------------------------------------------------- model pieces
class CosFace(nn.Module):
    def __init__(self, dim: int, n_classes: int, s: float = 32.0, m: float = 0.25):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, dim) * 0.01)
        self.s, self.m = s, m

    def forward(self, f: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(f), F.normalize(self.weight))
        onehot = F.one_hot(label, cos.shape[1]).to(cos.dtype)
        return F.cross_entropy(self.s * (cos - self.m * onehot), label)


def flip_feature(model: nn.Module, x: torch.Tensor, amp: bool, device) -> torch.Tensor:
    both = torch.cat([x, x.flip(3)])
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        e = model(both)
    e = e.float()
    return (e[: len(x)] + e[len(x):]) / 2


@torch.no_grad()
def embed_eval(model, imgs_u8: np.ndarray, device, bs: int = 64) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(imgs_u8), bs):
        x = torch.from_numpy(imgs_u8[i:i + bs]).permute(0, 3, 1, 2).float()
        x = ((x - 127.5) / 128.0).to(device).contiguous(memory_format=torch.channels_last)
        out.append(flip_feature(model, x, False, device).cpu())
    model.train()
    return F.normalize(torch.cat(out), dim=1).numpy()


def two_fold_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    n = len(scores)
    folds = [np.arange(n) < n // 2, np.arange(n) >= n // 2]
    accs = []
    for k in range(2):
        tr, te = folds[1 - k], folds[k]
        cand = np.unique(scores[tr])
        best_t = max(cand, key=lambda t: ((scores[tr] >= t) == (labels[tr] == 1)).mean())
        accs.append(((scores[te] >= best_t) == (labels[te] == 1)).mean())
    return float(np.mean(accs))


def validate(model, data: Data, device) -> tuple[float, float]:
    idx = np.array(data.val_idx)
    emb = embed_eval(model, data.lfw[idx], device)
    pos = {int(j): k for k, j in enumerate(idx)}
    pairs = data.val_pairs
    sc = np.array([float(emb[pos[a]] @ emb[pos[b]]) for a, b, _ in pairs])
    y = np.array([p[2] for p in pairs])
    return two_fold_accuracy(sc, y), float(np.mean(sc[y == 1]) - np.mean(sc[y == 0]))


def teacher_val_accuracy(data: Data) -> float | None:
    if not all(data.lfw_have[i] for i in data.val_idx):
        return None
    t = data.lfw_t
    sc = np.array([float(t[a] @ t[b]) for a, b, _ in data.val_pairs])
    return two_fold_accuracy(sc, np.array([p[2] for p in data.val_pairs]))


# ---------------------------------------------------------------------------- training
def lr_at(progress: float, peak: float, warmup: float = 0.04) -> float:
    if progress < warmup:
        return peak * (0.1 + 0.9 * progress / warmup)
    p = (progress - warmup) / (1 - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def param_groups(modules, wd):
    decay, no_decay = [], []
    for mod in modules:
        for m in mod.modules():
            for name, p in m.named_parameters(recurse=False):
                if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, PReLU)) or name == "bias":
                    no_decay.append(p)
                else:
                    decay.append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def save(path, **state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-minutes", type=float, default=120.0, help="wall-clock budget")
    ap.add_argument("--total-steps", type=int, default=0, help="step-based schedule instead of wall clock")
    ap.add_argument("--batch", type=int, default=32, help="samples per step (x2 images with the mirror)")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    ap.add_argument("--wd", type=float, default=0.02, help="decoupled weight decay (not on BN/PReLU)")
    ap.add_argument("--w-kd", type=float, default=8.0)
    ap.add_argument("--w-rel", type=float, default=4.0)
    ap.add_argument("--w-ce", type=float, default=0.5)
    ap.add_argument("--val-ids", type=int, default=80, help="held-out TRAINING identities")
    ap.add_argument("--val-every-min", type=float, default=10.0)
    ap.add_argument("--utk", action="store_true",
                    help="add UTKFace crops that have cached teacher embeddings (distillation only)")
    ap.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                    help="bfloat16 autocast (auto: on for CUDA only)")
    ap.add_argument("--compile", choices=["on", "off"], default="on",
                    help="torch.compile the training step's forward (measured here: 2x the "
                         "eager CPU throughput with channels_last; ~1 min to compile)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--out", default=CKPT)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.amp == "auto":
        amp = device.type == "cuda"  # on this CPU bf16 autocast measured slower than fp32
    else:
        amp = args.amp == "on"
    os.makedirs(args.out, exist_ok=True)
    log(f"device {device}, bf16 autocast {amp}, compile {args.compile}, threads {args.threads}, "
        f"batch {args.batch}, budget {args.budget_minutes} min")

    data = Data(args.seed, args.val_ids, args.utk)
    # channels_last: depthwise and 1x1 convs run faster in NHWC on both CPU (oneDNN) and GPU
    model = MobiFace("gdc").to(device, memory_format=torch.channels_last)
    # the compiled module shares the parameters; checkpoints and validation use `model` itself
    train_fwd = torch.compile(model) if args.compile == "on" else model
    # with a bias, P absorbs the mean of the (uncentred) dlib embeddings, so f need not carry a
    # constant direction, which would collapse the cosines that verification uses
    proj = nn.Linear(512, 128, bias=True).to(device)
    cosface = CosFace(512, data.n_classes).to(device)
    # AdamW: the CPU budget allows only a few thousand steps, where it converges faster than SGD
    opt = torch.optim.AdamW(param_groups([model, proj, cosface], args.wd), lr=args.lr,
                            betas=(0.9, 0.999))
    log(f"MobiFace gdc: {count_params(model):,} parameters; projection and CosFace "
        f"({data.n_classes} classes) used only in training")

    step, epoch, pos, elapsed_before, best = 0, 0, 0, 0.0, -1.0
    history = []
    last_path, best_path = os.path.join(args.out, "last.pt"), os.path.join(args.out, "best.pt")
    if args.resume and os.path.exists(last_path):
        st = torch.load(last_path, map_location=device, weights_only=False)
        model.load_state_dict(st["model"]); proj.load_state_dict(st["proj"])
        cosface.load_state_dict(st["cosface"]); opt.load_state_dict(st["opt"])
        step, epoch, pos = st["step"], st["epoch"], st["pos"]
        elapsed_before, best, history = st["elapsed"], st["best"], st.get("history", [])
        torch.set_rng_state(st["torch_rng"])
        log(f"resumed from {last_path}: step {step}, epoch {epoch}, {elapsed_before / 60:.1f} min done, best {best:.4f}")
    budget = args.budget_minutes * 60
    tacc = teacher_val_accuracy(data)
    if tacc is not None:
        log(f"teacher (dlib) 2-fold accuracy on the validation pairs: {tacc * 100:.2f}%")

    g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
    t0 = time.time()
    last_val = time.time()
    last_save = time.time()
    seen = 0
    run = {"kd": 0.0, "rel": 0.0, "ce": 0.0, "n": 0}
    stop = False

    def progress():
        if args.total_steps:
            return step / args.total_steps
        return (elapsed_before + time.time() - t0) / budget

    def checkpoint(path, **extra):
        save(path, model=model.state_dict(), proj=proj.state_dict(), cosface=cosface.state_dict(),
             opt=opt.state_dict(), step=step, epoch=epoch, pos=pos,
             elapsed=elapsed_before + time.time() - t0, best=best, history=history,
             torch_rng=torch.get_rng_state(), args=dict(vars(args), device=device.type), **extra)

    def do_val():
        nonlocal best, last_val
        acc, gap = validate(model, data, device)
        el = (elapsed_before + time.time() - t0) / 60
        history.append({"step": step, "minutes": round(el, 2), "val_acc": acc, "gap": gap})
        log(f"VAL step {step} epoch {epoch} {el:.1f} min: held-out training-identity pairs "
            f"2-fold accuracy {acc * 100:.2f}% (pos-neg cosine gap {gap:.3f})")
        if acc > best:
            best = acc
            checkpoint(best_path, val_acc=acc)
            log(f"new best {acc * 100:.2f}% -> {best_path}")
        last_val = time.time()

    while not stop:
        rng = np.random.default_rng(args.seed * 7919 + epoch)
        if pos == 0:
            data.refresh_targets()
        items = data.epoch_items(rng)
        if pos == 0:
            log(f"epoch {epoch}: {len(items)} samples ({int((items[:, 0] == 1).sum())} UTKFace)")
        t_mean = torch.from_numpy(data.t_mean).to(device)
        while pos + args.batch <= len(items):
            p = progress()
            if p >= 1.0:
                stop = True
                break
            lr = lr_at(p, args.lr)
            for grp in opt.param_groups:
                grp["lr"] = lr
            x, t, have, label, is_lfw = data.batch(items[pos:pos + args.batch])
            pos += args.batch
            x = augment(x, is_lfw, g).to(device).contiguous(memory_format=torch.channels_last)
            t, have, label = t.to(device), have.to(device), label.to(device)
            f = flip_feature(train_fwd, x, amp, device)
            zero = f.sum() * 0
            kd = ((proj(f) - t) ** 2).sum(1)[have].mean() if have.any() else zero
            if have.sum() >= 2:
                fn = F.normalize(f[have])
                tc = F.normalize(t[have] - t_mean)
                off = ~torch.eye(len(fn), dtype=torch.bool, device=device)
                rel = ((fn @ fn.T - tc @ tc.T) ** 2)[off].mean()
            else:
                rel = zero
            lab = label >= 0
            ce = cosface(f[lab], label[lab]) if lab.any() else zero
            loss = args.w_kd * kd + args.w_rel * rel + args.w_ce * ce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(list(model.parameters()) + list(proj.parameters()) + list(cosface.parameters()), 5.0)
            opt.step()
            step += 1
            seen += len(x)
            run["kd"] += kd.item(); run["rel"] += rel.item(); run["ce"] += ce.item(); run["n"] += 1
            if step % 20 == 0:
                el = time.time() - t0
                n = run["n"]
                log(f"step {step} ep {epoch} lr {lr:.4f} kd {run['kd'] / n:.4f} rel {run['rel'] / n:.4f} "
                    f"cosface {run['ce'] / n:.3f} | {seen / el:.1f} samples/s ({2 * seen / el:.1f} img/s) "
                    f"| {100 * p:.1f}% of budget")
                run = {"kd": 0.0, "rel": 0.0, "ce": 0.0, "n": 0}
            if time.time() - last_val > args.val_every_min * 60:
                do_val()
            if time.time() - last_save > 300:
                checkpoint(last_path)
                last_save = time.time()
        if not stop:
            epoch += 1
            pos = 0
            g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
    do_val()
    checkpoint(last_path)
    el = elapsed_before + time.time() - t0
    log(f"TRAIN-DONE steps {step}, {el / 60:.1f} min, best validation accuracy {best * 100:.2f}% "
        f"({best_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
