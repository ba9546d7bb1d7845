"""Writer fencing (store.proto's writer_epoch): two writers of one session —
a gateway that lost its client without noticing and the gateway the client
resumed on — never write over each other. Each OpenSession by a new writer
moves the session's epoch on; AppendEvents and EndSession naming an older
one are refused (FAILED_PRECONDITION) and write nothing, checked under the
session's row lock, call by call within a group statement. A seq stored
with other content is a conflict, never counted as a retry."""

import grpc
import pytest

from conftest import (S, append, check_clean_exit, ev, list_events, new_id, open_session, pb,
                      rpc_error, start_store)
from test_store_group import WINDOW, at_once


def fenced_append(stub, sid, epoch, events, user="u1"):
    return stub.AppendEvents(S.AppendEventsRequest(session_id=sid, user_id=user, events=events,
                                                   writer_epoch=epoch), timeout=30)


def fenced_end(stub, sid, epoch, user="u1"):
    return stub.EndSession(S.EndSessionRequest(session_id=sid, user_id=user,
                                               writer_epoch=epoch), timeout=10).session


def reopen(stub, sid, epoch, user="u1"):
    return stub.OpenSession(S.OpenSessionRequest(session_id=sid, user_id=user,
                                                 writer_epoch=epoch), timeout=10)


def stored(stub, sid):
    return [(e.seq, e.type, e.content) for e in list_events(stub, sid)]


def test_a_new_session_starts_at_epoch_1_and_each_new_writer_moves_it_on(stub):
    sid = new_id()
    first = open_session(stub, sid)
    assert first.created and first.session.writer_epoch == 1
    second = open_session(stub, sid)
    assert not second.created and second.session.writer_epoch == 2
    assert stub.GetSession(S.GetSessionRequest(session_id=sid), timeout=10).session.writer_epoch == 2


def test_the_writer_before_a_resume_is_refused_and_the_new_one_is_stored(stub):
    sid = new_id()
    a = open_session(stub, sid).session.writer_epoch
    assert fenced_append(stub, sid, a, [ev(1, "a1"), ev(2, "a2")]).appended == 2

    # The client resumes on gateway B: B numbers from last_seq.
    b_open = open_session(stub, sid).session
    b = b_open.writer_epoch
    assert b > a and b_open.last_seq == 2

    # A still flushes what it buffered, numbered as B numbers its own.
    err = rpc_error(fenced_append, stub, sid, a, [ev(3, "a3"), ev(4, "a4")])
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "taken over" in err.details() and str(a) in err.details()
    r = fenced_append(stub, sid, b, [ev(3, "b3"), ev(4, "b4")])
    assert (r.appended, r.duplicates, r.conflicts, r.last_seq) == (2, 0, 0, 4)

    # Later writes of A are refused whatever their seqs, even a retry of
    # events it stored before the takeover.
    assert rpc_error(fenced_append, stub, sid, a,
                     [ev(5, "a5")]).code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc_error(fenced_append, stub, sid, a,
                     [ev(1, "a1"), ev(2, "a2")]).code() == grpc.StatusCode.FAILED_PRECONDITION

    # Nothing lost, nothing overwritten: A's events before the takeover, then B's.
    assert [(s, c) for s, _, c in stored(stub, sid)] == [(1, "a1"), (2, "a2"), (3, "b3"),
                                                          (4, "b4")]
    s = stub.GetSession(S.GetSessionRequest(session_id=sid), timeout=10).session
    assert (s.event_count, s.last_seq, s.writer_epoch) == (4, 4, b)


def test_the_writer_before_cannot_end_the_session(stub):
    sid = new_id()
    a = open_session(stub, sid).session.writer_epoch
    b = open_session(stub, sid).session.writer_epoch
    err = rpc_error(fenced_end, stub, sid, a)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "taken over" in err.details()
    s = stub.GetSession(S.GetSessionRequest(session_id=sid), timeout=10).session
    assert s.end_time_us == 0 and s.summary_status == pb.common_pb2.SUMMARY_STATUS_NONE
    assert fenced_append(stub, sid, b, [ev(1)]).appended == 1
    assert fenced_end(stub, sid, b).end_time_us > 0


def test_a_writer_reopening_as_itself_keeps_its_epoch_unless_taken_over(stub):
    sid = new_id()
    a = open_session(stub, sid).session.writer_epoch
    fenced_append(stub, sid, a, [ev(1)])
    fenced_end(stub, sid, a)
    # Its own session was ended (a sweep, say): it reopens it as itself.
    r = reopen(stub, sid, a)
    assert not r.created and r.session.end_time_us == 0 and r.session.writer_epoch == a
    assert fenced_append(stub, sid, a, [ev(2)]).appended == 1

    b = open_session(stub, sid).session.writer_epoch
    fenced_end(stub, sid, b)
    # A may not take it back, live or ended: refused, nothing changed.
    err = rpc_error(reopen, stub, sid, a)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "taken over" in err.details()
    s = stub.GetSession(S.GetSessionRequest(session_id=sid), timeout=10).session
    assert s.end_time_us > 0 and s.writer_epoch == b
    assert reopen(stub, sid, b).session.end_time_us == 0
    assert rpc_error(reopen, stub, sid, a).code() == grpc.StatusCode.FAILED_PRECONDITION
    # A session that does not exist (any more) is created whatever was named.
    gone = new_id()
    assert reopen(stub, gone, 7).created


def test_callers_without_an_epoch_keep_todays_behaviour(stub):
    sid = new_id()
    open_session(stub, sid)
    open_session(stub, sid)
    r = append(stub, sid, [ev(1), ev(2)])
    assert (r.appended, r.last_seq) == (2, 2)
    assert S.AppendEventsRequest(session_id=sid).writer_epoch == 0


def test_a_negative_epoch_is_invalid(stub):
    sid = new_id()
    open_session(stub, sid)
    for call in (lambda: fenced_append(stub, sid, -1, [ev(1)]),
                 lambda: fenced_end(stub, sid, -1),
                 lambda: reopen(stub, sid, -1)):
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "writer_epoch" in err.details()
    assert list_events(stub, sid) == []


def test_a_seq_stored_with_other_content_is_a_conflict_not_a_duplicate(store, stub):
    sid = new_id()
    open_session(stub, sid)
    append(stub, sid, [ev(1, "x"), ev(2, "y", type=S.EVENT_TYPE_USER_MESSAGE)])
    before = store.metric("convo_store_events_conflict_total")
    # The same rows again: a retry.
    r = append(stub, sid, [ev(1, "x"), ev(2, "y", type=S.EVENT_TYPE_USER_MESSAGE)])
    assert (r.appended, r.duplicates, r.conflicts) == (0, 2, 0)
    # Other content, another type, and a new seq.
    r = append(stub, sid, [ev(1, "other"), ev(2, "y"), ev(3, "z")])
    assert (r.appended, r.duplicates, r.conflicts, r.last_seq) == (1, 0, 2, 3)
    assert stored(stub, sid) == [(1, S.EVENT_TYPE_AI_TOKEN, "x"),
                                 (2, S.EVENT_TYPE_USER_MESSAGE, "y"),
                                 (3, S.EVENT_TYPE_AI_TOKEN, "z")]
    s = stub.GetSession(S.GetSessionRequest(session_id=sid), timeout=10).session
    assert (s.event_count, s.user_message_count) == (3, 1)
    assert store.metric("convo_store_events_conflict_total") == before + 2


def test_two_unfenced_writers_at_once_see_each_others_rows(stub):
    """Two writers of the same seqs sent at the same moment: the second
    waits for the first's row lock, and its snapshot may not see the first's
    rows; the conflict is still found (never a silent duplicate)."""
    for _ in range(15):
        sid = new_id()
        open_session(stub, sid)
        r = at_once([lambda: append(stub, sid, [ev(i, f"one{i}") for i in range(1, 21)]),
                     lambda: append(stub, sid, [ev(i, f"two{i}") for i in range(1, 21)])])
        assert sorted((x.appended, x.duplicates, x.conflicts) for x in r) == [(0, 0, 20),
                                                                                (20, 0, 0)]
        assert len({c[:3] for _, _, c in stored(stub, sid)}) == 1


@pytest.fixture(scope="module")
def grouping(pg):
    svc = start_store(pg.url, *WINDOW)
    yield svc
    check_clean_exit(svc)


@pytest.fixture(scope="module")
def gstub(grouping):
    return pb.store_pb2_grpc.StoreStub(grouping.channel())


def test_in_a_group_a_stale_call_fails_alone(grouping, gstub):
    taken, mine, old, clash = new_id(), new_id(), new_id(), new_id()
    a = open_session(gstub, taken).session.writer_epoch
    b = open_session(gstub, taken).session.writer_epoch
    m = open_session(gstub, mine).session.writer_epoch
    open_session(gstub, old)
    open_session(gstub, clash)
    append(gstub, clash, [ev(1, "first")])
    stale_before = grouping.metric("convo_store_stale_writes_total")

    r = at_once([
        lambda: fenced_append(gstub, taken, a, [ev(1, "a1"), ev(2, "a2")]),
        lambda: fenced_append(gstub, mine, m, [ev(1), ev(2), ev(3)]),
        lambda: append(gstub, old, [ev(1)]),
        lambda: append(gstub, clash, [ev(1, "second"), ev(2)]),
    ])
    assert r[0].code() == grpc.StatusCode.FAILED_PRECONDITION and "taken over" in r[0].details()
    assert (r[1].appended, r[1].last_seq) == (3, 3)
    assert r[2].appended == 1
    assert (r[3].appended, r[3].duplicates, r[3].conflicts) == (1, 0, 1)
    assert list_events(gstub, taken) == []
    assert fenced_append(gstub, taken, b, [ev(1, "b1")]).appended == 1
    assert [e.content for e in list_events(gstub, taken)] == ["b1"]
    assert [e.content for e in list_events(gstub, clash)] == ["first", "e2"]
    assert grouping.metric("convo_store_stale_writes_total") == stale_before + 1
