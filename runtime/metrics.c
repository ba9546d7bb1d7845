#include "metrics.h"

#include "log.h"
#include "mem.h"

#include <dirent.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#ifndef CONVO_VERSION
#define CONVO_VERSION "0.0.0-dev"
#endif

#define MAX_LABELS 4

static const uint64_t seconds_bounds[] = {
    100,    250,    500,     1000,    2500,    5000,     10000,    25000,    50000,     100000,
    250000, 500000, 1000000, 2500000, 5000000, 10000000, 30000000, 60000000, 120000000, 300000000,
};
const metrics_buckets metrics_buckets_seconds = {
    1e6, sizeof seconds_bounds / sizeof seconds_bounds[0], seconds_bounds};

static const uint64_t count_bounds[] = {1,   2,   5,    10,   20,   50,   100,
                                        200, 500, 1000, 2000, 5000, 10000};
const metrics_buckets metrics_buckets_count = {1, sizeof count_bounds / sizeof count_bounds[0],
                                               count_bounds};

/* Each metric is padded to a cache line of its own (as far as the
 * allocator's alignment lets it), so threads bumping neighbours do not
 * share one. */
struct metrics_counter {
    atomic_uint_fast64_t v;
    char pad[56];
};

struct metrics_gauge {
    atomic_int_fast64_t v;
    char pad[56];
};

struct metrics_histogram {
    const metrics_buckets *b;
    atomic_uint_fast64_t sum;
    atomic_uint_fast64_t *counts; /* b->n bounds, then +Inf */
};

typedef struct series {
    struct series *next;
    char **values;
    union {
        struct metrics_counter c;
        struct metrics_gauge g;
        struct metrics_histogram h;
    } m;
} series;

struct metrics_family {
    metrics_family *next;
    char *name;
    char *help;
    metrics_kind kind;
    char *label_spec;
    char *labels[MAX_LABELS];
    size_t nlabels;
    const metrics_buckets *buckets;
    pthread_mutex_t mu; /* the series list grows under it */
    series *head, *tail;
    size_t nseries;
    int full_logged;
};

typedef struct hook {
    void (*fn)(void *arg);
    void *arg;
    struct hook *next;
} hook;

struct metrics {
    pthread_mutex_t mu; /* families and hooks */
    metrics_family *families, *last;
    hook *hooks;
    char *program;
    double start_time;
};

/* ---- registry ------------------------------------------------------------ */

static int is_vec(metrics_kind k)
{
    return k >= METRICS_COUNTER_VEC;
}

static metrics_kind base_kind(metrics_kind k)
{
    return is_vec(k) ? (metrics_kind)(k - METRICS_COUNTER_VEC) : k;
}

metrics *metrics_create(const char *program)
{
    metrics *m = mem_calloc(1, sizeof *m);
    pthread_mutex_init(&m->mu, NULL);
    m->program = mem_strdup(program);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    m->start_time = (double)ts.tv_sec + ts.tv_nsec / 1e9;
    return m;
}

static void series_free(series *s, const metrics_family *f)
{
    if (base_kind(f->kind) == METRICS_HISTOGRAM)
        mem_free(s->m.h.counts);
    for (size_t i = 0; i < f->nlabels; i++)
        mem_free(s->values[i]);
    mem_free(s->values);
    mem_free(s);
}

void metrics_destroy(metrics **mp)
{
    metrics *m = *mp;
    if (m == NULL)
        return;
    *mp = NULL;
    for (metrics_family *f = m->families, *fnext; f != NULL; f = fnext) {
        fnext = f->next;
        for (series *s = f->head, *snext; s != NULL; s = snext) {
            snext = s->next;
            series_free(s, f);
        }
        pthread_mutex_destroy(&f->mu);
        mem_free(f->name);
        mem_free(f->help);
        mem_free(f->label_spec);
        for (size_t i = 0; i < f->nlabels; i++)
            mem_free(f->labels[i]);
        mem_free(f);
    }
    for (hook *h = m->hooks, *next; h != NULL; h = next) {
        next = h->next;
        mem_free(h);
    }
    pthread_mutex_destroy(&m->mu);
    mem_free(m->program);
    mem_free(m);
}

/* [a-zA-Z_:][a-zA-Z0-9_:]* for names; labels the same without ':'. */
static int valid_name(const char *s, size_t len, int colon_ok)
{
    if (len == 0)
        return 0;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
                 (colon_ok && c == ':') || (i > 0 && c >= '0' && c <= '9');
        if (!ok)
            return 0;
    }
    return 1;
}

/* Splits "a,b" into f->labels. Returns 0 or METRICS_EARG. */
static int parse_labels(metrics_family *f, const char *spec)
{
    const char *p = spec;
    while (*p != '\0') {
        const char *comma = strchr(p, ',');
        size_t len = comma != NULL ? (size_t)(comma - p) : strlen(p);
        if (f->nlabels == MAX_LABELS || !valid_name(p, len, 0) ||
            (len == 2 && strncmp(p, "le", 2) == 0) || (len >= 2 && strncmp(p, "__", 2) == 0))
            return METRICS_EARG;
        f->labels[f->nlabels++] = mem_strndup(p, len);
        p = comma != NULL ? comma + 1 : p + len;
    }
    return 0;
}

static series *series_new(metrics_family *f, const char *const *values)
{
    series *s = mem_calloc(1, sizeof *s);
    s->values = mem_calloc(f->nlabels ? f->nlabels : 1, sizeof *s->values);
    for (size_t i = 0; i < f->nlabels; i++)
        s->values[i] = mem_strdup(values[i]);
    if (base_kind(f->kind) == METRICS_HISTOGRAM) {
        s->m.h.b = f->buckets;
        s->m.h.counts = mem_calloc(f->buckets->n + 1, sizeof *s->m.h.counts);
    }
    if (f->tail != NULL)
        f->tail->next = s;
    else
        f->head = s;
    f->tail = s;
    f->nseries++;
    return s;
}

static metrics_family *family_new(const metrics_def *d)
{
    metrics_family *f = mem_calloc(1, sizeof *f);
    f->name = mem_strdup(d->name);
    f->help = mem_strdup(d->help);
    f->kind = d->kind;
    f->label_spec = mem_strdup(d->labels);
    f->buckets = d->buckets;
    pthread_mutex_init(&f->mu, NULL);
    if (parse_labels(f, d->labels) != 0 || is_vec(d->kind) != (f->nlabels > 0) ||
        !valid_name(d->name, strlen(d->name), 1) ||
        (base_kind(d->kind) == METRICS_HISTOGRAM) != (d->buckets != NULL)) {
        for (size_t i = 0; i < f->nlabels; i++)
            mem_free(f->labels[i]);
        pthread_mutex_destroy(&f->mu);
        mem_free(f->label_spec);
        mem_free(f->help);
        mem_free(f->name);
        mem_free(f);
        return NULL;
    }
    if (!is_vec(d->kind))
        series_new(f, NULL);
    return f;
}

/* The family of d, found or made (m->mu held). */
static int family_get(metrics *m, const metrics_def *d, metrics_family **out)
{
    for (metrics_family *f = m->families; f != NULL; f = f->next) {
        if (strcmp(f->name, d->name) != 0)
            continue;
        if (f->kind != d->kind || strcmp(f->label_spec, d->labels) != 0 || f->buckets != d->buckets)
            return METRICS_EDUP;
        *out = f;
        return 0;
    }
    metrics_family *f = family_new(d);
    if (f == NULL)
        return METRICS_EARG;
    if (m->last != NULL)
        m->last->next = f;
    else
        m->families = f;
    m->last = f;
    *out = f;
    return 0;
}

static void *member_value(metrics_family *f)
{
    if (is_vec(f->kind))
        return f;
    return &f->head->m;
}

int metrics_register(metrics *m, metrics_section sec)
{
    int rc = 0;
    for (size_t i = 0; i < sec.n; i++)
        *(void **)((char *)sec.base + sec.defs[i].offset) = NULL;
    if (m == NULL)
        return 0;
    pthread_mutex_lock(&m->mu);
    for (size_t i = 0; i < sec.n && rc == 0; i++) {
        metrics_family *f = NULL;
        rc = family_get(m, &sec.defs[i], &f);
        if (rc == 0)
            *(void **)((char *)sec.base + sec.defs[i].offset) = member_value(f);
        else
            log_error("metric %s: %s", sec.defs[i].name,
                      rc == METRICS_EDUP ? "registered before with another definition"
                                         : "bad name, labels, kind or buckets");
    }
    pthread_mutex_unlock(&m->mu);
    if (rc != 0)
        for (size_t i = 0; i < sec.n; i++)
            *(void **)((char *)sec.base + sec.defs[i].offset) = NULL;
    return rc;
}

static series *series_of(metrics_family *f, metrics_kind kind, const char *const *values)
{
    if (f == NULL || f->kind != kind)
        return NULL;
    series *found = NULL;
    pthread_mutex_lock(&f->mu);
    for (series *s = f->head; s != NULL && found == NULL; s = s->next) {
        size_t i = 0;
        while (i < f->nlabels && strcmp(s->values[i], values[i]) == 0)
            i++;
        if (i == f->nlabels)
            found = s;
    }
    if (found == NULL && f->nseries < METRICS_MAX_SERIES) {
        found = series_new(f, values);
    } else if (found == NULL && !f->full_logged) {
        f->full_logged = 1;
        log_error("metric %s holds %d series, its bound; new label values are not counted "
                  "(a label fed values it should not be?)",
                  f->name, METRICS_MAX_SERIES);
    }
    pthread_mutex_unlock(&f->mu);
    return found;
}

metrics_counter *metrics_counter_of(metrics_family *f, const char *const *values)
{
    series *s = series_of(f, METRICS_COUNTER_VEC, values);
    return s != NULL ? &s->m.c : NULL;
}

metrics_gauge *metrics_gauge_of(metrics_family *f, const char *const *values)
{
    series *s = series_of(f, METRICS_GAUGE_VEC, values);
    return s != NULL ? &s->m.g : NULL;
}

metrics_histogram *metrics_histogram_of(metrics_family *f, const char *const *values)
{
    series *s = series_of(f, METRICS_HISTOGRAM_VEC, values);
    return s != NULL ? &s->m.h : NULL;
}

/* ---- updates --------------------------------------------------------------- */

void metrics_counter_add(metrics_counter *c, uint64_t n)
{
    if (c != NULL)
        atomic_fetch_add_explicit(&c->v, n, memory_order_relaxed);
}

void metrics_counter_inc(metrics_counter *c)
{
    if (c != NULL)
        atomic_fetch_add_explicit(&c->v, 1, memory_order_relaxed);
}

void metrics_gauge_set(metrics_gauge *g, int64_t v)
{
    if (g != NULL)
        atomic_store_explicit(&g->v, v, memory_order_relaxed);
}

void metrics_gauge_add(metrics_gauge *g, int64_t d)
{
    if (g != NULL)
        atomic_fetch_add_explicit(&g->v, d, memory_order_relaxed);
}

void metrics_histogram_observe(metrics_histogram *h, uint64_t v)
{
    if (h == NULL)
        return;
    /* Binary search for the first bound >= v; n when above them all. */
    size_t lo = 0, hi = h->b->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (h->b->bounds[mid] < v)
            lo = mid + 1;
        else
            hi = mid;
    }
    atomic_fetch_add_explicit(&h->counts[lo], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->sum, v, memory_order_relaxed);
}

uint64_t metrics_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

void metrics_on_render(metrics *m, void (*fn)(void *arg), void *arg)
{
    if (m == NULL)
        return;
    hook *h = mem_calloc(1, sizeof *h);
    h->fn = fn;
    h->arg = arg;
    pthread_mutex_lock(&m->mu);
    hook **at = &m->hooks;
    while (*at != NULL)
        at = &(*at)->next;
    *at = h;
    pthread_mutex_unlock(&m->mu);
}

/* ---- exposition ------------------------------------------------------------ */

typedef struct out {
    char *buf;
    size_t len, cap;
} out;

static void out_reserve(out *o, size_t more)
{
    if (o->len + more + 1 <= o->cap)
        return;
    size_t cap = o->cap ? o->cap : 4096;
    while (o->len + more + 1 > cap)
        cap *= 2;
    o->buf = mem_realloc(o->buf, cap);
    o->cap = cap;
}

static void out_put(out *o, const char *s, size_t n)
{
    out_reserve(o, n);
    memcpy(o->buf + o->len, s, n);
    o->len += n;
    o->buf[o->len] = '\0';
}

static void out_str(out *o, const char *s)
{
    out_put(o, s, strlen(s));
}

static void out_printf(out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void out_printf(out *o, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n <= 0)
        return;
    out_reserve(o, (size_t)n);
    va_start(ap, fmt);
    vsnprintf(o->buf + o->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    o->len += (size_t)n;
}

/* Escapes for HELP text (backslash, newline) or, with quote, for label
 * values (and the double quote). */
static void out_escaped(out *o, const char *s, int quote)
{
    for (; *s != '\0'; s++) {
        if (*s == '\\')
            out_str(o, "\\\\");
        else if (*s == '\n')
            out_str(o, "\\n");
        else if (quote && *s == '"')
            out_str(o, "\\\"");
        else
            out_put(o, s, 1);
    }
}

/* The shortest text that reads back as v, in fixed notation unless the
 * exponent is below -4 or above 20 (as Prometheus' own clients write it:
 * le="10", not le="1e+01", so queries naming a bucket find it). */
static void fmt_double(char *buf, size_t size, double v)
{
    char sci[40];
    int prec = 1;
    for (; prec < 17; prec++) {
        snprintf(sci, sizeof sci, "%.*e", prec - 1, v);
        if (strtod(sci, NULL) == v)
            break;
    }
    snprintf(sci, sizeof sci, "%.*e", prec - 1, v);
    int exp = atoi(strchr(sci, 'e') + 1);
    if (v != 0 && (exp < -4 || exp > 20)) {
        snprintf(buf, size, "%s", sci);
        return;
    }
    int decimals = prec - 1 - exp;
    snprintf(buf, size, "%.*f", decimals > 0 ? decimals : 0, v);
}

static void out_header(out *o, const char *name, const char *help, const char *type)
{
    out_printf(o, "# HELP %s ", name);
    out_escaped(o, help, 0);
    out_printf(o, "\n# TYPE %s %s\n", name, type);
}

/* {a="x",b="y"} plus an optional le, or nothing at all. */
static void out_labels(out *o, const metrics_family *f, const series *s, const char *le)
{
    if (f->nlabels == 0 && le == NULL)
        return;
    out_str(o, "{");
    for (size_t i = 0; i < f->nlabels; i++) {
        out_printf(o, "%s%s=\"", i ? "," : "", f->labels[i]);
        out_escaped(o, s->values[i], 1);
        out_str(o, "\"");
    }
    if (le != NULL)
        out_printf(o, "%sle=\"%s\"", f->nlabels ? "," : "", le);
    out_str(o, "}");
}

static void render_histogram(out *o, const metrics_family *f, const series *s)
{
    const struct metrics_histogram *h = &s->m.h;
    uint64_t cum = 0;
    char le[64], sum[64];
    for (size_t i = 0; i <= h->b->n; i++) {
        cum += atomic_load_explicit(&h->counts[i], memory_order_relaxed);
        if (i < h->b->n)
            fmt_double(le, sizeof le, (double)h->b->bounds[i] / h->b->per_unit);
        else
            snprintf(le, sizeof le, "+Inf");
        out_printf(o, "%s_bucket", f->name);
        out_labels(o, f, s, le);
        out_printf(o, " %llu\n", (unsigned long long)cum);
    }
    fmt_double(sum, sizeof sum,
               (double)atomic_load_explicit(&h->sum, memory_order_relaxed) / h->b->per_unit);
    out_printf(o, "%s_sum", f->name);
    out_labels(o, f, s, NULL);
    out_printf(o, " %s\n%s_count", sum, f->name);
    out_labels(o, f, s, NULL);
    /* The count is the buckets' total, so it always equals the +Inf bucket. */
    out_printf(o, " %llu\n", (unsigned long long)cum);
}

static void render_family(out *o, metrics_family *f)
{
    static const char *const types[] = {"counter", "gauge", "histogram"};
    pthread_mutex_lock(&f->mu);
    if (f->head == NULL)
        goto out; /* no label values seen yet: nothing to say */
    out_header(o, f->name, f->help, types[base_kind(f->kind)]);
    for (const series *s = f->head; s != NULL; s = s->next) {
        switch (base_kind(f->kind)) {
        case METRICS_COUNTER:
            out_str(o, f->name);
            out_labels(o, f, s, NULL);
            out_printf(o, " %llu\n",
                       (unsigned long long)atomic_load_explicit(&s->m.c.v, memory_order_relaxed));
            break;
        case METRICS_GAUGE:
            out_str(o, f->name);
            out_labels(o, f, s, NULL);
            out_printf(o, " %lld\n",
                       (long long)atomic_load_explicit(&s->m.g.v, memory_order_relaxed));
            break;
        default:
            render_histogram(o, f, s);
        }
    }
out:
    pthread_mutex_unlock(&f->mu);
}

/* /proc/self/statm: total and resident pages. */
static void memory_pages(long *vsz, long *rss)
{
    *vsz = *rss = 0;
    FILE *fp = fopen("/proc/self/statm", "r");
    if (fp == NULL)
        return;
    if (fscanf(fp, "%ld %ld", vsz, rss) != 2)
        *vsz = *rss = 0;
    fclose(fp);
}

static long open_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (d == NULL)
        return 0;
    long n = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL;)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n - 1; /* the directory's own descriptor */
}

/* The figures every Prometheus client library exposes under these names,
 * so stock dashboards and alerts apply; and our allocator's count. */
static void render_process(out *o, const metrics *m)
{
    char v[64];
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
                 (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    long vsz, rss, page = sysconf(_SC_PAGESIZE);
    memory_pages(&vsz, &rss);
    struct rlimit rl;
    long max_fds = getrlimit(RLIMIT_NOFILE, &rl) == 0 ? (long)rl.rlim_cur : 0;

    out_header(o, "process_cpu_seconds_total", "Total user and system CPU time spent in seconds.",
               "counter");
    fmt_double(v, sizeof v, cpu);
    out_printf(o, "process_cpu_seconds_total %s\n", v);
    out_header(o, "process_resident_memory_bytes", "Resident memory size in bytes.", "gauge");
    out_printf(o, "process_resident_memory_bytes %ld\n", rss * page);
    out_header(o, "process_virtual_memory_bytes", "Virtual memory size in bytes.", "gauge");
    out_printf(o, "process_virtual_memory_bytes %ld\n", vsz * page);
    out_header(o, "process_open_fds", "Number of open file descriptors.", "gauge");
    out_printf(o, "process_open_fds %ld\n", open_fds());
    out_header(o, "process_max_fds", "Maximum number of open file descriptors.", "gauge");
    out_printf(o, "process_max_fds %ld\n", max_fds);
    out_header(o, "process_start_time_seconds",
               "Start time of the process since unix epoch in seconds.", "gauge");
    fmt_double(v, sizeof v, m->start_time);
    out_printf(o, "process_start_time_seconds %s\n", v);
    out_header(o, "convo_mem_allocated_bytes",
               "Bytes held through the runtime's allocator (runtime/mem) now.", "gauge");
    out_printf(o, "convo_mem_allocated_bytes %zu\n", mem_used());
    out_header(o, "convo_build_info", "The program and version of this process (always 1).",
               "gauge");
    out_str(o, "convo_build_info{program=\"");
    out_escaped(o, m->program, 1);
    out_str(o, "\",version=\"" CONVO_VERSION "\"} 1\n");
}

char *metrics_render(metrics *m, size_t *len)
{
    out o = {0};
    out_reserve(&o, 0);
    o.buf[0] = '\0';
    pthread_mutex_lock(&m->mu);
    for (hook *h = m->hooks; h != NULL; h = h->next)
        h->fn(h->arg);
    for (metrics_family *f = m->families; f != NULL; f = f->next)
        render_family(&o, f);
    pthread_mutex_unlock(&m->mu);
    render_process(&o, m);
    if (len != NULL)
        *len = o.len;
    return o.buf;
}
