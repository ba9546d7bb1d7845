/* cli against a real server over TCP: deadlines, cancellation seen by the
 * server, 1,000 calls in flight from one client thread, backpressure,
 * unreachable peers and destroying a client with calls in flight. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "collector.h"
#include "mem.h"
#include "testsvc_server.h"

static testsvc_server server;

static int setup(void **state)
{
    srv_opts o = testsvc_default_opts();
    return testsvc_server_start(&server, &o);
}

static int teardown(void **state)
{
    testsvc_server_stop(&server);
    return 0;
}

static void deadline_exceeded_and_seen_by_server(void **state)
{
    cli *c = cli_create(1, 0);
    cli_channel *ch = cli_channel_create(c, server.target, NULL, 0, NULL, NULL, 0);
    int cancels = testsvc_cancels();
    Convo__Test__EchoRequest req = CONVO__TEST__ECHO_REQUEST__INIT;
    cli_opts opts = {.timeout_ms = 200};
    ProtobufCMessage *resp = NULL;
    char *message = NULL;
    int64_t t0 = rpc_now_ms();
    rpc_code code =
        cli_unary_sync(ch, &convo__test__test__hang__method, &req.base, &opts, &resp, &message);
    int64_t took = rpc_now_ms() - t0;
    assert_int_equal(code, RPC_DEADLINE_EXCEEDED);
    assert_null(resp);
    assert_true(took >= 150 && took < 3000);
    mem_free(message);
    /* The handler was told, so it could stop its work. */
    assert_true(testsvc_wait_cancels(cancels + 1, 3000));
    cli_destroy(&c);
}

static void cancellation_seen_by_server(void **state)
{
    cli *c = cli_create(1, 0);
    cli_channel *ch = cli_channel_create(c, server.target, NULL, 0, NULL, NULL, 0);
    int cancels = testsvc_cancels();
    collector col;
    collector_init(&col);
    Convo__Test__CountRequest req = CONVO__TEST__COUNT_REQUEST__INIT;
    req.interval_ms = 5;
    cli_call *call = NULL;
    assert_int_equal(cli_stream(ch, &convo__test__test__drip__method, &req.base, NULL,
                                collector_on_msg, collector_on_done, &col, &call),
                     0);
    assert_true(collector_wait(&col, col.received >= 3, 5000));
    int64_t t0 = rpc_now_ms();
    cli_call_cancel(call);
    assert_true(collector_wait(&col, col.done, 5000));
    assert_int_equal(col.code, RPC_CANCELLED);
    assert_true(testsvc_wait_cancels(cancels + 1, 3000));
    assert_true(rpc_now_ms() - t0 < 3000);
    cli_call_release(&call);
    assert_null(call);
    cli_destroy(&c);
}

typedef struct tally {
    atomic_int ok;
    atomic_int failed;
    atomic_int done;
} tally;

static void on_tally(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp)
{
    tally *t = arg;
    if (code == RPC_OK && resp != NULL &&
        strcmp(((Convo__Test__EchoReply *)resp)->text, "released") == 0)
        atomic_fetch_add(&t->ok, 1);
    else
        atomic_fetch_add(&t->failed, 1);
    if (resp != NULL)
        protobuf_c_message_free_unpacked(resp, NULL);
    atomic_fetch_add(&t->done, 1);
}

static void thousand_concurrent_calls_from_one_thread(void **state)
{
    /* One client thread; the server answers none until all 1,000 are in
     * flight at once. */
    cli *c = cli_create(1, 0);
    cli_channel *ch = cli_channel_create(c, server.target, NULL, 0, NULL, NULL, 0);
    tally t = {0};
    Convo__Test__EchoRequest req = CONVO__TEST__ECHO_REQUEST__INIT;
    req.hold_until = 1000;
    cli_opts opts = {.timeout_ms = 60000};
    for (int i = 0; i < 1000; i++)
        assert_int_equal(
            cli_unary(ch, &convo__test__test__echo__method, &req.base, &opts, on_tally, &t, NULL),
            0);
    for (int waited = 0; atomic_load(&t.done) < 1000 && waited < 60000; waited += 10)
        usleep(10000);
    assert_int_equal(atomic_load(&t.ok), 1000);
    assert_int_equal(atomic_load(&t.failed), 0);
    cli_destroy(&c);
}

static void paused_stream_resumes_in_order(void **state)
{
    cli *c = cli_create(1, 0);
    cli_channel *ch = cli_channel_create(c, server.target, NULL, 0, NULL, NULL, 0);
    collector col;
    collector_init(&col);
    col.pause_every = 100;
    Convo__Test__CountRequest req = CONVO__TEST__COUNT_REQUEST__INIT;
    req.count = 1000;
    cli_call *call = NULL;
    assert_int_equal(cli_stream(ch, &convo__test__test__count__method, &req.base, NULL,
                                collector_on_msg, collector_on_done, &col, &call),
                     0);
    for (int round = 0; round < 20 && !col.done; round++) {
        assert_true(collector_wait(&col, col.paused || col.done, 5000));
        pthread_mutex_lock(&col.mu);
        /* While paused, nothing more arrives. */
        int64_t seen = col.received;
        pthread_mutex_unlock(&col.mu);
        usleep(20000);
        pthread_mutex_lock(&col.mu);
        assert_int_equal(col.received, seen);
        col.paused = 0;
        pthread_mutex_unlock(&col.mu);
        cli_call_resume(call);
    }
    assert_true(collector_wait(&col, col.done, 5000));
    assert_int_equal(col.code, RPC_OK);
    assert_int_equal(col.received, 1000);
    assert_int_equal(col.out_of_order, 0);
    cli_call_release(&call);
    cli_destroy(&c);
}

static void unreachable_peer_fails_fast_with_unavailable(void **state)
{
    cli *c = cli_create(1, 0);
    /* Port 1 on loopback: nothing listens there. */
    cli_channel *ch = cli_channel_create(c, "127.0.0.1:1", NULL, 0, NULL, NULL, 0);
    assert_string_equal(cli_channel_target(ch), "127.0.0.1:1");
    Convo__Test__EchoRequest req = CONVO__TEST__ECHO_REQUEST__INIT;
    cli_opts opts = {.timeout_ms = 5000};
    ProtobufCMessage *resp = NULL;
    char *message = NULL;
    int64_t t0 = rpc_now_ms();
    rpc_code code =
        cli_unary_sync(ch, &convo__test__test__echo__method, &req.base, &opts, &resp, &message);
    assert_int_equal(code, RPC_UNAVAILABLE);
    assert_true(rpc_now_ms() - t0 < 4000);
    mem_free(message);
    cli_destroy(&c);
}

static void destroy_with_calls_in_flight(void **state)
{
    cli *c = cli_create(2, 0);
    cli_channel *ch = cli_channel_create(c, server.target, NULL, 0, NULL, NULL, 0);
    collector hang, drip;
    collector_init(&hang);
    collector_init(&drip);
    Convo__Test__EchoRequest req = CONVO__TEST__ECHO_REQUEST__INIT;
    Convo__Test__CountRequest dreq = CONVO__TEST__COUNT_REQUEST__INIT;
    dreq.interval_ms = 5;
    assert_int_equal(cli_unary(ch, &convo__test__test__hang__method, &req.base, NULL,
                               collector_on_done, &hang, NULL),
                     0);
    assert_int_equal(cli_stream(ch, &convo__test__test__drip__method, &dreq.base, NULL,
                                collector_on_msg, collector_on_done, &drip, NULL),
                     0);
    assert_true(collector_wait(&drip, drip.received >= 1, 5000));
    cli_destroy(&c);
    assert_null(c);
    assert_true(hang.done && drip.done);
    assert_int_equal(hang.code, RPC_CANCELLED);
    assert_int_equal(drip.code, RPC_CANCELLED);
}

/* A call started from a callback: its callbacks run on that thread, after
 * the starting callback has returned (what the gateway relies on to keep a
 * turn's events in order). */
typedef struct chain {
    cli_channel *ch;
    pthread_t parent;
    atomic_int parent_returned;
    atomic_int wrong_thread;
    atomic_int too_early;
    atomic_int done;
} chain;

static void check_child(chain *k)
{
    if (!pthread_equal(pthread_self(), k->parent))
        atomic_fetch_add(&k->wrong_thread, 1);
    if (!atomic_load(&k->parent_returned))
        atomic_fetch_add(&k->too_early, 1);
}

static int on_child_msg(void *arg, const ProtobufCMessage *msg)
{
    check_child(arg);
    return 0;
}

static void on_child_done(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp)
{
    chain *k = arg;
    check_child(k);
    atomic_fetch_add(&k->done, 1);
}

static void on_parent_done(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp)
{
    chain *k = arg;
    if (resp != NULL)
        protobuf_c_message_free_unpacked(resp, NULL);
    k->parent = pthread_self();
    Convo__Test__CountRequest req = CONVO__TEST__COUNT_REQUEST__INIT;
    req.count = 3;
    if (cli_stream(k->ch, &convo__test__test__count__method, &req.base, NULL, on_child_msg,
                   on_child_done, k, NULL) != 0)
        atomic_fetch_add(&k->done, 1);
    /* Time for the answer to arrive, were another thread free to take it. */
    usleep(3000);
    atomic_store(&k->parent_returned, 1);
}

static void calls_started_in_a_callback_stay_on_its_thread(void **state)
{
    enum { N = 40 };
    cli *c = cli_create(4, 0);
    cli_channel *ch = cli_channel_create(c, server.target, NULL, 0, NULL, NULL, 0);
    static chain chains[N];
    Convo__Test__EchoRequest req = CONVO__TEST__ECHO_REQUEST__INIT;
    req.text = "x";
    for (int i = 0; i < N; i++) {
        memset(&chains[i], 0, sizeof chains[i]);
        chains[i].ch = ch;
        assert_int_equal(cli_unary(ch, &convo__test__test__echo__method, &req.base, NULL,
                                   on_parent_done, &chains[i], NULL),
                         0);
    }
    for (int i = 0; i < N; i++) {
        for (int waited = 0; !atomic_load(&chains[i].done) && waited < 10000; waited += 5)
            usleep(5000);
        assert_int_equal(atomic_load(&chains[i].done), 1);
        assert_int_equal(atomic_load(&chains[i].wrong_thread), 0);
        assert_int_equal(atomic_load(&chains[i].too_early), 0);
    }
    cli_destroy(&c);
}

static void *run_server(void *s)
{
    srv_run(s);
    return NULL;
}

static void wait_for_ready_waits_for_a_late_server(void **state)
{
    /* Reserve a port, then start the server on it only after the call. */
    srv_opts o = testsvc_default_opts();
    testsvc_server late;
    assert_int_equal(testsvc_server_start(&late, &o), 0);
    char target[64];
    snprintf(target, sizeof target, "%s", late.target);
    testsvc_server_stop(&late);

    cli *c = cli_create(1, 0);
    cli_channel *ch = cli_channel_create(c, target, NULL, 0, NULL, NULL, 0);
    collector col;
    collector_init(&col);
    Convo__Test__EchoRequest req = CONVO__TEST__ECHO_REQUEST__INIT;
    req.text = "late";
    cli_opts opts = {.timeout_ms = 15000, .wait_for_ready = 1};
    assert_int_equal(cli_unary(ch, &convo__test__test__echo__method, &req.base, &opts,
                               collector_on_done, &col, NULL),
                     0);
    usleep(300000);
    assert_false(col.done);
    late.s = srv_create("late", target, &o);
    testsvc_register(late.s);
    assert_int_equal(srv_start(late.s), 0);
    pthread_create(&late.run, NULL, run_server, late.s);
    assert_true(collector_wait(&col, col.done, 15000));
    assert_int_equal(col.code, RPC_OK);
    cli_destroy(&c);
    testsvc_server_stop(&late);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(deadline_exceeded_and_seen_by_server),
        cmocka_unit_test(cancellation_seen_by_server),
        cmocka_unit_test(thousand_concurrent_calls_from_one_thread),
        cmocka_unit_test(paused_stream_resumes_in_order),
        cmocka_unit_test(unreachable_peer_fails_fast_with_unavailable),
        cmocka_unit_test(destroy_with_calls_in_flight),
        cmocka_unit_test(calls_started_in_a_callback_stay_on_its_thread),
        cmocka_unit_test(wait_for_ready_waits_for_a_late_server),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
