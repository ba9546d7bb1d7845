#include "cli.h"

#include "convo_methods.h"
#include "log.h"
#include "mem.h"
#include "rpc_internal.h"
#include "rpcm.h"
#include "trace.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>
#include <json-c/json.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* x-request-id, traceparent, tracestate and a caller's own. */
#define MAX_META 10
/* The least time a connection attempt (TCP and TLS) is given. */
#define CONNECT_TIMEOUT_MS 5000
/* The longest HOST:PORT of a peer address, and the longest address (a
 * list of replicas). */
#define ENTRY_MAX 300
#define ADDR_MAX  8192
#define PORT_MAX  65535
/* A call of a method named safe to retry that fails UNAVAILABLE before any
 * answer arrived (its replica died, or refused the connection) is sent
 * again by the core, to the next replica under round robin: this many
 * attempts in all (5, the most gRPC takes), each after a pause drawn up to
 * the backoff (doubled each time, at most the maximum). A retry drawn
 * early can still find the dead replica in the balancer's list, which
 * learns of the broken connection a moment later: five attempts over up
 * to 1.5 s outlast that moment even on a loaded machine. */
#define RETRY_ATTEMPTS      5
#define RETRY_BACKOFF       "0.1s"
#define RETRY_BACKOFF_MAX   "0.8s"
#define RETRY_BACKOFF_TIMES 2
/* gRPC retry throttling, per channel: each failure takes a token, each
 * success gives back a tenth; below half of the tokens no call is retried,
 * so a peer that is down altogether is not sent every call three times.
 * Half of the tokens is what may fail at once and still be retried: every
 * call in flight on a replica that dies (at 10, the sixth of fifty routes
 * in flight failed for good). 1000 is the most gRPC takes. */
#define RETRY_THROTTLE_TOKENS 1000
#define RETRY_THROTTLE_RATIO  0.1

typedef struct cq_thread {
    cli *owner;
    grpc_completion_queue *cq;
    pthread_t tid;
} cq_thread;

/* The completion-queue thread this is, when it is one. */
static _Thread_local cq_thread *this_thread;

struct cli_channel {
    cli *c;
    grpc_channel *channel;
    char *target;
    struct cli_channel *next;
};

struct cli {
    cq_thread *threads;
    size_t nthreads;
    atomic_uint next_thread;
    int64_t max_message_bytes;
    pthread_mutex_t mu;
    pthread_cond_t idle;
    cli_channel *channels;
    tls *tls;        /* NULL: plaintext channels */
    cli_call *calls; /* calls whose done has not fired, for cli_destroy */
    size_t ncalls;
    int closing;
    rpcm *metrics; /* NULL: not counted */
    otlp *tracer;  /* NULL: spans not recorded */
};

struct cli_call {
    cli *c;
    grpc_call *call;
    const ProtobufCMessageDescriptor *resp_desc;
    int streaming;
    cli_msg_fn on_msg;
    cli_done_fn done;
    void *arg;
    rpcm_method *pm;
    uint64_t started_us;
    trace_span span; /* the client span; zeroed for an untraced health check */

    pthread_mutex_t mu;
    int refs;
    int paused;       /* on_msg asked to stop reading */
    int resume_asked; /* cli_call_resume came while on_msg ran */
    int reading;      /* a RECV_MESSAGE is in flight */
    int stream_ended; /* RECV_MESSAGE returned no message */
    int have_status;  /* RECV_STATUS_ON_CLIENT completed */
    int done_fired;
    struct cli_call *prev, *next; /* in c->calls while done has not fired */

    grpc_metadata send_md[MAX_META];
    size_t nsend_md;
    grpc_byte_buffer *send_bb;
    grpc_metadata_array initial_md;
    grpc_metadata_array trailing_md;
    grpc_status_code status;
    grpc_slice details;
    grpc_byte_buffer *recv_bb;

    rpc__tag main_tag;   /* unary: everything; stream: the send side */
    rpc__tag status_tag; /* stream: the status */
    rpc__tag recv_tag;   /* stream: one message */
};

static void *thread_main(void *arg)
{
    cq_thread *t = arg;
    this_thread = t;
    rpc__cq_loop(t->cq);
    return NULL;
}

cli *cli_create(int threads, int64_t max_message_bytes)
{
    rpc__grpc_ref();
    cli *c = mem_calloc(1, sizeof *c);
    c->nthreads = threads < 1 ? 1 : (size_t)threads;
    c->max_message_bytes = max_message_bytes > 0 ? max_message_bytes : 4 * 1024 * 1024;
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->idle, NULL);
    c->threads = mem_calloc(c->nthreads, sizeof *c->threads);
    for (size_t i = 0; i < c->nthreads; i++) {
        c->threads[i].owner = c;
        c->threads[i].cq = grpc_completion_queue_create_for_next(NULL);
        pthread_create(&c->threads[i].tid, NULL, thread_main, &c->threads[i]);
    }
    return c;
}

void cli_use_tls(cli *c, tls *t)
{
    c->tls = t;
}

/* ---- peer addresses -------------------------------------------------- */

/* Targets the gRPC core resolves itself: passed on as they are. */
static const char *const core_schemes[] = {"dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:"};

typedef enum host_kind { HOST_NAME, HOST_IPV4, HOST_IPV6 } host_kind;

static void fail(char *err, size_t errsize, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void fail(char *err, size_t errsize, const char *fmt, ...)
{
    if (err == NULL || errsize == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errsize, fmt, ap);
    va_end(ap);
}

/* One HOST:PORT (an IPv6 address in brackets): the port is 1-65535 and
 * the host a name or an IP address, which *kind tells. Returns 0 or -1
 * with the reason in err. */
static int parse_entry(const char *entry, host_kind *kind, char *err, size_t errsize)
{
    size_t len = strlen(entry);
    const char *colon = strrchr(entry, ':');
    if (len == 0) {
        fail(err, errsize, "an empty address (HOST:PORT expected)");
        return -1;
    }
    if (len >= ENTRY_MAX || colon == NULL || colon == entry) {
        fail(err, errsize, "'%s' is not HOST:PORT", entry);
        return -1;
    }
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (!isdigit((unsigned char)colon[1]) || *end != '\0' || port < 1 || port > PORT_MAX) {
        fail(err, errsize, "'%s' has no port of 1-65535 after its last ':'", entry);
        return -1;
    }
    char host[ENTRY_MAX];
    size_t hlen = (size_t)(colon - entry);
    memcpy(host, entry, hlen);
    host[hlen] = '\0';
    unsigned char bin[sizeof(struct in6_addr)];
    if (host[0] == '[') {
        if (hlen < 3 || host[hlen - 1] != ']') {
            fail(err, errsize, "'%s': an IPv6 address is written [ADDRESS]:PORT", entry);
            return -1;
        }
        host[hlen - 1] = '\0';
        if (inet_pton(AF_INET6, host + 1, bin) != 1) {
            fail(err, errsize, "'%s' is not a valid IPv6 address and port", entry);
            return -1;
        }
        *kind = HOST_IPV6;
        return 0;
    }
    if (inet_pton(AF_INET, host, bin) == 1) {
        *kind = HOST_IPV4;
        return 0;
    }
    for (const char *p = host; *p; p++) {
        if (!isalnum((unsigned char)*p) && *p != '-' && *p != '.' && *p != '_') {
            fail(err, errsize,
                 "'%s' is not HOST:PORT (a host is a name, an IPv4 address or [an IPv6 address])",
                 entry);
            return -1;
        }
    }
    *kind = HOST_NAME;
    return 0;
}

/* A list of replicas, IP addresses of one family, as the core's ipv4: or
 * ipv6: target (it takes them comma-separated and resolves nothing) into
 * *target. Returns 0 or -1 with the reason in err; on failure nothing is
 * returned. */
static int list_target(const char *addr, char **target, char *err, size_t errsize)
{
    char *copy = mem_strdup(addr);
    char *out = mem_alloc(strlen(addr) + sizeof "ipv6:");
    out[0] = '\0';
    size_t max_entries = 1, n = 0;
    for (const char *p = addr; *p; p++)
        max_entries += *p == ',';
    char **seen = mem_calloc(max_entries, sizeof *seen);
    host_kind family = HOST_NAME;
    int rc = -1;
    for (char *e = copy, *next; e != NULL; e = next) {
        next = strchr(e, ',');
        if (next != NULL)
            *next++ = '\0';
        while (isspace((unsigned char)*e))
            e++;
        for (size_t k = strlen(e); k > 0 && isspace((unsigned char)e[k - 1]); k--)
            e[k - 1] = '\0';
        host_kind kind;
        if (parse_entry(e, &kind, err, errsize) != 0)
            goto out;
        if (kind == HOST_NAME) {
            fail(err, errsize,
                 "'%s': a list of replicas takes IP addresses only (nothing resolves names in "
                 "a list); for every address of a name use dns:///NAME:PORT",
                 e);
            goto out;
        }
        if (family != HOST_NAME && kind != family) {
            fail(err, errsize, "'%s': a list is all IPv4 or all IPv6 addresses, not both", e);
            goto out;
        }
        for (size_t i = 0; i < n; i++) {
            if (strcmp(seen[i], e) == 0) {
                fail(err, errsize, "'%s' is listed twice", e);
                goto out;
            }
        }
        seen[n++] = e;
        strcat(out, family == HOST_NAME ? (kind == HOST_IPV4 ? "ipv4:" : "ipv6:") : ",");
        strcat(out, e);
        family = kind;
    }
    *target = out;
    out = NULL;
    rc = 0;
out:
    mem_free(seen);
    mem_free(out);
    mem_free(copy);
    return rc;
}

/* The gRPC target of a peer address (see cli_channel_create) into *target
 * (mem_free'd by the caller); *is_list tells a list of replicas. Returns 0
 * or -1 with the reason in err. */
static int peer_target(const char *addr, char **target, int *is_list, char *err, size_t errsize)
{
    *target = NULL;
    *is_list = 0;
    for (size_t i = 0; i < sizeof core_schemes / sizeof core_schemes[0]; i++) {
        if (strncmp(addr, core_schemes[i], strlen(core_schemes[i])) == 0) {
            *target = mem_strdup(addr);
            return 0;
        }
    }
    if (strlen(addr) >= ADDR_MAX) {
        fail(err, errsize, "the address is longer than %d bytes", ADDR_MAX - 1);
        return -1;
    }
    if (strchr(addr, ',') != NULL) {
        *is_list = 1;
        return list_target(addr, target, err, errsize);
    }
    host_kind kind;
    if (parse_entry(addr, &kind, err, errsize) != 0)
        return -1;
    *target = mem_strdup(addr);
    return 0;
}

/* The service config (gRPC's JSON) that retries the methods of `retry`
 * (see cli_channel_create), into *out (mem_free); NULL when there are
 * none. Returns 0 or -1 with the path that is not /package.Service/Method
 * in err. */
static int retry_config(const rpc_method *const *retry, char **out, char *err, size_t errsize)
{
    *out = NULL;
    if (retry == NULL || retry[0] == NULL)
        return 0;
    int rc = -1;
    json_object *names = json_object_new_array();
    for (const rpc_method *const *m = retry; *m != NULL; m++) {
        const char *path = (*m)->path;
        const char *slash = path[0] == '/' ? strchr(path + 1, '/') : NULL;
        if (slash == NULL || slash == path + 1 || slash[1] == '\0' || strchr(slash + 1, '/')) {
            fail(err, errsize, "'%s' is not a method path (/package.Service/Method)", path);
            goto out;
        }
        json_object *name = json_object_new_object();
        json_object_object_add(name, "service",
                               json_object_new_string_len(path + 1, (int)(slash - path - 1)));
        json_object_object_add(name, "method", json_object_new_string(slash + 1));
        json_object_array_add(names, name);
    }
    json_object *policy = json_object_new_object();
    json_object_object_add(policy, "maxAttempts", json_object_new_int(RETRY_ATTEMPTS));
    json_object_object_add(policy, "initialBackoff", json_object_new_string(RETRY_BACKOFF));
    json_object_object_add(policy, "maxBackoff", json_object_new_string(RETRY_BACKOFF_MAX));
    json_object_object_add(policy, "backoffMultiplier", json_object_new_int(RETRY_BACKOFF_TIMES));
    json_object *codes = json_object_new_array();
    json_object_array_add(codes, json_object_new_string("UNAVAILABLE"));
    json_object_object_add(policy, "retryableStatusCodes", codes);
    json_object *method = json_object_new_object();
    json_object_object_add(method, "name", json_object_get(names));
    json_object_object_add(method, "retryPolicy", policy);
    json_object *methods = json_object_new_array();
    json_object_array_add(methods, method);
    json_object *throttle = json_object_new_object();
    json_object_object_add(throttle, "maxTokens", json_object_new_int(RETRY_THROTTLE_TOKENS));
    json_object_object_add(throttle, "tokenRatio", json_object_new_double(RETRY_THROTTLE_RATIO));
    json_object *config = json_object_new_object();
    json_object_object_add(config, "methodConfig", methods);
    json_object_object_add(config, "retryThrottling", throttle);
    *out = mem_strdup(json_object_to_json_string_ext(config, JSON_C_TO_STRING_PLAIN));
    json_object_put(config);
    rc = 0;
out:
    json_object_put(names);
    return rc;
}

cli_channel *cli_channel_create(cli *c, const char *addr, const char *service, int round_robin,
                                const rpc_method *const *retry, char *err, size_t errsize)
{
    char *target = NULL, *config = NULL;
    int is_list = 0;
    if (retry_config(retry, &config, err, errsize) != 0)
        return NULL;
    if (peer_target(addr, &target, &is_list, err, errsize) != 0) {
        mem_free(config);
        return NULL;
    }
    if (is_list && (service == NULL || service[0] == '\0')) {
        fail(err, errsize, "a list of replicas needs the name of the service they serve");
        mem_free(target);
        mem_free(config);
        return NULL;
    }
    rpc__args args;
    rpc__args_init(&args, c->max_message_bytes);
    /* A restarted peer is found again within seconds, not the core's
     * default of up to two minutes; and the core's first retry would wait a
     * whole second, when a restarting peer is usually back within a few
     * milliseconds. */
    rpc__args_int(&args, GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
    rpc__args_int(&args, GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
    /* Despite its name the core reads this as the least time one connection
     * attempt may take, the TLS handshake included: at 100 ms, handshakes
     * on a busy machine timed out and were retried over and over. A refused
     * connection still fails (and is retried) at once. */
    rpc__args_int(&args, GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, CONNECT_TIMEOUT_MS);
    /* Pings notice a peer that vanished without closing the connection. */
    rpc__args_int(&args, GRPC_ARG_KEEPALIVE_TIME_MS, 30000);
    rpc__args_int(&args, GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
    if (round_robin)
        rpc__args_str(&args, GRPC_ARG_LB_POLICY_NAME, "round_robin");
    /* No one address of a list names its replicas (the core would make an
     * authority of the whole list): the service's name does, in calls and
     * in TLS, where every replica's certificate is checked against it. */
    if (is_list) {
        rpc__args_str(&args, GRPC_ARG_DEFAULT_AUTHORITY, service);
        if (c->tls != NULL)
            rpc__args_str(&args, GRPC_SSL_TARGET_NAME_OVERRIDE_ARG, service);
    }
    if (config != NULL) {
        rpc__args_int(&args, GRPC_ARG_ENABLE_RETRIES, 1);
        rpc__args_str(&args, GRPC_ARG_SERVICE_CONFIG, config);
    }
    grpc_channel_args cargs = rpc__args_get(&args);
    grpc_channel_credentials *creds = tls__channel_credentials(c->tls);

    cli_channel *ch = mem_calloc(1, sizeof *ch);
    ch->c = c;
    ch->target = mem_strdup(addr);
    ch->channel = grpc_channel_create(target, creds, &cargs);
    grpc_channel_credentials_release(creds);
    mem_free(target);
    mem_free(config);
    pthread_mutex_lock(&c->mu);
    ch->next = c->channels;
    c->channels = ch;
    pthread_mutex_unlock(&c->mu);
    return ch;
}

const char *cli_channel_target(const cli_channel *ch)
{
    return ch->target;
}

void cli_set_tracer(cli *c, otlp *e)
{
    c->tracer = e;
}

void cli_set_metrics(cli *c, metrics *m)
{
    rpcm_destroy(&c->metrics);
    c->metrics = rpcm_create_client(m);
}

static void call_free(cli_call *k)
{
    if (k->send_bb != NULL)
        grpc_byte_buffer_destroy(k->send_bb);
    if (k->recv_bb != NULL)
        grpc_byte_buffer_destroy(k->recv_bb);
    for (size_t i = 0; i < k->nsend_md; i++) {
        grpc_slice_unref(k->send_md[i].key);
        grpc_slice_unref(k->send_md[i].value);
    }
    grpc_metadata_array_destroy(&k->initial_md);
    grpc_metadata_array_destroy(&k->trailing_md);
    grpc_slice_unref(k->details);
    trace_span_end(&k->span); /* ended with the call already; this only frees */
    if (k->call != NULL)
        grpc_call_unref(k->call);
    pthread_mutex_destroy(&k->mu);
    mem_free(k);
}

static void call_unref(cli_call *k)
{
    pthread_mutex_lock(&k->mu);
    int last = --k->refs == 0;
    pthread_mutex_unlock(&k->mu);
    if (last)
        call_free(k);
}

static void add_meta(cli_call *k, const char *key, const char *value)
{
    if (k->nsend_md == MAX_META)
        return;
    k->send_md[k->nsend_md].key = grpc_slice_from_copied_string(key);
    k->send_md[k->nsend_md].value = grpc_slice_from_copied_string(value);
    k->nsend_md++;
}

/* The call's client span, a child of opts' parent or else of the thread's
 * current span (a new trace without either), sent on as traceparent and
 * tracestate. A health check is traced only under a parent. */
static void start_span(cli_call *k, cli_channel *ch, const rpc_method *m, const cli_opts *opts)
{
    const char *method = m->path;
    const trace_span *parent =
        opts != NULL && opts->trace_parent != NULL ? opts->trace_parent : trace_current();
    int traced = parent != NULL && trace_ctx_valid(&parent->ctx);
    /* The standard health service's checks are probes. */
    if (!traced && (m == &grpc__health__v1__health__check__method ||
                    m == &grpc__health__v1__health__watch__method))
        return;
    trace_span_start(&k->span, ch->c->tracer, method[0] == '/' ? method + 1 : method, TRACE_CLIENT,
                     traced ? &parent->ctx : NULL, traced ? parent->state : NULL);
    char tp[TRACE_PARENT_LEN + 1];
    trace_format(&k->span.ctx, tp);
    add_meta(k, "traceparent", tp);
    if (k->span.state != NULL)
        add_meta(k, "tracestate", k->span.state);
    if (!trace_span_recording(&k->span))
        return;
    const char *p = method[0] == '/' ? method + 1 : method;
    const char *slash = strrchr(p, '/');
    char service[256];
    snprintf(service, sizeof service, "%.*s", slash ? (int)(slash - p) : 0, p);
    trace_span_set_str(&k->span, "rpc.system", "grpc");
    trace_span_set_str(&k->span, "rpc.service", service);
    trace_span_set_str(&k->span, "rpc.method", slash ? slash + 1 : p);
    trace_span_set_str(&k->span, "server.address", ch->target);
    if (opts != NULL && opts->request_id != NULL)
        trace_span_set_str(&k->span, "convo.request_id", opts->request_id);
    for (size_t i = 0; opts != NULL && i < opts->n_trace_links; i++)
        trace_span_link(&k->span, &opts->trace_links[i]);
}

/* Everything both call kinds share up to the first batch. On failure the
 * call is freed and nothing fires. */
static int call_create(cli_channel *ch, const rpc_method *method, rpc_kind kind,
                       const ProtobufCMessage *req, const cli_opts *opts, cli_done_fn done,
                       void *arg, cli_call **kp)
{
    cli *c = ch->c;
    if (method == NULL || method->kind != kind || req->descriptor != method->request) {
        log_error("cli: %s called %s with a %s", method != NULL ? method->path : "(no method)",
                  kind == RPC_UNARY ? "as a unary call" : "as a server stream",
                  req->descriptor->name);
        return RPC_EARG;
    }
    grpc_byte_buffer *bb = rpc__encode(req);
    if (bb == NULL)
        return RPC_EENCODE;

    cli_call *k = mem_calloc(1, sizeof *k);
    k->c = c;
    k->resp_desc = method->response;
    k->done = done;
    k->arg = arg;
    k->send_bb = bb;
    k->details = grpc_empty_slice();
    pthread_mutex_init(&k->mu, NULL);
    grpc_metadata_array_init(&k->initial_md);
    grpc_metadata_array_init(&k->trailing_md);
    if (opts != NULL && opts->request_id != NULL)
        add_meta(k, "x-request-id", opts->request_id);
    start_span(k, ch, method, opts);
    for (const char *const *m = opts != NULL ? opts->meta : NULL; m != NULL && m[0] && m[1]; m += 2)
        add_meta(k, m[0], m[1]);

    gpr_timespec deadline = gpr_inf_future(GPR_CLOCK_REALTIME);
    if (opts != NULL && opts->timeout_ms > 0)
        deadline = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                gpr_time_from_millis(opts->timeout_ms, GPR_TIMESPAN));
    /* A call started from a callback stays on that callback's thread (see
     * cli.h); any other goes to the next thread in turn. */
    cq_thread *t = this_thread != NULL && this_thread->owner == c
                       ? this_thread
                       : &c->threads[atomic_fetch_add(&c->next_thread, 1) % c->nthreads];
    grpc_slice path = grpc_slice_from_copied_string(method->path);

    pthread_mutex_lock(&c->mu);
    if (c->closing) {
        pthread_mutex_unlock(&c->mu);
        grpc_slice_unref(path);
        call_free(k);
        return RPC_ESHUTDOWN;
    }
    k->call = grpc_channel_create_call(ch->channel, NULL, GRPC_PROPAGATE_DEFAULTS, t->cq, path,
                                       NULL, deadline, NULL);
    grpc_slice_unref(path);
    k->next = c->calls;
    if (c->calls != NULL)
        c->calls->prev = k;
    c->calls = k;
    c->ncalls++;
    pthread_mutex_unlock(&c->mu);
    k->pm = rpcm_method_get(c->metrics, method->path);
    k->started_us = rpcm_start(k->pm);
    *kp = k;
    return 0;
}

static void unlink_call(cli_call *k)
{
    cli *c = k->c;
    pthread_mutex_lock(&c->mu);
    if (k->prev != NULL)
        k->prev->next = k->next;
    else
        c->calls = k->next;
    if (k->next != NULL)
        k->next->prev = k->prev;
    if (--c->ncalls == 0)
        pthread_cond_broadcast(&c->idle);
    pthread_mutex_unlock(&c->mu);
}

/* Fires done once, with the decoded response for a successful unary call. */
static void call_finish(cli_call *k)
{
    rpc_code code = (rpc_code)k->status;
    ProtobufCMessage *resp = NULL;
    char *message =
        mem_strndup((const char *)GRPC_SLICE_START_PTR(k->details), GRPC_SLICE_LENGTH(k->details));
    if (code == RPC_OK && !k->streaming) {
        resp = k->recv_bb != NULL ? rpc__decode(k->recv_bb, k->resp_desc, NULL, 0) : NULL;
        if (resp == NULL) {
            code = RPC_INTERNAL;
            mem_free(message);
            message = mem_strdup("the server's response could not be decoded");
        }
    }
    unlink_call(k);
    rpcm_end(k->pm, k->started_us, code);
    trace_span_set_int(&k->span, "rpc.grpc.status_code", code);
    if (code != RPC_OK)
        trace_span_error(&k->span, "%s: %s", rpc_code_name(code), message);
    trace_span_end(&k->span);
    k->done(k->arg, code, message, resp);
    mem_free(message);
}

static int start_batch(cli_call *k, grpc_op *ops, size_t n, rpc__tag *tag)
{
    pthread_mutex_lock(&k->mu);
    k->refs++;
    pthread_mutex_unlock(&k->mu);
    if (grpc_call_start_batch(k->call, ops, n, tag, NULL) != GRPC_CALL_OK) {
        call_unref(k);
        return RPC_ECALL;
    }
    return 0;
}

static void fill_send_ops(cli_call *k, grpc_op *ops, const cli_opts *opts)
{
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = k->nsend_md;
    ops[0].data.send_initial_metadata.metadata = k->send_md;
    if (opts != NULL && opts->wait_for_ready)
        ops[0].flags = GRPC_INITIAL_METADATA_WAIT_FOR_READY |
                       GRPC_INITIAL_METADATA_WAIT_FOR_READY_EXPLICITLY_SET;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = k->send_bb;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &k->initial_md;
}

/* A start failed after the call was created: nothing may fire. */
static int abandon(cli_call *k, cli_call **out, int rc)
{
    unlink_call(k);
    rpcm_forget(k->pm);
    log_error("grpc_call_start_batch failed; the call was not started");
    if (out != NULL) {
        *out = NULL;
        call_unref(k);
    }
    call_unref(k);
    return rc;
}

static void on_unary_done(rpc__tag *tag, int ok)
{
    cli_call *k = rpc__container_of(tag, cli_call, main_tag);
    call_finish(k);
    call_unref(k);
}

int cli_unary(cli_channel *ch, const rpc_method *method, const ProtobufCMessage *req,
              const cli_opts *opts, cli_done_fn done, void *arg, cli_call **out)
{
    cli_call *k = NULL;
    int rc = call_create(ch, method, RPC_UNARY, req, opts, done, arg, &k);
    if (rc != 0)
        return rc;
    /* One reference while this function sets the call up, one for the
     * caller's handle; each batch in flight holds its own. */
    k->refs = 1;
    if (out != NULL) {
        k->refs++;
        *out = k;
    }
    k->main_tag.fn = on_unary_done;

    grpc_op ops[6];
    memset(ops, 0, sizeof ops);
    fill_send_ops(k, ops, opts);
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &k->recv_bb;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &k->trailing_md;
    ops[5].data.recv_status_on_client.status = &k->status;
    ops[5].data.recv_status_on_client.status_details = &k->details;
    rc = start_batch(k, ops, 6, &k->main_tag);
    if (rc != 0)
        return abandon(k, out, rc);
    call_unref(k);
    return 0;
}

/* ---- streams -------------------------------------------------------- */

/* Fires done when both the status is in and no more messages will be
 * delivered: the stream ended, or the call failed (unread messages of a
 * failed call are dropped), and no read is in flight. k->mu held; returns
 * whether the caller must fire. */
static int stream_should_finish_locked(cli_call *k)
{
    if (k->done_fired || !k->have_status || k->reading)
        return 0;
    if (!k->stream_ended && k->status == GRPC_STATUS_OK)
        return 0;
    k->done_fired = 1;
    return 1;
}

static void stream_read_locked(cli_call *k)
{
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &k->recv_bb;
    k->reading = 1;
    k->refs++;
    if (grpc_call_start_batch(k->call, &op, 1, &k->recv_tag, NULL) != GRPC_CALL_OK) {
        k->reading = 0;
        k->stream_ended = 1;
        k->refs--;
    }
}

static void on_stream_msg(rpc__tag *tag, int ok)
{
    cli_call *k = rpc__container_of(tag, cli_call, recv_tag);
    grpc_byte_buffer *bb = k->recv_bb;
    k->recv_bb = NULL;
    int pause = 0;
    int bad = 0;

    if (ok && bb != NULL) {
        ProtobufCMessage *msg = rpc__decode(bb, k->resp_desc, NULL, 0);
        rpcm_received(k->pm);
        if (msg == NULL) {
            bad = 1;
        } else {
            pause = k->on_msg(k->arg, msg);
            protobuf_c_message_free_unpacked(msg, NULL);
        }
        grpc_byte_buffer_destroy(bb);
    }
    if (bad) {
        grpc_call_cancel_with_status(k->call, GRPC_STATUS_INTERNAL,
                                     "a streamed message could not be decoded", NULL);
    }

    pthread_mutex_lock(&k->mu);
    k->reading = 0;
    if (!ok || bb == NULL || bad) {
        k->stream_ended = 1;
    } else if (pause && !k->resume_asked) {
        k->paused = 1;
    } else {
        /* A resume that raced with the callback asking to pause wins, so
         * a stream is never left paused with nobody to resume it. */
        k->resume_asked = 0;
        stream_read_locked(k);
    }
    int finish = stream_should_finish_locked(k);
    pthread_mutex_unlock(&k->mu);
    if (finish)
        call_finish(k);
    call_unref(k);
}

static void on_stream_status(rpc__tag *tag, int ok)
{
    cli_call *k = rpc__container_of(tag, cli_call, status_tag);
    pthread_mutex_lock(&k->mu);
    k->have_status = 1;
    int finish = stream_should_finish_locked(k);
    pthread_mutex_unlock(&k->mu);
    if (finish)
        call_finish(k);
    call_unref(k);
}

static void on_stream_sent(rpc__tag *tag, int ok)
{
    cli_call *k = rpc__container_of(tag, cli_call, main_tag);
    call_unref(k);
}

int cli_stream(cli_channel *ch, const rpc_method *method, const ProtobufCMessage *req,
               const cli_opts *opts, cli_msg_fn on_msg, cli_done_fn done, void *arg, cli_call **out)
{
    cli_call *k = NULL;
    int rc = call_create(ch, method, RPC_SERVER_STREAM, req, opts, done, arg, &k);
    if (rc != 0)
        return rc;
    k->streaming = 1;
    k->on_msg = on_msg;
    k->refs = 1;
    if (out != NULL) {
        k->refs++;
        *out = k;
    }
    k->main_tag.fn = on_stream_sent;
    k->status_tag.fn = on_stream_status;
    k->recv_tag.fn = on_stream_msg;

    grpc_op ops[4];
    memset(ops, 0, sizeof ops);
    fill_send_ops(k, ops, opts);
    rc = start_batch(k, ops, 4, &k->main_tag);
    if (rc != 0)
        return abandon(k, out, rc);

    grpc_op st;
    memset(&st, 0, sizeof st);
    st.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    st.data.recv_status_on_client.trailing_metadata = &k->trailing_md;
    st.data.recv_status_on_client.status = &k->status;
    st.data.recv_status_on_client.status_details = &k->details;
    /* The core accepts the status op once the send batch is accepted; a
     * failure here is a bug in this file. */
    if (start_batch(k, &st, 1, &k->status_tag) != 0)
        log_error("grpc_call_start_batch(status) failed");

    pthread_mutex_lock(&k->mu);
    stream_read_locked(k);
    pthread_mutex_unlock(&k->mu);
    call_unref(k);
    return 0;
}

void cli_call_cancel(cli_call *k)
{
    grpc_call_cancel(k->call, NULL);
}

void cli_call_resume(cli_call *k)
{
    pthread_mutex_lock(&k->mu);
    if (k->paused && !k->reading && !k->stream_ended) {
        k->paused = 0;
        stream_read_locked(k);
    } else if (k->reading) {
        k->resume_asked = 1;
    }
    pthread_mutex_unlock(&k->mu);
}

void cli_call_release(cli_call **kp)
{
    if (*kp == NULL)
        return;
    call_unref(*kp);
    *kp = NULL;
}

/* ---- blocking ------------------------------------------------------- */

typedef struct sync_wait {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done;
    rpc_code code;
    char *message;
    ProtobufCMessage *resp;
} sync_wait;

static void on_sync_done(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp)
{
    sync_wait *w = arg;
    pthread_mutex_lock(&w->mu);
    w->code = code;
    w->message = mem_strdup(message != NULL ? message : "");
    w->resp = resp;
    w->done = 1;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

rpc_code cli_unary_sync(cli_channel *ch, const rpc_method *method, const ProtobufCMessage *req,
                        const cli_opts *opts, ProtobufCMessage **resp, char **message)
{
    sync_wait w = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};
    *resp = NULL;
    if (message != NULL)
        *message = NULL;
    int rc = cli_unary(ch, method, req, opts, on_sync_done, &w, NULL);
    if (rc != 0) {
        if (message != NULL)
            *message = mem_strdup(rpc_strerror(rc));
        return RPC_INTERNAL;
    }
    pthread_mutex_lock(&w.mu);
    while (!w.done)
        pthread_cond_wait(&w.cv, &w.mu);
    pthread_mutex_unlock(&w.mu);
    *resp = w.resp;
    if (message != NULL)
        *message = w.message;
    else
        mem_free(w.message);
    return w.code;
}

void cli_destroy(cli **cp)
{
    cli *c = *cp;
    if (c == NULL)
        return;
    *cp = NULL;
    pthread_mutex_lock(&c->mu);
    c->closing = 1;
    for (cli_call *k = c->calls; k != NULL; k = k->next)
        grpc_call_cancel(k->call, NULL);
    while (c->ncalls > 0)
        pthread_cond_wait(&c->idle, &c->mu);
    pthread_mutex_unlock(&c->mu);

    for (cli_channel *ch = c->channels, *next; ch != NULL; ch = next) {
        next = ch->next;
        grpc_channel_destroy(ch->channel);
        mem_free(ch->target);
        mem_free(ch);
    }
    for (size_t i = 0; i < c->nthreads; i++)
        grpc_completion_queue_shutdown(c->threads[i].cq);
    for (size_t i = 0; i < c->nthreads; i++) {
        pthread_join(c->threads[i].tid, NULL);
        grpc_completion_queue_destroy(c->threads[i].cq);
    }
    mem_free(c->threads);
    rpcm_destroy(&c->metrics);
    pthread_cond_destroy(&c->idle);
    pthread_mutex_destroy(&c->mu);
    mem_free(c);
    rpc__grpc_unref();
}
