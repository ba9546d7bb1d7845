/* bench_store — store-svc's throughput through gRPC into PostgreSQL: events
 * per second appended for batch sizes 1, 10, 100 and 1000 (or only --batch
 * N), then events per second read back with ListEvents (unless --no-list).
 * Not a test: it prints a table (store-svc/README.md, "Benchmark").
 * bench_store.py starts a PostgreSQL and a store-svc and runs this against
 * them.
 *
 *   bench_store --store HOST:PORT [--sessions N] [--scale X] [--content-bytes N]
 *               [--batch N] [--no-list]
 *
 * Each of --sessions writers owns one session and keeps one AppendEvents in
 * flight, as a gateway does per WebSocket session; they all run on the
 * client's completion-queue threads (no thread per writer). */
#include "cli.h"
#include "log.h"
#include "mem.h"
#include "rpc.h"

#include "convo_methods.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The owner of every session the bench writes. */
#define BENCH_USER "bench"

typedef struct bench bench;

typedef struct writer {
    bench *b;
    char session_id[64];
    int64_t next_seq;
    Convo__V1__Event *events;
    Convo__V1__Event **ptrs;
} writer;

struct bench {
    cli_channel *ch;
    int batch;
    char *content;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    long long to_send;  /* events not yet handed to a call */
    long long appended; /* events acknowledged as written */
    long long failed;   /* calls that failed */
    int in_flight;
    char last_error[256];
};

static void send_next(writer *w);

static void on_append_done(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp)
{
    writer *w = arg;
    bench *b = w->b;
    pthread_mutex_lock(&b->mu);
    if (code == RPC_OK) {
        b->appended += ((Convo__V1__AppendEventsResponse *)resp)->appended;
    } else {
        b->failed++;
        snprintf(b->last_error, sizeof b->last_error, "%s: %s", rpc_code_name(code),
                 message ? message : "");
    }
    int more = b->to_send > 0 && b->failed == 0;
    if (!more) {
        b->in_flight--;
        pthread_cond_broadcast(&b->cv);
    }
    pthread_mutex_unlock(&b->mu);
    if (resp != NULL)
        protobuf_c_message_free_unpacked(resp, NULL);
    if (more)
        send_next(w);
}

/* Takes the next batch off the budget and starts its call (in_flight is
 * already counted for this writer). */
static void send_next(writer *w)
{
    bench *b = w->b;
    pthread_mutex_lock(&b->mu);
    long long n = b->to_send < b->batch ? b->to_send : b->batch;
    b->to_send -= n;
    pthread_mutex_unlock(&b->mu);

    for (long long i = 0; i < n; i++) {
        Convo__V1__Event *e = &w->events[i];
        convo__v1__event__init(e);
        e->seq = w->next_seq++;
        e->type = (e->seq % 50 == 1) ? CONVO__V1__EVENT_TYPE__EVENT_TYPE_USER_MESSAGE
                                     : CONVO__V1__EVENT_TYPE__EVENT_TYPE_AI_TOKEN;
        e->content = b->content;
        w->ptrs[i] = e;
    }
    Convo__V1__AppendEventsRequest req = CONVO__V1__APPEND_EVENTS_REQUEST__INIT;
    req.session_id = w->session_id;
    req.user_id = BENCH_USER;
    req.n_events = (size_t)n;
    req.events = w->ptrs;
    cli_opts opts = {.timeout_ms = 60000};
    if (cli_unary(b->ch, &convo__v1__store__append_events__method, &req.base, &opts, on_append_done,
                  w, NULL) != 0) {
        fprintf(stderr, "bench_store: cli_unary failed\n");
        exit(1);
    }
}

static int open_session(cli_channel *ch, const char *sid)
{
    Convo__V1__OpenSessionRequest req = CONVO__V1__OPEN_SESSION_REQUEST__INIT;
    req.session_id = (char *)sid;
    req.user_id = BENCH_USER;
    cli_opts opts = {.timeout_ms = 30000, .wait_for_ready = 1};
    ProtobufCMessage *resp = NULL;
    char *msg = NULL;
    rpc_code code =
        cli_unary_sync(ch, &convo__v1__store__open_session__method, &req.base, &opts, &resp, &msg);
    if (code != RPC_OK)
        fprintf(stderr, "bench_store: OpenSession %s: %s: %s\n", sid, rpc_code_name(code),
                msg ? msg : "");
    if (resp != NULL)
        protobuf_c_message_free_unpacked(resp, NULL);
    mem_free(msg);
    return code == RPC_OK ? 0 : -1;
}

/* Appends `total` events in batches of `batch` from `nwriters` sessions;
 * returns events/s, or -1. The sessions' ids go to `ids` (for reading). */
static double run_append(cli_channel *ch, int batch, long long total, int nwriters,
                         const char *content, const char *tag, char (*ids)[64], long long *counts)
{
    bench b = {.ch = ch, .batch = batch, .content = (char *)content, .to_send = total};
    pthread_mutex_init(&b.mu, NULL);
    pthread_cond_init(&b.cv, NULL);
    writer *ws = mem_calloc((size_t)nwriters, sizeof *ws);
    double rate = -1;

    for (int i = 0; i < nwriters; i++) {
        writer *w = &ws[i];
        w->b = &b;
        w->next_seq = 1;
        snprintf(w->session_id, sizeof w->session_id, "bench-%s-b%d-%d-%lld", tag, batch, i,
                 (long long)rpc_now_ms());
        if (ids != NULL)
            memcpy(ids[i], w->session_id, sizeof w->session_id);
        w->events = mem_calloc((size_t)batch, sizeof *w->events);
        w->ptrs = mem_calloc((size_t)batch, sizeof *w->ptrs);
        if (open_session(ch, w->session_id) != 0)
            goto out;
    }
    int64_t t0 = rpc_now_ms();
    int started = 0;
    pthread_mutex_lock(&b.mu);
    for (int i = 0; i < nwriters && b.to_send > 0; i++) {
        b.in_flight++;
        started++;
    }
    pthread_mutex_unlock(&b.mu);
    for (int i = 0; i < started; i++)
        send_next(&ws[i]);
    pthread_mutex_lock(&b.mu);
    while (b.in_flight > 0)
        pthread_cond_wait(&b.cv, &b.mu);
    pthread_mutex_unlock(&b.mu);
    int64_t ms = rpc_now_ms() - t0;
    if (b.failed > 0) {
        fprintf(stderr, "bench_store: %lld calls failed; last: %s\n", b.failed, b.last_error);
        goto out;
    }
    if (b.appended != total) {
        fprintf(stderr, "bench_store: %lld events acknowledged, %lld sent\n", b.appended, total);
        goto out;
    }
    rate = (double)total * 1000.0 / (double)(ms > 0 ? ms : 1);
    for (int i = 0; i < nwriters && counts != NULL; i++)
        counts[i] = ws[i].next_seq - 1;
out:
    for (int i = 0; i < nwriters; i++) {
        mem_free(ws[i].events);
        mem_free(ws[i].ptrs);
    }
    mem_free(ws);
    pthread_mutex_destroy(&b.mu);
    pthread_cond_destroy(&b.cv);
    return rate;
}

/* ---- reading ------------------------------------------------------------------ */

typedef struct reader {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    long long received;
    int open;
    int failed;
    char last_error[256];
} reader;

static int on_event(void *arg, const ProtobufCMessage *msg)
{
    reader *r = arg;
    pthread_mutex_lock(&r->mu);
    r->received++;
    pthread_mutex_unlock(&r->mu);
    return 0;
}

static void on_stream_done(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp)
{
    reader *r = arg;
    pthread_mutex_lock(&r->mu);
    if (code != RPC_OK) {
        r->failed++;
        snprintf(r->last_error, sizeof r->last_error, "%s: %s", rpc_code_name(code),
                 message ? message : "");
    }
    r->open--;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

/* Reads every event of the sessions at once (one stream each); returns
 * events/s or -1. */
static double run_read(cli_channel *ch, char (*ids)[64], int n, long long expect)
{
    reader r = {0};
    pthread_mutex_init(&r.mu, NULL);
    pthread_cond_init(&r.cv, NULL);
    int64_t t0 = rpc_now_ms();
    for (int i = 0; i < n; i++) {
        Convo__V1__ListEventsRequest req = CONVO__V1__LIST_EVENTS_REQUEST__INIT;
        req.session_id = ids[i];
        cli_opts opts = {.timeout_ms = 300000};
        pthread_mutex_lock(&r.mu);
        r.open++;
        pthread_mutex_unlock(&r.mu);
        if (cli_stream(ch, &convo__v1__store__list_events__method, &req.base, &opts, on_event,
                       on_stream_done, &r, NULL) != 0) {
            fprintf(stderr, "bench_store: cli_stream failed\n");
            exit(1);
        }
    }
    pthread_mutex_lock(&r.mu);
    while (r.open > 0)
        pthread_cond_wait(&r.cv, &r.mu);
    pthread_mutex_unlock(&r.mu);
    int64_t ms = rpc_now_ms() - t0;
    double rate = -1;
    if (r.failed > 0)
        fprintf(stderr, "bench_store: %d streams failed; last: %s\n", r.failed, r.last_error);
    else if (r.received != expect)
        fprintf(stderr, "bench_store: read %lld events, expected %lld\n", r.received, expect);
    else
        rate = (double)r.received * 1000.0 / (double)(ms > 0 ? ms : 1);
    pthread_mutex_destroy(&r.mu);
    pthread_cond_destroy(&r.cv);
    return rate;
}

static void print_row(const char *name, long long events, double rate)
{
    if (rate < 0)
        printf("%-28s %12lld %14s\n", name, events, "FAILED");
    else
        printf("%-28s %12lld %14.0f\n", name, events, rate);
    fflush(stdout);
}

static void usage(void)
{
    fprintf(stderr, "usage: bench_store --store HOST:PORT [--sessions N] [--scale X] "
                    "[--content-bytes N] [--threads N] [--batch N] [--no-list]\n");
    exit(2);
}

/* Events a run of batch size n writes at --scale 1: a few seconds at the
 * rate that size reaches. */
static long long base_events(int n)
{
    return n <= 1 ? 20000 : n <= 10 ? 100000 : n <= 100 ? 300000 : 500000;
}

int main(int argc, char **argv)
{
    const char *target = NULL;
    int sessions = 32, content_bytes = 64, threads = 2;
    double scale = 1.0;
    int one_batch = 0, list = 1;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--no-list") == 0) {
            list = 0;
            continue;
        }
        if (i + 1 >= argc)
            usage();
        if (strcmp(argv[i], "--store") == 0)
            target = argv[++i];
        else if (strcmp(argv[i], "--sessions") == 0)
            sessions = atoi(argv[++i]);
        else if (strcmp(argv[i], "--scale") == 0)
            scale = atof(argv[++i]);
        else if (strcmp(argv[i], "--content-bytes") == 0)
            content_bytes = atoi(argv[++i]);
        else if (strcmp(argv[i], "--threads") == 0)
            threads = atoi(argv[++i]);
        else if (strcmp(argv[i], "--batch") == 0)
            one_batch = atoi(argv[++i]);
        else
            usage();
    }
    if (target == NULL || sessions < 1 || scale <= 0 || content_bytes < 0 || threads < 1 ||
        one_batch < 0 || one_batch > 100000)
        usage();
    log_init("bench_store", LOG_WARN);

    char *content = mem_alloc((size_t)content_bytes + 1);
    for (int i = 0; i < content_bytes; i++)
        content[i] = (char)('a' + i % 26);
    content[content_bytes] = '\0';

    cli *c = cli_create(threads, 64 << 20);
    cli_channel *ch = cli_channel_create(c, target, NULL, 0, NULL, NULL, 0);
    static const int all_batches[] = {1, 10, 100, 1000};
    const int *batches = one_batch > 0 ? &one_batch : all_batches;
    size_t nbatches = one_batch > 0 ? 1 : sizeof all_batches / sizeof all_batches[0];
    char(*ids)[64] = mem_calloc((size_t)sessions, sizeof *ids);
    long long *counts = mem_calloc((size_t)sessions, sizeof *counts);
    long long last_total = 0;
    int status = 0;

    printf("store-svc at %s: %d sessions written concurrently (one call in flight each), "
           "%d-byte contents\n\n",
           target, sessions, content_bytes);
    printf("%-28s %12s %14s\n", "run", "events", "events/s");
    for (size_t k = 0; k < nbatches; k++) {
        long long total = (long long)((double)base_events(batches[k]) * scale);
        if (total < batches[k])
            total = batches[k];
        int last = k + 1 == nbatches;
        double rate = run_append(ch, batches[k], total, sessions, content, "w", last ? ids : NULL,
                                 last ? counts : NULL);
        char name[64];
        snprintf(name, sizeof name, "AppendEvents, batch %d", batches[k]);
        print_row(name, total, rate);
        if (rate < 0)
            status = 1;
        else if (last)
            last_total = total;
    }
    if (list && last_total > 0) {
        char name[64];
        double rate = run_read(ch, ids, sessions, last_total);
        snprintf(name, sizeof name, "ListEvents, %d streams", sessions);
        if (rate < 0)
            status = 1;
        print_row(name, last_total, rate);
        /* One stream alone: what a single reader gets. */
        rate = run_read(ch, ids, 1, counts[0]);
        snprintf(name, sizeof name, "ListEvents, 1 stream");
        if (rate < 0)
            status = 1;
        print_row(name, counts[0], rate);
    }
    mem_free(counts);
    mem_free(ids);
    mem_free(content);
    cli_destroy(&c);
    return status;
}
