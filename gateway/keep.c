#include "keep.h"

#include "convo_methods.h"
#include "log.h"
#include "mem.h"

#include <ev.h>
#include <stdatomic.h>
#include <stdio.h>

/* Sessions per KeepSessionsAlive: 1,000 ids of up to 128 bytes stay far
 * below the smallest --max-message-bytes store-svc would be run with. */
#define KEEP_BATCH       1000
#define KEEP_MAX_SECONDS 86400
/* Renewals per lease: the third renewal that fails in a row still leaves
 * the sessions open. */
#define KEEP_PER_LEASE 3

struct keep {
    gw *g;
    ev_timer timer;
    keep_entry *head;
    atomic_int failing; /* renewals failing in a row (logged once a streak) */
};

/* gRPC thread: logs the first failure of a streak and the recovery. */
static void on_renewed(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp)
{
    keep *k = arg;
    if (resp != NULL)
        protobuf_c_message_free_unpacked(resp, NULL);
    if (code == RPC_OK) {
        if (atomic_exchange(&k->failing, 0) > 0)
            log_info("KeepSessionsAlive works again: the sessions of this gateway are kept open");
    } else if (atomic_fetch_add(&k->failing, 1) == 0) {
        log_warn("KeepSessionsAlive failed (%s: %s); past --session-lease-seconds without a "
                 "renewal, store-svc may end this gateway's idle sessions (they reopen on their "
                 "next event)",
                 rpc_code_name(code), message);
    }
}

static void renew(keep *k, char **ids, size_t n)
{
    Convo__V1__KeepSessionsAliveRequest req = CONVO__V1__KEEP_SESSIONS_ALIVE_REQUEST__INIT;
    req.session_ids = ids;
    req.n_session_ids = n;
    req.live_seconds = (int32_t)k->g->opts.session_lease_secs;
    cli_opts o = {.timeout_ms = k->g->opts.store_timeout_ms};
    if (cli_unary(k->g->store, &convo__v1__store__keep_sessions_alive__method, &req.base, &o,
                  on_renewed, k, NULL) != 0)
        on_renewed(k, RPC_INTERNAL, "the call could not start", NULL);
}

/* Every third of the lease: every live session, in batches. */
static void on_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    keep *k = w->data;
    char *ids[KEEP_BATCH];
    size_t n = 0;
    for (keep_entry *e = k->head; e != NULL; e = e->next) {
        if (!e->live)
            continue;
        ids[n++] = (char *)e->session_id; /* packed, never written */
        if (n == KEEP_BATCH) {
            renew(k, ids, n);
            n = 0;
        }
    }
    if (n > 0)
        renew(k, ids, n);
}

int keep_create(gw *g, keep **out, char *err, size_t errsize)
{
    long long lease = g->opts.session_lease_secs;
    *out = NULL;
    if (lease == 0)
        return 0;
    if (lease < KEEP_MIN_SECONDS || lease > KEEP_MAX_SECONDS) {
        snprintf(err, errsize, "--session-lease-seconds is %lld: 0 (off) or %d to %d", lease,
                 KEEP_MIN_SECONDS, KEEP_MAX_SECONDS);
        return -1;
    }
    keep *k = mem_calloc(1, sizeof *k);
    k->g = g;
    double every = (double)lease / KEEP_PER_LEASE;
    ev_timer_init(&k->timer, on_timer, every, every);
    k->timer.data = k;
    ev_timer_start(g->loop, &k->timer);
    *out = k;
    return 0;
}

void keep_destroy(keep **kp)
{
    keep *k = *kp;
    if (k == NULL)
        return;
    *kp = NULL;
    ev_timer_stop(k->g->loop, &k->timer);
    mem_free(k);
}

void keep_add(keep *k, keep_entry *e)
{
    if (k == NULL)
        return;
    e->prev = NULL;
    e->next = k->head;
    if (k->head != NULL)
        k->head->prev = e;
    k->head = e;
}

void keep_remove(keep *k, keep_entry *e)
{
    if (k == NULL)
        return;
    if (e->prev != NULL)
        e->prev->next = e->next;
    else if (k->head == e)
        k->head = e->next;
    if (e->next != NULL)
        e->next->prev = e->prev;
    e->prev = e->next = NULL;
}
