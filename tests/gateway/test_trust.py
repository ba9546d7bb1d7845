"""Trust at the edge, from the attacker's side: who may call (tokens made by
python3-jwt for --auth jwt, by the gateway for --auth dev), whose sessions
they reach, from which origins, how much they may use, and the holes found
in the seed gateway (each test here fails on it). Every process is real:
PostgreSQL, the services, the offline model, a gateway per configuration."""

import asyncio
import base64
import http.client
import json
import os
import socket
import struct
import tempfile
import time
import urllib.parse

import jwt
import psycopg2
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatusCode

from conftest import dev_token, ws_url
from harness import Service, free_port
from test_gateway_e2e import TIMEOUT, first_frame, recv, run, turn  # one WebSocket client

SECRET = b"a test secret of the jwt mode, 32+ bytes long"


async def closed_with(ws):
    """The error frame before the close, and the close code."""
    frame = await recv(ws)
    assert frame["type"] == "error", frame
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await recv(ws)
    return frame, closed.value.code


def request(gw, method, path, token=None, headers=None, body=None):
    """(status, headers as a dict of lower-case names, JSON body or text)."""
    conn = http.client.HTTPConnection(gw.host, gw.port, timeout=TIMEOUT)
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    if data is not None:
        h.setdefault("Content-Type", "application/json")
    conn.request(method, path, body=data, headers=h)
    r = conn.getresponse()
    raw = r.read().decode()
    hdrs = {k.lower(): v for k, v in r.getheaders()}
    conn.close()
    try:
        return r.status, hdrs, json.loads(raw)
    except ValueError:
        return r.status, hdrs, raw


def raw_exchange(gw, data, wait=3.0):
    """Sends raw bytes, returns everything read until the server closes (or
    `wait` seconds of silence)."""
    with socket.create_connection((gw.host, gw.port), timeout=wait) as s:
        s.sendall(data)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except socket.timeout:
            pass
    return out


def hs256(user, secret=SECRET, **claims):
    now = int(time.time())
    c = {"sub": user, "iat": now, "exp": now + 600}
    c.update(claims)
    return jwt.encode(c, secret, algorithm="HS256")


@pytest.fixture(scope="module")
def jwt_gateway(stack, tmp_path_factory):
    secret = tmp_path_factory.mktemp("jwt") / "secret"
    secret.write_bytes(SECRET)
    gw = stack.gateway("--jwt-secret-file", str(secret), "--jwt-audience", "authenticated",
                       "--rest-rate-per-ip", "1000", "--rate-limit", "6000", auth="jwt")
    yield gw
    gw.stop()


def jwt_token(user, **claims):
    return hs256(user, aud="authenticated", **claims)


def jwt_ws(gw, session, user=None, token=None, **args):
    query = dict(args)
    if token is not None:
        query["access_token"] = token
    if user is not None:
        query["user_id"] = user
    return f"ws://{gw.addr}/ws/session/{session}" + (
        "?" + urllib.parse.urlencode(query) if query else "")


def handshake_status(url, headers=None):
    """The HTTP status a refused WebSocket handshake got."""
    async def go():
        with pytest.raises(InvalidStatusCode) as e:
            async with websockets.connect(url, extra_headers=headers or {}):
                pass
        return e.value.status_code, e.value.headers

    return run(go())


def converse(url, message="hello", headers=None):
    async def go():
        async with websockets.connect(url, extra_headers=headers or {}) as ws:
            hello = await first_frame(ws)
            frames = await turn(ws, message)
            return hello, frames

    return run(go())


def ended(pg, session, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with psycopg2.connect(pg.url) as conn, conn.cursor() as cur:
            cur.execute("SELECT end_time FROM sessions WHERE session_id = %s", (session,))
            row = cur.fetchone()
        if row and row[0] is not None:
            return
        time.sleep(0.1)
    raise AssertionError(f"session {session} was not ended")


# ---------------------------------------------------------------- WebSocket


def test_websocket_needs_a_valid_token_before_the_upgrade(jwt_gateway):
    status, headers = handshake_status(jwt_ws(jwt_gateway, "t-ws-none"))
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert handshake_status(jwt_ws(jwt_gateway, "t-ws-bad",
                                   token=hs256("alice", secret=b"x" * 40,
                                               aud="authenticated")))[0] == 401
    assert handshake_status(jwt_ws(jwt_gateway, "t-ws-exp",
                                   token=jwt_token("alice", exp=int(time.time()) - 3600)))[0] == 401
    assert handshake_status(jwt_ws(jwt_gateway, "t-ws-aud",
                                   token=hs256("alice", aud="someone-else")))[0] == 401
    # The refusal's body says why, in a code.
    key = base64.b64encode(os.urandom(16)).decode()
    raw = raw_exchange(jwt_gateway, (
        f"GET /ws/session/t-ws-raw HTTP/1.1\r\nHost: {jwt_gateway.addr}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {jwt_token('alice', exp=int(time.time()) - 3600)}\r\n\r\n"
    ).encode(), wait=2)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), raw[:200]
    assert json.loads(body)["code"] == "token_expired"


def test_websocket_user_is_the_tokens_subject(jwt_gateway):
    token = jwt_token("alice")
    hello, frames = converse(jwt_ws(jwt_gateway, "t-ws-sub", token=token))
    assert hello["user_id"] == "alice" and frames[-1]["type"] == "done"
    # The same token in the Authorization header.
    hello, _ = converse(jwt_ws(jwt_gateway, "t-ws-sub"), headers={"Authorization": f"Bearer {token}"})
    assert hello["user_id"] == "alice" and hello["resumed"] is True
    # A user_id that names someone else is refused; the token's own is fine.
    assert handshake_status(jwt_ws(jwt_gateway, "t-ws-sub", user="bob", token=token))[0] == 403
    hello, _ = converse(jwt_ws(jwt_gateway, "t-ws-sub", user="alice", token=token))
    assert hello["user_id"] == "alice"


def test_another_users_session_is_closed_with_4403_and_the_token_never_logged(stack, jwt_gateway):
    owner = jwt_token("olga")
    converse(jwt_ws(jwt_gateway, "t-ws-owned", token=owner), "mine")
    ended(stack.pg, "t-ws-owned")

    async def intruder():
        async with websockets.connect(jwt_ws(jwt_gateway, "t-ws-owned",
                                             token=jwt_token("mallory"))) as ws:
            return await closed_with(ws)

    frame, code = run(intruder())
    assert frame["code"] == "forbidden" and code == 4403
    hello, frames = converse(jwt_ws(jwt_gateway, "t-ws-owned", token=owner), "still mine")
    assert hello["resumed"] is True and frames[-1]["type"] == "done"
    log = jwt_gateway.log_text()
    assert owner not in log and owner.split(".")[2] not in log, "a token reached the log"


def test_dev_tokens_and_modes(stack, gateway):
    status, _, body = request(gateway, "POST", "/api/dev/token", body={"user_id": "dora"})
    assert status == 200 and body["token_type"] == "Bearer" and body["user_id"] == "dora"
    assert body["expires_in"] > 0
    hello, _ = converse(f"ws://{gateway.addr}/ws/session/t-dev?access_token={body['access_token']}")
    assert hello["user_id"] == "dora"
    for bad in ({"user_id": "no spaces"}, {"user_id": "x" * 129}, {"name": "dora"}, []):
        status, _, body = request(gateway, "POST", "/api/dev/token", body=bad)
        assert status == 400 and body["code"] == "invalid_user_id", (bad, body)
    # Without a token a dev gateway refuses like a jwt one.
    assert handshake_status(f"ws://{gateway.addr}/ws/session/t-dev?user_id=dora")[0] == 401


def test_dev_token_endpoint_is_404_outside_dev_mode(jwt_gateway, gateway_none):
    for gw in (jwt_gateway, gateway_none):
        status, _, body = request(gw, "POST", "/api/dev/token", body={"user_id": "dora"})
        assert status == 404 and body["code"] == "no_such_endpoint"


def test_dev_mode_refuses_a_public_address_unless_allowed(stack):
    port = free_port()
    gw = Service("gateway", args=[*stack.peers(), "--auth", "dev"], port=port, host="0.0.0.0",
                 ready=None, start=False)
    gw.start()
    assert gw._proc.wait(timeout=15) == 2
    assert "--dev-allow-remote" in gw.log_text()
    gw = Service("gateway", args=[*stack.peers(), "--auth", "dev", "--dev-allow-remote"],
                 port=free_port(), host="0.0.0.0", ready="tcp")
    try:
        assert gw.running
    finally:
        gw.stop()


def test_jwt_mode_without_a_key_source_names_dev_mode(stack):
    gw = Service("gateway", args=[*stack.peers()], ready=None)
    assert gw._proc.wait(timeout=15) == 2
    assert "--auth dev" in gw.log_text()


def test_none_mode_warns_and_trusts_user_id(gateway_none):
    assert any("--auth none" in line.get("message", "") and line.get("level") == "warn"
               for line in gateway_none.log_lines())
    hello, frames = converse(ws_url(gateway_none, "t-none", "nora"))
    assert hello["user_id"] == "nora" and frames[-1]["type"] == "done"


# ---------------------------------------------------------------- REST


def test_every_session_route_needs_a_token_and_answers_only_the_owner(stack, jwt_gateway):
    owner, other = jwt_token("rita"), jwt_token("sam")
    converse(jwt_ws(jwt_gateway, "t-rest-own", token=owner), "What is Python?")
    ended(stack.pg, "t-rest-own")
    routes = ["/api/sessions/t-rest-own", "/api/sessions/t-rest-own/summary",
              "/api/sessions/t-rest-own/events"]
    missing = ["/api/sessions/t-rest-none", "/api/sessions/t-rest-none/summary",
               "/api/sessions/t-rest-none/events"]
    for path in routes + ["/api/sessions"]:
        status, headers, body = request(jwt_gateway, "GET", path)
        assert status == 401 and headers["www-authenticate"] == "Bearer", path
        assert body["code"] == "missing_token" and body["request_id"], body
        status, _, body = request(jwt_gateway, "GET", path, token="not.a.token")
        assert status == 401 and body["code"] == "malformed_token", body
    for path, gone in zip(routes, missing):
        status, _, body = request(jwt_gateway, "GET", path, token=other)
        status2, _, body2 = request(jwt_gateway, "GET", gone, token=other)
        assert status == status2 == 404, (path, body)
        # Never revealing existence: the same answer as a missing session.
        assert {k: v for k, v in body.items() if k != "request_id"} == \
               {k: v for k, v in body2.items() if k != "request_id"}
        status, _, body = request(jwt_gateway, "GET", path, token=owner)
        assert status == 200, (path, body)
    status, _, body = request(jwt_gateway, "GET", "/api/sessions", token=other)
    assert status == 200 and body["sessions"] == []
    status, _, body = request(jwt_gateway, "GET", "/api/sessions", token=owner)
    assert [s["session_id"] for s in body["sessions"]] == ["t-rest-own"]


def test_session_list_is_newest_first_and_paged(stack, gateway):
    user = "paula"
    token = dev_token(gateway, user)
    ids = [f"t-list-{i}" for i in range(5)]
    for sid in ids:
        converse(ws_url(gateway, sid, user), "hi")
    converse(ws_url(gateway, "t-list-other", "quinn"), "hi")
    seen, before = [], None
    while True:
        path = "/api/sessions?limit=2" + (f"&before={urllib.parse.quote(before)}" if before else "")
        status, _, body = request(gateway, "GET", path, token=token)
        assert status == 200 and len(body["sessions"]) <= 2, body
        seen += [s["session_id"] for s in body["sessions"]]
        assert all(s["user_id"] == user for s in body["sessions"])
        before = body["next_before"]
        if before is None:
            break
    assert seen == list(reversed(ids))
    for bad in ("limit=0", "limit=101", "limit=x", "before=nonsense", "before=12.bad%20id"):
        status, _, body = request(gateway, "GET", f"/api/sessions?{bad}", token=token)
        assert status == 400, (bad, body)


def test_events_are_paged_by_seq_and_match_the_database(stack, gateway):
    user = "ella"
    token = dev_token(gateway, user)
    converse(ws_url(gateway, "t-events", user), "What is Python?")
    ended(stack.pg, "t-events")
    with psycopg2.connect(stack.pg.url) as conn, conn.cursor() as cur:
        cur.execute("SELECT seq, event_type, content FROM session_events WHERE session_id = %s "
                    "ORDER BY seq", ("t-events",))
        rows = cur.fetchall()
    got, after = [], 0
    while after is not None:
        status, _, body = request(gateway, "GET",
                                  f"/api/sessions/t-events/events?after_seq={after}&limit=7",
                                  token=token)
        assert status == 200 and len(body["events"]) <= 7, body
        got += [(e["seq"], e["type"], e["content"]) for e in body["events"]]
        after = body["next_after_seq"]
    assert got == [tuple(r) for r in rows]
    status, _, body = request(gateway, "GET", "/api/sessions/t-events/events?limit=5000",
                              token=token)
    assert status == 400


def test_health_shows_addresses_only_with_a_token(stack, jwt_gateway):
    status, _, body = request(jwt_gateway, "GET", "/api/health")
    assert status == 200 and body["services"]["store-svc"]["status"] == "SERVING"
    text = json.dumps(body)
    assert "address" not in text and stack.store.addr not in text
    status, _, body = request(jwt_gateway, "GET", "/api/health", token=jwt_token("hal"))
    assert body["services"]["store-svc"]["address"] == stack.store.addr


def readyz_until(gw, want, timeout=20):
    """/readyz until it answers `want` (a fresh gateway connects its
    channels first; a killed service is noticed at the next check)."""
    deadline = time.monotonic() + timeout
    while True:
        status, _, body = request(gw, "GET", "/readyz")
        if status == want or time.monotonic() > deadline:
            return status, body
        time.sleep(0.2)


def test_healthz_and_readyz(stack):
    gw = stack.gateway()
    try:
        assert request(gw, "GET", "/healthz")[0] == 200
        status, body = readyz_until(gw, 200)
        assert status == 200 and body["status"] == "ready", body
        # Without router-svc turns take the default route: still ready (a
        # router outage must not take every gateway out of its Service).
        stack.router.kill()
        deadline = time.monotonic() + 20
        while True:
            status, _, body = request(gw, "GET", "/readyz")
            if body["services"]["router-svc"]["status"] == "UNREACHABLE" or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert body["services"]["router-svc"]["status"] == "UNREACHABLE", body
        assert status == 200 and body["status"] == "ready", body
        # Without llm-svc nothing can be answered: not ready.
        stack.llm.kill()
        status, body = readyz_until(gw, 503)
        assert status == 503 and body["status"] == "not_ready", body
        assert body["services"]["llm-svc"]["status"] == "UNREACHABLE"
        assert "address" not in json.dumps(body)
        assert request(gw, "GET", "/healthz")[0] == 200, "alive all the same"
    finally:
        stack.router.start()
        stack.llm.start()
        gw.stop()


# ---------------------------------------------------------------- ownership while the store is down


def test_store_down_refuses_what_it_cannot_verify_and_never_claims_it(stack, gateway):
    converse(ws_url(gateway, "t-store-own", "alma"), "mine")
    ended(stack.pg, "t-store-own")
    stack.store.kill()
    try:
        async def try_open(session, user):
            async with websockets.connect(ws_url(gateway, session, user)) as ws:
                return await closed_with(ws)

        frame, code = run(try_open("t-store-own", "mallory"))
        assert frame["code"] == "store_unavailable" and code == 1013
        frame, code = run(try_open("t-store-new", "alma"))
        assert frame["code"] == "store_unavailable" and code == 1013
    finally:
        stack.store.start()
    # The owner was never locked out: the claim was not kept. (1013 says try
    # again: the gateway's channel may still be reconnecting to the store.)
    async def owner_back():
        deadline = time.monotonic() + 30
        while True:
            async with websockets.connect(ws_url(gateway, "t-store-own", "alma")) as ws:
                f = await recv(ws)
                if f["type"] == "session":
                    return f, await turn(ws, "back")
                assert f["code"] == "store_unavailable", f
            assert time.monotonic() < deadline, "store-svc never came back"
            await asyncio.sleep(0.5)

    hello, frames = run(owner_back())
    assert hello["resumed"] is True and frames[-1]["type"] == "done"


# ---------------------------------------------------------------- origins


def test_origins(stack):
    gw = stack.gateway("--allowed-origins", "https://app.example, http://localhost:3000")
    try:
        token = dev_token(gw, "otto")
        url = ws_url(gw, "t-origin", "otto")
        assert handshake_status(url, {"Origin": "https://evil.example"})[0] == 403
        assert handshake_status(url, {"Origin": "https://app.example.evil.example"})[0] == 403
        for origin in ("https://app.example", "http://localhost:3000", f"http://{gw.addr}"):
            hello, _ = converse(url, headers={"Origin": origin})
            assert hello["user_id"] == "otto"
        converse(url)  # no Origin: not a browser, nothing to check
        status, headers, _ = request(gw, "GET", "/api/sessions", token=token,
                                     headers={"Origin": "https://app.example"})
        assert status == 200 and headers["access-control-allow-origin"] == "https://app.example"
        assert "origin" in headers["vary"].lower()
        status, headers, body = request(gw, "GET", "/api/sessions", token=token,
                                        headers={"Origin": "https://evil.example"})
        assert status == 403 and body["code"] == "origin_not_allowed"
        assert "access-control-allow-origin" not in headers
        status, headers, _ = request(gw, "OPTIONS", "/api/sessions",
                                     headers={"Origin": "https://app.example",
                                              "Access-Control-Request-Method": "GET",
                                              "Access-Control-Request-Headers": "authorization"})
        assert status == 204 and headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in headers["access-control-allow-headers"].lower()
        status, headers, _ = request(gw, "GET", "/api/health")
        assert "access-control-allow-origin" not in headers, "never *"
    finally:
        gw.stop()


def test_the_seeds_page_opened_from_a_file_works_in_none_mode_when_null_is_allowed(stack,
                                                                                  gateway_none):
    """The seed's frontend/index.html is opened from disk: browsers send
    Origin: null. Refused by default, served once listed."""
    url = ws_url(gateway_none, "t-null-origin", "user1")
    assert handshake_status(url, {"Origin": "null"})[0] == 403
    gw = stack.gateway("--allowed-origins", "null", auth="none")
    try:
        hello, frames = converse(ws_url(gw, "t-null-origin", "user1"), headers={"Origin": "null"})
        assert hello["user_id"] == "user1" and frames[-1]["type"] == "done"
        status, headers, body = request(gw, "GET", "/api/sessions/t-null-origin/summary",
                                        headers={"Origin": "null"})
        assert status == 200 and headers["access-control-allow-origin"] == "null", body
    finally:
        gw.stop()


def test_star_is_never_an_allowed_origin(stack):
    gw = Service("gateway", args=[*stack.peers(), "--auth", "dev", "--allowed-origins", "*"],
                 ready=None)
    assert gw._proc.wait(timeout=15) == 2
    assert "--allowed-origins" in gw.log_text()


# ---------------------------------------------------------------- limits


async def open_ws(url):
    ws = await websockets.connect(url)
    return ws


def test_connections_per_address_and_per_user(stack):
    gw = stack.gateway("--max-connections-per-ip", "3", "--max-connections-per-user", "2")
    try:
        async def go():
            a = await open_ws(ws_url(gw, "t-cpu-1", "cara"))
            b = await open_ws(ws_url(gw, "t-cpu-2", "cara"))
            await first_frame(a)
            await first_frame(b)
            async with websockets.connect(ws_url(gw, "t-cpu-3", "cara")) as c:
                frame, code = await closed_with(c)
                assert frame["code"] == "too_many_connections_user" and code == 1013
            d = await open_ws(ws_url(gw, "t-cpu-4", "dina"))  # the third from this address
            await first_frame(d)
            async with websockets.connect(ws_url(gw, "t-cpu-5", "erik")) as e:
                frame, code = await closed_with(e)
                assert frame["code"] == "too_many_connections_ip" and code == 1013
            await b.close()
            await asyncio.sleep(0.3)
            # Given back when a connection closes.
            b = await open_ws(ws_url(gw, "t-cpu-2", "cara"))
            await first_frame(b)
            for ws in (a, b, d):
                await ws.close()

        run(go())
        status, _, body = request(gw, "GET", "/api/health")
        refused = body["gateway"]["limits_refused"]
        assert refused["connections_per_user"] == 1 and refused["connections_per_ip"] == 1
        # The same refusals in /metrics, by limit and by the close's code.
        assert gw.metric("convo_gateway_rate_limited_total", limit="connections_per_user") == 1
        assert gw.metric("convo_gateway_rate_limited_total", limit="connections_per_ip") == 1
        assert gw.metric("convo_gateway_connections_refused_total",
                         reason="too_many_connections_user") == 1
    finally:
        gw.stop()


def test_client_address_behind_a_trusted_proxy(stack):
    """With --trusted-proxies the address a proxy saw (X-Forwarded-For, read
    from the right) is the client's; without it the header is ignored."""
    async def refused_code(gw, session, user, xff):
        """None and the open connection, or the refusal's code."""
        ws = await websockets.connect(ws_url(gw, session, user),
                                      extra_headers={"X-Forwarded-For": xff})
        f = await recv(ws)
        if f["type"] == "session":
            return None, ws
        await ws.close()
        return f["code"], None

    trusting = stack.gateway("--max-connections-per-ip", "1", "--trusted-proxies", "127.0.0.0/8")
    plain = stack.gateway("--max-connections-per-ip", "1")
    try:
        async def go():
            held = []
            code, ws = await refused_code(trusting, "t-xff-1", "xa", "198.51.100.7, 203.0.113.5")
            assert code is None
            held.append(ws)
            code, ws = await refused_code(trusting, "t-xff-2", "xb", "203.0.113.6")
            assert code is None, "another client behind the proxy"
            held.append(ws)
            code, _ = await refused_code(trusting, "t-xff-3", "xc", "10.9.9.9, 203.0.113.5")
            assert code == "too_many_connections_ip"
            code, ws = await refused_code(plain, "t-xff-4", "xd", "203.0.113.5")
            assert code is None
            held.append(ws)
            code, _ = await refused_code(plain, "t-xff-5", "xe", "203.0.113.9")
            assert code == "too_many_connections_ip", "X-Forwarded-For from anyone is ignored"
            for ws in held:
                await ws.close()

        run(go())
    finally:
        trusting.stop()
        plain.stop()


def test_frames_per_user_invalid_and_cancel_frames_count_and_survive_a_reconnect(stack):
    gw = stack.gateway("--rate-limit", "6", "--rate-burst", "5")  # one every 10 s
    try:
        async def go():
            async with websockets.connect(ws_url(gw, "t-rate", "rosa")) as ws:
                await first_frame(ws)
                answers = []
                for payload in ("{not json", '{"type":"cancel"}', "{bad", '{"type":"cancel"}',
                                '{"msg":1}', '{"type":"cancel"}'):
                    await ws.send(payload)
                    answers.append((await recv(ws))["code"])
                assert answers == ["invalid_json", "no_active_turn", "invalid_json",
                                   "no_active_turn", "missing_message", "rate_limited"]
            # Another connection and another session of the same user.
            async with websockets.connect(ws_url(gw, "t-rate-2", "rosa")) as ws:
                await first_frame(ws)
                await ws.send(json.dumps({"message": "hello?"}))
                assert (await recv(ws))["code"] == "rate_limited"
            async with websockets.connect(ws_url(gw, "t-rate-3", "other-rosa")) as ws:
                await first_frame(ws)
                assert (await turn(ws, "hello"))[-1]["type"] == "done"

        run(go())
    finally:
        gw.stop()


def test_new_sessions_per_user_per_hour(stack):
    gw = stack.gateway("--sessions-per-hour", "2")
    try:
        converse(ws_url(gw, "t-sph-1", "hana"))
        converse(ws_url(gw, "t-sph-2", "hana"))
        ended(stack.pg, "t-sph-2")

        async def third(session, user):
            async with websockets.connect(ws_url(gw, session, user)) as ws:
                return await closed_with(ws)

        frame, code = run(third("t-sph-3", "hana"))
        assert frame["code"] == "too_many_sessions" and code == 1013
        # Resuming is not a new session, and other users are not affected.
        hello, _ = converse(ws_url(gw, "t-sph-1", "hana"))
        assert hello["resumed"] is True
        converse(ws_url(gw, "t-sph-4", "ines"))
        frame, code = run(third("t-sph-5", "hana"))
        assert frame["code"] == "too_many_sessions"
    finally:
        gw.stop()


def test_model_tokens_per_user_at_the_bound_and_after_a_reconnect(stack):
    limit = 1000
    gw = stack.gateway("--user-tokens-per-minute", str(limit), "--rate-limit", "6000")
    try:
        async def go():
            spent, start = 0, time.monotonic()
            async with websockets.connect(ws_url(gw, "t-tok", "tess")) as ws:
                await first_frame(ws)
                while True:
                    frames = await turn(ws, "[[words:40]] tell me more")
                    last = frames[-1]
                    refill = limit * (time.monotonic() - start) / 60
                    if last["type"] == "error":
                        assert last["code"] == "token_limit"
                        assert spent >= limit, "refused before the bound"
                        break
                    assert spent < limit + refill + 1, "allowed past the bound"
                    spent += last["usage"]["total_tokens"]
            async with websockets.connect(ws_url(gw, "t-tok-2", "tess")) as ws:
                await first_frame(ws)
                assert (await turn(ws, "again"))[-1]["code"] == "token_limit"
            return spent

        assert run(go()) >= limit
    finally:
        gw.stop()


def test_rest_requests_per_address(stack):
    # One request a second, bursts of two: the bucket is full again after the
    # start's readiness polls. What passes is bounded by the burst plus what
    # refilled while the requests ran, however slow the machine is.
    gw = stack.gateway("--rest-rate-per-ip", "1")
    try:
        time.sleep(2.5)
        token = dev_token(gw, "rest-user")  # one request
        began = time.monotonic()
        codes = [request(gw, "GET", "/api/sessions", token=token)[0] for _ in range(12)]
        refilled = int(time.monotonic() - began) + 1
        assert set(codes) <= {200, 429}, codes
        assert codes[0] == 200, codes
        assert codes.count(200) <= 1 + refilled, (codes, refilled)
        assert 429 in codes, codes
        status, headers, body = request(gw, "GET", "/api/sessions", token=token)
        assert status == 429 and body["code"] == "rate_limited" and headers["retry-after"]
        # Probes are not paced.
        assert all(request(gw, "GET", "/healthz")[0] == 200 for _ in range(20))
    finally:
        gw.stop()


# ---------------------------------------------------------------- usage


def test_done_carries_usage_and_spend_is_a_query(stack, gateway):
    user = "uma"
    totals = []

    async def go():
        async with websockets.connect(ws_url(gateway, "t-usage", user)) as ws:
            await first_frame(ws)
            for message in ("What is Python?", "And PostgreSQL?"):
                done = (await turn(ws, message))[-1]
                assert done["type"] == "done", done
                u = done["usage"]
                assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] > 0
                totals.append(u["total_tokens"])

    run(go())
    ended(stack.pg, "t-usage")
    # The README's query.
    with psycopg2.connect(stack.pg.url) as conn, conn.cursor() as cur:
        cur.execute("""
            SELECT s.user_id, sum((e.content::jsonb ->> 'total_tokens')::bigint) AS tokens
            FROM session_events e JOIN sessions s USING (session_id)
            WHERE e.event_type = 'system_event' AND e.content LIKE '{"event":"usage",%'
              AND e.timestamp > now() - interval '1 day'
            GROUP BY s.user_id""")
        spend = dict(cur.fetchall())
    assert spend[user] == sum(totals)


# ---------------------------------------------------------------- the holes


def test_escaped_nul_in_a_message_is_refused_whole(gateway):
    async def go():
        async with websockets.connect(ws_url(gateway, "t-nul", "nils")) as ws:
            await first_frame(ws)
            await ws.send('{"message":"\\u0000x"}')
            f = await recv(ws)
            assert f["type"] == "error" and f["code"] == "invalid_text", f
            assert (await turn(ws, "still here?"))[-1]["type"] == "done"

    run(go())


def test_user_id_over_the_limit_is_invalid_user_id(gateway_none):
    async def go():
        async with websockets.connect(ws_url(gateway_none, "t-long-user", "u" * 600)) as ws:
            return await closed_with(ws)

    frame, code = run(go())
    assert frame["code"] == "invalid_user_id" and code == 4400


def test_unmasked_client_frames_are_closed_with_1002(gateway):
    """RFC 6455 5.1: a server closes a connection whose client sends an
    unmasked frame. The frame is written by hand on a raw socket."""
    token = dev_token(gateway, "umberto")
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection((gateway.host, gateway.port), timeout=10) as s:
        s.sendall((f"GET /ws/session/t-unmasked?access_token={token} HTTP/1.1\r\n"
                   f"Host: {gateway.addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += s.recv(4096)
        assert buf.startswith(b"HTTP/1.1 101"), buf[:100]
        payload = json.dumps({"message": "unmasked"}).encode()
        s.sendall(bytes([0x81, len(payload)]) + payload)  # FIN text, MASK bit clear
        data = buf.partition(b"\r\n\r\n")[2]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    codes = []
    while len(data) >= 2:
        op, n = data[0] & 0x0F, data[1] & 0x7F
        at = 2
        if n == 126:
            n, at = struct.unpack(">H", data[2:4])[0], 4
        elif n == 127:
            n, at = struct.unpack(">Q", data[2:10])[0], 10
        if op == 0x8:
            codes.append(struct.unpack(">H", data[at:at + 2])[0])
        data = data[at + n:]
    assert codes == [1002], codes


def test_oversized_headers_get_431(stack):
    gw = stack.gateway("--max-header-bytes", "4096")
    try:
        status, _, body = request(gw, "GET", "/api/health", headers={"Cookie": "c=" + "x" * 5000})
        assert status == 431 and body["code"] == "headers_too_large"
        assert request(gw, "GET", "/api/health", headers={"Cookie": "c=" + "x" * 2000})[0] == 200
        status, _ = handshake_status(ws_url(gw, "t-431", "hugo"),
                                     {"Cookie": "c=" + "x" * 5000})
        assert status == 431
        # Far past the buffer the connection is closed unanswered; the
        # gateway goes on.
        raw = raw_exchange(gw, b"GET / HTTP/1.1\r\nHost: x\r\nCookie: " + b"y" * 100000 +
                           b"\r\n\r\n")
        assert not raw.startswith(b"HTTP/1.1 200")
        assert request(gw, "GET", "/healthz")[0] == 200
    finally:
        gw.stop()


def test_unknown_transfer_encoding_is_501_and_what_follows_is_never_served(gateway):
    raw = raw_exchange(gateway, (
        f"GET /api/health HTTP/1.1\r\nHost: {gateway.addr}\r\nTransfer-Encoding: gzip\r\n\r\n"
        f"GET /healthz HTTP/1.1\r\nHost: {gateway.addr}\r\n\r\n").encode())
    assert raw.startswith(b"HTTP/1.1 501"), raw[:200]
    assert raw.count(b"HTTP/1.1 ") == 1, "the smuggled request was served"
    body = raw.partition(b"\r\n\r\n")[2]
    assert json.loads(body)["code"] == "transfer_encoding_not_supported"
    # A body on a GET is refused the same way.
    raw = raw_exchange(gateway, (
        f"GET /api/health HTTP/1.1\r\nHost: {gateway.addr}\r\nContent-Length: 44\r\n\r\n"
        f"GET /healthz HTTP/1.1\r\nHost: {gateway.addr}\r\n\r\n").encode())
    assert raw.startswith(b"HTTP/1.1 400") and raw.count(b"HTTP/1.1 ") == 1, raw[:300]


def test_client_visible_errors_are_sanitized(stack, gateway):
    async def go():
        async with websockets.connect(ws_url(gateway, "t-sanitize", "sven")) as ws:
            await first_frame(ws)
            return [(await turn(ws, f"hello [[fault:{k}]]"))[-1] for k in ("401", "malformed")]

    for f in run(go()):
        assert f["type"] == "error" and f["code"] in ("upstream_auth_failed", "bad_upstream_data",
                                                      "upstream_unavailable"), f
        assert f["request_id"] and f["turn_id"]
        text = f["content"].lower()
        assert "offline-model" not in text and "injected" not in text and "http" not in text, f
    # REST: no gRPC status names, addresses or service text.
    token = dev_token(gateway, "sven")
    stack.store.kill()
    try:
        status, headers, body = request(gateway, "GET", "/api/sessions/t-sanitize", token=token)
    finally:
        stack.store.start()
        readyz_until(gateway, 200)  # the next tests find the store reachable again
    assert status == 503 and body["code"] == "service_unavailable" and body["request_id"]
    assert headers["x-request-id"] == body["request_id"]
    text = json.dumps(body)
    for leak in ("UNAVAILABLE", "127.0.0.1", str(stack.store.port), "grpc", "Socket"):
        assert leak not in text, body
    assert body["request_id"] in gateway.log_text(), "the details are in the log, under the id"

