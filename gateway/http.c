#include "http.h"

#include "check.h"
#include "convo/v1/store.pb-c.h"
#include "convo/v1/summary.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"
#include "gw.h"
#include "log.h"
#include "mem.h"
#include "names.h"
#include "session.h"

#include <json-c/json.h>
#include <libwebsockets.h>
#include <string.h>

#define SERVICES 4

/* Deadline of each service's health check for /api/health. */
#define HEALTH_TIMEOUT_MS 2000

typedef enum route {
    ROUTE_HEALTH,
    ROUTE_SESSION,
    ROUTE_SUMMARY,
} route;

typedef struct http_req {
    gw *g;
    struct lws *wsi; /* NULL once the client is gone */
    route route;
    int pending; /* gRPC calls not yet answered */
    int status;
    char *body; /* LWS_PRE bytes of room, then the JSON */
    size_t body_len;
    char *session_id;
    /* /api/health */
    const char *service_names[SERVICES];
    const char *service_addrs[SERVICES];
    int service_status[SERVICES]; /* health status, or -1 unreachable */
    char service_error[SERVICES][96];
} http_req;

static const char *const health_names[] = {"UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"};

static void respond(http_req *req, int status, json_object *body)
{
    size_t len;
    const char *text = json_object_to_json_string_length(
        body, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE, &len);
    req->status = status;
    req->body = mem_alloc(LWS_PRE + len);
    memcpy(req->body + LWS_PRE, text, len);
    req->body_len = len;
    json_object_put(body);
    if (req->wsi != NULL)
        lws_callback_on_writable(req->wsi);
}

static void respond_error(http_req *req, int status, const char *message)
{
    json_object *o = json_object_new_object();
    json_object_object_add(o, "error", json_object_new_string(message));
    respond(req, status, o);
}

static void req_free(http_req *req)
{
    mem_free(req->body);
    mem_free(req->session_id);
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
    unsigned char hdr[LWS_PRE + 512];
    unsigned char *start = hdr + LWS_PRE, *p = start, *end = hdr + sizeof hdr - 1;
    if (lws_add_http_common_headers(wsi, (unsigned)req->status, "application/json",
                                    (lws_filepos_t)req->body_len, &p, end) ||
        lws_add_http_header_by_name(wsi, (const unsigned char *)"access-control-allow-origin:",
                                    (const unsigned char *)"*", 1, &p, end) ||
        lws_add_http_header_by_name(wsi, (const unsigned char *)"cache-control:",
                                    (const unsigned char *)"no-store", 8, &p, end) ||
        lws_finalize_write_http_header(wsi, start, &p, end))
        return -1;
    if (lws_write(wsi, (unsigned char *)req->body + LWS_PRE, req->body_len, LWS_WRITE_HTTP_FINAL) <
        0)
        return -1;
    /* The connection may carry another request (keep-alive): this one is
     * done. */
    lws_set_opaque_user_data(wsi, NULL);
    req_free(req);
    return lws_http_transaction_completed(wsi) ? -1 : 0;
}

/* ---- /api/health ------------------------------------------------------ */

typedef struct health_job {
    http_req *req;
    int index;
    rpc_code code;
    char *message;
    int status;
} health_job;

static void finish_health(http_req *req)
{
    json_object *o = json_object_new_object();
    json_object *services = json_object_new_object();
    int all = 1;
    for (int i = 0; i < SERVICES; i++) {
        json_object *svc = json_object_new_object();
        json_object_object_add(svc, "address", json_object_new_string(req->service_addrs[i]));
        int st = req->service_status[i];
        json_object_object_add(
            svc, "status", json_object_new_string(st < 0 ? "UNREACHABLE" : health_names[st & 3]));
        if (st < 0)
            json_object_object_add(svc, "error", json_object_new_string(req->service_error[i]));
        json_object_object_add(services, req->service_names[i], svc);
        all = all && st == 1;
    }
    gw_counters *k = &req->g->counters;
    json_object *gwo = json_object_new_object();
    json_object_object_add(gwo, "status", json_object_new_string("SERVING"));
    json_object_object_add(gwo, "connections", json_object_new_int64(atomic_load(&k->connections)));
    json_object_object_add(gwo, "sessions",
                           json_object_new_int64((int64_t)sess_count(req->g->sessions)));
    json_object_object_add(gwo, "turns", json_object_new_int64(atomic_load(&k->turns)));
    json_object_object_add(gwo, "turn_errors", json_object_new_int64(atomic_load(&k->turn_errors)));
    json_object_object_add(gwo, "events_logged",
                           json_object_new_int64(atomic_load(&k->events_logged)));
    json_object_object_add(gwo, "events_buffered",
                           json_object_new_int64(atomic_load(&k->events_buffered)));
    json_object_object_add(gwo, "events_dropped",
                           json_object_new_int64(atomic_load(&k->events_dropped)));
    json_object_object_add(gwo, "connections_refused",
                           json_object_new_int64(atomic_load(&k->refused)));
    json_object_object_add(gwo, "memory_bytes", json_object_new_int64((int64_t)mem_used()));
    json_object_object_add(o, "status", json_object_new_string(all ? "ok" : "degraded"));
    json_object_object_add(o, "gateway", gwo);
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
    if (req_alive(req) && last)
        finish_health(req);
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
    req->route = ROUTE_HEALTH;
    req->pending = SERVICES;
    for (int i = 0; i < SERVICES; i++) {
        req->service_names[i] = names[i];
        req->service_addrs[i] = cli_channel_target(chans[i]);
        health_job *j = mem_calloc(1, sizeof *j);
        j->req = req;
        j->index = i;
        Grpc__Health__V1__HealthCheckRequest hreq = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
        hreq.service = "";
        cli_opts o = {.timeout_ms = HEALTH_TIMEOUT_MS};
        if (cli_unary(chans[i], "/grpc.health.v1.Health/Check", &hreq.base,
                      &grpc__health__v1__health_check_response__descriptor, &o, on_health_done, j,
                      NULL) != 0) {
            j->code = RPC_INTERNAL;
            j->message = mem_strdup("could not start the call");
            bridge_post(g->bridge, on_health_job, j);
        }
    }
}

/* ---- /api/sessions/{id}[/summary] ----------------------------------------- */

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

typedef struct session_job {
    http_req *req;
    rpc_code code;
    char *message;
    ProtobufCMessage *resp;
} session_job;

static void start_get_session(http_req *req);

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

static void on_session_job(void *arg)
{
    session_job *j = arg;
    http_req *req = j->req;
    if (!req_alive(req))
        goto out;
    if (req->route == ROUTE_SUMMARY && j->resp != NULL &&
        j->resp->descriptor == &convo__v1__get_summary_response__descriptor) {
        const Convo__V1__GetSummaryResponse *r = (const Convo__V1__GetSummaryResponse *)j->resp;
        answer_summary(req, names_summary_status(r->status), r->summary, r->error, r->attempts);
    } else if (req->route == ROUTE_SUMMARY && j->code == RPC_UNAVAILABLE && j->resp == NULL &&
               req->pending == 0 && req->status == 0) {
        /* summary-svc is down: the store knows the status too. */
        req->status = -1;
        start_get_session(req);
    } else if (j->code != RPC_OK) {
        char msg[300];
        snprintf(msg, sizeof msg, "%s: %s", rpc_code_name(j->code), j->message);
        respond_error(req, j->code == RPC_NOT_FOUND ? 404 : rpc_code_http_status(j->code), msg);
    } else {
        const Convo__V1__Session *s = ((const Convo__V1__GetSessionResponse *)j->resp)->session;
        if (s == NULL)
            respond_error(req, 404, "no such session");
        else if (req->route == ROUTE_SUMMARY)
            answer_summary(req, names_summary_status(s->summary_status), s->final_summary,
                           s->summary_error, s->summary_attempts);
        else
            respond(req, 200, session_json(s));
    }
out:
    if (j->resp != NULL)
        protobuf_c_message_free_unpacked(j->resp, NULL);
    mem_free(j->message);
    mem_free(j);
}

static void on_session_done(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp)
{
    session_job *j = mem_calloc(1, sizeof *j);
    j->req = arg;
    j->code = code;
    j->message = mem_strdup(message != NULL ? message : "");
    j->resp = resp;
    bridge_post(j->req->g->bridge, on_session_job, j);
}

static void start_get_session(http_req *req)
{
    Convo__V1__GetSessionRequest greq = CONVO__V1__GET_SESSION_REQUEST__INIT;
    greq.session_id = req->session_id;
    cli_opts o = {.timeout_ms = req->g->opts.store_timeout_ms};
    req->pending++;
    if (cli_unary(req->g->store, "/convo.v1.Store/GetSession", &greq.base,
                  &convo__v1__get_session_response__descriptor, &o, on_session_done, req,
                  NULL) != 0) {
        req->pending--;
        respond_error(req, 500, "could not start the call to store-svc");
    }
}

static void start_get_summary(http_req *req)
{
    Convo__V1__GetSummaryRequest sreq = CONVO__V1__GET_SUMMARY_REQUEST__INIT;
    sreq.session_id = req->session_id;
    cli_opts o = {.timeout_ms = req->g->opts.store_timeout_ms};
    req->pending++;
    if (cli_unary(req->g->summary, "/convo.v1.Summary/GetSummary", &sreq.base,
                  &convo__v1__get_summary_response__descriptor, &o, on_session_done, req,
                  NULL) != 0) {
        req->pending--;
        start_get_session(req);
    }
}

/* ---- dispatch ------------------------------------------------------------- */

static void api_info(http_req *req)
{
    json_object *o = json_object_new_object();
    json_object_object_add(o, "name", json_object_new_string("convo gateway"));
    json_object_object_add(o, "version", json_object_new_string(conf_version()));
    json_object_object_add(o, "websocket",
                           json_object_new_string("/ws/session/{session_id}?user_id={user_id}"));
    json_object_object_add(o, "web_page", json_object_new_string("/app/"));
    json_object *ep = json_object_new_array();
    const char *const endpoints[] = {"GET /", "GET /api/health", "GET /api/sessions/{id}",
                                     "GET /api/sessions/{id}/summary", "GET /app/"};
    for (size_t i = 0; i < sizeof endpoints / sizeof endpoints[0]; i++)
        json_object_array_add(ep, json_object_new_string(endpoints[i]));
    json_object_object_add(o, "endpoints", ep);
    respond(req, 200, o);
}

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
    int n = lws_serve_http_file(wsi, path, mime, NULL, 0);
    if (n < 0)
        return -1;
    if (n > 0)
        return lws_http_transaction_completed(wsi) ? -1 : 0;
    return 0;
}

int http_on_request(gw *g, struct lws *wsi, const char *uri)
{
    if (lws_hdr_total_length(wsi, WSI_TOKEN_GET_URI) <= 0)
        return lws_return_http_status(wsi, 405, "only GET is served") ? -1 : 0;
    if (strcmp(uri, "/app") == 0) {
        unsigned char hdr[LWS_PRE + 256], *p = hdr + LWS_PRE, *end = hdr + sizeof hdr - 1;
        if (lws_http_redirect(wsi, 301, (const unsigned char *)"/app/", 5, &p, end) < 0)
            return -1;
        return lws_http_transaction_completed(wsi) ? -1 : 0;
    }
    if (strncmp(uri, "/app/", 5) == 0)
        return serve_file(g, wsi, uri + 5);

    http_req *req = mem_calloc(1, sizeof *req);
    req->g = g;
    req->wsi = wsi;
    lws_set_opaque_user_data(wsi, req);

    const char *prefix = "/api/sessions/";
    if (strcmp(uri, "/") == 0) {
        api_info(req);
    } else if (strcmp(uri, "/api/health") == 0) {
        start_health(req);
    } else if (strncmp(uri, prefix, strlen(prefix)) == 0) {
        const char *id = uri + strlen(prefix);
        const char *slash = strchr(id, '/');
        req->session_id = mem_strndup(id, slash != NULL ? (size_t)(slash - id) : strlen(id));
        char err[160];
        if (check_id("session_id", req->session_id, err, sizeof err) != 0) {
            respond_error(req, 400, err);
        } else if (slash == NULL) {
            req->route = ROUTE_SESSION;
            start_get_session(req);
        } else if (strcmp(slash, "/summary") == 0) {
            req->route = ROUTE_SUMMARY;
            start_get_summary(req);
        } else {
            respond_error(req, 404, "no such endpoint; see GET /");
        }
    } else {
        respond_error(req, 404, "no such endpoint; see GET /");
    }
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
