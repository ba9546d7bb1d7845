"""Tests of the test harness itself (tests/harness/harness.py)."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

import harness
from harness import Postgres, Service, free_port, proto_stubs

HERE = Path(__file__).resolve().parent
FAKE = HERE / "fake_service.py"


def _gone(pid: int) -> bool:
    """The process no longer runs (it may linger as a zombie when nobody reaps
    orphans, as in some containers)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line for line in f)
    except FileNotFoundError:
        return True


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return False


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(HERE), **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- free_port


def test_free_port_is_bindable_and_not_repeated():
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == len(ports)
    for p in ports[:3]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))
            s.listen()


# ---------------------------------------------------------------- proto_stubs


def test_proto_stubs_expose_every_proto_file():
    pb = proto_stubs()
    assert pb is proto_stubs()  # once per process
    protos = sorted(p.relative_to(harness.PROTO_DIR).as_posix() for p in harness.PROTO_DIR.rglob("*.proto"))
    for f in protos:
        full = f[: -len(".proto")].replace("/", ".") + "_pb2"
        assert full in pb.modules, full
    assert pb.router_pb2.RouteRequest.DESCRIPTOR.full_name == "convo.v1.RouteRequest"
    assert pb.health_pb2.HealthCheckResponse.SERVING == 1
    assert hasattr(pb.router_pb2_grpc, "RouterStub")
    assert hasattr(pb.health_pb2_grpc, "HealthStub")
    assert hasattr(pb, "common_pb2") and hasattr(pb, "store_pb2")
    # grpc.health.v1 lives beside grpcio's own grpc package
    import grpc.health.v1.health_pb2 as h

    assert h is pb.health_pb2


def _roundtrip_with_stubs(how: str, proto_dir=None):
    """In a fresh interpreter: generate stubs the way `how` says, serve
    Router.Route with a Python servicer and call it through the stub."""
    env = {"CONVO_STUBS": how}
    if proto_dir:
        env["CONVO_PROTO_DIR"] = str(proto_dir)
    code = """
        import grpc
        from concurrent import futures
        from harness import proto_stubs, free_port
        pb = proto_stubs()
        print("generated_by", pb.generated_by)
        class Router(pb.router_pb2_grpc.RouterServicer):
            def Route(self, request, context):
                return pb.router_pb2.RouteResponse(strategy=pb.router_pb2.STRATEGY_ANALYTICAL,
                                                   system_prompt="echo:" + request.last_user_message)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb.router_pb2_grpc.add_RouterServicer_to_server(Router(), server)
        port = free_port()
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            r = pb.router_pb2_grpc.RouterStub(ch).Route(pb.router_pb2.RouteRequest(last_user_message="hi"), timeout=10)
        assert r.system_prompt == "echo:hi" and r.strategy == pb.router_pb2.STRATEGY_ANALYTICAL, r
        server.stop(0)
        print("ok")
    """
    r = _run_python(code, **env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.parametrize("how", ["grpc_tools", "protoc"])
def test_proto_stubs_both_generators_serve_and_call(how):
    out = _roundtrip_with_stubs(how)
    assert f"generated_by {how}" in out and "ok" in out


def test_proto_stubs_fall_back_when_grpc_tools_rejects_the_syntax(tmp_path):
    # Debian's grpc_tools bundles an old protoc without proto3 `optional`.
    shutil_copy = __import__("shutil").copytree
    shutil_copy(harness.PROTO_DIR, tmp_path / "proto")
    common = tmp_path / "proto" / "convo" / "v1" / "common.proto"
    common.write_text(common.read_text() + "\nmessage HarnessProbe { optional string maybe = 1; }\n")
    code = """
        from harness import proto_stubs
        pb = proto_stubs()
        m = pb.common_pb2.HarnessProbe()
        assert not m.HasField("maybe")
        print("generated_by", pb.generated_by)
    """
    r = _run_python(code, CONVO_PROTO_DIR=str(tmp_path / "proto"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "generated_by protoc" in r.stdout
    assert "generated_by protoc" in _roundtrip_with_stubs("", proto_dir=tmp_path / "proto")


# ---------------------------------------------------------------- Postgres


def test_postgres_starts_accepts_connections_and_keeps_data_across_restart():
    psycopg2 = pytest.importorskip("psycopg2")
    with Postgres() as pg:
        assert pg.url == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
        if os.geteuid() == 0:  # initdb and postgres refuse root
            uid = [line for line in open(f"/proc/{pg._proc.pid}/status") if line.startswith("Uid:")][0]
            assert int(uid.split()[1]) != 0
        with psycopg2.connect(pg.url) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            cur.execute("INSERT INTO t VALUES (1, 'kept')")
            cur.execute("SHOW fsync")
            assert cur.fetchone()[0] == "off"
        conn.close()

        port = pg.port
        assert pg.stop() == 0
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(pg.url, connect_timeout=2)
        pg.start()
        assert pg.port == port
        with psycopg2.connect(pg.url) as conn, conn.cursor() as cur:
            cur.execute("SELECT v FROM t WHERE id = 1")
            assert cur.fetchone()[0] == "kept"
        conn.close()
        assert pg.psql("SELECT v FROM t").strip() == "kept"
        data = pg.dir
    assert not pg.running
    assert harness.KEEP_TMP or not data.exists()


def test_postgres_recovers_after_kill():
    with Postgres() as pg:
        pg.psql("CREATE TABLE k (v int)")
        for i in range(3):  # a start right after a kill must find the backends gone
            pg.psql(f"INSERT INTO k VALUES ({i})")
            pg.kill()
            assert not pg.running
            pg.start()
            assert pg.psql("SELECT count(*) FROM k").strip() == str(i + 1)


def test_postgres_cpu_counts_its_own_backends_also_after_they_exit():
    with Postgres() as pg, Postgres() as other:
        before, other_before = pg.cpu_seconds(), other.cpu_seconds()
        # A psql backend that burns CPU, then exits: its time must still count.
        pg.psql("SELECT count(*) FROM generate_series(1, 3000000) a, generate_series(1, 3) b")
        after = pg.cpu_seconds()
        assert after - before >= 0.1
        # The other server did nothing of it.
        assert other.cpu_seconds() - other_before < (after - before) / 2
    assert pg.cpu_seconds() == 0.0  # stopped


def test_process_cpu_seconds_of_a_busy_process_and_a_gone_one():
    p = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                          "while time.process_time() - t < 0.3: pass\nprint('busy', flush=True)\n"
                          "input()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "busy"
        assert harness.process_cpu_seconds(p.pid) >= 0.25
    finally:
        p.communicate("\n")
    assert harness.process_cpu_seconds(p.pid) == 0.0


def test_postgres_dies_with_the_test_process():
    r = _run_python("""
        import os
        from harness import Postgres
        pg = Postgres()
        print(pg._proc.pid, flush=True)
        os._exit(0)  # no atexit: only the parent-death signal can stop it
    """)
    assert r.returncode == 0, r.stderr
    assert _wait_gone(int(r.stdout.split()[0]))


# ---------------------------------------------------------------- Service


def fake(args=(), **kw):
    return Service("fake-svc", args=args, binary=FAKE, **kw)


def test_service_starts_answers_health_and_stops_cleanly():
    pb = proto_stubs()
    with fake(env={"FAKE_PROBE": "probe-value"}) as svc:
        assert svc.addr == f"127.0.0.1:{svc.port}"
        stub = pb.health_pb2_grpc.HealthStub(svc.channel())
        resp = stub.Check(pb.health_pb2.HealthCheckRequest(service=""), timeout=5,
                          metadata=(("x-request-id", "req-1"),))
        assert resp.status == pb.health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(pb.health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        line = svc.wait_for_log(lambda o: o.get("request_id") == "req-1")
        assert line["service"] == "fake-svc"
        listening = svc.wait_for_log(lambda o: o.get("message") == "listening")
        assert listening["listen"] == svc.addr and listening["env_probe"] == "probe-value"
        assert {"_raw": "a line that is not JSON"} in svc.log_lines()
        with pytest.raises(ValueError):
            svc.log_lines(strict=True)
        assert "stdout is kept apart" not in svc.log_text()
        assert svc.stop() == 0
        assert not svc.running
        assert svc.log_lines()[-1]["message"] == "stopping"


def test_service_restart_keeps_port():
    with fake() as svc:
        port = svc.port
        assert svc.kill() == -signal.SIGKILL
        svc.start()
        assert svc.port == port
        assert svc.health_check() == proto_stubs().health_pb2.HealthCheckResponse.SERVING


def test_service_exit_code_is_returned():
    svc = fake(["--exit-code", "7"])
    assert svc.stop() == 7


def test_service_that_exits_at_start_fails_with_log_tail():
    with pytest.raises(RuntimeError, match="told to fail"):
        fake(["--fail-start"])


def test_service_not_serving_times_out_but_grpc_up_is_ready():
    with pytest.raises(TimeoutError, match="not ready"):
        fake(["--not-serving"], timeout=2)
    svc = fake(["--not-serving"], ready="grpc-up")
    assert svc.health_check() == proto_stubs().health_pb2.HealthCheckResponse.NOT_SERVING
    svc.stop()


def test_service_stop_timeout_kills_and_raises():
    svc = fake(["--ignore-term"])
    with pytest.raises(TimeoutError):
        svc.stop(timeout=1)
    assert not svc.running


def test_service_binary_lookup_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setenv("CONVO_BUILD_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="cmake"):
        Service("no-such-svc")


def test_services_die_with_the_test_process():
    r = _run_python(f"""
        import os
        from harness import Service
        svc = Service("fake-svc", binary={str(FAKE)!r})
        print(svc.pid, flush=True)
        os._exit(0)
    """)
    assert r.returncode == 0, r.stderr
    assert _wait_gone(int(r.stdout.split()[0]))


def test_services_are_stopped_at_exit_even_after_a_failure():
    r = _run_python(f"""
        from harness import Service
        svc = Service("fake-svc", binary={str(FAKE)!r})
        print(svc.pid, svc.log_path, flush=True)
        raise SystemExit(1)
    """)
    assert r.returncode == 1
    pid, log = r.stdout.split()
    assert _wait_gone(int(pid))
    assert not Path(log).exists()  # temporary files removed


def test_grpc_server_in_process_needs_no_binary():
    # The generated Servicer base classes let a test fake any peer service.
    pb = proto_stubs()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb.router_pb2_grpc.add_RouterServicer_to_server(pb.router_pb2_grpc.RouterServicer(), server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb.router_pb2_grpc.RouterStub(ch).Route(pb.router_pb2.RouteRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(0)
