"""Benchmark of the whole path (not a test): starts PostgreSQL, store-svc,
the offline model, llm-svc, router-svc and a gateway from a build tree, then
runs loadgen.mjs against the gateway and, side by side, the offline model.

    CONVO_BUILD_DIR=/tmp/bench/build /usr/bin/python3 tests/gateway/bench_gateway.py \
        --sessions 100 --turns 5 --words 50 --delay-ms 0

Every event is persisted: the figures include store-svc writing every token
to PostgreSQL. Use a Release build (the default ctest tree has sanitizers).

--metrics both runs the stack with metrics off (--metrics-listen off in every
process: nothing recorded) and on, alternating, and prints each run's
figures side by side: what metrics cost the token path."""

import argparse
import json
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


def stack_run(pg, a, extra, metrics, as_json):
    """One run on a fresh set of services over `pg`: loadgen's exit code or
    parsed JSON, the CPU seconds of each process and the tokens stored."""
    quiet = {"LOG_LEVEL": "warn"}
    # --metrics off: every service and the gateway record nothing and serve
    # no /metrics (with it on, the harness gives each its metrics port).
    off = [] if metrics == "on" else ["--metrics-listen", "off"]
    pg.psql("TRUNCATE session_events, sessions")
    store = Service("store-svc", args=off, env={"DATABASE_URL": pg.url, **quiet})
    model = Service("offline-model", binary=build_dir() / "llm-svc" / "offline-model",
                    args=["--token-delay-ms", "0", "--log-level", "warn"], ready="tcp")
    llm = Service("llm-svc", args=["--store", store.addr, *off],
                  env={"OPENAI_BASE_URL": f"http://{model.addr}/v1", "OPENAI_API_KEY": "offline",
                       **quiet})
    router = Service("router-svc", args=off, env=quiet)
    gw = Service("gateway", args=["--router", router.addr, "--llm", llm.addr, "--store",
                                  store.addr, "--summary", "127.0.0.1:1",
                                  "--rate-limit", "100000", "--max-connections", "100000", *off,
                                  *extra],
                 env=quiet, ready="http")
    try:
        n0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        node0 = n0.ru_utime + n0.ru_stime
        r = subprocess.run(["node", str(HERE / "loadgen.mjs"), "--gateway", gw.addr,
                            "--model", model.addr, "--sessions", str(a.sessions),
                            "--turns", str(a.turns), "--words", str(a.words),
                            "--delay-ms", str(a.delay_ms),
                            "--stagger-ms", str(a.stagger_ms),
                            "--think-ms", str(a.think_ms), *(["--json"] if as_json else [])],
                           text=True, stdout=subprocess.PIPE if as_json else None)
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
        tick = os.sysconf("SC_CLK_TCK")
        cpu = {s.name: cpu_seconds(s.pid, tick) for s in (gw, router, llm, model, store)}
        cpu["PostgreSQL"] = sum(cpu_seconds(int(p), tick) for p in os.listdir("/proc")
                                if p.isdigit() and comm(p) == "postgres")
        node = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu["loadgen"] = node.ru_utime + node.ru_stime - node0
        result = json.loads(r.stdout.strip().splitlines()[-1]) if as_json else r.returncode
        return result, cpu, stored, want
    finally:
        for s in (gw, router, llm, model, store):
            s.stop()


def cpu_model():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def compare(pg, a, extra):
    """--metrics both: runs alternate off, on, off, on... on the same
    machine, so drift in its load touches both; then each run's gateway
    figures side by side."""
    rows = []
    for i in range(a.rounds):
        for metrics in ("off", "on"):
            result, cpu, stored, want = stack_run(pg, a, extra, metrics, as_json=True)
            gw = next(r for r in result["results"] if r["path"] == "through the gateway")
            direct = next((r for r in result["results"] if r["path"] != "through the gateway"), None)
            steady = gw.get("steady") or gw
            rows.append((metrics, i + 1, gw, steady, direct, cpu, stored, want, result["errors"]))
    print(f"{cpu_model()}, {os.cpu_count()} CPUs; sessions {a.sessions}, turns {a.turns}, "
          f"{a.words} tokens per answer, think {a.think_ms} ms, stagger {a.stagger_ms} ms")
    print("metrics run  errors  ttft p50   p99 ms  added p50/p99 ms  tokens/s  (steady)  "
          "gateway CPU s  stored")
    for metrics, i, gw, steady, direct, cpu, stored, want, errors in rows:
        added = ""
        if direct is not None:
            added = (f"{gw['ttft_p50_ms'] - direct['ttft_p50_ms']:.2f}/"
                     f"{gw['ttft_p99_ms'] - direct['ttft_p99_ms']:.2f}")
        print(f"{metrics:<7} {i:>3} {gw['errors']:>7}  {gw['ttft_p50_ms']:7.2f} {gw['ttft_p99_ms']:7.2f}"
              f"  {added:>16}  {gw['tokens_per_s']:8.0f}  {steady['tokens_per_s']:8.0f}"
              f"  {cpu['gateway']:13.2f}  {stored}/{want}")
    bad = [r for r in rows if r[2]["errors"] or r[6] != r[7]]
    return 1 if bad else 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--words", type=int, default=50)
    ap.add_argument("--delay-ms", type=int, default=0)
    ap.add_argument("--stagger-ms", type=int, default=0)
    ap.add_argument("--think-ms", type=int, default=0)
    ap.add_argument("--metrics", choices=("on", "off", "both"), default="on",
                    help="metrics recorded and served (on), not at all (off: --metrics-listen "
                         "off everywhere), or runs of each side by side (both)")
    ap.add_argument("--rounds", type=int, default=2, help="with --metrics both: off/on pairs")
    ap.add_argument("gateway_args", nargs="*", help="extra gateway options (after --)")
    a = ap.parse_args()
    extra = a.gateway_args
    with Postgres() as pg:
        # The schema, once (store-svc migrates at start).
        Service("store-svc", env={"DATABASE_URL": pg.url, "LOG_LEVEL": "warn"}).stop()
        if a.metrics == "both":
            return compare(pg, a, extra)
        rc, cpu, stored, want = stack_run(pg, a, extra, a.metrics, as_json=False)
        print(f"ai_token events stored: {stored} of {want}")
        print("CPU seconds used:", ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()))
        return rc or (stored != want)


if __name__ == "__main__":
    sys.exit(main())
