"""Shared pieces of the store-svc tests: a throwaway PostgreSQL (initdb +
pg_ctl through the harness, never a mock), store-svc in front of it, and
small helpers for building requests and reading results."""

import os
import sys
import threading
import time

import grpc
import pytest

# `/usr/bin/python3 -m pytest tests/store` without PYTHONPATH (ctest sets it).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "harness"))

from harness import Postgres, Service, proto_stubs  # noqa: E402

pb = proto_stubs()
S = pb.store_pb2
C = pb.common_pb2
H = pb.health_pb2
SERVING = H.HealthCheckResponse.SERVING
NOT_SERVING = H.HealthCheckResponse.NOT_SERVING

# Limits the tests start store-svc with (small, to test the bounds cheaply).
MAX_CONTENT = 4096
MAX_BATCH = 1000

# ASan's quarantine would keep 256 MB of freed memory resident and hide
# whether memory stays bounded; harmless without a sanitizer.
SANITIZER_ENV = {"ASAN_OPTIONS": "quarantine_size_mb=8:detect_leaks=1",
                 "UBSAN_OPTIONS": "print_stacktrace=1"}


def store_args(*extra):
    return ["--max-content-bytes", str(MAX_CONTENT), "--max-batch-events", str(MAX_BATCH),
            "--db-retry-max-ms", "500", "--log-level", "info", *extra]


def start_store(pg_url, *extra, ready="grpc", env=None, timeout=30.0):
    e = {"DATABASE_URL": pg_url, **SANITIZER_ENV}
    e.update(env or {})
    return Service("store-svc", args=store_args(*extra), env=e, ready=ready, timeout=timeout)


def check_clean_exit(svc):
    """Stops a store-svc with SIGTERM: it exits 0 (no sanitizer report, no
    leak) and every log line is one JSON object."""
    assert svc.stop() == 0, svc.log_tail()
    for line in svc.log_lines(strict=True):
        assert {"time", "level", "service", "message"} <= line.keys(), line


@pytest.fixture(scope="module")
def pg():
    with Postgres() as p:
        yield p


@pytest.fixture(scope="module")
def store(pg):
    svc = start_store(pg.url)
    yield svc
    check_clean_exit(svc)


@pytest.fixture(scope="module")
def stub(store):
    return pb.store_pb2_grpc.StoreStub(store.channel())


_counter = [0]
_counter_lock = threading.Lock()


def new_id(prefix="s"):
    """A session id unique within the test run."""
    with _counter_lock:
        _counter[0] += 1
        return f"{prefix}-{os.getpid()}-{int(time.time() * 1000) % 100000000}-{_counter[0]}"


def ev(seq, content=None, type=S.EVENT_TYPE_AI_TOKEN, ts=0, session_id=""):
    return S.Event(seq=seq, type=type, content=f"e{seq}" if content is None else content,
                   timestamp_us=ts, session_id=session_id)


def open_session(stub, sid, user="u1"):
    return stub.OpenSession(S.OpenSessionRequest(session_id=sid, user_id=user), timeout=10)


def append(stub, sid, events, timeout=30, user="u1"):
    return stub.AppendEvents(S.AppendEventsRequest(session_id=sid, events=events, user_id=user),
                             timeout=timeout)


def end(stub, sid, user="u1", end_time_us=0, timeout=10):
    """EndSession as the owner `user`; returns the session."""
    return stub.EndSession(S.EndSessionRequest(session_id=sid, user_id=user,
                                               end_time_us=end_time_us), timeout=timeout).session


def list_events(stub, sid, after_seq=0, limit=0, timeout=60):
    return list(stub.ListEvents(S.ListEventsRequest(session_id=sid, after_seq=after_seq,
                                                    limit=limit), timeout=timeout))


def rpc_error(fn, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, **kw)
    return e.value


def wait_health(svc, want, timeout=20.0, service=""):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = svc.health_check(service, timeout=2.0)
            if last == want:
                return
        except grpc.RpcError as e:
            last = e.code()
        time.sleep(0.05)
    raise AssertionError(f"health of {service!r} is {last}, not {want}, after {timeout}s; log:\n"
                         f"{svc.log_tail()}")


def append_with_retry(stub, sid, events, deadline_s=60.0):
    """What a careful caller does: retry UNAVAILABLE (and a deadline that
    passed) with backoff until the batch is acknowledged. Returns the last
    response and how many attempts were made."""
    delay, attempts = 0.05, 0
    end = time.monotonic() + deadline_s
    while True:
        attempts += 1
        try:
            return append(stub, sid, events, timeout=5), attempts
        except grpc.RpcError as e:
            if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            if time.monotonic() > end:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
