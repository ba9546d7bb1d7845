/* bench_rpc — the gRPC runtime's throughput over loopback TCP: unary calls
 * per second with a window of calls in flight from one client thread, and
 * streamed messages per second on one server stream. Not a test: it prints
 * figures (README, "Benchmarks").
 *
 *   bench_rpc [unary_calls] [window] [stream_messages]
 *
 * With TLS_CERT_FILE, TLS_KEY_FILE and TLS_CA_FILE set (a certificate for
 * "gateway" naming 127.0.0.1), server and client run mutual TLS. */
#include "cli.h"
#include "log.h"
#include "collector.h"
#include "mem.h"
#include "testsvc_server.h"
#include "tls.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

typedef struct window {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    cli_channel *ch;
    long started, done, failed, total;
} window;

static void start_one(window *w);

static void on_done(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp)
{
    window *w = arg;
    if (resp != NULL)
        protobuf_c_message_free_unpacked(resp, NULL);
    pthread_mutex_lock(&w->mu);
    w->done++;
    if (code != RPC_OK)
        w->failed++;
    int more = w->started < w->total;
    if (more)
        w->started++;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
    if (more)
        start_one(w);
}

static void start_one(window *w)
{
    Convo__Test__EchoRequest req = CONVO__TEST__ECHO_REQUEST__INIT;
    req.text = "bench";
    cli_opts opts = {.timeout_ms = 30000};
    if (cli_unary(w->ch, &convo__test__test__echo__method, &req.base, &opts, on_done, w, NULL) !=
        0) {
        fprintf(stderr, "cli_unary failed\n");
        exit(1);
    }
}

int main(int argc, char **argv)
{
    long calls = argc > 1 ? atol(argv[1]) : 100000;
    long win = argc > 2 ? atol(argv[2]) : 100;
    long messages = argc > 3 ? atol(argv[3]) : 1000000;
    log_init("bench_rpc", LOG_WARN);

    /* The TLS options from the environment only (the arguments are figures). */
    tls_opts topts = {0};
    conf_section sec = CONF_SECTION(tls_opts, &topts);
    char *no_args[] = {argv[0], NULL};
    tls *mtls = NULL;
    char err[512];
    if (conf_parse(1, no_args, "bench_rpc", "the runtime's figures", &sec, 1) != 0)
        return 2;
    if (tls_create(&topts, &mtls, err, sizeof err) != 0) {
        fprintf(stderr, "bench_rpc: %s\n", err);
        conf_free(&sec, 1);
        return 2;
    }
    testsvc_server t;
    srv_opts o = testsvc_default_opts();
    o.threads = 1;
    if (testsvc_server_start_tls(&t, &o, mtls) != 0)
        return 1;
    cli *c = cli_create(1, 0);
    cli_use_tls(c, mtls);
    cli_channel *ch = cli_channel_create(c, t.target, NULL, 0, NULL, NULL, 0);

    window w = {
        .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER, .ch = ch, .total = calls};
    int64_t t0 = rpc_now_ms();
    pthread_mutex_lock(&w.mu);
    w.started = win < calls ? win : calls;
    pthread_mutex_unlock(&w.mu);
    for (long i = 0; i < (win < calls ? win : calls); i++)
        start_one(&w);
    pthread_mutex_lock(&w.mu);
    while (w.done < calls)
        pthread_cond_wait(&w.cv, &w.mu);
    pthread_mutex_unlock(&w.mu);
    double unary_s = (double)(rpc_now_ms() - t0) / 1000.0;

    collector col;
    collector_init(&col);
    Convo__Test__CountRequest req = CONVO__TEST__COUNT_REQUEST__INIT;
    req.count = messages;
    req.payload_bytes = 32;
    t0 = rpc_now_ms();
    cli_stream(ch, &convo__test__test__count__method, &req.base, NULL, collector_on_msg,
               collector_on_done, &col, NULL);
    collector_wait(&col, col.done, 600000);
    double stream_s = (double)(rpc_now_ms() - t0) / 1000.0;

    printf("%-44s %12s\n", "measure", mtls != NULL ? "mutual TLS" : "plaintext");
    printf("%-44s %12.0f\n", "unary calls/s (1 client thread, window)", (double)calls / unary_s);
    printf("%-44s %12ld\n", "  calls", calls);
    printf("%-44s %12ld\n", "  window (calls in flight)", win);
    printf("%-44s %12ld\n", "  failed", w.failed);
    printf("%-44s %12.0f\n", "streamed messages/s (one stream, 32 B)",
           (double)col.received / stream_s);
    printf("%-44s %12ld\n", "  messages", (long)col.received);
    printf("%-44s %12ld\n", "  out of order", (long)col.out_of_order);
    printf("%-44s %12s\n", "  status", rpc_code_name(col.code));

    cli_destroy(&c);
    testsvc_server_stop(&t);
    tls_destroy(&mtls);
    conf_free(&sec, 1);
    return w.failed == 0 && col.code == RPC_OK && col.out_of_order == 0 ? 0 : 1;
}
