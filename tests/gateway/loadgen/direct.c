#include "direct.h"

#include "mem.h"
#include "sse.h"

#include <curl/curl.h>
#include <json-c/json.h>
#include <stdio.h>
#include <string.h>

#define SSE_MAX_LINE  (64 << 10) /* one SSE line of the model's */
#define SSE_MAX_EVENT (64 << 10) /* one event's data */
#define ERR_TEXT      320

typedef struct drun drun;

typedef struct dsess {
    drun *r;
    CURL *easy;
    sse_parser *sse;
    json_object *history; /* the conversation so far: {"role","content"} objects */
    char *body;           /* the request being sent */
    ev_timer pause;       /* the start (stagger) and think pauses */
    int turn;             /* turns finished */
    int first;
    double t0;
    double first_at; /* when this turn's first token came (0: not yet) */
    char id[32];     /* "direct-<i>", for the turn log */
    double span_from;
    plan_answer answer;
    char err[CURL_ERROR_SIZE];
} dsess;

/* One socket curl asked us to watch. */
typedef struct dsock {
    ev_io io;
    drun *r;
} dsock;

struct drun {
    struct ev_loop *loop;
    CURLM *multi;
    ev_timer timeout; /* curl's own timer */
    plan *p;
    stats *st;
    dsess *s;
    char *url;
    struct curl_slist *headers;
    json_tokener *tok;
    int live;
};

static void start_turn(dsess *s);

static void fail(dsess *s, const char *fmt, const char *detail)
{
    char text[ERR_TEXT];
    snprintf(text, sizeof text, fmt, detail);
    stats_error(s->r->st, text);
}

/* One SSE event of the answer: a chat.completion.chunk, or [DONE]. */
static int on_event(void *arg, const char *event, const char *data, size_t len)
{
    dsess *s = arg;
    drun *r = s->r;
    stats_frame(r->st);
    if (sse_is_done(data, len))
        return 0;
    json_tokener_reset(r->tok);
    json_object *chunk = json_tokener_parse_ex(r->tok, data, (int)len);
    json_object *choices, *choice, *delta, *content;
    if (chunk != NULL && json_object_object_get_ex(chunk, "choices", &choices) &&
        json_object_is_type(choices, json_type_array) &&
        (choice = json_object_array_get_idx(choices, 0)) != NULL &&
        json_object_object_get_ex(choice, "delta", &delta) &&
        json_object_object_get_ex(delta, "content", &content) &&
        json_object_is_type(content, json_type_string) && json_object_get_string_len(content) > 0) {
        double now = stats_now_ms();
        if (s->first && s->turn >= r->p->warmup)
            stats_first_token(r->st, s->t0, now);
        if (s->first)
            s->first_at = now;
        s->first = 0;
        plan_token(r->p, &s->answer, json_object_get_string(content),
                   (size_t)json_object_get_string_len(content));
        stats_token(r->st, now);
    }
    json_object_put(chunk);
    return 0;
}

static size_t on_write(char *data, size_t size, size_t n, void *arg)
{
    dsess *s = arg;
    return sse_feed(s->sse, data, size * n) == 0 ? size * n : 0;
}

static void add_message(json_object *history, const char *role, const char *content, size_t len)
{
    json_object *m = json_object_new_object();
    json_object_object_add(m, "role", json_object_new_string(role));
    json_object_object_add(m, "content", json_object_new_string_len(content, (int)len));
    json_object_array_add(history, m);
}

/* The request body: the model, streaming, and the last history_messages
 * messages before this turn's user message, and that message. */
static char *request_body(dsess *s)
{
    plan *p = s->r->p;
    size_t n = json_object_array_length(s->history);
    size_t keep = (size_t)p->history_messages + 1;
    size_t from = n > keep ? n - keep : 0;
    json_object *body = json_object_new_object();
    json_object *msgs = json_object_new_array_ext((int)(n - from));
    for (size_t i = from; i < n; i++)
        json_object_array_add(msgs, json_object_get(json_object_array_get_idx(s->history, i)));
    json_object_object_add(body, "model", json_object_new_string("offline-model"));
    json_object_object_add(body, "stream", json_object_new_boolean(1));
    json_object_object_add(body, "messages", msgs);
    char *text = mem_strdup(json_object_to_json_string_ext(body, JSON_C_TO_STRING_PLAIN));
    json_object_put(body);
    return text;
}

static void send_request(dsess *s)
{
    drun *r = s->r;
    plan *p = r->p;
    add_message(s->history, "user", p->message, strlen(p->message));
    mem_free(s->body);
    s->body = request_body(s);
    sse_parser_destroy(&s->sse);
    s->sse = sse_parser_create(SSE_MAX_LINE, SSE_MAX_EVENT, on_event, s);
    s->first = 1;
    s->first_at = 0;
    s->answer = (plan_answer){0};
    s->err[0] = '\0';
    curl_easy_setopt(s->easy, CURLOPT_POSTFIELDS, s->body);
    curl_easy_setopt(s->easy, CURLOPT_POSTFIELDSIZE, (long)strlen(s->body));
    s->t0 = stats_now_ms();
    if (s->turn == p->warmup)
        s->span_from = s->t0;
    CURLMcode mc = curl_multi_add_handle(r->multi, s->easy);
    if (mc != CURLM_OK) {
        fail(s, "model request not started: %s", curl_multi_strerror(mc));
        s->turn = p->turns; /* this session cannot go on */
        if (--r->live == 0)
            ev_break(r->loop, EVBREAK_ONE);
    }
}

/* A transfer ended: check it, remember the answer, go on. */
static void turn_done(dsess *s, CURLcode result)
{
    drun *r = s->r;
    plan *p = r->p;
    long status = 0;
    curl_easy_getinfo(s->easy, CURLINFO_RESPONSE_CODE, &status);
    curl_multi_remove_handle(r->multi, s->easy);
    stats_turn(r->st, s->id, s->turn + 1, s->t0, s->first_at, stats_now_ms());
    if (result != CURLE_OK) {
        fail(s, "model: %s", s->err[0] ? s->err : curl_easy_strerror(result));
    } else if (status != 200) {
        char code[16];
        snprintf(code, sizeof code, "%ld", status);
        fail(s, "model: HTTP status %s", code);
    } else if (!plan_complete(p, &s->answer) || !sse_idle(s->sse)) {
        fail(s, "an answer differed from the expected tokens%s", "");
    }
    /* What arrived (the tokens that matched) is the assistant's turn. */
    add_message(s->history, "assistant", p->expected, s->answer.pos);
    s->turn++;
    if (s->turn < p->turns) {
        start_turn(s);
        return;
    }
    stats_span(r->st, s->span_from, stats_now_ms());
    if (--r->live == 0)
        ev_break(r->loop, EVBREAK_ONE);
}

static void check_done(drun *r)
{
    CURLMsg *m;
    int left;
    while ((m = curl_multi_info_read(r->multi, &left)) != NULL) {
        if (m->msg != CURLMSG_DONE)
            continue;
        dsess *s = NULL;
        curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&s);
        turn_done(s, m->data.result);
    }
}

static void on_io(struct ev_loop *loop, ev_io *w, int revents)
{
    /* curl may close the socket (and on_socket free the watcher) in the call. */
    drun *r = ((dsock *)w)->r;
    int mask =
        (revents & EV_READ ? CURL_CSELECT_IN : 0) | (revents & EV_WRITE ? CURL_CSELECT_OUT : 0);
    int running;
    curl_multi_socket_action(r->multi, w->fd, mask, &running);
    check_done(r);
}

static void on_curl_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
    drun *r = w->data;
    int running;
    curl_multi_socket_action(r->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_done(r);
}

/* curl says which events a socket needs (CURLMOPT_SOCKETFUNCTION). */
static int on_socket(CURL *e, curl_socket_t fd, int what, void *arg, void *sockp)
{
    drun *r = arg;
    dsock *k = sockp;
    if (what == CURL_POLL_REMOVE) {
        if (k != NULL) {
            ev_io_stop(r->loop, &k->io);
            mem_free(k);
            curl_multi_assign(r->multi, fd, NULL);
        }
        return 0;
    }
    int events = (what & CURL_POLL_IN ? EV_READ : 0) | (what & CURL_POLL_OUT ? EV_WRITE : 0);
    if (k == NULL) {
        k = mem_calloc(1, sizeof *k);
        k->r = r;
        ev_io_init(&k->io, on_io, fd, events);
        curl_multi_assign(r->multi, fd, k);
    } else {
        ev_io_stop(r->loop, &k->io);
        ev_io_set(&k->io, fd, events);
    }
    ev_io_start(r->loop, &k->io);
    return 0;
}

/* curl says when it next needs its timeout handled (CURLMOPT_TIMERFUNCTION). */
static int on_timer(CURLM *multi, long ms, void *arg)
{
    drun *r = arg;
    ev_timer_stop(r->loop, &r->timeout);
    if (ms >= 0) {
        ev_timer_set(&r->timeout, (double)ms / 1e3, 0);
        ev_timer_start(r->loop, &r->timeout);
    }
    return 0;
}

static void on_pause(struct ev_loop *loop, ev_timer *w, int revents)
{
    send_request(w->data);
}

/* The next turn now, or after a think pause (none before the first). */
static void start_turn(dsess *s)
{
    double pause = s->turn > 0 ? plan_think_ms(s->r->p) : 0;
    if (pause > 0) {
        ev_timer_set(&s->pause, pause / 1e3, 0);
        ev_timer_start(s->r->loop, &s->pause);
    } else {
        send_request(s);
    }
}

static void on_start(struct ev_loop *loop, ev_timer *w, int revents)
{
    dsess *s = w->data;
    ev_timer_init(&s->pause, on_pause, 0, 0);
    s->pause.data = s;
    start_turn(s);
}

static void session_init(drun *r, dsess *s, int i)
{
    s->r = r;
    snprintf(s->id, sizeof s->id, "direct-%d", i);
    s->history = json_object_new_array();
    s->easy = curl_easy_init();
    curl_easy_setopt(s->easy, CURLOPT_URL, r->url);
    curl_easy_setopt(s->easy, CURLOPT_HTTPHEADER, r->headers);
    curl_easy_setopt(s->easy, CURLOPT_WRITEFUNCTION, on_write);
    curl_easy_setopt(s->easy, CURLOPT_WRITEDATA, s);
    curl_easy_setopt(s->easy, CURLOPT_PRIVATE, s);
    curl_easy_setopt(s->easy, CURLOPT_ERRORBUFFER, s->err);
    curl_easy_setopt(s->easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(s->easy, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(s->easy, CURLOPT_TIMEOUT_MS, (long)r->p->timeout_ms);
    ev_timer_init(&s->pause, on_start, plan_start_ms(r->p, i) / 1e3, 0);
    s->pause.data = s;
    ev_timer_start(r->loop, &s->pause);
}

int direct_run(struct ev_loop *loop, plan *p, const char *host, int port, stats *st,
               double *seconds)
{
    drun r = {.loop = loop, .p = p, .st = st};
    int rc = -1;
    *seconds = 0;

    r.multi = curl_multi_init();
    if (r.multi == NULL)
        goto out;
    /* Every session keeps its own connection alive between turns. */
    curl_multi_setopt(r.multi, CURLMOPT_MAXCONNECTS, (long)p->sessions);
    curl_multi_setopt(r.multi, CURLMOPT_SOCKETFUNCTION, on_socket);
    curl_multi_setopt(r.multi, CURLMOPT_SOCKETDATA, &r);
    curl_multi_setopt(r.multi, CURLMOPT_TIMERFUNCTION, on_timer);
    curl_multi_setopt(r.multi, CURLMOPT_TIMERDATA, &r);
    ev_timer_init(&r.timeout, on_curl_timeout, 0, 0);
    r.timeout.data = &r;
    r.url = mem_asprintf("http://%s:%d/v1/chat/completions", host, port);
    r.headers = curl_slist_append(NULL, "Content-Type: application/json");
    r.tok = json_tokener_new();

    r.s = mem_calloc((size_t)p->sessions, sizeof *r.s);
    r.live = p->sessions;
    ev_now_update(loop);
    double t0 = stats_now_ms();
    for (int i = 0; i < p->sessions; i++)
        session_init(&r, &r.s[i], i);
    if (r.live > 0)
        ev_run(loop, 0);
    *seconds = (stats_now_ms() - t0) / 1e3;
    rc = 0;
out:
    if (r.s != NULL) {
        for (int i = 0; i < p->sessions; i++) {
            dsess *s = &r.s[i];
            ev_timer_stop(loop, &s->pause);
            curl_multi_remove_handle(r.multi, s->easy);
            curl_easy_cleanup(s->easy);
            sse_parser_destroy(&s->sse);
            json_object_put(s->history);
            mem_free(s->body);
        }
        mem_free(r.s);
    }
    if (r.multi != NULL)
        curl_multi_cleanup(r.multi); /* closes the connections (CURL_POLL_REMOVE) */
    ev_timer_stop(loop, &r.timeout);
    curl_slist_free_all(r.headers);
    if (r.tok != NULL)
        json_tokener_free(r.tok);
    mem_free(r.url);
    return rc;
}
