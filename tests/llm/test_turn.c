/* turn: the core Chat and Complete share (turn.c). Called directly: the
 * bounds on what a caller may ask (turn_check_bounds: each at its limit
 * passes, one past it is refused naming its flag), how an ended request is
 * told (turn_failure_of), the capped text. Served for real (llmrig.h,
 * modelsrv.h): Chat's bounds refused before the model is asked, and the
 * fallback to the next endpoint — before the first token (an error answer,
 * a refused connection, a stream cut before any text), never after a
 * token went out nor on the endpoint's own refusal (400), each tool round
 * from the primary again, and a request no circuit admits failed at once. */
#include "llmrig.h"
#include "modelsrv.h"

#include "mem.h"

#include <json-c/json.h>
#include <math.h>
#include <string.h>
#include <unistd.h>

#define ERR_BYTES 512

/* ---- bounds, called directly ------------------------------------------------ */

typedef struct bounds {
    turn_opts o;
    conf_section sec;
    models *mods;
    turn_env env;
} bounds;

static void bounds_init(bounds *b)
{
    memset(b, 0, sizeof *b);
    char *argv[] = {"llm-svc", "--max-system-prompt-bytes",
                    "10",      "--max-history-messages",
                    "3",       "--max-history-bytes",
                    "20",      "--max-output-tokens",
                    "50",      NULL};
    b->sec = CONF_SECTION(turn_opts, &b->o);
    assert_int_equal(conf_parse(9, argv, "llm-svc", "tests", &b->sec, 1), 0);
    char err[ERR_BYTES];
    assert_int_equal(models_create("m-default", "m-alt", NULL, &b->mods, err, sizeof err), 0);
    turn_env_init(&b->env, "chat", &b->o, NULL, NULL, b->mods, NULL);
}

static void bounds_free(bounds *b)
{
    turn_env_destroy(&b->env);
    models_destroy(&b->mods);
    conf_free(&b->sec, 1);
}

/* turn_check_bounds' verdict: "" when it passes, else its reason. */
static const char *check(bounds *b, const char *system_prompt, Convo__V1__Message **hist, size_t n,
                         const Convo__V1__GenerationParams *p)
{
    static char err[ERR_BYTES];
    err[0] = '\0';
    int rc = turn_check_bounds(&b->env, system_prompt, hist, n, "history", p, err, sizeof err);
    assert_int_equal(rc, err[0] != '\0' ? -1 : 0);
    return err;
}

static void bounds_refuse_one_past_each_limit(void **state)
{
    (void)state;
    bounds b;
    bounds_init(&b);
    Convo__V1__GenerationParams p = CONVO__V1__GENERATION_PARAMS__INIT;

    assert_string_equal(check(&b, NULL, NULL, 0, NULL), "");
    assert_string_equal(check(&b, "0123456789", NULL, 0, &p), "");
    assert_string_equal(check(&b, "0123456789A", NULL, 0, &p),
                        "system_prompt is over 10 bytes (--max-system-prompt-bytes)");

    Convo__V1__Message m = CONVO__V1__MESSAGE__INIT;
    m.content = "hi";
    Convo__V1__Message *four[] = {&m, &m, &m, &m};
    assert_string_equal(check(&b, NULL, four, 3, &p), "");
    assert_string_equal(check(&b, NULL, four, 4, &p),
                        "history has 4 messages, over the limit of 3 (--max-history-messages)");

    /* Every part of a message counts: content, tool_call_id and name, and
     * each tool call's id, name and arguments. 10 + 5 + 3 + 1 + 1 = 20. */
    Convo__V1__ToolCall tc = CONVO__V1__TOOL_CALL__INIT;
    tc.id = "k";
    tc.name = "n";
    Convo__V1__ToolCall *tcs[] = {&tc};
    Convo__V1__Message big = CONVO__V1__MESSAGE__INIT;
    big.content = "0123456789";
    big.tool_call_id = "abcde";
    big.name = "xyz";
    big.n_tool_calls = 1;
    big.tool_calls = tcs;
    Convo__V1__Message *one[] = {&big};
    assert_string_equal(check(&b, NULL, one, 1, &p), "");
    tc.arguments_json = "x";
    assert_string_equal(check(&b, NULL, one, 1, &p),
                        "history holds 21 bytes, over the limit of 20 (--max-history-bytes)");
    /* Counted over all the messages. */
    tc.arguments_json = NULL;
    Convo__V1__Message *two[] = {&big, &m};
    assert_string_equal(check(&b, NULL, two, 2, &p),
                        "history holds 22 bytes, over the limit of 20 (--max-history-bytes)");

    p.max_tokens = 50;
    assert_string_equal(check(&b, NULL, NULL, 0, &p), "");
    p.max_tokens = 51;
    assert_string_equal(check(&b, NULL, NULL, 0, &p),
                        "params.max_tokens 51 is over the limit of 50 (--max-output-tokens)");
    p.max_tokens = 0;

    const float temperatures_ok[] = {0.0f, 1.0f, 2.0f};
    for (size_t i = 0; i < 3; i++) {
        p.temperature = temperatures_ok[i];
        assert_string_equal(check(&b, NULL, NULL, 0, &p), "");
    }
    p.temperature = -0.5f;
    assert_string_equal(check(&b, NULL, NULL, 0, &p), "params.temperature -0.5 is outside 0 to 2");
    p.temperature = 2.5f;
    assert_string_equal(check(&b, NULL, NULL, 0, &p), "params.temperature 2.5 is outside 0 to 2");
    p.temperature = NAN;
    assert_string_equal(check(&b, NULL, NULL, 0, &p), "params.temperature nan is outside 0 to 2");
    p.temperature = 0;

    const char *models_ok[] = {"", "m-default", "m-alt"};
    for (size_t i = 0; i < 3; i++) {
        p.model = (char *)models_ok[i];
        assert_string_equal(check(&b, NULL, NULL, 0, &p), "");
    }
    p.model = "gpt-expensive";
    assert_string_equal(check(&b, NULL, NULL, 0, &p),
                        "params.model 'gpt-expensive' is not allowed; allowed: m-default, m-alt");
    bounds_free(&b);
}

/* ---- failures and text --------------------------------------------------------- */

static void failures_map_to_categories_and_codes(void **state)
{
    (void)state;
    const struct {
        upstream_result result;
        long status;
        int delivered;
        Convo__V1__ErrorCategory category;
        rpc_code code;
        int retryable;
        const char *message;
    } cases[] = {
        {UPSTREAM_HTTP, 429, 0, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_RATE_LIMITED,
         RPC_RESOURCE_EXHAUSTED, 1, "upstream HTTP 429 after 2 attempts: the reason"},
        {UPSTREAM_HTTP, 401, 0, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_AUTH_FAILED,
         RPC_UNAUTHENTICATED, 0, "upstream HTTP 401 after 2 attempts: the reason"},
        {UPSTREAM_HTTP, 403, 0, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_AUTH_FAILED,
         RPC_UNAUTHENTICATED, 0, NULL},
        {UPSTREAM_HTTP, 404, 0, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_MODEL_NOT_FOUND,
         RPC_NOT_FOUND, 0, NULL},
        {UPSTREAM_HTTP, 422, 0, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_INVALID_REQUEST,
         RPC_INVALID_ARGUMENT, 0, NULL},
        {UPSTREAM_HTTP, 408, 0, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_UPSTREAM_UNAVAILABLE,
         RPC_UNAVAILABLE, 1, NULL},
        {UPSTREAM_HTTP, 502, 0, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_UPSTREAM_UNAVAILABLE,
         RPC_UNAVAILABLE, 1, NULL},
        {UPSTREAM_TIMEOUT, 0, 0, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_TIMEOUT,
         RPC_DEADLINE_EXCEEDED, 1, "upstream timeout: {\"error\":{\"message\":\"the reason\"}}"},
        {UPSTREAM_CONNECT, 0, 0, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_UPSTREAM_UNAVAILABLE,
         RPC_UNAVAILABLE, 1, "cannot reach the upstream after 2 attempts: "},
        {UPSTREAM_DROPPED, 0, 1, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_UPSTREAM_UNAVAILABLE,
         RPC_UNAVAILABLE, 1, "the upstream dropped the stream mid-answer: "},
        {UPSTREAM_DROPPED, 0, 0, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_UPSTREAM_UNAVAILABLE,
         RPC_UNAVAILABLE, 1, "the upstream dropped the connection: "},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        upstream_done_info info = {.result = cases[i].result,
                                   .status = cases[i].status,
                                   .message = "{\"error\":{\"message\":\"the reason\"}}",
                                   .attempts = 2,
                                   .delivered = cases[i].delivered};
        turn_failure f;
        memset(&f, 0xff, sizeof f);
        turn_failure_of(&info, &f);
        if (f.category != cases[i].category || f.code != cases[i].code ||
            f.retryable != cases[i].retryable ||
            (cases[i].message != NULL &&
             strncmp(f.message, cases[i].message, strlen(cases[i].message)) != 0))
            fail_msg("case %zu: category %d code %d retryable %d '%s'", i, f.category, f.code,
                     f.retryable, f.message);
    }
}

static void text_grows_up_to_its_cap(void **state)
{
    (void)state;
    turn_text t = {0};
    char piece[100];
    memset(piece, 'a', sizeof piece);
    for (int i = 0; i < 10; i++)
        assert_int_equal(turn_text_append(&t, piece, sizeof piece, 1000), 0);
    assert_int_equal(t.len, 1000);
    assert_int_equal(strlen(t.s), 1000);
    assert_int_equal(turn_text_append(&t, "b", 1, 1000), -1); /* nothing appended */
    assert_int_equal(t.len, 1000);
    assert_int_equal(t.s[999], 'a');
    assert_int_equal(t.s[1000], '\0');
    turn_text_clear(&t);
    assert_null(t.s);
    assert_int_equal(t.len, 0);
}

/* ---- served: Chat's bounds and the fallbacks --------------------------------------- */

#define STREAM(a, b) CHUNK_TOKEN(a) CHUNK_TOKEN(b) CHUNK_FINISH("stop") CHUNK_DONE

/* llm-svc on `primary` (and `backup` when not NULL), with its flags `more`. */
static void start(rig *r, const char *primary, const char *backup, const char *const *more)
{
    static char fallback[160];
    const char *args[32] = {"--openai-base-url", primary, "--openai-model",    "m-default",
                            "--max-attempts",    "1",     "--backoff-base-ms", "1"};
    size_t n = 8;
    if (backup != NULL) {
        snprintf(fallback, sizeof fallback, "url=%s,name=backup", backup);
        args[n++] = "--fallback";
        args[n++] = fallback;
    }
    for (size_t i = 0; more != NULL && more[i] != NULL; i++)
        args[n++] = more[i];
    args[n] = NULL;
    rig_init(r, args);
}

static Convo__V1__ChatRequest request(const char *message)
{
    Convo__V1__ChatRequest req = CONVO__V1__CHAT_REQUEST__INIT;
    req.session_id = "s1";
    req.user_id = "u1";
    req.message = (char *)message;
    return req;
}

static void chat_bounds_refused_before_the_model_is_asked(void **state)
{
    (void)state;
    modelsrv ms;
    const modelsrv_reply script[] = {{200, 1, STREAM("never", "said"), MODELSRV_END}};
    modelsrv_start(&ms, script, 1);
    rig r;
    const char *more[] = {"--max-chat-message-bytes",
                          "8",
                          "--max-history-messages",
                          "1",
                          "--max-system-prompt-bytes",
                          "4",
                          "--max-output-tokens",
                          "10",
                          NULL};
    start(&r, ms.base_url, NULL, more);
    rig_start(&r);
    Convo__V1__Message m = CONVO__V1__MESSAGE__INIT;
    m.role = CONVO__V1__ROLE__ROLE_USER;
    m.content = "earlier";
    Convo__V1__Message *hist[] = {&m, &m};
    Convo__V1__GenerationParams p = CONVO__V1__GENERATION_PARAMS__INIT;
    struct {
        Convo__V1__ChatRequest req;
        const char *says;
    } cases[] = {
        {request(""), "message is required"},
        {request("123456789"), "message is over 8 bytes (--max-chat-message-bytes)"},
        {request("hi"), "history has 2 messages, over the limit of 1 (--max-history-messages)"},
        {request("hi"), "system_prompt is over 4 bytes (--max-system-prompt-bytes)"},
        {request("hi"), "params.max_tokens 11 is over the limit of 10 (--max-output-tokens)"},
        {request("caf\xc3"), "message is not valid UTF-8"},
    };
    cases[2].req.n_history = 2;
    cases[2].req.history = hist;
    cases[3].req.system_prompt = "12345";
    p.max_tokens = 11;
    cases[4].req.params = &p;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        rig_chat c;
        rig_chat_run(&r, &cases[i].req, &c);
        assert_int_equal(c.code, RPC_INVALID_ARGUMENT);
        assert_string_equal(c.message, cases[i].says);
        assert_string_equal(c.transcript, "");
    }
    assert_int_equal(modelsrv_requests(&ms), 0);
    rig_stop(&r);
    modelsrv_stop(&ms);
}

static void falls_back_before_the_first_token(void **state)
{
    (void)state;
    modelsrv primary, backup;
    const modelsrv_reply down[] = {
        {503, 0, "{\"error\":{\"message\":\"overloaded\"}}", MODELSRV_END}};
    const modelsrv_reply up[] = {{200, 1, STREAM("from", " backup"), MODELSRV_END}};
    modelsrv_start(&primary, down, 1);
    modelsrv_start(&backup, up, 1);
    rig r;
    const char *more[] = {"--max-attempts", "2", NULL}; /* retried first, then passed on */
    start(&r, primary.base_url, backup.base_url, more);
    rig_start(&r);
    Convo__V1__ChatRequest req = request("hello");
    rig_chat c;
    rig_chat_run(&r, &req, &c);
    assert_string_equal(c.transcript, "token from\n"
                                      "token  backup\n"
                                      "done stop rounds=1 upstream=backup model=m-served\n");
    assert_int_equal(modelsrv_requests(&primary), 2);
    assert_int_equal(modelsrv_requests(&backup), 1);
    /* The very request the primary was sent. */
    json_object *a = modelsrv_body(&primary, 0), *b = modelsrv_body(&backup, 0);
    assert_string_equal(json_object_to_json_string(a), json_object_to_json_string(b));
    json_object_put(a);
    json_object_put(b);
    assert_int_equal(rig_metric(&r, "convo_llm_upstream_requests_total{outcome=\"http_error\","
                                    "category=\"upstream_unavailable\"}"),
                     1);
    rig_stop(&r);
    modelsrv_stop(&primary);
    modelsrv_stop(&backup);
}

static void falls_back_when_the_primary_is_unreachable(void **state)
{
    (void)state;
    char dead[64];
    int hold = modelsrv_dead_url(dead, sizeof dead);
    modelsrv backup;
    const modelsrv_reply up[] = {{200, 1, STREAM("still", " here"), MODELSRV_END}};
    modelsrv_start(&backup, up, 1);
    rig r;
    start(&r, dead, backup.base_url, NULL);
    rig_start(&r);
    Convo__V1__ChatRequest req = request("anyone?");
    rig_chat c;
    rig_chat_run(&r, &req, &c);
    assert_string_equal(c.transcript, "token still\ntoken  here\n"
                                      "done stop rounds=1 upstream=backup model=m-served\n");
    assert_int_equal(modelsrv_requests(&backup), 1);
    rig_stop(&r);
    modelsrv_stop(&backup);
    close(hold);
}

static void falls_back_when_a_stream_is_cut_before_any_text(void **state)
{
    (void)state;
    modelsrv primary, backup;
    /* Bytes reached llm-svc (a model name, the start of a tool call, half
     * an event) but nothing reached the caller: the request may still go
     * elsewhere, and none of it may stay for the next endpoint's answer. */
    const modelsrv_reply cut[] = {
        {200, 1,
         CHUNK("{\"model\":\"m-primary\",\"choices\":[{\"index\":0,\"delta\":{\"role\":"
               "\"assistant\"}}]}") CHUNK_CALL(0, "ghost", "ping", "{") "data: {\"choi",
         MODELSRV_DROP}};
    const modelsrv_reply up[] = {{200, 1, STREAM("whole", " answer"), MODELSRV_END}};
    modelsrv_start(&primary, cut, 1);
    modelsrv_start(&backup, up, 1);
    rig r;
    start(&r, primary.base_url, backup.base_url, NULL);
    rig_start(&r);
    Convo__V1__ChatRequest req = request("hello");
    rig_chat c;
    rig_chat_run(&r, &req, &c);
    assert_string_equal(c.transcript, "token whole\ntoken  answer\n"
                                      "done stop rounds=1 upstream=backup model=m-served\n");
    assert_int_equal(modelsrv_requests(&primary), 1);
    assert_int_equal(modelsrv_requests(&backup), 1);
    rig_stop(&r);
    modelsrv_stop(&primary);
    modelsrv_stop(&backup);
}

static void never_falls_back_after_a_token(void **state)
{
    (void)state;
    modelsrv primary, backup;
    const modelsrv_reply cut[] = {{200, 1, CHUNK_TOKEN("half") CHUNK_TOKEN(" an"), MODELSRV_DROP}};
    const modelsrv_reply up[] = {{200, 1, STREAM("said", " twice"), MODELSRV_END}};
    modelsrv_start(&primary, cut, 1);
    modelsrv_start(&backup, up, 1);
    rig r;
    start(&r, primary.base_url, backup.base_url, NULL);
    rig_start(&r);
    Convo__V1__ChatRequest req = request("hello");
    rig_chat c;
    rig_chat_run(&r, &req, &c);
    const char *want = "token half\ntoken  an\nerror upstream_unavailable retryable=1 "
                       "the upstream dropped the stream mid-answer: ";
    if (strncmp(c.transcript, want, strlen(want)) != 0)
        fail_msg("got:\n%s", c.transcript);
    assert_int_equal(c.tokens, 2);
    assert_int_equal(c.events_after_end, 0);
    assert_int_equal(c.code, RPC_OK); /* the failure is told as the stream's last event */
    assert_int_equal(modelsrv_requests(&backup), 0);
    assert_int_equal(rig_metric(&r, "convo_llm_turns_total{kind=\"chat\",outcome=\"error\"}"), 1);
    rig_stop(&r);
    modelsrv_stop(&primary);
    modelsrv_stop(&backup);
}

static void a_client_error_is_not_passed_on(void **state)
{
    (void)state;
    modelsrv primary, backup;
    const modelsrv_reply no[] = {
        {400, 0, "{\"error\":{\"message\":\"context too long\"}}", MODELSRV_END}};
    const modelsrv_reply up[] = {{200, 1, STREAM("not", " asked"), MODELSRV_END}};
    modelsrv_start(&primary, no, 1);
    modelsrv_start(&backup, up, 1);
    rig r;
    start(&r, primary.base_url, backup.base_url, NULL);
    rig_start(&r);
    Convo__V1__ChatRequest req = request("hello");
    rig_chat c;
    rig_chat_run(&r, &req, &c);
    assert_string_equal(c.transcript, "error invalid_request retryable=0 upstream HTTP 400 after "
                                      "1 attempt: context too long\n");
    assert_int_equal(modelsrv_requests(&backup), 0);
    rig_stop(&r);
    modelsrv_stop(&primary);
    modelsrv_stop(&backup);
}

/* An inline tool for the round test. */
static void ping_run(void *state, const tool_ctx *ctx, json_object *args, tool_done_fn done,
                     void *arg)
{
    (void)state, (void)ctx, (void)args;
    done(arg, 0, mem_strdup("{\"pong\":1}"));
}

static void each_round_starts_at_the_primary(void **state)
{
    (void)state;
    modelsrv primary, backup;
    const modelsrv_reply flaky[] = {
        {503, 0, "{\"error\":{\"message\":\"busy\"}}", MODELSRV_END},
        {200, 1, STREAM("primary", " again"), MODELSRV_END},
    };
    const modelsrv_reply calls[] = {
        {200, 1, CHUNK_CALL(0, "p1", "ping", "{}") CHUNK_FINISH("tool_calls") CHUNK_DONE,
         MODELSRV_END},
    };
    modelsrv_start(&primary, flaky, 2);
    modelsrv_start(&backup, calls, 1);
    rig r;
    start(&r, primary.base_url, backup.base_url, NULL);
    const tool_def ping = {"ping", "answers pong", "{\"type\":\"object\"}", ping_run, NULL};
    assert_int_equal(tools_add(r.tools, &ping), 0);
    rig_start(&r);
    Convo__V1__GenerationParams p = CONVO__V1__GENERATION_PARAMS__INIT;
    p.tools_enabled = 1;
    Convo__V1__ChatRequest req = request("ping it");
    req.params = &p;
    rig_chat c;
    rig_chat_run(&r, &req, &c);
    assert_string_equal(c.transcript, "tool_call p1 ping {} round=1\n"
                                      "tool_result p1 ping error=0 {\"pong\":1}\n"
                                      "token primary\ntoken  again\n"
                                      "done stop rounds=2 upstream=primary model=m-served\n");
    assert_int_equal(modelsrv_requests(&primary), 2);
    assert_int_equal(modelsrv_requests(&backup), 1);
    rig_stop(&r);
    modelsrv_stop(&primary);
    modelsrv_stop(&backup);
}

static void no_open_circuit_fails_at_once(void **state)
{
    (void)state;
    modelsrv ms;
    const modelsrv_reply down[] = {{503, 0, "{\"error\":{\"message\":\"down\"}}", MODELSRV_END}};
    modelsrv_start(&ms, down, 1);
    rig r;
    const char *more[] = {"--breaker-failures", "1", "--breaker-cooldown-ms", "60000", NULL};
    start(&r, ms.base_url, NULL, more);
    rig_start(&r);
    Convo__V1__ChatRequest req = request("hello");
    rig_chat c;
    rig_chat_run(&r, &req, &c); /* its failure opens the only circuit */
    assert_non_null(strstr(c.transcript, "error upstream_unavailable retryable=1 upstream HTTP "
                                         "503"));
    rig_chat_run(&r, &req, &c);
    const char *want = "error upstream_unavailable retryable=1 no upstream can take the request "
                       "now: primary circuit open (probed in ";
    if (strncmp(c.transcript, want, strlen(want)) != 0)
        fail_msg("got:\n%s", c.transcript);
    assert_int_equal(modelsrv_requests(&ms), 1); /* the second never reached it */
    rig_stop(&r);
    modelsrv_stop(&ms);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(bounds_refuse_one_past_each_limit),
        cmocka_unit_test(failures_map_to_categories_and_codes),
        cmocka_unit_test(text_grows_up_to_its_cap),
        cmocka_unit_test(chat_bounds_refused_before_the_model_is_asked),
        cmocka_unit_test(falls_back_before_the_first_token),
        cmocka_unit_test(falls_back_when_the_primary_is_unreachable),
        cmocka_unit_test(falls_back_when_a_stream_is_cut_before_any_text),
        cmocka_unit_test(never_falls_back_after_a_token),
        cmocka_unit_test(a_client_error_is_not_passed_on),
        cmocka_unit_test(each_round_starts_at_the_primary),
        cmocka_unit_test(no_open_circuit_fails_at_once),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
