"""Benchmark of the whole path (not a test): starts PostgreSQL, store-svc,
the offline model, llm-svc, router-svc and a gateway from a build tree, then
runs the load generator against the gateway and, side by side, against the
offline model (the same requests straight to it).

    CONVO_BUILD_DIR=/tmp/bench/build /usr/bin/python3 tests/gateway/bench_gateway.py \\
        --sessions 100 --turns 5 --words 50 --delay-ms 0

Every event is persisted: the figures include store-svc writing every token
to PostgreSQL, and the run fails unless every ai_token event is in the
database afterwards. The CPU model is printed with the figures, and the CPU
time each process used during the run (PostgreSQL's: this server's own
processes, exited ones included), with PostgreSQL's per stored event.

--client picks the load generator: c (tests/gateway/loadgen/, the default),
node (tests/gateway/loadgen.mjs), or c,node to run both one after the other
against the same stack (the client's own CPU and frames per CPU-second are
printed for each). --auth jwt signs one HS256 token per user with a secret
made here (python3-jwt) and starts the gateway with --auth jwt; --auth none
(the default) starts it with --auth none (the seed's trusted ?user_id=). The
gateway's per-address and per-user limits are raised far above the load.

--tls runs the same load twice in one go, each on a fresh system: plaintext,
then with every gRPC hop over mutual TLS (certificates of a throwaway CA,
tests/harness/certs.py), and prints both side by side (--rounds N alternates
them N times, each round starting with the side the last one ended with, and
compares the medians and the round-by-round differences).

--metrics both does the same with metrics off (--metrics-listen off in every
process: nothing recorded) and on: what metrics cost the token path;
--metrics off alone runs without them.

--trace both does the same with traces off (the OpenTelemetry variables unset:
spans are ids only) and on (every process but the offline model exporting
to an OTLP/HTTP JSON receiver in this process, which only counts the spans
it takes): what recording and exporting spans cost the token path; --trace
on alone runs with them.

Use a Release build (the default ctest tree has sanitizers)."""

import argparse
import http.server
import json
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "harness"))
from harness import Postgres, Service, build_dir, process_cpu_seconds, tmp_root  # noqa: E402
from certs import CA  # noqa: E402

TOKEN_LIFETIME_S = 3600
# The gateway's limits, far above any load here (every session comes from
# 127.0.0.1; one user per session unless --users says otherwise).
UNLIMITED = ["--rate-limit", "100000", "--max-connections", "100000",
             "--max-connections-per-ip", "0", "--max-connections-per-user", "0",
             "--sessions-per-hour", "0", "--user-tokens-per-minute", "0",
             "--rest-rate-per-ip", "0"]


class Collector:
    """An OTLP/HTTP JSON receiver that counts the spans it takes."""

    def __init__(self):
        self.spans = 0
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                # Counted, not parsed: the receiver shares the machine with
                # what it measures. Each span has one start time.
                body = self.rfile.read(int(self.headers["Content-Length"]))
                collector.spans += body.count(b'"startTimeUnixNano"')
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def cpu_model():
    """lscpu's 'Model name' (the figures mean nothing without it)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def children(pid):
    out = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(p.name))
        except (OSError, ValueError):
            pass
    return out


def renice(pids, nice):
    """Every thread of the processes (Linux's nice is per thread)."""
    for pid in pids:
        for t in Path(f"/proc/{pid}/task").iterdir():
            os.setpriority(os.PRIO_PROCESS, int(t.name), nice)


class Poller:
    """One psql session kept open for the counts: a psql run per poll would
    start a backend each time, whose CPU would count as PostgreSQL's. Its
    own backend's CPU is left out of PostgreSQL's figure (backend_cpu)."""

    MARK = "--end--"

    def __init__(self, pg):
        self.p = subprocess.Popen([str(pg.bindir / "psql"), "-X", "-q", "-A", "-t", "-v",
                                   "ON_ERROR_STOP=1", "-d", pg.url], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        self.pid = int(self.query("SELECT pg_backend_pid()"))

    def query(self, sql):
        self.p.stdin.write(f"{sql};\n\\echo {self.MARK}\n")
        self.p.stdin.flush()
        lines = []
        for line in self.p.stdout:
            if line.strip() == self.MARK:
                return "\n".join(lines).strip()
            lines.append(line)
        raise RuntimeError("psql ended")

    def count(self, where=""):
        return int(self.query(f"SELECT count(*) FROM session_events {where}"))

    def backend_cpu(self):
        return process_cpu_seconds(self.pid)

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def write_tokens(users, prefix):
    """A secret file and a token file: line k is a token of user <prefix>k."""
    import jwt  # python3-jwt; only --auth jwt needs it

    secret = secrets.token_hex(32)
    d = tmp_root()
    (d / "jwt-secret").write_text(secret)
    now = int(time.time())
    with open(d / "tokens", "w") as f:
        for k in range(users):
            claims = {"sub": f"{prefix}{k}", "iat": now, "exp": now + TOKEN_LIFETIME_S}
            f.write(jwt.encode(claims, secret, algorithm="HS256") + "\n")
    return d / "jwt-secret", d / "tokens"


def loadgen_argv(client, a, gw, model, token_file, as_json):
    common = ["--gateway", gw.addr, "--sessions", str(a.sessions),
              "--turns", str(a.turns), "--words", str(a.words), "--delay-ms", str(a.delay_ms),
              "--stagger-ms", str(a.stagger_ms), "--think-ms", str(a.think_ms),
              "--user-prefix", a.user_prefix, "--users", str(a.users or a.sessions)]
    if token_file:
        common += ["--access-token-file", str(token_file)]
    if a.direct:
        common += ["--model", model.addr]
    if as_json:
        common += ["--json"]
    if client == "node":
        return ["node", str(HERE / "loadgen.mjs"), *common]
    extra = ["--turn-log", a.turn_log] if a.turn_log else []
    return [str(build_dir() / "tests" / "gateway" / "loadgen"), *common, *extra]


class Meter:
    """CPU seconds of each process between start() and stop()."""

    def __init__(self, services, pg, poller):
        self.services = services
        self.pg = pg
        self.poller = poller

    def sample(self):
        s = {svc.name: process_cpu_seconds(svc.pid) for svc in self.services}
        s["PostgreSQL"] = self.pg.cpu_seconds() - self.poller.backend_cpu()
        return s

    def start(self):
        self.t0 = self.sample()

    def stop(self):
        t1 = self.sample()
        return {k: t1[k] - self.t0[k] for k in t1}


def warm_up(a, gw, token_file):
    """One session of one turn through the gateway before the measured run,
    so that the gateway's gRPC channels to router-svc, llm-svc and
    store-svc are connected (they connect at their first call): the run
    measures a serving system, not its start. --cold leaves it out."""
    argv = [str(build_dir() / "tests" / "gateway" / "loadgen"), "--gateway", gw.addr,
            "--sessions", "1", "--turns", "2", "--words", "3", "--user-prefix", a.user_prefix]
    if token_file:
        argv += ["--access-token-file", str(token_file)]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"warm-up failed:\n{r.stdout}{r.stderr}", file=sys.stderr)
    return r.returncode == 0, 2 * 3


def run_client(client, a, gw, model, db, meter, token_file, want_before, as_json=False):
    """One load generator's run; returns (its exit status, every token stored,
    the ai_token count now expected, its JSON report or None)."""
    print(f"--- load generator: {client} ({cpu_model()})", flush=True)
    meter.start()
    events0 = db.count()
    t0 = time.monotonic()
    proc = subprocess.Popen(loadgen_argv(client, a, gw, model, token_file, as_json),
                            stdout=subprocess.PIPE if as_json else None, text=True)
    out = proc.stdout.read() if as_json else ""
    # wait4 gives the client's own CPU time.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    client_cpu = usage.ru_utime + usage.ru_stime
    ran = time.monotonic() - t0
    report = None
    if as_json:
        report = json.loads(out.strip().splitlines()[-1])
        for res in report["results"]:
            print(f"{res['path']}: {res['answers']} answers, {res['errors']} errors, first "
                  f"token p50 {res['ttft_p50_ms']:.2f} ms, p99 {res['ttft_p99_ms']:.2f} ms, "
                  f"{res['tokens_per_s']:.0f} tokens/s")
    # Every token must reach PostgreSQL: wait for the last batches.
    want = want_before + a.sessions * a.turns * a.words
    t1 = time.monotonic()
    stored = 0
    while time.monotonic() - t1 < 60:
        stored = db.count("WHERE event_type = 'ai_token'")
        if stored >= want:
            break
        time.sleep(0.2)
    cpu = meter.stop()
    events = db.count() - events0
    print(f"ai_token events stored: {stored} of {want} "
          f"({time.monotonic() - t1:.1f} s after the last answer); {events} events of every kind")
    # A turn router-svc could not route in time is answered on the default
    # route, not failed: count those from PostgreSQL, or "0 errors" hides them.
    degraded = db.count("WHERE event_type = 'system_event' AND content LIKE '%\"route_degraded\"%'")
    print(f"turns on the default route (router-svc failed or late): {degraded}")
    parts = [f"{k} {v:.1f}" for k, v in cpu.items()]
    print(f"CPU seconds used during the run ({ran:.1f} s, {cpu_model()}): {', '.join(parts)}, "
          f"load generator ({client}) {client_cpu:.1f}")
    tokens = a.sessions * a.turns * a.words * (2 if a.direct else 1)
    if client_cpu > 0:
        print(f"load generator ({client}): {tokens / client_cpu:,.0f} tokens received per CPU-second "
              f"of its own ({client_cpu:.2f} s for {tokens:,} tokens, {100 * client_cpu / ran:.0f}% "
              f"of a core over the run)")
    upd, hot, size = db.query("SELECT n_tup_upd, n_tup_hot_upd, pg_total_relation_size('sessions') "
                              "FROM pg_stat_user_tables WHERE relname = 'sessions'").split("|")
    print(f"sessions table: {int(upd):,} row updates so far, {int(hot):,} of them HOT (no index "
          f"entry), {int(size) / 1e6:.1f} MB with its indexes")
    if events > 0:
        print(f"PostgreSQL CPU per stored event: {cpu['PostgreSQL'] / events * 1e6:.1f} µs; "
              f"store-svc {cpu['store-svc'] / events * 1e6:.1f} µs")
    sys.stdout.flush()
    return proc.returncode, stored == want, want, report


def compare(names, plain, mtls):
    """The first load generator's figures of both runs side by side; returns
    the added first-token time at the median of each (steady window where
    there is one)."""
    def fig(res, key):
        return res.get("steady") if key == "steady" else res

    print("\nfirst token (ms), through the gateway / straight from the model / added; tokens/s")
    print(f"{'':34}{names[0]:>28}{names[1]:>28}")
    for key, label in (("all", "all measured turns"), ("steady", "steady window")):
        rows = []
        for res in (plain, mtls):
            direct, gw = res["results"][0], res["results"][-1]
            if not (fig(direct, key) and fig(gw, key)):
                break
            rows.append((fig(gw, key), fig(direct, key)))
        if len(rows) != 2:
            continue
        for q in ("p50", "p99"):
            cells = [f"{g[f'ttft_{q}_ms']:.2f} / {d[f'ttft_{q}_ms']:.2f} / "
                     f"{g[f'ttft_{q}_ms'] - d[f'ttft_{q}_ms']:.2f}" for g, d in rows]
            print(f"{label + ', ' + q:34}{cells[0]:>28}{cells[1]:>28}")
        print(f"{label + ', tokens/s':34}{rows[0][0]['tokens_per_s']:>28.0f}"
              f"{rows[1][0]['tokens_per_s']:>28.0f}")
    added = [(r["results"][-1].get("steady") or r["results"][-1])["ttft_p50_ms"]
             - (r["results"][0].get("steady") or r["results"][0])["ttft_p50_ms"]
             for r in (plain, mtls)]
    print(f"{names[1]} (against {names[0]}) moves the added first-token time at the median by "
          f"{added[1] - added[0]:+.2f} ms")
    return added


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--words", type=int, default=50)
    ap.add_argument("--delay-ms", type=int, default=0)
    ap.add_argument("--stagger-ms", type=int, default=0)
    ap.add_argument("--think-ms", type=int, default=0)
    ap.add_argument("--client", default="c", choices=["c", "node", "c,node", "node,c"],
                    help="load generator(s), run one after the other (default c)")
    ap.add_argument("--auth", default="none", choices=["none", "jwt"],
                    help="the gateway's --auth (default none)")
    ap.add_argument("--user-prefix", default="load-", help="users are <prefix>0, <prefix>1, ...")
    ap.add_argument("--users", type=int, default=0, help="users the sessions are spread over "
                    "(default: one per session)")
    ap.add_argument("--metrics", choices=("on", "off", "both"), default="on",
                    help="metrics recorded and served (on), not at all (off: --metrics-listen "
                         "off everywhere), or runs of each side by side (both)")
    ap.add_argument("--trace", choices=("on", "off", "both"), default="off",
                    help="spans exported to a receiver in this process (on), not (off: ids "
                         "only), or runs of each side by side (both)")
    ap.add_argument("--tls", action="store_true",
                    help="run plaintext, then mutual TLS between the services, and compare")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with --tls, --metrics both or --trace both: alternate the two this "
                         "many times and "
                         "compare the medians (a noisy machine)")
    ap.add_argument("--durable", action="store_true",
                    help="PostgreSQL with fsync=on (the harness's default is fsync=off)")
    ap.add_argument("--pg", action="append", default=[], metavar="NAME=VALUE",
                    help="a PostgreSQL setting (repeatable)")
    ap.add_argument("--log-level", default="warn", help="LOG_LEVEL of every service")
    ap.add_argument("--store-arg", action="append", default=[], metavar="ARG",
                    help="an extra store-svc option (repeatable)")
    ap.add_argument("--persist-nice", type=int, default=0, metavar="N",
                    help="run PostgreSQL and store-svc at this nice value (an experiment: the "
                    "token path first, persistence when a core is free)")
    ap.add_argument("--cold", action="store_true",
                    help="no warm-up session before the run (the gateway's channels to the "
                    "services then connect during the first burst)")
    ap.add_argument("--no-direct", dest="direct", action="store_false",
                    help="leave out the same requests straight to the model")
    ap.add_argument("--turn-log", help="the C generator writes a JSON line per turn here "
                    "(with CONVO_KEEP_TMP=1 the services' logs are kept to line them up)")
    ap.add_argument("gateway_args", nargs="*", help="extra gateway options (after --)")
    return ap.parse_args()


def run_system(a, tls, metrics="on", as_json=False, trace="off"):
    """Every load generator of --client against one fresh system; returns
    (exit status, the JSON reports when as_json)."""
    collector = Collector() if trace == "on" else None
    try:
        return run_stack(a, tls, metrics, as_json, collector)
    finally:
        if collector is not None:
            print(f"--- the collector took {collector.spans} spans", flush=True)
            collector.close()


def run_stack(a, tls, metrics, as_json, collector):
    settings = {"fsync": "on", "synchronous_commit": "on"} if a.durable else {}
    for kv in a.pg:
        k, _, v = kv.partition("=")
        settings[k] = v
    quiet = {"LOG_LEVEL": a.log_level}
    if collector is not None:
        quiet["OTEL_EXPORTER_OTLP_ENDPOINT"] = collector.url
    # The offline model serves no metrics; every other process gets
    # --metrics-listen off when they are off.
    off = ["--metrics-listen", "off"] if metrics == "off" else []
    auth_args, token_file = ["--auth", a.auth], None
    if a.auth == "jwt":
        secret, token_file = write_tokens(a.users or a.sessions, a.user_prefix)
        auth_args += ["--jwt-secret-file", str(secret)]
    ids, admin = {}, None
    if tls:
        ca = CA("bench-ca")
        ids = {n: ca.issue(n) for n in ("store-svc", "llm-svc", "router-svc", "gateway")}
        admin = ca.issue("admin")
    print(f"--- {'mutual TLS between the services' if tls else 'plaintext'}, metrics {metrics}, "
          f"traces {'on' if collector is not None else 'off'}", flush=True)
    with Postgres(settings=settings) as pg:
        store = Service("store-svc", args=[*a.store_arg, *off], env={"DATABASE_URL": pg.url, **quiet},
                        tls=ids.get("store-svc"), caller=admin)
        model = Service("offline-model", binary=build_dir() / "llm-svc" / "offline-model",
                        args=["--token-delay-ms", "0", "--log-level", a.log_level], ready="tcp")
        llm = Service("llm-svc", args=["--store", store.addr, *off],
                      env={"OPENAI_BASE_URL": f"http://{model.addr}/v1", "OPENAI_API_KEY": "offline",
                           **quiet}, tls=ids.get("llm-svc"), caller=admin)
        router = Service("router-svc", args=off, env=quiet, tls=ids.get("router-svc"), caller=admin)
        gw = Service("gateway", args=["--router", router.addr, "--llm", llm.addr, "--store",
                                      store.addr, "--summary", "127.0.0.1:1", *UNLIMITED,
                                      *auth_args, *off, *a.gateway_args],
                     env=quiet, ready="tcp", tls=ids.get("gateway"))
        services = (gw, router, llm, model, store)
        if a.persist_nice:
            renice([pg._proc.pid, *children(pg._proc.pid), store.pid], a.persist_nice)
        print("pids: " + ", ".join(f"{s.name} {s.pid}" for s in services) +
              f", PostgreSQL {pg._proc.pid}", flush=True)
        db = Poller(pg)
        meter = Meter(services, pg, db)
        failed, want, reports = 0, 0, []
        try:
            if not a.cold:
                ok, want = warm_up(a, gw, token_file)
                failed |= not ok
            for client in a.client.split(","):
                rc, all_stored, want, report = run_client(client, a, gw, model, db, meter,
                                                          token_file, want, as_json)
                failed |= rc != 0 or not all_stored
                reports.append(report)
            return (1 if failed else 0), reports
        finally:
            db.close()
            for s in services:
                s.stop()


def main():
    a = parse_args()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} CPUs; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    if a.tls + (a.metrics == "both") + (a.trace == "both") > 1:
        print("--tls, --metrics both and --trace both: compare one thing at a time",
              file=sys.stderr)
        return 2
    if a.tls:
        sides = [("plaintext", {"tls": False, "metrics": a.metrics, "trace": a.trace}),
                 ("mutual TLS", {"tls": True, "metrics": a.metrics, "trace": a.trace})]
    elif a.metrics == "both":
        sides = [("metrics off", {"tls": False, "metrics": "off", "trace": a.trace}),
                 ("metrics on", {"tls": False, "metrics": "on", "trace": a.trace})]
    elif a.trace == "both":
        sides = [("traces off", {"tls": False, "metrics": a.metrics, "trace": "off"}),
                 ("traces on", {"tls": False, "metrics": a.metrics, "trace": "on"})]
    else:
        return run_system(a, tls=False, metrics=a.metrics, trace=a.trace)[0]
    if not a.direct:
        print("a side-by-side run compares with the direct path: leave out --no-direct",
              file=sys.stderr)
        return 2
    names = [n for n, _ in sides]
    status, added = 0, {n: [] for n in names}
    for i in range(a.rounds):
        reports = {}
        # Alternate which side runs first: on a machine whose load drifts,
        # a fixed order would charge the drift to the side that runs second.
        for name, kw in (sides if i % 2 == 0 else sides[::-1]):
            rc, reps = run_system(a, as_json=True, **kw)
            reports[name] = reps[0]
            status = status or rc
        print(f"\nround {i + 1} of {a.rounds}")
        for name, p50 in zip(names, compare(names, reports[names[0]], reports[names[1]])):
            added[name].append(p50)
    if a.rounds > 1:
        med = {k: statistics.median(v) for k, v in added.items()}
        print(f"\nadded first-token time at the median (steady window where there is one), "
              f"median of {a.rounds} rounds: {names[0]} {med[names[0]]:.2f} ms, {names[1]} "
              f"{med[names[1]]:.2f} ms, difference {med[names[1]] - med[names[0]]:+.2f} ms")
        diffs = [b - a_ for a_, b in zip(added[names[0]], added[names[1]])]
        print(f"{names[1]} against {names[0]}, round by round: "
              f"{', '.join(f'{d:+.2f}' for d in diffs)} ms; median {statistics.median(diffs):+.2f} ms")
    return status


if __name__ == "__main__":
    sys.exit(main())
