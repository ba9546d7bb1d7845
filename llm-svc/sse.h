/* sse — an incremental Server-Sent-Events parser (the WHATWG event-stream
 * format, as OpenAI-compatible servers stream chat completions).
 *
 * Bytes are fed as they arrive, split anywhere: a line ending (LF, CRLF or
 * CR) may be cut between two feeds, even between the CR and the LF. Comment
 * lines (":...") are skipped, "data:" lines of one event are joined with
 * "\n", an empty line dispatches the event. Line and event sizes have hard
 * caps: a stream that exceeds one is broken, not buffered without end. */
#ifndef CONVO_SSE_H
#define CONVO_SSE_H

#include <stddef.h>

#define SSE_ETOOBIG (-1) /* a line or an event is over its cap */
#define SSE_ESTOP   (-2) /* the event callback asked to stop */
#define SSE_EDONE   (-3) /* fed after the parser stopped or failed */

typedef struct sse_parser sse_parser;

/* One dispatched event. `event` is the "event:" field ("" when none) and
 * `data` the joined data lines, NUL-terminated, `len` bytes; both are valid
 * during the callback only. Return 0 to go on, non-zero to stop the parser
 * (sse_feed then returns SSE_ESTOP). */
typedef int (*sse_event_fn)(void *arg, const char *event, const char *data, size_t len);

/* A parser whose lines may hold at most `max_line` bytes and whose events'
 * data at most `max_event` bytes (both > 0). */
sse_parser *sse_parser_create(size_t max_line, size_t max_event, sse_event_fn fn, void *arg);
/* Frees the parser and clears *p; NULL is fine. */
void sse_parser_destroy(sse_parser **p);

/* Parses `len` more bytes, calling the callback for every complete event.
 * Returns 0, SSE_ETOOBIG, SSE_ESTOP or SSE_EDONE; after an error every later
 * feed returns SSE_EDONE. */
int sse_feed(sse_parser *p, const char *buf, size_t len);
/* Whether the stream ended on an event boundary (no partial line or event
 * waits); a stream that ends otherwise was cut short. */
int sse_idle(const sse_parser *p);
/* Whether `data` is the OpenAI end-of-stream sentinel "[DONE]". */
int sse_is_done(const char *data, size_t len);

#endif
