"""Shared helpers of the deploy tests: the repository's paths, kubectl
kustomize renders (cached), and the options our binaries accept (parsed from
their --help)."""
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ["dev", "prod"]
# Our images -> the binary inside (the image name's last component).
BINARIES = ["gateway", "router-svc", "llm-svc", "store-svc", "summary-svc", "offline-model"]


def build_dir() -> Path:
    return Path(os.environ.get("CONVO_BUILD_DIR") or REPO / "build")


def binary_path(name: str) -> Path:
    b = build_dir()
    return b / "llm-svc" / "offline-model" if name == "offline-model" else b / name / name


def kubectl():
    """$KUBECTL, else kubectl on PATH, else None."""
    return os.environ.get("KUBECTL") or shutil.which("kubectl")


def need_kubectl() -> str:
    k = kubectl()
    if k is None:
        pytest.skip("kubectl not installed: `kubectl kustomize` is what renders deploy/k8s "
                    "(Debian 12: package kubernetes-client; see the deploy notes)")
    return k


@functools.lru_cache(maxsize=None)
def render_text(overlay: str, kubectl_bin=None) -> str:
    k = kubectl_bin or need_kubectl()
    r = subprocess.run([k, "kustomize", str(K8S / "overlays" / overlay)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"kubectl kustomize overlays/{overlay} failed:\n{r.stderr}"
    return r.stdout


def render(overlay: str) -> list:
    return [d for d in yaml.safe_load_all(render_text(overlay)) if d]


def by_kind(objs: list, kind: str) -> dict:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def pod_spec(obj: dict):
    """The pod spec of a workload object, or None."""
    if obj["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"):
        return obj["spec"]["template"]["spec"]
    return None


def image_binary(image: str):
    """convo/gateway:0.1.0 or registry.example.com/convo/gateway -> "gateway";
    None for an image not ours (postgres)."""
    name = image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]
    return name if name in BINARIES and "/convo/" in "/" + image else None


_OPT = re.compile(r"^\s+(--[a-z0-9][a-z0-9-]*)(?:\s+([A-Z]+))?(?:\s+\(env ([A-Z0-9_]+)\))?"
                  r"(?:\s+\[default: (.*)\])?\s*$")


@functools.lru_cache(maxsize=None)
def help_options(name: str):
    """{"--flag": {"arg": "TEXT"|"N"|"BOOL"|None, "env": "NAME"|None,
    "default": str|None}} from
    `<binary> --help`. The tests run after the build: a binary that is
    missing fails the test (never a skip that turns it into a green run)."""
    path = binary_path(name)
    if not path.exists():
        pytest.fail(f"{name} is not built ({path}): build the project before its tests")
    r = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=10)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{path} --help exited {r.returncode}:\n{out}"
    opts = {}
    for line in out.splitlines():
        m = _OPT.match(line)
        if m:
            default = m.group(4)
            if default is not None and default.startswith('"') and default.endswith('"'):
                default = default[1:-1]
            opts[m.group(1)] = {"arg": m.group(2), "env": m.group(3), "default": default}
    assert "--listen" in opts or name == "offline-model", f"no --listen in {path} --help:\n{out}"
    return opts
