#!/usr/bin/env python3
"""Proves the monitoring with a real Prometheus, not by reading strings.

1. `promtool check config` / `promtool check rules` on deploy/prometheus/.
2. Starts the real service binary on a free port with a fresh SQLite file, and a real
   Prometheus (Debian's `prometheus` package) on another free port, with a config
   generated from deploy/prometheus/prometheus.yml: same job and rule files, the
   target pointed at the test server, 1 s scrape and rule intervals, own tmp storage.
3. Drives traffic for several scrape intervals: enrolments, /embed (also concurrent,
   so batches form), /verify, /identify, and bad requests, with real LFW crops.
4. Once Prometheus has scraped all of it, evaluates every PromQL expression of every
   Grafana panel and of every alert rule through Prometheus's HTTP API. Each must
   parse; every panel query must return data with at least one finite value. Every
   rule loaded by Prometheus must be healthy.
5. Stops the service with SIGTERM (it must exit 0), checks that the MobifaceDown
   alert expression then returns data, and stops Prometheus.

Usage (repository root): .venv/bin/python tests/ops/prometheus_check.py [--bin target/debug/mobiface]
Prints one line per check and a final `N passed, M failed`; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from ports import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
LFW = Path(os.environ.get("MOBIFACE_LFW_ALIGNED", ROOT.parent / "shared/lfw/eval-aligned"))
JOB = "mobiface"
# Grafana variables and what they become here. $__rate_interval covers the whole
# traffic phase, so every rate has samples before and after requests.
RATE_WINDOW = "1m"
GRAFANA_VARS = {"job": JOB, "__rate_interval": RATE_WINDOW, "__interval": "1s", "__range": RATE_WINDOW}

results: list[tuple[bool, str]] = []


def check(ok: bool, what: str, detail: str = "") -> bool:
    results.append((bool(ok), what))
    print(("PASS " if ok else "FAIL ") + what + ("" if ok or not detail else f"\n     {detail}"), flush=True)
    return bool(ok)


def http(method: str, url: str, body: object | None = None, timeout: float = 60.0) -> tuple[int, dict | str]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method)
    if body is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_for(what: str, fn, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if fn():
                return True
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.25)
    print(f"     timed out after {timeout:.0f}s waiting for {what}")
    return False


def substitute(expr: str) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in GRAFANA_VARS:
            raise KeyError(name)
        return GRAFANA_VARS[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr)


# ------------------------------------------------------------------ static checks


def static_checks() -> list[tuple[str, str]]:
    """promtool and dashboard structure; returns (panel title, expr) pairs."""
    for args in (["check", "config", str(DEPLOY / "prometheus/prometheus.yml")],
                 ["check", "rules", str(DEPLOY / "prometheus/alerts.yml")]):
        p = subprocess.run(["promtool", *args], capture_output=True, text=True)
        check(p.returncode == 0, "promtool " + " ".join(args[:2]) + " " + Path(args[2]).name,
              (p.stdout + p.stderr).strip())

    dashboards = sorted((DEPLOY / "grafana/dashboards").glob("*.json"))
    check(len(dashboards) == 1, f"one Grafana dashboard JSON ({[d.name for d in dashboards]})")
    ds_prov = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    ds_uids = {d.get("uid") for d in ds_prov.get("datasources", [])}
    dash_prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/mobiface.yml").read_text())
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = {}
    for v in compose["services"]["grafana"]["volumes"]:
        parts = v.split(":")
        mounts[parts[1]] = parts[0]
    for prov in dash_prov.get("providers", []):
        path = prov.get("options", {}).get("path")
        check(mounts.get(path) == "./grafana/dashboards",
              f"dashboard provider path {path} is where docker-compose mounts deploy/grafana/dashboards")

    exprs: list[tuple[str, str]] = []
    for d in dashboards:
        dash = json.loads(d.read_text())
        variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
        ds_var = variables.get("datasource", {})
        check(ds_var.get("type") == "datasource" and ds_var.get("query") == "prometheus",
              "dashboard has a Prometheus data source variable")
        check(ds_var.get("current", {}).get("value") in ds_uids,
              f"dashboard's default data source is the provisioned one ({ds_uids})")
        job_var = variables.get("job", {})
        if job_var:
            q = job_var.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q or "")
            if check(m is not None, f"$job variable query is label_values(...): {q}"):
                exprs.append(("variable $job", m.group(1)))
        panels = dash.get("panels", [])
        titles = [p.get("title") for p in panels]
        check(len(set(titles)) == len(titles), "panel titles are unique")
        ids = [p.get("id") for p in panels]
        check(len(set(ids)) == len(ids), "panel ids are unique")
        for p in panels:
            targets = p.get("targets", [])
            if not check(len(targets) > 0, f"panel '{p.get('title')}' has queries"):
                continue
            for t in targets:
                check(t.get("datasource", p.get("datasource", {})).get("uid") in ("${datasource}", *ds_uids),
                      f"panel '{p.get('title')}' {t.get('refId')} uses the Prometheus data source")
                exprs.append((f"{p['title']} [{t.get('refId')}]", t["expr"]))
    required = ["mobiface_http_requests_total", "mobiface_http_request_duration_seconds_bucket",
                "mobiface_batch_size", "mobiface_queue_depth", "mobiface_queue_wait_seconds",
                "mobiface_inference_duration_seconds", "mobiface_gallery_faces", "mobiface_similarity_bucket"]
    all_exprs = " ".join(e for _, e in exprs)
    for name in required:
        check(name in all_exprs, f"dashboard shows {name}")
    return exprs


# ------------------------------------------------------------------ the live run


class Services:
    def __init__(self, binary: Path, tmp: Path):
        self.binary, self.tmp = binary, tmp
        self.app_port, self.prom_port = free_port(), free_port()
        self.app: subprocess.Popen | None = None
        self.prom: subprocess.Popen | None = None
        self.app_log = open(tmp / "service.log", "wb")
        self.prom_log = open(tmp / "prometheus.log", "wb")

    @property
    def app_url(self) -> str:
        return f"http://127.0.0.1:{self.app_port}"

    @property
    def prom_url(self) -> str:
        return f"http://127.0.0.1:{self.prom_port}"

    def start_app(self) -> bool:
        env = dict(os.environ)
        env.setdefault("ORT_DYLIB_PATH", str(ROOT / "third_party/onnxruntime/libonnxruntime.so.1.31.1"))
        env.setdefault("RUST_LOG", "info")
        # Keys from the developer's environment would lock this test out.
        for k in ("MOBIFACE_API_KEYS_FILE", "MOBIFACE_METRICS_REQUIRE_KEY", "MOBIFACE_RATE_LIMIT_PER_KEY"):
            env.pop(k, None)
        self.app = subprocess.Popen(
            [str(self.binary), "serve", "--listen", f"127.0.0.1:{self.app_port}",
             "--database", str(self.tmp / "gallery.db"), "--model", str(ROOT / "models/mobiface.onnx"),
             "--max-batch-delay-us", "2000"],
            cwd=ROOT, env=env, stdout=self.app_log, stderr=subprocess.STDOUT)
        # Stops waiting early if the process dies.
        ok = wait_for("service /readyz", lambda: self.app.poll() is not None
                      or http("GET", self.app_url + "/readyz", timeout=2)[0] == 200, 180)
        return check(ok and self.app.poll() is None, f"service ready on {self.app_url}", self.tail("service"))

    def start_prometheus(self) -> bool:
        cfg = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
        cfg.setdefault("global", {}).update({"scrape_interval": "1s", "evaluation_interval": "1s"})
        cfg["rule_files"] = [str((DEPLOY / "prometheus" / f).resolve()) for f in cfg.get("rule_files", [])]
        jobs = [j for j in cfg.get("scrape_configs", []) if j.get("job_name") == JOB]
        check(len(jobs) == 1, f"prometheus.yml has one `{JOB}` scrape job")
        for j in jobs:
            j.pop("dns_sd_configs", None)  # compose's service names: none resolve here
            j["static_configs"] = [{"targets": [f"127.0.0.1:{self.app_port}"]}]
            j["scrape_interval"] = "1s"
        cfg["scrape_configs"] = jobs
        cfg.pop("alerting", None)
        path = self.tmp / "prometheus.yml"
        path.write_text(yaml.safe_dump(cfg))
        p = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True)
        check(p.returncode == 0, "promtool check config (generated test config)", p.stdout + p.stderr)
        self.prom = subprocess.Popen(
            ["prometheus", f"--config.file={path}", f"--storage.tsdb.path={self.tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.prom_port}", "--log.level=warn"],
            cwd=self.tmp, stdout=self.prom_log, stderr=subprocess.STDOUT)
        ok = wait_for("prometheus /-/ready", lambda: http("GET", self.prom_url + "/-/ready", timeout=2)[0] == 200, 60)
        return check(ok and self.prom.poll() is None, f"prometheus ready on {self.prom_url}", self.tail("prometheus"))

    def query(self, expr: str) -> dict:
        url = self.prom_url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, body = http("GET", url, timeout=30)
        if not isinstance(body, dict):
            return {"status": "error", "error": f"HTTP {status}: {body}"}
        return body

    def tail(self, which: str, n: int = 15) -> str:
        log = self.tmp / f"{which}.log"
        try:
            return "\n     ".join(log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        for p in (self.app, self.prom):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.app_log.close()
        self.prom_log.close()


def lfw_people(n: int, per: int) -> list[tuple[str, list[str]]]:
    people = []
    for d in sorted(LFW.iterdir()):
        files = sorted(d.glob("*.jpg"))
        if len(files) >= per:
            people.append((d.name, [base64.b64encode(f.read_bytes()).decode() for f in files[:per]]))
        if len(people) == n:
            break
    return people


def drive_traffic(svc: Services, seconds: float) -> dict[str, int]:
    """Requests of every kind, spread over `seconds` so they span many scrapes."""
    base = svc.app_url
    people = lfw_people(6, 3)
    counts: dict[str, int] = {}

    def expect(route: str, want: int, status: int, body) -> None:
        counts[route] = counts.get(route, 0) + 1
        if status != want:
            raise AssertionError(f"{route}: HTTP {status}, wanted {want}: {str(body)[:300]}")

    subjects = []
    for name, imgs in people:
        status, body = http("POST", base + "/subjects", {"name": name})
        expect("POST /subjects", 201, status, body)
        sid = body["id"]
        subjects.append(sid)
        status, body = http("POST", f"{base}/subjects/{sid}/faces", {"image": imgs[0]})
        expect("POST /subjects/{id}/faces", 201, status, body)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        end = time.monotonic() + seconds
        i = 0
        # At least 3 rounds, so every series changes between scrapes even on a slow machine.
        while time.monotonic() < end or i < 3:
            name, imgs = people[i % len(people)]
            sid = subjects[i % len(subjects)]
            # Concurrent embeds so the batcher forms batches of more than one face.
            futs = [pool.submit(http, "POST", base + "/embed", {"images": [img]}) for img in imgs]
            futs.append(pool.submit(http, "POST", base + "/embed", {"images": imgs}))
            for f in futs:
                expect("POST /embed", 200, *f.result())
            expect("POST /verify", 200, *http("POST", base + "/verify", {"image1": imgs[1], "image2": imgs[2]}))
            expect("POST /verify", 200, *http("POST", base + "/verify", {"image": imgs[1], "subject_id": sid}))
            expect("POST /identify", 200, *http("POST", base + "/identify", {"image": imgs[2], "top_k": 3}))
            expect("GET /subjects/{id}", 200, *http("GET", f"{base}/subjects/{sid}"))
            # Bad requests: bytes that are no image, and an unknown subject.
            bad = base64.b64encode(b"definitely not an image").decode()
            expect("POST /embed bad", 400, *http("POST", base + "/embed", {"images": [bad]}))
            expect("GET /subjects/{id} unknown", 404,
                   *http("GET", f"{base}/subjects/00000000-0000-4000-8000-{i:012d}"))
            i += 1
            time.sleep(0.2)
    return counts


def live_checks(binary: Path, exprs: list[tuple[str, str]], tmp: Path) -> None:
    svc = Services(binary, tmp)
    try:
        if not (svc.start_app() and svc.start_prometheus()):
            return
        try:
            counts = drive_traffic(svc, seconds=8.0)
            check(True, "traffic: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
        except (AssertionError, KeyError, OSError) as e:
            check(False, "traffic got the expected answers", f"{e}\n     {svc.tail('service')}")
            return

        # Prometheus has everything once its view of /identify matches what was sent.
        n_identify = counts.get("POST /identify", 0)

        def scraped() -> bool:
            r = svc.query(f'sum(mobiface_http_requests_total{{job="{JOB}", route="/identify"}})')
            v = r.get("data", {}).get("result", [])
            return bool(v) and float(v[0]["value"][1]) >= n_identify

        check(wait_for("scrape of all traffic", scraped, 30),
              f"Prometheus scraped all {n_identify} /identify requests")
        time.sleep(3)  # a few more scrapes, so rates see the counters settle

        # Labels are route templates, never raw paths with ids in them.
        r = svc.query(f'count by (route) (mobiface_http_requests_total{{job="{JOB}"}})')
        routes = sorted(s["metric"].get("route", "") for s in r.get("data", {}).get("result", []))
        check("/subjects/{id}" in routes and "/subjects/{id}/faces" in routes
              and not any(re.search(r"[0-9a-f]{8}-", x) for x in routes),
              f"route label holds templates only: {routes}")
        r = svc.query(f'sum(mobiface_requests_rejected_total{{job="{JOB}", reason="bad_image"}})')
        v = r.get("data", {}).get("result", [])
        n_bad = counts.get("POST /embed bad", 0)
        check(bool(v) and float(v[0]["value"][1]) == n_bad,
              f"rejected{{reason=bad_image}} counts the {n_bad} bad images ({v[0]['value'][1] if v else 'none'})")

        # Every panel query parses and returns data with at least one finite value.
        for title, expr in exprs:
            try:
                q = substitute(expr)
            except KeyError as e:
                check(False, f"panel '{title}': unknown variable ${e.args[0]}", expr)
                continue
            r = svc.query(q)
            if not check(r.get("status") == "success", f"panel '{title}' parses", f"{r.get('error')}: {q}"):
                continue
            result = r["data"]["result"]
            values = [float(s["value"][1]) for s in result] if r["data"]["resultType"] == "vector" else []
            finite = [x for x in values if math.isfinite(x)]
            check(bool(finite), f"panel '{title}' returns data ({len(result)} series, e.g. {finite[:3]})", q)

        # Every alert rule: loaded, healthy, and its expression parses via the query API.
        want_rules = [r for g in yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())["groups"]
                      for r in g["rules"]]

        def evaluated() -> list:
            rules = [r for g in http("GET", svc.prom_url + "/api/v1/rules")[1]["data"]["groups"] for r in g["rules"]]
            return rules if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules) else []

        wait_for("rule evaluation", evaluated, 15)
        loaded = evaluated()
        check(len(loaded) == len(want_rules), f"Prometheus loaded all {len(want_rules)} alert rules ({len(loaded)})")
        for rule in loaded:
            check(rule.get("health") == "ok", f"alert {rule.get('name')} evaluates healthy", rule.get("lastError", ""))
            r = svc.query(rule["query"])
            check(r.get("status") == "success", f"alert {rule.get('name')} expression parses", str(r.get("error")))

        # The down alert fires: stop the service (it must exit 0 on SIGTERM), then its
        # expression must return the target.
        svc.app.send_signal(signal.SIGTERM)
        try:
            code = svc.app.wait(60)
        except subprocess.TimeoutExpired:
            code = None
        check(code == 0, f"service exits 0 on SIGTERM (exit {code})", svc.tail("service"))
        down = next((r["expr"] for r in want_rules if r.get("alert") == "MobifaceDown"), None)
        if check(down is not None, "alert MobifaceDown exists"):
            fired = wait_for("MobifaceDown expression",
                             lambda: bool(svc.query(down).get("data", {}).get("result")), 15)
            check(fired, "MobifaceDown expression returns the stopped target")
    finally:
        svc.stop()


def summary() -> int:
    failed = [w for ok, w in results if not ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    for w in failed:
        print("  failed: " + w)
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", type=Path, default=None, help="mobiface binary (default: newest of target/{release,debug})")
    ap.add_argument("--keep", action="store_true", help="keep the tmp folder (logs, tsdb)")
    args = ap.parse_args()
    for tool in ("promtool", "prometheus"):
        if shutil.which(tool) is None:
            check(False, f"`{tool}` on PATH (apt-get install -y prometheus)")
            return summary()
    exprs = static_checks()
    binary = args.bin
    if binary is None:
        found = [p for p in (ROOT / "target/release/mobiface", ROOT / "target/debug/mobiface") if p.exists()]
        binary = max(found, key=lambda p: p.stat().st_mtime) if found else None
    if not check(binary is not None and binary.exists(), f"service binary {binary} exists (cargo build)"):
        return summary()
    if not check(LFW.is_dir(), f"LFW crops at {LFW}"):
        return summary()
    tmp = Path(tempfile.mkdtemp(prefix="mobiface-prom-"))
    try:
        live_checks(binary, exprs, tmp)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return summary()


if __name__ == "__main__":
    sys.exit(main())
