#!/usr/bin/python3
"""A stand-in for one of our services, for the harness's own tests.

Serves grpc.health.v1.Health (generated from proto/ by the harness) on
--listen HOST:PORT and writes JSON log lines on stderr, like our binaries.
On SIGTERM it stops and exits with --exit-code (default 0).
  --fail-start     write a log line and exit 3 at once
  --ignore-term    ignore SIGTERM (for stop() timeout tests)
  --not-serving    report NOT_SERVING for ""
"""

import argparse
import json
import os
import signal
import sys
import threading
import time
from concurrent import futures

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grpc  # noqa: E402

from harness import proto_stubs  # noqa: E402


def log(level, message, **fields):
    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "level": level,
            "service": "fake-svc", "message": message, **fields}
    sys.stderr.write(json.dumps(line) + "\n")
    sys.stderr.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", default=os.environ.get("LISTEN_ADDR", "127.0.0.1:50099"))
    ap.add_argument("--exit-code", type=int, default=0)
    ap.add_argument("--fail-start", action="store_true")
    ap.add_argument("--ignore-term", action="store_true")
    ap.add_argument("--not-serving", action="store_true")
    opts = ap.parse_args()

    if opts.fail_start:
        log("error", "cannot start: told to fail")
        return 3

    pb = proto_stubs()
    health = pb.health_pb2

    class Health(pb.health_pb2_grpc.HealthServicer):
        def Check(self, request, context):
            status = {"": health.HealthCheckResponse.NOT_SERVING if opts.not_serving
                      else health.HealthCheckResponse.SERVING,
                      "fake.Service": health.HealthCheckResponse.SERVING}.get(request.service)
            if status is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
            meta = dict(context.invocation_metadata())
            log("info", "health check", service_name=request.service,
                request_id=meta.get("x-request-id", ""))
            return health.HealthCheckResponse(status=status)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, signal.SIG_IGN if opts.ignore_term else lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb.health_pb2_grpc.add_HealthServicer_to_server(Health(), server)
    if server.add_insecure_port(opts.listen) == 0:
        log("error", f"cannot bind {opts.listen}: address already in use")
        return 1
    server.start()
    log("info", "listening", listen=opts.listen, env_probe=os.environ.get("FAKE_PROBE", ""))
    print("stdout is kept apart", flush=True)
    sys.stderr.write("a line that is not JSON\n")
    sys.stderr.flush()
    stop.wait()
    log("info", "stopping")
    server.stop(grace=1).wait()
    return opts.exit_code


if __name__ == "__main__":
    sys.exit(main())
