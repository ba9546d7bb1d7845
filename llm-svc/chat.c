#include "chat.h"

#include "log.h"
#include "mem.h"
#include "sse.h"
#include "toolcall.h"

#include <stdio.h>
#include <string.h>

/* An event held while the call's write queue is full, packed. */
typedef struct held {
    uint8_t *buf;
    size_t len;
    struct held *next;
} held;

/* One Chat call. Everything after `t` is under t.mu unless marked fixed
 * (run_tools reads those without it). */
typedef struct chat {
    turn t;              /* first: a chat is a turn */
    const chat_svc *svc; /* fixed */
    char *user_id;       /* fixed */
    int round;           /* 1-based, of the request in flight or last made */
    /* This round's stream. */
    sse_parser *sse;
    toolcall_set *calls; /* the pointer is fixed, the calls in it under mu */
    turn_text text;      /* this round's text, for the assistant message */
    char *finish_reason, *resp_model;
    int saw_end; /* [DONE] or a finish_reason */
    /* Summed over the rounds. */
    uint32_t prompt_tokens, completion_tokens, total_tokens;
    int has_usage;
    /* Events waiting for room in the call's write queue. */
    held *head, *tail;
    int nheld, paused, terminal_held;
    int ended; /* the last event was emitted (maybe still held) */
    /* The running round of tools. */
    size_t ntools, tools_left;
    char **results; /* each tool's JSON result, sent back to the model */
    /* The round's span: its model request and its tools are children. */
    trace_span round_span;
} chat;

static chat *chat_of(turn *t)
{
    return (chat *)t;
}

static void chat_free(turn *t)
{
    chat *c = chat_of(t);
    while (c->head) {
        held *h = c->head;
        c->head = h->next;
        mem_free(h->buf);
        mem_free(h);
    }
    for (size_t i = 0; i < c->ntools; i++)
        mem_free(c->results[i]);
    mem_free(c->results);
    sse_parser_destroy(&c->sse);
    toolcall_set_destroy(&c->calls);
    mem_free(c->user_id);
    turn_text_clear(&c->text);
    mem_free(c->finish_reason);
    mem_free(c->resp_model);
    trace_span_end(&c->round_span); /* ended with the turn already; this only frees */
}

/* ---- sending events ------------------------------------------------- */

static void hold(chat *c, const ProtobufCMessage *m)
{
    held *h = mem_calloc(1, sizeof *h);
    h->len = protobuf_c_message_get_packed_size(m);
    h->buf = mem_alloc(h->len ? h->len : 1);
    protobuf_c_message_pack(m, h->buf);
    if (c->tail)
        c->tail->next = h;
    else
        c->head = h;
    c->tail = h;
    c->nheld++;
}

/* Sends an event in order. Returns -1 when the call is gone or the held
 * events are over their cap. */
static int emit(chat *c, const Convo__V1__ChatEvent *ev)
{
    if (c->t.call == NULL)
        return -1;
    if (c->head == NULL) {
        int rc = srv_call_send(c->t.call, &ev->base);
        if (rc == 0)
            return 0;
        if (rc != RPC_EFULL)
            return -1;
    }
    if (c->nheld >= c->svc->o->max_pending_events)
        return -1;
    hold(c, &ev->base);
    return 0;
}

static void end_with_event(chat *c, const Convo__V1__ChatEvent *ev)
{
    if (c->ended)
        return;
    c->ended = 1;
    trace_span_end(&c->round_span);
    if (emit(c, ev) != 0) {
        turn_finish(&c->t, RPC_CANCELLED, "the event stream ended", NULL);
        return;
    }
    if (c->head != NULL)
        c->terminal_held = 1; /* finished when the held events are out */
    else
        turn_finish(&c->t, RPC_OK, NULL, NULL);
}

static void end_error(chat *c, Convo__V1__ErrorCategory cat, int retryable, const char *msg)
{
    log_fields(LOG_WARN,
               (const log_field[]){
                   {"request_id", c->t.request_id}, {"session_id", c->t.session_id}, {NULL, NULL}},
               "turn failed in round %d: %s", c->round, msg);
    if (!c->ended)
        c->t.outcome = TURN_OUTCOME_ERROR;
    trace_span_error(&c->round_span, "%s", msg);
    Convo__V1__ErrorEvent e = CONVO__V1__ERROR_EVENT__INIT;
    e.category = cat;
    e.message = (char *)msg;
    e.retryable = retryable;
    Convo__V1__ChatEvent ev = CONVO__V1__CHAT_EVENT__INIT;
    ev.event_case = CONVO__V1__CHAT_EVENT__EVENT_ERROR;
    ev.error = &e;
    end_with_event(c, &ev);
}

static void end_done(chat *c, const char *finish_reason)
{
    Convo__V1__DoneEvent d = CONVO__V1__DONE_EVENT__INIT;
    Convo__V1__Usage u = CONVO__V1__USAGE__INIT;
    d.finish_reason = (char *)finish_reason;
    d.rounds = (uint32_t)c->round;
    d.model = c->resp_model ? c->resp_model : (char *)turn_model_asked(&c->t);
    d.upstream = (char *)turn_upstream(&c->t);
    if (c->has_usage) {
        u.prompt_tokens = c->prompt_tokens;
        u.completion_tokens = c->completion_tokens;
        u.total_tokens = c->total_tokens;
        d.usage = &u;
        turn_count_usage(&c->t, c->prompt_tokens, c->completion_tokens);
        trace_span_set_int(&c->round_span, "gen_ai.usage.input_tokens", c->prompt_tokens);
        trace_span_set_int(&c->round_span, "gen_ai.usage.output_tokens", c->completion_tokens);
    }
    trace_span_set_str(&c->round_span, "gen_ai.response.finish_reason", finish_reason);
    if (!c->ended)
        c->t.outcome = TURN_OUTCOME_DONE;
    Convo__V1__ChatEvent ev = CONVO__V1__CHAT_EVENT__INIT;
    ev.event_case = CONVO__V1__CHAT_EVENT__EVENT_DONE;
    ev.done = &d;
    end_with_event(c, &ev);
}

/* Room to write again (the call's thread): sends held events, then resumes
 * the upstream. */
static void chat_on_writable(turn *t)
{
    chat *c = chat_of(t);
    pthread_mutex_lock(&t->mu);
    while (c->head != NULL && t->call != NULL) {
        held *h = c->head;
        Convo__V1__ChatEvent *ev = convo__v1__chat_event__unpack(NULL, h->len, h->buf);
        int rc = ev ? srv_call_send(t->call, &ev->base) : RPC_EENCODE;
        if (ev)
            convo__v1__chat_event__free_unpacked(ev, NULL);
        if (rc == RPC_EFULL)
            break;
        c->head = h->next;
        if (c->head == NULL)
            c->tail = NULL;
        c->nheld--;
        mem_free(h->buf);
        mem_free(h);
        if (rc != 0) {
            turn_finish(t, RPC_CANCELLED, "the event stream ended", NULL);
            break;
        }
    }
    if (c->head == NULL && c->terminal_held)
        turn_finish(t, RPC_OK, NULL, NULL);
    else if (c->head == NULL && c->paused && t->req != NULL) {
        c->paused = 0;
        upstream_resume(t->req);
    }
    pthread_mutex_unlock(&t->mu);
}

/* ---- the upstream's stream -------------------------------------------- */

/* A chunk's text: kept for the next round and sent as a token. Returns -1
 * (the stream stops) on a failure, recorded with turn_set_bad. */
static int take_content(chat *c, const char *content)
{
    size_t n = strlen(content);
    if (!rpc_utf8_valid(content, n)) {
        turn_set_bad(&c->t, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_BAD_UPSTREAM_DATA,
                     "the upstream sent text that is not UTF-8");
        return -1;
    }
    if (turn_text_append(&c->text, content, n, (size_t)c->t.env->o->max_answer_bytes) != 0) {
        turn_set_bad(&c->t, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_INTERNAL,
                     "the answer is over --max-answer-bytes");
        return -1;
    }
    Convo__V1__TokenEvent tok = CONVO__V1__TOKEN_EVENT__INIT;
    tok.content = (char *)content;
    Convo__V1__ChatEvent ev = CONVO__V1__CHAT_EVENT__INIT;
    ev.event_case = CONVO__V1__CHAT_EVENT__EVENT_TOKEN;
    ev.token = &tok;
    if (emit(c, &ev) != 0) {
        turn_set_bad(&c->t, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_INTERNAL,
                     "the caller stopped reading (held events over their cap)");
        return -1;
    }
    c->t.shown = 1; /* from now on this request's failure is final */
    return 0;
}

/* One SSE event of the stream (t->mu held, inside sse_feed). */
static int on_sse_event(void *arg, const char *event, const char *data, size_t len)
{
    (void)event;
    chat *c = arg;
    char err[256];
    if (sse_is_done(data, len)) {
        c->saw_end = 1;
        return 0;
    }
    toolcall_chunk k;
    int rc = toolcall_chunk_parse(data, len, c->calls, &k, err, sizeof err);
    if (rc != 0) {
        turn_set_bad(&c->t, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_BAD_UPSTREAM_DATA, err);
        toolcall_chunk_clear(&k);
        return 1;
    }
    if (k.model && c->resp_model == NULL)
        c->resp_model = mem_strdup(k.model);
    if (k.finish_reason) {
        mem_free(c->finish_reason);
        c->finish_reason = mem_strdup(k.finish_reason);
        c->saw_end = 1;
    }
    if (k.has_usage) {
        c->has_usage = 1;
        c->prompt_tokens += k.prompt_tokens;
        c->completion_tokens += k.completion_tokens;
        c->total_tokens += k.total_tokens;
    }
    rc = k.content != NULL ? take_content(c, k.content) : 0;
    toolcall_chunk_clear(&k);
    return rc != 0;
}

static int chat_on_data(turn *t, const char *buf, size_t len)
{
    chat *c = chat_of(t);
    pthread_mutex_lock(&t->mu);
    int rc = 0;
    if (!turn_live(t)) {
        rc = -1;
    } else {
        int frc = sse_feed(c->sse, buf, len);
        if (frc == SSE_ETOOBIG)
            turn_set_bad(&c->t, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_BAD_UPSTREAM_DATA,
                         "an upstream event-stream line is over --max-sse-line-bytes");
        if (frc != 0)
            rc = -1;
        else if (c->head != NULL) {
            c->paused = 1; /* resumed by chat_on_writable */
            rc = 1;
        }
    }
    pthread_mutex_unlock(&t->mu);
    return rc;
}

/* A fresh stream for a request: a new round's or a fallback's. */
static void reset_stream(chat *c)
{
    toolcall_set_clear(c->calls);
    sse_parser_destroy(&c->sse);
    size_t max_line = (size_t)c->svc->o->max_sse_line_bytes;
    c->sse = sse_parser_create(max_line, max_line, on_sse_event, c);
    turn_text_clear(&c->text);
    mem_free(c->finish_reason);
    c->finish_reason = NULL;
    mem_free(c->resp_model);
    c->resp_model = NULL;
    c->saw_end = 0;
    c->paused = 0;
}

static void chat_rewind(turn *t)
{
    reset_stream(chat_of(t));
}

/* Starts the next model round, under a span of its own. */
static void start_round(chat *c)
{
    c->round++;
    reset_stream(c);
    trace_span_end(&c->round_span);
    trace_span_child(&c->round_span, c->t.call != NULL ? srv_call_span(c->t.call) : NULL,
                     "chat round", TRACE_INTERNAL);
    trace_span_set_int(&c->round_span, "convo.round", c->round);
    c->t.trace_parent = &c->round_span;
    turn_failure f;
    if (turn_request(&c->t, &f) != 0)
        end_error(c, f.category, f.retryable, f.message);
}

/* ---- tools ------------------------------------------------------------ */

/* One tool call to start: copies made under the lock. */
typedef struct tool_job {
    chat *c;
    size_t i;
    char *name, *args;
    uint64_t started_us; /* for convo_llm_tool_seconds (0 with metrics off) */
    trace_span span;     /* a child of the round's */
} tool_job;

/* The series of tool `name`: a registered one's, else "unknown"'s (the
 * model may name anything; the label stays bounded). */
static const chat_tool_series *tool_series_of(const chat_svc *svc, const char *name)
{
    for (size_t i = 0; i + 1 < svc->ntool_mx; i++)
        if (strcmp(svc->tool_mx[i].name, name) == 0)
            return &svc->tool_mx[i];
    return &svc->tool_mx[svc->ntool_mx - 1];
}

/* The tool messages of a finished round, then the next round. */
static void after_tools(chat *c)
{
    for (size_t i = 0; i < c->ntools; i++) {
        const toolcall *tc = toolcall_set_get(c->calls, i);
        json_object *m = json_object_new_object();
        json_object_object_add(m, "role", json_object_new_string("tool"));
        json_object_object_add(m, "tool_call_id", json_object_new_string(tc->id));
        json_object_object_add(m, "name", json_object_new_string(tc->name));
        json_object_object_add(m, "content", json_object_new_string(c->results[i]));
        json_object_array_add(c->t.messages, m);
        mem_free(c->results[i]);
        c->results[i] = NULL;
    }
    start_round(c);
}

/* One tool's start is over or one tool answered: the last of the round
 * goes on to the next round. */
static void tool_settled(chat *c)
{
    if (--c->tools_left == 0 && turn_live(&c->t) && !c->ended)
        after_tools(c);
}

static void on_tool_done(void *arg, int is_error, char *result)
{
    tool_job *j = arg;
    chat *c = j->c;
    size_t i = j->i;
    uint64_t started_us = j->started_us;
    if (is_error)
        trace_span_error(&j->span, "%.200s", result);
    trace_span_end(&j->span);
    mem_free(j);
    pthread_mutex_lock(&c->t.mu);
    c->results[i] = result;
    const toolcall *tc = toolcall_set_get(c->calls, i);
    const chat_tool_series *ts = tool_series_of(c->svc, tc->name);
    metrics_counter_inc(is_error ? ts->error : ts->ok);
    if (started_us != 0)
        metrics_histogram_observe(ts->seconds, metrics_now_us() - started_us);
    Convo__V1__ToolResultEvent r = CONVO__V1__TOOL_RESULT_EVENT__INIT;
    r.call_id = tc->id;
    r.name = tc->name;
    r.result_json = result;
    r.is_error = is_error;
    Convo__V1__ChatEvent ev = CONVO__V1__CHAT_EVENT__INIT;
    ev.event_case = CONVO__V1__CHAT_EVENT__EVENT_TOOL_RESULT;
    ev.tool_result = &r;
    if (turn_live(&c->t) && !c->ended && emit(c, &ev) != 0)
        end_error(c, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_INTERNAL, 1,
                  "the caller stopped reading (held events over their cap)");
    tool_settled(c);
    pthread_mutex_unlock(&c->t.mu);
    turn_unref(&c->t);
}

/* Announces one call of the round and adds it to the assistant message's
 * tool_calls. Returns -1 when the turn ended. */
static int announce_call(chat *c, size_t i, json_object *tcs)
{
    toolcall *tc = (toolcall *)toolcall_set_get(c->calls, i);
    if (tc->id[0] == '\0') {
        /* A server that sent no id: make one, so results can refer to it. */
        mem_free(tc->id);
        tc->id = mem_asprintf("call_%d_%zu", c->round, i);
    }
    if (!rpc_utf8_valid(tc->args, tc->args_len) || !rpc_utf8_valid(tc->name, strlen(tc->name))) {
        end_error(c, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_BAD_UPSTREAM_DATA, 0,
                  "a tool call is not UTF-8");
        return -1;
    }
    Convo__V1__ToolCallEvent e = CONVO__V1__TOOL_CALL_EVENT__INIT;
    e.call_id = tc->id;
    e.name = tc->name;
    e.arguments_json = tc->args;
    e.round = (uint32_t)c->round;
    Convo__V1__ChatEvent ev = CONVO__V1__CHAT_EVENT__INIT;
    ev.event_case = CONVO__V1__CHAT_EVENT__EVENT_TOOL_CALL;
    ev.tool_call = &e;
    if (emit(c, &ev) != 0) {
        end_error(c, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_INTERNAL, 1,
                  "the caller stopped reading (held events over their cap)");
        return -1;
    }
    json_object *o = json_object_new_object(), *fn = json_object_new_object();
    json_object_object_add(o, "id", json_object_new_string(tc->id));
    json_object_object_add(o, "type", json_object_new_string("function"));
    json_object_object_add(fn, "name", json_object_new_string(tc->name));
    json_object_object_add(fn, "arguments", json_object_new_string(tc->args));
    json_object_object_add(o, "function", fn);
    json_object_array_add(tcs, o);
    return 0;
}

/* The round asked for tools: announces them, records the assistant
 * message and returns the jobs to start (NULL when the turn ended). */
static tool_job **prepare_tools(chat *c, size_t *count)
{
    size_t n = toolcall_set_count(c->calls);
    json_object *tcs = json_object_new_array();
    for (size_t i = 0; i < n; i++) {
        if (announce_call(c, i, tcs) != 0) {
            json_object_put(tcs);
            return NULL;
        }
    }
    if (c->round >= c->svc->o->max_rounds) {
        json_object_put(tcs);
        end_done(c, "max_rounds");
        return NULL;
    }
    json_object *m = json_object_new_object();
    json_object_object_add(m, "role", json_object_new_string("assistant"));
    json_object_object_add(m, "content", c->text.s ? json_object_new_string(c->text.s) : NULL);
    json_object_object_add(m, "tool_calls", tcs);
    json_object_array_add(c->t.messages, m);

    for (size_t i = 0; i < c->ntools; i++)
        mem_free(c->results[i]);
    c->results = mem_realloc(c->results, n * sizeof *c->results);
    memset(c->results, 0, n * sizeof *c->results);
    c->ntools = n;
    c->tools_left = n + 1; /* +1 while starting them: none can end the round early */
    tool_job **jobs = mem_alloc(n * sizeof *jobs);
    for (size_t i = 0; i < n; i++) {
        const toolcall *tc = toolcall_set_get(c->calls, i);
        jobs[i] = mem_calloc(1, sizeof **jobs);
        jobs[i]->c = c;
        jobs[i]->i = i;
        jobs[i]->name = mem_strdup(tc->name);
        jobs[i]->args = mem_strdup(tc->args);
        /* Named by the tool's series: a registered name or "unknown". */
        char name[160];
        snprintf(name, sizeof name, "execute_tool %s", tool_series_of(c->svc, tc->name)->name);
        trace_span_child(&jobs[i]->span, &c->round_span, name, TRACE_INTERNAL);
        if (trace_span_recording(&jobs[i]->span)) {
            trace_span_set_str(&jobs[i]->span, "gen_ai.tool.name", tc->name);
            trace_span_set_str(&jobs[i]->span, "gen_ai.tool.call.id", tc->id);
        }
        turn_ref(&c->t); /* the tool's */
    }
    *count = n;
    return jobs;
}

/* Runs a round's tools at once, without t->mu: a tool may answer on this
 * thread (the knowledge base) or later on another (the store's gRPC
 * client). */
static void run_tools(chat *c, tool_job **jobs, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        char *name = jobs[i]->name, *args = jobs[i]->args;
        jobs[i]->started_us = c->svc->mx.tool_seconds != NULL ? metrics_now_us() : 0;
        /* The tool may answer (and free its job) before tools_call returns:
         * its calls and log lines get a copy of the span's ids. */
        trace_span ids = {.ctx = jobs[i]->span.ctx};
        const trace_span *prev = trace_set_current(&ids);
        tool_ctx ctx = {c->t.session_id, c->user_id, c->t.request_id, &ids};
        tools_call(c->svc->tools, &ctx, name, args, on_tool_done, jobs[i]); /* frees jobs[i] */
        trace_set_current(prev);
        mem_free(name);
        mem_free(args);
    }
    mem_free(jobs);
    pthread_mutex_lock(&c->t.mu);
    tool_settled(c); /* the starter's +1 */
    pthread_mutex_unlock(&c->t.mu);
}

/* ---- the end of a round ------------------------------------------------ */

/* Decides what the round's end leads to (t->mu held): the turn's end, or
 * tools to run (returned, with their count). */
static tool_job **round_ended(chat *c, const upstream_done_info *info, size_t *ntools)
{
    if (info->result == UPSTREAM_CANCELLED || !turn_live(&c->t))
        return NULL;
    if (c->t.bad_msg != NULL) {
        end_error(c, c->t.bad_cat, 0, c->t.bad_msg);
        return NULL;
    }
    if (info->result != UPSTREAM_OK) {
        turn_failure f;
        turn_failure_of(info, &f);
        end_error(c, f.category, f.retryable, f.message);
        return NULL;
    }
    if (!c->saw_end || !sse_idle(c->sse)) {
        end_error(c, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_UPSTREAM_UNAVAILABLE, 1,
                  "the upstream stream ended before its end (no finish_reason or [DONE])");
        return NULL;
    }
    if (toolcall_set_count(c->calls) > 0)
        return prepare_tools(c, ntools);
    end_done(c, c->finish_reason ? c->finish_reason : "stop");
    return NULL;
}

static void chat_on_done(turn *t, const upstream_done_info *info)
{
    chat *c = chat_of(t);
    size_t n = 0;
    pthread_mutex_lock(&t->mu);
    c->paused = 0;
    tool_job **jobs = round_ended(c, info, &n);
    pthread_mutex_unlock(&t->mu);
    if (jobs != NULL)
        run_tools(c, jobs, n);
}

static const turn_method chat_method = {
    .name = "Chat",
    .stream = 1,
    .on_data = chat_on_data,
    .on_done = chat_on_done,
    .on_writable = chat_on_writable,
    .rewind = chat_rewind,
    .free = chat_free,
};

/* ---- the call ------------------------------------------------------------ */

static int check_request(const chat_svc *svc, const Convo__V1__ChatRequest *req, char *err,
                         size_t errsize)
{
    const char *m = req->message ? req->message : "";
    if (m[0] == '\0') {
        snprintf(err, errsize, "message is required");
        return -1;
    }
    if (strlen(m) > (size_t)svc->o->max_message_bytes) {
        snprintf(err, errsize, "message is over %lld bytes (--max-chat-message-bytes)",
                 svc->o->max_message_bytes);
        return -1;
    }
    if (turn_check_utf8(m, "message", err, errsize) != 0 ||
        turn_check_utf8(req->system_prompt, "system_prompt", err, errsize) != 0 ||
        turn_check_utf8(req->session_id, "session_id", err, errsize) != 0 ||
        turn_check_utf8(req->user_id, "user_id", err, errsize) != 0)
        return -1;
    return turn_check_bounds(&svc->env, req->system_prompt, req->history, req->n_history, "history",
                             req->params, err, errsize);
}

void chat_on_call(srv_call *call, const ProtobufCMessage *msg)
{
    chat_svc *svc = srv_call_method_data(call);
    const Convo__V1__ChatRequest *req = (const Convo__V1__ChatRequest *)msg;
    char err[256];
    if (check_request(svc, req, err, sizeof err) != 0) {
        srv_call_finish(call, RPC_INVALID_ARGUMENT, err, NULL);
        return;
    }
    chat *c = mem_calloc(1, sizeof *c);
    turn *t = &c->t;
    turn_init(t, &chat_method, &svc->env, call, req->session_id, req->params);
    c->svc = svc;
    c->user_id = mem_strdup(req->user_id ? req->user_id : "");
    c->calls =
        toolcall_set_create((size_t)svc->o->max_tool_calls, (size_t)svc->o->max_tool_args_bytes);
    if (req->system_prompt && req->system_prompt[0])
        turn_add_message(t, "system", req->system_prompt);
    if (turn_add_history(t, req->history, req->n_history, err, sizeof err) != 0) {
        turn_refuse(t, RPC_INVALID_ARGUMENT, err);
        return;
    }
    turn_add_message(t, "user", req->message);
    json_object_object_add(t->body, "stream", json_object_new_boolean(1));
    json_object *so = json_object_new_object();
    json_object_object_add(so, "include_usage", json_object_new_boolean(1));
    json_object_object_add(t->body, "stream_options", so);
    int tools_on = req->params ? req->params->tools_enabled : 0;
    if (tools_on && tools_count(svc->tools) > 0)
        json_object_object_add(t->body, "tools", tools_openai_json(svc->tools));
    log_fields(LOG_DEBUG, (const log_field[]){{"session_id", t->session_id}, {NULL, NULL}},
               "Chat: model %s, %zu history messages, tools %s", t->model, req->n_history,
               tools_on ? "on" : "off");
    turn_bind(t);
    pthread_mutex_lock(&t->mu);
    start_round(c);
    pthread_mutex_unlock(&t->mu);
    turn_unref(t); /* the starter's */
}

void chat_svc_init(chat_svc *svc, const turn_opts *to, const chat_opts *o, upstream *up,
                   endpoints *eps, const models *m, tools *t, metrics *mx)
{
    turn_env_init(&svc->env, "chat", to, up, eps, m, mx);
    svc->o = o;
    svc->tools = t;
    metrics_register(mx, METRICS_SECTION(chat_metrics, &svc->mx));
    svc->ntool_mx = tools_count(t) + 1;
    svc->tool_mx = mem_calloc(svc->ntool_mx, sizeof *svc->tool_mx);
    for (size_t i = 0; i < svc->ntool_mx; i++) {
        chat_tool_series *ts = &svc->tool_mx[i];
        ts->name = i + 1 < svc->ntool_mx ? tools_get(t, i)->name : "unknown";
        ts->ok = metrics_counter_of(svc->mx.tool_calls, (const char *[]){ts->name, "ok"});
        ts->error = metrics_counter_of(svc->mx.tool_calls, (const char *[]){ts->name, "error"});
        ts->seconds = metrics_histogram_of(svc->mx.tool_seconds, (const char *[]){ts->name});
    }
}

void chat_svc_destroy(chat_svc *svc)
{
    turn_env_destroy(&svc->env);
    mem_free(svc->tool_mx);
    svc->tool_mx = NULL;
}
