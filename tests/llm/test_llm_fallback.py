"""Model fallbacks and circuit breakers: llm-svc with a primary and
--fallback endpoints, each a real offline-model process (or a port nobody
listens on), steered by its --fault option (see
llm-svc/offline-model/README.md). What reached each endpoint is read from
its /stats counters, never from logs."""

import json
import os
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
H = pb.health_pb2


def offline(*args, port=None):
    return Service("offline-model", binary=build_dir() / "llm-svc" / "offline-model",
                   ready="tcp", port=port, args=["--token-delay-ms", "0", *args])


def url(addr):
    return f"http://{addr}/v1"


def llm_service(primary_url, *args, env=None):
    # The store is a port nobody listens on: no test here uses it.
    return Service("llm-svc", env=env,
                   args=["--openai-base-url", primary_url, "--store", f"127.0.0.1:{free_port()}",
                         "--backoff-base-ms", "20", *args])


def chat_requests(model):
    with urllib.request.urlopen(f"http://{model.addr}/stats", timeout=5) as r:
        return json.loads(r.read())["chat_requests"]


def chat(svc, message="hello [[words:3]]"):
    stub = pb.llm_pb2_grpc.LlmStub(svc.channel())
    req = L.ChatRequest(session_id="s1", user_id="u1", message=message, turn_id="t",
                        params=C.GenerationParams(tools_enabled=False))
    return list(stub.Chat(req, timeout=30))


def text(events):
    return "".join(e.token.content for e in events if e.WhichOneof("event") == "token")


def answered_by(events):
    last = events[-1]
    assert last.WhichOneof("event") == "done", last
    return last.done.upstream


def circuit(svc, name):
    return svc.health_check(f"upstream/{name}")


@pytest.fixture(scope="module")
def backup():
    with offline() as svc:
        yield svc


def backup_entry(backup, *more):
    return ",".join([f"url={url(backup.addr)}", "model=backup-model", "name=backup", *more])


def test_primary_down_is_answered_by_the_fallback(backup):
    before = chat_requests(backup)
    down = url(f"127.0.0.1:{free_port()}")  # nobody listens there
    with llm_service(down, "--fallback", backup_entry(backup)) as svc:
        ev = chat(svc)
        assert text(ev) == "w1 w2 w3"
        assert answered_by(ev) == "backup" and ev[-1].done.model == "backup-model"
        stub = pb.llm_pb2_grpc.LlmStub(svc.channel())
        r = stub.Complete(L.CompleteRequest(
            system_prompt="Summarize the conversation.",
            messages=[L.Message(role=L.ROLE_USER, content="How do postgresql indexes work?")]),
            timeout=30)
        assert "Overview" in r.content and r.upstream == "backup" and r.model == "backup-model"
        # One failure each is below --breaker-failures (5): still closed.
        assert circuit(svc, "primary") == H.HealthCheckResponse.SERVING
        # Both the request that failed and the one that answered are counted.
        m = svc.metric
        assert m("convo_llm_turns_total", kind="chat", outcome="done") == 1
        assert m("convo_llm_turns_total", kind="complete", outcome="done") == 1
        assert m("convo_llm_upstream_requests_total", outcome="connect_error",
                 category="upstream_unavailable") == 2
        assert m("convo_llm_upstream_requests_total", outcome="ok", category="none") == 2
        assert m("convo_llm_endpoint_requests_total", upstream="primary", result="failed") == 2
        assert m("convo_llm_endpoint_requests_total", upstream="backup", result="answered") == 2
        assert m("convo_llm_endpoint_requests_total", upstream="primary", result="answered") == 0
        assert m("convo_llm_endpoint_circuit_state", upstream="primary") == 0
    assert chat_requests(backup) == before + 2


def test_a_healthy_primary_answers_and_the_fallback_is_not_asked(backup):
    before = chat_requests(backup)
    with offline() as primary, llm_service(url(primary.addr), "--fallback",
                                           backup_entry(backup)) as svc:
        ev = chat(svc)
        assert answered_by(ev) == "primary" and text(ev) == "w1 w2 w3"
        assert chat_requests(primary) == 1
    assert chat_requests(backup) == before


@pytest.mark.parametrize("fault", ["500", "429"])
def test_retries_spent_on_the_primary_then_the_fallback_answers(backup, fault):
    before = chat_requests(backup)
    with offline("--fault", fault, "--retry-after-ms", "20") as primary, \
            llm_service(url(primary.addr), "--max-attempts", "2", "--fallback",
                        backup_entry(backup)) as svc:
        ev = chat(svc)
        assert answered_by(ev) == "backup" and text(ev) == "w1 w2 w3"
        assert chat_requests(primary) == 2  # both attempts, then the fallback
    assert chat_requests(backup) == before + 1


def test_no_first_byte_in_time_goes_to_the_fallback(backup):
    with offline("--fault", "slow", "--slow-ms", "5000") as primary, \
            llm_service(url(primary.addr), "--first-byte-timeout-ms", "300", "--fallback",
                        backup_entry(backup)) as svc:
        ev = chat(svc)
        assert answered_by(ev) == "backup" and text(ev) == "w1 w2 w3"
        assert chat_requests(primary) == 1


def test_a_failure_after_tokens_were_streamed_is_not_retried_on_the_fallback(backup):
    before = chat_requests(backup)
    # The primary cuts its connection after 3 tokens.
    with offline("--fault", "drop") as primary, \
            llm_service(url(primary.addr), "--fallback", backup_entry(backup)) as svc:
        ev = chat(svc, "a b c d e f g h")
        assert ev[-1].WhichOneof("event") == "error", ev[-1]
        assert ev[-1].error.category == L.ERROR_CATEGORY_UPSTREAM_UNAVAILABLE
        tokens = [e for e in ev if e.WhichOneof("event") == "token"]
        assert 1 <= len(tokens) <= 4
        assert chat_requests(primary) == 1
    assert chat_requests(backup) == before, "the fallback was asked after tokens went out"


def test_the_breaker_opens_half_opens_and_closes(backup):
    port = free_port()
    primary = offline("--fault", "500", port=port)
    cooldown_s = 1.5
    try:
        # The cap at the base: every cool-down at most cooldown_s (the
        # growth is the next test's).
        with llm_service(url(primary.addr), "--max-attempts", "1", "--breaker-failures", "3",
                         "--breaker-cooldown-ms", str(int(cooldown_s * 1000)),
                         "--breaker-cooldown-max-ms", str(int(cooldown_s * 1000)),
                         "--fallback", backup_entry(backup)) as svc:
            assert circuit(svc, "primary") == H.HealthCheckResponse.SERVING
            assert circuit(svc, "backup") == H.HealthCheckResponse.SERVING
            for _ in range(3):
                assert answered_by(chat(svc)) == "backup"
            assert chat_requests(primary) == 3
            assert circuit(svc, "primary") == H.HealthCheckResponse.NOT_SERVING
            assert svc.metric("convo_llm_endpoint_circuit_state", upstream="primary") == 1

            # Open: the primary is not asked at all.
            for _ in range(3):
                assert answered_by(chat(svc)) == "backup"
            assert chat_requests(primary) == 3
            assert svc.metric("convo_llm_endpoint_skipped_total", upstream="primary") == 3

            # After the cool-down one request probes it; still failing, the
            # circuit opens again and the next requests skip it.
            time.sleep(cooldown_s + 0.5)
            assert answered_by(chat(svc)) == "backup"
            assert answered_by(chat(svc)) == "backup"
            assert chat_requests(primary) == 4
            assert circuit(svc, "primary") == H.HealthCheckResponse.NOT_SERVING
            assert svc.metric("convo_llm_endpoint_skipped_total", upstream="primary") == 4

            # The primary is back (a healthy process on the same port): the
            # probe after the cool-down is answered and the circuit closes.
            primary.stop()
            primary.args = ["--token-delay-ms", "0"]
            primary.start()
            time.sleep(cooldown_s + 0.5)
            assert answered_by(chat(svc)) == "primary"
            assert circuit(svc, "primary") == H.HealthCheckResponse.SERVING
            assert answered_by(chat(svc)) == "primary"
            assert chat_requests(primary) == 2
            assert circuit(svc, "backup") == H.HealthCheckResponse.SERVING
            m = svc.metric
            assert m("convo_llm_endpoint_circuit_state", upstream="primary") == 0
            assert m("convo_llm_endpoint_requests_total", upstream="primary", result="failed") == 4
            assert m("convo_llm_endpoint_requests_total", upstream="primary",
                     result="answered") == 2
            assert m("convo_llm_endpoint_requests_total", upstream="backup", result="answered") == 8
            assert m("convo_llm_turns_total", kind="chat", outcome="done") == 10
            logs = svc.log_text()
            for what in ("circuit open", "half-open", "circuit closed"):
                assert what in logs, what
    finally:
        primary.stop()


def wait_for(pred, what, timeout=60.0):
    """Waits for pred() (a safety limit, not a measure)."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def outcome(events):
    """'answered', 'refused' (no endpoint asked: every circuit open) or
    'failed' (an endpoint was asked and failed)."""
    last = events[-1]
    if last.WhichOneof("event") == "done":
        return "answered"
    assert last.error.category == L.ERROR_CATEGORY_UPSTREAM_UNAVAILABLE, last
    return "refused" if "no upstream can take the request now" in last.error.message else "failed"


def test_a_short_outage_is_probed_through_and_closes_at_the_first_probe_after_it():
    """No fallback, turns one after the other throughout: the primary is
    stopped for 2 s and started again. Its circuit opens, probes the dead
    primary after short cool-downs (so some probes fail while it is down),
    and the first probe once it is back closes it: every turn after that is
    answered. A fixed cool-down longer than the outage (the old 10 s) would
    probe nothing while it was down."""
    port = free_port()
    primary = offline(port=port)
    primary.start()
    failures = 3
    phase = ["up"]
    outcomes = []  # (phase when the turn started, its outcome), in order
    stop = threading.Event()
    gate = threading.Lock()
    try:
        # The first cool-down is 0.4-1.2 s: a probe comes inside the outage.
        with llm_service(url(primary.addr), "--max-attempts", "1",
                         "--breaker-failures", str(failures), "--breaker-cooldown-ms", "400",
                         "--breaker-cooldown-max-ms", "1600") as svc:
            def turns():
                while not stop.is_set():
                    with gate:  # never across a stop or a start
                        outcomes.append((phase[0], outcome(chat(svc))))
                    time.sleep(0.02)

            def switch(to, action):
                with gate:
                    action()
                    phase[0] = to

            def answered_since_back():
                return sum(1 for p, o in outcomes if p == "back" and o == "answered")

            t = threading.Thread(target=turns)
            t.start()
            try:
                wait_for(lambda: len(outcomes) >= 3, "the first turns")
                switch("down", primary.stop)
                time.sleep(2)
                failed_while_down = []

                def restart():
                    failed_while_down.append(svc.metric("convo_llm_endpoint_requests_total",
                                                        upstream="primary", result="failed"))
                    primary.start()

                switch("back", restart)
                wait_for(lambda: answered_since_back() >= 5, "turns answered again")
            finally:
                stop.set()
                t.join()
            logs = svc.log_text()
            m = svc.metric
            failed_at_end = m("convo_llm_endpoint_requests_total", upstream="primary",
                              result="failed")
            answered_at_end = m("convo_llm_endpoint_requests_total", upstream="primary",
                                result="answered")

        up = [o for p, o in outcomes if p == "up"]
        down = [o for p, o in outcomes if p == "down"]
        back = [o for p, o in outcomes if p == "back"]
        print(f"outage of 2 s: {len(down)} turns, {down.count('refused')} refused, "
              f"{down.count('failed') - failures} probes failed; back: {back.index('answered')} "
              f"refused before the first probe answered")
        assert set(up) == {"answered"}, outcomes
        # Down: `failures` turns failed by asking it, which opened the circuit;
        # then turns were refused without asking, and probes went to the dead
        # primary between them (failed), each followed by refusals again.
        assert down[:failures] == ["failed"] * failures, down
        after_open = down[failures:]
        assert after_open[0] == "refused", down
        probes_while_down = after_open.count("failed")
        assert probes_while_down >= 1, down
        # Back: perhaps refused until the next probe is due, then that probe
        # answered (no probe failed since) and every turn after it too.
        first = back.index("answered")
        assert set(back[:first]) <= {"refused"}, back
        assert set(back[first:]) == {"answered"}, back
        assert failed_at_end == failed_while_down[0] == failures + probes_while_down
        assert answered_at_end == len(up) + len(back) - first
        assert chat_requests(primary) == len(back) - first
        # The log tells the same story in the same order.
        assert logs.count("circuit open after failed requests in a row") == 1
        assert logs.count("the probe failed") == probes_while_down
        assert logs.count("circuit closed: the probe was answered") == 1
        assert logs.rindex("the probe failed") < logs.index("circuit closed")
    finally:
        primary.stop()


def test_every_circuit_open_fails_at_once_without_asking_anyone():
    down = url(f"127.0.0.1:{free_port()}")
    with offline("--fault", "500") as broken, \
            llm_service(down, "--max-attempts", "1", "--breaker-failures", "1",
                        "--breaker-cooldown-ms", "600000", "--fallback",
                        f"url={url(broken.addr)},name=broken") as svc:
        ev = chat(svc)
        assert ev[-1].WhichOneof("event") == "error"
        assert chat_requests(broken) == 1
        ev = chat(svc)
        e = ev[-1].error
        assert e.category == L.ERROR_CATEGORY_UPSTREAM_UNAVAILABLE and e.retryable
        assert "primary circuit open" in e.message and "broken circuit open" in e.message
        assert chat_requests(broken) == 1
        stub = pb.llm_pb2_grpc.LlmStub(svc.channel())
        with pytest.raises(grpc.RpcError) as err:
            stub.Complete(L.CompleteRequest(messages=[L.Message(role=L.ROLE_USER, content="x")]),
                          timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_key_sources_and_an_ordered_list_from_the_environment(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    key_file.chmod(0o600)
    down = url(f"127.0.0.1:{free_port()}")
    with offline("--api-key", "s3cret-key") as keyed:
        entries = ";".join([
            f"url={down},name=also-down",
            f"url={url(keyed.addr)},key-file={key_file},name=keyed",
        ])
        with llm_service(down, "--max-attempts", "1", env={"LLM_FALLBACKS": entries}) as svc:
            assert answered_by(chat(svc)) == "keyed"
        assert chat_requests(keyed) == 1
        # A wrong key is the endpoint's answer (401), not its failure: no
        # further fallback, and the caller is told.
        with llm_service(down, "--max-attempts", "1", "--fallback",
                         f"url={url(keyed.addr)},key-env=CONVO_TEST_WRONG_KEY,name=keyed",
                         env={"CONVO_TEST_WRONG_KEY": "not-the-key"}) as svc:
            ev = chat(svc)
            assert ev[-1].WhichOneof("event") == "error"
            assert ev[-1].error.category == L.ERROR_CATEGORY_AUTH_FAILED
        assert chat_requests(keyed) == 2


SECRET = "sk-never-print-me-4711"


@pytest.mark.parametrize("entry,env,expected", [
    (f"url=http://127.0.0.1:1/v1,key={SECRET}", {}, "a key is never written here"),
    (f"url=http://127.0.0.1:1/v1,{SECRET}", {}, "field 2 is not NAME=VALUE"),
    ("model=gpt-4o", {}, "url= is required"),
    ("url=ftp://127.0.0.1/v1", {}, "url is not an http:// or https:// URL"),
    ("url=127.0.0.1:8089/v1", {}, "url is not a URL"),
    ("url=http://127.0.0.1:1/v1,colour=blue", {}, "unknown field 'colour'"),
    ("url=http://127.0.0.1:1/v1,model=", {}, "model is empty"),
    ("url=http://127.0.0.1:1/v1,key-env=CONVO_TEST_UNSET_KEY", {"CONVO_TEST_UNSET_KEY": None},
     "key-env=CONVO_TEST_UNSET_KEY: that environment variable is not set or empty"),
    ("url=http://127.0.0.1:1/v1,key-file=/nonexistent/key", {}, "cannot be read"),
    ("url=http://127.0.0.1:1/v1,key-env=A,key-file=/k", {"A": "x"}, "one key source"),
    ("url=http://127.0.0.1:1/v1,name=primary", {}, "is the primary endpoint's"),
    ("url=http://127.0.0.1:1/v1,name=a b", {}, "name must be"),
    ("url=http://127.0.0.1:1/v1,name=x;url=http://127.0.0.1:2/v1,name=x", {},
     "entry 2: the name x is taken"),
])
def test_a_bad_fallback_entry_is_refused_at_start_up(entry, env, expected):
    binary = build_dir() / "llm-svc" / "llm-svc"
    environ = dict(os.environ)
    for k, v in env.items():
        if v is None:
            environ.pop(k, None)
        else:
            environ[k] = v
    for how in ("flag", "env"):
        args = [str(binary), "--listen", f"127.0.0.1:{free_port()}"]
        e = dict(environ)
        if how == "flag":
            args += ["--fallback", entry]
        else:
            e["LLM_FALLBACKS"] = entry
        r = subprocess.run(args, capture_output=True, text=True, timeout=20, env=e)
        assert r.returncode == 2, (how, r.returncode, r.stderr)
        assert "--fallback entry" in r.stderr and expected in r.stderr, (how, r.stderr)
        assert SECRET not in r.stderr + r.stdout


def test_a_key_file_of_another_kind_is_refused(tmp_path):
    big = tmp_path / "big"
    big.write_text("x" * 5000)
    binary = build_dir() / "llm-svc" / "llm-svc"
    r = subprocess.run([str(binary), "--fallback", f"url=http://127.0.0.1:1/v1,key-file={big}"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and "is over 4096 bytes" in r.stderr, r.stderr
    r = subprocess.run([str(binary), "--breaker-failures", "0"], capture_output=True, text=True,
                       timeout=20)
    assert r.returncode == 2, r.stderr
    assert "--breaker-failures: '0' is not an integer of at least 1" in r.stderr, r.stderr
    r = subprocess.run([str(binary), "--breaker-cooldown-ms", "0"], capture_output=True,
                       text=True, timeout=20)
    assert r.returncode == 2, r.stderr
    assert "--breaker-cooldown-ms: '0' is not an integer of at least 1" in r.stderr, r.stderr
