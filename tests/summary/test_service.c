/* service: convo.v1.Summary served for real (srv over a socket) against a
 * fake store-svc and llm-svc in the same process: the option check, ids
 * refused, Summarize(wait) answered with the saved summary, two requests
 * for one session making one model call, and GetSummary from the store. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "convo/v1/llm.pb-c.h"
#include "convo/v1/store.pb-c.h"
#include "convo/v1/summary.pb-c.h"
#include "convo_methods.h"
#include "mem.h"
#include "service.h"
#include "srv.h"

#include "../common/fakesrv.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define SUMMARY_TEXT "the summary of s1"
#define MODEL_MS     300 /* the fake model's think time: requests overlap */
#define TEXT_BYTES   256

/* The fake store's one session, and what the fakes saw. */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int saved;
static char saved_summary[TEXT_BYTES];
static int completes, claims;

static void session_of(Convo__V1__Session *s)
{
    s->session_id = "s1";
    s->user_id = "u1";
    s->end_time_us = 1;
    s->summary_attempts = 1;
    s->summary_status = saved ? CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_DONE
                              : CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_PENDING;
    s->final_summary = saved ? saved_summary : "";
    s->event_count = 1;
}

static void on_claim(srv_call *call, const ProtobufCMessage *msg)
{
    (void)msg;
    Convo__V1__Session s = CONVO__V1__SESSION__INIT;
    Convo__V1__ClaimSummaryResponse r = CONVO__V1__CLAIM_SUMMARY_RESPONSE__INIT;
    pthread_mutex_lock(&mu);
    claims++;
    session_of(&s);
    r.claimed = !saved; /* done once: later claims see it DONE */
    r.session = &s;
    srv_call_finish(call, RPC_OK, NULL, &r.base);
    pthread_mutex_unlock(&mu);
}

static void on_list(srv_call *call, const ProtobufCMessage *msg)
{
    (void)msg;
    Convo__V1__Event ev = CONVO__V1__EVENT__INIT;
    ev.session_id = "s1";
    ev.seq = 1;
    ev.type = CONVO__V1__EVENT_TYPE__EVENT_TYPE_USER_MESSAGE;
    ev.content = "how do I reset my password?";
    if (srv_call_send(call, &ev.base) != 0) {
        srv_call_finish(call, RPC_INTERNAL, "send failed", NULL);
        return;
    }
    srv_call_finish(call, RPC_OK, NULL, NULL);
}

static void on_save(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__SaveSummaryRequest *req = (const Convo__V1__SaveSummaryRequest *)msg;
    Convo__V1__SaveSummaryResponse r = CONVO__V1__SAVE_SUMMARY_RESPONSE__INIT;
    Convo__V1__Session s = CONVO__V1__SESSION__INIT;
    pthread_mutex_lock(&mu);
    if (req->status == CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_DONE) {
        saved = 1;
        snprintf(saved_summary, sizeof saved_summary, "%s", req->summary);
    }
    session_of(&s);
    r.session = &s;
    srv_call_finish(call, RPC_OK, NULL, &r.base);
    pthread_mutex_unlock(&mu);
}

static void on_get_session(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__GetSessionRequest *req = (const Convo__V1__GetSessionRequest *)msg;
    if (strcmp(req->session_id, "s1") != 0) {
        srv_call_finish(call, RPC_NOT_FOUND, "no such session", NULL);
        return;
    }
    Convo__V1__Session s = CONVO__V1__SESSION__INIT;
    Convo__V1__GetSessionResponse r = CONVO__V1__GET_SESSION_RESPONSE__INIT;
    pthread_mutex_lock(&mu);
    session_of(&s);
    r.session = &s;
    srv_call_finish(call, RPC_OK, NULL, &r.base);
    pthread_mutex_unlock(&mu);
}

static void on_complete(srv_call *call, const ProtobufCMessage *msg)
{
    (void)msg;
    pthread_mutex_lock(&mu);
    completes++;
    pthread_mutex_unlock(&mu);
    usleep(MODEL_MS * 1000);
    Convo__V1__CompleteResponse r = CONVO__V1__COMPLETE_RESPONSE__INIT;
    r.content = SUMMARY_TEXT;
    r.finish_reason = "stop";
    srv_call_finish(call, RPC_OK, NULL, &r.base);
}

typedef struct env {
    fakesrv peers; /* store-svc and llm-svc */
    fakesrv own;   /* the service under test */
    cli *c;
    cli_channel *ch;
    service *sv;
} env;

static int setup(void **state)
{
    env *e = mem_calloc(1, sizeof *e);
    fakesrv_create(&e->peers, "peers");
    const srv_method ms[] = {
        {.method = &convo__v1__store__claim_summary__method, .on_call = on_claim, .callers = "*"},
        {.method = &convo__v1__store__list_events__method, .on_call = on_list, .callers = "*"},
        {.method = &convo__v1__store__save_summary__method, .on_call = on_save, .callers = "*"},
        {.method = &convo__v1__store__get_session__method,
         .on_call = on_get_session,
         .callers = "*"},
        {.method = &convo__v1__llm__complete__method, .on_call = on_complete, .callers = "*"},
    };
    fakesrv_add(&e->peers, ms, sizeof ms / sizeof ms[0]);
    fakesrv_run(&e->peers);

    service_opts o = {.store = e->peers.target,
                      .llm = e->peers.target,
                      .workers = 2,
                      .queue_size = 8,
                      .sweep_interval_ms = 0,
                      .sweep_delay_ms = 0,
                      .sweep_batch = 10,
                      .lease_seconds = 60,
                      .max_attempts = 3,
                      .retry_backoff_ms = 1000,
                      .retry_backoff_max_ms = 1000,
                      .context_budget_bytes = 65536,
                      .model = "",
                      .store_timeout_ms = 5000,
                      .llm_timeout_ms = 5000,
                      .page_events = 100};
    e->c = cli_create(2, 0);
    char err[256];
    e->sv = service_create(&o, e->c, 0, NULL, NULL, err, sizeof err);
    assert_non_null(e->sv);
    fakesrv_create(&e->own, "test");
    assert_int_equal(service_register(e->sv, e->own.s), 0);
    fakesrv_run(&e->own);
    service_start(e->sv);
    e->ch = cli_channel_create(e->c, e->own.target, NULL, 0, NULL, NULL, 0);
    *state = e;
    return 0;
}

static int teardown(void **state)
{
    env *e = *state;
    /* The service's workers stop after its server (calls in flight finish)
     * and before it is freed. */
    srv_stop(e->own.s);
    pthread_join(e->own.run, NULL);
    service_stop(e->sv);
    srv_destroy(&e->own.s);
    service_destroy(&e->sv);
    cli_destroy(&e->c);
    fakesrv_stop(&e->peers);
    mem_free(e);
    return 0;
}

/* A blocking Summarize or GetSummary; *resp is the caller's. */
static rpc_code call(env *e, const rpc_method *m, const ProtobufCMessage *req,
                     ProtobufCMessage **resp, char **msg)
{
    cli_opts o = {.timeout_ms = 10000};
    *resp = NULL;
    return cli_unary_sync(e->ch, m, req, &o, resp, msg);
}

static void check_opts(void **state)
{
    (void)state;
    char err[256] = "";
    service_opts o = {.sweep_interval_ms = 0};
    assert_int_equal(service_check_opts(&o, err, sizeof err), 0);
    o.sweep_interval_ms = 50;
    assert_int_equal(service_check_opts(&o, err, sizeof err), -1);
    assert_non_null(strstr(err, "--sweep-interval-ms"));
    o.sweep_interval_ms = 100;
    assert_int_equal(service_check_opts(&o, err, sizeof err), 0);
}

static void bad_ids_are_refused(void **state)
{
    env *e = *state;
    ProtobufCMessage *resp;
    char *msg = NULL;
    Convo__V1__SummarizeRequest s = CONVO__V1__SUMMARIZE_REQUEST__INIT;
    s.session_id = "no spaces allowed";
    assert_int_equal(call(e, &convo__v1__summary__summarize__method, &s.base, &resp, &msg),
                     RPC_INVALID_ARGUMENT);
    assert_non_null(strstr(msg, "session_id"));
    mem_free(msg);
    msg = NULL;
    Convo__V1__GetSummaryRequest g = CONVO__V1__GET_SUMMARY_REQUEST__INIT;
    g.session_id = "";
    assert_int_equal(call(e, &convo__v1__summary__get_summary__method, &g.base, &resp, &msg),
                     RPC_INVALID_ARGUMENT);
    assert_non_null(strstr(msg, "session_id"));
    mem_free(msg);
}

typedef struct waiter {
    env *e;
    rpc_code code;
    int status;
    char summary[TEXT_BYTES];
} waiter;

static void *summarize_wait(void *arg)
{
    waiter *w = arg;
    Convo__V1__SummarizeRequest s = CONVO__V1__SUMMARIZE_REQUEST__INIT;
    s.session_id = "s1";
    s.wait = 1;
    ProtobufCMessage *resp = NULL;
    w->code = call(w->e, &convo__v1__summary__summarize__method, &s.base, &resp, NULL);
    if (resp != NULL) {
        const Convo__V1__SummarizeResponse *r = (const Convo__V1__SummarizeResponse *)resp;
        w->status = r->status;
        snprintf(w->summary, sizeof w->summary, "%s", r->summary != NULL ? r->summary : "");
        protobuf_c_message_free_unpacked(resp, NULL);
    }
    return NULL;
}

static void summarize_waits_for_one_summary(void **state)
{
    env *e = *state;
    waiter w[2] = {{.e = e}, {.e = e}};
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_create(&t[i], NULL, summarize_wait, &w[i]), 0);
    for (int i = 0; i < 2; i++) {
        pthread_join(t[i], NULL);
        assert_int_equal(w[i].code, RPC_OK);
        assert_int_equal(w[i].status, CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_DONE);
        assert_string_equal(w[i].summary, SUMMARY_TEXT);
    }
    pthread_mutex_lock(&mu);
    int calls = completes, done = saved;
    char text[TEXT_BYTES];
    snprintf(text, sizeof text, "%s", saved_summary);
    pthread_mutex_unlock(&mu);
    assert_int_equal(calls, 1); /* the second request did not summarize again */
    assert_int_equal(done, 1);
    assert_string_equal(text, SUMMARY_TEXT);

    /* GetSummary reads what the store holds. */
    Convo__V1__GetSummaryRequest g = CONVO__V1__GET_SUMMARY_REQUEST__INIT;
    g.session_id = "s1";
    ProtobufCMessage *resp = NULL;
    assert_int_equal(call(e, &convo__v1__summary__get_summary__method, &g.base, &resp, NULL),
                     RPC_OK);
    const Convo__V1__GetSummaryResponse *r = (const Convo__V1__GetSummaryResponse *)resp;
    assert_int_equal(r->status, CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_DONE);
    assert_string_equal(r->summary, SUMMARY_TEXT);
    assert_string_equal(r->session_id, "s1");
    protobuf_c_message_free_unpacked(resp, NULL);

    g.session_id = "unknown";
    char *msg = NULL;
    assert_int_equal(call(e, &convo__v1__summary__get_summary__method, &g.base, &resp, &msg),
                     RPC_NOT_FOUND);
    mem_free(msg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(check_opts),
        cmocka_unit_test(bad_ids_are_refused),
        cmocka_unit_test(summarize_waits_for_one_summary),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
