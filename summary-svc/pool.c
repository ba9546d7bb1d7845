#include "pool.h"

#include "log.h"
#include "mem.h"

#include <pthread.h>
#include <stdlib.h>

typedef struct pool_job {
    pool_fn fn;
    void *arg;
} pool_job;

struct pool {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pool_job *ring; /* queue_max slots */
    size_t max, head, count;
    size_t running;
    int stopping;
    int nthreads;
    pthread_t *threads;
};

const char *pool_strerror(int err)
{
    switch (err) {
    case 0:
        return "success";
    case POOL_EFULL:
        return "the job queue is full";
    case POOL_ESTOPPED:
        return "the worker pool is shutting down";
    default:
        return "unknown error";
    }
}

static void *worker_main(void *arg)
{
    pool *p = arg;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (p->count == 0 && !p->stopping)
            pthread_cond_wait(&p->cv, &p->mu);
        /* Queued jobs run even when stopping: each one owns something
         * (waiting calls) only it can release. */
        if (p->count == 0)
            break;
        pool_job j = p->ring[p->head];
        p->head = (p->head + 1) % p->max;
        p->count--;
        p->running++;
        pthread_mutex_unlock(&p->mu);
        j.fn(j.arg);
        pthread_mutex_lock(&p->mu);
        p->running--;
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

pool *pool_create(int threads, size_t queue_max)
{
    pool *p = mem_calloc(1, sizeof *p);
    p->max = queue_max > 0 ? queue_max : 1;
    p->ring = mem_calloc(p->max, sizeof *p->ring);
    p->nthreads = threads > 0 ? threads : 1;
    p->threads = mem_calloc((size_t)p->nthreads, sizeof *p->threads);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    for (int i = 0; i < p->nthreads; i++) {
        int rc = pthread_create(&p->threads[i], NULL, worker_main, p);
        if (rc != 0) {
            /* A service without its workers cannot do its job: like an
             * allocation failure, fatal. */
            log_error("cannot start worker thread %d: error %d", i, rc);
            abort();
        }
    }
    return p;
}

int pool_submit(pool *p, pool_fn fn, void *arg)
{
    int rc = 0;
    pthread_mutex_lock(&p->mu);
    if (p->stopping) {
        rc = POOL_ESTOPPED;
    } else if (p->count == p->max) {
        rc = POOL_EFULL;
    } else {
        p->ring[(p->head + p->count) % p->max] = (pool_job){fn, arg};
        p->count++;
        pthread_cond_signal(&p->cv);
    }
    pthread_mutex_unlock(&p->mu);
    return rc;
}

size_t pool_queued(pool *p)
{
    pthread_mutex_lock(&p->mu);
    size_t n = p->count;
    pthread_mutex_unlock(&p->mu);
    return n;
}

size_t pool_running(pool *p)
{
    pthread_mutex_lock(&p->mu);
    size_t n = p->running;
    pthread_mutex_unlock(&p->mu);
    return n;
}

void pool_destroy(pool **pp)
{
    pool *p = *pp;
    if (p == NULL)
        return;
    pthread_mutex_lock(&p->mu);
    p->stopping = 1;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->nthreads; i++)
        pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    mem_free(p->threads);
    mem_free(p->ring);
    mem_free(p);
    *pp = NULL;
}
