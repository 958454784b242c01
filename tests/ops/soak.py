#!/usr/bin/env python3
"""Soak: mixed traffic against the real binary for a while (`make soak`: 10 minutes, release
build; not part of `make test`). 8 callers embed, enrol, verify, identify and delete in a mix,
1% of requests hostile (bad JSON, wrong shapes, undecodable or truncated images, huge
declared bodies, unknown routes, wrong methods). Reports 5xx count (must be 0; a 503 with
Retry-After under load is counted apart, as back-pressure), RSS at start and end (must not
grow by more than --max-rss-growth-mb once warm), WAL size, and p50/p99 per route. Exit 1
when a bound is broken.

    .venv/bin/python tests/ops/soak.py --bin target/release/mobiface --seconds 600
"""

import argparse
import base64
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time

from ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def crops(n):
    root = os.path.join(ROOT, "../shared/lfw/eval-aligned")
    out = []
    for person in sorted(os.listdir(root))[:n]:
        files = sorted(os.listdir(os.path.join(root, person)))
        with open(os.path.join(root, person, files[0]), "rb") as f:
            out.append(base64.b64encode(f.read()).decode())
    return out


class Caller(threading.Thread):
    def __init__(self, port, images, stop_at, rng, stats, lock):
        super().__init__(daemon=True)
        self.port, self.images, self.stop_at, self.rng = port, images, stop_at, rng
        self.stats, self.lock = stats, lock
        self.subjects = []  # (subject_id, [face_id])
        self.conn = None

    def request(self, method, path, body=None, ctype="application/json", route=None, raw=None):
        route = route or path
        t0 = time.perf_counter()
        status, data = None, b""
        for attempt in range(2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                if raw is not None:
                    self.conn.close()
                    s = socket.create_connection(("127.0.0.1", self.port), timeout=30)
                    s.sendall(raw)
                    data = s.recv(4096)
                    s.close()
                    status = int(data.split(b" ")[1]) if data.startswith(b"HTTP/1.1") else "closed"
                    self.conn = None
                    break
                headers = {"Content-Type": ctype} if body is not None else {}
                self.conn.request(method, path, body=body, headers=headers)
                r = self.conn.getresponse()
                data = r.read()
                status = r.status
                if r.getheader("connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                break
            except (OSError, http.client.HTTPException) as e:
                # A kept-alive connection the server closed (idle timeout): reconnect once.
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                status, data = f"error {e.__class__.__name__}", b""
        ms = (time.perf_counter() - t0) * 1000
        with self.lock:
            s = self.stats.setdefault(route, {"lat": [], "status": {}})
            s["lat"].append(ms)
            s["status"][str(status)] = s["status"].get(str(status), 0) + 1
        try:
            return status, json.loads(data) if data and raw is None else None
        except ValueError:
            return status, None

    def image(self):
        return self.rng.choice(self.images)

    def hostile(self):
        img = self.image()
        cut = base64.b64encode(base64.b64decode(img)[: len(img) // 3] + b"\xff\xd9").decode()
        choice = self.rng.randrange(8)
        if choice == 0:
            self.request("POST", "/embed", b'{"images": [', route="hostile")
        elif choice == 1:
            self.request("POST", "/embed", json.dumps({"images": [0, 0, 0]}).encode(), route="hostile")
        elif choice == 2:
            self.request("POST", "/embed", json.dumps({"images": [cut]}).encode(), route="hostile")
        elif choice == 3:
            self.request("POST", "/embed", json.dumps({"images": ["bm90IGFuIGltYWdl"]}).encode(), route="hostile")
        elif choice == 4:
            self.request(None, None, route="hostile", raw=b"POST /embed HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 999999999\r\n\r\n")
        elif choice == 5:
            self.request("GET", "/nope", route="hostile")
        elif choice == 6:
            self.request("DELETE", "/embed", route="hostile")
        else:
            body = json.dumps({"images": [{"data": img, "landmarks": [[]] * 10000}]}).encode()
            self.request("POST", "/embed", body, ctype="application/jsonfoo", route="hostile")

    def run(self):
        while time.time() < self.stop_at:
            r = self.rng.random()
            if r < 0.01:
                self.hostile()
            elif r < 0.30:
                n = self.rng.randint(1, 4)
                body = json.dumps({"images": [self.image() for _ in range(n)]}).encode()
                self.request("POST", "/embed", body)
            elif r < 0.45 or not self.subjects:
                st, subj = self.request("POST", "/subjects", json.dumps({"name": "soak"}).encode())
                if st == 201:
                    sid = subj["id"]
                    st, face = self.request("POST", f"/subjects/{sid}/faces",
                                            json.dumps({"image": self.image()}).encode(),
                                            route="/subjects/{id}/faces")
                    self.subjects.append((sid, [face["face_id"]] if st == 201 else []))
            elif r < 0.65:
                sid, _ = self.rng.choice(self.subjects)
                self.request("POST", "/verify", json.dumps({"image": self.image(), "subject_id": sid}).encode())
            elif r < 0.85:
                self.request("POST", "/identify", json.dumps({"image": self.image(), "top_k": 5}).encode())
            elif r < 0.95:
                sid, faces = self.subjects.pop(self.rng.randrange(len(self.subjects)))
                if faces and self.rng.random() < 0.5:
                    self.request("DELETE", f"/subjects/{sid}/faces/{faces[0]}", route="/subjects/{id}/faces/{face_id}")
                self.request("DELETE", f"/subjects/{sid}", route="/subjects/{id}")
            else:
                self.request("GET", "/subjects?limit=20", route="/subjects")


def pct(values, q):
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q * len(v)))], 1) if v else None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True)
    p.add_argument("--seconds", type=int, default=600)
    p.add_argument("--callers", type=int, default=8)
    p.add_argument("--warmup", type=int, default=30, help="seconds before the start RSS is taken")
    p.add_argument("--max-rss-growth-mb", type=float, default=64)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOBIFACE_")}
        env.update(MOBIFACE_LISTEN=f"127.0.0.1:{port}", MOBIFACE_DATABASE=os.path.join(d, "gallery.db"),
                   MOBIFACE_MODEL=os.path.join(ROOT, "models/mobiface.onnx"),
                   ORT_DYLIB_PATH=env.get("ORT_DYLIB_PATH")
                   or os.path.join(ROOT, "third_party/onnxruntime/libonnxruntime.so.1.31.1"))
        log = open(os.path.join(d, "server.log"), "wb")
        proc = subprocess.Popen([os.path.abspath(a.bin), "serve"], env=env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            for _ in range(600):
                try:
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    c.request("GET", "/readyz")
                    if c.getresponse().status == 200:
                        break
                except OSError:
                    time.sleep(0.2)
            images = crops(64)
            stats, lock = {}, threading.Lock()
            stop_at = time.time() + a.seconds
            callers = [Caller(port, images, stop_at, random.Random(i), stats, lock) for i in range(a.callers)]
            for c in callers:
                c.start()
            time.sleep(min(a.warmup, a.seconds / 4))
            rss_start = rss_mb(proc.pid)
            for c in callers:
                c.join()
            rss_end = rss_mb(proc.pid)
            wal = os.path.join(d, "gallery.db-wal")
            wal_mb = os.path.getsize(wal) / 1e6 if os.path.exists(wal) else 0.0
            server_errors = sum(n for s in stats.values() for code, n in s["status"].items()
                                if code.startswith("5") and code != "503")
            busy = sum(s["status"].get("503", 0) for s in stats.values())
            broken = sum(n for s in stats.values() for code, n in s["status"].items() if code.startswith("error"))
            report = {
                "seconds": a.seconds, "callers": a.callers,
                "requests": sum(len(s["lat"]) for s in stats.values()),
                "5xx_other_than_503": server_errors, "503_back_pressure": busy, "connection_errors": broken,
                "rss_mb_after_warmup": round(rss_start, 1), "rss_mb_end": round(rss_end, 1),
                "wal_mb": round(wal_mb, 2),
                "routes": {r: {"n": len(s["lat"]), "p50_ms": pct(s["lat"], 0.5), "p99_ms": pct(s["lat"], 0.99),
                               "status": s["status"]} for r, s in sorted(stats.items())},
            }
            print(json.dumps(report, indent=1))
            ok = server_errors == 0 and broken == 0 and rss_end - rss_start <= a.max_rss_growth_mb
            print("soak:", "PASS" if ok else "FAIL", flush=True)
            return 0 if ok else 1
        finally:
            proc.terminate()
            proc.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
