"""lookup_contextual_data against a real store-svc (and PostgreSQL): the
caller's own session counts and the user's previous sessions with their
summaries reach the model; another user's session never does."""

import json

import pytest

from harness import Postgres, Service, build_dir, proto_stubs

pb = proto_stubs()
L, C, S = pb.llm_pb2, pb.common_pb2, pb.store_pb2


@pytest.fixture(scope="module")
def stack():
    with Postgres() as pg, \
            Service("store-svc", env={"DATABASE_URL": pg.url}) as store, \
            Service("offline-model", binary=build_dir() / "llm-svc" / "offline-model",
                    ready="tcp", args=["--token-delay-ms", "0"]) as model, \
            Service("llm-svc", args=["--openai-base-url", f"http://{model.addr}/v1",
                                     "--store", store.addr]) as llm:
        yield pb.store_pb2_grpc.StoreStub(store.channel()), pb.llm_pb2_grpc.LlmStub(llm.channel())


def seed_sessions(store):
    """alice: an older session, summarized, and the current one with two
    user messages and a tool call; bob: a session of his own."""
    store.OpenSession(S.OpenSessionRequest(session_id="alice-old", user_id="alice"), timeout=10)
    store.AppendEvents(S.AppendEventsRequest(session_id="alice-old", user_id="alice", events=[
        S.Event(seq=1, type=S.EVENT_TYPE_USER_MESSAGE, content="tell me about pgvector")]),
        timeout=10)
    store.EndSession(S.EndSessionRequest(session_id="alice-old", user_id="alice"), timeout=10)
    assert store.ClaimSummary(S.ClaimSummaryRequest(session_id="alice-old", worker_id="test"),
                              timeout=10).claimed
    store.SaveSummary(S.SaveSummaryRequest(session_id="alice-old", worker_id="test",
                                           status=C.SUMMARY_STATUS_DONE,
                                           summary="Overview: alice asked about pgvector."),
                      timeout=10)
    store.OpenSession(S.OpenSessionRequest(session_id="alice-now", user_id="alice"), timeout=10)
    store.AppendEvents(S.AppendEventsRequest(session_id="alice-now", user_id="alice", events=[
        S.Event(seq=1, type=S.EVENT_TYPE_USER_MESSAGE, content="hi"),
        S.Event(seq=2, type=S.EVENT_TYPE_TOOL_CALL,
                content='{"id":"c1","tool":"fetch_internal_knowledge","arguments":{}}'),
        S.Event(seq=3, type=S.EVENT_TYPE_USER_MESSAGE, content="and now?")]), timeout=10)
    store.OpenSession(S.OpenSessionRequest(session_id="bob-now", user_id="bob"), timeout=10)


def lookup(llm, session, user, asked):
    req = L.ChatRequest(session_id=session, user_id=user, turn_id="t",
                        message='[[tool1:lookup_contextual_data {"session_id":"%s"}]]' % asked,
                        params=C.GenerationParams(tools_enabled=True))
    events = list(llm.Chat(req, timeout=20))
    results = [e.tool_result for e in events if e.WhichOneof("event") == "tool_result"]
    assert len(results) == 1 and events[-1].WhichOneof("event") == "done"
    return results[0]


def test_own_context_comes_from_the_store(stack):
    store, llm = stack
    seed_sessions(store)
    r = lookup(llm, "alice-now", "alice", "alice-now")
    assert not r.is_error, r.result_json
    body = json.loads(r.result_json)
    now = body["current_session"]
    assert now["session_id"] == "alice-now"
    assert (now["user_message_count"], now["tool_call_count"], now["event_count"]) == (2, 1, 3)
    previous = body["previous_sessions"]
    assert [p["session_id"] for p in previous] == ["alice-old"], "only alice's, not this one"
    assert previous[0]["summary_status"] == "done"
    assert previous[0]["summary"] == "Overview: alice asked about pgvector."
    assert "bob" not in r.result_json


def test_another_users_session_is_refused(stack):
    store, llm = stack
    r = lookup(llm, "alice-now", "alice", "bob-now")
    assert r.is_error
    assert "access denied" in json.loads(r.result_json)["error"]


def test_a_session_claimed_by_the_wrong_user_is_refused(stack):
    """The Chat call names bob's session but says it is alice's: the store
    knows better, and nothing of bob's comes back."""
    store, llm = stack
    r = lookup(llm, "bob-now", "alice", "bob-now")
    assert r.is_error, r.result_json
