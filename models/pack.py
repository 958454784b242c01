"""Pack the training inputs into one file for a machine without ../shared (a rented GPU).

    .venv-train/bin/python models/pack.py [--out models/cache/gpu/lfw-train.npz]
    python3 models/train.py --pack models/cache/gpu/lfw-train.npz ...

Holds the LFW training crops (re-encoded as JPEG quality 95, 4:2:0: about 41 MiB, a mean
absolute pixel change of 0.85/255 from the shared files) and the teacher targets train.py
builds from the caches (flip-averaged LFW targets and, unless --no-mix, the mixup views,
L2-normalised, as int8 x 127). Never the eval split.
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from teacher import LFW_TRAIN, list_images, load_mix, load_teacher  # noqa: E402
from train import target_table  # noqa: E402


def to_i8(e: np.ndarray) -> np.ndarray:
    """Unit rows as int8 x 127: a quarter of the float32 size, ~0.004 error per coordinate."""
    return np.rint(e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12) * 127).astype(np.int8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "cache", "gpu", "lfw-train.npz"))
    ap.add_argument("--no-mix", action="store_true",
                    help="leave the mixup views out (6 MiB less, for a device's 64 MiB transfer limit)")
    args = ap.parse_args(argv)
    names = list_images(LFW_TRAIN)
    blobs = []
    for n in names:
        b = io.BytesIO()
        Image.open(os.path.join(LFW_TRAIN, n)).convert("RGB").save(b, "JPEG", quality=95, subsampling=2)
        blobs.append(np.frombuffer(b.getvalue(), np.uint8))
    t, have = target_table(names, load_teacher("lfw"), load_teacher("lfw-mirror"))
    fields = dict(names=np.array(names), jpeg=np.concatenate(blobs),
                  jpeg_end=np.cumsum([len(b) for b in blobs]), lfw_t=to_i8(t), lfw_have=have)
    n_mix = 0
    if not args.no_mix:
        mix = load_mix()
        n_mix = len(mix["a"])
        fields.update(mix_a=mix["a"], mix_b=mix["b"], mix_lam=mix["lam"], mix_flip=mix["flip"],
                      mix_t=to_i8(mix["emb"]))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp.npz"
    np.savez_compressed(tmp, **fields)  # the names shrink 2.5 MiB -> ~0.1; the JPEGs do not
    os.replace(tmp, args.out)
    print(f"[pack] {len(names)} crops, {n_mix} mixup views -> {args.out} "
          f"({os.path.getsize(args.out) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
