"""Benchmark of the crash window (not a test): how much of what a client was
shown a gateway killed with SIGKILL never stored.

    CONVO_BUILD_DIR=/tmp/bench/build /usr/bin/python3 tests/gateway/bench_crash.py --runs 5

Starts PostgreSQL, store-svc, the offline model (flat out: no delay between
tokens), llm-svc and router-svc from a build tree; then, per run, a gateway,
one session asking for a long answer, reads tokens for --read-ms, kills the
gateway with SIGKILL and counts the tokens the client received against the
ai_token rows store-svc wrote for the session. Each mode runs --runs times
on a fresh gateway:

  default              --event-flush-ms 100, --event-batch 256 (the defaults)
  flush-10             --event-flush-ms 10
  batch-1000           --event-batch 1000 (store-svc's largest batch)
  store-before-send    --store-before-send (nothing is shown before it is stored)

--delay-ms paces the model (0, the default: flat out; 20 is a fast hosted
model's pace).

Prints each run, then per mode the tokens lost (shown, never stored) and
the window in milliseconds (lost tokens over the rate the client read them
at), with the CPU model and the load average: the figures mean nothing
without them. Use a Release build (the default ctest tree has sanitizers).
The first-token cost of --store-before-send is measured with the load
generator (bench_gateway.py, see the gateway README)."""

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "harness"))
from harness import Service  # noqa: E402
from stack import Stack, ws_url  # noqa: E402

import psycopg2  # noqa: E402
import websockets  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

MODES = {
    "default": [],
    "flush-10": ["--event-flush-ms", "10"],
    "batch-1000": ["--event-batch", "1000"],
    "store-before-send": ["--store-before-send"],
}
WORDS = 150000  # longer than any run reads: the answer is still streaming at the kill


def cpu_model():
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def stored_tokens(pg, session):
    with psycopg2.connect(pg.url) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM session_events WHERE session_id = %s "
                    "AND event_type = 'ai_token'", (session,))
        return cur.fetchone()[0]


def settled_count(pg, session, quiet_s=1.0, timeout=30):
    """The session's stored tokens once the count stopped changing (store-svc
    finishes what it had received before the gateway died)."""
    last, since = -1, time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = stored_tokens(pg, session)
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
        time.sleep(0.1)
    return last


async def read_then_kill(gw, session, read_ms, delay_ms):
    """Asks for a long answer, reads for read_ms, SIGKILLs the gateway, reads
    what is still on its way; returns (tokens shown, seconds reading)."""
    async with websockets.connect(ws_url(gw, session, "crash"), max_size=None) as ws:
        assert json.loads(await ws.recv())["type"] == "session"
        await ws.send(json.dumps({"message": f"[[delay:{delay_ms}]] [[words:{WORDS}]]"}))
        shown, first = 0, None
        deadline = None
        while True:
            f = json.loads(await ws.recv())
            if f["type"] == "token":
                shown += 1
                if first is None:
                    first = time.monotonic()
                    deadline = first + read_ms / 1000
                if time.monotonic() >= deadline:
                    break
            elif f["type"] in ("done", "error"):
                raise RuntimeError(f"the answer ended before the kill: {f}")
        os.kill(gw.pid, signal.SIGKILL)
        killed = time.monotonic()
        try:
            while True:
                f = json.loads(await asyncio.wait_for(ws.recv(), 5))
                if f["type"] == "token":
                    shown += 1
        except (ConnectionClosed, asyncio.TimeoutError):
            pass
        return shown, killed - first


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--read-ms", type=int, default=1500,
                    help="how long the client reads before the kill")
    ap.add_argument("--delay-ms", type=int, default=0, help="the model's pace (0: flat out)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of " + ", ".join(MODES))
    args = ap.parse_args()

    print(f"model pace: {args.delay_ms} ms a token; reading {args.read_ms} ms before the kill")
    print(f"CPU: {cpu_model()}; {os.cpu_count()} CPUs; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    results = {}
    # The strategies' max_tokens would end the answer before the kill: a
    # router whose strategies set none.
    conf = Path(tempfile.mkdtemp()) / "router.conf"
    shipped = (HERE.parents[1] / "router-svc" / "router.conf").read_text()
    conf.write_text(re.sub(r"(?m)^max_tokens = \d+$", "max_tokens = 0", shipped))
    with Stack(summary=False) as stack:
        router = Service("router-svc", args=["--config", str(conf)])
        for mode in args.modes.split(","):
            results[mode] = []
            for run in range(args.runs):
                gw = stack.gateway("--router", router.addr, *MODES[mode], auth="none")
                session = f"crash-{mode}-{run}-{int(time.time() * 1000)}"
                shown, secs = asyncio.run(read_then_kill(gw, session, args.read_ms,
                                                         args.delay_ms))
                gw.kill()
                stored = settled_count(stack.pg, session)
                rate = shown / secs if secs > 0 else 0.0
                lost = max(shown - stored, 0)
                window_ms = lost / rate * 1000 if rate else 0.0
                results[mode].append((shown, stored, lost, window_ms, rate))
                print(f"{mode:18} run {run + 1}: shown {shown:7,}  stored {stored:7,}  "
                      f"lost {lost:6,}  window {window_ms:6.1f} ms  "
                      f"({rate:,.0f} tokens/s read)", flush=True)
        router.stop()
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'mode':18} {'runs':>4} {'lost tokens (median, max)':>26} "
          f"{'window ms (median, max)':>24} {'tokens/s (median)':>18}")
    for mode, rows in results.items():
        lost = [r[2] for r in rows]
        window = [r[3] for r in rows]
        rate = [r[4] for r in rows]
        print(f"{mode:18} {len(rows):>4} {statistics.median(lost):>15,.0f} {max(lost):>10,} "
              f"{statistics.median(window):>13.1f} {max(window):>10.1f} "
              f"{statistics.median(rate):>18,.0f}")


if __name__ == "__main__":
    main()
