#include "store.h"

#include "check.h"

#include "db.h"
#include "log.h"
#include "mem.h"
#include "trace.h"

#include "convo_methods.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* db.h mirrors the proto enums' numbers so that values cross by a cast;
 * a number changed on one side only stops the build here. */
#define SAME_NUMBER(db, pb) _Static_assert((int)(db) == (int)(pb), #db " is not " #pb)
SAME_NUMBER(DB_EVENT_USER_MESSAGE, CONVO__V1__EVENT_TYPE__EVENT_TYPE_USER_MESSAGE);
SAME_NUMBER(DB_EVENT_AI_TOKEN, CONVO__V1__EVENT_TYPE__EVENT_TYPE_AI_TOKEN);
SAME_NUMBER(DB_EVENT_TOOL_CALL, CONVO__V1__EVENT_TYPE__EVENT_TYPE_TOOL_CALL);
SAME_NUMBER(DB_EVENT_TOOL_RESULT, CONVO__V1__EVENT_TYPE__EVENT_TYPE_TOOL_RESULT);
SAME_NUMBER(DB_EVENT_SYSTEM_EVENT, CONVO__V1__EVENT_TYPE__EVENT_TYPE_SYSTEM_EVENT);
SAME_NUMBER(DB_EVENT_MAX, DB_EVENT_SYSTEM_EVENT);
SAME_NUMBER(DB_SUMMARY_UNKNOWN, CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_UNSPECIFIED);
SAME_NUMBER(DB_SUMMARY_NONE, CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_NONE);
SAME_NUMBER(DB_SUMMARY_PENDING, CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_PENDING);
SAME_NUMBER(DB_SUMMARY_DONE, CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_DONE);
SAME_NUMBER(DB_SUMMARY_FAILED, CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_FAILED);

/* List limits: the contract's defaults, and caps that keep one response
 * (and the rows behind it) small. */
#define USER_SESSIONS_DEFAULT   10
#define USER_SESSIONS_MAX       100
#define UNSUMMARIZED_DEFAULT    100
#define UNSUMMARIZED_MAX        1000
#define LEASE_DEFAULT_S         300
#define LEASE_MAX_S             86400
#define LIVE_MAX_S              86400
#define ABANDONED_DEFAULT       100
#define ABANDONED_MAX           1000
#define RESPONSE_HEADROOM_BYTES 65536

#define STORE_METRICS(X, S)                                                                        \
    X(S, appended, COUNTER, "convo_store_events_appended_total", "", NULL,                         \
      "events written to the event log")                                                           \
    X(S, duplicates, COUNTER, "convo_store_events_duplicate_total", "", NULL,                      \
      "events sent again that were stored already (a caller's retry; skipped)")                    \
    X(S, conflicts, COUNTER, "convo_store_events_conflict_total", "", NULL,                        \
      "events not written: their seq is stored with another type or content (two writers)")        \
    X(S, stale, COUNTER, "convo_store_stale_writes_total", "", NULL,                               \
      "AppendEvents, EndSession and OpenSession calls refused: their writer epoch was taken over") \
    X(S, batch, HISTOGRAM, "convo_store_append_batch_events", "", &metrics_buckets_count,          \
      "events per AppendEvents call")                                                              \
    X(S, abandoned, COUNTER, "convo_store_sessions_abandoned_total", "", NULL,                     \
      "live sessions ended because their gateway stopped keeping them alive (it died)")            \
    X(S, page_waits, COUNTER, "convo_store_list_page_waits_total", "", NULL,                       \
      "ListEvents pages that waited because --list-pages-max pages were held")                     \
    X(S, pages_held, GAUGE, "convo_store_list_pages_held", "", NULL,                               \
      "ListEvents pages being read or sent now (at most --list-pages-max)")
METRICS_DECLARE(store_metrics, STORE_METRICS)

typedef struct lstream lstream;

struct store {
    srv *s;
    pool *pool;
    store_limits lim;
    store_metrics mx;
    /* ListEvents' page budget: pages held (being read or sent) and the
     * streams waiting for one, oldest first (lstream.next_waiter). */
    pthread_mutex_t pages_mu;
    long long pages_held;
    lstream *waiters, *waiters_tail;
};

/* ---- checks --------------------------------------------------------------- */

static int check_time(const char *field, int64_t us, char *err, size_t errsize)
{
    if (us < 0 || us > STORE_MAX_TIME_US) {
        snprintf(err, errsize, "%s is %lld, outside 0 to %lld (microseconds since the epoch)",
                 field, (long long)us, STORE_MAX_TIME_US);
        return -1;
    }
    return 0;
}

static int check_epoch(int64_t epoch, char *err, size_t errsize)
{
    if (epoch < 0) {
        snprintf(err, errsize,
                 "writer_epoch is %lld; it must be >= 0 (0: not checked; else the one "
                 "OpenSession returned)",
                 (long long)epoch);
        return -1;
    }
    return 0;
}

/* protobuf-c gives unset strings as "", but a message built by hand may
 * hold NULL. */
static const char *str(const char *s)
{
    return s != NULL ? s : "";
}

/* ---- jobs ------------------------------------------------------------------ */

/* The part every job shares; pool_job first so the pool's pointer is ours. */
typedef struct job {
    pool_job pj;
    srv_call *call;
    store *st;
    const char *op;   /* the method's name, for its database span */
    char *session_id; /* for errors and log lines; may be "" */
    int64_t epoch;    /* the writer epoch the call names (0: none), for errors */
    trace_span db;    /* the database work: a child of the call's span */
} job;

static void *job_new(size_t size, srv_call *call, store *st, const char *op, const char *session_id,
                     pool_job_fn fn)
{
    job *j = mem_calloc(1, size);
    j->pj.fn = fn;
    j->pj.bytes = size;
    j->call = call;
    j->st = st;
    j->op = op;
    j->session_id = mem_strdup(session_id);
    return j;
}

static void job_free(job *j)
{
    trace_span_end(&j->db); /* ended with the call already; this only frees */
    mem_free(j->session_id);
    mem_free(j);
}

/* On a worker: the job's log lines name its call, session and span (the
 * database span once it started, else the call's). */
static void job_enter(job *j)
{
    log_context_set(srv_call_request_id(j->call), j->session_id[0] ? j->session_id : NULL);
    trace_set_current(trace_ctx_valid(&j->db.ctx) ? &j->db : srv_call_span(j->call));
}

static void job_leave(void)
{
    log_context_set(NULL, NULL);
    trace_set_current(NULL);
}

/* The job goes to the database: its span starts. */
static void job_start_db(job *j)
{
    char name[64];
    snprintf(name, sizeof name, "db %s", j->op);
    trace_span_child(&j->db, srv_call_span(j->call), name, TRACE_CLIENT);
    trace_span_set_str(&j->db, "db.system", "postgresql");
    trace_span_set_str(&j->db, "db.operation.name", j->op);
    trace_set_current(&j->db);
}

/* Queues the job, or answers the call when the pool refuses it (the job
 * is freed then by `free_fn`). */
static void job_submit(job *j, void (*free_fn)(job *))
{
    int rc = pool_submit(j->st->pool, &j->pj);
    if (rc == 0)
        return;
    if (rc == POOL_EFULL)
        srv_call_finish(j->call, RPC_RESOURCE_EXHAUSTED,
                        "the store's job queue is full; retry with backoff", NULL);
    else
        srv_call_finish(j->call, RPC_UNAVAILABLE, "the store is shutting down; retry", NULL);
    free_fn(j);
}

/* Ends the call from a worker. The log context is cleared first: the
 * request id it points to dies with the call. */
static void job_finish(job *j, rpc_code code, const char *msg, const ProtobufCMessage *resp)
{
    /* A refusal (not found, another user's) is an answer, not a failure. */
    if (code == RPC_UNAVAILABLE || code == RPC_INTERNAL || code == RPC_UNKNOWN)
        trace_span_error(&j->db, "%s: %s", rpc_code_name(code), msg ? msg : "");
    trace_span_end(&j->db);
    job_leave();
    srv_call_finish(j->call, code, msg, resp);
}

static void job_finishf(job *j, rpc_code code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void job_finishf(job *j, rpc_code code, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    job_finish(j, code, buf, NULL);
}

/* The start of every job function: 1 when it should go to the database,
 * 0 when the call was answered already (no connection, shutting down, or
 * the client gave up while the job waited: nothing is written then). */
static int job_begin(job *j, db_conn *conn, int err)
{
    job_enter(j);
    if (err == POOL_ESHUTDOWN) {
        job_finish(j, RPC_UNAVAILABLE, "the store is shutting down; retry", NULL);
        return 0;
    }
    if (err != 0 || conn == NULL) {
        job_finish(j, RPC_UNAVAILABLE, "the database is unavailable; safe to retry", NULL);
        return 0;
    }
    if (srv_call_cancelled(j->call)) {
        job_finish(j, RPC_CANCELLED, "cancelled before it ran", NULL);
        return 0;
    }
    job_start_db(j);
    return 1;
}

/* Answers a database error. DB_ELEASE is answered by its caller. */
static void job_fail(job *j, db_conn *conn, int rc)
{
    switch (rc) {
    case DB_ENOTFOUND:
        job_finishf(j, RPC_NOT_FOUND, "session '%s' not found", j->session_id);
        return;
    case DB_EOWNER:
        job_finishf(j, RPC_PERMISSION_DENIED, "session '%s' belongs to another user",
                    j->session_id);
        return;
    case DB_ESTALE:
        /* The writer learns it lost the session; nothing was written. */
        metrics_counter_inc(j->st->mx.stale);
        log_info("refused a write of a writer the session was taken from (writer_epoch %lld)",
                 (long long)j->epoch);
        job_finishf(j, RPC_FAILED_PRECONDITION,
                    "session '%s' was taken over: another writer opened it after writer_epoch "
                    "%lld; nothing written, stop writing it",
                    j->session_id, (long long)j->epoch);
        return;
    case DB_EENDED:
        job_finishf(j, RPC_FAILED_PRECONDITION,
                    "session '%s' has ended; OpenSession resumes it before more events",
                    j->session_id);
        return;
    case DB_EUNAVAIL:
        log_warn("database unavailable: %s", db_conn_error(conn));
        job_finishf(j, RPC_UNAVAILABLE, "the database is unavailable (%s); safe to retry",
                    db_conn_error(conn));
        return;
    default:
        log_error("database error: %s", db_conn_error(conn));
        job_finishf(j, RPC_INTERNAL, "database error (see the store-svc log, request id %s)",
                    srv_call_request_id(j->call));
        return;
    }
}

static void session_to_pb(const db_session *s, Convo__V1__Session *pb)
{
    convo__v1__session__init(pb);
    /* protobuf-c's string fields are not const; packing never writes. */
    pb->session_id = s->session_id;
    pb->user_id = s->user_id;
    pb->start_time_us = s->start_time_us;
    pb->end_time_us = s->end_time_us;
    pb->duration_seconds = s->duration_seconds;
    pb->final_summary = s->final_summary;
    pb->summary_status = (Convo__V1__SummaryStatus)s->summary_status;
    pb->summary_error = s->summary_error;
    pb->summary_attempts = s->summary_attempts;
    pb->event_count = s->event_count;
    pb->last_seq = s->last_seq;
    pb->user_message_count = s->user_message_count;
    pb->tool_call_count = s->tool_call_count;
    pb->writer_epoch = s->writer_epoch;
}

static void finish_invalid(srv_call *call, const char *err)
{
    srv_call_finish(call, RPC_INVALID_ARGUMENT, err, NULL);
}

/* ---- OpenSession -------------------------------------------------------- */

typedef struct open_job {
    job h;
    char *user_id;
    int32_t live_seconds;
} open_job;

static void open_free(job *h)
{
    open_job *j = (open_job *)h;
    mem_free(j->user_id);
    job_free(h);
}

static void open_run(pool_job *pj, db_conn *conn, int err)
{
    open_job *j = (open_job *)pj;
    db_session s = {0};
    int created = 0;
    if (job_begin(&j->h, conn, err)) {
        int rc = db_open_session(conn, j->h.session_id, j->user_id, j->live_seconds, j->h.epoch, &s,
                                 &created);
        if (rc == 0) {
            Convo__V1__OpenSessionResponse resp = CONVO__V1__OPEN_SESSION_RESPONSE__INIT;
            Convo__V1__Session pb;
            session_to_pb(&s, &pb);
            resp.session = &pb;
            resp.created = created;
            log_debug("%s session for user %s (writer_epoch %lld)", created ? "created" : "resumed",
                      j->user_id, (long long)s.writer_epoch);
            job_finish(&j->h, RPC_OK, NULL, &resp.base);
        } else {
            job_fail(&j->h, conn, rc);
        }
    }
    db_session_clear(&s);
    open_free(&j->h);
}

static void on_open(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__OpenSessionRequest *req = (const Convo__V1__OpenSessionRequest *)msg;
    store *st = srv_call_method_data(call);
    char err[256];
    if (check_id("session_id", str(req->session_id), err, sizeof err) != 0 ||
        check_id("user_id", str(req->user_id), err, sizeof err) != 0) {
        finish_invalid(call, err);
        return;
    }
    if (req->live_seconds < 0 || req->live_seconds > LIVE_MAX_S) {
        snprintf(err, sizeof err, "live_seconds is %d, outside 0 to %d", (int)req->live_seconds,
                 LIVE_MAX_S);
        finish_invalid(call, err);
        return;
    }
    if (check_epoch(req->writer_epoch, err, sizeof err) != 0) {
        finish_invalid(call, err);
        return;
    }
    open_job *j = job_new(sizeof *j, call, st, "OpenSession", req->session_id, open_run);
    j->user_id = mem_strdup(req->user_id);
    j->live_seconds = req->live_seconds;
    j->h.epoch = req->writer_epoch;
    job_submit(&j->h, open_free);
}

/* ---- AppendEvents ------------------------------------------------------- */

typedef struct append_job {
    job h;
    db_batch *batch;
    char *user_id;
} append_job;

static void append_free(job *h)
{
    append_job *j = (append_job *)h;
    db_batch_destroy(&j->batch);
    mem_free(j->user_id);
    job_free(h);
}

/* Answers one AppendEvents call with what the database said. */
static void append_answer(append_job *j, db_conn *conn, int rc, const db_append_result *res)
{
    if (rc != 0) {
        job_fail(&j->h, conn, rc);
        return;
    }
    Convo__V1__AppendEventsResponse resp = CONVO__V1__APPEND_EVENTS_RESPONSE__INIT;
    resp.appended = res->appended;
    resp.duplicates = res->duplicates;
    resp.last_seq = res->last_seq;
    resp.conflicts = res->conflicts;
    metrics_counter_add(j->h.st->mx.appended, res->appended);
    metrics_counter_add(j->h.st->mx.duplicates, res->duplicates);
    metrics_counter_add(j->h.st->mx.conflicts, res->conflicts);
    if (res->conflicts > 0)
        log_warn("append: %u events not written: their seqs are stored with another type or "
                 "content (two writers numbering the same seqs?); %u new, %u already stored",
                 res->conflicts, res->appended, res->duplicates);
    if (res->duplicates > 0)
        log_debug("append: %u new, %u already stored (a retry)", res->appended, res->duplicates);
    job_finish(&j->h, RPC_OK, NULL, &resp.base);
}

static void append_run(pool_job *pj, db_conn *conn, int err)
{
    append_job *j = (append_job *)pj;
    if (job_begin(&j->h, conn, err)) {
        db_append_result res;
        int rc = db_append_events(conn, j->h.session_id, j->user_id, j->h.epoch, j->batch, &res);
        append_answer(j, conn, rc, &res);
    }
    append_free(&j->h);
}

/* Runs calls[0..n) of jobs[] in one statement and answers each; alone when
 * there is one. A statement the server refuses (a bug, or one call's data)
 * is retried call by call, so one bad batch fails only its own call. */
static void append_run_group(append_job **jobs, db_append_call *calls, size_t n, db_conn *conn)
{
    if (n == 1) {
        db_append_result res;
        job_enter(&jobs[0]->h);
        int rc = db_append_events(conn, calls[0].session_id, calls[0].user_id, calls[0].epoch,
                                  calls[0].batch, &res);
        append_answer(jobs[0], conn, rc, &res);
        return;
    }
    int rc = db_append_group(conn, calls, n);
    if (rc == DB_EQUERY && db_conn_ok(conn)) {
        log_warn("a group of %zu appends failed (%s); running them one by one", n,
                 db_conn_error(conn));
        for (size_t i = 0; i < n; i++)
            append_run_group(&jobs[i], &calls[i], 1, conn);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        job_enter(&jobs[i]->h);
        trace_span_set_int(&jobs[i]->h.db, "convo.db.group_calls", (int64_t)n);
        append_answer(jobs[i], conn, rc != 0 ? rc : calls[i].rc, &calls[i].res);
    }
}

/* The pool's group function for AppendEvents (group commit): the calls
 * that are still wanted go to the database together, in rounds of distinct
 * sessions (a session's later call in the same group waits for the next
 * round, so its calls stay in order). */
static void append_group(pool_job **pjs, size_t n, db_conn *conn)
{
    append_job **jobs = mem_calloc(n, sizeof *jobs);
    append_job **round = mem_calloc(n, sizeof *round);
    db_append_call *calls = mem_calloc(n, sizeof *calls);
    size_t left = 0;
    for (size_t i = 0; i < n; i++) {
        append_job *j = (append_job *)pjs[i];
        if (job_begin(&j->h, conn, 0))
            jobs[left++] = j;
        else
            append_free(&j->h);
    }
    while (left > 0) {
        size_t k = 0, kept = 0;
        for (size_t i = 0; i < left; i++) {
            int seen = 0;
            for (size_t m = 0; m < k && !seen; m++)
                seen = strcmp(round[m]->h.session_id, jobs[i]->h.session_id) == 0;
            if (seen) {
                jobs[kept++] = jobs[i];
                continue;
            }
            round[k] = jobs[i];
            calls[k] = (db_append_call){.session_id = jobs[i]->h.session_id,
                                        .user_id = jobs[i]->user_id,
                                        .epoch = jobs[i]->h.epoch,
                                        .batch = jobs[i]->batch};
            k++;
        }
        append_run_group(round, calls, k, conn);
        for (size_t i = 0; i < k; i++)
            append_free(&round[i]->h);
        left = kept;
    }
    job_leave();
    mem_free(calls);
    mem_free(round);
    mem_free(jobs);
}

/* Checks every event and encodes the good batch; on a bad one nothing is
 * kept and err names it. */
static db_batch *append_encode(const store *st, const Convo__V1__AppendEventsRequest *req,
                               char *err, size_t errsize)
{
    char field[64];
    const char *sid = str(req->session_id);
    size_t content_bytes = 0;
    int64_t prev = 0;

    if (check_id("session_id", sid, err, errsize) != 0 ||
        check_id("user_id", str(req->user_id), err, errsize) != 0 ||
        check_epoch(req->writer_epoch, err, errsize) != 0)
        return NULL;
    if ((long long)req->n_events > st->lim.max_batch_events) {
        snprintf(err, errsize, "events has %zu events, over the batch limit of %lld", req->n_events,
                 st->lim.max_batch_events);
        return NULL;
    }
    for (size_t i = 0; i < req->n_events; i++) {
        const Convo__V1__Event *e = req->events[i];
        const char *esid = str(e->session_id);
        if (esid[0] != '\0' && strcmp(esid, sid) != 0) {
            snprintf(err, errsize, "events[%zu].session_id is '%.*s', not the request's '%s'", i,
                     STORE_MAX_ID_BYTES, esid, sid);
            return NULL;
        }
        if (e->seq < 1) {
            snprintf(err, errsize, "events[%zu].seq is %lld; seqs start at 1", i,
                     (long long)e->seq);
            return NULL;
        }
        if (e->seq <= prev) {
            snprintf(err, errsize,
                     "events[%zu].seq is %lld after %lld; seqs must be strictly increasing", i,
                     (long long)e->seq, (long long)prev);
            return NULL;
        }
        prev = e->seq;
        if (db_event_type_name((int)e->type) == NULL) {
            snprintf(err, errsize,
                     "events[%zu].type %d is not a known event type (USER_MESSAGE, AI_TOKEN, "
                     "TOOL_CALL, TOOL_RESULT or SYSTEM_EVENT)",
                     i, (int)e->type);
            return NULL;
        }
        snprintf(field, sizeof field, "events[%zu].content", i);
        if (check_text(field, str(e->content), (size_t)st->lim.max_content_bytes, err, errsize) !=
            0)
            return NULL;
        snprintf(field, sizeof field, "events[%zu].timestamp_us", i);
        if (check_time(field, e->timestamp_us, err, errsize) != 0)
            return NULL;
        content_bytes += strlen(str(e->content));
    }

    db_batch *b = db_batch_create(req->n_events, content_bytes);
    for (size_t i = 0; i < req->n_events; i++) {
        const Convo__V1__Event *e = req->events[i];
        const char *content = str(e->content);
        db_batch_add(b, e->seq, (int)e->type, content, strlen(content), e->timestamp_us);
    }
    return b;
}

static void on_append(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__AppendEventsRequest *req = (const Convo__V1__AppendEventsRequest *)msg;
    store *st = srv_call_method_data(call);
    char err[512];
    db_batch *b = append_encode(st, req, err, sizeof err);
    if (b == NULL) {
        finish_invalid(call, err);
        return;
    }
    metrics_histogram_observe(st->mx.batch, req->n_events);
    append_job *j = job_new(sizeof *j, call, st, "AppendEvents", req->session_id, append_run);
    j->batch = b;
    j->user_id = mem_strdup(req->user_id);
    j->h.epoch = req->writer_epoch;
    j->h.pj.bytes += db_batch_bytes(b);
    j->h.pj.group = append_group;
    j->h.pj.weight = req->n_events > 0 ? req->n_events : 1;
    job_submit(&j->h, append_free);
}

/* ---- EndSession, GetSession ----------------------------------------------- */

typedef struct session_job {
    job h;
    int64_t end_us;
    int end;       /* EndSession rather than GetSession */
    char *user_id; /* EndSession: the owner it names */
} session_job;

static void session_free(job *h)
{
    mem_free(((session_job *)h)->user_id);
    job_free(h);
}

static void session_run(pool_job *pj, db_conn *conn, int err)
{
    session_job *j = (session_job *)pj;
    db_session s = {0};
    if (job_begin(&j->h, conn, err)) {
        int rc = j->end
                     ? db_end_session(conn, j->h.session_id, j->user_id, j->h.epoch, j->end_us, &s)
                     : db_get_session(conn, j->h.session_id, &s);
        if (rc == 0) {
            Convo__V1__Session pb;
            session_to_pb(&s, &pb);
            if (j->end) {
                Convo__V1__EndSessionResponse resp = CONVO__V1__END_SESSION_RESPONSE__INIT;
                resp.session = &pb;
                job_finish(&j->h, RPC_OK, NULL, &resp.base);
            } else {
                Convo__V1__GetSessionResponse resp = CONVO__V1__GET_SESSION_RESPONSE__INIT;
                resp.session = &pb;
                job_finish(&j->h, RPC_OK, NULL, &resp.base);
            }
        } else {
            job_fail(&j->h, conn, rc);
        }
    }
    db_session_clear(&s);
    session_free(&j->h);
}

static void on_end(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__EndSessionRequest *req = (const Convo__V1__EndSessionRequest *)msg;
    store *st = srv_call_method_data(call);
    char err[256];
    if (check_id("session_id", str(req->session_id), err, sizeof err) != 0 ||
        check_id("user_id", str(req->user_id), err, sizeof err) != 0 ||
        check_time("end_time_us", req->end_time_us, err, sizeof err) != 0 ||
        check_epoch(req->writer_epoch, err, sizeof err) != 0) {
        finish_invalid(call, err);
        return;
    }
    session_job *j = job_new(sizeof *j, call, st, "EndSession", req->session_id, session_run);
    j->end = 1;
    j->end_us = req->end_time_us;
    j->user_id = mem_strdup(req->user_id);
    j->h.epoch = req->writer_epoch;
    job_submit(&j->h, session_free);
}

static void on_get(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__GetSessionRequest *req = (const Convo__V1__GetSessionRequest *)msg;
    store *st = srv_call_method_data(call);
    char err[256];
    if (check_id("session_id", str(req->session_id), err, sizeof err) != 0) {
        finish_invalid(call, err);
        return;
    }
    session_job *j = job_new(sizeof *j, call, st, "GetSession", req->session_id, session_run);
    job_submit(&j->h, session_free);
}

/* ---- SaveSummary, ClaimSummary ------------------------------------------- */

typedef struct summary_job {
    job h;
    int claim;
    int give_up; /* ClaimSummary.give_up */
    int status;
    char *summary, *error, *worker_id;
    int32_t lease_seconds, max_attempts;
} summary_job;

static void summary_free(job *h)
{
    summary_job *j = (summary_job *)h;
    mem_free(j->summary);
    mem_free(j->error);
    mem_free(j->worker_id);
    job_free(h);
}

static void summary_run(pool_job *pj, db_conn *conn, int err)
{
    summary_job *j = (summary_job *)pj;
    db_session s = {0};
    if (job_begin(&j->h, conn, err)) {
        Convo__V1__Session pb;
        int claimed = 0, rc;
        if (j->claim)
            rc = db_claim_summary(conn, j->h.session_id, j->worker_id, j->lease_seconds,
                                  j->max_attempts, j->give_up, &s, &claimed);
        else
            rc = db_save_summary(conn, j->h.session_id, j->status, j->summary, j->error,
                                 j->worker_id, &s);
        if (rc == 0 && j->claim) {
            Convo__V1__ClaimSummaryResponse resp = CONVO__V1__CLAIM_SUMMARY_RESPONSE__INIT;
            session_to_pb(&s, &pb);
            resp.session = &pb;
            resp.claimed = claimed;
            job_finish(&j->h, RPC_OK, NULL, &resp.base);
        } else if (rc == 0) {
            Convo__V1__SaveSummaryResponse resp = CONVO__V1__SAVE_SUMMARY_RESPONSE__INIT;
            session_to_pb(&s, &pb);
            resp.session = &pb;
            job_finish(&j->h, RPC_OK, NULL, &resp.base);
        } else if (rc == DB_ELEASE) {
            job_finishf(&j->h, RPC_FAILED_PRECONDITION,
                        "worker '%s' does not hold a live summary lease of session '%s' (never "
                        "claimed, expired, taken over, or the session was resumed); nothing saved",
                        j->worker_id, j->h.session_id);
        } else {
            job_fail(&j->h, conn, rc);
        }
    }
    db_session_clear(&s);
    summary_free(&j->h);
}

static void on_save_summary(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__SaveSummaryRequest *req = (const Convo__V1__SaveSummaryRequest *)msg;
    store *st = srv_call_method_data(call);
    size_t max = (size_t)st->lim.max_content_bytes;
    char err[256];
    if (check_id("session_id", str(req->session_id), err, sizeof err) != 0)
        goto invalid;
    if (req->status != CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_DONE &&
        req->status != CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_FAILED &&
        req->status != CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_PENDING) {
        snprintf(err, sizeof err, "status %d is not DONE, FAILED or PENDING", (int)req->status);
        goto invalid;
    }
    if (check_text("summary", str(req->summary), max, err, sizeof err) != 0 ||
        check_text("error", str(req->error), max, err, sizeof err) != 0)
        goto invalid;
    if (req->status == CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_DONE &&
        str(req->summary)[0] == 0) {
        snprintf(err, sizeof err, "summary is empty; status DONE needs the summary text");
        goto invalid;
    }
    /* Only the holder of a live lease saves: the store checks it. */
    if (check_id("worker_id", str(req->worker_id), err, sizeof err) != 0)
        goto invalid;

    summary_job *j = job_new(sizeof *j, call, st, "SaveSummary", req->session_id, summary_run);
    j->status = (int)req->status;
    j->summary = mem_strdup(str(req->summary));
    j->error = mem_strdup(str(req->error));
    j->worker_id = mem_strdup(str(req->worker_id));
    j->h.pj.bytes += strlen(j->summary) + strlen(j->error);
    job_submit(&j->h, summary_free);
    return;
invalid:
    finish_invalid(call, err);
}

static void on_claim_summary(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__ClaimSummaryRequest *req = (const Convo__V1__ClaimSummaryRequest *)msg;
    store *st = srv_call_method_data(call);
    char err[256];
    if (check_id("session_id", str(req->session_id), err, sizeof err) != 0 ||
        check_id("worker_id", str(req->worker_id), err, sizeof err) != 0)
        goto invalid;
    if (req->lease_seconds < 0 || req->lease_seconds > LEASE_MAX_S) {
        snprintf(err, sizeof err, "lease_seconds is %d, outside 0 (the default, %d) to %d",
                 (int)req->lease_seconds, LEASE_DEFAULT_S, LEASE_MAX_S);
        goto invalid;
    }
    if (req->max_attempts < 0) {
        snprintf(err, sizeof err, "max_attempts is %d; it must be >= 0 (0: no limit)",
                 (int)req->max_attempts);
        goto invalid;
    }
    if (req->give_up && req->max_attempts <= 0) {
        snprintf(err, sizeof err,
                 "give_up needs max_attempts > 0 (the attempts that must have run out)");
        goto invalid;
    }
    summary_job *j = job_new(sizeof *j, call, st, "ClaimSummary", req->session_id, summary_run);
    j->claim = 1;
    j->give_up = req->give_up;
    j->worker_id = mem_strdup(req->worker_id);
    j->lease_seconds = req->lease_seconds > 0 ? req->lease_seconds : LEASE_DEFAULT_S;
    j->max_attempts = req->max_attempts;
    job_submit(&j->h, summary_free);
    return;
invalid:
    finish_invalid(call, err);
}

/* ---- ListUserSessions, ListUnsummarizedSessions ------------------------- */

typedef struct list_job {
    job h;
    int unsummarized;
    char *user_id, *exclude, *before_id;
    int64_t before_us;
    uint32_t limit;
    int64_t ended_before_us;
    int32_t max_attempts;
} list_job;

static void list_free(job *h)
{
    list_job *j = (list_job *)h;
    mem_free(j->user_id);
    mem_free(j->exclude);
    mem_free(j->before_id);
    job_free(h);
}

static size_t session_size(const db_session *s)
{
    return strlen(s->session_id) + strlen(s->user_id) + strlen(s->final_summary) +
           strlen(s->summary_error) + 128;
}

static void list_run(pool_job *pj, db_conn *conn, int err)
{
    list_job *j = (list_job *)pj;
    db_session *ss = NULL;
    size_t n = 0;
    Convo__V1__Session *pbs = NULL;
    Convo__V1__Session **ptrs = NULL;
    if (!job_begin(&j->h, conn, err))
        goto out;
    int rc =
        j->unsummarized
            ? db_list_unsummarized(conn, j->limit, j->ended_before_us, j->max_attempts, &ss, &n)
            : db_list_user_sessions(conn, j->user_id, j->limit, j->exclude, j->before_us,
                                    j->before_id != NULL ? j->before_id : "", &ss, &n);
    if (rc != 0) {
        job_fail(&j->h, conn, rc);
        goto out;
    }
    /* Stop short of the largest message rather than fail the whole list:
     * the caller sees fewer than it asked for and can page. */
    size_t budget = (size_t)j->h.st->lim.max_message_bytes > RESPONSE_HEADROOM_BYTES
                        ? (size_t)j->h.st->lim.max_message_bytes - RESPONSE_HEADROOM_BYTES
                        : (size_t)j->h.st->lim.max_message_bytes / 2;
    size_t used = 0, k = 0;
    pbs = mem_calloc(n ? n : 1, sizeof *pbs);
    ptrs = mem_calloc(n ? n : 1, sizeof *ptrs);
    for (; k < n; k++) {
        used += session_size(&ss[k]);
        if (used > budget && k > 0) {
            log_warn("list truncated to %zu of %zu sessions to fit one message", k, n);
            break;
        }
        session_to_pb(&ss[k], &pbs[k]);
        ptrs[k] = &pbs[k];
    }
    if (j->unsummarized) {
        Convo__V1__ListUnsummarizedSessionsResponse resp =
            CONVO__V1__LIST_UNSUMMARIZED_SESSIONS_RESPONSE__INIT;
        resp.n_sessions = k;
        resp.sessions = ptrs;
        job_finish(&j->h, RPC_OK, NULL, &resp.base);
    } else {
        Convo__V1__ListUserSessionsResponse resp = CONVO__V1__LIST_USER_SESSIONS_RESPONSE__INIT;
        resp.n_sessions = k;
        resp.sessions = ptrs;
        job_finish(&j->h, RPC_OK, NULL, &resp.base);
    }
out:
    mem_free(ptrs);
    mem_free(pbs);
    db_sessions_free(&ss, n);
    list_free(&j->h);
}

static void on_list_user_sessions(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__ListUserSessionsRequest *req = (const Convo__V1__ListUserSessionsRequest *)msg;
    store *st = srv_call_method_data(call);
    char err[256];
    if (check_id("user_id", str(req->user_id), err, sizeof err) != 0 ||
        (str(req->exclude_session_id)[0] != '\0' &&
         check_id("exclude_session_id", req->exclude_session_id, err, sizeof err) != 0)) {
        finish_invalid(call, err);
        return;
    }
    if (check_time("before_start_time_us", req->before_start_time_us, err, sizeof err) != 0 ||
        (req->before_start_time_us != 0 &&
         check_id("before_session_id", str(req->before_session_id), err, sizeof err) != 0)) {
        finish_invalid(call, err);
        return;
    }
    list_job *j = job_new(sizeof *j, call, st, "ListUserSessions", "", list_run);
    j->user_id = mem_strdup(req->user_id);
    j->exclude = mem_strdup(str(req->exclude_session_id));
    j->before_us = req->before_start_time_us;
    j->before_id = mem_strdup(str(req->before_session_id));
    j->limit = req->limit == 0                  ? USER_SESSIONS_DEFAULT
               : req->limit > USER_SESSIONS_MAX ? USER_SESSIONS_MAX
                                                : req->limit;
    job_submit(&j->h, list_free);
}

static void on_list_unsummarized(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__ListUnsummarizedSessionsRequest *req =
        (const Convo__V1__ListUnsummarizedSessionsRequest *)msg;
    store *st = srv_call_method_data(call);
    char err[256];
    if (check_time("ended_before_us", req->ended_before_us, err, sizeof err) != 0)
        goto invalid;
    if (req->max_attempts < 0) {
        snprintf(err, sizeof err, "max_attempts is %d; it must be >= 0 (0: no limit)",
                 (int)req->max_attempts);
        goto invalid;
    }
    list_job *j = job_new(sizeof *j, call, st, "ListUnsummarized", "", list_run);
    j->unsummarized = 1;
    j->limit = req->limit == 0                 ? UNSUMMARIZED_DEFAULT
               : req->limit > UNSUMMARIZED_MAX ? UNSUMMARIZED_MAX
                                               : req->limit;
    j->ended_before_us = req->ended_before_us;
    j->max_attempts = req->max_attempts;
    job_submit(&j->h, list_free);
    return;
invalid:
    finish_invalid(call, err);
}

/* ---- KeepSessionsAlive, EndAbandonedSessions ------------------------------ */

typedef struct live_job {
    job h;
    int end;    /* EndAbandonedSessions rather than KeepSessionsAlive */
    char **ids; /* KeepSessionsAlive's sessions */
    size_t nids;
    int32_t live_seconds;
    uint32_t limit;
} live_job;

static void live_free(job *h)
{
    live_job *j = (live_job *)h;
    for (size_t i = 0; i < j->nids; i++)
        mem_free(j->ids[i]);
    mem_free(j->ids);
    job_free(h);
}

static void keep_alive_answer(live_job *j, db_conn *conn)
{
    uint32_t kept = 0;
    int rc = db_keep_alive(conn, (const char *const *)j->ids, j->nids, j->live_seconds, &kept);
    if (rc != 0) {
        job_fail(&j->h, conn, rc);
        return;
    }
    Convo__V1__KeepSessionsAliveResponse resp = CONVO__V1__KEEP_SESSIONS_ALIVE_RESPONSE__INIT;
    resp.kept = kept;
    job_finish(&j->h, RPC_OK, NULL, &resp.base);
}

static void end_abandoned_answer(live_job *j, db_conn *conn)
{
    char **ids = NULL;
    size_t n = 0;
    int rc = db_end_abandoned(conn, j->limit, &ids, &n);
    if (rc != 0) {
        job_fail(&j->h, conn, rc);
        return;
    }
    metrics_counter_add(j->h.st->mx.abandoned, n);
    for (size_t i = 0; i < n; i++) {
        const log_field f[] = {{"session_id", ids[i]}, {NULL, NULL}};
        log_fields(LOG_INFO, f, "session ended: its gateway stopped keeping it alive");
    }
    Convo__V1__EndAbandonedSessionsResponse resp = CONVO__V1__END_ABANDONED_SESSIONS_RESPONSE__INIT;
    resp.n_session_ids = n;
    resp.session_ids = ids;
    job_finish(&j->h, RPC_OK, NULL, &resp.base);
    for (size_t i = 0; i < n; i++)
        mem_free(ids[i]);
    mem_free(ids);
}

static void live_run(pool_job *pj, db_conn *conn, int err)
{
    live_job *j = (live_job *)pj;
    if (job_begin(&j->h, conn, err)) {
        if (j->end)
            end_abandoned_answer(j, conn);
        else
            keep_alive_answer(j, conn);
    }
    live_free(&j->h);
}

static void on_keep_alive(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__KeepSessionsAliveRequest *req =
        (const Convo__V1__KeepSessionsAliveRequest *)msg;
    store *st = srv_call_method_data(call);
    char err[256], field[48];
    if (req->live_seconds < 1 || req->live_seconds > LIVE_MAX_S) {
        snprintf(err, sizeof err, "live_seconds is %d, outside 1 to %d", (int)req->live_seconds,
                 LIVE_MAX_S);
        finish_invalid(call, err);
        return;
    }
    for (size_t i = 0; i < req->n_session_ids; i++) {
        snprintf(field, sizeof field, "session_ids[%zu]", i);
        if (check_id(field, str(req->session_ids[i]), err, sizeof err) != 0) {
            finish_invalid(call, err);
            return;
        }
    }
    live_job *j = job_new(sizeof *j, call, st, "KeepSessionsAlive", "", live_run);
    j->live_seconds = req->live_seconds;
    j->nids = req->n_session_ids;
    j->ids = mem_calloc(j->nids ? j->nids : 1, sizeof *j->ids);
    for (size_t i = 0; i < j->nids; i++) {
        j->ids[i] = mem_strdup(req->session_ids[i]);
        j->h.pj.bytes += strlen(j->ids[i]) + sizeof *j->ids;
    }
    job_submit(&j->h, live_free);
}

static void on_end_abandoned(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__EndAbandonedSessionsRequest *req =
        (const Convo__V1__EndAbandonedSessionsRequest *)msg;
    live_job *j =
        job_new(sizeof *j, call, srv_call_method_data(call), "EndAbandonedSessions", "", live_run);
    j->end = 1;
    j->limit = req->limit == 0              ? ABANDONED_DEFAULT
               : req->limit > ABANDONED_MAX ? ABANDONED_MAX
                                            : req->limit;
    job_submit(&j->h, live_free);
}

/* ---- ListEvents ------------------------------------------------------------ */

/* One ListEvents call. At any moment exactly one party owns it: the job
 * queue or a worker (a page is being read), a sender (a page is being
 * sent, on a worker or on the call's completion-queue thread), or nobody
 * while it is parked waiting for on_writable. The owner works without a
 * lock; streams_mu only guards the hand-overs (state, the call's data
 * pointer) so that a cancel or writable callback racing a finish never
 * touches a freed stream. */
struct lstream {
    job h;
    int64_t after_seq; /* the last seq sent (or the request's after_seq) */
    int64_t left;      /* events the request still allows */
    int checked;       /* the session's existence was checked */
    db_page *page;     /* the page being sent, NULL between pages */
    size_t next;       /* its next row */
    int last_page;     /* the page was short: nothing after it */
    int parked;        /* waiting for on_writable; nobody owns it */
    int writable_seen; /* on_writable came while the owner was still sending */
    int has_page;      /* holds one of the store's pages (read, being sent or to be read) */
    lstream *next_waiter;
};

static pthread_mutex_t streams_mu = PTHREAD_MUTEX_INITIALIZER;

static void stream_page_run(pool_job *pj, db_conn *conn, int err);
static void stream_end(lstream *ls, rpc_code code, const char *msg);

/* Queues the stream's next page job: at once when the budget has a page
 * for it, else when one is given back. Its owner gives it up here. Returns
 * 0, or the pool's error (POOL_EFULL, POOL_ESHUTDOWN) with nothing queued
 * and the owner still owning it. */
static int stream_queue(lstream *ls, int first)
{
    store *st = ls->h.st;
    ls->h.pj.fn = stream_page_run;
    pthread_mutex_lock(&st->pages_mu);
    if (st->pages_held >= st->lim.list_pages_max) {
        ls->next_waiter = NULL;
        if (st->waiters_tail != NULL)
            st->waiters_tail->next_waiter = ls;
        else
            st->waiters = ls;
        st->waiters_tail = ls;
        pthread_mutex_unlock(&st->pages_mu);
        metrics_counter_inc(st->mx.page_waits);
        return 0;
    }
    st->pages_held++;
    metrics_gauge_set(st->mx.pages_held, st->pages_held);
    pthread_mutex_unlock(&st->pages_mu);
    ls->has_page = 1;
    int rc = first ? pool_submit(st->pool, &ls->h.pj) : pool_resubmit(st->pool, &ls->h.pj);
    if (rc != 0) {
        ls->has_page = 0;
        pthread_mutex_lock(&st->pages_mu);
        st->pages_held--;
        metrics_gauge_set(st->mx.pages_held, st->pages_held);
        pthread_mutex_unlock(&st->pages_mu);
    }
    return rc;
}

/* Gives the stream's page back to the budget: the oldest waiting stream
 * takes it (its job is queued; a waiter whose job cannot be queued any
 * more, the store stopping, is ended and passes the page on). */
static void stream_give_page(lstream *ls)
{
    if (!ls->has_page)
        return;
    ls->has_page = 0;
    store *st = ls->h.st;
    for (;;) {
        pthread_mutex_lock(&st->pages_mu);
        lstream *w = st->waiters;
        if (w == NULL) {
            st->pages_held--;
            metrics_gauge_set(st->mx.pages_held, st->pages_held);
            pthread_mutex_unlock(&st->pages_mu);
            return;
        }
        st->waiters = w->next_waiter;
        if (st->waiters == NULL)
            st->waiters_tail = NULL;
        pthread_mutex_unlock(&st->pages_mu);
        w->has_page = 1;
        if (pool_resubmit(st->pool, &w->h.pj) == 0)
            return;
        /* The store is stopping: w ends, and the page goes on to the next
         * waiter (here, not through w's end, so that no stack grows). */
        w->has_page = 0;
        stream_end(w, RPC_UNAVAILABLE, "the store is shutting down; resume with after_seq");
    }
}

static void stream_free(lstream *ls)
{
    db_page_destroy(&ls->page);
    stream_give_page(ls);
    job_free(&ls->h);
}

/* The owner ends the stream: unhooks it from the call under the lock, so
 * that callbacks arriving later find nothing, then finishes and frees. */
static void stream_end(lstream *ls, rpc_code code, const char *msg)
{
    pthread_mutex_lock(&streams_mu);
    srv_call_set_data(ls->h.call, NULL);
    pthread_mutex_unlock(&streams_mu);
    job_finish(&ls->h, code, msg, NULL);
    stream_free(ls);
}

/* Sends what is left of the page, then queues the next page's job. Runs
 * on whichever thread owns the stream; never blocks. */
static void stream_pump(lstream *ls)
{
    size_t count = ls->page != NULL ? db_page_count(ls->page) : 0;
    while (ls->next < count) {
        db_event ev;
        db_page_event(ls->page, ls->next, &ev);
        Convo__V1__Event out = CONVO__V1__EVENT__INIT;
        out.session_id = ls->h.session_id;
        out.seq = ev.seq;
        out.type = (Convo__V1__EventType)ev.type;
        out.content = (char *)ev.content;
        out.timestamp_us = ev.timestamp_us;
        out.event_id = ev.event_id;
        int rc = srv_call_send(ls->h.call, &out.base);
        if (rc == RPC_EFULL) {
            pthread_mutex_lock(&streams_mu);
            if (ls->writable_seen) {
                /* The queue drained while we were getting here. */
                ls->writable_seen = 0;
                pthread_mutex_unlock(&streams_mu);
                continue;
            }
            if (srv_call_cancelled(ls->h.call)) {
                /* on_cancel came (or is coming) while we owned it and
                 * left the stream to us: no on_writable will follow. */
                pthread_mutex_unlock(&streams_mu);
                stream_end(ls, RPC_CANCELLED, "cancelled");
                return;
            }
            ls->parked = 1;
            pthread_mutex_unlock(&streams_mu);
            job_leave();
            return;
        }
        if (rc == RPC_EDONE) {
            stream_end(ls, RPC_CANCELLED, "cancelled");
            return;
        }
        if (rc != 0) {
            log_error("ListEvents: cannot send seq %lld: %s", (long long)ev.seq, rpc_strerror(rc));
            stream_end(ls, RPC_INTERNAL, "an event could not be encoded");
            return;
        }
        ls->next++;
        ls->after_seq = ev.seq;
        ls->left--;
    }
    db_page_destroy(&ls->page);
    ls->next = 0;
    if (ls->last_page || ls->left <= 0) {
        stream_end(ls, RPC_OK, NULL);
        return;
    }
    /* The next page waits its turn behind streams already waiting. */
    stream_give_page(ls);
    job_leave();
    if (stream_queue(ls, 0) != 0)
        stream_end(ls, RPC_UNAVAILABLE, "the store is shutting down; resume with after_seq");
}

static void stream_page_run(pool_job *pj, db_conn *conn, int err)
{
    lstream *ls = (lstream *)pj;
    int rc = 0;
    job_enter(&ls->h);
    if (err != 0 || conn == NULL) {
        stream_end(ls, RPC_UNAVAILABLE,
                   err == POOL_ESHUTDOWN ? "the store is shutting down; resume with after_seq"
                                         : "the database is unavailable; resume with after_seq");
        return;
    }
    if (srv_call_cancelled(ls->h.call)) {
        stream_end(ls, RPC_CANCELLED, "cancelled");
        return;
    }
    int64_t want = ls->h.st->lim.list_page_size;
    if (want > ls->left)
        want = ls->left;
    rc = db_list_events(conn, ls->h.session_id, ls->after_seq, want, !ls->checked, &ls->page);
    if (rc != 0) {
        /* job_fail finishes the call; the stream is unhooked first. */
        pthread_mutex_lock(&streams_mu);
        srv_call_set_data(ls->h.call, NULL);
        pthread_mutex_unlock(&streams_mu);
        job_fail(&ls->h, conn, rc);
        stream_free(ls);
        return;
    }
    ls->checked = 1;
    ls->next = 0;
    ls->last_page = (int64_t)db_page_count(ls->page) < want;
    stream_pump(ls);
}

/* On the call's completion-queue thread: the write queue drained. */
static void stream_on_writable(srv_call *call)
{
    pthread_mutex_lock(&streams_mu);
    lstream *ls = srv_call_data(call);
    int take = 0;
    if (ls != NULL) {
        if (ls->parked) {
            ls->parked = 0;
            take = 1;
        } else {
            ls->writable_seen = 1;
        }
    }
    pthread_mutex_unlock(&streams_mu);
    if (take)
        stream_pump(ls);
}

/* On the call's completion-queue thread: the client went away. A parked
 * stream is ended here; an owned one ends when its owner next looks
 * (srv_call_send answers RPC_EDONE, a queued page job checks first). */
static void stream_on_cancel(srv_call *call)
{
    pthread_mutex_lock(&streams_mu);
    lstream *ls = srv_call_data(call);
    int take = 0;
    if (ls != NULL && ls->parked) {
        ls->parked = 0;
        take = 1;
    }
    pthread_mutex_unlock(&streams_mu);
    if (take)
        stream_end(ls, RPC_CANCELLED, "cancelled");
}

static void on_list_events(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__ListEventsRequest *req = (const Convo__V1__ListEventsRequest *)msg;
    store *st = srv_call_method_data(call);
    char err[256];
    if (check_id("session_id", str(req->session_id), err, sizeof err) != 0)
        goto invalid;
    if (req->after_seq < 0) {
        snprintf(err, sizeof err, "after_seq is %lld; it must be >= 0", (long long)req->after_seq);
        goto invalid;
    }
    if (req->limit < 0) {
        snprintf(err, sizeof err, "limit is %lld; it must be >= 0 (0: all)", (long long)req->limit);
        goto invalid;
    }
    lstream *ls = job_new(sizeof *ls, call, st, "ListEvents", req->session_id, stream_page_run);
    ls->after_seq = req->after_seq;
    ls->left = req->limit > 0 ? req->limit : INT64_MAX;
    srv_call_set_data(call, ls);
    srv_call_on_writable(call, stream_on_writable);
    srv_call_on_cancel(call, stream_on_cancel);
    int rc = stream_queue(ls, 1);
    if (rc != 0) {
        srv_call_set_data(call, NULL);
        srv_call_finish(call, rc == POOL_EFULL ? RPC_RESOURCE_EXHAUSTED : RPC_UNAVAILABLE,
                        rc == POOL_EFULL ? "the store's job queue is full; retry with backoff"
                                         : "the store is shutting down; retry",
                        NULL);
        stream_free(ls);
    }
    return;
invalid:
    finish_invalid(call, err);
}

/* ---- registration ------------------------------------------------------------ */

/* Who calls what (the table in README.md), enforced under mutual TLS.
 * `admin` is an operator's certificate: the methods that only read. */
#define BY_GATEWAY  "gateway"
#define BY_SUMMARY  "summary-svc"
#define READ_GW     "gateway llm-svc summary-svc admin"
#define READ_EVENTS "gateway summary-svc admin"
#define READ_USER   "gateway llm-svc admin"
#define READ_SWEEP  "summary-svc admin"

store *store_create(srv *s, pool *p, const store_limits *lim, metrics *m)
{
    static const srv_method methods[] = {
        {&convo__v1__store__open_session__method, on_open, NULL, NULL, BY_GATEWAY},
        {&convo__v1__store__append_events__method, on_append, NULL, NULL, BY_GATEWAY},
        {&convo__v1__store__end_session__method, on_end, NULL, NULL, BY_GATEWAY},
        {&convo__v1__store__get_session__method, on_get, NULL, NULL, READ_GW},
        {&convo__v1__store__list_events__method, on_list_events, NULL, NULL, READ_EVENTS},
        {&convo__v1__store__save_summary__method, on_save_summary, NULL, NULL, BY_SUMMARY},
        {&convo__v1__store__list_user_sessions__method, on_list_user_sessions, NULL, NULL,
         READ_USER},
        {&convo__v1__store__list_unsummarized_sessions__method, on_list_unsummarized, NULL, NULL,
         READ_SWEEP},
        {&convo__v1__store__claim_summary__method, on_claim_summary, NULL, NULL, BY_SUMMARY},
        {&convo__v1__store__keep_sessions_alive__method, on_keep_alive, NULL, NULL, BY_GATEWAY},
        {&convo__v1__store__end_abandoned_sessions__method, on_end_abandoned, NULL, NULL,
         BY_SUMMARY},
    };
    store *st = mem_calloc(1, sizeof *st);
    st->s = s;
    st->pool = p;
    st->lim = *lim;
    pthread_mutex_init(&st->pages_mu, NULL);
    metrics_register(m, METRICS_SECTION(store_metrics, &st->mx));
    for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++) {
        if (srv_add_method(s, &methods[i], st) != 0) {
            log_error("cannot register %s", methods[i].method->path);
            mem_free(st);
            return NULL;
        }
    }
    return st;
}

void store_destroy(store **stp)
{
    if (*stp == NULL)
        return;
    pthread_mutex_destroy(&(*stp)->pages_mu);
    mem_free(*stp);
    *stp = NULL;
}
