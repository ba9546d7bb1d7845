#include "testsvc_server.h"

#include "mem.h"

#include <pthread.h>
#include <stdio.h>
#include <stdatomic.h>
#include <string.h>
#include <unistd.h>

static atomic_int cancels;

/* Echo calls waiting for hold_until. */
static pthread_mutex_t held_mu = PTHREAD_MUTEX_INITIALIZER;
static srv_call **held;
static size_t nheld, held_cap;

/* Drip calls, served by one ticker thread. */
typedef struct drip {
    srv_call *call;
    int64_t next_seq;
    int interval_ms;
    int64_t due_ms;
    int cancelled;
    struct drip *next;
} drip;
static pthread_mutex_t drip_mu = PTHREAD_MUTEX_INITIALIZER;
static drip *drips;
static pthread_t ticker;
static int ticker_running;
static int ticker_stop;

int testsvc_cancels(void)
{
    return atomic_load(&cancels);
}

int testsvc_wait_cancels(int n, int ms)
{
    for (int waited = 0; waited < ms; waited += 5) {
        if (atomic_load(&cancels) >= n)
            return 1;
        usleep(5000);
    }
    return atomic_load(&cancels) >= n;
}

static void reply(srv_call *call, const char *text)
{
    Convo__Test__EchoReply r = CONVO__TEST__ECHO_REPLY__INIT;
    r.text = (char *)text;
    r.request_id = (char *)srv_call_request_id(call);
    srv_call_finish(call, RPC_OK, NULL, &r.base);
}

static void on_echo(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__Test__EchoRequest *req = (const Convo__Test__EchoRequest *)msg;
    if (req->code != 0) {
        srv_call_finish(call, (rpc_code)req->code, req->message, NULL);
        return;
    }
    if (req->hold_until <= 1) {
        reply(call, req->text);
        return;
    }
    /* Hold the call until hold_until calls are in flight at once, then
     * answer them all: proof that they really were concurrent. */
    srv_call **release = NULL;
    size_t nrelease = 0;
    pthread_mutex_lock(&held_mu);
    if (nheld == held_cap) {
        held_cap = held_cap ? 2 * held_cap : 64;
        held = mem_realloc(held, held_cap * sizeof *held);
    }
    held[nheld++] = call;
    if (nheld >= (size_t)req->hold_until) {
        release = held;
        nrelease = nheld;
        held = NULL;
        nheld = held_cap = 0;
    }
    pthread_mutex_unlock(&held_mu);
    for (size_t i = 0; i < nrelease; i++)
        reply(release[i], "released");
    mem_free(release);
}

typedef struct counter {
    int64_t next, count;
    int payload_bytes;
} counter;

/* Sends until the queue is full, then waits for on_writable. */
static void count_pump(srv_call *call)
{
    counter *ct = srv_call_data(call);
    uint8_t payload[4096];
    memset(payload, 'x', sizeof payload);
    while (ct->next <= ct->count) {
        Convo__Test__Item item = CONVO__TEST__ITEM__INIT;
        item.seq = ct->next;
        item.payload.data = payload;
        item.payload.len =
            (size_t)ct->payload_bytes < sizeof payload ? (size_t)ct->payload_bytes : sizeof payload;
        int rc = srv_call_send(call, &item.base);
        if (rc == RPC_EFULL)
            return;
        if (rc != 0)
            break;
        ct->next++;
    }
    srv_call_set_data(call, NULL);
    mem_free(ct);
    srv_call_finish(call, RPC_OK, NULL, NULL);
}

static void on_count_cancel(srv_call *call)
{
    atomic_fetch_add(&cancels, 1);
    counter *ct = srv_call_data(call);
    if (ct == NULL)
        return;
    srv_call_set_data(call, NULL);
    mem_free(ct);
    srv_call_finish(call, RPC_CANCELLED, "cancelled", NULL);
}

static void on_count(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__Test__CountRequest *req = (const Convo__Test__CountRequest *)msg;
    counter *ct = mem_calloc(1, sizeof *ct);
    ct->next = 1;
    ct->count = req->count;
    ct->payload_bytes = req->payload_bytes;
    srv_call_set_data(call, ct);
    srv_call_on_writable(call, count_pump);
    srv_call_on_cancel(call, on_count_cancel);
    count_pump(call);
}

static void on_hang_cancel(srv_call *call)
{
    atomic_fetch_add(&cancels, 1);
    srv_call_finish(call, RPC_CANCELLED, "cancelled", NULL);
}

static void on_hang(srv_call *call, const ProtobufCMessage *msg)
{
    srv_call_on_cancel(call, on_hang_cancel);
}

static void on_drip_cancel(srv_call *call)
{
    atomic_fetch_add(&cancels, 1);
}

static void *ticker_main(void *arg)
{
    for (;;) {
        pthread_mutex_lock(&drip_mu);
        if (ticker_stop) {
            pthread_mutex_unlock(&drip_mu);
            return NULL;
        }
        int64_t now = rpc_now_ms();
        for (drip **p = &drips; *p != NULL;) {
            drip *d = *p;
            int rc = 0;
            if (now >= d->due_ms) {
                Convo__Test__Item item = CONVO__TEST__ITEM__INIT;
                item.seq = d->next_seq++;
                rc = srv_call_send(d->call, &item.base);
                d->due_ms = now + d->interval_ms;
            }
            if (rc == RPC_EDONE) {
                *p = d->next;
                srv_call_finish(d->call, RPC_CANCELLED, "stream ended", NULL);
                mem_free(d);
            } else {
                p = &d->next;
            }
        }
        pthread_mutex_unlock(&drip_mu);
        usleep(2000);
    }
}

static void on_drip(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__Test__CountRequest *req = (const Convo__Test__CountRequest *)msg;
    drip *d = mem_calloc(1, sizeof *d);
    d->call = call;
    d->next_seq = 1;
    d->interval_ms = req->interval_ms > 0 ? req->interval_ms : 10;
    srv_call_on_cancel(call, on_drip_cancel);
    pthread_mutex_lock(&drip_mu);
    d->next = drips;
    drips = d;
    pthread_mutex_unlock(&drip_mu);
}

typedef struct summer {
    int64_t total;
} summer;

static void on_sum_start(srv_call *call, const ProtobufCMessage *msg)
{
    srv_call_set_data(call, mem_calloc(1, sizeof(summer)));
}

static void on_sum_item(srv_call *call, const ProtobufCMessage *msg)
{
    summer *s = srv_call_data(call);
    s->total += ((const Convo__Test__Item *)msg)->seq;
}

static void on_sum_end(srv_call *call)
{
    summer *s = srv_call_data(call);
    Convo__Test__EchoReply r = CONVO__TEST__ECHO_REPLY__INIT;
    r.total = s->total;
    r.text = "sum";
    mem_free(s);
    srv_call_finish(call, RPC_OK, NULL, &r.base);
}

void testsvc_register(srv *s)
{
    /* Under mutual TLS (tests/runtime/test_tls.py): Echo and Sum for two
     * named callers, the streams for any caller of the CA. */
    static const srv_method methods[] = {
        {&convo__test__test__echo__method, on_echo, NULL, NULL, "gateway admin"},
        {&convo__test__test__count__method, on_count, NULL, NULL, "*"},
        {&convo__test__test__hang__method, on_hang, NULL, NULL, "*"},
        {&convo__test__test__drip__method, on_drip, NULL, NULL, "*"},
        {&convo__test__test__sum__method, on_sum_start, on_sum_item, on_sum_end, "gateway"},
    };
    for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++)
        srv_add_method(s, &methods[i], NULL);
    pthread_mutex_lock(&drip_mu);
    ticker_stop = 0;
    if (!ticker_running) {
        pthread_create(&ticker, NULL, ticker_main, NULL);
        ticker_running = 1;
    }
    pthread_mutex_unlock(&drip_mu);
}

void testsvc_shutdown(void)
{
    pthread_mutex_lock(&drip_mu);
    int running = ticker_running;
    ticker_stop = 1;
    ticker_running = 0;
    pthread_mutex_unlock(&drip_mu);
    if (running)
        pthread_join(ticker, NULL);
    pthread_mutex_lock(&drip_mu);
    while (drips != NULL) {
        drip *d = drips;
        drips = d->next;
        srv_call_finish(d->call, RPC_UNAVAILABLE, "test service stopped", NULL);
        mem_free(d);
    }
    pthread_mutex_unlock(&drip_mu);
}

srv_opts testsvc_default_opts(void)
{
    srv_opts o = {
        .threads = 2,
        .shutdown_grace_ms = 2000,
        .drain_delay_ms = 0,
        .max_message_bytes = 4 << 20,
        .max_queued_writes = 256,
        .max_calls = 10000,
    };
    return o;
}

static void *run_main(void *arg)
{
    srv_run(arg);
    return NULL;
}

int testsvc_server_start(testsvc_server *t, const srv_opts *opts)
{
    return testsvc_server_start_tls(t, opts, NULL);
}

int testsvc_server_start_tls(testsvc_server *t, const srv_opts *opts, tls *mtls)
{
    memset(t, 0, sizeof *t);
    t->s = srv_create("testsvc", "127.0.0.1:0", opts);
    t->health = health_attach(t->s);
    srv_use_tls(t->s, mtls);
    testsvc_register(t->s);
    if (srv_start(t->s) != 0) {
        srv_destroy(&t->s);
        return -1;
    }
    snprintf(t->target, sizeof t->target, "127.0.0.1:%d", srv_port(t->s));
    pthread_create(&t->run, NULL, run_main, t->s);
    return 0;
}

void testsvc_server_stop(testsvc_server *t)
{
    srv_stop(t->s);
    pthread_join(t->run, NULL);
    testsvc_shutdown();
    srv_destroy(&t->s);
}
