#include "sse.h"

#include "mem.h"

#include <string.h>

struct sse_parser {
    sse_event_fn fn;
    void *arg;
    size_t max_line, max_event;
    /* The line being read; grown on demand up to max_line. */
    char *line;
    size_t line_len, line_cap;
    /* The event's joined data lines (with a trailing "\n" each, dropped at
     * dispatch) and type; data grows up to max_event + 1. */
    char *data;
    size_t data_len, data_cap;
    int has_data;
    char event[64];
    /* The last byte fed was a CR: an LF first in the next feed belongs to
     * the same line ending, however the stream was split. */
    int after_cr;
    int failed;
};

sse_parser *sse_parser_create(size_t max_line, size_t max_event, sse_event_fn fn, void *arg)
{
    sse_parser *p = mem_calloc(1, sizeof *p);
    p->fn = fn;
    p->arg = arg;
    p->max_line = max_line ? max_line : 1;
    p->max_event = max_event ? max_event : 1;
    return p;
}

void sse_parser_destroy(sse_parser **pp)
{
    if (pp == NULL || *pp == NULL)
        return;
    mem_free((*pp)->line);
    mem_free((*pp)->data);
    mem_free(*pp);
    *pp = NULL;
}

/* Makes room for `need` bytes (plus a NUL) in a buffer capped at `cap`. */
static int reserve(char **buf, size_t *bcap, size_t need, size_t cap)
{
    if (need > cap)
        return SSE_ETOOBIG;
    if (need + 1 <= *bcap)
        return 0;
    size_t n = *bcap ? *bcap : 256;
    while (n < need + 1)
        n *= 2;
    if (n > cap + 1)
        n = cap + 1;
    *buf = mem_realloc(*buf, n);
    *bcap = n;
    return 0;
}

static int dispatch(sse_parser *p)
{
    int rc = 0;
    if (p->has_data) {
        size_t len = p->data_len;
        if (len > 0 && p->data[len - 1] == '\n')
            len--; /* the spec drops the last line feed of the joined data */
        p->data[len] = '\0';
        if (p->fn(p->arg, p->event, p->data, len) != 0)
            rc = SSE_ESTOP;
    }
    p->data_len = 0;
    p->has_data = 0;
    p->event[0] = '\0';
    return rc;
}

/* One complete line (without its ending) in p->line. */
static int process_line(sse_parser *p)
{
    const char *l = p->line;
    size_t n = p->line_len;
    if (n == 0)
        return dispatch(p);
    if (l[0] == ':')
        return 0; /* a comment: servers send them as keep-alives */
    const char *colon = memchr(l, ':', n);
    size_t name_len = colon ? (size_t)(colon - l) : n;
    const char *value = colon ? colon + 1 : l + n;
    size_t value_len = n - (size_t)(value - l);
    if (value_len > 0 && value[0] == ' ') {
        value++;
        value_len--;
    }
    if (name_len == 4 && memcmp(l, "data", 4) == 0) {
        int rc = reserve(&p->data, &p->data_cap, p->data_len + value_len + 1, p->max_event + 1);
        if (rc != 0)
            return rc;
        memcpy(p->data + p->data_len, value, value_len);
        p->data_len += value_len;
        p->data[p->data_len++] = '\n';
        p->has_data = 1;
    } else if (name_len == 5 && memcmp(l, "event", 5) == 0) {
        if (value_len >= sizeof p->event)
            return SSE_ETOOBIG;
        memcpy(p->event, value, value_len);
        p->event[value_len] = '\0';
    }
    /* "id", "retry" and unknown fields mean nothing to a chat stream. */
    return 0;
}

int sse_feed(sse_parser *p, const char *buf, size_t len)
{
    if (p->failed)
        return SSE_EDONE;
    int rc = 0;
    size_t i = 0;
    while (i < len) {
        if (p->after_cr) {
            p->after_cr = 0;
            if (buf[i] == '\n') {
                i++;
                continue;
            }
        }
        /* Copy up to the next line ending in one go. */
        size_t j = i;
        while (j < len && buf[j] != '\n' && buf[j] != '\r')
            j++;
        if (j > i) {
            rc = reserve(&p->line, &p->line_cap, p->line_len + (j - i), p->max_line);
            if (rc != 0)
                goto out;
            memcpy(p->line + p->line_len, buf + i, j - i);
            p->line_len += j - i;
        }
        if (j == len)
            break;
        if (buf[j] == '\r')
            p->after_cr = 1;
        i = j + 1;
        if (p->line == NULL) {
            rc = reserve(&p->line, &p->line_cap, 0, p->max_line);
            if (rc != 0)
                goto out;
        }
        p->line[p->line_len] = '\0';
        rc = process_line(p);
        p->line_len = 0;
        if (rc != 0)
            goto out;
    }
out:
    if (rc != 0)
        p->failed = 1;
    return rc;
}

int sse_idle(const sse_parser *p)
{
    return p->line_len == 0 && !p->has_data && p->event[0] == '\0';
}

int sse_is_done(const char *data, size_t len)
{
    return len == 6 && memcmp(data, "[DONE]", 6) == 0;
}
