#include "workers.h"

#include "log.h"
#include "mem.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

struct workers {
    wq *q;
    atomic_size_t busy; /* submitted and not finished */
    int nthreads;
    pthread_t *threads;
};

static void *thread_main(void *arg)
{
    workers *w = arg;
    wq_fn fn;
    void *job;
    /* After the close, wq_pop still hands out what was queued: each job
     * owns something (waiting calls) only it can release. */
    while (wq_pop(w->q, &fn, &job) == 0) {
        fn(job);
        atomic_fetch_sub(&w->busy, 1);
    }
    return NULL;
}

workers *workers_create(int threads, size_t queue_max)
{
    workers *w = mem_calloc(1, sizeof *w);
    w->q = wq_create(queue_max > 0 ? queue_max : 1, NULL, NULL);
    w->nthreads = threads > 0 ? threads : 1;
    w->threads = mem_calloc((size_t)w->nthreads, sizeof *w->threads);
    for (int i = 0; i < w->nthreads; i++) {
        int rc = pthread_create(&w->threads[i], NULL, thread_main, w);
        if (rc != 0) {
            log_error("cannot start worker thread %d: error %d", i, rc);
            abort();
        }
    }
    return w;
}

int workers_submit(workers *w, wq_fn fn, void *arg)
{
    /* Counted before it can run, so the count never falls short. */
    atomic_fetch_add(&w->busy, 1);
    int rc = wq_push(w->q, fn, arg);
    if (rc != 0)
        atomic_fetch_sub(&w->busy, 1);
    return rc;
}

size_t workers_queued(workers *w)
{
    return wq_len(w->q);
}

size_t workers_busy(workers *w)
{
    return atomic_load(&w->busy);
}

void workers_destroy(workers **wp)
{
    workers *w = *wp;
    if (w == NULL)
        return;
    *wp = NULL;
    wq_close(w->q);
    for (int i = 0; i < w->nthreads; i++)
        pthread_join(w->threads[i], NULL);
    wq_destroy(&w->q);
    mem_free(w->threads);
    mem_free(w);
}
