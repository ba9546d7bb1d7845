#include "bridge.h"

#include "mem.h"
#include "wq.h"

#include <libwebsockets.h>
#include <stdatomic.h>

struct bridge {
    wq *q;
    _Atomic(struct lws_context *) ctx;
};

/* The queue became non-empty: the loop has something to drain. One
 * wake-up per batch of jobs is enough; the loop drains them all. */
static void wake(void *arg)
{
    bridge *b = arg;
    struct lws_context *ctx = atomic_load(&b->ctx);
    if (ctx != NULL)
        lws_cancel_service(ctx);
}

bridge *bridge_create(void)
{
    bridge *b = mem_calloc(1, sizeof *b);
    b->q = wq_create(WQ_UNBOUNDED, wake, b);
    return b;
}

void bridge_set_context(bridge *b, struct lws_context *ctx)
{
    atomic_store(&b->ctx, ctx);
}

void bridge_post(bridge *b, bridge_fn fn, void *arg)
{
    /* Unbounded and never closed: it cannot refuse. */
    wq_push(b->q, fn, arg);
}

void bridge_drain(bridge *b)
{
    wq_drain(b->q);
}

void bridge_destroy(bridge **bp)
{
    bridge *b = *bp;
    if (b == NULL)
        return;
    *bp = NULL;
    wq_destroy(&b->q);
    mem_free(b);
}
