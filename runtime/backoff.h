/* backoff — how long to wait before trying again: exponential growth from a
 * base to a cap, spread by random jitter so that the many clients refused
 * at once (a database restart, a rate-limited model) do not all come back
 * at once.
 *
 * A backoff is a small value kept per thing retried (a connection, a
 * request, a session's event log). It is not locked: one thread at a time.
 * Its random numbers come from a generator per thread, seeded from the
 * kernel on first use, or by backoff_seed() where a test wants the same
 * numbers every run. */
#ifndef CONVO_BACKOFF_H
#define CONVO_BACKOFF_H

#include <stdint.h>

typedef enum backoff_jitter {
    /* base, 2 base, 4 base, ... cap, the same on every process: for a
     * schedule replicas must agree on (it is computed from shared state). */
    BACKOFF_NONE,
    /* Uniform in [0, that ceiling]: the least contention for a shared
     * resource, though a retry may come at once. */
    BACKOFF_FULL,
    /* Uniform in [base, BACKOFF_SPREAD x the previous wait], capped: never
     * below base (no hot loop) and as spread out as full jitter. */
    BACKOFF_DECORRELATED,
} backoff_jitter;

/* Each step's ceiling is this many times the one before. */
#define BACKOFF_GROWTH 2
/* A decorrelated wait is at most this many times the previous one. */
#define BACKOFF_SPREAD 3

typedef struct backoff {
    int64_t base_ms, cap_ms;
    backoff_jitter jitter;
    int attempts;    /* failures since the last reset */
    int64_t last_ms; /* the wait last returned; 0 after a reset */
} backoff;

/* Starts a backoff with no failure yet; base_ms >= 1 and cap_ms >= base_ms
 * (each is raised to that when it is not). */
void backoff_init(backoff *b, int64_t base_ms, int64_t cap_ms, backoff_jitter jitter);
/* Counts a failure and returns how long to wait before the next try: in
 * [0, cap_ms] (in [base_ms, cap_ms] unless BACKOFF_FULL). */
int64_t backoff_next(backoff *b);
/* A success: the next failure waits from base again. */
void backoff_reset(backoff *b);

/* The wait without jitter before try `attempt` + 1 (attempt >= 1 failures so
 * far): base_ms x BACKOFF_GROWTH^(attempt - 1), at most cap_ms, without
 * overflowing. */
int64_t backoff_ceiling(int64_t base_ms, int64_t cap_ms, int attempt);

/* This thread's random numbers: uniform in [lo, hi] (lo when hi <= lo). */
int64_t backoff_rand_between(int64_t lo, int64_t hi);
/* Seeds this thread's generator: the same seed, the same numbers. */
void backoff_seed(uint64_t seed);

#endif
