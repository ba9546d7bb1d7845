/* session: one conversation's life, the real session.c (with evlog, the
 * history and the limits) against fake router-svc, llm-svc, store-svc and
 * summary-svc served in-process (runtime srv over a real socket). The
 * transport is a test double of ws.h's boundary (conn_attach, conn_send,
 * conn_close, conn_trace_parent): it records the frames and closes a
 * session gives it, and gives back the frames' charges as a client that
 * reads would, or keeps them as one that does not. The test thread is the
 * gateway's loop: it drains the bridge and runs libev.
 *
 * Checked: a new session is announced; a turn goes Route → Chat and its
 * tokens and done are relayed in order; a second message waits (queued)
 * and the queue is bounded; cancel ends the turn as cancelled and the
 * model call is cancelled; another user's session is refused (in memory,
 * before and after the store confirmed its owner, and by the store); a
 * reconnect takes over mid-answer; a resumed session's history reaches
 * the model; a client that does not read pauses the answer stream; the
 * per-user session cap; a failed Route takes the default route; a failed
 * Chat is an error frame; the per-user frame rate; the open timeout. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "bridge.h"
#include "convo_methods.h"
#include "defroute.h"
#include "lim.h"
#include "mem.h"
#include "rpc.h"
#include "session.h"
#include "srv.h"
#include "ws.h"

#include "../common/fakesrv.h"

#include <ev.h>
#include <json-c/json.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define WAIT_MS     10000
#define POLL_US     500
#define MAX_FRAMES  512
#define MAX_CONNS   8
#define MAX_SEEN    16
#define MAX_EVENTS  256
#define TEXT_MAX    160
#define ROUTED      "the routed prompt"
#define HOLD_TOKENS 3 /* a held Chat: its first token at once, the rest on release */

/* ---- the fake services ----------------------------------------------- */

typedef struct stored_event {
    Convo__V1__EventType type;
    char content[TEXT_MAX];
} stored_event;

typedef struct fake {
    pthread_mutex_t mu;
    /* how they answer */
    rpc_code route_code;
    rpc_code chat_code; /* RPC_OK: an answer; else Chat fails at once */
    int chat_tokens;    /* tokens of an answer that is not held */
    int chat_hold;      /* answers wait after their first token (fake_release) */
    int end_hold;       /* a released answer's call stays open after done (fake_end) */
    rpc_code open_code; /* OpenSession */
    int open_delay_ms;  /* OpenSession answers this late */
    int resumed_events; /* > 0: the session exists with a user message and an answer */
    char owner[32];     /* the session's owner in the store ("": whoever opens it) */
    /* what they saw */
    int routes, chats, opens, ends, chat_cancels;
    char route_msg[MAX_SEEN][TEXT_MAX];
    char chat_msg[MAX_SEEN][TEXT_MAX];
    char chat_prompt[MAX_SEEN][TEXT_MAX];
    size_t chat_history[MAX_SEEN];
    char chat_history0[TEXT_MAX]; /* the first history message of the last Chat */
    srv_call *held;               /* a Chat waiting for fake_release or its cancel */
    srv_call *ending;             /* a Chat that sent done, waiting for fake_end */
    stored_event events[MAX_EVENTS];
    size_t nevents;
} fake;

static fake fk = {.mu = PTHREAD_MUTEX_INITIALIZER};

static void fake_reset(void)
{
    pthread_mutex_lock(&fk.mu);
    pthread_mutex_t mu = fk.mu;
    memset(&fk, 0, sizeof fk);
    fk.mu = mu;
    fk.chat_tokens = 3;
    pthread_mutex_unlock(&fk.mu);
}

static void copy_text(char *dst, const char *src)
{
    snprintf(dst, TEXT_MAX, "%s", src != NULL ? src : "");
}

static void on_route(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__RouteRequest *req = (const Convo__V1__RouteRequest *)msg;
    pthread_mutex_lock(&fk.mu);
    if (fk.routes < MAX_SEEN)
        copy_text(fk.route_msg[fk.routes], req->last_user_message);
    fk.routes++;
    rpc_code code = fk.route_code;
    pthread_mutex_unlock(&fk.mu);
    if (code != RPC_OK) {
        srv_call_finish(call, code, "router down", NULL);
        return;
    }
    char *reasons[] = {"a test route"};
    Convo__V1__RouteResponse r = CONVO__V1__ROUTE_RESPONSE__INIT;
    r.strategy = CONVO__V1__STRATEGY__STRATEGY_ANALYTICAL;
    r.strategy_name = "analytical";
    r.system_prompt = ROUTED;
    r.n_reasons = 1;
    r.reasons = reasons;
    srv_call_finish(call, RPC_OK, NULL, &r.base);
}

static void send_token(srv_call *call, const char *text)
{
    Convo__V1__TokenEvent t = CONVO__V1__TOKEN_EVENT__INIT;
    t.content = (char *)text;
    Convo__V1__ChatEvent ev = CONVO__V1__CHAT_EVENT__INIT;
    ev.event_case = CONVO__V1__CHAT_EVENT__EVENT_TOKEN;
    ev.token = &t;
    assert_int_equal(srv_call_send(call, &ev.base), 0);
}

static void send_done_event(srv_call *call)
{
    Convo__V1__Usage u = CONVO__V1__USAGE__INIT;
    u.prompt_tokens = 7;
    u.completion_tokens = 5;
    u.total_tokens = 12;
    Convo__V1__DoneEvent d = CONVO__V1__DONE_EVENT__INIT;
    d.finish_reason = "stop";
    d.usage = &u;
    Convo__V1__ChatEvent ev = CONVO__V1__CHAT_EVENT__INIT;
    ev.event_case = CONVO__V1__CHAT_EVENT__EVENT_DONE;
    ev.done = &d;
    assert_int_equal(srv_call_send(call, &ev.base), 0);
}

static void send_done(srv_call *call)
{
    send_done_event(call);
    srv_call_finish(call, RPC_OK, NULL, NULL);
}

static void on_chat_cancel(srv_call *call)
{
    pthread_mutex_lock(&fk.mu);
    int mine = fk.held == call;
    if (mine) {
        fk.held = NULL;
        fk.chat_cancels++;
    }
    pthread_mutex_unlock(&fk.mu);
    if (mine)
        srv_call_finish(call, RPC_CANCELLED, "cancelled", NULL);
}

static void on_chat(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__ChatRequest *req = (const Convo__V1__ChatRequest *)msg;
    pthread_mutex_lock(&fk.mu);
    if (fk.chats < MAX_SEEN) {
        copy_text(fk.chat_msg[fk.chats], req->message);
        copy_text(fk.chat_prompt[fk.chats], req->system_prompt);
        fk.chat_history[fk.chats] = req->n_history;
    }
    copy_text(fk.chat_history0, req->n_history > 0 ? req->history[0]->content : "");
    fk.chats++;
    rpc_code code = fk.chat_code;
    int hold = fk.chat_hold, n = fk.chat_tokens;
    if (hold && code == RPC_OK)
        fk.held = call;
    pthread_mutex_unlock(&fk.mu);
    if (code != RPC_OK) {
        srv_call_finish(call, code, "model down", NULL);
        return;
    }
    if (hold) {
        srv_call_on_cancel(call, on_chat_cancel);
        send_token(call, "t0");
        return;
    }
    char text[16];
    for (int i = 0; i < n; i++) {
        snprintf(text, sizeof text, "t%d", i);
        send_token(call, text);
    }
    send_done(call);
}

/* The held Chat's other tokens and its end. Returns 0, or -1 when none is
 * held (it was cancelled). */
static int fake_release(void)
{
    pthread_mutex_lock(&fk.mu);
    srv_call *call = fk.held;
    fk.held = NULL;
    int end_hold = fk.end_hold;
    if (end_hold)
        fk.ending = call;
    pthread_mutex_unlock(&fk.mu);
    if (call == NULL)
        return -1;
    char text[16];
    for (int i = 1; i < HOLD_TOKENS; i++) {
        snprintf(text, sizeof text, "t%d", i);
        send_token(call, text);
    }
    if (end_hold)
        send_done_event(call);
    else
        send_done(call);
    return 0;
}

/* Ends the call that fake_release left open after its done event. */
static void fake_end(void)
{
    pthread_mutex_lock(&fk.mu);
    srv_call *call = fk.ending;
    fk.ending = NULL;
    pthread_mutex_unlock(&fk.mu);
    assert_non_null(call);
    srv_call_finish(call, RPC_OK, NULL, NULL);
}

static void session_of(Convo__V1__Session *s, const char *id, const char *user, int resumed)
{
    s->session_id = (char *)id;
    s->user_id = (char *)user;
    s->event_count = resumed;
    s->last_seq = resumed;
    s->user_message_count = resumed > 0;
}

static void on_open_session(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__OpenSessionRequest *req = (const Convo__V1__OpenSessionRequest *)msg;
    pthread_mutex_lock(&fk.mu);
    fk.opens++;
    rpc_code code = fk.open_code;
    int delay = fk.open_delay_ms, resumed = fk.resumed_events;
    if (fk.owner[0] != '\0' && strcmp(fk.owner, req->user_id) != 0)
        code = RPC_PERMISSION_DENIED;
    pthread_mutex_unlock(&fk.mu);
    if (delay > 0)
        usleep((useconds_t)delay * 1000);
    if (code != RPC_OK) {
        srv_call_finish(call, code, "not opened", NULL);
        return;
    }
    Convo__V1__Session s = CONVO__V1__SESSION__INIT;
    session_of(&s, req->session_id, req->user_id, resumed);
    Convo__V1__OpenSessionResponse r = CONVO__V1__OPEN_SESSION_RESPONSE__INIT;
    r.session = &s;
    r.created = resumed == 0;
    srv_call_finish(call, RPC_OK, NULL, &r.base);
}

static void on_append(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__AppendEventsRequest *req = (const Convo__V1__AppendEventsRequest *)msg;
    pthread_mutex_lock(&fk.mu);
    for (size_t i = 0; i < req->n_events && fk.nevents < MAX_EVENTS; i++) {
        fk.events[fk.nevents].type = req->events[i]->type;
        copy_text(fk.events[fk.nevents++].content, req->events[i]->content);
    }
    pthread_mutex_unlock(&fk.mu);
    Convo__V1__AppendEventsResponse r = CONVO__V1__APPEND_EVENTS_RESPONSE__INIT;
    r.appended = (uint32_t)req->n_events;
    srv_call_finish(call, RPC_OK, NULL, &r.base);
}

/* A resumed session's stored events: a user message and its answer. */
static void on_list_events(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__ListEventsRequest *req = (const Convo__V1__ListEventsRequest *)msg;
    static const struct {
        Convo__V1__EventType type;
        const char *content;
    } stored[] = {{CONVO__V1__EVENT_TYPE__EVENT_TYPE_USER_MESSAGE, "an earlier question"},
                  {CONVO__V1__EVENT_TYPE__EVENT_TYPE_AI_TOKEN, "an earlier answer"}};
    for (size_t i = 0; i < sizeof stored / sizeof stored[0]; i++) {
        Convo__V1__Event ev = CONVO__V1__EVENT__INIT;
        ev.session_id = req->session_id;
        ev.seq = (int64_t)i + 1;
        ev.type = stored[i].type;
        ev.content = (char *)stored[i].content;
        srv_call_send(call, &ev.base);
    }
    srv_call_finish(call, RPC_OK, NULL, NULL);
}

static void on_end_session(srv_call *call, const ProtobufCMessage *msg)
{
    (void)msg;
    pthread_mutex_lock(&fk.mu);
    fk.ends++;
    pthread_mutex_unlock(&fk.mu);
    Convo__V1__EndSessionResponse r = CONVO__V1__END_SESSION_RESPONSE__INIT;
    srv_call_finish(call, RPC_OK, NULL, &r.base);
}

static void on_summarize(srv_call *call, const ProtobufCMessage *msg)
{
    (void)msg;
    Convo__V1__SummarizeResponse r = CONVO__V1__SUMMARIZE_RESPONSE__INIT;
    srv_call_finish(call, RPC_OK, NULL, &r.base);
}

static fake fake_snap(void)
{
    pthread_mutex_lock(&fk.mu);
    fake f = fk;
    pthread_mutex_unlock(&fk.mu);
    return f;
}

/* ---- the transport double (ws.h) --------------------------------------- */

struct conn {
    const conn_peer_ops *ops; /* the attached peer's, until closed or gone */
    void *peer;
    char *frames[MAX_FRAMES]; /* every frame sent, in order */
    size_t nframes;
    long pending;   /* charges of frames the client has not read */
    int slow;       /* the client does not read: charges stay pending */
    int closed;     /* closed by the session (conn_close) or gone */
    int gone;       /* the client went away: the connection is no more */
    int close_code; /* conn_close's; 0: the client went away */
    char close_error[64];
};

void conn_attach(conn *c, const conn_peer_ops *ops, void *peer)
{
    c->ops = ops;
    c->peer = peer;
}

void conn_send(conn *c, char *frame, size_t len, long charge)
{
    (void)len;
    /* After the client is gone the connection is freed (ws.c): a write
     * then would be a use after free. */
    assert_false(c->gone);
    if (c->closed) {
        mem_free(frame); /* closing: dropped, as ws.c does */
        return;
    }
    assert_true(c->nframes < MAX_FRAMES);
    c->frames[c->nframes++] = frame;
    c->pending += charge;
}

void conn_close(conn *c, int code, const char *error_code, const char *reason)
{
    (void)reason;
    assert_false(c->gone);
    if (c->closed)
        return;
    if (c->peer != NULL && c->pending > 0)
        c->ops->on_sent(c->peer, c->pending); /* never to be read: given back */
    c->pending = 0;
    c->closed = 1;
    c->close_code = code;
    snprintf(c->close_error, sizeof c->close_error, "%s", error_code);
    c->peer = NULL;
    c->ops = NULL;
}

const trace_span *conn_trace_parent(const conn *c)
{
    (void)c;
    return NULL;
}

/* The client reads what waits (unless slow). */
static void conn_read(conn *c)
{
    if (c->slow || c->peer == NULL || c->pending == 0)
        return;
    long charge = c->pending;
    c->pending = 0;
    c->ops->on_sent(c->peer, charge);
}

/* The client goes away, as ws.c reports it. */
static void conn_gone(conn *c)
{
    if (c->gone)
        return;
    c->gone = 1;
    c->closed = 1;
    void *peer = c->peer;
    const conn_peer_ops *ops = c->ops;
    c->peer = NULL;
    c->ops = NULL;
    if (peer != NULL) {
        if (c->pending > 0)
            ops->on_sent(peer, c->pending);
        c->pending = 0;
        ops->on_gone(peer, c);
    }
}

static void conn_text(conn *c, const char *text)
{
    assert_non_null(c->peer);
    c->ops->on_text(c->peer, text, strlen(text));
}

/* Whether frame text f is of `type`. */
static int is_type(const char *f, const char *type)
{
    char needle[64];
    snprintf(needle, sizeof needle, "\"type\":\"%s\"", type);
    if (strstr(f, needle) == NULL)
        return 0; /* not worth parsing */
    json_object *o = json_tokener_parse(f), *t;
    int is = o != NULL && json_object_object_get_ex(o, "type", &t) &&
             strcmp(json_object_get_string(t), type) == 0;
    json_object_put(o);
    return is;
}

/* The n-th frame (from 0) of `type`, parsed; NULL when there is none. */
static json_object *frame_of(const conn *c, const char *type, int n)
{
    for (size_t i = 0; i < c->nframes; i++)
        if (is_type(c->frames[i], type) && n-- == 0)
            return json_tokener_parse(c->frames[i]);
    return NULL;
}

static int count_of(const conn *c, const char *type)
{
    int n = 0;
    for (size_t i = 0; i < c->nframes; i++)
        n += is_type(c->frames[i], type);
    return n;
}

/* A field of the n-th frame of `type` as text ("" when absent). */
static const char *field(const conn *c, const char *type, int n, const char *key)
{
    static char buf[TEXT_MAX];
    buf[0] = '\0';
    json_object *o = frame_of(c, type, n), *v;
    if (o != NULL && json_object_object_get_ex(o, key, &v))
        snprintf(buf, sizeof buf, "%s", json_object_get_string(v));
    json_object_put(o);
    return buf;
}

/* ---- the gateway around the session ------------------------------------ */

typedef struct env {
    fakesrv fake;
    gw g;
    gw_opts opts; /* the defaults */
    lim_opts lopts;
    defroute_opts dopts;
    conn conns[MAX_CONNS];
    size_t nconns;
} env;

static int setup(void **state)
{
    env *e = mem_calloc(1, sizeof *e);
    char *argv[] = {"test_session", NULL};
    const conf_section secs[] = {CONF_SECTION(gw_opts, &e->opts), CONF_SECTION(lim_opts, &e->lopts),
                                 CONF_SECTION(defroute_opts, &e->dopts)};
    assert_int_equal(conf_parse(1, argv, "test_session", "", secs, 3), 0);
    fakesrv_create(&e->fake, "fake");
    const srv_method ms[] = {
        {.method = &convo__v1__router__route__method, .on_call = on_route, .callers = "*"},
        {.method = &convo__v1__llm__chat__method, .on_call = on_chat, .callers = "*"},
        {.method = &convo__v1__store__open_session__method,
         .on_call = on_open_session,
         .callers = "*"},
        {.method = &convo__v1__store__append_events__method, .on_call = on_append, .callers = "*"},
        {.method = &convo__v1__store__list_events__method,
         .on_call = on_list_events,
         .callers = "*"},
        {.method = &convo__v1__store__end_session__method,
         .on_call = on_end_session,
         .callers = "*"},
        {.method = &convo__v1__summary__summarize__method, .on_call = on_summarize, .callers = "*"},
    };
    fakesrv_add(&e->fake, ms, sizeof ms / sizeof ms[0]);
    fakesrv_run(&e->fake);
    e->g.client = cli_create(1, 0);
    e->g.store = cli_channel_create(e->g.client, e->fake.target, NULL, 0, NULL, NULL, 0);
    e->g.router = e->g.llm = e->g.summary = e->g.store;
    e->g.loop = ev_loop_new(EVFLAG_AUTO);
    e->g.bridge = bridge_create();
    *state = e;
    return 0;
}

static int teardown(void **state)
{
    env *e = *state;
    cli_destroy(&e->g.client);
    bridge_drain(e->g.bridge);
    bridge_destroy(&e->g.bridge);
    ev_loop_destroy(e->g.loop);
    fakesrv_stop(&e->fake);
    const conf_section secs[] = {CONF_SECTION(gw_opts, &e->opts), CONF_SECTION(lim_opts, &e->lopts),
                                 CONF_SECTION(defroute_opts, &e->dopts)};
    conf_free(secs, 3);
    mem_free(e);
    return 0;
}

/* Fresh options, limits (lo; NULL: the defaults), default route and
 * session table for one test. */
static env *begin(void **state, lim_opts *lo)
{
    env *e = *state;
    fake_reset();
    e->g.opts = e->opts;
    e->g.opts.event_flush_ms = 5;
    memset(&e->g.counters, 0, sizeof e->g.counters);
    e->g.events_full = 0;
    e->g.stopping = 0;
    e->g.limits = lim_create(lo != NULL ? lo : &e->lopts);
    char err[256];
    assert_int_equal(defroute_create(&e->dopts, &e->g.defroute, err, sizeof err), 0);
    e->g.sessions = sess_table_create(&e->g);
    memset(e->conns, 0, sizeof e->conns);
    e->nconns = 0;
    return e;
}

/* Runs the loop (bridge, timers, the clients' reads) until done(e, arg);
 * 0 when that did not happen within WAIT_MS. */
static int run_until(env *e, int (*done)(env *, void *), void *arg)
{
    for (int waited = 0; waited < WAIT_MS * 1000; waited += POLL_US) {
        bridge_drain(e->g.bridge);
        ev_run(e->g.loop, EVRUN_NOWAIT);
        for (size_t i = 0; i < e->nconns; i++)
            conn_read(&e->conns[i]);
        if (done(e, arg))
            return 1;
        usleep(POLL_US);
    }
    return 0;
}

/* Runs the loop for about ms milliseconds. */
static void run_for(env *e, int ms)
{
    for (int waited = 0; waited < ms * 1000; waited += POLL_US) {
        bridge_drain(e->g.bridge);
        ev_run(e->g.loop, EVRUN_NOWAIT);
        for (size_t i = 0; i < e->nconns; i++)
            conn_read(&e->conns[i]);
        usleep(POLL_US);
    }
}

typedef struct frames_wanted {
    conn *c;
    const char *type;
    int n;
} frames_wanted;

static int has_frames(env *e, void *arg)
{
    (void)e;
    const frames_wanted *w = arg;
    return count_of(w->c, w->type) >= w->n;
}

/* Waits for the n-th frame of `type` on c. */
static void wait_frames(env *e, conn *c, const char *type, int n)
{
    frames_wanted w = {c, type, n};
    assert_true(run_until(e, has_frames, &w));
}

static int is_closed(env *e, void *arg)
{
    (void)e;
    return ((conn *)arg)->closed;
}

static int no_sessions(env *e, void *arg)
{
    (void)arg;
    return sess_count(e->g.sessions) == 0;
}

static int two_sessions(env *e, void *arg)
{
    (void)arg;
    return sess_count(e->g.sessions) == 2;
}

static int stored(env *e, void *arg)
{
    (void)e;
    fake f = fake_snap();
    for (size_t i = 0; i < f.nevents; i++)
        if (strstr(f.events[i].content, arg) != NULL)
            return 1;
    return 0;
}

/* A new connection of `user` to session `id`. */
static conn *connect_to(env *e, const char *id, const char *user)
{
    assert_true(e->nconns < MAX_CONNS);
    conn *c = &e->conns[e->nconns++];
    sess_open(e->g.sessions, c, id, user);
    return c;
}

/* Every client leaves, every session ends in the store and is freed. */
static void finish(env *e)
{
    fake_release();
    for (size_t i = 0; i < e->nconns; i++)
        conn_gone(&e->conns[i]);
    assert_true(run_until(e, no_sessions, NULL));
    mem_free(e->g.sessions);
    e->g.sessions = NULL;
    lim_destroy(&e->g.limits);
    defroute_destroy(&e->g.defroute);
    for (size_t i = 0; i < e->nconns; i++)
        for (size_t f = 0; f < e->conns[i].nframes; f++)
            mem_free(e->conns[i].frames[f]);
}

/* ---- tests --------------------------------------------------------------- */

static void new_session_is_announced_and_a_turn_relayed(void **state)
{
    env *e = begin(state, NULL);
    conn *c = connect_to(e, "s-turn", "u1");
    wait_frames(e, c, "session", 1);
    assert_string_equal(field(c, "session", 0, "session_id"), "s-turn");
    assert_string_equal(field(c, "session", 0, "user_id"), "u1");
    assert_string_equal(field(c, "session", 0, "resumed"), "false");

    conn_text(c, "{\"message\": \"hello there\"}");
    wait_frames(e, c, "done", 1);
    fake f = fake_snap();
    assert_int_equal(f.routes, 1);
    assert_string_equal(f.route_msg[0], "hello there");
    /* Chat got the message and what Route decided. */
    assert_int_equal(f.chats, 1);
    assert_string_equal(f.chat_msg[0], "hello there");
    assert_string_equal(f.chat_prompt[0], ROUTED);
    assert_int_equal(f.chat_history[0], 0);
    /* The tokens, in order, then done with the usage, all of turn 1. */
    assert_int_equal(count_of(c, "token"), 3);
    for (int i = 0; i < 3; i++) {
        char want[8];
        snprintf(want, sizeof want, "t%d", i);
        assert_string_equal(field(c, "token", i, "content"), want);
        assert_string_equal(field(c, "token", i, "turn_id"), "1");
    }
    assert_string_equal(field(c, "done", 0, "status"), "completed");
    assert_string_equal(field(c, "done", 0, "turn_id"), "1");
    json_object *done = frame_of(c, "done", 0), *usage, *total;
    assert_true(json_object_object_get_ex(done, "usage", &usage));
    assert_true(json_object_object_get_ex(usage, "total_tokens", &total));
    assert_int_equal(json_object_get_int(total), 12);
    assert_false(json_object_object_get_ex(done, "degraded", &total));
    json_object_put(done);
    /* The last frame is the done: nothing of the turn after it. */
    assert_non_null(strstr(c->frames[c->nframes - 1], "\"done\""));
    assert_int_equal(atomic_load(&e->g.counters.turns), 1);
    /* The event log: the message, the route, the answer. */
    assert_true(run_until(e, stored, "\"event\":\"usage\""));
    fake s = fake_snap();
    assert_int_equal(s.events[0].type, CONVO__V1__EVENT_TYPE__EVENT_TYPE_SYSTEM_EVENT);
    assert_non_null(strstr(s.events[0].content, "connected"));
    assert_int_equal(s.events[1].type, CONVO__V1__EVENT_TYPE__EVENT_TYPE_USER_MESSAGE);
    assert_string_equal(s.events[1].content, "hello there");
    assert_non_null(strstr(s.events[2].content, "\"event\":\"route\""));
    assert_non_null(strstr(s.events[2].content, "\"strategy\":\"analytical\""));
    assert_int_equal(s.events[3].type, CONVO__V1__EVENT_TYPE__EVENT_TYPE_AI_TOKEN);
    assert_string_equal(s.events[3].content, "t0");

    /* The client leaves: the session is ended in the store and freed. */
    conn_gone(c);
    assert_true(run_until(e, no_sessions, NULL));
    assert_int_equal(fake_snap().ends, 1);
    finish(e);
}

static void second_message_waits_and_the_queue_is_bounded(void **state)
{
    env *e = begin(state, NULL);
    e->g.opts.max_queued_messages = 1;
    fk.chat_hold = 1;
    conn *c = connect_to(e, "s-queue", "u1");
    wait_frames(e, c, "session", 1);
    conn_text(c, "{\"message\": \"first\"}");
    wait_frames(e, c, "token", 1);
    conn_text(c, "{\"message\": \"second\"}");
    assert_int_equal(count_of(c, "queued"), 1);
    assert_string_equal(field(c, "queued", 0, "position"), "1");
    assert_string_equal(field(c, "queued", 0, "turn_id"), "2");
    conn_text(c, "{\"message\": \"third\"}");
    assert_int_equal(count_of(c, "error"), 1);
    assert_string_equal(field(c, "error", 0, "code"), "queue_full");
    assert_int_equal(fake_snap().routes, 1); /* the second waits */

    assert_int_equal(fake_release(), 0);
    wait_frames(e, c, "done", 1);
    wait_frames(e, c, "token", HOLD_TOKENS + 1); /* the second's first token */
    fake f = fake_snap();
    assert_int_equal(f.routes, 2);
    assert_string_equal(f.route_msg[1], "second");
    assert_string_equal(f.chat_msg[1], "second");
    /* The second turn's history holds the first question and answer. */
    assert_int_equal(f.chat_history[1], 2);
    assert_string_equal(f.chat_history0, "first");
    assert_string_equal(field(c, "token", HOLD_TOKENS, "turn_id"), "2");
    assert_int_equal(fake_release(), 0);
    wait_frames(e, c, "done", 2);
    assert_string_equal(field(c, "done", 1, "turn_id"), "2");
    assert_int_equal(fake_snap().routes, 2); /* "third" was refused, not queued */
    finish(e);
}

static int cancelled_by_server(env *e, void *arg)
{
    (void)e;
    (void)arg;
    return fake_snap().chat_cancels == 1;
}

static void cancel_ends_the_turn_as_cancelled(void **state)
{
    env *e = begin(state, NULL);
    fk.chat_hold = 1;
    conn *c = connect_to(e, "s-cancel", "u1");
    wait_frames(e, c, "session", 1);
    /* Nothing to cancel yet. */
    conn_text(c, "{\"type\": \"cancel\"}");
    assert_string_equal(field(c, "error", 0, "code"), "no_active_turn");
    conn_text(c, "{\"message\": \"tell me a long story\"}");
    wait_frames(e, c, "token", 1);
    conn_text(c, "{\"type\": \"cancel\"}");
    wait_frames(e, c, "done", 1);
    assert_string_equal(field(c, "done", 0, "status"), "cancelled");
    assert_string_equal(field(c, "done", 0, "turn_id"), "1");
    /* llm-svc saw its call cancelled: the model stops too. */
    assert_true(run_until(e, cancelled_by_server, NULL));
    assert_true(run_until(e, stored, "turn_cancelled"));
    assert_int_equal(count_of(c, "token"), 1);
    /* The session goes on: a new message is answered. */
    fk.chat_hold = 0;
    conn_text(c, "{\"message\": \"short then\"}");
    wait_frames(e, c, "done", 2);
    assert_string_equal(field(c, "done", 1, "status"), "completed");
    assert_string_equal(field(c, "done", 1, "turn_id"), "2");
    finish(e);
}

/* The done frame goes out when llm-svc's done event arrives; the call
 * ends a moment later. A cancel in between finds nothing to cancel and is
 * told so (it used to be taken silently, and the client waited forever);
 * a message in between is not told it is queued. */
static void cancel_after_done_is_told_no_active_turn(void **state)
{
    env *e = begin(state, NULL);
    fk.chat_hold = 1;
    fk.end_hold = 1;
    conn *c = connect_to(e, "s-cancel-late", "u1");
    wait_frames(e, c, "session", 1);
    conn_text(c, "{\"message\": \"a short answer\"}");
    wait_frames(e, c, "token", 1);
    assert_int_equal(fake_release(), 0);
    wait_frames(e, c, "done", 1);
    assert_string_equal(field(c, "done", 0, "status"), "completed");
    conn_text(c, "{\"type\": \"cancel\"}");
    wait_frames(e, c, "error", 1);
    assert_string_equal(field(c, "error", 0, "code"), "no_active_turn");
    /* A message in that gap waits for the call's end, without a queued
     * frame: no answer is being streamed any more. */
    fk.chat_hold = 0;
    conn_text(c, "{\"message\": \"and another\"}");
    fake_end();
    wait_frames(e, c, "done", 2);
    assert_string_equal(field(c, "done", 1, "status"), "completed");
    assert_string_equal(field(c, "done", 1, "turn_id"), "2");
    assert_int_equal(count_of(c, "queued"), 0);
    assert_int_equal(fake_snap().chat_cancels, 0);
    finish(e);
}

static void another_users_session_looks_taken(void **state)
{
    env *e = begin(state, NULL);
    conn *a = connect_to(e, "s-own", "alice");
    /* Before the store confirmed alice, bob is told to try again. */
    conn *b1 = connect_to(e, "s-own", "bob");
    assert_true(b1->closed);
    assert_int_equal(b1->close_code, WS_CLOSE_TRY_LATER);
    assert_string_equal(b1->close_error, "session_unverified");
    wait_frames(e, a, "session", 1);
    /* Once confirmed, bob is refused as not the owner; alice goes on. */
    conn *b2 = connect_to(e, "s-own", "bob");
    assert_true(b2->closed);
    assert_int_equal(b2->close_code, WS_CLOSE_FORBIDDEN);
    assert_string_equal(b2->close_error, "forbidden");
    assert_int_equal(b2->nframes, 0); /* nothing of alice's session */
    assert_false(a->closed);
    assert_int_equal(sess_count(e->g.sessions), 1);
    assert_int_equal(atomic_load(&e->g.counters.refused), 2);

    /* Not in memory, but the store says it is someone else's. */
    pthread_mutex_lock(&fk.mu);
    snprintf(fk.owner, sizeof fk.owner, "carol");
    pthread_mutex_unlock(&fk.mu);
    conn *b3 = connect_to(e, "s-carols", "bob");
    assert_true(run_until(e, is_closed, b3));
    assert_int_equal(b3->close_code, WS_CLOSE_FORBIDDEN);
    assert_int_equal(count_of(b3, "session"), 0);
    assert_int_equal(sess_count(e->g.sessions), 1); /* only alice's */
    finish(e);
}

static void reconnect_takes_over_mid_answer(void **state)
{
    env *e = begin(state, NULL);
    fk.chat_hold = 1;
    conn *c1 = connect_to(e, "s-take", "u1");
    wait_frames(e, c1, "session", 1);
    conn_text(c1, "{\"message\": \"stream to whoever holds me\"}");
    wait_frames(e, c1, "token", 1);
    conn *c2 = connect_to(e, "s-take", "u1");
    assert_true(c1->closed);
    assert_int_equal(c1->close_code, WS_CLOSE_TAKEN_OVER);
    assert_string_equal(c1->close_error, "taken_over");
    assert_string_equal(field(c2, "session", 0, "resumed"), "true");
    assert_int_equal(sess_count(e->g.sessions), 1);
    /* The answer goes on, to the new connection. */
    assert_int_equal(fake_release(), 0);
    wait_frames(e, c2, "done", 1);
    assert_int_equal(count_of(c2, "token"), HOLD_TOKENS - 1);
    assert_string_equal(field(c2, "token", 0, "content"), "t1");
    assert_string_equal(field(c2, "done", 0, "status"), "completed");
    assert_int_equal(count_of(c1, "token"), 1);
    assert_int_equal(count_of(c1, "done"), 0);
    assert_int_equal(fake_snap().opens, 1); /* the same session, not opened again */
    finish(e);
}

static void resumed_session_brings_its_history(void **state)
{
    env *e = begin(state, NULL);
    fk.resumed_events = 2;
    conn *c = connect_to(e, "s-back", "u1");
    wait_frames(e, c, "session", 1);
    assert_string_equal(field(c, "session", 0, "resumed"), "true");
    assert_string_equal(field(c, "session", 0, "history_loaded"), "true");
    assert_string_equal(field(c, "session", 0, "message_count"), "1");
    conn_text(c, "{\"message\": \"and now?\"}");
    wait_frames(e, c, "done", 1);
    fake f = fake_snap();
    assert_int_equal(f.chat_history[0], 2);
    assert_string_equal(f.chat_history0, "an earlier question");
    finish(e);
}

static void slow_client_pauses_the_answer(void **state)
{
    env *e = begin(state, NULL);
    e->g.opts.max_out_bytes = 1000;
    enum { TOKENS = 200 };
    fk.chat_tokens = TOKENS;
    conn *c = connect_to(e, "s-slow", "u1");
    wait_frames(e, c, "session", 1);
    c->slow = 1;
    conn_text(c, "{\"message\": \"flood me\"}");
    wait_frames(e, c, "token", 1);
    run_for(e, 300);
    /* Past --max-out-buffer-bytes unread, the stream stopped being read:
     * a few events' worth reached the client, not the whole answer. */
    int early = count_of(c, "token");
    assert_true(early >= 1);
    assert_true(early < TOKENS / 4);
    assert_int_equal(count_of(c, "done"), 0);
    /* The client reads again: the rest follows, in order. */
    c->slow = 0;
    wait_frames(e, c, "done", 1);
    assert_int_equal(count_of(c, "token"), TOKENS);
    char want[8];
    for (int i = 0; i < TOKENS; i += 37) {
        snprintf(want, sizeof want, "t%d", i);
        assert_string_equal(field(c, "token", i, "content"), want);
    }
    finish(e);
}

static void sessions_per_user_are_capped(void **state)
{
    env *e = *state;
    lim_opts lo = e->lopts;
    lo.open_sessions_per_user = 2;
    begin(state, &lo);
    conn *a = connect_to(e, "cap-a", "u1");
    conn *b = connect_to(e, "cap-b", "u1");
    wait_frames(e, a, "session", 1);
    wait_frames(e, b, "session", 1);
    conn *c = connect_to(e, "cap-c", "u1");
    assert_true(c->closed);
    assert_int_equal(c->close_code, WS_CLOSE_TRY_LATER);
    assert_string_equal(c->close_error, "too_many_sessions_user");
    /* Another user is not charged for u1's. */
    conn *other = connect_to(e, "cap-other", "u2");
    wait_frames(e, other, "session", 1);
    assert_int_equal(sess_count(e->g.sessions), 3);
    /* One of u1's ends: there is room again. */
    conn_gone(a);
    assert_true(run_until(e, two_sessions, NULL));
    conn *d = connect_to(e, "cap-c", "u1");
    wait_frames(e, d, "session", 1);
    assert_false(d->closed);
    finish(e);
}

static void failed_route_takes_the_default_route(void **state)
{
    env *e = begin(state, NULL);
    fk.route_code = RPC_UNAVAILABLE;
    conn *c = connect_to(e, "s-degraded", "u1");
    wait_frames(e, c, "session", 1);
    conn_text(c, "{\"message\": \"route me\"}");
    wait_frames(e, c, "done", 1);
    /* Answered all the same, with the default route's prompt, and said so. */
    fake f = fake_snap();
    assert_int_equal(f.routes, 1);
    assert_int_equal(f.chats, 1);
    const char *fallback = defroute_response(e->g.defroute)->system_prompt;
    assert_true(strlen(fallback) > 0);
    assert_int_equal(strncmp(f.chat_prompt[0], fallback, TEXT_MAX - 1), 0); /* kept: TEXT_MAX */
    assert_string_not_equal(f.chat_prompt[0], ROUTED);
    assert_string_equal(field(c, "done", 0, "status"), "completed");
    assert_string_equal(field(c, "done", 0, "degraded"), "true");
    assert_int_equal(count_of(c, "token"), 3);
    assert_int_equal(count_of(c, "error"), 0);
    assert_true(run_until(e, stored, "\"reason\":\"unavailable\""));
    assert_true(stored(e, "\"event\":\"route_degraded\""));
    assert_int_equal(defroute_degraded(e->g.defroute), 1);
    assert_true(defroute_down(e->g.defroute));
    finish(e);
}

static void failed_chat_is_an_error_frame(void **state)
{
    env *e = begin(state, NULL);
    fk.chat_code = RPC_UNAVAILABLE;
    conn *c = connect_to(e, "s-nollm", "u1");
    wait_frames(e, c, "session", 1);
    conn_text(c, "{\"message\": \"anyone there?\"}");
    wait_frames(e, c, "error", 1);
    assert_string_equal(field(c, "error", 0, "code"), "llm_unavailable");
    assert_string_equal(field(c, "error", 0, "turn_id"), "1");
    assert_string_equal(field(c, "error", 0, "request_id"), "s-nollm/1");
    assert_int_equal(count_of(c, "done"), 0);
    assert_int_equal(atomic_load(&e->g.counters.turn_errors), 1);
    assert_true(run_until(e, stored, "turn_failed"));
    /* The session is intact: the next message is answered. */
    fk.chat_code = RPC_OK;
    conn_text(c, "{\"message\": \"and now?\"}");
    wait_frames(e, c, "done", 1);
    assert_string_equal(field(c, "done", 0, "turn_id"), "2");
    finish(e);
}

static void frames_per_user_are_rate_limited(void **state)
{
    env *e = *state;
    lim_opts lo = e->lopts;
    lo.rate_burst = 2;
    lo.messages_per_minute = 1;
    begin(state, &lo);
    conn *c = connect_to(e, "s-rate", "u1");
    wait_frames(e, c, "session", 1);
    /* Every frame counts, a cancel or an invalid one too. */
    conn_text(c, "{\"type\": \"cancel\"}");
    conn_text(c, "{not json");
    conn_text(c, "{\"message\": \"over the rate\"}");
    assert_int_equal(count_of(c, "error"), 3);
    assert_string_equal(field(c, "error", 0, "code"), "no_active_turn");
    assert_string_not_equal(field(c, "error", 1, "code"), "rate_limited");
    assert_string_equal(field(c, "error", 2, "code"), "rate_limited");
    run_for(e, 50);
    assert_int_equal(fake_snap().routes, 0); /* the refused message started nothing */
    finish(e);
}

static void unconfirmed_owner_is_refused_after_the_open_timeout(void **state)
{
    env *e = begin(state, NULL);
    e->g.opts.open_timeout_ms = 50;
    fk.open_delay_ms = 400; /* well past the 50 ms, even on a loaded machine */
    conn *c = connect_to(e, "s-slowstore", "u1");
    assert_true(run_until(e, is_closed, c));
    assert_int_equal(c->close_code, WS_CLOSE_TRY_LATER);
    assert_string_equal(c->close_error, "store_unavailable");
    assert_int_equal(count_of(c, "session"), 0);
    assert_true(run_until(e, no_sessions, NULL));
    finish(e);
}

static void shutdown_closes_with_going_away(void **state)
{
    env *e = begin(state, NULL);
    conn *c = connect_to(e, "s-bye", "u1");
    wait_frames(e, c, "session", 1);
    e->g.stopping = 1;
    sess_close_all(e->g.sessions);
    assert_true(c->closed);
    assert_int_equal(c->close_code, WS_CLOSE_GOING_AWAY);
    /* Its last events are stored, then it is ended. */
    assert_true(run_until(e, no_sessions, NULL));
    assert_int_equal(fake_snap().ends, 1);
    assert_true(stored(e, "disconnected"));
    finish(e);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(new_session_is_announced_and_a_turn_relayed),
        cmocka_unit_test(second_message_waits_and_the_queue_is_bounded),
        cmocka_unit_test(cancel_ends_the_turn_as_cancelled),
        cmocka_unit_test(cancel_after_done_is_told_no_active_turn),
        cmocka_unit_test(another_users_session_looks_taken),
        cmocka_unit_test(reconnect_takes_over_mid_answer),
        cmocka_unit_test(resumed_session_brings_its_history),
        cmocka_unit_test(slow_client_pauses_the_answer),
        cmocka_unit_test(sessions_per_user_are_capped),
        cmocka_unit_test(failed_route_takes_the_default_route),
        cmocka_unit_test(failed_chat_is_an_error_frame),
        cmocka_unit_test(frames_per_user_are_rate_limited),
        cmocka_unit_test(unconfirmed_owner_is_refused_after_the_open_timeout),
        cmocka_unit_test(shutdown_closes_with_going_away),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
