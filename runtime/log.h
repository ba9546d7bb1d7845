/* log — JSON-lines logging on stderr, one object per line:
 *   {"time":"2026-11-25T09:00:00.123Z","level":"info","service":"router-svc",
 *    "message":"...","request_id":"...","session_id":"...",
 *    "trace_id":"...","span_id":"..."}
 * Thread-safe; each line is written with one write(2) so lines never mix. */
#ifndef CONVO_LOG_H
#define CONVO_LOG_H

typedef enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR } log_level;

/* An extra string field of one line; arrays of them end with {NULL, NULL}. */
typedef struct log_field {
    const char *key;
    const char *value;
} log_field;

/* Sets the service name and the lowest level written. Call once at start. */
void log_init(const char *service, log_level min_level);
/* Parses "debug", "info", "warn" or "error"; -1 for anything else. */
int log_level_parse(const char *name);
/* log_init from a --log-level value: returns 0, or -1 after telling stderr
 * what is wrong (the program then exits 2). */
int log_setup(const char *service, const char *level_name);

/* Request and session id added to every line this thread writes until
 * cleared with NULLs. The strings must outlive the setting (the gRPC runtime
 * sets it around each handler callback). */
void log_context_set(const char *request_id, const char *session_id);
/* The trace and span id (hex) added to every line this thread writes until
 * cleared with NULLs; the same lifetime rule. trace.h's trace_set_current
 * sets them: use that. */
void log_trace_set(const char *trace_id, const char *span_id);

void log_fields(log_level level, const log_field *fields, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define log_debug(...) log_fields(LOG_DEBUG, NULL, __VA_ARGS__)
#define log_info(...)  log_fields(LOG_INFO, NULL, __VA_ARGS__)
#define log_warn(...)  log_fields(LOG_WARN, NULL, __VA_ARGS__)
#define log_error(...) log_fields(LOG_ERROR, NULL, __VA_ARGS__)

#endif
