#include "otlp.h"

#include "backoff.h"
#include "log.h"
#include "mem.h"

#include <ctype.h>
#include <curl/curl.h>
#include <errno.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

/* The instrumentation scope every span is reported under. */
#define SCOPE_NAME "convo"
/* The one encoding spoken. */
#define PROTOCOL "http/json"
#define PATH     "v1/traces"
/* The start of a collector's answer kept: its partialSuccess, or the
 * reason of a refusal for the log. */
#define ANSWER_MAX 65536
/* Headers and resource attributes each of OTEL_EXPORTER_OTLP_HEADERS and
 * OTEL_RESOURCE_ATTRIBUTES may hold. */
#define PAIRS_MAX 64
/* A failing collector is logged at the first failure and then every this
 * many, so a collector that is down does not flood the log. */
#define FAILURE_LOG_EVERY 100
/* The export thread's nice value (the process's threads run at 0). */
#define EXPORT_NICE 10
/* A batch's retries after a transient failure: the first waits about this
 * long, each later one up to BACKOFF_SPREAD times the one before, never
 * more than the cap (a collector's Retry-After may ask for longer), and all
 * of them within OTEL_BSP_EXPORT_TIMEOUT. */
#define RETRY_BASE_MS 500
#define RETRY_CAP_MS  5000

#define OTLP_METRICS(X, S)                                                                         \
    X(S, exported, COUNTER, "convo_trace_spans_exported_total", "", NULL,                          \
      "spans the collector accepted")                                                              \
    X(S, dropped, COUNTER_VEC, "convo_trace_spans_dropped_total", "reason", NULL,                  \
      "spans never exported, by reason (queue_full: the export queue was full, export_failed: "    \
      "the collector was unreachable, slow or answered an error, rejected: the collector "         \
      "refused them, shutdown: the last flush ran out of time)")                                   \
    X(S, failures, COUNTER, "convo_trace_export_failures_total", "", NULL,                         \
      "exports that failed for good (the collector unreachable, too slow, or an error answer, "    \
      "retries included)")                                                                         \
    X(S, retries, COUNTER, "convo_trace_export_retries_total", "", NULL,                           \
      "export requests sent again after a transient failure (unreachable, too slow, 429, 502, "    \
      "503, 504)")                                                                                 \
    X(S, queued, GAUGE, "convo_trace_spans_queued", "", NULL, "finished spans waiting for export")
METRICS_DECLARE(otlp_metrics, OTLP_METRICS)

enum { DROP_QUEUE_FULL, DROP_EXPORT_FAILED, DROP_REJECTED, DROP_SHUTDOWN, DROP_REASONS };
static const char *const drop_names[DROP_REASONS] = {"queue_full", "export_failed", "rejected",
                                                     "shutdown"};

typedef struct pair {
    char *key, *value;
} pair;

struct otlp {
    char *url;
    pair resource[PAIRS_MAX + 8]; /* the standard attributes, then the user's */
    size_t nresource;
    struct curl_slist *headers;
    CURL *curl;
    size_t max_queue, max_batch;
    int64_t delay_ms, export_timeout_ms, request_timeout_ms;
    otlp_metrics mx;
    metrics_counter *dropped[DROP_REASONS];

    pthread_mutex_t mu;
    pthread_cond_t cv;
    otlp_span *head, *tail;        /* under mu */
    size_t count;                  /* under mu */
    int stopping;                  /* under mu */
    atomic_llong stop_deadline_ms; /* 0: not stopping; read by the transfer's progress callback */
    pthread_t thread;

    /* The export thread's alone. */
    char *answer;
    size_t answer_len;
    unsigned long failures_in_row;
};

static int64_t monotonic_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- spans ------------------------------------------------------------------------ */

static void otlp_span_free(otlp_span *s)
{
    if (s == NULL)
        return;
    for (size_t i = 0; i < s->nattrs; i++)
        mem_free(s->attrs[i].str);
    mem_free(s->events);
    mem_free(s->links);
    mem_free(s->trace_state);
    mem_free(s->name);
    mem_free(s->status_message);
    mem_free(s);
}

static void free_list(otlp_span *s)
{
    while (s != NULL) {
        otlp_span *next = s->next;
        otlp_span_free(s);
        s = next;
    }
}

/* ---- encoding --------------------------------------------------------------------- */

static json_object *nanos(uint64_t ns)
{
    /* int64 fields are strings in OTLP's JSON encoding (protobuf's mapping). */
    char buf[24];
    snprintf(buf, sizeof buf, "%" PRIu64, ns);
    return json_object_new_string(buf);
}

static json_object *key_value(const char *key, json_object *value)
{
    json_object *kv = json_object_new_object();
    json_object_object_add(kv, "key", json_object_new_string(key));
    json_object_object_add(kv, "value", value);
    return kv;
}

static json_object *string_value(const char *s)
{
    json_object *v = json_object_new_object();
    json_object_object_add(v, "stringValue", json_object_new_string(s));
    return v;
}

static json_object *attr_json(const otlp_attr *a)
{
    json_object *v = json_object_new_object();
    char buf[24];
    switch (a->type) {
    case OTLP_INT:
        snprintf(buf, sizeof buf, "%" PRId64, a->i);
        json_object_object_add(v, "intValue", json_object_new_string(buf));
        break;
    case OTLP_BOOL:
        json_object_object_add(v, "boolValue", json_object_new_boolean(a->i != 0));
        break;
    default:
        json_object_object_add(v, "stringValue", json_object_new_string(a->str ? a->str : ""));
        break;
    }
    return key_value(a->key, v);
}

static void add_count(json_object *o, const char *key, uint32_t n)
{
    if (n > 0)
        json_object_object_add(o, key, json_object_new_int64(n));
}

static json_object *span_json(const otlp_span *s)
{
    json_object *o = json_object_new_object();
    json_object_object_add(o, "traceId", json_object_new_string(s->trace_id));
    json_object_object_add(o, "spanId", json_object_new_string(s->span_id));
    if (s->parent_id[0] != '\0')
        json_object_object_add(o, "parentSpanId", json_object_new_string(s->parent_id));
    if (s->trace_state != NULL)
        json_object_object_add(o, "traceState", json_object_new_string(s->trace_state));
    json_object_object_add(o, "name", json_object_new_string(s->name));
    json_object_object_add(o, "kind", json_object_new_int(s->kind));
    json_object_object_add(o, "startTimeUnixNano", nanos(s->start_ns));
    json_object_object_add(o, "endTimeUnixNano", nanos(s->end_ns));
    json_object *attrs = json_object_new_array();
    for (size_t i = 0; i < s->nattrs; i++)
        json_object_array_add(attrs, attr_json(&s->attrs[i]));
    json_object_object_add(o, "attributes", attrs);
    add_count(o, "droppedAttributesCount", s->dropped_attrs);
    if (s->nevents > 0) {
        json_object *evs = json_object_new_array();
        for (size_t i = 0; i < s->nevents; i++) {
            json_object *ev = json_object_new_object();
            json_object_object_add(ev, "timeUnixNano", nanos(s->events[i].time_ns));
            json_object_object_add(ev, "name", json_object_new_string(s->events[i].name));
            json_object_array_add(evs, ev);
        }
        json_object_object_add(o, "events", evs);
    }
    add_count(o, "droppedEventsCount", s->dropped_events);
    if (s->nlinks > 0) {
        json_object *links = json_object_new_array();
        for (size_t i = 0; i < s->nlinks; i++) {
            json_object *l = json_object_new_object();
            json_object_object_add(l, "traceId", json_object_new_string(s->links[i].trace_id));
            json_object_object_add(l, "spanId", json_object_new_string(s->links[i].span_id));
            json_object_array_add(links, l);
        }
        json_object_object_add(o, "links", links);
    }
    add_count(o, "droppedLinksCount", s->dropped_links);
    if (s->status != OTLP_STATUS_UNSET) {
        json_object *st = json_object_new_object();
        json_object_object_add(st, "code", json_object_new_int(s->status));
        if (s->status_message != NULL)
            json_object_object_add(st, "message", json_object_new_string(s->status_message));
        json_object_object_add(o, "status", st);
    }
    return o;
}

char *otlp_encode(const otlp *e, const otlp_span *s, size_t *len)
{
    json_object *attrs = json_object_new_array();
    for (size_t i = 0; i < e->nresource; i++)
        json_object_array_add(attrs,
                              key_value(e->resource[i].key, string_value(e->resource[i].value)));
    json_object *resource = json_object_new_object();
    json_object_object_add(resource, "attributes", attrs);

    json_object *scope = json_object_new_object();
    json_object_object_add(scope, "name", json_object_new_string(SCOPE_NAME));
    json_object_object_add(scope, "version", json_object_new_string(conf_version()));
    json_object *spans = json_object_new_array();
    for (; s != NULL; s = s->next)
        json_object_array_add(spans, span_json(s));
    json_object *ss = json_object_new_object();
    json_object_object_add(ss, "scope", scope);
    json_object_object_add(ss, "spans", spans);
    json_object *scope_spans = json_object_new_array();
    json_object_array_add(scope_spans, ss);

    json_object *rs = json_object_new_object();
    json_object_object_add(rs, "resource", resource);
    json_object_object_add(rs, "scopeSpans", scope_spans);
    json_object *resource_spans = json_object_new_array();
    json_object_array_add(resource_spans, rs);
    json_object *req = json_object_new_object();
    json_object_object_add(req, "resourceSpans", resource_spans);

    size_t n;
    const char *text = json_object_to_json_string_length(
        req, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE, &n);
    char *out = mem_strndup(text, n);
    json_object_put(req);
    *len = n;
    return out;
}

/* ---- the queue --------------------------------------------------------------------- */

static void count_dropped(otlp *e, int reason, size_t n)
{
    metrics_counter_add(e->dropped[reason], n);
}

void otlp_push(otlp *e, otlp_span *s)
{
    s->next = NULL;
    pthread_mutex_lock(&e->mu);
    if (e->count >= e->max_queue || e->stopping) {
        int reason = e->stopping ? DROP_SHUTDOWN : DROP_QUEUE_FULL;
        pthread_mutex_unlock(&e->mu);
        count_dropped(e, reason, 1);
        otlp_span_free(s);
        return;
    }
    if (e->tail != NULL)
        e->tail->next = s;
    else
        e->head = s;
    e->tail = s;
    int full = ++e->count == e->max_batch;
    pthread_mutex_unlock(&e->mu);
    metrics_gauge_add(e->mx.queued, 1);
    if (full)
        pthread_cond_signal(&e->cv);
}

/* ---- one export --------------------------------------------------------------------- */

static size_t on_answer(char *p, size_t sz, size_t n, void *ud)
{
    otlp *e = ud;
    size_t len = sz * n;
    size_t take = len < ANSWER_MAX - e->answer_len ? len : ANSWER_MAX - e->answer_len;
    memcpy(e->answer + e->answer_len, p, take);
    e->answer_len += take;
    return len;
}

/* Aborts a transfer once the shutdown's time is up. */
static int on_progress(void *ud, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal,
                       curl_off_t ulnow)
{
    (void)dltotal;
    (void)dlnow;
    (void)ultotal;
    (void)ulnow;
    otlp *e = ud;
    long long deadline = atomic_load(&e->stop_deadline_ms);
    return deadline != 0 && monotonic_ms() >= deadline;
}

/* The spans of a 2xx answer the collector says it refused
 * (partialSuccess.rejectedSpans; a string or a number). */
static size_t rejected_of(const char *answer, size_t len, size_t sent)
{
    json_tokener *tok = json_tokener_new();
    json_object *o = json_tokener_parse_ex(tok, answer, (int)len);
    json_tokener_free(tok);
    json_object *ps = NULL, *r = NULL;
    size_t n = 0;
    if (o != NULL && json_object_object_get_ex(o, "partialSuccess", &ps) &&
        json_object_object_get_ex(ps, "rejectedSpans", &r)) {
        int64_t v = json_object_get_int64(r);
        n = v < 0 ? 0 : (size_t)v > sent ? sent : (size_t)v;
    }
    json_object_put(o);
    return n;
}

static void export_failed(otlp *e, size_t n, const char *why)
{
    metrics_counter_inc(e->mx.failures);
    count_dropped(e, DROP_EXPORT_FAILED, n);
    if (e->failures_in_row++ % FAILURE_LOG_EVERY == 0)
        log_warn("trace export to %s failed (%s): %zu spans dropped (%lu failures in a row)",
                 e->url, why, n, e->failures_in_row);
}

/* Whether a failed request may succeed when sent again: the OTLP
 * specification's transient failures. A certificate that does not verify
 * or a 4xx answer will fail the same way again. */
static int transient(CURLcode rc, long status)
{
    switch (rc) {
    case CURLE_OK:
        return status == 429 || status == 502 || status == 503 || status == 504;
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_CONNECT:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
        return 1;
    default:
        return 0;
    }
}

/* Waits (mu held) on cv for at most ms > 0: until a push, a stop or the
 * time is up, whichever comes first. */
static void wait_locked(otlp *e, int64_t ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (ms % 1000) * 1000000;
    if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
    }
    pthread_cond_timedwait(&e->cv, &e->mu, &ts);
}

/* Waits ms on the export thread, unless the exporter starts stopping
 * (then no batch is retried: the last flush has only its deadline).
 * Returns 1 when the wait ran out, 0 when stopping. */
static int retry_wait(otlp *e, int64_t ms)
{
    int64_t until = monotonic_ms() + ms;
    pthread_mutex_lock(&e->mu);
    while (!e->stopping) {
        int64_t left = until - monotonic_ms();
        if (left <= 0)
            break;
        wait_locked(e, left);
    }
    int stopping = e->stopping;
    pthread_mutex_unlock(&e->mu);
    return !stopping;
}

/* One POST of body; the answer's start is in e->answer. */
static CURLcode post(otlp *e, const char *body, size_t len, int64_t time_left_ms, long *status)
{
    e->answer_len = 0;
    *status = 0;
    int64_t t = time_left_ms < e->request_timeout_ms ? time_left_ms : e->request_timeout_ms;
    curl_easy_setopt(e->curl, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(e->curl, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
    curl_easy_setopt(e->curl, CURLOPT_TIMEOUT_MS, (long)(t > 0 ? t : 1));
    CURLcode rc = curl_easy_perform(e->curl);
    curl_easy_getinfo(e->curl, CURLINFO_RESPONSE_CODE, status);
    return rc;
}

static void describe(const otlp *e, CURLcode rc, long status, char *why, size_t size)
{
    if (rc != CURLE_OK) {
        snprintf(why, size, "%s", curl_easy_strerror(rc));
        return;
    }
    snprintf(why, size, "HTTP %ld: %.200s", status, e->answer_len ? e->answer : "");
    for (char *p = why; *p; p++)
        if (*p == '\n' || *p == '\r')
            *p = ' ';
}

static void accepted(otlp *e, size_t n)
{
    size_t rejected = rejected_of(e->answer, e->answer_len, n);
    metrics_counter_add(e->mx.exported, n - rejected);
    count_dropped(e, DROP_REJECTED, rejected);
    if (e->failures_in_row > 0)
        log_info("trace export to %s works again after %lu failures", e->url, e->failures_in_row);
    e->failures_in_row = 0;
}

/* Sends one batch, again after each transient failure while the batch's
 * time lasts; spans that never got through are dropped and counted. */
static void export_batch(otlp *e, const otlp_span *spans, size_t n)
{
    size_t len;
    char *body = otlp_encode(e, spans, &len);
    int64_t give_up = monotonic_ms() + e->export_timeout_ms;
    backoff b;
    backoff_init(&b, RETRY_BASE_MS, RETRY_CAP_MS, BACKOFF_DECORRELATED);
    char why[320];
    for (;;) {
        long status;
        CURLcode rc = post(e, body, len, give_up - monotonic_ms(), &status);
        if (rc == CURLE_OK && status >= 200 && status < 300) {
            accepted(e, n);
            break;
        }
        describe(e, rc, status, why, sizeof why);
        int64_t wait = backoff_next(&b);
        curl_off_t after = 0;
        if (rc == CURLE_OK &&
            curl_easy_getinfo(e->curl, CURLINFO_RETRY_AFTER, &after) == CURLE_OK && after > 0)
            wait = (int64_t)after * 1000; /* the collector's own wish, seconds */
        if (!transient(rc, status) || monotonic_ms() + wait >= give_up || !retry_wait(e, wait)) {
            export_failed(e, n, why);
            break;
        }
        metrics_counter_inc(e->mx.retries);
        log_debug("trace export to %s failed (%s): sending it again", e->url, why);
    }
    mem_free(body);
}

/* ---- the export thread ---------------------------------------------------------- */

/* Waits (mu held) until a batch is full, the schedule delay passed or the
 * exporter stops. */
static void wait_for_work(otlp *e)
{
    int64_t due = monotonic_ms() + e->delay_ms;
    while (!e->stopping && e->count < e->max_batch) {
        int64_t left = due - monotonic_ms();
        if (left <= 0)
            return;
        wait_locked(e, left);
    }
}

static void *export_main(void *arg)
{
    otlp *e = arg;
    /* Encoding and posting a batch is a burst of CPU that no turn waits
     * for: on a busy machine it yields to the threads that relay tokens
     * (Linux's nice is per thread). If it falls behind, spans are dropped
     * and counted, never a turn slowed. */
    if (setpriority(PRIO_PROCESS, (id_t)gettid(), EXPORT_NICE) != 0)
        log_debug("trace export thread: setpriority: %s", strerror(errno));
    pthread_mutex_lock(&e->mu);
    for (;;) {
        wait_for_work(e);
        if (e->count == 0) {
            if (e->stopping)
                break;
            continue;
        }
        otlp_span *head = e->head, *last = head;
        size_t n = 1;
        while (n < e->max_batch && last->next != NULL) {
            last = last->next;
            n++;
        }
        e->head = last->next;
        if (e->head == NULL)
            e->tail = NULL;
        last->next = NULL;
        e->count -= n;
        long long deadline = atomic_load(&e->stop_deadline_ms);
        pthread_mutex_unlock(&e->mu);
        metrics_gauge_add(e->mx.queued, -(int64_t)n);
        if (deadline != 0 && monotonic_ms() >= deadline)
            count_dropped(e, DROP_SHUTDOWN, n);
        else
            export_batch(e, head, n);
        free_list(head);
        pthread_mutex_lock(&e->mu);
    }
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

/* ---- configuration ------------------------------------------------------------------ */

static int hexval(char c)
{
    return c >= '0' && c <= '9'   ? c - '0'
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
           : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                  : -1;
}

/* s[0..n) without surrounding blanks, percent-decoded, into a new string;
 * NULL when a %XX is malformed or decodes to a control character. */
static char *decode(const char *s, size_t n)
{
    while (n > 0 && isspace((unsigned char)*s)) {
        s++;
        n--;
    }
    while (n > 0 && isspace((unsigned char)s[n - 1]))
        n--;
    char *out = mem_alloc(n + 1);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '%') {
            int hi = i + 2 < n ? hexval(s[i + 1]) : -1;
            int lo = i + 2 < n ? hexval(s[i + 2]) : -1;
            if (hi < 0 || lo < 0)
                goto bad;
            c = (unsigned char)(hi * 16 + lo);
            i += 2;
        }
        if (c < 0x20 || c == 0x7f)
            goto bad;
        out[k++] = (char)c;
    }
    out[k] = '\0';
    return out;
bad:
    mem_free(out);
    return NULL;
}

/* An HTTP header name (RFC 9110 token). */
static int token(const char *s)
{
    if (*s == '\0')
        return 0;
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && strchr("!#$%&'*+-.^_`|~", *s) == NULL)
            return 0;
    return 1;
}

/* Parses "k=v,k2=v2" (the W3C Baggage form OpenTelemetry uses) into
 * out[*n..]; a key already there takes the new value. Returns 0, or -1
 * after printing what is wrong. */
static int parse_pairs(const char *text, const char *what, int header_names, pair *out, size_t *n,
                       size_t max)
{
    for (const char *p = text; *p != '\0';) {
        size_t len = strcspn(p, ",");
        const char *eq = memchr(p, '=', len);
        char *key = NULL, *value = NULL;
        if (strspn(p, " \t") == len)
            goto next; /* an empty member */
        if (eq == NULL || (key = decode(p, (size_t)(eq - p))) == NULL || key[0] == '\0' ||
            (header_names && !token(key)) ||
            (value = decode(eq + 1, len - (size_t)(eq - p) - 1)) == NULL) {
            fprintf(stderr, "%s: '%.*s' is not key=value with a percent-encoded value\n", what,
                    (int)len, p);
            mem_free(key);
            mem_free(value);
            return -1;
        }
        size_t i = 0;
        while (i < *n && (header_names ? strcasecmp(out[i].key, key) : strcmp(out[i].key, key)))
            i++;
        if (i == *n) {
            if (*n == max) {
                fprintf(stderr, "%s: more than %zu entries\n", what, max);
                mem_free(key);
                mem_free(value);
                return -1;
            }
            out[(*n)++] = (pair){key, value};
        } else {
            mem_free(out[i].key);
            mem_free(out[i].value);
            out[i] = (pair){key, value};
        }
    next:
        p += len;
        if (*p == ',')
            p++;
    }
    return 0;
}

static void free_pairs(pair *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        mem_free(p[i].key);
        mem_free(p[i].value);
    }
}

/* The URL spans are posted to; NULL (printed) when not http(s). */
static char *export_url(const otlp_opts *o)
{
    const char *base = o->traces_endpoint[0] != '\0' ? o->traces_endpoint : o->endpoint;
    if (strncasecmp(base, "http://", 7) != 0 && strncasecmp(base, "https://", 8) != 0) {
        fprintf(stderr, "%s: '%s' is not an http:// or https:// URL\n",
                o->traces_endpoint[0] != '\0' ? "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
                                              : "OTEL_EXPORTER_OTLP_ENDPOINT",
                base);
        return NULL;
    }
    if (o->traces_endpoint[0] != '\0')
        return mem_strdup(base);
    size_t n = strlen(base);
    return mem_asprintf("%s%s" PATH, base, n > 0 && base[n - 1] == '/' ? "" : "/");
}

static void uuid4(char out[37])
{
    unsigned char b[16];
    if (getrandom(b, sizeof b, 0) != (ssize_t)sizeof b) {
        uint64_t x = (uint64_t)monotonic_ms() ^ ((uint64_t)getpid() << 32);
        memcpy(b, &x, sizeof x);
        memcpy(b + 8, &x, sizeof x);
    }
    b[6] = (unsigned char)((b[6] & 0x0f) | 0x40);
    b[8] = (unsigned char)((b[8] & 0x3f) | 0x80);
    snprintf(out, 37, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
             b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
             b[14], b[15]);
}

static void set_resource(otlp *e, const char *key, const char *value)
{
    for (size_t i = 0; i < e->nresource; i++) {
        if (strcmp(e->resource[i].key, key) == 0) {
            mem_free(e->resource[i].value);
            e->resource[i].value = mem_strdup(value);
            return;
        }
    }
    e->resource[e->nresource++] = (pair){mem_strdup(key), mem_strdup(value)};
}

/* service.name and the rest of the resource: OTEL_RESOURCE_ATTRIBUTES
 * first, then what this process knows of itself, then OTEL_SERVICE_NAME. */
static int make_resource(otlp *e, const otlp_opts *o, const char *program)
{
    if (parse_pairs(o->resource_attributes, "OTEL_RESOURCE_ATTRIBUTES", 0, e->resource,
                    &e->nresource, PAIRS_MAX) != 0)
        return -1;
    char uuid[37], host[256] = "", pid[24];
    uuid4(uuid);
    gethostname(host, sizeof host - 1);
    snprintf(pid, sizeof pid, "%ld", (long)getpid());
    int named = 0;
    for (size_t i = 0; i < e->nresource; i++)
        named |= strcmp(e->resource[i].key, "service.name") == 0;
    if (o->service_name[0] != '\0' || !named)
        set_resource(e, "service.name", o->service_name[0] != '\0' ? o->service_name : program);
    set_resource(e, "service.version", conf_version());
    set_resource(e, "service.instance.id", uuid);
    if (host[0] != '\0')
        set_resource(e, "host.name", host);
    set_resource(e, "process.pid", pid);
    set_resource(e, "telemetry.sdk.name", SCOPE_NAME);
    set_resource(e, "telemetry.sdk.version", conf_version());
    return 0;
}

static int make_headers(otlp *e, const otlp_opts *o)
{
    pair h[PAIRS_MAX];
    size_t n = 0;
    int rc = -1;
    if (parse_pairs(o->headers, "OTEL_EXPORTER_OTLP_HEADERS", 1, h, &n, PAIRS_MAX) != 0 ||
        parse_pairs(o->traces_headers, "OTEL_EXPORTER_OTLP_TRACES_HEADERS", 1, h, &n, PAIRS_MAX) !=
            0)
        goto out;
    e->headers = curl_slist_append(NULL, "Content-Type: application/json");
    /* curl would otherwise wait for a 100 Continue on a large batch. */
    e->headers = curl_slist_append(e->headers, "Expect:");
    for (size_t i = 0; i < n; i++) {
        char *line = mem_asprintf("%s: %s", h[i].key, h[i].value);
        e->headers = curl_slist_append(e->headers, line);
        mem_free(line);
    }
    rc = 0;
out:
    free_pairs(h, n);
    return rc;
}

static int check_opts(const otlp_opts *o)
{
    const char *const protos[2][2] = {{o->protocol, "OTEL_EXPORTER_OTLP_PROTOCOL"},
                                      {o->traces_protocol, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"}};
    for (int i = 0; i < 2; i++) {
        if (protos[i][0][0] != '\0' && strcmp(protos[i][0], PROTOCOL) != 0) {
            fprintf(stderr, "%s: '%s' is not spoken here; only " PROTOCOL " is\n", protos[i][1],
                    protos[i][0]);
            return -1;
        }
    }
    return 0;
}

/* The traces_ variable when set, else the general one; NULL when neither. */
static const char *either(const char *traces, const char *general)
{
    return traces[0] != '\0' ? traces : general[0] != '\0' ? general : NULL;
}

/* The TLS files of an export (NULL: not set), the options' strings; curl
 * copies them. */
typedef struct tls_files {
    const char *ca, *cert, *key;
} tls_files;

/* The TLS files of the options into *t, each checked readable now: a
 * missing file is a usage error at start-up, not a failed export later. */
static int get_tls_files(const otlp_opts *o, tls_files *t)
{
    t->ca = either(o->traces_certificate, o->certificate);
    t->cert = either(o->traces_client_certificate, o->client_certificate);
    t->key = either(o->traces_client_key, o->client_key);
    if ((t->cert == NULL) != (t->key == NULL)) {
        fprintf(stderr, "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY "
                        "go together: set both or neither\n");
        return -1;
    }
    const char *const files[3] = {t->ca, t->cert, t->key};
    for (int i = 0; i < 3; i++) {
        if (files[i] != NULL && access(files[i], R_OK) != 0) {
            fprintf(stderr, "trace export: cannot read '%s': %s\n", files[i], strerror(errno));
            return -1;
        }
    }
    return 0;
}

static void setup_curl(otlp *e, const tls_files *t)
{
    CURL *c = curl_easy_init();
    e->curl = c;
    if (c == NULL)
        return;
    curl_easy_setopt(c, CURLOPT_URL, e->url);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, e->headers);
    curl_easy_setopt(c, CURLOPT_POST, 1L);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    /* The whole request's timeout is set per attempt (post). */
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, (long)e->request_timeout_ms);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_answer);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, e);
    curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, on_progress);
    curl_easy_setopt(c, CURLOPT_XFERINFODATA, e);
    curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(c, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(c, CURLOPT_USERAGENT, "convo-otlp/" CONVO_VERSION);
    if (t->ca != NULL)
        curl_easy_setopt(c, CURLOPT_CAINFO, t->ca);
    if (t->cert != NULL) {
        curl_easy_setopt(c, CURLOPT_SSLCERT, t->cert);
        curl_easy_setopt(c, CURLOPT_SSLKEY, t->key);
    }
}

static void curl_init_once(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
}

static void free_exporter(otlp *e)
{
    if (e->curl != NULL)
        curl_easy_cleanup(e->curl);
    curl_slist_free_all(e->headers);
    free_pairs(e->resource, e->nresource);
    free_list(e->head);
    mem_free(e->answer);
    mem_free(e->url);
    mem_free(e);
}

int otlp_setup(const otlp_opts *o, const char *program, metrics *m, otlp **out)
{
    *out = NULL;
    if (strcmp(o->traces_exporter, "otlp") != 0 && strcmp(o->traces_exporter, "none") != 0) {
        fprintf(stderr, "OTEL_TRACES_EXPORTER: '%s' is not otlp or none\n", o->traces_exporter);
        return -1;
    }
    if (check_opts(o) != 0)
        return -1;
    if (o->disabled || strcmp(o->traces_exporter, "none") == 0 ||
        (o->endpoint[0] == '\0' && o->traces_endpoint[0] == '\0'))
        return 0;
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, curl_init_once);
    otlp *e = mem_calloc(1, sizeof *e);
    e->url = export_url(o);
    tls_files tls;
    if (e->url == NULL || make_resource(e, o, program) != 0 || make_headers(e, o) != 0 ||
        get_tls_files(o, &tls) != 0)
        goto fail;
    e->max_queue = (size_t)o->max_queue;
    e->max_batch = o->max_batch < o->max_queue ? (size_t)o->max_batch : (size_t)o->max_queue;
    e->delay_ms = o->schedule_delay_ms;
    e->export_timeout_ms = o->export_timeout_ms;
    e->request_timeout_ms =
        o->timeout_ms < o->export_timeout_ms ? o->timeout_ms : o->export_timeout_ms;
    e->answer = mem_alloc(ANSWER_MAX);
    setup_curl(e, &tls);
    if (e->curl == NULL) {
        fprintf(stderr, "%s: libcurl cannot be set up for the trace exporter\n", program);
        goto fail;
    }
    metrics_register(m, METRICS_SECTION(otlp_metrics, &e->mx));
    for (int i = 0; i < DROP_REASONS; i++)
        e->dropped[i] = metrics_counter_of(e->mx.dropped, (const char *[]){drop_names[i]});
    pthread_mutex_init(&e->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&e->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (pthread_create(&e->thread, NULL, export_main, e) != 0) {
        fprintf(stderr, "%s: cannot start the trace export thread: %s\n", program, strerror(errno));
        pthread_cond_destroy(&e->cv);
        pthread_mutex_destroy(&e->mu);
        goto fail;
    }
    log_info("exporting spans to %s (OTLP/HTTP JSON; queue %zu, batch %zu, every %lld ms)", e->url,
             e->max_queue, e->max_batch, (long long)e->delay_ms);
    *out = e;
    return 0;
fail:
    free_exporter(e);
    return -1;
}

void otlp_destroy(otlp **ep)
{
    otlp *e = *ep;
    if (e == NULL)
        return;
    *ep = NULL;
    pthread_mutex_lock(&e->mu);
    e->stopping = 1;
    atomic_store(&e->stop_deadline_ms, (long long)(monotonic_ms() + e->export_timeout_ms));
    pthread_mutex_unlock(&e->mu);
    pthread_cond_signal(&e->cv);
    pthread_join(e->thread, NULL);
    pthread_cond_destroy(&e->cv);
    pthread_mutex_destroy(&e->mu);
    free_exporter(e);
}
