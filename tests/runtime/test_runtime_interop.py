"""The runtime's server seen by an independent gRPC implementation (Python
grpcio): client streaming, undecodable requests, unknown methods, metadata,
Watch, and SIGTERM. The Test service comes from tests/runtime/testsvc.proto."""

import importlib
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest

from harness import Service, build_dir, proto_stubs

HERE = Path(__file__).resolve().parent


def testsvc(**kw):
    return Service("testsvc-server", binary=build_dir() / "tests" / "runtime" / "testsvc-server", **kw)


@pytest.fixture(scope="module")
def pb():
    out = Path(tempfile.mkdtemp(prefix="testsvc-stubs-"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{HERE}", f"--python_out={out}",
                    f"--grpc_python_out={out}", "testsvc.proto"], check=True)
    sys.path.insert(0, str(out))
    return importlib.import_module("testsvc_pb2"), importlib.import_module("testsvc_pb2_grpc")


@pytest.fixture()
def server():
    with testsvc(args=["--shutdown-grace-ms", "1000"]) as svc:
        yield svc


def test_client_streaming_sum(pb, server):
    msgs, rpc = pb
    stub = rpc.TestStub(server.channel())
    reply = stub.Sum(iter([msgs.Item(seq=i) for i in range(1, 1001)]), timeout=10)
    assert reply.total == 1000 * 1001 // 2


def test_empty_client_stream(pb, server):
    msgs, rpc = pb
    stub = rpc.TestStub(server.channel())
    assert stub.Sum(iter([]), timeout=10).total == 0


def test_undecodable_request_is_invalid_argument(server):
    call = server.channel().unary_unary("/convo.test.Test/Echo")
    with pytest.raises(grpc.RpcError) as e:
        call(b"\x0a\xff\xff\xff", timeout=5)  # a length that runs past the end
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "convo.test.EchoRequest" in e.value.details()


def test_unknown_method_is_unimplemented_at_once(server):
    call = server.channel().unary_unary("/convo.test.Test/NoSuchMethod")
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        call(b"", timeout=30)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "/convo.test.Test/NoSuchMethod" in e.value.details()
    assert time.monotonic() - t0 < 5


def test_request_id_metadata_reaches_the_handler(pb, server):
    msgs, rpc = pb
    stub = rpc.TestStub(server.channel())
    reply = stub.Echo(msgs.EchoRequest(text="hi"), metadata=[("x-request-id", "abc-123")], timeout=5)
    assert reply.request_id == "abc-123"
    generated = stub.Echo(msgs.EchoRequest(text="hi"), timeout=5).request_id
    assert len(generated) == 16


def test_watch_reports_not_serving_on_sigterm():
    with testsvc(args=["--drain-delay-ms", "300"]) as svc:
        hp = proto_stubs()
        stub = hp.health_pb2_grpc.HealthStub(svc.channel())
        stream = stub.Watch(hp.health_pb2.HealthCheckRequest(service="convo.test.Test"), timeout=20)
        first = next(stream)
        assert first.status == hp.health_pb2.HealthCheckResponse.SERVING
        svc._proc.send_signal(signal.SIGTERM)
        second = next(stream)
        assert second.status == hp.health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            next(stream)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert svc._proc.wait(timeout=10) == 0


def test_sigterm_with_open_stream_exits_cleanly_after_grace(pb):
    msgs, rpc = pb
    with testsvc(args=["--shutdown-grace-ms", "500"]) as svc:
        stub = rpc.TestStub(svc.channel())
        stream = stub.Drip(msgs.CountRequest(interval_ms=5), timeout=30)
        assert next(stream).seq == 1
        t0 = time.monotonic()
        svc._proc.send_signal(signal.SIGTERM)
        seen = 1
        with pytest.raises(grpc.RpcError):
            for item in stream:
                seen += 1
                assert item.seq == seen
        assert svc._proc.wait(timeout=10) == 0
        took = time.monotonic() - t0
        assert 0.4 < took < 5
        lines = [l for l in svc.log_lines() if "grace period" in l.get("message", "")]
        assert lines, "the server logs that it cancelled calls after the grace period"


def test_nul_in_a_string_is_refused_not_cut(pb, server):
    """protobuf-c would cut "a\\0b" to "a"; the runtime refuses it instead."""
    msgs, rpc = pb
    stub = rpc.TestStub(server.channel())
    with pytest.raises(grpc.RpcError) as e:
        stub.Echo(msgs.EchoRequest(text="before\x00after"), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "field text of convo.test.EchoRequest contains a NUL character" in e.value.details()
    assert stub.Echo(msgs.EchoRequest(text="fine"), timeout=5).text == "fine"
