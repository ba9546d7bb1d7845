"""What a caller may ask of llm-svc (issue 13): the history it hands over
(messages and bytes), the system prompt, max_tokens, the temperature and
the model (an allow-list: --openai-model, the models router.conf names,
--allowed-models). Each refusal is INVALID_ARGUMENT naming the limit, and no
request reaches the model. The offline model is the upstream."""

import json
import subprocess
import urllib.request

import grpc
import pytest

from harness import Service, build_dir, free_port, proto_stubs, tmp_root

pb = proto_stubs()
L = pb.llm_pb2
C = pb.common_pb2

ROUTER_CONF = """# A router.conf naming two models (the rest of the file as router-svc wants it).
[strategy.fast_concise]
instructions =
    model = not-a-model-line (an indented value, not a key)
model = cheap-model   # a comment after it
max_tokens = 400

[strategy.analytical]
model=deep-model
"""


@pytest.fixture(scope="module")
def model():
    with Service("offline-model", binary=build_dir() / "llm-svc" / "offline-model", ready="tcp",
                 args=["--token-delay-ms", "0"]) as svc:
        yield svc


@pytest.fixture(scope="module")
def llm(model):
    conf = tmp_root() / "router-models.conf"
    conf.write_text(ROUTER_CONF)
    with Service("llm-svc", args=["--openai-base-url", f"http://{model.addr}/v1",
                                  "--openai-model", "default-model",
                                  "--store", f"127.0.0.1:{free_port()}",
                                  "--router-config", str(conf),
                                  "--allowed-models", " extra-1 ,extra-2",
                                  "--max-history-messages", "50",
                                  "--max-history-bytes", "20000",
                                  "--max-system-prompt-bytes", "4096",
                                  "--max-output-tokens", "2000"],
                 env={"LLM_ALLOWED_MODELS": None, "ROUTER_CONFIG": None}) as svc:
        yield svc


@pytest.fixture(scope="module")
def stub(llm):
    return pb.llm_pb2_grpc.LlmStub(llm.channel())


def requests_made(model):
    with urllib.request.urlopen(f"http://{model.addr}/stats", timeout=5) as r:
        return json.loads(r.read())["requests"]


def chat(stub, history=(), params=None, system_prompt="", timeout=20):
    req = L.ChatRequest(session_id="s1", user_id="u1", message="hello [[words:3]]", turn_id="t",
                        history=list(history), system_prompt=system_prompt,
                        params=params or C.GenerationParams())
    return list(stub.Chat(req, timeout=timeout))


def complete(stub, messages, params=None):
    return stub.Complete(L.CompleteRequest(messages=list(messages),
                                           params=params or C.GenerationParams()), timeout=20)


def refused(model, fn, *words):
    """fn() is refused INVALID_ARGUMENT with all `words` in the message, and
    nothing was asked of the model."""
    before = requests_made(model)
    with pytest.raises(grpc.RpcError) as e:
        fn()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    for w in words:
        assert w in e.value.details(), e.value.details()
    assert requests_made(model) == before + 1  # only the /stats call itself


def msgs(n, content="x"):
    return [L.Message(role=L.ROLE_USER if i % 2 == 0 else L.ROLE_ASSISTANT, content=content)
            for i in range(n)]


def test_the_forged_chat_of_issue_13_is_refused(model, stub):
    """100,000 history messages, any model name, max_tokens 100000: each
    refused before the model is asked."""
    refused(model, lambda: chat(stub, history=msgs(100_000)), "100000 messages",
            "--max-history-messages")
    refused(model, lambda: chat(stub, params=C.GenerationParams(model="gpt-4-32k")),
            "'gpt-4-32k' is not allowed", "default-model")
    refused(model, lambda: chat(stub, params=C.GenerationParams(max_tokens=100_000)),
            "max_tokens 100000", "--max-output-tokens")


def test_history_bounds(model, stub):
    assert chat(stub, history=msgs(50))[-1].WhichOneof("event") == "done"
    refused(model, lambda: chat(stub, history=msgs(51)), "51 messages", "limit of 50")
    # Bytes count contents, tool names, ids and arguments.
    assert chat(stub, history=msgs(2, "y" * 10_000))[-1].WhichOneof("event") == "done"
    refused(model, lambda: chat(stub, history=msgs(2, "y" * 10_001)), "20002 bytes",
            "--max-history-bytes")
    call = L.Message(role=L.ROLE_ASSISTANT, content="", tool_calls=[
        L.ToolCall(id="c1", name="fetch_internal_knowledge", arguments_json="z" * 20_000)])
    refused(model, lambda: chat(stub, history=[call]), "--max-history-bytes")
    refused(model, lambda: chat(stub, system_prompt="p" * 4097), "system_prompt",
            "--max-system-prompt-bytes")
    assert chat(stub, system_prompt="p" * 4096)[-1].WhichOneof("event") == "done"


def test_complete_has_the_same_bounds(model, stub):
    assert complete(stub, msgs(1)).content
    refused(model, lambda: complete(stub, msgs(100_000)), "messages has 100000 messages")
    refused(model, lambda: complete(stub, msgs(1), C.GenerationParams(model="o1-pro")),
            "'o1-pro' is not allowed")
    refused(model, lambda: complete(stub, msgs(1), C.GenerationParams(max_tokens=2001)),
            "max_tokens 2001")


def test_allowed_models_answer(model, stub):
    for name in ("default-model", "cheap-model", "deep-model", "extra-1", "extra-2", ""):
        ev = chat(stub, params=C.GenerationParams(model=name, max_tokens=2000, temperature=2.0))
        assert ev[-1].WhichOneof("event") == "done", (name, ev[-1])
    # An indented line is part of a value, not a key; names are exact.
    for name in ("not-a-model-line", "Cheap-model", "cheap-model "):
        refused(model, lambda: chat(stub, params=C.GenerationParams(model=name)), "not allowed")


def test_temperature_bounds(model, stub):
    for t in (-0.1, 2.01, float("nan"), float("inf")):
        refused(model, lambda: chat(stub, params=C.GenerationParams(temperature=t)),
                "params.temperature")


@pytest.mark.parametrize("args,words", [
    (["--router-config", "/nonexistent/router.conf"], "--router-config /nonexistent"),
    (["--allowed-models", "good,has space"], "has a space"),
    (["--allowed-models", 'quo"te'], "quote"),
])
def test_bad_model_settings_are_start_up_errors(args, words):
    r = subprocess.run([str(build_dir() / "llm-svc" / "llm-svc"), "--listen",
                        f"127.0.0.1:{free_port()}", *args],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert words in r.stderr, r.stderr
