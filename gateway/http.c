#include "http.h"

#include "caller.h"
#include "check.h"
#include "convo_methods.h"
#include "lim.h"
#include "log.h"
#include "mem.h"
#include "names.h"
#include "session.h"
#include "trace.h"

#include <json-c/json.h>
#include <libwebsockets.h>
#include <stdlib.h>
#include <string.h>

/* The services /api/health checks, in the order of start_health's table. */
enum { SERVICE_ROUTER, SERVICE_LLM, SERVICE_STORE, SERVICE_SUMMARY, SERVICES };

/* Deadline of each service's health check for /api/health and /readyz. */
#define HEALTH_TIMEOUT_MS 2000

/* GET /api/sessions: sessions per page. */
#define LIST_DEFAULT 20
#define LIST_MAX     100

/* GET /api/sessions/{id}/events: events per page, and the content bytes
 * one page carries at most (a page stops early, and says where to go on). */
#define EVENTS_DEFAULT   100
#define EVENTS_MAX       1000
#define EVENTS_BODY_MAX  (1 << 20)
#define EVENTS_TIMEOUT_X 6 /* a stream gets this many --store-timeout-ms */

/* The largest request body taken (POST /api/dev/token). */
#define BODY_MAX 4096

/* How long a browser may keep a CORS preflight's answer. */
#define CORS_MAX_AGE "600"

#define PREFIX_API      "/api/"
#define PREFIX_SESSIONS "/api/sessions"

typedef enum route {
    ROUTE_INFO,
    ROUTE_HEALTH,
    ROUTE_READY,
    ROUTE_DEV_TOKEN,
    ROUTE_LIST,
    ROUTE_SESSION,
    ROUTE_SUMMARY,
    ROUTE_EVENTS,
} route;

typedef struct http_req {
    gw *g;
    struct lws *wsi; /* NULL once the client is gone */
    caller who;
    route route;
    int pending; /* gRPC calls not yet answered */
    int status;
    char *body; /* LWS_PRE bytes of room, then the JSON */
    size_t body_len;
    int post;
    int body_done; /* a POST's body is all in (the connection may carry more) */
    char *in;      /* the POST body */
    size_t in_len;
    int in_too_big;
    char *session_id;
    /* the session as the store has it, once the owner is checked */
    Convo__V1__GetSessionResponse *owned;
    /* paging */
    int64_t limit;
    int64_t after_seq;
    int64_t before_us;
    char before_id[CHECK_ID_MAX + 1];
    /* /api/health, /readyz */
    const char *service_names[SERVICES];
    const char *service_addrs[SERVICES];
    int service_status[SERVICES]; /* health status, or -1 unreachable */
    char service_error[SERVICES][96];
    /* The request's span (a child of its traceparent), ended when the
     * request is freed; its service calls are children. Zeroed when the
     * request is not traced (a probe without a traceparent). */
    trace_span span;
} http_req;

static const char *const health_names[] = {"UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"};

/* ---- answers ---------------------------------------------------------- */

static void respond_text(http_req *req, int status, const char *text, size_t len)
{
    req->status = status;
    req->body = mem_alloc(LWS_PRE + len);
    memcpy(req->body + LWS_PRE, text, len);
    req->body_len = len;
    if (req->wsi != NULL)
        lws_callback_on_writable(req->wsi);
}

static void respond(http_req *req, int status, json_object *body)
{
    size_t len;
    const char *text = json_object_to_json_string_length(
        body, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE, &len);
    respond_text(req, status, text, len);
    json_object_put(body);
}

static void respond_error(http_req *req, int status, const char *code, const char *message)
{
    size_t len;
    char *text = caller_error_json(code, message, req->who.request_id, &len);
    respond_text(req, status, text, len);
    mem_free(text);
}

static void not_found(http_req *req)
{
    respond_error(req, 404, "not_found", "no such session");
}

/* A gRPC failure as the client sees it: a code and a short text; what the
 * service said is logged under the request id. */
static void respond_rpc_error(http_req *req, const char *service, rpc_code code,
                              const char *message)
{
    const log_field f[] = {{"request_id", req->who.request_id}, {NULL, NULL}};
    log_fields(LOG_WARN, f, "%s answered %s: %s", service, rpc_code_name(code), message);
    if (code == RPC_NOT_FOUND)
        not_found(req);
    else if (code == RPC_UNAVAILABLE || code == RPC_DEADLINE_EXCEEDED)
        respond_error(req, 503, "service_unavailable",
                      "a service the answer needs is unavailable; try again shortly");
    else if (code == RPC_INVALID_ARGUMENT)
        respond_error(req, 400, "invalid_request", "the request was not accepted");
    else
        respond_error(req, 500, "internal", "the answer failed on the server's side");
}

static void req_free(http_req *req)
{
    if (req->status != 0)
        trace_span_set_int(&req->span, "http.response.status_code", req->status);
    if (req->status >= 500)
        trace_span_error(&req->span, "answered %d", req->status);
    trace_span_end(&req->span);
    if (trace_current() == &req->span)
        trace_set_current(NULL); /* req is freed here */
    mem_free(req->body);
    mem_free(req->in);
    mem_free(req->session_id);
    if (req->owned != NULL)
        protobuf_c_message_free_unpacked(&req->owned->base, NULL);
    mem_free(req);
}

/* A gRPC answer came back: the request may be gone. */
static int req_alive(http_req *req)
{
    if (--req->pending > 0 || req->wsi != NULL)
        return 1;
    req_free(req);
    return 0;
}

int http_on_writeable(struct lws *wsi)
{
    http_req *req = lws_get_opaque_user_data(wsi);
    if (req == NULL || req->body == NULL)
        return 0;
    unsigned char hdr[LWS_PRE + 1024];
    unsigned char *start = hdr + LWS_PRE, *p = start, *end = hdr + sizeof hdr - 1;
    if (lws_add_http_common_headers(wsi, (unsigned)req->status, "application/json",
                                    (lws_filepos_t)req->body_len, &p, end) ||
        caller_add_headers(wsi, &req->who, &p, end) != 0 ||
        (req->status == 401 &&
         lws_add_http_header_by_name(wsi, (const unsigned char *)"www-authenticate:",
                                     (const unsigned char *)"Bearer", 6, &p, end)) ||
        lws_finalize_write_http_header(wsi, start, &p, end))
        return -1;
    if (lws_write(wsi, (unsigned char *)req->body + LWS_PRE, req->body_len, LWS_WRITE_HTTP_FINAL) <
        0)
        return -1;
    /* The connection may carry another request (keep-alive): this one is
     * done, unless its body was not all read (answered early), which would
     * be read as the next request: then it closes. */
    int unread = req->post && !req->body_done;
    lws_set_opaque_user_data(wsi, NULL);
    req_free(req);
    return unread || lws_http_transaction_completed(wsi) ? -1 : 0;
}

/* ---- gRPC answers back on the loop ------------------------------------- */

typedef struct rest_job {
    http_req *req;
    rpc_code code;
    char *message;
    ProtobufCMessage *resp;
    json_object *events; /* ListEvents: what was collected */
    size_t event_bytes;
    int64_t next_after_seq; /* 0: the page holds the end */
    long n_events;
} rest_job;

typedef void (*rest_fn)(http_req *req, rest_job *j);

typedef struct rest_call {
    rest_job job;
    rest_fn fn;
} rest_call;

static void on_rest_job(void *arg)
{
    rest_call *c = arg;
    http_req *req = c->job.req;
    if (req_alive(req)) {
        const trace_span *prev = trace_set_current(&req->span);
        c->fn(req, &c->job);
        trace_set_current(prev);
    }
    if (c->job.resp != NULL)
        protobuf_c_message_free_unpacked(c->job.resp, NULL);
    if (c->job.events != NULL)
        json_object_put(c->job.events);
    mem_free(c->job.message);
    mem_free(c);
}

/* gRPC thread. */
static void on_rest_done(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp)
{
    rest_call *c = arg;
    c->job.code = code;
    c->job.message = mem_strdup(message != NULL ? message : "");
    c->job.resp = resp;
    bridge_post(c->job.req->g->bridge, on_rest_job, c);
}

/* Starts a unary call whose answer goes to fn on the loop. Returns 0, or
 * -1 after answering 500 (the call could not start). */
static int rest_unary(http_req *req, cli_channel *ch, const rpc_method *method,
                      const ProtobufCMessage *msg, rest_fn fn)
{
    rest_call *c = mem_calloc(1, sizeof *c);
    c->job.req = req;
    c->fn = fn;
    cli_opts o = {.timeout_ms = req->g->opts.store_timeout_ms,
                  .request_id = req->who.request_id,
                  .trace_parent = &req->span};
    req->pending++;
    if (cli_unary(ch, method, msg, &o, on_rest_done, c, NULL) != 0) {
        req->pending--;
        mem_free(c);
        respond_error(req, 500, "internal", "the answer could not be started");
        return -1;
    }
    return 0;
}

/* ---- /api/health, /readyz ----------------------------------------------- */

typedef struct health_job {
    http_req *req;
    int index;
    rpc_code code;
    char *message;
    int status;
} health_job;

/* The services /readyz needs (llm-svc and store-svc): without router-svc
 * turns take the default route (defroute.h), without summary-svc
 * conversations go on (its sweep summarizes later). A router-svc outage
 * must not take every gateway out of its load balancer. */
static int needed_for_ready(int i)
{
    return i == SERVICE_LLM || i == SERVICE_STORE;
}

static json_object *services_json(http_req *req, int *all, int *ready)
{
    json_object *services = json_object_new_object();
    *all = *ready = 1;
    for (int i = 0; i < SERVICES; i++) {
        json_object *svc = json_object_new_object();
        int st = req->service_status[i];
        json_object_object_add(
            svc, "status", json_object_new_string(st < 0 ? "UNREACHABLE" : health_names[st & 3]));
        /* Addresses and errors tell an attacker the layout inside: only
         * for callers with a valid token. */
        if (req->who.verified) {
            json_object_object_add(svc, "address", json_object_new_string(req->service_addrs[i]));
            if (st < 0)
                json_object_object_add(svc, "error", json_object_new_string(req->service_error[i]));
        }
        json_object_object_add(services, req->service_names[i], svc);
        *all = *all && st == 1;
        if (needed_for_ready(i))
            *ready = *ready && st == 1;
    }
    return services;
}

static json_object *counters_json(gw *g)
{
    gw_counters *k = &g->counters;
    json_object *o = json_object_new_object();
    json_object_object_add(o, "status", json_object_new_string("SERVING"));
    json_object_object_add(o, "connections", json_object_new_int64(atomic_load(&k->connections)));
    json_object_object_add(o, "sessions", json_object_new_int64((int64_t)sess_count(g->sessions)));
    json_object_object_add(o, "turns", json_object_new_int64(atomic_load(&k->turns)));
    json_object_object_add(o, "turn_errors", json_object_new_int64(atomic_load(&k->turn_errors)));
    json_object_object_add(o, "turns_degraded",
                           json_object_new_int64(defroute_degraded(g->defroute)));
    json_object_object_add(
        o, "routing",
        json_object_new_string(defroute_down(g->defroute) ? "default_route" : "router"));
    json_object_object_add(o, "events_logged",
                           json_object_new_int64(atomic_load(&k->events_logged)));
    json_object_object_add(o, "events_buffered",
                           json_object_new_int64(atomic_load(&k->events_buffered)));
    json_object_object_add(o, "events_dropped",
                           json_object_new_int64(atomic_load(&k->events_dropped)));
    json_object_object_add(o, "connections_refused",
                           json_object_new_int64(atomic_load(&k->refused)));
    json_object_object_add(o, "unauthorized", json_object_new_int64(atomic_load(&k->unauthorized)));
    json_object *limited = json_object_new_object();
    for (int i = 0; i < LIM_KINDS; i++)
        json_object_object_add(limited, lim_name((lim_kind)i),
                               json_object_new_int64(lim_refused(g->limits, (lim_kind)i)));
    json_object_object_add(o, "limits_refused", limited);
    json_object_object_add(o, "memory_bytes", json_object_new_int64((int64_t)mem_used()));
    return o;
}

static void finish_health(http_req *req)
{
    int all, ready;
    json_object *services = services_json(req, &all, &ready);
    json_object *o = json_object_new_object();
    if (req->route == ROUTE_READY) {
        ready = ready && !req->g->stopping;
        json_object_object_add(o, "status", json_object_new_string(ready ? "ready" : "not_ready"));
        json_object_object_add(o, "services", services);
        respond(req, ready ? 200 : 503, o);
        return;
    }
    json_object_object_add(o, "status", json_object_new_string(all ? "ok" : "degraded"));
    json_object_object_add(o, "gateway", counters_json(req->g));
    json_object_object_add(o, "services", services);
    /* 200 either way: the gateway itself is up; "status" tells the rest. */
    respond(req, 200, o);
}

static void on_health_job(void *arg)
{
    health_job *j = arg;
    http_req *req = j->req;
    req->service_status[j->index] = j->code == RPC_OK ? j->status : -1;
    if (j->code != RPC_OK)
        snprintf(req->service_error[j->index], sizeof req->service_error[0], "%s: %s",
                 rpc_code_name(j->code), j->message);
    int last = req->pending == 1;
    if (req_alive(req) && last) {
        const trace_span *prev = trace_set_current(&req->span);
        finish_health(req);
        trace_set_current(prev);
    }
    mem_free(j->message);
    mem_free(j);
}

static void on_health_done(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp)
{
    health_job *j = arg;
    j->code = code;
    j->message = mem_strdup(message != NULL ? message : "");
    if (resp != NULL) {
        j->status = (int)((Grpc__Health__V1__HealthCheckResponse *)resp)->status;
        protobuf_c_message_free_unpacked(resp, NULL);
    }
    bridge_post(j->req->g->bridge, on_health_job, j);
}

static void start_health(http_req *req)
{
    gw *g = req->g;
    cli_channel *chans[SERVICES] = {g->router, g->llm, g->store, g->summary};
    const char *names[SERVICES] = {"router-svc", "llm-svc", "store-svc", "summary-svc"};
    req->pending = SERVICES;
    for (int i = 0; i < SERVICES; i++) {
        req->service_names[i] = names[i];
        req->service_addrs[i] = cli_channel_target(chans[i]);
        health_job *j = mem_calloc(1, sizeof *j);
        j->req = req;
        j->index = i;
        Grpc__Health__V1__HealthCheckRequest hreq = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
        hreq.service = "";
        /* Traced only under a traced request (a probe without a
         * traceparent is not). */
        cli_opts o = {.timeout_ms = HEALTH_TIMEOUT_MS, .trace_parent = &req->span};
        if (cli_unary(chans[i], &grpc__health__v1__health__check__method, &hreq.base, &o,
                      on_health_done, j, NULL) != 0) {
            j->code = RPC_INTERNAL;
            j->message = mem_strdup("could not start the call");
            bridge_post(g->bridge, on_health_job, j);
        }
    }
}

/* ---- sessions ------------------------------------------------------------ */

static json_object *time_or_null(int64_t us)
{
    if (us == 0)
        return NULL;
    time_t secs = (time_t)(us / 1000000);
    struct tm tm;
    gmtime_r(&secs, &tm);
    char buf[40];
    size_t n = strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(buf + n, sizeof buf - n, ".%06lldZ", (long long)(us % 1000000));
    return json_object_new_string(buf);
}

static json_object *session_json(const Convo__V1__Session *s)
{
    json_object *o = json_object_new_object();
    json_object_object_add(o, "session_id", json_object_new_string(s->session_id));
    json_object_object_add(o, "user_id", json_object_new_string(s->user_id));
    json_object_object_add(o, "start_time", time_or_null(s->start_time_us));
    json_object_object_add(o, "end_time", time_or_null(s->end_time_us));
    json_object_object_add(o, "duration_seconds",
                           s->end_time_us ? json_object_new_int(s->duration_seconds) : NULL);
    json_object_object_add(o, "event_count", json_object_new_int64(s->event_count));
    json_object_object_add(o, "user_message_count", json_object_new_int64(s->user_message_count));
    json_object_object_add(o, "tool_call_count", json_object_new_int64(s->tool_call_count));
    json_object_object_add(o, "summary_status",
                           json_object_new_string(names_summary_status(s->summary_status)));
    json_object_object_add(o, "final_summary",
                           s->final_summary[0] ? json_object_new_string(s->final_summary) : NULL);
    return o;
}

static void answer_summary(http_req *req, const char *status, const char *summary,
                           const char *error, int attempts)
{
    json_object *o = json_object_new_object();
    json_object_object_add(o, "session_id", json_object_new_string(req->session_id));
    json_object_object_add(o, "status", json_object_new_string(status));
    json_object_object_add(o, "summary",
                           summary && summary[0] ? json_object_new_string(summary) : NULL);
    if (error != NULL && error[0])
        json_object_object_add(o, "error", json_object_new_string(error));
    if (attempts >= 0)
        json_object_object_add(o, "attempts", json_object_new_int(attempts));
    respond(req, 200, o);
}

static void answer_stored_summary(http_req *req)
{
    const Convo__V1__Session *s = req->owned->session;
    answer_summary(req, names_summary_status(s->summary_status), s->final_summary, s->summary_error,
                   s->summary_attempts);
}

static void on_summary(http_req *req, rest_job *j)
{
    if (j->code == RPC_OK) {
        const Convo__V1__GetSummaryResponse *r = (const Convo__V1__GetSummaryResponse *)j->resp;
        answer_summary(req, names_summary_status(r->status), r->summary, r->error, r->attempts);
        return;
    }
    /* summary-svc is down or does not know it: the store has the status. */
    const log_field f[] = {{"request_id", req->who.request_id}, {NULL, NULL}};
    log_fields(LOG_INFO, f, "summary-svc answered %s (%s); answering from store-svc",
               rpc_code_name(j->code), j->message);
    answer_stored_summary(req);
}

/* A page of events: collected on the gRPC thread (one call's messages
 * arrive on one thread, in order), handed to the loop whole. */
static int on_event_msg(void *arg, const ProtobufCMessage *msg)
{
    rest_call *c = arg;
    rest_job *j = &c->job;
    const Convo__V1__Event *ev = (const Convo__V1__Event *)msg;
    if (j->next_after_seq != 0)
        return 0; /* the page is full: the rest is the next page's */
    size_t n = strlen(ev->content);
    if (j->n_events == j->req->limit || (j->n_events > 0 && j->event_bytes + n > EVENTS_BODY_MAX)) {
        j->next_after_seq = json_object_get_int64(json_object_object_get(
            json_object_array_get_idx(j->events, (size_t)j->n_events - 1), "seq"));
        return 0;
    }
    json_object *o = json_object_new_object();
    json_object_object_add(o, "seq", json_object_new_int64(ev->seq));
    json_object_object_add(o, "type", json_object_new_string(names_event_type(ev->type)));
    json_object_object_add(o, "content", json_object_new_string_len(ev->content, (int)n));
    json_object_object_add(o, "timestamp", time_or_null(ev->timestamp_us));
    json_object_array_add(j->events, o);
    j->event_bytes += n;
    j->n_events++;
    return 0;
}

static void on_events(http_req *req, rest_job *j)
{
    if (j->code != RPC_OK) {
        respond_rpc_error(req, "store-svc", j->code, j->message);
        return;
    }
    json_object *o = json_object_new_object();
    json_object_object_add(o, "session_id", json_object_new_string(req->session_id));
    json_object_object_add(o, "events", json_object_get(j->events));
    json_object_object_add(o, "next_after_seq",
                           j->next_after_seq ? json_object_new_int64(j->next_after_seq) : NULL);
    respond(req, 200, o);
}

static void start_events(http_req *req)
{
    Convo__V1__ListEventsRequest lreq = CONVO__V1__LIST_EVENTS_REQUEST__INIT;
    lreq.session_id = req->session_id;
    lreq.after_seq = req->after_seq;
    lreq.limit = req->limit + 1; /* one more says whether a next page exists */
    rest_call *c = mem_calloc(1, sizeof *c);
    c->job.req = req;
    c->job.events = json_object_new_array();
    c->fn = on_events;
    cli_opts o = {.timeout_ms = req->g->opts.store_timeout_ms * EVENTS_TIMEOUT_X,
                  .request_id = req->who.request_id,
                  .trace_parent = &req->span};
    req->pending++;
    if (cli_stream(req->g->store, &convo__v1__store__list_events__method, &lreq.base, &o,
                   on_event_msg, on_rest_done, c, NULL) != 0) {
        req->pending--;
        json_object_put(c->job.events);
        mem_free(c);
        respond_error(req, 500, "internal", "the answer could not be started");
    }
}

/* The session is the caller's (checked by on_owner): go on with the
 * route. */
static void owned(http_req *req)
{
    const Convo__V1__Session *s = req->owned->session;
    if (req->route == ROUTE_SESSION) {
        respond(req, 200, session_json(s));
    } else if (req->route == ROUTE_SUMMARY) {
        Convo__V1__GetSummaryRequest sreq = CONVO__V1__GET_SUMMARY_REQUEST__INIT;
        sreq.session_id = req->session_id;
        rest_unary(req, req->g->summary, &convo__v1__summary__get_summary__method, &sreq.base,
                   on_summary);
    } else {
        start_events(req);
    }
}

static void on_owner(http_req *req, rest_job *j)
{
    if (j->code != RPC_OK) {
        respond_rpc_error(req, "store-svc", j->code, j->message);
        return;
    }
    Convo__V1__GetSessionResponse *r = (Convo__V1__GetSessionResponse *)j->resp;
    /* Another user's session is answered exactly as a missing one. */
    if (r->session == NULL ||
        (req->who.user[0] != '\0' && strcmp(r->session->user_id, req->who.user) != 0)) {
        not_found(req);
        return;
    }
    req->owned = r;
    j->resp = NULL;
    owned(req);
}

static void start_owned(http_req *req)
{
    Convo__V1__GetSessionRequest greq = CONVO__V1__GET_SESSION_REQUEST__INIT;
    greq.session_id = req->session_id;
    rest_unary(req, req->g->store, &convo__v1__store__get_session__method, &greq.base, on_owner);
}

static void on_list(http_req *req, rest_job *j)
{
    if (j->code != RPC_OK) {
        respond_rpc_error(req, "store-svc", j->code, j->message);
        return;
    }
    const Convo__V1__ListUserSessionsResponse *r =
        (const Convo__V1__ListUserSessionsResponse *)j->resp;
    size_t n = r->n_sessions < (size_t)req->limit ? r->n_sessions : (size_t)req->limit;
    json_object *o = json_object_new_object();
    json_object *list = json_object_new_array();
    for (size_t i = 0; i < n; i++)
        json_object_array_add(list, session_json(r->sessions[i]));
    json_object_object_add(o, "sessions", list);
    json_object *next = NULL;
    if (r->n_sessions > n && n > 0) {
        /* The cursor: the last session's start time and id. */
        char cursor[32 + CHECK_ID_MAX];
        snprintf(cursor, sizeof cursor, "%lld.%s", (long long)r->sessions[n - 1]->start_time_us,
                 r->sessions[n - 1]->session_id);
        next = json_object_new_string(cursor);
    }
    json_object_object_add(o, "next_before", next);
    respond(req, 200, o);
}

static void start_list(http_req *req)
{
    Convo__V1__ListUserSessionsRequest lreq = CONVO__V1__LIST_USER_SESSIONS_REQUEST__INIT;
    lreq.user_id = req->who.user;
    lreq.limit = (uint32_t)req->limit + 1;
    lreq.before_start_time_us = req->before_us;
    lreq.before_session_id = req->before_id;
    rest_unary(req, req->g->store, &convo__v1__store__list_user_sessions__method, &lreq.base,
               on_list);
}

/* ---- POST /api/dev/token ------------------------------------------------- */

static void dev_token(http_req *req)
{
    if (req->in_too_big) {
        respond_error(req, 413, "body_too_large", "the request body is over 4096 bytes");
        return;
    }
    json_object *body = req->in != NULL ? json_tokener_parse(req->in) : NULL;
    json_object *user = NULL;
    char err[160];
    if (body == NULL || !json_object_object_get_ex(body, "user_id", &user) ||
        !json_object_is_type(user, json_type_string) ||
        check_id("user_id", json_object_get_string(user), err, sizeof err) != 0) {
        json_object_put(body);
        respond_error(req, 400, "invalid_user_id", "send {\"user_id\": \"...\"}: " CHECK_ID_RULE);
        return;
    }
    char *token = NULL;
    int rc = auth_dev_sign(req->g->auth, json_object_get_string(user), &token);
    if (rc != 0) {
        json_object_put(body);
        respond_error(req, 400, auth_strerror(rc), "no token could be made for this user");
        return;
    }
    json_object *o = json_object_new_object();
    json_object_object_add(o, "access_token", json_object_new_string(token));
    json_object_object_add(o, "token_type", json_object_new_string("Bearer"));
    json_object_object_add(o, "user_id", json_object_new_string(json_object_get_string(user)));
    json_object_object_add(o, "expires_in",
                           json_object_new_int64(req->g->auth_opts.dev_token_ttl_secs));
    mem_free(token);
    json_object_put(body);
    respond(req, 200, o);
}

int http_on_body(struct lws *wsi, const void *in, size_t len)
{
    http_req *req = lws_get_opaque_user_data(wsi);
    if (req == NULL)
        return 0;
    if (req->in_too_big || req->in_len + len > BODY_MAX) {
        req->in_too_big = 1;
        return 0;
    }
    req->in = mem_realloc(req->in, req->in_len + len + 1);
    memcpy(req->in + req->in_len, in, len);
    req->in_len += len;
    req->in[req->in_len] = '\0';
    return 0;
}

int http_on_body_done(struct lws *wsi)
{
    http_req *req = lws_get_opaque_user_data(wsi);
    if (req == NULL)
        return 0;
    req->body_done = 1;
    if (req->route == ROUTE_DEV_TOKEN && req->body == NULL)
        dev_token(req);
    else if (req->body != NULL)
        lws_callback_on_writable(wsi); /* answered early: now it can go */
    return 0;
}

/* ---- dispatch ------------------------------------------------------------- */

static void api_info(http_req *req)
{
    static const char *const modes[] = {
        [AUTH_MODE_JWT] = "jwt", [AUTH_MODE_DEV] = "dev", [AUTH_MODE_NONE] = "none"};
    json_object *o = json_object_new_object();
    json_object_object_add(o, "name", json_object_new_string("convo gateway"));
    json_object_object_add(o, "version", json_object_new_string(conf_version()));
    json_object_object_add(o, "auth", json_object_new_string(modes[auth_get_mode(req->g->auth)]));
    json_object_object_add(o, "websocket", json_object_new_string("/ws/session/{session_id}"));
    json_object_object_add(o, "web_page", json_object_new_string("/app/"));
    json_object *ep = json_object_new_array();
    const char *const endpoints[] = {"GET /",
                                     "GET /healthz",
                                     "GET /readyz",
                                     "GET /api/health",
                                     "POST /api/dev/token",
                                     "GET /api/sessions",
                                     "GET /api/sessions/{id}",
                                     "GET /api/sessions/{id}/summary",
                                     "GET /api/sessions/{id}/events",
                                     "GET /app/"};
    for (size_t i = 0; i < sizeof endpoints / sizeof endpoints[0]; i++)
        json_object_array_add(ep, json_object_new_string(endpoints[i]));
    json_object_object_add(o, "endpoints", ep);
    respond(req, 200, o);
}

/* Headers of every file of the web page. The Content-Security-Policy lets
 * the page run only its own files (no inline script or style, no eval),
 * talk only to this origin (its REST and WebSocket), fetch no image from
 * elsewhere (a rendered answer could otherwise send what it shows to any
 * host), never be framed, and hand HTML to the DOM only through DOMPurify's
 * Trusted Types policy. Forms submit nowhere: a message never lands in a
 * URL, even when the script failed to load. */
static const struct {
    const char *name, *value;
} web_headers[] = {
    {"content-security-policy:",
     "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
     "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
     "require-trusted-types-for 'script'; trusted-types dompurify"},
    {"x-content-type-options:", "nosniff"},
    {"x-frame-options:", "DENY"},
    {"referrer-policy:", "no-referrer"},
    {"cross-origin-opener-policy:", "same-origin"},
    {"permissions-policy:", "camera=(), microphone=(), geolocation=(), payment=()"},
    /* A new version of the page is seen at once (the files are small). */
    {"cache-control:", "no-cache"},
};

/* Serves a file of the web page; refuses anything that could leave the
 * folder. Returns the callback's result. */
static int serve_file(gw *g, struct lws *wsi, const char *rel)
{
    static const struct {
        const char *ext, *mime;
    } types[] = {{".html", "text/html; charset=utf-8"},
                 {".js", "text/javascript; charset=utf-8"},
                 {".css", "text/css; charset=utf-8"},
                 {".svg", "image/svg+xml"},
                 {".png", "image/png"}};
    if (rel[0] == '\0')
        rel = "index.html";
    for (const char *p = rel; *p; p++)
        if (!(check_id_char(*p) || *p == '/') || (p[0] == '.' && p[1] == '.'))
            return lws_return_http_status(wsi, 404, NULL) ? -1 : 0;
    const char *mime = NULL;
    const char *dot = strrchr(rel, '.');
    for (size_t i = 0; dot != NULL && i < sizeof types / sizeof types[0]; i++)
        if (strcmp(dot, types[i].ext) == 0)
            mime = types[i].mime;
    if (mime == NULL)
        return lws_return_http_status(wsi, 404, NULL) ? -1 : 0;
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", g->opts.web_root, rel);
    /* Formatted by libwebsockets for the connection's HTTP version. */
    unsigned char hdr[1024], *p = hdr, *end = hdr + sizeof hdr;
    for (size_t i = 0; i < sizeof web_headers / sizeof web_headers[0]; i++)
        if (lws_add_http_header_by_name(wsi, (const unsigned char *)web_headers[i].name,
                                        (const unsigned char *)web_headers[i].value,
                                        (int)strlen(web_headers[i].value), &p, end))
            return -1;
    int n = lws_serve_http_file(wsi, path, mime, (const char *)hdr, (int)(p - hdr));
    if (n < 0)
        return -1;
    if (n > 0)
        return lws_http_transaction_completed(wsi) ? -1 : 0;
    return 0;
}

/* A CORS preflight: which methods and headers an allowed origin may use. */
static int preflight(struct lws *wsi, const caller *c)
{
    unsigned char hdr[LWS_PRE + 1024];
    unsigned char *start = hdr + LWS_PRE, *p = start, *end = hdr + sizeof hdr - 1;
    static const struct {
        const char *name, *value;
    } allow[] = {{"access-control-allow-methods:", "GET, POST, OPTIONS"},
                 {"access-control-allow-headers:", "Authorization, Content-Type"},
                 {"access-control-max-age:", CORS_MAX_AGE}};
    if (lws_add_http_common_headers(wsi, 204, NULL, 0, &p, end) ||
        caller_add_headers(wsi, c, &p, end) != 0)
        return -1;
    for (size_t i = 0; c->origin[0] != '\0' && i < sizeof allow / sizeof allow[0]; i++)
        if (lws_add_http_header_by_name(wsi, (const unsigned char *)allow[i].name,
                                        (const unsigned char *)allow[i].value,
                                        (int)strlen(allow[i].value), &p, end))
            return -1;
    if (lws_finalize_write_http_header(wsi, start, &p, end))
        return -1;
    return lws_http_transaction_completed(wsi) ? -1 : 0;
}

/* A number argument in [0, max]; def when absent. Returns 0 or -1. */
static int number_arg(struct lws *wsi, const char *name, int64_t def, int64_t max, int64_t *out)
{
    char buf[24];
    int has = caller_arg(wsi, name, buf, sizeof buf);
    if (has == 0) {
        *out = def;
        return 0;
    }
    char *end;
    long long v = has > 0 ? strtoll(buf, &end, 10) : -1;
    if (has < 0 || buf[0] == '\0' || *end != '\0' || v < 0 || v > max)
        return -1;
    *out = v;
    return 0;
}

/* The routes of /api/sessions: paging arguments, then the calls. */
/* A next_before cursor: "<start time in µs>.<session id>". Returns 0 or
 * -1. */
static int parse_cursor(const char *cursor, int64_t *us, char *id, size_t cap)
{
    const char *dot = strchr(cursor, '.');
    char err[160];
    if (dot == NULL || dot == cursor || (size_t)(dot - cursor) > 19)
        return -1;
    char num[24];
    memcpy(num, cursor, (size_t)(dot - cursor));
    num[dot - cursor] = '\0';
    char *end;
    long long v = strtoll(num, &end, 10);
    if (*end != '\0' || v <= 0 || check_id("before", dot + 1, err, sizeof err) != 0)
        return -1;
    *us = v;
    snprintf(id, cap, "%s", dot + 1);
    return 0;
}

static void sessions_route(http_req *req, struct lws *wsi, const char *rest)
{
    if (rest[0] == '\0') {
        char cursor[32 + CHECK_ID_MAX];
        int has = caller_arg(wsi, "before", cursor, sizeof cursor);
        if (number_arg(wsi, "limit", LIST_DEFAULT, LIST_MAX, &req->limit) != 0 || req->limit == 0)
            respond_error(req, 400, "invalid_limit", "limit must be a number from 1 to 100");
        else if (has < 0 || (has > 0 && parse_cursor(cursor, &req->before_us, req->before_id,
                                                     sizeof req->before_id) != 0))
            respond_error(req, 400, "invalid_cursor",
                          "before must be the next_before of an earlier page");
        else if (req->who.user[0] == '\0')
            respond_error(req, 400, "missing_user_id",
                          "name the user with ?user_id= (the gateway runs with --auth none)");
        else {
            req->route = ROUTE_LIST;
            start_list(req);
        }
        return;
    }
    if (rest[0] != '/') {
        respond_error(req, 404, "no_such_endpoint", "no such endpoint; see GET /");
        return;
    }
    const char *id = rest + 1;
    const char *slash = strchr(id, '/');
    req->session_id = mem_strndup(id, slash != NULL ? (size_t)(slash - id) : strlen(id));
    char err[160];
    if (check_id("session_id", req->session_id, err, sizeof err) != 0) {
        respond_error(req, 400, "invalid_session_id", "the session id must be " CHECK_ID_RULE);
        return;
    }
    if (slash == NULL) {
        req->route = ROUTE_SESSION;
    } else if (strcmp(slash, "/summary") == 0) {
        req->route = ROUTE_SUMMARY;
    } else if (strcmp(slash, "/events") == 0) {
        req->route = ROUTE_EVENTS;
        if (number_arg(wsi, "after_seq", 0, INT64_MAX / 2, &req->after_seq) != 0 ||
            number_arg(wsi, "limit", EVENTS_DEFAULT, EVENTS_MAX, &req->limit) != 0 ||
            req->limit == 0) {
            respond_error(req, 400, "invalid_paging",
                          "after_seq must be a number >= 0, limit a number from 1 to 1000");
            return;
        }
    } else {
        respond_error(req, 404, "no_such_endpoint", "no such endpoint; see GET /");
        return;
    }
    start_owned(req);
}

/* Checks the caller of a REST route that needs one. Returns 0, or -1
 * after answering. */
static int identify(http_req *req, struct lws *wsi)
{
    caller_refusal why;
    if (caller_identify(req->g, wsi, &req->who, &why) != 0) {
        atomic_fetch_add(&req->g->counters.unauthorized, 1);
        respond_error(req, why.status, why.code, why.message);
        return -1;
    }
    if (req->who.user_arg < 0) {
        respond_error(req, 400, "invalid_user_id", "user_id must be " CHECK_ID_RULE);
        return -1;
    }
    return 0;
}

static void api_route(http_req *req, struct lws *wsi, const char *uri, int post)
{
    gw *g = req->g;
    if (strcmp(uri, "/api/dev/token") == 0 && post) {
        if (auth_get_mode(g->auth) != AUTH_MODE_DEV) {
            respond_error(req, 404, "no_such_endpoint",
                          "no such endpoint; tokens are signed here only with --auth dev");
            return;
        }
        req->route = ROUTE_DEV_TOKEN;
        if (lws_hdr_total_length(wsi, WSI_TOKEN_HTTP_CONTENT_LENGTH) <= 0) {
            req->body_done = 1; /* no body will come */
            dev_token(req);
        }
        return; /* else answered when the body is in */
    }
    if (post) {
        respond_error(req, 405, "method_not_allowed", "only GET is served here");
        return;
    }
    if (strcmp(uri, "/api/health") == 0) {
        /* Open to all (probes, the seed's clients); a valid token adds the
         * services' addresses. */
        caller_refusal why;
        if (auth_get_mode(g->auth) != AUTH_MODE_NONE &&
            caller_identify(g, wsi, &req->who, &why) != 0)
            req->who.verified = 0;
        req->route = ROUTE_HEALTH;
        start_health(req);
        return;
    }
    if (strncmp(uri, PREFIX_SESSIONS, strlen(PREFIX_SESSIONS)) == 0) {
        const char *rest = uri + strlen(PREFIX_SESSIONS);
        if (rest[0] != '\0' && rest[0] != '/') {
            respond_error(req, 404, "no_such_endpoint", "no such endpoint; see GET /");
            return;
        }
        if (identify(req, wsi) != 0)
            return;
        sessions_route(req, wsi, rest);
        return;
    }
    respond_error(req, 404, "no_such_endpoint", "no such endpoint; see GET /");
}

/* The route of a request as a span names it: the path with its ids
 * replaced (bounded: never an id in a span name). */
static const char *route_template(const char *uri)
{
    static const char *const fixed[] = {"/",           "/healthz",       "/readyz",
                                        "/api/health", "/api/dev/token", "/api/sessions"};
    for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++)
        if (strcmp(uri, fixed[i]) == 0)
            return fixed[i];
    if (strncmp(uri, PREFIX_SESSIONS "/", strlen(PREFIX_SESSIONS) + 1) == 0) {
        const char *slash = strchr(uri + strlen(PREFIX_SESSIONS) + 1, '/');
        if (slash == NULL)
            return PREFIX_SESSIONS "/{id}";
        if (strcmp(slash, "/summary") == 0)
            return PREFIX_SESSIONS "/{id}/summary";
        if (strcmp(slash, "/events") == 0)
            return PREFIX_SESSIONS "/{id}/events";
    }
    return "{unmatched}";
}

/* The request's span: probes (/healthz, /readyz) only when the caller
 * traces them. */
static void start_span(http_req *req, const char *method, const char *uri)
{
    const char *tmpl = route_template(uri);
    if (!trace_ctx_valid(&req->who.trace_parent) &&
        (strcmp(tmpl, "/healthz") == 0 || strcmp(tmpl, "/readyz") == 0))
        return;
    char name[64];
    snprintf(name, sizeof name, "%s %s", method, tmpl);
    trace_span_start(&req->span, req->g->tracer, name, TRACE_SERVER, &req->who.trace_parent,
                     req->who.trace_state);
    if (!trace_span_recording(&req->span))
        return;
    trace_span_set_str(&req->span, "http.request.method", method);
    trace_span_set_str(&req->span, "http.route", tmpl);
    trace_span_set_str(&req->span, "convo.request_id", req->who.request_id);
}

/* Answers a request (refusal: why caller_check refused it, else NULL). */
static int answer(gw *g, struct lws *wsi, const char *uri, http_req *req,
                  const caller_refusal *refusal);

int http_on_request(gw *g, struct lws *wsi, const char *uri)
{
    http_req *req = mem_calloc(1, sizeof *req);
    req->g = g;
    req->wsi = wsi;
    req->post = lws_hdr_total_length(wsi, WSI_TOKEN_POST_URI) > 0;
    caller_refusal why;
    int checked = caller_check(g, wsi, &req->who, &why) == 0;
    /* The web page's files are libwebsockets' to serve, untraced. */
    if (strcmp(uri, "/app") != 0 && strncmp(uri, "/app/", 5) != 0) {
        int options = lws_hdr_total_length(wsi, WSI_TOKEN_OPTIONS_URI) > 0;
        start_span(req, req->post ? "POST" : options ? "OPTIONS" : "GET", uri);
    }
    const trace_span *prev = trace_set_current(&req->span);
    int rc = answer(g, wsi, uri, req, checked ? NULL : &why);
    trace_set_current(prev);
    return rc;
}

static int answer(gw *g, struct lws *wsi, const char *uri, http_req *req,
                  const caller_refusal *refusal)
{
    int get = lws_hdr_total_length(wsi, WSI_TOKEN_GET_URI) > 0;
    int post = req->post;
    int options = lws_hdr_total_length(wsi, WSI_TOKEN_OPTIONS_URI) > 0;
    caller_refusal why;
    if (refusal != NULL) {
        why = *refusal;
        const log_field f[] = {
            {"request_id", req->who.request_id}, {"client", req->who.ip}, {NULL, NULL}};
        log_fields(LOG_INFO, f, "request refused: %s", why.code);
        int rc = caller_answer(wsi, &req->who, &why, 0);
        req->status = why.status;
        req_free(req);
        /* After a Transfer-Encoding or a stray body the connection is not
         * read again. */
        if (rc != 0 || why.close)
            return -1;
        return lws_http_transaction_completed(wsi) ? -1 : 0;
    }
    if (!get && !post && !options) {
        why =
            (caller_refusal){405, "method_not_allowed", "only GET, POST and OPTIONS are served", 1};
        caller_answer(wsi, &req->who, &why, 0);
        req->status = why.status;
        req_free(req);
        return -1;
    }
    if (get && strcmp(uri, "/app") == 0) {
        req_free(req);
        unsigned char hdr[LWS_PRE + 256], *p = hdr + LWS_PRE, *end = hdr + sizeof hdr - 1;
        if (lws_http_redirect(wsi, 301, (const unsigned char *)"/app/", 5, &p, end) < 0)
            return -1;
        return lws_http_transaction_completed(wsi) ? -1 : 0;
    }
    if (get && strncmp(uri, "/app/", 5) == 0) {
        req_free(req);
        return serve_file(g, wsi, uri + 5);
    }
    lws_set_opaque_user_data(wsi, req);
    if (get && strcmp(uri, "/healthz") == 0) {
        json_object *o = json_object_new_object();
        json_object_object_add(o, "status", json_object_new_string("ok"));
        respond(req, 200, o);
        return 0;
    }
    if (get && strcmp(uri, "/readyz") == 0) {
        req->route = ROUTE_READY;
        start_health(req);
        return 0;
    }
    /* Everything else costs a service call or more: paced per address. */
    if (lim_take(g->limits, LIM_REST, req->who.ip, lws_now_usecs() / LWS_US_PER_MS) != 0) {
        gw_count_limited(g, lim_name(LIM_REST));
        lws_set_opaque_user_data(wsi, NULL);
        why = (caller_refusal){429, lim_code(LIM_REST),
                               "too many requests from this address (--rest-rate-per-ip)", post};
        int rc = caller_answer(wsi, &req->who, &why, 0);
        req->status = why.status;
        req_free(req);
        return rc != 0 || why.close || lws_http_transaction_completed(wsi) ? -1 : 0;
    }
    if (options) {
        lws_set_opaque_user_data(wsi, NULL);
        int rc = preflight(wsi, &req->who);
        req->status = 204;
        req_free(req);
        return rc;
    }
    if (get && strcmp(uri, "/") == 0)
        api_info(req);
    else if (strncmp(uri, PREFIX_API, strlen(PREFIX_API)) == 0)
        api_route(req, wsi, uri, post);
    else
        respond_error(req, 404, "no_such_endpoint", "no such endpoint; see GET /");
    return 0;
}

void http_on_closed(struct lws *wsi)
{
    http_req *req = lws_get_opaque_user_data(wsi);
    if (req == NULL)
        return;
    lws_set_opaque_user_data(wsi, NULL);
    req->wsi = NULL;
    if (req->pending == 0)
        req_free(req);
}
