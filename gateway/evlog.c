#include "evlog.h"

#include "backoff.h"
#include "convo_methods.h"
#include "keep.h"
#include "log.h"
#include "mem.h"

#include <ev.h>
#include <libwebsockets.h>
#include <string.h>
#include <sys/time.h>

/* The waits after failed store-svc calls: drawn below a ceiling that
 * doubles from the first to the longest (full jitter: the sessions of a
 * gateway that lost store-svc come back spread out, the first ones soon). */
#define RETRY_FIRST_MS 100
#define RETRY_MAX_MS   5000
/* Failed OpenSession calls after which the session is told the store is
 * not there (the conversation goes on without it; retries go on). */
#define OPEN_REPORT_FAILURES 4

/* The trace ids of a run of events (a turn's), shared by them: copied
 * once per turn, not per event. */
typedef struct trace_ref {
    int refs;
    trace_span ids; /* ids and tracestate only, never recorded */
} trace_ref;

typedef struct event {
    Convo__V1__EventType type;
    char *content;
    size_t len;
    int64_t ts_us;
    int64_t seq;      /* 0 until the event is first sent */
    uint64_t idx;     /* its place among every event added (evlog_added) */
    trace_ref *trace; /* NULL: none */
} event;

/* What one waiting event costs besides its text, for
 * --event-buffer-total-bytes: its slot in the queue and the allocator's
 * header of the text's block. */
#define EVENT_OVERHEAD_BYTES (sizeof(event) + 16)

typedef enum call_kind { CALL_OPEN, CALL_APPEND, CALL_END } call_kind;

struct evlog {
    ev_timer timer;        /* the flush and the backoff */
    ev_timer closed_timer; /* fires on_closed from the loop */
    gw *g;
    char *session_id;
    char *user_id;
    evlog_open_fn on_open;
    evlog_closed_fn on_closed;
    void *arg;

    event *q; /* q[head .. n) wait, in order */
    size_t head, n, cap;
    size_t batch; /* events of the AppendEvents in flight */

    int64_t next_seq; /* 0 until the session is open */
    int open_reported;
    int busy; /* one call in flight */
    int timer_armed;
    int flush_due;
    backoff retry; /* attempts > 0: backing off after failed calls */
    int closing;
    int ended; /* EndSession succeeded */
    int closed_fired;
    int refused;    /* the store refused the session for good */
    int taken_over; /* another writer opened it in the store since (refused too) */
    int64_t epoch;  /* our writer epoch from OpenSession; 0 until opened */
    int claim;      /* a new connection took the session: open it as a new writer */
    evlog_taken_fn on_taken_over;
    int abandoned;    /* given up by the session (evlog_abandon) */
    int64_t close_ms; /* when closing began, for --event-retry-ms */
    unsigned long dropped;
    /* Events added since creation; --store-before-send shows a frame once
     * the events before it are settled (evlog_settled). */
    uint64_t added;
    evlog_settled_fn on_settled;
    void *settled_arg;
    int64_t batch_us;      /* when the AppendEvents in flight was sent (metrics) */
    trace_ref *last_trace; /* the last event's, shared by the next of the same span */
    keep_entry keep;       /* renewed in the store while open there (keep.h) */
};

typedef struct reply {
    evlog *ev;
    call_kind kind;
    rpc_code code;
    char *message;
    ProtobufCMessage *resp;
} reply;

static void pump(evlog *ev);

/* on_closed may free the evlog, so it never runs inside the evlog's own
 * call chain: it is fired from the loop, on a timer of its own. */
static void on_closed_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    evlog *ev = w->data;
    ev->on_closed(ev->arg);
}

static void fire_closed(evlog *ev)
{
    ev->closed_fired = 1;
    ev_timer_start(ev->g->loop, &ev->closed_timer);
}

static int64_t now_us(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (int64_t)tv.tv_sec * 1000000 + tv.tv_usec;
}

static size_t waiting(const evlog *ev)
{
    return ev->n - ev->head;
}

static void trace_unref(trace_ref *r)
{
    if (r != NULL && --r->refs == 0) {
        mem_free(r->ids.state);
        mem_free(r);
    }
}

/* The shared ids of `sp`: the last event's when it is the same span. */
static trace_ref *trace_of(evlog *ev, const trace_span *sp)
{
    if (sp == NULL || !trace_ctx_valid(&sp->ctx))
        return NULL;
    trace_ref *r = ev->last_trace;
    if (r == NULL || strcmp(r->ids.ctx.span_id, sp->ctx.span_id) != 0 ||
        strcmp(r->ids.ctx.trace_id, sp->ctx.trace_id) != 0) {
        trace_unref(r);
        r = mem_calloc(1, sizeof *r);
        r->refs = 1; /* last_trace's */
        r->ids.ctx = sp->ctx;
        r->ids.state = sp->state != NULL ? mem_strdup(sp->state) : NULL;
        ev->last_trace = r;
    }
    r->refs++;
    return r;
}

/* Adds delta bytes to what every session holds for store-svc, and notes
 * when the total reaches --event-buffer-total-bytes (new messages are
 * refused) or drains to half of it (taken again): each logged once. */
static void account(gw *g, long delta)
{
    long total = atomic_fetch_add(&g->counters.events_buffered_bytes, delta) + delta;
    long long cap = g->opts.event_buffer_total_bytes;
    if (cap <= 0)
        return;
    if (!g->events_full && total >= cap) {
        g->events_full = 1;
        log_error("events waiting for store-svc reached --event-buffer-total-bytes (%ld bytes in "
                  "%ld events): new messages are refused (store_backlog) until half of it is "
                  "stored; answers under way go on",
                  total, atomic_load(&g->counters.events_buffered));
    } else if (g->events_full && total <= cap / 2) {
        g->events_full = 0;
        log_info("events waiting for store-svc are down to %ld bytes: new messages are taken "
                 "again",
                 total);
    }
}

/* Tells the owner that more events may be settled. */
static void settled(evlog *ev)
{
    if (ev->on_settled != NULL)
        ev->on_settled(ev->settled_arg, evlog_settled(ev));
}

/* Frees the text of the next `count` waiting events, from the head, and
 * takes them off the counts (they are stored or dropped). */
static void release(evlog *ev, size_t count)
{
    long bytes = 0;
    for (size_t i = 0; i < count; i++) {
        event *e = &ev->q[ev->head + i];
        bytes += (long)(e->len + EVENT_OVERHEAD_BYTES);
        mem_free(e->content);
        trace_unref(e->trace);
    }
    ev->head += count;
    atomic_fetch_sub(&ev->g->counters.events_buffered, (long)count);
    account(ev->g, -bytes);
    if (count > 0)
        settled(ev);
}

static void on_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    evlog *ev = w->data;
    ev->timer_armed = 0;
    ev->flush_due = 1;
    pump(ev);
}

static void arm(evlog *ev, int ms)
{
    ev->timer_armed = 1;
    ev_timer_set(&ev->timer, ms / 1000.0, 0.);
    ev_timer_start(ev->g->loop, &ev->timer);
}

/* Schedules a retry after a failed call, backing off with jitter. */
static void retry_later(evlog *ev)
{
    arm(ev, (int)backoff_next(&ev->retry));
}

/* n events dropped, by `reason` (a label word). */
static void count_dropped(evlog *ev, uint64_t n, const char *reason)
{
    atomic_fetch_add(&ev->g->counters.events_dropped, (long)n);
    metrics_counter_add(metrics_counter_of(ev->g->mx.events_dropped, (const char *[]){reason}), n);
}

static void drop_events(evlog *ev, size_t count, const char *reason, const char *why)
{
    if (count > waiting(ev))
        count = waiting(ev);
    release(ev, count);
    ev->batch = 0;
    ev->dropped += count;
    count_dropped(ev, count, reason);
    const log_field f[] = {{"session_id", ev->session_id}, {NULL, NULL}};
    log_fields(LOG_ERROR, f, "dropped %zu events of the session (%lu in all): %s", count,
               ev->dropped, why);
}

/* ---- replies (posted from the gRPC thread) --------------------------- */

static void on_reply_loop(void *arg);

static void on_reply(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp,
                     call_kind kind)
{
    reply *r = mem_calloc(1, sizeof *r);
    r->ev = arg;
    r->kind = kind;
    r->code = code;
    r->message = mem_strdup(message != NULL ? message : "");
    r->resp = resp;
    bridge_post(r->ev->g->bridge, on_reply_loop, r);
}

static void on_open_reply(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp)
{
    on_reply(arg, code, message, resp, CALL_OPEN);
}

static void on_append_reply(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp)
{
    on_reply(arg, code, message, resp, CALL_APPEND);
}

static void on_end_reply(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp)
{
    on_reply(arg, code, message, resp, CALL_END);
}

static void on_summarize_reply(void *arg, rpc_code code, const char *message,
                               ProtobufCMessage *resp)
{
    if (code != RPC_OK)
        log_warn("Summarize of session %s failed (%s: %s); summary-svc's sweep will pick it up",
                 (char *)arg, rpc_code_name(code), message);
    if (resp != NULL)
        protobuf_c_message_free_unpacked(resp, NULL);
    mem_free(arg);
}

static int retryable(rpc_code code)
{
    return code == RPC_UNAVAILABLE || code == RPC_DEADLINE_EXCEEDED ||
           code == RPC_RESOURCE_EXHAUSTED || code == RPC_ABORTED || code == RPC_INTERNAL ||
           code == RPC_UNKNOWN || code == RPC_CANCELLED;
}

/* The store refused our writer epoch: another gateway opened the session
 * since (its client resumed there). Nothing more is written — the new
 * writer numbers the seqs now — and what waits is dropped; the session is
 * told once, to close its connection. */
static void taken_over(evlog *ev, const char *message)
{
    if (ev->taken_over)
        return;
    ev->taken_over = 1;
    ev->refused = 1;
    ev->keep.live = 0;
    size_t n = waiting(ev);
    metrics_counter_inc(ev->g->mx.sessions_taken_over);
    const log_field f[] = {{"session_id", ev->session_id}, {NULL, NULL}};
    log_fields(LOG_WARN, f,
               "session taken over by another gateway (writer_epoch %lld refused: %s); %zu events "
               "not stored, no more written",
               (long long)ev->epoch, message, n);
    if (n > 0) {
        release(ev, n);
        ev->dropped += n;
        count_dropped(ev, n, "taken_over");
    }
    ev->batch = 0;
    if (ev->on_taken_over != NULL)
        ev->on_taken_over(ev->arg);
}

static void handle_open(evlog *ev, reply *r)
{
    const Convo__V1__OpenSessionResponse *resp = (const Convo__V1__OpenSessionResponse *)r->resp;
    int first = !ev->open_reported;
    if (r->code == RPC_OK) {
        backoff_reset(&ev->retry);
        ev->next_seq = (resp->session != NULL ? resp->session->last_seq : 0) + 1;
        ev->epoch = resp->session != NULL ? resp->session->writer_epoch : 0;
        ev->flush_due = 1;
        ev->keep.live = !ev->abandoned;
    } else if (r->code == RPC_FAILED_PRECONDITION && ev->claim) {
        /* A new connection came while we asked as the writer before: it
         * asks again as a new writer (pump). */
    } else if (r->code == RPC_FAILED_PRECONDITION && ev->epoch != 0) {
        /* Reopening as the writer we were: someone else is now. */
        taken_over(ev, r->message);
    } else if (retryable(r->code)) {
        retry_later(ev);
    } else {
        /* Refused for good (another user's session, a bad id): nothing of
         * this session can be stored. */
        if (waiting(ev) > 0)
            drop_events(ev, waiting(ev), "refused", r->message);
        ev->refused = 1;
    }
    if (first &&
        (r->code == RPC_OK || !retryable(r->code) || ev->retry.attempts >= OPEN_REPORT_FAILURES)) {
        /* Tell the session once: at success, refusal, or after a few quick
         * retries (the conversation goes on without the store). */
        ev->open_reported = 1;
        ev->on_open(ev->arg, r->code, r->message, resp);
    }
}

static void handle_append(evlog *ev, reply *r)
{
    size_t sent = ev->batch;
    if (r->code == RPC_OK) {
        const Convo__V1__AppendEventsResponse *resp =
            (const Convo__V1__AppendEventsResponse *)r->resp;
        release(ev, sent);
        ev->batch = 0;
        backoff_reset(&ev->retry);
        atomic_fetch_add(&ev->g->counters.events_logged, (long)resp->appended);
        metrics_counter_add(ev->g->mx.events_stored, resp->appended);
        if (resp->conflicts > 0) {
            /* Stored under the same seqs by another writer (one that does
             * not fence): ours are not, and never will be. */
            ev->dropped += resp->conflicts;
            count_dropped(ev, resp->conflicts, "conflict");
            const log_field f[] = {{"session_id", ev->session_id}, {NULL, NULL}};
            log_fields(LOG_ERROR, f,
                       "%u events not stored: store-svc holds other events under their seqs "
                       "(another writer)",
                       resp->conflicts);
        }
        if (ev->batch_us != 0)
            metrics_histogram_observe(ev->g->mx.store_batch_seconds,
                                      (uint64_t)(lws_now_usecs() - ev->batch_us));
        return;
    }
    ev->batch = 0;
    if (r->code == RPC_NOT_FOUND || r->code == RPC_FAILED_PRECONDITION) {
        /* The session is gone, was ended elsewhere, or was taken over:
         * open it again as the writer we were (start_open names our
         * epoch), then send the same events with the same seqs. If another
         * writer has it now, that OpenSession is refused (taken_over). */
        ev->next_seq = 0;
        ev->flush_due = 1;
        return;
    }
    if (retryable(r->code)) {
        log_warn("AppendEvents for %s failed (%s: %s); retrying %zu events", ev->session_id,
                 rpc_code_name(r->code), r->message, sent);
        retry_later(ev);
        return;
    }
    drop_events(ev, sent, "refused", r->message);
}

static void handle_end(evlog *ev, reply *r)
{
    if (r->code == RPC_OK || r->code == RPC_NOT_FOUND) {
        ev->ended = 1;
        backoff_reset(&ev->retry);
        ev->keep.live = 0;
    } else if (r->code == RPC_FAILED_PRECONDITION) {
        /* Another writer has the session: it is not ours to end. */
        ev->ended = 1;
        taken_over(ev, r->message);
    } else {
        retry_later(ev);
    }
}

static void on_reply_loop(void *arg)
{
    reply *r = arg;
    evlog *ev = r->ev;
    ev->busy = 0;
    switch (r->kind) {
    case CALL_OPEN:
        handle_open(ev, r);
        break;
    case CALL_APPEND:
        handle_append(ev, r);
        break;
    case CALL_END:
        handle_end(ev, r);
        break;
    }
    if (r->resp != NULL)
        protobuf_c_message_free_unpacked(r->resp, NULL);
    mem_free(r->message);
    mem_free(r);
    pump(ev);
}

/* ---- calls ----------------------------------------------------------- */

static cli_opts store_opts(evlog *ev)
{
    cli_opts o = {.timeout_ms = ev->g->opts.store_timeout_ms};
    return o;
}

static void start_open(evlog *ev)
{
    Convo__V1__OpenSessionRequest req = CONVO__V1__OPEN_SESSION_REQUEST__INIT;
    req.session_id = ev->session_id;
    req.user_id = ev->user_id;
    /* Kept open while we renew it (keep.h); 0 without a lease. */
    req.live_seconds = ev->g->keep != NULL ? (int32_t)ev->g->opts.session_lease_secs : 0;
    /* 0 the first time and after a new connection took the session here
     * (we become the writer: the one before, on another gateway, is fenced
     * off); otherwise ours, so that a reopen never takes the session back
     * from a newer writer. */
    req.writer_epoch = ev->claim ? 0 : ev->epoch;
    ev->claim = 0;
    cli_opts o = store_opts(ev);
    ev->busy = 1;
    if (cli_unary(ev->g->store, &convo__v1__store__open_session__method, &req.base, &o,
                  on_open_reply, ev, NULL) != 0) {
        ev->busy = 0;
        retry_later(ev);
    }
}

static void start_append(evlog *ev)
{
    size_t n = waiting(ev);
    if (n > (size_t)ev->g->opts.event_batch)
        n = (size_t)ev->g->opts.event_batch;
    Convo__V1__Event *events = mem_calloc(n, sizeof *events);
    Convo__V1__Event **ptrs = mem_calloc(n, sizeof *ptrs);
    for (size_t i = 0; i < n; i++) {
        event *e = &ev->q[ev->head + i];
        if (e->seq == 0)
            e->seq = ev->next_seq++;
        convo__v1__event__init(&events[i]);
        events[i].seq = e->seq;
        events[i].type = e->type;
        events[i].content = e->content;
        events[i].timestamp_us = e->ts_us;
        ptrs[i] = &events[i];
    }
    Convo__V1__AppendEventsRequest req = CONVO__V1__APPEND_EVENTS_REQUEST__INIT;
    req.session_id = ev->session_id;
    req.user_id = ev->user_id;
    req.n_events = n;
    req.events = ptrs;
    req.writer_epoch = ev->epoch;
    cli_opts o = store_opts(ev);
    /* Under the first event's span, linked to the others of the batch;
     * the events of one span are consecutive, and share one trace_ref. */
    trace_ctx links[OTLP_MAX_LINKS];
    const trace_ref *prev = NULL;
    for (size_t i = 0; i < n; i++) {
        const trace_ref *r = ev->q[ev->head + i].trace;
        if (r == NULL || r == prev)
            continue;
        if (o.trace_parent == NULL)
            o.trace_parent = &r->ids;
        else if (o.n_trace_links < OTLP_MAX_LINKS)
            links[o.n_trace_links++] = r->ids.ctx;
        prev = r;
    }
    o.trace_links = links;
    ev->busy = 1;
    ev->batch = n;
    ev->flush_due = 0;
    ev->batch_us = ev->g->mx.store_batch_seconds != NULL ? lws_now_usecs() : 0;
    metrics_histogram_observe(ev->g->mx.store_batch_events, n);
    if (cli_unary(ev->g->store, &convo__v1__store__append_events__method, &req.base, &o,
                  on_append_reply, ev, NULL) != 0) {
        ev->busy = 0;
        ev->batch = 0;
        retry_later(ev);
    }
    mem_free(ptrs);
    mem_free(events);
}

static void start_end(evlog *ev)
{
    Convo__V1__EndSessionRequest req = CONVO__V1__END_SESSION_REQUEST__INIT;
    req.session_id = ev->session_id;
    req.user_id = ev->user_id;
    req.writer_epoch = ev->epoch;
    cli_opts o = store_opts(ev);
    ev->busy = 1;
    if (cli_unary(ev->g->store, &convo__v1__store__end_session__method, &req.base, &o, on_end_reply,
                  ev, NULL) != 0) {
        ev->busy = 0;
        retry_later(ev);
    }
}

static void summarize(evlog *ev)
{
    Convo__V1__SummarizeRequest req = CONVO__V1__SUMMARIZE_REQUEST__INIT;
    req.session_id = ev->session_id;
    cli_opts o = {.timeout_ms = ev->g->opts.store_timeout_ms};
    if (cli_unary(ev->g->summary, &convo__v1__summary__summarize__method, &req.base, &o,
                  on_summarize_reply, mem_strdup(ev->session_id), NULL) != 0)
        log_warn("could not ask summary-svc to summarize %s; its sweep will", ev->session_id);
}

/* Decides the next step; at most one call in flight. */
static void pump(evlog *ev)
{
    if (ev->busy || ev->timer_armed || ev->closed_fired)
        return;
    if (ev->claim && !ev->refused)
        ev->next_seq = 0; /* open it again first, as a new writer */
    if (ev->refused) {
        if (ev->closing)
            fire_closed(ev);
        return;
    }
    if (ev->closing && !ev->ended && ev->g->opts.event_retry_ms > 0 &&
        lws_now_usecs() / 1000 - ev->close_ms > ev->g->opts.event_retry_ms &&
        ev->retry.attempts > 0) {
        drop_events(ev, waiting(ev), "store_unreachable",
                    "store-svc unreachable for longer than --event-retry-ms");
        ev->ended = 1;
    }
    if (!ev->ended && ev->next_seq == 0) {
        start_open(ev);
    } else if (!ev->ended && waiting(ev) > 0) {
        /* With --store-before-send frames wait for their events: each
         * batch goes as soon as the one before it is stored (what arrived
         * meanwhile goes together), never after --event-flush-ms. */
        if (ev->flush_due || ev->closing || ev->g->opts.store_before_send ||
            waiting(ev) >= (size_t)ev->g->opts.event_batch)
            start_append(ev);
        else
            arm(ev, (int)ev->g->opts.event_flush_ms);
    } else if (ev->closing && !ev->ended) {
        start_end(ev);
    } else if (ev->closing && ev->ended) {
        if (waiting(ev) == 0 && ev->dropped == 0)
            summarize(ev);
        fire_closed(ev);
    }
}

/* ---- API ------------------------------------------------------------- */

evlog *evlog_create(gw *g, const char *session_id, const char *user_id, evlog_open_fn on_open,
                    void *arg)
{
    evlog *ev = mem_calloc(1, sizeof *ev);
    ev->g = g;
    ev_timer_init(&ev->timer, on_timer, 0., 0.);
    ev->timer.data = ev;
    ev_timer_init(&ev->closed_timer, on_closed_timer, 0., 0.);
    ev->closed_timer.data = ev;
    ev->session_id = mem_strdup(session_id);
    ev->user_id = mem_strdup(user_id);
    ev->on_open = on_open;
    ev->arg = arg;
    backoff_init(&ev->retry, RETRY_FIRST_MS, RETRY_MAX_MS, BACKOFF_FULL);
    ev->keep.session_id = ev->session_id;
    keep_add(g->keep, &ev->keep);
    pump(ev);
    return ev;
}

void evlog_add(evlog *ev, Convo__V1__EventType type, const char *content, size_t len,
               const trace_span *trace)
{
    ev->added++;
    if (ev->abandoned) {
        settled(ev);
        return;
    }
    if (ev->refused) {
        ev->dropped++;
        count_dropped(ev, 1, ev->taken_over ? "taken_over" : "refused");
        settled(ev);
        return;
    }
    if (waiting(ev) >= (size_t)ev->g->opts.event_buffer) {
        ev->dropped++;
        count_dropped(ev, 1, "buffer_full");
        settled(ev);
        if (ev->dropped == 1 || ev->dropped % 1000 == 0) {
            const log_field f[] = {{"session_id", ev->session_id}, {NULL, NULL}};
            log_fields(LOG_ERROR, f,
                       "event buffer full (%lld events waiting for store-svc, --event-buffer): "
                       "%lu events dropped so far",
                       ev->g->opts.event_buffer, ev->dropped);
        }
        return;
    }
    if (ev->head > 0 && ev->head == ev->n) {
        ev->head = ev->n = 0;
    } else if (ev->n == ev->cap && ev->head > ev->cap / 2) {
        memmove(ev->q, ev->q + ev->head, (ev->n - ev->head) * sizeof *ev->q);
        ev->n -= ev->head;
        ev->head = 0;
    }
    if (ev->n == ev->cap) {
        ev->cap = ev->cap ? 2 * ev->cap : 64;
        ev->q = mem_realloc(ev->q, ev->cap * sizeof *ev->q);
    }
    event *e = &ev->q[ev->n++];
    e->type = type;
    e->content = mem_strndup(content, len);
    e->len = len;
    e->ts_us = now_us();
    e->seq = 0;
    e->idx = ev->added;
    e->trace = trace_of(ev, trace);
    atomic_fetch_add(&ev->g->counters.events_buffered, 1);
    account(ev->g, (long)(len + EVENT_OVERHEAD_BYTES));
    pump(ev);
}

void evlog_close(evlog *ev, evlog_closed_fn on_closed)
{
    ev->on_closed = on_closed;
    ev->closing = 1;
    ev->close_ms = lws_now_usecs() / 1000;
    if (ev->timer_armed && ev->retry.attempts == 0) {
        /* A flush timer: flush now instead. */
        ev_timer_stop(ev->g->loop, &ev->timer);
        ev->timer_armed = 0;
    }
    pump(ev);
}

void evlog_abandon(evlog *ev)
{
    release(ev, waiting(ev));
    ev->head = ev->n = 0;
    ev->open_reported = 1; /* the session has its answer */
    ev->abandoned = 1;
    ev->refused = 1;
}

void evlog_reopen(evlog *ev)
{
    ev_timer_stop(ev->g->loop, &ev->closed_timer);
    ev->closing = 0;
    ev->closed_fired = 0;
    if (ev->ended) {
        ev->ended = 0;
        ev->next_seq = 0;
    }
    pump(ev);
}

void evlog_claim(evlog *ev)
{
    ev->claim = 1;
    pump(ev);
}

uint64_t evlog_added(const evlog *ev)
{
    return ev->added;
}

uint64_t evlog_settled(const evlog *ev)
{
    /* Stored and dropped events leave from the head, in order: all before
     * the first one waiting are settled. An event dropped on arrival while
     * others wait is settled with them. */
    return waiting(ev) == 0 ? ev->added : ev->q[ev->head].idx - 1;
}

void evlog_on_taken_over(evlog *ev, evlog_taken_fn fn)
{
    ev->on_taken_over = fn;
}

void evlog_on_settled(evlog *ev, evlog_settled_fn fn, void *arg)
{
    ev->on_settled = fn;
    ev->settled_arg = arg;
}

int evlog_full(const gw *g)
{
    return g->events_full;
}

void evlog_metrics_init(gw *g)
{
    static const char *const reasons[] = {"buffer_full", "refused",    "store_unreachable",
                                          "shutdown",    "taken_over", "conflict"};
    for (size_t i = 0; i < sizeof reasons / sizeof reasons[0]; i++)
        metrics_counter_of(g->mx.events_dropped, (const char *[]){reasons[i]});
}

void evlog_destroy(evlog **evp)
{
    evlog *ev = *evp;
    if (ev == NULL)
        return;
    *evp = NULL;
    keep_remove(ev->g->keep, &ev->keep);
    ev->on_settled = NULL; /* its owner is going away */
    ev_timer_stop(ev->g->loop, &ev->timer);
    ev_timer_stop(ev->g->loop, &ev->closed_timer);
    size_t left = waiting(ev);
    if (left > 0)
        drop_events(ev, left, "shutdown", "the gateway is stopping");
    trace_unref(ev->last_trace);
    mem_free(ev->q);
    mem_free(ev->session_id);
    mem_free(ev->user_id);
    mem_free(ev);
}
