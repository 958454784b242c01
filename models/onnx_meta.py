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
    # without the service's own ONNX loader.
    import json
    import sys

    print(json.dumps(get_metadata(onnx.load(sys.argv[1], load_external_data=False))))
