#include "llmrig.h"

#include "convo_methods.h"
#include "log.h"
#include "mem.h"
#include "names.h"

#include <errno.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_ARGS      48
#define WAIT_S        10      /* the longest a test waits for llm-svc (asserted) */
#define CALL_MS       15000   /* a call's deadline: past any wait of a test */
#define POLL_US       10000   /* how often rig_wait_metric looks again */
#define CLIENT_BYTES  4194304 /* the client's largest message */
#define CLIENT_THREAD 2

void rig_init(rig *r, const char *const *args)
{
    memset(r, 0, sizeof *r);
    char *argv[MAX_ARGS] = {"llm-svc"};
    int argc = 1;
    for (; args != NULL && args[argc - 1] != NULL; argc++) {
        assert_true(argc < MAX_ARGS - 1);
        argv[argc] = (char *)args[argc - 1];
    }
    const conf_section secs[RIG_SECTIONS] = {
        CONF_SECTION(endpoints_opts, &r->eo), CONF_SECTION(models_opts, &r->mo),
        CONF_SECTION(turn_opts, &r->to),      CONF_SECTION(chat_opts, &r->co),
        CONF_SECTION(upstream_opts, &r->uo),
    };
    memcpy(r->secs, secs, sizeof secs);
    assert_int_equal(conf_parse(argc, argv, "llm-svc", "tests", r->secs, RIG_SECTIONS), 0);
    assert_int_equal(log_setup("llm-svc", "error"), 0);
    r->m = metrics_create("llm-svc");
    assert_non_null(r->m);
    r->tools = tools_create();
    r->cli = cli_create(CLIENT_THREAD, CLIENT_BYTES);
    assert_non_null(r->cli);
}

void rig_start(rig *r)
{
    char err[512] = "";
    int rc = endpoints_create(&r->eo, r->m, &r->eps, err, sizeof err);
    if (rc != 0)
        fail_msg("endpoints: %s", err);
    rc = models_create(r->eo.model, r->mo.allowed_models, r->mo.router_config, &r->mods, err,
                       sizeof err);
    if (rc != 0)
        fail_msg("models: %s", err);
    r->up = upstream_create(&r->uo, r->m);
    assert_non_null(r->up);
    r->l = llm_create(&r->to, &r->co, r->up, r->eps, r->mods, r->tools, r->m);
    fakesrv_create(&r->srv, "llm-svc");
    assert_int_equal(llm_register(r->srv.s, r->l), 0);
    fakesrv_run(&r->srv);
    r->ch = cli_channel_create(r->cli, r->srv.target, NULL, 0, NULL, err, sizeof err);
    assert_non_null(r->ch);
}

void rig_stop(rig *r)
{
    /* As llm-svc's main: the server, then the loop (its requests end),
     * then what they used. */
    fakesrv_stop(&r->srv);
    upstream_destroy(&r->up);
    cli_destroy(&r->cli);
    llm_destroy(&r->l);
    models_destroy(&r->mods);
    endpoints_destroy(&r->eps);
    tools_destroy(&r->tools);
    metrics_destroy(&r->m);
    conf_free(r->secs, RIG_SECTIONS);
}

/* ---- Chat ------------------------------------------------------------------ */

static void add_line(rig_chat *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void add_line(rig_chat *c, const char *fmt, ...)
{
    size_t len = strlen(c->transcript);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->transcript + len, sizeof c->transcript - len, fmt, ap);
    va_end(ap);
    len = strlen(c->transcript);
    if (len + 1 < sizeof c->transcript) {
        c->transcript[len] = '\n';
        c->transcript[len + 1] = '\0';
    }
}

static void record(rig_chat *c, const Convo__V1__ChatEvent *ev)
{
    if (c->done || c->error)
        c->events_after_end++;
    switch (ev->event_case) {
    case CONVO__V1__CHAT_EVENT__EVENT_TOKEN: {
        size_t len = strlen(c->text);
        snprintf(c->text + len, sizeof c->text - len, "%s", ev->token->content);
        c->tokens++;
        add_line(c, "token %s", ev->token->content);
        break;
    }
    case CONVO__V1__CHAT_EVENT__EVENT_TOOL_CALL:
        c->tool_calls++;
        add_line(c, "tool_call %s %s %s round=%u", ev->tool_call->call_id, ev->tool_call->name,
                 ev->tool_call->arguments_json, ev->tool_call->round);
        break;
    case CONVO__V1__CHAT_EVENT__EVENT_TOOL_RESULT:
        c->tool_results++;
        c->tool_errors += ev->tool_result->is_error;
        add_line(c, "tool_result %s %s error=%d %s", ev->tool_result->call_id,
                 ev->tool_result->name, ev->tool_result->is_error, ev->tool_result->result_json);
        break;
    case CONVO__V1__CHAT_EVENT__EVENT_DONE:
        c->done = 1;
        if (ev->done->usage != NULL) {
            c->has_usage = 1;
            c->usage = *ev->done->usage;
        }
        add_line(c, "done %s rounds=%u upstream=%s model=%s", ev->done->finish_reason,
                 ev->done->rounds, ev->done->upstream, ev->done->model);
        break;
    case CONVO__V1__CHAT_EVENT__EVENT_ERROR:
        c->error = 1;
        add_line(c, "error %s retryable=%d %s", names_error_category(ev->error->category),
                 ev->error->retryable, ev->error->message);
        break;
    default:
        add_line(c, "unknown event %d", (int)ev->event_case);
    }
}

static int on_event(void *arg, const ProtobufCMessage *msg)
{
    rig_chat *c = arg;
    pthread_mutex_lock(&c->mu);
    record(c, (const Convo__V1__ChatEvent *)msg);
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    return 0;
}

static void on_chat_end(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp)
{
    rig_chat *c = arg;
    if (resp != NULL)
        protobuf_c_message_free_unpacked(resp, NULL);
    pthread_mutex_lock(&c->mu);
    c->ended = 1;
    c->code = code;
    snprintf(c->message, sizeof c->message, "%s", message != NULL ? message : "");
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

void rig_chat_start(rig *r, const Convo__V1__ChatRequest *req, rig_chat *c)
{
    memset(c, 0, sizeof *c);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    cli_opts o = {.timeout_ms = CALL_MS, .request_id = "req-rig"};
    assert_int_equal(cli_stream(r->ch, &convo__v1__llm__chat__method, &req->base, &o, on_event,
                                on_chat_end, c, &c->call),
                     0);
}

/* Waits on c->cv until *value reaches n, or the call ends when stop_at_end. */
static int wait_count(rig_chat *c, const int *value, int n, int stop_at_end)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += WAIT_S;
    pthread_mutex_lock(&c->mu);
    while (*value < n && !(stop_at_end && c->ended) &&
           pthread_cond_timedwait(&c->cv, &c->mu, &until) != ETIMEDOUT)
        ;
    int reached = *value >= n;
    pthread_mutex_unlock(&c->mu);
    return reached;
}

void rig_chat_wait_count(rig_chat *c, const int *counter, int n)
{
    if (!wait_count(c, counter, n, 1))
        fail_msg("waited for %d events of a kind; got:\n%s", n, c->transcript);
}

void rig_chat_cancel(rig_chat *c)
{
    cli_call_cancel(c->call);
}

void rig_chat_end(rig_chat *c)
{
    assert_true(wait_count(c, &c->ended, 1, 0));
    cli_call_release(&c->call);
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->mu);
}

void rig_chat_run(rig *r, const Convo__V1__ChatRequest *req, rig_chat *c)
{
    rig_chat_start(r, req, c);
    rig_chat_end(c);
}

/* ---- Complete and metrics ------------------------------------------------- */

rpc_code rig_complete(rig *r, const Convo__V1__CompleteRequest *req,
                      Convo__V1__CompleteResponse **resp, char **message)
{
    cli_opts o = {.timeout_ms = CALL_MS, .request_id = "req-rig"};
    ProtobufCMessage *out = NULL;
    rpc_code code =
        cli_unary_sync(r->ch, &convo__v1__llm__complete__method, &req->base, &o, &out, message);
    *resp = (Convo__V1__CompleteResponse *)out;
    return code;
}

long long rig_metric(rig *r, const char *series)
{
    size_t len = 0;
    char *text = metrics_render(r->m, &len);
    size_t n = strlen(series);
    long long v = -1;
    for (const char *p = text; p != NULL && *p != '\0'; p = strchr(p, '\n'), p = p ? p + 1 : p) {
        if (strncmp(p, series, n) == 0 && p[n] == ' ') {
            v = strtoll(p + n + 1, NULL, 10);
            break;
        }
    }
    mem_free(text);
    return v;
}

void rig_wait_metric(rig *r, const char *series, long long value)
{
    long long v = rig_metric(r, series);
    for (int i = 0; v != value && i < WAIT_S * 1000000 / POLL_US; i++) {
        usleep(POLL_US);
        v = rig_metric(r, series);
    }
    if (v != value)
        fail_msg("%s is %lld, not %lld", series, v, value);
}
