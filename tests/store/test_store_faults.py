"""store-svc when PostgreSQL is not there, goes away or comes back, and its
migrations run several at once (replicas, a migrate Job)."""

import subprocess
import threading
import time
import urllib.error
from concurrent import futures

import grpc
import pytest

from conftest import (C, NOT_SERVING, SERVING, S, SANITIZER_ENV, append, append_with_retry,
                      check_clean_exit, ev, list_events, new_id, open_session, pb, rpc_error,
                      start_store, wait_health)
from harness import Postgres, find_binary


def migrate(url, *extra, timeout=60):
    """Runs `store-svc migrate` to its end; returns (exit code, stderr)."""
    r = subprocess.run([str(find_binary("store-svc")), "migrate", "--database-url", url, *extra],
                       capture_output=True, text=True, timeout=timeout,
                       env={**SANITIZER_ENV, "PATH": "/usr/bin:/bin"})
    return r.returncode, r.stderr


def versions(pg):
    return pg.psql("SELECT string_agg(version::text, ',' ORDER BY version) "
                   "FROM schema_migrations").strip()


def stub_of(svc):
    return pb.store_pb2_grpc.StoreStub(svc.channel())


# ---------------------------------------------------------------- down at start


def test_database_down_at_start_then_up():
    with Postgres(start=False) as pg:
        svc = start_store(pg.url, ready="grpc-up")
        try:
            for service in ("", "convo.v1.Store"):
                assert svc.health_check(service) == NOT_SERVING
            stub = stub_of(svc)
            err = rpc_error(open_session, stub, new_id())
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            time.sleep(1.0)  # several failed attempts, still not serving
            assert svc.health_check("") == NOT_SERVING
            # /healthz follows the gRPC health; the metrics say why.
            with pytest.raises(urllib.error.HTTPError) as e:
                svc.scrape("/healthz")
            assert e.value.code == 503
            assert svc.metric("convo_store_db_connect_failures_total") >= 2
            assert svc.metric("convo_store_db_connections") == 0
            assert svc.metric("convo_store_unavailable_total") >= 1
            pg.start()
            wait_health(svc, SERVING, timeout=15)
            assert svc.scrape("/healthz").strip() == "ok"
            assert svc.metric("convo_store_db_connections") >= 1
            wait_health(svc, SERVING, timeout=1, service="convo.v1.Store")
            sid = new_id()
            assert open_session(stub, sid).created
            assert append(stub, sid, [ev(1)]).appended == 1
            assert versions(pg) == "1,2,3,4,5"
            # The outage was logged once, not once per attempt.
            warns = [l for l in svc.log_lines() if "database unavailable" in l.get("message", "")]
            assert 1 <= len(warns) <= 2, warns
        finally:
            check_clean_exit(svc)


# ---------------------------------------------------------------- restarts


@pytest.fixture(scope="module")
def pg():
    with Postgres() as p:
        yield p


@pytest.fixture(scope="module")
def store(pg):
    svc = start_store(pg.url, "--db-pool-size", "4")
    yield svc
    check_clean_exit(svc)


def test_restart_in_the_middle_of_a_write_burst(pg, store):
    """Writers keep appending while PostgreSQL is stopped and started again;
    each retries a failed batch until it is acknowledged. Afterwards every
    session holds exactly the acknowledged events, in order, once."""
    stub = stub_of(store)
    sessions = [new_id("burst") for _ in range(8)]
    for sid in sessions:
        open_session(stub, sid)
    stop = threading.Event()
    acked = {sid: 0 for sid in sessions}      # batches acknowledged
    appended = {sid: 0 for sid in sessions}   # events reported written
    retried = [0]
    errors = []
    health_seen = set()

    def writer(sid):
        try:
            seq = 1
            while not stop.is_set():
                batch = [ev(s, f"{sid}/{s}") for s in range(seq, seq + 20)]
                r, attempts = append_with_retry(stub, sid, batch)
                retried[0] += attempts - 1
                appended[sid] += r.appended
                assert r.last_seq == seq + 19
                acked[sid] += 1
                seq += 20
                time.sleep(0.005)
        except Exception as e:  # reported below
            errors.append(e)

    def watch_health():
        while not stop.is_set():
            try:
                health_seen.add(store.health_check("", timeout=1))
            except grpc.RpcError:
                pass
            time.sleep(0.05)

    threads = [threading.Thread(target=writer, args=(sid,)) for sid in sessions]
    threads.append(threading.Thread(target=watch_health))
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        before = sum(acked.values())
        pg.stop()  # fast shutdown: transactions in flight are rolled back
        time.sleep(1.5)
        pg.start()
        wait_health(store, SERVING, timeout=15)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=90)
    assert not errors, errors
    assert before > 0 and sum(acked.values()) > before
    assert retried[0] > 0, "the outage never hit a write"
    assert NOT_SERVING in health_seen

    for sid in sessions:
        n = acked[sid] * 20
        assert appended[sid] == n  # every event written once, retries counted as duplicates
        got = list_events(stub, sid)
        assert [e.seq for e in got] == list(range(1, n + 1))
        assert all(e.content == f"{sid}/{e.seq}" for e in got)
        assert int(pg.psql(f"SELECT count(*) FROM session_events WHERE session_id = '{sid}'")) == n
        s = stub.GetSession(S.GetSessionRequest(session_id=sid), timeout=10).session
        assert (s.event_count, s.last_seq) == (n, n)
    # The service said what happened.
    messages = " ".join(l.get("message", "") for l in store.log_lines())
    assert "database unavailable" in messages and "database ready" in messages


def test_killed_database_flips_health_and_recovers(pg, store):
    stub = stub_of(store)
    sid = new_id()
    open_session(stub, sid)
    append(stub, sid, [ev(1)])
    pg.kill()  # a crash: no goodbye on the connections
    wait_health(store, NOT_SERVING, timeout=10)
    wait_health(store, NOT_SERVING, timeout=1, service="convo.v1.Store")
    err = rpc_error(append, stub, sid, [ev(2)])
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "retry" in err.details()
    pg.start()  # crash recovery
    wait_health(store, SERVING, timeout=15)
    r, _ = append_with_retry(stub, sid, [ev(2)], deadline_s=10)
    assert r.appended == 1
    assert [e.seq for e in list_events(stub, sid)] == [1, 2]


def test_idle_connections_dropped_by_the_server_are_replaced(pg, store):
    """What an idle-reaping pooler or an admin does: the server ends every
    connection of store-svc; the next calls succeed without a restart."""
    stub = stub_of(store)
    sid = new_id()
    open_session(stub, sid)
    lost = store.metric("convo_store_db_connections_lost_total")
    killed = pg.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                     "WHERE application_name = 'store-svc'")
    assert int(killed) >= 1
    time.sleep(0.1)
    for i in range(1, 21):  # more calls than workers: every connection is tried
        r, attempts = append_with_retry(stub, sid, [ev(i)], deadline_s=10)
        assert r.appended == 1
    assert int(pg.psql(f"SELECT count(*) FROM session_events WHERE session_id = '{sid}'")) == 20
    # Dead connections were noticed and counted.
    assert store.metric("convo_store_db_connections_lost_total") - lost >= 1


# ---------------------------------------------------------------- migrations


def test_migrate_subcommand_concurrently_is_safe():
    with Postgres() as pg:
        with futures.ThreadPoolExecutor(3) as ex:
            results = list(ex.map(lambda _: migrate(pg.url), range(3)))
        for code, err in results:
            assert code == 0, err
        assert versions(pg) == "1,2,3,4,5"
        # Each migration was applied by exactly one of them (not
        # necessarily the same one: each is its own transaction).
        applied = sorted(l.split('"message":"applied migration ')[1].split(":")[0]
                         for _, err in results for l in err.splitlines()
                         if '"message":"applied migration ' in l)
        assert applied == ["1", "2", "3", "4", "5"], results
        code, err = migrate(pg.url)  # again: nothing to do, still 0
        assert code == 0 and "(0 migrations applied now)" in err
        assert versions(pg) == "1,2,3,4,5"


def test_migrate_gives_up_when_the_database_stays_down():
    with Postgres(start=False) as pg:
        t0 = time.monotonic()
        code, err = migrate(pg.url, "--migrate-wait-ms", "800")
        assert code == 1
        assert "cannot reach the database" in err
        assert time.monotonic() - t0 < 10


def test_replicas_starting_at_once_migrate_once():
    with Postgres() as pg:
        svcs = [start_store(pg.url, ready=None) for _ in range(3)]
        try:
            for svc in svcs:
                wait_health(svc, SERVING, timeout=30)
            assert versions(pg) == "1,2,3,4,5"
            sid = new_id()
            assert open_session(stub_of(svcs[0]), sid).created
            assert not open_session(stub_of(svcs[2]), sid).created
        finally:
            for svc in svcs:
                check_clean_exit(svc)


def test_without_migrate_on_start_waits_for_the_migrate_job():
    with Postgres() as pg:
        svc = start_store(pg.url, "--migrate-on-start=false", ready="grpc-up")
        try:
            time.sleep(0.5)
            assert svc.health_check("") == NOT_SERVING
            code, err = migrate(pg.url)
            assert code == 0, err
            wait_health(svc, SERVING, timeout=15)
        finally:
            check_clean_exit(svc)


def test_adopts_a_database_the_seed_backend_wrote():
    """The seed's own schema and rows (no seq, no counters): migration 2
    numbers the events by time and fills in the new columns."""
    with Postgres() as pg:
        pg.psql("""
            CREATE TABLE sessions (session_id VARCHAR(255) PRIMARY KEY,
              user_id VARCHAR(255) NOT NULL, start_time TIMESTAMPTZ NOT NULL DEFAULT NOW(),
              end_time TIMESTAMPTZ, duration_seconds INTEGER, final_summary TEXT,
              created_at TIMESTAMPTZ DEFAULT NOW());
            CREATE TABLE session_events (event_id BIGSERIAL PRIMARY KEY,
              session_id VARCHAR(255) NOT NULL REFERENCES sessions(session_id) ON DELETE CASCADE,
              event_type VARCHAR(50) NOT NULL, content TEXT NOT NULL,
              timestamp TIMESTAMPTZ NOT NULL DEFAULT NOW(), created_at TIMESTAMPTZ DEFAULT NOW());
            INSERT INTO sessions (session_id, user_id, end_time, final_summary) VALUES
              ('old-done', 'u', now(), 'a summary'), ('old-pending', 'u', now(), NULL),
              ('old-live', 'u', NULL, NULL);
            INSERT INTO session_events (session_id, event_type, content, timestamp) VALUES
              ('old-live', 'ai_token', 'second', '2024-01-01 00:00:02+00'),
              ('old-live', 'user_message', 'first', '2024-01-01 00:00:01+00'),
              ('old-live', 'tool_call', 'third', '2024-01-01 00:00:03+00');
        """)
        svc = start_store(pg.url)
        try:
            stub = stub_of(svc)
            get = lambda sid: stub.GetSession(S.GetSessionRequest(session_id=sid),
                                              timeout=10).session
            assert get("old-done").summary_status == C.SUMMARY_STATUS_DONE
            assert get("old-pending").summary_status == C.SUMMARY_STATUS_PENDING
            live = get("old-live")
            assert live.summary_status == C.SUMMARY_STATUS_NONE
            assert (live.event_count, live.last_seq, live.user_message_count,
                    live.tool_call_count) == (3, 3, 1, 1)
            assert [(e.seq, e.content) for e in list_events(stub, "old-live")] == \
                [(1, "first"), (2, "second"), (3, "third")]
            assert append(stub, "old-live", [ev(4, "fourth")], user="u").appended == 1
            # The seed's index on session_id alone is gone (migration 3).
            assert "idx_session_events_session_id" not in pg.psql(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'session_events'").split()
        finally:
            check_clean_exit(svc)


# ---------------------------------------------------------------- bounds and timeouts


def hold_row_lock(pg, sid, seconds):
    """A psql session that locks the session's row for `seconds`: the next
    write to it waits (a slow database, as a worker sees it)."""
    sql = (f"BEGIN; SELECT session_id FROM sessions WHERE session_id = '{sid}' FOR UPDATE; "
           f"SELECT pg_sleep({seconds}); COMMIT;")
    p = subprocess.Popen([str(pg.bindir / "psql"), "-X", "-q", "-d", pg.url, "-c", sql],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until the lock is really held
        if int(pg.psql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep%' "
                       "AND state = 'active' AND pid <> pg_backend_pid()")) > 0:
            return p
        time.sleep(0.02)
    raise AssertionError("psql never took the lock")


def test_full_queue_is_resource_exhausted_and_nothing_is_lost(pg):
    svc = start_store(pg.url, "--db-pool-size", "1", "--queue-size", "1")
    try:
        stub = stub_of(svc)
        sid = new_id()
        open_session(stub, sid)
        locker = hold_row_lock(pg, sid, 2)
        first = stub.AppendEvents.future(S.AppendEventsRequest(session_id=sid, events=[ev(1)], user_id="u1"),
                                         timeout=30)
        time.sleep(0.3)  # the only worker now waits on the lock
        second = stub.AppendEvents.future(S.AppendEventsRequest(session_id=sid, events=[ev(2)], user_id="u1"),
                                          timeout=30)
        time.sleep(0.3)  # queued: the queue is full
        err = rpc_error(append, stub, sid, [ev(3)])
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue" in err.details()
        assert first.result().appended == 1 and second.result().appended == 1
        locker.wait(timeout=10)
        assert [e.seq for e in list_events(stub, sid)] == [1, 2]
    finally:
        check_clean_exit(svc)


def test_statement_timeout_is_unavailable_and_retry_is_safe(pg):
    svc = start_store(pg.url, "--db-statement-timeout-ms", "500", "--db-prepare=false")
    try:
        stub = stub_of(svc)
        sid = new_id()
        open_session(stub, sid)
        locker = hold_row_lock(pg, sid, 1.5)
        err = rpc_error(append, stub, sid, [ev(1), ev(2)])
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert "statement timeout" in err.details() and "retry" in err.details()
        locker.wait(timeout=10)
        r, _ = append_with_retry(stub, sid, [ev(1), ev(2)], deadline_s=10)
        assert (r.appended, r.duplicates) == (2, 0)  # the cut-off attempt left nothing
        assert [e.seq for e in list_events(stub, sid)] == [1, 2]
    finally:
        check_clean_exit(svc)
