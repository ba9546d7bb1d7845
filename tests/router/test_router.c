/* Tests of router-svc/router.c: request checks, the response, and the Route
 * method served in-process over a real gRPC connection. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "cli.h"
#include "mem.h"
#include "route.h"
#include "router.h"
#include "srv.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

static route_config *cfg;

static int setup(void **state)
{
    cfg = route_config_new();
    return 0;
}

static int teardown(void **state)
{
    route_config_free(&cfg);
    return 0;
}

static Convo__V1__RouteRequest good_request(void)
{
    Convo__V1__RouteRequest req;
    convo__v1__route_request__init(&req);
    req.session_id = "s-1";
    req.user_id = "u-1";
    req.last_user_message = "Why is the sky blue?";
    req.user_message_count = 1;
    return req;
}

/* Expects the request to be refused with exactly `want`. */
static void expect_refused(const Convo__V1__RouteRequest *req, const char *want)
{
    char err[256] = "";
    assert_int_equal(router_check_request(cfg, req, err, sizeof err), -1);
    assert_string_equal(err, want);
}

static void expect_accepted(const Convo__V1__RouteRequest *req)
{
    char err[256] = "";
    if (router_check_request(cfg, req, err, sizeof err) != 0)
        fail_msg("refused: %s", err);
}

static void test_good_request(void **state)
{
    Convo__V1__RouteRequest req = good_request();
    expect_accepted(&req);
    /* The ids are optional. */
    req.session_id = "";
    req.user_id = "";
    expect_accepted(&req);
    /* A hand-built message may hold NULL strings. */
    req.session_id = NULL;
    req.user_id = NULL;
    expect_accepted(&req);
    req.last_user_message = "\xC2\xBFPor qu\xC3\xA9? \xF0\x9F\xA4\x94"; /* ¿Por qué? 🤔 */
    expect_accepted(&req);
}

static void test_missing_message(void **state)
{
    Convo__V1__RouteRequest req = good_request();
    req.last_user_message = "";
    expect_refused(&req, "last_user_message is required");
    req.last_user_message = NULL;
    expect_refused(&req, "last_user_message is required");
}

static void test_message_size_limit(void **state)
{
    size_t saved = cfg->max_message_bytes;
    cfg->max_message_bytes = 10;
    Convo__V1__RouteRequest req = good_request();
    req.last_user_message = "0123456789";
    expect_accepted(&req);
    req.last_user_message = "0123456789a";
    expect_refused(&req, "last_user_message is 11 bytes, over the limit of 10");
    cfg->max_message_bytes = saved;
}

static void test_invalid_utf8(void **state)
{
    static const char *const bad[] = {
        "\xFF",             /* never valid */
        "caf\xE9",          /* Latin-1, not UTF-8 */
        "\xC0\xAF",         /* overlong '/' */
        "\xED\xA0\x80",     /* a surrogate */
        "\xF4\x90\x80\x80", /* beyond U+10FFFF */
        "ok \xE2\x82",      /* truncated */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        Convo__V1__RouteRequest req = good_request();
        req.last_user_message = (char *)bad[i];
        expect_refused(&req, "last_user_message is not valid UTF-8");
        req = good_request();
        req.session_id = (char *)bad[i];
        expect_refused(&req, "session_id is not valid UTF-8");
        req = good_request();
        req.user_id = (char *)bad[i];
        expect_refused(&req, "user_id is not valid UTF-8");
    }
}

static void test_id_length(void **state)
{
    char id[ROUTER_MAX_ID_BYTES + 2];
    memset(id, 'x', sizeof id - 1);
    id[sizeof id - 1] = '\0';
    Convo__V1__RouteRequest req = good_request();
    req.session_id = id;
    expect_refused(&req, "session_id is 129 bytes, over the limit of 128");
    req = good_request();
    req.user_id = id;
    expect_refused(&req, "user_id is 129 bytes, over the limit of 128");
    id[ROUTER_MAX_ID_BYTES] = '\0';
    req.user_id = id;
    req.session_id = id;
    expect_accepted(&req);
}

static void test_negative_counts(void **state)
{
    Convo__V1__RouteRequest req = good_request();
    req.user_message_count = -1;
    expect_refused(&req, "user_message_count must be >= 0, got -1");
    req = good_request();
    req.tool_call_count = INT64_MIN;
    expect_refused(&req, "tool_call_count must be >= 0, got -9223372036854775808");
    req = good_request();
    req.assistant_message_count = -3;
    expect_refused(&req, "assistant_message_count must be >= 0, got -3");
    req = good_request();
    req.user_message_count = 0;
    req.tool_call_count = INT64_MAX;
    expect_accepted(&req);
}

/* ---- Route over gRPC, in-process ---- */

typedef struct rpc_result {
    rpc_code code;
    char *message;
    Convo__V1__RouteResponse *resp;
} rpc_result;

typedef struct client_run {
    srv *server;
    int port;
    rpc_result good, bad;
} client_run;

static void call_route(cli_channel *ch, const Convo__V1__RouteRequest *req, rpc_result *out)
{
    cli_opts opts = {.timeout_ms = 10000, .request_id = "test-route", .wait_for_ready = 1};
    ProtobufCMessage *resp = NULL;
    out->code = cli_unary_sync(ch, &convo__v1__router__route__method, &req->base, &opts, &resp,
                               &out->message);
    out->resp = (Convo__V1__RouteResponse *)resp;
}

/* The client side runs on its own thread while the main thread is in
 * srv_run(), as in the service; it records results for the main thread to
 * check (cmocka's asserts belong to the test's thread). */
static void *client_main(void *arg)
{
    client_run *run = arg;
    cli *c = cli_create(1, 4 * 1024 * 1024);
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", run->port);
    cli_channel *ch = cli_channel_create(c, target, NULL, 0, NULL, NULL, 0);

    Convo__V1__RouteRequest req = good_request();
    req.last_user_message = "Can you compare these two?";
    req.user_message_count = 12;
    req.tool_call_count = 1;
    call_route(ch, &req, &run->good);

    req.user_message_count = -2;
    call_route(ch, &req, &run->bad);

    cli_destroy(&c);
    srv_stop(run->server);
    return NULL;
}

static void test_route_over_grpc(void **state)
{
    srv_opts opts = {
        .threads = 1,
        .shutdown_grace_ms = 2000,
        .drain_delay_ms = 0,
        .max_message_bytes = 4 * 1024 * 1024,
        .max_queued_writes = 16,
        .max_calls = 100,
    };
    client_run run = {0};
    run.server = srv_create("router-test", "127.0.0.1:0", &opts);
    assert_non_null(run.server);
    metrics *m = metrics_create("router-test");
    router_ctx ctx;
    router_ctx_init(&ctx, cfg, m);
    assert_int_equal(router_register(run.server, &ctx), 0);
    assert_int_equal(srv_start(run.server), 0);
    run.port = srv_port(run.server);
    assert_true(run.port > 0);

    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, client_main, &run), 0);
    srv_run(run.server);
    pthread_join(t, NULL);
    srv_destroy(&run.server);
    assert_null(run.server);

    if (run.good.code != RPC_OK)
        fail_msg("Route: %s: %s", rpc_code_name(run.good.code),
                 run.good.message ? run.good.message : "");
    Convo__V1__RouteResponse *resp = run.good.resp;
    assert_non_null(resp);
    assert_int_equal(resp->strategy, CONVO__V1__STRATEGY__STRATEGY_ANALYTICAL);
    assert_int_equal(resp->verbosity, CONVO__V1__VERBOSITY__VERBOSITY_DETAILED);
    assert_string_equal(resp->strategy_name, "analytical");
    assert_int_equal(resp->n_reasons, 2);
    assert_string_equal(resp->reasons[0], "12 user messages so far, more than 10: a long session");
    assert_string_equal(resp->reasons[1],
                        "the last user message contains the analytical word 'compare'");
    assert_string_equal(resp->system_prompt, cfg->strategies[ROUTE_ANALYTICAL].system_prompt);
    assert_non_null(resp->params);
    assert_int_equal(resp->params->max_tokens, cfg->strategies[ROUTE_ANALYTICAL].max_tokens);
    protobuf_c_message_free_unpacked(&resp->base, NULL);
    mem_free(run.good.message);

    assert_int_equal(run.bad.code, RPC_INVALID_ARGUMENT);
    assert_null(run.bad.resp);
    assert_non_null(run.bad.message);
    assert_string_equal(run.bad.message, "user_message_count must be >= 0, got -2");
    mem_free(run.bad.message);

    /* The good request was routed (and counted) as analytical; the bad one
     * was refused before any strategy was chosen. Every strategy shows. */
    char *text = metrics_render(m, NULL);
    assert_non_null(strstr(text, "\nconvo_router_routes_total{strategy=\"analytical\"} 1\n"));
    assert_non_null(strstr(text, "\nconvo_router_routes_total{strategy=\"fast_concise\"} 0\n"));
    assert_non_null(strstr(text, "\nconvo_router_routes_total{strategy=\"tool_heavy\"} 0\n"));
    assert_non_null(
        strstr(text, "\nconvo_router_routes_total{strategy=\"summarization_aware\"} 0\n"));
    mem_free(text);
    metrics_destroy(&m);
}

int main(void)
{
    srv_block_signals();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_good_request),       cmocka_unit_test(test_missing_message),
        cmocka_unit_test(test_message_size_limit), cmocka_unit_test(test_invalid_utf8),
        cmocka_unit_test(test_id_length),          cmocka_unit_test(test_negative_counts),
        cmocka_unit_test(test_route_over_grpc),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
