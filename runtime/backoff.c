#include "backoff.h"

#include <pthread.h>
#include <sys/random.h>
#include <time.h>

/* splitmix64 (Steele, Lea, Flood 2014): one 64-bit word of state, every
 * seed a full-period sequence, plenty for spreading retries (not for
 * secrets). */
#define SPLITMIX_GAMMA 0x9e3779b97f4a7c15ULL
#define SPLITMIX_MUL1  0xbf58476d1ce4e5b9ULL
#define SPLITMIX_MUL2  0x94d049bb133111ebULL

static _Thread_local uint64_t rng_state;
static _Thread_local int rng_seeded;

void backoff_seed(uint64_t seed)
{
    rng_state = seed;
    rng_seeded = 1;
}

/* The kernel's randomness; should it be short (very early boot), the clock
 * and the thread still give each thread its own sequence. */
static void seed_once(void)
{
    uint64_t seed = 0;
    if (getrandom(&seed, sizeof seed, GRND_NONBLOCK) != (ssize_t)sizeof seed) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        seed = ((uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec) ^
               (uint64_t)(uintptr_t)&rng_state ^ (uint64_t)pthread_self();
    }
    backoff_seed(seed);
}

static uint64_t next_u64(void)
{
    if (!rng_seeded)
        seed_once();
    uint64_t z = (rng_state += SPLITMIX_GAMMA);
    z = (z ^ (z >> 30)) * SPLITMIX_MUL1;
    z = (z ^ (z >> 27)) * SPLITMIX_MUL2;
    return z ^ (z >> 31);
}

int64_t backoff_rand_between(int64_t lo, int64_t hi)
{
    if (hi <= lo)
        return lo;
    /* The modulo's bias is below 2^-20 for any span a wait can have. */
    return lo + (int64_t)(next_u64() % ((uint64_t)(hi - lo) + 1));
}

int64_t backoff_ceiling(int64_t base_ms, int64_t cap_ms, int attempt)
{
    int64_t wait = base_ms;
    for (int i = 1; i < attempt && wait < cap_ms; i++)
        wait = wait > cap_ms / BACKOFF_GROWTH ? cap_ms : wait * BACKOFF_GROWTH;
    return wait < cap_ms ? wait : cap_ms;
}

void backoff_init(backoff *b, int64_t base_ms, int64_t cap_ms, backoff_jitter jitter)
{
    b->base_ms = base_ms >= 1 ? base_ms : 1;
    b->cap_ms = cap_ms >= b->base_ms ? cap_ms : b->base_ms;
    b->jitter = jitter;
    backoff_reset(b);
}

void backoff_reset(backoff *b)
{
    b->attempts = 0;
    b->last_ms = 0;
}

int64_t backoff_next(backoff *b)
{
    b->attempts++;
    int64_t wait;
    switch (b->jitter) {
    case BACKOFF_FULL:
        wait = backoff_rand_between(0, backoff_ceiling(b->base_ms, b->cap_ms, b->attempts));
        break;
    case BACKOFF_DECORRELATED: {
        int64_t prev = b->last_ms > 0 ? b->last_ms : b->base_ms;
        int64_t hi = prev > b->cap_ms / BACKOFF_SPREAD ? b->cap_ms : prev * BACKOFF_SPREAD;
        wait = backoff_rand_between(b->base_ms, hi);
        break;
    }
    default:
        wait = backoff_ceiling(b->base_ms, b->cap_ms, b->attempts);
        break;
    }
    b->last_ms = wait;
    return wait;
}
