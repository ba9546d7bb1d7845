/* loadgen — the project's load generator for the gateway (not a test).
 *
 * Opens N WebSocket sessions, runs T turns each, checks that every token of
 * every answer arrived in order ("w1 w2 ... wW" from the offline model's
 * [[words:W]] rule), and reports time to first token p50/p95/p99, tokens
 * per second and errors, over the whole run and over its steady window
 * (all N sessions active). With --model it first sends the same requests
 * straight to the offline model (SSE over HTTP, carrying the same history),
 * so the time the whole path adds is measured side by side in one run.
 *
 * One thread, one libev loop: libwebsockets for the sessions, libcurl's
 * socket interface for the direct path. It reports its own CPU time per
 * path, so a run shows whether the client kept up. See tests/gateway/README.md. */
#include "direct.h"
#include "plan.h"
#include "stats.h"
#include "wsrun.h"

#include "conf.h"
#include "mem.h"
#include "proc.h"

#include <curl/curl.h>
#include <ev.h>
#include <json-c/json.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define LOADGEN_OPTS(X, S)                                                                         \
    X(S, gateway, STR, "gateway", "LOADGEN_GATEWAY", "127.0.0.1:8000", "the gateway's HOST:PORT")  \
    X(S, model, STR, "model", "LOADGEN_MODEL", "",                                                 \
      "the offline model's HOST:PORT: run the same turns straight to it first (empty: don't)")     \
    X(S, sessions, INT, "sessions", "LOADGEN_SESSIONS", "100", "sessions at once (at least 1)")    \
    X(S, turns, INT, "turns", "LOADGEN_TURNS", "5", "turns per session (at least 1)")              \
    X(S, warmup, INT, "warmup", "LOADGEN_WARMUP", "1",                                             \
      "first turns of each session left out of the first-token figures")                           \
    X(S, words, INT, "words", "LOADGEN_WORDS", "50", "tokens per answer (at least 1)")             \
    X(S, delay_ms, INT, "delay-ms", "LOADGEN_DELAY_MS", "0",                                       \
      "the model's pause between tokens; 0 streams flat out")                                      \
    X(S, stagger_ms, INT, "stagger-ms", "LOADGEN_STAGGER_MS", "0",                                 \
      "spread the sessions' starts evenly over this many ms; 0 starts them all at once")           \
    X(S, think_ms, INT, "think-ms", "LOADGEN_THINK_MS", "0",                                       \
      "a user's pause between an answer and the next message (0.5x to 1.5x of it); 0: none")       \
    X(S, timeout_ms, INT, "timeout-ms", "LOADGEN_TIMEOUT_MS", "120000",                            \
      "a session (a direct request) that takes longer fails")                                      \
    X(S, history_messages, INT, "history-messages", "LOADGEN_HISTORY_MESSAGES", "50",              \
      "earlier messages the direct path carries (the gateway's --history-messages)")               \
    X(S, max_frame_bytes, INT, "max-frame-bytes", "LOADGEN_MAX_FRAME_BYTES", "1048576",            \
      "largest WebSocket message accepted from the gateway")                                       \
    X(S, access_token_file, STR, "access-token-file", "LOADGEN_ACCESS_TOKEN_FILE", "",             \
      "access tokens, one a line: session i sends line i mod n as ?access_token=, and line k "     \
      "must be a token of user <user-prefix><k>")                                                  \
    X(S, user_prefix, STR, "user-prefix", "LOADGEN_USER_PREFIX", "load-",                          \
      "session i's user is <user-prefix><i mod users>")                                            \
    X(S, users, INT, "users", "LOADGEN_USERS", "0",                                                \
      "users the sessions are spread over (0: one per session; the token count with "              \
      "--access-token-file)")                                                                      \
    X(S, turn_log, STR, "turn-log", "LOADGEN_TURN_LOG", "",                                        \
      "write a JSON line per turn to this file (wall-clock start, first token, end), to line up "  \
      "slow turns with the services' logs")                                                        \
    X(S, seed, INT, "seed", "LOADGEN_SEED", "0", "think-time seed (0: from the clock)")            \
    X(S, json, BOOL, "json", "LOADGEN_JSON", "false", "print the figures as one JSON object")
CONF_DECLARE(loadgen_opts, LOADGEN_OPTS)

#define TOKENS_MAX 1000000 /* lines read from --access-token-file */

typedef struct path_result {
    const char *name;
    int ran;
    stats *st;
    stats_summary sum;
    double cpu_s; /* this process's CPU time during the run */
} path_result;

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

/* "HOST:PORT" into its parts; host is a new string. Returns 0 or -1. */
static int split_addr(const char *flag, const char *addr, char **host, int *port)
{
    const char *colon = strrchr(addr, ':');
    char *end;
    long p = colon ? strtol(colon + 1, &end, 10) : -1;
    if (colon == NULL || colon == addr || *end != '\0' || p < 1 || p > 65535) {
        fprintf(stderr, "loadgen: --%s: '%s' is not HOST:PORT\n", flag, addr);
        return -1;
    }
    *host = mem_strndup(addr, (size_t)(colon - addr));
    *port = (int)p;
    return 0;
}

/* The non-empty lines of the token file. Returns the count, or -1. */
static long read_tokens(const char *path, char ***out)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        fprintf(stderr, "loadgen: --access-token-file %s: cannot open it\n", path);
        return -1;
    }
    char **tokens = NULL, *line = NULL;
    size_t n = 0, cap = 0, linecap = 0;
    ssize_t len;
    int bad = 0;
    while (!bad && (len = getline(&line, &linecap, f)) >= 0) {
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r' || line[len - 1] == ' '))
            line[--len] = '\0';
        if (len == 0)
            continue;
        if (n == TOKENS_MAX) {
            fprintf(stderr, "loadgen: --access-token-file %s: more than %d tokens\n", path,
                    TOKENS_MAX);
            bad = 1;
            break;
        }
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            tokens = mem_realloc(tokens, cap * sizeof *tokens);
        }
        tokens[n++] = mem_strndup(line, (size_t)len);
    }
    free(line); /* getline's, not ours */
    fclose(f);
    if (n == 0 && !bad) {
        fprintf(stderr, "loadgen: --access-token-file %s: no token in it\n", path);
        bad = 1;
    }
    if (bad) {
        for (size_t i = 0; i < n; i++)
            mem_free(tokens[i]);
        mem_free(tokens);
        return -1;
    }
    *out = tokens;
    return (long)n;
}

static int check_opts(const loadgen_opts *o)
{
    if (o->sessions < 1 || o->turns < 1 || o->words < 1) {
        fprintf(stderr, "loadgen: --sessions, --turns and --words must be at least 1\n");
        return -1;
    }
    if (o->sessions > 1000000 || o->turns > 1000000 || o->words > 1000000) {
        fprintf(stderr, "loadgen: --sessions, --turns and --words are at most 1000000\n");
        return -1;
    }
    if (o->warmup >= o->turns) {
        fprintf(stderr, "loadgen: --warmup (%lld) leaves no measured turn of %lld\n", o->warmup,
                o->turns);
        return -1;
    }
    if (o->max_frame_bytes < 1024 || o->history_messages > 100000 || o->delay_ms > 600000) {
        fprintf(stderr, "loadgen: --max-frame-bytes is at least 1024, --history-messages at "
                        "most 100000, --delay-ms at most 600000\n");
        return -1;
    }
    return 0;
}

static void row(const char *name, size_t answers, const char *errors, const stats_figures *f)
{
    printf("%-26s%7zu%8s  %7.2f  %7.2f  %7.2f  %9.0f", name, answers, errors, f->p50_ms, f->p95_ms,
           f->p99_ms, f->tokens_per_s);
}

static void print_text(const loadgen_opts *o, path_result *res, size_t n)
{
    printf("sessions %lld, turns %lld, %lld tokens per answer, %lld ms per token, starts spread "
           "over %lld ms, %lld ms between answer and next message\n",
           o->sessions, o->turns, o->words, o->delay_ms, o->stagger_ms, o->think_ms);
    printf("path                      answers  errors  ttft p50   p95      p99      tokens/s\n");
    for (size_t i = 0; i < n; i++) {
        char errors[24];
        snprintf(errors, sizeof errors, "%lld", res[i].sum.errors);
        row(res[i].name, (size_t)(o->sessions * o->turns), errors, &res[i].sum.all);
        printf("\n");
    }
    if (n == 2)
        printf("added time to first token: p50 %.2f ms, p99 %.2f ms\n",
               res[1].sum.all.p50_ms - res[0].sum.all.p50_ms,
               res[1].sum.all.p99_ms - res[0].sum.all.p99_ms);
    int steady = 1;
    for (size_t i = 0; i < n; i++)
        steady &= res[i].sum.has_steady;
    if (steady) {
        printf("steady window (all %lld sessions active):\n", o->sessions);
        for (size_t i = 0; i < n; i++) {
            char name[40];
            snprintf(name, sizeof name, "  %s", res[i].name);
            row(name, res[i].sum.steady.answers, "", &res[i].sum.steady);
            printf("  (%.1f s)\n", res[i].sum.steady.seconds);
        }
        if (n == 2)
            printf("added time to first token, steady: p50 %.2f ms, p99 %.2f ms\n",
                   res[1].sum.steady.p50_ms - res[0].sum.steady.p50_ms,
                   res[1].sum.steady.p99_ms - res[0].sum.steady.p99_ms);
    }
    for (size_t i = 0; i < n; i++) {
        double secs = res[i].sum.all.seconds;
        printf("client, %s: %.2f CPU-s over %.1f s (%.0f%% of a core) for %lld frames, %.0f frames "
               "per CPU-second\n",
               res[i].name, res[i].cpu_s, secs, secs > 0 ? 100 * res[i].cpu_s / secs : 0,
               res[i].sum.frames, res[i].cpu_s > 0 ? (double)res[i].sum.frames / res[i].cpu_s : 0);
    }
    for (size_t i = 0; i < n; i++)
        for (size_t k = 0; k < res[i].sum.nkinds; k++)
            printf("error (%s): %s\n", res[i].name, res[i].sum.kinds[k]);
}

static json_object *num(double v)
{
    return isnan(v) ? NULL : json_object_new_double(v);
}

static json_object *figures_json(const stats_figures *f)
{
    json_object *o = json_object_new_object();
    json_object_object_add(o, "answers", json_object_new_int64((int64_t)f->answers));
    json_object_object_add(o, "ttft_p50_ms", num(f->p50_ms));
    json_object_object_add(o, "ttft_p95_ms", num(f->p95_ms));
    json_object_object_add(o, "ttft_p99_ms", num(f->p99_ms));
    json_object_object_add(o, "seconds", json_object_new_double(f->seconds));
    json_object_object_add(o, "tokens_per_s", json_object_new_double(f->tokens_per_s));
    return o;
}

static void print_json(const loadgen_opts *o, path_result *res, size_t n)
{
    json_object *top = json_object_new_object();
    json_object *opts = json_object_new_object();
    json_object_object_add(opts, "sessions", json_object_new_int64(o->sessions));
    json_object_object_add(opts, "turns", json_object_new_int64(o->turns));
    json_object_object_add(opts, "warmup", json_object_new_int64(o->warmup));
    json_object_object_add(opts, "words", json_object_new_int64(o->words));
    json_object_object_add(opts, "delayMs", json_object_new_int64(o->delay_ms));
    json_object_object_add(opts, "staggerMs", json_object_new_int64(o->stagger_ms));
    json_object_object_add(opts, "thinkMs", json_object_new_int64(o->think_ms));
    json_object_object_add(top, "options", opts);
    json_object *results = json_object_new_array(), *errors = json_object_new_array();
    for (size_t i = 0; i < n; i++) {
        const stats_summary *s = &res[i].sum;
        json_object *r = figures_json(&s->all);
        json_object_object_add(r, "path", json_object_new_string(res[i].name));
        json_object_object_add(r, "answers", json_object_new_int64(o->sessions * o->turns));
        json_object_object_add(r, "errors", json_object_new_int64(s->errors));
        json_object_object_add(r, "tokens", json_object_new_int64(s->tokens));
        json_object_object_add(r, "frames", json_object_new_int64(s->frames));
        json_object_object_add(r, "client_cpu_s", json_object_new_double(res[i].cpu_s));
        json_object_object_add(r, "steady", s->has_steady ? figures_json(&s->steady) : NULL);
        json_object_array_add(results, r);
        for (size_t k = 0; k < s->nkinds; k++)
            json_object_array_add(errors, json_object_new_string(s->kinds[k]));
    }
    json_object_object_add(top, "results", results);
    json_object_object_add(top, "errors", errors);
    printf("%s\n", json_object_to_json_string_ext(top, JSON_C_TO_STRING_PLAIN));
    json_object_put(top);
}

static int run_direct(struct ev_loop *loop, plan *p, const char *host, int port, FILE *turn_log,
                      path_result *r)
{
    double secs, cpu0 = cpu_seconds();
    r->st = stats_create(stats_now_ms());
    stats_turn_log(r->st, turn_log, "direct");
    if (direct_run(loop, p, host, port, r->st, &secs) != 0) {
        fprintf(stderr, "loadgen: libcurl could not be set up\n");
        return -1;
    }
    r->cpu_s = cpu_seconds() - cpu0;
    r->ran = 1;
    stats_summarize(r->st, p->sessions, secs, &r->sum);
    return 0;
}

static int run_gateway(struct ev_loop *loop, plan *p, const wsrun_target *t, FILE *turn_log,
                       path_result *r)
{
    double secs, cpu0 = cpu_seconds();
    r->st = stats_create(stats_now_ms());
    stats_turn_log(r->st, turn_log, "gateway");
    if (wsrun_run(loop, p, t, r->st, &secs) != 0) {
        fprintf(stderr, "loadgen: cannot create the WebSocket client (is libwebsockets' libev "
                        "plugin installed? Debian package libwebsockets-evlib-ev)\n");
        return -1;
    }
    r->cpu_s = cpu_seconds() - cpu0;
    r->ran = 1;
    stats_summarize(r->st, p->sessions, secs, &r->sum);
    return 0;
}

int main(int argc, char **argv)
{
    loadgen_opts o;
    memset(&o, 0, sizeof o);
    conf_section secs[] = {CONF_SECTION(loadgen_opts, &o)};
    plan p = {0};
    path_result res[2] = {{.name = "offline model direct"}, {.name = "through the gateway"}};
    char *gw_host = NULL, *model_host = NULL, *run_id = NULL, **tokens = NULL;
    long ntokens = 0;
    int gw_port = 0, model_port = 0, rc = 2;
    struct ev_loop *loop = NULL;
    FILE *turn_log = NULL;

    int c = conf_parse(argc, argv, "loadgen",
                       "load generator for the gateway: N sessions x T turns, every token checked",
                       secs, 1);
    if (c != 0) {
        rc = c > 0 ? 0 : 2;
        goto out;
    }
    if (check_opts(&o) != 0 || split_addr("gateway", o.gateway, &gw_host, &gw_port) != 0 ||
        (o.model[0] && split_addr("model", o.model, &model_host, &model_port) != 0))
        goto out;
    if (o.access_token_file[0] && (ntokens = read_tokens(o.access_token_file, &tokens)) < 0)
        goto out;
    if (o.turn_log[0] && (turn_log = fopen(o.turn_log, "w")) == NULL) {
        fprintf(stderr, "loadgen: --turn-log %s: cannot write it\n", o.turn_log);
        goto out;
    }

    plan_init(&p, (int)o.words, (int)o.delay_ms,
              o.seed ? (unsigned)o.seed : (unsigned)time(NULL) ^ (unsigned)getpid());
    p.sessions = (int)o.sessions;
    p.turns = (int)o.turns;
    p.warmup = (int)o.warmup;
    p.stagger_ms = (double)o.stagger_ms;
    p.think_ms = (double)o.think_ms;
    p.timeout_ms = (double)o.timeout_ms;
    p.history_messages = (int)o.history_messages;
    p.max_frame_bytes = (size_t)o.max_frame_bytes;

    proc_raise_fd_limit();
    signal(SIGPIPE, SIG_IGN);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    loop = ev_loop_new(EVFLAG_AUTO);
    if (loop == NULL) {
        fprintf(stderr, "loadgen: cannot create the event loop\n");
        goto out;
    }

    rc = 1;
    if (model_host != NULL && run_direct(loop, &p, model_host, model_port, turn_log, &res[0]) != 0)
        goto out;
    run_id = mem_asprintf("load-%d-%lld", (int)getpid(), (long long)time(NULL) * 1000);
    wsrun_target t = {
        .host = gw_host,
        .port = gw_port,
        .run_id = run_id,
        .user_prefix = o.user_prefix,
        .users = ntokens > 0   ? (int)ntokens
                 : o.users > 0 ? (int)o.users
                               : p.sessions,
        .tokens = tokens,
        .ntokens = (size_t)ntokens,
    };
    if (run_gateway(loop, &p, &t, turn_log, &res[1]) != 0)
        goto out;

    path_result *first = res[0].ran ? &res[0] : &res[1];
    size_t n = res[0].ran ? 2 : 1;
    if (o.json)
        print_json(&o, first, n);
    else
        print_text(&o, first, n);
    fflush(stdout);
    rc = res[0].sum.errors + res[1].sum.errors > 0 ? 1 : 0;
out:
    for (size_t i = 0; i < 2; i++)
        stats_destroy(&res[i].st);
    for (long i = 0; i < ntokens; i++)
        mem_free(tokens[i]);
    mem_free(tokens);
    if (loop != NULL)
        ev_loop_destroy(loop);
    if (turn_log != NULL)
        fclose(turn_log);
    curl_global_cleanup();
    plan_free(&p);
    mem_free(gw_host);
    mem_free(model_host);
    mem_free(run_id);
    conf_free(secs, 1);
    return rc;
}
