"""Read and write the `mobiface.*` metadata_props of an ONNX model (onnx only, no PyTorch)."""

from __future__ import annotations

import onnx


def set_metadata(model: onnx.ModelProto, meta: dict) -> None:
    """Replace (or add) metadata_props keys; a value of None removes the key. Keys stay sorted."""
    props = {p.key: p.value for p in model.metadata_props}
    for k, v in meta.items():
        if v is None:
            props.pop(k, None)
        else:
            props[k] = str(v)
    del model.metadata_props[:]
    for k in sorted(props):
        entry = model.metadata_props.add()
        entry.key, entry.value = k, props[k]


def get_metadata(model: onnx.ModelProto) -> dict:
    return {p.key: p.value for p in model.metadata_props}


if __name__ == "__main__":
    # `python models/onnx_meta.py MODEL.onnx` prints the metadata as JSON, so tests can read it
    # without the service's own ONNX loader; `--set KEY=VALUE ... --out COPY.onnx` writes a copy
    # with keys changed, so tests can feed the service metadata the shipped file lacks.
    import argparse
    import json

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out")
    args = ap.parse_args()
    proto = onnx.load(args.model, load_external_data=False)
    if args.set:
        if not args.out:
            ap.error("--set needs --out")
        set_metadata(proto, dict(kv.split("=", 1) for kv in args.set))
        onnx.save(proto, args.out)
    else:
        print(json.dumps(get_metadata(proto)))
