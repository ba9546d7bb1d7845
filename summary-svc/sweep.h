/* sweep — the periodic search for ended sessions still without a summary.
 *
 * Every interval one thread first has store-svc end the live sessions whose
 * gateway stopped keeping them alive (EndAbandonedSessions: it died), then
 * asks for pending sessions
 * (ListUnsummarizedSessions: ended, no live lease) and hands those that are
 * due to the service, never more than it has room for, so the backlog waits
 * in the database, not in memory. This is what makes summaries durable: a
 * session whose Summarize was never sent (the gateway died), was refused (a
 * full queue) or failed (llm-svc down) is found again here.
 *
 * Retries back off: attempt n+1 is due sweep_due_us() after the session
 * ended, and the service may refuse sessions it failed itself recently.
 * Sessions whose attempts are used up without a verdict (a worker died
 * mid-attempt) are marked FAILED here (under a lease that counts no
 * attempt, ClaimSummary.give_up). Several replicas sweep the same
 * table; the lease taken by each job keeps them from doing a session
 * twice. */
#ifndef SUMMARY_SWEEP_H
#define SUMMARY_SWEEP_H

#include "cli.h"

#include <stdint.h>

typedef struct sweep_cfg {
    int64_t interval_ms;    /* between two sweeps */
    int64_t delay_ms;       /* a session is left alone this long after its end */
    int64_t backoff_ms;     /* the wait before the 2nd attempt; doubled each time */
    int64_t backoff_max_ms; /* the longest wait between two attempts */
    int32_t max_attempts;   /* attempts per session; then FAILED */
    uint32_t batch;         /* sessions listed per sweep */
    int64_t store_timeout_ms;
    const char *worker_id;
} sweep_cfg;

/* What the sweep needs from the service. */
typedef struct sweep_hooks {
    /* How many more sessions may be handed over now (free workers). */
    int (*room)(void *arg);
    /* Whether llm-svc is believed reachable; when not, the sweep skips its
     * round instead of spending attempts. May block briefly (a health
     * check) on the sweep thread. */
    int (*llm_ok)(void *arg);
    /* Whether the service will retry this session now (its own backoff
     * after a failure here). */
    int (*may_retry)(void *arg, const char *session_id);
    /* Hands a session over. Returns 0 when queued, 1 when it is already in
     * progress here, < 0 when there is no room. */
    int (*submit)(void *arg, const char *session_id);
    void *arg;
    /* May be NULL: how many pending sessions a sweep listed (at most the
     * batch), for the backlog metric. */
    void (*listed)(void *arg, size_t pending);
} sweep_hooks;

typedef struct sweep sweep;

/* When attempt `attempts` + 1 of a session that ended at end_time_us is
 * due: delay_ms after the end for the first, then waits of backoff_ms,
 * 2 * backoff_ms, ... (each at most backoff_max_ms) after that. Pure. */
int64_t sweep_due_us(const sweep_cfg *cfg, int64_t end_time_us, int32_t attempts);

/* Starts the sweep thread; the first sweep runs at once. `cfg` is copied
 * (worker_id must outlive the sweep). */
sweep *sweep_start(const sweep_cfg *cfg, cli_channel *store, const sweep_hooks *hooks);
/* Stops the thread (cancelling a call in flight) and frees; clears *sw. */
void sweep_stop(sweep **sw);

#endif
