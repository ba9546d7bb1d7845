"""Mutual TLS in the runtime (runtime/tls.c, srv.c, cli.c), tried from the
attacker's side with certificates the openssl CLI makes here (certs.py):
the server (testsvc-server) against Python grpcio clients and raw TLS
sockets, the client (testsvc-client) against Python grpcio servers.

testsvc-server allows Echo to `gateway` and `admin`, Sum to `gateway`, and
Count, Hang and Drip to any caller with a certificate of the CA."""

import concurrent.futures
import importlib
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest

from certs import CA
from harness import Service, build_dir, free_port, proto_stubs

HERE = Path(__file__).resolve().parent
CLIENT = build_dir() / "tests" / "runtime" / "testsvc-client"
SERVER = build_dir() / "tests" / "runtime" / "testsvc-server"
HANDSHAKE_REFUSED = (grpc.StatusCode.UNAVAILABLE,)


@pytest.fixture(scope="module")
def pb():
    out = Path(tempfile.mkdtemp(prefix="testsvc-stubs-"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{HERE}", f"--python_out={out}",
                    f"--grpc_python_out={out}", "testsvc.proto"], check=True)
    sys.path.insert(0, str(out))
    return importlib.import_module("testsvc_pb2"), importlib.import_module("testsvc_pb2_grpc")


@pytest.fixture(scope="module")
def ca():
    return CA("convo-test-ca")


@pytest.fixture(scope="module")
def other_ca():
    return CA("someone-else")


@pytest.fixture(scope="module")
def server(ca):
    ident = ca.issue("testsvc")
    with Service("testsvc-server", binary=SERVER, tls=ident, caller=ca.issue("admin"),
                 args=["--shutdown-grace-ms", "500"]) as svc:
        yield svc


def echo(pb, channel, text="hi", timeout=5):
    msgs, rpc = pb
    return rpc.TestStub(channel).Echo(msgs.EchoRequest(text=text), timeout=timeout)


def refused_code(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


# ------------------------------------------------------------ start-up errors
def start_fails(env, args=()):
    """Starts testsvc-server; returns (exit code, stderr) of a run that must
    not come up."""
    r = subprocess.run([str(SERVER), "--listen", f"127.0.0.1:{free_port()}", *args],
                       env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True,
                       timeout=20)
    return r.returncode, r.stderr


@pytest.mark.parametrize("given", [("TLS_CERT_FILE",), ("TLS_KEY_FILE",), ("TLS_CA_FILE",),
                                   ("TLS_CERT_FILE", "TLS_KEY_FILE"), ("TLS_CERT_FILE", "TLS_CA_FILE"),
                                   ("TLS_KEY_FILE", "TLS_CA_FILE")])
def test_a_partial_set_is_a_start_up_error_naming_what_is_missing(ca, given):
    env = {k: v for k, v in ca.issue("testsvc").env().items() if k in given}
    code, err = start_fails(env)
    assert code == 2, err
    missing = {"TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CA_FILE"} - set(given)
    for name in missing:
        assert name in err, err
    for name in given:
        assert f"({name})" not in err.split("missing:")[1], err


def test_bad_files_are_start_up_errors(ca, other_ca, tmp_path):
    good = ca.issue("testsvc")
    foreign = other_ca.issue("testsvc")
    cases = {
        "no such file": ({**good.env(), "TLS_CERT_FILE": str(tmp_path / "nope.crt")},
                         "No such file"),
        "not PEM": ({**good.env(), "TLS_CA_FILE": str(tmp_path / "junk")}, "no PEM certificate"),
        "the key of another certificate": ({**good.env(), "TLS_KEY_FILE": str(foreign.key)},
                                           "is not the key of"),
        "signed by another CA": ({**good.env(), "TLS_CERT_FILE": str(foreign.cert),
                                  "TLS_KEY_FILE": str(foreign.key)}, "is not accepted by"),
        "expired": (ca.issue("testsvc", expired=True).env(), "expired"),
        "no DNS name": (ca.issue("testsvc", dns=[]).env(), "no usable DNS subject alternative"),
        "refresh out of range": ({**good.env(), "TLS_REFRESH_SECONDS": "0"},
                                 "--tls-refresh-seconds"),
    }
    (tmp_path / "junk").write_text("not a certificate\n")
    for what, (env, words) in cases.items():
        code, err = start_fails(env)
        assert code == 2, f"{what}: exit {code}\n{err}"
        assert words in err, f"{what}: {err}"


def test_flags_work_like_the_environment(ca, pb):
    ident = ca.issue("testsvc")
    with Service("testsvc-server", binary=SERVER, args=ident.args(), caller=ca.issue("gateway"),
                 env={"TLS_CERT_FILE": None, "TLS_KEY_FILE": None, "TLS_CA_FILE": None}) as svc:
        assert echo(pb, svc.channel()).text == "hi"
        assert "mutual TLS" in svc.log_text()


# ------------------------------------------------------------ who gets in
def test_plaintext_client_is_refused(pb, server):
    with grpc.insecure_channel(server.addr) as ch:
        assert refused_code(lambda: echo(pb, ch, timeout=3)) in HANDSHAKE_REFUSED


def test_client_without_a_certificate_is_refused(pb, server, ca):
    creds = grpc.ssl_channel_credentials(root_certificates=ca.cert.read_bytes())
    with grpc.secure_channel(server.addr, creds) as ch:
        assert refused_code(lambda: echo(pb, ch, timeout=3)) in HANDSHAKE_REFUSED


def test_certificate_of_another_ca_is_refused(pb, server, ca, other_ca):
    # It trusts our CA (so it accepts the server) but shows a certificate of
    # its own CA, with the name of a caller that would be allowed.
    forged = other_ca.issue("gateway", extra_ca=[ca])
    with forged.channel(server.addr) as ch:
        assert refused_code(lambda: echo(pb, ch, timeout=3)) in HANDSHAKE_REFUSED


def test_expired_certificate_is_refused(pb, server, ca):
    with ca.issue("gateway", expired=True).channel(server.addr) as ch:
        assert refused_code(lambda: echo(pb, ch, timeout=3)) in HANDSHAKE_REFUSED


def test_raw_tls_handshake_without_certificate_fails(server, ca):
    """Not only gRPC: the TLS handshake itself asks for and requires a client
    certificate."""
    ctx = ssl.create_default_context(cafile=str(ca.cert))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        try:
            with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as t:
                t.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                # TLS 1.3 tells the client on its first read: an alert or the
                # end of the connection. An accepted one would get the
                # server's HTTP/2 SETTINGS here.
                data = t.recv(9)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            data = b""
    assert data == b""


# ------------------------------------------------------------ per method
def test_allowed_callers_get_their_methods(pb, server, ca):
    msgs, rpc = pb
    for name in ("gateway", "admin"):
        with ca.issue(name).channel(server.addr) as ch:
            assert echo(pb, ch, text=name).text == name
    with ca.issue("gateway").channel(server.addr) as ch:
        assert rpc.TestStub(ch).Sum(iter([msgs.Item(seq=2), msgs.Item(seq=3)]), timeout=5).total == 5


def test_caller_not_allowed_is_permission_denied_counted_and_logged(pb, server, ca):
    msgs, rpc = pb
    before = len(re.findall("permission denied", server.log_text()))
    with ca.issue("llm-svc").channel(server.addr) as ch:
        with pytest.raises(grpc.RpcError) as e:
            echo(pb, ch)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "llm-svc" in e.value.details() and "/convo.test.Test/Echo" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            rpc.TestStub(ch).Sum(iter([msgs.Item(seq=1)]), timeout=5)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Methods open to every caller of the CA still answer it.
        items = list(rpc.TestStub(ch).Count(msgs.CountRequest(count=3), timeout=5))
        assert [i.seq for i in items] == [1, 2, 3]
    line = server.wait_for_log(lambda l: l.get("caller") == "llm-svc"
                               and l.get("method") == "/convo.test.Test/Sum")
    assert line["level"] == "warn" and "permission denied" in line["message"]
    assert len(re.findall("permission denied", server.log_text())) == before + 2
    assert re.search(r"\((\d+) refused so far\)", line["message"])


@pytest.mark.parametrize("dns,allowed", [
    (["llm-svc.convo.svc", "gateway.convo.svc"], False),  # the FIRST DNS name counts
    (["gateway.convo.svc", "llm-svc.convo.svc"], True),
    (["GATEWAY.convo.svc"], True),                        # DNS names are case-insensitive
    (["gateway"], True),
    (["*.convo.svc"], False),                             # a wildcard names nobody
    (["gateway-x.convo.svc"], False),
    ([], False),                                          # no DNS name: nobody
])
def test_caller_name_is_the_first_label_of_the_first_dns_name(pb, server, ca, dns, allowed):
    with ca.issue("x", dns=dns).channel(server.addr) as ch:
        if allowed:
            assert echo(pb, ch).text == "hi"
        else:
            assert refused_code(lambda: echo(pb, ch)) == grpc.StatusCode.PERMISSION_DENIED
        assert server.health_check() == 1  # health: every caller of the CA


# ------------------------------------------------------------ rotation
def served_serial(port, client):
    """The serial of the certificate the server shows a new connection."""
    ctx = ssl.create_default_context(cafile=str(client.ca))
    ctx.load_cert_chain(str(client.cert), str(client.key))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as t:
            der = t.getpeercert(binary_form=True)
    out = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-serial"], input=der,
                         capture_output=True, check=True).stdout.decode()
    return int(out.strip().split("=", 1)[1], 16)


def wait_until(pred, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if pred():
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_replaced_certificate_is_used_by_new_connections_running_calls_finish(pb, ca):
    """The server's files are swapped as the kubelet swaps a Secret volume:
    new connections get the new certificate within the refresh interval (1 s
    here); a stream that started before goes on, on its connection, and ends
    normally."""
    msgs, rpc = pb
    ident = ca.issue("testsvc")
    gw = ca.issue("gateway")
    with Service("testsvc-server", binary=SERVER, tls=ident, caller=gw) as svc:
        old = ident.serial()
        assert served_serial(svc.port, gw) == old
        ch = gw.channel(svc.addr)
        stream = rpc.TestStub(ch).Drip(msgs.CountRequest(interval_ms=20), timeout=60)
        got = [next(stream).seq for _ in range(3)]
        renewed = ca.issue("testsvc")
        ident.replace_with(renewed)
        wait_until(lambda: served_serial(svc.port, gw) == renewed.serial(), what="the new certificate")
        # The stream of the old connection kept going through the swap.
        after = [next(stream).seq for _ in range(20)]
        assert after == list(range(got[-1] + 1, got[-1] + 21))
        stream.cancel()
        # And new calls on new channels work with the new certificate.
        with gw.channel(svc.addr) as ch2:
            assert echo(pb, ch2).text == "hi"
        ch.close()


def test_ca_change_new_connections_follow_running_calls_finish(pb, ca):
    """The CA is replaced (bundle of both, then the new one alone): once the
    server reads a bundle without the old CA, new connections with old
    certificates are refused, while a stream that started on an old one
    finishes."""
    msgs, rpc = pb
    new_ca = CA("convo-test-ca-2")
    ident = ca.issue("testsvc")
    old_gw = ca.issue("gateway")
    new_gw = new_ca.issue("gateway", extra_ca=[ca])
    with Service("testsvc-server", binary=SERVER, tls=ident, caller=old_gw) as svc:
        with new_gw.channel(svc.addr) as ch:
            assert refused_code(lambda: echo(pb, ch, timeout=3)) in HANDSHAKE_REFUSED
        old_ch = old_gw.channel(svc.addr)
        stream = rpc.TestStub(old_ch).Drip(msgs.CountRequest(interval_ms=20), timeout=60)
        first = next(stream).seq
        ident.replace_with(new_ca.issue("testsvc", extra_ca=[]))
        # New connections: the new CA's callers get in, the old CA's do not.
        wait_until(lambda: echo(pb, new_gw.channel(svc.addr)).text == "hi", what="the new CA")
        with old_gw.channel(svc.addr) as ch:
            assert refused_code(lambda: echo(pb, ch, timeout=3)) in HANDSHAKE_REFUSED
        after = [next(stream).seq for _ in range(10)]
        assert after == list(range(first + 1, first + 11))
        stream.cancel()
        old_ch.close()


# ------------------------------------------------------------ our client
class EchoServicer:
    """A Python grpcio Test server answering Echo with the caller's
    certificate serial (from its TLS auth context); the other methods are
    the generated UNIMPLEMENTED ones."""

    def __init__(self, msgs):
        self.msgs = msgs
        self.serials = []
        self.lock = threading.Lock()

    def Echo(self, req, context):
        pem = context.auth_context().get("x509_pem_cert", [b""])[0]
        serial = subprocess.run(["openssl", "x509", "-noout", "-serial"], input=pem,
                                capture_output=True).stdout.decode().strip()
        with self.lock:
            self.serials.append(serial)
        return self.msgs.EchoReply(text=serial or "no certificate")


def python_server(pb, creds, options=()):
    msgs, rpc = pb
    servicer = type("Servicer", (EchoServicer, rpc.TestServicer), {})(msgs)
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(4), options=list(options))
    rpc.add_TestServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", creds) if creds is not None else \
        server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, servicer


def run_client(ident, port, *extra, timeout=60):
    args = [str(CLIENT), "--target", f"127.0.0.1:{port}", "--timeout-ms", "3000", *extra]
    if ident is not None:
        args += ident.args() + ["--tls-refresh-seconds", "1"]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def test_our_client_shows_its_certificate_and_verifies_the_server(pb, ca):
    me = ca.issue("gateway")
    server, port, seen = python_server(pb, ca.issue("store-svc").server_credentials())
    try:
        r = run_client(me, port)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.split() == ["OK", f"serial={me.serial():X}"]
    finally:
        server.stop(0)


@pytest.mark.parametrize("case", ["another CA", "another host name", "expired", "plaintext"])
def test_our_client_refuses_a_server_it_cannot_trust(pb, ca, other_ca, case):
    me = ca.issue("gateway")
    if case == "plaintext":
        creds = None
    else:
        ident = {"another CA": lambda: other_ca.issue("store-svc", extra_ca=[ca]),
                 "another host name": lambda: ca.issue("store-svc", ips=[]),
                 "expired": lambda: ca.issue("store-svc", expired=True)}[case]()
        creds = ident.server_credentials(require_client_cert=False)
    server, port, seen = python_server(pb, creds)
    try:
        r = run_client(me, port)
        assert r.returncode == 1 and r.stdout.startswith("UNAVAILABLE"), r.stdout + r.stderr
        assert seen.serials == [], "the call reached a server the client should not trust"
    finally:
        server.stop(0)


def test_our_client_uses_a_replaced_certificate_on_new_connections(pb, ca):
    """The client's own files are swapped while it calls once every 100 ms;
    the server closes connections after 300 ms, so the client keeps making
    new ones: every call succeeds, and the later ones show the new
    certificate."""
    me = ca.issue("gateway")
    server, port, seen = python_server(pb, ca.issue("store-svc").server_credentials(),
                                       options=[("grpc.max_connection_age_ms", 300),
                                                ("grpc.max_connection_age_grace_ms", 5000)])
    try:
        old, renewed = me.serial(), ca.issue("gateway")
        proc = subprocess.Popen([str(CLIENT), "--target", f"127.0.0.1:{port}", "--calls", "60",
                                 "--interval-ms", "100", "--timeout-ms", "3000",
                                 "--tls-refresh-seconds", "1", *me.args()],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: len(seen.serials) >= 5, what="the first calls")
        me.replace_with(renewed)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, out + err
        lines = out.split("\n")[:-1]
        assert len(lines) == 60 and all(l.startswith("OK ") for l in lines), out
        assert lines[0] == f"OK serial={old:X}"
        assert lines[-1] == f"OK serial={renewed.serial():X}"
    finally:
        server.stop(0)


def test_sigterm_with_tls_connections_open(pb, ca):
    """Shutdown with TLS connections and a stream open stays clean (exit 0,
    nothing leaked under the sanitizers)."""
    msgs, rpc = pb
    gw = ca.issue("gateway")
    svc = Service("testsvc-server", binary=SERVER, tls=ca.issue("testsvc"), caller=gw,
                  args=["--shutdown-grace-ms", "300"])
    ch = gw.channel(svc.addr)
    stream = rpc.TestStub(ch).Drip(msgs.CountRequest(interval_ms=20), timeout=60)
    next(stream)
    assert svc.stop(signal.SIGTERM) == 0, svc.log_tail()
    ch.close()


# ------------------------------------------------------------ probes
def test_health_port_answers_health_only_and_without_tls(pb, ca):
    """--health-listen: the kubelet's gRPC probe cannot show a certificate,
    so health is answered there in plaintext; nothing else is, and the
    status follows the server's (NOT_SERVING while it drains)."""
    msgs, rpc = pb
    health = proto_stubs()
    hp = free_port()
    svc = Service("testsvc-server", binary=SERVER, tls=ca.issue("testsvc"),
                  caller=ca.issue("gateway"),
                  args=["--health-listen", f"127.0.0.1:{hp}", "--drain-delay-ms", "3000"])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{hp}") as ch:
            stub = health.health_pb2_grpc.HealthStub(ch)
            req = health.health_pb2.HealthCheckRequest()
            assert stub.Check(req, timeout=5).status == health.health_pb2.HealthCheckResponse.SERVING
            watch = stub.Watch(req, timeout=30)
            assert next(watch).status == health.health_pb2.HealthCheckResponse.SERVING
            for call in (lambda: echo(pb, ch),
                         lambda: list(rpc.TestStub(ch).Count(msgs.CountRequest(count=1), timeout=5))):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value
                assert "grpc.health.v1" in e.value.details()
            # The TLS port still refuses plaintext, health included.
            with grpc.insecure_channel(svc.addr) as plain:
                with pytest.raises(grpc.RpcError) as e:
                    health.health_pb2_grpc.HealthStub(plain).Check(req, timeout=3)
                assert e.value.code() in HANDSHAKE_REFUSED
            svc._proc.send_signal(signal.SIGTERM)
            assert next(watch).status == health.health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
        assert svc._proc.wait(timeout=20) == 0
    finally:
        svc.kill()


def test_health_port_in_use_is_a_start_up_error(ca):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = start_fails(ca.issue("testsvc").env(),
                                args=["--health-listen", f"127.0.0.1:{port}"])
    assert code == 1 and "--health-listen" in err, err
