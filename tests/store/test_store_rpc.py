"""store-svc against a real PostgreSQL: every RPC of convo.v1.Store as the
contract (proto/convo/v1/store.proto) describes it, bad input, ordering,
idempotent retries and concurrency."""

import subprocess
import time
from concurrent import futures

import grpc
import pytest

from conftest import (C, MAX_BATCH, MAX_CONTENT, S, SERVING, append, end, ev, list_events, new_id,
                      open_session, pb, rpc_error)


def now_us():
    return int(time.time() * 1_000_000)


def get(stub, sid):
    return stub.GetSession(S.GetSessionRequest(session_id=sid), timeout=10).session


def db_count(pg, sid):
    return int(pg.psql(f"SELECT count(*) FROM session_events WHERE session_id = '{sid}'"))


# ---------------------------------------------------------------- health, schema


@pytest.mark.parametrize("service", ["", "convo.v1.Store"])
def test_health_serving(store, service):
    assert store.health_check(service) == SERVING


def test_schema_is_the_seeds_plus_additions(pg, store):
    cols = pg.psql("SELECT table_name || '.' || column_name || ':' || data_type || ':' || "
                   "is_nullable FROM information_schema.columns WHERE table_name IN "
                   "('sessions', 'session_events') ORDER BY 1").splitlines()
    for c in ["sessions.session_id:character varying:NO", "sessions.user_id:character varying:NO",
              "sessions.start_time:timestamp with time zone:NO",
              "sessions.end_time:timestamp with time zone:YES",
              "sessions.duration_seconds:integer:YES", "sessions.final_summary:text:YES",
              "sessions.created_at:timestamp with time zone:YES",
              "session_events.event_id:bigint:NO", "session_events.session_id:character varying:NO",
              "session_events.event_type:character varying:NO", "session_events.content:text:NO",
              "session_events.timestamp:timestamp with time zone:NO",
              "session_events.created_at:timestamp with time zone:YES",
              "session_events.seq:bigint:NO", "sessions.summary_status:character varying:NO",
              "sessions.last_seq:bigint:NO",
              "sessions.live_until:timestamp with time zone:YES"]:
        assert c in cols
    indexes = pg.psql("SELECT indexname FROM pg_indexes WHERE tablename IN "
                      "('sessions', 'session_events')").split()
    for i in ["idx_session_events_timestamp", "idx_sessions_user_id", "idx_sessions_start_time",
              "session_events_session_id_seq_key", "idx_sessions_live_until"]:
        assert i in indexes
    # Migration 3: the unique (session_id, seq) index makes it redundant.
    assert "idx_session_events_session_id" not in indexes
    assert pg.psql("SELECT string_agg(version::text, ',' ORDER BY version) "
                   "FROM schema_migrations").strip() == "1,2,3,4,5"


def test_lookups_by_session_use_an_index_without_idx_session_events_session_id(pg, stub):
    """What migration 3 relies on: with the single-column index dropped, the
    planner still reaches a session's rows through an index that starts
    with session_id, never a scan of the whole table."""
    sids = [new_id("explain") for _ in range(50)]
    for sid in sids:
        open_session(stub, sid)
        append(stub, sid, [ev(i) for i in range(1, 201)])
    pg.psql("ANALYZE session_events")
    sid = sids[7]
    queries = {
        "ListEvents": f"SELECT * FROM session_events WHERE session_id = '{sid}' AND seq > 10 "
                      "ORDER BY seq LIMIT 100",
        "by session": f"SELECT * FROM session_events WHERE session_id = '{sid}'",
        "the seed's": f"SELECT * FROM session_events WHERE session_id = '{sid}' "
                      "ORDER BY timestamp",
        "cascade": f"SELECT 1 FROM session_events WHERE session_id = '{sid}' FOR KEY SHARE",
    }
    for name, q in queries.items():
        plan = pg.psql(f"EXPLAIN {q}")
        assert "Seq Scan" not in plan, (name, plan)
        assert ("session_events_session_id_seq_key" in plan or
                "idx_session_events_timestamp" in plan), (name, plan)


# ---------------------------------------------------------------- OpenSession


def test_open_creates_then_resumes(stub):
    sid = new_id()
    before = now_us()
    r = open_session(stub, sid, "alice")
    assert r.created
    s = r.session
    assert (s.session_id, s.user_id) == (sid, "alice")
    assert before - 5_000_000 <= s.start_time_us <= now_us() + 5_000_000
    assert s.end_time_us == 0 and s.duration_seconds == 0
    assert s.summary_status == C.SUMMARY_STATUS_NONE
    assert (s.event_count, s.last_seq) == (0, 0)

    r2 = open_session(stub, sid, "alice")
    assert not r2.created
    assert r2.session.start_time_us == s.start_time_us


def test_open_other_users_session_is_permission_denied(stub, pg):
    sid = new_id()
    open_session(stub, sid, "alice")
    err = rpc_error(open_session, stub, sid, "mallory")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert sid in err.details()
    assert pg.psql(f"SELECT user_id FROM sessions WHERE session_id = '{sid}'").strip() == "alice"


def test_resume_after_end_reopens_and_keeps_the_log(stub):
    sid = new_id()
    open_session(stub, sid, "bob")
    append(stub, sid, [ev(1), ev(2)], user="bob")
    end(stub, sid, "bob")
    assert claim(stub, sid, "w").claimed
    save(stub, sid, C.SUMMARY_STATUS_DONE, summary="first part", worker="w")
    r = open_session(stub, sid, "bob")
    assert not r.created
    s = r.session
    assert s.end_time_us == 0 and s.duration_seconds == 0
    assert s.summary_status == C.SUMMARY_STATUS_NONE
    assert s.final_summary == "first part"  # kept until a new one is saved
    assert s.last_seq == 2 and s.event_count == 2
    # A resuming writer continues at last_seq + 1.
    assert append(stub, sid, [ev(3)], user="bob").appended == 1
    assert [e.seq for e in list_events(stub, sid)] == [1, 2, 3]


# ---------------------------------------------------------------- AppendEvents, ListEvents


def test_append_and_list_round_trip(stub):
    sid = new_id()
    open_session(stub, sid)
    ts = now_us()
    events = [ev(1, "hello", S.EVENT_TYPE_USER_MESSAGE, ts),
              ev(2, "Hi", S.EVENT_TYPE_AI_TOKEN, ts + 1),
              ev(3, '{"id":"c1","tool":"t","arguments":{}}', S.EVENT_TYPE_TOOL_CALL, ts + 2),
              ev(4, '{"id":"c1","tool":"t","result":{"ok":true}}', S.EVENT_TYPE_TOOL_RESULT, ts + 3),
              ev(5, "routing: analytical ☃ 🎉", S.EVENT_TYPE_SYSTEM_EVENT, ts + 4, session_id=sid),
              ev(6, "", S.EVENT_TYPE_AI_TOKEN, 0)]
    r = append(stub, sid, events)
    assert (r.appended, r.duplicates, r.last_seq) == (6, 0, 6)
    got = list_events(stub, sid)
    assert [(e.seq, e.type, e.content) for e in got] == [(e.seq, e.type, e.content) for e in events]
    assert all(e.session_id == sid for e in got)
    assert [e.timestamp_us for e in got[:5]] == [ts, ts + 1, ts + 2, ts + 3, ts + 4]
    assert abs(got[5].timestamp_us - now_us()) < 60_000_000  # 0 means "now"
    ids = [e.event_id for e in got]
    assert all(i > 0 for i in ids) and ids == sorted(ids)

    s = get(stub, sid)
    assert (s.event_count, s.last_seq, s.user_message_count, s.tool_call_count) == (6, 6, 1, 1)

    # Paging: after_seq and limit.
    assert [e.seq for e in list_events(stub, sid, after_seq=2, limit=3)] == [3, 4, 5]
    assert [e.seq for e in list_events(stub, sid, after_seq=6)] == []
    assert [e.seq for e in list_events(stub, sid, limit=1)] == [1]


def test_retried_batch_never_duplicates(stub, pg):
    sid = new_id()
    open_session(stub, sid)
    batch = [ev(i) for i in range(1, 51)]
    r1 = append(stub, sid, batch)
    assert (r1.appended, r1.duplicates, r1.last_seq) == (50, 0, 50)
    r2 = append(stub, sid, batch)  # the same batch again: a retry
    assert (r2.appended, r2.duplicates, r2.last_seq) == (0, 50, 50)
    # A retry that overlaps the next batch stores only what is new.
    r3 = append(stub, sid, [ev(i) for i in range(41, 61)])
    assert (r3.appended, r3.duplicates, r3.last_seq) == (10, 10, 60)
    assert db_count(pg, sid) == 60
    s = get(stub, sid)
    assert (s.event_count, s.last_seq) == (60, 60)
    assert [e.seq for e in list_events(stub, sid)] == list(range(1, 61))


def test_exact_order_of_10000_events_with_equal_timestamps(stub):
    sid = new_id()
    open_session(stub, sid)
    ts = now_us()
    # Batches arrive in reverse, so event_id and insertion order disagree
    # with seq; every event has the same timestamp. Only seq orders.
    batches = [[ev(i, f"t{i}", ts=ts) for i in range(b, b + 1000)] for b in range(1, 10001, 1000)]
    for batch in reversed(batches):
        assert append(stub, sid, batch).appended == 1000
    got = list_events(stub, sid)
    assert [e.seq for e in got] == list(range(1, 10001))
    assert [e.content for e in got] == [f"t{i}" for i in range(1, 10001)]
    assert {e.timestamp_us for e in got} == {ts}
    assert get(stub, sid).event_count == 10000


def test_append_to_unknown_session_is_not_found(stub, pg):
    sid = new_id()
    err = rpc_error(append, stub, sid, [ev(1)])
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert sid in err.details()
    assert db_count(pg, sid) == 0


def test_append_to_ended_session_is_failed_precondition(stub, pg):
    sid = new_id()
    open_session(stub, sid)
    append(stub, sid, [ev(1), ev(2)])
    end(stub, sid)
    err = rpc_error(append, stub, sid, [ev(3)])
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    # A late retry of a batch stored before the end is still answered.
    r = append(stub, sid, [ev(1), ev(2)])
    assert (r.appended, r.duplicates) == (0, 2)
    # A mixed one is refused whole.
    err = rpc_error(append, stub, sid, [ev(2), ev(3)])
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert db_count(pg, sid) == 2


def test_empty_batch_is_accepted(stub):
    sid = new_id()
    open_session(stub, sid)
    append(stub, sid, [ev(1)])
    r = append(stub, sid, [])
    assert (r.appended, r.duplicates, r.last_seq) == (0, 0, 1)


def test_list_events_of_unknown_session_is_not_found(stub):
    err = rpc_error(list_events, stub, new_id())
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_list_events_of_empty_session(stub):
    sid = new_id()
    open_session(stub, sid)
    assert list_events(stub, sid) == []


def test_content_at_the_limit_is_accepted(stub):
    sid = new_id()
    open_session(stub, sid)
    big = "é" * (MAX_CONTENT // 2)  # exactly MAX_CONTENT bytes
    assert append(stub, sid, [ev(1, big)]).appended == 1
    assert list_events(stub, sid)[0].content == big


# ---------------------------------------------------------------- bad input


def bad_append_cases(sid):
    good = [ev(1), ev(2)]
    long_sid = "x" * 129
    return {
        "unknown type": ([*good, ev(3, type=9)], "events[2].type"),
        "unspecified type": ([*good, ev(3, type=0)], "events[2].type"),
        "seq zero": ([ev(0)], "events[0].seq"),
        "seq negative": ([ev(-5)], "events[0].seq"),
        "seq repeated": ([*good, ev(2)], "events[2].seq"),
        "seq backwards": ([ev(5), ev(4)], "events[1].seq"),
        "content too big": ([*good, ev(3, "x" * (MAX_CONTENT + 1))], "events[2].content"),
        "other session in event": ([*good, ev(3, session_id="other")], "events[2].session_id"),
        "negative timestamp": ([*good, ev(3, ts=-1)], "events[2].timestamp_us"),
        "absurd timestamp": ([*good, ev(3, ts=2**62)], "events[2].timestamp_us"),
        "batch too big": ([ev(i) for i in range(1, MAX_BATCH + 2)], "events"),
        "long session id": ("session_id", long_sid),
    }


@pytest.mark.parametrize("case", list(bad_append_cases("x").keys()))
def test_bad_append_is_invalid_argument_and_writes_nothing(stub, pg, case):
    sid = new_id()
    open_session(stub, sid)
    events, field = bad_append_cases(sid)[case]
    if events == "session_id":
        err = rpc_error(append, stub, field, [ev(1)])
        field = "session_id"
    else:
        err = rpc_error(append, stub, sid, events)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.details(), err.details()
    assert db_count(pg, sid) == 0
    assert get(stub, sid).event_count == 0


@pytest.mark.parametrize("sid, what", [
    ("", "empty"), ("x" * 129, "over the limit"), ("has space", "outside"), ("a/b", "outside"),
    ("é", "outside"), ("a'; DROP TABLE sessions; --", "outside")])
def test_bad_session_ids(stub, sid, what):
    for call in (lambda: open_session(stub, sid),
                 lambda: get(stub, sid),
                 lambda: end(stub, sid),
                 lambda: list_events(stub, sid),
                 lambda: append(stub, sid, [ev(1)])):
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "session_id" in err.details() and what in err.details(), err.details()


def test_session_id_of_128_bytes_is_accepted(stub):
    sid = ("A1._-" * 26)[:120] + new_id("")[-8:]
    sid = sid[:128]
    assert len(sid) == 128
    assert open_session(stub, sid).created


def test_bad_user_id(stub):
    for uid in ("", "x" * 129, "a b"):
        err = rpc_error(open_session, stub, new_id(), uid)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "user_id" in err.details()


def _raw_append(store, payload: bytes):
    ch = store.channel()
    call = ch.unary_unary("/convo.v1.Store/AppendEvents", request_serializer=lambda b: b,
                          response_deserializer=lambda b: b)
    return call(payload, timeout=10)


def test_invalid_utf8_content_is_invalid_argument(store, stub, pg):
    sid = new_id()
    open_session(stub, sid)
    req = S.AppendEventsRequest(session_id=sid, user_id="u1", events=[ev(1, "ok"), ev(2, "MARK")])
    payload = req.SerializeToString().replace(b"MARK", b"\xff\xfe\xc3\x28")
    err = rpc_error(_raw_append, store, payload)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "events[1].content" in err.details() and "UTF-8" in err.details()
    assert db_count(pg, sid) == 0


def test_nul_in_content_is_refused_not_cut(stub, pg):
    """A NUL inside a nested string (events[].content) would be cut short by
    the decoder; it is refused, and nothing is written."""
    sid = new_id()
    open_session(stub, sid)
    err = rpc_error(append, stub, sid, [ev(1, "ok"), ev(2, "before\x00after")])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "field events.content of convo.v1.AppendEventsRequest contains a NUL character" in err.details()
    assert db_count(pg, sid) == 0


def test_undecodable_request_is_invalid_argument(store):
    err = rpc_error(_raw_append, store, b"\xff\xff\xff\xff")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_other_bad_requests(stub):
    sid = new_id()
    open_session(stub, sid)
    cases = [
        (lambda: list_events(stub, sid, after_seq=-1), "after_seq"),
        (lambda: list_events(stub, sid, limit=-1), "limit"),
        (lambda: end(stub, sid, end_time_us=-1), "end_time_us"),
        (lambda: end(stub, sid, user=""), "user_id"),
        (lambda: end(stub, sid, user="a b"), "user_id"),
        (lambda: append(stub, sid, [ev(1)], user=""), "user_id"),
        (lambda: stub.SaveSummary(S.SaveSummaryRequest(session_id=sid, status=C.SUMMARY_STATUS_DONE,
                                                       summary="s"), timeout=10), "worker_id"),
        (lambda: stub.ClaimSummary(S.ClaimSummaryRequest(session_id=sid, worker_id="w",
                                                         give_up=True), timeout=10), "give_up"),
        (lambda: stub.SaveSummary(S.SaveSummaryRequest(session_id=sid, status=C.SUMMARY_STATUS_NONE),
                                  timeout=10), "status"),
        (lambda: stub.SaveSummary(S.SaveSummaryRequest(session_id=sid, status=C.SUMMARY_STATUS_DONE),
                                  timeout=10), "summary"),
        (lambda: stub.SaveSummary(S.SaveSummaryRequest(session_id=sid, status=C.SUMMARY_STATUS_DONE,
                                                       summary="x" * (MAX_CONTENT + 1)),
                                  timeout=10), "summary"),
        (lambda: stub.SaveSummary(S.SaveSummaryRequest(session_id=sid, status=C.SUMMARY_STATUS_DONE,
                                                       summary="s", worker_id="bad id"),
                                  timeout=10), "worker_id"),
        (lambda: stub.ClaimSummary(S.ClaimSummaryRequest(session_id=sid), timeout=10), "worker_id"),
        (lambda: stub.ClaimSummary(S.ClaimSummaryRequest(session_id=sid, worker_id="w",
                                                         lease_seconds=-1), timeout=10),
         "lease_seconds"),
        (lambda: stub.ClaimSummary(S.ClaimSummaryRequest(session_id=sid, worker_id="w",
                                                         max_attempts=-1), timeout=10),
         "max_attempts"),
        (lambda: stub.ListUserSessions(S.ListUserSessionsRequest(user_id=""), timeout=10),
         "user_id"),
        (lambda: stub.ListUserSessions(S.ListUserSessionsRequest(user_id="u",
                                                                 exclude_session_id="a b"),
                                       timeout=10), "exclude_session_id"),
        (lambda: stub.ListUnsummarizedSessions(
            S.ListUnsummarizedSessionsRequest(ended_before_us=-1), timeout=10), "ended_before_us"),
        (lambda: stub.ListUnsummarizedSessions(
            S.ListUnsummarizedSessionsRequest(max_attempts=-1), timeout=10), "max_attempts"),
    ]
    for call, field in cases:
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err)
        assert field in err.details(), (field, err.details())
    s = get(stub, sid)
    assert s.summary_status == C.SUMMARY_STATUS_NONE and s.end_time_us == 0


def test_unknown_session_is_not_found_everywhere(stub):
    sid = new_id()
    for call in (lambda: get(stub, sid),
                 lambda: end(stub, sid),
                 lambda: append(stub, sid, [ev(1)]),
                 lambda: stub.SaveSummary(S.SaveSummaryRequest(
                     session_id=sid, status=C.SUMMARY_STATUS_DONE, summary="x", worker_id="w"),
                     timeout=10),
                 lambda: stub.ClaimSummary(S.ClaimSummaryRequest(session_id=sid, worker_id="w"),
                                           timeout=10)):
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND, err
        assert sid in err.details()


# ---------------------------------------------------------------- EndSession, GetSession


def test_end_session_sets_end_duration_and_pending_once(stub):
    sid = new_id()
    s0 = open_session(stub, sid).session
    end_us = s0.start_time_us + 90_500_000  # 90.5 s later
    s = end(stub, sid, end_time_us=end_us)
    assert s.end_time_us == end_us and s.duration_seconds == 90
    assert s.summary_status == C.SUMMARY_STATUS_PENDING
    # Idempotent: ending again changes nothing.
    s2 = end(stub, sid)
    assert (s2.end_time_us, s2.duration_seconds, s2.summary_status) == (end_us, 90,
                                                                        C.SUMMARY_STATUS_PENDING)
    assert get(stub, sid) == s2


def test_end_session_now_and_clock_skew(stub):
    sid = new_id()
    s0 = open_session(stub, sid).session
    s = end(stub, sid)
    assert s.end_time_us >= s0.start_time_us and s.duration_seconds >= 0
    sid2 = new_id()
    s0 = open_session(stub, sid2).session
    s = end(stub, sid2, end_time_us=s0.start_time_us - 10**7)
    assert s.duration_seconds == 0


# ---------------------------------------------------------------- kept alive


def open_live(stub, sid, live_seconds, user="u1"):
    return stub.OpenSession(S.OpenSessionRequest(session_id=sid, user_id=user,
                                                 live_seconds=live_seconds), timeout=10)


def keep_alive(stub, sids, live_seconds):
    return stub.KeepSessionsAlive(S.KeepSessionsAliveRequest(session_ids=sids,
                                                             live_seconds=live_seconds),
                                  timeout=10).kept


def end_abandoned(stub, limit=1000):
    r = stub.EndAbandonedSessions(S.EndAbandonedSessionsRequest(limit=limit), timeout=10)
    return list(r.session_ids)


def test_a_session_nobody_keeps_alive_is_ended_at_its_last_event(stub, store):
    talked, quiet, unleased, ended = (new_id("live") for _ in range(4))
    start = open_live(stub, talked, 1).session.start_time_us
    last = now_us() + 200_000
    append(stub, talked, [ev(1, "hi", S.EVENT_TYPE_USER_MESSAGE, ts=last - 100_000),
                          ev(2, ts=last)])
    open_live(stub, quiet, 1)
    open_session(stub, unleased)          # live_seconds 0: only EndSession ends it
    open_live(stub, ended, 1)
    end(stub, ended)
    before = store.metric("convo_store_sessions_abandoned_total")
    time.sleep(1.5)
    done = end_abandoned(stub)
    assert talked in done and quiet in done
    assert unleased not in done and ended not in done
    s = get(stub, talked)
    assert s.end_time_us == last and s.duration_seconds == (last - start) // 1_000_000
    assert s.summary_status == C.SUMMARY_STATUS_PENDING and s.summary_attempts == 0
    q = get(stub, quiet)
    assert q.end_time_us == q.start_time_us and q.summary_status == C.SUMMARY_STATUS_PENDING
    assert get(stub, unleased).end_time_us == 0
    assert talked in unsummarized(stub) and quiet in unsummarized(stub)
    assert talked not in end_abandoned(stub)  # once
    assert store.metric("convo_store_sessions_abandoned_total") - before == len(done)
    # Its writer coming back finds it ended, and reopens it as after EndSession.
    assert rpc_error(append, stub, talked, [ev(3)]).code() == grpc.StatusCode.FAILED_PRECONDITION
    r = open_live(stub, talked, 60)
    assert not r.created and r.session.end_time_us == 0 and r.session.last_seq == 2


def test_keeping_alive_and_resuming_renew_the_lease(stub):
    kept, resumed = new_id("keep"), new_id("keep")
    for sid in (kept, resumed):
        open_live(stub, sid, 2)
    dropped = new_id("keep")
    open_live(stub, dropped, 1)
    unleased = new_id("keep")
    open_session(stub, unleased)
    for _ in range(7):  # 3.5 s: well past both leases
        time.sleep(0.5)
        # A session opened without a lease is not given one; an unknown one
        # is not made up.
        assert keep_alive(stub, [kept, unleased, new_id("nobody")], 2) == 1
        assert not open_live(stub, resumed, 2).created
        done = end_abandoned(stub)
        assert kept not in done and resumed not in done
    assert get(stub, dropped).end_time_us != 0
    assert get(stub, unleased).end_time_us == 0
    # Ended: keeping it alive changes nothing.
    assert keep_alive(stub, [dropped], 60) == 0
    time.sleep(2.5)
    assert {kept, resumed} <= set(end_abandoned(stub))


def test_replicas_ending_abandoned_sessions_at_once_end_each_once(stub):
    sids = [new_id("race") for _ in range(40)]
    for sid in sids:
        open_live(stub, sid, 1)
    time.sleep(1.5)
    with futures.ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda _: end_abandoned(stub, limit=15), range(4)))
    got = [sid for r in results for sid in r if sid in sids]
    assert len(got) == len(set(got)), "a session was ended twice"
    rest = end_abandoned(stub)
    assert set(got) | (set(rest) & set(sids)) == set(sids)


@pytest.mark.parametrize("call,field", [
    (lambda st: open_live(st, new_id(), -1), "live_seconds"),
    (lambda st: open_live(st, new_id(), 86401), "live_seconds"),
    (lambda st: keep_alive(st, [new_id()], 0), "live_seconds"),
    (lambda st: keep_alive(st, [new_id(), "bad id"], 5), "session_ids[1]"),
])
def test_bad_keep_alive_requests_are_invalid_argument(stub, call, field):
    e = rpc_error(call, stub)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.details(), e.details()


# ---------------------------------------------------------------- summaries


def ended_session(stub, user="sum-user"):
    sid = new_id()
    open_session(stub, sid, user)
    append(stub, sid, [ev(1, "hi", S.EVENT_TYPE_USER_MESSAGE)], user=user)
    end(stub, sid, user)
    return sid


def claim(stub, sid, worker, lease=60, max_attempts=0, give_up=False):
    return stub.ClaimSummary(S.ClaimSummaryRequest(session_id=sid, worker_id=worker,
                                                   lease_seconds=lease, max_attempts=max_attempts,
                                                   give_up=give_up), timeout=10)


def save(stub, sid, status, summary="", error="", worker=""):
    return stub.SaveSummary(S.SaveSummaryRequest(session_id=sid, status=status, summary=summary,
                                                 error=error, worker_id=worker), timeout=10)


def unsummarized(stub, **kw):
    r = stub.ListUnsummarizedSessions(S.ListUnsummarizedSessionsRequest(**kw), timeout=10)
    return [s.session_id for s in r.sessions]


def test_claim_lease_and_save(stub):
    sid = ended_session(stub)
    assert sid in unsummarized(stub, limit=1000)
    r = claim(stub, sid, "w1")
    assert r.claimed and r.session.summary_attempts == 1
    # Someone else's live lease: refused, and the session leaves the work list.
    r = claim(stub, sid, "w2")
    assert not r.claimed and r.session.summary_attempts == 1
    assert sid not in unsummarized(stub, limit=1000)
    # Only the holder may save.
    err = rpc_error(save, stub, sid, C.SUMMARY_STATUS_DONE, summary="nope", worker="w2")
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "w2" in err.details()
    s = save(stub, sid, C.SUMMARY_STATUS_DONE, summary="The user said hi.", worker="w1").session
    assert s.summary_status == C.SUMMARY_STATUS_DONE and s.final_summary == "The user said hi."
    # Done: never claimed again, not in the work list.
    assert not claim(stub, sid, "w3").claimed
    assert sid not in unsummarized(stub, limit=1000)
    assert get(stub, sid).final_summary == "The user said hi."


def test_claim_concurrently_only_one_wins(stub):
    sid = ended_session(stub)
    with futures.ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda i: claim(stub, sid, f"w{i}").claimed, range(8)))
    assert results.count(True) == 1
    assert get(stub, sid).summary_attempts == 1


def test_expired_lease_can_be_taken_over(stub):
    sid = ended_session(stub)
    assert claim(stub, sid, "slow", lease=1).claimed
    assert not claim(stub, sid, "fast").claimed
    time.sleep(1.2)
    assert sid in unsummarized(stub, limit=1000)
    r = claim(stub, sid, "fast")
    assert r.claimed and r.session.summary_attempts == 2
    # The first worker lost its lease: its late save is refused.
    err = rpc_error(save, stub, sid, C.SUMMARY_STATUS_DONE, summary="late", worker="slow")
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_failed_attempts_and_max_attempts(stub):
    sid = ended_session(stub)
    for attempt in (1, 2):
        r = claim(stub, sid, "w", max_attempts=2)
        assert r.claimed and r.session.summary_attempts == attempt
        s = save(stub, sid, C.SUMMARY_STATUS_PENDING, error=f"upstream 503 #{attempt}",
                 worker="w").session
        assert s.summary_status == C.SUMMARY_STATUS_PENDING
        assert s.summary_error == f"upstream 503 #{attempt}"
    assert sid in unsummarized(stub, limit=1000)
    assert sid not in unsummarized(stub, limit=1000, max_attempts=2)
    assert sid in unsummarized(stub, limit=1000, max_attempts=3)
    assert not claim(stub, sid, "w", max_attempts=2).claimed
    # The attempts ran out: a lease only to record it, counting none.
    assert not claim(stub, sid, "w", max_attempts=3, give_up=True).claimed
    r = claim(stub, sid, "sweeper", max_attempts=2, give_up=True)
    assert r.claimed and r.session.summary_attempts == 2
    s = save(stub, sid, C.SUMMARY_STATUS_FAILED, error="gave up", worker="sweeper").session
    assert s.summary_status == C.SUMMARY_STATUS_FAILED and s.summary_error == "gave up"
    assert s.summary_attempts == 2
    assert not claim(stub, sid, "w").claimed
    assert sid not in unsummarized(stub, limit=1000)


def test_live_session_is_not_claimed_nor_listed(stub):
    sid = new_id()
    open_session(stub, sid)
    assert not claim(stub, sid, "w").claimed
    assert sid not in unsummarized(stub, limit=1000)


def test_unsummarized_order_and_ended_before(stub):
    sids = [ended_session(stub) for _ in range(3)]
    listed = [s for s in unsummarized(stub, limit=1000) if s in sids]
    assert listed == sids  # oldest end first
    ends = [get(stub, s).end_time_us for s in sids]
    assert unsummarized(stub, limit=1000, ended_before_us=ends[0]).count(sids[0]) == 0
    before = unsummarized(stub, limit=1000, ended_before_us=ends[2])
    assert sids[0] in before and sids[1] in before and sids[2] not in before
    assert len(unsummarized(stub, limit=1)) == 1


def test_list_user_sessions_newest_first_with_summaries(stub):
    user = new_id("user")
    sids = []
    for i in range(4):
        sid = new_id()
        open_session(stub, sid, user)
        sids.append(sid)
        time.sleep(0.002)
    end(stub, sids[0], user)
    assert claim(stub, sids[0], "w").claimed
    save(stub, sids[0], C.SUMMARY_STATUS_DONE, summary="oldest one", worker="w")
    open_session(stub, new_id(), "someone-else")

    r = stub.ListUserSessions(S.ListUserSessionsRequest(user_id=user), timeout=10)
    assert [s.session_id for s in r.sessions] == list(reversed(sids))
    assert r.sessions[-1].final_summary == "oldest one"
    r = stub.ListUserSessions(S.ListUserSessionsRequest(user_id=user, limit=2,
                                                        exclude_session_id=sids[3]), timeout=10)
    assert [s.session_id for s in r.sessions] == [sids[2], sids[1]]
    r = stub.ListUserSessions(S.ListUserSessionsRequest(user_id="nobody-at-all"), timeout=10)
    assert list(r.sessions) == []


def test_list_user_sessions_pages_by_cursor(stub):
    """Each page starts after the last session of the previous one (its
    start time and id), so paging through lists every session once, also
    those that share a start time."""
    user = new_id("user")
    sids = [new_id() for _ in range(7)]
    for sid in sids:
        open_session(stub, sid, user)
    seen, before_us, before_id = [], 0, ""
    while True:
        r = stub.ListUserSessions(S.ListUserSessionsRequest(
            user_id=user, limit=3, before_start_time_us=before_us,
            before_session_id=before_id), timeout=10)
        page = list(r.sessions)
        assert len(page) <= 3
        seen += [s.session_id for s in page]
        if len(page) < 3:
            break
        before_us, before_id = page[-1].start_time_us, page[-1].session_id
    assert sorted(seen) == sorted(sids) and len(seen) == len(set(seen))
    whole = stub.ListUserSessions(S.ListUserSessionsRequest(user_id=user, limit=10), timeout=10)
    assert seen == [s.session_id for s in whole.sessions], "pages keep the list's order"
    with pytest.raises(grpc.RpcError) as e:
        stub.ListUserSessions(S.ListUserSessionsRequest(
            user_id=user, before_start_time_us=1, before_session_id="bad id"), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------- forged writes


def test_append_to_another_users_session_is_permission_denied_and_writes_nothing(stub, pg):
    sid = new_id()
    open_session(stub, sid, "alice")
    append(stub, sid, [ev(1, "alice's")], user="alice")
    for batch in ([ev(2, "FORGED")], [ev(1, "FORGED")], []):
        err = rpc_error(append, stub, sid, batch, user="mallory")
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
        assert sid in err.details() and "another user" in err.details()
    assert [(e.seq, e.content) for e in list_events(stub, sid)] == [(1, "alice's")]
    assert db_count(pg, sid) == 1
    s = get(stub, sid)
    assert (s.event_count, s.last_seq) == (1, 1)


def test_end_another_users_session_is_permission_denied_and_changes_nothing(stub):
    sid = new_id()
    open_session(stub, sid, "alice")
    err = rpc_error(end, stub, sid, "mallory")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
    s = get(stub, sid)
    assert s.end_time_us == 0 and s.summary_status == C.SUMMARY_STATUS_NONE
    # The owner ends it, again and again (idempotent); the other user is
    # still refused once it has ended.
    s1 = end(stub, sid, "alice")
    assert s1.end_time_us > 0 and s1.summary_status == C.SUMMARY_STATUS_PENDING
    assert end(stub, sid, "alice") == s1
    err = rpc_error(end, stub, sid, "mallory")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
    assert get(stub, sid) == s1


def test_forged_summary_without_a_live_lease_is_refused(stub):
    """The forged write of issue 13: SaveSummary with an empty worker_id
    overwrote a user's summary. Now every save needs the worker holding the
    live lease."""
    sid = ended_session(stub)
    assert claim(stub, sid, "w1").claimed
    save(stub, sid, C.SUMMARY_STATUS_DONE, summary="The real summary.", worker="w1")
    forged = [("", grpc.StatusCode.INVALID_ARGUMENT),     # no worker: no bypass
              ("w1", grpc.StatusCode.FAILED_PRECONDITION),  # its lease was released by the save
              ("mallory", grpc.StatusCode.FAILED_PRECONDITION)]
    for worker, code in forged:
        for status in (C.SUMMARY_STATUS_DONE, C.SUMMARY_STATUS_FAILED, C.SUMMARY_STATUS_PENDING):
            err = rpc_error(save, stub, sid, status, summary="FORGED SUMMARY", error="forged",
                            worker=worker)
            assert err.code() == code, (worker, status, err)
    s = get(stub, sid)
    assert (s.summary_status, s.final_summary) == (C.SUMMARY_STATUS_DONE, "The real summary.")
    assert s.summary_error == ""


def test_save_after_the_lease_ran_out_is_refused_even_if_nobody_took_over(stub):
    sid = ended_session(stub)
    assert claim(stub, sid, "slow", lease=1).claimed
    time.sleep(1.3)
    err = rpc_error(save, stub, sid, C.SUMMARY_STATUS_DONE, summary="late", worker="slow")
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "live" in err.details()
    s = get(stub, sid)
    assert (s.summary_status, s.final_summary) == (C.SUMMARY_STATUS_PENDING, "")


def test_save_on_a_live_or_never_claimed_session_is_refused(stub):
    live = new_id()
    open_session(stub, live)
    pending = ended_session(stub)
    for sid in (live, pending):
        err = rpc_error(save, stub, sid, C.SUMMARY_STATUS_DONE, summary="x", worker="w")
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
    assert get(stub, live).summary_status == C.SUMMARY_STATUS_NONE
    assert get(stub, pending).summary_status == C.SUMMARY_STATUS_PENDING


# ---------------------------------------------------------------- concurrency


def test_100_sessions_written_concurrently(stub, pg):
    prefix = new_id("conc")

    def one(i):
        sid = f"{prefix}-{i}"
        open_session(stub, sid, f"user{i % 7}")
        for b in range(5):
            r = append(stub, sid, [ev(b * 20 + k, f"{sid}:{b * 20 + k}",
                                      S.EVENT_TYPE_USER_MESSAGE if k == 1 else S.EVENT_TYPE_AI_TOKEN)
                                   for k in range(1, 21)], user=f"user{i % 7}")
            assert r.appended == 20
        s = end(stub, sid, f"user{i % 7}")
        return sid, s

    with futures.ThreadPoolExecutor(32) as ex:
        results = list(ex.map(one, range(100)))
    for sid, s in results:
        assert (s.event_count, s.last_seq, s.user_message_count) == (100, 100, 5)
        assert s.summary_status == C.SUMMARY_STATUS_PENDING
    assert int(pg.psql(f"SELECT count(*) FROM session_events WHERE session_id LIKE '{prefix}-%'")) \
        == 100 * 100
    # Spot-check a few logs in full.
    for sid, _ in results[::25]:
        got = list_events(stub, sid)
        assert [e.seq for e in got] == list(range(1, 101))
        assert all(e.content == f"{sid}:{e.seq}" for e in got)


def test_concurrent_writers_of_one_session_with_overlapping_retries(stub, pg):
    sid = new_id()
    open_session(stub, sid)
    batches = [[ev(i) for i in range(b, b + 10)] for b in range(1, 201, 10)]

    def send(batch):
        return append(stub, sid, batch).appended

    with futures.ThreadPoolExecutor(8) as ex:
        # Every batch sent twice at once: one wins, one counts duplicates.
        appended = sum(ex.map(send, batches + batches))
    assert appended == 200
    assert db_count(pg, sid) == 200
    s = get(stub, sid)
    assert (s.event_count, s.last_seq) == (200, 200)


# ---------------------------------------------------------------- metrics


def test_metrics_count_appends_duplicates_batches_and_statements(store, stub):
    m = store.metric
    before = {k: m(k) for k in ("convo_store_events_appended_total",
                                "convo_store_events_duplicate_total",
                                "convo_store_append_batch_events_count",
                                "convo_store_append_batch_events_sum",
                                "convo_store_queue_wait_seconds_count")}
    appends_before = m("convo_store_db_statement_seconds_count", statement="append_events")
    sid = new_id()
    open_session(stub, sid)
    batch = [ev(i) for i in range(1, 11)]
    assert append(stub, sid, batch).appended == 10
    assert append(stub, sid, batch).duplicates == 10  # a caller's retry
    assert append(stub, sid, [ev(11), ev(12)]).appended == 2
    d = {k: m(k) - v for k, v in before.items()}
    assert d["convo_store_events_appended_total"] == 12
    assert d["convo_store_events_duplicate_total"] == 10
    assert d["convo_store_append_batch_events_count"] == 3
    assert d["convo_store_append_batch_events_sum"] == 22
    # Every job waited in the queue (open + 3 appends), however briefly.
    assert d["convo_store_queue_wait_seconds_count"] >= 4
    assert m("convo_store_db_statement_seconds_count", statement="append_events") - appends_before == 3
    assert m("convo_store_db_connections") >= 1
    assert m("convo_store_queue_jobs") == 0
    assert m("convo_grpc_server_handled_total", grpc_method="AppendEvents", grpc_code="OK") >= 3
    text = store.scrape()
    assert sid not in text  # ids are never label values
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
