"""MobiFace 2.0's teacher-target cache: EdgeFace-XS and SFace features of every training crop and
of its mirror, for LFW train, CelebA, Glint360K and UTKFace.

    .venv-train/bin/python models/targets.py [--sets lfw,celeba,glint,utk] [--crops lfw=DIR] [--threads 1]

Per set, under models/cache/targets/<set>-<hash of the crop folder>/ (outside git): crops.npy
(uint8 [N,112,112,3], decoded once), names.txt, and per teacher <teacher>.npy (float16
[N,2,d]: view 0 the crop, view 1 its mirror; each L2-normalised) with <teacher>.done.npy (which
crops are finished). Re-running resumes where it stopped; one command rebuilds everything
(`make targets`). Keyed by the crop folder, so crops made by `mobiface align` get their own
targets beside the shared dlib-aligned ones.

Order of work: the held-out validation crops of every set first (so `teachers.py validate` can
run after a few minutes), then teacher by teacher (--teachers order), labelled sets before
UTKFace. EdgeFace-XS runs at about 200 images/s on one idle thread, SFace at about 28: all four
sets, crops and mirrors, take about 6 minutes of one idle thread for EdgeFace-XS and 40 for SFace
(on the shared 2-core machine of the first 2.0 session, 2-20 images/s: hours).

Validation (held-out TRAINING identities, never ../shared/lfw/eval*): LFW train's 80 identities
(teacher.split_identities, seed 0: the split 1.3.0 and 1.4.0 were validated on, with the same
1,098 pairs) and 25 CelebA identities (same rule, seed 0; 20 same-person pairs per identity and as
many different-person pairs). Glint360K's 20 people overlap LFW train, so all of them train, and
UTKFace has no labels.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from teacher import LFW_TRAIN, SHARED, UTK, list_images, split_identities, val_pairs  # noqa: E402
import pairs as pairs_mod  # noqa: E402
from teachers import DIMS, combine  # noqa: E402

EXTRA = os.path.join(SHARED, "faces-extra")
# name -> (default crop folder, labelled by folder = identity)
SETS = {
    "lfw": (LFW_TRAIN, True),
    "celeba": (os.path.join(EXTRA, "celeba-aligned"), True),
    "glint": (os.path.join(EXTRA, "glint-sample"), True),
    "utk": (UTK, False),
    # LFW train's raw photos through the service's own detector and aligner (`mobiface align`,
    # `make align`): what the service sees at run time. Same people as "lfw", same held-out ones.
    "lfwdet": (os.path.join(HERE, "cache", "aligned", "lfw-train"), True),
}
# a set whose held-out identities are drawn from another set's crops (the same people)
HELD_FROM = {"lfwdet": "lfw"}
VAL_SETS = ("lfw", "celeba", "lfwdet")
VAL_IDS = {"lfw": 80, "celeba": 25}
VAL_PAIRS_PER_ID = 20
SPLIT_SEED = 0
ROOT = os.path.join(HERE, "cache", "targets")
SHARD = 64  # crops per teacher call (x2 with mirrors): bounds ONNX Runtime's activation memory


def parse_crops(spec: list[str] | None) -> dict[str, str]:
    """['lfw=DIR', ...] -> {set: folder}, defaults for the rest."""
    dirs = {k: v[0] for k, v in SETS.items()}
    for item in spec or []:
        k, _, d = item.partition("=")
        if k not in SETS or not d:
            raise SystemExit(f"--crops takes SET=DIR with SET in {sorted(SETS)}: {item!r}")
        dirs[k] = d
    return dirs


class CropSet:
    """One set's crops, identities, held-out split and cached teacher features."""

    def __init__(self, name: str, root: str, cache_root: str = ROOT):
        self.name, self.root = name, os.path.abspath(root)
        self.labelled = SETS[name][1]
        tag = hashlib.sha1(os.path.realpath(self.root).encode()).hexdigest()[:8]
        self.dir = os.path.join(cache_root, f"{name}-{tag}")
        os.makedirs(self.dir, exist_ok=True)
        names_file = os.path.join(self.dir, "names.txt")
        if os.path.exists(names_file):
            with open(names_file) as f:
                self.names = f.read().split("\n")
        else:
            self.names = list_images(self.root)
            _atomic_text(names_file, "\n".join(self.names))
            with open(os.path.join(self.dir, "source.txt"), "w") as f:
                f.write(self.root + "\n")
        self.ids = [n.split(os.sep)[0] for n in self.names] if self.labelled else None
        self.held: set[str] = set()
        held_from = HELD_FROM.get(name, name)
        if held_from in VAL_IDS:
            # drawn from the default crops' names, so other crops of the same photos (mobiface
            # align skips photos without a face) hold out the same identities: a resumed run
            # never validates on people it trained on
            default = SETS[held_from][0]
            base = self.names if os.path.realpath(default) == os.path.realpath(self.root) else list_images(default)
            self.held = split_identities(base, SPLIT_SEED, VAL_IDS[held_from])
        self.is_val = np.array([self.ids is not None and self.ids[i] in self.held for i in range(len(self.names))])

    def __len__(self) -> int:
        return len(self.names)

    def crops(self) -> np.ndarray:
        path = os.path.join(self.dir, "crops.npy")
        if os.path.exists(path):
            return np.load(path, mmap_mode="r")
        arr = np.empty((len(self.names), 112, 112, 3), np.uint8)
        for i, n in enumerate(self.names):
            arr[i] = np.asarray(Image.open(os.path.join(self.root, n)).convert("RGB"))
        np.save(path + ".tmp.npy", arr)
        os.replace(path + ".tmp.npy", path)
        return np.load(path, mmap_mode="r")

    def by_id(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, k in enumerate(self.ids or []):
            out.setdefault(k, []).append(i)
        return out

    def val_pairs(self) -> list[tuple[int, int, int]]:
        return val_pairs(self.held, self.by_id(), SPLIT_SEED, VAL_PAIRS_PER_ID) if self.held else []

    def _paths(self, teacher: str):
        return os.path.join(self.dir, f"{teacher}.npy"), os.path.join(self.dir, f"{teacher}.done.npy")

    def done(self, teacher: str) -> np.ndarray:
        _, d = self._paths(teacher)
        return np.load(d) if os.path.exists(d) else np.zeros(len(self), bool)

    def features(self, teacher: str) -> np.ndarray:
        """float16 [N,2,d] (view 0: crop, 1: mirror), rows not done are zero."""
        f, _ = self._paths(teacher)
        return np.load(f, mmap_mode="r")

    def target(self, how: str) -> tuple[np.ndarray, np.ndarray]:
        """float32 [N,2,D] targets (teachers.combine) and which crops have them."""
        parts = {k: np.asarray(self.features(k), np.float32) for k in (("edgeface", "sface") if how == "concat" else (how,))}
        have = np.logical_and.reduce([self.done(k) for k in parts])
        return combine(parts, how), have

    def compute(self, teacher_name: str, teachers, rows: np.ndarray, log) -> None:
        f_path, d_path = self._paths(teacher_name)
        if not os.path.exists(f_path):
            np.lib.format.open_memmap(f_path, "w+", np.float16, (len(self), 2, DIMS[teacher_name])).flush()
        feats = np.lib.format.open_memmap(f_path, "r+")
        done = self.done(teacher_name)
        todo = rows[~done[rows]]
        if not len(todo):
            return
        crops = self.crops()
        t0 = time.time()
        for k in range(0, len(todo), SHARD):
            r = np.sort(todo[k:k + SHARD])
            x = np.asarray(crops[r])
            both = teachers.embed(np.concatenate([x, x[:, :, ::-1]]))[teacher_name]
            feats[r, 0] = both[: len(r)]
            feats[r, 1] = both[len(r):]
            feats.flush()
            done[r] = True
            np.save(d_path + ".tmp.npy", done)
            os.replace(d_path + ".tmp.npy", d_path)
            n = k + len(r)
            log(f"{self.name} {teacher_name}: {n}/{len(todo)} crops ({2 * n / (time.time() - t0):.0f} images/s)")


def _atomic_text(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def load_sets(names, crop_dirs: dict[str, str], cache_root: str = ROOT) -> list[CropSet]:
    return [CropSet(n, crop_dirs[n], cache_root) for n in names]


def pair_metrics(unit: np.ndarray, pairs) -> tuple[float, float, float]:
    """2-fold accuracy (first half / second half of the shuffled pairs), TAR at FAR 1e-2 and 1e-3
    (the latter is the TAR at no false accept where fewer than 1,000 impostor pairs exist)."""
    a, b, y = (np.array(c) for c in zip(*pairs))
    s = np.einsum("ij,ij->i", unit[a], unit[b])
    folds = (np.arange(len(s)) >= len(s) // 2).astype(int)
    acc = pairs_mod.kfold_accuracy(s, y, folds, 2)[0]
    return acc, pairs_mod.tar_at_far(s, y, 1e-2)[0], pairs_mod.tar_at_far(s, y, 1e-3)[0]


def view_features(feats: np.ndarray, view: str) -> np.ndarray:
    """[N,2,d] -> unit [N,d]: the crop's own view ('single') or the flip average ('flip')."""
    f = feats[:, 0] if view == "single" else feats[:, 0] + feats[:, 1]
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def build(args) -> int:
    from teachers import Teachers

    def log(msg):
        print(time.strftime("%H:%M:%S ") + msg, flush=True)

    sets = load_sets(args.sets.split(","), parse_crops(args.crops), args.out)
    names = args.teachers.split(",")
    teachers = Teachers(args.threads, names)
    for s in sets:
        log(f"{s.name}: {len(s)} crops from {s.root}, {int(s.is_val.sum())} held out for validation -> {s.dir}")
        s.crops()
    # validation crops first, so teachers.py validate can run early; then teacher by teacher in
    # --teachers order (the run trains on the first), labelled sets before UTKFace; train.py
    # picks up finished crops at each epoch, so it can start before this ends
    for t in names:
        for s in sets:
            s.compute(t, teachers, np.nonzero(s.is_val)[0], log)
    for t in names:
        for s in sorted(sets, key=lambda s: not s.labelled):
            s.compute(t, teachers, np.arange(len(s)), log)
    log("TARGETS-DONE")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="lfw,lfwdet,celeba,glint,utk")
    ap.add_argument("--crops", action="append", help="SET=DIR: crops of SET from DIR (e.g. mobiface align's)")
    ap.add_argument("--teachers", default="edgeface,sface")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per teacher")
    ap.add_argument("--out", default=ROOT)
    return build(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
