/* The gRPC metrics of srv and cli, over TCP: calls by method and status
 * code on both sides, durations, calls in flight, streamed messages,
 * deadlines and unknown methods as the client saw them. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "collector.h"
#include "mem.h"
#include "metrics.h"
#include "testsvc_server.h"

#define SVC "grpc_service=\"convo.test.Test\""

static metrics *server_metrics, *client_metrics;
static srv *server;
static pthread_t run_thread;
static char target[64];

static void *run_main(void *arg)
{
    srv_run(arg);
    return NULL;
}

static int setup(void **state)
{
    server_metrics = metrics_create("testsvc");
    client_metrics = metrics_create("client");
    srv_opts o = testsvc_default_opts();
    server = srv_create("testsvc", "127.0.0.1:0", &o);
    srv_set_metrics(server, server_metrics);
    testsvc_register(server);
    if (srv_start(server) != 0)
        return -1;
    snprintf(target, sizeof target, "127.0.0.1:%d", srv_port(server));
    pthread_create(&run_thread, NULL, run_main, server);
    return 0;
}

static int teardown(void **state)
{
    srv_stop(server);
    pthread_join(run_thread, NULL);
    testsvc_shutdown();
    srv_destroy(&server);
    metrics_destroy(&server_metrics);
    metrics_destroy(&client_metrics);
    return 0;
}

/* The value of the sample line that starts with `prefix` (name and
 * labels), or -1 when there is none. */
static long long sample(metrics *m, const char *prefix)
{
    char *text = metrics_render(m, NULL);
    char key[512];
    snprintf(key, sizeof key, "\n%s ", prefix);
    const char *at = strstr(text, key);
    long long v = at != NULL ? strtoll(at + strlen(key), NULL, 10) : -1;
    mem_free(text);
    return v;
}

/* A method the server does not have. */
static const rpc_method nope = {"/convo.test.Test/Nope", RPC_UNARY,
                                &convo__test__echo_request__descriptor,
                                &convo__test__echo_reply__descriptor};

static rpc_code echo(cli_channel *ch, int code, int64_t timeout_ms, const rpc_method *method)
{
    Convo__Test__EchoRequest req = CONVO__TEST__ECHO_REQUEST__INIT;
    req.text = "hi";
    req.code = code;
    cli_opts opts = {.timeout_ms = timeout_ms};
    ProtobufCMessage *resp = NULL;
    rpc_code rc = cli_unary_sync(ch, method, &req.base, &opts, &resp, NULL);
    if (resp != NULL)
        protobuf_c_message_free_unpacked(resp, NULL);
    return rc;
}

static void calls_counted_by_method_and_code(void **state)
{
    cli *c = cli_create(1, 0);
    cli_set_metrics(c, client_metrics);
    cli_channel *ch = cli_channel_create(c, target, NULL, 0, NULL, NULL, 0);
    for (int i = 0; i < 3; i++)
        assert_int_equal(echo(ch, 0, 5000, &convo__test__test__echo__method), RPC_OK);
    for (int i = 0; i < 2; i++)
        assert_int_equal(echo(ch, RPC_NOT_FOUND, 5000, &convo__test__test__echo__method),
                         RPC_NOT_FOUND);
    assert_int_equal(echo(ch, 0, 5000, &nope), RPC_UNIMPLEMENTED);

    collector col;
    collector_init(&col);
    Convo__Test__CountRequest req = CONVO__TEST__COUNT_REQUEST__INIT;
    req.count = 50;
    assert_int_equal(cli_stream(ch, &convo__test__test__count__method, &req.base, NULL,
                                collector_on_msg, collector_on_done, &col, NULL),
                     0);
    assert_true(collector_wait(&col, col.done, 5000));
    assert_int_equal(col.code, RPC_OK);

    const char *sides[] = {"server", "client"};
    metrics *regs[] = {server_metrics, client_metrics};
    char key[256];
    for (int s = 0; s < 2; s++) {
        snprintf(key, sizeof key,
                 "convo_grpc_%s_handled_total{" SVC ",grpc_method=\"Echo\",grpc_code=\"OK\"}",
                 sides[s]);
        assert_int_equal(sample(regs[s], key), 3);
        snprintf(key, sizeof key,
                 "convo_grpc_%s_handled_total{" SVC
                 ",grpc_method=\"Echo\",grpc_code=\"NOT_FOUND\"}",
                 sides[s]);
        assert_int_equal(sample(regs[s], key), 2);
        snprintf(key, sizeof key,
                 "convo_grpc_%s_handling_seconds_count{" SVC ",grpc_method=\"Echo\"}", sides[s]);
        assert_int_equal(sample(regs[s], key), 5);
        snprintf(key, sizeof key, "convo_grpc_%s_calls_in_flight{" SVC ",grpc_method=\"Echo\"}",
                 sides[s]);
        assert_int_equal(sample(regs[s], key), 0);
        snprintf(key, sizeof key,
                 "convo_grpc_%s_handled_total{" SVC ",grpc_method=\"Count\",grpc_code=\"OK\"}",
                 sides[s]);
        assert_int_equal(sample(regs[s], key), 1);
    }
    assert_int_equal(
        sample(server_metrics, "convo_grpc_server_msgs_sent_total{" SVC ",grpc_method=\"Count\"}"),
        50);
    assert_int_equal(sample(client_metrics,
                            "convo_grpc_client_msgs_received_total{" SVC ",grpc_method=\"Count\"}"),
                     50);
    /* A method the server does not have: counted under "unknown" there,
     * by its name at the caller. */
    assert_int_equal(sample(server_metrics, "convo_grpc_server_handled_total{grpc_service="
                                            "\"unknown\",grpc_method=\"unknown\",grpc_code="
                                            "\"UNIMPLEMENTED\"}"),
                     1);
    assert_int_equal(sample(client_metrics, "convo_grpc_client_handled_total{" SVC
                                            ",grpc_method=\"Nope\",grpc_code=\"UNIMPLEMENTED\"}"),
                     1);
    cli_destroy(&c);
}

/* A call in progress is in flight on both sides; one cut by its deadline
 * is DEADLINE_EXCEEDED on both, though the server's handler finished it
 * with a code of its own. */
static void in_flight_and_deadlines(void **state)
{
    cli *c = cli_create(1, 0);
    cli_set_metrics(c, client_metrics);
    cli_channel *ch = cli_channel_create(c, target, NULL, 0, NULL, NULL, 0);
    int cancels = testsvc_cancels();
    const char *server_key = "convo_grpc_server_calls_in_flight{" SVC ",grpc_method=\"Hang\"}";
    const char *client_key = "convo_grpc_client_calls_in_flight{" SVC ",grpc_method=\"Hang\"}";

    collector col;
    collector_init(&col);
    Convo__Test__EchoRequest req = CONVO__TEST__ECHO_REQUEST__INIT;
    cli_opts opts = {.timeout_ms = 1500};
    assert_int_equal(cli_unary(ch, &convo__test__test__hang__method, &req.base, &opts,
                               collector_on_done, &col, NULL),
                     0);
    int seen = 0;
    for (int i = 0; i < 100 && !seen; i++) {
        seen = sample(server_metrics, server_key) == 1;
        if (!seen)
            usleep(10000);
    }
    assert_true(seen);
    assert_int_equal(sample(client_metrics, client_key), 1);

    assert_true(collector_wait(&col, col.done, 5000));
    assert_int_equal(col.code, RPC_DEADLINE_EXCEEDED);
    assert_true(testsvc_wait_cancels(cancels + 1, 3000));
    assert_int_equal(sample(client_metrics, client_key), 0);
    assert_int_equal(sample(server_metrics, server_key), 0);
    assert_int_equal(sample(client_metrics,
                            "convo_grpc_client_handled_total{" SVC
                            ",grpc_method=\"Hang\",grpc_code=\"DEADLINE_EXCEEDED\"}"),
                     1);
    assert_int_equal(sample(server_metrics,
                            "convo_grpc_server_handled_total{" SVC
                            ",grpc_method=\"Hang\",grpc_code=\"DEADLINE_EXCEEDED\"}"),
                     1);
    cli_destroy(&c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(calls_counted_by_method_and_code),
        cmocka_unit_test(in_flight_and_deadlines),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
