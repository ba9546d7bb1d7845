/* trace — W3C Trace Context (traceparent, tracestate) and the spans of
 * this process, recorded for the exporter (otlp.h) when there is one.
 *
 * A span always has ids, made when it starts (random, a few nanoseconds):
 * they travel to the next process (gRPC metadata, HTTP headers) and onto
 * every log line written while the span is current. Only with an exporter,
 * and when the trace is sampled, is anything else kept: a record with the
 * span's name, times, attributes, events, links and status, handed to the
 * exporter when the span ends. Without one a span is its ids alone: no
 * allocation (unless a tracestate is carried), no clock read.
 *
 * Sampling follows the parent: a span whose parent says "not sampled"
 * (flags 00) records nothing, and its children neither; a new trace is
 * sampled.
 *
 * A trace_span lives by value in the state of the work it measures and is
 * used by one thread at a time (its owner's lock, or its owner's thread).
 * Every function takes a zeroed span (never started) and then does
 * nothing. */
#ifndef CONVO_TRACE_H
#define CONVO_TRACE_H

#include "otlp.h"

#include <stdint.h>

/* "00-" trace id "-" span id "-" flags. */
#define TRACE_PARENT_LEN   55
#define TRACE_ID_LEN       32
#define TRACE_SPAN_ID_LEN  16
#define TRACE_FLAG_SAMPLED 0x01
/* The longest tracestate carried on (W3C: at least 512 bytes should be),
 * and the most list members it may have; a longer one is dropped whole. */
#define TRACE_STATE_MAX     512
#define TRACE_STATE_MEMBERS 32

#define TRACE_EINVAL (-1)

typedef enum trace_kind {
    TRACE_INTERNAL = OTLP_KIND_INTERNAL,
    TRACE_SERVER = OTLP_KIND_SERVER,
    TRACE_CLIENT = OTLP_KIND_CLIENT,
    TRACE_PRODUCER = OTLP_KIND_PRODUCER,
    TRACE_CONSUMER = OTLP_KIND_CONSUMER,
} trace_kind;

/* What traceparent carries: lowercase hex ids, never all zeros. An empty
 * trace_id means no context. */
typedef struct trace_ctx {
    char trace_id[TRACE_ID_LEN + 1];
    char span_id[TRACE_SPAN_ID_LEN + 1];
    unsigned char flags;
} trace_ctx;

typedef struct trace_span {
    trace_ctx ctx;
    char *state;    /* the tracestate carried on to children; NULL: none */
    otlp *exp;      /* where the record goes; NULL: nowhere */
    otlp_span *rec; /* NULL: not recorded */
} trace_span;

/* Parses a traceparent strictly: version 00, exactly 55 characters,
 * lowercase hex, trace and span ids not all zeros. Returns 0 (*out
 * filled) or TRACE_EINVAL (*out emptied). NULL is invalid. */
int trace_parse(const char *traceparent, trace_ctx *out);
/* Whether a tracestate may be carried on: at most TRACE_STATE_MAX bytes
 * of visible ASCII and spaces, at most TRACE_STATE_MEMBERS members. */
int trace_state_ok(const char *tracestate);
/* The traceparent of c into out (TRACE_PARENT_LEN + 1 bytes). */
void trace_format(const trace_ctx *c, char *out);
/* Whether c holds a context. */
int trace_ctx_valid(const trace_ctx *c);

/* Starts a span: a child of `parent` (a remote or local context; NULL or
 * empty: the first span of a new trace, and `state` is ignored), carrying
 * `state` (NULL: none; one that fails trace_state_ok is dropped), recorded
 * into `exp` when exp is not NULL and the trace is sampled. `name` is
 * copied. */
void trace_span_start(trace_span *sp, otlp *exp, const char *name, trace_kind kind,
                      const trace_ctx *parent, const char *state);
/* trace_span_start with the parent as received in headers or metadata: a
 * traceparent that does not parse starts a new trace (and its tracestate
 * is ignored, as W3C asks). Either may be NULL. */
void trace_span_start_remote(trace_span *sp, otlp *exp, const char *name, trace_kind kind,
                             const char *traceparent, const char *tracestate);
/* A child of the local span `parent` (started, maybe ended: its ids stay),
 * recorded into the same exporter when the parent is sampled. */
void trace_span_child(trace_span *sp, const trace_span *parent, const char *name, trace_kind kind);
/* Ends the span: its record goes to the exporter. Its ids stay readable
 * (a log line, a link); ending it again does nothing. */
void trace_span_end(trace_span *sp);
/* Whether the span keeps a record (callers skip building attributes). */
int trace_span_recording(const trace_span *sp);

/* Attributes (key: a string literal; value copied), events (name: a
 * literal; timed now), links and the error status, on a recording span. */
void trace_span_set_str(trace_span *sp, const char *key, const char *value);
void trace_span_set_int(trace_span *sp, const char *key, int64_t value);
void trace_span_set_bool(trace_span *sp, const char *key, int value);
void trace_span_event(trace_span *sp, const char *name);
void trace_span_link(trace_span *sp, const trace_ctx *c);
void trace_span_error(trace_span *sp, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The span current on this thread (NULL: none): log lines carry its ids,
 * and gRPC calls started without a parent are its children. Sets it and
 * returns the one it replaces, to be put back; sp must outlive its being
 * current. */
const trace_span *trace_set_current(const trace_span *sp);
const trace_span *trace_current(void);

#endif
