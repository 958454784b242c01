#!/usr/bin/env python3
"""Issue #23's hostile-client probes against a server binary, as figures.

Starts the given `mobiface` binary once per case (so peak RSS is per case), runs the case,
prints one JSON line per case. Used for the before/after figures in README ("Limits");
the regression tests are tests/api/hardening.rs. Standard library only.

    python3 tests/ops/hostile_probe.py --bin target/debug/mobiface [--cases decode64,auth]
"""

import argparse
import base64
import concurrent.futures as cf
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib

from ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Server:
    def __init__(self, binary, env=None, ulimit_n=None):
        self.dir = tempfile.TemporaryDirectory()
        self.port = free_port()
        e = dict(os.environ)
        for k in list(e):
            if k.startswith("MOBIFACE_"):
                del e[k]
        e.update(
            MOBIFACE_LISTEN=f"127.0.0.1:{self.port}",
            MOBIFACE_DATABASE=os.path.join(self.dir.name, "gallery.db"),
            MOBIFACE_MODEL=os.path.join(ROOT, "models/mobiface.onnx"),
            ORT_DYLIB_PATH=os.path.join(ROOT, "third_party/onnxruntime/libonnxruntime.so.1.31.1"),
        )
        e.update(env or {})
        self.log = open(os.path.join(self.dir.name, "log"), "wb")
        pre = None
        if ulimit_n:
            import resource

            def pre():
                resource.setrlimit(resource.RLIMIT_NOFILE, (ulimit_n, ulimit_n))

        self.proc = subprocess.Popen([binary, "serve"], env=e, cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT, preexec_fn=pre)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("server not ready")

    def conn(self, timeout=60):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, timeout=60):
        c = self.conn(timeout)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, r.read(), dict(r.getheaders())
        finally:
            c.close()

    def get(self, path):
        return self.request("GET", path, timeout=5)

    def status_kb(self, field):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return 0

    def log_text(self):
        self.log.flush()
        with open(os.path.join(self.dir.name, "log"), "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.dir.cleanup()


def png_zeros(side):
    """An RGB PNG of side x side black pixels: ~side*side/1000 bytes, decodes to 3*side^2."""
    raw = (b"\x00" + b"\x00" * (3 * side)) * side
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def code_of(body):
    try:
        return json.loads(body)["error"]["code"]
    except Exception:
        return None


def tally(results):
    out = {}
    for status, body in results:
        key = f"{status} {code_of(body) or ''}".strip()
        out[key] = out.get(key, 0) + 1
    return out


def concurrent_posts(server, path, bodies, ctype="application/json"):
    def one(b):
        try:
            s, body, _ = server.request("POST", path, body=b, headers={"Content-Type": ctype}, timeout=120)
            return s, body
        except OSError as e:
            return "conn-error", str(e).encode()
    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, bodies))


def case_decode(binary, n):
    img = base64.b64encode(png_zeros(4729)).decode()
    body = json.dumps({"images": [img]}).encode()
    s = Server(binary)
    try:
        base = s.status_kb("VmRSS")
        res = concurrent_posts(s, "/embed", [body] * n)
        return {"case": f"decode{n}", "png_bytes": len(img) * 3 // 4, "decoded_bytes": 4729 * 4729 * 3,
                "rss_start_mb": base // 1024, "peak_rss_mb": s.status_kb("VmHWM") // 1024,
                "answers": tally(res)}
    finally:
        s.stop()


def case_json(binary, which, n):
    size = 16_000_000
    if which == "images":
        prefix, item, suffix = b'{"images":[', b"0,", b"0]}"
    else:
        prefix, item, suffix = b'{"images":[{"data":"aGk=","landmarks":[', b"[],", b"[]]}]}"
    count = (size - len(prefix) - len(suffix)) // len(item)
    body = prefix + item * count + suffix
    s = Server(binary)
    try:
        base = s.status_kb("VmRSS")
        res = concurrent_posts(s, "/embed", [body] * n)
        return {"case": f"json-{which}x{n}", "body_bytes": len(body), "rss_start_mb": base // 1024,
                "peak_rss_mb": s.status_kb("VmHWM") // 1024,
                "peak_rise_mb": (s.status_kb("VmHWM") - base) // 1024, "answers": tally(res)}
    finally:
        s.stop()


def case_slowloris(binary):
    # A small descriptor limit stands in for the 1,100 connections under 1024.
    s = Server(binary, ulimit_n=256)
    socks = []
    try:
        for _ in range(300):
            try:
                k = socket.create_connection(("127.0.0.1", s.port), timeout=2)
                k.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-")
                socks.append(k)
            except OSError:
                break
        t0 = time.time()
        healthz = None
        while time.time() - t0 < 20:
            try:
                healthz = s.get("/healthz")[0]
                break
            except OSError:
                time.sleep(0.5)
        healthz_s = round(time.time() - t0, 1)
        closed = 0
        for k in socks:
            k.settimeout(max(0.1, 25 - (time.time() - t0)))
            try:
                if k.recv(1024) == b"":
                    closed += 1
                else:
                    closed += 1
            except OSError:
                pass
        log = s.log_text()
        return {"case": "slowloris", "stalled_connections": len(socks), "healthz_status": healthz,
                "healthz_after_s": healthz_s, "stalled_closed_by_server_within_25s": closed,
                "accept_error_lines": log.count("accept error") + log.count("accept failed"),
                "connection_limit_lines": log.count("connection limit reached")}
    finally:
        for k in socks:
            k.close()
        s.stop()


def raw_response(port, data, timeout):
    """Sends raw bytes, returns (seconds until the first response byte or close, first line)."""
    k = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    t0 = time.time()
    k.sendall(data)
    try:
        got = k.recv(4096)
        return round(time.time() - t0, 2), got.split(b"\r\n")[0].decode(errors="replace") or "closed"
    except socket.timeout:
        return None, "no answer"
    finally:
        k.close()


def case_connections(binary):
    s = Server(binary)
    try:
        secs, line = raw_response(s.port, b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: 999999999\r\n\r\n", 40)
        k = socket.create_connection(("127.0.0.1", s.port), timeout=70)
        k.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        k.recv(4096)
        t0 = time.time()
        try:
            idle = "closed" if k.recv(1) == b"" else "data"
        except socket.timeout:
            idle = "open"
        idle_s = round(time.time() - t0, 1)
        k.close()
        return {"case": "connections", "declared_1GB_body": {"answer_after_s": secs, "status_line": line},
                "idle_keepalive": {"state": idle, "after_s": idle_s}}
    finally:
        s.stop()


def case_drain(binary):
    s = Server(binary, env={"MOBIFACE_SHUTDOWN_DRAIN_S": "3", "MOBIFACE_SHUTDOWN_TIMEOUT_S": "2"})
    try:
        slow = socket.create_connection(("127.0.0.1", s.port), timeout=30)
        slow.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"images\"")
        time.sleep(0.5)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        try:
            ready = s.get("/readyz")[0]
        except OSError as e:
            ready = f"refused ({e.__class__.__name__})"
        try:
            got = slow.recv(4096)
            inflight = got.split(b"\r\n")[0].decode() if got else "closed without a response"
            inflight_code = code_of(got.split(b"\r\n\r\n", 1)[-1]) if got else None
        except OSError as e:
            inflight, inflight_code = f"error {e}", None
        s.proc.wait(timeout=60)
        return {"case": "drain", "readyz_0.5s_after_sigterm": ready, "in_flight_at_deadline": inflight,
                "in_flight_code": inflight_code, "exit": s.proc.returncode}
    finally:
        s.stop()


def case_auth(binary):
    keys = tempfile.NamedTemporaryFile("w", delete=False)
    keys.write("admin probe-admin-key-0123456789\n")
    keys.close()
    s = Server(binary, env={"MOBIFACE_API_KEYS_FILE": keys.name})
    try:
        counts = {}
        for _ in range(300):
            st, _, h = s.request("GET", "/subjects", headers={"X-API-Key": "wrong-key-0123456789abc"})
            counts[st] = counts.get(st, 0) + 1
        st, _, h = s.request("GET", "/subjects", headers={"X-API-Key": "probe-admin-key-0123456789"})
        return {"case": "auth", "wrong_key_answers": counts, "right_key_after": st,
                "retry_after": h.get("retry-after")}
    finally:
        s.stop()
        os.unlink(keys.name)


def case_minor(binary):
    s = Server(binary)
    try:
        crop = os.path.join(ROOT, "../shared/lfw/eval-aligned")
        person = sorted(os.listdir(crop))[0]
        jpg = open(os.path.join(crop, person, sorted(os.listdir(os.path.join(crop, person)))[0]), "rb").read()
        cut = jpg[: len(jpg) // 2] + b"\xff\xd9"
        body = json.dumps({"images": [base64.b64encode(cut).decode()]}).encode()
        t = s.request("POST", "/embed", body=body, headers={"Content-Type": "application/json"})
        foo = s.request("POST", "/embed", body=json.dumps({"images": [base64.b64encode(jpg).decode()]}).encode(),
                        headers={"Content-Type": "application/jsonfoo"})
        m = s.request("DELETE", "/embed")
        return {"case": "minor", "truncated_jpeg_with_eoi": [t[0], code_of(t[1])],
                "application/jsonfoo": [foo[0], code_of(foo[1])],
                "405_body": m[1].decode(errors="replace")[:80], "405_status": m[0]}
    finally:
        s.stop()


CASES = {
    "decode8": lambda b: case_decode(b, 8),
    "decode32": lambda b: case_decode(b, 32),
    "decode64": lambda b: case_decode(b, 64),
    "json-images": lambda b: case_json(b, "images", 8),
    "json-landmarks": lambda b: case_json(b, "landmarks", 1),
    "slowloris": case_slowloris,
    "connections": case_connections,
    "drain": case_drain,
    "auth": case_auth,
    "minor": case_minor,
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True)
    p.add_argument("--cases", default=",".join(CASES))
    a = p.parse_args()
    for name in a.cases.split(","):
        print(json.dumps(CASES[name](os.path.abspath(a.bin))), flush=True)


if __name__ == "__main__":
    sys.exit(main())
