#include "rpcm.h"

#include "mem.h"

#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

#define RPCM_LABELS "grpc_service,grpc_method"
#define RPCM_ROWS(X, S, side, who)                                                                 \
    X(S, handled, COUNTER_VEC, "convo_grpc_" side "_handled_total", RPCM_LABELS ",grpc_code",      \
      NULL, "gRPC calls " who " finished, by method and status code")                              \
    X(S, seconds, HISTOGRAM_VEC, "convo_grpc_" side "_handling_seconds", RPCM_LABELS,              \
      &metrics_buckets_seconds,                                                                    \
      "time from the start of a gRPC call " who " to its status (a stream's whole length)")        \
    X(S, in_flight, GAUGE_VEC, "convo_grpc_" side "_calls_in_flight", RPCM_LABELS, NULL,           \
      "gRPC calls " who " started that have not finished")                                         \
    X(S, sent, COUNTER_VEC, "convo_grpc_" side "_msgs_sent_total", RPCM_LABELS, NULL,              \
      "streamed messages " who " sent")                                                            \
    X(S, received, COUNTER_VEC, "convo_grpc_" side "_msgs_received_total", RPCM_LABELS, NULL,      \
      "streamed messages " who " received")
#define SERVER_METRICS(X, S) RPCM_ROWS(X, S, "server", "this server")
#define CLIENT_METRICS(X, S) RPCM_ROWS(X, S, "client", "this process")
METRICS_DECLARE(server_metrics, SERVER_METRICS)
METRICS_DECLARE(client_metrics, CLIENT_METRICS)

#define NCODES (RPC_UNAUTHENTICATED + 1)

struct rpcm_method {
    rpcm_method *next;
    rpcm *r;
    char *path;
    char *service, *method;
    metrics_gauge *in_flight;
    metrics_histogram *seconds;
    _Atomic(metrics_counter *) sent, received;
    _Atomic(metrics_counter *) by_code[NCODES];
};

struct rpcm {
    metrics_family *handled, *seconds, *in_flight, *sent, *received;
    pthread_mutex_t mu;
    rpcm_method *methods;
};

static rpcm *create(metrics_family *const fams[5])
{
    rpcm *r = mem_calloc(1, sizeof *r);
    r->handled = fams[0];
    r->seconds = fams[1];
    r->in_flight = fams[2];
    r->sent = fams[3];
    r->received = fams[4];
    pthread_mutex_init(&r->mu, NULL);
    return r;
}

rpcm *rpcm_create_server(metrics *m)
{
    server_metrics sm;
    if (m == NULL || metrics_register(m, METRICS_SECTION(server_metrics, &sm)) != 0)
        return NULL;
    return create(
        (metrics_family *const[5]){sm.handled, sm.seconds, sm.in_flight, sm.sent, sm.received});
}

rpcm *rpcm_create_client(metrics *m)
{
    client_metrics cm;
    if (m == NULL || metrics_register(m, METRICS_SECTION(client_metrics, &cm)) != 0)
        return NULL;
    return create(
        (metrics_family *const[5]){cm.handled, cm.seconds, cm.in_flight, cm.sent, cm.received});
}

void rpcm_destroy(rpcm **rp)
{
    rpcm *r = *rp;
    if (r == NULL)
        return;
    *rp = NULL;
    for (rpcm_method *pm = r->methods, *next; pm != NULL; pm = next) {
        next = pm->next;
        mem_free(pm->path);
        mem_free(pm->service);
        mem_free(pm->method);
        mem_free(pm);
    }
    pthread_mutex_destroy(&r->mu);
    mem_free(r);
}

rpcm_method *rpcm_method_get(rpcm *r, const char *path)
{
    if (r == NULL)
        return NULL;
    pthread_mutex_lock(&r->mu);
    rpcm_method *pm = r->methods;
    while (pm != NULL && strcmp(pm->path, path) != 0)
        pm = pm->next;
    if (pm == NULL) {
        pm = mem_calloc(1, sizeof *pm);
        pm->path = mem_strdup(path);
        /* "/convo.v1.Llm/Chat": service convo.v1.Llm, method Chat. */
        const char *p = path[0] == '/' ? path + 1 : path;
        const char *slash = strrchr(p, '/');
        pm->service = slash != NULL ? mem_strndup(p, (size_t)(slash - p)) : mem_strdup("unknown");
        pm->method = mem_strdup(slash != NULL ? slash + 1 : p);
        pm->r = r;
        const char *labels[2] = {pm->service, pm->method};
        pm->in_flight = metrics_gauge_of(r->in_flight, labels);
        pm->seconds = metrics_histogram_of(r->seconds, labels);
        /* OK from the start, at 0, so rate() sees the first calls. */
        atomic_store(
            &pm->by_code[RPC_OK],
            metrics_counter_of(r->handled, (const char *[]){pm->service, pm->method, "OK"}));
        pm->next = r->methods;
        r->methods = pm;
    }
    pthread_mutex_unlock(&r->mu);
    return pm;
}

/* The counter of `family` for this method (and code), found once and then
 * kept in *slot. */
static metrics_counter *series(_Atomic(metrics_counter *) *slot, metrics_family *family,
                               const rpcm_method *pm, const char *code)
{
    metrics_counter *c = atomic_load_explicit(slot, memory_order_acquire);
    if (c == NULL) {
        const char *values[3] = {pm->service, pm->method, code};
        c = metrics_counter_of(family, values);
        atomic_store_explicit(slot, c, memory_order_release);
    }
    return c;
}

uint64_t rpcm_start(rpcm_method *pm)
{
    if (pm == NULL)
        return 0;
    metrics_gauge_add(pm->in_flight, 1);
    return metrics_now_us();
}

void rpcm_end(rpcm_method *pm, uint64_t t0, rpc_code code)
{
    if (pm == NULL)
        return;
    if ((unsigned)code >= NCODES)
        code = RPC_UNKNOWN;
    metrics_histogram_observe(pm->seconds, metrics_now_us() - t0);
    metrics_counter_inc(series(&pm->by_code[code], pm->r->handled, pm, rpc_code_name(code)));
    metrics_gauge_add(pm->in_flight, -1);
}

void rpcm_forget(rpcm_method *pm)
{
    if (pm != NULL)
        metrics_gauge_add(pm->in_flight, -1);
}

void rpcm_sent(rpcm_method *pm)
{
    if (pm != NULL)
        metrics_counter_inc(series(&pm->sent, pm->r->sent, pm, NULL));
}

void rpcm_received(rpcm_method *pm)
{
    if (pm != NULL)
        metrics_counter_inc(series(&pm->received, pm->r->received, pm, NULL));
}
