/* pool — a fixed set of worker threads and a bounded FIFO of jobs.
 *
 * For work that blocks (a session's summary waits on store-svc and the
 * model for seconds or minutes): it runs here, never on a gRPC
 * completion-queue thread. The queue has a hard bound; a full queue is the
 * caller's decision to make (refuse, or leave it to the sweep). */
#ifndef SUMMARY_POOL_H
#define SUMMARY_POOL_H

#include <stddef.h>

#define POOL_EFULL    (-1) /* the queue holds its maximum */
#define POOL_ESTOPPED (-2) /* the pool is shutting down */

typedef struct pool pool;
typedef void (*pool_fn)(void *arg);

/* Starts `threads` workers (>= 1) over a queue of at most `queue_max` jobs
 * waiting (>= 1). */
pool *pool_create(int threads, size_t queue_max);

/* Queues fn(arg). Returns 0, POOL_EFULL or POOL_ESTOPPED; on error fn is
 * never called and arg stays the caller's. Thread-safe. */
int pool_submit(pool *p, pool_fn fn, void *arg);

/* Jobs waiting, and jobs running. Thread-safe. */
size_t pool_queued(pool *p);
size_t pool_running(pool *p);

/* Stops taking jobs, runs every job already queued (a job that must end
 * quickly checks its own stop flag), joins the workers and frees the pool;
 * clears *p. */
void pool_destroy(pool **p);

const char *pool_strerror(int err);

#endif
