"""Benchmark of the whole path (not a test): starts PostgreSQL, store-svc,
the offline model, llm-svc, router-svc and a gateway from a build tree, then
runs loadgen.mjs against the gateway and, side by side, the offline model.

    CONVO_BUILD_DIR=/tmp/bench/build /usr/bin/python3 tests/gateway/bench_gateway.py \
        --sessions 100 --turns 5 --words 50 --delay-ms 0 [--tls]

Every event is persisted: the figures include store-svc writing every token
to PostgreSQL. Use a Release build (the default ctest tree has sanitizers).

--tls runs the same load twice in one go, each on a fresh system: plaintext,
then with every gRPC hop over mutual TLS (certificates of a throwaway CA,
tests/harness/certs.py), and prints both side by side."""

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
    ap.add_argument("--rounds", type=int, default=1,
                    help="with --tls: alternate plaintext and mutual TLS this many times and "
                         "compare the medians (a noisy machine)")
    ap.add_argument("gateway_args", nargs="*", help="extra gateway options (after --)")
    a = ap.parse_args()
    if not a.tls:
        return run(a, tls=False)[0]
    status, added, through = 0, {False: [], True: []}, {False: [], True: []}
    for i in range(a.rounds):
        reports = {}
        for tls in (False, True):
            rc, reports[tls] = run(a, tls=tls, as_json=True)
            status = status or rc
        print(f"\nround {i + 1} of {a.rounds}")
        for tls, (add, p50) in zip((False, True), compare(reports[False], reports[True])):
            added[tls].append(add)
            through[tls].append(p50)
    if a.rounds > 1:
        for what, v in (("added first-token time", added), ("first token through the gateway", through)):
            med = {k: statistics.median(x) for k, x in v.items()}
            print(f"{what} at the median (steady window where there is one), median of "
                  f"{a.rounds} rounds: plaintext {med[False]:.2f} ms, mutual TLS {med[True]:.2f} ms, "
                  f"difference {med[True] - med[False]:+.2f} ms")
    return status


def compare(plain, mtls):
    """The loadgen figures of both runs side by side; returns, for each, the
    added first-token time at the median and the median through the gateway
    (steady window where there is one). The direct path is the same in both
    runs, so the second is the steadier comparison on a noisy machine."""
    print("\nfirst token (ms), through the gateway / straight from the model / added; tokens/s")
    print(f"{'':34}{'plaintext':>28}{'mutual TLS':>28}")
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
    print(f"mutual TLS moves the added first-token time at the median by {added[1] - added[0]:+.2f} ms "
          f"(through the gateway alone: {window[1][0]['ttft_p50_ms'] - window[0][0]['ttft_p50_ms']:+.2f} ms)")
    return [(a, g["ttft_p50_ms"]) for a, (g, _) in zip(added, window)]


def run(a, tls, as_json=False):
    """One run on a fresh system; returns (exit status, loadgen's JSON or None)."""
    extra = a.gateway_args
    quiet = {"LOG_LEVEL": "warn"}
    ids, admin = {}, None
    if tls:
        ca = CA("bench-ca")
        ids = {n: ca.issue(n) for n in ("store-svc", "llm-svc", "router-svc", "gateway")}
        admin = ca.issue("admin")
    print(f"--- {'mutual TLS between the services' if tls else 'plaintext'}", flush=True)
    with Postgres() as pg:
        store = Service("store-svc", env={"DATABASE_URL": pg.url, **quiet},
                        tls=ids.get("store-svc"), caller=admin)
        model = Service("offline-model", binary=build_dir() / "llm-svc" / "offline-model",
                        args=["--token-delay-ms", "0", "--log-level", "warn"], ready="tcp")
        llm = Service("llm-svc", args=["--store", store.addr],
                      env={"OPENAI_BASE_URL": f"http://{model.addr}/v1", "OPENAI_API_KEY": "offline",
                           **quiet}, tls=ids.get("llm-svc"), caller=admin)
        router = Service("router-svc", env=quiet, tls=ids.get("router-svc"), caller=admin)
        gw = Service("gateway", args=["--router", router.addr, "--llm", llm.addr, "--store",
                                      store.addr, "--summary", "127.0.0.1:1",
                                      "--rate-limit", "100000", "--max-connections", "100000",
                                      # loadgen.mjs is one user on one address with
                                      # ?user_id=: the seed's trust, no per-user limits
                                      "--auth", "none", "--max-connections-per-ip", "0",
                                      "--max-connections-per-user", "0", "--sessions-per-hour", "0",
                                      "--user-tokens-per-minute", "0", *extra],
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
