"""Metrics of the whole stack seen by a real Prometheus (Debian's package):
every process is a scrape target that is up, a scripted conversation of
many sessions and users (Python's websockets) moves the turn, token and event
counters by exactly what happened, the alert rules load and evaluate against
the real series, promtool accepts each process's exposition, and no session
or user id is ever a label value. Then --metrics-listen's auto, off and a
port clash."""

import asyncio
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import psycopg2
import pytest
import websockets
import yaml

from harness import REPO_ROOT, Service, find_binary, free_port, tmp_root
from stack import Stack, ws_url

PROCESSES = ["gateway", "router-svc", "llm-svc", "store-svc", "summary-svc"]
RULES = REPO_ROOT / "deploy" / "k8s" / "monitoring" / "prometheusrule.yaml"
SESSIONS = 30  # each with its own session id
USERS = 12  # sessions spread over these user ids
ID_MARK = "idmark"  # in every session and user id, never in a label value
QUESTIONS = ["What is Python? [[words:6]]", "hello there [[words:4]]"]


# ---- the stack ------------------------------------------------------------

@pytest.fixture(scope="module")
def stack():
    """The whole stack over mutual TLS, as deployed; the gateway with --auth
    dev (every connection carries a token). The sweep runs each second so
    that every ended session is summarized during the test."""
    with Stack(tls=True, env={"SUMMARY_SWEEP_INTERVAL_MS": "1000",
                              "SUMMARY_SWEEP_DELAY_MS": "0"}) as s:
        gateway = s.gateway("--rate-limit", "6000")
        procs = {"gateway": gateway, "router-svc": s.router, "llm-svc": s.llm,
                 "store-svc": s.store, "summary-svc": s.summary}
        yield s.pg, procs
        for svc in (gateway, s.summary, s.router, s.llm, s.store):
            assert svc.stop() == 0, svc.log_tail()


def prometheus_ready(svc):
    with urllib.request.urlopen(f"http://{svc.addr}/-/ready", timeout=2) as r:
        return r.status == 200


@pytest.fixture(scope="module")
def prometheus(stack):
    """Prometheus scraping every process each second, with the alert rules
    of deploy/k8s/monitoring loaded."""
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus not installed (Debian package prometheus; deploy/install-deps.sh)")
    _, procs = stack
    d = tmp_root() / "prometheus"
    d.mkdir()
    groups = yaml.safe_load(RULES.read_text())["spec"]["groups"]
    (d / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
        "rule_files": [str(d / "rules.yaml")],
        "scrape_configs": [{"job_name": name, "static_configs": [
            {"targets": [svc.metrics_addr], "labels": {"namespace": "test"}}]}
            for name, svc in procs.items()],
    }
    (d / "prometheus.yml").write_text(yaml.safe_dump(config))
    svc = Service("prometheus", binary=shutil.which("prometheus"), listen_flag="--web.listen-address",
                  ready=prometheus_ready, timeout=60,
                  args=[f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
                        "--log.level=warn"])
    yield svc
    svc.stop()


def api(prom, path, **params):
    url = f"http://{prom.addr}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


def query(prom, expr):
    """The value of an expression giving one number (0 when it has no series)."""
    result = api(prom, "query", query=expr)["result"]
    assert len(result) <= 1, (expr, result)
    return float(result[0]["value"][1]) if result else 0.0


def eventually(fn, want, timeout=60):
    """Polls fn() until it equals want (a value) or want(value) holds."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if (want(got) if callable(want) else got == want) or time.monotonic() > deadline:
            return got
        time.sleep(0.25)


# ---- the conversation -----------------------------------------------------

async def converse(gateway, session, user):
    """Two turns; returns the tokens the client received."""
    tokens = 0
    async with websockets.connect(ws_url(gateway, session, user)) as ws:
        assert json.loads(await ws.recv())["type"] == "session"
        for q in QUESTIONS:
            await ws.send(json.dumps({"message": q}))
            while True:
                f = json.loads(await asyncio.wait_for(ws.recv(), 30))
                tokens += f["type"] == "token"
                if f["type"] in ("done", "error"):
                    assert f["type"] == "done", f
                    break
    return tokens


def conversation(gateway):
    async def all_sessions():
        ids = [(f"{ID_MARK}-s{i}", f"{ID_MARK}-u{i % USERS}") for i in range(SESSIONS)]
        return sum(await asyncio.gather(*(converse(gateway, s, u) for s, u in ids)))

    return asyncio.run(asyncio.wait_for(all_sessions(), 180))


# ---- the tests --------------------------------------------------------------

def test_prometheus_scrapes_every_process_and_the_counters_move(stack, prometheus):
    pg, procs = stack
    targets = eventually(lambda: api(prometheus, "targets")["activeTargets"],
                         lambda t: len(t) == len(PROCESSES) and all(x["health"] == "up" for x in t))
    assert sorted(t["labels"]["job"] for t in targets) == sorted(PROCESSES)
    assert all(t["health"] == "up" for t in targets), targets
    assert query(prometheus, "sum(up)") == len(PROCESSES)
    assert query(prometheus, 'sum(convo_gateway_turns_total)') == 0
    # Series whose label words are known exist at 0 before anything happens,
    # so rate() and increase() (the alerts) see their first counts.
    assert query(prometheus, "count(convo_gateway_events_dropped_total)") == 6
    assert query(prometheus, "count(convo_gateway_first_token_seconds_count)") == 4
    assert query(prometheus, 'count(convo_llm_upstream_requests_total{category="rate_limited"})') == 1

    received = conversation(procs["gateway"])
    turns = SESSIONS * len(QUESTIONS)
    assert received == SESSIONS * (6 + 4)

    def q(expr):
        return lambda: query(prometheus, expr)

    # Turns and tokens, counted by the gateway and by every service on the way.
    assert eventually(q('sum(convo_gateway_turns_total{outcome="done"})'), turns) == turns
    assert eventually(q("sum(convo_gateway_tokens_relayed_total)"), received) == received
    assert eventually(q("sum(convo_gateway_first_token_seconds_count)"), turns) == turns
    assert eventually(q("sum(convo_router_routes_total)"), turns) == turns
    assert eventually(q('sum(convo_llm_turns_total{kind="chat",outcome="done"})'), turns) == turns
    assert eventually(q('sum(convo_grpc_server_handled_total{job="router-svc",grpc_method="Route",'
                        'grpc_code="OK"})'), turns) == turns
    # Every Chat the gateway made ended (OK, or CANCELLED when the client
    # hung up between the done frame and the call's status).
    assert eventually(q('sum(convo_grpc_client_handled_total{job="gateway",grpc_method="Chat",'
                        'grpc_code=~"OK|CANCELLED"})'), turns) == turns
    assert eventually(q('sum(convo_grpc_client_calls_in_flight{job="gateway"})'), 0) == 0
    assert query(prometheus, 'sum(convo_llm_usage_tokens_total{kind="completion"})') >= received
    assert query(prometheus, 'sum(convo_llm_tool_calls_total{tool="fetch_internal_knowledge",'
                             'outcome="ok"})') >= SESSIONS
    p99 = query(prometheus, "histogram_quantile(0.99, sum by (le) "
                            "(rate(convo_gateway_first_token_seconds_bucket[1m])))")
    assert 0 < p99 < 30

    # Events: what the gateway stored is what store-svc appended is what
    # PostgreSQL holds, once the sessions ended and their last batch landed.
    def rows():
        with psycopg2.connect(pg.url) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM session_events")
            return cur.fetchone()[0]

    stored = eventually(lambda: (rows(), query(prometheus, "sum(convo_gateway_events_stored_total)"),
                                 query(prometheus, "sum(convo_store_events_appended_total)")),
                        lambda t: t[0] > 0 and t[0] == t[1] == t[2])
    assert stored[0] == stored[1] == stored[2] and stored[0] >= turns * 3, stored
    assert query(prometheus, "sum(convo_gateway_events_dropped_total)") == 0
    assert eventually(q("sum(convo_gateway_events_buffered)"), 0) == 0
    assert eventually(q("sum(convo_gateway_connections)"), 0) == 0
    assert eventually(q("sum(convo_gateway_sessions)"), 0) == 0
    # Every ended session was summarized (the gateway asked; the sweep backs it up).
    assert eventually(q('sum(convo_summarizer_jobs_total{outcome="done"})'),
                      lambda v: v >= SESSIONS, timeout=90) >= SESSIONS

    # The process figures of every process.
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                 "process_start_time_seconds", "convo_mem_allocated_bytes"):
        assert query(prometheus, f"count({name})") == len(PROCESSES), name
    programs = {r["metric"]["program"] for r in api(prometheus, "query",
                                                      query="convo_build_info")["result"]}
    assert programs == set(PROCESSES)

    # The alert rules load and evaluate against the real series.
    rules = [r for g in api(prometheus, "rules")["groups"] for r in g["rules"]]
    assert len(rules) == sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["spec"]["groups"])
    for r in eventually(lambda: [r for g in api(prometheus, "rules")["groups"] for r in g["rules"]],
                        lambda rs: all(r.get("lastEvaluation", "").startswith("2") for r in rs)):
        assert r["health"] == "ok", r
    firing = [a for a in api(prometheus, "alerts")["alerts"] if a["state"] == "firing"]
    assert not firing, firing


def test_promtool_accepts_every_exposition(stack):
    _, procs = stack
    promtool = shutil.which("promtool")
    assert promtool, "promtool not installed (Debian package prometheus)"
    for name, svc in procs.items():
        text = svc.scrape()
        assert "# TYPE process_cpu_seconds_total counter" in text, name
        r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           text=True)
        assert r.returncode == 0, f"{name}: {r.stdout}{r.stderr}"
        assert svc.scrape("/healthz").strip() == "ok", name


def test_no_session_or_user_id_is_a_label_value(stack, prometheus):
    """After the run above (SESSIONS sessions of USERS users), no label of
    any series Prometheus holds, nor any line a process exposes, carries an
    id: every id contains ID_MARK."""
    _, procs = stack
    seen = 0
    for label in api(prometheus, "labels"):
        for value in api(prometheus, f"label/{label}/values"):
            seen += 1
            assert ID_MARK not in value, (label, value)
    assert seen > 50  # the check looked at real label values
    for name, svc in procs.items():
        assert ID_MARK not in svc.scrape(), name
    # The ids did go through the system (the store has them).
    assert any(ID_MARK in line.get("session_id", "") for line in procs["gateway"].log_lines())


# ---- --metrics-listen -------------------------------------------------------

def port_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_metrics_listen_auto_is_the_service_port_plus_1000():
    for _ in range(50):
        port = free_port()
        if port + 1000 <= 65535 and port_free(port + 1000):
            break
    with Service("router-svc", port=port, args=["--metrics-listen", "auto"]) as svc:
        with urllib.request.urlopen(f"http://127.0.0.1:{port + 1000}/healthz", timeout=5) as r:
            assert r.read() == b"ok\n"
        with urllib.request.urlopen(f"http://127.0.0.1:{port + 1000}/metrics", timeout=5) as r:
            assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            assert b"convo_router_routes_total" in r.read()


def test_metrics_listen_off_serves_and_records_nothing():
    with Service("router-svc", args=["--metrics-listen", "off"]) as svc:
        assert svc.metrics_port is None
        assert "serving /metrics" not in svc.log_text()
        assert not any(l.get("message", "").startswith("serving /metrics") for l in svc.log_lines())


@pytest.mark.parametrize("binary", ["router-svc", "gateway"])
def test_metrics_port_clash_is_a_startup_error(binary):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # The gateway's default --auth jwt wants a key source: dev needs none.
        auth = ["--auth", "dev"] if binary == "gateway" else []
        r = subprocess.run([str(find_binary(binary)), "--listen", f"127.0.0.1:{free_port()}",
                            "--metrics-listen", f"127.0.0.1:{port}", *auth],
                           capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, r.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in r.stderr


def test_metrics_listen_bad_value_is_a_usage_error():
    r = subprocess.run([str(find_binary("store-svc")), "--metrics-listen", "9100"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "--metrics-listen: '9100' is not HOST:PORT, auto or off" in r.stderr
