/* trace and otlp: the W3C traceparent parser and tracestate rule, span ids
 * and sampling, the current span on log lines, the exporter's options,
 * its JSON and its bound (a collector that never answers: every span is
 * dropped and counted, none waits). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "conf.h"
#include "log.h"
#include "mem.h"
#include "metrics.h"
#include "otlp.h"
#include "trace.h"

#include <arpa/inet.h>
#include <json-c/json.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define TID "4bf92f3577b34da6a3ce929d0e0e4736"
#define SID "00f067aa0ba902b7"

/* ---- traceparent --------------------------------------------------------------- */

static void parses_a_valid_traceparent(void **state)
{
    trace_ctx c;
    assert_int_equal(trace_parse("00-" TID "-" SID "-01", &c), 0);
    assert_string_equal(c.trace_id, TID);
    assert_string_equal(c.span_id, SID);
    assert_int_equal(c.flags, 1);
    assert_int_equal(trace_parse("00-" TID "-" SID "-00", &c), 0);
    assert_int_equal(c.flags, 0);
    char out[TRACE_PARENT_LEN + 1];
    trace_parse("00-" TID "-" SID "-09", &c);
    trace_format(&c, out);
    /* Only the sampled bit goes on. */
    assert_string_equal(out, "00-" TID "-" SID "-01");
}

static void refuses_every_malformed_traceparent(void **state)
{
    static const char *const bad[] = {
        "",
        "00",
        "01-" TID "-" SID "-01",                          /* another version */
        "ff-" TID "-" SID "-01",                          /* the forbidden one */
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-" SID "-01", /* upper case */
        "00-" TID "-00F067AA0BA902B7-01",                 /* upper case */
        "00-" TID "-" SID "-0A",                          /* upper case flags */
        "00-00000000000000000000000000000000-" SID "-01", /* zero trace id */
        "00-" TID "-0000000000000000-01",                 /* zero span id */
        "00-" TID "-" SID "-01-extra",                    /* too long for 00 */
        "00-" TID "-" SID "-1",                           /* too short */
        "00-4bf92f3577b34da6a3ce929d0e0e473-" SID "-01",  /* 31 digits */
        "00-4bf92f3577b34da6a3ce929d0e0e4736x" SID "-01", /* separator */
        "00_" TID "-" SID "-01",                          /* separator */
        "00-4bf92f3577b34da6a3ce929d0e0e473g-" SID "-01", /* not hex */
        "00-" TID "-00f067aa0ba902b7 01",                 /* separator */
        " 00-" TID "-" SID "-0",                          /* a blank in front */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        trace_ctx c;
        memset(&c, 'x', sizeof c);
        if (trace_parse(bad[i], &c) != TRACE_EINVAL)
            fail_msg("accepted '%s'", bad[i]);
        assert_false(trace_ctx_valid(&c));
    }
    trace_ctx c;
    assert_int_equal(trace_parse(NULL, &c), TRACE_EINVAL);
}

static void bounds_the_tracestate(void **state)
{
    char s[TRACE_STATE_MAX + 2];
    assert_true(trace_state_ok("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"));
    memset(s, 'a', TRACE_STATE_MAX);
    s[0] = 'k';
    s[1] = '=';
    s[TRACE_STATE_MAX] = '\0';
    assert_true(trace_state_ok(s));
    memset(s, 'a', TRACE_STATE_MAX + 1);
    s[TRACE_STATE_MAX + 1] = '\0';
    assert_false(trace_state_ok(s));
    assert_false(trace_state_ok("a=b\r\nx-injected: 1"));
    assert_false(trace_state_ok(""));
    assert_false(trace_state_ok(NULL));
    /* 33 members */
    char many[33 * 4 + 1] = "";
    for (int i = 0; i < 33; i++)
        strcat(many, i ? ",a=b" : "a=b");
    assert_false(trace_state_ok(many));
}

/* ---- spans ----------------------------------------------------------------------- */

static void children_keep_the_trace_and_its_state(void **state)
{
    trace_ctx parent;
    trace_parse("00-" TID "-" SID "-01", &parent);
    trace_span a, b, root;
    trace_span_start(&a, NULL, "a", TRACE_SERVER, &parent, "vendor=1");
    assert_string_equal(a.ctx.trace_id, TID);
    assert_string_not_equal(a.ctx.span_id, SID);
    assert_int_equal(strlen(a.ctx.span_id), TRACE_SPAN_ID_LEN);
    assert_string_equal(a.state, "vendor=1");
    assert_false(trace_span_recording(&a)); /* no exporter: ids only */
    trace_span_child(&b, &a, "b", TRACE_CLIENT);
    assert_string_equal(b.ctx.trace_id, TID);
    assert_string_not_equal(b.ctx.span_id, a.ctx.span_id);
    assert_string_equal(b.state, "vendor=1");
    trace_span_end(&b);
    trace_span_end(&a);
    assert_null(a.state);
    trace_span_end(&a); /* twice: nothing */

    trace_span_start(&root, NULL, "root", TRACE_SERVER, NULL, "ignored=1");
    assert_true(trace_ctx_valid(&root.ctx));
    assert_string_not_equal(root.ctx.trace_id, TID);
    assert_int_equal(root.ctx.flags, TRACE_FLAG_SAMPLED);
    assert_null(root.state);
    trace_span_end(&root);

    /* A malformed remote parent starts a new trace, its tracestate dropped. */
    trace_span_start_remote(&root, NULL, "r", TRACE_SERVER, "00-" TID "-" SID "-1", "k=v");
    assert_true(trace_ctx_valid(&root.ctx));
    assert_string_not_equal(root.ctx.trace_id, TID);
    assert_null(root.state);
    trace_span_end(&root);
    /* A bad tracestate alone is dropped. */
    trace_span_start_remote(&root, NULL, "r", TRACE_SERVER, "00-" TID "-" SID "-01", "k=\x01");
    assert_string_equal(root.ctx.trace_id, TID);
    assert_null(root.state);
    trace_span_end(&root);
}

static void ids_are_unique(void **state)
{
    enum { N = 2000 };
    char(*ids)[TRACE_ID_LEN + 1] = mem_calloc(N, sizeof *ids);
    for (int i = 0; i < N; i++) {
        trace_span s;
        trace_span_start(&s, NULL, "x", TRACE_INTERNAL, NULL, NULL);
        memcpy(ids[i], s.ctx.trace_id, sizeof ids[i]);
        trace_span_end(&s);
        for (int k = 0; k < i; k++)
            assert_string_not_equal(ids[k], ids[i]);
    }
    mem_free(ids);
}

/* ---- log lines ------------------------------------------------------------------ */

/* The lines written to stderr while fn runs. */
static char *capture_stderr(void (*fn)(void *), void *arg)
{
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    int saved = dup(STDERR_FILENO);
    dup2(fds[1], STDERR_FILENO);
    fn(arg);
    dup2(saved, STDERR_FILENO);
    close(saved);
    close(fds[1]);
    static char buf[8192];
    ssize_t n = read(fds[0], buf, sizeof buf - 1);
    close(fds[0]);
    buf[n > 0 ? n : 0] = '\0';
    return buf;
}

static void log_under_span(void *arg)
{
    trace_span *s = arg;
    const trace_span *prev = trace_set_current(s);
    assert_null(prev);
    assert_ptr_equal(trace_current(), s);
    log_info("inside");
    trace_set_current(prev);
    log_info("outside");
}

static void log_lines_carry_the_current_span(void **state)
{
    log_init("test", LOG_INFO);
    trace_ctx parent;
    trace_parse("00-" TID "-" SID "-01", &parent);
    trace_span s;
    trace_span_start(&s, NULL, "s", TRACE_SERVER, &parent, NULL);
    char *text = capture_stderr(log_under_span, &s);
    char *nl = strchr(text, '\n');
    assert_non_null(nl);
    *nl = '\0';
    json_object *in = json_tokener_parse(text), *out = json_tokener_parse(nl + 1), *v;
    assert_non_null(in);
    assert_non_null(out);
    assert_true(json_object_object_get_ex(in, "trace_id", &v));
    assert_string_equal(json_object_get_string(v), TID);
    assert_true(json_object_object_get_ex(in, "span_id", &v));
    assert_string_equal(json_object_get_string(v), s.ctx.span_id);
    assert_false(json_object_object_get_ex(out, "trace_id", NULL));
    assert_false(json_object_object_get_ex(out, "span_id", NULL));
    json_object_put(in);
    json_object_put(out);
    trace_span_end(&s);
}

/* ---- the exporter ------------------------------------------------------------------ */

/* The exporter's options as from this command line (no environment). */
static int setup(const char *const *args, metrics *m, otlp **out)
{
    otlp_opts o = {0};
    conf_section sec = CONF_SECTION(otlp_opts, &o);
    int argc = 0;
    char *argv[32];
    argv[argc++] = "test";
    for (; args[argc - 1] != NULL; argc++)
        argv[argc] = (char *)args[argc - 1];
    argv[argc] = NULL;
    assert_int_equal(conf_parse(argc, argv, "test", "test", &sec, 1), 0);
    int rc = otlp_setup(&o, "test-svc", m, out);
    conf_free(&sec, 1);
    return rc;
}

static void options_are_checked(void **state)
{
    otlp *e = (otlp *)1;
    assert_int_equal(setup((const char *[]){NULL}, NULL, &e), 0);
    assert_null(e); /* no endpoint: nothing exported */
    const char *const *off[] = {
        (const char *[]){"--otel-exporter-otlp-endpoint", "http://127.0.0.1:9",
                         "--otel-sdk-disabled", "true", NULL},
        (const char *[]){"--otel-exporter-otlp-endpoint", "http://127.0.0.1:9",
                         "--otel-traces-exporter", "none", NULL},
    };
    for (size_t i = 0; i < sizeof off / sizeof off[0]; i++) {
        e = (otlp *)1;
        assert_int_equal(setup(off[i], NULL, &e), 0);
        assert_null(e);
    }
    const char *const *bad[] = {
        (const char *[]){"--otel-exporter-otlp-endpoint", "ftp://127.0.0.1:9", NULL},
        (const char *[]){"--otel-exporter-otlp-endpoint", "127.0.0.1:4318", NULL},
        (const char *[]){"--otel-exporter-otlp-endpoint", "http://127.0.0.1:9",
                         "--otel-exporter-otlp-protocol", "grpc", NULL},
        (const char *[]){"--otel-exporter-otlp-endpoint", "http://127.0.0.1:9",
                         "--otel-exporter-otlp-traces-protocol", "http/protobuf", NULL},
        (const char *[]){"--otel-exporter-otlp-endpoint", "http://127.0.0.1:9",
                         "--otel-exporter-otlp-headers", "no-equals-sign", NULL},
        (const char *[]){"--otel-exporter-otlp-endpoint", "http://127.0.0.1:9",
                         "--otel-exporter-otlp-headers", "bad name=1", NULL},
        (const char *[]){"--otel-exporter-otlp-endpoint", "http://127.0.0.1:9",
                         "--otel-exporter-otlp-headers", "x-key=a%0d%0aInjected: 1", NULL},
        (const char *[]){"--otel-exporter-otlp-endpoint", "http://127.0.0.1:9",
                         "--otel-resource-attributes", "k=%zz", NULL},
        (const char *[]){"--otel-exporter-otlp-endpoint", "http://127.0.0.1:9",
                         "--otel-traces-exporter", "zipkin", NULL},
        /* a client certificate without its key, and the other way round */
        (const char *[]){"--otel-exporter-otlp-endpoint", "https://127.0.0.1:9",
                         "--otel-exporter-otlp-client-certificate", "/etc/hostname", NULL},
        (const char *[]){"--otel-exporter-otlp-endpoint", "https://127.0.0.1:9",
                         "--otel-exporter-otlp-traces-client-key", "/etc/hostname", NULL},
        /* files that cannot be read */
        (const char *[]){"--otel-exporter-otlp-endpoint", "https://127.0.0.1:9",
                         "--otel-exporter-otlp-certificate", "/nonexistent/ca.pem", NULL},
        (const char *[]){"--otel-exporter-otlp-endpoint", "https://127.0.0.1:9",
                         "--otel-exporter-otlp-client-certificate", "/etc/hostname",
                         "--otel-exporter-otlp-client-key", "/nonexistent/key.pem", NULL},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        e = NULL;
        if (setup(bad[i], NULL, &e) != -1)
            fail_msg("accepted case %zu", i);
        assert_null(e);
    }
    /* A count below 1 is refused by conf, at the range of its table. */
    otlp_opts o = {0};
    conf_section sec = CONF_SECTION(otlp_opts, &o);
    char *zero[] = {"test", "--otel-bsp-max-queue-size", "0", NULL};
    assert_int_equal(conf_parse(3, zero, "test", "test", &sec, 1), -1);
}

/* A TCP port that takes connections and never answers: the kernel
 * completes the handshake into the backlog; nobody reads. */
static int silent_listener(int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(fd, 64), 0);
    socklen_t len = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &len);
    *port = ntohs(a.sin_port);
    return fd;
}

/* A sample's value in an exposition ("name{labels}" exactly); -1 when absent. */
static double sample(const char *text, const char *series)
{
    size_t n = strlen(series);
    for (const char *p = text; (p = strstr(p, series)) != NULL; p += n)
        if ((p == text || p[-1] == '\n') && p[n] == ' ')
            return atof(p + n + 1);
    return -1;
}

static void json_is_otlp(void **state)
{
    int port;
    int fd = silent_listener(&port);
    char url[64];
    snprintf(url, sizeof url, "http://127.0.0.1:%d", port);
    otlp *e = NULL;
    assert_int_equal(
        setup((const char *[]){"--otel-exporter-otlp-endpoint", url, "--otel-service-name", "named",
                               "--otel-resource-attributes",
                               "deployment.environment=t%20est,service.name=other",
                               "--otel-bsp-export-timeout", "200", NULL},
              NULL, &e),
        0);
    assert_non_null(e);
    trace_ctx parent;
    trace_parse("00-" TID "-" SID "-01", &parent);
    trace_span s;
    trace_span_start(&s, e, "convo.v1.Router/Route", TRACE_CLIENT, &parent, "v=1");
    assert_true(trace_span_recording(&s));
    trace_span_set_str(&s, "rpc.system", "grpc");
    trace_span_set_int(&s, "rpc.grpc.status_code", 14);
    trace_span_set_bool(&s, "convo.flag", 1);
    trace_span_event(&s, "first_byte");
    trace_ctx other;
    trace_parse("00-" TID "-0123456789abcdef-01", &other);
    trace_span_link(&s, &other);
    trace_span_error(&s, "UNAVAILABLE: %s", "down");
    /* The record as ended, encoded without the queue. */
    otlp_span *rec = s.rec;
    rec->end_ns = rec->start_ns + 5;
    size_t len;
    char *text = otlp_encode(e, rec, &len);
    json_object *o = json_tokener_parse(text);
    assert_non_null(o);
    json_object *rs = json_object_array_get_idx(json_object_object_get(o, "resourceSpans"), 0);
    json_object *attrs =
        json_object_object_get(json_object_object_get(rs, "resource"), "attributes");
    int named = 0, env = 0, instance = 0;
    for (size_t i = 0; i < json_object_array_length(attrs); i++) {
        json_object *kv = json_object_array_get_idx(attrs, i);
        const char *k = json_object_get_string(json_object_object_get(kv, "key"));
        const char *v = json_object_get_string(
            json_object_object_get(json_object_object_get(kv, "value"), "stringValue"));
        named += strcmp(k, "service.name") == 0 && strcmp(v, "named") == 0;
        env += strcmp(k, "deployment.environment") == 0 && strcmp(v, "t est") == 0;
        instance += strcmp(k, "service.instance.id") == 0 && strlen(v) == 36;
    }
    assert_int_equal(named, 1);
    assert_int_equal(env, 1);
    assert_int_equal(instance, 1);
    json_object *sp = json_object_array_get_idx(
        json_object_object_get(
            json_object_array_get_idx(json_object_object_get(rs, "scopeSpans"), 0), "spans"),
        0);
    assert_string_equal(json_object_get_string(json_object_object_get(sp, "traceId")), TID);
    assert_string_equal(json_object_get_string(json_object_object_get(sp, "parentSpanId")), SID);
    assert_string_equal(json_object_get_string(json_object_object_get(sp, "spanId")),
                        s.ctx.span_id);
    assert_string_equal(json_object_get_string(json_object_object_get(sp, "traceState")), "v=1");
    assert_string_equal(json_object_get_string(json_object_object_get(sp, "name")),
                        "convo.v1.Router/Route");
    assert_int_equal(json_object_get_int(json_object_object_get(sp, "kind")), 3);
    json_object *start = json_object_object_get(sp, "startTimeUnixNano");
    assert_true(json_object_is_type(start, json_type_string)); /* int64 as a string */
    assert_int_equal(
        strtoull(json_object_get_string(json_object_object_get(sp, "endTimeUnixNano")), NULL, 10) -
            strtoull(json_object_get_string(start), NULL, 10),
        5);
    json_object *sa = json_object_object_get(sp, "attributes");
    assert_int_equal(json_object_array_length(sa), 3);
    json_object *code = json_object_object_get(json_object_array_get_idx(sa, 1), "value");
    assert_string_equal(json_object_get_string(json_object_object_get(code, "intValue")), "14");
    json_object *flag = json_object_object_get(json_object_array_get_idx(sa, 2), "value");
    assert_true(json_object_get_boolean(json_object_object_get(flag, "boolValue")));
    json_object *ev = json_object_array_get_idx(json_object_object_get(sp, "events"), 0);
    assert_string_equal(json_object_get_string(json_object_object_get(ev, "name")), "first_byte");
    json_object *ln = json_object_array_get_idx(json_object_object_get(sp, "links"), 0);
    assert_string_equal(json_object_get_string(json_object_object_get(ln, "spanId")),
                        "0123456789abcdef");
    json_object *st = json_object_object_get(sp, "status");
    assert_int_equal(json_object_get_int(json_object_object_get(st, "code")), 2);
    assert_string_equal(json_object_get_string(json_object_object_get(st, "message")),
                        "UNAVAILABLE: down");
    json_object_put(o);
    mem_free(text);
    trace_span_end(&s);
    otlp_destroy(&e);
    assert_null(e);
    close(fd);
}

static void a_silent_collector_drops_and_counts(void **state)
{
    enum { SPANS = 1000, QUEUE = 8, BATCH = 4 };
    int port;
    int fd = silent_listener(&port);
    char url[64];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/", port);
    metrics *m = metrics_create("test");
    otlp *e = NULL;
    assert_int_equal(
        setup((const char *[]){"--otel-exporter-otlp-endpoint", url, "--otel-bsp-max-queue-size",
                               "8", "--otel-bsp-max-export-batch-size", "4",
                               "--otel-bsp-schedule-delay", "20", "--otel-bsp-export-timeout",
                               "300", NULL},
              m, &e),
        0);
    assert_non_null(e);
    for (int i = 0; i < SPANS; i++) {
        trace_span s;
        trace_span_start(&s, e, "span", TRACE_INTERNAL, NULL, NULL);
        trace_span_set_int(&s, "i", i);
        trace_span_end(&s);
    }
    /* The exporter's first batch times out against the silent collector. */
    for (int i = 0; i < 200; i++) {
        char *t = metrics_render(m, NULL);
        double f = sample(t, "convo_trace_export_failures_total");
        mem_free(t);
        if (f >= 1)
            break;
        usleep(50000);
    }
    otlp_destroy(&e);
    char *text = metrics_render(m, NULL);
    double full = sample(text, "convo_trace_spans_dropped_total{reason=\"queue_full\"}");
    double failed = sample(text, "convo_trace_spans_dropped_total{reason=\"export_failed\"}");
    double late = sample(text, "convo_trace_spans_dropped_total{reason=\"shutdown\"}");
    double rejected = sample(text, "convo_trace_spans_dropped_total{reason=\"rejected\"}");
    double exported = sample(text, "convo_trace_spans_exported_total");
    double failures = sample(text, "convo_trace_export_failures_total");
    double queued = sample(text, "convo_trace_spans_queued");
    /* Every span is accounted for, none reached the collector, and the
     * queue held no more than its bound: the rest were dropped at once. */
    assert_true(exported == 0);
    assert_true(rejected == 0);
    assert_true(full + failed + late == SPANS);
    assert_true(full >= SPANS - 4 * (QUEUE + BATCH));
    assert_true(failures >= 1);
    assert_true(queued == 0);
    mem_free(text);
    metrics_destroy(&m);
    close(fd);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(parses_a_valid_traceparent),
        cmocka_unit_test(refuses_every_malformed_traceparent),
        cmocka_unit_test(bounds_the_tracestate),
        cmocka_unit_test(children_keep_the_trace_and_its_state),
        cmocka_unit_test(ids_are_unique),
        cmocka_unit_test(log_lines_carry_the_current_span),
        cmocka_unit_test(options_are_checked),
        cmocka_unit_test(json_is_otlp),
        cmocka_unit_test(a_silent_collector_drops_and_counts),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
