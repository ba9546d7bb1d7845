#include "service.h"

#include "backoff.h"
#include "bcall.h"
#include "check.h"
#include "job.h"
#include "log.h"
#include "mem.h"
#include "summarizer.h"
#include "sweep.h"
#include "trace.h"
#include "workers.h"

#include "convo_methods.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

/* The ticker's period: how late a deadline or a re-check may be noticed. */
#define TICK_MS 50
/* A waiting Summarize is answered PENDING this long before its deadline,
 * so the caller gets an answer rather than DEADLINE_EXCEEDED. */
#define WAIT_MARGIN_MS 250
/* How often a session another replica is summarizing is looked at again
 * for the callers waiting on it. */
#define WATCH_MS 1000
/* Sessions this process failed recently, remembered for their backoff. */
#define RETRY_MEMORY      256
#define HEALTH_TIMEOUT_MS 2000

#define SERVICE_METRICS(X, S)                                                                      \
    X(S, jobs, COUNTER_VEC, "convo_summarizer_jobs_total", "outcome", NULL,                        \
      "summary jobs ended, by outcome (done, failed, retry, busy: not claimed, not_ended, error)") \
    X(S, attempts, COUNTER, "convo_summarizer_attempts_total", "", NULL,                           \
      "summary attempts made here (leases taken; each counts against --max-attempts)")             \
    X(S, lease_conflicts, COUNTER, "convo_summarizer_lease_conflicts_total", "", NULL,             \
      "jobs that found the lease held by another worker, or lost it to one")                       \
    X(S, model_calls, COUNTER, "convo_summarizer_model_calls_total", "", NULL,                     \
      "llm-svc Complete calls made for summaries (chunks and the final one)")                      \
    X(S, in_progress, GAUGE, "convo_summarizer_sessions_in_progress", "", NULL,                    \
      "sessions queued or being summarized here")                                                  \
    X(S, backlog, GAUGE, "convo_summarizer_backlog_sessions", "", NULL,                            \
      "ended sessions without a summary and without a live lease that the last sweep found (at "   \
      "most --sweep-batch): waiting for a worker or for their retry")
METRICS_DECLARE(service_metrics, SERVICE_METRICS)

typedef enum entry_state { ENTRY_QUEUED, ENTRY_RUNNING, ENTRY_WATCH } entry_state;

/* A session in progress here: queued, being summarized, or (for callers
 * waiting on it) watched while another replica holds its lease. */
typedef struct entry {
    char *session_id;
    entry_state state;
    int nwaiters;
    int64_t retry_at_ms; /* ENTRY_WATCH: when to look again */
    bcall_scope *sc;     /* the job's calls, cancelled at shutdown */
    trace_ctx origin;    /* the span that filed it (a Summarize call's); empty: the sweep */
    struct service *sv;
    struct entry *next;
} entry;

/* A Summarize(wait=true) call waiting for its session's entry. */
typedef struct waiter {
    srv_call *call;
    entry *e;
    int64_t deadline_ms; /* monotonic; INT64_MAX for none */
    struct waiter *prev, *next;
} waiter;

typedef struct retry_slot {
    char id[CHECK_ID_MAX + 1];
    int64_t not_before_ms;
} retry_slot;

struct service {
    service_opts o;
    cli_channel *store, *llm;
    workers *workers;
    job_env env;
    char worker_id[CHECK_ID_MAX + 1];
    sweep *sweep;

    pthread_mutex_t mu; /* everything below */
    entry *entries;
    size_t nentries;
    waiter *waiters;
    int stopping;
    retry_slot retry[RETRY_MEMORY];
    size_t retry_next;

    pthread_t ticker;
    int ticker_started;
    atomic_int ticker_stop;
    atomic_int llm_suspect; /* a model call found llm-svc unreachable */

    /* Counters, logged at shutdown. */
    atomic_ullong n_summarize, n_coalesced, n_queue_full, n_model_calls;
    atomic_ullong n_outcome[JOB_ERROR + 1];
    service_metrics mx;
    metrics_counter *outcome_mx[JOB_ERROR + 1];
    otlp *exp; /* NULL: job spans not recorded */
};

/* ---- options -------------------------------------------------------------- */

int service_check_opts(const service_opts *o, char *err, size_t errsize)
{
    if (o->sweep_interval_ms > 0 && o->sweep_interval_ms < 100) {
        snprintf(err, errsize, "--sweep-interval-ms must be 0 (no sweep) or at least 100");
        return -1;
    }
    return 0;
}

/* ---- ids and answers ------------------------------------------------------ */

static void reply(srv_call *call, Convo__V1__SummaryStatus status, const char *summary,
                  const char *error)
{
    Convo__V1__SummarizeResponse r = CONVO__V1__SUMMARIZE_RESPONSE__INIT;
    r.status = status;
    r.summary = (char *)(summary != NULL ? summary : "");
    r.error = (char *)(error != NULL ? error : "");
    srv_call_finish(call, RPC_OK, NULL, &r.base);
}

/* A job's outcome as a Summarize answer. */
static void reply_result(srv_call *call, const job_result *r)
{
    switch (r->outcome) {
    case JOB_DONE:
        reply(call, CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_DONE, r->summary, NULL);
        break;
    case JOB_FAILED:
        reply(call, CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_FAILED, NULL, r->error);
        break;
    case JOB_RETRY:
    case JOB_BUSY:
        reply(call, CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_PENDING, NULL, r->error);
        break;
    case JOB_NOT_ENDED:
        srv_call_finish(call, RPC_FAILED_PRECONDITION,
                        "the session has not ended; it is summarized once it ends", NULL);
        break;
    case JOB_ERROR:
        srv_call_finish(call, r->code != RPC_OK ? r->code : RPC_INTERNAL, r->error, NULL);
        break;
    }
}

/* ---- entries, waiters, retry memory (sv->mu held) ------------------------- */

static entry *entry_find(service *sv, const char *id)
{
    for (entry *e = sv->entries; e != NULL; e = e->next)
        if (strcmp(e->session_id, id) == 0)
            return e;
    return NULL;
}

static entry *entry_new(service *sv, const char *id)
{
    entry *e = mem_calloc(1, sizeof *e);
    e->session_id = mem_strdup(id);
    e->sc = bcall_scope_new();
    e->sv = sv;
    e->state = ENTRY_QUEUED;
    const trace_span *by = trace_current();
    if (by != NULL)
        e->origin = by->ctx;
    return e;
}

static void entry_free(entry *e)
{
    bcall_scope_free(&e->sc);
    mem_free(e->session_id);
    mem_free(e);
}

static void entry_unlink(service *sv, entry *e)
{
    for (entry **p = &sv->entries; *p != NULL; p = &(*p)->next) {
        if (*p == e) {
            *p = e->next;
            sv->nentries--;
            metrics_gauge_set(sv->mx.in_progress, (int64_t)sv->nentries);
            return;
        }
    }
}

static void waiter_link(service *sv, waiter *w)
{
    w->prev = NULL;
    w->next = sv->waiters;
    if (sv->waiters != NULL)
        sv->waiters->prev = w;
    sv->waiters = w;
    w->e->nwaiters++;
}

static void waiter_unlink(service *sv, waiter *w)
{
    if (w->prev != NULL)
        w->prev->next = w->next;
    else
        sv->waiters = w->next;
    if (w->next != NULL)
        w->next->prev = w->prev;
    w->e->nwaiters--;
    w->prev = w->next = NULL;
}

static retry_slot *retry_find(service *sv, const char *id)
{
    for (size_t i = 0; i < RETRY_MEMORY; i++)
        if (sv->retry[i].id[0] != '\0' && strcmp(sv->retry[i].id, id) == 0)
            return &sv->retry[i];
    return NULL;
}

/* Remembers a failure here; the oldest memory makes room (a forgotten
 * session still has the sweep's own backoff from its end time). */
static void retry_remember(service *sv, const char *id, int64_t not_before_ms)
{
    retry_slot *s = retry_find(sv, id);
    if (s == NULL) {
        s = &sv->retry[sv->retry_next];
        sv->retry_next = (sv->retry_next + 1) % RETRY_MEMORY;
        snprintf(s->id, sizeof s->id, "%s", id);
    }
    s->not_before_ms = not_before_ms;
}

static void retry_forget(service *sv, const char *id)
{
    retry_slot *s = retry_find(sv, id);
    if (s != NULL)
        s->id[0] = '\0';
}

/* ---- jobs ----------------------------------------------------------------- */

static void run_entry(void *arg);

/* Files a session and queues its job. Returns the entry (new or already
 * there; *fresh says which), or NULL when the queue is full or the service
 * stopping (*err_code says which). sv->mu held. */
static entry *file_session(service *sv, const char *id, int *fresh, rpc_code *err_code)
{
    *fresh = 0;
    if (sv->stopping) {
        *err_code = RPC_UNAVAILABLE;
        return NULL;
    }
    entry *e = entry_find(sv, id);
    if (e != NULL)
        return e;
    e = entry_new(sv, id);
    if (workers_submit(sv->workers, run_entry, e) != 0) {
        entry_free(e);
        *err_code = RPC_RESOURCE_EXHAUSTED;
        return NULL;
    }
    e->next = sv->entries;
    sv->entries = e;
    sv->nentries++;
    metrics_gauge_set(sv->mx.in_progress, (int64_t)sv->nentries);
    *fresh = 1;
    return e;
}

/* The worker side of an entry: runs the job, then answers everyone
 * waiting on it, or keeps watching when another replica has the session. */
static void run_entry(void *arg)
{
    entry *e = arg;
    service *sv = e->sv;
    job_result r;

    pthread_mutex_lock(&sv->mu);
    e->state = ENTRY_RUNNING;
    int stopping = sv->stopping;
    pthread_mutex_unlock(&sv->mu);

    /* The job's calls to store-svc and llm-svc are its span's children. */
    trace_span span;
    trace_span_start(&span, sv->exp, "summarize session", TRACE_INTERNAL, &e->origin, NULL);
    trace_span_set_str(&span, "convo.session_id", e->session_id);
    trace_set_current(&span);
    log_context_set(NULL, e->session_id);
    if (stopping) {
        memset(&r, 0, sizeof r);
        r.outcome = JOB_ERROR;
        r.code = RPC_UNAVAILABLE;
        r.error = mem_strdup("summary-svc is shutting down");
    } else {
        job_run(&sv->env, e->sc, e->session_id, &r);
    }
    log_context_set(NULL, NULL);
    trace_set_current(NULL);
    trace_span_set_str(&span, "convo.summary.outcome", job_outcome_name(r.outcome));
    if (r.outcome == JOB_ERROR || r.outcome == JOB_FAILED)
        trace_span_error(&span, "%s", r.error != NULL ? r.error : job_outcome_name(r.outcome));
    trace_span_end(&span);
    atomic_fetch_add(&sv->n_outcome[r.outcome], 1);
    atomic_fetch_add(&sv->n_model_calls, r.model_calls);
    metrics_counter_inc(sv->outcome_mx[r.outcome]);
    metrics_counter_add(sv->mx.model_calls, r.model_calls);
    metrics_counter_add(sv->mx.attempts, (uint64_t)r.claimed);
    metrics_counter_add(sv->mx.lease_conflicts, (uint64_t)r.lease_conflict);
    if (r.llm_unreachable)
        atomic_store(&sv->llm_suspect, 1);

    waiter *done = NULL;
    int64_t now = rpc_now_ms();
    pthread_mutex_lock(&sv->mu);
    /* The sweep's schedule (sweep_due_us), without jitter. */
    if (r.outcome == JOB_RETRY)
        retry_remember(
            sv, e->session_id,
            now + backoff_ceiling(sv->o.retry_backoff_ms, sv->o.retry_backoff_max_ms, r.attempts));
    else if (r.outcome == JOB_DONE || r.outcome == JOB_FAILED)
        retry_forget(sv, e->session_id);
    if (r.outcome == JOB_BUSY && e->nwaiters > 0 && !sv->stopping &&
        r.attempts < sv->env.max_attempts) {
        /* Another replica works on it: its outcome is what the callers
         * want, so look again soon (a claim is cheap and takes over if
         * that replica gives up). */
        e->state = ENTRY_WATCH;
        e->retry_at_ms = now + WATCH_MS;
        pthread_mutex_unlock(&sv->mu);
        job_result_clear(&r);
        return;
    }
    for (waiter *w = sv->waiters, *next; w != NULL; w = next) {
        next = w->next;
        if (w->e == e) {
            waiter_unlink(sv, w);
            w->next = done;
            done = w;
        }
    }
    entry_unlink(sv, e);
    pthread_mutex_unlock(&sv->mu);

    while (done != NULL) {
        waiter *w = done;
        done = w->next;
        reply_result(w->call, &r);
        mem_free(w);
    }
    entry_free(e);
    job_result_clear(&r);
}

/* ---- handlers ------------------------------------------------------------- */

static void on_waiter_cancel(srv_call *call)
{
    service *sv = srv_call_method_data(call);
    waiter *found = NULL;
    pthread_mutex_lock(&sv->mu);
    /* Found by the call, not through srv_call_data: a job may have
     * answered and freed the waiter a moment ago. */
    for (waiter *w = sv->waiters; w != NULL; w = w->next) {
        if (w->call == call) {
            waiter_unlink(sv, w);
            found = w;
            break;
        }
    }
    pthread_mutex_unlock(&sv->mu);
    if (found != NULL) {
        srv_call_finish(call, RPC_CANCELLED, "cancelled", NULL);
        mem_free(found);
    }
}

static void on_summarize(srv_call *call, const ProtobufCMessage *msg)
{
    service *sv = srv_call_method_data(call);
    const Convo__V1__SummarizeRequest *req = (const Convo__V1__SummarizeRequest *)msg;
    char err[160];
    if (check_id("session_id", req->session_id, err, sizeof err) != 0) {
        srv_call_finish(call, RPC_INVALID_ARGUMENT, err, NULL);
        return;
    }
    atomic_fetch_add(&sv->n_summarize, 1);
    waiter *w = NULL;
    if (req->wait) {
        int64_t left = srv_call_remaining_ms(call);
        w = mem_calloc(1, sizeof *w);
        w->call = call;
        w->deadline_ms = left == INT64_MAX ? INT64_MAX : rpc_now_ms() + left;
    }
    int fresh;
    rpc_code code = RPC_OK;
    size_t queued = 0;
    pthread_mutex_lock(&sv->mu);
    entry *e = file_session(sv, req->session_id, &fresh, &code);
    if (e != NULL && w != NULL) {
        w->e = e;
        waiter_link(sv, w);
        srv_call_on_cancel(call, on_waiter_cancel);
    }
    if (e == NULL)
        queued = sv->nentries;
    pthread_mutex_unlock(&sv->mu);

    if (e != NULL && !fresh)
        atomic_fetch_add(&sv->n_coalesced, 1);
    if (e == NULL) {
        mem_free(w);
        if (code == RPC_RESOURCE_EXHAUSTED) {
            atomic_fetch_add(&sv->n_queue_full, 1);
            log_warn("job queue full (%zu sessions in progress): %s", queued,
                     req->wait ? "Summarize(wait) refused" : "left to the sweep");
            if (req->wait)
                srv_call_finishf(call, RPC_RESOURCE_EXHAUSTED,
                                 "%zu sessions are already waiting to be summarized; try again "
                                 "later (the sweep will summarize this one anyway)",
                                 queued);
            else
                reply(call, CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_PENDING, NULL, NULL);
        } else {
            srv_call_finish(call, RPC_UNAVAILABLE, "summary-svc is shutting down", NULL);
        }
        return;
    }
    log_debug("Summarize%s: %s", req->wait ? " (wait)" : "",
              fresh ? "queued" : "joined the summary in progress");
    if (!req->wait)
        reply(call, CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_PENDING, NULL, NULL);
}

static void on_get_session_done(void *arg, rpc_code code, const char *message,
                                ProtobufCMessage *resp)
{
    srv_call *call = arg;
    if (code != RPC_OK) {
        if (code == RPC_NOT_FOUND)
            srv_call_finish(call, RPC_NOT_FOUND, message != NULL ? message : "no such session",
                            NULL);
        else
            srv_call_finishf(call, code, "store-svc GetSession: %s",
                             message != NULL ? message : rpc_code_name(code));
        return;
    }
    const Convo__V1__Session *s = ((const Convo__V1__GetSessionResponse *)resp)->session;
    Convo__V1__GetSummaryResponse r = CONVO__V1__GET_SUMMARY_RESPONSE__INIT;
    if (s != NULL) {
        r.session_id = s->session_id;
        r.status = s->summary_status;
        if (s->summary_status == CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_DONE)
            r.summary = s->final_summary;
        r.error = s->summary_error;
        r.attempts = s->summary_attempts;
    }
    srv_call_finish(call, RPC_OK, NULL, &r.base);
    protobuf_c_message_free_unpacked(resp, NULL);
}

/* One asynchronous GetSession: the store is the truth for every replica. */
static void on_get_summary(srv_call *call, const ProtobufCMessage *msg)
{
    service *sv = srv_call_method_data(call);
    const Convo__V1__GetSummaryRequest *req = (const Convo__V1__GetSummaryRequest *)msg;
    char err[160];
    if (check_id("session_id", req->session_id, err, sizeof err) != 0) {
        srv_call_finish(call, RPC_INVALID_ARGUMENT, err, NULL);
        return;
    }
    int64_t left = srv_call_remaining_ms(call);
    int64_t timeout = sv->o.store_timeout_ms < left ? sv->o.store_timeout_ms : left;
    if (timeout <= 0) {
        srv_call_finish(call, RPC_DEADLINE_EXCEEDED, "no time left to ask store-svc", NULL);
        return;
    }
    Convo__V1__GetSessionRequest sreq = CONVO__V1__GET_SESSION_REQUEST__INIT;
    sreq.session_id = req->session_id;
    cli_opts o = {.timeout_ms = timeout, .request_id = srv_call_request_id(call)};
    int rc = cli_unary(sv->store, &convo__v1__store__get_session__method, &sreq.base, &o,
                       on_get_session_done, call, NULL);
    if (rc != 0)
        srv_call_finishf(call, RPC_UNAVAILABLE, "cannot ask store-svc: %s", rpc_strerror(rc));
}

/* ---- ticker --------------------------------------------------------------- */

typedef struct leaving {
    waiter *w;
    int cancelled;
    struct leaving *next;
} leaving;

/* Answers waiters whose deadline nears (PENDING) or whose caller left, and
 * re-checks watched sessions. */
static void tick(service *sv)
{
    waiter *pending = NULL, *gone = NULL;
    entry *dropped = NULL;
    int64_t now = rpc_now_ms();
    pthread_mutex_lock(&sv->mu);
    for (waiter *w = sv->waiters, *next; w != NULL; w = next) {
        next = w->next;
        int cancelled = srv_call_cancelled(w->call);
        if (!cancelled && (w->deadline_ms == INT64_MAX || now + WAIT_MARGIN_MS < w->deadline_ms))
            continue;
        waiter_unlink(sv, w);
        waiter **list = cancelled ? &gone : &pending;
        w->next = *list;
        *list = w;
    }
    for (entry *e = sv->entries, *next; e != NULL; e = next) {
        next = e->next;
        if (e->state != ENTRY_WATCH || now < e->retry_at_ms)
            continue;
        if (e->nwaiters == 0 || sv->stopping) {
            entry_unlink(sv, e);
            e->next = dropped;
            dropped = e;
        } else if (workers_submit(sv->workers, run_entry, e) == 0) {
            e->state = ENTRY_QUEUED;
        } else {
            e->retry_at_ms = now + WATCH_MS;
        }
    }
    pthread_mutex_unlock(&sv->mu);

    while (pending != NULL) {
        waiter *w = pending;
        pending = w->next;
        reply(w->call, CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_PENDING, NULL,
              "still in progress at the call's deadline");
        mem_free(w);
    }
    while (gone != NULL) {
        waiter *w = gone;
        gone = w->next;
        srv_call_finish(w->call, RPC_CANCELLED, "cancelled", NULL);
        mem_free(w);
    }
    while (dropped != NULL) {
        entry *e = dropped;
        dropped = e->next;
        entry_free(e);
    }
}

static void *ticker_main(void *arg)
{
    service *sv = arg;
    while (!atomic_load(&sv->ticker_stop)) {
        usleep(TICK_MS * 1000);
        tick(sv);
    }
    return NULL;
}

/* ---- sweep hooks ---------------------------------------------------------- */

static int hook_room(void *arg)
{
    service *sv = arg;
    long long busy = (long long)workers_busy(sv->workers);
    return busy < sv->o.workers ? (int)(sv->o.workers - busy) : 0;
}

static int hook_llm_ok(void *arg)
{
    service *sv = arg;
    if (!atomic_load(&sv->llm_suspect))
        return 1;
    Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    req.service = "";
    ProtobufCMessage *resp = NULL;
    rpc_code code = bcall_unary(NULL, sv->llm, &grpc__health__v1__health__check__method, &req.base,
                                HEALTH_TIMEOUT_MS, &resp, NULL);
    int ok = code == RPC_OK && ((Grpc__Health__V1__HealthCheckResponse *)resp)->status ==
                                   GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
    if (resp != NULL)
        protobuf_c_message_free_unpacked(resp, NULL);
    if (ok)
        atomic_store(&sv->llm_suspect, 0);
    return ok;
}

static int hook_may_retry(void *arg, const char *id)
{
    service *sv = arg;
    pthread_mutex_lock(&sv->mu);
    retry_slot *s = retry_find(sv, id);
    int ok = s == NULL || rpc_now_ms() >= s->not_before_ms;
    pthread_mutex_unlock(&sv->mu);
    return ok;
}

static void hook_listed(void *arg, size_t pending)
{
    service *sv = arg;
    metrics_gauge_set(sv->mx.backlog, (int64_t)pending);
}

static int hook_submit(void *arg, const char *id)
{
    service *sv = arg;
    int fresh;
    rpc_code code;
    char err[160];
    if (check_id("session_id", id, err, sizeof err) != 0)
        return 1; /* not ours to summarize (cannot come from our store) */
    pthread_mutex_lock(&sv->mu);
    entry *e = file_session(sv, id, &fresh, &code);
    pthread_mutex_unlock(&sv->mu);
    if (e == NULL)
        return -1;
    return fresh ? 0 : 1;
}

/* ---- life ----------------------------------------------------------------- */

/* Unique per run, and a valid id for the store ([A-Za-z0-9._-]{1,128}):
 * the host name (sanitized), the pid and 32 random bits, so that a
 * restarted process never mistakes an old lease of its predecessor for its
 * own. */
static void make_worker_id(char *out, size_t size)
{
    char host[64] = "host";
    gethostname(host, sizeof host - 1);
    host[sizeof host - 1] = '\0';
    for (char *p = host; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
              *p == '.' || *p == '_' || *p == '-'))
            *p = '-';
    uint32_t rnd = 0;
    if (getrandom(&rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd)
        rnd = (uint32_t)rpc_now_ms() ^ (uint32_t)getpid() * 2654435761u;
    snprintf(out, size, "summary-svc.%s.%d.%08x", host, (int)getpid(), rnd);
}

service *service_create(const service_opts *o, cli *c, int round_robin, metrics *m, otlp *exp,
                        char *err, size_t errsize)
{
    /* Sent again to another replica when one fails them UNAVAILABLE before
     * answering (cli.h): the reads and the model call. Never ClaimSummary
     * or SaveSummary: a claim or save the dead replica made would be
     * refused the second time as another's lease. */
    static const rpc_method *const store_retry[] = {
        &convo__v1__store__get_session__method, &convo__v1__store__list_events__method,
        &convo__v1__store__list_unsummarized_sessions__method, NULL};
    static const rpc_method *const llm_retry[] = {&convo__v1__llm__complete__method, NULL};
    char why[400];
    cli_channel *store =
        cli_channel_create(c, o->store, "store-svc", round_robin, store_retry, why, sizeof why);
    if (store == NULL) {
        snprintf(err, errsize, "--store: %s", why);
        return NULL;
    }
    cli_channel *llm =
        cli_channel_create(c, o->llm, "llm-svc", round_robin, llm_retry, why, sizeof why);
    if (llm == NULL) {
        snprintf(err, errsize, "--llm: %s", why);
        return NULL;
    }
    service *sv = mem_calloc(1, sizeof *sv);
    sv->o = *o;
    sv->exp = exp;
    metrics_register(m, METRICS_SECTION(service_metrics, &sv->mx));
    for (int i = 0; i <= JOB_ERROR; i++)
        sv->outcome_mx[i] =
            metrics_counter_of(sv->mx.jobs, (const char *[]){job_outcome_name((job_outcome)i)});
    sv->store = store;
    sv->llm = llm;
    make_worker_id(sv->worker_id, sizeof sv->worker_id);
    pthread_mutex_init(&sv->mu, NULL);
    sv->env = (job_env){
        .store = sv->store,
        .llm = sv->llm,
        .worker_id = sv->worker_id,
        .lease_seconds = (int32_t)o->lease_seconds,
        .max_attempts = (int32_t)o->max_attempts,
        .budget = (size_t)o->context_budget_bytes,
        .store_timeout_ms = o->store_timeout_ms,
        .llm_timeout_ms = o->llm_timeout_ms,
        .model = o->model,
        .page_events = o->page_events,
    };
    sv->workers = workers_create((int)o->workers, (size_t)o->queue_size);
    return sv;
}

int service_register(service *sv, srv *s)
{
    static const srv_method summarize = {
        .method = &convo__v1__summary__summarize__method,
        .on_call = on_summarize,
        .callers = "gateway",
    };
    static const srv_method get_summary = {
        .method = &convo__v1__summary__get_summary__method,
        .on_call = on_get_summary,
        /* Reads only: an operator's `admin` certificate too. */
        .callers = "gateway admin",
    };
    int rc = srv_add_method(s, &summarize, sv);
    return rc != 0 ? rc : srv_add_method(s, &get_summary, sv);
}

void service_start(service *sv)
{
    int rc = pthread_create(&sv->ticker, NULL, ticker_main, sv);
    if (rc != 0) {
        log_error("cannot start the ticker thread: error %d", rc);
        abort();
    }
    sv->ticker_started = 1;
    if (sv->o.sweep_interval_ms > 0) {
        sweep_cfg cfg = {
            .interval_ms = sv->o.sweep_interval_ms,
            .delay_ms = sv->o.sweep_delay_ms,
            .backoff_ms = sv->o.retry_backoff_ms,
            .backoff_max_ms = sv->o.retry_backoff_max_ms,
            .max_attempts = (int32_t)sv->o.max_attempts,
            .batch = (uint32_t)sv->o.sweep_batch,
            .store_timeout_ms = sv->o.store_timeout_ms,
            .worker_id = sv->worker_id,
        };
        sweep_hooks hooks = {hook_room, hook_llm_ok, hook_may_retry, hook_submit, sv, hook_listed};
        sv->sweep = sweep_start(&cfg, sv->store, &hooks);
    }
    log_info("worker id %s: %lld workers, queue %lld, lease %lld s, %lld attempts, context "
             "budget %lld bytes, sweep every %lld ms",
             sv->worker_id, sv->o.workers, sv->o.queue_size, sv->o.lease_seconds,
             sv->o.max_attempts, sv->o.context_budget_bytes, sv->o.sweep_interval_ms);
}

void service_stop(service *sv)
{
    pthread_mutex_lock(&sv->mu);
    sv->stopping = 1;
    for (entry *e = sv->entries; e != NULL; e = e->next)
        bcall_scope_cancel(e->sc);
    pthread_mutex_unlock(&sv->mu);

    sweep_stop(&sv->sweep);
    if (sv->ticker_started) {
        atomic_store(&sv->ticker_stop, 1);
        pthread_join(sv->ticker, NULL);
        sv->ticker_started = 0;
    }
    /* Queued jobs run and end at once (stopping); running ones were
     * cancelled and release their leases. */
    workers_destroy(&sv->workers);

    /* What is left: watched entries and their waiters. */
    pthread_mutex_lock(&sv->mu);
    waiter *ws = sv->waiters;
    sv->waiters = NULL;
    entry *es = sv->entries;
    sv->entries = NULL;
    sv->nentries = 0;
    pthread_mutex_unlock(&sv->mu);
    while (ws != NULL) {
        waiter *w = ws;
        ws = w->next;
        srv_call_finish(w->call, RPC_UNAVAILABLE, "summary-svc is shutting down", NULL);
        mem_free(w);
    }
    while (es != NULL) {
        entry *e = es;
        es = e->next;
        entry_free(e);
    }
    log_info("summary-svc: %llu Summarize calls (%llu joined one in progress, %llu found the "
             "queue full); jobs: %llu done, %llu failed, %llu to retry, %llu held elsewhere, "
             "%llu errors; %llu model calls",
             (unsigned long long)sv->n_summarize, (unsigned long long)sv->n_coalesced,
             (unsigned long long)sv->n_queue_full, (unsigned long long)sv->n_outcome[JOB_DONE],
             (unsigned long long)sv->n_outcome[JOB_FAILED],
             (unsigned long long)sv->n_outcome[JOB_RETRY],
             (unsigned long long)sv->n_outcome[JOB_BUSY],
             (unsigned long long)sv->n_outcome[JOB_ERROR], (unsigned long long)sv->n_model_calls);
}

void service_destroy(service **svp)
{
    service *sv = *svp;
    if (sv == NULL)
        return;
    if (sv->workers != NULL)
        service_stop(sv);
    pthread_mutex_destroy(&sv->mu);
    mem_free(sv);
    *svp = NULL;
}
