#include "trace.h"

#include "log.h"
#include "mem.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define STATUS_MESSAGE_MAX 512

static const char hex_digits[] = "0123456789abcdef";

static _Thread_local const trace_span *current;

/* ---- ids ----------------------------------------------------------------------- */

/* splitmix64 per thread, seeded from the kernel: ids are unique without a
 * lock or a system call per span. */
static _Thread_local uint64_t rng_state;
static _Thread_local int rng_seeded;

static uint64_t next_random(void)
{
    if (!rng_seeded) {
        uint64_t seed;
        if (getrandom(&seed, sizeof seed, 0) != (ssize_t)sizeof seed) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            seed = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 20) ^ (uint64_t)gettid();
        }
        rng_state = seed;
        rng_seeded = 1;
    }
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* A random non-zero 64-bit value as 16 hex digits. */
static void random_hex(char *out)
{
    uint64_t v;
    do
        v = next_random();
    while (v == 0);
    for (int i = 15; i >= 0; i--, v >>= 4)
        out[i] = hex_digits[v & 0xf];
}

static int is_lower_hex(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    return 1;
}

static int all_zeros(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] != '0')
            return 0;
    return 1;
}

/* ---- W3C Trace Context ----------------------------------------------------------- */

int trace_parse(const char *tp, trace_ctx *out)
{
    memset(out, 0, sizeof *out);
    /* 00-<32 hex>-<16 hex>-<2 hex>: version 00 has exactly this length. */
    if (tp == NULL || strlen(tp) != TRACE_PARENT_LEN || tp[0] != '0' || tp[1] != '0' ||
        tp[2] != '-' || tp[35] != '-' || tp[52] != '-')
        return TRACE_EINVAL;
    const char *tid = tp + 3, *sid = tp + 36, *fl = tp + 53;
    if (!is_lower_hex(tid, TRACE_ID_LEN) || !is_lower_hex(sid, TRACE_SPAN_ID_LEN) ||
        !is_lower_hex(fl, 2) || all_zeros(tid, TRACE_ID_LEN) || all_zeros(sid, TRACE_SPAN_ID_LEN))
        return TRACE_EINVAL;
    memcpy(out->trace_id, tid, TRACE_ID_LEN);
    memcpy(out->span_id, sid, TRACE_SPAN_ID_LEN);
    unsigned hi = (unsigned)(fl[0] <= '9' ? fl[0] - '0' : fl[0] - 'a' + 10);
    unsigned lo = (unsigned)(fl[1] <= '9' ? fl[1] - '0' : fl[1] - 'a' + 10);
    out->flags = (unsigned char)(hi << 4 | lo);
    return 0;
}

int trace_state_ok(const char *ts)
{
    if (ts == NULL)
        return 0;
    size_t n = strlen(ts), members = 1;
    if (n == 0 || n > TRACE_STATE_MAX)
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)ts[i];
        if (c < 0x20 || c > 0x7e)
            return 0;
        members += c == ',';
    }
    return members <= TRACE_STATE_MEMBERS;
}

void trace_format(const trace_ctx *c, char *out)
{
    /* Only the sampled bit is ours to send on (W3C level 1). */
    snprintf(out, TRACE_PARENT_LEN + 1, "00-%s-%s-%02x", c->trace_id, c->span_id,
             c->flags & TRACE_FLAG_SAMPLED);
}

int trace_ctx_valid(const trace_ctx *c)
{
    return c != NULL && c->trace_id[0] != '\0';
}

/* ---- spans ------------------------------------------------------------------------- */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

void trace_span_start(trace_span *sp, otlp *exp, const char *name, trace_kind kind,
                      const trace_ctx *parent, const char *state)
{
    memset(sp, 0, sizeof *sp);
    int remote = trace_ctx_valid(parent);
    if (remote) {
        memcpy(sp->ctx.trace_id, parent->trace_id, sizeof sp->ctx.trace_id);
        sp->ctx.flags = parent->flags & TRACE_FLAG_SAMPLED;
        if (state != NULL && trace_state_ok(state))
            sp->state = mem_strdup(state);
    } else {
        random_hex(sp->ctx.trace_id);
        random_hex(sp->ctx.trace_id + TRACE_SPAN_ID_LEN);
        sp->ctx.flags = TRACE_FLAG_SAMPLED;
    }
    random_hex(sp->ctx.span_id);
    if (exp == NULL || !(sp->ctx.flags & TRACE_FLAG_SAMPLED))
        return;
    sp->exp = exp;
    otlp_span *r = mem_calloc(1, sizeof *r);
    memcpy(r->trace_id, sp->ctx.trace_id, sizeof r->trace_id);
    memcpy(r->span_id, sp->ctx.span_id, sizeof r->span_id);
    if (remote)
        memcpy(r->parent_id, parent->span_id, sizeof r->parent_id);
    r->trace_state = sp->state != NULL ? mem_strdup(sp->state) : NULL;
    r->name = mem_strdup(name);
    r->kind = (otlp_kind)kind;
    r->start_ns = now_ns();
    sp->rec = r;
}

void trace_span_start_remote(trace_span *sp, otlp *exp, const char *name, trace_kind kind,
                             const char *traceparent, const char *tracestate)
{
    trace_ctx parent;
    if (traceparent == NULL || trace_parse(traceparent, &parent) != 0)
        trace_span_start(sp, exp, name, kind, NULL, NULL);
    else
        trace_span_start(sp, exp, name, kind, &parent, tracestate);
}

void trace_span_child(trace_span *sp, const trace_span *parent, const char *name, trace_kind kind)
{
    if (parent == NULL || !trace_ctx_valid(&parent->ctx)) {
        trace_span_start(sp, NULL, name, kind, NULL, NULL);
        return;
    }
    trace_span_start(sp, parent->exp, name, kind, &parent->ctx, parent->state);
}

void trace_span_end(trace_span *sp)
{
    mem_free(sp->state);
    sp->state = NULL;
    otlp_span *r = sp->rec;
    if (r == NULL)
        return;
    sp->rec = NULL;
    r->end_ns = now_ns();
    otlp_push(sp->exp, r);
}

int trace_span_recording(const trace_span *sp)
{
    return sp->rec != NULL;
}

/* The next attribute slot, or NULL (counted as dropped) when full. */
static otlp_attr *new_attr(trace_span *sp, const char *key, otlp_value type)
{
    otlp_span *r = sp->rec;
    if (r == NULL)
        return NULL;
    if (r->nattrs == OTLP_MAX_ATTRS) {
        r->dropped_attrs++;
        return NULL;
    }
    otlp_attr *a = &r->attrs[r->nattrs++];
    a->key = key;
    a->type = type;
    return a;
}

void trace_span_set_str(trace_span *sp, const char *key, const char *value)
{
    otlp_attr *a = new_attr(sp, key, OTLP_STR);
    if (a != NULL)
        a->str = mem_strdup(value != NULL ? value : "");
}

void trace_span_set_int(trace_span *sp, const char *key, int64_t value)
{
    otlp_attr *a = new_attr(sp, key, OTLP_INT);
    if (a != NULL)
        a->i = value;
}

void trace_span_set_bool(trace_span *sp, const char *key, int value)
{
    otlp_attr *a = new_attr(sp, key, OTLP_BOOL);
    if (a != NULL)
        a->i = value != 0;
}

void trace_span_event(trace_span *sp, const char *name)
{
    otlp_span *r = sp->rec;
    if (r == NULL)
        return;
    if (r->nevents == OTLP_MAX_EVENTS) {
        r->dropped_events++;
        return;
    }
    r->events = mem_realloc(r->events, (r->nevents + 1) * sizeof *r->events);
    r->events[r->nevents++] = (otlp_event){name, now_ns()};
}

void trace_span_link(trace_span *sp, const trace_ctx *c)
{
    otlp_span *r = sp->rec;
    if (r == NULL || !trace_ctx_valid(c))
        return;
    if (r->nlinks == OTLP_MAX_LINKS) {
        r->dropped_links++;
        return;
    }
    r->links = mem_realloc(r->links, (r->nlinks + 1) * sizeof *r->links);
    otlp_link *l = &r->links[r->nlinks++];
    memcpy(l->trace_id, c->trace_id, sizeof l->trace_id);
    memcpy(l->span_id, c->span_id, sizeof l->span_id);
}

void trace_span_error(trace_span *sp, const char *fmt, ...)
{
    otlp_span *r = sp->rec;
    if (r == NULL)
        return;
    char msg[STATUS_MESSAGE_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    r->status = OTLP_STATUS_ERROR;
    mem_free(r->status_message);
    r->status_message = mem_strdup(msg);
}

/* ---- the current span --------------------------------------------------------------- */

const trace_span *trace_set_current(const trace_span *sp)
{
    const trace_span *prev = current;
    current = sp;
    if (sp != NULL && trace_ctx_valid(&sp->ctx))
        log_trace_set(sp->ctx.trace_id, sp->ctx.span_id);
    else
        log_trace_set(NULL, NULL);
    return prev;
}

const trace_span *trace_current(void)
{
    return current;
}
