/* Not a test: what a span costs the thread that makes it, without an
 * exporter (ids only) and with one (the record and its hand-over), and what
 * making a span current costs (the gateway does it twice per token).
 *
 *   bench_trace [SPANS] [COLLECTOR_URL]
 *
 * With a collector URL (an OTLP/HTTP receiver; its base URL) the recorded
 * spans are exported too, and the spans exported and dropped are printed. */
#include "conf.h"
#include "mem.h"
#include "metrics.h"
#include "otlp.h"
#include "trace.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* n spans of a turn's shape: a child of a remote parent, three attributes,
 * an event. Returns ns per span. */
static double spans(otlp *e, long n)
{
    trace_ctx parent;
    trace_parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", &parent);
    double t0 = now_s();
    for (long i = 0; i < n; i++) {
        trace_span s;
        trace_span_start(&s, e, "chat turn", TRACE_SERVER, &parent, NULL);
        trace_span_set_str(&s, "convo.strategy", "analytical");
        trace_span_set_int(&s, "convo.turn_id", i);
        trace_span_set_str(&s, "convo.outcome", "done");
        trace_span_event(&s, "first_token");
        trace_span_end(&s);
    }
    return (now_s() - t0) * 1e9 / (double)n;
}

/* A sample's value: the line that starts with `series` and a space. */
static double sample(const char *text, const char *series)
{
    size_t n = strlen(series);
    for (const char *p = text; (p = strstr(p, series)) != NULL; p += n)
        if ((p == text || p[-1] == '\n') && p[n] == ' ')
            return atof(p + n + 1);
    return 0;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    const char *url = argc > 2 ? argv[2] : NULL;
    printf("ids only (no exporter): %.0f ns a span\n", spans(NULL, n));

    trace_span s;
    trace_span_start(&s, NULL, "turn", TRACE_SERVER, NULL, NULL);
    double t0 = now_s();
    for (long i = 0; i < 10 * n; i++) {
        const trace_span *prev = trace_set_current(&s);
        trace_set_current(prev);
    }
    printf("current and back: %.1f ns\n", (now_s() - t0) * 1e9 / (double)(10 * n));
    trace_span_end(&s);

    if (url == NULL)
        return 0;
    otlp_opts o = {0};
    conf_section sec = CONF_SECTION(otlp_opts, &o);
    char *args[] = {argv[0], "--otel-exporter-otlp-endpoint", (char *)url, NULL};
    if (conf_parse(3, args, "bench_trace", "span costs", &sec, 1) != 0)
        return 2;
    metrics *m = metrics_create("bench_trace");
    otlp *e = NULL;
    if (otlp_setup(&o, "bench_trace", m, &e) != 0 || e == NULL)
        return 2;
    printf("recorded and queued: %.0f ns a span\n", spans(e, n));
    otlp_destroy(&e);
    char *text = metrics_render(m, NULL);
    printf("exported %.0f, dropped (queue full) %.0f of %ld\n",
           sample(text, "convo_trace_spans_exported_total"),
           sample(text, "convo_trace_spans_dropped_total{reason=\"queue_full\"}"), n);
    mem_free(text);
    metrics_destroy(&m);
    conf_free(&sec, 1);
    return 0;
}
