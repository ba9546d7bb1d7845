/* otlp — the span exporter: finished spans are batched on a thread of its
 * own and sent to an OpenTelemetry collector over OTLP/HTTP with the JSON
 * encoding (POST <endpoint>/v1/traces, libcurl; https checked against the
 * system's CAs or OTEL_EXPORTER_OTLP_CERTIFICATE, with a client certificate
 * for a collector that wants mutual TLS).
 *
 * Configured by the standard OpenTelemetry environment variables (each also
 * a flag). Nothing is exported unless OTEL_EXPORTER_OTLP_ENDPOINT or
 * OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set; then the exporter exists and
 * spans are recorded (trace.h). The queue is bounded
 * (OTEL_BSP_MAX_QUEUE_SIZE): a span that finds it full is dropped and
 * counted. A batch whose export failed for a transient reason (the
 * collector unreachable or too slow, 429, 502, 503, 504) is sent again
 * after a backoff with jitter (Retry-After honoured) while the batch's time
 * (OTEL_BSP_EXPORT_TIMEOUT) lasts; then, or on any other error, its spans
 * are dropped and counted. Meanwhile the queue keeps filling and drops at
 * its bound. otlp_push takes a mutex for a few instructions and never waits
 * for the network.
 *
 * Metrics (registered into the process's registry): spans exported,
 * spans dropped by reason (queue_full, export_failed, rejected, shutdown),
 * failed exports, export retries, spans queued. */
#ifndef CONVO_OTLP_H
#define CONVO_OTLP_H

#include "conf.h"
#include "metrics.h"

#include <stddef.h>
#include <stdint.h>

#define OTLP_OPTS(X, S)                                                                            \
    X(S, endpoint, STR, "otel-exporter-otlp-endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT", "",          \
      "OpenTelemetry collector base URL (http:// or https://); spans go to <url>/v1/traces as "    \
      "OTLP/HTTP JSON. Empty (and no traces endpoint): spans are not exported")                    \
    X(S, traces_endpoint, STR, "otel-exporter-otlp-traces-endpoint",                               \
      "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "",                                                    \
      "the full URL spans are posted to; overrides --otel-exporter-otlp-endpoint")                 \
    X(S, headers, SECRET, "otel-exporter-otlp-headers", "OTEL_EXPORTER_OTLP_HEADERS", "",          \
      "headers sent with every export: key=value pairs separated by commas, values "               \
      "percent-encoded (an API key of a hosted collector)")                                        \
    X(S, traces_headers, SECRET, "otel-exporter-otlp-traces-headers",                              \
      "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "",                                                     \
      "as --otel-exporter-otlp-headers, for spans only; a key given in both is taken from here")   \
    X(S, protocol, STR, "otel-exporter-otlp-protocol", "OTEL_EXPORTER_OTLP_PROTOCOL", "",          \
      "only http/json is spoken; anything else is refused at start-up")                            \
    X(S, traces_protocol, STR, "otel-exporter-otlp-traces-protocol",                               \
      "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "", "as --otel-exporter-otlp-protocol")                \
    X(S, timeout_ms, INT_IN(1, CONF_NO_MAX), "otel-exporter-otlp-timeout",                         \
      "OTEL_EXPORTER_OTLP_TIMEOUT", "10000",                                                       \
      "milliseconds one export request may take (connect included)")                               \
    X(S, certificate, STR, "otel-exporter-otlp-certificate", "OTEL_EXPORTER_OTLP_CERTIFICATE", "", \
      "PEM file of the CA certificates the collector's https certificate is checked against; "     \
      "empty: the system's")                                                                       \
    X(S, traces_certificate, STR, "otel-exporter-otlp-traces-certificate",                         \
      "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "",                                                 \
      "as --otel-exporter-otlp-certificate, for spans only; wins over it")                         \
    X(S, client_certificate, STR, "otel-exporter-otlp-client-certificate",                         \
      "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "",                                                 \
      "PEM certificate this process shows a collector that wants mutual TLS (with "                \
      "--otel-exporter-otlp-client-key)")                                                          \
    X(S, traces_client_certificate, STR, "otel-exporter-otlp-traces-client-certificate",           \
      "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE", "",                                          \
      "as --otel-exporter-otlp-client-certificate, for spans only; wins over it")                  \
    X(S, client_key, STR, "otel-exporter-otlp-client-key", "OTEL_EXPORTER_OTLP_CLIENT_KEY", "",    \
      "PEM private key of the client certificate")                                                 \
    X(S, traces_client_key, STR, "otel-exporter-otlp-traces-client-key",                           \
      "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "",                                                  \
      "as --otel-exporter-otlp-client-key, for spans only; wins over it")                          \
    X(S, service_name, STR, "otel-service-name", "OTEL_SERVICE_NAME", "",                          \
      "service.name of the spans; empty: service.name of OTEL_RESOURCE_ATTRIBUTES, else the "      \
      "binary's name")                                                                             \
    X(S, resource_attributes, STR, "otel-resource-attributes", "OTEL_RESOURCE_ATTRIBUTES", "",     \
      "more resource attributes: key=value pairs separated by commas, values percent-encoded "     \
      "(deployment.environment=prod,k8s.pod.name=...)")                                            \
    X(S, traces_exporter, STR, "otel-traces-exporter", "OTEL_TRACES_EXPORTER", "otlp",             \
      "otlp, or none to export nothing")                                                           \
    X(S, disabled, BOOL, "otel-sdk-disabled", "OTEL_SDK_DISABLED", "false",                        \
      "true: no span is recorded or exported (trace ids are still propagated and logged)")         \
    X(S, max_queue, INT_IN(1, CONF_NO_MAX), "otel-bsp-max-queue-size", "OTEL_BSP_MAX_QUEUE_SIZE",  \
      "2048",                                                                                      \
      "finished spans waiting for export; a span that finds the queue full is dropped and "        \
      "counted")                                                                                   \
    X(S, schedule_delay_ms, INT_IN(1, CONF_NO_MAX), "otel-bsp-schedule-delay",                     \
      "OTEL_BSP_SCHEDULE_DELAY", "5000",                                                           \
      "milliseconds between exports (sooner once a batch is full)")                                \
    X(S, max_batch, INT_IN(1, CONF_NO_MAX), "otel-bsp-max-export-batch-size",                      \
      "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "512",                                                     \
      "spans per export request (at most the queue size)")                                         \
    X(S, export_timeout_ms, INT_IN(1, CONF_NO_MAX), "otel-bsp-export-timeout",                     \
      "OTEL_BSP_EXPORT_TIMEOUT", "30000",                                                          \
      "milliseconds one export may take, its retries included; also the most the last flush at "   \
      "shutdown waits")
CONF_DECLARE(otlp_opts, OTLP_OPTS)

typedef struct otlp otlp;

typedef enum otlp_kind {
    OTLP_KIND_INTERNAL = 1,
    OTLP_KIND_SERVER = 2,
    OTLP_KIND_CLIENT = 3,
    OTLP_KIND_PRODUCER = 4,
    OTLP_KIND_CONSUMER = 5,
} otlp_kind;

typedef enum otlp_status {
    OTLP_STATUS_UNSET = 0,
    OTLP_STATUS_OK = 1,
    OTLP_STATUS_ERROR = 2
} otlp_status;

typedef enum otlp_value { OTLP_STR, OTLP_INT, OTLP_BOOL } otlp_value;

/* Bounds of one span; past them attributes, events and links are dropped
 * and their dropped count exported. */
#define OTLP_MAX_ATTRS  32
#define OTLP_MAX_EVENTS 32
#define OTLP_MAX_LINKS  32

typedef struct otlp_attr {
    const char *key; /* a string literal */
    otlp_value type;
    char *str; /* OTLP_STR: owned */
    int64_t i; /* OTLP_INT, OTLP_BOOL */
} otlp_attr;

typedef struct otlp_event {
    const char *name; /* a string literal */
    uint64_t time_ns;
} otlp_event;

typedef struct otlp_link {
    char trace_id[33], span_id[17];
} otlp_link;

/* A finished span as the exporter takes it (trace.c builds them). Ids are
 * lowercase hex; times Unix nanoseconds. Everything is owned by the span
 * and freed with it. */
typedef struct otlp_span {
    struct otlp_span *next;                        /* the exporter's queue */
    char trace_id[33], span_id[17], parent_id[17]; /* parent_id "": a root */
    char *trace_state;                             /* NULL: none */
    char *name;
    otlp_kind kind;
    uint64_t start_ns, end_ns;
    otlp_attr attrs[OTLP_MAX_ATTRS];
    size_t nattrs;
    uint32_t dropped_attrs;
    otlp_event *events;
    size_t nevents;
    uint32_t dropped_events;
    otlp_link *links;
    size_t nlinks;
    uint32_t dropped_links;
    otlp_status status;
    char *status_message;
} otlp_span;

/* From the options: *out an exporter sending spans of `program` (the
 * default service.name), or NULL when nothing is to be exported (no
 * endpoint, OTEL_SDK_DISABLED, OTEL_TRACES_EXPORTER=none). Counts into m
 * (NULL: not counted). Returns 0, or -1 after printing what is wrong on
 * stderr (a bad URL, header, resource attribute or protocol; the numbers'
 * ranges are conf_parse's; a certificate or key file that cannot be
 * read, or a client certificate without its key): a usage error. Starts the export thread; call
 * after srv_block_signals. */
int otlp_setup(const otlp_opts *o, const char *program, metrics *m, otlp **out);
/* Exports what is queued (waiting at most the export timeout), stops the
 * thread and frees; clears *e. Nothing may push any more. */
void otlp_destroy(otlp **e);

/* Queues a finished span (ownership passes here, whatever happens): when
 * the queue is full it is freed and counted as dropped. Any thread; never
 * blocks on the network. */
void otlp_push(otlp *e, otlp_span *s);

/* The JSON body (an ExportTraceServiceRequest) of spans `s` (linked by
 * next), from mem; its length in *len. For the exporter and its tests. */
char *otlp_encode(const otlp *e, const otlp_span *s, size_t *len);

#endif
