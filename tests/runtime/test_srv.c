/* srv, through a real client over TCP: unary calls and status mapping,
 * streaming in order with flow control, client streaming, the call limit,
 * health, and shutdown with calls in flight. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "collector.h"
#include "convo_methods.h"
#include "health.h"
#include "mem.h"
#include "testsvc_server.h"

static Convo__Test__EchoReply *echo(cli_channel *ch, Convo__Test__EchoRequest *req, rpc_code *code,
                                    char **message, const cli_opts *opts)
{
    ProtobufCMessage *resp = NULL;
    *code = cli_unary_sync(ch, &convo__test__test__echo__method, &req->base, opts, &resp, message);
    return (Convo__Test__EchoReply *)resp;
}

static void unary_and_status_mapping(void **state)
{
    testsvc_server t;
    srv_opts o = testsvc_default_opts();
    assert_int_equal(testsvc_server_start(&t, &o), 0);
    cli *c = cli_create(1, 0);
    cli_channel *ch = cli_channel_create(c, t.target, NULL, 0, NULL, NULL, 0);

    Convo__Test__EchoRequest req = CONVO__TEST__ECHO_REQUEST__INIT;
    req.text = "h\xc3\xa9llo";
    rpc_code code;
    char *message = NULL;
    cli_opts opts = {.timeout_ms = 5000, .request_id = "req-42"};
    Convo__Test__EchoReply *r = echo(ch, &req, &code, &message, &opts);
    assert_int_equal(code, RPC_OK);
    assert_non_null(r);
    assert_string_equal(r->text, "h\xc3\xa9llo");
    assert_string_equal(r->request_id, "req-42");
    protobuf_c_message_free_unpacked(&r->base, NULL);
    mem_free(message);

    /* Every code with its message crosses the wire unchanged. */
    for (int k = 1; k <= 16; k++) {
        req.code = k;
        req.message = "why it failed";
        r = echo(ch, &req, &code, &message, &opts);
        assert_null(r);
        if (code != (rpc_code)k)
            fail_msg("sent %d, got %d (%s)", k, code, message);
        assert_string_equal(message, "why it failed");
        mem_free(message);
    }

    /* An unregistered method. */
    ProtobufCMessage *resp = NULL;
    static const rpc_method nope = {"/convo.test.Test/Nope", RPC_UNARY,
                                    &convo__test__echo_request__descriptor,
                                    &convo__test__echo_reply__descriptor};
    code = cli_unary_sync(ch, &nope, &req.base, &opts, &resp, &message);
    assert_int_equal(code, RPC_UNIMPLEMENTED);
    mem_free(message);

    cli_destroy(&c);
    testsvc_server_stop(&t);
}

static void undecodable_request_is_invalid_argument(void **state)
{
    testsvc_server t;
    srv_opts o = testsvc_default_opts();
    assert_int_equal(testsvc_server_start(&t, &o), 0);
    cli *c = cli_create(1, 0);
    cli_channel *ch = cli_channel_create(c, t.target, NULL, 0, NULL, NULL, 0);
    /* An Item sent to Echo: its field 2 is length-delimited bytes where
     * EchoRequest has an int32, so it is not a valid EchoRequest. Our own
     * client refuses to send it (the method says what it takes)... */
    Convo__Test__Item item = CONVO__TEST__ITEM__INIT;
    uint8_t junk[3] = {1, 2, 3};
    item.payload.data = junk;
    item.payload.len = 3;
    ProtobufCMessage *resp = NULL;
    char *message = NULL;
    cli_opts opts = {.timeout_ms = 5000};
    assert_int_equal(cli_unary(ch, &convo__test__test__echo__method, &item.base, &opts,
                               collector_on_done, NULL, NULL),
                     RPC_EARG);
    /* ... so a client that claims Echo takes an Item stands for any other. */
    static const rpc_method echo_items = {"/convo.test.Test/Echo", RPC_UNARY,
                                          &convo__test__item__descriptor,
                                          &convo__test__echo_reply__descriptor};
    rpc_code code = cli_unary_sync(ch, &echo_items, &item.base, &opts, &resp, &message);
    assert_int_equal(code, RPC_INVALID_ARGUMENT);
    assert_non_null(strstr(message, "convo.test.EchoRequest"));
    mem_free(message);
    /* A unary call of a streaming method, and a stream of a unary one. */
    Convo__Test__CountRequest count = CONVO__TEST__COUNT_REQUEST__INIT;
    Convo__Test__EchoRequest echo_req = CONVO__TEST__ECHO_REQUEST__INIT;
    assert_int_equal(cli_unary(ch, &convo__test__test__count__method, &count.base, &opts,
                               collector_on_done, NULL, NULL),
                     RPC_EARG);
    assert_int_equal(cli_stream(ch, &convo__test__test__echo__method, &echo_req.base, &opts,
                                collector_on_msg, collector_on_done, NULL, NULL),
                     RPC_EARG);
    cli_destroy(&c);
    testsvc_server_stop(&t);
}

static void stream_100k_in_order(void **state)
{
    testsvc_server t;
    srv_opts o = testsvc_default_opts();
    o.max_queued_writes = 32; /* force the flow-control path often */
    assert_int_equal(testsvc_server_start(&t, &o), 0);
    cli *c = cli_create(1, 0);
    cli_channel *ch = cli_channel_create(c, t.target, NULL, 0, NULL, NULL, 0);
    collector col;
    collector_init(&col);
    Convo__Test__CountRequest req = CONVO__TEST__COUNT_REQUEST__INIT;
    req.count = 100000;
    req.payload_bytes = 16;
    cli_opts opts = {.timeout_ms = 120000};
    assert_int_equal(cli_stream(ch, &convo__test__test__count__method, &req.base, &opts,
                                collector_on_msg, collector_on_done, &col, NULL),
                     0);
    assert_true(collector_wait(&col, col.done, 120000));
    assert_int_equal(col.code, RPC_OK);
    assert_int_equal(col.received, 100000);
    assert_int_equal(col.out_of_order, 0);
    cli_destroy(&c);
    testsvc_server_stop(&t);
}

static void on_nothing(srv_call *call, const ProtobufCMessage *req)
{
    srv_call_finish(call, RPC_OK, NULL, NULL);
}

/* Methods no .proto file has, for registrations the server must refuse or
 * take. */
static const rpc_method client_stream_z = {"/x.Y/Z", RPC_CLIENT_STREAM,
                                           &convo__test__item__descriptor,
                                           &convo__test__echo_reply__descriptor};
static const rpc_method no_slash_z = {"x.Y/Z", RPC_UNARY, &convo__test__item__descriptor,
                                      &convo__test__echo_reply__descriptor};
static const rpc_method bidi_z = {"/x.Y/Bidi", RPC_BIDI_STREAM, &convo__test__item__descriptor,
                                  &convo__test__item__descriptor};
static const rpc_method callers_z = {"/x.Y/Callers", RPC_UNARY,
                                     &convo__test__echo_request__descriptor,
                                     &convo__test__echo_reply__descriptor};
static const rpc_method good_z[] = {
    {"/x.Y/Good0", RPC_UNARY, &convo__test__echo_request__descriptor,
     &convo__test__echo_reply__descriptor},
    {"/x.Y/Good1", RPC_UNARY, &convo__test__echo_request__descriptor,
     &convo__test__echo_reply__descriptor},
    {"/x.Y/Good2", RPC_UNARY, &convo__test__echo_request__descriptor,
     &convo__test__echo_reply__descriptor},
    {"/x.Y/Good3", RPC_UNARY, &convo__test__echo_request__descriptor,
     &convo__test__echo_reply__descriptor},
};

static void bad_registrations_are_refused(void **state)
{
    srv_opts o = testsvc_default_opts();
    srv *s = srv_create("t", "127.0.0.1:0", &o);
    /* Client streaming without its message and end handlers. */
    srv_method bad = {&client_stream_z, NULL, NULL, NULL, "*"};
    assert_int_equal(srv_add_method(s, &bad, NULL), RPC_EARG);
    srv_method no_slash = {&no_slash_z, on_nothing, NULL, NULL, "*"};
    assert_int_equal(srv_add_method(s, &no_slash, NULL), RPC_EARG);
    srv_method no_method = {NULL, on_nothing, NULL, NULL, "*"};
    assert_int_equal(srv_add_method(s, &no_method, NULL), RPC_EARG);
    srv_method bidi = {&bidi_z, on_nothing, NULL, NULL, "*"};
    assert_int_equal(srv_add_method(s, &bidi, NULL), RPC_EARG);
    /* Every method names its callers; a list that names nobody, or names
     * what no certificate could, is refused rather than left open. */
    const char *bad_callers[] = {NULL,       "",          "  ", "Gateway", "gateway.convo.svc",
                                 "gate_way", "gateway *x"};
    for (size_t i = 0; i < sizeof bad_callers / sizeof bad_callers[0]; i++) {
        srv_method m = {&callers_z, on_nothing, NULL, NULL, bad_callers[i]};
        assert_int_equal(srv_add_method(s, &m, NULL), RPC_EARG);
    }
    const char *good_callers[] = {"*", "gateway", " gateway  llm-svc admin ", "gateway *"};
    for (size_t i = 0; i < sizeof good_callers / sizeof good_callers[0]; i++) {
        srv_method m = {&good_z[i], on_nothing, NULL, NULL, good_callers[i]};
        assert_int_equal(srv_add_method(s, &m, NULL), 0);
    }
    srv_destroy(&s);
    assert_null(s);
}

/* A handler that answers Wrong with another message than its response. */
static const rpc_method wrong_z = {"/convo.test.Test/Wrong", RPC_UNARY,
                                   &convo__test__echo_request__descriptor,
                                   &convo__test__echo_reply__descriptor};

static void on_wrong(srv_call *call, const ProtobufCMessage *req)
{
    Convo__Test__Item item = CONVO__TEST__ITEM__INIT;
    srv_call_finish(call, RPC_OK, NULL, &item.base);
}

static void *run_server(void *arg)
{
    srv_run(arg);
    return NULL;
}

static void wrong_response_type_is_internal(void **state)
{
    srv_opts o = testsvc_default_opts();
    srv *s = srv_create("t", "127.0.0.1:0", &o);
    srv_method m = {&wrong_z, on_wrong, NULL, NULL, "*"};
    assert_int_equal(srv_add_method(s, &m, NULL), 0);
    assert_int_equal(srv_start(s), 0);
    pthread_t run;
    assert_int_equal(pthread_create(&run, NULL, run_server, s), 0);
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", srv_port(s));
    cli *c = cli_create(1, 0);
    cli_channel *ch = cli_channel_create(c, target, NULL, 0, NULL, NULL, 0);
    Convo__Test__EchoRequest req = CONVO__TEST__ECHO_REQUEST__INIT;
    ProtobufCMessage *resp = NULL;
    char *message = NULL;
    cli_opts opts = {.timeout_ms = 5000, .wait_for_ready = 1};
    assert_int_equal(cli_unary_sync(ch, &wrong_z, &req.base, &opts, &resp, &message), RPC_INTERNAL);
    assert_null(resp);
    assert_non_null(strstr(message, "wrong message type"));
    mem_free(message);
    cli_destroy(&c);
    srv_stop(s);
    pthread_join(run, NULL);
    srv_destroy(&s);
}

static void call_limit_refuses_with_resource_exhausted(void **state)
{
    testsvc_server t;
    srv_opts o = testsvc_default_opts();
    o.max_calls = 2;
    assert_int_equal(testsvc_server_start(&t, &o), 0);
    cli *c = cli_create(1, 0);
    cli_channel *ch = cli_channel_create(c, t.target, NULL, 0, NULL, NULL, 0);
    collector hang[2];
    Convo__Test__EchoRequest req = CONVO__TEST__ECHO_REQUEST__INIT;
    cli_call *calls[2];
    for (int i = 0; i < 2; i++) {
        collector_init(&hang[i]);
        assert_int_equal(cli_unary(ch, &convo__test__test__hang__method, &req.base, NULL,
                                   collector_on_done, &hang[i], &calls[i]),
                         0);
    }
    usleep(200000);
    rpc_code code;
    char *message = NULL;
    cli_opts opts = {.timeout_ms = 5000};
    Convo__Test__EchoReply *r = echo(ch, &req, &code, &message, &opts);
    assert_null(r);
    assert_int_equal(code, RPC_RESOURCE_EXHAUSTED);
    assert_non_null(strstr(message, "maximum"));
    mem_free(message);
    for (int i = 0; i < 2; i++) {
        cli_call_cancel(calls[i]);
        assert_true(collector_wait(&hang[i], hang[i].done, 5000));
        assert_int_equal(hang[i].code, RPC_CANCELLED);
        cli_call_release(&calls[i]);
    }
    /* Once they are gone there is room again. */
    assert_true(testsvc_wait_cancels(testsvc_cancels(), 100));
    usleep(100000);
    r = echo(ch, &req, &code, &message, &opts);
    assert_int_equal(code, RPC_OK);
    protobuf_c_message_free_unpacked(&r->base, NULL);
    mem_free(message);
    cli_destroy(&c);
    testsvc_server_stop(&t);
}

static int check_health(cli_channel *ch, const char *service, rpc_code *code)
{
    Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    req.service = (char *)service;
    ProtobufCMessage *resp = NULL;
    cli_opts opts = {.timeout_ms = 5000};
    *code =
        cli_unary_sync(ch, &grpc__health__v1__health__check__method, &req.base, &opts, &resp, NULL);
    int status = resp != NULL ? (int)((Grpc__Health__V1__HealthCheckResponse *)resp)->status : -1;
    if (resp != NULL)
        protobuf_c_message_free_unpacked(resp, NULL);
    return status;
}

typedef struct watch_log {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int statuses[16];
    int n;
    int done;
    rpc_code code;
} watch_log;

static int on_watch_msg(void *arg, const ProtobufCMessage *msg)
{
    watch_log *w = arg;
    pthread_mutex_lock(&w->mu);
    if (w->n < 16)
        w->statuses[w->n++] = ((const Grpc__Health__V1__HealthCheckResponse *)msg)->status;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    return 0;
}

static void on_watch_done(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp)
{
    watch_log *w = arg;
    pthread_mutex_lock(&w->mu);
    w->done = 1;
    w->code = code;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

static void health_check_and_watch(void **state)
{
    testsvc_server t;
    srv_opts o = testsvc_default_opts();
    assert_int_equal(testsvc_server_start(&t, &o), 0);
    cli *c = cli_create(1, 0);
    cli_channel *ch = cli_channel_create(c, t.target, NULL, 0, NULL, NULL, 0);
    rpc_code code;
    assert_int_equal(check_health(ch, "", &code), HEALTH_SERVING);
    assert_int_equal(check_health(ch, "convo.test.Test", &code), HEALTH_SERVING);
    assert_int_equal(check_health(ch, "no.such.Service", &code), -1);
    assert_int_equal(code, RPC_NOT_FOUND);

    watch_log wl = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};
    watch_log *w = &wl;
    Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    req.service = "convo.test.Test";
    assert_int_equal(cli_stream(ch, &grpc__health__v1__health__watch__method, &req.base, NULL,
                                on_watch_msg, on_watch_done, w, NULL),
                     0);
    assert_true(collector_wait(w, w->n >= 1, 5000));
    health_set(t.health, "convo.test.Test", HEALTH_NOT_SERVING);
    assert_true(collector_wait(w, w->n >= 2, 5000));
    health_set(t.health, "convo.test.Test", HEALTH_SERVING);
    assert_true(collector_wait(w, w->n >= 3, 5000));
    assert_int_equal(w->statuses[0], HEALTH_SERVING);
    assert_int_equal(w->statuses[1], HEALTH_NOT_SERVING);
    assert_int_equal(w->statuses[2], HEALTH_SERVING);
    assert_int_equal(check_health(ch, "convo.test.Test", &code), HEALTH_SERVING);

    /* Shutdown tells the watcher NOT_SERVING, then ends its stream. */
    srv_stop(t.s);
    assert_true(collector_wait(w, w->done, 5000));
    assert_int_equal(w->statuses[3], HEALTH_NOT_SERVING);
    assert_int_equal(w->code, RPC_UNAVAILABLE);
    cli_destroy(&c);
    testsvc_server_stop(&t);
}

/* Health is attached through the server's hooks, not built in: a server
 * without it answers health checks UNIMPLEMENTED, and one set of hooks is
 * all a server takes. */
static void health_is_attached_not_built_in(void **state)
{
    srv_opts o = testsvc_default_opts();
    srv *s = srv_create("bare", "127.0.0.1:0", &o);
    static const srv_hooks none = {0};
    assert_int_equal(srv_set_hooks(s, &none, NULL), 0);
    assert_int_equal(srv_set_hooks(s, &none, NULL), RPC_EARG);
    assert_null(health_attach(s));
    testsvc_register(s);
    assert_int_equal(srv_start(s), 0);
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", srv_port(s));
    pthread_t run;
    pthread_create(&run, NULL, run_server, s);
    cli *c = cli_create(1, 0);
    cli_channel *ch = cli_channel_create(c, target, NULL, 0, NULL, NULL, 0);
    rpc_code code;
    assert_int_equal(check_health(ch, "", &code), -1);
    assert_int_equal(code, RPC_UNIMPLEMENTED);
    Convo__Test__EchoRequest req = CONVO__TEST__ECHO_REQUEST__INIT;
    req.text = "still served";
    cli_opts opts = {.timeout_ms = 5000};
    Convo__Test__EchoReply *r = echo(ch, &req, &code, NULL, &opts);
    assert_int_equal(code, RPC_OK);
    protobuf_c_message_free_unpacked(&r->base, NULL);
    cli_destroy(&c);
    srv_stop(s);
    pthread_join(run, NULL);
    testsvc_shutdown();
    srv_destroy(&s);
}

static void shutdown_lets_calls_finish_then_cancels_the_rest(void **state)
{
    testsvc_server t;
    srv_opts o = testsvc_default_opts();
    o.shutdown_grace_ms = 500;
    assert_int_equal(testsvc_server_start(&t, &o), 0);
    cli *c = cli_create(1, 0);
    cli_channel *ch = cli_channel_create(c, t.target, NULL, 0, NULL, NULL, 0);

    /* A stream that never ends on its own. */
    collector drip;
    collector_init(&drip);
    Convo__Test__CountRequest req = CONVO__TEST__COUNT_REQUEST__INIT;
    req.interval_ms = 5;
    assert_int_equal(cli_stream(ch, &convo__test__test__drip__method, &req.base, NULL,
                                collector_on_msg, collector_on_done, &drip, NULL),
                     0);
    assert_true(collector_wait(&drip, drip.received >= 3, 5000));

    int cancels = testsvc_cancels();
    int64_t t0 = rpc_now_ms();
    srv_stop(t.s);
    pthread_join(t.run, NULL);
    int64_t took = rpc_now_ms() - t0;
    /* The stream kept flowing through the grace period, then was cut. */
    assert_true(took >= 450);
    assert_true(took < 5000);
    assert_true(collector_wait(&drip, drip.done, 5000));
    assert_int_not_equal(drip.code, RPC_OK);
    assert_int_equal(drip.out_of_order, 0);
    assert_true(drip.received >= 20);
    assert_true(testsvc_wait_cancels(cancels + 1, 2000));

    /* New calls are refused once the server is gone. */
    rpc_code code;
    char *message = NULL;
    cli_opts opts = {.timeout_ms = 1000};
    Convo__Test__EchoRequest ereq = CONVO__TEST__ECHO_REQUEST__INIT;
    Convo__Test__EchoReply *r = echo(ch, &ereq, &code, &message, &opts);
    assert_null(r);
    assert_int_equal(code, RPC_UNAVAILABLE);
    mem_free(message);

    cli_destroy(&c);
    testsvc_shutdown();
    srv_destroy(&t.s);
}

static void *stop_later(void *arg)
{
    usleep(100000);
    srv_stop(arg);
    return NULL;
}

static void shutdown_waits_for_a_short_stream(void **state)
{
    testsvc_server t;
    srv_opts o = testsvc_default_opts();
    o.shutdown_grace_ms = 10000;
    o.max_queued_writes = 4;
    assert_int_equal(testsvc_server_start(&t, &o), 0);
    cli *c = cli_create(1, 0);
    cli_channel *ch = cli_channel_create(c, t.target, NULL, 0, NULL, NULL, 0);
    /* A finite stream, read slowly (paused every 1000 items and resumed by
     * the test), still running when shutdown starts: it must complete. */
    collector col;
    collector_init(&col);
    col.pause_every = 1000;
    Convo__Test__CountRequest req = CONVO__TEST__COUNT_REQUEST__INIT;
    req.count = 5000;
    cli_call *call = NULL;
    assert_int_equal(cli_stream(ch, &convo__test__test__count__method, &req.base, NULL,
                                collector_on_msg, collector_on_done, &col, &call),
                     0);
    assert_true(collector_wait(&col, col.paused, 5000));
    pthread_t stopper;
    pthread_create(&stopper, NULL, stop_later, t.s);
    for (int round = 0; round < 10 && !col.done; round++) {
        usleep(50000);
        pthread_mutex_lock(&col.mu);
        col.paused = 0;
        pthread_mutex_unlock(&col.mu);
        cli_call_resume(call);
        collector_wait(&col, col.paused || col.done, 5000);
    }
    assert_true(collector_wait(&col, col.done, 10000));
    assert_int_equal(col.code, RPC_OK);
    assert_int_equal(col.received, 5000);
    assert_int_equal(col.out_of_order, 0);
    pthread_join(stopper, NULL);
    pthread_join(t.run, NULL);
    cli_call_release(&call);
    cli_destroy(&c);
    testsvc_shutdown();
    srv_destroy(&t.s);
}

static void bind_failure_is_reported(void **state)
{
    testsvc_server t;
    srv_opts o = testsvc_default_opts();
    assert_int_equal(testsvc_server_start(&t, &o), 0);
    srv *s = srv_create("dup", t.target, &o);
    assert_int_equal(srv_start(s), RPC_EBIND);
    srv_destroy(&s);
    testsvc_server_stop(&t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(unary_and_status_mapping),
        cmocka_unit_test(undecodable_request_is_invalid_argument),
        cmocka_unit_test(stream_100k_in_order),
        cmocka_unit_test(bad_registrations_are_refused),
        cmocka_unit_test(wrong_response_type_is_internal),
        cmocka_unit_test(call_limit_refuses_with_resource_exhausted),
        cmocka_unit_test(health_check_and_watch),
        cmocka_unit_test(health_is_attached_not_built_in),
        cmocka_unit_test(shutdown_lets_calls_finish_then_cancels_the_rest),
        cmocka_unit_test(shutdown_waits_for_a_short_stream),
        cmocka_unit_test(bind_failure_is_reported),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
