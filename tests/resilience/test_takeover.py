"""Two gateways writing one session: a client's connection to gateway A
hangs without A noticing, the client resumes the session on gateway B, and A
goes on streaming the answer it had started and flushing its events. B
numbers its events from the store's last_seq, so A's would take the same
seqs. Writer fencing (store.proto's writer_epoch): B's OpenSession makes it
the session's writer, store-svc refuses A's next AppendEvents, and A stops
writing the session, tells its client (error `taken_over`, close 4409) and
never ends it in the store. Every event B's client saw is in PostgreSQL,
and none of A's after B took over. Real processes (tests/harness stack.py),
Python websockets clients, counts from PostgreSQL."""

import asyncio
import json
import time

import psycopg2
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from stack import Stack, first_frame, recv, turn, ws_url, stored_events as rows

SESSION = "fence-two-gateways"
USER = "fay"


def stored_all(pg, gw, session, message):
    """Waits until `message` is stored and `gw` holds no event unstored."""
    rows(pg, session, lambda r: any(c == message for _, t, c in r)
         and gw.metric("convo_gateway_events_buffered") == 0)


def session_row(pg, session):
    with psycopg2.connect(pg.url) as conn, conn.cursor() as cur:
        cur.execute("SELECT end_time, writer_epoch FROM sessions WHERE session_id = %s",
                    (session,))
        return cur.fetchone()


def system_event(content):
    if not content.startswith("{"):
        return None
    return json.loads(content).get("event")


@pytest.fixture(scope="module")
def stack():
    s = Stack(model_args=("--token-delay-ms", "0"))
    yield s
    s.stop()


def test_the_gateway_a_client_left_is_fenced_off(stack):
    a = stack.gateway()
    b = stack.gateway()
    try:
        async def go():
            one = await websockets.connect(ws_url(a, SESSION, USER))
            await first_frame(one)
            assert (await turn(one, "before the move"))[-1]["type"] == "done"
            # A long answer on A; the client "moves" to B while it streams.
            await one.send(json.dumps({"message": "[[delay:20]] [[words:300]] long on A"}))
            seen_on_a = []
            while len(seen_on_a) < 5:
                f = await recv(one)
                if f["type"] == "token":
                    seen_on_a.append(f["content"])
            # The message is stored (a hung connection would have had time).
            await asyncio.to_thread(rows, stack.pg, SESSION, lambda r: any(
                t == "user_message" and "long on A" in c for _, t, c in r))
            async with websockets.connect(ws_url(b, SESSION, USER)) as two:
                hello = await first_frame(two)
                assert hello["resumed"] is True
                # A learns from the store at its next flush, mid-answer.
                while True:
                    f = await recv(one)
                    if f["type"] != "token":
                        break
                assert f["type"] == "error" and f["code"] == "taken_over", f
                assert "another gateway" in f["content"]
                with pytest.raises(ConnectionClosed) as closed:
                    await recv(one)
                assert closed.value.code == 4409
                frames = await turn(two, "after the move, on B")
                assert frames[-1]["type"] == "done", frames[-1]
                b_text = "".join(f["content"] for f in frames if f["type"] == "token")
                # A never ended B's session (it is not A's to end).
                await asyncio.sleep(1.0)
                assert session_row(stack.pg, SESSION)[0] is None
                return b_text

        b_text = asyncio.run(asyncio.wait_for(go(), 120))

        got = rows(stack.pg, SESSION,
                   lambda r: any(t == "user_message" and c == "after the move, on B"
                                 for _, t, c in r)
                   and "".join(c for _, t, c in r if t == "ai_token").endswith(b_text))
        seqs = [s for s, _, _ in got]
        assert seqs == list(range(1, len(got) + 1)), "the log is whole, no seq missing"
        # B's connect and everything after it: B's events only.
        connects = [i for i, (_, t, c) in enumerate(got)
                    if t == "system_event" and system_event(c) == "connected"]
        assert len(connects) == 2, got
        after_b = got[connects[1]:]
        users = [c for _, t, c in after_b if t == "user_message"]
        assert users == ["after the move, on B"], users
        first_user = next(i for i, (_, t, _) in enumerate(after_b) if t == "user_message")
        assert not [r for r in after_b[:first_user] if r[1] == "ai_token"], \
            "no token of A's answer stored after B took the session over"
        assert "".join(c for _, t, c in after_b if t == "ai_token") == b_text
        # What A stored of its long answer came before B's connect.
        before_b = got[:connects[1]]
        assert "long on A" in [c for _, t, c in before_b if t == "user_message"][-1]

        assert a.metric("convo_gateway_sessions_taken_over_total") == 1
        assert a.metric("convo_gateway_events_dropped_total", reason="taken_over") >= 1
        assert b.metric("convo_gateway_sessions_taken_over_total") == 0
        assert stack.store.metric("convo_store_stale_writes_total") >= 1
        assert sum(1 for line in a.log_lines()
                   if "taken over by another gateway" in line.get("message", "")) == 1
    finally:
        a.stop()
        b.stop()
    # B ended the session when its client left, as its writer.
    deadline = time.monotonic() + 15
    while session_row(stack.pg, SESSION)[0] is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert session_row(stack.pg, SESSION)[0] is not None


def test_the_newest_connection_wins_when_the_client_comes_back(stack):
    """A, then B, then A again (the first connection to A still hanging
    there): A's new connection makes A the writer again, and it is B that
    is fenced off, not the newest connection."""
    a = stack.gateway()
    b = stack.gateway()
    sid = SESSION + "-back"
    try:
        async def go():
            one = await websockets.connect(ws_url(a, sid, USER))
            await first_frame(one)
            assert (await turn(one, "first on A"))[-1]["type"] == "done"
            await asyncio.to_thread(stored_all, stack.pg, a, sid, "first on A")
            two = await websockets.connect(ws_url(b, sid, USER))
            assert (await first_frame(two))["resumed"] is True
            frames = await turn(two, "then on B")
            assert frames[-1]["type"] == "done"
            b_text = "".join(f["content"] for f in frames if f["type"] == "token")
            # B has stored all it had before the client moves on.
            await asyncio.to_thread(rows, stack.pg, sid, lambda r: "".join(
                c for _, t, c in r if t == "ai_token").endswith(b_text)
                and b.metric("convo_gateway_events_buffered") == 0)
            # Back on A: the old connection there is taken over at once.
            three = await websockets.connect(ws_url(a, sid, USER))
            assert (await first_frame(three))["resumed"] is True
            f = await recv(one)
            assert f["code"] == "taken_over" and "newer connection" in f["content"], f
            # The newest connection is answered and stored...
            frames = await turn(three, "back on A")
            assert frames[-1]["type"] == "done", frames[-1]
            text = "".join(f["content"] for f in frames if f["type"] == "token")
            # ...and B learns at its next write that it lost the session.
            await two.send(json.dumps({"message": "B again"}))
            while True:
                f = await recv(two)
                if f["type"] == "error":
                    break
            assert f["code"] == "taken_over" and "another gateway" in f["content"], f
            with pytest.raises(ConnectionClosed) as closed:
                await recv(two)
            assert closed.value.code == 4409
            await three.close()
            return text

        text = asyncio.run(asyncio.wait_for(go(), 120))
        got = rows(stack.pg, sid, lambda r: "".join(
            c for _, t, c in r if t == "ai_token").endswith(text))
        assert [s for s, _, _ in got] == list(range(1, len(got) + 1))
        users = [c for _, t, c in got if t == "user_message"]
        assert users[:3] == ["first on A", "then on B", "back on A"], users
        assert "B again" not in users
        assert a.metric("convo_gateway_sessions_taken_over_total") == 0
        assert b.metric("convo_gateway_sessions_taken_over_total") == 1
    finally:
        a.stop()
        b.stop()
