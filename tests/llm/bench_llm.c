/* bench_llm — not a test: tokens per second relayed by one llm-svc from the
 * offline model (flat out), for 1, 100 and 1000 concurrent Chat streams,
 * and the time llm-svc adds to the first token (its first token minus the
 * offline model's own, asked directly with libcurl).
 *
 *   bench_llm LLM_ADDR MODEL_URL [WORDS]
 *   e.g. bench_llm 127.0.0.1:50052 http://127.0.0.1:8089/v1 200 */
#include "cli.h"
#include "mem.h"
#include "rpc.h"

#include "convo_methods.h"

#include <curl/curl.h>
#include <time.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Microseconds: a first token on localhost takes well under a millisecond. */
static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static atomic_long tokens, streams_done, failures;
static _Atomic int64_t first_token_us;

static int on_msg(void *arg, const ProtobufCMessage *m)
{
    const Convo__V1__ChatEvent *ev = (const Convo__V1__ChatEvent *)m;
    if (ev->event_case == CONVO__V1__CHAT_EVENT__EVENT_TOKEN) {
        int64_t zero = 0;
        atomic_compare_exchange_strong(&first_token_us, &zero, now_us());
        atomic_fetch_add(&tokens, 1);
    } else if (ev->event_case == CONVO__V1__CHAT_EVENT__EVENT_ERROR) {
        atomic_fetch_add(&failures, 1);
    }
    return 0;
}

static void on_done(void *arg, rpc_code code, const char *msg, ProtobufCMessage *resp)
{
    if (code != RPC_OK)
        atomic_fetch_add(&failures, 1);
    atomic_fetch_add(&streams_done, 1);
}

/* Runs n streams at once; returns the wall time in ms. */
static int64_t run(cli_channel *ch, int n, int words)
{
    char msg[64];
    snprintf(msg, sizeof msg, "bench [[words:%d]]", words);
    atomic_store(&tokens, 0);
    atomic_store(&streams_done, 0);
    atomic_store(&first_token_us, 0);
    int64_t t0 = rpc_now_ms();
    for (int i = 0; i < n; i++) {
        Convo__V1__ChatRequest r = CONVO__V1__CHAT_REQUEST__INIT;
        r.session_id = "bench";
        r.user_id = "bench";
        r.message = msg;
        cli_opts o = {.timeout_ms = 120000};
        if (cli_stream(ch, &convo__v1__llm__chat__method, &r.base, &o, on_msg, on_done, NULL,
                       NULL) != 0) {
            atomic_fetch_add(&failures, 1);
            atomic_fetch_add(&streams_done, 1);
        }
    }
    while (atomic_load(&streams_done) < n)
        usleep(1000);
    return rpc_now_ms() - t0;
}

static size_t on_curl(char *p, size_t sz, size_t n, void *arg)
{
    int64_t *t = arg;
    if (*t == 0 && memmem(p, sz * n, "\"content\":\"w", 12) != NULL)
        *t = now_us();
    return sz * n;
}

/* Time to the first token asked straight from the offline model. */
static int64_t direct_ttft(const char *url)
{
    char full[512];
    snprintf(full, sizeof full, "%s/chat/completions", url);
    const char *body = "{\"model\":\"m\",\"stream\":true,\"messages\":[{\"role\":\"user\","
                       "\"content\":\"bench [[words:5]]\"}]}";
    CURL *e = curl_easy_init();
    int64_t first = 0;
    struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/json");
    curl_easy_setopt(e, CURLOPT_URL, full);
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_curl);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, &first);
    int64_t t0 = now_us();
    curl_easy_perform(e);
    curl_slist_free_all(h);
    curl_easy_cleanup(e);
    return first - t0;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: bench_llm LLM_ADDR MODEL_URL [WORDS]\n");
        return 2;
    }
    int words = argc > 3 ? atoi(argv[3]) : 200;
    curl_global_init(CURL_GLOBAL_DEFAULT);
    cli *c = cli_create(2, 4 << 20);
    char err[400];
    cli_channel *ch = cli_channel_create(c, argv[1], NULL, 0, NULL, err, sizeof err);
    if (ch == NULL) {
        fprintf(stderr, "bench_llm: %s\n", err);
        return 2;
    }
    run(ch, 1, 5); /* warm the channel */
    printf("%-8s %-8s %-10s %-12s %s\n", "streams", "tokens", "wall_ms", "tokens/s", "failures");
    const int counts[] = {1, 100, 1000};
    for (size_t i = 0; i < 3; i++) {
        atomic_store(&failures, 0);
        int64_t ms = run(ch, counts[i], words);
        long tok = atomic_load(&tokens);
        printf("%-8d %-8ld %-10lld %-12.0f %ld\n", counts[i], tok, (long long)ms,
               ms > 0 ? tok * 1000.0 / (double)ms : 0.0, atomic_load(&failures));
    }
    /* First token: 20 sequential single streams each way, medians. */
    int64_t via[20], direct[20];
    for (int i = 0; i < 20; i++) {
        int64_t t0 = now_us();
        run(ch, 1, 5);
        via[i] = atomic_load(&first_token_us) - t0;
        direct[i] = direct_ttft(argv[2]);
    }
    for (int i = 0; i < 20; i++)
        for (int j = i + 1; j < 20; j++) {
            if (via[j] < via[i]) {
                int64_t x = via[i];
                via[i] = via[j];
                via[j] = x;
            }
            if (direct[j] < direct[i]) {
                int64_t x = direct[i];
                direct[i] = direct[j];
                direct[j] = x;
            }
        }
    printf("first token: via llm-svc %lld us, direct %lld us (medians of 20): llm-svc adds "
           "%lld us\n",
           (long long)via[10], (long long)direct[10], (long long)(via[10] - direct[10]));
    cli_destroy(&c);
    curl_global_cleanup();
    return 0;
}
