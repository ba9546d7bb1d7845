"""Interop: an independent gRPC implementation (Python grpcio, stubs generated
from proto/ and nothing else) calls router-svc over TCP.

What is checked is the contract in proto/convo/v1/router.proto and
proto/grpc/health/v1/health.proto, plus what every gRPC server owes any
client (standard status codes, deadlines, metadata, graceful SIGTERM)."""

import time
from concurrent import futures

import grpc
import pytest

from harness import REPO_ROOT, Service, proto_stubs

pb = proto_stubs()
R = pb.router_pb2
H = pb.health_pb2
SERVING = H.HealthCheckResponse.SERVING

# The runtime's default --shutdown-grace-ms (runtime/srv.h).
GRACE_S = 10.0


@pytest.fixture(scope="module")
def router():
    # debug: router-svc logs each decision, which shows the x-request-id.
    with Service("router-svc", args=["--log-level", "debug"]) as svc:
        yield svc
    # Every line it wrote is one JSON object (README: logs).
    for line in svc.log_lines(strict=True):
        assert {"time", "level", "service", "message"} <= line.keys(), line


@pytest.fixture(scope="module")
def stub(router):
    return pb.router_pb2_grpc.RouterStub(router.channel())


@pytest.fixture(scope="module")
def health(router):
    return pb.health_pb2_grpc.HealthStub(router.channel())


def route(stub, **fields):
    req = {"session_id": "interop-session", "user_id": "interop-user", "user_message_count": 1}
    req.update(fields)
    return stub.Route(R.RouteRequest(**req), timeout=10)


def rpc_error(fn, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, **kw)
    return e.value


def raw_call(channel, method, payload: bytes, timeout=10):
    """A unary call with hand-made request bytes (what protobuf won't encode)."""
    call = channel.unary_unary(method, request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
    return call(payload, timeout=timeout)


# ---------------------------------------------------------------- health


@pytest.mark.parametrize("service", ["", "convo.v1.Router"])
def test_health_serving(health, service):
    resp = health.Check(H.HealthCheckRequest(service=service), timeout=5)
    assert resp.status == SERVING


def test_health_unknown_service_is_not_found(health):
    err = rpc_error(health.Check, H.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert err.code() == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------- Route


def test_route_analytical_question(stub):
    resp = route(stub, last_user_message="Can you explain async?")
    assert resp.strategy == R.STRATEGY_ANALYTICAL
    assert resp.verbosity == R.VERBOSITY_DETAILED
    assert resp.strategy_name == "analytical"
    assert len(resp.reasons) >= 1 and all(r.strip() for r in resp.reasons)
    assert resp.system_prompt.strip()
    assert resp.HasField("params")
    assert 0.0 <= resp.params.temperature <= 2.0


def test_route_long_session_is_summarization_aware(stub):
    resp = route(stub, last_user_message="Thanks, that helps.", user_message_count=11)
    assert resp.strategy == R.STRATEGY_SUMMARIZATION_AWARE
    assert resp.strategy_name == "summarization_aware"
    assert resp.reasons and resp.system_prompt and resp.HasField("params")


def test_route_prompts_differ_by_strategy(stub):
    analytical = route(stub, last_user_message="Why is the sky blue?")
    plain = route(stub, last_user_message="Hello there")
    assert analytical.strategy != plain.strategy
    assert analytical.system_prompt != plain.system_prompt


def test_route_missing_last_user_message_is_invalid_argument(stub):
    err = rpc_error(route, stub, last_user_message="")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "last_user_message" in (err.details() or "")


@pytest.mark.parametrize("field", ["user_message_count", "tool_call_count", "assistant_message_count"])
def test_route_negative_count_is_invalid_argument(stub, field):
    err = rpc_error(route, stub, last_user_message="hello", **{field: -1})
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.details() or "")


def test_route_over_long_message_is_invalid_argument(stub):
    # 1 MiB: beyond router-svc's default limit, within gRPC's 4 MiB.
    err = rpc_error(route, stub, last_user_message="a" * (1 << 20))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_route_non_utf8_text_is_invalid_argument(router):
    # RouteRequest.last_user_message (field 3, bytes FF FE) + user_message_count=1
    payload = b"\x1a\x02\xff\xfe" + b"\x20\x01"
    err = rpc_error(raw_call, router.channel(), "/convo.v1.Router/Route", payload)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_route_undecodable_request_is_invalid_argument(router, health):
    err = rpc_error(raw_call, router.channel(), "/convo.v1.Router/Route", b"\xff\xff\xff\xff")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert health.Check(H.HealthCheckRequest(), timeout=5).status == SERVING


def test_unknown_method_is_unimplemented(router):
    err = rpc_error(raw_call, router.channel(), "/convo.v1.Router/NoSuchMethod", b"")
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED


def test_route_with_deadline(stub, health):
    resp = stub.Route(R.RouteRequest(last_user_message="Can you explain async?", user_message_count=1),
                      timeout=2.0)
    assert resp.strategy == R.STRATEGY_ANALYTICAL
    # A deadline that has passed before the server answers: either outcome
    # is fine, and the server stays up.
    try:
        stub.Route(R.RouteRequest(last_user_message="hi", user_message_count=1), timeout=0.0001)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert health.Check(H.HealthCheckRequest(), timeout=5).status == SERVING


def test_request_id_metadata_is_accepted_and_logged(router, stub):
    rid = "interop-req-7f3a"
    resp, call = stub.Route.with_call(
        R.RouteRequest(session_id="interop-rid", last_user_message="Can you explain async?",
                       user_message_count=1),
        timeout=10, metadata=(("x-request-id", rid),))
    assert call.code() == grpc.StatusCode.OK
    assert resp.strategy == R.STRATEGY_ANALYTICAL
    line = router.wait_for_log(lambda o: o.get("request_id") == rid, timeout=5)
    assert line.get("session_id") == "interop-rid"


def test_concurrent_calls(stub):
    with futures.ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(
            lambda i: route(stub, last_user_message=f"why {i}?", user_message_count=i + 1),
            range(64)))
    assert all(r.system_prompt for r in results)
    assert {r.strategy for r in results} == {R.STRATEGY_ANALYTICAL}


# ---------------------------------------------------------------- config and lifecycle


def test_shipped_config_file_is_accepted():
    conf = REPO_ROOT / "router-svc" / "router.conf"
    if not conf.exists():
        pytest.skip("router-svc/router.conf not present")
    with Service("router-svc", args=["--config", str(conf)]) as svc:
        stub = pb.router_pb2_grpc.RouterStub(svc.channel())
        resp = route(stub, last_user_message="Can you explain async?")
        assert resp.strategy == R.STRATEGY_ANALYTICAL
        assert svc.stop() == 0


def test_sigterm_exits_zero_within_grace_period():
    svc = Service("router-svc")
    stub = pb.router_pb2_grpc.RouterStub(svc.channel())
    route(stub, last_user_message="hello")  # it has served a call
    started = time.monotonic()
    code = svc.stop(timeout=GRACE_S + 2)
    elapsed = time.monotonic() - started
    assert code == 0, f"exit code {code}; log tail:\n{svc.log_tail()}"
    assert elapsed < GRACE_S, elapsed
    for line in svc.log_lines(strict=True):
        assert line.get("service") == "router-svc", line
