/* llmrig — llm-svc's convo.v1.Llm served for real inside a unit test: its
 * options parsed from flags as the binary parses them, the upstream loop,
 * the endpoints, the allowed models, a tools registry the test fills, the
 * service on an in-process gRPC server (tests/common/fakesrv.h) and a gRPC
 * client calling it over loopback. The model endpoints are the test's
 * (modelsrv.h). Chat streams are gathered into a transcript, one line an
 * event, for the test to compare. Failures are cmocka assertions. */
#ifndef CONVO_TESTS_LLMRIG_H
#define CONVO_TESTS_LLMRIG_H

#include "cli.h"
#include "endpoints.h"
#include "llm.h"
#include "metrics.h"
#include "models.h"
#include "tools.h"
#include "turn.h"
#include "upstream.h"

#include "../common/fakesrv.h"

#include "convo/v1/llm.pb-c.h"

#include <pthread.h>
#include <stdint.h>

#define RIG_SECTIONS   5
#define RIG_TRANSCRIPT 16384
#define RIG_TEXT       4096

typedef struct rig {
    turn_opts to;
    chat_opts co;
    upstream_opts uo;
    endpoints_opts eo;
    models_opts mo;
    conf_section secs[RIG_SECTIONS];
    metrics *m;
    tools *tools; /* the test adds its tools between rig_init and rig_start */
    cli *cli;     /* calls llm-svc; a test may open channels to its own peers on it */
    upstream *up;
    endpoints *eps;
    models *mods;
    llm *l;
    fakesrv srv;
    cli_channel *ch; /* to the served llm-svc */
} rig;

/* Parses llm-svc's flags `args` (NULL-terminated, as after the program's
 * name; every other option at its default) and makes the metrics, an
 * empty tools registry and the client. */
void rig_init(rig *r, const char *const *args);
/* Serves convo.v1.Llm over what rig_init made and the tools added since. */
void rig_start(rig *r);
/* Stops the server, then the upstream loop, and frees everything. */
void rig_stop(rig *r);

/* A Chat call as the client saw it. Everything is under mu. */
typedef struct rig_chat {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    cli_call *call;
    int ended; /* the gRPC call ended, with code and message */
    rpc_code code;
    char message[256];
    /* One line per event: `token TEXT`, `tool_call ID NAME ARGS round=R`,
     * `tool_result ID NAME error=E RESULT`, `done REASON rounds=N
     * upstream=U model=M`, `error CATEGORY retryable=R MESSAGE`. */
    char transcript[RIG_TRANSCRIPT];
    char text[RIG_TEXT]; /* the tokens, joined */
    int tokens, tool_calls, tool_results, tool_errors, events_after_end;
    int done, error; /* a DoneEvent or an ErrorEvent came */
    Convo__V1__Usage usage;
    int has_usage;
} rig_chat;

/* Starts a Chat call. */
void rig_chat_start(rig *r, const Convo__V1__ChatRequest *req, rig_chat *c);
/* Waits until one of c's counters (&c->tokens, &c->tool_results...)
 * reaches `n` (asserted). */
void rig_chat_wait_count(rig_chat *c, const int *counter, int n);
/* The client cancels the call. */
void rig_chat_cancel(rig_chat *c);
/* Waits for the call's end (asserted) and gives its handle back. */
void rig_chat_end(rig_chat *c);
/* rig_chat_start, then rig_chat_end. */
void rig_chat_run(rig *r, const Convo__V1__ChatRequest *req, rig_chat *c);

/* A Complete call; *resp (on RPC_OK; free it) and *message (mem_free). */
rpc_code rig_complete(rig *r, const Convo__V1__CompleteRequest *req,
                      Convo__V1__CompleteResponse **resp, char **message);

/* The value of one series of /metrics (`name{labels}` as rendered), or -1
 * when it is not there. */
long long rig_metric(rig *r, const char *series);
/* Waits until the series reaches `value` (asserted). */
void rig_wait_metric(rig *r, const char *series, long long value);

#endif
