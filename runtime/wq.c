#include "wq.h"

#include "mem.h"

#include <pthread.h>

/* Slots of a queue's first ring; it doubles when full (up to max). */
#define WQ_FIRST_SLOTS 16

typedef struct job {
    wq_fn fn;
    void *arg;
} job;

/* A ring of `cap` slots holding `count` jobs from `head` on. */
typedef struct ring {
    job *slots;
    size_t cap, head, count;
} ring;

struct wq {
    pthread_mutex_t mu;
    pthread_cond_t cv; /* a job came, or the queue closed */
    ring r;
    size_t max;
    int closed;
    uint64_t refused;
    void (*wake)(void *arg);
    void *wake_arg;
};

const char *wq_strerror(int err)
{
    switch (err) {
    case 0:
        return "success";
    case WQ_EFULL:
        return "the queue is full";
    case WQ_ECLOSED:
        return "the queue is closed";
    }
    return "unknown error";
}

wq *wq_create(size_t max, void (*wake)(void *arg), void *wake_arg)
{
    wq *q = mem_calloc(1, sizeof *q);
    q->max = max > 0 ? max : 1;
    q->wake = wake;
    q->wake_arg = wake_arg;
    pthread_mutex_init(&q->mu, NULL);
    pthread_cond_init(&q->cv, NULL);
    return q;
}

/* Makes room for one more job, in order. */
static void ring_grow(ring *r, size_t max)
{
    if (r->count < r->cap)
        return;
    size_t cap = r->cap > 0 ? r->cap * 2 : WQ_FIRST_SLOTS;
    if (cap > max)
        cap = max;
    job *slots = mem_alloc(cap * sizeof *slots);
    for (size_t i = 0; i < r->count; i++)
        slots[i] = r->slots[(r->head + i) % r->cap];
    mem_free(r->slots);
    r->slots = slots;
    r->cap = cap;
    r->head = 0;
}

int wq_push(wq *q, wq_fn fn, void *arg)
{
    pthread_mutex_lock(&q->mu);
    if (q->closed) {
        pthread_mutex_unlock(&q->mu);
        return WQ_ECLOSED;
    }
    if (q->r.count >= q->max) {
        q->refused++;
        pthread_mutex_unlock(&q->mu);
        return WQ_EFULL;
    }
    ring_grow(&q->r, q->max);
    q->r.slots[(q->r.head + q->r.count) % q->r.cap] = (job){fn, arg};
    int was_empty = q->r.count++ == 0;
    pthread_cond_signal(&q->cv);
    pthread_mutex_unlock(&q->mu);
    if (was_empty && q->wake != NULL)
        q->wake(q->wake_arg);
    return 0;
}

int wq_pop(wq *q, wq_fn *fn, void **arg)
{
    pthread_mutex_lock(&q->mu);
    while (q->r.count == 0 && !q->closed)
        pthread_cond_wait(&q->cv, &q->mu);
    if (q->r.count == 0) {
        pthread_mutex_unlock(&q->mu);
        return WQ_ECLOSED;
    }
    job j = q->r.slots[q->r.head];
    q->r.head = (q->r.head + 1) % q->r.cap;
    q->r.count--;
    pthread_mutex_unlock(&q->mu);
    *fn = j.fn;
    *arg = j.arg;
    return 0;
}

size_t wq_drain(wq *q)
{
    /* The whole ring is taken at once: the queue is empty while the jobs
     * run, so the first push meanwhile wakes the consumer again. */
    pthread_mutex_lock(&q->mu);
    ring batch = q->r;
    q->r = (ring){0};
    pthread_mutex_unlock(&q->mu);
    for (size_t i = 0; i < batch.count; i++) {
        job j = batch.slots[(batch.head + i) % batch.cap];
        j.fn(j.arg);
    }
    mem_free(batch.slots);
    return batch.count;
}

void wq_close(wq *q)
{
    pthread_mutex_lock(&q->mu);
    q->closed = 1;
    pthread_cond_broadcast(&q->cv);
    pthread_mutex_unlock(&q->mu);
}

size_t wq_len(wq *q)
{
    pthread_mutex_lock(&q->mu);
    size_t n = q->r.count;
    pthread_mutex_unlock(&q->mu);
    return n;
}

uint64_t wq_refused(wq *q)
{
    pthread_mutex_lock(&q->mu);
    uint64_t n = q->refused;
    pthread_mutex_unlock(&q->mu);
    return n;
}

void wq_destroy(wq **qp)
{
    wq *q = *qp;
    if (q == NULL)
        return;
    *qp = NULL;
    pthread_mutex_destroy(&q->mu);
    pthread_cond_destroy(&q->cv);
    mem_free(q->r.slots);
    mem_free(q);
}
