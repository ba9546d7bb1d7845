#include "job.h"

#include "log.h"
#include "mem.h"
#include "summarizer.h"

#include "convo_methods.h"

#include <string.h>
#include <unistd.h>

/* A call is not started with less than this left on the lease. */
#define MIN_CALL_MS 1000
/* The lease is given up this much before it ends (at most): the store's
 * clock started it a little after ours. */
#define LEASE_MARGIN_MAX_MS 5000
/* A broken ListEvents stream (store-svc restarting) is resumed after the
 * last event read, this many times in a row. */
#define STREAM_RETRIES 3
#define SAVE_RETRIES   3
/* Events held between the stream and the summarizer: the store's stream is
 * paused past these, so a slow model never fills memory. */
#define STREAM_MAX_MSGS  256
#define STREAM_MAX_BYTES (1024 * 1024)

/* A failure reason is kept to this (an upstream's error body can be long);
 * the cut is marked. */
#define MAX_REASON_BYTES 2048

typedef struct job {
    const job_env *env;
    bcall_scope *sc;
    const char *session_id;
    int64_t lease_end_ms;
    unsigned model_calls;
    int llm_unreachable;
} job;

const char *job_outcome_name(job_outcome o)
{
    switch (o) {
    case JOB_DONE:
        return "done";
    case JOB_FAILED:
        return "failed";
    case JOB_RETRY:
        return "retry";
    case JOB_BUSY:
        return "busy";
    case JOB_NOT_ENDED:
        return "not_ended";
    case JOB_ERROR:
        return "error";
    }
    return "unknown";
}

void job_result_clear(job_result *r)
{
    mem_free(r->summary);
    mem_free(r->error);
    memset(r, 0, sizeof *r);
}

static char *call_error(const char *what, rpc_code code, const char *msg)
{
    return mem_asprintf("%s failed (%s: %s)", what, rpc_code_name(code),
                        msg != NULL && msg[0] ? msg : "no message");
}

/* Shortens a mem_ string in place to at most max bytes, at a character
 * boundary, ending in "...". */
static void bound_text(char *s, size_t max)
{
    size_t n = strlen(s);
    if (n <= max)
        return;
    n = max - 3;
    while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80)
        n--;
    memcpy(s + n, "...", 4);
}

static int64_t left_ms(const job *j)
{
    return j->lease_end_ms - rpc_now_ms();
}

/* Sleeps up to ms, in slices, returning early when the job is cancelled. */
static void nap(job *j, int64_t ms)
{
    for (int64_t slept = 0; slept < ms && !bcall_scope_cancelled(j->sc); slept += 50)
        usleep(50 * 1000);
}

/* The summarizer's model: one Complete call with the instructions as the
 * system prompt and the material as the one user message. */
static int call_model(void *arg, const summ_request *rq, char **out, char **err)
{
    job *j = arg;
    const job_env *env = j->env;
    int64_t left = left_ms(j);
    if (left < MIN_CALL_MS) {
        *err = mem_asprintf("the %d s lease ran out before the summary was done (a longer "
                            "--lease-seconds lets long sessions finish)",
                            (int)env->lease_seconds);
        return -1;
    }
    int64_t timeout = env->llm_timeout_ms < left ? env->llm_timeout_ms : left;

    Convo__V1__Message m = CONVO__V1__MESSAGE__INIT;
    m.role = CONVO__V1__ROLE__ROLE_USER;
    m.content = (char *)rq->text;
    Convo__V1__Message *mp = &m;
    Convo__V1__GenerationParams params = CONVO__V1__GENERATION_PARAMS__INIT;
    params.model = (char *)env->model;
    /* Low: a summary should restate, not invent. */
    params.temperature = 0.2f;
    params.max_tokens = rq->max_tokens;
    params.tools_enabled = 0;
    Convo__V1__CompleteRequest req = CONVO__V1__COMPLETE_REQUEST__INIT;
    req.system_prompt = (char *)rq->system_prompt;
    req.n_messages = 1;
    req.messages = &mp;
    req.params = &params;
    req.session_id = (char *)j->session_id;

    ProtobufCMessage *resp = NULL;
    char *msg = NULL;
    int64_t t0 = rpc_now_ms();
    j->model_calls++;
    rpc_code code = bcall_unary(j->sc, env->llm, &convo__v1__llm__complete__method, &req.base,
                                timeout, &resp, &msg);
    int rc = -1;
    if (code != RPC_OK) {
        if (code == RPC_UNAVAILABLE)
            j->llm_unreachable = 1;
        if (code == RPC_DEADLINE_EXCEEDED && timeout < env->llm_timeout_ms)
            *err = mem_asprintf("the %d s lease ran out during a model call (a longer "
                                "--lease-seconds lets long sessions finish)",
                                (int)env->lease_seconds);
        else
            *err = call_error("llm-svc Complete", code, msg);
        goto out;
    }
    const Convo__V1__CompleteResponse *r = (const Convo__V1__CompleteResponse *)resp;
    if (r->content == NULL || r->content[0] == '\0') {
        *err = mem_asprintf("the model answered nothing (finish_reason \"%s\")",
                            r->finish_reason != NULL ? r->finish_reason : "");
        goto out;
    }
    *out = mem_strdup(r->content);
    log_debug("model call (step %d, parts %u-%u): %zu bytes in, %zu out, %lld ms", (int)rq->step,
              rq->first_part, rq->last_part, rq->text_len, strlen(r->content),
              (long long)(rpc_now_ms() - t0));
    rc = 0;
out:
    if (resp != NULL)
        protobuf_c_message_free_unpacked(resp, NULL);
    mem_free(msg);
    return rc;
}

/* Streams the session's events into the summarizer, a page (ListEvents
 * with after_seq and limit) at a time, so no call lives long; a broken page
 * is resumed after the last event read. Returns 0 or -1 with *err. */
static int read_events(job *j, summ *s, uint64_t *nevents, char **err)
{
    const job_env *env = j->env;
    int64_t after = 0;
    int retries = 0;
    for (;;) {
        Convo__V1__ListEventsRequest req = CONVO__V1__LIST_EVENTS_REQUEST__INIT;
        req.session_id = (char *)j->session_id;
        req.after_seq = after;
        req.limit = env->page_events;
        bcall_stream *st = NULL;
        char *msg = NULL;
        int64_t left = left_ms(j);
        if (left < MIN_CALL_MS) {
            *err = mem_asprintf("the %d s lease ran out while reading the events (a longer "
                                "--lease-seconds lets long sessions finish)",
                                (int)env->lease_seconds);
            return -1;
        }
        /* The page stays open while its events are summarized (model
         * calls included): its deadline is the lease's. */
        rpc_code code = bcall_stream_open(j->sc, env->store, &convo__v1__store__list_events__method,
                                          &req.base, left, STREAM_MAX_MSGS, STREAM_MAX_BYTES, &st);
        if (code != RPC_OK) {
            *err = call_error("store-svc ListEvents", code, "the call could not start");
            return -1;
        }
        int64_t got = 0;
        int rc;
        ProtobufCMessage *m = NULL;
        while ((rc = bcall_stream_next(st, &m, &code, &msg)) == 1) {
            const Convo__V1__Event *ev = (const Convo__V1__Event *)m;
            got++;
            int srv = 0;
            /* Strictly after the last one read: a resumed page never
             * feeds an event twice. */
            if (ev->seq > after) {
                after = ev->seq;
                (*nevents)++;
                srv = summ_add(s, ev->type, ev->content, ev->content ? strlen(ev->content) : 0);
            }
            protobuf_c_message_free_unpacked(m, NULL);
            if (srv != 0) {
                bcall_stream_close(&st);
                *err = mem_strdup(summ_error(s));
                return -1;
            }
        }
        bcall_stream_close(&st);
        if (rc == 0) {
            mem_free(msg);
            retries = 0;
            if (env->page_events <= 0 || got < env->page_events)
                return 0;
            continue;
        }
        if (code == RPC_UNAVAILABLE && retries < STREAM_RETRIES && !bcall_scope_cancelled(j->sc)) {
            log_warn("ListEvents broke after seq %lld (%s: %s); resuming", (long long)after,
                     rpc_code_name(code), msg != NULL ? msg : "");
            mem_free(msg);
            nap(j, 200LL << retries);
            retries++;
            continue;
        }
        *err = call_error("store-svc ListEvents", code, msg);
        mem_free(msg);
        return -1;
    }
}

/* SaveSummary, retried while the store is unreachable. Not in the job's
 * cancellation scope: at shutdown the lease is still released. */
static rpc_code save(job *j, Convo__V1__SummaryStatus status, const char *summary,
                     const char *error, char **msg)
{
    const job_env *env = j->env;
    Convo__V1__SaveSummaryRequest req = CONVO__V1__SAVE_SUMMARY_REQUEST__INIT;
    req.session_id = (char *)j->session_id;
    req.status = status;
    req.summary = (char *)summary;
    req.error = (char *)error;
    req.worker_id = (char *)env->worker_id;
    rpc_code code = RPC_OK;
    for (int attempt = 0;; attempt++) {
        ProtobufCMessage *resp = NULL;
        mem_free(*msg);
        *msg = NULL;
        code = bcall_unary(NULL, env->store, &convo__v1__store__save_summary__method, &req.base,
                           env->store_timeout_ms, &resp, msg);
        if (resp != NULL)
            protobuf_c_message_free_unpacked(resp, NULL);
        if (code != RPC_UNAVAILABLE || attempt + 1 >= SAVE_RETRIES || bcall_scope_cancelled(j->sc))
            return code;
        nap(j, 250LL << attempt);
    }
}

/* Not claimed: the answer comes from the session as the store has it. */
static void from_session(const job_env *env, const Convo__V1__Session *s, job_result *out)
{
    switch (s->summary_status) {
    case CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_DONE:
        out->outcome = JOB_DONE;
        out->summary = mem_strdup(s->final_summary != NULL ? s->final_summary : "");
        break;
    case CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_FAILED:
        out->outcome = JOB_FAILED;
        out->error = mem_strdup(s->summary_error != NULL ? s->summary_error : "");
        break;
    case CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_PENDING:
        out->outcome = JOB_BUSY;
        if (env->max_attempts > 0 && s->summary_attempts >= env->max_attempts)
            out->error = mem_asprintf("no attempt left (%d made); the sweep marks it failed",
                                      (int)s->summary_attempts);
        else
            out->lease_conflict = 1;
        if (out->error == NULL && s->summary_error != NULL && s->summary_error[0])
            out->error = mem_strdup(s->summary_error);
        break;
    default:
        out->outcome = JOB_NOT_ENDED;
        break;
    }
}

void job_run(const job_env *env, bcall_scope *sc, const char *session_id, job_result *out)
{
    memset(out, 0, sizeof *out);
    job j = {.env = env, .sc = sc, .session_id = session_id};
    ProtobufCMessage *resp = NULL;
    char *msg = NULL, *err = NULL, *summary = NULL, *reason = NULL;
    summ *sm = NULL;
    int64_t t0 = rpc_now_ms();

    Convo__V1__ClaimSummaryRequest creq = CONVO__V1__CLAIM_SUMMARY_REQUEST__INIT;
    creq.session_id = (char *)session_id;
    creq.worker_id = (char *)env->worker_id;
    creq.lease_seconds = env->lease_seconds;
    creq.max_attempts = env->max_attempts;
    rpc_code code = bcall_unary(sc, env->store, &convo__v1__store__claim_summary__method,
                                &creq.base, env->store_timeout_ms, &resp, &msg);
    if (code != RPC_OK) {
        out->outcome = JOB_ERROR;
        out->code = code;
        out->error = call_error("store-svc ClaimSummary", code, msg);
        log_fields(code == RPC_NOT_FOUND ? LOG_INFO : LOG_WARN, NULL, "%s", out->error);
        goto out;
    }
    const Convo__V1__ClaimSummaryResponse *cr = (const Convo__V1__ClaimSummaryResponse *)resp;
    if (cr->session == NULL) {
        out->outcome = JOB_ERROR;
        out->code = RPC_INTERNAL;
        out->error = mem_strdup("store-svc ClaimSummary answered without the session");
        log_error("%s", out->error);
        goto out;
    }
    out->attempts = cr->session->summary_attempts;
    if (!cr->claimed) {
        from_session(env, cr->session, out);
        log_debug("not claimed: summary %s", job_outcome_name(out->outcome));
        goto out;
    }
    out->claimed = 1;
    int64_t lease_ms = (int64_t)env->lease_seconds * 1000;
    int64_t margin = lease_ms / 10 < LEASE_MARGIN_MAX_MS ? lease_ms / 10 : LEASE_MARGIN_MAX_MS;
    j.lease_end_ms = t0 + lease_ms - margin;
    log_info("claimed the summary (attempt %d of %d, %lld events stored)", (int)out->attempts,
             (int)env->max_attempts, (long long)cr->session->event_count);

    uint64_t nevents = 0;
    sm = summ_new(env->budget, call_model, &j);
    if (read_events(&j, sm, &nevents, &err) == 0) {
        int rc = summ_finish(sm, &summary);
        if (rc == SUMM_EEMPTY)
            summary = mem_strdup(SUMM_EMPTY_TEXT);
        else if (rc != 0)
            err = mem_strdup(summ_error(sm));
    }
    const summ_stats *st = summ_get_stats(sm);
    out->model_calls = j.model_calls;
    out->llm_unreachable = j.llm_unreachable;
    if (summary == NULL && err == NULL)
        err = mem_strdup("the summarizer stopped without a reason");
    if (summary == NULL && bcall_scope_cancelled(sc)) {
        reason = mem_asprintf("interrupted: summary-svc shut down (%s)", err ? err : "");
        mem_free(err);
        err = reason;
        reason = NULL;
    }

    if (summary != NULL) {
        code = save(&j, CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_DONE, summary, "", &msg);
        if (code == RPC_OK) {
            out->outcome = JOB_DONE;
            out->summary = summary;
            summary = NULL;
            log_info("summary saved: %llu events (%llu messages, %llu replies, %llu tool calls, "
                     "%llu skipped), %llu transcript bytes in %u chunks, %u model calls, %lld ms",
                     (unsigned long long)nevents, (unsigned long long)st->messages,
                     (unsigned long long)st->replies, (unsigned long long)st->tool_calls,
                     (unsigned long long)st->skipped, (unsigned long long)st->bytes, st->chunks,
                     st->calls, (long long)(rpc_now_ms() - t0));
            goto out;
        }
        err = call_error("store-svc SaveSummary", code, msg);
        /* Refused as it is (too long, say): this attempt failed, and says
         * why, like any other failure. Other errors leave the lease to run
         * out. */
        if (code == RPC_INVALID_ARGUMENT) {
            mem_free(summary);
            summary = NULL;
        }
    }
    if (summary == NULL) {
        int last = env->max_attempts > 0 && out->attempts >= env->max_attempts;
        bound_text(err, MAX_REASON_BYTES);
        reason = last ? mem_asprintf("gave up after %d attempt%s; the last one: %s",
                                     (int)out->attempts, out->attempts == 1 ? "" : "s", err)
                      : mem_strdup(err);
        code = save(&j,
                    last ? CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_FAILED
                         : CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_PENDING,
                    "", reason, &msg);
        if (code == RPC_OK) {
            out->outcome = last ? JOB_FAILED : JOB_RETRY;
            out->error = reason;
            reason = NULL;
            log_warn("summary attempt %d of %d failed%s: %s", (int)out->attempts,
                     (int)env->max_attempts, last ? " (the last: marked failed)" : "", err);
            goto out;
        }
        mem_free(err);
        err = call_error("store-svc SaveSummary", code, msg);
    }
    /* The save itself failed. */
    if (code == RPC_FAILED_PRECONDITION) {
        /* Our lease ran out and another worker took the session: its
         * outcome stands. */
        out->outcome = JOB_BUSY;
        out->lease_conflict = 1;
        out->error = mem_strdup("the lease was lost to another worker");
        log_warn("%s (%s)", out->error, err);
    } else {
        out->outcome = JOB_ERROR;
        out->code = code;
        out->error = err;
        err = NULL;
        log_error("%s; the session is summarized again once the lease runs out", out->error);
    }

out:
    if (resp != NULL)
        protobuf_c_message_free_unpacked(resp, NULL);
    summ_free(&sm);
    mem_free(msg);
    mem_free(err);
    mem_free(summary);
    mem_free(reason);
}
