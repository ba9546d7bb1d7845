#include "bridge.h"

#include "mem.h"

#include <libwebsockets.h>
#include <pthread.h>

typedef struct job {
    bridge_fn fn;
    void *arg;
    struct job *next;
} job;

struct bridge {
    pthread_mutex_t mu;
    job *head, *tail;
    struct lws_context *ctx;
};

bridge *bridge_create(void)
{
    bridge *b = mem_calloc(1, sizeof *b);
    pthread_mutex_init(&b->mu, NULL);
    return b;
}

void bridge_set_context(bridge *b, struct lws_context *ctx)
{
    pthread_mutex_lock(&b->mu);
    b->ctx = ctx;
    pthread_mutex_unlock(&b->mu);
}

void bridge_post(bridge *b, bridge_fn fn, void *arg)
{
    job *j = mem_alloc(sizeof *j);
    j->fn = fn;
    j->arg = arg;
    j->next = NULL;
    pthread_mutex_lock(&b->mu);
    int was_empty = b->head == NULL;
    if (b->tail != NULL)
        b->tail->next = j;
    else
        b->head = j;
    b->tail = j;
    struct lws_context *ctx = b->ctx;
    pthread_mutex_unlock(&b->mu);
    /* One wake-up per batch of jobs is enough: the loop drains them all. */
    if (was_empty && ctx != NULL)
        lws_cancel_service(ctx);
}

void bridge_drain(bridge *b)
{
    pthread_mutex_lock(&b->mu);
    job *j = b->head;
    b->head = b->tail = NULL;
    pthread_mutex_unlock(&b->mu);
    while (j != NULL) {
        job *next = j->next;
        j->fn(j->arg);
        mem_free(j);
        j = next;
    }
}

void bridge_destroy(bridge **bp)
{
    bridge *b = *bp;
    if (b == NULL)
        return;
    *bp = NULL;
    for (job *j = b->head, *next; j != NULL; j = next) {
        next = j->next;
        mem_free(j);
    }
    pthread_mutex_destroy(&b->mu);
    mem_free(b);
}
