/* job: one session summarized start to end against a fake store-svc and
 * llm-svc served in-process (runtime srv over a real socket): the claim,
 * paged event reading, the model call and what is saved for each outcome. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "convo/v1/llm.pb-c.h"
#include "convo/v1/store.pb-c.h"
#include "convo_methods.h"
#include "job.h"
#include "mem.h"
#include "srv.h"

#include "../common/fakesrv.h"
#include "summarizer.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>

#define WORKER       "worker-test"
#define MAX_ATTEMPTS 3
#define PAGE_EVENTS  2
#define TEXT_BYTES   4096

/* How the fake services answer (set before each job), and what they saw. */
typedef struct fake {
    pthread_mutex_t mu;
    /* ClaimSummary */
    rpc_code claim_code;
    int claimed;
    int32_t attempts;
    Convo__V1__SummaryStatus status;
    const char *final_summary;
    /* ListEvents: events 1..nevents, user messages "message <seq>" */
    int nevents;
    int list_calls;
    /* Complete */
    rpc_code complete_code;
    const char *complete_text;
    int completes;
    char complete_user[TEXT_BYTES];
    char complete_session[64];
    /* SaveSummary */
    rpc_code save_code;
    int saves;
    Convo__V1__SummaryStatus save_status;
    char save_summary[TEXT_BYTES];
    char save_error[TEXT_BYTES];
    char save_worker[64];
} fake;

static fake fk = {.mu = PTHREAD_MUTEX_INITIALIZER};

static void fake_reset(void)
{
    pthread_mutex_lock(&fk.mu);
    pthread_mutex_t mu = fk.mu;
    memset(&fk, 0, sizeof fk);
    fk.mu = mu;
    fk.claimed = 1;
    fk.attempts = 1;
    fk.status = CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_PENDING;
    fk.nevents = 3;
    fk.complete_text = "the summary";
    pthread_mutex_unlock(&fk.mu);
}

static void copy(char *dst, size_t size, const char *src)
{
    snprintf(dst, size, "%s", src != NULL ? src : "");
}

static void on_claim(srv_call *call, const ProtobufCMessage *msg)
{
    (void)msg;
    pthread_mutex_lock(&fk.mu);
    rpc_code code = fk.claim_code;
    Convo__V1__Session s = CONVO__V1__SESSION__INIT;
    s.session_id = "s1";
    s.user_id = "u1";
    s.summary_status = fk.status;
    s.summary_attempts = fk.attempts;
    s.final_summary = (char *)(fk.final_summary != NULL ? fk.final_summary : "");
    s.event_count = fk.nevents;
    Convo__V1__ClaimSummaryResponse r = CONVO__V1__CLAIM_SUMMARY_RESPONSE__INIT;
    r.claimed = fk.claimed;
    r.session = &s;
    pthread_mutex_unlock(&fk.mu);
    if (code != RPC_OK)
        srv_call_finish(call, code, "claim refused", NULL);
    else
        srv_call_finish(call, RPC_OK, NULL, &r.base);
}

static void on_list(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__ListEventsRequest *req = (const Convo__V1__ListEventsRequest *)msg;
    pthread_mutex_lock(&fk.mu);
    fk.list_calls++;
    int n = fk.nevents;
    pthread_mutex_unlock(&fk.mu);
    int64_t sent = 0;
    for (int64_t seq = req->after_seq + 1; seq <= n && (req->limit <= 0 || sent < req->limit);
         seq++, sent++) {
        char text[64];
        snprintf(text, sizeof text, "message %lld", (long long)seq);
        Convo__V1__Event ev = CONVO__V1__EVENT__INIT;
        ev.session_id = "s1";
        ev.seq = seq;
        ev.type = CONVO__V1__EVENT_TYPE__EVENT_TYPE_USER_MESSAGE;
        ev.content = text;
        if (srv_call_send(call, &ev.base) != 0) {
            srv_call_finish(call, RPC_INTERNAL, "send failed", NULL);
            return;
        }
    }
    srv_call_finish(call, RPC_OK, NULL, NULL);
}

static void on_complete(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__CompleteRequest *req = (const Convo__V1__CompleteRequest *)msg;
    pthread_mutex_lock(&fk.mu);
    fk.completes++;
    copy(fk.complete_user, sizeof fk.complete_user,
         req->n_messages > 0 ? req->messages[0]->content : NULL);
    copy(fk.complete_session, sizeof fk.complete_session, req->session_id);
    rpc_code code = fk.complete_code;
    Convo__V1__CompleteResponse r = CONVO__V1__COMPLETE_RESPONSE__INIT;
    r.content = (char *)fk.complete_text;
    r.finish_reason = "stop";
    pthread_mutex_unlock(&fk.mu);
    if (code != RPC_OK)
        srv_call_finish(call, code, "model broke", NULL);
    else
        srv_call_finish(call, RPC_OK, NULL, &r.base);
}

static void on_save(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__SaveSummaryRequest *req = (const Convo__V1__SaveSummaryRequest *)msg;
    pthread_mutex_lock(&fk.mu);
    fk.saves++;
    fk.save_status = req->status;
    copy(fk.save_summary, sizeof fk.save_summary, req->summary);
    copy(fk.save_error, sizeof fk.save_error, req->error);
    copy(fk.save_worker, sizeof fk.save_worker, req->worker_id);
    rpc_code code = fk.save_code;
    pthread_mutex_unlock(&fk.mu);
    Convo__V1__SaveSummaryResponse r = CONVO__V1__SAVE_SUMMARY_RESPONSE__INIT;
    if (code != RPC_OK)
        srv_call_finish(call, code, "save refused", NULL);
    else
        srv_call_finish(call, RPC_OK, NULL, &r.base);
}

typedef struct env {
    fakesrv fake;
    cli *c;
    cli_channel *ch;
    job_env je;
} env;

static int setup(void **state)
{
    env *e = mem_calloc(1, sizeof *e);
    fakesrv_create(&e->fake, "fake");
    const srv_method ms[] = {
        {.method = &convo__v1__store__claim_summary__method, .on_call = on_claim, .callers = "*"},
        {.method = &convo__v1__store__list_events__method, .on_call = on_list, .callers = "*"},
        {.method = &convo__v1__store__save_summary__method, .on_call = on_save, .callers = "*"},
        {.method = &convo__v1__llm__complete__method, .on_call = on_complete, .callers = "*"},
    };
    fakesrv_add(&e->fake, ms, sizeof ms / sizeof ms[0]);
    fakesrv_run(&e->fake);
    e->c = cli_create(1, 0);
    e->ch = cli_channel_create(e->c, e->fake.target, NULL, 0, NULL, NULL, 0);
    e->je = (job_env){.store = e->ch,
                      .llm = e->ch,
                      .worker_id = WORKER,
                      .lease_seconds = 60,
                      .max_attempts = MAX_ATTEMPTS,
                      .budget = SUMM_MIN_BUDGET,
                      .store_timeout_ms = 5000,
                      .llm_timeout_ms = 5000,
                      .model = "",
                      .page_events = PAGE_EVENTS};
    *state = e;
    return 0;
}

static int teardown(void **state)
{
    env *e = *state;
    cli_destroy(&e->c);
    fakesrv_stop(&e->fake);
    mem_free(e);
    return 0;
}

static void run(void **state, job_result *r)
{
    env *e = *state;
    bcall_scope *sc = bcall_scope_new();
    job_run(&e->je, sc, "s1", r);
    bcall_scope_free(&sc);
}

static void summarizes_every_page(void **state)
{
    fake_reset();
    fk.nevents = 5; /* three pages of PAGE_EVENTS */
    job_result r;
    run(state, &r);
    assert_int_equal(r.outcome, JOB_DONE);
    assert_string_equal(r.summary, "the summary");
    assert_int_equal(r.claimed, 1);
    assert_int_equal(r.attempts, 1);
    assert_int_equal(r.model_calls, 1);
    assert_int_equal(fk.list_calls, 3);
    assert_int_equal(fk.completes, 1);
    assert_string_equal(fk.complete_session, "s1");
    /* Every event reached the model once, in order. */
    const char *p1 = strstr(fk.complete_user, "message 1");
    const char *p5 = strstr(fk.complete_user, "message 5");
    assert_non_null(p1);
    assert_non_null(p5);
    assert_true(p1 < p5);
    const char *p3 = strstr(fk.complete_user, "message 3");
    assert_non_null(p3);
    assert_true(p1 < p3 && p3 < p5);
    assert_null(strstr(fk.complete_user, "message 6"));
    assert_int_equal(fk.saves, 1);
    assert_int_equal(fk.save_status, CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_DONE);
    assert_string_equal(fk.save_summary, "the summary");
    assert_string_equal(fk.save_worker, WORKER);
    job_result_clear(&r);
    assert_null(r.summary);
}

static void no_conversation_needs_no_model(void **state)
{
    fake_reset();
    fk.nevents = 0;
    job_result r;
    run(state, &r);
    assert_int_equal(r.outcome, JOB_DONE);
    assert_string_equal(r.summary, SUMM_EMPTY_TEXT);
    assert_int_equal(r.model_calls, 0);
    assert_int_equal(fk.completes, 0);
    assert_int_equal(fk.save_status, CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_DONE);
    job_result_clear(&r);
}

static void model_failure_is_retried_later(void **state)
{
    fake_reset();
    fk.complete_code = RPC_INTERNAL;
    job_result r;
    run(state, &r);
    assert_int_equal(r.outcome, JOB_RETRY);
    assert_non_null(strstr(r.error, "llm-svc Complete"));
    assert_non_null(strstr(r.error, "model broke"));
    assert_int_equal(r.llm_unreachable, 0);
    assert_int_equal(fk.saves, 1);
    assert_int_equal(fk.save_status, CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_PENDING);
    assert_string_equal(fk.save_error, r.error);
    assert_string_equal(fk.save_summary, "");
    job_result_clear(&r);
}

static void last_attempt_fails_the_session(void **state)
{
    fake_reset();
    fk.attempts = MAX_ATTEMPTS;
    fk.complete_code = RPC_UNAVAILABLE;
    job_result r;
    run(state, &r);
    assert_int_equal(r.outcome, JOB_FAILED);
    assert_int_equal(r.llm_unreachable, 1);
    assert_non_null(strstr(r.error, "gave up after 3 attempts"));
    assert_int_equal(fk.save_status, CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_FAILED);
    assert_string_equal(fk.save_error, r.error);
    job_result_clear(&r);
}

static void unclaimed_answers_from_the_session(void **state)
{
    fake_reset();
    fk.claimed = 0;
    fk.status = CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_DONE;
    fk.final_summary = "saved before";
    job_result r;
    run(state, &r);
    assert_int_equal(r.outcome, JOB_DONE);
    assert_string_equal(r.summary, "saved before");
    assert_int_equal(r.claimed, 0);
    job_result_clear(&r);

    fake_reset();
    fk.claimed = 0; /* PENDING with attempts left: another worker holds it */
    run(state, &r);
    assert_int_equal(r.outcome, JOB_BUSY);
    assert_int_equal(r.lease_conflict, 1);
    job_result_clear(&r);

    fake_reset();
    fk.claimed = 0;
    fk.attempts = MAX_ATTEMPTS;
    run(state, &r);
    assert_int_equal(r.outcome, JOB_BUSY);
    assert_int_equal(r.lease_conflict, 0);
    assert_non_null(strstr(r.error, "no attempt left"));
    job_result_clear(&r);

    fake_reset();
    fk.claimed = 0;
    fk.status = CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_NONE;
    run(state, &r);
    assert_int_equal(r.outcome, JOB_NOT_ENDED);
    job_result_clear(&r);
    /* None of them read, called the model or saved. */
    assert_int_equal(fk.list_calls + fk.completes + fk.saves, 0);
}

static void claim_error_stops_the_job(void **state)
{
    fake_reset();
    fk.claim_code = RPC_NOT_FOUND;
    job_result r;
    run(state, &r);
    assert_int_equal(r.outcome, JOB_ERROR);
    assert_int_equal(r.code, RPC_NOT_FOUND);
    assert_non_null(strstr(r.error, "ClaimSummary"));
    assert_int_equal(fk.list_calls + fk.saves, 0);
    job_result_clear(&r);
}

static void lost_lease_is_busy(void **state)
{
    fake_reset();
    fk.save_code = RPC_FAILED_PRECONDITION;
    job_result r;
    run(state, &r);
    assert_int_equal(r.outcome, JOB_BUSY);
    assert_int_equal(r.lease_conflict, 1);
    assert_int_equal(fk.saves, 1);
    job_result_clear(&r);
}

static void refused_summary_is_saved_pending(void **state)
{
    fake_reset();
    fk.save_code = RPC_INVALID_ARGUMENT; /* every save: the PENDING one too */
    job_result r;
    run(state, &r);
    assert_int_equal(fk.saves, 2);
    assert_int_equal(fk.save_status, CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_PENDING);
    assert_non_null(strstr(fk.save_error, "SaveSummary"));
    assert_int_equal(r.outcome, JOB_ERROR);
    assert_int_equal(r.code, RPC_INVALID_ARGUMENT);
    job_result_clear(&r);
}

static void outcome_names(void **state)
{
    (void)state;
    assert_string_equal(job_outcome_name(JOB_DONE), "done");
    assert_string_equal(job_outcome_name(JOB_FAILED), "failed");
    assert_string_equal(job_outcome_name(JOB_RETRY), "retry");
    assert_string_equal(job_outcome_name(JOB_BUSY), "busy");
    assert_string_equal(job_outcome_name(JOB_NOT_ENDED), "not_ended");
    assert_string_equal(job_outcome_name(JOB_ERROR), "error");
    assert_string_equal(job_outcome_name((job_outcome)99), "unknown");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(summarizes_every_page),
        cmocka_unit_test(no_conversation_needs_no_model),
        cmocka_unit_test(model_failure_is_retried_later),
        cmocka_unit_test(last_attempt_fails_the_session),
        cmocka_unit_test(unclaimed_answers_from_the_session),
        cmocka_unit_test(claim_error_stops_the_job),
        cmocka_unit_test(lost_lease_is_busy),
        cmocka_unit_test(refused_summary_is_saved_pending),
        cmocka_unit_test(outcome_names),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
