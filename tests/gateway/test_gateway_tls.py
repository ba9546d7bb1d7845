"""The whole path over mutual TLS (issue 13): every process of the stack
runs with a certificate of a throwaway CA made by the openssl CLI
(tests/harness/certs.py), and every gRPC hop — gateway to router-svc,
llm-svc, store-svc and summary-svc; llm-svc to store-svc; summary-svc to
store-svc and llm-svc — works, with no call refused. Then the same gateway
with a certificate the services must not accept."""

import asyncio
import json
import time
import urllib.request

import grpc
import pytest
import websockets

from harness import proto_stubs
from stack import Stack, dev_token, ws_url
from test_gateway_e2e import events, first_frame, run, streamed_text, tokens_of, turn

pb = proto_stubs()


@pytest.fixture(scope="module")
def tls_stack():
    s = Stack(tls=True)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gw(tls_stack):
    g = tls_stack.gateway("--rate-limit", "6000")
    yield g
    g.stop()


def get_json(gw, path, user=None):
    """GET path; as `user` (a dev token) when given: the session routes
    answer their owner only."""
    headers = {"Authorization": "Bearer " + dev_token(gw, user)} if user else {}
    req = urllib.request.Request(f"http://{gw.addr}{path}", headers=headers)
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)


def wait_for(fn, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def test_every_hop_over_mutual_tls(tls_stack, gw):
    sid = "tls-path"

    async def go():
        async with websockets.connect(ws_url(gw, sid, "alice")) as ws:
            await first_frame(ws)
            # Route (gateway -> router-svc), Chat (gateway -> llm-svc), the
            # knowledge tool, events (gateway -> store-svc).
            knowledge = await turn(ws, "What is Python?")
            # lookup_contextual_data: llm-svc -> store-svc (GetSession,
            # ListUserSessions) under llm-svc's own certificate.
            lookup = await turn(ws, '[[tool1:lookup_contextual_data {"session_id":"%s"}]]' % sid)
            return knowledge, lookup

    knowledge, lookup = run(go())
    assert knowledge[-1]["type"] == "done", knowledge
    assert any(f["type"] == "tool_result" and f["tool"] == "fetch_internal_knowledge"
               for f in knowledge)
    result = next(f for f in lookup if f["type"] == "tool_result")
    assert result["tool"] == "lookup_contextual_data", lookup
    assert result["result"]["current_session"]["session_id"] == sid, result
    assert lookup[-1]["type"] == "done"

    text = streamed_text(knowledge) + streamed_text(lookup)
    rows = events(tls_stack.pg, sid, lambda r: tokens_of(r) == text)
    assert tokens_of(rows) == text

    # The WebSocket closed: EndSession (gateway -> store-svc), Summarize
    # (gateway -> summary-svc), then summary-svc -> store-svc (ClaimSummary,
    # ListEvents, SaveSummary) and -> llm-svc (Complete).
    summary = wait_for(lambda: (lambda s: s if s["status"] == "done" else None)(
        get_json(gw, f"/api/sessions/{sid}/summary", "alice")), what="the summary")
    assert "Overview" in summary["summary"]
    session = get_json(gw, f"/api/sessions/{sid}", "alice")  # GetSession (gateway -> store-svc)
    assert session["user_id"] == "alice" and session["summary_status"] == "done"
    health = get_json(gw, "/api/health")
    for name in ("router-svc", "llm-svc", "store-svc", "summary-svc"):
        assert health["services"][name]["status"] == "SERVING", health

    for svc in tls_stack.services():
        log = svc.log_text()
        assert "mutual TLS" in log, svc.name
        assert "permission denied" not in log, f"{svc.name}:\n{svc.log_tail()}"


def test_services_refuse_plaintext(tls_stack):
    for svc in tls_stack.services():
        with grpc.insecure_channel(svc.addr) as ch:
            stub = pb.health_pb2_grpc.HealthStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.Check(pb.health_pb2.HealthCheckRequest(), timeout=3)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, svc.name


def test_a_gateway_with_a_certificate_of_another_ca_reaches_nothing(tls_stack):
    from certs import CA
    forged = CA("not-ours").issue("gateway", extra_ca=[tls_stack.ca])
    g = tls_stack.gateway(env={"TLS_CERT_FILE": str(forged.cert), "TLS_KEY_FILE": str(forged.key),
                               "TLS_CA_FILE": str(forged.ca)})
    try:
        health = get_json(g, "/api/health")
        for name in ("router-svc", "llm-svc", "store-svc", "summary-svc"):
            assert health["services"][name]["status"] != "SERVING", health
    finally:
        g.stop()


def test_a_gateway_with_another_callers_certificate_is_refused_per_method(tls_stack):
    """A certificate of our CA, but named llm-svc: health answers (any
    caller), OpenSession does not (gateway only): the WebSocket gets an error
    instead of a session, and store-svc logs the refusal with the caller's
    name and the method."""
    other = tls_stack.ids["llm-svc"]
    g = tls_stack.gateway(env={"TLS_CERT_FILE": str(other.cert), "TLS_KEY_FILE": str(other.key),
                               "TLS_CA_FILE": str(other.ca)})
    try:
        wait_for(lambda: get_json(g, "/api/health")["services"]["store-svc"]["status"] == "SERVING",
                 what="store-svc's health through the gateway")

        async def go():
            async with websockets.connect(ws_url(g, "tls-wrong-caller", "bob")) as ws:
                return json.loads(await asyncio.wait_for(ws.recv(), 20))

        frame = run(go())
        assert frame["type"] == "error", frame
        tls_stack.store.wait_for_log(lambda l: l.get("caller") == "llm-svc"
                                     and l.get("method") == "/convo.v1.Store/OpenSession")
    finally:
        g.stop()
