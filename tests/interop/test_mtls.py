"""Who may call what, under mutual TLS (issue 13), from the attacker's side:
every method of every service is called by Python grpcio with the
certificate of every caller (the services', an operator's `admin`, and
names nobody allows). The expected answer comes from the table in each
service's README ("Callers (mutual TLS)"), so the documentation is what is
enforced: a caller the table does not list gets PERMISSION_DENIED naming it,
a caller it lists never does. Requests are empty, so nothing is written.

Also: every binary refuses to start with part of the TLS settings."""

import re
import subprocess
from pathlib import Path

import grpc
import pytest

from harness import REPO_ROOT, find_binary, free_port, proto_stubs
from stack import Stack

pb = proto_stubs()

SERVICES = {  # process: (proto module, service, README)
    "router-svc": ("convo.v1.router_pb2", "Router", "router-svc/README.md"),
    "llm-svc": ("convo.v1.llm_pb2", "Llm", "llm-svc/README.md"),
    "store-svc": ("convo.v1.store_pb2", "Store", "store-svc/README.md"),
    "summary-svc": ("convo.v1.summary_pb2", "Summary", "summary-svc/README.md"),
}
HEALTH = "grpc.health.v1.Health"
# Every process's own name, the operator's, a name no table lists, and a
# certificate with no DNS name at all (an IP address only).
CALLERS = ["gateway", "router-svc", "llm-svc", "store-svc", "summary-svc", "admin", "mallory",
           "(no DNS name)"]
ANY = "*"


def readme_callers(readme):
    """{method: set of callers or {"*"}} from the README's table."""
    text = (REPO_ROOT / readme).read_text()
    m = re.search(r"^## Callers \(mutual TLS\)\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"{readme} has no 'Callers (mutual TLS)' section"
    table = {}
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue
        methods = re.findall(r"`([^`]+)`", cells[0])
        who = {ANY} if cells[1] == "any certificate of the CA" else \
            {c.strip() for c in cells[1].split(",")}
        service = None
        for name in methods:
            if "/" in name:
                service, name = name.rsplit("/", 1)
            table[(service, name)] = who
    return table


@pytest.fixture(scope="module")
def stack():
    s = Stack(tls=True)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def identities(stack):
    ids = {name: stack.ca.issue(name) for name in CALLERS if name != "(no DNS name)"}
    ids["(no DNS name)"] = stack.ca.issue("nodns", dns=[])
    return ids


def call(channel, path, streaming):
    """Calls `path` with an empty request; returns the status code."""
    try:
        if streaming:
            it = channel.unary_stream(path)(b"", timeout=10)
            next(iter(it), None)
            it.cancel()
        else:
            channel.unary_unary(path)(b"", timeout=10)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.PERMISSION_DENIED:
            assert path in e.details(), e.details()
        return e.code()


def methods_of(module, service):
    desc = pb.modules[module].DESCRIPTOR.services_by_name[service]
    return {m.name: m.server_streaming for m in desc.methods}


@pytest.mark.parametrize("process", list(SERVICES))
def test_readme_table_lists_every_method(process):
    module, service, readme = SERVICES[process]
    table = readme_callers(readme)
    listed = {name for (svc, name) in table if svc is None}
    assert listed == set(methods_of(module, service)), f"{readme}: the table and the proto differ"
    assert table[(HEALTH, "Check")] == {ANY} and table[(HEALTH, "Watch")] == {ANY}


@pytest.mark.parametrize("process", list(SERVICES))
def test_each_method_answers_its_callers_only(stack, identities, process):
    module, service, readme = SERVICES[process]
    table = readme_callers(readme)
    svc = {"router-svc": stack.router, "llm-svc": stack.llm, "store-svc": stack.store,
           "summary-svc": stack.summary}[process]
    package = pb.modules[module].DESCRIPTOR.package
    calls = [(f"/{package}.{service}/{name}", streaming, table[(None, name)])
             for name, streaming in methods_of(module, service).items()]
    calls += [(f"/{HEALTH}/Check", False, {ANY}), (f"/{HEALTH}/Watch", True, {ANY})]
    wrong = []
    denied = 0
    for caller, ident in identities.items():
        with ident.channel(svc.addr) as ch:
            for path, streaming, allowed in calls:
                code = call(ch, path, streaming)
                should = ANY in allowed or caller in allowed
                if should == (code == grpc.StatusCode.PERMISSION_DENIED):
                    wrong.append(f"{caller} -> {path}: {code.name}, allowed={sorted(allowed)}")
                denied += code == grpc.StatusCode.PERMISSION_DENIED
    assert not wrong, "\n".join(wrong)
    assert denied > 0
    # Each refusal is logged with the caller's name and the method.
    lines = [l for l in svc.log_lines() if "caller" in l and "permission denied" in l["message"]]
    assert {(l["caller"], l["method"]) for l in lines} >= {
        ("mallory", path) for path, _, allowed in calls if ANY not in allowed}


@pytest.mark.parametrize("binary", ["gateway", "router-svc", "llm-svc", "store-svc",
                                    "summary-svc"])
def test_part_of_the_tls_settings_is_a_start_up_error(binary, tmp_path):
    from certs import CA
    ident = CA().issue(binary)
    for given in (["TLS_CERT_FILE"], ["TLS_KEY_FILE", "TLS_CA_FILE"]):
        env = {"PATH": "/usr/bin:/bin", **{k: v for k, v in ident.env().items() if k in given}}
        r = subprocess.run([str(find_binary(binary)), "--listen", f"127.0.0.1:{free_port()}"],
                           env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path)
        assert r.returncode == 2, f"{binary} with {given}: exit {r.returncode}\n{r.stderr}"
        missing = {"TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CA_FILE"} - set(given)
        for name in missing:
            assert name in r.stderr, r.stderr
