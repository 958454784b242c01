#!/usr/bin/env python3
"""The OpenAPI document is the contract the server keeps: schemathesis (PyPI, pinned in
tests/ops/requirements.txt) against the real binary on a fresh gallery, once open and once
with API keys, every check (`--checks all`) and every phase (examples, coverage, fuzzing,
stateful), failing on any finding. `make test` runs it bounded; to run longer:

    .venv/bin/python tests/ops/schemathesis_check.py --bin target/debug/mobiface \\
        --max-examples 500 --max-time 1800

Settings that a schema cannot state are in tests/ops/schemathesis.toml, each with its reason.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

from ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ADMIN_KEY = "schemathesis-admin-key-4f7d2c9b1e"


def serve(binary, workdir, extra_env):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOBIFACE_")}
    env.update(
        MOBIFACE_LISTEN=f"127.0.0.1:{port}",
        MOBIFACE_DATABASE=os.path.join(workdir, "gallery.db"),
        MOBIFACE_MODEL=os.path.join(ROOT, "models/mobiface.onnx"),
        MOBIFACE_SHUTDOWN_DRAIN_S="0",
        ORT_DYLIB_PATH=env.get("ORT_DYLIB_PATH")
        or os.path.join(ROOT, "third_party/onnxruntime/libonnxruntime.so.1.31.1"),
        **extra_env,
    )
    log = open(os.path.join(workdir, "server.log"), "wb")
    proc = subprocess.Popen([binary, "serve"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited at start: {open(log.name).read()}")
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            time.sleep(0.2)
    proc.kill()
    sys.exit("server not ready")


def run(args, label, extra_env, headers):
    with tempfile.TemporaryDirectory() as d:
        proc, base = serve(os.path.abspath(args.bin), d, extra_env)
        try:
            cmd = [
                os.path.join(ROOT, ".venv/bin/schemathesis"),
                "--config-file", os.path.join(ROOT, "tests/ops/schemathesis.toml"),
                "run", base + "/openapi.json",
                "--checks", "all",
                "--phases", "examples,coverage,fuzzing,stateful",
                "--max-examples", str(args.max_examples),
                "--seed", str(args.seed),
                "--workers", "1",
                "--no-color",
            ]
            if args.max_time:
                cmd += ["--max-time", str(args.max_time)]
            for h in headers:
                cmd += ["-H", h]
            print(f"== schemathesis, {label}: {' '.join(cmd[3:])}", flush=True)
            t0 = time.time()
            rc = subprocess.call(cmd, cwd=ROOT)
            print(f"== {label}: exit {rc} after {time.time() - t0:.0f} s", flush=True)
            return rc
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True)
    p.add_argument("--max-examples", type=int, default=10)
    p.add_argument("--max-time", type=int, default=0, help="seconds per run (0: no limit)")
    p.add_argument("--seed", type=int, default=23)
    a = p.parse_args()
    with tempfile.NamedTemporaryFile("w", suffix=".keys", delete=False) as keys:
        keys.write(f"admin {ADMIN_KEY}\n")
    try:
        failed = run(a, "open API", {}, [])
        # The failed-auth throttle would answer 429 to everything once schemathesis's
        # wrong-key probes (ignored_auth) have used its allowance; it has its own test.
        failed |= run(a, "with API keys", {"MOBIFACE_API_KEYS_FILE": keys.name,
                                           "MOBIFACE_AUTH_FAILURES_PER_MINUTE": "0"},
                      [f"Authorization: Bearer {ADMIN_KEY}"])
    finally:
        os.unlink(keys.name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
