"""Distributed tracing across the whole stack, every process real: a test
collector (a small http.server in this process) receives the OTLP/HTTP JSON
every process exports. A turn sent with a traceparent on the WebSocket
handshake is found under that trace id in the log lines of every process it
touched, in the header the model endpoint received, and in spans whose
parent links form one tree per turn rooted at the given parent (routing,
the model call with its rounds, tools and first byte, the event writes and
the database work behind them). A malformed traceparent gives a fresh valid
trace, never an error; REST requests are traced too. A collector that never
answers, or is down, leaves every turn unaffected: spans are dropped and
counted in /metrics, and no session or user id ever becomes a label value."""

import asyncio
import http.server
import json
import re
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import websockets

from harness import free_port
from stack import Stack, dev_token, recv, turn, ws_url

TIMEOUT = 30
STATE = "vendor=abc,other=1"
MARK = "tracemark"  # in every session and user id, never in a label value


# ---- the collector --------------------------------------------------------

class Collector:
    """An OTLP/HTTP JSON receiver: POST /v1/traces, answered 200 {}."""

    def __init__(self):
        self.spans = []  # (service.name, resource attributes, span)
        self.headers = []
        self.lock = threading.Lock()
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != "/v1/traces" or \
                        self.headers.get("Content-Type") != "application/json":
                    self.send_response(404)
                    self.end_headers()
                    return
                req = json.loads(body)
                with collector.lock:
                    collector.headers.append(dict(self.headers))
                    for rs in req["resourceSpans"]:
                        attrs = {a["key"]: a["value"].get("stringValue")
                                 for a in rs["resource"]["attributes"]}
                        for ss in rs["scopeSpans"]:
                            for sp in ss["spans"]:
                                collector.spans.append((attrs["service.name"], attrs, sp))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of_trace(self, trace_id):
        with self.lock:
            return [(svc, sp) for svc, _, sp in self.spans if sp["traceId"] == trace_id]

    def wait(self, trace_id, want, timeout=TIMEOUT):
        """The spans of a trace once want(spans) holds."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.of_trace(trace_id)
            if want(spans) or time.monotonic() > deadline:
                return spans
            time.sleep(0.2)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# ---- helpers --------------------------------------------------------------

def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def conversation(gw, session, user, messages, headers=()):
    """Connects with `headers` on the handshake and runs one turn per message."""
    out = []
    async with websockets.connect(ws_url(gw, session, user), extra_headers=list(headers)) as ws:
        assert (await recv(ws))["type"] == "session"
        for m in messages:
            out.append(await turn(ws, m))
    return out


def new_ids():
    return secrets.token_hex(16), secrets.token_hex(8)


def attr(span, key):
    for a in span.get("attributes", []):
        if a["key"] == key:
            v = a["value"]
            return v.get("stringValue", v.get("intValue", v.get("boolValue")))
    return None


def children(spans, span_id):
    return [(svc, sp) for svc, sp in spans if sp.get("parentSpanId") == span_id]


def subtree(spans, span_id):
    """Every span under span_id (not itself)."""
    out, todo = [], [span_id]
    while todo:
        kids = children(spans, todo.pop())
        out += kids
        todo += [sp["spanId"] for _, sp in kids]
    return out


def named(spans, name, service=None):
    return [sp for svc, sp in spans if sp["name"] == name and (service is None or svc == service)]


def log_lines(svc):
    return [line for line in svc.log_lines() if "_raw" not in line]


def metric_labels(svc):
    return [(name, labels) for name, labels, _ in svc.samples()]


# ---- a traced conversation ------------------------------------------------

@pytest.fixture(scope="module")
def traced():
    """The stack exporting to the collector each 100 ms, every process
    logging at debug so that each writes lines during a turn."""
    collector = Collector()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "100",
           "OTEL_EXPORTER_OTLP_HEADERS": "x-collector-key=se%20cret", "LOG_LEVEL": "debug"}
    with Stack(env=env) as s:
        gw = s.gateway("--rate-limit", "6000", "--rest-rate-per-ip", "1000")
        yield s, gw, collector
        gw.stop()
    collector.stop()


def test_a_turn_is_one_tree_under_the_handshakes_traceparent(traced):
    s, gw, collector = traced
    trace_id, parent = new_ids()
    session, user = f"{MARK}-s1", f"{MARK}-u1"
    headers = [("traceparent", f"00-{trace_id}-{parent}-01"), ("tracestate", STATE)]
    turns = run(conversation(gw, session, user, [
        "What is Python?",
        '[[tool1:lookup_contextual_data {"session_id":"%s"}]] context please' % session,
    ], headers))
    for frames in turns:
        assert frames[-1]["type"] == "done", frames
    assert any(f["type"] == "tool_call" for f in turns[0])
    assert any(f["type"] == "tool_call" and f["tool"] == "lookup_contextual_data"
               for f in turns[1])

    # Every process exports on its own schedule (and at a low priority): wait
    # for the spans of each before looking at the tree.
    want = {("gateway", "chat turn"): 2, ("gateway", "convo.v1.Router/Route"): 2,
            ("router-svc", "convo.v1.Router/Route"): 2, ("gateway", "convo.v1.Llm/Chat"): 2,
            ("llm-svc", "convo.v1.Llm/Chat"): 2, ("llm-svc", "chat round"): 4,
            ("llm-svc", "POST chat/completions"): 4,
            ("llm-svc", "execute_tool fetch_internal_knowledge"): 1,
            ("llm-svc", "execute_tool lookup_contextual_data"): 1,
            ("llm-svc", "convo.v1.Store/GetSession"): 1, ("store-svc", "db GetSession"): 1,
            ("store-svc", "db ListUserSessions"): 1, ("store-svc", "db AppendEvents"): 1}

    def complete(spans):
        got = {}
        for svc, sp in spans:
            got[svc, sp["name"]] = got.get((svc, sp["name"]), 0) + 1
        return all(got.get(k, 0) >= n for k, n in want.items())

    spans = collector.wait(trace_id, complete)
    assert complete(spans), sorted(sp["name"] for _, sp in spans)
    ids = {sp["spanId"] for _, sp in spans}
    assert len(ids) == len(spans), "span ids are unique"

    # One tree: every parent is a span of the trace or the client's span,
    # and every chain ends at the client's span.
    by_id = {sp["spanId"]: sp for _, sp in spans}
    for _, sp in spans:
        assert sp.get("parentSpanId") in ids | {parent}, sp
        seen, cur = set(), sp
        while cur.get("parentSpanId") != parent:
            assert cur["spanId"] not in seen, "a cycle"
            seen.add(cur["spanId"])
            cur = by_id[cur["parentSpanId"]]
    roots = children(spans, parent)
    assert sorted(sp["name"] for _, sp in roots) == sorted(
        ["chat turn", "chat turn", "GET /ws/session/{session_id}"])
    assert all(svc == "gateway" and sp["kind"] == 2 for svc, sp in roots)

    turn_spans = sorted(named(roots, "chat turn"), key=lambda sp: int(attr(sp, "convo.turn_id")))
    for i, t in enumerate(turn_spans):
        assert t.get("traceState") == STATE
        assert attr(t, "convo.session_id") == session and attr(t, "convo.outcome") == "done"
        assert "first_token" in [e["name"] for e in t.get("events", [])]
        tree = subtree(spans, t["spanId"])
        # Routing: the gateway's client span, router-svc's server span under it.
        route = named(tree, "convo.v1.Router/Route", "gateway")
        assert len(route) == 1 and route[0]["parentSpanId"] == t["spanId"]
        assert [sp["kind"] for sp in named(children(spans, route[0]["spanId"]),
                                           "convo.v1.Router/Route", "router-svc")] == [2]
        # The model call: Chat in both processes, a span per round, the model
        # request with its first byte, the tool.
        chat = named(tree, "convo.v1.Llm/Chat", "gateway")
        assert len(chat) == 1 and chat[0]["parentSpanId"] == t["spanId"]
        served = named(children(spans, chat[0]["spanId"]), "convo.v1.Llm/Chat", "llm-svc")
        assert len(served) == 1
        rounds = named(children(spans, served[0]["spanId"]), "chat round", "llm-svc")
        assert sorted(int(attr(r, "convo.round")) for r in rounds) == [1, 2]
        for r in rounds:
            upstream = named(children(spans, r["spanId"]), "POST chat/completions", "llm-svc")
            assert len(upstream) == 1 and upstream[0]["kind"] == 3
            assert "first_byte" in [e["name"] for e in upstream[0].get("events", [])]
            assert attr(upstream[0], "http.response.status_code") == "200"
        tool = "fetch_internal_knowledge" if i == 0 else "lookup_contextual_data"
        first = next(r for r in rounds if attr(r, "convo.round") == "1")
        tools = named(children(spans, first["spanId"]), "execute_tool " + tool, "llm-svc")
        assert len(tools) == 1 and attr(tools[0], "gen_ai.tool.name") == tool
        if i == 1:
            # The tool's calls to store-svc, and its database work.
            for method in ("GetSession", "ListUserSessions"):
                calls = named(children(spans, tools[0]["spanId"]), "convo.v1.Store/" + method,
                              "llm-svc")
                assert len(calls) == 1, method
                srv = named(children(spans, calls[0]["spanId"]), "convo.v1.Store/" + method,
                            "store-svc")
                assert len(srv) == 1
                assert named(children(spans, srv[0]["spanId"]), "db " + method, "store-svc")

    # The event writes: children of the span their first event was written
    # under (a turn, or the handshake for "connected"), linked to the rest;
    # every turn's events are written under a span that names it.
    appends = named(spans, "convo.v1.Store/AppendEvents", "gateway")
    assert appends
    named_turns = set()
    for a in appends:
        assert a["parentSpanId"] in {sp["spanId"] for _, sp in roots}
        named_turns |= {a["parentSpanId"]} | {ln["spanId"] for ln in a.get("links", [])}
        srv = named(children(spans, a["spanId"]), "convo.v1.Store/AppendEvents", "store-svc")
        assert len(srv) == 1
        db = named(children(spans, srv[0]["spanId"]), "db AppendEvents", "store-svc")
        assert len(db) == 1 and attr(db[0], "db.system") == "postgresql"
    assert {t["spanId"] for t in turn_spans} <= named_turns

    # The header the model endpoint received: this trace, from the model
    # request's span, with the tracestate carried through.
    with urllib.request.urlopen(f"http://{s.model.addr}/stats", timeout=10) as r:
        got = json.load(r)["traces"]
    received = [t for t in got if t["traceparent"].split("-")[1] == trace_id]
    requests = named(spans, "POST chat/completions", "llm-svc")
    assert sorted(t["traceparent"] for t in received) == sorted(
        f"00-{trace_id}-{sp['spanId']}-01" for sp in requests)
    assert all(t["tracestate"] == STATE for t in received)

    # The trace id on the log lines of every process the turn touched, each
    # line naming a span of the trace.
    procs = {"gateway": gw, "router-svc": s.router, "llm-svc": s.llm, "store-svc": s.store,
             "offline-model": s.model}
    for name, svc in procs.items():
        lines = [ln for ln in log_lines(svc) if ln.get("trace_id") == trace_id]
        assert lines, f"{name} wrote no line of the trace"
        for ln in lines:
            assert ln.get("span_id") in ids, (name, ln)

    # What the collector was sent: every process as itself, the headers asked for.
    services = {svc for svc, _ in spans}
    assert services == {"gateway", "router-svc", "llm-svc", "store-svc"}
    with collector.lock:
        assert all(h.get("x-collector-key") == "se cret" for h in collector.headers)
        instances = {(svc, a.get("service.instance.id")) for svc, a, _ in collector.spans}
    assert all(re.fullmatch(r"[0-9a-f-]{36}", i) for _, i in instances)


def test_a_malformed_traceparent_starts_a_fresh_trace(traced):
    s, gw, collector = traced
    trace_id, parent = new_ids()
    bad = [
        f"00-{trace_id.upper()}-{parent}-01",
        f"01-{trace_id}-{parent}-01",
        f"00-{'0' * 32}-{parent}-01",
        f"00-{trace_id}-{parent}-1",
        "garbage",
    ]
    for i, tp in enumerate(bad):
        session = f"{MARK}-bad{i}"
        frames = run(conversation(gw, session, f"{MARK}-u2", ["hello [[words:3]]"],
                                  [("traceparent", tp), ("tracestate", STATE)]))[0]
        assert frames[-1]["type"] == "done", (tp, frames)

        def mine():
            with collector.lock:
                return [sp for svc, _, sp in collector.spans
                        if sp["name"] == "chat turn" and attr(sp, "convo.session_id") == session]

        deadline = time.monotonic() + TIMEOUT
        while not mine() and time.monotonic() < deadline:
            time.sleep(0.2)
        spans = mine()
        assert len(spans) == 1, tp
        t = spans[0]
        assert "parentSpanId" not in t and "traceState" not in t, (tp, t)
        assert re.fullmatch(r"[0-9a-f]{32}", t["traceId"]) and t["traceId"] != "0" * 32
        assert t["traceId"] != trace_id
        lines = [ln for ln in log_lines(s.router) if ln.get("trace_id") == t["traceId"]]
        assert lines, "router-svc logged the fresh trace"


def test_rest_requests_are_traced(traced):
    s, gw, collector = traced
    session, user = f"{MARK}-rest", f"{MARK}-u3"
    run(conversation(gw, session, user, ["hi [[words:2]]"]))
    trace_id, parent = new_ids()
    req = urllib.request.Request(
        f"http://{gw.addr}/api/sessions/{session}",
        headers={"Authorization": "Bearer " + dev_token(gw, user),
                 "traceparent": f"00-{trace_id}-{parent}-01", "tracestate": STATE})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200

    def complete(spans):
        got = {(svc, sp["name"]) for svc, sp in spans}
        return {("gateway", "GET /api/sessions/{id}"), ("gateway", "convo.v1.Store/GetSession"),
                ("store-svc", "convo.v1.Store/GetSession"), ("store-svc", "db GetSession")} <= got

    spans = collector.wait(trace_id, complete)
    assert complete(spans), spans
    root = named(spans, "GET /api/sessions/{id}", "gateway")
    assert len(root) == 1 and root[0]["parentSpanId"] == parent and root[0]["kind"] == 2
    assert attr(root[0], "http.response.status_code") == "200"
    assert root[0].get("traceState") == STATE
    call = named(children(spans, root[0]["spanId"]), "convo.v1.Store/GetSession", "gateway")
    assert len(call) == 1
    assert named(children(spans, call[0]["spanId"]), "convo.v1.Store/GetSession", "store-svc")
    # A refused request is traced as what it was.
    trace_id, parent = new_ids()
    req = urllib.request.Request(f"http://{gw.addr}/api/sessions/{session}",
                                 headers={"traceparent": f"00-{trace_id}-{parent}-01"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 401
    spans = collector.wait(trace_id, lambda sp: len(sp) >= 1)
    assert [attr(sp, "http.response.status_code") for _, sp in spans] == ["401"]


def test_no_id_is_a_label_value(traced):
    s, gw, _ = traced
    for svc in (gw, s.router, s.llm, s.store, s.summary):
        for name, labels in metric_labels(svc):
            for v in labels.values():
                assert MARK not in v, (name, labels)
        names = {name for name, _ in metric_labels(svc)}
        assert "convo_trace_spans_exported_total" in names
        assert svc.metric("convo_trace_spans_exported_total") > 0 or svc is s.summary


# ---- a collector that never answers, or is down -------------------------------

def silent_listener():
    """A port that takes connections and never answers them."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


def test_a_silent_or_missing_collector_never_touches_a_turn():
    silent = silent_listener()
    down = free_port()  # nothing listens there
    bounds = {"OTEL_BSP_MAX_QUEUE_SIZE": "4", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2",
              "OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_BSP_EXPORT_TIMEOUT": "1000"}
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{down}", "LOG_LEVEL": "debug", **bounds}
    with Stack(env=env) as s:
        gw = s.gateway("--rate-limit", "6000", env={
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT":
                "http://127.0.0.1:%d/v1/traces" % silent.getsockname()[1]})
        session, user = f"{MARK}-quiet", f"{MARK}-u4"
        turns = run(conversation(gw, session, user, ["[[words:20]]"] * 6))
        for frames in turns:
            assert frames[-1]["type"] == "done", frames
            assert sum(1 for f in frames if f["type"] == "token") == 20

        def settled(svc):
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                if svc.metric("convo_trace_export_failures_total") >= 1 and \
                        svc.metric("convo_trace_spans_dropped_total") >= 1:
                    break
                time.sleep(0.2)
            return svc

        for svc in (settled(gw), settled(s.llm), settled(s.router), settled(s.store)):
            assert svc.metric("convo_trace_export_failures_total") >= 1, svc.name
            assert svc.metric("convo_trace_spans_dropped_total") >= 1, svc.name
            assert svc.metric("convo_trace_spans_exported_total") == 0, svc.name
            for name, labels in metric_labels(svc):
                assert all(MARK not in v for v in labels.values()), (name, labels)
        # The queue is bounded: what did not fit was dropped at once.
        assert gw.metric("convo_trace_spans_dropped_total", reason="queue_full") >= 1
        # Log lines still carry trace ids.
        assert any(ln.get("trace_id") for ln in log_lines(s.router))
        # Each process stops in time, its last flush bounded by the export timeout.
        assert gw.stop() == 0
    silent.close()
