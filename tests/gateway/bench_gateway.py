"""Benchmark of the whole path (not a test): starts PostgreSQL, store-svc,
the offline model, llm-svc, router-svc and a gateway from a build tree, then
runs loadgen.mjs against the gateway and, side by side, the offline model.

    CONVO_BUILD_DIR=/tmp/bench/build /usr/bin/python3 tests/gateway/bench_gateway.py \
        --sessions 100 --turns 5 --words 50 --delay-ms 0 [--tls | --metrics both]

Every event is persisted: the figures include store-svc writing every token
to PostgreSQL. Use a Release build (the default ctest tree has sanitizers).

--tls runs the same load twice in one go, each on a fresh system: plaintext,
then with every gRPC hop over mutual TLS (certificates of a throwaway CA,
tests/harness/certs.py), and prints both side by side.

--metrics both does the same with metrics off (--metrics-listen off in every
process: nothing recorded) and on: what metrics cost the token path.
--metrics off alone runs without them."""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "harness"))
from harness import Postgres, Service, build_dir  # noqa: E402
from certs import CA  # noqa: E402


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
    ap.add_argument("--tls", action="store_true",
                    help="run plaintext, then mutual TLS between the services, and compare")
    ap.add_argument("--metrics", choices=("on", "off", "both"), default="on",
                    help="metrics recorded and served (on), not at all (off: --metrics-listen "
                         "off everywhere), or runs of each side by side (both)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with --tls or --metrics both: alternate the two this many times and "
                         "compare the medians (a noisy machine)")
    ap.add_argument("gateway_args", nargs="*", help="extra gateway options (after --)")
    a = ap.parse_args()
    if a.tls and a.metrics == "both":
        ap.error("--tls and --metrics both: compare one thing at a time")
    if a.tls:
        sides = [("plaintext", {"tls": False, "metrics": a.metrics}),
                 ("mutual TLS", {"tls": True, "metrics": a.metrics})]
    elif a.metrics == "both":
        sides = [("metrics off", {"tls": False, "metrics": "off"}),
                 ("metrics on", {"tls": False, "metrics": "on"})]
    else:
        return run(a, tls=False, metrics=a.metrics)[0]
    names = [n for n, _ in sides]
    status, added, through = 0, {n: [] for n in names}, {n: [] for n in names}
    for i in range(a.rounds):
        reports = {}
        for name, kw in sides:
            rc, reports[name] = run(a, as_json=True, **kw)
            status = status or rc
        print(f"\nround {i + 1} of {a.rounds}")
        for name, (add, p50) in zip(names, compare(names, reports[names[0]], reports[names[1]])):
            added[name].append(add)
            through[name].append(p50)
    if a.rounds > 1:
        for what, v in (("added first-token time", added), ("first token through the gateway", through)):
            med = {k: statistics.median(x) for k, x in v.items()}
            print(f"{what} at the median (steady window where there is one), median of "
                  f"{a.rounds} rounds: {names[0]} {med[names[0]]:.2f} ms, {names[1]} "
                  f"{med[names[1]]:.2f} ms, difference {med[names[1]] - med[names[0]]:+.2f} ms")
    return status


def compare(names, plain, mtls):
    """The loadgen figures of both runs side by side; returns, for each, the
    added first-token time at the median and the median through the gateway
    (steady window where there is one). The direct path is the same in both
    runs, so the second is the steadier comparison on a noisy machine."""
    print("\nfirst token (ms), through the gateway / straight from the model / added; tokens/s")
    print(f"{'':34}{names[0]:>28}{names[1]:>28}")
    for key, label in (("all", "all measured turns"), ("steady", "steady window")):
        rows = []
        for res in (plain, mtls):
            direct, gw = res["results"][0], res["results"][-1]
            if key == "steady":
                if not all(r.get("steady") for r in (direct, gw)):
                    break
                direct, gw = direct["steady"], gw["steady"]
            rows.append((gw, direct))
        if len(rows) != 2:
            continue
        for q in ("p50", "p99"):
            cells = [f"{g[f'ttft_{q}_ms']:.2f} / {d[f'ttft_{q}_ms']:.2f} / "
                     f"{g[f'ttft_{q}_ms'] - d[f'ttft_{q}_ms']:.2f}" for g, d in rows]
            print(f"{label + ', ' + q:34}{cells[0]:>28}{cells[1]:>28}")
        print(f"{label + ', tokens/s':34}{rows[0][0]['tokens_per_s']:>28.0f}"
              f"{rows[1][0]['tokens_per_s']:>28.0f}")
    window = [(r["results"][-1].get("steady", r["results"][-1]),
               r["results"][0].get("steady", r["results"][0])) for r in (plain, mtls)]
    added = [g["ttft_p50_ms"] - d["ttft_p50_ms"] for g, d in window]
    print(f"{names[1]} (against {names[0]}) moves the added first-token time at the median by {added[1] - added[0]:+.2f} ms "
          f"(through the gateway alone: {window[1][0]['ttft_p50_ms'] - window[0][0]['ttft_p50_ms']:+.2f} ms)")
    return [(a, g["ttft_p50_ms"]) for a, (g, _) in zip(added, window)]


def run(a, tls, metrics="on", as_json=False):
    """One run on a fresh system; returns (exit status, loadgen's JSON or None)."""
    extra = a.gateway_args
    quiet = {"LOG_LEVEL": "warn"}
    # The harness gives each process a metrics port unless its args name one.
    moff = ["--metrics-listen", "off"] if metrics == "off" else []
    ids, admin = {}, None
    if tls:
        ca = CA("bench-ca")
        ids = {n: ca.issue(n) for n in ("store-svc", "llm-svc", "router-svc", "gateway")}
        admin = ca.issue("admin")
    print(f"--- {'mutual TLS between the services' if tls else 'plaintext'}, metrics {metrics}",
          flush=True)
    with Postgres() as pg:
        store = Service("store-svc", args=moff, env={"DATABASE_URL": pg.url, **quiet},
                        tls=ids.get("store-svc"), caller=admin)
        model = Service("offline-model", binary=build_dir() / "llm-svc" / "offline-model",
                        args=["--token-delay-ms", "0", "--log-level", "warn"], ready="tcp")
        llm = Service("llm-svc", args=["--store", store.addr, *moff],
                      env={"OPENAI_BASE_URL": f"http://{model.addr}/v1", "OPENAI_API_KEY": "offline",
                           **quiet}, tls=ids.get("llm-svc"), caller=admin)
        router = Service("router-svc", args=moff, env=quiet, tls=ids.get("router-svc"), caller=admin)
        gw = Service("gateway", args=["--router", router.addr, "--llm", llm.addr, "--store",
                                      store.addr, "--summary", "127.0.0.1:1",
                                      "--rate-limit", "100000", "--max-connections", "100000", *moff,
                                      *extra],
                     env=quiet, ready="http", tls=ids.get("gateway"))
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
            report = None
            if as_json:
                report = json.loads(r.stdout.strip().splitlines()[-1])
                for res in report["results"]:
                    print(f"{res['path']}: {res['answers']} answers, {res['errors']} errors, first "
                          f"token p50 {res['ttft_p50_ms']:.2f} ms, p99 {res['ttft_p99_ms']:.2f} ms, "
                          f"{res['tokens_per_s']:.0f} tokens/s")
                if report["errors"]:
                    print("error kinds:", ", ".join(report["errors"]))
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
            return (r.returncode or (stored != want)), report
        finally:
            for s in (gw, router, llm, model, store):
                s.stop()


if __name__ == "__main__":
    sys.exit(main())
