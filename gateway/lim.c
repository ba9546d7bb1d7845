#include "lim.h"

#include "mem.h"

#include <string.h>

#define MS_PER_SECOND 1000.0
#define MS_PER_MINUTE 60000.0
#define MS_PER_HOUR   3600000.0

/* Hash chains average at most this many entries when the table is full. */
#define CHAIN_LOAD 4

/* Refills are computed in floating point: a unit due at an exact time is
 * there at that time. */
#define ROUNDING 1e-9

/* Entries looked at from the cold end per call, to forget those that are
 * full again: a bounded cost, and over many calls it keeps up with them. */
#define SWEEP_PER_CALL 2

typedef struct entry {
    struct entry *hnext;         /* hash chain */
    struct entry *newer, *older; /* use order: the table's newest ... oldest */
    double tokens;               /* buckets: what is left */
    int64_t at_ms;               /* buckets: when tokens was last brought up to date */
    long held;                   /* counts: what the key holds */
    char key[];
} entry;

typedef struct table {
    int on;          /* the limit is set */
    int counts;      /* LIM_CONN_*, LIM_OPEN_SESSIONS: counts, else a bucket */
    long max_held;   /* counts: the limit */
    double capacity; /* buckets: the largest burst */
    double per_ms;   /* buckets: refill per millisecond */
    entry **hash;
    size_t nhash;
    entry *newest, *oldest;
    size_t n, max_keys;
    long refused, evicted;
} table;

struct lim {
    table t[LIM_KINDS];
};

static uint64_t hash_key(const char *key)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (const unsigned char *p = (const unsigned char *)key; *p; p++)
        h = (h ^ *p) * 1099511628211ULL;
    return h;
}

static void setup(table *t, size_t max_keys, int counts, double capacity, double per_ms,
                  long long limit)
{
    t->on = limit > 0;
    t->counts = counts;
    t->max_held = (long)limit;
    t->capacity = capacity;
    t->per_ms = per_ms;
    t->max_keys = max_keys > 0 ? max_keys : 1;
    size_t want = t->max_keys / CHAIN_LOAD + 1;
    t->nhash = 1;
    while (t->nhash < want)
        t->nhash <<= 1;
    t->hash = mem_calloc(t->nhash, sizeof *t->hash);
}

lim *lim_create(const lim_opts *o)
{
    lim *l = mem_calloc(1, sizeof *l);
    size_t keys = (size_t)o->max_keys;
    setup(&l->t[LIM_CONN_IP], keys, 1, 0, 0, o->conn_per_ip);
    setup(&l->t[LIM_CONN_USER], keys, 1, 0, 0, o->conn_per_user);
    setup(&l->t[LIM_OPEN_SESSIONS], keys, 1, 0, 0, o->open_sessions_per_user);
    setup(&l->t[LIM_SESSIONS], keys, 0, (double)o->sessions_per_hour,
          (double)o->sessions_per_hour / MS_PER_HOUR, o->sessions_per_hour);
    double burst = o->rate_burst > 0 ? (double)o->rate_burst : 1.0;
    setup(&l->t[LIM_MESSAGES], keys, 0, burst, (double)o->messages_per_minute / MS_PER_MINUTE,
          o->messages_per_minute);
    setup(&l->t[LIM_TOKENS], keys, 0, (double)o->tokens_per_minute,
          (double)o->tokens_per_minute / MS_PER_MINUTE, o->tokens_per_minute);
    /* REST clients fetch a few things at once (a page load): bursts of two
     * seconds' worth. */
    setup(&l->t[LIM_REST], keys, 0, 2.0 * (double)o->rest_per_second,
          (double)o->rest_per_second / MS_PER_SECOND, o->rest_per_second);
    return l;
}

void lim_destroy(lim **lp)
{
    lim *l = *lp;
    if (l == NULL)
        return;
    *lp = NULL;
    for (int k = 0; k < LIM_KINDS; k++) {
        for (entry *e = l->t[k].newest, *next; e != NULL; e = next) {
            next = e->older;
            mem_free(e);
        }
        mem_free(l->t[k].hash);
    }
    mem_free(l);
}

/* ---- the table ------------------------------------------------------ */

static void unlink_use(table *t, entry *e)
{
    if (e->newer != NULL)
        e->newer->older = e->older;
    else
        t->newest = e->older;
    if (e->older != NULL)
        e->older->newer = e->newer;
    else
        t->oldest = e->newer;
    e->newer = e->older = NULL;
}

static void push_newest(table *t, entry *e)
{
    e->older = t->newest;
    e->newer = NULL;
    if (t->newest != NULL)
        t->newest->newer = e;
    else
        t->oldest = e;
    t->newest = e;
}

static void forget(table *t, entry *e)
{
    for (entry **p = &t->hash[hash_key(e->key) & (t->nhash - 1)]; *p != NULL; p = &(*p)->hnext) {
        if (*p == e) {
            *p = e->hnext;
            break;
        }
    }
    unlink_use(t, e);
    t->n--;
    mem_free(e);
}

/* Brings a bucket up to now. */
static void refill(table *t, entry *e, int64_t now_ms)
{
    if (now_ms > e->at_ms) {
        e->tokens += (double)(now_ms - e->at_ms) * t->per_ms;
        if (e->tokens > t->capacity)
            e->tokens = t->capacity;
        e->at_ms = now_ms;
    }
}

/* An entry that holds nothing and whose bucket is full is as good as no
 * entry. */
static int idle(table *t, entry *e, int64_t now_ms)
{
    if (t->counts)
        return e->held == 0;
    refill(t, e, now_ms);
    return e->tokens >= t->capacity - ROUNDING;
}

static void sweep(table *t, int64_t now_ms)
{
    for (int i = 0; i < SWEEP_PER_CALL && t->oldest != NULL && idle(t, t->oldest, now_ms); i++)
        forget(t, t->oldest);
}

/* The entry of key, made when missing (a fresh one: full bucket, nothing
 * held); NULL when the table is full of entries holding connections. */
static entry *lookup(table *t, const char *key, int64_t now_ms)
{
    sweep(t, now_ms);
    size_t b = hash_key(key) & (t->nhash - 1);
    for (entry *e = t->hash[b]; e != NULL; e = e->hnext) {
        if (strcmp(e->key, key) == 0) {
            unlink_use(t, e);
            push_newest(t, e);
            return e;
        }
    }
    if (t->n >= t->max_keys) {
        /* Counts leave the table when they drop to zero, so at the bound
         * every count entry holds a connection: refuse rather than forget
         * one. A bucket is forgotten, the least recently used first. */
        if (t->counts || t->oldest == NULL)
            return NULL;
        forget(t, t->oldest);
        t->evicted++;
    }
    size_t len = strlen(key);
    entry *e = mem_calloc(1, sizeof *e + len + 1);
    memcpy(e->key, key, len + 1);
    e->tokens = t->capacity;
    e->at_ms = now_ms;
    e->hnext = t->hash[b];
    t->hash[b] = e;
    push_newest(t, e);
    t->n++;
    return e;
}

static entry *find(table *t, const char *key)
{
    for (entry *e = t->hash[hash_key(key) & (t->nhash - 1)]; e != NULL; e = e->hnext)
        if (strcmp(e->key, key) == 0)
            return e;
    return NULL;
}

/* ---- API ------------------------------------------------------------ */

int lim_hold(lim *l, lim_kind k, const char *key, int64_t now_ms)
{
    table *t = &l->t[k];
    if (!t->on)
        return 0;
    entry *e = lookup(t, key, now_ms);
    if (e == NULL) {
        t->refused++;
        return LIM_EFULL;
    }
    if (e->held >= t->max_held) {
        t->refused++;
        return LIM_EREFUSED;
    }
    e->held++;
    return 0;
}

void lim_release(lim *l, lim_kind k, const char *key, int64_t now_ms)
{
    table *t = &l->t[k];
    (void)now_ms;
    if (!t->on)
        return;
    entry *e = find(t, key);
    if (e != NULL && e->held > 0 && --e->held == 0)
        forget(t, e);
}

int lim_take(lim *l, lim_kind k, const char *key, int64_t now_ms)
{
    table *t = &l->t[k];
    if (!t->on)
        return 0;
    entry *e = lookup(t, key, now_ms);
    refill(t, e, now_ms);
    if (e->tokens < 1.0 - ROUNDING) {
        t->refused++;
        return LIM_EREFUSED;
    }
    e->tokens = e->tokens > 1.0 ? e->tokens - 1.0 : 0.0;
    return 0;
}

void lim_give(lim *l, lim_kind k, const char *key, int64_t now_ms)
{
    table *t = &l->t[k];
    if (!t->on)
        return;
    entry *e = find(t, key);
    if (e == NULL)
        return; /* forgotten: already full */
    refill(t, e, now_ms);
    e->tokens += 1.0;
    if (e->tokens > t->capacity)
        e->tokens = t->capacity;
}

int lim_check(lim *l, lim_kind k, const char *key, int64_t now_ms)
{
    table *t = &l->t[k];
    if (!t->on)
        return 0;
    entry *e = find(t, key);
    if (e == NULL)
        return 0;
    refill(t, e, now_ms);
    if (e->tokens <= ROUNDING) {
        t->refused++;
        return LIM_EREFUSED;
    }
    return 0;
}

void lim_charge(lim *l, lim_kind k, const char *key, double amount, int64_t now_ms)
{
    table *t = &l->t[k];
    if (!t->on || amount <= 0.0)
        return;
    entry *e = lookup(t, key, now_ms);
    refill(t, e, now_ms);
    e->tokens -= amount;
    /* A debt of more than one full bucket would shut the user out for
     * longer than the limit's period; one answer cannot cost more. */
    if (e->tokens < -t->capacity)
        e->tokens = -t->capacity;
}

long lim_refused(const lim *l, lim_kind k)
{
    return l->t[k].refused;
}

long lim_evicted(const lim *l, lim_kind k)
{
    return l->t[k].evicted;
}

size_t lim_keys(const lim *l, lim_kind k)
{
    return l->t[k].n;
}

const char *lim_code(lim_kind k)
{
    static const char *const codes[LIM_KINDS] = {
        [LIM_CONN_IP] = "too_many_connections_ip",
        [LIM_CONN_USER] = "too_many_connections_user",
        [LIM_SESSIONS] = "too_many_sessions",
        [LIM_MESSAGES] = "rate_limited",
        [LIM_TOKENS] = "token_limit",
        [LIM_REST] = "rate_limited",
        [LIM_OPEN_SESSIONS] = "too_many_sessions_user",
    };
    return codes[k];
}

const char *lim_name(lim_kind k)
{
    static const char *const names[LIM_KINDS] = {
        [LIM_CONN_IP] = "connections_per_ip",      [LIM_CONN_USER] = "connections_per_user",
        [LIM_SESSIONS] = "sessions_per_hour",      [LIM_MESSAGES] = "messages_per_minute",
        [LIM_TOKENS] = "tokens_per_minute",        [LIM_REST] = "rest_per_ip",
        [LIM_OPEN_SESSIONS] = "sessions_per_user",
    };
    return names[k];
}
