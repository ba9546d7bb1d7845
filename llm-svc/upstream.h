/* upstream — every HTTP request to the model endpoint, driven by ONE thread
 * running a libcurl multi loop (curl's socket interface on epoll, woken by
 * an eventfd). No thread per stream: thousands of streams share it, and a
 * wake-up costs what is ready, not a pass over every stream.
 *
 * Requests are handed to the loop through a bounded intake (at most
 * max_requests in flight; beyond it upstream_start refuses). The loop also
 * owns the retry policy, because only it knows whether a byte reached the
 * consumer: 429 and 5xx answers and failed connects are retried with
 * exponential backoff and full jitter (backoff.h), honouring retry-after-ms / Retry-After,
 * at most max_attempts times, and only while nothing was delivered; once a
 * body byte went to the consumer a failure is final.
 *
 * Commands from other threads (start, cancel, resume) do not go through
 * runtime wq: they are bits set on the request itself, so a cancel that
 * follows a start before the loop woke is one entry, not two jobs, and a
 * request already ended is skipped without a job to free; the list is
 * taken whole by the loop, woken by an eventfd, and is bounded by
 * max_requests rather than by a queue length.
 *
 * Callbacks run on the loop thread and must not block. */
#ifndef CONVO_UPSTREAM_H
#define CONVO_UPSTREAM_H

#include "conf.h"
#include "metrics.h"
#include "trace.h"

#include <stddef.h>
#include <stdint.h>

#define UPSTREAM_OPTS(X, S)                                                                        \
    X(S, connect_timeout_ms, INT, "connect-timeout-ms", "UPSTREAM_CONNECT_TIMEOUT_MS", "5000",     \
      "upstream TCP+TLS connect timeout")                                                          \
    X(S, first_byte_timeout_ms, INT, "first-byte-timeout-ms", "UPSTREAM_FIRST_BYTE_TIMEOUT_MS",    \
      "60000", "how long the upstream may take to start answering")                                \
    X(S, idle_timeout_ms, INT, "idle-timeout-ms", "UPSTREAM_IDLE_TIMEOUT_MS", "30000",             \
      "longest silence inside a streamed answer")                                                  \
    X(S, max_attempts, INT_IN(1, CONF_NO_MAX), "max-attempts", "UPSTREAM_MAX_ATTEMPTS", "3",       \
      "tries of one request (429, 5xx, connect failures) before giving up")                        \
    X(S, backoff_base_ms, INT, "backoff-base-ms", "UPSTREAM_BACKOFF_BASE_MS", "250",               \
      "longest wait before the first retry; doubled each attempt, the wait drawn at random "       \
      "below it (full jitter)")                                                                    \
    X(S, backoff_max_ms, INT, "backoff-max-ms", "UPSTREAM_BACKOFF_MAX_MS", "8000",                 \
      "cap on one retry delay; a longer Retry-After is not waited for")                            \
    X(S, max_requests, INT, "max-upstream-requests", "UPSTREAM_MAX_REQUESTS", "4096",              \
      "upstream requests in flight at once; more are refused")                                     \
    X(S, max_error_body, INT, "max-error-body", "UPSTREAM_MAX_ERROR_BODY", "16384",                \
      "bytes of an error answer kept for the message")
CONF_DECLARE(upstream_opts, UPSTREAM_OPTS)

#define UPSTREAM_EBUSY     (-1) /* max_requests in flight */
#define UPSTREAM_ESHUTDOWN (-2)

/* How a request ended. */
typedef enum upstream_result {
    UPSTREAM_OK,        /* 2xx and the body ended normally */
    UPSTREAM_HTTP,      /* a non-2xx status (in `status`), retries spent */
    UPSTREAM_CONNECT,   /* could not connect / resolve / TLS */
    UPSTREAM_TIMEOUT,   /* connect, first-byte or idle timeout */
    UPSTREAM_DROPPED,   /* the connection broke mid-answer */
    UPSTREAM_STOPPED,   /* the consumer's on_data asked to stop */
    UPSTREAM_CANCELLED, /* upstream_cancel */
} upstream_result;

typedef struct upstream upstream;
typedef struct upstream_req upstream_req;

typedef struct upstream_done_info {
    upstream_result result;
    long status;         /* the HTTP status, 0 when none */
    const char *message; /* a reason (the error body for HTTP errors), valid during the call */
    int attempts;
    int delivered; /* whether any body byte reached on_data */
} upstream_done_info;

typedef struct upstream_cbs {
    /* 2xx body bytes as they arrive. Return 0 to go on, 1 to go on but
     * pause reading after this piece (upstream_resume restarts it), -1 to
     * stop (on_done then says UPSTREAM_STOPPED). */
    int (*on_data)(void *arg, const char *buf, size_t len);
    /* Exactly once, last, unless upstream_start failed. The request handle
     * is invalid once it returns. */
    void (*on_done)(void *arg, const upstream_done_info *info);
} upstream_cbs;

typedef struct upstream_spec {
    const char *url;        /* copied */
    const char *api_key;    /* copied; "" sends no Authorization */
    const char *body;       /* copied */
    const char *request_id; /* sent as X-Request-Id; may be NULL */
    /* The request's client span is its child (read while upstream_start
     * runs; NULL: a new trace): sent as the traceparent (and tracestate)
     * header, with a first_byte event per attempt and a retry event per
     * retry, ended with the request. */
    const trace_span *trace_parent;
    const char *name;    /* the endpoint's name, and */
    const char *model;   /* the model asked for, on the span; may be NULL */
    int stream;          /* asks for text/event-stream */
    int64_t deadline_ms; /* rpc_now_ms() clock; 0: none. No retry waits past it. */
} upstream_spec;

/* Starts the loop thread, with `o` as conf_parse left it (in its ranges).
 * NULL when curl cannot be set up. Counts its requests in m (NULL: nothing
 * counted; else it must outlive the loop). */
upstream *upstream_create(const upstream_opts *o, metrics *m);
/* Cancels whatever is in flight (their on_done fire), stops the thread,
 * frees everything; clears *u. */
void upstream_destroy(upstream **u);

/* Queues a request. Thread-safe. Returns 0 (and *out, valid until on_done
 * returns), UPSTREAM_EBUSY or UPSTREAM_ESHUTDOWN (no callback then). */
int upstream_start(upstream *u, const upstream_spec *spec, const upstream_cbs *cbs, void *arg,
                   upstream_req **out);
/* Aborts a request: the loop removes its transfer at once, which closes its
 * connection, then on_done fires with UPSTREAM_CANCELLED (unless it had
 * already ended). Thread-safe; call only before on_done returned. */
void upstream_cancel(upstream_req *r);
/* Resumes a request paused by on_data returning 1. Thread-safe; same
 * validity rule. */
void upstream_resume(upstream_req *r);

#endif
