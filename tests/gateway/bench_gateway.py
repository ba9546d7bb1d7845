"""Benchmark of the whole path (not a test): starts PostgreSQL, store-svc,
the offline model, llm-svc, router-svc and a gateway from a build tree, then
runs loadgen.mjs against the gateway and, side by side, the offline model.

    CONVO_BUILD_DIR=/tmp/bench/build /usr/bin/python3 tests/gateway/bench_gateway.py \
        --sessions 100 --turns 5 --words 50 --delay-ms 0

Every event is persisted: the figures include store-svc writing every token
to PostgreSQL. Use a Release build (the default ctest tree has sanitizers)."""

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "harness"))
from harness import Postgres, Service, build_dir  # noqa: E402


def cpu_seconds(pid, tick):
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(f[11]) + int(f[12])) / tick


def comm(pid):
    try:
        return open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        return ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--words", type=int, default=50)
    ap.add_argument("--delay-ms", type=int, default=0)
    ap.add_argument("--stagger-ms", type=int, default=0)
    ap.add_argument("--think-ms", type=int, default=0)
    ap.add_argument("gateway_args", nargs="*", help="extra gateway options (after --)")
    a = ap.parse_args()
    extra = a.gateway_args
    quiet = {"LOG_LEVEL": "warn"}
    with Postgres() as pg:
        store = Service("store-svc", env={"DATABASE_URL": pg.url, **quiet})
        model = Service("offline-model", binary=build_dir() / "llm-svc" / "offline-model",
                        args=["--token-delay-ms", "0", "--log-level", "warn"], ready="tcp")
        llm = Service("llm-svc", args=["--store", store.addr],
                      env={"OPENAI_BASE_URL": f"http://{model.addr}/v1", "OPENAI_API_KEY": "offline",
                           **quiet})
        router = Service("router-svc", env=quiet)
        gw = Service("gateway", args=["--router", router.addr, "--llm", llm.addr, "--store",
                                      store.addr, "--summary", "127.0.0.1:1",
                                      "--rate-limit", "100000", "--max-connections", "100000", *extra],
                     env=quiet, ready="http")
        try:
            n0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            node0 = n0.ru_utime + n0.ru_stime
            r = subprocess.run(["node", str(HERE / "loadgen.mjs"), "--gateway", gw.addr,
                                "--model", model.addr, "--sessions", str(a.sessions),
                                "--turns", str(a.turns), "--words", str(a.words),
                                "--delay-ms", str(a.delay_ms),
                                "--stagger-ms", str(a.stagger_ms),
                                "--think-ms", str(a.think_ms)], text=True)
            # Every token must reach PostgreSQL: wait for the last batches.
            want = a.sessions * a.turns * a.words
            t0 = time.monotonic()
            stored = 0
            while time.monotonic() - t0 < 60:
                out = pg.psql("SELECT count(*) FROM session_events WHERE event_type = 'ai_token'")
                stored = int([l for l in out.split() if l.strip().isdigit()][0])
                if stored >= want:
                    break
                time.sleep(0.2)
            print(f"ai_token events stored: {stored} of {want} "
                  f"({time.monotonic() - t0:.1f} s after the last answer)")
            tick = os.sysconf("SC_CLK_TCK")
            cpu = [f"{s.name} {cpu_seconds(s.pid, tick):.1f}" for s in (gw, router, llm, model, store)]
            pg_cpu = sum(cpu_seconds(int(p), tick) for p in os.listdir("/proc")
                         if p.isdigit() and comm(p) == "postgres")
            node = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu.append(f"PostgreSQL {pg_cpu:.1f}")
            cpu.append(f"loadgen {node.ru_utime + node.ru_stime - node0:.1f}")
            print("CPU seconds used:", ", ".join(cpu))
            return r.returncode or (stored != want)
        finally:
            for s in (gw, router, llm, model, store):
                s.stop()


if __name__ == "__main__":
    sys.exit(main())
