#include "llm.h"

#include "log.h"
#include "mem.h"
#include "names.h"
#include "rpc.h"
#include "sse.h"
#include "toolcall.h"

#include "convo/v1/llm.pb-c.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

/* common.proto: GenerationParams.temperature is 0.0 to 2.0. */
#define MAX_TEMPERATURE 2.0

#define LLM_METRICS(X, S)                                                                          \
    X(S, turns, COUNTER_VEC, "convo_llm_turns_total", "kind,outcome", NULL,                        \
      "Chat and Complete calls ended, by kind (chat, complete) and outcome (done, error, "         \
      "cancelled)")                                                                                \
    X(S, requests, COUNTER_VEC, "convo_llm_upstream_requests_total", "outcome,category", NULL,     \
      "model requests ended, by outcome (ok, http_error, connect_error, timeout, dropped, "        \
      "stopped, cancelled) and the error category the caller was told (none when it succeeded)")   \
    X(S, tokens, COUNTER_VEC, "convo_llm_usage_tokens_total", "kind", NULL,                        \
      "tokens the model reported using, by kind (prompt, completion)")                             \
    X(S, tool_calls, COUNTER_VEC, "convo_llm_tool_calls_total", "tool,outcome", NULL,              \
      "tool calls run, by tool (a registered name; unknown for any other) and outcome (ok, "       \
      "error)")                                                                                    \
    X(S, tool_seconds, HISTOGRAM_VEC, "convo_llm_tool_seconds", "tool", &metrics_buckets_seconds,  \
      "time from a tool call's start to its result")
METRICS_DECLARE(llm_metrics, LLM_METRICS)

/* The label words of upstream_result (convo_llm_upstream_requests_total). */
static const char *const result_names[] = {
    [UPSTREAM_OK] = "ok",
    [UPSTREAM_HTTP] = "http_error",
    [UPSTREAM_CONNECT] = "connect_error",
    [UPSTREAM_TIMEOUT] = "timeout",
    [UPSTREAM_DROPPED] = "dropped",
    [UPSTREAM_STOPPED] = "stopped",
    [UPSTREAM_CANCELLED] = "cancelled",
};

/* A registered tool's series, and those of the names nobody registered. */
typedef struct tool_series {
    const char *name;
    metrics_counter *ok, *error;
    metrics_histogram *seconds;
} tool_series;

struct llm {
    llm_opts o;
    upstream *up;
    tools *tools;
    const models *models;
    char *url; /* base_url + /chat/completions */
    llm_metrics mx;
    metrics_counter *prompt_tokens, *completion_tokens;
    tool_series *tool_mx; /* one per registered tool, then "unknown" */
    size_t ntool_mx;
};

/* An event held while the call's write queue is full, packed. */
typedef struct held {
    uint8_t *buf;
    size_t len;
    struct held *next;
} held;

typedef enum turn_kind { TURN_CHAT, TURN_COMPLETE } turn_kind;

/* One Chat or Complete call. */
typedef struct turn {
    pthread_mutex_t mu;
    atomic_int refs; /* the call, the upstream request, each running tool */
    turn_kind kind;
    llm *l;
    srv_call *call; /* NULL once finished */
    char *session_id, *user_id, *request_id, *model;
    json_object *body; /* the request body; its "messages" grow round by round */
    json_object *messages;
    int tools_enabled;
    int64_t deadline_ms;
    int round;
    upstream_req *req; /* NULL when no request is in flight */
    sse_parser *sse;
    toolcall_set *calls;
    char *text; /* this round's text (for the assistant message), or the Complete body */
    size_t text_len;
    size_t text_cap;
    char *finish_reason, *resp_model;
    int saw_end; /* [DONE] or a finish_reason */
    uint32_t prompt_tokens, completion_tokens, total_tokens;
    int has_usage;
    /* A failure found while reading the stream (bad data, caps). */
    Convo__V1__ErrorCategory bad_cat;
    char *bad_msg;
    held *head, *tail;
    int nheld, paused, terminal_held;
    int cancelled, ended;
    /* The running round of tools. */
    size_t ntools, tools_left;
    char **results;
    int *result_err;
    const char *outcome; /* how it ended, for convo_llm_turns_total: done, error, cancelled */
} turn;

/* Callbacks of a call read its turn through this lock, so a turn that
 * finished on another thread is never touched after its call let go. */
static pthread_mutex_t calls_mu = PTHREAD_MUTEX_INITIALIZER;

static void turn_unref(turn *t)
{
    if (atomic_fetch_sub(&t->refs, 1) != 1)
        return;
    while (t->head) {
        held *h = t->head;
        t->head = h->next;
        mem_free(h->buf);
        mem_free(h);
    }
    for (size_t i = 0; i < t->ntools; i++)
        mem_free(t->results[i]);
    mem_free(t->results);
    mem_free(t->result_err);
    json_object_put(t->body);
    sse_parser_destroy(&t->sse);
    toolcall_set_destroy(&t->calls);
    mem_free(t->session_id);
    mem_free(t->user_id);
    mem_free(t->request_id);
    mem_free(t->model);
    mem_free(t->text);
    mem_free(t->finish_reason);
    mem_free(t->resp_model);
    mem_free(t->bad_msg);
    pthread_mutex_destroy(&t->mu);
    mem_free(t);
}

/* The turn of a call, with a reference, or NULL once finished. */
static turn *turn_of(srv_call *call)
{
    pthread_mutex_lock(&calls_mu);
    turn *t = srv_call_data(call);
    if (t != NULL)
        atomic_fetch_add(&t->refs, 1);
    pthread_mutex_unlock(&calls_mu);
    return t;
}

/* Finishes the call (t->mu held) and drops the call's reference later. */
static void finish_call(turn *t, rpc_code code, const char *msg, const ProtobufCMessage *resp)
{
    if (t->call == NULL)
        return;
    srv_call *call = t->call;
    t->call = NULL;
    const char *outcome = t->outcome != NULL      ? t->outcome
                          : code == RPC_OK        ? "done"
                          : code == RPC_CANCELLED ? "cancelled"
                                                  : "error";
    metrics_counter_inc(metrics_counter_of(
        t->l->mx.turns, (const char *[]){t->kind == TURN_CHAT ? "chat" : "complete", outcome}));
    pthread_mutex_lock(&calls_mu);
    srv_call_set_data(call, NULL);
    pthread_mutex_unlock(&calls_mu);
    srv_call_finish(call, code, msg, resp);
    atomic_fetch_sub(&t->refs, 1); /* never the last: the caller holds one */
}

/* ---- sending events ------------------------------------------------- */

static void hold(turn *t, const ProtobufCMessage *m)
{
    held *h = mem_calloc(1, sizeof *h);
    h->len = protobuf_c_message_get_packed_size(m);
    h->buf = mem_alloc(h->len ? h->len : 1);
    protobuf_c_message_pack(m, h->buf);
    if (t->tail)
        t->tail->next = h;
    else
        t->head = h;
    t->tail = h;
    t->nheld++;
}

/* Sends an event in order (t->mu held). Returns -1 when the call is gone
 * or the held events are over their cap. */
static int emit(turn *t, const Convo__V1__ChatEvent *ev)
{
    if (t->call == NULL)
        return -1;
    if (t->head == NULL) {
        int rc = srv_call_send(t->call, &ev->base);
        if (rc == 0)
            return 0;
        if (rc != RPC_EFULL)
            return -1;
    }
    if (t->nheld >= t->l->o.max_pending_events)
        return -1;
    hold(t, &ev->base);
    return 0;
}

static void end_with_event(turn *t, const Convo__V1__ChatEvent *ev)
{
    if (t->ended)
        return;
    t->ended = 1;
    if (emit(t, ev) != 0) {
        finish_call(t, RPC_CANCELLED, "the event stream ended", NULL);
        return;
    }
    if (t->head != NULL)
        t->terminal_held = 1; /* finished when the held events are out */
    else
        finish_call(t, RPC_OK, NULL, NULL);
}

static void end_error(turn *t, Convo__V1__ErrorCategory cat, int retryable, const char *msg)
{
    log_fields(LOG_WARN,
               (const log_field[]){
                   {"request_id", t->request_id}, {"session_id", t->session_id}, {NULL, NULL}},
               "turn failed in round %d: %s", t->round, msg);
    if (!t->ended)
        t->outcome = "error";
    Convo__V1__ErrorEvent e = CONVO__V1__ERROR_EVENT__INIT;
    e.category = cat;
    e.message = (char *)msg;
    e.retryable = retryable;
    Convo__V1__ChatEvent ev = CONVO__V1__CHAT_EVENT__INIT;
    ev.event_case = CONVO__V1__CHAT_EVENT__EVENT_ERROR;
    ev.error = &e;
    end_with_event(t, &ev);
}

static void count_usage(llm *l, uint32_t prompt, uint32_t completion)
{
    metrics_counter_add(l->prompt_tokens, prompt);
    metrics_counter_add(l->completion_tokens, completion);
}

static void end_done(turn *t, const char *finish_reason)
{
    Convo__V1__DoneEvent d = CONVO__V1__DONE_EVENT__INIT;
    Convo__V1__Usage u = CONVO__V1__USAGE__INIT;
    d.finish_reason = (char *)finish_reason;
    d.rounds = (uint32_t)t->round;
    d.model = t->resp_model ? t->resp_model : t->model;
    if (t->has_usage) {
        u.prompt_tokens = t->prompt_tokens;
        u.completion_tokens = t->completion_tokens;
        u.total_tokens = t->total_tokens;
        d.usage = &u;
        count_usage(t->l, t->prompt_tokens, t->completion_tokens);
    }
    if (!t->ended)
        t->outcome = "done";
    Convo__V1__ChatEvent ev = CONVO__V1__CHAT_EVENT__INIT;
    ev.event_case = CONVO__V1__CHAT_EVENT__EVENT_DONE;
    ev.done = &d;
    end_with_event(t, &ev);
}

/* Room to write again: sends held events, then resumes the upstream. */
static void on_writable(srv_call *call)
{
    turn *t = turn_of(call);
    if (t == NULL)
        return;
    pthread_mutex_lock(&t->mu);
    while (t->head != NULL && t->call != NULL) {
        held *h = t->head;
        Convo__V1__ChatEvent *ev = convo__v1__chat_event__unpack(NULL, h->len, h->buf);
        int rc = ev ? srv_call_send(t->call, &ev->base) : RPC_EENCODE;
        if (ev)
            convo__v1__chat_event__free_unpacked(ev, NULL);
        if (rc == RPC_EFULL)
            break;
        t->head = h->next;
        if (t->head == NULL)
            t->tail = NULL;
        t->nheld--;
        mem_free(h->buf);
        mem_free(h);
        if (rc != 0) {
            finish_call(t, RPC_CANCELLED, "the event stream ended", NULL);
            break;
        }
    }
    if (t->head == NULL && t->terminal_held)
        finish_call(t, RPC_OK, NULL, NULL);
    else if (t->head == NULL && t->paused && t->req != NULL) {
        t->paused = 0;
        upstream_resume(t->req);
    }
    pthread_mutex_unlock(&t->mu);
    turn_unref(t);
}

static void on_cancel(srv_call *call)
{
    turn *t = turn_of(call);
    if (t == NULL)
        return;
    pthread_mutex_lock(&t->mu);
    t->cancelled = 1;
    t->outcome = "cancelled";
    if (t->req != NULL)
        upstream_cancel(t->req); /* the loop closes the connection at once */
    log_fields(LOG_INFO,
               (const log_field[]){
                   {"request_id", t->request_id}, {"session_id", t->session_id}, {NULL, NULL}},
               "cancelled by the caller in round %d", t->round);
    finish_call(t, RPC_CANCELLED, "cancelled", NULL);
    pthread_mutex_unlock(&t->mu);
    turn_unref(t);
}

/* ---- the upstream side ------------------------------------------------ */

static void start_round(turn *t);

static void set_bad(turn *t, Convo__V1__ErrorCategory cat, const char *msg)
{
    if (t->bad_msg == NULL) {
        t->bad_cat = cat;
        t->bad_msg = mem_strdup(msg);
    }
}

static int append_text(turn *t, const char *s, size_t n)
{
    if (t->text_len + n > (size_t)t->l->o.max_answer_bytes)
        return -1;
    if (t->text_len + n + 1 > t->text_cap) {
        /* Doubling: a long answer arrives a token at a time. */
        t->text_cap = t->text_cap ? t->text_cap : 256;
        while (t->text_len + n + 1 > t->text_cap)
            t->text_cap *= 2;
        t->text = mem_realloc(t->text, t->text_cap);
    }
    memcpy(t->text + t->text_len, s, n);
    t->text_len += n;
    t->text[t->text_len] = '\0';
    return 0;
}

static int on_sse_event(void *arg, const char *event, const char *data, size_t len)
{
    turn *t = arg;
    char err[256];
    if (sse_is_done(data, len)) {
        t->saw_end = 1;
        return 0;
    }
    toolcall_chunk c;
    int rc = toolcall_chunk_parse(data, len, t->calls, &c, err, sizeof err);
    if (rc != 0) {
        set_bad(t, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_BAD_UPSTREAM_DATA, err);
        toolcall_chunk_clear(&c);
        return 1;
    }
    if (c.model && t->resp_model == NULL)
        t->resp_model = mem_strdup(c.model);
    if (c.finish_reason) {
        mem_free(t->finish_reason);
        t->finish_reason = mem_strdup(c.finish_reason);
        t->saw_end = 1;
    }
    if (c.has_usage) {
        t->has_usage = 1;
        t->prompt_tokens += c.prompt_tokens;
        t->completion_tokens += c.completion_tokens;
        t->total_tokens += c.total_tokens;
    }
    if (c.content != NULL) {
        size_t n = strlen(c.content);
        if (!rpc_utf8_valid(c.content, n)) {
            set_bad(t, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_BAD_UPSTREAM_DATA,
                    "the upstream sent text that is not UTF-8");
            toolcall_chunk_clear(&c);
            return 1;
        }
        if (append_text(t, c.content, n) != 0) {
            set_bad(t, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_INTERNAL,
                    "the answer is over --max-answer-bytes");
            toolcall_chunk_clear(&c);
            return 1;
        }
        Convo__V1__TokenEvent tok = CONVO__V1__TOKEN_EVENT__INIT;
        tok.content = c.content;
        Convo__V1__ChatEvent ev = CONVO__V1__CHAT_EVENT__INIT;
        ev.event_case = CONVO__V1__CHAT_EVENT__EVENT_TOKEN;
        ev.token = &tok;
        if (emit(t, &ev) != 0) {
            set_bad(t, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_INTERNAL,
                    "the caller stopped reading (held events over their cap)");
            toolcall_chunk_clear(&c);
            return 1;
        }
    }
    toolcall_chunk_clear(&c);
    return 0;
}

static int on_data(void *arg, const char *buf, size_t len)
{
    turn *t = arg;
    pthread_mutex_lock(&t->mu);
    int rc = 0;
    if (t->cancelled || t->call == NULL) {
        rc = -1;
    } else if (t->kind == TURN_COMPLETE) {
        if (append_text(t, buf, len) != 0) {
            set_bad(t, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_BAD_UPSTREAM_DATA,
                    "the answer is over --max-answer-bytes");
            rc = -1;
        }
    } else {
        int frc = sse_feed(t->sse, buf, len);
        if (frc == SSE_ETOOBIG)
            set_bad(t, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_BAD_UPSTREAM_DATA,
                    "an upstream event-stream line is over --max-sse-line-bytes");
        if (frc != 0)
            rc = -1;
        else if (t->head != NULL) {
            t->paused = 1; /* resumed by on_writable */
            rc = 1;
        }
    }
    pthread_mutex_unlock(&t->mu);
    return rc;
}

/* error.message of an OpenAI error body, else the body's start. */
static void error_message(const char *body, char *out, size_t outsize)
{
    json_object *o = json_tokener_parse(body), *e = NULL, *m = NULL;
    if (o && json_object_object_get_ex(o, "error", &e) &&
        json_object_object_get_ex(e, "message", &m) && json_object_is_type(m, json_type_string))
        snprintf(out, outsize, "%s", json_object_get_string(m));
    else
        snprintf(out, outsize, "%.300s", body);
    json_object_put(o);
}

/* How an upstream failure is told: category, retryable, gRPC code. */
static void classify(const upstream_done_info *in, Convo__V1__ErrorCategory *cat, int *retryable,
                     rpc_code *code, char *msg, size_t msgsize)
{
    char detail[320];
    *retryable = 1;
    switch (in->result) {
    case UPSTREAM_HTTP:
        error_message(in->message, detail, sizeof detail);
        snprintf(msg, msgsize, "upstream HTTP %ld after %d attempt%s: %s", in->status, in->attempts,
                 in->attempts == 1 ? "" : "s", detail);
        if (in->status == 429) {
            *cat = CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_RATE_LIMITED;
            *code = RPC_RESOURCE_EXHAUSTED;
        } else if (in->status == 401 || in->status == 403) {
            *cat = CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_AUTH_FAILED;
            *code = RPC_UNAUTHENTICATED;
            *retryable = 0;
        } else if (in->status == 404) {
            *cat = CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_MODEL_NOT_FOUND;
            *code = RPC_NOT_FOUND;
            *retryable = 0;
        } else if (in->status >= 400 && in->status < 500 && in->status != 408) {
            *cat = CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_INVALID_REQUEST;
            *code = RPC_INVALID_ARGUMENT;
            *retryable = 0;
        } else {
            *cat = CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_UPSTREAM_UNAVAILABLE;
            *code = RPC_UNAVAILABLE;
        }
        return;
    case UPSTREAM_TIMEOUT:
        *cat = CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_TIMEOUT;
        *code = RPC_DEADLINE_EXCEEDED;
        snprintf(msg, msgsize, "upstream timeout: %s", in->message);
        return;
    case UPSTREAM_CONNECT:
        *cat = CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_UPSTREAM_UNAVAILABLE;
        *code = RPC_UNAVAILABLE;
        snprintf(msg, msgsize, "cannot reach the upstream after %d attempt%s: %s", in->attempts,
                 in->attempts == 1 ? "" : "s", in->message);
        return;
    default:
        *cat = CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_UPSTREAM_UNAVAILABLE;
        *code = RPC_UNAVAILABLE;
        snprintf(msg, msgsize, "the upstream dropped the %s: %s",
                 in->delivered ? "stream mid-answer" : "connection", in->message);
    }
}

static void run_tools(turn *t);

/* convo_llm_upstream_requests_total: the request's outcome and the
 * category its caller is told (t->mu held). */
static void count_request(turn *t, const upstream_done_info *info)
{
    Convo__V1__ErrorCategory cat = CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_UNSPECIFIED;
    int retryable;
    rpc_code code;
    char msg[8];
    if (t->bad_msg != NULL)
        cat = t->bad_cat;
    else if (info->result != UPSTREAM_OK && info->result != UPSTREAM_CANCELLED)
        classify(info, &cat, &retryable, &code, msg, sizeof msg);
    const char *category = cat == CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_UNSPECIFIED
                               ? "none"
                               : names_error_category(cat);
    metrics_counter_inc(metrics_counter_of(t->l->mx.requests,
                                           (const char *[]){result_names[info->result], category}));
}

static void on_done(void *arg, const upstream_done_info *info)
{
    turn *t = arg;
    pthread_mutex_lock(&t->mu);
    t->req = NULL;
    t->paused = 0;
    Convo__V1__ErrorCategory cat;
    int retryable;
    rpc_code code;
    char msg[512];
    count_request(t, info);
    if (info->result == UPSTREAM_CANCELLED || t->cancelled || t->call == NULL)
        goto out;
    if (t->bad_msg != NULL) {
        if (t->kind == TURN_CHAT)
            end_error(t, t->bad_cat, 0, t->bad_msg);
        else
            finish_call(t, RPC_UNAVAILABLE, t->bad_msg, NULL);
        goto out;
    }
    if (info->result != UPSTREAM_OK) {
        classify(info, &cat, &retryable, &code, msg, sizeof msg);
        if (t->kind == TURN_CHAT)
            end_error(t, cat, retryable, msg);
        else
            finish_call(t, code, msg, NULL);
        goto out;
    }
    if (t->kind == TURN_COMPLETE) {
        toolcall_chunk c;
        char err[256];
        if (toolcall_response_parse(t->text ? t->text : "", t->text_len, &c, err, sizeof err) !=
            0) {
            finish_call(t, RPC_UNAVAILABLE, err, NULL);
        } else {
            Convo__V1__CompleteResponse r = CONVO__V1__COMPLETE_RESPONSE__INIT;
            Convo__V1__Usage u = CONVO__V1__USAGE__INIT;
            r.content = c.content;
            r.finish_reason = c.finish_reason ? c.finish_reason : "";
            r.model = c.model ? c.model : t->model;
            if (c.has_usage) {
                u.prompt_tokens = c.prompt_tokens;
                u.completion_tokens = c.completion_tokens;
                u.total_tokens = c.total_tokens;
                r.usage = &u;
                count_usage(t->l, c.prompt_tokens, c.completion_tokens);
            }
            if (!rpc_utf8_valid(r.content, strlen(r.content)))
                finish_call(t, RPC_UNAVAILABLE, "the upstream answer is not UTF-8", NULL);
            else
                finish_call(t, RPC_OK, NULL, &r.base);
        }
        toolcall_chunk_clear(&c);
        goto out;
    }
    if (!t->saw_end || !sse_idle(t->sse)) {
        end_error(t, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_UPSTREAM_UNAVAILABLE, 1,
                  "the upstream stream ended before its end (no finish_reason or [DONE])");
        goto out;
    }
    if (toolcall_set_count(t->calls) > 0)
        run_tools(t);
    else
        end_done(t, t->finish_reason ? t->finish_reason : "stop");
out:
    pthread_mutex_unlock(&t->mu);
    turn_unref(t);
}

/* Starts the next model request (t->mu held). */
static void start_round(turn *t)
{
    t->round++;
    toolcall_set_clear(t->calls);
    sse_parser_destroy(&t->sse);
    t->sse = sse_parser_create((size_t)t->l->o.max_sse_line_bytes,
                               (size_t)t->l->o.max_sse_line_bytes, on_sse_event, t);
    mem_free(t->text);
    t->text = NULL;
    t->text_len = 0;
    t->text_cap = 0;
    mem_free(t->finish_reason);
    t->finish_reason = NULL;
    t->saw_end = 0;
    upstream_spec spec = {
        .url = t->l->url,
        .api_key = t->l->o.api_key,
        .body = json_object_to_json_string_ext(t->body, JSON_C_TO_STRING_PLAIN),
        .request_id = t->request_id,
        .stream = t->kind == TURN_CHAT,
        .deadline_ms = t->deadline_ms,
    };
    static const upstream_cbs cbs = {on_data, on_done};
    atomic_fetch_add(&t->refs, 1);
    int rc = upstream_start(t->l->up, &spec, &cbs, t, &t->req);
    if (rc != 0) {
        atomic_fetch_sub(&t->refs, 1);
        t->req = NULL;
        const char *why = rc == UPSTREAM_EBUSY ? "too many upstream requests in flight"
                                               : "llm-svc is shutting down";
        if (t->kind == TURN_CHAT)
            end_error(t, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_INTERNAL, 1, why);
        else
            finish_call(t, RPC_RESOURCE_EXHAUSTED, why, NULL);
    }
}

/* ---- tools ------------------------------------------------------------ */

typedef struct tool_slot {
    turn *t;
    size_t i;
    uint64_t started_us;
} tool_slot;

/* The series of tool `name`: a registered one's, else "unknown"'s (the
 * model may name anything; the label stays bounded). */
static const tool_series *tool_series_of(const llm *l, const char *name)
{
    for (size_t i = 0; i + 1 < l->ntool_mx; i++)
        if (strcmp(l->tool_mx[i].name, name) == 0)
            return &l->tool_mx[i];
    return &l->tool_mx[l->ntool_mx - 1];
}

static void after_tools(turn *t)
{
    for (size_t i = 0; i < t->ntools; i++) {
        const toolcall *c = toolcall_set_get(t->calls, i);
        json_object *m = json_object_new_object();
        json_object_object_add(m, "role", json_object_new_string("tool"));
        json_object_object_add(m, "tool_call_id", json_object_new_string(c->id));
        json_object_object_add(m, "name", json_object_new_string(c->name));
        json_object_object_add(m, "content", json_object_new_string(t->results[i]));
        json_object_array_add(t->messages, m);
        mem_free(t->results[i]);
        t->results[i] = NULL;
    }
    start_round(t);
}

static void on_tool_done(void *arg, int is_error, char *result)
{
    tool_slot *s = arg;
    turn *t = s->t;
    size_t i = s->i;
    uint64_t started_us = s->started_us;
    mem_free(s);
    pthread_mutex_lock(&t->mu);
    t->results[i] = result;
    t->result_err[i] = is_error;
    const toolcall *c = toolcall_set_get(t->calls, i);
    const tool_series *ts = tool_series_of(t->l, c->name);
    metrics_counter_inc(is_error ? ts->error : ts->ok);
    if (started_us != 0)
        metrics_histogram_observe(ts->seconds, metrics_now_us() - started_us);
    Convo__V1__ToolResultEvent r = CONVO__V1__TOOL_RESULT_EVENT__INIT;
    r.call_id = c->id;
    r.name = c->name;
    r.result_json = result;
    r.is_error = is_error;
    Convo__V1__ChatEvent ev = CONVO__V1__CHAT_EVENT__INIT;
    ev.event_case = CONVO__V1__CHAT_EVENT__EVENT_TOOL_RESULT;
    ev.tool_result = &r;
    if (!t->cancelled && !t->ended && emit(t, &ev) != 0)
        t->cancelled = 1;
    if (--t->tools_left == 0 && !t->cancelled && !t->ended && t->call != NULL)
        after_tools(t);
    pthread_mutex_unlock(&t->mu);
    turn_unref(t);
}

/* Emits the round's calls, then runs them all at once (t->mu held). */
static void run_tools(turn *t)
{
    size_t n = toolcall_set_count(t->calls);
    json_object *tcs = json_object_new_array();
    for (size_t i = 0; i < n; i++) {
        toolcall *c = (toolcall *)toolcall_set_get(t->calls, i);
        if (c->id[0] == '\0') {
            /* A server that sent no id: make one, so results can refer to it. */
            mem_free(c->id);
            c->id = mem_asprintf("call_%d_%zu", t->round, i);
        }
        Convo__V1__ToolCallEvent e = CONVO__V1__TOOL_CALL_EVENT__INIT;
        e.call_id = c->id;
        e.name = c->name;
        e.arguments_json = c->args;
        e.round = (uint32_t)t->round;
        Convo__V1__ChatEvent ev = CONVO__V1__CHAT_EVENT__INIT;
        ev.event_case = CONVO__V1__CHAT_EVENT__EVENT_TOOL_CALL;
        ev.tool_call = &e;
        int valid =
            rpc_utf8_valid(c->args, c->args_len) && rpc_utf8_valid(c->name, strlen(c->name));
        if (!valid || emit(t, &ev) != 0) {
            json_object_put(tcs);
            if (!valid)
                end_error(t, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_BAD_UPSTREAM_DATA, 0,
                          "a tool call is not UTF-8");
            return;
        }
        json_object *tc = json_object_new_object(), *fn = json_object_new_object();
        json_object_object_add(tc, "id", json_object_new_string(c->id));
        json_object_object_add(tc, "type", json_object_new_string("function"));
        json_object_object_add(fn, "name", json_object_new_string(c->name));
        json_object_object_add(fn, "arguments", json_object_new_string(c->args));
        json_object_object_add(tc, "function", fn);
        json_object_array_add(tcs, tc);
    }
    if (t->round >= t->l->o.max_rounds) {
        json_object_put(tcs);
        end_done(t, "max_rounds");
        return;
    }
    json_object *m = json_object_new_object();
    json_object_object_add(m, "role", json_object_new_string("assistant"));
    json_object_object_add(m, "content", t->text ? json_object_new_string(t->text) : NULL);
    json_object_object_add(m, "tool_calls", tcs);
    json_object_array_add(t->messages, m);

    for (size_t i = 0; i < t->ntools; i++)
        mem_free(t->results[i]);
    t->results = mem_realloc(t->results, n * sizeof *t->results);
    t->result_err = mem_realloc(t->result_err, n * sizeof *t->result_err);
    memset(t->results, 0, n * sizeof *t->results);
    t->ntools = n;
    t->tools_left = n + 1; /* +1 while starting them: none can finish the round early */
    tool_ctx ctx = {t->session_id, t->user_id, t->request_id};
    /* Tools may answer on this thread (the knowledge base) or later on a
     * gRPC client thread (the store); the lock is released while they
     * start so a synchronous answer can take it. */
    for (size_t i = 0; i < n; i++) {
        const toolcall *c = toolcall_set_get(t->calls, i);
        tool_slot *s = mem_alloc(sizeof *s);
        s->t = t;
        s->i = i;
        s->started_us = t->l->mx.tool_seconds != NULL ? metrics_now_us() : 0;
        atomic_fetch_add(&t->refs, 1);
        char *name = mem_strdup(c->name), *args = mem_strdup(c->args);
        pthread_mutex_unlock(&t->mu);
        tools_call(t->l->tools, &ctx, name, args, on_tool_done, s);
        pthread_mutex_lock(&t->mu);
        mem_free(name);
        mem_free(args);
    }
    if (--t->tools_left == 0 && !t->cancelled && !t->ended && t->call != NULL)
        after_tools(t);
}

/* ---- requests --------------------------------------------------------- */

static const char *role_name(Convo__V1__Role r)
{
    switch (r) {
    case CONVO__V1__ROLE__ROLE_SYSTEM:
        return "system";
    case CONVO__V1__ROLE__ROLE_ASSISTANT:
        return "assistant";
    case CONVO__V1__ROLE__ROLE_TOOL:
        return "tool";
    default:
        return "user";
    }
}

static const char *nz(const char *s)
{
    return s ? s : "";
}

static int check_utf8(const char *s, const char *what, char *err, size_t errsize)
{
    if (s != NULL && !rpc_utf8_valid(s, strlen(s))) {
        snprintf(err, errsize, "%s is not valid UTF-8", what);
        return -1;
    }
    return 0;
}

static int add_history(json_object *msgs, Convo__V1__Message **hist, size_t n, char *err,
                       size_t errsize)
{
    for (size_t i = 0; i < n; i++) {
        const Convo__V1__Message *h = hist[i];
        if (check_utf8(h->content, "a history message", err, errsize) != 0)
            return -1;
        json_object *m = json_object_new_object();
        json_object_object_add(m, "role", json_object_new_string(role_name(h->role)));
        json_object_object_add(m, "content", json_object_new_string(nz(h->content)));
        if (h->role == CONVO__V1__ROLE__ROLE_TOOL) {
            json_object_object_add(m, "tool_call_id", json_object_new_string(nz(h->tool_call_id)));
            if (h->name && h->name[0])
                json_object_object_add(m, "name", json_object_new_string(h->name));
        }
        if (h->n_tool_calls > 0) {
            json_object *tcs = json_object_new_array();
            for (size_t k = 0; k < h->n_tool_calls; k++) {
                json_object *tc = json_object_new_object(), *fn = json_object_new_object();
                json_object_object_add(tc, "id", json_object_new_string(nz(h->tool_calls[k]->id)));
                json_object_object_add(tc, "type", json_object_new_string("function"));
                json_object_object_add(fn, "name",
                                       json_object_new_string(nz(h->tool_calls[k]->name)));
                json_object_object_add(
                    fn, "arguments", json_object_new_string(nz(h->tool_calls[k]->arguments_json)));
                json_object_object_add(tc, "function", fn);
                json_object_array_add(tcs, tc);
            }
            json_object_object_add(m, "tool_calls", tcs);
        }
        json_object_array_add(msgs, m);
    }
    return 0;
}

/* What a caller may ask, checked before anything is sent upstream: the
 * size of the conversation it hands over and the generation parameters.
 * Returns 0, or -1 with err for INVALID_ARGUMENT. */
static int check_bounds(const llm *l, const char *system_prompt, Convo__V1__Message **hist,
                        size_t n, const char *what, const Convo__V1__GenerationParams *p, char *err,
                        size_t errsize)
{
    const llm_opts *o = &l->o;
    if (strlen(nz(system_prompt)) > (size_t)o->max_system_prompt_bytes) {
        snprintf(err, errsize, "system_prompt is over %lld bytes (--max-system-prompt-bytes)",
                 o->max_system_prompt_bytes);
        return -1;
    }
    if (n > (size_t)o->max_history_messages) {
        snprintf(err, errsize,
                 "%s has %zu messages, over the limit of %lld "
                 "(--max-history-messages)",
                 what, n, o->max_history_messages);
        return -1;
    }
    size_t bytes = 0;
    for (size_t i = 0; i < n; i++) {
        const Convo__V1__Message *h = hist[i];
        bytes += strlen(nz(h->content)) + strlen(nz(h->tool_call_id)) + strlen(nz(h->name));
        for (size_t k = 0; k < h->n_tool_calls; k++)
            bytes += strlen(nz(h->tool_calls[k]->id)) + strlen(nz(h->tool_calls[k]->name)) +
                     strlen(nz(h->tool_calls[k]->arguments_json));
    }
    if (bytes > (size_t)o->max_history_bytes) {
        snprintf(err, errsize, "%s holds %zu bytes, over the limit of %lld (--max-history-bytes)",
                 what, bytes, o->max_history_bytes);
        return -1;
    }
    if (p == NULL)
        return 0;
    if (p->model != NULL && p->model[0] != '\0' && !models_allowed(l->models, p->model)) {
        snprintf(err, errsize, "params.model '%.128s' is not allowed; allowed: %s", p->model,
                 models_list(l->models));
        return -1;
    }
    if ((long long)p->max_tokens > o->max_output_tokens) {
        snprintf(err, errsize,
                 "params.max_tokens %u is over the limit of %lld "
                 "(--max-output-tokens)",
                 p->max_tokens, o->max_output_tokens);
        return -1;
    }
    if (!(p->temperature >= 0.0f && p->temperature <= MAX_TEMPERATURE)) {
        snprintf(err, errsize, "params.temperature %g is outside 0 to %g", (double)p->temperature,
                 MAX_TEMPERATURE);
        return -1;
    }
    return 0;
}

static turn *turn_new(llm *l, srv_call *call, turn_kind kind, const char *session_id,
                      const Convo__V1__GenerationParams *p)
{
    turn *t = mem_calloc(1, sizeof *t);
    pthread_mutex_init(&t->mu, NULL);
    atomic_init(&t->refs, 1);
    t->kind = kind;
    t->l = l;
    t->call = call;
    t->session_id = mem_strdup(nz(session_id));
    t->request_id = mem_strdup(srv_call_request_id(call));
    t->model = mem_strdup(p && p->model && p->model[0] ? p->model : l->o.model);
    t->calls = toolcall_set_create((size_t)l->o.max_tool_calls, (size_t)l->o.max_tool_args_bytes);
    int64_t rem = srv_call_remaining_ms(call);
    t->deadline_ms = rem == INT64_MAX ? 0 : rpc_now_ms() + rem;
    t->body = json_object_new_object();
    t->messages = json_object_new_array();
    json_object_object_add(t->body, "model", json_object_new_string(t->model));
    json_object_object_add(t->body, "messages", t->messages);
    if (p != NULL) {
        json_object_object_add(t->body, "temperature", json_object_new_double(p->temperature));
        if (p->max_tokens > 0)
            json_object_object_add(t->body, "max_tokens", json_object_new_int64(p->max_tokens));
    }
    return t;
}

static void add_message(json_object *msgs, const char *role, const char *content)
{
    json_object *m = json_object_new_object();
    json_object_object_add(m, "role", json_object_new_string(role));
    json_object_object_add(m, "content", json_object_new_string(content));
    json_object_array_add(msgs, m);
}

static void begin(turn *t, srv_call *call)
{
    pthread_mutex_lock(&calls_mu);
    srv_call_set_data(call, t);
    pthread_mutex_unlock(&calls_mu);
    srv_call_on_cancel(call, on_cancel);
    if (t->kind == TURN_CHAT)
        srv_call_on_writable(call, on_writable);
    pthread_mutex_lock(&t->mu);
    start_round(t);
    pthread_mutex_unlock(&t->mu);
    turn_unref(t); /* begin's reference: the call's own is released at finish */
}

static void on_chat(srv_call *call, const ProtobufCMessage *msg)
{
    llm *l = srv_call_method_data(call);
    const Convo__V1__ChatRequest *req = (const Convo__V1__ChatRequest *)msg;
    char err[256];
    const char *m = nz(req->message);
    if (m[0] == '\0') {
        srv_call_finish(call, RPC_INVALID_ARGUMENT, "message is required", NULL);
        return;
    }
    if (strlen(m) > (size_t)l->o.max_message_bytes) {
        srv_call_finishf(call, RPC_INVALID_ARGUMENT, "message is over %lld bytes",
                         l->o.max_message_bytes);
        return;
    }
    if (check_utf8(m, "message", err, sizeof err) != 0 ||
        check_utf8(req->system_prompt, "system_prompt", err, sizeof err) != 0 ||
        check_utf8(req->session_id, "session_id", err, sizeof err) != 0 ||
        check_utf8(req->user_id, "user_id", err, sizeof err) != 0 ||
        check_bounds(l, req->system_prompt, req->history, req->n_history, "history", req->params,
                     err, sizeof err) != 0) {
        srv_call_finish(call, RPC_INVALID_ARGUMENT, err, NULL);
        return;
    }
    turn *t = turn_new(l, call, TURN_CHAT, req->session_id, req->params);
    t->user_id = mem_strdup(nz(req->user_id));
    atomic_fetch_add(&t->refs, 1); /* begin's */
    if (req->system_prompt && req->system_prompt[0])
        add_message(t->messages, "system", req->system_prompt);
    if (add_history(t->messages, req->history, req->n_history, err, sizeof err) != 0) {
        srv_call_finish(call, RPC_INVALID_ARGUMENT, err, NULL);
        t->call = NULL;
        turn_unref(t);
        turn_unref(t);
        return;
    }
    add_message(t->messages, "user", m);
    json_object_object_add(t->body, "stream", json_object_new_boolean(1));
    json_object *so = json_object_new_object();
    json_object_object_add(so, "include_usage", json_object_new_boolean(1));
    json_object_object_add(t->body, "stream_options", so);
    t->tools_enabled = req->params ? req->params->tools_enabled : 0;
    if (t->tools_enabled && tools_count(l->tools) > 0)
        json_object_object_add(t->body, "tools", tools_openai_json(l->tools));
    log_fields(LOG_DEBUG, (const log_field[]){{"session_id", t->session_id}, {NULL, NULL}},
               "Chat: model %s, %zu history messages, tools %s", t->model, req->n_history,
               t->tools_enabled ? "on" : "off");
    begin(t, call);
}

static void on_complete(srv_call *call, const ProtobufCMessage *msg)
{
    llm *l = srv_call_method_data(call);
    const Convo__V1__CompleteRequest *req = (const Convo__V1__CompleteRequest *)msg;
    char err[256];
    if (req->n_messages == 0) {
        srv_call_finish(call, RPC_INVALID_ARGUMENT, "at least one message is required", NULL);
        return;
    }
    if (check_utf8(req->system_prompt, "system_prompt", err, sizeof err) != 0 ||
        check_bounds(l, req->system_prompt, req->messages, req->n_messages, "messages", req->params,
                     err, sizeof err) != 0) {
        srv_call_finish(call, RPC_INVALID_ARGUMENT, err, NULL);
        return;
    }
    turn *t = turn_new(l, call, TURN_COMPLETE, req->session_id, req->params);
    atomic_fetch_add(&t->refs, 1);
    if (req->system_prompt && req->system_prompt[0])
        add_message(t->messages, "system", req->system_prompt);
    if (add_history(t->messages, req->messages, req->n_messages, err, sizeof err) != 0) {
        srv_call_finish(call, RPC_INVALID_ARGUMENT, err, NULL);
        t->call = NULL;
        turn_unref(t);
        turn_unref(t);
        return;
    }
    json_object_object_add(t->body, "stream", json_object_new_boolean(0));
    begin(t, call);
}

static void on_list_tools(srv_call *call, const ProtobufCMessage *msg)
{
    llm *l = srv_call_method_data(call);
    size_t n = tools_count(l->tools);
    Convo__V1__Tool *tv = mem_calloc(n ? n : 1, sizeof *tv);
    Convo__V1__Tool **tp = mem_calloc(n ? n : 1, sizeof *tp);
    for (size_t i = 0; i < n; i++) {
        const tool_def *d = tools_get(l->tools, i);
        convo__v1__tool__init(&tv[i]);
        tv[i].name = (char *)d->name;
        tv[i].description = (char *)d->description;
        tv[i].parameters_json_schema = (char *)d->schema;
        tp[i] = &tv[i];
    }
    Convo__V1__ListToolsResponse r = CONVO__V1__LIST_TOOLS_RESPONSE__INIT;
    r.n_tools = n;
    r.tools = tp;
    srv_call_finish(call, RPC_OK, NULL, &r.base);
    mem_free(tv);
    mem_free(tp);
}

/* The series of the outcomes that happen, made at 0 now: a series born
 * with its first count would hide that count from rate() (and from the
 * alert on rate-limited failures). */
static void make_series(llm *l)
{
    static const char *const requests[][2] = {
        {"ok", "none"},
        {"http_error", "rate_limited"},
        {"http_error", "auth_failed"},
        {"http_error", "model_not_found"},
        {"http_error", "invalid_request"},
        {"http_error", "upstream_unavailable"},
        {"connect_error", "upstream_unavailable"},
        {"timeout", "timeout"},
        {"dropped", "upstream_unavailable"},
        {"stopped", "bad_upstream_data"},
        {"cancelled", "none"},
    };
    static const char *const kinds[] = {"chat", "complete"};
    static const char *const outcomes[] = {"done", "error", "cancelled"};
    for (size_t i = 0; i < sizeof requests / sizeof requests[0]; i++)
        metrics_counter_of(l->mx.requests, requests[i]);
    for (size_t k = 0; k < 2; k++)
        for (size_t o = 0; o < 3; o++)
            metrics_counter_of(l->mx.turns, (const char *[]){kinds[k], outcomes[o]});
}

llm *llm_create(const llm_opts *o, upstream *u, tools *t, const models *m, metrics *mx)
{
    llm *l = mem_calloc(1, sizeof *l);
    l->o = *o;
    l->up = u;
    l->tools = t;
    l->models = m;
    metrics_register(mx, METRICS_SECTION(llm_metrics, &l->mx));
    make_series(l);
    l->prompt_tokens = metrics_counter_of(l->mx.tokens, (const char *[]){"prompt"});
    l->completion_tokens = metrics_counter_of(l->mx.tokens, (const char *[]){"completion"});
    l->ntool_mx = tools_count(t) + 1;
    l->tool_mx = mem_calloc(l->ntool_mx, sizeof *l->tool_mx);
    for (size_t i = 0; i < l->ntool_mx; i++) {
        tool_series *ts = &l->tool_mx[i];
        ts->name = i + 1 < l->ntool_mx ? tools_get(t, i)->name : "unknown";
        ts->ok = metrics_counter_of(l->mx.tool_calls, (const char *[]){ts->name, "ok"});
        ts->error = metrics_counter_of(l->mx.tool_calls, (const char *[]){ts->name, "error"});
        ts->seconds = metrics_histogram_of(l->mx.tool_seconds, (const char *[]){ts->name});
    }
    size_t n = strlen(o->base_url);
    while (n > 0 && o->base_url[n - 1] == '/')
        n--;
    l->url = mem_asprintf("%.*s/chat/completions", (int)n, o->base_url);
    return l;
}

int llm_register(srv *s, llm *l)
{
    /* Who calls what (README.md), enforced under mutual TLS: turns come from
     * the gateway, summaries from summary-svc; `admin` (an operator) only
     * reads the tools. */
    const srv_method methods[] = {
        {"/convo.v1.Llm/Chat", SRV_SERVER_STREAM, &convo__v1__chat_request__descriptor,
         &convo__v1__chat_event__descriptor, on_chat, NULL, NULL, "gateway"},
        {"/convo.v1.Llm/Complete", SRV_UNARY, &convo__v1__complete_request__descriptor,
         &convo__v1__complete_response__descriptor, on_complete, NULL, NULL, "summary-svc"},
        {"/convo.v1.Llm/ListTools", SRV_UNARY, &convo__v1__list_tools_request__descriptor,
         &convo__v1__list_tools_response__descriptor, on_list_tools, NULL, NULL,
         "gateway summary-svc admin"},
    };
    for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++)
        if (srv_add_method(s, &methods[i], l) != 0)
            return RPC_EARG;
    return 0;
}

void llm_destroy(llm **lp)
{
    if (lp == NULL || *lp == NULL)
        return;
    mem_free((*lp)->url);
    mem_free((*lp)->tool_mx);
    mem_free(*lp);
    *lp = NULL;
}
