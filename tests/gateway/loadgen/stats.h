/* stats — the figures of one path (through the gateway, or straight from
 * the model): time to first token, tokens received, errors, and the same
 * over the steady window.
 *
 * The steady window runs from the moment the last session began its first
 * measured turn to the moment the first session finished: all sessions are
 * active at once. Its tokens/s counts the tokens that arrived inside it and
 * its first-token figures the turns that started inside it. Token arrivals
 * are counted in 1 ms buckets (memory bounded by the run's length, not by
 * its tokens), so the window's edges are exact to a millisecond.
 *
 * Times are ms on one monotonic clock. One thread. */
#ifndef CONVO_LOADGEN_STATS_H
#define CONVO_LOADGEN_STATS_H

#include <stddef.h>
#include <stdio.h>

#define STATS_MAX_KINDS 16 /* distinct error texts kept (the rest are counted) */

typedef struct stats stats;

/* Now, in ms on the monotonic clock every time here is taken on. */
double stats_now_ms(void);

/* origin_ms: the run's start; nothing is recorded before it. */
stats *stats_create(double origin_ms);
void stats_destroy(stats **s);

/* A measured turn that started at t0 got its first token at now. */
void stats_first_token(stats *s, double t0, double now);
/* One token (or SSE content chunk) arrived. */
void stats_token(stats *s, double now);
/* One frame of any kind arrived (the client's own load, for its figures). */
void stats_frame(stats *s);
/* Writes a JSON line per turn to f from now on (the --turn-log; f stays
 * the caller's), each naming `path`: wall-clock start with microseconds
 * (to line up with the services' logs) and the first token and end in ms
 * after it; also the monotonic start, to line up with `perf sched record
 * -k CLOCK_MONOTONIC`. */
void stats_turn_log(stats *s, FILE *f, const char *path);
/* A turn of session `id` that started at t0 ended at end; first is when its
 * first token came (0: none). Written only with a turn log. */
void stats_turn(stats *s, const char *id, int turn, double t0, double first, double end);
/* A session ran every measured turn from `from` to `to`. */
void stats_span(stats *s, double from, double to);
/* Something failed; `kind` (copied) says what, for the error list. */
void stats_error(stats *s, const char *kind);

typedef struct stats_figures {
    size_t answers; /* turns counted */
    double p50_ms, p95_ms, p99_ms;
    double seconds;
    double tokens_per_s;
} stats_figures;

typedef struct stats_summary {
    long long errors;
    long long tokens;
    long long frames;
    stats_figures all;
    int has_steady; /* every one of `sessions` sessions finished and the window is not empty */
    stats_figures steady;
    size_t nkinds;
    const char *kinds[STATS_MAX_KINDS]; /* valid while s lives */
} stats_summary;

/* Figures over the run (which lasted `seconds`) and over the steady window
 * of `sessions` sessions. Percentiles of an empty set are NaN. */
void stats_summarize(const stats *s, int sessions, double seconds, stats_summary *out);

/* The p-th percentile (0..100) of n sorted values, as the Node generator
 * takes it: the value at floor(p/100 * n), the last one at most. */
double stats_percentile(const double *sorted, size_t n, double p);

#endif
