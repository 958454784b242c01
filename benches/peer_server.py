"""The service a user would write instead: FastAPI + onnxruntime, one model run
per request (each face beside its mirror), flip-averaged and L2-normalised
embeddings. `make bench` drives it with the same load generator as MobiFace.

It takes the service's /embed request ({"images": [base64, ...], "flip": true};
aligned 112x112 crops, other sizes are resized) and answers
{"embeddings": [{"embedding": [...]}, ...]}. Run as a user would: one uvicorn
process, a plain `def` endpoint (FastAPI runs it on its thread pool; onnxruntime
releases the GIL while the model runs), default session options but the
thread count.

usage: python benches/peer_server.py --model models/mobiface.onnx --port 8091 --threads 2
"""
import argparse
import base64
import io

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, HTTPException
from PIL import Image
from pydantic import BaseModel


class EmbedRequest(BaseModel):
    images: list[str]
    flip: bool = True


def build_app(model: str, threads: int) -> FastAPI:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    mean = float(meta["mobiface.input_mean"])
    scale = float(meta["mobiface.input_scale"])
    app = FastAPI()

    @app.post("/embed")
    def embed(req: EmbedRequest):
        if not req.images:
            raise HTTPException(400, "no images")
        faces = []
        for data in req.images:
            try:
                img = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
            except Exception as e:  # noqa: BLE001 - any decoding failure is the client's
                raise HTTPException(400, f"undecodable image: {e}")
            if img.size != (112, 112):
                img = img.resize((112, 112), Image.BILINEAR)
            faces.append(np.asarray(img, dtype=np.float32))
        x = (np.stack(faces) - mean) / scale  # N, H, W, C
        x = x.transpose(0, 3, 1, 2)
        if req.flip:
            x = np.concatenate([x, x[:, :, :, ::-1]])
        feats = session.run(["embedding"], {"input": np.ascontiguousarray(x)})[0]
        n = len(faces)
        if req.flip:
            feats = feats[:n] + feats[n:]
        feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        return {"embeddings": [{"embedding": f.tolist()} for f in feats]}

    return app


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="models/mobiface.onnx")
    p.add_argument("--port", type=int, default=8091)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    uvicorn.run(build_app(a.model, a.threads), host="127.0.0.1", port=a.port, log_level="warning")
