"""The gateway when a service fails: turns answered with the default route
while router-svc is down or hangs (and back to router-svc when it answers),
and memory bounded while store-svc is down (the process-wide event buffer,
sessions per user, the resume window). Every process is real (tests/harness
stack.py) except the router that never answers, a grpcio stand-in; counts
come from PostgreSQL, the gateway's /metrics and its log."""

import asyncio
import json
import threading
import time
import urllib.request
from concurrent import futures

import grpc
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from conftest import ws_url
from harness import proto_stubs
from stack import first_frame, recv, turn, stored_events as rows


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 240))


def tokens(frames):
    return [f["content"] for f in frames if f["type"] == "token"]


def system_events(got, name):
    out = []
    for _, t, c in got:
        if t == "system_event" and c.startswith("{"):
            o = json.loads(c)
            if o.get("event") == name:
                out.append(o)
    return out


def log_count(svc, text):
    return sum(1 for line in svc.log_lines() if text in line.get("message", ""))


def health(gw):
    with urllib.request.urlopen(f"http://{gw.addr}/api/health", timeout=10) as r:
        return json.load(r)


# ---------------------------------------------------------------- degraded routing


def test_router_stopped_turns_take_the_default_route_until_it_is_back(stack, tmp_path):
    """router-svc stopped: every turn is answered, with the default route of
    --default-route-config (its prompt and max_tokens reach the model), the
    done frame says degraded, a route_degraded event is stored, the metric
    counts it, and the outage is logged once; when router-svc is back, turns
    are routed by it again and the recovery is logged once."""
    conf = tmp_path / "default-route.conf"
    conf.write_text("[prompt]\nbase = Summarize the conversation so far.\n"
                    "[strategy.fast_concise]\ninstructions =\nmax_tokens = 7\n")
    gw = stack.gateway("--default-route-config", str(conf))
    session = "res-router-down"
    try:
        async def go():
            async with websockets.connect(ws_url(gw, session, "rita")) as ws:
                await first_frame(ws)
                routed = await turn(ws, "[[words:50]]")
                stack.router.stop()
                words = await turn(ws, "[[words:50]]")
                summary = await turn(ws, "hello there")
                stack.router.start()
                # The gateway's channel reconnects with a backoff (at most 2 s):
                # turns take the default route until a Route gets through.
                back = []
                for _ in range(60):
                    back.append(await turn(ws, "[[words:50]]"))
                    if "degraded" not in back[-1][-1]:
                        break
                    await asyncio.sleep(0.25)
                return routed, words, summary, back

        routed, words, summary, back = run(go())
        metrics = {"degraded": gw.metric("convo_gateway_turns_degraded_total"),
                   "done": gw.metric("convo_gateway_turns_total", strategy="fast_concise",
                                     outcome="done"),
                   "errors": gw.metric("convo_gateway_turn_errors_total")}
    finally:
        if not stack.router.running:
            stack.router.start()
        gw.stop()

    assert routed[-1]["type"] == "done" and "degraded" not in routed[-1], routed[-1]
    assert len(tokens(routed)) == 50, "router-svc's fast_concise allows 400 tokens"
    # The default route's max_tokens (7) and prompt ("Summarize...") reached
    # the model: 7 tokens cut for length, and a summary for a greeting.
    assert words[-1]["type"] == "done" and words[-1]["degraded"] is True, words[-1]
    assert words[-1]["status"] == "completed" and words[-1]["finish_reason"] == "length"
    assert len(tokens(words)) == 7
    assert summary[-1]["type"] == "done" and summary[-1]["degraded"] is True
    assert "".join(tokens(summary)).startswith("Overview"), tokens(summary)
    assert back[-1][-1]["type"] == "done" and "degraded" not in back[-1][-1], back[-1][-1]
    assert len(tokens(back[-1])) == 50
    degraded_turns = 2 + len(back) - 1

    got = rows(stack.pg, session, lambda r: len(system_events(r, "route_degraded")) ==
               degraded_turns and len(system_events(r, "route")) == 2)
    events = system_events(got, "route_degraded")
    assert len(events) == degraded_turns
    assert [e["turn_id"] for e in events] == list(range(2, 2 + degraded_turns))
    assert all(e["strategy"] == "fast_concise" and e["reason"] in ("unavailable", "outage")
               for e in events), events
    assert events[0]["reason"] == "unavailable"
    assert [e["turn_id"] for e in system_events(got, "route")] == [1, degraded_turns + 2]
    # Each route decision is stored before its answer's tokens.
    types = [(t, c) for _, t, c in got]
    first_degraded = next(i for i, (t, c) in enumerate(types) if '"route_degraded"' in c)
    assert types[first_degraded - 1][0] == "user_message"
    assert types[first_degraded + 1][0] == "ai_token"

    assert metrics == {"degraded": degraded_turns, "done": degraded_turns + 2, "errors": 0}
    assert log_count(gw, "Router.Route failed") == 1, "the outage is logged once, not per turn"
    assert log_count(gw, "router-svc routes turns again") == 1


class StandInRouter:
    """A Router that takes calls and answers none until told to (then as
    router-svc would, strategy analytical). Counts the calls it got."""

    def __init__(self):
        pb = proto_stubs()
        self.pb = pb
        self.calls = 0
        self.lock = threading.Lock()
        self.answering = threading.Event()
        outer = self

        class Servicer(pb.router_pb2_grpc.RouterServicer):
            def Route(self, request, context):
                with outer.lock:
                    outer.calls += 1
                while not outer.answering.is_set() and context.is_active():
                    time.sleep(0.02)
                params = pb.common_pb2.GenerationParams(temperature=0.2, tools_enabled=True)
                return pb.router_pb2.RouteResponse(
                    strategy=pb.router_pb2.STRATEGY_ANALYTICAL, strategy_name="analytical",
                    system_prompt="stand-in", params=params, reasons=["stand-in"])

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        pb.router_pb2_grpc.add_RouterServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def wait_calls(self, n, timeout=20):
        deadline = time.monotonic() + timeout
        while self.calls < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.calls

    def stop(self):
        self.answering.set()
        self.server.stop(0)


def test_router_hanging_past_the_timeout_then_answering(stack):
    """A router that never answers: the first turn waits --route-timeout-ms
    and takes the default route (timeout); during the outage one turn at a
    time still asks it (the probe) while the others do not wait — the
    stand-in never sees their calls (outage). When it answers again the
    probe ends the outage and turns are routed by it."""
    router = StandInRouter()
    gw = stack.gateway("--router", f"127.0.0.1:{router.port}", "--route-timeout-ms", "3000")
    try:
        async def go():
            async with websockets.connect(ws_url(gw, "res-hang-a", "hank")) as a, \
                    websockets.connect(ws_url(gw, "res-hang-b", "hana")) as b:
                await first_frame(a)
                await first_frame(b)
                first = await turn(a, "[[words:5]]")
                assert router.calls == 1
                # A's next turn probes (its Route hangs); B's, sent while it
                # does, takes the default route at once.
                await a.send(json.dumps({"message": "[[words:5]]"}))
                assert router.wait_calls(2) == 2
                skipped = await turn(b, "[[words:5]]")
                calls_during = router.calls
                probed = []
                while not probed or probed[-1]["type"] not in ("done", "error"):
                    probed.append(await recv(a))
                router.answering.set()
                recovered = await turn(a, "[[words:5]]")
                after = await turn(b, "[[words:5]]")
                return first, skipped, calls_during, probed, recovered, after

        first, skipped, calls_during, probed, recovered, after = run(go())
        metrics = {"timeout": gw.metric("convo_gateway_turns_degraded_total", reason="timeout"),
                   "outage": gw.metric("convo_gateway_turns_degraded_total", reason="outage"),
                   "routed": gw.metric("convo_gateway_turns_total", strategy="analytical",
                                       outcome="done")}
        body = health(gw)["gateway"]
    finally:
        gw.stop()
        router.stop()

    for frames in (first, skipped, probed):
        assert frames[-1]["type"] == "done" and frames[-1]["degraded"] is True, frames[-1]
        assert len(tokens(frames)) == 5
    assert calls_during == 2, "B's turn did not ask the router during the outage"
    for frames in (recovered, after):
        assert frames[-1]["type"] == "done" and "degraded" not in frames[-1], frames[-1]
    assert router.calls == 4

    a_events = rows(stack.pg, "res-hang-a", lambda r: len(system_events(r, "route")) == 1)
    b_events = rows(stack.pg, "res-hang-b", lambda r: len(system_events(r, "route")) == 1)
    assert [e["reason"] for e in system_events(a_events, "route_degraded")] == ["timeout",
                                                                                "timeout"]
    assert [e["reason"] for e in system_events(b_events, "route_degraded")] == ["outage"]
    assert [e["strategy"] for e in system_events(a_events, "route")] == ["analytical"]
    assert metrics == {"timeout": 2, "outage": 1, "routed": 2}
    assert log_count(gw, "Router.Route failed") == 1
    assert log_count(gw, "router-svc routes turns again") == 1
    assert body["routing"] == "router" and body["turns_degraded"] == 3


# ---------------------------------------------------------------- memory bounds


def test_store_down_with_many_sessions_talking_stops_taking_messages_at_the_bound(stack):
    """store-svc stopped while 8 sessions talk: the events they were shown
    pile up until --event-buffer-total-bytes, then every session's new
    messages are refused (store_backlog) and the pile stops growing; nothing
    is dropped, and once store-svc is back every token shown is stored and
    messages are taken again. The bound and its end are logged once each."""
    cap = 200_000
    words = 300
    n = 8
    gw = stack.gateway("--event-buffer-total-bytes", str(cap), "--rate-limit", "6000")
    ids = [f"res-backlog-{i}" for i in range(n)]
    try:
        async def go():
            conns = [await websockets.connect(ws_url(gw, sid, f"user-backlog-{i}"))
                     for i, sid in enumerate(ids)]
            shown = {sid: [] for sid in ids}
            refused = {sid: 0 for sid in ids}
            try:
                for ws in conns:
                    await first_frame(ws)
                stack.store.kill()

                async def talk(sid, ws):
                    for _ in range(40):
                        frames = await turn(ws, f"[[words:{words}]]")
                        shown[sid] += tokens(frames)
                        if frames[-1]["type"] == "error":
                            assert frames[-1]["code"] == "store_backlog", frames[-1]
                            refused[sid] += 1
                            return
                        assert frames[-1]["type"] == "done", frames[-1]

                await asyncio.gather(*(talk(sid, ws) for sid, ws in zip(ids, conns)))
                at_bound = gw.metric("convo_gateway_events_buffered_bytes")
                # More messages change nothing: refused, nothing grows.
                for sid, ws in zip(ids, conns):
                    frames = await turn(ws, f"[[words:{words}]]")
                    assert frames[-1]["type"] == "error" and \
                        frames[-1]["code"] == "store_backlog", frames[-1]
                    refused[sid] += 1
                still = gw.metric("convo_gateway_events_buffered_bytes")
                stack.store.start()
                deadline = time.monotonic() + 60
                while gw.metric("convo_gateway_events_buffered_bytes") > 0 and \
                        time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                after = [await turn(ws, "[[words:3]]") for ws in conns]
                for sid, frames in zip(ids, after):
                    shown[sid] += tokens(frames)
                return shown, refused, at_bound, still, after
            finally:
                for ws in conns:
                    await ws.close()

        shown, refused, at_bound, still, after = run(go())
        limited = gw.metric("convo_gateway_rate_limited_total", limit="event_buffer")
        dropped = gw.metric("convo_gateway_events_dropped_total")
    finally:
        if not stack.store.running:
            stack.store.start()
        gw.stop()

    assert all(r == 2 for r in refused.values()), refused
    # Reached, and bounded by what the answers under way added to it (one
    # per session: ~300 token events of at most ~70 bytes).
    assert cap <= at_bound <= cap + n * words * 80, at_bound
    assert still == at_bound, "refused messages added nothing"
    assert all(f[-1]["type"] == "done" for f in after), after
    assert limited == 2 * n
    assert dropped == 0
    assert log_count(gw, "reached --event-buffer-total-bytes") == 1
    assert log_count(gw, "new messages are taken again") == 1
    for sid in ids:
        got = rows(stack.pg, sid, lambda r, sid=sid: sum(t == "ai_token" for _, t, _ in r) ==
                   len(shown[sid]))
        assert [c for _, t, c in got if t == "ai_token"] == shown[sid], sid
        seqs = [s for s, _, _ in got]
        assert seqs == list(range(1, len(seqs) + 1)), "nothing lost, nothing twice"


def test_a_user_opening_more_sessions_than_allowed_is_refused(stack):
    """--max-sessions-per-user counts sessions in memory, not connections: a
    session waiting for a reconnect (--end-grace-ms) still counts, so a third
    new one is refused while two wait; resuming one of them is not new, and
    another user is not affected."""
    gw = stack.gateway("--max-sessions-per-user", "2", "--end-grace-ms", "60000")
    try:
        async def go():
            for sid in ("res-cap-1", "res-cap-2"):
                async with websockets.connect(ws_url(gw, sid, "sam")) as ws:
                    await first_frame(ws)
            async with websockets.connect(ws_url(gw, "res-cap-3", "sam")) as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    f = await recv(ws)
                    assert f["type"] == "error" and f["code"] == "too_many_sessions_user", f
                    await recv(ws)
            async with websockets.connect(ws_url(gw, "res-cap-1", "sam")) as ws:
                hello = await first_frame(ws)
                assert hello["resumed"] is True
                assert (await turn(ws, "still mine"))[-1]["type"] == "done"
            async with websockets.connect(ws_url(gw, "res-cap-4", "sue")) as ws:
                await first_frame(ws)
            return closed.value.code

        code = run(go())
        limited = gw.metric("convo_gateway_rate_limited_total", limit="sessions_per_user")
        refused = gw.metric("convo_gateway_connections_refused_total",
                            reason="too_many_sessions_user")
    finally:
        gw.stop()
    assert code == 1013
    assert limited == 1 and refused == 1


def test_a_long_session_resumed_reads_only_its_newest_events(stack):
    """A session of 60 turns (6,000+ events, three tool calls in its first
    turn) resumed with --resume-events 500: the gateway reads at most 500
    events back, yet knows the whole session's counts from the store — the
    session frame says 60 messages, and the next turn is routed as a
    tool-heavy session (the tool calls are outside the window)."""
    pb = proto_stubs()
    S = pb.store_pb2
    stub = pb.store_pb2_grpc.StoreStub(stack.store.channel())
    sid, user = "res-long", "lou"
    stub.OpenSession(S.OpenSessionRequest(session_id=sid, user_id=user), timeout=10)
    events, seq = [], 0

    def add(kind, content):
        nonlocal seq
        seq += 1
        events.append(S.Event(seq=seq, type=kind, content=content))

    for i in range(60):
        add(S.EVENT_TYPE_USER_MESSAGE, f"question {i}")
        if i == 0:
            for c in range(3):
                call = {"id": f"c{c}", "tool": "fetch_internal_knowledge",
                        "arguments": {"topic": "python"}}
                add(S.EVENT_TYPE_TOOL_CALL, json.dumps(call))
                add(S.EVENT_TYPE_TOOL_RESULT, json.dumps({"id": f"c{c}", "tool": call["tool"],
                                                          "result": {"passages": []}}))
        for t in range(100):
            add(S.EVENT_TYPE_AI_TOKEN, f"t{t} ")
    for at in range(0, len(events), 1000):
        stub.AppendEvents(S.AppendEventsRequest(session_id=sid, user_id=user,
                                                events=events[at:at + 1000]), timeout=30)

    gw = stack.gateway("--resume-events", "500")
    try:
        async def go():
            async with websockets.connect(ws_url(gw, sid, user)) as ws:
                hello = await first_frame(ws)
                frames = await turn(ws, "and one more")
                return hello, frames

        hello, frames = run(go())
        read = gw.metric("convo_grpc_client_msgs_received_total", grpc_method="ListEvents")
    finally:
        gw.stop()
    assert hello["resumed"] is True and hello["history_loaded"] is True
    assert hello["message_count"] == 60, hello
    assert 0 < read <= 500, f"{read} events read back"
    assert frames[-1]["type"] == "done"
    got = rows(stack.pg, sid, lambda r: len(system_events(r, "route")) == 1)
    (route,) = system_events(got, "route")
    assert route["strategy"] == "tool_heavy", route


# ---------------------------------------------------------------- the crash window


def test_store_before_send_a_killed_gateway_loses_nothing_it_showed(stack):
    """--store-before-send: a gateway killed with SIGKILL in the middle of an
    answer streamed flat out has stored every token the client saw (without
    it, the last --event-flush-ms of tokens would be lost: bench_crash.py);
    and with store-svc down nothing is shown until it is back."""
    gw = stack.gateway("--store-before-send")
    session = "res-durable"
    try:
        async def go():
            async with websockets.connect(ws_url(gw, session, "dora")) as ws:
                await first_frame(ws)
                whole = await turn(ws, "[[words:40]]")
                # store-svc down: the answer waits for it, then arrives whole.
                stack.store.kill()
                await ws.send(json.dumps({"message": "[[words:30]]"}))
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(ws.recv(), 1.5)
                stack.store.start()
                stalled = []
                while not stalled or stalled[-1]["type"] not in ("done", "error"):
                    stalled.append(await recv(ws))
                # (router-svc's fast_concise allows 400 tokens.)
                await ws.send(json.dumps({"message": "[[words:400]]"}))
                shown = 0
                while shown < 300:
                    if (await recv(ws))["type"] == "token":
                        shown += 1
                gw.kill()
                try:
                    while True:
                        if (await recv(ws))["type"] == "token":
                            shown += 1
                except (ConnectionClosed, asyncio.TimeoutError):
                    pass
                return whole, stalled, shown

        whole, stalled, shown = run(go())
    finally:
        if not stack.store.running:
            stack.store.start()
        if gw.running:
            gw.stop()
    assert whole[-1]["type"] == "done" and len(tokens(whole)) == 40
    assert stalled[-1]["type"] == "done" and len(tokens(stalled)) == 30, stalled
    # Every token shown is in the database (a kill may leave more stored
    # than shown: events stored whose frames had not gone out).
    got = rows(stack.pg, session, lambda r: sum(t == "ai_token" for _, t, _ in r) >= 70 + shown)
    stored = sum(t == "ai_token" for _, t, _ in got)
    assert stored >= 70 + shown, f"shown {shown} tokens of the last answer, stored {stored - 70}"
