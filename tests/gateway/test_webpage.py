"""The web page (gateway/web) in headless Chromium, driven by
tests/gateway/webpage.mjs (playwright-core, Debian's chromium) against
every real service: sign-in in each --auth mode, the conversation list and
its history, the URL, reconnecting after the gateway is killed, safe
Markdown, the queue, layout at 375 and 1280 px. What the browser showed is
checked against what store-svc wrote. Screenshots go to
<build dir>/test-artifacts/webpage/."""

import asyncio
import json
import os
import select
import subprocess
import time
import urllib.request
from pathlib import Path

import jwt
import psycopg2
import pytest
import websockets

from conftest import ws_url
from harness import build_dir
from stack import stored_events

SCRIPT = Path(__file__).resolve().parent / "webpage.mjs"
SCENARIO_TIMEOUT = 240
SECRET = b"the web page test's jwt secret, 32+ bytes"
# Generous limits: the page's own behaviour is under test here, not the
# gateway's limits (tests/gateway/test_trust.py has those).
LIMITS = ("--rate-limit", "6000", "--rest-rate-per-ip", "1000", "--sessions-per-hour", "1000")


@pytest.fixture(scope="module")
def out_dir():
    d = build_dir() / "test-artifacts" / "webpage"
    d.mkdir(parents=True, exist_ok=True)
    return d


def browse(scenario, gw, out_dir, on_ask=None, **args):
    """Runs one scenario of webpage.mjs against gw; answers its asks with
    on_ask(ask) (the dict it printed); returns the facts it reports."""
    argv = ["node", str(SCRIPT), scenario, "--url", f"http://{gw.addr}/app/", "--out", str(out_dir)]
    for k, v in args.items():
        argv += [f"--{k}", str(v)]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + SCENARIO_TIMEOUT
    result = None
    try:
        while result is None:
            left = deadline - time.monotonic()
            assert left > 0, f"scenario {scenario} timed out"
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if not ready:
                continue
            line = proc.stdout.readline()
            if not line:
                break
            msg = json.loads(line)
            if "ask" in msg:
                assert on_ask is not None, f"unexpected ask {msg['ask']}"
                on_ask(msg)
                proc.stdin.write("ok\n")
                proc.stdin.flush()
            else:
                result = msg
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert result is not None, f"scenario {scenario} said nothing; stderr:\n{err}"
    assert "error" not in result, f"scenario {scenario} failed:\n{result['error']}\n{err}"
    assert proc.returncode == 0, err
    return result["done"]


def hs256(user, **claims):
    now = int(time.time())
    c = {"sub": user, "iat": now, "exp": now + 600, "aud": "authenticated"}
    c.update(claims)
    return jwt.encode(c, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def jwt_gateway(stack, tmp_path_factory):
    secret = tmp_path_factory.mktemp("jwt") / "secret"
    secret.write_bytes(SECRET)
    gw = stack.gateway("--jwt-secret-file", str(secret), "--jwt-audience", "authenticated", *LIMITS,
                       auth="jwt")
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def dev_gateway(stack):
    gw = stack.gateway(*LIMITS)
    yield gw
    gw.stop()


def _pairs(got):
    return [(t, c) for _, t, c in got]


def rows(pg, session, want=None, timeout=15):
    """(event_type, content) of a session in seq order, once want(rows)."""
    return _pairs(stored_events(pg, session, want and (lambda got: want(_pairs(got))), timeout))


def user_messages(got):
    return [c for t, c in got if t == "user_message"]


def answers(got):
    """The answer text of each turn, in order (tokens between user messages)."""
    out = []
    for t, c in got:
        if t == "user_message":
            out.append("")
        elif t == "ai_token" and out:
            out[-1] += c
    # As the page shows them: Markdown paragraphs without the outer blanks.
    return [a.strip() for a in out]


def killer(stack, gw, pause=0):
    """Answers a scenario's asks: "kill" SIGKILLs gw once the store holds
    the session's first `stored` user messages (a SIGKILL loses what the
    gateway had not written yet: that is not what these tests are about),
    "start" starts it again on the same port after `pause` seconds (the
    page backs off meanwhile)."""
    def act(ask):
        if ask["ask"] == "kill":
            rows(stack.pg, ask["session"], lambda r: len(user_messages(r)) >= ask["stored"])
            gw.kill()
        elif ask["ask"] == "start":
            time.sleep(pause)
            gw.start()
    return act


# ---- loading, headers ----------------------------------------------------------


def test_page_loads_with_no_console_message_and_a_csp(dev_gateway, out_dir):
    facts = browse("load", dev_gateway, out_dir)
    assert all(facts["compiled"]), facts["patterns"]
    with urllib.request.urlopen(f"http://{dev_gateway.addr}/app/", timeout=10) as r:
        csp = r.headers["Content-Security-Policy"]
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Referrer-Policy"] == "no-referrer"
        assert r.headers["X-Frame-Options"] == "DENY"
    for directive in ("default-src 'none'", "script-src 'self'", "connect-src 'self'",
                      "frame-ancestors 'none'", "form-action 'none'",
                      "require-trusted-types-for 'script'"):
        assert directive in csp, csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    # The vendor files are served, with the same policy.
    with urllib.request.urlopen(f"http://{dev_gateway.addr}/app/vendor/dompurify/dist/purify.min.js",
                                timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/javascript")
        assert b"DOMPurify" in r.read(300)


# ---- sign-in per mode ------------------------------------------------------------


def test_dev_mode_signs_in_by_name_and_keeps_the_token_out_of_urls(stack, dev_gateway, out_dir):
    facts = browse("signin_dev", dev_gateway, out_dir, user="web-dev")
    got = rows(stack.pg, facts["session"], lambda r: len(answers(r)) == 1 and answers(r)[0])
    assert user_messages(got) == ["hello from dev mode"]
    assert facts["texts"][0]["answer"] == answers(got)[0]
    # The page sent the token as ?access_token=; the gateway never logged it.
    assert facts["token"] not in dev_gateway.log_text()


def test_jwt_mode_pasted_token_and_its_refusals(stack, jwt_gateway, out_dir):
    token = hs256("web-jwt")
    facts = browse("signin_jwt", jwt_gateway, out_dir, user="web-jwt", token=token,
                   expired=hs256("web-jwt", exp=int(time.time()) - 3600, iat=int(time.time()) - 7200),
                   forged=jwt.encode({"sub": "web-jwt", "exp": int(time.time()) + 600,
                                      "aud": "authenticated"}, b"another secret, 32 bytes or more!",
                                     algorithm="HS256"))
    got = rows(stack.pg, facts["session"], lambda r: user_messages(r))
    assert user_messages(got) == ["hello from jwt mode"]
    with psycopg2.connect(stack.pg.url) as conn, conn.cursor() as cur:
        cur.execute("SELECT user_id FROM sessions WHERE session_id = %s", (facts["session"],))
        assert cur.fetchone()[0] == "web-jwt", "the session is the token's subject's"
    assert token not in jwt_gateway.log_text(), "the token reached the gateway's log"


def test_jwt_mode_login_redirect_with_the_token_in_the_fragment(jwt_gateway, out_dir):
    token = hs256("web-redirect")
    facts = browse("signin_redirect", jwt_gateway, out_dir, user="web-redirect", token=token)
    assert "access_token" not in facts["href"]


def test_none_mode_user_field(stack, gateway_none, out_dir):
    facts = browse("signin_none", gateway_none, out_dir, user="web-none")
    with psycopg2.connect(stack.pg.url) as conn, conn.cursor() as cur:
        cur.execute("SELECT user_id FROM sessions WHERE session_id = %s", (facts["session"],))
        assert cur.fetchone()[0] == "web-none"


def test_the_seeds_page_works_against_none_mode(stack, gateway_none, out_dir):
    facts = browse("seed", gateway_none, out_dir, session="seed-page", user="seed-user")
    assert facts["call"].startswith("Calling fetch_internal_knowledge with {")
    assert "python" in facts["call"].lower()
    assert facts["result"].startswith("fetch_internal_knowledge returned {")
    assert facts["answer"]
    assert facts["error"].startswith("Error: ")
    got = rows(stack.pg, "seed-page", lambda r: answers(r) and answers(r)[0])
    assert user_messages(got) == ["What is Python?"]
    assert facts["answer"] == answers(got)[0]


# ---- the conversation -----------------------------------------------------------


def test_tool_cards_markdown_copy_usage_and_keyboard(dev_gateway, out_dir):
    browse("conversation", dev_gateway, out_dir, user="web-md")


def test_queued_messages_in_order_removed_and_cancelled(stack, dev_gateway, out_dir):
    facts = browse("queue", dev_gateway, out_dir, user="web-queue")
    got = rows(stack.pg, facts["session"], lambda r: len(user_messages(r)) == 3 and
               sum(1 for t, c in r if t == "system_event" and "turn_cancelled" in c) == 2)
    # charlie was removed before it left: never sent.
    assert user_messages(got) == ["[[delay:40]] [[words:300]] alpha", "[[delay:40]] [[words:300]] bravo",
                                  "delta"]
    stored = answers(got)
    shown = [t["answer"] for t in facts["texts"]]
    assert shown[2] == stored[2]
    # What was stopped shows what had arrived (a stored answer may have a
    # few more tokens that were on their way when the cancel landed).
    for i in (0, 1):
        assert stored[i].startswith(shown[i]) and shown[i].startswith("w1 w2 w3"), (shown[i], stored[i])


def test_history_paged_as_you_scroll_up_and_the_list_with_summaries(stack, dev_gateway, out_dir):
    user = "web-history"
    first, last = "the very first message", "the very last message"

    async def talk(session, messages):
        async with websockets.connect(ws_url(dev_gateway, session, user), max_size=None) as ws:
            assert json.loads(await ws.recv())["type"] == "session"
            for m in messages:
                await ws.send(json.dumps({"message": m}))
                while json.loads(await ws.recv())["type"] not in ("done", "error"):
                    pass

    # More conversations than one page of the list, an older short one,
    # then a long one (over 1,000 events: three pages of history).
    for i in range(31):
        asyncio.run(talk(f"web-hist-empty-{i}", []))
    asyncio.run(talk("web-hist-old", ["an older conversation"]))
    time.sleep(0.05)
    asyncio.run(talk("web-hist-long", [first] + ["[[words:300]]"] * 4 + [last]))
    long_rows = rows(stack.pg, "web-hist-long", lambda r: len(user_messages(r)) == 6)
    assert len(long_rows) > 1000
    facts = browse("history", dev_gateway, out_dir, user=user, first=first, last=last,
                   sessions="web-hist-long,web-hist-old", total=33)
    listed = [s["id"] for s in facts["listed"]]
    assert len(listed) == len(set(listed)) == 33, "every conversation listed once, over two pages"
    assert listed.index("web-hist-long") < listed.index("web-hist-old"), "newest first"
    assert any(s["summary"].startswith("Overview") for s in facts["listed"])
    # Every answer whole, though it was split between pages.
    shown = [t["answer"] for t in facts["texts"]]
    assert [t["user"] for t in facts["texts"]] == user_messages(long_rows)
    assert shown == answers(long_rows)


def test_reload_keeps_the_conversation_and_back_goes_to_the_previous_one(stack, dev_gateway, out_dir):
    facts = browse("reload", dev_gateway, out_dir, user="web-reload")
    got = rows(stack.pg, facts["first"], lambda r: len(user_messages(r)) == 2)
    assert user_messages(got) == ["remember the apples", "and the pears"], \
        "the reloaded page went on in the same session"
    assert [t["answer"] for t in facts["afterReload"]] == answers(got)
    assert user_messages(rows(stack.pg, facts["second"], lambda r: user_messages(r))) == \
        ["a new topic: bananas"]


def test_gateway_killed_and_restarted_the_page_reconnects_by_itself(stack, out_dir):
    gw = stack.gateway(*LIMITS)
    try:
        facts = browse("restart", gw, out_dir, on_ask=killer(stack, gw, pause=1),
                       user="web-restart")
    finally:
        gw.stop()
    got = rows(stack.pg, facts["session"], lambda r: len(user_messages(r)) == 4)
    # Every message exactly once, in order; what was typed while the
    # gateway was down was sent after the resume.
    assert user_messages(got) == ["before the restart", "[[delay:50]] [[words:300]] long",
                                  "typed while it was down", "after the restart"]
    assert facts["interrupted"] == "interrupted"
    texts = facts["texts"]
    assert [t["user"] for t in texts] == user_messages(got)
    assert texts[2]["answer"] == answers(got)[2] and texts[3]["answer"] == answers(got)[3]


def test_script_in_messages_answers_and_tools_never_runs(dev_gateway, out_dir):
    facts = browse("xss", dev_gateway, out_dir, user="web-xss")
    assert facts["flag"] is None and facts["elements"] == []


def test_layout_at_375_and_1280_px_in_light_and_dark(dev_gateway, out_dir):
    browse("layout", dev_gateway, out_dir, user="web-layout")
    for width in (375, 1280):
        for scheme in ("light", "dark"):
            png = (out_dir / f"webpage-{width}-{scheme}.png").read_bytes()
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
            assert int.from_bytes(png[16:20], "big") == width, "screenshot width"
            assert len(png) > 10000, "the screenshot shows something"
    assert os.path.getsize(out_dir / "webpage-375-drawer.png") > 10000


def test_a_message_typed_while_down_survives_a_reload_and_is_sent_once(stack, out_dir):
    gw = stack.gateway(*LIMITS)
    try:
        facts = browse("offline_reload", gw, out_dir, on_ask=killer(stack, gw),
                       user="web-offline")
    finally:
        gw.stop()
    got = rows(stack.pg, facts["session"], lambda r: len(user_messages(r)) == 2)
    assert user_messages(got) == ["before the outage", "typed before the reload"]


def test_a_second_tab_takes_the_conversation_over_without_a_tug_of_war(stack, dev_gateway, out_dir):
    facts = browse("takeover", dev_gateway, out_dir, user="web-takeover")
    got = rows(stack.pg, facts["session"], lambda r: len(user_messages(r)) == 2)
    assert user_messages(got) == ["hello from the first tab", "back in the first tab"]


def test_another_users_conversation_is_not_shown(stack, dev_gateway, out_dir):
    secret = "the owner's private words"

    async def own():
        async with websockets.connect(ws_url(dev_gateway, "web-owned", "web-owner")) as ws:
            assert json.loads(await ws.recv())["type"] == "session"
            await ws.send(json.dumps({"message": secret}))
            while json.loads(await ws.recv())["type"] not in ("done", "error"):
                pass

    asyncio.run(own())
    facts = browse("forbidden", dev_gateway, out_dir, user="web-intruder", session="web-owned",
                   secret=secret)
    assert secret not in facts["shown"]
    assert user_messages(rows(stack.pg, "web-owned")) == [secret], "nothing was added to it"


def test_refused_messages_are_not_sent_again(stack, dev_gateway, out_dir):
    facts = browse("refusals", dev_gateway, out_dir, user="web-refusals")
    got = rows(stack.pg, facts["session"], lambda r: user_messages(r))
    assert user_messages(got) == ["still here"]
    assert [t["user"] for t in facts["texts"]][-1] == "still here"


def test_jwt_sign_in_expires_and_the_page_asks_again(jwt_gateway, out_dir):
    browse("jwt_expiry", jwt_gateway, out_dir, token=hs256("web-expiry"))
