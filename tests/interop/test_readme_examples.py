"""The README's examples of calling a service with a client certificate
(Python grpcio and Node's @grpc/grpc-js), run as written against router-svc
over mutual TLS, with the files deploy/k8s/make-certs.sh makes. Only the
address changes (the examples dial a port-forward on 127.0.0.1:50051)."""

import os
import re
import shutil
import subprocess

import pytest

from harness import REPO_ROOT, Service, proto_stubs, tmp_root

README = REPO_ROOT / "README.md"
EXAMPLE_ADDR = "127.0.0.1:50051"


def example(name):
    text = README.read_text()
    m = re.search(rf"<!-- example: {name} -->\n```\w+\n(.*?)```", text, re.S)
    assert m, f"README.md has no example {name}"
    assert EXAMPLE_ADDR in m.group(1)
    return m.group(1)


@pytest.fixture(scope="module")
def certs():
    d = tmp_root() / "readme-certs"
    r = subprocess.run(["bash", str(REPO_ROOT / "deploy/k8s/make-certs.sh"), "convo", str(d)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return d


@pytest.fixture(scope="module")
def router(certs):
    env = {"TLS_CERT_FILE": str(certs / "router-svc.crt"),
           "TLS_KEY_FILE": str(certs / "router-svc.key"), "TLS_CA_FILE": str(certs / "ca.crt")}
    with Service("router-svc", env=env, ready="tcp") as svc:
        yield svc


def run_example(argv, certs, router, **kw):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
                       env={**os.environ, "CERTS": str(certs), **kw.pop("env", {})}, **kw)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_python_example(certs, router):
    code = example("python-mtls").replace(EXAMPLE_ADDR, router.addr)
    out = run_example(["/usr/bin/python3", "-c", code], certs, router,
                      env={"PYTHONPATH": str(proto_stubs().dir)})
    assert out.startswith("STRATEGY_ANALYTICAL"), out


def test_node_example(certs, router):
    node = shutil.which("node")
    assert node, "node is installed by deploy/install-deps.sh"
    script = tmp_root() / "readme-example.js"
    script.write_text(example("node-mtls").replace(EXAMPLE_ADDR, router.addr))
    out = run_example([node, str(script)], certs, router,
                      env={"NODE_PATH": str(REPO_ROOT / "tests" / "node_modules")})
    assert out.startswith("STRATEGY_ANALYTICAL"), out


def test_the_examples_fail_without_the_operators_certificate(certs, router, tmp_path):
    """The same Python example with the certificate of a caller the router
    does not allow (llm-svc) is refused: the example proves something."""
    for f in ("ca.crt",):
        shutil.copy(certs / f, tmp_path / f)
    shutil.copy(certs / "llm-svc.crt", tmp_path / "admin.crt")
    shutil.copy(certs / "llm-svc.key", tmp_path / "admin.key")
    code = example("python-mtls").replace(EXAMPLE_ADDR, router.addr)
    r = subprocess.run(["/usr/bin/python3", "-c", code], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "CERTS": str(tmp_path),
                                        "PYTHONPATH": str(proto_stubs().dir)})
    assert r.returncode != 0 and "PERMISSION_DENIED" in r.stderr, r.stdout + r.stderr
