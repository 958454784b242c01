#!/usr/bin/env python3
"""Writes the seed corpus of each fuzz target (fuzz/corpus/<target>/seed-*), all synthetic:
no file from ../shared. cargo-fuzz adds the inputs it finds next to these (`make fuzz`);
commit the ones worth keeping (crashes always). Run with the project venv (Pillow):

    .venv/bin/python fuzz/make_seeds.py
"""
import io
import json
import os
import struct
import zlib

from PIL import Image

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def picture(w=40, h=30, mode="RGB"):
    img = Image.new("RGB", (w, h))
    img.putdata([((x * 7) % 256, (y * 9) % 256, (x * y) % 256) for y in range(h) for x in range(w)])
    return img.convert(mode)


def encoded(img, fmt, **kw):
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def png_bomb():
    """IHDR declares 30000x30000 grey; the data holds one row."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 30001)) + chunk(b"IEND", b"")


def main():
    jpeg = encoded(picture(), "JPEG", quality=90)
    seeds = {
        "jpeg": jpeg,
        "jpeg-progressive": encoded(picture(64, 48), "JPEG", progressive=True),
        "jpeg-grey": encoded(picture(mode="L"), "JPEG"),
        "jpeg-cut-with-eoi": jpeg[: len(jpeg) // 2] + b"\xff\xd9",
        "jpeg-cut": jpeg[: len(jpeg) // 2],
        "png": encoded(picture(), "PNG"),
        "png-rgba": encoded(picture(mode="RGBA"), "PNG"),
        "png-grey-alpha": encoded(picture(mode="LA"), "PNG"),
        "png-palette": encoded(picture(mode="P"), "PNG"),
        "png-bomb": png_bomb(),
        "webp-lossless": encoded(picture(), "WEBP", lossless=True),
        "webp-lossy": encoded(picture(), "WEBP", quality=50),
        "bmp": encoded(picture(), "BMP"),
        "empty": b"",
        "text": b"not an image at all",
    }
    exif = Image.Exif()
    exif[0x0112] = 6
    seeds["jpeg-exif-rotated"] = encoded(picture(), "JPEG", exif=exif.tobytes())
    for name, data in seeds.items():
        write("decode_and_crop", name, data)

    def points(pts, w=200, h=200):
        return b"".join(struct.pack("<f", v) for p in pts for v in p) + bytes([w - 1, h - 1])
    template = [[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]]
    write("align", "template", points(template, 112, 112))
    write("align", "scaled", points([[x * 1.8 + 10, y * 1.8 + 5] for x, y in template]))
    write("align", "rotated", points([[y, x] for x, y in template]))
    write("align", "same-point", points([[50, 50]] * 5))
    write("align", "nan", points([[float("nan"), 1]] * 5))
    write("align", "huge", points([[3e38, -3e38]] * 5))

    img = __import__("base64").b64encode(encoded(picture(16, 16), "PNG")).decode()
    lm = [[4, 5], [11, 5], [8, 9], [5, 12], [11, 12]]
    bodies = {
        "embed": {"images": [img], "flip": False},
        "embed-landmarks": {"images": [{"data": img, "landmarks": lm}]},
        "embed-data-url": {"images": ["data:image/png;base64," + img]},
        "embed-zeros": {"images": [0, 0, 0]},
        "embed-many-landmarks": {"images": [{"data": img, "landmarks": [[]] * 50}]},
        "verify-pair": {"image1": img, "image2": img, "threshold": 0.4},
        "verify-subject": {"image": img, "subject_id": "00000000-0000-4000-8000-000000000000"},
        "verify-nulls": {"image1": None, "image2": None, "image": None, "subject_id": None, "threshold": None},
        "identify": {"image": img, "top_k": 3},
        "subject": {"name": "Ada", "metadata": {"team": ["x", 1, None, {"y": 2.5}]}},
        "add-face": {"image": {"data": img}},
    }
    for name, body in bodies.items():
        write("json_body", name, json.dumps(body))
    write("json_body", "nested", "[" * 200 + "]" * 200)
    write("json_body", "truncated", '{"images": ["aGk=", ')
    write("json_body", "escapes", '{"name": "\\u00e9\\ud83d\\ude00", "images": ["\\u0061GK="]}')

    png = encoded(picture(16, 16), "PNG")

    def form(parts):
        out = b""
        for name, filename, ctype, data in parts:
            out += b"--XyZ\r\nContent-Disposition: form-data; name=\"" + name.encode() + b"\""
            if filename:
                out += b"; filename=\"" + filename.encode() + b"\""
            out += b"\r\n"
            if ctype:
                out += b"Content-Type: " + ctype.encode() + b"\r\n"
            out += b"\r\n" + data + b"\r\n"
        return out + b"--XyZ--\r\n"
    write("multipart_body", "two-images", form([("image", "a.png", "image/png", png), ("image", "b.png", "image/png", png),
                                                 ("flip", None, None, b"false")]))
    write("multipart_body", "verify", form([("image1", "a.png", None, png), ("image2", "b.png", None, png)]))
    write("multipart_body", "identify", form([("image", "a.png", None, png), ("top_k", None, "text/plain", b"2")]))
    write("multipart_body", "subject", form([("name", None, None, b"Ada"), ("metadata", None, None, b'{"a": 1}')]))
    write("multipart_body", "conflict", form([("images", None, None, b"[]"), ("image", "a.png", None, png)]))
    write("multipart_body", "unterminated", form([("image", "a.png", None, png)])[:-9])


if __name__ == "__main__":
    main()
