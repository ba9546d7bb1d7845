#include "breaker.h"

#include "backoff.h"
#include "mem.h"

#include <pthread.h>

struct breaker {
    pthread_mutex_t mu;
    int threshold;
    /* Under mu. */
    breaker_state state;
    unsigned epoch; /* bumped by every transition: older tickets are stale */
    int failures;   /* in a row, while closed */
    int64_t opened_ms;
    int64_t cooldown_ms; /* of this opening */
    backoff cooldown;    /* its attempts: the openings since it last closed */
    int probe_out;       /* half-open: the probe is in flight */
};

breaker *breaker_create(int failures, int64_t cooldown_ms, int64_t cooldown_max_ms)
{
    breaker *b = mem_calloc(1, sizeof *b);
    pthread_mutex_init(&b->mu, NULL);
    b->threshold = failures > 0 ? failures : 1;
    backoff_init(&b->cooldown, cooldown_ms, cooldown_max_ms, BACKOFF_DECORRELATED);
    b->state = BREAKER_CLOSED;
    return b;
}

void breaker_destroy(breaker **bp)
{
    if (bp == NULL || *bp == NULL)
        return;
    pthread_mutex_destroy(&(*bp)->mu);
    mem_free(*bp);
    *bp = NULL;
}

static void move_locked(breaker *b, breaker_state to, int64_t now)
{
    b->state = to;
    b->epoch++;
    b->failures = 0;
    b->probe_out = 0;
    if (to == BREAKER_CLOSED)
        backoff_reset(&b->cooldown);
    if (to == BREAKER_OPEN) {
        b->opened_ms = now;
        b->cooldown_ms = backoff_next(&b->cooldown);
    }
}

int breaker_admit(breaker *b, int64_t now, breaker_ticket *ticket, int *moved)
{
    pthread_mutex_lock(&b->mu);
    int pass = 1;
    if (b->state == BREAKER_OPEN && now - b->opened_ms >= b->cooldown_ms) {
        move_locked(b, BREAKER_HALF_OPEN, now);
        *moved = 1;
    }
    if (b->state == BREAKER_OPEN || (b->state == BREAKER_HALF_OPEN && b->probe_out))
        pass = 0;
    else if (b->state == BREAKER_HALF_OPEN)
        b->probe_out = 1;
    ticket->epoch = b->epoch;
    ticket->probe = b->state == BREAKER_HALF_OPEN;
    pthread_mutex_unlock(&b->mu);
    return pass;
}

int breaker_report(breaker *b, const breaker_ticket *ticket, breaker_outcome o, int64_t now)
{
    pthread_mutex_lock(&b->mu);
    int moved = 0;
    if (ticket->epoch != b->epoch || o == BREAKER_NEUTRAL) {
        /* Stale, or nothing learnt; a probe that learnt nothing makes room
         * for the next. */
        if (ticket->epoch == b->epoch && ticket->probe)
            b->probe_out = 0;
    } else if (b->state == BREAKER_HALF_OPEN) {
        move_locked(b, o == BREAKER_SUCCESS ? BREAKER_CLOSED : BREAKER_OPEN, now);
        moved = 1;
    } else if (o == BREAKER_SUCCESS) {
        b->failures = 0;
    } else if (++b->failures >= b->threshold) {
        move_locked(b, BREAKER_OPEN, now);
        moved = 1;
    }
    pthread_mutex_unlock(&b->mu);
    return moved;
}

breaker_state breaker_get(breaker *b)
{
    pthread_mutex_lock(&b->mu);
    breaker_state s = b->state;
    pthread_mutex_unlock(&b->mu);
    return s;
}

int64_t breaker_wait_ms(breaker *b, int64_t now)
{
    pthread_mutex_lock(&b->mu);
    int64_t left = b->state == BREAKER_OPEN ? b->opened_ms + b->cooldown_ms - now : 0;
    pthread_mutex_unlock(&b->mu);
    return left > 0 ? left : 0;
}

const char *breaker_state_name(breaker_state s)
{
    switch (s) {
    case BREAKER_CLOSED:
        return "closed";
    case BREAKER_OPEN:
        return "open";
    default:
        return "half-open";
    }
}
