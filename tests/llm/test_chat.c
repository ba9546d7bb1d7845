/* chat: the Chat method (chat.c over turn.c) served for real, its model a
 * scripted endpoint (modelsrv.h) and its tools the test's own plus the real
 * lookup_contextual_data against an in-process store-svc: the request body
 * the model is sent (system prompt, history, params, tools), the tool loop
 * (a call, its result sent back, the next round; parallel calls answered
 * inline and from another thread; the round limit; failing, unknown and
 * badly called tools), the context tool bound to the caller's session, a
 * cancel mid-stream and a cancel while a tool runs (the upstream connection
 * closed, the call counted cancelled, nothing used after free or leaked:
 * ASan). */
#include "llmrig.h"
#include "modelsrv.h"

#include "convo/v1/store.pb-c.h"
#include "convo_methods.h"
#include "mem.h"

#include <errno.h>
#include <json-c/json.h>
#include <string.h>
#include <time.h>

#define WAIT_S       10
#define TOOL_TIMEOUT 5000
#define ECHO_SCHEMA                                                                                \
    "{\"type\":\"object\",\"properties\":{\"q\":{\"type\":\"string\"}},\"required\":[\"q\"],"      \
    "\"additionalProperties\":false}"
#define OBJECT_SCHEMA "{\"type\":\"object\"}"

/* ---- the test's tools ------------------------------------------------------ */

/* What the tools saw, and the one "later" call waiting for the test. */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int echo_runs;
    char echo_session[64], echo_user[64];
    int later_waiting;
    tool_done_fn later_done;
    void *later_arg;
} seen = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

/* Answers {"echo": q} on the calling thread (Chat starts tools without its
 * lock: a tool that answers at once must not deadlock). */
static void echo_run(void *state, const tool_ctx *ctx, json_object *args, tool_done_fn done,
                     void *arg)
{
    (void)state;
    pthread_mutex_lock(&seen.mu);
    seen.echo_runs++;
    snprintf(seen.echo_session, sizeof seen.echo_session, "%s", ctx->session_id);
    snprintf(seen.echo_user, sizeof seen.echo_user, "%s", ctx->user_id);
    pthread_mutex_unlock(&seen.mu);
    json_object *q = json_object_object_get(args, "q");
    done(arg, 0,
         mem_asprintf("{\"echo\":%s}", json_object_to_json_string_ext(q, JSON_C_TO_STRING_PLAIN)));
}

/* The tool's own failure. */
static void broken_run(void *state, const tool_ctx *ctx, json_object *args, tool_done_fn done,
                       void *arg)
{
    (void)state, (void)ctx, (void)args;
    done(arg, 1, tools_error_json("the disk is on fire"));
}

/* Answers when the test says so, on the test's thread. */
static void later_run(void *state, const tool_ctx *ctx, json_object *args, tool_done_fn done,
                      void *arg)
{
    (void)state, (void)ctx, (void)args;
    pthread_mutex_lock(&seen.mu);
    seen.later_waiting = 1;
    seen.later_done = done;
    seen.later_arg = arg;
    pthread_cond_broadcast(&seen.cv);
    pthread_mutex_unlock(&seen.mu);
}

/* Waits for the "later" tool to be called, then answers it from here. */
static void answer_later(const char *result)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += WAIT_S;
    pthread_mutex_lock(&seen.mu);
    while (!seen.later_waiting && pthread_cond_timedwait(&seen.cv, &seen.mu, &until) != ETIMEDOUT)
        ;
    int waiting = seen.later_waiting;
    tool_done_fn done = seen.later_done;
    void *arg = seen.later_arg;
    seen.later_waiting = 0;
    pthread_mutex_unlock(&seen.mu);
    assert_true(waiting);
    done(arg, 0, mem_strdup(result));
}

static void add_test_tools(tools *t)
{
    const tool_def defs[] = {
        {"echo", "echoes q", ECHO_SCHEMA, echo_run, NULL},
        {"broken", "always fails", OBJECT_SCHEMA, broken_run, NULL},
        {"later", "answers later", OBJECT_SCHEMA, later_run, NULL},
    };
    for (size_t i = 0; i < sizeof defs / sizeof defs[0]; i++)
        assert_int_equal(tools_add(t, &defs[i]), 0);
}

/* ---- the in-process store-svc (lookup_contextual_data's peer) ------------- */

static struct {
    pthread_mutex_t mu;
    int gets, lists;
    char get_session[64], list_user[64], list_exclude[64];
} store = {PTHREAD_MUTEX_INITIALIZER};

static void on_get_session(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__GetSessionRequest *req = (const Convo__V1__GetSessionRequest *)msg;
    pthread_mutex_lock(&store.mu);
    store.gets++;
    snprintf(store.get_session, sizeof store.get_session, "%s", req->session_id);
    pthread_mutex_unlock(&store.mu);
    Convo__V1__Session s = CONVO__V1__SESSION__INIT;
    s.session_id = req->session_id;
    s.user_id = "u1";
    s.user_message_count = 7;
    s.tool_call_count = 2;
    Convo__V1__GetSessionResponse r = CONVO__V1__GET_SESSION_RESPONSE__INIT;
    r.session = &s;
    srv_call_finish(call, RPC_OK, NULL, &r.base);
}

static void on_list_user_sessions(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__ListUserSessionsRequest *req = (const Convo__V1__ListUserSessionsRequest *)msg;
    pthread_mutex_lock(&store.mu);
    store.lists++;
    snprintf(store.list_user, sizeof store.list_user, "%s", req->user_id);
    snprintf(store.list_exclude, sizeof store.list_exclude, "%s", req->exclude_session_id);
    pthread_mutex_unlock(&store.mu);
    Convo__V1__Session p = CONVO__V1__SESSION__INIT;
    p.session_id = "s0";
    p.user_id = "u1";
    p.final_summary = "asked about refunds";
    Convo__V1__Session *ps[] = {&p};
    Convo__V1__ListUserSessionsResponse r = CONVO__V1__LIST_USER_SESSIONS_RESPONSE__INIT;
    r.n_sessions = 1;
    r.sessions = ps;
    srv_call_finish(call, RPC_OK, NULL, &r.base);
}

/* ---- helpers ----------------------------------------------------------------- */

static void start(rig *r, modelsrv *ms, const char *max_rounds)
{
    const char *args[] = {"--openai-base-url",
                          ms->base_url,
                          "--openai-model",
                          "m-default",
                          "--allowed-models",
                          "m-alt",
                          "--max-attempts",
                          "1",
                          "--max-rounds",
                          max_rounds,
                          NULL};
    rig_init(r, args);
    add_test_tools(r->tools);
    rig_start(r);
}

static char *json_text(json_object *o)
{
    return mem_strdup(json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN));
}

static json_object *field(json_object *o, const char *key)
{
    json_object *v = NULL;
    json_object_object_get_ex(o, key, &v);
    return v;
}

/* The i-th request's messages array, as JSON text. */
static char *messages_of(modelsrv *ms, size_t i)
{
    json_object *b = modelsrv_body(ms, i);
    char *s = json_text(field(b, "messages"));
    json_object_put(b);
    return s;
}

static Convo__V1__ChatRequest request(const char *message, Convo__V1__GenerationParams *p)
{
    Convo__V1__ChatRequest req = CONVO__V1__CHAT_REQUEST__INIT;
    req.session_id = "s1";
    req.user_id = "u1";
    req.message = (char *)message;
    req.params = p;
    return req;
}

/* ---- the request body ------------------------------------------------------ */

static void body_carries_prompt_history_params_and_tools(void **state)
{
    (void)state;
    modelsrv ms;
    const modelsrv_reply script[] = {
        {200, 1,
         CHUNK_ROLE CHUNK_TOKEN("Hel") CHUNK_TOKEN("lo") CHUNK_FINISH("stop") CHUNK_USAGE(11, 2, 13)
             CHUNK_DONE,
         MODELSRV_END},
    };
    modelsrv_start(&ms, script, 1);
    rig r;
    start(&r, &ms, "3");

    Convo__V1__ToolCall tc = CONVO__V1__TOOL_CALL__INIT;
    tc.id = "c1";
    tc.name = "echo";
    tc.arguments_json = "{\"q\":\"x\"}";
    Convo__V1__ToolCall *tcs[] = {&tc};
    Convo__V1__Message h[4] = {CONVO__V1__MESSAGE__INIT, CONVO__V1__MESSAGE__INIT,
                               CONVO__V1__MESSAGE__INIT, CONVO__V1__MESSAGE__INIT};
    h[0].role = CONVO__V1__ROLE__ROLE_USER;
    h[0].content = "hi";
    h[1].role = CONVO__V1__ROLE__ROLE_ASSISTANT;
    h[1].n_tool_calls = 1;
    h[1].tool_calls = tcs;
    h[2].role = CONVO__V1__ROLE__ROLE_TOOL;
    h[2].content = "{\"echo\":\"x\"}";
    h[2].tool_call_id = "c1";
    h[2].name = "echo";
    h[3].role = CONVO__V1__ROLE__ROLE_ASSISTANT;
    h[3].content = "ok";
    Convo__V1__Message *hist[] = {&h[0], &h[1], &h[2], &h[3]};
    Convo__V1__GenerationParams p = CONVO__V1__GENERATION_PARAMS__INIT;
    p.model = "m-alt";
    p.temperature = 0.5f;
    p.max_tokens = 77;
    p.tools_enabled = 1;
    Convo__V1__ChatRequest req = request("next?", &p);
    req.system_prompt = "be brief";
    req.n_history = 4;
    req.history = hist;
    rig_chat c;
    rig_chat_run(&r, &req, &c);

    assert_int_equal(c.code, RPC_OK);
    assert_string_equal(c.transcript, "token Hel\n"
                                      "token lo\n"
                                      "done stop rounds=1 upstream=primary model=m-served\n");
    assert_true(c.has_usage);
    assert_int_equal(c.usage.prompt_tokens, 11);
    assert_int_equal(c.usage.completion_tokens, 2);
    assert_int_equal(c.usage.total_tokens, 13);
    assert_int_equal(modelsrv_requests(&ms), 1);
    json_object *b = modelsrv_body(&ms, 0);
    assert_string_equal(json_object_get_string(field(b, "model")), "m-alt");
    assert_true(json_object_get_double(field(b, "temperature")) == 0.5);
    assert_int_equal(json_object_get_int(field(b, "max_tokens")), 77);
    assert_true(json_object_get_boolean(field(b, "stream")));
    assert_true(json_object_get_boolean(field(field(b, "stream_options"), "include_usage")));
    char *msgs = json_text(field(b, "messages"));
    assert_string_equal(
        msgs, "[{\"role\":\"system\",\"content\":\"be brief\"},"
              "{\"role\":\"user\",\"content\":\"hi\"},"
              "{\"role\":\"assistant\",\"content\":\"\",\"tool_calls\":[{\"id\":\"c1\",\"type\":"
              "\"function\",\"function\":{\"name\":\"echo\",\"arguments\":\"{\\\"q\\\":\\\"x\\\"}"
              "\"}}]},"
              "{\"role\":\"tool\",\"content\":\"{\\\"echo\\\":\\\"x\\\"}\",\"tool_call_id\":"
              "\"c1\",\"name\":\"echo\"},"
              "{\"role\":\"assistant\",\"content\":\"ok\"},"
              "{\"role\":\"user\",\"content\":\"next?\"}]");
    mem_free(msgs);
    /* The registered tools, each as an OpenAI function with its schema. */
    json_object *offered = field(b, "tools");
    assert_int_equal(json_object_array_length(offered), 3);
    const char *names[] = {"echo", "broken", "later"};
    for (size_t i = 0; i < 3; i++) {
        json_object *t = json_object_array_get_idx(offered, i);
        assert_string_equal(json_object_get_string(field(t, "type")), "function");
        json_object *fn = field(t, "function");
        assert_string_equal(json_object_get_string(field(fn, "name")), names[i]);
        assert_non_null(field(field(fn, "parameters"), "type"));
    }
    json_object_put(b);
    rig_stop(&r);
    modelsrv_stop(&ms);
}

static void body_without_params_or_tools(void **state)
{
    (void)state;
    modelsrv ms;
    const modelsrv_reply script[] = {
        {200, 1, CHUNK_TOKEN("yes") CHUNK_FINISH("stop") CHUNK_DONE, MODELSRV_END},
    };
    modelsrv_start(&ms, script, 1);
    rig r;
    start(&r, &ms, "3");
    Convo__V1__ChatRequest req = request("plain", NULL);
    rig_chat c;
    rig_chat_run(&r, &req, &c);
    assert_string_equal(c.transcript, "token yes\ndone stop rounds=1 upstream=primary "
                                      "model=m-served\n");
    json_object *b = modelsrv_body(&ms, 0);
    /* The default model; nothing the caller did not ask for. */
    assert_string_equal(json_object_get_string(field(b, "model")), "m-default");
    assert_null(field(b, "tools"));
    assert_null(field(b, "temperature"));
    assert_null(field(b, "max_tokens"));
    json_object_put(b);
    char *msgs = messages_of(&ms, 0);
    assert_string_equal(msgs, "[{\"role\":\"user\",\"content\":\"plain\"}]");
    mem_free(msgs);

    /* tools_enabled off: the model is offered none. */
    Convo__V1__GenerationParams p = CONVO__V1__GENERATION_PARAMS__INIT;
    p.temperature = 1.0f;
    req = request("again", &p);
    rig_chat_run(&r, &req, &c);
    assert_int_equal(modelsrv_requests(&ms), 2);
    b = modelsrv_body(&ms, 1);
    assert_null(field(b, "tools"));
    assert_null(field(b, "max_tokens")); /* 0: the model's own default */
    assert_true(json_object_get_double(field(b, "temperature")) == 1.0);
    json_object_put(b);
    rig_stop(&r);
    modelsrv_stop(&ms);
}

/* ---- the tool loop ------------------------------------------------------------ */

static void tool_loop_sends_results_back_for_the_next_round(void **state)
{
    (void)state;
    modelsrv ms;
    /* Round 1: two parallel calls, their arguments in pieces; round 2: the
     * answer. */
    const modelsrv_reply script[] = {
        {200, 1,
         CHUNK_ROLE CHUNK_TOKEN("Let me look.") CHUNK_CALL(0, "call_a", "later", "")
             CHUNK_CALL(1, "call_b", "echo", "{\\\"q\\\":") CHUNK_ARGS(1, "\\\"hey\\\"}")
                 CHUNK_FINISH("tool_calls") CHUNK_USAGE(10, 1, 11) CHUNK_DONE,
         MODELSRV_END},
        {200, 1, CHUNK_TOKEN("Found it.") CHUNK_FINISH("stop") CHUNK_USAGE(20, 2, 22) CHUNK_DONE,
         MODELSRV_END},
    };
    modelsrv_start(&ms, script, 2);
    rig r;
    start(&r, &ms, "3");
    pthread_mutex_lock(&seen.mu);
    seen.echo_runs = 0;
    pthread_mutex_unlock(&seen.mu);
    Convo__V1__GenerationParams p = CONVO__V1__GENERATION_PARAMS__INIT;
    p.tools_enabled = 1;
    Convo__V1__ChatRequest req = request("look it up", &p);
    rig_chat c;
    rig_chat_start(&r, &req, &c);
    /* echo answers inline; the round waits for "later", answered from
     * this thread after echo's result is out: its answer starts round 2. */
    rig_chat_wait_count(&c, &c.tool_results, 1);
    answer_later("{\"late\":true}");
    rig_chat_end(&c);

    assert_int_equal(c.code, RPC_OK);
    assert_string_equal(c.transcript, "token Let me look.\n"
                                      "tool_call call_a later  round=1\n"
                                      "tool_call call_b echo {\"q\":\"hey\"} round=1\n"
                                      "tool_result call_b echo error=0 {\"echo\":\"hey\"}\n"
                                      "tool_result call_a later error=0 {\"late\":true}\n"
                                      "token Found it.\n"
                                      "done stop rounds=2 upstream=primary model=m-served\n");
    assert_true(c.has_usage); /* summed over the rounds */
    assert_int_equal(c.usage.prompt_tokens, 30);
    assert_int_equal(c.usage.completion_tokens, 3);
    assert_int_equal(c.usage.total_tokens, 33);
    pthread_mutex_lock(&seen.mu);
    assert_int_equal(seen.echo_runs, 1);
    assert_string_equal(seen.echo_session, "s1"); /* bound to the call */
    assert_string_equal(seen.echo_user, "u1");
    pthread_mutex_unlock(&seen.mu);
    assert_int_equal(modelsrv_requests(&ms), 2);
    /* Round 2 is round 1's messages, the assistant's turn with its calls
     * and each result in the order of the calls (not of their answers). */
    char *first = messages_of(&ms, 0), *second = messages_of(&ms, 1);
    assert_string_equal(first, "[{\"role\":\"user\",\"content\":\"look it up\"}]");
    assert_string_equal(
        second,
        "[{\"role\":\"user\",\"content\":\"look it up\"},"
        "{\"role\":\"assistant\",\"content\":\"Let me look.\",\"tool_calls\":["
        "{\"id\":\"call_a\",\"type\":\"function\",\"function\":{\"name\":\"later\",\"arguments\":"
        "\"\"}},"
        "{\"id\":\"call_b\",\"type\":\"function\",\"function\":{\"name\":\"echo\",\"arguments\":"
        "\"{\\\"q\\\":\\\"hey\\\"}\"}}]},"
        "{\"role\":\"tool\",\"tool_call_id\":\"call_a\",\"name\":\"later\",\"content\":"
        "\"{\\\"late\\\":true}\"},"
        "{\"role\":\"tool\",\"tool_call_id\":\"call_b\",\"name\":\"echo\",\"content\":"
        "\"{\\\"echo\\\":\\\"hey\\\"}\"}]");
    mem_free(first);
    mem_free(second);
    assert_int_equal(rig_metric(&r, "convo_llm_tool_calls_total{tool=\"echo\",outcome=\"ok\"}"), 1);
    assert_int_equal(rig_metric(&r, "convo_llm_turns_total{kind=\"chat\",outcome=\"done\"}"), 1);
    rig_stop(&r);
    modelsrv_stop(&ms);
}

static void round_limit_ends_the_turn(void **state)
{
    (void)state;
    modelsrv ms;
    /* A model that asks for a tool every round. */
    const modelsrv_reply script[] = {
        {200, 1,
         CHUNK_CALL(0, "call_x", "echo", "{\\\"q\\\":\\\"more\\\"}") CHUNK_FINISH("tool_calls")
             CHUNK_DONE,
         MODELSRV_END},
    };
    modelsrv_start(&ms, script, 1);
    rig r;
    start(&r, &ms, "2");
    Convo__V1__GenerationParams p = CONVO__V1__GENERATION_PARAMS__INIT;
    p.tools_enabled = 1;
    Convo__V1__ChatRequest req = request("loop forever", &p);
    rig_chat c;
    rig_chat_run(&r, &req, &c);
    /* Round 2's call is announced, not run: the turn ends at --max-rounds. */
    assert_string_equal(c.transcript, "tool_call call_x echo {\"q\":\"more\"} round=1\n"
                                      "tool_result call_x echo error=0 {\"echo\":\"more\"}\n"
                                      "tool_call call_x echo {\"q\":\"more\"} round=2\n"
                                      "done max_rounds rounds=2 upstream=primary "
                                      "model=m-default\n");
    assert_int_equal(c.code, RPC_OK);
    assert_int_equal(modelsrv_requests(&ms), 2);
    rig_stop(&r);
    modelsrv_stop(&ms);
}

static void tool_errors_go_back_to_the_model(void **state)
{
    (void)state;
    modelsrv ms;
    const modelsrv_reply script[] = {
        {200, 1,
         CHUNK_CALL(0, "e1", "broken", "{}") CHUNK_CALL(1, "e2", "nosuch", "{}")
             CHUNK_CALL(2, "e3", "echo", "{\\\"q\\\":5}") CHUNK_CALL(3, "e4", "echo", "{\\\"q\\\":")
                 CHUNK_FINISH("tool_calls") CHUNK_DONE,
         MODELSRV_END},
        {200, 1, CHUNK_TOKEN("Sorry.") CHUNK_FINISH("stop") CHUNK_DONE, MODELSRV_END},
    };
    modelsrv_start(&ms, script, 2);
    rig r;
    start(&r, &ms, "3");
    Convo__V1__GenerationParams p = CONVO__V1__GENERATION_PARAMS__INIT;
    p.tools_enabled = 1;
    Convo__V1__ChatRequest req = request("try them", &p);
    rig_chat c;
    rig_chat_run(&r, &req, &c);
    assert_int_equal(c.code, RPC_OK);
    assert_int_equal(c.tool_calls, 4);
    assert_int_equal(c.tool_results, 4);
    assert_int_equal(c.tool_errors, 4);
    assert_non_null(strstr(c.transcript, "tool_result e1 broken error=1 {\"error\":\"the disk is "
                                         "on fire\"}\n"));
    assert_non_null(strstr(c.transcript,
                           "tool_result e2 nosuch error=1 {\"error\":\"unknown tool 'nosuch'\"}"));
    assert_non_null(strstr(c.transcript, "tool_result e3 echo error=1 {\"error\":\"echo: "));
    assert_non_null(strstr(c.transcript, "tool_result e4 echo error=1 {\"error\":\"the arguments "
                                         "of echo are not valid JSON\"}"));
    assert_non_null(strstr(c.transcript, "token Sorry.\ndone stop rounds=2"));
    /* Each error reached the model as its call's tool message. */
    json_object *b = modelsrv_body(&ms, 1);
    json_object *msgs = field(b, "messages");
    assert_int_equal(json_object_array_length(msgs), 6); /* user, assistant, 4 tool */
    const char *ids[] = {"e1", "e2", "e3", "e4"};
    for (size_t i = 0; i < 4; i++) {
        json_object *m = json_object_array_get_idx(msgs, 2 + i);
        assert_string_equal(json_object_get_string(field(m, "role")), "tool");
        assert_string_equal(json_object_get_string(field(m, "tool_call_id")), ids[i]);
        json_object *content = json_tokener_parse(json_object_get_string(field(m, "content")));
        assert_non_null(field(content, "error"));
        json_object_put(content);
    }
    json_object_put(b);
    assert_int_equal(
        rig_metric(&r, "convo_llm_tool_calls_total{tool=\"broken\",outcome=\"error\"}"), 1);
    assert_int_equal(
        rig_metric(&r, "convo_llm_tool_calls_total{tool=\"unknown\",outcome=\"error\"}"), 1);
    assert_int_equal(rig_metric(&r, "convo_llm_tool_calls_total{tool=\"echo\",outcome=\"error\"}"),
                     2);
    rig_stop(&r);
    modelsrv_stop(&ms);
}

static void context_tool_reads_only_the_callers_session(void **state)
{
    (void)state;
    fakesrv st;
    fakesrv_create(&st, "store-svc");
    const srv_method ms_store[] = {
        {&convo__v1__store__get_session__method, on_get_session, NULL, NULL, "*"},
        {&convo__v1__store__list_user_sessions__method, on_list_user_sessions, NULL, NULL, "*"},
    };
    fakesrv_add(&st, ms_store, 2);
    fakesrv_run(&st);
    modelsrv ms;
    const modelsrv_reply script[] = {
        {200, 1,
         CHUNK_CALL(0, "k1", "lookup_contextual_data", "{\\\"session_id\\\":\\\"s1\\\"}")
             CHUNK_CALL(1, "k2", "lookup_contextual_data", "{\\\"session_id\\\":\\\"s-other\\\"}")
                 CHUNK_FINISH("tool_calls") CHUNK_DONE,
         MODELSRV_END},
        {200, 1, CHUNK_TOKEN("Noted.") CHUNK_FINISH("stop") CHUNK_DONE, MODELSRV_END},
    };
    modelsrv_start(&ms, script, 2);
    rig r;
    const char *args[] = {"--openai-base-url", ms.base_url, "--max-attempts", "1", NULL};
    rig_init(&r, args);
    char err[256];
    cli_channel *ch = cli_channel_create(r.cli, st.target, NULL, 0, NULL, err, sizeof err);
    assert_non_null(ch);
    assert_int_equal(tool_context_register(r.tools, ch, TOOL_TIMEOUT), 0);
    rig_start(&r);
    Convo__V1__GenerationParams p = CONVO__V1__GENERATION_PARAMS__INIT;
    p.tools_enabled = 1;
    Convo__V1__ChatRequest req = request("what did I ask before?", &p);
    rig_chat c;
    rig_chat_run(&r, &req, &c);

    assert_int_equal(c.code, RPC_OK);
    assert_int_equal(c.tool_results, 2);
    assert_int_equal(c.tool_errors, 1);
    assert_non_null(strstr(c.transcript, "tool_result k2 lookup_contextual_data error=1 "
                                         "{\"error\":\"access denied"));
    assert_non_null(strstr(c.transcript, "token Noted.\ndone stop rounds=2"));
    /* The store was asked about the caller's session and user only. */
    pthread_mutex_lock(&store.mu);
    assert_int_equal(store.gets, 1);
    assert_int_equal(store.lists, 1);
    assert_string_equal(store.get_session, "s1");
    assert_string_equal(store.list_user, "u1");
    assert_string_equal(store.list_exclude, "s1");
    pthread_mutex_unlock(&store.mu);
    /* Its answer went to the model (the call's result, from the client's
     * thread). */
    json_object *b = modelsrv_body(&ms, 1);
    json_object *k1 = json_object_array_get_idx(field(b, "messages"), 2);
    assert_string_equal(json_object_get_string(field(k1, "tool_call_id")), "k1");
    json_object *res = json_tokener_parse(json_object_get_string(field(k1, "content")));
    json_object *cur = field(res, "current_session");
    assert_string_equal(json_object_get_string(field(cur, "session_id")), "s1");
    assert_int_equal(json_object_get_int(field(cur, "user_message_count")), 7);
    json_object *prev = json_object_array_get_idx(field(res, "previous_sessions"), 0);
    assert_string_equal(json_object_get_string(field(prev, "summary")), "asked about refunds");
    json_object_put(res);
    json_object_put(b);
    rig_stop(&r);
    modelsrv_stop(&ms);
    fakesrv_stop(&st);
}

/* ---- cancellation ---------------------------------------------------------- */

static void cancel_mid_stream_closes_the_upstream(void **state)
{
    (void)state;
    modelsrv ms;
    /* Two tokens, then the stream stays open: only a cancel ends it. */
    const modelsrv_reply script[] = {
        {200, 1, CHUNK_TOKEN("one") CHUNK_TOKEN(" two"), MODELSRV_HOLD},
    };
    modelsrv_start(&ms, script, 1);
    rig r;
    start(&r, &ms, "3");
    Convo__V1__ChatRequest req = request("talk slowly", NULL);
    rig_chat c;
    rig_chat_start(&r, &req, &c);
    rig_chat_wait_count(&c, &c.tokens, 2);
    rig_chat_cancel(&c);
    rig_chat_end(&c);
    assert_int_equal(c.code, RPC_CANCELLED);
    assert_int_equal(c.done + c.error, 0);
    /* llm-svc closed its model connection and counted the call cancelled. */
    modelsrv_wait_hold_closed(&ms);
    rig_wait_metric(&r, "convo_llm_turns_total{kind=\"chat\",outcome=\"cancelled\"}", 1);
    rig_wait_metric(
        &r, "convo_llm_upstream_requests_total{outcome=\"cancelled\",category=\"none\"}", 1);
    rig_wait_metric(&r, "convo_llm_upstream_requests_in_flight", 0);
    assert_int_equal(rig_metric(&r, "convo_llm_turns_total{kind=\"chat\",outcome=\"done\"}"), 0);
    assert_int_equal(modelsrv_requests(&ms), 1);
    rig_stop(&r);
    modelsrv_stop(&ms);
}

static void cancel_while_a_tool_runs(void **state)
{
    (void)state;
    modelsrv ms;
    const modelsrv_reply script[] = {
        {200, 1, CHUNK_CALL(0, "w1", "later", "{}") CHUNK_FINISH("tool_calls") CHUNK_DONE,
         MODELSRV_END},
        {200, 1, CHUNK_TOKEN("too late") CHUNK_FINISH("stop") CHUNK_DONE, MODELSRV_END},
    };
    modelsrv_start(&ms, script, 2);
    rig r;
    start(&r, &ms, "3");
    Convo__V1__GenerationParams p = CONVO__V1__GENERATION_PARAMS__INIT;
    p.tools_enabled = 1;
    Convo__V1__ChatRequest req = request("wait for it", &p);
    rig_chat c;
    rig_chat_start(&r, &req, &c);
    pthread_mutex_lock(&seen.mu);
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += WAIT_S;
    while (!seen.later_waiting && pthread_cond_timedwait(&seen.cv, &seen.mu, &until) != ETIMEDOUT)
        ;
    pthread_mutex_unlock(&seen.mu);
    rig_chat_cancel(&c);
    rig_chat_end(&c);
    assert_int_equal(c.code, RPC_CANCELLED);
    rig_wait_metric(&r, "convo_llm_turns_total{kind=\"chat\",outcome=\"cancelled\"}", 1);
    /* The tool answers after its call is gone: the turn (kept alive by the
     * tool's reference) takes it and starts no round. */
    answer_later("{\"late\":true}");
    rig_wait_metric(&r, "convo_llm_tool_calls_total{tool=\"later\",outcome=\"ok\"}", 1);
    assert_int_equal(modelsrv_requests(&ms), 1);
    rig_stop(&r);
    assert_int_equal(modelsrv_requests(&ms), 1);
    modelsrv_stop(&ms);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(body_carries_prompt_history_params_and_tools),
        cmocka_unit_test(body_without_params_or_tools),
        cmocka_unit_test(tool_loop_sends_results_back_for_the_next_round),
        cmocka_unit_test(round_limit_ends_the_turn),
        cmocka_unit_test(tool_errors_go_back_to_the_model),
        cmocka_unit_test(context_tool_reads_only_the_callers_session),
        cmocka_unit_test(cancel_mid_stream_closes_the_upstream),
        cmocka_unit_test(cancel_while_a_tool_runs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
