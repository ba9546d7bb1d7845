/* metrics and scrape: the exposition text, histogram buckets, exact counts
 * under concurrent updates, registration rules, the series bound, and the
 * HTTP listener (paths, methods, health, a port clash). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "mem.h"
#include "metrics.h"
#include "scrape.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define T_METRICS(X, S)                                                                            \
    X(S, requests, COUNTER, "t_requests_total", "", NULL, "requests seen")                         \
    X(S, live, GAUGE, "t_live", "", NULL, "live things")                                           \
    X(S, by_code, COUNTER_VEC, "t_calls_total", "method,code", NULL,                               \
      "calls by \"method\" and code\\ with a\nnewline")                                            \
    X(S, size, HISTOGRAM, "t_batch_events", "", &metrics_buckets_count, "events per batch")        \
    X(S, latency, HISTOGRAM_VEC, "t_latency_seconds", "op", &metrics_buckets_seconds,              \
      "time of one op")
METRICS_DECLARE(t_metrics, T_METRICS)

/* The registry's families, without the process's own figures. */
static char *families_text(metrics *m)
{
    char *text = metrics_render(m, NULL);
    char *proc = strstr(text, "# HELP process_cpu_seconds_total");
    assert_non_null(proc);
    *proc = '\0';
    return text;
}

static void exposition_format(void **state)
{
    metrics *m = metrics_create("test");
    t_metrics tm;
    assert_int_equal(metrics_register(m, METRICS_SECTION(t_metrics, &tm)), 0);
    metrics_counter_add(tm.requests, 41);
    metrics_counter_inc(tm.requests);
    metrics_gauge_set(tm.live, 10);
    metrics_gauge_add(tm.live, -3);
    metrics_counter_add(metrics_counter_of(tm.by_code, (const char *[]){"/a.B/C", "OK"}), 2);
    metrics_counter_inc(
        metrics_counter_of(tm.by_code, (const char *[]){"q\"uo\\te\n", "NOT_FOUND"}));
    metrics_histogram_observe(tm.size, 3);
    metrics_histogram_observe(metrics_histogram_of(tm.latency, (const char *[]){"append"}), 1500);

    char *text = families_text(m);
    const char *want = "# HELP t_requests_total requests seen\n"
                       "# TYPE t_requests_total counter\n"
                       "t_requests_total 42\n"
                       "# HELP t_live live things\n"
                       "# TYPE t_live gauge\n"
                       "t_live 7\n"
                       "# HELP t_calls_total calls by \"method\" and code\\\\ with a\\nnewline\n"
                       "# TYPE t_calls_total counter\n"
                       "t_calls_total{method=\"/a.B/C\",code=\"OK\"} 2\n"
                       "t_calls_total{method=\"q\\\"uo\\\\te\\n\",code=\"NOT_FOUND\"} 1\n"
                       "# HELP t_batch_events events per batch\n"
                       "# TYPE t_batch_events histogram\n"
                       "t_batch_events_bucket{le=\"1\"} 0\n"
                       "t_batch_events_bucket{le=\"2\"} 0\n"
                       "t_batch_events_bucket{le=\"5\"} 1\n"
                       "t_batch_events_bucket{le=\"10\"} 1\n"
                       "t_batch_events_bucket{le=\"20\"} 1\n"
                       "t_batch_events_bucket{le=\"50\"} 1\n"
                       "t_batch_events_bucket{le=\"100\"} 1\n"
                       "t_batch_events_bucket{le=\"200\"} 1\n"
                       "t_batch_events_bucket{le=\"500\"} 1\n"
                       "t_batch_events_bucket{le=\"1000\"} 1\n"
                       "t_batch_events_bucket{le=\"2000\"} 1\n"
                       "t_batch_events_bucket{le=\"5000\"} 1\n"
                       "t_batch_events_bucket{le=\"10000\"} 1\n"
                       "t_batch_events_bucket{le=\"+Inf\"} 1\n"
                       "t_batch_events_sum 3\n"
                       "t_batch_events_count 1\n"
                       "# HELP t_latency_seconds time of one op\n"
                       "# TYPE t_latency_seconds histogram\n"
                       "t_latency_seconds_bucket{op=\"append\",le=\"0.0001\"} 0\n"
                       "t_latency_seconds_bucket{op=\"append\",le=\"0.00025\"} 0\n"
                       "t_latency_seconds_bucket{op=\"append\",le=\"0.0005\"} 0\n"
                       "t_latency_seconds_bucket{op=\"append\",le=\"0.001\"} 0\n"
                       "t_latency_seconds_bucket{op=\"append\",le=\"0.0025\"} 1\n";
    assert_true(strncmp(text, want, strlen(want)) == 0 || (printf("%s", text), 0));
    assert_non_null(strstr(text, "t_latency_seconds_bucket{op=\"append\",le=\"300\"} 1\n"
                                 "t_latency_seconds_bucket{op=\"append\",le=\"+Inf\"} 1\n"
                                 "t_latency_seconds_sum{op=\"append\"} 0.0015\n"
                                 "t_latency_seconds_count{op=\"append\"} 1\n"));
    mem_free(text);

    text = metrics_render(m, NULL);
    assert_non_null(strstr(text, "# TYPE process_cpu_seconds_total counter\n"));
    assert_non_null(strstr(text, "# TYPE process_resident_memory_bytes gauge\n"));
    assert_non_null(strstr(text, "\nprocess_open_fds "));
    assert_non_null(strstr(text, "\nprocess_start_time_seconds "));
    assert_non_null(strstr(text, "\nconvo_mem_allocated_bytes "));
    assert_non_null(strstr(text, "\nconvo_build_info{program=\"test\",version=\""));
    size_t n = strlen(text);
    assert_true(n > 0 && text[n - 1] == '\n');
    mem_free(text);
    metrics_destroy(&m);
    assert_null(m);
}

/* A family whose label values were never seen says nothing at all. */
static void empty_family_is_left_out(void **state)
{
    metrics *m = metrics_create("test");
    t_metrics tm;
    assert_int_equal(metrics_register(m, METRICS_SECTION(t_metrics, &tm)), 0);
    char *text = families_text(m);
    assert_null(strstr(text, "t_calls_total"));
    assert_non_null(strstr(text, "t_requests_total 0\n"));
    mem_free(text);
    metrics_destroy(&m);
}

static uint64_t bucket_value(const char *text, const char *le)
{
    char key[96];
    snprintf(key, sizeof key, "t_batch_events_bucket{le=\"%s\"} ", le);
    const char *at = strstr(text, key);
    assert_non_null(at);
    return strtoull(at + strlen(key), NULL, 10);
}

/* Upper bounds are inclusive; buckets are cumulative; above the last bound
 * only +Inf counts; the sum and count are exact. */
static void histogram_buckets(void **state)
{
    metrics *m = metrics_create("test");
    t_metrics tm;
    assert_int_equal(metrics_register(m, METRICS_SECTION(t_metrics, &tm)), 0);
    const uint64_t values[] = {0, 1, 2, 3, 5, 6, 10000, 10001, 1000000};
    uint64_t sum = 0;
    for (size_t i = 0; i < sizeof values / sizeof values[0]; i++) {
        metrics_histogram_observe(tm.size, values[i]);
        sum += values[i];
    }
    char *text = families_text(m);
    assert_int_equal(bucket_value(text, "1"), 2);
    assert_int_equal(bucket_value(text, "2"), 3);
    assert_int_equal(bucket_value(text, "5"), 5);
    assert_int_equal(bucket_value(text, "10"), 6);
    assert_int_equal(bucket_value(text, "5000"), 6);
    assert_int_equal(bucket_value(text, "10000"), 7);
    assert_int_equal(bucket_value(text, "+Inf"), 9);
    char want[96];
    snprintf(want, sizeof want, "t_batch_events_sum %llu\nt_batch_events_count 9\n",
             (unsigned long long)sum);
    assert_non_null(strstr(text, want));
    mem_free(text);
    metrics_destroy(&m);
}

#define THREADS    8
#define INCREMENTS 200000

typedef struct worker_arg {
    t_metrics *tm;
    metrics_counter *shared_series;
} worker_arg;

static void *worker(void *p)
{
    worker_arg *a = p;
    for (int i = 0; i < INCREMENTS; i++) {
        metrics_counter_inc(a->tm->requests);
        metrics_gauge_add(a->tm->live, i % 2 ? -1 : 2);
        metrics_histogram_observe(a->tm->size, (uint64_t)(i % 7));
        metrics_counter_add(a->shared_series, 3);
        /* Looked up while others update it: the same series every time. */
        if (i % 1000 == 0)
            metrics_counter_inc(metrics_counter_of(a->tm->by_code, (const char *[]){"m", "OK"}));
    }
    return NULL;
}

static void concurrent_updates_add_up_exactly(void **state)
{
    metrics *m = metrics_create("test");
    t_metrics tm;
    assert_int_equal(metrics_register(m, METRICS_SECTION(t_metrics, &tm)), 0);
    worker_arg a = {&tm, metrics_counter_of(tm.by_code, (const char *[]){"m", "UNAVAILABLE"})};
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++)
        pthread_create(&th[i], NULL, worker, &a);
    /* Renders run while the workers count: they must not disturb them. */
    for (int i = 0; i < 20; i++)
        mem_free(metrics_render(m, NULL));
    for (int i = 0; i < THREADS; i++)
        pthread_join(th[i], NULL);

    char *text = families_text(m);
    char want[256];
    long long n = (long long)THREADS * INCREMENTS;
    snprintf(want, sizeof want, "t_requests_total %lld\n", n);
    assert_non_null(strstr(text, want));
    snprintf(want, sizeof want, "t_live %lld\n", n / 2); /* +2 on even, -1 on odd steps */
    assert_non_null(strstr(text, want));
    snprintf(want, sizeof want, "t_calls_total{method=\"m\",code=\"UNAVAILABLE\"} %lld\n", 3 * n);
    assert_non_null(strstr(text, want));
    snprintf(want, sizeof want, "t_calls_total{method=\"m\",code=\"OK\"} %lld\n",
             (long long)THREADS * (INCREMENTS / 1000));
    assert_non_null(strstr(text, want));
    snprintf(want, sizeof want, "t_batch_events_count %lld\n", n);
    assert_non_null(strstr(text, want));
    long long sum = 0;
    for (int i = 0; i < INCREMENTS; i++)
        sum += i % 7;
    snprintf(want, sizeof want, "t_batch_events_sum %lld\n", sum * THREADS);
    assert_non_null(strstr(text, want));
    mem_free(text);
    metrics_destroy(&m);
}

#define OTHER_METRICS(X, S)                                                                        \
    X(S, requests, COUNTER, "t_requests_total", "", NULL, "requests seen")                         \
    X(S, live, COUNTER, "t_live", "", NULL, "now a counter")
METRICS_DECLARE(other_metrics, OTHER_METRICS)

#define BAD_METRICS(X, S) X(S, x, COUNTER_VEC, "t_bad_total", "le", NULL, "le is reserved")
METRICS_DECLARE(bad_metrics, BAD_METRICS)

#define NOLABEL_METRICS(X, S)                                                                      \
    X(S, x, COUNTER_VEC, "t_nolabel_total", "", NULL, "a vec needs labels")
METRICS_DECLARE(nolabel_metrics, NOLABEL_METRICS)

#define BADNAME_METRICS(X, S) X(S, x, COUNTER, "t-bad-name", "", NULL, "not a metric name")
METRICS_DECLARE(badname_metrics, BADNAME_METRICS)

static void registration_rules(void **state)
{
    metrics *m = metrics_create("test");
    t_metrics a, b;
    assert_int_equal(metrics_register(m, METRICS_SECTION(t_metrics, &a)), 0);
    /* The same table again (two servers in one process): the same metrics. */
    assert_int_equal(metrics_register(m, METRICS_SECTION(t_metrics, &b)), 0);
    assert_ptr_equal(a.requests, b.requests);
    assert_ptr_equal(a.by_code, b.by_code);
    assert_ptr_equal(metrics_counter_of(a.by_code, (const char *[]){"x", "y"}),
                     metrics_counter_of(b.by_code, (const char *[]){"x", "y"}));
    /* The wrong kind of lookup finds nothing. */
    assert_null(metrics_gauge_of(a.by_code, (const char *[]){"x", "y"}));

    other_metrics o;
    assert_int_equal(metrics_register(m, METRICS_SECTION(other_metrics, &o)), METRICS_EDUP);
    assert_null(o.requests);
    assert_null(o.live);
    bad_metrics bad;
    assert_int_equal(metrics_register(m, METRICS_SECTION(bad_metrics, &bad)), METRICS_EARG);
    nolabel_metrics nl;
    assert_int_equal(metrics_register(m, METRICS_SECTION(nolabel_metrics, &nl)), METRICS_EARG);
    badname_metrics bn;
    assert_int_equal(metrics_register(m, METRICS_SECTION(badname_metrics, &bn)), METRICS_EARG);
    metrics_destroy(&m);
}

/* Metrics off: a NULL registry leaves every member NULL and every update
 * does nothing. */
static void null_registry_is_off(void **state)
{
    t_metrics tm;
    memset(&tm, 0xff, sizeof tm);
    assert_int_equal(metrics_register(NULL, METRICS_SECTION(t_metrics, &tm)), 0);
    assert_null(tm.requests);
    assert_null(tm.live);
    assert_null(tm.by_code);
    assert_null(tm.size);
    assert_null(tm.latency);
    metrics_counter_inc(tm.requests);
    metrics_gauge_add(tm.live, 1);
    metrics_histogram_observe(tm.size, 1);
    assert_null(metrics_counter_of(tm.by_code, (const char *[]){"a", "b"}));
    metrics_on_render(NULL, NULL, NULL);
}

static void series_are_bounded(void **state)
{
    metrics *m = metrics_create("test");
    t_metrics tm;
    assert_int_equal(metrics_register(m, METRICS_SECTION(t_metrics, &tm)), 0);
    char v[32];
    for (int i = 0; i < METRICS_MAX_SERIES; i++) {
        snprintf(v, sizeof v, "v%d", i);
        assert_non_null(metrics_counter_of(tm.by_code, (const char *[]){v, "OK"}));
    }
    assert_null(metrics_counter_of(tm.by_code, (const char *[]){"one-too-many", "OK"}));
    /* Series that exist are still found. */
    assert_non_null(metrics_counter_of(tm.by_code, (const char *[]){"v7", "OK"}));
    metrics_destroy(&m);
}

static int hook_calls;
static void on_render(void *arg)
{
    metrics_gauge_set(arg, 1234);
    hook_calls++;
}

static void render_hooks_set_gauges(void **state)
{
    metrics *m = metrics_create("test");
    t_metrics tm;
    assert_int_equal(metrics_register(m, METRICS_SECTION(t_metrics, &tm)), 0);
    metrics_on_render(m, on_render, tm.live);
    char *text = families_text(m);
    assert_non_null(strstr(text, "t_live 1234\n"));
    assert_int_equal(hook_calls, 1);
    mem_free(text);
    metrics_destroy(&m);
}

/* ---- scrape ------------------------------------------------------------ */

/* Resolves value against listen: the address, "" when off, or NULL when
 * refused. */
static const char *setup_addr(const char *value, const char *listen)
{
    static char addr[64];
    scrape_opts o = {.listen = (char *)value};
    metrics *m = (metrics *)&o; /* overwritten either way */
    if (scrape_setup(&o, "test", listen, addr, sizeof addr, &m) != 0) {
        assert_null(m);
        return NULL;
    }
    if (m == NULL)
        return "";
    metrics_destroy(&m);
    return addr;
}

static void resolve_addresses(void **state)
{
    assert_string_equal(setup_addr("auto", "0.0.0.0:50051"), "0.0.0.0:51051");
    assert_string_equal(setup_addr("auto", "127.0.0.1:0"), "127.0.0.1:0");
    assert_string_equal(setup_addr("auto", "[::1]:8000"), "[::1]:9000");
    assert_string_equal(setup_addr("10.0.0.1:9100", "0.0.0.0:1"), "10.0.0.1:9100");
    assert_string_equal(setup_addr("off", "0.0.0.0:1"), "");
    assert_string_equal(setup_addr("", "0.0.0.0:1"), "");
    assert_null(setup_addr("9100", "0.0.0.0:1"));
    assert_null(setup_addr("h:99999", "0.0.0.0:1"));
    assert_null(setup_addr("auto", "0.0.0.0:65000"));
    assert_null(setup_addr("auto", "nohostport"));
}

/* One HTTP/1.0 request; returns the whole answer (mem_free). */
static char *http(int port, const char *request)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(write(fd, request, strlen(request)), (ssize_t)strlen(request));
    size_t cap = 1 << 16, len = 0;
    char *buf = mem_alloc(cap);
    for (ssize_t n; (n = read(fd, buf + len, cap - len - 1)) > 0;) {
        len += (size_t)n;
        if (len + 1 == cap)
            buf = mem_realloc(buf, cap *= 2);
    }
    buf[len] = '\0';
    close(fd);
    return buf;
}

static int healthy_flag;
static int healthy(void *arg)
{
    return *(int *)arg;
}

static void listener_serves_metrics_and_health(void **state)
{
    metrics *m = metrics_create("test");
    t_metrics tm;
    assert_int_equal(metrics_register(m, METRICS_SECTION(t_metrics, &tm)), 0);
    metrics_counter_add(tm.requests, 5);
    scrape *s = scrape_start("127.0.0.1:0", m, healthy, &healthy_flag);
    assert_non_null(s);
    int port = scrape_port(s);
    assert_true(port > 0);

    char *r = http(port, "GET /metrics HTTP/1.0\r\n\r\n");
    assert_true(strncmp(r, "HTTP/1.0 200", 12) == 0 || strncmp(r, "HTTP/1.1 200", 12) == 0);
    assert_non_null(strstr(r, "Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
    assert_non_null(strstr(r, "\r\n\r\n# HELP t_requests_total requests seen\n"));
    assert_non_null(strstr(r, "\nt_requests_total 5\n"));
    mem_free(r);

    healthy_flag = 1;
    r = http(port, "GET /healthz HTTP/1.0\r\n\r\n");
    assert_non_null(strstr(r, " 200 "));
    mem_free(r);
    healthy_flag = 0;
    r = http(port, "GET /healthz HTTP/1.0\r\n\r\n");
    assert_non_null(strstr(r, " 503 "));
    mem_free(r);

    r = http(port, "GET /metricsx HTTP/1.0\r\n\r\n");
    assert_non_null(strstr(r, " 404 "));
    mem_free(r);
    r = http(port, "POST /metrics HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc");
    assert_non_null(strstr(r, " 405 "));
    assert_non_null(strstr(r, "Allow: GET, HEAD"));
    mem_free(r);

    /* A second listener on the same port is a start-up error. */
    char addr[32];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
    assert_null(scrape_start(addr, m, NULL, NULL));
    assert_null(scrape_start("no-such-host.invalid:1", m, NULL, NULL));

    /* A restart binds at once, though the connections above left the port
     * in TIME_WAIT (a process restarted by its supervisor). */
    scrape_stop(&s);
    assert_null(s);
    s = scrape_start(addr, m, NULL, NULL);
    assert_non_null(s);
    scrape_stop(&s);
    metrics_destroy(&m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(exposition_format),  cmocka_unit_test(empty_family_is_left_out),
        cmocka_unit_test(histogram_buckets),  cmocka_unit_test(concurrent_updates_add_up_exactly),
        cmocka_unit_test(registration_rules), cmocka_unit_test(null_registry_is_off),
        cmocka_unit_test(series_are_bounded), cmocka_unit_test(render_hooks_set_gauges),
        cmocka_unit_test(resolve_addresses),  cmocka_unit_test(listener_serves_metrics_and_health),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
