"""MobiFace next to the service a user would write (benches/peer_server.py) and
next to bare ONNX Runtime, in one run (run by `make bench`).

Starts the service (one process per engine layout given with --service) and
the peer, both on the same model file and thread count, drives each with the
same closed-loop load generator (examples/loadgen.rs), interleaving service and
peer case by case so drift in the machine's load hits both, and prints
faces/s, p50 and p99 per case, the CPU cores each server kept busy during it (user +
system time over wall time: under --busy, the share of the CPU it won), the peak RSS of
each server, and the ratios.
Then times raw onnxruntime on the same file (images/s at batch 1, 2 and 8 on 1
and 2 threads), so the service's overhead over the bare model is a number.
With --busy, a CPU-bound process runs beside everything (one core's worth).

usage: python benches/peer_bench.py [--seconds 10] [--busy]
           [--service "" --service "--workers 1 --intra-threads 0" ...]
"""
import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def wait_ready(url, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout} s")


class Server:
    def __init__(self, name, argv, port, ready_path, env=None):
        self.name, self.port = name, port
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_ready(f"http://127.0.0.1:{port}{ready_path}", self.proc)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/embed"

    def stop(self):
        rss = peak_rss_mib(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return rss


def cpu_seconds(pid):
    """User + system CPU time of a process, all its threads (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(a, server, callers, faces):
    cpu0, t0 = cpu_seconds(server.proc.pid), time.monotonic()
    r = run_loadgen(a, server.url, callers, faces)
    # cores the server kept busy while loaded: under --busy, how much of the CPU it won
    r["cores"] = (cpu_seconds(server.proc.pid) - cpu0) / (time.monotonic() - t0)
    return r


def run_loadgen(a, url, callers, faces):
    out = subprocess.run(
        [a.loadgen, "--url", url, "--callers", str(callers), "--faces", str(faces),
         "--seconds", str(a.seconds), "--crops", a.crops],
        cwd=ROOT, check=True, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if r["errors"]:
        print(f"  warning: {r['errors']} failed requests to {url}", file=sys.stderr)
    return r


def raw_ort(model, seconds):
    """images/s of bare onnxruntime sessions on random input: the ceiling.
    With ORT's default spin-waiting, and without it (as the service runs)."""
    rows = []
    for threads, spin in ((1, True), (2, True), (2, False)):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        s = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        for batch in (1, 2, 8):
            x = np.random.default_rng(0).standard_normal((batch, 3, 112, 112)).astype(np.float32)
            s.run(None, {"input": x})
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                s.run(None, {"input": x})
                n += 1
            rows.append({"threads": threads, "spinning": spin, "batch": batch,
                         "images_per_s": n * batch / (time.perf_counter() - t0)})
        del s
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--busy", action="store_true", help="run a CPU-bound process beside everything")
    p.add_argument("--service", action="append", help="extra `serve` flags, one engine layout per use "
                   "(default: the defaults, and one worker with ONNX Runtime choosing its threads)")
    p.add_argument("--callers", default="1,8,32")
    p.add_argument("--faces", default="1,8")
    p.add_argument("--threads", type=int, default=2, help="the peer's intra-op threads")
    p.add_argument("--model", default="models/mobiface.onnx")
    p.add_argument("--bin", default="target/release/mobiface")
    p.add_argument("--loadgen", default="target/release/examples/loadgen")
    p.add_argument("--crops", default="../shared/lfw/eval-aligned")
    p.add_argument("--out", default="target/bench-peer.json")
    a = p.parse_args()
    layouts = a.service if a.service else ["", "--workers 1 --intra-threads 0"]
    callers = [int(c) for c in a.callers.split(",")]
    faces = [int(f) for f in a.faces.split(",")]

    hog = None
    if a.busy:
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    tmp = tempfile.mkdtemp(prefix="mobiface-bench-")
    servers = []
    try:
        port = 18090
        peer = Server("peer", [sys.executable, "benches/peer_server.py", "--model", a.model,
                               "--port", str(port), "--threads", str(a.threads)], port, "/docs")
        servers.append(peer)
        services = []
        for i, flags in enumerate(layouts):
            port += 1
            argv = [a.bin, "serve", "--listen", f"127.0.0.1:{port}", "--model", a.model,
                    "--database", os.path.join(tmp, f"gallery-{i}.db"), *shlex.split(flags)]
            s = Server(f"mobiface {flags or '(defaults)'}", argv, port, "/readyz")
            services.append(s)
            servers.append(s)
        results = {s.name: {} for s in servers}
        for f in faces:
            for c in callers:
                # Alternate who goes first so a trend in the machine's load favours neither.
                order = servers if (f + c) % 2 else servers[::-1]
                for s in order:
                    results[s.name][(c, f)] = load(a, s, c, f)
                line = "  ".join(f"{s.name}: {results[s.name][(c, f)]['faces_per_s']:.1f}" for s in servers)
                print(f"  {c:>2} callers x {f} faces: {line} faces/s", file=sys.stderr)
        rss = {s.name: s.stop() for s in servers}
        servers = []
        raw = raw_ort(a.model, min(a.seconds, 5))
    finally:
        for s in servers:
            s.stop()
        if hog:
            hog.kill()

    with open(os.path.join(ROOT, a.out), "w") as fh:
        json.dump({"busy": a.busy, "seconds": a.seconds,
                   "results": {n: {f"{c}x{f}": r for (c, f), r in v.items()} for n, v in results.items()},
                   "peak_rss_mib": rss, "raw_ort": raw}, fh, indent=1)

    def num(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) and v == v else "n/a"

    def ratio(x, y, width):
        ok = all(isinstance(v, (int, float)) and v == v for v in (x, y)) and y
        return f"{x / y:>{width}.2f}" if ok else f"{'n/a':>{width}}"

    print()
    print(f"/embed, closed loop, {a.seconds:g} s per case, aligned LFW crops, flip on; peer: FastAPI + "
          f"onnxruntime, {a.threads} intra-op threads; load: {'a CPU-bound process beside it' if a.busy else 'no other process of ours'}")
    print(f"{'server':<44} {'callers':>7} {'faces/req':>9} {'faces/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'cores':>6} {'x peer faces/s':>14} {'x peer p99':>10}")
    for f in faces:
        for c in callers:
            base = results["peer"][(c, f)]
            for s in ["peer"] + [x.name for x in services]:
                r = results[s][(c, f)]
                rel = "" if s == "peer" else (f"{ratio(r['faces_per_s'], base['faces_per_s'], 14)} "
                                              f"{ratio(r['p99_ms'], base['p99_ms'], 10)}")
                print(f"{s:<44} {c:>7} {f:>9} {num(r['faces_per_s'], '8.1f')} {num(r['p50_ms'], '8.1f')} "
                      f"{num(r['p99_ms'], '8.1f')} {num(r.get('cores'), '6.2f')} {rel}")
    print()
    print("peak RSS (VmHWM): " + "; ".join(f"{n} {v:.0f} MiB" + ("" if n == "peer" else f" ({v / rss['peer']:.2f}x peer)")
                                           for n, v in rss.items()))
    print()
    print("raw onnxruntime on the same file (random input, one session, back-to-back runs):")
    for r in raw:
        spin = "" if r["threads"] == 1 else (", spin-waiting" if r["spinning"] else ", no spin-waiting")
        print(f"  {r['threads']} thread(s){spin}, batch {r['batch']}: {r['images_per_s']:.1f} images/s")
    # With flip a face is two images; the service runs a face and its mirror as one batch of 2.
    best_raw = max(r["images_per_s"] for r in raw if r["batch"] == 2) / 2
    for s in services:
        best = max(results[s.name][(c, f)]["faces_per_s"] for c in callers for f in faces)
        print(f"{s.name}: best /embed {best:.1f} faces/s = {best / best_raw:.2f}x raw onnxruntime's "
              f"{best_raw:.1f} faces/s (batch 2 = a face and its mirror, best of the settings above)")


if __name__ == "__main__":
    main()
