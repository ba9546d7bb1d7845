/* pool — a bounded job queue served by a few worker threads, each with its
 * own PostgreSQL connection.
 *
 * The gRPC threads only check a request and submit a job; a worker runs it
 * (blocking on libpq) and finishes the call from its own thread. Workers
 * connect in the background, migrate the schema (or wait for it) on their
 * first connection, notice a connection the server dropped before using
 * it, and reconnect with capped, jittered exponential backoff. While no
 * worker is connected, jobs fail at once (POOL_EUNAVAIL) instead of
 * queueing behind an outage; on_ready reports the transitions (health).
 *
 * The queue is bounded in jobs and in bytes; a submit past either bound is
 * refused (POOL_EFULL) and counted, and the caller answers
 * RESOURCE_EXHAUSTED.
 *
 * Group commit: jobs that name a group function (AppendEvents) are run
 * together. A worker that takes one also takes the other queued jobs of
 * that function, in queue order, up to group_max_jobs and group_max_weight,
 * and goes on taking those that arrive while they keep coming (no gap of
 * four times their recent mean gap, group_idle_ms at most), until the first
 * has waited group_window_ms. One worker gathers at a time; the others
 * serve everything else meanwhile.
 *
 * The queue is not runtime wq, a FIFO: group commit takes jobs out of the
 * middle (a group's jobs past others, while a gathering worker leaves them
 * to the rest), it is bounded in bytes as well as jobs with work already
 * admitted let past the bound, and its workers wait on connection state
 * (reconnect attempts, idle checks) under the same lock as the jobs. */
#ifndef CONVO_POOL_H
#define CONVO_POOL_H

#include "db.h"
#include "metrics.h"

#include <stddef.h>
#include <stdint.h>

#define POOL_EFULL     (-1) /* the queue is at its bound */
#define POOL_ESHUTDOWN (-2) /* the pool is stopping */
#define POOL_EUNAVAIL  (-3) /* no database connection */

typedef struct pool pool;
typedef struct pool_job pool_job;

/* Runs a job on a worker: with a connected `conn` and err 0, or with conn
 * NULL and err POOL_EUNAVAIL / POOL_ESHUTDOWN when it cannot run. Called
 * exactly once per accepted job; the job (memory included) is the
 * callback's from then on. */
typedef void (*pool_job_fn)(pool_job *job, db_conn *conn, int err);

/* Runs n jobs (n >= 1, oldest first) together on a worker with a connected
 * `conn`; each job is then the callback's, as with pool_job_fn. */
typedef void (*pool_group_fn)(pool_job **jobs, size_t n, db_conn *conn);

/* Embedded first in the caller's own job struct. */
struct pool_job {
    pool_job_fn fn;       /* runs it alone, and fails it (no connection, shutdown) */
    pool_group_fn group;  /* NULL, or runs it with others of the same function */
    size_t weight;        /* its share of group_max_weight (events) */
    size_t bytes;         /* memory the job holds, for the byte bound */
    int64_t submitted_us; /* set by pool_submit (monotonic) */
    pool_job *next;
    uint64_t queued_us; /* the pool's: when it was queued (metrics) */
};

typedef struct pool_config {
    db_settings db;
    int workers;             /* threads and connections, >= 1 */
    size_t max_jobs;         /* queued jobs (not counting running ones) */
    size_t max_bytes;        /* bytes held by queued jobs */
    int retry_min_ms;        /* first reconnect delay */
    int retry_max_ms;        /* reconnect delay cap */
    int migrate;             /* apply migrations on the first connection; else wait for them */
    int group_window_ms;     /* the longest a group's first job waits for others */
    int group_idle_ms;       /* the longest gap without a job that keeps a group open */
    size_t group_max_jobs;   /* jobs in one group, >= 1 */
    size_t group_max_weight; /* their weights' sum (a first job heavier than it runs alone) */
    /* Called from a worker when the pool becomes ready (a worker is
     * connected and the schema is current) or unready (none is). */
    void (*on_ready)(void *arg, int ready);
    void *arg;
    metrics *metrics; /* queue and connection metrics; NULL: none */
} pool_config;

typedef struct pool_stats {
    uint64_t rejected;    /* submits refused: queue full */
    uint64_t unavailable; /* jobs failed: no connection */
    uint64_t reconnects;  /* successful connections after the first */
    size_t queued;        /* jobs waiting now */
    int connected;        /* workers connected now */
    uint64_t groups;      /* group runs */
    uint64_t grouped;     /* jobs in them */
} pool_stats;

/* Starts the workers (they connect in the background) and returns at once.
 * The config is copied. */
pool *pool_create(const pool_config *cfg);
/* Queues a job. Returns 0 (fn will be called), POOL_EFULL or
 * POOL_ESHUTDOWN (fn will not be called). Thread-safe, never blocks. */
int pool_submit(pool *p, pool_job *job);
/* Queues the next step of work already admitted (a stream's next page),
 * past the bounds: one such job per stream at a time, and streams are
 * bounded by the server's --max-calls. Returns 0 or POOL_ESHUTDOWN. */
int pool_resubmit(pool *p, pool_job *job);
void pool_get_stats(pool *p, pool_stats *st);
/* Stops the workers after the jobs they are running, calls the queued
 * jobs with POOL_ESHUTDOWN, closes the connections, frees; clears *p. */
void pool_destroy(pool **p);

#endif
