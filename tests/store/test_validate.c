/* validate: store-svc's request checks (store.c) over a real gRPC call.
 * The pool's database is unreachable, so a request that passes the checks
 * reaches the pool and is answered UNAVAILABLE, and one that does not is
 * INVALID_ARGUMENT naming its field: nothing bad reaches the database. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "cli.h"
#include "convo_methods.h"
#include "mem.h"
#include "pool.h"
#include "srv.h"
#include "store.h"

#include "../common/fakesrv.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>

#define MAX_BATCH   4
#define MAX_CONTENT 16
#define REFUSED_URL "postgresql://convo@127.0.0.1:1/convo"

typedef struct env {
    fakesrv srv;
    pool *p;
    store *st;
    cli *c;
    cli_channel *ch;
} env;

static int setup(void **state)
{
    env *e = mem_calloc(1, sizeof *e);
    fakesrv_create(&e->srv, "store-test");
    pool_config pc = {.db = {.url = REFUSED_URL, .connect_timeout_s = 1},
                      .workers = 1,
                      .max_jobs = 16,
                      .max_bytes = 1 << 20,
                      .retry_min_ms = 100,
                      .retry_max_ms = 1000,
                      .group_window_ms = 1,
                      .group_idle_ms = 1,
                      .group_max_jobs = 1,
                      .group_max_weight = MAX_BATCH};
    e->p = pool_create(&pc);
    store_limits lim = {.max_batch_events = MAX_BATCH,
                        .max_content_bytes = MAX_CONTENT,
                        .list_page_size = 10,
                        .max_message_bytes = 4 << 20};
    e->st = store_create(e->srv.s, e->p, &lim, NULL);
    assert_non_null(e->st);
    fakesrv_run(&e->srv);
    e->c = cli_create(1, 0);
    e->ch = cli_channel_create(e->c, e->srv.target, NULL, 0, NULL, NULL, 0);
    *state = e;
    return 0;
}

static int teardown(void **state)
{
    env *e = *state;
    cli_destroy(&e->c);
    fakesrv_stop(&e->srv);
    pool_destroy(&e->p);
    store_destroy(&e->st);
    mem_free(e);
    return 0;
}

/* Calls `m` with `req`; returns the code and, for INVALID_ARGUMENT, checks
 * that the message holds `needle`. */
static rpc_code call(void **state, const rpc_method *m, const ProtobufCMessage *req,
                     const char *needle)
{
    env *e = *state;
    cli_opts o = {.timeout_ms = 5000};
    ProtobufCMessage *resp = NULL;
    char *msg = NULL;
    rpc_code code = cli_unary_sync(e->ch, m, req, &o, &resp, &msg);
    if (resp != NULL)
        protobuf_c_message_free_unpacked(resp, NULL);
    if (needle != NULL) {
        if (code != RPC_INVALID_ARGUMENT || msg == NULL || strstr(msg, needle) == NULL)
            fail_msg("wanted INVALID_ARGUMENT with \"%s\", got %s: %s", needle, rpc_code_name(code),
                     msg != NULL ? msg : "");
    }
    mem_free(msg);
    return code;
}

/* An AppendEvents of n events (seq 1..n, user messages "hi"). */
typedef struct append {
    Convo__V1__AppendEventsRequest req;
    Convo__V1__Event ev[MAX_BATCH + 1];
    Convo__V1__Event *ptrs[MAX_BATCH + 1];
} append;

static void append_init(append *a, size_t n)
{
    convo__v1__append_events_request__init(&a->req);
    a->req.session_id = "s-1";
    a->req.user_id = "u_1";
    for (size_t i = 0; i < n; i++) {
        convo__v1__event__init(&a->ev[i]);
        a->ev[i].seq = (int64_t)i + 1;
        a->ev[i].type = CONVO__V1__EVENT_TYPE__EVENT_TYPE_USER_MESSAGE;
        a->ev[i].content = "hi";
        a->ptrs[i] = &a->ev[i];
    }
    a->req.n_events = n;
    a->req.events = a->ptrs;
}

#define APPEND (&convo__v1__store__append_events__method)

static void append_checks(void **state)
{
    append a;
    append_init(&a, 2);
    /* Valid: past the checks, to the pool, which has no database. */
    assert_int_equal(call(state, APPEND, &a.req.base, NULL), RPC_UNAVAILABLE);

    append_init(&a, 2);
    a.req.session_id = "";
    call(state, APPEND, &a.req.base, "session_id");
    a.req.session_id = "has space";
    call(state, APPEND, &a.req.base, "session_id");
    append_init(&a, 2);
    a.req.user_id = "";
    call(state, APPEND, &a.req.base, "user_id");

    append_init(&a, MAX_BATCH + 1);
    call(state, APPEND, &a.req.base, "over the batch limit of 4");

    append_init(&a, 2);
    a.ev[0].seq = 0;
    call(state, APPEND, &a.req.base, "seqs start at 1");
    append_init(&a, 2);
    a.ev[1].seq = 1;
    call(state, APPEND, &a.req.base, "strictly increasing");
    append_init(&a, 2);
    a.ev[1].type = 9;
    call(state, APPEND, &a.req.base, "events[1].type 9 is not a known event type");
    append_init(&a, 2);
    a.ev[0].content = "seventeen bytes!!";
    call(state, APPEND, &a.req.base, "events[0].content");
    append_init(&a, 2);
    a.ev[0].content = "bad \xC3\x28 utf-8";
    call(state, APPEND, &a.req.base, "events[0].content");
    append_init(&a, 2);
    a.ev[1].timestamp_us = -1;
    call(state, APPEND, &a.req.base, "events[1].timestamp_us");
    append_init(&a, 2);
    a.ev[1].timestamp_us = STORE_MAX_TIME_US + 1;
    call(state, APPEND, &a.req.base, "events[1].timestamp_us");
    append_init(&a, 2);
    a.ev[0].session_id = "s-2";
    call(state, APPEND, &a.req.base, "not the request's 's-1'");
}

static void save_summary_checks(void **state)
{
    const rpc_method *m = &convo__v1__store__save_summary__method;
    Convo__V1__SaveSummaryRequest r = CONVO__V1__SAVE_SUMMARY_REQUEST__INIT;
    r.session_id = "s-1";
    r.worker_id = "w-1";
    r.status = CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_DONE;
    r.summary = "short";
    assert_int_equal(call(state, m, &r.base, NULL), RPC_UNAVAILABLE);
    r.status = CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_NONE;
    call(state, m, &r.base, "is not DONE, FAILED or PENDING");
    r.status = CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_DONE;
    r.summary = "";
    call(state, m, &r.base, "summary is empty");
    r.summary = "a summary longer than sixteen bytes";
    call(state, m, &r.base, "summary");
    r.summary = "short";
    r.worker_id = "";
    call(state, m, &r.base, "worker_id");
    r.worker_id = "w-1";
    r.session_id = "bad/id";
    call(state, m, &r.base, "session_id");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(append_checks),
        cmocka_unit_test(save_summary_checks),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
