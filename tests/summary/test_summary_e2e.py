"""summary-svc end to end: real store-svc on a throwaway PostgreSQL, real
llm-svc, and the offline model as its upstream (it answers a summary request
with a structured summary naming the most frequent words of the
conversation). Sessions and events go in through store-svc's gRPC API, as
the gateway writes them.

The offline model's GET /stats counts the HTTP requests it served: the model
calls made (each Complete is one request), so "one model call" is checked
where it happens, not inferred from summary-svc's own logs."""

import json
import os
import re
import subprocess
import threading
import time
import urllib.request

import grpc
import pytest

from harness import Postgres, Service, build_dir, proto_stubs

pb = proto_stubs()
S = pb.store_pb2
C = pb.common_pb2
SM = pb.summary_pb2

DONE = C.SUMMARY_STATUS_DONE
PENDING = C.SUMMARY_STATUS_PENDING
FAILED = C.SUMMARY_STATUS_FAILED

# ASan's quarantine would keep freed memory resident and hide whether memory
# stays bounded; harmless without a sanitizer.
SANITIZER_ENV = {"ASAN_OPTIONS": "quarantine_size_mb=8:detect_leaks=1",
                 "UBSAN_OPTIONS": "print_stacktrace=1"}


# ---- the services -----------------------------------------------------------

@pytest.fixture(scope="module")
def pg():
    with Postgres() as p:
        yield p


@pytest.fixture(scope="module")
def store(pg):
    with Service("store-svc", env={"DATABASE_URL": pg.url, **SANITIZER_ENV},
                 args=["--log-level", "info"], timeout=30) as svc:
        yield svc


@pytest.fixture(scope="module")
def model():
    # slow: requests carrying [[fault:slow]] answer after --slow-ms, to hold
    # a summary in progress while a second request comes in.
    with Service("offline-model", binary=build_dir() / "llm-svc" / "offline-model", ready="tcp",
                 args=["--token-delay-ms", "0", "--slow-ms", "2500"]) as svc:
        yield svc


def start_llm(model, store, port=None):
    return Service("llm-svc", port=port, env=SANITIZER_ENV,
                   args=["--openai-base-url", f"http://{model.addr}/v1", "--store", store.addr,
                         "--backoff-base-ms", "50"])


@pytest.fixture(scope="module")
def llm(model, store):
    with start_llm(model, store) as svc:
        yield svc


@pytest.fixture(scope="module")
def sstub(store):
    return pb.store_pb2_grpc.StoreStub(store.channel())


def start_summary(store, llm_addr, *args, sweep_ms=0, sweep_delay_ms=0, env=None):
    """A summary-svc; sweep_ms=0 turns the sweep off so that only explicit
    Summarize calls make model calls (the counts stay exact)."""
    e = dict(SANITIZER_ENV)
    e.update(env or {})
    return Service("summary-svc", env=e, args=[
        "--store", store.addr, "--llm", llm_addr, "--log-level", "debug",
        "--sweep-interval-ms", str(sweep_ms), "--sweep-delay-ms", str(sweep_delay_ms),
        "--retry-backoff-ms", "300", "--lease-seconds", "60", "--store-timeout-ms", "5000",
        *args])


def summary_stub(svc):
    return pb.summary_pb2_grpc.SummaryStub(svc.channel())


_stats_asked = {}


def model_requests(model):
    """Chat-completion requests the offline model served so far: its
    request count, less the /stats requests (this one included)."""
    _stats_asked[model.pid] = _stats_asked.get(model.pid, 0) + 1
    with urllib.request.urlopen(f"http://{model.addr}/stats", timeout=5) as r:
        return json.loads(r.read())["requests"] - _stats_asked[model.pid]


def stop_clean(svc):
    """SIGTERM: exits 0 (no sanitizer report, no leak); every log line is
    one JSON object."""
    assert svc.stop() == 0, svc.log_tail(40)
    for line in svc.log_lines(strict=True):
        assert {"time", "level", "service", "message"} <= line.keys(), line


# ---- sessions through store-svc --------------------------------------------

_n = [0]


def new_id(prefix):
    _n[0] += 1
    return f"{prefix}-{os.getpid()}-{int(time.time() * 1000) % 10 ** 8}-{_n[0]}"


class Writer:
    """Writes a session's events as the gateway does: numbered, in
    batches."""

    def __init__(self, stub, sid, user="u1"):
        self.stub, self.sid, self.seq, self.batch = stub, sid, 0, []
        self.user_id = user
        stub.OpenSession(S.OpenSessionRequest(session_id=sid, user_id=user), timeout=10)

    def add(self, type_, content):
        self.seq += 1
        self.batch.append(S.Event(seq=self.seq, type=type_, content=content))
        if len(self.batch) >= 1000:
            self.flush()

    def user(self, text):
        self.add(S.EVENT_TYPE_USER_MESSAGE, text)

    def reply(self, text):
        # The assistant's reply arrives as tokens, a word at a time.
        for w in re.findall(r"\S+\s*", text):
            self.add(S.EVENT_TYPE_AI_TOKEN, w)

    def tool(self, call_id, name, args, result):
        self.add(S.EVENT_TYPE_TOOL_CALL, json.dumps({"id": call_id, "tool": name,
                                                     "arguments": args}))
        self.add(S.EVENT_TYPE_TOOL_RESULT, json.dumps({"id": call_id, "tool": name,
                                                       "result": result}))

    def system(self, obj):
        self.add(S.EVENT_TYPE_SYSTEM_EVENT, json.dumps(obj))

    def flush(self):
        if self.batch:
            self.stub.AppendEvents(S.AppendEventsRequest(session_id=self.sid, events=self.batch,
                                                         user_id=self.user_id), timeout=60)
            self.batch = []

    def end(self):
        self.flush()
        return self.stub.EndSession(S.EndSessionRequest(session_id=self.sid, user_id=self.user_id),
                                    timeout=10).session


def pgvector_session(stub, sid, extra_user=""):
    """A short conversation: the user asks about pgvector and HNSW; the
    assistant's replies carry the facts (PostgreSQL, ef_search)."""
    w = Writer(stub, sid)
    w.system({"event": "connected"})
    w.user("What is pgvector and how does HNSW indexing work?" + extra_user)
    w.system({"event": "route", "strategy": "TOOL_HEAVY"})
    w.tool("call_1", "fetch_internal_knowledge", {"topic": "pgvector"},
           {"passages": ["pgvector adds vector similarity search to PostgreSQL"]})
    w.reply("pgvector is a PostgreSQL extension for vector similarity search. HNSW builds a "
            "layered graph; PostgreSQL answers nearest-neighbour queries through it, and "
            "pgvector exposes ef_search to trade recall for speed.")
    w.user("How should I tune ef_search for pgvector?")
    w.reply("Raise ef_search for better recall; lower ef_search for speed. PostgreSQL keeps the "
            "HNSW index in shared buffers, so give PostgreSQL enough memory.")
    w.system({"event": "disconnected"})
    return w.end()


def wait_status(stub, sid, want, timeout=30.0):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            last = stub.GetSummary(SM.GetSummaryRequest(session_id=sid), timeout=5)
            if last.status == want:
                return last
        except grpc.RpcError as e:
            last = e
        time.sleep(0.1)
    raise AssertionError(f"{sid}: summary status {last} is not {want} after {timeout}s")


def saved_lines(svc, sid=None):
    return [l for l in svc.log_lines() if l.get("message", "").startswith("summary saved")
            and (sid is None or l.get("session_id") == sid)]


def rss_kb(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


# ---- the tests --------------------------------------------------------------

def test_contract_errors(store, llm, sstub):
    with start_summary(store, llm.addr) as svc:
        st = summary_stub(svc)
        with pytest.raises(grpc.RpcError) as e:
            st.GetSummary(SM.GetSummaryRequest(session_id=new_id("nobody")), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        for bad in ("", "has space", "x" * 129):
            for call in (lambda: st.GetSummary(SM.GetSummaryRequest(session_id=bad), timeout=10),
                         lambda: st.Summarize(SM.SummarizeRequest(session_id=bad), timeout=10)):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # Unknown session, waiting: NOT_FOUND; without waiting: PENDING at once.
        with pytest.raises(grpc.RpcError) as e:
            st.Summarize(SM.SummarizeRequest(session_id=new_id("nobody"), wait=True), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert st.Summarize(SM.SummarizeRequest(session_id=new_id("nobody")),
                            timeout=10).status == PENDING
        # A live session is not summarized.
        sid = new_id("live")
        w = Writer(sstub, sid)
        w.user("still talking")
        w.flush()
        with pytest.raises(grpc.RpcError) as e:
            st.Summarize(SM.SummarizeRequest(session_id=sid, wait=True), timeout=10)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        got = st.GetSummary(SM.GetSummaryRequest(session_id=sid), timeout=10)
        assert got.status == C.SUMMARY_STATUS_NONE and got.attempts == 0
        # A session without any conversation: a summary saying so, no model call.
        sid = new_id("empty")
        w = Writer(sstub, sid)
        w.system({"event": "connected"})
        w.end()
        r = st.Summarize(SM.SummarizeRequest(session_id=sid, wait=True), timeout=20)
        assert r.status == DONE and "without any conversation" in r.summary
        stop_clean(svc)


def test_summary_content(store, llm, model, sstub):
    """The summary names the user's topics and facts from the assistant's
    replies (reassembled from tokens), in the seed's four parts, and is
    saved with the session."""
    sid = new_id("content")
    ended = pgvector_session(sstub, sid)
    with start_summary(store, llm.addr) as svc:
        st = summary_stub(svc)
        before = model_requests(model)
        r = st.Summarize(SM.SummarizeRequest(session_id=sid, wait=True), timeout=30)
        assert r.status == DONE, r
        assert model_requests(model) - before == 1
        text = r.summary.lower()
        for heading in ("overview:", "key topics:", "notable intent shifts or patterns:",
                        "insights or conclusions:"):
            assert heading in text, r.summary
        assert "pgvector" in text  # the user's topic
        assert "postgresql" in text  # a fact only the assistant's replies carry
        assert "hnsw" in text or "ef_search" in text
        got = st.GetSummary(SM.GetSummaryRequest(session_id=sid), timeout=10)
        assert (got.status, got.summary, got.attempts, got.session_id) == (DONE, r.summary, 1, sid)
        s = sstub.GetSession(S.GetSessionRequest(session_id=sid), timeout=10).session
        assert s.final_summary == r.summary and s.end_time_us == ended.end_time_us
        assert s.duration_seconds == ended.duration_seconds
        # Asked again: the saved summary, no second model call.
        r2 = st.Summarize(SM.SummarizeRequest(session_id=sid, wait=True), timeout=30)
        assert (r2.status, r2.summary) == (DONE, r.summary)
        assert model_requests(model) - before == 1
        stop_clean(svc)


def test_concurrent_summarize_one_model_call(store, llm, model, sstub):
    """Two concurrent Summarize calls in one process join: one model call.
    The model is slowed ([[fault:slow]]) so the second call arrives while
    the first is in progress."""
    sid = new_id("twice")
    pgvector_session(sstub, sid, extra_user=" [[fault:slow]]")
    with start_summary(store, llm.addr) as svc:
        st = summary_stub(svc)
        before = model_requests(model)
        results = []

        def ask():
            results.append(st.Summarize(SM.SummarizeRequest(session_id=sid, wait=True),
                                        timeout=30))

        threads = [threading.Thread(target=ask) for _ in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.2)
        # A caller that does not wait is answered at once, also without a call.
        t0 = time.monotonic()
        assert st.Summarize(SM.SummarizeRequest(session_id=sid), timeout=10).status == PENDING
        assert time.monotonic() - t0 < 1.0
        for t in threads:
            t.join()
        assert [r.status for r in results] == [DONE] * 3
        assert len({r.summary for r in results}) == 1
        assert model_requests(model) - before == 1
        assert len(saved_lines(svc, sid)) == 1
        assert st.GetSummary(SM.GetSummaryRequest(session_id=sid), timeout=10).attempts == 1
        stop_clean(svc)


def test_two_replicas_same_session_one_model_call(store, llm, model, sstub):
    """Summarize sent to two replicas at once: the store's lease lets one
    work; the other waits for its outcome."""
    sid = new_id("replicas")
    pgvector_session(sstub, sid, extra_user=" [[fault:slow]]")
    with start_summary(store, llm.addr) as a, start_summary(store, llm.addr) as b:
        before = model_requests(model)
        results = {}

        def ask(name, svc):
            results[name] = summary_stub(svc).Summarize(
                SM.SummarizeRequest(session_id=sid, wait=True), timeout=30)

        threads = [threading.Thread(target=ask, args=(n, s)) for n, s in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results["a"].status == DONE and results["b"].status == DONE
        assert results["a"].summary == results["b"].summary
        assert model_requests(model) - before == 1
        assert len(saved_lines(a, sid)) + len(saved_lines(b, sid)) == 1
        # The metrics of both replicas tell the same story: one attempt, one
        # model call, the other replica found the lease taken.
        both = lambda name, **kw: a.metric(name, **kw) + b.metric(name, **kw)  # noqa: E731
        assert both("convo_summarizer_attempts_total") == 1
        assert both("convo_summarizer_model_calls_total") == 1
        assert both("convo_summarizer_lease_conflicts_total") >= 1
        assert both("convo_summarizer_jobs_total", outcome="done") >= 2
        assert both("convo_summarizer_sessions_in_progress") == 0
        stop_clean(a)
        stop_clean(b)


def test_waiting_caller_gets_pending_before_its_deadline(store, llm, sstub):
    sid = new_id("deadline")
    pgvector_session(sstub, sid, extra_user=" [[fault:slow]]")
    with start_summary(store, llm.addr) as svc:
        st = summary_stub(svc)
        t0 = time.monotonic()
        r = st.Summarize(SM.SummarizeRequest(session_id=sid, wait=True), timeout=1.0)
        assert r.status == PENDING and time.monotonic() - t0 < 1.0
        # The work goes on without the caller.
        assert wait_status(st, sid, DONE, timeout=20).attempts == 1
        stop_clean(svc)


def test_llm_down_then_back(store, model, sstub):
    """llm-svc is down when the session ends: the attempt fails and is
    saved pending with the reason; the sweep does not spend attempts while
    llm-svc stays down, and summarizes the session once it is back."""
    llm = start_llm(model, store)
    port = llm.port
    llm.stop()
    sid = new_id("llmdown")
    # The sweep leaves sessions alone for a second after their end: the
    # gateway's own call goes first.
    with start_summary(store, f"127.0.0.1:{port}", "--max-attempts", "5", sweep_ms=300,
                       sweep_delay_ms=1000) as svc:
        st = summary_stub(svc)
        pgvector_session(sstub, sid)
        # The gateway's fire-and-forget call.
        assert st.Summarize(SM.SummarizeRequest(session_id=sid), timeout=10).status == PENDING
        end = time.monotonic() + 20
        while True:
            got = st.GetSummary(SM.GetSummaryRequest(session_id=sid), timeout=5)
            if got.attempts >= 1 and got.error:
                break
            assert time.monotonic() < end, got
            time.sleep(0.1)
        assert got.status == PENDING and "llm-svc" in got.error and "UNAVAILABLE" in got.error
        # Several sweeps pass while llm-svc is down: no attempt is spent.
        time.sleep(2.0)
        got = st.GetSummary(SM.GetSummaryRequest(session_id=sid), timeout=5)
        assert (got.status, got.attempts) == (PENDING, 1), got
        llm.start()
        try:
            done = wait_status(st, sid, DONE, timeout=60)
            assert done.attempts == 2 and "pgvector" in done.summary.lower()
            assert done.error == ""
        finally:
            llm.stop()
        stop_clean(svc)


def test_attempts_exhausted_marks_failed(store, model, sstub):
    """Every attempt fails (the model answers 500): after --max-attempts the
    summary is FAILED with the reason, and no more attempts are made."""
    sid = new_id("fails")
    w = Writer(sstub, sid)
    w.user("please fail [[fault:500]]")
    w.reply("ok")
    w.end()
    with start_llm(model, store) as llm, \
            start_summary(store, llm.addr, "--max-attempts", "2", sweep_ms=200) as svc:
        st = summary_stub(svc)
        r = st.Summarize(SM.SummarizeRequest(session_id=sid, wait=True), timeout=30)
        assert r.status == PENDING and r.error, r
        failed = wait_status(st, sid, FAILED, timeout=30)
        assert failed.attempts == 2
        assert "gave up after 2 attempts" in failed.error and "llm-svc Complete" in failed.error
        r = st.Summarize(SM.SummarizeRequest(session_id=sid, wait=True), timeout=10)
        assert r.status == FAILED and r.error == failed.error
        time.sleep(1.0)
        assert st.GetSummary(SM.GetSummaryRequest(session_id=sid), timeout=5).attempts == 2
        stop_clean(svc)


def test_two_replicas_sweep_backlog_once(store, llm, model, sstub):
    """Sessions that ended with nobody asking (the gateway died): two
    replicas sweeping the same backlog summarize each exactly once."""
    pending = sstub.ListUnsummarizedSessions(S.ListUnsummarizedSessionsRequest(limit=1000),
                                             timeout=10).sessions
    # Earlier tests left nothing pending: every model call below is for
    # these sessions.
    assert [s.session_id for s in pending] == []
    sids = [new_id("backlog") for _ in range(12)]
    for i, sid in enumerate(sids):
        w = Writer(sstub, sid)
        w.user(f"Backlog question {i} about replication lag and vacuum tuning?")
        w.reply(f"Answer {i}: tune autovacuum and watch replication lag on the replica.")
        w.end()
    before = model_requests(model)
    with start_summary(store, llm.addr, sweep_ms=200) as a, \
            start_summary(store, llm.addr, sweep_ms=200) as b:
        st = summary_stub(a)
        for sid in sids:
            got = wait_status(st, sid, DONE, timeout=60)
            assert got.attempts == 1, (sid, got)
        for sid in sids:
            assert len(saved_lines(a, sid)) + len(saved_lines(b, sid)) == 1, sid
        assert model_requests(model) - before == len(sids)
        stop_clean(a)
        stop_clean(b)


def long_session(stub, sid, n_events):
    """A long conversation of n_events events (a multiple of 40)."""
    w = Writer(stub, sid)
    topics = ["kubernetes", "postgres", "grpc", "websockets", "latency"]
    # Tokens of about 1 kB: 20,000 events are some 19 MB of text, so a
    # process holding them whole would show in its resident memory.
    filler = "lorem ipsum dolor " * 56
    for turn in range(n_events // 40):
        topic = topics[turn % len(topics)]
        w.user(f"Turn {turn}: question about {topic} performance and scaling?")
        if turn % 25 == 0:
            w.tool(f"call_{turn}", "fetch_internal_knowledge", {"topic": topic},
                   {"passages": [f"{topic} notes " + "x" * 200]})
        for k in range(38 - (2 if turn % 25 == 0 else 0)):
            w.add(S.EVENT_TYPE_AI_TOKEN, f"{topic}{k} " + filler)
        w.system({"event": "turn_done"})
    ended = w.end()
    assert ended.event_count == n_events
    return ended


def test_long_session_in_chunks_bounded_memory(store, llm, model, sstub):
    """20,000 events: read as a stream with backpressure, summarized in
    chunks within the context budget and combined; summary-svc's resident
    memory does not grow with the session."""
    small, big = new_id("warmup"), new_id("long")
    long_session(sstub, small, 2000)
    long_session(sstub, big, 20000)
    # A small ASan quarantine: freed memory it keeps is not memory held.
    with start_summary(store, llm.addr, "--context-budget-bytes", "65536", "--page-events", "1000",
                       env={"ASAN_OPTIONS": "quarantine_size_mb=1:detect_leaks=1"}) as svc:
        st = summary_stub(svc)
        # A first, smaller session warms up what any summary uses (threads,
        # allocator arenas, channels): the peak after it is the baseline.
        assert st.Summarize(SM.SummarizeRequest(session_id=small, wait=True),
                            timeout=120).status == DONE
        base = rss_kb(svc.pid, "VmHWM")
        before = model_requests(model)
        r = st.Summarize(SM.SummarizeRequest(session_id=big, wait=True), timeout=300)
        assert r.status == DONE, r
        calls = model_requests(model) - before
        [saved] = saved_lines(svc, big)
        m = re.search(r"(\d+) events .* in (\d+) chunks, (\d+) model calls", saved["message"])
        assert m, saved
        events, chunks, ncalls = map(int, m.groups())
        assert events == 20000
        # Some 19 MB in chunks of 64 kB, then their summaries combined.
        assert chunks >= 250 and ncalls == calls and calls > chunks
        # (What the offline model makes of partial summaries is word counts
        # of them; test_summary_content checks content.)
        assert "Overview:" in r.summary and "Insights or conclusions:" in r.summary
        # Loose (allocator and sanitizer overheads vary), but far under the
        # 19 MB the session weighs.
        peak = rss_kb(svc.pid, "VmHWM")
        print(f"summary-svc peak RSS {base} kB after the warm-up, {peak} kB after 20,000 "
              f"events; {chunks} chunks, {calls} model calls")
        assert peak - base < 8 * 1024, (base, peak)
        stop_clean(svc)


def test_shutdown_mid_summary_releases_the_lease(store, llm, model, sstub):
    """SIGTERM while a long summary is in progress (a model call in flight,
    the event stream paused behind it): the process exits at once and
    cleanly, and the session is released PENDING with the reason, so another
    replica takes it over without waiting for the lease to run out."""
    sid = new_id("shutdown")
    w = Writer(sstub, sid)
    for turn in range(50):
        w.user(f"Turn {turn} about sharding [[fault:slow]]")
        w.reply("Shard by tenant id and keep hot tenants apart. " * 20)
    w.end()
    svc = start_summary(store, llm.addr, "--context-budget-bytes", "2048", "--page-events", "1000")
    st = summary_stub(svc)
    assert st.Summarize(SM.SummarizeRequest(session_id=sid), timeout=10).status == PENDING
    svc.wait_for_log(lambda l: l.get("message", "").startswith("claimed the summary"), timeout=10)
    time.sleep(0.5)  # the first model call is under way (2.5 s slow)
    t0 = time.monotonic()
    stop_clean(svc)
    assert time.monotonic() - t0 < 5.0
    got = sstub.GetSession(S.GetSessionRequest(session_id=sid), timeout=10).session
    assert got.summary_status == PENDING and got.summary_attempts == 1
    assert "interrupted" in got.summary_error, got.summary_error
    # Another replica takes over at once (the lease is 60 s).
    with start_summary(store, llm.addr, "--context-budget-bytes", "65536") as other:
        r = summary_stub(other).Summarize(SM.SummarizeRequest(session_id=sid, wait=True),
                                          timeout=30)
        assert r.status == DONE and "shard" in r.summary.lower()
        assert summary_stub(other).GetSummary(SM.GetSummaryRequest(session_id=sid),
                                              timeout=5).attempts == 2
        stop_clean(other)


def crash_mid_summary(store, llm, sstub, sid, max_attempts):
    """Starts summarizing sid (slowed) in a replica that is then killed
    outright: its lease stays until it runs out (5 s)."""
    w = Writer(sstub, sid)
    w.user("How do leases work [[fault:slow]]")
    w.reply("A lease expires unless it is renewed.")
    w.end()
    svc = start_summary(store, llm.addr, "--lease-seconds", "5", "--max-attempts",
                        str(max_attempts))
    assert summary_stub(svc).Summarize(SM.SummarizeRequest(session_id=sid),
                                       timeout=10).status == PENDING
    svc.wait_for_log(lambda l: l.get("message", "").startswith("claimed the summary"), timeout=10)
    svc.kill()
    got = sstub.GetSession(S.GetSessionRequest(session_id=sid), timeout=10).session
    assert (got.summary_status, got.summary_attempts) == (PENDING, 1)


def test_crashed_replica_is_taken_over_after_its_lease(store, llm, sstub):
    """A replica dies mid-summary: another one's sweep takes the session
    once the lease ran out, as a new attempt; with no attempt left, the
    sweep marks it failed instead."""
    retry, last = new_id("crash"), new_id("crashlast")
    crash_mid_summary(store, llm, sstub, retry, max_attempts=3)
    t0 = time.monotonic()
    with start_summary(store, llm.addr, "--lease-seconds", "5", "--max-attempts", "3",
                       sweep_ms=200) as svc:
        done = wait_status(summary_stub(svc), retry, DONE, timeout=30)
        assert done.attempts == 2
        assert time.monotonic() - t0 > 2.0  # not before the lease ran out
        stop_clean(svc)
    crash_mid_summary(store, llm, sstub, last, max_attempts=1)
    with start_summary(store, llm.addr, "--lease-seconds", "5", "--max-attempts", "1",
                       sweep_ms=200) as svc:
        failed = wait_status(summary_stub(svc), last, FAILED, timeout=30)
        assert failed.attempts == 1 and "gave up after 1 attempt;" in failed.error
        assert "did not finish" in failed.error
        stop_clean(svc)


def test_full_queue(store, llm, sstub):
    """One worker, one queue slot: a third session waiting is refused
    RESOURCE_EXHAUSTED; without waiting it is answered PENDING and left to
    the sweep (which summarizes it later)."""
    sids = [new_id("queue") for _ in range(4)]
    for sid in sids:
        w = Writer(sstub, sid)
        w.user("Queue me [[fault:slow]]")
        w.reply("Queued.")
        w.end()
    with start_summary(store, llm.addr, "--workers", "1", "--queue-size", "1", sweep_ms=500,
                       sweep_delay_ms=0) as svc:
        st = summary_stub(svc)
        # (The sweep may take a session first; then that one is the worker's.)
        assert st.Summarize(SM.SummarizeRequest(session_id=sids[0]), timeout=10).status == PENDING
        assert st.Summarize(SM.SummarizeRequest(session_id=sids[1]), timeout=10).status == PENDING
        with pytest.raises(grpc.RpcError) as e:
            st.Summarize(SM.SummarizeRequest(session_id=sids[2], wait=True), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert st.Summarize(SM.SummarizeRequest(session_id=sids[3]), timeout=10).status == PENDING
        assert any("job queue full" in l.get("message", "") for l in svc.log_lines())
        for sid in sids:
            assert wait_status(st, sid, DONE, timeout=60).attempts == 1
        stop_clean(svc)


def test_backlog_and_outcomes_in_metrics(store, llm, sstub):
    """Sessions whose summary keeps failing wait for their retry in the
    store: the sweep's backlog gauge shows them, the jobs counter shows the
    failed attempts; no session id is ever a label value."""
    sids = [new_id("backlog-metric") for _ in range(3)]
    for sid in sids:
        w = Writer(sstub, sid)
        w.user("summarize me [[fault:401]]")  # the model refuses every Complete
        w.reply("ok")
        w.end()
    try:
        with start_summary(store, llm.addr, "--retry-backoff-ms", "600000", sweep_ms=200) as svc:
            end = time.monotonic() + 30
            while time.monotonic() < end and (
                    svc.metric("convo_summarizer_jobs_total", outcome="retry") < 3
                    or svc.metric("convo_summarizer_backlog_sessions") != 3):
                time.sleep(0.1)
            assert svc.metric("convo_summarizer_jobs_total", outcome="retry") == 3
            assert svc.metric("convo_summarizer_backlog_sessions") == 3
            assert svc.metric("convo_summarizer_attempts_total") == 3
            assert svc.metric("convo_summarizer_model_calls_total") == 3
            assert svc.metric("convo_summarizer_jobs_total", outcome="done") == 0
            assert svc.metric("convo_grpc_client_handled_total", grpc_method="Complete",
                              grpc_code="UNAUTHENTICATED") == 3
            text = svc.scrape()
            assert not any(sid in text for sid in sids)
            r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                               text=True)
            assert r.returncode == 0, r.stdout + r.stderr
            stop_clean(svc)
    finally:
        # Nothing left pending for the tests after this one.
        # SaveSummary takes the lease's holder: claim each to give up (its
        # one attempt made), then record it failed.
        for sid in sids:
            claim = sstub.ClaimSummary(S.ClaimSummaryRequest(
                session_id=sid, worker_id="test-cleanup", lease_seconds=30, max_attempts=1,
                give_up=True), timeout=10)
            assert claim.claimed, claim
            sstub.SaveSummary(S.SaveSummaryRequest(session_id=sid, status=FAILED, error="test",
                                                   worker_id="test-cleanup"), timeout=10)
