#include "health.h"

#include "log.h"
#include "mem.h"

#include "convo_methods.h"

#include <pthread.h>
#include <string.h>

typedef struct service_status {
    char *name;
    health_status status;
} service_status;

typedef struct watcher {
    srv_call *call;
    char *service;
    struct watcher *next;
} watcher;

struct health {
    pthread_mutex_t mu;
    service_status *services;
    size_t nservices;
    watcher *watchers;
    int closed; /* the server is going away: no new watchers */
    int frozen; /* shutting down: NOT_SERVING stays, whatever a service says */
};

static health *health_create(void)
{
    health *h = mem_calloc(1, sizeof *h);
    pthread_mutex_init(&h->mu, NULL);
    h->services = mem_calloc(1, sizeof *h->services);
    h->services[0].name = mem_strdup("");
    h->services[0].status = HEALTH_UNKNOWN;
    h->nservices = 1;
    return h;
}

/* srv_hooks.on_destroy: the server is gone, and every call with it. */
static void health_destroy(void *arg)
{
    health *h = arg;
    for (size_t i = 0; i < h->nservices; i++)
        mem_free(h->services[i].name);
    mem_free(h->services);
    pthread_mutex_destroy(&h->mu);
    mem_free(h);
}

static service_status *find_locked(health *h, const char *name)
{
    for (size_t i = 0; i < h->nservices; i++)
        if (strcmp(h->services[i].name, name) == 0)
            return &h->services[i];
    return NULL;
}

/* srv_hooks.on_service: a service the server serves is known, UNKNOWN
 * until set. */
static void add_service(void *arg, const char *service)
{
    health *h = arg;
    pthread_mutex_lock(&h->mu);
    if (find_locked(h, service) == NULL) {
        h->services = mem_realloc(h->services, (h->nservices + 1) * sizeof *h->services);
        h->services[h->nservices].name = mem_strdup(service);
        h->services[h->nservices].status = HEALTH_UNKNOWN;
        h->nservices++;
    }
    pthread_mutex_unlock(&h->mu);
}

/* What a Watch stream reports for `service`: SERVICE_UNKNOWN for names the
 * server has never heard of, as the protocol asks. */
static int wire_status_locked(health *h, const char *service)
{
    service_status *st = find_locked(h, service);
    return st == NULL ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN
                      : (int)st->status;
}

static void send_status(srv_call *call, int status)
{
    Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    resp.status = status;
    int rc = srv_call_send(call, &resp.base);
    if (rc != 0 && rc != RPC_EDONE)
        log_warn("health: a Watch update was dropped: %s", rpc_strerror(rc));
}

static void notify_locked(health *h, const char *service)
{
    for (watcher *w = h->watchers; w != NULL; w = w->next)
        if (service == NULL || strcmp(w->service, service) == 0)
            send_status(w->call, wire_status_locked(h, w->service));
}

static void set_locked(health *h, const char *service, health_status status)
{
    service_status *st = find_locked(h, service);
    if (st == NULL) {
        h->services = mem_realloc(h->services, (h->nservices + 1) * sizeof *h->services);
        st = &h->services[h->nservices++];
        st->name = mem_strdup(service);
        st->status = HEALTH_UNKNOWN;
    }
    if (st->status != status) {
        st->status = status;
        notify_locked(h, service);
    }
}

void health_set(health *h, const char *service, health_status status)
{
    pthread_mutex_lock(&h->mu);
    if (!h->frozen)
        set_locked(h, service, status);
    pthread_mutex_unlock(&h->mu);
}

static void set_all_locked(health *h, health_status status)
{
    for (size_t i = 0; i < h->nservices; i++)
        set_locked(h, h->services[i].name, status);
}

/* srv_hooks.on_start: every service SERVING, unless the program set the
 * server's status before (store-svc waits for its database). */
static void on_start(void *arg)
{
    health *h = arg;
    pthread_mutex_lock(&h->mu);
    if (!h->frozen && find_locked(h, "")->status == HEALTH_UNKNOWN)
        set_all_locked(h, HEALTH_SERVING);
    pthread_mutex_unlock(&h->mu);
}

/* srv_hooks.on_draining: every service NOT_SERVING for good; later
 * health_set calls (a database reconnecting during the drain, say) change
 * nothing. */
static void on_draining(void *arg)
{
    health *h = arg;
    pthread_mutex_lock(&h->mu);
    set_all_locked(h, HEALTH_NOT_SERVING);
    h->frozen = 1;
    pthread_mutex_unlock(&h->mu);
}

int health_serving(void *arg)
{
    health *h = arg;
    pthread_mutex_lock(&h->mu);
    int serving = find_locked(h, "")->status == HEALTH_SERVING;
    pthread_mutex_unlock(&h->mu);
    return serving;
}

static void on_check(srv_call *call, const ProtobufCMessage *msg)
{
    const Grpc__Health__V1__HealthCheckRequest *req =
        (const Grpc__Health__V1__HealthCheckRequest *)msg;
    health *h = srv_call_method_data(call);
    pthread_mutex_lock(&h->mu);
    service_status *st = find_locked(h, req->service);
    int status = st != NULL ? (int)st->status : -1;
    pthread_mutex_unlock(&h->mu);

    if (status < 0) {
        srv_call_finishf(call, RPC_NOT_FOUND, "unknown service '%s'", req->service);
        return;
    }
    Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    resp.status = status;
    srv_call_finish(call, RPC_OK, NULL, &resp.base);
}

/* Unlinks the watcher of `call`; returns whether it was still listed. */
static int unlink_locked(health *h, srv_call *call)
{
    for (watcher **p = &h->watchers; *p != NULL; p = &(*p)->next) {
        if ((*p)->call == call) {
            watcher *w = *p;
            *p = w->next;
            mem_free(w->service);
            mem_free(w);
            return 1;
        }
    }
    return 0;
}

static void on_watch_cancel(srv_call *call)
{
    health *h = srv_call_method_data(call);
    pthread_mutex_lock(&h->mu);
    int listed = unlink_locked(h, call);
    pthread_mutex_unlock(&h->mu);
    if (listed)
        srv_call_finish(call, RPC_CANCELLED, "watch cancelled", NULL);
}

static void on_watch(srv_call *call, const ProtobufCMessage *msg)
{
    const Grpc__Health__V1__HealthCheckRequest *req =
        (const Grpc__Health__V1__HealthCheckRequest *)msg;
    health *h = srv_call_method_data(call);
    pthread_mutex_lock(&h->mu);
    if (h->closed) {
        pthread_mutex_unlock(&h->mu);
        srv_call_finish(call, RPC_UNAVAILABLE, "the server is shutting down", NULL);
        return;
    }
    watcher *w = mem_calloc(1, sizeof *w);
    w->call = call;
    w->service = mem_strdup(req->service);
    w->next = h->watchers;
    h->watchers = w;
    srv_call_on_cancel(call, on_watch_cancel);
    send_status(call, wire_status_locked(h, req->service));
    pthread_mutex_unlock(&h->mu);
}

/* srv_hooks.on_stopping: every Watch stream ends (it would never end by
 * itself), and none starts any more. */
static void close_watchers(void *arg)
{
    health *h = arg;
    pthread_mutex_lock(&h->mu);
    h->closed = 1;
    while (h->watchers != NULL) {
        srv_call *call = h->watchers->call;
        unlink_locked(h, call);
        srv_call_finish(call, RPC_UNAVAILABLE, "the server is shutting down", NULL);
    }
    pthread_mutex_unlock(&h->mu);
}

health *health_attach(srv *s)
{
    static const srv_hooks hooks = {
        .on_service = add_service,
        .on_start = on_start,
        .on_draining = on_draining,
        .on_stopping = close_watchers,
        .on_destroy = health_destroy,
    };
    static const srv_method check = {
        .method = &grpc__health__v1__health__check__method,
        .on_call = on_check,
        /* Probes, load balancers and every peer ask. */
        .callers = "*",
        .without_certificate = 1,
        .trace_only_with_parent = 1,
    };
    static const srv_method watch = {
        .method = &grpc__health__v1__health__watch__method,
        .on_call = on_watch,
        .callers = "*",
        .without_certificate = 1,
        .trace_only_with_parent = 1,
    };
    health *h = health_create();
    if (srv_set_hooks(s, &hooks, h) != 0) {
        log_error("health: the server has hooks attached already");
        health_destroy(h);
        return NULL;
    }
    srv_add_method(s, &check, h);
    srv_add_method(s, &watch, h);
    return h;
}
