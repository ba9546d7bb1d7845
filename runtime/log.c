#include "log.h"

#include <json-c/json.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <sys/uio.h>
#include <unistd.h>

static const char *service_name = "convo";
static log_level min_level = LOG_INFO;
static _Thread_local const char *ctx_request_id;
static _Thread_local const char *ctx_session_id;
static _Thread_local const char *ctx_trace_id;
static _Thread_local const char *ctx_span_id;

static const char *const level_names[] = {"debug", "info", "warn", "error"};

void log_init(const char *service, log_level level)
{
    service_name = service;
    min_level = level;
}

int log_level_parse(const char *name)
{
    for (int i = 0; i < 4; i++)
        if (strcmp(name, level_names[i]) == 0)
            return i;
    return -1;
}

int log_setup(const char *service, const char *level_name)
{
    int level = log_level_parse(level_name);
    if (level < 0) {
        fprintf(stderr, "%s: --log-level: '%s' is not debug, info, warn or error\n", service,
                level_name);
        return -1;
    }
    log_init(service, (log_level)level);
    return 0;
}

void log_context_set(const char *request_id, const char *session_id)
{
    ctx_request_id = request_id;
    ctx_session_id = session_id;
}

void log_trace_set(const char *trace_id, const char *span_id)
{
    ctx_trace_id = trace_id;
    ctx_span_id = span_id;
}

static void add_string(json_object *o, const char *key, const char *value)
{
    if (value != NULL && value[0] != '\0')
        json_object_object_add(o, key, json_object_new_string(value));
}

void log_fields(log_level level, const log_field *fields, const char *fmt, ...)
{
    if (level < min_level)
        return;

    char message[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);

    struct timeval tv;
    gettimeofday(&tv, NULL);
    struct tm tm;
    gmtime_r(&tv.tv_sec, &tm);
    char stamp[40];
    size_t n = strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(stamp + n, sizeof stamp - n, ".%03ldZ", (long)(tv.tv_usec / 1000));

    json_object *o = json_object_new_object();
    add_string(o, "time", stamp);
    add_string(o, "level", level_names[level]);
    add_string(o, "service", service_name);
    add_string(o, "message", message);
    add_string(o, "request_id", ctx_request_id);
    add_string(o, "session_id", ctx_session_id);
    add_string(o, "trace_id", ctx_trace_id);
    add_string(o, "span_id", ctx_span_id);
    for (const log_field *f = fields; f != NULL && f->key != NULL; f++)
        add_string(o, f->key, f->value);

    size_t len;
    const char *text = json_object_to_json_string_length(
        o, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE, &len);
    /* One writev per line: atomic on pipes up to PIPE_BUF, so lines of
     * concurrent threads never interleave. */
    struct iovec iov[2] = {{(void *)text, len}, {"\n", 1}};
    ssize_t unused = writev(STDERR_FILENO, iov, 2);
    (void)unused;
    json_object_put(o);
}
