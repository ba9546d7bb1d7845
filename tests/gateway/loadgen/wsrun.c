#include "wsrun.h"

#include "mem.h"

#include <curl/curl.h>
#include <json-c/json.h>
#include <libwebsockets.h>
#include <stdio.h>
#include <string.h>

#define RX_INITIAL     512   /* a token frame is about 60 bytes */
#define SERV_BUF_BYTES 32768 /* libwebsockets' per-thread read buffer */
#define ERR_TEXT       320

typedef struct wsrun wsrun;

typedef struct wsess {
    wsrun *r;
    int index;
    struct lws *wsi;
    char *id;
    char *path;
    ev_timer pause;    /* the start (stagger) and think pauses */
    ev_timer deadline; /* the plan's timeout */
    int turn;          /* turns sent so far */
    int first;         /* no token of this turn yet */
    double t0;         /* when this turn's message was written */
    double first_at;   /* when its first token came (0: not yet) */
    double span_from;  /* when the first measured turn was written */
    plan_answer answer;
    int want_send, want_close;
    int finished; /* every turn answered */
    int failed;   /* an error was counted for the connection itself */
    int gone;     /* the connection is closed; nothing refers to it */
    int close_code;
    char *rx;
    size_t rx_len, rx_cap;
} wsess;

struct wsrun {
    struct ev_loop *loop;
    struct lws_context *ctx;
    plan *p;
    const wsrun_target *t;
    stats *st;
    wsess *s;
    int live; /* sessions not yet gone */
    json_tokener *tok;
    char *msg;  /* the message frame */
    char *wbuf; /* LWS_PRE bytes of room, then a copy of msg: a client's write masks it in place */
    size_t msg_len;
};

static void session_gone(wsess *s);

static void fail(wsess *s, const char *fmt, const char *detail)
{
    char text[ERR_TEXT];
    snprintf(text, sizeof text, fmt, detail);
    stats_error(s->r->st, text);
}

/* The next message now, or after a think pause. */
static void send_now(wsess *s)
{
    s->want_send = 1;
    lws_callback_on_writable(s->wsi);
}

static void next_turn(wsess *s)
{
    wsrun *r = s->r;
    if (s->turn == r->p->turns) {
        s->finished = 1;
        stats_span(r->st, s->span_from, stats_now_ms());
        s->want_close = 1;
        lws_callback_on_writable(s->wsi);
        return;
    }
    double pause = s->turn > 0 ? plan_think_ms(r->p) : 0;
    if (pause > 0) {
        ev_timer_set(&s->pause, pause / 1e3, 0);
        ev_timer_start(r->loop, &s->pause);
    } else {
        send_now(s);
    }
}

static void on_token(wsess *s, json_object *f)
{
    wsrun *r = s->r;
    double now = stats_now_ms();
    json_object *c;
    const char *text = "";
    size_t len = 0;
    if (json_object_object_get_ex(f, "content", &c) && json_object_is_type(c, json_type_string)) {
        text = json_object_get_string(c);
        len = (size_t)json_object_get_string_len(c);
    }
    if (s->first && s->turn > r->p->warmup)
        stats_first_token(r->st, s->t0, now);
    if (s->first)
        s->first_at = now;
    s->first = 0;
    plan_token(r->p, &s->answer, text, len);
    stats_token(r->st, now);
}

static const char *str_field(json_object *f, const char *key)
{
    json_object *v;
    if (json_object_object_get_ex(f, key, &v) && json_object_is_type(v, json_type_string))
        return json_object_get_string(v);
    return "";
}

/* One whole frame from the gateway. Returns -1 to close the connection. */
static int on_frame(wsess *s, const char *data, size_t len)
{
    wsrun *r = s->r;
    stats_frame(r->st);
    json_tokener_reset(r->tok);
    json_object *f = json_tokener_parse_ex(r->tok, data, (int)len);
    if (f == NULL || !json_object_is_type(f, json_type_object)) {
        json_object_put(f);
        fail(s, "a frame that is not a JSON object%s", "");
        s->failed = 1;
        return -1;
    }
    const char *type = str_field(f, "type");
    if (strcmp(type, "token") == 0) {
        on_token(s, f);
    } else if (strcmp(type, "session") == 0) {
        if (s->turn == 0)
            next_turn(s);
    } else if (strcmp(type, "done") == 0) {
        stats_turn(r->st, s->id, s->turn, s->t0, s->first_at, stats_now_ms());
        if (!plan_complete(r->p, &s->answer))
            fail(s, "an answer differed from the expected tokens%s", "");
        next_turn(s);
    } else if (strcmp(type, "error") == 0) {
        stats_turn(r->st, s->id, s->turn, s->t0, s->first_at, stats_now_ms());
        fail(s, "error frame: %s", str_field(f, "code"));
        next_turn(s);
    }
    /* tool_call, tool_result and queued frames need no answer here. */
    json_object_put(f);
    return 0;
}

/* Reassembles a message that may come in several pieces. Returns -1 to
 * close the connection. */
static int on_receive(wsess *s, const char *in, size_t len)
{
    wsrun *r = s->r;
    int whole = lws_is_final_fragment(s->wsi) && lws_remaining_packet_payload(s->wsi) == 0;
    if (whole && s->rx_len == 0)
        return on_frame(s, in, len);
    if (s->rx_len + len > r->p->max_frame_bytes) {
        fail(s, "a frame over --max-frame-bytes%s", "");
        s->failed = 1;
        return -1;
    }
    if (s->rx_len + len > s->rx_cap) {
        size_t cap = s->rx_cap ? s->rx_cap : RX_INITIAL;
        while (cap < s->rx_len + len)
            cap *= 2;
        s->rx = mem_realloc(s->rx, cap);
        s->rx_cap = cap;
    }
    memcpy(s->rx + s->rx_len, in, len);
    s->rx_len += len;
    if (!whole)
        return 0;
    size_t n = s->rx_len;
    s->rx_len = 0;
    return on_frame(s, s->rx, n);
}

/* Writes the pending message or the close. Returns -1 to close. */
static int on_writable(wsess *s)
{
    wsrun *r = s->r;
    if (s->want_close) {
        lws_close_reason(s->wsi, LWS_CLOSE_STATUS_NORMAL, NULL, 0);
        return -1;
    }
    if (!s->want_send)
        return 0;
    s->want_send = 0;
    s->turn++;
    s->first = 1;
    s->first_at = 0;
    s->answer = (plan_answer){0};
    s->t0 = stats_now_ms();
    if (s->turn == r->p->warmup + 1)
        s->span_from = s->t0;
    memcpy(r->wbuf + LWS_PRE, r->msg, r->msg_len);
    int n = lws_write(s->wsi, (unsigned char *)r->wbuf + LWS_PRE, r->msg_len, LWS_WRITE_TEXT);
    if (n < (int)r->msg_len) {
        fail(s, "a message could not be written%s", "");
        s->failed = 1;
        return -1;
    }
    return 0;
}

static int callback(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in,
                    size_t len)
{
    wsess *s = user;
    if (s == NULL || s->gone)
        return 0;
    switch (reason) {
    case LWS_CALLBACK_CLIENT_ESTABLISHED:
        s->wsi = wsi;
        return 0;
    case LWS_CALLBACK_CLIENT_RECEIVE:
        return on_receive(s, in, len);
    case LWS_CALLBACK_CLIENT_WRITEABLE:
        return on_writable(s);
    case LWS_CALLBACK_WS_PEER_INITIATED_CLOSE:
        if (len >= 2)
            s->close_code = ((const unsigned char *)in)[0] << 8 | ((const unsigned char *)in)[1];
        return 0;
    case LWS_CALLBACK_CLIENT_CONNECTION_ERROR:
        if (!s->failed) {
            fail(s, "connection failed: %s", in != NULL ? (const char *)in : "(no reason)");
            s->failed = 1;
        }
        session_gone(s);
        return 0;
    case LWS_CALLBACK_CLIENT_CLOSED:
        session_gone(s);
        return 0;
    default:
        return 0;
    }
}

static void session_gone(wsess *s)
{
    wsrun *r = s->r;
    if (s->gone)
        return;
    s->gone = 1;
    s->wsi = NULL;
    if (!s->finished && !s->failed) {
        char code[32];
        snprintf(code, sizeof code, "%d", s->close_code);
        fail(s, "closed before the last answer (close code %s)", code);
    }
    ev_timer_stop(r->loop, &s->pause);
    ev_timer_stop(r->loop, &s->deadline);
    if (--r->live == 0)
        ev_break(r->loop, EVBREAK_ONE);
}

static void on_deadline(struct ev_loop *loop, ev_timer *w, int revents)
{
    wsess *s = w->data;
    if (s->gone)
        return;
    fail(s, "a session outlived --timeout-ms%s", "");
    s->failed = 1;
    if (s->wsi != NULL)
        lws_set_timeout(s->wsi, PENDING_TIMEOUT_USER_OK, LWS_TO_KILL_ASYNC);
    else
        session_gone(s);
}

static void connect_session(wsess *s)
{
    wsrun *r = s->r;
    struct lws_client_connect_info i;
    memset(&i, 0, sizeof i);
    i.context = r->ctx;
    i.address = r->t->host;
    i.port = r->t->port;
    i.path = s->path;
    i.host = r->t->host;
    i.local_protocol_name = "loadgen";
    i.userdata = s;
    i.pwsi = &s->wsi;
    ev_timer_set(&s->deadline, r->p->timeout_ms / 1e3, 0);
    ev_timer_start(r->loop, &s->deadline);
    if (lws_client_connect_via_info(&i) == NULL && !s->gone) {
        if (!s->failed)
            fail(s, "connection failed: %s", "could not start connecting");
        s->failed = 1;
        session_gone(s);
    }
}

static void on_pause(struct ev_loop *loop, ev_timer *w, int revents)
{
    wsess *s = w->data;
    if (s->gone)
        return;
    if (s->wsi == NULL && s->turn == 0 && !s->failed)
        connect_session(s);
    else
        send_now(s);
}

/* "/ws/session/<id>?user_id=<user>[&access_token=<token>]", escaped. */
static char *session_path(const wsrun_target *t, const char *id, int i)
{
    char user[256];
    snprintf(user, sizeof user, "%s%d", t->user_prefix, i % (t->users > 0 ? t->users : 1));
    char *u = curl_easy_escape(NULL, user, 0);
    char *tok =
        t->ntokens > 0 ? curl_easy_escape(NULL, t->tokens[(size_t)i % t->ntokens], 0) : NULL;
    char *path = mem_asprintf("/ws/session/%s?user_id=%s%s%s", id, u, tok ? "&access_token=" : "",
                              tok ? tok : "");
    curl_free(u);
    curl_free(tok);
    return path;
}

static struct lws_context *create_context(struct ev_loop *loop, const wsrun *r)
{
    static struct lws_protocols protocols[] = {
        {"loadgen", callback, 0, 0, 0, NULL, 0},
        {NULL, NULL, 0, 0, 0, NULL, 0},
    };
    struct lws_context_creation_info info;
    memset(&info, 0, sizeof info);
    info.port = CONTEXT_PORT_NO_LISTEN;
    info.protocols = protocols;
    info.pt_serv_buf_size = SERV_BUF_BYTES;
    void *foreign[] = {loop};
    info.options = LWS_SERVER_OPTION_LIBEV | LWS_SERVER_OPTION_DISABLE_IPV6;
    info.foreign_loops = foreign;
    lws_set_log_level(LLL_ERR, NULL);
    return lws_create_context(&info);
}

int wsrun_run(struct ev_loop *loop, plan *p, const wsrun_target *t, stats *st, double *seconds)
{
    wsrun r = {.loop = loop, .p = p, .t = t, .st = st};
    int rc = -1;
    *seconds = 0;

    r.ctx = create_context(loop, &r);
    if (r.ctx == NULL)
        goto out;
    r.tok = json_tokener_new();
    json_object *m = json_object_new_object();
    json_object_object_add(m, "message", json_object_new_string(p->message));
    const char *text = json_object_to_json_string_ext(m, JSON_C_TO_STRING_PLAIN);
    r.msg_len = strlen(text);
    r.msg = mem_strdup(text);
    r.wbuf = mem_alloc(LWS_PRE + r.msg_len);
    json_object_put(m);

    r.s = mem_calloc((size_t)p->sessions, sizeof *r.s);
    r.live = p->sessions;
    ev_now_update(loop);
    double t0 = stats_now_ms();
    for (int i = 0; i < p->sessions; i++) {
        wsess *s = &r.s[i];
        s->r = &r;
        s->index = i;
        s->id = mem_asprintf("%s-%d", t->run_id, i);
        s->path = session_path(t, s->id, i);
        ev_timer_init(&s->pause, on_pause, plan_start_ms(p, i) / 1e3, 0);
        s->pause.data = s;
        ev_timer_init(&s->deadline, on_deadline, 0, 0);
        s->deadline.data = s;
        ev_timer_start(loop, &s->pause);
    }
    ev_run(loop, 0);
    *seconds = (stats_now_ms() - t0) / 1e3;
    rc = 0;
out:
    /* Every connection is gone (live is 0), so no callback refers to a
     * session once the context is destroyed. */
    if (r.ctx != NULL)
        lws_context_destroy(r.ctx);
    if (r.s != NULL) {
        for (int i = 0; i < p->sessions; i++) {
            mem_free(r.s[i].id);
            mem_free(r.s[i].path);
            mem_free(r.s[i].rx);
        }
        mem_free(r.s);
    }
    if (r.tok != NULL)
        json_tokener_free(r.tok);
    mem_free(r.msg);
    mem_free(r.wbuf);
    return rc;
}
