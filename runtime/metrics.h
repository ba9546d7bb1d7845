/* metrics — counters, gauges and histograms of one process, and their
 * Prometheus text exposition (format 0.0.4).
 *
 * Each module declares its metrics in one X-macro table beside its code,
 * as it declares its options (conf.h):
 *
 *   #define STORE_METRICS(X, S)                                                       \
 *       X(S, appended, COUNTER, "convo_store_events_appended_total", "", NULL,        \
 *         "events written to the event log")                                          \
 *       X(S, db_seconds, HISTOGRAM_VEC, "convo_store_db_seconds", "statement",        \
 *         &metrics_buckets_seconds, "time of one database statement")
 *   METRICS_DECLARE(store_metrics, STORE_METRICS)
 *
 * declares `typedef struct store_metrics {metrics_counter *appended;
 * metrics_family *db_seconds;} store_metrics;` and its table;
 * metrics_register() fills the struct. A plain kind is one series; a _VEC
 * kind has labels (comma-separated names) whose values are fixed words
 * chosen by the code, never ids: metrics_*_of() finds or makes the series
 * of a set of values (under a lock: look it up once and keep the pointer),
 * and refuses more than METRICS_MAX_SERIES of them per family.
 *
 * Updates are lock-free (relaxed atomics; a histogram is an atomic count
 * per bucket and an atomic sum) and take any thread. Every function accepts
 * NULL for its metric and then does nothing: a process started with metrics
 * off registers into a NULL registry, which leaves every pointer NULL, so
 * nothing is counted and no clock is read on its behalf. */
#ifndef CONVO_METRICS_H
#define CONVO_METRICS_H

#include <stddef.h>
#include <stdint.h>

/* Series one family may hold; past it metrics_*_of() returns NULL (logged
 * once). A bound hit means a label is fed values it should not be. */
#define METRICS_MAX_SERIES 2000

#define METRICS_EDUP (-1) /* a name registered before with another kind, labels or buckets */
#define METRICS_EARG (-2) /* a bad name, label list or kind */

typedef enum metrics_kind {
    METRICS_COUNTER,
    METRICS_GAUGE,
    METRICS_HISTOGRAM,
    METRICS_COUNTER_VEC,
    METRICS_GAUGE_VEC,
    METRICS_HISTOGRAM_VEC,
} metrics_kind;

/* A histogram's upper bounds, in the unit values are observed in;
 * `per_unit` of them make one exposed base unit (1e6: observed in
 * microseconds, exposed in seconds; a division, so 100 µs reads 0.0001). */
typedef struct metrics_buckets {
    double per_unit;
    size_t n;
    const uint64_t *bounds; /* ascending; +Inf is implied */
} metrics_buckets;

/* Durations observed in microseconds (metrics_now_us), exposed in seconds:
 * 100 µs to 300 s. */
extern const metrics_buckets metrics_buckets_seconds;
/* Sizes and counts (events in a batch): 1 to 10,000. */
extern const metrics_buckets metrics_buckets_count;

typedef struct metrics metrics;
typedef struct metrics_family metrics_family;
typedef struct metrics_counter metrics_counter;
typedef struct metrics_gauge metrics_gauge;
typedef struct metrics_histogram metrics_histogram;

typedef struct metrics_def {
    const char *name;
    const char *help;
    metrics_kind kind;
    const char *labels; /* "a,b"; "" for plain kinds */
    const metrics_buckets *buckets;
    size_t offset; /* of the member in the module's struct */
} metrics_def;

typedef struct metrics_section {
    const metrics_def *defs;
    size_t n;
    void *base;
} metrics_section;

#define METRICS__T_COUNTER                                           metrics_counter *
#define METRICS__T_GAUGE                                             metrics_gauge *
#define METRICS__T_HISTOGRAM                                         metrics_histogram *
#define METRICS__T_COUNTER_VEC                                       metrics_family *
#define METRICS__T_GAUGE_VEC                                         metrics_family *
#define METRICS__T_HISTOGRAM_VEC                                     metrics_family *
#define METRICS__MEMBER(S, field, kind, name, labels, buckets, help) METRICS__T_##kind field;
#define METRICS__ROW(S, field, kind, name, labels, buckets, help)                                  \
    {name, help, METRICS_##kind, labels, buckets, offsetof(struct S, field)},
#define METRICS_DECLARE(S, TABLE)                                                                  \
    typedef struct S {                                                                             \
        TABLE(METRICS__MEMBER, S)                                                                  \
    } S;                                                                                           \
    static const metrics_def S##_table[] = {TABLE(METRICS__ROW, S)};
#define METRICS_SECTION(S, ptr)                                                                    \
    ((metrics_section){S##_table, sizeof S##_table / sizeof S##_table[0], (ptr)})

/* A registry for process `program` (shown in convo_build_info). Its
 * exposition always ends with the process's own figures: CPU seconds,
 * resident and virtual memory, open and allowed descriptors, start time
 * and the bytes held through runtime/mem. */
metrics *metrics_create(const char *program);
/* Frees the registry and every metric in it; clears *m. Nothing may update
 * or render it any more. */
void metrics_destroy(metrics **m);

/* Makes (or, for a name registered before with the same definition, finds)
 * every metric of the section and fills its struct; two servers of one
 * process share their families. With m NULL every member is set to NULL.
 * Returns 0, METRICS_EDUP or METRICS_EARG (logged; members then NULL). */
int metrics_register(metrics *m, metrics_section sec);

/* The series of a _VEC family for label values `values` (as many as the
 * family has labels; copied), made on first use. NULL when f is NULL, the
 * kind differs or the family is at METRICS_MAX_SERIES. Thread-safe. */
metrics_counter *metrics_counter_of(metrics_family *f, const char *const *values);
metrics_gauge *metrics_gauge_of(metrics_family *f, const char *const *values);
metrics_histogram *metrics_histogram_of(metrics_family *f, const char *const *values);

void metrics_counter_add(metrics_counter *c, uint64_t n);
void metrics_counter_inc(metrics_counter *c);
void metrics_gauge_set(metrics_gauge *g, int64_t v);
/* Adds d (negative to take away). */
void metrics_gauge_add(metrics_gauge *g, int64_t d);
/* Counts value v (in the unit of the family's buckets) into its bucket. */
void metrics_histogram_observe(metrics_histogram *h, uint64_t v);
/* Microseconds on a monotonic clock, for metrics_buckets_seconds. */
uint64_t metrics_now_us(void);

/* fn(arg) runs on the rendering thread before each exposition, to set
 * gauges that are cheaper read now than tracked (a queue's length). arg
 * must outlive every later render. Ignored when m is NULL. */
void metrics_on_render(metrics *m, void (*fn)(void *arg), void *arg);
/* The exposition text of every family (registration order) and the
 * process's figures; the caller mem_free()s it. */
char *metrics_render(metrics *m, size_t *len);

#endif
