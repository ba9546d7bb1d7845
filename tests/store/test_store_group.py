"""Group commit (--append-group-ms): AppendEvents calls that arrive together
go to PostgreSQL in one statement, and each call still gets exactly the
answer it would have got alone. The store here waits long for groups
(seconds, not ms), so calls sent at once surely share one."""

import threading
from concurrent import futures

import grpc
import pytest

from conftest import (S, append, check_clean_exit, end, ev, list_events, new_id, open_session, pb,
                      start_store)

WINDOW = ["--append-group-ms", "3000", "--append-group-idle-ms", "1000"]


@pytest.fixture(scope="module")
def grouping(pg):
    svc = start_store(pg.url, *WINDOW)
    yield svc
    check_clean_exit(svc)


@pytest.fixture(scope="module")
def gstub(grouping):
    return pb.store_pb2_grpc.StoreStub(grouping.channel())


def at_once(calls):
    """Runs the callables at the same moment; returns their results or the
    RpcErrors they raised, in order."""
    start = threading.Barrier(len(calls))

    def run(fn):
        start.wait()
        try:
            return fn()
        except grpc.RpcError as e:
            return e

    with futures.ThreadPoolExecutor(len(calls)) as ex:
        return list(ex.map(run, calls))


def groups_in_log(svc):
    """(calls, groups) from the line store-svc writes when it stops."""
    for line in svc.log_lines():
        msg = line.get("message", "")
        if "AppendEvents calls in" in msg:
            words = msg.split("; ")[-1].split()
            return int(words[0]), int(words[4])
    raise AssertionError(f"no group count in the log:\n{svc.log_tail()}")


def test_each_call_of_a_group_gets_its_own_answer(pg, gstub):
    live, ended, other, theirs = new_id(), new_id(), new_id(), new_id()
    for sid in (live, ended, other, theirs):
        open_session(gstub, sid)
    append(gstub, ended, [ev(1), ev(2)])
    end(gstub, ended)
    append(gstub, other, [ev(1), ev(2)])

    r = at_once([
        lambda: append(gstub, live, [ev(1, type=S.EVENT_TYPE_USER_MESSAGE), ev(2),
                                     ev(3, type=S.EVENT_TYPE_TOOL_CALL)]),
        lambda: append(gstub, new_id("unknown"), [ev(1)]),
        lambda: append(gstub, ended, [ev(1), ev(2)]),  # a late retry: answered as duplicates
        lambda: append(gstub, ended, [ev(3)]),  # new after the end: refused
        lambda: append(gstub, other, [ev(2), ev(3)]),  # half retried
        lambda: append(gstub, theirs, [ev(1)], user="mallory"),  # another user's session
    ])
    assert (r[0].appended, r[0].duplicates, r[0].last_seq) == (3, 0, 3)
    assert r[1].code() == grpc.StatusCode.NOT_FOUND
    # The two calls of `ended` run in turn (same session), in either order.
    ok, refused = (r[2], r[3])
    assert (ok.appended, ok.duplicates) == (0, 2)
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (r[4].appended, r[4].duplicates, r[4].last_seq) == (1, 1, 3)
    assert r[5].code() == grpc.StatusCode.PERMISSION_DENIED
    assert list_events(gstub, theirs) == []

    s = gstub.GetSession(S.GetSessionRequest(session_id=live), timeout=10).session
    assert (s.event_count, s.last_seq, s.user_message_count, s.tool_call_count) == (3, 3, 1, 1)
    assert [e.seq for e in list_events(gstub, other)] == [1, 2, 3]
    assert int(pg.psql(f"SELECT count(*) FROM session_events WHERE session_id = '{ended}'")) == 2


def test_calls_of_one_session_in_one_group_keep_their_order(pg, gstub):
    sid = new_id()
    open_session(gstub, sid)
    first = [ev(i, f"a{i}") for i in range(1, 6)]
    second = [ev(i, f"b{i}") for i in range(6, 11)]
    r = at_once([lambda: append(gstub, sid, first), lambda: append(gstub, sid, second),
                 lambda: append(gstub, sid, first)])
    assert sum(x.appended for x in r) == 10
    assert sum(x.duplicates for x in r) == 5
    got = list_events(gstub, sid)
    assert [(e.seq, e.content) for e in got] == \
        [(i, f"a{i}") for i in range(1, 6)] + [(i, f"b{i}") for i in range(6, 11)]
    # event_id follows seq within the session.
    assert [e.event_id for e in got] == sorted(e.event_id for e in got)


def test_one_refused_batch_fails_alone(pg, gstub):
    """A batch the database refuses (here a CHECK constraint the test adds)
    fails its own call; the group is retried call by call, so the others
    are stored."""
    sids = [new_id() for _ in range(4)]
    for sid in sids:
        open_session(gstub, sid)
    pg.psql("ALTER TABLE session_events ADD CONSTRAINT test_no_poison CHECK (content <> 'poison')")
    try:
        r = at_once([lambda sid=sid, i=i: append(gstub, sid, [ev(1, "poison" if i == 2 else "ok")])
                     for i, sid in enumerate(sids)])
    finally:
        pg.psql("ALTER TABLE session_events DROP CONSTRAINT test_no_poison")
    assert r[2].code() == grpc.StatusCode.INTERNAL
    for i in (0, 1, 3):
        assert r[i].appended == 1
        assert [e.content for e in list_events(gstub, sids[i])] == ["ok"]
    assert list_events(gstub, sids[2]) == []


def test_calls_sent_together_share_a_statement(pg):
    """Without grouping each call is a statement of its own; with it, 40
    calls sent at once need far fewer (the count store-svc logs at exit)."""
    svc = start_store(pg.url, *WINDOW)
    stub = pb.store_pb2_grpc.StoreStub(svc.channel())
    sids = [new_id() for _ in range(40)]
    for sid in sids:
        open_session(stub, sid)
    r = at_once([lambda sid=sid: append(stub, sid, [ev(1), ev(2)]) for sid in sids])
    assert all(x.appended == 2 for x in r)
    check_clean_exit(svc)
    calls, groups = groups_in_log(svc)
    assert calls == 40
    assert groups <= 10


def test_without_a_window_calls_already_queued_still_group(pg):
    svc = start_store(pg.url, "--append-group-ms", "0", "--db-pool-size", "1")
    stub = pb.store_pb2_grpc.StoreStub(svc.channel())
    sids = [new_id() for _ in range(30)]
    for sid in sids:
        open_session(stub, sid)
    r = at_once([lambda sid=sid: append(stub, sid, [ev(i) for i in range(1, 51)])
                 for sid in sids])
    assert all(x.appended == 50 for x in r)
    for sid in sids[::10]:
        assert [e.seq for e in list_events(stub, sid)] == list(range(1, 51))
    check_clean_exit(svc)
    calls, groups = groups_in_log(svc)
    assert calls == 30 and groups <= 30


def test_group_bounds(pg):
    """At most --append-group-calls calls and --append-group-events events
    a statement; a call bigger than the event bound runs alone."""
    svc = start_store(pg.url, *WINDOW, "--append-group-calls", "3",
                      "--append-group-events", "10")
    stub = pb.store_pb2_grpc.StoreStub(svc.channel())
    sids = [new_id() for _ in range(9)]
    for sid in sids:
        open_session(stub, sid)
    r = at_once([lambda sid=sid: append(stub, sid, [ev(1), ev(2)]) for sid in sids])
    big = new_id()
    open_session(stub, big)
    assert append(stub, big, [ev(i) for i in range(1, 26)]).appended == 25
    assert all(x.appended == 2 for x in r)
    check_clean_exit(svc)
    calls, groups = groups_in_log(svc)
    assert calls == 10
    assert groups >= 4  # 9 calls at most 3 a group, and the big one alone
