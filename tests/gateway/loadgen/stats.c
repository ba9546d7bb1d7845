#include "stats.h"

#include "mem.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct turn_sample {
    double t0; /* when the turn started */
    double ms; /* its first token came this long after */
} turn_sample;

typedef struct span {
    double from, to;
} span;

struct stats {
    double origin;
    turn_sample *turns;
    size_t nturns, cap_turns;
    span *spans;
    size_t nspans, cap_spans;
    unsigned *buckets; /* tokens that arrived in each ms after origin */
    size_t nbuckets;
    long long tokens, frames, errors;
    char *kinds[STATS_MAX_KINDS];
    size_t nkinds;
    FILE *turn_log;
    const char *path;
    double wall_offset; /* realtime - monotonic, ms */
};

double stats_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

stats *stats_create(double origin_ms)
{
    stats *s = mem_calloc(1, sizeof *s);
    s->origin = origin_ms;
    struct timespec rt;
    clock_gettime(CLOCK_REALTIME, &rt);
    s->wall_offset = (double)rt.tv_sec * 1e3 + (double)rt.tv_nsec / 1e6 - stats_now_ms();
    return s;
}

void stats_destroy(stats **sp)
{
    stats *s = *sp;
    if (s == NULL)
        return;
    *sp = NULL;
    for (size_t i = 0; i < s->nkinds; i++)
        mem_free(s->kinds[i]);
    mem_free(s->turns);
    mem_free(s->spans);
    mem_free(s->buckets);
    mem_free(s);
}

static void *grow(void *p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return p;
    size_t n = *cap ? *cap : 64;
    while (n < need)
        n *= 2;
    p = mem_realloc(p, n * elem);
    memset((char *)p + *cap * elem, 0, (n - *cap) * elem);
    *cap = n;
    return p;
}

void stats_first_token(stats *s, double t0, double now)
{
    s->turns = grow(s->turns, &s->cap_turns, s->nturns + 1, sizeof *s->turns);
    s->turns[s->nturns++] = (turn_sample){t0, now - t0};
}

void stats_token(stats *s, double now)
{
    s->tokens++;
    double at = now - s->origin;
    if (at < 0)
        at = 0;
    size_t b = (size_t)at;
    s->buckets = grow(s->buckets, &s->nbuckets, b + 1, sizeof *s->buckets);
    s->buckets[b]++;
}

void stats_frame(stats *s)
{
    s->frames++;
}

void stats_turn_log(stats *s, FILE *f, const char *path)
{
    s->turn_log = f;
    s->path = path;
}

void stats_turn(stats *s, const char *id, int turn, double t0, double first, double end)
{
    if (s->turn_log == NULL)
        return;
    double wall = t0 + s->wall_offset;
    time_t secs = (time_t)(wall / 1e3);
    struct tm tm;
    gmtime_r(&secs, &tm);
    char when[32];
    strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", &tm);
    long us = (long)((wall - (double)secs * 1e3) * 1e3);
    fprintf(s->turn_log,
            "{\"path\":\"%s\",\"session_id\":\"%s\",\"turn\":%d,\"start\":\"%s.%06ldZ\","
            "\"start_monotonic_s\":%.6f,\"first_token_ms\":%.3f,\"end_ms\":%.3f}\n",
            s->path, id, turn, when, us, t0 / 1e3, first > 0 ? first - t0 : -1.0, end - t0);
}

void stats_span(stats *s, double from, double to)
{
    s->spans = grow(s->spans, &s->cap_spans, s->nspans + 1, sizeof *s->spans);
    s->spans[s->nspans++] = (span){from, to};
}

void stats_error(stats *s, const char *kind)
{
    s->errors++;
    for (size_t i = 0; i < s->nkinds; i++)
        if (strcmp(s->kinds[i], kind) == 0)
            return;
    if (s->nkinds < STATS_MAX_KINDS)
        s->kinds[s->nkinds++] = mem_strdup(kind);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double stats_percentile(const double *sorted, size_t n, double p)
{
    if (n == 0)
        return NAN;
    size_t i = (size_t)floor(p / 100.0 * (double)n);
    return sorted[i < n ? i : n - 1];
}

/* First-token figures of the turns that started within [from, to]. */
static void ttft_figures(const stats *s, double from, double to, stats_figures *f)
{
    double *ms = mem_alloc((s->nturns ? s->nturns : 1) * sizeof *ms);
    size_t n = 0;
    for (size_t i = 0; i < s->nturns; i++)
        if (s->turns[i].t0 >= from && s->turns[i].t0 <= to)
            ms[n++] = s->turns[i].ms;
    qsort(ms, n, sizeof *ms, cmp_double);
    f->answers = n;
    f->p50_ms = stats_percentile(ms, n, 50);
    f->p95_ms = stats_percentile(ms, n, 95);
    f->p99_ms = stats_percentile(ms, n, 99);
    mem_free(ms);
}

void stats_summarize(const stats *s, int sessions, double seconds, stats_summary *out)
{
    memset(out, 0, sizeof *out);
    out->errors = s->errors;
    out->tokens = s->tokens;
    out->frames = s->frames;
    ttft_figures(s, -INFINITY, INFINITY, &out->all);
    out->all.seconds = seconds;
    out->all.tokens_per_s = seconds > 0 ? (double)s->tokens / seconds : 0;
    out->nkinds = s->nkinds;
    for (size_t i = 0; i < s->nkinds; i++)
        out->kinds[i] = s->kinds[i];

    if (sessions <= 0 || s->nspans < (size_t)sessions)
        return;
    double from = -INFINITY, to = INFINITY;
    for (size_t i = 0; i < s->nspans; i++) {
        from = fmax(from, s->spans[i].from);
        to = fmin(to, s->spans[i].to);
    }
    if (!(to > from))
        return;
    long long tokens = 0;
    for (size_t b = 0; b < s->nbuckets; b++) {
        double at = s->origin + (double)b;
        if (at >= from && at <= to)
            tokens += s->buckets[b];
    }
    out->has_steady = 1;
    ttft_figures(s, from, to, &out->steady);
    out->steady.seconds = (to - from) / 1000.0;
    out->steady.tokens_per_s = (double)tokens / out->steady.seconds;
}
