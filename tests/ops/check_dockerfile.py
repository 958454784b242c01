#!/usr/bin/env python3
"""Checks the Dockerfile, .dockerignore, docker-compose.yml and k8s manifests as far
as that is possible without a Docker engine (none runs on the development machines).

Run from the repository root: `.venv/bin/python tests/ops/check_dockerfile.py`.
Prints one line per check and a final `N passed, M failed`; exits 1 on any failure.
"""

from __future__ import annotations

import fnmatch
import os
import json
import re
import shlex
import sys
from pathlib import Path

import yaml

ROOT = Path(os.environ.get("MOBIFACE_CHECK_ROOT") or Path(__file__).resolve().parents[2])
results: list[tuple[bool, str]] = []


def check(ok: bool, what: str) -> bool:
    results.append((bool(ok), what))
    print(("PASS " if ok else "FAIL ") + what)
    return bool(ok)


# ---------------------------------------------------------------- parsing


def makefile_var(name: str) -> str:
    text = (ROOT / "Makefile").read_text()
    m = re.search(rf"^{name}\s*:?=\s*(.+)$", text, re.M)
    if not m:
        raise SystemExit(f"Makefile has no {name}")
    return m.group(1).strip()


def cargo_bin_name() -> str:
    text = (ROOT / "Cargo.toml").read_text()
    m = re.search(r"\[\[bin\]\]\s*\nname\s*=\s*\"([^\"]+)\"", text)
    if m:
        return m.group(1)
    m = re.search(r"\[package\]\s*\nname\s*=\s*\"([^\"]+)\"", text)
    return m.group(1) if m else ""


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


class Stage:
    def __init__(self, base: str, name: str, parent: "Stage | None"):
        self.base, self.name, self.parent = base, name, parent
        self.args: dict[str, str] = {}
        self.workdir = parent.workdir if parent else "/"
        self.runs: list[str] = []
        self.copies: list[dict] = []
        self.env: dict[str, str] = {}
        self.entrypoint = self.cmd = self.user = self.healthcheck = None
        self.expose: list[str] = []
        self.volumes: list[str] = []
        self.produced: set[str] = set(parent.produced) if parent else set()
        self.context_root: str | None = parent.context_root if parent else None

    def all_runs(self) -> list[str]:
        return (self.parent.all_runs() if self.parent else []) + self.runs


def subst(s: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), s)


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    bin_name = cargo_bin_name()
    ort_lib = makefile_var("ORT_LIB")
    for instr, rest in dockerfile_instructions(path.read_text()):
        st = stages[-1] if stages else None
        if instr == "ARG":
            name, _, default = rest.partition("=")
            if st is None:
                global_args[name] = default
            else:
                # A bare ARG re-imports the global default into the stage.
                st.args[name] = default if default else global_args.get(name, "")
        elif instr == "FROM":
            parts = rest.split()
            base = subst(parts[0], global_args)
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(stages))
            parent = next((s for s in stages if s.name == base), None)
            stages.append(Stage(base, name, parent))
        elif st is None:
            continue
        elif instr == "WORKDIR":
            st.workdir = subst(rest, st.args)
        elif instr == "RUN":
            cmd = subst(rest, st.args)
            st.runs.append(cmd)
            # What RUN steps visibly create, so COPY --from can be checked against it.
            if re.search(r"\bcargo build\b[^&;]*--release", cmd):
                st.produced.add(f"{st.workdir.rstrip('/')}/target/release/{bin_name}")
            if re.search(r"\bmake\b[^&;]*\bort\b", cmd):
                lib = ort_lib.replace("$(ORT_DIR)", makefile_var("ORT_DIR")).replace(
                    "$(ORT_VERSION)", makefile_var("ORT_VERSION"))
                st.produced.add(f"{st.workdir.rstrip('/')}/{lib}")
            if re.search(r"\bmake\b[^&;]*\bdetector\b", cmd):
                folder = makefile_var("DETECTOR_DIR")
                for f in (makefile_var("DETECTOR").replace("$(DETECTOR_DIR)", folder), f"{folder}/LICENSE.txt"):
                    st.produced.add(f"{st.workdir.rstrip('/')}/{f}")
            for m in re.finditer(r"mkdir -p ([^&;]+)", cmd):
                for d in m.group(1).split():
                    st.produced.add(d.rstrip("/") + "/")
        elif instr in ("COPY", "ADD"):
            toks = shlex.split(subst(rest, st.args))
            flags = {t.split("=", 1)[0]: t.split("=", 1)[1] for t in toks if t.startswith("--") and "=" in t}
            paths = [t for t in toks if not t.startswith("--")]
            st.copies.append({"instr": instr, "from": flags.get("--from"), "srcs": paths[:-1], "dest": paths[-1]})
            if "--from" not in flags and paths[:-1] == ["."]:
                st.context_root = st.workdir.rstrip("/") or "/"
        elif instr == "ENV":
            for tok in shlex.split(subst(rest, st.args)):
                k, _, v = tok.partition("=")
                st.env[k] = subst(v, st.args)
        elif instr == "ENTRYPOINT":
            st.entrypoint = json.loads(rest)
        elif instr == "CMD":
            st.cmd = json.loads(rest)
        elif instr == "USER":
            st.user = rest
        elif instr == "HEALTHCHECK":
            st.healthcheck = rest
        elif instr == "EXPOSE":
            st.expose += rest.split()
        elif instr == "VOLUME":
            st.volumes += json.loads(rest) if rest.startswith("[") else rest.split()
    return global_args, stages


def dockerignore_patterns() -> list[str]:
    p = ROOT / ".dockerignore"
    if not p.exists():
        return []
    return [l.strip() for l in p.read_text().splitlines() if l.strip() and not l.startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    rel = rel.strip("/")
    parts = rel.split("/")
    hit = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        # A pattern matches the path or any folder above it.
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.replace("**/", "")) for p in prefixes):
            hit = not neg
    return hit


# ---------------------------------------------------------------- checks


def main() -> int:
    dockerfile = ROOT / "Dockerfile"
    if not check(dockerfile.exists(), "Dockerfile exists"):
        return summary()
    global_args, stages = parse_dockerfile(dockerfile)
    by_name = {s.name: s for s in stages}
    patterns = dockerignore_patterns()
    bin_name = cargo_bin_name()
    ort_version = makefile_var("ORT_VERSION")

    check(global_args.get("ORT_VERSION") == ort_version,
          f"Dockerfile ARG ORT_VERSION={global_args.get('ORT_VERSION')!r} equals the Makefile's ORT_VERSION={ort_version!r}")
    check(re.search(r"^\$\(ORT_LIB\):", (ROOT / "Makefile").read_text(), re.M) is not None
          and f"onnxruntime==$(ORT_VERSION)" in (ROOT / "Makefile").read_text(),
          "Makefile's `ort` target fetches the onnxruntime wheel at ORT_VERSION")

    build = by_name.get("build")
    if check(build is not None, "a stage named `build` exists"):
        check(build.base.startswith("rust:") and "bookworm" in build.base,
              f"build stage uses the Rust toolchain on bookworm ({build.base})")
        runs = build.all_runs()
        check(any(re.search(r"\bmake ort\b", r) for r in runs), "build stage runs `make ort` like the Makefile")
        check(any(re.search(r"\bmake\b[^&;]*\bdetector\b", r) for r in runs),
              "build stage runs `make detector` like the Makefile")
        check(any(re.search(r"\bcargo build --release\b", r) for r in runs), "build stage runs `cargo build --release`")

    # Every COPY from the build context exists and is not excluded by .dockerignore.
    needed = ["Cargo.toml", "Cargo.lock", "Makefile", "src/main.rs", "src/lib.rs", "migrations",
              "models/mobiface.onnx"]
    for st in stages:
        for c in st.copies:
            if c["from"] is None:
                for src in c["srcs"]:
                    check((ROOT / src).exists(), f"[{st.name}] COPY source `{src}` exists in the repository")
                    if src != ".":
                        check(not ignored(src, patterns), f"[{st.name}] COPY source `{src}` is not in .dockerignore")
    for rel in needed:
        check((ROOT / rel).exists(), f"build input `{rel}` exists")
        check(not ignored(rel, patterns), f"build input `{rel}` is not excluded by .dockerignore")
    for rel in ["target", ".venv", ".git", "third_party", "data"]:
        check(ignored(rel, patterns), f".dockerignore keeps `{rel}` out of the build context")

    # Every COPY --from source is produced by that stage (or copied in from the context).
    for st in stages:
        for c in st.copies:
            if c["from"] is None:
                continue
            src_stage = by_name.get(c["from"])
            if not check(src_stage is not None, f"[{st.name}] COPY --from={c['from']} names a stage"):
                continue
            for src in c["srcs"]:
                produced = src in src_stage.produced or any(
                    p.endswith("/") and src.rstrip("/") + "/" == p for p in src_stage.produced)
                from_context = False
                root = src_stage.context_root
                if root and src.startswith(root.rstrip("/") + "/"):
                    rel = src[len(root.rstrip("/")) + 1:]
                    from_context = (ROOT / rel).exists() and not ignored(rel, patterns)
                check(produced or from_context,
                      f"[{st.name}] COPY --from={c['from']} `{src}` is built by that stage or is a repository file in its context")

    runtimes = [s for s in stages if s.name.startswith("runtime")]
    check({"runtime-cpu", "runtime-cuda"} <= {s.name for s in runtimes}, "stages runtime-cpu and runtime-cuda exist")
    check(stages and stages[-1].name == "runtime-cpu", "runtime-cpu is the last stage (the default target)")
    for st in runtimes:
        n = st.name
        ep = st.entrypoint or []
        check(bool(ep) and Path(ep[0]).name == bin_name,
              f"[{n}] ENTRYPOINT {ep} runs the built binary `{bin_name}`")
        check(any(c["dest"] == (ep[0] if ep else None) and any(s.endswith(f"target/release/{bin_name}") for s in c["srcs"])
                  for c in st.copies),
              f"[{n}] the ENTRYPOINT path is COPY'd from target/release/{bin_name}")
        check((ep + (st.cmd or []))[1:2] == ["serve"], f"[{n}] the default command is `serve`")
        check(st.user is not None and st.user.split(":")[0] not in ("0", "root"), f"[{n}] runs as a non-root USER ({st.user})")
        check("8080" in st.expose, f"[{n}] EXPOSE 8080")
        check(st.env.get("MOBIFACE_LISTEN") == "0.0.0.0:8080", f"[{n}] ENV MOBIFACE_LISTEN=0.0.0.0:8080")
        check(bool(st.healthcheck) and "/healthz" in st.healthcheck, f"[{n}] HEALTHCHECK probes /healthz")
        tool = (shlex.split(st.healthcheck.split("CMD", 1)[1])[0] if st.healthcheck and "CMD" in st.healthcheck else "")
        check(tool == "curl" and any(re.search(r"apt-get install[^&]*\bcurl\b", r) for r in st.runs),
              f"[{n}] the HEALTHCHECK tool ({tool}) is installed in the image")
        det = st.env.get("MOBIFACE_DETECTOR", "")
        check(bool(det) and any(c["dest"].rstrip("/") == str(Path(det).parent)
                                and any(Path(x).name == Path(det).name for x in c["srcs"])
                                for c in st.copies),
              f"[{n}] MOBIFACE_DETECTOR ({det}) is COPY'd into the image")
        data = st.env.get("MOBIFACE_DATABASE", "")
        check(any(data.startswith(v.rstrip("/") + "/") for v in st.volumes),
              f"[{n}] MOBIFACE_DATABASE ({data}) lies on a VOLUME {st.volumes}")
        check(any(re.search(r"chown [^&]*mobiface[^&]*/data", r) for r in st.runs),
              f"[{n}] the data folder belongs to the non-root user")
        dests = [c["dest"] for c in st.copies]
        for var in ("ORT_DYLIB_PATH", "MOBIFACE_MODEL"):
            val = st.env.get(var, "")
            check(any(val == d or (d.endswith("/") and val.startswith(d)) for d in dests),
                  f"[{n}] {var}={val} is a path COPY'd into the image")
        check(f"libonnxruntime.so.{ort_version}" in st.env.get("ORT_DYLIB_PATH", ""),
              f"[{n}] ORT_DYLIB_PATH names libonnxruntime.so.{ort_version}")

    cuda = by_name.get("runtime-cuda")
    if cuda is not None:
        check(cuda.base.startswith("nvidia/cuda:13"), f"runtime-cuda uses an NVIDIA CUDA 13 runtime base ({cuda.base})")
        check(cuda.env.get("MOBIFACE_PROVIDER") == "cuda", "runtime-cuda selects the cuda provider")
        bc = by_name.get("build-cuda")
        runs = bc.all_runs() if bc else []
        check(any("--features cuda" in r for r in runs), "build-cuda builds with --features cuda")
        check(any(f"onnxruntime-gpu=={ort_version}" in r for r in runs),
              f"build-cuda fetches the onnxruntime-gpu=={ort_version} wheel")

    # docker-compose: builds the CPU target of this Dockerfile, mounts a gallery volume.
    compose = yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())
    svc = compose.get("services", {}).get("mobiface", {})
    target = svc.get("build", {}).get("target")
    check(target in by_name, f"docker-compose builds an existing Dockerfile target ({target})")
    check((ROOT / "deploy" / svc.get("build", {}).get("context", "") / svc.get("build", {}).get("dockerfile", "Dockerfile")).exists(),
          "docker-compose build context holds the Dockerfile")
    vols = [v.split(":") for v in svc.get("volumes", [])]
    check(any(len(v) >= 2 and v[0] in compose.get("volumes", {}) and data.startswith(v[1]) for v in vols
              for data in [svc.get("environment", {}).get("MOBIFACE_DATABASE", "")]),
          "docker-compose puts the gallery database on a named volume")
    for name in ("prometheus", "grafana"):
        s = compose.get("services", {}).get(name, {})
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("./"):
                check((ROOT / "deploy" / src).exists(), f"docker-compose {name} mount `{src}` exists")

    # k8s: probes, non-root, read-only root with a writable data volume, one replica.
    docs = {}
    for f in sorted((ROOT / "deploy/k8s").glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            if d:
                docs[d["kind"]] = d
    for kind in ("Deployment", "Service", "PersistentVolumeClaim", "HorizontalPodAutoscaler", "ServiceMonitor"):
        check(kind in docs, f"k8s manifests include a {kind}")
    dep = docs.get("Deployment", {})
    pod = dep.get("spec", {}).get("template", {}).get("spec", {})
    ctr = (pod.get("containers") or [{}])[0]
    check(ctr.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/readyz", "k8s readiness probe is /readyz")
    check(ctr.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz", "k8s liveness probe is /healthz")
    check(bool(ctr.get("resources", {}).get("requests")) and bool(ctr.get("resources", {}).get("limits")),
          "k8s container has resource requests and limits")
    check(pod.get("securityContext", {}).get("runAsNonRoot") is True, "k8s pod runs as non-root")
    check(ctr.get("securityContext", {}).get("readOnlyRootFilesystem") is True, "k8s root filesystem is read-only")
    env = {e["name"]: e.get("value") for e in ctr.get("env", [])}
    mounts = {m["mountPath"]: m["name"] for m in ctr.get("volumeMounts", [])}
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    db = env.get("MOBIFACE_DATABASE", "")
    data_mount = next((p for p in mounts if db.startswith(p.rstrip("/") + "/")), None)
    check(data_mount is not None and "persistentVolumeClaim" in vols.get(mounts[data_mount], {})
          and vols[mounts[data_mount]]["persistentVolumeClaim"]["claimName"] == docs.get("PersistentVolumeClaim", {}).get("metadata", {}).get("name"),
          "k8s gallery database lies on the PersistentVolumeClaim")
    check(dep.get("spec", {}).get("replicas") == 1 and docs.get("HorizontalPodAutoscaler", {}).get("spec", {}).get("maxReplicas") == 1,
          "k8s runs one replica (single SQLite writer) and the HPA cannot scale out")
    check(dep.get("spec", {}).get("strategy", {}).get("type") == "Recreate",
          "k8s rollout stops the old pod before the new one opens the gallery")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    drain = int(env.get("MOBIFACE_SHUTDOWN_DRAIN_S", "5"))
    check(drain + int(env.get("MOBIFACE_SHUTDOWN_TIMEOUT_S", "20")) < grace,
          "k8s grace period exceeds the service's drain period plus shutdown timeout")
    probe = ctr.get("readinessProbe", {})
    check(probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3) <= drain,
          "k8s readiness probe sees the drain period's 503 before the listener closes")

    # k8s PostgreSQL overlay: builds on the base, takes the URL from a secret, scales out.
    overlay = yaml.safe_load((ROOT / "deploy/k8s/postgres/kustomization.yaml").read_text())
    check(overlay.get("resources") == [".."], "k8s postgres overlay builds on the SQLite base")
    ops = {}
    for p in overlay.get("patches", []):
        body = yaml.safe_load(p["patch"])
        ops[p["target"]["kind"]] = body if isinstance(body, list) else body
    hpa_ops = {o["path"]: o.get("value") for o in ops.get("HorizontalPodAutoscaler", [])}
    check((hpa_ops.get("/spec/maxReplicas") or 1) > 1, "k8s postgres overlay lets the HPA scale out")
    dep_ops = {o["path"]: o for o in ops.get("Deployment", [])}
    env1 = (dep_ops.get("/spec/template/spec/containers/0/env/1") or {}).get("value", {})
    base_env = ctr.get("env", [])
    check(len(base_env) > 1 and base_env[1]["name"] == "MOBIFACE_DATABASE"
          and env1.get("name") == "MOBIFACE_DATABASE" and "secretKeyRef" in env1.get("valueFrom", {}),
          "k8s postgres overlay replaces env[1] (MOBIFACE_DATABASE) with the URL from a secret")
    check(ctr.get("volumeMounts", [{}])[0].get("name") == "data" and pod.get("volumes", [{}])[0].get("name") == "data",
          "k8s postgres overlay removes the gallery volume it addresses by position")
    check(ops.get("PersistentVolumeClaim", {}).get("$patch") == "delete", "k8s postgres overlay drops the PVC")
    return summary()


def summary() -> int:
    failed = [w for ok, w in results if not ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    for w in failed:
        print("  failed: " + w)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
