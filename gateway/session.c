#include "session.h"

#include "convo/v1/llm.pb-c.h"
#include "convo/v1/router.pb-c.h"
#include "evlog.h"
#include "frame.h"
#include "history.h"
#include "log.h"
#include "mem.h"

#include <json-c/json.h>
#include <libwebsockets.h>
#include <string.h>

#define BUCKETS    4096 /* of the session table */
#define RATE_BURST 20
#define ANSWER_CAP (1 << 20) /* an answer's text kept in history */

typedef struct session session;
typedef struct turn turn;

struct session {
    lws_sorted_usec_list_t end_timer; /* first: lws hands the sul back */
    gw *g;
    char *id;
    char *user_id;
    conn *conn;
    evlog *log;
    hist *history;
    int refs;          /* the connection, each call in flight, the evlog until closed */
    int open_answered; /* OpenSession answered (or given up on) */
    int loading;       /* reading the stored events */
    int ending;        /* evlog_close called */
    int end_timer_armed;
    int resumed;
    int history_loaded;

    turn *cur;
    char **queue; /* messages waiting for their turn */
    size_t nqueue;
    uint64_t next_turn_id;

    double tokens; /* rate limit: a token bucket */
    int64_t refill_ms;

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

/* What the connection attached to a session calls. */
static const conn_peer_ops sess_peer_ops = {sess_on_text, sess_on_sent, sess_detach};

/* ---- registry ------------------------------------------------------- */

sess_table *sess_table_create(gw *g)
{
    sess_table *t = mem_calloc(1, sizeof *t);
    t->g = g;
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

/* Sends a frame whose `charge` is already counted in out_bytes; with no
 * connection the charge is given back at once. */
static void send_charged(session *s, char *frame, size_t len, long charge)
{
    if (s->conn == NULL) {
        mem_free(frame);
        sess_on_sent(s, charge);
        return;
    }
    conn_send(s->conn, frame, len, charge);
}

static void send_frame(session *s, char *frame, size_t len)
{
    atomic_fetch_add(&s->out_bytes, (long)len);
    send_charged(s, frame, len, (long)len);
}

static void send_error(session *s, const char *code, const char *content, uint64_t turn_id)
{
    size_t len;
    char *f = frame_error(code, content, turn_id, &len);
    send_frame(s, f, len);
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
    evlog_add(s->log, type, content, len);
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

static void end_turn(session *s, turn *t)
{
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
        char *f = frame_done(t->id, "cancelled", NULL, &len);
        send_frame(s, f, len);
        record_system(s, "turn_cancelled", t->id, NULL);
    } else {
        send_error(s, code, content, t->id);
        record_system(s, "turn_failed", t->id, content);
        atomic_fetch_add(&s->g->counters.turn_errors, 1);
    }
}

typedef struct chat_job {
    turn *t;
    Convo__V1__ChatEvent *ev; /* NULL: the call ended */
    long charge;              /* counted in out_bytes when the event was read */
    rpc_code code;
    char *message;
} chat_job;

static const char *category_code(Convo__V1__ErrorCategory c)
{
    switch (c) {
    case CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_RATE_LIMITED:
        return "rate_limited";
    case CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_AUTH_FAILED:
        return "upstream_auth_failed";
    case CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_MODEL_NOT_FOUND:
        return "model_not_found";
    case CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_UPSTREAM_UNAVAILABLE:
        return "upstream_unavailable";
    case CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_TIMEOUT:
        return "upstream_timeout";
    case CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_BAD_UPSTREAM_DATA:
        return "bad_upstream_data";
    case CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_INVALID_REQUEST:
        return "invalid_request";
    default:
        return "internal";
    }
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
        f = frame_token(ev->token->content, t->id, &len);
        send_charged(s, f, len, charge);
        record(s, CONVO__V1__EVENT_TYPE__EVENT_TYPE_AI_TOKEN, ev->token->content,
               strlen(ev->token->content));
        break;
    case CONVO__V1__CHAT_EVENT__EVENT_TOOL_CALL: {
        const Convo__V1__ToolCallEvent *c = ev->tool_call;
        f = frame_tool_call(c->name, c->call_id, c->arguments_json, t->id, &len);
        send_charged(s, f, len, charge);
        tool_event_json(s, CONVO__V1__EVENT_TYPE__EVENT_TYPE_TOOL_CALL, c->call_id, c->name,
                        "arguments", c->arguments_json);
        break;
    }
    case CONVO__V1__CHAT_EVENT__EVENT_TOOL_RESULT: {
        const Convo__V1__ToolResultEvent *r = ev->tool_result;
        f = frame_tool_result(r->name, r->call_id, r->result_json, r->is_error, t->id, &len);
        send_charged(s, f, len, charge);
        tool_event_json(s, CONVO__V1__EVENT_TYPE__EVENT_TYPE_TOOL_RESULT, r->call_id, r->name,
                        "result", r->result_json);
        break;
    }
    case CONVO__V1__CHAT_EVENT__EVENT_DONE:
        t->terminal = 1;
        f = frame_done(t->id, "completed", ev->done->finish_reason, &len);
        send_charged(s, f, len, charge);
        hist_end_turn(s->history);
        break;
    case CONVO__V1__CHAT_EVENT__EVENT_ERROR:
        t->terminal = 1;
        f = frame_error(category_code(ev->error->category), ev->error->message, t->id, &len);
        send_charged(s, f, len, charge);
        record_system(s, "turn_failed", t->id, ev->error->message);
        atomic_fetch_add(&s->g->counters.turn_errors, 1);
        break;
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
                const log_field f[] = {{"session_id", s->id}, {NULL, NULL}};
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
    if (pause)
        atomic_store(&s->paused, 1);
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

typedef struct route_job {
    turn *t;
    rpc_code code;
    char *message;
    Convo__V1__RouteResponse *resp;
    cli_call *chat; /* started when Route answered; NULL: not started */
} route_job;

static void on_route_job(void *arg)
{
    route_job *j = arg;
    turn *t = j->t;
    session *s = t->s;
    cli_call_release(&t->route);
    if (j->chat != NULL) {
        t->chat = j->chat;
        s->refs++; /* the Chat call's, given back when it ends */
        json_object *o = json_object_new_object();
        json_object_object_add(o, "event", json_object_new_string("route"));
        json_object_object_add(o, "turn_id", json_object_new_int64((int64_t)t->id));
        json_object_object_add(o, "strategy", json_object_new_string(j->resp->strategy_name));
        json_object *reasons = json_object_new_array();
        for (size_t i = 0; i < j->resp->n_reasons; i++)
            json_object_array_add(reasons, json_object_new_string(j->resp->reasons[i]));
        json_object_object_add(o, "reasons", reasons);
        record_json(s, CONVO__V1__EVENT_TYPE__EVENT_TYPE_SYSTEM_EVENT, o);
        /* Cancelled while Route ran: the answer ends as soon as it began. */
        if (t->cancelled)
            cli_call_cancel(t->chat);
    } else if (j->code != RPC_OK) {
        if (!t->cancelled) {
            const log_field f[] = {{"session_id", s->id}, {NULL, NULL}};
            log_fields(LOG_WARN, f, "turn %llu failed: Router.Route ended with %s: %s",
                       (unsigned long long)t->id, rpc_code_name(j->code), j->message);
        }
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
    sess_unref(s);
}

/* gRPC thread: Route answered, so Chat starts here rather than one hop
 * later on the loop. Its callbacks run on this thread after this returns
 * (cli.h), so the route job posted below reaches the loop before any Chat
 * event. Reads only what does not change during the turn. */
static void on_route_done(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp)
{
    turn *t = arg;
    session *s = t->s;
    route_job *j = mem_calloc(1, sizeof *j);
    j->t = t;
    j->code = code;
    j->message = mem_strdup(message != NULL ? message : "");
    j->resp = (Convo__V1__RouteResponse *)resp;
    Convo__V1__ChatRequest *req = t->chat_req;
    t->chat_req = NULL;
    if (code == RPC_OK) {
        req->system_prompt = j->resp->system_prompt;
        req->params = j->resp->params;
        char rid[160];
        snprintf(rid, sizeof rid, "%s/%s", s->id, req->turn_id);
        cli_opts o = {.timeout_ms = s->g->opts.chat_timeout_ms, .request_id = rid};
        if (cli_stream(s->g->llm, "/convo.v1.Llm/Chat", &req->base,
                       &convo__v1__chat_event__descriptor, &o, on_chat_msg, on_chat_done, t,
                       &j->chat) != 0)
            j->chat = NULL;
        /* Borrowed from the route response, which the loop frees. */
        req->system_prompt = NULL;
        req->params = NULL;
    }
    protobuf_c_message_free_unpacked(&req->base, NULL);
    bridge_post(s->g->bridge, on_route_job, j);
}

/* Starts a turn for `message` (owned by the turn from here). */
static void start_turn(session *s, char *message)
{
    turn *t = mem_calloc(1, sizeof *t);
    t->s = s;
    t->id = ++s->next_turn_id;
    t->message = message;
    t->start_ms = lws_now_usecs() / 1000;
    s->cur = t;
    atomic_fetch_add(&s->g->counters.turns, 1);

    record(s, CONVO__V1__EVENT_TYPE__EVENT_TYPE_USER_MESSAGE, message, strlen(message));
    hist_counts counts = hist_get_counts(s->history);

    Convo__V1__RouteRequest req = CONVO__V1__ROUTE_REQUEST__INIT;
    req.session_id = s->id;
    req.user_id = s->user_id;
    req.last_user_message = message;
    req.user_message_count = counts.user_messages;
    req.tool_call_count = counts.tool_calls;
    req.assistant_message_count = counts.assistant_messages;
    cli_opts o = {.timeout_ms = s->g->opts.route_timeout_ms};
    t->chat_req = chat_request(s, t);
    s->refs++;
    if (t->chat_req == NULL ||
        cli_unary(s->g->router, "/convo.v1.Router/Route", &req.base,
                  &convo__v1__route_response__descriptor, &o, on_route_done, t, &t->route) != 0) {
        s->refs--;
        if (t->chat_req != NULL)
            protobuf_c_message_free_unpacked(&t->chat_req->base, NULL);
        t->chat_req = NULL;
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

static int rate_allows(session *s)
{
    int64_t now = lws_now_usecs() / 1000;
    double per_ms = (double)s->g->opts.rate_per_minute / 60000.0;
    s->tokens += (double)(now - s->refill_ms) * per_ms;
    if (s->tokens > RATE_BURST)
        s->tokens = RATE_BURST;
    s->refill_ms = now;
    if (s->tokens < 1.0)
        return 0;
    s->tokens -= 1.0;
    return 1;
}

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
    if (t == NULL || t->cancelled) {
        send_error(s, "no_active_turn", "there is no answer being streamed to cancel", 0);
        return;
    }
    stop_turn(t);
}

static void sess_on_text(void *peer, const char *data, size_t len)
{
    session *s = peer;
    frame_in in;
    frame_parse(data, len, (size_t)s->g->opts.max_message_bytes, &in);
    if (in.kind == FRAME_INVALID) {
        send_error(s, in.code, in.error, 0);
    } else if (in.kind == FRAME_CANCEL) {
        cancel_turn(s);
    } else if (!rate_allows(s)) {
        send_error(s, "rate_limited",
                   "too many messages: the limit is --rate-limit per minute; wait a moment", 0);
    } else if (s->cur == NULL && s->nqueue == 0 && s->open_answered && !s->loading) {
        start_turn(s, in.text);
        in.text = NULL;
    } else if (s->nqueue >= (size_t)s->g->opts.max_queued_messages) {
        send_error(s, "queue_full",
                   "an answer is being streamed and the queue of waiting messages is full; "
                   "wait for the answer (or cancel it) and send again",
                   0);
    } else {
        s->queue = mem_realloc(s->queue, (s->nqueue + 1) * sizeof *s->queue);
        s->queue[s->nqueue++] = in.text;
        in.text = NULL;
        if (s->cur != NULL) {
            /* Behind an answer: say so (not while the session is opening). */
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
        hist_apply(s->history, j->ev->type, j->ev->content, strlen(j->ev->content));
        protobuf_c_message_free_unpacked(&j->ev->base, NULL);
    } else {
        s->loading = 0;
        s->history_loaded = j->code == RPC_OK;
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

static void load_history(session *s)
{
    Convo__V1__ListEventsRequest req = CONVO__V1__LIST_EVENTS_REQUEST__INIT;
    req.session_id = s->id;
    cli_opts o = {.timeout_ms = s->g->opts.store_timeout_ms * 6};
    s->loading = 1;
    s->refs++;
    if (cli_stream(s->g->store, "/convo.v1.Store/ListEvents", &req.base,
                   &convo__v1__event__descriptor, &o, on_load_msg, on_load_done, s, NULL) != 0) {
        s->refs--;
        s->loading = 0;
        announce(s);
    }
}

static void on_open(void *arg, rpc_code code, const char *message,
                    const Convo__V1__OpenSessionResponse *resp)
{
    session *s = arg;
    s->open_answered = 1;
    if (code == RPC_PERMISSION_DENIED) {
        atomic_fetch_add(&s->g->counters.refused, 1);
        kick(s, WS_CLOSE_FORBIDDEN, "forbidden", "this session belongs to another user");
        return;
    }
    if (code != RPC_OK) {
        log_warn("store-svc did not open session %s (%s: %s); the conversation goes on and its "
                 "events wait for the store",
                 s->id, rpc_code_name(code), message);
        announce(s);
        start_next_turn(s);
        return;
    }
    s->resumed = !resp->created;
    if (s->resumed && resp->session != NULL && resp->session->event_count > 0) {
        load_history(s);
        return;
    }
    s->history_loaded = 1;
    announce(s);
    start_next_turn(s);
}

/* ---- lifetime ---------------------------------------------------------- */

static void sess_free(session *s)
{
    unlink_session(s->g->sessions, s);
    s->g->sessions->live--;
    evlog_destroy(&s->log);
    hist_destroy(&s->history);
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

static void on_end_timer(lws_sorted_usec_list_t *sul)
{
    session *s = (session *)sul;
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
    s->tokens = RATE_BURST;
    s->refill_ms = lws_now_usecs() / 1000;
    s->refs = 1; /* the evlog, until it is closed */
    sess_table *t = g->sessions;
    size_t b = bucket_of(id);
    s->next = t->buckets[b];
    t->buckets[b] = s;
    t->live++;
    s->log = evlog_create(g, id, user_id, on_open, s);
    return s;
}

void sess_open(void *table, conn *c, const char *id, const char *user_id)
{
    sess_table *t = table;
    session *s = find(t, id);
    if (s != NULL && strcmp(s->user_id, user_id) != 0) {
        atomic_fetch_add(&s->g->counters.refused, 1);
        conn_close(c, WS_CLOSE_FORBIDDEN, "forbidden", "this session belongs to another user");
        return;
    }
    if (s == NULL) {
        s = sess_create(t->g, id, user_id);
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
            lws_sul_cancel(&s->end_timer);
            s->end_timer_armed = 0;
        }
        if (s->ending) {
            /* Back before the session was ended in the store: it is not
             * (the evlog still holds its reference). */
            s->ending = 0;
            evlog_reopen(s->log);
        }
        s->resumed = 1;
    }
    s->conn = c;
    conn_attach(c, &sess_peer_ops, s);
    s->refs++;
    record_system(s, "connected", 0, NULL);
    if (s->open_answered && !s->loading)
        announce(s);
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
        lws_sul_schedule(s->g->ctx, 0, &s->end_timer, on_end_timer,
                         (lws_usec_t)s->g->opts.end_grace_ms * LWS_US_PER_MS);
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
                lws_sul_cancel(&s->end_timer);
                s->end_timer_armed = 0;
                end_session(s);
            }
        }
    }
}
