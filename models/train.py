"""Train MobiFace by Flipped-MobiFace distillation: from the dlib ResNet teacher (1.x), or with
--sets from EdgeFace-XS and SFace (2.0, in progress; the section at the end of this docstring).

    make train-1.4        # 1.4.0's recipe: this, then the fine-tune below, export and calibration
    make train [TRAIN_ARGS=--resume]   # 2.0: one session of the resumable run
    .venv-train/bin/python models/train.py --budget-minutes 75 [--resume]
    python3 models/train.py --pack lfw-train.npz --budget-minutes 4   # a GPU without ../shared
    .venv-train/bin/python models/train.py --init models/checkpoints/best.pt \
        --out models/checkpoints/ft --budget-minutes 60 --batch 32 --lr 5e-4 --swa-start 0.2

On a CUDA GPU the defaults become batch 256 and peak LR 5e-3 with bf16 autocast, and every
tensor a step touches (crops, targets, augmentation) stays on the device. MobiFace 1.2.0 is the
best checkpoint of the third command on one H200; 1.3.0 is the last command's swa.pt on this
2-core CPU, started from 1.2.0 (models/MODEL_CARD.md).

--init starts from a checkpoint's weights. --swa-start keeps the learning rate at its peak after
the warm-up and averages the weights every --swa-every steps from that fraction of the budget
on (stochastic weight averaging); the average, with BatchNorm recomputed, is validated and
written to swa.pt (and to best.pt where it beats every checkpoint before it).

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
    training images;
  * with --w-flip W > 0, mirror consistency: || f(I)/|f(I)| - f(mirror I)/|f(mirror I)| ||^2.
    Off by default: it makes single views verify almost as well as the average but cost a point
    of flip-averaged validation in a fine-tune (model card).
The weights are --w-kd, --w-rel, --w-ce (0 drops CosFace) and --w-flip.
Batches are uniform draws of the training crops, which gives the relational term about 3
same-person pairs of 496 per batch of 32 (mostly of the few people with dozens of photos);
--id-pairs keeps one pass over every crop per epoch but lays each identity's crops out in
adjacent twos (about 12 same-person pairs per batch), so the teacher's same-person cosines reach
the student through the relational term too; --pos-weight W counts each such pair W times.
With --mix-ratio R, each epoch adds R x (LFW crops) mixup views of two training crops whose own
teacher targets teacher.py computed (--sets lfw-mix), for the two distillation terms only; off by
default: at equal GPU time it scored lower on validation than plain crops (model card).
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

MobiFace 2.0 (--sets lfw,celeba,glint[,utk], targets.py's cache; `make train`). Per sample, with
e = f(I), em = f(mirror I) (I after augmentation; its own mirroring swaps the two targets) and
f = (e + em) / 2, t0, t1 the teacher's unit features of the view and of its mirror (--teacher:
EdgeFace-XS by default, SFace, or the two concatenated, each unit norm) and tf = unit(t0 + t1):
  * view (--w-view): (|| P e + b - t0 ||^2 + || P em + b - t1 ||^2) / 2, so that a single view is
    a good feature on its own (in 1.x only f was constrained, and single views verified near chance);
  * kd (--w-kd): || P f + b - tf ||^2, the paper's l2 loss on the Flipped-MobiFace feature;
    P, b a training-only 512 -> D projection (D = 640 for the concatenated teachers);
  * rel (--w-rel): the relational term on f against tf and on e against t0;
  * ce (--w-ce): CosFace over every training identity with >= 2 training crops (LFW train,
    CelebA, Glint360K), on e, em and f.
An epoch is every training crop once, or K times for a set given as --oversample SET=K (the
fifth session's lfw=3,lfwdet=3,celeba=2,glint=2 gives LFW train 60% of it instead of 38%).
The schedule is in steps (--total-steps, default 10,000 of batch 32), since the run spans
sessions; --budget-minutes bounds one session. The resume checkpoint (--ckpt, default
models/checkpoints/mobiface2.pt) is weights-only fp16, committed between sessions; --resume
continues it (AdamW restarts, so the LR ramps up over --resume-warmup steps), and refuses to start
a new run over it without --resume. Validation: targets.py's held-out LFW train and CelebA
identities, flip-averaged and single view; the mean of the four accuracies selects best.pt.
"""

from __future__ import annotations

import argparse
import copy
import io
import math
import os
import random
import signal
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
from mobiface import MobiFace, PReLU, count_params, recompute_batchnorm  # noqa: E402
from teacher import (LFW_TRAIN, UTK, empty_mix, list_images, load_mix, load_teacher,  # noqa: E402
                     split_identities, val_pairs)
import targets  # noqa: E402
import teacher_torch  # noqa: E402

CACHE = os.path.join(HERE, "cache")
CKPT = os.path.join(HERE, "checkpoints")


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S ") + msg, flush=True)


# ---------------------------------------------------------------------------- data
def load_u8(root: str, names: list[str], cache_name: str) -> np.ndarray:
    """All crops as uint8 [N,112,112,3], decoded once and cached as .npy (outside git)."""
    path = os.path.join(CACHE, cache_name)
    if os.path.exists(path):
        arr = np.load(path)
        if arr.shape[0] == len(names):
            return arr
    arr = np.empty((len(names), 112, 112, 3), np.uint8)
    for i, n in enumerate(names):
        arr[i] = np.asarray(Image.open(os.path.join(root, n)).convert("RGB"))
    os.makedirs(CACHE, exist_ok=True)
    np.save(path + ".tmp.npy", arr)
    os.replace(path + ".tmp.npy", path)
    return arr


def target_table(names, plain, mirror):
    """Unit teacher targets (flip-averaged where the mirror is cached) and which crops have one."""
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


def read_pack(path: str):
    """models/pack.py's file: crops, LFW targets and (unless --no-mix) mixup views, for machines without ../shared."""
    z = np.load(path)
    ends = z["jpeg_end"]
    starts = np.concatenate([[0], ends[:-1]])
    jpeg = z["jpeg"]
    lfw = np.stack([np.asarray(Image.open(io.BytesIO(jpeg[a:b].tobytes())).convert("RGB"))
                    for a, b in zip(starts, ends)])
    if "mix_a" in z.files:
        mix = {k: z["mix_" + k] for k in ("a", "b", "lam", "flip")}
        mix["emb"] = z["mix_t"].astype(np.float32) / 127
    else:  # packed with --no-mix
        mix = empty_mix()
    return [str(n) for n in z["names"]], lfw, z["lfw_t"].astype(np.float32) / 127, z["lfw_have"], mix


# same-person validation pairs per held-out identity (and as many different-person pairs): 20
# gives 549 + 549 pairs; with 4 (up to MobiFace 1.2.0) the 400 pairs moved 1-3 points between checks
VAL_PAIRS_PER_ID = 20


class Data:
    """Crops, teacher targets and mixup views; what a training step reads lives on `device`."""

    def __init__(self, seed: int, val_ids: int, use_utk: bool = False, mix_ratio: float = 0.0,
                 id_fraction: float = 1.0, pack: str | None = None, device=torch.device("cpu"),
                 id_pairs: bool = False):
        if id_pairs and (use_utk or mix_ratio > 0):
            raise SystemExit("--id-pairs orders LFW crops only: not with --utk or --mix-ratio")
        self.id_pairs = id_pairs
        if pack:
            if use_utk:
                raise SystemExit("--utk reads ../shared; a pack holds LFW only")
            names, self.lfw, lfw_t, lfw_have, mix = read_pack(pack)
        else:
            names = list_images(LFW_TRAIN)
            self.lfw = load_u8(LFW_TRAIN, names, "lfw_train_u8.npy")
            lfw_t, lfw_have = target_table(names, load_teacher("lfw"), load_teacher("lfw-mirror"))
            mix = load_mix() if mix_ratio > 0 else empty_mix()
        self.lfw_names, self.lfw_t, self.lfw_have = names, lfw_t, lfw_have
        ids = [n.split(os.sep)[0] for n in names]
        by_id: dict[str, list[int]] = {}
        for i, k in enumerate(ids):
            by_id.setdefault(k, []).append(i)
        held = split_identities(names, seed, val_ids)
        self.val_idx = sorted(i for k in held for i in by_id[k])
        train_ids = sorted(k for k in by_id if k not in held)
        if id_fraction < 1.0:  # for the accuracy-against-training-set-size figure
            train_ids = sorted(random.Random(seed + 3).sample(train_ids, round(id_fraction * len(train_ids))))
        kept = set(train_ids)
        self.train_idx = [i for i in range(len(ids)) if ids[i] in kept]
        self.train_groups = [np.array(by_id[k]) for k in train_ids]
        in_train = np.zeros(len(ids), bool)
        in_train[self.train_idx] = True
        # CosFace classes: training identities with >= 2 training images
        cls_ids = [k for k in train_ids if len(by_id[k]) >= 2]
        self.class_of = {k: c for c, k in enumerate(cls_ids)}
        self.n_classes = len(cls_ids)
        self.lfw_label = np.array([self.class_of.get(k, -1) for k in ids], np.int64)
        self.lfw_ids = ids
        self.val_pairs = self._val_pairs(held, by_id, seed)
        self.mix_ratio = mix_ratio
        if mix_ratio <= 0:
            mix = empty_mix()
        ok = in_train[mix["a"]] & in_train[mix["b"]]  # views never touch held-out identities
        mix = {k: v[ok] for k, v in mix.items()}
        mix["emb"] = mix["emb"] / np.maximum(np.linalg.norm(mix["emb"], axis=1, keepdims=True), 1e-12)
        self.n_mix = len(mix["a"])
        log(f"LFW train: {len(self.train_idx)} images, {self.n_classes} CosFace classes, "
            f"{self.n_mix} mixup views; held-out validation: {len(held)} training identities, "
            f"{len(self.val_idx)} images, {len(self.val_pairs)} pairs")
        utk, utk_t, utk_have = np.zeros((0, 112, 112, 3), np.uint8), np.zeros((0, 128), np.float32), np.zeros(0, bool)
        if use_utk:
            utk_names = list_images(UTK)
            utk = load_u8(UTK, utk_names, "utk_u8.npy")
            utk_t, utk_have = target_table(utk_names, load_teacher("utk"), load_teacher("utk-mirror"))
        self.utk_rows = np.nonzero(utk_have)[0]
        tr = np.array(self.train_idx)
        pool = np.concatenate([lfw_t[tr][lfw_have[tr]], utk_t[utk_have]])

        def T(a):
            return torch.from_numpy(np.ascontiguousarray(a)).to(device)

        self.t_mean = T(pool.mean(0).astype(np.float32))
        self.img, self.tgt, self.have, self.label = T(self.lfw), T(lfw_t), T(lfw_have), T(self.lfw_label)
        self.utk_img, self.utk_t, self.utk_have = T(utk), T(utk_t), T(utk_have)
        self.mix_a, self.mix_b, self.mix_lam, self.mix_flip, self.mix_t = (
            T(mix["a"].astype(np.int64)), T(mix["b"].astype(np.int64)), T(mix["lam"].astype(np.float32)),
            T(mix["flip"]), T(mix["emb"].astype(np.float32)))
        self.device = device

    def _val_pairs(self, held, by_id, seed):
        return val_pairs(held, by_id, seed, VAL_PAIRS_PER_ID)

    def epoch_items(self, rng: np.random.Generator) -> torch.Tensor:
        """Shuffled (source, index) rows: 0 = LFW crop, 1 = UTKFace crop, 2 = mixup view (a fresh
        draw of mix_ratio x the LFW count each epoch). With id_pairs, every LFW crop still comes
        once, but an identity's crops are shuffled and laid out in adjacent twos, so a batch holds
        same-person pairs for the relational term (about 12 per 32 crops against 3 in random order)."""
        if self.id_pairs:
            groups = [m[i:i + 2] for m in map(rng.permutation, self.train_groups) for i in range(0, len(m), 2)]
            order = np.concatenate([groups[i] for i in rng.permutation(len(groups))])
            return torch.from_numpy(np.stack([np.zeros_like(order), order], 1)).to(self.device)
        lfw = np.stack([np.zeros(len(self.train_idx), np.int64), np.array(self.train_idx)], 1)
        utk = np.stack([np.ones_like(self.utk_rows), self.utk_rows], 1)
        n_mix = min(self.n_mix, round(self.mix_ratio * len(self.train_idx)))
        mix = np.stack([np.full(n_mix, 2), rng.choice(self.n_mix, n_mix, replace=False)], 1)
        items = np.concatenate([lfw, utk, mix]).astype(np.int64)
        return torch.from_numpy(items[rng.permutation(len(items))]).to(self.device)

    def batch(self, rows: torch.Tensor):
        """Images float [B,3,112,112] in 0..255, targets, has-target, CosFace label (-1: none),
        and which rows are LFW-based; gathers by index so a GPU step never waits on the host."""
        src, idx = rows[:, 0], rows[:, 1]
        is_mix, is_utk = src == 2, src == 1
        mi = torch.where(is_mix, idx, 0)
        ia = torch.where(is_mix, self.mix_a[mi] if self.n_mix else idx, torch.where(is_utk, 0, idx))
        x = self.img[ia].float()
        t, have = self.tgt[ia], self.have[ia]
        if self.n_mix:
            lam = torch.where(is_mix, self.mix_lam[mi], 1.0).view(-1, 1, 1, 1)
            xb = self.img[self.mix_b[mi]].float()
            xb = torch.where(self.mix_flip[mi].view(-1, 1, 1, 1), xb.flip(2), xb)
            x = lam * x + (1 - lam) * xb
            t = torch.where(is_mix.view(-1, 1), self.mix_t[mi], t)
            have = have | is_mix
        if len(self.utk_img):
            ui = torch.where(is_utk, idx, 0)
            x = torch.where(is_utk.view(-1, 1, 1, 1), self.utk_img[ui].float(), x)
            t = torch.where(is_utk.view(-1, 1), self.utk_t[ui], t)
            have = torch.where(is_utk, self.utk_have[ui], have)
        label = torch.where(src == 0, self.label[ia], -1)
        return x.permute(0, 3, 1, 2), t, have, label, ~is_utk


class SetsData:
    """MobiFace 2.0's data (--sets): targets.py's crops and EdgeFace-XS/SFace targets of each crop
    and of its mirror, over several sets. Held-out TRAINING identities of LFW train and CelebA are
    validation (targets.py); Glint360K people who are held-out LFW identities are left out of
    training too. CosFace classes: every training identity with >= 2 training crops; LFW and
    Glint360K name people the same way, so one person in both is one class.

    A crop trains once its targets exist: `refresh()` (each epoch) picks up what targets.py has
    finished since, so a run can start while the cache is still being built.

    Offers the attributes warm_start and recalibrate_bn read from Data (`lfw` holds every set's
    crops, `lfw_t` the flip-averaged targets), plus per-view targets [N,2,D] for the objective."""

    def __init__(self, set_names: list[str], crop_dirs: dict[str, str], teacher: str, device,
                 oversample: dict[str, int] | None = None):
        self.cropsets = targets.load_sets(set_names, crop_dirs)
        oversample = oversample or {}
        if unknown := set(oversample) - set(set_names):
            raise SystemExit(f"--oversample: {', '.join(sorted(unknown))} not in --sets")
        held = set().union(*(s.held for s in self.cropsets if s.name in ("lfw", "lfwdet")))
        crops, keys, out, utk, repeat = [], [], [], [], []
        self.val: dict[str, tuple[np.ndarray, list]] = {}
        off = 0
        for s in self.cropsets:
            crops.append(np.asarray(s.crops()))
            ids = s.ids or [None] * len(s)
            keys += [None if i is None else (f"celeba/{i}" if s.name == "celeba" else i) for i in ids]
            out.append(s.is_val | np.array([s.name == "glint" and i in held for i in ids]))
            utk.append(np.full(len(s), s.name == "utk"))
            repeat.append(np.full(len(s), oversample.get(s.name, 1)))
            if s.name in targets.VAL_SETS:
                pairs = [(off + a, off + b, y) for a, b, y in s.val_pairs()]
                self.val[s.name] = (np.array(sorted({i for a, b, _ in pairs for i in (a, b)})), pairs)
            off += len(s)
        self.lfw = np.concatenate(crops)
        self.trainable = ~np.concatenate(out)
        self.repeat = np.concatenate(repeat)  # copies of each crop per epoch (--oversample)
        # distinct photos per identity: lfw and lfwdet are two crops of one photo, which make no
        # class of a person photographed once
        photos: dict[str, set[str]] = {}
        names = [os.path.basename(n) for s in self.cropsets for n in s.names]
        for i in np.nonzero(self.trainable)[0]:
            if keys[i] is not None:
                photos.setdefault(keys[i], set()).add(names[i])
        self.class_keys = sorted(k for k, v in photos.items() if len(v) >= 2)
        cls = {k: c for c, k in enumerate(self.class_keys)}
        self.n_classes = len(cls)
        self.lfw_label = np.array([cls.get(k, -1) if k is not None else -1 for k in keys], np.int64)
        self.lfw_label[~self.trainable] = -1
        self.sets, self.teacher, self.device = set_names, teacher, device

        def T(a):
            return torch.from_numpy(np.ascontiguousarray(a)).to(device)

        self.T = T
        self.img, self.label, self.is_utk = T(self.lfw), T(self.lfw_label), T(np.concatenate(utk))
        self.train_idx = np.zeros(0, np.int64)
        self.refresh()
        if not len(self.train_idx):
            raise SystemExit(f"no training crop has {teacher} targets yet: run targets.py")
        for name, (idx, _pairs) in self.val.items():
            if not self.lfw_have[idx].all():
                raise SystemExit(f"{name}: validation crops lack {teacher} targets: run targets.py")
        self.t_mean = T(self.lfw_t[self.train_idx].mean(0))
        log(f"{self.n_classes} CosFace classes; validation: "
            + ", ".join(f"{k} {len(v[0])} crops {len(v[1])} pairs" for k, v in self.val.items()))

    def refresh(self) -> None:
        """Re-read the targets cache; crops whose targets are finished join training."""
        tv, have = zip(*(s.target(self.teacher) for s in self.cropsets))
        self.views = np.concatenate(tv).astype(np.float32)
        self.t_dim = self.views.shape[2]
        self.lfw_have = np.concatenate(have)
        before, self.train_idx = len(self.train_idx), np.nonzero(self.trainable & self.lfw_have)[0]
        if len(self.train_idx) == before:
            return
        tf = self.views[:, 0] + self.views[:, 1]
        self.lfw_t = tf / np.maximum(np.linalg.norm(tf, axis=1, keepdims=True), 1e-12)
        self.tgt, self.have = self.T(self.views), self.T(self.lfw_have)
        off, parts = 0, []
        for s in self.cropsets:
            n = int((self.trainable & self.lfw_have)[off:off + len(s)].sum())
            parts.append(f"{s.name} {n}/{int(self.trainable[off:off + len(s)].sum())}")
            off += len(s)
        log(f"training crops with {self.teacher} targets: {len(self.train_idx)} ({', '.join(parts)})")

    def epoch_items(self, rng: np.random.Generator) -> torch.Tensor:
        self.refresh()
        items = np.repeat(self.train_idx, self.repeat[self.train_idx])
        return torch.from_numpy(rng.permutation(items)).to(self.device)

    def batch(self, rows: torch.Tensor):
        """Images float [B,3,112,112] in 0..255, per-view targets [B,2,D], has-target, CosFace
        label (-1: none) and which rows may get random black borders (all but UTKFace's)."""
        return (self.img[rows].float().permute(0, 3, 1, 2), self.tgt[rows], self.have[rows],
                self.label[rows], ~self.is_utk[rows])


SCORE_SETS = ("lfw", "celeba")


@torch.no_grad()
def validate_sets(model, data: SetsData, device) -> dict[str, float]:
    """2-fold accuracy on each validation set's pairs, flip-averaged and single view (percent),
    and `score`, their mean: the selection figure of a 2.0 run (model card)."""
    was = model.training
    model.eval()
    out = {}
    for name, (idx, pairs) in data.val.items():
        x = normalised(data.lfw[idx], device)
        a, b = map(torch.cat, zip(*(view_features(model, x[i:i + 64], False, device) for i in range(0, len(x), 64))))
        row = {int(j): k for k, j in enumerate(idx)}
        local = [(row[p], row[q], y) for p, q, y in pairs]
        for view, e in (("flip", (a + b) / 2), ("single", a)):
            out[f"{name}_{view}"] = 100 * targets.pair_metrics(F.normalize(e, dim=1).cpu().numpy(), local)[0]
    model.train(was)
    # the selection figure stays the four written down before the run (LFW and CelebA crops);
    # lfwdet (detector-aligned LFW) is reported beside it
    out["score"] = float(np.mean([v for k, v in out.items() if k.split("_")[0] in SCORE_SETS]))
    return out


def teacher_val_sets(data: SetsData) -> dict[str, float]:
    out = {}
    for name, (_idx, pairs) in data.val.items():
        for view in ("flip", "single"):
            unit = targets.view_features(data.views, view)
            out[f"{name}_{view}"] = 100 * targets.pair_metrics(unit, pairs)[0]
    return out

# ---------------------------------------------------------------------------- augmentation
def augment(x: torch.Tensor, is_lfw: torch.Tensor, g: torch.Generator, host_g: torch.Generator,
            with_flip: bool = False):
    """x: float [B,3,112,112] in 0..255. Returns normalised (x - 127.5) / 128 (and, with_flip,
    which rows it mirrored: their per-view targets swap)."""
    B, dev = x.shape[0], x.device

    def R(*shape):
        return torch.rand(*shape, generator=g, device=dev)

    def U(lo, hi, n=B):
        return lo + (hi - lo) * R(n)

    # random black borders on LFW crops, like UTKFace's bands (computed for every row and masked:
    # a data-dependent branch would make a GPU wait on the host)
    mask_p = (R(B) < 0.5) & is_lfw
    rows = torch.arange(112, device=dev).view(1, 112, 1)
    cols = torch.arange(112, device=dev).view(1, 1, 112)
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
    sat = torch.where(R(B, 1, 1, 1) < 0.05, torch.zeros_like(sat), sat)
    x = grey + (x - grey) * sat
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * U(0.7, 1.3).view(B, 1, 1, 1)
    x = x * U(0.7, 1.3).view(B, 1, 1, 1) + U(-12, 12).view(B, 1, 1, 1)
    # blur / low resolution on a quarter of the batch
    # (one random size per batch, drawn on the host so it is not a device sync)
    blur = R(B) < 0.25
    size = int(40 + 56 * float(torch.rand(1, generator=host_g)))
    small = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = torch.where(blur.view(B, 1, 1, 1), F.interpolate(small, size=(112, 112), mode="bilinear", align_corners=False), x)
    # mirror half of them (the pair below adds the other orientation anyway)
    flip = R(B) < 0.5
    x = torch.where(flip.view(B, 1, 1, 1), x.flip(3), x)
    x = (x.clamp(0, 255) - 127.5) / 128.0
    return (x, flip) if with_flip else x


def mix_rows(x: torch.Tensor, label: torch.Tensor, p: float, g: torch.Generator):
    """Blend a fraction p of the crops with the next crop of the batch; blends carry no identity."""
    B, dev = len(x), x.device
    m = torch.rand(B, generator=g, device=dev) < p
    lam = torch.rand(B, generator=g, device=dev).view(B, 1, 1, 1)
    x = torch.where(m.view(B, 1, 1, 1), lam * x + (1 - lam) * x.roll(1, 0), x)
    return x, torch.where(m, -1, label)


@torch.no_grad()
def online_targets(teacher, x: torch.Tensor, amp: bool, device) -> torch.Tensor:
    """The teacher's target for each augmented view x (normalised as the student's input)."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        return teacher_torch.flip_averaged(*teacher, x.float() * 128.0 + 127.5)


# ---------------------------------------------------------------------------- model pieces
class CosFace(nn.Module):
    def __init__(self, dim: int, n_classes: int, s: float = 32.0, m: float = 0.25):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, dim) * 0.01)
        self.s, self.m = s, m

    def forward(self, f: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Mean loss over the rows with label >= 0 (others carry no identity)."""
        cos = F.linear(F.normalize(f), F.normalize(self.weight))
        known = label >= 0
        onehot = F.one_hot(label.clamp(min=0), cos.shape[1]).to(cos.dtype) * known.unsqueeze(1)
        ce = F.cross_entropy(self.s * (cos - self.m * onehot), torch.where(known, label, -100), reduction="sum")
        return ce / known.sum().clamp(min=1)


def view_features(model: nn.Module, x: torch.Tensor, amp: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of each crop and of its mirror, in one forward pass."""
    both = torch.cat([x, x.flip(3)])
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        e = model(both)
    e = e.float()
    return e[: len(x)], e[len(x):]


def flip_feature(model: nn.Module, x: torch.Tensor, amp: bool, device) -> torch.Tensor:
    a, b = view_features(model, x, amp, device)
    return (a + b) / 2


def normalised(imgs_u8: np.ndarray, device) -> torch.Tensor:
    x = torch.from_numpy(imgs_u8).permute(0, 3, 1, 2).float()
    return ((x - 127.5) / 128.0).to(device).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def features(model, imgs_u8: np.ndarray, device, bs: int = 64) -> torch.Tensor:
    """Flip-averaged features of unaugmented crops, as the service computes them (not normalised)."""
    was_training = model.training
    model.eval()
    out = [flip_feature(model, normalised(imgs_u8[i:i + bs], device), False, device)
           for i in range(0, len(imgs_u8), bs)]
    model.train(was_training)
    return torch.cat(out)


def embed_eval(model, imgs_u8: np.ndarray, device) -> np.ndarray:
    return F.normalize(features(model, imgs_u8, device), dim=1).cpu().numpy()


def recalibrate_bn(model, data: "Data", device, n: int = 4096, bs: int = 128) -> None:
    """BatchNorm statistics recomputed over unaugmented training crops and their mirrors: the
    running statistics of averaged weights (SWA) belong to none of the averaged models."""
    idx = np.random.default_rng(0).permutation(data.train_idx)[:n]
    crops = (normalised(data.lfw[idx[i:i + bs]], device) for i in range(0, len(idx), bs))
    recompute_batchnorm(model, (torch.cat([x, x.flip(3)]) for x in crops))


@torch.no_grad()
def warm_start(model, proj: nn.Linear, cosface: "CosFace", data: "Data", device, limit: int = 0) -> None:
    """Training-only heads for a checkpoint that carries only MobiFace's weights (--init): the
    projection by ridge regression of the teacher targets on the features, and each CosFace class
    weight at its class's mean unit feature, so the first steps do not push the body around.
    With limit, a seeded sample of that many training crops (classes it misses start at zero)."""
    tr = np.array(data.train_idx)
    if limit and len(tr) > limit:
        tr = np.sort(np.random.default_rng(0).permutation(tr)[:limit])
    f = features(model, data.lfw[tr], device).double().cpu()
    have = data.lfw_have[tr]
    x = torch.cat([f[have], torch.ones(int(have.sum()), 1, dtype=torch.float64)], 1)
    t = torch.from_numpy(data.lfw_t[tr][have]).double()
    w = torch.linalg.solve(x.T @ x + 1e-2 * torch.eye(x.shape[1], dtype=torch.float64), x.T @ t)
    proj.weight.copy_(w[:-1].T.float())
    proj.bias.copy_(w[-1].float())
    fn = F.normalize(f, dim=1)
    label = torch.from_numpy(data.lfw_label[tr])
    sums = torch.zeros(data.n_classes, f.shape[1], dtype=torch.float64).index_add_(
        0, label.clamp(min=0), fn * (label >= 0).unsqueeze(1).double())
    cosface.weight.copy_(F.normalize(sums, dim=1).float())


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


def pair_scores(emb: np.ndarray, pairs, row: dict[int, int] | None = None):
    """Cosines and same-person labels of (a, b, same) pairs of LFW indices, from unit embeddings;
    `row` maps an LFW index to its row of `emb` when `emb` holds only some crops."""
    def at(i):
        return emb[i if row is None else row[i]]

    return (np.array([float(at(a) @ at(b)) for a, b, _ in pairs]), np.array([p[2] for p in pairs]))


def validate(model, data: Data, device) -> tuple[float, float]:
    idx = np.array(data.val_idx)
    emb = embed_eval(model, data.lfw[idx], device)
    sc, y = pair_scores(emb, data.val_pairs, {int(j): k for k, j in enumerate(idx)})
    return two_fold_accuracy(sc, y), float(np.mean(sc[y == 1]) - np.mean(sc[y == 0]))


def teacher_val_accuracy(data: Data) -> float | None:
    if not all(data.lfw_have[i] for i in data.val_idx):
        return None
    return two_fold_accuracy(*pair_scores(data.lfw_t, data.val_pairs))


def load_student(path: str) -> tuple[MobiFace, dict]:
    """A checkpoint's MobiFace (gdc head, eval mode, channels_last) and the checkpoint itself;
    half-precision weights (the GPU sweep's data-size runs) load into fp32."""
    st = torch.load(path, map_location="cpu", weights_only=False)
    model = MobiFace("gdc").to(memory_format=torch.channels_last)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in st["model"].items()})
    return model.eval(), st


# ---------------------------------------------------------------------------- training
def lr_at(progress: float, peak: float, warmup: float = 0.04, constant: bool = False) -> float:
    if progress < warmup:
        return peak * (0.1 + 0.9 * progress / warmup)
    if constant:  # SWA explores at a fixed LR; the average does the annealing
        return peak
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


CKPT_FORMAT = "mobiface-2.0-resume/1"


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores visible)"


def _half(sd: dict) -> dict:
    """fp16 copy of a state dict; a tensor outside fp16's range stays fp32 (an overflow once cost
    a run: model card, FT/FT0)."""
    out = {}
    for k, v in sd.items():
        v = v.detach().cpu()
        if v.is_floating_point() and (v.numel() == 0 or float(v.abs().max()) < 6e4):
            v = v.half()
        out[k] = v.clone()
    return out


def save_compact(path: str, model, proj, cosface, data: SetsData, **meta) -> None:
    """A 2.0 run's resume checkpoint, small enough to commit: MobiFace's weights and BatchNorm
    statistics, the training-only projection and CosFace weights (keyed by identity, so a resume
    over other sets keeps the classes it shares), all fp16, and where the run stands. Not the
    AdamW moments (they would triple the size): a resume ramps the LR up again instead."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save(path, format=CKPT_FORMAT, model=_half(model.state_dict()), proj=_half(proj.state_dict()),
         cosface=_half(cosface.state_dict()), classes=data.class_keys, sets=data.sets, teacher=data.teacher,
         **meta)


def load_compact(path: str, model, proj, cosface, data: SetsData) -> dict:
    st = torch.load(path, map_location="cpu", weights_only=False)
    if st.get("format") != CKPT_FORMAT:
        raise SystemExit(f"{path}: not a 2.0 resume checkpoint")
    if st["teacher"] != data.teacher:
        raise SystemExit(f"{path} was trained on {st['teacher']} targets, not {data.teacher}")

    def f32(sd):
        return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}

    model.load_state_dict(f32(st["model"]))
    proj.load_state_dict(f32(st["proj"]))
    old = {k: i for i, k in enumerate(st["classes"])}
    w = st["cosface"]["weight"].float()
    with torch.no_grad():
        for c, k in enumerate(data.class_keys):
            if k in old:
                cosface.weight[c] = w[old[k]].to(cosface.weight.device)
    return st


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-minutes", type=float, default=120.0, help="wall-clock budget")
    ap.add_argument("--total-steps", type=int, default=0, help="step-based schedule instead of wall clock")
    ap.add_argument("--batch", type=int, default=0,
                    help="samples per step (x2 images with the mirror); default 32 on a CPU, 256 on a GPU")
    ap.add_argument("--lr", type=float, default=0.0,
                    help="peak AdamW learning rate; default 3e-3 on a CPU, 5e-3 on a GPU")
    ap.add_argument("--wd", type=float, default=0.02, help="decoupled weight decay (not on BN/PReLU)")
    ap.add_argument("--w-kd", type=float, default=8.0)
    ap.add_argument("--w-rel", type=float, default=4.0)
    ap.add_argument("--w-ce", type=float, default=0.5)
    ap.add_argument("--w-flip", type=float, default=0.0,
                    help="weight of the mirror-consistency term (normalised f(I) against f(mirror I))")
    ap.add_argument("--mix-ratio", type=float, default=0.0,
                    help="mixup views (teacher.py --sets lfw-mix) per LFW crop in each epoch")
    ap.add_argument("--id-pairs", action="store_true",
                    help="lay each identity's crops out in adjacent twos, so batches hold same-person pairs")
    ap.add_argument("--pos-weight", type=float, default=1.0,
                    help="weight of a same-person pair in the relational term (1: as any pair)")
    ap.add_argument("--id-fraction", type=float, default=1.0,
                    help="train on this fraction of the training identities (data-size figure)")
    ap.add_argument("--online-teacher", action="store_true",
                    help="targets from teacher_torch.py on the very view the student sees (function matching), "
                         "instead of the cached targets of the unaugmented crop")
    ap.add_argument("--fm-mix", type=float, default=0.0,
                    help="with --online-teacher: this fraction of each batch blended with another crop of it "
                         "(mixup ratio uniform in [0, 1], no CosFace label)")
    ap.add_argument("--pack", default=None, help="read models/pack.py's file instead of ../shared")
    ap.add_argument("--val-ids", type=int, default=80, help="held-out TRAINING identities")
    ap.add_argument("--val-every-min", type=float, default=10.0, help="0: no validation (smoke tests)")
    ap.add_argument("--log-every", type=int, default=20, help="steps between progress lines")
    ap.add_argument("--utk", action="store_true",
                    help="add UTKFace crops that have cached teacher embeddings (distillation only)")
    ap.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                    help="bfloat16 autocast (auto: on for CUDA only)")
    ap.add_argument("--compile", choices=["on", "off"], default="on",
                    help="torch.compile the training step's forward (measured here: 2x the "
                         "eager CPU throughput with channels_last; ~1 min to compile)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="data order, initialisation and augmentation")
    ap.add_argument("--split-seed", type=int, default=0,
                    help="which training identities are held out for validation; separate from "
                         "--seed so that runs with different seeds are validated on the same pairs")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init", default=None,
                    help="fine-tune: start from this checkpoint's MobiFace weights (e.g. best.pt)")
    ap.add_argument("--swa-start", type=float, default=-1.0,
                    help="from this fraction of the budget on, keep the LR at its peak and average "
                         "the weights every --swa-every steps (SWA); off when negative")
    ap.add_argument("--swa-every", type=int, default=50)
    ap.add_argument("--out", default=CKPT)
    v2 = ap.add_argument_group("MobiFace 2.0 (--sets): targets.py's EdgeFace-XS/SFace targets per view")
    v2.add_argument("--sets", default="", help="e.g. lfw,celeba,glint,utk: train on these sets' cached targets")
    v2.add_argument("--teacher", default="edgeface", choices=["edgeface", "concat", "sface"],
                    help="target: EdgeFace-XS, SFace, or both concatenated (each unit norm; model card)")
    v2.add_argument("--crops", action="append", help="SET=DIR crop folder, as for targets.py")
    v2.add_argument("--oversample", default="",
                    help="SET=K,...: each crop of SET K times per epoch (e.g. lfw=3: more of LFW's share)")
    v2.add_argument("--w-view", type=float, default=8.0,
                    help="weight of the per-view l2 term (each view's feature to the teacher's feature of that view)")
    v2.add_argument("--ckpt", default=os.path.join(CKPT, "mobiface2.pt"),
                    help="the weights-only fp16 checkpoint --resume continues from (committed between sessions)")
    v2.add_argument("--save-every-min", type=float, default=5.0)
    v2.add_argument("--resume-warmup", type=int, default=100,
                    help="steps of linear LR ramp after --resume (AdamW's moments are not in the checkpoint)")
    v2.add_argument("--warm-start-crops", type=int, default=4096,
                    help="--init: fit the projection and CosFace weights on this many training crops")
    args = ap.parse_args(argv)
    if args.sets:
        bad = [f for f, on in (("--online-teacher", args.online_teacher), ("--fm-mix", args.fm_mix),
                               ("--utk", args.utk), ("--mix-ratio", args.mix_ratio), ("--id-pairs", args.id_pairs),
                               ("--pack", args.pack), ("--swa-start", args.swa_start >= 0),
                               ("--w-flip", args.w_flip)) if on]
        if bad:
            raise SystemExit(f"--sets trains on targets.py's cache; not with {', '.join(bad)}")
        # a run spread over sessions cannot know its wall-clock length: the schedule is in steps
        args.total_steps = args.total_steps or 10_000
        if not args.resume and os.path.exists(args.ckpt):
            raise SystemExit(f"{args.ckpt} exists: --resume continues it; another --ckpt starts a new run")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest conv kernels once
    gpu = device.type == "cuda"
    # a GPU needs big batches to be busy; AdamW's peak LR rises with them, less than linearly
    args.batch = args.batch or (256 if gpu else 32)
    args.lr = args.lr or (5e-3 if gpu else 3e-3)
    if args.amp == "auto":
        amp = device.type == "cuda"  # on this CPU bf16 autocast measured slower than fp32
    else:
        amp = args.amp == "on"
    os.makedirs(args.out, exist_ok=True)
    log(f"device {device}, bf16 autocast {amp}, compile {args.compile}, threads {args.threads}, "
        f"batch {args.batch}, budget {args.budget_minutes} min")

    if args.sets:
        oversample = {k: int(v) for k, v in (kv.split("=") for kv in args.oversample.split(",") if kv)}
        data = SetsData(args.sets.split(","), targets.parse_crops(args.crops), args.teacher, device, oversample)
    else:
        data = Data(args.split_seed, args.val_ids, args.utk, args.mix_ratio, args.id_fraction, args.pack, device,
                    args.id_pairs)
    # channels_last: depthwise and 1x1 convs run faster in NHWC on both CPU (oneDNN) and GPU
    model = MobiFace("gdc").to(device, memory_format=torch.channels_last)
    # with a bias, P absorbs the mean of the (uncentred) dlib embeddings, so f need not carry a
    # constant direction, which would collapse the cosines that verification uses
    # 2.0: 640-d for the concatenated teachers; training-only, the network stays 512-d
    proj = nn.Linear(512, getattr(data, "t_dim", 128), bias=True).to(device)
    cosface = CosFace(512, data.n_classes).to(device)
    init_info = None  # how the starting checkpoint was made, for export.py's training_time
    resume_path = args.ckpt if args.sets else os.path.join(args.out, "last.pt")
    if args.init and not (args.resume and os.path.exists(resume_path)):
        start, ist = load_student(args.init)
        model.load_state_dict(start.state_dict())
        init_info = {k: ist.get(k) for k in ("elapsed", "step", "args", "init", "from_onnx")}
        warm_start(model, proj, cosface, data, device, args.warm_start_crops if args.sets else 0)
        log(f"initialised from {args.init}; projection and CosFace weights fitted to its features")
    # the compiled module shares the parameters; checkpoints and validation use `model` itself
    train_fwd = torch.compile(model) if args.compile == "on" else model
    swa = torch.optim.swa_utils.AveragedModel(model) if args.swa_start >= 0 else None
    params = list(model.parameters()) + list(proj.parameters()) + list(cosface.parameters())
    # AdamW: the CPU budget allows only a few thousand steps, where it converges faster than SGD
    opt = torch.optim.AdamW(param_groups([model, proj, cosface], args.wd), lr=args.lr,
                            betas=(0.9, 0.999))
    log(f"MobiFace gdc: {count_params(model):,} parameters; projection and CosFace "
        f"({data.n_classes} classes) used only in training")

    step, epoch, pos, elapsed_before, best = 0, 0, 0, 0.0, -1.0
    history = []
    last_path, best_path = os.path.join(args.out, "last.pt"), os.path.join(args.out, "best.pt")
    images_before, sessions, resumed_at = 0, [], 0
    if args.sets and args.resume:
        if not os.path.exists(args.ckpt):
            raise SystemExit(f"--resume: no checkpoint at {args.ckpt}")
        st = load_compact(args.ckpt, model, proj, cosface, data)
        step, epoch, pos, init_info = st["step"], st["epoch"], st["pos"], st.get("init")
        elapsed_before, best, history = st["elapsed"], st["best"], st["history"]
        images_before, sessions, resumed_at = st["images_seen"], st["sessions"], st["step"]
        if st["n_items"] != len(data.train_idx):  # other sets or crops: their order starts afresh
            epoch, pos = epoch + 1, 0
        log(f"resumed from {args.ckpt}: step {step}, epoch {epoch}, {images_before:,} images seen, "
            f"{elapsed_before / 60:.1f} min in {len(sessions)} sessions")
    elif args.resume and os.path.exists(last_path):
        st = torch.load(last_path, map_location=device, weights_only=False)
        model.load_state_dict(st["model"]); proj.load_state_dict(st["proj"])
        cosface.load_state_dict(st["cosface"]); opt.load_state_dict(st["opt"])
        if swa is not None and st.get("swa"):
            swa.load_state_dict(st["swa"])
        step, epoch, pos, init_info = st["step"], st["epoch"], st["pos"], st.get("init")
        elapsed_before, best, history = st["elapsed"], st["best"], st.get("history", [])
        torch.set_rng_state(st["torch_rng"])
        log(f"resumed from {last_path}: step {step}, epoch {epoch}, {elapsed_before / 60:.1f} min done, best {best:.4f}")
    budget = args.budget_minutes * 60
    if args.sets:
        log("teacher on the validation pairs: " + ", ".join(f"{k} {v:.2f}%" for k, v in teacher_val_sets(data).items()))
    tacc = None if args.sets else teacher_val_accuracy(data)
    if tacc is not None:
        log(f"teacher (dlib) 2-fold accuracy on the validation pairs: {tacc * 100:.2f}%")
    teacher = None
    if args.online_teacher:
        teacher = teacher_torch.load(device)
        log(f"online teacher: {teacher_torch.WEIGHTS}, targets computed on each augmented view")
    elif args.fm_mix:
        raise SystemExit("--fm-mix needs --online-teacher (a blend has no cached target)")

    def generators(ep):
        # augmentation draws on the training device; the host one only picks the blur size
        return (torch.Generator(device=device).manual_seed(args.seed * 1000 + ep),
                torch.Generator().manual_seed(args.seed * 1000 + ep))

    g, host_g = generators(epoch)
    t0 = time.time()
    last_val = time.time()
    last_save = time.time()
    seen = 0
    # each loss term and its weight; the progress lines log the running mean of each term
    weights = {"kd": args.w_kd, "rel": args.w_rel, "ce": args.w_ce, "flip": args.w_flip}
    if args.sets:
        weights = {"view": args.w_view, "kd": args.w_kd, "rel": args.w_rel, "ce": args.w_ce}
    zero = torch.zeros((), device=device)
    run, run_steps = dict.fromkeys(weights, zero), 0
    stop = False

    def progress():
        if args.total_steps:
            return step / args.total_steps
        return (elapsed_before + time.time() - t0) / budget

    def state():
        return dict(model=model.state_dict(), step=step, epoch=epoch,
                    elapsed=elapsed_before + time.time() - t0, best=best, history=history,
                    args=dict(vars(args), device=device.type), init=init_info,
                    swa_snapshots=int(swa.n_averaged) if swa is not None else 0)

    session = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device_name(device),
               "threads": args.threads, "from_step": step,
               # what export.py describes when the weights or the mix changed between sessions
               "weights": {"view": args.w_view, "kd": args.w_kd, "rel": args.w_rel, "ce": args.w_ce},
               "oversample": args.oversample}

    def save_last():
        if args.sets:  # weights-only, fp16: what is committed between sessions
            images = images_before + 2 * seen
            save_compact(args.ckpt, model, proj, cosface, data, step=step, epoch=epoch, pos=pos,
                         elapsed=elapsed_before + time.time() - t0, best=best, history=history,
                         images_seen=images, n_items=len(data.train_idx), init=init_info,
                         args=dict(vars(args), device=device.type),
                         sessions=sessions + [dict(session, to_step=step, images=2 * seen,
                                                   minutes=round((time.time() - t0) / 60, 1))])
            log(f"saved {args.ckpt}: step {step}, {images:,} images seen")
            return
        # everything --resume needs
        save(last_path, proj=proj.state_dict(), cosface=cosface.state_dict(), opt=opt.state_dict(),
             pos=pos, torch_rng=torch.get_rng_state(), swa=swa and swa.state_dict(), **state())

    def do_val(net=model, what=""):
        nonlocal best, last_val
        if args.sets:
            # judged as it would ship: a copy with BatchNorm recomputed on clean crops (the run's
            # own statistics come from augmented batches and score lower; model card)
            net = copy.deepcopy(net)
            recalibrate_bn(net, data, device)
            v = validate_sets(net, data, device)
            el = (elapsed_before + time.time() - t0) / 60
            history.append({"step": step, "minutes": round(el, 2), **{k: round(x, 2) for k, x in v.items()}})
            log(f"VAL{what} step {step} epoch {epoch} {el:.1f} min, {images_before + 2 * seen:,} images: "
                + ", ".join(f"{k} {x:.2f}%" for k, x in v.items()))
            if v["score"] > best:
                best = v["score"]
                save(best_path, val=v, **dict(state(), model=net.state_dict(), what=what))
                log(f"new best score {best:.2f} -> {best_path}")
            last_val = time.time()
            return
        acc, gap = validate(net, data, device)
        el = (elapsed_before + time.time() - t0) / 60
        history.append({"step": step, "minutes": round(el, 2), "val_acc": acc, "gap": gap, "what": what})
        log(f"VAL{what} step {step} epoch {epoch} {el:.1f} min: held-out training-identity pairs "
            f"2-fold accuracy {acc * 100:.2f}% (pos-neg cosine gap {gap:.3f})")
        if acc > best:
            best = acc
            # the weights alone (about 10 MB): what export.py and fit_gap.py read
            save(best_path, val_acc=acc, **dict(state(), model=net.state_dict(), what=what))
            log(f"new best {acc * 100:.2f}% -> {best_path}")
        last_val = time.time()

    def losses(fwd, x, t, have, label):
        e, em = view_features(fwd, x, amp, device)
        f = (e + em) / 2
        # the flip average cancels f(I) - f(mirror I), so nothing else keeps single views useful
        cons = ((F.normalize(e) - F.normalize(em)) ** 2).sum(1).mean()
        # masks instead of boolean indexing: no step waits on the device for a count
        hv = have.float()
        kd = (((proj(f) - t) ** 2).sum(1) * hv).sum() / hv.sum().clamp(min=1)
        fn = F.normalize(f)
        tc = F.normalize(t - data.t_mean)
        w = hv.unsqueeze(1) * hv.unsqueeze(0) * (1 - torch.eye(len(f), device=device))
        if args.pos_weight != 1.0:
            same = (label.unsqueeze(1) == label.unsqueeze(0)) & (label >= 0).unsqueeze(1)
            w = w * torch.where(same, args.pos_weight, 1.0)
        rel = (((fn @ fn.T - tc @ tc.T) ** 2) * w).sum() / w.sum().clamp(min=1)
        return {"kd": kd, "rel": rel, "ce": cosface(f, label), "flip": cons}

    def losses_sets(fwd, x, t, have, label):
        """2.0: t [B,2,D] is the teacher's feature of each view (0: x as fed, 1: its mirror)."""
        e, em = view_features(fwd, x, amp, device)
        f = (e + em) / 2
        hv = have.float()
        n = hv.sum().clamp(min=1)
        w = hv.unsqueeze(1) * hv.unsqueeze(0) * (1 - torch.eye(len(f), device=device))

        def l2(feat, target):  # the paper's l2 loss through the training-only projection
            return (((proj(feat) - target) ** 2).sum(1) * hv).sum() / n

        def rel(feat, target):  # cosine geometry of the feature itself, as verification uses it
            fn, tc = F.normalize(feat), F.normalize(target - data.t_mean)
            return (((fn @ fn.T - tc @ tc.T) ** 2) * w).sum() / w.sum().clamp(min=1)

        t_flip = F.normalize(t[:, 0] + t[:, 1])
        return {"view": (l2(e, t[:, 0]) + l2(em, t[:, 1])) / 2, "kd": l2(f, t_flip),
                "rel": (rel(f, t_flip) + rel(e, t[:, 0])) / 2,
                "ce": (cosface(e, label) + cosface(em, label) + cosface(f, label)) / 3}

    loss_fn = losses_sets if args.sets else losses

    if args.init and step == 0 and args.val_every_min > 0:
        do_val(what=" (init)")  # a fine-tune is kept only where it beats its starting point
    # SIGTERM ends the session at the next step boundary, validated and saved like a finished
    # budget (a session that must stop early loses no steps)
    halt: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: halt.append(1))
    while not stop:
        rng = np.random.default_rng(args.seed * 7919 + epoch)
        items = data.epoch_items(rng)
        if pos == 0:
            log(f"epoch {epoch}: {len(items)} samples")
        while pos + args.batch <= len(items):
            p = progress()
            # 2.0: --budget-minutes bounds this session; the step schedule spans the whole run
            if p >= 1.0 or halt or (args.sets and time.time() - t0 >= budget):
                stop = True
                break
            lr = lr_at(p, args.lr, constant=swa is not None)
            if resumed_at:  # fresh AdamW moments: ramp up again rather than jump to the scheduled LR
                lr *= min(1.0, (step - resumed_at + 1) / args.resume_warmup)
            for grp in opt.param_groups:
                grp["lr"] = lr
            x, t, have, label, is_lfw = data.batch(items[pos:pos + args.batch])
            pos += args.batch
            if args.fm_mix:
                x, label = mix_rows(x, label, args.fm_mix, g)
            if args.sets:
                x, flipped = augment(x, is_lfw, g, host_g, with_flip=True)
                t = torch.where(flipped.view(-1, 1, 1), t.flip(1), t)
            else:
                x = augment(x, is_lfw, g, host_g)
            x = x.contiguous(memory_format=torch.channels_last)
            if teacher is not None:
                t, have = online_targets(teacher, x, amp, device), torch.ones_like(have)
            try:
                terms = loss_fn(train_fwd, x, t, have, label)
            except Exception as e:  # noqa: BLE001 -- a compiler failure must not cost the run
                if train_fwd is model:
                    raise
                log(f"torch.compile failed ({type(e).__name__}: {e}); continuing eager")
                train_fwd = model
                terms = loss_fn(train_fwd, x, t, have, label)
            loss = sum(weights[k] * v for k, v in terms.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            step += 1
            seen += len(x)
            if swa is not None and p >= args.swa_start and step % args.swa_every == 0:
                swa.update_parameters(model)
            run, run_steps = {k: run[k] + v.detach() for k, v in terms.items()}, run_steps + 1
            if step % args.log_every == 0:
                el = time.time() - t0
                m = {k: v.item() / run_steps for k, v in run.items()}
                log(f"step {step} ep {epoch} lr {lr:.5f} " + " ".join(f"{k} {v:.4f}" for k, v in m.items()) + " | "
                    f"{seen / el:.1f} samples/s ({2 * seen / el:.1f} img/s) | {100 * p:.1f}% of budget")
                run, run_steps = dict.fromkeys(weights, zero), 0
            if args.val_every_min > 0 and time.time() - last_val > args.val_every_min * 60:
                do_val()
            if time.time() - last_save > (args.save_every_min * 60 if args.sets else 300):
                save_last()
                last_save = time.time()
        if not stop:
            epoch += 1
            pos = 0
            g, host_g = generators(epoch)
    if args.val_every_min > 0:
        do_val()
    save_last()
    if swa is not None and swa.n_averaged > 0:
        recalibrate_bn(swa.module, data, device)
        log(f"SWA: the average of {int(swa.n_averaged)} snapshots, BatchNorm recomputed")
        do_val(swa.module, " (SWA)")
        save(os.path.join(args.out, "swa.pt"), val_acc=history[-1]["val_acc"],
             **dict(state(), model=swa.module.state_dict(), what=" (SWA)"))
    el = elapsed_before + time.time() - t0
    best_txt = f"score {best:.2f}" if args.sets else f"accuracy {best * 100:.2f}%"
    log(f"TRAIN-DONE steps {step}, {el / 60:.1f} min, best validation {best_txt} ({best_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
