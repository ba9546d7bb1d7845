"""Soak: the whole system under a steady, realistic load for --minutes, with
one fault injected every --fault-every-s, in turn: store-svc, PostgreSQL,
the gateway, llm-svc, router-svc, summary-svc and the offline model each
killed (SIGKILL; PostgreSQL: a fast shutdown) and started again after
--down-s on the same port (PostgreSQL on the same data directory).

    CONVO_BUILD_DIR=build-rel /usr/bin/python3 tests/resilience/soak.py --minutes 10

Every process is real (tests/harness/stack.py): PostgreSQL, every service,
the offline model as the hosted model, one gateway. The clients are
WebSocket sessions (Debian's python3-websockets), each a user who sends a
message, reads the streamed answer (--words tokens at --delay-ms a token)
and pauses (--think-ms, 0.5x to 1.5x) before the next; a session whose
connection drops reconnects to the same session.

At the end it prints the CPU model and the load average, turns done and
failed (by error code), the tokens the clients saw and how many of them
PostgreSQL holds (counted per turn from session_events), and the RSS and
open descriptors of every process at the first fault and at the end (from
/proc). It exits non-zero when a token a client saw is not stored (outside
the gateway's own SIGKILL: a killed gateway loses what it showed but had not
flushed yet, at most --event-flush-ms of tokens; those are counted apart),
when a process died without being killed here, when a process's RSS grew
by more than --rss-growth-mb, or when one does not exit 0 on SIGTERM at
the end."""

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "harness"))
from harness import process_cpu_seconds  # noqa: E402
from stack import Stack, ws_url  # noqa: E402

import psycopg2  # noqa: E402  (python3-psycopg2)
import websockets  # noqa: E402  (python3-websockets)

# The gateway's limits, far above the load (every session comes from
# 127.0.0.1), as in tests/gateway/bench_gateway.py.
UNLIMITED = ["--rate-limit", "100000", "--max-connections", "100000",
             "--max-connections-per-ip", "0", "--max-connections-per-user", "0",
             "--sessions-per-hour", "0", "--user-tokens-per-minute", "0",
             "--rest-rate-per-ip", "0"]
# The order faults come in: the ones that matter most first, so that a short
# run still hits the store, the database and the gateway.
FAULTS = ("store-svc", "postgresql", "gateway", "llm-svc", "router-svc", "summary-svc",
          "offline-model")
FRAME_TIMEOUT_S = 30      # no frame for this long: the turn failed ("timeout")
RECONNECT_PAUSE_S = 0.5   # between attempts to reconnect a dropped session
DRAIN_TIMEOUT_S = 60      # for the last buffered events to reach PostgreSQL
KB = 1024


def cpu_model():
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def load():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------ /proc


def proc_children(pid):
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(p.name))
        except (OSError, ValueError, IndexError):
            pass
    return out


def rss_kb(pid, field="VmRSS"):
    """A memory figure of /proc/PID/status in KiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class Processes:
    """The processes of the stack by name, and their RSS and descriptors."""

    def __init__(self, stack, gw):
        self.stack, self.gw = stack, gw

    def services(self):
        s = self.stack
        return {"store-svc": s.store, "llm-svc": s.llm, "router-svc": s.router,
                "summary-svc": s.summary, "offline-model": s.model, "gateway": self.gw}

    def sample(self):
        """name -> (RSS KiB, descriptors, pid). PostgreSQL: the private
        memory (RssAnon) of the postmaster and every backend summed, since
        each backend's RSS counts the shared buffers it touched again;
        descriptors: the postmaster's."""
        out = {n: (rss_kb(svc.pid), fds(svc.pid), svc.pid) for n, svc in self.services().items()}
        pm = self.stack.pg._proc.pid
        out["postgresql"] = (sum(rss_kb(p, "RssAnon") for p in [pm, *proc_children(pm)]),
                             fds(pm), pm)
        return out

    def dead(self, except_name):
        """Names of the processes that are not running (but `except_name`)."""
        gone = [n for n, svc in self.services().items() if n != except_name and not svc.running]
        if except_name != "postgresql" and not self.stack.pg.running:
            gone.append("postgresql")
        return gone


# ------------------------------------------------------------------ clients


class Turn:
    """One turn as its client saw it."""
    __slots__ = ("sid", "k", "seen", "outcome", "end", "killed")

    def __init__(self, sid, k, seen, outcome, end):
        self.sid, self.k, self.seen, self.outcome, self.end = sid, k, seen, outcome, end
        self.killed = False  # served by a gateway SIGKILLed while the connection was open


class Tally:
    """What the clients saw, shared with the main thread (written by the
    client loop only)."""

    def __init__(self):
        self.turns = []            # Turn, in the order they ended
        self.outcomes = Counter()  # outcome -> turns
        self.degraded = 0
        self.connects = 0
        self.connect_failures = 0
        self.gateway_epoch = 0     # bumped by the main thread before each gateway kill
        self.dropped = Counter()   # reason -> events killed gateways had dropped (their counter)
        self.t0 = time.monotonic()


async def session_loop(a, gw, tally, sid, user, deadline):
    k = 0
    rng = random.Random(sid)
    await asyncio.sleep(rng.uniform(0, a.think_ms / 1000))  # spread the starts
    while time.monotonic() < deadline:
        conn_epoch, conn_turns = tally.gateway_epoch, []
        try:
            async with websockets.connect(ws_url(gw, sid, user), max_size=2 ** 22,
                                          open_timeout=FRAME_TIMEOUT_S) as ws:
                first = json.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT_S))
                if first.get("type") != "session":
                    tally.outcomes[f"first frame {first.get('type')}"] += 1
                    await asyncio.sleep(RECONNECT_PAUSE_S)
                    continue
                tally.connects += 1
                while time.monotonic() < deadline:
                    k += 1
                    seen, outcome = 0, "connection_lost"
                    try:
                        await ws.send(json.dumps({"message": f"[[words:{a.words}]] soak turn {k}"}))
                        while True:
                            f = json.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT_S))
                            t = f.get("type")
                            if t == "token":
                                seen += 1
                            elif t == "done":
                                outcome = "done"
                                tally.degraded += bool(f.get("degraded"))
                                break
                            elif t == "error":
                                outcome = f"error {f.get('code')}"
                                break
                    except asyncio.TimeoutError:
                        outcome = "timeout"
                    finally:
                        turn = Turn(sid, k, seen, outcome, time.monotonic() - tally.t0)
                        tally.turns.append(turn)
                        conn_turns.append(turn)
                        tally.outcomes[outcome] += 1
                    if outcome in ("connection_lost", "timeout"):
                        break
                    await asyncio.sleep(a.think_ms / 1000 * rng.uniform(0.5, 1.5))
        except (OSError, asyncio.TimeoutError, websockets.exceptions.WebSocketException):
            tally.connect_failures += 1
        finally:
            # What a gateway held in memory when it was killed is the crash
            # window: every turn of a connection that gateway served.
            if tally.gateway_epoch > conn_epoch:
                for turn in conn_turns:
                    turn.killed = True
        if time.monotonic() < deadline:
            await asyncio.sleep(RECONNECT_PAUSE_S)


def run_clients(a, gw, tally, prefix, deadline, done):
    async def main():
        await asyncio.gather(*(session_loop(a, gw, tally, f"{prefix}-{i}",
                                            f"soak-user-{i}", deadline)
                               for i in range(a.sessions)))
    try:
        asyncio.run(main())
    finally:
        done.set()


# ------------------------------------------------------------------ faults


def inject(name, stack, procs, tally, down_s):
    """Kills `name` (PostgreSQL: fast shutdown), waits `down_s`, starts it
    again; returns when the kill was sent (seconds since the run began) and
    the seconds the start took."""
    if name == "postgresql":
        at = time.monotonic() - tally.t0
        stack.pg.stop()
    else:
        svc = procs.services()[name]
        if name == "gateway":
            tally.gateway_epoch += 1
            tally.dropped.update(dropped_by(svc))
        at = time.monotonic() - tally.t0
        svc.kill()
    time.sleep(down_s)
    t0 = time.monotonic()
    (stack.pg if name == "postgresql" else procs.services()[name]).start()
    return at, time.monotonic() - t0


def dropped_by(gw):
    """reason -> events this gateway dropped (decided, logged and counted:
    a full buffer, store-svc refusing, a session taken over) so far."""
    try:
        return Counter({ls["reason"]: int(v) for n, ls, v in gw.samples()
                        if n == "convo_gateway_events_dropped_total" and v})
    except OSError:  # its metrics listener is not up (yet)
        return Counter()


# ------------------------------------------------------------------ PostgreSQL


def stored_per_turn(url, prefix):
    """(session, turn no) -> ai_token events stored after that turn's
    user message."""
    sql = """
        WITH e AS (
            SELECT session_id, event_type,
                   max(seq) FILTER (WHERE event_type = 'user_message')
                       OVER (PARTITION BY session_id ORDER BY seq) AS um_seq
            FROM session_events WHERE session_id LIKE %s)
        SELECT e.session_id, u.content, count(*) FILTER (WHERE e.event_type = 'ai_token')
        FROM e JOIN session_events u ON u.session_id = e.session_id AND u.seq = e.um_seq
        GROUP BY 1, 2"""
    out = {}
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(sql, (prefix + "-%",))
        for sid, content, n in cur.fetchall():
            marker = content.rsplit("soak turn ", 1)
            if len(marker) == 2 and marker[1].isdigit():
                out[(sid, int(marker[1]))] = n
    return out


def losses(tally, stored):
    """(tokens lost outside a gateway kill, lost on a gateway that was
    killed, the turns concerned, [Turn of a loss outside a kill])."""
    lost, crash, crash_turns, bad = 0, 0, [], []
    for t in tally.turns:
        missing = max(0, t.seen - stored.get((t.sid, t.k), 0))
        if not missing:
            continue
        if t.killed:
            crash += missing
            crash_turns.append(t)
        else:
            lost += missing
            bad.append(t)
    return lost, crash, crash_turns, bad


def settle(url, prefix, tally):
    """Waits until PostgreSQL holds every token seen (or DRAIN_TIMEOUT_S)."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        stored = stored_per_turn(url, prefix)
        lost, crash, crash_turns, bad = losses(tally, stored)
        if not lost or time.monotonic() > deadline:
            return stored, lost, crash, crash_turns, bad
        time.sleep(1)


# ------------------------------------------------------------------ report


def print_faults(faults, turns, ran):
    """Each fault and the turns that failed until the next one."""
    print(f"{'at':>8}  {'fault':14}{'start took':>11}{'failed turns':>14}{'last failure after':>20}")
    for i, (at, name, took) in enumerate(faults):
        until = faults[i + 1][0] if i + 1 < len(faults) else ran
        failed = [t.end for t in turns if at <= t.end < until and t.outcome != "done"]
        last = f"{max(failed) - at:.1f} s" if failed else "-"
        print(f"{at:>7.0f}s  {name:14}{took:>9.1f} s{len(failed):>14}{last:>20}")


def print_processes(start, end, peak, bound_kb):
    grew = []
    print(f"{'process':16}{'RSS start':>12}{'RSS end':>12}{'RSS peak':>12}{'fds start':>11}"
          f"{'fds end':>9}  restarted")
    for n in start:
        rs, fs, pid0 = start[n]
        re_, fe, pid1 = end[n]
        print(f"{n:16}{rs / KB:>9.1f} MB{re_ / KB:>9.1f} MB{peak[n] / KB:>9.1f} MB{fs:>11}{fe:>9}"
              f"  {'yes' if pid0 != pid1 else 'no'}")
        if re_ - rs > bound_kb:
            grew.append(n)
    return grew


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=60, help="length of the load (default 60)")
    ap.add_argument("--fault-every-s", type=float, default=60,
                    help="seconds between faults (default 60)")
    ap.add_argument("--down-s", type=float, default=2,
                    help="seconds a killed process stays down (default 2)")
    ap.add_argument("--sessions", type=int, default=200, help="sessions at once (default 200)")
    ap.add_argument("--words", type=int, default=50, help="tokens per answer (default 50)")
    ap.add_argument("--delay-ms", type=int, default=20,
                    help="the model's pause between tokens (default 20)")
    ap.add_argument("--think-ms", type=int, default=5000,
                    help="a user's pause between answer and next message, 0.5x to 1.5x "
                         "(default 5000)")
    ap.add_argument("--rss-growth-mb", type=float, default=64,
                    help="fail when a process's RSS grew by more than this from the first fault "
                         "to the end (default 64)")
    ap.add_argument("--log-level", default="warn", help="LOG_LEVEL of every service")
    ap.add_argument("--gateway-arg", action="append", default=[], metavar="ARG",
                    help="an extra gateway option (repeatable), e.g. --gateway-arg=--store-before-send")
    a = ap.parse_args()
    if a.minutes <= 0 or a.fault_every_s <= 0 or a.sessions < 1 or a.words < 1 or a.down_s < 0:
        ap.error("--minutes, --fault-every-s, --sessions and --words must be positive")
    return a


def main():
    a = parse_args()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} CPUs; load average before: {load()}", flush=True)
    print(f"soak: {a.minutes:g} min, {a.sessions} sessions, {a.words} tokens an answer at "
          f"{a.delay_ms} ms, think {a.think_ms} ms, a fault every {a.fault_every_s:g} s "
          f"(down {a.down_s:g} s); gateway options: {' '.join(a.gateway_arg) or 'defaults'}",
          flush=True)
    # A sanitizer build keeps freed memory in quarantine (256 MB by default),
    # which would read as RSS growth; a small one, as the store tests use.
    env = {"LOG_LEVEL": a.log_level,
           "ASAN_OPTIONS": ":".join(filter(None, ("quarantine_size_mb=8",
                                                  os.environ.get("ASAN_OPTIONS"))))}
    stack = Stack(env=env, model_args=("--token-delay-ms", str(a.delay_ms),
                                       "--log-level", a.log_level))
    gw = stack.gateway(*UNLIMITED, *a.gateway_arg, auth="none")
    procs = Processes(stack, gw)
    tally = Tally()
    prefix = f"soak{os.getpid()}"
    t0 = tally.t0 = time.monotonic()
    deadline = t0 + a.minutes * 60
    clients_done = threading.Event()
    clients = threading.Thread(target=run_clients, daemon=True,
                               args=(a, gw, tally, prefix, deadline, clients_done))
    clients.start()

    faults, died, start, peak = [], [], None, Counter()
    n = 0
    next_fault = t0 + a.fault_every_s
    current = None
    while time.monotonic() < deadline and not clients_done.is_set():
        now = time.monotonic()
        s = procs.sample()
        for name, (rss, _, _) in s.items():
            peak[name] = max(peak[name], rss)
        for name in procs.dead(current):
            died.append((round(now - t0), name))
            print(f"[{now - t0:7.1f} s] {name} died unexpectedly; starting it again", flush=True)
            (stack.pg if name == "postgresql" else procs.services()[name]).start()
        # A fault only when a whole interval is left after it to settle.
        if now >= next_fault and next_fault + a.fault_every_s <= deadline:
            if start is None:
                start = s
            current = FAULTS[n % len(FAULTS)]
            n += 1
            at, took = inject(current, stack, procs, tally, a.down_s)
            faults.append((at, current, took))
            how = "stopped" if current == "postgresql" else "killed"
            print(f"[{now - t0:7.1f} s] {current} {how}, back {a.down_s:g} s later (start took "
                  f"{took:.1f} s); turns so far {len(tally.turns)}, load {load()}", flush=True)
            current = None
            next_fault += a.fault_every_s
        time.sleep(0.5)
    end = procs.sample()
    start = start or end
    tally.dropped.update(dropped_by(procs.services()["gateway"]))
    clients.join(FRAME_TIMEOUT_S * 3)
    ran = time.monotonic() - t0
    client_cpu = process_cpu_seconds(os.getpid())

    stored, lost, crash, crash_turns, bad = settle(stack.pg.url, prefix, tally)
    seen = sum(t.seen for t in tally.turns)
    print(f"\n--- soak report ({ran / 60:.1f} min; CPU: {cpu_model()}; load average at the end: "
          f"{load()})")
    print(f"faults injected: {len(faults)}")
    print_faults(faults, tally.turns, ran)
    print(f"turns: {len(tally.turns)}; " + ", ".join(f"{k} {v}" for k, v in
                                                     tally.outcomes.most_common()) +
          f"; {tally.degraded} answered with the default route (degraded)")
    print(f"connections: {tally.connects} opened, {tally.connect_failures} attempts failed")
    print(f"tokens seen by the clients: {seen}; stored in PostgreSQL: "
          f"{sum(min(t.seen, stored.get((t.sid, t.k), 0)) for t in tally.turns)} of them")
    kills = [t for t, name, _ in faults if name == "gateway"]
    cut = sum(t.outcome == "connection_lost" for t in crash_turns)
    # A finished turn lost with a gateway: when it ended, against the kill
    # nearest to it. Frames the gateway wrote before it died can reach the
    # client after the kill was sent, so the offset can be positive.
    ages = [min((t.end - k for k in kills), key=abs, default=0) for t in crash_turns
            if t.outcome != "connection_lost"]
    print(f"tokens lost: {lost}; lost in the memory of a SIGKILLed gateway (its crash window): "
          f"{crash} in {len(crash_turns)} turns, {cut} of them cut by the kill" +
          (f", the others ended {min(ages):+.3f} to {max(ages):+.3f} s from the SIGKILL"
           if ages else ""))
    print("events the gateways dropped and counted, by reason: " +
          (", ".join(f"{k} {v}" for k, v in tally.dropped.most_common()) or "none"))
    for t in bad[:10]:
        print(f"  lost: {t.sid} turn {t.k} (ended at {t.end:.1f} s): {t.seen} seen, "
              f"{stored.get((t.sid, t.k), 0)} stored ({t.outcome})")
    grew = print_processes(start, end, peak, a.rss_growth_mb * KB)
    print("(postgresql: private memory, RssAnon, of the postmaster and its backends summed)")
    print(f"load generator (this process): {client_cpu:.1f} CPU-s over {ran:.0f} s")

    status = 0
    if lost:
        print(f"FAIL: {lost} tokens seen by clients are not in PostgreSQL")
        status = 1
    if died:
        print(f"FAIL: processes died without being killed: {died}")
        status = 1
    if grew:
        print(f"FAIL: RSS grew by more than {a.rss_growth_mb:g} MB: {', '.join(grew)}")
        status = 1
    if not tally.outcomes.get("done"):
        print("FAIL: no turn was answered")
        status = 1
    # Each process must still stop cleanly (SIGTERM: exit 0; under the
    # sanitizers a leak report would make it non-zero).
    unclean = []
    for name, svc in reversed(list(procs.services().items())):
        rc = svc.stop()
        if rc != 0:
            unclean.append(f"{name} exited with {rc}")
    stack.pg.stop()
    if unclean:
        print(f"FAIL: SIGTERM at the end: {', '.join(unclean)}")
        status = 1
    print("soak: " + ("passed" if status == 0 else "FAILED"), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
