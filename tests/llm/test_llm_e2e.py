"""End to end: llm-svc (gRPC, stubs from proto/ only) against the offline
model as its upstream. The offline model is steered by directives in the
user message (see llm-svc/offline-model/README.md):
[[toolR:NAME ARGS]] calls a tool in round R, [[fault:KIND*N]] injects a
fault into the first N alike requests, [[delay:MS]] paces tokens,
[[words:N]] answers exactly N tokens."""

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.request

import grpc
import pytest

from harness import Service, build_dir, free_port, proto_stubs

pb = proto_stubs()
L = pb.llm_pb2
C = pb.common_pb2


def offline_binary():
    return build_dir() / "llm-svc" / "offline-model"


@pytest.fixture(scope="module")
def model():
    with Service("offline-model", binary=offline_binary(), ready="tcp",
                 args=["--token-delay-ms", "0", "--retry-after-ms", "100", "--slow-ms", "1500"]) as svc:
        yield svc


def llm_service(model, *args):
    # The store is a port nobody listens on: tests that need it are elsewhere.
    return Service("llm-svc", args=["--openai-base-url", f"http://{model.addr}/v1",
                                    "--store", f"127.0.0.1:{free_port()}",
                                    "--backoff-base-ms", "50", *args])


@pytest.fixture(scope="module")
def llm(model):
    with llm_service(model) as svc:
        yield svc


@pytest.fixture(scope="module")
def stub(llm):
    return pb.llm_pb2_grpc.LlmStub(llm.channel())


def chat(stub, message, tools=True, session="s1", user="u1", timeout=20, **kw):
    req = L.ChatRequest(session_id=session, user_id=user, message=message, turn_id="t",
                        params=C.GenerationParams(tools_enabled=tools), **kw)
    return list(stub.Chat(req, timeout=timeout))


def kinds(events):
    return [e.WhichOneof("event") for e in events]


def text(events):
    return "".join(e.token.content for e in events if e.WhichOneof("event") == "token")


def stats(model):
    with urllib.request.urlopen(f"http://{model.addr}/stats", timeout=5) as r:
        return json.loads(r.read())


def test_plain_answer(stub):
    ev = chat(stub, "hello [[words:7]]", tools=False)
    assert kinds(ev) == ["token"] * 7 + ["done"]
    assert text(ev) == "w1 w2 w3 w4 w5 w6 w7"
    d = ev[-1].done
    assert d.finish_reason == "stop" and d.rounds == 1 and d.usage.completion_tokens == 7
    assert d.upstream == "primary"


def test_knowledge_tool_two_parallel_calls(stub):
    ev = chat(stub, "Explain websockets and grpc?")
    calls = [e.tool_call for e in ev if e.WhichOneof("event") == "tool_call"]
    results = [e.tool_result for e in ev if e.WhichOneof("event") == "tool_result"]
    assert [json.loads(c.arguments_json) for c in calls] == [{"topic": "websockets"},
                                                            {"topic": "grpc"}]
    assert {c.call_id for c in calls} == {r.call_id for r in results}
    for r in results:
        assert not r.is_error
        body = json.loads(r.result_json)
        assert body["results"], body
        # Plain JSON forms: scores as printed (at most 3 decimals, not the
        # nearest double's 17 digits), '/' not escaped.
        assert re.search(r'"score":\d+\.\d{1,3}[,}]', r.result_json), r.result_json
        assert "\\/" not in r.result_json
    srcs = {json.loads(r.result_json)["results"][0]["source"] for r in results}
    assert srcs == {"websockets.md", "grpc.md"}
    assert ev[-1].WhichOneof("event") == "done" and ev[-1].done.rounds == 2
    assert "websockets.md" in text(ev)


def test_two_rounds_and_failing_tools(stub):
    msg = ('go [[tool1:fetch_internal_knowledge {"topic":"postgresql indexes"}]]'
           '[[tool1:no_such_tool {}]]'
           '[[tool2:fetch_internal_knowledge {"topic": 5}]]'
           '[[tool2:fetch_internal_knowledge {not json]]'
           '[[tool2:fetch_internal_knowledge {"topic":"zzqx unknownword"}]]')
    ev = chat(stub, msg)
    calls = [e.tool_call for e in ev if e.WhichOneof("event") == "tool_call"]
    results = {e.tool_result.call_id: e.tool_result for e in ev
               if e.WhichOneof("event") == "tool_result"}
    assert [c.round for c in calls] == [1, 1, 2, 2, 2]
    by_name = [(c.name, results[c.call_id]) for c in calls]
    assert not by_name[0][1].is_error
    assert by_name[1][1].is_error and "unknown tool" in json.loads(by_name[1][1].result_json)["error"]
    assert by_name[2][1].is_error and "type string" in by_name[2][1].result_json
    assert by_name[3][1].is_error and "not valid JSON" in by_name[3][1].result_json
    nothing = json.loads(by_name[4][1].result_json)
    assert not by_name[4][1].is_error and nothing["results"] == [] and "nothing found" in nothing["message"]
    assert ev[-1].done.rounds == 3 and ev[-1].done.finish_reason == "stop"
    assert "failed" in text(ev)


def test_round_limit(model):
    with llm_service(model, "--max-rounds", "2") as svc:
        s = pb.llm_pb2_grpc.LlmStub(svc.channel())
        ev = chat(s, 'loop [[tool*:fetch_internal_knowledge {"topic":"python"}]]')
        assert ev[-1].done.finish_reason == "max_rounds" and ev[-1].done.rounds == 2
        assert sum(1 for e in ev if e.WhichOneof("event") == "tool_call") == 2


def test_cross_session_refused_without_store(stub):
    ev = chat(stub, '[[tool:lookup_contextual_data {"session_id":"someone-elses"}]]',
              session="mine", user="alice")
    r = [e.tool_result for e in ev if e.WhichOneof("event") == "tool_result"]
    assert len(r) == 1 and r[0].is_error
    assert "access denied" in json.loads(r[0].result_json)["error"]
    assert ev[-1].WhichOneof("event") == "done"


def test_own_session_store_down_is_a_tool_error(stub):
    ev = chat(stub, '[[tool:lookup_contextual_data {"session_id":"mine"}]]', session="mine")
    r = [e.tool_result for e in ev if e.WhichOneof("event") == "tool_result"]
    assert r[0].is_error and "unavailable" in r[0].result_json
    assert ev[-1].WhichOneof("event") == "done"


def test_429_retried_then_ok(stub):
    t0 = time.monotonic()
    ev = chat(stub, "rate [[fault:429*2]] [[words:3]]", tools=False)
    assert text(ev) == "w1 w2 w3" and ev[-1].WhichOneof("event") == "done"
    assert time.monotonic() - t0 >= 0.2  # two retry-after-ms waits of 100 ms


def test_429_retries_run_out(stub):
    ev = chat(stub, "rate always [[fault:429]]", tools=False)
    assert kinds(ev) == ["error"]
    e = ev[0].error
    assert e.category == L.ERROR_CATEGORY_RATE_LIMITED and e.retryable
    assert "3 attempts" in e.message


def test_500_retried_then_ok(stub):
    ev = chat(stub, "flaky [[fault:500*1]] [[words:2]]", tools=False)
    assert text(ev) == "w1 w2"


@pytest.mark.parametrize("fault,category", [
    ("500", "ERROR_CATEGORY_UPSTREAM_UNAVAILABLE"),
    ("401", "ERROR_CATEGORY_AUTH_FAILED"),
    ("404", "ERROR_CATEGORY_MODEL_NOT_FOUND"),
    ("malformed", "ERROR_CATEGORY_BAD_UPSTREAM_DATA"),
    ("drop", "ERROR_CATEGORY_UPSTREAM_UNAVAILABLE"),
])
def test_fault_categories(stub, fault, category):
    ev = chat(stub, f"a b c d e f g [[fault:{fault}]]", tools=False)
    assert ev[-1].WhichOneof("event") == "error", kinds(ev)
    assert ev[-1].error.category == getattr(L, category), ev[-1].error
    if fault in ("malformed", "drop"):
        # Tokens went out first: never retried, so no duplicate tokens.
        assert 1 <= len([e for e in ev if e.WhichOneof("event") == "token"]) <= 4


def test_slow_first_byte_times_out(model):
    with llm_service(model, "--first-byte-timeout-ms", "800") as svc:
        s = pb.llm_pb2_grpc.LlmStub(svc.channel())
        t0 = time.monotonic()
        ev = chat(s, "late [[fault:slow]]", tools=False)
        assert kinds(ev) == ["error"]
        assert ev[0].error.category == L.ERROR_CATEGORY_TIMEOUT
        assert 0.7 < time.monotonic() - t0 < 1.5  # not retried past the first timeout


def test_cancel_closes_upstream_within_100ms(stub, model):
    before = stats(model)["aborted"]
    req = L.ChatRequest(session_id="s", user_id="u", message="slow [[delay:50]] [[words:400]]",
                        params=C.GenerationParams())
    it = stub.Chat(req, timeout=30)
    got = 0
    for e in it:
        got += 1
        if got == 5:
            t_cancel = time.time()
            it.cancel()
            break
    deadline = time.time() + 3
    while stats(model)["aborted"] == before and time.time() < deadline:
        time.sleep(0.01)
    s = stats(model)
    assert s["aborted"] == before + 1
    lag_ms = s["last_abort_unix_ms"] - t_cancel * 1000
    assert lag_ms < 100, lag_ms


def test_complete_and_list_tools(stub):
    r = stub.Complete(L.CompleteRequest(
        system_prompt="Summarize the conversation.",
        messages=[L.Message(role=L.ROLE_USER, content="How do postgresql indexes work?"),
                  L.Message(role=L.ROLE_ASSISTANT, content="B-tree indexes serve ranges."),
                  L.Message(role=L.ROLE_USER, content="And websockets pings?")]), timeout=10)
    for part in ("Overview", "Key topics", "intent shifts", "Insights"):
        assert part in r.content
    assert "postgresql" in r.content and r.usage.total_tokens > 0
    with pytest.raises(grpc.RpcError) as e:
        stub.Complete(L.CompleteRequest(messages=[L.Message(role=L.ROLE_USER,
                                                            content="x [[fault:401]]")]), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    tools = stub.ListTools(L.ListToolsRequest(), timeout=5).tools
    assert {t.name for t in tools} == {"fetch_internal_knowledge", "lookup_contextual_data"}
    for t in tools:
        assert json.loads(t.parameters_json_schema)["type"] == "object"


def test_bad_requests(stub):
    with pytest.raises(grpc.RpcError) as e:
        chat(stub, "")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_500_concurrent_streams_every_token(stub):
    """With tools offered, so every request body carries the tool schemas:
    bodies are built on the gRPC thread and freed on the upstream thread at
    once (a schema shared by reference between them once crashed llm-svc
    under load: json-c's reference counts are not atomic)."""
    n, words = 500, 20
    results = [None] * n

    def one(i):
        try:
            ev = chat(stub, f"stream {i} [[words:{words}]]", tools=True, session=f"s{i}", timeout=120)
            results[i] = ev
        except Exception as e:  # recorded, asserted below
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = " ".join(f"w{k}" for k in range(1, words + 1))
    bad = [i for i, r in enumerate(results)
           if isinstance(r, Exception) or text(r) != expected or kinds(r)[-1] != "done"]
    assert not bad, (len(bad), results[bad[0]] if bad else None)


def test_a_long_answer_arrives_whole(stub):
    """100,000 tokens (~700 KB of text, ~13 MB of upstream SSE) in one
    answer: every token, in order, and a normal end."""
    ev = chat(stub, "[[words:100000]]", tools=False, timeout=120)
    assert ev[-1].WhichOneof("event") == "done" and ev[-1].done.finish_reason == "stop"
    assert text(ev) == " ".join(f"w{i}" for i in range(1, 100001))


def test_a_stalled_caller_pauses_the_upstream_and_loses_nothing(model):
    """The caller stops reading for 2 s early in a 100,000-token answer
    (~13 MB of upstream SSE, more than the socket buffers on the way hold):
    llm-svc's write queue fills, it pauses the upstream transfer, and the
    offline model, which writes only as fast as it is read, cannot finish
    during the stall. Then every token arrives, in order."""
    words = 100000  # the offline model's longest [[words:N]]
    with llm_service(model, "--max-queued-writes", "64") as svc:
        # No BDP probing: the stream's flow-control window stays at 64 KiB,
        # so the stall reaches llm-svc at once.
        stub = pb.llm_pb2_grpc.LlmStub(svc.channel(options=[("grpc.http2.bdp_probe", 0)]))
        req = L.ChatRequest(session_id="stall", user_id="u1", message=f"[[words:{words}]]",
                            turn_id="t", params=C.GenerationParams(tools_enabled=False))
        # /stats counts itself as a completed request once it has answered.
        before = stats(model)["completed"]
        it = stub.Chat(req, timeout=120)
        events = [next(it)]
        time.sleep(2)
        during = stats(model)["completed"]
        events += list(it)
        after = stats(model)["completed"]
    assert during == before + 1, "the model finished the answer while the caller was not reading"
    assert events[-1].WhichOneof("event") == "done" and events[-1].done.finish_reason == "stop"
    assert text(events) == " ".join(f"w{i}" for i in range(1, words + 1))
    assert after == during + 2, "the answer and the second /stats completed"


def test_knowledge_folder_found_beside_an_installed_binary(model, tmp_path):
    """No build-tree path is compiled into --help; an installed binary finds
    PREFIX/share/convo/knowledge beside itself, whatever the prefix, before
    the source tree's (which this copy could also reach)."""
    h = subprocess.run([str(build_dir() / "llm-svc" / "llm-svc"), "--help"], capture_output=True,
                       text=True, timeout=10)
    assert str(build_dir().parent) not in h.stdout + h.stderr
    prefix = tmp_path / "opt"
    (prefix / "bin").mkdir(parents=True)
    kdir = prefix / "share" / "convo" / "knowledge"
    kdir.mkdir(parents=True)
    (kdir / "only.md").write_text("# Zebras\n\nZebras are striped horses of Africa.\n")
    binary = prefix / "bin" / "llm-svc"
    shutil.copy(build_dir() / "llm-svc" / "llm-svc", binary)
    with llm_service_binary(model, binary) as svc:
        st = pb.llm_pb2_grpc.LlmStub(svc.channel())
        ev = chat(st, "Explain zebras?")
        results = [json.loads(e.tool_result.result_json) for e in ev
                   if e.WhichOneof("event") == "tool_result"]
        assert results and results[0]["results"][0]["source"] == "only.md", results


def llm_service_binary(model, binary):
    return Service("llm-svc", binary=binary, args=["--openai-base-url", f"http://{model.addr}/v1",
                                                   "--store", f"127.0.0.1:{free_port()}"])


def promtool_check(text):
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_metrics_count_turns_retries_tools_and_tokens(model):
    """A fresh llm-svc's /metrics after known turns: each counter moved by
    exactly what happened, and a tool name the model made up is counted as
    "unknown", never as its own label value."""
    with llm_service(model) as svc:
        s = pb.llm_pb2_grpc.LlmStub(svc.channel())
        # Messages of their own: the model counts faults per alike request,
        # and other tests of this module send theirs to the same model.
        assert kinds(chat(s, "metrics hello [[words:7]]", tools=False))[-1] == "done"
        assert kinds(chat(s, "metrics rate [[fault:429*2]] [[words:3]]", tools=False))[-1] == "done"
        assert kinds(chat(s, "metrics rate always [[fault:429]]", tools=False)) == ["error"]
        ev = chat(s, 'go [[tool1:fetch_internal_knowledge {"topic":"postgresql indexes"}]]'
                     '[[tool1:made_up_tool_x1 {}]]')
        assert kinds(ev)[-1] == "done"
        m = svc.metric
        assert m("convo_llm_turns_total", kind="chat", outcome="done") == 3
        assert m("convo_llm_turns_total", kind="chat", outcome="error") == 1
        assert m("convo_llm_upstream_retries_total", reason="rate_limited") == 4  # 2, then 2 more
        assert m("convo_llm_upstream_requests_total", outcome="http_error", category="rate_limited") == 1
        assert m("convo_llm_upstream_requests_total", outcome="ok", category="none") == 4  # 2 rounds
        assert m("convo_llm_tool_calls_total", tool="fetch_internal_knowledge", outcome="ok") == 1
        assert m("convo_llm_tool_calls_total", tool="unknown", outcome="error") == 1
        assert m("convo_llm_usage_tokens_total", kind="completion") >= 10
        assert m("convo_llm_usage_tokens_total", kind="prompt") > 0
        # Every attempt's first byte was timed: 4 ok + 5 refused.
        assert m("convo_llm_upstream_first_byte_seconds_count") == 9
        assert m("convo_grpc_server_handled_total", grpc_method="Chat", grpc_code="OK") == 4
        assert m("convo_llm_upstream_requests_in_flight") == 0
        text = svc.scrape()
        assert "made_up_tool_x1" not in text
        promtool_check(text)
        assert svc.scrape("/healthz").strip() == "ok"
