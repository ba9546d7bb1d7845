#include "session.h"

#include "convo_methods.h"
#include "defroute.h"
#include "evlog.h"
#include "frame.h"
#include "history.h"
#include "lim.h"
#include "log.h"
#include "mem.h"
#include "names.h"
#include "trace.h"

#include <ev.h>
#include <json-c/json.h>
#include <libwebsockets.h>
#include <string.h>

#define BUCKETS    4096      /* of the session table */
#define ANSWER_CAP (1 << 20) /* an answer's text kept in history */
#define RID_MAX    160       /* a turn's request id: session id / turn id */
#define MS_PER_S   1000.0

typedef struct session session;
typedef struct turn turn;
typedef struct held held;

struct session {
    ev_timer end_timer;  /* --end-grace-ms */
    ev_timer open_timer; /* --open-timeout-ms */
    gw *g;
    char *id;
    char *user_id;
    conn *conn;
    evlog *log;
    hist *history;
    int refs;          /* the connection, each call in flight, the evlog until closed */
    int open_answered; /* OpenSession answered */
    int verified;      /* OpenSession confirmed the owner */
    int linked;        /* in the session table */
    int counted_new;   /* taken from the user's new-session limit */
    int loading;       /* reading the stored events */
    int ending;        /* evlog_close called */
    int end_timer_armed;
    int resumed;
    int history_loaded;
    int held;      /* counted in the user's --max-sessions-per-user */
    int load_skip; /* a resume's window: events before its first user message are skipped */
    int64_t stored_users, stored_tools; /* a resumed session's counts, as the store has them */

    turn *cur;
    held *held_head, *held_tail; /* frames waiting for their events (--store-before-send) */
    char **queue;                /* messages waiting for their turn */
    size_t nqueue;
    uint64_t next_turn_id;

    atomic_long out_bytes; /* charged frames not yet written */
    atomic_int paused;     /* the answer stream is paused for the client */

    session *next; /* in its registry bucket */
};

struct turn {
    session *s;
    uint64_t id;
    char *message;
    /* Owned by the Route call until its callback, which sends and frees it. */
    Convo__V1__ChatRequest *chat_req;
    cli_call *route; /* until the route decision reaches the loop */
    cli_call *chat;
    int cancelled;
    int terminal; /* a done or error event arrived */
    int64_t start_ms;
    char rid[RID_MAX]; /* names the turn in logs, gRPC metadata and error frames */
    /* For the metrics: when it started, the strategy and the outcome words,
     * and whether a token went out yet. */
    int64_t start_us;
    const char *strategy;
    const char *outcome;
    int first_token_sent;
    const char *degraded; /* the default route's reason word (defroute.h); NULL: router-svc's */
    int probe;            /* its Route probes router-svc during an outage */
    /* The turn's span: a child of the connection's traceparent, or the
     * root of a trace of its own; Route, Chat and the event writes are
     * its children. Loop thread, and read (never changed) by the gRPC
     * thread that starts Chat. */
    trace_span span;
};

struct sess_table {
    gw *g;
    session *buckets[BUCKETS];
    size_t live;
};

static void sess_unref(session *s);
static void start_next_turn(session *s);
static void sess_on_sent(void *peer, long charge);
static void sess_on_text(void *peer, const char *data, size_t len);
static void sess_detach(void *peer, conn *c);
static session *attach(sess_table *t, conn *c, const char *id, const char *user_id, int known);

/* What the connection attached to a session calls. */
static const conn_peer_ops sess_peer_ops = {sess_on_text, sess_on_sent, sess_detach};

static const char *category_code(Convo__V1__ErrorCategory c, const char **text);

/* ---- registry ------------------------------------------------------- */

/* Every series of the turn metrics whose words are known, made at 0 now:
 * a series born with its first count would hide that count from rate(). */
static void make_turn_series(gw *g)
{
    static const char *const outcomes[] = {"done", "error", "cancelled"};
    static const char *const codes[] = {"llm_unavailable", "router_unavailable", "timeout",
                                        "internal"};
    const gw_metrics *mx = &g->mx;
    for (int s = CONVO__V1__STRATEGY__STRATEGY_UNSPECIFIED;
         s <= CONVO__V1__STRATEGY__STRATEGY_TOOL_HEAVY; s++) {
        const char *name = s == CONVO__V1__STRATEGY__STRATEGY_UNSPECIFIED
                               ? "none"
                               : names_strategy((Convo__V1__Strategy)s);
        for (size_t o = 0; o < sizeof outcomes / sizeof outcomes[0]; o++)
            metrics_counter_of(mx->turns, (const char *[]){name, outcomes[o]});
        metrics_histogram_of(mx->turn_seconds, (const char *[]){name});
        if (s != CONVO__V1__STRATEGY__STRATEGY_UNSPECIFIED)
            metrics_histogram_of(mx->first_token, (const char *[]){name});
    }
    for (int c = CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_UNSPECIFIED;
         c <= CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_INTERNAL; c++) {
        const char *text;
        metrics_counter_of(mx->turn_errors,
                           (const char *[]){category_code((Convo__V1__ErrorCategory)c, &text)});
    }
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++)
        metrics_counter_of(mx->turn_errors, (const char *[]){codes[i]});
    static const char *const degraded[] = {DEFROUTE_UNAVAILABLE, DEFROUTE_TIMEOUT, DEFROUTE_ERROR,
                                           DEFROUTE_OUTAGE};
    for (size_t i = 0; i < sizeof degraded / sizeof degraded[0]; i++)
        metrics_counter_of(mx->turns_degraded, (const char *[]){degraded[i]});
    for (int k = 0; k < LIM_KINDS; k++)
        metrics_counter_of(mx->rate_limited, (const char *[]){lim_name((lim_kind)k)});
    metrics_counter_of(mx->rate_limited, (const char *[]){"queued_messages"});
    metrics_counter_of(mx->rate_limited, (const char *[]){"event_buffer"});
}

sess_table *sess_table_create(gw *g)
{
    sess_table *t = mem_calloc(1, sizeof *t);
    t->g = g;
    make_turn_series(g);
    return t;
}

static size_t bucket_of(const char *id)
{
    uint64_t h = 1469598103934665603ULL;
    for (const unsigned char *p = (const unsigned char *)id; *p; p++)
        h = (h ^ *p) * 1099511628211ULL;
    return (size_t)(h % BUCKETS);
}

static session *find(sess_table *t, const char *id)
{
    for (session *s = t->buckets[bucket_of(id)]; s != NULL; s = s->next)
        if (strcmp(s->id, id) == 0)
            return s;
    return NULL;
}

static void unlink_session(sess_table *t, session *s)
{
    for (session **p = &t->buckets[bucket_of(s->id)]; *p != NULL; p = &(*p)->next) {
        if (*p == s) {
            *p = s->next;
            return;
        }
    }
}

size_t sess_count(const sess_table *t)
{
    return t->live;
}

/* ---- output ---------------------------------------------------------- */

/* A frame held back by --store-before-send until the events recorded
 * before it are settled (stored, or dropped for good). */
struct held {
    held *next;
    char *frame;
    size_t len;
    long charge;
    uint64_t after;       /* shown once this many events are settled */
    int64_t first_us;     /* a turn's first token: the turn's start (the metric), else 0 */
    const char *strategy; /* and its strategy */
};

static void observe_first_token(session *s, const char *strategy, int64_t start_us)
{
    if (s->g->mx.first_token != NULL)
        metrics_histogram_observe(
            metrics_histogram_of(s->g->mx.first_token, (const char *[]){strategy}),
            (uint64_t)(lws_now_usecs() - start_us));
}

/* Writes a frame whose `charge` is already counted in out_bytes; with no
 * connection the charge is given back at once. */
static void deliver(session *s, char *frame, size_t len, long charge)
{
    if (s->conn == NULL) {
        mem_free(frame);
        sess_on_sent(s, charge);
        return;
    }
    conn_send(s->conn, frame, len, charge);
}

/* The held frames whose events are settled go out, in order. */
static void release_held(session *s, uint64_t settled)
{
    while (s->held_head != NULL && s->held_head->after <= settled) {
        held *h = s->held_head;
        s->held_head = h->next;
        if (s->held_head == NULL)
            s->held_tail = NULL;
        if (h->first_us != 0)
            observe_first_token(s, h->strategy, h->first_us);
        deliver(s, h->frame, h->len, h->charge);
        mem_free(h);
    }
}

static void on_settled(void *arg, uint64_t settled)
{
    release_held(arg, settled);
}

/* Sends a frame whose `charge` is counted: at once, or with
 * --store-before-send once every event recorded so far is settled (the
 * frame shows nothing that is not stored; the order of frames is kept).
 * first: the turn whose first token this is (the metric), else NULL. */
static void show(session *s, char *frame, size_t len, long charge, const turn *first)
{
    if (!s->g->opts.store_before_send) {
        if (first != NULL)
            observe_first_token(s, first->strategy, first->start_us);
        deliver(s, frame, len, charge);
        return;
    }
    held *h = mem_calloc(1, sizeof *h);
    h->frame = frame;
    h->len = len;
    h->charge = charge;
    h->after = evlog_added(s->log);
    if (first != NULL) {
        h->first_us = first->start_us;
        h->strategy = first->strategy;
    }
    if (s->held_tail != NULL)
        s->held_tail->next = h;
    else
        s->held_head = h;
    s->held_tail = h;
    release_held(s, evlog_settled(s->log));
}

static void send_charged(session *s, char *frame, size_t len, long charge)
{
    show(s, frame, len, charge, NULL);
}

static void send_frame(session *s, char *frame, size_t len)
{
    atomic_fetch_add(&s->out_bytes, (long)len);
    send_charged(s, frame, len, (long)len);
}

/* An error frame; a turn's carries the turn's request id. */
static void send_error(session *s, const char *code, const char *content, const turn *t)
{
    size_t len;
    char *f = frame_error(code, content, t != NULL ? t->id : 0, t != NULL ? t->rid : NULL, &len);
    send_frame(s, f, len);
}

static int64_t now_ms(void)
{
    return lws_now_usecs() / LWS_US_PER_MS;
}

/* `charge` bytes of frames left the connection's queue (written or
 * dropped); may resume a paused answer stream. */
static void sess_on_sent(void *peer, long charge)
{
    session *s = peer;
    long left = atomic_fetch_sub(&s->out_bytes, charge) - charge;
    if (left <= s->g->opts.max_out_bytes / 2 && atomic_exchange(&s->paused, 0) && s->cur != NULL &&
        s->cur->chat != NULL)
        cli_call_resume(s->cur->chat);
}

/* Nobody reads for the session now (the connection's queued frames gave
 * their charges back when it was closed): let a paused answer go on. */
static void reset_output(session *s)
{
    if (atomic_exchange(&s->paused, 0) && s->cur != NULL && s->cur->chat != NULL)
        cli_call_resume(s->cur->chat);
}

/* Closes the attached connection with an error and detaches it. */
static void kick(session *s, int code, const char *error_code, const char *reason)
{
    conn *c = s->conn;
    if (c == NULL)
        return;
    conn_close(c, code, error_code, reason);
    sess_detach(s, c);
}

/* Logs an event and applies it to the history: the one path every event
 * takes, so the live history equals one rebuilt from the store. */
static void record(session *s, Convo__V1__EventType type, const char *content, size_t len)
{
    /* The event is written under its turn's trace (or, between turns, the
     * connection's handshake's). */
    evlog_add(s->log, type, content, len, s->cur != NULL ? &s->cur->span : trace_current());
    hist_apply(s->history, type, content, len);
}

static void record_json(session *s, Convo__V1__EventType type, json_object *o)
{
    size_t len;
    const char *text = json_object_to_json_string_length(
        o, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE, &len);
    record(s, type, text, len);
    json_object_put(o);
}

static void record_system(session *s, const char *event, uint64_t turn_id, const char *detail)
{
    json_object *o = json_object_new_object();
    json_object_object_add(o, "event", json_object_new_string(event));
    if (turn_id != 0)
        json_object_object_add(o, "turn_id", json_object_new_int64((int64_t)turn_id));
    if (detail != NULL)
        json_object_object_add(o, "detail", json_object_new_string(detail));
    record_json(s, CONVO__V1__EVENT_TYPE__EVENT_TYPE_SYSTEM_EVENT, o);
}

/* ---- turns ----------------------------------------------------------- */

/* convo_gateway_turns_total and the turn's duration. */
static void count_turn(session *s, turn *t)
{
    const gw_metrics *mx = &s->g->mx;
    const char *outcome = t->outcome != NULL ? t->outcome : "error";
    trace_span_set_str(&t->span, "convo.strategy", t->strategy);
    trace_span_set_str(&t->span, "convo.outcome", outcome);
    if (mx->turns == NULL)
        return;
    metrics_counter_inc(metrics_counter_of(mx->turns, (const char *[]){t->strategy, outcome}));
    metrics_histogram_observe(metrics_histogram_of(mx->turn_seconds, (const char *[]){t->strategy}),
                              (uint64_t)(lws_now_usecs() - t->start_us));
}

/* The turn failed with error frame `code`, told to the client. */
static void count_error(session *s, turn *t, const char *code)
{
    t->outcome = "error";
    trace_span_set_str(&t->span, "error.type", code);
    trace_span_error(&t->span, "the turn ended with error %s", code);
    atomic_fetch_add(&s->g->counters.turn_errors, 1);
    metrics_counter_inc(metrics_counter_of(s->g->mx.turn_errors, (const char *[]){code}));
}

static void end_turn(session *s, turn *t)
{
    count_turn(s, t);
    const trace_span *prev = trace_set_current(&t->span);
    const log_field f[] = {{"session_id", s->id}, {"request_id", t->rid}, {NULL, NULL}};
    log_fields(LOG_DEBUG, f, "turn %llu ended: %s (strategy %s) in %lld ms",
               (unsigned long long)t->id, t->outcome != NULL ? t->outcome : "error", t->strategy,
               (long long)(now_ms() - t->start_ms));
    trace_set_current(prev);
    trace_span_end(&t->span);
    if (trace_current() == &t->span)
        trace_set_current(NULL); /* t is freed below */
    if (s->cur == t)
        s->cur = NULL;
    hist_end_turn(s->history);
    if (t->chat != NULL)
        cli_call_release(&t->chat);
    atomic_store(&s->paused, 0);
    mem_free(t->message);
    mem_free(t);
    start_next_turn(s);
}

/* The answer ended without a done event: say why, plainly. */
static void fail_turn(session *s, turn *t, const char *code, const char *content)
{
    if (t->cancelled) {
        size_t len;
        record_system(s, "turn_cancelled", t->id, NULL);
        char *f = frame_done(t->id, "cancelled", NULL, NULL, NULL, t->degraded != NULL, &len);
        send_frame(s, f, len);
        t->outcome = "cancelled";
    } else {
        record_system(s, "turn_failed", t->id, code);
        send_error(s, code, content, t);
        count_error(s, t, code);
    }
}

typedef struct chat_job {
    turn *t;
    Convo__V1__ChatEvent *ev; /* NULL: the call ended */
    long charge;              /* counted in out_bytes when the event was read */
    rpc_code code;
    char *message;
} chat_job;

/* What llm-svc's error categories tell the client: a code and a short
 * text of the gateway's own. The upstream's message (its body, raw chunk
 * bytes, addresses) goes to the log only. */
static const char *category_code(Convo__V1__ErrorCategory c, const char **text)
{
    switch (c) {
    case CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_RATE_LIMITED:
        *text = "The language model is busy (rate limited); please send your message again in "
                "a moment.";
        return "rate_limited";
    case CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_AUTH_FAILED:
        *text = "The answer failed: the gateway could not authenticate to the language model.";
        return "upstream_auth_failed";
    case CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_MODEL_NOT_FOUND:
        *text = "The answer failed: the configured language model does not exist.";
        return "model_not_found";
    case CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_UPSTREAM_UNAVAILABLE:
        *text = "The answer failed: the language model is unavailable. Your session is intact; "
                "please send your message again.";
        return "upstream_unavailable";
    case CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_TIMEOUT:
        *text = "The answer failed: the language model took too long. Your session is intact; "
                "please send your message again.";
        return "upstream_timeout";
    case CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_BAD_UPSTREAM_DATA:
        *text = "The answer failed: the language model sent something unreadable. Please send "
                "your message again.";
        return "bad_upstream_data";
    case CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_INVALID_REQUEST:
        *text = "The answer failed: the language model refused the request.";
        return "invalid_request";
    default:
        *text = "The answer failed on the server's side. Please send your message again.";
        return "internal";
    }
}

/* What the turn cost: on the done frame, in the log of events (so spend
 * per user is a query, see the README) and against the user's limit. */
static void account_usage(session *s, turn *t, const Convo__V1__DoneEvent *d)
{
    json_object *o = json_object_new_object();
    json_object_object_add(o, "event", json_object_new_string("usage"));
    json_object_object_add(o, "turn_id", json_object_new_int64((int64_t)t->id));
    json_object_object_add(o, "prompt_tokens", json_object_new_int64(d->usage->prompt_tokens));
    json_object_object_add(o, "completion_tokens",
                           json_object_new_int64(d->usage->completion_tokens));
    json_object_object_add(o, "total_tokens", json_object_new_int64(d->usage->total_tokens));
    if (d->model != NULL && d->model[0] != '\0')
        json_object_object_add(o, "model", json_object_new_string(d->model));
    record_json(s, CONVO__V1__EVENT_TYPE__EVENT_TYPE_SYSTEM_EVENT, o);
    lim_charge(s->g->limits, LIM_TOKENS, s->user_id, (double)d->usage->total_tokens, now_ms());
}

static void tool_event_json(session *s, Convo__V1__EventType type, const char *id, const char *tool,
                            const char *key, const char *json_text)
{
    json_object *o = json_object_new_object();
    json_object_object_add(o, "id", json_object_new_string(id));
    json_object_object_add(o, "tool", json_object_new_string(tool));
    json_object *v = json_text != NULL && json_text[0] ? json_tokener_parse(json_text) : NULL;
    json_object_object_add(o, key,
                           v != NULL ? v : json_object_new_string(json_text ? json_text : ""));
    record_json(s, type, o);
}

/* Relays one event as one frame, which carries the event's charge. */
static void on_chat_event(session *s, turn *t, const Convo__V1__ChatEvent *ev, long charge)
{
    size_t len;
    char *f = NULL;
    switch (ev->event_case) {
    case CONVO__V1__CHAT_EVENT__EVENT_TOKEN:
        /* Recorded before it is sent: with --store-before-send a frame
         * waits for the events recorded before it, its own included. */
        record(s, CONVO__V1__EVENT_TYPE__EVENT_TYPE_AI_TOKEN, ev->token->content,
               strlen(ev->token->content));
        f = frame_token(ev->token->content, t->id, &len);
        if (!t->first_token_sent)
            trace_span_event(&t->span, "first_token");
        show(s, f, len, charge, t->first_token_sent ? NULL : t);
        t->first_token_sent = 1;
        metrics_counter_inc(s->g->mx.tokens);
        break;
    case CONVO__V1__CHAT_EVENT__EVENT_TOOL_CALL: {
        const Convo__V1__ToolCallEvent *c = ev->tool_call;
        tool_event_json(s, CONVO__V1__EVENT_TYPE__EVENT_TYPE_TOOL_CALL, c->call_id, c->name,
                        "arguments", c->arguments_json);
        f = frame_tool_call(c->name, c->call_id, c->arguments_json, t->id, &len);
        send_charged(s, f, len, charge);
        break;
    }
    case CONVO__V1__CHAT_EVENT__EVENT_TOOL_RESULT: {
        const Convo__V1__ToolResultEvent *r = ev->tool_result;
        tool_event_json(s, CONVO__V1__EVENT_TYPE__EVENT_TYPE_TOOL_RESULT, r->call_id, r->name,
                        "result", r->result_json);
        f = frame_tool_result(r->name, r->call_id, r->result_json, r->is_error, t->id, &len);
        send_charged(s, f, len, charge);
        break;
    }
    case CONVO__V1__CHAT_EVENT__EVENT_DONE: {
        const Convo__V1__DoneEvent *d = ev->done;
        frame_usage u = {0};
        if (d->usage != NULL) {
            u.prompt_tokens = d->usage->prompt_tokens;
            u.completion_tokens = d->usage->completion_tokens;
            u.total_tokens = d->usage->total_tokens;
        }
        t->terminal = 1;
        t->outcome = "done";
        hist_end_turn(s->history);
        if (d->usage != NULL)
            account_usage(s, t, d);
        f = frame_done(t->id, "completed", d->finish_reason, d->usage != NULL ? &u : NULL,
                       d->upstream, t->degraded != NULL, &len);
        send_charged(s, f, len, charge);
        break;
    }
    case CONVO__V1__CHAT_EVENT__EVENT_ERROR: {
        const char *text;
        const char *code = category_code(ev->error->category, &text);
        const log_field lf[] = {{"session_id", s->id}, {"request_id", t->rid}, {NULL, NULL}};
        log_fields(LOG_WARN, lf, "turn %llu failed in llm-svc (%s): %s", (unsigned long long)t->id,
                   code, ev->error->message);
        t->terminal = 1;
        record_system(s, "turn_failed", t->id, code);
        f = frame_error(code, text, t->id, t->rid, &len);
        send_charged(s, f, len, charge);
        count_error(s, t, code);
        break;
    }
    default:
        sess_on_sent(s, charge);
        break;
    }
}

static void on_chat_job(void *arg)
{
    chat_job *j = arg;
    turn *t = j->t;
    session *s = t->s;
    const trace_span *prev = trace_set_current(&t->span);
    if (j->ev != NULL) {
        if (!t->cancelled && !t->terminal)
            on_chat_event(s, t, j->ev, j->charge);
        else
            sess_on_sent(s, j->charge);
        protobuf_c_message_free_unpacked(&j->ev->base, NULL);
    } else {
        if (!t->terminal) {
            int timeout = j->code == RPC_DEADLINE_EXCEEDED;
            if (!t->cancelled) {
                const log_field f[] = {{"session_id", s->id}, {"request_id", t->rid}, {NULL, NULL}};
                log_fields(LOG_WARN, f, "turn %llu failed: Llm.Chat ended with %s: %s",
                           (unsigned long long)t->id, rpc_code_name(j->code), j->message);
            }
            fail_turn(s, t, timeout ? "timeout" : "llm_unavailable",
                      timeout ? "The answer failed: the language model took too long. Your "
                                "session is intact; please send your message again."
                              : "The answer failed: the language model service is unavailable. "
                                "Your session is intact; please send your message again.");
        }
        end_turn(s, t);
        sess_unref(s);
    }
    trace_set_current(prev);
    mem_free(j->message);
    mem_free(j);
}

/* gRPC thread: copy, post, and pause while the client is behind. */
static int on_chat_msg(void *arg, const ProtobufCMessage *msg)
{
    turn *t = arg;
    session *s = t->s;
    chat_job *j = mem_calloc(1, sizeof *j);
    j->t = t;
    size_t n = protobuf_c_message_get_packed_size(msg);
    uint8_t stackbuf[512];
    uint8_t *buf = n <= sizeof stackbuf ? stackbuf : mem_alloc(n);
    protobuf_c_message_pack(msg, buf);
    j->ev = (Convo__V1__ChatEvent *)protobuf_c_message_unpack(&convo__v1__chat_event__descriptor,
                                                              NULL, n, buf);
    if (buf != stackbuf)
        mem_free(buf);
    /* Counted now, not when the loop queues the frame: events waiting in
     * the bridge are the client's backlog too, and the pause must see them. */
    j->charge = (long)n + 48; /* about the frame it becomes */
    long pending = atomic_fetch_add(&s->out_bytes, j->charge) + j->charge;
    int pause = pending > s->g->opts.max_out_bytes;
    /* Flagged before the event is posted: the loop resumes the stream when
     * it writes this event's frame or a later one, so it must already see
     * the flag then, or nothing would ever resume it. */
    if (pause && !atomic_exchange(&s->paused, 1))
        metrics_counter_inc(s->g->mx.pauses);
    bridge_post(s->g->bridge, on_chat_job, j);
    return pause;
}

static void on_chat_done(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp)
{
    turn *t = arg;
    chat_job *j = mem_calloc(1, sizeof *j);
    j->t = t;
    j->code = code;
    j->message = mem_strdup(message != NULL ? message : "");
    bridge_post(t->s->g->bridge, on_chat_job, j);
}

/* The turn's Chat request without what Route decides, built on the loop
 * when the turn starts. Packed and unpacked: a copy owning its memory, so
 * the gRPC thread that sends it when Route answers shares nothing with the
 * live history. NULL when out of memory. */
static Convo__V1__ChatRequest *chat_request(session *s, turn *t)
{
    Convo__V1__Message **msgs;
    size_t n = hist_view(s->history, &msgs);
    /* The last message is this turn's (applied when the turn started); the
     * request carries it separately. */
    if (n > 0 && msgs[n - 1]->role == CONVO__V1__ROLE__ROLE_USER)
        n--;
    Convo__V1__ChatRequest req = CONVO__V1__CHAT_REQUEST__INIT;
    req.session_id = s->id;
    req.user_id = s->user_id;
    req.n_history = n;
    req.history = msgs;
    req.message = t->message;
    char turn_id[24];
    snprintf(turn_id, sizeof turn_id, "%llu", (unsigned long long)t->id);
    req.turn_id = turn_id;
    size_t len = protobuf_c_message_get_packed_size(&req.base);
    uint8_t *buf = mem_alloc(len);
    protobuf_c_message_pack(&req.base, buf);
    Convo__V1__ChatRequest *copy = convo__v1__chat_request__unpack(NULL, len, buf);
    mem_free(buf);
    return copy;
}

/* Starts the turn's Llm.Chat with the route's prompt and parameters
 * (borrowed for the call, then given back: the route owns them). Any
 * thread; reads only what does not change during the turn. NULL when the
 * call could not be started. */
static cli_call *start_chat(turn *t, Convo__V1__ChatRequest *req,
                            const Convo__V1__RouteResponse *route)
{
    cli_call *chat = NULL;
    req->system_prompt = route->system_prompt;
    req->params = route->params;
    cli_opts o = {.timeout_ms = t->s->g->opts.chat_timeout_ms,
                  .request_id = t->rid,
                  .trace_parent = &t->span};
    if (cli_stream(t->s->g->llm, &convo__v1__llm__chat__method, &req->base, &o, on_chat_msg,
                   on_chat_done, t, &chat) != 0)
        chat = NULL;
    req->system_prompt = NULL;
    req->params = NULL;
    return chat;
}

/* The answer is under way with `route` (degraded: the default route's
 * reason word, or NULL for router-svc's): the route decision is logged
 * before any of the answer's events (they reach the loop after this). */
static void answer_started(session *s, turn *t, const Convo__V1__RouteResponse *route,
                           cli_call *chat, const char *degraded)
{
    t->strategy = names_strategy(route->strategy);
    t->chat = chat;
    t->degraded = degraded;
    if (degraded != NULL)
        trace_span_set_str(&t->span, "convo.route_degraded", degraded);
    s->refs++; /* the Chat call's, given back when it ends */
    json_object *o = json_object_new_object();
    json_object_object_add(o, "event",
                           json_object_new_string(degraded != NULL ? "route_degraded" : "route"));
    json_object_object_add(o, "turn_id", json_object_new_int64((int64_t)t->id));
    json_object_object_add(o, "strategy", json_object_new_string(route->strategy_name));
    if (degraded != NULL) {
        json_object_object_add(o, "reason", json_object_new_string(degraded));
        defroute_count(s->g->defroute);
        metrics_counter_inc(
            metrics_counter_of(s->g->mx.turns_degraded, (const char *[]){degraded}));
    }
    json_object *reasons = json_object_new_array();
    for (size_t i = 0; i < route->n_reasons; i++)
        json_object_array_add(reasons, json_object_new_string(route->reasons[i]));
    json_object_object_add(o, "reasons", reasons);
    record_json(s, CONVO__V1__EVENT_TYPE__EVENT_TYPE_SYSTEM_EVENT, o);
    /* Cancelled while Route ran: the answer ends as soon as it began. */
    if (t->cancelled)
        cli_call_cancel(t->chat);
}

typedef struct route_job {
    turn *t;
    rpc_code code;
    char *message;
    Convo__V1__RouteResponse *resp;
    const char *degraded; /* the default route was taken: why (defroute.h) */
    cli_call *chat;       /* started when Route answered; NULL: not started */
} route_job;

static void on_route_job(void *arg)
{
    route_job *j = arg;
    turn *t = j->t;
    session *s = t->s;
    const trace_span *prev = trace_set_current(&t->span);
    cli_call_release(&t->route);
    defroute_result(s->g->defroute, t->probe, j->code, j->message, now_ms());
    if (j->degraded != NULL) {
        /* Logged once per outage by defroute; per turn only at debug. */
        const log_field f[] = {{"session_id", s->id}, {"request_id", t->rid}, {NULL, NULL}};
        log_fields(LOG_DEBUG, f,
                   "turn %llu takes the default route: Router.Route ended with %s: %s",
                   (unsigned long long)t->id, rpc_code_name(j->code), j->message);
    }
    if (j->chat != NULL) {
        answer_started(s, t, j->resp != NULL ? j->resp : defroute_response(s->g->defroute), j->chat,
                       j->degraded);
    } else if (j->code != RPC_OK && j->degraded == NULL) {
        /* Route was cancelled: by a cancel (told as such), or by
         * router-svc itself. */
        const char *content = "The answer failed: the routing service is unavailable. Your "
                              "session is intact; please send your message again.";
        fail_turn(s, t, "router_unavailable", content);
        end_turn(s, t);
    } else {
        fail_turn(s, t, "internal", "The answer could not be started; please try again.");
        end_turn(s, t);
    }
    if (j->resp != NULL)
        protobuf_c_message_free_unpacked(&j->resp->base, NULL);
    mem_free(j->message);
    mem_free(j);
    trace_set_current(prev);
    sess_unref(s);
}

/* gRPC thread: Route answered (or failed: then the default route), so
 * Chat starts here rather than one hop later on the loop. Its callbacks
 * run on this thread after this returns (cli.h), so the route job posted
 * below reaches the loop before any Chat event. */
static void on_route_done(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp)
{
    turn *t = arg;
    session *s = t->s;
    route_job *j = mem_calloc(1, sizeof *j);
    j->t = t;
    j->code = code;
    j->message = mem_strdup(message != NULL ? message : "");
    j->resp = (Convo__V1__RouteResponse *)resp;
    j->degraded = defroute_reason(code);
    Convo__V1__ChatRequest *req = t->chat_req;
    t->chat_req = NULL;
    if (code == RPC_OK)
        j->chat = start_chat(t, req, j->resp);
    else if (j->degraded != NULL)
        j->chat = start_chat(t, req, defroute_response(s->g->defroute));
    protobuf_c_message_free_unpacked(&req->base, NULL);
    bridge_post(s->g->bridge, on_route_job, j);
}

static void launch(session *s, turn *t);

/* Starts a turn for `message` (owned by the turn from here), under its
 * span. */
static void start_turn(session *s, char *message)
{
    turn *t = mem_calloc(1, sizeof *t);
    t->s = s;
    t->id = ++s->next_turn_id;
    t->message = message;
    t->start_ms = now_ms();
    snprintf(t->rid, sizeof t->rid, "%s/%llu", s->id, (unsigned long long)t->id);
    t->start_us = lws_now_usecs();
    t->strategy = "none";
    const trace_span *parent = s->conn != NULL ? conn_trace_parent(s->conn) : NULL;
    trace_span_start(&t->span, s->g->tracer, "chat turn", TRACE_SERVER,
                     parent != NULL ? &parent->ctx : NULL, parent != NULL ? parent->state : NULL);
    if (trace_span_recording(&t->span)) {
        trace_span_set_str(&t->span, "convo.session_id", s->id);
        trace_span_set_int(&t->span, "convo.turn_id", (int64_t)t->id);
        trace_span_set_str(&t->span, "convo.request_id", t->rid);
    }
    const trace_span *prev = trace_set_current(&t->span);
    s->cur = t;
    atomic_fetch_add(&s->g->counters.turns, 1);
    launch(s, t);
    trace_set_current(prev);
}

/* The turn's first steps: its message recorded, then Route (or, while
 * router-svc is down, Chat with the default route). */
static void launch(session *s, turn *t)
{
    const char *message = t->message;
    record(s, CONVO__V1__EVENT_TYPE__EVENT_TYPE_USER_MESSAGE, message, strlen(message));
    hist_counts counts = hist_get_counts(s->history);
    Convo__V1__ChatRequest *req = chat_request(s, t);
    if (req == NULL) {
        fail_turn(s, t, "internal", "The answer could not be started; please try again.");
        end_turn(s, t);
        return;
    }
    if (!defroute_ask(s->g->defroute, &t->probe)) {
        /* router-svc is down and another turn is finding out whether it is
         * back: this one does not wait for it. */
        const Convo__V1__RouteResponse *route = defroute_response(s->g->defroute);
        cli_call *chat = start_chat(t, req, route);
        protobuf_c_message_free_unpacked(&req->base, NULL);
        if (chat != NULL) {
            answer_started(s, t, route, chat, DEFROUTE_OUTAGE);
        } else {
            fail_turn(s, t, "internal", "The answer could not be started; please try again.");
            end_turn(s, t);
        }
        return;
    }

    Convo__V1__RouteRequest rreq = CONVO__V1__ROUTE_REQUEST__INIT;
    rreq.session_id = s->id;
    rreq.user_id = s->user_id;
    rreq.last_user_message = (char *)message;
    rreq.user_message_count = counts.user_messages;
    rreq.tool_call_count = counts.tool_calls;
    rreq.assistant_message_count = counts.assistant_messages;
    cli_opts o = {
        .timeout_ms = s->g->opts.route_timeout_ms, .request_id = t->rid, .trace_parent = &t->span};
    t->chat_req = req;
    s->refs++;
    if (cli_unary(s->g->router, &convo__v1__router__route__method, &rreq.base, &o, on_route_done, t,
                  &t->route) != 0) {
        s->refs--;
        protobuf_c_message_free_unpacked(&t->chat_req->base, NULL);
        t->chat_req = NULL;
        /* No Route call: the probe, if this was it, is free again. */
        defroute_result(s->g->defroute, t->probe, RPC_CANCELLED, "", now_ms());
        fail_turn(s, t, "internal", "The answer could not be started; please try again.");
        end_turn(s, t);
    }
}

static void start_next_turn(session *s)
{
    if (s->cur != NULL || s->nqueue == 0 || !s->open_answered || s->loading)
        return;
    char *message = s->queue[0];
    memmove(s->queue, s->queue + 1, (s->nqueue - 1) * sizeof *s->queue);
    s->nqueue--;
    start_turn(s, message);
}

/* ---- client messages ------------------------------------------------- */

/* Stops the turn's call in flight; its end comes back as a cancelled
 * turn. While Route runs, stopping Route ends the turn at once (a router
 * that hangs would otherwise hold it until --route-timeout-ms). */
static void stop_turn(turn *t)
{
    t->cancelled = 1;
    if (t->chat != NULL)
        cli_call_cancel(t->chat);
    else if (t->route != NULL)
        cli_call_cancel(t->route);
}

static void cancel_turn(session *s)
{
    turn *t = s->cur;
    /* A turn whose done or error went out is over for the client, though
     * its call has not ended yet: nothing is left to cancel. */
    if (t == NULL || t->cancelled || t->terminal) {
        send_error(s, "no_active_turn", "there is no answer being streamed to cancel", NULL);
        return;
    }
    stop_turn(t);
}

static void sess_on_text(void *peer, const char *data, size_t len)
{
    session *s = peer;
    /* Every frame counts against its user, whatever it holds (an invalid
     * or a cancel frame costs the gateway as much as a message), and over
     * every connection of the user. */
    if (lim_take(s->g->limits, LIM_MESSAGES, s->user_id, now_ms()) != 0) {
        gw_count_limited(s->g, lim_name(LIM_MESSAGES));
        send_error(s, lim_code(LIM_MESSAGES),
                   "too many messages: the limit is --rate-limit per minute; wait a moment", NULL);
        return;
    }
    frame_in in;
    frame_parse(data, len, (size_t)s->g->opts.max_user_message_bytes, &in);
    if (in.kind == FRAME_INVALID) {
        send_error(s, in.code, in.error, NULL);
    } else if (in.kind == FRAME_CANCEL) {
        cancel_turn(s);
    } else if (evlog_full(s->g)) {
        /* What waits for store-svc is at its bound: taking the message
         * would mean an answer whose events could not be kept. */
        gw_count_limited(s->g, "event_buffer");
        send_error(s, "store_backlog",
                   "the conversation store is not keeping up, so new messages are not taken for "
                   "now; your message was not sent: send it again in a moment",
                   NULL);
    } else if (lim_check(s->g->limits, LIM_TOKENS, s->user_id, now_ms()) != 0) {
        gw_count_limited(s->g, lim_name(LIM_TOKENS));
        send_error(s, lim_code(LIM_TOKENS),
                   "your answers used the model tokens allowed per minute "
                   "(--user-tokens-per-minute); wait a moment",
                   NULL);
    } else if (s->cur == NULL && s->nqueue == 0 && s->open_answered && !s->loading) {
        start_turn(s, in.text);
        in.text = NULL;
    } else if (s->nqueue >= (size_t)s->g->opts.max_queued_messages) {
        gw_count_limited(s->g, "queued_messages");
        send_error(s, "queue_full",
                   "an answer is being streamed and the queue of waiting messages is full; "
                   "wait for the answer (or cancel it) and send again",
                   NULL);
    } else {
        s->queue = mem_realloc(s->queue, (s->nqueue + 1) * sizeof *s->queue);
        s->queue[s->nqueue++] = in.text;
        in.text = NULL;
        if (s->cur != NULL && !s->cur->terminal) {
            /* Behind an answer: say so (not while the session is opening,
             * nor once the answer's done or error went out: its call is
             * only closing, and the message starts in a moment). */
            size_t flen;
            char *f = frame_queued(s->next_turn_id + s->nqueue, s->nqueue, &flen);
            send_frame(s, f, flen);
        }
    }
    frame_in_clear(&in);
}

/* ---- opening and resuming --------------------------------------------- */

static void announce(session *s)
{
    size_t len;
    char *f = frame_session(s->id, s->user_id, s->resumed, s->history_loaded,
                            hist_get_counts(s->history).user_messages, &len);
    send_frame(s, f, len);
}

typedef struct load_job {
    session *s;
    Convo__V1__Event *ev; /* NULL: the stream ended */
    rpc_code code;
    char *message;
} load_job;

static void on_load_job(void *arg)
{
    load_job *j = arg;
    session *s = j->s;
    if (j->ev != NULL) {
        /* A window that starts inside a turn starts at its next user
         * message: a tool result without its call, or half an answer,
         * would give the model a history it cannot take. */
        if (s->load_skip && j->ev->type == CONVO__V1__EVENT_TYPE__EVENT_TYPE_USER_MESSAGE)
            s->load_skip = 0;
        if (!s->load_skip)
            hist_apply(s->history, j->ev->type, j->ev->content, strlen(j->ev->content));
        protobuf_c_message_free_unpacked(&j->ev->base, NULL);
    } else {
        s->loading = 0;
        s->history_loaded = j->code == RPC_OK;
        hist_set_counts(s->history, s->stored_users, s->stored_tools);
        if (j->code != RPC_OK)
            log_warn("could not load the history of session %s (%s: %s); going on without it",
                     s->id, rpc_code_name(j->code), j->message);
        hist_end_turn(s->history);
        announce(s);
        start_next_turn(s);
        sess_unref(s);
    }
    mem_free(j->message);
    mem_free(j);
}

static int on_load_msg(void *arg, const ProtobufCMessage *msg)
{
    load_job *j = mem_calloc(1, sizeof *j);
    j->s = arg;
    size_t n = protobuf_c_message_get_packed_size(msg);
    uint8_t *buf = mem_alloc(n);
    protobuf_c_message_pack(msg, buf);
    j->ev =
        (Convo__V1__Event *)protobuf_c_message_unpack(&convo__v1__event__descriptor, NULL, n, buf);
    mem_free(buf);
    bridge_post(j->s->g->bridge, on_load_job, j);
    return 0;
}

static void on_load_done(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp)
{
    load_job *j = mem_calloc(1, sizeof *j);
    j->s = arg;
    j->code = code;
    j->message = mem_strdup(message != NULL ? message : "");
    bridge_post(j->s->g->bridge, on_load_job, j);
}

/* Reads the newest --resume-events events of a resumed session back into
 * its history; the counts of the whole session are the store's. */
static void load_history(session *s, const Convo__V1__Session *stored)
{
    Convo__V1__ListEventsRequest req = CONVO__V1__LIST_EVENTS_REQUEST__INIT;
    req.session_id = s->id;
    int64_t window = s->g->opts.resume_events;
    if (window > 0 && stored->last_seq > window) {
        req.after_seq = stored->last_seq - window;
        req.limit = window;
        s->load_skip = 1;
    }
    s->stored_users = stored->user_message_count;
    s->stored_tools = stored->tool_call_count;
    cli_opts o = {.timeout_ms = s->g->opts.store_timeout_ms * 6};
    s->loading = 1;
    s->refs++;
    if (cli_stream(s->g->store, &convo__v1__store__list_events__method, &req.base, &o, on_load_msg,
                   on_load_done, s, NULL) != 0) {
        s->refs--;
        s->loading = 0;
        hist_set_counts(s->history, s->stored_users, s->stored_tools);
        announce(s);
    }
}

/* The session could not be opened as its user's: it leaves the table at
 * once (it claims nothing), stores nothing, and the connection is told
 * why. */
static void give_up(session *s, int close_code, const char *error_code, const char *reason)
{
    if (s->linked) {
        unlink_session(s->g->sessions, s);
        s->linked = 0;
    }
    if (s->counted_new) {
        lim_give(s->g->limits, LIM_SESSIONS, s->user_id, now_ms());
        s->counted_new = 0;
    }
    evlog_abandon(s->log);
    gw_count_refused(s->g, error_code);
    kick(s, close_code, error_code, reason);
}

static void on_open_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    session *s = w->data;
    if (s->open_answered)
        return;
    s->open_answered = 1;
    const log_field f[] = {{"session_id", s->id}, {NULL, NULL}};
    log_fields(LOG_WARN, f,
               "store-svc did not confirm the session's owner within "
               "--open-timeout-ms; refused");
    give_up(s, WS_CLOSE_TRY_LATER, "store_unavailable",
            "the session store is unavailable, so the session's owner cannot be checked; try "
            "again shortly");
}

static void on_open(void *arg, rpc_code code, const char *message,
                    const Convo__V1__OpenSessionResponse *resp)
{
    session *s = arg;
    ev_timer_stop(s->g->loop, &s->open_timer);
    s->open_answered = 1;
    if (code == RPC_PERMISSION_DENIED) {
        give_up(s, WS_CLOSE_FORBIDDEN, "forbidden", "this session belongs to another user");
        return;
    }
    if (code != RPC_OK) {
        /* Nothing says whose session this is: it is not taken on the
         * caller's word (the owner would be locked out until the store is
         * back). */
        int retry = code == RPC_UNAVAILABLE || code == RPC_DEADLINE_EXCEEDED;
        const log_field f[] = {{"session_id", s->id}, {NULL, NULL}};
        log_fields(LOG_WARN, f, "store-svc did not open the session (%s: %s); refused",
                   rpc_code_name(code), message);
        give_up(s, retry ? WS_CLOSE_TRY_LATER : WS_CLOSE_INTERNAL,
                retry ? "store_unavailable" : "internal",
                retry ? "the session store is unavailable, so the session's owner cannot be "
                        "checked; try again shortly"
                      : "the session could not be opened");
        return;
    }
    s->verified = 1;
    if (s->counted_new && !resp->created)
        lim_give(s->g->limits, LIM_SESSIONS, s->user_id, now_ms()); /* resumed: not new */
    s->counted_new = 0;
    s->resumed = !resp->created;
    if (s->resumed && resp->session != NULL && resp->session->event_count > 0) {
        load_history(s, resp->session);
        return;
    }
    s->history_loaded = 1;
    announce(s);
    start_next_turn(s);
}

/* store-svc refused our writes: the client resumed the session on another
 * gateway (evlog.h). This gateway is not its writer any more: the session
 * leaves the table (a new connection here opens it afresh, as a new
 * writer) and its connection is closed as a takeover here would close it. */
static void on_taken_over(void *arg)
{
    session *s = arg;
    if (s->linked) {
        unlink_session(s->g->sessions, s);
        s->linked = 0;
    }
    kick(s, WS_CLOSE_TAKEN_OVER, "taken_over",
         "this session was opened by a newer connection on another gateway");
}

/* ---- lifetime ---------------------------------------------------------- */

static void sess_free(session *s)
{
    ev_timer_stop(s->g->loop, &s->open_timer);
    ev_timer_stop(s->g->loop, &s->end_timer);
    if (s->linked)
        unlink_session(s->g->sessions, s);
    s->g->sessions->live--;
    metrics_gauge_add(s->g->mx.sessions, -1);
    if (s->held)
        lim_release(s->g->limits, LIM_OPEN_SESSIONS, s->user_id, now_ms());
    evlog_destroy(&s->log);
    hist_destroy(&s->history);
    for (held *h = s->held_head, *next; h != NULL; h = next) {
        next = h->next;
        mem_free(h->frame);
        mem_free(h);
    }
    for (size_t i = 0; i < s->nqueue; i++)
        mem_free(s->queue[i]);
    mem_free(s->queue);
    mem_free(s->id);
    mem_free(s->user_id);
    mem_free(s);
}

static void sess_unref(session *s)
{
    if (--s->refs == 0)
        sess_free(s);
}

static void on_log_closed(void *arg)
{
    session *s = arg;
    const log_field f[] = {{"session_id", s->id}, {NULL, NULL}};
    log_fields(LOG_INFO, f, "session ended");
    sess_unref(s);
}

static void end_session(session *s)
{
    if (s->ending)
        return;
    s->ending = 1;
    record_system(s, "disconnected", 0, NULL);
    evlog_close(s->log, on_log_closed);
}

static void on_end_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    session *s = w->data;
    s->end_timer_armed = 0;
    if (s->conn == NULL)
        end_session(s);
}

static session *sess_create(gw *g, const char *id, const char *user_id)
{
    session *s = mem_calloc(1, sizeof *s);
    s->g = g;
    s->id = mem_strdup(id);
    s->user_id = mem_strdup(user_id);
    s->history = hist_create((size_t)g->opts.history_messages, ANSWER_CAP);
    s->refs = 1; /* the evlog, until it is closed */
    sess_table *t = g->sessions;
    size_t b = bucket_of(id);
    s->next = t->buckets[b];
    t->buckets[b] = s;
    s->linked = 1;
    t->live++;
    metrics_gauge_add(g->mx.sessions, 1);
    s->log = evlog_create(g, id, user_id, on_open, s);
    evlog_on_taken_over(s->log, on_taken_over);
    if (g->opts.store_before_send)
        evlog_on_settled(s->log, on_settled, s);
    ev_timer_init(&s->open_timer, on_open_timer, (double)g->opts.open_timeout_ms / MS_PER_S, 0.);
    s->open_timer.data = s;
    ev_timer_start(g->loop, &s->open_timer);
    ev_timer_init(&s->end_timer, on_end_timer, 0., 0.);
    s->end_timer.data = s;
    return s;
}

/* ---- at the new-session limit: is it a resume? ------------------------ */

/* A connection waiting for the store's word on its session (GetSession);
 * what the client sends meanwhile waits here, bounded. */
typedef struct probe {
    sess_table *t;
    conn *c; /* NULL once the connection is gone */
    char *id, *user;
    char **texts;
    size_t ntexts;
} probe;

static void probe_text(void *peer, const char *data, size_t len)
{
    probe *p = peer;
    if (p->ntexts >= (size_t)p->t->g->opts.max_queued_messages)
        return; /* the session does not exist yet: nothing to answer with */
    p->texts = mem_realloc(p->texts, (p->ntexts + 1) * sizeof *p->texts);
    p->texts[p->ntexts] = mem_alloc(len + 1);
    memcpy(p->texts[p->ntexts], data, len);
    p->texts[p->ntexts++][len] = '\0';
}

static void probe_sent(void *peer, long charge)
{
    (void)peer;
    (void)charge;
}

static void probe_gone(void *peer, conn *c)
{
    (void)c;
    ((probe *)peer)->c = NULL;
}

static const conn_peer_ops probe_ops = {probe_text, probe_sent, probe_gone};

typedef struct probe_job {
    probe *p;
    rpc_code code;
    Convo__V1__GetSessionResponse *resp;
} probe_job;

static void probe_free(probe *p)
{
    for (size_t i = 0; i < p->ntexts; i++)
        mem_free(p->texts[i]);
    mem_free(p->texts);
    mem_free(p->id);
    mem_free(p->user);
    mem_free(p);
}

static void on_probe_job(void *arg)
{
    probe_job *j = arg;
    probe *p = j->p;
    conn *c = p->c;
    const Convo__V1__Session *stored = j->resp != NULL ? j->resp->session : NULL;
    if (c == NULL) {
        /* gone meanwhile */
    } else if (j->code == RPC_OK && stored != NULL && strcmp(stored->user_id, p->user) == 0) {
        session *s = attach(p->t, c, p->id, p->user, 1);
        for (size_t i = 0; s != NULL && i < p->ntexts; i++)
            sess_on_text(s, p->texts[i], strlen(p->texts[i]));
    } else if (j->code == RPC_OK && stored != NULL) {
        gw_count_refused(p->t->g, "forbidden");
        conn_close(c, WS_CLOSE_FORBIDDEN, "forbidden", "this session belongs to another user");
    } else if (j->code == RPC_OK || j->code == RPC_NOT_FOUND) {
        gw_count_refused(p->t->g, lim_code(LIM_SESSIONS));
        gw_count_limited(p->t->g, lim_name(LIM_SESSIONS));
        conn_close(c, WS_CLOSE_TRY_LATER, lim_code(LIM_SESSIONS),
                   "too many new sessions (--sessions-per-hour); try again later");
    } else {
        gw_count_refused(p->t->g, "store_unavailable");
        conn_close(c, WS_CLOSE_TRY_LATER, "store_unavailable",
                   "the session store is unavailable, so the session's owner cannot be "
                   "checked; try again shortly");
    }
    if (j->resp != NULL)
        protobuf_c_message_free_unpacked(&j->resp->base, NULL);
    probe_free(p);
    mem_free(j);
}

static void on_probe_done(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp)
{
    (void)message;
    probe_job *j = mem_calloc(1, sizeof *j);
    j->p = arg;
    j->code = code;
    j->resp = (Convo__V1__GetSessionResponse *)resp;
    bridge_post(j->p->t->g->bridge, on_probe_job, j);
}

static void probe_start(sess_table *t, conn *c, const char *id, const char *user_id)
{
    probe *p = mem_calloc(1, sizeof *p);
    p->t = t;
    p->c = c;
    p->id = mem_strdup(id);
    p->user = mem_strdup(user_id);
    conn_attach(c, &probe_ops, p);
    Convo__V1__GetSessionRequest req = CONVO__V1__GET_SESSION_REQUEST__INIT;
    req.session_id = p->id;
    cli_opts o = {.timeout_ms = t->g->opts.open_timeout_ms};
    if (cli_unary(t->g->store, &convo__v1__store__get_session__method, &req.base, &o, on_probe_done,
                  p, NULL) != 0)
        on_probe_done(p, RPC_INTERNAL, "could not start the call", NULL);
}

/* Counts a session about to be made in memory against its user's
 * --max-sessions-per-user (given back when it is freed). Returns 0, or -1
 * with the connection closed (1013) and the refusal counted. */
static int hold_session(gw *g, conn *c, const char *user_id)
{
    int rc = lim_hold(g->limits, LIM_OPEN_SESSIONS, user_id, now_ms());
    if (rc == 0)
        return 0;
    const char *code = rc == LIM_EFULL ? "limits_full" : lim_code(LIM_OPEN_SESSIONS);
    gw_count_refused(g, code);
    gw_count_limited(g, lim_name(LIM_OPEN_SESSIONS));
    conn_close(c, WS_CLOSE_TRY_LATER, code,
               "too many sessions of this user at once (--max-sessions-per-user); close one and "
               "try again");
    return -1;
}

/* Attaches c to session id of user_id (see sess_open); known: the store
 * already said the session exists and is user_id's. */
static session *attach(sess_table *t, conn *c, const char *id, const char *user_id, int known)
{
    session *s = find(t, id);
    if (s != NULL && strcmp(s->user_id, user_id) != 0) {
        /* Until the store has confirmed the first caller, neither is known
         * to be the owner: the later one tries again. */
        gw_count_refused(t->g, s->verified ? "forbidden" : "session_unverified");
        if (s->verified)
            conn_close(c, WS_CLOSE_FORBIDDEN, "forbidden", "this session belongs to another user");
        else
            conn_close(c, WS_CLOSE_TRY_LATER, "session_unverified",
                       "the session's owner is being checked; try again shortly");
        return NULL;
    }
    if (s == NULL) {
        /* Taken before the store says whether the session is new; a resumed
         * one gives it back (on_open). At the bound the store is asked
         * first (probe): a resume is never refused as a new session. */
        if (!known && lim_take(t->g->limits, LIM_SESSIONS, user_id, now_ms()) != 0) {
            probe_start(t, c, id, user_id);
            return NULL;
        }
        if (hold_session(t->g, c, user_id) != 0) {
            if (!known)
                lim_give(t->g->limits, LIM_SESSIONS, user_id, now_ms());
            return NULL;
        }
        s = sess_create(t->g, id, user_id);
        s->held = 1;
        s->counted_new = !known;
    } else {
        if (s->conn != NULL) {
            /* Takeover: the answer being streamed goes on, to the new
             * connection. */
            conn *old = s->conn;
            s->conn = NULL;
            conn_close(old, WS_CLOSE_TAKEN_OVER, "taken_over",
                       "this session was opened by a newer connection");
            reset_output(s);
            s->refs--;
        }
        if (s->end_timer_armed) {
            ev_timer_stop(s->g->loop, &s->end_timer);
            s->end_timer_armed = 0;
        }
        if (s->ending) {
            /* Back before the session was ended in the store: it is not
             * (the evlog still holds its reference). */
            s->ending = 0;
            evlog_reopen(s->log);
        }
        /* The client may have resumed the session on another gateway
         * meanwhile (a hung connection here, then there, then back): the
         * newest connection wins, so we become its writer again. */
        evlog_claim(s->log);
        s->resumed = 1;
    }
    s->conn = c;
    conn_attach(c, &sess_peer_ops, s);
    s->refs++;
    record_system(s, "connected", 0, NULL);
    if (s->open_answered && !s->loading)
        announce(s);
    return s;
}

void sess_open(void *table, conn *c, const char *id, const char *user_id)
{
    attach(table, c, id, user_id, 0);
}

/* The connection went away (closed by either side). */
static void sess_detach(void *peer, conn *c)
{
    session *s = peer;
    if (s->conn != c)
        return;
    s->conn = NULL;
    reset_output(s);
    /* Nobody is listening: stop the answer (and the upstream model call)
     * at once, and drop what waits. */
    if (s->cur != NULL && !s->cur->cancelled)
        stop_turn(s->cur);
    for (size_t i = 0; i < s->nqueue; i++)
        mem_free(s->queue[i]);
    s->nqueue = 0;
    if (s->g->opts.end_grace_ms > 0 && !s->g->stopping) {
        s->end_timer_armed = 1;
        ev_timer_set(&s->end_timer, (double)s->g->opts.end_grace_ms / MS_PER_S, 0.);
        ev_timer_start(s->g->loop, &s->end_timer);
    } else {
        end_session(s);
    }
    sess_unref(s);
}

void sess_close_all(sess_table *t)
{
    for (size_t b = 0; b < BUCKETS; b++) {
        for (session *s = t->buckets[b], *next; s != NULL; s = next) {
            next = s->next;
            if (s->conn != NULL) {
                kick(s, WS_CLOSE_GOING_AWAY, "going_away", "the server is restarting; reconnect");
            } else if (s->end_timer_armed) {
                ev_timer_stop(t->g->loop, &s->end_timer);
                s->end_timer_armed = 0;
                end_session(s);
            }
        }
    }
}
