/* wq — a bounded work queue: jobs (a function and its argument) handed from
 * any thread to the thread(s) that run them, in the order they were queued.
 *
 * Locked, with a condition variable for consumers that wait (wq_pop:
 * worker threads); a consumer that is an event loop instead gives a `wake`
 * function and runs what is queued with wq_drain when it wakes.
 *
 * The contract when it is full or closed: wq_push never blocks. It refuses
 * with WQ_EFULL when `max` jobs wait (counted: wq_refused) and with
 * WQ_ECLOSED after wq_close; a refused job is still the caller's and its
 * function is never called. After wq_close, wq_pop still hands out every job
 * queued before, then says WQ_ECLOSED. */
#ifndef CONVO_WQ_H
#define CONVO_WQ_H

#include <stddef.h>
#include <stdint.h>

#define WQ_EFULL   (-1) /* `max` jobs wait */
#define WQ_ECLOSED (-2) /* wq_close was called */

/* For a queue whose producers bound it themselves (each waits for its
 * answer, or pauses while its consumer is behind): no refusal for fullness. */
#define WQ_UNBOUNDED SIZE_MAX

typedef void (*wq_fn)(void *arg);
typedef struct wq wq;

/* "the queue is full", ... */
const char *wq_strerror(int err);

/* A queue of at most `max` waiting jobs (>= 1, or WQ_UNBOUNDED); its memory
 * grows with what waits. `wake`, when not NULL, is called with wake_arg
 * after a push that found the queue empty, outside the lock: the consumer
 * has something to drain (one call per batch, not per job). */
wq *wq_create(size_t max, void (*wake)(void *arg), void *wake_arg);
/* Queues fn(arg). Returns 0, WQ_EFULL or WQ_ECLOSED. Thread-safe. */
int wq_push(wq *q, wq_fn fn, void *arg);
/* Waits for the oldest job and takes it: 0 with *fn and *arg, or
 * WQ_ECLOSED once the queue is closed and empty. Thread-safe. */
int wq_pop(wq *q, wq_fn *fn, void **arg);
/* Runs, on the calling thread and in order, every job queued when it is
 * called (jobs they queue wait for the next drain, and wake it). Returns how
 * many ran. One thread drains at a time. */
size_t wq_drain(wq *q);
/* Refuses every push from now on and wakes the threads waiting in wq_pop.
 * Thread-safe; a second call changes nothing. */
void wq_close(wq *q);
/* Jobs waiting now. Thread-safe. */
size_t wq_len(wq *q);
/* Pushes refused so far because the queue was full. Thread-safe. */
uint64_t wq_refused(wq *q);
/* Frees the queue; jobs still waiting are dropped, never run. No thread may
 * use it any more. Clears *q. */
void wq_destroy(wq **q);

#endif
