"""Replicas fail independently: two of every service (router-svc, llm-svc,
store-svc, summary-svc) and two gateways on one machine, each replica on its
own loopback address (127.0.0.1, 127.0.0.2: all on Linux's lo) and every
replica of a service on one port, as pods behind a Kubernetes Service.
Every caller is given both replicas' addresses (`--store
127.0.0.1:P,127.0.0.2:P --grpc-round-robin`) and spreads its calls over them.

While 50 conversations run (Node's `ws`, conversations.mjs: each a row of
short sessions, so that sessions end and are summarized all along), one
replica of each service in turn is SIGKILLed and started again, then one
gateway. What must hold, counted from PostgreSQL and from what the clients
saw:

- no conversation is broken for more than one turn (a turn whose answer
  was cut or failed is sent again and must then succeed), and no turn fails
  outside a kill's window;
- every event is stored: per session, the stored user messages, tokens and
  tool events are exactly what the clients sent and were shown, in order.
  The gateways run --store-before-send, so a gateway killed with SIGKILL
  has shown nothing it had not stored; what it had stored but not yet shown,
  or a message it got but had not stored (sent again by the client), are
  the only differences allowed on its connections (counted and printed);
- every ended session is summarized once: DONE with a summary, one attempt
  (two for the sessions whose summary the killed summary-svc replica held
  the lease of when it died, which the other replica takes over);
- the clients of the killed gateway resume their sessions on the other
  (the session frame says resumed, with the history loaded);
- a restarted replica is called again.
"""

import asyncio
import json
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

import jwt
import psycopg2
import pytest
import websockets

from harness import Service
from stack import ReplicaStack, first_frame, turn

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "conversations.mjs"
SECRET = b"the replica test's jwt secret, 32+ bytes long"
CONVERSATIONS = 50
TURNS = 4          # per session
WORDS = 12         # tokens per answer
DELAY_MS = 20      # per token
PROGRESS = 2       # answers every conversation must get after a restart
WAIT = 120         # seconds any one stage may take before the test gives up
SUMMARY_ARGS = ["--lease-seconds", "5", "--sweep-interval-ms", "500", "--sweep-delay-ms", "1000",
                "--retry-backoff-ms", "500", "--workers", "4"]
STORED = ("user_message", "ai_token", "tool_call", "tool_result")
# The killed gateway's sessions that were ending (their client had left)
# are ended by the store this long after its last word, then summarized.
SESSION_LEASE_S = 6


def token(user):
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 3600}, SECRET, algorithm="HS256")


class Clients:
    """conversations.mjs, followed line by line."""

    def __init__(self, gateways, out, tokens):
        argv = ["node", str(CLIENT), "--gateways", gateways, "--conversations", str(CONVERSATIONS),
                "--turns", str(TURNS), "--words", str(WORDS), "--delay-ms", str(DELAY_MS),
                "--think-ms", "200", "--tool-every", "3", "--token-file", str(tokens),
                "--out", str(out)]
        self.out = out
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines = []
        self.mu = threading.Lock()
        self.ok = [0] * CONVERSATIONS  # answers done, per conversation
        self.exited = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            ev = json.loads(line)
            with self.mu:
                self.lines.append(ev)
                if ev["ev"] == "turn" and ev["ok"]:
                    self.ok[ev["conv"]] += 1
        self.exited.put(self.proc.wait())

    def mark(self):
        with self.mu:
            return len(self.lines)

    def since(self, mark):
        with self.mu:
            return list(self.lines[mark:])

    def wait_progress(self, answers, what):
        """Until every conversation has `answers` more answers than now."""
        with self.mu:
            want = [n + answers for n in self.ok]
        deadline = time.monotonic() + WAIT
        while True:
            with self.mu:
                behind = [i for i, n in enumerate(self.ok) if n < want[i]]
            if not behind:
                return
            assert self.proc.poll() is None, f"the clients exited: {self.proc.stderr.read()}"
            assert time.monotonic() < deadline, (
                f"{what}: conversations {behind[:10]} got no answer for {WAIT} s")
            time.sleep(0.05)

    def finish(self):
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        try:
            code = self.exited.get(timeout=WAIT)
        except queue.Empty:
            self.proc.kill()
            raise AssertionError("the clients did not finish their sessions")
        assert code == 0, self.proc.stderr.read()
        return json.loads(Path(self.out).read_text())


def db(stack):
    conn = psycopg2.connect(stack.pg.url)
    conn.autocommit = True
    return conn


def query(conn, sql, *args):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


def worker_prefix(svc):
    """The start of a summary-svc process's worker id (summary-svc.HOST.PID.)."""
    return f"summary-svc.{os.uname().nodename}.{svc.pid}."


def wait_for(pred, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.05)


def freeze_holding_a_lease(conn, svc):
    """Stops summary-svc `svc` (SIGSTOP) at a moment it holds a summary's
    lease, so that it is killed in the middle of that summary and the other
    replica must take the session over once the lease runs out. Returns the
    sessions it held. A summary takes a fraction of a second: when the
    stopped process turns out to have finished it just before, it goes on
    (SIGCONT) and the next lease is tried."""
    held = ("SELECT session_id FROM sessions WHERE summary_lease_owner LIKE %s "
            "AND summary_status = 'pending' AND summary_lease_until > now()")
    prefix = worker_prefix(svc) + "%"
    for _ in range(50):
        wait_for(lambda: query(conn, held, prefix), "summary-svc replica 0 held no lease")
        os.kill(svc.pid, signal.SIGSTOP)
        time.sleep(0.3)  # a save it had sent lands meanwhile
        sessions = {r[0] for r in query(conn, held, prefix)}
        if sessions:
            return sessions
        os.kill(svc.pid, signal.SIGCONT)
    raise AssertionError("summary-svc replica 0 was never stopped holding a lease")


def served(svc, method):
    """Calls of `method` a (restarted) service answered since it started."""
    return svc.metric("convo_grpc_server_handled_total", grpc_method=method)


@pytest.fixture(scope="module")
def stack():
    with ReplicaStack(summary_args=SUMMARY_ARGS) as s:
        yield s


@pytest.fixture(scope="module")
def gateways(stack, tmp_path_factory):
    secret = tmp_path_factory.mktemp("jwt") / "secret"
    secret.write_bytes(SECRET)
    gws = stack.gateways("--auth", "jwt", "--jwt-secret-file", str(secret),
                         "--rate-limit", "100000", "--rate-burst", "1000",
                         "--sessions-per-hour", "100000",
                         "--session-lease-seconds", str(SESSION_LEASE_S),
                         # Every frame waits until its events are stored: a
                         # killed gateway then loses nothing it showed.
                         "--store-before-send")
    yield gws
    gws.stop()


def stored_matches(stored, conns, p=0):
    """Whether `stored` (the session's events from p on) is each connection's
    events (`seen`: sent and shown) in turn. The gateway of a connection
    killed with SIGKILL relayed and stored one row of events, each as far as
    it got: its stored part and what its client saw are then one the prefix
    of the other (the crash window). Returns (answer events shown but not
    stored, events stored but never shown), or None. (A message the client
    sent that was not stored is no loss: the client sends it again.)"""
    if not conns:
        return (0, 0) if p == len(stored) else None
    seen = [tuple(e) for e in conns[0]["seen"]]
    if not conns[0]["killed"]:
        if stored[p:p + len(seen)] != seen:
            return None
        return stored_matches(stored, conns[1:], p + len(seen))
    for keep in range(len(seen), -1, -1):
        if stored[p:p + keep] != seen[:keep]:
            continue
        extra = 0
        while True:
            rest = stored_matches(stored, conns[1:], p + keep + extra)
            if rest is not None:
                shown = sum(kind != "user_message" for kind, _ in seen[keep:])
                return rest[0] + shown, rest[1] + extra
            # Stored past what was shown: the answer's events the dead
            # gateway had queued for the client (never a message it sent).
            at = p + keep + extra
            if keep < len(seen) or at >= len(stored) or stored[at][0] == "user_message":
                break
            extra += 1
    return None


def test_replicas_fail_independently(stack, gateways, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("".join(token(f"res-{i}") + "\n" for i in range(CONVERSATIONS)))
    clients = Clients(gateways.addr, tmp_path / "record.json", tokens)
    conn = db(stack)
    clients.wait_progress(PROGRESS, "warm-up")

    kills = []      # (what, mark at the kill, mark when every conversation answered again)
    interrupted = set()  # sessions the killed summary-svc held the lease of
    for name, replicas, method in (("router-svc", stack.router, "Route"),
                                   ("llm-svc", stack.llm, "Chat"),
                                   ("store-svc", stack.store, "AppendEvents"),
                                   ("summary-svc", stack.summary, "Summarize"),
                                   ("gateway", gateways, None)):
        victim = replicas[0]
        start = clients.mark()
        if name == "summary-svc":
            interrupted = freeze_holding_a_lease(conn, victim)
        victim.kill()
        # Callers meet the dead address for a while before it is back.
        clients.wait_progress(1, f"{name} replica 0 down")
        victim.start()
        clients.wait_progress(PROGRESS, f"{name} replica 0 restarted")
        kills.append((name, start, clients.mark()))
        if method is not None:
            wait_for(lambda: served(victim, method) > 0,
                     f"the restarted {name} replica was not called again")

    record = clients.finish()
    lines = clients.since(0)
    sessions = {s["id"]: s for c in record["conversations"] for s in c["sessions"]}

    # ---- no conversation broken for more than one turn -------------------
    killed_gw = gateways[0].addr
    report = {name: {} for name, _, _ in kills}
    for i, ev in enumerate(lines):
        if ev["ev"] not in ("turn", "connect_failed") or ev.get("ok"):
            continue
        window = [name for name, a, b in kills if a <= i < b]
        assert window, f"a turn or connection failed outside every kill: {ev}"
        what = ev["outcome"] if ev["ev"] == "turn" else f"connect {ev['code']}"
        if ev["ev"] == "turn" and ev["shown"] > 0:
            what += " mid-answer"
        report[window[0]][what] = report[window[0]].get(what, 0) + 1
        if ev["ev"] == "connect_failed":
            # Only a client that came back to a dead gateway (its next
            # session) may fail to connect, and it then goes to the other.
            assert window[0] == "gateway" and ev["gateway"] == killed_gw, ev
        elif window[0] == "llm-svc":
            # Only an answer already being shown dies with its replica; one
            # that had not begun is asked of the other replica.
            assert ev["shown"] > 0, ev
        else:
            # A dead router-, store- or summary-svc replica costs no turn;
            # a dead gateway only the answers it was relaying.
            assert window[0] == "gateway" and ev["outcome"] == "cut", ev
    print("failed turns and connections by kill:", json.dumps(report))
    for c in record["conversations"]:
        run = 0
        for s in c["sessions"]:
            assert s["gave_up"] is None, s["gave_up"]
            for t in s["turns"]:
                run = 0 if t["outcome"] == "done" else run + 1
                assert run <= 1, f"{s['id']} turn {t['turn']}: {run} attempts in a row failed"
                assert t["outcome"] != "done" or t["whole"], f"{s['id']}: an answer was not whole"
            assert s["closed"], f"{s['id']} was not closed by its client"

    # ---- the killed gateway's clients resumed on the other ---------------
    resumed = 0
    for s in sessions.values():
        for k, cn in enumerate(s["conns"]):
            cn["killed"] = (cn["gateway"] == killed_gw and cn["announced"]
                            and (cn["closed"] or {}).get("code") == 1006)
            if cn["killed"] and k + 1 == len(s["conns"]):
                # Killed as its client was closing it: nothing to resume
                # (the store ends it when its lease runs out).
                assert cn["by_us"], (s["id"], cn)
            elif cn["killed"]:
                after = s["conns"][k + 1]
                assert after["gateway"] != killed_gw and after["session"]["resumed"] and \
                    after["session"]["history_loaded"], (s["id"], after)
                resumed += 1
            elif cn["announced"]:
                assert cn["closed"] is None or cn["by_us"] or cn["closed"]["code"] != 1006, \
                    (s["id"], cn)
    assert resumed > 0, "no client was on the killed gateway"
    print(f"sessions resumed on the other gateway after the kill: {resumed}")

    # ---- every event stored ----------------------------------------------
    rows = query(conn, "SELECT session_id, event_type, content FROM session_events "
                       "WHERE event_type IN %s ORDER BY session_id, seq", STORED)
    stored = {}
    for sid, kind, content in rows:
        if kind in ("tool_call", "tool_result"):
            content = json.loads(content)["id"]
        stored.setdefault(sid, []).append((kind, content))
    lost = unseen = 0
    for sid, s in sessions.items():
        n = stored_matches(stored.get(sid, []), s["conns"])
        assert n is not None, (f"{sid}: the stored events are not what its clients saw\n"
                               f"stored: {stored.get(sid)}\nseen: {[c['seen'] for c in s['conns']]}")
        lost += n[0]
        unseen += n[1]
    seen_total = sum(len(cn["seen"]) for s in sessions.values() for cn in s["conns"])
    print(f"events seen by the clients: {seen_total}; the killed gateway's crash window: "
          f"{lost} shown but not stored, {unseen} stored but never shown")
    assert lost == 0, "with --store-before-send nothing that was shown may be lost"
    assert set(stored) <= set(sessions)

    # ---- every ended session summarized once -----------------------------
    ids = list(sessions)
    wait_for(lambda: query(conn, "SELECT count(*) FROM sessions WHERE session_id = ANY(%s) AND "
                           "summary_status = 'done'", ids)[0][0] == len(ids),
             "every session summarized")
    rows = query(conn, "SELECT session_id, end_time IS NOT NULL, summary_status, final_summary, "
                       "summary_attempts, summary_lease_owner FROM sessions "
                       "WHERE session_id = ANY(%s)", ids)
    assert len(rows) == len(ids)
    for sid, ended, status, summary, attempts, owner in rows:
        assert ended and status == "done" and summary, (sid, status)
        want = 2 if sid in interrupted else 1
        assert attempts == want, f"{sid}: {attempts} summary attempts, {want} expected"
        assert owner is None or owner == "", (sid, owner)
    print(f"sessions: {len(ids)}, summaries taken over from the killed replica: "
          f"{len(interrupted)}")


def test_a_dead_gateways_sessions_are_ended_and_summarized_a_live_ones_kept(stack, gateways):
    """A gateway renews its sessions' lease in the store every third of
    --session-lease-seconds. SIGKILLed, it leaves sessions whose clients
    never come back: the store ends them at their last event once the lease
    runs out (summary-svc's sweep asks), and they are summarized once. A
    live gateway's idle session outlives several leases untouched."""
    conn = db(stack)
    doomed = Service("gateway", args=[*stack.peers(), "--auth", "none", "--end-grace-ms", "0",
                                      "--session-lease-seconds", str(SESSION_LEASE_S)],
                     ready="http")
    live = gateways[1]
    run_id = f"{os.getpid()}x{int(time.time())}"
    talked, quiet, kept = (f"lease-{w}-{run_id}" for w in ("talked", "quiet", "kept"))

    async def session_frame(ws):
        frame = json.loads(await ws.recv())
        assert frame["type"] == "session", frame

    async def scenario():
        async with websockets.connect(f"ws://{doomed.addr}/ws/session/{talked}?user_id=ann") as a, \
                websockets.connect(f"ws://{doomed.addr}/ws/session/{quiet}?user_id=bob") as b, \
                websockets.connect(f"ws://{live.addr}/ws/session/{kept}?access_token="
                                   f"{token('cid')}") as c:
            opened = time.monotonic()
            for ws in (a, b, c):
                await session_frame(ws)
            await a.send(json.dumps({"message": "[[words:3]]"}))
            while json.loads(await a.recv())["type"] != "done":
                pass
            await asyncio.sleep(1)  # every event stored (--event-flush-ms)
            doomed.kill()
            deadline = time.monotonic() + WAIT
            while query(conn, "SELECT count(*) FROM sessions WHERE session_id IN (%s, %s) "
                        "AND summary_status = 'done'", talked, quiet)[0][0] < 2:
                assert time.monotonic() < deadline, "the dead gateway's sessions not summarized"
                await asyncio.sleep(0.2)
            # The live gateway's session, idle all along, outlives two leases.
            while time.monotonic() < opened + 2 * SESSION_LEASE_S:
                await asyncio.sleep(0.2)
            assert c.open

    asyncio.run(asyncio.wait_for(scenario(), WAIT + 60))
    rows = dict((r[0], r[1:]) for r in query(
        conn, "SELECT s.session_id, s.end_time, s.summary_status, s.summary_attempts, "
        "(SELECT max(e.timestamp) FROM session_events e WHERE e.session_id = s.session_id) "
        "FROM sessions s WHERE s.session_id IN (%s, %s, %s)", talked, quiet, kept))
    for sid in (talked, quiet):
        end, status, attempts, last = rows[sid]
        assert status == "done" and attempts == 1, (sid, rows[sid])
        assert end == last, f"{sid} ended at {end}, its last event was at {last}"
    end, status, _, _ = rows[kept]
    assert end is None and status == "none", rows[kept]


def test_with_mutual_tls_every_replica_is_called_by_its_services_name():
    """Every gRPC hop over mutual TLS, each replica's certificate naming its
    service and its own address only, as a pod's would: the callers (the
    gateways, llm-svc, summary-svc) check each replica of a list against the
    name of the service it serves, so every replica of every service takes
    calls and every session is summarized (summary-svc calling the store-svc
    and llm-svc lists). Checked against the list's first address, the
    second replica of each would be refused and never called."""
    with ReplicaStack(tls=True, summary_args=SUMMARY_ARGS) as s:
        gws = s.gateways("--auth", "none")
        ids = [f"tls-{os.getpid()}-{i}" for i in range(8)]

        async def talk():
            for i, sid in enumerate(ids):
                url = f"ws://{gws[i % 2].addr}/ws/session/{sid}?user_id=tls-user{i}"
                async with websockets.connect(url) as ws:
                    await first_frame(ws)
                    for _ in range(2):
                        frames = await turn(ws, "[[words:3]]")
                        assert frames[-1]["type"] == "done", frames[-1]

        asyncio.run(talk())
        conn = db(s)
        wait_for(lambda: query(conn, "SELECT count(*) FROM sessions WHERE session_id = ANY(%s) "
                               "AND summary_status = 'done'", ids)[0][0] == len(ids),
                 "every session summarized")
        for replicas, service in ((s.router, "convo.v1.Router"), (s.llm, "convo.v1.Llm"),
                                  (s.store, "convo.v1.Store")):
            for r in replicas:
                calls = r.metric("convo_grpc_server_handled_total", grpc_service=service)
                assert calls > 0, f"{r.name} at {r.addr} was never called"
