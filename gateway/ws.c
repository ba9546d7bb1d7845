#include "ws.h"

#include "caller.h"
#include "check.h"
#include "frame.h"
#include "log.h"
#include "mem.h"
#include "rxguard.h"

#include <libwebsockets.h>
#include <string.h>

#define WS_PATH_PREFIX "/ws/session/"

/* Queued frames go out together, up to this many bytes a write: a burst of
 * tokens costs one send, not one each. A larger frame goes alone. */
#define WS_WRITE_BATCH 32768

/* A client that sends but never reads is closed once this many times
 * --max-out-buffer-bytes waits for it, plus some slack: answers pause at
 * the bound, but error frames and queued notices still add up. */
#define WS_UNREAD_FACTOR 4
#define WS_UNREAD_SLACK  65536

/* How long a close may wait for the rest of a write the socket took only
 * in part (a client that stopped reading is hung up after it). */
#define WS_CLOSE_FLUSH_SECS 5

/* A query argument's longest copy: an id over CHECK_ID_MAX still fits, so
 * it is refused as too long rather than silently cut. */
#define WS_ARG_MAX 512

struct ws_server {
    gw *g;
    ws_open_fn open;
    void *open_arg;
    /* The handshake confirmed last, for on_established (see there), and
     * its span (ended when the connection is handed on or refused). */
    struct lws *pending_wsi;
    caller pending;
    trace_span pending_span;
    unsigned char batch[LWS_PRE + WS_WRITE_BATCH]; /* gathered frames of one write */
};

typedef struct out_frame {
    struct out_frame *next;
    long charge;
    size_t len;
    unsigned char data[]; /* LWS_PRE bytes of room, then the frame */
} out_frame;

struct conn {
    struct lws *wsi;
    ws_server *ws;
    const conn_peer_ops *ops; /* the peer's, while one is attached */
    void *peer;
    out_frame *head, *tail;
    size_t out_bytes;
    char *rx; /* the message being reassembled */
    size_t rx_len;
    int closing;
    int close_flushing; /* the close waits for a partial write (WS_CLOSE_FLUSH_SECS) */
    int close_code;
    char close_reason[64];
    char ip[CALLER_IP_MAX];
    char user[AUTH_USER_MAX + 1];
    char request_id[CALLER_ID_LEN + 1];
    int held_ip, held_user; /* counted against the per-address and per-user limits */
    rxguard *guard;         /* refuses unmasked frames */
    /* The trace context the handshake carried, the parent of every turn
     * on this connection: its ids and tracestate only, never recorded. */
    trace_span client_trace;
};

/* What libwebsockets keeps per WebSocket connection. */
typedef struct pss {
    conn *ws;
} pss;

size_t ws_session_data_size(void)
{
    return sizeof(pss);
}

ws_server *ws_server_create(gw *g, ws_open_fn open, void *arg)
{
    ws_server *ws = mem_calloc(1, sizeof *ws);
    ws->g = g;
    ws->open = open;
    ws->open_arg = arg;
    return ws;
}

void ws_server_destroy(ws_server **wsp)
{
    if (*wsp != NULL)
        trace_span_end(&(*wsp)->pending_span);
    mem_free(*wsp);
    *wsp = NULL;
}

void conn_attach(conn *c, const conn_peer_ops *ops, void *peer)
{
    c->ops = ops;
    c->peer = peer;
}

/* Tells the peer the bytes are off the queue, if one is attached. */
static void sent(conn *c, long charge)
{
    if (c->peer != NULL)
        c->ops->on_sent(c->peer, charge);
}

/* Closes the connection for a reason of its own and tells the peer. */
static void close_and_tell(conn *c, int code, const char *error_code, const char *reason)
{
    void *peer = c->peer;
    const conn_peer_ops *ops = c->ops;
    conn_close(c, code, error_code, reason);
    if (peer != NULL)
        ops->on_gone(peer, c);
}

static void enqueue(conn *c, char *frame, size_t len, long charge)
{
    out_frame *f = mem_alloc(sizeof *f + LWS_PRE + len);
    f->next = NULL;
    f->charge = charge;
    f->len = len;
    memcpy(f->data + LWS_PRE, frame, len);
    mem_free(frame);
    if (c->tail != NULL)
        c->tail->next = f;
    else
        c->head = f;
    c->tail = f;
    c->out_bytes += len;
    metrics_gauge_add(c->ws->g->mx.frames_queued, 1);
    lws_callback_on_writable(c->wsi);
}

void conn_send(conn *c, char *frame, size_t len, long charge)
{
    if (c->closing) {
        mem_free(frame);
        sent(c, charge);
        return;
    }
    enqueue(c, frame, len, charge);
    /* A client that sends but never reads would grow this queue without
     * bound (answers pause at --max-out-buffer-bytes; error frames do not). */
    size_t unread_max = WS_UNREAD_FACTOR * (size_t)c->ws->g->opts.max_out_bytes + WS_UNREAD_SLACK;
    if (c->out_bytes > unread_max && c->peer != NULL) {
        log_warn("closing a connection that does not read its frames (%zu bytes waiting)",
                 c->out_bytes);
        close_and_tell(c, WS_CLOSE_POLICY, "not_reading",
                       "the connection does not read what is sent to it");
    }
}

/* Frames queued now will never be read: their charges go back while the
 * peer is still known. */
static void give_back(conn *c)
{
    long returned = 0;
    for (out_frame *f = c->head; f != NULL; f = f->next) {
        returned += f->charge;
        f->charge = 0;
    }
    if (returned > 0)
        sent(c, returned);
}

void conn_close(conn *c, int code, const char *error_code, const char *reason)
{
    if (c->closing)
        return;
    give_back(c);
    size_t len;
    char *f = frame_error(error_code, reason, 0, c->request_id, &len);
    enqueue(c, f, len, 0);
    c->closing = 1;
    c->close_code = code;
    snprintf(c->close_reason, sizeof c->close_reason, "%s", error_code);
    c->peer = NULL;
    c->ops = NULL;
    lws_callback_on_writable(c->wsi);
}

static void conn_free(conn *c)
{
    rxguard_stop(&c->guard);
    int64_t now = lws_now_usecs() / LWS_US_PER_MS;
    if (c->held_ip)
        lim_release(c->ws->g->limits, LIM_CONN_IP, c->ip, now);
    if (c->held_user)
        lim_release(c->ws->g->limits, LIM_CONN_USER, c->user, now);
    for (out_frame *f = c->head, *next; f != NULL; f = next) {
        next = f->next;
        mem_free(f);
        metrics_gauge_add(c->ws->g->mx.frames_queued, -1);
    }
    mem_free(c->rx);
    mem_free(c->client_trace.state);
    mem_free(c);
}

const trace_span *conn_trace_parent(const conn *c)
{
    return trace_ctx_valid(&c->client_trace.ctx) ? &c->client_trace : NULL;
}

static void log_refusal(const caller *c, struct lws *wsi, int status, const char *code)
{
    char target[600];
    caller_log_target(wsi, target, sizeof target);
    char st[16];
    snprintf(st, sizeof st, "%d", status);
    const log_field f[] = {{"request_id", c->request_id},
                           {"client", c->ip},
                           {"target", target},
                           {"status", st},
                           {"code", code},
                           {NULL, NULL}};
    log_fields(LOG_INFO, f, "WebSocket handshake refused: %s", code);
}

/* The handshake, before the upgrade: what can be refused with an HTTP
 * status is (Transfer-Encoding 501, headers 431, Origin 403, token 401,
 * user_id of someone else 403). What passes is kept for on_established,
 * which libwebsockets calls next, in the same call, for the same wsi.
 * Returns the callback's result (> 0: answered). */
static int on_confirm_upgrade(gw *g, struct lws *wsi)
{
    ws_server *ws = g->ws;
    caller_refusal why;
    ws->pending_wsi = NULL;
    trace_span_end(&ws->pending_span); /* a handshake never established (none expected) */
    int ok = caller_check(g, wsi, &ws->pending, &why) == 0;
    /* The span of the handshake: a child of the client's traceparent. */
    trace_span *sp = &ws->pending_span;
    trace_span_start(sp, g->tracer, "GET /ws/session/{session_id}", TRACE_SERVER,
                     &ws->pending.trace_parent, ws->pending.trace_state);
    trace_span_set_str(sp, "http.request.method", "GET");
    trace_span_set_str(sp, "http.route", "/ws/session/{session_id}");
    trace_span_set_str(sp, "convo.request_id", ws->pending.request_id);
    const trace_span *prev = trace_set_current(sp);
    if (!ok || caller_identify(g, wsi, &ws->pending, &why) != 0) {
        atomic_fetch_add(&g->counters.unauthorized, why.status == 401 || why.status == 403);
        log_refusal(&ws->pending, wsi, why.status, why.code);
        trace_span_set_int(sp, "http.response.status_code", why.status);
        trace_span_set_str(sp, "error.type", why.code);
        trace_set_current(prev);
        trace_span_end(sp);
        if (caller_answer(wsi, &ws->pending, &why, 1) != 0 || why.close)
            return -1;
        return 1;
    }
    trace_set_current(prev);
    ws->pending_wsi = wsi;
    return 0;
}

/* Refuses a new connection after the upgrade (an error frame, then the
 * close code) and counts it. */
static void refuse(gw *g, conn *c, int code, const char *error_code, const char *reason)
{
    gw_count_refused(g, error_code);
    trace_span_set_int(&g->ws->pending_span, "convo.close_code", code);
    trace_span_set_str(&g->ws->pending_span, "error.type", error_code);
    const log_field f[] = {{"request_id", c->request_id}, {"client", c->ip}, {NULL, NULL}};
    log_fields(LOG_INFO, f, "WebSocket connection refused: %s", error_code);
    conn_close(c, code, error_code, reason);
}

static void on_unmasked(void *arg)
{
    conn *c = arg;
    rxguard_stop(&c->guard);
    log_info("closing a connection that sent an unmasked frame");
    close_and_tell(c, WS_CLOSE_PROTOCOL, "unmasked_frame",
                   "client frames must be masked (RFC 6455 section 5.1)");
}

/* Takes a connection against a per-address or per-user limit. */
static int hold(gw *g, conn *c, lim_kind k, const char *key, const char *reason)
{
    int rc = lim_hold(g->limits, k, key, lws_now_usecs() / LWS_US_PER_MS);
    if (rc == 0)
        return 0;
    gw_count_limited(g, lim_name(k));
    refuse(g, c, WS_CLOSE_TRY_LATER, rc == LIM_EFULL ? "limits_full" : lim_code(k), reason);
    return -1;
}

/* A new WebSocket connection: check the path, ids and limits, then hand
 * it to the open function. */
static void establish(ws_server *ws, struct lws *wsi, pss *p);

/* A new WebSocket connection, under its handshake's span (the session's
 * OpenSession and first events are its children), which ends here. */
static void on_established(ws_server *ws, struct lws *wsi, pss *p)
{
    trace_span *sp = &ws->pending_span;
    trace_span_set_int(sp, "http.response.status_code", 101);
    const trace_span *prev = trace_set_current(sp);
    establish(ws, wsi, p);
    trace_set_current(prev);
    trace_span_end(sp);
}

static void establish(ws_server *ws, struct lws *wsi, pss *p)
{
    gw *g = ws->g;
    conn *c = mem_calloc(1, sizeof *c);
    c->wsi = wsi;
    c->ws = ws;
    p->ws = c;
    long open = atomic_fetch_add(&g->counters.connections, 1) + 1;
    metrics_counter_inc(g->mx.opened);
    if (ws->pending_wsi != wsi) {
        /* Never expected: libwebsockets confirms and establishes in one call. */
        log_error("a WebSocket connection was established without a confirmed handshake");
        refuse(g, c, WS_CLOSE_INTERNAL, "internal", "the handshake could not be checked");
        return;
    }
    ws->pending_wsi = NULL;
    const caller *who = &ws->pending;
    snprintf(c->ip, sizeof c->ip, "%s", who->ip);
    snprintf(c->request_id, sizeof c->request_id, "%s", who->request_id);
    if (trace_ctx_valid(&who->trace_parent)) {
        c->client_trace.ctx = who->trace_parent;
        if (who->trace_state[0] != '\0')
            c->client_trace.state = mem_strdup(who->trace_state);
    }

    char uri[WS_ARG_MAX] = "";
    char err[160];
    lws_hdr_copy(wsi, uri, sizeof uri, WSI_TOKEN_GET_URI);
    const char *id = strncmp(uri, WS_PATH_PREFIX, strlen(WS_PATH_PREFIX)) == 0
                         ? uri + strlen(WS_PATH_PREFIX)
                         : NULL;
    if (open > g->opts.max_connections) {
        refuse(g, c, WS_CLOSE_TRY_LATER, "too_many_connections",
               "the server is at its connection limit (--max-connections); try again later");
        return;
    }
    if (id == NULL || check_id("session_id", id, err, sizeof err) != 0) {
        refuse(g, c, WS_CLOSE_BAD_SESSION, "invalid_session_id",
               "connect to /ws/session/{session_id} with a session id of " CHECK_ID_RULE);
        return;
    }
    trace_span_set_str(&ws->pending_span, "convo.session_id", id);
    if (who->user_arg < 0) {
        refuse(g, c, WS_CLOSE_BAD_SESSION, "invalid_user_id", "user_id must be " CHECK_ID_RULE);
        return;
    }
    /* Without a token or a user_id the session id stands in for the user,
     * as in the seed (--auth none only). */
    snprintf(c->user, sizeof c->user, "%.*s", AUTH_USER_MAX, who->user[0] != '\0' ? who->user : id);
    if (hold(g, c, LIM_CONN_IP, c->ip,
             "too many connections from this address (--max-connections-per-ip)") != 0)
        return;
    c->held_ip = 1;
    if (hold(g, c, LIM_CONN_USER, c->user,
             "too many connections of this user (--max-connections-per-user)") != 0)
        return;
    c->held_user = 1;
    if (!lws_is_ssl(wsi))
        c->guard = rxguard_start(g->loop, lws_get_socket_fd(wsi), (size_t)g->opts.max_frame_bytes,
                                 on_unmasked, c);
    ws->open(ws->open_arg, c, id, c->user);
}

/* Takes the head frame off the queue; the caller frees it. */
static out_frame *pop(conn *c)
{
    out_frame *f = c->head;
    c->head = f->next;
    if (c->head == NULL)
        c->tail = NULL;
    c->out_bytes -= f->len;
    metrics_gauge_add(c->ws->g->mx.frames_queued, -1);
    return f;
}

/* Copies frames from the head of the queue into the server's batch, each
 * with its header, while they fit. Returns the bytes gathered (0: the head
 * frame is too big to share a write) and their charges in *charge. */
static size_t gather(conn *c, long *charge)
{
    unsigned char *batch = c->ws->batch;
    size_t n = 0;
    *charge = 0;
    while (c->head != NULL && n + FRAME_WS_HEADER_MAX + c->head->len <= WS_WRITE_BATCH) {
        out_frame *f = pop(c);
        n += frame_ws_header(batch + LWS_PRE + n, f->len);
        memcpy(batch + LWS_PRE + n, f->data + LWS_PRE, f->len);
        n += f->len;
        *charge += f->charge;
        mem_free(f);
    }
    return n;
}

/* Writes queued frames while the socket takes them whole. A write lws had
 * to buffer in part would make it service the socket itself and call us
 * back only when asked again, so it stops at a choked pipe instead. The
 * gathered frames are framed here and written raw (no extensions are
 * negotiated, so the frames are exactly what lws would have made). */
static int on_writeable(struct lws *wsi, conn *c)
{
    /* The first write needs no check (the socket just said it is
     * writable); checking costs a poll() each time. */
    for (int writes = 0; c->head != NULL && (writes == 0 || !lws_send_pipe_choked(wsi)); writes++) {
        long charge;
        size_t len = gather(c, &charge);
        int w;
        if (len > 0) {
            w = lws_write(wsi, c->ws->batch + LWS_PRE, len, LWS_WRITE_RAW);
        } else {
            out_frame *f = pop(c);
            w = lws_write(wsi, f->data + LWS_PRE, f->len, LWS_WRITE_TEXT);
            charge = f->charge;
            mem_free(f);
        }
        sent(c, charge);
        if (w < 0)
            return -1;
    }
    if (c->head != NULL) {
        lws_callback_on_writable(wsi);
        return 0;
    }
    if (c->closing) {
        /* The last write may still be partly in libwebsockets' buffer (the
         * socket took only some of it): closing now would drop the close
         * frame and the client would see 1006, not the code. The close
         * waits for the flush, at most WS_CLOSE_FLUSH_SECS. */
        if (lws_send_pipe_choked(wsi)) {
            if (!c->close_flushing) {
                c->close_flushing = 1;
                lws_set_timeout(wsi, PENDING_TIMEOUT_CLOSE_SEND, WS_CLOSE_FLUSH_SECS);
            }
            lws_callback_on_writable(wsi);
            return 0;
        }
        lws_close_reason(wsi, (enum lws_close_status)c->close_code,
                         (unsigned char *)c->close_reason, strlen(c->close_reason));
        return -1;
    }
    return 0;
}

static int on_receive(struct lws *wsi, conn *c, const char *in, size_t len)
{
    if (c->closing || c->peer == NULL)
        return 0;
    if (lws_frame_is_binary(wsi)) {
        close_and_tell(c, WS_CLOSE_UNSUPPORTED, "binary_frame",
                       "binary frames are not accepted; send JSON text frames");
        return 0;
    }
    long long max_frame = c->ws->g->opts.max_frame_bytes;
    if (c->rx_len + len > (size_t)max_frame) {
        char reason[128];
        snprintf(reason, sizeof reason, "a message is larger than the limit of %lld bytes",
                 max_frame);
        close_and_tell(c, WS_CLOSE_TOO_BIG, "frame_too_big", reason);
        return 0;
    }
    c->rx = mem_realloc(c->rx, c->rx_len + len + 1);
    memcpy(c->rx + c->rx_len, in, len);
    c->rx_len += len;
    if (lws_is_final_fragment(wsi) && lws_remaining_packet_payload(wsi) == 0) {
        size_t n = c->rx_len;
        c->rx_len = 0;
        c->ops->on_text(c->peer, c->rx, n);
    }
    return 0;
}

int ws_callback(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in, size_t len)
{
    gw *g = lws_context_user(lws_get_context(wsi));
    pss *p = user;
    switch (reason) {
    case LWS_CALLBACK_HTTP_CONFIRM_UPGRADE:
        return on_confirm_upgrade(g, wsi);
    case LWS_CALLBACK_ESTABLISHED:
        on_established(g->ws, wsi, p);
        return 0;
    case LWS_CALLBACK_RECEIVE:
        return p->ws != NULL ? on_receive(wsi, p->ws, in, len) : -1;
    case LWS_CALLBACK_SERVER_WRITEABLE:
        return p->ws != NULL ? on_writeable(wsi, p->ws) : 0;
    case LWS_CALLBACK_CLOSED:
        if (p->ws != NULL) {
            conn *c = p->ws;
            p->ws = NULL;
            if (c->peer != NULL) {
                give_back(c);
                void *peer = c->peer;
                const conn_peer_ops *ops = c->ops;
                c->peer = NULL;
                ops->on_gone(peer, c);
            }
            conn_free(c);
            atomic_fetch_sub(&g->counters.connections, 1);
        }
        return 0;
    default:
        break;
    }
    return lws_callback_http_dummy(wsi, reason, user, in, len);
}
