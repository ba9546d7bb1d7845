/* offline-model — an OpenAI-compatible HTTP server that is NOT a language
 * model: a deterministic stand-in (see answer.h and README.md) so the
 * project runs and is tested without a real endpoint.
 *
 * One thread, one poll(2) loop, non-blocking sockets: thousands of streams
 * at once for the benchmark. Serves POST /v1/chat/completions (streamed as
 * SSE over chunked transfer encoding, or one JSON body), GET /v1/models,
 * and GET /stats (requests served, connections the client closed mid-
 * response and when the last one was noticed: the cancellation test reads
 * it). Faults are injected per request ("[[fault:KIND]]" in the last user
 * message, or an X-Fault header) or for every request (--fault). */
#include "answer.h"

#include "conf.h"
#include "log.h"
#include "mem.h"
#include "proc.h"
#include "trace.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define OFFLINE_OPTS(X, S)                                                                         \
    X(S, listen, STR, "listen", "OFFLINE_MODEL_LISTEN", "127.0.0.1:8089", "HOST:PORT to serve on") \
    X(S, token_delay_ms, INT, "token-delay-ms", "OFFLINE_MODEL_TOKEN_DELAY_MS", "20",              \
      "pause between streamed tokens; 0 streams flat out")                                         \
    X(S, fault, STR, "fault", "OFFLINE_MODEL_FAULT", "",                                           \
      "inject into every request: 429, 500, 401, 404, slow, drop or malformed")                    \
    X(S, slow_ms, INT, "slow-ms", "OFFLINE_MODEL_SLOW_MS", "3000",                                 \
      "how late the first byte comes with the slow fault")                                         \
    X(S, retry_after_ms, INT, "retry-after-ms", "OFFLINE_MODEL_RETRY_AFTER_MS", "200",             \
      "what a 429 asks for (retry-after-ms; Retry-After rounds it up to seconds)")                 \
    X(S, api_key, STR, "api-key", "OFFLINE_MODEL_API_KEY", "",                                     \
      "the key chat requests must send as 'Authorization: Bearer KEY' (401 otherwise); \"\": "     \
      "any or none")                                                                               \
    X(S, model, STR, "model", "OFFLINE_MODEL_NAME", "offline-model",                               \
      "the model name reported when a request names none")                                         \
    X(S, max_conns, INT, "max-conns", "OFFLINE_MODEL_MAX_CONNS", "8192",                           \
      "connections served at once; more are closed at accept")                                     \
    X(S, log_level, STR, "log-level", "LOG_LEVEL", "info", "debug, info, warn or error")
CONF_DECLARE(offline_opts, OFFLINE_OPTS)

#define MAX_REQUEST (1 << 20)  /* headers + body of one request */
#define MAX_OUTPUT  (16 << 20) /* queued, unwritten bytes of one connection */
/* Pieces wait while this much is unwritten: a reader that stops reading
 * stalls the answer through TCP, as a real server's, instead of the whole
 * answer piling up here. */
#define OUT_HIGH   (64 << 10)
#define MAX_PIECES 200000 /* scheduled writes of one response */
/* An Authorization header's value kept for the --api-key check; a longer
 * one is cut and so refused. */
#define AUTH_MAX   512
#define AUTH_FIELD "511"

static offline_opts opts;
static volatile sig_atomic_t stopping;

static struct {
    long long requests, chat_requests, aborted, completed;
    long long last_abort_unix_ms;
} stats;

/* The traceparent headers of the last chat requests, as received (oldest
 * first in /stats): tests read what a caller propagated. */
#define TRACE_KEPT        64
#define TRACE_HDR         128 /* a longer header is kept cut */
#define TRACE_HDR_FIELD   "127"
#define TRACE_STATE_FIELD "512"
static struct {
    char tp[TRACE_KEPT][TRACE_HDR];
    char ts[TRACE_KEPT][TRACE_STATE_MAX + 1];
    size_t next, count;
} traces;

/* One scheduled write of a response: bytes due at a time. A piece with
 * drop set closes the connection abruptly instead. */
typedef struct piece {
    char *bytes;
    size_t len;
    int delay_ms; /* after the previous piece */
    int drop;
} piece;

typedef struct conn {
    int fd;
    char *in;
    size_t in_len, in_cap;
    char *out;
    size_t out_len, out_off, out_cap;
    piece *pieces;
    size_t npieces, next_piece, pieces_cap;
    long long due_ms;
    int responding;  /* a response is under way: closing now is an abort */
    int close_after; /* Connection: close */
} conn;

static conn **conns;
static size_t nconns;

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static long long unix_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void on_signal(int sig)
{
    stopping = 1;
}

/* Counts requests per fault key for [[fault:KIND*N]]: the first N alike
 * requests fail, later ones pass (a retry test needs that). A small table:
 * entries are only ever test phrases. */
#define FAULT_SLOTS 256
static struct {
    unsigned long hash;
    int seen;
} fault_seen[FAULT_SLOTS];

static int fault_count(const char *key)
{
    unsigned long h = 5381;
    for (const char *p = key; *p; p++)
        h = h * 33 + (unsigned char)*p;
    size_t i = h % FAULT_SLOTS;
    if (fault_seen[i].hash != h) {
        fault_seen[i].hash = h;
        fault_seen[i].seen = 0;
    }
    return ++fault_seen[i].seen;
}

static void add_piece(conn *c, char *bytes, size_t len, int delay_ms, int drop)
{
    if (c->npieces == MAX_PIECES) {
        mem_free(bytes);
        return;
    }
    if (c->npieces == c->pieces_cap) {
        c->pieces_cap = c->pieces_cap ? c->pieces_cap * 2 : 16;
        c->pieces = mem_realloc(c->pieces, c->pieces_cap * sizeof *c->pieces);
    }
    c->pieces[c->npieces++] = (piece){bytes, len, delay_ms, drop};
}

/* One HTTP/1.1 chunk of the chunked transfer encoding holding `s`. */
static void add_chunk(conn *c, const char *s, int delay_ms)
{
    size_t n = strlen(s);
    char *b = mem_asprintf("%zx\r\n%s\r\n", n, s);
    add_piece(c, b, strlen(b), delay_ms, 0);
}

static void add_sse(conn *c, json_object *chunk, int delay_ms)
{
    char *s =
        mem_asprintf("data: %s\n\n", json_object_to_json_string_ext(chunk, JSON_C_TO_STRING_PLAIN));
    add_chunk(c, s, delay_ms);
    mem_free(s);
    json_object_put(chunk);
}

static void respond_simple(conn *c, int status, const char *reason, const char *extra_headers,
                           const char *body, int delay_ms)
{
    char *r = mem_asprintf("HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                           "Content-Length: %zu\r\n%s%s\r\n%s",
                           status, reason, strlen(body), extra_headers ? extra_headers : "",
                           c->close_after ? "Connection: close\r\n" : "", body);
    add_piece(c, r, strlen(r), delay_ms, 0);
}

static void respond_error(conn *c, int status, const char *reason, const char *type,
                          const char *message, const char *extra_headers)
{
    json_object *e = json_object_new_object(), *inner = json_object_new_object();
    json_object_object_add(inner, "message", json_object_new_string(message));
    json_object_object_add(inner, "type", json_object_new_string(type));
    json_object_object_add(e, "error", inner);
    respond_simple(c, status, reason, extra_headers, json_object_to_json_string(e), 0);
    json_object_put(e);
}

static json_object *chunk_base(const char *model)
{
    json_object *o = json_object_new_object();
    json_object_object_add(o, "id", json_object_new_string("chatcmpl-offline"));
    json_object_object_add(o, "object", json_object_new_string("chat.completion.chunk"));
    json_object_object_add(o, "created", json_object_new_int64(time(NULL)));
    json_object_object_add(o, "model", json_object_new_string(model));
    return o;
}

/* {"choices":[{"index":0,"delta":DELTA,"finish_reason":FR}]} */
static json_object *delta_chunk(const char *model, json_object *delta, const char *finish)
{
    json_object *o = chunk_base(model), *choices = json_object_new_array(),
                *c = json_object_new_object();
    json_object_object_add(c, "index", json_object_new_int(0));
    json_object_object_add(c, "delta", delta);
    json_object_object_add(c, "finish_reason", finish ? json_object_new_string(finish) : NULL);
    json_object_array_add(choices, c);
    json_object_object_add(o, "choices", choices);
    return o;
}

static json_object *usage_obj(unsigned prompt, unsigned completion)
{
    json_object *u = json_object_new_object();
    json_object_object_add(u, "prompt_tokens", json_object_new_int64(prompt));
    json_object_object_add(u, "completion_tokens", json_object_new_int64(completion));
    json_object_object_add(u, "total_tokens", json_object_new_int64(prompt + completion));
    return u;
}

static json_object *tool_delta(size_t index, const char *id, const char *name, const char *args)
{
    json_object *d = json_object_new_object(), *arr = json_object_new_array(),
                *tc = json_object_new_object(), *fn = json_object_new_object();
    json_object_object_add(tc, "index", json_object_new_int((int)index));
    if (id != NULL) {
        json_object_object_add(tc, "id", json_object_new_string(id));
        json_object_object_add(tc, "type", json_object_new_string("function"));
        json_object_object_add(fn, "name", json_object_new_string(name));
    }
    json_object_object_add(fn, "arguments", json_object_new_string(args));
    json_object_object_add(tc, "function", fn);
    json_object_array_add(arr, tc);
    json_object_object_add(d, "tool_calls", arr);
    return d;
}

static void plan_stream(conn *c, const answer *a, const char *model, int include_usage, int delay,
                        int first_delay)
{
    char *h = mem_asprintf("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                           "Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n%s\r\n",
                           c->close_after ? "Connection: close\r\n" : "");
    add_piece(c, h, strlen(h), first_delay, 0);
    add_chunk(c, ": offline-model, a deterministic stand-in\n\n", 0);
    json_object *d = json_object_new_object();
    json_object_object_add(d, "role", json_object_new_string("assistant"));
    json_object_object_add(d, "content", json_object_new_string(""));
    add_sse(c, delta_chunk(model, d, NULL), 0);
    unsigned completion = 0;
    size_t sent = 0;
    if (a->ncalls > 0) {
        /* Each call's first delta has id and name; then the arguments in
         * pieces of a few bytes, the calls interleaved by index. */
        for (size_t i = 0; i < a->ncalls; i++)
            add_sse(c,
                    delta_chunk(model, tool_delta(i, a->calls[i].id, a->calls[i].name, ""), NULL),
                    delay);
        size_t off[ANSWER_MAX_CALLS] = {0};
        for (int more = 1; more;) {
            more = 0;
            for (size_t i = 0; i < a->ncalls; i++) {
                size_t len = strlen(a->calls[i].args);
                if (off[i] >= len)
                    continue;
                size_t n = len - off[i] < 5 ? len - off[i] : 5;
                char *frag = mem_strndup(a->calls[i].args + off[i], n);
                add_sse(c, delta_chunk(model, tool_delta(i, NULL, NULL, frag), NULL), delay);
                mem_free(frag);
                off[i] += n;
                completion++;
                more = 1;
            }
        }
    } else {
        size_t len = strlen(a->text), ntok = answer_tokens(a->text, NULL, (size_t)-1);
        size_t *starts = mem_alloc((ntok + 1) * sizeof *starts);
        answer_tokens(a->text, starts, ntok);
        starts[ntok] = len;
        for (size_t i = 0; i < ntok; i++) {
            if (a->fault == FAULT_DROP && sent == 3) {
                add_piece(c, NULL, 0, delay, 1);
                break;
            }
            if (a->fault == FAULT_MALFORMED && sent == 2) {
                add_chunk(c, "data: {\"choices\":[{\"delta\":{\"content\":\"oops\"}\n\n", delay);
            }
            char *tok = mem_strndup(a->text + starts[i], starts[i + 1] - starts[i]);
            json_object *td = json_object_new_object();
            json_object_object_add(td, "content", json_object_new_string(tok));
            add_sse(c, delta_chunk(model, td, NULL), delay);
            mem_free(tok);
            sent++;
        }
        completion = (unsigned)ntok;
        mem_free(starts);
    }
    if (a->fault == FAULT_DROP && a->ncalls > 0)
        add_piece(c, NULL, 0, delay, 1);
    add_sse(c, delta_chunk(model, json_object_new_object(), a->finish_reason), 0);
    if (include_usage) {
        json_object *u = chunk_base(model);
        json_object_object_add(u, "choices", json_object_new_array());
        json_object_object_add(u, "usage", usage_obj(a->prompt_tokens, completion));
        add_sse(c, u, 0);
    }
    add_chunk(c, "data: [DONE]\n\n", 0);
    char *end = mem_strdup("0\r\n\r\n");
    add_piece(c, end, 5, 0, 0);
}

static void plan_whole(conn *c, const answer *a, const char *model, int first_delay)
{
    json_object *o = json_object_new_object(), *choices = json_object_new_array(),
                *ch = json_object_new_object(), *msg = json_object_new_object();
    json_object_object_add(o, "id", json_object_new_string("chatcmpl-offline"));
    json_object_object_add(o, "object", json_object_new_string("chat.completion"));
    json_object_object_add(o, "created", json_object_new_int64(time(NULL)));
    json_object_object_add(o, "model", json_object_new_string(model));
    json_object_object_add(msg, "role", json_object_new_string("assistant"));
    unsigned completion = 0;
    if (a->ncalls > 0) {
        json_object *tcs = json_object_new_array();
        for (size_t i = 0; i < a->ncalls; i++) {
            json_object *tc = json_object_new_object(), *fn = json_object_new_object();
            json_object_object_add(tc, "id", json_object_new_string(a->calls[i].id));
            json_object_object_add(tc, "type", json_object_new_string("function"));
            json_object_object_add(fn, "name", json_object_new_string(a->calls[i].name));
            json_object_object_add(fn, "arguments", json_object_new_string(a->calls[i].args));
            json_object_object_add(tc, "function", fn);
            json_object_array_add(tcs, tc);
        }
        json_object_object_add(msg, "content", NULL);
        json_object_object_add(msg, "tool_calls", tcs);
    } else {
        json_object_object_add(msg, "content", json_object_new_string(a->text));
        completion = (unsigned)answer_tokens(a->text, NULL, (size_t)-1);
    }
    json_object_object_add(ch, "index", json_object_new_int(0));
    json_object_object_add(ch, "message", msg);
    json_object_object_add(ch, "finish_reason", json_object_new_string(a->finish_reason));
    json_object_array_add(choices, ch);
    json_object_object_add(o, "choices", choices);
    json_object_object_add(o, "usage", usage_obj(a->prompt_tokens, completion));
    const char *body = json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN);
    if (a->fault == FAULT_MALFORMED)
        body = "{\"choices\":[{\"message\":";
    respond_simple(c, 200, "OK", NULL, body, first_delay);
    json_object_put(o);
}

/* Whether the request's Authorization header carries --api-key. */
static int authorized(const char *auth)
{
    if (opts.api_key[0] == '\0')
        return 1;
    return auth != NULL && strncmp(auth, "Bearer ", 7) == 0 && strcmp(auth + 7, opts.api_key) == 0;
}

static void handle_chat(conn *c, const char *body, size_t len, const char *xfault, const char *auth)
{
    answer a = {0};
    char err[256];
    if (!authorized(auth)) {
        respond_error(c, 401, "Unauthorized", "invalid_api_key",
                      "offline-model: the API key is missing or wrong", NULL);
        return;
    }
    json_tokener *tok = json_tokener_new();
    json_object *req = json_tokener_parse_ex(tok, body, (int)len);
    json_tokener_free(tok);
    if (req == NULL) {
        respond_error(c, 400, "Bad Request", "invalid_request_error", "the body is not JSON", NULL);
        return;
    }
    if (answer_make(req, &a, err, sizeof err) != 0) {
        respond_error(c, 400, "Bad Request", "invalid_request_error", err, NULL);
        goto out;
    }
    json_object *v = NULL;
    const char *model = opts.model;
    if (json_object_object_get_ex(req, "model", &v) && json_object_is_type(v, json_type_string) &&
        json_object_get_string_len(v) > 0)
        model = json_object_get_string(v);
    int stream = json_object_object_get_ex(req, "stream", &v) && json_object_get_boolean(v);
    json_object *so = NULL;
    int include_usage = json_object_object_get_ex(req, "stream_options", &so) &&
                        json_object_object_get_ex(so, "include_usage", &v) &&
                        json_object_get_boolean(v);

    answer_fault f = a.fault;
    if (xfault != NULL)
        f = answer_fault_parse(xfault);
    if (f == FAULT_NONE && opts.fault[0] != '\0')
        f = answer_fault_parse(opts.fault);
    if (f != FAULT_NONE && a.fault_times > 0 && a.fault_key != NULL &&
        fault_count(a.fault_key) > a.fault_times)
        f = FAULT_NONE;
    a.fault = f;
    log_fields(LOG_DEBUG, NULL, "chat request: stream=%d tools=%zu fault=%d", stream, a.ncalls, f);
    switch (f) {
    case FAULT_429: {
        char hdr[128];
        snprintf(hdr, sizeof hdr, "Retry-After: %lld\r\nretry-after-ms: %lld\r\n",
                 (opts.retry_after_ms + 999) / 1000, opts.retry_after_ms);
        respond_error(c, 429, "Too Many Requests", "rate_limit_exceeded",
                      "offline-model: rate limited (injected fault)", hdr);
        goto out;
    }
    case FAULT_500:
        respond_error(c, 500, "Internal Server Error", "server_error",
                      "offline-model: internal error (injected fault)", NULL);
        goto out;
    case FAULT_401:
        respond_error(c, 401, "Unauthorized", "invalid_api_key",
                      "offline-model: bad API key (injected fault)", NULL);
        goto out;
    case FAULT_404:
        respond_error(c, 404, "Not Found", "model_not_found",
                      "offline-model: no such model (injected fault)", NULL);
        goto out;
    default:
        break;
    }
    int delay = a.delay_ms >= 0 ? a.delay_ms : (int)opts.token_delay_ms;
    int first = f == FAULT_SLOW ? (int)opts.slow_ms : 0;
    if (stream)
        plan_stream(c, &a, model, include_usage, delay, first);
    else
        plan_whole(c, &a, model, first);
out:
    answer_clear(&a);
    json_object_put(req);
}

/* The traceparent and tracestate headers kept, oldest first, as JSON. */
static json_object *traces_json(void)
{
    json_object *a = json_object_new_array();
    size_t n = traces.count < TRACE_KEPT ? traces.count : TRACE_KEPT;
    for (size_t i = 0; i < n; i++) {
        size_t k = (traces.next + TRACE_KEPT - n + i) % TRACE_KEPT;
        json_object *o = json_object_new_object();
        json_object_object_add(o, "traceparent", json_object_new_string(traces.tp[k]));
        json_object_object_add(o, "tracestate", json_object_new_string(traces.ts[k]));
        json_object_array_add(a, o);
    }
    return a;
}

static void handle_request(conn *c, const char *method, const char *path, const char *body,
                           size_t len, const char *xfault, const char *auth, const char *tp,
                           const char *ts)
{
    stats.requests++;
    c->responding = 1;
    if (strcmp(method, "POST") == 0 && strcmp(path, "/v1/chat/completions") == 0) {
        stats.chat_requests++;
        /* Its log lines carry the caller's trace, as a traced server's would. */
        trace_ctx tc;
        if (tp != NULL) {
            snprintf(traces.tp[traces.next], TRACE_HDR, "%s", tp);
            snprintf(traces.ts[traces.next], TRACE_STATE_MAX + 1, "%s", ts ? ts : "");
            traces.next = (traces.next + 1) % TRACE_KEPT;
            traces.count++;
        }
        if (trace_parse(tp, &tc) == 0)
            log_trace_set(tc.trace_id, tc.span_id);
        handle_chat(c, body, len, xfault, auth);
        log_trace_set(NULL, NULL);
    } else if (strcmp(method, "GET") == 0 && strcmp(path, "/v1/models") == 0) {
        char *b = mem_asprintf("{\"object\":\"list\",\"data\":[{\"id\":\"%s\",\"object\":\"model\","
                               "\"owned_by\":\"convo\"}]}",
                               opts.model);
        respond_simple(c, 200, "OK", NULL, b, 0);
        mem_free(b);
    } else if (strcmp(method, "GET") == 0 && strcmp(path, "/stats") == 0) {
        json_object *o = json_object_new_object();
        json_object_object_add(o, "requests", json_object_new_int64(stats.requests));
        json_object_object_add(o, "chat_requests", json_object_new_int64(stats.chat_requests));
        json_object_object_add(o, "completed", json_object_new_int64(stats.completed));
        json_object_object_add(o, "aborted", json_object_new_int64(stats.aborted));
        json_object_object_add(o, "last_abort_unix_ms",
                               json_object_new_int64(stats.last_abort_unix_ms));
        json_object_object_add(o, "connections", json_object_new_int64((int64_t)nconns));
        json_object_object_add(o, "traced_requests", json_object_new_int64((int64_t)traces.count));
        json_object_object_add(o, "traces", traces_json());
        respond_simple(c, 200, "OK", NULL,
                       json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN), 0);
        json_object_put(o);
    } else {
        respond_error(c, 404, "Not Found", "invalid_request_error", "no such path", NULL);
    }
    c->next_piece = 0;
    c->due_ms = now_ms() + (c->npieces ? c->pieces[0].delay_ms : 0);
}

/* Parses a complete request at the start of c->in, if there is one.
 * Returns 1 when one was handled, 0 when more bytes are needed, -1 to close. */
static int try_request(conn *c)
{
    char *end = memmem(c->in, c->in_len, "\r\n\r\n", 4);
    if (end == NULL)
        return c->in_len >= MAX_REQUEST ? -1 : 0;
    size_t head_len = (size_t)(end - c->in) + 4;
    *end = '\0';
    char method[16] = "", path[256] = "";
    if (sscanf(c->in, "%15s %255s", method, path) != 2)
        return -1;
    size_t clen = 0;
    char xfault[32] = "", auth[AUTH_MAX] = "", tp[TRACE_HDR] = "", ts[TRACE_STATE_MAX + 1] = "";
    c->close_after = 0;
    for (char *line = strstr(c->in, "\r\n"); line != NULL && line < end;
         line = strstr(line + 2, "\r\n")) {
        char *h = line + 2;
        if (strncasecmp(h, "Content-Length:", 15) == 0)
            clen = strtoul(h + 15, NULL, 10);
        else if (strncasecmp(h, "X-Fault:", 8) == 0)
            sscanf(h + 8, " %31[a-z0-9]", xfault);
        else if (strncasecmp(h, "Authorization:", 14) == 0)
            sscanf(h + 14, " %" AUTH_FIELD "[^\r]", auth);
        else if (strncasecmp(h, "traceparent:", 12) == 0)
            sscanf(h + 12, " %" TRACE_HDR_FIELD "[^\r]", tp);
        else if (strncasecmp(h, "tracestate:", 11) == 0)
            sscanf(h + 11, " %" TRACE_STATE_FIELD "[^\r]", ts);
        else if (strncasecmp(h, "Connection:", 11) == 0) {
            char *eol = strstr(h, "\r\n"), *cl = strcasestr(h, "close");
            c->close_after = cl != NULL && (eol == NULL || cl < eol);
        }
    }
    if (clen > MAX_REQUEST - head_len)
        return -1;
    if (c->in_len < head_len + clen) {
        *end = '\r';
        return 0;
    }
    handle_request(c, method, path, c->in + head_len, clen, xfault[0] ? xfault : NULL,
                   auth[0] ? auth : NULL, tp[0] ? tp : NULL, ts[0] ? ts : NULL);
    memmove(c->in, c->in + head_len + clen, c->in_len - head_len - clen);
    c->in_len -= head_len + clen;
    return 1;
}

static void conn_close(size_t i, int abort)
{
    conn *c = conns[i];
    if (abort && c->responding) {
        stats.aborted++;
        stats.last_abort_unix_ms = unix_ms();
        log_info("the client closed its connection mid-response (fd %d)", c->fd);
    }
    close(c->fd);
    for (size_t k = c->next_piece; k < c->npieces; k++)
        mem_free(c->pieces[k].bytes);
    mem_free(c->pieces);
    mem_free(c->in);
    mem_free(c->out);
    mem_free(c);
    conns[i] = conns[--nconns];
}

static int queue_out(conn *c, const char *b, size_t n)
{
    if (c->out_len - c->out_off + n > MAX_OUTPUT)
        return -1;
    if (c->out_off > 0 && c->out_off == c->out_len)
        c->out_off = c->out_len = 0;
    if (c->out_len + n > c->out_cap) {
        if (c->out != NULL)
            memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
        c->out_len -= c->out_off;
        c->out_off = 0;
        if (c->out_len + n > c->out_cap) {
            c->out_cap = (c->out_len + n) * 2;
            c->out = mem_realloc(c->out, c->out_cap);
        }
    }
    memcpy(c->out + c->out_len, b, n);
    c->out_len += n;
    return 0;
}

/* Moves due pieces to the output. Returns -1 when the output is over its
 * cap, 1 when a drop piece says to cut the connection now. */
static int run_pieces(conn *c, long long now)
{
    while (c->next_piece < c->npieces && now >= c->due_ms && c->out_len - c->out_off < OUT_HIGH) {
        piece *p = &c->pieces[c->next_piece++];
        if (p->drop)
            return 1;
        int rc = queue_out(c, p->bytes, p->len);
        mem_free(p->bytes);
        p->bytes = NULL;
        if (rc != 0)
            return -1;
        if (c->next_piece < c->npieces)
            c->due_ms = now + c->pieces[c->next_piece].delay_ms;
    }
    return 0;
}

static int flush_out(conn *c)
{
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (n < 0)
            return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
        c->out_off += (size_t)n;
    }
    return 0;
}

static int listen_on(const char *addr)
{
    char host[256];
    const char *colon = strrchr(addr, ':');
    if (colon == NULL || (size_t)(colon - addr) >= sizeof host)
        return -1;
    memcpy(host, addr, (size_t)(colon - addr));
    host[colon - addr] = '\0';
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE},
                    *res = NULL;
    if (getaddrinfo(host[0] ? host : NULL, colon + 1, &hints, &res) != 0)
        return -1;
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (fd < 0 || bind(fd, res->ai_addr, res->ai_addrlen) != 0 || listen(fd, 4096) != 0) {
        if (fd >= 0)
            close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    return fd;
}

int main(int argc, char **argv)
{
    const conf_section secs[] = {CONF_SECTION(offline_opts, &opts)};
    struct pollfd *pfds = NULL;
    int lfd = -1, status = 2;
    int rc = conf_parse(argc, argv, "offline-model",
                        "an OpenAI-compatible stand-in for a language model (deterministic; not a "
                        "model), for offline runs and tests",
                        secs, 1);
    if (rc != 0) {
        status = rc > 0 ? 0 : 2;
        goto out;
    }
    if (log_setup("offline-model", opts.log_level) != 0) {
        status = 2;
        goto out;
    }
    if (opts.fault[0] != '\0' && answer_fault_parse(opts.fault) == FAULT_NONE) {
        fprintf(stderr, "offline-model: --fault: unknown fault '%s'\n", opts.fault);
        goto out;
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    proc_raise_fd_limit();
    status = 1;
    lfd = listen_on(opts.listen);
    if (lfd < 0) {
        log_error("cannot listen on %s: %s", opts.listen, strerror(errno));
        goto out;
    }
    log_info("listening on %s (token delay %lld ms%s%s)", opts.listen, opts.token_delay_ms,
             opts.fault[0] ? ", fault " : "", opts.fault);
    conns = mem_calloc((size_t)opts.max_conns, sizeof *conns);
    pfds = mem_calloc((size_t)opts.max_conns + 1, sizeof *pfds);
    while (!stopping) {
        long long now = now_ms(), wait = 1000;
        pfds[0] = (struct pollfd){.fd = lfd, .events = POLLIN};
        for (size_t i = 0; i < nconns; i++) {
            conn *c = conns[i];
            pfds[i + 1] = (struct pollfd){.fd = c->fd, .events = POLLIN};
            if (c->out_off < c->out_len)
                pfds[i + 1].events |= POLLOUT;
            if (c->next_piece < c->npieces && c->out_len - c->out_off < OUT_HIGH) {
                long long w = c->due_ms - now;
                if (w < wait)
                    wait = w < 0 ? 0 : w;
            }
        }
        size_t npoll = nconns + 1;
        if (poll(pfds, npoll, (int)wait) < 0 && errno != EINTR)
            break;
        now = now_ms();
        /* Back to front: conn_close moves the last connection into the
         * slot it frees, which was then already handled. */
        for (size_t i = npoll - 1; i >= 1; i--) {
            conn *c = conns[i - 1];
            short re = pfds[i].revents;
            int dead = 0;
            if (re & (POLLIN | POLLHUP | POLLERR)) {
                if (c->in_len == c->in_cap) {
                    c->in_cap = c->in_cap ? c->in_cap * 2 : 4096;
                    if (c->in_cap > MAX_REQUEST)
                        c->in_cap = MAX_REQUEST;
                    c->in = mem_realloc(c->in, c->in_cap + 1);
                }
                ssize_t n = c->in_len < c->in_cap
                                ? recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, 0)
                                : -1;
                if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
                    dead = 1;
                else if (n > 0)
                    c->in_len += (size_t)n;
            }
            /* One request at a time per connection (no pipelining while a
             * response is under way). */
            if (!dead && !c->responding && c->in_len > 0 && try_request(c) < 0)
                dead = 1;
            int pr = dead ? 0 : run_pieces(c, now);
            if (pr < 0)
                dead = 1;
            if (!dead && flush_out(c) != 0)
                dead = 1;
            if (!dead && pr == 1)
                dead = 3; /* the injected drop: what was queued went first */
            if (!dead && c->responding && c->next_piece == c->npieces && c->out_off == c->out_len) {
                stats.completed++;
                c->responding = 0;
                c->npieces = c->next_piece = 0;
                if (c->close_after)
                    dead = 2;
            }
            if (dead)
                conn_close(i - 1, dead == 1);
            if (dead == 3)
                log_info("dropped a connection mid-stream (injected fault)");
        }
        if (pfds[0].revents & POLLIN) {
            for (;;) {
                int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (fd < 0)
                    break;
                if (nconns == (size_t)opts.max_conns) {
                    log_warn("at --max-conns %lld: closing a new connection", opts.max_conns);
                    close(fd);
                    continue;
                }
                int one = 1;
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                conn *c = mem_calloc(1, sizeof *c);
                c->fd = fd;
                conns[nconns++] = c;
            }
        }
    }
    log_info("stopping: %lld requests, %lld aborted by the client", stats.requests, stats.aborted);
    status = 0;
out:
    while (nconns > 0)
        conn_close(nconns - 1, 0);
    mem_free(conns);
    mem_free(pfds);
    if (lfd >= 0)
        close(lfd);
    conf_free(secs, 1);
    return status;
}
