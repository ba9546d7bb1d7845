#include "bcall.h"

#include "mem.h"

#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

/* Calls in flight in one scope at once: a job has at most a stream and a
 * unary call open together. */
#define SCOPE_MAX_CALLS 4

struct bcall_scope {
    pthread_mutex_t mu;
    int cancelled;
    cli_call *calls[SCOPE_MAX_CALLS];
};

bcall_scope *bcall_scope_new(void)
{
    bcall_scope *sc = mem_calloc(1, sizeof *sc);
    pthread_mutex_init(&sc->mu, NULL);
    return sc;
}

void bcall_scope_cancel(bcall_scope *sc)
{
    pthread_mutex_lock(&sc->mu);
    sc->cancelled = 1;
    for (int i = 0; i < SCOPE_MAX_CALLS; i++)
        if (sc->calls[i] != NULL)
            cli_call_cancel(sc->calls[i]);
    pthread_mutex_unlock(&sc->mu);
}

int bcall_scope_cancelled(bcall_scope *sc)
{
    pthread_mutex_lock(&sc->mu);
    int c = sc->cancelled;
    pthread_mutex_unlock(&sc->mu);
    return c;
}

void bcall_scope_free(bcall_scope **scp)
{
    bcall_scope *sc = *scp;
    if (sc == NULL)
        return;
    pthread_mutex_destroy(&sc->mu);
    mem_free(sc);
    *scp = NULL;
}

/* Registers a started call so that a cancellation reaches it; when the
 * scope was cancelled meanwhile, cancels it at once. */
static void scope_add(bcall_scope *sc, cli_call *call)
{
    pthread_mutex_lock(&sc->mu);
    for (int i = 0; i < SCOPE_MAX_CALLS; i++) {
        if (sc->calls[i] == NULL) {
            sc->calls[i] = call;
            break;
        }
    }
    if (sc->cancelled)
        cli_call_cancel(call);
    pthread_mutex_unlock(&sc->mu);
}

static void scope_remove(bcall_scope *sc, cli_call *call)
{
    pthread_mutex_lock(&sc->mu);
    for (int i = 0; i < SCOPE_MAX_CALLS; i++)
        if (sc->calls[i] == call)
            sc->calls[i] = NULL;
    pthread_mutex_unlock(&sc->mu);
}

/* ---- unary ---------------------------------------------------------------- */

/* Shared by the waiting thread and the done callback; the last of the two
 * frees it, so neither touches freed memory whatever the timing. */
typedef struct waiter {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_int refs;
    int done;
    rpc_code code;
    char *message;
    ProtobufCMessage *resp;
} waiter;

static waiter *waiter_new(void)
{
    waiter *w = mem_calloc(1, sizeof *w);
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    atomic_init(&w->refs, 2);
    return w;
}

static void waiter_unref(waiter *w)
{
    if (atomic_fetch_sub(&w->refs, 1) != 1)
        return;
    if (w->resp != NULL)
        protobuf_c_message_free_unpacked(w->resp, NULL);
    mem_free(w->message);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
    mem_free(w);
}

static void on_unary_done(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp)
{
    waiter *w = arg;
    pthread_mutex_lock(&w->mu);
    w->done = 1;
    w->code = code;
    w->message = message != NULL && message[0] ? mem_strdup(message) : NULL;
    w->resp = resp;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
    waiter_unref(w);
}

rpc_code bcall_unary(bcall_scope *sc, cli_channel *ch, const rpc_method *method,
                     const ProtobufCMessage *req, int64_t timeout_ms, ProtobufCMessage **resp,
                     char **message)
{
    *resp = NULL;
    if (message != NULL)
        *message = NULL;
    if (sc != NULL && bcall_scope_cancelled(sc)) {
        if (message != NULL)
            *message = mem_strdup("cancelled: shutting down");
        return RPC_CANCELLED;
    }
    cli_opts o = {.timeout_ms = timeout_ms > 0 ? timeout_ms : 0};
    waiter *w = waiter_new();
    cli_call *call = NULL;
    int rc = cli_unary(ch, method, req, &o, on_unary_done, w, &call);
    if (rc != 0) {
        if (message != NULL)
            *message = mem_asprintf("cannot start %s: %s", method->path, rpc_strerror(rc));
        waiter_unref(w);
        waiter_unref(w);
        return rc == RPC_ESHUTDOWN ? RPC_CANCELLED : RPC_INTERNAL;
    }
    if (sc != NULL)
        scope_add(sc, call);
    pthread_mutex_lock(&w->mu);
    while (!w->done)
        pthread_cond_wait(&w->cv, &w->mu);
    pthread_mutex_unlock(&w->mu);
    if (sc != NULL)
        scope_remove(sc, call);
    cli_call_release(&call);

    rpc_code code = w->code;
    *resp = w->resp;
    w->resp = NULL;
    if (message != NULL) {
        *message = w->message;
        w->message = NULL;
    }
    waiter_unref(w);
    return code;
}

/* ---- streams -------------------------------------------------------------- */

/* One message waiting to be read, kept serialized: its size is what the
 * byte bound counts, and the decoded copy only exists while it is used. */
typedef struct held {
    struct held *next;
    size_t len;
    uint8_t data[];
} held;

struct bcall_stream {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_int refs; /* the reader and the done callback */
    bcall_scope *sc;
    cli_call *call;
    const ProtobufCMessageDescriptor *desc;
    held *head, *tail;
    size_t count, bytes, max_msgs, max_bytes;
    int paused;
    int done;
    rpc_code code;
    char *message;
};

static void stream_unref(bcall_stream *st)
{
    if (atomic_fetch_sub(&st->refs, 1) != 1)
        return;
    while (st->head != NULL) {
        held *h = st->head;
        st->head = h->next;
        mem_free(h);
    }
    mem_free(st->message);
    pthread_mutex_destroy(&st->mu);
    pthread_cond_destroy(&st->cv);
    mem_free(st);
}

static int on_stream_msg(void *arg, const ProtobufCMessage *msg)
{
    bcall_stream *st = arg;
    size_t len = protobuf_c_message_get_packed_size(msg);
    held *h = mem_alloc(sizeof *h + len);
    h->next = NULL;
    h->len = protobuf_c_message_pack(msg, h->data);
    pthread_mutex_lock(&st->mu);
    if (st->tail != NULL)
        st->tail->next = h;
    else
        st->head = h;
    st->tail = h;
    st->count++;
    st->bytes += h->len;
    int pause = st->count >= st->max_msgs || st->bytes >= st->max_bytes;
    if (pause)
        st->paused = 1;
    pthread_cond_signal(&st->cv);
    pthread_mutex_unlock(&st->mu);
    return pause;
}

static void on_stream_done(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp)
{
    bcall_stream *st = arg;
    if (resp != NULL)
        protobuf_c_message_free_unpacked(resp, NULL);
    pthread_mutex_lock(&st->mu);
    st->done = 1;
    st->code = code;
    st->message = message != NULL && message[0] ? mem_strdup(message) : NULL;
    pthread_cond_signal(&st->cv);
    pthread_mutex_unlock(&st->mu);
    stream_unref(st);
}

rpc_code bcall_stream_open(bcall_scope *sc, cli_channel *ch, const rpc_method *method,
                           const ProtobufCMessage *req, int64_t timeout_ms, size_t max_msgs,
                           size_t max_bytes, bcall_stream **out)
{
    *out = NULL;
    if (bcall_scope_cancelled(sc))
        return RPC_CANCELLED;
    bcall_stream *st = mem_calloc(1, sizeof *st);
    pthread_mutex_init(&st->mu, NULL);
    pthread_cond_init(&st->cv, NULL);
    atomic_init(&st->refs, 2);
    st->sc = sc;
    st->desc = method->response;
    st->max_msgs = max_msgs > 0 ? max_msgs : 1;
    st->max_bytes = max_bytes > 0 ? max_bytes : 1;
    cli_opts o = {.timeout_ms = timeout_ms > 0 ? timeout_ms : 0};
    int rc = cli_stream(ch, method, req, &o, on_stream_msg, on_stream_done, st, &st->call);
    if (rc != 0) {
        stream_unref(st);
        stream_unref(st);
        return rc == RPC_ESHUTDOWN ? RPC_CANCELLED : RPC_INTERNAL;
    }
    scope_add(sc, st->call);
    *out = st;
    return RPC_OK;
}

int bcall_stream_next(bcall_stream *st, ProtobufCMessage **msg, rpc_code *code, char **message)
{
    *msg = NULL;
    if (message != NULL)
        *message = NULL;
    pthread_mutex_lock(&st->mu);
    while (st->head == NULL && !st->done)
        pthread_cond_wait(&st->cv, &st->mu);
    held *h = st->head;
    int resume = 0;
    if (h != NULL) {
        st->head = h->next;
        if (st->head == NULL)
            st->tail = NULL;
        st->count--;
        st->bytes -= h->len;
        /* Resume at half, not at once: fewer pause/resume round trips. */
        if (st->paused && st->count <= st->max_msgs / 2 && st->bytes <= st->max_bytes / 2) {
            st->paused = 0;
            resume = !st->done;
        }
    } else {
        *code = st->code;
        if (message != NULL && st->message != NULL)
            *message = mem_strdup(st->message);
    }
    pthread_mutex_unlock(&st->mu);
    if (h == NULL)
        return *code == RPC_OK ? 0 : -1;
    if (resume)
        cli_call_resume(st->call);
    *msg = protobuf_c_message_unpack(st->desc, NULL, h->len, h->data);
    mem_free(h);
    if (*msg == NULL) {
        /* We packed it ourselves: cannot happen short of a bug. */
        *code = RPC_INTERNAL;
        if (message != NULL)
            *message = mem_strdup("a streamed message could not be decoded again");
        return -1;
    }
    return 1;
}

void bcall_stream_close(bcall_stream **stp)
{
    bcall_stream *st = *stp;
    if (st == NULL)
        return;
    pthread_mutex_lock(&st->mu);
    int done = st->done;
    pthread_mutex_unlock(&st->mu);
    if (!done)
        cli_call_cancel(st->call);
    pthread_mutex_lock(&st->mu);
    while (!st->done)
        pthread_cond_wait(&st->cv, &st->mu);
    pthread_mutex_unlock(&st->mu);
    scope_remove(st->sc, st->call);
    cli_call_release(&st->call);
    stream_unref(st);
    *stp = NULL;
}
