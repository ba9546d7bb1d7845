#include "turn.h"

#include "log.h"
#include "mem.h"
#include "names.h"

#include <stdio.h>
#include <string.h>

/* common.proto: GenerationParams.temperature is 0.0 to 2.0. */
#define MAX_TEMPERATURE 2.0

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

/* The series of the outcomes that happen, made at 0 now: a series born
 * with its first count would hide that count from rate() (and from the
 * alert on rate-limited failures). */
static void make_series(turn_env *e, const char *kind)
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
    static const char *const outcomes[TURN_OUTCOMES] = {
        [TURN_OUTCOME_DONE] = "done",
        [TURN_OUTCOME_ERROR] = "error",
        [TURN_OUTCOME_CANCELLED] = "cancelled",
    };
    for (size_t i = 0; i < sizeof requests / sizeof requests[0]; i++)
        metrics_counter_of(e->mx.requests, requests[i]);
    for (int o = TURN_OUTCOME_DONE; o < TURN_OUTCOMES; o++)
        e->turns[o] = metrics_counter_of(e->mx.turns, (const char *[]){kind, outcomes[o]});
    e->prompt_tokens = metrics_counter_of(e->mx.tokens, (const char *[]){"prompt"});
    e->completion_tokens = metrics_counter_of(e->mx.tokens, (const char *[]){"completion"});
}

void turn_env_init(turn_env *e, const char *kind, const turn_opts *o, upstream *up, endpoints *eps,
                   const models *m, metrics *mx)
{
    e->up = up;
    e->eps = eps;
    e->models = m;
    e->o = o;
    pthread_mutex_init(&e->calls_mu, NULL);
    metrics_register(mx, METRICS_SECTION(turn_metrics, &e->mx));
    make_series(e, kind);
}

void turn_env_destroy(turn_env *e)
{
    pthread_mutex_destroy(&e->calls_mu);
}

/* ---- life --------------------------------------------------------------- */

void turn_ref(turn *t)
{
    atomic_fetch_add(&t->refs, 1);
}

void turn_unref(turn *t)
{
    if (atomic_fetch_sub(&t->refs, 1) != 1)
        return;
    t->m->free(t);
    json_object_put(t->body);
    mem_free(t->bad_msg);
    mem_free(t->session_id);
    mem_free(t->request_id);
    mem_free(t->model);
    pthread_mutex_destroy(&t->mu);
    mem_free(t);
}

static const char *nz(const char *s)
{
    return s ? s : "";
}

void turn_init(turn *t, const turn_method *m, turn_env *env, srv_call *call, const char *session_id,
               const Convo__V1__GenerationParams *p)
{
    pthread_mutex_init(&t->mu, NULL);
    atomic_init(&t->refs, 2); /* the call's and the starter's */
    t->m = m;
    t->env = env;
    t->call = call;
    t->session_id = mem_strdup(nz(session_id));
    t->request_id = mem_strdup(srv_call_request_id(call));
    t->model =
        mem_strdup(p && p->model && p->model[0] ? p->model : endpoints_default_model(env->eps));
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
}

void turn_refuse(turn *t, rpc_code code, const char *msg)
{
    srv_call_finish(t->call, code, msg, NULL);
    t->call = NULL;
    atomic_fetch_sub(&t->refs, 1); /* the call's */
    turn_unref(t);                 /* the starter's: the last */
}

/* The turn of a call, with a reference, or NULL once finished. */
static turn *turn_of(srv_call *call)
{
    turn_env *env = srv_call_method_data(call);
    pthread_mutex_lock(&env->calls_mu);
    turn *t = srv_call_data(call);
    if (t != NULL)
        turn_ref(t);
    pthread_mutex_unlock(&env->calls_mu);
    return t;
}

void turn_finish(turn *t, rpc_code code, const char *msg, const ProtobufCMessage *resp)
{
    if (t->call == NULL)
        return;
    srv_call *call = t->call;
    t->call = NULL;
    turn_outcome o = t->outcome != TURN_OUTCOME_UNSET ? t->outcome
                     : code == RPC_OK                 ? TURN_OUTCOME_DONE
                     : code == RPC_CANCELLED          ? TURN_OUTCOME_CANCELLED
                                                      : TURN_OUTCOME_ERROR;
    metrics_counter_inc(t->env->turns[o]);
    pthread_mutex_lock(&t->env->calls_mu);
    srv_call_set_data(call, NULL);
    pthread_mutex_unlock(&t->env->calls_mu);
    srv_call_finish(call, code, msg, resp);
    atomic_fetch_sub(&t->refs, 1); /* never the last: the caller holds one */
}

int turn_live(const turn *t)
{
    return t->call != NULL && !t->cancelled;
}

void turn_set_bad(turn *t, Convo__V1__ErrorCategory cat, const char *msg)
{
    if (t->bad_msg == NULL) {
        t->bad_cat = cat;
        t->bad_msg = mem_strdup(msg);
    }
}

void turn_count_usage(const turn *t, uint32_t prompt, uint32_t completion)
{
    metrics_counter_add(t->env->prompt_tokens, prompt);
    metrics_counter_add(t->env->completion_tokens, completion);
}

/* ---- the call's callbacks --------------------------------------------------- */

static void on_cancel(srv_call *call)
{
    turn *t = turn_of(call);
    if (t == NULL)
        return;
    pthread_mutex_lock(&t->mu);
    t->cancelled = 1;
    t->outcome = TURN_OUTCOME_CANCELLED;
    if (t->req != NULL)
        upstream_cancel(t->req); /* the loop closes the connection at once */
    log_fields(LOG_INFO,
               (const log_field[]){
                   {"request_id", t->request_id}, {"session_id", t->session_id}, {NULL, NULL}},
               "%s cancelled by the caller", t->m->name);
    turn_finish(t, RPC_CANCELLED, "cancelled", NULL);
    pthread_mutex_unlock(&t->mu);
    turn_unref(t);
}

static void on_writable(srv_call *call)
{
    turn *t = turn_of(call);
    if (t == NULL)
        return;
    t->m->on_writable(t);
    turn_unref(t);
}

void turn_bind(turn *t)
{
    srv_call *call = t->call;
    pthread_mutex_lock(&t->env->calls_mu);
    srv_call_set_data(call, t);
    pthread_mutex_unlock(&t->env->calls_mu);
    srv_call_on_cancel(call, on_cancel);
    if (t->m->on_writable != NULL)
        srv_call_on_writable(call, on_writable);
}

/* ---- the upstream request ------------------------------------------------------ */

static int on_data(void *arg, const char *buf, size_t len)
{
    turn *t = arg;
    return t->m->on_data(t, buf, len);
}

static void on_done(void *arg, const upstream_done_info *info);

/* Sends the body to endpoint `i`, admitted with `tk` (t->mu held). Returns
 * 0 or an UPSTREAM_E* code (the ticket is then released). */
static int start_at(turn *t, size_t i, const breaker_ticket *tk)
{
    endpoints *eps = t->env->eps;
    const endpoint *ep = endpoints_get(eps, i);
    json_object_object_add(t->body, "model",
                           json_object_new_string(endpoints_model(eps, i, t->model)));
    upstream_spec spec = {
        .url = ep->url,
        .api_key = ep->api_key,
        .body = json_object_to_json_string_ext(t->body, JSON_C_TO_STRING_PLAIN),
        .request_id = t->request_id,
        .trace_parent = t->trace_parent != NULL ? t->trace_parent
                        : t->call != NULL       ? srv_call_span(t->call)
                                                : NULL,
        .name = ep->name,
        .model = endpoints_model(eps, i, t->model),
        .stream = t->m->stream,
        .deadline_ms = t->deadline_ms,
    };
    static const upstream_cbs cbs = {on_data, on_done};
    turn_ref(t); /* the request's */
    int rc = upstream_start(t->env->up, &spec, &cbs, t, &t->req);
    if (rc != 0) {
        atomic_fetch_sub(&t->refs, 1); /* never the last: the caller holds one */
        t->req = NULL;
        endpoints_release(eps, i, tk);
        return rc;
    }
    t->ep = i;
    t->ticket = *tk;
    t->shown = 0;
    mem_free(t->bad_msg);
    t->bad_msg = NULL;
    return 0;
}

/* After endpoint t->ep failed: the same request to the next endpoint that
 * admits it (t->mu held). Returns whether one took it. */
static int fall_back(turn *t, const upstream_done_info *info)
{
    endpoints *eps = t->env->eps;
    size_t failed = t->ep;
    for (size_t i = failed + 1; i < endpoints_count(eps); i++) {
        breaker_ticket tk;
        if (!endpoints_admit(eps, i, &tk))
            continue;
        t->m->rewind(t);
        if (start_at(t, i, &tk) != 0)
            return 0;
        turn_failure f;
        turn_failure_of(info, &f);
        log_fields(LOG_WARN,
                   (const log_field[]){{"request_id", t->request_id},
                                       {"session_id", t->session_id},
                                       {"upstream", endpoints_get(eps, i)->name},
                                       {NULL, NULL}},
                   "%s: upstream %s failed (%s); the request goes to %s", t->m->name,
                   endpoints_get(eps, failed)->name, f.message, endpoints_get(eps, i)->name);
        return 1;
    }
    return 0;
}

/* convo_llm_upstream_requests_total: the request's outcome and the
 * category of its failure (t->mu held). A request a fallback took over
 * counts too, with the category its failure would have told. */
static void count_request(const turn *t, const upstream_done_info *info)
{
    Convo__V1__ErrorCategory cat = CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_UNSPECIFIED;
    if (t->bad_msg != NULL) {
        cat = t->bad_cat;
    } else if (info->result != UPSTREAM_OK && info->result != UPSTREAM_CANCELLED) {
        turn_failure f;
        turn_failure_of(info, &f);
        cat = f.category;
    }
    const char *category = cat == CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_UNSPECIFIED
                               ? "none"
                               : names_error_category(cat);
    metrics_counter_inc(metrics_counter_of(t->env->mx.requests,
                                           (const char *[]){result_names[info->result], category}));
}

static void on_done(void *arg, const upstream_done_info *info)
{
    turn *t = arg;
    pthread_mutex_lock(&t->mu);
    t->req = NULL;
    count_request(t, info);
    int failed = endpoints_report(t->env->eps, t->ep, &t->ticket, info);
    int again = failed && !t->shown && turn_live(t) && fall_back(t, info);
    pthread_mutex_unlock(&t->mu);
    if (!again)
        t->m->on_done(t, info);
    turn_unref(t); /* the request's */
}

int turn_request(turn *t, turn_failure *f)
{
    endpoints *eps = t->env->eps;
    for (size_t i = 0; i < endpoints_count(eps); i++) {
        breaker_ticket tk;
        if (!endpoints_admit(eps, i, &tk))
            continue;
        int rc = start_at(t, i, &tk);
        if (rc == 0)
            return 0;
        f->category = CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_INTERNAL;
        f->retryable = 1;
        f->code = RPC_RESOURCE_EXHAUSTED;
        snprintf(f->message, sizeof f->message, "%s",
                 rc == UPSTREAM_EBUSY ? "too many upstream requests in flight"
                                      : "llm-svc is shutting down");
        return -1;
    }
    f->category = CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_UPSTREAM_UNAVAILABLE;
    f->retryable = 1;
    f->code = RPC_UNAVAILABLE;
    endpoints_refusal(eps, f->message, sizeof f->message);
    return -1;
}

const char *turn_upstream(const turn *t)
{
    return endpoints_get(t->env->eps, t->ep)->name;
}

const char *turn_model_asked(const turn *t)
{
    return endpoints_model(t->env->eps, t->ep, t->model);
}

/* ---- request building ---------------------------------------------------------- */

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

int turn_check_utf8(const char *s, const char *what, char *err, size_t errsize)
{
    if (s != NULL && !rpc_utf8_valid(s, strlen(s))) {
        snprintf(err, errsize, "%s is not valid UTF-8", what);
        return -1;
    }
    return 0;
}

/* The bytes of history a request hands over: what the model is sent. */
static size_t history_bytes(Convo__V1__Message **hist, size_t n)
{
    size_t bytes = 0;
    for (size_t i = 0; i < n; i++) {
        const Convo__V1__Message *h = hist[i];
        bytes += strlen(nz(h->content)) + strlen(nz(h->tool_call_id)) + strlen(nz(h->name));
        for (size_t k = 0; k < h->n_tool_calls; k++)
            bytes += strlen(nz(h->tool_calls[k]->id)) + strlen(nz(h->tool_calls[k]->name)) +
                     strlen(nz(h->tool_calls[k]->arguments_json));
    }
    return bytes;
}

static int check_params(const turn_env *env, const Convo__V1__GenerationParams *p, char *err,
                        size_t errsize)
{
    const turn_opts *o = env->o;
    if (p->model != NULL && p->model[0] != '\0' && !models_allowed(env->models, p->model)) {
        snprintf(err, errsize, "params.model '%.128s' is not allowed; allowed: %s", p->model,
                 models_list(env->models));
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

int turn_check_bounds(const turn_env *env, const char *system_prompt, Convo__V1__Message **hist,
                      size_t n, const char *what, const Convo__V1__GenerationParams *p, char *err,
                      size_t errsize)
{
    const turn_opts *o = env->o;
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
    size_t bytes = history_bytes(hist, n);
    if (bytes > (size_t)o->max_history_bytes) {
        snprintf(err, errsize, "%s holds %zu bytes, over the limit of %lld (--max-history-bytes)",
                 what, bytes, o->max_history_bytes);
        return -1;
    }
    return p != NULL ? check_params(env, p, err, errsize) : 0;
}

void turn_add_message(turn *t, const char *role, const char *content)
{
    json_object *m = json_object_new_object();
    json_object_object_add(m, "role", json_object_new_string(role));
    json_object_object_add(m, "content", json_object_new_string(content));
    json_object_array_add(t->messages, m);
}

static json_object *tool_calls_json(Convo__V1__ToolCall **calls, size_t n)
{
    json_object *tcs = json_object_new_array();
    for (size_t k = 0; k < n; k++) {
        json_object *tc = json_object_new_object(), *fn = json_object_new_object();
        json_object_object_add(tc, "id", json_object_new_string(nz(calls[k]->id)));
        json_object_object_add(tc, "type", json_object_new_string("function"));
        json_object_object_add(fn, "name", json_object_new_string(nz(calls[k]->name)));
        json_object_object_add(fn, "arguments",
                               json_object_new_string(nz(calls[k]->arguments_json)));
        json_object_object_add(tc, "function", fn);
        json_object_array_add(tcs, tc);
    }
    return tcs;
}

int turn_add_history(turn *t, Convo__V1__Message **hist, size_t n, char *err, size_t errsize)
{
    for (size_t i = 0; i < n; i++) {
        const Convo__V1__Message *h = hist[i];
        if (turn_check_utf8(h->content, "a history message", err, errsize) != 0)
            return -1;
        json_object *m = json_object_new_object();
        json_object_object_add(m, "role", json_object_new_string(role_name(h->role)));
        json_object_object_add(m, "content", json_object_new_string(nz(h->content)));
        if (h->role == CONVO__V1__ROLE__ROLE_TOOL) {
            json_object_object_add(m, "tool_call_id", json_object_new_string(nz(h->tool_call_id)));
            if (h->name && h->name[0])
                json_object_object_add(m, "name", json_object_new_string(h->name));
        }
        if (h->n_tool_calls > 0)
            json_object_object_add(m, "tool_calls",
                                   tool_calls_json(h->tool_calls, h->n_tool_calls));
        json_object_array_add(t->messages, m);
    }
    return 0;
}

/* ---- failures ----------------------------------------------------------------- */

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

static void http_failure(const upstream_done_info *in, turn_failure *f)
{
    char detail[320];
    error_message(in->message, detail, sizeof detail);
    snprintf(f->message, sizeof f->message, "upstream HTTP %ld after %d attempt%s: %s", in->status,
             in->attempts, in->attempts == 1 ? "" : "s", detail);
    if (in->status == 429) {
        f->category = CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_RATE_LIMITED;
        f->code = RPC_RESOURCE_EXHAUSTED;
    } else if (in->status == 401 || in->status == 403) {
        f->category = CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_AUTH_FAILED;
        f->code = RPC_UNAUTHENTICATED;
        f->retryable = 0;
    } else if (in->status == 404) {
        f->category = CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_MODEL_NOT_FOUND;
        f->code = RPC_NOT_FOUND;
        f->retryable = 0;
    } else if (in->status >= 400 && in->status < 500 && in->status != 408) {
        f->category = CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_INVALID_REQUEST;
        f->code = RPC_INVALID_ARGUMENT;
        f->retryable = 0;
    } else {
        f->category = CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_UPSTREAM_UNAVAILABLE;
        f->code = RPC_UNAVAILABLE;
    }
}

void turn_failure_of(const upstream_done_info *in, turn_failure *f)
{
    f->retryable = 1;
    switch (in->result) {
    case UPSTREAM_HTTP:
        http_failure(in, f);
        return;
    case UPSTREAM_TIMEOUT:
        f->category = CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_TIMEOUT;
        f->code = RPC_DEADLINE_EXCEEDED;
        snprintf(f->message, sizeof f->message, "upstream timeout: %s", in->message);
        return;
    case UPSTREAM_CONNECT:
        f->category = CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_UPSTREAM_UNAVAILABLE;
        f->code = RPC_UNAVAILABLE;
        snprintf(f->message, sizeof f->message, "cannot reach the upstream after %d attempt%s: %s",
                 in->attempts, in->attempts == 1 ? "" : "s", in->message);
        return;
    default:
        f->category = CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_UPSTREAM_UNAVAILABLE;
        f->code = RPC_UNAVAILABLE;
        snprintf(f->message, sizeof f->message, "the upstream dropped the %s: %s",
                 in->delivered ? "stream mid-answer" : "connection", in->message);
    }
}

/* ---- text ----------------------------------------------------------------------- */

int turn_text_append(turn_text *b, const char *s, size_t n, size_t max)
{
    if (b->len + n > max)
        return -1;
    if (b->len + n + 1 > b->cap) {
        /* Doubling: a long answer arrives a token at a time. */
        b->cap = b->cap ? b->cap : 256;
        while (b->len + n + 1 > b->cap)
            b->cap *= 2;
        b->s = mem_realloc(b->s, b->cap);
    }
    memcpy(b->s + b->len, s, n);
    b->len += n;
    b->s[b->len] = '\0';
    return 0;
}

void turn_text_clear(turn_text *b)
{
    mem_free(b->s);
    b->s = NULL;
    b->len = 0;
    b->cap = 0;
}
