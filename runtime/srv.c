#include "srv.h"

#include "log.h"
#include "mem.h"
#include "rpc_internal.h"
#include "rpcm.h"
#include "trace.h"

#include <errno.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/signalfd.h>
#include <unistd.h>

/* Calls requested from the core ahead of time per method and queue, so a
 * burst of arrivals does not wait for the handler thread to re-request. */
#define SLOTS_PER_METHOD 8

/* A call the client gave up on this close to its deadline is counted as
 * DEADLINE_EXCEEDED, not CANCELLED. */
#define DEADLINE_SLACK_MS 100

typedef struct method_entry {
    srv_method m;
    void *data;
    void *handle;   /* from grpc_server_register_method */
    char **callers; /* the names allowed under mutual TLS */
    size_t ncallers;
    int any_caller; /* "*" */
    rpcm_method *pm;
} method_entry;

typedef struct cq_thread {
    grpc_completion_queue *cq;
    pthread_t tid;
} cq_thread;

/* One outstanding grpc_server_request_registered_call. */
typedef struct slot {
    rpc__tag tag;
    srv *s;
    method_entry *method;
    cq_thread *thread;
    grpc_call *call;
    gpr_timespec deadline;
    grpc_metadata_array md;
    grpc_byte_buffer *payload;
} slot;

struct srv {
    char *name;
    char *listen;
    srv_opts opts;
    grpc_server *server;
    cq_thread *threads;
    size_t nthreads;
    method_entry **methods;
    size_t nmethods;
    slot **slots;
    size_t nslots;
    int port;
    tls *tls; /* NULL: plaintext, every method open */
    atomic_ulong denied;
    int started;
    int threads_started;
    atomic_int active_calls;
    int stop_fd; /* eventfd written by srv_stop */
    rpc__tag shutdown_tag;
    pthread_mutex_t shutdown_mu;
    pthread_cond_t shutdown_cv;
    int shutdown_done;
    const srv_hooks *hooks; /* NULL: none attached */
    void *hooks_arg;
    rpcm *metrics; /* NULL: not counted */
    otlp *tracer;  /* NULL: spans not recorded */
};

typedef struct out_msg {
    grpc_byte_buffer *bb;
    struct out_msg *next;
} out_msg;

typedef struct meta_kv {
    char *key;
    char *value;
} meta_kv;

struct srv_call {
    srv *s;
    method_entry *method;
    grpc_call *call;
    gpr_timespec deadline;
    meta_kv *meta;
    size_t nmeta;
    char *request_id;
    void *data;
    uint64_t started_us; /* for the call's duration metric */
    trace_span span;     /* the server span; zeroed for untraced health checks */

    pthread_mutex_t mu;
    int refs;
    out_msg *head, *tail;
    size_t queued;
    grpc_byte_buffer *in_flight; /* the message being written */
    int writing;                 /* a send batch is in flight */
    int sent_headers;
    int finished;    /* the handler called srv_call_finish */
    int status_sent; /* the status batch was started */
    rpc_code code;
    char *status_message;
    grpc_slice status_slice;
    grpc_byte_buffer *response; /* unary response, sent with the status */
    int want_writable;
    atomic_int cancelled;
    void (*on_writable)(srv_call *);
    void (*on_cancel)(srv_call *);

    rpc__tag close_tag;
    int close_cancelled; /* filled by RECV_CLOSE_ON_SERVER */
    rpc__tag write_tag;
    rpc__tag recv_tag;
    grpc_byte_buffer *recv_bb;
};

static void slot_request(slot *sl);

/* A call to a method nobody registered: answered UNIMPLEMENTED at once
 * (otherwise the core would hold it until its deadline). */
typedef struct unknown_slot {
    rpc__tag tag;
    rpc__tag done_tag;
    srv *s;
    cq_thread *thread;
    grpc_call *call;
    grpc_call_details details;
    grpc_metadata_array md;
    grpc_slice status;
    int cancelled;
} unknown_slot;

static void unknown_request(unknown_slot *u);

/* ---- call lifetime -------------------------------------------------- */

static void call_unref_locked_release(srv_call *c);

static void call_ref(srv_call *c)
{
    pthread_mutex_lock(&c->mu);
    c->refs++;
    pthread_mutex_unlock(&c->mu);
}

static void call_free(srv_call *c)
{
    for (out_msg *m = c->head, *next; m != NULL; m = next) {
        next = m->next;
        grpc_byte_buffer_destroy(m->bb);
        mem_free(m);
    }
    if (c->response != NULL)
        grpc_byte_buffer_destroy(c->response);
    if (c->status_sent)
        grpc_slice_unref(c->status_slice);
    for (size_t i = 0; i < c->nmeta; i++) {
        mem_free(c->meta[i].key);
        mem_free(c->meta[i].value);
    }
    mem_free(c->meta);
    mem_free(c->request_id);
    mem_free(c->status_message);
    trace_span_end(&c->span); /* ended at finish already; this only frees */
    grpc_call_unref(c->call);
    pthread_mutex_destroy(&c->mu);
    atomic_fetch_sub(&c->s->active_calls, 1);
    mem_free(c);
}

/* Drops one reference; c->mu must be held and is released. */
static void call_unref_locked_release(srv_call *c)
{
    int last = --c->refs == 0;
    pthread_mutex_unlock(&c->mu);
    if (last)
        call_free(c);
}

static void call_unref(srv_call *c)
{
    pthread_mutex_lock(&c->mu);
    call_unref_locked_release(c);
}

/* Around every handler callback: its log lines name the call's request
 * and span, and calls it makes are the span's children. */
static void with_log_context(srv_call *c)
{
    log_context_set(c->request_id, NULL);
    trace_set_current(&c->span);
}

static void without_log_context(void)
{
    log_context_set(NULL, NULL);
    trace_set_current(NULL);
}

/* ---- writing -------------------------------------------------------- */

/* Starts the next send batch if none is in flight: a queued message, or
 * once the queue is empty and the handler finished, the status. c->mu held. */
static void call_pump_locked(srv_call *c)
{
    if (c->writing || c->status_sent)
        return;
    if (atomic_load(&c->cancelled)) {
        /* Nothing will reach the client; the status batch is skipped too. */
        return;
    }
    grpc_op ops[3];
    size_t n = 0;
    memset(ops, 0, sizeof ops);
    if (!c->sent_headers) {
        ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
        ops[n].data.send_initial_metadata.count = 0;
        n++;
    }
    if (c->head != NULL) {
        out_msg *m = c->head;
        c->head = m->next;
        if (c->head == NULL)
            c->tail = NULL;
        c->queued--;
        c->in_flight = m->bb;
        mem_free(m);
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].data.send_message.send_message = c->in_flight;
        /* More are queued right behind it (a burst of tokens): the transport
         * may gather them into one write. The last one, unhinted, flushes,
         * so nothing waits on the wire for a message that may never come. */
        if (c->head != NULL || c->finished)
            ops[n].flags = GRPC_WRITE_BUFFER_HINT;
        n++;
    } else if (c->finished) {
        if (c->response != NULL) {
            c->in_flight = c->response;
            c->response = NULL;
            ops[n].op = GRPC_OP_SEND_MESSAGE;
            ops[n].data.send_message.send_message = c->in_flight;
            n++;
        }
        c->status_slice =
            grpc_slice_from_copied_string(c->status_message != NULL ? c->status_message : "");
        ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
        ops[n].data.send_status_from_server.status = (grpc_status_code)c->code;
        ops[n].data.send_status_from_server.status_details = &c->status_slice;
        ops[n].data.send_status_from_server.trailing_metadata_count = 0;
        n++;
        c->status_sent = 1;
    } else {
        return;
    }
    c->sent_headers = 1;
    c->writing = 1;
    c->refs++;
    grpc_call_error err = grpc_call_start_batch(c->call, ops, n, &c->write_tag, NULL);
    if (err != GRPC_CALL_OK) {
        log_error("grpc_call_start_batch(send) failed: %d", (int)err);
        c->writing = 0;
        c->refs--;
        if (c->in_flight != NULL) {
            grpc_byte_buffer_destroy(c->in_flight);
            c->in_flight = NULL;
        }
    }
}

static void on_write_done(rpc__tag *tag, int ok)
{
    srv_call *c = rpc__container_of(tag, srv_call, write_tag);
    void (*writable)(srv_call *) = NULL;

    pthread_mutex_lock(&c->mu);
    c->writing = 0;
    if (c->in_flight != NULL) {
        grpc_byte_buffer_destroy(c->in_flight);
        c->in_flight = NULL;
    }
    if (!ok)
        atomic_store(&c->cancelled, 1);
    call_pump_locked(c);
    if (c->want_writable && !c->finished &&
        (atomic_load(&c->cancelled) || c->queued <= (size_t)c->s->opts.max_queued_writes / 2)) {
        c->want_writable = 0;
        writable = c->on_writable;
    }
    pthread_mutex_unlock(&c->mu);

    if (writable != NULL) {
        with_log_context(c);
        writable(c);
        without_log_context();
    }
    call_unref(c);
}

int srv_call_send(srv_call *c, const ProtobufCMessage *msg)
{
    int rc = 0;
    pthread_mutex_lock(&c->mu);
    if (c->finished || atomic_load(&c->cancelled)) {
        rc = RPC_EDONE;
        goto out;
    }
    if (msg->descriptor != c->method->m.method->response) {
        log_error("%s: a %s sent on %s, which streams %s", c->s->name, msg->descriptor->name,
                  c->method->m.method->path, c->method->m.method->response->name);
        rc = RPC_EARG;
        goto out;
    }
    if (c->queued >= (size_t)c->s->opts.max_queued_writes) {
        c->want_writable = 1;
        rc = RPC_EFULL;
        goto out;
    }
    grpc_byte_buffer *bb = rpc__encode(msg);
    if (bb == NULL) {
        rc = RPC_EENCODE;
        goto out;
    }
    out_msg *m = mem_alloc(sizeof *m);
    m->bb = bb;
    m->next = NULL;
    if (c->tail != NULL)
        c->tail->next = m;
    else
        c->head = m;
    c->tail = m;
    c->queued++;
    call_pump_locked(c);
    rpcm_sent(c->method->pm);
out:
    pthread_mutex_unlock(&c->mu);
    return rc;
}

/* The status a call's metrics count: what the client saw, when it was
 * gone before the handler finished (the handler's code never reached it).
 * A client's deadline usually cuts the call a little before the server's
 * copy of it runs out (the copy started when the request arrived). */
static rpc_code metric_code(srv_call *c, rpc_code code)
{
    if (!atomic_load(&c->cancelled))
        return code;
    return srv_call_remaining_ms(c) <= DEADLINE_SLACK_MS ? RPC_DEADLINE_EXCEEDED : RPC_CANCELLED;
}

/* Whether a code says the server failed (OpenTelemetry's rule for server
 * spans: a client's mistake is not the server's error). */
static int server_error(rpc_code code)
{
    return code == RPC_UNKNOWN || code == RPC_DEADLINE_EXCEEDED || code == RPC_UNIMPLEMENTED ||
           code == RPC_INTERNAL || code == RPC_UNAVAILABLE || code == RPC_DATA_LOSS;
}

static void end_span(srv_call *c, rpc_code code, const char *message)
{
    trace_span_set_int(&c->span, "rpc.grpc.status_code", code);
    if (server_error(code))
        trace_span_error(&c->span, "%s: %s", rpc_code_name(code), message ? message : "");
    trace_span_end(&c->span);
}

void srv_call_finish(srv_call *c, rpc_code code, const char *message, const ProtobufCMessage *resp)
{
    grpc_byte_buffer *bb = NULL;
    const rpc_method *rm = c->method->m.method;
    if (resp != NULL && code == RPC_OK && resp->descriptor != rm->response) {
        log_error("%s: %s answered with a %s instead of a %s", c->s->name, rm->path,
                  resp->descriptor->name, rm->response->name);
        code = RPC_INTERNAL;
        message = "the server answered with the wrong message type";
    } else if (resp != NULL && code == RPC_OK) {
        bb = rpc__encode(resp);
        if (bb == NULL) {
            code = RPC_INTERNAL;
            message = "the response could not be serialized";
        }
    }
    pthread_mutex_lock(&c->mu);
    if (c->finished) {
        pthread_mutex_unlock(&c->mu);
        log_error("srv_call_finish called twice on one call; the second is ignored");
        if (bb != NULL)
            grpc_byte_buffer_destroy(bb);
        return;
    }
    c->finished = 1;
    c->code = code;
    rpcm_end(c->method->pm, c->started_us, metric_code(c, code));
    end_span(c, metric_code(c, code), message);
    c->status_message = message != NULL ? mem_strdup(message) : NULL;
    c->response = bb;
    call_pump_locked(c);
    /* The handler's reference ends here. */
    call_unref_locked_release(c);
}

void srv_call_finishf(srv_call *c, rpc_code code, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    srv_call_finish(c, code, buf, NULL);
}

/* ---- close / cancellation ------------------------------------------- */

static void on_close(rpc__tag *tag, int ok)
{
    srv_call *c = rpc__container_of(tag, srv_call, close_tag);
    void (*cancel)(srv_call *) = NULL;
    void (*writable)(srv_call *) = NULL;

    pthread_mutex_lock(&c->mu);
    if (c->close_cancelled || !ok) {
        atomic_store(&c->cancelled, 1);
        if (!c->finished) {
            cancel = c->on_cancel;
            if (c->want_writable) {
                /* A sender waiting for room learns the call is gone. */
                c->want_writable = 0;
                writable = c->on_writable;
            }
        }
    }
    pthread_mutex_unlock(&c->mu);

    with_log_context(c);
    if (cancel != NULL)
        cancel(c);
    else if (writable != NULL)
        writable(c);
    without_log_context();
    call_unref(c);
}

void srv_call_on_writable(srv_call *c, void (*fn)(srv_call *))
{
    pthread_mutex_lock(&c->mu);
    c->on_writable = fn;
    pthread_mutex_unlock(&c->mu);
}

void srv_call_on_cancel(srv_call *c, void (*fn)(srv_call *))
{
    pthread_mutex_lock(&c->mu);
    c->on_cancel = fn;
    pthread_mutex_unlock(&c->mu);
}

int srv_call_cancelled(srv_call *c)
{
    return atomic_load(&c->cancelled);
}

int64_t srv_call_remaining_ms(srv_call *c)
{
    gpr_timespec dl = gpr_convert_clock_type(c->deadline, GPR_CLOCK_MONOTONIC);
    if (gpr_time_cmp(dl, gpr_inf_future(GPR_CLOCK_MONOTONIC)) == 0)
        return INT64_MAX;
    gpr_timespec left = gpr_time_sub(dl, gpr_now(GPR_CLOCK_MONOTONIC));
    int64_t ms = (int64_t)left.tv_sec * 1000 + left.tv_nsec / 1000000;
    return ms < 0 ? 0 : ms;
}

const char *srv_call_request_id(srv_call *c)
{
    return c->request_id;
}

const trace_span *srv_call_span(srv_call *c)
{
    return &c->span;
}

/* The first value of a request metadata key (lower case), or NULL. */
static const char *call_metadata(srv_call *c, const char *key)
{
    for (size_t i = 0; i < c->nmeta; i++)
        if (strcmp(c->meta[i].key, key) == 0)
            return c->meta[i].value;
    return NULL;
}

void *srv_call_data(srv_call *c)
{
    return c->data;
}

void srv_call_set_data(srv_call *c, void *data)
{
    c->data = data;
}

void *srv_call_method_data(srv_call *c)
{
    return c->method->data;
}

/* A request that does not decode, or that holds a string protobuf-c would
 * cut short, is refused here: the handler never sees it. */
static void refuse_undecodable(srv_call *c, const srv_method *m, const char *nul_field)
{
    if (nul_field[0] != '\0')
        srv_call_finishf(c, RPC_INVALID_ARGUMENT, "field %s of %s contains a NUL character",
                         nul_field, m->method->request->name);
    else
        srv_call_finishf(c, RPC_INVALID_ARGUMENT, "the request is not a valid %s",
                         m->method->request->name);
}

/* ---- client streaming ----------------------------------------------- */

static void call_start_recv(srv_call *c)
{
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &c->recv_bb;
    call_ref(c);
    if (grpc_call_start_batch(c->call, &op, 1, &c->recv_tag, NULL) != GRPC_CALL_OK) {
        log_error("grpc_call_start_batch(recv) failed");
        call_unref(c);
    }
}

static void on_recv(rpc__tag *tag, int ok)
{
    srv_call *c = rpc__container_of(tag, srv_call, recv_tag);
    grpc_byte_buffer *bb = c->recv_bb;
    c->recv_bb = NULL;
    const srv_method *m = &c->method->m;

    with_log_context(c);
    if (!ok || atomic_load(&c->cancelled)) {
        /* The close tag reports the cancellation. */
    } else if (bb == NULL) {
        m->on_end(c);
    } else {
        char nul[128] = "";
        ProtobufCMessage *msg = rpc__decode(bb, m->method->request, nul, sizeof nul);
        rpcm_received(c->method->pm);
        if (msg == NULL) {
            refuse_undecodable(c, m, nul);
        } else {
            m->on_message(c, msg);
            protobuf_c_message_free_unpacked(msg, NULL);
            pthread_mutex_lock(&c->mu);
            int more = !c->finished;
            pthread_mutex_unlock(&c->mu);
            if (more)
                call_start_recv(c);
        }
    }
    without_log_context();
    if (bb != NULL)
        grpc_byte_buffer_destroy(bb);
    call_unref(c);
}

/* ---- arrival -------------------------------------------------------- */

static char *slice_strdup(grpc_slice s)
{
    return mem_strndup((const char *)GRPC_SLICE_START_PTR(s), GRPC_SLICE_LENGTH(s));
}

static char *make_request_id(void)
{
    unsigned char raw[8];
    if (getrandom(raw, sizeof raw, GRND_NONBLOCK) != (ssize_t)sizeof raw)
        memset(raw, 0, sizeof raw);
    char *id = mem_alloc(2 * sizeof raw + 1);
    for (size_t i = 0; i < sizeof raw; i++)
        snprintf(id + 2 * i, 3, "%02x", raw[i]);
    return id;
}

/* The call's server span, a child of the caller's traceparent (a new
 * trace without one, unless the method is traced only under a parent). */
static void start_span(srv_call *c)
{
    const char *path = c->method->m.method->path;
    const char *tp = call_metadata(c, "traceparent");
    if (tp == NULL && c->method->m.trace_only_with_parent)
        return;
    trace_span_start_remote(&c->span, c->s->tracer, path + 1, TRACE_SERVER, tp,
                            call_metadata(c, "tracestate"));
    if (!trace_span_recording(&c->span))
        return;
    const char *slash = strrchr(path, '/');
    char service[256];
    snprintf(service, sizeof service, "%.*s", (int)(slash - path - 1), path + 1);
    trace_span_set_str(&c->span, "rpc.system", "grpc");
    trace_span_set_str(&c->span, "rpc.service", service);
    trace_span_set_str(&c->span, "rpc.method", slash + 1);
    trace_span_set_str(&c->span, "convo.request_id", c->request_id);
}

static srv_call *call_create(slot *sl)
{
    srv_call *c = mem_calloc(1, sizeof *c);
    c->s = sl->s;
    c->method = sl->method;
    c->call = sl->call;
    c->deadline = sl->deadline;
    pthread_mutex_init(&c->mu, NULL);
    /* One reference for the handler (until finish), one for the close op. */
    c->refs = 2;
    c->close_tag.fn = on_close;
    c->write_tag.fn = on_write_done;
    c->recv_tag.fn = on_recv;
    atomic_fetch_add(&c->s->active_calls, 1);
    c->started_us = rpcm_start(c->method->pm);

    c->nmeta = sl->md.count;
    c->meta = mem_calloc(c->nmeta ? c->nmeta : 1, sizeof *c->meta);
    for (size_t i = 0; i < sl->md.count; i++) {
        c->meta[i].key = slice_strdup(sl->md.metadata[i].key);
        c->meta[i].value = slice_strdup(sl->md.metadata[i].value);
    }
    const char *rid = call_metadata(c, "x-request-id");
    c->request_id = rid != NULL && rid[0] != '\0' ? mem_strndup(rid, 64) : make_request_id();
    start_span(c);
    return c;
}

/* Under mutual TLS, whether the caller's certificate names a caller the
 * method allows; if not, the call is answered PERMISSION_DENIED here. A
 * call without a certificate came in on the --health-listen port: the
 * methods marked without_certificate only. */
static int caller_allowed(srv_call *c)
{
    const method_entry *e = c->method;
    char name[TLS_NAME_MAX + 1];
    if (!tls__caller(c->call, name)) {
        if (e->m.without_certificate)
            return 1;
        srv_call_finishf(c, RPC_UNAUTHENTICATED,
                         "no client certificate: only grpc.health.v1 is answered without one");
        return 0;
    }
    if (e->any_caller)
        return 1;
    for (size_t i = 0; i < e->ncallers; i++)
        if (strcmp(e->callers[i], name) == 0)
            return 1;
    unsigned long n = atomic_fetch_add(&c->s->denied, 1) + 1;
    const log_field f[] = {{"caller", name}, {"method", e->m.method->path}, {NULL, NULL}};
    log_fields(LOG_WARN, f,
               "%s: permission denied: caller '%s' may not call %s (%lu refused so far)",
               c->s->name, name[0] ? name : "(no DNS name)", e->m.method->path, n);
    srv_call_finishf(c, RPC_PERMISSION_DENIED, "caller '%s' may not call %s", name,
                     e->m.method->path);
    return 0;
}

static void on_call_arrived(rpc__tag *tag, int ok)
{
    slot *sl = rpc__container_of(tag, slot, tag);
    srv *s = sl->s;
    if (!ok) {
        /* The server is shutting down: this slot is done. */
        grpc_metadata_array_destroy(&sl->md);
        mem_free(sl);
        return;
    }

    srv_call *c = call_create(sl);
    grpc_byte_buffer *payload = sl->payload;
    sl->payload = NULL;
    grpc_metadata_array_destroy(&sl->md);
    slot_request(sl);

    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &c->close_cancelled;
    if (grpc_call_start_batch(c->call, &op, 1, &c->close_tag, NULL) != GRPC_CALL_OK) {
        log_error("grpc_call_start_batch(close) failed; dropping the call");
        c->refs = 1;
        srv_call_finish(c, RPC_INTERNAL, "internal error", NULL);
        goto out;
    }

    const srv_method *m = &c->method->m;
    with_log_context(c);
    if (s->tls != NULL && !caller_allowed(c)) {
        /* refused by caller_allowed */
    } else if (atomic_load(&s->active_calls) > s->opts.max_calls) {
        log_warn("refusing %s: %lld calls in progress (--max-calls)", m->method->path,
                 s->opts.max_calls);
        srv_call_finishf(c, RPC_RESOURCE_EXHAUSTED,
                         "the server is handling its maximum of %lld calls; retry later",
                         s->opts.max_calls);
    } else if (m->method->kind == RPC_CLIENT_STREAM) {
        m->on_call(c, NULL);
        pthread_mutex_lock(&c->mu);
        int more = !c->finished;
        pthread_mutex_unlock(&c->mu);
        if (more)
            call_start_recv(c);
    } else {
        char nul[128] = "";
        ProtobufCMessage *req =
            payload != NULL ? rpc__decode(payload, m->method->request, nul, sizeof nul) : NULL;
        if (req == NULL) {
            refuse_undecodable(c, m, nul);
        } else {
            m->on_call(c, req);
            protobuf_c_message_free_unpacked(req, NULL);
        }
    }
    without_log_context();
out:
    if (payload != NULL)
        grpc_byte_buffer_destroy(payload);
}

static void slot_request(slot *sl)
{
    grpc_metadata_array_init(&sl->md);
    sl->call = NULL;
    sl->payload = NULL;
    grpc_call_error err = grpc_server_request_registered_call(
        sl->s->server, sl->method->handle, &sl->call, &sl->deadline, &sl->md,
        sl->method->m.method->kind == RPC_CLIENT_STREAM ? NULL : &sl->payload, sl->thread->cq,
        sl->thread->cq, &sl->tag);
    if (err != GRPC_CALL_OK) {
        log_error("grpc_server_request_registered_call failed: %d", (int)err);
        grpc_metadata_array_destroy(&sl->md);
        mem_free(sl);
    }
}

static void on_unknown_answered(rpc__tag *tag, int ok)
{
    unknown_slot *u = rpc__container_of(tag, unknown_slot, done_tag);
    grpc_slice_unref(u->status);
    grpc_call_unref(u->call);
    grpc_call_details_destroy(&u->details);
    grpc_metadata_array_destroy(&u->md);
    unknown_request(u);
}

static void on_unknown_arrived(rpc__tag *tag, int ok)
{
    unknown_slot *u = rpc__container_of(tag, unknown_slot, tag);
    if (!ok) {
        grpc_call_details_destroy(&u->details);
        grpc_metadata_array_destroy(&u->md);
        mem_free(u);
        return;
    }
    char *method = mem_strndup((const char *)GRPC_SLICE_START_PTR(u->details.method),
                               GRPC_SLICE_LENGTH(u->details.method));
    char *text = mem_asprintf("unknown method %s", method);
    log_warn("%s: refused a call to %s: no such method", u->s->name, method);
    rpcm_method *pm = rpcm_method_get(u->s->metrics, "/unknown/unknown");
    rpcm_end(pm, rpcm_start(pm), RPC_UNIMPLEMENTED);
    u->status = grpc_slice_from_copied_string(text);
    mem_free(text);
    mem_free(method);

    grpc_op ops[3];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[1].data.send_status_from_server.status = GRPC_STATUS_UNIMPLEMENTED;
    ops[1].data.send_status_from_server.status_details = &u->status;
    ops[2].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[2].data.recv_close_on_server.cancelled = &u->cancelled;
    u->done_tag.fn = on_unknown_answered;
    if (grpc_call_start_batch(u->call, ops, 3, &u->done_tag, NULL) != GRPC_CALL_OK) {
        log_error("grpc_call_start_batch(unknown method) failed");
        on_unknown_answered(&u->done_tag, 0);
    }
}

static void unknown_request(unknown_slot *u)
{
    u->tag.fn = on_unknown_arrived;
    u->call = NULL;
    grpc_call_details_init(&u->details);
    grpc_metadata_array_init(&u->md);
    if (grpc_server_request_call(u->s->server, &u->call, &u->details, &u->md, u->thread->cq,
                                 u->thread->cq, &u->tag) != GRPC_CALL_OK) {
        log_error("grpc_server_request_call failed");
        grpc_call_details_destroy(&u->details);
        grpc_metadata_array_destroy(&u->md);
        mem_free(u);
    }
}

/* ---- server --------------------------------------------------------- */

srv *srv_create(const char *name, const char *listen, const srv_opts *opts)
{
    rpc__grpc_ref();
    srv *s = mem_calloc(1, sizeof *s);
    s->name = mem_strdup(name);
    s->listen = mem_strdup(listen);
    s->opts = *opts;
    s->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    pthread_mutex_init(&s->shutdown_mu, NULL);
    pthread_cond_init(&s->shutdown_cv, NULL);

    rpc__args args;
    rpc__args_init(&args, opts->max_message_bytes);
    /* Clients (ours) send keepalive pings every 30 s to notice dead peers;
     * accept them instead of answering with GOAWAY "too_many_pings". */
    rpc__args_int(&args, GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10000);
    rpc__args_int(&args, GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
    /* The core sets SO_REUSEPORT by default, which would let a second
     * instance silently share our port; a clash must fail loudly. */
    rpc__args_int(&args, GRPC_ARG_ALLOW_REUSEPORT, 0);
    /* HTTP/2 connections live long; ageing them out makes clients resolve
     * again and find replicas added since. */
    if (opts->max_connection_age_ms > 0)
        rpc__args_int(&args, GRPC_ARG_MAX_CONNECTION_AGE_MS, (int)opts->max_connection_age_ms);
    grpc_channel_args cargs = rpc__args_get(&args);
    s->server = grpc_server_create(&cargs, NULL);

    return s;
}

static void free_callers(method_entry *e)
{
    for (size_t i = 0; i < e->ncallers; i++)
        mem_free(e->callers[i]);
    mem_free(e->callers);
    e->callers = NULL;
    e->ncallers = 0;
}

/* Splits `callers` into names; -1 when it is empty or a word is neither
 * "*" nor a caller name. */
static int parse_callers(method_entry *e, const char *callers)
{
    const char *p = callers != NULL ? callers : "";
    while (*p != '\0') {
        size_t n = strcspn(p, " ");
        if (n == 1 && p[0] == '*') {
            e->any_caller = 1;
        } else if (n > 0) {
            char name[TLS_NAME_MAX + 1];
            tls_name_of_dns(p, n, name);
            if (strlen(name) != n || strncmp(name, p, n) != 0)
                goto bad;
            e->callers = mem_realloc(e->callers, (e->ncallers + 1) * sizeof *e->callers);
            e->callers[e->ncallers++] = mem_strndup(p, n);
        }
        p += n;
        p += strspn(p, " ");
    }
    if (e->any_caller || e->ncallers > 0)
        return 0;
bad:
    log_error("method %s: callers \"%s\" is not a list of caller names or \"*\"", e->m.method->path,
              callers != NULL ? callers : "(none)");
    free_callers(e);
    return -1;
}

int srv_add_method(srv *s, const srv_method *m, void *data)
{
    const rpc_method *rm = m->method;
    if (s->started || rm == NULL || rm->path == NULL || rm->path[0] != '/' || rm->request == NULL ||
        rm->response == NULL || rm->kind == RPC_BIDI_STREAM || m->on_call == NULL ||
        (rm->kind == RPC_CLIENT_STREAM && (m->on_message == NULL || m->on_end == NULL))) {
        log_error("%s: cannot serve method %s: %s", s->name,
                  rm != NULL && rm->path != NULL ? rm->path : "(none)",
                  s->started ? "the server has started"
                  : rm != NULL && rm->kind == RPC_BIDI_STREAM
                      ? "bidirectional streaming is not supported"
                      : "a missing path, message or handler");
        return RPC_EARG;
    }
    method_entry *e = mem_calloc(1, sizeof *e);
    e->m = *m;
    e->data = data;
    if (parse_callers(e, m->callers) != 0) {
        mem_free(e);
        return RPC_EARG;
    }
    e->handle = grpc_server_register_method(s->server, rm->path, NULL,
                                            rm->kind == RPC_CLIENT_STREAM
                                                ? GRPC_SRM_PAYLOAD_NONE
                                                : GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER,
                                            0);
    if (e->handle == NULL) {
        free_callers(e);
        mem_free(e);
        return RPC_EARG;
    }
    s->methods = mem_realloc(s->methods, (s->nmethods + 1) * sizeof *s->methods);
    s->methods[s->nmethods++] = e;

    /* "/convo.v1.Router/Route" serves service "convo.v1.Router". */
    if (s->hooks != NULL && s->hooks->on_service != NULL) {
        const char *slash = strrchr(rm->path, '/');
        char *service = mem_strndup(rm->path + 1, (size_t)(slash - rm->path - 1));
        s->hooks->on_service(s->hooks_arg, service);
        mem_free(service);
    }
    return 0;
}

int srv_set_hooks(srv *s, const srv_hooks *hooks, void *arg)
{
    if (s->hooks != NULL || s->started)
        return RPC_EARG;
    s->hooks = hooks;
    s->hooks_arg = arg;
    return 0;
}

/* Calls the attached hook `fn` (a member of srv_hooks), if any. */
#define CALL_HOOK(s, fn)                                                                           \
    do {                                                                                           \
        if ((s)->hooks != NULL && (s)->hooks->fn != NULL)                                          \
            (s)->hooks->fn((s)->hooks_arg);                                                        \
    } while (0)

static void *cq_thread_main(void *arg)
{
    cq_thread *t = arg;
    rpc__cq_loop(t->cq);
    return NULL;
}

static void on_shutdown_done(rpc__tag *tag, int ok)
{
    srv *s = rpc__container_of(tag, srv, shutdown_tag);
    pthread_mutex_lock(&s->shutdown_mu);
    s->shutdown_done = 1;
    pthread_cond_broadcast(&s->shutdown_cv);
    pthread_mutex_unlock(&s->shutdown_mu);
}

int srv_start(srv *s)
{
    s->nthreads = (size_t)s->opts.threads;
    s->threads = mem_calloc(s->nthreads, sizeof *s->threads);
    for (size_t i = 0; i < s->nthreads; i++) {
        s->threads[i].cq = grpc_completion_queue_create_for_next(NULL);
        grpc_server_register_completion_queue(s->server, s->threads[i].cq, NULL);
    }
    grpc_server_credentials *creds = tls__server_credentials(s->tls);
    s->port = grpc_server_add_http2_port(s->server, s->listen, creds);
    grpc_server_credentials_release(creds);
    if (s->port == 0) {
        log_error("cannot listen on %s: the address is in use or invalid; pick another with "
                  "--listen HOST:PORT",
                  s->listen);
        return RPC_EBIND;
    }
    if (s->opts.health_listen != NULL && s->opts.health_listen[0] != '\0') {
        creds = grpc_insecure_server_credentials_create();
        int port = grpc_server_add_http2_port(s->server, s->opts.health_listen, creds);
        grpc_server_credentials_release(creds);
        if (port == 0) {
            log_error("cannot listen on %s: the address is in use or invalid; pick another with "
                      "--health-listen HOST:PORT",
                      s->opts.health_listen);
            /* The core will not destroy a server holding a bound port it
             * was never told to shut down; srv_destroy drains the queue. */
            s->shutdown_tag.fn = on_shutdown_done;
            grpc_server_shutdown_and_notify(s->server, s->threads[0].cq, &s->shutdown_tag);
            return RPC_EBIND;
        }
        log_info("%s: grpc.health.v1 without TLS on %s (port %d)", s->name, s->opts.health_listen,
                 port);
    }
    grpc_server_start(s->server);
    s->started = 1;
    for (size_t i = 0; i < s->nmethods; i++)
        s->methods[i]->pm = rpcm_method_get(s->metrics, s->methods[i]->m.method->path);

    for (size_t t = 0; t < s->nthreads; t++) {
        for (size_t i = 0; i < s->nmethods; i++) {
            for (int k = 0; k < SLOTS_PER_METHOD; k++) {
                slot *sl = mem_calloc(1, sizeof *sl);
                sl->tag.fn = on_call_arrived;
                sl->s = s;
                sl->method = s->methods[i];
                sl->thread = &s->threads[t];
                slot_request(sl);
            }
        }
    }
    for (size_t t = 0; t < s->nthreads; t++) {
        unknown_slot *u = mem_calloc(1, sizeof *u);
        u->s = s;
        u->thread = &s->threads[t];
        unknown_request(u);
    }
    for (size_t i = 0; i < s->nthreads; i++)
        pthread_create(&s->threads[i].tid, NULL, cq_thread_main, &s->threads[i]);
    s->threads_started = 1;

    CALL_HOOK(s, on_start);
    log_info("%s %s serving gRPC on %s (port %d, %s)", s->name, conf_version(), s->listen, s->port,
             s->tls != NULL ? "mutual TLS, methods allowed per caller" : "plaintext");
    return 0;
}

void srv_use_tls(srv *s, tls *t)
{
    s->tls = t;
}

int srv_port(const srv *s)
{
    return s->port;
}

void srv_block_signals(void)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    /* Writes to closed sockets return EPIPE instead of killing us. */
    signal(SIGPIPE, SIG_IGN);
}

void srv_stop(srv *s)
{
    uint64_t one = 1;
    ssize_t unused = write(s->stop_fd, &one, sizeof one);
    (void)unused;
}

/* Waits for the core's shutdown notification, at most `ms` (-1: forever).
 * Returns whether it came. */
static int wait_shutdown(srv *s, int64_t ms)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += ms / 1000;
    until.tv_nsec += (ms % 1000) * 1000000;
    if (until.tv_nsec >= 1000000000) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000;
    }
    pthread_mutex_lock(&s->shutdown_mu);
    while (!s->shutdown_done) {
        if (ms < 0)
            pthread_cond_wait(&s->shutdown_cv, &s->shutdown_mu);
        else if (pthread_cond_timedwait(&s->shutdown_cv, &s->shutdown_mu, &until) == ETIMEDOUT)
            break;
    }
    int done = s->shutdown_done;
    pthread_mutex_unlock(&s->shutdown_mu);
    return done;
}

/* The graceful shutdown shared by srv_run and srv_destroy of a server whose
 * srv_run never ran. */
static void srv_shutdown(srv *s, const char *why)
{
    int64_t t0 = rpc_now_ms();
    log_info("%s: shutting down (%s): draining %lld ms, grace %lld ms", s->name, why,
             s->opts.drain_delay_ms, s->opts.shutdown_grace_ms);
    CALL_HOOK(s, on_draining);
    if (s->opts.drain_delay_ms > 0)
        usleep((useconds_t)(s->opts.drain_delay_ms * 1000));
    CALL_HOOK(s, on_stopping);

    s->shutdown_tag.fn = on_shutdown_done;
    grpc_server_shutdown_and_notify(s->server, s->threads[0].cq, &s->shutdown_tag);
    if (!wait_shutdown(s, s->opts.shutdown_grace_ms)) {
        log_warn("%s: %d calls still running after the %lld ms grace period; cancelling them",
                 s->name, atomic_load(&s->active_calls), s->opts.shutdown_grace_ms);
        grpc_server_cancel_all_calls(s->server);
        wait_shutdown(s, -1);
    }
    for (size_t i = 0; i < s->nthreads; i++)
        grpc_completion_queue_shutdown(s->threads[i].cq);
    for (size_t i = 0; i < s->nthreads; i++)
        pthread_join(s->threads[i].tid, NULL);
    s->started = 0;
    log_info("%s: stopped in %lld ms (%lu calls refused PERMISSION_DENIED)", s->name,
             (long long)(rpc_now_ms() - t0), atomic_load(&s->denied));
}

void srv_run(srv *s)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    int sfd = signalfd(-1, &set, SFD_CLOEXEC);
    struct pollfd pfd[2] = {{sfd, POLLIN, 0}, {s->stop_fd, POLLIN, 0}};
    const char *why = "srv_stop";
    for (;;) {
        int n = poll(pfd, 2, -1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            log_error("poll failed: %s", strerror(errno));
            break;
        }
        if (pfd[0].revents & POLLIN) {
            struct signalfd_siginfo si;
            if (read(sfd, &si, sizeof si) == (ssize_t)sizeof si)
                why = si.ssi_signo == SIGTERM ? "SIGTERM" : "SIGINT";
            break;
        }
        if (pfd[1].revents & POLLIN)
            break;
    }
    if (sfd >= 0)
        close(sfd);

    srv_shutdown(s, why);
}

void srv_destroy(srv **sp)
{
    srv *s = *sp;
    if (s == NULL)
        return;
    *sp = NULL;
    if (s->started)
        srv_shutdown(s, "srv_destroy");
    grpc_server_destroy(s->server);
    for (size_t i = 0; i < s->nthreads; i++) {
        if (!s->threads_started) {
            /* Never served (bind failed): drain the queue ourselves. */
            grpc_completion_queue_shutdown(s->threads[i].cq);
            rpc__cq_loop(s->threads[i].cq);
        }
        grpc_completion_queue_destroy(s->threads[i].cq);
    }
    mem_free(s->threads);
    for (size_t i = 0; i < s->nmethods; i++) {
        free_callers(s->methods[i]);
        mem_free(s->methods[i]);
    }
    mem_free(s->methods);
    CALL_HOOK(s, on_destroy);
    rpcm_destroy(&s->metrics);
    close(s->stop_fd);
    pthread_mutex_destroy(&s->shutdown_mu);
    pthread_cond_destroy(&s->shutdown_cv);
    mem_free(s->name);
    mem_free(s->listen);
    mem_free(s);
    rpc__grpc_unref();
}

void srv_set_tracer(srv *s, otlp *e)
{
    s->tracer = e;
}

void srv_set_metrics(srv *s, metrics *m)
{
    rpcm_destroy(&s->metrics);
    s->metrics = rpcm_create_server(m);
}
