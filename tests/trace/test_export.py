"""The span exporter against collectors that misbehave or want TLS, with a
real process (router-svc) exporting the server spans of the Route calls
made here (grpcio) to a test collector in this process (http.server, Python's ssl):

- a collector that answers 503 (or 429 with Retry-After) a few times gets
  the same batch again, and every span arrives once it takes them;
- a collector that refuses a batch for good (400) is not asked again;
- https: the collector's certificate is checked against
  OTEL_EXPORTER_OTLP_CERTIFICATE (spans arrive), and one from another CA
  is refused (nothing sent);
- a collector that wants a client certificate gets the one of
  OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE / _CLIENT_KEY, and refuses a
  process without one;
- a client certificate without its key, or an unreadable CA file, stops
  the process at start-up with a message naming the variable."""

import http.server
import json
import ssl
import subprocess
import threading
import time

from certs import CA
from harness import Service, build_dir, free_port, proto_stubs

TIMEOUT = 30
# Exports every 50 ms; each batch may take 20 s with its retries.
FAST = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_BSP_EXPORT_TIMEOUT": "20000"}


class Collector:
    """POST /v1/traces; the first `fail` requests are answered `status`
    (with `retry_after` seconds when given), the rest 200 {}. With `tls`
    (a certs.Identity) it speaks https with that certificate, and with
    require_client_cert it wants a client certificate signed by the
    identity's CA."""

    def __init__(self, fail=0, status=503, retry_after=None, tls=None, require_client_cert=False):
        self.lock = threading.Lock()
        self.requests = 0  # every POST that reached a handler
        self.span_ids = []  # of the requests answered 200, in arrival order
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with collector.lock:
                    collector.requests += 1
                    refuse = collector.requests <= fail
                    if not refuse:
                        for rs in json.loads(body)["resourceSpans"]:
                            for ss in rs["scopeSpans"]:
                                collector.span_ids += [sp["spanId"] for sp in ss["spans"]]
                answer = b'{"error":"not now"}' if refuse else b"{}"
                self.send_response(status if refuse else 200)
                if refuse and retry_after is not None:
                    self.send_header("Retry-After", str(retry_after))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        scheme = "http"
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls.cert), str(tls.key))
            if require_client_cert:
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(str(tls.ca))
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self):
        with self.lock:
            return list(self.span_ids)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def exporting(collector, **env):
    """router-svc exporting to the collector, after three Route calls
    (a server span each)."""
    svc = Service("router-svc", env={"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, **FAST, **env})
    pb = proto_stubs()
    with svc.channel() as ch:
        stub = pb.router_pb2_grpc.RouterStub(ch)
        for _ in range(3):
            stub.Route(pb.router_pb2.RouteRequest(session_id="s", user_id="u",
                                                  last_user_message="hi", user_message_count=1),
                       timeout=10)
    return svc


def wait_for(cond, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.1)
    return cond()


def test_a_batch_refused_for_now_is_sent_again_until_taken():
    collector = Collector(fail=2, status=503)
    svc = exporting(collector)
    try:
        assert wait_for(lambda: len(collector.spans()) >= 3), collector.requests
        assert svc.metric("convo_trace_export_retries_total") >= 2
        assert svc.metric("convo_trace_export_failures_total") == 0
        assert svc.metric("convo_trace_spans_dropped_total", reason="export_failed") == 0
        # The batch that was refused twice arrived once, not three times.
        assert len(collector.spans()) == len(set(collector.spans()))
    finally:
        svc.stop()
        collector.stop()


def test_retry_after_of_a_rate_limiting_collector_is_honoured():
    collector = Collector(fail=1, status=429, retry_after=2)
    svc = exporting(collector)
    try:
        assert wait_for(lambda: collector.requests >= 1)
        refused_at = time.monotonic()
        assert wait_for(lambda: collector.requests >= 2)
        # Asked to wait 2 s, the exporter did not come back sooner (its own
        # backoff alone would be 0.5-1.5 s).
        assert time.monotonic() - refused_at >= 1.5
        assert wait_for(lambda: len(collector.spans()) >= 3)
        assert svc.metric("convo_trace_export_retries_total") >= 1
    finally:
        svc.stop()
        collector.stop()


def test_a_batch_refused_for_good_is_dropped_not_resent():
    collector = Collector(fail=10**6, status=400)
    svc = exporting(collector)
    try:
        assert wait_for(lambda: svc.metric("convo_trace_export_failures_total") >= 1)
        failures = svc.metric("convo_trace_export_failures_total")
        assert svc.metric("convo_trace_export_retries_total") == 0
        assert svc.metric("convo_trace_spans_dropped_total", reason="export_failed") >= 1
        # One request per failed batch: a 400 is never asked again.
        assert collector.requests == failures
    finally:
        svc.stop()
        collector.stop()


def test_https_collector_checked_against_the_given_ca():
    ca, other = CA("collector-ca"), CA("someone-else")
    good = Collector(tls=ca.issue("otel-collector"))
    svc = exporting(good, OTEL_EXPORTER_OTLP_CERTIFICATE=str(ca.cert))
    try:
        assert wait_for(lambda: len(good.spans()) >= 3)
    finally:
        svc.stop()
        good.stop()
    # A collector whose certificate another CA signed gets nothing.
    impostor = Collector(tls=other.issue("otel-collector"))
    svc = exporting(impostor, OTEL_EXPORTER_OTLP_CERTIFICATE=str(ca.cert))
    try:
        assert wait_for(lambda: svc.metric("convo_trace_export_failures_total") >= 1)
        assert impostor.spans() == [] and impostor.requests == 0
        assert svc.metric("convo_trace_export_retries_total") == 0  # not transient
    finally:
        svc.stop()
        impostor.stop()


def test_a_collector_that_wants_a_client_certificate():
    ca = CA("collector-ca")
    server = ca.issue("otel-collector")
    client = ca.issue("router-svc")
    strict = Collector(tls=server, require_client_cert=True)
    svc = exporting(strict, OTEL_EXPORTER_OTLP_CERTIFICATE=str(ca.cert),
                    OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE=str(client.cert),
                    OTEL_EXPORTER_OTLP_CLIENT_KEY=str(client.key))
    try:
        assert wait_for(lambda: len(strict.spans()) >= 3)
    finally:
        svc.stop()
    # Without one the collector refuses the handshake: nothing arrives.
    svc = exporting(strict, OTEL_EXPORTER_OTLP_CERTIFICATE=str(ca.cert))
    try:
        before = len(strict.spans())
        assert wait_for(lambda: svc.metric("convo_trace_export_failures_total") >= 1)
        assert len(strict.spans()) == before
    finally:
        svc.stop()
        strict.stop()


def test_tls_settings_that_cannot_work_stop_the_process_at_start():
    ca = CA("collector-ca")
    client = ca.issue("router-svc")
    binary = build_dir() / "router-svc" / "router-svc"
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://127.0.0.1:9", "PATH": "/usr/bin:/bin"}
    cases = [
        ({"OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(client.cert)}, "go together"),
        ({"OTEL_EXPORTER_OTLP_CLIENT_KEY": str(client.key)}, "go together"),
        ({"OTEL_EXPORTER_OTLP_CERTIFICATE": "/nonexistent/ca.pem"}, "/nonexistent/ca.pem"),
        ({"OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": "/nonexistent/t.pem"}, "/nonexistent/t.pem"),
    ]
    for env, said in cases:
        r = subprocess.run([str(binary), "--listen", f"127.0.0.1:{free_port()}"],
                           env={**base, **env}, capture_output=True, text=True, timeout=20)
        assert r.returncode == 2, (env, r.returncode, r.stderr)
        assert said in r.stderr, (env, r.stderr)
