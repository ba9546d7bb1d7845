/* complete: the Complete method (complete.c over turn.c) served for real
 * against a scripted model endpoint (modelsrv.h): one non-streamed request
 * built from the system prompt, the messages and the params, the model's
 * single answer returned whole; the endpoint's refusals and bad answers as
 * gRPC codes; what a caller may not ask refused before the model is asked;
 * the fallback before an answer; a call whose deadline passes closes its
 * model connection. */
#include "llmrig.h"
#include "modelsrv.h"

#include "convo_methods.h"
#include "mem.h"

#include <json-c/json.h>
#include <string.h>

#define ANSWER(content)                                                                            \
    "{\"id\":\"x\",\"object\":\"chat.completion\",\"model\":\"m-served\",\"choices\":[{\"index\":" \
    "0,\"message\":{\"role\":\"assistant\",\"content\":\"" content "\"},\"finish_reason\":"        \
    "\"stop\"}],\"usage\":{\"prompt_tokens\":20,\"completion_tokens\":3,\"total_tokens\":23}}"
#define ERROR_BODY(msg)   "{\"error\":{\"message\":\"" msg "\",\"type\":\"x\"}}"
#define SHORT_DEADLINE_MS 300

static json_object *field(json_object *o, const char *key)
{
    json_object *v = NULL;
    json_object_object_get_ex(o, key, &v);
    return v;
}

static void start(rig *r, const char *base_url, const char *const *more)
{
    const char *args[32] = {"--openai-base-url",      base_url, "--openai-model",     "m-default",
                            "--max-attempts",         "1",      "--max-answer-bytes", "1024",
                            "--max-history-messages", "4"};
    size_t n = 10;
    for (size_t i = 0; more != NULL && more[i] != NULL; i++)
        args[n++] = more[i];
    args[n] = NULL;
    rig_init(r, args);
    rig_start(r);
}

/* Two messages of a conversation. */
typedef struct convo {
    Convo__V1__Message m[2];
    Convo__V1__Message *p[2];
    Convo__V1__CompleteRequest req;
} convo;

static void convo_init(convo *c)
{
    for (size_t i = 0; i < 2; i++) {
        convo__v1__message__init(&c->m[i]);
        c->p[i] = &c->m[i];
    }
    c->m[0].role = CONVO__V1__ROLE__ROLE_USER;
    c->m[0].content = "my order is late";
    c->m[1].role = CONVO__V1__ROLE__ROLE_ASSISTANT;
    c->m[1].content = "it ships today";
    convo__v1__complete_request__init(&c->req);
    c->req.n_messages = 2;
    c->req.messages = c->p;
    c->req.session_id = "s1";
}

static void answers_once_with_the_models_reply(void **state)
{
    (void)state;
    modelsrv ms;
    const modelsrv_reply script[] = {{200, 0, ANSWER("A late order, shipped."), MODELSRV_END}};
    modelsrv_start(&ms, script, 1);
    rig r;
    start(&r, ms.base_url, NULL);
    convo cv;
    convo_init(&cv);
    Convo__V1__GenerationParams p = CONVO__V1__GENERATION_PARAMS__INIT;
    p.temperature = 0.25f;
    p.max_tokens = 100;
    p.tools_enabled = 1; /* Complete offers no tools, whatever is asked */
    cv.req.params = &p;
    cv.req.system_prompt = "summarize";
    Convo__V1__CompleteResponse *resp = NULL;
    char *msg = NULL;
    assert_int_equal(rig_complete(&r, &cv.req, &resp, &msg), RPC_OK);
    assert_string_equal(resp->content, "A late order, shipped.");
    assert_string_equal(resp->finish_reason, "stop");
    assert_string_equal(resp->model, "m-served");
    assert_string_equal(resp->upstream, "primary");
    assert_non_null(resp->usage);
    assert_int_equal(resp->usage->prompt_tokens, 20);
    assert_int_equal(resp->usage->completion_tokens, 3);
    assert_int_equal(resp->usage->total_tokens, 23);
    protobuf_c_message_free_unpacked(&resp->base, NULL);
    mem_free(msg);

    assert_int_equal(modelsrv_requests(&ms), 1);
    json_object *b = modelsrv_body(&ms, 0);
    assert_string_equal(json_object_get_string(field(b, "model")), "m-default");
    assert_false(json_object_get_boolean(field(b, "stream")));
    assert_null(field(b, "stream_options"));
    assert_null(field(b, "tools"));
    assert_true(json_object_get_double(field(b, "temperature")) == 0.25);
    assert_int_equal(json_object_get_int(field(b, "max_tokens")), 100);
    assert_string_equal(
        json_object_to_json_string_ext(field(b, "messages"), JSON_C_TO_STRING_PLAIN),
        "[{\"role\":\"system\",\"content\":\"summarize\"},"
        "{\"role\":\"user\",\"content\":\"my order is late\"},"
        "{\"role\":\"assistant\",\"content\":\"it ships today\"}]");
    json_object_put(b);
    assert_int_equal(rig_metric(&r, "convo_llm_turns_total{kind=\"complete\",outcome=\"done\"}"),
                     1);
    assert_int_equal(rig_metric(&r, "convo_llm_usage_tokens_total{kind=\"prompt\"}"), 20);
    rig_stop(&r);
    modelsrv_stop(&ms);
}

static void refusals_and_bad_answers_map_to_codes(void **state)
{
    (void)state;
    modelsrv ms;
    const modelsrv_reply script[] = {
        {429, 0, ERROR_BODY("slow down"), MODELSRV_END},
        {401, 0, ERROR_BODY("bad key"), MODELSRV_END},
        {404, 0, ERROR_BODY("no such model"), MODELSRV_END},
        {400, 0, ERROR_BODY("context too long"), MODELSRV_END},
        {503, 0, ERROR_BODY("overloaded"), MODELSRV_END},
        {200, 0, "this is not JSON", MODELSRV_END},
        {200, 0, ANSWER("bad \xff byte"), MODELSRV_END},
        {200, 0,
         ANSWER("a very long answer that goes on and on ..........................."
                "..............................................................."
                "..............................................................."
                "..............................................................."
                "..............................................................."
                "..............................................................."
                "..............................................................."
                "..............................................................."
                "..............................................................."
                "..............................................................."
                "..............................................................."
                "..............................................................."
                "..............................................................."
                "..............................................................."
                "..............................................................."
                "..............................................................."
                "..............................................................."),
         MODELSRV_END},
    };
    modelsrv_start(&ms, script, 8);
    rig r;
    start(&r, ms.base_url, NULL);
    const struct {
        rpc_code code;
        const char *says;
    } want[] = {
        {RPC_RESOURCE_EXHAUSTED, "upstream HTTP 429 after 1 attempt: slow down"},
        {RPC_UNAUTHENTICATED, "upstream HTTP 401 after 1 attempt: bad key"},
        {RPC_NOT_FOUND, "upstream HTTP 404 after 1 attempt: no such model"},
        {RPC_INVALID_ARGUMENT, "upstream HTTP 400 after 1 attempt: context too long"},
        {RPC_UNAVAILABLE, "upstream HTTP 503 after 1 attempt: overloaded"},
        {RPC_UNAVAILABLE, "not valid JSON"},
        {RPC_UNAVAILABLE, "the upstream answer is not UTF-8"},
        {RPC_UNAVAILABLE, "the answer is over --max-answer-bytes"},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        convo cv;
        convo_init(&cv);
        Convo__V1__CompleteResponse *resp = NULL;
        char *msg = NULL;
        rpc_code code = rig_complete(&r, &cv.req, &resp, &msg);
        if (code != want[i].code || msg == NULL || strstr(msg, want[i].says) == NULL)
            fail_msg("answer %zu: %s '%s', wanted %s '%s'", i, rpc_code_name(code), msg ? msg : "",
                     rpc_code_name(want[i].code), want[i].says);
        assert_null(resp);
        mem_free(msg);
    }
    assert_int_equal(modelsrv_requests(&ms), 8); /* one each: no retry, no second request */
    assert_int_equal(rig_metric(&r, "convo_llm_turns_total{kind=\"complete\",outcome=\"error\"}"),
                     8);
    rig_stop(&r);
    modelsrv_stop(&ms);
}

static void refused_before_the_model_is_asked(void **state)
{
    (void)state;
    modelsrv ms;
    const modelsrv_reply script[] = {{200, 0, ANSWER("never"), MODELSRV_END}};
    modelsrv_start(&ms, script, 1);
    rig r;
    start(&r, ms.base_url, NULL);
    Convo__V1__CompleteResponse *resp = NULL;
    char *msg = NULL;

    Convo__V1__CompleteRequest empty = CONVO__V1__COMPLETE_REQUEST__INIT;
    assert_int_equal(rig_complete(&r, &empty, &resp, &msg), RPC_INVALID_ARGUMENT);
    assert_string_equal(msg, "at least one message is required");
    mem_free(msg);

    convo cv;
    convo_init(&cv);
    Convo__V1__GenerationParams p = CONVO__V1__GENERATION_PARAMS__INIT;
    p.model = "gpt-expensive";
    cv.req.params = &p;
    assert_int_equal(rig_complete(&r, &cv.req, &resp, &msg), RPC_INVALID_ARGUMENT);
    assert_string_equal(msg, "params.model 'gpt-expensive' is not allowed; allowed: m-default");
    mem_free(msg);

    /* Five messages, over --max-history-messages 4. */
    Convo__V1__Message m = CONVO__V1__MESSAGE__INIT;
    m.role = CONVO__V1__ROLE__ROLE_USER;
    m.content = "again";
    Convo__V1__Message *five[] = {&m, &m, &m, &m, &m};
    convo_init(&cv);
    cv.req.n_messages = 5;
    cv.req.messages = five;
    assert_int_equal(rig_complete(&r, &cv.req, &resp, &msg), RPC_INVALID_ARGUMENT);
    assert_string_equal(msg, "messages has 5 messages, over the limit of 4 "
                             "(--max-history-messages)");
    mem_free(msg);

    /* A history message that is not UTF-8. */
    convo_init(&cv);
    cv.m[1].content = "caf\xc3";
    assert_int_equal(rig_complete(&r, &cv.req, &resp, &msg), RPC_INVALID_ARGUMENT);
    assert_string_equal(msg, "a history message is not valid UTF-8");
    mem_free(msg);

    assert_null(resp);
    assert_int_equal(modelsrv_requests(&ms), 0);
    rig_stop(&r);
    modelsrv_stop(&ms);
}

static void falls_back_before_an_answer(void **state)
{
    (void)state;
    modelsrv primary, backup;
    /* Refused, then cut off mid-answer: neither is a reply, and what was
     * read of the cut one must not stay for the backup's. */
    const modelsrv_reply down[] = {
        {503, 0, ERROR_BODY("overloaded"), MODELSRV_END},
        {200, 0, "{\"id\":\"cut", MODELSRV_DROP},
    };
    const modelsrv_reply up[] = {{200, 0, ANSWER("from the backup"), MODELSRV_END}};
    modelsrv_start(&primary, down, 2);
    modelsrv_start(&backup, up, 1);
    char fallback[160];
    snprintf(fallback, sizeof fallback, "url=%s,model=m-backup,name=backup", backup.base_url);
    const char *more[] = {"--fallback", fallback, NULL};
    rig r;
    start(&r, primary.base_url, more);
    convo cv;
    convo_init(&cv);
    Convo__V1__CompleteResponse *resp = NULL;
    char *msg = NULL;
    assert_int_equal(rig_complete(&r, &cv.req, &resp, &msg), RPC_OK);
    assert_string_equal(resp->content, "from the backup");
    assert_string_equal(resp->upstream, "backup");
    protobuf_c_message_free_unpacked(&resp->base, NULL);
    mem_free(msg);
    assert_int_equal(modelsrv_requests(&primary), 1);
    assert_int_equal(modelsrv_requests(&backup), 1);
    /* The same request, but for the entry's own model. */
    json_object *a = modelsrv_body(&primary, 0), *b = modelsrv_body(&backup, 0);
    assert_string_equal(json_object_get_string(field(b, "model")), "m-backup");
    json_object_object_add(a, "model", json_object_new_string("m-backup"));
    assert_string_equal(json_object_to_json_string(a), json_object_to_json_string(b));
    json_object_put(a);
    json_object_put(b);

    assert_int_equal(rig_complete(&r, &cv.req, &resp, &msg), RPC_OK);
    assert_string_equal(resp->content, "from the backup");
    assert_string_equal(resp->upstream, "backup");
    protobuf_c_message_free_unpacked(&resp->base, NULL);
    mem_free(msg);
    assert_int_equal(modelsrv_requests(&primary), 2);
    assert_int_equal(modelsrv_requests(&backup), 2);
    rig_stop(&r);
    modelsrv_stop(&primary);
    modelsrv_stop(&backup);
}

static void deadline_closes_the_model_connection(void **state)
{
    (void)state;
    modelsrv ms;
    const modelsrv_reply script[] = {{200, 0, NULL, MODELSRV_HOLD}}; /* never answers */
    modelsrv_start(&ms, script, 1);
    rig r;
    start(&r, ms.base_url, NULL);
    convo cv;
    convo_init(&cv);
    cli_opts o = {.timeout_ms = SHORT_DEADLINE_MS};
    ProtobufCMessage *resp = NULL;
    char *msg = NULL;
    assert_int_equal(
        cli_unary_sync(r.ch, &convo__v1__llm__complete__method, &cv.req.base, &o, &resp, &msg),
        RPC_DEADLINE_EXCEEDED);
    mem_free(msg);
    /* llm-svc heard the call end, cancelled its request and closed the
     * connection; the call counts as cancelled. */
    modelsrv_wait_hold_closed(&ms);
    rig_wait_metric(&r, "convo_llm_turns_total{kind=\"complete\",outcome=\"cancelled\"}", 1);
    rig_wait_metric(&r, "convo_llm_upstream_requests_in_flight", 0);
    rig_stop(&r);
    modelsrv_stop(&ms);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(answers_once_with_the_models_reply),
        cmocka_unit_test(refusals_and_bad_answers_map_to_codes),
        cmocka_unit_test(refused_before_the_model_is_asked),
        cmocka_unit_test(falls_back_before_an_answer),
        cmocka_unit_test(deadline_closes_the_model_connection),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
