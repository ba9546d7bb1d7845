"""Peer addresses of the runtime's client (runtime/cli.c, cli_channel_create):
one HOST:PORT, a list of replicas IP:PORT,IP:PORT, or a gRPC target URI,
and --grpc-round-robin. The replicas are Python grpcio servers (and our
testsvc-server where one must die by SIGKILL), each on its own loopback
address and all on one port, as pods of a Service; the client is
testsvc-client. Under mutual TLS (certificates made with the openssl CLI,
certs.py) each replica of a list is checked against the service's name."""

import concurrent.futures
import importlib
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import grpc
import pytest

from certs import CA
from harness import Service, build_dir, free_port
from stack import shared_port

HERE = Path(__file__).resolve().parent
CLIENT = build_dir() / "tests" / "runtime" / "testsvc-client"
SERVER = build_dir() / "tests" / "runtime" / "testsvc-server"
HOSTS = ("127.0.0.1", "127.0.0.2")


@pytest.fixture(scope="module")
def pb():
    out = Path(tempfile.mkdtemp(prefix="testsvc-stubs-"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{HERE}", f"--python_out={out}",
                    f"--grpc_python_out={out}", "testsvc.proto"], check=True)
    sys.path.insert(0, str(out))
    return importlib.import_module("testsvc_pb2"), importlib.import_module("testsvc_pb2_grpc")


def replica(pb, host, port, name, ident=None, calls=None):
    """A grpcio Test server at host:port whose Echo answers `name`; with
    `ident` (certs.py) it serves mutual TLS with that certificate, and each
    call it answers is appended to `calls`."""
    msgs, rpc = pb

    class Servicer(rpc.TestServicer):
        def Echo(self, req, context):
            if calls is not None:
                calls.append(name)
            return msgs.EchoReply(text=name)

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(4))
    rpc.add_TestServicer_to_server(Servicer(), server)
    bound = (server.add_secure_port(f"{host}:{port}", ident.server_credentials()) if ident
             else server.add_insecure_port(f"{host}:{port}"))
    assert bound == port
    server.start()
    return server


@pytest.fixture
def two(pb):
    port = shared_port(HOSTS)
    servers = [replica(pb, h, port, f"replica{i}") for i, h in enumerate(HOSTS)]
    yield port
    for s in servers:
        s.stop(0)


def client(target, *extra, calls=20, timeout=60):
    r = subprocess.run([str(CLIENT), "--target", target, "--calls", str(calls), "--timeout-ms",
                        "5000", *extra], capture_output=True, text=True, timeout=timeout)
    return r.returncode, [line.split(" ", 1) for line in r.stdout.splitlines()], r.stderr


def test_a_list_with_round_robin_spreads_calls_over_every_replica(two):
    code, lines, err = client(f"127.0.0.1:{two},127.0.0.2:{two}", "--grpc-round-robin")
    assert code == 0, err
    answers = [text for status, text in lines]
    assert {status for status, _ in lines} == {"OK"}
    # Round robin once both are connected: no replica gets two calls in a
    # row after the first few.
    assert answers.count("replica0") >= 5 and answers.count("replica1") >= 5, answers
    assert all(a != b for a, b in zip(answers[-10:], answers[-9:])), answers


def test_a_list_without_round_robin_is_a_failover_list(two):
    code, lines, err = client(f"127.0.0.2:{two},127.0.0.1:{two}")
    assert code == 0, err
    assert {text for _, text in lines} == {"replica1"}  # the first that answers takes all


@pytest.mark.parametrize("rr", [True, False])
def test_a_dead_address_in_the_list_is_skipped(pb, rr):
    port = shared_port(HOSTS)
    live = replica(pb, "127.0.0.1", port, "live")
    try:
        # 127.0.0.2:port has nothing listening: connections to it are
        # refused; every call still succeeds, on the other.
        code, lines, err = client(f"127.0.0.2:{port},127.0.0.1:{port}",
                                  *(["--grpc-round-robin"] if rr else []))
        assert code == 0, err
        assert {text for _, text in lines} == {"live"}
    finally:
        live.stop(0)


def test_a_killed_replica_is_skipped_and_called_again_once_it_is_back(pb):
    port = shared_port(HOSTS)
    other = replica(pb, "127.0.0.1", port, "python")
    ours = Service("testsvc-server", binary=SERVER, host="127.0.0.2", port=port)
    proc = subprocess.Popen([str(CLIENT), "--target", f"127.0.0.1:{port},127.0.0.2:{port}",
                             "--grpc-round-robin", "--calls", "100000", "--interval-ms", "10",
                             "--timeout-ms", "5000", "--text", "ours"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    lock = threading.Condition()

    def read():
        for line in proc.stdout:
            with lock:
                seen.append(line.split())
                lock.notify_all()

    threading.Thread(target=read, daemon=True).start()

    def wait_until(pred, what):
        """Waits until pred(lines seen) holds; returns how many lines that was."""
        with lock:
            assert lock.wait_for(lambda: pred(seen) or proc.poll() is not None, timeout=60), what
            assert proc.poll() is None, proc.stderr.read()
            return len(seen)

    try:
        wait_until(lambda s: sum(t == "ours" for _, t in s) >= 10, "both replicas answer")
        ours.kill()
        down = wait_until(lambda s: True, "")
        wait_until(lambda s: len(s) >= down + 50, "calls go on while one replica is dead")
        ours.start()
        back = wait_until(lambda s: True, "")
        wait_until(lambda s: any(t == "ours" for _, t in s[back:]),
                   "the restarted replica is called again")

    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        other.stop(0)
        ours.stop()
    with lock:
        assert {status for status, _ in seen} == {"OK"}, [l for l in seen if l[0] != "OK"]


@pytest.mark.parametrize("retry", [True, False])
def test_a_call_whose_replica_dies_is_sent_again_to_the_other_only_when_safe(pb, retry):
    """Echo held by our testsvc-server (hold_until is never reached), which
    then dies by SIGKILL: named safe to retry, the call is sent again and
    answered by the other replica; not named, it fails UNAVAILABLE."""
    port = shared_port(HOSTS)
    ours = Service("testsvc-server", binary=SERVER, host="127.0.0.2", port=port)
    other = replica(pb, "127.0.0.1", port, "python")
    # No round robin: the first address (ours) takes the call.
    proc = subprocess.Popen([str(CLIENT), "--target", f"127.0.0.2:{port},127.0.0.1:{port}",
                             "--calls", "1", "--hold-until", "2", "--timeout-ms", "20000",
                             *(["--retry"] if retry else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Held, not answered: the client is still waiting.
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1)
        ours.kill()
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        other.stop(0)
        ours.stop()
    if retry:
        assert (proc.returncode, out.split()) == (0, ["OK", "python"]), err
    else:
        assert proc.returncode == 1 and out.split()[0] == "UNAVAILABLE", out + err


@pytest.mark.parametrize("target,words", [
    ("127.0.0.1:5,store-svc:5", "IP addresses only"),
    ("127.0.0.1:5,,127.0.0.2:5", "empty address"),
    ("127.0.0.1:5,", "empty address"),
    (",127.0.0.1:5", "empty address"),
    ("127.0.0.1:5, 127.0.0.1:5", "listed twice"),
    ("127.0.0.1:5,[::1]:5", "not both"),
    ("127.0.0.1:0", "no port"),
    ("127.0.0.1:65536", "no port"),
    ("127.0.0.1", "not HOST:PORT"),
    ("127.0.0.1:5x", "no port"),
    ("::1:5", "not HOST:PORT"),
    ("[::1:5", "[ADDRESS]:PORT"),
    ("[nope]:5", "not a valid IPv6"),
    ("store svc:5", "not HOST:PORT"),
    ("", "empty address"),
])
def test_a_bad_address_is_refused_at_start_naming_what_is_wrong(target, words):
    code, lines, err = client(target, calls=1)
    assert code == 2, (target, err)
    assert "--target" in err and words in err, (target, err)
    assert lines == []


@pytest.mark.parametrize("target", [
    "localhost:{p}", "127.0.0.1:{p}", "127.0.0.1:{p}, 127.0.0.2:{p}", "[::1]:{p},[::2]:{p}",
    "dns:///localhost:{p}", "ipv4:127.0.0.1:{p},127.0.0.2:{p}",
])
def test_every_documented_form_is_taken(target):
    # --calls 0: the address is taken (exit 0), nothing is called.
    code, lines, err = client(target.format(p=free_port()), calls=0)
    assert code == 0, (target, err)


# ------------------------------------------------------------ with mutual TLS
# A list's replicas are checked against the name of the service they serve
# (the services pass theirs: store-svc, ...; here --peer-service), as no
# one address names them all. Each certificate names the service and its
# own address only, as a replica's would.

@pytest.fixture(scope="module")
def ca():
    return CA()


def store_cert(ca, host):
    return ca.issue("store-svc", dns=["store-svc", "store-svc.convo.svc"], ips=[host])


def tls_client(ca, port, *extra, calls=20):
    return client(f"127.0.0.1:{port},127.0.0.2:{port}", "--grpc-round-robin",
                  "--peer-service", "store-svc", *ca.issue("gateway").args(), *extra, calls=calls)


def test_with_tls_every_replica_whose_certificate_names_the_service_is_called(pb, ca):
    port = shared_port(HOSTS)
    servers = [replica(pb, h, port, f"replica{i}", store_cert(ca, h))
               for i, h in enumerate(HOSTS)]
    try:
        code, lines, err = tls_client(ca, port)
    finally:
        for s in servers:
            s.stop(0)
    assert code == 0, err
    answers = [text for _, text in lines]
    # The second replica's certificate does not name the first's address:
    # checked against that address it would be refused and never called.
    assert answers.count("replica0") >= 5 and answers.count("replica1") >= 5, answers


def test_with_tls_a_replica_with_another_services_certificate_is_refused(pb, ca):
    """A router-svc certificate serving as store-svc: it names both
    addresses (so checking against the list's first address would take it),
    but not the service. Its replica never gets a call; the genuine one
    takes them all."""
    port = shared_port(HOSTS)
    calls = []
    impostor = ca.issue("router-svc", dns=["router-svc", "router-svc.convo.svc"], ips=HOSTS)
    servers = [replica(pb, "127.0.0.1", port, "impostor", impostor, calls),
               replica(pb, "127.0.0.2", port, "genuine", store_cert(ca, "127.0.0.2"), calls)]
    try:
        code, lines, err = tls_client(ca, port)
    finally:
        for s in servers:
            s.stop(0)
    assert code == 0, err
    assert {text for _, text in lines} == {"genuine"}, lines
    assert "impostor" not in calls


def test_with_tls_a_list_of_only_other_services_fails_every_call(pb, ca):
    port = shared_port(HOSTS)
    calls = []
    impostor = ca.issue("router-svc", dns=["router-svc"], ips=HOSTS)
    servers = [replica(pb, h, port, f"impostor{i}", impostor, calls)
               for i, h in enumerate(HOSTS)]
    try:
        code, lines, err = tls_client(ca, port, "--timeout-ms", "2000", calls=3)
    finally:
        for s in servers:
            s.stop(0)
    assert code == 1 and {status for status, _ in lines} == {"UNAVAILABLE"}, (lines, err)
    assert calls == []


def test_a_list_without_the_service_name_is_refused():
    code, lines, err = client(f"127.0.0.1:{free_port()},127.0.0.2:{free_port()}",
                              "--peer-service", "", calls=1)
    assert code == 2 and "needs the name of the service" in err, err
