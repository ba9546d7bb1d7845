/* workers — a fixed set of threads running the jobs of a bounded work queue
 * (wq.h), for work that blocks (a summary waits on other services for
 * seconds or minutes): it runs here, never on a gRPC completion-queue
 * thread. A full queue is the caller's decision to make (refuse, or leave
 * the work for later). */
#ifndef CONVO_WORKERS_H
#define CONVO_WORKERS_H

#include "wq.h"

#include <stddef.h>

typedef struct workers workers;

/* Starts `threads` threads (>= 1) over a queue of at most `queue_max` jobs
 * waiting (>= 1). A thread that cannot start is fatal (logged, abort): a
 * service without its workers cannot do its job. */
workers *workers_create(int threads, size_t queue_max);
/* Queues fn(arg) for a thread. Returns 0, WQ_EFULL or WQ_ECLOSED (during
 * workers_destroy); on error fn is never called and arg stays the caller's.
 * Thread-safe. */
int workers_submit(workers *w, wq_fn fn, void *arg);
/* Jobs waiting; jobs waiting or running (never less than there are).
 * Thread-safe. */
size_t workers_queued(workers *w);
size_t workers_busy(workers *w);
/* Takes no more jobs, runs every job already queued (a job that must end
 * quickly checks its own stop flag), joins the threads and frees; clears
 * *w. */
void workers_destroy(workers **w);

#endif
