"""ListEvents streams page by page: a 100,000-event session never sits whole
in store-svc's memory, slow readers and cancellations are handled without
holding a worker, and a read resumes with after_seq."""

import threading
import time
from concurrent import futures

import grpc
import pytest

from conftest import (S, append, check_clean_exit, ev, list_events, new_id, open_session, pb,
                      start_store)
from harness import Postgres

N_BIG = 100_000
CONTENT_BYTES = 1000  # 100 MB of content in the big session


@pytest.fixture(scope="module")
def pg():
    with Postgres() as p:
        yield p


@pytest.fixture(scope="module")
def store(pg):
    # Small pages and a small pool: many page jobs, parked streams and
    # workers shared between streams.
    svc = start_store(pg.url, "--db-pool-size", "2", "--list-page-size", "500",
                      "--max-queued-writes", "64")
    yield svc
    check_clean_exit(svc)


@pytest.fixture
def stub(store):
    # Per test: a restart closes the channels of the one before.
    return pb.store_pb2_grpc.StoreStub(store.channel())


@pytest.fixture(scope="module")
def big_session(store):
    stub = pb.store_pb2_grpc.StoreStub(store.channel())
    sid = new_id("big")
    open_session(stub, sid)
    pad = "x" * (CONTENT_BYTES - 11)

    def put(start):
        batch = [ev(i, f"{i:010d}:{pad}") for i in range(start, start + 1000)]
        assert append(stub, sid, batch, timeout=120).appended == 1000

    with futures.ThreadPoolExecutor(4) as ex:
        list(ex.map(put, range(1, N_BIG + 1, 1000)))
    return sid


def rss_kb(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_100k_events_stream_in_order_with_bounded_memory(store, big_session):
    # A fresh process: its memory so far says nothing about the writes.
    check_clean_exit(store)
    store.start()
    stub = pb.store_pb2_grpc.StoreStub(store.channel())
    pid = store.pid
    base = rss_kb(pid)
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_kb(pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    n, expect, t0 = 0, 1, time.monotonic()
    try:
        for e in stub.ListEvents(S.ListEventsRequest(session_id=big_session), timeout=300):
            assert e.seq == expect
            assert e.content.startswith(f"{expect:010d}:") and len(e.content) == CONTENT_BYTES
            expect += 1
            n += 1
    finally:
        done.set()
        sampler.join()
    elapsed = time.monotonic() - t0
    assert n == N_BIG
    grown_mb = (peak[0] - base) / 1024
    print(f"streamed {n} events ({n * CONTENT_BYTES / 1e6:.0f} MB) in {elapsed:.1f}s; "
          f"server RSS {base / 1024:.0f} MB -> peak {peak[0] / 1024:.0f} MB")
    # Loose on purpose (allocator and sanitizer slack), but far below the
    # 100 MB the whole log would take.
    assert grown_mb < 40, f"server memory grew by {grown_mb:.0f} MB while streaming"


def test_slow_reader_and_cancel_mid_stream(store, stub, big_session):
    call = stub.ListEvents(S.ListEventsRequest(session_id=big_session), timeout=120)
    it = iter(call)
    assert next(it).seq == 1
    time.sleep(1.0)  # the server's write queue fills; its stream parks
    got = [next(it).seq for _ in range(999)]
    assert got == list(range(2, 1001))
    call.cancel()
    with pytest.raises(grpc.RpcError) as e:
        for _ in it:
            pass
    assert e.value.code() == grpc.StatusCode.CANCELLED
    # The workers are free: other calls go through at once.
    sid = new_id()
    open_session(stub, sid)
    assert stub.GetSession(S.GetSessionRequest(session_id=big_session),
                           timeout=5).session.event_count == N_BIG
    # A read resumes where the cancelled one stopped.
    resumed = list_events(stub, big_session, after_seq=1000, limit=5)
    assert [e.seq for e in resumed] == [1001, 1002, 1003, 1004, 1005]


def test_deadline_mid_stream(store, stub, big_session):
    with pytest.raises(grpc.RpcError) as e:
        for _ in stub.ListEvents(S.ListEventsRequest(session_id=big_session), timeout=0.3):
            time.sleep(0.001)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert stub.GetSession(S.GetSessionRequest(session_id=big_session), timeout=5).session


def test_many_concurrent_streams(store, stub):
    sid = new_id()
    open_session(stub, sid)
    for b in range(1, 5001, 1000):
        append(stub, sid, [ev(i) for i in range(b, b + 1000)])

    def read(k):
        after = k * 100
        return [e.seq for e in list_events(stub, sid, after_seq=after)], after

    with futures.ThreadPoolExecutor(12) as ex:
        for seqs, after in ex.map(read, range(24)):
            assert seqs == list(range(after + 1, 5001))


def test_limit_across_pages(store, stub, big_session):
    got = list_events(stub, big_session, after_seq=250, limit=1234)
    assert [e.seq for e in got] == list(range(251, 1485))


def test_pages_held_at_once_are_bounded_over_all_streams(pg, big_session):
    """--list-pages-max: a reader that stops reading keeps its stream's page
    (parked), so with one page allowed another stream waits, holding no
    worker, until the first is cancelled; it then streams whole."""
    svc = start_store(pg.url, "--list-pages-max", "1", "--list-page-size", "500",
                      "--db-pool-size", "2", "--max-queued-writes", "64")
    try:
        stub = pb.store_pb2_grpc.StoreStub(svc.channel())
        small = new_id("small")
        open_session(stub, small)
        for start in (1, 601):  # three pages
            append(stub, small, [ev(i) for i in range(start, start + 600)])
        # The reader's flow-control window stays at 64 KB (no BDP probing):
        # a page of 500 1-KB events can never be sent whole while it does not
        # read, so the stream keeps its page.
        slow = pb.store_pb2_grpc.StoreStub(svc.channel(options=[
            ("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65536)]))
        a = slow.ListEvents(S.ListEventsRequest(session_id=big_session), timeout=120)
        first = iter(a)
        assert next(first).seq == 1  # and no more read: its page stays held
        b = stub.ListEvents(S.ListEventsRequest(session_id=small), timeout=120)
        got = []
        reader = threading.Thread(target=lambda: got.extend(e.seq for e in b))
        reader.start()
        deadline = time.monotonic() + 30
        while svc.metric("convo_store_list_page_waits_total") < 1:
            assert time.monotonic() < deadline, "the second stream never waited for a page"
            time.sleep(0.05)
        assert got == [], "the second stream was sent events past the page budget"
        assert svc.metric("convo_store_list_pages_held") == 1
        # Waiting holds no worker: other calls go through.
        assert stub.GetSession(S.GetSessionRequest(session_id=small),
                               timeout=5).session.event_count == 1200
        a.cancel()
        reader.join(60)
        assert got == list(range(1, 1201))
        assert svc.metric("convo_store_list_pages_held") == 0
    finally:
        check_clean_exit(svc)
