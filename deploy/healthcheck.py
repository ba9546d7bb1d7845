#!/usr/bin/python3
"""Waits until one local service is healthy; deploy/run.sh's readiness check.

    healthcheck.py [--timeout S] [--pid PID] grpc HOST:PORT   # grpc.health.v1.Health/Check("") == SERVING
    healthcheck.py [--timeout S] [--pid PID] http URL         # GET URL answers 200 (prints the body)
    healthcheck.py [--timeout S] [--pid PID] tcp HOST:PORT    # the port accepts connections

Exit status: 0 healthy; 1 timed out (the last state is printed); 2 the
process --pid exited first. Needs Debian's python3-grpcio for `grpc` (no
generated stubs: Check("") is an empty request and the answer's field 1 is
the status, decoded by hand).
"""
import argparse
import os
import socket
import sys
import time
import urllib.request

SERVING = 1
STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def alive(pid):
    if pid is None:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


def grpc_probe(addr):
    import grpc

    channel = grpc.insecure_channel(addr)
    check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                request_serializer=lambda b: b, response_deserializer=lambda b: b)

    def probe():
        try:
            raw = check(b"", timeout=1.0)
        except grpc.RpcError as e:
            return False, f"{e.code().name}: {e.details()}"
        # HealthCheckResponse { ServingStatus status = 1; }: b"\x08<status>" or b"" (0).
        status = raw[1] if len(raw) >= 2 and raw[0] == 0x08 else 0
        return status == SERVING, STATUS_NAMES.get(status, str(status))

    return probe


def http_probe(url):
    def probe():
        try:
            with urllib.request.urlopen(url, timeout=1.0) as r:
                body = r.read().decode("utf-8", "replace")
                return r.status == 200, body
        except Exception as e:  # connection refused, HTTP error, timeout
            return False, str(e)

    return probe


def tcp_probe(addr):
    host, port = addr.rsplit(":", 1)

    def probe():
        try:
            socket.create_connection((host, int(port)), timeout=0.5).close()
            return True, "open"
        except OSError as e:
            return False, str(e)

    return probe


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--pid", type=int)
    ap.add_argument("kind", choices=["grpc", "http", "tcp"])
    ap.add_argument("target")
    a = ap.parse_args()
    probe = {"grpc": grpc_probe, "http": http_probe, "tcp": tcp_probe}[a.kind](a.target)
    deadline = time.monotonic() + a.timeout
    last = "not checked"
    while True:
        ok, last = probe()
        if ok:
            if a.kind == "http":
                print(last)
            return 0
        if not alive(a.pid):
            print(f"process {a.pid} exited", file=sys.stderr)
            return 2
        if time.monotonic() > deadline:
            print(f"not healthy after {a.timeout:g} s: {last}", file=sys.stderr)
            return 1
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
